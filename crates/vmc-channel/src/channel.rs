//! The channel: a full-duplex byte stream over two rings, with blocking,
//! non-blocking and timed reads and writes, orderly shutdown of each direction, and
//! a dead peer turned into an error within [`LIVENESS_INTERVAL`].
//!
//! A [`Channel`] can be [split](Channel::split) into a [`ReadHalf`] and a
//! [`WriteHalf`] that run on two threads; nothing is shared between them but the
//! read-only [`Core`], so neither ever waits for the other.

use std::io::{self, Read, Write};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmc_os::Backoff;
use vmc_ring::{Consumer, Producer, RingError};

use crate::config::{WakeMode, LIVENESS_INTERVAL};
use crate::core::{Core, Dir};
use crate::spin::Spinner;

/// The most a poll-mode sleeper sleeps between two looks at its ring.
const POLL_MAX_SLEEP: Duration = Duration::from_micros(200);

/// Turns a ring error into what a socket would report.
pub(crate) fn ring_error(e: RingError) -> io::Error {
    match e {
        RingError::ReaderClosed => io::Error::new(
            io::ErrorKind::BrokenPipe,
            "vmc channel: the peer closed its reading end",
        ),
        RingError::Corrupt { .. } => {
            io::Error::new(io::ErrorKind::InvalidData, format!("vmc channel: {e}"))
        }
        e => io::Error::other(format!("vmc channel: {e}")),
    }
}

fn peer_died() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "vmc channel: the peer died without closing",
    )
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "vmc channel: timed out")
}

/// The state both halves keep for waiting.
struct Waiter {
    spinner: Spinner,
    backoff: Backoff,
    /// Blocking operations give up with `TimedOut` after this long (`None`: never).
    timeout: Option<Duration>,
    /// Operations that would block fail with `WouldBlock` instead (takes precedence
    /// over `timeout`, which is kept, as on a socket).
    nonblocking: bool,
}

impl Waiter {
    fn new(core: &Core) -> Waiter {
        Waiter {
            spinner: Spinner::new(core.spin),
            backoff: Backoff::new(POLL_MAX_SLEEP),
            timeout: None,
            nonblocking: false,
        }
    }

    fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        if t.is_some_and(|d| d.is_zero()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a zero timeout is not allowed",
            ));
        }
        self.timeout = t;
        Ok(())
    }
}

/// A ring end that a half can wait on: the consumer for data, the producer for space.
trait WaitRing {
    /// The condition the half waits for (data or EOF; space or a closed reader).
    fn ready(&mut self) -> io::Result<bool>;
    fn prepare_sleep(&mut self) -> io::Result<bool>;
    fn finish_sleep(&mut self);
    fn sleep_word(&self) -> &AtomicU32;
}

impl WaitRing for Consumer {
    fn ready(&mut self) -> io::Result<bool> {
        Ok(self.available().map_err(ring_error)? > 0 || self.is_finished().map_err(ring_error)?)
    }
    fn prepare_sleep(&mut self) -> io::Result<bool> {
        Consumer::prepare_sleep(self).map_err(ring_error)
    }
    fn finish_sleep(&mut self) {
        Consumer::finish_sleep(self)
    }
    fn sleep_word(&self) -> &AtomicU32 {
        Consumer::sleep_word(self)
    }
}

impl WaitRing for Producer {
    fn ready(&mut self) -> io::Result<bool> {
        // A closed reader counts as ready: the next write reports it.
        Ok(self.is_reader_closed() || self.free().map_err(ring_error)? > 0)
    }
    fn prepare_sleep(&mut self) -> io::Result<bool> {
        Producer::prepare_sleep(self).map_err(ring_error)
    }
    fn finish_sleep(&mut self) {
        Producer::finish_sleep(self)
    }
    fn sleep_word(&self) -> &AtomicU32 {
        Producer::sleep_word(self)
    }
}

/// Waits until `ring` is ready: spin, then sleep in rounds on `dir`'s word.
///
/// The peer's death ends the wait with [`io::ErrorKind::ConnectionReset`], but only
/// after a last check of the ring, so bytes written just before it are still read.
fn wait_until<R: WaitRing>(
    ring: &mut R,
    waiter: &mut Waiter,
    core: &Core,
    dir: Dir,
) -> io::Result<()> {
    if waiter.nonblocking {
        // No spinning either: the caller polls. But a dead peer must not look like
        // "try again" forever.
        if ring.ready()? {
            return Ok(());
        }
        if !core.peer_alive() && !ring.ready()? {
            return Err(peer_died());
        }
        return Err(io::ErrorKind::WouldBlock.into());
    }
    let started = Instant::now();
    if waiter.spinner.spin(|| ring.ready())? {
        return Ok(());
    }
    let deadline = waiter.timeout.map(|t| started + t);
    waiter.backoff.reset();
    loop {
        if vmc_os::interrupt::pending() && !ring.ready()? {
            return Err(vmc_os::interrupt::error());
        }
        if ring.prepare_sleep()? {
            let left = deadline.map_or(LIVENESS_INTERVAL, |d| {
                d.saturating_duration_since(Instant::now())
            });
            let slept = core.sleep(dir, ring.sleep_word(), left, &mut waiter.backoff);
            ring.finish_sleep();
            slept?;
        }
        if ring.ready()? {
            break;
        }
        if !core.peer_alive() {
            if ring.ready()? {
                break;
            }
            return Err(peer_died());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(timed_out());
        }
    }
    waiter.spinner.slept(started.elapsed());
    Ok(())
}

/// The eventfds a channel's halves are woken through (eventfd channels only), for
/// event loops that wait on many things at once (see [`ReadHalf::arm`]). Holding it
/// keeps them open; it gives no access to the rings.
#[derive(Clone)]
pub struct WakeFds {
    core: Arc<Core>,
}

impl WakeFds {
    /// Readable after an armed reader is woken (the peer wrote).
    pub fn read(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.core.wake_fd(Dir::Read)
    }

    /// Readable after an armed writer is woken (the peer freed space).
    pub fn write(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.core.wake_fd(Dir::Write)
    }

    /// The Unix socket the channel was set up over (its liveness link), for as long
    /// as this handle lives; `None` for channels set up otherwise.
    pub fn control_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.core.control_fd()
    }

    /// Wakes every thread, of this process or another sharing the channel (after
    /// fork), that sleeps on one of our halves; each looks again (and ends its wait
    /// if `vmc_os::interrupt` says so).
    pub fn kick(&self) {
        self.core.kick()
    }

    /// As [`ReadHalf::abandon`], through the handle.
    pub fn abandon(&self) {
        self.core
            .abandoned
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The reading half of a channel.
pub struct ReadHalf {
    rx: Consumer,
    waiter: Waiter,
    core: Arc<Core>,
}

/// The writing half of a channel.
pub struct WriteHalf {
    tx: Producer,
    /// Set by [`WriteHalf::shutdown`]: later writes fail like on a shut-down socket.
    shut: bool,
    waiter: Waiter,
    core: Arc<Core>,
}

impl ReadHalf {
    /// Reads at least one byte, blocking as configured; 0 means end of stream.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.rx.read(buf).map_err(ring_error)?;
            if n > 0 {
                if self.rx.needs_wake() {
                    self.core.wake(Dir::Write, self.rx.peer_sleep_word());
                }
                return Ok(n);
            }
            if self.rx.is_finished().map_err(ring_error)? {
                return Ok(0);
            }
            self.wait_readable()?;
        }
    }

    fn wait_readable(&mut self) -> io::Result<()> {
        wait_until(&mut self.rx, &mut self.waiter, &self.core, Dir::Read)
    }

    /// Waits, as a read would (spin, sleep, timeout, non-blocking mode), until a read
    /// would not wait; reads nothing (for `MSG_PEEK`).
    pub fn wait_ready(&mut self) -> io::Result<()> {
        if self.is_ready() {
            return Ok(());
        }
        self.wait_readable()
    }

    /// Zero-copy read: calls `f` with the ready bytes (as two slices, before and
    /// after the ring's wrap) and consumes as many as `f` returns. Blocks like
    /// [`ReadHalf::read`] until at least one byte is ready; returns `Ok(0)` at end of
    /// stream without calling `f`.
    pub fn read_with(&mut self, f: impl FnOnce(&[u8], &[u8]) -> usize) -> io::Result<usize> {
        loop {
            let (a, b) = self.rx.read_slices().map_err(ring_error)?;
            if !a.is_empty() {
                let n = f(a, b).min(a.len() + b.len());
                if self.rx.consume(n).map_err(ring_error)? < n {
                    // Revoked first: those bytes were never read, and the ring
                    // ended where we are (see `ReadHalf::is_revoked`).
                    return Ok(0);
                }
                if self.rx.needs_wake() {
                    self.core.wake(Dir::Write, self.rx.peer_sleep_word());
                }
                return Ok(n);
            }
            if self.rx.is_finished().map_err(ring_error)? {
                return Ok(0);
            }
            self.wait_readable()?;
        }
    }

    /// Copies up to `buf.len()` ready bytes without consuming them (`MSG_PEEK`).
    /// Never waits: 0 means nothing is ready (see [`ReadHalf::is_ready`] for why).
    pub fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (a, b) = self.rx.read_slices().map_err(ring_error)?;
        let n = buf.len().min(a.len() + b.len());
        let from_a = n.min(a.len());
        buf[..from_a].copy_from_slice(&a[..from_a]);
        buf[from_a..n].copy_from_slice(&b[..n - from_a]);
        Ok(n)
    }

    /// Bytes that can be read right now without blocking.
    pub fn available(&mut self) -> io::Result<usize> {
        self.rx.available().map_err(ring_error)
    }

    /// Bytes ready to read, counting everything the writer published so far
    /// ([`ReadHalf::available`] may show an older, smaller count while it is not
    /// zero). One load of the writer's index.
    pub fn arrived(&mut self) -> io::Result<usize> {
        self.rx.refresh().map_err(ring_error)
    }

    /// Read timeout (`None`: block forever). A zero duration is refused, as by std.
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.waiter.set_timeout(t)
    }

    /// Non-blocking mode: reads that would wait fail with `WouldBlock` instead.
    pub fn set_nonblocking(&mut self, on: bool) {
        self.waiter.nonblocking = on
    }

    /// True if a read would not wait: bytes are ready, the writer ended, or the ring
    /// is corrupt (the read reports it). No system call.
    pub fn is_ready(&mut self) -> bool {
        WaitRing::ready(&mut self.rx).unwrap_or(true)
    }

    /// Readiness for an event loop, step 1: asks the writer to ring
    /// [`ReadHalf::wake_fd`] at its next write. Returns false (and arms nothing) if a
    /// read would not wait already. Call [`ReadHalf::disarm`] after waking.
    pub fn arm(&mut self) -> bool {
        self.rx.prepare_sleep().unwrap_or(false)
    }

    /// Withdraws [`ReadHalf::arm`].
    pub fn disarm(&mut self) {
        self.rx.finish_sleep()
    }

    /// The descriptor an armed reader's wake-up makes readable (eventfd channels
    /// only; others have none, and an event loop must look again on its own).
    pub fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.core.wake_fd(Dir::Read)
    }

    /// Takes the notifications waiting on [`ReadHalf::wake_fd`], so that it turns
    /// readable again only at the next wake-up (for callers that poll it level
    /// triggered: take them, then look at the ring, then [`ReadHalf::arm`]).
    pub fn clear_wake(&self) -> io::Result<()> {
        self.core.clear_wake(Dir::Read)
    }

    /// False once the peer is known to have died without closing.
    pub fn peer_alive(&self) -> bool {
        self.core.peer_alive()
    }

    /// Gives up this process's share of the channel, for both halves: another
    /// process (a fork of this one) owns it now. From now on dropping a half closes
    /// this process's descriptors and unmaps the segment, but writes nothing to it:
    /// no close, no shutdown, no state change the owner or the peer would see.
    pub fn abandon(&self) {
        self.core
            .abandoned
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.rx.position()
    }

    /// True if the writer revoked the ring ([`WriteHalf::revoke`]): its stream
    /// ended at [`ReadHalf::position`], and reads return end of stream. A
    /// connection layer reads the rest where the writer sends it.
    pub fn is_revoked(&mut self) -> bool {
        self.rx.is_revoked()
    }
}

impl WriteHalf {
    /// Writes at least one byte of `buf` (as much as fits), blocking as configured.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check_open()?;
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.tx.write(buf).map_err(ring_error)?;
            if n > 0 {
                if self.tx.needs_wake() {
                    self.core.wake(Dir::Read, self.tx.peer_sleep_word());
                }
                return Ok(n);
            }
            self.wait_writable()?;
        }
    }

    fn wait_writable(&mut self) -> io::Result<()> {
        wait_until(&mut self.tx, &mut self.waiter, &self.core, Dir::Write)
    }

    /// Waits, as a write would (spin, sleep, timeout, non-blocking mode), until a
    /// write would not wait; writes nothing.
    pub fn wait_ready(&mut self) -> io::Result<()> {
        if self.is_ready() {
            return Ok(());
        }
        self.wait_writable()
    }

    /// Zero-copy write: calls `f` with the free space (two slices, before and after
    /// the wrap; at least one byte in total) and publishes as many bytes as `f`
    /// returns. Blocks like [`WriteHalf::write`] until there is space.
    pub fn write_with(
        &mut self,
        f: impl FnOnce(&mut [u8], &mut [u8]) -> usize,
    ) -> io::Result<usize> {
        self.check_open()?;
        loop {
            let (a, b) = self
                .tx
                .write_slices(self.tx.capacity())
                .map_err(ring_error)?;
            if !a.is_empty() {
                let total = a.len() + b.len();
                let n = f(a, b).min(total);
                self.tx.commit(n).map_err(ring_error)?;
                if self.tx.needs_wake() {
                    self.core.wake(Dir::Read, self.tx.peer_sleep_word());
                }
                return Ok(n);
            }
            self.wait_writable()?;
        }
    }

    fn check_open(&self) -> io::Result<()> {
        if self.shut {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "vmc channel: write after shutdown",
            ));
        }
        Ok(())
    }

    /// Ends this direction: the peer reads what was written, then end of stream.
    /// Later writes fail with `BrokenPipe`, as on a shut-down socket.
    pub fn shutdown(&mut self) {
        if std::mem::replace(&mut self.shut, true) {
            return;
        }
        self.tx.close();
        if self.tx.needs_wake() {
            self.core.wake(Dir::Read, self.tx.peer_sleep_word());
        }
    }

    /// Pauses this direction: like [`WriteHalf::shutdown`] to the reader (it sees end
    /// of stream after the last byte), but [`WriteHalf::resume`] can take it back. The
    /// connection layer uses it to move a direction to TCP at an exact byte boundary,
    /// having told the peer first that this "end" is a move.
    pub fn pause(&mut self) {
        self.tx.close();
        if self.tx.needs_wake() {
            self.core.wake(Dir::Read, self.tx.peer_sleep_word());
        }
    }

    /// Resumes a paused direction (see [`WriteHalf::pause`]); call it before telling
    /// the peer that bytes flow on the ring again.
    pub fn resume(&mut self) {
        self.tx.reopen();
    }

    /// Write timeout (`None`: block forever). A zero duration is refused, as by std.
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.waiter.set_timeout(t)
    }

    /// Non-blocking mode: writes that would wait fail with `WouldBlock` instead.
    pub fn set_nonblocking(&mut self, on: bool) {
        self.waiter.nonblocking = on
    }

    /// True if a write would not wait: there is space, or the reader is gone (the
    /// write reports it). No system call.
    pub fn is_ready(&mut self) -> bool {
        WaitRing::ready(&mut self.tx).unwrap_or(true)
    }

    /// Bytes the ring holds that the reader has not taken yet.
    pub fn queued(&mut self) -> usize {
        self.tx
            .free()
            .map_or(0, |free| self.tx.capacity().saturating_sub(free))
    }

    /// Readiness for an event loop, step 1: asks the reader to ring
    /// [`WriteHalf::wake_fd`] when it frees space. Returns false (and arms nothing)
    /// if a write would not wait already. Call [`WriteHalf::disarm`] after waking.
    pub fn arm(&mut self) -> bool {
        self.tx.prepare_sleep().unwrap_or(false)
    }

    /// Withdraws [`WriteHalf::arm`].
    pub fn disarm(&mut self) {
        self.tx.finish_sleep()
    }

    /// The descriptor an armed writer's wake-up makes readable (eventfd channels
    /// only).
    pub fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.core.wake_fd(Dir::Write)
    }

    /// False once the peer is known to have died without closing.
    pub fn peer_alive(&self) -> bool {
        self.core.peer_alive()
    }

    /// As [`ReadHalf::abandon`].
    pub fn abandon(&self) {
        self.core
            .abandoned
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bytes from `from` (a [`ReadHalf::position`] the reader reported before
    /// closing its end) to [`WriteHalf::position`]: written, never read. For a
    /// connection layer that sends them again on another path.
    pub fn take_back(&self, from: u64) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        self.tx.take_back(from, &mut v).map_err(ring_error)?;
        Ok(v)
    }

    /// Takes the ring back: everything the reader has not consumed is unread for
    /// good, whatever the reader is doing (asleep, busy, gone), and the ring ends
    /// for it at the returned offset. [`WriteHalf::take_back`] from there gives
    /// those bytes, to be sent another way; writes fail from now on. A reader
    /// asleep on the ring is woken. The same offset if called again.
    pub fn revoke(&mut self) -> io::Result<u64> {
        let at = self.tx.revoke().map_err(ring_error)?;
        self.shut = true;
        if self.tx.needs_wake() {
            self.core.wake(Dir::Read, self.tx.peer_sleep_word());
        }
        Ok(at)
    }

    /// True once the reader has closed its end (writes fail from now on).
    pub fn reader_closed(&self) -> bool {
        self.tx.is_reader_closed()
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.tx.position()
    }
}

impl Drop for ReadHalf {
    fn drop(&mut self) {
        if self.core.is_abandoned() {
            return;
        }
        self.rx.close();
        if self.rx.needs_wake() {
            self.core.wake(Dir::Write, self.rx.peer_sleep_word());
        }
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        if !self.core.is_abandoned() {
            self.shutdown();
        }
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        ReadHalf::read(self, buf)
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        WriteHalf::write(self, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(()) // every write is published before it returns
    }
}

/// A full-duplex shared-memory byte stream to one peer process.
///
/// Made by [`crate::ChannelListener::accept`] and [`Channel::connect`] (a memfd passed
/// over a Unix socket), by [`Channel::pair`] (both ends here, e.g. before a fork), or
/// over a directory segment ([`crate::Channel::create_in_dir`]). Dropping it closes
/// both directions: the peer reads the rest, then end of stream, and its writes fail.
pub struct Channel {
    reader: ReadHalf,
    writer: WriteHalf,
}

impl Channel {
    /// A handle on the wake-up descriptors, usable while the halves are busy.
    pub fn wake_fds(&self) -> WakeFds {
        WakeFds {
            core: self.reader.core.clone(),
        }
    }

    pub(crate) fn from_parts(core: Core, tx: Producer, rx: Consumer) -> Channel {
        let core = Arc::new(core);
        Channel {
            reader: ReadHalf {
                rx,
                waiter: Waiter::new(&core),
                core: core.clone(),
            },
            writer: WriteHalf {
                tx,
                shut: false,
                waiter: Waiter::new(&core),
                core,
            },
        }
    }

    /// Splits the channel into halves that can be used from two threads.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        (self.reader, self.writer)
    }

    /// Reassembles halves that came from one [`Channel::split`]; gives them back if
    /// they belong to different channels.
    #[allow(clippy::result_large_err)] // mirrors tokio's `ReuniteError`: hand both halves back
    pub fn unsplit(reader: ReadHalf, writer: WriteHalf) -> Result<Channel, (ReadHalf, WriteHalf)> {
        if Arc::ptr_eq(&reader.core, &writer.core) {
            Ok(Channel { reader, writer })
        } else {
            Err((reader, writer))
        }
    }

    /// The reading half.
    pub fn reader(&mut self) -> &mut ReadHalf {
        &mut self.reader
    }

    /// The writing half.
    pub fn writer(&mut self) -> &mut WriteHalf {
        &mut self.writer
    }

    /// Ends our sending direction (like `shutdown(SHUT_WR)`).
    pub fn shutdown_write(&mut self) {
        self.writer.shutdown()
    }

    /// Sets both halves non-blocking (or blocking again).
    pub fn set_nonblocking(&mut self, on: bool) {
        self.reader.set_nonblocking(on);
        self.writer.set_nonblocking(on);
    }

    /// Ring bytes per direction.
    pub fn capacity(&self) -> usize {
        self.reader.core.header.layout().capacity
    }

    /// Shared memory this channel maps (both rings and the header).
    pub fn segment_len(&self) -> usize {
        self.reader.core.segment.len()
    }

    /// The Unix socket the channel was set up over, if it has one: it stays open as
    /// the liveness link and may carry the connection layer's control messages.
    pub fn control_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.reader.core.control_fd()
    }

    /// How the ends sleep and wake each other.
    pub fn wake_mode(&self) -> WakeMode {
        self.reader.core.wake_mode()
    }

    /// True if the peer closed the whole channel in an orderly way.
    pub fn peer_closed(&self) -> bool {
        self.reader.core.peer_closed()
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
