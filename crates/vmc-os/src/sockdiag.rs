//! Who owns a TCP socket, from the kernel's own socket table (`NETLINK_SOCK_DIAG`,
//! what `ss -e` reads).
//!
//! vmc uses it to check a peer of another user: a process that claims to be the
//! client of a connection must be of the uid the kernel records for the client's
//! socket of that very 4-tuple. The table answers for the calling thread's network
//! namespace only, and shows every user's sockets to everyone (as `ss` does), so the
//! question reveals nothing new.
//!
//! ```text
//!   request   nlmsghdr { len 72, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST }
//!             inet_diag_req_v2 { family, IPPROTO_TCP, ext 0, states ~0,
//!                                id { sport, dport (big-endian), src[16], dst[16],
//!                                     if 0, cookie NOCOOKIE } }
//!   answer    nlmsghdr { SOCK_DIAG_BY_FAMILY } inet_diag_msg { ..., uid @64, inode @68 }
//!             or nlmsghdr { NLMSG_ERROR } error:i32 (-ENOENT: no such socket)
//! ```

use std::io;
use std::net::{IpAddr, SocketAddr};

use rustix::net::{netlink, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDR: usize = 16;
const REQ_LEN: usize = NLMSG_HDR + 56;
/// Offsets in `inet_diag_msg` (after the netlink header).
const MSG_UID: usize = 64;
const MSG_INODE: usize = 68;
const MSG_LEN: usize = 72;

/// The owner of a TCP socket as the kernel records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOwner {
    /// The uid the socket was created under (`ss -e`'s `uid:`).
    pub uid: u32,
    /// The socket's inode number (`ino:`; `socket:[ino]` in `/proc/PID/fd`).
    pub inode: u32,
}

/// The socket whose local address is `local` and remote address `remote` (its own
/// view of the connection), in the calling thread's network namespace; `None` if
/// there is none. An IPv4 connection is found whether its socket is IPv4 or IPv6
/// with v4-mapped addresses.
pub fn tcp_owner(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<TcpOwner>> {
    let sock = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )?;
    let req = request(local, remote);
    rustix::net::send(&sock, &req, SendFlags::empty())?;
    let mut buf = [0u8; 512];
    let n = loop {
        match rustix::net::recv(&sock, &mut buf, RecvFlags::empty()) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?.0,
        }
    };
    parse_answer(&buf[..n.min(buf.len())])
}

/// The request for the socket `local` -> `remote`.
fn request(local: SocketAddr, remote: SocketAddr) -> [u8; REQ_LEN] {
    let v4 = |a: &SocketAddr| match a.ip() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    let mut r = [0u8; REQ_LEN];
    r[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
    r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    let q = &mut r[NLMSG_HDR..];
    q[1] = libc::IPPROTO_TCP as u8;
    q[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    let id = &mut q[8..];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&remote.port().to_be_bytes());
    match (v4(&local), v4(&remote)) {
        (Some(l), Some(rm)) => {
            q[0] = libc::AF_INET as u8;
            let id = &mut q[8..];
            id[4..8].copy_from_slice(&l.octets());
            id[20..24].copy_from_slice(&rm.octets());
        }
        _ => {
            q[0] = libc::AF_INET6 as u8;
            let six = |a: &SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            let id = &mut q[8..];
            id[4..20].copy_from_slice(&six(&local));
            id[20..36].copy_from_slice(&six(&remote));
        }
    }
    let id = &mut q[8..];
    id[40..48].copy_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    r
}

/// Reads the kernel's answer; anything malformed is an error, never a guess.
fn parse_answer(buf: &[u8]) -> io::Result<Option<TcpOwner>> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sock_diag answer: {what}"),
        )
    };
    let u16_at = |i: usize| u16::from_ne_bytes([buf[i], buf[i + 1]]);
    let u32_at = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    if buf.len() < NLMSG_HDR + 4 {
        return Err(bad("too short"));
    }
    match u16_at(4) {
        NLMSG_ERROR => {
            let errno = -(u32_at(NLMSG_HDR) as i32);
            match errno {
                libc::ENOENT => Ok(None),
                0 => Err(bad("an acknowledgement instead of a socket")),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
        SOCK_DIAG_BY_FAMILY if buf.len() >= NLMSG_HDR + MSG_LEN => Ok(Some(TcpOwner {
            uid: u32_at(NLMSG_HDR + MSG_UID),
            inode: u32_at(NLMSG_HDR + MSG_INODE),
        })),
        t => Err(bad(&format!("message type {t}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn finds_both_ends_of_a_loopback_connection_and_nothing_else() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let (cl, cr) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        let me = rustix::process::geteuid().as_raw();
        let owner = tcp_owner(cl, cr).unwrap().expect("the client's socket");
        assert_eq!(owner.uid, me);
        // The inode is the one the descriptor names.
        let ino = |fd: &std::net::TcpStream| {
            use std::os::fd::AsRawFd;
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .ino() as u32
        };
        assert_eq!(owner.inode, ino(&c));
        let server = tcp_owner(cr, cl).unwrap().expect("the server's socket");
        assert_eq!(server.inode, ino(&s));
        // Swapped ports: no such socket.
        let bogus: SocketAddr = format!("127.0.0.1:{}", cl.port() ^ 1).parse().unwrap();
        assert_eq!(tcp_owner(bogus, cr).unwrap(), None);
        // v4-mapped spelling of the same connection.
        let m = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
            IpAddr::V6(_) => a,
        };
        assert_eq!(tcp_owner(m(cl), m(cr)).unwrap(), Some(owner));
    }

    #[test]
    fn ipv6_connections_are_found() {
        let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
            return; // no IPv6 loopback here
        };
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let owner = tcp_owner(c.local_addr().unwrap(), c.peer_addr().unwrap()).unwrap();
        assert!(owner.is_some());
    }

    #[test]
    fn malformed_answers_are_errors() {
        assert!(parse_answer(&[0; 8]).is_err());
        let mut ack = [0u8; 20];
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(parse_answer(&ack).is_err(), "error 0 is not an answer");
        let mut short = [0u8; 40];
        short[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(parse_answer(&short).is_err());
    }
}
