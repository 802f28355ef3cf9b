//! The sending direction: which path it is on, where it may move, and what a REWIND
//! asks of it.

use super::{ix, Violation};
use crate::wire::{Control, Path, Switch};

/// The peer's request to have the ring's unread bytes again, on TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rewinding {
    /// None came.
    No,
    /// One came from this ring offset and is not served yet.
    Asked(u64),
    /// Served (only the first one counts; later ones are ignored).
    Served,
}

/// What serving a REWIND takes, decided by [`Sender::serve_rewind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rewind {
    /// Take the ring's bytes from `from` on back (pausing the ring first if `pause`)
    /// and put them on TCP ahead of anything else ([`Sender::backlog_sent`] once
    /// they are all there).
    Resend { from: u64, pause: bool },
    /// The peer read everything the ring carried: nothing to send again.
    Nothing,
    /// The ring's bytes `from..at` cannot be sent again: later bytes went on TCP
    /// already. (The receiver settled while our move off the ring was in flight.)
    Lost { from: u64, at: u64 },
}

/// What a shutdown of the sending direction takes, from [`Sender::shutdown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shut {
    /// This is the first shutdown: end the stream on the ring too.
    pub(crate) first: bool,
    /// TCP's FIN must wait: the ring carries the end of the stream, or a REWIND's
    /// bytes must go on TCP first. It is sent when [`Sender::backlog_sent`] or
    /// [`Sender::take_fin`] says so.
    pub(crate) fin_waits: bool,
}

/// Whether the direction was shut down, and whether TCP still owes its FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shutdown {
    Open,
    /// Shut; the FIN waits (see [`Shut::fin_waits`]).
    FinOwed,
    /// Shut, and the FIN sent or handed to the caller.
    Done,
}

/// Whether the control channel can still carry frames between the two ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ctl {
    Open,
    /// The peer's end closed (it exited or exec'd), after every frame it sent
    /// before: no answer or REWIND comes any more, and no move can be announced.
    Closed,
}

/// The protocol state of this end's sending direction.
#[derive(Clone, Debug)]
pub(crate) struct Sender {
    path: Path,
    /// Where this end wants the direction to be.
    want: Path,
    /// Bytes put on each path (`[tcp, shm]`) since the connection began.
    sent: [u64; 2],
    /// Our moves off each path, and the offset of the last one.
    moves_off: [u64; 2],
    left_at: [u64; 2],
    /// The peer's LEFT answers: how many of those moves it followed.
    followed: [u64; 2],
    /// The peer asked for TCP for good: never back to the ring.
    for_good: bool,
    rewinding: Rewinding,
    /// `sent[tcp]` when we last moved off the ring: while it is unchanged, nothing
    /// followed the ring's bytes on TCP, and a late REWIND can still be served.
    tcp_mark: u64,
    shutdown: Shutdown,
    /// A REWIND's bytes are not all on TCP yet.
    backlog: bool,
    /// The ring offset our last SPILL named.
    spilled_at: Option<u64>,
    ctl: Ctl,
}

impl Default for Sender {
    fn default() -> Self {
        Sender::new()
    }
}

impl Sender {
    /// A direction that starts on TCP and wants the ring.
    pub(crate) fn new() -> Sender {
        Sender {
            path: Path::Tcp,
            want: Path::Shm,
            sent: [0; 2],
            moves_off: [0; 2],
            left_at: [0; 2],
            followed: [0; 2],
            for_good: false,
            rewinding: Rewinding::No,
            tcp_mark: 0,
            shutdown: Shutdown::Open,
            backlog: false,
            spilled_at: None,
            ctl: Ctl::Open,
        }
    }

    pub(crate) fn path(&self) -> Path {
        self.path
    }

    /// The path this end wants: the next write moves there first.
    pub(crate) fn wants(&self) -> Path {
        self.want
    }

    #[cfg(test)]
    pub(crate) fn for_good(&self) -> bool {
        self.for_good
    }

    pub(crate) fn is_shut(&self) -> bool {
        self.shutdown != Shutdown::Open
    }

    /// Bytes put on `path` so far.
    pub(crate) fn sent(&self, path: Path) -> u64 {
        self.sent[ix(path)]
    }

    /// Chooses the path; `Err` for the ring once the direction is on TCP for good,
    /// and for any other path once the control channel is closed.
    pub(crate) fn choose(&mut self, to: Path) -> Result<(), Refused> {
        if self.for_good && to == Path::Shm {
            return Err(Refused::ForGood);
        }
        if self.ctl == Ctl::Closed && to != self.path {
            return Err(Refused::ControlClosed);
        }
        self.want = to;
        Ok(())
    }

    /// A move could not be announced (the peer is gone): stay where we are.
    pub(crate) fn stay(&mut self) {
        self.want = self.path;
    }

    /// True if bytes must not go on TCP yet, unless the ring is empty: we left the
    /// ring and the peer has not said it read it to the end (LEFT_RING). Were it to
    /// stop reading the ring for good now (REWIND), the bytes it did not read must
    /// come on TCP before anything else, so nothing may go there first. The peer
    /// answers as soon as it has read the ring to the move; the driver waits for
    /// that answer (or a REWIND), or for the ring to be empty, which makes any
    /// REWIND ask for nothing.
    /// Once the control channel is closed, no REWIND can come, and nothing waits.
    pub(crate) fn tcp_waits_for_ring(&self) -> bool {
        self.path == Path::Tcp
            && self.ctl == Ctl::Open
            && self.rewinding == Rewinding::No
            && self.followed[1] < self.moves_off[1]
    }

    /// `n` bytes went out on the current path.
    pub(crate) fn wrote(&mut self, n: usize) {
        self.sent[ix(self.path)] += n as u64;
    }

    /// True if the peer followed every move of ours away from `to`, so that going
    /// back there cannot put bytes on it before the receiver knows where the last
    /// stretch on it ended; and no REWIND waits, which must be served first (a
    /// move off the ring would leave the bytes the peer asks for behind TCP's).
    /// A closed control channel can announce no move.
    pub(crate) fn may_move(&self, to: Path) -> bool {
        self.ctl == Ctl::Open
            && !self.rewind_asked()
            && self.followed[ix(to)] >= self.moves_off[ix(to)]
    }

    /// The SWITCH that announces a move to `to` now. The driver resumes the ring
    /// before sending it (to shm) or pauses the ring after (to TCP), then calls
    /// [`Sender::moved`].
    pub(crate) fn switch_to(&self, to: Path) -> Control {
        debug_assert_ne!(to, self.path);
        let from = match to {
            Path::Tcp => Path::Shm,
            Path::Shm => Path::Tcp,
        };
        Control::Switch(Switch {
            to,
            offset: self.sent(from),
        })
    }

    /// The move announced by [`Sender::switch_to`] is done.
    pub(crate) fn moved(&mut self, to: Path) {
        debug_assert!(self.may_move(to) && to != self.path);
        let from = ix(self.path);
        self.moves_off[from] += 1;
        self.left_at[from] = self.sent[from];
        self.path = to;
        if to == Path::Tcp {
            self.tcp_mark = self.sent[0];
        }
    }

    /// The peer's LEFT answer: it read `from` up to `offset` and left it.
    pub(crate) fn on_left(&mut self, from: Path, offset: u64) -> Result<(), Violation> {
        let i = ix(from);
        if self.followed[i] >= self.moves_off[i] {
            return Err(Violation("LEFT answer to a move that was not made"));
        }
        if offset != self.left_at[i] {
            return Err(Violation("LEFT answer at an offset the move did not name"));
        }
        self.followed[i] += 1;
        Ok(())
    }

    /// The peer's REWIND: it read the ring up to `from` and reads no more of it.
    /// Only the first one counts.
    pub(crate) fn on_rewind(&mut self, from: u64) {
        if self.rewinding == Rewinding::No {
            self.rewinding = Rewinding::Asked(from);
        }
    }

    /// A REWIND waits to be served.
    pub(crate) fn rewind_asked(&self) -> bool {
        matches!(self.rewinding, Rewinding::Asked(_))
    }

    /// Serves a queued REWIND: the direction moves to TCP for good, starting with
    /// every byte the peer did not read from the ring. `None` if none is queued.
    pub(crate) fn serve_rewind(&mut self) -> Result<Option<Rewind>, Violation> {
        let Rewinding::Asked(from) = self.rewinding else {
            return Ok(None);
        };
        self.rewinding = Rewinding::Served;
        self.want = Path::Tcp;
        self.for_good = true;
        let at = self.sent[1];
        if from > at {
            return Err(Violation("REWIND to a ring offset never written"));
        }
        let plan = match self.path {
            Path::Shm => {
                self.path = Path::Tcp;
                Rewind::Resend { from, pause: true }
            }
            // Already off the ring (both ends settled at once): still possible
            // while nothing followed on TCP.
            Path::Tcp if at != from && self.sent[0] == self.tcp_mark => {
                Rewind::Resend { from, pause: false }
            }
            Path::Tcp if at != from => Rewind::Lost { from, at },
            Path::Tcp => Rewind::Nothing,
        };
        if let Rewind::Resend { .. } = plan {
            self.backlog = true;
        }
        Ok(Some(plan))
    }

    /// True if revoking the ring ([`Sender::revoked`]) would leave the direction on
    /// TCP exactly, with no answer from the peer: the ring may hold bytes it has not
    /// read, and nothing went on TCP after them. That is while we are on the ring,
    /// or off it with the peer's answer to that move still missing and TCP unused
    /// since. Not once a REWIND came (the peer stopped reading the ring itself).
    pub(crate) fn revocable(&self) -> bool {
        self.rewinding == Rewinding::No
            && match self.path {
                Path::Shm => true,
                Path::Tcp => self.followed[1] < self.moves_off[1] && self.sent[0] == self.tcp_mark,
            }
    }

    /// The driver revoked the ring (`vmc_ring::Producer::revoke`), which ended the
    /// peer's reading at `at`: the direction is on TCP for good, and the bytes
    /// from `at` on go there first. Answers and REWINDs that come later are of
    /// no interest: the ring's stream ended where both ends agree.
    pub(crate) fn revoked(&mut self, at: u64) -> Result<Rewind, Violation> {
        debug_assert!(self.revocable());
        if at > self.sent[1] {
            return Err(Violation("the ring was revoked past what it carried"));
        }
        self.rewinding = Rewinding::Served;
        self.want = Path::Tcp;
        self.path = Path::Tcp;
        self.for_good = true;
        if at == self.sent[1] {
            return Ok(Rewind::Nothing);
        }
        self.backlog = true;
        Ok(Rewind::Resend {
            from: at,
            pause: false,
        })
    }

    /// Every byte a REWIND gave back is on TCP. True if TCP's FIN is due now.
    pub(crate) fn backlog_sent(&mut self) -> bool {
        self.backlog = false;
        self.for_good && self.take_fin()
    }

    /// A write has waited long for the peer: for room in the full ring, for its
    /// answer to a move (which it gives once it has read the ring to the move),
    /// or before TCP ([`Sender::tcp_waits_for_ring`]). The SPILL to send, once per
    /// ring offset (`None` if this one was named already, or once the peer's
    /// REWIND came): a peer that cannot read because it waits in a write itself answers
    /// with REWIND, which ends every one of these waits.
    pub(crate) fn spill(&mut self) -> Option<Control> {
        let at = self.sent[1];
        if self.ctl == Ctl::Closed || self.rewinding != Rewinding::No || self.spilled_at == Some(at)
        {
            return None;
        }
        self.spilled_at = Some(at);
        Some(Control::Spill(at))
    }

    /// The control channel closed, after every frame the peer sent before (see
    /// [`crate::control::Drained::Closed`]). The direction stays where it is: a
    /// REWIND not queued by now never comes, so TCP waits for nothing
    /// ([`Sender::tcp_waits_for_ring`]), and no move or SPILL can be announced. A
    /// REWIND that came before is still served.
    pub(crate) fn control_closed(&mut self) {
        self.ctl = Ctl::Closed;
        self.want = self.path;
    }

    /// This end moves its sending direction to TCP for good (before exec, or for
    /// another process after fork).
    /// Once the control channel is closed no move can be announced, so the
    /// direction stays where it is (the peer, gone or exec'd, reads the ring no
    /// more), and stays there for good.
    pub(crate) fn settle(&mut self) {
        if self.ctl == Ctl::Open {
            self.want = Path::Tcp;
        }
        self.for_good = true;
    }

    /// Shuts the direction down (`shutdown(SHUT_WR)`).
    pub(crate) fn shutdown(&mut self) -> Shut {
        let first = self.shutdown == Shutdown::Open;
        if first {
            self.shutdown = if self.path == Path::Shm || self.backlog {
                Shutdown::FinOwed
            } else {
                Shutdown::Done
            };
        }
        Shut {
            first,
            fin_waits: self.shutdown == Shutdown::FinOwed,
        }
    }

    /// True (once) if a FIN is owed: the caller sends it now.
    pub(crate) fn take_fin(&mut self) -> bool {
        let owed = self.shutdown == Shutdown::FinOwed;
        if owed {
            self.shutdown = Shutdown::Done;
        }
        owed
    }
}

/// Why [`Sender::choose`] refused a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The direction is on TCP for good: it cannot go back to the ring.
    ForGood,
    /// The control channel is closed: no move can be announced.
    ControlClosed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ring(s: &mut Sender) {
        assert!(s.may_move(Path::Shm));
        assert_eq!(
            s.switch_to(Path::Shm),
            Control::Switch(Switch {
                to: Path::Shm,
                offset: s.sent(Path::Tcp)
            })
        );
        s.moved(Path::Shm);
    }

    #[test]
    fn a_revoke_leaves_the_ring_for_tcp_exactly_without_the_peers_answer() {
        // On the ring, our move onto it unanswered: revocable.
        let mut s = Sender::new();
        s.wrote(3);
        on_ring(&mut s);
        s.wrote(10);
        assert!(!s.may_move(Path::Tcp), "a move needs LEFT_TCP first");
        assert!(s.revocable());
        assert!(s.revoked(11).is_err(), "past what the ring carried");
        assert_eq!(
            s.revoked(4),
            Ok(Rewind::Resend {
                from: 4,
                pause: false
            })
        );
        assert_eq!(
            (s.path(), s.wants(), s.for_good()),
            (Path::Tcp, Path::Tcp, true)
        );
        s.on_rewind(2);
        assert_eq!(s.serve_rewind(), Ok(None), "a later REWIND is ignored");
        assert!(!s.revocable());
        // Off the ring, its answer missing, TCP unused since: revocable; nothing
        // to send again if the peer had read it all.
        let mut s = Sender::new();
        on_ring(&mut s);
        s.on_left(Path::Tcp, 0).unwrap();
        s.wrote(5);
        s.moved(Path::Tcp);
        assert!(s.revocable());
        assert_eq!(s.clone().revoked(5), Ok(Rewind::Nothing));
        // Not once TCP carried bytes after the ring's, nor once the answer came.
        s.wrote(1);
        assert!(!s.revocable());
        let mut u = Sender::new();
        on_ring(&mut u);
        u.on_left(Path::Tcp, 0).unwrap();
        u.moved(Path::Tcp);
        u.on_left(Path::Shm, 0).unwrap();
        assert!(!u.revocable(), "the peer read the ring to the end");
        assert!(!Sender::new().revocable(), "never on the ring");
    }

    #[test]
    fn a_move_names_the_bytes_sent_on_the_path_it_leaves() {
        let mut s = Sender::new();
        assert_eq!((s.path(), s.wants()), (Path::Tcp, Path::Shm));
        s.wrote(10);
        on_ring(&mut s);
        s.wrote(5);
        assert_eq!((s.sent(Path::Tcp), s.sent(Path::Shm)), (10, 5));
        s.on_left(Path::Tcp, 10).unwrap();
        assert_eq!(
            s.switch_to(Path::Tcp),
            Control::Switch(Switch {
                to: Path::Tcp,
                offset: 5
            })
        );
        s.moved(Path::Tcp);
        assert_eq!(s.path(), Path::Tcp);
    }

    #[test]
    fn going_back_to_a_path_waits_for_the_peers_answer_to_leaving_it() {
        let mut s = Sender::new();
        s.wrote(3);
        on_ring(&mut s);
        assert!(!s.may_move(Path::Tcp), "LEFT_TCP not in yet");
        s.on_left(Path::Tcp, 3).unwrap();
        assert!(s.may_move(Path::Tcp));
        s.moved(Path::Tcp);
        assert!(!s.may_move(Path::Shm));
        s.on_left(Path::Shm, 0).unwrap();
        assert!(s.may_move(Path::Shm));
    }

    #[test]
    fn a_left_answer_nobody_asked_for_or_at_the_wrong_offset_is_a_violation() {
        let mut s = Sender::new();
        assert!(s.on_left(Path::Tcp, 0).is_err());
        s.wrote(3);
        on_ring(&mut s);
        assert!(s.on_left(Path::Tcp, 2).is_err());
        assert!(s.on_left(Path::Shm, 0).is_err());
        s.on_left(Path::Tcp, 3).unwrap();
        assert!(s.on_left(Path::Tcp, 3).is_err(), "answered twice");
    }

    #[test]
    fn a_rewind_on_the_ring_resends_from_its_offset_and_stays_on_tcp() {
        let mut s = Sender::new();
        on_ring(&mut s);
        s.wrote(100);
        assert_eq!(s.serve_rewind(), Ok(None), "nothing asked yet");
        s.on_rewind(40);
        s.on_rewind(0); // a second one is ignored
        assert!(s.rewind_asked());
        assert_eq!(
            s.serve_rewind(),
            Ok(Some(Rewind::Resend {
                from: 40,
                pause: true
            }))
        );
        assert!(!s.rewind_asked());
        assert_eq!((s.path(), s.for_good()), (Path::Tcp, true));
        assert_eq!(s.choose(Path::Shm), Err(Refused::ForGood));
        assert_eq!(s.serve_rewind(), Ok(None));
    }

    #[test]
    fn a_rewind_after_leaving_the_ring_resends_only_while_tcp_carried_nothing_since() {
        let fresh = || {
            let mut s = Sender::new();
            on_ring(&mut s);
            s.wrote(50);
            s.on_left(Path::Tcp, 0).unwrap();
            s.moved(Path::Tcp);
            s
        };
        let mut s = fresh();
        s.on_rewind(20);
        assert_eq!(
            s.serve_rewind(),
            Ok(Some(Rewind::Resend {
                from: 20,
                pause: false
            }))
        );
        let mut s = fresh();
        s.wrote(1);
        s.on_rewind(20);
        assert_eq!(
            s.serve_rewind(),
            Ok(Some(Rewind::Lost { from: 20, at: 50 }))
        );
        let mut s = fresh();
        s.wrote(1);
        s.on_rewind(50);
        assert_eq!(s.serve_rewind(), Ok(Some(Rewind::Nothing)));
    }

    #[test]
    fn no_move_while_a_rewind_waits_to_be_served() {
        let mut s = Sender::new();
        on_ring(&mut s);
        s.on_left(Path::Tcp, 0).unwrap();
        s.wrote(9);
        s.on_rewind(4);
        assert!(!s.may_move(Path::Tcp));
        s.serve_rewind().unwrap();
        assert_eq!(s.path(), Path::Tcp);
    }

    #[test]
    fn a_spill_is_sent_once_per_offset_until_a_rewind_comes() {
        let mut s = Sender::new();
        on_ring(&mut s);
        s.wrote(64);
        assert_eq!(s.spill(), Some(Control::Spill(64)));
        assert_eq!(s.spill(), None);
        s.wrote(1);
        assert_eq!(s.spill(), Some(Control::Spill(65)));
        s.wrote(1);
        s.on_rewind(0);
        assert_eq!(s.spill(), None);
    }

    #[test]
    fn a_rewind_beyond_what_the_ring_carried_is_a_violation() {
        let mut s = Sender::new();
        on_ring(&mut s);
        s.wrote(5);
        s.on_rewind(6);
        assert!(s.serve_rewind().is_err());
    }

    #[test]
    fn a_shutdown_on_the_ring_owes_tcp_its_fin_until_the_direction_settles() {
        let mut s = Sender::new();
        assert_eq!(
            s.shutdown(),
            Shut {
                first: true,
                fin_waits: false
            }
        );
        assert!(!s.shutdown().first);

        let mut s = Sender::new();
        on_ring(&mut s);
        s.wrote(5);
        assert_eq!(
            s.shutdown(),
            Shut {
                first: true,
                fin_waits: true
            }
        );
        s.on_rewind(2);
        assert!(matches!(s.serve_rewind(), Ok(Some(Rewind::Resend { .. }))));
        assert!(s.shutdown().fin_waits);
        assert!(s.backlog_sent(), "the FIN follows the resent bytes");
        assert!(!s.take_fin());
    }

    #[test]
    fn a_shutdown_while_a_rewinds_bytes_wait_owes_the_fin_too() {
        let mut s = Sender::new();
        on_ring(&mut s);
        s.wrote(5);
        s.on_rewind(0);
        s.serve_rewind().unwrap();
        assert!(s.shutdown().fin_waits);
        assert!(s.backlog_sent());
    }

    #[test]
    fn settling_chooses_tcp_for_good_and_hands_over_an_owed_fin_once() {
        let mut s = Sender::new();
        on_ring(&mut s);
        s.shutdown();
        s.settle();
        assert_eq!((s.wants(), s.for_good()), (Path::Tcp, true));
        assert!(s.take_fin());
        assert!(!s.take_fin());
        s.stay();
        assert_eq!(s.wants(), Path::Shm);
    }

    #[test]
    fn a_closed_control_channel_ends_every_wait_for_the_peer_and_every_move() {
        // Off the ring with bytes unread: TCP waited for the peer's verdict.
        let mut s = Sender::new();
        on_ring(&mut s);
        s.on_left(Path::Tcp, 0).unwrap();
        s.wrote(8);
        s.moved(Path::Tcp);
        assert!(s.tcp_waits_for_ring());
        s.control_closed();
        assert!(!s.tcp_waits_for_ring(), "no REWIND can come now");
        assert!(!s.may_move(Path::Shm), "no SWITCH can be announced");
        assert_eq!(s.choose(Path::Shm), Err(Refused::ControlClosed));
        assert_eq!(s.choose(Path::Tcp), Ok(()), "staying is always possible");
        assert_eq!(s.spill(), None);

        // On the ring: it stays there.
        let mut s = Sender::new();
        on_ring(&mut s);
        s.choose(Path::Tcp).unwrap();
        s.control_closed();
        assert_eq!((s.path(), s.wants()), (Path::Shm, Path::Shm));
        // Settling (before exec) cannot announce a move either: for good where it is.
        s.settle();
        assert_eq!(
            (s.path(), s.wants(), s.for_good()),
            (Path::Shm, Path::Shm, true)
        );

        // A REWIND that came before the close is still served.
        let mut s = Sender::new();
        on_ring(&mut s);
        s.wrote(6);
        s.on_rewind(2);
        s.control_closed();
        assert_eq!(
            s.serve_rewind(),
            Ok(Some(Rewind::Resend {
                from: 2,
                pause: true
            }))
        );
    }
}
