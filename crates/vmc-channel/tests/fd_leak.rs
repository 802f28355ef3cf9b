//! No descriptor leaks: creating and dropping hundreds of channels of every kind
//! (and failing to set some up) leaves the process with the descriptors it had.
//!
//! The only test of its binary, so that no other test opens or closes
//! descriptors while it counts them.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use vmc_channel::{Channel, ChannelConfig, ChannelListener, WakeMode};
use vmc_os::SegmentDir;

const CAP: usize = 4096;

fn config(wake: WakeMode) -> ChannelConfig {
    ChannelConfig {
        capacity: CAP,
        wake,
        ..ChannelConfig::default()
    }
}

/// A byte each way, so that every channel is really used (and wake-ups fire).
fn exercise(mut a: Channel, mut b: Channel) {
    a.write_all(b"a").unwrap();
    b.write_all(b"b").unwrap();
    let mut x = [0u8; 1];
    b.read_exact(&mut x).unwrap();
    assert_eq!(&x, b"a");
    a.read_exact(&mut x).unwrap();
    assert_eq!(&x, b"b");
    drop(a);
    assert_eq!(b.read(&mut x).unwrap(), 0);
}

fn one_channel(i: usize, dir: &SegmentDir, file: &Path) {
    match i % 5 {
        0..=2 => {
            let (a, b) = Channel::pair(&config(ALL_WAKE_MODES[i % 5])).unwrap();
            exercise(a, b);
        }
        3 => {
            let wake = if i % 2 == 0 {
                WakeMode::Futex
            } else {
                WakeMode::Poll
            };
            let pending = Channel::create_in_dir(dir, &config(wake)).unwrap();
            let b = Channel::attach_in_dir(dir, pending.name(), Duration::ZERO).unwrap();
            let a = pending.wait(Duration::from_secs(5)).unwrap();
            exercise(a, b);
        }
        _ => {
            let pending = Channel::create_on_file(file, &config(WakeMode::Poll)).unwrap();
            let len = vmc_ring::ChannelLayout::for_capacity(CAP)
                .unwrap()
                .segment_len;
            let b = Channel::attach_on_file(file, len, Duration::ZERO).unwrap();
            let a = pending.wait(Duration::from_secs(5)).unwrap();
            exercise(a, b);
        }
    }
}

/// Set-ups that fail half-way, after descriptors were created or received.
fn failures(dir: &SegmentDir, sock: &Path) {
    // Nobody listening.
    assert!(Channel::connect(sock.with_extension("none")).is_err());
    // Bad capacity.
    assert!(Channel::pair(&ChannelConfig {
        capacity: 1000,
        ..ChannelConfig::default()
    })
    .is_err());
    // Unknown directory segment; pending segment nobody attaches to.
    assert!(Channel::attach_in_dir(dir, "chan-none", Duration::ZERO).is_err());
    let pending = Channel::create_in_dir(dir, &config(WakeMode::Futex)).unwrap();
    assert!(pending.wait(Duration::from_millis(1)).is_err());
    // An attacher sent too many descriptors (they must all be closed).
    let (x, y) = UnixStream::pair().unwrap();
    let seg = vmc_os::Segment::create_memfd("leak-test", 64 << 10).unwrap();
    let mut hello = [0u8; 16];
    hello[..4].copy_from_slice(b"VMC1");
    hello[4] = 1;
    hello[5] = vmc_ring::WakeKind::Futex as u8;
    vmc_os::send_with_fds(x.as_fd(), &hello, &[seg.fd(), seg.fd(), seg.fd()]).unwrap();
    assert_eq!(
        Channel::attach_over(y.into(), Duration::ZERO)
            .err()
            .unwrap()
            .kind(),
        ErrorKind::InvalidData
    );
    // A segment without a channel in it (refused after mapping it).
    let (x2, y2) = UnixStream::pair().unwrap();
    vmc_os::send_with_fds(x2.as_fd(), &hello, &[seg.fd()]).unwrap();
    assert!(Channel::attach_over(y2.into(), Duration::ZERO).is_err());
    drop((x, x2, seg));
    // A creator whose peer answers garbage (eventfds were made and sent).
    let (x, y) = UnixStream::pair().unwrap();
    let offer = Channel::offer_over(x.into(), &config(WakeMode::EventFd)).unwrap();
    let mut y = y;
    let mut h = [0u8; 16];
    let (n, fds) = vmc_os::recv_with_fds(y.as_fd(), &mut h, 3).unwrap();
    assert_eq!((n, fds.len()), (16, 3));
    drop(fds);
    y.write_all(b"GARBAGE!").unwrap();
    assert!(offer.finish().is_err());
    // Listener and connect.
    let l = ChannelListener::bind(sock, config(WakeMode::EventFd)).unwrap();
    let sock2 = sock.to_path_buf();
    let t = std::thread::spawn(move || Channel::connect(sock2).unwrap());
    let a = l.accept().unwrap();
    let b = t.join().unwrap();
    drop(l);
    exercise(a, b);
}

fn fd_list() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some(format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            ))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn no_descriptor_leaks() {
    within(Duration::from_secs(60), "fd leak test", || {
        let tmp = tempfile::tempdir().unwrap();
        let dir_path = tmp.path().join("shm");
        let dir = SegmentDir::open(&dir_path).unwrap();
        let file = tmp.path().join("bar");
        let len = vmc_ring::ChannelLayout::for_capacity(CAP)
            .unwrap()
            .segment_len;
        std::fs::File::create(&file)
            .unwrap()
            .set_len(len as u64)
            .unwrap();
        let sock = tmp.path().join("vmc.sock");

        // Warm up whatever is created once per process.
        for i in 0..5 {
            one_channel(i, &dir, &file);
        }
        failures(&dir, &sock);

        let before = fd_count();
        let list_before = fd_list();
        for i in 0..200 {
            one_channel(i, &dir, &file);
        }
        for _ in 0..10 {
            failures(&dir, &sock);
        }
        let after = fd_count();
        assert_eq!(
            before,
            after,
            "descriptors leaked:\nbefore {list_before:#?}\nafter {:#?}",
            fd_list()
        );
        assert!(segment_files(&dir_path).is_empty());
    });
}
