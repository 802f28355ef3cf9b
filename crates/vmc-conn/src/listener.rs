//! The listening side: a real TCP listener and a registry entry saying where it is.
//!
//! The entry only tells clients that a vmc process listens there. Each client then
//! binds an offer socket named by its connection ([`crate::wire::offer_name`]), and
//! whichever process accepts the connection calls it ([`crate::conn`]): the
//! listener's own process, a forked worker, a thread, or a process the listening
//! socket was handed to. No process has to hand handshakes to another.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;

use crate::conn::{Call, Conn};
use crate::fallback::Fallback;
use crate::net::{registry, vmc_disabled, TcpStream};
use crate::registry::{ListenerEntry, NetNs, Registration};

/// What the processes accepting from a registered listener share.
struct Registered {
    /// Our entry, and the one published for other users (if it could be): they
    /// live as long as the listener and the handshakes of its connections.
    registrations: Arc<(Registration, Option<Registration>)>,
    /// Where clients of our user bind their offer sockets.
    offers: PathBuf,
    /// Where clients of other users bind theirs, if the listener is published.
    public_offers: Option<PathBuf>,
    /// The listening socket's network namespace (part of offer names).
    netns: NetNs,
    /// The listening address.
    addr: SocketAddr,
    /// The uid the listener was registered under.
    uid: u32,
    /// This process's own entry in the shared registry, when it accepts under
    /// another uid than the registrant's (a worker that dropped privileges after
    /// the master listened), with the process that published it.
    as_self: std::sync::Mutex<Option<(u32, Arc<Registration>)>>,
}

impl Registered {
    /// Accepting under another uid than the registrant's: the registrant's clients
    /// would bind where we cannot reach, so publish the listener as ours in the
    /// shared registry (once per process); clients that see it there bind in the
    /// shared offers directory. Returns what keeps the entry alive.
    fn published_as_self(&self) -> Option<Arc<Registration>> {
        let me = vmc_os::pid();
        let mut slot = self.as_self.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((pid, r)) = &*slot {
            if *pid == me {
                return Some(r.clone());
            }
        }
        match publish(self.netns, self.addr) {
            Ok((r, _)) => {
                let r = Arc::new(r);
                *slot = Some((me, r.clone()));
                Some(r)
            }
            Err(e) => {
                tracing::debug!(
                    "listener {} not published as uid {}: {e}",
                    self.addr,
                    vmc_os::euid()
                );
                None
            }
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
    registered: Option<Registered>,
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
        let (registered, fallback) = match register(&tcp) {
            Ok(r) => (Some(r), None),
            Err(reason) => {
                tracing::debug!("listener not registered: {reason}");
                (None, Some(reason))
            }
        };
        Ok(TcpListener {
            tcp,
            registered,
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
        let conn = match &self.registered {
            None => Conn::plain(tcp, self.fallback.clone().unwrap_or(Fallback::Disabled)),
            Some(r) => {
                let local = tcp.local_addr()?;
                let listed: Arc<dyn Send + Sync> = if vmc_os::euid() != r.uid {
                    Arc::new((Arc::clone(&r.registrations), r.published_as_self()))
                } else {
                    Arc::clone(&r.registrations) as Arc<dyn Send + Sync>
                };
                let public = crate::net::public_registry()
                    .and_then(|p| p.offers().ok())
                    .map(|d| d.path().to_path_buf())
                    .or_else(|| r.public_offers.clone());
                let call = Call::new(&r.offers, public.as_deref(), r.netns, peer, local, listed);
                Conn::calling(tcp, call)
            }
        };
        Ok(TcpStream::from_conn(conn))
    }

    /// An iterator over accepted connections, as `std::net::TcpListener::incoming`.
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<TcpStream>> + '_ {
        std::iter::from_fn(move || Some(self.accept().map(|(s, _)| s)))
    }

    /// Call after this process changed its effective uid (a worker dropping root):
    /// if that is not the uid the listener was registered as, it is published in
    /// the shared registry as this user's too (once per process), so that clients
    /// of the registrant's user bind where this process can call them.
    pub fn serve_as_current_user(&self) {
        if let Some(r) = &self.registered {
            if vmc_os::euid() != r.uid {
                // Kept until the process exits (or the listener is dropped).
                r.published_as_self();
            }
        }
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

fn register(tcp: &std::net::TcpListener) -> Result<Registered, Fallback> {
    if vmc_disabled() {
        return Err(Fallback::Disabled);
    }
    let reg = registry().map_err(|e| Fallback::Registry(e.to_string()))?;
    let fail = |e: io::Error| Fallback::Registry(e.to_string());
    // Entries of listeners killed with -9 on other ports are reaped here (lookups
    // only look at their own port), so the directory does not collect them.
    reg.reap();
    let offers = reg.offers().map_err(fail)?.path().to_path_buf();
    let netns = NetNs::of_socket(tcp.as_fd()).map_err(fail)?;
    let addr = tcp.local_addr().map_err(fail)?;
    let entry = ListenerEntry::new(netns, addr, offers.clone());
    let registration = reg.register(&entry).map_err(fail)?;
    let (published, public_offers) = match publish(netns, addr) {
        Ok((r, offers)) => (Some(r), Some(offers)),
        Err(e) => {
            tracing::debug!("listener {addr} not published for other users: {e}");
            (None, None)
        }
    };
    Ok(Registered {
        registrations: Arc::new((registration, published)),
        offers,
        public_offers,
        netns,
        addr,
        uid: vmc_os::euid(),
        as_self: std::sync::Mutex::new(None),
    })
}

/// Publishes the listener in the registry every user shares, for clients of other
/// users; returns the registration and the shared offers directory. The entry
/// names no process (`ss` shows other users' sockets, not their processes).
fn publish(netns: NetNs, addr: std::net::SocketAddr) -> io::Result<(Registration, PathBuf)> {
    let public = crate::net::public_registry()
        .ok_or_else(|| io::Error::other("the shared registry is unusable"))?;
    let offers = public.offers()?.path().to_path_buf();
    let mut entry = ListenerEntry::new(netns, addr, offers.clone());
    entry.pid = 0;
    Ok((public.register(&entry)?, offers))
}
