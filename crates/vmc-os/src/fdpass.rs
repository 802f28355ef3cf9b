//! Passing file descriptors over a Unix stream socket (`SCM_RIGHTS`).
//!
//! This is how a memfd segment and an eventfd reach the peer process. The
//! descriptors travel attached to the first byte of the data; the data itself
//! is ordinary stream data, so callers frame it themselves. Received
//! descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Instant;

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most descriptors accepted in one message: the kernel's own limit
/// (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Sends all of `data` on the Unix stream socket `sock`, with `fds` attached
/// to its first byte.
///
/// `data` must not be empty when `fds` is not (descriptors need at least one
/// byte to ride on). Retries on `EINTR` and after partial writes (the
/// descriptors go only with the first chunk). Uses `MSG_NOSIGNAL`, so a
/// closed peer yields `EPIPE` instead of `SIGPIPE`. A non-blocking socket may
/// fail with `WouldBlock` part-way through.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_until(sock, data, fds, None)
}

/// [`send_with_fds`], waiting for room at most until `deadline` (then
/// `TimedOut`), whether `sock` is blocking or not; no socket option is touched.
pub fn send_with_fds_by(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    deadline: Instant,
) -> io::Result<()> {
    send_until(sock, data, fds, Some(deadline))
}

/// Waits until `sock` is ready for `events` or `deadline` passes (`TimedOut`).
fn wait_until(
    sock: BorrowedFd<'_>,
    events: rustix::event::PollFlags,
    deadline: Instant,
) -> io::Result<()> {
    use rustix::event::{poll, PollFd, Timespec};
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not answer in time",
            ));
        }
        let t = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::from_borrowed_fd(sock, events)];
        match poll(&mut fds, Some(&t)) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

fn send_until(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
) -> io::Result<()> {
    if data.is_empty() && !fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "send_with_fds: descriptors need at least one byte of data",
        ));
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "send_with_fds: {} descriptors, at most {MAX_FDS} per message",
                fds.len()
            ),
        ));
    }
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("send_with_fds: control buffer too small"));
    }
    let mut no_control = SendAncillaryBuffer::default();
    let mut sent = 0;
    while sent < data.len() {
        let iov = [IoSlice::new(&data[sent..])];
        // The first chunk carries the descriptors; later ones only data.
        let ctl = if sent == 0 {
            &mut control
        } else {
            &mut no_control
        };
        let flags = match deadline {
            Some(_) => SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            None => SendFlags::NOSIGNAL,
        };
        match rustix::net::sendmsg(sock, &iov, ctl, flags) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "sendmsg wrote nothing",
                ))
            }
            Ok(n) => sent += n,
            Err(Errno::INTR) => continue,
            Err(e) => match (e, deadline) {
                (Errno::AGAIN, Some(d)) => wait_until(sock, rustix::event::PollFlags::OUT, d)?,
                (e, _) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("sendmsg with {} descriptors: {e}", fds.len()),
                    ))
                }
            },
        }
    }
    Ok(())
}

/// Receives data into `buf` from the Unix stream socket `sock`, with up to
/// `max_fds` descriptors attached.
///
/// Returns the number of bytes read (0 at end of stream) and the received
/// descriptors (close-on-exec). Retries on `EINTR`. If the sender attached
/// more descriptors than `max_fds` the kernel truncates the control data
/// (`MSG_CTRUNC`, the excess descriptors are closed by the kernel); this is
/// reported as an error and the descriptors that did arrive are closed.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_until(sock, buf, max_fds, None)
}

/// [`recv_with_fds`], waiting for data at most until `deadline` (then
/// `TimedOut`), whether `sock` is blocking or not; no socket option is touched.
pub fn recv_with_fds_by(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    deadline: Instant,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_until(sock, buf, max_fds, Some(deadline))
}

fn recv_until(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    deadline: Option<Instant>,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let max_fds = max_fds.min(MAX_FDS);
    let mut space =
        vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(max_fds.max(1)))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        let mut iov = [IoSliceMut::new(buf)];
        let flags = match deadline {
            Some(_) => RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            None => RecvFlags::CMSG_CLOEXEC,
        };
        match rustix::net::recvmsg(sock, &mut iov, &mut control, flags) {
            Ok(msg) => break msg,
            Err(Errno::INTR) => continue,
            Err(e) => match (e, deadline) {
                (Errno::AGAIN, Some(d)) => wait_until(sock, rustix::event::PollFlags::IN, d)?,
                (e, _) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("recvmsg: {e}"),
                    ))
                }
            },
        }
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() > max_fds {
        // `fds` is dropped here, closing what did arrive.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "recvmsg: control data truncated (this process is out of descriptors, \
                 or the peer sent more than {max_fds})"
            ),
        ));
    }
    // Received descriptors arrive at the lowest free numbers, the program's.
    let fds = fds
        .into_iter()
        .map(crate::fdspace::lift)
        .collect::<io::Result<Vec<_>>>()?;
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    #[test]
    fn passes_memfd_and_data() {
        let (a, b) = pair();
        let seg = crate::Segment::create_memfd("fdpass", 4096).unwrap();
        let ev = crate::EventFd::new().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[seg.fd(), ev.fd()]).unwrap();

        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            let fl = rustix::io::fcntl_getfd(fd).unwrap();
            assert!(fl.contains(rustix::io::FdFlags::CLOEXEC));
        }
        let mut it = fds.into_iter();
        let peer = crate::Segment::from_memfd(it.next().unwrap()).unwrap();
        // SAFETY: offset 10 is inside both 4096-byte mappings.
        unsafe {
            seg.as_ptr().as_ptr().add(10).write_volatile(77);
            assert_eq!(peer.as_ptr().as_ptr().add(10).read_volatile(), 77);
        }
        let peer_ev = crate::EventFd::from_fd(it.next().unwrap());
        peer_ev.notify().unwrap();
        let r = ev.wait(None, Some(std::time::Duration::ZERO)).unwrap();
        assert!(r.event);
    }

    #[test]
    fn plain_data_and_eof() {
        let _g = crate::test_support::fd_sensitive();
        let (a, b) = pair();
        send_with_fds(a.as_fd(), b"xyz", &[]).unwrap();
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 2).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"xyz"[..], 0));
        drop(a);
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 2).unwrap();
        assert_eq!((n, fds.len()), (0, 0));
    }

    #[test]
    fn too_many_fds_is_error() {
        let (a, b) = pair();
        let e1 = crate::EventFd::new().unwrap();
        let e2 = crate::EventFd::new().unwrap();
        let e3 = crate::EventFd::new().unwrap();
        send_with_fds(a.as_fd(), b"!", &[e1.fd(), e2.fd(), e3.fd()]).unwrap();
        let mut buf = [0u8; 8];
        let err = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn fds_need_data() {
        let (a, _b) = pair();
        let e = crate::EventFd::new().unwrap();
        assert!(send_with_fds(a.as_fd(), b"", &[e.fd()]).is_err());
    }
}
