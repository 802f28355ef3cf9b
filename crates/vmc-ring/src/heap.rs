//! Channels and rings in ordinary heap memory, for in-process use, tests and
//! micro-benchmarks. The code paths are exactly those of a shared segment.

use alloc::sync::Arc;
use core::ptr::NonNull;

use crate::ring::{Consumer, Producer};

/// A zeroed, page-aligned heap block that stands in for a shared mapping.
pub struct AlignedBlock {
    ptr: NonNull<u8>,
    layout: alloc::alloc::Layout,
}

// SAFETY: the block is plain memory owned by this value; callers synchronise access
// to its contents through the ring protocol (atomics), as with a shared mapping.
unsafe impl Send for AlignedBlock {}
// SAFETY: as above.
unsafe impl Sync for AlignedBlock {}

impl AlignedBlock {
    /// Allocates `len` zero bytes aligned to a page. Panics if `len` is 0 or the
    /// allocation fails (test-only helper).
    pub fn zeroed(len: usize) -> AlignedBlock {
        let layout = alloc::alloc::Layout::from_size_align(len, crate::layout::PAGE)
            .expect("block size overflows");
        assert!(len > 0, "empty block");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::alloc::handle_alloc_error(layout));
        AlignedBlock { ptr, layout }
    }

    /// The first byte of the block.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The block's size.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: blocks are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for AlignedBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { alloc::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A fresh ring of `capacity` bytes in heap memory: its two ends.
///
/// Panics if `capacity` is not a valid ring capacity (a power of two in
/// `MIN_CAPACITY..=MAX_CAPACITY`).
#[cfg(not(loom))]
pub fn ring_pair(capacity: usize) -> (Producer, Consumer) {
    use crate::channel::Endpoint;
    use crate::layout::{ChannelLayout, WakeKind};
    let len = ChannelLayout::for_capacity(capacity)
        .expect("valid capacity")
        .segment_len;
    let block = Arc::new(AlignedBlock::zeroed(len));
    let ptr = block.ptr();
    // SAFETY: `block` is page aligned, `len` bytes, and kept alive by the owner we pass.
    let a = unsafe { Endpoint::create(ptr, len, block.clone(), capacity, 0, WakeKind::Poll) }
        .expect("fresh block");
    // SAFETY: as above.
    let b = unsafe { Endpoint::attach(ptr, len, block, 0, WakeKind::Poll) }.expect("fresh block");
    (a.tx, b.rx)
}

/// A fresh ring of `capacity` bytes whose atomics and cells are loom's.
#[cfg(loom)]
pub fn ring_pair(capacity: usize) -> (Producer, Consumer) {
    use crate::layout::{Index, Line, RingControl, RingState};
    use crate::ring::RingMem;
    let ctl = Arc::new(RingControl {
        tail: Line(Index::new(0)),
        head: Line(Index::new(0)),
        state: Line(RingState::new()),
    });
    let ptr = NonNull::from(&*ctl);
    let data: Arc<[loom::cell::UnsafeCell<u8>]> = (0..capacity)
        .map(|_| loom::cell::UnsafeCell::new(0))
        .collect();
    let tx = Producer::new(RingMem::new_loom(ptr, data.clone(), ctl.clone()));
    let rx = Consumer::new(RingMem::new_loom(ptr, data, ctl));
    (tx, rx)
}
