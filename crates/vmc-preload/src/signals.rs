//! Signals and blocking calls: `EINTR` as the kernel would give it.
//!
//! A read blocked on a ring waits in vmc's loops, not in the kernel, so the kernel
//! cannot apply its rule: a blocking socket call interrupted by a handler installed
//! without `SA_RESTART` fails with `EINTR`; with `SA_RESTART` it carries on. To apply
//! the rule itself, the library installs the program's handlers behind a trampoline
//! (`sigaction` and `signal` are wrapped) that notes, per thread, that a handler
//! without `SA_RESTART` ran, then calls the program's handler. vmc's waits consult
//! that note ([`vmc_os::interrupt`]); each interposed blocking call clears it first.
//! A call on a socket with a timeout for it (`SO_RCVTIMEO`, `SO_SNDTIMEO`) ends
//! after any handler, as the kernel's does.
//! Readiness waits (`poll`, `epoll_wait`, `select`) fail with `EINTR` after any
//! handler, as the kernel's do.
//!
//! The program sees its own handlers: `sigaction` reports them, not the trampoline.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use libc::{c_int, c_void, sighandler_t, siginfo_t};

use crate::real;

/// Signals 1..NSIG.
const NSIG: usize = 65;

/// The program's handler and flags per signal, while the trampoline stands in.
static HANDLERS: [AtomicUsize; NSIG] = [const { AtomicUsize::new(0) }; NSIG];
static FLAGS: [AtomicI32; NSIG] = [const { AtomicI32::new(0) }; NSIG];

thread_local! {
    /// A handler ran on this thread since the current call began.
    static ANY: Cell<bool> = const { Cell::new(false) };
    /// ... and one of them was installed without SA_RESTART.
    static NO_RESTART: Cell<bool> = const { Cell::new(false) };
    /// The current call has a timeout (SO_RCVTIMEO / SO_SNDTIMEO).
    static TIMED: Cell<bool> = const { Cell::new(false) };
}

/// Clears this thread's notes: called when an interposed blocking call begins;
/// `timed` if the socket has a timeout for it (the kernel never restarts those:
/// `sock_intr_errno` gives `EINTR` for a finite timeout, whatever `SA_RESTART`).
pub(crate) fn begin_call(timed: bool) {
    ANY.with(|c| c.set(false));
    NO_RESTART.with(|c| c.set(false));
    TIMED.with(|c| c.set(timed));
}

/// A handler ran since the call began (readiness waits end with EINTR then).
pub(crate) fn any_handler_ran() -> bool {
    ANY.with(|c| c.get())
}

/// The check registered with `vmc_os::interrupt`: a blocking socket call ends.
fn no_restart() -> bool {
    NO_RESTART.with(|c| c.get())
        || (TIMED.with(|c| c.get()) && ANY.with(|c| c.get()))
        // Not a signal: another process wants a connection we own (see `fork`);
        // the hook serves it and retries.
        || crate::fork::requests_pending()
}

/// Registers the check; called at the library's first use.
pub(crate) fn install_check() {
    vmc_os::interrupt::set_check(no_restart);
}

extern "C" fn trampoline(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let i = sig as usize;
    if i >= NSIG {
        return;
    }
    let handler = HANDLERS[i].load(Ordering::Acquire);
    let flags = FLAGS[i].load(Ordering::Acquire);
    ANY.with(|c| c.set(true));
    if flags & libc::SA_RESTART == 0 {
        NO_RESTART.with(|c| c.set(true));
    }
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        return;
    }
    type Info = extern "C" fn(c_int, *mut siginfo_t, *mut c_void);
    type Plain = extern "C" fn(c_int);
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the program installed this address as an sa_sigaction handler.
        let f = unsafe { std::mem::transmute::<usize, Info>(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the program installed this address as an sa_handler handler.
        let f = unsafe { std::mem::transmute::<usize, Plain>(handler) };
        f(sig);
    }
}

/// Shows the program's own handler in `old` where the trampoline stands in.
///
/// # Safety
/// `old` is null or a valid, written `sigaction`.
unsafe fn unwrap_old(old: *mut libc::sigaction, prev: (usize, c_int)) {
    if old.is_null() {
        return;
    }
    // SAFETY: per the contract.
    let o = unsafe { &mut *old };
    if o.sa_sigaction == trampoline as *const () as usize {
        o.sa_sigaction = prev.0;
        o.sa_flags = prev.1;
    }
}

/// `sigaction(2)`.
#[no_mangle]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let i = sig as usize;
    // A vfork child (CPython's subprocess resets every handler in one) shares our
    // memory: recording its handlers would take the parent's from the trampoline.
    if !(1..NSIG).contains(&i) || !crate::enabled() || vmc_os::proc::in_vfork_child() {
        // SAFETY: forwarding the program's arguments.
        return unsafe { real::sigaction(sig, act, old) };
    }
    let prev = (
        HANDLERS[i].load(Ordering::Acquire),
        FLAGS[i].load(Ordering::Acquire),
    );
    if act.is_null() {
        // SAFETY: a query, forwarded; then the program's view restored.
        let r = unsafe { real::sigaction(sig, act, old) };
        if r == 0 {
            // SAFETY: `old` was written by the successful call (or is null).
            unsafe { unwrap_old(old, prev) };
        }
        return r;
    }
    // SAFETY: the program's sigaction, readable.
    let mut ours = unsafe { std::ptr::read(act) };
    let handler = ours.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: forwarding the program's arguments.
        let r = unsafe { real::sigaction(sig, act, old) };
        if r == 0 {
            HANDLERS[i].store(0, Ordering::Release);
            // SAFETY: as above.
            unsafe { unwrap_old(old, prev) };
        }
        return r;
    }
    // The program's handler first, so the trampoline finds it from the first signal.
    HANDLERS[i].store(handler, Ordering::Release);
    FLAGS[i].store(ours.sa_flags, Ordering::Release);
    ours.sa_sigaction = trampoline as *const () as usize;
    ours.sa_flags |= libc::SA_SIGINFO;
    // SAFETY: our copy of the program's sigaction, with the trampoline in it.
    let r = unsafe { real::sigaction(sig, &ours, old) };
    if r == 0 {
        // SAFETY: as above.
        unsafe { unwrap_old(old, prev) };
    } else {
        HANDLERS[i].store(prev.0, Ordering::Release);
        FLAGS[i].store(prev.1, Ordering::Release);
    }
    r
}

/// `signal(3)`, with glibc's BSD semantics (SA_RESTART), through [`sigaction`].
#[no_mangle]
pub unsafe extern "C" fn signal(sig: c_int, handler: sighandler_t) -> sighandler_t {
    // SAFETY: a zeroed sigaction is a valid starting point.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: an empty mask, then the signal itself blocked while it runs, as glibc.
    unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaddset(&mut act.sa_mask, sig);
    }
    // SAFETY: a zeroed sigaction to receive the old one.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to our two structs.
    if unsafe { sigaction(sig, &act, &mut old) } != 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}
