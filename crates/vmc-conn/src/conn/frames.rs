//! Control frames: reading the control channel, sorting what arrives into each
//! direction's inbox, and handing it to that direction's machine; sending.

use super::*;

impl Conn {
    /// Reads the control socket and hands the receiving side the peer's moves;
    /// true if one is waiting to be followed.
    pub(super) fn rx_news(&self, rx: &mut Rx) -> io::Result<bool> {
        self.pump_control()?;
        // Before the frames: TCP may have given bytes past a SWITCH to a ring that
        // was revoked meanwhile, which makes that SWITCH void, not a violation.
        self.rx_check_revoked(rx);
        let frames = std::mem::take(&mut lock(&self.ctl_in).for_rx);
        for f in frames {
            match f {
                Control::Switch(s) => rx.proto.on_switch(s)?,
                Control::Spill(at) => rx.proto.on_spill(at)?,
                _ => unreachable!("sorted to the sending side"),
            }
        }
        Ok(rx.proto.has_switch())
    }

    /// Hands the sending side the frames meant for it (LEFT answers, a REWIND).
    /// Then, if the control channel is closed, tells the machine so (read before
    /// the inbox is taken: by the time the close is flagged, every frame before
    /// it is in there).
    pub(super) fn tx_news(&self, tx: &mut Tx) -> io::Result<()> {
        let closed = self.ctl_eof.load(Ordering::Acquire);
        if self.tx_mail.load(Ordering::Acquire) {
            self.tx_frames(tx)?;
        }
        if closed {
            tx.proto.control_closed();
        }
        Ok(())
    }

    fn tx_frames(&self, tx: &mut Tx) -> io::Result<()> {
        let frames = {
            let mut ctl = lock(&self.ctl_in);
            self.tx_mail.store(false, Ordering::Release);
            std::mem::take(&mut ctl.for_tx)
        };
        for f in frames {
            match f {
                Control::LeftTcp(at) => tx.proto.on_left(Path::Tcp, at)?,
                Control::LeftRing(at) => tx.proto.on_left(Path::Shm, at)?,
                Control::Rewind(from) => tx.proto.on_rewind(from),
                Control::Switch(_) | Control::Spill(_) => {
                    unreachable!("sorted to the receiving side")
                }
            }
        }
        Ok(())
    }

    /// Reads whatever control frames the socket has, without waiting. A REWIND
    /// among them is served right away if the sending side is free (else by the
    /// thread that holds it, see [`Conn::serve_rewind`]), and so is the rest of
    /// one served before that TCP had no room for then.
    pub(super) fn pump_control(&self) -> io::Result<()> {
        self.read_control()?;
        if self.tx_mail.load(Ordering::Acquire) {
            if let Some(mut tx) = self.tx.try_lock() {
                if let Err(e) = self.serve_rewind(&mut tx) {
                    tracing::debug!("vmc connection: serving a rewind: {e}");
                }
            }
        }
        self.flush_owed();
        Ok(())
    }

    pub(super) fn read_control(&self) -> io::Result<()> {
        let Some(parts) = self.parts() else {
            return Ok(());
        };
        if self.ctl_eof.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut ctl = lock(&self.ctl_in);
        let ctl = &mut *ctl;
        let drained = parts.ctl.drain(&mut |frame| match frame {
            Control::Switch(_) => {
                ctl.for_rx.push_back(frame);
                self.bells.ring(bell::RX);
            }
            Control::Spill(_) => {
                ctl.for_rx.push_back(frame);
                self.spill_asked.store(true, Ordering::Release);
            }
            Control::LeftRing(_) | Control::LeftTcp(_) | Control::Rewind(_) => {
                ctl.for_tx.push_back(frame);
                self.tx_mail.store(true, Ordering::Release);
                self.bells.ring(bell::TX);
            }
        })?;
        // The peer is gone (or exec'd): the data paths report it (as EOF after its
        // last byte, or as a reset), the control channel has nothing more to say.
        if drained == Drained::Closed {
            self.ctl_eof.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Sends a LEFT answer. A peer that is gone needs none, and its absence shows on
    /// the data paths, so a failure here is not an error of this read.
    pub(super) fn answer(&self, frame: Control) {
        if let Err(e) = self.send_control(frame) {
            tracing::debug!("vmc connection: could not answer a switch: {e}");
        }
    }

    pub(super) fn send_control(&self, frame: Control) -> io::Result<()> {
        let parts = self.parts().ok_or_else(|| protocol("no control socket"))?;
        parts.ctl.send(frame)
    }
}
