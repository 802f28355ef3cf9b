//! The interposed socket calls (everything but readiness, which is in `poll` and
//! `epoll`).
//!
//! Each hook first asks the descriptor table whether vmc owns the descriptor; if
//! not (the common case for files, pipes and plain connections), it calls the C
//! library's function and nothing else. Setting up happens *after* the real call
//! succeeded (`listen`, `connect`, `accept`), so a program sees exactly the kernel's
//! result, errno included, whatever vmc decides.
//!
//! The hooks are grouped by family, one file each:
//! - [`setup`]: `listen`, `accept`, `accept4`, `connect`: where vmc takes a socket
//!   over;
//! - [`descriptors`]: what the program does to the descriptor itself: `close`,
//!   `close_range`, `dup`, `dup2`, `dup3`, `fcntl`, `fcntl64`, `ioctl`,
//!   `setsockopt`, `shutdown`;
//! - [`io`]: reading and writing: `read`, `recv`, `recvfrom`, `readv`, `recvmsg`,
//!   `recvmmsg`, `write`, `send`, `sendto`, `writev`, `sendmsg`, `sendmmsg`,
//!   `sendfile`, `sendfile64`, `splice`, and the `_chk` variants;
//! - [`exec`]: `execve`, `execv`, `execvp`, `execvpe`, `posix_spawn`,
//!   `posix_spawnp`: connections a new program image inherits;
//! - [`listing`]: `opendir`, `fdopendir`, `readdir`, `readdir64`, `closedir`:
//!   listings of `/proc/self/fd` without vmc's own descriptors.
//!
//! This file holds what the families share: borrowing the program's descriptor,
//! recording a connection vmc took over, finding it again, and running a call on
//! it inside vmc.

pub mod descriptors;
pub mod exec;
pub mod io;
pub mod listing;
pub mod setup;

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use libc::{c_int, ssize_t};
use vmc_conn::TcpStream;

use crate::alias;
use crate::table::{self, Sock};
use crate::{enter, fail, shield};

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

/// The end of a table entry (its last reference went: `close`, `close_range`, an
/// entry `dup2` replaced, an epoll set that let go, a connection another process
/// took over): a connection this process owns is added to the exit report
/// ([`crate::report`]); one another process owns since a fork is left to that one
/// ([`crate::fork`]).
impl Drop for Sock {
    fn drop(&mut self) {
        if let Sock::Stream(s) = self {
            if s.owner.owned_here() {
                crate::report::account(s);
            } else {
                // Another process owns it since a fork: leave it to that one.
                s.abandon();
            }
        }
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
fn ret(r: std::io::Result<usize>) -> ssize_t {
    match r {
        Ok(n) => n as ssize_t,
        Err(e) => {
            fail(&e);
            -1
        }
    }
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
fn on_stream(fd: c_int, f: impl FnMut(&TcpStream) -> std::io::Result<usize>) -> Option<ssize_t> {
    on_io(fd, Io::Other, f)
}

/// [`on_stream`] for a call that receives or sends.
fn on_io(
    fd: c_int,
    io: Io,
    mut f: impl FnMut(&TcpStream) -> std::io::Result<usize>,
) -> Option<ssize_t> {
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
            Err(e)
                if e.kind() == std::io::ErrorKind::Interrupted && crate::fork::serve_requests() =>
            {
                // (Served, or still held by a thread of ours that is coming out
                // of its wait: look again.)
                continue;
            }
            _ => return Some(ret(r)),
        }
    }
}
