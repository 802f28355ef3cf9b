//! Model checks of the synchronisation words in `vmc_os::sync` under every
//! interleaving loom explores (bounded by `PREEMPTIONS`): the direction lock, the
//! bells' eventcount, and the claim word and request count of forked connections.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p vmc-os --release --test loom`.
//!
//! Kernel waits are modelled here, as the kernel gives them: a futex is a mutex and
//! a condition variable (`wait` compares the word under the lock), an eventfd a flag
//! under a mutex. A wake-up the protocol loses leaves a thread blocked for good,
//! which loom reports as a deadlock; the `should_panic` models show that it does.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use vmc_os::sync::{Claim, DirLock, EventCount, Requests};

/// Every protocol bug these models look for needs at most two context switches at
/// the wrong place (a lost wake-up needs one); 3 keeps the file at seconds.
const PREEMPTIONS: usize = 3;

fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut b = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        b.preemption_bound = Some(PREEMPTIONS);
    }
    b.check(f);
}

/// A futex: `wait` returns at once if the word no longer holds `expected` (checked
/// under the lock, as the kernel checks under its bucket's), `wake` wakes all.
struct Futex {
    lock: Mutex<()>,
    cv: Condvar,
}

impl Futex {
    fn new() -> Futex {
        Futex {
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    fn wait(&self, word: &AtomicU32, expected: u32) {
        let g = self.lock.lock().unwrap();
        if word.load(Ordering::Relaxed) != expected {
            return;
        }
        drop(self.cv.wait(g).unwrap());
    }

    fn wake(&self) {
        let _g = self.lock.lock().unwrap();
        self.cv.notify_all();
    }
}

/// An eventfd: `notify` leaves a token that the next `wait` takes.
struct EventFd {
    token: Mutex<bool>,
    cv: Condvar,
}

impl EventFd {
    fn new() -> Arc<EventFd> {
        Arc::new(EventFd {
            token: Mutex::new(false),
            cv: Condvar::new(),
        })
    }

    fn notify(&self) {
        *self.token.lock().unwrap() = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let mut t = self.token.lock().unwrap();
        while !*t {
            t = self.cv.wait(t).unwrap();
        }
        *t = false;
    }
}

// ---------------------------------------------------------------------------
// DirLock

/// Two threads each add one under the lock, with a read and a write of the value
/// apart: loom's cell reports two guards at once, a lost update shows in the sum,
/// and a thread that never gets the lock as a model that does not end.
#[test]
fn the_direction_lock_admits_one_holder_and_everyone_in_turn() {
    model(|| {
        let l = Arc::new(DirLock::new(0u32));
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                thread::spawn(move || {
                    let mut g = l.lock();
                    let v = *g;
                    *g = v + 1;
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), 2);
    });
}

/// `try_lock` never succeeds while another guard lives, and what the holder wrote
/// is what the next holder reads.
#[test]
fn try_lock_fails_while_held_and_sees_the_last_holders_writes() {
    model(|| {
        let l = Arc::new(DirLock::new(0u32));
        let held = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, held) = (l.clone(), held.clone());
            thread::spawn(move || {
                let mut g = l.lock();
                held.store(true, Ordering::Relaxed);
                *g = 7;
                held.store(false, Ordering::Relaxed);
            })
        };
        if let Some(g) = l.try_lock() {
            assert!(!held.load(Ordering::Relaxed));
            assert!(*g == 0 || *g == 7);
        }
        t.join().unwrap();
        assert_eq!(*l.try_lock().unwrap(), 7);
    });
}

// ---------------------------------------------------------------------------
// EventCount

/// The bells' protocol, as `vmc_conn`'s receive and send waits run it: the sleeper
/// marks, looks, registers its eventfd, and sleeps on it unless the count moved;
/// the ringer changes the state (relaxed: the eventcount must order it) and
/// notifies whoever `ring` returns. It rings twice, so a notification left over
/// from a sleep that ended otherwise meets the sleeper's next sleep.
fn eventcount_model(ring: fn(&EventCount<Arc<EventFd>>) -> Option<Arc<EventFd>>) {
    model(move || {
        let ec = Arc::new(EventCount::<Arc<EventFd>>::default());
        let state = Arc::new(AtomicU32::new(0));
        let ringer = {
            let (ec, state) = (ec.clone(), state.clone());
            thread::spawn(move || {
                for v in 1..=2 {
                    state.store(v, Ordering::Relaxed);
                    if let Some(efd) = ring(&ec) {
                        efd.notify();
                    }
                }
            })
        };
        let efd = EventFd::new();
        loop {
            let mark = ec.mark();
            if state.load(Ordering::Relaxed) == 2 {
                break;
            }
            if ec.sleep(mark, efd.clone()) {
                efd.wait();
            }
            ec.unregister();
        }
        ringer.join().unwrap();
    });
}

#[test]
fn a_sleeper_on_an_eventcount_is_always_woken() {
    eventcount_model(|ec| ec.ring());
}

/// The model finds a lost wake-up: a ringer that never notifies leaves the sleeper
/// blocked.
#[test]
#[should_panic]
fn the_eventcount_model_catches_a_ringer_that_does_not_notify() {
    eventcount_model(|ec| {
        ec.ring();
        None
    });
}

// ---------------------------------------------------------------------------
// Claim and Requests

const PARENT: u32 = 100;
const CHILD: u32 = 200;

/// Parent and child use a forked connection at once: exactly one wins its claim,
/// and both then agree on who it is.
#[test]
fn exactly_one_process_wins_a_claim() {
    model(|| {
        let word = Arc::new(AtomicU32::new(0));
        let child = {
            let word = word.clone();
            thread::spawn(move || Claim::new(&word).claim(CHILD))
        };
        let parent_won = Claim::new(&word).claim(PARENT);
        let child_won = child.join().unwrap();
        assert!(parent_won ^ child_won, "one winner");
        let owner = Claim::new(&word).state().owner();
        assert_eq!(owner, if parent_won { PARENT } else { CHILD });
        assert!(Claim::new(&word).claim(owner));
    });
}

/// The take-over: the child lost the claim and asks for the connection; the
/// parent's helper thread sleeps on the request count, serves the request (the
/// "connection" is a cell it writes, as settling changes the connection's state)
/// and marks it settled; the child then reads the cell. Loom reports a child
/// that reads before the parent's write is visible, and a helper asleep for good
/// (a request it missed).
fn take_over_model(ask: fn(Requests<'_>, &Futex)) {
    model(move || {
        let word = Arc::new(AtomicU32::new(0));
        let count = Arc::new(AtomicU32::new(0));
        let futex = Arc::new(Futex::new());
        let conn = Arc::new(UnsafeCell::new(0u32));
        assert!(Claim::new(&word).claim(PARENT));

        let helper = {
            let (word, count, futex, conn) =
                (word.clone(), count.clone(), futex.clone(), conn.clone());
            thread::spawn(move || {
                let (claim, requests) = (Claim::new(&word), Requests::new(&count));
                let mut seen = 0;
                loop {
                    if requests.count() == seen {
                        futex.wait(requests.word(), seen);
                        continue;
                    }
                    let now = requests.count();
                    if claim.requested_of(PARENT) {
                        // SAFETY: loom checks that no access overlaps this one.
                        conn.with_mut(|c| unsafe { *c = 42 });
                        claim.mark_settled(PARENT);
                        return;
                    }
                    seen = now;
                }
            })
        };

        let (claim, requests) = (Claim::new(&word), Requests::new(&count));
        assert!(!claim.claim(CHILD));
        let before = claim.request();
        assert!(!before.settled());
        ask(requests, &futex);
        while !claim.state().settled() {
            thread::yield_now();
        }
        // SAFETY: loom checks that no access overlaps this one.
        conn.with(|c| assert_eq!(unsafe { *c }, 42));
        helper.join().unwrap();
    });
}

#[test]
fn a_take_over_is_served_and_sees_everything_the_owner_did() {
    take_over_model(|requests, futex| {
        requests.ask();
        futex.wake();
    });
}

/// The model finds a lost request: counting it without waking the helper leaves
/// it asleep.
#[test]
#[should_panic]
fn the_take_over_model_catches_a_request_nobody_wakes_for() {
    take_over_model(|requests, _futex| requests.ask());
}
