//! Layer 3 of vmc (its first part): a full-duplex byte channel between two
//! processes through shared memory.
//!
//! A [`Channel`] is two [`vmc_ring`] rings in one segment mapped by both ends
//! ([`vmc_os`] provides the segment and the wake-ups). This crate adds what makes it a
//! byte stream a program can rely on:
//!
//! - **Blocking the right way** ([`spin`], `channel.rs`): spin briefly and adaptively,
//!   then sleep; the peer wakes a sleeper only if it announced its sleep
//!   ([`vmc_ring::wait`]); an idle channel uses no CPU.
//! - **Set-up** (`setup.rs`): a sealed memfd passed over a Unix socket, or a file in a
//!   private directory; each end checks what the other wrote before using it.
//!   Channels between the same two processes can reuse the segments and wake-up
//!   descriptors of closed ones ([`pool`]).
//! - **Closing and failure**: each direction shuts down on its own (EOF after the last
//!   byte); a peer that dies without closing turns a blocked read or write into
//!   `ConnectionReset` within [`config::LIVENESS_INTERVAL`]; a peer that corrupts the
//!   channel gets it an `InvalidData` error, never anything worse.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use vmc_channel::{Channel, ChannelConfig, ChannelListener};
//!
//! # fn main() -> std::io::Result<()> {
//! let listener = ChannelListener::bind("/tmp/echo.sock", ChannelConfig::default())?;
//! let server = std::thread::spawn(move || -> std::io::Result<()> {
//!     let mut ch = listener.accept()?;
//!     let mut buf = [0u8; 5];
//!     ch.read_exact(&mut buf)?;
//!     ch.write_all(&buf)
//! });
//! let mut ch = Channel::connect("/tmp/echo.sock")?;
//! ch.write_all(b"hello")?;
//! let mut buf = [0u8; 5];
//! ch.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"hello");
//! # server.join().unwrap()
//! # }
//! ```

mod channel;
pub mod config;
mod core;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod hello;
pub mod pool;
mod setup;
pub mod spin;

pub use channel::{Channel, ReadHalf, WakeFds, WriteHalf};
pub use config::{ChannelConfig, WakeMode};
pub use hello::HandshakeError;
pub use setup::{ChannelListener, Offer, PendingChannel, HANDSHAKE_TIMEOUT};
