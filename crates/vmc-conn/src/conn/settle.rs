//! Moving a connection to TCP for good, exact at the byte, without waiting for
//! the peer to act (before exec, or for another process after fork).

use super::*;

/// What a settle does with a handshake whose offer is out, unanswered when its
/// patience ends. The peer may have taken the offer already and be writing on
/// the ring: giving the handshake up then leaves those bytes where nobody reads
/// them, so only a settle that cannot wait does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OfferOut {
    /// Give it up: the connection is plain from here (before exec, which cannot
    /// wait: the new image has no use for a channel).
    GiveUp,
    /// Keep it; the settle fails with `WouldBlock`, changing nothing, and is
    /// asked for again (for another process after fork, which waits for it).
    Wait,
}

impl Conn {
    /// Moves both directions to TCP for good, at exact byte boundaries, without
    /// waiting for the peer to act (before exec: the new program image cannot use
    /// the rings). Receiving: we stop reading the ring and tell the peer where
    /// (REWIND); it sends everything from there on TCP, whenever it next runs.
    /// Sending: we revoke our ring, which ends it exactly where the peer is, and
    /// put what it had not read on TCP first. `patience` bounds the wait for
    /// another thread of ours that holds a direction, and for room on TCP.
    pub(crate) fn settle_on_tcp(&self, patience: Duration, offer: OfferOut) -> io::Result<()> {
        let deadline = Instant::now() + patience;
        self.settle_receiving(deadline, offer)?;
        self.settle_sending(deadline, offer)
    }

    /// [`Conn::settle_on_tcp`], first step: the receiving direction (REWIND).
    /// Doing it for every connection before the second step lets two ends that
    /// settle at once (in one process, before exec) each find the other's REWIND
    /// when they move their sending direction.
    pub(crate) fn settle_receiving(&self, deadline: Instant, offer: OfferOut) -> io::Result<()> {
        // Only an offer made may have a channel on the other side already: wait
        // for its answer, give anything earlier up at once.
        let offered = || matches!(*lock(&self.setup), Setup::Offered(_));
        while self.is_pending() && offered() && Instant::now() < deadline {
            self.advance();
            std::thread::sleep(Duration::from_millis(1));
        }
        if offer == OfferOut::Wait && self.is_pending() && offered() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "vmc connection: the handshake's offer is still unanswered",
            ));
        }
        if self.is_pending() {
            // For good means now: the handshake ends here, unfinished (the peer
            // falls back when its side of it goes away).
            let mut setup = lock(&self.setup);
            if self.is_pending() {
                *setup = Setup::Done;
                self.give_up(Fallback::Handshake(
                    "moved to TCP for good before the handshake finished".into(),
                ));
            }
        }
        if !self.is_accelerated() || self.rx_settled.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut rx = lock_until(&self.rx, deadline).ok_or_else(busy)?;
        if !self.is_accelerated() || self.rx_settled.load(Ordering::Acquire) {
            // Another thread settled it while we waited for the lock.
            return Ok(());
        }
        self.settle_rx_locked(&mut rx)
    }

    /// Stops reading the ring for good: REWIND tells the peer from where to send
    /// everything again, on TCP. The REWIND goes out first: if it cannot (the
    /// control channel is gone), nothing changes and the ring is still read, since
    /// a peer never told would not send its bytes again. (The lock on `rx` keeps
    /// the offset it names current until the settle is done.)
    pub(super) fn settle_rx_locked(&self, rx: &mut Rx) -> io::Result<()> {
        let parts = self.parts().ok_or_else(|| protocol("no channel"))?;
        self.send_control(rx.proto.rewind())?;
        let reader = rx.ring.take().or_else(|| lock(&parts.reader).take());
        debug_assert_eq!(
            reader.as_ref().map_or(0, |r| r.position()),
            rx.proto.received(Path::Shm)
        );
        // From here on the receiving side reads TCP only, whatever the peer says.
        rx.proto.settle();
        self.publish(flag::RX_SHM, false);
        self.rx_settled.store(true, Ordering::Release);
        // Closing our end wakes a peer blocked on a full ring.
        drop(reader);
        Ok(())
    }

    /// [`Conn::settle_on_tcp`], second step: the sending direction (serving the
    /// peer's REWIND if it sent one, else revoking the ring), then the connection
    /// is plain. The revoke needs no answer from the peer, whatever it is doing,
    /// so neither a move it has not answered yet nor a peer busy elsewhere keeps
    /// the ring's bytes from reaching it ahead of what is written on TCP next.
    pub(crate) fn settle_sending(&self, deadline: Instant, offer: OfferOut) -> io::Result<()> {
        self.settle_receiving(deadline, offer)?;
        if !self.is_accelerated() {
            return Ok(());
        }
        let mut tx = lock_until(&self.tx, deadline).ok_or_else(busy)?;
        if !self.is_accelerated() {
            return Ok(());
        }
        self.read_control()?;
        self.tx_news(&mut tx)?;
        tx.proto.settle();
        if tx.proto.rewind_asked() {
            self.serve_rewind(&mut tx)?;
        } else if tx.proto.revocable() {
            self.revoke_ring(&mut tx)?;
        }
        self.last_word(&mut tx, deadline)?;
        if tx.proto.take_fin() {
            self.tcp.shutdown(Shutdown::Write)?;
        }
        self.state.store(PLAIN, Ordering::Release);
        self.publish(flag::ACCELERATED, false);
        Ok(())
    }

    /// The control channel's last word, before the connection is plain: shut it
    /// for reading, so that from here on a REWIND either is in it or fails to be
    /// sent (the peer then reads on from the ring, which it keeps), then drain it
    /// and serve what came. Without this, a REWIND sent after the last look, as the
    /// process execs, would be served by nobody while the peer, having given up
    /// the ring, waits on TCP for the bytes it asked for. What a REWIND gives back
    /// is on TCP before this returns: the new image, or the other process, writes
    /// there next.
    fn last_word(&self, tx: &mut Tx, deadline: Instant) -> io::Result<()> {
        let Some(parts) = self.parts() else {
            return Ok(());
        };
        if let Err(e) = parts.ctl.shut_read() {
            // As before there was a last word: a REWIND may still come unserved.
            tracing::debug!("vmc connection: the control channel stays open: {e}");
        }
        self.read_control()?;
        self.serve_rewind(tx)?;
        if tx.backlog.is_empty() {
            return Ok(());
        }
        // The kernel takes it all now, however little the peer reads meanwhile.
        let had = self.grow_send_buffer(tx.backlog.len());
        // Waits for room whatever the socket's mode, as long as patience lasts.
        let own = (tx.timeout, tx.nonblocking);
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        (tx.timeout, tx.nonblocking) = (Some(left), false);
        let flushed = self.flush_backlog(tx, false);
        (tx.timeout, tx.nonblocking) = own;
        if let Some(had) = had {
            self.restore_send_buffer(had);
        }
        let gave_up = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "vmc connection: no room on TCP for the bytes taken back from the ring",
            )
        };
        match flushed {
            Ok(true) => Ok(()),
            // (A blocking flush returns once done, or when its time is up.)
            Ok(false) => Err(gave_up()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(gave_up()),
            Err(e) => Err(e),
        }
    }

    /// Grows our socket's send buffer so that `len` more bytes fit in the kernel
    /// at once: what a settle takes back from the ring must be on TCP before the
    /// process execs (the new image cannot reach the ring's copy), and the peer
    /// may read nothing for a while. Past `net.core.wmem_max` with
    /// `CAP_NET_ADMIN`, else up to it. Returns the size `SO_SNDBUF` reported
    /// before, for [`Conn::restore_send_buffer`]; `None` if nothing changed.
    fn grow_send_buffer(&self, len: usize) -> Option<usize> {
        use rustix::net::sockopt;
        let had = sockopt::socket_send_buffer_size(&self.tcp).ok()?;
        // The kernel doubles what is set and counts its bookkeeping against the
        // result: twice the backlog on top of what it reports leaves room for both.
        let want = had.saturating_add(len.saturating_mul(2));
        if sockopt::set_socket_send_buffer_size_force(&self.tcp, want).is_err() {
            sockopt::set_socket_send_buffer_size(&self.tcp, want).ok()?;
        }
        Some(had)
    }

    /// Gives the program back the send buffer size it had (the kernel keeps what
    /// is queued beyond it and takes no more until it drains, as with any full
    /// buffer). Set values are doubled by the kernel, so half is set.
    fn restore_send_buffer(&self, had: usize) {
        use rustix::net::sockopt;
        if sockopt::set_socket_send_buffer_size_force(&self.tcp, had / 2).is_err() {
            let _ = sockopt::set_socket_send_buffer_size(&self.tcp, had / 2);
        }
    }

    /// Revokes our sending ring (`vmc_channel::WriteHalf::revoke`): the peer's
    /// reading of it ends where it is, and what it had not read becomes the
    /// backlog that goes on TCP before anything else.
    fn revoke_ring(&self, tx: &mut Tx) -> io::Result<()> {
        let ring = tx
            .ring
            .as_mut()
            .ok_or_else(|| protocol("a ring to revoke that was never written"))?;
        let at = ring.revoke()?;
        let plan = tx.proto.revoked(at)?;
        if let Rewind::Resend { from, .. } = plan {
            tx.backlog = ring.take_back(from)?;
        }
        self.publish(flag::TX_SHM, false);
        tracing::debug!(
            "vmc connection: revoked the ring at {at}; {} byte(s) go on TCP instead",
            tx.backlog.len()
        );
        Ok(())
    }
}
