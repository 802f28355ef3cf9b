//! Layer 3 of vmc: co-resident TCP connections.
//!
//! Every connection is a real TCP connection first, so `getpeername`, peers that do
//! not run vmc and remote peers work exactly as before. When both ends run vmc on one
//! machine, a shared-memory channel ([`vmc_channel`]) is attached beside it through an
//! out-of-band handshake matched on the TCP 4-tuple, and each direction moves onto
//! it at an exact byte boundary; either end can move a direction back to TCP and
//! forth again at any time without losing, duplicating or reordering a byte.
//!
//! - [`registry`]: which vmc listeners exist on this host, in which network namespace.
//! - [`TcpListener`] and [`TcpStream`]: the std-like API.
//! - [`Fallback`]: why a connection stays on TCP.
//! - `handshake.rs`: how the two ends of a connection meet (offer sockets named by
//!   the connection, called by whichever process accepted it).
//! - `conn/`: one connection, the driver of the protocol machines: set-up and state
//!   (`mod.rs`), receiving (`recv.rs`), sending (`send.rs`), control frames
//!   (`frames.rs`), moving to TCP for good (`settle.rs`), event-loop readiness
//!   (`readiness.rs`).
//! - `proto/`: the path-switching protocol as two state machines without I/O, and
//!   its seeded simulation; `control.rs`: the channel its frames travel on.
//! - `bell.rs`: how one thread wakes another waiting on the same connection.
//! - [`wire`]: the messages on the Unix socket beside each connection.
//! - [`stats`]: live connections of this user, for `vmc stat`.
//! - `tokio` (feature `tokio`): async `TcpListener` and `TcpStream` for the tokio runtime.

mod bell;
mod conn;
mod control;
mod fallback;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod handshake;
mod listener;
mod net;
pub mod policy;
mod proto;
pub mod ready;
pub mod registry;
pub mod stats;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod wire;

/// Spare channels kept for reuse between the same two processes (see
/// [`vmc_channel::pool`]).
pub use vmc_channel::pool as spares;

pub use fallback::Fallback;
pub use handshake::{ATTACH_WINDOW, OFFER_TTL};
pub use listener::TcpListener;
pub use net::{forget_closed_fds, prepare_fork, PreparedConnect, RecvOpts, TcpStream, Traffic};
pub use ready::{Interest, Ready};
pub use wire::Path;
