//! Connections after `fork`: which process owns the rings.
//!
//! A forked child shares its parent's descriptors, and vmc's connection state is
//! copied into it with the rest of memory, rings included. Two processes must never
//! drive one ring end (their private indices would diverge), so each accelerated
//! connection has exactly one owner: the first of the two processes to use it after
//! the fork. The common patterns work as with TCP: the parent goes on and the child
//! execs or exits; or the parent hands the connection to the child and closes its
//! copy (a pre-forking server). A process that uses a connection the other one owns
//! gets `EIO` instead of torn data (TCP would let both use it; that is a gap).
//!
//! Arbitration: before the fork (the `pthread_atfork` prepare handler) every
//! connection the parent owns gets a slot in a fresh page that both processes will
//! share (`MAP_SHARED | MAP_ANONYMOUS`); the first use after the fork claims the slot
//! with a compare-and-swap of 0 to its pid. A connection that no process claims
//! before one drops it is abandoned there: that process closes its descriptors and
//! leaves the shared state to the other. Until the next fork, checking ownership
//! costs one comparison with a process-wide generation number.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::table::{self, Sock};

/// Bumped by every fork (in the parent, before it; the child inherits the value).
static GEN: AtomicU64 = AtomicU64::new(0);
/// The pid of the process that last forked (the parent of the latest fork).
static FORKER: AtomicU32 = AtomicU32::new(0);

/// A page of claim words shared by a parent and the child of one fork.
struct Page {
    words: *mut AtomicU32,
    len: usize,
}

// SAFETY: the page holds atomics only, valid until `Drop` unmaps it.
unsafe impl Send for Page {}
// SAFETY: as above: every access goes through `AtomicU32`.
unsafe impl Sync for Page {}

impl Page {
    fn new(len: usize) -> Option<Page> {
        let bytes = (len * 4).max(1);
        // SAFETY: a fresh anonymous shared mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then(|| Page {
            words: p.cast(),
            len,
        })
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        assert!(i < self.len);
        // SAFETY: `i` is in bounds; the mapping is zero-filled, page-aligned and lives
        // as long as `self`; AtomicU32 has the layout of u32.
        unsafe { &*self.words.add(i) }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `new` mapped, which no reference
        // outlives (words are only borrowed from `&self`).
        unsafe { libc::munmap(self.words.cast(), (self.len * 4).max(1)) };
    }
}

/// A connection's ownership across forks.
pub struct Owner {
    /// The generation at which this process last knew it owns the connection.
    gen: AtomicU64,
    /// Set once another process won the connection.
    lost: AtomicBool,
    /// The claim to settle at the next use, if a fork happened since.
    claim: Mutex<Option<(Arc<Page>, usize)>>,
}

impl Default for Owner {
    fn default() -> Owner {
        Owner {
            gen: AtomicU64::new(GEN.load(Ordering::Acquire)),
            lost: AtomicBool::new(false),
            claim: Mutex::new(None),
        }
    }
}

impl Owner {
    /// True if this process may use the connection, claiming it if a fork left it
    /// unclaimed.
    #[inline]
    pub(crate) fn check(&self) -> bool {
        if self.gen.load(Ordering::Relaxed) == GEN.load(Ordering::Relaxed) {
            return !self.lost.load(Ordering::Relaxed);
        }
        self.settle()
    }

    fn settle(&self) -> bool {
        let mut claim = self.claim.lock().unwrap_or_else(|p| p.into_inner());
        let now = GEN.load(Ordering::Acquire);
        if self.gen.load(Ordering::Relaxed) == now {
            return !self.lost.load(Ordering::Relaxed);
        }
        let me = std::process::id();
        let won = match claim.take() {
            Some((page, i)) => {
                let w = page.word(i);
                match w.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => true,
                    Err(owner) => owner == me,
                }
            }
            // No slot (the fork happened while another thread held this entry):
            // the parent keeps it.
            None => FORKER.load(Ordering::Relaxed) == me,
        };
        if !won {
            self.lost.store(true, Ordering::Relaxed);
            tracing::warn!(
                "vmc: a connection shared with another process after fork is owned by \
                 that process; using it here fails with EIO"
            );
        }
        self.gen.store(now, Ordering::Release);
        won
    }

    /// True if this process owns the connection without claiming anything: closing
    /// it here may then end it for everyone.
    pub(crate) fn owned_here(&self) -> bool {
        self.gen.load(Ordering::Relaxed) == GEN.load(Ordering::Relaxed)
            && !self.lost.load(Ordering::Relaxed)
    }
}

/// The fork handler, in the parent, before the fork: every connection this process
/// owns gets a claim slot in a page the child will share.
pub(crate) extern "C" fn prepare() {
    let Some(_g) = crate::enter() else { return };
    // Another thread may be opening the registry: let it finish first.
    vmc_conn::prepare_fork();
    FORKER.store(std::process::id(), Ordering::Relaxed);
    if !table::any() {
        // Nothing to hand out (and no 65536-slot scan for programs without vmc
        // descriptors).
        GEN.fetch_add(1, Ordering::AcqRel);
        return;
    }
    let mut owned: Vec<Arc<Sock>> = Vec::new();
    table::for_each(|_, slot| {
        if let Some(sock) = slot.as_ref() {
            if let Sock::Stream(s) = &**sock {
                if s.owner.owned_here() && !owned.iter().any(|o| Arc::ptr_eq(o, sock)) {
                    owned.push(sock.clone());
                }
            }
        }
    });
    if let Some(page) = Page::new(owned.len()).map(Arc::new) {
        for (i, sock) in owned.iter().enumerate() {
            if let Sock::Stream(s) = &**sock {
                *s.owner.claim.lock().unwrap_or_else(|p| p.into_inner()) = Some((page.clone(), i));
            }
        }
    }
    GEN.fetch_add(1, Ordering::AcqRel);
}
