//! Close semantics, timeouts, non-blocking mode and edge cases of reads and
//! writes, over every way of making a channel in one process: socket pairs in each
//! wake mode, directory segments and plain files.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use common::*;
use vmc_channel::{Channel, ChannelConfig, WakeMode};
use vmc_os::SegmentDir;

/// A channel pair and what must outlive it.
struct Pair {
    what: String,
    a: Channel,
    b: Channel,
    _keep: Option<tempfile::TempDir>,
}

fn config(wake: WakeMode, capacity: usize) -> ChannelConfig {
    ChannelConfig {
        capacity,
        wake,
        ..ChannelConfig::default()
    }
}

fn socket_pair(wake: WakeMode, capacity: usize) -> Pair {
    let (a, b) = Channel::pair(&config(wake, capacity)).unwrap();
    Pair {
        what: format!("socket pair, {}", wake.name()),
        a,
        b,
        _keep: None,
    }
}

fn dir_pair(wake: WakeMode, capacity: usize) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SegmentDir::open(tmp.path().join("shm")).unwrap();
    let pending = Channel::create_in_dir(&dir, &config(wake, capacity)).unwrap();
    let b = Channel::attach_in_dir(&dir, pending.name(), Duration::from_micros(50)).unwrap();
    let a = pending.wait(Duration::from_secs(5)).unwrap();
    Pair {
        what: format!("directory segment, {}", wake.name()),
        a,
        b,
        _keep: Some(tmp),
    }
}

fn file_pair(capacity: usize) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bar");
    let len = vmc_ring::ChannelLayout::for_capacity(capacity)
        .unwrap()
        .segment_len;
    std::fs::File::create(&path)
        .unwrap()
        .set_len(len as u64)
        .unwrap();
    let pending = Channel::create_on_file(&path, &config(WakeMode::Poll, capacity)).unwrap();
    let b = Channel::attach_on_file(&path, len, Duration::from_micros(50)).unwrap();
    let a = pending.wait(Duration::from_secs(5)).unwrap();
    Pair {
        what: "plain file, poll".to_string(),
        a,
        b,
        _keep: Some(tmp),
    }
}

/// Every kind of pair, with rings of `capacity` bytes.
fn all_pairs(capacity: usize) -> Vec<Pair> {
    let mut v: Vec<Pair> = ALL_WAKE_MODES
        .into_iter()
        .map(|w| socket_pair(w, capacity))
        .collect();
    v.push(dir_pair(WakeMode::Futex, capacity));
    v.push(dir_pair(WakeMode::Poll, capacity));
    v.push(file_pair(capacity));
    v
}

/// Fills `ch`'s sending ring without blocking; returns how much went in.
fn fill(ch: &mut Channel) -> usize {
    ch.writer().set_nonblocking(true);
    let buf = [0x55u8; 1000];
    let mut n = 0;
    loop {
        match ch.write(&buf) {
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    ch.writer().set_nonblocking(false);
    n
}

#[test]
fn eof_after_the_last_byte() {
    for Pair {
        what,
        mut a,
        mut b,
        _keep,
    } in all_pairs(4096)
    {
        a.write_all(b"last words").unwrap();
        a.shutdown_write();
        a.shutdown_write(); // twice is fine
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words", "{what}");
        // EOF is sticky, for every way of reading.
        assert_eq!(b.read(&mut [0u8; 10]).unwrap(), 0, "{what}");
        assert_eq!(
            b.reader()
                .read_with(|_, _| panic!("f called at EOF"))
                .unwrap(),
            0
        );
        assert_eq!(b.reader().available().unwrap(), 0);
        assert!(!b.peer_closed(), "{what}: only one direction was shut");
        // The other direction is independent.
        b.write_all(b"reply").unwrap();
        b.shutdown_write();
        got.clear();
        a.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"reply", "{what}");
    }
}

/// A reader blocked on an empty ring wakes up with EOF when the writer shuts
/// down, and with the bytes then EOF when it drops the whole channel: an orderly
/// end, never an error.
#[test]
fn blocked_reader_gets_eof() {
    for drop_all in [false, true] {
        for Pair {
            what,
            mut a,
            b,
            _keep,
        } in all_pairs(4096)
        {
            let what = format!("{what}, drop {drop_all}");
            let (reader, tid) = spawn_with_tid(move || {
                let mut b = b;
                let mut got = Vec::new();
                let r = b.read_to_end(&mut got);
                (r.map(|_| got), Instant::now(), b)
            });
            wait_asleep(tid, Duration::from_secs(5));
            a.write_all(b"bye").unwrap();
            let t = Instant::now();
            if drop_all {
                drop(a);
            } else {
                a.shutdown_write();
            }
            let (r, done, b) = within(Duration::from_secs(5), &what, move || {
                reader.join().unwrap()
            });
            assert_eq!(r.unwrap(), b"bye", "{what}");
            assert!(
                done - t < Duration::from_secs(1),
                "{what}: EOF seen after {:?}",
                done - t
            );
            if drop_all {
                assert!(b.peer_closed(), "{what}");
            }
        }
    }
}

#[test]
fn write_after_shutdown_is_broken_pipe() {
    for Pair {
        what,
        mut a,
        mut b,
        _keep,
    } in all_pairs(4096)
    {
        a.write_all(b"x").unwrap();
        a.shutdown_write();
        assert_kind(a.write(b"y"), ErrorKind::BrokenPipe);
        assert_kind(a.write_all(b"y"), ErrorKind::BrokenPipe);
        assert_kind(
            a.writer()
                .write_with(|_, _| panic!("f called after shutdown")),
            ErrorKind::BrokenPipe,
        );
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"x", "{what}");
    }
}

/// Writing to a peer that dropped its channel (or only its reading half) fails
/// at once with BrokenPipe, even with room in the ring.
#[test]
fn write_to_closed_peer_is_broken_pipe() {
    for Pair {
        what,
        mut a,
        b,
        _keep,
    } in all_pairs(4096)
    {
        assert!(!a.peer_closed(), "{what}");
        drop(b);
        assert!(a.peer_closed(), "{what}");
        assert_kind(a.write(b"y"), ErrorKind::BrokenPipe);
        assert_kind(
            a.writer().write_with(|_, _| panic!("f called")),
            ErrorKind::BrokenPipe,
        );
        // And our reading side sees the orderly end.
        assert_eq!(a.read(&mut [0u8; 4]).unwrap(), 0, "{what}");
    }

    let Pair { mut a, b, .. } = socket_pair(WakeMode::Futex, 4096);
    let (br, mut bw) = b.split();
    drop(br);
    assert_kind(a.write(b"y"), ErrorKind::BrokenPipe);
    assert!(!a.peer_closed());
    // The peer's writing half still works.
    bw.write_all(b"still here").unwrap();
    drop(bw);
    let mut got = Vec::new();
    a.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"still here");
    assert!(a.peer_closed());
}

/// A writer blocked on a full ring is woken with BrokenPipe when the peer goes.
#[test]
fn blocked_writer_gets_broken_pipe() {
    for Pair {
        what,
        mut a,
        b,
        _keep,
    } in all_pairs(4096)
    {
        assert_eq!(fill(&mut a), 4096, "{what}");
        let (writer, tid) = spawn_with_tid(move || {
            let r = a.write(b"more");
            (r, Instant::now())
        });
        wait_asleep(tid, Duration::from_secs(5));
        let t = Instant::now();
        drop(b);
        let (r, done) = within(Duration::from_secs(5), &what, move || {
            writer.join().unwrap()
        });
        assert_kind(r, ErrorKind::BrokenPipe);
        assert!(done - t < Duration::from_secs(1), "{what}: {:?}", done - t);
    }
}

#[test]
fn timeouts() {
    let limit = Duration::from_millis(150);
    for Pair {
        what,
        mut a,
        mut b,
        _keep,
    } in all_pairs(4096)
    {
        // Reads.
        b.reader().set_timeout(Some(limit)).unwrap();
        let t = Instant::now();
        assert_kind(b.read(&mut [0u8; 8]), ErrorKind::TimedOut);
        let took = t.elapsed();
        assert!(
            took >= limit && took < limit + Duration::from_millis(700),
            "{what}: read timed out after {took:?}"
        );
        let t = Instant::now();
        assert_kind(
            b.reader().read_with(|_, _| panic!("f called")),
            ErrorKind::TimedOut,
        );
        assert!(t.elapsed() >= limit);
        // The timeout does not break later reads.
        a.write_all(b"late").unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"late");

        // Writes on a full ring.
        fill(&mut a);
        a.writer().set_timeout(Some(limit)).unwrap();
        let t = Instant::now();
        assert_kind(a.write(b"x"), ErrorKind::TimedOut);
        let took = t.elapsed();
        assert!(
            took >= limit && took < limit + Duration::from_millis(700),
            "{what}: write timed out after {took:?}"
        );
        assert_kind(
            a.writer().write_with(|_, _| panic!("f called")),
            ErrorKind::TimedOut,
        );
        // Room again: the write goes through.
        let mut sink = vec![0u8; 100];
        b.read_exact(&mut sink).unwrap();
        assert_eq!(a.write(b"x").unwrap(), 1);

        // Zero is refused, None blocks again.
        assert_kind(
            b.reader().set_timeout(Some(Duration::ZERO)),
            ErrorKind::InvalidInput,
        );
        assert_kind(
            a.writer().set_timeout(Some(Duration::ZERO)),
            ErrorKind::InvalidInput,
        );
        b.reader().set_timeout(None).unwrap();
        a.writer().set_timeout(None).unwrap();
    }
}

#[test]
fn non_blocking() {
    for Pair {
        what,
        mut a,
        mut b,
        _keep,
    } in all_pairs(4096)
    {
        b.set_nonblocking(true);
        let t = Instant::now();
        assert_kind(b.read(&mut [0u8; 8]), ErrorKind::WouldBlock);
        assert_kind(
            b.reader().read_with(|_, _| panic!("f called")),
            ErrorKind::WouldBlock,
        );
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "{what}: non-blocking read waited"
        );
        a.write_all(b"abc").unwrap();
        let mut got = [0u8; 8];
        assert_eq!(b.read(&mut got).unwrap(), 3);
        assert_eq!(&got[..3], b"abc");

        // Writes: fill the ring, then WouldBlock until the reader makes room.
        a.set_nonblocking(true);
        let mut n = 0;
        let e = loop {
            match a.write(&[1u8; 3000]) {
                Ok(k) => n += k,
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), ErrorKind::WouldBlock, "{what}: {e}");
        assert_eq!(n, 4096, "{what}");
        assert_kind(
            a.writer().write_with(|_, _| panic!("f called")),
            ErrorKind::WouldBlock,
        );
        let mut sink = [0u8; 1000];
        assert_eq!(b.read(&mut sink).unwrap(), 1000);
        assert_eq!(a.write(&[1u8; 3000]).unwrap(), 1000);
        // Non-blocking EOF is still EOF.
        a.shutdown_write();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 4096);
    }
}

#[test]
fn zero_sizes() {
    for Pair {
        what,
        mut a,
        mut b,
        _keep,
    } in all_pairs(4096)
    {
        // On an empty channel neither blocks.
        let (a2, b2) = within(Duration::from_secs(5), &what, move || {
            assert_eq!(b.read(&mut []).unwrap(), 0);
            assert_eq!(a.write(&[]).unwrap(), 0);
            (a, b)
        });
        (a, b) = (a2, b2);
        assert_eq!(a.writer().position(), 0);

        a.write_all(b"0123456789").unwrap();
        assert_eq!(b.read(&mut []).unwrap(), 0);
        assert_eq!(b.reader().available().unwrap(), 10, "{what}");
        // Zero-copy calls that take nothing publish nothing.
        assert_eq!(
            b.reader()
                .read_with(|x, _| {
                    assert_eq!(x, b"0123456789");
                    0
                })
                .unwrap(),
            0
        );
        assert_eq!(b.reader().available().unwrap(), 10);
        assert_eq!(
            a.writer()
                .write_with(|x, y| {
                    assert_eq!(x.len() + y.len(), 4096 - 10);
                    0
                })
                .unwrap(),
            0
        );
        assert_eq!(a.writer().position(), 10);
        assert_eq!(b.reader().available().unwrap(), 10);
        let mut got = [0u8; 10];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"0123456789");
        assert_eq!(b.reader().position(), 10);
    }
}

/// The zero-copy slices split where the ring wraps, and taking more than offered
/// is clamped.
///
/// `write_with` offers the free space the producer last saw (it reloads the
/// consumer's index only when that shows nothing free), so the ring is first
/// brought to a state where the producer's view is exact: full, then drained.
#[test]
fn zero_copy_across_the_wrap() {
    for Pair {
        what,
        mut a,
        mut b,
        _keep,
    } in all_pairs(4096)
    {
        a.write_all(&[1u8; 4096]).unwrap();
        b.read_exact(&mut [0u8; 3000]).unwrap();
        a.write_all(&[1u8; 3000]).unwrap();
        b.read_exact(&mut [0u8; 4096]).unwrap();
        // Empty ring, both indices at 7096 = 3000 mod 4096.
        let n = a
            .writer()
            .write_with(|x, y| {
                assert_eq!((x.len(), y.len()), (1096, 3000), "{what}");
                fill_pattern(9, 0, x);
                fill_pattern(9, 1096, y);
                usize::MAX
            })
            .unwrap();
        assert_eq!(n, 4096, "{what}: clamped to the free space");
        assert_eq!(b.reader().available().unwrap(), 4096);
        let n = b
            .reader()
            .read_with(|x, y| {
                assert_eq!((x.len(), y.len()), (1096, 3000), "{what}");
                check_pattern(9, 0, x);
                check_pattern(9, 1096, y);
                usize::MAX
            })
            .unwrap();
        assert_eq!(n, 4096, "{what}: clamped to the ready bytes");
        assert_eq!(b.reader().position(), 11192);
        assert_eq!(a.writer().position(), 11192);
    }
}

/// What `write_with` offers is never more than the real free space and never
/// nothing, even when its view of the reader's progress is stale.
#[test]
fn zero_copy_offers_at_most_the_free_space() {
    let Pair { mut a, mut b, .. } = socket_pair(WakeMode::Futex, 4096);
    a.write_all(&[1u8; 3000]).unwrap();
    b.read_exact(&mut [0u8; 3000]).unwrap();
    let mut written = 0u64;
    for i in 0..5 {
        let n = a
            .writer()
            .write_with(|x, y| {
                let total = x.len() + y.len();
                assert!((1..=4096).contains(&total), "offer {i}: {total} bytes");
                fill_pattern(3, written, x);
                fill_pattern(3, written + x.len() as u64, y);
                total
            })
            .unwrap();
        written += n as u64;
        let mut got = vec![0u8; n];
        b.read_exact(&mut got).unwrap();
        check_pattern(3, written - n as u64, &got);
    }
}

#[test]
fn split_and_unsplit() {
    let Pair { a, b, .. } = socket_pair(WakeMode::Futex, 4096);
    let (ar, aw) = a.split();
    let (br, bw) = b.split();
    let (ar, bw) = match Channel::unsplit(ar, bw) {
        Ok(_) => panic!("halves of different channels were joined"),
        Err(halves) => halves,
    };
    let mut a = Channel::unsplit(ar, aw).unwrap_or_else(|_| panic!("unsplit"));
    let mut b = Channel::unsplit(br, bw).unwrap_or_else(|_| panic!("unsplit"));
    a.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}

#[test]
fn describes_itself() {
    for Pair { what, a, b, _keep } in all_pairs(16384) {
        assert_eq!(a.capacity(), 16384, "{what}");
        assert_eq!(b.capacity(), 16384, "{what}");
        assert_eq!(a.wake_mode(), b.wake_mode(), "{what}");
        assert!(a.segment_len() >= 2 * 16384 + 4096, "{what}");
        assert_eq!(a.segment_len(), b.segment_len(), "{what}");
    }
}
