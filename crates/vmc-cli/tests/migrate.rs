//! `vmc migrate` on a live connection: two threads of this process stream to each
//! other through a vmc connection (every byte checked against its offset) while the
//! `vmc` binary moves the connection to TCP and back, several times. Both ends'
//! sending directions must follow, and nothing may be lost, duplicated or reordered.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vmc_conn::{Path, TcpListener, TcpStream};

fn pattern(tag: u8, i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ tag
}

/// Writes stream `tag` until `stop`, then shuts down; returns the bytes written.
fn writer(mut s: TcpStream, tag: u8, stop: Arc<AtomicBool>) -> u64 {
    let mut buf = vec![0u8; 32 * 1024];
    let mut off = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern(tag, off + i as u64);
        }
        s.write_all(&buf).unwrap();
        off += buf.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    off
}

/// Reads stream `tag` to its end, checking every byte; returns the count.
fn reader(mut s: TcpStream, tag: u8) -> u64 {
    let mut buf = vec![0u8; 50_000];
    let mut off = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return off;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(
                *b,
                pattern(tag, off + i as u64),
                "stream {tag} byte {}",
                off + i as u64
            );
        }
        off += n as u64;
    }
}

fn vmc(args: &[&str], registry: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .args(args)
        .env("VMC_REGISTRY_DIR", registry)
        .output()
        .expect("run vmc");
    assert!(
        out.status.success(),
        "vmc {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(id, send_path)` of this process's connection from `local`, per `vmc stat`.
fn stat_of(local: std::net::SocketAddr, registry: &std::path::Path) -> Option<(String, String)> {
    vmc(&["stat", "--json"], registry).lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let c = v.get("connection")?;
        (c["local"].as_str()? == local.to_string()).then(|| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["send_path"].as_str().unwrap().to_string(),
            )
        })
    })
}

#[test]
fn migrate_moves_a_live_connection_to_tcp_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let registry = tmp.path().join("vmc").join("listeners");
    // This process's connections and the vmc binary must meet in one registry.
    std::env::set_var("VMC_REGISTRY_DIR", &registry);
    std::env::set_var("VMC_PUBLIC_DIR", tmp.path().join("vmc-public"));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || listener.accept().unwrap().0);
    let client = TcpStream::connect(addr).unwrap();
    let server = server.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // (Both are asked each time: each end's handshake moves when it is looked at.)
    while [client.is_pending(), server.is_pending()].contains(&true) {
        assert!(
            Instant::now() < deadline,
            "handshake did not finish: client {:?} {}, server {:?} {}",
            client.fallback_reason(),
            client.is_pending(),
            server.fallback_reason(),
            server.is_pending()
        );
        thread::sleep(Duration::from_millis(1));
    }
    assert!(client.is_accelerated(), "{:?}", client.fallback_reason());

    let stop = Arc::new(AtomicBool::new(false));
    let threads = [
        (
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            1u8,
        ),
        (
            server.try_clone().unwrap(),
            client.try_clone().unwrap(),
            2u8,
        ),
    ]
    .map(|(w, r, tag)| {
        let stop = stop.clone();
        (
            thread::spawn(move || writer(w, tag, stop)),
            thread::spawn(move || reader(r, tag)),
        )
    });

    let local = client.local_addr().unwrap();
    let (id, _) = stat_of(local, &registry).expect("vmc stat lists the connection");
    for round in 0..3 {
        for to in ["tcp", "shm"] {
            let out = vmc(&["migrate", &id, "--to", to], &registry);
            assert!(out.contains("done"), "round {round}, to {to}: {out}");
            let want = if to == "tcp" { Path::Tcp } else { Path::Shm };
            assert_eq!(client.send_path(), want, "round {round}");
            assert_eq!(server.send_path(), want, "round {round}");
            thread::sleep(Duration::from_millis(50));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for (w, r) in threads {
        let sent = w.join().unwrap();
        assert_eq!(r.join().unwrap(), sent);
    }
    let t = client.traffic();
    assert!(
        t.shm_out > 0 && t.tcp_out > 0 && t.shm_in > 0 && t.tcp_in > 0,
        "{t:?}"
    );

    // Errors a user can make are explained.
    let out = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .args(["migrate", "999999.0", "--to", "tcp"])
        .env("VMC_REGISTRY_DIR", &registry)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no live connection"));
}
