//! The registry's reading of files other processes wrote (`vmc_conn::registry`).
//!
//! The first input byte picks what the rest is:
//! - an entry file name: `parse_entry_name` gives a port exactly for
//!   `l-<1..=65535 without leading zeros>-<one or more ASCII letters, digits, '-'>.json`,
//!   and the names `Registry::register` writes give back their port;
//! - an entry file's content (JSON), with the port its name says and the uid that owns
//!   it: `parse_entry` never panics, accepts only our version, that uid, that port
//!   (never 0) and an absolute offers path, names the field at fault when it refuses
//!   an object, and what it accepts, written again as `register` writes it (or
//!   compactly), parses back to the same entry;
//! - a set of entries and a destination for `rank_candidates` (what a lookup keeps of
//!   the entries it read): only entries of the destination's port, only ones in our
//!   own namespace for a loopback destination, each at most once, and ranking the
//!   result again changes nothing.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use vmc_conn::fuzzing::{parse_entry, parse_entry_name, rank_candidates};
use vmc_conn::registry::{ListenerEntry, NetNs, ENTRY_VERSION};
use vmc_fuzz::Input;

/// `l-<port>-<tail>.json`, read independently of the code under test.
fn name_spec(name: &str) -> Option<u16> {
    let b = name.as_bytes();
    if !name.starts_with("l-") || !name.ends_with(".json") || b.len() < 2 + 5 {
        return None;
    }
    let inner = &b[2..b.len() - 5];
    let digits = inner.iter().take_while(|c| c.is_ascii_digit()).count();
    let (port, rest) = inner.split_at(digits);
    let tail = rest.strip_prefix(b"-")?;
    if port.is_empty() || port.len() > 5 || (port[0] == b'0') || tail.is_empty() {
        return None;
    }
    if !tail.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') {
        return None;
    }
    let port: u32 = port.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0'));
    u16::try_from(port).ok()
}

fn entry_name(name: &str, port: u16, pid: u32, random: u64) {
    assert_eq!(parse_entry_name(name), name_spec(name), "{name:?}");
    let written = format!("l-{port}-{pid}-{random:016x}.json");
    let want = (port != 0).then_some(port);
    assert_eq!(parse_entry_name(&written), want, "{written}");
}

fn entry_content(buf: &[u8], name_port: u16, owner: u32) {
    let e = match parse_entry(buf, name_port, owner) {
        Ok(e) => e,
        Err(err) => {
            let is_object = matches!(
                serde_json::from_slice::<serde_json::Value>(buf),
                Ok(serde_json::Value::Object(_))
            );
            assert_eq!(err.field().is_some(), is_object, "{err:?}");
            assert!(!err.to_string().is_empty());
            return;
        }
    };
    assert_eq!(e.version, ENTRY_VERSION);
    assert_eq!(e.uid, owner);
    assert_eq!(e.addr.port(), name_port);
    assert_ne!(e.addr.port(), 0);
    assert!(e.offers.is_absolute(), "{e:?}");
    // As `Registry::register` writes it.
    let mut pretty = serde_json::to_vec_pretty(&e).expect("a parsed entry encodes");
    pretty.push(b'\n');
    assert_eq!(parse_entry(&pretty, name_port, owner), Ok(e.clone()));
    let compact = serde_json::to_vec(&e).unwrap();
    assert_eq!(parse_entry(&compact, name_port, owner), Ok(e));
}

fn ip(inp: &mut Input<'_>) -> IpAddr {
    match inp.u8() % 8 {
        0 => Ipv4Addr::UNSPECIFIED.into(),
        1 => Ipv4Addr::LOCALHOST.into(),
        2 => Ipv6Addr::UNSPECIFIED.into(),
        3 => Ipv6Addr::LOCALHOST.into(),
        4 => Ipv4Addr::from(inp.u32()).to_ipv6_mapped().into(),
        5 | 6 => Ipv4Addr::from(inp.u32()).into(),
        _ => Ipv6Addr::from(u128::from(inp.u64()) << 64 | u128::from(inp.u64())).into(),
    }
}

fn ranking(inp: &mut Input<'_>) {
    let ns = |v: u8| NetNs {
        dev: 4,
        ino: u64::from(v % 4),
    };
    let own = match inp.u8() {
        0 => None,
        v => Some(ns(v)),
    };
    let port = |v: u8| 80 + u16::from(v % 3);
    let dst = SocketAddr::new(ip(inp), port(inp.u8()));
    let mut entries = Vec::new();
    while !inp.is_empty() && entries.len() < 64 {
        let addr = SocketAddr::new(ip(inp), port(inp.u8()));
        entries.push(ListenerEntry {
            version: ENTRY_VERSION,
            netns: ns(inp.u8()),
            addr,
            pid: u32::from(inp.u8()),
            uid: 1000,
            offers: format!("/o/{}", inp.u8() % 4).into(),
            created_unix_ms: u64::from(inp.u8()),
        });
    }
    let ranked = rank_candidates(dst, own, entries.clone());
    assert!(ranked.len() <= entries.len());
    let mut left = entries;
    for e in &ranked {
        let i = left
            .iter()
            .position(|x| x == e)
            .expect("an entry that was read");
        left.swap_remove(i);
        assert_eq!(e.addr.port(), dst.port());
        let dst_ip = dst.ip().to_canonical();
        if dst_ip.is_loopback() || dst_ip.is_unspecified() {
            assert_eq!(Some(e.netns), own, "a loopback peer in another namespace");
        }
    }
    assert_eq!(rank_candidates(dst, own, ranked.clone()), ranked);
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    match inp.u8() % 3 {
        0 => {
            let (port, pid, random) = (inp.u16(), inp.u32(), inp.u64());
            if let Ok(name) = std::str::from_utf8(inp.rest()) {
                entry_name(name, port, pid, random);
            }
        }
        1 => {
            let (port, owner) = (inp.u16(), inp.u32());
            entry_content(inp.rest(), port, owner);
        }
        _ => ranking(&mut inp),
    }
});
