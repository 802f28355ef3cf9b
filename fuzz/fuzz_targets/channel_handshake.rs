//! The channel handshake of `vmc_channel::setup` (HELLO and ACK) against a hostile
//! peer. The first input byte (mod 3) picks the part under test.
//!
//! 0 and 1 drive the real calls on a socket pair (the frames carry descriptors):
//! the input plays the other end, sending any bytes with any descriptors (a memfd
//! laid out as a channel and then scribbled on, a raw memfd of any size, seals and
//! contents, eventfds, a pipe), then shuts its sending side so that nothing waits
//! for more.
//! - 0, attacher under test (`Channel::attach_over`): it returns a channel or an
//!   error, never panics or hangs; its answer, if any, is an 8-byte ACK with status
//!   OK exactly when it returned a channel (then with two eventfds exactly for an
//!   eventfd channel, and the segment's attacher side claimed), REFUSED or UNKNOWN
//!   otherwise; a channel it returns survives non-blocking reads and writes.
//! - 1, creator under test (`Channel::offer_over` then `Offer::finish`): its HELLO
//!   is well-formed, and it accepts an ACK exactly when the frame's first 8 bytes
//!   are the magic, status OK and zero reserved bytes, the descriptors are two for
//!   an eventfd channel and none otherwise, and the segment's attacher side says
//!   attached (open or closed).
//!
//! 2 gives the rest of the input, as one message, to the checked types the
//! handshake parses with (`vmc_channel::fuzzing::{Hello, Ack}`): each accepts
//! exactly what a correct peer sends (as read here from the layout, not from the
//! parser), what it accepts is the encoding of what it parsed (`emit(parse(x)) ==
//! x`), and a refusal names its message and a field.
#![no_main]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rustix::fs::{MemfdFlags, SealFlags};
use vmc_channel::fuzzing::{Ack, Hello, ACK_LEN, HELLO_LEN};
use vmc_channel::{Channel, ChannelConfig, WakeMode};
use vmc_fuzz::Input;
use vmc_os::{EventFd, Segment};
use vmc_ring::layout::{ChannelLayout, WakeKind, PAGE};
use vmc_ring::Endpoint;

/// Descriptors the input's end sends, and what keeps them (and their other ends)
/// open until the end of the run: a pipe whose reader is gone would raise SIGPIPE
/// in whoever "notifies" it.
#[derive(Default)]
struct Held {
    segments: Vec<(Arc<Segment>, Option<Endpoint>)>,
    raw: Vec<OwnedFd>,
    eventfds: Vec<EventFd>,
    pipes: Vec<(OwnedFd, OwnedFd)>,
}

fn word32(seg: &Segment, off: usize) -> &AtomicU32 {
    assert!(off.is_multiple_of(4) && off + 4 <= seg.len());
    // SAFETY: the mapping is page aligned and `off` in bounds and aligned; every word
    // of the header is an atomic, and the peer may write it at any time anyway.
    unsafe { &*(seg.as_ptr().as_ptr().add(off) as *const AtomicU32) }
}

fn word64(seg: &Segment, off: usize) -> &AtomicU64 {
    assert!(off.is_multiple_of(8) && off + 8 <= seg.len());
    // SAFETY: as in `word32`.
    unsafe { &*(seg.as_ptr().as_ptr().add(off) as *const AtomicU64) }
}

/// A few writes of the input's choosing over the first 1152 bytes (the header).
fn scribble(inp: &mut Input<'_>, seg: &Segment) {
    for _ in 0..inp.u8() % 4 {
        let off = 8 * (usize::from(inp.u16()) % 144);
        let v = inp.u64();
        if off == 256 {
            // The attacher's side state, the word the handshake itself claims.
            word32(seg, off).store(v as u32, Ordering::Relaxed);
        } else {
            word64(seg, off).store(v, Ordering::Relaxed);
        }
    }
}

/// A memfd for a HELLO: a channel laid out by the real code (then scribbled on), or
/// a raw memfd of the input's size, seals and first bytes.
fn segment_fd(inp: &mut Input<'_>, held: &mut Held) -> Option<(u8, usize)> {
    let mode = inp.u8();
    if mode & 1 == 0 {
        let cap = [16, 4096, 65536][usize::from(inp.u8() % 3)];
        let layout = ChannelLayout::for_capacity(cap).ok()?;
        let len = layout.segment_len + if mode & 2 != 0 { PAGE } else { 0 };
        let seg = Arc::new(Segment::create_memfd("fuzz", len).ok()?);
        // SAFETY: the segment's mapping is page aligned, `len` bytes, kept alive by
        // the owner passed.
        let ep =
            unsafe { Endpoint::create(seg.as_ptr(), len, seg.clone(), cap, 1, WakeKind::Poll) }
                .ok()?;
        scribble(inp, &seg);
        held.segments.push((seg, Some(ep)));
        Some((0, held.segments.len() - 1))
    } else {
        let fd =
            rustix::fs::memfd_create("fuzz-raw", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                .ok()?;
        let len = u64::from(inp.u8() % 40) * PAGE as u64;
        rustix::fs::ftruncate(&fd, len).ok()?;
        let n = usize::from(inp.u16() % 1153);
        let head = inp.bytes(n);
        if !head.is_empty() && len > 0 {
            let _ = rustix::io::pwrite(&fd, &head[..head.len().min(len as usize)], 0);
        }
        let mut seals = SealFlags::empty();
        for (bit, seal) in [
            (2, SealFlags::SHRINK),
            (4, SealFlags::GROW),
            (8, SealFlags::WRITE),
            (16, SealFlags::SEAL),
        ] {
            if mode & bit != 0 {
                seals |= seal;
            }
        }
        let _ = rustix::fs::fcntl_add_seals(&fd, seals);
        held.raw.push(fd);
        Some((1, held.raw.len() - 1))
    }
}

/// Descriptors to go with a frame: bit 0 a memfd, bits 1-2 that many eventfds,
/// bit 3 a pipe's write end.
fn descriptors(inp: &mut Input<'_>, held: &mut Held) -> Vec<(u8, usize)> {
    let spec = inp.u8();
    let mut order = Vec::new();
    if spec & 1 != 0 {
        order.extend(segment_fd(inp, held));
    }
    for _ in 0..(spec >> 1) & 3 {
        if let Ok(e) = EventFd::new() {
            held.eventfds.push(e);
            order.push((2, held.eventfds.len() - 1));
        }
    }
    if spec & 8 != 0 {
        if let Ok((r, w)) = rustix::pipe::pipe() {
            held.pipes.push((r, w));
            order.push((3, held.pipes.len() - 1));
        }
    }
    order
}

fn fd_of(held: &Held, (kind, i): (u8, usize)) -> BorrowedFd<'_> {
    match kind {
        0 => held.segments[i].0.fd(),
        1 => held.raw[i].as_fd(),
        2 => held.eventfds[i].fd(),
        _ => held.pipes[i].1.as_fd(),
    }
}

/// Whatever the other end has sent (it is done sending), without waiting.
fn answers(sock: &UnixStream) -> Vec<(Vec<u8>, usize)> {
    let mut got = Vec::new();
    // A deadline already passed: one non-blocking receive each.
    let deadline = Instant::now();
    loop {
        let mut buf = [0u8; 8];
        match vmc_os::recv_with_fds_by(sock.as_fd(), &mut buf, 8, deadline) {
            Ok((0, _)) | Err(_) => return got,
            Ok((n, fds)) => got.push((buf[..n].to_vec(), fds.len())),
        }
    }
}

/// A channel that came out of a hostile handshake still behaves: non-blocking calls
/// return, whatever the header says.
fn use_channel(ch: Channel) {
    let (mut r, mut w) = ch.split();
    r.set_nonblocking(true);
    w.set_nonblocking(true);
    let _ = w.write(b"hello from the fuzzer");
    let mut buf = [0u8; 64];
    let _ = r.read(&mut buf);
    let _ = (r.available(), w.queued(), r.peer_alive());
}

fn attacher_under_test(inp: &mut Input<'_>) {
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    let mut held = Held::default();
    for _ in 0..1 + inp.u8() % 2 {
        let mut frame = [0u8; 24];
        let n = usize::from(inp.u8() % 25);
        let src = inp.bytes(n);
        frame[..src.len()].copy_from_slice(src);
        let order = descriptors(inp, &mut held);
        let fds: Vec<BorrowedFd<'_>> = order.iter().map(|&o| fd_of(&held, o)).collect();
        let fds = if n == 0 { Vec::new() } else { fds };
        let _ = vmc_os::send_with_fds(ours.as_fd(), &frame[..n], &fds);
    }
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let res = Channel::attach_over(theirs.into(), Duration::ZERO);
    let acks = answers(&ours);
    if trace() {
        eprintln!("attach: {:?}, answers {acks:?}", res.as_ref().map(|_| ()));
    }
    for (ack, _) in &acks {
        assert_eq!(ack.len(), 8, "ACK {ack:?}");
        assert_eq!(&ack[..4], b"VMCA");
        assert_eq!(ack[5..], [0; 3]);
    }
    match res {
        Ok(ch) => {
            let (ack, fds) = acks.last().expect("a channel without an ACK");
            assert_eq!(ack[4], 0, "a channel after a refusal");
            let eventfd = ch.wake_fds().read().is_some();
            assert_eq!(*fds, if eventfd { 2 } else { 0 });
            use_channel(ch);
        }
        Err(_) => {
            for (ack, _) in &acks {
                assert!(matches!(ack[4], 1 | 2), "status {} with an error", ack[4]);
            }
        }
    }
    drop(held);
}

fn creator_under_test(inp: &mut Input<'_>) {
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    let wake = [WakeMode::Futex, WakeMode::EventFd, WakeMode::Poll][usize::from(inp.u8() % 3)];
    let config = ChannelConfig {
        capacity: [16, 4096][usize::from(inp.u8() % 2)],
        wake,
        spin: Duration::ZERO,
    };
    let Ok(offer) = Channel::offer_over(theirs.into(), &config) else {
        return;
    };
    let mut hello = [0u8; 16];
    let (n, mut fds) = vmc_os::recv_with_fds(ours.as_fd(), &mut hello, 3).expect("HELLO");
    assert_eq!(n, 16);
    assert_eq!(&hello[..4], b"VMC1");
    assert_eq!(hello[4], 1, "a fresh segment");
    assert_eq!(hello[6..8], [0; 2]);
    let layout = ChannelLayout::for_capacity(config.capacity).unwrap();
    assert_eq!(
        u64::from_le_bytes(hello[8..].try_into().unwrap()),
        layout.segment_len as u64
    );
    assert_eq!(fds.len(), if wake == WakeMode::EventFd { 3 } else { 1 });
    let memfd = fds.remove(0);
    let seg = Arc::new(Segment::from_memfd(memfd).expect("the creator's memfd"));
    let mut held = Held::default();
    let how = inp.u8();
    let ep = if how & 1 != 0 {
        // SAFETY: the mapping is page aligned, `len()` bytes, kept by the owner.
        let ep =
            unsafe { Endpoint::attach(seg.as_ptr(), seg.len(), seg.clone(), 2, WakeKind::Poll) };
        Some(ep.expect("the creator's own layout"))
    } else {
        None
    };
    if how & 2 != 0 {
        scribble(inp, &seg);
    }
    let state = word32(&seg, 256).load(Ordering::Relaxed);
    let mut frame = [0u8; 12];
    let len = usize::from(inp.u8() % 13);
    let src = inp.bytes(len);
    frame[..src.len()].copy_from_slice(src);
    let order = descriptors(inp, &mut held);
    let sent_fds: Vec<BorrowedFd<'_>> = order.iter().map(|&o| fd_of(&held, o)).collect();
    let sent_fds = if len == 0 { Vec::new() } else { sent_fds };
    let sent = vmc_os::send_with_fds(ours.as_fd(), &frame[..len], &sent_fds).is_ok();
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let res = offer.finish();
    if trace() {
        eprintln!("finish: {:?}", res.as_ref().map(|_| ()));
    }
    let want_fds = if wake == WakeMode::EventFd { 2 } else { 0 };
    let acceptable = sent
        && len >= 8
        && &frame[..4] == b"VMCA"
        && frame[4] == 0
        && frame[5..8] == [0; 3]
        && sent_fds.len() == want_fds
        && matches!(state, 1 | 2);
    assert_eq!(
        res.is_ok(),
        acceptable,
        "ACK {:?} with {} fds, attacher state {state}: {:?}",
        &frame[..len],
        sent_fds.len(),
        res.as_ref().err()
    );
    if let Ok(ch) = res {
        use_channel(ch);
    }
    drop(ep);
    drop(held);
}

/// A HELLO a correct creator sends, read from the layout in `vmc_channel`'s
/// hello.rs, not from its parser.
fn hello_spec(b: &[u8]) -> bool {
    if b.len() != HELLO_LEN || &b[..4] != b"VMC1" || b[6..8] != [0; 2] {
        return false;
    }
    let arg = u64::from_le_bytes(b[8..].try_into().unwrap());
    let wake_ok = matches!(b[5], 1..=3);
    match b[4] {
        1 => wake_ok && arg != 0 && arg <= vmc_os::MAX_SEGMENT_LEN as u64,
        2 => wake_ok,
        _ => false,
    }
}

/// An ACK a correct attacher sends.
fn ack_spec(b: &[u8]) -> bool {
    b.len() == ACK_LEN && &b[..4] == b"VMCA" && b[4] <= 2 && b[5..] == [0; 3]
}

fn messages(b: &[u8]) {
    match Hello::parse(b) {
        Ok(h) => {
            assert!(hello_spec(b), "HELLO {b:?} accepted as {h:?}");
            assert_eq!(h.emit()[..], *b, "{h:?}");
        }
        Err(e) => {
            assert!(!hello_spec(b), "HELLO {b:?} refused: {e}");
            assert_eq!(e.message, "HELLO");
            assert!(!e.field.is_empty());
        }
    }
    match Ack::parse(b) {
        Ok(a) => {
            assert!(ack_spec(b), "ACK {b:?} accepted as {a:?}");
            assert_eq!(a.emit()[..], *b, "{a:?}");
        }
        Err(e) => {
            assert!(!ack_spec(b), "ACK {b:?} refused: {e}");
            assert_eq!(e.message, "ACK");
            assert!(!e.field.is_empty());
        }
    }
}

/// `VMC_FUZZ_TRACE=1` prints what each side answered.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VMC_FUZZ_TRACE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    match inp.u8() % 3 {
        0 => attacher_under_test(&mut inp),
        1 => creator_under_test(&mut inp),
        _ => messages(inp.rest()),
    }
});
