//! A channel laid out in a block of shared memory: header plus two rings.
//!
//! This is the only place the crate turns a raw address into typed references, and it
//! does so under one contract ([`Endpoint::create`], [`Endpoint::attach`]): the caller
//! (the OS layer, which made the mapping) vouches that the memory is mapped and stays
//! mapped while the endpoint lives.

use core::ptr::NonNull;

use crate::error::RingError;
use crate::layout::{ChannelHeader, ChannelLayout, Side, SideState, WakeKind};
use crate::ring::{Consumer, Owner, Producer, RingMem};

/// A handle on the header of a mapped channel; cheap to clone, keeps the memory alive.
#[derive(Clone)]
pub struct SharedHeader {
    header: NonNull<ChannelHeader>,
    layout: ChannelLayout,
    side: Side,
    _owner: Owner,
}

// SAFETY: the header is all atomics and lives as long as `_owner` (Send + Sync).
unsafe impl Send for SharedHeader {}
// SAFETY: as above; every access through `&ChannelHeader` is atomic.
unsafe impl Sync for SharedHeader {}

impl SharedHeader {
    /// The header itself.
    pub fn header(&self) -> &ChannelHeader {
        // SAFETY: valid while `_owner` lives (the create/attach contract); all fields
        // are atomics, so shared references are sound even with a writing peer.
        unsafe { self.header.as_ref() }
    }

    /// The validated layout (private copy: never re-read from shared memory).
    pub fn layout(&self) -> ChannelLayout {
        self.layout
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// What the peer last published about itself (`None`: a value no peer should
    /// write, treat it as a broken peer).
    pub fn peer_state(&self) -> Option<SideState> {
        self.header().side_state(self.side.peer())
    }

    /// Publishes our own state.
    pub fn set_state(&self, state: SideState) {
        self.header().set_side_state(self.side, state)
    }
}

/// One end of a channel: the header, the ring we write and the ring we read.
pub struct Endpoint {
    /// The shared header (side states, layout).
    pub header: SharedHeader,
    /// The ring towards the peer.
    pub tx: Producer,
    /// The ring from the peer.
    pub rx: Consumer,
}

impl Endpoint {
    /// Lays out a fresh channel with rings of `capacity` bytes in `len` bytes at
    /// `base`, and returns the creator's end.
    ///
    /// # Safety
    /// `base` must be aligned to [`crate::layout::PAGE`] and valid for reads and
    /// writes of `len` bytes for as long as `owner` lives, and nothing else in this
    /// process may access those bytes except through endpoints built here. Other
    /// processes may map them too: the protocol, not this contract, governs them.
    pub unsafe fn create(
        base: NonNull<u8>,
        len: usize,
        owner: Owner,
        capacity: usize,
        pid: u32,
        wake: WakeKind,
    ) -> Result<Endpoint, RingError> {
        let layout = ChannelLayout::for_capacity(capacity)?;
        if layout.segment_len > len {
            return Err(RingError::corrupt("segment_len", len as u64));
        }
        let header = base.cast::<ChannelHeader>();
        // SAFETY: `base` is page-aligned and valid for `len >= segment_len >
        // size_of::<ChannelHeader>()` bytes (caller's contract); the header is all
        // atomics, so any bit pattern already there is a valid value.
        layout.init(unsafe { header.as_ref() }, pid, wake);
        // SAFETY: forwarded from our caller; the layout was just validated against `len`.
        Ok(unsafe { Self::build(base, header, layout, Side::Creator, owner) })
    }

    /// Attaches to a channel a peer laid out in `len` bytes at `base`, checking the
    /// header first (see [`ChannelLayout::parse`]), and returns the attacher's end.
    ///
    /// # Safety
    /// As for [`Endpoint::create`].
    pub unsafe fn attach(
        base: NonNull<u8>,
        len: usize,
        owner: Owner,
        pid: u32,
        wake: WakeKind,
    ) -> Result<Endpoint, RingError> {
        if len < crate::layout::HEADER_LEN {
            return Err(RingError::corrupt("segment_len", len as u64));
        }
        let header = base.cast::<ChannelHeader>();
        // SAFETY: as in `create`; `len >= HEADER_LEN` covers the header.
        let h = unsafe { header.as_ref() };
        let layout = ChannelLayout::parse(h, len)?;
        h.claim_attacher(pid, wake)?;
        // SAFETY: forwarded from our caller; `parse` checked the layout fits in `len`.
        Ok(unsafe { Self::build(base, header, layout, Side::Attacher, owner) })
    }

    /// # Safety
    /// `base..base + layout.segment_len` is valid as in `create`, and `header` is `base`.
    unsafe fn build(
        base: NonNull<u8>,
        header: NonNull<ChannelHeader>,
        layout: ChannelLayout,
        side: Side,
        owner: Owner,
    ) -> Endpoint {
        let ring = |i: usize| {
            // SAFETY: `rings[i]` is inside the header; the data area at
            // `ring_offset[i]` has `capacity` bytes inside the segment (checked by
            // `for_capacity`/`parse`), page aligned, and the two areas do not overlap.
            unsafe {
                let ctl = NonNull::from(&header.as_ref().rings[i]);
                let data = base.add(layout.ring_offset[i]);
                RingMem::new(ctl, data, layout.capacity, owner.clone())
            }
        };
        let tx = Producer::new(ring(side.tx_ring()));
        let rx = Consumer::new(ring(side.rx_ring()));
        Endpoint {
            header: SharedHeader {
                header,
                layout,
                side,
                _owner: owner,
            },
            tx,
            rx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heap::AlignedBlock;
    use alloc::sync::Arc;

    fn block(cap: usize) -> (Arc<AlignedBlock>, usize) {
        let len = ChannelLayout::for_capacity(cap).unwrap().segment_len;
        (Arc::new(AlignedBlock::zeroed(len)), len)
    }

    #[test]
    fn both_ends_talk_through_one_block() {
        let (mem, len) = block(4096);
        // SAFETY: `mem` is a page-aligned block of `len` bytes kept alive by the owner.
        let mut a =
            unsafe { Endpoint::create(mem.ptr(), len, mem.clone(), 4096, 1, WakeKind::Futex) }
                .unwrap();
        // SAFETY: as above.
        let mut b =
            unsafe { Endpoint::attach(mem.ptr(), len, mem.clone(), 2, WakeKind::Poll) }.unwrap();
        a.tx.write(b"ping").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(b.rx.read(&mut buf).unwrap(), 4);
        b.tx.write(b"pong!").unwrap();
        assert_eq!(a.rx.read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"pong!");
        assert_eq!(a.header.peer_state(), Some(SideState::Open));
        b.header.set_state(SideState::Closed);
        assert_eq!(a.header.peer_state(), Some(SideState::Closed));
        assert_eq!(a.header.header().side_pid(Side::Attacher), 2);
    }

    #[test]
    fn a_second_attacher_or_a_short_block_is_refused() {
        let (mem, len) = block(4096);
        // SAFETY: as in the test above.
        let _a = unsafe { Endpoint::create(mem.ptr(), len, mem.clone(), 4096, 1, WakeKind::Futex) }
            .unwrap();
        // SAFETY: as above.
        let _b =
            unsafe { Endpoint::attach(mem.ptr(), len, mem.clone(), 2, WakeKind::Futex) }.unwrap();
        // SAFETY: as above.
        let c = unsafe { Endpoint::attach(mem.ptr(), len, mem.clone(), 3, WakeKind::Futex) };
        assert!(matches!(c, Err(RingError::AlreadyAttached(_))));
        // SAFETY: as above (a shorter length is always within the block).
        let d = unsafe { Endpoint::attach(mem.ptr(), len - 4096, mem.clone(), 3, WakeKind::Futex) };
        assert!(matches!(
            d,
            Err(RingError::Corrupt {
                field: "segment_len",
                ..
            })
        ));
    }
}
