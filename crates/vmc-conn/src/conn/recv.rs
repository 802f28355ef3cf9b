//! The receiving direction: reads from TCP and the ring as `proto::Receiver`
//! says, following the peer's moves, and the waits of a blocking read.

use super::*;

impl Conn {
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_opts(buf, ReadOpts::default())
    }

    /// Reads like `recv(2)` with `opts` (`MSG_PEEK`, `MSG_DONTWAIT`).
    pub(crate) fn read_opts(&self, buf: &mut [u8], opts: ReadOpts) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = self.rx.lock();
        let r = self.read_locked(&mut rx, buf, opts);
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.rx_blocked.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    pub(super) fn read_locked(
        &self,
        rx: &mut Rx,
        buf: &mut [u8],
        opts: ReadOpts,
    ) -> io::Result<usize> {
        let nonblocking = rx.nonblocking || opts.dontwait;
        // Read the clock only if this read has to wait (it costs as much as the rest
        // of a ring read).
        let mut started = None;
        loop {
            // Before looking: a bell rung from here on ends the wait below (TCP
            // paths only) at once.
            let mark = match rx.proto.path() {
                Path::Tcp => self.bells.mark(bell::RX),
                Path::Shm => 0,
            };
            self.advance();
            match rx.proto.step() {
                RxStep::Ended(RxEnd::Eof) => return Ok(0),
                RxStep::Ended(RxEnd::Reset) => {
                    rx.proto.reset_reported();
                    return Err(peer_gone());
                }
                RxStep::Ring => {
                    let ring = rx.ring.as_mut().expect("shm path has a ring");
                    let got = if opts.peek || opts.dontwait {
                        if !ring.is_ready() && nonblocking {
                            // A dead peer must not look like "try again" forever.
                            if !ring.peer_alive() && !ring.is_ready() {
                                self.ring_orphaned(rx)?;
                                continue;
                            }
                            return Err(io::ErrorKind::WouldBlock.into());
                        }
                        let ready = if ring.is_ready() {
                            Ok(())
                        } else {
                            ring.wait_ready()
                        };
                        ready.and_then(|()| {
                            if opts.peek {
                                ring.peek(buf)
                            } else {
                                ring.read(buf)
                            }
                        })
                    } else {
                        ring.read(buf)
                    };
                    let n = match got {
                        // Empty, and the writer's process is gone.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                            self.ring_orphaned(rx)?;
                            continue;
                        }
                        r => r.map_err(read_timeout)?,
                    };
                    if n > 0 {
                        if !opts.peek {
                            rx.proto.read_ring(n);
                            bump(&self.counters().shm_in, n);
                        }
                        return Ok(n);
                    }
                    // The ring ended: the peer moved to TCP (a SWITCH is queued), or
                    // this is the end of the stream.
                    if !self.leave_ring(rx)? {
                        self.rx_ended.store(true, Ordering::Release);
                        return Ok(0);
                    }
                }
                RxStep::EnterRing => self.enter_ring(rx)?,
                RxStep::Tcp { limit } => {
                    let len = limit.map_or(buf.len(), |room| room.min(buf.len() as u64) as usize);
                    let want = &mut buf[..len];
                    let mut flags = RecvFlags::empty();
                    if opts.peek {
                        flags |= RecvFlags::PEEK;
                    }
                    if opts.dontwait {
                        flags |= RecvFlags::DONTWAIT;
                    }
                    if limit.is_some() || self.state.load(Ordering::Acquire) == PLAIN {
                        // Plain TCP, or bytes the peer already sent before moving:
                        // the socket's own blocking rules apply.
                        let (n, _) = recv(&self.tcp, &mut *want, flags)?;
                        if !opts.peek {
                            rx.proto.read_tcp(n);
                            bump(&self.counters().tcp_in, n);
                            if n > 0 && n < buf.len() && rx.proto.step() == RxStep::EnterRing {
                                // The TCP stretch ended inside this read: like the
                                // kernel, return what the ring has too (no waiting).
                                self.enter_ring(rx)?;
                                return Ok(n + self.ring_read_ready(rx, &mut buf[n..])?);
                            }
                        }
                        return Ok(n);
                    }
                    // A SWITCH may come at any moment: take what TCP has, else wait
                    // for TCP or the control socket.
                    match recv(&self.tcp, &mut *want, flags | RecvFlags::DONTWAIT) {
                        // TCP ended. If the peer moved to the ring first, the end of
                        // the stream is there (its SWITCH is queued): follow it.
                        Ok((0, _)) if self.is_accelerated() && self.rx_news(rx)? => {}
                        Ok((n, _)) => {
                            if opts.peek {
                                return Ok(n);
                            }
                            rx.proto.read_tcp(n);
                            bump(&self.counters().tcp_in, n);
                            if self.is_pending() {
                                // The peer's first bytes: a vmc client has bound its
                                // offer socket by now (see `crate::handshake`).
                                self.advance();
                            }
                            // A short read may end exactly where the peer moved to
                            // the ring: like the kernel, return what follows too.
                            if n < buf.len()
                                && self.is_accelerated()
                                && self.follow_to_ring(rx)?
                                && rx.proto.step() == RxStep::EnterRing
                            {
                                self.enter_ring(rx)?;
                                return Ok(n + self.ring_read_ready(rx, &mut buf[n..])?);
                            }
                            return Ok(n);
                        }
                        Err(rustix::io::Errno::AGAIN) => {}
                        Err(rustix::io::Errno::INTR) => continue,
                        Err(e) => return Err(e.into()),
                    }
                    if self.is_accelerated() && self.follow_to_ring(rx)? {
                        continue;
                    }
                    let since = *started.get_or_insert_with(Instant::now);
                    self.wait_rx(rx, nonblocking, since, mark)?;
                }
            }
        }
    }

    /// Reads what the ring holds right now into `buf`, without waiting.
    pub(super) fn ring_read_ready(&self, rx: &mut Rx, buf: &mut [u8]) -> io::Result<usize> {
        let Some(ring) = rx.ring.as_mut() else {
            return Ok(0);
        };
        if buf.is_empty() || ring.available()? == 0 {
            return Ok(0);
        }
        let n = ring.read(buf)?;
        rx.proto.read_ring(n);
        bump(&self.counters().shm_in, n);
        Ok(n)
    }

    /// True if the peer took everything we sent it over the ring (our sending ring is
    /// empty, or we never used it). Unknown (a writer busy) counts as false.
    pub(super) fn peer_left_nothing_unread(&self) -> bool {
        match self.tx.try_lock() {
            Some(mut tx) => match tx.ring.as_mut() {
                Some(w) => w.queued() == 0,
                None => true,
            },
            None => false,
        }
    }

    /// The ring is empty and its writer's process is dead: follow its last move
    /// to TCP, or end the stream as its kernel would have (`proto::Receiver::
    /// writer_dead`): a FIN if it had read everything we sent, else a reset.
    pub(super) fn ring_orphaned(&self, rx: &mut Rx) -> io::Result<()> {
        self.rx_news(rx)?;
        if rx.proto.path() != Path::Shm {
            return Ok(()); // revoked before the writer went away
        }
        match rx.proto.writer_dead(!self.peer_left_nothing_unread())? {
            Orphaned::FollowToTcp => self.publish(flag::RX_SHM, false),
            Orphaned::Ended(_) => self.rx_ended.store(true, Ordering::Release),
        }
        Ok(())
    }

    /// The ring ended: if the peer moved this direction to TCP (its SWITCH is
    /// queued), follow it and return true; false at the real end of the stream.
    pub(super) fn leave_ring(&self, rx: &mut Rx) -> io::Result<bool> {
        self.rx_news(rx)?;
        if rx.proto.path() != Path::Shm {
            return Ok(true); // revoked: TCP from here
        }
        debug_assert_eq!(
            rx.ring.as_ref().map(|r| r.position()),
            Some(rx.proto.received(Path::Shm))
        );
        match rx.proto.ring_ended()? {
            Some(answer) => {
                self.publish(flag::RX_SHM, false);
                self.answer(answer);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// TCP delivered every byte the peer sent before moving to the ring: read the
    /// ring from now on.
    pub(super) fn enter_ring(&self, rx: &mut Rx) -> io::Result<()> {
        if rx.ring.is_none() {
            let mut ring = self
                .parts()
                .and_then(|p| lock(&p.reader).take())
                .ok_or_else(|| protocol("SWITCH to shm without a channel"))?;
            ring.set_nonblocking(rx.nonblocking);
            ring.set_timeout(rx.timeout)?;
            rx.ring = Some(ring);
        }
        if self.rx_check_revoked(rx) {
            return Ok(()); // the stretch on the ring is empty: TCP on
        }
        let answer = rx.proto.enter_ring();
        self.publish(flag::RX_SHM, true);
        self.answer(answer);
        Ok(())
    }

    /// True if the peer revoked the ring we read (or would read next): the
    /// receiving direction is on TCP for good from where it is
    /// (`proto::Receiver::ring_revoked`), and our end of the ring is closed.
    pub(super) fn rx_check_revoked(&self, rx: &mut Rx) -> bool {
        if rx.proto.is_settled() {
            return false;
        }
        let revoked = match rx.ring.as_mut() {
            Some(r) => r.is_revoked(),
            None => self
                .parts()
                .is_some_and(|p| lock(&p.reader).as_mut().is_some_and(|r| r.is_revoked())),
        };
        if !revoked {
            return false;
        }
        rx.proto.ring_revoked();
        self.publish(flag::RX_SHM, false);
        self.rx_settled.store(true, Ordering::Release);
        let reader = rx
            .ring
            .take()
            .or_else(|| self.parts().and_then(|p| lock(&p.reader).take()));
        tracing::debug!(
            "vmc connection: the peer revoked its ring at {:?}: reading TCP from here",
            reader.as_ref().map(|r| r.position())
        );
        true
    }

    /// Reading TCP with no end known: if the peer announced a move to the ring,
    /// learn where TCP ends (true).
    pub(super) fn follow_to_ring(&self, rx: &mut Rx) -> io::Result<bool> {
        self.rx_news(rx)?;
        Ok(rx.proto.follow()?)
    }

    /// Waits until TCP, the control socket or the handshake may have news.
    /// `mark`: [`Bells::mark`] taken before the caller looked.
    pub(super) fn wait_rx(
        &self,
        rx: &Rx,
        nonblocking: bool,
        started: Instant,
        mark: u64,
    ) -> io::Result<()> {
        if nonblocking {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut deadline = rx.timeout.map(|t| started + t);
        if let Some(d) = self.setup_deadline() {
            deadline = Some(deadline.map_or(d, |u| u.min(d)));
        }
        let other = match (self.parts(), self.setup_fd.get()) {
            (Some(_), _) if self.ctl_eof.load(Ordering::Acquire) => None,
            (Some(p), _) => Some(p.ctl()),
            (None, Some(fd)) if self.is_pending() => Some(fd.as_fd()),
            _ => None,
        };
        // Room on TCP too, while bytes a REWIND gave back wait for it: this
        // thread puts them there when it looks again (`Conn::pump_control`).
        let mut tcp_ev = PollFlags::IN | PollFlags::RDHUP;
        if self.backlog_owed() {
            tcp_ev |= PollFlags::OUT;
        }
        let mut fds = vec![PollFd::new(&self.tcp, tcp_ev)];
        if let Some(o) = other {
            fds.push(PollFd::from_borrowed_fd(o, PollFlags::IN));
        }
        let mut nap = None;
        if !self.is_plain() {
            match self.bells.sleep(bell::RX, mark) {
                Nap::Sleep(s) => nap = Some(s),
                Nap::Rung => return Ok(()),
                // No bell: look again soon.
                Nap::NoBell => {
                    let slice = Instant::now() + Duration::from_millis(50);
                    deadline = Some(deadline.map_or(slice, |d| d.min(slice)));
                }
            }
        }
        if let Some(s) = &nap {
            fds.push(PollFd::from_borrowed_fd(s.fd(), PollFlags::IN));
        }
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos() as i64,
            }
        });
        let polled = poll(&mut fds, timeout.as_ref());
        let fired = nap.is_some() && !fds[fds.len() - 1].revents().is_empty();
        drop(fds);
        if let Some(s) = &mut nap {
            s.fired = fired;
        }
        drop(nap);
        match polled {
            Err(rustix::io::Errno::INTR) if vmc_os::interrupt::pending() => {
                return Err(vmc_os::interrupt::error())
            }
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if vmc_os::interrupt::pending() {
            return Err(vmc_os::interrupt::error());
        }
        if let Some(t) = rx.timeout {
            if started.elapsed() >= t {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "vmc connection: read timed out",
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn rx_path(&self) -> Path {
        self.rx.lock().proto.path()
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)?;
        let mut rx = self.rx.lock();
        rx.timeout = t;
        if let Some(r) = rx.ring.as_mut() {
            r.set_timeout(t)?;
        }
        Ok(())
    }

    pub(crate) fn read_timeout(&self) -> Option<Duration> {
        self.rx.lock().timeout
    }

    /// Bytes a read could take now without waiting (`FIONREAD`).
    pub(crate) fn available(&self) -> io::Result<usize> {
        let mut rx = self.rx.lock();
        match rx.proto.path() {
            Path::Shm => rx.ring.as_mut().map_or(Ok(0), |r| r.available()),
            Path::Tcp => {
                let n = rustix::io::ioctl_fionread(&self.tcp)?;
                Ok(rx.proto.tcp_room().map_or(n, |room| n.min(room)) as usize)
            }
        }
    }
}
