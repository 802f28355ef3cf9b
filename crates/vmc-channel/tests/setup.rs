//! Setting channels up, and failing to: nobody listening, peers that never
//! answer or answer garbage (the handshake must end with an error within
//! HANDSHAKE_TIMEOUT, never hang), and the directory and plain-file set-ups.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use vmc_channel::{Channel, ChannelConfig, ChannelListener, WakeMode, HANDSHAKE_TIMEOUT};
use vmc_os::{recv_with_fds, send_with_fds, Segment, SegmentDir};

/// Bound on a handshake that must fail on the timeout.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(HANDSHAKE_TIMEOUT.as_secs() + 5);
/// Bound on a handshake that must fail at once.
const QUICK: Duration = Duration::from_secs(2);

fn sock_path() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("vmc.sock");
    (tmp, p)
}

/// Echoes everything back until EOF.
fn echo(mut ch: Channel) {
    let mut buf = [0u8; 3000];
    loop {
        let n = ch.read(&mut buf).unwrap();
        if n == 0 {
            return;
        }
        ch.write_all(&buf[..n]).unwrap();
    }
}

/// Sends 1 MiB through an echoing peer and checks what comes back.
fn check_echo(ch: Channel) -> Channel {
    let mut data = vec![0u8; 1 << 20];
    fill_pattern(11, 0, &mut data);
    let (mut r, mut w) = ch.split();
    std::thread::scope(|s| {
        let t = s.spawn(|| w.write_all(&data).unwrap());
        let mut got = vec![0u8; data.len()];
        r.read_exact(&mut got).unwrap();
        check_pattern(11, 0, &got);
        t.join().unwrap();
    });
    Channel::unsplit(r, w).unwrap_or_else(|_| panic!("unsplit"))
}

#[test]
fn connect_to_nobody() {
    let (_tmp, path) = sock_path();
    let e = assert_kind(Channel::connect(&path), ErrorKind::NotFound);
    assert!(e.to_string().contains("vmc.sock"), "{e}");

    // A socket file nobody listens on any more.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert_kind(Channel::connect(&path), ErrorKind::ConnectionRefused);
}

#[test]
fn bind_twice_fails_and_drop_removes_the_path() {
    let (_tmp, path) = sock_path();
    let l = ChannelListener::bind(&path, ChannelConfig::default()).unwrap();
    assert_eq!(l.path(), path);
    assert_kind(
        ChannelListener::bind(&path, ChannelConfig::default()),
        ErrorKind::AddrInUse,
    );
    drop(l);
    assert!(!path.exists(), "the listener removes its socket file");
}

/// One listener, several peers in turn, each with its own channel made with
/// the listener's settings.
#[test]
fn listener_serves_many_peers() {
    for wake in ALL_WAKE_MODES {
        let (_tmp, path) = sock_path();
        let config = ChannelConfig {
            capacity: 8192,
            wake,
            ..ChannelConfig::default()
        };
        let l = ChannelListener::bind(&path, config).unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..3 {
                let ch = l.accept().unwrap();
                assert_eq!(ch.wake_mode(), wake);
                echo(ch);
            }
        });
        for _ in 0..3 {
            let ch = within(QUICK, "connect", {
                let path = path.clone();
                move || Channel::connect(path).unwrap()
            });
            assert_eq!(ch.capacity(), 8192);
            assert_eq!(ch.wake_mode(), wake);
            drop(check_echo(ch));
        }
        within(QUICK, "server", move || server.join().unwrap());
    }
}

/// A raw client: reads the listener's HELLO (checking it looks right), then
/// does `then` with the socket.
fn raw_client(
    path: &Path,
    then: impl FnOnce(&UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let s = UnixStream::connect(&path).unwrap();
        let mut hello = [0u8; 16];
        let (n, fds) = recv_with_fds(s.as_fd(), &mut hello, 3).unwrap();
        assert_eq!(n, 16);
        assert_eq!(&hello[..4], b"VMC1");
        assert_eq!(fds.len(), 1, "one memfd with futex wake-ups");
        then(&s);
    })
}

/// Accepts once on a listener that expects a misbehaving client; returns the
/// error and how long it took.
fn accept_error(
    l: &std::sync::Arc<ChannelListener>,
    limit: Duration,
) -> (std::io::Error, Duration) {
    let l = l.clone();
    within(limit, "accept", move || {
        let t = Instant::now();
        match l.accept() {
            Ok(_) => panic!("accepted a misbehaving peer"),
            Err(e) => (e, t.elapsed()),
        }
    })
}

/// A client that reads HELLO and then says nothing: the listener gives up on
/// the handshake timeout.
fn listener_gives_up_on_a_silent_peer() {
    let (_tmp, path) = sock_path();
    let l = std::sync::Arc::new(ChannelListener::bind(&path, ChannelConfig::default()).unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let client = raw_client(&path, move |_s| {
        // Hold the socket open, silent, until the listener has given up.
        let _ = rx.recv_timeout(HANDSHAKE_LIMIT);
    });
    let (e, took) = accept_error(&l, HANDSHAKE_LIMIT);
    tx.send(()).unwrap();
    client.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(
        took >= HANDSHAKE_TIMEOUT - Duration::from_millis(100),
        "gave up early: {took:?}"
    );
    assert!(
        took < HANDSHAKE_TIMEOUT + Duration::from_secs(2),
        "{took:?}"
    );
}

/// Both sides of a handshake give up on a silent peer after HANDSHAKE_TIMEOUT
/// (run at the same time: each waits that long).
#[test]
fn handshake_times_out_on_silent_peers() {
    let t = std::thread::spawn(listener_gives_up_on_a_silent_peer);
    connect_gives_up_on_a_silent_creator();
    t.join().unwrap();
}

/// Clients that answer HELLO with anything but a good ACK make `accept` fail
/// at once, and the listener keeps working.
#[test]
fn listener_refuses_bad_acks() {
    let (_tmp, path) = sock_path();
    let l = std::sync::Arc::new(ChannelListener::bind(&path, ChannelConfig::default()).unwrap());
    type Script = fn(&UnixStream);
    let cases: [(&str, Script, ErrorKind); 6] = [
        (
            "garbage",
            |s| {
                let mut s = s;
                s.write_all(b"GARBAGE!").unwrap()
            },
            ErrorKind::InvalidData,
        ),
        (
            "short ACK then close",
            |s| {
                let mut s = s;
                s.write_all(b"VMC").unwrap()
            },
            ErrorKind::InvalidData,
        ),
        ("close", |_| {}, ErrorKind::ConnectionAborted),
        (
            "refusal",
            |s| {
                let mut s = s;
                s.write_all(b"VMCA\x01\0\0\0").unwrap()
            },
            ErrorKind::ConnectionRefused,
        ),
        (
            "ACK without attaching",
            |s| {
                let mut s = s;
                s.write_all(b"VMCA\0\0\0\0").unwrap()
            },
            ErrorKind::InvalidData,
        ),
        (
            "ACK with unexpected descriptors",
            |s| {
                let f = std::fs::File::open("/dev/null").unwrap();
                send_with_fds(s.as_fd(), b"VMCA\0\0\0\0", &[f.as_fd()]).unwrap()
            },
            ErrorKind::InvalidData,
        ),
    ];
    for (what, script, kind) in cases {
        let client = raw_client(&path, move |s| {
            script(s);
            // Closing (dropping `s` after `then`) is part of every script.
        });
        let (e, took) = accept_error(&l, QUICK);
        client.join().unwrap();
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert!(took < QUICK, "{what}: {took:?}");
    }
    // A real peer still gets a working channel.
    let l2 = l.clone();
    let server = std::thread::spawn(move || echo(l2.accept().unwrap()));
    let ch = Channel::connect(&path).unwrap();
    let ch = check_echo(ch);
    drop(ch);
    within(QUICK, "server", move || server.join().unwrap());
}

/// A raw listener at a fresh path: `script` plays the creator's part on the
/// accepted socket while `Channel::connect` runs; returns connect's result.
fn connect_to_fake_creator(
    script: impl FnOnce(UnixStream) + Send + 'static,
    limit: Duration,
) -> (std::io::Result<Channel>, Duration) {
    let (_tmp, path) = sock_path();
    let raw = UnixListener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let (s, _) = raw.accept().unwrap();
        script(s);
    });
    let r = within(limit, "connect", move || {
        let t = Instant::now();
        let r = Channel::connect(&path);
        (r, t.elapsed())
    });
    fake.join().unwrap();
    r
}

fn hello(wake_code: u8) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(b"VMC1");
    h[4] = 1; // memfd
    h[5] = wake_code;
    h[8..].copy_from_slice(&(64u64 << 10).to_le_bytes());
    h
}

/// Wake codes as `vmc_ring::WakeKind` numbers them.
fn code(w: WakeMode) -> u8 {
    match w {
        WakeMode::Futex => vmc_ring::WakeKind::Futex as u8,
        WakeMode::EventFd => vmc_ring::WakeKind::EventFd as u8,
        WakeMode::Poll => vmc_ring::WakeKind::Poll as u8,
    }
}

fn send_hello(s: &UnixStream, h: &[u8], fds: &[BorrowedFd<'_>]) {
    send_with_fds(s.as_fd(), h, fds).unwrap();
}

/// Reads the attacher's answer: `Some(status)` for an ACK, `None` at EOF.
fn read_ack(s: &UnixStream) -> Option<u8> {
    let mut ack = [0u8; 8];
    let (n, _) = recv_with_fds(s.as_fd(), &mut ack, 2).unwrap();
    if n == 0 {
        return None;
    }
    assert_eq!(n, 8);
    assert_eq!(&ack[..4], b"VMCA");
    Some(ack[4])
}

fn unsealed_memfd() -> std::fs::File {
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(64 << 10).unwrap();
    f
}

/// A creator that accepts and never sends HELLO: connect gives up on the
/// handshake timeout.
fn connect_gives_up_on_a_silent_creator() {
    let (r, took) = connect_to_fake_creator(
        move |mut s| {
            // Silent until the attacher gives up and closes its end.
            s.set_read_timeout(Some(HANDSHAKE_LIMIT)).unwrap();
            assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
        },
        HANDSHAKE_LIMIT,
    );
    let e = assert_kind(r, ErrorKind::TimedOut);
    assert!(e.to_string().contains("HELLO"), "{e}");
    assert!(
        took >= HANDSHAKE_TIMEOUT - Duration::from_millis(100),
        "gave up early: {took:?}"
    );
    assert!(
        took < HANDSHAKE_TIMEOUT + Duration::from_secs(2),
        "{took:?}"
    );
}

/// Malformed HELLOs make connect fail at once; where it got as far as trying the
/// segment, it says so with a refusing ACK.
#[test]
fn connect_refuses_bad_hellos() {
    // Garbage, short messages, nothing at all.
    for (what, msg) in [
        ("garbage", b"0123456789abcdef".to_vec()),
        ("short", b"VMC1\x01".to_vec()),
        ("nothing", Vec::new()),
    ] {
        let (r, took) = connect_to_fake_creator(
            move |mut s| {
                s.write_all(&msg).unwrap();
            },
            QUICK,
        );
        let e = assert_kind(r, ErrorKind::InvalidData);
        assert!(e.to_string().contains("HELLO"), "{what}: {e}");
        assert!(took < QUICK, "{what}: {took:?}");
    }

    // Well-formed HELLOs with the wrong descriptors or wake mode.
    let seg = Segment::create_memfd("fake", 64 << 10).unwrap();
    let seg_fd = seg.fd().try_clone_to_owned().unwrap();
    let cases: Vec<(&str, [u8; 16], usize)> = vec![
        ("futex without memfd", hello(code(WakeMode::Futex)), 0),
        (
            "eventfd with only the memfd",
            hello(code(WakeMode::EventFd)),
            1,
        ),
        ("unknown wake mode", hello(77), 1),
        (
            "futex with extra descriptors",
            hello(code(WakeMode::Futex)),
            3,
        ),
    ];
    for (what, h, nfds) in cases {
        let fd = seg_fd.try_clone().unwrap();
        let (r, took) = connect_to_fake_creator(
            move |s| {
                let fds: Vec<BorrowedFd<'_>> = std::iter::repeat(fd.as_fd()).take(nfds).collect();
                send_hello(&s, &h, &fds);
                // Whatever the attacher answers, it must not be an OK.
                if let Some(status) = read_ack(&s) {
                    assert_ne!(status, 0, "{what}: ACK OK for a bad HELLO");
                }
            },
            QUICK,
        );
        let e = assert_kind(r, ErrorKind::InvalidData);
        assert!(took < QUICK, "{what}: {took:?}");
        eprintln!("{what}: {e}");
    }

    // A memfd that is not sealed: refused, with a refusing ACK.
    let (r, _) = connect_to_fake_creator(
        move |s| {
            let f = unsealed_memfd();
            send_hello(&s, &hello(code(WakeMode::Futex)), &[f.as_fd()]);
            assert_eq!(read_ack(&s), Some(1), "expected a refusal");
        },
        QUICK,
    );
    assert_kind(r, ErrorKind::PermissionDenied);

    // A sealed memfd without a channel in it (all zeros): refused too.
    let (r, _) = connect_to_fake_creator(
        move |s| {
            send_hello(&s, &hello(code(WakeMode::Futex)), &[seg_fd.as_fd()]);
            assert_eq!(read_ack(&s), Some(1), "expected a refusal");
        },
        QUICK,
    );
    let e = assert_kind(r, ErrorKind::InvalidData);
    assert!(e.to_string().contains("magic"), "{e}");
    drop(seg);
}

#[test]
fn bad_capacities_are_refused() {
    for cap in [0, 1000, 8, 3 << 20] {
        let c = ChannelConfig {
            capacity: cap,
            ..ChannelConfig::default()
        };
        assert_kind(Channel::pair(&c), ErrorKind::InvalidInput);
        let tmp = tempfile::tempdir().unwrap();
        let dir = SegmentDir::open(tmp.path().join("shm")).unwrap();
        assert_kind(
            Channel::create_in_dir(&dir, &c).map(|_| ()),
            ErrorKind::InvalidInput,
        );
        assert!(segment_files(dir.path()).is_empty());
    }
}

#[test]
fn directory_set_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = tmp.path().join("shm");
    let dir = SegmentDir::open(&dir_path).unwrap();
    for (asked, got) in [
        (WakeMode::Futex, WakeMode::Futex),
        // No socket to carry eventfds: falls back to the futex.
        (WakeMode::EventFd, WakeMode::Futex),
        (WakeMode::Poll, WakeMode::Poll),
    ] {
        let config = ChannelConfig {
            capacity: 16384,
            wake: asked,
            ..ChannelConfig::default()
        };
        let pending = Channel::create_in_dir(&dir, &config).unwrap();
        let name = pending.name().to_owned();
        assert!(name.starts_with("chan-"), "{name}");
        assert_eq!(segment_files(&dir_path), vec![name.clone()]);
        let b = Channel::attach_in_dir(&dir, &name, Duration::ZERO).unwrap();
        assert!(
            segment_files(&dir_path).is_empty(),
            "unlinked once attached"
        );
        // Nobody else can attach any more.
        assert_kind(
            Channel::attach_in_dir(&dir, &name, Duration::ZERO),
            ErrorKind::NotFound,
        );
        let a = pending.wait(Duration::from_secs(5)).unwrap();
        assert_eq!(a.wake_mode(), got);
        assert_eq!(b.wake_mode(), got);
        assert_eq!(b.capacity(), 16384);
        let server = std::thread::spawn(move || echo(b));
        let a = check_echo(a);
        drop(a);
        within(QUICK, "echo", move || server.join().unwrap());
    }
    assert_kind(
        Channel::attach_in_dir(&dir, "../etc/passwd", Duration::ZERO),
        ErrorKind::InvalidInput,
    );
    assert_kind(
        Channel::attach_in_dir(&dir, "chan-nobody-here", Duration::ZERO),
        ErrorKind::NotFound,
    );
    assert!(segment_files(&dir_path).is_empty());
}

/// A plain file of the right size (as an ivshmem BAR would be): both ends map
/// it, sleepers poll, echo works; nothing is unlinked.
#[test]
fn plain_file_set_up() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bar");
    let cap = 16384;
    let len = vmc_ring::ChannelLayout::for_capacity(cap)
        .unwrap()
        .segment_len;
    let f = std::fs::File::create(&path).unwrap();

    // Too small: refused.
    f.set_len(len as u64 - 4096).unwrap();
    let config = ChannelConfig {
        capacity: cap,
        wake: WakeMode::Poll,
        ..ChannelConfig::default()
    };
    assert!(Channel::create_on_file(&path, &config).is_err());

    f.set_len(len as u64).unwrap();
    // Nothing laid out yet: attaching fails.
    assert_kind(
        Channel::attach_on_file(&path, len, Duration::ZERO),
        ErrorKind::InvalidData,
    );
    // Bigger than the file: refused.
    assert!(Channel::attach_on_file(&path, len + 4096, Duration::ZERO).is_err());

    let pending = Channel::create_on_file(&path, &config).unwrap();
    let b = Channel::attach_on_file(&path, len, Duration::from_micros(20)).unwrap();
    let a = pending.wait(Duration::from_secs(5)).unwrap();
    assert_eq!(a.wake_mode(), WakeMode::Poll);
    assert_eq!(b.wake_mode(), WakeMode::Poll);
    assert_eq!(a.capacity(), cap);
    let server = std::thread::spawn(move || echo(b));
    let a = check_echo(a);
    drop(a);
    within(QUICK, "echo", move || server.join().unwrap());
    assert!(path.exists(), "plain files are never unlinked");

    // A second attacher of a channel already in use is refused.
    let pending = Channel::create_on_file(&path, &config).unwrap();
    let _b = Channel::attach_on_file(&path, len, Duration::ZERO).unwrap();
    assert!(Channel::attach_on_file(&path, len, Duration::ZERO).is_err());
    drop(pending);
}

/// The creator asked for a futex but we are its peer through a file: the
/// creator side of a plain file always polls, whatever was asked.
#[test]
fn plain_file_always_polls() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bar");
    let len = vmc_ring::ChannelLayout::for_capacity(4096)
        .unwrap()
        .segment_len;
    std::fs::File::create(&path)
        .unwrap()
        .set_len(len as u64)
        .unwrap();
    let config = ChannelConfig {
        capacity: 4096,
        wake: WakeMode::Futex,
        ..ChannelConfig::default()
    };
    let pending = Channel::create_on_file(&path, &config).unwrap();
    let _b = Channel::attach_on_file(&path, len, Duration::ZERO).unwrap();
    let a = pending.wait(Duration::from_secs(5)).unwrap();
    assert_eq!(a.wake_mode(), WakeMode::Poll);
}
