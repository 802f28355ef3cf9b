//! The atomics the ring is built from, switched to [loom]'s under `cfg(loom)`.
//!
//! Everything in this crate that touches shared state goes through this module, so
//! the model tests in `tests/loom.rs` exercise exactly the orderings production uses
//! (`RUSTFLAGS="--cfg loom" cargo test -p vmc-ring --release --test loom`).
//!
//! [loom]: https://docs.rs/loom

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
