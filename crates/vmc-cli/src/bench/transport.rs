//! The byte transports the bench compares, behind one small interface.
//!
//! Every transport is a blocking, reliable, ordered byte stream between two
//! processes: [`Conn`] is `Read + Write` plus [`Conn::finish`], which closes
//! the write direction so the peer reads EOF while the reply can still be read.
//! The server side calls [`listen`] and then [`Listener::accept`] once per
//! connection (from any number of threads); the client side calls [`connect`]
//! with the address the server announced.
//!
//! - `shm`: vmc's shared-memory channel alone (`vmc_channel`), set up over a Unix socket.
//! - `tcp`: `std::net` TCP over loopback.
//! - `unix`: a Unix-domain stream socket.
//! - `vmc`: `vmc_conn`'s TCP connection, which starts on TCP over loopback and moves
//!   onto a shared-memory channel once the listener's process has attached it;
//!   [`Conn::vmc_state`] says whether it did.
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// A transport the bench can run over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// vmc's shared-memory channel (`vmc_channel::Channel`).
    Shm,
    /// TCP over the loopback interface, `TCP_NODELAY` on both sides.
    Tcp,
    /// A Unix-domain stream socket.
    Unix,
    /// vmc's accelerated TCP (`vmc_conn`): loopback TCP moved onto shared memory.
    Vmc,
}

impl Transport {
    /// Every transport, in the order the bench runs them by default.
    pub const ALL: [Transport; 3] = [Transport::Shm, Transport::Tcp, Transport::Unix];

    /// The name used on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Shm => "shm",
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
            Transport::Vmc => "vmc",
        }
    }

    /// Whether the transport is a TCP connection (so crr, which measures
    /// connection set-up, applies to it).
    pub fn is_tcp(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Vmc)
    }

    /// Whether the server needs a filesystem path (a rendezvous socket) to listen on.
    pub fn needs_path(self) -> bool {
        matches!(self, Transport::Shm | Transport::Unix)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Tuning knobs that only the shm transport uses (ignored by tcp and unix).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShmTuning {
    /// Ring bytes per direction; `None` keeps the library default.
    pub capacity: Option<usize>,
    /// How long a blocked side spins before sleeping; `None` keeps the library default.
    pub spin: Option<Duration>,
}

/// Where a `vmc` connection's bytes went, as its end sees it when asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmcState {
    /// A shared-memory channel is attached and carried some of the bytes.
    Shm,
    /// A channel is attached but not one byte of this end went through it (it came
    /// too late for this connection's traffic).
    AttachedUnused,
    /// The handshake was still in flight.
    Pending,
    /// The connection stayed on TCP; why, in words.
    Tcp(String),
}

impl VmcState {
    /// Why a connection does not count as accelerated, in words (`None` if it does).
    pub fn why_not(&self) -> Option<String> {
        match self {
            VmcState::Shm => None,
            VmcState::AttachedUnused => {
                Some("channel attached too late: no byte went through it".to_owned())
            }
            VmcState::Pending => Some("vmc handshake still in flight when it closed".to_owned()),
            VmcState::Tcp(reason) => Some(format!("stayed on TCP: {reason}")),
        }
    }
}

/// One established, full-duplex, blocking byte stream.
pub trait Conn: Read + Write + Send {
    /// Close the write direction: the peer's `read` returns 0 once it has
    /// drained everything written so far, while this side can still read.
    fn finish(&mut self) -> io::Result<()>;

    /// For `vmc` connections, whether and how they were accelerated; `None` for
    /// every other transport.
    fn vmc_state(&self) -> Option<VmcState> {
        None
    }
}

impl Conn for TcpStream {
    fn finish(&mut self) -> io::Result<()> {
        self.flush()?;
        self.shutdown(Shutdown::Write)
    }
}

impl Conn for UnixStream {
    fn finish(&mut self) -> io::Result<()> {
        self.flush()?;
        self.shutdown(Shutdown::Write)
    }
}

impl Conn for vmc_channel::Channel {
    fn finish(&mut self) -> io::Result<()> {
        // The peer reads EOF after the last byte; we can still read its reply.
        self.shutdown_write();
        Ok(())
    }
}

impl Conn for vmc_conn::TcpStream {
    fn finish(&mut self) -> io::Result<()> {
        self.flush()?;
        self.shutdown(Shutdown::Write)
    }

    fn vmc_state(&self) -> Option<VmcState> {
        Some(if self.is_accelerated() {
            let traffic = self.traffic();
            if traffic.shm_in + traffic.shm_out > 0 {
                VmcState::Shm
            } else {
                VmcState::AttachedUnused
            }
        } else if let Some(reason) = self.fallback_reason() {
            VmcState::Tcp(format!("{reason} ({})", reason.code()))
        } else {
            VmcState::Pending
        })
    }
}

enum Inner {
    Tcp(TcpListener),
    Unix(UnixListener),
    Shm(vmc_channel::ChannelListener),
    Vmc(vmc_conn::TcpListener),
}

/// The server side of a transport: accepts any number of connections, from any
/// number of threads at once.
pub struct Listener {
    inner: Inner,
    addr: String,
}

impl Listener {
    /// The address a client passes to [`connect`].
    pub fn local_addr(&self) -> &str {
        &self.addr
    }

    /// Wait for the next client.
    pub fn accept(&self) -> io::Result<Box<dyn Conn>> {
        Ok(match &self.inner {
            Inner::Tcp(listener) => {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            Inner::Unix(listener) => Box::new(listener.accept()?.0),
            Inner::Shm(listener) => Box::new(listener.accept()?),
            Inner::Vmc(listener) => {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
        })
    }

    /// The listening TCP socket (tcp and vmc), e.g. to shut it down.
    pub fn tcp_socket(&self) -> Option<BorrowedFd<'_>> {
        match &self.inner {
            Inner::Tcp(listener) => Some(listener.as_fd()),
            Inner::Vmc(listener) => Some(listener.as_std().as_fd()),
            Inner::Unix(_) | Inner::Shm(_) => None,
        }
    }
}

fn need_path(transport: Transport, path: Option<&Path>) -> io::Result<&Path> {
    path.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the {transport} transport needs a socket path to listen on"),
        )
    })
}

fn path_str(path: &Path) -> io::Result<String> {
    path.to_str().map(str::to_owned).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is not UTF-8", path.display()),
        )
    })
}

/// Start listening.
///
/// `path` is the rendezvous socket path for `unix` and `shm` (its directory
/// must exist); `tcp` and `vmc` ignore it and bind an ephemeral port on 127.0.0.1.
pub fn listen(
    transport: Transport,
    path: Option<&Path>,
    tuning: &ShmTuning,
) -> io::Result<Listener> {
    let (inner, addr) = match transport {
        Transport::Tcp => {
            let listener = TcpListener::bind(("127.0.0.1", 0))?;
            let addr = listener.local_addr()?.to_string();
            (Inner::Tcp(listener), addr)
        }
        Transport::Vmc => {
            let listener = vmc_conn::TcpListener::bind(("127.0.0.1", 0))?;
            if let Some(reason) = listener.fallback_reason() {
                // Its connections will stay on TCP; the run reports them as such.
                tracing::debug!("the vmc listener cannot accelerate its connections: {reason}");
            }
            let addr = listener.local_addr()?.to_string();
            (Inner::Vmc(listener), addr)
        }
        Transport::Unix => {
            let path = need_path(transport, path)?;
            (Inner::Unix(UnixListener::bind(path)?), path_str(path)?)
        }
        Transport::Shm => {
            let path = need_path(transport, path)?;
            let mut config = vmc_channel::ChannelConfig::from_env();
            if let Some(capacity) = tuning.capacity {
                config.capacity = capacity;
            }
            if let Some(spin) = tuning.spin {
                config.spin = spin;
            }
            let listener = vmc_channel::ChannelListener::bind(path, config)?;
            (Inner::Shm(listener), path_str(path)?)
        }
    };
    Ok(Listener { inner, addr })
}

/// Connect to a server that announced `addr` (a `host:port` for tcp and vmc, a
/// socket path otherwise). TCP connections get `TCP_NODELAY`.
pub fn connect(transport: Transport, addr: &str) -> io::Result<Box<dyn Conn>> {
    match transport {
        Transport::Tcp => {
            let stream = TcpStream::connect(addr)?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream))
        }
        Transport::Vmc => {
            let stream = vmc_conn::TcpStream::connect(addr)?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream))
        }
        Transport::Unix => Ok(Box::new(UnixStream::connect(addr)?)),
        Transport::Shm => Ok(Box::new(vmc_channel::Channel::connect(Path::new(addr))?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(transport: Transport, path: Option<&Path>) {
        let listener = listen(transport, path, &ShmTuning::default()).unwrap();
        let addr = listener.local_addr().to_owned();
        let client = std::thread::spawn(move || {
            let mut conn = connect(transport, &addr).unwrap();
            conn.write_all(b"hello").unwrap();
            conn.finish().unwrap();
            let mut back = Vec::new();
            conn.read_to_end(&mut back).unwrap();
            back
        });
        let mut conn = listener.accept().unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
        conn.write_all(b"olleh").unwrap();
        drop(conn);
        assert_eq!(client.join().unwrap(), b"olleh");
    }

    #[test]
    fn tcp_half_close_roundtrip() {
        roundtrip(Transport::Tcp, None);
    }

    #[test]
    fn vmc_half_close_roundtrip() {
        roundtrip(Transport::Vmc, None);
    }

    #[test]
    fn unix_half_close_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        roundtrip(Transport::Unix, Some(&dir.path().join("s")));
    }

    #[test]
    fn unix_needs_a_path() {
        let err = listen(Transport::Unix, None, &ShmTuning::default())
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
