//! Exact path switching under load: both ends stream to each other while their
//! writers move their sending direction between TCP and shared memory thousands of
//! times; every byte is checked against its offset.

mod common;

use std::io::{Read, Write};
use std::thread;

use vmc_conn::{Path, TcpListener, TcpStream};

fn private_registry() {
    common::private_registry();
}

/// The byte at stream offset `i` of the stream tagged `tag`.
fn pattern(tag: u8, i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ tag
}

/// A small deterministic generator (xorshift), so failures replay.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes `total` bytes of stream `tag` in writes of up to `max_write` bytes,
/// moving the send path before every other write or so.
fn writer(s: TcpStream, tag: u8, total: u64, max_write: usize, seed: u64) -> u64 {
    let mut s = s;
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; max_write];
    let mut off = 0u64;
    let mut switches = 0u64;
    while off < total {
        if rng.below(2) == 0 {
            let to = if s.send_path() == Path::Shm {
                Path::Tcp
            } else {
                Path::Shm
            };
            s.set_send_path(to).unwrap();
            switches += 1;
        }
        let n = (1 + rng.below(buf.len() as u64)).min(total - off) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(tag, off + i as u64);
        }
        s.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    switches
}

/// Reads stream `tag` to its end and checks every byte.
fn reader(s: TcpStream, tag: u8, seed: u64) -> u64 {
    let mut s = s;
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; 100_000];
    let mut off = 0u64;
    loop {
        let want = 1 + rng.below(buf.len() as u64) as usize;
        let n = s.read(&mut buf[..want]).unwrap_or_else(|e| {
            panic!(
                "stream {tag} at {off}: {e}; path {:?}, {:?}",
                s.recv_path(),
                s.traffic()
            )
        });
        if n == 0 {
            return off;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != pattern(tag, off + i as u64) {
                let exp: Vec<u8> = (0..8).map(|j| pattern(tag, off + i as u64 + j)).collect();
                panic!(
                    "stream {tag} byte {}: got {:?} expected {:?}, read of {n}, path {:?}, traffic {:?}",
                    off + i as u64,
                    &buf[i..(i + 8).min(n)],
                    exp,
                    s.recv_path(),
                    s.traffic()
                );
            }
        }
        off += n as u64;
    }
}

/// Both directions stream at once, each end's writer moving its direction between
/// TCP and the ring before about every other write: more than 10,000 moves in all,
/// every byte checked.
#[test]
fn ten_thousand_switches_under_bidirectional_load_lose_nothing() {
    private_registry();
    const TOTAL: u64 = 48 << 20;
    const MAX_WRITE: usize = 8 << 10;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let r = s.try_clone().unwrap();
        let rd = thread::spawn(move || reader(r, 1, 11));
        let switches = writer(s, 2, TOTAL, MAX_WRITE, 12);
        (rd.join().unwrap(), switches)
    });
    let c = TcpStream::connect(addr).unwrap();
    let r = c.try_clone().unwrap();
    let rd = thread::spawn(move || reader(r, 2, 21));
    let switches = writer(c.clone(), 1, TOTAL, MAX_WRITE, 22);
    let got = rd.join().unwrap();
    let (server_got, server_switches) = server.join().unwrap();
    assert_eq!(got, TOTAL);
    assert_eq!(server_got, TOTAL);
    assert!(c.is_accelerated(), "{:?}", c.fallback_reason());
    let t = c.traffic();
    assert!(
        t.shm_out > 0 && t.tcp_out > 0 && t.shm_in > 0 && t.tcp_in > 0,
        "{t:?}"
    );
    eprintln!("switches: client {switches}, server {server_switches}; client traffic {t:?}");
    assert!(switches + server_switches > 10_000);
}

#[test]
fn one_way_stream_without_switches() {
    private_registry();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        reader(s, 1, 5)
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let mut off = 0u64;
    let mut buf = vec![0u8; 10_000];
    while off < 1 << 20 {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern(1, off + i as u64);
        }
        c.write_all(&buf).unwrap();
        off += buf.len() as u64;
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(server.join().unwrap(), off);
}

/// Checks `buf` against stream `tag` from offset `off`.
fn check_pattern(tag: u8, off: u64, buf: &[u8]) {
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(
            *b,
            pattern(tag, off + i as u64),
            "stream {tag} byte {}",
            off + i as u64
        );
    }
}

fn fill_pattern(tag: u8, off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(tag, off + i as u64);
    }
}

/// What exec does to a connection, in one process: move it to TCP for good, then
/// forget everything vmc held (the new image has only the kernel socket).
fn exec_like(s: TcpStream) -> std::net::TcpStream {
    s.settle_on_tcp(std::time::Duration::from_secs(2)).unwrap();
    assert!(!s.is_accelerated());
    let fd = std::os::fd::AsFd::as_fd(&s).try_clone_to_owned().unwrap();
    s.abandon();
    drop(s);
    std::net::TcpStream::from(fd)
}

/// The server streams `total` bytes (its writes find the ring full most of the
/// time) while the client reads a random part over shared memory, settles on TCP
/// and reads the rest from the bare kernel socket: every byte arrives once, in
/// order. The client's own stream, half sent before and half after, arrives too.
#[test]
fn settling_on_tcp_mid_stream_hands_every_byte_to_the_kernel_socket() {
    private_registry();
    const TOTAL: u64 = 4 << 20;
    const BACK: u64 = 1 << 20;
    let mut rng = Rng(0x005e_771e);
    for round in 0..12 {
        let split = rng.below(TOTAL);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            // The stream starts on shared memory: wait for the channel first.
            common::settle(&s);
            let r = s.try_clone().unwrap();
            let rd = thread::spawn(move || reader(r, 1, 7));
            let mut s = s;
            let mut buf = vec![0u8; 50_000];
            let mut off = 0;
            while off < TOTAL {
                let n = buf.len().min((TOTAL - off) as usize);
                fill_pattern(2, off, &mut buf[..n]);
                s.write_all(&buf[..n]).unwrap();
                off += n as u64;
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            (rd.join().unwrap(), s.traffic())
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let mut out = vec![0u8; (BACK / 2) as usize];
        fill_pattern(1, 0, &mut out);
        c.write_all(&out).unwrap();
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        while got < split {
            let want = buf.len().min((split - got) as usize);
            let n = c.read(&mut buf[..want]).unwrap();
            assert!(n > 0);
            check_pattern(2, got, &buf[..n]);
            got += n as u64;
        }
        let shm_in = c.traffic().shm_in;
        let mut k = exec_like(c);
        fill_pattern(1, BACK / 2, &mut out);
        k.write_all(&out).unwrap();
        k.shutdown(std::net::Shutdown::Write).unwrap();
        loop {
            let n = k.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            check_pattern(2, got, &buf[..n]);
            got += n as u64;
        }
        let (server_got, t) = server.join().unwrap();
        assert_eq!(got, TOTAL, "round {round}, split at {split}");
        assert_eq!(server_got, BACK, "round {round}");
        assert!(shm_in > 0 && t.shm_out > 0, "round {round}: {t:?}");
    }
}

/// Request/response: the server sends a request over shared memory and waits for
/// the answer; the client reads only part of the request, then settles on TCP (as
/// before exec). The server, blocked in its read, must still send the unread rest
/// again on TCP, or both would wait forever.
#[test]
fn a_peer_blocked_in_read_still_sends_the_unread_rest_again() {
    private_registry();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // The request goes over shared memory: wait for the channel first.
        common::settle(&s);
        let mut req = vec![0u8; 10_000];
        fill_pattern(3, 0, &mut req);
        s.write_all(&req).unwrap();
        let mut answer = [0u8; 4];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"done");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        s.traffic()
    });
    let mut c = TcpStream::connect(addr).unwrap();
    // Our sending direction on the ring first, so settling moves it too.
    c.write_all(b"").unwrap();
    let mut first = vec![0u8; 3_000];
    c.read_exact(&mut first).unwrap();
    check_pattern(3, 0, &first);
    assert!(c.traffic().shm_in > 0, "{:?}", c.traffic());
    let mut k = exec_like(c);
    let mut rest = vec![0u8; 7_000];
    k.read_exact(&mut rest).unwrap();
    check_pattern(3, 3_000, &rest);
    k.write_all(b"done").unwrap();
    drop(k);
    let t = server.join().unwrap();
    assert_eq!(t.shm_out, 10_000, "{t:?}");
    assert_eq!(t.tcp_out, 7_000, "sent again on TCP: {t:?}");
}

/// An end that execs with bytes still unread on its ring revokes the ring, which
/// ends it exactly where the peer is, and puts those bytes on TCP; its last word
/// (the control channel shut for reading, then drained) makes a REWIND the peer
/// sends after that fail. The peer, finding its ring revoked, reads TCP. Before
/// the last word, such a REWIND went into a socket nobody would read: the peer
/// gave the ring up, and the ring's unread bytes were lost.
#[test]
fn a_rewind_sent_as_the_other_end_execs_is_refused_and_nothing_is_lost() {
    private_registry();
    const FIRST: u64 = 1000;
    const UNREAD: u64 = 48 * 1024;
    const AFTER: u64 = 100_000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (read_some, wait_read) = std::sync::mpsc::channel::<()>();
    let (settled, wait_settled) = std::sync::mpsc::channel::<()>();
    let (tried, wait_try) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        common::settle(&s);
        assert!(s.is_accelerated(), "{:?}", s.fallback_reason());
        let mut buf = vec![0u8; (FIRST + UNREAD) as usize];
        fill_pattern(3, 0, &mut buf);
        s.write_all(&buf[..FIRST as usize]).unwrap();
        // The client has entered the ring (and answered the move onto it).
        wait_read.recv().unwrap();
        s.write_all(&buf[FIRST as usize..]).unwrap();
        assert_eq!(s.send_path(), Path::Shm);
        // exec: the client does not read; the ring is revoked where it is.
        s.settle_on_tcp(std::time::Duration::from_millis(100))
            .unwrap();
        // Between the settling and the exec itself, the client settles too.
        settled.send(()).unwrap();
        wait_try.recv().unwrap();
        let fd = std::os::fd::AsFd::as_fd(&s).try_clone_to_owned().unwrap();
        s.abandon();
        drop(s);
        let mut k = std::net::TcpStream::from(fd);
        // The new image writes on.
        let mut more = vec![0u8; AFTER as usize];
        fill_pattern(3, FIRST + UNREAD, &mut more);
        k.write_all(&more).unwrap();
        k.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < FIRST {
        let n = c.read(&mut buf[..(FIRST - got) as usize]).unwrap();
        assert!(n > 0);
        check_pattern(3, got, &buf[..n]);
        got += n as u64;
    }
    assert_eq!(c.recv_path(), Path::Shm);
    read_some.send(()).unwrap();
    wait_settled.recv().unwrap();
    // Too late: the other end has had its last word.
    let refused = c.settle_on_tcp_receiving(std::time::Duration::from_millis(100));
    tried.send(()).unwrap();
    assert!(refused.is_err(), "the REWIND went out to an end that execs");
    loop {
        let n = c.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        check_pattern(3, got, &buf[..n]);
        got += n as u64;
    }
    assert_eq!(got, FIRST + UNREAD + AFTER);
    let t = c.traffic();
    assert_eq!(
        (t.shm_in, t.tcp_in),
        (FIRST, UNREAD + AFTER),
        "the bytes unread at the revoke came on TCP"
    );
    server.join().unwrap();
}

/// A settle whose peer reads nothing for longer than its patience still puts
/// everything the peer had not read on TCP before it returns: a full ring taken
/// back (128 KiB) is more than small socket buffers take (the program and its
/// peer asked for 4 KiB), so the settle grows our send buffer for it, and gives
/// the program back the size it had. Before, it waited for room, gave up after its
/// patience, and the bytes were lost with the old program image.
#[test]
fn a_settle_puts_a_full_ring_on_tcp_while_the_peer_reads_nothing() {
    private_registry();
    const ON_RING: u64 = 128 * 1024;
    const AFTER: u64 = 100_000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (settled, wait_settled) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        common::settle(&s);
        assert!(s.is_accelerated(), "{:?}", s.fallback_reason());
        s.set_write_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        // A program that asked for small buffers (and a peer that did too).
        rustix::net::sockopt::set_socket_send_buffer_size(&s, 4096).unwrap();
        let mut buf = vec![0u8; ON_RING as usize];
        fill_pattern(6, 0, &mut buf);
        s.write_all(&buf).unwrap();
        assert_eq!(s.send_path(), Path::Shm);
        let before = rustix::net::sockopt::socket_send_buffer_size(&s).unwrap();
        s.settle_on_tcp(std::time::Duration::from_millis(1))
            .expect("the bytes taken back are on TCP, the peer reading or not");
        assert_eq!(
            rustix::net::sockopt::socket_send_buffer_size(&s).unwrap(),
            before,
            "the program sees the send buffer it had"
        );
        settled.send(()).unwrap();
        let fd = std::os::fd::AsFd::as_fd(&s).try_clone_to_owned().unwrap();
        s.abandon();
        drop(s);
        let mut k = std::net::TcpStream::from(fd);
        let mut more = vec![0u8; AFTER as usize];
        fill_pattern(6, ON_RING, &mut more);
        k.write_all(&more).unwrap();
        k.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    rustix::net::sockopt::set_socket_recv_buffer_size(&c, 4096).unwrap();
    common::settle(&c);
    // The client reads only once the other end has settled.
    wait_settled.recv().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = c
            .read(&mut buf)
            .expect("the stream goes on after the settle");
        if n == 0 {
            break;
        }
        check_pattern(6, got, &buf[..n]);
        got += n as u64;
    }
    assert_eq!(got, ON_RING + AFTER);
    server.join().unwrap();
}

/// A program writes, shuts its sending side and waits to read the answer
/// (request, then response), while the other end settles on TCP (a forked
/// server's child asked for the connection). The REWIND reaches the writer while
/// it waits to read, which serves it: the ring's unread bytes go on TCP, then the
/// FIN. The small buffers take only part of them at once; the rest must follow as
/// TCP drains, while the program still only waits to read. Before, the rest
/// waited for a write that never came, and both ends waited for each other for
/// good.
fn request_then_answer_across_a_settle(wait: fn(&mut TcpStream)) {
    private_registry();
    const ON_RING: u64 = 96 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (shut, wait_shut) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        common::settle(&s);
        assert!(s.is_accelerated(), "{:?}", s.fallback_reason());
        rustix::net::sockopt::set_socket_recv_buffer_size(&s, 4096).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        // Nothing read yet: the client's request is all on the ring.
        wait_shut.recv().unwrap();
        s.settle_on_tcp(std::time::Duration::from_secs(2)).unwrap();
        assert_eq!(s.recv_path(), Path::Tcp);
        let mut buf = vec![0u8; 16 * 1024];
        let mut got = 0u64;
        loop {
            let n = s
                .read(&mut buf)
                .expect("the request's bytes and its end come on TCP");
            if n == 0 {
                break;
            }
            check_pattern(8, got, &buf[..n]);
            got += n as u64;
        }
        assert_eq!(got, ON_RING);
        s.write_all(b"ok").unwrap();
    });
    let mut c = TcpStream::connect(addr).unwrap();
    common::settle(&c);
    assert!(c.is_accelerated(), "{:?}", c.fallback_reason());
    rustix::net::sockopt::set_socket_send_buffer_size(&c, 4096).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; ON_RING as usize];
    fill_pattern(8, 0, &mut buf);
    c.write_all(&buf).unwrap();
    assert_eq!(c.send_path(), Path::Shm);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    shut.send(()).unwrap();
    wait(&mut c);
    let mut answer = Vec::new();
    c.read_to_end(&mut answer)
        .expect("the answer comes once the request has");
    assert_eq!(answer, b"ok");
    server.join().unwrap();
}

/// The program waits in a blocking read.
#[test]
fn a_rewind_served_in_a_blocked_read_puts_every_byte_and_the_fin_on_tcp() {
    request_then_answer_across_a_settle(|_| {});
}

/// The program waits in an event loop, for reading only.
#[test]
fn a_rewind_served_by_an_event_loop_that_waits_to_read_puts_every_byte_on_tcp() {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::time::{Duration, Instant};
    use vmc_conn::Interest;
    request_then_answer_across_a_settle(|c| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                Instant::now() < deadline,
                "the answer never became readable"
            );
            if let Some(r) = c.arm(Interest::READ).unwrap() {
                if r.readable {
                    return;
                }
                continue;
            }
            let t = Timespec::try_from(deadline - Instant::now()).unwrap();
            let fd = c.wait_fd().unwrap();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let _ = poll(&mut fds, Some(&t));
            // Only a wake-up counts: the loop would sleep for good otherwise.
            assert!(
                !fds[0].revents().is_empty(),
                "the event loop was never woken"
            );
            c.disarm(Interest::READ);
            if c.poll_ready(Interest::READ, false).readable {
                return;
            }
        }
    });
}

/// The case the revoke is for: an end writes on the ring, its move onto it not
/// yet answered (the peer has not read anything), and execs; its new image
/// writes on TCP. Leaving the ring by a SWITCH would need the peer's answer to
/// the first move; waiting for it ran out of patience, the ring stayed the path,
/// and the peer, once it read, waited on the ring forever while the new image's
/// bytes sat on TCP. The revoke needs no answer.
#[test]
fn an_end_that_execs_before_the_peer_answered_its_move_onto_the_ring_loses_nothing() {
    private_registry();
    const ON_RING: u64 = 40 * 1024;
    const AFTER: u64 = 100_000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (execd, wait_exec) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        common::settle(&s);
        assert!(s.is_accelerated(), "{:?}", s.fallback_reason());
        let mut buf = vec![0u8; ON_RING as usize];
        fill_pattern(5, 0, &mut buf);
        s.write_all(&buf).unwrap();
        assert_eq!(s.send_path(), Path::Shm);
        s.settle_on_tcp(std::time::Duration::from_millis(100))
            .unwrap();
        let fd = std::os::fd::AsFd::as_fd(&s).try_clone_to_owned().unwrap();
        s.abandon();
        drop(s);
        let mut k = std::net::TcpStream::from(fd);
        let mut more = vec![0u8; AFTER as usize];
        fill_pattern(5, ON_RING, &mut more);
        k.write_all(&more).unwrap();
        k.shutdown(std::net::Shutdown::Write).unwrap();
        execd.send(()).unwrap();
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    common::settle(&c);
    // The client reads only once the other end has exec'd and written on.
    wait_exec.recv().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = c.read(&mut buf).expect("the stream goes on after the exec");
        if n == 0 {
            break;
        }
        check_pattern(5, got, &buf[..n]);
        got += n as u64;
    }
    assert_eq!(got, ON_RING + AFTER);
    server.join().unwrap();
}
