//! Model checks of the ring's index, close and sleep/wake protocols under every
//! interleaving loom explores (bounded by `PREEMPTIONS`).
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p vmc-ring --release --test loom`.
//!
//! Every model starts from a ring whose indices sit just before the wrap (a pre-fill
//! written and read on the model's main thread), so the pieces the producer writes
//! cross the end of the data area, and most models also fill the ring so the producer
//! must reload the consumer's head.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use vmc_ring::heap::ring_pair;
use vmc_ring::wait::{AWAKE, SLEEPING};
use vmc_ring::{Consumer, Producer, RingError};

/// The smallest ring (`layout::MIN_CAPACITY`).
const CAP: usize = 16;

/// Loom explores every interleaving up to this many preemptions per execution
/// (`LOOM_MAX_PREEMPTIONS` overrides it). Unbounded, the spin/yield loops of these
/// models blow up combinatorially; every protocol bug here needs at most two context
/// switches at the wrong place (the classic lost wake-up needs exactly one: between
/// the sleeper's re-check and its futex wait, or between the waker's publish and its
/// check), and a bound of 3 keeps the whole file at seconds in release.
const PREEMPTIONS: usize = 3;

fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut b = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        b.preemption_bound = Some(PREEMPTIONS);
    }
    b.check(f);
}

/// As [`model`], with a bound that the environment cannot raise.
fn model_bounded<F: Fn() + Sync + Send + 'static>(bound: usize, f: F) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(f);
}

/// The stream the producer sends: distinct non-zero bytes (a fresh data area is all
/// zeroes, so reading a byte nobody wrote shows up).
fn payload(len: usize) -> Vec<u8> {
    (0..len as u8).map(|i| 0xa0 + i).collect()
}

/// A ring with `pos` bytes written and read already (indices near the wrap), and
/// `keep` more bytes (`0x10..`) written but left unread for the consumer.
fn positioned_ring(pos: usize, keep: usize) -> (Producer, Consumer, Vec<u8>) {
    let (mut tx, mut rx) = ring_pair(CAP);
    let fill: Vec<u8> = (0..pos as u8).collect();
    assert_eq!(tx.write(&fill).unwrap(), pos);
    let mut out = vec![0; pos];
    assert_eq!(rx.read(&mut out).unwrap(), pos);
    let kept: Vec<u8> = (0..keep as u8).map(|i| 0x10 + i).collect();
    assert_eq!(tx.write(&kept).unwrap(), keep);
    assert!(!tx.needs_wake() && !rx.needs_wake(), "nobody sleeps yet");
    (tx, rx, kept)
}

/// Producer: writes `data` in pieces of at most `piece` bytes, yielding while full.
fn produce(tx: &mut Producer, data: &[u8], piece: usize) {
    let mut sent = 0;
    while sent < data.len() {
        let end = (sent + piece).min(data.len());
        let n = tx.write(&data[sent..end]).unwrap();
        if n == 0 {
            thread::yield_now();
        }
        sent += n;
    }
}

/// Consumer: reads `want` bytes with a `buf`-byte buffer, yielding while empty.
fn consume(rx: &mut Consumer, want: usize, buf: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut b = vec![0u8; buf];
    while got.len() < want {
        let n = rx.read(&mut b).unwrap();
        if n == 0 {
            thread::yield_now();
        }
        got.extend_from_slice(&b[..n]);
    }
    got
}

/// (a) Index protocol: 12 bytes pre-filled at index 2, the producer sends 5 more in
/// pieces of 2 (the third piece finds the ring full, the pieces cross index 16), the
/// consumer reads in 7s. Checks the counts and positions; the data itself is checked
/// by [`bytes_cross_the_ring_intact`].
#[test]
fn indices_wrap_and_fill_without_losing_count() {
    model(|| {
        let (mut tx, mut rx, kept) = positioned_ring(2, 12);
        let data = payload(5);
        let total = kept.len() + data.len();
        let d = data.clone();
        let p = thread::spawn(move || {
            produce(&mut tx, &d, 2);
            tx.position()
        });
        let got = consume(&mut rx, total, 7);
        let tail = p.join().unwrap();
        assert_eq!(got.len(), total);
        assert_eq!(tail, (2 + total) as u64);
        assert_eq!(rx.position(), tail);
        assert_eq!(rx.refresh().unwrap(), 0);
    });
}

/// (a) The same model, checking the bytes: what the consumer reads is exactly what
/// was written, in order, and loom's `UnsafeCell` tracking would report a data race if
/// the tail's release/acquire (or the head's, for reused space) were too weak.
///
#[test]
fn bytes_cross_the_ring_intact() {
    model(|| {
        let (mut tx, mut rx) = ring_pair(CAP);
        // Single-threaded sanity check first: both ends see one data area.
        assert_eq!(tx.write(&[0, 1]).unwrap(), 2);
        let mut two = [0xff; 2];
        assert_eq!(rx.read(&mut two).unwrap(), 2);
        assert_eq!(two, [0, 1]);
        let kept: Vec<u8> = (0..12u8).map(|i| 0x10 + i).collect();
        assert_eq!(tx.write(&kept).unwrap(), 12);
        let data = payload(5);
        let d = data.clone();
        let p = thread::spawn(move || produce(&mut tx, &d, 2));
        let got = consume(&mut rx, kept.len() + data.len(), 7);
        p.join().unwrap();
        assert_eq!(&got[..12], &kept[..]);
        assert_eq!(&got[12..], &data[..]);
    });
}

/// A futex emulated with a mutex and a condition variable: `wait` returns at once if
/// the word no longer holds `expected` (checked under the lock), `wake` wakes all.
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

    fn wait(&self, word: &AtomicU32, expected: u32) {
        let g = self.lock.lock().unwrap();
        if word.load(Ordering::SeqCst) != expected {
            return;
        }
        drop(self.cv.wait(g).unwrap());
    }

    fn wake(&self) {
        let _g = self.lock.lock().unwrap();
        self.cv.notify_all();
    }
}

/// (c) No lost wake-up for a consumer waiting for data or EOF: the consumer sleeps
/// whenever `prepare_sleep` allows and never polls; the producer writes 3 bytes in
/// two pieces across the wrap, then closes, asking `waker` after each step whether to
/// wake. A lost wake-up leaves the consumer blocked on the condvar forever, which
/// loom reports as a deadlock.
fn consumer_sleep_model(waker: fn(&mut Producer) -> bool) {
    model(move || {
        let (mut tx, mut rx, _) = positioned_ring(15, 0);
        let futex = Futex::new();
        let f = futex.clone();
        let p = thread::spawn(move || {
            for piece in [&[1u8, 2][..], &[3][..]] {
                assert_eq!(tx.write(piece).unwrap(), piece.len());
                if waker(&mut tx) {
                    f.wake();
                }
            }
            tx.close();
            if waker(&mut tx) {
                f.wake();
            }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        loop {
            let n = rx.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            if rx.is_finished().unwrap() {
                break;
            }
            if n == 0 && rx.prepare_sleep().unwrap() {
                futex.wait(rx.sleep_word(), SLEEPING);
                rx.finish_sleep();
            }
        }
        p.join().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(rx.position(), 18);
    });
}

/// The consumer-sleep model with the real `Producer::needs_wake`.
#[test]
fn a_sleeping_consumer_is_always_woken() {
    consumer_sleep_model(|tx| tx.needs_wake());
}

/// (c) No lost wake-up for a producer waiting for space: a 16-byte ring positioned
/// at index 14 takes 20 bytes (written 12 then 8: the second write finds the ring
/// full and the producer sleeps), the consumer reads in 6s, waking the producer when
/// its waker says so. Both sides sleep instead of polling, both ask their waker after
/// every publication; loom reports a deadlock if any wake-up is lost.
fn producer_sleep_model(tx_waker: fn(&mut Producer) -> bool, rx_waker: fn(&mut Consumer) -> bool) {
    let (mut tx, mut rx, _) = positioned_ring(14, 0);
    let data_futex = Futex::new();
    let space_futex = Futex::new();
    let (df, sf) = (data_futex.clone(), space_futex.clone());
    const TOTAL: usize = 20;
    let p = thread::spawn(move || {
        let data = [0x5a; TOTAL];
        let mut sent = 0;
        for end in [12, TOTAL] {
            while sent < end {
                let n = tx.write(&data[sent..end]).unwrap();
                sent += n;
                if tx_waker(&mut tx) {
                    df.wake();
                }
                if n == 0 && tx.prepare_sleep().unwrap() {
                    sf.wait(tx.sleep_word(), SLEEPING);
                    tx.finish_sleep();
                }
            }
        }
        tx.position()
    });
    let mut got = 0;
    let mut buf = [0u8; 6];
    while got < TOTAL {
        let n = rx.read(&mut buf).unwrap();
        got += n;
        if rx_waker(&mut rx) {
            space_futex.wake();
        }
        if n == 0 && rx.prepare_sleep().unwrap() {
            data_futex.wait(rx.sleep_word(), SLEEPING);
            rx.finish_sleep();
        }
    }
    let tail = p.join().unwrap();
    assert_eq!(tail, (14 + TOTAL) as u64);
    assert_eq!(rx.position(), tail);
}

/// The producer-sleep model with the real `needs_wake` on both sides.
///
/// (Before `wait::should_wake` used a compare-and-swap, its `swap` wrote AWAKE even
/// when the sleeper had already withdrawn; loom's modification order then allowed a
/// deadlock the C++/Rust model forbids. The CAS writes nothing in that case and is
/// modelled exactly.)
#[test]
fn a_sleeping_producer_is_always_woken() {
    model(|| producer_sleep_model(|tx| tx.needs_wake(), |rx| rx.needs_wake()));
}

/// (c) A consumer that closes its end wakes a producer sleeping on a full ring, and
/// that producer's next write fails with `ReaderClosed`.
#[test]
fn closing_the_reader_wakes_a_full_producer() {
    model(|| {
        let (mut tx, mut rx, _) = positioned_ring(14, 0);
        let futex = Futex::new();
        let f = futex.clone();
        let p = thread::spawn(move || {
            let data = [7u8; 20];
            let mut sent = 0;
            loop {
                match tx.write(&data[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) => return (sent, e),
                }
                if tx.prepare_sleep().unwrap() {
                    f.wait(tx.sleep_word(), SLEEPING);
                    tx.finish_sleep();
                }
            }
        });
        rx.close();
        if rx.needs_wake() {
            futex.wake();
        }
        let (sent, err) = p.join().unwrap();
        assert_eq!(err, RingError::ReaderClosed);
        assert!(sent <= CAP);
    });
}

/// (d) EOF: the producer writes 4 bytes in two pieces across the wrap, then closes.
/// The consumer, polling, must never see `is_finished` before it has every byte, and
/// must see it once it has.
#[test]
fn eof_comes_only_after_every_byte() {
    model(|| {
        let (mut tx, mut rx, _) = positioned_ring(14, 0);
        let p = thread::spawn(move || {
            assert_eq!(tx.write(&[1, 2, 3]).unwrap(), 3);
            assert_eq!(tx.write(&[4]).unwrap(), 1);
            tx.close();
        });
        let mut got = 0;
        let mut buf = [0u8; 2];
        loop {
            if rx.is_finished().unwrap() {
                assert_eq!(got, 4, "EOF before the last byte");
                break;
            }
            let n = rx.read(&mut buf).unwrap();
            if n == 0 {
                thread::yield_now();
            }
            got += n;
        }
        assert_eq!(rx.read(&mut buf).unwrap(), 0, "bytes after EOF");
        assert!(rx.is_finished().unwrap(), "EOF is sticky");
        p.join().unwrap();
    });
}

/// (e) Taking bytes back: the consumer reads some of a stream the producer is still
/// writing, names the offset it stopped at (out of band, here an atomic, as the
/// connection layer's control socket does), and closes. The producer, once it sees
/// the close, takes back everything from that offset: what the consumer read plus
/// what the producer took back is the stream it wrote up to then, each byte once.
#[test]
fn taken_back_bytes_complete_what_the_consumer_read() {
    model(|| {
        let (mut tx, mut rx, kept) = positioned_ring(13, 2);
        let stopped = Arc::new(loom::sync::atomic::AtomicU64::new(u64::MAX));
        let s = stopped.clone();
        let c = thread::spawn(move || {
            let mut got = Vec::new();
            let mut b = [0u8; 3];
            let n = rx.read(&mut b).unwrap();
            got.extend_from_slice(&b[..n]);
            s.store(rx.position(), Ordering::Release);
            rx.close();
            got
        });
        let more = payload(6);
        let mut sent = kept.clone();
        for piece in more.chunks(2) {
            match tx.write(piece) {
                Ok(n) => sent.extend_from_slice(&piece[..n]),
                Err(RingError::ReaderClosed) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        let got = c.join().unwrap();
        assert!(tx.is_reader_closed());
        let from = stopped.load(Ordering::Acquire);
        let mut back = Vec::new();
        tx.take_back(from, &mut back).unwrap();
        let mut whole = got;
        whole.extend_from_slice(&back);
        assert_eq!(whole, sent);
    });
}

/// (h) Revoke: the producer takes the ring back while the consumer reads (each
/// read copies, then publishes its head with a swap). Whatever the interleaving, the consumer's
/// position is where the revoke says the ring ended, and what it read plus what
/// the producer took back is the stream, each byte once.
#[test]
fn a_revoke_splits_the_stream_exactly_where_the_consumer_stopped() {
    model(|| {
        let (mut tx, mut rx, kept) = positioned_ring(13, 5);
        let c = thread::spawn(move || {
            let mut got = Vec::new();
            let mut b = [0u8; 2];
            for _ in 0..3 {
                let n = rx.read(&mut b).unwrap();
                got.extend_from_slice(&b[..n]);
            }
            (got, rx)
        });
        let at = tx.revoke().unwrap();
        let mut back = Vec::new();
        tx.take_back(at, &mut back).unwrap();
        let (got, mut rx) = c.join().unwrap();
        assert_eq!(rx.position(), at, "both ends agree where the ring ended");
        assert!(rx.is_finished().unwrap() && rx.is_revoked());
        let mut whole = got;
        whole.extend_from_slice(&back);
        assert_eq!(whole, kept);
    });
}
