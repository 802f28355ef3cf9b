//! Every reason a connection stays on TCP, each with data checked end to end and the
//! reason reported: no vmc peer on either side, vmc disabled, another network
//! namespace, another user, an unusable registry, a dead or silent listener, and a
//! listener that does not recognise the connection.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use vmc_conn::registry::{ListenerEntry, NetNs, Registry};
use vmc_conn::{Fallback, TcpListener, TcpStream, Traffic, ATTACH_WINDOW};

const SPAWN: Duration = Duration::from_secs(20);
/// Bytes each connection sends (and gets back) in these tests.
const TOTAL: u64 = 4 << 20;

/// Not a test by itself: the entry point of re-executed children. Does nothing
/// unless `VMC_IT_ROLE` is set.
#[test]
fn child_role() {
    let Some(role) = role() else {
        return;
    };
    match role.as_str() {
        // Tries to open each path of VMC_IT_PROBE ("dir:<path>" or "file:<path>",
        // comma-separated), then sends TOTAL bytes through the echo server at
        // VMC_IT_ADDR and reports the connection.
        "client" => {
            if let Ok(probes) = std::env::var("VMC_IT_PROBE") {
                for probe in probes.split(',').filter(|p| !p.is_empty()) {
                    let res = match probe.split_once(':') {
                        Some(("dir", p)) => std::fs::read_dir(p).map(|_| ()),
                        Some(("file", p)) => std::fs::File::open(p).map(|_| ()),
                        _ => panic!("bad probe {probe}"),
                    };
                    let res = match res {
                        Ok(()) => "Ok".to_string(),
                        Err(e) => format!("{:?}", e.kind()),
                    };
                    say("PROBE", format!("{probe} {res}"));
                }
            }
            let s = TcpStream::connect(env("VMC_IT_ADDR")).unwrap();
            let got = vmc_through_echo(&s, env_u64("VMC_IT_TOTAL", TOTAL));
            if let Some(f) = s.fallback_reason() {
                say("REASON_TEXT", f);
            }
            say("RESULT", client_summary(&s, got));
        }
        // Binds a vmc listener (VMC_IT_BIND, else 127.0.0.1:0) and reports why it
        // is not registered, if it is not; then echoes one connection
        // (VMC_IT_ACCEPT=1) or waits for its stdin to close.
        "server" => {
            let bind = std::env::var("VMC_IT_BIND").unwrap_or("127.0.0.1:0".into());
            let l = TcpListener::bind(bind).unwrap();
            say("LREASON", l.fallback_reason().map_or("none", |f| f.code()));
            say("PORT", l.local_addr().unwrap().port());
            if env_u64("VMC_IT_ACCEPT", 0) == 1 {
                let (s, _) = l.accept().unwrap();
                settle(&s);
                let echoed = vmc_echo(&s);
                say("RESULT", client_summary(&s, echoed));
            } else {
                wait_for_stdin_eof();
            }
        }
        // Binds vmc listeners on 127.0.0.1 at each port of VMC_IT_PORTS (run in
        // another network namespace) and holds them until its stdin closes.
        "netns-server" => {
            let ls: Vec<TcpListener> = env("VMC_IT_PORTS")
                .split(',')
                .map(|p| TcpListener::bind(format!("127.0.0.1:{p}")).unwrap())
                .collect();
            for l in &ls {
                assert_eq!(l.fallback_reason(), None);
            }
            say("NETNS", NetNs::current().unwrap().ino);
            wait_for_stdin_eof();
        }
        other => panic!("unknown role {other}"),
    }
}

fn client_summary(s: &TcpStream, got: u64) -> String {
    let t = s.traffic();
    format!(
        "got={got} accel={} reason={} shm_out={} shm_in={} tcp_out={} tcp_in={}",
        s.is_accelerated() as u8,
        s.fallback_reason().map_or("none", |f| f.code()),
        t.shm_out,
        t.shm_in,
        t.tcp_out,
        t.tcp_in
    )
}

/// Everything went over TCP.
fn assert_all_tcp(t: Traffic, total: u64) {
    assert_eq!((t.shm_in, t.shm_out), (0, 0), "{t:?}");
    assert_eq!((t.tcp_in, t.tcp_out), (total, total), "{t:?}");
}

/// The reason of `s` once its handshake is over (at most 5 s).
fn settled_reason(s: &TcpStream) -> Option<Fallback> {
    settle(s);
    s.fallback_reason()
}

/// A vmc listener on 127.0.0.1 that echoes the one connection it accepts, on a
/// thread; returns its address and the thread (with the accepted connection).
fn vmc_echo_server() -> (SocketAddr, thread::JoinHandle<(TcpStream, u64)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(l.fallback_reason(), None);
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        // Decided before the echo starts, so its reason is final when it ends.
        settle(&s);
        drop(l);
        let n = vmc_echo(&s);
        (s, n)
    });
    (addr, h)
}

#[test]
fn vmc_client_of_a_plain_listener_reports_no_listener() {
    private_registry();
    let plain = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap();
    let echo = std_echo_one(plain);
    let s = TcpStream::connect(addr).unwrap();
    // Decided at connect time: nothing to wait for.
    assert_eq!(s.fallback_reason(), Some(Fallback::NoListener));
    assert!(!s.is_pending() && !s.is_accelerated());
    assert_eq!(vmc_through_echo(&s, TOTAL), TOTAL);
    assert_eq!(echo.join().unwrap(), TOTAL);
    assert_all_tcp(s.traffic(), TOTAL);
    assert_eq!(s.fallback_reason(), Some(Fallback::NoListener));
}

/// A plain client is known for one at its first bytes (a vmc client binds its
/// offer socket before it sends anything); one that sends nothing, once the window
/// is over. Data flows meanwhile.
#[test]
fn plain_client_of_a_vmc_listener_is_peer_not_vmc_at_its_first_bytes() {
    private_registry();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut c = StdStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    assert!(s.is_pending(), "{:?}", s.fallback_reason());
    assert_eq!(s.fallback_reason(), None);
    let s2 = s.clone();
    let server = thread::spawn(move || vmc_echo(&s2));
    c.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
    assert_eq!(s.fallback_reason(), Some(Fallback::PeerNotVmc));
    assert_eq!(std_through_echo(c, TOTAL), TOTAL);
    assert_eq!(server.join().unwrap(), TOTAL + 5);
    assert_eq!(s.fallback_reason(), Some(Fallback::PeerNotVmc));
    assert_all_tcp(s.traffic(), TOTAL + 5);

    // A silent one.
    let mut c = StdStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    let accepted = Instant::now();
    assert_eq!(settled_reason(&s), Some(Fallback::PeerNotVmc));
    assert!(
        accepted.elapsed() >= ATTACH_WINDOW,
        "decided before the window ended"
    );
    c.write_all(b"late").unwrap();
    let mut got = [0u8; 4];
    (&s).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"late");
}

/// A plain client's connection that is over (both directions shut down) before
/// the listener side looked at it again after its window. (Regression test: before
/// 6a72894 `Conn::advance` asked the closed socket for its addresses again and
/// reported `Handshake("TCP connection has no addresses")`.)
#[test]
fn a_short_plain_connection_is_peer_not_vmc_too() {
    private_registry();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = StdStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut s, _) = l.accept().unwrap();
    c.write_all(b"hi").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hi");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0);
    drop(c);
    // The point: the listener side looks again only after its window.
    thread::sleep(ATTACH_WINDOW + Duration::from_millis(50));
    assert_eq!(s.fallback_reason(), Some(Fallback::PeerNotVmc));
}

#[test]
fn an_administrators_policy_keeps_what_it_denies_on_tcp() {
    private_registry();
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy");
    // A client under `policy` (made for the listener's address) of a vmc echo
    // server: its summary and fallback text, after checking the data both ways.
    let client = |policy_text: &dyn Fn(SocketAddr) -> String| {
        let (addr, server) = vmc_echo_server();
        std::fs::write(&policy, policy_text(addr)).unwrap();
        let mut kid = Kid::spawn(
            "client",
            &[
                ("VMC_IT_ADDR", addr.to_string()),
                (vmc_conn::policy::POLICY_ENV, policy.display().to_string()),
            ],
        );
        let res = Summary::parse(&kid.expect("RESULT", Duration::from_secs(30)));
        let text = kid.try_expect("REASON_TEXT", Duration::from_secs(1));
        kid.wait_success(Duration::from_secs(10));
        assert_eq!(res.u64("got"), TOTAL);
        assert_eq!((res.u64("shm_out"), res.u64("shm_in")), (0, 0));
        let (s, n) = server.join().unwrap();
        assert_eq!(n, TOTAL);
        assert_all_tcp(s.traffic(), TOTAL);
        (res, text)
    };
    let (res, text) = client(&|addr| {
        format!(
            "# no acceleration to this port\ndeny port {}\n",
            addr.port()
        )
    });
    assert_eq!(res.str("reason"), "policy", "{text:?}");
    assert_eq!(text.as_deref(), Some("denied by the vmc policy, line 2"));

    // A policy that does not parse denies everything, saying why.
    let (res, text) = client(&|_| "deny port eighty\n".to_string());
    assert_eq!(res.str("reason"), "policy", "{text:?}");
    assert!(
        text.as_deref()
            .is_some_and(|t| t.contains("line 1: `port eighty`")),
        "{text:?}"
    );
}

#[test]
fn vmc_disable_keeps_either_end_out_of_the_way() {
    private_registry();
    // A disabled client of our listener.
    let (addr, server) = vmc_echo_server();
    let mut kid = Kid::spawn(
        "client",
        &[
            ("VMC_IT_ADDR", addr.to_string()),
            ("VMC_DISABLE", "1".into()),
        ],
    );
    let res = Summary::parse(&kid.expect("RESULT", Duration::from_secs(30)));
    kid.wait_success(Duration::from_secs(10));
    assert_eq!(res.str("reason"), "disabled");
    assert_eq!(res.u64("got"), TOTAL);
    assert_eq!((res.u64("shm_out"), res.u64("shm_in")), (0, 0));
    let (s, n) = server.join().unwrap();
    assert_eq!(n, TOTAL);
    assert_eq!(s.fallback_reason(), Some(Fallback::PeerNotVmc));
    assert_all_tcp(s.traffic(), TOTAL);

    // A disabled listener: not registered, so our client finds none.
    let mut kid = Kid::spawn(
        "server",
        &[("VMC_IT_ACCEPT", "1".into()), ("VMC_DISABLE", "1".into())],
    );
    assert_eq!(kid.expect("LREASON", SPAWN), "disabled");
    let port = kid.expect("PORT", SPAWN);
    let s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    assert_eq!(s.fallback_reason(), Some(Fallback::NoListener));
    assert_eq!(vmc_through_echo(&s, TOTAL), TOTAL);
    let res = Summary::parse(&kid.expect("RESULT", Duration::from_secs(30)));
    kid.wait_success(Duration::from_secs(10));
    assert_eq!(res.str("reason"), "disabled");
    assert_all_tcp(s.traffic(), TOTAL);
}

#[test]
fn a_listener_in_another_network_namespace_is_never_used() {
    private_registry();
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
    // Port P: a plain listener here; port Q: a vmc listener here. The child binds
    // vmc listeners on both ports in its own namespace.
    let plain = StdListener::bind("127.0.0.1:0").unwrap();
    let p = plain.local_addr().unwrap();
    let (q, ours) = vmc_echo_server();
    let mut kid = KidSpec::new("netns-server")
        .env("VMC_IT_PORTS", format!("{},{}", p.port(), q.port()))
        .wrapper(["unshare", "--net", "--"])
        .spawn()
        .unwrap();
    let Some(ino) = kid.try_expect("NETNS", SPAWN) else {
        eprintln!("skipping: the child under `unshare --net` did not start");
        return;
    };
    let own = NetNs::current().unwrap();
    assert_ne!(
        ino,
        own.ino.to_string(),
        "the child is in another namespace"
    );
    let reg = Registry::open(private_registry()).unwrap();
    let theirs: Vec<ListenerEntry> = reg
        .listeners()
        .unwrap()
        .into_iter()
        .filter(|e| e.pid == kid.pid())
        .collect();
    assert_eq!(theirs.len(), 2, "{theirs:?}");
    assert!(theirs.iter().all(|e| e.netns != own));

    // P reaches our plain listener, whatever the registry says about the child's.
    let echo = std_echo_one(plain);
    let s = TcpStream::connect(p).unwrap();
    assert_eq!(s.fallback_reason(), Some(Fallback::NoListener));
    assert_eq!(vmc_through_echo(&s, TOTAL), TOTAL);
    assert_eq!(echo.join().unwrap(), TOTAL);
    assert_all_tcp(s.traffic(), TOTAL);

    // Q reaches our vmc listener, and is accelerated by it.
    let s = TcpStream::connect(q).unwrap();
    assert_eq!(vmc_through_echo(&s, TOTAL), TOTAL);
    assert!(s.is_accelerated(), "{:?}", s.fallback_reason());
    let (accepted, n) = ours.join().unwrap();
    assert_eq!(n, TOTAL);
    assert!(accepted.is_accelerated());
    // How much went over shared memory depends on timing: a client may put all of
    // TOTAL into TCP's buffers before the handshake completes. Acceleration of both
    // ends is what this test is about, and is asserted above.

    kid.close_stdin();
    kid.wait_success(Duration::from_secs(10));
}

/// A wrapper that runs a program as uid/gid 65534 (nobody), if this machine has
/// one that works.
fn as_nobody() -> Option<Vec<&'static str>> {
    let candidates: [&[&'static str]; 2] = [
        &[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ],
        &["runuser", "-u", "nobody", "--"],
    ];
    for w in candidates {
        let ok = Command::new(w[0])
            .args(&w[1..])
            .arg("true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok && vmc_os::euid() != 65534 {
            return Some(w.to_vec());
        }
    }
    None
}

/// A client of another user (nobody) cannot read our registry or offers, but
/// finds our listener in the registry every user shares and is accelerated, each
/// end having proved it holds its end of the connection (see vmc_conn's handshake).
/// Pointed at our private registry instead, it stays on TCP.
#[test]
fn a_client_of_another_user_is_accelerated_and_cannot_read_our_registry() {
    let reg_dir = private_registry();
    let Some(wrapper) = as_nobody() else {
        eprintln!("skipping: cannot run a process as another user (setpriv/runuser)");
        return;
    };
    let (_bin_dir, exe) = public_copy_of_test_binary().unwrap();
    // A registry of its own, which it creates (its parent must be its own, 0700).
    let theirs_root = std::env::temp_dir().join(format!("vmc-other-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&theirs_root);
    let theirs = theirs_root.join("listeners");

    for (case, their_registry) in [("own registry", &theirs), ("our registry", &reg_dir)] {
        let (addr, server) = vmc_echo_server();
        let entry = Registry::open(&reg_dir)
            .unwrap()
            .lookup(addr)
            .into_iter()
            .next()
            .expect("our listener is registered");
        let entry_file = std::fs::read_dir(&reg_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.starts_with(&format!("l-{}-", addr.port()))
            })
            .unwrap();
        let probes = [
            format!("dir:{}", reg_dir.display()),
            format!("dir:{}", reg_dir.parent().unwrap().display()),
            format!("file:{}", entry_file.display()),
            format!("dir:{}", entry.offers.display()),
            // Anyone binds offers in the shared directory; nobody lists it.
            format!(
                "dir:{}",
                vmc_conn::registry::public_dir().join("offers").display()
            ),
        ];
        let mut kid = KidSpec::new("client")
            .exe(&exe)
            .wrapper(wrapper.iter().copied())
            .env(
                vmc_conn::registry::REGISTRY_DIR_ENV,
                their_registry.display(),
            )
            .env("VMC_IT_ADDR", addr)
            .env("VMC_IT_PROBE", probes.join(","))
            .spawn()
            .unwrap();
        for probe in &probes {
            let got = kid.expect("PROBE", SPAWN);
            assert_eq!(
                got,
                format!("{probe} PermissionDenied"),
                "{case}: the other user opens our files"
            );
        }
        let res = Summary::parse(&kid.expect("RESULT", Duration::from_secs(30)));
        let text = kid.try_expect("REASON_TEXT", Duration::from_secs(1));
        kid.wait_success(Duration::from_secs(10));
        eprintln!("another user's client ({case}): {:?}, {text:?}", res.0);
        assert_eq!(res.u64("got"), TOTAL, "{case}");
        let (s, n) = server.join().unwrap();
        assert_eq!(n, TOTAL);
        if their_registry == &theirs {
            assert_eq!(res.str("reason"), "none", "{case}: {text:?}");
            assert_eq!(res.str("accel"), "1", "{case}");
            assert!(res.u64("shm_out") > 0 && res.u64("shm_in") > 0, "{case}");
            assert!(s.is_accelerated(), "{case}: {:?}", s.fallback_reason());
        } else {
            assert_eq!(res.str("reason"), "registry", "{case}: {text:?}");
            assert_eq!(res.str("accel"), "0", "{case}");
            assert_eq!((res.u64("shm_out"), res.u64("shm_in")), (0, 0), "{case}");
            assert_eq!(s.fallback_reason(), Some(Fallback::PeerNotVmc), "{case}");
            assert_all_tcp(s.traffic(), TOTAL);
        }
    }
    let _ = std::fs::remove_dir_all(&theirs_root);
}

#[test]
fn an_unusable_registry_leaves_both_ends_on_tcp() {
    private_registry();
    // The registry's parent must be 0700: this one is 0755.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bad = tmp.path().join("listeners");

    // A client with it, of our (registered, working) listener.
    let (addr, server) = vmc_echo_server();
    let mut kid = KidSpec::new("client")
        .env(vmc_conn::registry::REGISTRY_DIR_ENV, bad.display())
        .env("VMC_IT_ADDR", addr)
        .spawn()
        .unwrap();
    let res = Summary::parse(&kid.expect("RESULT", Duration::from_secs(30)));
    let text = kid.expect("REASON_TEXT", Duration::from_secs(1));
    kid.wait_success(Duration::from_secs(10));
    assert_eq!(res.str("reason"), "registry", "{text}");
    assert!(
        text.contains("0755"),
        "the reason says what is wrong: {text}"
    );
    assert_eq!(res.u64("got"), TOTAL);
    let (s, _) = server.join().unwrap();
    assert_eq!(s.fallback_reason(), Some(Fallback::PeerNotVmc));
    assert_all_tcp(s.traffic(), TOTAL);

    // A listener with it: it works, unregistered, and says why.
    let mut kid = KidSpec::new("server")
        .env(vmc_conn::registry::REGISTRY_DIR_ENV, bad.display())
        .env("VMC_IT_ACCEPT", 1)
        .spawn()
        .unwrap();
    assert_eq!(kid.expect("LREASON", SPAWN), "registry");
    let port = kid.expect("PORT", SPAWN);
    let s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    assert_eq!(s.fallback_reason(), Some(Fallback::NoListener));
    assert_eq!(vmc_through_echo(&s, TOTAL), TOTAL);
    let res = Summary::parse(&kid.expect("RESULT", Duration::from_secs(30)));
    kid.wait_success(Duration::from_secs(10));
    assert_eq!(res.str("reason"), "registry");
    assert_all_tcp(s.traffic(), TOTAL);
    assert!(!bad.exists(), "nothing was created under a bad parent");
}

/// Not a fallback: a registry deeper than a Unix socket address can name (108
/// bytes) still accelerates; offer sockets are reached through their
/// directory. (CI's checkout is deep enough for this to matter.)
#[test]
fn a_registry_at_a_long_path_still_accelerates() {
    private_registry();
    let tmp = tempfile::tempdir().unwrap();
    let deep = tmp.path().join("d".repeat(70)).join("e".repeat(40));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o700)).unwrap();
    let reg = deep.join("listeners");
    assert!(reg.as_os_str().len() > 120, "{}", reg.display());

    let mut server = KidSpec::new("server")
        .env(vmc_conn::registry::REGISTRY_DIR_ENV, reg.display())
        .env("VMC_IT_ACCEPT", 1)
        .spawn()
        .unwrap();
    assert_eq!(server.expect("LREASON", SPAWN), "none");
    let port = server.expect("PORT", SPAWN);
    let mut client = KidSpec::new("client")
        .env(vmc_conn::registry::REGISTRY_DIR_ENV, reg.display())
        .env("VMC_IT_ADDR", format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    let res = Summary::parse(&client.expect("RESULT", Duration::from_secs(30)));
    client.wait_success(Duration::from_secs(10));
    server.expect("RESULT", Duration::from_secs(30));
    server.wait_success(Duration::from_secs(10));
    assert_eq!(res.str("reason"), "none");
    assert_eq!(res.u64("got"), TOTAL);
    assert!(res.u64("shm_out") > 0 && res.u64("shm_in") > 0);
}

#[test]
fn a_sigkilled_listener_refuses_connections_and_its_entry_is_reaped() {
    let dir = private_registry();
    let mut kid = Kid::spawn("server", &[]);
    assert_eq!(kid.expect("LREASON", SPAWN), "none");
    let port: u16 = kid.expect("PORT", SPAWN).parse().unwrap();
    let reg = Registry::open(&dir).unwrap();
    let entry = reg
        .listeners()
        .unwrap()
        .into_iter()
        .find(|e| e.pid == kid.pid())
        .expect("the child's listener is registered");
    assert_eq!(entry.addr.port(), port);

    kid.kill9();
    kid.wait(Duration::from_secs(5));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    let err = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(t.elapsed() < Duration::from_secs(1));

    // The port is free again: a plain listener here gets it. A vmc client then
    // finds the dead entry, reaps it, and stays on TCP.
    match StdListener::bind(addr) {
        Ok(plain) => {
            let echo = std_echo_one(plain);
            let s = TcpStream::connect(addr).unwrap();
            assert_eq!(s.fallback_reason(), Some(Fallback::NoListener));
            assert_eq!(vmc_through_echo(&s, TOTAL), TOTAL);
            assert_eq!(echo.join().unwrap(), TOTAL);
            assert_all_tcp(s.traffic(), TOTAL);
        }
        Err(e) => eprintln!("not rebinding port {port}: {e}"),
    }
    assert!(
        !reg.listeners().unwrap().iter().any(|e| e.pid == entry.pid),
        "the dead entry is gone"
    );
}

/// Registers, by hand, an entry for `addr` whose processes would look for offers
/// in `offers`.
fn fake_entry(addr: SocketAddr, offers: PathBuf) -> vmc_conn::registry::Registration {
    let reg = Registry::open(private_registry()).unwrap();
    let e = ListenerEntry::for_current_netns(addr, offers).unwrap();
    reg.register(&e).unwrap()
}

/// The offer socket files in `dir`: published (`o-`) or still under the name
/// bound before `connect` (`p-`, which must never outlive the connect).
fn offer_sockets(dir: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("o-") || name.starts_with("p-")
        })
        .collect()
}

/// An entry for a plain listener (its process runs no vmc): the client's offer
/// socket is never called, and the client gives up (removing the socket) once the
/// server's bytes came and no call for [`ATTACH_WINDOW`] (a vmc server calls
/// within that window). The data flows on TCP meanwhile. An entry whose offers directory does not exist
/// leaves the client on TCP at once.
#[test]
fn a_registered_listener_that_never_calls_is_listener_gone() {
    private_registry();
    let tmp = tempfile::tempdir().unwrap();
    let offers = tmp.path().join("offers");
    std::fs::create_dir(&offers).unwrap();
    let plain = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap();
    let _reg = fake_entry(addr, offers.clone());
    let echo = std_echo_one(plain);
    let s = TcpStream::connect(addr).unwrap();
    assert!(s.is_pending(), "{:?}", s.fallback_reason());
    assert_eq!(offer_sockets(&offers).len(), 1, "the offer socket is bound");
    assert_eq!(vmc_through_echo(&s, TOTAL), TOTAL);
    assert_eq!(echo.join().unwrap(), TOTAL);
    wait_until("the client to give up", Duration::from_secs(5), || {
        !s.is_pending()
    });
    assert_eq!(s.fallback_reason(), Some(Fallback::ListenerGone));
    assert!(
        offer_sockets(&offers).is_empty(),
        "the offer socket is removed"
    );
    assert_all_tcp(s.traffic(), TOTAL);

    let plain = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap();
    let _reg = fake_entry(addr, tmp.path().join("missing"));
    let echo = std_echo_one(plain);
    let s = TcpStream::connect(addr).unwrap();
    assert!(
        matches!(s.fallback_reason(), Some(Fallback::Handshake(ref e)) if e.contains("offer socket")),
        "{:?}",
        s.fallback_reason()
    );
    assert_eq!(vmc_through_echo(&s, TOTAL), TOTAL);
    assert_eq!(echo.join().unwrap(), TOTAL);
    assert_all_tcp(s.traffic(), TOTAL);
}

/// A call on the client's offer socket whose ATTACH names another connection (a
/// name collision, or a process that is not the other end): the client stays on
/// TCP with `NotMatched`, and the data on the way is intact.
#[test]
fn a_call_that_is_not_the_other_end_is_not_matched() {
    let dir = private_registry();
    let offers = Registry::open(&dir)
        .unwrap()
        .offers()
        .unwrap()
        .path()
        .to_path_buf();
    let plain = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap();
    let _reg = fake_entry(addr, offers.clone());
    let echo = std_echo_one(plain);
    let s = TcpStream::connect(addr).unwrap();
    assert!(s.is_pending(), "{:?}", s.fallback_reason());
    let local = s.local_addr().unwrap();
    let ns = NetNs::current().unwrap();
    let path = offers.join(vmc_conn::wire::offer_name(ns.ino, local, addr));
    assert!(path.exists(), "{} is bound", path.display());
    // The impostor's ATTACH: the right server address, another client port.
    let mut call = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let other: SocketAddr = format!("127.0.0.1:{}", local.port() ^ 1).parse().unwrap();
    call.write_all(&vmc_conn::wire::attach(addr, other))
        .unwrap();
    assert_eq!(vmc_through_echo(&s, TOTAL), TOTAL);
    assert_eq!(echo.join().unwrap(), TOTAL);
    wait_until(
        "the client to refuse the call",
        Duration::from_secs(5),
        || !s.is_pending(),
    );
    assert_eq!(s.fallback_reason(), Some(Fallback::NotMatched));
    assert!(!path.exists(), "one call per offer socket");
    let mut rest = Vec::new();
    let _ = call.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the impostor got nothing: {rest:?}");
    assert_all_tcp(s.traffic(), TOTAL);
}

/// A connect that fails (nobody listens on the registered port any more) is the
/// program's error, as without vmc, and leaves no offer socket behind: the one
/// bound before the connect is removed with it.
#[test]
fn a_failed_connect_to_a_registered_port_leaves_no_offer_socket() {
    private_registry();
    let tmp = tempfile::tempdir().unwrap();
    let offers = tmp.path().join("offers");
    std::fs::create_dir(&offers).unwrap();
    // The registered listener is gone; its port stays refused (no other test
    // can take it while we connect).
    let gone = vmc_testkit::RefusingPort::new();
    let addr = gone.addr();
    let _reg = fake_entry(addr, offers.clone());
    let e = TcpStream::connect(addr).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(
        offer_sockets(&offers).is_empty(),
        "{:?}",
        offer_sockets(&offers)
    );
}
