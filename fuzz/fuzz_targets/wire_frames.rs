//! The connection layer's frames from the peer (`vmc_conn::wire`).
//!
//! The first input byte picks what the rest is:
//! - a 16-byte control frame for `Control::parse`, `parse_control` and
//!   `parse_switch`: whatever parses re-emits to exactly the same bytes (through
//!   `Control::emit` and the `switch`/`left`/`rewind` encoders), the three parsers
//!   agree, and a refusal names the first wrong field (magic, reserved, kind) and
//!   what it held;
//! - an ATTACH frame of any length for `parse_attach`: it parses only at 48 bytes
//!   with the magic and version and zero reserved bytes, and what it names re-encodes (`attach`) to the same
//!   bytes apart from the reserved ones, which the parser does not read; the offer
//!   socket name of the connection it names fits a `sockaddr_un` and is the same for
//!   an IPv4 address and its v4-mapped form;
//! - a control message built from (kind, offset): emit then parse gives it back.
#![no_main]

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libfuzzer_sys::fuzz_target;
use vmc_conn::wire::{self, Control, Switch, ATTACH_LEN, SWITCH_LEN};
use vmc_conn::Path;
use vmc_fuzz::Input;

/// The little-endian value of `b`, as a refusal reports a field.
fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |acc, &x| (acc << 8) | u64::from(x))
}

fn control_frame(f: &[u8; SWITCH_LEN]) {
    let parsed = Control::parse(f);
    match parsed.clone() {
        Ok(c) => {
            assert_eq!(&c.emit(), f, "{c:?} re-emits differently");
            assert_eq!(wire::parse_control(f), Some(c));
            let again = match c {
                Control::Switch(s) => {
                    assert_eq!(wire::parse_switch(f), Some(s));
                    wire::switch(s)
                }
                Control::LeftRing(o) => wire::left(Path::Shm, o),
                Control::LeftTcp(o) => wire::left(Path::Tcp, o),
                Control::Rewind(o) => wire::rewind(o),
                Control::Spill(o) => Control::Spill(o).emit(),
            };
            assert_eq!(&again, f);
            if !matches!(c, Control::Switch(_)) {
                assert_eq!(wire::parse_switch(f), None);
            }
        }
        Err(e) => {
            assert_eq!(wire::parse_control(f), None);
            assert_eq!(wire::parse_switch(f), None);
            assert_eq!(e.frame, "control");
            let field = if &f[..4] != b"VMCS" {
                ("magic", le(&f[..4]))
            } else if f[5..8] != [0; 3] {
                ("reserved", le(&f[5..8]))
            } else {
                assert!(!(1..=6).contains(&f[4]), "kind {} refused", f[4]);
                ("kind", u64::from(f[4]))
            };
            assert_eq!((e.field, e.found), field);
            assert!(e.to_string().contains(e.field));
        }
    }
}

fn v6((ip, port): (Ipv6Addr, u16)) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

/// The same address, as the kernel might report it to the other end.
fn other_form(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => v6((v4.ip().to_ipv6_mapped(), v4.port())),
        SocketAddr::V6(s) => match s.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, s.port())),
            None => a,
        },
    }
}

fn offer_name(netns: u64, client: SocketAddr, server: SocketAddr) {
    let name = wire::offer_name(netns, client, server);
    assert!(
        name.len() <= 107 - "/proc/self/fd/1048576/".len(),
        "{name} does not fit a sockaddr_un"
    );
    assert!(!name.contains('/') && !name.contains('\0'));
    assert_eq!(
        wire::offer_name(netns, other_form(client), other_form(server)),
        name
    );
}

fn attach_frame(f: &[u8], netns: u64) {
    let well_formed = f.len() == ATTACH_LEN
        && &f[..4] == b"VMCT"
        && f[4] == 1
        && f[5..8] == [0; 3]
        && f[44..] == [0; 4];
    let Some((local, remote)) = wire::parse_attach(f) else {
        assert!(!well_formed, "a well-formed ATTACH was refused");
        return;
    };
    assert!(well_formed, "a malformed ATTACH parsed");
    let (l, r) = (v6(local), v6(remote));
    assert_eq!(wire::canonical(l), local);
    assert_eq!(wire::canonical(other_form(l)), local);
    let again = wire::attach(l, r);
    // Byte for byte (reserved bytes must be zero to parse).
    assert_eq!(&again[..], f);
    assert_eq!(wire::attach(other_form(l), other_form(r)), again);
    assert_eq!(wire::parse_attach(&again), Some((local, remote)));
    offer_name(netns, l, r);
    offer_name(netns, r, l);
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    match inp.u8() % 3 {
        0 => {
            let mut f = [0u8; SWITCH_LEN];
            let b = inp.bytes(SWITCH_LEN);
            f[..b.len()].copy_from_slice(b);
            control_frame(&f);
        }
        1 => {
            let netns = inp.u64();
            attach_frame(inp.rest(), netns);
        }
        _ => {
            let (kind, offset) = (inp.u8(), inp.u64());
            let c = match kind % 5 {
                0 => Control::Switch(Switch {
                    to: Path::Tcp,
                    offset,
                }),
                1 => Control::Switch(Switch {
                    to: Path::Shm,
                    offset,
                }),
                2 => Control::LeftRing(offset),
                3 => Control::LeftTcp(offset),
                _ => Control::Rewind(offset),
            };
            let f = c.emit();
            assert_eq!(Control::parse(&f), Ok(c));
            control_frame(&f);
        }
    }
});
