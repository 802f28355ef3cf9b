//! `poll`, `ppoll` and `select`/`pselect` over a mix of vmc connections and
//! ordinary descriptors.
//!
//! A call without vmc connections goes to the kernel untouched. Otherwise each pass
//! asks the connections what they are ready for ([`vmc_conn::TcpStream::poll_ready`],
//! no system call while on shared memory) and the kernel about the rest (a
//! zero-timeout poll with the vmc descriptors hidden). Between passes the caller
//! spins for the channel's spin budget (`VMC_SPIN_US`, default 50 us; a ring round
//! trip is far shorter than a kernel wake-up), then arms every connection and
//! sleeps in the kernel on the ordinary descriptors plus each connection's wait
//! descriptor. The spin never sleeps through a ready kernel descriptor for more than
//! a few microseconds: it looks at the kernel every few dozen passes.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libc::{c_int, fd_set, nfds_t, pollfd, sigset_t, timespec, timeval};
use vmc_conn::{Interest, Ready};

use crate::table::{self, Sock};
use crate::{enter, fail, real, shield};

/// How long a waiting call spins before it sleeps.
pub(crate) fn spin_budget() -> Duration {
    // An atomic, not a `OnceLock`: fork-safe (see `crate::enabled`).
    use std::sync::atomic::{AtomicU64, Ordering};
    static SPIN_NS: AtomicU64 = AtomicU64::new(u64::MAX);
    match SPIN_NS.load(Ordering::Relaxed) {
        u64::MAX => {
            let d = vmc_channel_spin().unwrap_or(Duration::from_micros(50));
            SPIN_NS.store(
                d.as_nanos().min(u64::MAX as u128 - 1) as u64,
                Ordering::Relaxed,
            );
            d
        }
        ns => Duration::from_nanos(ns),
    }
}

fn vmc_channel_spin() -> Option<Duration> {
    let us: u64 = std::env::var("VMC_SPIN_US").ok()?.parse().ok()?;
    Some(Duration::from_micros(us))
}

/// The wait every readiness call shares: `pass(kernel, deep)` looks once (asking the
/// kernel too if `kernel`) and returns how many things are ready; `block(remaining)`
/// arms, sleeps and disarms. Returns what the first successful pass found, or 0 at
/// the timeout (`None`: wait forever).
pub(crate) fn wait_loop(
    mut pass: impl FnMut(bool, bool) -> io::Result<usize>,
    mut block: impl FnMut(Option<Duration>) -> io::Result<()>,
    timeout: Option<Duration>,
) -> io::Result<usize> {
    crate::signals::begin_call(false);
    let n = pass(true, false)?;
    if n > 0 || timeout == Some(Duration::ZERO) {
        return Ok(n);
    }
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let spin = timeout.map_or(spin_budget(), |t| t.min(spin_budget()));
    let mut i = 0u32;
    while start.elapsed() < spin {
        i = i.wrapping_add(1);
        let n = pass(i % 32 == 0, false)?;
        if n > 0 {
            return Ok(n);
        }
        if i % 32 == 0 && crate::signals::any_handler_ran() {
            // The kernel's readiness calls fail after any handler, SA_RESTART or not.
            return Err(io::ErrorKind::Interrupted.into());
        }
        if i % 256 == 0 {
            // Two busy threads on two cores: let the peer we wait for run.
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) {
            return pass(true, true);
        }
        block(remaining)?;
        let n = pass(true, true)?;
        if n > 0 {
            return Ok(n);
        }
    }
}

/// The vmc connection behind `fd`, if any (still accelerated or deciding).
///
/// A connection another process owns since a fork is taken over first (see
/// [`crate::fork`]): once its owner moved it to TCP, this process forgets it and
/// the kernel serves its descriptor.
pub(crate) fn vmc_stream(fd: c_int) -> Option<Arc<Sock>> {
    let sock = table::get(fd)?;
    let Sock::Stream(s) = &*sock else {
        return None;
    };
    // Ownership first: a process that does not own the connection must not touch
    // its state (even looking at the handshake would take the owner's messages).
    if !s.owner.check() {
        if s.owner.settled_elsewhere() || crate::fork::take_over(s) {
            // Dropping the entry abandons this process's copy (see `Drop for Sock`,
            // in `crate::hooks`).
            drop(table::take(fd));
            return None;
        }
        return Some(sock);
    }
    if s.is_plain() {
        return None;
    }
    Some(sock)
}

pub(crate) fn stream_of(sock: &Sock) -> &crate::table::Stream {
    match sock {
        Sock::Stream(s) => s,
        _ => unreachable!("vmc_stream returns streams only"),
    }
}

/// What a connection is ready for; one the other process of a fork owns reports
/// an error (its calls fail with EIO).
pub(crate) fn ready_of(s: &crate::table::Stream, want: Interest, deep: bool) -> Ready {
    if crate::fork::requests_pending() {
        crate::fork::serve_requests();
    }
    if !s.owner.check() {
        return Ready {
            readable: want.read,
            writable: want.write,
            error: true,
            hup: true,
            ..Ready::default()
        };
    }
    s.poll_ready(want, deep)
}

/// Arms each connection for its interest; true if one is ready already (then
/// nothing stays armed). On false, every connection is armed and must be disarmed.
pub(crate) fn arm_all<'a>(
    items: impl Iterator<Item = (&'a crate::table::Stream, Interest)> + Clone,
) -> bool {
    for (k, (s, want)) in items.clone().enumerate() {
        if !s.owner.check() {
            // Owned by the other process of a fork: "ready" (with an error).
            for (s, want) in items.take(k) {
                s.disarm(want);
            }
            return true;
        }
        match s.arm(want) {
            Ok(None) => {}
            // Ready now (or cannot arm): undo the others and look again.
            _ => {
                for (s, want) in items.take(k) {
                    s.disarm(want);
                }
                return true;
            }
        }
    }
    false
}

/// Converts a timeout for the kernel's ppoll; capped when several waiters share a
/// connection's wait set (each must look again now and then).
pub(crate) fn timespec_of(t: Option<Duration>, shared: bool) -> Option<timespec> {
    let t = match (t, shared) {
        (t, true) => Some(t.map_or(Duration::from_millis(10), |t| {
            t.min(Duration::from_millis(10))
        })),
        (t, false) => t,
    };
    t.map(|t| timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    })
}

/// poll(2)-style events for what a connection is ready for.
fn revents(r: &Ready, events: i16) -> i16 {
    let mut out = 0i16;
    if r.readable {
        out |= events & (libc::POLLIN | libc::POLLRDNORM);
    }
    if r.writable {
        out |= events & (libc::POLLOUT | libc::POLLWRNORM);
    }
    if r.read_closed {
        out |= events & libc::POLLRDHUP;
    }
    if r.hup {
        out |= libc::POLLHUP;
    }
    if r.error {
        out |= libc::POLLERR;
    }
    out
}

fn interest(events: i16) -> Interest {
    Interest {
        read: events & (libc::POLLIN | libc::POLLRDNORM | libc::POLLRDHUP) != 0,
        write: events & (libc::POLLOUT | libc::POLLWRNORM) != 0,
    }
}

/// The emulated poll over `fds`, some of which (`items`, by index) are connections
/// or epoll sets holding some (those stay visible to the kernel too, for their
/// ordinary descriptors).
fn poll_mixed(
    fds: &mut [pollfd],
    items: &[(usize, Arc<Sock>)],
    timeout: Option<Duration>,
    sigmask: *const sigset_t,
) -> io::Result<usize> {
    let nfds = fds.len() as nfds_t;
    let vmc: Vec<(usize, Arc<Sock>)> = items
        .iter()
        .filter(|(_, s)| matches!(&**s, Sock::Stream(_)))
        .cloned()
        .collect();
    let sets: Vec<(usize, Arc<Sock>)> = items
        .iter()
        .filter(|(_, s)| matches!(&**s, Sock::Epoll(_)))
        .cloned()
        .collect();
    let vmc = &vmc[..];
    let has_kernel = fds.len() > vmc.len();
    let fds_ptr = fds.as_mut_ptr();
    let pass = |kernel: bool, deep: bool| -> io::Result<usize> {
        // SAFETY: `fds_ptr` is the program's array of `nfds` entries, which this
        // call owns until it returns; no other reference to it is live here.
        let fds = unsafe { std::slice::from_raw_parts_mut(fds_ptr, nfds as usize) };
        let mut n = 0;
        if kernel && has_kernel {
            // The kernel looks at the others; negative descriptors are skipped.
            let saved: Vec<c_int> = vmc.iter().map(|(i, _)| fds[*i].fd).collect();
            for (i, _) in vmc {
                fds[*i].fd = -1;
            }
            // SAFETY: the program's array, with vmc descriptors hidden.
            let k = unsafe { real::poll(fds.as_mut_ptr(), nfds, 0) };
            let err = io::Error::last_os_error();
            for ((i, _), fd) in vmc.iter().zip(saved) {
                fds[*i].fd = fd;
            }
            if k < 0 {
                return Err(err);
            }
            n += k as usize;
        }
        for (i, sock) in vmc {
            let p = &mut fds[*i];
            let r = ready_of(stream_of(sock), interest(p.events), deep);
            p.revents = revents(&r, p.events);
            if p.revents != 0 {
                n += 1;
            }
        }
        for (i, sock) in &sets {
            let p = &mut fds[*i];
            let Sock::Epoll(set) = &**sock else { continue };
            if !kernel {
                p.revents = 0;
            }
            if set.peek(p.fd, 1).is_some() && p.events & (libc::POLLIN | libc::POLLRDNORM) != 0 {
                if p.revents == 0 {
                    n += 1;
                }
                p.revents |= p.events & (libc::POLLIN | libc::POLLRDNORM);
            }
        }
        if !kernel && has_kernel {
            // Kernel descriptors were not looked at: report only ours this time.
            let ours = |idx: usize| items.iter().any(|(i, _)| *i == idx);
            n = (0..fds.len())
                .filter(|&i| ours(i) && fds[i].revents != 0)
                .count();
            if n > 0 {
                for (idx, p) in fds.iter_mut().enumerate() {
                    if !ours(idx) {
                        p.revents = 0;
                    }
                }
            }
        }
        Ok(n)
    };
    let block = |remaining: Option<Duration>| -> io::Result<()> {
        // The connections of epoll sets among the descriptors, and their nested
        // sets' descriptors (the sets' own descriptors are in the kernel's part).
        let mut inner: Vec<(Arc<Sock>, Interest)> = Vec::new();
        let mut inner_fds: Vec<c_int> = Vec::new();
        for (_, sock) in &sets {
            if let Sock::Epoll(set) = &**sock {
                let (l, f) = set.live(1);
                inner.extend(l);
                inner_fds.extend(f);
            }
        }
        let armed = vmc
            .iter()
            .map(|(i, s)| {
                // SAFETY: as in `pass`; read-only access to the events field.
                let ev = unsafe { (*fds_ptr.add(*i)).events };
                (stream_of(s), interest(ev))
            })
            .chain(inner.iter().map(|(s, i)| (stream_of(s), *i)));
        if arm_all(armed.clone()) {
            return Ok(());
        }
        // SAFETY: as in `pass`.
        let fds = unsafe { std::slice::from_raw_parts(fds_ptr, nfds as usize) };
        let mut set: Vec<pollfd> = fds.to_vec();
        for (i, _) in vmc {
            set[*i].fd = -1;
        }
        let mut shared = false;
        for (s, _) in armed.clone() {
            shared |= s.shared_wait();
            if let Some(w) = s.wait_fd() {
                use std::os::fd::AsRawFd;
                set.push(pollfd {
                    fd: w.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        for fd in inner_fds.iter().copied() {
            set.push(pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ts = timespec_of(remaining, shared);
        // SAFETY: our own array; the timespec and mask live across the call.
        let r = unsafe {
            real::ppoll(
                set.as_mut_ptr(),
                set.len() as nfds_t,
                ts.as_ref()
                    .map_or(std::ptr::null(), |t| t as *const timespec),
                sigmask,
            )
        };
        let err = io::Error::last_os_error();
        for (s, want) in armed {
            s.disarm(want);
        }
        if r < 0 {
            return Err(err);
        }
        Ok(())
    };
    wait_loop(pass, block, timeout)
}

/// The vmc connections among `fds`, and the epoll sets holding some, by index.
fn vmc_among(fds: &[pollfd]) -> Vec<(usize, Arc<Sock>)> {
    fds.iter()
        .enumerate()
        .filter_map(|(i, p)| vmc_stream(p.fd).or_else(|| vmc_epoll(p.fd)).map(|s| (i, s)))
        .collect()
}

/// The epoll set of descriptor `fd`, if it holds vmc connections.
fn vmc_epoll(fd: c_int) -> Option<Arc<Sock>> {
    let s = table::get(fd)?;
    matches!(&*s, Sock::Epoll(_)).then_some(s)
}

fn duration_ms(ms: c_int) -> Option<Duration> {
    (ms >= 0).then(|| Duration::from_millis(ms as u64))
}

/// `poll(2)`.
#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int {
    if table::any() && !fds.is_null() {
        // SAFETY: the program's array of `n` pollfds.
        let slice = unsafe { std::slice::from_raw_parts_mut(fds, n as usize) };
        let vmc = vmc_among(slice);
        if !vmc.is_empty() {
            if let Some(_g) = enter() {
                let r = shield(|| poll_mixed(slice, &vmc, duration_ms(timeout), std::ptr::null()));
                return match r {
                    Ok(k) => k as c_int,
                    Err(e) => {
                        fail(&e);
                        -1
                    }
                };
            }
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::poll(fds, n, timeout) }
}

/// `__poll_chk` (FORTIFY_SOURCE's poll).
#[no_mangle]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut pollfd,
    n: nfds_t,
    timeout: c_int,
    len: usize,
) -> c_int {
    if (n as usize).saturating_mul(std::mem::size_of::<pollfd>()) > len {
        // SAFETY: what glibc does on a detected overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { poll(fds, n, timeout) }
}

fn duration_ts(ts: *const timespec) -> Option<Duration> {
    if ts.is_null() {
        return None;
    }
    // SAFETY: the program's timespec.
    let t = unsafe { *ts };
    Some(Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    ))
}

/// `ppoll(2)`: the signal mask applies while it sleeps (not while it spins).
#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut pollfd,
    n: nfds_t,
    tmo: *const timespec,
    sigmask: *const sigset_t,
) -> c_int {
    if table::any() && !fds.is_null() {
        // SAFETY: the program's array of `n` pollfds.
        let slice = unsafe { std::slice::from_raw_parts_mut(fds, n as usize) };
        let vmc = vmc_among(slice);
        if !vmc.is_empty() {
            if let Some(_g) = enter() {
                let r = shield(|| poll_mixed(slice, &vmc, duration_ts(tmo), sigmask));
                return match r {
                    Ok(k) => k as c_int,
                    Err(e) => {
                        fail(&e);
                        -1
                    }
                };
            }
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::ppoll(fds, n, tmo, sigmask) }
}

/// `__ppoll_chk`.
#[no_mangle]
pub unsafe extern "C" fn __ppoll_chk(
    fds: *mut pollfd,
    n: nfds_t,
    tmo: *const timespec,
    sigmask: *const sigset_t,
    len: usize,
) -> c_int {
    if (n as usize).saturating_mul(std::mem::size_of::<pollfd>()) > len {
        // SAFETY: what glibc does on a detected overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { ppoll(fds, n, tmo, sigmask) }
}

/// select/pselect through the emulated poll; `None` if no vmc connection is in the
/// sets (the caller then asks the kernel itself).
///
/// # Safety
/// The sets are null or valid `fd_set`s covering `nfds` descriptors.
unsafe fn select_mixed(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    timeout: Option<Duration>,
    sigmask: *const sigset_t,
) -> Option<io::Result<usize>> {
    let nfds = nfds.clamp(0, libc::FD_SETSIZE as c_int);
    // SAFETY: per the contract, each set is null or valid.
    let isset = |set: *mut fd_set, fd: c_int| !set.is_null() && unsafe { libc::FD_ISSET(fd, set) };
    let mut fds = Vec::new();
    let mut any_vmc = false;
    for fd in 0..nfds {
        let mut events = 0;
        if isset(r, fd) {
            events |= libc::POLLIN;
        }
        if isset(w, fd) {
            events |= libc::POLLOUT;
        }
        if isset(e, fd) {
            events |= libc::POLLPRI;
        }
        if events != 0 {
            any_vmc |= vmc_stream(fd).is_some() || vmc_epoll(fd).is_some();
            fds.push(pollfd {
                fd,
                events,
                revents: 0,
            });
        }
    }
    if !any_vmc {
        return None;
    }
    let _g = enter()?;
    let vmc = vmc_among(&fds);
    let res = shield(|| poll_mixed(&mut fds, &vmc, timeout, sigmask));
    Some(res.and_then(|_| {
        if fds.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: the program's sets, valid per contract.
        unsafe {
            for set in [r, w, e] {
                if !set.is_null() {
                    libc::FD_ZERO(set);
                }
            }
        }
        let mut count = 0;
        for p in &fds {
            let set_if = |set: *mut fd_set, on: bool, count: &mut usize| {
                if on && !set.is_null() {
                    // SAFETY: as above.
                    unsafe { libc::FD_SET(p.fd, set) };
                    *count += 1;
                }
            };
            let rv = p.revents;
            set_if(
                r,
                p.events & libc::POLLIN != 0
                    && rv & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
                &mut count,
            );
            set_if(
                w,
                p.events & libc::POLLOUT != 0 && rv & (libc::POLLOUT | libc::POLLERR) != 0,
                &mut count,
            );
            set_if(
                e,
                p.events & libc::POLLPRI != 0 && rv & libc::POLLPRI != 0,
                &mut count,
            );
        }
        Ok(count)
    }))
}

/// `select(2)`. Like Linux, the timeout is updated to the time not slept.
#[no_mangle]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    timeout: *mut timeval,
) -> c_int {
    if table::any() {
        let t = (!timeout.is_null()).then(|| {
            // SAFETY: the program's timeval.
            let tv = unsafe { *timeout };
            Duration::from_secs(tv.tv_sec.max(0) as u64)
                + Duration::from_micros(tv.tv_usec.max(0) as u64)
        });
        let start = Instant::now();
        // SAFETY: the program's sets.
        if let Some(res) = unsafe { select_mixed(nfds, r, w, e, t, std::ptr::null()) } {
            if let Some(t) = t {
                let left = t.saturating_sub(start.elapsed());
                // SAFETY: the program's timeval, writable.
                unsafe {
                    (*timeout).tv_sec = left.as_secs() as libc::time_t;
                    (*timeout).tv_usec = left.subsec_micros() as libc::suseconds_t;
                }
            }
            return match res {
                Ok(k) => k as c_int,
                Err(err) => {
                    fail(&err);
                    -1
                }
            };
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::select(nfds, r, w, e, timeout) }
}

/// `pselect(2)`.
#[no_mangle]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> c_int {
    if table::any() {
        // SAFETY: the program's sets and timespec.
        if let Some(res) = unsafe { select_mixed(nfds, r, w, e, duration_ts(timeout), sigmask) } {
            return match res {
                Ok(k) => k as c_int,
                Err(err) => {
                    fail(&err);
                    -1
                }
            };
        }
    }
    // SAFETY: forwarding the program's arguments.
    unsafe { real::pselect(nfds, r, w, e, timeout, sigmask) }
}
