//! The sending direction: writes on TCP or the ring as `proto::Sender` says,
//! moves between them, serves REWIND, and the sliced waits that plead (SPILL)
//! so that two ends writing ahead never wait for each other for ever.

use super::*;

impl Conn {
    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_opts(buf, false)
    }

    /// Writes like `send(2)`; `dontwait` is `MSG_DONTWAIT`. Never raises SIGPIPE: a
    /// closed peer is a `BrokenPipe` error.
    pub(crate) fn write_opts(&self, buf: &[u8], dontwait: bool) -> io::Result<usize> {
        self.advance();
        let mut tx = self.tx.lock();
        if self.is_pending() && !(dontwait || tx.nonblocking) {
            self.await_answer();
        }
        let r = self.write_locked(&mut tx, buf, dontwait);
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.tx_blocked.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Accepting side, a blocking write while the offer waits for the client's
    /// answer: a client waiting for this reply (blocked in a read) answers within
    /// microseconds, and waiting that long puts the reply on the ring instead of
    /// TCP. Once per connection, at most [`ANSWER_WAIT`]; never for a write that
    /// must not block (an event loop's, which goes on TCP).
    pub(super) fn await_answer(&self) {
        let Some(SetupFd::Offer(fd)) = self.setup_fd.get() else {
            return;
        };
        if self.answer_awaited.swap(true, Ordering::Relaxed) {
            return;
        }
        let wait = Timespec {
            tv_sec: 0,
            tv_nsec: ANSWER_WAIT.as_nanos() as i64,
        };
        let mut fds = [PollFd::from_borrowed_fd(fd.as_fd(), PollFlags::IN)];
        let _ = poll(&mut fds, Some(&wait));
        self.advance();
    }

    pub(super) fn write_locked(
        &self,
        tx: &mut Tx,
        buf: &[u8],
        dontwait: bool,
    ) -> io::Result<usize> {
        if tx.proto.is_shut() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "vmc connection: write after shutdown",
            ));
        }
        if let Some(to) = self.home.take_request() {
            // `vmc migrate`: as `set_tx_path`, at this write (the ring is refused
            // once the direction is on TCP for good).
            let _ = tx.proto.choose(to);
        }
        self.serve_rewind(tx)?;
        if !tx.backlog.is_empty() && !self.flush_backlog(tx, dontwait)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if tx.proto.path() != tx.proto.wants() && self.is_accelerated() {
            let to = tx.proto.wants();
            match self.move_tx(tx, to, dontwait) {
                // A REWIND came meanwhile and was served: its bytes go first.
                Ok(true) => return self.write_locked(tx, buf, dontwait),
                Ok(false) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                // The control socket is gone with the peer: there is nobody to
                // announce a move to, so stay on this path and let it report the
                // peer's state (as TCP would: one more write, then EPIPE).
                Err(e) => {
                    tracing::debug!("vmc connection: cannot move sending to {to:?}: {e}");
                    tx.proto.stay();
                }
            }
        }
        match tx.proto.path() {
            Path::Tcp => {
                if self.is_accelerated() && self.ring_unread(tx) {
                    // Off the ring with bytes the peer has not read: nothing may
                    // go on TCP before its answer (see `Sender::tcp_waits_for_ring`).
                    self.wait_for_peer(tx, dontwait, |c, tx| !c.ring_unread(tx))?;
                    return self.write_locked(tx, buf, dontwait);
                }
                let mut flags = SendFlags::NOSIGNAL;
                // While the ring carries the other direction, a blocking send
                // must hear the peer's pleas as it waits (see `wait_tcp_room`).
                let sliced = !dontwait
                    && !tx.nonblocking
                    && tx.timeout.is_none()
                    && !buf.is_empty()
                    && self.is_accelerated();
                if dontwait || sliced {
                    flags |= SendFlags::DONTWAIT;
                }
                let n = loop {
                    match send(&self.tcp, buf, flags) {
                        Err(rustix::io::Errno::AGAIN) if sliced => self.wait_tcp_room(tx, None)?,
                        Err(rustix::io::Errno::INTR) if sliced => {}
                        r => break r?,
                    }
                };
                tx.proto.wrote(n);
                bump(&self.counters().tcp_out, n);
                Ok(n)
            }
            Path::Shm => {
                if !dontwait && !tx.nonblocking && tx.timeout.is_none() && !buf.is_empty() {
                    self.wait_ring_room(tx)?;
                }
                let ring = tx.ring.as_mut().expect("shm path has a ring");
                if dontwait && !buf.is_empty() && !ring.is_ready() {
                    if !ring.peer_alive() {
                        return Err(peer_gone());
                    }
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                match ring.write(buf) {
                    Ok(n) => {
                        tx.proto.wrote(n);
                        bump(&self.counters().shm_out, n);
                        Ok(n)
                    }
                    // The peer closed its end to read on from TCP (its REWIND is
                    // queued on the control socket): go there.
                    Err(e)
                        if e.kind() == io::ErrorKind::BrokenPipe
                            && self.read_control().is_ok()
                            && self.tx_news(tx).is_ok()
                            && tx.proto.rewind_asked() =>
                    {
                        self.serve_rewind(tx)?;
                        self.write_locked(tx, buf, dontwait)
                    }
                    // The peer closed its end. Do what TCP does: the first write after
                    // the peer's close still succeeds and draws a reset, later ones
                    // fail (EPIPE), and poll reports the error and the hang-up.
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                        let n = send(&self.tcp, buf, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)?;
                        bump(&self.counters().tcp_out, n);
                        Ok(n)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// A blocking write (no timeout) waits for room in the ring, in slices of
    /// [`SPILL_AFTER`]. Two programs that each write more than a ring holds before
    /// reading would otherwise wait for each other for ever, where TCP's buffers
    /// (megabytes) let them finish. After each slice: if the peer pleaded (SPILL)
    /// while we wait here, and so do not read, our receiving direction goes to TCP
    /// for good (REWIND), which frees the peer; and we plead ourselves. Returns
    /// once a write would not wait (room, the reader closed, the peer died).
    pub(super) fn wait_ring_room(&self, tx: &mut Tx) -> io::Result<()> {
        loop {
            let ring = tx.ring.as_mut().expect("shm path has a ring");
            if ring.is_ready() {
                return Ok(());
            }
            ring.set_timeout(Some(SPILL_AFTER))?;
            let waited = ring.wait_ready();
            ring.set_timeout(None)?;
            match waited {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                // Room, or an error the write itself reports.
                _ => return Ok(()),
            }
            if vmc_os::interrupt::pending() {
                return Err(vmc_os::interrupt::error());
            }
            self.plead(tx)?;
        }
    }

    /// Waits until TCP takes more (or `limit` passes: then `WouldBlock`). While the
    /// connection is accelerated, in slices of [`SPILL_AFTER`] after which it
    /// answers the peer's plea: the peer may wait for room in the ring we read,
    /// while we wait for it to read TCP (see [`Conn::wait_ring_room`]).
    pub(super) fn wait_tcp_room(&self, tx: &mut Tx, limit: Option<Duration>) -> io::Result<()> {
        let started = Instant::now();
        loop {
            let mut slice = limit.map(|l| l.saturating_sub(started.elapsed()));
            if slice.is_some_and(|s| s.is_zero()) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let sliced = self.is_accelerated();
            if sliced {
                slice = Some(slice.map_or(SPILL_AFTER, |s| s.min(SPILL_AFTER)));
            }
            let ts = slice.map(|d| Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            });
            let mut fds = [PollFd::new(&self.tcp, PollFlags::OUT)];
            match poll(&mut fds, ts.as_ref()) {
                Ok(0) if sliced => {
                    if vmc_os::interrupt::pending() {
                        return Err(vmc_os::interrupt::error());
                    }
                    self.plead(tx)?;
                }
                Ok(0) => {}
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {
                    if vmc_os::interrupt::pending() {
                        return Err(vmc_os::interrupt::error());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A blocking write has waited a slice for the peer in vain: answer the
    /// peer's plea if it made one (both of us wait, neither reads), and plead.
    pub(super) fn plead(&self, tx: &mut Tx) -> io::Result<()> {
        self.read_control()?;
        // (A REWIND or the control channel's close, read just now, ends pleas.)
        self.tx_news(tx)?;
        if self.spill_asked.load(Ordering::Acquire) {
            self.answer_spill()?;
        }
        if let Some(plea) = tx.proto.spill() {
            tracing::debug!("vmc connection: a write waits for the peer; pleading {plea:?}");
            // A peer that shut its control channel (it settled, for an exec) or is
            // gone hears no plea; the write's own wait tells what became of it.
            if let Err(e) = self.send_control(plea) {
                tracing::debug!("vmc connection: could not plead: {e}");
            }
        }
        Ok(())
    }

    /// The peer waits for room in the ring we read, and we wait in a write: move
    /// our receiving direction to TCP for good, so that the peer goes on there.
    pub(super) fn answer_spill(&self) -> io::Result<()> {
        // A reader holding the lock is reading: the peer's wait ends without us.
        let Some(mut rx) = self.rx.try_lock() else {
            return Ok(());
        };
        self.rx_news(&mut rx)?;
        self.spill_asked.store(false, Ordering::Release);
        // Where the ring we read ends now: a plea made there is current.
        let parts = self.parts().ok_or_else(|| protocol("no channel"))?;
        let end = match rx.ring.as_mut() {
            Some(ring) => ring.position() + ring.arrived()? as u64,
            None => match lock(&parts.reader).as_mut() {
                Some(ring) => ring.position() + ring.arrived()? as u64,
                None => return Ok(()),
            },
        };
        if !rx.proto.spill_asked(end) {
            return Ok(());
        }
        tracing::debug!(
            "vmc connection: both ends wait for room in a ring; the peer's bytes to us \
             go on over TCP"
        );
        // Refused (the peer shut its control channel): nothing changed, and the
        // ring is read on.
        if let Err(e) = self.settle_rx_locked(&mut rx) {
            tracing::debug!("vmc connection: could not answer the plea: {e}");
        }
        Ok(())
    }

    /// True if TCP must wait for the peer's answer to our move off the ring: it
    /// has not said it read the ring to the end, and the ring is not empty.
    pub(super) fn ring_unread(&self, tx: &mut Tx) -> bool {
        let _ = self.tx_news(tx);
        tx.proto.tcp_waits_for_ring() && tx.ring.as_mut().is_some_and(|r| r.queued() > 0)
    }

    /// Serves the peer's REWIND, if one is queued: our sending direction moves to
    /// TCP for good, starting with every byte the peer did not read from the ring.
    /// Called with the sending side locked, by whichever thread gets there first
    /// (a writer, an event loop's readiness check, a reader pumping the control
    /// socket).
    pub(super) fn serve_rewind(&self, tx: &mut Tx) -> io::Result<()> {
        self.tx_news(tx)?;
        let Some(plan) = tx.proto.serve_rewind()? else {
            return Ok(());
        };
        match plan {
            Rewind::Resend { from, pause } => {
                let ring = tx
                    .ring
                    .as_mut()
                    .ok_or_else(|| protocol("REWIND of a ring never written"))?;
                let back = ring.take_back(from).map_err(|e| {
                    protocol(&format!("REWIND to an offset the ring cannot give: {e}"))
                })?;
                if pause {
                    ring.pause();
                    self.publish(flag::TX_SHM, false);
                }
                tracing::debug!(
                    "vmc connection: the peer stopped reading the ring at {from}; {} \
                     byte(s) go again, on TCP, ahead of everything after them",
                    back.len()
                );
                tx.backlog = back;
            }
            Rewind::Nothing => {}
            Rewind::Lost { from, at } => tracing::warn!(
                "vmc connection: the peer asked for the ring's bytes from {from} again, \
                 but we left the ring at {at} and sent on TCP since: they cannot be sent again"
            ),
        }
        self.flush_backlog(tx, true)?;
        Ok(())
    }

    /// Puts what a REWIND gave back on TCP, before anything else goes there; then
    /// the FIN a shutdown owes. Without `dontwait` this waits for room as the
    /// direction's mode says. True once the backlog is gone; while it is not,
    /// [`Conn::flush_owed`] goes on with it wherever the connection is looked at.
    pub(super) fn flush_backlog(&self, tx: &mut Tx, dontwait: bool) -> io::Result<bool> {
        let r = self.flush_backlog_inner(tx, dontwait);
        // Owed while room is what it lacks. After another error the socket
        // reports it to every later call: nothing more will go, and no wait
        // should watch for room.
        let owed = match &r {
            Ok(done) => !done,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
        self.backlog_owed
            .store(owed && !tx.backlog.is_empty(), Ordering::Release);
        r
    }

    /// Goes on with a backlog that TCP did not take at once (see
    /// `Conn::backlog_owed`), if the sending side is free: a thread holding it
    /// is writing, and flushes it first anyway. (Taking that lock from a
    /// reader's look is safe here: with a backlog, sending is on TCP for good,
    /// and a writer's `arm` that finds the lock taken has no ring to arm.)
    pub(super) fn flush_owed(&self) {
        if !self.backlog_owed.load(Ordering::Acquire) {
            return;
        }
        if let Some(mut tx) = self.tx.try_lock() {
            if let Err(e) = self.flush_backlog(&mut tx, true) {
                tracing::debug!("vmc connection: the bytes taken back from the ring: {e}");
            }
        }
    }

    /// True if a backlog waits for room on TCP: a wait should watch for it.
    pub(super) fn backlog_owed(&self) -> bool {
        self.backlog_owed.load(Ordering::Acquire)
    }

    fn flush_backlog_inner(&self, tx: &mut Tx, dontwait: bool) -> io::Result<bool> {
        let started = Instant::now();
        while !tx.backlog.is_empty() {
            match send(
                &self.tcp,
                &tx.backlog,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(n) => {
                    tx.backlog.drain(..n);
                    tx.proto.wrote(n);
                    bump(&self.counters().tcp_out, n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    if dontwait || tx.nonblocking {
                        return Ok(false);
                    }
                    let left = match tx.timeout {
                        Some(t) => match t.checked_sub(started.elapsed()) {
                            Some(left) => Some(left),
                            None => return Err(io::ErrorKind::WouldBlock.into()),
                        },
                        None => None,
                    };
                    self.wait_tcp_room(tx, left)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        tx.backlog = Vec::new();
        if tx.proto.backlog_sent() {
            self.tcp.shutdown(Shutdown::Write)?;
        }
        Ok(true)
    }

    /// Moves our sending direction to `to` at the current byte boundary. True if a
    /// REWIND came first and was served instead (the direction is on TCP for good,
    /// with the REWIND's bytes perhaps still in the backlog).
    pub(super) fn move_tx(&self, tx: &mut Tx, to: Path, dontwait: bool) -> io::Result<bool> {
        if tx.proto.path() == to {
            return Ok(false);
        }
        // The peer must have left `to` where we last moved off it, or it could read
        // what we send there now before the stretch on the other path in between.
        // (A move is called off when the news is the control channel's close:
        // the machine then wants to stay where it is.)
        self.wait_for_peer(tx, dontwait, |_, tx| {
            tx.proto.may_move(to) || tx.proto.rewind_asked() || tx.proto.wants() != to
        })?;
        if tx.proto.rewind_asked() {
            self.serve_rewind(tx)?;
            return Ok(true);
        }
        if tx.proto.wants() != to {
            return Ok(false);
        }
        let switch = tx.proto.switch_to(to);
        match to {
            Path::Shm => {
                if tx.ring.is_none() {
                    tx.ring = self.parts().and_then(|p| lock(&p.writer).take());
                }
                let ring = tx
                    .ring
                    .as_mut()
                    .ok_or_else(|| protocol("no channel to move onto"))?;
                ring.set_nonblocking(tx.nonblocking);
                ring.set_timeout(tx.timeout)?;
                // Open before announcing: the receiver must find the ring open.
                ring.resume();
                self.send_control(switch)?;
            }
            Path::Tcp => {
                self.send_control(switch)?;
                // Paused after announcing: a receiver that finds the ring paused
                // finds the SWITCH too (else it is the end of the stream).
                tx.ring.as_mut().expect("shm path has a ring").pause();
            }
        }
        tx.proto.moved(to);
        self.publish(flag::TX_SHM, to == Path::Shm);
        Ok(false)
    }

    /// Waits until the peer's news make `done` true (reading the control socket as
    /// they come), as the direction's mode and timeout say.
    pub(super) fn wait_for_peer(
        &self,
        tx: &mut Tx,
        dontwait: bool,
        done: impl Fn(&Conn, &mut Tx) -> bool,
    ) -> io::Result<()> {
        let started = Instant::now();
        loop {
            let mark = self.bells.mark(bell::TX);
            self.pump_control()?;
            self.tx_news(tx)?;
            if done(self, tx) {
                return Ok(());
            }
            if tx.nonblocking || dontwait {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if tx.timeout.is_some_and(|t| started.elapsed() >= t) {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "vmc connection: write timed out",
                ));
            }
            let parts = self.parts().ok_or_else(|| protocol("no control socket"))?;
            let mut nap = match self.bells.sleep(bell::TX, mark) {
                Nap::Rung => continue,
                Nap::Sleep(s) => Some(s),
                Nap::NoBell => None,
            };
            let mut fds = vec![PollFd::from_borrowed_fd(
                parts.ctl(),
                PollFlags::IN | PollFlags::RDHUP,
            )];
            if let Some(s) = &nap {
                fds.push(PollFd::from_borrowed_fd(s.fd(), PollFlags::IN));
            }
            let slice = Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            let polled = poll(&mut fds, Some(&slice));
            let fired = fds.len() > 1 && !fds[1].revents().is_empty();
            let ctl_gone = fds[0]
                .revents()
                .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR);
            drop(fds);
            if let Some(s) = &mut nap {
                s.fired = fired;
            }
            drop(nap);
            match polled {
                Ok(0) => self.plead(tx)?,
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            if ctl_gone {
                self.pump_control()?;
                self.tx_news(tx)?;
                if !done(self, tx) {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "vmc connection: the peer is gone",
                    ));
                }
            }
        }
    }

    /// Chooses the path of our sending direction; the move happens now if the
    /// channel is attached, else as soon as it is.
    pub(crate) fn set_tx_path(&self, to: Path) -> io::Result<()> {
        self.advance();
        let mut tx = self.tx.lock();
        // The control channel's state first: a refusal must say what stands now.
        let _ = self.tx_news(&mut tx);
        if let Err(why) = tx.proto.choose(to) {
            return Err(match why {
                Refused::ForGood => io::Error::new(
                    io::ErrorKind::Unsupported,
                    "vmc connection: moved to TCP for good",
                ),
                // As any call that needs the peer after it died (or exec'd).
                Refused::ControlClosed => io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "vmc connection: the peer is gone (its control channel closed)",
                ),
            });
        }
        if self.is_accelerated() && !tx.proto.is_shut() {
            self.move_tx(&mut tx, to, false)?;
        }
        Ok(())
    }

    pub(crate) fn tx_path(&self) -> Path {
        self.tx.lock().proto.path()
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut how = how;
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            let mut tx = self.tx.lock();
            let shut = tx.proto.shutdown();
            if shut.first {
                self.tx_shut.store(true, Ordering::Release);
                if let Some(ring) = tx.ring.as_mut() {
                    ring.shutdown();
                }
            }
            // The ring carries this end of stream (or a backlog still has to go
            // first): TCP's FIN waits, see `Shut::fin_waits`.
            if shut.fin_waits {
                match how {
                    Shutdown::Write => return Ok(()),
                    _ => how = Shutdown::Read,
                }
            }
        }
        self.tcp.shutdown(how)
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)?;
        let mut tx = self.tx.lock();
        tx.timeout = t;
        if let Some(w) = tx.ring.as_mut() {
            w.set_timeout(t)?;
        }
        Ok(())
    }

    pub(crate) fn write_timeout(&self) -> Option<Duration> {
        self.tx.lock().timeout
    }
}
