//! Shared-memory segments: creation, validation, hand-over and clean-up.
//!
//! A [`Segment`] is an owned file descriptor plus a shared read-write
//! [`Mapping`] of the whole file. Segments come from three places:
//!
//! * **memfd** ([`Segment::create_memfd`], [`Segment::from_memfd`]): an
//!   anonymous file sealed against shrinking and growing, handed to the peer
//!   over a Unix socket (see [`crate::fdpass`]). Nothing ever appears in a
//!   file system, and a peer can't truncate the file under us (which would
//!   turn our accesses into `SIGBUS`).
//! * **a private directory** ([`SegmentDir`], [`Segment::create_in_dir`],
//!   [`Segment::open_in_dir`]): for peers that can share a directory (for
//!   example containers sharing `/dev/shm`) but not a Unix socket. The
//!   creator makes a `chan-*` file and sends its name; the attacher opens it
//!   and unlinks it, so once both ends hold the mapping nothing stays on
//!   disk. Liveness is tracked with open-file-description (OFD) byte-range
//!   locks: the creator holds a write lock on byte 0, the attacher on byte 1,
//!   and the kernel drops them when the holder dies, even on `kill -9`.
//! * **an existing file** ([`Segment::open_file`]): mapped as it is, for an
//!   ivshmem PCI BAR exposed as a file or a file prepared by someone else.
//!
//! Everything here only sets up memory; what goes into it (rings, control
//! words) and its synchronisation belong to the layers above.

use std::ffi::OsStr;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FileType, MemfdFlags, Mode, OFlags, RenameFlags, SealFlags};

use crate::mapping::Mapping;
use crate::proc;

/// The largest segment accepted from a peer (1 GiB).
///
/// A segment holds a few rings; anything bigger is a bug or an attempt to
/// make us reserve absurd amounts of address space.
pub const MAX_SEGMENT_LEN: usize = 1 << 30;

/// Prefix of the final names of directory segments (what is sent to the
/// peer).
pub const CHAN_PREFIX: &str = "chan-";

/// Prefix of directory segments still being set up by their creator.
pub const TMP_PREFIX: &str = ".tmp-";

/// Age after which [`SegmentDir::reclaim_stale`] removes leftover `.tmp-*`
/// files.
pub const TMP_MAX_AGE: Duration = Duration::from_secs(60);

/// Byte locked by the creator of a directory segment while it is alive.
const CREATOR_BYTE: i64 = 0;
/// Byte locked by the attacher of a directory segment while it is alive.
const ATTACHER_BYTE: i64 = 1;

/// Where a [`Segment`] came from, which decides its liveness check and its
/// clean-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// A sealed memfd, created here or received from a peer.
    Memfd,
    /// A file in a [`SegmentDir`] created by us ([`Segment::create_in_dir`]).
    DirCreator,
    /// A file in a [`SegmentDir`] created by the peer
    /// ([`Segment::open_in_dir`]).
    DirAttacher,
    /// An existing file mapped as it is ([`Segment::open_file`]).
    File,
}

/// Kind-specific state.
enum Origin {
    Memfd,
    DirCreator { dir: Arc<OwnedFd>, name: String },
    DirAttacher { name: String },
    File,
}

/// A shared-memory segment: an owned file descriptor and a read-write shared
/// mapping of the whole file (or of the requested prefix for
/// [`Segment::open_file`]).
///
/// Dropping the segment unmaps it and closes the descriptor, which also
/// releases its liveness lock if it has one. A directory segment created by
/// us also unlinks its name if the peer never attached.
pub struct Segment {
    map: Mapping,
    fd: OwnedFd,
    origin: Origin,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("kind", &self.kind())
            .field("name", &self.name())
            .field("fd", &self.fd)
            .field("len", &self.map.len())
            .finish()
    }
}

impl Segment {
    /// Creates an anonymous shared segment of `len` bytes with
    /// `memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING)`, sized and then sealed
    /// with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, so that the peer it
    /// is sent to can trust its size. `name` only shows up in
    /// `/proc/<pid>/fd` and `/proc/<pid>/maps`.
    pub fn create_memfd(name: &str, len: usize) -> io::Result<Segment> {
        check_len(len, || format!("memfd segment {name:?}"))?;
        let ctx =
            |what: &str, e: rustix::io::Errno| io_err(e, format!("memfd segment {name:?}: {what}"));
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| ctx("memfd_create", e))?;
        let fd = crate::fdspace::lift(fd)?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(|e| ctx("ftruncate", e))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| ctx("adding seals", e))?;
        let map = Mapping::new(fd.as_fd(), len)?;
        Ok(Segment {
            map,
            fd,
            origin: Origin::Memfd,
        })
    }

    /// Adopts a memfd received from a peer.
    ///
    /// The memfd must carry at least `F_SEAL_SHRINK` and `F_SEAL_GROW`: a
    /// peer able to shrink the file could make our accesses fault with
    /// `SIGBUS`, so an unsealed memfd is refused. The size is taken from
    /// `fstat` and must be between 1 byte and [`MAX_SEGMENT_LEN`].
    pub fn from_memfd(fd: OwnedFd) -> io::Result<Segment> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|e| {
            io_err(
                e,
                "received segment: not a sealable memfd (F_GET_SEALS failed)".to_string(),
            )
        })?;
        let needed = SealFlags::SHRINK | SealFlags::GROW;
        if !seals.contains(needed) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "received segment: memfd is not sealed against resizing \
                     (seals {seals:?}, need SHRINK and GROW); refusing it"
                ),
            ));
        }
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err(e, "received segment: fstat".into()))?;
        let len = size_of_stat(&st, || "received segment".to_string())?;
        let map = Mapping::new(fd.as_fd(), len)?;
        Ok(Segment {
            map,
            fd,
            origin: Origin::Memfd,
        })
    }

    /// Creates a new segment file of `len` bytes in `dir`.
    ///
    /// The file is created with mode 0600 under a temporary name
    /// (`.tmp-<pid>-<counter>-<random>`, `O_EXCL | O_NOFOLLOW`), sized, locked
    /// on the creator byte (byte 0) and only then renamed to its final name
    /// `chan-<pid>-<counter>-<random>` (see [`Segment::name`]), so that a
    /// `chan-*` file always has a live lock while its creator lives.
    pub fn create_in_dir(dir: &SegmentDir, len: usize) -> io::Result<Segment> {
        let (pid, counter, random) = unique_triple();
        let tmp = format!("{TMP_PREFIX}{pid}-{counter}-{random:016x}");
        let name = format!("{CHAN_PREFIX}{pid}-{counter}-{random:016x}");
        let what = || format!("segment {}/{name}", dir.path.display());
        check_len(len, what)?;

        let fd = rustix::fs::openat(
            dir.fd(),
            tmp.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err(e, format!("{}: creating {tmp}", what())))?;
        let fd = crate::fdspace::lift(fd)?;

        // Until the rename succeeds, failures remove the temporary name.
        let setup = || -> io::Result<()> {
            // The umask may have removed bits we want; the mode must be exact
            // because the attacher checks it.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600))
                .map_err(|e| io_err(e, format!("{}: fchmod", what())))?;
            rustix::fs::ftruncate(&fd, len as u64)
                .map_err(|e| io_err(e, format!("{}: ftruncate", what())))?;
            if !ofd_try_lock(fd.as_fd(), CREATOR_BYTE)? {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: creator byte already locked by somebody else", what()),
                ));
            }
            rustix::fs::renameat_with(
                dir.fd(),
                tmp.as_str(),
                dir.fd(),
                name.as_str(),
                RenameFlags::NOREPLACE,
            )
            .map_err(|e| io_err(e, format!("{}: renaming from {tmp}", what())))
        };
        if let Err(e) = setup() {
            let _ = rustix::fs::unlinkat(dir.fd(), tmp.as_str(), AtFlags::empty());
            return Err(e);
        }
        match Mapping::new(fd.as_fd(), len) {
            Ok(map) => Ok(Segment {
                map,
                fd,
                origin: Origin::DirCreator {
                    dir: Arc::clone(&dir.fd),
                    name,
                },
            }),
            Err(e) => {
                let _ = rustix::fs::unlinkat(dir.fd(), name.as_str(), AtFlags::empty());
                Err(e)
            }
        }
    }

    /// Attaches to a segment file created by the peer in `dir`.
    ///
    /// `name` must be a `chan-*` name as returned by [`Segment::name`] on the
    /// creator's side. The file must be a regular file owned by our effective
    /// uid with mode exactly 0600 and a sane size. We take the attacher lock
    /// (byte 1), failing if somebody else holds it (the segment is already
    /// attached), map the file, and unlink its name: from then on only the two
    /// mappings keep it alive, so nothing remains on disk even if both
    /// processes are killed.
    pub fn open_in_dir(dir: &SegmentDir, name: &str) -> io::Result<Segment> {
        let what = || format!("segment {}/{name}", dir.path.display());
        validate_chan_name(name).map_err(|why| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: bad name: {why}", what()),
            )
        })?;
        let fd = rustix::fs::openat(
            dir.fd(),
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| io_err(e, format!("{}: open", what())))?;
        let fd = crate::fdspace::lift(fd)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err(e, format!("{}: fstat", what())))?;
        check_private_file(&st, 0o600, &what)?;
        let len = size_of_stat(&st, what)?;
        if !ofd_try_lock(fd.as_fd(), ATTACHER_BYTE)? {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: already attached by another process", what()),
            ));
        }
        let map = Mapping::new(fd.as_fd(), len)?;
        match rustix::fs::unlinkat(dir.fd(), name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(io_err(e, format!("{}: unlink after attach", what()))),
        }
        Ok(Segment {
            map,
            fd,
            origin: Origin::DirAttacher {
                name: name.to_owned(),
            },
        })
    }

    /// Maps the first `len` bytes of an existing file as it is: for an
    /// ivshmem BAR exposed as a file (e.g. `/sys/bus/pci/devices/…/resource2`)
    /// or a file prepared by someone else.
    ///
    /// No locks are taken and nothing is unlinked; the file must be at least
    /// `len` bytes long. Peer liveness must come from elsewhere (see
    /// [`Segment::peer_alive`]).
    pub fn open_file(path: impl AsRef<Path>, len: usize) -> io::Result<Segment> {
        let path = path.as_ref();
        let what = || format!("segment file {}", path.display());
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: requested length is zero", what()),
            ));
        }
        let fd = rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| io_err(e, format!("{}: open", what())))?;
        let fd = crate::fdspace::lift(fd)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err(e, format!("{}: fstat", what())))?;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if size < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: file is {size} bytes, need at least {len}", what()),
            ));
        }
        let map = Mapping::new(fd.as_fd(), len)?;
        Ok(Segment {
            map,
            fd,
            origin: Origin::File,
        })
    }

    /// Whether the peer on the other end of the segment is still alive.
    ///
    /// * Directory segments: tests with `F_OFD_GETLK` whether the peer's byte
    ///   (byte 1 for the creator, byte 0 for the attacher) is locked. The
    ///   kernel releases the lock when the last descriptor of the peer's open
    ///   file description is closed, in particular when the peer dies, even
    ///   with `SIGKILL`. On the creator's side this is `false` until somebody
    ///   has attached, so only ask once the hand-shake is done.
    /// * memfd and plain-file segments: always `Ok(true)`. Their liveness
    ///   signal is elsewhere: the Unix socket the memfd came over (see
    ///   [`crate::hung_up`]) or, between VMs, the protocol running in the
    ///   shared memory.
    pub fn peer_alive(&self) -> io::Result<bool> {
        match &self.origin {
            Origin::Memfd | Origin::File => Ok(true),
            Origin::DirCreator { .. } => ofd_locked_by_other(self.fd.as_fd(), ATTACHER_BYTE),
            Origin::DirAttacher { .. } => ofd_locked_by_other(self.fd.as_fd(), CREATOR_BYTE),
        }
    }

    /// The final (`chan-*`) name of a directory segment: what the creator
    /// sends to the peer. `None` for memfd and plain-file segments.
    pub fn name(&self) -> Option<&str> {
        match &self.origin {
            Origin::DirCreator { name, .. } | Origin::DirAttacher { name } => Some(name),
            Origin::Memfd | Origin::File => None,
        }
    }

    /// Where this segment came from.
    pub fn kind(&self) -> SegmentKind {
        match self.origin {
            Origin::Memfd => SegmentKind::Memfd,
            Origin::DirCreator { .. } => SegmentKind::DirCreator,
            Origin::DirAttacher { .. } => SegmentKind::DirAttacher,
            Origin::File => SegmentKind::File,
        }
    }

    /// The start of the mapping (page-aligned). Valid for [`Segment::len`]
    /// bytes while the segment lives.
    #[inline]
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.map.as_ptr()
    }

    /// The length of the mapping in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: segments are never empty. Provided for API symmetry.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The segment's file descriptor (e.g. to send a memfd to the peer).
    #[inline]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The inode number of the segment's file: names it, to both processes that
    /// map it, for as long as one keeps it open (`fstat`).
    pub fn inode(&self) -> io::Result<u64> {
        Ok(rustix::fs::fstat(&self.fd)?.st_ino)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Origin::DirCreator { dir, name } = &self.origin {
            // Normally the attacher has unlinked it already (ENOENT); if
            // nobody attached, don't leave the file behind.
            let _ = rustix::fs::unlinkat(dir.as_fd(), name.as_str(), AtFlags::empty());
        }
        // `map` then `fd` are dropped after this: unmap, then close (which
        // releases our OFD lock).
    }
}

/// A private, per-user directory holding segment files.
///
/// The directory must be owned by our effective uid with mode exactly 0700
/// and must not be a symlink; the check is done on an open descriptor, and
/// all file operations are relative to that descriptor, so the directory
/// cannot be swapped under us.
#[derive(Debug)]
pub struct SegmentDir {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

impl SegmentDir {
    /// Opens the segment directory at `path`, creating it (mode 0700) if it
    /// does not exist. Parent directories are not created.
    ///
    /// An existing `path` is accepted only if it is a directory (not a
    /// symlink to one) owned by our effective uid with mode exactly 0700.
    pub fn open(path: impl AsRef<Path>) -> io::Result<SegmentDir> {
        let path = path.as_ref();
        let what = || format!("segment directory {}", path.display());
        SegmentDir::open_checked(path, &what, 0o700, true, |st| {
            let euid = proc::euid();
            if st.st_uid != euid {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{}: owned by uid {}, expected {euid}", what(), st.st_uid),
                ));
            }
            let mode = st.st_mode & 0o7777;
            if mode != 0o700 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{}: mode {mode:04o}, expected 0700", what()),
                ));
            }
            Ok(())
        })
    }

    /// Opens a directory shared by every user, creating it with `mode` (`0o1777`:
    /// anyone lists and creates; `0o1733`: anyone creates, only its owner lists) if
    /// it does not exist. Parent directories are not created.
    ///
    /// An existing `path` is accepted only if it is a directory (not a symlink to
    /// one) with the sticky bit (so nobody removes or renames another user's
    /// files) and at least the permissions of `mode` for others; its owner may be
    /// anyone (root, or the first user who needed it: that user can remove
    /// others' files, which costs them acceleration, never data, since vmc checks
    /// every peer it meets there).
    pub fn open_shared(path: impl AsRef<Path>, mode: u32) -> io::Result<SegmentDir> {
        let path = path.as_ref();
        let what = || format!("shared directory {}", path.display());
        // One we did not make may be unreadable to us (0o1733): reached by path
        // only, which is all that binding and connecting in it need.
        let readable = mode & 0o004 != 0;
        SegmentDir::open_checked(path, &what, mode, readable, |st| {
            let have = st.st_mode & 0o7777;
            if have & 0o1000 == 0 || have & mode & 0o7 != mode & 0o7 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{}: mode {have:04o}, expected the sticky bit and {mode:04o} for others",
                        what()
                    ),
                ));
            }
            Ok(())
        })
    }

    /// Opens the directory at `path`, creating it if missing: made 0700 first and
    /// opened by descriptor, then given exactly `mode` through that descriptor (the
    /// umask reduced mkdir's mode; no symlink can be followed, nobody can slip
    /// another object under the name in between). An existing one is opened for
    /// reading if `readable`, else by path only (`O_PATH`). It must be a directory
    /// and pass `check`.
    fn open_checked(
        path: &Path,
        what: &dyn Fn() -> String,
        mode: u32,
        readable: bool,
        check: impl FnOnce(&rustix::fs::Stat) -> io::Result<()>,
    ) -> io::Result<SegmentDir> {
        let created = match rustix::fs::mkdir(path, Mode::from_raw_mode(0o700)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(io_err(e, format!("{}: mkdir", what()))),
        };
        let access = if created || readable {
            OFlags::RDONLY
        } else {
            OFlags::PATH
        };
        let fd = rustix::fs::open(
            path,
            access | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            // With O_DIRECTORY, a symlink gives ENOTDIR (or ELOOP); look at
            // the entry itself to say what is wrong.
            let ty = rustix::fs::lstat(path).map(|st| FileType::from_raw_mode(st.st_mode));
            match (e, ty) {
                (_, Ok(FileType::Symlink)) => io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{}: is a symlink; refusing to follow it", what()),
                ),
                (rustix::io::Errno::NOTDIR, _) => io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: exists and is not a directory", what()),
                ),
                (e, _) => io_err(e, format!("{}: open", what())),
            }
        })?;
        let fd = crate::fdspace::lift(fd)?;
        if created {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
                .map_err(|e| io_err(e, format!("{}: fchmod", what())))?;
        }
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err(e, format!("{}: fstat", what())))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a directory", what()),
            ));
        }
        check(&st)?;
        Ok(SegmentDir {
            fd: Arc::new(fd),
            path: path.to_path_buf(),
        })
    }

    /// Opens (creating if needed) the directory at [`SegmentDir::default_path`].
    pub fn open_default() -> io::Result<SegmentDir> {
        SegmentDir::open(SegmentDir::default_path())
    }

    /// The default location: `$VMC_SHM_DIR` if set and non-empty, else
    /// `/dev/shm/vmc-<euid>` if `/dev/shm` exists, else
    /// `<temp dir>/vmc-<euid>`.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("VMC_SHM_DIR").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let leaf = format!("vmc-{}", proc::euid());
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            shm.join(leaf)
        } else {
            std::env::temp_dir().join(leaf)
        }
    }

    /// The path this directory was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open directory descriptor all operations are relative to.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Removes leftovers of dead processes and returns how many files were
    /// removed:
    ///
    /// * `chan-*` regular files on which neither the creator byte nor the
    ///   attacher byte is locked (a creator killed before anybody attached).
    ///   We take both locks ourselves before unlinking, so a process attaching
    ///   at the same moment fails cleanly instead of racing with us.
    /// * `.tmp-*` regular files older than [`TMP_MAX_AGE`] whose creator byte
    ///   is not locked (a creator killed during set-up).
    ///
    /// Nothing else is ever removed, and entries that cannot be inspected
    /// (vanished meanwhile, not regular files, …) are left alone.
    pub fn reclaim_stale(&self) -> io::Result<usize> {
        let mut dir = rustix::fs::Dir::read_from(self.fd()).map_err(|e| {
            io_err(
                e,
                format!("segment directory {}: read", self.path.display()),
            )
        })?;
        let mut removed = 0;
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| {
                io_err(
                    e,
                    format!("segment directory {}: read", self.path.display()),
                )
            })?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            let Some(name) = name.to_str() else { continue };
            let stale = if validate_chan_name(name).is_ok() {
                self.chan_is_stale(name)
            } else if name.starts_with(TMP_PREFIX) && !name.contains('/') {
                self.tmp_is_stale(name)
            } else {
                continue;
            };
            // Keep the descriptor (and its locks) open across the unlink.
            if let Some(_locked_fd) = stale {
                if rustix::fs::unlinkat(self.fd(), name, AtFlags::empty()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Opens `name` and locks both liveness bytes. `Some(fd)` (holding the
    /// locks) if nobody else held either: the file is stale.
    fn chan_is_stale(&self, name: &str) -> Option<OwnedFd> {
        let fd = self.open_regular(name)?;
        let (start, len) = (CREATOR_BYTE, ATTACHER_BYTE - CREATOR_BYTE + 1);
        match ofd_lock_range(fd.as_fd(), libc::F_OFD_SETLK, start, len) {
            Ok(true) => Some(fd),
            _ => None,
        }
    }

    /// `Some(fd)` (holding the creator lock) if the temporary file is old
    /// enough and its creator byte is free.
    fn tmp_is_stale(&self, name: &str) -> Option<OwnedFd> {
        let fd = self.open_regular(name)?;
        let st = rustix::fs::fstat(&fd).ok()?;
        let mtime = if st.st_mtime >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(st.st_mtime as u64)
        } else {
            SystemTime::UNIX_EPOCH
        };
        let age = SystemTime::now()
            .duration_since(mtime)
            .unwrap_or(Duration::ZERO);
        if age < TMP_MAX_AGE {
            return None;
        }
        match ofd_try_lock(fd.as_fd(), CREATOR_BYTE) {
            Ok(true) => Some(fd),
            _ => None,
        }
    }

    /// Opens `name` read-write without following symlinks or blocking, and
    /// only if it is a regular file.
    fn open_regular(&self, name: &str) -> Option<OwnedFd> {
        let fd = rustix::fs::openat(
            self.fd(),
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .ok()?;
        let st = rustix::fs::fstat(&fd).ok()?;
        (FileType::from_raw_mode(st.st_mode) == FileType::RegularFile).then_some(fd)
    }
}

/// Checks that a name is a well-formed `chan-*` segment name: the prefix
/// followed by ASCII letters, digits and `-` only (so no `/`, no `..`, no
/// NUL), at most 200 bytes.
pub(crate) fn validate_chan_name(name: &str) -> Result<(), &'static str> {
    let Some(rest) = name.strip_prefix(CHAN_PREFIX) else {
        return Err("does not start with \"chan-\"");
    };
    if rest.is_empty() {
        return Err("nothing after \"chan-\"");
    }
    if name.len() > 200 {
        return Err("too long");
    }
    if !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("only ASCII letters, digits and '-' may follow \"chan-\"");
    }
    Ok(())
}

/// Checks a segment file: regular, owned by our euid, with exactly `mode`.
fn check_private_file(
    st: &rustix::fs::Stat,
    mode: u32,
    what: &dyn Fn() -> String,
) -> io::Result<()> {
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a regular file", what()),
        ));
    }
    let euid = proc::euid();
    if st.st_uid != euid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: owned by uid {}, expected {euid}", what(), st.st_uid),
        ));
    }
    let actual = st.st_mode & 0o7777;
    if actual != mode {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: mode {actual:04o}, expected {mode:04o}", what()),
        ));
    }
    Ok(())
}

/// The size of a file we are about to map, checked to be in
/// `1..=MAX_SEGMENT_LEN`.
fn size_of_stat(st: &rustix::fs::Stat, what: impl Fn() -> String) -> io::Result<usize> {
    let len = usize::try_from(st.st_size).unwrap_or(usize::MAX);
    check_len(len, what)?;
    Ok(len)
}

/// Checks a segment length is in `1..=MAX_SEGMENT_LEN`.
fn check_len(len: usize, what: impl Fn() -> String) -> io::Result<()> {
    if len == 0 || len > MAX_SEGMENT_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: size {len} is out of range (1..={MAX_SEGMENT_LEN})",
                what()
            ),
        ));
    }
    Ok(())
}

/// Converts an errno into an `io::Error` of the same kind with context.
fn io_err(e: rustix::io::Errno, context: String) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{context}: {e}"))
}

/// `(pid, counter, random)` making a file name unique across processes and
/// across calls; the random part stops other processes guessing names.
fn unique_triple() -> (u32, u64, u64) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    // `RandomState` is seeded from the OS's random source; mix in the time
    // and counter so that successive names differ even if the seed repeats.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(counter);
    if let Ok(t) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    (proc::pid(), counter, h.finish())
}

/// Builds a `struct flock` for a write lock on `len` bytes from `start`.
fn write_flock(start: i64, len: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero is a
    // valid value (and `l_pid` must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    fl
}

/// `fcntl(cmd)` with an OFD write lock on `len` bytes from `start`; `cmd` is
/// `F_OFD_SETLK` or `F_OFD_GETLK`. For `SETLK`: `Ok(true)` if acquired,
/// `Ok(false)` if someone else holds a conflicting lock. For `GETLK`:
/// `Ok(true)` if nobody holds a conflicting lock.
fn ofd_lock_range(fd: BorrowedFd<'_>, cmd: libc::c_int, start: i64, len: i64) -> io::Result<bool> {
    let mut fl = write_flock(start, len);
    loop {
        // SAFETY: `fd` is a valid open descriptor for the duration of the
        // call (borrowed), and `fl` is a valid, initialised `struct flock`
        // that the kernel may read and (for GETLK) write.
        let r = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                cmd,
                &mut fl as *mut libc::flock,
            )
        };
        if r == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if cmd == libc::F_OFD_SETLK => {
                return Ok(false)
            }
            _ => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("OFD lock on bytes {start}..{}: {err}", start + len),
                ))
            }
        }
    }
    if cmd == libc::F_OFD_GETLK {
        Ok(fl.l_type == libc::F_UNLCK as libc::c_short)
    } else {
        Ok(true)
    }
}

/// Tries to take an OFD (open-file-description) write lock on one byte of
/// the file behind `fd`, without blocking; `Ok(false)` if another open file
/// description holds a conflicting lock.
///
/// `fd` must be open for writing. The lock belongs to the open file
/// description, not to the process: it is released when the last descriptor
/// sharing that description is closed, in particular when the holder dies
/// (even by `SIGKILL`). Other modules (e.g. the listener registry of
/// `vmc-conn`) use it as a liveness marker.
pub fn ofd_try_lock(fd: BorrowedFd<'_>, byte: i64) -> io::Result<bool> {
    ofd_lock_range(fd, libc::F_OFD_SETLK, byte, 1)
}

/// Whether another open file description holds a lock on `byte` of the file
/// behind `fd` (`F_OFD_GETLK`; works on a read-only descriptor and never
/// takes a lock itself). Locks held through `fd`'s own open file description
/// are not reported.
pub fn ofd_locked_by_other(fd: BorrowedFd<'_>, byte: i64) -> io::Result<bool> {
    ofd_lock_range(fd, libc::F_OFD_GETLK, byte, 1).map(|free| !free)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn test_dir() -> (tempfile::TempDir, SegmentDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SegmentDir::open(tmp.path().join("seg")).unwrap();
        (tmp, dir)
    }

    fn entries(dir: &SegmentDir) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    // SAFETY (for callers): `off` must be within both segments.
    unsafe fn poke_peek(a: &Segment, b: &Segment, off: usize, v: u8) -> u8 {
        // SAFETY: the caller guarantees `off` is in bounds of both mappings,
        // which are alive for the duration of this call.
        unsafe {
            a.as_ptr().as_ptr().add(off).write_volatile(v);
            b.as_ptr().as_ptr().add(off).read_volatile()
        }
    }

    #[test]
    fn memfd_roundtrip() {
        let a = Segment::create_memfd("vmc-test", 3 * 4096).unwrap();
        assert_eq!(a.kind(), SegmentKind::Memfd);
        assert_eq!(a.name(), None);
        assert!(a.peer_alive().unwrap());
        let dup = a.fd().try_clone_to_owned().unwrap();
        let b = Segment::from_memfd(dup).unwrap();
        assert_eq!(b.len(), 3 * 4096);
        // SAFETY: 12000 < 3 * 4096, both segments alive.
        assert_eq!(unsafe { poke_peek(&a, &b, 12000, 0xab) }, 0xab);
        // SAFETY: as above.
        assert_eq!(unsafe { poke_peek(&b, &a, 1, 7) }, 7);
        // The seals stop anyone from resizing it.
        assert!(rustix::fs::ftruncate(a.fd(), 4096).is_err());
        assert!(rustix::fs::ftruncate(a.fd(), 1 << 20).is_err());
    }

    #[test]
    fn unsealed_memfd_refused() {
        let fd =
            rustix::fs::memfd_create("unsealed", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                .unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        let err = Segment::from_memfd(fd).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("not sealed"), "{err}");

        // Only SHRINK is not enough either.
        let fd = rustix::fs::memfd_create("half", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK).unwrap();
        assert!(Segment::from_memfd(fd).is_err());

        // A non-memfd (a pipe) is refused too.
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(Segment::from_memfd(r).is_err());
    }

    #[test]
    fn empty_memfd_refused() {
        let fd = rustix::fs::memfd_create("empty", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .unwrap();
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        let err = Segment::from_memfd(fd).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        assert!(Segment::create_memfd("x", 0).is_err());
        assert!(Segment::create_memfd("x", MAX_SEGMENT_LEN + 1).is_err());
    }

    #[test]
    fn dir_segment_create_open_unlinks() {
        let (_tmp, dir) = test_dir();
        let a = Segment::create_in_dir(&dir, 8192).unwrap();
        let name = a.name().unwrap().to_owned();
        assert!(name.starts_with("chan-"), "{name}");
        assert_eq!(entries(&dir), vec![name.clone()]);
        let meta = std::fs::metadata(dir.path().join(&name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(meta.len(), 8192);

        let b = Segment::open_in_dir(&dir, &name).unwrap();
        assert_eq!(b.kind(), SegmentKind::DirAttacher);
        assert_eq!(b.len(), 8192);
        assert!(entries(&dir).is_empty(), "name must be gone after attach");
        // SAFETY: 8000 < 8192, both alive.
        assert_eq!(unsafe { poke_peek(&a, &b, 8000, 99) }, 99);

        // A second attach is impossible: the name is gone.
        assert!(Segment::open_in_dir(&dir, &name).is_err());
        drop(a);
        drop(b);
        assert!(entries(&dir).is_empty());
    }

    #[test]
    fn dir_segment_removed_when_creator_dropped() {
        let (_tmp, dir) = test_dir();
        let a = Segment::create_in_dir(&dir, 4096).unwrap();
        let name = a.name().unwrap().to_owned();
        assert_eq!(entries(&dir), vec![name.clone()]);
        drop(a);
        assert!(entries(&dir).is_empty());
        assert_eq!(
            Segment::open_in_dir(&dir, &name).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn second_attacher_refused() {
        let (_tmp, dir) = test_dir();
        let a = Segment::create_in_dir(&dir, 4096).unwrap();
        let name = a.name().unwrap().to_owned();
        // Somebody (not a Segment) holds the attacher byte already.
        let other =
            rustix::fs::openat(dir.fd(), name.as_str(), OFlags::RDWR, Mode::empty()).unwrap();
        assert!(ofd_try_lock(other.as_fd(), ATTACHER_BYTE).unwrap());
        let err = Segment::open_in_dir(&dir, &name).unwrap_err();
        assert!(err.to_string().contains("already attached"), "{err}");
        // The failed attacher did not unlink the name.
        assert_eq!(entries(&dir), vec![name]);
    }

    #[test]
    fn bad_names_refused() {
        let (_tmp, dir) = test_dir();
        for bad in [
            "",
            "chan-",
            "foo",
            "chan-../x",
            "chan-a/b",
            "../chan-a",
            ".tmp-1-2-3",
            "chan-a\0b",
        ] {
            let err = Segment::open_in_dir(&dir, bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {err}");
        }
    }

    #[test]
    fn file_mode_and_type_checked() {
        let (_tmp, dir) = test_dir();
        let p = dir.path().join("chan-open-to-all");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Segment::open_in_dir(&dir, "chan-open-to-all").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            err.to_string().contains("mode 0644, expected 0600"),
            "{err}"
        );
        // Still there: a refused file is not unlinked.
        assert!(p.exists());

        // Symlinks are not followed.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&p, dir.path().join("chan-link")).unwrap();
        assert!(Segment::open_in_dir(&dir, "chan-link").is_err());

        // Empty files are refused.
        let e = dir.path().join("chan-empty");
        std::fs::write(&e, b"").unwrap();
        std::fs::set_permissions(&e, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Segment::open_in_dir(&dir, "chan-empty")
            .unwrap_err()
            .to_string()
            .contains("out of range"));

        // The well-formed one is accepted.
        let s = Segment::open_in_dir(&dir, "chan-open-to-all").unwrap();
        assert_eq!(s.len(), 4096);
    }

    #[test]
    fn wrong_owner_refused() {
        // Only root can give a file away; skip otherwise.
        if proc::euid() != 0 {
            return;
        }
        let (_tmp, dir) = test_dir();
        let p = dir.path().join("chan-foreign");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&p, Some(12345), None).unwrap();
        let err = Segment::open_in_dir(&dir, "chan-foreign").unwrap_err();
        assert!(
            err.to_string().contains("owned by uid 12345, expected 0"),
            "{err}"
        );

        let d = _tmp.path().join("foreign-dir");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&d, Some(12345), None).unwrap();
        let err = SegmentDir::open(&d).unwrap_err();
        assert!(err.to_string().contains("owned by uid 12345"), "{err}");
    }

    #[test]
    fn dir_checks() {
        let tmp = tempfile::tempdir().unwrap();
        // Created with exactly 0700 whatever the umask.
        let p = tmp.path().join("new");
        let d = SegmentDir::open(&p).unwrap();
        assert_eq!(d.path(), p);
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        assert_eq!(meta.uid(), proc::euid());
        // Re-opening an existing good directory works.
        SegmentDir::open(&p).unwrap();

        // 0755 is refused.
        let loose = tmp.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = SegmentDir::open(&loose).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            err.to_string().contains("mode 0755, expected 0700"),
            "{err}"
        );

        // A symlink to a good directory is refused.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let err = SegmentDir::open(&link).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");

        // A regular file is refused.
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = SegmentDir::open(&file).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn shared_dir_checks() {
        let tmp = tempfile::tempdir().unwrap();
        for mode in [0o1777, 0o1733] {
            let p = tmp.path().join(format!("shared-{mode:o}"));
            SegmentDir::open_shared(&p, mode).unwrap();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!(
                meta.permissions().mode() & 0o7777,
                mode,
                "exact, whatever the umask"
            );
            SegmentDir::open_shared(&p, mode).unwrap();
        }
        // Without the sticky bit anyone could remove anyone's files: refused.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = SegmentDir::open_shared(&open, 0o1777).unwrap_err();
        assert!(err.to_string().contains("sticky bit"), "{err}");
        // Not writable by others: refused for a directory others must create in.
        let closed = tmp.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o1755)).unwrap();
        assert!(SegmentDir::open_shared(&closed, 0o1733).is_err());
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("shared-1777"), &link).unwrap();
        let err = SegmentDir::open_shared(&link, 0o1777).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    #[test]
    fn default_path_shape() {
        let p = SegmentDir::default_path();
        match std::env::var_os("VMC_SHM_DIR").filter(|v| !v.is_empty()) {
            Some(v) => assert_eq!(p, PathBuf::from(v)),
            None => assert_eq!(
                p.file_name().unwrap().to_str().unwrap(),
                format!("vmc-{}", proc::euid())
            ),
        }
    }

    #[test]
    fn peer_alive_follows_segment_lifetime() {
        let _g = crate::test_support::fd_sensitive();
        let (_tmp, dir) = test_dir();
        let a = Segment::create_in_dir(&dir, 4096).unwrap();
        assert!(!a.peer_alive().unwrap(), "nobody attached yet");
        let b = Segment::open_in_dir(&dir, a.name().unwrap()).unwrap();
        assert!(a.peer_alive().unwrap());
        assert!(b.peer_alive().unwrap());
        drop(b);
        assert!(!a.peer_alive().unwrap());

        let a = Segment::create_in_dir(&dir, 4096).unwrap();
        let b = Segment::open_in_dir(&dir, a.name().unwrap()).unwrap();
        drop(a);
        assert!(!b.peer_alive().unwrap());
    }

    #[test]
    fn reclaim_stale_removes_only_dead() {
        let _g = crate::test_support::fd_sensitive();
        let (_tmp, dir) = test_dir();
        // A live, unattached segment: locked byte 0, must stay.
        let live = Segment::create_in_dir(&dir, 4096).unwrap();
        // A dead one: a chan- file nobody holds (as left by kill -9).
        let dead = dir.path().join("chan-999-0-dead");
        std::fs::write(&dead, vec![0u8; 4096]).unwrap();
        // A fresh tmp file: too young to be removed.
        let young = dir.path().join(".tmp-999-1-young");
        std::fs::write(&young, b"").unwrap();
        // An old tmp file.
        let old = dir.path().join(".tmp-999-2-old");
        std::fs::write(&old, b"").unwrap();
        let past = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(past)
            .unwrap();
        // Unrelated files are never touched, even old ones.
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, b"keep").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(past)
            .unwrap();

        assert_eq!(dir.reclaim_stale().unwrap(), 2);
        let mut expected = vec![
            ".tmp-999-1-young".to_string(),
            live.name().unwrap().to_string(),
            "notes.txt".to_string(),
        ];
        expected.sort();
        assert_eq!(entries(&dir), expected);
        assert_eq!(dir.reclaim_stale().unwrap(), 0);
        // The live segment can still be attached after a reclaim pass.
        let b = Segment::open_in_dir(&dir, live.name().unwrap()).unwrap();
        assert!(live.peer_alive().unwrap());
        drop(b);
    }

    #[test]
    fn open_file_maps_existing() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("bar");
        std::fs::write(&p, vec![5u8; 16384]).unwrap();
        let s = Segment::open_file(&p, 8192).unwrap();
        assert_eq!(s.kind(), SegmentKind::File);
        assert_eq!(s.len(), 8192);
        assert!(s.peer_alive().unwrap());
        // SAFETY: 100 < 8192.
        assert_eq!(unsafe { s.as_ptr().as_ptr().add(100).read_volatile() }, 5);
        drop(s);
        assert!(p.exists(), "open_file never unlinks");
        let err = Segment::open_file(&p, 16385).unwrap_err();
        assert!(err.to_string().contains("need at least 16385"), "{err}");
    }

    #[test]
    fn peer_killed_with_sigkill_is_seen_dead() {
        let _g = crate::test_support::fork_exclusive();
        let (_tmp, dir) = test_dir();
        let a = Segment::create_in_dir(&dir, 4096).unwrap();
        let cname = std::ffi::CString::new(a.name().unwrap()).unwrap();
        let dirfd = std::os::fd::AsRawFd::as_raw_fd(&dir.fd());
        let flag = a.as_ptr().as_ptr();
        // Everything the child uses is prepared before the fork; the child
        // only makes raw system calls (async-signal-safe).
        let mut fl = write_flock(ATTACHER_BYTE, 1);

        // SAFETY: fork has no memory-safety preconditions; the child below
        // only calls async-signal-safe functions and never returns.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", io::Error::last_os_error());
        if child == 0 {
            // SAFETY: in the child: `cname` and `fl` are valid memory copied
            // by fork; `flag` points into the MAP_SHARED segment inherited
            // from the parent. Only raw system calls are made, and the child
            // leaves with `_exit` without running any Rust destructors.
            unsafe {
                let fd = libc::openat(dirfd, cname.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                if fd < 0 || libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl as *mut libc::flock) != 0 {
                    libc::_exit(1);
                }
                // Drop every other inherited descriptor, so that copies of
                // other tests' sockets/locks do not outlive their owners.
                for other in 3..4096 {
                    if other != fd {
                        libc::close(other);
                    }
                }
                flag.write_volatile(1);
                loop {
                    libc::pause();
                }
            }
        }

        let start = std::time::Instant::now();
        // SAFETY: byte 0 of a live 4096-byte segment.
        while unsafe { flag.read_volatile() } == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "child never attached"
            );
            let mut status = 0;
            // SAFETY: plain waitpid on our child with a valid status pointer.
            let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
            assert_eq!(r, 0, "child exited early with status {status}");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(a.peer_alive().unwrap(), "child holds the attacher byte");

        // SAFETY: signalling and reaping our own child.
        unsafe {
            assert_eq!(libc::kill(child, libc::SIGKILL), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(child, &mut status, 0), child);
            assert!(libc::WIFSIGNALED(status));
        }
        assert!(
            !a.peer_alive().unwrap(),
            "kernel released the dead child's lock"
        );
    }
}
