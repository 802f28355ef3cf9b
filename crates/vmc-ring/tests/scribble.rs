//! A hostile or buggy peer: random writes into the shared header and data areas
//! while both ends stream, and deterministic bad indices, one field at a time.
//!
//! What must hold whatever the peer writes: no panic, no call that does not return,
//! no endless loop; a damaged ring ends with `RingError::Corrupt` (naming the field)
//! or `RingError::ReaderClosed`, and stays failed; the other ring is unaffected.
//! Bytes may arrive damaged (the peer owns them), so contents are not checked
//! under scribbling.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use vmc_ring::heap::AlignedBlock;
use vmc_ring::layout::{ChannelLayout, WakeKind, HEADER_LEN};
use vmc_ring::{Endpoint, RingError};

/// Offsets in the header, as pinned by the const assertions in `src/layout.rs`:
/// ring `r`'s control block is at `384 + 384 * r`, its tail at +0, head at +128,
/// and its four `u32` state words at +256.
const fn ring_ctl(r: usize) -> usize {
    384 + 384 * r
}
const fn tail_off(r: usize) -> usize {
    ring_ctl(r)
}
const fn head_off(r: usize) -> usize {
    ring_ctl(r) + 128
}

/// 8-byte slots of the header that hold two `u32` fields (identity version and
/// header_len, the side blocks' state/pid and wake_kind, each ring's sleep words and
/// close flags). They are written as two `AtomicU32`s so that no access mixes sizes
/// with the ring's own `u32` atomics; every other slot is an `AtomicU64` or padding.
const U32_PAIRS: [usize; 9] = [8, 128, 136, 256, 264, 640, 648, 1024, 1032];

/// xorshift64*: a tiny deterministic generator (the seed is printed for replay).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    let s = std::env::var("SCRIBBLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("scribble seed {s} (set SCRIBBLE_SEED to replay)");
    s
}

/// A fresh channel in a heap block: the block, the creator's end, the attacher's.
fn channel(cap: usize) -> (Arc<AlignedBlock>, ChannelLayout, Endpoint, Endpoint) {
    let layout = ChannelLayout::for_capacity(cap).unwrap();
    let len = layout.segment_len;
    let mem = Arc::new(AlignedBlock::zeroed(len));
    // SAFETY: `mem` is a page-aligned block of `len` bytes kept alive by the owner.
    let a =
        unsafe { Endpoint::create(mem.ptr(), len, mem.clone(), cap, 1, WakeKind::Poll) }.unwrap();
    // SAFETY: as above.
    let b = unsafe { Endpoint::attach(mem.ptr(), len, mem.clone(), 2, WakeKind::Poll) }.unwrap();
    (mem, layout, a, b)
}

/// The 64-bit word at `off` in the block, as an atomic.
fn word64(mem: &AlignedBlock, off: usize) -> &AtomicU64 {
    assert!(off % 8 == 0 && off + 8 <= mem.len());
    // SAFETY: the block is page aligned and `off` is 8-aligned and in bounds, so the
    // address is valid and aligned for an AtomicU64 for as long as `mem` lives. Every
    // byte of the header lies inside an atomic (the layout has no padding, see
    // `layout::Line`), and this word is only ever accessed atomically with this size
    // (see `U32_PAIRS` for the rest).
    // In a data area the ring copies bytes non-atomically: that is exactly what a
    // peer process writing the shared mapping does, and the ring is built to
    // tolerate it (it never trusts or re-reads a data byte for control purposes).
    unsafe { &*(mem.ptr().as_ptr().add(off) as *const AtomicU64) }
}

/// The 32-bit word at `off` (4-aligned) in the block, as an atomic.
fn word32(mem: &AlignedBlock, off: usize) -> &AtomicU32 {
    assert!(off % 4 == 0 && off + 4 <= HEADER_LEN);
    // SAFETY: as in `word64`; these are the header's `u32` atomics, accessed with the
    // same size as the ring's own accesses.
    unsafe { &*(mem.ptr().as_ptr().add(off) as *const AtomicU32) }
}

/// Writes `v` at the 8-aligned header offset `off` the way a peer could.
fn scribble_header(mem: &AlignedBlock, off: usize, v: u64) {
    if U32_PAIRS.contains(&off) {
        word32(mem, off).store(v as u32, Ordering::Relaxed);
        word32(mem, off + 4).store((v >> 32) as u32, Ordering::Relaxed);
    } else {
        word64(mem, off).store(v, Ordering::Relaxed);
    }
}

/// How one half of a direction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Producer: sent everything and closed. Consumer: saw EOF.
    Done,
    /// Failed with this error (which must then be sticky).
    Failed(RingError),
    /// Still waiting when told to stop (the scribbles left the ring stuck, e.g. a
    /// close flag wiped): allowed, as long as every call returned.
    Stalled,
}

/// What one endpoint's thread saw, as producer of its tx ring and consumer of its rx.
#[derive(Debug)]
struct Report {
    tx: End,
    rx: End,
    sent: usize,
    received: Vec<u8>,
    slowest_call: Duration,
}

fn allowed(e: RingError) -> bool {
    matches!(
        e,
        RingError::ReaderClosed
            | RingError::Corrupt {
                field: "tail" | "head",
                ..
            }
    )
}

/// Runs one endpoint: writes `data` into its tx ring and reads its rx ring until both
/// are over (or `stop`), alternating copying and zero-copy calls, timing every call.
fn run_end(mut ep: Endpoint, data: Arc<Vec<u8>>, chunk: usize, stop: Arc<AtomicBool>) -> Report {
    let mut r = Report {
        tx: End::Stalled,
        rx: End::Stalled,
        sent: 0,
        received: Vec::new(),
        slowest_call: Duration::ZERO,
    };
    let (mut tx_on, mut rx_on) = (true, true);
    let mut buf = vec![0u8; chunk];
    let mut i = 0u64;
    let mut idle = 0u32;
    while (tx_on || rx_on) && !stop.load(Ordering::Relaxed) {
        i += 1;
        let mut progress = false;
        if tx_on {
            let t = Instant::now();
            let end = (r.sent + chunk).min(data.len());
            let res = if i % 2 == 0 {
                ep.tx.write(&data[r.sent..end])
            } else {
                match ep.tx.write_slices(end - r.sent) {
                    Ok((a, b)) => {
                        let k = (a.len() + b.len()).min(end - r.sent);
                        let first = k.min(a.len());
                        a[..first].copy_from_slice(&data[r.sent..r.sent + first]);
                        b[..k - first].copy_from_slice(&data[r.sent + first..r.sent + k]);
                        ep.tx.commit(k).map(|()| k)
                    }
                    Err(e) => Err(e),
                }
            };
            r.slowest_call = r.slowest_call.max(t.elapsed());
            match res {
                Ok(n) => {
                    r.sent += n;
                    progress |= n > 0;
                    if r.sent == data.len() {
                        ep.tx.close();
                        (r.tx, tx_on) = (End::Done, false);
                    }
                }
                Err(e) => {
                    assert!(allowed(e), "producer: unexpected error {e:?}");
                    if e != RingError::ReaderClosed {
                        assert_eq!(ep.tx.write(b"x"), Err(e), "producer error not sticky");
                    }
                    ep.tx.close();
                    (r.tx, tx_on) = (End::Failed(e), false);
                }
            }
        }
        if rx_on {
            let t = Instant::now();
            let res = if i % 3 == 0 {
                ep.rx
                    .read_slices()
                    .map(|(a, b)| {
                        let k = (a.len() + b.len()).min(chunk);
                        let first = k.min(a.len());
                        let mut copy = a[..first].to_vec();
                        copy.extend_from_slice(&b[..k - first]);
                        copy
                    })
                    .and_then(|copy| {
                        // (A scribbled revoke mark consumes nothing.)
                        let n = ep.rx.consume(copy.len())?;
                        r.received.extend_from_slice(&copy[..n]);
                        Ok(n)
                    })
            } else {
                ep.rx
                    .read(&mut buf)
                    .inspect(|&n| r.received.extend_from_slice(&buf[..n]))
            };
            let res = res.and_then(|n| {
                if n == 0 {
                    ep.rx.is_finished().map(|f| (n, f))
                } else {
                    Ok((n, false))
                }
            });
            r.slowest_call = r.slowest_call.max(t.elapsed());
            match res {
                Ok((n, finished)) => {
                    progress |= n > 0;
                    if finished {
                        ep.rx.close();
                        (r.rx, rx_on) = (End::Done, false);
                    }
                }
                Err(e) => {
                    assert!(allowed(e), "consumer: unexpected error {e:?}");
                    assert_eq!(ep.rx.read(&mut buf), Err(e), "consumer error not sticky");
                    assert_eq!(ep.rx.available(), Err(e));
                    ep.rx.close();
                    (r.rx, rx_on) = (End::Failed(e), false);
                }
            }
        }
        if progress {
            idle = 0;
        } else {
            idle += 1;
            if idle < 64 {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
    }
    r
}

/// One round: both ends stream `total` bytes each way through rings of `cap` bytes
/// while `scribble` runs on a third thread until both ends are over (at most
/// `scribble_for`). Ends still waiting 300 ms after the scribbler stopped are told to
/// stop; a thread that does not come back within 10 s more is a hang.
fn round<S>(
    cap: usize,
    total: usize,
    chunk: usize,
    scribble_for: Duration,
    scribble: S,
) -> (Report, Report)
where
    S: FnMut(&AlignedBlock, &ChannelLayout) + Send + 'static,
{
    let (mem, layout, a, b) = channel(cap);
    let data_a = Arc::new((0..total).map(|i| (i * 7 + 1) as u8).collect::<Vec<_>>());
    let data_b = Arc::new((0..total).map(|i| (i * 13 + 5) as u8).collect::<Vec<_>>());
    let stop = Arc::new(AtomicBool::new(false));
    let ends_over = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel();
    for (name, ep, data) in [("creator", a, data_a), ("attacher", b, data_b)] {
        let (stop, done_tx) = (stop.clone(), done_tx.clone());
        thread::spawn(move || {
            let r = run_end(ep, data, chunk, stop);
            done_tx.send((name, r)).unwrap();
        });
    }
    let scribbler = {
        let (mem, ends_over) = (mem.clone(), ends_over.clone());
        let mut scribble = scribble;
        thread::spawn(move || {
            let until = Instant::now() + scribble_for;
            while !ends_over.load(Ordering::Relaxed) && Instant::now() < until {
                scribble(&mem, &layout);
            }
        })
    };
    let mut reports = Vec::new();
    let hard = Instant::now() + scribble_for + Duration::from_secs(10);
    let mut stop_at = None;
    while reports.len() < 2 {
        match done_rx.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => reports.push(r),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("an end thread died: {e}"),
        }
        if scribbler.is_finished() && stop_at.is_none() {
            stop_at = Some(Instant::now() + Duration::from_millis(300));
        }
        if stop_at.is_some_and(|t| Instant::now() > t) {
            stop.store(true, Ordering::Relaxed);
        }
        assert!(Instant::now() < hard, "an end is stuck inside a ring call");
    }
    ends_over.store(true, Ordering::Relaxed);
    scribbler.join().expect("scribbler panicked");
    reports.sort_by_key(|(name, _)| *name == "attacher");
    let [(_, ra), (_, rb)]: [(&str, Report); 2] = reports.try_into().unwrap();
    for r in [&ra, &rb] {
        assert!(
            r.slowest_call < Duration::from_secs(2),
            "a ring call took {:?}",
            r.slowest_call
        );
    }
    (ra, rb)
}

/// Random 64-bit values at random 8-aligned header offsets (half of them in the two
/// ring control blocks, where they matter), as raw values, small moves of the value
/// already there, or 0/1 (close flags, sleep words), while both ends stream.
#[test]
fn header_scribbles_end_in_errors_never_in_crashes_or_hangs() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let budget = Instant::now() + Duration::from_millis(1500);
    let (mut rounds, mut errors, mut stalls, mut completed) = (0, 0, 0, 0);
    let mut fields = std::collections::BTreeMap::<String, usize>::new();
    while Instant::now() < budget || rounds < 4 {
        rounds += 1;
        let cap = 16 << (4 * rng.below(4)); // 16, 256, 4 KiB, 64 KiB
        let total = 32 * 1024 + rng.below(96 * 1024) as usize;
        let chunk = 1 + rng.below(3 * cap as u64) as usize;
        // Pause between scribbles: none (storm) up to ~a few thousand spins.
        let pause = [0, 10, 100, 1_000, 10_000][rng.below(5) as usize];
        let mut srng = Rng::new(rng.next());
        let (ra, rb) = round(
            cap,
            total,
            chunk,
            Duration::from_millis(300),
            move |mem, _| {
                let off = if srng.below(2) == 0 {
                    ring_ctl(0) + 8 * srng.below(2 * 384 / 8) as usize
                } else {
                    8 * srng.below(HEADER_LEN as u64 / 8) as usize
                };
                let v = if U32_PAIRS.contains(&off) {
                    // Two u32 fields: small values (states, flags, sleep words) or noise.
                    match srng.below(3) {
                        0 => srng.next(),
                        _ => srng.below(4) | srng.below(4) << 32,
                    }
                } else {
                    match srng.below(4) {
                        0 => srng.next(),
                        // A plausible index: within a ring or so of the current value.
                        1 => word64(mem, off)
                            .load(Ordering::Relaxed)
                            .wrapping_add(srng.below(2 * cap as u64 + 2))
                            .wrapping_sub(cap as u64 + 1),
                        2 => srng.below(2),
                        _ => srng.next() & 0xffff,
                    }
                };
                scribble_header(mem, off, v);
                for _ in 0..pause {
                    std::hint::spin_loop();
                }
            },
        );
        for end in [ra.tx, ra.rx, rb.tx, rb.rx] {
            match end {
                End::Done => completed += 1,
                End::Stalled => stalls += 1,
                End::Failed(e) => {
                    errors += 1;
                    let k = match e {
                        RingError::Corrupt { field, .. } => field.to_string(),
                        e => format!("{e:?}"),
                    };
                    *fields.entry(k).or_default() += 1;
                }
            }
        }
    }
    eprintln!(
        "{rounds} rounds: {completed} ends done, {errors} failed {fields:?}, {stalls} stalled"
    );
    assert!(
        errors > 0,
        "the scribbles never broke anything: scribbler ineffective"
    );
}

/// Random bytes into both data areas while both ends stream: the indices are intact,
/// so both directions must complete with the right byte counts and EOF (the bytes
/// themselves may be damaged).
#[test]
fn data_scribbles_damage_bytes_only() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let budget = Instant::now() + Duration::from_millis(1000);
    let mut rounds = 0;
    let mut damaged = 0;
    while Instant::now() < budget || rounds < 3 {
        rounds += 1;
        let cap = 16 << (4 * rng.below(4));
        let total = 64 * 1024 + rng.below(64 * 1024) as usize;
        let chunk = 1 + rng.below(3 * cap as u64) as usize;
        let mut srng = Rng::new(rng.next());
        let (ra, rb) = round(cap, total, chunk, Duration::from_secs(30), move |mem, l| {
            let ring = srng.below(2) as usize;
            let off = l.ring_offset[ring] + 8 * srng.below(l.capacity as u64 / 8) as usize;
            word64(mem, off).store(srng.next(), Ordering::Relaxed);
        });
        for (r, other) in [(&ra, &rb), (&rb, &ra)] {
            assert_eq!(r.tx, End::Done, "producer");
            assert_eq!(r.sent, total);
            assert_eq!(other.rx, End::Done, "consumer");
            assert_eq!(other.received.len(), total, "byte count");
        }
        let clean_a: Vec<u8> = (0..total).map(|i| (i * 7 + 1) as u8).collect();
        damaged += (rb.received != clean_a) as usize;
    }
    eprintln!("{rounds} rounds, {damaged} with damaged bytes (expected: most)");
}

/// The harness itself, with no scribbler: everything arrives intact.
#[test]
fn without_scribbles_everything_arrives() {
    for cap in [16, 4096] {
        // The "scribbler" only sleeps; the 30 s window just keeps the 300 ms stall
        // grace from starting before the ends are done.
        let (ra, rb) = round(cap, 100_000, 777, Duration::from_secs(30), |_, _| {
            thread::sleep(Duration::from_millis(1))
        });
        assert_eq!(
            (ra.tx, ra.rx, rb.tx, rb.rx),
            (End::Done, End::Done, End::Done, End::Done)
        );
        let want_a: Vec<u8> = (0..100_000).map(|i| (i * 7 + 1) as u8).collect();
        let want_b: Vec<u8> = (0..100_000).map(|i| (i * 13 + 5) as u8).collect();
        assert!(rb.received == want_a && ra.received == want_b);
    }
}

/// The victim ring `r`'s producer and consumer, and the other ring's, of a channel.
struct Rings {
    mem: Arc<AlignedBlock>,
    a: Endpoint,
    b: Endpoint,
    r: usize,
}

impl Rings {
    fn new(r: usize) -> Rings {
        let (mem, _, a, b) = channel(16);
        Rings { mem, a, b, r }
    }
    /// (victim producer, victim consumer)
    fn victim(&mut self) -> (&mut vmc_ring::Producer, &mut vmc_ring::Consumer) {
        if self.r == 0 {
            (&mut self.a.tx, &mut self.b.rx)
        } else {
            (&mut self.b.tx, &mut self.a.rx)
        }
    }
    fn set(&self, off: usize, v: u64) {
        word64(&self.mem, off).store(v, Ordering::Relaxed);
    }
    /// The other ring carries data both ways round, before and after the damage.
    fn other_ring_works(&mut self) {
        let (tx, rx) = if self.r == 0 {
            (&mut self.b.tx, &mut self.a.rx)
        } else {
            (&mut self.a.tx, &mut self.b.rx)
        };
        let mut buf = [0u8; 16];
        for msg in [&b"still"[..], b" alive, and wrapping"] {
            let mut sent = 0;
            let mut got = Vec::new();
            while got.len() < msg.len() {
                sent += tx.write(&msg[sent..]).unwrap();
                let n = rx.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, msg);
        }
    }
}

fn assert_corrupt(e: RingError, field: &str, value: u64) {
    assert!(
        matches!(e, RingError::Corrupt { field: f, value: v } if f == field && v == value),
        "expected Corrupt {{ field: {field}, value: {value} }}, got {e:?}"
    );
}

/// The consumer is poisoned for good: every call returns `e`.
fn consumer_stays_failed(rx: &mut vmc_ring::Consumer, e: RingError) {
    assert_eq!(rx.read(&mut [0; 4]), Err(e));
    assert_eq!(rx.available(), Err(e));
    assert_eq!(rx.refresh(), Err(e));
    assert_eq!(rx.read_slices().map(|_| ()), Err(e));
    assert_eq!(rx.consume(0), Err(e));
    assert_eq!(rx.is_finished(), Err(e));
    assert_eq!(rx.prepare_sleep(), Err(e));
}

/// The producer is poisoned for good: every call returns `e`.
fn producer_stays_failed(tx: &mut vmc_ring::Producer, e: RingError) {
    assert_eq!(tx.write(&[0; 4]), Err(e));
    assert_eq!(tx.free(), Err(e));
    assert_eq!(tx.write_slices(1).map(|_| ()), Err(e));
    assert_eq!(tx.commit(0), Err(e));
    assert_eq!(tx.prepare_sleep(), Err(e));
}

#[test]
fn a_tail_more_than_a_ring_ahead_is_corrupt() {
    for r in 0..2 {
        let mut c = Rings::new(r);
        c.other_ring_works();
        let (tx, rx) = c.victim();
        assert_eq!(tx.write(&[9; 4]).unwrap(), 4);
        assert_eq!(rx.read(&mut [0; 2]).unwrap(), 2); // head 2, cached tail 4
        assert_eq!(rx.read(&mut [0; 2]).unwrap(), 2); // drained: next read reloads
                                                      // Head 4: valid tails are 4..=20 (head + capacity).
        c.set(tail_off(r), 21);
        let (_, rx) = c.victim();
        let e = rx.read(&mut [0; 4]).unwrap_err();
        assert_corrupt(e, "tail", 21);
        consumer_stays_failed(rx, e);
        c.other_ring_works();
    }
}

#[test]
fn a_tail_at_exactly_a_ring_ahead_is_accepted() {
    let mut c = Rings::new(0);
    let (tx, rx) = c.victim();
    assert_eq!(tx.write(&[9; 4]).unwrap(), 4);
    assert_eq!(rx.read(&mut [0; 4]).unwrap(), 4);
    c.set(tail_off(0), 4 + 16);
    let (_, rx) = c.victim();
    assert_eq!(
        rx.read(&mut [0; 32]).unwrap(),
        16,
        "a full ring of (garbage) bytes"
    );
}

#[test]
fn a_tail_going_backwards_is_corrupt() {
    for (r, bad) in [(0, 6), (1, 6), (0, 3), (1, 0)] {
        let mut c = Rings::new(r);
        let (tx, rx) = c.victim();
        assert_eq!(tx.write(&[9; 10]).unwrap(), 10);
        assert_eq!(rx.read(&mut [0; 4]).unwrap(), 4); // head 4, cached tail 10
                                                      // 6: behind the cached tail; 3 and 0: behind the head too.
        c.set(tail_off(r), bad);
        let (_, rx) = c.victim();
        let e = rx.refresh().unwrap_err();
        assert_corrupt(e, "tail", bad);
        consumer_stays_failed(rx, e);
        c.other_ring_works();
    }
}

#[test]
fn a_head_past_the_tail_is_corrupt() {
    for (r, bad) in [(0, 17), (1, 17), (0, u64::MAX), (1, 1 << 40)] {
        let mut c = Rings::new(r);
        let (tx, _) = c.victim();
        assert_eq!(tx.write(&[9; 16]).unwrap(), 16); // full: the next write reloads
        c.set(head_off(r), bad);
        let (tx, _) = c.victim();
        let e = tx.write(&[1]).unwrap_err();
        assert_corrupt(e, "head", bad);
        producer_stays_failed(tx, e);
        c.other_ring_works();
    }
}

#[test]
fn a_head_going_backwards_is_corrupt() {
    for r in 0..2 {
        let mut c = Rings::new(r);
        let (tx, rx) = c.victim();
        assert_eq!(tx.write(&[9; 8]).unwrap(), 8);
        assert_eq!(rx.read(&mut [0; 8]).unwrap(), 8);
        assert_eq!(tx.write(&[9; 4]).unwrap(), 4);
        assert_eq!(tx.free().unwrap(), 12); // cached head 8
        c.set(head_off(r), 2);
        let (tx, _) = c.victim();
        let e = tx.free().unwrap_err();
        assert_corrupt(e, "head", 2);
        producer_stays_failed(tx, e);
        c.other_ring_works();
    }
}

/// A wiped or forged close flag is the peer's prerogative: it ends or stalls the
/// stream, nothing worse. A forged `reader_closed` fails the producer's writes.
#[test]
fn forged_close_flags_only_end_the_stream() {
    for r in 0..2 {
        let mut c = Rings::new(r);
        let state = ring_ctl(r) + 256;
        // writer_closed (+8) forged: the consumer sees EOF once the ring is empty.
        let (tx, _) = c.victim();
        assert_eq!(tx.write(b"abc").unwrap(), 3);
        word32(&c.mem, state + 8).store(1, Ordering::Relaxed);
        let (_, rx) = c.victim();
        assert!(!rx.is_finished().unwrap(), "bytes still in the ring");
        assert_eq!(rx.read(&mut [0; 8]).unwrap(), 3);
        assert!(rx.is_finished().unwrap());
        // reader_closed (+12) forged: writes fail with ReaderClosed.
        word32(&c.mem, state + 12).store(7, Ordering::Relaxed);
        let (tx, _) = c.victim();
        assert_eq!(tx.write(b"x"), Err(RingError::ReaderClosed));
        assert!(tx.is_reader_closed());
        c.other_ring_works();
    }
}

/// For Miri, which checks every access for data races and aliasing violations: a
/// producer and a consumer make a few hundred calls while a third thread scribbles
/// over the header words a peer can reach (indices, close flags, sleep words,
/// identity, padding). Nothing here is timed, so the interpreter's slowness only
/// makes it slow; every call must return (bytes or an error), and no reference the
/// ring makes into the header may race with the scribbles. (Run with
/// `cargo +nightly miri test -p vmc-ring --test scribble miri_`.)
///
/// The consumers' heads are left alone here: a forged head the producer accepts
/// lets it overwrite bytes the honest consumer copied, with no synchronisation
/// between the two (the consumer, poisoned by the forgery its swap finds, publishes
/// nothing more), which Miri rightly reports as a race on the data area. That is
/// the one thing a hostile peer can do to the bytes (change them), never to where
/// they are copied; forged heads are covered by the other tests and the fuzzer.
#[test]
fn miri_header_scribbles_race_with_no_reference() {
    const CALLS: usize = 300;
    let (mem, _layout, a, b) = channel(16);
    let scribbler = {
        let mem = mem.clone();
        let mut rng = Rng::new(seed());
        thread::spawn(move || {
            for _ in 0..CALLS {
                let off = 8 * rng.below(1152 / 8) as usize;
                if off == head_off(0) || off == head_off(1) {
                    continue;
                }
                scribble_header(&mem, off, rng.next() % 64);
            }
        })
    };
    let producer = thread::spawn(move || {
        let mut tx = a.tx;
        for i in 0..CALLS {
            let _ = tx.write(&[i as u8; 5]);
        }
    });
    let consumer = thread::spawn(move || {
        let mut rx = b.rx;
        let mut buf = [0u8; 7];
        for _ in 0..CALLS {
            let _ = rx.read(&mut buf);
        }
    });
    scribbler.join().unwrap();
    producer.join().unwrap();
    consumer.join().unwrap();
}
