//! Connections after `fork`: which process owns the rings, and how the other one
//! gets to use the connection too.
//!
//! A forked child shares its parent's descriptors, and vmc's connection state is
//! copied into it with the rest of memory, rings included. Two processes must never
//! drive one ring end (their private indices would diverge), so each accelerated
//! connection has exactly one owner: the first of the two processes to use it after
//! the fork. The common patterns cost nothing: the parent goes on and the child
//! execs or exits; or the parent hands the connection to the child and closes its
//! copy (a pre-forking server).
//!
//! When the other process uses the connection too, both must get what TCP gives
//! them: one kernel socket they share. So the loser asks the owner to move the
//! connection to TCP for good (`TcpStream::settle_on_tcp`, exact at the byte), waits
//! until it has, and from then on both use the kernel socket as it is:
//!
//! 1. the loser sets REQUEST in the connection's claim word, bumps the process
//!    tree's request counter and kicks the connection (every wake-up descriptor of
//!    it, which the processes share), so an owner asleep in a read, a write or an
//!    event loop wakes up;
//! 2. the owner notices the counter (a helper thread it started when it won its
//!    first forked connection sleeps on it; its own threads look at it at every
//!    call into vmc and as their waits end, since it is part of the
//!    [`vmc_os::interrupt`] check), settles every connection it owns that has a
//!    REQUEST (a thread of its own blocked on one comes out of its wait first),
//!    and sets SETTLED;
//! 3. the loser, seeing SETTLED, forgets the connection: its calls go to the
//!    kernel. An owner that exits settles its forked connections on the way out, so
//!    a connection a child wrote to before exiting goes on in the parent.
//!
//! If the owner does not answer within [`TAKE_OVER_WAIT`] (it is stopped, busy
//! outside vmc, or died without exiting normally), the loser's call fails with
//! `EIO`, never with torn data.
//!
//! Arbitration: before the fork (the `pthread_atfork` prepare handler) every
//! connection the parent owns gets a slot in a fresh page that both processes will
//! share (`MAP_SHARED | MAP_ANONYMOUS`); the first use after the fork claims the slot
//! with a compare-and-swap of 0 to its pid. A connection that no process claims
//! before one drops it is abandoned there: that process closes its descriptors and
//! leaves the shared state to the other. Until the next fork, checking ownership
//! costs one comparison with a process-wide generation number.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmc_os::sync::{Claim, Requests};

use crate::table::{self, Sock};

/// Bumped by every fork (in the parent, before it; the child inherits the value).
static GEN: AtomicU64 = AtomicU64::new(0);
/// The pid of the process that last forked (the parent of the latest fork).
static FORKER: AtomicU32 = AtomicU32::new(0);

/// How long a process that does not own a forked connection waits for the owner
/// to move it to TCP before its call fails with `EIO`.
pub(crate) const TAKE_OVER_WAIT: Duration = Duration::from_secs(2);

/// Claim pages a connection remembers (one per fork since it was made; the
/// oldest are forgotten, and their other processes can no longer take over).
const MAX_CLAIMS: usize = 16;

/// A page of shared words: claim words (one per connection of one fork), or the
/// request counter.
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

    fn claim(&self, i: usize) -> Claim<'_> {
        Claim::new(self.word(i))
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `new` mapped, which no reference
        // outlives (words are only borrowed from `&self`).
        unsafe { libc::munmap(self.words.cast(), (self.len * 4).max(1)) };
    }
}

/// The request counter this process shares with the processes forked from it
/// (created at the library's set-up, so before any fork that copies a connection),
/// and the value this process last served.
/// (An atomic pointer, not a `OnceLock`: a fork must never catch it half set.)
static REQUESTS: AtomicPtr<Page> = AtomicPtr::new(std::ptr::null_mut());
static SEEN: AtomicU32 = AtomicU32::new(0);

/// Creates the request counter (at set-up, see `crate::init`).
pub(crate) fn init() {
    if !REQUESTS.load(Ordering::Acquire).is_null() {
        return;
    }
    if let Some(page) = Page::new(1) {
        let p = Box::into_raw(Box::new(page));
        if REQUESTS
            .compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // SAFETY: `p` came from `Box::into_raw` just above and was not shared.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

fn requests() -> Option<Requests<'static>> {
    let p = REQUESTS.load(Ordering::Acquire);
    // SAFETY: a non-null pointer here came from `Box::into_raw` in `init` and is
    // never freed (the counter lives as long as the process).
    let page = unsafe { p.as_ref() }?;
    Some(Requests::new(page.word(0)))
}

/// True if another process asked for a connection since this one last looked:
/// one load of a shared word. Part of the `vmc_os::interrupt` check, so that a
/// wait in vmc ends and the hook serves it.
#[inline]
pub(crate) fn requests_pending() -> bool {
    requests().is_some_and(|r| r.count() != SEEN.load(Ordering::Relaxed))
}

/// A connection's ownership across forks.
pub struct Owner {
    /// The generation at which this process last knew it owns the connection.
    gen: AtomicU64,
    /// Set once another process won the connection.
    lost: AtomicBool,
    /// Claim slots, oldest first; the last is the latest fork's, which the next
    /// use settles if the generation moved.
    claims: Mutex<Vec<(Arc<Page>, usize)>>,
    /// A fork happened since the connection was made: exit settles it.
    forked: AtomicBool,
}

impl Default for Owner {
    fn default() -> Owner {
        Owner {
            gen: AtomicU64::new(GEN.load(Ordering::Acquire)),
            lost: AtomicBool::new(false),
            claims: Mutex::new(Vec::new()),
            forked: AtomicBool::new(false),
        }
    }
}

impl Owner {
    fn claims(&self) -> std::sync::MutexGuard<'_, Vec<(Arc<Page>, usize)>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

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
        let claims = self.claims();
        let now = GEN.load(Ordering::Acquire);
        if self.gen.load(Ordering::Relaxed) == now {
            return !self.lost.load(Ordering::Relaxed);
        }
        let won = match claims.last() {
            Some((page, i)) if !self.lost.load(Ordering::Relaxed) => {
                page.claim(*i).claim(std::process::id())
            }
            Some(_) => false,
            // No slot (the fork happened while another thread held this entry):
            // the parent keeps it.
            None => FORKER.load(Ordering::Relaxed) == std::process::id(),
        };
        if !won {
            self.lost.store(true, Ordering::Relaxed);
        }
        self.gen.store(now, Ordering::Release);
        if won && !claims.is_empty() {
            // Another process may ask for it: be there to answer.
            ensure_helper();
        }
        won
    }

    /// True if this process owns the connection without claiming anything: closing
    /// it here may then end it for everyone.
    pub(crate) fn owned_here(&self) -> bool {
        self.gen.load(Ordering::Relaxed) == GEN.load(Ordering::Relaxed)
            && !self.lost.load(Ordering::Relaxed)
    }

    /// The claim this process lost, if it lost one.
    fn lost_claim<R>(&self, f: impl FnOnce(Claim<'_>) -> R) -> Option<R> {
        if !self.lost.load(Ordering::Relaxed) {
            return None;
        }
        let claims = self.claims();
        let (page, i) = claims.last()?;
        Some(f(page.claim(*i)))
    }

    /// The owner moved the connection to TCP for good: this process may use the
    /// kernel socket as it is.
    pub(crate) fn settled_elsewhere(&self) -> bool {
        self.lost_claim(|c| c.state().settled()).unwrap_or(false)
    }

    /// Another process asked this (owning) process to move the connection to TCP.
    fn requested(&self) -> bool {
        let me = std::process::id();
        // Our pid in the word is what says we own it (the claim may be finishing
        // on another thread right now: the generation is stored after the word).
        !self.lost.load(Ordering::Relaxed)
            && self
                .claims()
                .iter()
                .any(|(page, i)| page.claim(*i).requested_of(me))
    }

    /// Marks every claim this process holds as settled.
    pub(crate) fn mark_settled(&self) {
        let me = std::process::id();
        for (page, i) in self.claims().iter() {
            page.claim(*i).mark_settled(me);
        }
    }
}

/// Called where this process uses a connection another process owns: asks the
/// owner to move it to TCP (see the module documentation) and waits for it. True
/// once the connection is settled on TCP (the caller then forgets it and goes to
/// the kernel); false if the owner did not answer in time (the call fails with
/// `EIO`).
pub(crate) fn take_over(s: &crate::table::Stream) -> bool {
    let Some(owner) = s.owner.lost_claim(|c| c.request()) else {
        return false;
    };
    if owner.settled() {
        return true;
    }
    tracing::debug!(
        owner = owner.owner(),
        "a forked connection owned by another process: asking it to move to TCP"
    );
    if let Some(r) = requests() {
        r.ask();
        let _ = vmc_os::futex_wake(r.word(), u32::MAX);
    }
    let started = Instant::now();
    let mut kicks = 0u32;
    while started.elapsed() < TAKE_OVER_WAIT {
        if s.owner.settled_elsewhere() {
            return true;
        }
        // Now and then again: an owner between two waits misses one kick.
        if kicks % 20 == 0 {
            s.kick();
        }
        kicks += 1;
        let pid = owner.owner() as libc::pid_t;
        // SAFETY: signal 0 only checks that the process exists.
        if pid > 0 && unsafe { libc::kill(pid, 0) } != 0 && crate::errno() == libc::ESRCH {
            // Gone without settling (killed, or `_exit`): nobody can move the rings.
            return s.owner.settled_elsewhere();
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    tracing::warn!(
        "a forked connection owned by process {} did not move to TCP within {:?}: \
         this process's calls on it fail with EIO",
        owner.owner(),
        TAKE_OVER_WAIT
    );
    false
}

/// The pid of the process whose helper thread runs (none yet: 0).
static HELPER: AtomicU32 = AtomicU32::new(0);

/// Starts this process's helper thread if it has none: it sleeps on the request
/// counter and serves requests, so an owner answers even while its own threads
/// are busy elsewhere or blocked outside vmc (a parent waiting for its child).
fn ensure_helper() {
    let me = std::process::id();
    if HELPER.load(Ordering::Acquire) == me || HELPER.swap(me, Ordering::AcqRel) == me {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("vmc-fork".into())
        .spawn(|| {
            // This thread runs no program code: everything it does is vmc's.
            let Some(_g) = crate::enter() else { return };
            let Some(r) = requests() else { return };
            loop {
                let seen = SEEN.load(Ordering::Acquire);
                if r.count() == seen {
                    let _ = vmc_os::futex_wait(r.word(), seen, Some(Duration::from_secs(1)));
                    continue;
                }
                if !serve_requests() || SEEN.load(Ordering::Acquire) == seen {
                    // Not all moved yet (a thread of ours holds one): again soon.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
    if let Err(e) = spawned {
        tracing::debug!("no helper thread for forked connections: {e}");
        HELPER.store(0, Ordering::Release);
    }
}

/// Serves other processes' requests (see the module documentation): every
/// connection this process owns that was asked for moves to TCP for good. True if
/// requests were pending (a wait that ended for them should be retried, not
/// reported as `EINTR`). They stay pending, and every wait in this process keeps
/// ending, until each asked-for connection has moved: a thread of ours blocked on
/// one must come out of its wait and let go of it first.
pub(crate) fn serve_requests() -> bool {
    let Some(r) = requests() else { return false };
    let now = r.count();
    if now == SEEN.load(Ordering::Acquire) {
        return false;
    }
    tracing::debug!(
        pid = std::process::id(),
        "requests for forked connections pending ({now})"
    );
    if settle_where(|s| s.owner.requested(), Duration::from_millis(100)) {
        SEEN.store(now, Ordering::Release);
    }
    true
}

/// Moves to TCP, for good, every owned connection `pick` selects, then marks it
/// settled for the processes sharing it. True if all of them moved (one that
/// another thread of ours holds for longer than `patience` does not).
fn settle_where(pick: impl Fn(&crate::table::Stream) -> bool, patience: Duration) -> bool {
    let mut chosen: Vec<Arc<Sock>> = Vec::new();
    table::for_each_waiting(|_, sock| {
        if let Sock::Stream(s) = &**sock {
            if pick(s) && !chosen.iter().any(|c| Arc::ptr_eq(c, sock)) {
                chosen.push(sock.clone());
            }
        }
    });
    tracing::debug!(
        pid = std::process::id(),
        chosen = chosen.len(),
        "settling forked connections"
    );
    let mut all = true;
    for sock in chosen {
        if let Sock::Stream(s) = &*sock {
            // A thread of ours asleep on it wakes, sees the request pending and
            // lets go of the connection.
            s.kick();
            match s.settle_on_tcp_or_wait(patience) {
                Ok(()) => {
                    tracing::debug!(
                        pid = std::process::id(),
                        "moved a forked connection to TCP for another process"
                    );
                    s.owner.mark_settled();
                }
                Err(e) => {
                    tracing::debug!("moving a forked connection to TCP: {e} (trying again)");
                    all = false;
                }
            }
        }
    }
    all
}

/// At exit: connections shared with another process since a fork move to TCP, so
/// that process can go on using them (what a child wrote before exiting stays
/// before what its parent writes next).
pub(crate) fn settle_at_exit() {
    if !table::any() {
        return;
    }
    // On a thread of its own: exit has destroyed this thread's thread-locals
    // already (glibc runs their destructors before `atexit` handlers), and the
    // connection layer and its logging use some.
    let worker = std::thread::Builder::new()
        .name("vmc-exit".into())
        .spawn(|| {
            let Some(_g) = crate::enter() else { return };
            settle_where(
                |s| s.owner.forked.load(Ordering::Relaxed) && s.owner.owned_here() && !s.is_plain(),
                Duration::from_millis(500),
            );
        });
    if let Ok(w) = worker {
        let _ = w.join();
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
    let page = Page::new(owned.len()).map(Arc::new);
    if let Some(page) = &page {
        for (i, sock) in owned.iter().enumerate() {
            if let Sock::Stream(s) = &**sock {
                let mut claims = s.owner.claims();
                if claims.len() == MAX_CLAIMS {
                    claims.remove(0);
                }
                claims.push((page.clone(), i));
                s.owner.forked.store(true, Ordering::Relaxed);
            }
        }
    }
    // From here a thread that starts a call claims its connection (the
    // generation moved, so its check claims) before the fork: for the parent.
    GEN.fetch_add(1, Ordering::AcqRel);
    // A thread inside a call right now (blocked in a read, say) goes on with it
    // in the parent after the fork, with no new call to claim the connection
    // there; the child's first use would claim it instead, and two processes
    // would drive its rings. Its connection is this process's: claimed now,
    // before the child can. (A thread between its check and its lock is missed:
    // a window of a few instructions.)
    if let Some(page) = &page {
        let me = std::process::id();
        for (i, sock) in owned.iter().enumerate() {
            if let Sock::Stream(s) = &**sock {
                if s.in_use() {
                    page.claim(i).claim(me);
                }
            }
        }
    }
}
