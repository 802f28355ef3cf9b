//! Wake-ups and hang-up detection.
//!
//! Three ways to wait for the peer, from cheapest to most general:
//!
//! * [`futex_wait`] / [`futex_wake`]: both processes run on the same kernel
//!   and share the memory holding the futex word. Shared (not
//!   `FUTEX_PRIVATE`) futexes key on the physical page, so they work across
//!   processes.
//! * [`EventFd`]: also same-kernel, but a descriptor, so a channel can sit in
//!   an `epoll`/`poll` set next to ordinary sockets; it is handed to the peer
//!   with [`crate::send_with_fds`].
//! * [`Backoff`]: peers in different VMs share memory (ivshmem) but no
//!   kernel, so neither of the above exists; the waiter polls the shared
//!   memory with an increasing back-off.
//!
//! [`hung_up`] reports whether the peer closed (or died holding) its end of a
//! stream socket, the liveness signal for memfd segments.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::thread::futex;
use rustix::time::Timespec;

/// Converts a timeout to a `Timespec`; `None` (wait forever) if it is too
/// large to represent.
fn to_timespec(d: Duration) -> Option<Timespec> {
    Timespec::try_from(d).ok()
}

/// Sleeps while `*word == expected`, until woken by [`futex_wake`] or until
/// `timeout` (relative; `None` waits forever) elapses.
///
/// The futex is shared (no `FUTEX_PRIVATE_FLAG`), so the word may live in
/// memory shared with another process.
///
/// Returns `Ok(())` when woken, when the value already differed from
/// `expected` (`EAGAIN`), on a signal (`EINTR`), on timeout (`ETIMEDOUT`)
/// and on spurious wake-ups alike: callers must always re-check their
/// condition (and the clock) after this returns.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<()> {
    let ts = timeout.and_then(to_timespec);
    match futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()) {
        Err(Errno::INTR) if crate::interrupt::pending() => Err(crate::interrupt::error()),
        Ok(()) | Err(Errno::AGAIN) | Err(Errno::INTR) | Err(Errno::TIMEDOUT) => Ok(()),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("futex wait: {e}"),
        )),
    }
}

/// Wakes up to `n` waiters sleeping in [`futex_wait`] on `word` (in any
/// process sharing it); `u32::MAX` wakes them all. Returns how many were woken.
pub fn futex_wake(word: &AtomicU32, n: u32) -> io::Result<usize> {
    // The kernel takes the count as a signed int and stops after the first
    // waiter when it is negative: `u32::MAX` would wake one, and leave the
    // others asleep for good.
    let n = n.min(i32::MAX as u32);
    futex::wake(word, futex::Flags::empty(), n)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("futex wake: {e}")))
}

/// What [`EventFd::wait`] found ready. Both false means the timeout expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// The eventfd has been notified (its counter is non-zero).
    pub event: bool,
    /// The other descriptor is readable, hung up or in error.
    pub other: bool,
}

impl Readiness {
    /// Whether anything is ready (false: timed out).
    pub fn any(&self) -> bool {
        self.event || self.other
    }
}

/// A non-blocking, close-on-exec eventfd used as a doorbell between
/// processes on the same kernel.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates a new eventfd (`EFD_CLOEXEC | EFD_NONBLOCK`) with counter 0.
    pub fn new() -> io::Result<EventFd> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("eventfd: {e}")))?;
        let fd = crate::fdspace::lift(fd)?;
        Ok(EventFd { fd })
    }

    /// Wraps an eventfd received from the peer. It should be non-blocking
    /// (as made by [`EventFd::new`]); otherwise [`EventFd::drain`] would
    /// block.
    pub fn from_fd(fd: OwnedFd) -> EventFd {
        EventFd { fd }
    }

    /// Rings the doorbell: adds 1 to the counter. A full counter (`EAGAIN`)
    /// is fine: the eventfd is already signalled.
    pub fn notify(&self) -> io::Result<()> {
        loop {
            match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
                Ok(_) | Err(Errno::AGAIN) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("eventfd notify: {e}"),
                    ))
                }
            }
        }
    }

    /// Resets the counter to 0 (reads until `EAGAIN`), so the next
    /// [`EventFd::wait`] sleeps until a new notification.
    pub fn drain(&self) -> io::Result<()> {
        let mut buf = [0u8; 8];
        loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(_) | Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(()),
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("eventfd drain: {e}"),
                    ))
                }
            }
        }
    }

    /// The eventfd's descriptor (to send to the peer or add to an epoll set).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Waits until the eventfd is notified, or `also` (typically the liveness
    /// socket) hangs up or fails (data arriving on it does not count: a stray byte
    /// must not turn every sleep into a spin), or `timeout` elapses (`None`:
    /// forever; zero: just check). Does not drain: call
    /// [`EventFd::drain`] before re-checking the shared state.
    ///
    /// Signals (`EINTR`) are absorbed, and the wait resumes with the time left, unless
    /// [`crate::interrupt::pending`] says the signal ends it (`Interrupted`).
    pub fn wait(
        &self,
        also: Option<BorrowedFd<'_>>,
        timeout: Option<Duration>,
    ) -> io::Result<Readiness> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let mut fds = [
                PollFd::from_borrowed_fd(self.fd.as_fd(), PollFlags::IN),
                // Placeholder when there is no second descriptor: only the
                // first entry is passed to poll then.
                PollFd::from_borrowed_fd(also.unwrap_or(self.fd.as_fd()), PollFlags::RDHUP),
            ];
            let n = if also.is_some() { 2 } else { 1 };
            let ts = match (timeout, deadline) {
                (Some(_), Some(d)) => to_timespec(d.saturating_duration_since(Instant::now())),
                _ => None,
            };
            match rustix::event::poll(&mut fds[..n], ts.as_ref()) {
                Ok(_) => {
                    let other_bits =
                        PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR | PollFlags::NVAL;
                    return Ok(Readiness {
                        event: fds[0].revents().intersects(PollFlags::IN),
                        other: n == 2 && fds[1].revents().intersects(other_bits),
                    });
                }
                Err(Errno::INTR) => {
                    if crate::interrupt::pending() {
                        return Err(crate::interrupt::error());
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(Readiness::default());
                    }
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("poll on eventfd: {e}"),
                    ))
                }
            }
        }
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether the peer of the stream socket `fd` has gone: a zero-timeout poll
/// for `POLLHUP | POLLRDHUP | POLLERR`.
///
/// When a process dies, even by `SIGKILL`, the kernel closes its sockets, so
/// this turns true. It also turns true if the peer merely shut down its
/// writing side; for the liveness socket of a channel that counts as gone.
pub fn hung_up(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::RDHUP)];
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(_) => {
                let r = fds[0].revents();
                if r.contains(PollFlags::NVAL) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "hung_up: not an open descriptor",
                    ));
                }
                return Ok(r.intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR));
            }
            Err(Errno::INTR) => continue,
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("poll for hang-up: {e}"),
                ))
            }
        }
    }
}

/// Number of spinning steps (each spins `2^step` times) before yielding.
const SPIN_STEPS: u32 = 6;
/// Number of steps (after spinning) that yield the CPU before sleeping.
const YIELD_STEPS: u32 = 10;

/// A polling back-off for waiting on shared memory when no wake-up mechanism
/// is shared with the peer (different VMs over ivshmem).
///
/// Each [`Backoff::snooze`] waits a little longer: first a few rounds of
/// busy-spinning (`spin_loop` hints, doubling: 1, 2, …, 64), then a few
/// `yield_now` calls, then sleeps doubling from 1 µs up to `max_sleep`.
///
/// The trade-off: spinning reacts within nanoseconds but burns a CPU;
/// sleeping costs almost no CPU but adds up to `max_sleep` of latency (plus
/// timer slack) to the first message after an idle period. A small
/// `max_sleep` (tens of µs) suits latency-sensitive traffic; a larger one
/// (milliseconds) suits many mostly idle channels. Call [`Backoff::reset`]
/// after making progress.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: u32,
    sleep: Duration,
    max_sleep: Duration,
}

impl Backoff {
    /// A back-off whose sleeps never exceed `max_sleep`.
    pub fn new(max_sleep: Duration) -> Backoff {
        Backoff {
            step: 0,
            sleep: Self::first_sleep(max_sleep),
            max_sleep,
        }
    }

    fn first_sleep(max_sleep: Duration) -> Duration {
        Duration::from_micros(1).min(max_sleep)
    }

    /// Waits a bit, longer than last time (up to the cap).
    pub fn snooze(&mut self) {
        if self.step < SPIN_STEPS {
            for _ in 0..(1u32 << self.step) {
                core::hint::spin_loop();
            }
            self.step += 1;
        } else if self.step < SPIN_STEPS + YIELD_STEPS {
            std::thread::yield_now();
            self.step += 1;
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(self.max_sleep);
        }
    }

    /// Whether the back-off has reached the sleeping phase.
    pub fn is_sleeping(&self) -> bool {
        self.step >= SPIN_STEPS + YIELD_STEPS
    }

    /// Starts over from spinning (call after progress was made).
    pub fn reset(&mut self) {
        self.step = 0;
        self.sleep = Self::first_sleep(self.max_sleep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use vmc_testkit::tid;

    /// Waits until thread `tid` blocks, so that what a test does next comes
    /// while it waits.
    fn asleep(tid: i32) {
        vmc_testkit::wait_asleep(tid, Duration::from_secs(5));
    }

    #[test]
    fn futex_wakes_across_threads() {
        let word = Arc::new(AtomicU32::new(0));
        let w2 = Arc::clone(&word);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tid_tx.send(tid()).unwrap();
            let start = Instant::now();
            while w2.load(Ordering::Acquire) == 0 {
                futex_wait(&w2, 0, Some(Duration::from_secs(5))).unwrap();
                assert!(start.elapsed() < Duration::from_secs(5));
            }
        });
        asleep(tid_rx.recv().unwrap());
        word.store(1, Ordering::Release);
        futex_wake(&word, 1).unwrap();
        t.join().unwrap();
    }

    /// "All" means all: every waiter wakes, not the first one only.
    #[test]
    fn futex_wake_all_wakes_every_waiter() {
        let word = Arc::new(AtomicU32::new(0));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let (w, tid_tx) = (Arc::clone(&word), tid_tx.clone());
                std::thread::spawn(move || {
                    tid_tx.send(tid()).unwrap();
                    // One wait, with no look at the word after: only a wake
                    // (or the timeout, which fails the test) ends it.
                    let start = Instant::now();
                    futex_wait(&w, 0, Some(Duration::from_secs(5))).unwrap();
                    start.elapsed() < Duration::from_secs(4)
                })
            })
            .collect();
        for _ in 0..3 {
            asleep(tid_rx.recv().unwrap());
        }
        assert_eq!(futex_wake(&word, u32::MAX).unwrap(), 3);
        for w in waiters {
            assert!(w.join().unwrap(), "a waiter was not woken");
        }
    }

    #[test]
    fn futex_wait_returns_on_mismatch_and_timeout() {
        let word = AtomicU32::new(3);
        // Value differs: returns at once.
        futex_wait(&word, 4, None).unwrap();
        // Value matches: returns after the timeout.
        let start = Instant::now();
        futex_wait(&word, 3, Some(Duration::from_millis(10))).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(5));
        assert_eq!(futex_wake(&word, 1).unwrap(), 0);
    }

    #[test]
    fn futex_in_shared_memory_segment() {
        // The word lives in a memfd mapped twice (as two processes would).
        let a = crate::Segment::create_memfd("futex", 4096).unwrap();
        let b = crate::Segment::from_memfd(a.fd().try_clone_to_owned().unwrap()).unwrap();
        // SAFETY: both mappings are page-aligned, 4096 bytes, alive for the
        // whole test, and only accessed atomically through these references.
        let (wa, wb) = unsafe {
            (
                &*a.as_ptr().as_ptr().cast::<AtomicU32>(),
                &*b.as_ptr().as_ptr().cast::<AtomicU32>(),
            )
        };
        std::thread::scope(|s| {
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            s.spawn(move || {
                tid_tx.send(tid()).unwrap();
                while wb.load(Ordering::Acquire) == 0 {
                    futex_wait(wb, 0, Some(Duration::from_secs(5))).unwrap();
                }
            });
            asleep(tid_rx.recv().unwrap());
            wa.store(1, Ordering::Release);
            futex_wake(wa, 1).unwrap();
        });
    }

    #[test]
    fn eventfd_notify_wait_drain() {
        let ev = EventFd::new().unwrap();
        assert!(!ev.wait(None, Some(Duration::ZERO)).unwrap().any());
        ev.notify().unwrap();
        ev.notify().unwrap();
        assert_eq!(
            ev.wait(None, Some(Duration::from_secs(1))).unwrap(),
            Readiness {
                event: true,
                other: false
            }
        );
        ev.drain().unwrap();
        assert!(!ev.wait(None, Some(Duration::from_millis(1))).unwrap().any());

        // Notified from another thread while waiting.
        let ev = Arc::new(ev);
        let ev2 = Arc::clone(&ev);
        let waiter = tid();
        let t = std::thread::spawn(move || {
            asleep(waiter);
            ev2.notify().unwrap();
        });
        assert!(ev.wait(None, Some(Duration::from_secs(5))).unwrap().event);
        t.join().unwrap();
    }

    #[test]
    fn eventfd_wait_reports_other_fd() {
        let _g = crate::test_support::fd_sensitive();
        let ev = EventFd::new().unwrap();
        let (a, b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert!(!ev
            .wait(Some(a.as_fd()), Some(Duration::ZERO))
            .unwrap()
            .any());
        drop(b);
        assert_eq!(
            ev.wait(Some(a.as_fd()), Some(Duration::from_secs(1)))
                .unwrap(),
            Readiness {
                event: false,
                other: true
            }
        );
    }

    #[test]
    fn eventfd_counter_overflow_is_fine() {
        let ev = EventFd::new().unwrap();
        // Fill the counter to its maximum (2^64 - 2).
        rustix::io::write(ev.fd(), &(u64::MAX - 1).to_ne_bytes()).unwrap();
        ev.notify().unwrap();
        ev.drain().unwrap();
        assert!(!ev.wait(None, Some(Duration::ZERO)).unwrap().event);
    }

    #[test]
    fn hung_up_detects_closed_peer() {
        let _g = crate::test_support::fd_sensitive();
        let (a, b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert!(!hung_up(a.as_fd()).unwrap());
        // Pending data is not a hang-up.
        rustix::io::write(&b, b"x").unwrap();
        assert!(!hung_up(a.as_fd()).unwrap());
        drop(b);
        assert!(hung_up(a.as_fd()).unwrap());
    }

    #[test]
    fn backoff_escalates_and_resets() {
        let mut b = Backoff::new(Duration::from_micros(50));
        let start = Instant::now();
        for _ in 0..(SPIN_STEPS + YIELD_STEPS) {
            assert!(!b.is_sleeping());
            b.snooze();
        }
        assert!(b.is_sleeping());
        for _ in 0..20 {
            b.snooze();
        }
        assert_eq!(b.sleep, Duration::from_micros(50));
        assert!(start.elapsed() < Duration::from_secs(1));
        b.reset();
        assert!(!b.is_sleeping());
        assert_eq!(b.sleep, Duration::from_micros(1));
    }
}
