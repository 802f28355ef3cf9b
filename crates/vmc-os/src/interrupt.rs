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

use std::sync::OnceLock;

static CHECK: OnceLock<fn() -> bool> = OnceLock::new();

/// Registers the check (once per process; later calls are ignored).
pub fn set_check(check: fn() -> bool) {
    let _ = CHECK.set(check);
}

/// True if the current wait should end with `Interrupted`. Cheap: one load when no
/// check is registered.
#[inline]
pub fn pending() -> bool {
    CHECK.get().is_some_and(|c| c())
}

/// The error a wait ends with when [`pending`] says so.
pub fn error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted by a signal")
}
