//! Spare channels: segments and wake-up descriptors kept after a channel closed, to
//! set the next channel between the same two processes up without making any.
//!
//! Setting a channel up costs a memfd, its mapping on both sides (and the page
//! faults of touching it), four eventfds and passing five descriptors; tearing it
//! down closes and unmaps all of that. A program that makes many short connections
//! to one server (the "crr" pattern) pays this per connection. So a channel set up
//! with reuse in mind ([`crate::Channel::offer_over_reusing`],
//! [`crate::Channel::attach_over_reusing`]) leaves, when both its halves are gone,
//! a *spare* on each side: the mapped segment and both sides' eventfds.
//!
//! ```text
//!   creator (client)                        attacher (listener)
//!   spares by peer key                      spares by segment inode
//!   take one whose attacher side is Closed
//!   lay the channel out again in it
//!   HELLO kind=REUSE inode          ----->  take the spare of that inode
//!                                           attach to it (the header is checked as
//!                                           for any new segment)
//!                                   <-----  ACK, no descriptors
//!                                           (or UNKNOWN: no such spare any more;
//!                                           the creator then offers a new segment)
//! ```
//!
//! A spare is reused only by the process that kept it (a forked child forgets what
//! it inherited: parent and child must never both reuse one segment; and a channel
//! that was open across a fork is never kept, since both processes may drop it),
//! and only
//! once both sides left it: the creator takes a spare only when the attacher's side
//! is Closed, and the attacher keeps its spare *before* it marks its side Closed, so
//! the spare is there when the creator's REUSE comes. Bytes of the earlier
//! connection may still lie in the rings: the peer is the same process as before,
//! so nothing leaks to anyone new. Each side keeps at most [`MAX_SPARES`] spares
//! (five descriptors each) and [`MAX_SPARE_BYTES`] of segments, dropping the
//! oldest first, and never keeps a segment larger than [`MAX_SPARE_SEGMENT`].
//! `VMC_REUSE=0` turns reuse off; [`clear`] gives everything back.

use std::collections::VecDeque;
use std::sync::Arc;

use vmc_os::sync::ForkSafeMutex;
use vmc_os::{EventFd, Segment};
use vmc_ring::{SharedHeader, SideState};

/// Spares each side of a process keeps at most (a client making connections one
/// after the other needs two or three: the server may not have closed the last
/// one's end yet when the next begins).
pub const MAX_SPARES: usize = 8;
/// Bytes of spare segments each side of a process keeps at most.
pub const MAX_SPARE_BYTES: usize = 8 << 20;
/// Larger segments are never kept.
pub const MAX_SPARE_SEGMENT: usize = 1 << 20;

/// What a closed channel leaves for the next one.
pub(crate) struct Spare {
    pub(crate) segment: Arc<Segment>,
    /// The header as this side saw it (for the creator: to see the attacher left).
    pub(crate) header: SharedHeader,
    /// Our eventfds and the peer's, as in [`crate::core::Signals::EventFd`].
    pub(crate) mine: [EventFd; 2],
    pub(crate) peer: [EventFd; 2],
    /// The segment's inode: how both sides name it.
    pub(crate) inode: u64,
}

/// How a channel's core returns to a pool when it is dropped.
pub(crate) enum Reuse {
    /// Creator: into the spares for peer `key`.
    Offered { key: Arc<str>, inode: Option<u64> },
    /// Attacher: into the spares named by inode.
    Attached { inode: u64 },
}

/// Spares of one side of this process, each under a key. A forked child starts
/// with none: the parent keeps using those. They are forgotten, not dropped (see
/// [`ForkSafeMutex`]): the child may have closed the descriptors it inherited and
/// opened others under the same numbers (a program closing everything before exec
/// does), which dropping would close.
struct Pool {
    spares: VecDeque<(Arc<str>, Spare)>,
    bytes: usize,
}

/// A forked child starts with none (see [`Pool`]).
static OFFERED: ForkSafeMutex<Pool> = ForkSafeMutex::new(|_| Pool::new());
static ATTACHED: ForkSafeMutex<Pool> = ForkSafeMutex::new(|_| Pool::new());

impl Pool {
    const fn new() -> Pool {
        Pool {
            spares: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Keeps `spare`, returning what must be dropped instead (it, or the oldest
    /// spares it pushes out). The caller drops those after letting go of the
    /// lock: dropping closes descriptors, and a `close` hook of the preload
    /// library takes this lock too.
    fn put(&mut self, key: Arc<str>, spare: Spare) -> Vec<Spare> {
        let len = spare.segment.len();
        if len > MAX_SPARE_SEGMENT {
            return vec![spare];
        }
        let mut out = Vec::new();
        while self.bytes + len > MAX_SPARE_BYTES || self.spares.len() >= MAX_SPARES {
            match self.spares.pop_front() {
                Some((_, old)) => {
                    self.bytes -= old.segment.len();
                    out.push(old);
                }
                None => return vec![spare],
            }
        }
        self.bytes += len;
        self.spares.push_back((key, spare));
        out
    }

    fn take(&mut self, pick: impl Fn(&str, &Spare) -> bool) -> Option<Spare> {
        let i = self.spares.iter().position(|(k, s)| pick(k, s))?;
        let (_, spare) = self.spares.remove(i)?;
        self.bytes -= spare.segment.len();
        Some(spare)
    }
}

/// Keeps a creator's spare for peer `key`.
pub(crate) fn put_offered(key: Arc<str>, spare: Spare) {
    let dropped = OFFERED.lock().put(key, spare);
    drop(dropped);
}

/// A creator's spare for peer `key` of `len` bytes whose attacher has left it.
pub(crate) fn take_offered(key: &str, len: usize) -> Option<Spare> {
    OFFERED.lock().take(|k, s| {
        k == key && s.segment.len() == len && s.header.peer_state() == Some(SideState::Closed)
    })
}

/// Keeps an attacher's spare (the caller marks its side Closed after this).
pub(crate) fn put_attached(spare: Spare) {
    let dropped = ATTACHED.lock().put(Arc::from(""), spare);
    drop(dropped);
}

/// The attacher's spare of segment `inode`, if it still has it.
pub(crate) fn take_attached(inode: u64) -> Option<Spare> {
    ATTACHED.lock().take(|_, s| s.inode == inode)
}

/// Forgets (never closes) every spare holding a descriptor number in
/// `first..=last`: the program closed those numbers behind our back (a `close`,
/// `close_range` or `dup2` onto them), and may already have opened files of its own
/// under them, which using or dropping the spare would write to or close. The
/// mappings stay until the process ends. Returns how many spares were forgotten.
pub fn forget_fds(first: i32, last: i32) -> usize {
    use std::os::fd::AsRawFd;
    let holds = |s: &Spare| {
        std::iter::once(s.segment.fd().as_raw_fd())
            .chain(s.mine.iter().chain(&s.peer).map(|e| e.fd().as_raw_fd()))
            .any(|fd| (first..=last).contains(&fd))
    };
    let mut n = 0;
    for m in [&OFFERED, &ATTACHED] {
        let mut p = m.lock();
        let mut i = 0;
        while i < p.spares.len() {
            if holds(&p.spares[i].1) {
                let (_, spare) = p.spares.remove(i).expect("index checked");
                p.bytes -= spare.segment.len();
                std::mem::forget(spare);
                n += 1;
            } else {
                i += 1;
            }
        }
    }
    n
}

/// Drops every spare of this process (closing and unmapping them); for tests that
/// count descriptors, and for programs that want the memory back.
pub fn clear() {
    for m in [&OFFERED, &ATTACHED] {
        let spares: Vec<_> = {
            let mut p = m.lock();
            p.bytes = 0;
            p.spares.drain(..).collect()
        };
        drop(spares);
    }
}

/// Whether spare channels are kept (`VMC_REUSE`), read once.
static ENABLED: vmc_os::ForkSafeOnce<bool> = vmc_os::ForkSafeOnce::new();

/// False if `VMC_REUSE=0`: every channel then gets a segment of its own.
pub fn enabled() -> bool {
    *ENABLED.get_or_init(|| std::env::var_os("VMC_REUSE").map_or(true, |v| v != "0"))
}

/// Before a `fork`: waits for a reading of `VMC_REUSE` another thread began (see
/// [`vmc_os::ForkSafeOnce`]).
pub fn prepare_fork() {
    if ENABLED.started() {
        enabled();
    }
}

/// Spares kept by this process right now: (as creator, as attacher).
pub fn count() -> (usize, usize) {
    let n = |m: &ForkSafeMutex<Pool>| m.lock().spares.len();
    (n(&OFFERED), n(&ATTACHED))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Channel, ChannelConfig, WakeMode};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    /// The pools are process-wide: tests that look at them take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn config() -> ChannelConfig {
        ChannelConfig {
            wake: WakeMode::EventFd,
            capacity: 4096,
            ..ChannelConfig::default()
        }
    }

    /// A channel set up for reuse between "two processes" (this one, twice).
    fn reusing_pair(key: &str) -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().unwrap();
        let offer = Channel::offer_over_reusing(a.into(), &config(), key).unwrap();
        let attacher = std::thread::spawn(move || {
            Channel::attach_over_reusing(b.into(), std::time::Duration::ZERO).unwrap()
        });
        let creator = offer.finish().unwrap();
        (creator, attacher.join().unwrap())
    }

    fn echo(c: &mut Channel, a: &mut Channel, msg: &[u8]) {
        c.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        a.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    }

    fn lock() -> std::sync::MutexGuard<'static, ()> {
        let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        clear();
        g
    }

    #[test]
    fn a_closed_channel_is_used_again_without_old_bytes() {
        let _g = lock();
        let (mut c, mut a) = reusing_pair("peer-1");
        echo(&mut c, &mut a, b"first");
        // Left unread in both rings: must not show in the next channel.
        c.write_all(b"stale to attacher").unwrap();
        a.write_all(b"stale to creator").unwrap();
        drop(c);
        drop(a);
        assert_eq!(count(), (1, 1));

        let (mut c, mut a) = reusing_pair("peer-1");
        assert_eq!(count(), (0, 0), "both spares were taken");
        echo(&mut c, &mut a, b"second");
        echo(&mut a, &mut c, b"and back");
        drop((c, a));
        assert_eq!(count(), (1, 1));
        clear();
        assert_eq!(count(), (0, 0));
    }

    #[test]
    fn spares_are_per_peer_and_wait_for_the_peer_to_leave() {
        let _g = lock();
        let (c, a) = reusing_pair("peer-a");
        drop(c);
        // The attacher still has its end: the creator's spare is not usable yet,
        // and another peer's key never matches.
        let (c2, a2) = reusing_pair("peer-b");
        assert_eq!(
            count(),
            (1, 0),
            "peer-a's spare waits, peer-b got a new one"
        );
        drop(a);
        drop((c2, a2));
        assert_eq!(count(), (2, 2));
        let (c3, a3) = reusing_pair("peer-a");
        assert_eq!(count(), (1, 1), "peer-a's spare was reused");
        drop((c3, a3));
    }

    #[test]
    fn a_forgotten_spare_means_a_new_segment_not_a_failure() {
        let _g = lock();
        let (c, a) = reusing_pair("peer-1");
        drop((c, a));
        // The attacher dropped its spare (evicted, say): the REUSE gets UNKNOWN and
        // the creator offers a new segment on the same socket.
        ATTACHED.lock().spares.clear();
        let (mut c, mut a) = reusing_pair("peer-1");
        echo(&mut c, &mut a, b"still works");
        drop((c, a));
        assert_eq!(count(), (1, 1));
    }

    #[test]
    fn spares_whose_descriptors_were_closed_are_forgotten() {
        use std::os::fd::AsRawFd;
        let _g = lock();
        let (c, a) = reusing_pair("peer-1");
        drop((c, a));
        assert_eq!(count(), (1, 1));
        let fd = {
            let p = OFFERED.lock();
            p.spares[0].1.mine[0].fd().as_raw_fd()
        };
        assert_eq!(forget_fds(fd, fd), 1);
        assert_eq!(count(), (0, 1));
        assert_eq!(forget_fds(0, -1), 0, "an empty range");
        clear();
    }

    /// Forks; the child runs `check` and exits with 0 if it said true. True if it did.
    /// `check` may only take locks no other thread can hold at the fork: the pools'
    /// (every test that uses them holds SERIAL).
    fn in_child(check: impl FnOnce() -> bool) -> bool {
        // SAFETY: the child runs `check` (see above) and `_exit`, nothing else.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            let code = if check() { 0 } else { 1 };
            // SAFETY: ends the child at once, running nothing of the parent's.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }

    #[test]
    fn a_channel_that_lived_through_a_fork_is_not_kept() {
        let _g = lock();
        let (c, a) = reusing_pair("peer-1");
        assert!(in_child(|| true));
        // The child could have kept (and reused) its copy of the segment: neither
        // side keeps it.
        drop((c, a));
        assert_eq!(count(), (0, 0));
    }

    #[test]
    fn spares_are_bounded() {
        let _g = lock();
        let pairs: Vec<_> = (0..MAX_SPARES + 3)
            .map(|i| reusing_pair(&format!("peer-{i}")))
            .collect();
        drop(pairs);
        assert_eq!(count(), (MAX_SPARES, MAX_SPARES));
        clear();
    }

    #[test]
    fn a_forked_child_does_not_reuse_its_parents_spares() {
        let _g = lock();
        let (c, a) = reusing_pair("peer-1");
        drop((c, a));
        assert_eq!(count(), (1, 1));
        assert!(in_child(|| count() == (0, 0)));
        assert_eq!(count(), (1, 1), "the parent keeps its spares");
        clear();
    }
}
