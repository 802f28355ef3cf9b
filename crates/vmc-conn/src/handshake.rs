//! How the two ends of a TCP connection find each other and set a channel up
//! beside it, whichever process accepted it.
//!
//! ```text
//!   client                                         accepting process
//!   connect() ─────────────── TCP ───────────────▶ accept()
//!   bind + listen offers/o-<ns>-<4-tuple>.sock
//!   (first bytes on TCP)                           connect offers/o-<ns>-<4-tuple>.sock
//!                            ◀── ATTACH(4-tuple) + HELLO(memfd) ──
//!   accept, unlink, check ATTACH, map ── ACK ────▶
//! ```
//!
//! The client learns from the registry that a vmc process listens on the
//! destination, then binds an *offer socket* named by the listener's network
//! namespace and the connection's 4-tuple ([`wire::offer_name`]) before its
//! `connect` returns. The process that accepts the connection (the listener's, a
//! forked worker, a thread, one the listener was handed to) computes the same name
//! from what the kernel tells it, calls, and offers the channel: ATTACH with the
//! 4-tuple as it sees it, then the channel's HELLO. The client attaches only if the
//! ATTACH mirrors its own 4-tuple. Nobody ever takes a handshake meant for another
//! process: there is one socket per connection, and only the process holding the
//! accepted connection knows to call it.
//!
//! The accepting side looks at once (the client has usually bound by the time its
//! connection is accepted), but may be early (the client's `connect` is still
//! returning); so it looks again when the client's first bytes arrive on TCP (a vmc
//! client binds before it sends anything, so a miss then is final), and, for
//! clients that wait for the server to speak first, at growing intervals from a
//! millisecond on, until [`ATTACH_WINDOW`] after accepting. A client whose call never comes
//! gives its offer up after [`OFFER_TTL`]. Either side giving up leaves the
//! connection on TCP, where it already is.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::net::SocketFlags;
use vmc_channel::{Channel, ChannelConfig, Offer, WakeMode};

use crate::fallback::Fallback;
use crate::registry::NetNs;
use crate::wire::{self, ATTACH_LEN};

/// How long after accepting a connection its accepting side still looks for the
/// client's offer socket. A vmc client binds it before its `connect` returns; the
/// window only bounds how long a connection from a plain client is looked at.
pub const ATTACH_WINDOW: Duration = Duration::from_millis(200);

/// How long a client keeps its offer socket for a call that does not come (the
/// accepting process does not run vmc, or accepts late).
pub const OFFER_TTL: Duration = Duration::from_secs(2);

/// The first wait between two looks of the accepting side (it grows fourfold).
const FIRST_RETRY: Duration = Duration::from_millis(1);

/// Only our own user may take part in a handshake (the directory is 0700 too).
fn check_peer(sock: BorrowedFd<'_>) -> io::Result<rustix::net::UCred> {
    let cred = rustix::net::sockopt::socket_peercred(sock)?;
    if cred.uid.as_raw() != vmc_os::euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "vmc handshake from another user",
        ));
    }
    Ok(cred)
}

/// The client's end of a handshake in flight: its offer socket, waiting for the
/// accepting process's call.
pub(crate) struct OfferSocket {
    listener: Arc<UnixListener>,
    path: PathBuf,
    /// The process that bound the socket: only it removes the file (a forked
    /// child's copy of the connection is abandoned, not closed).
    owner: u32,
    unlinked: bool,
    /// The connection as the client sees it.
    local: SocketAddr,
    peer: SocketAddr,
    deadline: Instant,
}

impl OfferSocket {
    /// Binds the offer socket of the connection `local` -> `peer`, to a listener in
    /// `netns` whose processes look in `offers`.
    pub(crate) fn bind(
        offers: &Path,
        netns: NetNs,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> io::Result<OfferSocket> {
        let path = offers.join(wire::offer_name(netns.ino, local, peer));
        let listener = match vmc_os::unix::listen_nonblocking(&path, 1) {
            // Left by a client killed during a handshake of an earlier connection
            // with this 4-tuple (a live one would hold the 4-tuple still).
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let _ = std::fs::remove_file(&path);
                vmc_os::unix::listen_nonblocking(&path, 1)?
            }
            r => r?,
        };
        Ok(OfferSocket {
            listener: Arc::new(listener),
            path,
            owner: vmc_os::pid(),
            unlinked: false,
            local,
            peer,
            deadline: Instant::now() + OFFER_TTL,
        })
    }

    /// The socket, to wait on (readable when the call comes).
    pub(crate) fn watch(&self) -> Arc<UnixListener> {
        Arc::clone(&self.listener)
    }

    fn unlink(&mut self) {
        if !self.unlinked && vmc_os::pid() == self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
        self.unlinked = true;
    }

    /// Takes the call if it came: the attached channel, `Ok(None)` if nobody
    /// called yet, an error (the connection stays TCP) if the call was not
    /// the accepting end of this connection, or none came in time.
    pub(crate) fn answer(&mut self, spin: Duration) -> Result<Option<Channel>, Fallback> {
        let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
        let sock = match rustix::net::accept_with(&*self.listener, flags) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {
                if Instant::now() < self.deadline {
                    return Ok(None);
                }
                self.unlink();
                return Err(Fallback::ListenerGone);
            }
            Err(e) => return Err(Fallback::Handshake(format!("offer socket: {e}"))),
        };
        // One call per connection: nobody else may reach the socket now.
        self.unlink();
        let failed = |e: io::Error| Fallback::Handshake(e.to_string());
        let sock = vmc_os::fdspace::lift(sock).map_err(failed)?;
        check_peer(sock.as_fd()).map_err(failed)?;
        let seen =
            read_attach(&sock, Instant::now() + vmc_channel::HANDSHAKE_TIMEOUT).map_err(failed)?;
        let mirror = (wire::canonical(self.peer), wire::canonical(self.local));
        if seen != mirror {
            return Err(Fallback::NotMatched);
        }
        Channel::attach_over_reusing(sock, spin)
            .map(Some)
            .map_err(failed)
    }
}

impl Drop for OfferSocket {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// Reads a whole ATTACH from `sock` (non-blocking), waiting at most until
/// `deadline`; returns the 4-tuple it names.
fn read_attach(
    sock: &OwnedFd,
    deadline: Instant,
) -> io::Result<((std::net::Ipv6Addr, u16), (std::net::Ipv6Addr, u16))> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut frame = [0u8; ATTACH_LEN];
    let mut got = 0;
    while got < ATTACH_LEN {
        match rustix::io::read(sock, &mut frame[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "vmc handshake: no ATTACH in time",
                    ));
                }
                let t = Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: i64::from(left.subsec_nanos()),
                };
                let mut fds = [PollFd::new(sock, PollFlags::IN)];
                let _ = poll(&mut fds, Some(&t));
            }
            Err(e) => return Err(e.into()),
        }
    }
    wire::parse_attach(&frame)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "vmc handshake: not an ATTACH"))
}

/// The accepting side's end of a handshake not begun yet: where the client's
/// offer socket would be, and when to look again.
pub(crate) struct Call {
    path: PathBuf,
    /// The connection as this side sees it.
    peer: SocketAddr,
    local: SocketAddr,
    deadline: Instant,
    next: Instant,
    wait: Duration,
    /// TCP bytes received when we last looked.
    seen_tcp_in: u64,
    /// The listener's registration, kept while we look: a client looks its entry
    /// up after its `connect` returns, which may be after the listener is gone.
    _listed: Arc<dyn Send + Sync>,
}

/// What one look of the accepting side found.
pub(crate) enum Called {
    /// The channel is offered; the client has not answered yet.
    Offered(Box<Offer>),
    /// No offer socket (yet): look again when [`Call::due`] says so.
    NotYet,
    /// Not to be accelerated: stop looking.
    Never(Fallback),
}

impl Call {
    /// The handshake of the connection accepted from a listener in `netns`,
    /// seen as `peer` -> `local`, whose clients bind in `offers`.
    pub(crate) fn new(
        offers: &Path,
        netns: NetNs,
        peer: SocketAddr,
        local: SocketAddr,
        listed: Arc<dyn Send + Sync>,
    ) -> Call {
        let now = Instant::now();
        Call {
            path: offers.join(wire::offer_name(netns.ino, peer, local)),
            peer,
            local,
            deadline: now + ATTACH_WINDOW,
            next: now,
            wait: FIRST_RETRY,
            seen_tcp_in: 0,
            _listed: listed,
        }
    }

    /// The connection's local address, as this side sees it.
    pub(crate) fn local(&self) -> SocketAddr {
        self.local
    }

    /// The connection's peer address, as this side sees it.
    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// When the accepting side stops looking.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether to look now, `tcp_in` bytes having arrived on TCP so far: new bytes
    /// always make it worth a look, otherwise at growing intervals.
    pub(crate) fn due(&self, tcp_in: u64) -> bool {
        tcp_in > self.seen_tcp_in || Instant::now() >= self.next
    }

    /// Looks for the client's offer socket and, if it is there, offers the
    /// channel on it. `tcp_in`: TCP bytes received so far.
    pub(crate) fn call(&mut self, tcp_in: u64) -> Called {
        let had_bytes = tcp_in > 0;
        self.seen_tcp_in = tcp_in;
        match self.try_offer() {
            Ok(Some(offer)) => Called::Offered(Box::new(offer)),
            // A vmc client binds before it sends: after its bytes, a miss is final.
            Ok(None) if had_bytes => Called::Never(Fallback::PeerNotVmc),
            Ok(None) => {
                let now = Instant::now();
                if now >= self.deadline {
                    return Called::Never(Fallback::PeerNotVmc);
                }
                self.next = now + self.wait;
                self.wait *= 4;
                Called::NotYet
            }
            Err(e) => Called::Never(Fallback::Handshake(e.to_string())),
        }
    }

    fn try_offer(&self) -> io::Result<Option<Offer>> {
        let sock = match vmc_os::unix::connect_nonblocking(&self.path) {
            Ok(s) => s,
            // Not bound (yet), bound but not listening yet, or its one place
            // taken by somebody else's call.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ECONNREFUSED | libc::EAGAIN)
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let cred = check_peer(sock.as_fd())?;
        let frame = wire::attach(self.local, self.peer);
        vmc_os::send_with_fds_by(
            sock.as_fd(),
            &frame,
            &[],
            Instant::now() + vmc_channel::HANDSHAKE_TIMEOUT,
        )?;
        // Event loops need a descriptor to wait on for ring wake-ups.
        let config = ChannelConfig {
            wake: WakeMode::EventFd,
            ..ChannelConfig::from_env()
        };
        // Segments of earlier channels with the client's process are used again.
        let key = format!("pid:{}", cred.pid.as_raw_nonzero());
        Channel::offer_over_reusing(sock, &config, &key).map(Some)
    }
}
