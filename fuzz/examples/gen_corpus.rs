//! Writes the seed corpus of every fuzz target: a few valid inputs each, built with
//! the real encoders, so the fuzzers start past the magic numbers.
//!
//! `cargo +nightly run --manifest-path fuzz/Cargo.toml --example gen_corpus` (from
//! the repository root) rewrites `fuzz/corpus/<target>/seed-*`.

use std::path::Path;
use std::sync::Arc;

use vmc_conn::registry::{ListenerEntry, NetNs};
use vmc_conn::wire::{self, Control, Switch};
use vmc_conn::Path as WirePath;
use vmc_fuzz::Builder;
use vmc_ring::heap::AlignedBlock;
use vmc_ring::layout::{ChannelLayout, WakeKind};
use vmc_ring::Endpoint;

/// Operation codes of ring_scribble: `kind << 1 | ring`.
mod ring_op {
    pub const WRITE: u8 = 0;
    pub const WRITE_SLICES: u8 = 1;
    pub const FREE: u8 = 2;
    pub const TX_SLEEP: u8 = 3;
    pub const TX_WAKE: u8 = 5;
    pub const TX_CLOSE: u8 = 6;
    pub const TX_REOPEN: u8 = 7;
    pub const TAKE_BACK: u8 = 8;
    pub const READ: u8 = 9;
    pub const READ_SLICES: u8 = 10;
    pub const AVAILABLE: u8 = 11;
    pub const IS_FINISHED: u8 = 13;
    pub const RX_SLEEP: u8 = 14;
    pub const RX_FINISH_SLEEP: u8 = 15;
    pub const RX_WAKE: u8 = 16;
    pub const RX_CLOSE: u8 = 17;
    pub const SCRIBBLE: u8 = 18;
    pub const SCRIBBLE_DATA: u8 = 19;
}

fn op(b: &mut Builder, kind: u8, ring: u8) -> &mut Builder {
    b.u8(kind << 1 | ring)
}

fn ring_scribble() -> Vec<Vec<u8>> {
    use ring_op::*;
    let mut seeds = Vec::new();
    // Capacity 16: stream both ways round the wrap, then EOF.
    let mut b = Builder::new();
    b.u8(0);
    for ring in 0..2 {
        op(&mut b, WRITE, ring).u16(10);
        op(&mut b, READ, ring).u16(4);
        op(&mut b, WRITE, ring).u16(16);
        op(&mut b, READ, ring).u16(32);
        op(&mut b, WRITE, ring).u16(9);
        op(&mut b, TX_CLOSE, ring);
        op(&mut b, IS_FINISHED, ring);
        op(&mut b, READ, ring).u16(32);
        op(&mut b, IS_FINISHED, ring);
    }
    seeds.push(b.out);
    // Capacity 64: zero-copy both ways, take back, then a scribbled tail.
    let mut b = Builder::new();
    b.u8(1);
    op(&mut b, WRITE_SLICES, 0).u16(64).u16(40);
    op(&mut b, READ_SLICES, 0).u16(25);
    op(&mut b, WRITE_SLICES, 0).u16(30).u16(30);
    op(&mut b, TAKE_BACK, 0).u8(1).u16(20).u8(1);
    op(&mut b, FREE, 0);
    op(&mut b, SCRIBBLE, 0).u16(384 / 8).u8(1).u16(100);
    op(&mut b, AVAILABLE, 0);
    op(&mut b, READ, 0).u16(128);
    op(&mut b, READ, 0).u16(128);
    op(&mut b, WRITE, 1).u16(5);
    op(&mut b, READ, 1).u16(5);
    seeds.push(b.out);
    // Capacity 4096: sleep and wake-ups in both directions, a scribbled head.
    let mut b = Builder::new();
    b.u8(3);
    op(&mut b, RX_SLEEP, 1);
    op(&mut b, WRITE, 1).u16(100);
    op(&mut b, TX_WAKE, 1);
    op(&mut b, RX_FINISH_SLEEP, 1);
    op(&mut b, WRITE, 1).u16(8000);
    op(&mut b, TX_SLEEP, 1);
    op(&mut b, READ, 1).u16(3000);
    op(&mut b, RX_WAKE, 1);
    op(&mut b, SCRIBBLE, 0)
        .u16((768 + 128) / 8)
        .u8(0)
        .u64(1 << 40);
    op(&mut b, WRITE, 1).u16(4096);
    op(&mut b, RX_CLOSE, 0);
    op(&mut b, WRITE, 0).u16(1);
    seeds.push(b.out);
    // Capacity 256: close flags and sleep words scribbled, a data byte, reopen.
    let mut b = Builder::new();
    b.u8(2);
    op(&mut b, WRITE, 0).u16(300);
    op(&mut b, SCRIBBLE, 0)
        .u16((384 + 264) / 8)
        .u8(2)
        .u8(1)
        .u8(1);
    op(&mut b, WRITE, 0).u16(1);
    op(&mut b, IS_FINISHED, 0);
    op(&mut b, SCRIBBLE_DATA, 0).u16(7).u8(0xee);
    op(&mut b, READ, 0).u16(512);
    op(&mut b, SCRIBBLE, 0).u16((384 + 264) / 8).u8(3);
    op(&mut b, TX_REOPEN, 0);
    op(&mut b, SCRIBBLE, 1)
        .u16((768 + 256) / 8)
        .u8(2)
        .u8(1)
        .u8(1);
    op(&mut b, WRITE, 1).u16(10);
    op(&mut b, TX_WAKE, 1);
    seeds.push(b.out);
    seeds
}

/// The first bytes of a header `Endpoint::create` lays out for `cap`.
fn header(cap: usize) -> (Vec<u8>, usize) {
    let len = ChannelLayout::for_capacity(cap).unwrap().segment_len;
    let mem = Arc::new(AlignedBlock::zeroed(len));
    // SAFETY: `mem` is a page-aligned block of `len` bytes kept alive by the owner.
    let ep = unsafe { Endpoint::create(mem.ptr(), len, mem.clone(), cap, 42, WakeKind::Futex) };
    drop(ep.unwrap());
    // SAFETY: the block has `len` > 1152 initialised (zeroed, then written) bytes.
    let bytes = unsafe { std::slice::from_raw_parts(mem.ptr().as_ptr(), 1152) }.to_vec();
    (bytes, len)
}

fn segment_header() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (cap, short, flags, name) in [
        (16usize, false, 0u8, &b"chan-1-2-00ff"[..]),
        (4096, true, 1, b"chan-"),
        (65536, false, 2, b"chan-x/../y"),
    ] {
        let (mut h, len) = header(cap);
        let pages = (len / 4096 - usize::from(short)) as u8;
        if flags & 2 != 0 {
            h[16] = 12; // the creator asks for 4 KiB rings
        }
        let mut b = Builder::new();
        b.u8(pages).u16(100).u8(flags).u8(1).bytes(&h).bytes(name);
        seeds.push(b.out);
    }
    // Another version, and an attacher side already taken.
    let (mut h, _) = header(16);
    h[8] = 2;
    seeds.push(
        Builder::new()
            .u8(3)
            .u16(0)
            .u8(0)
            .u8(3)
            .bytes(&h)
            .out
            .clone(),
    );
    let (mut h, _) = header(16);
    h[256] = 1;
    seeds.push(
        Builder::new()
            .u8(3)
            .u16(0)
            .u8(0)
            .u8(2)
            .bytes(&h)
            .out
            .clone(),
    );
    seeds
}

fn wire_frames() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for c in [
        Control::Switch(Switch {
            to: WirePath::Tcp,
            offset: 3,
        }),
        Control::Switch(Switch {
            to: WirePath::Shm,
            offset: u64::MAX,
        }),
        Control::LeftRing(1 << 20),
        Control::LeftTcp(0),
        Control::Rewind(17),
    ] {
        seeds.push(Builder::new().u8(0).bytes(&c.emit()).out.clone());
    }
    for (l, r) in [
        ("127.0.0.1:40000", "127.0.0.1:80"),
        ("[fd00::1:2:3:4:5]:65535", "[::ffff:10.0.0.1]:1"),
    ] {
        let f = wire::attach(l.parse().unwrap(), r.parse().unwrap());
        seeds.push(Builder::new().u8(1).u64(0xf000_0001).bytes(&f).out.clone());
    }
    seeds.push(Builder::new().u8(2).u8(4).u64(99).out.clone());
    seeds
}

fn registry_entry() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for name in ["l-80-123-00ff.json", "l-65535-1-a.json", "l-080-1-a.json"] {
        seeds.push(
            Builder::new()
                .u8(0)
                .u16(80)
                .u32(4242)
                .u64(0xabcd)
                .bytes(name.as_bytes())
                .out
                .clone(),
        );
    }
    let ns = NetNs {
        dev: 4,
        ino: 4026531840,
    };
    for (addr, pretty) in [("0.0.0.0:6000", true), ("[::1]:443", false)] {
        let e = ListenerEntry {
            version: vmc_conn::registry::ENTRY_VERSION,
            netns: ns,
            addr: addr.parse().unwrap(),
            pid: 1234,
            uid: 1000,
            offers: "/dev/shm/vmc-1000/offers".into(),
            created_unix_ms: 1_700_000_000_000,
        };
        let mut json = if pretty {
            serde_json::to_vec_pretty(&e).unwrap()
        } else {
            serde_json::to_vec(&e).unwrap()
        };
        json.push(b'\n');
        let port = e.addr.port();
        seeds.push(
            Builder::new()
                .u8(1)
                .u16(port)
                .u32(1000)
                .bytes(&json)
                .out
                .clone(),
        );
    }
    // Ranking: a loopback destination and four listeners of port 80 and 81.
    let mut b = Builder::new();
    b.u8(2).u8(1).u8(1).u8(0);
    for (ip, port, ns) in [(0u8, 0u8, 1u8), (1, 0, 1), (2, 0, 2), (5, 1, 1)] {
        b.u8(ip);
        if ip == 5 {
            b.u32(0x0a00_0001);
        }
        b.u8(port).u8(ns).u8(7).u8(1).u8(9);
    }
    seeds.push(b.out);
    seeds
}

fn hello(kind: u8, wake: u8, word: u64) -> Vec<u8> {
    let mut h = b"VMC1".to_vec();
    h.extend_from_slice(&[kind, wake, 0, 0]);
    h.extend_from_slice(&word.to_le_bytes());
    h
}

fn channel_handshake() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    // Attacher under test: a HELLO with a channel laid out by the real code (capacity
    // 16, no scribbles), for each wake mode; eventfds ride along for mode 2.
    for (wake, spec) in [(1u8, 1u8), (2, 1 | 2 << 1), (3, 1)] {
        let mut b = Builder::new();
        b.u8(0).u8(0);
        let h = hello(1, wake, 12288);
        b.u8(h.len() as u8).bytes(&h).u8(spec).u8(0).u8(0).u8(0);
        seeds.push(b.out);
    }
    // A REUSE HELLO first (answered UNKNOWN), then a fresh one with a raw memfd.
    let mut b = Builder::new();
    b.u8(0).u8(1);
    let h = hello(2, 2, 77);
    b.u8(16).bytes(&h).u8(0);
    let h = hello(1, 3, 12288);
    b.u8(16)
        .bytes(&h)
        .u8(1)
        .u8(1 | 2 | 4)
        .u8(3)
        .u16(16)
        .bytes(&hello(0, 0, 0));
    seeds.push(b.out);
    // Creator under test: an ACK after attaching, for each wake mode.
    for (wake, spec) in [(0u8, 0u8), (1, 2 << 1), (2, 0)] {
        let mut b = Builder::new();
        b.u8(1)
            .u8(wake)
            .u8(0)
            .u8(1)
            .u8(8)
            .bytes(b"VMCA\0\0\0\0")
            .u8(spec);
        seeds.push(b.out);
    }
    seeds
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [(&str, Vec<Vec<u8>>); 5] = [
        ("ring_scribble", ring_scribble()),
        ("segment_header", segment_header()),
        ("wire_frames", wire_frames()),
        ("registry_entry", registry_entry()),
        ("channel_handshake", channel_handshake()),
    ];
    for (target, seeds) in targets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for old in std::fs::read_dir(&dir).unwrap() {
            let old = old.unwrap().path();
            if old
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            {
                std::fs::remove_file(old).unwrap();
            }
        }
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed).unwrap();
        }
        println!("{target}: {} seeds", seeds.len());
    }
}
