//! Cross-process tests of the listener registry: real child processes (the
//! test binary re-executed in a "role"), killed with `SIGKILL` or run in
//! another network namespace.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmc_conn::registry::{ListenerEntry, NetNs, Registry, REGISTRY_DIR_ENV};

/// Selects what a re-executed test binary does in [`child_role`].
const ROLE_ENV: &str = "VMC_REGISTRY_TEST_ROLE";
/// Comma-separated addresses the "register" role registers.
const ADDRS_ENV: &str = "VMC_REGISTRY_TEST_ADDRS";
/// Marker of the line a child prints when it is ready.
const READY: &str = "VMC-READY ";

/// Not a test by itself: the entry point of re-executed children. Does
/// nothing unless [`ROLE_ENV`] is set.
#[test]
fn child_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    match role.as_str() {
        // Registers every address of ADDRS_ENV in the registry of
        // VMC_REGISTRY_DIR, prints the entries, then holds them until stdin
        // is closed.
        "register" => {
            let reg = Registry::open_default().unwrap();
            let offers = PathBuf::from("/nonexistent/offers");
            let addrs = std::env::var(ADDRS_ENV).unwrap();
            let regs: Vec<_> = addrs
                .split(',')
                .map(|a| {
                    let e = ListenerEntry::for_current_netns(a.parse().unwrap(), &offers).unwrap();
                    reg.register(&e).unwrap()
                })
                .collect();
            let entries: Vec<_> = regs.iter().map(|r| r.entry().clone()).collect();
            println!("\n{READY}{}", serde_json::to_string(&entries).unwrap());
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            drop(regs);
        }
        "print-default-dir" => {
            println!("\n{READY}{}", Registry::default_dir().display());
        }
        other => panic!("unknown role {other}"),
    }
}

/// A re-executed test binary.
struct Kid {
    child: Child,
    stdin: Option<ChildStdin>,
    ready: String,
}

impl Kid {
    /// Runs [`child_role`] as `role` with `envs`, under `wrapper` (e.g.
    /// `unshare --net`) if given, and waits for its ready line. `None` if the
    /// child exited without printing it.
    fn spawn(role: &str, envs: &[(&str, &str)], wrapper: &[&str]) -> Option<Kid> {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
            .env(ROLE_ENV, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find(READY) {
                    let _ = tx.send(line[i + READY.len()..].to_string());
                    // Keep draining so the child never blocks on a full pipe.
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(ready) => Some(Kid {
                child,
                stdin,
                ready,
            }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                eprintln!("child {role} exited without getting ready: {status}");
                None
            }
        }
    }

    fn entries(&self) -> Vec<ListenerEntry> {
        serde_json::from_str(&self.ready).unwrap()
    }

    /// `kill -9` and reap.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert!(!status.success());
    }

    /// Closes stdin and waits for a clean exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        // Never leave a child behind if an assertion failed.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A registry at `<tmp>/vmc/listeners`.
fn test_registry() -> (tempfile::TempDir, Registry) {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open(tmp.path().join("vmc").join("listeners")).unwrap();
    (tmp, reg)
}

fn dir_env(reg: &Registry) -> (&'static str, &str) {
    (REGISTRY_DIR_ENV, reg.path().to_str().unwrap())
}

fn file_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn sigkilled_listener_is_reaped() {
    let (_tmp, reg) = test_registry();
    let kid = Kid::spawn(
        "register",
        &[dir_env(&reg), (ADDRS_ENV, "0.0.0.0:4321")],
        &[],
    )
    .expect("child registers");
    let pid = kid.child.id();
    let entries = kid.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].pid, pid);
    assert_eq!(entries[0].netns, NetNs::current().unwrap());

    let found = reg.lookup(sa("127.0.0.1:4321"));
    assert_eq!(found, entries, "live child entry is found");
    assert_eq!(file_count(reg.path()), 1);

    kid.kill9();
    let start = Instant::now();
    assert!(reg.lookup(sa("127.0.0.1:4321")).is_empty());
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(file_count(reg.path()), 0, "dead entry file removed");
    assert!(reg.listeners().unwrap().is_empty());
}

#[test]
fn cleanly_exiting_listener_unregisters() {
    let (_tmp, reg) = test_registry();
    let kid = Kid::spawn(
        "register",
        &[dir_env(&reg), (ADDRS_ENV, "127.0.0.1:4400,[::]:4401")],
        &[],
    )
    .expect("child registers");
    assert_eq!(reg.listeners().unwrap(), {
        let mut e = kid.entries();
        e.sort_by_key(|e| e.addr.port());
        e
    });
    kid.finish();
    assert_eq!(file_count(reg.path()), 0);
    assert!(reg.lookup(sa("127.0.0.1:4400")).is_empty());
}

#[test]
fn other_network_namespace_is_not_confused() {
    // `unshare --net` needs CAP_SYS_ADMIN (or a user namespace); skip if
    // this machine does not allow it.
    let ok = Command::new("unshare")
        .args(["--net", "true"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping: `unshare --net` is not available here");
        return;
    }
    let (_tmp, reg) = test_registry();
    let port = 4500;
    let Some(kid) = Kid::spawn(
        "register",
        &[
            dir_env(&reg),
            (ADDRS_ENV, &format!("127.0.0.1:{port},0.0.0.0:{port}")),
        ],
        &["unshare", "--net"],
    ) else {
        eprintln!("skipping: child under `unshare --net` failed");
        return;
    };
    let theirs = kid.entries();
    let own = NetNs::current().unwrap();
    assert_eq!(theirs.len(), 2);
    assert_ne!(theirs[0].netns, own, "child is in another namespace");
    assert_eq!(theirs[0].netns, theirs[1].netns);
    // `unshare` execs the program: same pid.
    assert_eq!(theirs[0].pid, kid.child.id());

    // Same address and port in our own namespace.
    let mine = reg
        .register(
            &ListenerEntry::for_current_netns(sa(&format!("127.0.0.1:{port}")), "/x").unwrap(),
        )
        .unwrap();
    let mine_e = mine.entry().clone();

    // Loopback reaches only our namespace.
    assert_eq!(
        reg.lookup(sa(&format!("127.0.0.1:{port}"))),
        vec![mine_e.clone()]
    );
    assert_eq!(
        reg.lookup(sa(&format!("127.0.0.2:{port}"))),
        Vec::<ListenerEntry>::new()
    );
    // A non-loopback address may reach the other namespace's wildcard.
    let their_any = theirs
        .iter()
        .find(|e| e.addr.ip().is_unspecified())
        .unwrap()
        .clone();
    assert_eq!(
        reg.lookup(sa(&format!("192.0.2.7:{port}"))),
        vec![their_any]
    );
    assert_eq!(reg.listeners().unwrap().len(), 3);

    // Without our own entry, loopback finds nothing at all.
    drop(mine);
    assert!(reg.lookup(sa(&format!("127.0.0.1:{port}"))).is_empty());

    kid.kill9();
    assert!(reg.lookup(sa(&format!("192.0.2.7:{port}"))).is_empty());
    assert_eq!(file_count(reg.path()), 0);
}

#[test]
fn many_processes_at_once() {
    let (_tmp, reg) = test_registry();
    let addrs: Vec<String> = (0..25).map(|_| "0.0.0.0:4600".to_string()).collect();
    let addrs = addrs.join(",");
    // Spawn them all, then collect their ready lines, while we look up.
    let kids: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let addrs = &addrs;
                let reg = &reg;
                s.spawn(move || {
                    Kid::spawn("register", &[dir_env(reg), (ADDRS_ENV, addrs)], &[]).unwrap()
                })
            })
            .collect();
        while !handles.iter().all(|h| h.is_finished()) {
            for e in reg.lookup(sa("127.0.0.1:4600")) {
                assert_eq!(e.addr, sa("0.0.0.0:4600"));
            }
            reg.reap();
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(reg.lookup(sa("127.0.0.1:4600")).len(), 75);
    assert_eq!(file_count(reg.path()), 75);
    let mut kids = kids.into_iter();
    kids.next().unwrap().kill9();
    assert_eq!(reg.lookup(sa("127.0.0.1:4600")).len(), 50);
    kids.next().unwrap().finish();
    kids.next().unwrap().kill9();
    assert!(reg.lookup(sa("127.0.0.1:4600")).is_empty());
    assert_eq!(file_count(reg.path()), 0);
}

#[test]
fn default_dir_follows_the_environment() {
    let kid = Kid::spawn(
        "print-default-dir",
        &[(REGISTRY_DIR_ENV, "/somewhere/else/listeners")],
        &[],
    )
    .unwrap();
    assert_eq!(kid.ready, "/somewhere/else/listeners");

    // Without it: inside the segment directory.
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", "child_role", "--nocapture"])
        .env(ROLE_ENV, "print-default-dir")
        .env_remove(REGISTRY_DIR_ENV)
        .env("VMC_SHM_DIR", "/run/vmc-test-shm")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains(&format!("{READY}/run/vmc-test-shm/listeners")),
        "{stdout}"
    );
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--nocapture"])
        .env(ROLE_ENV, "print-default-dir")
        .env_remove(REGISTRY_DIR_ENV)
        .env_remove("VMC_SHM_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let euid = vmc_os::euid();
    if Path::new("/dev/shm").is_dir() {
        assert!(
            stdout.contains(&format!("{READY}/dev/shm/vmc-{euid}/listeners")),
            "{stdout}"
        );
    }
}
