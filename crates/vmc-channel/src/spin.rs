//! The adaptive spin that precedes every sleep.
//!
//! A waiting end first spins, re-checking its ring, because a peer that answers
//! within microseconds is far cheaper to wait for than a sleep and a wake-up (a futex
//! round trip costs 5-40 us on a 2-vCPU VM, a cache-line round trip about 0.4 us).
//! Two rules keep the spin from hurting:
//!
//! - **Yield early.** After [`PURE_SPIN`], every further round calls `sched_yield`, so
//!   when more threads are runnable than there are cores, the peer we are waiting for
//!   gets this core instead of being starved by our spinning.
//! - **Yield at once when that is what works.** When the peer shares our core (more
//!   busy threads than cores, and the scheduler put both ends of this channel on
//!   one), it can only answer once we yield, and spinning first costs
//!   [`PURE_SPIN`] per turn. The spinner scores how its waits end: ready right
//!   after a yield counts for yielding at once, ready while purely spinning counts
//!   against; while the score says so, it yields from the first look at the clock.
//! - **Adapt.** The budget doubles (up to the configured maximum) when a wait ended
//!   soon after we gave up spinning (more spinning would have saved a sleep), and
//!   halves (down to [`MIN_BUDGET`]) when a wait outlasted the maximum (the spin was
//!   wasted). An idle channel therefore spins almost nothing before each sleep, and
//!   a busy one spins just long enough.

use std::time::{Duration, Instant};

/// Spinning without yielding for this long covers one request/response turnaround.
pub const PURE_SPIN: Duration = Duration::from_micros(4);

/// The budget never shrinks below this (unless spinning is disabled).
pub const MIN_BUDGET: Duration = Duration::from_micros(2);

/// Rounds between two reads of the clock.
const CLOCK_EVERY: u32 = 16;

/// How far the yield score goes either way (a few waits change the mode).
const SCORE_MAX: i8 = 4;

/// The yield score after a wait that ended ready: up if it ended right after a
/// yield (the peer ran because we gave it the core), down if it ended before any
/// yield (the peer runs elsewhere), unchanged otherwise.
fn rescore(score: i8, yielded: bool, just_yielded: bool) -> i8 {
    if just_yielded {
        (score + 1).min(SCORE_MAX)
    } else if !yielded {
        (score - 1).max(-SCORE_MAX)
    } else {
        score
    }
}

/// Per-waiter spin state.
#[derive(Clone, Debug)]
pub struct Spinner {
    max: Duration,
    budget: Duration,
    /// Positive: recent waits ended right after a yield (the peer shares our
    /// core), so yield at once; zero or negative: spin first.
    score: i8,
}

impl Spinner {
    /// A spinner that never spins longer than `max` (zero: never spins).
    pub fn new(max: Duration) -> Spinner {
        Spinner {
            max,
            budget: max,
            score: 0,
        }
    }

    /// True while this spinner yields from its first look at the clock.
    pub fn yields_first(&self) -> bool {
        self.score > 0
    }

    /// The current budget.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Calls `ready` until it says true or the budget is spent; returns whether it
    /// became ready. Errors from `ready` end the spin at once.
    pub fn spin<E>(&mut self, mut ready: impl FnMut() -> Result<bool, E>) -> Result<bool, E> {
        if ready()? {
            return Ok(true);
        }
        if self.budget.is_zero() {
            return Ok(false);
        }
        // The clock is read only once the first CLOCK_EVERY rounds have not been
        // enough: most waits on a busy channel end sooner, and a clock read costs as
        // much as the rest of the wait (tens of ns on a VM).
        let mut start: Option<Instant> = None;
        let mut round = 0u32;
        let pure = if self.yields_first() {
            Duration::ZERO
        } else {
            PURE_SPIN
        };
        let mut yielded = false;
        loop {
            round = round.wrapping_add(1);
            let mut just_yielded = false;
            if round % CLOCK_EVERY == 0 {
                let spent = start.get_or_insert_with(Instant::now).elapsed();
                // A signal that ends the wait: stop spinning, the caller reports it.
                if spent >= self.budget || vmc_os::interrupt::pending() {
                    return Ok(false);
                }
                if spent >= pure {
                    std::thread::yield_now();
                    yielded = true;
                    just_yielded = true;
                }
            }
            std::hint::spin_loop();
            if ready()? {
                self.score = rescore(self.score, yielded, just_yielded);
                return Ok(true);
            }
        }
    }

    /// Feeds back how a wait that included a sleep ended: `waited` is the whole
    /// time from the start of the spin to the condition becoming true.
    pub fn slept(&mut self, waited: Duration) {
        if self.max.is_zero() {
            return;
        }
        self.budget = if waited <= self.max {
            (self.budget * 2).min(self.max)
        } else {
            (self.budget / 2).max(MIN_BUDGET.min(self.max))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yield_score_follows_how_waits_end_and_is_bounded() {
        let mut s = 0;
        for _ in 0..10 {
            s = rescore(s, true, true);
        }
        assert_eq!(s, SCORE_MAX, "ready right after yields: yield first");
        s = rescore(s, true, false);
        assert_eq!(s, SCORE_MAX, "ready later on: no evidence either way");
        for _ in 0..(SCORE_MAX as usize + 1) {
            s = rescore(s, false, false);
        }
        assert!(s <= 0, "ready while purely spinning: spin first again");
        for _ in 0..10 {
            s = rescore(s, false, false);
        }
        assert_eq!(s, -SCORE_MAX);
        let mut sp = Spinner::new(Duration::from_micros(50));
        assert!(!sp.yields_first());
        sp.score = rescore(sp.score, true, true);
        assert!(sp.yields_first());
    }

    #[test]
    fn spin_stops_when_ready() {
        let mut s = Spinner::new(Duration::from_millis(100));
        let mut n = 0;
        assert_eq!(
            s.spin::<()>(|| {
                n += 1;
                Ok(n == 10)
            }),
            Ok(true)
        );
        assert_eq!(n, 10);
    }

    #[test]
    fn spin_gives_up_after_the_budget() {
        let mut s = Spinner::new(Duration::from_micros(200));
        let t = Instant::now();
        assert_eq!(s.spin::<()>(|| Ok(false)), Ok(false));
        assert!(t.elapsed() >= Duration::from_micros(200));
    }

    #[test]
    fn zero_budget_checks_once() {
        let mut s = Spinner::new(Duration::ZERO);
        let mut n = 0;
        assert_eq!(
            s.spin::<()>(|| {
                n += 1;
                Ok(false)
            }),
            Ok(false)
        );
        assert_eq!(n, 1);
        s.slept(Duration::from_micros(1));
        assert_eq!(s.budget(), Duration::ZERO);
    }

    #[test]
    fn budget_shrinks_on_long_waits_and_regrows_on_short_ones() {
        let max = Duration::from_micros(64);
        let mut s = Spinner::new(max);
        for _ in 0..20 {
            s.slept(Duration::from_millis(10));
        }
        assert_eq!(s.budget(), MIN_BUDGET);
        for _ in 0..20 {
            s.slept(Duration::from_micros(30));
        }
        assert_eq!(s.budget(), max);
    }

    #[test]
    fn errors_end_the_spin() {
        let mut s = Spinner::new(Duration::from_secs(10));
        assert_eq!(s.spin(|| Err::<bool, _>("boom")), Err("boom"));
    }
}
