//! The program's `RLIMIT_NOFILE`, kept consistent with vmc's descriptor moves.
//!
//! vmc keeps its own descriptors at 1024 and above ([`vmc_os::fdspace`]); where the
//! soft limit is lower it raises it for the one call that moves a descriptor there,
//! and puts it back. These hooks take the same lock around the program's own
//! `getrlimit`, `setrlimit` and `prlimit` of `RLIMIT_NOFILE`, so a program never
//! reads the raised value, and vmc's restore never undoes the program's change.
//! Other resources, and other processes' limits, go straight to the C library.

use libc::{c_int, pid_t, rlimit, rlimit64};

use crate::real;

const NOFILE: c_int = libc::RLIMIT_NOFILE as c_int;

/// Runs `f` under vmc's limits lock if `resource` is `RLIMIT_NOFILE` and `pid`
/// names this process (0 or our pid).
fn locked_if_nofile(resource: c_int, pid: pid_t, f: impl FnOnce() -> c_int) -> c_int {
    if resource != NOFILE || (pid != 0 && pid as u32 != std::process::id()) {
        return f();
    }
    vmc_os::fdspace::with_limits_locked(f)
}

/// `getrlimit(2)`.
#[no_mangle]
pub unsafe extern "C" fn getrlimit(resource: c_int, rlim: *mut rlimit) -> c_int {
    // SAFETY: forwarding the program's arguments.
    locked_if_nofile(resource, 0, || unsafe { real::getrlimit(resource, rlim) })
}

/// `getrlimit64`.
#[no_mangle]
pub unsafe extern "C" fn getrlimit64(resource: c_int, rlim: *mut rlimit64) -> c_int {
    // SAFETY: forwarding the program's arguments.
    locked_if_nofile(resource, 0, || unsafe { real::getrlimit64(resource, rlim) })
}

/// `setrlimit(2)`.
#[no_mangle]
pub unsafe extern "C" fn setrlimit(resource: c_int, rlim: *const rlimit) -> c_int {
    // SAFETY: forwarding the program's arguments.
    locked_if_nofile(resource, 0, || unsafe { real::setrlimit(resource, rlim) })
}

/// `setrlimit64`.
#[no_mangle]
pub unsafe extern "C" fn setrlimit64(resource: c_int, rlim: *const rlimit64) -> c_int {
    // SAFETY: forwarding the program's arguments.
    locked_if_nofile(resource, 0, || unsafe { real::setrlimit64(resource, rlim) })
}

/// `prlimit(2)`.
#[no_mangle]
pub unsafe extern "C" fn prlimit(
    pid: pid_t,
    resource: c_int,
    new: *const rlimit,
    old: *mut rlimit,
) -> c_int {
    // SAFETY: forwarding the program's arguments.
    locked_if_nofile(resource, pid, || unsafe {
        real::prlimit(pid, resource, new, old)
    })
}

/// `prlimit64`.
#[no_mangle]
pub unsafe extern "C" fn prlimit64(
    pid: pid_t,
    resource: c_int,
    new: *const rlimit64,
    old: *mut rlimit64,
) -> c_int {
    // SAFETY: forwarding the program's arguments.
    locked_if_nofile(resource, pid, || unsafe {
        real::prlimit64(pid, resource, new, old)
    })
}
