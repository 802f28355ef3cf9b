//! A shared, read-write memory mapping of a file descriptor.
//!
//! [`Mapping`] owns an `mmap(MAP_SHARED, PROT_READ | PROT_WRITE)` region and
//! unmaps it on drop. It knows nothing about what lives in the memory: the
//! layers above place rings and control words in it and do their own
//! synchronisation.

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::mm::{self, MapFlags, ProtFlags};

/// An owned `MAP_SHARED`, `PROT_READ | PROT_WRITE` mapping of (a prefix of) a
/// file.
///
/// The start address is page-aligned because the kernel chooses it. The
/// region is unmapped when the `Mapping` is dropped; any pointer obtained from
/// [`Mapping::as_ptr`] must not be used after that.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` is a plain range of memory addresses that stays valid
// until drop, with no thread-affine state; moving the owner to another thread
// is harmless. Memory is only accessed through raw pointers handed out by
// `as_ptr`, and the users of those pointers are responsible for
// synchronisation (the memory is also shared with other processes, so Rust's
// aliasing rules cannot be enforced here anyway).
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` only exposes the address and length; see `Send` above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `fd` (from offset 0), shared and
    /// read-write.
    ///
    /// `len` must be non-zero. The file must be at least `len` bytes long, or
    /// accesses past its end raise `SIGBUS`; callers check this (see
    /// [`Segment`](crate::Segment)).
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map a zero-length region",
            ));
        }
        // SAFETY: the address hint is null, so the kernel picks a fresh range
        // and no existing memory is replaced.
        let raw = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("mmap of {len} bytes: {e}"),
            )
        })?;
        let ptr = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null address"))?;
        Ok(Mapping { ptr, len })
    }

    /// The start of the mapping (page-aligned).
    #[inline]
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The length of the mapping in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping is never empty. Provided for API symmetry.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the region returned by `mmap`
        // in `new`, which has not been unmapped yet; after drop nobody can
        // obtain a new pointer into it.
        let _ = unsafe { mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn maps_page_aligned_shared_memory() {
        let fd = rustix::fs::memfd_create("mapping-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        let a = Mapping::new(fd.as_fd(), 8192).unwrap();
        let b = Mapping::new(fd.as_fd(), 8192).unwrap();
        assert_eq!(a.len(), 8192);
        assert!(!a.is_empty());
        assert_eq!(a.as_ptr().as_ptr() as usize % 4096, 0);
        // SAFETY: both mappings are 8192 bytes long and alive.
        unsafe {
            a.as_ptr().as_ptr().add(5000).write_volatile(42);
            assert_eq!(b.as_ptr().as_ptr().add(5000).read_volatile(), 42);
        }
    }

    #[test]
    fn zero_length_refused() {
        let fd = rustix::fs::memfd_create("mapping-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        assert!(Mapping::new(fd.as_fd(), 0).is_err());
    }
}
