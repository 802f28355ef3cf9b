//! The plain-ring yardstick for stream throughput: what a ring of the transports'
//! capacity carries on this machine's cores, with nothing around it.
//!
//! vmc's own ring (`vmc_ring`, in heap memory) between two threads that only spin:
//! the writer waits until a whole write fits (or the whole ring, for writes larger
//! than it), the reader takes everything there is. No channel, no connection, no
//! wake-ups, no system calls: a transport's share of this figure is what its
//! protocol and waiting keep of what the ring and the cores can do. Measured in
//! the same run as the transports, since two vCPUs of one machine kind can be
//! close (a shared cache) or far apart, and the figure moves with them.
//!
//! Like the memcpy bound, the best of a few trials counts, so a moment of
//! interference does not lower the yardstick below what a transport reaches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Trials the measuring time is split into; the best counts.
const TRIALS: u32 = 3;

/// Stream throughput in GB/s (1e9 bytes/s) of a `capacity`-byte ring carrying
/// `size`-byte writes, for about `time`: the best of [`TRIALS`] trials. `None` if
/// `capacity` is not one a ring can have (the shm runs then say why).
pub fn gbytes_per_s(size: usize, capacity: usize, time: Duration) -> Option<f64> {
    vmc_ring::ChannelLayout::for_capacity(capacity).ok()?;
    let best = (0..TRIALS)
        .map(|_| trial(size.max(1), capacity, time / TRIALS))
        .fold(0.0, f64::max);
    Some(best)
}

fn trial(size: usize, capacity: usize, time: Duration) -> f64 {
    let (mut tx, mut rx) = vmc_ring::heap::ring_pair(capacity);
    let src: Vec<u8> = (0..size).map(|i| (i as u8) ^ 0x5a).collect();
    // A whole write, or the whole ring for writes larger than it.
    let piece = size.min(capacity);
    let stop = AtomicBool::new(false);
    let start = Barrier::new(3);
    std::thread::scope(|s| {
        s.spawn(|| {
            start.wait();
            let mut off = 0;
            while !stop.load(Ordering::Relaxed) {
                let n = piece.min(size - off);
                match tx.free() {
                    Ok(free) if free >= n => {
                        let wrote = tx.write(&src[off..off + n]).expect("a heap ring");
                        off = (off + wrote) % size;
                    }
                    Ok(_) => pause(),
                    Err(e) => panic!("heap ring: {e}"),
                }
            }
        });
        let reader = s.spawn(|| {
            let mut dst = vec![0u8; capacity];
            let mut bytes = 0u64;
            start.wait();
            while !stop.load(Ordering::Relaxed) {
                match rx.read(&mut dst) {
                    Ok(0) => pause(),
                    Ok(n) => bytes += n as u64,
                    Err(e) => panic!("heap ring: {e}"),
                }
            }
            std::hint::black_box(&dst);
            bytes
        });
        start.wait();
        let began = Instant::now();
        std::thread::sleep(time);
        stop.store(true, Ordering::Relaxed);
        let elapsed = began.elapsed();
        let bytes = reader.join().expect("the reader thread");
        bytes as f64 / elapsed.as_secs_f64() / 1e9
    })
}

/// A waiting side looks again only after a moment, so that it does not keep
/// pulling the cache line the other side is writing. (1 to 64 pauses measured
/// alike, 10.9-11.8 GB/s at 64 KiB on a close core pair; 256 fell to 7.2.)
fn pause() {
    for _ in 0..PAUSES {
        std::hint::spin_loop();
    }
}

const PAUSES: u32 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_carries_small_and_large_writes() {
        let cap = vmc_channel::config::DEFAULT_CAPACITY;
        for size in [64, 65536, 1 << 20] {
            let g = gbytes_per_s(size, cap, Duration::from_millis(30)).unwrap();
            assert!(g > 0.0 && g < 10_000.0, "{size}-byte writes: {g} GB/s");
        }
    }

    #[test]
    fn a_capacity_no_ring_can_have_gives_no_figure() {
        assert_eq!(gbytes_per_s(64, 3, Duration::from_millis(10)), None);
    }
}
