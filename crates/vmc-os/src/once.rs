//! Process-wide state opened once, that a `fork` must not catch half-opened.
//!
//! `fork` copies only the calling thread. If another thread is inside a
//! [`std::sync::OnceLock`]'s initialisation at that moment, the child inherits a
//! cell marked "being initialised" that no thread of the child will ever finish:
//! the child's first use of it blocks forever. A program that forks while other
//! threads start using the network (a test harness, a server forking workers
//! while its accept thread runs) hits this.
//!
//! A [`ForkSafeOnce`] is a once-cell whose "being initialised" mark names the
//! process doing it. A thread that finds the mark of another process (its
//! parent, which forked while one of its threads was at it) knows that nobody
//! will finish, and initialises the cell itself. What the parent's thread had
//! done so far is left as it was (a descriptor it had opened stays open, unused,
//! in the child): never read, since the value is published only once whole.
//!
//! A `pthread_atfork` prepare handler may also ask [`ForkSafeOnce::started`] and,
//! if so, call the getter, which waits for the other thread to finish; that
//! spares the child the repeat, but a thread that starts initialising after the
//! handler looked is still handled by the take-over.
//!
//! In a `vfork` child, which shares its parent's memory, the take-over would
//! race the parent's thread: vmc stays out of `vfork` children
//! ([`crate::proc::in_vfork_child`]), and so must callers of this type. The
//! mark is a pid, so a child that has its parent's pid (pid 1 of a new pid
//! namespace, forked by pid 1 of another) would wait instead of taking over.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::proc::pid;
use crate::wake::{futex_wait, futex_wake};

/// [`ForkSafeOnce::state`] of a cell never initialised.
const EMPTY: u32 = 0;
/// [`ForkSafeOnce::state`] once the value is there. Not a pid: Linux's pids are
/// at most 2^22.
const DONE: u32 = u32::MAX;

/// A once-cell that a forked child can finish initialising if its parent's
/// thread was at it (see the module documentation).
pub struct ForkSafeOnce<T> {
    /// [`EMPTY`], [`DONE`], or the pid of the process whose thread is
    /// initialising the value. Waiters sleep on it (a futex).
    state: AtomicU32,
    /// Written only by the thread that moved `state` from `EMPTY` (or from
    /// another process's pid) to its own pid, before it stores `DONE`; read only
    /// after `DONE` was seen (Acquire).
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the cell hands out `&T` to any thread (so `T: Sync`) and moves the `T`
// a thread made into the cell that another thread drops (so `T: Send`); `state`
// orders every access to `value` (see the field's comment).
unsafe impl<T: Send + Sync> Sync for ForkSafeOnce<T> {}
// SAFETY: sending the cell sends its `T`.
unsafe impl<T: Send> Send for ForkSafeOnce<T> {}

impl<T> ForkSafeOnce<T> {
    /// An empty cell (for a `static`).
    pub const fn new() -> Self {
        ForkSafeOnce {
            state: AtomicU32::new(EMPTY),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// The value, initialised by `f` on first use; blocks while another thread
    /// of this process initialises it. If `f` panics, the cell stays empty and
    /// the next caller tries again.
    pub fn get_or_init(&self, f: impl FnOnce() -> T) -> &T {
        let mut f = Some(f);
        loop {
            let seen = self.state.load(Ordering::Acquire);
            if seen == DONE {
                // SAFETY: DONE was stored (Release) after the value was written,
                // and is never left: the value is whole and never written again.
                return unsafe { (*self.value.get()).assume_init_ref() };
            }
            // Whose initialisation it is: a cell left mid-way by the parent's
            // thread is taken over (the getpid is paid on this slow path only).
            // Another process's mark, in this process's memory, means the
            // process that forked this one was at it: nobody here will finish.
            let me = pid();
            if seen == EMPTY || seen != me {
                if self.claim(seen, me) {
                    return self.init_claimed(f.take().expect("claimed once"));
                }
                continue;
            }
            // A thread of this process is at it: sleep until it is done (or
            // gave up by panicking). Spurious returns only cost a new look.
            let _ = futex_wait(&self.state, seen, None);
        }
    }

    /// Moves `state` from `from` to `me`: this thread initialises the value.
    fn claim(&self, from: u32, me: u32) -> bool {
        self.state
            .compare_exchange(from, me, Ordering::Acquire, Ordering::Acquire)
            .is_ok()
    }

    /// Runs `f` and publishes its value; `state` holds this process's pid.
    fn init_claimed(&self, f: impl FnOnce() -> T) -> &T {
        /// Empties the cell again if `f` unwinds, and wakes the waiters, so
        /// that one of them tries.
        struct Reset<'a>(&'a AtomicU32);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                self.0.store(EMPTY, Ordering::Release);
                let _ = futex_wake(self.0, u32::MAX);
            }
        }
        let reset = Reset(&self.state);
        let v = f();
        std::mem::forget(reset);
        // SAFETY: this thread moved `state` to its pid, so no other thread of
        // this process writes `value` or reads it (that waits for DONE); a thread
        // of a forked child writes only its own copy of the memory.
        let v = unsafe { (*self.value.get()).write(v) };
        self.state.store(DONE, Ordering::Release);
        let _ = futex_wake(&self.state, u32::MAX);
        v
    }

    /// The value, if it has been initialised.
    pub fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) == DONE {
            // SAFETY: as in `get_or_init`.
            Some(unsafe { (*self.value.get()).assume_init_ref() })
        } else {
            None
        }
    }

    /// Whether some thread has begun initialising the value (it may still be at
    /// it). Before a fork: if so, calling the getter waits for the end.
    pub fn started(&self) -> bool {
        self.state.load(Ordering::Acquire) != EMPTY
    }
}

impl<T> Drop for ForkSafeOnce<T> {
    fn drop(&mut self) {
        if *self.state.get_mut() == DONE {
            // SAFETY: DONE means the value was written; `&mut self` means no
            // reference to it remains.
            unsafe { self.value.get_mut().assume_init_drop() };
        }
    }
}

impl<T> Default for ForkSafeOnce<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for ForkSafeOnce<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.get() {
            Some(v) => f.debug_tuple("ForkSafeOnce").field(v).finish(),
            None => f.write_str("ForkSafeOnce(<empty>)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use vmc_testkit::{spawn_with_tid, tid, wait_asleep};

    #[test]
    fn an_untouched_cell_says_so_and_stays_empty() {
        let c: ForkSafeOnce<u32> = ForkSafeOnce::new();
        assert!(!c.started());
        assert_eq!(c.get(), None);
        assert_eq!(*c.get_or_init(|| 7), 7);
        assert!(c.started());
        assert_eq!(*c.get_or_init(|| 8), 7);
    }

    /// What a prepare handler does: the cell is being initialised on another
    /// thread; `started` says so, and the getter returns only once that thread
    /// has finished, with its value.
    #[test]
    fn a_started_initialisation_is_waited_for() {
        static CELL: ForkSafeOnce<u32> = ForkSafeOnce::new();
        let (inside_tx, inside) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let (opener, _) = spawn_with_tid(move || {
            *CELL.get_or_init(|| {
                inside_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                41
            })
        });
        inside.recv().unwrap();
        assert!(CELL.started());
        assert_eq!(CELL.get(), None, "still being initialised");
        // Released only once this thread is blocked in the getter.
        let me = tid();
        let releaser = std::thread::spawn(move || {
            wait_asleep(me, Duration::from_secs(5));
            release.send(()).unwrap();
        });
        assert_eq!(*CELL.get_or_init(|| unreachable!("initialised twice")), 41);
        assert_eq!(opener.join().unwrap(), 41);
        releaser.join().unwrap();
    }

    /// A panicking initialiser leaves the cell empty: the next caller
    /// initialises it.
    #[test]
    fn a_panicking_initialisation_can_be_tried_again() {
        let c: ForkSafeOnce<String> = ForkSafeOnce::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.get_or_init(|| panic!("no value"));
        }));
        assert!(r.is_err());
        assert!(!c.started());
        assert_eq!(c.get_or_init(|| "second".into()), "second");
    }

    /// The fork hazard itself: a thread of this process is inside the
    /// initialisation when another thread forks. The child's getter must not
    /// wait for a thread it does not have: it initialises the cell itself.
    #[test]
    fn a_child_forked_mid_initialisation_takes_it_over() {
        static CELL: ForkSafeOnce<u32> = ForkSafeOnce::new();
        let _fork = crate::test_support::fork_exclusive();
        let (inside_tx, inside) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let opener = std::thread::spawn(move || {
            *CELL.get_or_init(|| {
                inside_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                1
            })
        });
        inside.recv().unwrap();
        // The child only calls the getter: atomics, getpid, a futex wake.
        assert!(
            crate::test_support::in_child(|| *CELL.get_or_init(|| 2) == 2),
            "the child did not initialise the cell itself (or hung in it)"
        );
        release.send(()).unwrap();
        assert_eq!(opener.join().unwrap(), 1, "the parent's value is its own");
        assert_eq!(CELL.get(), Some(&1));
    }
}
