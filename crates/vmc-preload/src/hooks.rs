//! The interposed socket calls (everything but readiness, which is in `poll` and
//! `epoll`).
//!
//! Each hook first asks the descriptor table whether vmc owns the descriptor; if
//! not (the common case for files, pipes and plain connections), it calls the C
//! library's function and nothing else. Setting up happens *after* the real call
//! succeeded (`listen`, `connect`, `accept`), so a program sees exactly the kernel's
//! result, errno included, whatever vmc decides.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use libc::{
    c_int, c_uint, c_ulong, c_void, iovec, loff_t, msghdr, off64_t, off_t, size_t, sockaddr,
    socklen_t, ssize_t,
};
use vmc_conn::{RecvOpts, TcpStream};

use crate::alias;
use crate::table::{self, Sock};
use crate::{enabled, enter, errno, fail, real, set_errno, shield};

// ---- helpers -------------------------------------------------------------------

/// Borrows a descriptor the program passed to a hook.
///
/// # Safety
/// `fd` must be open for the duration of the borrow: it is the descriptor of the
/// call in progress (a program that closes it concurrently is already wrong).
unsafe fn borrow(fd: c_int) -> BorrowedFd<'static> {
    // SAFETY: per this function's contract.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// The program's socket `fd` as a std stream of our own: a duplicate (among vmc's
/// descriptors, out of the program's numbering), so that the program may close its
/// number whenever it likes.
fn dup_stream(fd: c_int) -> io::Result<std::net::TcpStream> {
    // SAFETY: `fd` is the descriptor of the hooked call in progress.
    let own: OwnedFd = vmc_os::fdspace::dup(unsafe { borrow(fd) })?;
    Ok(std::net::TcpStream::from(own))
}

/// True for a TCP socket over IPv4 or IPv6.
fn is_tcp(fd: c_int) -> bool {
    // SAFETY: `fd` is the descriptor of the hooked call in progress.
    let b = unsafe { borrow(fd) };
    let stream = rustix::net::sockopt::socket_type(b) == Ok(rustix::net::SocketType::STREAM);
    let inet = matches!(
        rustix::net::sockopt::socket_domain(b),
        Ok(rustix::net::AddressFamily::INET | rustix::net::AddressFamily::INET6)
    );
    stream && inet
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

/// Mirrors the socket's blocking mode and timeouts into a connection taken over.
fn mirror_mode(fd: c_int, s: &TcpStream) {
    // SAFETY: `fd` is the descriptor of the hooked call in progress.
    let b = unsafe { borrow(fd) };
    if let Ok(fl) = rustix::fs::fcntl_getfl(b) {
        if fl.contains(rustix::fs::OFlags::NONBLOCK) {
            let _ = s.set_nonblocking(true);
        }
    }
    use rustix::net::sockopt::{socket_timeout, Timeout};
    if let Ok(Some(t)) = socket_timeout(b, Timeout::Recv) {
        let _ = s.set_read_timeout(Some(t));
    }
    if let Ok(Some(t)) = socket_timeout(b, Timeout::Send) {
        let _ = s.set_write_timeout(Some(t));
    }
}

/// Records a connection vmc took over, unless it is plain TCP already (then the
/// program's descriptor is all there is, and vmc stays out of its way).
fn track(fd: c_int, s: TcpStream) {
    if s.is_plain() {
        tracing::debug!(fd, reason = ?s.fallback_reason(), "connection stays plain TCP");
        crate::report::count_plain();
        return;
    }
    mirror_mode(fd, &s);
    let st = table::Stream::new(s);
    st.timed[0].store(matches!(st.read_timeout(), Ok(Some(_))), Ordering::Relaxed);
    st.timed[1].store(matches!(st.write_timeout(), Ok(Some(_))), Ordering::Relaxed);
    let sock = Arc::new(Sock::Stream(st));
    if !table::set(fd, sock.clone()) {
        tracing::debug!(fd, "descriptor beyond vmc's table: stays plain TCP");
        return;
    }
    // Descriptors duplicated from this socket earlier lead to the same connection.
    for other in alias::of(fd) {
        tracing::debug!(fd, other, "an earlier duplicate joins the connection");
        table::set(other, sock.clone());
    }
}

/// The connection behind `fd`, if vmc carries it. A connection that turned out plain
/// is served by the kernel directly from then on (its entry stays until `close`, so
/// that epoll sets holding it can hand it over to the kernel's set).
fn stream(fd: c_int) -> Option<Arc<Sock>> {
    crate::poll::vmc_stream(fd)
}

fn as_stream(sock: &Sock) -> &table::Stream {
    match sock {
        Sock::Stream(s) => s,
        _ => unreachable!("stream() returns streams only"),
    }
}

/// Converts a result for C: the count, or -1 with errno set.
fn ret(r: io::Result<usize>) -> ssize_t {
    match r {
        Ok(n) => n as ssize_t,
        Err(e) => {
            fail(&e);
            -1
        }
    }
}

/// `recv` flags vmc understands; others make the call go to... nowhere sensible, so
/// they are refused like the kernel refuses what a socket does not support.
fn recv_opts(flags: c_int) -> Result<(RecvOpts, bool), io::Error> {
    if flags & (libc::MSG_OOB | libc::MSG_ERRQUEUE) != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok((
        RecvOpts {
            peek: flags & libc::MSG_PEEK != 0,
            dontwait: flags & libc::MSG_DONTWAIT != 0,
        },
        flags & libc::MSG_WAITALL != 0,
    ))
}

/// One receive into `buf`, honouring MSG_WAITALL.
fn recv_into(s: &TcpStream, buf: &mut [u8], flags: c_int) -> io::Result<usize> {
    let (opts, waitall) = recv_opts(flags)?;
    let mut got = s.recv(buf, opts)?;
    if waitall && !opts.peek && !opts.dontwait {
        while got > 0 && got < buf.len() {
            match s.recv(&mut buf[got..], opts) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => break,
            }
        }
    }
    Ok(got)
}

/// Scatter read over `iov`: waits (as configured) for the first bytes, then takes
/// whatever else is ready without waiting, as the kernel does.
///
/// # Safety
/// `iov` must point to `cnt` valid iovecs describing writable memory.
unsafe fn recv_iov(
    s: &TcpStream,
    iov: *const iovec,
    cnt: c_int,
    flags: c_int,
) -> io::Result<usize> {
    if cnt < 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let (opts, _) = recv_opts(flags)?;
    if opts.peek {
        // Peeking across iovecs would need a copy of the whole peek; vmc peeks into
        // the first non-empty one only (a short peek, which the kernel may do too).
    }
    let mut total = 0usize;
    for i in 0..cnt as usize {
        // SAFETY: the caller passed `cnt` iovecs.
        let v = unsafe { *iov.add(i) };
        if v.iov_len == 0 {
            continue;
        }
        // SAFETY: the iovec describes writable memory of the program's.
        let buf = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
        let o = if total == 0 {
            opts
        } else {
            RecvOpts {
                dontwait: true,
                ..opts
            }
        };
        match s.recv(buf, o) {
            Ok(n) => {
                total += n;
                if n < buf.len() || opts.peek {
                    break;
                }
            }
            Err(e) if total == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(total)
}

/// Sends all of `buf` on a blocking connection (as the kernel does), as much as fits
/// on a non-blocking one; a closed peer raises SIGPIPE unless MSG_NOSIGNAL.
fn send_all(s: &TcpStream, buf: &[u8], flags: c_int) -> io::Result<usize> {
    let dontwait = flags & libc::MSG_DONTWAIT != 0;
    let mut done = 0;
    while done < buf.len() || buf.is_empty() {
        match s.send(&buf[done..], dontwait) {
            Ok(0) if buf.is_empty() => return Ok(0),
            Ok(n) => done += n,
            Err(e) if done > 0 && e.kind() != io::ErrorKind::Interrupted => break,
            Err(e) if done > 0 => {
                let _ = e;
                break;
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::BrokenPipe && flags & libc::MSG_NOSIGNAL == 0 {
                    // SAFETY: raising a signal in our own thread.
                    unsafe { libc::raise(libc::SIGPIPE) };
                }
                return Err(e);
            }
        }
        if dontwait {
            break;
        }
    }
    Ok(done)
}

/// Gather write of `iov` (one `send_all` per iovec, stopping at a short one).
///
/// # Safety
/// `iov` must point to `cnt` valid iovecs describing readable memory.
unsafe fn send_iov(
    s: &TcpStream,
    iov: *const iovec,
    cnt: c_int,
    flags: c_int,
) -> io::Result<usize> {
    if cnt < 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut total = 0usize;
    for i in 0..cnt as usize {
        // SAFETY: the caller passed `cnt` iovecs.
        let v = unsafe { *iov.add(i) };
        if v.iov_len == 0 {
            continue;
        }
        // SAFETY: the iovec describes readable memory of the program's.
        let buf = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        let f = if total > 0 {
            flags | libc::MSG_NOSIGNAL
        } else {
            flags
        };
        match send_all(s, buf, f) {
            Ok(n) => {
                total += n;
                if n < buf.len() {
                    break;
                }
            }
            Err(e) if total == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(total)
}

/// A receive into the program's buffer, if vmc carries `fd`.
///
/// # Safety
/// `buf` points to `n` writable bytes (it may be anything when `n` is 0).
unsafe fn vmc_recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> Option<ssize_t> {
    on_io(fd, Io::Recv, |s| {
        let b: &mut [u8] = if n == 0 {
            &mut []
        } else {
            // SAFETY: per this function's contract.
            unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, n) }
        };
        recv_into(s, b, flags)
    })
}

/// A send from the program's buffer, if vmc carries `fd`.
///
/// # Safety
/// `buf` points to `n` readable bytes (it may be anything when `n` is 0).
unsafe fn vmc_send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> Option<ssize_t> {
    on_io(fd, Io::Send, |s| {
        let b: &[u8] = if n == 0 {
            &[]
        } else {
            // SAFETY: per this function's contract.
            unsafe { std::slice::from_raw_parts(buf as *const u8, n) }
        };
        send_all(s, b, flags)
    })
}

/// What a call on a connection does, for its signal rules (`crate::signals`).
#[derive(Clone, Copy)]
enum Io {
    Recv = 0,
    Send = 1,
    Other,
}

/// Runs `f` on the connection behind `fd` inside vmc (no re-entry, no unwinding
/// across the C boundary); `None` if vmc does not carry `fd`.
fn on_stream(fd: c_int, f: impl FnMut(&TcpStream) -> io::Result<usize>) -> Option<ssize_t> {
    on_io(fd, Io::Other, f)
}

/// [`on_stream`] for a call that receives or sends.
fn on_io(fd: c_int, io: Io, mut f: impl FnMut(&TcpStream) -> io::Result<usize>) -> Option<ssize_t> {
    let sock = stream(fd)?;
    let _g = enter()?;
    let s = as_stream(&sock);
    if !s.owner.check() {
        // The other process of a fork owns this connection, and did not move it to
        // TCP when asked (see `crate::fork`).
        crate::set_errno(libc::EIO);
        return Some(-1);
    }
    let timed = match io {
        Io::Recv | Io::Send => s.timed[io as usize].load(Ordering::Relaxed),
        Io::Other => false,
    };
    loop {
        if crate::fork::requests_pending() {
            crate::fork::serve_requests();
        }
        if s.is_plain() {
            // Moved to TCP for another process: the kernel's socket from now on.
            return None;
        }
        crate::signals::begin_call(timed);
        let r = shield(|| f(s));
        match &r {
            // A wait that ended for another process's request, not a signal.
            Err(e) if e.kind() == io::ErrorKind::Interrupted && crate::fork::serve_requests() => {
                // (Served, or still held by a thread of ours that is coming out
                // of its wait: look again.)
                continue;
            }
            _ => return Some(ret(r)),
        }
    }
}

// ---- setting up: listen, connect, accept ------------------------------------------

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

// ---- closing and duplicating -------------------------------------------------------

/// `close(2)`: the program's descriptor closes at once; the connection ends when its
/// last descriptor is closed (as a socket does).
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // Everything vmc keeps lives at or above its base (`vmc_os::fdspace`): a lower
    // number that vmc does not carry is the program's business alone, and its
    // close costs nothing more (no vfork check, no look at what vmc keeps).
    if fd < vmc_os::fdspace::base() && !alias::any() && table::get(fd).is_none() {
        // SAFETY: forwarding the program's argument.
        return unsafe { real::close(fd) };
    }
    if crate::hands_off() {
        // SAFETY: forwarding the program's argument.
        return unsafe { real::close(fd) };
    }
    let old = table::take(fd);
    alias::forget(fd);
    // SAFETY: forwarding the program's argument.
    let r = unsafe { real::close(fd) };
    if r == 0 && fd >= vmc_os::fdspace::base() {
        closed_behind_our_back(fd, fd);
    }
    if let Some(old) = old {
        let saved = errno();
        // Inside vmc already or not, the last reference closes vmc's own
        // descriptors; the guard keeps those closes out of this hook.
        let _g = enter();
        drop(old);
        set_errno(saved);
    }
    r
}

/// `close_range(2)` of the program, around vmc's own descriptors in the range
/// ([`vmc_os::fdspace`]): vmc itself never calls `close_range`, so every call is the
/// program's, which would not have had those numbers without vmc.
///
/// (`close` cannot do the same: vmc's own closes come through the same hook, from
/// threads and destructors the hook cannot tell from the program's.)
///
/// # Safety
/// As `close_range(2)`.
unsafe fn close_range_around_ours(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let clamp = |n: c_uint| n.min(c_int::MAX as c_uint) as c_int;
    if clamp(last) < vmc_os::fdspace::base() {
        // SAFETY: forwarding the program's arguments.
        return unsafe { real::close_range(first, last, flags) };
    }
    let mut from = first;
    for ours in vmc_os::fdspace::ours_in(clamp(first), clamp(last)) {
        let ours = ours as c_uint;
        if ours > from {
            // SAFETY: as the program's call, on a part of its range.
            let r = unsafe { real::close_range(from, ours - 1, flags) };
            if r != 0 {
                return r;
            }
        }
        from = ours + 1;
    }
    if from > last {
        return 0;
    }
    // SAFETY: as the program's call, on the rest of its range.
    unsafe { real::close_range(from, last, flags) }
}

/// `close_range(2)`: as `close` for every descriptor of the range (unless the call
/// only marks them close-on-exec); vmc's own descriptors stay open.
#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    if crate::hands_off() {
        // SAFETY: forwarding the program's arguments.
        return unsafe { real::close_range(first, last, flags) };
    }
    // SAFETY: the program's arguments.
    let r = unsafe { close_range_around_ours(first, last, flags) };
    if r == 0 && flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        let clamp = |n: c_uint| n.min(c_int::MAX as c_uint) as c_int;
        let first = clamp(first).max(vmc_os::fdspace::base());
        if first <= clamp(last) {
            closed_behind_our_back(first, clamp(last));
        }
    }
    if r == 0 && flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 && table::any() {
        let saved = errno();
        let last = last.min(table::MAX_FDS as c_uint - 1);
        let mut gone = Vec::new();
        for fd in first..=last {
            alias::forget(fd as c_int);
            gone.extend(table::take(fd as c_int));
        }
        let _g = enter();
        drop(gone);
        set_errno(saved);
    }
    r
}

/// The program closed descriptors `first..=last` (or replaced one with `dup2`): what
/// vmc keeps between connections under those numbers is forgotten, never used or
/// closed again (see `vmc_conn::forget_closed_fds`). Not for vmc's own closes, which
/// never close what it keeps while kept (and may hold the locks involved).
fn closed_behind_our_back(first: c_int, last: c_int) {
    if let Some(_g) = enter() {
        let saved = errno();
        let n = vmc_conn::forget_closed_fds(first, last);
        if n > 0 {
            tracing::debug!("the program closed {n} of vmc's kept descriptors: forgotten");
        }
        set_errno(saved);
    }
}

/// Gives `new` what `old` is to vmc (after a successful dup of any kind).
fn copy_entry(old: c_int, new: c_int) {
    if crate::hands_off() {
        return;
    }
    if new >= vmc_os::fdspace::base() {
        closed_behind_our_back(new, new);
    }
    alias::forget(new);
    let Some(sock) = table::get(old) else {
        // `new` may have been a vmc descriptor that dup2 just closed.
        if let Some(prev) = table::take(new) {
            let _g = enter();
            drop(prev);
        }
        // A TCP socket not taken over (yet): remember the pair, in case it connects.
        if enabled() {
            if let Some(_g) = enter() {
                if is_tcp(old) {
                    alias::record(old, new);
                }
            }
        }
        return;
    };
    let prev = table::get(new);
    table::set(new, sock);
    if let Some(prev) = prev {
        let _g = enter();
        drop(prev);
    }
}

/// `dup(2)`.
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: forwarding the program's argument.
    let r = unsafe { real::dup(fd) };
    if r >= 0 {
        copy_entry(fd, r);
    }
    r
}

/// `dup2(2)`.
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::dup2(old, new) };
    if r >= 0 && old != new {
        copy_entry(old, r);
    }
    r
}

/// `dup3(2)`.
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::dup3(old, new, flags) };
    if r >= 0 {
        copy_entry(old, r);
    }
    r
}

// ---- reading -----------------------------------------------------------------------

/// `read(2)`.
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    if table::any() {
        // SAFETY: the program's buffer of `n` writable bytes.
        let r = unsafe { vmc_recv(fd, buf, n, 0) };
        if let Some(r) = r {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::read(fd, buf, n) }
}

/// `__read_chk` (FORTIFY_SOURCE's read).
#[no_mangle]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: what glibc does on a detected overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { read(fd, buf, n) }
}

/// `recv(2)`.
#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    if table::any() {
        // SAFETY: the program's buffer of `n` writable bytes.
        let r = unsafe { vmc_recv(fd, buf, n, flags) };
        if let Some(r) = r {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::recv(fd, buf, n, flags) }
}

/// `__recv_chk`.
#[no_mangle]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    if n > buflen {
        // SAFETY: what glibc does on a detected overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { recv(fd, buf, n, flags) }
}

/// `recvfrom(2)`: on a connected TCP socket the address is not filled in.
#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    if table::any() {
        // SAFETY: the program's buffer of `n` writable bytes.
        let r = unsafe { vmc_recv(fd, buf, n, flags) };
        if let Some(r) = r {
            if r >= 0 && !addr.is_null() && !len.is_null() {
                // SAFETY: the program passed a writable length.
                unsafe { *len = 0 };
            }
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::recvfrom(fd, buf, n, flags, addr, len) }
}

/// `__recvfrom_chk`.
#[no_mangle]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: what glibc does on a detected overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { recvfrom(fd, buf, n, flags, addr, len) }
}

/// `readv(2)`.
#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    if table::any() {
        // SAFETY: the program's iovecs.
        if let Some(r) = on_io(fd, Io::Recv, |s| unsafe { recv_iov(s, iov, cnt, 0) }) {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::readv(fd, iov, cnt) }
}

/// `recvmsg(2)`: data only (TCP carries no ancillary data vmc could forward).
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    if table::any() && !msg.is_null() {
        // SAFETY: the program's msghdr and iovecs.
        let r = on_io(fd, Io::Recv, |s| unsafe {
            recv_iov(s, (*msg).msg_iov, (*msg).msg_iovlen as c_int, flags)
        });
        if let Some(r) = r {
            if r >= 0 {
                // SAFETY: the program's msghdr, writable.
                unsafe {
                    (*msg).msg_namelen = 0;
                    (*msg).msg_controllen = 0;
                    (*msg).msg_flags = 0;
                }
            }
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::recvmsg(fd, msg, flags) }
}

// ---- writing -----------------------------------------------------------------------

/// `write(2)`.
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    if table::any() {
        // SAFETY: the program's buffer of `n` readable bytes.
        let r = unsafe { vmc_send(fd, buf, n, 0) };
        if let Some(r) = r {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::write(fd, buf, n) }
}

/// `send(2)`.
#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    if table::any() {
        // SAFETY: the program's buffer of `n` readable bytes.
        let r = unsafe { vmc_send(fd, buf, n, flags) };
        if let Some(r) = r {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::send(fd, buf, n, flags) }
}

/// `sendto(2)`: the address is ignored on a connected TCP socket, as by the kernel.
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    if table::any() {
        // SAFETY: the program's buffer of `n` readable bytes.
        let r = unsafe { vmc_send(fd, buf, n, flags) };
        if let Some(r) = r {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::sendto(fd, buf, n, flags, addr, len) }
}

/// `writev(2)`.
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    if table::any() {
        // SAFETY: the program's iovecs.
        if let Some(r) = on_io(fd, Io::Send, |s| unsafe { send_iov(s, iov, cnt, 0) }) {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::writev(fd, iov, cnt) }
}

/// `recvmmsg(2)` on a connection: one `recvmsg` per entry, as the kernel does for a
/// stream socket (`MSG_WAITFORONE`: entries after the first do not wait). The
/// timeout is ignored, as the kernel only looks at it between entries.
#[no_mangle]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    msgs: *mut libc::mmsghdr,
    n: c_uint,
    flags: c_int,
    timeout: *mut libc::timespec,
) -> c_int {
    if table::any() && !msgs.is_null() && stream(fd).is_some() {
        let mut done: c_uint = 0;
        let mut f = flags & !libc::MSG_WAITFORONE;
        while done < n {
            // SAFETY: the program's array of `n` entries.
            let m = unsafe { &mut *msgs.add(done as usize) };
            // SAFETY: the entry's msghdr, the program's.
            let r = unsafe { recvmsg(fd, &mut m.msg_hdr, f) };
            if r < 0 {
                if done == 0 {
                    return -1;
                }
                break;
            }
            m.msg_len = r as c_uint;
            done += 1;
            if flags & libc::MSG_WAITFORONE != 0 {
                f |= libc::MSG_DONTWAIT;
            }
            if r == 0 {
                break;
            }
        }
        return done as c_int;
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::recvmmsg(fd, msgs, n, flags, timeout) }
}

/// `sendmmsg(2)` on a connection: one `sendmsg` per entry, stopping at the first
/// that fails (reported only if it was the first).
#[no_mangle]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    msgs: *mut libc::mmsghdr,
    n: c_uint,
    flags: c_int,
) -> c_int {
    if table::any() && !msgs.is_null() && stream(fd).is_some() {
        let mut done: c_uint = 0;
        while done < n {
            // SAFETY: the program's array of `n` entries.
            let m = unsafe { &mut *msgs.add(done as usize) };
            // SAFETY: the entry's msghdr, the program's.
            let r = unsafe { sendmsg(fd, &m.msg_hdr, flags) };
            if r < 0 {
                if done == 0 {
                    return -1;
                }
                break;
            }
            m.msg_len = r as c_uint;
            done += 1;
        }
        return done as c_int;
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::sendmmsg(fd, msgs, n, flags) }
}

/// `sendmsg(2)`: data only.
#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    if table::any() && !msg.is_null() {
        // SAFETY: the program's msghdr and iovecs.
        let r = on_io(fd, Io::Send, |s| unsafe {
            send_iov(s, (*msg).msg_iov, (*msg).msg_iovlen as c_int, flags)
        });
        if let Some(r) = r {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::sendmsg(fd, msg, flags) }
}

/// Copies up to `count` bytes from the file `inp` (at `*off` if given, advancing
/// it) into the connection: sendfile by way of a buffer.
///
/// # Safety
/// `off` is null or points to a writable offset.
unsafe fn sendfile_into(
    s: &TcpStream,
    inp: c_int,
    off: *mut i64,
    count: usize,
) -> io::Result<usize> {
    let mut buf = vec![0u8; count.clamp(1, 256 * 1024)];
    let mut done = 0usize;
    while done < count {
        let want = buf.len().min(count - done);
        let n = if off.is_null() {
            // SAFETY: reading the program's file into our buffer.
            unsafe { real::read(inp, buf.as_mut_ptr() as *mut c_void, want) }
        } else {
            // SAFETY: as above, at the given offset (`off` is valid per contract).
            unsafe {
                libc::pread64(
                    inp,
                    buf.as_mut_ptr() as *mut c_void,
                    want,
                    *off + done as i64,
                )
            }
        };
        if n < 0 {
            if done > 0 {
                break;
            }
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        let n = n as usize;
        let sent = match send_all(s, &buf[..n], 0) {
            Ok(k) => k,
            Err(e) if done == 0 => return Err(e),
            Err(_) => 0,
        };
        done += sent;
        if sent < n {
            if off.is_null() && sent < n {
                // Put the file position back where the connection stopped taking.
                // SAFETY: seeking the program's file.
                unsafe { libc::lseek64(inp, -((n - sent) as i64), libc::SEEK_CUR) };
            }
            break;
        }
        if n < want {
            break;
        }
    }
    if !off.is_null() {
        // SAFETY: `off` is valid per contract.
        unsafe { *off += done as i64 };
    }
    Ok(done)
}

/// `sendfile(2)` into a vmc connection goes through a buffer.
#[no_mangle]
pub unsafe extern "C" fn sendfile(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    if table::any() {
        // SAFETY: `off` is the program's offset pointer or null.
        if let Some(r) = on_io(out, Io::Send, |s| unsafe { sendfile_into(s, inp, off, n) }) {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::sendfile(out, inp, off, n) }
}

/// `sendfile64`.
#[no_mangle]
pub unsafe extern "C" fn sendfile64(
    out: c_int,
    inp: c_int,
    off: *mut off64_t,
    n: size_t,
) -> ssize_t {
    if table::any() {
        // SAFETY: `off` is the program's offset pointer or null.
        if let Some(r) = on_io(out, Io::Send, |s| unsafe { sendfile_into(s, inp, off, n) }) {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::sendfile64(out, inp, off, n) }
}

/// `splice(2)` with a vmc connection at either end goes through a buffer.
#[no_mangle]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut loff_t,
    fd_out: c_int,
    off_out: *mut loff_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    if table::any() {
        let dontwait = flags & libc::SPLICE_F_NONBLOCK != 0;
        if let Some(r) = on_io(fd_in, Io::Recv, |s| {
            // Peek, hand to the output, then consume exactly what it took.
            let mut buf = vec![0u8; len.clamp(1, 256 * 1024)];
            let n = s.recv(
                &mut buf,
                RecvOpts {
                    peek: true,
                    dontwait,
                },
            )?;
            if n == 0 {
                return Ok(0);
            }
            // SAFETY: writing our buffer to the program's descriptor.
            let w = unsafe {
                if off_out.is_null() {
                    real::write(fd_out, buf.as_ptr() as *const c_void, n)
                } else {
                    let w = libc::pwrite64(fd_out, buf.as_ptr() as *const c_void, n, *off_out);
                    if w > 0 {
                        *off_out += w as i64;
                    }
                    w
                }
            };
            if w < 0 {
                return Err(io::Error::last_os_error());
            }
            let w = w as usize;
            s.recv(&mut buf[..w], RecvOpts::default())
        }) {
            return r;
        }
        if let Some(r) = on_io(fd_out, Io::Send, |s| {
            let mut buf = vec![0u8; len.clamp(1, 256 * 1024)];
            // SAFETY: reading the program's descriptor into our buffer.
            let n = unsafe {
                if off_in.is_null() {
                    real::read(fd_in, buf.as_mut_ptr() as *mut c_void, buf.len())
                } else {
                    let n =
                        libc::pread64(fd_in, buf.as_mut_ptr() as *mut c_void, buf.len(), *off_in);
                    if n > 0 {
                        *off_in += n as i64;
                    }
                    n
                }
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            send_all(s, &buf[..n as usize], libc::MSG_NOSIGNAL)
        }) {
            return r;
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::splice(fd_in, off_in, fd_out, off_out, len, flags) }
}

// ---- modes and options -------------------------------------------------------------

/// What `fcntl` does beyond the kernel's part, for a vmc descriptor.
fn after_fcntl(fd: c_int, cmd: c_int, arg: c_ulong, r: c_int) {
    if r < 0 {
        return;
    }
    match cmd {
        libc::F_SETFL => {
            on_stream(fd, |s| {
                s.set_nonblocking(arg as c_int & libc::O_NONBLOCK != 0)?;
                Ok(0)
            });
        }
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => copy_entry(fd, r),
        _ => {}
    }
}

/// `fcntl(2)` (declared with one integer argument: on x86-64 and aarch64 a
/// variadic argument travels where a fixed one would, so pointers pass unchanged).
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let saved_cmd = cmd;
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::fcntl(fd, cmd, arg) };
    let e = errno();
    after_fcntl(fd, saved_cmd, arg, r);
    set_errno(e);
    r
}

/// `fcntl64`.
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::fcntl64(fd, cmd, arg) };
    let e = errno();
    after_fcntl(fd, cmd, arg, r);
    set_errno(e);
    r
}

/// `ioctl(2)`: FIONREAD counts what vmc holds; FIONBIO is mirrored.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    if table::any() && req == libc::FIONREAD as c_ulong && !arg.is_null() {
        if let Some(r) = on_stream(fd, |s| s.available()) {
            if r < 0 {
                return -1;
            }
            // SAFETY: FIONREAD's argument is a writable int.
            unsafe { *(arg as *mut c_int) = r.min(c_int::MAX as isize) as c_int };
            return 0;
        }
    }
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::ioctl(fd, req, arg) };
    if r == 0 && req == libc::FIONBIO as c_ulong && !arg.is_null() && table::any() {
        let e = errno();
        // SAFETY: FIONBIO's argument is a readable int.
        let on = unsafe { *(arg as *const c_int) } != 0;
        on_stream(fd, |s| {
            s.set_nonblocking(on)?;
            Ok(0)
        });
        set_errno(e);
    }
    r
}

/// `setsockopt(2)`: the kernel's part, and receive/send timeouts mirrored.
#[no_mangle]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::setsockopt(fd, level, name, val, len) };
    if r == 0
        && table::any()
        && level == libc::SOL_SOCKET
        && (name == libc::SO_RCVTIMEO || name == libc::SO_SNDTIMEO)
        && !val.is_null()
        && len as usize >= std::mem::size_of::<libc::timeval>()
    {
        let e = errno();
        // SAFETY: a timeval, as the kernel accepted it.
        let tv = unsafe { std::ptr::read_unaligned(val as *const libc::timeval) };
        let t = Duration::from_secs(tv.tv_sec.max(0) as u64)
            + Duration::from_micros(tv.tv_usec.max(0) as u64);
        let t = (!t.is_zero()).then_some(t);
        if let Some(sock) = stream(fd) {
            let i = if name == libc::SO_RCVTIMEO { 0 } else { 1 };
            as_stream(&sock).timed[i].store(t.is_some(), Ordering::Relaxed);
        }
        on_stream(fd, |s| {
            if name == libc::SO_RCVTIMEO {
                s.set_read_timeout(t)?;
            } else {
                s.set_write_timeout(t)?;
            }
            Ok(0)
        });
        set_errno(e);
    }
    r
}

/// `shutdown(2)`.
#[no_mangle]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    if table::any() {
        let how2 = match how {
            libc::SHUT_RD => Some(Shutdown::Read),
            libc::SHUT_WR => Some(Shutdown::Write),
            libc::SHUT_RDWR => Some(Shutdown::Both),
            _ => None,
        };
        if let Some(h) = how2 {
            if let Some(r) = on_stream(fd, |s| s.shutdown(h).map(|()| 0)) {
                return r as c_int;
            }
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::shutdown(fd, how) }
}

// ---- exec ----------------------------------------------------------------------------

/// Before the program image is replaced: every accelerated connection the new image
/// inherits moves to TCP for good, both directions at exact byte boundaries
/// ([`vmc_conn::TcpStream::settle_on_tcp`]): what the new image writes on the
/// kernel socket reaches the peer after everything sent on the ring, and the peer
/// sends again, on TCP, whatever we had not read from its ring.
fn before_exec() {
    // A vfork child's exec (after it may have closed everything, the connections'
    // control sockets included) must not move the parent's connections.
    if !table::any() || crate::hands_off() {
        return;
    }
    let Some(_g) = enter() else { return };
    let mut seen: Vec<*const Sock> = Vec::new();
    let mut settling: Vec<(c_int, Arc<Sock>)> = Vec::new();
    let mut others: Vec<(c_int, Arc<Sock>)> = Vec::new();
    table::for_each(|fd, slot| {
        let Some(sock) = slot.as_ref() else { return };
        let Sock::Stream(s) = &**sock else { return };
        // SAFETY: `fd` is open: it is in the table, which close keeps current.
        let cloexec = rustix::io::fcntl_getfd(unsafe { borrow(fd) })
            .is_ok_and(|f| f.contains(rustix::io::FdFlags::CLOEXEC));
        let p = Arc::as_ptr(sock);
        if cloexec || seen.contains(&p) {
            return;
        }
        seen.push(p);
        // The new image will use the connection: a use, which claims it if a fork
        // left it unclaimed (fork, exec in the child, the parent closes its copy),
        // or asks the process that owns it to move it to TCP (`crate::fork`).
        if !s.owner.check() {
            if !s.owner.settled_elsewhere() {
                others.push((fd, sock.clone()));
            }
            return;
        }
        settling.push((fd, sock.clone()));
    });
    // The receiving directions first, then the sending ones (see
    // `TcpStream::settle_on_tcp_receiving`). Never hang an exec on a peer that does
    // not answer.
    let patience = Duration::from_millis(500);
    for (fd, sock) in &settling {
        if let Sock::Stream(s) = &**sock {
            if let Err(e) = s.settle_on_tcp_receiving(patience) {
                tracing::warn!(
                    fd,
                    "exec: could not move a connection's receiving side to TCP ({e})"
                );
            }
        }
    }
    // Connections another process owns since a fork: that process moves them (our
    // REWINDs above are there for it to find, should it own the other end).
    for (fd, sock) in &others {
        if let Sock::Stream(s) = &**sock {
            if !crate::fork::take_over(s) {
                tracing::warn!(
                    fd,
                    "exec: a connection another process owns stays on its rings"
                );
            }
        }
    }
    for (fd, sock) in &settling {
        if let Sock::Stream(s) = &**sock {
            if let Err(e) = s.settle_on_tcp(patience) {
                tracing::warn!(
                    fd,
                    "exec: could not move an accelerated connection to TCP ({e}); \
                     bytes may be lost to the new program image"
                );
            }
        }
    }
}

/// `execve(2)`.
#[no_mangle]
pub unsafe extern "C" fn execve(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::execve(path, argv, envp) }
}

/// `execv(3)`.
#[no_mangle]
pub unsafe extern "C" fn execv(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::execv(path, argv) }
}

/// `execvp(3)`.
#[no_mangle]
pub unsafe extern "C" fn execvp(
    file: *const libc::c_char,
    argv: *const *const libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::execvp(file, argv) }
}

/// `execvpe(3)`.
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    file: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::execvpe(file, argv, envp) }
}

/// `posix_spawn(3)`: the new program inherits every descriptor not marked
/// close-on-exec, as after fork and exec, but the C library's exec happens where
/// no hook sees it. So inherited accelerated connections move to TCP for good
/// first, as before an exec (here and in the child they share the kernel socket).
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const libc::c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::posix_spawn(pid, path, actions, attr, argv, envp) }
}

/// `posix_spawnp(3)`: as [`posix_spawn`].
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const libc::c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::posix_spawnp(pid, file, actions, attr, argv, envp) }
}
