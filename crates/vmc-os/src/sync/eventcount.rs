//! An eventcount: how a thread that is about to sleep learns that the state it
//! looked at changed meanwhile, or else leaves word where a changer will find it.
//!
//! At most one thread sleeps on an eventcount at a time (the callers hold a lock
//! for that), and it brings its own wake-up (`W`, an eventfd in vmc-conn's bells):
//!
//! ```text
//!   sleeper                              ringer
//!   mark = rung                          change the state
//!   look at the state: nothing           rung += 1        ┐ ring
//!   register W; sleeping = true  ┐       fence(SeqCst)    │
//!   fence(SeqCst)                │ sleep if sleeping: notify W ┘
//!   rung != mark? look again     ┘
//!   wait on W
//! ```
//!
//! The two sequentially consistent fences order (register, read `rung`) and
//! (bump `rung`, read `sleeping`) in one total order, so at least one side sees the
//! other: the sleeper sees the new count and looks again, or the ringer sees the
//! sleeper and notifies its `W`. A notification that arrives after the sleeper
//! gave up waiting is left in `W` for its next sleep, which then looks once more for
//! nothing: a loop, never a lost wake-up.

use super::atomic::{fence, AtomicBool, AtomicU64, Mutex, MutexGuard, Ordering};

/// One eventcount with room for one registered sleeper's wake-up `W`.
pub struct EventCount<W> {
    /// Times the state changed.
    rung: AtomicU64,
    /// A sleeper is registered (and its `W` is in `sleeper`).
    sleeping: AtomicBool,
    sleeper: Mutex<Option<W>>,
}

impl<W> Default for EventCount<W> {
    fn default() -> Self {
        EventCount {
            rung: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            sleeper: Mutex::new(None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<W: Clone> EventCount<W> {
    /// The count to pass to [`EventCount::sleep`]: take it before looking at the
    /// state.
    pub fn mark(&self) -> u64 {
        self.rung.load(Ordering::SeqCst)
    }

    /// Call after changing the state. Returns the registered sleeper's wake-up, if
    /// a thread sleeps (or is about to): notify it.
    pub fn ring(&self) -> Option<W> {
        self.rung.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            lock(&self.sleeper).clone()
        } else {
            None
        }
    }

    /// Registers `wake` as the sleeper's wake-up, having found nothing since
    /// `mark`. True: sleep on `wake` now. False: the state changed since `mark`,
    /// look again. Either way, call [`EventCount::unregister`] when done.
    pub fn sleep(&self, mark: u64, wake: W) -> bool {
        *lock(&self.sleeper) = Some(wake);
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.rung.load(Ordering::SeqCst) == mark
    }

    /// The sleeper is done (woken, timed out, or it looked again).
    pub fn unregister(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        *lock(&self.sleeper) = None;
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_ring_after_the_mark_says_look_again() {
        let ec = EventCount::<u8>::default();
        let mark = ec.mark();
        assert_eq!(ec.ring(), None, "nobody registered");
        assert!(!ec.sleep(mark, 1));
        ec.unregister();
        assert!(ec.sleep(ec.mark(), 2));
        assert_eq!(ec.ring(), Some(2));
        ec.unregister();
        assert_eq!(ec.ring(), None);
    }
}
