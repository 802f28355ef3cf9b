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
    /// Lives as long as the listener and the handshakes of its connections.
    registration: Arc<Registration>,
    /// Where clients bind their offer sockets.
    offers: PathBuf,
    /// The listening socket's network namespace (part of offer names).
    netns: NetNs,
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
                let listed = Arc::clone(&r.registration);
                let call = Call::new(&r.offers, r.netns, peer, local, listed);
                Conn::calling(tcp, call)
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
    let entry = ListenerEntry::new(netns, tcp.local_addr().map_err(fail)?, offers.clone());
    let registration = Arc::new(reg.register(&entry).map_err(fail)?);
    Ok(Registered {
        registration,
        offers,
        netns,
    })
}
