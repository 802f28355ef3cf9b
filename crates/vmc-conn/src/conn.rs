//! One connection: a real TCP connection, and beside it (when both ends run vmc and
//! share a machine) a shared-memory channel, with each direction moving between the
//! two at exact byte boundaries.
//!
//! # Paths and boundaries
//! Every connection starts on TCP. Each *direction* is owned by its sender, which may
//! move it to the other path at any time: it announces `SWITCH { to, offset }` on the
//! control socket, `offset` being the bytes it sent on the path it leaves, and from
//! then on writes to the new path. The receiver keeps reading the old path until it
//! has exactly `offset` bytes from it, then reads the new one. Nothing is lost,
//! duplicated or reordered, and neither end waits for the other (XenVMC's send and
//! receive sequence exchange).
//!
//! - TCP -> shm: the sender resumes its ring, then sends SWITCH (so the receiver,
//!   which learns of the switch from the socket, finds the ring open).
//! - shm -> TCP: the sender sends SWITCH, then pauses its ring. The receiver drains the
//!   ring, sees it paused, and finds the SWITCH already queued on the socket; a paused
//!   ring without a SWITCH is the real end of stream.
//!
//! # Setting up
//! The client connects TCP, then hands the listener's process an ATTACH (the TCP
//! 4-tuple as it sees it) and the channel's segment over the listener's rendezvous
//! socket, without waiting: its first bytes go on TCP. The listener attaches the
//! channel to the accepted connection whose 4-tuple mirrors the ATTACH, if one
//! arrives within [`ATTACH_WINDOW`] of accepting; otherwise the connection stays TCP
//! for good and the client, seeing its handshake socket closed, records why. Each end
//! then moves its own sending direction onto the ring at its next write.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{recv, send, RecvFlags, SendFlags};
use vmc_channel::{Channel, Offer, ReadHalf, WriteHalf};

use crate::fallback::Fallback;
use crate::listener::Rendezvous;
use crate::wire::{self, Path, Switch, SWITCH_LEN};

/// How long after accepting a connection the listener side still attaches a channel
/// to it. A vmc client sends its ATTACH right after `connect` returns, so it arrives
/// within microseconds; the window only bounds how long a connection from a plain TCP
/// client is watched for one.
pub const ATTACH_WINDOW: Duration = Duration::from_millis(200);

const PENDING: u8 = 0;
const ACCELERATED: u8 = 1;
const PLAIN: u8 = 2;

/// A handshake still in flight.
enum Setup {
    /// Client: the segment is offered, the listener has not answered.
    Offered(Offer),
    /// Listener side: no ATTACH for this connection yet.
    Awaiting {
        rendezvous: Arc<Rendezvous>,
        deadline: Instant,
    },
    Done,
}

/// The channel, once attached, in pieces each direction takes when it needs them.
struct Parts {
    reader: Mutex<Option<ReadHalf>>,
    writer: Mutex<Option<WriteHalf>>,
    /// The control socket (a duplicate of the channel's handshake socket).
    ctl: OwnedFd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxPath {
    /// Reading TCP; `until` is where the peer's SWITCH to shm said TCP ends.
    Tcp {
        until: Option<u64>,
    },
    Shm,
}

struct Rx {
    path: RxPath,
    /// Bytes read from TCP so far.
    tcp_in: u64,
    ring: Option<ReadHalf>,
    /// A partly received SWITCH frame, and complete ones not applied yet.
    frame: [u8; SWITCH_LEN],
    frame_len: usize,
    switches: VecDeque<Switch>,
    /// Set by `set_nonblocking` / `set_read_timeout`.
    nonblocking: bool,
    timeout: Option<Duration>,
}

struct Tx {
    path: Path,
    /// The path this end wants its sending direction on.
    want: Path,
    tcp_out: u64,
    ring: Option<WriteHalf>,
    shut: bool,
    nonblocking: bool,
    timeout: Option<Duration>,
}

/// Bytes moved, per path and direction.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) tcp_in: AtomicU64,
    pub(crate) tcp_out: AtomicU64,
    pub(crate) shm_in: AtomicU64,
    pub(crate) shm_out: AtomicU64,
}

/// A connection's shared state (a `TcpStream` and its clones point at one).
pub(crate) struct Conn {
    pub(crate) tcp: std::net::TcpStream,
    state: AtomicU8,
    setup: Mutex<Setup>,
    /// For waiting on the handshake while it is in flight.
    setup_fd: Option<OwnedFd>,
    parts: OnceLock<Parts>,
    fallback: OnceLock<Fallback>,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
    pub(crate) counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a direction's lock leaves its state consistent enough
    // to report errors; never turn it into a second panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(fd.try_clone_to_owned()?)
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("vmc connection: {msg}"))
}

impl Conn {
    fn new(tcp: std::net::TcpStream, state: u8, setup: Setup, setup_fd: Option<OwnedFd>) -> Conn {
        Conn {
            tcp,
            state: AtomicU8::new(state),
            setup: Mutex::new(setup),
            setup_fd,
            parts: OnceLock::new(),
            fallback: OnceLock::new(),
            rx: Mutex::new(Rx {
                path: RxPath::Tcp { until: None },
                tcp_in: 0,
                ring: None,
                frame: [0; SWITCH_LEN],
                frame_len: 0,
                switches: VecDeque::new(),
                nonblocking: false,
                timeout: None,
            }),
            tx: Mutex::new(Tx {
                path: Path::Tcp,
                want: Path::Shm,
                tcp_out: 0,
                ring: None,
                shut: false,
                nonblocking: false,
                timeout: None,
            }),
            counters: Counters::default(),
        }
    }

    /// A connection that stays plain TCP, for `reason`.
    pub(crate) fn plain(tcp: std::net::TcpStream, reason: Fallback) -> Conn {
        let c = Conn::new(tcp, PLAIN, Setup::Done, None);
        let _ = c.fallback.set(reason);
        c
    }

    /// Client side: the segment was offered to the listener's process.
    pub(crate) fn offered(tcp: std::net::TcpStream, offer: Offer) -> Conn {
        match dup(offer.fd()) {
            Ok(watch) => Conn::new(tcp, PENDING, Setup::Offered(offer), Some(watch)),
            Err(e) => Conn::plain(tcp, Fallback::Handshake(e.to_string())),
        }
    }

    /// Listener side: no ATTACH yet; watch the rendezvous for one a little longer.
    pub(crate) fn awaiting(
        tcp: std::net::TcpStream,
        rendezvous: Arc<Rendezvous>,
    ) -> io::Result<Conn> {
        let watch = dup(rendezvous.fd())?;
        let setup = Setup::Awaiting {
            rendezvous,
            deadline: Instant::now() + ATTACH_WINDOW,
        };
        Ok(Conn::new(tcp, PENDING, setup, Some(watch)))
    }

    /// Listener side: the channel is attached already.
    pub(crate) fn attached(tcp: std::net::TcpStream, channel: Channel) -> io::Result<Conn> {
        let c = Conn::new(tcp, PENDING, Setup::Done, None);
        c.install(channel)?;
        Ok(c)
    }

    pub(crate) fn is_accelerated(&self) -> bool {
        self.state.load(Ordering::Acquire) == ACCELERATED
    }

    pub(crate) fn is_pending(&self) -> bool {
        self.state.load(Ordering::Acquire) == PENDING
    }

    pub(crate) fn fallback(&self) -> Option<&Fallback> {
        self.fallback.get()
    }

    fn give_up(&self, reason: Fallback) {
        tracing::debug!("vmc connection stays on TCP: {reason}");
        let _ = self.fallback.set(reason);
        self.state.store(PLAIN, Ordering::Release);
    }

    fn install(&self, channel: Channel) -> io::Result<()> {
        let ctl = dup(channel
            .control_fd()
            .ok_or_else(|| protocol("channel without a control socket"))?)?;
        let (r, w) = channel.split();
        let parts = Parts {
            reader: Mutex::new(Some(r)),
            writer: Mutex::new(Some(w)),
            ctl,
        };
        if self.parts.set(parts).is_err() {
            return Err(protocol("channel attached twice"));
        }
        self.state.store(ACCELERATED, Ordering::Release);
        Ok(())
    }

    /// Moves the handshake forward if it can without waiting. Cheap once settled.
    pub(crate) fn advance(&self) {
        if !self.is_pending() {
            return;
        }
        // Whoever holds the lock is doing this already.
        let Ok(mut setup) = self.setup.try_lock() else {
            return;
        };
        match std::mem::replace(&mut *setup, Setup::Done) {
            Setup::Offered(offer) => match offer.try_finish() {
                Ok(Ok(channel)) => {
                    if let Err(e) = self.install(channel) {
                        self.give_up(Fallback::Handshake(e.to_string()));
                    }
                }
                Ok(Err(offer)) => *setup = Setup::Offered(offer),
                Err(e) => self.give_up(Fallback::from_refusal(&e)),
            },
            Setup::Awaiting {
                rendezvous,
                deadline,
            } => {
                let key = (self.tcp.peer_addr(), self.tcp.local_addr());
                let (Ok(peer), Ok(local)) = key else {
                    return self.give_up(Fallback::Handshake(
                        "TCP connection has no addresses".into(),
                    ));
                };
                match rendezvous.take(peer, local) {
                    Some(sock) => match Channel::attach_over(
                        sock,
                        vmc_channel::ChannelConfig::from_env().spin,
                    )
                    .and_then(|ch| self.install(ch))
                    {
                        Ok(()) => {}
                        Err(e) => self.give_up(Fallback::Handshake(e.to_string())),
                    },
                    None if Instant::now() >= deadline => self.give_up(Fallback::PeerNotVmc),
                    None => {
                        *setup = Setup::Awaiting {
                            rendezvous,
                            deadline,
                        }
                    }
                }
            }
            Setup::Done => {}
        }
    }

    /// The deadline of a listener-side wait for an ATTACH, if one is running.
    fn setup_deadline(&self) -> Option<Instant> {
        match &*self.setup.try_lock().ok()? {
            Setup::Awaiting { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    fn parts(&self) -> Option<&Parts> {
        self.parts.get()
    }

    // ---- receiving ------------------------------------------------------------

    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        let started = Instant::now();
        loop {
            self.advance();
            match rx.path {
                RxPath::Shm => {
                    let ring = rx.ring.as_mut().expect("shm path has a ring");
                    let n = ring.read(buf).map_err(|e| match e.kind() {
                        // As std reports a read timeout on Linux.
                        io::ErrorKind::TimedOut => io::Error::new(io::ErrorKind::WouldBlock, e),
                        _ => e,
                    })?;
                    if n > 0 {
                        self.counters.shm_in.fetch_add(n as u64, Ordering::Relaxed);
                        return Ok(n);
                    }
                    // The ring ended: the peer moved to TCP (a SWITCH is queued), or
                    // this is the end of the stream.
                    self.receive_switches(&mut rx)?;
                    match rx.switches.front() {
                        Some(s) if s.to == Path::Tcp => {
                            let pos = rx.ring.as_ref().map_or(0, |r| r.position());
                            if s.offset != pos {
                                return Err(protocol(
                                    "peer switched to TCP at an offset the ring did not reach",
                                ));
                            }
                            rx.switches.pop_front();
                            rx.path = RxPath::Tcp { until: None };
                        }
                        Some(_) => return Err(protocol("SWITCH to shm while already on shm")),
                        None => return Ok(0),
                    }
                }
                RxPath::Tcp { until: Some(end) } if rx.tcp_in == end => {
                    if rx.ring.is_none() {
                        let mut ring = self
                            .parts()
                            .and_then(|p| lock(&p.reader).take())
                            .ok_or_else(|| protocol("SWITCH to shm without a channel"))?;
                        ring.set_nonblocking(rx.nonblocking);
                        ring.set_timeout(rx.timeout)?;
                        rx.ring = Some(ring);
                    }
                    rx.path = RxPath::Shm;
                }
                RxPath::Tcp { until } => {
                    let room = until.map_or(buf.len() as u64, |end| end - rx.tcp_in);
                    let len = room.min(buf.len() as u64) as usize;
                    let want = &mut buf[..len];
                    if until.is_some() || self.state.load(Ordering::Acquire) == PLAIN {
                        // Plain TCP, or bytes the peer already sent before moving:
                        // the socket's own blocking rules apply.
                        let n = (&self.tcp).read(want)?;
                        rx.tcp_in += n as u64;
                        self.counters.tcp_in.fetch_add(n as u64, Ordering::Relaxed);
                        return Ok(n);
                    }
                    // A SWITCH may come at any moment: take what TCP has, else wait
                    // for TCP or the control socket.
                    match recv(&self.tcp, &mut *want, RecvFlags::DONTWAIT) {
                        Ok((n, _)) => {
                            rx.tcp_in += n as u64;
                            self.counters.tcp_in.fetch_add(n as u64, Ordering::Relaxed);
                            return Ok(n);
                        }
                        Err(rustix::io::Errno::AGAIN) => {}
                        Err(rustix::io::Errno::INTR) => continue,
                        Err(e) => return Err(e.into()),
                    }
                    if self.is_accelerated() {
                        self.receive_switches(&mut rx)?;
                        if let Some(s) = rx.switches.front().copied() {
                            if s.to != Path::Shm || s.offset < rx.tcp_in {
                                return Err(protocol("unexpected SWITCH while reading TCP"));
                            }
                            rx.switches.pop_front();
                            rx.path = RxPath::Tcp {
                                until: Some(s.offset),
                            };
                            continue;
                        }
                    }
                    self.wait_rx(&rx, started)?;
                }
            }
        }
    }

    /// Reads whatever SWITCH frames the control socket has, without waiting.
    fn receive_switches(&self, rx: &mut Rx) -> io::Result<()> {
        let Some(parts) = self.parts() else {
            return Ok(());
        };
        loop {
            let at = rx.frame_len;
            match recv(&parts.ctl, &mut rx.frame[at..], RecvFlags::DONTWAIT) {
                Ok((0, _)) => return Ok(()), // peer gone; the data paths report it
                Ok((n, _)) => {
                    rx.frame_len += n;
                    if rx.frame_len == SWITCH_LEN {
                        rx.frame_len = 0;
                        let s = wire::parse_switch(&rx.frame)
                            .ok_or_else(|| protocol("malformed SWITCH"))?;
                        rx.switches.push_back(s);
                    }
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until TCP, the control socket or the handshake may have news.
    fn wait_rx(&self, rx: &Rx, started: Instant) -> io::Result<()> {
        if rx.nonblocking {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut deadline = rx.timeout.map(|t| started + t);
        if let Some(d) = self.setup_deadline() {
            deadline = Some(deadline.map_or(d, |u| u.min(d)));
        }
        let other = match (self.parts(), &self.setup_fd) {
            (Some(p), _) => Some(p.ctl.as_fd()),
            (None, Some(fd)) if self.is_pending() => Some(fd.as_fd()),
            _ => None,
        };
        let mut fds = vec![PollFd::new(&self.tcp, PollFlags::IN | PollFlags::RDHUP)];
        if let Some(o) = other {
            fds.push(PollFd::from_borrowed_fd(o, PollFlags::IN));
        }
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos() as i64,
            }
        });
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(t) = rx.timeout {
            if started.elapsed() >= t {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "vmc connection: read timed out",
                ));
            }
        }
        Ok(())
    }

    // ---- sending --------------------------------------------------------------

    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.advance();
        let mut tx = lock(&self.tx);
        if tx.shut {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "vmc connection: write after shutdown",
            ));
        }
        if tx.path != tx.want && self.is_accelerated() {
            let to = tx.want;
            self.move_tx(&mut tx, to)?;
        }
        match tx.path {
            Path::Tcp => {
                let n = (&self.tcp).write(buf)?;
                tx.tcp_out += n as u64;
                self.counters.tcp_out.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Path::Shm => {
                let n = tx.ring.as_mut().expect("shm path has a ring").write(buf)?;
                self.counters.shm_out.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
        }
    }

    fn send_switch(&self, s: Switch) -> io::Result<()> {
        let parts = self.parts().ok_or_else(|| protocol("no control socket"))?;
        let frame = wire::switch(s);
        let mut sent = 0;
        while sent < frame.len() {
            match send(&parts.ctl, &frame[sent..], SendFlags::NOSIGNAL) {
                Ok(n) => sent += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Moves our sending direction to `to` at the current byte boundary.
    fn move_tx(&self, tx: &mut Tx, to: Path) -> io::Result<()> {
        if tx.path == to {
            return Ok(());
        }
        match to {
            Path::Shm => {
                if tx.ring.is_none() {
                    tx.ring = self.parts().and_then(|p| lock(&p.writer).take());
                }
                let tcp_out = tx.tcp_out;
                let ring = tx
                    .ring
                    .as_mut()
                    .ok_or_else(|| protocol("no channel to move onto"))?;
                ring.set_nonblocking(tx.nonblocking);
                ring.set_timeout(tx.timeout)?;
                ring.resume();
                self.send_switch(Switch {
                    to: Path::Shm,
                    offset: tcp_out,
                })?;
            }
            Path::Tcp => {
                let ring = tx.ring.as_mut().expect("shm path has a ring");
                self.send_switch(Switch {
                    to: Path::Tcp,
                    offset: ring.position(),
                })?;
                ring.pause();
            }
        }
        tx.path = to;
        Ok(())
    }

    /// Chooses the path of our sending direction; the move happens now if the
    /// channel is attached, else as soon as it is.
    pub(crate) fn set_tx_path(&self, to: Path) -> io::Result<()> {
        self.advance();
        let mut tx = lock(&self.tx);
        tx.want = to;
        if self.is_accelerated() && !tx.shut {
            self.move_tx(&mut tx, to)?;
        }
        Ok(())
    }

    pub(crate) fn tx_path(&self) -> Path {
        lock(&self.tx).path
    }

    pub(crate) fn rx_path(&self) -> Path {
        match lock(&self.rx).path {
            RxPath::Shm => Path::Shm,
            RxPath::Tcp { .. } => Path::Tcp,
        }
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            let mut tx = lock(&self.tx);
            if !tx.shut {
                tx.shut = true;
                if let Some(ring) = tx.ring.as_mut() {
                    ring.shutdown();
                }
            }
        }
        self.tcp.shutdown(how)
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nonblocking(on)?;
        let mut rx = lock(&self.rx);
        rx.nonblocking = on;
        if let Some(r) = rx.ring.as_mut() {
            r.set_nonblocking(on);
        }
        drop(rx);
        let mut tx = lock(&self.tx);
        tx.nonblocking = on;
        if let Some(w) = tx.ring.as_mut() {
            w.set_nonblocking(on);
        }
        Ok(())
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)?;
        let mut rx = lock(&self.rx);
        rx.timeout = t;
        if let Some(r) = rx.ring.as_mut() {
            r.set_timeout(t)?;
        }
        Ok(())
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)?;
        let mut tx = lock(&self.tx);
        tx.timeout = t;
        if let Some(w) = tx.ring.as_mut() {
            w.set_timeout(t)?;
        }
        Ok(())
    }

    pub(crate) fn read_timeout(&self) -> Option<Duration> {
        lock(&self.rx).timeout
    }

    pub(crate) fn write_timeout(&self) -> Option<Duration> {
        lock(&self.tx).timeout
    }

    /// Raw descriptor of the TCP socket (what `AsRawFd` reports, as for std).
    pub(crate) fn raw_fd(&self) -> i32 {
        self.tcp.as_raw_fd()
    }
}
