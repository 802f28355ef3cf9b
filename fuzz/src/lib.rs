//! What the fuzz targets share: reading a fuzz input as a stream of small numbers,
//! and the offsets of the shared channel header a scribbling peer writes.
//!
//! Every reader returns 0 once the input is exhausted, so any byte string is a
//! valid input and a target simply stops when [`Input::is_empty`].

/// A fuzz input read front to back.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its first byte.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    /// True once every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// The next byte (0 at the end).
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// The next two bytes, little-endian (missing bytes are 0).
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let src = self.bytes(2);
        b[..src.len()].copy_from_slice(src);
        u16::from_le_bytes(b)
    }

    /// The next four bytes, little-endian (missing bytes are 0).
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let src = self.bytes(4);
        b[..src.len()].copy_from_slice(src);
        u32::from_le_bytes(b)
    }

    /// The next eight bytes, little-endian (missing bytes are 0).
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let src = self.bytes(8);
        b[..src.len()].copy_from_slice(src);
        u64::from_le_bytes(b)
    }
}

/// Writes inputs that [`Input`] reads back: the seed corpus generator uses it.
#[derive(Default)]
pub struct Builder {
    /// The input so far.
    pub out: Vec<u8>,
}

impl Builder {
    /// An empty input.
    pub fn new() -> Builder {
        Builder::default()
    }
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Builder {
        self.out.push(v);
        self
    }
    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Builder {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Builder {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Builder {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Builder {
        self.out.extend_from_slice(v);
        self
    }
}

/// Offsets in the channel header, as pinned by the const assertions of
/// `vmc_ring::layout` (and used by `crates/vmc-ring/tests/scribble.rs`).
pub mod header {
    /// Start of ring `r`'s control block.
    pub const fn ring_ctl(r: usize) -> usize {
        384 + 384 * r
    }
    /// Ring `r`'s tail (bytes produced), a `u64`.
    pub const fn tail_off(r: usize) -> usize {
        ring_ctl(r)
    }
    /// Ring `r`'s head (bytes consumed), a `u64`.
    pub const fn head_off(r: usize) -> usize {
        ring_ctl(r) + 128
    }
    /// Ring `r`'s two sleep words (`reader_sleep`, `writer_sleep`), two `u32`s.
    pub const fn sleep_off(r: usize) -> usize {
        ring_ctl(r) + 256
    }
    /// Ring `r`'s two close flags (`writer_closed`, `reader_closed`), two `u32`s.
    pub const fn closed_off(r: usize) -> usize {
        ring_ctl(r) + 264
    }
    /// 8-byte slots that hold two `u32` fields: written as two `u32`s so that no
    /// access mixes sizes with the code's own atomics.
    pub const U32_PAIRS: [usize; 9] = [8, 128, 136, 256, 264, 640, 648, 1024, 1032];
}
