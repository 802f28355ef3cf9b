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
//! (the checks of [`SegmentDir::open`]). The parent is checked too because
//! dead listeners' rendezvous sockets inside it are removed on their behalf.
//! `/dev/shm` has the sticky bit, so once validated, nobody else can replace
//! our directories.
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
//! with `F_OFD_GETLK` (they never take it), and remove dead entries (and
//! their rendezvous sockets, see [`Registry::lookup`]) as they find them.
//! Dropping a [`Registration`] removes its file.
//!
//! # Concurrency
//!
//! Files appear atomically (write, lock, then `rename` with
//! `RENAME_NOREPLACE`) and disappear atomically (`unlink`), names are unique,
//! and nobody ever blocks on a lock, so any number of processes can register,
//! look up and reap at the same time.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use serde::{Deserialize, Serialize};
use vmc_os::segment::{ofd_locked_by_other, ofd_try_lock, TMP_MAX_AGE};
use vmc_os::SegmentDir;

/// The version of the [`ListenerEntry`] format written by this code. Entries
/// with another version are ignored by lookups.
pub const ENTRY_VERSION: u32 = 1;

/// Environment variable overriding [`Registry::default_dir`].
pub const REGISTRY_DIR_ENV: &str = "VMC_REGISTRY_DIR";

/// Name of the registry directory inside the segment directory.
pub const LISTENERS_DIR_NAME: &str = "listeners";

/// Prefix of entry file names: `l-<port>-<pid>-<random>.json`.
pub const ENTRY_PREFIX: &str = "l-";

/// Suffix of entry file names.
pub const ENTRY_SUFFIX: &str = ".json";

/// Prefix of entry files still being written by their registrant.
const TMP_ENTRY_PREFIX: &str = ".tmp-l-";

/// Entry files larger than this are not read (they are not ours).
const MAX_ENTRY_LEN: u64 = 64 * 1024;

/// The byte locked by a live registrant.
const LIVENESS_BYTE: i64 = 0;

/// How many distinct file names a registry remembers having warned about
/// (so that a bad file is reported once, not on every lookup).
const MAX_WARNED: usize = 4096;

/// A network namespace, identified like `ip netns identify` does: by the
/// device and inode numbers of its `nsfs` file.
///
/// Two listeners bound to the same address (say `0.0.0.0:80`) in two
/// namespaces are two different listeners; the namespace tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetNs {
    /// `st_dev` of the namespace file.
    pub dev: u64,
    /// `st_ino` of the namespace file.
    pub ino: u64,
}

impl NetNs {
    /// The network namespace of the calling thread, from `stat` of
    /// `/proc/thread-self/ns/net` (falling back to `/proc/self/ns/net` on
    /// kernels without `/proc/thread-self`).
    pub fn current() -> io::Result<NetNs> {
        let meta = std::fs::metadata("/proc/thread-self/ns/net")
            .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("network namespace: stat /proc/self/ns/net: {e}"),
                )
            })?;
        Ok(NetNs {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl fmt::Display for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The same form as the `readlink` of the namespace file.
        write!(f, "net:[{}]", self.ino)
    }
}

/// One registered listener: the content of an entry file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenerEntry {
    /// Format version; [`ENTRY_VERSION`] for entries written by this code.
    pub version: u32,
    /// The network namespace the listening socket lives in.
    pub netns: NetNs,
    /// The address the listening socket is bound to. The IP may be
    /// unspecified (`0.0.0.0` or `::`), the port never is.
    pub addr: SocketAddr,
    /// The process that registered the listener.
    pub pid: u32,
    /// The effective uid of that process; lookups ignore entries whose uid
    /// is not ours.
    pub uid: u32,
    /// A Unix socket path on which the listener's process accepts vmc
    /// handshakes.
    ///
    /// If it lies inside the registry's parent directory, it is removed
    /// along with the entry when the listener is found dead, provided it is
    /// a socket owned by us not newer than [`ListenerEntry::created_unix_ms`]
    /// (so bind the socket *before* building the entry).
    pub rendezvous: PathBuf,
    /// When the entry was built, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

impl ListenerEntry {
    /// An entry for a listener of this process (our pid and euid, the current
    /// time) in network namespace `netns`.
    pub fn new(netns: NetNs, addr: SocketAddr, rendezvous: impl Into<PathBuf>) -> ListenerEntry {
        ListenerEntry {
            version: ENTRY_VERSION,
            netns,
            addr,
            pid: vmc_os::pid(),
            uid: vmc_os::euid(),
            rendezvous: rendezvous.into(),
            created_unix_ms: now_unix_ms(),
        }
    }

    /// Like [`ListenerEntry::new`], in the calling thread's network
    /// namespace ([`NetNs::current`]).
    pub fn for_current_netns(
        addr: SocketAddr,
        rendezvous: impl Into<PathBuf>,
    ) -> io::Result<ListenerEntry> {
        Ok(ListenerEntry::new(NetNs::current()?, addr, rendezvous))
    }
}

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
/// Nothing is cached: every lookup reads the directory again, so listeners
/// registered by anybody at any time are seen. If the directory is removed
/// while this object lives (its link count drops to zero), it is created
/// again at the same path on the next operation.
pub struct Registry {
    /// The registry directory (absolute).
    path: PathBuf,
    /// Its parent (absolute): rendezvous sockets inside it may be reaped.
    root: PathBuf,
    dir: Mutex<Arc<SegmentDir>>,
    /// File names already reported as bad.
    warned: Mutex<HashSet<String>>,
    /// Entry files opened so far (lets tests check lookups skip files of
    /// other ports by name).
    opened: AtomicU64,
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
    /// A live, valid entry.
    Live(ListenerEntry),
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
        let dir = open_dirs(&path, &root)?;
        Ok(Registry {
            path,
            root,
            dir: Mutex::new(Arc::new(dir)),
            warned: Mutex::new(HashSet::new()),
            opened: AtomicU64::new(0),
        })
    }

    /// The registry directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Registers a listener: writes `entry` to a new file and keeps it
    /// locked until the returned [`Registration`] is dropped.
    ///
    /// The file is created under a temporary name (mode 0600,
    /// `O_EXCL | O_NOFOLLOW | O_CLOEXEC`), locked, written, and only then
    /// renamed to `l-<port>-<pid>-<random>.json`, so readers never see a
    /// partial or unlocked live entry.
    ///
    /// `entry` must have version [`ENTRY_VERSION`], our euid as uid and a
    /// non-zero port (`InvalidInput` otherwise): anything else would be
    /// ignored by every lookup.
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
            match write_entry(&dir, &tmp, &name, &json) {
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
    /// by our euid, do not parse, have another version or another uid are
    /// ignored (reported once per file name). Dead entries (lock not held)
    /// are removed, with their rendezvous socket if it is ours (see
    /// [`ListenerEntry::rendezvous`]).
    ///
    /// This never fails and never blocks: any error means no candidates
    /// (logged at debug level).
    pub fn lookup(&self, dst: SocketAddr) -> Vec<ListenerEntry> {
        if dst.port() == 0 {
            return Vec::new();
        }
        let own = match NetNs::current() {
            Ok(ns) => Some(ns),
            Err(e) => {
                tracing::debug!("vmc registry: lookup {dst}: {e}");
                None
            }
        };
        let entries = match self.scan(Some(dst.port())) {
            Ok((entries, _)) => entries,
            Err(e) => {
                tracing::debug!("vmc registry: lookup {dst}: {e}");
                return Vec::new();
            }
        };
        rank_candidates(dst, own, entries)
    }

    /// Every live entry, sorted by port then age (oldest first), for
    /// reporting. Dead entries are removed on the way, as by
    /// [`Registry::reap`]. Fails only if the directory cannot be read.
    pub fn listeners(&self) -> io::Result<Vec<ListenerEntry>> {
        let (mut entries, _) = self.scan(None)?;
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

    /// Removes the entries of dead listeners (with their rendezvous sockets,
    /// see [`ListenerEntry::rendezvous`]) and temporary files left by
    /// registrants killed while registering (older than
    /// [`vmc_os::segment::TMP_MAX_AGE`]). Returns how many entry and
    /// temporary files were removed; errors count as nothing removed.
    pub fn reap(&self) -> usize {
        match self.scan(None) {
            Ok((_, reaped)) => reaped,
            Err(e) => {
                tracing::debug!("vmc registry: reap: {e}");
                0
            }
        }
    }

    /// How many entry files this registry has opened so far.
    #[cfg(test)]
    fn files_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// The open registry directory, opened again if it was removed.
    fn dir(&self) -> io::Result<Arc<SegmentDir>> {
        let mut guard = self.dir.lock().unwrap_or_else(|e| e.into_inner());
        let gone = match rustix::fs::fstat(guard.fd()) {
            Ok(st) => st.st_nlink == 0,
            Err(_) => true,
        };
        if gone {
            tracing::debug!(
                "vmc registry: {} was removed; creating it again",
                self.path.display()
            );
            *guard = Arc::new(open_dirs(&self.path, &self.root)?);
        }
        Ok(Arc::clone(&guard))
    }

    /// Reads the directory: the live entries of `port` (or of every port,
    /// also reaping stale temporary files, if `None`) and how many files
    /// were removed.
    fn scan(&self, port: Option<u16>) -> io::Result<(Vec<ListenerEntry>, usize)> {
        let dir = self.dir()?;
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
            match self.inspect(&dir, &name, name_port) {
                Inspected::Live(entry) => live.push(entry),
                Inspected::Reaped => reaped += 1,
                Inspected::Skipped => {}
            }
        }
        for tmp in tmps {
            if reap_stale_tmp(&dir, &tmp) {
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
        ) {
            Ok(fd) => fd,
            // Removed meanwhile (unregistered or reaped by somebody else).
            Err(rustix::io::Errno::NOENT) => return Inspected::Skipped,
            Err(rustix::io::Errno::LOOP) => {
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
        let euid = vmc_os::euid();
        if meta.uid() != euid {
            self.warn_once(
                name,
                &format!("is owned by uid {}, expected {euid}", meta.uid()),
            );
            return Inspected::Skipped;
        }
        let mode = meta.mode() & 0o7777;
        if mode != 0o600 {
            self.warn_once(name, &format!("has mode {mode:04o}, expected 0600"));
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
            Ok(_) => parse_entry(&buf, name_port, euid),
            Err(e) => Err(format!("cannot be read: {e}")),
        };
        if !alive {
            self.reap_dead(dir, name, parsed.ok());
            return Inspected::Reaped;
        }
        match parsed {
            Ok(entry) => Inspected::Live(entry),
            Err(why) => {
                self.warn_once(name, &why);
                Inspected::Skipped
            }
        }
    }

    /// Removes a dead entry file and, if we are the ones who removed it, its
    /// rendezvous socket.
    fn reap_dead(&self, dir: &SegmentDir, name: &str, entry: Option<ListenerEntry>) {
        match rustix::fs::unlinkat(dir.fd(), name, AtFlags::empty()) {
            Ok(()) => {}
            // Somebody else reaped it, or its registrant unregistered it (and
            // may still use its rendezvous socket for other listeners): leave
            // the socket alone.
            Err(rustix::io::Errno::NOENT) => return,
            Err(e) => {
                tracing::debug!(
                    "vmc registry: removing dead {}/{name}: {e}",
                    dir.path().display()
                );
                return;
            }
        }
        tracing::debug!(
            "vmc registry: removed dead entry {}/{name}",
            dir.path().display()
        );
        if let Some(entry) = entry {
            self.reap_rendezvous(&entry);
        }
    }

    /// Removes a dead listener's rendezvous socket if it is inside our parent
    /// directory, is a socket owned by us, and is not newer than the entry
    /// (a newer socket at the same path belongs to a new listener).
    fn reap_rendezvous(&self, entry: &ListenerEntry) {
        let path = &entry.rendezvous;
        let confined = path.is_absolute()
            && path.starts_with(&self.root)
            && path != &self.root
            && path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !confined {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        let ctime_ms = i128::from(meta.ctime()) * 1000 + i128::from(meta.ctime_nsec()) / 1_000_000;
        if !meta.file_type().is_socket()
            || meta.uid() != vmc_os::euid()
            || ctime_ms > i128::from(entry.created_unix_ms)
        {
            return;
        }
        match std::fs::remove_file(path) {
            Ok(()) => tracing::debug!(
                "vmc registry: removed dead rendezvous socket {}",
                path.display()
            ),
            Err(e) => tracing::debug!(
                "vmc registry: removing dead rendezvous socket {}: {e}",
                path.display()
            ),
        }
    }

    /// Reports a bad file: at warn level the first time a name is seen, at
    /// debug level after that.
    fn warn_once(&self, name: &str, why: &str) {
        let first = {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
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

/// Opens (creating if needed) `root`, then `path` inside it, with the checks
/// of [`SegmentDir::open`].
fn open_dirs(path: &Path, root: &Path) -> io::Result<SegmentDir> {
    let ctx = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("vmc listener registry {}: {e}", path.display()),
        )
    };
    SegmentDir::open(root).map_err(ctx)?;
    SegmentDir::open(path).map_err(ctx)
}

/// Creates `tmp` in `dir`, locks it, writes `json` and renames it to `name`.
/// On failure nothing is left behind.
fn write_entry(dir: &SegmentDir, tmp: &str, name: &str, json: &[u8]) -> io::Result<File> {
    let what = |step: &str, e: &dyn fmt::Display| {
        format!("vmc registry {}: {step} {tmp}: {e}", dir.path().display())
    };
    let errno = |step: &str, e: rustix::io::Errno| {
        io::Error::new(io::Error::from(e).kind(), what(step, &e))
    };
    let fd = rustix::fs::openat(
        dir.fd(),
        tmp,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| errno("creating", e))?;
    let mut file = File::from(fd);
    let setup = |file: &mut File| -> io::Result<()> {
        // The umask may have removed bits; readers insist on exactly 0600.
        rustix::fs::fchmod(file.as_fd(), Mode::from_raw_mode(0o600))
            .map_err(|e| errno("fchmod", e))?;
        // Lock before the file gets its final name: a final name without a
        // lock always means a dead registrant.
        if !ofd_try_lock(file.as_fd(), LIVENESS_BYTE)
            .map_err(|e| io::Error::new(e.kind(), what("locking", &e)))?
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                what("locking", &"already locked by somebody else"),
            ));
        }
        file.write_all(json)
            .map_err(|e| io::Error::new(e.kind(), what("writing", &e)))?;
        rename_noreplace(dir, tmp, name).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                what(&format!("renaming to {name} from"), &e),
            )
        })
    };
    match setup(&mut file) {
        Ok(()) => Ok(file),
        Err(e) => {
            let _ = rustix::fs::unlinkat(dir.fd(), tmp, AtFlags::empty());
            Err(e)
        }
    }
}

/// `renameat2(RENAME_NOREPLACE)`, or `linkat` + `unlinkat` on file systems
/// without it (same effect: fails with `EEXIST` instead of replacing).
fn rename_noreplace(dir: &SegmentDir, from: &str, to: &str) -> rustix::io::Result<()> {
    match rustix::fs::renameat_with(dir.fd(), from, dir.fd(), to, RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => {
            rustix::fs::linkat(dir.fd(), from, dir.fd(), to, AtFlags::empty())?;
            let _ = rustix::fs::unlinkat(dir.fd(), from, AtFlags::empty());
            Ok(())
        }
        other => other,
    }
}

/// Removes the temporary file `name` if it is a regular file of ours, older
/// than [`TMP_MAX_AGE`] and not locked (its registrant died while
/// registering). Returns whether it was removed.
fn reap_stale_tmp(dir: &SegmentDir, name: &str) -> bool {
    let Ok(fd) = rustix::fs::openat(
        dir.fd(),
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let file = File::from(fd);
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.file_type().is_file() || meta.uid() != vmc_os::euid() {
        return false;
    }
    let age = meta
        .modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or(Duration::ZERO);
    if age < TMP_MAX_AGE {
        return false;
    }
    if !matches!(ofd_locked_by_other(file.as_fd(), LIVENESS_BYTE), Ok(false)) {
        return false;
    }
    rustix::fs::unlinkat(dir.fd(), name, AtFlags::empty()).is_ok()
}

/// The port of a well-formed entry file name
/// `l-<port>-<letters, digits and '-'>.json`, or `None`.
fn parse_entry_name(name: &str) -> Option<u16> {
    let rest = name
        .strip_prefix(ENTRY_PREFIX)?
        .strip_suffix(ENTRY_SUFFIX)?;
    let (port, tail) = rest.split_once('-')?;
    if port.is_empty()
        || port.len() > 5
        || !port.bytes().all(|b| b.is_ascii_digit())
        || (port.len() > 1 && port.starts_with('0'))
        || tail.is_empty()
        || !tail.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    port.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Parses and checks an entry file's content.
fn parse_entry(buf: &[u8], name_port: u16, euid: u32) -> Result<ListenerEntry, String> {
    let value: serde_json::Value =
        serde_json::from_slice(buf).map_err(|e| format!("is not valid JSON: {e}"))?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(ENTRY_VERSION) => {}
        Some(v) => return Err(format!("has version {v}, expected {ENTRY_VERSION}")),
        None => return Err("has no version".to_string()),
    }
    let entry: ListenerEntry =
        serde_json::from_value(value).map_err(|e| format!("is not a listener entry: {e}"))?;
    if entry.uid != euid {
        return Err(format!("says uid {}, expected {euid}", entry.uid));
    }
    if entry.addr.port() != name_port {
        return Err(format!(
            "is for port {} but named for port {name_port}",
            entry.addr.port()
        ));
    }
    Ok(entry)
}

/// The address a connection to `ip` really goes to, for matching: v4-mapped
/// IPv6 addresses as IPv4, the unspecified address as loopback (which is
/// what `connect` does with it).
fn effective_dst_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// How well a listener bound to `bound` accepts connections to `dst`
/// (already made effective): `Some(true)` exactly, `Some(false)` through an
/// unspecified address, `None` not at all. The second value is `true` when
/// an IPv6 wildcard accepts an IPv4 `dst` (slightly less preferred).
fn ip_match(bound: IpAddr, dst: IpAddr) -> Option<(bool, bool)> {
    let bound = bound.to_canonical();
    if bound == dst {
        return Some((true, false));
    }
    match (bound, dst) {
        (IpAddr::V4(b), IpAddr::V4(_)) if b.is_unspecified() => Some((false, false)),
        (IpAddr::V6(b), IpAddr::V6(_)) if b.is_unspecified() => Some((false, false)),
        (IpAddr::V6(b), IpAddr::V4(_)) if b.is_unspecified() => Some((false, true)),
        _ => None,
    }
}

/// The rank of `entry` as a candidate for `dst` (lower is better), or `None`
/// if it cannot be what `dst` reaches. `own` is the caller's namespace, if
/// known. See [`Registry::lookup`] for the rules.
fn rank(dst: SocketAddr, own: Option<NetNs>, entry: &ListenerEntry) -> Option<(u8, bool)> {
    if entry.addr.port() != dst.port() {
        return None;
    }
    let dst_ip = effective_dst_ip(dst.ip());
    let (exact, mapped) = ip_match(entry.addr.ip(), dst_ip)?;
    let same_ns = own == Some(entry.netns);
    let group = if dst_ip.is_loopback() {
        if !same_ns {
            return None;
        }
        if exact {
            0
        } else {
            1
        }
    } else {
        match (exact, same_ns) {
            (true, true) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (false, false) => 3,
        }
    };
    Some((group, mapped))
}

/// Keeps the entries that match `dst` and sorts them best first.
fn rank_candidates(
    dst: SocketAddr,
    own: Option<NetNs>,
    entries: Vec<ListenerEntry>,
) -> Vec<ListenerEntry> {
    let mut ranked: Vec<_> = entries
        .into_iter()
        .filter_map(|e| rank(dst, own, &e).map(|r| (r, e)))
        .collect();
    ranked.sort_by(|(ra, a), (rb, b)| {
        ra.cmp(rb)
            .then(b.created_unix_ms.cmp(&a.created_unix_ms))
            .then(a.pid.cmp(&b.pid))
            .then(a.rendezvous.cmp(&b.rendezvous))
    });
    ranked.into_iter().map(|(_, e)| e).collect()
}

/// Milliseconds since the Unix epoch.
fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
