//! What both halves of a channel share: the mapped segment, how each side sleeps
//! and is woken, and how a dead peer is noticed.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use vmc_os::{Backoff, EventFd, Segment};
use vmc_ring::{SharedHeader, SideState};

use crate::config::{WakeMode, LIVENESS_INTERVAL};
use crate::pool::{self, Reuse, Spare};

/// Which half of the channel is sleeping or being woken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// The reading half (waits for data, woken by the peer's writes).
    Read,
    /// The writing half (waits for space, woken by the peer's reads).
    Write,
}

/// How sleeps and wake-ups are carried out (the choice of [`WakeMode`]).
pub(crate) enum Signals {
    Futex,
    /// Our own eventfds (we sleep on them) and the peer's (we notify them), indexed
    /// by [`Dir`]: `[read, write]`.
    EventFd {
        mine: [EventFd; 2],
        peer: [EventFd; 2],
    },
    Poll,
}

/// How we learn that the peer died without closing.
pub(crate) enum Link {
    /// The Unix socket the handshake used: the kernel hangs it up when the peer dies.
    Socket(OwnedFd),
    /// OFD lock bytes on a directory segment, released by the kernel at death.
    SegmentLocks,
    /// Nothing (an ivshmem region between VMs): only orderly closes are seen.
    None,
}

pub(crate) struct Core {
    /// Set when this process gives up its share of the channel to another process
    /// (after fork): dropping then closes our descriptors and unmaps, and writes
    /// nothing to the shared segment.
    pub(crate) abandoned: std::sync::atomic::AtomicBool,
    pub(crate) header: SharedHeader,
    pub(crate) signals: Signals,
    pub(crate) link: Link,
    pub(crate) segment: Arc<Segment>,
    pub(crate) spin: Duration,
    /// Set up for reuse: where the segment and eventfds go when the channel is
    /// dropped (see [`crate::pool`]).
    pub(crate) reuse: Option<Reuse>,
    /// [`vmc_os::proc::forks_seen`] when the channel was set up: a channel that
    /// lived through a fork may be held by the other process too, and is never
    /// kept as a spare.
    pub(crate) forks_seen: u64,
}

impl Core {
    pub(crate) fn wake_mode(&self) -> WakeMode {
        match self.signals {
            Signals::Futex => WakeMode::Futex,
            Signals::EventFd { .. } => WakeMode::EventFd,
            Signals::Poll => WakeMode::Poll,
        }
    }

    /// Wakes the peer's `dir` half, which announced it sleeps on `word`.
    pub(crate) fn wake(&self, dir: Dir, word: &AtomicU32) {
        let r = match &self.signals {
            Signals::Futex => vmc_os::futex_wake(word, 1).map(drop),
            Signals::EventFd { peer, .. } => peer[dir as usize].notify(),
            Signals::Poll => Ok(()),
        };
        if let Err(e) = r {
            // The sleeper re-checks on its own every LIVENESS_INTERVAL at worst.
            tracing::debug!("waking the peer's {dir:?} half failed: {e}");
        }
    }

    /// Wakes whoever sleeps on our own halves' wake-ups, in any process that shares
    /// them (a fork): they look again. Eventfd channels only; others' sleepers
    /// look again on their own within [`LIVENESS_INTERVAL`].
    pub(crate) fn kick(&self) {
        if let Signals::EventFd { mine, .. } = &self.signals {
            for e in mine {
                let _ = e.notify();
            }
        }
    }

    /// Sleeps our `dir` half, which announced itself on `word`, for at most
    /// `timeout` (capped so that a dead peer is noticed). Spurious returns are fine:
    /// callers re-check.
    pub(crate) fn sleep(
        &self,
        dir: Dir,
        word: &AtomicU32,
        timeout: Duration,
        backoff: &mut Backoff,
    ) -> io::Result<()> {
        let timeout = timeout.min(LIVENESS_INTERVAL);
        match &self.signals {
            Signals::Futex => vmc_os::futex_wait(word, vmc_ring::wait::SLEEPING, Some(timeout)),
            Signals::EventFd { mine, .. } => {
                let also = match &self.link {
                    Link::Socket(s) => Some(s.as_fd()),
                    _ => None,
                };
                let me = &mine[dir as usize];
                me.wait(also, Some(timeout))?;
                me.drain()
            }
            Signals::Poll => {
                backoff.snooze();
                Ok(())
            }
        }
    }

    /// Drains the eventfd our `dir` half sleeps on (eventfd mode; else nothing).
    pub(crate) fn clear_wake(&self, dir: Dir) -> io::Result<()> {
        match &self.signals {
            Signals::EventFd { mine, .. } => mine[dir as usize].drain(),
            _ => Ok(()),
        }
    }

    /// The eventfd our `dir` half sleeps on, in eventfd mode.
    pub(crate) fn wake_fd(&self, dir: Dir) -> Option<std::os::fd::BorrowedFd<'_>> {
        match &self.signals {
            Signals::EventFd { mine, .. } => Some(mine[dir as usize].fd()),
            _ => None,
        }
    }

    /// False once the peer is known to have died (not merely closed).
    pub(crate) fn peer_alive(&self) -> bool {
        let alive = match &self.link {
            Link::Socket(s) => vmc_os::hung_up(s.as_fd()).map(|h| !h),
            Link::SegmentLocks => self.segment.peer_alive(),
            Link::None => Ok(true),
        };
        // If we cannot tell, assume alive: a false "dead" would lose a connection.
        alive.unwrap_or(true)
    }

    /// The handshake socket, for channels set up over one.
    pub(crate) fn control_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match &self.link {
            Link::Socket(s) => Some(s.as_fd()),
            _ => None,
        }
    }

    /// True if the peer closed the whole channel in an orderly way.
    pub(crate) fn peer_closed(&self) -> bool {
        self.header.peer_state() == Some(SideState::Closed)
    }
}

impl Core {
    pub(crate) fn is_abandoned(&self) -> bool {
        self.abandoned.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Core {
    /// Leaves the segment and eventfds as a spare (see [`crate::pool`]) and marks
    /// our side Closed, in the order the pool's protocol needs. False if this
    /// channel cannot be kept (then nothing was done).
    fn keep_spare(&mut self, reuse: Reuse) -> bool {
        if !matches!(self.signals, Signals::EventFd { .. })
            || vmc_os::proc::forks_seen() != self.forks_seen
        {
            return false;
        }
        let inode = match &reuse {
            Reuse::Offered { inode: Some(i), .. } => *i,
            Reuse::Attached { inode } => *inode,
            Reuse::Offered { inode: None, .. } => match self.segment.inode() {
                Ok(i) => i,
                Err(_) => return false,
            },
        };
        let Signals::EventFd { mine, peer } = std::mem::replace(&mut self.signals, Signals::Poll)
        else {
            unreachable!("checked above");
        };
        let spare = Spare {
            segment: self.segment.clone(),
            header: self.header.clone(),
            mine,
            peer,
            inode,
        };
        match reuse {
            Reuse::Offered { key, .. } => {
                self.header.set_state(SideState::Closed);
                pool::put_offered(key, spare);
            }
            Reuse::Attached { .. } => {
                // Kept before Closed shows: the creator reuses a segment only once
                // it sees Closed, and its REUSE must then find the spare here.
                pool::put_attached(spare);
                self.header.set_state(SideState::Closed);
            }
        }
        true
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if self.is_abandoned() {
            return;
        }
        if let Some(reuse) = self.reuse.take() {
            if self.keep_spare(reuse) {
                return;
            }
        }
        self.header.set_state(SideState::Closed);
    }
}
