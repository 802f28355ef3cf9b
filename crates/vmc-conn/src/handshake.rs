//! How the two ends of a TCP connection find each other and set a channel up
//! beside it, whichever process accepted it.
//!
//! ```text
//!   client                                         accepting process
//!   bind + listen offers/p-<pid>-<n>.sock
//!   connect() ─────────────── TCP ───────────────▶ accept()
//!   rename to offers/o-<ns>-<4-tuple>.sock
//!   (first bytes on TCP)                           connect offers/o-<ns>-<4-tuple>.sock
//!                            ◀── ATTACH(4-tuple) + HELLO(memfd) ──
//!   accept, unlink, check ATTACH, map ── ACK ────▶
//! ```
//!
//! The client learns from the registry that a vmc process listens on the
//! destination and binds an *offer socket* under a name of its own before it
//! connects ([`PreparedOffer`]); once `connect` has given the connection its local
//! port, one `rename` names the socket by the listener's network namespace and the
//! connection's 4-tuple ([`wire::offer_name`]), before `connect` returns to the
//! program. The process that accepts the connection (the listener's, a
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
//! millisecond on, until [`ATTACH_WINDOW`] after accepting. A client gives its offer
//! up [`ATTACH_WINDOW`] after the accepting side's first bytes arrived without a
//! call (a vmc server calls at accept, or, if that was too early, within the
//! window), or after [`OFFER_TTL`] (a connection may wait that long in a busy
//! server's backlog). Either side giving up leaves the connection on TCP, where it
//! already is.

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

/// How long a client keeps its offer socket for a call that does not come. A
/// connection may wait that long in a busy server's backlog before a worker
/// accepts it (and calls at once); a server that does not run vmc is known
/// sooner, at its first bytes (see `OfferSocket::answer`).
pub const OFFER_TTL: Duration = Duration::from_secs(30);

/// The first wait between two looks of the accepting side (it grows fourfold).
const FIRST_RETRY: Duration = Duration::from_millis(1);

fn refused(why: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("vmc handshake: {}", why.into()),
    )
}

/// The accepting side's proof that it holds the other end of the connection,
/// checked by a client of another user: the descriptor it passed with ATTACH must
/// be a TCP socket in our socket's network namespace whose addresses mirror ours.
/// Only a process holding the accepted socket of this very connection has one.
fn check_proof(
    proof: &OwnedFd,
    tcp: BorrowedFd<'_>,
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<()> {
    use rustix::net::sockopt;
    let tcp_socket = sockopt::socket_type(proof)? == rustix::net::SocketType::STREAM
        && sockopt::socket_protocol(proof)? == Some(rustix::net::ipproto::TCP);
    if !tcp_socket {
        return Err(refused("the proof is not a TCP socket"));
    }
    let addr = |a: Option<rustix::net::SocketAddrAny>| {
        a.and_then(|a| SocketAddr::try_from(a).ok())
            .map(wire::canonical)
    };
    let theirs = (
        addr(rustix::net::getsockname(proof).ok()),
        addr(rustix::net::getpeername(proof).ok().flatten()),
    );
    if theirs != (Some(wire::canonical(peer)), Some(wire::canonical(local))) {
        return Err(refused("the proof is another connection's socket"));
    }
    let ns = vmc_os::proc::socket_netns_cookie;
    if ns(proof.as_fd())? != ns(tcp)? {
        return Err(refused("the proof lives in another network namespace"));
    }
    Ok(())
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
    /// When bytes from the accepting side were first seen without a call.
    replied: Option<Instant>,
}

/// A client's offer socket bound and listening before its `connect`, under a
/// name of its own ([`PreparedOffer::bind`]); once `connect` has given the
/// connection its local port, one `rename` publishes it under the connection's
/// name ([`PreparedOffer::publish`]). An accepting side that looks at once, while
/// the client's `connect` is still returning, then finds it; before, the client
/// bound it only then, and that first look usually missed.
pub(crate) struct PreparedOffer {
    /// `None` once published (nothing left to remove).
    listener: Option<UnixListener>,
    offers: PathBuf,
    /// Where it is bound until published.
    path: PathBuf,
    netns: NetNs,
    peer: SocketAddr,
    /// The process that bound it (only it removes the file).
    owner: u32,
}

impl PreparedOffer {
    /// Binds the offer socket of a connection to `peer`, a listener in `netns`
    /// whose processes look in `offers`, under a name only this process uses.
    /// `public`: the listener is another user's, and `offers` the directory every
    /// user shares: the socket is made connectable by anyone, and callers of
    /// another user must prove who they are.
    pub(crate) fn bind(
        offers: &Path,
        netns: NetNs,
        peer: SocketAddr,
        public: bool,
    ) -> io::Result<PreparedOffer> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let owner = vmc_os::pid();
        let path = offers.join(format!("p-{owner:x}-{seq:x}.sock"));
        let listener = match vmc_os::unix::listen_nonblocking(&path, 4) {
            // Left by a process of our pid that was killed while connecting. In
            // the shared directory only our own leftovers can be removed (sticky).
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let _ = std::fs::remove_file(&path);
                vmc_os::unix::listen_nonblocking(&path, 4)?
            }
            r => r?,
        };
        let prepared = PreparedOffer {
            listener: Some(listener),
            offers: offers.to_path_buf(),
            path,
            netns,
            peer,
            owner,
        };
        if public {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&prepared.path, std::fs::Permissions::from_mode(0o666))?;
        }
        Ok(prepared)
    }

    /// Publishes the socket under the name of the connection `local` -> peer
    /// ([`wire::offer_name`]). A file left there by an earlier connection with
    /// this 4-tuple (its client killed during the handshake: a live one would
    /// hold the 4-tuple still) is replaced.
    pub(crate) fn publish(mut self, local: SocketAddr) -> io::Result<OfferSocket> {
        let path = self
            .offers
            .join(wire::offer_name(self.netns.ino, local, self.peer));
        std::fs::rename(&self.path, &path)?;
        let listener = self.listener.take().expect("published once");
        Ok(OfferSocket {
            listener: Arc::new(listener),
            path,
            owner: self.owner,
            unlinked: false,
            local,
            peer: self.peer,
            deadline: Instant::now() + OFFER_TTL,
            replied: None,
        })
    }
}

impl Drop for PreparedOffer {
    fn drop(&mut self) {
        if self.listener.is_some() && vmc_os::pid() == self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl OfferSocket {
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
    /// (valid) called yet, an error (the connection stays TCP) if a caller of our
    /// own user named another connection, or no call came in time. A caller of
    /// another user without a valid proof is hung up on, and the socket waits on
    /// for the real one. `tcp`: our TCP socket (its network namespace).
    /// `tcp_in`: TCP bytes received so far. A vmc accepting side calls at accept,
    /// or within [`ATTACH_WINDOW`] if that was before we bound: bytes from it and
    /// no call for that long mean it never will.
    pub(crate) fn answer(
        &mut self,
        tcp: BorrowedFd<'_>,
        tcp_in: u64,
        spin: Duration,
    ) -> Result<Option<Channel>, Fallback> {
        let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
        let failed = |e: io::Error| Fallback::Handshake(e.to_string());
        loop {
            let sock = match rustix::net::accept_with(&*self.listener, flags) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {
                    let now = Instant::now();
                    let waited = match (tcp_in, self.replied) {
                        (0, _) => Duration::ZERO,
                        (_, Some(t)) => now.saturating_duration_since(t),
                        (_, None) => {
                            self.replied = Some(now);
                            Duration::ZERO
                        }
                    };
                    if waited < ATTACH_WINDOW && now < self.deadline {
                        return Ok(None);
                    }
                    self.unlink();
                    return Err(Fallback::ListenerGone);
                }
                Err(e) => return Err(Fallback::Handshake(format!("offer socket: {e}"))),
            };
            let sock = vmc_os::fdspace::lift(sock).map_err(failed)?;
            let cred =
                rustix::net::sockopt::socket_peercred(&sock).map_err(|e| failed(e.into()))?;
            let mirror = (wire::canonical(self.peer), wire::canonical(self.local));
            if cred.uid.as_raw() == vmc_os::euid() {
                // Our own user (the 0700 directory, or a process of ours in the
                // shared one): trusted as every process of ours is.
                let deadline = Instant::now() + vmc_channel::HANDSHAKE_TIMEOUT;
                let (seen, _) = read_attach(&sock, deadline, 0).map_err(failed)?;
                if seen != mirror {
                    self.unlink();
                    return Err(Fallback::NotMatched);
                }
            } else {
                // Another user: briefly (an impostor must not hold us up), and
                // only with the proof.
                let deadline = Instant::now() + Duration::from_millis(100);
                let valid = read_attach(&sock, deadline, 1).and_then(|(seen, proof)| {
                    let proof = proof.ok_or_else(|| refused("a call without a proof"))?;
                    check_proof(&proof, tcp, self.local, self.peer)?;
                    if seen != mirror {
                        return Err(refused("an ATTACH for another connection"));
                    }
                    Ok(())
                });
                if let Err(e) = valid {
                    tracing::warn!(
                        "vmc: hung up on a call from uid {} on an offer socket: {e}",
                        cred.uid.as_raw()
                    );
                    continue;
                }
            }
            // One call per connection: nobody else may reach the socket now.
            self.unlink();
            return Channel::attach_over_reusing(sock, spin)
                .map(Some)
                .map_err(failed);
        }
    }
}

impl Drop for OfferSocket {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// The 4-tuple an ATTACH names.
type Tuple = ((std::net::Ipv6Addr, u16), (std::net::Ipv6Addr, u16));

/// Reads a whole ATTACH from `sock` (non-blocking), with at most `max_fds`
/// descriptors passed beside it, waiting at most until `deadline`; returns the
/// 4-tuple it names and the descriptor, if one came.
fn read_attach(
    sock: &OwnedFd,
    deadline: Instant,
    max_fds: usize,
) -> io::Result<(Tuple, Option<OwnedFd>)> {
    let mut frame = [0u8; ATTACH_LEN];
    let mut got = 0;
    let mut proof = None;
    while got < ATTACH_LEN {
        let (n, fds) =
            vmc_os::recv_with_fds_by(sock.as_fd(), &mut frame[got..], max_fds, deadline)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
        if let Some(fd) = fds.into_iter().next() {
            proof.get_or_insert(fd);
        }
    }
    let tuple = wire::decode_attach(&frame)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("vmc handshake: {e}")))?;
    Ok((tuple, proof))
}

/// The accepting side's end of a handshake not begun yet: where the client's
/// offer socket would be, and when to look again.
pub(crate) struct Call {
    path: PathBuf,
    /// Where a client of another user binds (the shared offers directory), if
    /// the listener is published there.
    public_path: Option<PathBuf>,
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

/// Why the accepting side does not offer a channel.
enum Refusal {
    /// The administrator's policy denies it.
    Policy(String),
    /// Anything else.
    Io(io::Error),
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Refusal {
        Refusal::Io(e)
    }
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
        public_offers: Option<&Path>,
        netns: NetNs,
        peer: SocketAddr,
        local: SocketAddr,
        listed: Arc<dyn Send + Sync>,
    ) -> Call {
        let now = Instant::now();
        let name = wire::offer_name(netns.ino, peer, local);
        Call {
            public_path: public_offers.map(|d| d.join(&name)),
            path: offers.join(name),
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
    /// channel on it. `tcp_in`: TCP bytes received so far; `tcp`: the accepted
    /// socket (a client of another user is shown it as the proof).
    pub(crate) fn call(&mut self, tcp_in: u64, tcp: BorrowedFd<'_>) -> Called {
        let had_bytes = tcp_in > 0;
        self.seen_tcp_in = tcp_in;
        match self.try_offer(tcp).map_err(|e| match e {
            Refusal::Policy(why) => Fallback::Policy(why),
            Refusal::Io(e) => Fallback::Handshake(e.to_string()),
        }) {
            Ok(Some(offer)) => Called::Offered(Box::new(offer)),
            // A vmc client binds before it sends: after its bytes, a miss is final.
            Ok(None) if had_bytes => {
                tracing::debug!(
                    "no offer socket at {} (or {:?}) after the client's first bytes",
                    self.path.display(),
                    self.public_path
                );
                Called::Never(Fallback::PeerNotVmc)
            }
            Ok(None) => {
                let now = Instant::now();
                if now >= self.deadline {
                    tracing::debug!(
                        "no offer socket at {} (or {:?}) within the window",
                        self.path.display(),
                        self.public_path
                    );
                    return Called::Never(Fallback::PeerNotVmc);
                }
                self.next = now + self.wait;
                self.wait *= 4;
                Called::NotYet
            }
            Err(reason) => {
                tracing::debug!("calling {}: {reason}", self.path.display());
                Called::Never(reason)
            }
        }
    }

    /// Connects to the client's offer socket, in our own offers directory or in
    /// the shared one; `None` if neither is there (yet).
    fn reach(&self) -> io::Result<Option<(OwnedFd, bool)>> {
        let paths = std::iter::once((&self.path, false))
            .chain(self.public_path.as_ref().map(|p| (p, true)));
        for (path, public) in paths {
            match vmc_os::unix::connect_nonblocking(path) {
                Ok(s) => return Ok(Some((s, public))),
                // Not bound (yet), bound but not listening or not opened to us
                // yet, or full (somebody else calling).
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::ECONNREFUSED | libc::EAGAIN | libc::EACCES)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    fn try_offer(&self, tcp: BorrowedFd<'_>) -> Result<Option<Offer>, Refusal> {
        let Some((sock, public)) = self.reach()? else {
            return Ok(None);
        };
        let cred = rustix::net::sockopt::socket_peercred(&sock).map_err(io::Error::from)?;
        let subject = crate::policy::Subject {
            server: self.local,
            me: vmc_os::euid(),
            peer: Some(cred.uid.as_raw()),
        };
        if let Err(why) = crate::policy::Policy::get().check(&subject) {
            return Err(Refusal::Policy(why.to_string()));
        }
        let frame = wire::attach(self.local, self.peer);
        let deadline = Instant::now() + vmc_channel::HANDSHAKE_TIMEOUT;
        if cred.uid.as_raw() == vmc_os::euid() {
            vmc_os::send_with_fds_by(sock.as_fd(), &frame, &[], deadline)?;
        } else if !public {
            return Err(refused("another user's socket in our own directory").into());
        } else {
            // Another user's socket: the kernel must say that user holds the
            // client's end of this connection (so that nobody who merely bound
            // the name first gets the channel), and the client must see our
            // proof: the accepted socket itself, which it closes after looking.
            let owner = vmc_os::sockdiag::tcp_owner(self.peer, self.local)?
                .ok_or_else(|| refused("the kernel knows no client socket for this connection"))?;
            if owner.uid != cred.uid.as_raw() {
                return Err(refused(format!(
                    "the offer socket is uid {}'s, the client's socket uid {}'s",
                    cred.uid.as_raw(),
                    owner.uid
                ))
                .into());
            }
            vmc_os::send_with_fds_by(sock.as_fd(), &frame, &[tcp], deadline)?;
        }
        // Event loops need a descriptor to wait on for ring wake-ups.
        let config = ChannelConfig {
            wake: WakeMode::EventFd,
            ..ChannelConfig::from_env()
        };
        // Segments of earlier channels with the client's process are used again.
        let key = format!("pid:{}", cred.pid.as_raw_nonzero());
        Ok(Some(Channel::offer_over_reusing(sock, &config, &key)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    /// What a client of another user accepts as the proof that its caller holds
    /// the other end: that end's own socket, and nothing else.
    #[test]
    fn only_the_other_end_of_this_connection_is_a_proof() {
        let (client, server) = pair();
        let (local, peer) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let own = |s: &TcpStream| OwnedFd::from(s.try_clone().unwrap());
        // The accepted socket of this very connection.
        check_proof(&own(&server), client.as_fd(), local, peer).unwrap();
        // The client's own socket (addresses not mirrored).
        let e = check_proof(&own(&client), client.as_fd(), local, peer).unwrap_err();
        assert!(e.to_string().contains("another connection"), "{e}");
        // The server's end of another connection between the same two ports'
        // hosts.
        let (_c2, s2) = pair();
        let e = check_proof(&own(&s2), client.as_fd(), local, peer).unwrap_err();
        assert!(e.to_string().contains("another connection"), "{e}");
        // Not a TCP socket at all.
        let (u, _u2) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = check_proof(&OwnedFd::from(u), client.as_fd(), local, peer).unwrap_err();
        assert!(e.to_string().contains("not a TCP socket"), "{e}");
        // A listening socket on the right port is not a connection.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = check_proof(&OwnedFd::from(l), client.as_fd(), local, peer).unwrap_err();
        assert!(e.to_string().contains("another connection"), "{e}");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The offer socket is bound before `connect` and appears under the
    /// connection's name with `publish`, so the accepting side's first look, at
    /// accept, finds it; one never published leaves nothing behind.
    #[test]
    fn a_prepared_offer_is_found_under_the_connections_name_once_published() {
        let dir = tempfile::tempdir().unwrap();
        let ns = NetNs { dev: 0, ino: 7 };
        let (c, _s) = pair();
        let (local, peer) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        let name = wire::offer_name(ns.ino, local, peer);

        let unused = PreparedOffer::bind(dir.path(), ns, peer, false).unwrap();
        assert_eq!(names(dir.path()).len(), 1);
        drop(unused);
        assert!(
            names(dir.path()).is_empty(),
            "a failed connect leaves no file"
        );

        // A leftover of an earlier connection with this 4-tuple is replaced.
        std::fs::write(dir.path().join(&name), b"stale").unwrap();
        let prepared = PreparedOffer::bind(dir.path(), ns, peer, false).unwrap();
        let sock = prepared.publish(local).unwrap();
        assert_eq!(names(dir.path()), vec![name.clone()]);
        let called = vmc_os::unix::connect_nonblocking(&dir.path().join(&name));
        assert!(
            called.is_ok(),
            "the published socket takes calls: {called:?}"
        );
        drop(sock);
        assert!(names(dir.path()).is_empty(), "the offer is removed with it");
    }

    #[test]
    fn an_attach_is_read_whole_with_the_descriptor_beside_it() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let (c, s) = pair();
        let (l, r) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        let frame = wire::attach(r, l);
        let deadline = Instant::now() + Duration::from_secs(5);
        vmc_os::send_with_fds_by(a.as_fd(), &frame[..10], &[s.as_fd()], deadline).unwrap();
        vmc_os::send_with_fds_by(a.as_fd(), &frame[10..], &[], deadline).unwrap();
        let b = OwnedFd::from(b);
        let (tuple, proof) = read_attach(&b, deadline, 1).unwrap();
        assert_eq!(tuple, (wire::canonical(r), wire::canonical(l)));
        check_proof(&proof.expect("the descriptor"), c.as_fd(), l, r).unwrap();
        // Nothing more, and a peer that goes away, is an error, not a hang.
        drop(a);
        assert!(read_attach(&b, deadline, 1).is_err());
    }
}
