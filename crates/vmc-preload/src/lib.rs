//! The LD_PRELOAD library behind `vmc run`: unmodified, dynamically linked programs
//! get their co-resident TCP connections carried over shared memory.
//!
//! # How a program's socket becomes a vmc connection
//! The program's descriptor always stays the real kernel socket. After a real
//! `listen`, `connect` or `accept` succeeds, the library takes the socket over with
//! `vmc_conn` (which registers the listener, or offers a channel to a co-resident vmc
//! listener, or waits for a client's offer); a connection that stays plain TCP is
//! left alone entirely. From then on the library answers reads, writes and readiness
//! for the descriptors it carries ([`table`]), and hands everything else to the C
//! library unchanged ([`real`]).
//!
//! # Rules every hook keeps
//! - Nothing before the real function: setting up happens after the kernel said yes,
//!   and errno is put back as the kernel left it.
//! - No re-entry: vmc's own socket and file calls go through the C library and so
//!   through these hooks; a per-thread flag ([`enter`]) sends them straight on.
//! - No unwinding across the C boundary ([`shield`]): a bug becomes an error return.
//! - Anything unsupported stays plain TCP.
//! - `VMC_DISABLE=1` turns it all off; `VMC_LOG` sets the log level (to stderr, or
//!   to the file `VMC_LOG_FILE`), never to the program's stdout; `VMC_REPORT=FILE`
//!   appends one JSON summary line per process at exit ([`report`]).
//!
//! Readiness calls (`poll`, `select`, `epoll_*`) are in [`poll`] and [`epoll`].

// Hooks are C functions called by C code: their safety contracts are C's.
#![allow(clippy::missing_safety_doc)]
// The library's interface is the C ABI it interposes; these docs are for whoever
// works on it, and link the private pieces they explain.
#![allow(rustdoc::private_intra_doc_links)]

mod alias;
pub mod epoll;
pub mod fork;
pub mod hooks;
mod ids;
pub mod limits;
pub mod poll;
mod real;
pub mod report;
pub mod signals;
pub mod table;

use std::cell::Cell;
use std::io;

thread_local! {
    /// Set while this thread runs vmc code (const-initialised, no destructor: usable
    /// at any point of a thread's life).
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Proof that this thread is inside vmc; leaving clears the flag.
pub(crate) struct Inside(());

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|c| c.set(false));
    }
}

/// Enters vmc, unless this thread is inside already (then the hook must call the
/// real function: vmc itself is the caller).
#[inline]
pub(crate) fn enter() -> Option<Inside> {
    INSIDE.with(|c| {
        if c.get() {
            None
        } else {
            c.set(true);
            Some(Inside(()))
        }
    })
}

/// Runs `f`, turning a panic into an I/O error instead of unwinding into C.
pub(crate) fn shield<T>(f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(io::Error::other(
            "vmc: internal error (panic) in the preload library",
        ))
    })
}

/// This thread's errno.
pub(crate) fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Sets this thread's errno.
pub(crate) fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

/// Sets errno for a failed call, as the kernel would have.
pub(crate) fn fail(e: &io::Error) {
    use io::ErrorKind as K;
    let code = e.raw_os_error().unwrap_or(match e.kind() {
        K::WouldBlock | K::TimedOut => libc::EAGAIN,
        K::ConnectionReset | K::InvalidData => libc::ECONNRESET,
        K::BrokenPipe => libc::EPIPE,
        K::NotConnected => libc::ENOTCONN,
        K::Interrupted => libc::EINTR,
        K::InvalidInput => libc::EINVAL,
        K::PermissionDenied => libc::EACCES,
        _ => libc::EIO,
    });
    set_errno(code);
}

/// False when `VMC_DISABLE` is set (to anything but empty or 0).
///
/// Cached in an atomic, not a `OnceLock`: a fork while another thread fills a
/// `OnceLock` leaves the child one that never completes (see [`init`]).
pub(crate) fn enabled() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static ENABLED: AtomicU8 = AtomicU8::new(0);
    match ENABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = !std::env::var("VMC_DISABLE").is_ok_and(|v| !v.is_empty() && v != "0");
            ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// [`init`]'s progress: 0, the pid of the process whose thread runs it, or [`DONE`].
static STATE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
const DONE: u32 = u32::MAX;

/// vmc has set up in this process (or the one it was forked from): it may keep
/// state that a call must keep current.
pub(crate) fn started() -> bool {
    STATE.load(std::sync::atomic::Ordering::Relaxed) != 0
}

/// True when this call comes from the child of a `vfork` (which runs on our
/// memory until it execs) of a process where vmc keeps state: the hook must then
/// do the real call and nothing else, or it would change the parent's tables
/// (see [`vmc_os::proc::in_vfork_child`]). Costs a system call once vmc has
/// started, none before.
pub(crate) fn hands_off() -> bool {
    started() && vmc_os::proc::in_vfork_child()
}

/// Runs when the library is loaded, before the program's `main`: records which
/// process owns this memory, so that a later `vfork` child is told apart.
extern "C" fn at_load() {
    vmc_os::proc::note_owner();
}

#[used]
#[link_section = ".init_array"]
static AT_LOAD: extern "C" fn() = at_load;

/// One-time set-up, at the first socket vmc takes over: logging, the fork handler,
/// the exit report.
///
/// Not a `std::sync::Once`: a program may fork on one thread while another is in
/// here (before the fork handler exists to hold the fork back), and a child would
/// inherit a `Once` that never completes and hang at its first socket. The state
/// names the process whose thread runs the set-up, so a child takes it over; each
/// step that must happen once per process image is guarded on its own.
pub(crate) fn init() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static HANDLERS: AtomicBool = AtomicBool::new(false);
    let me = std::process::id();
    loop {
        let s = STATE.load(Ordering::Acquire);
        if s == DONE {
            return;
        }
        if s == me {
            // Another thread of this process is setting up.
            std::thread::yield_now();
            continue;
        }
        // Never started, or started in the process this one was forked from.
        if STATE
            .compare_exchange(s, me, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            init_logging();
            fork::init();
            signals::install_check();
            if !HANDLERS.swap(true, Ordering::AcqRel) {
                // SAFETY: registering plain extern "C" functions without arguments.
                unsafe {
                    libc::pthread_atfork(Some(fork::prepare), None, Some(report::in_child));
                    libc::atexit(report::at_exit);
                }
            }
            STATE.store(DONE, Ordering::Release);
            return;
        }
    }
}

/// Sets up `VMC_LOG`. Each event is formatted apart and written with `write(2)`
/// calls on a `&File`, which takes no lock: a lock (std's around stderr, a mutex
/// around the log file) held by one thread as another forks would stay locked in
/// the child, whose first log line would then hang it.
fn init_logging() {
    let Ok(level) = std::env::var("VMC_LOG") else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::new(level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match std::env::var_os("VMC_LOG_FILE").and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
            .and_then(|f| vmc_os::fdspace::lift(f.into()).ok())
            .map(std::fs::File::from)
    }) {
        Some(file) => {
            let file: &'static std::fs::File = Box::leak(Box::new(file));
            builder
                .with_writer(move || file)
                .with_ansi(false)
                .try_init()
        }
        None => {
            // SAFETY: descriptor 2 is the program's standard error. This `File` is
            // leaked, never dropped, so it never closes it; if the program closes
            // or replaces number 2, writes fail or go where it now points, as
            // std's `stderr` would.
            let stderr = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(2) };
            let stderr: &'static std::fs::File = Box::leak(Box::new(stderr));
            builder.with_writer(move || stderr).try_init()
        }
    };
}
