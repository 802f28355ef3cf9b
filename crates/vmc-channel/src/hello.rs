//! The two messages of the handshake over a Unix socket (see [`crate::setup`]), as
//! checked types: [`Hello`] (creator to attacher) and [`Ack`] (the answer).
//!
//! ```text
//!   HELLO  0 magic "VMC1"  4 kind:u8  5 wake:u8  6 reserved 0:u16  8 arg:u64 LE
//!          kind 1 (FRESH): arg is the length of the segment passed beside it
//!          kind 2 (REUSE): arg is the inode of a spare both sides kept
//!   ACK    0 magic "VMCA"  4 status:u8  5 reserved 0:u8 0:u16
//!          status 0 OK, 1 REFUSED, 2 UNKNOWN (no such spare)
//! ```
//!
//! `parse` takes exactly what arrived and refuses anything a correct peer would not
//! send, naming the field ([`HandshakeError`]); `emit` is its inverse.
//!
//! The types are `pub` in this private module only so that the `fuzzing` feature
//! can hand them to the fuzz targets; the crate's API does not include them.

#![forbid(unsafe_code)]

use std::fmt;

use crate::config::WakeMode;

/// Bytes of a `HELLO`.
pub const HELLO_LEN: usize = 16;
/// Bytes of an `ACK`.
pub const ACK_LEN: usize = 8;

const HELLO_MAGIC: [u8; 4] = *b"VMC1";
const ACK_MAGIC: [u8; 4] = *b"VMCA";

/// Offsets of the fields.
mod at {
    pub(super) const MAGIC: usize = 0;
    pub(super) const KIND: usize = 4;
    pub(super) const WAKE: usize = 5;
    pub(super) const HELLO_RESERVED: usize = 6;
    pub(super) const ARG: usize = 8;
    pub(super) const STATUS: usize = 4;
    pub(super) const ACK_RESERVED: usize = 5;
}

const KIND_FRESH: u8 = 1;
const KIND_REUSE: u8 = 2;

/// A handshake message that no correct peer sends: which message, which field,
/// and what it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeError {
    /// `HELLO` or `ACK`.
    pub message: &'static str,
    /// The field at fault (`length` for a message of the wrong size).
    pub field: &'static str,
    /// What it held.
    pub found: String,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed {}: {} is {}",
            self.message, self.field, self.found
        )
    }
}

impl std::error::Error for HandshakeError {}

fn bad(message: &'static str, field: &'static str, found: impl fmt::Display) -> HandshakeError {
    HandshakeError {
        message,
        field,
        found: found.to_string(),
    }
}

fn wake_code(m: WakeMode) -> u8 {
    m.kind() as u8
}

fn wake_from_code(c: u8) -> Option<WakeMode> {
    match vmc_ring::WakeKind::from_u32(c.into())? {
        vmc_ring::WakeKind::Futex => Some(WakeMode::Futex),
        vmc_ring::WakeKind::EventFd => Some(WakeMode::EventFd),
        vmc_ring::WakeKind::Poll => Some(WakeMode::Poll),
    }
}

/// The creator's offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// A new segment, passed beside the message (with the creator's two eventfds
    /// for an eventfd channel).
    Fresh {
        /// How the channel's ends wake each other.
        wake: WakeMode,
        /// The segment's length in bytes.
        segment_len: u64,
    },
    /// A spare segment both sides kept from an earlier channel (no descriptors).
    Reuse {
        /// How the channel's ends wake each other.
        wake: WakeMode,
        /// The spare's inode.
        inode: u64,
    },
}

impl Hello {
    /// The message as sent.
    pub fn emit(&self) -> [u8; HELLO_LEN] {
        let (kind, wake, arg) = match *self {
            Hello::Fresh { wake, segment_len } => (KIND_FRESH, wake, segment_len),
            Hello::Reuse { wake, inode } => (KIND_REUSE, wake, inode),
        };
        let mut b = [0u8; HELLO_LEN];
        b[at::MAGIC..at::MAGIC + 4].copy_from_slice(&HELLO_MAGIC);
        b[at::KIND] = kind;
        b[at::WAKE] = wake_code(wake);
        b[at::ARG..].copy_from_slice(&arg.to_le_bytes());
        b
    }

    /// Parses exactly the bytes that arrived.
    pub fn parse(b: &[u8]) -> Result<Hello, HandshakeError> {
        const M: &str = "HELLO";
        if b.len() != HELLO_LEN {
            return Err(bad(M, "length", format!("{} bytes", b.len())));
        }
        if b[at::MAGIC..at::MAGIC + 4] != HELLO_MAGIC {
            return Err(bad(M, "magic", format!("{:?}", &b[..4])));
        }
        let wake = wake_from_code(b[at::WAKE]).ok_or_else(|| bad(M, "wake", b[at::WAKE]))?;
        let reserved = &b[at::HELLO_RESERVED..at::ARG];
        if reserved != [0, 0] {
            return Err(bad(M, "reserved", format!("{reserved:?}")));
        }
        let arg = u64::from_le_bytes(b[at::ARG..].try_into().expect("8 bytes"));
        match b[at::KIND] {
            KIND_FRESH => {
                if arg == 0 || arg > vmc_os::MAX_SEGMENT_LEN as u64 {
                    return Err(bad(M, "segment_len", arg));
                }
                Ok(Hello::Fresh {
                    wake,
                    segment_len: arg,
                })
            }
            KIND_REUSE => Ok(Hello::Reuse { wake, inode: arg }),
            k => Err(bad(M, "kind", k)),
        }
    }
}

/// The attacher's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Attached (its eventfds beside the message for a fresh eventfd channel).
    Ok,
    /// The segment did not pass the attacher's checks.
    Refused,
    /// A REUSE named a spare the attacher no longer keeps: offer a fresh one.
    Unknown,
}

impl Ack {
    /// The message as sent.
    pub fn emit(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[at::MAGIC..at::MAGIC + 4].copy_from_slice(&ACK_MAGIC);
        b[at::STATUS] = match self {
            Ack::Ok => 0,
            Ack::Refused => 1,
            Ack::Unknown => 2,
        };
        b
    }

    /// Parses exactly the bytes that arrived.
    pub fn parse(b: &[u8]) -> Result<Ack, HandshakeError> {
        const M: &str = "ACK";
        if b.len() != ACK_LEN {
            return Err(bad(M, "length", format!("{} bytes", b.len())));
        }
        if b[at::MAGIC..at::MAGIC + 4] != ACK_MAGIC {
            return Err(bad(M, "magic", format!("{:?}", &b[..4])));
        }
        let reserved = &b[at::ACK_RESERVED..];
        if reserved != [0, 0, 0] {
            return Err(bad(M, "reserved", format!("{reserved:?}")));
        }
        match b[at::STATUS] {
            0 => Ok(Ack::Ok),
            1 => Ok(Ack::Refused),
            2 => Ok(Ack::Unknown),
            s => Err(bad(M, "status", s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wake() -> impl Strategy<Value = WakeMode> {
        prop_oneof![
            Just(WakeMode::Futex),
            Just(WakeMode::EventFd),
            Just(WakeMode::Poll)
        ]
    }

    fn hello() -> impl Strategy<Value = Hello> {
        prop_oneof![
            (wake(), 1..=vmc_os::MAX_SEGMENT_LEN as u64)
                .prop_map(|(wake, segment_len)| Hello::Fresh { wake, segment_len }),
            (wake(), any::<u64>()).prop_map(|(wake, inode)| Hello::Reuse { wake, inode }),
        ]
    }

    proptest! {
        #[test]
        fn every_hello_roundtrips(h in hello()) {
            prop_assert_eq!(Hello::parse(&h.emit()), Ok(h));
        }

        /// Any bytes: refused, or the encoding of what they parse to.
        #[test]
        fn hellos_parse_only_from_their_own_encoding(b in proptest::collection::vec(any::<u8>(), 0..24)) {
            if let Ok(h) = Hello::parse(&b) {
                prop_assert_eq!(&h.emit()[..], &b[..]);
            }
        }

        #[test]
        fn acks_parse_only_from_their_own_encoding(b in proptest::collection::vec(any::<u8>(), 0..12)) {
            if let Ok(a) = Ack::parse(&b) {
                prop_assert_eq!(&a.emit()[..], &b[..]);
            }
        }
    }

    #[test]
    fn every_ack_roundtrips() {
        for a in [Ack::Ok, Ack::Refused, Ack::Unknown] {
            assert_eq!(Ack::parse(&a.emit()), Ok(a));
        }
    }

    fn field_of_hello(f: impl FnOnce(&mut [u8; HELLO_LEN])) -> &'static str {
        let mut b = Hello::Fresh {
            wake: WakeMode::EventFd,
            segment_len: 8192,
        }
        .emit();
        f(&mut b);
        Hello::parse(&b).unwrap_err().field
    }

    #[test]
    fn a_malformed_hello_names_its_field() {
        assert_eq!(field_of_hello(|b| b[0] = b'X'), "magic");
        assert_eq!(field_of_hello(|b| b[at::KIND] = 3), "kind");
        assert_eq!(field_of_hello(|b| b[at::WAKE] = 9), "wake");
        assert_eq!(
            field_of_hello(|b| b[at::HELLO_RESERVED + 1] = 1),
            "reserved"
        );
        assert_eq!(field_of_hello(|b| b[at::ARG..].fill(0)), "segment_len");
        assert_eq!(field_of_hello(|b| b[at::ARG..].fill(0xff)), "segment_len");
        let e = Hello::parse(&[0; 15]).unwrap_err();
        assert_eq!(e.field, "length");
        assert_eq!(e.to_string(), "malformed HELLO: length is 15 bytes");
    }

    #[test]
    fn a_malformed_ack_names_its_field() {
        let field = |f: fn(&mut [u8; ACK_LEN])| {
            let mut b = Ack::Ok.emit();
            f(&mut b);
            Ack::parse(&b).unwrap_err().field
        };
        assert_eq!(field(|b| b[3] = b'B'), "magic");
        assert_eq!(field(|b| b[at::STATUS] = 3), "status");
        assert_eq!(field(|b| b[at::ACK_RESERVED + 2] = 7), "reserved");
        assert_eq!(Ack::parse(&[0; 9]).unwrap_err().field, "length");
    }
}
