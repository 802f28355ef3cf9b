//! What a process did with vmc, for `VMC_REPORT=FILE`: one JSON line appended at
//! exit, `{"pid", "exe", "accelerated", "plain", "shm_in", "shm_out", "tcp_in",
//! "tcp_out"}`. A connection counts as accelerated if it carried any byte over
//! shared memory. Tests use it to prove a real program really ran accelerated.
//!
//! Totals are kept per connection (`vmc_conn`'s own counters) and added up here only
//! when a connection ends or the process exits: nothing on the data path.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::table::{self, Sock};

static ACCELERATED: AtomicU64 = AtomicU64::new(0);
static PLAIN: AtomicU64 = AtomicU64::new(0);
static SHM_IN: AtomicU64 = AtomicU64::new(0);
static SHM_OUT: AtomicU64 = AtomicU64::new(0);
static TCP_IN: AtomicU64 = AtomicU64::new(0);
static TCP_OUT: AtomicU64 = AtomicU64::new(0);

/// A connection that stayed plain TCP from the start.
pub(crate) fn count_plain() {
    PLAIN.fetch_add(1, Ordering::Relaxed);
}

/// Adds a finished (or, at exit, live) connection to the totals.
pub(crate) fn account(s: &vmc_conn::TcpStream) {
    let t = s.traffic();
    if t.shm_in + t.shm_out > 0 {
        ACCELERATED.fetch_add(1, Ordering::Relaxed);
    } else {
        PLAIN.fetch_add(1, Ordering::Relaxed);
    }
    SHM_IN.fetch_add(t.shm_in, Ordering::Relaxed);
    SHM_OUT.fetch_add(t.shm_out, Ordering::Relaxed);
    TCP_IN.fetch_add(t.tcp_in, Ordering::Relaxed);
    TCP_OUT.fetch_add(t.tcp_out, Ordering::Relaxed);
}

/// The fork handler, in the child. Connections stay (which process keeps each is
/// settled at first use, see `crate::fork`). Listeners stay too: the child shares
/// the listening socket and the registry entry's locked file, calls the offer
/// sockets of the connections it accepts, and a child closing its copy removes
/// nothing (only the registrant unregisters). The child starts its own totals.
pub(crate) extern "C" fn in_child() {
    for c in [&ACCELERATED, &PLAIN, &SHM_IN, &SHM_OUT, &TCP_IN, &TCP_OUT] {
        c.store(0, Ordering::Relaxed);
    }
}

/// The exit handler: live connections are added, then the line is written.
pub(crate) extern "C" fn at_exit() {
    let Some(_g) = crate::enter() else { return };
    crate::fork::settle_at_exit();
    let Some(path) = std::env::var_os("VMC_REPORT") else {
        return;
    };
    let mut seen: Vec<*const Sock> = Vec::new();
    table::for_each(|_, slot| {
        if let Some(sock) = slot.as_ref() {
            let p = Arc::as_ptr(sock);
            if let Sock::Stream(s) = &**sock {
                if !seen.contains(&p) && s.owner.owned_here() {
                    seen.push(p);
                    account(s);
                }
            }
        }
    });
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let line = serde_json::json!({
        "pid": std::process::id(),
        "exe": exe,
        "accelerated": ACCELERATED.load(Ordering::Relaxed),
        "plain": PLAIN.load(Ordering::Relaxed),
        "shm_in": SHM_IN.load(Ordering::Relaxed),
        "shm_out": SHM_OUT.load(Ordering::Relaxed),
        "tcp_in": TCP_IN.load(Ordering::Relaxed),
        "tcp_out": TCP_OUT.load(Ordering::Relaxed),
    });
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        // One write of the whole line: appends from several processes never mix.
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}
