//! Live connection statistics that `vmc stat` can read from other processes.
//!
//! Each process that opens vmc connections maps one small table file,
//! `<stats dir>/p-<pid>-<n>.stats` (0600, in the user's private directory), of
//! fixed-size slots. A connection takes a free slot when it is created, keeps its byte
//! counters *in* the slot (so counting costs nothing extra: the data path increments
//! the same atomics it would have anyway) and frees it when dropped. The process holds
//! an OFD lock on the file; a reader that finds the lock free knows the process is
//! dead and removes the file.
//!
//! Nothing here is on a shared data path: a slot belongs to one connection, and the
//! table is only searched when a connection is set up.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use serde::Serialize;
use vmc_os::Mapping;

/// Slots per process table: connections beyond this many are not listed (they work
/// as usual).
pub const SLOTS: usize = 1024;

const MAGIC: u64 = u64::from_le_bytes(*b"VMCSTAT1");

/// One connection's published state. `repr(C)`, atomics only: another process reads
/// it while this one writes.
#[repr(C, align(128))]
pub struct Slot {
    /// 0: free; 1: in use.
    used: AtomicU32,
    /// Bit 0: accelerated; bit 1: sending on shm; bit 2: receiving on shm;
    /// bit 3: handshake pending. Bits 8..16: fallback code (see [`FALLBACK_CODES`]).
    flags: AtomicU32,
    local: [AtomicU64; 3],
    peer: [AtomicU64; 3],
    /// Byte counters, in the order of [`crate::Traffic`]'s fields.
    pub(crate) counters: Counters,
    /// A path another process (`vmc migrate`) asks this connection to send on:
    /// 0 none, [`REQUEST_TCP`], [`REQUEST_SHM`]. The connection takes it at its
    /// next write (one load of a line its counters share).
    request: AtomicU32,
}

const REQUEST_TCP: u32 = 1;
const REQUEST_SHM: u32 = 2;

/// Bytes moved, per path and direction; lives in a [`Slot`] when one was free.
#[repr(C)]
#[derive(Default)]
pub struct Counters {
    pub(crate) tcp_in: AtomicU64,
    pub(crate) tcp_out: AtomicU64,
    pub(crate) shm_in: AtomicU64,
    pub(crate) shm_out: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 128);

/// Codes stored for fallback reasons (index = code - 1), as [`crate::Fallback::code`].
pub const FALLBACK_CODES: [&str; 8] = [
    "disabled",
    "no-listener",
    "listener-gone",
    "not-matched",
    "peer-not-vmc",
    "handshake",
    "registry",
    "policy",
];

fn encode_addr(a: SocketAddr) -> [u64; 3] {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    let o = ip.octets();
    [
        u64::from_be_bytes(o[..8].try_into().expect("8 bytes")),
        u64::from_be_bytes(o[8..].try_into().expect("8 bytes")),
        a.port().into(),
    ]
}

fn decode_addr(w: [u64; 3]) -> SocketAddr {
    let mut o = [0u8; 16];
    o[..8].copy_from_slice(&w[0].to_be_bytes());
    o[8..].copy_from_slice(&w[1].to_be_bytes());
    let ip = Ipv6Addr::from(o);
    let ip = ip
        .to_ipv4_mapped()
        .map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4);
    SocketAddr::new(ip, w[2] as u16)
}

/// This process's table.
struct Table {
    /// Keeps the lock (and the file) for the process's lifetime.
    _file: File,
    map: Mapping,
    /// Where to start looking for a free slot.
    hint: AtomicU32,
}

impl Table {
    fn slots(&self) -> &[Slot] {
        // (The table lives in a static that is never dropped, so the mapping
        // outlives every `&'static Slot` handed out.)
        slots_of(&self.map)
    }
}

/// The slots of a table mapping of `table_len()` bytes (ours, or another
/// process's mapped by `vmc stat` and `vmc migrate`).
fn slots_of(map: &Mapping) -> &[Slot] {
    assert!(map.len() >= table_len());
    // SAFETY: the mapping is page aligned and at least `table_len()` = `128 + SLOTS *
    // 128` bytes long (checked above); the slots start at offset 128, so each is
    // 128-byte aligned as `Slot` requires, and they are all atomics, for which any
    // bit pattern is valid (another process may write them at any time). The
    // slice borrows `map`, so it cannot outlive the mapping.
    unsafe { std::slice::from_raw_parts(map.as_ptr().as_ptr().add(128).cast::<Slot>(), SLOTS) }
}

/// Opens another process's table file for reading and writing, if it looks like
/// one of ours (our uid, mode 0600, large enough).
fn open_foreign_table(path: &Path, owner: u32) -> io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if meta.uid() != owner || meta.mode() & 0o777 != 0o600 || meta.len() < table_len() as u64 {
        return Err(io::Error::other("not a table of ours"));
    }
    Ok(file)
}

fn table_len() -> usize {
    128 + SLOTS * std::mem::size_of::<Slot>()
}

/// The directory of the tables: `stats` beside the registry's `listeners`.
pub fn stats_dir() -> PathBuf {
    let listeners = crate::registry::Registry::default_dir();
    listeners
        .parent()
        .map_or_else(|| PathBuf::from("/tmp"), Path::to_path_buf)
        .join("stats")
}

fn open_table() -> io::Result<Table> {
    let path = stats_dir();
    // A process that became another user (a server's workers) has no directory of
    // its own yet: the parent is made (and checked) like the registry's.
    if let Some(parent) = path.parent().filter(|p| !p.exists()) {
        vmc_os::SegmentDir::open(parent)?;
    }
    let dir = vmc_os::SegmentDir::open(path)?;
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let path = dir.path().join(format!(
        "p-{}-{}.stats",
        vmc_os::pid(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    // Left by a dead process that had our pid.
    let _ = std::fs::remove_file(&path);
    // Tables of processes killed before they could remove theirs go now, so the
    // directory holds at most the live processes' tables plus those of processes
    // killed since the last one started.
    if let Err(e) = scan(None) {
        tracing::debug!("reaping stats tables: {e}");
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)?;
    let file = File::from(vmc_os::fdspace::lift(file.into())?);
    if !vmc_os::segment::ofd_try_lock(file.as_fd(), 0)? {
        return Err(io::Error::other("stats table locked by someone else"));
    }
    file.set_len(table_len() as u64)?;
    let _ = OWN_TABLE.set((vmc_os::pid(), path.clone()));
    // SAFETY: `remove_own_table` is a plain `extern "C" fn()` that catches any panic
    // and only touches `OWN_TABLE`, a static that stays valid during exit.
    unsafe { libc::atexit(remove_own_table) };
    let map = Mapping::new(file.as_fd(), table_len())?;
    let t = Table {
        _file: file,
        map,
        hint: AtomicU32::new(0),
    };
    // SAFETY: the first 8 bytes of the page-aligned mapping, an atomic header word.
    let magic = unsafe { &*t.map.as_ptr().as_ptr().cast::<AtomicU64>() };
    magic.store(MAGIC, Ordering::Release);
    Ok(t)
}

/// This process's table file, removed at a normal exit (a killed process's table is
/// reaped by the next process that opens one, or by `vmc stat`).
static OWN_TABLE: OnceLock<(u32, PathBuf)> = OnceLock::new();

extern "C" fn remove_own_table() {
    let _ = std::panic::catch_unwind(|| {
        // A forked child that exits must not remove its parent's table.
        if let Some((pid, path)) = OWN_TABLE.get() {
            if *pid == vmc_os::pid() {
                let _ = std::fs::remove_file(path);
            }
        }
    });
}

/// Set when the table's one-time opening starts (see [`crate::prepare_fork`]).
static TABLE_STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Waits for a table opening another thread started (see [`crate::prepare_fork`]).
pub(crate) fn prepare_fork() {
    if TABLE_STARTED.load(Ordering::Acquire) {
        let _ = table();
    }
}

fn table() -> Option<&'static Table> {
    static TABLE: OnceLock<Option<Table>> = OnceLock::new();
    TABLE_STARTED.store(true, Ordering::Release);
    TABLE
        .get_or_init(|| match open_table() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::debug!("vmc stats table unavailable: {e}");
                None
            }
        })
        .as_ref()
}

/// A connection's slot, or its own counters when no slot was free.
pub(crate) enum Home {
    Slot(&'static Slot),
    Own(Counters),
}

impl Home {
    /// Takes a free slot and publishes the connection's addresses in it.
    pub(crate) fn new(local: Option<SocketAddr>, peer: Option<SocketAddr>) -> Home {
        let Some(t) = table() else {
            return Home::Own(Counters::default());
        };
        let slots = t.slots();
        let start = t.hint.load(Ordering::Relaxed) as usize;
        for k in 0..SLOTS {
            let i = (start + k) % SLOTS;
            let s = &slots[i];
            if s.used
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                t.hint.store(((i + 1) % SLOTS) as u32, Ordering::Relaxed);
                for c in [
                    &s.counters.tcp_in,
                    &s.counters.tcp_out,
                    &s.counters.shm_in,
                    &s.counters.shm_out,
                ] {
                    c.store(0, Ordering::Relaxed);
                }
                s.flags.store(0, Ordering::Relaxed);
                s.request.store(0, Ordering::Relaxed);
                let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                for (dst, a) in [(&s.local, local), (&s.peer, peer)] {
                    for (w, v) in dst.iter().zip(encode_addr(a.unwrap_or(unspecified))) {
                        w.store(v, Ordering::Relaxed);
                    }
                }
                return Home::Slot(s);
            }
        }
        Home::Own(Counters::default())
    }

    pub(crate) fn counters(&self) -> &Counters {
        match self {
            Home::Slot(s) => &s.counters,
            Home::Own(c) => c,
        }
    }

    /// A path `vmc migrate` asked for since the last call, if any (taken: it is
    /// asked once).
    #[inline]
    pub(crate) fn take_request(&self) -> Option<crate::Path> {
        let Home::Slot(s) = self else { return None };
        if s.request.load(Ordering::Relaxed) == 0 {
            return None;
        }
        match s.request.swap(0, Ordering::AcqRel) {
            REQUEST_TCP => Some(crate::Path::Tcp),
            REQUEST_SHM => Some(crate::Path::Shm),
            _ => None,
        }
    }

    /// Publishes the connection's state bits and fallback code.
    pub(crate) fn set_flags(&self, flags: u32) {
        if let Home::Slot(s) = self {
            s.flags.store(flags, Ordering::Relaxed);
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Home::Slot(s) = self {
            s.used.store(0, Ordering::Release);
        }
    }
}

/// Flag bits of a slot.
pub(crate) mod flag {
    pub const ACCELERATED: u32 = 1;
    pub const TX_SHM: u32 = 2;
    pub const RX_SHM: u32 = 4;
    pub const PENDING: u32 = 8;
    pub const FALLBACK_SHIFT: u32 = 8;
}

/// One live connection as `vmc stat` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ConnStat {
    /// `<pid>.<slot>`: names the connection for `vmc migrate` while it lives.
    pub id: String,
    /// Process that owns the connection.
    pub pid: u32,
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub peer: SocketAddr,
    /// `shm`, `tcp`, or `pending` (handshake in flight).
    pub path: &'static str,
    /// The path each direction uses now.
    pub send_path: &'static str,
    /// The path the receiving direction reads now.
    pub recv_path: &'static str,
    /// Why it stays on TCP, if it does (a [`crate::Fallback::code`]).
    pub fallback: Option<&'static str>,
    /// Bytes received over TCP.
    pub tcp_in: u64,
    /// Bytes sent over TCP.
    pub tcp_out: u64,
    /// Bytes received over shared memory.
    pub shm_in: u64,
    /// Bytes sent over shared memory.
    pub shm_out: u64,
    /// The table file and slot (for [`request_path`]).
    #[serde(skip)]
    table: PathBuf,
    #[serde(skip)]
    slot: usize,
}

/// Asks the connection `c` (from [`connections`]) to send on `to` from its next
/// write on (`vmc migrate`). The connection's process does the move, at an exact
/// byte boundary, as [`crate::TcpStream::set_send_path`] does; a connection moved
/// to TCP for good ignores a request for shm.
pub fn request_path(c: &ConnStat, to: crate::Path) -> io::Result<()> {
    // Root may move any user's connection; others only their own.
    let owner = match vmc_os::euid() {
        0 => {
            use std::os::unix::fs::MetadataExt;
            std::fs::symlink_metadata(&c.table)?.uid()
        }
        me => me,
    };
    let file = open_foreign_table(&c.table, owner)?;
    let map = Mapping::new(file.as_fd(), table_len())?;
    let slots = slots_of(&map);
    let word = |a: &[AtomicU64; 3]| [0, 1, 2].map(|i| a[i].load(Ordering::Relaxed));
    // Still that connection (its slot may have been freed and taken since).
    let s = slots
        .get(c.slot)
        .filter(|s| {
            s.used.load(Ordering::Acquire) == 1
                && decode_addr(word(&s.local)) == c.local
                && decode_addr(word(&s.peer)) == c.peer
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the connection is gone"))?;
    let code = match to {
        crate::Path::Tcp => REQUEST_TCP,
        crate::Path::Shm => REQUEST_SHM,
    };
    s.request.store(code, Ordering::Release);
    Ok(())
}

/// Every live connection of this user, from every process's table; tables of dead
/// processes are removed on the way. Run by root with the default directories,
/// every user's (each user's `/dev/shm/vmc-<uid>/stats`).
pub fn connections() -> io::Result<Vec<ConnStat>> {
    let mut out = Vec::new();
    scan_dir(&stats_dir(), vmc_os::euid(), Some(&mut out))?;
    if vmc_os::euid() == 0 && std::env::var_os(crate::registry::REGISTRY_DIR_ENV).is_none() {
        for (uid, dir) in other_users_stats_dirs() {
            if let Err(e) = scan_dir(&dir, uid, Some(&mut out)) {
                tracing::debug!("skipping {}: {e}", dir.display());
            }
        }
    }
    out.sort_by_key(|c| (c.pid, c.local));
    Ok(out)
}

/// The other users' table directories beside ours: `vmc-<uid>/stats`, owned by
/// that uid.
fn other_users_stats_dirs() -> Vec<(u32, PathBuf)> {
    use std::os::unix::fs::MetadataExt;
    let ours = vmc_os::SegmentDir::default_path();
    let Some(parent) = ours.parent() else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let uid: u32 = e.file_name().to_str()?.strip_prefix("vmc-")?.parse().ok()?;
            let meta = std::fs::symlink_metadata(e.path()).ok()?;
            (uid != vmc_os::euid() && meta.is_dir() && meta.uid() == uid)
                .then(|| (uid, e.path().join("stats")))
        })
        .collect()
}

/// Visits every table of ours: removes those of dead processes, and with `out`,
/// collects the live connections of the others.
fn scan(out: Option<&mut Vec<ConnStat>>) -> io::Result<()> {
    scan_dir(&stats_dir(), vmc_os::euid(), out)
}

/// [`scan`] of the tables in `dir`, owned by `owner`.
fn scan_dir(dir: &Path, owner: u32, mut out: Option<&mut Vec<ConnStat>>) -> io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix("p-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        if let Err(e) = read_table(&entry.path(), pid, owner, out.as_deref_mut()) {
            tracing::debug!("skipping stats table {name}: {e}");
        }
    }
    Ok(())
}

/// Reads one table into `out`; removes it if its process is dead. With `out` `None`
/// it only does the latter.
fn read_table(
    path: &Path,
    pid: u32,
    owner: u32,
    out: Option<&mut Vec<ConnStat>>,
) -> io::Result<()> {
    let file = open_foreign_table(path, owner)?;
    if !vmc_os::segment::ofd_locked_by_other(file.as_fd(), 0)? {
        // Its process is dead.
        let _ = std::fs::remove_file(path);
        return Ok(());
    }
    let Some(out) = out else { return Ok(()) };
    let map = Mapping::new(file.as_fd(), table_len())?;
    let slots = slots_of(&map);
    for (slot, s) in slots.iter().enumerate() {
        if s.used.load(Ordering::Acquire) != 1 {
            continue;
        }
        let flags = s.flags.load(Ordering::Relaxed);
        let word = |a: &[AtomicU64; 3]| [0, 1, 2].map(|i| a[i].load(Ordering::Relaxed));
        let on = |bit: u32| if flags & bit != 0 { "shm" } else { "tcp" };
        let code = (flags >> flag::FALLBACK_SHIFT) & 0xff;
        out.push(ConnStat {
            id: format!("{pid}.{slot}"),
            pid,
            local: decode_addr(word(&s.local)),
            peer: decode_addr(word(&s.peer)),
            path: if flags & flag::PENDING != 0 {
                "pending"
            } else if flags & flag::ACCELERATED != 0 {
                "shm"
            } else {
                "tcp"
            },
            send_path: on(flag::TX_SHM),
            recv_path: on(flag::RX_SHM),
            fallback: FALLBACK_CODES.get((code as usize).wrapping_sub(1)).copied(),
            tcp_in: s.counters.tcp_in.load(Ordering::Relaxed),
            tcp_out: s.counters.tcp_out.load(Ordering::Relaxed),
            shm_in: s.counters.shm_in.load(Ordering::Relaxed),
            shm_out: s.counters.shm_out.load(Ordering::Relaxed),
            table: path.to_path_buf(),
            slot,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_roundtrip() {
        for a in ["127.0.0.1:80", "[::1]:443", "10.1.2.3:65535"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(decode_addr(encode_addr(a)), a);
        }
    }
}
