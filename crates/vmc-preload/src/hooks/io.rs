//! Reading and writing: the `read`, `recv*`, `write`, `send*`, `sendfile` and
//! `splice` families (with their FORTIFY_SOURCE `_chk` variants), served from the
//! connection when vmc carries the descriptor.

use std::io;

use libc::{
    c_int, c_uint, c_void, iovec, loff_t, msghdr, off64_t, off_t, size_t, sockaddr, socklen_t,
    ssize_t,
};
use vmc_conn::{RecvOpts, TcpStream};

use super::{on_io, stream, Io};
use crate::real;
use crate::table;

// ---- helpers -------------------------------------------------------------------

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
