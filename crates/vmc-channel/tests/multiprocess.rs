//! Streams between this test process and a child process (the test binary run
//! again with only `child_entry` selected): gigabytes each way over a socket
//! rendezvous, and a run over a directory segment, checked by checksums computed
//! on both sides.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use vmc_channel::{Channel, ChannelConfig, ChannelListener, WakeMode};
use vmc_os::SegmentDir;

const ENTRY: &str = "child_entry";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

const ENV_SOCK: &str = "VMC_TEST_SOCK";
const ENV_DIR: &str = "VMC_TEST_DIR";
const ENV_NAME: &str = "VMC_TEST_NAME";
const ENV_BYTES: &str = "VMC_TEST_BYTES";
const ENV_BACK: &str = "VMC_TEST_BACK";
const ENV_SEED: &str = "VMC_TEST_CHILD_SEED";

/// Source of the bytes sent: random, and sliced at random places, so that a
/// misplaced or repeated piece changes the checksum.
fn source(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; 5 * MIB as usize];
    TestRng::new(seed).fill(&mut v);
    v
}

/// Sends `total` bytes in pieces of 64 KiB to 1 MiB, alternating `write_all` and
/// zero-copy `write_with`; returns the checksum of what was sent.
fn send(ch: &mut Channel, total: u64, seed: u64) -> Checksum {
    let src = source(seed);
    let mut rng = TestRng::new(seed ^ 0x1234);
    let mut ck = Checksum::new();
    let mut sent = 0u64;
    while sent < total {
        let len = rng
            .range(64 * 1024, MIB as usize)
            .min((total - sent) as usize);
        let start = rng.range(0, src.len() - len);
        let piece = &src[start..start + len];
        if rng.chance(2) {
            ch.write_all(piece).expect("write_all");
        } else {
            let mut rest = piece;
            while !rest.is_empty() {
                let n = ch
                    .writer()
                    .write_with(|a, b| {
                        let na = a.len().min(rest.len());
                        a[..na].copy_from_slice(&rest[..na]);
                        let nb = b.len().min(rest.len() - na);
                        b[..nb].copy_from_slice(&rest[na..na + nb]);
                        na + nb
                    })
                    .expect("write_with");
                rest = &rest[n..];
            }
        }
        ck.update(piece);
        sent += len as u64;
    }
    ck
}

/// Receives up to EOF, alternating `read` and zero-copy `read_with`.
fn receive(ch: &mut Channel) -> Checksum {
    let mut ck = Checksum::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut rng = TestRng::new(99);
    loop {
        let n = if rng.chance(2) {
            ch.reader()
                .read_with(|a, b| {
                    ck.update(a);
                    ck.update(b);
                    a.len() + b.len()
                })
                .expect("read_with")
        } else {
            let len = rng.range(4096, buf.len());
            let n = ch.read(&mut buf[..len]).expect("read");
            ck.update(&buf[..n]);
            n
        };
        if n == 0 {
            return ck;
        }
    }
}

fn read_report(ch: &mut Channel) -> (u64, u64) {
    let mut rep = [0u8; 16];
    ch.read_exact(&mut rep).expect("reading the peer's report");
    parse_report(&rep)
}

/// The child's side of every test here; does nothing in a normal test run.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    match role.as_str() {
        // Receive to EOF, report count and checksum.
        "sink" => {
            let mut ch = Channel::connect(child_env(ENV_SOCK)).expect("child: connect");
            let ck = receive(&mut ch);
            ch.write_all(&ck.report()).unwrap();
        }
        // Send, then compare with the parent's report.
        "source" => {
            let mut ch = Channel::connect(child_env(ENV_SOCK)).expect("child: connect");
            let total: u64 = child_env(ENV_BYTES).parse().unwrap();
            let seed: u64 = child_env(ENV_SEED).parse().unwrap();
            let ck = send(&mut ch, total, seed);
            ch.shutdown_write();
            let got = read_report(&mut ch);
            assert_eq!(got, ck.finish(), "child: parent received something else");
            let mut rest = Vec::new();
            ch.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        }
        // Over a directory segment: receive and report, then send a pattern back.
        "dir" => {
            let dir = SegmentDir::open(child_env(ENV_DIR)).expect("child: open dir");
            let mut ch =
                Channel::attach_in_dir(&dir, &child_env(ENV_NAME), Duration::from_micros(50))
                    .expect("child: attach_in_dir");
            let ck = receive(&mut ch);
            ch.write_all(&ck.report()).unwrap();
            let back: u64 = child_env(ENV_BACK).parse().unwrap();
            let seed: u64 = child_env(ENV_SEED).parse().unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            let mut off = 0;
            while off < back {
                let n = (buf.len() as u64).min(back - off) as usize;
                fill_pattern(seed, off, &mut buf[..n]);
                ch.write_all(&buf[..n]).unwrap();
                off += n as u64;
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

fn listen(config: ChannelConfig) -> (tempfile::TempDir, PathBuf, ChannelListener) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("vmc.sock");
    let l = ChannelListener::bind(&path, config).expect("bind");
    (tmp, path, l)
}

fn accept(l: ChannelListener) -> Channel {
    within(Duration::from_secs(20), "accepting the child", move || {
        l.accept().expect("accept")
    })
}

/// Parent -> child, 2 GiB, futex wake-ups, default ring.
#[test]
fn two_gib_parent_to_child() {
    let seed = test_seed("parent to child");
    let (_tmp, path, l) = listen(ChannelConfig::default());
    let mut child = spawn_self(ENTRY, "sink", &[(ENV_SOCK, path.display().to_string())]);
    let mut ch = accept(l);
    assert_eq!(ch.wake_mode(), WakeMode::Futex);
    let total = 2 * GIB;
    let (ck, got, took) = within(Duration::from_secs(150), "2 GiB to the child", move || {
        let t = Instant::now();
        let ck = send(&mut ch, total, seed);
        ch.shutdown_write();
        let got = read_report(&mut ch);
        let took = t.elapsed();
        let mut rest = Vec::new();
        ch.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "bytes after the report");
        (ck, got, took)
    });
    assert_eq!(got, ck.finish(), "the child received something else");
    assert_eq!(got.0, total);
    child.wait_success(Duration::from_secs(20));
    eprintln!(
        "parent -> child (futex, {} KiB ring): {} MiB in {took:.2?} = {:.0} MiB/s",
        vmc_channel::config::DEFAULT_CAPACITY / 1024,
        total / MIB,
        mib_per_s(total, took)
    );
}

/// Child -> parent, 2 GiB, eventfd wake-ups, default ring.
#[test]
fn two_gib_child_to_parent() {
    let seed = test_seed("child to parent");
    let config = ChannelConfig {
        wake: WakeMode::EventFd,
        ..ChannelConfig::default()
    };
    let (_tmp, path, l) = listen(config);
    let total = 2 * GIB;
    let mut child = spawn_self(
        ENTRY,
        "source",
        &[
            (ENV_SOCK, path.display().to_string()),
            (ENV_BYTES, total.to_string()),
            (ENV_SEED, seed.to_string()),
        ],
    );
    let mut ch = accept(l);
    assert_eq!(ch.wake_mode(), WakeMode::EventFd);
    let (ck, took) = within(
        Duration::from_secs(150),
        "2 GiB from the child",
        move || {
            let t = Instant::now();
            let ck = receive(&mut ch);
            let took = t.elapsed();
            ch.write_all(&ck.report()).unwrap();
            drop(ch);
            (ck, took)
        },
    );
    assert_eq!(ck.count(), total);
    // The child compares the checksums and fails if they differ.
    child.wait_success(Duration::from_secs(20));
    eprintln!(
        "child -> parent (eventfd, {} KiB ring): {} MiB in {took:.2?} = {:.0} MiB/s",
        vmc_channel::config::DEFAULT_CAPACITY / 1024,
        total / MIB,
        mib_per_s(total, took)
    );
}

fn dir_run(wake: WakeMode, to_child: u64, back: u64) {
    let seed = test_seed(&format!("directory segment {}", wake.name()));
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = tmp.path().join("shm");
    let dir = SegmentDir::open(&dir_path).unwrap();
    let config = ChannelConfig {
        capacity: 128 * 1024,
        wake,
        ..ChannelConfig::default()
    };
    let pending = Channel::create_in_dir(&dir, &config).expect("create_in_dir");
    let name = pending.name().to_owned();
    assert!(name.starts_with("chan-"), "{name}");
    assert_eq!(segment_files(&dir_path), vec![name.clone()]);
    let mut child = spawn_self(
        ENTRY,
        "dir",
        &[
            (ENV_DIR, dir_path.display().to_string()),
            (ENV_NAME, name),
            (ENV_BACK, back.to_string()),
            (ENV_SEED, seed.to_string()),
        ],
    );
    let mut ch = pending
        .wait(Duration::from_secs(20))
        .expect("the child never attached");
    assert_eq!(ch.wake_mode(), wake);
    assert_eq!(ch.capacity(), config.capacity);
    assert!(
        segment_files(&dir_path).is_empty(),
        "the attacher unlinks the segment file"
    );
    let (ck, got, took) = within(Duration::from_secs(120), "directory stream", move || {
        let t = Instant::now();
        let ck = send(&mut ch, to_child, seed);
        ch.shutdown_write();
        let got = read_report(&mut ch);
        let took = t.elapsed();
        let mut buf = vec![0u8; 300_000];
        let mut off = 0u64;
        loop {
            let n = ch.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            check_pattern(seed, off, &buf[..n]);
            off += n as u64;
        }
        assert_eq!(off, back);
        (ck, got, took)
    });
    assert_eq!(got, ck.finish(), "the child received something else");
    child.wait_success(Duration::from_secs(20));
    assert!(
        segment_files(&dir_path).is_empty(),
        "segment file left over"
    );
    eprintln!(
        "parent -> child over a directory segment ({}): {} MiB in {took:.2?} = {:.0} MiB/s",
        wake.name(),
        to_child / MIB,
        mib_per_s(to_child, took)
    );
}

#[test]
fn directory_segment_futex() {
    dir_run(WakeMode::Futex, 512 * MIB, 64 * MIB);
}

#[test]
fn directory_segment_poll() {
    dir_run(WakeMode::Poll, 128 * MIB, 16 * MIB);
}
