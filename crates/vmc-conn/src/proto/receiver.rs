//! The receiving direction: which path to read, how far, when to follow the
//! peer's moves, and where the stream ends.

use std::collections::VecDeque;

use super::{ix, Violation};
use crate::wire::{Control, Path, Switch};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxPath {
    /// Reading TCP; `until` is where the peer's SWITCH to shm said TCP ends.
    Tcp {
        until: Option<u64>,
    },
    Shm,
    /// The stream ended on the ring. (Ends on TCP are the kernel's to report, as
    /// it always does: the driver reads TCP on.)
    Ended(RxEnd),
}

/// How the stream ended on the ring, as TCP would have shown it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RxEnd {
    /// The peer shut its direction down, or died having read everything we sent:
    /// its kernel would have sent a FIN. Reads return 0.
    Eof,
    /// The peer died with bytes of ours unread: its kernel would have reset the
    /// connection. The next read fails with `ECONNRESET`, later ones return 0
    /// ([`Receiver::reset_reported`]), as the kernel's do.
    Reset,
}

/// What the receiving end does when the ring's writer is dead and the ring empty,
/// from [`Receiver::writer_dead`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Orphaned {
    /// The peer had announced its move to TCP: read on there (its kernel delivers
    /// what it sent before it died).
    FollowToTcp,
    /// The stream ended.
    Ended(RxEnd),
}

/// What a read does next, from [`Receiver::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RxStep {
    /// Read the ring.
    Ring,
    /// Read TCP: at most `limit` bytes if it is known where the peer left it.
    Tcp { limit: Option<u64> },
    /// TCP delivered every byte the peer sent before moving to the ring: open the
    /// ring, then [`Receiver::enter_ring`].
    EnterRing,
    /// The stream ended on the ring: report it without reading.
    Ended(RxEnd),
}

/// The protocol state of this end's receiving direction.
#[derive(Clone, Debug)]
pub(crate) struct Receiver {
    path: RxPath,
    /// Bytes read from each path (`[tcp, shm]`).
    received: [u64; 2],
    /// The peer's moves, in order, not followed yet.
    queued: VecDeque<Switch>,
    /// Where the peer's sending direction is after the last move we know of, and
    /// the offset its last move off each path named: what the next SWITCH is
    /// checked against.
    announced: Path,
    announced_at: [u64; 2],
    /// We stopped reading the ring for good (sent REWIND).
    settled: bool,
    /// The ring offset of the peer's last SPILL: it waits for room there.
    spill: Option<u64>,
}

impl Default for Receiver {
    fn default() -> Self {
        Receiver::new()
    }
}

impl Receiver {
    /// A direction that starts on TCP.
    pub(crate) fn new() -> Receiver {
        Receiver {
            path: RxPath::Tcp { until: None },
            received: [0; 2],
            queued: VecDeque::new(),
            announced: Path::Tcp,
            announced_at: [0; 2],
            settled: false,
            spill: None,
        }
    }

    /// The path being read; an ended stream stays on the ring, where it ended.
    pub(crate) fn path(&self) -> Path {
        match self.path {
            RxPath::Tcp { .. } => Path::Tcp,
            RxPath::Shm | RxPath::Ended(_) => Path::Shm,
        }
    }

    /// How the stream ended on the ring, if it did.
    #[cfg(test)]
    pub(crate) fn end(&self) -> Option<RxEnd> {
        match self.path {
            RxPath::Ended(e) => Some(e),
            _ => None,
        }
    }

    /// Bytes read from `path` so far.
    pub(crate) fn received(&self, path: Path) -> u64 {
        self.received[ix(path)]
    }

    /// Bytes TCP may still give before the ring takes over (`None`: no end known).
    pub(crate) fn tcp_room(&self) -> Option<u64> {
        match self.path {
            RxPath::Tcp { until: Some(end) } => Some(end - self.received[0]),
            _ => None,
        }
    }

    /// True once this end reads the ring no more: it settled, or the writer
    /// revoked the ring.
    pub(crate) fn is_settled(&self) -> bool {
        self.settled
    }

    /// What to read next.
    pub(crate) fn step(&self) -> RxStep {
        match self.path {
            RxPath::Shm => RxStep::Ring,
            RxPath::Ended(e) => RxStep::Ended(e),
            RxPath::Tcp { until: Some(end) } if self.received[0] == end => RxStep::EnterRing,
            RxPath::Tcp { until } => RxStep::Tcp {
                limit: until.map(|end| end - self.received[0]),
            },
        }
    }

    /// The peer's SWITCH arrived. Checked against the moves before it: a correct
    /// peer alternates paths and its offsets only grow.
    pub(crate) fn on_switch(&mut self, s: Switch) -> Result<(), Violation> {
        if self.settled {
            // Sent before the peer saw our REWIND: whatever it put on the ring
            // since comes again on TCP.
            return Ok(());
        }
        if s.to == self.announced {
            return Err(Violation("SWITCH to the path the peer is on already"));
        }
        let from = ix(self.announced);
        if s.offset < self.announced_at[from].max(self.received[from]) {
            return Err(Violation("SWITCH at an offset already passed"));
        }
        self.announced = s.to;
        self.announced_at[from] = s.offset;
        self.queued.push_back(s);
        Ok(())
    }

    /// The peer's SPILL: it waits for room in the ring, which it filled up to
    /// `offset`. A receiver that cannot read now (it waits in a write of its own)
    /// answers by settling ([`Receiver::settle`]).
    pub(crate) fn on_spill(&mut self, offset: u64) -> Result<(), Violation> {
        if self.settled {
            return Ok(());
        }
        // (It may be stale: we may have read past it since it was sent.)
        if self.spill.is_some_and(|o| offset < o) {
            return Err(Violation("SPILL behind an earlier one"));
        }
        self.spill = Some(offset);
        Ok(())
    }

    /// The peer still waits for room, as its SPILL said: the ring it writes ends
    /// at `ring_end` (what we read plus what it holds), where the plea was made. A
    /// plea the writer has written past since is stale.
    pub(crate) fn spill_asked(&self, ring_end: u64) -> bool {
        !self.settled && self.spill == Some(ring_end)
    }

    /// A move of the peer's is queued, not followed yet.
    pub(crate) fn has_switch(&self) -> bool {
        !self.queued.is_empty()
    }

    /// `n` bytes were read from TCP.
    pub(crate) fn read_tcp(&mut self, n: usize) {
        self.received[0] += n as u64;
        if let RxPath::Tcp { until: Some(end) } = self.path {
            debug_assert!(self.received[0] <= end, "read TCP past the peer's move");
        }
    }

    /// `n` bytes were read from the ring.
    pub(crate) fn read_ring(&mut self, n: usize) {
        self.received[1] += n as u64;
    }

    /// Reading TCP with no end known: if the peer announced a move to the ring,
    /// learn where TCP ends (true).
    pub(crate) fn follow(&mut self) -> Result<bool, Violation> {
        if self.path != (RxPath::Tcp { until: None }) {
            return Ok(false);
        }
        let Some(s) = self.queued.pop_front() else {
            return Ok(false);
        };
        debug_assert_eq!(s.to, Path::Shm, "moves alternate (checked on arrival)");
        if s.offset < self.received[0] {
            return Err(Violation("the peer's TCP bytes went past its SWITCH"));
        }
        self.path = RxPath::Tcp {
            until: Some(s.offset),
        };
        Ok(true)
    }

    /// Opens the ring at the end of the peer's TCP stretch ([`RxStep::EnterRing`]);
    /// returns the LEFT_TCP answer to send.
    pub(crate) fn enter_ring(&mut self) -> Control {
        debug_assert_eq!(self.step(), RxStep::EnterRing);
        self.path = RxPath::Shm;
        Control::LeftTcp(self.received[0])
    }

    /// The ring is empty and ended (paused or shut down). If the peer moved to TCP
    /// there (its SWITCH is queued), follow it: the LEFT_RING answer to send. `None`
    /// is the end of the stream. The caller reads the control channel first: a
    /// SWITCH is sent before the ring is paused.
    pub(crate) fn ring_ended(&mut self) -> Result<Option<Control>, Violation> {
        debug_assert_eq!(self.path, RxPath::Shm);
        let Some(s) = self.queued.front().copied() else {
            self.path = RxPath::Ended(RxEnd::Eof);
            return Ok(None);
        };
        debug_assert_eq!(s.to, Path::Tcp, "moves alternate (checked on arrival)");
        if s.offset != self.received[1] {
            return Err(Violation(
                "peer switched to TCP at an offset the ring did not reach",
            ));
        }
        self.queued.pop_front();
        self.path = RxPath::Tcp { until: None };
        Ok(Some(Control::LeftRing(s.offset)))
    }

    /// The ring is empty and its writer's process is dead. If the peer had
    /// announced a move to TCP where the ring ends (it died between the SWITCH and
    /// the pause), follow it: what it put on TCP comes. Otherwise the stream ends
    /// as the peer's kernel would have ended TCP: a FIN if it had read everything
    /// we sent (`left_unread` false), else a reset. The caller reads the control
    /// channel first.
    pub(crate) fn writer_dead(&mut self, left_unread: bool) -> Result<Orphaned, Violation> {
        debug_assert_eq!(self.path, RxPath::Shm);
        if self.queued.front().is_some_and(|s| s.to == Path::Tcp) {
            self.ring_ended()?;
            return Ok(Orphaned::FollowToTcp);
        }
        let end = if left_unread {
            RxEnd::Reset
        } else {
            RxEnd::Eof
        };
        self.path = RxPath::Ended(end);
        Ok(Orphaned::Ended(end))
    }

    /// The reset was reported to the program: from now on reads return 0.
    pub(crate) fn reset_reported(&mut self) {
        if self.path == RxPath::Ended(RxEnd::Reset) {
            self.path = RxPath::Ended(RxEnd::Eof);
        }
    }

    /// The writer revoked its ring, which ended it where we are (our ring
    /// position): its stream goes on on TCP, for good, right after what TCP gave
    /// so far or up to the end of the stretch we were reading there. The moves the
    /// peer announced are of no interest any more (a SWITCH to the ring that comes
    /// later, even one TCP has already gone past, is ignored). An ended stream
    /// stays ended.
    pub(crate) fn ring_revoked(&mut self) {
        if matches!(self.path, RxPath::Ended(_)) || self.settled {
            return;
        }
        self.path = RxPath::Tcp { until: None };
        self.queued.clear();
        self.settled = true;
        self.spill = None;
    }

    /// The REWIND that settling here asks for, without settling: the driver sends
    /// it first and calls [`Receiver::settle`] only once it is sent, so that a
    /// control channel that fails leaves the ring being read (the peer, never told,
    /// would not send its bytes again).
    pub(crate) fn rewind(&self) -> Control {
        Control::Rewind(self.received[1])
    }

    /// Stops reading the ring for good: the REWIND to send. The ring's bytes from
    /// where we are on come again on TCP, ahead of anything the peer sent there
    /// after them (see [`super::Sender::tcp_waits_for_ring`]), so the moves the
    /// peer announced are of no interest any more.
    pub(crate) fn settle(&mut self) -> Control {
        self.path = RxPath::Tcp { until: None };
        self.queued.clear();
        self.settled = true;
        self.spill = None;
        self.rewind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sw(to: Path, offset: u64) -> Switch {
        Switch { to, offset }
    }

    #[test]
    fn a_move_to_the_ring_bounds_tcp_then_enters_the_ring_with_an_answer() {
        let mut r = Receiver::new();
        assert_eq!(r.step(), RxStep::Tcp { limit: None });
        r.read_tcp(4);
        assert!(!r.follow().unwrap(), "nothing queued");
        r.on_switch(sw(Path::Shm, 10)).unwrap();
        assert!(r.has_switch());
        assert!(r.follow().unwrap());
        assert_eq!(r.step(), RxStep::Tcp { limit: Some(6) });
        r.read_tcp(6);
        assert_eq!(r.step(), RxStep::EnterRing);
        assert_eq!(r.enter_ring(), Control::LeftTcp(10));
        assert_eq!((r.step(), r.path()), (RxStep::Ring, Path::Shm));
    }

    #[test]
    fn a_revoked_ring_is_left_for_tcp_for_good_from_any_state() {
        // On the ring, a move back announced at an offset we did not reach.
        let mut r = on_ring();
        r.read_ring(3);
        r.on_switch(sw(Path::Tcp, 9)).unwrap();
        r.ring_revoked();
        assert_eq!(r.step(), RxStep::Tcp { limit: None });
        assert!(r.is_settled() && !r.has_switch());
        // Reading TCP before the peer's move to the ring was known, past it: the
        // late SWITCH is ignored.
        let mut r = Receiver::new();
        r.read_tcp(12);
        r.ring_revoked();
        r.on_switch(sw(Path::Shm, 10)).unwrap();
        assert!(!r.follow().unwrap());
        assert_eq!(r.step(), RxStep::Tcp { limit: None });
        // In a bounded TCP stretch: TCP on, unbounded.
        let mut r = Receiver::new();
        r.on_switch(sw(Path::Shm, 10)).unwrap();
        r.follow().unwrap();
        r.ring_revoked();
        assert_eq!(r.step(), RxStep::Tcp { limit: None });
        // An ended stream stays ended.
        let mut r = on_ring();
        r.ring_ended().unwrap();
        r.ring_revoked();
        assert_eq!(r.step(), RxStep::Ended(RxEnd::Eof));
    }

    fn on_ring() -> Receiver {
        let mut r = Receiver::new();
        r.on_switch(sw(Path::Shm, 0)).unwrap();
        r.follow().unwrap();
        r.enter_ring();
        r
    }

    #[test]
    fn an_ended_ring_is_a_move_back_if_announced() {
        let mut r = on_ring();
        r.read_ring(7);
        r.on_switch(sw(Path::Tcp, 7)).unwrap();
        assert_eq!(r.ring_ended(), Ok(Some(Control::LeftRing(7))));
        assert_eq!(r.step(), RxStep::Tcp { limit: None });
        assert_eq!(r.end(), None);
    }

    #[test]
    fn an_ended_ring_without_a_move_is_the_end_of_the_stream_for_good() {
        let mut r = on_ring();
        r.read_ring(7);
        assert_eq!(r.ring_ended(), Ok(None));
        assert_eq!(r.step(), RxStep::Ended(RxEnd::Eof));
        assert_eq!((r.end(), r.path()), (Some(RxEnd::Eof), Path::Shm));
        r.reset_reported(); // no reset: nothing changes
        assert_eq!(r.step(), RxStep::Ended(RxEnd::Eof));
    }

    #[test]
    fn a_dead_writer_ends_the_stream_as_its_kernel_would_have() {
        let mut r = on_ring();
        assert_eq!(r.writer_dead(false), Ok(Orphaned::Ended(RxEnd::Eof)));
        assert_eq!(r.step(), RxStep::Ended(RxEnd::Eof));

        let mut r = on_ring();
        assert_eq!(r.writer_dead(true), Ok(Orphaned::Ended(RxEnd::Reset)));
        assert_eq!(r.step(), RxStep::Ended(RxEnd::Reset));
        r.reset_reported();
        assert_eq!(
            r.step(),
            RxStep::Ended(RxEnd::Eof),
            "a reset is reported once"
        );
    }

    #[test]
    fn a_dead_writer_that_announced_its_move_to_tcp_is_followed_there() {
        let mut r = on_ring();
        r.read_ring(4);
        r.on_switch(sw(Path::Tcp, 4)).unwrap();
        assert_eq!(r.writer_dead(true), Ok(Orphaned::FollowToTcp));
        assert_eq!(
            r.step(),
            RxStep::Tcp { limit: None },
            "TCP's kernel tells the end"
        );
        assert_eq!(r.end(), None);

        let mut r = on_ring();
        r.read_ring(3);
        r.on_switch(sw(Path::Tcp, 4)).unwrap();
        assert!(
            r.writer_dead(false).is_err(),
            "moved at a byte the ring never had"
        );
    }

    #[test]
    fn settling_an_ended_stream_reads_tcp_to_its_fin() {
        let mut r = on_ring();
        r.read_ring(5);
        r.ring_ended().unwrap();
        assert_eq!(r.settle(), Control::Rewind(5));
        assert_eq!((r.step(), r.end()), (RxStep::Tcp { limit: None }, None));
    }

    #[test]
    fn a_move_back_at_an_offset_the_ring_did_not_reach_is_a_violation() {
        let mut r = Receiver::new();
        r.on_switch(sw(Path::Shm, 0)).unwrap();
        r.follow().unwrap();
        r.enter_ring();
        r.read_ring(3);
        r.on_switch(sw(Path::Tcp, 9)).unwrap();
        assert!(r.ring_ended().is_err());
    }

    #[test]
    fn switches_that_do_not_alternate_or_go_back_in_offset_are_violations() {
        let mut r = Receiver::new();
        assert!(r.on_switch(sw(Path::Tcp, 0)).is_err(), "already on TCP");
        r.read_tcp(5);
        assert!(r.on_switch(sw(Path::Shm, 4)).is_err(), "read 5 already");
        r.on_switch(sw(Path::Shm, 5)).unwrap();
        assert!(r.on_switch(sw(Path::Shm, 9)).is_err(), "twice to shm");
        r.on_switch(sw(Path::Tcp, 3)).unwrap();
        assert!(
            r.on_switch(sw(Path::Shm, 4)).is_err(),
            "TCP offsets only grow"
        );
        r.on_switch(sw(Path::Shm, 5)).unwrap();
        assert!(
            r.on_switch(sw(Path::Tcp, 2)).is_err(),
            "ring offsets only grow"
        );
    }

    #[test]
    fn a_spill_is_current_while_the_ring_ends_where_it_was_made() {
        let mut r = Receiver::new();
        r.on_switch(sw(Path::Shm, 0)).unwrap();
        r.follow().unwrap();
        r.enter_ring();
        r.read_ring(10);
        r.on_spill(9).unwrap();
        assert!(!r.spill_asked(10), "read past it already");
        r.on_spill(30).unwrap();
        assert!(r.spill_asked(30));
        assert!(!r.spill_asked(31), "the writer wrote on since: stale");
        assert!(r.on_spill(29).is_err(), "offsets only grow");
        assert_eq!(r.settle(), Control::Rewind(10));
        assert!(!r.spill_asked(30));
        r.on_spill(0).unwrap(); // late: ignored
        assert!(!r.spill_asked(0));
    }

    #[test]
    fn tcp_bytes_past_the_announced_end_are_a_violation() {
        let mut r = Receiver::new();
        r.on_switch(sw(Path::Shm, 2)).unwrap();
        r.read_tcp(3);
        assert!(r.follow().is_err());
    }

    #[test]
    fn settling_asks_for_the_ring_from_where_we_are_and_ignores_later_moves() {
        let mut r = Receiver::new();
        r.on_switch(sw(Path::Shm, 0)).unwrap();
        r.follow().unwrap();
        r.enter_ring();
        r.read_ring(12);
        assert_eq!(r.rewind(), Control::Rewind(12));
        assert!(!r.is_settled(), "naming the REWIND changes nothing");
        assert_eq!(r.step(), RxStep::Ring);
        assert_eq!(r.settle(), Control::Rewind(12));
        assert!(r.is_settled());
        assert_eq!(r.step(), RxStep::Tcp { limit: None });
        r.on_switch(sw(Path::Tcp, 12)).unwrap();
        r.on_switch(sw(Path::Tcp, 12)).unwrap();
        assert!(!r.has_switch());
        assert!(!r.follow().unwrap());
    }

    #[test]
    fn settling_with_the_peers_move_off_the_ring_unread_asks_for_the_unread_bytes() {
        let mut r = Receiver::new();
        r.on_switch(sw(Path::Shm, 0)).unwrap();
        r.follow().unwrap();
        r.enter_ring();
        r.read_ring(2);
        r.on_switch(sw(Path::Tcp, 8)).unwrap();
        assert_eq!(r.settle(), Control::Rewind(2));
        assert_eq!(r.step(), RxStep::Tcp { limit: None });
    }
}
