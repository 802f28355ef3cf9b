//! Layer 1 of vmc: the shared-memory channel layout and its byte rings.
//!
//! vmc moves the bytes of a co-resident TCP connection onto two lock-free rings in
//! memory both endpoints map. This crate is everything about that memory and nothing
//! else: it makes **no system calls** (it is `no_std`), so the same code runs over a
//! memfd, a file in /dev/shm or an ivshmem BAR; the OS layer (`vmc-os`) maps segments
//! and sleeps, the channel layer (`vmc-channel`) puts the two together.
//!
//! - [`layout`]: the versioned `repr(C)` header and where everything lies.
//! - [`ring`]: the single-producer/single-consumer byte ring, copying and zero-copy,
//!   that validates every index the peer publishes.
//! - [`wait`]: the sleep/wake protocol (wake only announced sleepers, never lose one).
//! - [`channel`]: turning a mapped block into the two ends of a channel.
//! - [`heap`]: the same over heap memory, for tests and benchmarks.
//!
//! ```text
//!   creator                                   attacher
//!   Producer --> [ ring 0: tail | head | data ] --> Consumer
//!   Consumer <-- [ ring 1: tail | head | data ] <-- Producer
//! ```
//!
//! The peer is untrusted: a value it writes can end its own channel with
//! [`RingError::Corrupt`], never cause undefined behaviour, an out-of-bounds access or
//! an endless loop on this side.

#![cfg_attr(not(any(test, loom)), no_std)]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(not(loom))]
pub mod channel;
pub mod error;
pub mod heap;
pub mod layout;
pub mod ring;
mod sync;
pub mod wait;

#[cfg(not(loom))]
pub use channel::{Endpoint, SharedHeader};
pub use error::RingError;
pub use layout::{ChannelLayout, Side, SideState, WakeKind};
pub use ring::{Consumer, Producer};
