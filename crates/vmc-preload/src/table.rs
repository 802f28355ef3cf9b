//! What vmc knows about the program's descriptors: one slot per descriptor number.
//!
//! The program's descriptor stays the real kernel socket (getpeername, setsockopt,
//! fstat and exec all keep working); a slot only says that vmc has taken it over:
//! a listener whose clients may be accelerated, a connection with a channel beside
//! it, or an epoll set holding such connections. Each slot has its own lock, held
//! only to clone or swap the entry, so unrelated connections never contend; a
//! process with no vmc descriptor at all pays one atomic load per hooked call.
//!
//! Descriptors at or above [`MAX_FDS`] are never taken over (they stay plain TCP).
//!
//! The table is a plain map: none of its operations asks who owns a connection
//! since a fork or counts it for `VMC_REPORT`. What happens when an entry's last
//! reference goes is the hooks' business (the `Drop` of [`Sock`] is in
//! [`crate::hooks`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::epoll::EpollSet;

/// Descriptors vmc can take over: 0..MAX_FDS.
pub(crate) const MAX_FDS: usize = 1 << 16;

/// What a descriptor is to vmc.
pub(crate) enum Sock {
    /// A registered listener: connections accepted from it may be accelerated.
    Listener(vmc_conn::TcpListener),
    /// A connection (accelerated, or still deciding).
    Stream(Stream),
    /// An epoll set that holds (or held) vmc connections.
    Epoll(EpollSet),
}

/// A connection vmc carries, and which process owns it (see [`crate::fork`]).
pub(crate) struct Stream {
    pub(crate) s: vmc_conn::TcpStream,
    pub(crate) owner: crate::fork::Owner,
    /// `SO_RCVTIMEO` / `SO_SNDTIMEO` are set: the kernel ends such a call with
    /// `EINTR` after any signal handler, `SA_RESTART` or not (see `crate::signals`).
    pub(crate) timed: [AtomicBool; 2],
}

impl Stream {
    pub(crate) fn new(s: vmc_conn::TcpStream) -> Stream {
        Stream {
            s,
            owner: crate::fork::Owner::default(),
            timed: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }
}

impl std::ops::Deref for Stream {
    type Target = vmc_conn::TcpStream;
    fn deref(&self) -> &vmc_conn::TcpStream {
        &self.s
    }
}

type Slot = Mutex<Option<Arc<Sock>>>;

static TABLE: [Slot; MAX_FDS] = [const { Mutex::new(None) }; MAX_FDS];
/// Occupied slots; zero means no lookup is needed at all.
static USED: AtomicUsize = AtomicUsize::new(0);
/// One bit per slot that may be occupied, so that a walk over the table (at every
/// fork, in the child, and at exit) looks at those slots only. Walking all 65536
/// locks wrote to every page of the table, which a forked child then had to copy:
/// that was most of what a fork-per-connection server paid for vmc.
static OCCUPIED: [AtomicU64; MAX_FDS / 64] = [const { AtomicU64::new(0) }; MAX_FDS / 64];

fn mark(i: usize, on: bool) {
    let bit = 1u64 << (i % 64);
    if on {
        OCCUPIED[i / 64].fetch_or(bit, Ordering::Relaxed);
    } else {
        OCCUPIED[i / 64].fetch_and(!bit, Ordering::Relaxed);
    }
}

/// The slots whose bit is set, in increasing order (the bits are read as they
/// are; a slot set concurrently may or may not be included, as before).
fn marked() -> impl Iterator<Item = usize> {
    OCCUPIED.iter().enumerate().flat_map(|(w, word)| {
        let mut bits = word.load(Ordering::Relaxed);
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(w * 64 + b)
        })
    })
}

fn slot(fd: i32) -> Option<MutexGuard<'static, Option<Arc<Sock>>>> {
    let i = usize::try_from(fd).ok().filter(|&i| i < MAX_FDS)?;
    Some(TABLE[i].lock().unwrap_or_else(|p| p.into_inner()))
}

/// True if vmc may have taken over any descriptor.
#[inline]
pub(crate) fn any() -> bool {
    USED.load(Ordering::Relaxed) != 0
}

/// What `fd` is to vmc, if anything.
#[inline]
pub(crate) fn get(fd: i32) -> Option<Arc<Sock>> {
    if !any() {
        return None;
    }
    slot(fd)?.clone()
}

/// Records what `fd` is now. Descriptors out of range are refused (`false`), and
/// stay plain. An entry this replaces is dropped here: a caller that may replace
/// one holds a reference of its own, so that the last one goes outside the table
/// (see `hooks::descriptors::copy_entry`).
pub(crate) fn set(fd: i32, sock: Arc<Sock>) -> bool {
    let Some(mut s) = slot(fd) else {
        return false;
    };
    if s.replace(sock).is_none() {
        USED.fetch_add(1, Ordering::Relaxed);
        mark(fd as usize, true);
    }
    true
}

/// Forgets `fd` (it was closed or replaced); returns what it was.
pub(crate) fn take(fd: i32) -> Option<Arc<Sock>> {
    if !any() {
        return None;
    }
    let mut s = slot(fd)?;
    let old = s.take();
    if old.is_some() {
        USED.fetch_sub(1, Ordering::Relaxed);
        mark(fd as usize, false);
    }
    old
}

/// Calls `f` for every occupied slot, waiting a little for slots another thread
/// holds (they are held only to clone or swap an entry). A slot still locked after
/// 20 ms is skipped: in a forked child its holder may be a thread that does not
/// exist there.
pub(crate) fn for_each_waiting(mut f: impl FnMut(i32, &Arc<Sock>)) {
    if !any() {
        return;
    }
    for i in marked() {
        let s = &TABLE[i];
        let mut tries = 0;
        let g = loop {
            match s.try_lock() {
                Ok(g) => break Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if tries < 200 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(std::sync::TryLockError::WouldBlock) => break None,
            }
        };
        if let Some(sock) = g.as_ref().and_then(|g| g.as_ref()) {
            f(i as i32, sock);
        }
    }
}

/// Calls `f` for every occupied slot (at exit, in a forked child). Slots whose lock
/// is held (only possible in a child forked while another thread held it) are
/// skipped rather than waited for.
pub(crate) fn for_each(mut f: impl FnMut(i32, &mut Option<Arc<Sock>>)) {
    if !any() {
        return;
    }
    for i in marked() {
        if let Ok(mut g) = TABLE[i].try_lock() {
            if g.is_some() {
                f(i as i32, &mut g);
                if g.is_none() {
                    USED.fetch_sub(1, Ordering::Relaxed);
                    mark(i, false);
                }
            }
        }
    }
}
