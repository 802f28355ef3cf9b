//! Async [`TcpListener`] and [`TcpStream`] for the tokio runtime (feature `tokio`),
//! shaped like `tokio::net`'s: accelerated through shared memory when the peer is a
//! co-resident vmc endpoint, plain TCP (exactly as `tokio::net::TcpStream`) otherwise.
//!
//! # How a stream waits
//! The kernel cannot say when a ring has bytes, so an accelerated (or still
//! deciding) stream waits through the connection's readiness API ([`crate::ready`]):
//! every operation is tried without blocking first; on `WouldBlock` the stream
//! *arms* the connection (which re-checks, so no wake-up is lost) and waits on its
//! wait set, a descriptor registered with tokio ([`AsyncFd`]). When that turns
//! readable, it disarms and tries again.
//!
//! A reader and a writer may wait on one stream at once (see
//! [`TcpStream::into_split`]), but a connection has one wait set and is armed for
//! one set of interests at a time. So each stream keeps, under one lock, which
//! directions wait: it always arms for all of them, and a wake-up of the wait set
//! wakes every waiting task, each of which then looks again. A task that consumes
//! the descriptor's readiness wakes the other waiter, so an event meant for one is
//! never hidden from it by the other.
//!
//! A stream whose connection is known to stay on TCP when it is made (the peer is
//! not a vmc listener, vmc is disabled, ...) registers its TCP socket with tokio
//! directly and behaves, and costs, exactly like a `tokio::net::TcpStream`.

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest as TokioInterest, ReadBuf};

use crate::fallback::Fallback;
use crate::net::RecvOpts;
use crate::ready::Interest;

/// How often a stream looks again while others wait on its connection too (see
/// [`crate::TcpStream::shared_wait`]).
const SHARED_WAIT_TICK: Duration = Duration::from_millis(2);

/// Tries in one poll before the task yields to the runtime (a connection that keeps
/// saying "ready" while its operations say "would block" must not hold a thread).
const MAX_ROUNDS: u32 = 32;

const READ: u8 = 1;
const WRITE: u8 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers a descriptor we own with tokio, for readability.
fn register_owned(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` owns `fd`, so it stays open (and `as_raw_fd` returns it)
    // until the `AsyncFd` is dropped or gives it back.
    Ok(unsafe { AsyncFd::register_with_interest(fd, TokioInterest::READABLE) }?)
}

/// One direction of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Read = 0,
    Write = 1,
}

impl Dir {
    fn bit(self) -> u8 {
        match self {
            Dir::Read => READ,
            Dir::Write => WRITE,
        }
    }

    fn other(self) -> Dir {
        match self {
            Dir::Read => Dir::Write,
            Dir::Write => Dir::Read,
        }
    }
}

fn interest(bits: u8) -> Interest {
    Interest {
        read: bits & READ != 0,
        write: bits & WRITE != 0,
    }
}

/// The tasks waiting on a stream, one per direction; itself the waker registered
/// with tokio, which wakes them all.
#[derive(Default)]
struct Waiters {
    slots: Mutex<[Option<Waker>; 2]>,
}

impl Waiters {
    fn register(&self, dir: Dir, w: &Waker) {
        let mut s = lock(&self.slots);
        match &s[dir as usize] {
            Some(old) if old.will_wake(w) => {}
            _ => s[dir as usize] = Some(w.clone()),
        }
    }

    fn take(&self, dir: Dir) -> Option<Waker> {
        lock(&self.slots)[dir as usize].take()
    }
}

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let [r, w] = std::mem::take(&mut *lock(&self.slots));
        for waker in [r, w].into_iter().flatten() {
            waker.wake();
        }
    }
}

/// Arming state, changed only under its lock.
#[derive(Default)]
struct ArmState {
    /// What the connection is armed for by us (disarmed before arming again).
    armed: Option<Interest>,
    /// Wakes us now and then while the wait set is shared with others.
    tick: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Waiting through the connection's wait set.
struct VmcWait {
    /// A duplicate of the connection's wait set descriptor.
    fd: AsyncFd<OwnedFd>,
    state: Mutex<ArmState>,
    waiters: Arc<Waiters>,
    /// `waiters` as a waker.
    waker: Waker,
    /// Directions that wait (`READ | WRITE`): what the connection is armed for.
    /// Set when a direction's operation would block; cleared when it completes, or
    /// when someone found it ready and woke its task.
    wanting: AtomicU8,
    /// Once the handshake has settled on TCP: the socket, registered with tokio,
    /// which later waits use instead of the wait set.
    plain: OnceLock<AsyncFd<crate::TcpStream>>,
}

/// How a stream waits.
enum Wait {
    /// A connection that stays on TCP: its socket (through a clone of the stream,
    /// whose descriptor it is), registered with tokio.
    Plain(AsyncFd<crate::TcpStream>),
    Vmc(VmcWait),
}

struct Inner {
    io: crate::TcpStream,
    wait: Wait,
}

/// What one round of waiting came to.
enum Step {
    /// Something may have changed: try the operation again.
    Retry,
    /// Nothing yet: the task will be woken.
    Pending,
}

impl Inner {
    fn new(io: crate::TcpStream) -> io::Result<Inner> {
        io.set_nonblocking(true)?;
        let wait = if io.is_plain() {
            // Settled on TCP for good.
            Wait::Plain(register_socket(&io)?)
        } else {
            // The wait set exists once the connection was armed.
            if io.arm(Interest::READ)?.is_none() {
                io.disarm(Interest::READ);
            }
            let fd = io
                .wait_fd()
                .ok_or_else(|| io::Error::other("vmc connection without a wait set"))?
                .try_clone_to_owned()?;
            let waiters = Arc::new(Waiters::default());
            Wait::Vmc(VmcWait {
                fd: register_owned(fd)?,
                state: Mutex::new(ArmState::default()),
                waker: Waker::from(waiters.clone()),
                waiters,
                wanting: AtomicU8::new(0),
                plain: OnceLock::new(),
            })
        };
        Ok(Inner { io, wait })
    }

    /// Runs `op` (a non-blocking operation in direction `dir`) until it does not
    /// report `WouldBlock`, waiting as tokio's own I/O types do.
    fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        dir: Dir,
        mut op: impl FnMut() -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        match &self.wait {
            Wait::Plain(fd) => poll_plain(fd, cx, dir, op),
            Wait::Vmc(w) => {
                if let Some(fd) = w.plain_socket(&self.io) {
                    return poll_plain(fd, cx, dir, op);
                }
                // Take part in tokio's cooperative scheduling as its I/O types do: a
                // ring that is always ready must not keep the thread forever.
                let coop = ready!(tokio::task::coop::poll_proceed(cx));
                let mut rounds = 0;
                loop {
                    match op() {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        r => {
                            coop.made_progress();
                            w.done(dir);
                            return Poll::Ready(r);
                        }
                    }
                    rounds += 1;
                    if rounds > MAX_ROUNDS {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    match w.wait(&self.io, cx, dir) {
                        Ok(Step::Retry) => {}
                        Ok(Step::Pending) => return Poll::Pending,
                        Err(e) => {
                            w.done(dir);
                            return Poll::Ready(Err(e));
                        }
                    }
                }
            }
        }
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let dst = buf.initialize_unfilled();
        let n = ready!(self.poll_io(cx, Dir::Read, || self.io.recv(dst, RecvOpts::default())))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_io(cx, Dir::Write, || self.io.send(buf, false))
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.io.shutdown(Shutdown::Write)
    }
}

/// [`Inner::poll_io`] for a connection on TCP for good: tokio's own way.
fn poll_plain<R>(
    fd: &AsyncFd<crate::TcpStream>,
    cx: &mut Context<'_>,
    dir: Dir,
    mut op: impl FnMut() -> io::Result<R>,
) -> Poll<io::Result<R>> {
    loop {
        let mut guard = ready!(match dir {
            Dir::Read => fd.poll_read_ready(cx),
            Dir::Write => fd.poll_write_ready(cx),
        })?;
        match guard.try_io(|_| op()) {
            Ok(r) => return Poll::Ready(r),
            Err(_would_block) => continue,
        }
    }
}

/// Registers a connection's TCP socket with tokio (through a clone of the stream,
/// whose descriptor it is).
fn register_socket(io: &crate::TcpStream) -> io::Result<AsyncFd<crate::TcpStream>> {
    let sock = io.clone();
    // SAFETY: the descriptor is the TCP socket of the connection `sock` holds a
    // reference to: it stays open, and `as_raw_fd` returns it, for as long as the
    // `AsyncFd` owns `sock`.
    Ok(unsafe {
        AsyncFd::register_with_interest(sock, TokioInterest::READABLE | TokioInterest::WRITABLE)
    }?)
}

impl VmcWait {
    /// The TCP socket registered with tokio, once the connection is known to stay
    /// on TCP (a server end whose client turned out not to run vmc): from then on
    /// it waits like a `tokio::net::TcpStream`. A wait still armed on the wait set
    /// ends normally (the set watches the socket too).
    fn plain_socket(&self, io: &crate::TcpStream) -> Option<&AsyncFd<crate::TcpStream>> {
        if let Some(fd) = self.plain.get() {
            return Some(fd);
        }
        if !io.is_plain() {
            return None;
        }
        // One registration of the socket per runtime: the other direction may be
        // here at the same moment.
        let _st = lock(&self.state);
        if let Some(fd) = self.plain.get() {
            return Some(fd);
        }
        match register_socket(io) {
            Ok(fd) => Some(self.plain.get_or_init(|| fd)),
            Err(e) => {
                tracing::debug!("vmc tokio stream: could not register its socket: {e}");
                None
            }
        }
    }

    /// Direction `dir`'s operation completed: it no longer waits.
    fn done(&self, dir: Dir) {
        if self.wanting.load(Ordering::Relaxed) & dir.bit() != 0 {
            self.wanting.fetch_and(!dir.bit(), Ordering::AcqRel);
        }
    }

    /// Direction `dir` would block: arms the connection for every direction that
    /// waits and registers the task, or says to try again.
    fn wait(&self, io: &crate::TcpStream, cx: &mut Context<'_>, dir: Dir) -> io::Result<Step> {
        let mut to_wake = None;
        let step = self.wait_locked(io, cx, dir, &mut to_wake);
        // Woken outside the lock: a waker may do anything, even poll us.
        if let Some(w) = to_wake {
            w.wake();
        }
        step
    }

    fn wait_locked(
        &self,
        io: &crate::TcpStream,
        cx: &mut Context<'_>,
        dir: Dir,
        to_wake: &mut Option<Waker>,
    ) -> io::Result<Step> {
        let mut st = lock(&self.state);
        self.waiters.register(dir, cx.waker());
        let want = self.wanting.fetch_or(dir.bit(), Ordering::AcqRel) | dir.bit();
        if let Some(was) = st.armed.take() {
            io.disarm(was);
        }
        match io.arm(interest(want)) {
            Err(e) => {
                self.waiters.take(dir);
                return Err(e);
            }
            Ok(Some(_)) => {
                // Ready already, for us or for the other direction. Finding it ready,
                // `arm` disarmed the connection: a waiting other direction is armed
                // for no longer, whether or not it is ready, so it must look again
                // (and arm again if it would still block) or sleep forever.
                self.waiters.take(dir);
                let other = dir.other();
                if want & other.bit() != 0 {
                    self.wanting.fetch_and(!other.bit(), Ordering::AcqRel);
                    *to_wake = self.waiters.take(other);
                }
                return Ok(Step::Retry);
            }
            Ok(None) => st.armed = Some(interest(want)),
        }
        let mut wcx = Context::from_waker(&self.waker);
        match self.fd.poll_read_ready(&mut wcx) {
            Poll::Pending => {
                if io.shared_wait() {
                    // Others drain the same wait set: look again every few ms.
                    let tick = st
                        .tick
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(SHARED_WAIT_TICK)));
                    if tick.as_mut().poll(&mut wcx).is_ready() {
                        let next = tokio::time::Instant::now() + SHARED_WAIT_TICK;
                        tick.as_mut().reset(next);
                        let _ = tick.as_mut().poll(&mut wcx);
                    }
                } else {
                    st.tick = None;
                }
                Ok(Step::Pending)
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Ready(Ok(mut guard)) => {
                // The wait set fired (now or before): consume that, and let the other
                // waiter, to which it may have been meant, look again too.
                guard.clear_ready();
                if let Some(was) = st.armed.take() {
                    io.disarm(was);
                }
                self.waiters.take(dir);
                *to_wake = self.waiters.take(dir.other());
                Ok(Step::Retry)
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Wait::Vmc(w) = &self.wait {
            if let Some(was) = lock(&w.state).armed.take() {
                self.io.disarm(was);
            }
        }
    }
}

/// A TCP connection for tokio, accelerated through shared memory when its peer is a
/// co-resident vmc endpoint; otherwise it behaves exactly like
/// `tokio::net::TcpStream`.
///
/// Reads and writes go through [`AsyncRead`] and [`AsyncWrite`] (use
/// `tokio::io::AsyncReadExt` / `AsyncWriteExt`). [`TcpStream::split`] and
/// [`TcpStream::into_split`] give halves that a reader and a writer task use at once.
pub struct TcpStream {
    inner: Arc<Inner>,
}

impl TcpStream {
    /// Connects like `tokio::net::TcpStream::connect`, then offers a channel to the
    /// peer if it is a co-resident vmc listener (without waiting for the answer: the
    /// first bytes may go over TCP).
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> io::Result<TcpStream> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let peer = tcp.peer_addr()?;
        let tcp = tcp.into_std()?;
        TcpStream::from_std(crate::TcpStream::adopt_client(tcp, peer))
    }

    /// Takes over a vmc stream (made non-blocking). Must be called within a tokio
    /// runtime. Clones of `stream` kept elsewhere should not wait on it through
    /// [`crate::TcpStream::arm`]: if they do, this stream looks again every few
    /// milliseconds (which needs the runtime's timer).
    pub fn from_std(stream: crate::TcpStream) -> io::Result<TcpStream> {
        Ok(TcpStream {
            inner: Arc::new(Inner::new(stream)?),
        })
    }

    /// The vmc stream back (still non-blocking, as tokio's `into_std` leaves it).
    pub fn into_std(self) -> io::Result<crate::TcpStream> {
        Ok(self.inner.io.clone())
    }

    /// The underlying vmc stream, for what this type does not offer itself (send
    /// paths, traffic counters). Its blocking mode must stay non-blocking.
    pub fn get_ref(&self) -> &crate::TcpStream {
        &self.inner.io
    }

    /// True once the connection has a shared-memory channel attached.
    pub fn is_accelerated(&self) -> bool {
        self.inner.io.is_accelerated()
    }

    /// Why the connection stays on TCP; `None` while accelerated or still deciding.
    pub fn fallback_reason(&self) -> Option<Fallback> {
        self.inner.io.fallback_reason()
    }

    /// True while the handshake with the peer is still in flight.
    pub fn is_pending(&self) -> bool {
        self.inner.io.is_pending()
    }

    /// The remote address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.peer_addr()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.local_addr()
    }

    /// Sets `TCP_NODELAY` on the TCP connection.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.inner.io.set_nodelay(on)
    }

    /// Whether `TCP_NODELAY` is set.
    pub fn nodelay(&self) -> io::Result<bool> {
        self.inner.io.nodelay()
    }

    /// Halves borrowing the stream, for a reader and a writer at once.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        (ReadHalf(&self.inner), WriteHalf(&self.inner))
    }

    /// Owned halves, for a reader and a writer task. Dropping the write half shuts
    /// the sending direction down, as with tokio's.
    pub fn into_split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        (
            OwnedReadHalf {
                inner: self.inner.clone(),
            },
            OwnedWriteHalf {
                inner: self.inner,
                shutdown_on_drop: true,
            },
        )
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.shutdown_write())
    }
}

impl AsRawFd for TcpStream {
    /// The TCP socket's descriptor.
    fn as_raw_fd(&self) -> RawFd {
        self.inner.io.as_raw_fd()
    }
}

impl fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TcpStream").field(&self.inner.io).finish()
    }
}

/// The reading half of a [`TcpStream`], from [`TcpStream::split`].
#[derive(Debug)]
pub struct ReadHalf<'a>(&'a Inner);

/// The writing half of a [`TcpStream`], from [`TcpStream::split`].
#[derive(Debug)]
pub struct WriteHalf<'a>(&'a Inner);

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.shutdown_write())
    }
}

/// The owned reading half of a [`TcpStream`], from [`TcpStream::into_split`].
#[derive(Debug)]
pub struct OwnedReadHalf {
    inner: Arc<Inner>,
}

/// The owned writing half of a [`TcpStream`], from [`TcpStream::into_split`]; shuts
/// the sending direction down when dropped (unless [`OwnedWriteHalf::forget`]).
#[derive(Debug)]
pub struct OwnedWriteHalf {
    inner: Arc<Inner>,
    shutdown_on_drop: bool,
}

/// The halves given to [`OwnedReadHalf::reunite`] came from different streams.
#[derive(Debug)]
pub struct ReuniteError(pub OwnedReadHalf, pub OwnedWriteHalf);

impl fmt::Display for ReuniteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tried to reunite halves that are not from the same stream")
    }
}

impl std::error::Error for ReuniteError {}

impl OwnedReadHalf {
    /// The stream back from both its halves.
    pub fn reunite(self, mut other: OwnedWriteHalf) -> Result<TcpStream, ReuniteError> {
        if Arc::ptr_eq(&self.inner, &other.inner) {
            other.shutdown_on_drop = false;
            drop(other);
            Ok(TcpStream { inner: self.inner })
        } else {
            Err(ReuniteError(self, other))
        }
    }

    /// The remote address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.peer_addr()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.local_addr()
    }

    /// The underlying vmc stream.
    pub fn get_ref(&self) -> &crate::TcpStream {
        &self.inner.io
    }
}

impl OwnedWriteHalf {
    /// The stream back from both its halves.
    pub fn reunite(self, other: OwnedReadHalf) -> Result<TcpStream, ReuniteError> {
        other.reunite(self)
    }

    /// Drops the half without shutting the sending direction down.
    pub fn forget(mut self) {
        self.shutdown_on_drop = false;
    }

    /// The remote address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.peer_addr()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.local_addr()
    }

    /// The underlying vmc stream.
    pub fn get_ref(&self) -> &crate::TcpStream {
        &self.inner.io
    }
}

impl Drop for OwnedWriteHalf {
    fn drop(&mut self) {
        if self.shutdown_on_drop {
            let _ = self.inner.shutdown_write();
        }
    }
}

impl AsyncRead for OwnedReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for OwnedWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.inner.shutdown_write();
        if r.is_ok() {
            self.get_mut().shutdown_on_drop = false;
        }
        Poll::Ready(r)
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.io.fmt(f)
    }
}

/// A TCP listener for tokio whose co-resident vmc clients get shared-memory
/// channels; every other client gets plain TCP, as from `tokio::net::TcpListener`.
pub struct TcpListener {
    io: crate::TcpListener,
    fd: AsyncFd<OwnedFd>,
}

impl TcpListener {
    /// Binds like `tokio::net::TcpListener::bind` (to the first address that
    /// works) and registers the listener so that co-resident vmc clients find it.
    pub async fn bind(addr: impl tokio::net::ToSocketAddrs) -> io::Result<TcpListener> {
        let mut last = None;
        for a in tokio::net::lookup_host(addr).await? {
            match crate::TcpListener::bind(a) {
                Ok(l) => return TcpListener::from_std(l),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "could not resolve to any address",
            )
        }))
    }

    /// Takes over a vmc listener (made non-blocking). Must be called within a tokio
    /// runtime.
    pub fn from_std(listener: crate::TcpListener) -> io::Result<TcpListener> {
        listener.set_nonblocking(true)?;
        let fd = listener.as_std().as_fd().try_clone_to_owned()?;
        Ok(TcpListener {
            fd: register_owned(fd)?,
            io: listener,
        })
    }

    /// Accepts a connection; it is accelerated if its client is a co-resident vmc
    /// client, plain TCP otherwise.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for a connection to accept.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            match guard.try_io(|_| self.io.as_std().accept()) {
                Ok(Ok((tcp, peer))) => {
                    let s = self.io.adopt_accepted(tcp, peer)?;
                    return Poll::Ready(Ok((TcpStream::from_std(s)?, peer)));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Why this listener's clients cannot be accelerated (`None`: they can).
    pub fn fallback_reason(&self) -> Option<&Fallback> {
        self.io.fallback_reason()
    }

    /// The underlying vmc listener.
    pub fn get_ref(&self) -> &crate::TcpListener {
        &self.io
    }
}

impl AsRawFd for TcpListener {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_std().as_raw_fd()
    }
}

impl fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpListener")
            .field("local", &self.local_addr().ok())
            .field("fallback", &self.fallback_reason())
            .finish()
    }
}
