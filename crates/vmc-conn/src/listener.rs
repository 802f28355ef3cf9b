//! The listening side: a real TCP listener, a registry entry saying where it is,
//! and a rendezvous socket where co-resident vmc clients bring their channels.

use std::io::{self, Read};
use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::SocketFlags;
use vmc_channel::Channel;

use crate::conn::Conn;
use crate::fallback::Fallback;
use crate::net::{registry, vmc_disabled, TcpStream};
use crate::registry::{ListenerEntry, NetNs, Registration};
use crate::wire::{self, ATTACH_LEN};

/// How long an ATTACH waits for its TCP connection to be accepted before the
/// listener gives up on it (closing the socket tells the client: stay on TCP).
const PENDING_TTL: Duration = Duration::from_secs(2);

type Key = ((Ipv6Addr, u16), (Ipv6Addr, u16));

struct Pending {
    /// The TCP connection as the client sees it: (its local, its remote); `None`
    /// until its ATTACH frame has arrived whole.
    client: Option<Key>,
    /// The part of the ATTACH frame received so far.
    frame: [u8; ATTACH_LEN],
    got: usize,
    sock: UnixStream,
    since: Instant,
}

/// A listener's rendezvous socket and the handshakes queued on it.
pub(crate) struct Rendezvous {
    unix: UnixListener,
    path: PathBuf,
    pending: Mutex<Vec<Pending>>,
    /// The registry entry lives as long as the rendezvous: connections accepted just
    /// before the listener was dropped still wait for their clients' handshakes,
    /// which the clients send after finding the entry.
    registration: std::sync::OnceLock<Registration>,
    /// The process that bound the socket: only it removes the socket's file.
    owner: u32,
}

static RENDEZVOUS_SEQ: AtomicU64 = AtomicU64::new(0);

impl Rendezvous {
    fn bind(dir: &std::path::Path) -> io::Result<Arc<Rendezvous>> {
        let name = format!(
            "r-{}-{}.sock",
            vmc_os::pid(),
            RENDEZVOUS_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path); // a leftover of a dead process with our pid
        let unix = vmc_os::unix::bind(&path)?;
        unix.set_nonblocking(true)?;
        Ok(Arc::new(Rendezvous {
            unix,
            path,
            pending: Mutex::new(Vec::new()),
            registration: std::sync::OnceLock::new(),
            owner: vmc_os::pid(),
        }))
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.unix.as_fd()
    }

    /// Accepts the handshakes waiting on the socket and reads their ATTACH frames,
    /// all without blocking: a client descheduled halfway through its frame never
    /// stalls the listener (its frame is completed at a later look).
    fn drain(&self, pending: &mut Vec<Pending>) {
        loop {
            // Non-blocking from the start: the handshake waits through `poll`.
            let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
            let sock = match rustix::net::accept_with(&self.unix, flags) {
                Ok(fd) => match vmc_os::fdspace::lift(fd) {
                    Ok(fd) => UnixStream::from(fd),
                    Err(e) => {
                        tracing::debug!("rendezvous accept: {e}");
                        continue;
                    }
                },
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::debug!("rendezvous accept: {e}");
                    break;
                }
            };
            match check_peer(&sock) {
                Ok(()) => pending.push(Pending {
                    client: None,
                    frame: [0; ATTACH_LEN],
                    got: 0,
                    sock,
                    since: Instant::now(),
                }),
                Err(e) => tracing::warn!("ignoring a vmc handshake: {e}"),
            }
        }
        pending.retain_mut(|p| {
            if p.client.is_none() {
                match read_attach(p) {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!("ignoring a malformed vmc handshake: {e}");
                        return false;
                    }
                }
            }
            p.since.elapsed() < PENDING_TTL
        });
    }

    /// The handshake socket of the client whose TCP connection the listener sees as
    /// `peer` -> `local`, if it has arrived.
    pub(crate) fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<OwnedFd> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        self.drain(&mut pending);
        let key = (wire::canonical(peer), wire::canonical(local));
        let i = pending.iter().position(|p| p.client == Some(key))?;
        Some(pending.swap_remove(i).sock.into())
    }
}

/// Only our own user may hand us a channel (the directory is 0700 too).
fn check_peer(sock: &UnixStream) -> io::Result<()> {
    let cred = rustix::net::sockopt::socket_peercred(sock)?;
    if cred.uid.as_raw() != vmc_os::euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "handshake from another user",
        ));
    }
    Ok(())
}

/// Reads what has arrived of `p`'s ATTACH frame; parses it once whole.
fn read_attach(p: &mut Pending) -> io::Result<()> {
    while p.got < ATTACH_LEN {
        match (&p.sock).read(&mut p.frame[p.got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => p.got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let key = wire::parse_attach(&p.frame)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an ATTACH"))?;
    p.client = Some(key);
    Ok(())
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        // Processes forked from the owner share the socket: theirs is a copy.
        if vmc_os::pid() == self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl AsFd for TcpListener {
    /// The listening socket.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp.as_fd()
    }
}

/// A TCP listener whose co-resident vmc clients get shared-memory channels; every
/// other client gets plain TCP, as from `std::net::TcpListener`.
pub struct TcpListener {
    tcp: std::net::TcpListener,
    rendezvous: Option<Arc<Rendezvous>>,
    /// Why clients of this listener cannot be accelerated, if they cannot.
    fallback: Option<Fallback>,
}

impl TcpListener {
    /// Binds like `std::net::TcpListener::bind` and registers the listener so that
    /// co-resident vmc clients find it. If registering fails, the listener still
    /// works, as plain TCP (see [`TcpListener::fallback_reason`]).
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
        TcpListener::from_std(std::net::TcpListener::bind(addr)?)
    }

    /// Takes over a bound std listener.
    pub fn from_std(tcp: std::net::TcpListener) -> io::Result<TcpListener> {
        let (rendezvous, fallback) = match register(&tcp) {
            Ok(r) => (Some(r), None),
            Err(reason) => {
                tracing::debug!("listener not registered: {reason}");
                (None, Some(reason))
            }
        };
        Ok(TcpListener {
            tcp,
            rendezvous,
            fallback,
        })
    }

    /// Accepts a connection; it is accelerated if its client is a co-resident vmc
    /// client, plain TCP otherwise.
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (tcp, peer) = self.tcp.accept()?;
        Ok((self.adopt_accepted(tcp, peer)?, peer))
    }

    /// Takes over a connection accepted from this listener's socket by someone else
    /// (the preload library intercepts `accept`); `peer` is its remote address.
    pub fn adopt_accepted(
        &self,
        tcp: std::net::TcpStream,
        peer: SocketAddr,
    ) -> io::Result<TcpStream> {
        let conn = match &self.rendezvous {
            None => Conn::plain(tcp, self.fallback.clone().unwrap_or(Fallback::Disabled)),
            Some(r) => {
                let local = tcp.local_addr()?;
                match r.take(peer, local) {
                    Some(sock) => {
                        let spin = vmc_channel::ChannelConfig::from_env().spin;
                        match Channel::attach_over_reusing(sock, spin) {
                            Ok(ch) => Conn::attached(tcp, ch, Some((local, peer)))?,
                            Err(e) => Conn::plain(tcp, Fallback::Handshake(e.to_string())),
                        }
                    }
                    None => Conn::awaiting(tcp, r.clone(), peer, local)?,
                }
            }
        };
        Ok(TcpStream::from_conn(conn))
    }

    /// An iterator over accepted connections, as `std::net::TcpListener::incoming`.
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<TcpStream>> + '_ {
        std::iter::from_fn(move || Some(self.accept().map(|(s, _)| s)))
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Non-blocking accepts.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nonblocking(on)
    }

    /// Why this listener's clients cannot be accelerated (`None`: they can).
    pub fn fallback_reason(&self) -> Option<&Fallback> {
        self.fallback.as_ref()
    }

    /// The underlying std listener.
    pub fn as_std(&self) -> &std::net::TcpListener {
        &self.tcp
    }
}

fn register(tcp: &std::net::TcpListener) -> Result<Arc<Rendezvous>, Fallback> {
    if vmc_disabled() {
        return Err(Fallback::Disabled);
    }
    let reg = registry().map_err(|e| Fallback::Registry(e.to_string()))?;
    let fail = |e: io::Error| Fallback::Registry(e.to_string());
    // Entries of listeners killed with -9 on other ports are reaped here (lookups
    // only look at their own port), so the directory does not collect them.
    reg.reap();
    let rendezvous = Rendezvous::bind(reg.path()).map_err(fail)?;
    let entry = ListenerEntry::new(
        NetNs::current().map_err(fail)?,
        tcp.local_addr().map_err(fail)?,
        rendezvous.path.clone(),
    );
    let registration = reg.register(&entry).map_err(fail)?;
    let _ = rendezvous.registration.set(registration);
    Ok(rendezvous)
}
