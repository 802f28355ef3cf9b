//! The tokio types (`vmc_conn::tokio`) end to end in one process: many accelerated
//! connections at once, a reader and a writer on one stream at once, the fallback
//! to plain TCP both ways, end of stream, a peer that goes away, and (printed, not
//! asserted) throughput and round-trip figures beside tokio's own TCP.
//!
//! Run with `cargo test --release -p vmc-conn --features tokio --test tokio`.

#![cfg(feature = "tokio")]

mod common;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use vmc_conn::tokio::{TcpListener, TcpStream};
use vmc_conn::Fallback;

use common::{check, fill, heavy, private_registry, rate, Rng};

/// Runs `f` on a two-thread runtime (the machines this runs on have two cores),
/// failing if it takes longer than `limit`.
fn run<F: Future>(limit: Duration, f: F) -> F::Output {
    private_registry();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match tokio::time::timeout(limit, f).await {
            Ok(v) => v,
            Err(_) => panic!("not done within {limit:?}"),
        }
    })
}

/// Writes `total` bytes of stream `tag` in random pieces of at most `chunk`, then
/// shuts the direction down.
async fn write_stream(
    mut w: impl AsyncWrite + Unpin,
    tag: u8,
    total: u64,
    chunk: usize,
    seed: u64,
) -> io::Result<u64> {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    while off < total {
        let n = (1 + rng.below(chunk as u64)).min(total - off) as usize;
        fill(tag, off, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        off += n as u64;
    }
    w.shutdown().await?;
    Ok(off)
}

/// Reads stream `tag` to its end in random pieces of at most `chunk`, checking every
/// byte; returns how many came.
async fn read_stream(
    mut r: impl AsyncRead + Unpin,
    tag: u8,
    chunk: usize,
    seed: u64,
) -> io::Result<u64> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut buf = vec![0u8; chunk];
    let mut scratch = vec![0u8; chunk];
    let mut off = 0u64;
    loop {
        let want = 1 + rng.below(chunk as u64) as usize;
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok(off);
        }
        check(tag, off, &buf[..n], &mut scratch).unwrap_or_else(|e| panic!("{e}"));
        off += n as u64;
    }
}

/// Echoes `s` until its peer shuts its sending direction down; returns the bytes
/// echoed and whether the connection was accelerated.
async fn echo(s: TcpStream) -> (u64, bool) {
    let (mut r, mut w) = s.into_split();
    let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
    w.shutdown().await.unwrap();
    (n, r.get_ref().is_accelerated())
}

#[test]
fn sixteen_echo_connections_at_once_are_accelerated_and_exact() {
    const CONNS: usize = 16;
    const EACH: u64 = 3 << 20;
    let _heavy = heavy();
    let started = Instant::now();
    run(Duration::from_secs(30), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(listener.fallback_reason().is_none());
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut echoes = Vec::new();
            for _ in 0..CONNS {
                let (s, peer) = listener.accept().await.unwrap();
                assert_eq!(s.peer_addr().unwrap(), peer);
                echoes.push(tokio::spawn(echo(s)));
            }
            let mut out = Vec::new();
            for e in echoes {
                out.push(e.await.unwrap());
            }
            out
        });
        let mut clients = Vec::new();
        for i in 0..CONNS {
            clients.push(tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.unwrap();
                let tag = i as u8;
                let (r, w) = s.into_split();
                let writer = tokio::spawn(write_stream(w, tag, EACH, 100_000, i as u64));
                let stream = r.get_ref().clone();
                let got = read_stream(r, tag, 64 * 1024, i as u64).await.unwrap();
                let sent = writer.await.unwrap().unwrap();
                (sent, got, stream.is_accelerated(), stream.traffic())
            }));
        }
        for c in clients {
            let (sent, got, accel, traffic) = c.await.unwrap();
            assert_eq!((sent, got), (EACH, EACH));
            assert!(accel, "a client stayed on TCP");
            // (A client may write its whole stream into TCP's buffers before the
            // handshake is over; the echo comes back on the ring.)
            assert!(traffic.shm_in > 0, "{traffic:?}");
        }
        for (n, accel) in server.await.unwrap() {
            assert_eq!(n, EACH);
            assert!(accel, "a server end stayed on TCP");
        }
    });
    eprintln!(
        "16 connections x {} MiB echoed in {:?}",
        EACH >> 20,
        started.elapsed()
    );
}

#[test]
fn clients_see_acceleration_and_shm_traffic() {
    run(Duration::from_secs(10), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            echo(s).await
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i * 13 + i / 97) as u8).collect();
        let mut back = vec![0u8; msg.len()];
        for (i, piece) in msg.chunks(10_000).enumerate() {
            c.write_all(piece).await.unwrap();
            c.read_exact(&mut back[i * 10_000..i * 10_000 + piece.len()])
                .await
                .unwrap();
        }
        assert_eq!(back, msg);
        assert!(c.is_accelerated(), "fallback: {:?}", c.fallback_reason());
        assert_eq!(c.fallback_reason(), None);
        let t = c.get_ref().traffic();
        assert!(t.shm_out > 0 && t.shm_in > 0, "{t:?}");
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (n, accel) = server.await.unwrap();
        assert_eq!(n, msg.len() as u64);
        assert!(accel);
    });
}

#[test]
fn a_reader_and_a_writer_on_one_stream_move_64_mib_each_way() {
    const TOTAL: u64 = 64 << 20;
    let _heavy = heavy();
    let started = Instant::now();
    run(Duration::from_secs(30), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Server: borrowed halves, both polled by one task.
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let (r, w) = s.split();
            let (got, sent) = tokio::join!(
                read_stream(r, 1, 256 * 1024, 11),
                write_stream(w, 2, TOTAL, 256 * 1024, 12),
            );
            (got.unwrap(), sent.unwrap(), s.is_accelerated())
        });
        // Client: owned halves, each in a task of its own.
        let c = TcpStream::connect(addr).await.unwrap();
        let (r, w) = c.into_split();
        let writer = tokio::spawn(write_stream(w, 1, TOTAL, 256 * 1024, 13));
        let reader = tokio::spawn(async move { read_stream(r, 2, 256 * 1024, 14).await.unwrap() });
        assert_eq!(writer.await.unwrap().unwrap(), TOTAL);
        assert_eq!(reader.await.unwrap(), TOTAL);
        let (got, sent, accel) = server.await.unwrap();
        assert_eq!((got, sent), (TOTAL, TOTAL));
        assert!(accel);
    });
    let d = started.elapsed();
    eprintln!(
        "64 MiB each way through split streams in {d:?} ({:.0} MiB/s each way)",
        common::rate(TOTAL, d)
    );
}

#[test]
fn a_client_of_a_plain_tokio_listener_falls_back_with_exact_data() {
    run(Duration::from_secs(10), async {
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = plain.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = plain.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap()
        });
        let c = TcpStream::connect(addr).await.unwrap();
        assert!(!c.is_accelerated());
        assert_eq!(c.fallback_reason(), Some(Fallback::NoListener));
        let (r, w) = c.into_split();
        let writer = tokio::spawn(write_stream(w, 7, 4 << 20, 50_000, 7));
        let got = read_stream(r, 7, 32 * 1024, 7).await.unwrap();
        assert_eq!(got, 4 << 20);
        assert_eq!(writer.await.unwrap().unwrap(), 4 << 20);
        assert_eq!(server.await.unwrap(), 4 << 20);
    });
}

#[test]
fn a_plain_tokio_client_of_a_vmc_listener_gets_plain_tcp() {
    run(Duration::from_secs(10), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
            // The attach window has long passed by now (the client waits for it).
            (n, r.get_ref().fallback_reason())
        });
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        // The window running out is the point: after it, the data still flows.
        tokio::time::sleep(vmc_conn::ATTACH_WINDOW + Duration::from_millis(100)).await;
        let (r, w) = c.into_split();
        let writer = tokio::spawn(write_stream(w, 3, 1 << 20, 30_000, 3));
        let got = read_stream(r, 3, 16 * 1024, 3).await.unwrap();
        assert_eq!(got, 1 << 20);
        writer.await.unwrap().unwrap();
        let (n, reason) = server.await.unwrap();
        assert_eq!(n, 5 + (1 << 20));
        assert_eq!(reason, Some(Fallback::PeerNotVmc));
    });
}

#[test]
fn end_of_stream_after_the_peer_shuts_down() {
    run(Duration::from_secs(10), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            // Reads after the end keep returning 0.
            let mut buf = [0u8; 16];
            assert_eq!(s.read(&mut buf).await.unwrap(), 0);
            s.write_all(b"bye").await.unwrap();
            s.shutdown().await.unwrap();
            got
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"hello ").await.unwrap();
        // The channel up (the server's read moves its end along), so the end is found
        // on the ring too.
        settle(&c).await;
        assert!(c.is_accelerated(), "{:?}", c.fallback_reason());
        c.write_all(b"world").await.unwrap();
        c.shutdown().await.unwrap();
        // Writing after our own shutdown fails, as on a socket.
        assert!(c.write_all(b"more").await.is_err());
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        assert_eq!(server.await.unwrap(), b"hello world");
        assert!(c.is_accelerated());
    });
}

#[test]
fn a_reader_waiting_before_the_peer_shuts_down_is_woken() {
    run(Duration::from_secs(10), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        // Bring the channel up and move both directions onto it.
        c.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        s.write_all(b"y").await.unwrap();
        c.read_exact(&mut one).await.unwrap();
        // Each write of the peer comes while the reader waits (a poll of its read
        // left it waiting).
        let (mut c, polls) = Counted::new(c);
        let first = tokio::spawn(async move {
            let n = c.read(&mut [0u8; 64]).await.unwrap();
            (n, c)
        });
        polls.waiting_after(0).await;
        s.write_all(b"late").await.unwrap();
        let (n, mut c) = first.await.unwrap();
        let seen = polls.pending();
        let reader = tokio::spawn(async move {
            let end = c.read(&mut [0u8; 64]).await.unwrap();
            (end, c.io.is_accelerated())
        });
        polls.waiting_after(seen).await;
        s.shutdown().await.unwrap();
        let (end, accel) = reader.await.unwrap();
        assert_eq!((n, end), (4, 0));
        assert!(accel);
    });
}

/// Waits (at most 5 s) until the handshake of `s` is over.
/// Waits until neither end's handshake is in flight, moving both along (the
/// accepting end calls the client once it is used).
async fn settle_pair(c: &TcpStream, s: &TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.is_pending() | s.is_pending() {
        assert!(Instant::now() < deadline, "the handshake did not settle");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn settle(s: &TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.is_pending() {
        assert!(Instant::now() < deadline, "the handshake did not settle");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// How often a reader or writer was polled (to see that a blocked one sleeps), and
/// how often a poll left it waiting (to know that it waits).
#[derive(Default)]
struct Polls {
    all: AtomicU64,
    pending: AtomicU64,
}

impl Polls {
    fn count<R>(&self, p: Poll<R>) -> Poll<R> {
        self.all.fetch_add(1, Ordering::Relaxed);
        if p.is_pending() {
            self.pending.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    fn all(&self) -> u64 {
        self.all.load(Ordering::Relaxed)
    }

    fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Waits (at most 5 s) until more than `seen` polls have left the task waiting:
    /// the event "it waits", where a fixed sleep would only hope it does by then.
    async fn waiting_after(&self, seen: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pending() <= seen {
            assert!(Instant::now() < deadline, "the task never waited");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A reader or writer whose polls are counted.
struct Counted<T> {
    io: T,
    polls: Arc<Polls>,
}

impl<T> Counted<T> {
    fn new(io: T) -> (Counted<T>, Arc<Polls>) {
        let polls = Arc::new(Polls::default());
        (
            Counted {
                io,
                polls: polls.clone(),
            },
            polls,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.io).poll_read(cx, buf);
        self.polls.count(p)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write(cx, buf);
        self.polls.count(p)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[test]
fn a_blocked_reader_and_a_blocked_writer_sleep_and_are_woken_one_at_a_time() {
    const BIG: u64 = 12 << 20; // more than a ring and TCP's buffers hold
    run(Duration::from_secs(15), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        // Both directions onto the rings.
        c.write_all(b"p").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        s.write_all(b"q").await.unwrap();
        c.read_exact(&mut one).await.unwrap();
        assert!(s.is_accelerated() && c.is_accelerated());

        let (r, w) = s.into_split();
        let (mut r, read_polls) = Counted::new(r);
        let (w, write_polls) = Counted::new(w);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4];
            r.read_exact(&mut buf).await.unwrap();
            buf
        });
        let writer = tokio::spawn(write_stream(w, 9, BIG, 256 * 1024, 9));
        // Nobody reads or writes on the other end: both wait.
        read_polls.waiting_after(0).await;
        write_polls.waiting_after(0).await;
        let (r0, w0) = (read_polls.all(), write_polls.all());
        // Watching them for a while is the point: they must not be polled meanwhile.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (r1, w1) = (read_polls.all(), write_polls.all());
        assert!(!reader.is_finished() && !writer.is_finished());
        assert!(
            r1 - r0 < 10 && w1 - w0 < 10,
            "blocked tasks kept being polled: reader {} times, writer {} times in 300 ms",
            r1 - r0,
            w1 - w0
        );

        // Release the writer only: the reader keeps waiting, without spinning.
        let (cr, mut cw) = c.into_split();
        let got = read_stream(cr, 9, 64 * 1024, 9).await.unwrap();
        assert_eq!(got, BIG);
        assert_eq!(writer.await.unwrap().unwrap(), BIG);
        let r2 = read_polls.all();
        // Again a while in which the waiting reader must not be polled.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!reader.is_finished());
        let r3 = read_polls.all();
        assert!(
            r3 - r2 < 10,
            "a blocked reader was polled {} times",
            r3 - r2
        );

        // Then the reader.
        cw.write_all(b"done").await.unwrap();
        assert_eq!(&reader.await.unwrap(), b"done");
    });
}

fn is_eof_or_reset(r: &io::Result<usize>) -> bool {
    match r {
        Ok(0) => true,
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn a_peer_dropped_mid_stream_gives_end_of_stream_or_reset() {
    run(Duration::from_secs(15), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        // 1. The peer writes part of a stream and drops the connection, never shutting
        //    it down: every byte written arrives, then EOF or a reset.
        let server = tokio::spawn({
            let sent = 3u64 << 20;
            async move {
                let (mut s, _) = listener.accept().await.unwrap();
                settle(&s).await;
                assert!(s.is_accelerated());
                let mut buf = vec![0u8; 64 * 1024];
                let mut off = 0;
                while off < sent {
                    let n = buf.len().min((sent - off) as usize);
                    fill(5, off, &mut buf[..n]);
                    s.write_all(&buf[..n]).await.unwrap();
                    off += n as u64;
                }
                drop(s);
                listener
            }
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut scratch = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        let end = loop {
            let r = c.read(&mut buf).await;
            match r {
                Ok(n) if n > 0 => {
                    check(5, off, &buf[..n], &mut scratch).unwrap();
                    off += n as u64;
                }
                r => break r,
            }
        };
        assert!(is_eof_or_reset(&end), "{end:?}");
        if end.is_ok() {
            assert_eq!(off, 3 << 20, "EOF before every byte was read");
        }
        let listener = server.await.unwrap();

        // 2. The peer drops the connection while we write: a write fails (broken pipe
        //    or reset) instead of waiting forever.
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            s.read_exact(&mut buf).await.unwrap();
            drop(s);
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut wrote = 0u64;
        let err = loop {
            match c.write(&chunk).await {
                Ok(n) => wrote += n as u64,
                Err(e) => break e,
            }
            assert!(wrote < 1 << 30, "writes to a dropped peer kept succeeding");
        };
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err:?}"
        );
        server.await.unwrap();
        // And reading from it ends too.
        let r = c.read(&mut buf).await;
        assert!(is_eof_or_reset(&r), "{r:?}");
    });
}

#[test]
fn a_waiting_reader_is_woken_when_the_peer_is_dropped() {
    run(Duration::from_secs(10), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"z").await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        let (mut c, polls) = Counted::new(c);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            c.read(&mut buf).await
        });
        polls.waiting_after(0).await;
        drop(s);
        let r = reader.await.unwrap();
        assert!(is_eof_or_reset(&r), "{r:?}");
    });
}

#[test]
fn many_small_exchanges_wake_both_ends_every_time() {
    // Every message waits for the answer: each read sleeps on the wait set and is
    // woken by the peer's next write.
    run(Duration::from_secs(10), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 8];
            loop {
                match s.read_exact(&mut buf).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => panic!("{e}"),
                }
                let v = u64::from_le_bytes(buf) + 1;
                s.write_all(&v.to_le_bytes()).await.unwrap();
            }
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 8];
        for i in 0..2000u64 {
            c.write_all(&i.to_le_bytes()).await.unwrap();
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(u64::from_le_bytes(buf), i + 1);
        }
        assert!(c.is_accelerated());
        c.shutdown().await.unwrap();
        server.await.unwrap();
    });
}

// ---- figures (printed, not asserted) --------------------------------------------------

/// Moves `total` bytes one way from `w` to `r`; the time it took.
async fn one_way<R, W>(mut r: R, mut w: W, total: u64) -> Duration
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let buf = vec![1u8; 256 * 1024];
        let mut off = 0;
        while off < total {
            let n = (buf.len() as u64).min(total - off) as usize;
            w.write_all(&buf[..n]).await.unwrap();
            off += n as u64;
        }
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    writer.await.unwrap();
    assert_eq!(got, total);
    started.elapsed()
}

/// Median round trip of `rounds` 64-byte ping-pongs between `a` and `b`.
async fn round_trips<A, B>(mut a: A, mut b: B, rounds: usize) -> Duration
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let pong = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while b.read_exact(&mut buf).await.is_ok() {
            b.write_all(&buf).await.unwrap();
        }
    });
    let mut buf = [0u8; 64];
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        a.write_all(&buf).await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
        times.push(t.elapsed());
    }
    a.shutdown().await.unwrap();
    drop(a);
    pong.await.unwrap();
    times.sort();
    times[times.len() / 2]
}

/// Bulk rate (MiB/s) and median round trip (us), for vmc and for tokio's TCP.
async fn figures(total: u64, rounds: usize) -> [(f64, f64); 2] {
    // vmc, accelerated (settled first, so that no byte goes by TCP).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = TcpStream::connect(addr).await.unwrap();
    let (s, _) = listener.accept().await.unwrap();
    settle_pair(&c, &s).await;
    assert!(c.is_accelerated() && s.is_accelerated());
    let vmc_bulk = one_way(s, c, total).await;
    let c = TcpStream::connect(addr).await.unwrap();
    let (s, _) = listener.accept().await.unwrap();
    settle_pair(&c, &s).await;
    c.set_nodelay(true).unwrap();
    s.set_nodelay(true).unwrap();
    let vmc_rtt = round_trips(c, s, rounds).await;

    // tokio's TCP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (s, _) = listener.accept().await.unwrap();
    let tcp_bulk = one_way(s, c, total).await;
    let c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (s, _) = listener.accept().await.unwrap();
    c.set_nodelay(true).unwrap();
    s.set_nodelay(true).unwrap();
    let tcp_rtt = round_trips(c, s, rounds).await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    [
        (rate(total, vmc_bulk), us(vmc_rtt)),
        (rate(total, tcp_bulk), us(tcp_rtt)),
    ]
}

#[test]
fn figures_beside_tokio_tcp() {
    const TOTAL: u64 = 256 << 20;
    const ROUNDS: usize = 5000;
    let _heavy = heavy();
    let multi = run(Duration::from_secs(30), figures(TOTAL, ROUNDS));
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(30), figures(TOTAL, ROUNDS))
                .await
                .expect("figures on one thread: not done within 30 s")
        });
    for (runtime, [vmc, tcp]) in [("2 worker threads", multi), ("current thread", current)] {
        eprintln!(
            "tokio, {runtime}: {} MiB one way: vmc {:.0} MiB/s, TCP {:.0} MiB/s; \
             64-byte round trip (median of {ROUNDS}): vmc {:.1} us, TCP {:.1} us",
            TOTAL >> 20,
            vmc.0,
            tcp.0,
            vmc.1,
            tcp.1,
        );
    }
}
