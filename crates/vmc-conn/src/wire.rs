//! The connection layer's messages on the Unix socket beside each TCP connection.
//!
//! ```text
//!   ATTACH   acceptor -> client   "VMCT" ver:u8 0:u8 0:u16 local:ip16 port:u16 remote:ip16 port:u16 0:u32
//!            (then the channel's own HELLO with the segment, see vmc-channel)
//!   SWITCH   either way, after ACK "VMCS" kind:u8 0:u8 0:u16 offset:u64
//!            kind 1: moved to TCP, 2: moved to shm, 3: LEFT_RING, 4: LEFT_TCP,
//!            5: REWIND, 6: SPILL
//! ```
//!
//! LEFT_RING and LEFT_TCP are the receiver's answers to a move: "I read your ring (or
//! TCP) up to `offset` and left it". A sender goes back to a path only after the
//! answer to its last move away from it, so a receiver can never read bytes of a
//! later stretch on one path before an earlier stretch on the other: a byte stream
//! has no marks, so the boundary must be known before the next stretch begins.
//!
//! REWIND is a receiver's request, for good: "I read your ring up to `offset` and
//! will read no more of it (I closed my end); send every byte from there on TCP,
//! and everything after it". A process about to exec sends it, since the new
//! program image cannot read the ring; the sender finds the bytes still in its ring
//! (see `vmc_ring::Producer::take_back`), so nothing is lost even if the sender
//! only acts on it much later.
//!
//! SPILL is a sender's plea: "I have waited for room in your ring, which is full up
//! to `offset`". Two programs that each write more than a ring holds before reading
//! would wait for each other for ever, where TCP's larger buffers let them finish. A
//! receiver that gets SPILL while it waits in a write of its own answers with
//! REWIND, and the plea's direction goes on over TCP, for good.
//!
//! The client of a connection to a vmc listener binds an *offer socket* named by
//! [`offer_name`] (the listener's network namespace and the connection's 4-tuple);
//! whichever process accepts the connection (the listener's, a forked worker, a
//! thread, a process the listener was handed to) calls it and sends ATTACH, the
//! 4-tuple as it sees it. The client attaches the channel only if that is the mirror
//! image of its own, so a name collision or a caller that is not the other end of
//! this connection leaves it on TCP. SWITCH announces that the sender moved its sending
//! direction to the other path after exactly `offset` bytes on the old one.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Length of an ATTACH frame.
pub const ATTACH_LEN: usize = 48;
/// Length of a SWITCH frame.
pub const SWITCH_LEN: usize = 16;
const ATTACH_MAGIC: &[u8; 4] = b"VMCT";
const SWITCH_MAGIC: &[u8; 4] = b"VMCS";
const VERSION: u8 = 1;

/// Which path a direction of a connection uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The real TCP connection.
    Tcp,
    /// vmc's shared-memory channel.
    Shm,
}

/// "My sending direction now uses `to`, after exactly `offset` bytes on the other
/// path" (bytes counted on that other path since the connection began).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    /// The path the sender moved to.
    pub to: Path,
    /// Bytes the sender had sent on the path it left.
    pub offset: u64,
}

fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Compares socket addresses the way the kernel reports them to both ends: an IPv4
/// address and its v4-mapped IPv6 form are the same.
pub fn canonical(a: SocketAddr) -> (Ipv6Addr, u16) {
    (Ipv6Addr::from(ip16(a.ip())), a.port())
}

/// Where each field of an ATTACH frame is.
mod attach {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const RESERVED: Range<usize> = 5..8;
    pub const LOCAL_IP: Range<usize> = 8..24;
    pub const LOCAL_PORT: Range<usize> = 24..26;
    pub const REMOTE_IP: Range<usize> = 26..42;
    pub const REMOTE_PORT: Range<usize> = 42..44;
    pub const TAIL: Range<usize> = 44..48;
}

/// Encodes an ATTACH for the connection `local` -> `remote` (the sender's view).
pub fn attach(local: SocketAddr, remote: SocketAddr) -> [u8; ATTACH_LEN] {
    let mut f = [0u8; ATTACH_LEN];
    f[attach::MAGIC].copy_from_slice(ATTACH_MAGIC);
    f[attach::VERSION] = VERSION;
    f[attach::LOCAL_IP].copy_from_slice(&ip16(local.ip()));
    f[attach::LOCAL_PORT].copy_from_slice(&local.port().to_be_bytes());
    f[attach::REMOTE_IP].copy_from_slice(&ip16(remote.ip()));
    f[attach::REMOTE_PORT].copy_from_slice(&remote.port().to_be_bytes());
    f
}

/// An endpoint as an ATTACH carries it: the address in canonical (v4-mapped) form.
pub type Endpoint = (Ipv6Addr, u16);

/// Decodes an ATTACH: the connection it names, as `(sender's local, sender's
/// remote)` in canonical form. Anything else (another length, magic or version,
/// reserved bytes set) is refused with the field at fault.
pub fn decode_attach(f: &[u8]) -> Result<(Endpoint, Endpoint), FrameError> {
    let bad = |field, found| FrameError {
        frame: "ATTACH",
        field,
        found,
    };
    if f.len() != ATTACH_LEN {
        return Err(bad("length", f.len() as u64));
    }
    let word = |r: std::ops::Range<usize>| f[r].iter().fold(0u64, |a, &b| (a << 8) | u64::from(b));
    if &f[attach::MAGIC] != ATTACH_MAGIC {
        return Err(bad("magic", word(attach::MAGIC)));
    }
    if f[attach::VERSION] != VERSION {
        return Err(bad("version", u64::from(f[attach::VERSION])));
    }
    if f[attach::RESERVED] != [0; 3] {
        return Err(bad("reserved", word(attach::RESERVED)));
    }
    if f[attach::TAIL] != [0; 4] {
        return Err(bad("tail", word(attach::TAIL)));
    }
    let ip = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&f[r]);
        Ipv6Addr::from(a)
    };
    let port = |r: std::ops::Range<usize>| u16::from_be_bytes([f[r.start], f[r.start + 1]]);
    Ok((
        (ip(attach::LOCAL_IP), port(attach::LOCAL_PORT)),
        (ip(attach::REMOTE_IP), port(attach::REMOTE_PORT)),
    ))
}

/// [`decode_attach`], without the reason.
pub fn parse_attach(f: &[u8]) -> Option<(Endpoint, Endpoint)> {
    decode_attach(f).ok()
}

/// The file name of the offer socket of the connection from `client` to `server`,
/// to a listener in network namespace `netns` (the inode of its nsfs file): both ends
/// compute it from what the kernel tells each about the connection. The namespace
/// keeps apart connections with equal 4-tuples in containers that share the offers
/// directory. IPv4 connections (or v4-mapped ones) are named by their addresses and
/// ports in hex; others by the ports and a 64-bit FNV-1a hash of the addresses, so
/// that the name always fits a `sockaddr_un`. Two connections with one name can only
/// be told apart by ATTACH, which is why the client checks it.
pub fn offer_name(netns: u64, client: SocketAddr, server: SocketAddr) -> String {
    let (cip, cport) = canonical(client);
    let (sip, sport) = canonical(server);
    match (cip.to_ipv4_mapped(), sip.to_ipv4_mapped()) {
        (Some(c), Some(s)) => format!(
            "o-{netns:x}-{:08x}-{cport:04x}-{:08x}-{sport:04x}.sock",
            u32::from(c),
            u32::from(s)
        ),
        _ => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in cip.octets().into_iter().chain(sip.octets()) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            format!("o-{netns:x}-6{h:016x}-{cport:04x}-{sport:04x}.sock")
        }
    }
}

/// A control message on the socket beside a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// The sender moved its sending direction.
    Switch(Switch),
    /// The receiver read the ring up to this offset and moved to TCP.
    LeftRing(u64),
    /// The receiver read TCP up to this offset and moved to the ring.
    LeftTcp(u64),
    /// The receiver read the ring up to this offset and will read no more of it:
    /// send everything from there on TCP, for good.
    Rewind(u64),
    /// The sender has been waiting for room in a full ring, having written up to
    /// this offset: a receiver that is itself stuck writing (so not reading) answers
    /// with REWIND, and the direction goes on over TCP, whose buffers hold more.
    Spill(u64),
}

/// Where each field of a control frame is.
mod control {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const KIND: usize = 4;
    pub const RESERVED: Range<usize> = 5..8;
    pub const OFFSET: Range<usize> = 8..16;

    pub const SWITCH_TCP: u8 = 1;
    pub const SWITCH_SHM: u8 = 2;
    pub const LEFT_RING: u8 = 3;
    pub const LEFT_TCP: u8 = 4;
    pub const REWIND: u8 = 5;
    pub const SPILL: u8 = 6;
}

/// Why a frame from the peer was refused: the field that was wrong and what it held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    /// Which frame was being read.
    pub frame: &'static str,
    /// The offending field.
    pub field: &'static str,
    /// What it held (the first bytes, for a field wider than 8).
    pub found: u64,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "malformed {} frame: field `{}` holds {:#x}",
            self.frame, self.field, self.found
        )
    }
}

impl std::error::Error for FrameError {}

impl Control {
    /// The frame's encoding.
    pub fn emit(&self) -> [u8; SWITCH_LEN] {
        let (kind, offset) = match *self {
            Control::Switch(Switch {
                to: Path::Tcp,
                offset,
            }) => (control::SWITCH_TCP, offset),
            Control::Switch(Switch {
                to: Path::Shm,
                offset,
            }) => (control::SWITCH_SHM, offset),
            Control::LeftRing(offset) => (control::LEFT_RING, offset),
            Control::LeftTcp(offset) => (control::LEFT_TCP, offset),
            Control::Rewind(offset) => (control::REWIND, offset),
            Control::Spill(offset) => (control::SPILL, offset),
        };
        let mut f = [0u8; SWITCH_LEN];
        f[control::MAGIC].copy_from_slice(SWITCH_MAGIC);
        f[control::KIND] = kind;
        f[control::OFFSET].copy_from_slice(&offset.to_le_bytes());
        f
    }

    /// Decodes a frame, refusing anything malformed with the field at fault.
    pub fn parse(f: &[u8; SWITCH_LEN]) -> Result<Control, FrameError> {
        let bad = |field, found| FrameError {
            frame: "control",
            field,
            found,
        };
        let word = |r: std::ops::Range<usize>| {
            f[r].iter()
                .rev()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        };
        if &f[control::MAGIC] != SWITCH_MAGIC {
            return Err(bad("magic", word(control::MAGIC)));
        }
        if f[control::RESERVED] != [0; 3] {
            return Err(bad("reserved", word(control::RESERVED)));
        }
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&f[control::OFFSET]);
        let offset = u64::from_le_bytes(offset);
        Ok(match f[control::KIND] {
            control::SWITCH_TCP => Control::Switch(Switch {
                to: Path::Tcp,
                offset,
            }),
            control::SWITCH_SHM => Control::Switch(Switch {
                to: Path::Shm,
                offset,
            }),
            control::LEFT_RING => Control::LeftRing(offset),
            control::LEFT_TCP => Control::LeftTcp(offset),
            control::REWIND => Control::Rewind(offset),
            control::SPILL => Control::Spill(offset),
            kind => return Err(bad("kind", u64::from(kind))),
        })
    }
}

/// Encodes a LEFT_RING (`from` = shm) or LEFT_TCP (`from` = TCP) answer.
pub fn left(from: Path, offset: u64) -> [u8; SWITCH_LEN] {
    match from {
        Path::Shm => Control::LeftRing(offset),
        Path::Tcp => Control::LeftTcp(offset),
    }
    .emit()
}

/// Encodes a REWIND: "I read your ring up to `offset`; send the rest on TCP".
pub fn rewind(offset: u64) -> [u8; SWITCH_LEN] {
    Control::Rewind(offset).emit()
}

/// Decodes any control frame; `None` if malformed (see [`Control::parse`] for why).
pub fn parse_control(f: &[u8; SWITCH_LEN]) -> Option<Control> {
    Control::parse(f).ok()
}

/// Encodes a SWITCH.
pub fn switch(s: Switch) -> [u8; SWITCH_LEN] {
    Control::Switch(s).emit()
}

/// Decodes a SWITCH; `None` if malformed or another kind of frame.
pub fn parse_switch(f: &[u8; SWITCH_LEN]) -> Option<Switch> {
    match Control::parse(f) {
        Ok(Control::Switch(s)) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_roundtrips_and_v4_equals_v4_mapped() {
        let l: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let r: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        let (pl, pr) = parse_attach(&attach(l, r)).unwrap();
        assert_eq!(pl, canonical(l));
        assert_eq!(pr, canonical("127.0.0.1:80".parse().unwrap()));
        let field = |f: &[u8]| decode_attach(f).unwrap_err().field;
        let good = attach(l, r);
        let mut bad = good;
        bad[4] = 9;
        assert_eq!(field(&bad), "version");
        assert_eq!(field(&good[..10]), "length");
        let mut bad = good;
        bad[1] = 0;
        assert_eq!(field(&bad), "magic");
        let mut bad = good;
        bad[6] = 1;
        assert_eq!(field(&bad), "reserved");
        let mut bad = good;
        bad[47] = 1;
        assert_eq!(field(&bad), "tail");
    }

    #[test]
    fn offer_names_agree_on_both_ends_and_fit_a_sockaddr() {
        let c: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let s: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(offer_name(7, c, s), "o-7-7f000001-9c40-7f000001-0050.sock");
        assert_eq!(offer_name(7, mapped, s), offer_name(7, c, s));
        assert_ne!(offer_name(8, c, s), offer_name(7, c, s));
        assert_ne!(offer_name(7, s, c), offer_name(7, c, s));
        let v6: SocketAddr = "[fd00::1:2:3:4:5]:65535".parse().unwrap();
        let long = offer_name(u64::MAX, v6, "[fd00::9]:1".parse().unwrap());
        assert!(long.len() <= 107 - "/proc/self/fd/1048576/".len(), "{long}");
        assert_ne!(
            long,
            offer_name(u64::MAX, v6, "[fd00::8]:1".parse().unwrap())
        );
    }

    #[test]
    fn switch_roundtrips_and_rejects_garbage() {
        for s in [
            Switch {
                to: Path::Tcp,
                offset: 0,
            },
            Switch {
                to: Path::Shm,
                offset: u64::MAX,
            },
        ] {
            assert_eq!(parse_switch(&switch(s)), Some(s));
        }
        let mut f = switch(Switch {
            to: Path::Shm,
            offset: 1,
        });
        f[4] = 3;
        assert_eq!(parse_switch(&f), None);
        assert_eq!(parse_switch(&[0; SWITCH_LEN]), None);
        assert_eq!(
            parse_control(&left(Path::Shm, 77)),
            Some(Control::LeftRing(77))
        );
        assert_eq!(
            parse_control(&left(Path::Tcp, 78)),
            Some(Control::LeftTcp(78))
        );
        assert_eq!(parse_switch(&left(Path::Shm, 77)), None);
        assert_eq!(parse_control(&rewind(79)), Some(Control::Rewind(79)));
        assert_eq!(parse_switch(&rewind(79)), None);
    }

    #[test]
    fn every_control_frame_roundtrips() {
        let frames = [
            Control::Switch(Switch {
                to: Path::Tcp,
                offset: 3,
            }),
            Control::Switch(Switch {
                to: Path::Shm,
                offset: u64::MAX,
            }),
            Control::LeftRing(0),
            Control::LeftTcp(1 << 40),
            Control::Rewind(17),
            Control::Spill(1 << 17),
        ];
        for c in frames {
            assert_eq!(Control::parse(&c.emit()), Ok(c));
        }
    }

    proptest::proptest! {
        /// Any bytes either parse into a frame that encodes back to the same bytes,
        /// or are refused: no two encodings of one frame, nothing half-read.
        #[test]
        fn control_frames_parse_only_into_their_own_encoding(f in proptest::array::uniform16(0u8..)) {
            if let Ok(c) = Control::parse(&f) {
                proptest::prop_assert_eq!(c.emit(), f);
            }
        }

        #[test]
        fn every_attach_frame_encodes_back_to_its_bytes(f in proptest::collection::vec(0u8.., 48)) {
            let mut f = f;
            f[..4].copy_from_slice(ATTACH_MAGIC);
            f[4] = VERSION;
            f[5..8].fill(0);
            f[44..].fill(0);
            let ((lip, lport), (rip, rport)) = decode_attach(&f).unwrap();
            let again = attach(
                SocketAddr::new(IpAddr::V6(lip), lport),
                SocketAddr::new(IpAddr::V6(rip), rport),
            );
            proptest::prop_assert_eq!(&again[..], &f[..]);
        }
    }

    #[test]
    fn a_malformed_control_frame_names_its_field() {
        let good = Control::Rewind(5).emit();
        let field = |f: [u8; SWITCH_LEN]| Control::parse(&f).unwrap_err().field;
        let mut f = good;
        f[0] = b'X';
        assert_eq!(field(f), "magic");
        let mut f = good;
        f[4] = 0;
        assert_eq!(field(f), "kind");
        f[4] = 7;
        assert_eq!(field(f), "kind");
        let mut f = good;
        f[6] = 1;
        assert_eq!(field(f), "reserved");
        let e = Control::parse(&f).unwrap_err();
        assert_eq!(e.found, 0x100);
        assert!(e.to_string().contains("`reserved`"), "{e}");
    }
}
