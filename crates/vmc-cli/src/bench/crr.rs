//! Connect/request/response ("crr"): how fast TCP connections can be set up,
//! used once and torn down.
//!
//! Each transaction is: connect, write one `size`-byte request, read the
//! `size`-byte echo, close. The client times each transaction from just before
//! `connect` to the arrival of the echo, in nanoseconds, into an HDR
//! histogram; the close is not in that time but is in the loop, so it counts
//! against the connection rate. Requests are stamped and checked as in rr
//! ([`super::rr`]): the transaction counter in the first (up to) 8 bytes.
//!
//! The client closes first, so the TIME_WAIT state (60 s on Linux) is on the
//! client's side, one local port each. Linux reuses them for new loopback
//! connections by default (`net.ipv4.tcp_tw_reuse = 2`); where it does not, the
//! ports run out and `connect` fails with `EADDRNOTAVAIL`, which ends the run
//! with an error that says so.
//!
//! The server side is a pool of threads, each accepting on the shared
//! listener and serving the connection it got to its end (read the request,
//! echo it, read the client's close) before accepting the next; a pool of one
//! serves connections one after the other. The pool stops when told to: the
//! listening socket is shut down, which makes the blocked `accept`s fail.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;

use super::progress::Ticker;
use super::rr::{check, read_message, stamp};
use super::transport::{self, Conn, Listener, Transport};
use super::{Schedule, Tally};

/// What one client thread measured.
pub struct CrrOutcome {
    /// Connect-to-echo times of the measured transactions, in nanoseconds.
    pub hist: Histogram<u64>,
    /// Measured transactions (warm-up excluded).
    pub transactions: u64,
    /// Wall time of the measured transactions, closes included.
    pub seconds: f64,
    /// The client's view of every connection it made (warm-up included).
    pub tally: Tally,
}

/// Explain a failed `connect`; running out of local ports gets its own advice.
fn connect_error(error: io::Error, transport: Transport, made: u64) -> anyhow::Error {
    let out_of_ports =
        rustix::io::Errno::from_io_error(&error) == Some(rustix::io::Errno::ADDRNOTAVAIL);
    let error = anyhow::Error::new(error);
    if out_of_ports {
        error.context(format!(
            "crr {transport}: connect failed after {made} connections from this thread: the \
             client ran out of local ports (each closed connection holds one in TIME_WAIT for \
             60 s). Use a shorter --duration or fewer --conns, or widen \
             net.ipv4.ip_local_port_range / enable net.ipv4.tcp_tw_reuse"
        ))
    } else {
        error.context(format!(
            "crr {transport}: connect failed after {made} connections from this thread"
        ))
    }
}

/// One transaction: connect, request `seq`, read and check the echo, close.
/// Returns when the echo arrived.
fn transaction(
    transport: Transport,
    addr: &str,
    tx: &mut [u8],
    rx: &mut [u8],
    seq: u64,
    tally: &mut Tally,
) -> Result<Instant> {
    let mut conn =
        transport::connect(transport, addr).map_err(|e| connect_error(e, transport, seq))?;
    stamp(tx, seq);
    conn.write_all(tx).context("crr: write the request")?;
    conn.read_exact(rx).context("crr: read the response")?;
    let done = Instant::now();
    check(rx, seq)?;
    tally.add(conn.vmc_state());
    // The client closes first (TIME_WAIT stays here, not on the server).
    drop(conn);
    Ok(done)
}

/// Run one client thread: transactions until `schedule.warm_end` unmeasured,
/// then measured until the first one that ends after `schedule.deadline`.
/// Stops early, with what it has, if `abort` is raised by another thread.
pub fn client(
    transport: Transport,
    addr: &str,
    size: usize,
    schedule: Schedule,
    ticker: &mut Ticker,
    abort: &AtomicBool,
) -> Result<CrrOutcome> {
    let mut tx = vec![0xa5u8; size];
    let mut rx = vec![0u8; size];
    let mut seq = 0u64;
    let mut tally = Tally::default();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .context("creating the latency histogram")?;

    loop {
        let now = Instant::now();
        if now >= schedule.warm_end || abort.load(Ordering::Relaxed) {
            break;
        }
        ticker.tick(now);
        transaction(transport, addr, &mut tx, &mut rx, seq, &mut tally)?;
        seq += 1;
    }

    let t0 = Instant::now();
    let mut transactions = 0u64;
    let end = loop {
        let start = Instant::now();
        let done = transaction(transport, addr, &mut tx, &mut rx, seq, &mut tally)?;
        hist.saturating_record(done.duration_since(start).as_nanos() as u64);
        transactions += 1;
        seq += 1;
        ticker.tick(done);
        if done >= schedule.deadline || abort.load(Ordering::Relaxed) {
            break Instant::now();
        }
    };
    Ok(CrrOutcome {
        hist,
        transactions,
        seconds: end.duration_since(t0).as_secs_f64(),
        tally,
    })
}

/// Serve one connection to its end: request, echo, the client's close.
fn serve_one(conn: &mut dyn Conn, buf: &mut [u8]) -> Result<()> {
    if !read_message(conn, buf).context("crr server: read the request")? {
        bail!("crr server: a client closed its connection without a request");
    }
    conn.write_all(buf)
        .context("crr server: write the response")?;
    conn.flush().context("crr server: flush")?;
    // Wait for the client to close first, so TIME_WAIT is on its side.
    let mut extra = [0u8; 1];
    loop {
        match conn.read(&mut extra) {
            Ok(0) => return Ok(()),
            Ok(_) => bail!("crr server: a client sent more than one request"),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A reset instead of a clean close still ends the transaction.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e).context("crr server: wait for the client's close"),
        }
    }
}

/// Shut the listening socket down: every blocked and future `accept` fails.
fn shut(listener: &Listener) {
    if let Some(fd) = listener.tcp_socket() {
        if let Err(e) = rustix::net::shutdown(fd, rustix::net::Shutdown::Read) {
            tracing::warn!("crr server: shutting the listener down: {e}");
        }
    }
}

/// One thread of the pool: accept and serve until the listener is shut down.
fn worker(listener: &Listener, size: usize, stopping: &AtomicBool) -> Result<Tally> {
    let mut buf = vec![0u8; size];
    let mut tally = Tally::default();
    loop {
        let mut conn = match listener.accept() {
            Ok(conn) => conn,
            Err(_) if stopping.load(Ordering::SeqCst) => return Ok(tally),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e).context("crr server: accept"),
        };
        serve_one(&mut *conn, &mut buf)?;
        tally.add(conn.vmc_state());
    }
}

/// Serve crr connections with a pool of `workers` threads until `wait_for_stop`
/// returns; then report every connection served.
///
/// If a worker fails, the listener is shut down at once (so the client's
/// connects fail instead of waiting in the backlog) and the error is printed;
/// the other workers finish the connection they have and stop.
pub fn serve(
    listener: &Listener,
    size: usize,
    workers: usize,
    wait_for_stop: impl FnOnce(),
) -> Result<Tally> {
    if listener.tcp_socket().is_none() {
        bail!("crr needs a TCP listener (vmc or tcp)");
    }
    let stopping = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|_| {
                let stopping = &stopping;
                scope.spawn(move || {
                    let out = worker(listener, size, stopping);
                    if let Err(e) = &out {
                        eprintln!("vmc bench server (crr): error: {e:#}");
                        stopping.store(true, Ordering::SeqCst);
                        shut(listener);
                    }
                    out
                })
            })
            .collect();
        wait_for_stop();
        stopping.store(true, Ordering::SeqCst);
        shut(listener);
        let mut tally = Tally::default();
        let mut ok = true;
        for handle in handles {
            match handle.join() {
                Ok(Ok(part)) => tally.merge(part),
                Ok(Err(_)) => ok = false,
                Err(_) => ok = false,
            }
        }
        if ok {
            Ok(tally)
        } else {
            Err(anyhow!("a crr server thread failed (see above)"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_ports_is_explained() {
        let errno = rustix::io::Errno::ADDRNOTAVAIL.raw_os_error();
        let text = format!(
            "{:#}",
            connect_error(io::Error::from_raw_os_error(errno), Transport::Tcp, 28_000)
        );
        assert!(text.contains("after 28000 connections"), "{text}");
        assert!(text.contains("ran out of local ports"), "{text}");
        assert!(text.contains("TIME_WAIT"), "{text}");

        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let text = format!("{:#}", connect_error(refused, Transport::Vmc, 3));
        assert!(
            text.starts_with("crr vmc: connect failed after 3"),
            "{text}"
        );
        assert!(!text.contains("local ports"), "{text}");
    }

    #[test]
    fn a_pool_serves_until_stopped_and_counts_its_connections() {
        for (transport, workers) in [(Transport::Tcp, 1), (Transport::Vmc, 3)] {
            let listener =
                transport::listen(transport, None, &transport::ShmTuning::default()).unwrap();
            let addr = listener.local_addr().to_owned();
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let tally = std::thread::scope(|scope| {
                let server = scope.spawn(|| {
                    serve(&listener, 16, workers, move || {
                        let _ = stop_rx.recv();
                    })
                });
                let mut tally = Tally::default();
                let (mut tx, mut rx) = ([0u8; 16], [0u8; 16]);
                for seq in 0..20 {
                    transaction(transport, &addr, &mut tx, &mut rx, seq, &mut tally).unwrap();
                }
                drop(stop_tx);
                let served = server.join().unwrap().unwrap();
                assert_eq!(tally.total, 20);
                served
            });
            assert_eq!(tally.total, 20, "{transport}");
            if transport == Transport::Vmc {
                // (A reply may miss its channel now and then on a loaded machine:
                // the server waits 2 ms for the client's answer to its offer.)
                assert!(tally.accelerated >= 18, "{tally:?}");
                assert!(
                    tally
                        .why_not
                        .keys()
                        .all(|k| k.starts_with("channel attached too late")),
                    "{tally:?}"
                );
            } else {
                assert_eq!(tally.accelerated, 0);
                assert!(tally.why_not.is_empty());
            }
        }
    }
}
