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

mod frames;
mod readiness;
mod recv;
mod send;
mod settle;
pub(crate) use settle::OfferOut;

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
use crate::fallback::Fallback;
pub(crate) use crate::handshake::Call;
use crate::handshake::{Called, OfferSocket};
use crate::proto::{Orphaned, Receiver, Refused, Rewind, RxEnd, RxStep, Sender};
use crate::ready::{Interest, Ready, WaitSet};
use crate::stats::{flag, Counters, Home};
use crate::wire::{self, Control, Path};
use vmc_os::sync::{DirGuard, DirLock};

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
    /// `tx.backlog` holds bytes a REWIND gave back that TCP did not take at
    /// once: whoever looks at the connection next, reader or event loop, puts
    /// more there ([`Conn::flush_owed`]), so a program that only waits to read
    /// still sends them and the FIN after them.
    backlog_owed: AtomicBool,
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
            backlog_owed: AtomicBool::new(false),
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
        c.set_fallback(reason);
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

    /// A thread holds one direction's lock: it is inside a read or a write.
    pub(crate) fn in_use(&self) -> bool {
        self.rx.is_locked() || self.tx.is_locked()
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
        self.set_fallback(reason);
        self.state.store(PLAIN, Ordering::Release);
        self.bells.ring(bell::RX);
        self.publish(flag::PENDING, false);
    }

    /// Keeps `reason` as why the connection stays on TCP and publishes its code,
    /// if it is the first reason given: a later one changes neither (its code
    /// OR-ed into the first one's bits would publish a third reason).
    fn set_fallback(&self, reason: Fallback) {
        let code = crate::stats::fallback_code(reason.code());
        if self.fallback.set(reason).is_ok() {
            self.publish(code << flag::FALLBACK_SHIFT, true);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> std::net::TcpStream {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap()
    }

    /// The fallback code the connection published.
    fn published(c: &Conn) -> u32 {
        (c.flags.load(Ordering::Relaxed) & flag::FALLBACK_MASK) >> flag::FALLBACK_SHIFT
    }

    #[test]
    fn only_the_first_fallback_is_kept_and_published() {
        let c = Conn::new(loopback(), PENDING, Setup::Done, None, None);
        // "listener-gone" (3) then "handshake" (6): OR-ed, they would read as
        // "registry" (7).
        c.give_up(Fallback::ListenerGone);
        c.give_up(Fallback::Handshake("later".into()));
        assert_eq!(c.fallback(), Some(&Fallback::ListenerGone));
        assert_eq!(published(&c), crate::stats::fallback_code("listener-gone"));
    }

    #[test]
    fn a_plain_connection_publishes_its_reason() {
        let c = Conn::plain(loopback(), Fallback::NoListener);
        assert_eq!(published(&c), crate::stats::fallback_code("no-listener"));
    }
}
