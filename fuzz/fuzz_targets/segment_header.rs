//! The checks of a shared segment that a peer laid out (or named).
//!
//! The input is a mapping length and the bytes of a channel header as a hostile
//! creator could leave them, then a directory segment name as a peer could send it.
//! What must hold:
//! - `ChannelLayout::parse` returns `Ok` exactly when every identity field is what
//!   `ChannelLayout::for_capacity` computes for the advertised capacity and the
//!   segment fits the mapping; otherwise the error names the first field that is
//!   not (the order of the code's own checks), never a panic;
//! - `Endpoint::attach` accepts exactly what `parse` accepts, on a vacant attacher
//!   side, and an accepted layout really lies inside the mapping: both rings are then
//!   filled, drained and taken back in full (under AddressSanitizer, so one byte past
//!   the block is a crash);
//! - a header `Endpoint::create` lays out for any accepted capacity parses back to
//!   the same layout and can be attached once;
//! - `vmc_os`'s check of a segment name accepts exactly `chan-` followed by 1 to 195
//!   ASCII letters, digits and `-` (so never a `/`, `..` or NUL).
#![no_main]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmc_fuzz::Input;
use vmc_ring::heap::AlignedBlock;
use vmc_ring::layout::{
    ChannelHeader, ChannelLayout, Side, SideState, WakeKind, HEADER_LEN, MAGIC, PAGE, VERSION,
};
use vmc_ring::{Endpoint, RingError};

const HEADER_SIZE: usize = std::mem::size_of::<ChannelHeader>();

fn word64(mem: &AlignedBlock, off: usize) -> u64 {
    // SAFETY: callers pass 8-aligned offsets inside the header of a block of at least
    // HEADER_SIZE bytes; the header is all atomics.
    unsafe { &*(mem.ptr().as_ptr().add(off) as *const AtomicU64) }.load(Ordering::Relaxed)
}

fn word32(mem: &AlignedBlock, off: usize) -> u32 {
    // SAFETY: as in `word64`, 4-aligned.
    unsafe { &*(mem.ptr().as_ptr().add(off) as *const AtomicU32) }.load(Ordering::Relaxed)
}

/// What `ChannelLayout::parse` must answer, computed from the spec in its docs.
fn expected(mem: &AlignedBlock, available: usize) -> Result<ChannelLayout, RingError> {
    let corrupt = |field, value| RingError::Corrupt { field, value };
    let magic = word64(mem, 0);
    if magic != MAGIC {
        return Err(corrupt("magic", magic));
    }
    let version = word32(mem, 8);
    if version != VERSION {
        return Err(RingError::UnsupportedVersion(version));
    }
    let header_len = word32(mem, 12);
    if header_len as usize != HEADER_LEN {
        return Err(corrupt("header_len", header_len.into()));
    }
    let cap = word64(mem, 16);
    let ok_cap = cap.is_power_of_two() && (16..=1 << 30).contains(&cap);
    if !ok_cap {
        return Err(RingError::BadCapacity(cap));
    }
    let ring_bytes = (cap as usize).div_ceil(PAGE) * PAGE;
    let offsets = [HEADER_LEN, HEADER_LEN + ring_bytes];
    for (i, name) in ["ring_offset[0]", "ring_offset[1]"].into_iter().enumerate() {
        let off = word64(mem, 24 + 8 * i);
        if off != offsets[i] as u64 {
            return Err(corrupt(name, off));
        }
    }
    let segment_len = offsets[1] + ring_bytes;
    let len = word64(mem, 40);
    if len != segment_len as u64 || segment_len > available {
        return Err(corrupt("segment_len", len));
    }
    Ok(ChannelLayout {
        capacity: cap as usize,
        ring_offset: offsets,
        segment_len,
    })
}

/// Every byte of both rings of an attached endpoint, written, read and taken back.
fn exercise(ep: &mut Endpoint, layout: &ChannelLayout) {
    let cap = layout.capacity;
    let data: Vec<u8> = (0..cap).map(|i| (i * 7 + 3) as u8).collect();
    // The attacher produces into ring 1 and consumes ring 0; the creator's indices
    // in a hostile header may already poison either.
    if let Ok(n) = ep.tx.write(&data) {
        assert!(n <= cap);
        let mut back = Vec::new();
        ep.tx
            .take_back(ep.tx.position().wrapping_sub(n as u64), &mut back)
            .unwrap();
        assert_eq!(back, data[..n]);
    }
    if let Ok((a, b)) = ep.tx.write_slices(cap) {
        assert!(a.len() + b.len() <= cap);
        a.fill(1);
        b.fill(2);
    }
    let mut buf = vec![0u8; cap];
    if let Ok(n) = ep.rx.read(&mut buf) {
        assert!(n <= cap);
    }
    if let Ok((a, b)) = ep.rx.read_slices() {
        assert!(a.len() + b.len() <= cap);
        let _ = (a.iter().map(|&x| x as usize).sum::<usize>(), b.last());
    }
    let _ = (ep.rx.is_finished(), ep.tx.free(), ep.rx.prepare_sleep());
    let h = &ep.header;
    assert_eq!(h.layout(), *layout);
    assert_eq!(h.side(), Side::Attacher);
    let _ = (h.peer_state(), h.header().side_wake_kind(Side::Creator));
    let _ = h.header().side_pid(Side::Creator);
}

fn chan_name_spec(name: &str) -> bool {
    name.strip_prefix("chan-").is_some_and(|rest| {
        !rest.is_empty()
            && name.len() <= 200
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let pages = usize::from(inp.u8() % 34);
    let extra = usize::from(inp.u16()) % PAGE;
    let flags = inp.u8();
    let wake = WakeKind::from_u32(u32::from(inp.u8() % 4)).unwrap_or(WakeKind::Poll);
    let header = inp.bytes(HEADER_SIZE);
    let name = inp.rest();

    if let Ok(name) = std::str::from_utf8(name) {
        let ok = vmc_os::fuzzing::validate_chan_name(name).is_ok();
        assert_eq!(ok, chan_name_spec(name), "name {name:?}");
        if ok {
            assert!(!name.contains('/') && !name.contains('\0') && !name.contains(".."));
        }
    }

    let len = (pages * PAGE + if flags & 1 != 0 { extra } else { 0 }).max(1);
    let mem = Arc::new(AlignedBlock::zeroed(len));
    let n = header.len().min(len);
    // SAFETY: `n` bytes fit in the block, which nothing else uses yet.
    unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), mem.ptr().as_ptr(), n) };

    if flags & 2 != 0 {
        // A creator laying out a channel in this block: whatever capacity it asks
        // for, what it writes must parse back and attach once.
        let cap = 1usize << (inp_cap_shift(header) % 32);
        // SAFETY: the block is page aligned, `len` bytes, kept alive by the owner.
        let created = unsafe { Endpoint::create(mem.ptr(), len, mem.clone(), cap, 7, wake) };
        match ChannelLayout::for_capacity(cap) {
            Ok(l) if l.segment_len <= len => {
                let a = created.expect("a valid capacity in a block large enough");
                assert_eq!(a.header.layout(), l);
                // SAFETY: as above; the header lies at the start of the block.
                let parsed = ChannelLayout::parse(unsafe { &*mem.ptr().cast().as_ptr() }, len);
                assert_eq!(parsed, Ok(l));
            }
            Ok(_) => assert!(matches!(
                created,
                Err(RingError::Corrupt {
                    field: "segment_len",
                    ..
                })
            )),
            Err(e) => assert_eq!(created.err(), Some(e)),
        }
    }

    let want = (len >= HEADER_SIZE).then(|| expected(&mem, len));
    if let Some(want) = &want {
        // SAFETY: the block holds at least a whole header, page aligned; every field
        // is an atomic, so any bytes are a valid ChannelHeader.
        let h: &ChannelHeader = unsafe { &*mem.ptr().cast().as_ptr() };
        assert_eq!(&ChannelLayout::parse(h, len), want);
        let _ = (
            h.side_state(Side::Creator),
            h.side_wake_kind(Side::Attacher),
        );
    }
    let attacher_state = (len >= HEADER_SIZE).then(|| word32(&mem, 256));
    // SAFETY: the block is page aligned, `len` bytes, kept alive by the owner.
    let attached = unsafe { Endpoint::attach(mem.ptr(), len, mem.clone(), 9, wake) };
    match (attached, want) {
        (Err(e), _) if len < HEADER_LEN => assert_eq!(
            e,
            RingError::Corrupt {
                field: "segment_len",
                value: len as u64
            }
        ),
        (Ok(mut ep), Some(Ok(layout))) => {
            assert_eq!(attacher_state, Some(SideState::Vacant as u32));
            assert!(layout.segment_len <= len);
            assert_eq!(ChannelLayout::for_capacity(layout.capacity), Ok(layout));
            assert_eq!(word32(&mem, 256), SideState::Open as u32, "claimed");
            exercise(&mut ep, &layout);
        }
        (Err(RingError::AlreadyAttached(s)), Some(Ok(_))) => {
            assert_eq!(Some(s), attacher_state);
            assert_ne!(s, SideState::Vacant as u32);
        }
        (Err(e), Some(Err(want))) => assert_eq!(e, want),
        (got, want) => panic!(
            "attach gave {:?}, parse {want:?}",
            got.map(|ep| ep.header.layout())
        ),
    }
});

/// The capacity a creator asks for: from the header bytes, so that the same input
/// explores both modes.
fn inp_cap_shift(header: &[u8]) -> u32 {
    u32::from(header.get(16).copied().unwrap_or(4))
}
