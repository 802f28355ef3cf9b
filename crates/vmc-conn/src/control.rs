//! The control channel beside a connection: how its two ends exchange the
//! protocol's frames ([`Control`]: SWITCH, LEFT, REWIND, SPILL).
//!
//! [`ControlChannel`] is what the connection needs of it: send a frame, take the
//! frames that have arrived without waiting, and a descriptor to wait on. Today's
//! one is the Unix socket the channel was set up over ([`UnixControl`]); a channel
//! between two VMs, which share no kernel, will carry the frames in the shared
//! segment itself.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::net::{recv, send, RecvFlags, SendFlags};

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
}

/// The frames over a Unix stream socket: 16 bytes each, read as they come (a
/// frame may arrive in pieces).
pub(crate) struct UnixControl {
    socket: Socket,
    /// A frame received in part.
    partial: Mutex<([u8; SWITCH_LEN], usize)>,
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
            partial: Mutex::new(([0; SWITCH_LEN], 0)),
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
        let mut partial = lock(&self.partial);
        let (frame, len) = &mut *partial;
        loop {
            match recv(self.fd(), &mut frame[*len..], RecvFlags::DONTWAIT) {
                Ok((0, _)) | Err(rustix::io::Errno::CONNRESET) => return Ok(Drained::Closed),
                Ok((n, _)) => {
                    *len += n;
                    if *len == SWITCH_LEN {
                        *len = 0;
                        let c = Control::parse(frame).map_err(|e| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("vmc connection: {e}"),
                            )
                        })?;
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
}
