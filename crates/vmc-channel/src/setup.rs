//! Setting a channel up: who creates the segment, how the peer gets it, how both
//! agree on the way they wake each other.
//!
//! # Over a Unix socket (the default)
//! The creator makes a sealed memfd, lays the channel out in it and sends it with one
//! `HELLO` message; the attacher checks and maps it and answers `ACK`. The socket
//! stays open afterwards as the liveness link: the kernel hangs it up when the peer
//! dies, however it dies. Any connected Unix stream socket will do
//! ([`Channel::create_over`], [`Channel::attach_over`]); [`ChannelListener`] and
//! [`Channel::connect`] are the rendezvous on a socket path.
//!
//! ```text
//!   HELLO  creator -> attacher   "VMC1" kind:u8 wake:u8 0:u16 segment_len:u64
//!                                fds: memfd [+ eventfd read, eventfd write]
//!   ACK    attacher -> creator   "VMCA" status:u8 0:u8 0:u16
//!                                fds: [eventfd read, eventfd write]
//!
//!   HELLO  (reuse, kind 2)       "VMC1" 2:u8 wake:u8 0:u16 segment_inode:u64
//!                                no fds: a spare both sides kept (see [`crate::pool`])
//!   ACK                          status 0 (no fds), or 2 (UNKNOWN: no such spare;
//!                                the creator then sends a kind 1 HELLO)
//! ```
//!
//! The messages are checked types ([`crate::hello`]): anything a correct peer would
//! not send is an `InvalidData` error naming the field.
//!
//! # Over a directory
//! For peers that share a directory but cannot pass descriptors (containers sharing
//! /dev/shm): [`Channel::create_in_dir`] makes a file segment and returns its name,
//! which travels to the peer by any means; [`Channel::attach_in_dir`] opens it. Liveness
//! is the OFD lock each end holds on the file; wake-ups use the futex (or polling).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmc_os::{EventFd, Segment, SegmentDir};
use vmc_ring::{ChannelLayout, Endpoint, SideState};

use crate::channel::{ring_error, Channel};
use crate::config::{ChannelConfig, WakeMode};
use crate::core::{Core, Link, Signals};
use crate::hello::{Ack, HandshakeError, Hello, ACK_LEN, HELLO_LEN};
use crate::pool::{self, Reuse};

/// How long a handshake may wait for the other side before giving up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("vmc handshake: {}", msg.into()),
    )
}

/// When a handshake step begun now must be over. Each step waits through `poll`
/// with this deadline, so the socket's own options and blocking mode stay as they
/// are (no system calls to set and reset timeouts on every connection).
fn handshake_deadline() -> Instant {
    Instant::now() + HANDSHAKE_TIMEOUT
}

fn map_err_timeout(e: io::Error, what: &str) -> io::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("vmc handshake: no {what} within {HANDSHAKE_TIMEOUT:?}"),
        )
    } else {
        e
    }
}

/// Maps a segment and builds the ring endpoint on it.
fn endpoint(
    segment: &Arc<Segment>,
    config: Option<&ChannelConfig>,
    wake: WakeMode,
) -> io::Result<Endpoint> {
    let owner: vmc_ring::ring::Owner = segment.clone();
    let pid = vmc_os::pid();
    // SAFETY: the segment's mapping is page aligned, `len()` bytes long and stays
    // mapped while `owner` (the segment) lives; in this process only the endpoint
    // built here touches it.
    let ep = unsafe {
        match config {
            Some(c) => Endpoint::create(
                segment.as_ptr(),
                segment.len(),
                owner,
                c.capacity,
                pid,
                wake.kind(),
            ),
            None => Endpoint::attach(segment.as_ptr(), segment.len(), owner, pid, wake.kind()),
        }
    };
    ep.map_err(ring_error)
}

fn assemble(
    ep: Endpoint,
    segment: Arc<Segment>,
    signals: Signals,
    link: Link,
    spin: Duration,
) -> Channel {
    assemble_reusable(ep, segment, signals, link, spin, None)
}

fn assemble_reusable(
    ep: Endpoint,
    segment: Arc<Segment>,
    signals: Signals,
    link: Link,
    spin: Duration,
    reuse: Option<Reuse>,
) -> Channel {
    let core = Core {
        abandoned: std::sync::atomic::AtomicBool::new(false),
        header: ep.header,
        signals,
        link,
        segment,
        spin,
        reuse,
        forks_seen: vmc_os::proc::forks_seen(),
    };
    Channel::from_parts(core, ep.tx, ep.rx)
}

/// The creator's half of a socket handshake, between `HELLO` and `ACK`.
pub struct Offer {
    sock: OwnedFd,
    segment: Arc<Segment>,
    endpoint: Endpoint,
    mine: Option<[EventFd; 2]>,
    /// A reused spare's eventfds of the peer (the ACK then carries none).
    peer: Option<[EventFd; 2]>,
    config: ChannelConfig,
    /// Offered with reuse in mind: the peer's key in the pool, and the inode of
    /// the reused segment.
    reuse: Option<(Arc<str>, Option<u64>)>,
}

impl Offer {
    /// The handshake socket: readable once the attacher answered (or left).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// [`Offer::finish`] if the attacher has answered (or left), else the offer back.
    pub fn try_finish(self) -> io::Result<Result<Channel, Offer>> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.sock, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let n = loop {
            match poll(&mut fds, Some(&zero)) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Ok(Err(self));
        }
        self.finish().map(Ok)
    }

    /// Waits for the attacher's `ACK` and returns the creator's end of the channel.
    pub fn finish(self) -> io::Result<Channel> {
        let mut msg = [0u8; ACK_LEN];
        let want = if self.mine.is_some() && self.peer.is_none() {
            2
        } else {
            0
        };
        let (n, fds) =
            vmc_os::recv_with_fds_by(self.sock.as_fd(), &mut msg, want, handshake_deadline())
                .map_err(|e| map_err_timeout(e, "ACK"))?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "vmc handshake: peer left before ACK",
            ));
        }
        let ack = Ack::parse(&msg[..n]).map_err(|e| protocol_error(e.to_string()))?;
        if ack == Ack::Unknown && self.peer.is_some() && fds.is_empty() {
            // The attacher no longer keeps that segment: offer a new one on the same
            // socket (the spare is dropped).
            let Offer {
                sock,
                config,
                reuse,
                ..
            } = self;
            let mut fresh = Channel::offer_over(sock, &config)?;
            fresh.reuse = reuse.map(|(key, _)| (key, None));
            return fresh.finish();
        }
        if ack != Ack::Ok {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "vmc handshake: peer refused the channel",
            ));
        }
        if !peer_attached(&self.endpoint) {
            return Err(protocol_error("ACK without attaching to the segment"));
        }
        let signals = match (self.mine, self.peer) {
            (Some(mine), Some(peer)) if fds.is_empty() => Signals::EventFd { mine, peer },
            (Some(mine), None) => {
                let peer = two_eventfds(fds)?;
                Signals::EventFd { mine, peer }
            }
            (None, _) if fds.is_empty() => signals_without_fds(self.config.wake),
            _ => return Err(protocol_error("unexpected descriptors with ACK")),
        };
        let reuse = self.reuse.map(|(key, inode)| Reuse::Offered { key, inode });
        Ok(assemble_reusable(
            self.endpoint,
            self.segment,
            signals,
            Link::Socket(self.sock),
            self.config.spin,
            reuse,
        ))
    }
}

/// True once the peer has attached (it may already have closed again: a short-lived
/// peer's bytes must still be read).
fn peer_attached(ep: &Endpoint) -> bool {
    matches!(
        ep.header.peer_state(),
        Some(SideState::Open | SideState::Closed)
    )
}

/// The layout `config` asks for, or an `InvalidInput` error naming the bad capacity.
fn layout_for(config: &ChannelConfig) -> io::Result<ChannelLayout> {
    ChannelLayout::for_capacity(config.capacity)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("vmc channel: {e}")))
}

fn two_eventfds(fds: Vec<OwnedFd>) -> io::Result<[EventFd; 2]> {
    let [r, w]: [OwnedFd; 2] = fds.try_into().map_err(|v: Vec<OwnedFd>| {
        protocol_error(format!("expected 2 eventfds, got {}", v.len()))
    })?;
    Ok([EventFd::from_fd(r), EventFd::from_fd(w)])
}

fn signals_without_fds(mode: WakeMode) -> Signals {
    match mode {
        WakeMode::Poll => Signals::Poll,
        _ => Signals::Futex,
    }
}

fn new_eventfds() -> io::Result<[EventFd; 2]> {
    Ok([EventFd::new()?, EventFd::new()?])
}

impl Channel {
    /// Creator side of a handshake over a connected Unix stream socket, step 1:
    /// creates the segment and sends `HELLO`. Finish with [`Offer::finish`].
    pub fn offer_over(sock: OwnedFd, config: &ChannelConfig) -> io::Result<Offer> {
        let layout = layout_for(config)?;
        let deadline = handshake_deadline();
        let segment = Arc::new(Segment::create_memfd("vmc-channel", layout.segment_len)?);
        let endpoint = endpoint(&segment, Some(config), config.wake)?;
        let mine = match config.wake {
            WakeMode::EventFd => Some(new_eventfds()?),
            _ => None,
        };
        let hello = Hello::Fresh {
            wake: config.wake,
            segment_len: layout.segment_len as u64,
        }
        .emit();
        let mut fds = vec![segment.fd()];
        if let Some(m) = &mine {
            fds.extend(m.iter().map(|e| e.fd()));
        }
        vmc_os::send_with_fds_by(sock.as_fd(), &hello, &fds, deadline)
            .map_err(|e| map_err_timeout(e, "room for HELLO"))?;
        Ok(Offer {
            sock,
            segment,
            endpoint,
            mine,
            peer: None,
            config: config.clone(),
            reuse: None,
        })
    }

    /// [`Channel::offer_over`] between processes that set channels up often: the
    /// segment and eventfds of an earlier channel to the same peer (named by
    /// `peer_key`, any string that tells peers apart) are used again if the peer
    /// left it, and this channel's are kept for the next one (see [`crate::pool`]).
    /// Eventfd channels only (others are offered as by [`Channel::offer_over`]).
    /// The peer must use [`Channel::attach_over_reusing`].
    pub fn offer_over_reusing(
        sock: OwnedFd,
        config: &ChannelConfig,
        peer_key: &str,
    ) -> io::Result<Offer> {
        if config.wake != WakeMode::EventFd || !pool::enabled() {
            return Channel::offer_over(sock, config);
        }
        let layout = layout_for(config)?;
        let Some(spare) = pool::take_offered(peer_key, layout.segment_len) else {
            let mut offer = Channel::offer_over(sock, config)?;
            offer.reuse = Some((Arc::from(peer_key), None));
            return Ok(offer);
        };
        let deadline = handshake_deadline();
        // Laid out again from scratch: indices, states, the attacher's slot.
        let endpoint = endpoint(&spare.segment, Some(config), config.wake)?;
        let hello = Hello::Reuse {
            wake: config.wake,
            inode: spare.inode,
        }
        .emit();
        vmc_os::send_with_fds_by(sock.as_fd(), &hello, &[], deadline)
            .map_err(|e| map_err_timeout(e, "room for HELLO"))?;
        Ok(Offer {
            sock,
            segment: spare.segment,
            endpoint,
            mine: Some(spare.mine),
            peer: Some(spare.peer),
            config: config.clone(),
            reuse: Some((Arc::from(peer_key), Some(spare.inode))),
        })
    }

    /// Creator side of a handshake over a connected Unix stream socket.
    pub fn create_over(sock: OwnedFd, config: &ChannelConfig) -> io::Result<Channel> {
        Channel::offer_over(sock, config)?.finish()
    }

    /// Attacher side of a handshake over a connected Unix stream socket: receives
    /// the segment, checks it, answers. `spin` is this end's spin limit (the other
    /// settings are the creator's).
    pub fn attach_over(sock: OwnedFd, spin: Duration) -> io::Result<Channel> {
        Channel::attach(sock, spin, false)
    }

    /// [`Channel::attach_over`] for a creator using [`Channel::offer_over_reusing`]:
    /// attaches to a spare segment of an earlier channel with that creator if it
    /// asks to, and keeps this channel's for the next one (see [`crate::pool`]).
    pub fn attach_over_reusing(sock: OwnedFd, spin: Duration) -> io::Result<Channel> {
        Channel::attach(sock, spin, pool::enabled())
    }

    fn attach(sock: OwnedFd, spin: Duration, reusing: bool) -> io::Result<Channel> {
        let deadline = handshake_deadline();
        let mut hello = [0u8; HELLO_LEN];
        let (n, fds) = vmc_os::recv_with_fds_by(sock.as_fd(), &mut hello, 3, deadline)
            .map_err(|e| map_err_timeout(e, "HELLO"))?;
        let parsed = Hello::parse(&hello[..n]);
        if let Ok(Hello::Reuse { wake, inode }) = parsed {
            if !fds.is_empty() {
                return Err(protocol_error("descriptors with a REUSE HELLO"));
            }
            let spare = if reusing && wake == WakeMode::EventFd {
                pool::take_attached(inode)
            } else {
                None
            };
            let Some(spare) = spare else {
                // Not (or no longer) kept: the creator offers a new segment next.
                vmc_os::send_with_fds_by(sock.as_fd(), &Ack::Unknown.emit(), &[], deadline)
                    .map_err(|e| map_err_timeout(e, "room for ACK"))?;
                let (n, fds) = vmc_os::recv_with_fds_by(sock.as_fd(), &mut hello, 3, deadline)
                    .map_err(|e| map_err_timeout(e, "HELLO"))?;
                let parsed = Hello::parse(&hello[..n]);
                return Channel::attach_fresh(sock, spin, reusing, deadline, parsed, fds);
            };
            // Checked as any segment a peer hands us.
            let ep = match endpoint(&spare.segment, None, WakeMode::EventFd) {
                Ok(ep) => ep,
                Err(e) => {
                    let _ =
                        vmc_os::send_with_fds_by(sock.as_fd(), &Ack::Refused.emit(), &[], deadline);
                    return Err(e);
                }
            };
            vmc_os::send_with_fds_by(sock.as_fd(), &Ack::Ok.emit(), &[], deadline)
                .map_err(|e| map_err_timeout(e, "room for ACK"))?;
            let signals = Signals::EventFd {
                mine: spare.mine,
                peer: spare.peer,
            };
            let reuse = Some(Reuse::Attached { inode });
            return Ok(assemble_reusable(
                ep,
                spare.segment,
                signals,
                Link::Socket(sock),
                spin,
                reuse,
            ));
        }
        Channel::attach_fresh(sock, spin, reusing, deadline, parsed, fds)
    }

    /// The attacher's side of a `HELLO` with a new segment (already received).
    fn attach_fresh(
        sock: OwnedFd,
        spin: Duration,
        reusing: bool,
        deadline: Instant,
        hello: Result<Hello, HandshakeError>,
        mut fds: Vec<OwnedFd>,
    ) -> io::Result<Channel> {
        let wake = match hello.map_err(|e| protocol_error(e.to_string()))? {
            Hello::Fresh { wake, .. } => wake,
            Hello::Reuse { .. } => {
                return Err(protocol_error(
                    "a REUSE HELLO where a fresh segment was due",
                ))
            }
        };
        let want_fds = if wake == WakeMode::EventFd { 3 } else { 1 };
        if fds.len() != want_fds {
            return Err(protocol_error(format!(
                "expected {want_fds} descriptors, got {}",
                fds.len()
            )));
        }
        let peer = if wake == WakeMode::EventFd {
            Some(two_eventfds(fds.split_off(1))?)
        } else {
            None
        };
        let memfd = fds.pop().expect("one descriptor left");
        let attached = Segment::from_memfd(memfd).and_then(|seg| {
            let seg = Arc::new(seg);
            let ep = endpoint(&seg, None, wake)?;
            Ok((seg, ep))
        });
        let (segment, ep) = match attached {
            Ok(ok) => ok,
            Err(e) => {
                let _ = vmc_os::send_with_fds_by(sock.as_fd(), &Ack::Refused.emit(), &[], deadline);
                return Err(e);
            }
        };
        let mine = if wake == WakeMode::EventFd {
            Some(new_eventfds()?)
        } else {
            None
        };
        let my_fds: Vec<BorrowedFd<'_>> = mine.iter().flatten().map(|e| e.fd()).collect();
        vmc_os::send_with_fds_by(sock.as_fd(), &Ack::Ok.emit(), &my_fds, deadline)
            .map_err(|e| map_err_timeout(e, "room for ACK"))?;
        let (signals, reuse) = match (mine, peer) {
            (Some(mine), Some(peer)) => {
                let reuse = match segment.inode() {
                    Ok(inode) if reusing => Some(Reuse::Attached { inode }),
                    _ => None,
                };
                (Signals::EventFd { mine, peer }, reuse)
            }
            _ => (signals_without_fds(wake), None),
        };
        Ok(assemble_reusable(
            ep,
            segment,
            signals,
            Link::Socket(sock),
            spin,
            reuse,
        ))
    }

    /// Both ends of a new channel in this process (over a socketpair), e.g. to hand
    /// one to a child after fork, or for tests.
    pub fn pair(config: &ChannelConfig) -> io::Result<(Channel, Channel)> {
        let (a, b) = UnixStream::pair()?;
        let offer = Channel::offer_over(a.into(), config)?;
        let attacher = Channel::attach_over(b.into(), config.spin)?;
        Ok((offer.finish()?, attacher))
    }

    /// Connects to a [`ChannelListener`] at `path` and attaches to the channel it
    /// offers.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Channel> {
        let sock = vmc_os::unix::connect(path.as_ref()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("vmc channel: connect to {}: {e}", path.as_ref().display()),
            )
        })?;
        Channel::attach_over(sock.into(), ChannelConfig::from_env().spin)
    }

    /// Creates a channel in a file of `dir` for a peer that can open that directory;
    /// send it [`PendingChannel::name`], then [`PendingChannel::wait`].
    ///
    /// Eventfd wake-ups need a socket to travel over, so [`WakeMode::EventFd`] falls
    /// back to the futex here.
    pub fn create_in_dir(dir: &SegmentDir, config: &ChannelConfig) -> io::Result<PendingChannel> {
        let layout = layout_for(config)?;
        let wake = if config.wake == WakeMode::Poll {
            WakeMode::Poll
        } else {
            WakeMode::Futex
        };
        // Segments whose both ends died before one could unlink them are removed here,
        // so a directory never accumulates them.
        match dir.reclaim_stale() {
            Ok(0) => {}
            Ok(n) => tracing::debug!("reclaimed {n} stale segment(s) in {}", dir.path().display()),
            Err(e) => tracing::warn!(
                "could not reclaim stale segments in {}: {e}",
                dir.path().display()
            ),
        }
        let segment = Arc::new(Segment::create_in_dir(dir, layout.segment_len)?);
        let endpoint = endpoint(&segment, Some(config), wake)?;
        Ok(PendingChannel {
            segment,
            endpoint,
            wake,
            spin: config.spin,
            locks: true,
        })
    }

    /// Lays a channel out in an existing file of at least the layout's size: an
    /// ivshmem BAR that a VM sees as a file, or a host file two VMs' ivshmem devices
    /// share. Nothing is unlinked; sleepers poll ([`WakeMode::Poll`]) because no
    /// kernel object reaches across VMs, and a peer's death is not detected (only
    /// its orderly close).
    pub fn create_on_file(
        path: impl AsRef<Path>,
        config: &ChannelConfig,
    ) -> io::Result<PendingChannel> {
        let layout = layout_for(config)?;
        let segment = Arc::new(Segment::open_file(path, layout.segment_len)?);
        let endpoint = endpoint(&segment, Some(config), WakeMode::Poll)?;
        Ok(PendingChannel {
            segment,
            endpoint,
            wake: WakeMode::Poll,
            spin: config.spin,
            locks: false,
        })
    }

    /// Attaches to a channel the peer laid out in the file at `path` (see
    /// [`Channel::create_on_file`]); `len` is how much of the file to map.
    pub fn attach_on_file(
        path: impl AsRef<Path>,
        len: usize,
        spin: Duration,
    ) -> io::Result<Channel> {
        let segment = Arc::new(Segment::open_file(path, len)?);
        let ep = endpoint(&segment, None, WakeMode::Poll)?;
        Ok(assemble(ep, segment, Signals::Poll, Link::None, spin))
    }

    /// Attaches to the channel a peer created in `dir` under `name`; the file is
    /// unlinked at once (both ends hold it mapped).
    pub fn attach_in_dir(dir: &SegmentDir, name: &str, spin: Duration) -> io::Result<Channel> {
        let segment = Arc::new(Segment::open_in_dir(dir, name)?);
        // The creator chose the wake mode; its side block says which.
        let ep = endpoint(&segment, None, WakeMode::Futex)?;
        let wake = match ep.header.header().side_wake_kind(vmc_ring::Side::Creator) {
            Some(vmc_ring::WakeKind::Poll) => WakeMode::Poll,
            _ => WakeMode::Futex,
        };
        Ok(assemble(
            ep,
            segment,
            signals_without_fds(wake),
            Link::SegmentLocks,
            spin,
        ))
    }
}

/// A channel created in a directory, waiting for its peer to attach.
pub struct PendingChannel {
    segment: Arc<Segment>,
    endpoint: Endpoint,
    wake: WakeMode,
    spin: Duration,
    /// Liveness through OFD locks (directory segments) or none (plain files).
    locks: bool,
}

impl PendingChannel {
    /// The name the peer passes to [`Channel::attach_in_dir`].
    pub fn name(&self) -> &str {
        self.segment.name().unwrap_or_default()
    }

    /// Waits up to `timeout` for the peer to attach.
    pub fn wait(self, timeout: Duration) -> io::Result<Channel> {
        let deadline = Instant::now() + timeout;
        let mut backoff = vmc_os::Backoff::new(Duration::from_millis(2));
        while !peer_attached(&self.endpoint) {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "vmc channel: nobody attached in time",
                ));
            }
            backoff.snooze();
        }
        let link = if self.locks {
            Link::SegmentLocks
        } else {
            Link::None
        };
        Ok(assemble(
            self.endpoint,
            self.segment,
            signals_without_fds(self.wake),
            link,
            self.spin,
        ))
    }
}

/// A Unix socket path where peers come to get a channel each.
pub struct ChannelListener {
    listener: UnixListener,
    path: PathBuf,
    config: ChannelConfig,
}

impl ChannelListener {
    /// Listens on `path` (which must not exist yet); every accepted peer gets a new
    /// channel made with `config`.
    pub fn bind(path: impl AsRef<Path>, config: ChannelConfig) -> io::Result<ChannelListener> {
        layout_for(&config)?;
        let path = path.as_ref().to_path_buf();
        let listener = vmc_os::unix::bind(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("vmc channel: bind {}: {e}", path.display()),
            )
        })?;
        Ok(ChannelListener {
            listener,
            path,
            config,
        })
    }

    /// Waits for a peer and sets up a channel with it.
    pub fn accept(&self) -> io::Result<Channel> {
        let (sock, _) = self.listener.accept()?;
        Channel::create_over(vmc_os::fdspace::lift(sock.into())?, &self.config)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ChannelListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
