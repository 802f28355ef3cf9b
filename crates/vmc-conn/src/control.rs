//! The control channel beside a connection: how its two ends exchange the
//! protocol's frames ([`Control`]: SWITCH, LEFT, REWIND, SPILL).
//!
//! [`ControlChannel`] is what the connection needs of it: send a frame, take the
//! frames that have arrived without waiting, and a descriptor to wait on. Two carry
//! them:
//!
//! * [`UnixControl`]: the Unix socket the channel was set up over (what
//!   connections use today);
//! * [`ChannelControl`]: a vmc channel of its own, two rings in shared memory and
//!   nothing else, which is all two VMs share (no descriptor passes over it, and
//!   its indices and frames are checked like any a peer writes).
//!
//! Both share one frame reader ([`FrameReader`]): frames are 16 bytes and may
//! arrive in pieces.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::net::{recv, send, RecvFlags, SendFlags};

use vmc_channel::{Channel, ReadHalf, WakeFds, WakeMode, WriteHalf};

use crate::wire::{Control, SWITCH_LEN};

/// What [`ControlChannel::drain`] found after the frames it handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Nothing more for now.
    Open,
    /// The peer's end is gone (it closed, exec'd or died): nothing more will come.
    Closed,
}

/// How the two ends of a connection exchange control frames.
///
/// # The contract the protocol relies on
///
/// 1. **Visible on return.** Once `send` returns `Ok`, the frame is there for the
///    peer's next `drain`. A sender announces a move off the ring and only then
///    pauses it; a receiver that finds the ring paused drains the channel and
///    must find the SWITCH, or it would take the pause for the end of the
///    stream. (A Unix socket queues a frame before `send` returns; a ring in
///    shared memory publishes it before the ring's pause is stored.)
/// 2. **In order.** Frames are drained in the order they were sent. Both
///    directions of a connection share the channel, so a SWITCH sent before a
///    REWIND is read before it, and the protocol counts on that.
/// 3. **The close comes last.** [`Drained::Closed`] is reported only after every
///    frame sent before the peer's end closed has been handed over: a REWIND
///    sent before an exec is served, and once the close is seen no frame can
///    come (see `Sender::control_closed`).
/// 4. **Sends to a closed end fail.** A frame is never dropped silently while
///    `send` says `Ok`: once the peer's end is gone, `send` returns an error.
/// 5. **A last word is exact.** After [`ControlChannel::shut_read`] the peer's
///    sends fail, and every frame whose send succeeded before is still drained:
///    no frame falls in between. An end about to exec shuts reading, then drains
///    a last time, so a REWIND the peer sends meanwhile is either served or never
///    sent (and the peer reads on from the ring, whose memory it keeps).
///
/// What test channels may vary is therefore when the other end looks (a stall)
/// and when the channel closes (a cut), never the order of frames or their
/// visibility after `send`. The simulation (`proto/sim.rs`) does both.
pub(crate) trait ControlChannel: Send + Sync {
    /// Sends `frame`, waiting for room if the channel is full.
    fn send(&self, frame: Control) -> io::Result<()>;

    /// Hands every complete frame that has arrived to `f`, in order, without
    /// waiting. A frame that is not well formed is an `InvalidData` error (the
    /// peer is confused or hostile; the connection cannot go on with it).
    fn drain(&self, f: &mut dyn FnMut(Control)) -> io::Result<Drained>;

    /// A descriptor that turns readable when a frame may have arrived or the peer's
    /// end closed (for `poll` and event loops).
    fn wait_fd(&self) -> BorrowedFd<'_>;

    /// From now on the peer's sends fail; frames sent before are still drained
    /// (point 5 of the contract). `Unsupported` if the carrier cannot do it
    /// exactly.
    fn shut_read(&self) -> io::Result<()>;
}

/// Reassembles frames from a byte stream that may cut them anywhere, and checks
/// each one whole.
#[derive(Default)]
pub(crate) struct FrameReader {
    buf: [u8; SWITCH_LEN],
    len: usize,
}

impl FrameReader {
    /// Where the next bytes of the stream go (read at most this many).
    fn room(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// `n` bytes were read into [`FrameReader::room`]: the frame they complete, if
    /// they complete one; `InvalidData` naming the field if it is not well formed.
    fn filled(&mut self, n: usize) -> io::Result<Option<Control>> {
        self.len += n;
        debug_assert!(self.len <= SWITCH_LEN);
        if self.len < SWITCH_LEN {
            return Ok(None);
        }
        self.len = 0;
        Control::parse(&self.buf)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("vmc connection: {e}")))
    }
}

/// The frames over a Unix stream socket, read as they come.
pub(crate) struct UnixControl {
    socket: Socket,
    /// A frame received in part.
    partial: Mutex<FrameReader>,
    /// Serialises senders (both halves of a connection send).
    sending: Mutex<()>,
}

/// Who keeps the socket open.
enum Socket {
    /// The channel, whose liveness link it is.
    Channel(vmc_channel::WakeFds),
    /// This channel alone (tests).
    #[cfg(test)]
    Own(std::os::fd::OwnedFd),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UnixControl {
    /// The control socket of a channel set up over one; `None` for a channel
    /// without.
    pub(crate) fn new(wake: vmc_channel::WakeFds) -> Option<UnixControl> {
        wake.control_fd()?;
        Some(UnixControl::with(Socket::Channel(wake)))
    }

    fn with(socket: Socket) -> UnixControl {
        UnixControl {
            socket,
            partial: Mutex::new(FrameReader::default()),
            sending: Mutex::new(()),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            Socket::Channel(wake) => wake
                .control_fd()
                .expect("checked when the control channel was made"),
            #[cfg(test)]
            Socket::Own(fd) => std::os::fd::AsFd::as_fd(fd),
        }
    }
}

impl ControlChannel for UnixControl {
    fn send(&self, frame: Control) -> io::Result<()> {
        let frame = frame.emit();
        let _serial = lock(&self.sending);
        let mut sent = 0;
        while sent < frame.len() {
            match send(self.fd(), &frame[sent..], SendFlags::NOSIGNAL) {
                Ok(n) => sent += n,
                Err(rustix::io::Errno::INTR) => {}
                // A listener's socket is non-blocking: wait for room as a blocking
                // one would.
                Err(rustix::io::Errno::AGAIN) => {
                    let mut fds = [PollFd::from_borrowed_fd(self.fd(), PollFlags::OUT)];
                    match poll(&mut fds, None) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn drain(&self, f: &mut dyn FnMut(Control)) -> io::Result<Drained> {
        let mut frames = lock(&self.partial);
        loop {
            match recv(self.fd(), frames.room(), RecvFlags::DONTWAIT) {
                Ok((0, _)) | Err(rustix::io::Errno::CONNRESET) => return Ok(Drained::Closed),
                Ok((n, _)) => {
                    if let Some(c) = frames.filled(n)? {
                        f(c);
                    }
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(Drained::Open),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }

    /// `shutdown(SHUT_RD)`: the kernel marks the peer's end as unable to send
    /// under the same lock its `send` takes to queue a frame, so a frame is
    /// either queued before (and still read here) or refused with `EPIPE`.
    fn shut_read(&self) -> io::Result<()> {
        rustix::net::shutdown(self.fd(), rustix::net::Shutdown::Read)?;
        Ok(())
    }
}

/// The frames through a vmc channel of their own (an eventfd channel: its
/// reader's wake-up descriptor is what a waiter polls).
///
/// The peer's end is gone when its writer closed (a process that exits closes
/// its ends) or when the channel's liveness check says it died.
///
/// Connections on one host keep [`UnixControl`] (it costs no second segment); this
/// one is for peers without a common kernel, which get their control channel from
/// the region they share (issue 12). Tested here meanwhile.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct ChannelControl {
    reader: Mutex<(ReadHalf, FrameReader)>,
    /// Serialises senders (both halves of a connection send); waits for room.
    writer: Mutex<WriteHalf>,
    /// The reader's wake-up descriptor, reachable without its lock.
    wake: WakeFds,
}

#[cfg_attr(not(test), allow(dead_code))]
impl ChannelControl {
    /// Carries frames over `channel`, which must wake with eventfds (the other modes
    /// have no descriptor to wait on).
    pub(crate) fn new(channel: Channel) -> io::Result<ChannelControl> {
        if channel.wake_mode() != WakeMode::EventFd {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "vmc connection: a control channel needs eventfd wake-ups, not {}",
                    channel.wake_mode().name()
                ),
            ));
        }
        let wake = channel.wake_fds();
        let (mut r, w) = channel.split();
        r.set_nonblocking(true);
        r.arm();
        Ok(ChannelControl {
            reader: Mutex::new((r, FrameReader::default())),
            writer: Mutex::new(w),
            wake,
        })
    }
}

impl ControlChannel for ChannelControl {
    fn send(&self, frame: Control) -> io::Result<()> {
        let frame = frame.emit();
        let mut w = lock(&self.writer);
        // A dead peer's ring may still have room: the write would succeed, and the
        // frame be lost while `send` said Ok (see the contract, point 4).
        if !w.peer_alive() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "vmc connection: the control channel's peer is gone",
            ));
        }
        let mut sent = 0;
        while sent < frame.len() {
            sent += w.write(&frame[sent..])?;
        }
        Ok(())
    }

    fn drain(&self, f: &mut dyn FnMut(Control)) -> io::Result<Drained> {
        let mut guard = lock(&self.reader);
        let (r, frames) = &mut *guard;
        // Notifications first, then the ring, then arm: a frame written after the
        // look is either seen by `arm` (which then arms nothing: look again) or
        // rings the descriptor.
        r.clear_wake()?;
        loop {
            r.disarm();
            match r.read(frames.room()) {
                Ok(0) => return Ok(Drained::Closed),
                Ok(n) => {
                    if let Some(c) = frames.filled(n)? {
                        f(c);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !r.peer_alive() {
                        return Ok(Drained::Closed);
                    }
                    if r.arm() {
                        return Ok(Drained::Open);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.wake
            .read()
            .expect("an eventfd channel (checked in new)")
    }

    /// Not exactly, yet: the peer's writer checks that the reader is open before
    /// it publishes a frame, so a close between the two would lose the frame. It
    /// needs a close the writer's publication can fail against (a compare-and-swap
    /// on the ring's index), which the VM work (issue 12) brings.
    fn shut_read(&self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "vmc connection: a shared-memory control channel cannot be shut exactly",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Path, Switch};

    /// The frames a Unix socket carries, whole or in pieces, and its end.
    #[test]
    fn unix_control_reassembles_frames_and_reports_the_end() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let ctl = UnixControl::with(Socket::Own(a.into()));
        let mut b = b;
        let frames = [
            Control::Switch(Switch {
                to: Path::Shm,
                offset: 7,
            }),
            Control::LeftRing(9),
        ];
        use std::io::Write;
        let bytes: Vec<u8> = frames.iter().flat_map(|c| c.emit()).collect();
        b.write_all(&bytes[..5]).unwrap();
        let mut got = Vec::new();
        assert_eq!(ctl.drain(&mut |c| got.push(c)).unwrap(), Drained::Open);
        assert!(got.is_empty(), "a frame in part is kept");
        b.write_all(&bytes[5..]).unwrap();
        assert_eq!(ctl.drain(&mut |c| got.push(c)).unwrap(), Drained::Open);
        assert_eq!(got, frames);
        ctl.send(Control::Rewind(3)).unwrap();
        let mut back = [0u8; SWITCH_LEN];
        std::io::Read::read_exact(&mut b, &mut back).unwrap();
        assert_eq!(Control::parse(&back), Ok(Control::Rewind(3)));
        b.write_all(&[0xff; SWITCH_LEN]).unwrap();
        let e = ctl.drain(&mut |_| {}).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        drop(b);
        assert_eq!(ctl.drain(&mut |_| {}).unwrap(), Drained::Closed);
    }

    /// After `shut_read` the peer's sends fail, and what it sent before is still
    /// drained.
    #[test]
    fn a_shut_unix_control_keeps_what_came_and_refuses_what_comes() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (a, b) = (
            UnixControl::with(Socket::Own(a.into())),
            UnixControl::with(Socket::Own(b.into())),
        );
        b.send(Control::Rewind(4)).unwrap();
        a.shut_read().unwrap();
        let e = b.send(Control::Rewind(5)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
        let mut got = Vec::new();
        assert_eq!(a.drain(&mut |c| got.push(c)).unwrap(), Drained::Closed);
        assert_eq!(got, [Control::Rewind(4)]);
        // Our own sends still go: the peer reads on.
        a.send(Control::LeftRing(1)).unwrap();
        let mut back = Vec::new();
        b.drain(&mut |c| back.push(c)).unwrap();
        assert_eq!(back, [Control::LeftRing(1)]);
    }

    fn readable(fd: BorrowedFd<'_>, ms: i32) -> bool {
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        let t = rustix::event::Timespec {
            tv_sec: i64::from(ms / 1000),
            tv_nsec: i64::from(ms % 1000) * 1_000_000,
        };
        poll(&mut fds, Some(&t)).unwrap() == 1
    }

    fn eventfd_pair() -> (Channel, Channel) {
        let config = vmc_channel::ChannelConfig {
            capacity: 4096,
            wake: WakeMode::EventFd,
            ..Default::default()
        };
        Channel::pair(&config).unwrap()
    }

    /// A frame reader takes a stream cut anywhere and checks each frame whole.
    #[test]
    fn the_frame_reader_reassembles_and_checks() {
        let mut r = FrameReader::default();
        let bytes = Control::LeftTcp(5).emit();
        for (i, b) in bytes.iter().enumerate() {
            r.room()[0] = *b;
            let got = r.filled(1).unwrap();
            assert_eq!(got.is_some(), i == SWITCH_LEN - 1);
        }
        r.room().copy_from_slice(&[0xee; SWITCH_LEN]);
        assert_eq!(
            r.filled(SWITCH_LEN).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    /// Frames through shared memory only: in order, the waiter's descriptor turns
    /// readable when one comes and quiet once taken, and the peer's end is seen.
    #[test]
    fn channel_control_carries_frames_and_reports_the_end() {
        let (a, b) = eventfd_pair();
        let (a, b) = (
            ChannelControl::new(a).unwrap(),
            ChannelControl::new(b).unwrap(),
        );
        let mut got = Vec::new();
        assert_eq!(b.drain(&mut |c| got.push(c)).unwrap(), Drained::Open);
        assert!(!readable(b.wait_fd(), 0));
        let frames = [
            Control::Switch(Switch {
                to: Path::Shm,
                offset: 1 << 40,
            }),
            Control::Rewind(3),
            Control::Spill(9),
        ];
        for f in frames {
            a.send(f).unwrap();
        }
        assert!(readable(b.wait_fd(), 1000), "a frame rings the waiter");
        assert_eq!(b.drain(&mut |c| got.push(c)).unwrap(), Drained::Open);
        assert_eq!(got, frames);
        assert!(
            !readable(b.wait_fd(), 0),
            "taken: quiet until the next frame"
        );
        b.send(Control::LeftRing(4)).unwrap();
        let mut back = Vec::new();
        assert_eq!(a.drain(&mut |c| back.push(c)).unwrap(), Drained::Open);
        assert_eq!(back, [Control::LeftRing(4)]);
        drop(a);
        assert_eq!(b.drain(&mut |_| {}).unwrap(), Drained::Closed);
        assert!(b.send(Control::LeftTcp(5)).is_err(), "nobody to send to");
    }

    /// What a peer writes is checked: garbage is `InvalidData`, not a frame.
    #[test]
    fn channel_control_refuses_garbage() {
        let (mut raw, b) = eventfd_pair();
        let b = ChannelControl::new(b).unwrap();
        raw.writer().write(&[0xff; SWITCH_LEN]).unwrap();
        let e = b.drain(&mut |_| panic!("not a frame")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    /// A channel without a descriptor to wait on cannot carry control frames.
    #[test]
    fn channel_control_needs_eventfds() {
        let (a, _b) = Channel::pair(&vmc_channel::ChannelConfig::default()).unwrap();
        let e = ChannelControl::new(a).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }

    /// Two threads answer each other's frames, each sleeping on its descriptor
    /// between them: no wake-up is lost (a lost one hangs the poll, which the
    /// bounded wait reports), and a full ring makes the sender wait, not fail.
    #[test]
    fn channel_control_frames_ping_pong_without_a_lost_wake_up() {
        const ROUNDS: u64 = 5_000;
        let (a, b) = eventfd_pair();
        let (a, b) = (
            ChannelControl::new(a).unwrap(),
            ChannelControl::new(b).unwrap(),
        );
        /// The next frame, sleeping on the descriptor while there is none.
        fn next(ctl: &ChannelControl, queue: &mut std::collections::VecDeque<Control>) -> Control {
            loop {
                if let Some(c) = queue.pop_front() {
                    return c;
                }
                assert_eq!(
                    ctl.drain(&mut |c| queue.push_back(c)).unwrap(),
                    Drained::Open
                );
                if queue.is_empty() {
                    assert!(readable(ctl.wait_fd(), 5000), "a wake-up was lost");
                }
            }
        }
        let echo = std::thread::spawn(move || {
            let mut q = Default::default();
            for i in 0..ROUNDS {
                assert_eq!(next(&b, &mut q), Control::Rewind(i));
                b.send(Control::LeftTcp(i)).unwrap();
            }
            b
        });
        let mut q = Default::default();
        for i in 0..ROUNDS {
            a.send(Control::Rewind(i)).unwrap();
            assert_eq!(next(&a, &mut q), Control::LeftTcp(i));
        }
        let b = echo.join().unwrap();
        // 4096 bytes hold 256 frames: more than that waits for the reader.
        let flood = std::thread::spawn(move || {
            for i in 0..1000 {
                a.send(Control::Spill(i)).unwrap();
            }
            a
        });
        let mut q = Default::default();
        for i in 0..1000 {
            assert_eq!(next(&b, &mut q), Control::Spill(i));
        }
        drop(flood.join().unwrap());
        assert_eq!(b.drain(&mut |_| {}).unwrap(), Drained::Closed);
    }
}
