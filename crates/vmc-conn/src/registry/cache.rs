//! The per-port cache of lookups: see "Cached lookups" in the [module
//! documentation](super).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use vmc_os::segment::ofd_locked_by_other;
use vmc_os::sync::ForkSafeMutex;

use super::entry::ListenerEntry;
use super::store::LIVENESS_BYTE;

/// How old a directory mtime must be for a look at the directory to be cached:
/// more than the kernel's coarse clock can lag behind the real time.
pub const MTIME_SLACK: Duration = Duration::from_millis(50);

/// Most ports whose lookups are cached (each keeps its entries' files open).
const CACHED_PORTS: usize = 64;

/// The live entries of one port at the last look, with their open files.
struct PortCache {
    /// The directory's mtime then.
    mtime: (i64, u32),
    entries: Vec<(ListenerEntry, File)>,
}

/// Lookups, per port. Shared so that a look checks a cached port's locks outside
/// the lock. A forked child starts with none: the parent's are forgotten, not
/// closed (the child may have closed those descriptors and opened its own files
/// under the numbers).
pub(super) struct Cache(ForkSafeMutex<HashMap<u16, Arc<PortCache>>>);

impl Cache {
    /// A cache with nothing looked up yet.
    pub(super) fn new() -> Cache {
        Cache(ForkSafeMutex::new(|_| HashMap::new()))
    }

    /// The entries of `port`'s last look, if it is still valid: the directory's
    /// mtime is still `mtime` and every entry's lock is still held.
    pub(super) fn valid(&self, port: u16, mtime: (i64, u32)) -> Option<Vec<ListenerEntry>> {
        // The lock is held only to find or replace a port's look: threads that
        // connect at once check locks and read the directory in parallel.
        let cached = self.0.lock().get(&port).cloned();
        if let Some(c) = cached {
            let alive = |f: &File| ofd_locked_by_other(f.as_fd(), LIVENESS_BYTE).unwrap_or(false);
            if c.mtime == mtime && c.entries.iter().all(|(_, f)| alive(f)) {
                return Some(c.entries.iter().map(|(e, _)| e.clone()).collect());
            }
        }
        None
    }

    /// Keeps `live`, a look at `port`'s entries that began at `began` when the
    /// directory's mtime was `mtime`, if it can be trusted later; else forgets
    /// the port's previous look.
    pub(super) fn keep(
        &self,
        port: u16,
        mtime: (i64, u32),
        began: SystemTime,
        live: Vec<(ListenerEntry, File)>,
    ) {
        let settled =
            SystemTime::UNIX_EPOCH + Duration::new(mtime.0.max(0) as u64, mtime.1) + MTIME_SLACK;
        let look = Arc::new(PortCache {
            mtime,
            entries: live,
        });
        // Replaced (or removed, if this look cannot be trusted later); the old one
        // is dropped outside the lock (dropping closes files, and the preload's
        // `close` hook may come here).
        let old = {
            let mut cache = self.0.lock();
            if settled < began {
                if cache.len() >= CACHED_PORTS && !cache.contains_key(&port) {
                    let all: Vec<_> = cache.drain().map(|(_, c)| c).collect();
                    drop(cache);
                    drop(all);
                    cache = self.0.lock();
                }
                cache.insert(port, look)
            } else {
                cache.remove(&port)
            }
        };
        drop(old);
    }

    /// Forgets, never closes, the looks holding a descriptor for which `within`
    /// is true (see [`super::Registry::forget_fds`]); returns how many.
    pub(super) fn forget_fds(&self, within: impl Fn(i32) -> bool) -> usize {
        use std::os::fd::AsRawFd;
        let mut n = 0;
        let mut cache = self.0.lock();
        let lost: Vec<u16> = cache
            .iter()
            .filter(|(_, c)| c.entries.iter().any(|(_, f)| within(f.as_raw_fd())))
            .map(|(port, _)| *port)
            .collect();
        for port in lost {
            if let Some(c) = cache.remove(&port) {
                std::mem::forget(c);
                n += 1;
            }
        }
        n
    }
}
