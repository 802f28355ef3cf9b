//! Process identity: thin wrappers over `geteuid(2)` and `getpid(2)`.
//!
//! Used to name segment files, to check ownership of the segment directory
//! and of segment files, and to build per-user default paths.

/// The effective user id of the calling process.
#[inline]
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The process id of the calling process.
#[inline]
pub fn pid() -> u32 {
    // A pid is always positive, so the conversion is lossless.
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// The network namespace cookie of socket `sock` (`SO_NETNS_COOKIE`, Linux 5.14+):
/// a number that names the namespace for as long as the system runs, never
/// reused. Cheaper than a `stat` of `/proc/thread-self/ns/net`, and it is the
/// socket's namespace, which is the one its connections are routed in.
pub fn socket_netns_cookie(sock: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    /// `SO_NETNS_COOKIE` (the same number on every architecture but mips and
    /// sparc, which vmc does not build for).
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, and the
    // kernel writes at most `len` bytes; `sock` is an open descriptor.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<u64>() {
        return Err(std::io::Error::other("SO_NETNS_COOKIE: unexpected length"));
    }
    Ok(cookie)
}

static FORKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn count_fork() {
    FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How many times this process's ancestors, since the first call, forked into it:
/// a value remembered from before a `fork` differs after it, in the child. For
/// per-process state that must not be shared with a parent, checked without the
/// system call `getpid` costs.
pub fn fork_generation() -> u64 {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: `count_fork` is a plain function that only increments an atomic
        // (async-signal-safe, as a child handler must be); it lives as long as the
        // program. Failure (ENOMEM) leaves forks uncounted, which is why it is
        // checked: then the generation is told by the process and thread ids.
        if unsafe { libc::pthread_atfork(None, None, Some(count_fork)) } != 0 {
            FORKS.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        }
    });
    match FORKS.load(std::sync::atomic::Ordering::Relaxed) {
        // Not counted: never claim the same generation twice.
        u64::MAX => {
            let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
            (u64::from(pid()) << 32) | u64::from(tid)
        }
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std() {
        assert_eq!(pid(), std::process::id());
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(euid(), unsafe { libc::geteuid() });
    }

    #[test]
    fn a_forked_child_sees_another_generation() {
        let before = fork_generation();
        assert_eq!(fork_generation(), before);
        // SAFETY: the child only calls `fork_generation` (an atomic load, the Once
        // being done already) and `_exit`, both fine in a forked child of a
        // multi-threaded process.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            let code = if fork_generation() != before { 0 } else { 1 };
            // SAFETY: ends the child at once, without running the parent's atexit
            // handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(
            fork_generation(),
            before,
            "the parent's generation is unchanged"
        );
    }

    #[test]
    fn sockets_of_one_namespace_share_a_cookie() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsFd;
        let ca = socket_netns_cookie(a.as_fd()).unwrap();
        assert_ne!(ca, 0);
        assert_eq!(socket_netns_cookie(b.as_fd()).unwrap(), ca);
    }
}
