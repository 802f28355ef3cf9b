//! Where vmc's own descriptors live: out of the program's way.
//!
//! A program must not be able to tell that vmc runs inside it, and descriptor
//! numbers are something programs look at: the kernel hands out the lowest free
//! number, servers size their event tables by the connections they expect
//! (wrk: 10 + 3 per connection), and a `select()` program can only watch numbers
//! below 1024. So every descriptor vmc keeps (segments, eventfds, epoll sets,
//! Unix sockets, duplicates of the program's sockets, registry and statistics
//! files) is moved, as soon as it exists, to the lowest free number at or above
//! the *base* (1024 unless `VMC_FD_BASE` says otherwise), close-on-exec, and the
//! number it was created under is closed again before control returns to the
//! program. A single-threaded program thus sees exactly the numbers it would see
//! without vmc; a program with more than `base` descriptors of its own sees vmc's
//! among its highest ones.
//!
//! The soft `RLIMIT_NOFILE` is often 1024, below the base. The kernel refuses a
//! number at or above the soft limit, but a descriptor already there stays valid
//! when the limit is lower: so a move that the limit refuses raises the soft limit
//! to the hard one for the one `fcntl` call and puts it back at once, under a lock
//! that the preload's `setrlimit`/`prlimit` hooks take too ([`with_limits_locked`]).
//! A process whose hard limit is at or below the base cannot hide vmc: [`lift`]
//! fails there, and callers fall back to plain TCP.
//!
//! [`is_ours`] tells the preload's `close_range` hook whether a number is one vmc
//! placed (and still holds the same file), so that a program closing every
//! descriptor above 2 (CPython's `closerange`, a daemon's clean-up) closes around
//! vmc's, which it would not have had without vmc, and vmc keeps working.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use rustix::io::Errno;
use rustix::process::{Resource, Rlimit};

/// The default base: the first number `select()` cannot watch, and above what
/// nearly every program uses.
pub const DEFAULT_BASE: RawFd = 1024;

/// How many numbers above the base [`is_ours`] keeps track of.
const TRACKED: usize = 1 << 16;

/// Per number above the base: a tag of the file vmc placed there (0: none).
static PLACED: [AtomicU64; TRACKED] = [const { AtomicU64::new(0) }; TRACKED];

/// One past the highest slot of [`PLACED`] ever used.
static HIGH: AtomicUsize = AtomicUsize::new(0);

/// The base, once read from the environment (0: not yet).
static BASE: AtomicI32 = AtomicI32::new(0);

/// Serialises changes of `RLIMIT_NOFILE`: 0 free, else the holder's pid (a lock
/// held across a fork by another thread is stale in the child, whose pid differs
/// and whose copy of the holder does not exist, and is taken over).
static LIMITS: AtomicU32 = AtomicU32::new(0);

/// The lowest number vmc places its descriptors at.
pub fn base() -> RawFd {
    match BASE.load(Ordering::Relaxed) {
        0 => {
            let b = std::env::var("VMC_FD_BASE")
                .ok()
                .and_then(|v| v.trim().parse::<RawFd>().ok())
                .filter(|&b| (3..=1 << 24).contains(&b))
                .unwrap_or(DEFAULT_BASE);
            BASE.store(b, Ordering::Relaxed);
            b
        }
        b => b,
    }
}

/// Moves `fd` to vmc's range (see the module documentation) and returns it there,
/// close-on-exec; the number it had is closed. A descriptor in the range already
/// is returned as it is.
pub fn lift(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= base() {
        note(fd.as_fd());
        return Ok(fd);
    }
    // `fd` is dropped (closed) after the duplicate exists.
    dup(fd.as_fd())
}

/// A close-on-exec duplicate of `fd` in vmc's range.
pub fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let base = base();
    let new = match rustix::io::fcntl_dupfd_cloexec(fd, base) {
        Ok(new) => new,
        // At or above the soft limit (EINVAL), or no free number between the base
        // and it (EMFILE): raise the soft limit for this one call.
        Err(Errno::INVAL | Errno::MFILE) => with_limits_locked(|| dup_raised(fd, base))?,
        Err(e) => return Err(e.into()),
    };
    note(new.as_fd());
    Ok(new)
}

fn dup_raised(fd: BorrowedFd<'_>, base: RawFd) -> io::Result<OwnedFd> {
    let limit = rustix::process::getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if hard <= base as u64 {
        return Err(io::Error::other(format!(
            "vmc keeps its descriptors at {base} and above, but this process's hard \
                 RLIMIT_NOFILE is {hard} (set VMC_FD_BASE lower to accelerate it)"
        )));
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    rustix::process::setrlimit(Resource::Nofile, raised)?;
    let r = rustix::io::fcntl_dupfd_cloexec(fd, base);
    // Put the program's limit back whatever happened; descriptors above it stay
    // valid.
    let restored = rustix::process::setrlimit(Resource::Nofile, limit);
    let new = r?;
    restored?;
    Ok(new)
}

/// Runs `f` while no other thread of this process changes `RLIMIT_NOFILE` through
/// vmc (the preload wraps the program's `setrlimit` and `prlimit` in this too, so
/// that restoring the limit after a move never undoes the program's change).
pub fn with_limits_locked<T>(f: impl FnOnce() -> T) -> T {
    let me = crate::proc::pid();
    loop {
        match LIMITS.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => break,
            // Held before a fork by a thread the child does not have.
            Err(h) if h != me => {
                if LIMITS
                    .compare_exchange(h, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    break;
                }
            }
            Err(_) => std::thread::yield_now(),
        }
    }
    struct Unlock;
    impl Drop for Unlock {
        fn drop(&mut self) {
            LIMITS.store(0, Ordering::Release);
        }
    }
    let _unlock = Unlock;
    f()
}

/// A tag for the file behind `fd`: its device and inode, never 0.
fn tag(fd: BorrowedFd<'_>) -> Option<u64> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some((st.st_ino ^ (st.st_dev << 40)) | 1 << 63)
}

fn slot(fd: RawFd) -> Option<&'static AtomicU64> {
    let i = usize::try_from(fd.checked_sub(base())?).ok()?;
    PLACED.get(i)
}

/// Records that vmc placed `fd`.
fn note(fd: BorrowedFd<'_>) {
    if let (Some(slot), Some(tag)) = (slot(fd.as_raw_fd()), tag(fd)) {
        slot.store(tag, Ordering::Relaxed);
        let i = (fd.as_raw_fd() - base()) as usize;
        HIGH.fetch_max(i + 1, Ordering::Relaxed);
    }
}

/// True if `fd` is a descriptor vmc placed and that still holds the file vmc
/// placed there. (vmc's own closes do not clear the record: a number vmc closed
/// and the program later got holds another file, and is told apart by that.)
/// One `fstat` for numbers vmc has used, nothing for the others.
pub fn is_ours(fd: RawFd) -> bool {
    if fd < base() {
        return false;
    }
    let Some(slot) = slot(fd) else { return false };
    let placed = slot.load(Ordering::Relaxed);
    if placed == 0 {
        return false;
    }
    // SAFETY: only looked at with fstat, which fails with EBADF on a number
    // that is not open; the borrow does not outlive this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    tag(fd) == Some(placed)
}

/// True once vmc has placed a descriptor in this process (or its parent, before
/// a fork): false means [`is_ours`] is false for every number.
pub fn any_placed() -> bool {
    HIGH.load(Ordering::Relaxed) != 0
}

/// The numbers in `first..=last` that [`is_ours`], in increasing order.
pub fn ours_in(first: RawFd, last: RawFd) -> Vec<RawFd> {
    let base = base();
    let high = base.saturating_add(HIGH.load(Ordering::Relaxed) as RawFd);
    (first.max(base)..=last.min(high.saturating_sub(1)))
        .filter(|&fd| is_ours(fd))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd() -> OwnedFd {
        rustix::fs::memfd_create("fdspace-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap()
    }

    #[test]
    fn lifted_descriptors_leave_the_low_numbers_free() {
        let _g = crate::test_support::fd_sensitive();
        let a = memfd();
        let low = a.as_raw_fd();
        let lifted = lift(a).unwrap();
        assert!(lifted.as_raw_fd() >= base());
        assert!(is_ours(lifted.as_raw_fd()));
        let flags = rustix::io::fcntl_getfd(&lifted).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        // The number it was created under is free again (another test may take
        // it meanwhile, so only a number at or below it is checked).
        let b = memfd();
        assert!(b.as_raw_fd() <= low || b.as_raw_fd() < base());
        assert!(!is_ours(b.as_raw_fd()));
    }

    #[test]
    fn a_number_that_holds_another_file_is_not_ours() {
        let lifted = lift(memfd()).unwrap();
        let n = lifted.as_raw_fd();
        drop(lifted);
        assert!(!is_ours(n), "closed");
        // Another file under the same number.
        let other = memfd();
        let again = rustix::io::fcntl_dupfd_cloexec(&other, n).unwrap();
        if again.as_raw_fd() == n {
            assert!(!is_ours(n), "another file under vmc's old number");
        }
    }

    #[test]
    fn a_low_soft_limit_is_raised_only_for_the_move() {
        // In a child: changing the limit must not disturb the other tests.
        // SAFETY: the child runs only system calls and atomics, then _exit.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            let ok = (|| {
                let lim = rustix::process::getrlimit(Resource::Nofile);
                if lim.maximum.is_some_and(|m| m <= base() as u64 + 1) {
                    return Some(true); // nothing to show on this machine
                }
                let low = Rlimit {
                    current: Some(base() as u64 / 2),
                    maximum: lim.maximum,
                };
                rustix::process::setrlimit(Resource::Nofile, low).ok()?;
                let fd = dup(memfd().as_fd()).ok()?;
                let after = rustix::process::getrlimit(Resource::Nofile);
                Some(fd.as_raw_fd() >= base() && after.current == low.current)
            })()
            .unwrap_or(false);
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: our own child; a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}
