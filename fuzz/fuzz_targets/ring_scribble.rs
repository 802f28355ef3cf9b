//! The byte rings against a scribbling peer.
//!
//! A channel (header and two rings) in a heap block, as `vmc_ring::heap::ring_pair`
//! builds one, driven by the input as a sequence of operations on either ring:
//! producer writes (copying and zero-copy), consumer reads (copying and zero-copy),
//! the sleep/wake and close calls, `take_back`, and raw scribbles of arbitrary values
//! over any word of the shared header or any byte of a data area, the way a hostile
//! peer process could write them.
//!
//! What must hold, whatever the peer writes (the invariants of
//! `crates/vmc-ring/tests/scribble.rs`, checked after every call):
//! - no panic, no out-of-bounds access (the target runs under AddressSanitizer);
//! - a call returns bytes or a clean `RingError`: the consumer only
//!   `Corrupt { field: "tail" }` or `{ field: "head" }` (its publishing swap found
//!   a value it never wrote) holding the value in shared memory, the producer only
//!   `Corrupt { field: "head" }` likewise or `ReaderClosed` exactly when the shared
//!   flag says so; `OutOfRange` only for an over-long commit, consume or take-back;
//! - a `Corrupt` error is sticky: every later call of that end returns it;
//! - no call returns or exposes more bytes than the capacity or than asked for, and
//!   each end's position moves by exactly what its calls returned;
//! - a ring whose indices were never scribbled behaves exactly like a queue: every
//!   count, flag, sleep decision and wake-up is the one a model computes, and the
//!   bytes are the ones written unless its data area was scribbled; scribbles
//!   elsewhere (identity, side blocks, padding, the other ring) change nothing;
//! - `take_back` returns exactly the producer's own last bytes even when the
//!   consumer's index was scribbled (only the data area can damage them, or the
//!   producer's own zero-copy fills of free space it did not commit, which on an
//!   intact ring never reach above the consumer's position).
#![no_main]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmc_fuzz::header::{closed_off, head_off, sleep_off, tail_off, U32_PAIRS};
use vmc_fuzz::Input;
use vmc_ring::heap::AlignedBlock;
use vmc_ring::layout::{ChannelLayout, WakeKind, HEADER_LEN};
use vmc_ring::{Consumer, Endpoint, Producer, RingError};

const CAPS: [usize; 4] = [16, 64, 256, 4096];

/// The byte at stream index `i` of ring `r`, as every write in this target sends it.
fn pattern(r: usize, i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (0x5a * r as u8)
}

/// What this side knows about one ring.
#[derive(Default)]
struct Model {
    /// The tail or head word was scribbled: indices may be anything from now on.
    ctl_tainted: bool,
    /// A byte of the data area was scribbled: contents may be anything.
    data_tainted: bool,
    /// Bytes the producer has published (its private tail).
    tail: u64,
    /// Bytes the consumer has taken (its private head).
    head: u64,
    tx_poison: Option<RingError>,
    rx_poison: Option<RingError>,
    /// Stream bytes below this index may have been overwritten in the data area by a
    /// zero-copy fill of free space that was not (all) committed: free space is where
    /// bytes the consumer said it took used to be.
    clobbered_below: u64,
    /// Published since the last `needs_wake` (each end's private flag).
    tx_published: bool,
    rx_published: bool,
}

impl Model {
    fn exact(&self) -> bool {
        !self.ctl_tainted
    }
    fn queued(&self) -> usize {
        self.tail.wrapping_sub(self.head) as usize
    }
    fn contents_known(&self) -> bool {
        !self.ctl_tainted && !self.data_tainted
    }
}

struct Shm {
    mem: Arc<AlignedBlock>,
}

impl Shm {
    fn w64(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= HEADER_LEN);
        // SAFETY: the block is page aligned, `off` is 8-aligned and inside the header,
        // so the address is valid and aligned for an AtomicU64 while `mem` lives. The
        // header is all atomics (or padding), and this slot is accessed with this size
        // only (the u32 pairs go through `w32`), as in tests/scribble.rs.
        unsafe { &*(self.mem.ptr().as_ptr().add(off) as *const AtomicU64) }
    }
    fn w32(&self, off: usize) -> &AtomicU32 {
        assert!(off.is_multiple_of(4) && off + 4 <= HEADER_LEN);
        // SAFETY: as in `w64`; these are the header's u32 atomics.
        unsafe { &*(self.mem.ptr().as_ptr().add(off) as *const AtomicU32) }
    }
    fn tail(&self, r: usize) -> u64 {
        self.w64(tail_off(r)).load(Ordering::Relaxed)
    }
    fn head(&self, r: usize) -> u64 {
        self.w64(head_off(r)).load(Ordering::Relaxed)
    }
    fn reader_sleep(&self, r: usize) -> u32 {
        self.w32(sleep_off(r)).load(Ordering::Relaxed)
    }
    fn writer_sleep(&self, r: usize) -> u32 {
        self.w32(sleep_off(r) + 4).load(Ordering::Relaxed)
    }
    fn writer_closed(&self, r: usize) -> bool {
        self.w32(closed_off(r)).load(Ordering::Relaxed) != 0
    }
    fn reader_closed(&self, r: usize) -> bool {
        self.w32(closed_off(r) + 4).load(Ordering::Relaxed) != 0
    }
    /// Writes `v` at the 8-aligned header offset `off` the way a peer could.
    fn scribble(&self, off: usize, v: u64) {
        if U32_PAIRS.contains(&off) {
            self.w32(off).store(v as u32, Ordering::Relaxed);
            self.w32(off + 4).store((v >> 32) as u32, Ordering::Relaxed);
        } else {
            self.w64(off).store(v, Ordering::Relaxed);
        }
    }
    fn current(&self, off: usize) -> u64 {
        if U32_PAIRS.contains(&off) {
            u64::from(self.w32(off).load(Ordering::Relaxed))
                | u64::from(self.w32(off + 4).load(Ordering::Relaxed)) << 32
        } else {
            self.w64(off).load(Ordering::Relaxed)
        }
    }
    /// Writes one byte of a data area (non-atomically, as the ring copies them).
    fn scribble_data(&self, off: usize, v: u8) {
        assert!(off >= HEADER_LEN && off < self.mem.len());
        // SAFETY: in bounds (checked); no slice of the ring is alive between
        // operations, and the ring never trusts a data byte for anything.
        unsafe { self.mem.ptr().as_ptr().add(off).write_volatile(v) }
    }
}

/// A consumer call failed (or had to): the error must be the sticky one, or the
/// first, caused by a tail that was really scribbled, or by a head its swap found
/// scribbled (the consumer publishes its head by a swap from the value it wrote).
fn rx_failed(m: &mut Model, e: RingError, shared_tail: u64, shared_head: u64) {
    match m.rx_poison {
        Some(p) => assert_eq!(e, p, "a poisoned consumer changed its error"),
        None => {
            assert!(
                m.ctl_tainted,
                "consumer failed with {e:?} on an intact ring"
            );
            assert!(
                e == RingError::Corrupt {
                    field: "tail",
                    value: shared_tail
                } || e
                    == RingError::Corrupt {
                        field: "head",
                        value: shared_head
                    },
                "consumer: {e:?} (tail {shared_tail:#x}, head {shared_head:#x})"
            );
            m.rx_poison = Some(e);
        }
    }
}

/// A producer call failed: sticky, or a scribbled head.
fn tx_failed(m: &mut Model, e: RingError, shared_head: u64) {
    match m.tx_poison {
        Some(p) => assert_eq!(e, p, "a poisoned producer changed its error"),
        None => {
            assert!(
                m.ctl_tainted,
                "producer failed with {e:?} on an intact ring"
            );
            assert_eq!(
                e,
                RingError::Corrupt {
                    field: "head",
                    value: shared_head
                },
                "producer"
            );
            m.tx_poison = Some(e);
        }
    }
}

/// The producer's result for a call that first checks the reader's close flag.
fn tx_gate(m: &Model, reader_closed: bool) -> Option<RingError> {
    match m.tx_poison {
        Some(p) => Some(p),
        None if reader_closed => Some(RingError::ReaderClosed),
        None => None,
    }
}

fn check_bytes(m: &Model, r: usize, from: u64, got: &[u8]) {
    if m.contents_known() {
        for (i, &b) in got.iter().enumerate() {
            assert_eq!(
                b,
                pattern(r, from + i as u64),
                "byte {} of ring {r}",
                from + i as u64
            );
        }
    }
}

/// `VMC_FUZZ_TRACE=1` prints every operation (to replay a crash by hand).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VMC_FUZZ_TRACE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let cap = CAPS[inp.u8() as usize % CAPS.len()];
    let layout = ChannelLayout::for_capacity(cap).unwrap();
    let len = layout.segment_len;
    let shm = Shm {
        mem: Arc::new(AlignedBlock::zeroed(len)),
    };
    let mem = &shm.mem;
    // SAFETY: `mem` is a page-aligned block of `len` bytes kept alive by the owner;
    // this target touches it only through the endpoints and `Shm`, like a peer.
    let a = unsafe { Endpoint::create(mem.ptr(), len, mem.clone(), cap, 1, WakeKind::Poll) }
        .expect("fresh block");
    // SAFETY: as above.
    let b = unsafe { Endpoint::attach(mem.ptr(), len, mem.clone(), 2, WakeKind::Poll) }
        .expect("fresh block");
    let (_ha, _hb) = (a.header, b.header);
    // Ring 0: creator -> attacher; ring 1: attacher -> creator.
    let mut txs: [Producer; 2] = [a.tx, b.tx];
    let mut rxs: [Consumer; 2] = [b.rx, a.rx];
    let mut models = [Model::default(), Model::default()];
    let mut buf = vec![0u8; 2 * 4096 + 1];

    let mut ops = 0;
    while !inp.is_empty() && ops < 10_000 {
        ops += 1;
        let op = inp.u8();
        let r = usize::from(op & 1);
        let (tx, rx, m) = (&mut txs[r], &mut rxs[r], &mut models[r]);
        if trace() {
            eprintln!(
                "op {} ring {r} tail {} head {}",
                (op >> 1) % 20,
                m.tail,
                m.head
            );
        }
        match (op >> 1) % 20 {
            // Producer: copying write of n bytes.
            0 => {
                let n = usize::from(inp.u16()) % (2 * cap + 1);
                for (j, b) in buf[..n].iter_mut().enumerate() {
                    *b = pattern(r, m.tail.wrapping_add(j as u64));
                }
                let gate = tx_gate(m, shm.reader_closed(r));
                match tx.write(&buf[..n]) {
                    Ok(k) => {
                        assert!(gate.is_none(), "write went through {gate:?}");
                        assert!(k <= n && k <= cap, "wrote {k} of {n}, capacity {cap}");
                        if m.exact() {
                            assert_eq!(k, n.min(cap - m.queued()), "write count");
                        }
                        m.tail = m.tail.wrapping_add(k as u64);
                        m.tx_published |= k > 0;
                    }
                    Err(e) if gate == Some(RingError::ReaderClosed) => {
                        assert_eq!(e, RingError::ReaderClosed)
                    }
                    Err(e) => tx_failed(m, e, shm.head(r)),
                }
            }
            // Producer: zero-copy write, fill, commit k.
            1 => {
                let want = usize::from(inp.u16()) % (2 * cap + 1);
                let k = usize::from(inp.u16()) % (2 * cap + 1);
                let gate = tx_gate(m, shm.reader_closed(r));
                let tail = m.tail;
                let total = match tx.write_slices(want) {
                    Ok((a, b)) => {
                        assert!(gate.is_none(), "write_slices went through {gate:?}");
                        let total = a.len() + b.len();
                        assert!(total <= cap, "{total} bytes of slices, capacity {cap}");
                        if m.exact() {
                            // The cached head may be old: at least what was asked for,
                            // else everything that is free.
                            let free = cap - m.queued();
                            assert!(total <= free, "{total} bytes of slices, {free} free");
                            assert!(total >= want.min(cap) || total == free, "too few");
                        }
                        let mut filled = 0;
                        for (j, x) in a.iter_mut().chain(b.iter_mut()).take(k).enumerate() {
                            *x = pattern(r, tail.wrapping_add(j as u64));
                            filled += 1;
                        }
                        let reach = tail.wrapping_add(filled).saturating_sub(cap as u64);
                        m.clobbered_below = m.clobbered_below.max(reach);
                        Some(total)
                    }
                    Err(e) if gate == Some(RingError::ReaderClosed) => {
                        assert_eq!(e, RingError::ReaderClosed);
                        None
                    }
                    Err(e) => {
                        tx_failed(m, e, shm.head(r));
                        None
                    }
                };
                if let Some(total) = total {
                    match tx.commit(k) {
                        Ok(()) => {
                            assert!(k <= total, "committed {k} of {total}");
                            m.tail = m.tail.wrapping_add(k as u64);
                            m.tx_published |= k > 0;
                        }
                        Err(RingError::OutOfRange { asked, available }) => {
                            assert_eq!((asked, available), (k, total))
                        }
                        // Its publishing swap found the head scribbled.
                        Err(e) => rx_failed(m, e, shm.tail(r), shm.head(r)),
                    }
                }
            }
            2 => match tx.free() {
                Ok(f) => {
                    assert!(m.tx_poison.is_none());
                    assert!(f <= cap);
                    if m.exact() {
                        assert_eq!(f, cap - m.queued(), "free");
                    }
                }
                Err(e) => tx_failed(m, e, shm.head(r)),
            },
            3 => {
                let rc = shm.reader_closed(r);
                match tx.prepare_sleep() {
                    Ok(sleep) => {
                        // A closed reader means "do not sleep" before anything else
                        // is looked at, poisoned or not.
                        assert!(m.tx_poison.is_none() || (rc && !sleep));
                        if m.exact() {
                            assert_eq!(sleep, !rc && m.queued() == cap, "producer sleeps");
                        }
                        assert_eq!(shm.writer_sleep(r), u32::from(sleep), "writer_sleep");
                    }
                    Err(e) => {
                        tx_failed(m, e, shm.head(r));
                        assert_eq!(shm.writer_sleep(r), 1, "announced");
                    }
                }
            }
            4 => {
                tx.finish_sleep();
                assert_eq!(shm.writer_sleep(r), 0);
            }
            5 => {
                let want = m.tx_published && shm.reader_sleep(r) == 1;
                assert_eq!(tx.needs_wake(), want, "producer needs_wake");
                m.tx_published = false;
                if want {
                    assert_eq!(shm.reader_sleep(r), 0);
                }
            }
            6 => {
                tx.close();
                m.tx_published = true;
                assert!(shm.writer_closed(r));
            }
            7 => {
                tx.reopen();
                assert!(!shm.writer_closed(r));
            }
            // Producer: take back what the consumer "never took".
            8 => {
                let from = match inp.u8() % 4 {
                    0 => inp.u64(),
                    _ => m
                        .tail
                        .wrapping_sub(u64::from(inp.u16()) % (2 * cap as u64 + 2)),
                };
                let prefix = inp.u8() % 3;
                let mut back = vec![0xa5u8; prefix.into()];
                let want = m.tail.wrapping_sub(from);
                match tx.take_back(from, &mut back) {
                    Ok(()) => {
                        assert!(m.tx_poison.is_none());
                        assert!(want <= cap as u64, "took back {want} bytes");
                        assert_eq!(back.len(), usize::from(prefix) + want as usize);
                        assert!(back[..prefix.into()].iter().all(|&x| x == 0xa5), "appends");
                        // Only the producer writes the data area: its own last bytes
                        // are intact whatever the consumer did with its index (unless
                        // the producer itself filled free space it did not commit,
                        // which lies below the consumer's index).
                        if !m.data_tainted && from <= m.tail {
                            for (i, &x) in back[prefix.into()..].iter().enumerate() {
                                let at = from + i as u64;
                                if at >= m.clobbered_below {
                                    assert_eq!(x, pattern(r, at), "taken back");
                                }
                            }
                        }
                    }
                    Err(e) => {
                        assert_eq!(back.len(), usize::from(prefix), "nothing copied");
                        match m.tx_poison {
                            Some(p) => assert_eq!(e, p),
                            None => assert_eq!(
                                e,
                                RingError::OutOfRange {
                                    asked: want as usize,
                                    available: cap
                                }
                            ),
                        }
                    }
                }
            }
            // Consumer: copying read into n bytes.
            9 => {
                let n = usize::from(inp.u16()) % (2 * cap + 1);
                match rx.read(&mut buf[..n]) {
                    Ok(k) => {
                        assert!(m.rx_poison.is_none());
                        assert!(k <= n && k <= cap, "read {k} into {n}, capacity {cap}");
                        if m.exact() {
                            assert_eq!(k, n.min(m.queued()), "read count");
                        }
                        check_bytes(m, r, m.head, &buf[..k]);
                        m.head = m.head.wrapping_add(k as u64);
                        m.rx_published |= k > 0;
                    }
                    Err(e) => rx_failed(m, e, shm.tail(r), shm.head(r)),
                }
            }
            // Consumer: zero-copy read, consume k.
            10 => {
                let k = usize::from(inp.u16()) % (2 * cap + 1);
                let total = match rx.read_slices() {
                    Ok((a, b)) => {
                        assert!(m.rx_poison.is_none());
                        let total = a.len() + b.len();
                        assert!(total <= cap, "{total} bytes of slices, capacity {cap}");
                        if m.exact() {
                            assert_eq!(total.min(1), m.queued().min(1), "bytes are ready");
                            assert!(total <= m.queued(), "{total} ready of {}", m.queued());
                        }
                        check_bytes(m, r, m.head, a);
                        check_bytes(m, r, m.head.wrapping_add(a.len() as u64), b);
                        Some(total)
                    }
                    Err(e) => {
                        rx_failed(m, e, shm.tail(r), shm.head(r));
                        None
                    }
                };
                if let Some(total) = total {
                    match rx.consume(k) {
                        Ok(n) => {
                            let k = n;
                            assert!(k <= total, "consumed {k} of {total}");
                            m.head = m.head.wrapping_add(k as u64);
                            m.rx_published |= k > 0;
                        }
                        Err(RingError::OutOfRange { asked, available }) => {
                            assert_eq!((asked, available), (k, total))
                        }
                        // Its publishing swap found the head scribbled.
                        Err(e) => rx_failed(m, e, shm.tail(r), shm.head(r)),
                    }
                }
            }
            11 | 12 => {
                let refresh = (op >> 1) % 20 == 12;
                let res = if refresh {
                    rx.refresh()
                } else {
                    rx.available()
                };
                match res {
                    Ok(v) => {
                        assert!(m.rx_poison.is_none());
                        assert!(v <= cap);
                        if m.exact() && refresh {
                            assert_eq!(v, m.queued(), "refreshed");
                        } else if m.exact() {
                            // The cached tail may be old, but never hides everything.
                            assert_eq!(v.min(1), m.queued().min(1), "bytes are ready");
                            assert!(v <= m.queued(), "{v} available of {}", m.queued());
                        }
                    }
                    Err(e) => rx_failed(m, e, shm.tail(r), shm.head(r)),
                }
            }
            13 => {
                let wc = shm.writer_closed(r);
                match rx.is_finished() {
                    Ok(fin) => {
                        assert!(m.rx_poison.is_none());
                        if m.exact() {
                            assert_eq!(fin, wc && m.queued() == 0, "is_finished");
                        }
                    }
                    Err(e) => rx_failed(m, e, shm.tail(r), shm.head(r)),
                }
            }
            14 => {
                let wc = shm.writer_closed(r);
                match rx.prepare_sleep() {
                    Ok(sleep) => {
                        assert!(m.rx_poison.is_none());
                        if m.exact() {
                            assert_eq!(sleep, !wc && m.queued() == 0, "consumer sleeps");
                        }
                        assert_eq!(shm.reader_sleep(r), u32::from(sleep), "reader_sleep");
                    }
                    Err(e) => {
                        rx_failed(m, e, shm.tail(r), shm.head(r));
                        assert_eq!(shm.reader_sleep(r), 1, "announced");
                    }
                }
            }
            15 => {
                rx.finish_sleep();
                assert_eq!(shm.reader_sleep(r), 0);
            }
            16 => {
                let want = m.rx_published && shm.writer_sleep(r) == 1;
                assert_eq!(rx.needs_wake(), want, "consumer needs_wake");
                m.rx_published = false;
                if want {
                    assert_eq!(shm.writer_sleep(r), 0);
                }
            }
            17 => {
                rx.close();
                m.rx_published = true;
                assert!(shm.reader_closed(r));
                assert!(tx.is_reader_closed());
            }
            // A peer writes any word of the header.
            18 => {
                let off = 8 * (usize::from(inp.u16()) % (HEADER_LEN / 8));
                let v = match inp.u8() % 4 {
                    0 => inp.u64(),
                    1 => shm
                        .current(off)
                        .wrapping_add(i64::from(inp.u16() as i16) as u64),
                    2 => u64::from(inp.u8() % 4) | u64::from(inp.u8() % 4) << 32,
                    _ => 0,
                };
                shm.scribble(off, v);
                for (ring, model) in models.iter_mut().enumerate() {
                    if off == tail_off(ring) || off == head_off(ring) {
                        model.ctl_tainted = true;
                    }
                }
            }
            // A peer writes a byte of a data area.
            _ => {
                let off = layout.ring_offset[r] + usize::from(inp.u16()) % cap;
                shm.scribble_data(off, inp.u8());
                m.data_tainted = true;
            }
        }
        // After every operation, for both rings.
        for r in 0..2 {
            let (tx, rx, m) = (&txs[r], &rxs[r], &models[r]);
            assert_eq!(tx.position(), m.tail, "producer position");
            assert_eq!(rx.position(), m.head, "consumer position");
            assert_eq!((tx.capacity(), rx.capacity()), (cap, cap));
            assert_eq!(tx.is_reader_closed(), shm.reader_closed(r));
            if m.exact() {
                assert!(m.queued() <= cap, "model: {} queued", m.queued());
                assert_eq!(shm.tail(r), m.tail, "shared tail");
                assert_eq!(shm.head(r), m.head, "shared head");
                // So `take_back` from an honest consumer's position is always intact.
                assert!(m.clobbered_below <= m.head, "free space above the head");
                assert!(m.tx_poison.is_none() && m.rx_poison.is_none());
            }
        }
    }
});
