//! The host-local registry of vmc listeners.
//!
//! XenVMC kept the list of accelerated listeners in XenStore. vmc has no
//! daemon: the registry is a per-user directory of small JSON files, one per
//! listening socket, written by the listener's process and read by processes
//! that are about to connect.
//!
//! # Location
//!
//! [`Registry::default_dir`] is `$VMC_REGISTRY_DIR` if set, else
//! `<SegmentDir::default_path()>/listeners`, normally
//! `/dev/shm/vmc-<euid>/listeners`. `/dev/shm` is used rather than
//! `$XDG_RUNTIME_DIR` because
//!
//! * containers that live in their own network namespaces but share
//!   `/dev/shm` (or a bind mount of it) see one another's entries, which is
//!   what lets a client in one container find a listener in another;
//! * it exists for system services and cron jobs, for which
//!   `$XDG_RUNTIME_DIR` is usually not set.
//!
//! Both the registry directory and its parent are created with mode 0700 and
//! must be directories (not symlinks) owned by our effective uid with mode
//! exactly 0700; anything else is refused with an error naming the problem
//! (the checks of [`SegmentDir::open`]). The same holds for the *offers*
//! directory beside it ([`OFFERS_DIR_NAME`]), where clients bind the sockets on
//! which the processes that accept their connections call them (see
//! [`crate::wire::offer_name`]); it is a sibling so that the churn of offer sockets
//! never moves the registry's mtime, which cached lookups watch. `/dev/shm` has
//! the sticky bit, so once validated, nobody else can replace our directories.
//!
//! # Entries
//!
//! A listener is registered with [`Registry::register`], which writes a
//! [`ListenerEntry`] as JSON to `l-<port>-<pid>-<random>.json` (mode 0600).
//! The port in the name lets [`Registry::lookup`] skip every file of another
//! port without opening it.
//!
//! # Liveness
//!
//! The registering process keeps the entry's file open with an OFD write
//! lock on byte 0 for as long as its [`Registration`] lives; the kernel drops
//! the lock when the process dies, even by `SIGKILL`. The lock is taken on
//! the temporary file *before* it is renamed to its final name, so a file
//! under a final name without a lock is always dead. Readers test the lock
//! with `F_OFD_GETLK` (they never take it), and remove dead entries as they
//! find them. Offer sockets left by clients killed during a handshake are
//! removed by [`Registry::reap`].
//! Dropping a [`Registration`] removes its file.
//!
//! # Cached lookups
//!
//! A process that connects often would read the directory and every entry of
//! the port at each connection. Instead it keeps, per port, the live entries of
//! its last look and their open files, and trusts them again while the
//! directory's mtime is unchanged (any entry appearing or disappearing changes
//! it) and each entry's lock is still held (a killed listener changes nothing in
//! the directory): one `fstat` and one `F_OFD_GETLK` per candidate instead of a
//! dozen system calls. An mtime is only as fine as the kernel's coarse clock, so
//! a look is cached only if the mtime it saw was older than [`MTIME_SLACK`] when
//! it began: a change after that would have moved the mtime.
//!
//! # Concurrency
//!
//! Files appear atomically (write, lock, then `rename` with
//! `RENAME_NOREPLACE`) and disappear atomically (`unlink`), names are unique,
//! and nobody ever blocks on a lock, so any number of processes can register,
//! look up and reap at the same time.
//!
//! # Files
//!
//! This file holds [`Registry`] and [`Registration`]; `entry.rs` the entry
//! format ([`ListenerEntry`]), entry file names and the checks of what a reader
//! finds in one; `store.rs` the files on disk (opening the directories, writing
//! an entry, reaping what dead processes left); `cache.rs` the per-port cache
//! of lookups; `rank.rs` which entries a destination can reach, best first;
//! `netns.rs` [`NetNs`].

mod cache;
pub(crate) mod entry;
mod netns;
mod rank;
mod store;

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags};
use vmc_os::segment::ofd_locked_by_other;
use vmc_os::sync::ForkSafeMutex;
use vmc_os::SegmentDir;

use cache::Cache;
pub use cache::MTIME_SLACK;
pub(crate) use entry::{parse_entry, parse_entry_name};
pub use entry::{ListenerEntry, ENTRY_PREFIX, ENTRY_SUFFIX, ENTRY_VERSION};
use entry::{MAX_ENTRY_LEN, TMP_ENTRY_PREFIX};
pub use netns::NetNs;
pub(crate) use rank::rank_candidates;
use store::{
    open_dirs, reap_stale_offers, reap_stale_tmp, write_entry, LIVENESS_BYTE, OFFER_MAX_AGE,
};

/// Environment variable overriding [`Registry::default_dir`].
pub const REGISTRY_DIR_ENV: &str = "VMC_REGISTRY_DIR";

/// Name of the registry directory inside the segment directory.
pub const LISTENERS_DIR_NAME: &str = "listeners";

/// Name of the offers directory, beside the registry directory.
pub const OFFERS_DIR_NAME: &str = "offers";

/// Environment variable overriding [`public_dir`].
pub const PUBLIC_DIR_ENV: &str = "VMC_PUBLIC_DIR";

/// Where the registry every user shares lives: `$VMC_PUBLIC_DIR` if set and
/// non-empty, else `/dev/shm/vmc-public` (beside the per-user directories).
pub fn public_dir() -> PathBuf {
    match std::env::var_os(PUBLIC_DIR_ENV).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => SegmentDir::default_path()
            .parent()
            .map_or_else(|| PathBuf::from("/dev/shm"), Path::to_path_buf)
            .join("vmc-public"),
    }
}

/// How many distinct file names a registry remembers having warned about
/// (so that a bad file is reported once, not on every lookup).
const MAX_WARNED: usize = 4096;

/// A live registration: the entry file stays listed, and its liveness lock
/// held, until this is dropped.
///
/// Dropping it unlinks the entry file and closes its descriptor (releasing
/// the lock). If the process dies instead, the kernel releases the lock and
/// the next reader removes the file.
///
/// The lock belongs to the open file description: a child created by `fork`
/// shares it until it closes the descriptor (which `exec` does, the
/// descriptor being close-on-exec), keeping the entry alive meanwhile.
#[derive(Debug)]
pub struct Registration {
    dir: Arc<SegmentDir>,
    name: String,
    file: File,
    entry: ListenerEntry,
    /// The process that registered: only it removes the entry. A process forked
    /// from it holds the same listening socket and locked entry file, and serves
    /// the listener's clients as well (pre-forked workers).
    owner: u32,
}

impl Registration {
    /// The registered entry.
    pub fn entry(&self) -> &ListenerEntry {
        &self.entry
    }

    /// The entry's file name inside the registry directory
    /// (`l-<port>-<pid>-<random>.json`).
    pub fn file_name(&self) -> &str {
        &self.name
    }

    /// The entry file's full path.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }

    /// Whether the entry file still has a name, i.e. was not removed by
    /// somebody else (for example by `rm -rf` of the registry or by
    /// systemd-logind's `RemoveIPC`). If not, lookups no longer see this
    /// listener, and the caller may want to register it again.
    pub fn is_listed(&self) -> bool {
        match self.file.metadata() {
            Ok(m) => m.nlink() > 0,
            Err(_) => false,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if vmc_os::pid() != self.owner {
            // A forked copy: the entry is the registrant's (and stays valid while
            // any process holds the locked file).
            return;
        }
        // Unlink first, then close (when `file` is dropped after this): a
        // reader racing with us then finds either a locked file or none.
        match rustix::fs::unlinkat(self.dir.fd(), self.name.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => tracing::debug!(
                "vmc registry: removing {}/{}: {e}",
                self.dir.path().display(),
                self.name
            ),
        }
    }
}

/// The registry: a private directory of listener entries. See the
/// [module documentation](self).
///
/// Lookups are cached per port only while nothing that matters has changed
/// (see "Cached lookups" in the module documentation), so listeners registered
/// by anybody at any time are seen at the next lookup. If the directory is removed
/// while this object lives (its link count drops to zero), it is created
/// again at the same path on the next operation.
pub struct Registry {
    /// The registry directory (absolute).
    path: PathBuf,
    /// Its parent (absolute), holding the offers directory too.
    root: PathBuf,
    /// The offers directory, once opened.
    offers: std::sync::OnceLock<SegmentDir>,
    /// The registry every user shares ([`Registry::open_public`]), not ours.
    public: bool,
    /// The open directory (`None` once forgotten: opened again at the next look).
    /// A forked child keeps it, unless another thread was changing it at the fork.
    dir: ForkSafeMutex<Option<Arc<SegmentDir>>>,
    /// File names already reported as bad.
    warned: ForkSafeMutex<HashSet<String>>,
    /// Entry files opened so far (lets tests check lookups skip files of
    /// other ports by name).
    opened: AtomicU64,
    /// Lookups, per port (see "Cached lookups" in the module documentation).
    cache: Cache,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What reading one entry file gave.
enum Inspected {
    /// A live, valid entry, and its open file.
    Live(ListenerEntry, File),
    /// A dead entry, now removed.
    Reaped,
    /// Anything else: vanished, foreign, corrupt, of another version, …
    Skipped,
}

impl Registry {
    /// The default registry directory: `$VMC_REGISTRY_DIR` if set and
    /// non-empty, else `<SegmentDir::default_path()>/listeners` (normally
    /// `/dev/shm/vmc-<euid>/listeners`; see the [module
    /// documentation](self) for why `/dev/shm`).
    pub fn default_dir() -> PathBuf {
        match std::env::var_os(REGISTRY_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => SegmentDir::default_path().join(LISTENERS_DIR_NAME),
        }
    }

    /// Opens the registry at [`Registry::default_dir`], creating it if
    /// needed.
    pub fn open_default() -> io::Result<Registry> {
        Registry::open(Registry::default_dir())
    }

    /// Opens the registry directory `path`, creating it and its parent (not
    /// further ancestors) with mode 0700 if needed.
    ///
    /// Both must be directories, not symlinks, owned by our effective uid
    /// with mode exactly 0700; otherwise this fails with
    /// `PermissionDenied` (or `InvalidInput` for a non-directory) and a
    /// message naming the offending path.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Registry> {
        let path = std::path::absolute(path.as_ref()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "vmc listener registry {}: making the path absolute: {e}",
                    path.as_ref().display()
                ),
            )
        })?;
        let root = match path.parent() {
            Some(p) if path.file_name().is_some() => p.to_path_buf(),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "vmc listener registry {}: needs a parent directory",
                        path.display()
                    ),
                ))
            }
        };
        Registry::at(path, root, false)
    }

    /// The registry at `path` inside `root` (checked as `public` says), with
    /// nothing looked up yet.
    fn at(path: PathBuf, root: PathBuf, public: bool) -> io::Result<Registry> {
        let dir = open_dirs(&path, &root, public)?;
        let registry = Registry {
            path,
            root,
            offers: std::sync::OnceLock::new(),
            public,
            dir: ForkSafeMutex::new(|inherited| inherited.and_then(Option::take)),
            warned: ForkSafeMutex::new(|_| HashSet::new()),
            opened: AtomicU64::new(0),
            cache: Cache::new(),
        };
        *registry.dir.lock() = Some(Arc::new(dir));
        Ok(registry)
    }

    /// The registry directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The registry every user shares, for connections between users:
    /// `<public_dir()>/listeners` (mode 1777, sticky), where each user's listeners
    /// are published as files that user owns (mode 0644), and whose offers
    /// directory (mode 1733) takes the offer sockets of connections to them. What
    /// an entry says is what `ss -ltn` shows anyway; nothing in it is trusted:
    /// the handshake checks each peer against the kernel (see
    /// `crate::handshake`).
    pub fn open_public() -> io::Result<Registry> {
        let root = public_dir();
        let path = root.join(LISTENERS_DIR_NAME);
        Registry::at(path, root, true)
    }

    /// Whether this is the registry every user shares.
    pub fn is_public(&self) -> bool {
        self.public
    }

    /// The mode of entry files: readable by every user in the public registry.
    fn entry_mode(&self) -> u32 {
        if self.public {
            0o644
        } else {
            0o600
        }
    }

    /// The offers directory beside the registry, created (mode 0700) and checked
    /// like it at the first call.
    pub fn offers(&self) -> io::Result<&SegmentDir> {
        if let Some(d) = self.offers.get() {
            return Ok(d);
        }
        let path = self.root.join(OFFERS_DIR_NAME);
        let dir = if self.public {
            // Anyone binds an offer there; nobody but its owner lists it.
            SegmentDir::open_shared(&path, 0o1733)
        } else {
            SegmentDir::open(&path)
        }
        .map_err(|e| io::Error::new(e.kind(), format!("vmc offers directory: {e}")))?;
        Ok(self.offers.get_or_init(|| dir))
    }

    /// Registers a listener: writes `entry` to a new file and keeps it
    /// locked until the returned [`Registration`] is dropped.
    ///
    /// The file is created under a temporary name (mode 0600,
    /// `O_EXCL | O_NOFOLLOW | O_CLOEXEC`), locked, written, and only then
    /// renamed to `l-<port>-<pid>-<random>.json`, so readers never see a
    /// partial or unlocked live entry.
    ///
    /// `entry` must have version [`ENTRY_VERSION`], our euid as uid, a
    /// non-zero port and an absolute offers path (`InvalidInput` otherwise):
    /// anything else would be ignored by every lookup.
    pub fn register(&self, entry: &ListenerEntry) -> io::Result<Registration> {
        let bad = |why: String| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("vmc registry: cannot register {}: {why}", entry.addr),
            ))
        };
        if entry.version != ENTRY_VERSION {
            return bad(format!(
                "version {} (this code writes {ENTRY_VERSION})",
                entry.version
            ));
        }
        let euid = vmc_os::euid();
        if entry.uid != euid {
            return bad(format!("uid {} is not our euid {euid}", entry.uid));
        }
        if entry.addr.port() == 0 {
            return bad("port 0".to_string());
        }
        if !entry.offers.is_absolute() {
            return bad(format!(
                "offers path {} is not absolute",
                entry.offers.display()
            ));
        }
        let mut json = serde_json::to_vec_pretty(entry).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("vmc registry: cannot encode entry for {}: {e}", entry.addr),
            )
        })?;
        json.push(b'\n');

        let dir = self.dir()?;
        let port = entry.addr.port();
        // A collision of the random part is astronomically unlikely; retry a
        // few times rather than fail if it happens.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (pid, random) = unique();
            let tmp = format!("{TMP_ENTRY_PREFIX}{port}-{pid}-{random:016x}");
            let name = format!("{ENTRY_PREFIX}{port}-{pid}-{random:016x}{ENTRY_SUFFIX}");
            match write_entry(&dir, &tmp, &name, &json, self.entry_mode()) {
                Ok(file) => {
                    tracing::debug!(
                        "vmc registry: registered {} as {}/{name}",
                        entry.addr,
                        dir.path().display()
                    );
                    return Ok(Registration {
                        dir,
                        name,
                        file,
                        entry: entry.clone(),
                        owner: vmc_os::pid(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 4 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Candidates for a TCP connection to `dst`, best first; only live
    /// entries whose port is `dst`'s (files of other ports are not even
    /// opened).
    ///
    /// * If `dst`'s IP is loopback (or unspecified, which the kernel treats
    ///   as loopback), only listeners in the calling thread's network
    ///   namespace can be reached: entries bound to exactly that IP, then
    ///   entries bound to the unspecified address of the same family (or to
    ///   `::`, which also accepts IPv4 through v4-mapped addresses unless it
    ///   is `IPV6_V6ONLY`).
    /// * Otherwise: entries bound to exactly `dst`'s IP in any namespace (our
    ///   own namespace first), then unspecified-address entries of our own
    ///   namespace, then unspecified-address entries of other namespaces.
    ///
    /// Within each group, entries of the same family as `dst` come before
    /// `::` accepting IPv4, then newer entries before older. A v4-mapped
    /// IPv6 `dst` is treated as the IPv4 address it maps.
    ///
    /// Entries that are not regular files, are not mode 0600, are not owned
    /// by our euid, do not parse, have another version or another uid, a port
    /// that is 0 or not the one in their name, or an offers path that is not
    /// absolute are ignored (reported once per file name, with the field at
    /// fault). Dead entries (lock not held) are removed.
    ///
    /// This never fails and never blocks: any error means no candidates
    /// (logged at debug level).
    pub fn lookup(&self, dst: SocketAddr) -> Vec<ListenerEntry> {
        self.lookup_in(dst, NetNs::current())
    }

    /// [`Registry::lookup`] for a connection of socket `sock`, whose network
    /// namespace is ours ([`NetNs::of_socket`]).
    pub fn lookup_for(
        &self,
        sock: std::os::fd::BorrowedFd<'_>,
        dst: SocketAddr,
    ) -> Vec<ListenerEntry> {
        self.lookup_in(dst, NetNs::of_socket(sock))
    }

    fn lookup_in(&self, dst: SocketAddr, own: io::Result<NetNs>) -> Vec<ListenerEntry> {
        if dst.port() == 0 {
            return Vec::new();
        }
        let own = match own {
            Ok(ns) => Some(ns),
            Err(e) => {
                tracing::debug!("vmc registry: lookup {dst}: {e}");
                None
            }
        };
        let entries = match self.entries_of(dst.port()) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::debug!("vmc registry: lookup {dst}: {e}");
                return Vec::new();
            }
        };
        rank_candidates(dst, own, entries)
    }

    /// The live entries of `port`: the cached ones if still valid, else a new
    /// look at the directory (cached if it can be trusted later).
    fn entries_of(&self, port: u16) -> io::Result<Vec<ListenerEntry>> {
        let (dir, mtime) = self.dir_and_mtime()?;
        if let Some(entries) = self.cache.valid(port, mtime) {
            return Ok(entries);
        }
        let began = SystemTime::now();
        let (live, _) = self.scan_in(&dir, Some(port))?;
        let entries = live.iter().map(|(e, _)| e.clone()).collect();
        self.cache.keep(port, mtime, began, live);
        Ok(entries)
    }

    /// Every live entry, sorted by port then age (oldest first), for
    /// reporting. Dead entries are removed on the way, as by
    /// [`Registry::reap`]. Fails only if the directory cannot be read.
    pub fn listeners(&self) -> io::Result<Vec<ListenerEntry>> {
        let (entries, _) = self.scan(None)?;
        let mut entries: Vec<ListenerEntry> = entries.into_iter().map(|(e, _)| e).collect();
        entries.sort_by(|a, b| {
            (a.addr.port(), a.created_unix_ms, a.pid, a.addr).cmp(&(
                b.addr.port(),
                b.created_unix_ms,
                b.pid,
                b.addr,
            ))
        });
        Ok(entries)
    }

    /// Removes the entries of dead listeners, temporary files left by
    /// registrants killed while registering (older than
    /// [`vmc_os::segment::TMP_MAX_AGE`]) and offer sockets left by clients
    /// killed during a handshake (older than 90 s). Returns how many files
    /// were removed; errors count as nothing removed.
    pub fn reap(&self) -> usize {
        let entries = match self.scan(None) {
            Ok((_, reaped)) => reaped,
            Err(e) => {
                tracing::debug!("vmc registry: reap: {e}");
                0
            }
        };
        entries
            + self
                .offers()
                .map_or(0, |d| reap_stale_offers(d, OFFER_MAX_AGE))
    }

    /// How many entry files this registry has opened so far.
    #[cfg(test)]
    fn files_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// The open registry directory, opened again if it was removed.
    fn dir(&self) -> io::Result<Arc<SegmentDir>> {
        self.dir_and_mtime().map(|(dir, _)| dir)
    }

    /// The program closed descriptors `first..=last` behind our back (and may have
    /// opened files of its own under those numbers): cached lookups holding one are
    /// forgotten, never closed, and so is the directory if its descriptor was one
    /// (it is opened again at the next look). Returns how many were forgotten.
    pub fn forget_fds(&self, first: i32, last: i32) -> usize {
        use std::os::fd::AsRawFd;
        let within = |fd: i32| (first..=last).contains(&fd);
        let mut n = self.cache.forget_fds(within);
        let mut dir = self.dir.lock();
        if dir.as_ref().is_some_and(|d| within(d.fd().as_raw_fd())) {
            std::mem::forget(dir.take());
            n += 1;
        }
        n
    }

    /// [`Registry::dir`] and the directory's mtime (seconds, nanoseconds), read
    /// before looking into it.
    fn dir_and_mtime(&self) -> io::Result<(Arc<SegmentDir>, (i64, u32))> {
        let mtime = |st: &rustix::fs::Stat| (st.st_mtime, st.st_mtime_nsec as u32);
        let mut guard = self.dir.lock();
        if let Some(dir) = &*guard {
            if let Ok(st) = rustix::fs::fstat(dir.fd()) {
                if st.st_nlink != 0 {
                    return Ok((Arc::clone(dir), mtime(&st)));
                }
            }
            tracing::debug!(
                "vmc registry: {} was removed; creating it again",
                self.path.display()
            );
        }
        let dir = Arc::new(open_dirs(&self.path, &self.root, self.public)?);
        let st = rustix::fs::fstat(dir.fd())?;
        *guard = Some(Arc::clone(&dir));
        Ok((dir, mtime(&st)))
    }

    /// Reads the directory: the live entries of `port` (or of every port,
    /// also reaping stale temporary files, if `None`) and how many files
    /// were removed.
    fn scan(&self, port: Option<u16>) -> io::Result<(Vec<(ListenerEntry, File)>, usize)> {
        let dir = self.dir()?;
        self.scan_in(&dir, port)
    }

    /// [`Registry::scan`] of `dir`, with the live entries' open files.
    fn scan_in(
        &self,
        dir: &SegmentDir,
        port: Option<u16>,
    ) -> io::Result<(Vec<(ListenerEntry, File)>, usize)> {
        let prefix = port.map(|p| format!("{ENTRY_PREFIX}{p}-"));
        let read_err = |e: rustix::io::Errno| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("vmc registry {}: read: {e}", dir.path().display()),
            )
        };
        // Collect the names first, so that removals don't disturb the
        // directory stream.
        let mut names = Vec::new();
        let mut tmps = Vec::new();
        let mut stream = rustix::fs::Dir::read_from(dir.fd()).map_err(read_err)?;
        while let Some(dent) = stream.read() {
            let dent = dent.map_err(read_err)?;
            let raw = dent.file_name().to_bytes();
            match &prefix {
                // The fast path: a byte comparison, nothing opened.
                Some(prefix) if !raw.starts_with(prefix.as_bytes()) => continue,
                None if raw.starts_with(TMP_ENTRY_PREFIX.as_bytes()) => {
                    if let Ok(name) = std::str::from_utf8(raw) {
                        tmps.push(name.to_owned());
                    }
                    continue;
                }
                _ => {}
            }
            let Ok(name) = std::str::from_utf8(raw) else {
                continue;
            };
            if let Some(name_port) = parse_entry_name(name) {
                if port.is_none() || port == Some(name_port) {
                    names.push((name.to_owned(), name_port));
                }
            }
        }
        drop(stream);

        let mut live = Vec::new();
        let mut reaped = 0;
        for (name, name_port) in names {
            match self.inspect(dir, &name, name_port) {
                Inspected::Live(entry, file) => live.push((entry, file)),
                Inspected::Reaped => reaped += 1,
                Inspected::Skipped => {}
            }
        }
        for tmp in tmps {
            if reap_stale_tmp(dir, &tmp) {
                reaped += 1;
            }
        }
        Ok((live, reaped))
    }

    /// Opens, checks and reads one entry file; removes it if it is dead.
    fn inspect(&self, dir: &SegmentDir, name: &str, name_port: u16) -> Inspected {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let fd = match rustix::fs::openat(
            dir.fd(),
            name,
            // Non-blocking: a FIFO planted under an entry name must not hang
            // us.
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
        .and_then(vmc_os::fdspace::lift)
        {
            Ok(fd) => fd,
            // Removed meanwhile (unregistered or reaped by somebody else).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Inspected::Skipped,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                self.warn_once(name, "is a symlink");
                return Inspected::Skipped;
            }
            Err(e) => {
                tracing::debug!("vmc registry: open {}/{name}: {e}", dir.path().display());
                return Inspected::Skipped;
            }
        };
        let mut file = File::from(fd);
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("vmc registry: fstat {}/{name}: {e}", dir.path().display());
                return Inspected::Skipped;
            }
        };
        if !meta.file_type().is_file() {
            self.warn_once(name, "is not a regular file");
            return Inspected::Skipped;
        }
        // Our own entries only; in the public registry, each user's own entries,
        // which nobody else can write.
        let owner = if self.public {
            meta.uid()
        } else {
            vmc_os::euid()
        };
        if meta.uid() != owner {
            self.warn_once(
                name,
                &format!("is owned by uid {}, expected {owner}", meta.uid()),
            );
            return Inspected::Skipped;
        }
        let mode = meta.mode() & 0o7777;
        let want = self.entry_mode();
        if mode != want {
            self.warn_once(name, &format!("has mode {mode:04o}, expected {want:04o}"));
            return Inspected::Skipped;
        }
        if meta.len() > MAX_ENTRY_LEN {
            self.warn_once(name, &format!("is too large ({} bytes)", meta.len()));
            return Inspected::Skipped;
        }
        let alive = match ofd_locked_by_other(file.as_fd(), LIVENESS_BYTE) {
            Ok(alive) => alive,
            Err(e) => {
                tracing::debug!("vmc registry: {}/{name}: {e}", dir.path().display());
                return Inspected::Skipped;
            }
        };
        let mut buf = Vec::with_capacity(meta.len() as usize);
        let read = Read::by_ref(&mut file)
            .take(MAX_ENTRY_LEN)
            .read_to_end(&mut buf);
        let parsed = match read {
            Ok(_) => parse_entry(&buf, name_port, owner).map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot be read: {e}")),
        };
        if !alive {
            self.reap_dead(dir, name);
            return Inspected::Reaped;
        }
        match parsed {
            Ok(entry) => Inspected::Live(entry, file),
            Err(why) => {
                self.warn_once(name, &why);
                Inspected::Skipped
            }
        }
    }

    /// Removes a dead entry file.
    fn reap_dead(&self, dir: &SegmentDir, name: &str) {
        match rustix::fs::unlinkat(dir.fd(), name, AtFlags::empty()) {
            Ok(()) => tracing::debug!(
                "vmc registry: removed dead entry {}/{name}",
                dir.path().display()
            ),
            // Somebody else reaped it, or its registrant unregistered it.
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => tracing::debug!(
                "vmc registry: removing dead {}/{name}: {e}",
                dir.path().display()
            ),
        }
    }

    /// Reports a bad file: at warn level the first time a name is seen, at
    /// debug level after that.
    fn warn_once(&self, name: &str, why: &str) {
        let first = {
            let mut warned = self.warned.lock();
            if warned.len() >= MAX_WARNED {
                warned.clear();
            }
            warned.insert(name.to_owned())
        };
        if first {
            tracing::warn!(
                "vmc registry: ignoring {}/{name}: {why}",
                self.path.display()
            );
        } else {
            tracing::debug!(
                "vmc registry: ignoring {}/{name}: {why}",
                self.path.display()
            );
        }
    }
}

/// `(pid, random)` for a unique file name; the random part also stops other
/// processes from guessing names.
fn unique() -> (u32, u64) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    // `RandomState` is seeded from the OS's random source; the counter and
    // the time make successive values differ even if the seed repeats.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(counter);
    if let Ok(t) = SystemTime::now().duration_since(UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    (vmc_os::pid(), h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use vmc_os::segment::ofd_try_lock;

    fn test_registry() -> (tempfile::TempDir, Registry) {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(tmp.path().join("vmc").join("listeners")).unwrap();
        (tmp, reg)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn own_ns() -> NetNs {
        NetNs::current().unwrap()
    }

    /// A namespace that is not ours.
    fn other_ns(n: u64) -> NetNs {
        let own = own_ns();
        NetNs {
            dev: own.dev,
            ino: own.ino.wrapping_add(1000 + n),
        }
    }

    fn entry(ns: NetNs, addr: &str) -> ListenerEntry {
        ListenerEntry::new(ns, sa(addr), format!("/nonexistent/{addr}.sock"))
    }

    fn names(reg: &Registry) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(reg.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// Writes a file directly into the registry, bypassing `register`.
    fn plant(reg: &Registry, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = reg.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// Holds byte 0 of `path` locked, as a live registrant would.
    fn hold_lock(path: &Path) -> File {
        let f = File::options().read(true).write(true).open(path).unwrap();
        assert!(ofd_try_lock(f.as_fd(), LIVENESS_BYTE).unwrap());
        f
    }
    #[test]
    fn register_lookup_drop_roundtrip() {
        let (_tmp, reg) = test_registry();
        let e = entry(own_ns(), "127.0.0.1:4000");
        let r = reg.register(&e).unwrap();
        assert_eq!(r.entry(), &e);
        let name = r.file_name().to_owned();
        assert!(name.starts_with("l-4000-"), "{name}");
        assert!(name.ends_with(".json"), "{name}");
        assert_eq!(names(&reg), vec![name.clone()]);
        assert_eq!(r.path(), reg.path().join(&name));
        assert!(r.is_listed());

        // Private, and the content is the entry.
        let meta = std::fs::symlink_metadata(r.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(meta.uid(), vmc_os::euid());
        let on_disk: ListenerEntry =
            serde_json::from_slice(&std::fs::read(r.path()).unwrap()).unwrap();
        assert_eq!(on_disk, e);

        // Locked: nobody else can take byte 0.
        let other = File::options()
            .read(true)
            .write(true)
            .open(r.path())
            .unwrap();
        assert!(!ofd_try_lock(other.as_fd(), LIVENESS_BYTE).unwrap());
        drop(other);

        assert_eq!(reg.lookup(sa("127.0.0.1:4000")), vec![e.clone()]);
        assert_eq!(reg.listeners().unwrap(), vec![e.clone()]);
        // Still there: a live entry is never reaped.
        assert_eq!(reg.reap(), 0);
        assert_eq!(names(&reg), vec![name]);

        drop(r);
        assert!(names(&reg).is_empty());
        assert!(reg.lookup(sa("127.0.0.1:4000")).is_empty());
        assert!(reg.listeners().unwrap().is_empty());
    }

    #[test]
    fn is_listed_follows_the_name() {
        let (_tmp, reg) = test_registry();
        let r = reg.register(&entry(own_ns(), "0.0.0.0:81")).unwrap();
        assert!(r.is_listed());
        std::fs::remove_file(r.path()).unwrap();
        assert!(!r.is_listed());
        // Dropping it after that is fine (ENOENT ignored).
        drop(r);
    }

    #[test]
    fn port_filtering_skips_other_files_unopened() {
        let (_tmp, reg) = test_registry();
        let ns = own_ns();
        let mut keep = Vec::new();
        // A few hundred unrelated entries, live and dead and garbage.
        for i in 0..300u16 {
            let port = 5000 + i;
            if i % 3 == 0 {
                keep.push(
                    reg.register(&entry(ns, &format!("0.0.0.0:{port}")))
                        .unwrap(),
                );
            } else {
                plant(&reg, &format!("l-{port}-1-x{i}.json"), b"{garbage", 0o600);
            }
        }
        // Prefixes of the wanted port that are other ports.
        plant(&reg, "l-80000-1-a.json", b"{", 0o600);
        plant(&reg, "l-8000-1-a.json", b"{", 0o600);
        plant(&reg, "notes.txt", b"hello", 0o644);
        let want = reg.register(&entry(ns, "0.0.0.0:800")).unwrap();

        let before = reg.files_opened();
        let t = std::time::Instant::now();
        let found = reg.lookup(sa("127.0.0.1:800"));
        let elapsed = t.elapsed();
        assert_eq!(found, vec![want.entry().clone()]);
        assert_eq!(reg.files_opened() - before, 1, "only l-800-* was opened");
        assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");

        // Nothing at all for a port without entries.
        let before = reg.files_opened();
        assert!(reg.lookup(sa("127.0.0.1:801")).is_empty());
        assert!(reg.lookup(sa("127.0.0.1:0")).is_empty());
        assert_eq!(reg.files_opened(), before);

        // The wanted port of one of the live ones.
        assert_eq!(
            reg.lookup(sa("10.0.0.1:5003")),
            vec![keep[1].entry().clone()]
        );
    }

    #[test]
    fn ordering_loopback_unspecified_exact() {
        let (_tmp, reg) = test_registry();
        let own = own_ns();
        let other = other_ns(1);
        let p = 7070;
        let specs = [
            ("own-lo", own, format!("127.0.0.1:{p}")),
            ("own-any", own, format!("0.0.0.0:{p}")),
            ("own-any6", own, format!("[::]:{p}")),
            ("own-lo6", own, format!("[::1]:{p}")),
            ("own-ip", own, format!("10.1.2.3:{p}")),
            ("own-lo2", own, format!("127.0.0.2:{p}")),
            ("other-lo", other, format!("127.0.0.1:{p}")),
            ("other-any", other, format!("0.0.0.0:{p}")),
            ("other-any6", other, format!("[::]:{p}")),
            ("other-ip", other, format!("10.1.2.3:{p}")),
            ("own-otherport", own, format!("127.0.0.1:{}", p + 1)),
        ];
        let mut regs = Vec::new();
        for (tag, ns, addr) in &specs {
            let mut e = ListenerEntry::new(*ns, sa(addr), format!("/rv/{tag}"));
            e.created_unix_ms = 1000;
            regs.push(reg.register(&e).unwrap());
        }
        let tags = |dst: &str| -> Vec<String> {
            reg.lookup(sa(dst))
                .iter()
                .map(|e| e.offers.file_name().unwrap().to_str().unwrap().to_owned())
                .collect()
        };
        // Loopback: own namespace only; exact, then 0.0.0.0, then ::.
        assert_eq!(
            tags(&format!("127.0.0.1:{p}")),
            ["own-lo", "own-any", "own-any6"]
        );
        assert_eq!(
            tags(&format!("127.0.0.2:{p}")),
            ["own-lo2", "own-any", "own-any6"]
        );
        assert_eq!(
            tags(&format!("[::ffff:127.0.0.1]:{p}")),
            ["own-lo", "own-any", "own-any6"]
        );
        assert_eq!(tags(&format!("[::1]:{p}")), ["own-lo6", "own-any6"]);
        // Connecting to 0.0.0.0 goes to loopback.
        assert_eq!(
            tags(&format!("0.0.0.0:{p}")),
            ["own-lo", "own-any", "own-any6"]
        );
        // A non-loopback address: exact (own namespace first), then wildcard
        // in our namespace, then wildcard elsewhere.
        assert_eq!(
            tags(&format!("10.1.2.3:{p}")),
            [
                "own-ip",
                "other-ip",
                "own-any",
                "own-any6",
                "other-any",
                "other-any6"
            ]
        );
        assert_eq!(
            tags(&format!("10.9.9.9:{p}")),
            ["own-any", "own-any6", "other-any", "other-any6"]
        );
        assert_eq!(
            tags(&format!("[2001:db8::1]:{p}")),
            ["own-any6", "other-any6"]
        );
        assert!(tags(&format!("10.1.2.3:{}", p + 2)).is_empty());
    }

    #[test]
    fn newer_first_within_a_group() {
        let (_tmp, reg) = test_registry();
        let mut old = entry(own_ns(), "0.0.0.0:90");
        old.created_unix_ms = 1000;
        let mut new = entry(own_ns(), "0.0.0.0:90");
        new.created_unix_ms = 2000;
        let _a = reg.register(&old).unwrap();
        let _b = reg.register(&new).unwrap();
        assert_eq!(reg.lookup(sa("127.0.0.1:90")), vec![new, old]);
    }

    #[test]
    fn bad_entries_ignored() {
        let (_tmp, reg) = test_registry();
        let good = reg.register(&entry(own_ns(), "0.0.0.0:6000")).unwrap();
        let valid = serde_json::to_vec(good.entry()).unwrap();

        // Corrupt JSON, held locked as if a live process wrote it.
        let corrupt = plant(&reg, "l-6000-1-corrupt.json", b"{\"version\": 1,", 0o600);
        let _l1 = hold_lock(&corrupt);
        // Another version.
        let mut v = serde_json::to_value(good.entry()).unwrap();
        v["version"] = 99.into();
        let wrong_version = plant(
            &reg,
            "l-6000-1-version.json",
            &serde_json::to_vec(&v).unwrap(),
            0o600,
        );
        let _l2 = hold_lock(&wrong_version);
        // Another uid in the content.
        let mut e = good.entry().clone();
        e.uid = e.uid.wrapping_add(1);
        let wrong_uid = plant(
            &reg,
            "l-6000-1-uid.json",
            &serde_json::to_vec(&e).unwrap(),
            0o600,
        );
        let _l3 = hold_lock(&wrong_uid);
        // A port that does not match the name.
        let mut e = good.entry().clone();
        e.addr = sa("0.0.0.0:6001");
        let wrong_port = plant(
            &reg,
            "l-6000-1-port.json",
            &serde_json::to_vec(&e).unwrap(),
            0o600,
        );
        let _l4 = hold_lock(&wrong_port);
        // Readable by others: unlocked, but not ours to judge or remove.
        let loose = plant(&reg, "l-6000-1-loose.json", &valid, 0o644);
        // Oversized.
        let mut big = valid.clone();
        big.resize(MAX_ENTRY_LEN as usize + 10, b' ');
        let big = plant(&reg, "l-6000-1-big.json", &big, 0o600);
        // A symlink to a valid live entry, a directory, a FIFO.
        std::os::unix::fs::symlink(good.path(), reg.path().join("l-6000-1-link.json")).unwrap();
        std::fs::create_dir(reg.path().join("l-6000-1-dir.json")).unwrap();
        rustix::fs::mknodat(
            reg.dir().unwrap().fd(),
            "l-6000-1-fifo.json",
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // Owned by somebody else (only root can do this).
        let foreign = if vmc_os::euid() == 0 {
            let p = plant(&reg, "l-6000-1-foreign.json", &valid, 0o600);
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
            Some(p)
        } else {
            None
        };
        // Corrupt and unlocked: dead garbage, removed.
        let dead_corrupt = plant(&reg, "l-6000-1-deadcorrupt.json", b"]]", 0o600);

        for _ in 0..2 {
            assert_eq!(reg.lookup(sa("127.0.0.1:6000")), vec![good.entry().clone()]);
            assert_eq!(reg.listeners().unwrap(), vec![good.entry().clone()]);
        }
        for p in [
            &corrupt,
            &wrong_version,
            &wrong_uid,
            &wrong_port,
            &loose,
            &big,
        ] {
            assert!(p.exists(), "{} must be left alone", p.display());
        }
        if let Some(p) = &foreign {
            assert!(p.exists());
        }
        assert!(!dead_corrupt.exists());
        for n in [
            "l-6000-1-link.json",
            "l-6000-1-dir.json",
            "l-6000-1-fifo.json",
        ] {
            assert!(std::fs::symlink_metadata(reg.path().join(n)).is_ok(), "{n}");
        }
    }

    #[test]
    fn lookups_are_cached_until_the_directory_or_a_lock_changes() {
        let (_tmp, reg) = test_registry();
        let ns = own_ns();
        let first = reg.register(&entry(ns, "127.0.0.1:6100")).unwrap();
        let want = vec![first.entry().clone()];
        // Fresh: the directory's mtime is too recent to trust, every look reads.
        assert_eq!(reg.lookup(sa("127.0.0.1:6100")), want);
        std::thread::sleep(MTIME_SLACK + Duration::from_millis(20));
        // Once settled: one more read, then the cache, files unopened.
        assert_eq!(reg.lookup(sa("127.0.0.1:6100")), want);
        let before = reg.files_opened();
        for _ in 0..3 {
            assert_eq!(reg.lookup(sa("127.0.0.1:6100")), want);
        }
        assert_eq!(reg.files_opened(), before, "served from the cache");

        // A listener that appears is found at once.
        let second = reg.register(&entry(ns, "0.0.0.0:6100")).unwrap();
        let both = vec![first.entry().clone(), second.entry().clone()];
        assert_eq!(reg.lookup(sa("127.0.0.1:6100")), both);

        // One that dies without a word (its lock just goes, as at kill -9, and
        // nothing in the directory changes) is no longer used, and is reaped.
        drop(second);
        let dying = entry(ns, "[::]:6100");
        let path = plant(
            &reg,
            "l-6100-42-dying.json",
            &serde_json::to_vec(&dying).unwrap(),
            0o600,
        );
        let lock = hold_lock(&path);
        // Settled again (the clock is the point: the directory's mtime ages).
        std::thread::sleep(MTIME_SLACK + Duration::from_millis(20));
        let with_dying = reg.lookup(sa("127.0.0.1:6100"));
        assert!(with_dying.contains(&dying), "{with_dying:?}");
        let before = reg.files_opened();
        assert_eq!(reg.lookup(sa("127.0.0.1:6100")), with_dying);
        assert_eq!(reg.files_opened(), before, "served from the cache");
        drop(lock);
        assert_eq!(reg.lookup(sa("127.0.0.1:6100")), want);
        assert!(!path.exists(), "the dead entry was reaped");

        // One that stops is no longer used.
        drop(first);
        assert!(reg.lookup(sa("127.0.0.1:6100")).is_empty());
    }

    #[test]
    fn dead_entry_reaped() {
        let (_tmp, reg) = test_registry();
        let e = ListenerEntry::new(own_ns(), sa("0.0.0.0:7000"), "/offers");
        // A valid entry nobody holds: its process was killed.
        let p = plant(
            &reg,
            "l-7000-42-dead.json",
            &serde_json::to_vec(&e).unwrap(),
            0o600,
        );
        let live = reg.register(&entry(own_ns(), "0.0.0.0:7000")).unwrap();
        assert_eq!(reg.lookup(sa("127.0.0.1:7000")), vec![live.entry().clone()]);
        assert!(!p.exists(), "dead entry removed");
        assert!(live.path().exists());
    }
    #[test]
    fn reap_counts_dead_entries_and_stale_tmp_files() {
        let (_tmp, reg) = test_registry();
        let live = reg.register(&entry(own_ns(), "0.0.0.0:7100")).unwrap();
        let e = serde_json::to_vec(live.entry()).unwrap();
        plant(&reg, "l-7100-1-dead.json", &e, 0o600);
        plant(&reg, "l-7200-1-dead.json", &e, 0o600);
        let young = plant(&reg, ".tmp-l-7100-1-young", b"", 0o600);
        let old = plant(&reg, ".tmp-l-7100-1-old", b"", 0o600);
        let old_locked = plant(&reg, ".tmp-l-7100-1-oldlocked", b"", 0o600);
        let past = SystemTime::now() - Duration::from_secs(3600);
        for p in [&old, &old_locked] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(past)
                .unwrap();
        }
        let _held = hold_lock(&old_locked);
        let other = plant(&reg, "README", b"keep", 0o600);

        // A lookup only reaps dead entries of its own port.
        assert_eq!(reg.lookup(sa("127.0.0.1:7200")), vec![]);
        assert!(!reg.path().join("l-7200-1-dead.json").exists());
        assert!(reg.path().join("l-7100-1-dead.json").exists());

        assert_eq!(reg.reap(), 2);
        assert_eq!(reg.reap(), 0);
        let mut expected = vec![
            ".tmp-l-7100-1-oldlocked".to_string(),
            ".tmp-l-7100-1-young".to_string(),
            "README".to_string(),
            live.file_name().to_string(),
        ];
        expected.sort();
        assert_eq!(names(&reg), expected);
        assert!(young.exists() && other.exists());
    }

    #[test]
    fn listeners_lists_every_live_entry() {
        let (_tmp, reg) = test_registry();
        let mut e1 = entry(own_ns(), "0.0.0.0:9001");
        e1.created_unix_ms = 5;
        let mut e2 = entry(other_ns(3), "10.0.0.1:80");
        e2.created_unix_ms = 7;
        let mut e3 = entry(own_ns(), "[::]:9001");
        e3.created_unix_ms = 6;
        let _r = [&e1, &e2, &e3].map(|e| reg.register(e).unwrap());
        plant(
            &reg,
            "l-80-1-dead.json",
            &serde_json::to_vec(&e2).unwrap(),
            0o600,
        );
        assert_eq!(reg.listeners().unwrap(), vec![e2, e1, e3]);
        assert_eq!(names(&reg).len(), 3, "dead entry reaped");
    }

    #[test]
    fn registered_later_is_found_without_caching() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("vmc").join("listeners");
        let reader = Registry::open(&path).unwrap();
        assert!(reader.lookup(sa("127.0.0.1:5555")).is_empty());
        let writer = Registry::open(&path).unwrap();
        let r = writer.register(&entry(own_ns(), "127.0.0.1:5555")).unwrap();
        assert_eq!(reader.lookup(sa("127.0.0.1:5555")), vec![r.entry().clone()]);
        drop(r);
        assert!(reader.lookup(sa("127.0.0.1:5555")).is_empty());
    }

    #[test]
    fn directory_permissions_checked() {
        let tmp = tempfile::tempdir().unwrap();
        // Created exactly 0700, both levels.
        let path = tmp.path().join("vmc").join("listeners");
        let reg = Registry::open(&path).unwrap();
        assert_eq!(reg.path(), path);
        for p in [&path, &tmp.path().join("vmc")] {
            let m = std::fs::symlink_metadata(p).unwrap();
            assert!(m.is_dir());
            assert_eq!(m.permissions().mode() & 0o7777, 0o700, "{}", p.display());
            assert_eq!(m.uid(), vmc_os::euid());
        }

        // A 0755 registry directory is refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = Registry::open(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        let msg = err.to_string();
        assert!(msg.contains("mode 0755, expected 0700"), "{msg}");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();

        // A 0755 parent is refused.
        let parent = tmp.path().join("loose");
        std::fs::create_dir(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = Registry::open(parent.join("listeners")).unwrap_err();
        assert!(
            err.to_string().contains("mode 0755, expected 0700"),
            "{err}"
        );
        assert!(!parent.join("listeners").exists());

        // Symlinks are refused at both levels.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("vmc"), &link).unwrap();
        let err = Registry::open(link.join("listeners")).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        let link2 = tmp.path().join("vmc").join("link2");
        std::os::unix::fs::symlink(&path, &link2).unwrap();
        let err = Registry::open(&link2).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");

        // A file is refused.
        let file = tmp.path().join("vmc").join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(Registry::open(&file).is_err());
        // The root has no parent.
        assert!(Registry::open("/").is_err());
    }

    #[test]
    fn foreign_directory_refused() {
        if vmc_os::euid() != 0 {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("vmc").join("listeners");
        drop(Registry::open(&path).unwrap());
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = Registry::open(&path).unwrap_err();
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }

    #[test]
    fn recreated_after_removal() {
        let (tmp, reg) = test_registry();
        let r = reg.register(&entry(own_ns(), "0.0.0.0:8100")).unwrap();
        std::fs::remove_dir_all(tmp.path().join("vmc")).unwrap();
        assert!(!r.is_listed());
        assert!(reg.lookup(sa("127.0.0.1:8100")).is_empty());
        assert!(reg.path().is_dir(), "recreated by the lookup");
        let r2 = reg.register(&entry(own_ns(), "0.0.0.0:8100")).unwrap();
        let fresh = Registry::open(reg.path()).unwrap();
        assert_eq!(fresh.lookup(sa("127.0.0.1:8100")), vec![r2.entry().clone()]);
        drop(r);
        drop(r2);
        assert!(names(&reg).is_empty());
    }

    #[test]
    fn register_rejects_entries_nobody_would_accept() {
        let (_tmp, reg) = test_registry();
        let mut e = entry(own_ns(), "0.0.0.0:80");
        e.version = ENTRY_VERSION + 1;
        assert_eq!(
            reg.register(&e).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let mut e = entry(own_ns(), "0.0.0.0:80");
        e.uid = e.uid.wrapping_add(1);
        assert!(reg.register(&e).unwrap_err().to_string().contains("uid"));
        let e = entry(own_ns(), "0.0.0.0:0");
        assert!(reg.register(&e).unwrap_err().to_string().contains("port 0"));
        let e = ListenerEntry::new(own_ns(), sa("0.0.0.0:80"), "offers");
        let err = reg.register(&e).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("not absolute"), "{err}");
        assert!(names(&reg).is_empty(), "no temporary files left");
    }

    #[test]
    fn concurrent_register_lookup_reap() {
        let (_tmp, reg) = test_registry();
        let reg = &reg;
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            // A reaper racing with everybody: must never remove a live entry.
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    reg.reap();
                    let _ = reg.listeners().unwrap();
                }
            });
            let workers: Vec<_> = (0..6u16)
                .map(|t| {
                    s.spawn(move || {
                        let ns = own_ns();
                        for i in 0..40u16 {
                            let port = 3000 + (t * 40 + i) % 5;
                            let r = reg
                                .register(&entry(ns, &format!("0.0.0.0:{port}")))
                                .unwrap();
                            let found = reg.lookup(sa(&format!("127.0.0.1:{port}")));
                            assert!(found.contains(r.entry()), "own entry not found");
                            assert!(r.is_listed(), "live entry reaped");
                        }
                    })
                })
                .collect();
            // Join everybody before judging, so that a failure cannot leave
            // the reaper spinning.
            let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
            stop.store(true, Ordering::Relaxed);
            for r in results {
                if let Err(panic) = r {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        assert!(names(reg).is_empty());
    }

    #[test]
    fn default_dir_shape() {
        match std::env::var_os(REGISTRY_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(v) => assert_eq!(Registry::default_dir(), PathBuf::from(v)),
            None => assert_eq!(
                Registry::default_dir(),
                SegmentDir::default_path().join("listeners")
            ),
        }
    }
}
