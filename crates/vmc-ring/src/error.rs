//! Errors of the ring layer.

use core::fmt;

/// Why a ring or channel operation failed.
///
/// [`RingError::Corrupt`] means the peer broke the protocol (a bug or an attack); the
/// ring that saw it is poisoned and returns the same error from then on, so one bad
/// peer costs exactly its own channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// A value read from shared memory is impossible: `field` held `value`.
    Corrupt {
        /// Which shared field was wrong.
        field: &'static str,
        /// The value found there.
        value: u64,
    },
    /// The header carries a layout version this code does not speak.
    UnsupportedVersion(u32),
    /// A ring capacity that is not a power of two within the accepted range.
    BadCapacity(u64),
    /// The attacher's side is already taken (its state word held this value).
    AlreadyAttached(u32),
    /// The consumer closed its end: nothing written now will ever be read.
    ReaderClosed,
    /// The producer revoked the ring ([`crate::Producer::revoke`]): it writes no more.
    Revoked,
    /// The ring carried [`crate::ring::INDEX_LIMIT`] bytes, less one ring: its
    /// indices are spent, and the stream must go on another way.
    Exhausted,
    /// `commit` or `consume` named more bytes than were reserved or available.
    OutOfRange {
        /// Bytes asked for.
        asked: usize,
        /// Bytes that were available.
        available: usize,
    },
}

impl RingError {
    pub(crate) const fn corrupt(field: &'static str, value: u64) -> RingError {
        RingError::Corrupt { field, value }
    }
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Corrupt { field, value } => {
                write!(f, "peer corrupted the shared channel: {field} = {value:#x}")
            }
            RingError::UnsupportedVersion(v) => write!(f, "unsupported channel layout version {v}"),
            RingError::BadCapacity(c) => write!(
                f,
                "ring capacity {c} is not a power of two in {}..={}",
                crate::layout::MIN_CAPACITY,
                crate::layout::MAX_CAPACITY
            ),
            RingError::AlreadyAttached(s) => {
                write!(f, "channel already has an attacher (state {s})")
            }
            RingError::ReaderClosed => write!(f, "the reading end of the ring is closed"),
            RingError::Revoked => write!(f, "the ring was revoked by its writer"),
            RingError::Exhausted => write!(f, "the ring's byte indices are spent"),
            RingError::OutOfRange { asked, available } => {
                write!(
                    f,
                    "asked for {asked} bytes but only {available} are available"
                )
            }
        }
    }
}

impl core::error::Error for RingError {}
