//! The channel's wire format: what lies where in the shared segment.
//!
//! A channel is one segment holding a one-page header and two byte rings, one per
//! direction. Both processes map the same bytes, possibly at different addresses and,
//! for VMs, from different kernels, so the layout is `repr(C)`, uses offsets and never
//! pointers, and every field is an atomic of fixed width (a peer may write any field at
//! any time; atomics make that a value we validate rather than a data race).
//!
//! ```text
//!  offset  size   contents                                  written by
//!  0       128    identity: magic, version, sizes, offsets  creator, once
//!  128     128    side 0 (creator): state, pid, wake kind   creator
//!  256     128    side 1 (attacher): state, pid, wake kind  attacher
//!  384     384    ring 0 control (creator -> attacher)      see RingControl
//!  768     384    ring 1 control (attacher -> creator)      see RingControl
//!  1152    ..     zero up to HEADER_LEN (4096)
//!  4096    cap    ring 0 data
//!  4096+c  cap    ring 1 data (offset rounded up to a page)
//! ```
//!
//! Every 128-byte block is one "line": a pair of x86 cache lines, so that the adjacent
//! line prefetcher never makes two writers share one (the same choice as crossbeam's
//! `CachePadded` on x86_64).
//!
//! The creator writes every field, then stores [`MAGIC`] with release ordering; the
//! attacher loads the magic with acquire ordering and then checks every field against
//! the layout it computes itself from the ring capacity ([`ChannelLayout::parse`]). After
//! that nothing in the identity block is read again, so a peer rewriting it later
//! changes nothing.

use crate::error::RingError;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// "VMCCHAN" followed by a zero byte, little-endian: the first word of every channel.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VMCCHAN\0");

/// The layout version this code writes and accepts. Bump it on any layout change,
/// or any change in what a shared field means. Version 2: the top bit of a ring's
/// head is its producer's revoke mark, and consumers publish the head by a swap
/// ([`crate::ring`]'s "Revoking").
pub const VERSION: u32 = 2;

/// Bytes before the first ring: one page, whatever the header needs.
pub const HEADER_LEN: usize = 4096;

/// Alignment of every ring's data area, and granularity of the segment length.
pub const PAGE: usize = 4096;

/// Smallest ring capacity accepted (small rings are useful in tests only).
pub const MIN_CAPACITY: usize = 16;

/// Largest ring capacity accepted: 1 GiB per direction.
pub const MAX_CAPACITY: usize = 1 << 30;

/// One 128-byte line of the header (see the module docs for why 128). What it holds
/// fills it to the end with atomics: no byte of the header is plain memory (not
/// even padding), so a reference to any part of it never races with a peer that
/// writes anywhere in it (Miri's scribble runs check exactly that).
#[repr(C, align(128))]
pub struct Line<T>(pub(crate) T);

/// A ring index (the producer's tail or the consumer's head), alone on its line.
#[repr(C)]
pub struct Index {
    value: AtomicU64,
    _rest: [AtomicU64; 15],
}

impl core::ops::Deref for Index {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.value
    }
}

impl Index {
    /// An index at `v` (the header is zeroed memory otherwise; loom's rings are
    /// built in the heap).
    #[cfg(loom)]
    pub(crate) fn new(v: u64) -> Index {
        Index {
            value: AtomicU64::new(v),
            _rest: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The identity block: written once by the creator.
#[repr(C)]
pub struct Identity {
    pub(crate) magic: AtomicU64,
    pub(crate) version: AtomicU32,
    pub(crate) header_len: AtomicU32,
    pub(crate) ring_capacity: AtomicU64,
    pub(crate) ring_offset: [AtomicU64; 2],
    pub(crate) segment_len: AtomicU64,
    _rest: [AtomicU64; 10],
}

/// What one endpoint says about itself. Read by the peer for diagnostics and to know
/// how the endpoint wants to be woken; nothing here is trusted for memory safety.
#[repr(C)]
pub struct SideBlock {
    /// One of [`SideState`] as `u32`.
    pub(crate) state: AtomicU32,
    /// The endpoint's process id in its own pid namespace (diagnostics only).
    pub(crate) pid: AtomicU32,
    /// How the endpoint sleeps, one of [`WakeKind`] as `u32`.
    pub(crate) wake_kind: AtomicU32,
    _rest: [AtomicU32; 29],
}

/// Control block of one ring: three lines, one per writer.
#[repr(C)]
pub struct RingControl {
    /// Bytes ever produced. Written only by the producer.
    pub(crate) tail: Line<Index>,
    /// Bytes ever consumed. Written only by the consumer.
    pub(crate) head: Line<Index>,
    /// Sleep announcements and close flags: written rarely, by either side.
    pub(crate) state: Line<RingState>,
}

/// The rarely written part of a ring's control block.
#[repr(C)]
pub struct RingState {
    /// The consumer's sleep word (see [`crate::wait`]); futexes wait on it.
    pub(crate) reader_sleep: AtomicU32,
    /// The producer's sleep word, for a producer waiting for space.
    pub(crate) writer_sleep: AtomicU32,
    /// Non-zero once the producer will write no more (EOF after the last byte).
    pub(crate) writer_closed: AtomicU32,
    /// Non-zero once the consumer will read no more (writes fail, like EPIPE).
    pub(crate) reader_closed: AtomicU32,
    _rest: [AtomicU32; 28],
}

impl RingState {
    /// All words zero.
    #[cfg(loom)]
    pub(crate) fn new() -> RingState {
        RingState {
            reader_sleep: AtomicU32::new(0),
            writer_sleep: AtomicU32::new(0),
            writer_closed: AtomicU32::new(0),
            reader_closed: AtomicU32::new(0),
            _rest: core::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

/// The whole header as it lies at offset 0 of a segment.
#[repr(C)]
pub struct ChannelHeader {
    pub(crate) identity: Line<Identity>,
    pub(crate) sides: [Line<SideBlock>; 2],
    pub(crate) rings: [RingControl; 2],
}

// The wire format must not change by accident: pin every offset.
#[cfg(not(loom))]
const _: () = {
    use core::mem::{offset_of, size_of};
    // Each line filled by its contents: no padding anywhere.
    assert!(size_of::<Identity>() == 128);
    assert!(size_of::<SideBlock>() == 128);
    assert!(size_of::<Index>() == 128);
    assert!(size_of::<RingState>() == 128);
    assert!(size_of::<Line<Identity>>() == 128);
    assert!(size_of::<Line<SideBlock>>() == 128);
    assert!(size_of::<RingControl>() == 384);
    assert!(offset_of!(ChannelHeader, identity) == 0);
    assert!(offset_of!(ChannelHeader, sides) == 128);
    assert!(offset_of!(ChannelHeader, rings) == 384);
    assert!(size_of::<ChannelHeader>() == 1152);
    assert!(size_of::<ChannelHeader>() <= HEADER_LEN);
    assert!(offset_of!(Identity, version) == 8);
    assert!(offset_of!(Identity, ring_capacity) == 16);
    assert!(offset_of!(Identity, ring_offset) == 24);
    assert!(offset_of!(Identity, segment_len) == 40);
    assert!(offset_of!(RingControl, head) == 128);
    assert!(offset_of!(RingControl, state) == 256);
    assert!(offset_of!(RingState, reader_closed) == 12);
};

/// Which end of a channel this is. The creator produces into ring 0 and consumes
/// ring 1; the attacher the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The endpoint that created and initialised the segment.
    Creator,
    /// The endpoint that attached to an existing segment.
    Attacher,
}

impl Side {
    /// Index of this side's [`SideBlock`].
    pub const fn index(self) -> usize {
        match self {
            Side::Creator => 0,
            Side::Attacher => 1,
        }
    }

    /// The other end.
    pub const fn peer(self) -> Side {
        match self {
            Side::Creator => Side::Attacher,
            Side::Attacher => Side::Creator,
        }
    }

    /// The ring this side writes into.
    pub const fn tx_ring(self) -> usize {
        self.index()
    }

    /// The ring this side reads from.
    pub const fn rx_ring(self) -> usize {
        self.peer().index()
    }
}

/// Life cycle of one endpoint, as published in its [`SideBlock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SideState {
    /// Nobody has taken this side yet.
    Vacant = 0,
    /// The endpoint is attached and running.
    Open = 1,
    /// The endpoint closed the channel in an orderly way.
    Closed = 2,
}

impl SideState {
    /// Decodes a value read from shared memory; unknown values are `None`.
    pub fn from_u32(v: u32) -> Option<SideState> {
        match v {
            0 => Some(SideState::Vacant),
            1 => Some(SideState::Open),
            2 => Some(SideState::Closed),
            _ => None,
        }
    }
}

/// How an endpoint wants to be woken when it sleeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum WakeKind {
    /// A futex on the sleep word (both ends on one kernel).
    Futex = 1,
    /// An eventfd the peer received at handshake (lets the channel sit in an epoll set).
    EventFd = 2,
    /// Nothing: the sleeper polls with back-off (peers in different VMs).
    Poll = 3,
}

impl WakeKind {
    /// Decodes a value read from shared memory; unknown values are `None`.
    pub fn from_u32(v: u32) -> Option<WakeKind> {
        match v {
            1 => Some(WakeKind::Futex),
            2 => Some(WakeKind::EventFd),
            3 => Some(WakeKind::Poll),
            _ => None,
        }
    }
}

/// Where the rings lie for a given capacity. Computed locally by both ends; the
/// attacher accepts a segment only if its header says exactly this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelLayout {
    /// Bytes in each ring (a power of two).
    pub capacity: usize,
    /// Offset of each ring's data area from the start of the segment.
    pub ring_offset: [usize; 2],
    /// Total bytes the segment must have.
    pub segment_len: usize,
}

const fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl ChannelLayout {
    /// The layout for rings of `capacity` bytes each.
    ///
    /// `capacity` must be a power of two between [`MIN_CAPACITY`] and
    /// [`MAX_CAPACITY`]; each ring starts on a page boundary.
    pub fn for_capacity(capacity: usize) -> Result<ChannelLayout, RingError> {
        if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(RingError::BadCapacity(capacity as u64));
        }
        let ring0 = HEADER_LEN;
        let ring1 = ring0 + round_up(capacity, PAGE);
        Ok(ChannelLayout {
            capacity,
            ring_offset: [ring0, ring1],
            segment_len: ring1 + round_up(capacity, PAGE),
        })
    }

    /// Writes a fresh header for this layout into `header` and publishes it.
    ///
    /// The rings start empty and open; the creator's side block is marked
    /// [`SideState::Open`]. The magic is stored last, with release ordering, so an
    /// attacher that sees it sees everything else.
    pub fn init(&self, header: &ChannelHeader, creator_pid: u32, wake: WakeKind) {
        let id = &header.identity.0;
        id.magic.store(0, Ordering::Relaxed);
        id.version.store(VERSION, Ordering::Relaxed);
        id.header_len.store(HEADER_LEN as u32, Ordering::Relaxed);
        id.ring_capacity
            .store(self.capacity as u64, Ordering::Relaxed);
        for (slot, off) in id.ring_offset.iter().zip(self.ring_offset) {
            slot.store(off as u64, Ordering::Relaxed);
        }
        id.segment_len
            .store(self.segment_len as u64, Ordering::Relaxed);
        for ring in &header.rings {
            ring.tail.0.store(0, Ordering::Relaxed);
            ring.head.0.store(0, Ordering::Relaxed);
            let st = &ring.state.0;
            for w in [
                &st.reader_sleep,
                &st.writer_sleep,
                &st.writer_closed,
                &st.reader_closed,
            ] {
                w.store(0, Ordering::Relaxed);
            }
        }
        for side in &header.sides {
            side.0
                .state
                .store(SideState::Vacant as u32, Ordering::Relaxed);
            side.0.pid.store(0, Ordering::Relaxed);
            side.0.wake_kind.store(0, Ordering::Relaxed);
        }
        let me = &header.sides[Side::Creator.index()].0;
        me.pid.store(creator_pid, Ordering::Relaxed);
        me.wake_kind.store(wake as u32, Ordering::Relaxed);
        me.state.store(SideState::Open as u32, Ordering::Relaxed);
        id.magic.store(MAGIC, Ordering::Release);
    }

    /// Reads and checks a header written by a peer that may be buggy or hostile.
    ///
    /// `available` is how many bytes the local mapping really has. Every field must
    /// equal what [`ChannelLayout::for_capacity`] computes for the advertised
    /// capacity, and the whole segment must fit in `available`; otherwise the error
    /// names the first field that does not.
    pub fn parse(header: &ChannelHeader, available: usize) -> Result<ChannelLayout, RingError> {
        let id = &header.identity.0;
        let magic = id.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(RingError::corrupt("magic", magic));
        }
        let version = id.version.load(Ordering::Relaxed);
        if version != VERSION {
            return Err(RingError::UnsupportedVersion(version));
        }
        let header_len = id.header_len.load(Ordering::Relaxed);
        if header_len as usize != HEADER_LEN {
            return Err(RingError::corrupt("header_len", header_len.into()));
        }
        let cap = id.ring_capacity.load(Ordering::Relaxed);
        let layout = usize::try_from(cap)
            .map_err(|_| RingError::BadCapacity(cap))
            .and_then(ChannelLayout::for_capacity)?;
        for (i, slot) in id.ring_offset.iter().enumerate() {
            let off = slot.load(Ordering::Relaxed);
            if off != layout.ring_offset[i] as u64 {
                return Err(RingError::corrupt(
                    if i == 0 {
                        "ring_offset[0]"
                    } else {
                        "ring_offset[1]"
                    },
                    off,
                ));
            }
        }
        let len = id.segment_len.load(Ordering::Relaxed);
        if len != layout.segment_len as u64 || layout.segment_len > available {
            return Err(RingError::corrupt("segment_len", len));
        }
        Ok(layout)
    }
}

impl ChannelHeader {
    /// The control block of ring `i` (0 or 1).
    pub fn ring(&self, i: usize) -> &RingControl {
        &self.rings[i]
    }

    /// The state `side` last published, or `None` if the value is not a known state.
    pub fn side_state(&self, side: Side) -> Option<SideState> {
        SideState::from_u32(self.sides[side.index()].0.state.load(Ordering::Acquire))
    }

    /// Publishes this endpoint's state.
    pub fn set_side_state(&self, side: Side, state: SideState) {
        self.sides[side.index()]
            .0
            .state
            .store(state as u32, Ordering::Release);
    }

    /// Claims the attacher's side: succeeds once, for the first attacher.
    pub fn claim_attacher(&self, pid: u32, wake: WakeKind) -> Result<(), RingError> {
        let block = &self.sides[Side::Attacher.index()].0;
        block.pid.store(pid, Ordering::Relaxed);
        block.wake_kind.store(wake as u32, Ordering::Relaxed);
        block
            .state
            .compare_exchange(
                SideState::Vacant as u32,
                SideState::Open as u32,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .map(|_| ())
            .map_err(RingError::AlreadyAttached)
    }

    /// The pid `side` published (diagnostics only: never trust it for anything else).
    pub fn side_pid(&self, side: Side) -> u32 {
        self.sides[side.index()].0.pid.load(Ordering::Relaxed)
    }

    /// How `side` said it wants to be woken, if the value is known.
    pub fn side_wake_kind(&self, side: Side) -> Option<WakeKind> {
        WakeKind::from_u32(self.sides[side.index()].0.wake_kind.load(Ordering::Relaxed))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use alloc::boxed::Box;

    fn fresh() -> Box<ChannelHeader> {
        // SAFETY: every field of ChannelHeader is an atomic integer (or an array of
        // them, or a padded wrapper), for which all-zero bytes are a valid value.
        unsafe { Box::new(core::mem::zeroed()) }
    }

    #[test]
    fn layout_is_page_aligned_and_non_overlapping() {
        for shift in 4..=20 {
            let l = ChannelLayout::for_capacity(1 << shift).unwrap();
            assert_eq!(l.ring_offset[0] % PAGE, 0);
            assert_eq!(l.ring_offset[1] % PAGE, 0);
            assert!(l.ring_offset[0] >= HEADER_LEN);
            assert!(l.ring_offset[0] + l.capacity <= l.ring_offset[1]);
            assert!(l.ring_offset[1] + l.capacity <= l.segment_len);
        }
        // Memory is the two rings plus one page of header.
        let l = ChannelLayout::for_capacity(256 * 1024).unwrap();
        assert_eq!(l.segment_len, 2 * 256 * 1024 + PAGE);
    }

    #[test]
    fn bad_capacities_are_refused() {
        for cap in [0, 1, 8, 15, 100, 3000, MAX_CAPACITY * 2] {
            assert!(matches!(
                ChannelLayout::for_capacity(cap),
                Err(RingError::BadCapacity(_))
            ));
        }
    }

    #[test]
    fn init_then_parse_roundtrips() {
        let h = fresh();
        let l = ChannelLayout::for_capacity(4096).unwrap();
        l.init(&h, 42, WakeKind::Futex);
        assert_eq!(ChannelLayout::parse(&h, l.segment_len), Ok(l));
        assert_eq!(h.side_state(Side::Creator), Some(SideState::Open));
        assert_eq!(h.side_state(Side::Attacher), Some(SideState::Vacant));
        assert_eq!(h.side_pid(Side::Creator), 42);
        h.claim_attacher(7, WakeKind::EventFd).unwrap();
        assert_eq!(
            h.claim_attacher(8, WakeKind::EventFd),
            Err(RingError::AlreadyAttached(1))
        );
        assert_eq!(h.side_wake_kind(Side::Attacher), Some(WakeKind::EventFd));
    }

    #[test]
    fn parse_rejects_every_kind_of_damage() {
        let l = ChannelLayout::for_capacity(4096).unwrap();
        let h = fresh();
        assert!(matches!(
            ChannelLayout::parse(&h, 1 << 20),
            Err(RingError::Corrupt { .. })
        ));

        type Damage = (&'static str, fn(&ChannelHeader));
        let damage: [Damage; 6] = [
            ("version", |h| {
                h.identity.0.version.store(VERSION + 1, Ordering::Relaxed)
            }),
            ("header_len", |h| {
                h.identity.0.header_len.store(64, Ordering::Relaxed)
            }),
            ("capacity", |h| {
                h.identity.0.ring_capacity.store(4095, Ordering::Relaxed)
            }),
            ("huge capacity", |h| {
                h.identity
                    .0
                    .ring_capacity
                    .store(u64::MAX, Ordering::Relaxed)
            }),
            ("offset", |h| {
                h.identity.0.ring_offset[1].store(4096, Ordering::Relaxed)
            }),
            ("length", |h| {
                h.identity.0.segment_len.store(1 << 40, Ordering::Relaxed)
            }),
        ];
        for (what, f) in damage {
            l.init(&h, 1, WakeKind::Futex);
            f(&h);
            assert!(
                ChannelLayout::parse(&h, 1 << 20).is_err(),
                "{what} accepted"
            );
        }
        // A segment shorter than its header claims is refused too.
        l.init(&h, 1, WakeKind::Futex);
        assert!(ChannelLayout::parse(&h, l.segment_len - 1).is_err());
    }
}
