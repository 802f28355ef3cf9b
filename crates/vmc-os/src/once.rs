//! Process-wide state opened once, that a `fork` must not catch half-opened.
//!
//! `fork` copies only the calling thread. If another thread is inside a
//! [`OnceLock`]'s initialisation at that moment, the child inherits a cell
//! marked "being initialised" that no thread of the child will ever finish: the
//! child's first use of it blocks forever. A program that forks while other
//! threads start using the network (a test harness, a server forking workers
//! while its accept thread runs) hits this.
//!
//! A [`ForkSafeOnce`] is a `OnceLock` that also records that an initialisation
//! has started. A `pthread_atfork` prepare handler asks [`ForkSafeOnce::started`]
//! and, if so, calls the same getter, which waits for the other thread to finish
//! (as `OnceLock` does); a cell never touched stays untouched, so a program that
//! forks without using vmc pays nothing and opens nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// A [`OnceLock`] that knows whether its initialisation has begun (see the
/// module documentation for why).
#[derive(Debug)]
pub struct ForkSafeOnce<T> {
    started: AtomicBool,
    cell: OnceLock<T>,
}

impl<T> ForkSafeOnce<T> {
    /// An empty cell (for a `static`).
    pub const fn new() -> Self {
        ForkSafeOnce {
            started: AtomicBool::new(false),
            cell: OnceLock::new(),
        }
    }

    /// The value, initialised by `f` on first use; blocks while another thread
    /// initialises it.
    pub fn get_or_init(&self, f: impl FnOnce() -> T) -> &T {
        if let Some(v) = self.cell.get() {
            return v;
        }
        // Before the initialisation can begin: a prepare handler that sees
        // `false` knows no thread is inside it.
        self.started.store(true, Ordering::SeqCst);
        self.cell.get_or_init(f)
    }

    /// The value, if it has been initialised.
    pub fn get(&self) -> Option<&T> {
        self.cell.get()
    }

    /// Whether some thread has begun initialising the value (it may still be at
    /// it). Before a fork: if so, the getter must be called, to wait for the end.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }
}

impl<T> Default for ForkSafeOnce<T> {
    fn default() -> Self {
        Self::new()
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
}
