//! Bells: how one thread tells another that waits on the same connection to look
//! again.
//!
//! Both halves of a connection share its control socket and its handshake, so one
//! thread may do what another waits for: finish the handshake, or read a control
//! frame meant for the other half. A reader waiting in `poll` on the TCP socket and
//! the control socket would then sleep on although its news has come. So whoever
//! changes such state rings the half's bell (half 0: receiving, 1: sending).
//!
//! A bell costs no descriptor of the connection's own unless an event loop waits on
//! it ([`Bells::loop_fds`], made at the first such wait). A thread that sleeps in a
//! blocking call instead lends its own eventfd, made once per thread and used for
//! every connection it ever waits on, so a short connection creates none. At most
//! one thread sleeps per half (it holds that half's lock), and whether the state
//! changed between its look and its sleep is told by a counter (an eventcount):
//!
//! ```text
//!   sleeper                              ringer
//!   mark = rung                          change the state
//!   look at the state: nothing           rung += 1
//!   register its eventfd                 if a sleeper is registered: notify it
//!   rung != mark? look again
//!   poll(TCP, control socket, eventfd)
//! ```
//!
//! That protocol is [`vmc_os::sync::EventCount`] (argued there, and checked by
//! vmc-os's loom models). Event loops watch the connection's own descriptors
//! instead: a ringer notifies them after the eventcount's fence, and a loop
//! publishes them, then fences, then looks, so one of the two sees the other in the
//! same way.

use std::cell::RefCell;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use vmc_os::sync::{EventCount, ForkSafeMutex};
use vmc_os::EventFd;

/// The receiving half's bell.
pub(crate) const RX: usize = 0;
/// The sending half's bell.
pub(crate) const TX: usize = 1;

/// A connection's two bells.
#[derive(Default)]
pub(crate) struct Bells {
    /// Each half's eventcount, with the eventfd its sleeper lent.
    halves: [EventCount<Arc<ThreadBell>>; 2],
    /// For event loops, which watch a descriptor of the connection's own.
    loops: OnceLock<[EventFd; 2]>,
}

impl Bells {
    /// The count to pass to [`Bells::sleep`]: take it before looking at the state.
    pub(crate) fn mark(&self, half: usize) -> u64 {
        self.halves[half].mark()
    }

    /// Tells whoever waits on `half` to look again. Call after changing the state.
    pub(crate) fn ring(&self, half: usize) {
        let sleeper = self.halves[half].ring();
        // After the eventcount's fence (see the module docs).
        if let Some(b) = self.loops.get() {
            notify(&b[half]);
        }
        if let Some(fd) = sleeper.as_deref().and_then(ThreadBell::get) {
            notify(fd);
        }
    }

    /// Registers the calling thread's eventfd as `half`'s sleeper. `Rung` if the bell
    /// rang since `mark` (look again instead of sleeping); `NoBell` if this thread
    /// has no eventfd (out of descriptors): then sleep only briefly.
    pub(crate) fn sleep(&self, half: usize, mark: u64) -> Nap<'_> {
        let Some(bell) = thread_bell() else {
            return Nap::NoBell;
        };
        let quiet = self.halves[half].sleep(mark, bell.clone());
        let sleep = Sleep {
            bells: self,
            half,
            bell,
            fired: false,
        };
        if !quiet {
            return Nap::Rung;
        }
        Nap::Sleep(sleep)
    }

    /// The connection's own bell descriptors, for event loops (made at the first
    /// call). A caller looks at the state after this (see the module's protocol).
    pub(crate) fn loop_fds(&self) -> io::Result<&[EventFd; 2]> {
        if let Some(b) = self.loops.get() {
            return Ok(b);
        }
        let made = [EventFd::new()?, EventFd::new()?];
        let b = self.loops.get_or_init(|| made);
        fence(Ordering::SeqCst);
        Ok(b)
    }
}

fn notify(b: &EventFd) {
    if let Err(e) = b.notify() {
        tracing::debug!("vmc connection: bell: {e}");
    }
}

/// What [`Bells::sleep`] came to.
pub(crate) enum Nap<'a> {
    /// Registered: poll [`Sleep::fd`] along with the rest.
    Sleep(Sleep<'a>),
    /// The bell rang since the mark: look again.
    Rung,
    /// No eventfd for this thread: sleep in short slices.
    NoBell,
}

/// A registered sleeper; unregisters when dropped.
pub(crate) struct Sleep<'a> {
    bells: &'a Bells,
    half: usize,
    bell: Arc<ThreadBell>,
    /// The poll said the eventfd is readable: drain it when done.
    pub(crate) fired: bool,
}

impl Sleep<'_> {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.bell.fd.fd()
    }
}

impl Drop for Sleep<'_> {
    fn drop(&mut self) {
        self.bells.halves[self.half].unregister();
        // A notification that came after the poll returned is left for this
        // thread's next sleep, which then looks once more for nothing: harmless.
        if self.fired {
            if let Some(fd) = self.bell.get() {
                let _ = fd.drain();
            }
        }
    }
}

/// A thread's eventfd for sleeping on bells. It outlives connections, so a program
/// that closes descriptors it does not own (`close_range`, a loop of `close`) may
/// close it and open a file under its number: then it is marked lost
/// ([`forget_fds`]) and never written, read or closed again.
pub(crate) struct ThreadBell {
    fd: std::mem::ManuallyDrop<EventFd>,
    lost: AtomicBool,
}

/// Every thread's bell, by descriptor number, for [`forget_fds`]. A forked child
/// starts with none: it makes bells of its own (see [`thread_bell`]).
static THREAD_BELLS: ForkSafeMutex<Vec<(i32, std::sync::Weak<ThreadBell>)>> =
    ForkSafeMutex::new(|_| Vec::new());

impl ThreadBell {
    fn new() -> io::Result<Arc<ThreadBell>> {
        use std::os::fd::AsRawFd;
        let b = Arc::new(ThreadBell {
            fd: std::mem::ManuallyDrop::new(EventFd::new()?),
            lost: AtomicBool::new(false),
        });
        let raw = b.fd.fd().as_raw_fd();
        THREAD_BELLS.lock().push((raw, Arc::downgrade(&b)));
        Ok(b)
    }

    /// The eventfd, unless the program closed its number.
    fn get(&self) -> Option<&EventFd> {
        (!self.lost.load(Ordering::Acquire)).then_some(&*self.fd)
    }
}

impl Drop for ThreadBell {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        let raw = self.fd.fd().as_raw_fd();
        THREAD_BELLS
            .lock()
            .retain(|(fd, w)| !(*fd == raw && w.strong_count() == 0));
        if !self.lost.load(Ordering::Acquire) {
            // SAFETY: dropped once, here, and never used again.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.fd) };
        }
    }
}

/// The program closed descriptors `first..=last`: threads' bells among them are
/// lost (each thread makes a new one at its next sleep). Returns how many.
pub(crate) fn forget_fds(first: i32, last: i32) -> usize {
    let mut lost = Vec::new();
    THREAD_BELLS.lock().retain(|(fd, w)| {
        if !(first..=last).contains(fd) {
            return true;
        }
        if let Some(b) = w.upgrade() {
            b.lost.store(true, Ordering::Release);
            lost.push(b);
        }
        false
    });
    // Dropped after the lock: a bell whose thread ended meanwhile is dropped here,
    // and its drop takes the lock (it closes nothing: it is lost).
    lost.len()
}

thread_local! {
    /// This thread's bell, with the fork generation that made it (a forked child
    /// must not share its parent's: a drain there would take a notification meant
    /// here).
    static THREAD_BELL: RefCell<Option<(u64, Arc<ThreadBell>)>> = const { RefCell::new(None) };
}

fn thread_bell() -> Option<Arc<ThreadBell>> {
    let generation = vmc_os::proc::fork_generation();
    THREAD_BELL
        .try_with(|cell| {
            let mut cell = cell.borrow_mut();
            match &*cell {
                Some((g, b)) if *g == generation && b.get().is_some() => Some(b.clone()),
                _ => match ThreadBell::new() {
                    Ok(b) => {
                        // The parent's, inherited by a fork: forgotten, not closed
                        // (its number may be one of the child's files by now). A
                        // lost one closes nothing when dropped.
                        if let Some((g, old)) = cell.replace((generation, b.clone())) {
                            if g != generation {
                                std::mem::forget(old);
                            }
                        }
                        Some(b)
                    }
                    Err(e) => {
                        tracing::debug!("vmc connection: no bell for this thread: {e}");
                        None
                    }
                },
            }
        })
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::time::Duration;

    fn readable(fd: BorrowedFd<'_>, ms: i64) -> bool {
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        let t = Timespec {
            tv_sec: 0,
            tv_nsec: ms * 1_000_000,
        };
        poll(&mut fds, Some(&t)).unwrap() == 1
    }

    /// The ring then comes while the sleeper waits, where a fixed sleep would
    /// only hope so.
    fn asleep(tid: i32) {
        vmc_testkit::wait_asleep(tid, Duration::from_secs(5));
    }

    #[test]
    fn a_ring_after_the_mark_says_look_again() {
        let b = Bells::default();
        let mark = b.mark(RX);
        b.ring(RX);
        assert!(matches!(b.sleep(RX, mark), Nap::Rung));
        // The other half's bell is another bell.
        assert!(matches!(b.sleep(TX, b.mark(TX)), Nap::Sleep(_)));
    }

    #[test]
    fn a_registered_sleeper_is_woken() {
        let b = Arc::new(Bells::default());
        let Nap::Sleep(mut s) = b.sleep(TX, b.mark(TX)) else {
            panic!("nothing rang");
        };
        assert!(!readable(s.fd(), 0));
        let first = std::os::fd::AsRawFd::as_raw_fd(&s.fd());
        let sleeper = vmc_testkit::tid();
        let ringer = {
            let b = b.clone();
            std::thread::spawn(move || {
                asleep(sleeper);
                b.ring(TX);
            })
        };
        assert!(readable(s.fd(), 900), "the ring did not wake the sleeper");
        s.fired = true;
        drop(s);
        ringer.join().unwrap();
        // Drained: the thread's next sleep starts quiet.
        let Nap::Sleep(s) = b.sleep(TX, b.mark(TX)) else {
            panic!("nothing rang since");
        };
        assert!(!readable(s.fd(), 0));
        drop(s);

        // The program closed the bell's number (and may use it for a file): the
        // bell is lost, never touched again; the thread gets a new one.
        assert_eq!(forget_fds(first, first), 1);
        let Nap::Sleep(s) = b.sleep(TX, b.mark(TX)) else {
            panic!("nothing rang since");
        };
        assert_ne!(std::os::fd::AsRawFd::as_raw_fd(&s.fd()), first);
        drop(s);
        // The lost one is not closed: its number still works (here it is still
        // the eventfd, as nobody closed it for real).
        // SAFETY: `first` is open (leaked by the lost bell) for the whole test.
        let still = unsafe { BorrowedFd::borrow_raw(first) };
        assert!(rustix::io::fcntl_getfd(still).is_ok());
    }

    #[test]
    fn event_loops_get_descriptors_of_the_connection() {
        let b = Bells::default();
        b.ring(RX); // no loop bells yet: nothing to notify, nothing made
        assert!(b.loops.get().is_none());
        let fds = b.loop_fds().unwrap();
        b.ring(RX);
        assert!(readable(fds[RX].fd(), 0));
        assert!(!readable(fds[TX].fd(), 0));
    }
}
