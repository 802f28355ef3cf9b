//! Request/response ("rr"): round-trip latency of `size`-byte ping-pongs.
//!
//! The client writes `size` bytes, the server reads exactly `size` bytes and
//! writes them back, the client reads them; each round trip is timed into an
//! HDR histogram in nanoseconds. Every request carries its transaction number
//! in its first (up to) 8 bytes and, when `size >= 16`, the number XOR a
//! constant in its last 8 bytes; the client checks both in the echo, so a
//! lost, repeated, stale or torn message is an error, at the cost of two loads.

use std::io;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;

use super::progress::Ticker;
use super::transport::Conn;
use super::Schedule;

const TAIL_MAGIC: u64 = 0x5a5a_c3c3_9696_0f0f;

/// What the client measured.
pub struct RrOutcome {
    /// Round-trip times of the measured transactions, in nanoseconds.
    pub hist: Histogram<u64>,
    /// Measured transactions (warm-up excluded).
    pub transactions: u64,
    /// Wall time of the measured transactions.
    pub seconds: f64,
}

/// Write transaction number `seq` into a request (head, and tail when `size >= 16`).
pub(crate) fn stamp(buf: &mut [u8], seq: u64) {
    let head = buf.len().min(8);
    buf[..head].copy_from_slice(&seq.to_le_bytes()[..head]);
    if buf.len() >= 16 {
        let tail = buf.len() - 8;
        buf[tail..].copy_from_slice(&(seq ^ TAIL_MAGIC).to_le_bytes());
    }
}

/// Check that `buf` is the echo of request `seq`.
pub(crate) fn check(buf: &[u8], seq: u64) -> Result<()> {
    let head = buf.len().min(8);
    let mut ok = buf[..head] == seq.to_le_bytes()[..head];
    if buf.len() >= 16 {
        ok &= buf[buf.len() - 8..] == (seq ^ TAIL_MAGIC).to_le_bytes();
    }
    if !ok {
        bail!("rr: the echo of transaction {seq} does not match what was sent");
    }
    Ok(())
}

/// Run the client side: unmeasured until `schedule.warm_end`, then measured
/// until the first round trip that ends after `schedule.deadline`.
pub fn client(
    conn: &mut dyn Conn,
    size: usize,
    schedule: Schedule,
    ticker: &mut Ticker,
) -> Result<RrOutcome> {
    let mut tx = vec![0xa5u8; size];
    let mut rx = vec![0u8; size];
    let mut seq = 0u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .context("creating the latency histogram")?;

    loop {
        let now = Instant::now();
        if now >= schedule.warm_end {
            break;
        }
        ticker.tick(now);
        stamp(&mut tx, seq);
        conn.write_all(&tx).context("rr: write")?;
        conn.read_exact(&mut rx).context("rr: read the echo")?;
        check(&rx, seq)?;
        seq += 1;
    }

    let t0 = Instant::now();
    let deadline = schedule.deadline;
    let mut transactions = 0u64;
    let end = loop {
        stamp(&mut tx, seq);
        let start = Instant::now();
        conn.write_all(&tx).context("rr: write")?;
        conn.read_exact(&mut rx).context("rr: read the echo")?;
        let done = Instant::now();
        check(&rx, seq)?;
        hist.saturating_record(done.duration_since(start).as_nanos() as u64);
        transactions += 1;
        seq += 1;
        ticker.tick(done);
        if done >= deadline {
            break done;
        }
    };
    conn.finish().context("rr: closing the connection")?;

    Ok(RrOutcome {
        hist,
        transactions,
        seconds: end.duration_since(t0).as_secs_f64(),
    })
}

/// Fill `buf` from `conn`; `Ok(false)` on a clean EOF before the first byte.
pub(crate) fn read_message(conn: &mut dyn Conn, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match conn.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "peer closed after {got} of {} bytes of a request",
                        buf.len()
                    ),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Run the server side: echo `size`-byte messages until the client closes.
pub fn server(conn: &mut dyn Conn, size: usize) -> Result<()> {
    let mut buf = vec![0u8; size];
    while read_message(conn, &mut buf).context("rr server: read")? {
        conn.write_all(&buf).context("rr server: write the echo")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_and_check_agree_for_all_small_sizes() {
        for size in 1..40 {
            let mut buf = vec![0u8; size];
            stamp(&mut buf, 0x0102_0304_0506_0708);
            check(&buf, 0x0102_0304_0506_0708).unwrap();
            assert!(check(&buf, 0x0102_0304_0506_0709).is_err(), "size {size}");
        }
    }

    #[test]
    fn check_catches_a_stale_tail() {
        let mut buf = vec![0u8; 64];
        stamp(&mut buf, 7);
        buf[..8].copy_from_slice(&8u64.to_le_bytes());
        assert!(check(&buf, 8).is_err());
    }
}
