//! The sleep/wake protocol: a sleeper is woken only if it said it is about to sleep,
//! and no wake-up is ever lost.
//!
//! Each direction of a ring has two *sleep words* (see [`crate::layout::RingState`]):
//! one for a consumer waiting for data, one for a producer waiting for space. The
//! protocol is the classic event count, argued here once for both:
//!
//! ```text
//!   sleeper                              waker
//!   1. word = SLEEPING                   a. publish (tail or head), release
//!   2. fence(SeqCst)                     b. fence(SeqCst)
//!   3. re-check the condition            c. if word == SLEEPING and
//!      if true: word = AWAKE, go on           cas(word, SLEEPING -> AWAKE): wake
//!   4. sleep while word == SLEEPING
//! ```
//!
//! The two SeqCst fences order (1, 3) and (a, c) in one total order: either the
//! sleeper's re-check (3) sees the waker's publication (a), or the waker's check (c)
//! sees the sleeper's announcement (1) and wakes it. Step 4 is a futex wait that
//! returns at once if the word is no longer SLEEPING, so a wake that lands between 3
//! and 4 is not lost either; with an eventfd the token stays in the counter. The
//! compare-and-swap in (c) makes at most one wake system call per sleep, and writes
//! nothing when the sleeper already withdrew. A sleeper always re-checks
//! after waking, so spurious wake-ups (timeouts, signals, a peer scribbling on the
//! word) cost a loop, never correctness.
//!
//! The waker side costs one fence and one load of a line the sleeper writes only when
//! it goes to sleep, so a busy channel makes no system calls at all.
//!
//! `tests/loom.rs` checks this protocol under every interleaving loom explores.

use crate::sync::{fence, AtomicU32, Ordering};

/// The value of a sleep word while nobody sleeps on it.
pub const AWAKE: u32 = 0;
/// The value a sleeper stores before it re-checks its condition and sleeps.
pub const SLEEPING: u32 = 1;

/// Sleeper, step 1-2: announce the intent to sleep. Re-check the condition next.
#[inline]
pub fn announce(word: &AtomicU32) {
    word.store(SLEEPING, Ordering::Relaxed);
    fence(Ordering::SeqCst);
}

/// Sleeper, step 3 when the condition turned out true, or after waking: withdraw
/// the announcement.
#[inline]
pub fn retract(word: &AtomicU32) {
    word.store(AWAKE, Ordering::Relaxed);
}

/// Waker, steps b-c, after publishing: does the peer need a wake-up call?
///
/// Returns true at most once per announcement; the caller then wakes the peer
/// (futex wake on `word`, or a write to the peer's eventfd).
#[inline]
pub fn should_wake(word: &AtomicU32) -> bool {
    fence(Ordering::SeqCst);
    word.load(Ordering::Relaxed) == SLEEPING
        && word
            .compare_exchange(SLEEPING, AWAKE, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_wake_is_owed_once_per_announcement() {
        let w = AtomicU32::new(AWAKE);
        assert!(!should_wake(&w));
        announce(&w);
        assert!(should_wake(&w));
        assert!(!should_wake(&w));
        announce(&w);
        retract(&w);
        assert!(!should_wake(&w));
    }

    #[test]
    fn garbage_in_the_word_never_asks_for_a_wake() {
        let w = AtomicU32::new(0xdead_beef);
        assert!(!should_wake(&w));
    }
}
