//! One connection: a real TCP connection, and beside it (when both ends run vmc and
//! share a machine) a shared-memory channel, with each direction moving between the
//! two at exact byte boundaries.
//!
//! # Paths and boundaries
//! Every connection starts on TCP, and each direction moves between TCP and the
//! ring at exact byte boundaries, by the rules of [`crate::proto`]: its two
//! machines decide, this file does what they decide (reads and writes on TCP and
//! the ring, frames on the control channel of [`crate::control`], waits) and tells
//! them what happened. The frames a thread reads from the control channel are
//! sorted into one inbox per direction; each direction takes its own under its
//! lock ([`Conn::rx_news`], [`Conn::tx_news`]).
//!
//! A shutdown while sending on the ring ends the stream on the ring; TCP's FIN
//! follows once the direction is on TCP for good or the connection closes (a
//! REWIND may still have bytes to put on TCP).
//!
//! Every blocking wait of a writer on the peer (room in the ring, the answer to a
//! move, room in TCP) runs in slices and pleads at each (SPILL): two programs that
//! both write far ahead before reading finish, as over TCP ([`Conn::wait_ring_room`]).
//!
//! # Setting up
//! The client connects TCP and binds an offer socket named by the connection; the
//! process that accepts the connection calls it and offers the channel (see
//! [`crate::handshake`]). Neither end waits for the other: each moves the handshake
//! on whenever the program uses the connection, and the first bytes go on TCP.
//! Either end giving up leaves the connection on TCP for good. Once attached, each
//! end moves its own sending direction onto the ring at its next write.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rustix::event::epoll::EventFlags;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{recv, send, RecvFlags, SendFlags};
use vmc_channel::{Channel, Offer, ReadHalf, WriteHalf};

use crate::bell::{self, Bells, Nap};
use crate::control::{ControlChannel, Drained, UnixControl};
use crate::dirlock::{DirGuard, DirLock};
use crate::fallback::Fallback;
pub(crate) use crate::handshake::Call;
use crate::handshake::{Called, OfferSocket};
use crate::proto::{Receiver, Rewind, RxStep, Sender};
use crate::ready::{Interest, Ready, WaitSet};
use crate::stats::{flag, Counters, Home};
use crate::wire::{self, Control, Path};

/// How long the accepting side's first blocking write waits for the client to
/// answer its offer (see [`Conn::await_answer`]).
const ANSWER_WAIT: Duration = Duration::from_millis(2);

/// A blocking write that finds the ring full waits in slices this long; after each,
/// it pleads with the peer to let it go on over TCP (SPILL), and answers the
/// peer's own plea if there is one (see [`Conn::wait_ring_room`]).
const SPILL_AFTER: Duration = Duration::from_millis(50);

const PENDING: u8 = 0;
const ACCELERATED: u8 = 1;
const PLAIN: u8 = 2;

/// A handshake still in flight (see [`crate::handshake`]).
enum Setup {
    /// Client: the offer socket waits for the accepting process's call.
    Listening(Box<OfferSocket>),
    /// Accepting side: the client's offer socket was not there yet.
    Calling(Call),
    /// Accepting side: the channel is offered, the client has not answered.
    Offered(Box<Offer>),
    Done,
}

/// The channel, once attached, in pieces each direction takes when it needs them.
struct Parts {
    reader: Mutex<Option<ReadHalf>>,
    writer: Mutex<Option<WriteHalf>>,
    /// The rings' wake-up eventfds, for event loops.
    wake: vmc_channel::WakeFds,
    /// The protocol's frames to and from the peer.
    ctl: Box<dyn ControlChannel>,
}

impl Parts {
    /// What turns readable when a control frame may have come.
    fn ctl(&self) -> BorrowedFd<'_> {
        self.ctl.wait_fd()
    }
}

struct Rx {
    /// Which path to read and how far (see [`crate::proto`]).
    proto: Receiver,
    ring: Option<ReadHalf>,
    /// Set by `set_nonblocking` / `set_read_timeout`.
    nonblocking: bool,
    timeout: Option<Duration>,
}

/// What arrived on the control socket and is not used up yet: whichever thread
/// reads the socket sorts the frames into these, and each direction takes its own
/// under its lock.
#[derive(Default)]
struct CtlIn {
    /// The peer's moves and SPILLs, in order, for our receiving side.
    for_rx: VecDeque<Control>,
    /// The peer's LEFT answers and REWIND, in order, for our sending side.
    for_tx: VecDeque<Control>,
}

struct Tx {
    /// Which path to send on, where it may move (see [`crate::proto`]).
    proto: Sender,
    ring: Option<WriteHalf>,
    /// Bytes a REWIND must still put on TCP before anything else goes there.
    backlog: Vec<u8>,
    nonblocking: bool,
    timeout: Option<Duration>,
}

/// A connection's shared state (a `TcpStream` and its clones point at one).
pub(crate) struct Conn {
    pub(crate) tcp: std::net::TcpStream,
    state: AtomicU8,
    setup: Mutex<Setup>,
    /// For waiting on the handshake while it is in flight (set when there is
    /// something to wait on).
    setup_fd: OnceLock<SetupFd>,
    /// Accepting side: when the look for the client's offer socket ends.
    attach_deadline: Option<Instant>,
    /// One half may do what the other is waiting for: finish the handshake, or
    /// read a control frame meant for it from the shared socket. It then rings the
    /// other's bell, which that half polls along with its sockets, so nothing is
    /// ever waited for in vain (see [`crate::bell`]).
    bells: Bells,
    parts: OnceLock<Parts>,
    fallback: OnceLock<Fallback>,
    rx: DirLock<Rx>,
    tx: DirLock<Tx>,
    ctl_in: Mutex<CtlIn>,
    /// Byte counters and published state, visible to `vmc stat`.
    home: Home,
    /// The state bits last published (see `stats::flag`).
    flags: AtomicU32,
    /// Reads and writes that came back with `WouldBlock` (part of the readiness
    /// marks: after one, an edge-triggered waiter is owed a fresh event).
    rx_blocked: AtomicU64,
    tx_blocked: AtomicU64,
    /// For event loops: created when one first waits on this connection.
    waitset: OnceLock<WaitSet>,
    /// Event loops waiting on the wait set right now.
    waiters: AtomicU32,
    /// Of those, the ones waiting to read and to write: a ring stays armed while
    /// anyone waits for it, whoever disarms first.
    armed_for: [AtomicU32; 2],
    /// The waiters already there were kicked when a second one came (see
    /// [`Conn::arm`]); cleared when the last one leaves.
    shared_kicked: AtomicBool,
    /// Another process (a fork of this one) owns the connection: dropping it here
    /// must not touch what the processes share (see [`Conn::abandon`]).
    abandoned: AtomicBool,
    /// `ctl_in.for_tx` has frames: the sending side has news (a REWIND to serve,
    /// say), checked at every write without a lock.
    tx_mail: AtomicBool,
    /// The peer sent SPILL: it waits for room in the ring we read.
    spill_asked: AtomicBool,
    /// The sending direction is shut, and the receiving direction saw the peer's
    /// end of stream on the ring, as flags readiness can read without the other
    /// direction's lock.
    tx_shut: AtomicBool,
    rx_ended: AtomicBool,
    /// We sent our REWIND (settling on TCP, step 1).
    rx_settled: AtomicBool,
    /// A write waited for the client's answer to our offer already.
    answer_awaited: AtomicBool,
    /// The control socket reached its end (the peer closed it, exec'd or died):
    /// waits stop watching it.
    ctl_eof: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a direction's lock leaves its state consistent enough
    // to report errors; never turn it into a second panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Adds `n` to a counter that only one thread at a time writes (the receive counters
/// under the rx lock, the send counters under the tx lock): a plain load and store,
/// no locked instruction on the data path; readers in other processes see either
/// value.
#[inline]
fn bump(counter: &AtomicU64, n: usize) {
    counter.store(
        counter.load(Ordering::Relaxed) + n as u64,
        Ordering::Relaxed,
    );
}

fn busy() -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        "vmc connection: another thread holds the connection",
    )
}

/// Locks `m`, trying until `deadline` (another thread may hold it for a blocking
/// call that never ends).
fn lock_until<T>(m: &DirLock<T>, deadline: Instant) -> Option<DirGuard<'_, T>> {
    loop {
        match m.try_lock() {
            Some(g) => return Some(g),
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
            None => return None,
        }
    }
}

/// What a pending connection polls for its handshake's progress.
enum SetupFd {
    /// Accepting side: a duplicate of the handshake socket (the offer holding it
    /// goes away when the handshake ends).
    Offer(OwnedFd),
    /// Client: the offer socket, readable when the call comes.
    Listening(Arc<std::os::unix::net::UnixListener>),
}

impl AsFd for SetupFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            SetupFd::Offer(fd) => fd.as_fd(),
            SetupFd::Listening(l) => l.as_fd(),
        }
    }
}

/// A REWIND from offset 0 on a handshake socket (the peer's control socket if it
/// attached; ignored otherwise): moves the peer's sending direction to TCP for
/// good, with everything it put on the ring.
fn retract(fd: BorrowedFd<'_>) {
    let _ = send(
        fd,
        &wire::rewind(0),
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    );
}

/// A connection's (local, peer) addresses, when the caller knows them already.
pub(crate) type Addrs = Option<(SocketAddr, SocketAddr)>;

fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    vmc_os::fdspace::dup(fd)
}

/// As std reports a read timeout on Linux.
fn read_timeout(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::TimedOut => io::Error::new(io::ErrorKind::WouldBlock, e),
        _ => e,
    }
}

/// What a read would find now.
enum RxReady {
    No,
    Bytes,
    End,
}

/// Options of one read, as `recv(2)` flags.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ReadOpts {
    /// `MSG_PEEK`: leave the bytes for the next read.
    pub(crate) peek: bool,
    /// `MSG_DONTWAIT`: this read does not wait, whatever the connection's mode.
    pub(crate) dontwait: bool,
}

fn peer_gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "vmc connection: the peer died without closing",
    )
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("vmc connection: {msg}"))
}

impl Conn {
    fn new(
        tcp: std::net::TcpStream,
        state: u8,
        setup: Setup,
        setup_fd: Option<SetupFd>,
        addrs: Addrs,
    ) -> Conn {
        let setup_fd = match setup_fd {
            Some(fd) => OnceLock::from(fd),
            None => OnceLock::new(),
        };
        let home = match addrs {
            Some((local, peer)) => Home::new(Some(local), Some(peer)),
            None => Home::new(tcp.local_addr().ok(), tcp.peer_addr().ok()),
        };
        let c = Conn {
            tcp,
            state: AtomicU8::new(state),
            setup: Mutex::new(setup),
            setup_fd,
            attach_deadline: None,
            bells: Bells::default(),
            parts: OnceLock::new(),
            fallback: OnceLock::new(),
            rx: DirLock::new(Rx {
                proto: Receiver::new(),
                ring: None,
                nonblocking: false,
                timeout: None,
            }),
            tx: DirLock::new(Tx {
                proto: Sender::new(),
                ring: None,
                backlog: Vec::new(),
                nonblocking: false,
                timeout: None,
            }),
            ctl_in: Mutex::new(CtlIn::default()),
            home,
            flags: AtomicU32::new(0),
            rx_blocked: AtomicU64::new(0),
            tx_blocked: AtomicU64::new(0),
            waitset: OnceLock::new(),
            waiters: AtomicU32::new(0),
            armed_for: [AtomicU32::new(0), AtomicU32::new(0)],
            shared_kicked: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            tx_mail: AtomicBool::new(false),
            spill_asked: AtomicBool::new(false),
            tx_shut: AtomicBool::new(false),
            rx_ended: AtomicBool::new(false),
            rx_settled: AtomicBool::new(false),
            answer_awaited: AtomicBool::new(false),
            ctl_eof: AtomicBool::new(false),
        };
        c.publish(flag::PENDING, state == PENDING);
        c
    }

    /// Sets or clears a state bit, and the copy `vmc stat` reads.
    fn publish(&self, bit: u32, on: bool) {
        let old = if on {
            self.flags.fetch_or(bit, Ordering::AcqRel)
        } else {
            self.flags.fetch_and(!bit, Ordering::AcqRel)
        };
        let new = if on { old | bit } else { old & !bit };
        self.home.set_flags(new);
    }

    pub(crate) fn counters(&self) -> &Counters {
        self.home.counters()
    }

    /// A connection that stays plain TCP, for `reason`.
    pub(crate) fn plain(tcp: std::net::TcpStream, reason: Fallback) -> Conn {
        let c = Conn::new(tcp, PLAIN, Setup::Done, None, None);
        let _ = c.fallback.set(reason);
        c
    }

    /// Client side: the offer socket is bound; the accepting process will call.
    pub(crate) fn listening(tcp: std::net::TcpStream, sock: OfferSocket, addrs: Addrs) -> Conn {
        let watch = SetupFd::Listening(sock.watch());
        let setup = Setup::Listening(Box::new(sock));
        Conn::new(tcp, PENDING, setup, Some(watch), addrs)
    }

    /// Accepting side: looks for the client's offer socket now, and again as the
    /// connection is used (see [`crate::handshake`]).
    pub(crate) fn calling(tcp: std::net::TcpStream, call: Call) -> Conn {
        let deadline = call.deadline();
        let addrs = Some((call.local(), call.peer()));
        let mut c = Conn::new(tcp, PENDING, Setup::Calling(call), None, addrs);
        c.attach_deadline = Some(deadline);
        c.advance();
        c
    }

    pub(crate) fn is_accelerated(&self) -> bool {
        self.state.load(Ordering::Acquire) == ACCELERATED
    }

    fn is_plain(&self) -> bool {
        self.state.load(Ordering::Acquire) == PLAIN
    }

    pub(crate) fn is_pending(&self) -> bool {
        self.state.load(Ordering::Acquire) == PENDING
    }

    pub(crate) fn fallback(&self) -> Option<&Fallback> {
        self.fallback.get()
    }

    fn give_up(&self, reason: Fallback) {
        tracing::debug!("vmc connection stays on TCP: {reason}");
        let code = crate::stats::FALLBACK_CODES
            .iter()
            .position(|c| *c == reason.code())
            .map_or(0, |i| i + 1);
        let _ = self.fallback.set(reason);
        self.state.store(PLAIN, Ordering::Release);
        self.bells.ring(bell::RX);
        self.publish((code as u32) << flag::FALLBACK_SHIFT, true);
        self.publish(flag::PENDING, false);
    }

    fn install(&self, channel: Channel) -> io::Result<()> {
        let ctl = UnixControl::new(channel.wake_fds())
            .ok_or_else(|| protocol("channel without a control socket"))?;
        let wake = channel.wake_fds();
        let (r, w) = channel.split();
        let parts = Parts {
            reader: Mutex::new(Some(r)),
            writer: Mutex::new(Some(w)),
            wake,
            ctl: Box::new(ctl),
        };
        if self.parts.set(parts).is_err() {
            return Err(protocol("channel attached twice"));
        }
        self.state.store(ACCELERATED, Ordering::Release);
        self.bells.ring(bell::RX);
        self.publish(flag::ACCELERATED, true);
        self.publish(flag::PENDING, false);
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
            Setup::Listening(mut sock) => {
                let spin = vmc_channel::ChannelConfig::from_env().spin;
                let tcp_in = self.counters().tcp_in.load(Ordering::Relaxed);
                match sock.answer(self.tcp.as_fd(), tcp_in, spin) {
                    Ok(Some(channel)) => {
                        if let Err(e) = self.install(channel) {
                            self.give_up(Fallback::Handshake(e.to_string()));
                        }
                    }
                    Ok(None) => *setup = Setup::Listening(sock),
                    Err(reason) => self.give_up(reason),
                }
            }
            Setup::Calling(mut call) => {
                let tcp_in = self.counters().tcp_in.load(Ordering::Relaxed);
                if !call.due(tcp_in) {
                    *setup = Setup::Calling(call);
                    return;
                }
                match call.call(tcp_in, self.tcp.as_fd()) {
                    Called::Offered(offer) => match dup(offer.fd()) {
                        Ok(watch) => {
                            let _ = self.setup_fd.set(SetupFd::Offer(watch));
                            *setup = Setup::Offered(offer);
                        }
                        Err(e) => {
                            retract(offer.fd());
                            self.give_up(Fallback::Handshake(e.to_string()));
                        }
                    },
                    Called::NotYet => *setup = Setup::Calling(call),
                    Called::Never(reason) => self.give_up(reason),
                }
            }
            Setup::Offered(offer) => match (*offer).try_finish() {
                Ok(Ok(channel)) => {
                    if let Err(e) = self.install(channel) {
                        self.retract_offer();
                        self.give_up(Fallback::Handshake(e.to_string()));
                    }
                }
                Ok(Err(offer)) => *setup = Setup::Offered(Box::new(offer)),
                Err(e) => {
                    self.retract_offer();
                    self.give_up(Fallback::from_refusal(&e));
                }
            },
            Setup::Done => {}
        }
    }

    /// Offering side, the handshake failed here: the client may have attached the
    /// channel already (it failed on our side, say with no descriptor left for
    /// the ACK's) and be about to send on its ring, which we will never read.
    fn retract_offer(&self) {
        if let Some(SetupFd::Offer(fd)) = self.setup_fd.get() {
            retract(fd.as_fd());
        }
    }

    /// The deadline of a listener-side wait for an ATTACH, while it runs.
    fn setup_deadline(&self) -> Option<Instant> {
        self.attach_deadline.filter(|_| self.is_pending())
    }

    fn parts(&self) -> Option<&Parts> {
        self.parts.get()
    }

    // ---- receiving ------------------------------------------------------------

    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_opts(buf, ReadOpts::default())
    }

    /// Reads like `recv(2)` with `opts` (`MSG_PEEK`, `MSG_DONTWAIT`).
    pub(crate) fn read_opts(&self, buf: &mut [u8], opts: ReadOpts) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = self.rx.lock();
        let r = match self.read_locked(&mut rx, buf, opts) {
            // The peer's process is gone and every byte it sent was read. TCP would
            // show a FIN here (the kernel closes a dead process's sockets), unless the
            // dead end left received bytes unread (then a reset): do the same.
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionReset
                    && rx.proto.path() == Path::Shm
                    && self.peer_left_nothing_unread() =>
            {
                Ok(0)
            }
            r => r,
        };
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.rx_blocked.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn read_locked(&self, rx: &mut Rx, buf: &mut [u8], opts: ReadOpts) -> io::Result<usize> {
        let nonblocking = rx.nonblocking || opts.dontwait;
        // Read the clock only if this read has to wait (it costs as much as the rest
        // of a ring read).
        let mut started = None;
        loop {
            // Before looking: a bell rung from here on ends the wait below (TCP
            // paths only) at once.
            let mark = match rx.proto.path() {
                Path::Tcp => self.bells.mark(bell::RX),
                Path::Shm => 0,
            };
            self.advance();
            match rx.proto.step() {
                RxStep::Ring => {
                    let ring = rx.ring.as_mut().expect("shm path has a ring");
                    let n = if opts.peek || opts.dontwait {
                        if !ring.is_ready() {
                            if nonblocking {
                                // A dead peer must not look like "try again" forever.
                                if !ring.peer_alive() && !ring.is_ready() {
                                    return Err(peer_gone());
                                }
                                return Err(io::ErrorKind::WouldBlock.into());
                            }
                            ring.wait_ready().map_err(read_timeout)?;
                        }
                        if opts.peek {
                            ring.peek(buf)?
                        } else {
                            ring.read(buf)?
                        }
                    } else {
                        ring.read(buf).map_err(read_timeout)?
                    };
                    if n > 0 {
                        if !opts.peek {
                            rx.proto.read_ring(n);
                            bump(&self.counters().shm_in, n);
                        }
                        return Ok(n);
                    }
                    // The ring ended: the peer moved to TCP (a SWITCH is queued), or
                    // this is the end of the stream.
                    if !self.leave_ring(rx)? {
                        self.rx_ended.store(true, Ordering::Release);
                        return Ok(0);
                    }
                }
                RxStep::EnterRing => self.enter_ring(rx)?,
                RxStep::Tcp { limit } => {
                    let len = limit.map_or(buf.len(), |room| room.min(buf.len() as u64) as usize);
                    let want = &mut buf[..len];
                    let mut flags = RecvFlags::empty();
                    if opts.peek {
                        flags |= RecvFlags::PEEK;
                    }
                    if opts.dontwait {
                        flags |= RecvFlags::DONTWAIT;
                    }
                    if limit.is_some() || self.state.load(Ordering::Acquire) == PLAIN {
                        // Plain TCP, or bytes the peer already sent before moving:
                        // the socket's own blocking rules apply.
                        let (n, _) = recv(&self.tcp, &mut *want, flags)?;
                        if !opts.peek {
                            rx.proto.read_tcp(n);
                            bump(&self.counters().tcp_in, n);
                            if n > 0 && n < buf.len() && rx.proto.step() == RxStep::EnterRing {
                                // The TCP stretch ended inside this read: like the
                                // kernel, return what the ring has too (no waiting).
                                self.enter_ring(rx)?;
                                return Ok(n + self.ring_read_ready(rx, &mut buf[n..])?);
                            }
                        }
                        return Ok(n);
                    }
                    // A SWITCH may come at any moment: take what TCP has, else wait
                    // for TCP or the control socket.
                    match recv(&self.tcp, &mut *want, flags | RecvFlags::DONTWAIT) {
                        // TCP ended. If the peer moved to the ring first, the end of
                        // the stream is there (its SWITCH is queued): follow it.
                        Ok((0, _)) if self.is_accelerated() && self.rx_news(rx)? => {}
                        Ok((n, _)) => {
                            if opts.peek {
                                return Ok(n);
                            }
                            rx.proto.read_tcp(n);
                            bump(&self.counters().tcp_in, n);
                            if self.is_pending() {
                                // The peer's first bytes: a vmc client has bound its
                                // offer socket by now (see `crate::handshake`).
                                self.advance();
                            }
                            // A short read may end exactly where the peer moved to
                            // the ring: like the kernel, return what follows too.
                            if n < buf.len()
                                && self.is_accelerated()
                                && self.follow_to_ring(rx)?
                                && rx.proto.step() == RxStep::EnterRing
                            {
                                self.enter_ring(rx)?;
                                return Ok(n + self.ring_read_ready(rx, &mut buf[n..])?);
                            }
                            return Ok(n);
                        }
                        Err(rustix::io::Errno::AGAIN) => {}
                        Err(rustix::io::Errno::INTR) => continue,
                        Err(e) => return Err(e.into()),
                    }
                    if self.is_accelerated() && self.follow_to_ring(rx)? {
                        continue;
                    }
                    let since = *started.get_or_insert_with(Instant::now);
                    self.wait_rx(rx, nonblocking, since, mark)?;
                }
            }
        }
    }

    /// Reads what the ring holds right now into `buf`, without waiting.
    fn ring_read_ready(&self, rx: &mut Rx, buf: &mut [u8]) -> io::Result<usize> {
        let Some(ring) = rx.ring.as_mut() else {
            return Ok(0);
        };
        if buf.is_empty() || ring.available()? == 0 {
            return Ok(0);
        }
        let n = ring.read(buf)?;
        rx.proto.read_ring(n);
        bump(&self.counters().shm_in, n);
        Ok(n)
    }

    /// True if the peer took everything we sent it over the ring (our sending ring is
    /// empty, or we never used it). Unknown (a writer busy) counts as false.
    fn peer_left_nothing_unread(&self) -> bool {
        match self.tx.try_lock() {
            Some(mut tx) => match tx.ring.as_mut() {
                Some(w) => w.queued() == 0,
                None => true,
            },
            None => false,
        }
    }

    /// The ring ended: if the peer moved this direction to TCP (its SWITCH is
    /// queued), follow it and return true; false at the real end of the stream.
    fn leave_ring(&self, rx: &mut Rx) -> io::Result<bool> {
        self.rx_news(rx)?;
        debug_assert_eq!(
            rx.ring.as_ref().map(|r| r.position()),
            Some(rx.proto.received(Path::Shm))
        );
        match rx.proto.ring_ended()? {
            Some(answer) => {
                self.publish(flag::RX_SHM, false);
                self.answer(answer);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// TCP delivered every byte the peer sent before moving to the ring: read the
    /// ring from now on.
    fn enter_ring(&self, rx: &mut Rx) -> io::Result<()> {
        if rx.ring.is_none() {
            let mut ring = self
                .parts()
                .and_then(|p| lock(&p.reader).take())
                .ok_or_else(|| protocol("SWITCH to shm without a channel"))?;
            ring.set_nonblocking(rx.nonblocking);
            ring.set_timeout(rx.timeout)?;
            rx.ring = Some(ring);
        }
        let answer = rx.proto.enter_ring();
        self.publish(flag::RX_SHM, true);
        self.answer(answer);
        Ok(())
    }

    /// Reading TCP with no end known: if the peer announced a move to the ring,
    /// learn where TCP ends (true).
    fn follow_to_ring(&self, rx: &mut Rx) -> io::Result<bool> {
        self.rx_news(rx)?;
        Ok(rx.proto.follow()?)
    }

    /// Reads the control socket and hands the receiving side the peer's moves;
    /// true if one is waiting to be followed.
    fn rx_news(&self, rx: &mut Rx) -> io::Result<bool> {
        self.pump_control()?;
        let frames = std::mem::take(&mut lock(&self.ctl_in).for_rx);
        for f in frames {
            match f {
                Control::Switch(s) => rx.proto.on_switch(s)?,
                Control::Spill(at) => rx.proto.on_spill(at)?,
                _ => unreachable!("sorted to the sending side"),
            }
        }
        Ok(rx.proto.has_switch())
    }

    /// Hands the sending side the frames meant for it (LEFT answers, a REWIND).
    fn tx_news(&self, tx: &mut Tx) -> io::Result<()> {
        if !self.tx_mail.load(Ordering::Acquire) {
            return Ok(());
        }
        let frames = {
            let mut ctl = lock(&self.ctl_in);
            self.tx_mail.store(false, Ordering::Release);
            std::mem::take(&mut ctl.for_tx)
        };
        for f in frames {
            match f {
                Control::LeftTcp(at) => tx.proto.on_left(Path::Tcp, at)?,
                Control::LeftRing(at) => tx.proto.on_left(Path::Shm, at)?,
                Control::Rewind(from) => tx.proto.on_rewind(from),
                Control::Switch(_) | Control::Spill(_) => {
                    unreachable!("sorted to the receiving side")
                }
            }
        }
        Ok(())
    }

    /// Reads whatever control frames the socket has, without waiting. A REWIND
    /// among them is served right away if the sending side is free (else by the
    /// thread that holds it, see [`Conn::serve_rewind`]).
    fn pump_control(&self) -> io::Result<()> {
        self.read_control()?;
        if self.tx_mail.load(Ordering::Acquire) {
            if let Some(mut tx) = self.tx.try_lock() {
                if let Err(e) = self.serve_rewind(&mut tx) {
                    tracing::debug!("vmc connection: serving a rewind: {e}");
                }
            }
        }
        Ok(())
    }

    fn read_control(&self) -> io::Result<()> {
        let Some(parts) = self.parts() else {
            return Ok(());
        };
        if self.ctl_eof.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut ctl = lock(&self.ctl_in);
        let ctl = &mut *ctl;
        let drained = parts.ctl.drain(&mut |frame| match frame {
            Control::Switch(_) => {
                ctl.for_rx.push_back(frame);
                self.bells.ring(bell::RX);
            }
            Control::Spill(_) => {
                ctl.for_rx.push_back(frame);
                self.spill_asked.store(true, Ordering::Release);
            }
            Control::LeftRing(_) | Control::LeftTcp(_) | Control::Rewind(_) => {
                ctl.for_tx.push_back(frame);
                self.tx_mail.store(true, Ordering::Release);
                self.bells.ring(bell::TX);
            }
        })?;
        // The peer is gone (or exec'd): the data paths report it (as EOF after its
        // last byte, or as a reset), the control channel has nothing more to say.
        if drained == Drained::Closed {
            self.ctl_eof.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Waits until TCP, the control socket or the handshake may have news.
    /// `mark`: [`Bells::mark`] taken before the caller looked.
    fn wait_rx(&self, rx: &Rx, nonblocking: bool, started: Instant, mark: u64) -> io::Result<()> {
        if nonblocking {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut deadline = rx.timeout.map(|t| started + t);
        if let Some(d) = self.setup_deadline() {
            deadline = Some(deadline.map_or(d, |u| u.min(d)));
        }
        let other = match (self.parts(), self.setup_fd.get()) {
            (Some(_), _) if self.ctl_eof.load(Ordering::Acquire) => None,
            (Some(p), _) => Some(p.ctl()),
            (None, Some(fd)) if self.is_pending() => Some(fd.as_fd()),
            _ => None,
        };
        let mut fds = vec![PollFd::new(&self.tcp, PollFlags::IN | PollFlags::RDHUP)];
        if let Some(o) = other {
            fds.push(PollFd::from_borrowed_fd(o, PollFlags::IN));
        }
        let mut nap = None;
        if !self.is_plain() {
            match self.bells.sleep(bell::RX, mark) {
                Nap::Sleep(s) => nap = Some(s),
                Nap::Rung => return Ok(()),
                // No bell: look again soon.
                Nap::NoBell => {
                    let slice = Instant::now() + Duration::from_millis(50);
                    deadline = Some(deadline.map_or(slice, |d| d.min(slice)));
                }
            }
        }
        if let Some(s) = &nap {
            fds.push(PollFd::from_borrowed_fd(s.fd(), PollFlags::IN));
        }
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos() as i64,
            }
        });
        let polled = poll(&mut fds, timeout.as_ref());
        let fired = nap.is_some() && !fds[fds.len() - 1].revents().is_empty();
        drop(fds);
        if let Some(s) = &mut nap {
            s.fired = fired;
        }
        drop(nap);
        match polled {
            Err(rustix::io::Errno::INTR) if vmc_os::interrupt::pending() => {
                return Err(vmc_os::interrupt::error())
            }
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if vmc_os::interrupt::pending() {
            return Err(vmc_os::interrupt::error());
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
        self.write_opts(buf, false)
    }

    /// Writes like `send(2)`; `dontwait` is `MSG_DONTWAIT`. Never raises SIGPIPE: a
    /// closed peer is a `BrokenPipe` error.
    pub(crate) fn write_opts(&self, buf: &[u8], dontwait: bool) -> io::Result<usize> {
        self.advance();
        let mut tx = self.tx.lock();
        if self.is_pending() && !(dontwait || tx.nonblocking) {
            self.await_answer();
        }
        let r = self.write_locked(&mut tx, buf, dontwait);
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.tx_blocked.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Accepting side, a blocking write while the offer waits for the client's
    /// answer: a client waiting for this reply (blocked in a read) answers within
    /// microseconds, and waiting that long puts the reply on the ring instead of
    /// TCP. Once per connection, at most [`ANSWER_WAIT`]; never for a write that
    /// must not block (an event loop's, which goes on TCP).
    fn await_answer(&self) {
        let Some(SetupFd::Offer(fd)) = self.setup_fd.get() else {
            return;
        };
        if self.answer_awaited.swap(true, Ordering::Relaxed) {
            return;
        }
        let wait = Timespec {
            tv_sec: 0,
            tv_nsec: ANSWER_WAIT.as_nanos() as i64,
        };
        let mut fds = [PollFd::from_borrowed_fd(fd.as_fd(), PollFlags::IN)];
        let _ = poll(&mut fds, Some(&wait));
        self.advance();
    }

    fn write_locked(&self, tx: &mut Tx, buf: &[u8], dontwait: bool) -> io::Result<usize> {
        if tx.proto.is_shut() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "vmc connection: write after shutdown",
            ));
        }
        if let Some(to) = self.home.take_request() {
            // `vmc migrate`: as `set_tx_path`, at this write (the ring is refused
            // once the direction is on TCP for good).
            let _ = tx.proto.choose(to);
        }
        self.serve_rewind(tx)?;
        if !tx.backlog.is_empty() && !self.flush_backlog(tx, dontwait)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if tx.proto.path() != tx.proto.wants() && self.is_accelerated() {
            let to = tx.proto.wants();
            match self.move_tx(tx, to, dontwait) {
                // A REWIND came meanwhile and was served: its bytes go first.
                Ok(true) => return self.write_locked(tx, buf, dontwait),
                Ok(false) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                // The control socket is gone with the peer: there is nobody to
                // announce a move to, so stay on this path and let it report the
                // peer's state (as TCP would: one more write, then EPIPE).
                Err(e) => {
                    tracing::debug!("vmc connection: cannot move sending to {to:?}: {e}");
                    tx.proto.stay();
                }
            }
        }
        match tx.proto.path() {
            Path::Tcp => {
                if self.is_accelerated() && self.ring_unread(tx) {
                    // Off the ring with bytes the peer has not read: nothing may
                    // go on TCP before its answer (see `Sender::tcp_waits_for_ring`).
                    self.wait_for_peer(tx, dontwait, |c, tx| !c.ring_unread(tx))?;
                    return self.write_locked(tx, buf, dontwait);
                }
                let mut flags = SendFlags::NOSIGNAL;
                // While the ring carries the other direction, a blocking send
                // must hear the peer's pleas as it waits (see `wait_tcp_room`).
                let sliced = !dontwait
                    && !tx.nonblocking
                    && tx.timeout.is_none()
                    && !buf.is_empty()
                    && self.is_accelerated();
                if dontwait || sliced {
                    flags |= SendFlags::DONTWAIT;
                }
                let n = loop {
                    match send(&self.tcp, buf, flags) {
                        Err(rustix::io::Errno::AGAIN) if sliced => self.wait_tcp_room(tx, None)?,
                        Err(rustix::io::Errno::INTR) if sliced => {}
                        r => break r?,
                    }
                };
                tx.proto.wrote(n);
                bump(&self.counters().tcp_out, n);
                Ok(n)
            }
            Path::Shm => {
                if !dontwait && !tx.nonblocking && tx.timeout.is_none() && !buf.is_empty() {
                    self.wait_ring_room(tx)?;
                }
                let ring = tx.ring.as_mut().expect("shm path has a ring");
                if dontwait && !buf.is_empty() && !ring.is_ready() {
                    if !ring.peer_alive() {
                        return Err(peer_gone());
                    }
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                match ring.write(buf) {
                    Ok(n) => {
                        tx.proto.wrote(n);
                        bump(&self.counters().shm_out, n);
                        Ok(n)
                    }
                    // The peer closed its end to read on from TCP (its REWIND is
                    // queued on the control socket): go there.
                    Err(e)
                        if e.kind() == io::ErrorKind::BrokenPipe
                            && self.read_control().is_ok()
                            && self.tx_news(tx).is_ok()
                            && tx.proto.rewind_asked() =>
                    {
                        self.serve_rewind(tx)?;
                        self.write_locked(tx, buf, dontwait)
                    }
                    // The peer closed its end. Do what TCP does: the first write after
                    // the peer's close still succeeds and draws a reset, later ones
                    // fail (EPIPE), and poll reports the error and the hang-up.
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                        let n = send(&self.tcp, buf, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)?;
                        bump(&self.counters().tcp_out, n);
                        Ok(n)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// A blocking write (no timeout) waits for room in the ring, in slices of
    /// [`SPILL_AFTER`]. Two programs that each write more than a ring holds before
    /// reading would otherwise wait for each other for ever, where TCP's buffers
    /// (megabytes) let them finish. After each slice: if the peer pleaded (SPILL)
    /// while we wait here, and so do not read, our receiving direction goes to TCP
    /// for good (REWIND), which frees the peer; and we plead ourselves. Returns
    /// once a write would not wait (room, the reader closed, the peer died).
    fn wait_ring_room(&self, tx: &mut Tx) -> io::Result<()> {
        loop {
            let ring = tx.ring.as_mut().expect("shm path has a ring");
            if ring.is_ready() {
                return Ok(());
            }
            ring.set_timeout(Some(SPILL_AFTER))?;
            let waited = ring.wait_ready();
            ring.set_timeout(None)?;
            match waited {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                // Room, or an error the write itself reports.
                _ => return Ok(()),
            }
            if vmc_os::interrupt::pending() {
                return Err(vmc_os::interrupt::error());
            }
            self.plead(tx)?;
        }
    }

    /// Waits until TCP takes more (or `limit` passes: then `WouldBlock`). While the
    /// connection is accelerated, in slices of [`SPILL_AFTER`] after which it
    /// answers the peer's plea: the peer may wait for room in the ring we read,
    /// while we wait for it to read TCP (see [`Conn::wait_ring_room`]).
    fn wait_tcp_room(&self, tx: &mut Tx, limit: Option<Duration>) -> io::Result<()> {
        let started = Instant::now();
        loop {
            let mut slice = limit.map(|l| l.saturating_sub(started.elapsed()));
            if slice.is_some_and(|s| s.is_zero()) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let sliced = self.is_accelerated();
            if sliced {
                slice = Some(slice.map_or(SPILL_AFTER, |s| s.min(SPILL_AFTER)));
            }
            let ts = slice.map(|d| Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            });
            let mut fds = [PollFd::new(&self.tcp, PollFlags::OUT)];
            match poll(&mut fds, ts.as_ref()) {
                Ok(0) if sliced => {
                    if vmc_os::interrupt::pending() {
                        return Err(vmc_os::interrupt::error());
                    }
                    self.plead(tx)?;
                }
                Ok(0) => {}
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {
                    if vmc_os::interrupt::pending() {
                        return Err(vmc_os::interrupt::error());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A blocking write has waited a slice for the peer in vain: answer the
    /// peer's plea if it made one (both of us wait, neither reads), and plead.
    fn plead(&self, tx: &mut Tx) -> io::Result<()> {
        self.read_control()?;
        if self.spill_asked.load(Ordering::Acquire) {
            self.answer_spill()?;
        }
        if let Some(plea) = tx.proto.spill() {
            tracing::debug!("vmc connection: a write waits for the peer; pleading {plea:?}");
            self.send_control(plea)?;
        }
        Ok(())
    }

    /// The peer waits for room in the ring we read, and we wait in a write: move
    /// our receiving direction to TCP for good, so that the peer goes on there.
    fn answer_spill(&self) -> io::Result<()> {
        // A reader holding the lock is reading: the peer's wait ends without us.
        let Some(mut rx) = self.rx.try_lock() else {
            return Ok(());
        };
        self.rx_news(&mut rx)?;
        self.spill_asked.store(false, Ordering::Release);
        // Where the ring we read ends now: a plea made there is current.
        let parts = self.parts().ok_or_else(|| protocol("no channel"))?;
        let end = match rx.ring.as_mut() {
            Some(ring) => ring.position() + ring.arrived()? as u64,
            None => match lock(&parts.reader).as_mut() {
                Some(ring) => ring.position() + ring.arrived()? as u64,
                None => return Ok(()),
            },
        };
        if !rx.proto.spill_asked(end) {
            return Ok(());
        }
        tracing::debug!(
            "vmc connection: both ends wait for room in a ring; the peer's bytes to us \
             go on over TCP"
        );
        self.settle_rx_locked(&mut rx)
    }

    /// True if TCP must wait for the peer's answer to our move off the ring: it
    /// has not said it read the ring to the end, and the ring is not empty.
    fn ring_unread(&self, tx: &mut Tx) -> bool {
        let _ = self.tx_news(tx);
        tx.proto.tcp_waits_for_ring() && tx.ring.as_mut().is_some_and(|r| r.queued() > 0)
    }

    /// Serves the peer's REWIND, if one is queued: our sending direction moves to
    /// TCP for good, starting with every byte the peer did not read from the ring.
    /// Called with the sending side locked, by whichever thread gets there first
    /// (a writer, an event loop's readiness check, a reader pumping the control
    /// socket).
    fn serve_rewind(&self, tx: &mut Tx) -> io::Result<()> {
        self.tx_news(tx)?;
        let Some(plan) = tx.proto.serve_rewind()? else {
            return Ok(());
        };
        match plan {
            Rewind::Resend { from, pause } => {
                let ring = tx
                    .ring
                    .as_mut()
                    .ok_or_else(|| protocol("REWIND of a ring never written"))?;
                let back = ring.take_back(from).map_err(|e| {
                    protocol(&format!("REWIND to an offset the ring cannot give: {e}"))
                })?;
                if pause {
                    ring.pause();
                    self.publish(flag::TX_SHM, false);
                }
                tracing::debug!(
                    "vmc connection: the peer stopped reading the ring at {from}; {} \
                     byte(s) go again, on TCP, ahead of everything after them",
                    back.len()
                );
                tx.backlog = back;
            }
            Rewind::Nothing => {}
            Rewind::Lost { from, at } => tracing::warn!(
                "vmc connection: the peer asked for the ring's bytes from {from} again, \
                 but we left the ring at {at} and sent on TCP since: they cannot be sent again"
            ),
        }
        self.flush_backlog(tx, true)?;
        Ok(())
    }

    /// Puts what a REWIND gave back on TCP, before anything else goes there; then
    /// the FIN a shutdown owes. Without `dontwait` this waits for room as the
    /// direction's mode says. True once the backlog is gone.
    fn flush_backlog(&self, tx: &mut Tx, dontwait: bool) -> io::Result<bool> {
        let started = Instant::now();
        while !tx.backlog.is_empty() {
            match send(
                &self.tcp,
                &tx.backlog,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(n) => {
                    tx.backlog.drain(..n);
                    tx.proto.wrote(n);
                    bump(&self.counters().tcp_out, n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    if dontwait || tx.nonblocking {
                        return Ok(false);
                    }
                    let left = match tx.timeout {
                        Some(t) => match t.checked_sub(started.elapsed()) {
                            Some(left) => Some(left),
                            None => return Err(io::ErrorKind::WouldBlock.into()),
                        },
                        None => None,
                    };
                    self.wait_tcp_room(tx, left)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        tx.backlog = Vec::new();
        if tx.proto.backlog_sent() {
            self.tcp.shutdown(Shutdown::Write)?;
        }
        Ok(true)
    }

    /// Moves both directions to TCP for good, at exact byte boundaries, without
    /// waiting for the peer to act (before exec: the new program image cannot use
    /// the rings). Receiving: we stop reading the ring and tell the peer where
    /// (REWIND); it sends everything from there on TCP, whenever it next runs.
    /// Sending: as [`Conn::set_tx_path`] to TCP, which may need the peer's answer
    /// to an earlier move; `patience` bounds that wait, and the wait for another
    /// thread of ours that holds a direction.
    pub(crate) fn settle_on_tcp(&self, patience: Duration) -> io::Result<()> {
        let deadline = Instant::now() + patience;
        self.settle_receiving(deadline)?;
        self.settle_sending(deadline)
    }

    /// [`Conn::settle_on_tcp`], first step: the receiving direction (REWIND).
    /// Doing it for every connection before the second step lets two ends that
    /// settle at once (in one process, before exec) each find the other's REWIND
    /// when they move their sending direction.
    pub(crate) fn settle_receiving(&self, deadline: Instant) -> io::Result<()> {
        // Only an offer made may have a channel on the other side already: wait
        // for its answer, give anything earlier up at once.
        let offered = || matches!(*lock(&self.setup), Setup::Offered(_));
        while self.is_pending() && offered() && Instant::now() < deadline {
            self.advance();
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.is_pending() {
            // For good means now: the handshake ends here, unfinished (the peer
            // falls back when its side of it goes away).
            let mut setup = lock(&self.setup);
            if self.is_pending() {
                *setup = Setup::Done;
                self.give_up(Fallback::Handshake(
                    "moved to TCP for good before the handshake finished".into(),
                ));
            }
        }
        if !self.is_accelerated() || self.rx_settled.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut rx = lock_until(&self.rx, deadline).ok_or_else(busy)?;
        if !self.is_accelerated() || self.rx_settled.load(Ordering::Acquire) {
            // Another thread settled it while we waited for the lock.
            return Ok(());
        }
        self.settle_rx_locked(&mut rx)
    }

    /// Stops reading the ring for good: REWIND tells the peer from where to send
    /// everything again, on TCP.
    fn settle_rx_locked(&self, rx: &mut Rx) -> io::Result<()> {
        let parts = self.parts().ok_or_else(|| protocol("no channel"))?;
        let reader = rx.ring.take().or_else(|| lock(&parts.reader).take());
        debug_assert_eq!(
            reader.as_ref().map_or(0, |r| r.position()),
            rx.proto.received(Path::Shm)
        );
        // From here on the receiving side reads TCP only, whatever the peer says.
        let rewind = rx.proto.settle();
        self.publish(flag::RX_SHM, false);
        self.rx_settled.store(true, Ordering::Release);
        self.send_control(rewind)?;
        // Closing our end wakes a peer blocked on a full ring.
        drop(reader);
        Ok(())
    }

    /// [`Conn::settle_on_tcp`], second step: the sending direction (serving the
    /// peer's REWIND if it sent one, else a SWITCH), then the connection is plain.
    pub(crate) fn settle_sending(&self, deadline: Instant) -> io::Result<()> {
        self.settle_receiving(deadline)?;
        if !self.is_accelerated() {
            return Ok(());
        }
        let mut tx = lock_until(&self.tx, deadline).ok_or_else(busy)?;
        if !self.is_accelerated() {
            return Ok(());
        }
        self.read_control()?;
        self.tx_news(&mut tx)?;
        tx.proto.settle();
        if tx.proto.rewind_asked() {
            self.serve_rewind(&mut tx)?;
        } else if tx.proto.path() == Path::Shm && !tx.proto.is_shut() {
            let own = tx.timeout;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            tx.timeout = Some(left);
            let moved = self.move_tx(&mut tx, Path::Tcp, false);
            tx.timeout = own;
            moved?;
            self.await_peer_verdict(&mut tx, deadline)?;
        }
        if tx.proto.take_fin() {
            self.tcp.shutdown(Shutdown::Write)?;
        }
        self.state.store(PLAIN, Ordering::Release);
        self.publish(flag::ACCELERATED, false);
        Ok(())
    }

    /// After moving our sending direction off the ring for good: if the ring still
    /// holds bytes the peer has not read, the peer either reads them (LEFT_RING)
    /// or is moving to TCP for good itself and asks for them again (REWIND), which
    /// must be served before our connection stops looking at the control socket.
    /// Waits for one or the other until `deadline`.
    fn await_peer_verdict(&self, tx: &mut Tx, deadline: Instant) -> io::Result<()> {
        let Some(parts) = self.parts() else {
            return Ok(());
        };
        while tx.ring.as_mut().is_some_and(|r| r.queued() > 0) {
            self.read_control()?;
            self.tx_news(tx)?;
            if tx.proto.rewind_asked() {
                return self.serve_rewind(tx);
            }
            if !tx.proto.tcp_waits_for_ring() || self.ctl_eof.load(Ordering::Acquire) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let slice = left.min(Duration::from_millis(10));
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: slice.as_nanos() as i64,
            };
            let mut fds = [PollFd::from_borrowed_fd(parts.ctl(), PollFlags::IN)];
            match poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Sends a LEFT answer. A peer that is gone needs none, and its absence shows on
    /// the data paths, so a failure here is not an error of this read.
    fn answer(&self, frame: Control) {
        if let Err(e) = self.send_control(frame) {
            tracing::debug!("vmc connection: could not answer a switch: {e}");
        }
    }

    fn send_control(&self, frame: Control) -> io::Result<()> {
        let parts = self.parts().ok_or_else(|| protocol("no control socket"))?;
        parts.ctl.send(frame)
    }

    /// Moves our sending direction to `to` at the current byte boundary. True if a
    /// REWIND came first and was served instead (the direction is on TCP for good,
    /// with the REWIND's bytes perhaps still in the backlog).
    fn move_tx(&self, tx: &mut Tx, to: Path, dontwait: bool) -> io::Result<bool> {
        if tx.proto.path() == to {
            return Ok(false);
        }
        // The peer must have left `to` where we last moved off it, or it could read
        // what we send there now before the stretch on the other path in between.
        self.wait_for_peer(tx, dontwait, |_, tx| {
            tx.proto.may_move(to) || tx.proto.rewind_asked()
        })?;
        if tx.proto.rewind_asked() {
            self.serve_rewind(tx)?;
            return Ok(true);
        }
        let switch = tx.proto.switch_to(to);
        match to {
            Path::Shm => {
                if tx.ring.is_none() {
                    tx.ring = self.parts().and_then(|p| lock(&p.writer).take());
                }
                let ring = tx
                    .ring
                    .as_mut()
                    .ok_or_else(|| protocol("no channel to move onto"))?;
                ring.set_nonblocking(tx.nonblocking);
                ring.set_timeout(tx.timeout)?;
                // Open before announcing: the receiver must find the ring open.
                ring.resume();
                self.send_control(switch)?;
            }
            Path::Tcp => {
                self.send_control(switch)?;
                // Paused after announcing: a receiver that finds the ring paused
                // finds the SWITCH too (else it is the end of the stream).
                tx.ring.as_mut().expect("shm path has a ring").pause();
            }
        }
        tx.proto.moved(to);
        self.publish(flag::TX_SHM, to == Path::Shm);
        Ok(false)
    }

    /// Waits until the peer's news make `done` true (reading the control socket as
    /// they come), as the direction's mode and timeout say.
    fn wait_for_peer(
        &self,
        tx: &mut Tx,
        dontwait: bool,
        done: impl Fn(&Conn, &mut Tx) -> bool,
    ) -> io::Result<()> {
        let started = Instant::now();
        loop {
            let mark = self.bells.mark(bell::TX);
            self.pump_control()?;
            self.tx_news(tx)?;
            if done(self, tx) {
                return Ok(());
            }
            if tx.nonblocking || dontwait {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if tx.timeout.is_some_and(|t| started.elapsed() >= t) {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "vmc connection: write timed out",
                ));
            }
            let parts = self.parts().ok_or_else(|| protocol("no control socket"))?;
            let mut nap = match self.bells.sleep(bell::TX, mark) {
                Nap::Rung => continue,
                Nap::Sleep(s) => Some(s),
                Nap::NoBell => None,
            };
            let mut fds = vec![PollFd::from_borrowed_fd(
                parts.ctl(),
                PollFlags::IN | PollFlags::RDHUP,
            )];
            if let Some(s) = &nap {
                fds.push(PollFd::from_borrowed_fd(s.fd(), PollFlags::IN));
            }
            let slice = Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            let polled = poll(&mut fds, Some(&slice));
            let fired = fds.len() > 1 && !fds[1].revents().is_empty();
            let ctl_gone = fds[0]
                .revents()
                .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR);
            drop(fds);
            if let Some(s) = &mut nap {
                s.fired = fired;
            }
            drop(nap);
            match polled {
                Ok(0) => self.plead(tx)?,
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            if ctl_gone {
                self.pump_control()?;
                self.tx_news(tx)?;
                if !done(self, tx) {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "vmc connection: the peer is gone",
                    ));
                }
            }
        }
    }

    /// Chooses the path of our sending direction; the move happens now if the
    /// channel is attached, else as soon as it is.
    pub(crate) fn set_tx_path(&self, to: Path) -> io::Result<()> {
        self.advance();
        let mut tx = self.tx.lock();
        if tx.proto.choose(to).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "vmc connection: moved to TCP for good",
            ));
        }
        if self.is_accelerated() && !tx.proto.is_shut() {
            self.move_tx(&mut tx, to, false)?;
        }
        Ok(())
    }

    pub(crate) fn tx_path(&self) -> Path {
        self.tx.lock().proto.path()
    }

    pub(crate) fn rx_path(&self) -> Path {
        self.rx.lock().proto.path()
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut how = how;
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            let mut tx = self.tx.lock();
            let shut = tx.proto.shutdown();
            if shut.first {
                self.tx_shut.store(true, Ordering::Release);
                if let Some(ring) = tx.ring.as_mut() {
                    ring.shutdown();
                }
            }
            // The ring carries this end of stream (or a backlog still has to go
            // first): TCP's FIN waits, see `Shut::fin_waits`.
            if shut.fin_waits {
                match how {
                    Shutdown::Write => return Ok(()),
                    _ => how = Shutdown::Read,
                }
            }
        }
        self.tcp.shutdown(how)
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nonblocking(on)?;
        let mut rx = self.rx.lock();
        rx.nonblocking = on;
        if let Some(r) = rx.ring.as_mut() {
            r.set_nonblocking(on);
        }
        drop(rx);
        let mut tx = self.tx.lock();
        tx.nonblocking = on;
        if let Some(w) = tx.ring.as_mut() {
            w.set_nonblocking(on);
        }
        Ok(())
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)?;
        let mut rx = self.rx.lock();
        rx.timeout = t;
        if let Some(r) = rx.ring.as_mut() {
            r.set_timeout(t)?;
        }
        Ok(())
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)?;
        let mut tx = self.tx.lock();
        tx.timeout = t;
        if let Some(w) = tx.ring.as_mut() {
            w.set_timeout(t)?;
        }
        Ok(())
    }

    pub(crate) fn read_timeout(&self) -> Option<Duration> {
        self.rx.lock().timeout
    }

    pub(crate) fn write_timeout(&self) -> Option<Duration> {
        self.tx.lock().timeout
    }

    // ---- readiness, for event loops (see `ready`) ------------------------------

    /// The kernel's view of the TCP socket, without waiting.
    fn tcp_events(&self) -> PollFlags {
        let mut fds = [PollFd::new(
            &self.tcp,
            PollFlags::IN | PollFlags::OUT | PollFlags::RDHUP,
        )];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&zero)) {
            Ok(_) => fds[0].revents(),
            Err(_) => PollFlags::empty(),
        }
    }

    /// What the connection is ready for now. Without `deep`, and while the wanted
    /// directions are on shared memory, this makes no system call; `deep` also asks
    /// the kernel about the TCP socket (hang-ups, errors) and the peer's liveness.
    pub(crate) fn readiness(&self, want: Interest, deep: bool) -> Ready {
        self.advance();
        let mut r = Ready::default();
        let mut tcp: Option<PollFlags> = None;
        if want.read {
            if let Some(mut rx) = self.rx.try_lock() {
                // A reader holding the lock takes whatever comes; otherwise look.
                let ended;
                (r.readable, ended) = match self.rx_ready(&mut rx, deep, &mut tcp) {
                    Ok(RxReady::Bytes) => (true, false),
                    Ok(RxReady::End) => (true, true),
                    Ok(RxReady::No) => (false, false),
                    Err(_) => (true, false),
                };
                r.read_closed = ended;
                let queued = match rx.proto.path() {
                    // Everything published: an edge-triggered waiter is owed an
                    // event whenever more bytes arrived, read or not.
                    Path::Shm => rx
                        .ring
                        .as_mut()
                        .map_or(0, |ring| ring.arrived().unwrap_or(0)),
                    Path::Tcp => rustix::io::ioctl_fionread(&self.tcp).unwrap_or(0) as usize,
                };
                let c = self.counters();
                r.rx_mark = c.tcp_in.load(Ordering::Relaxed)
                    + c.shm_in.load(Ordering::Relaxed)
                    + queued as u64
                    + self.rx_blocked.load(Ordering::Relaxed);
            }
        }
        // A connection that is closing shows it on its TCP socket too (hang-ups,
        // resets): look there whenever the rings say an end is closed.
        let mut closing = r.read_closed;
        if want.write {
            if let Some(mut tx) = self.tx.try_lock() {
                r.writable = self.tx_ready(&mut tx, deep, &mut tcp).unwrap_or(true);
                closing |= tx.ring.as_ref().is_some_and(|w| w.reader_closed());
                // Like the kernel (SOCK_NOSPACE), a fresh "writable" edge is owed only
                // after a write found no room.
                r.tx_mark = self.tx_blocked.load(Ordering::Relaxed);
            }
        }
        // Both directions shut, ours by shutdown and the peer's by the end on the
        // ring: the kernel's HUP (whatever the interest), which TCP cannot show
        // while the FINs wait (see `Tx::fin_owed`). From flags, not the other
        // direction's lock: an event loop's look must never make the other
        // direction's `arm` find its lock taken (it would sleep unarmed).
        if self.tx_shut.load(Ordering::Acquire)
            && (r.read_closed || self.rx_ended.load(Ordering::Acquire))
        {
            r.hup = true;
        }
        if deep || closing || tcp.is_some() {
            let ev = *tcp.get_or_insert_with(|| self.tcp_events());
            r.hup |= ev.contains(PollFlags::HUP);
            r.error = ev.contains(PollFlags::ERR);
            // The kernel says "read returns 0 eventually" as soon as the FIN is in;
            // the ring's end may lag it by a moment, so report it with readability.
            r.read_closed |= ev.contains(PollFlags::RDHUP) && r.readable;
            if r.hup && want.read && !r.readable {
                r.readable = true;
            }
        }
        r
    }

    fn rx_ready(
        &self,
        rx: &mut Rx,
        deep: bool,
        tcp: &mut Option<PollFlags>,
    ) -> io::Result<RxReady> {
        loop {
            match rx.proto.step() {
                RxStep::Ring => {
                    let ring = rx.ring.as_mut().expect("shm path has a ring");
                    if ring.is_ready() {
                        if ring.available()? > 0 {
                            return Ok(RxReady::Bytes);
                        }
                        if !self.leave_ring(rx)? {
                            self.rx_ended.store(true, Ordering::Release);
                            return Ok(RxReady::End);
                        }
                        continue;
                    }
                    if deep && !ring.peer_alive() {
                        return Ok(RxReady::Bytes); // the read reports the reset
                    }
                    return Ok(RxReady::No);
                }
                RxStep::EnterRing => self.enter_ring(rx)?,
                RxStep::Tcp { limit } => {
                    let ev = *tcp.get_or_insert_with(|| self.tcp_events());
                    if ev.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
                        return Ok(RxReady::Bytes);
                    }
                    if limit.is_none() && self.is_accelerated() && self.follow_to_ring(rx)? {
                        continue;
                    }
                    return Ok(RxReady::No);
                }
            }
        }
    }

    fn tx_ready(&self, tx: &mut Tx, deep: bool, tcp: &mut Option<PollFlags>) -> io::Result<bool> {
        self.serve_rewind(tx)?;
        let flushed = tx.backlog.is_empty() || self.flush_backlog(tx, true)?;
        if tx.proto.is_shut() {
            return Ok(true);
        }
        if !flushed {
            return Ok(false);
        }
        let mut path = tx.proto.path();
        if path != tx.proto.wants() && self.is_accelerated() {
            // The next write moves first, which needs the peer's LEFT answer (or
            // serves a REWIND that came meanwhile).
            self.pump_control()?;
            self.tx_news(tx)?;
            if tx.proto.rewind_asked() {
                return Ok(true);
            }
            if !tx.proto.may_move(tx.proto.wants()) {
                return Ok(false);
            }
            path = tx.proto.wants();
        } else if path == Path::Tcp && self.is_accelerated() && self.ring_unread(tx) {
            // Waits for the peer's answer to our move off the ring.
            return Ok(false);
        }
        match path {
            Path::Shm => Ok(match tx.ring.as_mut() {
                // A dead peer makes a write report it: "ready".
                Some(ring) => ring.is_ready() || (deep && !ring.peer_alive()),
                None => self
                    .parts()
                    .and_then(|p| lock(&p.writer).as_mut().map(|w| w.is_ready()))
                    .unwrap_or(true),
            }),
            Path::Tcp => {
                let ev = *tcp.get_or_insert_with(|| self.tcp_events());
                Ok(ev.intersects(PollFlags::OUT | PollFlags::HUP | PollFlags::ERR))
            }
        }
    }

    fn waitset(&self) -> io::Result<&WaitSet> {
        if let Some(w) = self.waitset.get() {
            return Ok(w);
        }
        let w = WaitSet::new()?;
        Ok(self.waitset.get_or_init(|| w))
    }

    /// Prepares to wait for `want`: watches everything that may change it and asks
    /// the rings' peers for a wake-up. Returns what is ready if something already is
    /// (nothing stays armed then); otherwise the caller waits for
    /// [`Conn::wait_fd`] to turn readable, then calls [`Conn::disarm`] and looks
    /// again.
    ///
    /// Several event loops may wait at once (threads polling one socket, a reader
    /// and a writer task): each ring stays armed while anyone waits for it, and the
    /// first loop to find a second one beside it is woken to look again, as the
    /// second one's arming may consume an edge meant for it. From then on
    /// [`Conn::shared_wait`] tells them to look again now and then.
    pub(crate) fn arm(&self, want: Interest) -> io::Result<Option<Ready>> {
        let ws = self.waitset()?;
        let others = self.waiters.fetch_add(1, Ordering::AcqRel);
        if want.read {
            self.armed_for[0].fetch_add(1, Ordering::AcqRel);
        }
        if want.write {
            self.armed_for[1].fetch_add(1, Ordering::AcqRel);
        }
        ws.drain();
        if others > 0 && !self.shared_kicked.swap(true, Ordering::AcqRel) {
            self.kick();
        }
        let mut tcp_ev = EventFlags::IN | EventFlags::RDHUP;
        // TCP's writability matters only while sending goes (or is about to go)
        // there; watching it otherwise would report a stale edge at every change.
        // (Only for a write interest: a reader's arm must not take the sending
        // side's lock, see `readiness`.)
        let sends_tcp = || {
            self.tx.try_lock().map_or(true, |tx| {
                tx.proto.path() == Path::Tcp || tx.proto.wants() == Path::Tcp
            })
        };
        if want.write && sends_tcp() {
            tcp_ev |= EventFlags::OUT;
        }
        ws.watch(self.tcp.as_fd(), tcp_ev)?;
        if !self.is_plain() {
            // Made at the first wait of an event loop; the state is looked at below.
            if let Ok(b) = self.bells.loop_fds() {
                ws.watch(b[bell::RX].fd(), EventFlags::IN)?;
                ws.watch(b[bell::TX].fd(), EventFlags::IN)?;
            }
        }
        match (self.parts(), self.setup_fd.get()) {
            (Some(p), setup) => {
                ws.watch(p.ctl(), EventFlags::IN | EventFlags::RDHUP)?;
                if let Some(fd) = p.wake.read() {
                    ws.watch(fd, EventFlags::IN)?;
                }
                if let Some(fd) = p.wake.write() {
                    ws.watch(fd, EventFlags::IN)?;
                }
                if let Some(fd) = setup {
                    ws.unwatch(fd.as_fd());
                }
            }
            (None, Some(fd)) if self.is_pending() => ws.watch(fd.as_fd(), EventFlags::IN)?,
            // Settled on plain TCP: the handshake has nothing more to say.
            (None, Some(fd)) => ws.unwatch(fd.as_fd()),
            _ => {}
        }
        if want.read {
            if let Some(mut rx) = self.rx.try_lock() {
                // TCP delivered everything before the peer's move to the ring: the
                // next bytes come on the ring, so that is what must be armed (the
                // look below would enter the ring only after arming, and the wait
                // would then sleep on a ring nobody was asked to wake us for).
                if rx.proto.step() == RxStep::EnterRing {
                    let _ = self.enter_ring(&mut rx);
                }
                if rx.proto.path() == Path::Shm {
                    if let Some(ring) = rx.ring.as_mut() {
                        ring.arm();
                    }
                }
            }
        }
        if want.write {
            if let Some(mut tx) = self.tx.try_lock() {
                if tx.proto.path() == Path::Shm {
                    if let Some(ring) = tx.ring.as_mut() {
                        ring.arm();
                    }
                }
            }
        }
        // A deep look: the edges drained above may have been the peer's death.
        let r = self.readiness(want, true);
        if r.meets(want) {
            self.disarm(want, None);
            return Ok(Some(r));
        }
        Ok(None)
    }

    /// Ends a wait begun by [`Conn::arm`] for `want`. A ring another waiter still
    /// waits for stays armed.
    pub(crate) fn disarm(&self, want: Interest, readable: Option<bool>) {
        if let Some(ws) = self.waitset.get() {
            ws.woke(readable);
        }
        let last = |n: &AtomicU32| {
            n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)) == Ok(1)
        };
        if want.read && last(&self.armed_for[0]) {
            if let Some(mut rx) = self.rx.try_lock() {
                if let Some(ring) = rx.ring.as_mut() {
                    ring.disarm();
                }
            }
        }
        if want.write && last(&self.armed_for[1]) {
            if let Some(mut tx) = self.tx.try_lock() {
                if let Some(ring) = tx.ring.as_mut() {
                    ring.disarm();
                }
            }
        }
        if last(&self.waiters) {
            self.shared_kicked.store(false, Ordering::Release);
        }
    }

    /// True if more than one event loop waits on this connection at once: they share
    /// one wait set, so each should wake now and then to look again.
    pub(crate) fn shared_wait(&self) -> bool {
        self.waiters.load(Ordering::Acquire) > 1
    }

    /// The descriptor to wait on (readable) after [`Conn::arm`].
    pub(crate) fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
        self.waitset.get().map(|w| w.fd())
    }

    /// Bytes a read could take now without waiting (`FIONREAD`).
    pub(crate) fn available(&self) -> io::Result<usize> {
        let mut rx = self.rx.lock();
        match rx.proto.path() {
            Path::Shm => rx.ring.as_mut().map_or(Ok(0), |r| r.available()),
            Path::Tcp => {
                let n = rustix::io::ioctl_fionread(&self.tcp)?;
                Ok(rx.proto.tcp_room().map_or(n, |room| n.min(room)) as usize)
            }
        }
    }

    /// Gives this process's share of the connection up to another process that
    /// shares it (after fork): from now on dropping it closes this process's
    /// descriptors and nothing else. Using it afterwards is a logic error.
    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
        if let Some(p) = self.parts() {
            p.wake.abandon();
        }
    }

    /// Wakes every thread, in this process or another that shares the connection
    /// (after fork), that waits on it: each looks again, and ends its wait if
    /// `vmc_os::interrupt` says so.
    pub(crate) fn kick(&self) {
        self.bells.ring(bell::RX);
        self.bells.ring(bell::TX);
        if let Some(p) = self.parts() {
            p.wake.kick();
        }
    }

    /// The TCP socket.
    pub(crate) fn tcp_fd(&self) -> BorrowedFd<'_> {
        self.tcp.as_fd()
    }

    /// Raw descriptor of the TCP socket (what `AsRawFd` reports, as for std).
    pub(crate) fn raw_fd(&self) -> i32 {
        self.tcp.as_raw_fd()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.abandoned.load(Ordering::Relaxed) {
            // Close our descriptors, touch nothing shared: not the rings (the
            // channel knows it is abandoned), not the statistics slot, not a
            // handshake in flight.
            let home = std::mem::replace(&mut self.home, Home::Own(Counters::default()));
            std::mem::forget(home);
            let setup = std::mem::replace(
                self.setup.get_mut().unwrap_or_else(|p| p.into_inner()),
                Setup::Done,
            );
            // An offer's segment and socket are the owner's handshake; an offer
            // socket (client) is only closed here, its file left to its owner.
            if matches!(setup, Setup::Offered(_)) {
                std::mem::forget(setup);
            }
            return;
        }
        // Close the rings before the TCP socket, so that the peer, woken by the FIN,
        // finds the end of the stream on the ring too.
        drop(self.tx.lock().ring.take());
        drop(self.rx.lock().ring.take());
        drop(self.parts.take());
    }
}
