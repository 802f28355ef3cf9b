//! Which registered listeners a connection to an address can reach, best first.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::entry::ListenerEntry;
use super::netns::NetNs;

/// The address a connection to `ip` really goes to, for matching: v4-mapped
/// IPv6 addresses as IPv4, the unspecified address as loopback (which is
/// what `connect` does with it).
fn effective_dst_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// How well a listener bound to `bound` accepts connections to `dst`
/// (already made effective): `Some(true)` exactly, `Some(false)` through an
/// unspecified address, `None` not at all. The second value is `true` when
/// an IPv6 wildcard accepts an IPv4 `dst` (slightly less preferred).
fn ip_match(bound: IpAddr, dst: IpAddr) -> Option<(bool, bool)> {
    let bound = bound.to_canonical();
    if bound == dst {
        return Some((true, false));
    }
    match (bound, dst) {
        (IpAddr::V4(b), IpAddr::V4(_)) if b.is_unspecified() => Some((false, false)),
        (IpAddr::V6(b), IpAddr::V6(_)) if b.is_unspecified() => Some((false, false)),
        (IpAddr::V6(b), IpAddr::V4(_)) if b.is_unspecified() => Some((false, true)),
        _ => None,
    }
}

/// The rank of `entry` as a candidate for `dst` (lower is better), or `None`
/// if it cannot be what `dst` reaches. `own` is the caller's namespace, if
/// known. See [`super::Registry::lookup`] for the rules.
fn rank(dst: SocketAddr, own: Option<NetNs>, entry: &ListenerEntry) -> Option<(u8, bool)> {
    if entry.addr.port() != dst.port() {
        return None;
    }
    let dst_ip = effective_dst_ip(dst.ip());
    let (exact, mapped) = ip_match(entry.addr.ip(), dst_ip)?;
    let same_ns = own == Some(entry.netns);
    let group = if dst_ip.is_loopback() {
        if !same_ns {
            return None;
        }
        if exact {
            0
        } else {
            1
        }
    } else {
        match (exact, same_ns) {
            (true, true) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (false, false) => 3,
        }
    };
    Some((group, mapped))
}

/// Keeps the entries that match `dst` and sorts them best first.
pub(crate) fn rank_candidates(
    dst: SocketAddr,
    own: Option<NetNs>,
    entries: Vec<ListenerEntry>,
) -> Vec<ListenerEntry> {
    let mut ranked: Vec<_> = entries
        .into_iter()
        .filter_map(|e| rank(dst, own, &e).map(|r| (r, e)))
        .collect();
    ranked.sort_by(|(ra, a), (rb, b)| {
        ra.cmp(rb)
            .then(b.created_unix_ms.cmp(&a.created_unix_ms))
            .then(a.pid.cmp(&b.pid))
            .then(a.offers.cmp(&b.offers))
    });
    ranked.into_iter().map(|(_, e)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Just(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Just(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
            Just(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            Just(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))),
            Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Just(IpAddr::V6("::ffff:10.0.0.1".parse().unwrap())),
            Just(IpAddr::V6("::ffff:127.0.0.1".parse().unwrap())),
            Just(IpAddr::V6("2001:db8::1".parse().unwrap())),
        ]
    }

    proptest! {
        #[test]
        fn ranking_rules_hold(
            dst_ip in arb_ip(),
            specs in proptest::collection::vec((arb_ip(), 0u64..3, 80u16..82, 0u64..4), 0..12),
        ) {
            let own = NetNs { dev: 1, ino: 0 };
            let dst = SocketAddr::new(dst_ip, 80);
            let entries: Vec<ListenerEntry> = specs
                .iter()
                .map(|(ip, ns, port, t)| {
                    let mut e = ListenerEntry::new(
                        NetNs { dev: 1, ino: *ns },
                        SocketAddr::new(*ip, *port),
                        "/x",
                    );
                    e.created_unix_ms = *t;
                    e
                })
                .collect();
            let out = rank_candidates(dst, Some(own), entries.clone());
            let eff = effective_dst_ip(dst_ip);
            for e in &out {
                prop_assert_eq!(e.addr.port(), 80);
                let b = e.addr.ip().to_canonical();
                prop_assert!(b == eff || b.is_unspecified());
                if eff.is_loopback() {
                    prop_assert_eq!(e.netns, own, "loopback never leaves our namespace");
                }
            }
            // Every matching entry is returned, each once.
            let expected = entries.iter().filter(|e| rank(dst, Some(own), e).is_some()).count();
            prop_assert_eq!(out.len(), expected);
            // Best first.
            let ranks: Vec<_> = out.iter().map(|e| rank(dst, Some(own), e).unwrap()).collect();
            prop_assert!(ranks.windows(2).all(|w| w[0] <= w[1]));
            // Unknown own namespace: loopback finds nothing.
            if eff.is_loopback() {
                prop_assert!(rank_candidates(dst, None, entries).is_empty());
            }
        }
    }
}
