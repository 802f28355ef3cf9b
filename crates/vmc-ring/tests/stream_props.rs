//! Stream integrity of the byte ring, single-threaded and threaded: whatever mix of
//! copying and zero-copy operations, of whatever sizes, the consumer gets exactly the
//! producer's bytes, in order, then EOF.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use vmc_ring::heap::ring_pair;
use vmc_ring::wait::SLEEPING;
use vmc_ring::{Consumer, Producer, RingError};

/// Byte `i` of the stream with this seed (a cheap, well-mixed hash, so any shift,
/// repetition or stale byte shows up).
fn byte_at(seed: u64, i: u64) -> u8 {
    let mut x = i.wrapping_add(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (x >> 32) as u8
}

fn stream(seed: u64, from: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| byte_at(seed, from + i)).collect()
}

/// One step of the single-threaded property. Sizes are raw numbers reduced modulo
/// something that depends on the ring's capacity or the space at hand.
#[derive(Clone, Debug)]
enum Op {
    /// Copying write of `len % (2 * cap + 1)` bytes.
    Write(usize),
    /// `write_slices(want % (2 * cap + 1))`, fill and commit `fill % (len + 1)` bytes.
    WriteSlices { want: usize, fill: usize },
    /// Copying read into a `len % (2 * cap + 1)`-byte buffer.
    Read(usize),
    /// `read_slices()`, check them, consume `take % (len + 1)` bytes.
    ReadSlices { take: usize },
    /// Reload both indices and check the invariants.
    Check,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<usize>().prop_map(Op::Write),
        3 => (any::<usize>(), any::<usize>()).prop_map(|(want, fill)| Op::WriteSlices { want, fill }),
        3 => any::<usize>().prop_map(Op::Read),
        3 => any::<usize>().prop_map(|take| Op::ReadSlices { take }),
        1 => Just(Op::Check),
    ]
}

/// The test's own account of the stream next to the ring's two ends.
struct Model {
    seed: u64,
    cap: usize,
    written: u64,
    read: u64,
    tx: Producer,
    rx: Consumer,
}

impl Model {
    fn in_flight(&self) -> usize {
        (self.written - self.read) as usize
    }

    fn check_invariants(&mut self) {
        assert_eq!(self.tx.position(), self.written, "producer position");
        assert_eq!(self.rx.position(), self.read, "consumer position");
        let avail = self.rx.refresh().unwrap();
        let free = self.tx.free().unwrap();
        assert_eq!(avail, self.in_flight(), "available after refresh");
        assert_eq!(avail + free, self.cap, "available + free == capacity");
        assert!(
            !self.tx.needs_wake() && !self.rx.needs_wake(),
            "nobody sleeps"
        );
    }

    fn apply(&mut self, op: &Op) {
        let cap = self.cap;
        match *op {
            Op::Write(len) => {
                let len = len % (2 * cap + 1);
                let src = stream(self.seed, self.written, len);
                let n = self.tx.write(&src).unwrap();
                // Copying writes reload the head when the cache shows too little.
                assert_eq!(n, len.min(cap - self.in_flight()), "write of {len}");
                self.written += n as u64;
            }
            Op::WriteSlices { want, fill } => {
                let want = want % (2 * cap + 1);
                let free = cap - self.in_flight();
                let (seed, at) = (self.seed, self.written);
                let (a, b) = self.tx.write_slices(want).unwrap();
                let len = a.len() + b.len();
                assert!(len <= free, "slices cover {len} > {free} free bytes");
                assert!(len >= want.min(free), "slices cover {len} < {want} wanted");
                assert!(b.is_empty() || at.wrapping_add(a.len() as u64) % cap as u64 == 0);
                let k = fill % (len + 1);
                let src = stream(seed, at, k);
                let first = k.min(a.len());
                a[..first].copy_from_slice(&src[..first]);
                b[..k - first].copy_from_slice(&src[first..]);
                assert_eq!(
                    self.tx.commit(len + 1),
                    Err(RingError::OutOfRange {
                        asked: len + 1,
                        available: len
                    })
                );
                self.tx.commit(k).unwrap();
                self.written += k as u64;
            }
            Op::Read(len) => {
                let len = len % (2 * cap + 1);
                let mut dst = vec![0xee; len];
                let n = self.rx.read(&mut dst).unwrap();
                assert!(n <= len.min(self.in_flight()), "read {n} of {len}");
                // A read reloads the tail when the cache is empty: never 0 for nothing.
                assert!(
                    n > 0 || len == 0 || self.in_flight() == 0,
                    "read 0 with data"
                );
                assert_eq!(dst[..n], stream(self.seed, self.read, n)[..]);
                assert!(dst[n..].iter().all(|&b| b == 0xee), "wrote past n");
                self.read += n as u64;
            }
            Op::ReadSlices { take } => {
                let in_flight = self.in_flight();
                let (seed, at) = (self.seed, self.read);
                let (a, b) = self.rx.read_slices().unwrap();
                let len = a.len() + b.len();
                assert!(len <= in_flight);
                assert!(len > 0 || in_flight == 0, "read_slices empty with data");
                assert!(b.is_empty() || at.wrapping_add(a.len() as u64) % cap as u64 == 0);
                let want = stream(seed, at, len);
                assert_eq!(a, &want[..a.len()]);
                assert_eq!(b, &want[a.len()..]);
                assert_eq!(
                    self.rx.consume(len + 1),
                    Err(RingError::OutOfRange {
                        asked: len + 1,
                        available: len
                    })
                );
                let k = take % (len + 1);
                self.rx.consume(k).unwrap();
                self.read += k as u64;
            }
            Op::Check => self.check_invariants(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any sequence of copying and zero-copy writes and reads, any sizes (up to twice
    /// the capacity), any capacity from 16 bytes to 64 KiB: the bytes come out as they
    /// went in, and the indices and free space add up after every step.
    #[test]
    fn single_threaded_stream_is_intact(
        shift in 4u32..=16,
        seed in any::<u64>(),
        ops in vec(op(), 1..120),
    ) {
        let cap = 1usize << shift;
        let (tx, rx) = ring_pair(cap);
        prop_assert_eq!(tx.capacity(), cap);
        prop_assert_eq!(rx.capacity(), cap);
        let mut m = Model { seed, cap, written: 0, read: 0, tx, rx };
        for op in &ops {
            m.apply(op);
            prop_assert!(m.in_flight() <= cap);
        }
        m.check_invariants();
        // Drain: everything written comes out, then EOF.
        m.tx.close();
        let mut rest = vec![0u8; m.in_flight()];
        let mut got = 0;
        while got < rest.len() {
            let n = m.rx.read(&mut rest[got..]).unwrap();
            prop_assert!(n > 0);
            prop_assert!(!m.rx.is_finished().unwrap() || got + n == rest.len());
            got += n;
        }
        prop_assert_eq!(&rest[..], &stream(seed, m.read, rest.len())[..]);
        prop_assert!(m.rx.is_finished().unwrap());
        prop_assert_eq!(m.rx.position(), m.written);
    }
}

/// Spins, then yields: for a side that found the ring empty or full.
struct Backoff(u32);

impl Backoff {
    fn snooze(&mut self, deadline: Instant, what: &str) {
        assert!(
            Instant::now() < deadline,
            "{what}: no progress before the deadline"
        );
        if self.0 < 64 {
            std::hint::spin_loop();
        } else {
            thread::yield_now();
        }
        self.0 += 1;
    }

    fn reset(&mut self) {
        self.0 = 0;
    }
}

const DEADLINE: Duration = Duration::from_secs(60);

/// Producer side of the threaded properties: sends `total` bytes of the stream,
/// cycling through `sizes` for the write sizes (which may exceed the ring) and
/// through copying and zero-copy writes as `zero_copy` says; then closes.
fn produce(mut tx: Producer, seed: u64, total: usize, sizes: &[usize], zero_copy: &[bool]) {
    let deadline = Instant::now() + DEADLINE;
    let data = stream(seed, 0, total);
    let mut sent = 0;
    let mut backoff = Backoff(0);
    let mut i = 0;
    while sent < total {
        let size = sizes[i % sizes.len()].min(total - sent);
        let n = if zero_copy[i % zero_copy.len()] {
            let (a, b) = tx.write_slices(size).unwrap();
            let k = (a.len() + b.len()).min(size);
            let first = k.min(a.len());
            a[..first].copy_from_slice(&data[sent..sent + first]);
            b[..k - first].copy_from_slice(&data[sent + first..sent + k]);
            tx.commit(k).unwrap();
            k
        } else {
            tx.write(&data[sent..sent + size]).unwrap()
        };
        sent += n;
        if n == 0 {
            backoff.snooze(deadline, "producer");
        } else {
            backoff.reset();
            i += 1;
        }
    }
    tx.close();
}

/// Consumer side: reads until EOF with buffers cycling through `sizes`, copying or
/// zero-copy as `zero_copy` says; checks that EOF never comes before the last byte.
/// Returns the bytes.
fn consume(mut rx: Consumer, total: usize, sizes: &[usize], zero_copy: &[bool]) -> Vec<u8> {
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::with_capacity(total);
    let mut buf = vec![0u8; sizes.iter().copied().max().unwrap()];
    let mut backoff = Backoff(0);
    let mut i = 0;
    loop {
        let size = sizes[i % sizes.len()];
        let n = if zero_copy[i % zero_copy.len()] {
            let (a, b) = rx.read_slices().unwrap();
            let k = (a.len() + b.len()).min(size);
            let first = k.min(a.len());
            out.extend_from_slice(&a[..first]);
            out.extend_from_slice(&b[..k - first]);
            rx.consume(k).unwrap();
            k
        } else {
            let n = rx.read(&mut buf[..size]).unwrap();
            out.extend_from_slice(&buf[..n]);
            n
        };
        assert!(out.len() <= total, "more bytes than were sent");
        if n > 0 {
            backoff.reset();
            i += 1;
            continue;
        }
        if rx.is_finished().unwrap() {
            assert_eq!(out.len(), total, "EOF before the last byte");
            return out;
        }
        backoff.snooze(deadline, "consumer");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// A producer and a consumer on two threads, random sizes on both sides (writes
    /// up to 3x the largest ring), copying and zero-copy mixed: the consumer gets
    /// exactly the stream, then EOF, never EOF early.
    #[test]
    fn threaded_stream_is_intact(
        shift in 4u32..=16,
        seed in any::<u64>(),
        total in 1usize..400_000,
        wsizes in vec(1usize..200_000, 1..8),
        rsizes in vec(1usize..100_000, 1..8),
        wzc in vec(any::<bool>(), 1..4),
        rzc in vec(any::<bool>(), 1..4),
    ) {
        let (tx, rx) = ring_pair(1 << shift);
        let p = thread::spawn(move || produce(tx, seed, total, &wsizes, &wzc));
        let out = consume(rx, total, &rsizes, &rzc);
        p.join().unwrap();
        prop_assert_eq!(out.len(), total);
        if let Some(i) = (0..total).find(|&i| out[i] != byte_at(seed, i as u64)) {
            prop_assert!(false, "first wrong byte at {}", i);
        }
    }

    /// EOF: the producer writes, closes, and the consumer (polling `is_finished` before
    /// every read, whatever its buffer size) sees EOF exactly once it has every byte.
    #[test]
    fn eof_arrives_only_after_every_byte(
        shift in 4u32..=8,
        seed in any::<u64>(),
        total in 0usize..2_000,
        wsize in 1usize..64,
        rsize in 1usize..64,
    ) {
        let (tx, mut rx) = ring_pair(1 << shift);
        let p = thread::spawn(move || produce(tx, seed, total, &[wsize], &[false]));
        let deadline = Instant::now() + DEADLINE;
        let mut buf = vec![0u8; rsize];
        let mut got = 0;
        let mut backoff = Backoff(0);
        while !rx.is_finished().unwrap() {
            let n = rx.read(&mut buf).unwrap();
            for (k, &b) in buf[..n].iter().enumerate() {
                prop_assert_eq!(b, byte_at(seed, (got + k) as u64));
            }
            got += n;
            if n == 0 {
                backoff.snooze(deadline, "consumer");
            }
        }
        prop_assert_eq!(got, total, "EOF before the last byte");
        prop_assert_eq!(rx.read(&mut buf).unwrap(), 0);
        prop_assert!(rx.is_finished().unwrap());
        p.join().unwrap();
    }
}

/// Single-threaded EOF: closing with bytes in the ring is not EOF yet.
#[test]
fn close_with_bytes_in_flight_is_not_eof() {
    let (mut tx, mut rx) = ring_pair(16);
    assert!(!rx.is_finished().unwrap(), "open and empty");
    assert_eq!(tx.write(&[1; 20]).unwrap(), 16);
    tx.close();
    let mut one = [0u8; 1];
    for left in (1..=16).rev() {
        assert!(!rx.is_finished().unwrap(), "{left} bytes left");
        assert_eq!(rx.read(&mut one).unwrap(), 1);
    }
    assert!(rx.is_finished().unwrap());
}

/// A futex emulated with a mutex and a condition variable, whose wait gives up after
/// `timeout` and says so: a wake-up that never comes shows up as a timeout.
struct Futex {
    lock: Mutex<()>,
    cv: Condvar,
}

impl Futex {
    fn new() -> Arc<Futex> {
        Arc::new(Futex {
            lock: Mutex::new(()),
            cv: Condvar::new(),
        })
    }

    /// Sleeps while `word == expected`; false if it timed out.
    fn wait(&self, word: &std::sync::atomic::AtomicU32, expected: u32, timeout: Duration) -> bool {
        let g = self.lock.lock().unwrap();
        let (_g, r) = self
            .cv
            .wait_timeout_while(g, timeout, |_| word.load(Ordering::SeqCst) == expected)
            .unwrap();
        !r.timed_out()
    }

    fn wake(&self) {
        let _g = self.lock.lock().unwrap();
        self.cv.notify_all();
    }
}

/// The sleep/wake protocol on real threads: a consumer and a producer that both sleep
/// (never poll) on a 16-byte ring through 2 MB; any lost wake-up is a 2 s timeout.
#[test]
fn no_lost_wakeups_on_real_threads() {
    const TOTAL: usize = 2 << 20;
    const TIMEOUT: Duration = Duration::from_secs(2);
    let (mut tx, mut rx) = ring_pair(16);
    let (data_f, space_f) = (Futex::new(), Futex::new());
    let (df, sf) = (data_f.clone(), space_f.clone());
    let lost = Arc::new(AtomicBool::new(false));
    let lost_p = lost.clone();
    let p = thread::spawn(move || {
        let mut sent = 0;
        let mut i = 0usize;
        while sent < TOTAL {
            let size = [1, 7, 16, 40][i % 4].min(TOTAL - sent);
            let buf: Vec<u8> = (sent..sent + size).map(|j| j as u8).collect();
            let n = tx.write(&buf).unwrap();
            sent += n;
            i += 1;
            if tx.needs_wake() {
                df.wake();
            }
            if n == 0 && tx.prepare_sleep().unwrap() {
                if !sf.wait(tx.sleep_word(), SLEEPING, TIMEOUT) {
                    lost_p.store(true, Ordering::Relaxed);
                }
                tx.finish_sleep();
            }
        }
        tx.close();
        if tx.needs_wake() {
            df.wake();
        }
    });
    let mut got = 0usize;
    let mut buf = [0u8; 11];
    loop {
        let n = rx.read(&mut buf).unwrap();
        for (k, &b) in buf[..n].iter().enumerate() {
            assert_eq!(b, (got + k) as u8, "byte {}", got + k);
        }
        got += n;
        if rx.needs_wake() {
            space_f.wake();
        }
        if rx.is_finished().unwrap() {
            break;
        }
        if n == 0 && rx.prepare_sleep().unwrap() {
            if !data_f.wait(rx.sleep_word(), SLEEPING, TIMEOUT) {
                lost.store(true, Ordering::Relaxed);
            }
            rx.finish_sleep();
        }
    }
    p.join().unwrap();
    assert_eq!(got, TOTAL);
    assert!(
        !lost.load(Ordering::Relaxed),
        "a sleeper waited out its timeout"
    );
}
