//! `TcpStream`, shaped like `std::net::TcpStream`, accelerated when its peer is a
//! co-resident vmc endpoint.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vmc_os::ForkSafeOnce;

use crate::conn::{Conn, OfferOut, ReadOpts};
use crate::fallback::Fallback;
use crate::handshake::PreparedOffer;
use crate::ready::{Interest, Ready};
use crate::registry::Registry;
use crate::wire::Path;

/// True when `VMC_DISABLE` is set to anything but `0` or empty: vmc stays out of the
/// way entirely.
pub(crate) fn vmc_disabled() -> bool {
    // An atomic, not a `OnceLock`: a fork while another thread fills a
    // `OnceLock` would leave the child one that never completes.
    use std::sync::atomic::{AtomicU8, Ordering};
    static DISABLED: AtomicU8 = AtomicU8::new(0);
    match DISABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("VMC_DISABLE").is_ok_and(|v| !v.is_empty() && v != "0");
            DISABLED.store(if off { 1 } else { 2 }, Ordering::Relaxed);
            off
        }
    }
}

/// The process's registry, opened once.
static REGISTRY: ForkSafeOnce<Result<Registry, String>> = ForkSafeOnce::new();

/// The process's registry, opened once.
pub(crate) fn registry() -> io::Result<&'static Registry> {
    REGISTRY
        .get_or_init(|| Registry::open_default().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))
}

/// Tells vmc that the program closed descriptors `first..=last` it did not open
/// itself (`close_range`, a loop of `close`, `dup2` onto them): what vmc keeps
/// between connections under those numbers (spare channels, threads' bells, cached
/// registry files) is forgotten, never used or closed again, since the numbers may
/// name the program's own files by now. The preload library calls this from its
/// `close`, `close_range` and `dup2` hooks. Returns how many things were forgotten.
pub fn forget_closed_fds(first: i32, last: i32) -> usize {
    let mut n = vmc_channel::pool::forget_fds(first, last) + crate::bell::forget_fds(first, last);
    if let Some(Ok(reg)) = REGISTRY.get() {
        n += reg.forget_fds(first, last);
    }
    n
}

/// Call before `fork` in a process that may be setting vmc up on another thread
/// (a `pthread_atfork` prepare handler): waits until the process-wide state that
/// is opened once (the registries, the policy, the statistics table, the spare
/// channels' switch, the fork counters: each a [`vmc_os::ForkSafeOnce`]) is
/// either untouched or complete. A fork in the middle of that opening would leave
/// the child a one-time initialisation that never finishes, and its first
/// connection hung.
pub fn prepare_fork() {
    if REGISTRY.started() {
        let _ = registry();
    }
    if PUBLIC.started() {
        let _ = public_registry();
    }
    crate::policy::Policy::prepare_fork();
    crate::stats::prepare_fork();
    vmc_channel::pool::prepare_fork();
    vmc_os::proc::prepare_fork();
}

/// A TCP connection, accelerated through shared memory when the peer is a
/// co-resident vmc endpoint; otherwise it behaves exactly like
/// `std::net::TcpStream`.
///
/// Clones ([`TcpStream::try_clone`]) share one connection, as clones of a std stream
/// share one socket.
#[derive(Clone)]
pub struct TcpStream {
    conn: Arc<Conn>,
}

/// Options of [`TcpStream::recv`], as `recv(2)` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvOpts {
    /// `MSG_PEEK`: leave the bytes for the next read.
    pub peek: bool,
    /// `MSG_DONTWAIT`: do not wait, whatever the stream's mode.
    pub dontwait: bool,
}

/// Bytes a connection moved, per path and direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes received over TCP.
    pub tcp_in: u64,
    /// Bytes sent over TCP.
    pub tcp_out: u64,
    /// Bytes received over shared memory.
    pub shm_in: u64,
    /// Bytes sent over shared memory.
    pub shm_out: u64,
}

impl TcpStream {
    pub(crate) fn from_conn(conn: Conn) -> TcpStream {
        TcpStream {
            conn: Arc::new(conn),
        }
    }

    /// Connects like `std::net::TcpStream::connect` (each address in turn), and
    /// offers a channel to the peer if it is a co-resident vmc listener. Never
    /// waits for the peer's answer: bytes written before it go over TCP, later
    /// ones over shared memory once the peer has attached.
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
        let mut last = None;
        for addr in addr.to_socket_addrs()? {
            match connect_to(addr) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "could not resolve to any addresses",
            )
        }))
    }

    /// Connects with a timeout, like `std::net::TcpStream::connect_timeout`.
    pub fn connect_timeout(addr: &SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let tcp = std::net::TcpStream::connect_timeout(addr, timeout)?;
        Ok(TcpStream::from_conn(client(tcp)))
    }

    /// Takes over a TCP socket that connected (or is still connecting, without
    /// blocking) to `peer`, offering a channel as [`TcpStream::connect`] does. For
    /// front ends that intercept `connect` (the preload library).
    pub fn adopt_client(tcp: std::net::TcpStream, peer: SocketAddr) -> TcpStream {
        TcpStream::from_conn(client_to(tcp, peer))
    }

    /// The part of the offer that can be done before `connect(fd, peer)`: call
    /// it before, then [`TcpStream::adopt_prepared`] once `connect` has succeeded
    /// (or is in progress), so that the accepting side finds the offer at once;
    /// drop it if `connect` failed. For front ends that intercept `connect`.
    pub fn prepare_connect(fd: BorrowedFd<'_>, peer: SocketAddr) -> PreparedConnect {
        PreparedConnect(prepare(fd, peer))
    }

    /// [`TcpStream::adopt_client`] with the offer prepared before `connect`.
    pub fn adopt_prepared(
        tcp: std::net::TcpStream,
        peer: SocketAddr,
        prepared: PreparedConnect,
    ) -> TcpStream {
        TcpStream::from_conn(client_prepared(tcp, peer, prepared.0))
    }

    /// Reads like `recv(2)` with `opts`.
    pub fn recv(&self, buf: &mut [u8], opts: RecvOpts) -> io::Result<usize> {
        self.conn.read_opts(
            buf,
            ReadOpts {
                peek: opts.peek,
                dontwait: opts.dontwait,
            },
        )
    }

    /// Reads without consuming, like `std::net::TcpStream::peek`.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(
            buf,
            RecvOpts {
                peek: true,
                dontwait: false,
            },
        )
    }

    /// Writes like `send(2)`; with `dontwait` (`MSG_DONTWAIT`) it never waits. A
    /// closed peer is a `BrokenPipe` error, never a SIGPIPE.
    pub fn send(&self, buf: &[u8], dontwait: bool) -> io::Result<usize> {
        self.conn.write_opts(buf, dontwait)
    }

    /// Gives this process's share of the connection up, after fork, to the process
    /// that owns it now: dropping this stream (and its clones) then closes this
    /// process's descriptors but sends nothing and changes nothing the owner or the
    /// peer can see. The stream must not be used afterwards.
    pub fn abandon(&self) {
        self.conn.abandon()
    }

    /// Bytes a read could take now without waiting (`FIONREAD`).
    pub fn available(&self) -> io::Result<usize> {
        self.conn.available()
    }

    /// What the connection is ready for now (see [`crate::ready`]). Without `deep`
    /// this makes no system call while the wanted directions are on shared memory;
    /// with it, hang-ups and errors of the TCP socket and a dead peer show too.
    pub fn poll_ready(&self, want: Interest, deep: bool) -> Ready {
        self.conn.readiness(want, deep)
    }

    /// Prepares to wait for `want`. `Some(ready)` if something is ready already;
    /// otherwise wait until [`TcpStream::wait_fd`] is readable, call
    /// [`TcpStream::disarm`] and look again with [`TcpStream::poll_ready`].
    pub fn arm(&self, want: Interest) -> io::Result<Option<Ready>> {
        self.conn.arm(want)
    }

    /// Ends a wait begun with [`TcpStream::arm`] for `want` (what was armed).
    pub fn disarm(&self, want: Interest) {
        self.conn.disarm(want, None)
    }

    /// [`TcpStream::disarm`] after a sleep that polled [`TcpStream::wait_fd`] and
    /// saw it `readable` or not: a wait descriptor seen idle needs no draining at
    /// the next arm (one system call less per connection and sleep).
    pub fn disarm_seen(&self, want: Interest, readable: bool) {
        self.conn.disarm(want, Some(readable))
    }

    /// The descriptor that turns readable when an armed connection may be ready.
    pub fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
        self.conn.wait_fd()
    }

    /// True while several event loops wait on this connection at once; they should
    /// then wake every few milliseconds to look again (they share one wait set).
    pub fn shared_wait(&self) -> bool {
        self.conn.shared_wait()
    }

    /// True once the connection has a shared-memory channel attached (each direction
    /// moves onto it at its sender's next write).
    pub fn is_accelerated(&self) -> bool {
        self.conn.advance();
        self.conn.is_accelerated()
    }

    /// Why the connection stays on TCP; `None` while accelerated or still deciding.
    pub fn fallback_reason(&self) -> Option<Fallback> {
        self.conn.advance();
        self.conn.fallback().cloned()
    }

    /// True if a thread is inside a read or a write of this connection right
    /// now (one of its directions is locked). Before a `fork`, such a thread goes
    /// on with its call in the parent, without a new call that would claim the
    /// connection there.
    pub fn in_use(&self) -> bool {
        self.conn.in_use()
    }

    /// True once the connection is known to stay plain TCP for good (cheaper than
    /// [`TcpStream::fallback_reason`]: no allocation).
    pub fn is_plain(&self) -> bool {
        self.conn.advance();
        !self.conn.is_accelerated() && !self.conn.is_pending()
    }

    /// True while the handshake with the peer is still in flight.
    pub fn is_pending(&self) -> bool {
        self.conn.advance();
        self.conn.is_pending()
    }

    /// Moves our sending direction to `path` at the current byte boundary (now, if
    /// the channel is attached; otherwise once it is). The peer follows on its own;
    /// nothing written is lost, duplicated or reordered.
    pub fn set_send_path(&self, path: Path) -> io::Result<()> {
        self.conn.set_tx_path(path)
    }

    /// Moves both directions to TCP for good, at exact byte boundaries, so that
    /// the kernel socket alone carries the rest of the stream (before exec, or to
    /// hand the socket to a program that does not run vmc). Our receiving side
    /// stops reading the ring and asks the peer to send again, on TCP, every byte
    /// we did not read; the peer does so the next time it uses the connection,
    /// so this never waits for it. The sending side moves as with
    /// [`TcpStream::set_send_path`], waiting at most `patience` for an answer the
    /// peer owes to an earlier move (and for other threads using the stream).
    /// Does nothing to a connection that is not accelerated.
    pub fn settle_on_tcp(&self, patience: Duration) -> io::Result<()> {
        self.conn.settle_on_tcp(patience, OfferOut::GiveUp)
    }

    /// [`TcpStream::settle_on_tcp`] for a caller that can ask again (another
    /// process after a fork, which waits for it): a handshake whose offer is out
    /// is never given up, since the peer may have taken it and be writing on the
    /// ring already. Still unanswered when `patience` runs out: `WouldBlock`,
    /// nothing changed.
    pub fn settle_on_tcp_or_wait(&self, patience: Duration) -> io::Result<()> {
        self.conn.settle_on_tcp(patience, OfferOut::Wait)
    }

    /// The first half of [`TcpStream::settle_on_tcp`]: the receiving direction
    /// only. Settling several connections at once (before exec), do this for all
    /// of them first: two ends of one connection in this process then each find
    /// the other's request when they move their sending direction.
    pub fn settle_on_tcp_receiving(&self, patience: Duration) -> io::Result<()> {
        self.conn
            .settle_receiving(std::time::Instant::now() + patience, OfferOut::GiveUp)
    }

    /// Wakes every thread, in this process or in another that shares the
    /// connection after a fork, that waits on it: each looks again, and ends its
    /// wait with `Interrupted` if `vmc_os::interrupt` says so. How a process that
    /// does not own a forked connection gets the owner's attention.
    pub fn kick(&self) {
        self.conn.kick()
    }

    /// The path our sending direction uses now.
    pub fn send_path(&self) -> Path {
        self.conn.tx_path()
    }

    /// The path our receiving direction reads now.
    pub fn recv_path(&self) -> Path {
        self.conn.rx_path()
    }

    /// Bytes moved so far, per path and direction.
    pub fn traffic(&self) -> Traffic {
        let c = self.conn.counters();
        Traffic {
            tcp_in: c.tcp_in.load(Ordering::Relaxed),
            tcp_out: c.tcp_out.load(Ordering::Relaxed),
            shm_in: c.shm_in.load(Ordering::Relaxed),
            shm_out: c.shm_out.load(Ordering::Relaxed),
        }
    }

    /// The remote address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.conn.tcp.peer_addr()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.conn.tcp.local_addr()
    }

    /// Shuts down one or both directions, like `std::net::TcpStream::shutdown`.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.conn.shutdown(how)
    }

    /// Sets `TCP_NODELAY` on the TCP connection (shared-memory writes are always
    /// published at once).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.conn.tcp.set_nodelay(on)
    }

    /// Whether `TCP_NODELAY` is set.
    pub fn nodelay(&self) -> io::Result<bool> {
        self.conn.tcp.nodelay()
    }

    /// Read timeout (`None`: block forever), as std.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.conn.set_read_timeout(t)
    }

    /// Write timeout (`None`: block forever), as std.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.conn.set_write_timeout(t)
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        Ok(self.conn.read_timeout())
    }

    /// The write timeout.
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        Ok(self.conn.write_timeout())
    }

    /// Non-blocking mode: operations that would block fail with `WouldBlock`.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.conn.set_nonblocking(on)
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<TcpStream> {
        Ok(self.clone())
    }

    /// The pending socket error of the TCP connection, as std.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.conn.tcp.take_error()
    }
}

impl Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.read(buf)
    }
}

impl Read for &TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.read(buf)
    }
}

impl Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::os::fd::AsFd for TcpStream {
    /// The TCP socket.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.tcp_fd()
    }
}

impl AsRawFd for TcpStream {
    /// The TCP socket's descriptor.
    fn as_raw_fd(&self) -> RawFd {
        self.conn.raw_fd()
    }
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream")
            .field("local", &self.local_addr().ok())
            .field("peer", &self.peer_addr().ok())
            .field("accelerated", &self.conn.is_accelerated())
            .field("fallback", &self.conn.fallback())
            .finish()
    }
}

/// An offer made ready before `connect` ([`TcpStream::prepare_connect`]).
pub struct PreparedConnect(Result<PreparedOffer, Fallback>);

impl std::fmt::Debug for PreparedConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedConnect")
            .field("offered", &self.0.is_ok())
            .finish()
    }
}

/// One address of [`TcpStream::connect`]: the offer socket is ready before the
/// connection is made.
fn connect_to(peer: SocketAddr) -> io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = match peer {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    let prepared = prepare(std::os::fd::AsFd::as_fd(&fd), peer);
    loop {
        match rustix::net::connect(&fd, &peer) {
            Ok(()) | Err(rustix::io::Errno::ISCONN) => break,
            // As std does: the connection goes on in the background.
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let tcp = std::net::TcpStream::from(fd);
    Ok(TcpStream::from_conn(client_prepared(tcp, peer, prepared)))
}

/// Client side of the set-up: offer a channel if the peer is a registered,
/// co-resident vmc listener; otherwise the connection stays TCP with a reason.
fn client(tcp: std::net::TcpStream) -> Conn {
    match tcp.peer_addr() {
        Ok(peer) => client_to(tcp, peer),
        Err(e) => Conn::plain(tcp, Fallback::Handshake(e.to_string())),
    }
}

/// [`client`] for a connection that may still be connecting (its peer address is
/// not known to the kernel yet).
fn client_to(tcp: std::net::TcpStream, peer: SocketAddr) -> Conn {
    let prepared = prepare(std::os::fd::AsFd::as_fd(&tcp), peer);
    client_prepared(tcp, peer, prepared)
}

/// [`client_to`] with the offer socket prepared before `connect`
/// ([`prepare`]): only its publication is left.
fn client_prepared(
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    prepared: Result<PreparedOffer, Fallback>,
) -> Conn {
    let published = prepared.and_then(|prepared| {
        let local = tcp
            .local_addr()
            .map_err(|e| Fallback::Handshake(e.to_string()))?;
        let sock = prepared
            .publish(local)
            .map_err(|e| Fallback::Handshake(format!("offer socket: {e}")))?;
        Ok((sock, local))
    });
    match published {
        Ok((sock, local)) => Conn::listening(tcp, sock, Some((local, peer))),
        Err(reason) => Conn::plain(tcp, reason),
    }
}

/// Binds, under a name of its own, the offer socket of a connection from the TCP
/// socket `fd` (connected or not yet) to the vmc listener of `peer` (see
/// [`crate::handshake`]), if there is one and the policy allows it.
fn prepare(fd: BorrowedFd<'_>, peer: SocketAddr) -> Result<PreparedOffer, Fallback> {
    if vmc_disabled() {
        return Err(Fallback::Disabled);
    }
    let reg = registry().map_err(|e| Fallback::Registry(e.to_string()))?;
    let shared_offers = |public: &Registry| {
        public
            .offers()
            .map(|d| d.path().to_path_buf())
            .map_err(|e| Fallback::Registry(e.to_string()))
    };
    let me = vmc_os::euid();
    // The listener's entry, where to bind, and the other end's user.
    let (entry, offers, other) = match reg.lookup_for(fd, peer).into_iter().next() {
        // Our own listener; but if processes of another user accept for it too
        // (workers that dropped privileges publish themselves), they can only
        // reach the shared offers directory.
        Some(entry) => {
            let other = public_registry().and_then(|public| {
                let uid = public
                    .lookup_for(fd, peer)
                    .iter()
                    .map(|e| e.uid)
                    .find(|&uid| uid != me)?;
                Some((public, uid))
            });
            match other {
                Some((public, uid)) => {
                    let offers = shared_offers(public)?;
                    (entry, offers, uid)
                }
                None => {
                    let offers = entry.offers.clone();
                    (entry, offers, me)
                }
            }
        }
        // Another user's listener, published for everyone: the offer goes into
        // the shared offers directory (never where the entry says).
        None => {
            let public = public_registry().ok_or(Fallback::NoListener)?;
            let entry = public
                .lookup_for(fd, peer)
                .into_iter()
                .next()
                .ok_or(Fallback::NoListener)?;
            let offers = shared_offers(public)?;
            let uid = entry.uid;
            (entry, offers, uid)
        }
    };
    let subject = crate::policy::Subject {
        server: peer,
        me,
        peer: Some(other),
    };
    crate::policy::Policy::get()
        .check(&subject)
        .map_err(|e| Fallback::Policy(e.to_string()))?;
    let public = other != me;
    tracing::debug!(%peer, offers = %offers.display(), public, "offering");
    PreparedOffer::bind(&offers, entry.netns, peer, public)
        .map_err(|e| Fallback::Handshake(format!("offer socket: {e}")))
}

/// The registry every user shares, opened once.
static PUBLIC: ForkSafeOnce<Option<Registry>> = ForkSafeOnce::new();

/// The registry every user shares (see [`Registry::open_public`]), opened once;
/// `None` if it cannot be used (connections between users then stay TCP).
pub(crate) fn public_registry() -> Option<&'static Registry> {
    PUBLIC
        .get_or_init(|| match Registry::open_public() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!("vmc: no connections between users: {e}");
                None
            }
        })
        .as_ref()
}
