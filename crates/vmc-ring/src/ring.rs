//! A single-producer, single-consumer byte ring whose peer is untrusted.
//!
//! # Indices
//! `tail` counts bytes ever produced, `head` bytes ever consumed; both are `u64`, only
//! grow, and stay below [`INDEX_LIMIT`] (2^63 bytes: 29 years at 10 GB/s), because the
//! top bit of the shared head is the producer's [revoke](#revoking) mark. A byte at
//! index `i` lives at `i & (capacity - 1)`. The ring holds `tail - head` bytes, which
//! is always in `0..=capacity`.
//!
//! Each side owns its own index **privately** (the shared copy is only ever written
//! by its owner, never read back), and keeps a *cached* copy of the peer's index,
//! reloading the shared one only when the cache says the ring looks full (producer) or
//! empty (consumer): the FastForward/MCRingBuffer idea that keeps the two sides off
//! each other's cache lines while the ring is neither. Publication is batched per call:
//! one `write` or `commit` publishes once, however many pieces it copied.
//!
//! # Orderings
//! The producer copies data, then stores `tail` with `Release`; the consumer loads
//! `tail` with `Acquire` before reading the bytes below it. Symmetrically the consumer
//! stores `head` with `Release` after it has finished reading, and the producer loads
//! it with `Acquire` before overwriting that space. Close flags are stored `Release`
//! after the final index and loaded `Acquire`. Sleep words follow [`crate::wait`].
//!
//! # Revoking
//! The producer can take back every byte the consumer has not consumed, exactly,
//! without the consumer's help ([`Producer::revoke`]): it sets [`REVOKED`] in the
//! shared head with a compare-and-swap, then closes its end. The consumer publishes
//! its head with a compare-and-swap too, from the head it last published: so either
//! its publication comes first (the producer's swap then names the new head), or the
//! revoke does (the consumer's swap fails, and the bytes it copied count as never
//! read). Both ends agree on the one offset where the ring's stream ended, which is
//! what a connection layer needs to send the rest another way, in order, while the
//! consumer sleeps, is busy, or is gone. The revoke is the only write the producer
//! makes to the head.
//!
//! # An untrusted peer
//! Every index loaded from shared memory is checked before it is used: a consumer
//! accepts a tail only in `cached_tail..=head + capacity`, a producer a head only in
//! `cached_head..=tail`. Anything else poisons the ring with [`RingError::Corrupt`],
//! and every later call returns that error. Positions are always computed from the
//! private index and the private capacity, so no value a peer writes can move a copy
//! out of the ring's bounds, and every loop is bounded by the sizes the caller passed.

use core::ptr::NonNull;

use crate::error::RingError;
use crate::layout::RingControl;
use crate::sync::{AtomicU32, Ordering};
use crate::wait;
use alloc::sync::Arc;

/// Indices stay below this: its bit, in the shared head, is [`REVOKED`].
pub const INDEX_LIMIT: u64 = 1 << 63;

/// The mark the producer sets in the shared head to take the unread bytes back
/// (see [Revoking](self#revoking)).
pub const REVOKED: u64 = INDEX_LIMIT;

/// Keeps the memory a ring lives in alive (a mapping, or a heap block in tests).
pub type Owner = Arc<dyn Send + Sync>;

/// Where one ring lives: its control block and its data area.
pub(crate) struct RingMem {
    ctl: NonNull<RingControl>,
    #[cfg(not(loom))]
    data: NonNull<u8>,
    #[cfg(loom)]
    data: Arc<[loom::cell::UnsafeCell<u8>]>,
    /// Power of two; a private copy, never re-read from shared memory.
    cap: usize,
    _owner: Owner,
}

// SAFETY: RingMem is a pair of pointers into memory kept alive by `_owner` (which is
// Send + Sync). All shared fields are atomics; the data area is accessed only by the
// one Producer or the one Consumer built on it, as the ring protocol assigns.
unsafe impl Send for RingMem {}

impl RingMem {
    /// # Safety
    /// `ctl` must point to a `RingControl` and `data` to `cap` bytes, both valid for
    /// reads and writes for as long as `owner` lives; `cap` must be a power of two.
    /// Other parties may access that memory concurrently, but only through the ring
    /// protocol (or by breaking it, which can change byte values but nothing else).
    #[cfg(not(loom))]
    pub(crate) unsafe fn new(
        ctl: NonNull<RingControl>,
        data: NonNull<u8>,
        cap: usize,
        owner: Owner,
    ) -> RingMem {
        debug_assert!(cap.is_power_of_two());
        RingMem {
            ctl,
            data,
            cap,
            _owner: owner,
        }
    }

    /// Both ends of one ring must get clones of the same `data`.
    #[cfg(loom)]
    pub(crate) fn new_loom(
        ctl: NonNull<RingControl>,
        data: Arc<[loom::cell::UnsafeCell<u8>]>,
        owner: Owner,
    ) -> RingMem {
        let cap = data.len();
        RingMem {
            ctl,
            data,
            cap,
            _owner: owner,
        }
    }

    #[inline]
    fn ctl(&self) -> &RingControl {
        // SAFETY: `new`'s contract: `ctl` is valid while `_owner` lives, which is as
        // long as `self`. RingControl is all atomics, so shared access is sound.
        unsafe { self.ctl.as_ref() }
    }

    /// Copies `src` into the ring starting at index `at`, wrapping as needed.
    ///
    /// The caller guarantees `src.len() <= cap` and that the producer owns the bytes
    /// `at..at + src.len()` (they are free space).
    #[inline]
    fn copy_in(&self, at: u64, src: &[u8]) {
        debug_assert!(src.len() <= self.cap);
        let pos = at as usize & (self.cap - 1);
        let first = src.len().min(self.cap - pos);
        #[cfg(not(loom))]
        // SAFETY: `pos + first <= cap` and `src.len() - first <= pos` (since
        // `src.len() <= cap`), so both copies stay inside the `cap`-byte data area,
        // which is valid per `new`. `src` is private memory, so they do not overlap.
        unsafe {
            let d = self.data.as_ptr();
            core::ptr::copy_nonoverlapping(src.as_ptr(), d.add(pos), first);
            core::ptr::copy_nonoverlapping(src.as_ptr().add(first), d, src.len() - first);
        }
        #[cfg(loom)]
        for (i, b) in src.iter().enumerate() {
            let p = (pos + i) & (self.cap - 1);
            // SAFETY: loom checks that no other access to this cell is concurrent.
            self.data[p].with_mut(|c| unsafe { *c = *b });
        }
        let _ = first;
    }

    /// Copies bytes `at..at + dst.len()` out of the ring into `dst`.
    ///
    /// The caller guarantees `dst.len() <= cap` and that those bytes were published.
    #[inline]
    fn copy_out(&self, at: u64, dst: &mut [u8]) {
        debug_assert!(dst.len() <= self.cap);
        let pos = at as usize & (self.cap - 1);
        let first = dst.len().min(self.cap - pos);
        #[cfg(not(loom))]
        // SAFETY: bounds as in `copy_in`. The bytes are plain data: a peer breaking
        // the protocol can change which values we copy, never where we copy them.
        unsafe {
            let s = self.data.as_ptr();
            core::ptr::copy_nonoverlapping(s.add(pos), dst.as_mut_ptr(), first);
            let rest = dst.len() - first;
            core::ptr::copy_nonoverlapping(s, dst.as_mut_ptr().add(first), rest);
        }
        #[cfg(loom)]
        for (i, b) in dst.iter_mut().enumerate() {
            let p = (pos + i) & (self.cap - 1);
            // SAFETY: loom checks that no other access to this cell is concurrent.
            *b = self.data[p].with(|c| unsafe { *c });
        }
        let _ = first;
    }

    /// The ring's bytes `at..at + len` as up to two slices (before and after the
    /// wrap). Not available under loom, which cannot track slices.
    ///
    /// # Safety
    /// `len <= cap`, and the caller must hold those bytes exclusively under the
    /// protocol (free space for the producer, published data for the consumer) for
    /// as long as the slices live.
    #[cfg(not(loom))]
    #[inline]
    #[allow(clippy::mut_from_ref)]
    unsafe fn slices(&self, at: u64, len: usize) -> (&mut [u8], &mut [u8]) {
        let pos = at as usize & (self.cap - 1);
        let first = len.min(self.cap - pos);
        let d = self.data.as_ptr();
        // SAFETY: both ranges lie inside the data area (see `copy_in`) and do not
        // overlap each other; the caller guarantees exclusivity under the protocol.
        unsafe {
            (
                core::slice::from_raw_parts_mut(d.add(pos), first),
                core::slice::from_raw_parts_mut(d, len - first),
            )
        }
    }
}

/// Checks a tail loaded from shared memory against what the consumer knows.
///
/// Valid tails lie in `cached_tail..=head + cap` (tails never move backwards and
/// never run more than a ring ahead of what was consumed).
#[inline]
pub(crate) fn check_tail(
    head: u64,
    cached_tail: u64,
    tail: u64,
    cap: usize,
) -> Result<u64, RingError> {
    let ahead = tail.wrapping_sub(head);
    if ahead > cap as u64 || ahead < cached_tail.wrapping_sub(head) {
        return Err(RingError::corrupt("tail", tail));
    }
    Ok(tail)
}

/// Checks a head loaded from shared memory against what the producer knows.
///
/// Valid heads lie in `cached_head..=tail` (heads never move backwards and never
/// pass what was produced).
#[inline]
pub(crate) fn check_head(cached_head: u64, tail: u64, head: u64) -> Result<u64, RingError> {
    if head.wrapping_sub(cached_head) > tail.wrapping_sub(cached_head) {
        return Err(RingError::corrupt("head", head));
    }
    Ok(head)
}

/// The writing end of a ring.
pub struct Producer {
    mem: RingMem,
    /// Bytes produced; authoritative (the shared copy is only written).
    tail: u64,
    /// Last validated head; `tail - cached_head` is in `0..=cap`.
    cached_head: u64,
    /// Something was published since the last [`Producer::needs_wake`].
    unchecked_publish: bool,
    poisoned: Option<RingError>,
    /// Where [`Producer::revoke`] ended the ring's stream, once it did.
    revoked: Option<u64>,
}

impl Producer {
    pub(crate) fn new(mem: RingMem) -> Producer {
        // A fresh ring is empty; a re-attached one is not supported (layout v1).
        let tail = mem.ctl().tail.0.load(Ordering::Relaxed);
        let head = mem.ctl().head.0.load(Ordering::Relaxed);
        let mut p = Producer {
            mem,
            tail,
            cached_head: tail,
            unchecked_publish: false,
            poisoned: None,
            revoked: None,
        };
        if head != tail {
            p.poisoned = Some(RingError::corrupt("head", head));
        }
        p
    }

    /// Bytes the ring can hold.
    pub fn capacity(&self) -> usize {
        self.mem.cap
    }

    /// Bytes written so far (the private tail).
    pub fn position(&self) -> u64 {
        self.tail
    }

    fn check(&self) -> Result<(), RingError> {
        match self.poisoned {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn poison(&mut self, e: RingError) -> RingError {
        self.poisoned = Some(e);
        e
    }

    #[inline]
    fn cached_free(&self) -> usize {
        self.mem.cap - self.tail.wrapping_sub(self.cached_head) as usize
    }

    /// Free space, reloading the consumer's head if the cache shows less than `want`.
    #[inline]
    fn free_for(&mut self, want: usize) -> Result<usize, RingError> {
        self.check()?;
        if self.revoked.is_some() {
            // (The shared head carries the mark now: it is no index to load.)
            return Err(RingError::Revoked);
        }
        let free = self.cached_free();
        if free >= want {
            return Ok(free);
        }
        let head = self.mem.ctl().head.0.load(Ordering::Acquire);
        self.cached_head =
            check_head(self.cached_head, self.tail, head).map_err(|e| self.poison(e))?;
        Ok(self.cached_free())
    }

    /// Free space right now (reloads the consumer's index).
    pub fn free(&mut self) -> Result<usize, RingError> {
        self.free_for(self.mem.cap)
    }

    /// Fails with [`RingError::ReaderClosed`] once the consumer has closed its end,
    /// [`RingError::Revoked`] once we took the ring back, and
    /// [`RingError::Exhausted`] when the next write could reach [`INDEX_LIMIT`].
    #[inline]
    fn check_reader(&self) -> Result<(), RingError> {
        // A poisoned ring stays poisoned, whatever the (peer-written) flag says.
        self.check()?;
        if self.revoked.is_some() {
            return Err(RingError::Revoked);
        }
        if self.tail >= INDEX_LIMIT - self.mem.cap as u64 {
            return Err(RingError::Exhausted);
        }
        if self.is_reader_closed() {
            return Err(RingError::ReaderClosed);
        }
        Ok(())
    }

    #[inline]
    fn publish(&mut self) {
        self.mem.ctl().tail.0.store(self.tail, Ordering::Release);
        self.unchecked_publish = true;
    }

    /// Copies as much of `src` as fits and publishes it; returns the bytes written
    /// (0 if the ring is full). Larger writes proceed in pieces through repeated
    /// calls, which is what the channel's blocking `write_all` does.
    pub fn write(&mut self, src: &[u8]) -> Result<usize, RingError> {
        self.check_reader()?;
        let free = self.free_for(src.len().min(self.mem.cap))?;
        let n = src.len().min(free);
        if n == 0 {
            return Ok(0);
        }
        self.mem.copy_in(self.tail, &src[..n]);
        self.tail = self.tail.wrapping_add(n as u64);
        self.publish();
        Ok(n)
    }

    /// Zero-copy write, step 1: the free space as two slices (the second is the part
    /// after the wrap and is empty unless the space wraps). Reloads the consumer's
    /// index when the cache shows less than `want` bytes free. Fill a prefix, then
    /// [`Producer::commit`] it.
    #[cfg(not(loom))]
    pub fn write_slices(&mut self, want: usize) -> Result<(&mut [u8], &mut [u8]), RingError> {
        self.check_reader()?;
        let free = self.free_for(want.min(self.mem.cap))?;
        // SAFETY: `free` bytes from `tail` are free space, which only the producer
        // touches until it publishes them; the slices borrow `self` mutably, so no
        // commit (publication) can happen while they live.
        Ok(unsafe { self.mem.slices(self.tail, free) })
    }

    /// Zero-copy write, step 2: publishes the first `n` bytes of the free space.
    pub fn commit(&mut self, n: usize) -> Result<(), RingError> {
        self.check()?;
        let free = self.cached_free();
        if n > free {
            return Err(RingError::OutOfRange {
                asked: n,
                available: free,
            });
        }
        if n > 0 {
            self.tail = self.tail.wrapping_add(n as u64);
            self.publish();
        }
        Ok(())
    }

    /// After publishing, before returning to the caller or sleeping: true if the
    /// consumer announced it is asleep and must be woken (at most once per sleep).
    #[inline]
    pub fn needs_wake(&mut self) -> bool {
        if !core::mem::take(&mut self.unchecked_publish) {
            return false;
        }
        wait::should_wake(&self.mem.ctl().state.0.reader_sleep)
    }

    /// Orderly end of the stream: the consumer reads what was written, then EOF.
    /// Call [`Producer::needs_wake`] afterwards, a sleeping reader must see it.
    pub fn close(&mut self) {
        self.mem
            .ctl()
            .state
            .0
            .writer_closed
            .store(1, Ordering::Release);
        self.unchecked_publish = true;
    }

    /// Takes back a [`Producer::close`]: the ring carries bytes again after the ones
    /// already published. Only for a connection layer that told the consumer out of
    /// band, before this call, that the close was a pause (the stream moved to
    /// another path and is now moving back); the consumer must not have taken the
    /// close as end of stream.
    pub fn reopen(&mut self) {
        self.mem
            .ctl()
            .state
            .0
            .writer_closed
            .store(0, Ordering::Release);
    }

    /// Copies the bytes `from..position` back out of the ring into `dst`: what the
    /// consumer says it never took (it names `from` out of band, then closes its
    /// end), so that a connection layer can send them another way.
    ///
    /// Only the producer writes the data area, and it overwrites byte `i` only once
    /// `tail` passes `i + capacity`, so these bytes are intact whatever the consumer
    /// did with its head; `from` is accepted only in `position - capacity..=position`
    /// (else [`RingError::OutOfRange`], and nothing is copied).
    pub fn take_back(&self, from: u64, dst: &mut alloc::vec::Vec<u8>) -> Result<(), RingError> {
        self.check()?;
        let len = self.tail.wrapping_sub(from);
        if len > self.mem.cap as u64 {
            return Err(RingError::OutOfRange {
                asked: usize::try_from(len).unwrap_or(usize::MAX),
                available: self.mem.cap,
            });
        }
        let start = dst.len();
        dst.resize(start + len as usize, 0);
        self.mem.copy_out(from, &mut dst[start..]);
        Ok(())
    }

    /// Takes back every byte the consumer has not consumed, whatever it is doing:
    /// returns the offset where the ring's stream ends for both ends (the
    /// consumer's head at that moment). [`Producer::take_back`] from there gives the
    /// bytes to send another way; the consumer finds the ring ended there
    /// ([`Consumer::is_finished`], then [`Consumer::is_revoked`]), and a copy it
    /// made of later bytes does not count as read. Writes fail from now on. Call
    /// [`Producer::needs_wake`] afterwards: a sleeping reader must see the end.
    /// Calling it again returns the same offset.
    ///
    /// The swap retries while the consumer publishes; a consumer that keeps the
    /// head moving without consuming (only a hostile one can) gets its ring
    /// poisoned after `capacity + 2` tries.
    pub fn revoke(&mut self) -> Result<u64, RingError> {
        self.check()?;
        if let Some(at) = self.revoked {
            return Ok(at);
        }
        let mut seen = self.mem.ctl().head.0.load(Ordering::Acquire);
        for _ in 0..self.mem.cap + 2 {
            let head = check_head(self.cached_head, self.tail, seen).map_err(|e| self.poison(e))?;
            self.cached_head = head;
            // Acquire on success: the consumer's reads of the bytes below `head`
            // happened before (no write of ours follows anyway).
            match self.mem.ctl().head.0.compare_exchange(
                seen,
                seen | REVOKED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.revoked = Some(head);
                    self.close();
                    return Ok(head);
                }
                Err(now) => seen = now,
            }
        }
        Err(self.poison(RingError::corrupt("head", seen)))
    }

    /// Where [`Producer::revoke`] ended the ring's stream, if it did.
    pub fn revoked_at(&self) -> Option<u64> {
        self.revoked
    }

    /// True once the consumer has closed its end.
    pub fn is_reader_closed(&self) -> bool {
        self.mem.ctl().state.0.reader_closed.load(Ordering::Acquire) != 0
    }

    /// Announces that the producer will sleep until space frees, then re-checks.
    /// Returns `Ok(true)` if it may sleep now (on [`Producer::sleep_word`], expecting
    /// [`wait::SLEEPING`]), `Ok(false)` if space appeared or the reader closed in the
    /// meantime (the announcement is withdrawn). After any sleep, call
    /// [`Producer::finish_sleep`].
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        let word = &self.mem.ctl().state.0.writer_sleep;
        wait::announce(word);
        let ready = self.is_reader_closed() || self.free()? > 0;
        if ready {
            wait::retract(&self.mem.ctl().state.0.writer_sleep);
        }
        Ok(!ready)
    }

    /// Withdraws the sleep announcement after waking.
    pub fn finish_sleep(&mut self) {
        wait::retract(&self.mem.ctl().state.0.writer_sleep);
    }

    /// The word this producer sleeps on (a futex waits on it).
    pub fn sleep_word(&self) -> &AtomicU32 {
        &self.mem.ctl().state.0.writer_sleep
    }

    /// The word the consumer sleeps on: futex-wake it when [`Producer::needs_wake`].
    pub fn peer_sleep_word(&self) -> &AtomicU32 {
        &self.mem.ctl().state.0.reader_sleep
    }
}

/// The reading end of a ring.
pub struct Consumer {
    mem: RingMem,
    /// Bytes consumed; authoritative (the shared copy is only written).
    head: u64,
    /// Last validated tail; `cached_tail - head` is in `0..=cap`.
    cached_tail: u64,
    /// Something was published since the last [`Consumer::needs_wake`].
    unchecked_publish: bool,
    poisoned: Option<RingError>,
    /// The producer revoked the ring at `head`: it ended there.
    revoked: bool,
}

impl Consumer {
    pub(crate) fn new(mem: RingMem) -> Consumer {
        let head = mem.ctl().head.0.load(Ordering::Relaxed);
        let mut c = Consumer {
            mem,
            head,
            cached_tail: head,
            unchecked_publish: false,
            poisoned: None,
            revoked: false,
        };
        if head >= INDEX_LIMIT {
            c.poisoned = Some(RingError::corrupt("head", head));
        }
        c
    }

    /// Bytes the ring can hold.
    pub fn capacity(&self) -> usize {
        self.mem.cap
    }

    /// Bytes read so far (the private head).
    pub fn position(&self) -> u64 {
        self.head
    }

    fn check(&self) -> Result<(), RingError> {
        match self.poisoned {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn poison(&mut self, e: RingError) -> RingError {
        self.poisoned = Some(e);
        e
    }

    #[inline]
    fn cached_available(&self) -> usize {
        self.cached_tail.wrapping_sub(self.head) as usize
    }

    /// Bytes ready to read; reloads the producer's tail only if the cache is empty.
    #[inline]
    pub fn available(&mut self) -> Result<usize, RingError> {
        self.check()?;
        let n = self.cached_available();
        if n > 0 {
            return Ok(n);
        }
        self.refresh()
    }

    /// Bytes ready to read, always reloading the producer's tail.
    pub fn refresh(&mut self) -> Result<usize, RingError> {
        self.check()?;
        if self.revoked {
            return Ok(0);
        }
        let tail = self.mem.ctl().tail.0.load(Ordering::Acquire);
        self.cached_tail = check_tail(self.head, self.cached_tail, tail, self.mem.cap)
            .map_err(|e| self.poison(e))?;
        Ok(self.cached_available())
    }

    /// Consumes the `n` bytes from `head`: publishes the new head with a swap from
    /// the one we published last, which fails only if the producer revoked the
    /// ring in between (see [Revoking](self#revoking)). Returns `n`, or 0 if the
    /// ring was revoked: the bytes stay unread, and the ring ends at `head`.
    #[inline]
    fn publish(&mut self, n: usize) -> Result<usize, RingError> {
        let next = self.head.wrapping_add(n as u64);
        // Release: our reads of the bytes happen before the producer reuses them.
        match self.mem.ctl().head.0.compare_exchange(
            self.head,
            next,
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                self.head = next;
                self.unchecked_publish = true;
                Ok(n)
            }
            Err(seen) if seen == self.head | REVOKED => {
                self.mark_revoked();
                Ok(0)
            }
            Err(seen) => Err(self.poison(RingError::corrupt("head", seen))),
        }
    }

    fn mark_revoked(&mut self) {
        self.revoked = true;
        self.cached_tail = self.head;
    }

    /// True if the producer revoked the ring (at [`Consumer::position`]): the
    /// stream it carried ends here, and its writer sends the rest another way.
    /// One load of the shared head; [`Consumer::is_finished`] is true from then on.
    pub fn is_revoked(&mut self) -> bool {
        if !self.revoked && self.poisoned.is_none() {
            let seen = self.mem.ctl().head.0.load(Ordering::Acquire);
            if seen == self.head | REVOKED {
                self.mark_revoked();
            }
        }
        self.revoked
    }

    /// Copies up to `dst.len()` ready bytes into `dst`; returns how many (0 when the
    /// ring is empty: see [`Consumer::is_finished`] to tell EOF from "not yet").
    ///
    /// Like a socket, it returns everything that has arrived that fits: the cached tail
    /// is reloaded when it shows fewer bytes than `dst` could take.
    pub fn read(&mut self, dst: &mut [u8]) -> Result<usize, RingError> {
        let mut avail = self.available()?;
        if avail < dst.len() {
            avail = self.refresh()?;
        }
        let n = dst.len().min(avail);
        if n == 0 {
            return Ok(0);
        }
        self.mem.copy_out(self.head, &mut dst[..n]);
        self.publish(n)
    }

    /// Zero-copy read, step 1: the ready bytes as two slices (the second is the part
    /// after the wrap). Use a prefix, then [`Consumer::consume`] it.
    #[cfg(not(loom))]
    pub fn read_slices(&mut self) -> Result<(&[u8], &[u8]), RingError> {
        let n = self.available()?;
        // SAFETY: the `n` bytes from `head` were published by the producer (tail was
        // validated) and stay untouched by it until we publish a new head, which needs
        // `&mut self` while these slices borrow `self`.
        let (a, b) = unsafe { self.mem.slices(self.head, n) };
        Ok((a, b))
    }

    /// Zero-copy read, step 2: releases the first `n` ready bytes to the producer.
    /// Returns how many were consumed: `n`, or 0 if the producer revoked the ring
    /// first (then they were never read: see [`Consumer::is_revoked`]).
    pub fn consume(&mut self, n: usize) -> Result<usize, RingError> {
        self.check()?;
        let avail = self.cached_available();
        if n > avail {
            return Err(RingError::OutOfRange {
                asked: n,
                available: avail,
            });
        }
        if n == 0 {
            return Ok(0);
        }
        self.publish(n)
    }

    /// After consuming, before returning or sleeping: true if the producer announced
    /// it is asleep waiting for space and must be woken (at most once per sleep).
    #[inline]
    pub fn needs_wake(&mut self) -> bool {
        if !core::mem::take(&mut self.unchecked_publish) {
            return false;
        }
        wait::should_wake(&self.mem.ctl().state.0.writer_sleep)
    }

    /// True when the producer closed its end and every byte it wrote was consumed
    /// (end of stream), or revoked the ring ([`Consumer::is_revoked`] tells which).
    pub fn is_finished(&mut self) -> Result<bool, RingError> {
        if self.revoked {
            return Ok(true);
        }
        if self.available()? > 0 {
            return Ok(false);
        }
        if self.mem.ctl().state.0.writer_closed.load(Ordering::Acquire) == 0 {
            return Ok(false);
        }
        // The close flag was stored after the final tail: reload it to be sure no
        // byte published just before the close is missed.
        Ok(self.refresh()? == 0)
    }

    /// Tells the producer nothing more will be read: its writes fail from now on.
    /// Call [`Consumer::needs_wake`] afterwards, a producer waiting for space must
    /// see it.
    pub fn close(&mut self) {
        self.mem
            .ctl()
            .state
            .0
            .reader_closed
            .store(1, Ordering::Release);
        self.unchecked_publish = true;
    }

    /// Announces that the consumer will sleep until data arrives, then re-checks.
    /// Returns `Ok(true)` if it may sleep now (on [`Consumer::sleep_word`], expecting
    /// [`wait::SLEEPING`]), `Ok(false)` if data or EOF arrived in the meantime (the
    /// announcement is withdrawn). After any sleep, call [`Consumer::finish_sleep`].
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        wait::announce(&self.mem.ctl().state.0.reader_sleep);
        let ready = self.refresh()? > 0
            || self.mem.ctl().state.0.writer_closed.load(Ordering::Acquire) != 0;
        if ready {
            wait::retract(&self.mem.ctl().state.0.reader_sleep);
        }
        Ok(!ready)
    }

    /// Withdraws the sleep announcement after waking.
    pub fn finish_sleep(&mut self) {
        wait::retract(&self.mem.ctl().state.0.reader_sleep);
    }

    /// The word this consumer sleeps on (a futex waits on it).
    pub fn sleep_word(&self) -> &AtomicU32 {
        &self.mem.ctl().state.0.reader_sleep
    }

    /// The word the producer sleeps on: futex-wake it when [`Consumer::needs_wake`].
    pub fn peer_sleep_word(&self) -> &AtomicU32 {
        &self.mem.ctl().state.0.writer_sleep
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::heap::ring_pair;
    use alloc::vec;
    use alloc::vec::Vec;

    #[test]
    fn validation_accepts_exactly_the_possible_indices() {
        // Consumer: head 100, cached tail 110, capacity 16.
        assert!(check_tail(100, 110, 110, 16).is_ok());
        assert!(check_tail(100, 110, 116, 16).is_ok());
        assert!(
            check_tail(100, 110, 117, 16).is_err(),
            "more than a ring ahead"
        );
        assert!(check_tail(100, 110, 109, 16).is_err(), "moved backwards");
        assert!(check_tail(100, 110, 99, 16).is_err(), "behind the head");
        // Producer: cached head 50, tail 60.
        assert!(check_head(50, 60, 50).is_ok());
        assert!(check_head(50, 60, 60).is_ok());
        assert!(check_head(50, 60, 61).is_err(), "past the tail");
        assert!(check_head(50, 60, 49).is_err(), "moved backwards");
        // Near the 2^64 wrap the same rules hold.
        let h = u64::MAX - 3;
        assert!(check_tail(h, h, h.wrapping_add(16), 16).is_ok());
        assert!(check_tail(h, h, h.wrapping_add(17), 16).is_err());
        assert!(check_head(h, h.wrapping_add(8), h.wrapping_add(8)).is_ok());
        assert!(check_head(h, h.wrapping_add(8), h.wrapping_add(9)).is_err());
    }

    #[test]
    fn take_back_returns_exactly_what_the_consumer_left() {
        let (mut tx, mut rx) = ring_pair(16);
        let mut out = [0u8; 16];
        // Move the indices around the wrap first.
        for _ in 0..3 {
            assert_eq!(tx.write(&[9; 11]).unwrap(), 11);
            assert_eq!(rx.read(&mut out).unwrap(), 11);
        }
        let msg: Vec<u8> = (0..16).collect();
        assert_eq!(tx.write(&msg).unwrap(), 16);
        assert_eq!(rx.read(&mut out[..5]).unwrap(), 5);
        let from = rx.position();
        rx.close();
        assert!(tx.is_reader_closed());
        let mut back = vec![7u8];
        tx.take_back(from, &mut back).unwrap();
        assert_eq!(back[0], 7, "appends");
        assert_eq!(&back[1..], &msg[5..]);
        // A consumer may name any offset whose bytes are still in the ring...
        let mut all = Vec::new();
        tx.take_back(tx.position() - 16, &mut all).unwrap();
        assert_eq!(all, msg);
        let mut none = Vec::new();
        tx.take_back(tx.position(), &mut none).unwrap();
        assert!(none.is_empty());
        // ...and no other.
        for bad in [tx.position() - 17, tx.position() + 1, 0, u64::MAX] {
            let mut v = Vec::new();
            assert!(
                matches!(tx.take_back(bad, &mut v), Err(RingError::OutOfRange { .. })),
                "{bad}"
            );
            assert!(v.is_empty());
        }
    }

    #[test]
    fn a_revoke_ends_the_ring_exactly_where_the_consumer_stopped() {
        let (mut tx, mut rx) = ring_pair(16);
        let msg: Vec<u8> = (0..10).collect();
        assert_eq!(tx.write(&msg).unwrap(), 10);
        let mut out = [0u8; 4];
        assert_eq!(rx.read(&mut out).unwrap(), 4);
        assert!(!rx.is_revoked());
        assert_eq!(tx.revoke(), Ok(4));
        assert_eq!(tx.revoke(), Ok(4), "the same offset again");
        assert_eq!(tx.revoked_at(), Some(4));
        let mut back = Vec::new();
        tx.take_back(4, &mut back).unwrap();
        assert_eq!(back, &msg[4..]);
        // The consumer still has 6 bytes cached: reading them fails the swap.
        assert_eq!(rx.read(&mut out).unwrap(), 0);
        assert_eq!(rx.position(), 4);
        assert!(rx.is_finished().unwrap() && rx.is_revoked());
        assert_eq!(rx.available().unwrap(), 0);
        assert!(
            !rx.prepare_sleep().unwrap(),
            "a revoked ring is ready: it ended"
        );
        assert_eq!(tx.write(b"x"), Err(RingError::Revoked));
        assert_eq!(tx.free(), Err(RingError::Revoked));
    }

    #[test]
    fn a_copy_taken_before_the_revoke_is_not_consumed() {
        let (mut tx, mut rx) = ring_pair(16);
        assert_eq!(tx.write(b"abcdef").unwrap(), 6);
        let (a, _) = rx.read_slices().unwrap();
        assert_eq!(a, b"abcdef");
        assert_eq!(tx.revoke(), Ok(0));
        assert_eq!(rx.consume(6), Ok(0), "never read");
        assert_eq!(rx.position(), 0);
        assert!(rx.is_revoked() && rx.is_finished().unwrap());
        assert!(rx.read_slices().unwrap().0.is_empty());
    }

    #[test]
    fn a_revoke_of_an_empty_ring_is_seen_by_a_consumer_about_to_sleep() {
        let (mut tx, mut rx) = ring_pair(16);
        assert_eq!(tx.write(b"abc").unwrap(), 3);
        let mut out = [0u8; 8];
        assert_eq!(rx.read(&mut out).unwrap(), 3);
        assert!(rx.prepare_sleep().unwrap(), "empty: it may sleep");
        assert_eq!(tx.revoke(), Ok(3));
        assert!(tx.needs_wake(), "the sleeper is woken");
        rx.finish_sleep();
        assert!(rx.is_finished().unwrap() && rx.is_revoked());
    }

    #[test]
    fn a_head_no_revoke_explains_poisons_each_end() {
        // The consumer's published head marked by someone else than the producer's
        // swap: the consumer's next publication finds a value it never wrote.
        let (mut tx, mut rx) = ring_pair(16);
        assert_eq!(tx.write(b"abcd").unwrap(), 4);
        rx.mem.ctl().head.0.store(2, Ordering::Relaxed);
        let mut out = [0u8; 2];
        assert!(matches!(
            rx.read(&mut out),
            Err(RingError::Corrupt { field: "head", .. })
        ));
        // A consumer that sets the mark itself: the producer's check refuses it.
        let (mut tx2, rx2) = ring_pair(16);
        assert_eq!(tx2.write(b"abcd").unwrap(), 4);
        rx2.mem.ctl().head.0.store(REVOKED, Ordering::Relaxed);
        assert!(matches!(
            tx2.revoke(),
            Err(RingError::Corrupt { field: "head", .. })
        ));
        assert!(matches!(tx2.write(b"x"), Err(RingError::Corrupt { .. })));
        drop(tx);
    }

    #[test]
    fn indices_stop_a_ring_short_of_the_revoke_mark() {
        let (mut tx, _rx) = ring_pair(16);
        tx.tail = INDEX_LIMIT - 17;
        tx.cached_head = tx.tail;
        assert_eq!(tx.write(b"x"), Ok(1));
        assert_eq!(tx.write(b"x"), Err(RingError::Exhausted));
    }

    #[test]
    fn writes_wrap_and_read_back_in_order() {
        let (mut tx, mut rx) = ring_pair(16);
        let mut out = [0u8; 16];
        for round in 0u8..20 {
            let msg: Vec<u8> = (0..11)
                .map(|i| round.wrapping_mul(31).wrapping_add(i))
                .collect();
            assert_eq!(tx.write(&msg).unwrap(), 11);
            assert_eq!(rx.read(&mut out).unwrap(), 11);
            assert_eq!(&out[..11], &msg[..]);
        }
    }

    #[test]
    fn a_full_ring_takes_nothing_more() {
        let (mut tx, mut rx) = ring_pair(16);
        assert_eq!(tx.write(&[1; 40]).unwrap(), 16);
        assert_eq!(tx.write(&[2; 1]).unwrap(), 0);
        let mut out = [0u8; 4];
        assert_eq!(rx.read(&mut out).unwrap(), 4);
        assert_eq!(tx.write(&[3; 40]).unwrap(), 4);
    }

    #[test]
    fn zero_copy_slices_split_at_the_wrap() {
        let (mut tx, mut rx) = ring_pair(16);
        tx.write(&[0; 12]).unwrap();
        let n = rx.available().unwrap();
        rx.consume(n).unwrap();
        let (a, b) = tx.write_slices(16).unwrap();
        assert_eq!((a.len(), b.len()), (4, 12));
        a.copy_from_slice(&[1, 2, 3, 4]);
        b[..2].copy_from_slice(&[5, 6]);
        tx.commit(6).unwrap();
        let (a, b) = rx.read_slices().unwrap();
        assert_eq!((a, b), (&[1, 2, 3, 4][..], &[5, 6][..]));
        assert!(matches!(
            rx.consume(7),
            Err(RingError::OutOfRange {
                asked: 7,
                available: 6
            })
        ));
        rx.consume(6).unwrap();
        assert!(matches!(tx.commit(17), Err(RingError::OutOfRange { .. })));
    }

    #[test]
    fn eof_comes_after_the_last_byte() {
        let (mut tx, mut rx) = ring_pair(16);
        tx.write(b"bye").unwrap();
        tx.close();
        assert!(!rx.is_finished().unwrap());
        let mut out = [0u8; 8];
        assert_eq!(rx.read(&mut out).unwrap(), 3);
        assert!(rx.is_finished().unwrap());
    }

    #[test]
    fn a_closed_reader_fails_writes() {
        let (mut tx, mut rx) = ring_pair(16);
        rx.close();
        assert_eq!(tx.write(b"x"), Err(RingError::ReaderClosed));
    }

    #[test]
    fn sleepers_are_woken_once_and_only_when_asleep() {
        let (mut tx, mut rx) = ring_pair(16);
        tx.write(b"a").unwrap();
        assert!(!tx.needs_wake(), "nobody sleeps");
        assert!(!rx.prepare_sleep().unwrap(), "data is there: no sleep");
        rx.read(&mut [0; 1]).unwrap();
        assert!(rx.prepare_sleep().unwrap());
        tx.write(b"b").unwrap();
        assert!(tx.needs_wake());
        assert!(!tx.needs_wake());
        rx.finish_sleep();
        // A full ring puts the producer to sleep until the consumer frees space.
        tx.write(&[0; 16]).unwrap();
        assert!(tx.prepare_sleep().unwrap());
        rx.read(&mut [0; 4]).unwrap();
        assert!(rx.needs_wake());
    }

    #[test]
    fn corrupt_indices_poison_the_ring_for_good() {
        let (mut tx, mut rx) = ring_pair(16);
        tx.write(&[7; 4]).unwrap();
        // The "peer" publishes an impossible tail.
        rx.mem.ctl().tail.0.store(1 << 40, Ordering::Relaxed);
        rx.cached_tail = rx.head; // force a reload
        let err = rx.read(&mut [0; 4]).unwrap_err();
        assert!(matches!(err, RingError::Corrupt { field: "tail", .. }));
        assert_eq!(rx.read(&mut [0; 4]), Err(err));
        assert_eq!(rx.available(), Err(err));

        // And an impossible head for the producer.
        tx.mem.ctl().head.0.store(u64::MAX, Ordering::Relaxed);
        let err = tx.write(&[0; 16]).unwrap_err();
        assert!(matches!(err, RingError::Corrupt { field: "head", .. }));
        assert_eq!(tx.commit(0), Err(err));
    }

    #[test]
    fn big_writes_proceed_in_pieces() {
        let (mut tx, mut rx) = ring_pair(64);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = vec![0u8; data.len()];
        let (mut w, mut r) = (0, 0);
        while r < data.len() {
            w += tx.write(&data[w..]).unwrap();
            r += rx.read(&mut out[r..]).unwrap();
        }
        assert_eq!(out, data);
    }
}
