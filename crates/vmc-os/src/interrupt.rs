//! Whether a signal should end a wait, as it would end the blocking system call the
//! wait stands in for.
//!
//! A read blocked on a ring spins and sleeps in vmc's own loops, where a signal
//! handler runs and returns without the kernel's say on what happens next. A
//! front end that tracks signal handlers (the preload library wraps the program's
//! handlers) registers a check here; vmc's waits consult it after a sleep was
//! interrupted and now and then while spinning, and end with
//! [`std::io::ErrorKind::Interrupted`] when it says so (a handler installed without
//! `SA_RESTART` ran on this thread). Without a registered check, waits absorb
//! signals, as before.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The check, as a function pointer's address (0: none). An atomic rather than a
/// `OnceLock`, so that a fork can never catch it half set.
static CHECK: AtomicUsize = AtomicUsize::new(0);

/// Registers the check (once per process; later calls are ignored).
pub fn set_check(check: fn() -> bool) {
    let _ = CHECK.compare_exchange(0, check as usize, Ordering::AcqRel, Ordering::Acquire);
}

/// True if the current wait should end with `Interrupted`. Cheap: one load when no
/// check is registered.
#[inline]
pub fn pending() -> bool {
    match CHECK.load(Ordering::Acquire) {
        0 => false,
        f => {
            // SAFETY: a non-zero value was stored by `set_check` from a `fn() -> bool`.
            let check = unsafe { std::mem::transmute::<usize, fn() -> bool>(f) };
            check()
        }
    }
}

/// The error a wait ends with when [`pending`] says so.
pub fn error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted by a signal")
}
