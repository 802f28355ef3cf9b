//! Readiness for event loops (see `crate::ready`): what a read or a write would
//! find now, and arming the rings' wake-ups before a wait.

use super::*;

impl Conn {
    /// The kernel's view of the TCP socket, without waiting.
    pub(super) fn tcp_events(&self) -> PollFlags {
        let mut fds = [PollFd::new(
            &self.tcp,
            PollFlags::IN | PollFlags::OUT | PollFlags::RDHUP,
        )];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&zero)) {
            Ok(_) => fds[0].revents(),
            Err(_) => PollFlags::empty(),
        }
    }

    /// What the connection is ready for now. Without `deep`, and while the wanted
    /// directions are on shared memory, this makes no system call; `deep` also asks
    /// the kernel about the TCP socket (hang-ups, errors) and the peer's liveness.
    pub(crate) fn readiness(&self, want: Interest, deep: bool) -> Ready {
        self.advance();
        // Whatever the interest: a loop that only waits to read still sends what
        // a REWIND gave back (and the FIN after it) as TCP makes room.
        self.flush_owed();
        let mut r = Ready::default();
        let mut tcp: Option<PollFlags> = None;
        if want.read {
            if let Some(mut rx) = self.rx.try_lock() {
                // A reader holding the lock takes whatever comes; otherwise look.
                let ended;
                (r.readable, ended) = match self.rx_ready(&mut rx, deep, &mut tcp) {
                    Ok(RxReady::Bytes) => (true, false),
                    Ok(RxReady::End) => (true, true),
                    Ok(RxReady::No) => (false, false),
                    Err(_) => (true, false),
                };
                r.read_closed = ended;
                let queued = match rx.proto.path() {
                    // Everything published: an edge-triggered waiter is owed an
                    // event whenever more bytes arrived, read or not.
                    Path::Shm => rx
                        .ring
                        .as_mut()
                        .map_or(0, |ring| ring.arrived().unwrap_or(0)),
                    Path::Tcp => rustix::io::ioctl_fionread(&self.tcp).unwrap_or(0) as usize,
                };
                let c = self.counters();
                r.rx_mark = c.tcp_in.load(Ordering::Relaxed)
                    + c.shm_in.load(Ordering::Relaxed)
                    + queued as u64
                    + self.rx_blocked.load(Ordering::Relaxed);
            }
        }
        // A connection that is closing shows it on its TCP socket too (hang-ups,
        // resets): look there whenever the rings say an end is closed.
        let mut closing = r.read_closed;
        if want.write {
            if let Some(mut tx) = self.tx.try_lock() {
                r.writable = self.tx_ready(&mut tx, deep, &mut tcp).unwrap_or(true);
                closing |= tx.ring.as_ref().is_some_and(|w| w.reader_closed());
                // Like the kernel (SOCK_NOSPACE), a fresh "writable" edge is owed only
                // after a write found no room.
                r.tx_mark = self.tx_blocked.load(Ordering::Relaxed);
            }
        }
        // Both directions shut, ours by shutdown and the peer's by the end on the
        // ring: the kernel's HUP (whatever the interest), which TCP cannot show
        // while the FINs wait (see `proto::Shut::fin_waits`). From flags, not the other
        // direction's lock: an event loop's look must never make the other
        // direction's `arm` find its lock taken (it would sleep unarmed).
        if self.tx_shut.load(Ordering::Acquire)
            && (r.read_closed || self.rx_ended.load(Ordering::Acquire))
        {
            r.hup = true;
        }
        if deep || closing || tcp.is_some() {
            let ev = *tcp.get_or_insert_with(|| self.tcp_events());
            r.hup |= ev.contains(PollFlags::HUP);
            r.error = ev.contains(PollFlags::ERR);
            // The kernel says "read returns 0 eventually" as soon as the FIN is in;
            // the ring's end may lag it by a moment, so report it with readability.
            r.read_closed |= ev.contains(PollFlags::RDHUP) && r.readable;
            if r.hup && want.read && !r.readable {
                r.readable = true;
            }
        }
        r
    }

    pub(super) fn rx_ready(
        &self,
        rx: &mut Rx,
        deep: bool,
        tcp: &mut Option<PollFlags>,
    ) -> io::Result<RxReady> {
        loop {
            match rx.proto.step() {
                RxStep::Ended(_) => return Ok(RxReady::End),
                RxStep::Ring => {
                    let ring = rx.ring.as_mut().expect("shm path has a ring");
                    if ring.is_ready() {
                        if ring.available()? > 0 {
                            return Ok(RxReady::Bytes);
                        }
                        if !self.leave_ring(rx)? {
                            self.rx_ended.store(true, Ordering::Release);
                            return Ok(RxReady::End);
                        }
                        continue;
                    }
                    if deep && !ring.peer_alive() {
                        return Ok(RxReady::Bytes); // the read reports the reset
                    }
                    return Ok(RxReady::No);
                }
                RxStep::EnterRing => self.enter_ring(rx)?,
                RxStep::Tcp { limit } => {
                    let ev = *tcp.get_or_insert_with(|| self.tcp_events());
                    if ev.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
                        return Ok(RxReady::Bytes);
                    }
                    if limit.is_none() && self.is_accelerated() && self.follow_to_ring(rx)? {
                        continue;
                    }
                    return Ok(RxReady::No);
                }
            }
        }
    }

    pub(super) fn tx_ready(
        &self,
        tx: &mut Tx,
        deep: bool,
        tcp: &mut Option<PollFlags>,
    ) -> io::Result<bool> {
        self.serve_rewind(tx)?;
        let flushed = tx.backlog.is_empty() || self.flush_backlog(tx, true)?;
        if tx.proto.is_shut() {
            return Ok(true);
        }
        if !flushed {
            return Ok(false);
        }
        let mut path = tx.proto.path();
        if path != tx.proto.wants() && self.is_accelerated() {
            // The next write moves first, which needs the peer's LEFT answer (or
            // serves a REWIND that came meanwhile).
            self.pump_control()?;
            self.tx_news(tx)?;
            if tx.proto.rewind_asked() {
                return Ok(true);
            }
            // (The news may have been the control channel's close, which keeps
            // the direction where it is: then there is no move to wait for.)
            let to = tx.proto.wants();
            if to != path {
                if !tx.proto.may_move(to) {
                    return Ok(false);
                }
                path = to;
            }
        } else if path == Path::Tcp && self.is_accelerated() && self.ring_unread(tx) {
            // Waits for the peer's answer to our move off the ring.
            return Ok(false);
        }
        match path {
            Path::Shm => Ok(match tx.ring.as_mut() {
                // A dead peer makes a write report it: "ready".
                Some(ring) => ring.is_ready() || (deep && !ring.peer_alive()),
                None => self
                    .parts()
                    .and_then(|p| lock(&p.writer).as_mut().map(|w| w.is_ready()))
                    .unwrap_or(true),
            }),
            Path::Tcp => {
                let ev = *tcp.get_or_insert_with(|| self.tcp_events());
                Ok(ev.intersects(PollFlags::OUT | PollFlags::HUP | PollFlags::ERR))
            }
        }
    }

    pub(super) fn waitset(&self) -> io::Result<&WaitSet> {
        if let Some(w) = self.waitset.get() {
            return Ok(w);
        }
        let w = WaitSet::new()?;
        Ok(self.waitset.get_or_init(|| w))
    }

    /// Prepares to wait for `want`: watches everything that may change it and asks
    /// the rings' peers for a wake-up. Returns what is ready if something already is
    /// (nothing stays armed then); otherwise the caller waits for
    /// [`Conn::wait_fd`] to turn readable, then calls [`Conn::disarm`] and looks
    /// again.
    ///
    /// Several event loops may wait at once (threads polling one socket, a reader
    /// and a writer task): each ring stays armed while anyone waits for it, and the
    /// first loop to find a second one beside it is woken to look again, as the
    /// second one's arming may consume an edge meant for it. From then on
    /// [`Conn::shared_wait`] tells them to look again now and then.
    pub(crate) fn arm(&self, want: Interest) -> io::Result<Option<Ready>> {
        let ws = self.waitset()?;
        let others = self.waiters.fetch_add(1, Ordering::AcqRel);
        if want.read {
            self.armed_for[0].fetch_add(1, Ordering::AcqRel);
        }
        if want.write {
            self.armed_for[1].fetch_add(1, Ordering::AcqRel);
        }
        ws.drain();
        if others > 0 && !self.shared_kicked.swap(true, Ordering::AcqRel) {
            self.kick();
        }
        let mut tcp_ev = EventFlags::IN | EventFlags::RDHUP;
        // TCP's writability matters only while sending goes (or is about to go)
        // there; watching it otherwise would report a stale edge at every change.
        // (Only for a write interest: a reader's arm must not take the sending
        // side's lock, see `readiness`. And while a REWIND's bytes wait for room
        // there, whatever the interest: the look after the wait sends them.)
        let sends_tcp = || {
            self.tx.try_lock().map_or(true, |tx| {
                tx.proto.path() == Path::Tcp || tx.proto.wants() == Path::Tcp
            })
        };
        if (want.write && sends_tcp()) || self.backlog_owed() {
            tcp_ev |= EventFlags::OUT;
        }
        ws.watch(self.tcp.as_fd(), tcp_ev)?;
        if !self.is_plain() {
            // Made at the first wait of an event loop; the state is looked at below.
            if let Ok(b) = self.bells.loop_fds() {
                ws.watch(b[bell::RX].fd(), EventFlags::IN)?;
                ws.watch(b[bell::TX].fd(), EventFlags::IN)?;
            }
        }
        match (self.parts(), self.setup_fd.get()) {
            (Some(p), setup) => {
                ws.watch(p.ctl(), EventFlags::IN | EventFlags::RDHUP)?;
                if let Some(fd) = p.wake.read() {
                    ws.watch(fd, EventFlags::IN)?;
                }
                if let Some(fd) = p.wake.write() {
                    ws.watch(fd, EventFlags::IN)?;
                }
                if let Some(fd) = setup {
                    ws.unwatch(fd.as_fd());
                }
            }
            (None, Some(fd)) if self.is_pending() => ws.watch(fd.as_fd(), EventFlags::IN)?,
            // Settled on plain TCP: the handshake has nothing more to say.
            (None, Some(fd)) => ws.unwatch(fd.as_fd()),
            _ => {}
        }
        if want.read {
            if let Some(mut rx) = self.rx.try_lock() {
                // TCP delivered everything before the peer's move to the ring: the
                // next bytes come on the ring, so that is what must be armed (the
                // look below would enter the ring only after arming, and the wait
                // would then sleep on a ring nobody was asked to wake us for).
                if rx.proto.step() == RxStep::EnterRing {
                    let _ = self.enter_ring(&mut rx);
                }
                if rx.proto.path() == Path::Shm {
                    if let Some(ring) = rx.ring.as_mut() {
                        ring.arm();
                    }
                }
            }
        }
        if want.write {
            if let Some(mut tx) = self.tx.try_lock() {
                if tx.proto.path() == Path::Shm {
                    if let Some(ring) = tx.ring.as_mut() {
                        ring.arm();
                    }
                }
            }
        }
        // A deep look: the edges drained above may have been the peer's death.
        let r = self.readiness(want, true);
        if r.meets(want) {
            self.disarm(want, None);
            return Ok(Some(r));
        }
        Ok(None)
    }

    /// Ends a wait begun by [`Conn::arm`] for `want`. A ring another waiter still
    /// waits for stays armed.
    pub(crate) fn disarm(&self, want: Interest, readable: Option<bool>) {
        if let Some(ws) = self.waitset.get() {
            ws.woke(readable);
        }
        let last = |n: &AtomicU32| {
            n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)) == Ok(1)
        };
        if want.read && last(&self.armed_for[0]) {
            if let Some(mut rx) = self.rx.try_lock() {
                if let Some(ring) = rx.ring.as_mut() {
                    ring.disarm();
                }
            }
        }
        if want.write && last(&self.armed_for[1]) {
            if let Some(mut tx) = self.tx.try_lock() {
                if let Some(ring) = tx.ring.as_mut() {
                    ring.disarm();
                }
            }
        }
        if last(&self.waiters) {
            self.shared_kicked.store(false, Ordering::Release);
        }
    }

    /// True if more than one event loop waits on this connection at once: they share
    /// one wait set, so each should wake now and then to look again.
    pub(crate) fn shared_wait(&self) -> bool {
        self.waiters.load(Ordering::Acquire) > 1
    }

    /// The descriptor to wait on (readable) after [`Conn::arm`].
    pub(crate) fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
        self.waitset.get().map(|w| w.fd())
    }
}
