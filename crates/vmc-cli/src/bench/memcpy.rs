//! Single-thread memcpy bandwidth: the yardstick for stream throughput.
//!
//! A shared-memory ring copies every byte twice (sender into the ring, ring
//! into the receiver's buffer), so half of what one core can `memcpy` is the
//! yardstick for one stream: the "2-copy bound". (The two copies run on two
//! cores at once, so a ring can reach it; the cross-core transfer of every
//! cache line keeps it from going far beyond.) The measurement copies
//! `size`-byte chunks from one source buffer into a 256 KiB destination,
//! wrapping, which is the shape of a ring's copy-in.
//!
//! A bound must not be pulled down by a moment of interference (another process,
//! a host that deschedules the vCPU), or a channel would appear to beat it: the
//! time is split into ten trials and the best one counts.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Destination buffer size (grown to `size` for larger chunks).
const DEST_BYTES: usize = 256 * 1024;

/// Trials the measuring time is split into; the best counts.
const TRIALS: u32 = 10;

/// Measure memcpy bandwidth in GB/s (1e9 bytes/s) copying `size`-byte chunks for
/// about `time`: the best of [`TRIALS`] trials.
pub fn bandwidth_gbytes_per_s(size: usize, time: Duration) -> f64 {
    (0..TRIALS)
        .map(|_| trial(size, time / TRIALS))
        .fold(0.0, f64::max)
}

/// One trial: bandwidth copying `size`-byte chunks for about `time`.
fn trial(size: usize, time: Duration) -> f64 {
    let size = size.max(1);
    let src: Vec<u8> = (0..size).map(|i| (i as u8) ^ 0x5a).collect();
    let src = black_box(src);
    let dest_len = DEST_BYTES.max(size);
    let mut dest = vec![0u8; dest_len];
    // Fault in and warm the destination.
    dest.fill(1);
    black_box(&mut dest);

    let copies_per_check = ((1usize << 20) / size).max(1);
    let mut off = 0usize;
    let mut bytes = 0u64;
    let start = Instant::now();
    let elapsed = loop {
        for _ in 0..copies_per_check {
            if off + size > dest_len {
                off = 0;
            }
            dest[off..off + size].copy_from_slice(&src);
            off += size;
        }
        black_box(&mut dest);
        bytes += (copies_per_check * size) as u64;
        let elapsed = start.elapsed();
        if elapsed >= time {
            break elapsed;
        }
    };
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_positive_and_plausible() {
        let gbps = bandwidth_gbytes_per_s(65536, Duration::from_millis(20));
        assert!(gbps > 0.1 && gbps < 10_000.0, "{gbps}");
        let small = bandwidth_gbytes_per_s(3, Duration::from_millis(5));
        assert!(small > 0.0, "{small}");
    }
}
