//! Stream integrity in one process: every byte written comes out once, in order,
//! whatever the wake mode, the ring capacity and the sizes of reads and writes
//! (smaller and larger than the ring, copying and zero-copy), in both directions
//! at once.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use vmc_channel::config::DEFAULT_CAPACITY;
use vmc_channel::{Channel, ChannelConfig, ReadHalf, WakeMode, WriteHalf};

const MB: u64 = 1 << 20;

/// Largest single read or write: four rings' worth (so most large writes do not
/// fit), at least a page, at most 1 MiB.
fn max_chunk(cap: usize) -> usize {
    (4 * cap).clamp(4096, 1 << 20)
}

/// Writes `total` bytes of stream `seed` with random sizes and methods, then
/// shuts the direction down.
fn write_stream(mut w: WriteHalf, seed: u64, total: u64, rng_seed: u64, cap: usize) {
    let mut rng = TestRng::new(rng_seed);
    let max = max_chunk(cap);
    let mut buf = vec![0u8; max];
    let mut off = 0u64;
    while off < total {
        let left = (total - off) as usize;
        let kind = rng.range(0, 9);
        if kind < 2 {
            // Zero-copy: fill (part of) the free space in place.
            let limit = rng.range(1, max).min(left);
            let n = w
                .write_with(|a, b| {
                    let n = limit.min(a.len() + b.len());
                    let na = n.min(a.len());
                    fill_pattern(seed, off, &mut a[..na]);
                    fill_pattern(seed, off + na as u64, &mut b[..n - na]);
                    n
                })
                .expect("write_with");
            assert!(n >= 1 && n <= limit, "write_with published {n} of {limit}");
            off += n as u64;
            continue;
        }
        let len = match kind {
            2 | 3 => rng.range(1, 64),
            4..=6 => rng.range(1, cap.min(max)),
            _ => rng.range(cap.min(max), max),
        }
        .min(left);
        let chunk = &mut buf[..len];
        fill_pattern(seed, off, chunk);
        if rng.chance(4) {
            w.write_all(chunk).expect("write_all");
            off += len as u64;
        } else {
            // Partial writes, as a caller of `write` sees them.
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let n = w.write(rest).expect("write");
                assert!(n >= 1 && n <= rest.len() && n <= cap, "write returned {n}");
                rest = &rest[n..];
                off += n as u64;
            }
        }
    }
    assert_eq!(w.position(), total);
    w.shutdown();
    let e = w.write(b"x").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
}

/// Reads stream `seed` with random sizes and methods up to EOF, checking every
/// byte; returns how many were read.
fn read_stream(mut r: ReadHalf, seed: u64, total: u64, rng_seed: u64, cap: usize) {
    let mut rng = TestRng::new(rng_seed);
    let max = max_chunk(cap);
    let mut buf = vec![0u8; max];
    let mut off = 0u64;
    loop {
        let kind = rng.range(0, 9);
        let n = if kind < 3 {
            let limit = rng.range(1, max);
            let mut called = false;
            let n = r
                .read_with(|a, b| {
                    called = true;
                    assert!(!a.is_empty(), "read_with called without data");
                    let n = limit.min(a.len() + b.len());
                    let na = n.min(a.len());
                    check_pattern(seed, off, &a[..na]);
                    check_pattern(seed, off + na as u64, &b[..n - na]);
                    n
                })
                .expect("read_with");
            assert_eq!(called, n > 0, "read_with: f called iff not EOF");
            n
        } else {
            let len = match kind {
                3 => rng.range(1, 16),
                4 | 5 => rng.range(1, cap.min(max)),
                _ => rng.range(cap.min(max), max),
            };
            let n = r.read(&mut buf[..len]).expect("read");
            assert!(n <= len);
            check_pattern(seed, off, &buf[..n]);
            n
        };
        if n == 0 {
            break;
        }
        off += n as u64;
        assert!(off <= total, "read past the end: {off} > {total}");
    }
    assert_eq!(off, total, "EOF after {off} of {total} bytes");
    assert_eq!(r.position(), total);
    // EOF is sticky.
    assert_eq!(r.read(&mut buf).unwrap(), 0);
    assert_eq!(r.read_with(|_, _| unreachable!()).unwrap(), 0);
}

/// Both directions of one pair at once, on four threads.
fn duplex(config: &ChannelConfig, per_dir: u64, seed: u64) {
    let (a, b) = Channel::pair(config).expect("pair");
    assert_eq!(a.capacity(), config.capacity);
    assert_eq!(b.capacity(), config.capacity);
    assert_eq!(a.wake_mode(), config.wake);
    assert_eq!(b.wake_mode(), config.wake);
    let cap = config.capacity;
    let (ar, aw) = a.split();
    let (br, bw) = b.split();
    let (s1, s2) = (seed, seed.rotate_left(29) ^ 0xA5A5_A5A5);
    let mut rng = TestRng::new(seed);
    let (r1, r2, r3, r4) = (
        rng.next_u64(),
        rng.next_u64(),
        rng.next_u64(),
        rng.next_u64(),
    );
    let t = [
        std::thread::spawn(move || write_stream(aw, s1, per_dir, r1, cap)),
        std::thread::spawn(move || read_stream(br, s1, per_dir, r2, cap)),
        std::thread::spawn(move || write_stream(bw, s2, per_dir, r3, cap)),
        std::thread::spawn(move || read_stream(ar, s2, per_dir, r4, cap)),
    ];
    let mut panic = None;
    for h in t {
        if let Err(p) = h.join() {
            panic.get_or_insert(p);
        }
    }
    if let Some(p) = panic {
        std::panic::resume_unwind(p);
    }
}

fn run_mode(wake: WakeMode) {
    let seed = test_seed(&format!("duplex {}", wake.name()));
    for (i, cap) in [4096, 65536, DEFAULT_CAPACITY].into_iter().enumerate() {
        let config = ChannelConfig {
            capacity: cap,
            wake,
            ..ChannelConfig::default()
        };
        let started = Instant::now();
        let s = seed.wrapping_add(i as u64);
        within(Duration::from_secs(60), "duplex stream", move || {
            duplex(&config, 64 * MB, s)
        });
        eprintln!(
            "duplex {} capacity {cap}: 2 x 64 MiB in {:?}",
            wake.name(),
            started.elapsed()
        );
    }
}

#[test]
fn duplex_futex() {
    run_mode(WakeMode::Futex);
}

#[test]
fn duplex_eventfd() {
    run_mode(WakeMode::EventFd);
}

#[test]
fn duplex_poll() {
    run_mode(WakeMode::Poll);
}

/// Without spinning every wait is a sleep: the wake-up protocol alone must keep
/// the stream going.
#[test]
fn duplex_without_spin() {
    let seed = test_seed("duplex without spin");
    for (i, wake) in ALL_WAKE_MODES.into_iter().enumerate() {
        let config = ChannelConfig {
            capacity: 4096,
            wake,
            spin: Duration::ZERO,
        };
        let s = seed.wrapping_add(i as u64);
        within(Duration::from_secs(60), "duplex without spin", move || {
            duplex(&config, 8 * MB, s)
        });
    }
}

/// One `write_all` of many rings' worth against one `read_exact` of it all.
#[test]
fn huge_single_write() {
    let config = ChannelConfig {
        capacity: 4096,
        ..ChannelConfig::default()
    };
    let (mut a, mut b) = Channel::pair(&config).unwrap();
    let len = 8 * MB as usize;
    let mut data = vec![0u8; len];
    fill_pattern(7, 0, &mut data);
    let w = std::thread::spawn(move || {
        a.write_all(&data).unwrap();
        a
    });
    let mut got = vec![0u8; len];
    within(Duration::from_secs(30), "read_exact", move || {
        b.read_exact(&mut got).unwrap();
        check_pattern(7, 0, &got);
        drop(w.join().unwrap());
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Random capacities (down to the 16-byte minimum), wake modes, spin limits and
    /// lengths; sizes of reads and writes follow the capacity.
    #[test]
    fn random_configurations(
        cap_log in 4u32..=16,
        wake in prop::sample::select(ALL_WAKE_MODES.to_vec()),
        spin_us in prop::sample::select(vec![0u64, 5, 50]),
        total in 0u64..300_000,
        seed in any::<u64>(),
    ) {
        let cap = 1usize << cap_log;
        // Keep tiny rings from turning into thousands of sleeps.
        let total = total.min(cap as u64 * 1024);
        let config = ChannelConfig { capacity: cap, wake, spin: Duration::from_micros(spin_us) };
        within(Duration::from_secs(30), "random configuration", move || {
            duplex(&config, total, seed)
        });
    }
}
