//! Who owns a connection after `fork`, and how the other process asks for it.
//!
//! A forked child shares its parent's connections, but two processes must never
//! drive one ring end. Before the fork, each connection gets a *claim word* in a
//! page both processes map; the first of them to use the connection afterwards
//! claims it ([`Claim::claim`]: a compare-and-swap of 0 to its pid). When the other
//! one needs the connection too, it asks the owner to move it to TCP for good:
//!
//! ```text
//!   loser                                  owner (a helper thread)
//!   word |= REQUEST            (AcqRel)    seen = last count served
//!   requests += 1              (AcqRel)    requests == seen? futex-wait(requests, seen)
//!   futex-wake(requests)                   word has REQUEST, our pid, not SETTLED?
//!   until word has SETTLED     (Acquire)     move the connection to TCP
//!     wait                                   word |= SETTLED          (AcqRel)
//!   use the kernel socket                  seen = count just served
//! ```
//!
//! The request is set in the word before the count moves, and both are
//! acquire-release, so an owner that sees the new count sees the request; the
//! futex compares the count in the kernel, so a wake between the owner's look and
//! its sleep is not lost. SETTLED is released after everything the owner did to the
//! connection, and the loser acquires it before touching the socket. The loom
//! models (`tests/loom.rs`) check both, and that exactly one process wins a claim.
//!
//! The words live in memory another process can write; nothing here trusts more
//! than a word's bits (a bad value costs that connection its take-over, which then
//! times out).

use super::atomic::{AtomicU32, Ordering};

/// The bits of a claim word that hold the owner's pid (0: unclaimed).
pub const PID_MASK: u32 = (1 << 30) - 1;
/// The owner moved the connection to TCP for good.
const SETTLED: u32 = 1 << 30;
/// The other process asked the owner to move it.
const REQUEST: u32 = 1 << 31;

/// A claim word, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimState(u32);

impl ClaimState {
    /// The owner's pid (masked to [`PID_MASK`]), 0 if nobody claimed it.
    pub fn owner(self) -> u32 {
        self.0 & PID_MASK
    }

    /// The owner moved the connection to TCP.
    pub fn settled(self) -> bool {
        self.0 & SETTLED != 0
    }

    /// Another process asked for the connection.
    pub fn requested(self) -> bool {
        self.0 & REQUEST != 0
    }
}

/// One connection's claim word (in a page shared by the processes of one fork).
#[derive(Clone, Copy)]
pub struct Claim<'a> {
    word: &'a AtomicU32,
}

impl<'a> Claim<'a> {
    /// The claim kept in `word`.
    pub fn new(word: &'a AtomicU32) -> Claim<'a> {
        Claim { word }
    }

    /// The word as it is now.
    pub fn state(self) -> ClaimState {
        ClaimState(self.word.load(Ordering::Acquire))
    }

    /// Claims the connection for `pid` if nobody has: true if `pid` owns it now
    /// (it won, or had won before).
    pub fn claim(self, pid: u32) -> bool {
        let me = pid & PID_MASK;
        match self
            .word
            .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(owner) => ClaimState(owner).owner() == me,
        }
    }

    /// The loser asks the owner for the connection; returns the word as it was
    /// (already settled: go on; otherwise bump [`Requests`] and wait).
    pub fn request(self) -> ClaimState {
        ClaimState(self.word.fetch_or(REQUEST, Ordering::AcqRel))
    }

    /// True if `pid` owns the connection and was asked for it, and has not
    /// settled it yet.
    pub fn requested_of(self, pid: u32) -> bool {
        let s = self.state();
        s.requested() && !s.settled() && s.owner() == pid & PID_MASK
    }

    /// The owner `pid` has moved the connection to TCP: tells the other process
    /// (everything it did before is visible to whoever sees this). Does nothing
    /// if `pid` does not own it.
    pub fn mark_settled(self, pid: u32) {
        if self.state().owner() == pid & PID_MASK {
            self.word.fetch_or(SETTLED, Ordering::AcqRel);
        }
    }
}

/// The count of requests a process tree has made (one shared word, on which the
/// owners' helper threads sleep with a futex).
#[derive(Clone, Copy)]
pub struct Requests<'a> {
    word: &'a AtomicU32,
}

impl<'a> Requests<'a> {
    /// The count kept in `word`.
    pub fn new(word: &'a AtomicU32) -> Requests<'a> {
        Requests { word }
    }

    /// The word itself, for the futex calls.
    pub fn word(self) -> &'a AtomicU32 {
        self.word
    }

    /// Counts a request made (after [`Claim::request`]); then wake the word's
    /// sleepers.
    pub fn ask(self) {
        self.word.fetch_add(1, Ordering::AcqRel);
    }

    /// The count now: requests are pending if it differs from the count last
    /// served, and the claim words of any made before it are visible.
    pub fn count(self) -> u32 {
        self.word.load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_claim_wins_and_the_winner_settles_on_request() {
        let w = AtomicU32::new(0);
        let c = Claim::new(&w);
        assert!(c.claim(7));
        assert!(c.claim(7), "the winner keeps it");
        assert!(!c.claim(8));
        assert!(!c.requested_of(7));
        let before = c.request();
        assert_eq!((before.owner(), before.settled()), (7, false));
        assert!(c.requested_of(7));
        assert!(!c.requested_of(8));
        c.mark_settled(8);
        assert!(!c.state().settled(), "only the owner settles");
        c.mark_settled(7);
        assert!(c.state().settled());
        assert!(!c.requested_of(7), "served");
    }

    #[test]
    fn pids_beyond_the_mask_compare_masked() {
        let w = AtomicU32::new(0);
        let c = Claim::new(&w);
        assert!(c.claim(PID_MASK + 1 + 5));
        assert_eq!(c.state().owner(), 5);
        assert!(c.claim(5));
    }
}
