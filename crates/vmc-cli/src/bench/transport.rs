//! The byte transports the bench compares, behind one small interface.
//!
//! Every transport is a blocking, reliable, ordered byte stream between two
//! processes: [`Conn`] is `Read + Write` plus [`Conn::finish`], which closes
//! the write direction so the peer reads EOF while the reply can still be read.
//! The server side calls [`listen`] and then [`Listener::accept`] once; the
//! client side calls [`connect`] with the address the server announced.
//!
//! `shm` is vmc's shared-memory channel (`vmc_channel`); it is not wired in
//! yet, so its arms in [`listen`] and [`connect`] return an error.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
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
        }
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

/// One established, full-duplex, blocking byte stream.
pub trait Conn: Read + Write + Send {
    /// Close the write direction: the peer's `read` returns 0 once it has
    /// drained everything written so far, while this side can still read.
    fn finish(&mut self) -> io::Result<()>;
}

/// The server side of a transport, before its single connection arrives.
pub trait Listener {
    /// The address a client passes to [`connect`].
    fn local_addr(&self) -> &str;
    /// Wait for one client.
    fn accept(&mut self) -> io::Result<Box<dyn Conn>>;
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

/// A [`Listener`] made of an announced address and an accept closure.
struct FnListener<F> {
    addr: String,
    accept: F,
}

impl<F> Listener for FnListener<F>
where
    F: FnMut() -> io::Result<Box<dyn Conn>>,
{
    fn local_addr(&self) -> &str {
        &self.addr
    }

    fn accept(&mut self) -> io::Result<Box<dyn Conn>> {
        (self.accept)()
    }
}

/// Wrap an address and an accept closure into a boxed [`Listener`].
fn listener_from_fn<F>(addr: String, accept: F) -> Box<dyn Listener>
where
    F: FnMut() -> io::Result<Box<dyn Conn>> + 'static,
{
    Box::new(FnListener { addr, accept })
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

/// Start listening for one connection.
///
/// `path` is the rendezvous socket path for `unix` and `shm` (its directory
/// must exist); `tcp` ignores it and binds an ephemeral port on 127.0.0.1.
pub fn listen(
    transport: Transport,
    path: Option<&Path>,
    tuning: &ShmTuning,
) -> io::Result<Box<dyn Listener>> {
    match transport {
        Transport::Tcp => {
            let listener = TcpListener::bind(("127.0.0.1", 0))?;
            let addr = listener.local_addr()?.to_string();
            Ok(listener_from_fn(addr, move || {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                Ok(Box::new(stream) as Box<dyn Conn>)
            }))
        }
        Transport::Unix => {
            let path = need_path(transport, path)?;
            let listener = UnixListener::bind(path)?;
            Ok(listener_from_fn(path_str(path)?, move || {
                let (stream, _) = listener.accept()?;
                Ok(Box::new(stream) as Box<dyn Conn>)
            }))
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
            Ok(listener_from_fn(path_str(path)?, move || {
                Ok(Box::new(listener.accept()?) as Box<dyn Conn>)
            }))
        }
    }
}

/// Connect to a server that announced `addr` (a `host:port` for tcp, a socket path otherwise).
pub fn connect(transport: Transport, addr: &str) -> io::Result<Box<dyn Conn>> {
    match transport {
        Transport::Tcp => {
            let stream = TcpStream::connect(addr)?;
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
        let mut listener = listen(transport, path, &ShmTuning::default()).unwrap();
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
