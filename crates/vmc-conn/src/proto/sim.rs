//! Seeded simulation of one direction of a connection: the real [`Sender`] and
//! [`Receiver`] machines, driven by the rules `conn/` follows, over a simulated
//! TCP connection (bytes in flight for a random time), a ring (bounded, pausable,
//! closable by its reader, as `vmc_channel`'s), and a control channel in each
//! direction (frames visible to the other end as soon as they are sent, like a Unix
//! socket's). A scheduler drawn from the seed interleaves writes of random sizes,
//! reads, deliveries, path moves by the sender (which may be preempted between the
//! two halves of a move: the ring opened or paused, the SWITCH sent), a settle
//! (REWIND) by the receiver or the sender, the sender's death at any step, the
//! receiver's exec at any step (it settles, then its control channel closes
//! after every frame it sent: the sender learns that no REWIND can come any more,
//! and its later sends fail), the sender's exec at any step (it settles, serving
//! a REWIND or revoking the ring where the receiver is, then shuts the control
//! channel for reading and drains it a last time; its new image writes TCP as a
//! plain program), both ends' execs at once, the receiver's death at any step (its ring, control channel and TCP
//! go quiet: the sender must learn of it from an error within a bounded number of
//! writes, never wait for it), the receiver stuck in a write of its own until the
//! sender has written far ahead (the both-ends-write-first deadlock, which SPILL
//! breaks), and finally a shutdown, then drains. Every run checks that the receiver got exactly
//! the bytes sent, in order (up to the sender's death: a prefix of them), and that
//! it reached an end (of the stream, or an error) within a bounded number of steps.
//!
//! Runs `VMC_SIM_SCHEDULES` schedules (default 100,000) from `VMC_SIM_SEED` (default:
//! drawn from the clock, printed). A failure prints the seed of its schedule and the
//! command that replays it alone.

use std::collections::VecDeque;

use super::{Receiver, Rewind, RxStep, Sender};
use crate::wire::{Control, Path};

/// splitmix64: small, fast, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Byte `i` of the stream: position-dependent, so a lost, doubled or reordered
/// byte shows.
fn byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// The simulated ring: what the writer half and reader half of a channel see.
struct Ring {
    cap: usize,
    bytes: VecDeque<u8>,
    /// Bytes ever written (the producer's position) and read.
    written: u64,
    read: u64,
    paused: bool,
    shut: bool,
    reader_closed: bool,
    /// The writer's process died (`vmc_channel`'s liveness check says so).
    writer_dead: bool,
    /// The reader's process died: writes go into the void while there is room;
    /// a writer waiting for room finds the reader dead (an error).
    reader_dead: bool,
    /// The writer revoked the ring where the reader was (`Producer::revoke`, one
    /// atomic step here as its swap is there): the reader reads no more of it.
    revoked: bool,
}

enum RingRead {
    Bytes(usize),
    /// Empty and paused or shut: the reader looks for a SWITCH, else it is the end.
    Ended,
    Empty,
    /// Empty, and the writer is dead: the read fails (`conn/recv.rs` reports the end of
    /// the stream or a reset).
    Dead,
}

impl Ring {
    fn write(&mut self, mut data: impl Iterator<Item = u8>, len: usize) -> Result<usize, ()> {
        if self.reader_closed || (self.reader_dead && self.bytes.len() == self.cap) {
            return Err(()); // BrokenPipe, or the reader is dead
        }
        assert!(!self.paused && !self.shut, "writing a paused or shut ring");
        let n = len.min(self.cap - self.bytes.len());
        for _ in 0..n {
            self.bytes.push_back(data.next().unwrap());
        }
        self.written += n as u64;
        Ok(n)
    }

    fn read(&mut self, max: usize, out: &mut Vec<u8>) -> RingRead {
        if self.revoked {
            return RingRead::Ended;
        }
        if !self.bytes.is_empty() {
            let n = max.min(self.bytes.len());
            out.extend(self.bytes.drain(..n));
            self.read += n as u64;
            return RingRead::Bytes(n);
        }
        if self.paused || self.shut {
            RingRead::Ended
        } else if self.writer_dead {
            RingRead::Dead
        } else {
            RingRead::Empty
        }
    }

    /// `vmc_ring::Producer::revoke`: the ring ends where the reader is.
    fn revoke(&mut self) -> u64 {
        self.revoked = true;
        self.paused = true;
        self.read
    }

    /// `vmc_ring::Producer::take_back`: the bytes `from..written`, which the
    /// reader never took (it names its own position).
    fn take_back(&self, from: u64) -> Vec<u8> {
        assert!(
            self.read <= from && from <= self.written,
            "take_back({from}) of a ring read to {} and written to {}",
            self.read,
            self.written
        );
        self.bytes
            .iter()
            .skip((from - self.read) as usize)
            .copied()
            .collect()
    }
}

/// The simulated TCP connection, one way.
#[derive(Default)]
struct Tcp {
    in_flight: VecDeque<u8>,
    arrived: VecDeque<u8>,
    fin_sent: bool,
    /// The sender died with bytes it had received unread: its kernel reset the
    /// connection, and what was in flight is gone.
    reset: bool,
}

impl Tcp {
    fn deliver(&mut self, n: usize) {
        let n = n.min(self.in_flight.len());
        self.arrived.extend(self.in_flight.drain(..n));
    }

    fn fin_arrived(&self) -> bool {
        self.fin_sent && self.in_flight.is_empty()
    }
}

struct World {
    rng: Rng,
    tx: Sender,
    rx: Receiver,
    ring: Ring,
    tcp: Tcp,
    /// Control frames in flight: to the receiver, to the sender.
    to_rx: VecDeque<Control>,
    to_tx: VecDeque<Control>,
    /// Stream positions: next byte the sender writes, bytes the receiver got.
    next: u64,
    got: u64,
    /// The sender was preempted between the two halves of a move to this path.
    mid_move: Option<(Path, Control)>,
    tx_dead: bool,
    /// The receiver's process exec'd: its control channel is closed (frames it
    /// sent before are still read; frames sent to it are lost, and sends fail),
    /// and its new image reads TCP only.
    cut: bool,
    /// The sender's exec hook has settled: its next step is the exec itself
    /// (what the receiver does in between is the race the last drain is for).
    tx_exec: bool,
    /// The sender shut its control channel for reading (as its exec's last
    /// step): the receiver's sends fail from now on.
    tx_shut_read: bool,
    /// The sender exec'd: its new image writes TCP as a plain program.
    tx_plain: bool,
    /// The receiver's process died.
    rx_dead: bool,
    /// TCP writes since the receiver died: the first goes out (and draws a
    /// reset), later ones fail.
    tcp_writes_after_death: u32,
    /// A write of the sender failed: its program knows the connection is gone.
    tx_error: bool,
    /// The receiver waits in a write of its own (so reads nothing) until the sender
    /// has written up to here: the peer of a program that writes far ahead before
    /// it reads.
    rx_stuck_until: Option<u64>,
    /// The sender's writes in a row that waited for the peer in vain.
    full_in_a_row: u32,
    eof: bool,
    seen: Seen,
    log: Vec<String>,
}

type Fail = String;

/// How many schedules saw each event at least once: a run shows what it covered.
#[derive(Default)]
struct Tally {
    schedules: u64,
    deaths: u64,
    execs: u64,
    tx_execs: u64,
    rx_deaths: u64,
    /// The most writes a sender made after the receiver died before one failed.
    most_writes_to_learn: u64,
    /// Sender execs that found a REWIND in their last drain.
    exec_rewinds: u64,
    /// The sender learnt that the control channel closed.
    closes_seen: u64,
    rewinds: u64,
    resends: u64,
    pleas: u64,
    pleas_answered: u64,
    preempted_moves: u64,
    /// Sends that failed on the closed channel.
    failed_sends: u64,
    revokes: u64,
    revoke_resends: u64,
    both_execs: u64,
}

/// The events of one schedule, for the [`Tally`].
#[derive(Default, Clone, Copy)]
struct Seen {
    closed: bool,
    rewind: bool,
    resend: bool,
    plea: bool,
    plea_answered: bool,
    preempted: bool,
    failed_send: bool,
    exec_rewind: bool,
    revoke: bool,
    revoke_resend: bool,
    both_exec: bool,
    writes_to_learn: u64,
}

impl Tally {
    fn add(&mut self, w: &World) {
        let s = w.seen;
        self.schedules += 1;
        self.deaths += u64::from(w.tx_dead);
        self.execs += u64::from(w.cut && !w.rx_dead);
        self.tx_execs += u64::from(w.tx_plain);
        self.rx_deaths += u64::from(w.rx_dead);
        self.most_writes_to_learn = self.most_writes_to_learn.max(w.seen.writes_to_learn);
        self.exec_rewinds += u64::from(s.exec_rewind);
        self.closes_seen += u64::from(s.closed);
        self.rewinds += u64::from(s.rewind);
        self.resends += u64::from(s.resend);
        self.pleas += u64::from(s.plea);
        self.pleas_answered += u64::from(s.plea_answered);
        self.preempted_moves += u64::from(s.preempted);
        self.failed_sends += u64::from(s.failed_send);
        self.revokes += u64::from(s.revoke);
        self.revoke_resends += u64::from(s.revoke_resend);
        self.both_execs += u64::from(s.both_exec);
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "of {} schedules: sender died {}, receiver exec'd {} (the sender saw a \
             closed control channel in {}, a send failed on one in {}), sender exec'd {} (a REWIND in \
             its last drain {}), receiver died {} (the sender learnt of it within {} \
             writes), REWIND served {} (bytes sent again {}), SPILL {} (answered {}), \
             a move preempted halfway {}, the ring revoked {} (bytes sent again {}), \
             both ends exec'd with the receiver's REWIND refused {}",
            self.schedules,
            self.deaths,
            self.execs,
            self.closes_seen,
            self.failed_sends,
            self.tx_execs,
            self.exec_rewinds,
            self.rx_deaths,
            self.most_writes_to_learn,
            self.rewinds,
            self.resends,
            self.pleas,
            self.pleas_answered,
            self.preempted_moves,
            self.revokes,
            self.revoke_resends,
            self.both_execs
        )
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let cap = 1 + rng.below(48) as usize;
        World {
            rng,
            tx: Sender::new(),
            rx: Receiver::new(),
            ring: Ring {
                cap,
                bytes: VecDeque::new(),
                written: 0,
                read: 0,
                paused: true,
                shut: false,
                reader_closed: false,
                writer_dead: false,
                reader_dead: false,
                revoked: false,
            },
            tcp: Tcp::default(),
            to_rx: VecDeque::new(),
            to_tx: VecDeque::new(),
            next: 0,
            got: 0,
            mid_move: None,
            tx_dead: false,
            cut: false,
            tx_exec: false,
            tx_shut_read: false,
            tx_plain: false,
            rx_dead: false,
            tcp_writes_after_death: 0,
            tx_error: false,
            rx_stuck_until: None,
            full_in_a_row: 0,
            eof: false,
            seen: Seen::default(),
            log: Vec::new(),
        }
    }

    fn note(&mut self, what: String) {
        if self.log.len() > 400 {
            self.log.remove(0);
        }
        self.log.push(what);
    }

    // ---- the sender's driver ---------------------------------------------------

    /// Reads the frames the receiver sent (`read_control`).
    fn tx_pump(&mut self) -> Result<(), Fail> {
        while let Some(f) = self.to_tx.pop_front() {
            self.note(format!("tx <- {f:?}"));
            match f {
                Control::LeftTcp(o) => self.tx.on_left(Path::Tcp, o),
                Control::LeftRing(o) => self.tx.on_left(Path::Shm, o),
                Control::Rewind(o) => {
                    self.tx.on_rewind(o);
                    Ok(())
                }
                Control::Switch(_) | Control::Spill(_) => {
                    Err(super::Violation("a sender's frame to the sender"))
                }
            }
            .map_err(|v| format!("sender refused a correct peer's frame: {v}"))?;
        }
        // After every frame sent before it, as a Unix socket reports its close.
        if self.cut {
            self.tx.control_closed();
            self.seen.closed = true;
        }
        Ok(())
    }

    /// Sends a frame to the receiver; false if the control channel is closed.
    fn tx_send(&mut self, frame: Control) -> bool {
        if self.cut {
            self.seen.failed_send = true;
            self.note(format!("tx cannot send {frame:?}: the channel is closed"));
            return false;
        }
        self.to_rx.push_back(frame);
        true
    }

    /// `serve_rewind` then `flush_backlog` (TCP here takes everything at once).
    fn tx_serve(&mut self) -> Result<(), Fail> {
        let Some(plan) = self.tx.serve_rewind().map_err(|v| v.to_string())? else {
            return Ok(());
        };
        self.note(format!("tx serves {plan:?}"));
        self.seen.rewind = true;
        self.seen.resend |= matches!(plan, Rewind::Resend { .. });
        let back = match plan {
            Rewind::Resend { from, pause } => {
                if pause {
                    self.ring.paused = true;
                }
                self.ring.take_back(from)
            }
            Rewind::Nothing => Vec::new(),
            Rewind::Lost { from, at } => {
                return Err(format!("the ring's bytes {from}..{at} were lost"));
            }
        };
        self.tx.wrote(back.len());
        self.tcp.in_flight.extend(back);
        if self.tx.backlog_sent() {
            self.tcp.fin_sent = true;
        }
        Ok(())
    }

    /// A readiness check or a read on the other direction: reads the control
    /// channel and serves a REWIND.
    fn tx_look(&mut self) -> Result<(), Fail> {
        self.finish_move();
        self.tx_pump()?;
        self.tx_serve()
    }

    /// A blocking write's wait slice ended with the peer's news still missing:
    /// after two in a row, plead (`Conn::wait_ring_room`, `Conn::wait_for_peer`).
    fn waited(&mut self) -> Result<(), Fail> {
        self.full_in_a_row += 1;
        if self.full_in_a_row >= 2 {
            // `plead` reads the news first.
            self.tx_pump()?;
            if let Some(plea) = self.tx.spill() {
                self.note(format!("tx pleads: {plea:?}"));
                self.seen.plea = true;
                self.tx_send(plea);
            }
        }
        Ok(())
    }

    /// `move_tx`: false if the peer's answer to an earlier move is not in yet.
    /// A move the control channel cannot announce is given up (`write_locked`
    /// stays on its path), and the write goes on: true.
    fn tx_move(&mut self, to: Path) -> Result<bool, Fail> {
        self.tx_pump()?;
        if self.tx.rewind_asked() {
            // Read just now: it decides the path (TCP, for good).
            self.tx_serve()?;
            return Ok(true);
        }
        if self.tx.wants() != to {
            return Ok(true); // called off: the control channel closed
        }
        if !self.tx.may_move(to) {
            return Ok(false);
        }
        let frame = self.tx.switch_to(to);
        self.note(format!("tx moves: {frame:?}"));
        match to {
            Path::Shm => self.ring.paused = false,
            Path::Tcp if !self.tx_send(frame) => {
                self.tx.stay();
                return Ok(true);
            }
            Path::Tcp => {}
        }
        self.mid_move = Some((to, frame));
        if self.rng.chance(30) {
            self.note("tx preempted in the middle of its move".into());
            self.seen.preempted = true;
            return Ok(false);
        }
        self.finish_move();
        Ok(true)
    }

    /// The second half of a move: the SWITCH after opening the ring, or the pause
    /// after announcing the move off it.
    fn finish_move(&mut self) {
        let Some((to, frame)) = self.mid_move.take() else {
            return;
        };
        match to {
            // (The ring stays open: nobody reads it, and the machine is on TCP.)
            Path::Shm if !self.tx_send(frame) => {
                self.tx.stay();
                return;
            }
            Path::Shm => {}
            Path::Tcp => self.ring.paused = true,
        }
        self.tx.moved(to);
    }

    /// The sender dies: its kernel closes TCP (a FIN after what is in flight, or a
    /// reset), the ring's liveness check reports it, its control socket closes.
    fn tx_die(&mut self) {
        self.tx_dead = true;
        self.ring.writer_dead = true;
        if self.rng.chance(50) {
            self.tcp.fin_sent = true;
        } else {
            self.tcp.reset = true;
            self.tcp.in_flight.clear();
        }
        self.note(format!("tx dies (reset: {})", self.tcp.reset));
    }

    /// `write_locked`, once (a blocked write is a write that does not happen now).
    fn tx_write(&mut self, len: usize) -> Result<(), Fail> {
        assert!(!self.tx.is_shut());
        self.finish_move();
        // No look at the control channel here: only a REWIND someone read already.
        self.tx_serve()?;
        if self.tx.path() != self.tx.wants() && !self.tx_move(self.tx.wants())? {
            if self.mid_move.is_none() {
                self.waited()?; // for the peer's answer to an earlier move
            }
            return Ok(());
        }
        let start = self.next;
        match self.tx.path() {
            // Off the ring with bytes unread: TCP waits for the peer's answer.
            Path::Tcp if self.tx.tcp_waits_for_ring() && !self.ring.bytes.is_empty() => {
                // `wait_for_peer`: reads the control channel as it waits.
                self.tx_pump()?;
                if self.tx.rewind_asked() {
                    return self.tx_write(len);
                }
                self.waited()?;
                return Ok(());
            }
            Path::Tcp => self.tcp_write(len),
            Path::Shm => match self.ring.write((start..).map(byte), len) {
                Ok(0) => self.waited()?,
                Ok(n) => {
                    self.full_in_a_row = 0;
                    self.tx.wrote(n);
                    self.next += n as u64;
                }
                // The receiver closed its end: its REWIND is queued.
                Err(()) => {
                    self.tx_pump()?;
                    if self.tx.rewind_asked() {
                        return self.tx_write(len);
                    }
                    if !self.rx_dead {
                        return Err("ring closed by its reader without a REWIND".into());
                    }
                    // A dead reader: do what TCP does (`write_locked`).
                    self.tcp_write(len);
                    return Ok(());
                }
            },
        }
        self.note(format!(
            "tx wrote {} on {:?}",
            self.next - start,
            self.tx.path()
        ));
        Ok(())
    }

    /// A write turn of the sender: `write_locked`, or a look of its exec hook,
    /// or a write of its new image.
    fn tx_turn(&mut self, len: usize) -> Result<(), Fail> {
        if self.tx_plain {
            self.tx_plain_write(len);
            Ok(())
        } else if self.tx_exec {
            self.tx_exec_step()
        } else {
            self.tx_write(len)
        }
    }

    /// `send` on TCP: the stream goes on there, unless the receiver died: then
    /// the first write still goes out (its kernel answers with a reset) and later
    /// ones fail, as TCP's do.
    fn tcp_write(&mut self, len: usize) {
        if self.rx_dead {
            self.tcp_writes_after_death += 1;
            if self.tcp_writes_after_death > 1 {
                self.note("tx: a write fails: the receiver is gone".into());
                self.tx_error = true;
                return;
            }
        }
        let start = self.next;
        self.tcp
            .in_flight
            .extend((start..start + len as u64).map(byte));
        self.tx.wrote(len);
        self.next += len as u64;
    }

    /// The receiver's process dies: its control socket closes after the frames
    /// it sent, its ring is read no more (its liveness shows once the writer
    /// waits for room), and its kernel ends TCP.
    fn rx_die(&mut self) {
        self.note("rx dies".into());
        self.rx_dead = true;
        self.cut = true;
        self.to_rx.clear();
        self.ring.reader_dead = true;
        self.rx_stuck_until = None;
    }

    fn tx_choose(&mut self, to: Path) {
        let _ = self.tx.choose(to);
    }

    /// `settle_sending`: a REWIND is served, else the ring is revoked where the
    /// receiver is and what it had not read goes on TCP first.
    fn tx_settle(&mut self) -> Result<(), Fail> {
        self.finish_move();
        self.tx_pump()?;
        self.tx.settle();
        if self.tx.rewind_asked() {
            self.tx_serve()?;
        } else if self.tx.revocable() {
            let at = self.ring.revoke();
            let plan = self.tx.revoked(at).map_err(|v| v.to_string())?;
            self.note(format!("tx revokes the ring at {at}: {plan:?}"));
            self.seen.revoke = true;
            if let Rewind::Resend { from, .. } = plan {
                let back = self.ring.take_back(from);
                self.seen.revoke_resend = true;
                self.tx.wrote(back.len());
                self.tcp.in_flight.extend(back);
                if self.tx.backlog_sent() {
                    self.tcp.fin_sent = true;
                }
            }
        }
        if self.tx.take_fin() {
            self.tcp.fin_sent = true;
        }
        Ok(())
    }

    /// The sender's exec hook begins (`settle_on_tcp`): its sending direction
    /// goes to TCP for good, by a REWIND it serves or by revoking the ring, which
    /// waits for nobody; the exec itself comes at a later step
    /// ([`World::tx_exec_step`]), what the receiver does in between is the race
    /// the last drain is for.
    fn tx_exec_begin(&mut self) -> Result<(), Fail> {
        self.note("tx execs: settles".into());
        self.tx_exec = true;
        self.tx_settle()
    }

    fn tx_exec_step(&mut self) -> Result<(), Fail> {
        if self.tx_exec {
            self.tx_exec_end()?;
        }
        Ok(())
    }

    /// The exec itself: the control channel is shut for reading, so that a
    /// REWIND is either in it now or fails to be sent, and drained a last time;
    /// a REWIND found there is served (one that came after the revoke is
    /// ignored). Then the new image: plain TCP.
    fn tx_exec_end(&mut self) -> Result<(), Fail> {
        self.tx_shut_read = true;
        let before = self.seen.rewind;
        self.seen.rewind = false;
        self.tx_look()?;
        self.seen.exec_rewind |= self.seen.rewind;
        self.seen.rewind |= before;
        if self.tx.take_fin() {
            self.tcp.fin_sent = true;
        }
        self.note("tx exec'd: its new image writes TCP".into());
        self.tx_exec = false;
        self.tx_plain = true;
        self.to_tx.clear();
        Ok(())
    }

    /// A write of the sender's new image: plain TCP.
    fn tx_plain_write(&mut self, len: usize) {
        if self.tcp.fin_sent {
            return;
        }
        let start = self.next;
        self.tcp
            .in_flight
            .extend((start..start + len as u64).map(byte));
        self.next += len as u64;
        self.note(format!("tx's new image wrote {len} on TCP"));
    }

    fn tx_shutdown(&mut self) {
        self.finish_move();
        let shut = self.tx.shutdown();
        if shut.first {
            self.ring.shut = true;
        }
        if !shut.fin_waits {
            self.tcp.fin_sent = true;
        }
        self.note(format!("tx shutdown: {shut:?}"));
    }

    // ---- the receiver's driver -------------------------------------------------

    /// Sends a frame to the sender; false if the send fails (the sender shut
    /// its control channel for reading, or exec'd).
    fn rx_send(&mut self, frame: Control) -> bool {
        if self.tx_shut_read || self.tx_plain {
            self.seen.failed_send = true;
            self.note(format!("rx cannot send {frame:?}: the sender shut reading"));
            return false;
        }
        self.to_tx.push_back(frame);
        true
    }

    fn rx_pump(&mut self) -> Result<(), Fail> {
        // `rx_check_revoked`, before the frames: a SWITCH to a revoked ring is void.
        if self.ring.revoked && !self.rx.is_settled() {
            self.note("rx: the ring was revoked: TCP from here".into());
            self.rx.ring_revoked();
            self.ring.reader_closed = true;
        }
        if self.cut {
            // The new image reads no frames: they are lost with the old socket.
            self.to_rx.clear();
            return Ok(());
        }
        while let Some(f) = self.to_rx.pop_front() {
            self.note(format!("rx <- {f:?}"));
            match f {
                Control::Switch(s) => self.rx.on_switch(s),
                Control::Spill(at) => self.rx.on_spill(at),
                _ => return Err(format!("receiver got {f:?}")),
            }
            .map_err(|v| format!("receiver refused a correct peer's frame: {v}"))?;
        }
        Ok(())
    }

    fn deliver(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        for &b in bytes {
            if b != byte(self.got) {
                return Err(format!(
                    "byte {} is {b:#04x}, the stream has {:#04x} there",
                    self.got,
                    byte(self.got)
                ));
            }
            self.got += 1;
        }
        Ok(())
    }

    /// `read_locked`, until it returns (bytes, end of stream) or would block.
    fn rx_read(&mut self, max: usize) -> Result<(), Fail> {
        for _ in 0..16 {
            match self.rx.step() {
                RxStep::Ring => {
                    let mut out = Vec::new();
                    match self.ring.read(max, &mut out) {
                        RingRead::Bytes(n) => {
                            self.rx.read_ring(n);
                            self.note(format!("rx read {n} from the ring"));
                            return self.deliver(&out);
                        }
                        RingRead::Empty => return Ok(()),
                        RingRead::Dead => {
                            self.rx_pump()?;
                            if self.rx.path() != Path::Shm {
                                continue; // revoked
                            }
                            // Its kernel reset TCP if it died with bytes of ours
                            // unread, which is what `left_unread` tells the machine.
                            let left_unread = self.tcp.reset;
                            let next = self
                                .rx
                                .writer_dead(left_unread)
                                .map_err(|v| v.to_string())?;
                            self.note(format!("rx: the writer is dead: {next:?}"));
                        }
                        RingRead::Ended => {
                            self.rx_pump()?;
                            if self.rx.path() != Path::Shm {
                                continue; // revoked
                            }
                            if let Some(answer) = self.rx.ring_ended().map_err(|v| v.to_string())? {
                                // (An answer that cannot be sent is not missed.)
                                self.rx_send(answer);
                            }
                        }
                    }
                }
                RxStep::EnterRing => {
                    self.rx_pump()?; // (`enter_ring` checks for a revoke)
                    if self.rx.step() != RxStep::EnterRing {
                        continue;
                    }
                    let answer = self.rx.enter_ring();
                    self.rx_send(answer);
                }
                RxStep::Ended(end) => {
                    self.note(format!("rx: the stream ended on the ring: {end:?}"));
                    self.rx.reset_reported();
                    self.eof = true;
                    return Ok(());
                }
                RxStep::Tcp { .. } if self.tcp.reset && self.tcp.arrived.is_empty() => {
                    self.note("rx: TCP reset".into());
                    self.eof = true;
                    return Ok(());
                }
                RxStep::Tcp { limit } => {
                    let n = (max as u64).min(limit.unwrap_or(u64::MAX)) as usize;
                    let n = n.min(self.tcp.arrived.len());
                    if n > 0 {
                        let out: Vec<u8> = self.tcp.arrived.drain(..n).collect();
                        self.rx.read_tcp(n);
                        self.note(format!("rx read {n} from TCP"));
                        return self.deliver(&out);
                    }
                    if limit.is_some() {
                        if self.tcp.fin_arrived() {
                            // recv returns 0 before the stretch's end: the sender
                            // died (a live one sends the stretch before its FIN).
                            assert!(self.tx_dead, "a FIN inside a TCP stretch");
                            self.eof = true;
                        }
                        return Ok(()); // the rest of the stretch is in flight
                    }
                    self.rx_pump()?;
                    if self.rx.follow().map_err(|v| v.to_string())? {
                        continue;
                    }
                    if self.tcp.fin_arrived() {
                        self.note("rx: end of stream on TCP".into());
                        self.eof = true;
                    }
                    return Ok(());
                }
            }
        }
        Err("a read went round 16 times without an outcome".into())
    }

    /// The receiver, stuck in a write of its own, at the end of a wait slice
    /// (`answer_spill`): if the sender's plea is current, settle.
    fn rx_slice(&mut self) -> Result<(), Fail> {
        self.rx_pump()?;
        if self.rx.spill_asked(self.ring.written) {
            self.note("rx answers the plea".into());
            self.seen.plea_answered = true;
            self.rx_settle()?;
        }
        Ok(())
    }

    /// A read, unless the receiver is stuck in its write: then a wait slice.
    fn rx_turn(&mut self, max: usize) -> Result<(), Fail> {
        match self.rx_stuck_until {
            Some(until) if self.next < until => self.rx_slice(),
            Some(_) => {
                self.note("rx's write goes through: it reads again".into());
                self.rx_stuck_until = None;
                self.rx_read(max)
            }
            None => self.rx_read(max),
        }
    }

    /// `settle_receiving`.
    fn rx_settle(&mut self) -> Result<(), Fail> {
        self.rx_pump()?;
        let rewind = self.rx.rewind();
        // Sent first: if it cannot be, nothing changes, and the ring is read on.
        if !self.rx_send(rewind) {
            return Ok(());
        }
        assert_eq!(self.rx.settle(), rewind);
        self.note(format!("rx settles: {rewind:?}"));
        self.ring.reader_closed = true;
        Ok(())
    }

    /// The receiver's process execs (`vmc run`'s exec hook): it settles its
    /// receiving direction, then exec closes the control socket, after every frame
    /// it sent. Its new image reads TCP as a plain program.
    fn rx_exec(&mut self) -> Result<(), Fail> {
        if !self.rx.is_settled() {
            self.rx_settle()?;
        }
        if !self.rx.is_settled() {
            // Its REWIND was refused (the sender execs too, and had its last
            // word): the new image reads the kernel's socket all the same. The
            // sender revoked the ring before, unless it held nothing unread.
            self.note("rx's REWIND was refused: its new image reads TCP".into());
            self.seen.both_exec = true;
            self.rx.settle();
            self.ring.reader_closed = true;
        }
        self.note("rx execs: the control channel is closed".into());
        self.cut = true;
        self.to_rx.clear();
        Ok(())
    }

    /// The sender died and the receiver came to an end. Unless its kernel reset
    /// TCP (losing what was in flight), or the receiver had given the ring up (a
    /// REWIND the dead sender never served), every byte it wrote was delivered: the
    /// ring's memory outlives it, and a move to TCP it announced is followed.
    fn check_dead_end(&self) -> Result<(), Fail> {
        let whole = !self.tcp.reset && !self.rx.is_settled();
        if whole && self.got != self.next {
            return Err(format!(
                "the sender died without a reset, and the receiver got {} bytes of {}",
                self.got, self.next
            ));
        }
        if self.rx.end() == Some(super::RxEnd::Reset) {
            return Err("a reset on the ring was reported, and still stands".into());
        }
        Ok(())
    }

    // ---- the schedule ----------------------------------------------------------

    /// The receiver died: the sender writes on (looking at the connection now and
    /// then, as a program does) and must learn of the death from an error within a
    /// bounded number of writes, whatever it was waiting for (the peer's answer
    /// to a move, its verdict on the ring, room).
    fn after_rx_death(&mut self, max_write: u64) -> Result<(), Fail> {
        for writes in 1..=1_000 {
            let n = 1 + self.rng.below(max_write) as usize;
            self.tx_write(n)?;
            if self.tx_error {
                self.seen.writes_to_learn = writes;
                return Ok(());
            }
            if self.rng.chance(30) {
                self.tx_look()?;
            }
        }
        Err("the sender never learnt that the receiver died".into())
    }

    fn run(&mut self) -> Result<(), Fail> {
        let steps = 20 + self.rng.below(300);
        let max_write = 1 + 2 * self.ring.cap as u64;
        for _ in 0..steps {
            if self.tx_dead || self.rx_dead {
                break;
            }
            // While the sender execs, and after, its turns are the exec hook's
            // and then a plain program's.
            let execs = self.tx_exec || self.tx_plain;
            match self.rng.below(100) {
                0..=29 => {
                    let n = 1 + self.rng.below(max_write) as usize;
                    self.tx_turn(n)?;
                }
                30..=54 => {
                    let n = 1 + self.rng.below(max_write) as usize;
                    self.rx_turn(n)?;
                }
                55..=69 => {
                    let n = self.rng.below(max_write) as usize;
                    self.tcp.deliver(n);
                }
                70..=79 if !execs => {
                    let to = if self.rng.chance(50) {
                        Path::Tcp
                    } else {
                        Path::Shm
                    };
                    self.tx_choose(to);
                }
                80..=89 if execs => self.tx_exec_step()?,
                80..=89 => self.tx_look()?,
                90..=94 => self.rx_pump()?,
                95 if !self.rx.is_settled() && self.rng.chance(30) => self.rx_settle()?,
                96 if !execs && !self.tx.for_good() && self.rng.chance(30) => self.tx_settle()?,
                97 if !execs && self.rng.chance(10) => {
                    if self.rng.chance(50) {
                        self.tx_die();
                    } else {
                        self.tx_exec_begin()?;
                    }
                }
                // (While the sender execs too, half as often.)
                99 if (!execs || self.rng.chance(50))
                    && !self.cut
                    && self.rx_stuck_until.is_none()
                    && self.rng.chance(10) =>
                {
                    if self.rng.chance(50) {
                        self.rx_exec()?;
                    } else {
                        self.rx_die();
                    }
                }
                98 if self.rx_stuck_until.is_none() && self.rng.chance(20) => {
                    let ahead = self.next + 2 * self.ring.cap as u64 + self.rng.below(64);
                    self.note(format!("rx is stuck in a write until tx wrote {ahead}"));
                    self.rx_stuck_until = Some(ahead);
                }
                _ => {}
            }
        }
        if self.rx_dead {
            return self.after_rx_death(max_write);
        }
        if self.tx_dead {
            for _ in 0..10_000 {
                if self.eof {
                    return self.check_dead_end();
                }
                self.tcp.deliver(1 + self.rng.below(64) as usize);
                let n = 1 + self.rng.below(max_write) as usize;
                self.rx_read(n)?;
            }
            return Err("the receiver of a dead sender never came to an end".into());
        }
        // A receiver still stuck waits for the sender to write far enough ahead,
        // which it must manage without the receiver reading.
        let mut turns = 0;
        while let Some(until) = self.rx_stuck_until.filter(|&u| self.next < u) {
            turns += 1;
            if turns > 1_000 {
                return Err(format!(
                    "deadlock: the sender is stuck at {} of {until} and the receiver in \
                     its write\n  sender: {:?}\n  receiver: {:?}\n  ring: {} bytes, \
                     written {}, paused {}",
                    self.next,
                    self.tx,
                    self.rx,
                    self.ring.bytes.len(),
                    self.ring.written,
                    self.ring.paused
                ));
            }
            let n = 1 + self.rng.below(max_write) as usize;
            if self.tx.path() != self.tx.wants() && self.rng.chance(50) && !self.tx_exec {
                self.tx.stay();
            }
            self.tx_turn(n)?;
            self.tcp.deliver(self.rng.below(max_write) as usize);
            if self.rng.chance(50) {
                self.rx_slice()?;
            }
        }
        self.rx_stuck_until = None;
        // The end: an exec under way completes (the receiver reads meanwhile).
        for _ in 0..10_000 {
            if !self.tx_exec {
                break;
            }
            self.tx_exec_step()?;
            self.tcp.deliver(1 + self.rng.below(64) as usize);
            let n = 1 + self.rng.below(max_write) as usize;
            self.rx_read(n)?;
        }
        if self.tx_exec {
            return Err("the sender's exec never got past its settling".into());
        }
        // The sender finishes any move it started, shuts down (a new image
        // closes its socket), and both sides run until the receiver sees the end.
        if self.tx_plain {
            self.tcp.fin_sent = true;
        } else {
            self.tx_look()?;
            if self.tx.path() != self.tx.wants() {
                // Stays where it is, as a program that stops writing does.
                self.tx.stay();
            }
            self.tx_shutdown();
        }
        for _ in 0..10_000 {
            if self.eof {
                break;
            }
            if !self.tx_plain {
                self.tx_look()?;
            }
            self.tcp.deliver(1 + self.rng.below(64) as usize);
            let n = 1 + self.rng.below(max_write) as usize;
            self.rx_read(n)?;
        }
        if !self.eof {
            return Err("the receiver never reached the end of the stream".into());
        }
        if self.got != self.next {
            return Err(format!(
                "the receiver got {} bytes of {} at the end",
                self.got, self.next
            ));
        }
        Ok(())
    }
}

fn schedules() -> u64 {
    std::env::var("VMC_SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

fn first_seed() -> u64 {
    match std::env::var("VMC_SIM_SEED") {
        Ok(s) => s.parse().expect("VMC_SIM_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

#[test]
fn every_schedule_delivers_the_exact_stream_and_ends() {
    let first = first_seed();
    let n = schedules();
    eprintln!("proto::sim: {n} schedules from seed {first}");
    let mut tally = Tally::default();
    for i in 0..n {
        let seed = first.wrapping_add(i);
        let mut w = World::new(seed);
        let ran = w.run();
        tally.add(&w);
        if let Err(e) = ran {
            panic!(
                "schedule {seed} failed: {e}\nlast steps:\n  {}\nreplay: VMC_SIM_SEED={seed} \
                 VMC_SIM_SCHEDULES=1 cargo test -p vmc-conn --lib proto::sim",
                w.log.join("\n  ")
            );
        }
    }
    eprintln!("proto::sim: {tally}");
}
