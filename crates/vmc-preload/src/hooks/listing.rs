//! Listings of the program's own descriptors, without vmc's: `opendir`,
//! `fdopendir`, `readdir`, `readdir64`, `closedir`.
//!
//! Programs count their descriptors: a test suite's leak check, a server that
//! reports its open files, `ls /proc/self/fd`. vmc keeps descriptors of its own
//! (the registry's files, spare channels, threads' bells), placed at or above
//! [`vmc_os::fdspace::base`] so that their numbers are out of the program's way;
//! their count would still show. So a directory that lists this process's
//! descriptors (`/proc/self/fd`, `/dev/fd`, `/proc/<pid>/fd`,
//! `/proc/<pid>/task/<tid>/fd`, however it was spelt or reached) is remembered
//! when it is opened, and reading it skips the numbers vmc placed
//! ([`vmc_os::fdspace::is_ours`]): the program reads what it would without vmc.
//!
//! Every other directory costs `readdir` one atomic load (no listing is open,
//! the common case) or a look through the short list of open ones. `opendir`
//! asks the kernel what it opened (one `readlink`) only for a path with "fd" in
//! it; `fdopendir` only once vmc has placed a descriptor.
//!
//! Not covered: `getdents64` called directly (Go's runtime), glibc's `scandir`
//! (it calls its internal `readdir`, not ours), and a program that probes numbers
//! one by one (`fcntl`, `readlink` of `/proc/self/fd/N`) finds vmc's as it would
//! find any open file.

use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{c_char, c_int, DIR};
use vmc_os::sync::ForkSafeMutex;

use crate::{errno, real, set_errno};

/// Open directory streams that list this process's descriptors, by address.
static LISTINGS: ForkSafeMutex<Vec<usize>> =
    ForkSafeMutex::new(|inherited| inherited.map(std::mem::take).unwrap_or_default());
/// How many there are: zero lets `readdir` skip the lock.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// True if `fd` is an open directory that lists this process's descriptors.
fn lists_our_descriptors(fd: c_int) -> bool {
    let Ok(target) = rustix::fs::readlink(format!("/proc/self/fd/{fd}"), Vec::new()) else {
        return false;
    };
    is_descriptor_dir(target.as_bytes(), vmc_os::pid())
}

/// True if `path` (as the kernel names an open directory) is the descriptor
/// directory of process `pid` or of one of its threads.
fn is_descriptor_dir(path: &[u8], pid: u32) -> bool {
    let Some(rest) = path.strip_prefix(b"/proc/") else {
        return false;
    };
    let digits = |s: &[u8]| s.iter().take_while(|b| b.is_ascii_digit()).count();
    let n = digits(rest);
    if n == 0
        || std::str::from_utf8(&rest[..n])
            .ok()
            .and_then(|s| s.parse().ok())
            != Some(pid)
    {
        return false;
    }
    let rest = &rest[n..];
    if rest == b"/fd" {
        return true;
    }
    match rest.strip_prefix(b"/task/") {
        Some(task) => {
            let t = digits(task);
            t > 0 && &task[t..] == b"/fd"
        }
        None => false,
    }
}

/// Remembers `dir` if it lists our descriptors.
fn note(dir: *mut DIR) {
    if dir.is_null() {
        return;
    }
    let saved = errno();
    // SAFETY: `dir` is a stream the C library just opened.
    let fd = unsafe { libc::dirfd(dir) };
    if fd >= 0 && lists_our_descriptors(fd) {
        let mut open = LISTINGS.lock();
        open.push(dir as usize);
        OPEN.store(open.len(), Ordering::Release);
    }
    set_errno(saved);
}

/// True if reading `dir` must skip vmc's descriptors.
fn is_listing(dir: *mut DIR) -> bool {
    OPEN.load(Ordering::Acquire) != 0 && LISTINGS.lock().contains(&(dir as usize))
}

/// True if the entry named `name` is a descriptor vmc placed.
fn hidden(name: &CStr) -> bool {
    let Some(fd) = name.to_str().ok().and_then(|s| s.parse::<c_int>().ok()) else {
        return false;
    };
    let saved = errno();
    let ours = vmc_os::fdspace::is_ours(fd);
    set_errno(saved);
    ours
}

/// `opendir(3)`: a listing of our descriptors is remembered.
#[no_mangle]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut DIR {
    // SAFETY: forwarding the program's argument.
    let dir = unsafe { real::opendir(path) };
    if !dir.is_null() && !crate::hands_off() && !path.is_null() {
        // SAFETY: the C library opened it, so `path` is a valid C string.
        let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
        if bytes.windows(2).any(|w| w == b"fd") {
            note(dir);
        }
    }
    dir
}

/// `fdopendir(3)`: as `opendir`, once vmc holds descriptors to hide.
#[no_mangle]
pub unsafe extern "C" fn fdopendir(fd: c_int) -> *mut DIR {
    // SAFETY: forwarding the program's argument.
    let dir = unsafe { real::fdopendir(fd) };
    if !dir.is_null() && !crate::hands_off() && vmc_os::fdspace::any_placed() {
        note(dir);
    }
    dir
}

/// `readdir(3)`: a listing of our descriptors skips vmc's.
#[no_mangle]
pub unsafe extern "C" fn readdir(dir: *mut DIR) -> *mut libc::dirent {
    if !is_listing(dir) {
        // SAFETY: forwarding the program's argument.
        return unsafe { real::readdir(dir) };
    }
    loop {
        // SAFETY: as above.
        let e = unsafe { real::readdir(dir) };
        // SAFETY: a non-null entry is valid until the next call on `dir`, and its
        // name is NUL-terminated.
        if e.is_null() || !hidden(unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }) {
            return e;
        }
    }
}

/// `readdir64(3)`: as `readdir`.
#[no_mangle]
pub unsafe extern "C" fn readdir64(dir: *mut DIR) -> *mut libc::dirent64 {
    if !is_listing(dir) {
        // SAFETY: forwarding the program's argument.
        return unsafe { real::readdir64(dir) };
    }
    loop {
        // SAFETY: as above.
        let e = unsafe { real::readdir64(dir) };
        // SAFETY: as in `readdir`.
        if e.is_null() || !hidden(unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }) {
            return e;
        }
    }
}

/// `closedir(3)`: forgets the stream before the C library frees it (its address
/// may be the next stream's).
#[no_mangle]
pub unsafe extern "C" fn closedir(dir: *mut DIR) -> c_int {
    if OPEN.load(Ordering::Acquire) != 0 {
        let mut open = LISTINGS.lock();
        open.retain(|&d| d != dir as usize);
        OPEN.store(open.len(), Ordering::Release);
    }
    // SAFETY: forwarding the program's argument.
    unsafe { real::closedir(dir) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_directories_are_told_by_the_kernels_name() {
        assert!(is_descriptor_dir(b"/proc/42/fd", 42));
        assert!(is_descriptor_dir(b"/proc/42/task/43/fd", 42));
        assert!(!is_descriptor_dir(b"/proc/42/fd", 7));
        assert!(!is_descriptor_dir(b"/proc/420/fd", 42));
        assert!(!is_descriptor_dir(b"/proc/42/fdinfo", 42));
        assert!(!is_descriptor_dir(b"/proc/42/task/fd", 42));
        assert!(!is_descriptor_dir(b"/proc/42", 42));
        assert!(!is_descriptor_dir(b"/home/fd", 42));
        assert!(!is_descriptor_dir(b"/proc/self/fd", 42));
    }
}
