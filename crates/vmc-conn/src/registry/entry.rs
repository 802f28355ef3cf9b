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

/// Why an entry file's content was refused, naming the field at fault and what
/// it held (like [`crate::wire::FrameError`] for frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryError {
    /// The content is not JSON (serde_json's reason).
    NotJson(String),
    /// The content is JSON but not an object (what it is instead).
    NotAnObject(&'static str),
    /// A field is absent.
    Missing(&'static str),
    /// A field holds a value that is not of its type (serde_json's reason).
    Malformed {
        /// The field.
        field: &'static str,
        /// What serde_json said of its value.
        why: String,
    },
    /// `version` is not [`ENTRY_VERSION`] (what it held, as JSON).
    Version(String),
    /// `uid` is not the uid of the file's owner.
    Uid {
        /// The uid in the entry.
        found: u32,
        /// The owner's.
        owner: u32,
    },
    /// `addr` has port 0, which no listener is bound to.
    PortZero,
    /// `addr`'s port is not the port in the file's name.
    Port {
        /// The port in the entry.
        found: u16,
        /// The port in the file's name.
        name_port: u16,
    },
    /// `offers` is not an absolute path (what it held).
    RelativeOffers(PathBuf),
}

impl EntryError {
    /// The field at fault, if the content was an object at all.
    // For the tests and the fuzz target; lookups only report the message.
    #[cfg_attr(not(any(test, feature = "fuzzing")), allow(dead_code))]
    pub fn field(&self) -> Option<&'static str> {
        match self {
            EntryError::NotJson(_) | EntryError::NotAnObject(_) => None,
            EntryError::Missing(field) | EntryError::Malformed { field, .. } => Some(field),
            EntryError::Version(_) => Some("version"),
            EntryError::Uid { .. } => Some("uid"),
            EntryError::PortZero | EntryError::Port { .. } => Some("addr"),
            EntryError::RelativeOffers(_) => Some("offers"),
        }
    }
}

impl std::fmt::Display for EntryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryError::NotJson(why) => write!(f, "is not valid JSON: {why}"),
            EntryError::NotAnObject(what) => write!(f, "is {what}, not a JSON object"),
            EntryError::Missing(field) => write!(f, "has no field `{field}`"),
            EntryError::Malformed { field, why } => write!(f, "field `{field}`: {why}"),
            EntryError::Version(found) => {
                write!(f, "field `version` holds {found}, expected {ENTRY_VERSION}")
            }
            EntryError::Uid { found, owner } => {
                write!(f, "field `uid` holds {found}, expected the owner's {owner}")
            }
            EntryError::PortZero => write!(f, "field `addr` has port 0"),
            EntryError::Port { found, name_port } => write!(
                f,
                "field `addr` has port {found}, but the file is named for port {name_port}"
            ),
            EntryError::RelativeOffers(found) => write!(
                f,
                "field `offers` holds {}, not an absolute path",
                found.display()
            ),
        }
    }
}

impl std::error::Error for EntryError {}

/// Parses and checks an entry file's content: a JSON object with our version,
/// every field of [`ListenerEntry`] (unknown ones, from a compatible newer writer,
/// are ignored), the uid `owner` of the file, a port that is `name_port`, the one
/// in the file's name, and never 0, and an absolute `offers` path.
pub(crate) fn parse_entry(
    buf: &[u8],
    name_port: u16,
    owner: u32,
) -> Result<ListenerEntry, EntryError> {
    let value: serde_json::Value =
        serde_json::from_slice(buf).map_err(|e| EntryError::NotJson(e.to_string()))?;
    let mut obj = match value {
        serde_json::Value::Object(obj) => obj,
        serde_json::Value::Null => return Err(EntryError::NotAnObject("null")),
        serde_json::Value::Bool(_) => return Err(EntryError::NotAnObject("a boolean")),
        serde_json::Value::Number(_) => return Err(EntryError::NotAnObject("a number")),
        serde_json::Value::String(_) => return Err(EntryError::NotAnObject("a string")),
        serde_json::Value::Array(_) => return Err(EntryError::NotAnObject("an array")),
    };
    match obj.get("version") {
        Some(v) if v.as_u64() == Some(u64::from(ENTRY_VERSION)) => {}
        Some(v) => return Err(EntryError::Version(v.to_string())),
        None => return Err(EntryError::Missing("version")),
    }
    // Field by field (as the derived `Deserialize` would read them from the
    // object), so that an error can name its field.
    let mut field = |name: &'static str| -> Result<serde_json::Value, EntryError> {
        obj.remove(name).ok_or(EntryError::Missing(name))
    };
    fn typed<T: serde::de::DeserializeOwned>(
        name: &'static str,
        v: serde_json::Value,
    ) -> Result<T, EntryError> {
        serde_json::from_value(v).map_err(|e| EntryError::Malformed {
            field: name,
            why: e.to_string(),
        })
    }
    let entry = ListenerEntry {
        version: ENTRY_VERSION,
        netns: typed("netns", field("netns")?)?,
        addr: typed("addr", field("addr")?)?,
        pid: typed("pid", field("pid")?)?,
        uid: typed("uid", field("uid")?)?,
        offers: typed("offers", field("offers")?)?,
        created_unix_ms: typed("created_unix_ms", field("created_unix_ms")?)?,
    };
    if entry.uid != owner {
        return Err(EntryError::Uid {
            found: entry.uid,
            owner,
        });
    }
    if entry.addr.port() == 0 {
        return Err(EntryError::PortZero);
    }
    if entry.addr.port() != name_port {
        return Err(EntryError::Port {
            found: entry.addr.port(),
            name_port,
        });
    }
    if !entry.offers.is_absolute() {
        return Err(EntryError::RelativeOffers(entry.offers));
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
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;
    use serde_json::json;

    /// A valid entry for the file `l-443-….json` owned by uid 1000, as JSON.
    fn good() -> serde_json::Value {
        json!({
            "version": 2,
            "netns": {"dev": 4, "ino": 4026531833u64},
            "addr": "[::]:443",
            "pid": 7,
            "uid": 1000,
            "offers": "/dev/shm/vmc-1000/offers",
            "created_unix_ms": 1_700_000_000_000u64,
        })
    }

    /// Parses `v` as the content of `l-443-….json` owned by uid 1000, expecting
    /// a refusal naming `field` and saying `says`.
    fn refused(v: &serde_json::Value, field: Option<&str>, says: &str) -> EntryError {
        let bytes = serde_json::to_vec(v).unwrap();
        let err = parse_entry(&bytes, 443, 1000).unwrap_err();
        assert_eq!(err.field(), field, "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(says), "{msg:?} does not say {says:?}");
        err
    }

    #[test]
    fn the_good_entry_parses() {
        let bytes = serde_json::to_vec(&good()).unwrap();
        let e = parse_entry(&bytes, 443, 1000).unwrap();
        assert_eq!(serde_json::to_value(&e).unwrap(), good());
    }

    #[test]
    fn not_json_refused() {
        let err = parse_entry(b"{\"version\": 2,", 443, 1000).unwrap_err();
        assert!(matches!(err, EntryError::NotJson(_)), "{err:?}");
        assert_eq!(err.field(), None);
        assert!(err.to_string().starts_with("is not valid JSON: "), "{err}");
        for (json, what) in [("[2]", "an array"), ("2", "a number"), ("null", "null")] {
            let err = parse_entry(json.as_bytes(), 443, 1000).unwrap_err();
            assert_eq!(err, EntryError::NotAnObject(what));
            assert_eq!(err.to_string(), format!("is {what}, not a JSON object"));
        }
    }

    #[test]
    fn missing_or_unknown_version_refused() {
        let mut v = good();
        v.as_object_mut().unwrap().remove("version");
        let err = refused(&v, Some("version"), "has no field `version`");
        assert_eq!(err, EntryError::Missing("version"));
        for (found, text) in [(json!(1), "1"), (json!(99), "99"), (json!("2"), "\"2\"")] {
            let mut v = good();
            v["version"] = found;
            let err = refused(&v, Some("version"), &format!("`version` holds {text}"));
            assert_eq!(err, EntryError::Version(text.to_string()));
        }
    }

    #[test]
    fn missing_field_refused() {
        for field in ["netns", "addr", "pid", "uid", "offers", "created_unix_ms"] {
            let mut v = good();
            v.as_object_mut().unwrap().remove(field);
            let err = refused(&v, Some(field), &format!("has no field `{field}`"));
            assert_eq!(err, EntryError::Missing(field));
        }
    }

    #[test]
    fn field_of_the_wrong_type_refused() {
        for (field, bad, says) in [
            ("netns", json!("net:[4026531833]"), "invalid type: string"),
            ("netns", json!({"dev": 4}), "missing field `ino`"),
            ("addr", json!("[::]"), "invalid socket address"),
            ("addr", json!(443), "invalid type: integer"),
            ("pid", json!(-1), "invalid value: integer `-1`"),
            ("uid", json!("1000"), "invalid type: string"),
            ("offers", json!(7), "invalid type: integer"),
            (
                "created_unix_ms",
                json!(1.5),
                "invalid type: floating point",
            ),
        ] {
            let mut v = good();
            v[field] = bad;
            let err = refused(&v, Some(field), &format!("field `{field}`: "));
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn uid_not_the_owner_refused() {
        let bytes = serde_json::to_vec(&good()).unwrap();
        let err = parse_entry(&bytes, 443, 1001).unwrap_err();
        assert_eq!(
            err,
            EntryError::Uid {
                found: 1000,
                owner: 1001
            }
        );
        assert_eq!(err.field(), Some("uid"));
        assert_eq!(
            err.to_string(),
            "field `uid` holds 1000, expected the owner's 1001"
        );
    }

    #[test]
    fn port_not_the_names_refused() {
        let bytes = serde_json::to_vec(&good()).unwrap();
        let err = parse_entry(&bytes, 444, 1000).unwrap_err();
        assert_eq!(
            err,
            EntryError::Port {
                found: 443,
                name_port: 444
            }
        );
        assert_eq!(err.field(), Some("addr"));
        assert!(err.to_string().contains("port 443"), "{err}");
        assert!(err.to_string().contains("port 444"), "{err}");
    }

    #[test]
    fn port_zero_refused() {
        let mut v = good();
        v["addr"] = json!("0.0.0.0:0");
        let bytes = serde_json::to_vec(&v).unwrap();
        // Even for a file name saying port 0 (which `parse_entry_name` never gives).
        for name_port in [0, 443] {
            let err = parse_entry(&bytes, name_port, 1000).unwrap_err();
            assert_eq!(err, EntryError::PortZero);
            assert_eq!(err.field(), Some("addr"));
            assert_eq!(err.to_string(), "field `addr` has port 0");
        }
    }

    #[test]
    fn relative_offers_refused() {
        for rel in ["offers", "./offers", ""] {
            let mut v = good();
            v["offers"] = json!(rel);
            let err = refused(&v, Some("offers"), "not an absolute path");
            assert_eq!(err, EntryError::RelativeOffers(PathBuf::from(rel)));
        }
    }

    #[test]
    fn pid_zero_accepted() {
        // The registry every user shares names no process (see
        // `listener::publish`): its entries have pid 0.
        let mut v = good();
        v["pid"] = json!(0);
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(parse_entry(&bytes, 443, 1000).unwrap().pid, 0);
    }

    fn arb_entry() -> impl Strategy<Value = ListenerEntry> {
        let ip = prop_oneof![
            any::<Ipv4Addr>().prop_map(IpAddr::V4),
            any::<Ipv6Addr>().prop_map(IpAddr::V6),
        ];
        (
            (any::<u64>(), any::<u64>()),
            ip,
            1u16..=65535,
            (any::<u32>(), any::<u32>()),
            "(/[^/\\x00]{0,12}){1,4}",
            any::<u64>(),
        )
            .prop_map(
                |((dev, ino), ip, port, (pid, uid), offers, created_unix_ms)| ListenerEntry {
                    version: ENTRY_VERSION,
                    netns: NetNs { dev, ino },
                    addr: SocketAddr::new(ip, port),
                    pid,
                    uid,
                    offers: PathBuf::from(offers),
                    created_unix_ms,
                },
            )
    }

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
        fn any_entry_roundtrips(e in arb_entry()) {
            // As `Registry::register` writes it, and compactly.
            let mut pretty = serde_json::to_vec_pretty(&e).unwrap();
            pretty.push(b'\n');
            let compact = serde_json::to_vec(&e).unwrap();
            for bytes in [pretty, compact] {
                prop_assert_eq!(parse_entry(&bytes, e.addr.port(), e.uid), Ok(e.clone()));
            }
        }

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
