//! The std-like API end to end in one process: accelerated connect/accept, data in
//! both directions, and the fallback when the listener is not vmc.

mod common;

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use vmc_conn::{Fallback, Path, TcpListener, TcpStream};

fn private_registry() {
    common::private_registry();
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn accelerated_echo_moves_both_directions_onto_shm() {
    private_registry();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(listener.fallback_reason(), None);
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
            s.write_all(&buf[..n]).unwrap();
        }
        (total, s.traffic(), s.is_accelerated())
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let msg: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut back = vec![0u8; msg.len()];
    let mut done = 0;
    for chunk in msg.chunks(10_000) {
        c.write_all(chunk).unwrap();
        c.read_exact(&mut back[done..done + chunk.len()]).unwrap();
        done += chunk.len();
    }
    assert_eq!(back, msg);
    assert!(c.is_accelerated(), "fallback: {:?}", c.fallback_reason());
    assert_eq!(c.send_path(), Path::Shm);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let (total, server_traffic, server_accel) = server.join().unwrap();
    assert_eq!(total, msg.len() as u64);
    assert!(server_accel);
    let t = c.traffic();
    assert!(t.shm_out > 0 && t.shm_in > 0, "{t:?}");
    assert!(server_traffic.shm_out > 0, "{server_traffic:?}");
}

#[test]
fn a_plain_listener_means_a_plain_connection() {
    private_registry();
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = plain.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(c.fallback_reason(), Some(Fallback::NoListener));
    server.join().unwrap();
}

#[test]
fn a_plain_client_gets_a_plain_connection_from_a_vmc_listener() {
    private_registry();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        wait_until("the attach window to pass", || {
            s.fallback_reason().is_some()
        });
        s.fallback_reason()
    });
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(server.join().unwrap(), Some(Fallback::PeerNotVmc));
}

#[test]
fn live_connections_are_listed_for_vmc_stat() {
    private_registry();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        s.read_exact(&mut buf).unwrap(); // wait until the client has looked
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    wait_until("the channel", || c.is_accelerated());
    c.write_all(b"more").unwrap(); // moves our sending direction onto shm
    let local = c.local_addr().unwrap();
    let me = vmc_conn::stats::connections()
        .unwrap()
        .into_iter()
        .find(|s| s.local == local)
        .expect("our connection is listed");
    assert_eq!(me.pid, std::process::id());
    assert_eq!(me.peer, addr);
    assert_eq!(me.path, "shm");
    assert_eq!(me.send_path, "shm");
    assert_eq!(me.tcp_out + me.shm_out, 8);
    server.join().unwrap();
    drop(c);
    assert!(!vmc_conn::stats::connections()
        .unwrap()
        .iter()
        .any(|s| s.local == local));
}

#[test]
fn tables_of_dead_processes_are_removed() {
    use std::os::unix::fs::OpenOptionsExt;
    private_registry();
    let dir = vmc_conn::stats::stats_dir();
    // The directory exists once this process has a connection.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let dead = dir.join("p-999999-0.stats");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&dead)
        .unwrap();
    f.set_len((128 + vmc_conn::stats::SLOTS * 128) as u64)
        .unwrap();
    drop(f); // nobody holds its lock: its process is "dead"
    vmc_conn::stats::connections().unwrap();
    assert!(!dead.exists(), "a dead process's table stayed behind");
}

/// Two event loops wait on one connection through the readiness API, as two threads
/// polling one socket do: one for reading (it starts first and waits alone), one for
/// writing (ready at once). The writer's quick look must not leave the reader asleep
/// on a ring that no longer asks the peer for a wake-up.
#[test]
fn a_second_waiter_does_not_disarm_the_first() {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use vmc_conn::Interest;
    private_registry();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    // Both directions onto the rings.
    c.write_all(b"x").unwrap();
    s.read_exact(&mut [0u8; 1]).unwrap();
    s.write_all(b"y").unwrap();
    c.read_exact(&mut [0u8; 1]).unwrap();
    assert!(c.is_accelerated() && c.send_path() == Path::Shm);

    let reader = c.try_clone().unwrap();
    let (armed_tx, armed_rx) = std::sync::mpsc::channel();
    let (waiter, tid) = common::spawn_with_tid(move || {
        assert!(reader.arm(Interest::READ).unwrap().is_none());
        armed_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let fd = reader.wait_fd().unwrap();
            let left = deadline.saturating_duration_since(Instant::now());
            let t = Timespec::try_from(left.min(Duration::from_millis(500))).unwrap();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let _ = poll(&mut fds, Some(&t));
            let woke = !fds[0].revents().is_empty();
            reader.disarm(Interest::READ);
            // Only a wake-up of the wait set counts: a timeout with the byte there
            // says the wake-up was lost.
            if !woke || Instant::now() >= deadline {
                return false;
            }
            if reader.poll_ready(Interest::READ, true).readable {
                return true;
            }
            if reader.arm(Interest::READ).unwrap().is_some() {
                return true;
            }
        }
    });
    armed_rx.recv().unwrap();
    // The second waiter: ready for writing at once.
    assert!(c.arm(Interest::WRITE).unwrap().is_some());
    // The reader asleep in its poll, then the byte.
    common::wait_asleep(tid, Duration::from_secs(3));
    s.write_all(b"z").unwrap();
    assert!(waiter.join().unwrap(), "the reader's wake-up was lost");
}

/// A client that keeps far more in flight than a ring holds before it reads (4 MiB
/// written ahead, against 128 KiB rings) and an echo server that writes back each
/// piece before reading the next: over TCP the kernel's buffers carry it; under vmc
/// both ends would wait on full rings for ever. Each end's blocked write pleads
/// (SPILL) and answers the other's plea (REWIND), so the directions go on over TCP
/// and everything arrives, in order. `round_trip_first`: whether the client's ring
/// was entered before (else the server has not read from the ring yet either).
fn write_far_ahead_of_reading(round_trip_first: bool) {
    private_registry();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
        }
        s.is_accelerated()
    });
    let mut c = TcpStream::connect(addr).unwrap();
    if round_trip_first {
        c.write_all(b"?").unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"?");
    }
    let total = 16usize << 20;
    let ahead = 4usize << 20;
    let msg: Vec<u8> = (0..total as u32).map(|i| (i ^ (i >> 11)) as u8).collect();
    let mut back = vec![0u8; total];
    let (mut sent, mut got) = (0, 0);
    while sent < total {
        let end = (sent + 64 * 1024).min(total);
        c.write_all(&msg[sent..end]).unwrap();
        sent = end;
        while sent - got > ahead {
            got += c.read(&mut back[got..]).unwrap();
        }
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    while got < total {
        let n = c.read(&mut back[got..]).unwrap();
        assert!(n > 0, "end of stream after {got} of {total} bytes");
        got += n;
    }
    let first_bad = back.iter().zip(&msg).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "the echo differs from what was sent");
    assert!(c.is_accelerated(), "fallback: {:?}", c.fallback_reason());
    assert!(server.join().unwrap());
}

#[test]
fn writing_far_ahead_of_reading_does_not_deadlock() {
    write_far_ahead_of_reading(true);
}

#[test]
fn writing_far_ahead_before_any_read_does_not_deadlock() {
    write_far_ahead_of_reading(false);
}
