//! vmc layer 2, the OS layer: shared-memory segments, wake-ups and liveness.
//!
//! vmc accelerates TCP connections between co-resident processes by moving
//! their bytes through shared memory. This crate holds everything that talks
//! to the kernel for that; the ring layer below it is pure memory, the
//! channel layer above it combines the two.
//!
//! # Segments
//!
//! A [`Segment`] is a file mapped shared and read-write. It can be
//!
//! * a **memfd** ([`Segment::create_memfd`]), sealed against resizing and
//!   handed to the peer over a Unix socket ([`send_with_fds`] /
//!   [`recv_with_fds`]); the receiver checks the seals
//!   ([`Segment::from_memfd`]);
//! * a **file in a private directory** ([`SegmentDir`]), for peers that
//!   share a directory but not a socket, such as containers sharing
//!   `/dev/shm` (and later VMs): the creator sends the file's name, the
//!   attacher opens and unlinks it, so nothing stays on disk;
//! * an **existing file** ([`Segment::open_file`]), such as an ivshmem PCI
//!   BAR exposed as a file.
//!
//! # Wake-ups
//!
//! * [`futex_wait`] / [`futex_wake`] on a word in the segment, when both
//!   sides share a kernel;
//! * an [`EventFd`] doorbell, when the channel must sit in an `epoll` set
//!   with ordinary sockets;
//! * polling with a [`Backoff`], for peers in other VMs where neither exists.
//!
//! The words threads and processes coordinate through besides the rings (a
//! connection direction's lock, the eventcount of its bells, the claim word of a
//! connection shared by `fork`) are in [`sync`], each checked by a loom model.
//! Process-wide state opened once, which a `fork` on another thread must not
//! catch half-opened, is a [`ForkSafeOnce`].
//!
//! # Liveness
//!
//! * the Unix socket a memfd came over: [`hung_up`] turns true when the peer
//!   closes it or dies (the kernel closes a dead process's sockets);
//! * for directory segments, OFD lock bytes in the file
//!   ([`Segment::peer_alive`]): each side holds a lock on its own byte, and
//!   the kernel releases it when the holder dies, even by `SIGKILL`.
//!   [`SegmentDir::reclaim_stale`] uses the same locks to remove files left
//!   behind by dead processes.

pub mod fdpass;
pub mod fdspace;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod interrupt;
pub mod mapping;
pub mod once;
pub mod proc;
pub mod segment;
pub mod sockdiag;
pub mod sync;
pub mod unix;
pub mod wake;

pub use fdpass::{recv_with_fds, recv_with_fds_by, send_with_fds, send_with_fds_by};
pub use mapping::Mapping;
pub use once::ForkSafeOnce;
pub use proc::{euid, pid};
pub use segment::{Segment, SegmentDir, SegmentKind, MAX_SEGMENT_LEN};
pub use wake::{futex_wait, futex_wake, hung_up, Backoff, EventFd, Readiness};

/// Coordination between tests that `fork` and tests that watch descriptors
/// close: a forked child briefly holds copies of every descriptor of the
/// test process, which would keep a socket or a lock alive.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

    static FORK: RwLock<()> = RwLock::new(());

    /// Held by tests that expect a dropped descriptor to be really closed.
    pub(crate) fn fd_sensitive() -> RwLockReadGuard<'static, ()> {
        FORK.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by tests that fork.
    pub(crate) fn fork_exclusive() -> RwLockWriteGuard<'static, ()> {
        FORK.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Forks; the child runs `check` and exits with 0 if it said true. True if
    /// it did; false if it said false or was still running after 10 s (a hang,
    /// which `SIGALRM` ends). `check` must only do what is safe in the child of
    /// a multi-threaded process: no allocation, no lock another thread may hold
    /// (unless that is what is tested).
    pub(crate) fn in_child(check: impl FnOnce() -> bool) -> bool {
        // SAFETY: the child arms an alarm, runs `check` (see above) and
        // `_exit`s, nothing else.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            // SAFETY: alarm only arms a timer, whose default action ends the
            // child; `_exit` ends it at once, without the parent's atexit
            // handlers or destructors.
            unsafe {
                libc::alarm(10);
                libc::_exit(if check() { 0 } else { 1 })
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}
