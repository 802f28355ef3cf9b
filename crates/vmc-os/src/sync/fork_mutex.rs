//! [`ForkSafeMutex`]: a mutex whose lock and state a forked child starts afresh.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::proc::process_generation;

/// A mutex whose lock and state a forked child starts afresh.
///
/// `fork` copies a process's memory with only the calling thread in it. A lock
/// another thread held at that moment stays locked in the child for ever (nobody
/// is left to unlock it), and the data it guarded may be half updated. A program
/// whose thread forks while another one connects, listens or looks up the
/// registry would hand its child such a lock, and the child's first connection
/// would hang on it. Process-wide state that a child goes on using (the
/// registry's caches, the spare channels, the threads' bells) is therefore kept
/// in a [`ForkSafeMutex`]: the first [`ForkSafeMutex::lock`] in a forked child
/// replaces the inherited lock with a fresh one, and its state with what `init`
/// makes. `init` is shown the inherited state only if no thread held the lock at
/// the fork (so it is whole); it may take from it what the child can go on with
/// (an open directory, say), or start afresh.
///
/// The inherited lock and state are never touched after that, never dropped:
/// they are leaked, one per fork that used them. Dropping them could close
/// descriptors the child has closed and reused the numbers of, and a state whose
/// lock was held may be half updated. So only state that the child can do
/// without is kept here: caches, which it fills again, and per-process records
/// it must not share with its parent anyway.
///
/// Within one process it is a plain [`std::sync::Mutex`] behind one atomic load
/// and a comparison with [`crate::proc::process_generation`]. A poisoned lock is
/// taken as it is (these guard caches, whose invariants hold after any panic).
pub struct ForkSafeMutex<T> {
    /// The lock of the process that last used it; null until the first use.
    current: AtomicPtr<Generation<T>>,
    init: fn(Option<&mut T>) -> T,
    /// Owns `T`s (through the boxes behind `current`): `Send` and `Sync` exactly
    /// when `Mutex<T>` is.
    _owns: PhantomData<Mutex<T>>,
}

/// One process's lock and state.
struct Generation<T> {
    /// [`process_generation`] of the process that made it.
    process: u64,
    lock: Mutex<T>,
}

impl<T> ForkSafeMutex<T> {
    /// A lock whose state `init` makes at the first lock of each process: from
    /// nothing (`None`), or in a forked child from the state inherited, when no
    /// thread held the lock at the fork.
    pub const fn new(init: fn(Option<&mut T>) -> T) -> Self {
        ForkSafeMutex {
            current: AtomicPtr::new(std::ptr::null_mut()),
            init,
            _owns: PhantomData,
        }
    }

    /// Locks this process's state, making it first if this is the process's
    /// first lock (the first since a fork, in a child).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        let now = process_generation();
        let mut seen = self.current.load(Ordering::Acquire);
        loop {
            // SAFETY: a non-null `current` points to a `Generation` made by
            // `Box::into_raw` below and published with Release (the Acquire loads
            // see it whole). It is freed only by `Drop`, which has `&mut self`, so
            // no guard borrowed from `&self` outlives it; generations it replaced
            // are never freed.
            if let Some(g) = unsafe { seen.as_ref() } {
                if g.process == now {
                    return g.lock.lock().unwrap_or_else(PoisonError::into_inner);
                }
            }
            // First use in this process: a fresh lock. The inherited one (if
            // any) is leaked, as the type's documentation says why; its state is
            // shown to `init` if nobody held it at the fork.
            // SAFETY: as above.
            let inherited = unsafe { seen.as_ref() }.and_then(|g| match g.lock.try_lock() {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            });
            let state = match inherited {
                Some(mut guard) => {
                    let state = (self.init)(Some(&mut guard));
                    // The old lock stays locked: nobody may use it again.
                    std::mem::forget(guard);
                    state
                }
                None => (self.init)(None),
            };
            let fresh = Box::into_raw(Box::new(Generation {
                process: now,
                lock: Mutex::new(state),
            }));
            match self
                .current
                .compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => seen = fresh,
                Err(other) => {
                    // Another thread of this process installed one first.
                    // SAFETY: `fresh` came from `Box::into_raw` just above and was
                    // never published.
                    drop(unsafe { Box::from_raw(fresh) });
                    seen = other;
                }
            }
        }
    }
}

impl<T> Drop for ForkSafeMutex<T> {
    fn drop(&mut self) {
        let p = *self.current.get_mut();
        // SAFETY: a non-null `p` came from `Box::into_raw` in `lock` and, being
        // current, was never freed; `&mut self` means no guard borrows it.
        if let Some(g) = unsafe { p.as_ref() } {
            // One inherited through a fork is leaked, like those `lock` replaces.
            if g.process == process_generation() {
                // SAFETY: as above; nothing else frees it.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

impl<T> std::fmt::Debug for ForkSafeMutex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkSafeMutex").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static COUNTER: ForkSafeMutex<Vec<u32>> = ForkSafeMutex::new(|_| Vec::new());

    #[test]
    fn threads_of_one_process_share_one_state() {
        let m = ForkSafeMutex::new(|_| 0u64);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        *m.lock() += 1;
                    }
                });
            }
        });
        assert_eq!(*m.lock(), 4000);
        COUNTER.lock().push(1);
        assert!(!COUNTER.lock().is_empty());
    }

    /// Forks while another thread holds `m` (if `hold`) and returns what the
    /// child's first lock saw (its exit status: 0 an empty string, 1 the
    /// parent's, 2 anything else; a lock that hangs kills it with SIGALRM).
    fn child_sees(m: &'static ForkSafeMutex<String>, hold: bool) -> i32 {
        let _g = crate::test_support::fork_exclusive();
        m.lock().push_str("parent");
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let mut g = if hold { Some(m.lock()) } else { None };
            if let Some(g) = &mut g {
                g.push_str(" half-updated");
            }
            locked_tx.send(()).unwrap();
            done_rx.recv().unwrap();
        });
        locked_rx.recv().unwrap();
        // SAFETY: the child only arms an alarm, locks `m`, compares and calls
        // `_exit`; `m` is the one lock another thread may hold, which is what is
        // being tested.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            // SAFETY: alarm only arms a timer; `_exit` ends the child at once,
            // running nothing of the parent's.
            unsafe {
                libc::alarm(10);
                let code = match m.lock().as_str() {
                    "" => 0,
                    "parent" => 1,
                    _ => 2,
                };
                libc::_exit(code);
            }
        }
        done_tx.send(()).unwrap();
        holder.join().unwrap();
        let mut status = 0;
        // SAFETY: waits for the child made above; `status` is valid for writing.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(r, child);
        assert!(
            libc::WIFEXITED(status),
            "the child's lock hung: {status:#x}"
        );
        libc::WEXITSTATUS(status)
    }

    /// The case it exists for: a thread holds the lock (its state half updated)
    /// while another forks; the child's lock neither hangs nor sees that state.
    #[test]
    fn a_child_forked_while_another_thread_holds_the_lock_starts_afresh() {
        static HELD: ForkSafeMutex<String> = ForkSafeMutex::new(|inherited| {
            assert!(inherited.is_none(), "a held lock's state is never shown");
            String::new()
        });
        assert_eq!(child_sees(&HELD, true), 0);
        // The parent's state is as its threads left it.
        assert_eq!(*HELD.lock(), "parent half-updated");
    }

    /// A lock nobody held at the fork shows `init` its whole state.
    #[test]
    fn a_child_may_take_over_a_state_nobody_held_at_the_fork() {
        static FREE: ForkSafeMutex<String> =
            ForkSafeMutex::new(|inherited| inherited.map(std::mem::take).unwrap_or_default());
        assert_eq!(child_sees(&FREE, false), 1);
        assert_eq!(*FREE.lock(), "parent");
    }
}
