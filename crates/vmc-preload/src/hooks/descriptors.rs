//! What the program does to a descriptor itself: closing (`close`, `close_range`),
//! duplicating (`dup`, `dup2`, `dup3`, `fcntl`'s `F_DUPFD`), modes and options
//! (`fcntl`, `fcntl64`, `ioctl`, `setsockopt`) and `shutdown`.

use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::time::Duration;

use libc::{c_int, c_uint, c_ulong, c_void, socklen_t};

use super::{as_stream, is_tcp, on_stream, stream};
use crate::alias;
use crate::table;
use crate::{enabled, enter, errno, real, set_errno};

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
