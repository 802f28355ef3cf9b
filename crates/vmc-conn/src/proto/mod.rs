//! The path-switching protocol of one connection, as two state machines that do no
//! I/O, read no clock and take no lock: [`Sender`] for the direction this end sends,
//! [`Receiver`] for the one it receives. `conn/` drives them: it feeds them what
//! happened (bytes written or read on a path, a control frame from the peer, a ring
//! found empty) and performs what they decide (send this frame, resume or pause the
//! ring, read TCP up to here, take bytes back from the ring). The seeded simulation in
//! `sim.rs` drives the same machines over simulated TCP, rings and control channels.
//!
//! # The protocol (one direction)
//! Each direction starts on TCP and is owned by its sender, which may move it to the
//! other path at any time: it announces `SWITCH { to, offset }`, `offset` being the
//! bytes it sent on the path it leaves, and from then on writes to the new path. The
//! receiver keeps reading the old path until it has exactly `offset` bytes from it,
//! then reads the new one, and answers LEFT (the path and the offset it left it at).
//!
//! - TCP -> shm: the sender resumes its ring, then sends SWITCH (the receiver learns
//!   of the move from the control channel and must find the ring open).
//! - shm -> TCP: the sender sends SWITCH, then pauses its ring. The receiver drains
//!   the ring, finds it paused and the SWITCH already there; a paused ring without a
//!   SWITCH is the end of the stream.
//! - A sender goes back to a path only after the LEFT answer to its last move away
//!   from it: a byte stream has no marks, so the receiver must know where one stretch
//!   on a path ended before the next stretch on it begins.
//! - For good, from the sending end (before exec): the sender revokes its ring
//!   (`vmc_ring::Producer::revoke`), which ends it exactly where the receiver is,
//!   with no answer needed, and puts the unread rest on TCP first
//!   ([`Sender::revoked`]). The receiver finds the ring ended and revoked, and
//!   reads TCP from there ([`Receiver::ring_revoked`]).
//! - For good, from the receiving end ([`Receiver::settle`]): the receiver stops
//!   reading the ring and sends REWIND with the offset it reached. The sender, when it
//!   next runs ([`Sender::serve_rewind`]), takes the unread bytes back out of its ring,
//!   puts them on TCP ahead of everything else and never returns to the ring.
//!
//! Everything the peer says is checked against what this end knows: a frame that
//! could not come from a correct peer is a [`Violation`], which costs the connection
//! and nothing else.
//!
//! # Transitions, and the unit test that covers each
//!
//! [`Sender`] (tests in `sender.rs`):
//!
//! | state, event | becomes | test |
//! |---|---|---|
//! | any, `choose(to)` | wants `to` (staying is always allowed) | `a_closed_control_channel_ends_every_wait_for_the_peer_and_every_move` |
//! | on TCP for good, `choose(shm)` | refused (`Refused::ForGood`) | `a_rewind_on_the_ring_resends_from_its_offset_and_stays_on_tcp` |
//! | control closed, `choose(other path)` | refused (`Refused::ControlClosed`) | `a_closed_control_channel_ends_every_wait_for_the_peer_and_every_move` |
//! | on `p`, `switch_to(q)`, `moved(q)` | on `q`; SWITCH names the bytes sent on `p` | `a_move_names_the_bytes_sent_on_the_path_it_leaves` |
//! | last move off `q` unanswered | `may_move(q)` false until its LEFT | `going_back_to_a_path_waits_for_the_peers_answer_to_leaving_it` |
//! | LEFT for no move, or at another offset | `Violation` | `a_left_answer_nobody_asked_for_or_at_the_wrong_offset_is_a_violation` |
//! | REWIND queued | `may_move` false until served | `no_move_while_a_rewind_waits_to_be_served` |
//! | on shm, REWIND served | TCP for good, resend from its offset, pause | `a_rewind_on_the_ring_resends_from_its_offset_and_stays_on_tcp` |
//! | off the ring, REWIND served | resend while TCP carried nothing since, else `Lost`; `Nothing` if all was read | `a_rewind_after_leaving_the_ring_resends_only_while_tcp_carried_nothing_since` |
//! | REWIND past what the ring carried | `Violation` | `a_rewind_beyond_what_the_ring_carried_is_a_violation` |
//! | waiting, `spill()` | one SPILL per ring offset; none once a REWIND came | `a_spill_is_sent_once_per_offset_until_a_rewind_comes` |
//! | on shm, `shutdown()` | FIN owed until the direction settles | `a_shutdown_on_the_ring_owes_tcp_its_fin_until_the_direction_settles` |
//! | REWIND's bytes pending, `shutdown()` | FIN owed until they are on TCP | `a_shutdown_while_a_rewinds_bytes_wait_owes_the_fin_too` |
//! | `settle()` (control open) | wants TCP, for good; an owed FIN handed over once; `stay()` | `settling_chooses_tcp_for_good_and_hands_over_an_owed_fin_once` |
//! | `control_closed()` | TCP waits for no verdict; no move, SPILL or other path; `settle()` stays; a REWIND before it still served | `a_closed_control_channel_ends_every_wait_for_the_peer_and_every_move` |
//! | on shm, or off it unanswered with TCP unused since, `revoked(at)` | TCP for good, resend from `at` (or `Nothing`); later REWINDs ignored; past what the ring carried: `Violation` | `a_revoke_leaves_the_ring_for_tcp_exactly_without_the_peers_answer` |
//!
//! [`Receiver`] (tests in `receiver.rs`):
//!
//! | state, event | becomes | test |
//! |---|---|---|
//! | TCP, SWITCH to shm, `follow()` | TCP up to the offset; then `EnterRing`, LEFT_TCP | `a_move_to_the_ring_bounds_tcp_then_enters_the_ring_with_an_answer` |
//! | TCP bytes past the announced end | `Violation` | `tcp_bytes_past_the_announced_end_are_a_violation` |
//! | shm, ring ended, SWITCH to TCP queued | TCP, LEFT_RING | `an_ended_ring_is_a_move_back_if_announced` |
//! | shm, ring ended, nothing queued | ended (EOF), for good | `an_ended_ring_without_a_move_is_the_end_of_the_stream_for_good` |
//! | SWITCH back at an offset the ring did not reach | `Violation` | `a_move_back_at_an_offset_the_ring_did_not_reach_is_a_violation` |
//! | SWITCHes that repeat a path or go back in offset | `Violation` | `switches_that_do_not_alternate_or_go_back_in_offset_are_violations` |
//! | shm, writer dead | ended: EOF, or reset once then EOF | `a_dead_writer_ends_the_stream_as_its_kernel_would_have` |
//! | shm, writer dead after announcing TCP | TCP | `a_dead_writer_that_announced_its_move_to_tcp_is_followed_there` |
//! | SPILL | current while the ring ends where it was made | `a_spill_is_current_while_the_ring_ends_where_it_was_made` |
//! | any, `rewind()` then `settle()` | `rewind()` changes nothing; settled on TCP, later moves ignored | `settling_asks_for_the_ring_from_where_we_are_and_ignores_later_moves` |
//! | TCP with the peer's move off the ring unread, `settle()` | REWIND asks for the unread bytes | `settling_with_the_peers_move_off_the_ring_unread_asks_for_the_unread_bytes` |
//! | ended, `settle()` | TCP, read to its FIN | `settling_an_ended_stream_reads_tcp_to_its_fin` |
//! | any, `ring_revoked()` | TCP unbounded, for good; queued and later SWITCHes ignored; an ended stream stays ended | `a_revoked_ring_is_left_for_tcp_for_good_from_any_state` |
//!
//! The simulation (`sim.rs`) then drives both machines through random
//! interleavings of all of these, deaths, execs and a closed control channel
//! included.

#![forbid(unsafe_code)]

mod receiver;
mod sender;
#[cfg(test)]
mod sim;

pub(crate) use receiver::{Orphaned, Receiver, RxEnd, RxStep};
pub(crate) use sender::{Refused, Rewind, Sender};

/// A frame or an event the peer could not have caused by following the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Violation(pub(crate) &'static str);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl From<Violation> for std::io::Error {
    fn from(v: Violation) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("vmc connection: {}", v.0),
        )
    }
}

/// Index of a path in per-path arrays: `[tcp, shm]`.
fn ix(p: crate::wire::Path) -> usize {
    match p {
        crate::wire::Path::Tcp => 0,
        crate::wire::Path::Shm => 1,
    }
}
