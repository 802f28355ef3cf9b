//! Helpers that vmc's tests share, so that each crate's tests wait for the same
//! events in the same way. A dev-dependency of the other crates, never a
//! dependency: nothing here is part of vmc.
//!
//! The central one is [`wait_asleep`]: where a test needs "the other thread is
//! blocked now" (in a futex, `poll` or `read`), it waits for that event in
//! `/proc` instead of sleeping a while and hoping.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The calling thread's kernel id, as `/proc/self/task/<tid>` names it.
pub fn tid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// Spawns `f` on a thread; returns its handle and its kernel thread id (for
/// [`wait_asleep`]), known before `f` starts.
pub fn spawn_with_tid<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> (JoinHandle<T>, i32) {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let _ = tx.send(tid());
        f()
    });
    (h, rx.recv().expect("the thread says its id"))
}

/// Waits (at most `limit`) until thread `tid` of this process sleeps in the
/// kernel (state S: in a futex, poll or sleep; a spinning or preempted thread is
/// R): the event "the other thread is blocked", where a fixed sleep would only
/// hope it is by then. Returns at once if the thread has ended (the caller's
/// own checks then say what went wrong).
///
/// # Panics
/// If the thread is still not asleep after `limit`.
#[track_caller]
pub fn wait_asleep(tid: i32, limit: Duration) {
    let path = format!("/proc/self/task/{tid}/stat");
    let deadline = Instant::now() + limit;
    loop {
        let Ok(stat) = std::fs::read_to_string(&path) else {
            return;
        };
        let state = thread_state(&stat);
        if matches!(state, "S" | "Z" | "X") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} did not block within {limit:?} (state {state})"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// The state letter of a `/proc/.../stat` line ("tid (name) S ..."): it follows
/// the last ')', since the name itself may hold spaces and parentheses.
fn thread_state(stat: &str) -> &str {
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?")
}

/// How many descriptors this process has open (the directory stream's own
/// descriptor is counted too, each time, so differences are exact).
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd is readable")
        .count()
}

/// A loopback port that refuses connections for as long as the value lives.
///
/// A listener bound and dropped frees its port for any other test of the same
/// binary to take: a connect to it may then reach that test's listener, or
/// meet the reset of one closing with the SYN queued (ECONNRESET instead of
/// ECONNREFUSED). This holds the port with a bound socket that never listens
/// and does not set `SO_REUSEADDR`, so no other socket can bind it and every
/// connect to it is refused.
pub struct RefusingPort {
    _socket: OwnedFd,
    addr: SocketAddr,
}

impl RefusingPort {
    /// Binds a fresh socket to `127.0.0.1:0`.
    ///
    /// # Panics
    /// If the system calls fail (no loopback).
    pub fn new() -> Self {
        use rustix::net::{bind, getsockname, socket, AddressFamily, SocketType};
        let socket = socket(AddressFamily::INET, SocketType::STREAM, None).expect("a TCP socket");
        bind(&socket, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let addr = getsockname(&socket).expect("getsockname");
        let addr = SocketAddrV4::try_from(addr).expect("an IPv4 address");
        Self {
            _socket: socket,
            addr: addr.into(),
        }
    }

    /// The refused address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Default for RefusingPort {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(thread_state("42 (a) b) S 1 2 3"), "S");
        assert_eq!(thread_state("42 (x) R 1"), "R");
        assert_eq!(thread_state("garbage"), "?");
    }

    #[test]
    fn a_refusing_port_refuses_and_cannot_be_taken() {
        let port = RefusingPort::new();
        let e = std::net::TcpStream::connect(port.addr()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        assert!(std::net::TcpListener::bind(port.addr()).is_err());
    }

    #[test]
    fn a_thread_blocked_in_recv_is_seen_asleep() {
        let (go, wait) = mpsc::channel::<()>();
        let (h, t) = spawn_with_tid(move || wait.recv().unwrap());
        wait_asleep(t, Duration::from_secs(5));
        go.send(()).unwrap();
        h.join().unwrap();
        // Once it has ended, there is nothing to wait for.
        wait_asleep(t, Duration::from_secs(5));
    }
}
