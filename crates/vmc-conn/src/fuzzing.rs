//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the private
//! functions that read what other processes wrote. Not a public API: each one only
//! forwards to the code the registry itself runs.

use std::net::SocketAddr;

pub use crate::registry::entry::EntryError;
use crate::registry::{ListenerEntry, NetNs};

/// The port of a well-formed registry entry file name, as a lookup reads it.
pub fn parse_entry_name(name: &str) -> Option<u16> {
    crate::registry::parse_entry_name(name)
}

/// Parses and checks an entry file's content, as a lookup does for the file named
/// for port `name_port` and owned by uid `owner`.
pub fn parse_entry(buf: &[u8], name_port: u16, owner: u32) -> Result<ListenerEntry, EntryError> {
    crate::registry::parse_entry(buf, name_port, owner)
}

/// The entries a lookup of `dst` keeps from those it read, best first.
pub fn rank_candidates(
    dst: SocketAddr,
    own: Option<NetNs>,
    entries: Vec<ListenerEntry>,
) -> Vec<ListenerEntry> {
    crate::registry::rank_candidates(dst, own, entries)
}
