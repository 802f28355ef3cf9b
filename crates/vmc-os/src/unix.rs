//! Unix-domain sockets at paths of any length.
//!
//! A `sockaddr_un` holds at most 107 bytes of path, and registry or segment
//! directories can sit deeper than that (a CI checkout's `target/tmp/...`,
//! a long `$XDG_RUNTIME_DIR`). [`bind`] and [`connect`] take any path: a short
//! one is used as is; a long one is reached through the directory that holds
//! it, opened `O_PATH` and named `/proc/self/fd/<fd>/<file>`, which the kernel
//! resolves to the same inode. Only the file name itself must fit.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// The longest path a `sockaddr_un` holds (108 bytes with the NUL).
const SUN_PATH_MAX: usize = 107;

/// `UnixListener::bind(path)`, for a path of any length; the socket is one of
/// vmc's own descriptors ([`crate::fdspace`]).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let l = with_short_path(path, |p| UnixListener::bind(p))?;
    Ok(UnixListener::from(crate::fdspace::lift(l.into())?))
}

/// A listening socket bound at `path` (any length) that never blocks in `accept`,
/// with room for `backlog` callers; one of vmc's own descriptors.
pub fn listen_nonblocking(path: &Path, backlog: i32) -> io::Result<UnixListener> {
    let fd = nonblocking_at(path, |fd, addr| rustix::net::bind(fd, addr))?;
    rustix::net::listen(&fd, backlog)?;
    Ok(UnixListener::from(crate::fdspace::lift(fd)?))
}

/// Connects to the Unix socket at `path` (any length) without ever waiting: a
/// listener whose backlog is full is `EAGAIN`, as is one that is bound but not
/// listening yet `ECONNREFUSED`. The socket, non-blocking, is one of vmc's own
/// descriptors.
pub fn connect_nonblocking(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    let fd = nonblocking_at(path, |fd, addr| rustix::net::connect(fd, addr))?;
    crate::fdspace::lift(fd)
}

/// A new non-blocking Unix stream socket, bound or connected to `path` by `op`.
fn nonblocking_at(
    path: &Path,
    op: impl FnOnce(&std::os::fd::OwnedFd, &rustix::net::SocketAddrUnix) -> rustix::io::Result<()>,
) -> io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    with_short_path(path, |p| Ok(op(&fd, &SocketAddrUnix::new(p)?)?))?;
    Ok(fd)
}

/// `UnixStream::connect(path)`, for a path of any length; the socket is one of
/// vmc's own descriptors ([`crate::fdspace`]).
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let s = with_short_path(path, |p| UnixStream::connect(p))?;
    Ok(UnixStream::from(crate::fdspace::lift(s.into())?))
}

/// Calls `f` with `path`, or with a short name for it that stays valid during
/// the call.
fn with_short_path<T>(path: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return f(path);
    }
    let too_long = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unix socket path {} is longer than {SUN_PATH_MAX} bytes and has no short file name",
                path.display()
            ),
        )
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(too_long());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dirfd = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("unix socket directory {}: {e}", dir.display()),
        )
    })?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dirfd.as_raw_fd())).join(name);
    if short.as_os_str().as_bytes().len() > SUN_PATH_MAX {
        return Err(too_long());
    }
    f(&short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn long_paths_bind_and_connect() {
        let base = std::env::temp_dir().join(format!("vmc-unix-{}", std::process::id()));
        let deep = base.join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("s.sock");
        assert!(path.as_os_str().len() > SUN_PATH_MAX);

        let l = bind(&path).unwrap();
        assert!(path.exists(), "the socket lives at its real path");
        let mut c = connect(&path).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn nonblocking_listeners_do_not_wait_for_callers() {
        let base = std::env::temp_dir().join(format!("vmc-unb-{}", std::process::id()));
        let deep = base.join("d".repeat(100));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("s.sock");
        let l = listen_nonblocking(&path, 1).unwrap();
        assert_eq!(
            l.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nobody called yet"
        );
        let _c = connect_nonblocking(&path).unwrap();
        assert!(l.accept().is_ok());
        let missing = connect_nonblocking(&deep.join("none.sock")).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn short_paths_are_used_as_they_are() {
        let path = std::env::temp_dir().join(format!("vmc-us-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = bind(&path).unwrap();
        drop(connect(&path).unwrap());
        assert!(l.accept().is_ok());
        std::fs::remove_file(&path).unwrap();
    }
}
