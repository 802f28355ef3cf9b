//! Idle connections held open during a run (`--idle N`), to show that an active
//! connection's cost does not grow with the number of open ones.
//!
//! The idle pairs are vmc connections with both ends in the measuring process (a
//! local vmc listener accepts them), each moved onto shared memory with one byte in
//! each direction, then left alone for the whole run. Nothing in vmc walks over
//! connections on the data path, so the active connections' figures should not move.

use std::io::{Read, Write};

use anyhow::{bail, Context, Result};
use vmc_conn::{TcpListener, TcpStream};

/// The idle pairs; dropping it closes them.
pub struct IdleSet {
    _pairs: Vec<(TcpStream, TcpStream)>,
    /// How many ended up on shared memory.
    pub accelerated: usize,
}

/// Raises the soft open-files limit to the hard one: each idle pair costs a dozen
/// descriptors in this process.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!("could not raise the open-files limit: {e}");
        }
    }
}

/// Descriptors one idle pair holds in this process (both ends: TCP sockets, the
/// handshake socket (and the client's duplicate of it), the memfd, eventfds;
/// measured: 15).
const FDS_PER_PAIR: u64 = 16;

/// Opens `n` idle vmc connection pairs.
pub fn open(n: usize) -> Result<IdleSet> {
    raise_fd_limit();
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let need = n as u64 * FDS_PER_PAIR + 256;
    if need > limit {
        bail!(
            "--idle {n} needs about {need} open files ({FDS_PER_PAIR} per idle pair, both \
             ends live in this process), but the limit is {limit}: raise it (ulimit -n) \
             or ask for at most {} idle connections",
            limit.saturating_sub(256) / FDS_PER_PAIR
        );
    }
    let listener =
        TcpListener::bind("127.0.0.1:0").context("binding the idle-connection listener")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(n);
    let mut accelerated = 0;
    for i in 0..n {
        let mut c = TcpStream::connect(addr)
            .with_context(|| format!("opening idle connection {}", i + 1))?;
        let (mut s, _) = listener.accept()?;
        // One byte each way moves both directions onto the channel.
        c.write_all(b"i")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        s.write_all(b"i")?;
        c.read_exact(&mut b)?;
        c.write_all(b"i")?;
        s.read_exact(&mut b)?;
        s.write_all(b"i")?;
        c.read_exact(&mut b)?;
        if c.is_accelerated() && s.is_accelerated() {
            accelerated += 1;
        }
        pairs.push((c, s));
    }
    if n > 0 && accelerated == 0 {
        bail!(
            "none of the {n} idle connections was accelerated: {:?}",
            pairs[0].0.fallback_reason()
        );
    }
    Ok(IdleSet {
        _pairs: pairs,
        accelerated,
    })
}
