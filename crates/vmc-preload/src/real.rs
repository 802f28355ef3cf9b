//! The C library's own functions, which the hooks call for everything that is not
//! an accelerated connection.
//!
//! Each is looked up once with `dlsym(RTLD_NEXT, name)`, the next definition after
//! ours in the lookup order (libc's, or another preload library's), and cached in an
//! atomic. The lookup happens at the first call, from whichever thread makes it;
//! racing lookups store the same address.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A lazily resolved function pointer.
pub(crate) struct Sym {
    name: &'static std::ffi::CStr,
    addr: AtomicUsize,
}

impl Sym {
    pub(crate) const fn new(name: &'static std::ffi::CStr) -> Sym {
        Sym {
            name,
            addr: AtomicUsize::new(0),
        }
    }

    /// The function's address; aborts if the C library lacks it (a hook of a
    /// function that does not exist cannot have been called).
    #[inline]
    pub(crate) fn get(&self) -> usize {
        let a = self.addr.load(Ordering::Relaxed);
        if a != 0 {
            return a;
        }
        // SAFETY: `name` is a NUL-terminated C string; RTLD_NEXT is a valid pseudo
        // handle for dlsym called from a shared object.
        let a = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        if a == 0 {
            const MSG: &[u8] = b"vmc: the C library lacks a function vmc interposes\n";
            // SAFETY: writing a static buffer to stderr; abort never returns.
            unsafe {
                libc::syscall(libc::SYS_write, 2, MSG.as_ptr(), MSG.len());
                libc::abort();
            }
        }
        self.addr.store(a, Ordering::Relaxed);
        a
    }
}

/// Declares the real functions: `real::name(args)` calls the next definition of
/// `name`, with the C signature given.
macro_rules! reals {
    ($( fn $name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty; )*) => {
        $(
            #[allow(clippy::too_many_arguments, dead_code)]
            #[inline]
            pub(crate) unsafe fn $name($($arg: $ty),*) -> $ret {
                static SYM: Sym = Sym::new(
                    // SAFETY: the literal ends with the NUL added by concat!.
                    unsafe {
                        std::ffi::CStr::from_bytes_with_nul_unchecked(
                            concat!(stringify!($name), "\0").as_bytes(),
                        )
                    },
                );
                type F = unsafe extern "C" fn($($ty),*) -> $ret;
                // SAFETY: the address is the C library's definition of `$name`,
                // whose C signature is the one declared here.
                let f = unsafe { std::mem::transmute::<usize, F>(SYM.get()) };
                // SAFETY: the caller passes what the C function expects (the
                // arguments of the hook it came through).
                unsafe { f($($arg),*) }
            }
        )*
    };
}

use libc::{
    c_int, c_uint, c_ulong, c_void, epoll_event, fd_set, iovec, loff_t, mmsghdr, msghdr, nfds_t,
    off64_t, off_t, pollfd, sigset_t, size_t, sockaddr, socklen_t, ssize_t, timespec, timeval,
};

reals! {
    fn listen(fd: c_int, backlog: c_int) -> c_int;
    fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int;
    fn getrlimit(resource: c_int, rlim: *mut libc::rlimit) -> c_int;
    fn getrlimit64(resource: c_int, rlim: *mut libc::rlimit64) -> c_int;
    fn setrlimit(resource: c_int, rlim: *const libc::rlimit) -> c_int;
    fn setrlimit64(resource: c_int, rlim: *const libc::rlimit64) -> c_int;
    fn prlimit(pid: libc::pid_t, resource: c_int, new: *const libc::rlimit, old: *mut libc::rlimit) -> c_int;
    fn prlimit64(pid: libc::pid_t, resource: c_int, new: *const libc::rlimit64, old: *mut libc::rlimit64) -> c_int;
    fn shutdown(fd: c_int, how: c_int) -> c_int;
    fn setuid(uid: libc::uid_t) -> c_int;
    fn seteuid(uid: libc::uid_t) -> c_int;
    fn setreuid(ruid: libc::uid_t, euid: libc::uid_t) -> c_int;
    fn setresuid(ruid: libc::uid_t, euid: libc::uid_t, suid: libc::uid_t) -> c_int;
    fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t;
    fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t;
    fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t;
    fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t;
    fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t;
    fn recvfrom(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t;
    fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t;
    fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t;
    fn sendto(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t;
    fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t;
    fn sendfile(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t;
    fn sendfile64(out: c_int, inp: c_int, off: *mut off64_t, n: size_t) -> ssize_t;
    fn splice(fd_in: c_int, off_in: *mut loff_t, fd_out: c_int, off_out: *mut loff_t, len: size_t, flags: c_uint) -> ssize_t;
    fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int;
    fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int;
    fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int;
    fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int;
    fn dup(fd: c_int) -> c_int;
    fn dup2(old: c_int, new: c_int) -> c_int;
    fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int;
    fn poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int;
    fn ppoll(fds: *mut pollfd, n: nfds_t, timeout: *const timespec, sigmask: *const sigset_t) -> c_int;
    fn select(n: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, timeout: *mut timeval) -> c_int;
    fn pselect(n: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, timeout: *const timespec, sigmask: *const sigset_t) -> c_int;
    fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut epoll_event) -> c_int;
    fn epoll_wait(epfd: c_int, evs: *mut epoll_event, max: c_int, timeout: c_int) -> c_int;
    fn epoll_pwait(epfd: c_int, evs: *mut epoll_event, max: c_int, timeout: c_int, sigmask: *const sigset_t) -> c_int;
    fn epoll_pwait2(epfd: c_int, evs: *mut epoll_event, max: c_int, timeout: *const timespec, sigmask: *const sigset_t) -> c_int;
    fn recvmmsg(fd: c_int, msgs: *mut mmsghdr, n: c_uint, flags: c_int, timeout: *mut timespec) -> c_int;
    fn sendmmsg(fd: c_int, msgs: *mut mmsghdr, n: c_uint, flags: c_int) -> c_int;
    fn posix_spawn(pid: *mut libc::pid_t, path: *const libc::c_char, actions: *const libc::posix_spawn_file_actions_t, attr: *const libc::posix_spawnattr_t, argv: *const *mut libc::c_char, envp: *const *mut libc::c_char) -> c_int;
    fn posix_spawnp(pid: *mut libc::pid_t, file: *const libc::c_char, actions: *const libc::posix_spawn_file_actions_t, attr: *const libc::posix_spawnattr_t, argv: *const *mut libc::c_char, envp: *const *mut libc::c_char) -> c_int;
    fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int;
    fn execve(path: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int;
    fn execv(path: *const libc::c_char, argv: *const *const libc::c_char) -> c_int;
    fn execvp(file: *const libc::c_char, argv: *const *const libc::c_char) -> c_int;
    fn execvpe(file: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int;
    fn opendir(path: *const libc::c_char) -> *mut libc::DIR;
    fn fdopendir(fd: c_int) -> *mut libc::DIR;
    fn readdir(dir: *mut libc::DIR) -> *mut libc::dirent;
    fn readdir64(dir: *mut libc::DIR) -> *mut libc::dirent64;
    fn closedir(dir: *mut libc::DIR) -> c_int;
}
