//! Descriptors that share a TCP socket before vmc takes it over.
//!
//! A program may duplicate a socket and then connect through one descriptor and use
//! another (`fd2 = dup(fd); connect(fd2, ...); close(fd2); read(fd, ...)`). vmc
//! takes a connection over at `connect`, on the descriptor connect was called with;
//! every other descriptor of that socket must then lead to the same connection, or
//! reads through it would miss what arrives over shared memory. Duplicates made
//! after the take-over copy the table entry (see
//! `hooks::descriptors::copy_entry`); duplicates made before are remembered here,
//! as pairs, and checked against the socket's inode when used (a remembered number
//! may since have been closed and reused).
//!
//! Only duplications of not-yet-taken-over TCP sockets land here, which programs do
//! rarely; the list is bounded, and empty for most processes.

use std::sync::atomic::{AtomicBool, Ordering};
use vmc_os::sync::ForkSafeMutex;

/// At most this many pairs are remembered (the oldest are dropped).
const MAX_PAIRS: usize = 1024;

/// A forked child keeps the pairs (its descriptors are copies of the same), unless
/// another thread was changing them at the fork.
static PAIRS: ForkSafeMutex<Vec<(i32, i32)>> =
    ForkSafeMutex::new(|inherited| inherited.map(std::mem::take).unwrap_or_default());
/// False while no pair was ever recorded: `close` skips the lock.
static ANY: AtomicBool = AtomicBool::new(false);

fn identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: a query on a descriptor number the program holds (a closed number
    // only makes fstat fail).
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    rustix::fs::fstat(b).ok().map(|st| (st.st_dev, st.st_ino))
}

/// `new` was duplicated from the TCP socket `old`.
pub(crate) fn record(old: i32, new: i32) {
    let mut pairs = PAIRS.lock();
    pairs.retain(|&(a, b)| a != new && b != new);
    if pairs.len() >= MAX_PAIRS {
        pairs.remove(0);
    }
    pairs.push((old, new));
    ANY.store(true, Ordering::Relaxed);
}

/// True once any pair was recorded.
#[inline]
pub(crate) fn any() -> bool {
    ANY.load(Ordering::Relaxed)
}

/// `fd` was closed (or replaced).
pub(crate) fn forget(fd: i32) {
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    PAIRS.lock().retain(|&(a, b)| a != fd && b != fd);
}

/// The other open descriptors of `fd`'s socket that were recorded, transitively.
pub(crate) fn of(fd: i32) -> Vec<i32> {
    if !ANY.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let Some(me) = identity(fd) else {
        return Vec::new();
    };
    let pairs = PAIRS.lock();
    let mut found = vec![fd];
    let mut i = 0;
    while i < found.len() {
        let x = found[i];
        for &(a, b) in pairs.iter() {
            for (from, to) in [(a, b), (b, a)] {
                if from == x && !found.contains(&to) && identity(to) == Some(me) {
                    found.push(to);
                }
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}
