//! epoll over vmc connections.
//!
//! The program's epoll descriptor stays a real epoll instance and keeps every
//! ordinary descriptor. A vmc connection added to it is kept beside it instead, in
//! an [`EpollSet`] (the table entry of the epoll descriptor), because the kernel
//! cannot see its ring. `epoll_wait` reports the set's ready connections first, then
//! asks the kernel for the rest; when nothing is ready it spins, then arms the
//! connections and sleeps on the epoll descriptor plus their wait descriptors (see
//! [`crate::poll::wait_loop`]).
//!
//! Semantics kept: level-triggered entries report while the condition holds;
//! edge-triggered ones report when new bytes arrived or space freed since the last
//! report (the connection's marks, which also move when an operation returned
//! `EAGAIN`), and then with every flag that holds, as the kernel does; `EPOLLONESHOT`
//! disables an entry after one report until `EPOLL_CTL_MOD`; `EPOLLHUP` and
//! `EPOLLERR` are always reported. A connection that turns out plain TCP moves into
//! the kernel's set with its events and data. Entries hold their connection weakly:
//! closing the last descriptor of a connection removes it, as the kernel does.
//!
//! Nesting: an epoll set that holds vmc connections, added to another epoll set,
//! joins that set's side entries too (the kernel could not see its connections).
//! It reports `EPOLLIN` while a wait on it would report something
//! ([`EpollSet::peek`]: its connections, its nested sets, its kernel part), and a
//! wait on the outer set sleeps on the inner set's connections and descriptor as
//! well. Loops are refused (`ELOOP`), as the kernel refuses them. A set nested
//! before it held any vmc connection stays in the kernel's set, which cannot see
//! the connections added to it later (a gap), except that it turns readable once
//! when one is added (its wake-up, below).
//!
//! Threads: one thread may add a connection while another already waits on the
//! set (Apache's event MPM: workers hand kept-alive connections to a listener
//! thread that sleeps in `epoll_wait`). The waiter sleeps on what the set held when
//! it went to sleep, or in the kernel alone if the set held no connection yet. So
//! each side set owns a wake-up eventfd, registered in the kernel's set under a
//! token only it uses: adding or changing an entry while someone waits rings it,
//! the kernel wakes the waiter, and every wait hides the token from the program
//! (see [`EpollSet::hide_wake`]) and looks again.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use libc::{c_int, epoll_event, pollfd, sigset_t, timespec};
use vmc_conn::{Interest, Ready};
use vmc_os::sync::ForkSafeMutex;

use crate::poll::{arm_all, ready_of, stream_of, timespec_of, vmc_stream, wait_loop};
use crate::table::{self, Sock};
use crate::{enter, fail, real, shield};

const IN: u32 = libc::EPOLLIN as u32;
const OUT: u32 = libc::EPOLLOUT as u32;
const RDHUP: u32 = libc::EPOLLRDHUP as u32;
const HUP: u32 = libc::EPOLLHUP as u32;
const ERR: u32 = libc::EPOLLERR as u32;
const ET: u32 = libc::EPOLLET as u32;
const ONESHOT: u32 = libc::EPOLLONESHOT as u32;
const RDNORM: u32 = libc::EPOLLRDNORM as u32;
const WRNORM: u32 = libc::EPOLLWRNORM as u32;

/// How deep nested sets are followed (the kernel allows 5 levels).
const MAX_DEPTH: u32 = 5;

/// One vmc connection, or one epoll set holding some, registered in an epoll set.
struct Entry {
    fd: c_int,
    sock: Weak<Sock>,
    events: u32,
    data: u64,
    /// Marks at the last edge-triggered report (`u64::MAX`: never reported).
    last_rx: u64,
    last_tx: u64,
    /// An `EPOLLONESHOT` entry that reported already.
    disabled: bool,
}

/// The vmc connections of one epoll instance.
pub struct EpollSet {
    /// A forked child keeps them (its copy of the instance watches the same
    /// connections), unless another thread was changing them at the fork.
    entries: ForkSafeMutex<Vec<Entry>>,
    /// Where the next scan starts, so a small `maxevents` serves everyone in turn.
    next: AtomicUsize,
    /// Threads in an emulated wait on this set.
    waiters: AtomicUsize,
    /// Rings a waiter when the entries change (none if it could not be made:
    /// then a wait notices a connection added meanwhile only when it wakes).
    wake: OnceLock<Wake>,
}

/// A side set's wake-up: an eventfd in the kernel's set, reported under `token`.
struct Wake {
    fd: vmc_os::wake::EventFd,
    token: u64,
}

fn interest(events: u32) -> Interest {
    Interest {
        read: events & (IN | RDNORM | RDHUP) != 0,
        write: events & (OUT | WRNORM) != 0,
    }
}

/// The edge-triggered mark of what `r` says about reading (bytes, ends, errors).
fn rx_mark(r: &Ready) -> u64 {
    r.rx_mark
        .wrapping_add((r.read_closed as u64) << 40)
        .wrapping_add((r.hup as u64) << 41)
        .wrapping_add((r.error as u64) << 42)
}

/// Whether an edge-triggered entry whose last report carried the marks
/// `(last_rx, last_tx)` has an edge to report for the events `ev` of `r`.
fn is_edge((last_rx, last_tx): (u64, u64), r: &Ready, ev: u32) -> bool {
    let fire_in = ev & (IN | RDNORM | RDHUP | HUP | ERR) != 0 && rx_mark(r) != last_rx;
    let fire_out = ev & (OUT | WRNORM) != 0 && r.tx_mark != last_tx;
    fire_in || fire_out
}

/// The events of `r` the entry asked for (plus hang-ups and errors, always).
fn mask(r: &Ready, events: u32) -> u32 {
    let mut ev = 0;
    if r.readable {
        ev |= events & (IN | RDNORM);
    }
    if r.writable {
        ev |= events & (OUT | WRNORM);
    }
    if r.read_closed {
        ev |= events & RDHUP;
    }
    if r.hup {
        ev |= HUP;
    }
    if r.error {
        ev |= ERR;
    }
    ev
}

impl Default for EpollSet {
    fn default() -> Self {
        EpollSet {
            entries: ForkSafeMutex::new(|inherited| {
                inherited.map(std::mem::take).unwrap_or_default()
            }),
            next: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            wake: OnceLock::new(),
        }
    }
}

impl EpollSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock()
    }

    /// Registers the set's wake-up in the kernel's set `epfd`, under a token no
    /// program data can equal while the set lives: the set's own address.
    fn install_wake(&self, epfd: c_int) {
        let Ok(fd) = vmc_os::wake::EventFd::new() else {
            return;
        };
        let token = self as *const EpollSet as u64;
        let mut ev = epoll_event {
            events: IN,
            u64: token,
        };
        // SAFETY: registering our own eventfd in the program's set; `ev` is ours.
        if unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd.fd().as_raw_fd(), &mut ev) } == 0
        {
            let _ = self.wake.set(Wake { fd, token });
        }
    }

    /// Tells whoever waits on the set that its entries changed. `always`: a
    /// thread may wait on it in the kernel alone (the set is new).
    fn ring(&self, always: bool) {
        if always || self.waiters.load(Ordering::SeqCst) > 0 {
            if let Some(w) = self.wake.get() {
                let _ = w.fd.notify();
            }
        }
    }

    /// Removes the set's wake-up from the first `n` of `events` (what the kernel
    /// returned), draining it; returns how many events are left. Never reorders
    /// the program's own events.
    fn hide_wake(&self, events: &mut [epoll_event], n: usize) -> usize {
        let Some(w) = self.wake.get() else {
            return n;
        };
        let mut kept = 0;
        for i in 0..n {
            let e = events[i];
            if e.u64 == w.token {
                let _ = w.fd.drain();
            } else {
                events[kept] = e;
                kept += 1;
            }
        }
        kept
    }

    /// Fills `out` with ready entries; returns how many. `deep(sock)`: look at that
    /// connection's TCP socket and its peer's liveness too (system calls, so only
    /// for connections whose wait descriptor fired).
    fn collect(
        &self,
        epfd: c_int,
        out: &mut [epoll_event],
        deep: &dyn Fn(&Arc<Sock>) -> bool,
    ) -> usize {
        let mut entries = self.lock();
        let len = entries.len();
        if len == 0 || out.is_empty() {
            return 0;
        }
        let start = self.next.load(Ordering::Relaxed) % len;
        let mut n = 0;
        let mut gone = Vec::new();
        for k in 0..len {
            let i = (start + k) % len;
            let e = &mut entries[i];
            if e.disabled {
                continue;
            }
            let Some(sock) = e.sock.upgrade() else {
                gone.push(i);
                continue;
            };
            if let Sock::Epoll(inner) = &*sock {
                // A nested set: readable while a wait on it would report something;
                // edge-triggered, when it turns so.
                let mark = inner.peek(e.fd, 1);
                let mut ev = if mark.is_some() {
                    e.events & (IN | RDNORM)
                } else {
                    0
                };
                if let (Some(m), true) = (mark, e.events & ET != 0) {
                    if m == e.last_rx {
                        ev = 0;
                    }
                    e.last_rx = m;
                }
                if ev != 0 {
                    out[n] = epoll_event {
                        events: ev,
                        u64: e.data,
                    };
                    n += 1;
                    if e.events & ONESHOT != 0 {
                        e.disabled = true;
                    }
                    if n == out.len() {
                        self.next.store(i + 1, Ordering::Relaxed);
                        break;
                    }
                }
                continue;
            }
            let s = stream_of(&sock);
            let gone_elsewhere =
                || !s.owner.check() && (s.owner.settled_elsewhere() || crate::fork::take_over(s));
            if gone_elsewhere() || (s.owner.check() && s.is_plain()) {
                // Plain TCP from now on: the kernel's set can watch it itself.
                let mut ev = epoll_event {
                    events: e.events,
                    u64: e.data,
                };
                // SAFETY: registering the program's descriptor in its own set.
                unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, e.fd, &mut ev) };
                gone.push(i);
                continue;
            }
            let r = ready_of(s, interest(e.events), deep(&sock));
            let mut ev = mask(&r, e.events);
            if ev != 0 && e.events & ET != 0 {
                if !is_edge((e.last_rx, e.last_tx), &r, ev) {
                    ev = 0;
                } else {
                    // An edge reports every flag that holds, as the kernel does.
                    if ev & (IN | RDNORM | RDHUP | HUP | ERR) != 0 {
                        e.last_rx = rx_mark(&r);
                    }
                    if ev & (OUT | WRNORM) != 0 {
                        e.last_tx = r.tx_mark;
                    }
                }
            }
            if ev != 0 {
                out[n] = epoll_event {
                    events: ev,
                    u64: e.data,
                };
                n += 1;
                if e.events & ONESHOT != 0 {
                    e.disabled = true;
                }
                if n == out.len() {
                    self.next.store(i + 1, Ordering::Relaxed);
                    break;
                }
            }
        }
        gone.sort_unstable();
        for i in gone.into_iter().rev() {
            entries.swap_remove(i);
        }
        n
    }

    /// The live entries' targets (strong references, for one look or one wait).
    fn targets(&self) -> Vec<(c_int, Arc<Sock>, u32, u64, u64)> {
        self.lock()
            .iter()
            .filter(|e| !e.disabled)
            .filter_map(|e| Some((e.fd, e.sock.upgrade()?, e.events, e.last_rx, e.last_tx)))
            .collect()
    }

    /// What a wait on this set sleeps on: the connections to arm, with their
    /// interests, and the epoll descriptors of nested sets (their kernel parts).
    pub(crate) fn live(&self, depth: u32) -> (Vec<(Arc<Sock>, Interest)>, Vec<c_int>) {
        let mut streams = Vec::new();
        let mut fds = Vec::new();
        if depth > MAX_DEPTH {
            return (streams, fds);
        }
        for (fd, sock, events, _, _) in self.targets() {
            match &*sock {
                Sock::Epoll(inner) => {
                    let (s, f) = inner.live(depth + 1);
                    streams.extend(s);
                    fds.push(fd);
                    fds.extend(f);
                }
                _ => streams.push((sock, interest(events))),
            }
        }
        (streams, fds)
    }

    /// Whether a wait on this set (epoll descriptor `epfd`) would report something
    /// now, consuming nothing (edge marks and one-shot entries stay as they are):
    /// what a set watching this one is told. `Some(mark)` if so, where the mark
    /// moves whenever something new became ready (bytes arrived, space freed), for
    /// an edge-triggered watcher.
    pub(crate) fn peek(&self, epfd: c_int, depth: u32) -> Option<u64> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut mark: Option<u64> = None;
        let mut add = |m: u64| mark = Some(mark.unwrap_or(0).wrapping_add(m));
        for (fd, sock, events, last_rx, last_tx) in self.targets() {
            match &*sock {
                Sock::Epoll(inner) => {
                    if let Some(m) = inner.peek(fd, depth + 1) {
                        add(m);
                    }
                }
                // (Ownership first: see `crate::poll::vmc_stream`.)
                Sock::Stream(s) if !s.owner.check() || !s.is_plain() => {
                    let r = ready_of(s, interest(events), false);
                    let ev = mask(&r, events);
                    if ev != 0 && (events & ET == 0 || is_edge((last_rx, last_tx), &r, ev)) {
                        add(rx_mark(&r).wrapping_add(r.tx_mark << 20));
                    }
                }
                _ => {}
            }
        }
        let mut p = pollfd {
            fd: epfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of ours; a zero timeout.
        if unsafe { real::poll(&mut p, 1, 0) } > 0 {
            add(1 << 63);
        }
        mark
    }

    /// True if `target` (an epoll set's entry) can be reached from this set through
    /// nested sets: adding this set to `target` would make a loop.
    fn reaches(&self, target: &Arc<Sock>, depth: u32) -> bool {
        if depth > MAX_DEPTH {
            return true;
        }
        self.targets().iter().any(|(_, sock, ..)| {
            Arc::ptr_eq(sock, target)
                || matches!(&**sock, Sock::Epoll(inner) if inner.reaches(target, depth + 1))
        })
    }
}

/// The epoll set of descriptor `fd` if it holds vmc connections (a table entry
/// with entries), for nesting it in the set `epfd`. A set whose connections all
/// turned plain (they live in its kernel part now) is nested by the kernel.
fn nested_set(fd: c_int, epfd: c_int) -> Option<Arc<Sock>> {
    if fd == epfd {
        return None;
    }
    let s = table::get(fd)?;
    matches!(&*s, Sock::Epoll(inner) if !inner.lock().is_empty()).then_some(s)
}

/// The set of epoll descriptor `epfd`, created on first use.
fn set_of(epfd: c_int, create: bool) -> Option<Arc<Sock>> {
    if let Some(s) = table::get(epfd) {
        if matches!(&*s, Sock::Epoll(_)) {
            return Some(s);
        }
        return None;
    }
    if !create {
        return None;
    }
    let s = Arc::new(Sock::Epoll(EpollSet::default()));
    if !table::set(epfd, s.clone()) {
        return None;
    }
    // In its final place (the token is its address).
    epoll_set(&s).install_wake(epfd);
    Some(s)
}

fn epoll_set(sock: &Sock) -> &EpollSet {
    match sock {
        Sock::Epoll(s) => s,
        _ => unreachable!("set_of returns epoll sets only"),
    }
}

/// `epoll_ctl(2)`: vmc connections go to the side set, everything else to the
/// kernel.
#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    ev: *mut epoll_event,
) -> c_int {
    if table::any() {
        if let Some(sock) = vmc_stream(fd).or_else(|| nested_set(fd, epfd)) {
            if let Some(_g) = enter() {
                let r = shield(|| ctl(epfd, op, fd, &sock, ev));
                return match r {
                    Ok(()) => 0,
                    Err(e) => {
                        fail(&e);
                        -1
                    }
                };
            }
        }
    }
    // SAFETY: forwarding the program's arguments.
    let r = unsafe { real::epoll_ctl(epfd, op, fd, ev) };
    if r < 0 && op != libc::EPOLL_CTL_ADD && table::any() && crate::errno() == libc::ENOENT {
        if let Some(r) = settled_in_side_set(epfd, op, fd, ev) {
            return r;
        }
    }
    r
}

/// `EPOLL_CTL_MOD`/`DEL` of a connection the kernel's set does not hold because
/// it is still in the side set: it turned plain during the look that last
/// reported it, before it could move. It moves now (MOD) or leaves (DEL).
fn settled_in_side_set(epfd: c_int, op: c_int, fd: c_int, ev: *mut epoll_event) -> Option<c_int> {
    let set_sock = set_of(epfd, false)?;
    let mut entries = epoll_set(&set_sock).lock();
    let i = entries.iter().position(|e| {
        e.fd == fd
            && e.sock
                .upgrade()
                .is_some_and(|s| matches!(&*s, Sock::Stream(_)))
    })?;
    entries.swap_remove(i);
    drop(entries);
    Some(match op {
        // SAFETY: forwarding the program's arguments, now as the kernel's entry.
        libc::EPOLL_CTL_MOD => unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, ev) },
        _ => 0,
    })
}

fn ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    sock: &Arc<Sock>,
    ev: *mut epoll_event,
) -> io::Result<()> {
    let errno = |e| Err(io::Error::from_raw_os_error(e));
    // A MOD or DEL of one of our entries: `epfd` is the epoll descriptor we
    // checked at its ADD (closing it would have dropped the set), and the kernel's
    // set does not hold the socket. (wrk changes its interest twice a request.)
    let ours = op != libc::EPOLL_CTL_ADD
        && set_of(epfd, false).is_some_and(|set| {
            epoll_set(&set)
                .lock()
                .iter()
                .any(|e| e.fd == fd && e.sock.upgrade().is_some_and(|s| Arc::ptr_eq(&s, sock)))
        });
    if !ours {
        // Let the kernel check `epfd` (EBADF, or EINVAL if not an epoll
        // descriptor): the socket is never in its set (ENOENT), or leaves it now
        // for ours.
        // SAFETY: removing the program's descriptor from the program's set.
        let r = unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        if r < 0 {
            if let e @ (libc::EINVAL | libc::EBADF) = crate::errno() {
                return errno(e);
            }
        }
    }
    let read_ev = || -> io::Result<(u32, u64)> {
        if ev.is_null() {
            return errno(libc::EFAULT).map(|()| (0, 0));
        }
        // SAFETY: the program's event, readable.
        let e = unsafe { std::ptr::read_unaligned(ev) };
        Ok((e.events, e.u64))
    };
    let existed = table::get(epfd).is_some();
    let set_sock = set_of(epfd, op == libc::EPOLL_CTL_ADD)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    if let Sock::Epoll(inner) = &**sock {
        if op == libc::EPOLL_CTL_ADD && inner.reaches(&set_sock, 1) {
            return errno(libc::ELOOP);
        }
    }
    let set = epoll_set(&set_sock);
    let mut entries = set.lock();
    let pos = entries
        .iter()
        .position(|e| e.fd == fd && e.sock.upgrade().is_some_and(|s| Arc::ptr_eq(&s, sock)));
    match op {
        libc::EPOLL_CTL_ADD => {
            if pos.is_some() {
                return errno(libc::EEXIST);
            }
            let (events, data) = read_ev()?;
            entries.push(Entry {
                fd,
                sock: Arc::downgrade(sock),
                events,
                data,
                last_rx: u64::MAX,
                last_tx: u64::MAX,
                disabled: false,
            });
        }
        libc::EPOLL_CTL_MOD => {
            let Some(i) = pos else {
                return errno(libc::ENOENT);
            };
            let (events, data) = read_ev()?;
            let e = &mut entries[i];
            e.events = events;
            e.data = data;
            e.last_rx = u64::MAX;
            e.last_tx = u64::MAX;
            e.disabled = false;
        }
        libc::EPOLL_CTL_DEL => {
            let Some(i) = pos else {
                return errno(libc::ENOENT);
            };
            entries.swap_remove(i);
            return Ok(());
        }
        _ => return errno(libc::EINVAL),
    }
    drop(entries);
    // A waiter sleeps on what the set held before: let it look again.
    set.ring(!existed);
    Ok(())
}

/// The emulated wait.
fn wait(
    epfd: c_int,
    sock: &Sock,
    events: *mut epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    sigmask: *const sigset_t,
) -> io::Result<usize> {
    if max <= 0 || events.is_null() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let set = epoll_set(sock);
    let max = max as usize;
    // What the last sleep woke for: the connections whose wait descriptor fired
    // (`None`: it timed out or failed, so every connection gets a deep look).
    let fired: std::cell::RefCell<Option<Vec<*const Sock>>> = Default::default();
    let pass = |kernel: bool, deep: bool| -> io::Result<usize> {
        // SAFETY: the program's array of `max` events, ours until we return.
        let out = unsafe { std::slice::from_raw_parts_mut(events, max) };
        let fired = fired.borrow();
        let deep =
            |s: &Arc<Sock>| deep && fired.as_ref().map_or(true, |f| f.contains(&Arc::as_ptr(s)));
        let mut n = set.collect(epfd, out, &deep);
        if kernel && n < max {
            // SAFETY: the rest of the program's array.
            let k = unsafe { real::epoll_wait(epfd, events.add(n), (max - n) as c_int, 0) };
            if k < 0 {
                let e = io::Error::last_os_error();
                if n == 0 {
                    return Err(e);
                }
            } else {
                // SAFETY: the rest of the program's array, `k` of them filled.
                let rest = unsafe { std::slice::from_raw_parts_mut(events.add(n), max - n) };
                n += set.hide_wake(rest, k as usize);
            }
        }
        Ok(n)
    };
    let block = |remaining: Option<Duration>| -> io::Result<()> {
        let (live, nested) = set.live(1);
        if arm_all(live.iter().map(|(s, i)| (stream_of(s), *i))) {
            return Ok(());
        }
        let mut fds: Vec<pollfd> = std::iter::once(epfd)
            .chain(nested)
            .map(|fd| pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut shared = false;
        // The connections without a wait descriptor of their own: looked at deeply.
        let mut blind = Vec::new();
        let first = fds.len();
        let mut watched = Vec::new();
        for (sock, _) in &live {
            let s = stream_of(sock);
            shared |= s.shared_wait();
            match s.wait_fd() {
                Some(w) => {
                    fds.push(pollfd {
                        fd: w.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    watched.push(Arc::as_ptr(sock));
                }
                None => blind.push(Arc::as_ptr(sock)),
            }
        }
        let ts = timespec_of(remaining, shared);
        // SAFETY: our own array; timespec and mask outlive the call.
        let r = unsafe {
            real::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                ts.as_ref()
                    .map_or(std::ptr::null(), |t| t as *const timespec),
                sigmask,
            )
        };
        let err = io::Error::last_os_error();
        // Each connection's wait descriptor as the sleep saw it (`live` and `fds`
        // list the watched ones in the same order).
        let mut seen = fds[first..].iter().map(|p| p.revents != 0);
        for (sock, want) in &live {
            let s = stream_of(sock);
            match (r >= 0 && s.wait_fd().is_some())
                .then(|| seen.next())
                .flatten()
            {
                Some(readable) => s.disarm_seen(*want, readable),
                None => s.disarm(*want),
            }
        }
        *fired.borrow_mut() = (r > 0).then(|| {
            let woke = fds[first..].iter().zip(&watched);
            blind
                .into_iter()
                .chain(woke.filter(|(p, _)| p.revents != 0).map(|(_, s)| *s))
                .collect()
        });
        if r < 0 {
            return Err(err);
        }
        Ok(())
    };
    set.waiters.fetch_add(1, Ordering::SeqCst);
    let r = wait_loop(pass, block, timeout);
    set.waiters.fetch_sub(1, Ordering::SeqCst);
    r
}

fn emulated(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    sigmask: *const sigset_t,
) -> Option<c_int> {
    let sock = set_of(epfd, false)?;
    let _g = enter()?;
    Some(
        match shield(|| wait(epfd, &sock, events, max, timeout, sigmask)) {
            Ok(n) => n as c_int,
            Err(e) => {
                fail(&e);
                -1
            }
        },
    )
}

/// A wait the kernel serves alone (`call`: the set held no vmc connection when it
/// began). If another thread added one meanwhile, the set's wake-up is among what
/// the kernel returned: it is hidden, and if nothing else came the wait goes on,
/// emulated, for what is left of `timeout`.
fn forwarded(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    sigmask: *const sigset_t,
    call: impl FnOnce() -> c_int,
) -> c_int {
    // Only a process that has vmc descriptors can grow a side set meanwhile.
    let start = (table::any() && timeout.is_some_and(|t| !t.is_zero())).then(Instant::now);
    let n = call();
    if n <= 0 || !table::any() {
        return n;
    }
    let Some(sock) = set_of(epfd, false) else {
        return n;
    };
    // SAFETY: the program's array, of which the kernel filled `n` (<= `max`).
    let out = unsafe { std::slice::from_raw_parts_mut(events, n as usize) };
    let kept = epoll_set(&sock).hide_wake(out, n as usize);
    if kept > 0 {
        return kept as c_int;
    }
    let remaining = match (timeout, start) {
        (None, _) => None,
        (Some(t), Some(s)) => Some(t.saturating_sub(s.elapsed())),
        (Some(_), None) => Some(Duration::ZERO),
    };
    emulated(epfd, events, max, remaining, sigmask).unwrap_or(0)
}

fn ms(timeout: c_int) -> Option<Duration> {
    (timeout >= 0).then(|| Duration::from_millis(timeout as u64))
}

/// `epoll_wait(2)`.
#[no_mangle]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    if table::any() {
        if let Some(r) = emulated(epfd, events, max, ms(timeout), std::ptr::null()) {
            return r;
        }
    }
    forwarded(epfd, events, max, ms(timeout), std::ptr::null(), || {
        // SAFETY: forwarding the program's arguments.
        unsafe { real::epoll_wait(epfd, events, max, timeout) }
    })
}

/// `epoll_pwait2(2)`: `epoll_pwait` with a `timespec` timeout (null: forever).
#[no_mangle]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> c_int {
    // SAFETY: the program's timespec, if any.
    let t = unsafe { timeout.as_ref() }.map(|t| {
        Duration::new(
            t.tv_sec.max(0) as u64,
            t.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    });
    if table::any() {
        if let Some(r) = emulated(epfd, events, max, t, sigmask) {
            return r;
        }
    }
    forwarded(epfd, events, max, t, sigmask, || {
        // SAFETY: forwarding the program's arguments.
        unsafe { real::epoll_pwait2(epfd, events, max, timeout, sigmask) }
    })
}

/// `epoll_pwait(2)`: the signal mask applies while it sleeps.
#[no_mangle]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: c_int,
    sigmask: *const sigset_t,
) -> c_int {
    if table::any() {
        if let Some(r) = emulated(epfd, events, max, ms(timeout), sigmask) {
            return r;
        }
    }
    forwarded(epfd, events, max, ms(timeout), sigmask, || {
        // SAFETY: forwarding the program's arguments.
        unsafe { real::epoll_pwait(epfd, events, max, timeout, sigmask) }
    })
}
