//! [`NetNs`]: which network namespace a listener lives in.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use vmc_os::sync::ForkSafeMutex;

use serde::{Deserialize, Serialize};

/// A network namespace, identified like `ip netns identify` does: by the
/// device and inode numbers of its `nsfs` file.
///
/// Two listeners bound to the same address (say `0.0.0.0:80`) in two
/// namespaces are two different listeners; the namespace tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetNs {
    /// `st_dev` of the namespace file.
    pub dev: u64,
    /// `st_ino` of the namespace file.
    pub ino: u64,
}

impl NetNs {
    /// The network namespace of the calling thread, from `stat` of
    /// `/proc/thread-self/ns/net` (falling back to `/proc/self/ns/net` on
    /// kernels without `/proc/thread-self`).
    pub fn current() -> io::Result<NetNs> {
        let meta = std::fs::metadata("/proc/thread-self/ns/net")
            .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("network namespace: stat /proc/self/ns/net: {e}"),
                )
            })?;
        Ok(NetNs {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl NetNs {
    /// The network namespace socket `sock` lives in. Known namespaces are
    /// remembered by their cookie (see [`vmc_os::proc::socket_netns_cookie`]),
    /// so this costs one `getsockopt`; a namespace seen for the first time is
    /// taken to be the calling thread's ([`NetNs::current`]), which it is for a
    /// socket the thread just made. Kernels without cookies: always
    /// [`NetNs::current`].
    pub fn of_socket(sock: std::os::fd::BorrowedFd<'_>) -> io::Result<NetNs> {
        /// Namespaces remembered at most (each is 24 bytes).
        const KNOWN: usize = 256;
        static BY_COOKIE: ForkSafeMutex<HashMap<u64, NetNs>> =
            ForkSafeMutex::new(|inherited| inherited.map(std::mem::take).unwrap_or_default());
        let Ok(cookie) = vmc_os::proc::socket_netns_cookie(sock) else {
            return NetNs::current();
        };
        let known = |c| BY_COOKIE.lock().get(&c).copied();
        if let Some(ns) = known(cookie) {
            return Ok(ns);
        }
        let ns = NetNs::current()?;
        let mut map = BY_COOKIE.lock();
        if map.len() >= KNOWN {
            map.clear();
        }
        map.insert(cookie, ns);
        Ok(ns)
    }
}

impl fmt::Display for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The same form as the `readlink` of the namespace file.
        write!(f, "net:[{}]", self.ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_current() {
        let ns = NetNs::current().unwrap();
        let m = std::fs::metadata("/proc/self/ns/net").unwrap();
        assert_eq!(
            ns,
            NetNs {
                dev: m.dev(),
                ino: m.ino()
            }
        );
        let link = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_eq!(link.to_str().unwrap(), ns.to_string());
    }
}
