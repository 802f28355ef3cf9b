//! What an administrator allows vmc to accelerate: one file, `/etc/vmc/policy`.
//!
//! ```text
//! # Which connections vmc may move onto shared memory. One rule per line: allow
//! # or deny, then any of the conditions below (all must hold). The first rule
//! # that matches a connection decides; a connection no rule matches is allowed.
//! deny between-users          # the two ends run as different users
//! deny port 5432              # the server's port (or a range: port 8000-8999)
//! deny user 1001              # either end runs as this uid (or user name)
//! deny address 10.1.2.3       # the server's address
//! allow user www-data between-users
//! ```
//!
//! Both ends apply their own policy before a connection's channel is set up (the
//! client before it offers, the accepting side before it calls); a connection
//! either end's policy denies stays on TCP with the fallback reason `policy`. A
//! file that cannot be read or parsed denies everything (and says why, once):
//! rules an administrator wrote are never silently ignored. `VMC_POLICY` names
//! another file (for tests; it can only restrict the processes that set it).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use vmc_os::ForkSafeOnce;

/// The process's policy, read once (see [`Policy::get`]).
static POLICY: ForkSafeOnce<Policy> = ForkSafeOnce::new();

/// The policy file's path.
pub const POLICY_FILE: &str = "/etc/vmc/policy";

/// Environment variable naming another policy file.
pub const POLICY_ENV: &str = "VMC_POLICY";

/// A parsed policy: its rules, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    /// Why everything is denied, if the file was unusable.
    broken: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    line: usize,
    allow: bool,
    between_users: bool,
    ports: Option<(u16, u16)>,
    user: Option<u32>,
    address: Option<IpAddr>,
}

/// A connection as a policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Subject {
    /// The server's address (the client's destination, the listener's address).
    pub server: SocketAddr,
    /// The uid of this end.
    pub me: u32,
    /// The uid of the other end, if known.
    pub peer: Option<u32>,
}

/// Why a policy denies a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied(String);

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Policy {
    /// Parses a policy file's text; the error names the line and what is wrong.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let mut rules = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let words: Vec<&str> = raw
                .split('#')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let Some((verb, mut rest)) = words.split_first() else {
                continue;
            };
            let allow = match *verb {
                "allow" => true,
                "deny" => false,
                other => {
                    return Err(format!(
                        "line {line}: `{other}`: a rule starts with allow or deny"
                    ))
                }
            };
            let mut rule = Rule {
                line,
                allow,
                between_users: false,
                ports: None,
                user: None,
                address: None,
            };
            while let Some((word, tail)) = rest.split_first() {
                rest = tail;
                let mut value = |what: &str| {
                    let (v, tail) = rest
                        .split_first()
                        .ok_or_else(|| format!("line {line}: `{word}` needs {what}"))?;
                    rest = tail;
                    Ok::<&str, String>(v)
                };
                match *word {
                    "between-users" => rule.between_users = true,
                    "port" => {
                        let v = value("a port or a range like 8000-8999")?;
                        let bad = || format!("line {line}: `port {v}`: not a port or a range");
                        let (lo, hi) = v.split_once('-').unwrap_or((v, v));
                        let (lo, hi) = (
                            lo.parse::<u16>().map_err(|_| bad())?,
                            hi.parse::<u16>().map_err(|_| bad())?,
                        );
                        if lo > hi {
                            return Err(bad());
                        }
                        rule.ports = Some((lo, hi));
                    }
                    "user" => {
                        let v = value("a uid or a user name")?;
                        rule.user = Some(match v.parse::<u32>() {
                            Ok(uid) => uid,
                            Err(_) => uid_of(v)
                                .ok_or_else(|| format!("line {line}: `user {v}`: no such user"))?,
                        });
                    }
                    "address" => {
                        let v = value("an IP address")?;
                        rule.address = Some(v.parse().map_err(|_| {
                            format!("line {line}: `address {v}`: not an IP address")
                        })?);
                    }
                    other => {
                        return Err(format!(
                            "line {line}: `{other}`: expected between-users, port, user or address"
                        ))
                    }
                }
            }
            rules.push(rule);
        }
        Ok(Policy {
            rules,
            broken: None,
        })
    }

    /// Before a `fork`: waits for a reading of the policy another thread began
    /// (see [`crate::prepare_fork`]).
    pub(crate) fn prepare_fork() {
        if POLICY.started() {
            Policy::get();
        }
    }

    /// The process's policy, read once: [`POLICY_FILE`] or `$VMC_POLICY`; none
    /// at all (allow everything) if the file does not exist.
    pub fn get() -> &'static Policy {
        POLICY.get_or_init(|| {
            let path = std::env::var_os(POLICY_ENV)
                .filter(|p| !p.is_empty())
                .map_or_else(|| std::path::PathBuf::from(POLICY_FILE), Into::into);
            match std::fs::read_to_string(&path) {
                Ok(text) => Policy::parse(&text).unwrap_or_else(|e| {
                    let why = format!("vmc policy {}: {e}; accelerating nothing", path.display());
                    tracing::warn!("{why}");
                    Policy {
                        rules: Vec::new(),
                        broken: Some(why),
                    }
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Policy::default(),
                Err(e) => {
                    let why = format!("vmc policy {}: {e}; accelerating nothing", path.display());
                    tracing::warn!("{why}");
                    Policy {
                        rules: Vec::new(),
                        broken: Some(why),
                    }
                }
            }
        })
    }

    /// Whether `s` may be accelerated; if not, which rule (or problem) says so.
    pub fn check(&self, s: &Subject) -> Result<(), Denied> {
        if let Some(why) = &self.broken {
            return Err(Denied(why.clone()));
        }
        for r in &self.rules {
            let between = s.peer.is_some_and(|p| p != s.me);
            let matches = (!r.between_users || between)
                && r.ports
                    .map_or(true, |(lo, hi)| (lo..=hi).contains(&s.server.port()))
                && r.user.map_or(true, |u| u == s.me || s.peer == Some(u))
                && r.address.map_or(true, |a| same_ip(a, s.server.ip()));
            if matches {
                return if r.allow {
                    Ok(())
                } else {
                    Err(Denied(format!("denied by the vmc policy, line {}", r.line)))
                };
            }
        }
        Ok(())
    }
}

/// IPv4 and its v4-mapped IPv6 form are the same address.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    v4(a) == v4(b)
}

/// The uid of user `name` in `/etc/passwd` (no name service: this runs inside
/// programs vmc is preloaded into).
fn uid_of(name: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(server: &str, me: u32, peer: Option<u32>) -> Subject {
        Subject {
            server: server.parse().unwrap(),
            me,
            peer,
        }
    }

    #[test]
    fn the_first_matching_rule_decides_and_no_rule_allows() {
        let p = Policy::parse(
            "# comment\n\
             allow user 1000 between-users   # a trusted pair\n\
             deny between-users\n\
             deny port 5432\n\
             deny port 8000-8999\n\
             deny address 10.1.2.3\n\
             deny user 1001\n",
        )
        .unwrap();
        let ok = |s: Subject| p.check(&s).is_ok();
        assert!(ok(subject("127.0.0.1:80", 0, Some(0))));
        assert!(!ok(subject("127.0.0.1:80", 0, Some(33))), "between users");
        assert!(ok(subject("127.0.0.1:80", 1000, Some(33))), "allowed first");
        assert!(
            ok(subject("127.0.0.1:80", 0, None)),
            "peer unknown: not between"
        );
        assert!(!ok(subject("127.0.0.1:5432", 0, Some(0))));
        assert!(!ok(subject("127.0.0.1:8500", 0, Some(0))));
        assert!(ok(subject("127.0.0.1:9000", 0, Some(0))));
        assert!(!ok(subject("10.1.2.3:80", 0, Some(0))));
        assert!(
            !ok(subject("[::ffff:10.1.2.3]:80", 0, Some(0))),
            "v4-mapped"
        );
        assert!(!ok(subject("127.0.0.1:80", 1001, Some(1001))));
        let e = p.check(&subject("127.0.0.1:5432", 0, None)).unwrap_err();
        assert_eq!(e.to_string(), "denied by the vmc policy, line 4");
        assert_eq!(
            Policy::parse("")
                .unwrap()
                .check(&subject("1.2.3.4:1", 0, Some(9))),
            Ok(())
        );
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, want) in [
            ("permit port 80", "line 1: `permit`"),
            ("deny\ndeny port", "line 2: `port` needs"),
            ("deny port 99999", "line 1: `port 99999`"),
            ("deny port 9-1", "line 1: `port 9-1`"),
            ("deny address nowhere", "line 1: `address nowhere`"),
            (
                "deny user no-such-user-here",
                "line 1: `user no-such-user-here`: no such user",
            ),
            ("deny colour blue", "line 1: `colour`"),
        ] {
            let e = Policy::parse(text).unwrap_err();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
        assert_eq!(uid_of("root"), Some(0));
        assert!(Policy::parse("allow user root").is_ok());
    }

    #[test]
    fn a_broken_policy_denies_everything() {
        let p = Policy {
            rules: Vec::new(),
            broken: Some("vmc policy /x: line 1: ...".into()),
        };
        assert!(p.check(&subject("127.0.0.1:80", 0, Some(0))).is_err());
    }
}
