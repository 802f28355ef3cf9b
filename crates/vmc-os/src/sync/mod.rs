//! Synchronisation words shared between threads, or between processes: the lock of
//! a connection's direction ([`DirLock`]), the eventcount that lets one thread tell
//! another to look again ([`EventCount`]), and the claim word that settles who owns
//! a connection after `fork` ([`Claim`], [`Requests`]); and the mutex of
//! process-wide caches that a forked child starts afresh ([`ForkSafeMutex`], a
//! `std` mutex and one comparison, outside the loom models).
//!
//! Each is a small protocol over a few atomics, written once here and checked
//! under every interleaving [loom] explores (`tests/loom.rs`, run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vmc-os --release --test loom`). Everything
//! here reaches its atomics through [`atomic`], which is loom's under `cfg(loom)`,
//! so the models run the orderings production uses. Kernel waits stay outside the
//! protocols (the callers' futexes and eventfds; the models stand in for them),
//! except the lock's, whose sleeps are bounded: the model treats a timed sleep as
//! one that may end at any moment, which it may.
//!
//! [loom]: https://docs.rs/loom

mod claim;
mod dirlock;
mod eventcount;
#[cfg(not(loom))]
mod fork_mutex;

pub use claim::{Claim, ClaimState, Requests, PID_MASK};
pub use dirlock::{DirGuard, DirLock};
pub use eventcount::EventCount;
#[cfg(not(loom))]
pub use fork_mutex::ForkSafeMutex;

/// The atomics and locks of this module: `std`'s, or loom's under `cfg(loom)`.
pub mod atomic {
    #[cfg(loom)]
    pub use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
    #[cfg(loom)]
    pub use loom::sync::{Mutex, MutexGuard};

    #[cfg(not(loom))]
    pub use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
    #[cfg(not(loom))]
    pub use std::sync::{Mutex, MutexGuard};
}
