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
//!
//! A reader trusts nothing it maps: a table is read only if its header says
//! `VMCSTAT1`, and each slot through `SlotView::parse`, which names the field of a
//! slot no writer would leave (`SlotError`).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use serde::Serialize;
use vmc_os::{ForkSafeOnce, Mapping};

/// Slots per process table: connections beyond this many are not listed (they work
/// as usual).
pub const SLOTS: usize = 1024;

const MAGIC: u64 = u64::from_le_bytes(*b"VMCSTAT1");

/// A table file: a 128-byte header (the magic, the rest reserved) and the slots.
#[repr(C)]
struct TableLayout {
    /// [`MAGIC`] once the owner has set the table up.
    magic: AtomicU64,
    slots: [Slot; SLOTS],
}

const _: () = assert!(std::mem::offset_of!(TableLayout, slots) == 128);
const _: () = assert!(std::mem::size_of::<TableLayout>() == 128 + SLOTS * 128);

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

/// The inverse of [`encode_addr`]. Any 128 bits are an IPv6 address (an
/// IPv4-mapped one is read as the IPv4 address), so only the port word, named
/// `port_field` in the error, can be out of range.
fn decode_addr(w: [u64; 3], port_field: &'static str) -> Result<SocketAddr, SlotError> {
    let mut o = [0u8; 16];
    o[..8].copy_from_slice(&w[0].to_be_bytes());
    o[8..].copy_from_slice(&w[1].to_be_bytes());
    let ip = Ipv6Addr::from(o);
    let ip = ip
        .to_ipv4_mapped()
        .map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4);
    let port = u16::try_from(w[2]).map_err(|_| bad(port_field, w[2]))?;
    Ok(SocketAddr::new(ip, port))
}

/// The code a slot stores for the fallback reason `name` (a
/// [`crate::Fallback::code`]): its place in [`FALLBACK_CODES`] from 1, or 0 for
/// none.
pub(crate) fn fallback_code(name: &str) -> u32 {
    FALLBACK_CODES
        .iter()
        .position(|c| *c == name)
        .map_or(0, |i| i as u32 + 1)
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
        &layout_of(&self.map).slots
    }
}

/// A table mapping of `table_len()` bytes (ours, or another process's mapped by
/// `vmc stat` and `vmc migrate`).
fn layout_of(map: &Mapping) -> &TableLayout {
    assert!(map.len() >= table_len());
    // SAFETY: the mapping is page aligned, more than the 128 bytes `TableLayout`
    // needs, and at least `table_len()` = `size_of::<TableLayout>()` bytes long
    // (checked above); its fields are all atomics, for which any bit pattern is
    // valid (another process may write them at any time), and the header's
    // padding is never read. The reference borrows `map`, so it cannot outlive the
    // mapping.
    unsafe { &*map.as_ptr().as_ptr().cast::<TableLayout>() }
}

/// The slots of another process's table, if its header says it is one of this
/// format, set up: anything else (another version, a table still being made, a
/// stray file) is not read.
fn foreign_slots(map: &Mapping) -> io::Result<&[Slot; SLOTS]> {
    let t = layout_of(map);
    match t.magic.load(Ordering::Acquire) {
        MAGIC => Ok(&t.slots),
        m => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("header magic is {m:#018x}, not VMCSTAT1"),
        )),
    }
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
    std::mem::size_of::<TableLayout>()
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
    layout_of(&t.map).magic.store(MAGIC, Ordering::Release);
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

/// The process's statistics table, opened once (`None` if it cannot be).
static TABLE: ForkSafeOnce<Option<Table>> = ForkSafeOnce::new();

/// Waits for a table opening another thread started (see [`crate::prepare_fork`]).
pub(crate) fn prepare_fork() {
    if TABLE.started() {
        let _ = table();
    }
}

fn table() -> Option<&'static Table> {
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
                let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                let fresh = SlotView {
                    used: true,
                    accelerated: false,
                    tx_shm: false,
                    rx_shm: false,
                    pending: false,
                    fallback: None,
                    local: local.unwrap_or(unspecified),
                    peer: peer.unwrap_or(unspecified),
                    tcp_in: 0,
                    tcp_out: 0,
                    shm_in: 0,
                    shm_out: 0,
                    request: None,
                };
                s.store_taken(&fresh.encode());
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
    pub const FALLBACK_MASK: u32 = 0xff << FALLBACK_SHIFT;
    /// Every bit a writer sets.
    pub const KNOWN: u32 = ACCELERATED | TX_SHM | RX_SHM | PENDING | FALLBACK_MASK;
}

/// A slot's words, each loaded once: what [`SlotView::parse`] checks is what it
/// reads, even while the owner writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SlotWords {
    used: u32,
    flags: u32,
    local: [u64; 3],
    peer: [u64; 3],
    /// In the order of [`Counters`]' fields.
    counters: [u64; 4],
    request: u32,
}

impl Slot {
    /// A snapshot of the slot, `used` first.
    fn load(&self) -> SlotWords {
        let words = |a: &[AtomicU64; 3]| a.each_ref().map(|w| w.load(Ordering::Relaxed));
        let c = &self.counters;
        SlotWords {
            used: self.used.load(Ordering::Acquire),
            flags: self.flags.load(Ordering::Relaxed),
            local: words(&self.local),
            peer: words(&self.peer),
            counters: [&c.tcp_in, &c.tcp_out, &c.shm_in, &c.shm_out]
                .map(|w| w.load(Ordering::Relaxed)),
            request: self.request.load(Ordering::Relaxed),
        }
    }

    /// Stores `w`, all but `used`: the connection that took the slot set that
    /// already.
    fn store_taken(&self, w: &SlotWords) {
        for (dst, v) in [(&self.local, w.local), (&self.peer, w.peer)] {
            for (d, v) in dst.iter().zip(v) {
                d.store(v, Ordering::Relaxed);
            }
        }
        let c = &self.counters;
        for (d, v) in [&c.tcp_in, &c.tcp_out, &c.shm_in, &c.shm_out]
            .into_iter()
            .zip(w.counters)
        {
            d.store(v, Ordering::Relaxed);
        }
        self.flags.store(w.flags, Ordering::Relaxed);
        self.request.store(w.request, Ordering::Relaxed);
    }
}

/// A slot word that no writer of this format stores: which field, and what it
/// held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotError {
    /// The field at fault.
    pub(crate) field: &'static str,
    /// What it held.
    pub(crate) found: u64,
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed stats slot: {} is {}", self.field, self.found)
    }
}

impl std::error::Error for SlotError {}

fn bad(field: &'static str, found: impl Into<u64>) -> SlotError {
    SlotError {
        field,
        found: found.into(),
    }
}

/// One slot as plain, checked values. Other processes' tables are read through
/// this: a slot that no writer of this format leaves is refused, not shown as
/// garbage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotView {
    /// Taken by a live connection.
    pub(crate) used: bool,
    /// The channel is attached.
    pub(crate) accelerated: bool,
    /// The sending direction is on shared memory now.
    pub(crate) tx_shm: bool,
    /// The receiving direction is on shared memory now.
    pub(crate) rx_shm: bool,
    /// The handshake is in flight.
    pub(crate) pending: bool,
    /// Why it stays on TCP: one of [`FALLBACK_CODES`].
    pub(crate) fallback: Option<&'static str>,
    pub(crate) local: SocketAddr,
    pub(crate) peer: SocketAddr,
    pub(crate) tcp_in: u64,
    pub(crate) tcp_out: u64,
    pub(crate) shm_in: u64,
    pub(crate) shm_out: u64,
    /// A path `vmc migrate` asked for that the connection has not taken yet.
    pub(crate) request: Option<crate::Path>,
}

impl SlotView {
    /// Checks and reads a snapshot, refusing what no writer stores: `used` other
    /// than 0 or 1, unknown flag bits, a fallback code beyond [`FALLBACK_CODES`],
    /// a port beyond `u16`, an unknown request.
    pub(crate) fn parse(w: &SlotWords) -> Result<SlotView, SlotError> {
        let used = match w.used {
            0 => false,
            1 => true,
            u => return Err(bad("used", u)),
        };
        if w.flags & !flag::KNOWN != 0 {
            return Err(bad("flags", w.flags));
        }
        let fallback = match (w.flags & flag::FALLBACK_MASK) >> flag::FALLBACK_SHIFT {
            0 => None,
            code => Some(
                *FALLBACK_CODES
                    .get(code as usize - 1)
                    .ok_or_else(|| bad("fallback", code))?,
            ),
        };
        let request = match w.request {
            0 => None,
            REQUEST_TCP => Some(crate::Path::Tcp),
            REQUEST_SHM => Some(crate::Path::Shm),
            r => return Err(bad("request", r)),
        };
        let on = |bit: u32| w.flags & bit != 0;
        let [tcp_in, tcp_out, shm_in, shm_out] = w.counters;
        Ok(SlotView {
            used,
            accelerated: on(flag::ACCELERATED),
            tx_shm: on(flag::TX_SHM),
            rx_shm: on(flag::RX_SHM),
            pending: on(flag::PENDING),
            fallback,
            local: decode_addr(w.local, "local.port")?,
            peer: decode_addr(w.peer, "peer.port")?,
            tcp_in,
            tcp_out,
            shm_in,
            shm_out,
            request,
        })
    }

    /// The words of the slot, as its owner stores them: the inverse of
    /// [`SlotView::parse`].
    pub(crate) fn encode(&self) -> SlotWords {
        let bit = |on: bool, bit: u32| if on { bit } else { 0 };
        let code = self.fallback.map_or(0, fallback_code);
        SlotWords {
            used: self.used.into(),
            flags: bit(self.accelerated, flag::ACCELERATED)
                | bit(self.tx_shm, flag::TX_SHM)
                | bit(self.rx_shm, flag::RX_SHM)
                | bit(self.pending, flag::PENDING)
                | code << flag::FALLBACK_SHIFT,
            local: encode_addr(self.local),
            peer: encode_addr(self.peer),
            counters: [self.tcp_in, self.tcp_out, self.shm_in, self.shm_out],
            request: match self.request {
                None => 0,
                Some(crate::Path::Tcp) => REQUEST_TCP,
                Some(crate::Path::Shm) => REQUEST_SHM,
            },
        }
    }
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
    // Still that connection (its slot may have been freed and taken since).
    let s = foreign_slots(&map)?
        .get(c.slot)
        .filter(|s| {
            SlotView::parse(&s.load())
                .is_ok_and(|v| v.used && v.local == c.local && v.peer == c.peer)
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
/// it only does the latter. A table not of this format is refused; a slot that
/// does not parse is left out.
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
    for (slot, s) in foreign_slots(&map)?.iter().enumerate() {
        let words = s.load();
        if words.used == 0 {
            continue;
        }
        match SlotView::parse(&words) {
            Ok(v) => out.push(ConnStat::new(pid, path, slot, &v)),
            Err(e) => tracing::debug!("skipping slot {slot} of {}: {e}", path.display()),
        }
    }
    Ok(())
}

impl ConnStat {
    /// Slot `slot` of the table at `table`, of process `pid`, as `vmc stat` shows it.
    fn new(pid: u32, table: &Path, slot: usize, v: &SlotView) -> ConnStat {
        let on = |shm: bool| if shm { "shm" } else { "tcp" };
        ConnStat {
            id: format!("{pid}.{slot}"),
            pid,
            local: v.local,
            peer: v.peer,
            path: if v.pending {
                "pending"
            } else {
                on(v.accelerated)
            },
            send_path: on(v.tx_shm),
            recv_path: on(v.rx_shm),
            fallback: v.fallback,
            tcp_in: v.tcp_in,
            tcp_out: v.tcp_out,
            shm_in: v.shm_in,
            shm_out: v.shm_out,
            table: table.to_path_buf(),
            slot,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::IpAddr;

    #[test]
    fn addresses_roundtrip() {
        for a in ["127.0.0.1:80", "[::1]:443", "10.1.2.3:65535"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(decode_addr(encode_addr(a), "port"), Ok(a));
        }
    }

    /// Stores `w`, `used` and all.
    fn store(s: &Slot, w: &SlotWords) {
        s.used.store(w.used, Ordering::Relaxed);
        s.store_taken(w);
    }

    fn empty_slot() -> Slot {
        Slot {
            used: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            local: Default::default(),
            peer: Default::default(),
            counters: Counters::default(),
            request: AtomicU32::new(0),
        }
    }

    /// Addresses as a slot holds them: an IPv4-mapped IPv6 address reads back as
    /// IPv4, so the IPv6 ones are the others.
    fn addr() -> impl Strategy<Value = SocketAddr> {
        let v6 = any::<u128>()
            .prop_map(Ipv6Addr::from)
            .prop_filter("IPv4-mapped", |ip| ip.to_ipv4_mapped().is_none())
            .prop_map(IpAddr::V6);
        let ip = prop_oneof![any::<u32>().prop_map(|v| IpAddr::V4(v.into())), v6];
        (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
    }

    fn view() -> impl Strategy<Value = SlotView> {
        let path = prop_oneof![Just(crate::Path::Tcp), Just(crate::Path::Shm)];
        (
            any::<[bool; 5]>(),
            proptest::option::of(proptest::sample::select(&FALLBACK_CODES[..])),
            (addr(), addr()),
            any::<[u64; 4]>(),
            proptest::option::of(path),
        )
            .prop_map(|(b, fallback, (local, peer), c, request)| SlotView {
                used: b[0],
                accelerated: b[1],
                tx_shm: b[2],
                rx_shm: b[3],
                pending: b[4],
                fallback,
                local,
                peer,
                tcp_in: c[0],
                tcp_out: c[1],
                shm_in: c[2],
                shm_out: c[3],
                request,
            })
    }

    /// Words mostly at or just past the edges of the valid ones, so that both
    /// sides of each check come up.
    fn words() -> impl Strategy<Value = SlotWords> {
        let small = |n: u32| prop_oneof![4 => 0..n, 1 => any::<u32>()];
        // State bits 0..5 (bit 4 unknown), fallback codes 0..=9 (9 unknown).
        let flags = prop_oneof![
            4 => (0..32u32, 0..10u32).prop_map(|(b, c)| b | c << flag::FALLBACK_SHIFT),
            1 => any::<u32>(),
        ];
        let port = prop_oneof![4 => 0..=0x1_0001u64, 1 => any::<u64>()];
        let addr = || (any::<[u64; 2]>(), port.clone()).prop_map(|([a, b], p)| [a, b, p]);
        (small(3), flags, addr(), addr(), any::<[u64; 4]>(), small(4)).prop_map(
            |(used, flags, local, peer, counters, request)| SlotWords {
                used,
                flags,
                local,
                peer,
                counters,
                request,
            },
        )
    }

    proptest! {
        #[test]
        fn every_view_roundtrips_through_a_slot(v in view()) {
            let s = empty_slot();
            store(&s, &v.encode());
            prop_assert_eq!(SlotView::parse(&s.load()), Ok(v));
        }

        /// Any words: refused, or the encoding of what they parse to.
        #[test]
        fn slots_parse_only_from_their_own_encoding(w in words()) {
            if let Ok(v) = SlotView::parse(&w) {
                prop_assert_eq!(v.encode(), w);
            }
        }
    }

    /// The error for a valid slot's words changed by `f`.
    fn refusal(f: impl FnOnce(&mut SlotWords)) -> SlotError {
        let mut w = SlotView {
            used: true,
            accelerated: true,
            tx_shm: true,
            rx_shm: false,
            pending: false,
            fallback: None,
            local: "127.0.0.1:4000".parse().unwrap(),
            peer: "[::1]:5000".parse().unwrap(),
            tcp_in: 1,
            tcp_out: 2,
            shm_in: 3,
            shm_out: 4,
            request: None,
        }
        .encode();
        f(&mut w);
        SlotView::parse(&w).unwrap_err()
    }

    #[test]
    fn used_other_than_0_or_1_is_refused() {
        let e = refusal(|w| w.used = 2);
        assert_eq!(
            e,
            SlotError {
                field: "used",
                found: 2
            }
        );
        assert_eq!(e.to_string(), "malformed stats slot: used is 2");
    }

    #[test]
    fn unknown_flag_bits_are_refused() {
        assert_eq!(refusal(|w| w.flags |= 0x10).field, "flags");
        assert_eq!(refusal(|w| w.flags |= 1 << 16).field, "flags");
        assert_eq!(refusal(|w| w.flags = 1 << 31).found, 1 << 31);
    }

    #[test]
    fn a_fallback_code_beyond_the_list_is_refused() {
        let last = FALLBACK_CODES.len() as u32;
        assert_eq!(
            refusal(|w| w.flags |= (last + 1) << flag::FALLBACK_SHIFT),
            {
                SlotError {
                    field: "fallback",
                    found: (last + 1).into(),
                }
            }
        );
        assert_eq!(refusal(|w| w.flags |= flag::FALLBACK_MASK).found, 0xff);
    }

    #[test]
    fn a_port_beyond_u16_is_refused() {
        assert_eq!(refusal(|w| w.local[2] = 65536), {
            SlotError {
                field: "local.port",
                found: 65536,
            }
        });
        assert_eq!(refusal(|w| w.peer[2] = u64::MAX).field, "peer.port");
    }

    #[test]
    fn an_unknown_request_is_refused() {
        assert_eq!(
            refusal(|w| w.request = 3),
            SlotError {
                field: "request",
                found: 3
            }
        );
    }

    /// A table file in `dir` as a live process leaves it (ours, 0600, full length,
    /// locked through another open file description than a reader's), with the
    /// header `magic` and slot 0 holding `v`, slot 1 holding `junk`.
    fn live_table(dir: &Path, magic: u64, v: &SlotView, junk: &SlotWords) -> File {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("p-4242-0.stats"))
            .unwrap();
        file.set_len(table_len() as u64).unwrap();
        assert!(vmc_os::segment::ofd_try_lock(file.as_fd(), 0).unwrap());
        let map = Mapping::new(file.as_fd(), table_len()).unwrap();
        let t = layout_of(&map);
        store(&t.slots[0], &v.encode());
        store(&t.slots[1], junk);
        t.magic.store(magic, Ordering::Release);
        file
    }

    fn listed(dir: &Path) -> Vec<ConnStat> {
        let mut out = Vec::new();
        scan_dir(dir, vmc_os::euid(), Some(&mut out)).unwrap();
        out
    }

    fn a_connection() -> SlotView {
        SlotView {
            used: true,
            accelerated: false,
            tx_shm: false,
            rx_shm: false,
            pending: false,
            fallback: Some("peer-not-vmc"),
            local: "10.0.0.1:80".parse().unwrap(),
            peer: "10.0.0.2:40000".parse().unwrap(),
            tcp_in: 10,
            tcp_out: 20,
            shm_in: 0,
            shm_out: 0,
            request: None,
        }
    }

    #[test]
    fn a_table_with_another_magic_is_skipped_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let junk = SlotWords::default();
        let _held = live_table(
            dir.path(),
            u64::from_le_bytes(*b"VMCSTAT2"),
            &a_connection(),
            &junk,
        );
        assert_eq!(listed(dir.path()), []);
        // Its process is alive: the table stays.
        assert!(dir.path().join("p-4242-0.stats").exists());
    }

    #[test]
    fn slots_that_do_not_parse_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let v = a_connection();
        let junk = SlotWords {
            request: 9,
            ..v.encode()
        };
        let _held = live_table(dir.path(), MAGIC, &v, &junk);
        let got = listed(dir.path());
        assert_eq!(got.len(), 1, "{got:?}");
        let c = &got[0];
        assert_eq!(
            (c.id.as_str(), c.pid, c.local, c.peer),
            ("4242.0", 4242, v.local, v.peer)
        );
        assert_eq!((c.path, c.send_path, c.recv_path), ("tcp", "tcp", "tcp"));
        assert_eq!(c.fallback, Some("peer-not-vmc"));
        assert_eq!((c.tcp_in, c.tcp_out, c.shm_in, c.shm_out), (10, 20, 0, 0));
    }
}
