//! `kill -9` of the peer process at random moments of a bidirectional transfer: the
//! surviving end's blocked read returns promptly with end of stream or a reset, and
//! everything it got before is correct.

mod common;

use std::io;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use vmc_conn::{Path, TcpListener, TcpStream};

const SPAWN: Duration = Duration::from_secs(20);
/// How long after the kill the survivor's read must have returned.
const READ_BOUND: Duration = Duration::from_secs(1);
const ROUNDS: u64 = 10;

/// Not a test by itself: the entry point of re-executed children. Does nothing
/// unless `VMC_IT_ROLE` is set.
#[test]
fn child_role() {
    let Some(role) = role() else {
        return;
    };
    private_registry();
    // Streams both ways until killed (or until the parent's end fails).
    let s = match role.as_str() {
        "stream-server" => {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            say("PORT", l.local_addr().unwrap().port());
            let (s, _) = l.accept().unwrap();
            std::mem::forget(l);
            s
        }
        "stream-client" => TcpStream::connect(env("VMC_IT_ADDR")).unwrap(),
        other => panic!("unknown role {other}"),
    };
    let cfg = SendCfg::from_env(2);
    let (sent, got) = duplex(&s, &cfg, 1, 64 * 1024, true);
    eprintln!("stream child ended by itself: {sent:?} {got:?}");
}

/// What a round saw.
struct Round {
    delay: Duration,
    read_after_kill: Duration,
    read: String,
    write: String,
    path_at_kill: (Path, Path),
    accel: bool,
    got: u64,
}

fn kind(e: &Option<io::Error>) -> String {
    match e {
        None => "EOF".into(),
        Some(e) => format!("{:?}", e.kind()),
    }
}

/// One round: a child streams with us both ways (switching paths if `switch`), we
/// kill it after `delay` and time our reader.
fn one_round(child_is_server: bool, delay: Duration, switch: bool, seed: u64) -> Round {
    let mut cfg = SendCfg::new(1, u64::MAX);
    cfg.chunk = 64 * 1024;
    cfg.random = true;
    cfg.seed = seed;
    cfg.switch_one_in = if switch { 4 } else { 0 };
    let mut theirs = cfg.clone();
    theirs.tag = 2;
    let mut envs = theirs.to_env();
    let mut kid;
    let s;
    let mut _listener = None;
    if child_is_server {
        kid = Kid::spawn("stream-server", &envs);
        let port = kid.expect("PORT", SPAWN);
        s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    } else {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        envs.push(("VMC_IT_ADDR", l.local_addr().unwrap().to_string()));
        kid = Kid::spawn("stream-client", &envs);
        // The listener lives until the end of the round.
        let (accepted, l) = bounded("accept", SPAWN, move || (l.accept().unwrap().0, l));
        s = accepted;
        _listener = Some(l);
    }
    let (rtx, rrx) = mpsc::channel();
    let r = s.clone();
    let reader = thread::spawn(move || {
        let got = read_stream(&r, 2, 64 * 1024, true, seed);
        let _ = rtx.send((Instant::now(), got));
    });
    let (wtx, wrx) = mpsc::channel();
    let w = s.clone();
    let writer = thread::spawn(move || {
        let sent = write_stream(&w, &cfg);
        let _ = wtx.send((Instant::now(), sent));
    });
    thread::sleep(delay);
    // Taken through the locks the reader and writer hold while they block: bounded.
    let probe = s.clone();
    let path_at_kill = bounded("sampling the paths", READ_BOUND, move || {
        (probe.send_path(), probe.recv_path())
    });
    let killed = kid.kill9();
    let (read_done, got) = match rrx.recv_timeout(READ_BOUND) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The reader panicked: wrong data.
            std::panic::resume_unwind(reader.join().unwrap_err())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // Too slow, or never? Say which.
            let later = rrx.recv_timeout(Duration::from_secs(10));
            panic!(
                "read still blocked {READ_BOUND:?} after the peer was killed \
                 (delay {delay:?}, switching {switch}, paths at kill {path_at_kill:?}, \
                 accelerated {}, traffic {:?}); 10 s later: {}",
                s.is_accelerated(),
                s.traffic(),
                match later {
                    Ok((t, got)) => format!(
                        "returned {:?} after the kill with {:?}",
                        t.saturating_duration_since(killed),
                        got.error
                    ),
                    Err(_) => "still blocked".to_string(),
                }
            )
        }
    };
    reader.join().unwrap();
    let (_, sent) = match wrx.recv_timeout(READ_BOUND) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(writer.join().unwrap_err())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "write still blocked {READ_BOUND:?} after the read returned \
             (delay {delay:?}, switching {switch}, paths at kill {path_at_kill:?}, traffic {:?})",
            s.traffic()
        ),
    };
    writer.join().unwrap();
    let status = kid.wait(Duration::from_secs(5));
    assert!(!status.success());
    let round = Round {
        delay,
        read_after_kill: read_done.saturating_duration_since(killed),
        read: kind(&got.error),
        write: kind(&sent.error),
        path_at_kill,
        accel: s.is_accelerated(),
        got: got.bytes,
    };
    let ctx = format!(
        "delay {delay:?}, switching {switch}, paths at kill {path_at_kill:?}, accelerated {}, \
         read ended {:?} ({:?}), write ended {:?} ({:?}), traffic {:?}",
        round.accel,
        got.error,
        round.read_after_kill,
        sent.error,
        sent.bytes,
        s.traffic()
    );
    let read_ok = match &got.error {
        None => true,
        Some(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        ),
    };
    assert!(read_ok, "the read ended with an unexpected error: {ctx}");
    assert!(
        read_done >= killed || got.error.is_none(),
        "the read failed before the kill: {ctx}"
    );
    let write_ok = match &sent.error {
        None => false, // an endless stream cannot end by itself
        Some(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
    };
    assert!(write_ok, "the write ended with an unexpected error: {ctx}");
    round
}

fn kill_rounds(child_is_server: bool) {
    private_registry();
    let seed = time_seed();
    eprintln!(
        "kill -9 of the {}: seed {seed}",
        if child_is_server { "server" } else { "client" }
    );
    let mut rng = Rng::new(seed);
    let mut lines = Vec::new();
    for i in 0..ROUNDS {
        // Spread the delays over 0-300 ms, randomly within each slot.
        let delay = Duration::from_millis(i * 30 + rng.below(30));
        let switch = i % 2 == 1;
        let r = one_round(child_is_server, delay, switch, seed ^ i);
        lines.push(format!(
            "  delay {:>3?} switch {switch:<5} accel {:<5} paths {:?} got {:>10} read {} \
             after {:.1?}, write {}",
            r.delay, r.accel, r.path_at_kill, r.got, r.read, r.read_after_kill, r.write
        ));
    }
    eprintln!("{}", lines.join("\n"));
}

#[test]
fn killing_the_server_process_ends_the_clients_reads_promptly() {
    kill_rounds(true);
}

#[test]
fn killing_the_client_process_ends_the_servers_reads_promptly() {
    kill_rounds(false);
}
