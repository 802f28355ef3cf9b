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

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::ForkSafeOnce;

/// Forks into this process (child side), for [`fork_generation`].
static FORKS: AtomicU64 = AtomicU64::new(0);
/// Forks on either side, for [`forks_seen`].
static FORKS_SEEN: AtomicU64 = AtomicU64::new(0);
/// The handlers could not be registered: forks are not counted.
static UNCOUNTED: AtomicBool = AtomicBool::new(false);
/// The process this memory belongs to, for [`in_vfork_child`]: recorded at the
/// first call, and again by every fork's child handler.
static OWNER: AtomicU32 = AtomicU32::new(0);

extern "C" fn count_in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
    FORKS_SEEN.fetch_add(1, Ordering::Relaxed);
    // getpid is async-signal-safe, as a fork handler's work must be.
    OWNER.store(pid(), Ordering::Relaxed);
}

extern "C" fn count_in_parent() {
    FORKS_SEEN.fetch_add(1, Ordering::Relaxed);
}

/// Whether the fork counters are registered.
static REGISTERED: ForkSafeOnce<()> = ForkSafeOnce::new();

/// Registers the fork counters, once.
fn count_forks() {
    REGISTERED.get_or_init(|| {
        OWNER.store(pid(), Ordering::Relaxed);
        // SAFETY: both handlers are plain functions that only increment atomics
        // (async-signal-safe, as fork handlers must be) and live as long as the
        // program. Failure (ENOMEM) leaves forks uncounted, which is why it is
        // checked.
        if unsafe { libc::pthread_atfork(None, Some(count_in_parent), Some(count_in_child)) } != 0 {
            UNCOUNTED.store(true, Ordering::Relaxed);
        }
    });
}

/// Before a `fork` (a prepare handler): waits for a registration of the fork
/// counters another thread began (see [`ForkSafeOnce`]).
pub fn prepare_fork() {
    if REGISTERED.started() {
        count_forks();
    }
}

/// How many times this process's ancestors, since the first call, forked into it:
/// a value remembered from before a `fork` differs after it, in the child. For
/// per-process state that must not be shared with a parent, checked without the
/// system call `getpid` costs.
pub fn fork_generation() -> u64 {
    count_forks();
    if UNCOUNTED.load(Ordering::Relaxed) {
        // Told by the process and thread ids instead.
        let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        return (u64::from(pid()) << 32) | u64::from(tid);
    }
    FORKS.load(Ordering::Relaxed)
}

/// A number that every thread of one process reads alike and that differs in a
/// forked child from what its parent read (after the fork, on either side): what
/// [`crate::sync::ForkSafeMutex`] compares to tell a lock it inherited.
pub fn process_generation() -> u64 {
    count_forks();
    if UNCOUNTED.load(Ordering::Relaxed) {
        // Told by the process id (a system call) instead; the top bit keeps it
        // apart from any count.
        return (1 << 63) | u64::from(pid());
    }
    FORKS.load(Ordering::Relaxed)
}

/// Forks this process took part in since the first call, as parent or child: a
/// value remembered from before a `fork` differs after it on both sides. For
/// state that another process may share from then on.
pub fn forks_seen() -> u64 {
    count_forks();
    if UNCOUNTED.load(Ordering::Relaxed) {
        // Every call looks like a fork happened.
        return FORKS_SEEN.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    }
    FORKS_SEEN.load(Ordering::Relaxed)
}

/// Registers the fork handlers and records this process as the owner of its
/// memory, so that [`in_vfork_child`] can tell. Call it early (a library's
/// first entry), before the program may `vfork`.
pub fn note_owner() {
    count_forks();
}

/// True in the child of a `vfork` (or a `clone` with `CLONE_VM` that ran no fork
/// handler) between the call and its `exec` or `_exit`: a process that runs on
/// its parent's memory, and so on the parent's copy of every table vmc keeps.
/// Whatever such a child changes there changes for the parent (CPython's
/// subprocess resets every signal handler in a vfork child, then closes every
/// descriptor above 2), so vmc must keep out of its way and pass its calls
/// straight to the kernel. Costs a `getpid` system call: for rare calls only.
///
/// False, too, when [`note_owner`] (or another function of this module) was
/// never called before the `vfork`.
pub fn in_vfork_child() -> bool {
    let owner = OWNER.load(Ordering::Relaxed);
    owner != 0 && owner != pid()
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
        assert!(crate::test_support::in_child(|| fork_generation() != before));
        assert_eq!(
            fork_generation(),
            before,
            "the parent's generation is unchanged"
        );
    }

    #[test]
    fn a_vfork_child_is_told_from_a_forked_one() {
        note_owner();
        assert!(!in_vfork_child());
        assert!(
            crate::test_support::in_child(|| !in_vfork_child()),
            "a forked child owns its memory"
        );
        // SAFETY: the child only makes system calls (getpid) and atomic loads on
        // the shared memory, then `_exit`s; the parent is suspended meanwhile.
        // (libc deprecates vfork because a Rust caller can easily break those
        // rules; this test keeps them, as C runtimes that vfork do.)
        #[allow(deprecated)]
        let child = unsafe { libc::vfork() };
        assert!(child >= 0, "vfork failed");
        if child == 0 {
            let code = if in_vfork_child() { 0 } else { 1 };
            // SAFETY: ends the vfork child without touching the parent's state.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert!(!in_vfork_child(), "the parent still owns its memory");
    }

    #[test]
    fn a_fork_is_seen_on_both_sides() {
        let before = forks_seen();
        assert!(crate::test_support::in_child(|| forks_seen() != before));
        assert_ne!(forks_seen(), before, "the parent saw it too");
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
