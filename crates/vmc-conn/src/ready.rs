//! Readiness of a connection for event loops (poll, epoll, tokio), whose bytes may
//! arrive through shared memory rather than through the kernel.
//!
//! The kernel cannot tell when a ring has data, so a connection answers two
//! questions itself:
//! - *what is it ready for now* ([`Ready`], computed from the rings without a system
//!   call while both directions are on shared memory), and
//! - *what descriptor becomes readable when that may have changed*: each connection
//!   that an event loop waits on gets a small private epoll set, its wait set,
//!   holding the TCP socket, the control socket, the rings' wake-up eventfds and the
//!   handshake's descriptor, all edge-triggered. Arming a connection asks the rings'
//!   peers to ring those eventfds at their next write or read (the sleep/wake
//!   protocol of `vmc_ring::wait`), re-checks, and only then lets the caller sleep on
//!   the wait set, so no wake-up is lost.
//!
//! Edge-triggered consumers also need to know whether something *new* happened
//! since they last looked: [`Ready::rx_mark`] changes whenever bytes arrive (or a read
//! found none), [`Ready::tx_mark`] whenever a write found no room; as with the
//! kernel, a writer is owed a new "writable" edge only after it filled the buffer.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;

use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::Timespec;

/// Which directions a caller waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Waiting to read (or accept end of stream).
    pub read: bool,
    /// Waiting to write.
    pub write: bool,
}

impl Interest {
    /// Reading only.
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };
    /// Writing only.
    pub const WRITE: Interest = Interest {
        read: false,
        write: true,
    };
    /// Both directions.
    pub const BOTH: Interest = Interest {
        read: true,
        write: true,
    };
}

/// What a connection is ready for, in the terms of `poll(2)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// A read would not wait (bytes, end of stream, or an error to report).
    pub readable: bool,
    /// A write would not wait (space, or an error to report).
    pub writable: bool,
    /// The peer ended its sending direction (`POLLRDHUP`); reported with `readable`.
    pub read_closed: bool,
    /// Both directions are closed (`POLLHUP`).
    pub hup: bool,
    /// The socket has a pending error (`POLLERR`).
    pub error: bool,
    /// Changes whenever bytes arrive for this end (or a read found none).
    pub rx_mark: u64,
    /// Changes whenever a write found no room (after which the kernel, too, owes an
    /// edge-triggered waiter a fresh "writable" event).
    pub tx_mark: u64,
}

impl Ready {
    /// True if anything `want` asks for is ready (errors and hang-ups always count).
    pub fn meets(&self, want: Interest) -> bool {
        (want.read && self.readable) || (want.write && self.writable) || self.hup || self.error
    }
}

/// A connection's private epoll set of everything that may change its readiness.
pub(crate) struct WaitSet {
    epfd: OwnedFd,
    /// Registered descriptors and their events, to touch the kernel only on change.
    regs: Mutex<Vec<(RawFd, EventFlags)>>,
    /// The set may hold edges that fired since it was last drained. Cleared by
    /// [`WaitSet::drain`]; set again unless the waiter saw the set not readable
    /// (see [`WaitSet::woke`]), so an event loop's sleep with many connections
    /// drains only those that fired instead of one system call each.
    stale: std::sync::atomic::AtomicBool,
}

impl WaitSet {
    pub(crate) fn new() -> io::Result<WaitSet> {
        Ok(WaitSet {
            epfd: vmc_os::fdspace::lift(epoll::create(epoll::CreateFlags::CLOEXEC)?)?,
            regs: Mutex::new(Vec::new()),
            stale: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Watches `fd` for `events` (edge-triggered), registering or modifying it only
    /// if that changes anything.
    pub(crate) fn watch(&self, fd: BorrowedFd<'_>, events: EventFlags) -> io::Result<()> {
        let events = events | EventFlags::ET;
        let raw = fd.as_raw_fd();
        let mut regs = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        match regs.iter_mut().find(|(r, _)| *r == raw) {
            Some((_, e)) if *e == events => Ok(()),
            Some((_, e)) => {
                epoll::modify(&self.epfd, fd, EventData::new_u64(raw as u64), events)?;
                *e = events;
                Ok(())
            }
            None => {
                epoll::add(&self.epfd, fd, EventData::new_u64(raw as u64), events)?;
                regs.push((raw, events));
                Ok(())
            }
        }
    }

    /// Stops watching `fd` (which must still be open).
    pub(crate) fn unwatch(&self, fd: BorrowedFd<'_>) {
        let raw = fd.as_raw_fd();
        let mut regs = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = regs.iter().position(|(r, _)| *r == raw) {
            regs.swap_remove(i);
            let _ = epoll::delete(&self.epfd, fd);
        }
    }

    /// What the sleep after an arm saw of the set: `Some(readable)` if the waiter
    /// polled its descriptor, `None` if it cannot tell. A set seen not readable holds
    /// no edge, so the next [`WaitSet::drain`] is skipped; if an edge fires after
    /// that look, the set is readable at the next sleep, which then says so.
    pub(crate) fn woke(&self, readable: Option<bool>) {
        if readable != Some(false) {
            self.stale.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Consumes the edges that fired, so the set is readable again only on new ones.
    pub(crate) fn drain(&self) {
        if !self.stale.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        const BATCH: usize = 16;
        let mut events = [std::mem::MaybeUninit::<epoll::Event>::uninit(); BATCH];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        loop {
            match epoll::wait(&self.epfd, &mut events[..], Some(&zero)) {
                Ok((got, _)) if got.len() == BATCH => continue,
                Err(rustix::io::Errno::INTR) => continue,
                _ => return,
            }
        }
    }

    /// The descriptor that turns readable when something watched fired.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.epfd.as_fd()
    }
}
