//! Regression tests for bugs found in `src/` (each fixed; the test shows how it
//! used to fail). The non-blocking peer-death case needs a child process and lives in
//! tests/failure.rs: `nonblocking_io_reports_peer_death`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmc_channel::{Channel, ChannelConfig, WakeMode};
use vmc_os::SegmentDir;

/// A peer that attaches, writes and closes (orderly) before the creator calls
/// `PendingChannel::wait` makes the wait time out: `wait` only accepts a peer
/// state of `Open`, and the peer's is already `Closed` (src/setup.rs,
/// `PendingChannel::wait`). The peer's bytes are lost.
#[test]
fn dir_creator_accepts_a_peer_that_already_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SegmentDir::open(tmp.path().join("shm")).unwrap();
    let pending = Channel::create_in_dir(&dir, &ChannelConfig::default()).unwrap();
    let mut b = Channel::attach_in_dir(&dir, pending.name(), Duration::ZERO).unwrap();
    b.write_all(b"request").unwrap();
    drop(b);
    let mut a = pending
        .wait(Duration::from_millis(300))
        .expect("the peer did attach");
    let mut got = Vec::new();
    a.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request");
}

/// The same over a socket: an attacher that sends ACK, writes and closes before
/// the creator reads the ACK makes `Offer::finish` fail with "ACK without
/// attaching to the segment" (src/setup.rs, `Offer::finish`). Across processes
/// this is a race a fast, short-lived client can lose against
/// `ChannelListener::accept`.
#[test]
fn socket_creator_accepts_a_peer_that_already_closed() {
    let (x, y) = UnixStream::pair().unwrap();
    let offer = Channel::offer_over(x.into(), &ChannelConfig::default()).unwrap();
    let mut b = Channel::attach_over(y.into(), Duration::ZERO).unwrap();
    b.write_all(b"request").unwrap();
    drop(b);
    let mut a = offer.finish().expect("the peer did attach");
    let mut got = Vec::new();
    a.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request");
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid clock id and a valid timespec pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// In eventfd mode a sleeper also polls the liveness socket for POLLIN
/// (vmc-os wake.rs, `EventFd::wait`). Once that socket holds an unread byte (a
/// peer that sent a longer ACK or HELLO than expected, or anything after the
/// handshake) every sleep returns at once: a "blocked" reader or writer spins at
/// 100% CPU instead of sleeping.
#[test]
fn eventfd_sleeper_sleeps_even_if_the_socket_is_readable() {
    let (x, y) = UnixStream::pair().unwrap();
    let peer_sock = y.try_clone().unwrap();
    let config = ChannelConfig {
        wake: WakeMode::EventFd,
        ..ChannelConfig::default()
    };
    let offer = Channel::offer_over(x.into(), &config).unwrap();
    let _b = Channel::attach_over(y.into(), Duration::ZERO).unwrap();
    // One stray byte after the ACK.
    (&peer_sock).write_all(b"!").unwrap();
    let mut a = offer.finish().unwrap();
    let limit = Duration::from_millis(500);
    a.reader().set_timeout(Some(limit)).unwrap();
    let cpu = thread_cpu_time();
    let t = Instant::now();
    let e = a.read(&mut [0u8; 4]).unwrap_err();
    let (cpu, wall) = (thread_cpu_time() - cpu, t.elapsed());
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert!(
        cpu < wall / 4,
        "a blocked read burnt {cpu:?} of CPU in {wall:?}"
    );
}
