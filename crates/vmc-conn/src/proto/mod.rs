//! The path-switching protocol of one connection, as two state machines that do no
//! I/O, read no clock and take no lock: [`Sender`] for the direction this end sends,
//! [`Receiver`] for the one it receives. `conn/` drives them: it feeds them what
//! happened (bytes written or read on a path, a control frame from the peer, a ring
//! found empty) and performs what they decide (send this frame, resume or pause the
//! ring, read TCP up to here, take bytes back from the ring). The seeded simulation in
//! `sim.rs` drives the same machines over simulated TCP, rings and control channels.
//!
//! # The protocol (one direction)
//! Each direction starts on TCP and is owned by its sender, which may move it to the
//! other path at any time: it announces `SWITCH { to, offset }`, `offset` being the
//! bytes it sent on the path it leaves, and from then on writes to the new path. The
//! receiver keeps reading the old path until it has exactly `offset` bytes from it,
//! then reads the new one, and answers LEFT (the path and the offset it left it at).
//!
//! - TCP -> shm: the sender resumes its ring, then sends SWITCH (the receiver learns
//!   of the move from the control channel and must find the ring open).
//! - shm -> TCP: the sender sends SWITCH, then pauses its ring. The receiver drains
//!   the ring, finds it paused and the SWITCH already there; a paused ring without a
//!   SWITCH is the end of the stream.
//! - A sender goes back to a path only after the LEFT answer to its last move away
//!   from it: a byte stream has no marks, so the receiver must know where one stretch
//!   on a path ended before the next stretch on it begins.
//! - For good, from the receiving end ([`Receiver::settle`]): the receiver stops
//!   reading the ring and sends REWIND with the offset it reached. The sender, when it
//!   next runs ([`Sender::serve_rewind`]), takes the unread bytes back out of its ring,
//!   puts them on TCP ahead of everything else and never returns to the ring.
//!
//! Everything the peer says is checked against what this end knows: a frame that
//! could not come from a correct peer is a [`Violation`], which costs the connection
//! and nothing else.

#![forbid(unsafe_code)]

mod receiver;
mod sender;
#[cfg(test)]
mod sim;

pub(crate) use receiver::{Orphaned, Receiver, RxEnd, RxStep};
pub(crate) use sender::{Refused, Rewind, Sender};

/// A frame or an event the peer could not have caused by following the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Violation(pub(crate) &'static str);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl From<Violation> for std::io::Error {
    fn from(v: Violation) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("vmc connection: {}", v.0),
        )
    }
}

/// Index of a path in per-path arrays: `[tcp, shm]`.
fn ix(p: crate::wire::Path) -> usize {
    match p {
        crate::wire::Path::Tcp => 0,
        crate::wire::Path::Shm => 1,
    }
}
