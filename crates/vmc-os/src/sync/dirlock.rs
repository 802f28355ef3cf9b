//! The lock of one direction of a connection: a mutex whose release is a plain
//! store.
//!
//! Every read and write of a connection takes its direction's lock, so the lock is
//! on the data path of every call. A `std` mutex releases with an atomic swap (to
//! learn whether someone sleeps), and on x86 a locked instruction waits until all
//! earlier stores are visible to other cores: after a ring write, that is a round
//! trip to the core of the reader, which holds the lines just written. The raw
//! channel pays nothing of the sort, and the difference was most of the API's
//! per-call cost. Here the release is a store with release ordering, which lets
//! the ring's stores drain in the background as they do without the lock.
//!
//! The price is paid only under contention, which is rare (two threads reading one
//! socket at once): a releaser reads the waiter count after its store, and may read
//! it early (a store followed by a load of another location may be reordered), so a
//! waiter's wake-up can be missed. Waiters therefore sleep with a timeout, growing
//! from 50 us to 5 ms, and never sleep while the lock is free (the futex compares).
//!
//! The loom model (`tests/loom.rs`) checks mutual exclusion (loom's cell reports
//! two guards at once) and that every thread gets the lock, with each timed sleep
//! free to end at any moment.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use super::atomic::{AtomicU32, Ordering};

const FREE: u32 = 0;
const HELD: u32 = 1;

/// Spins on a held lock before sleeping (one under loom, whose every spin is an
/// interleaving to explore).
const SPINS: u32 = if cfg!(loom) { 1 } else { 200 };

#[cfg(not(loom))]
type Cell<T> = std::cell::UnsafeCell<T>;
#[cfg(loom)]
type Cell<T> = loom::cell::UnsafeCell<T>;

/// A mutual-exclusion lock for one direction's state.
pub struct DirLock<T> {
    state: AtomicU32,
    /// Threads sleeping (or about to) on `state`.
    waiters: AtomicU32,
    value: Cell<T>,
}

// SAFETY: the value is only reached through a guard, and at most one guard exists at
// a time (the compare-exchange from FREE to HELD), so sharing the lock between
// threads hands the value from one thread to another, never to two at once: it
// must be Send, as for `std::sync::Mutex`.
unsafe impl<T: Send> Sync for DirLock<T> {}

impl<T> DirLock<T> {
    /// A free lock around `value`.
    pub fn new(value: T) -> DirLock<T> {
        DirLock {
            state: AtomicU32::new(FREE),
            waiters: AtomicU32::new(0),
            value: Cell::new(value),
        }
    }

    /// The lock if it is free now.
    #[inline]
    pub fn try_lock(&self) -> Option<DirGuard<'_, T>> {
        self.state
            .compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| DirGuard {
                lock: self,
                #[cfg(loom)]
                value: Some(self.value.get_mut()),
            })
    }

    /// True if a thread holds the lock right now (a look, which takes nothing:
    /// it may be free again by the time the caller acts on it).
    #[inline]
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Acquire) == HELD
    }

    /// The lock, waiting for it if another thread holds it.
    #[inline]
    pub fn lock(&self) -> DirGuard<'_, T> {
        match self.try_lock() {
            Some(g) => g,
            None => self.lock_contended(),
        }
    }

    #[cold]
    fn lock_contended(&self) -> DirGuard<'_, T> {
        let mut nap = Duration::from_micros(50);
        let mut spins = 0u32;
        loop {
            if self.state.load(Ordering::Relaxed) == FREE {
                if let Some(g) = self.try_lock() {
                    return g;
                }
            }
            if spins < SPINS {
                spins += 1;
                spin_loop();
                continue;
            }
            self.waiters.fetch_add(1, Ordering::SeqCst);
            // Sleeps only while the lock is still held (the kernel compares), and
            // not for long: a release may miss our count (see the module docs).
            timed_wait(&self.state, HELD, nap);
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            nap = (nap * 2).min(Duration::from_millis(5));
        }
    }
}

#[cfg(not(loom))]
fn spin_loop() {
    std::hint::spin_loop();
}

#[cfg(loom)]
fn spin_loop() {
    loom::thread::yield_now();
}

/// Sleeps on `word` while it holds `expected`, for at most `nap`.
#[cfg(not(loom))]
fn timed_wait(word: &AtomicU32, expected: u32, nap: Duration) {
    let _ = crate::futex_wait(word, expected, Some(nap));
}

/// In the model a timed sleep may end at any moment, which it may: the model
/// yields instead, so that loom runs the holder.
#[cfg(loom)]
fn timed_wait(word: &AtomicU32, expected: u32, _nap: Duration) {
    if word.load(Ordering::Relaxed) == expected {
        loom::thread::yield_now();
    }
}

#[cfg(not(loom))]
fn wake_one(word: &AtomicU32) {
    let _ = crate::futex_wake(word, 1);
}

/// Nothing to do in the model: its sleeps end by themselves.
#[cfg(loom)]
fn wake_one(_word: &AtomicU32) {}

/// Access to the locked value; releases the lock when dropped.
pub struct DirGuard<'a, T> {
    lock: &'a DirLock<T>,
    /// Loom's record of this access, which reports any other at the same time.
    #[cfg(loom)]
    value: Option<loom::cell::MutPtr<T>>,
}

impl<T> Deref for DirGuard<'_, T> {
    type Target = T;
    #[cfg(not(loom))]
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (see `Sync` above) and lives no longer
        // than the lock, so no other reference to the value exists meanwhile.
        unsafe { &*self.lock.value.get() }
    }
    #[cfg(loom)]
    fn deref(&self) -> &T {
        let value = self.value.as_ref().expect("the guard is live");
        // SAFETY: as above; loom checks it.
        unsafe { value.deref() }
    }
}

impl<T> DerefMut for DirGuard<'_, T> {
    #[cfg(not(loom))]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only access through
        // the guard.
        unsafe { &mut *self.lock.value.get() }
    }
    #[cfg(loom)]
    fn deref_mut(&mut self) -> &mut T {
        let value = self.value.as_ref().expect("the guard is live");
        // SAFETY: as above; loom checks it.
        unsafe { value.deref() }
    }
}

impl<T> Drop for DirGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // Loom's record of the access ends before the release (it is dropped
        // after this body otherwise, and would overlap the next holder's).
        #[cfg(loom)]
        drop(self.value.take());
        self.lock.state.store(FREE, Ordering::Release);
        if self.lock.waiters.load(Ordering::Relaxed) > 0 {
            wake_one(&self.lock.state);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn one_holder_at_a_time() {
        let l = DirLock::new(5);
        let g = l.lock();
        assert!(l.try_lock().is_none());
        assert_eq!(*g, 5);
        drop(g);
        *l.try_lock().unwrap() += 1;
        assert_eq!(*l.lock(), 6);
    }

    #[test]
    fn threads_that_contend_lose_no_update() {
        const THREADS: usize = 4;
        const ROUNDS: u64 = 20_000;
        let l = Arc::new(DirLock::new(0u64));
        let ts: Vec<_> = (0..THREADS)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for r in 0..ROUNDS {
                        let mut g = l.lock();
                        let v = *g;
                        // Now and then hold it long enough for others to sleep.
                        if (r + i as u64) % 4096 == 0 {
                            std::thread::sleep(Duration::from_micros(300));
                        }
                        *g = v + 1;
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), THREADS as u64 * ROUNDS);
    }
}
