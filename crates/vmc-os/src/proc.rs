//! Process identity: thin wrappers over `geteuid(2)` and `getpid(2)`.
//!
//! Used to name segment files, to check ownership of the segment directory
//! and of segment files, and to build per-user default paths.

/// The effective user id of the calling process.
#[inline]
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The process id of the calling process.
#[inline]
pub fn pid() -> u32 {
    // A pid is always positive, so the conversion is lossless.
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std() {
        assert_eq!(pid(), std::process::id());
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(euid(), unsafe { libc::geteuid() });
    }
}
