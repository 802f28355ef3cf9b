//! [`ListenerEntry`], the content of an entry file, and the names of entry files:
//! what a registrant writes and how a reader parses and checks it.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::netns::NetNs;

/// The version of the [`ListenerEntry`] format written by this code. Entries
/// with another version are ignored by lookups.
pub const ENTRY_VERSION: u32 = 2;

/// Prefix of entry file names: `l-<port>-<pid>-<random>.json`.
pub const ENTRY_PREFIX: &str = "l-";

/// Suffix of entry file names.
pub const ENTRY_SUFFIX: &str = ".json";

/// Prefix of entry files still being written by their registrant.
pub(super) const TMP_ENTRY_PREFIX: &str = ".tmp-l-";

/// Entry files larger than this are not read (they are not ours).
pub(super) const MAX_ENTRY_LEN: u64 = 64 * 1024;

/// One registered listener: the content of an entry file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenerEntry {
    /// Format version; [`ENTRY_VERSION`] for entries written by this code.
    pub version: u32,
    /// The network namespace the listening socket lives in.
    pub netns: NetNs,
    /// The address the listening socket is bound to. The IP may be
    /// unspecified (`0.0.0.0` or `::`), the port never is.
    pub addr: SocketAddr,
    /// The process that registered the listener.
    pub pid: u32,
    /// The effective uid of that process; lookups ignore entries whose uid
    /// is not ours.
    pub uid: u32,
    /// The directory in which the listener's processes look for the offer
    /// sockets of the connections they accept ([`crate::wire::offer_name`]).
    pub offers: PathBuf,
    /// When the entry was built, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

impl ListenerEntry {
    /// An entry for a listener of this process (our pid and euid, the current
    /// time) in network namespace `netns`.
    pub fn new(netns: NetNs, addr: SocketAddr, offers: impl Into<PathBuf>) -> ListenerEntry {
        ListenerEntry {
            version: ENTRY_VERSION,
            netns,
            addr,
            pid: vmc_os::pid(),
            uid: vmc_os::euid(),
            offers: offers.into(),
            created_unix_ms: now_unix_ms(),
        }
    }

    /// Like [`ListenerEntry::new`], in the calling thread's network
    /// namespace ([`NetNs::current`]).
    pub fn for_current_netns(
        addr: SocketAddr,
        offers: impl Into<PathBuf>,
    ) -> io::Result<ListenerEntry> {
        Ok(ListenerEntry::new(NetNs::current()?, addr, offers))
    }
}

/// The port of a well-formed entry file name
/// `l-<port>-<letters, digits and '-'>.json`, or `None`.
pub(crate) fn parse_entry_name(name: &str) -> Option<u16> {
    let rest = name
        .strip_prefix(ENTRY_PREFIX)?
        .strip_suffix(ENTRY_SUFFIX)?;
    let (port, tail) = rest.split_once('-')?;
    if port.is_empty()
        || port.len() > 5
        || !port.bytes().all(|b| b.is_ascii_digit())
        || (port.len() > 1 && port.starts_with('0'))
        || tail.is_empty()
        || !tail.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    port.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Parses and checks an entry file's content.
pub(crate) fn parse_entry(buf: &[u8], name_port: u16, owner: u32) -> Result<ListenerEntry, String> {
    let value: serde_json::Value =
        serde_json::from_slice(buf).map_err(|e| format!("is not valid JSON: {e}"))?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(ENTRY_VERSION) => {}
        Some(v) => return Err(format!("has version {v}, expected {ENTRY_VERSION}")),
        None => return Err("has no version".to_string()),
    }
    let entry: ListenerEntry =
        serde_json::from_value(value).map_err(|e| format!("is not a listener entry: {e}"))?;
    if entry.uid != owner {
        return Err(format!("says uid {}, expected {owner}", entry.uid));
    }
    if entry.addr.port() != name_port {
        return Err(format!(
            "is for port {} but named for port {name_port}",
            entry.addr.port()
        ));
    }
    Ok(entry)
}

/// Milliseconds since the Unix epoch.
fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    #[test]
    fn entry_names() {
        assert_eq!(parse_entry_name("l-80-123-00ff.json"), Some(80));
        assert_eq!(parse_entry_name("l-65535-1-a.json"), Some(65535));
        for bad in [
            "l-0-1-a.json",
            "l-080-1-a.json",
            "l-+80-1-a.json",
            "l-65536-1-a.json",
            "l-80-.json",
            "l-80.json",
            "l-80-1-a.json.tmp",
            "l-80-1/a.json",
            "l-80-1.a.json",
            ".tmp-l-80-1-a",
            "x-80-1-a.json",
            "l--1-a.json",
        ] {
            assert_eq!(parse_entry_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn entry_json_is_stable() {
        let e = ListenerEntry {
            version: 2,
            netns: NetNs {
                dev: 4,
                ino: 4026531833,
            },
            addr: "[::]:443".parse().unwrap(),
            pid: 7,
            uid: 1000,
            offers: PathBuf::from("/dev/shm/vmc-1000/offers"),
            created_unix_ms: 1_700_000_000_000,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "version": 2,
                "netns": {"dev": 4, "ino": 4026531833u64},
                "addr": "[::]:443",
                "pid": 7,
                "uid": 1000,
                "offers": "/dev/shm/vmc-1000/offers",
                "created_unix_ms": 1_700_000_000_000u64,
            })
        );
        // Unknown fields (from a compatible newer writer) are accepted.
        let mut v2 = v.clone();
        v2["extra"] = "x".into();
        let bytes = serde_json::to_vec(&v2).unwrap();
        assert_eq!(parse_entry(&bytes, 443, 1000).unwrap(), e);
        assert!(parse_entry(&bytes, 443, 1001).is_err());
        assert!(parse_entry(&bytes, 444, 1000).is_err());
    }

    proptest! {
        #[test]
        fn entry_name_roundtrip(port in 1u16.., pid in any::<u32>(), r in any::<u64>()) {
            let name = format!("{ENTRY_PREFIX}{port}-{pid}-{r:016x}{ENTRY_SUFFIX}");
            prop_assert_eq!(parse_entry_name(&name), Some(port));
        }

        #[test]
        fn entry_name_parser_total(name in "\\PC{0,40}") {
            let _ = parse_entry_name(&name);
        }
    }
}
