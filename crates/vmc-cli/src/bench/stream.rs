//! Bulk transfer ("stream"): one-way throughput of `size`-byte writes.
//!
//! The client writes `size`-byte chunks as fast as it can, then closes its
//! write direction ([`Conn::finish`]); the server reads until EOF and answers
//! with 16 bytes: the byte count and a checksum, both little-endian `u64`.
//! Throughput is measured on the client from the first measured write to the
//! arrival of that answer, so the receiver's completion is included.
//!
//! Verification is sampled, so it costs almost nothing at any rate: chunk `k`
//! starts with `k` (its first up to 8 bytes) and ends with `k ^ TAIL_MAGIC`
//! (its last up to 8 bytes after those); the middle is a fixed pattern. The
//! server, which knows `size`, finds every chunk's head and tail in the byte
//! stream whatever the read boundaries and folds them, in order, into an FNV-1a
//! style hash ([`StreamCheck`]). A lost, repeated, reordered or torn chunk
//! changes the count or the hash.

use std::io;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::progress::Ticker;
use super::transport::Conn;
use super::Schedule;

const TAIL_MAGIC: u64 = 0x3c3c_a5a5_f0f0_9669;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Bytes each chunk dedicates to its head word.
fn head_len(size: usize) -> usize {
    size.min(8)
}

/// Bytes each chunk dedicates to its tail word (after the head, never overlapping it).
fn tail_len(size: usize) -> usize {
    (size - head_len(size)).min(8)
}

fn mask(len: usize) -> u64 {
    if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * len)) - 1
    }
}

fn le_word(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(word)
}

/// Running count and order-sensitive hash of a chunked byte stream.
#[derive(Clone, Debug)]
pub struct StreamCheck {
    size: usize,
    head: usize,
    tail: usize,
    head_mask: u64,
    tail_mask: u64,
    hash: u64,
    bytes: u64,
    /// Offset inside the current chunk (receiver side only).
    off: usize,
    head_acc: u64,
    tail_acc: u64,
}

impl StreamCheck {
    /// A check for a stream of `size`-byte chunks (`size >= 1`).
    pub fn new(size: usize) -> Self {
        assert!(size >= 1, "chunk size must be at least 1 byte");
        let head = head_len(size);
        let tail = tail_len(size);
        StreamCheck {
            size,
            head,
            tail,
            head_mask: mask(head),
            tail_mask: mask(tail),
            hash: FNV_OFFSET,
            bytes: 0,
            off: 0,
            head_acc: 0,
            tail_acc: 0,
        }
    }

    #[inline]
    fn mix(&mut self, head: u64, tail: u64) {
        self.hash = ((self.hash ^ head).wrapping_mul(FNV_PRIME) ^ tail).wrapping_mul(FNV_PRIME);
    }

    /// Sender side: stamp chunk number `seq` into `buf` (`buf.len() == size`) and account for it.
    #[inline]
    pub fn stamp(&mut self, buf: &mut [u8], seq: u64) {
        debug_assert_eq!(buf.len(), self.size);
        let tail_word = seq ^ TAIL_MAGIC;
        buf[..self.head].copy_from_slice(&seq.to_le_bytes()[..self.head]);
        let tail_start = self.size - self.tail;
        buf[tail_start..].copy_from_slice(&tail_word.to_le_bytes()[..self.tail]);
        self.mix(seq & self.head_mask, tail_word & self.tail_mask);
        self.bytes += self.size as u64;
    }

    /// Receiver side: account for the next `data` bytes of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        let size = self.size;
        let tail_start = size - self.tail;
        let mut i = 0;
        while i < data.len() {
            if self.off == 0 && data.len() - i >= size {
                // Fast path: a whole chunk is in this buffer.
                let head = le_word(&data[i..i + self.head]);
                let tail = le_word(&data[i + tail_start..i + size]);
                self.mix(head, tail);
                i += size;
                continue;
            }
            let n = (size - self.off).min(data.len() - i);
            let (lo, hi) = (self.off, self.off + n);
            for j in lo..hi.min(self.head) {
                self.head_acc |= u64::from(data[i + j - lo]) << (8 * j);
            }
            for j in lo.max(tail_start)..hi {
                self.tail_acc |= u64::from(data[i + j - lo]) << (8 * (j - tail_start));
            }
            self.off = hi;
            i += n;
            if self.off == size {
                let (head, tail) = (self.head_acc, self.tail_acc);
                self.mix(head, tail);
                self.off = 0;
                self.head_acc = 0;
                self.tail_acc = 0;
            }
        }
    }

    /// Bytes accounted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The hash of the complete chunks accounted so far.
    pub fn hash(&self) -> u64 {
        self.hash
    }
}

/// What the client measured.
pub struct StreamOutcome {
    /// Bytes written during the measured interval.
    pub bytes: u64,
    /// From the first measured write to the server's answer.
    pub seconds: f64,
}

/// Run the client side: unmeasured until `schedule.warm_end`, measured until
/// `schedule.deadline`, then verify.
pub fn client(
    conn: &mut dyn Conn,
    size: usize,
    schedule: Schedule,
    ticker: &mut Ticker,
) -> Result<StreamOutcome> {
    let mut buf: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31)).collect();
    let mut check = StreamCheck::new(size);
    // Look at the clock about once per MiB (at least once per write).
    let writes_per_check = ((1usize << 20) / size).max(1);
    let mut seq = 0u64;

    let mut write_until = |deadline: Instant, seq: &mut u64, ticker: &mut Ticker| -> Result<()> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            ticker.tick(now);
            for _ in 0..writes_per_check {
                check.stamp(&mut buf, *seq);
                conn.write_all(&buf).context("stream: write")?;
                *seq += 1;
            }
        }
    };

    write_until(schedule.warm_end, &mut seq, ticker)?;
    let warm_seq = seq;
    let t0 = Instant::now();
    write_until(schedule.deadline, &mut seq, ticker)?;

    conn.finish()
        .context("stream: closing the write direction")?;
    let mut reply = [0u8; 16];
    conn.read_exact(&mut reply)
        .context("stream: reading the receiver's count and checksum")?;
    let t1 = Instant::now();

    let got_bytes = u64::from_le_bytes(reply[..8].try_into().expect("8 bytes"));
    let got_hash = u64::from_le_bytes(reply[8..].try_into().expect("8 bytes"));
    let sent = check.bytes();
    debug_assert_eq!(sent, seq * size as u64);
    if got_bytes != sent {
        bail!("stream: the receiver counted {got_bytes} bytes but {sent} were sent");
    }
    let expected = check.hash();
    if got_hash != expected {
        bail!(
            "stream: checksum mismatch (receiver {got_hash:#018x}, sender {expected:#018x}): \
             chunks were lost, repeated, reordered or corrupted"
        );
    }
    Ok(StreamOutcome {
        bytes: (seq - warm_seq) * size as u64,
        seconds: t1.duration_since(t0).as_secs_f64(),
    })
}

/// Run the server side: read until EOF, answer with the count and checksum.
pub fn server(conn: &mut dyn Conn, size: usize) -> Result<()> {
    let mut buf = vec![0u8; size.max(256 * 1024)];
    let mut check = StreamCheck::new(size);
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => check.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("stream server: read"),
        }
    }
    let mut reply = [0u8; 16];
    reply[..8].copy_from_slice(&check.bytes().to_le_bytes());
    reply[8..].copy_from_slice(&check.hash().to_le_bytes());
    conn.write_all(&reply)
        .context("stream server: write the count and checksum")?;
    conn.flush().context("stream server: flush")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic xorshift for split points.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    fn sent_stream(size: usize, chunks: u64) -> (Vec<u8>, StreamCheck) {
        let mut sender = StreamCheck::new(size);
        let mut buf: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let mut stream = Vec::new();
        for seq in 0..chunks {
            sender.stamp(&mut buf, seq);
            stream.extend_from_slice(&buf);
        }
        (stream, sender)
    }

    fn received(stream: &[u8], size: usize, seed: u64) -> StreamCheck {
        let mut receiver = StreamCheck::new(size);
        let mut state = seed | 1;
        let mut i = 0;
        while i < stream.len() {
            let n = (next(&mut state) as usize % (3 * size + 5) + 1).min(stream.len() - i);
            receiver.feed(&stream[i..i + n]);
            i += n;
        }
        receiver
    }

    #[test]
    fn receiver_matches_sender_for_any_split() {
        for size in [1, 2, 7, 8, 9, 15, 16, 17, 64, 100, 4096] {
            let (stream, sender) = sent_stream(size, 300);
            for seed in 1..6 {
                let receiver = received(&stream, size, seed);
                assert_eq!(receiver.bytes(), sender.bytes(), "size {size}");
                assert_eq!(receiver.hash(), sender.hash(), "size {size} seed {seed}");
            }
        }
    }

    #[test]
    fn reordered_or_duplicated_chunks_change_the_hash() {
        let size = 64;
        let (stream, sender) = sent_stream(size, 10);
        let mut swapped = stream.clone();
        swapped[..size].copy_from_slice(&stream[size..2 * size]);
        swapped[size..2 * size].copy_from_slice(&stream[..size]);
        assert_ne!(received(&swapped, size, 3).hash(), sender.hash());

        let mut duplicated = stream.clone();
        duplicated[2 * size..3 * size].copy_from_slice(&stream[size..2 * size]);
        assert_ne!(received(&duplicated, size, 3).hash(), sender.hash());
    }

    #[test]
    fn a_torn_tail_changes_the_hash() {
        let size = 4096;
        let (mut stream, sender) = sent_stream(size, 4);
        stream[2 * size - 1] ^= 1;
        assert_ne!(received(&stream, size, 9).hash(), sender.hash());
    }
}
