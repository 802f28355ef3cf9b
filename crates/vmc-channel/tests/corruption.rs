//! A peer that scribbles on the shared ring indices: the victim's reads or
//! writes fail with `InvalidData` (and keep failing), never anything worse,
//! and a victim blocked in a read is woken with the error.
//!
//! The segment is reached through a second, independent view of the same file:
//! for a plain-file channel the file itself; for a `Channel::pair` the memfd,
//! re-opened through /proc/self/fd (no new API needed).

mod common;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use vmc_channel::{Channel, ChannelConfig, WakeMode};

/// Offsets in the segment (pinned by vmc-ring's layout): ring 0 carries creator
/// -> attacher, ring 1 the other way; each control block is tail, head, state,
/// 128 bytes apart.
const RING0_TAIL: u64 = 384;
const RING0_HEAD: u64 = 384 + 128;
const RING1_TAIL: u64 = 768;

fn scribble(f: &File, off: u64, v: u64) {
    f.write_all_at(&v.to_le_bytes(), off).unwrap();
}

fn file_pair(cap: usize) -> (tempfile::TempDir, PathBuf, Channel, Channel) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bar");
    let len = vmc_ring::ChannelLayout::for_capacity(cap)
        .unwrap()
        .segment_len;
    File::create(&path).unwrap().set_len(len as u64).unwrap();
    let config = ChannelConfig {
        capacity: cap,
        wake: WakeMode::Poll,
        ..ChannelConfig::default()
    };
    let pending = Channel::create_on_file(&path, &config).unwrap();
    let b = Channel::attach_on_file(&path, len, Duration::from_micros(20)).unwrap();
    let a = pending.wait(Duration::from_secs(5)).unwrap();
    (tmp, path, a, b)
}

/// A tail beyond what the ring can hold: the reader refuses it, for good.
#[test]
fn bad_tail_fails_the_reader() {
    let (_tmp, path, mut a, mut b) = file_pair(4096);
    let f = File::options().read(true).write(true).open(&path).unwrap();
    a.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    scribble(&f, RING0_TAIL, 5 + 4097);
    let e = assert_kind(b.read(&mut got), ErrorKind::InvalidData);
    assert!(e.to_string().contains("tail"), "{e}");
    // Poisoned: even once the writer publishes a sane tail again.
    a.write_all(b"x").unwrap();
    assert_kind(b.read(&mut got), ErrorKind::InvalidData);
    assert_kind(b.reader().read_with(|_, _| 0), ErrorKind::InvalidData);
    assert_kind(b.reader().available(), ErrorKind::InvalidData);
    // The other direction is a different ring and still works.
    b.write_all(b"ok").unwrap();
    let mut two = [0u8; 2];
    a.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"ok");

    // A tail moving backwards is refused too.
    let (_tmp, path, mut a, mut b) = file_pair(4096);
    let f = File::options().read(true).write(true).open(&path).unwrap();
    b.write_all(&[1u8; 100]).unwrap();
    assert_eq!(a.reader().available().unwrap(), 100);
    scribble(&f, RING1_TAIL, 50);
    a.read_exact(&mut [0u8; 100]).unwrap(); // cached: the 100 bytes seen before
    assert_kind(a.read(&mut got), ErrorKind::InvalidData);
}

/// A head beyond the tail: the writer refuses it when it next looks.
#[test]
fn bad_head_fails_the_writer() {
    let (_tmp, path, mut a, _b) = file_pair(4096);
    let f = File::options().read(true).write(true).open(&path).unwrap();
    assert_eq!(a.write(&[0u8; 4096]).unwrap(), 4096);
    scribble(&f, RING0_HEAD, 1 << 40);
    let e = assert_kind(a.write(b"x"), ErrorKind::InvalidData);
    assert!(e.to_string().contains("head"), "{e}");
    assert_kind(a.write(b"x"), ErrorKind::InvalidData);
    assert_kind(a.writer().write_with(|_, _| 0), ErrorKind::InvalidData);
}

/// A reader asleep on an empty ring notices a corrupt tail by itself.
#[test]
fn blocked_reader_is_woken_by_corruption() {
    let (_tmp, path, _a, b) = file_pair(4096);
    let f = File::options().read(true).write(true).open(&path).unwrap();
    let (reader, tid) = spawn_with_tid(move || {
        let mut b = b;
        let r = b.read(&mut [0u8; 16]);
        (r.map_err(|e| e.kind()), Instant::now())
    });
    wait_asleep(tid, Duration::from_secs(5));
    let t = Instant::now();
    scribble(&f, RING0_TAIL, 1 << 50);
    let (r, done) = within(Duration::from_secs(5), "blocked reader", move || {
        reader.join().unwrap()
    });
    assert_eq!(r, Err(ErrorKind::InvalidData));
    assert!(done - t < Duration::from_secs(1), "{:?}", done - t);
}

/// The memfd of a `Channel::pair`, opened a second time.
fn reopen_pair_memfd() -> File {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy().starts_with("/memfd:vmc-channel") {
            found.push(e.path());
        }
    }
    assert!(!found.is_empty(), "no vmc-channel memfd in /proc/self/fd");
    let files: Vec<File> = found
        .iter()
        .map(|p| File::options().read(true).write(true).open(p).unwrap())
        .collect();
    // Both ends hold the same memfd (this is the only test making memfds here).
    let ino = |f: &File| std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap());
    let first = ino(&files[0]);
    assert!(files.iter().all(|f| ino(f) == first), "several memfds");
    files.into_iter().next().unwrap()
}

/// Over a `Channel::pair` (memfd): a corrupt tail fails a reader that is awake
/// and one that sleeps on the futex or the eventfd.
#[test]
fn pair_corruption_through_the_memfd() {
    for wake in [WakeMode::Futex, WakeMode::EventFd] {
        let config = ChannelConfig {
            capacity: 4096,
            wake,
            ..ChannelConfig::default()
        };
        let (mut a, b) = Channel::pair(&config).unwrap();
        let f = reopen_pair_memfd();
        a.write_all(b"ping").unwrap();
        let (reader, tid) = spawn_with_tid(move || {
            let mut b = b;
            let mut got = [0u8; 4];
            b.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
            // Now asleep on an empty ring.
            let r = b.read(&mut got);
            (r.map_err(|e| e.kind()), Instant::now(), b)
        });
        // Asleep means past "ping" too: scribbling earlier would fail that read.
        wait_asleep(tid, Duration::from_secs(5));
        let t = Instant::now();
        scribble(&f, RING0_TAIL, u64::MAX - 3);
        let (r, done, mut b) = within(Duration::from_secs(5), "blocked reader", move || {
            reader.join().unwrap()
        });
        assert_eq!(r, Err(ErrorKind::InvalidData), "{}", wake.name());
        assert!(done - t < Duration::from_secs(1), "{:?}", done - t);
        assert_kind(b.read(&mut [0u8; 4]), ErrorKind::InvalidData);
        // Dropping both ends of a corrupt channel is fine.
        drop((a, b, f));
    }
}
