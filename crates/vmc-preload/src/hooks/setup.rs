//! Setting up: `listen`, `accept`, `accept4` and `connect`, after which vmc may
//! carry the connection (or register the listener).

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use libc::{c_int, sockaddr, socklen_t};
use vmc_conn::TcpStream;

use super::{borrow, is_tcp, track};
use crate::table::{self, Sock};
use crate::{enabled, enter, errno, real, set_errno, shield};

/// The program's socket `fd` as a std stream of our own: a duplicate (among vmc's
/// descriptors, out of the program's numbering), so that the program may close its
/// number whenever it likes.
fn dup_stream(fd: c_int) -> io::Result<std::net::TcpStream> {
    // SAFETY: `fd` is the descriptor of the hooked call in progress.
    let own: OwnedFd = vmc_os::fdspace::dup(unsafe { borrow(fd) })?;
    Ok(std::net::TcpStream::from(own))
}

/// The address a program passed, if it is IPv4 or IPv6.
///
/// # Safety
/// `addr` must point to `len` readable bytes (or be null).
unsafe fn sockaddr_of(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() {
        return None;
    }
    let len = len as usize;
    // SAFETY: the caller passed a sockaddr of `len` bytes; the family field is
    // first and every sockaddr is at least that long.
    let family = unsafe { (*addr).sa_family } as c_int;
    match family {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say it is a sockaddr_in; read unaligned.
            let a = unsafe { std::ptr::read_unaligned(addr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: family and length say it is a sockaddr_in6; read unaligned.
            let a = unsafe { std::ptr::read_unaligned(addr as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `listen(2)`: the real listen, then registration so co-resident vmc clients find
/// this listener. A listener that cannot register stays plain.
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::listen(fd, backlog) };
    if r != 0 || !enabled() {
        return r;
    }
    let Some(_g) = enter() else { return r };
    if matches!(table::get(fd).as_deref(), Some(Sock::Listener(_))) || !is_tcp(fd) {
        return r;
    }
    let saved = errno();
    register_listener(fd);
    set_errno(saved);
    r
}

/// Registers the TCP listening socket `fd` so that co-resident vmc clients find it;
/// returns its table entry. A listener that cannot register stays plain (`None`).
/// The caller holds the hook guard.
fn register_listener(fd: c_int) -> Option<Arc<Sock>> {
    let res = shield(|| {
        crate::init();
        // SAFETY: `fd` is the descriptor of the call in progress.
        let dup = vmc_os::fdspace::dup(unsafe { borrow(fd) })?;
        let l = vmc_conn::TcpListener::from_std(std::net::TcpListener::from(dup))?;
        Ok(match l.fallback_reason() {
            Some(why) => {
                tracing::debug!(fd, %why, "listener not registered; stays plain");
                None
            }
            None => {
                tracing::debug!(fd, addr = ?l.local_addr().ok(), "listener registered");
                let sock = Arc::new(Sock::Listener(l));
                table::set(fd, sock.clone());
                Some(sock)
            }
        })
    });
    res.unwrap_or_else(|e| {
        tracing::debug!(fd, "listener stays plain: {e}");
        None
    })
}

/// Whether the connection `fd` just accepted (its address as the program got it, if
/// it asked) is IPv4 or IPv6: only then may its listener be one vmc does not know
/// yet.
///
/// # Safety
/// `addr` and `len` are the program's `accept` arguments, after the call.
unsafe fn accepted_inet(fd: c_int, addr: *const sockaddr, len: *const socklen_t) -> bool {
    // SAFETY: `len` is the program's, non-null here, written by the kernel.
    let family = if !addr.is_null() && !len.is_null() && unsafe { *len } >= 2 {
        // SAFETY: the kernel filled `*len` >= 2 bytes of `addr`: the family.
        i32::from(unsafe { (*addr).sa_family })
    } else {
        // SAFETY: `fd` is the descriptor the call returned.
        match rustix::net::getsockname(unsafe { borrow(fd) }) {
            Ok(a) => i32::from(a.address_family().as_raw()),
            Err(_) => return false,
        }
    };
    family == libc::AF_INET || family == libc::AF_INET6
}

/// After a real accept: take the new connection over if its listener is vmc's. A
/// TCP listener vmc does not know (inherited across exec, as from systemd's socket
/// activation, or received over a Unix socket) is registered at its first accept,
/// so the clients that connect after that are accelerated.
///
/// # Safety
/// `addr` and `len` are the program's `accept` arguments, after the call.
unsafe fn adopt_accepted(listener: c_int, fd: c_int, addr: *const sockaddr, len: *const socklen_t) {
    let sock = match table::get(listener) {
        Some(sock) => sock,
        // SAFETY: as the caller says.
        None if enabled() && unsafe { accepted_inet(fd, addr, len) } => {
            let Some(_g) = enter() else { return };
            if !is_tcp(listener) {
                return;
            }
            let saved = errno();
            let sock = register_listener(listener);
            set_errno(saved);
            match sock {
                Some(sock) => sock,
                None => return,
            }
        }
        None => return,
    };
    let Sock::Listener(l) = &*sock else { return };
    let Some(_g) = enter() else { return };
    let saved = errno();
    let r = shield(|| {
        let tcp = dup_stream(fd)?;
        let peer = tcp.peer_addr()?;
        track(fd, l.adopt_accepted(tcp, peer)?);
        Ok(())
    });
    if let Err(e) = r {
        tracing::debug!(fd, "accepted connection stays plain: {e}");
        crate::report::count_plain();
    }
    set_errno(saved);
}

/// `accept(2)`.
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::accept(fd, addr, len) };
    if r >= 0 {
        // SAFETY: the program's arguments, after the call.
        unsafe { adopt_accepted(fd, r, addr, len) };
    }
    r
}

/// `accept4(2)`.
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::accept4(fd, addr, len, flags) };
    if r >= 0 {
        // SAFETY: the program's arguments, after the call.
        unsafe { adopt_accepted(fd, r, addr, len) };
    }
    r
}

/// `connect(2)`: if the peer is a co-resident vmc listener, its offer socket is
/// made ready first (so the accepting side finds it at once); then the real
/// connect (blocking or not) and, if it succeeded or is in progress, the offer is
/// published beside the connection.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let peer = if enabled() {
        // SAFETY: connect(2)'s contract: `addr` points to `len` readable bytes.
        // (Read before the kernel checks it: an unreadable address faults here
        // rather than failing with EFAULT, as in most libc wrappers.)
        unsafe { sockaddr_of(addr, len) }
    } else {
        None
    };
    // Not inside vmc during the real connect: a signal handler of the program
    // that runs meanwhile must see its other connections as usual.
    let prepared = peer.and_then(|peer| {
        let _g = enter()?;
        if table::get(fd).is_some() || !is_tcp(fd) {
            return None;
        }
        let saved = errno();
        let prepared = shield(|| {
            crate::init();
            // SAFETY: the descriptor of the call in progress.
            Ok(TcpStream::prepare_connect(unsafe { borrow(fd) }, peer))
        });
        set_errno(saved);
        Some((peer, prepared.ok()?))
    });
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::connect(fd, addr, len) };
    let Some((peer, prepared)) = prepared else {
        return r;
    };
    let Some(_g) = enter() else { return r };
    let saved = errno();
    if r == 0 || saved == libc::EINPROGRESS {
        let r = shield(|| {
            track(
                fd,
                TcpStream::adopt_prepared(dup_stream(fd)?, peer, prepared),
            );
            Ok(())
        });
        if let Err(e) = r {
            tracing::debug!(fd, "connection stays plain: {e}");
            crate::report::count_plain();
        }
    } else {
        drop(prepared);
    }
    set_errno(saved);
    r
}
