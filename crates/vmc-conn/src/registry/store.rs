//! The registry on disk: opening its directories, writing an entry file (temporary
//! name, lock, then rename) and removing what dead processes left behind.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use vmc_os::segment::{ofd_locked_by_other, ofd_try_lock, TMP_MAX_AGE};
use vmc_os::SegmentDir;

/// Offer sockets older than this are left over by clients that died during a
/// handshake (a live client gives up on its offer long before).
pub(super) const OFFER_MAX_AGE: Duration = Duration::from_secs(90);

/// The byte locked by a live registrant.
pub(super) const LIVENESS_BYTE: i64 = 0;

/// Opens (creating if needed) `root`, then `path` inside it, with the checks
/// of [`SegmentDir::open`] (or, `public`, of [`SegmentDir::open_shared`]).
pub(super) fn open_dirs(path: &Path, root: &Path, public: bool) -> io::Result<SegmentDir> {
    let ctx = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("vmc listener registry {}: {e}", path.display()),
        )
    };
    if public {
        SegmentDir::open_shared(root, 0o1777).map_err(ctx)?;
        return SegmentDir::open_shared(path, 0o1777).map_err(ctx);
    }
    SegmentDir::open(root).map_err(ctx)?;
    SegmentDir::open(path).map_err(ctx)
}

/// Removes the offer sockets in `dir` older than `max_age`, published (`o-`) or
/// still under the name a client bound before its `connect` (`p-`, left by one
/// killed meanwhile); returns how many.
pub(super) fn reap_stale_offers(dir: &SegmentDir, max_age: Duration) -> usize {
    let Ok(mut stream) = rustix::fs::Dir::read_from(dir.fd()) else {
        return 0;
    };
    let mut old = Vec::new();
    let now = SystemTime::now();
    while let Some(Ok(dent)) = stream.read() {
        let name = dent.file_name();
        if !(name.to_bytes().starts_with(b"o-") || name.to_bytes().starts_with(b"p-")) {
            continue;
        }
        let Ok(st) = rustix::fs::statat(dir.fd(), name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let ctime = UNIX_EPOCH + Duration::new(st.st_ctime as u64, st.st_ctime_nsec as u32);
        let is_socket =
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket;
        if is_socket && now.duration_since(ctime).is_ok_and(|age| age > max_age) {
            old.push(name.to_owned());
        }
    }
    old.iter()
        .filter(|name| rustix::fs::unlinkat(dir.fd(), name.as_c_str(), AtFlags::empty()).is_ok())
        .count()
}

/// Creates `tmp` in `dir`, locks it, writes `json` and renames it to `name`.
/// On failure nothing is left behind.
pub(super) fn write_entry(
    dir: &SegmentDir,
    tmp: &str,
    name: &str,
    json: &[u8],
    mode: u32,
) -> io::Result<File> {
    let what = |step: &str, e: &dyn fmt::Display| {
        format!("vmc registry {}: {step} {tmp}: {e}", dir.path().display())
    };
    let errno = |step: &str, e: rustix::io::Errno| {
        io::Error::new(io::Error::from(e).kind(), what(step, &e))
    };
    let fd = rustix::fs::openat(
        dir.fd(),
        tmp,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| errno("creating", e))?;
    let mut file = File::from(vmc_os::fdspace::lift(fd)?);
    let setup = |file: &mut File| -> io::Result<()> {
        // The umask may have removed bits; readers insist on exactly `mode`.
        rustix::fs::fchmod(file.as_fd(), Mode::from_raw_mode(mode))
            .map_err(|e| errno("fchmod", e))?;
        // Lock before the file gets its final name: a final name without a
        // lock always means a dead registrant.
        if !ofd_try_lock(file.as_fd(), LIVENESS_BYTE)
            .map_err(|e| io::Error::new(e.kind(), what("locking", &e)))?
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                what("locking", &"already locked by somebody else"),
            ));
        }
        file.write_all(json)
            .map_err(|e| io::Error::new(e.kind(), what("writing", &e)))?;
        rename_noreplace(dir, tmp, name).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                what(&format!("renaming to {name} from"), &e),
            )
        })
    };
    match setup(&mut file) {
        Ok(()) => Ok(file),
        Err(e) => {
            let _ = rustix::fs::unlinkat(dir.fd(), tmp, AtFlags::empty());
            Err(e)
        }
    }
}

/// `renameat2(RENAME_NOREPLACE)`, or `linkat` + `unlinkat` on file systems
/// without it (same effect: fails with `EEXIST` instead of replacing).
fn rename_noreplace(dir: &SegmentDir, from: &str, to: &str) -> rustix::io::Result<()> {
    match rustix::fs::renameat_with(dir.fd(), from, dir.fd(), to, RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => {
            rustix::fs::linkat(dir.fd(), from, dir.fd(), to, AtFlags::empty())?;
            let _ = rustix::fs::unlinkat(dir.fd(), from, AtFlags::empty());
            Ok(())
        }
        other => other,
    }
}

/// Removes the temporary file `name` if it is a regular file of ours, older
/// than [`TMP_MAX_AGE`] and not locked (its registrant died while
/// registering). Returns whether it was removed.
pub(super) fn reap_stale_tmp(dir: &SegmentDir, name: &str) -> bool {
    let Ok(fd) = rustix::fs::openat(
        dir.fd(),
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let file = File::from(fd);
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.file_type().is_file() || meta.uid() != vmc_os::euid() {
        return false;
    }
    let age = meta
        .modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or(Duration::ZERO);
    if age < TMP_MAX_AGE {
        return false;
    }
    if !matches!(ofd_locked_by_other(file.as_fd(), LIVENESS_BYTE), Ok(false)) {
        return false;
    }
    rustix::fs::unlinkat(dir.fd(), name, AtFlags::empty()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    use crate::registry::Registry;

    #[test]
    fn stale_offer_sockets_reaped_young_ones_and_other_files_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(tmp.path().join("vmc").join("listeners")).unwrap();
        let offers = reg.offers().unwrap().path().to_path_buf();
        let meta = std::fs::metadata(&offers).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o700);
        let young = offers.join("o-1-young.sock");
        let old = offers.join("o-1-old.sock");
        // Bound before a connect whose process was killed before publishing it.
        let unpublished = offers.join("p-1-0.sock");
        let other = offers.join("o-1-not-a-socket");
        let _l = UnixListener::bind(&young).unwrap();
        drop(UnixListener::bind(&old).unwrap());
        drop(UnixListener::bind(&unpublished).unwrap());
        std::fs::write(&other, b"x").unwrap();
        assert_eq!(reap_stale_offers(reg.offers().unwrap(), OFFER_MAX_AGE), 0);
        assert!(young.exists() && old.exists() && unpublished.exists() && other.exists());
        // Their age is the point: 20 ms on, all are older than 10 ms.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            reap_stale_offers(reg.offers().unwrap(), Duration::from_millis(10)),
            3
        );
        assert!(
            !young.exists() && !old.exists() && !unpublished.exists(),
            "old sockets removed"
        );
        assert!(other.exists(), "only sockets are offers");
    }
}
