//! Shared helpers of the multi-process integration tests: a private registry, child
//! processes (the test binary re-executed in a "role"), a position-derived byte
//! pattern, and checked streaming in both directions.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use vmc_conn::registry::{Registry, REGISTRY_DIR_ENV};
use vmc_conn::{Path, TcpStream};
// Not every test binary that includes this module uses each of these.
#[allow(unused_imports)]
pub use vmc_testkit::{fd_count, spawn_with_tid, wait_asleep};

/// Selects what a re-executed test binary does in its `child_role` test.
pub const ROLE_ENV: &str = "VMC_IT_ROLE";
/// Marks the lines a child prints for its parent: `VMC-KID <key> <value>`.
pub const MARK: &str = "VMC-KID ";

/// The role of this process, if it is a re-executed child.
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok().filter(|r| !r.is_empty())
}

/// An environment variable a child needs.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child without {name}"))
}

/// An optional numeric environment variable.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}")))
        .unwrap_or(default)
}

/// The registry directory of this test process: `<tmp>/vmc-test-<pid>/listeners`,
/// set in `VMC_REGISTRY_DIR` before the library first opens it. A child keeps the
/// one it inherited from its parent, so that both meet.
pub fn private_registry() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if role().is_some() {
            return Registry::default_dir();
        }
        let dir = std::env::temp_dir()
            .join(format!("vmc-test-{}", std::process::id()))
            .join("listeners");
        std::env::set_var(REGISTRY_DIR_ENV, &dir);
        // The registry every user shares, of this test process only (beside the
        // private one, in the world-searchable temporary directory).
        std::env::set_var(
            vmc_conn::registry::PUBLIC_DIR_ENV,
            public_dir_of_this_test(),
        );
        // Removed when the test binary exits (after every child was reaped).
        // SAFETY: `remove_private_registry` is a plain `extern "C" fn()` that
        // neither unwinds nor depends on state torn down before `atexit` runs.
        unsafe { libc::atexit(remove_private_registry) };
        dir
    })
    .clone()
}

fn public_dir_of_this_test() -> PathBuf {
    std::env::temp_dir().join(format!("vmc-test-{}-public", std::process::id()))
}

extern "C" fn remove_private_registry() {
    let root = std::env::temp_dir().join(format!("vmc-test-{}", std::process::id()));
    let _ = std::panic::catch_unwind(|| {
        let _ = std::fs::remove_dir_all(root);
        let _ = std::fs::remove_dir_all(public_dir_of_this_test());
    });
}

/// Serialises the tests that load both cores for seconds, so they neither slow
/// each other down nor starve the tests that measure how fast something happens.
pub fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tells the parent `key value` (one line on stdout).
pub fn say(key: &str, value: impl std::fmt::Display) {
    let mut out = io::stdout().lock();
    // The test harness may have printed a partial line ("test child_role ... ").
    let _ = writeln!(out, "\n{MARK}{key} {value}");
    let _ = out.flush();
}

/// Blocks until the parent closes our stdin (or dies).
pub fn wait_for_stdin_eof() {
    let mut sink = Vec::new();
    let _ = io::stdin().read_to_end(&mut sink);
}

/// What the open descriptors of this process are (for failure messages).
pub fn fd_list() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "?".into());
            format!("{}->{}", e.file_name().to_string_lossy(), target)
        })
        .collect();
    v.sort();
    v
}

/// Polls `f` until it holds, for at most `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Waits (at most 5 s) until the handshake of a connection is over (so that its
/// fallback reason, if any, is final).
pub fn settle(s: &TcpStream) {
    wait_until("the handshake to settle", Duration::from_secs(5), || {
        !s.is_pending()
    });
}

/// Runs `f` on a thread and waits for it at most `limit` (panics propagate).
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!(),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: not done within {limit:?}"),
    }
}

// ---- child processes --------------------------------------------------------------

/// A re-executed test binary, killed (SIGKILL) and reaped on drop if still running.
pub struct Kid {
    pub child: Child,
    pub name: String,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(String, String)>,
    /// Messages received but not asked for yet.
    held: VecDeque<(String, String)>,
}

/// How to start a [`Kid`].
pub struct KidSpec {
    role: String,
    exe: PathBuf,
    wrapper: Vec<OsString>,
    envs: Vec<(String, String)>,
}

impl KidSpec {
    /// The current test binary in `role`, with our registry.
    pub fn new(role: &str) -> KidSpec {
        let reg = private_registry();
        KidSpec {
            role: role.to_string(),
            exe: std::env::current_exe().unwrap(),
            wrapper: Vec::new(),
            envs: vec![(REGISTRY_DIR_ENV.into(), reg.display().to_string())],
        }
    }

    pub fn env(mut self, k: &str, v: impl ToString) -> KidSpec {
        self.envs.retain(|(key, _)| key != k);
        self.envs.push((k.to_string(), v.to_string()));
        self
    }

    /// Runs the binary under `wrapper` (e.g. `unshare --net --`).
    pub fn wrapper<S: Into<OsString>>(mut self, w: impl IntoIterator<Item = S>) -> KidSpec {
        self.wrapper = w.into_iter().map(Into::into).collect();
        self
    }

    /// Runs another copy of the test binary.
    pub fn exe(mut self, exe: impl Into<PathBuf>) -> KidSpec {
        self.exe = exe.into();
        self
    }

    pub fn spawn(self) -> io::Result<Kid> {
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        cmd.args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
            .env(ROLE_ENV, &self.role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find(MARK) {
                    let msg = &line[i + MARK.len()..];
                    let (k, v) = msg.split_once(' ').unwrap_or((msg, ""));
                    // Keep draining even when nobody listens any more, so the child
                    // never blocks on a full pipe.
                    let _ = tx.send((k.to_string(), v.to_string()));
                }
            }
        });
        Ok(Kid {
            child,
            name: self.role,
            stdin,
            lines: rx,
            held: VecDeque::new(),
        })
    }
}

impl Kid {
    pub fn spawn(role: &str, envs: &[(&str, String)]) -> Kid {
        let mut spec = KidSpec::new(role);
        for (k, v) in envs {
            spec = spec.env(k, v);
        }
        spec.spawn().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The value of the child's next `key` message, waiting at most `limit`; `None`
    /// if it did not come (the child exited or is too slow).
    pub fn try_expect(&mut self, key: &str, limit: Duration) -> Option<String> {
        if let Some(i) = self.held.iter().position(|(k, _)| k == key) {
            return self.held.remove(i).map(|(_, v)| v);
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((k, v)) if k == key => return Some(v),
                Ok(other) => self.held.push_back(other),
                Err(_) => return None,
            }
        }
    }

    /// Like [`Kid::try_expect`], panicking (after reaping the child) if the message
    /// does not come.
    pub fn expect(&mut self, key: &str, limit: Duration) -> String {
        match self.try_expect(key, limit) {
            Some(v) => v,
            None => {
                let status = self.kill_and_reap();
                panic!(
                    "child {}: no {key} within {limit:?} (status {status:?})",
                    self.name
                )
            }
        }
    }

    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Sends SIGKILL; returns when it was sent.
    pub fn kill9(&mut self) -> Instant {
        let now = Instant::now();
        self.child.kill().expect("SIGKILL the child");
        now
    }

    fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        self.child.wait().ok()
    }

    /// Waits for the child's exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() >= deadline {
                let s = self.kill_and_reap();
                panic!("child {}: still running after {limit:?} ({s:?})", self.name);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a successful exit, at most `limit`.
    pub fn wait_success(&mut self, limit: Duration) {
        let s = self.wait(limit);
        assert!(s.success(), "child {} failed: {s}", self.name);
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        // Never leave a child behind, whatever happened.
        self.kill_and_reap();
    }
}

// ---- the byte pattern ---------------------------------------------------------------

/// The 8 bytes at stream offsets `8 * w ..` of stream `tag` (little-endian).
fn word(tag: u8, w: u64) -> u64 {
    let mut x = w ^ ((tag as u64) << 56) ^ 0x5851_f42d_4c95_7f2d;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `buf` with stream `tag`'s bytes from offset `off`.
pub fn fill(tag: u8, off: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let pos = off + i as u64;
        let b = (pos % 8) as usize;
        let bytes = word(tag, pos / 8).to_le_bytes();
        let n = (8 - b).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&bytes[b..b + n]);
        i += n;
    }
}

/// Checks that `got` is stream `tag` from offset `off` (`scratch` at least as long).
pub fn check(tag: u8, off: u64, got: &[u8], scratch: &mut [u8]) -> Result<(), String> {
    let want = &mut scratch[..got.len()];
    fill(tag, off, want);
    if got == &*want {
        return Ok(());
    }
    let i = got
        .iter()
        .zip(want.iter())
        .position(|(a, b)| a != b)
        .unwrap();
    // Where the bytes we got belong, if they are a shifted piece of the stream.
    let at = off + i as u64;
    Err(format!(
        "stream {tag}: byte {at} wrong (read of {} at {off}): got {:02x?} want {:02x?}",
        got.len(),
        &got[i..(i + 8).min(got.len())],
        &want[i..(i + 8).min(got.len())],
    ))
}

/// A small deterministic generator (xorshift), so failures replay.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seed that differs from run to run (printed by the tests that use it).
pub fn time_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
}

// ---- checked streams ---------------------------------------------------------------

/// How a stream is written.
#[derive(Clone, Debug)]
pub struct SendCfg {
    pub tag: u8,
    /// Bytes to write; `u64::MAX`: until a write fails.
    pub total: u64,
    /// Largest write.
    pub chunk: usize,
    /// Random write sizes in `1..=chunk` (else exactly `chunk`).
    pub random: bool,
    /// Before a write, move the send path with probability `1 / switch_one_in`
    /// (0: never).
    pub switch_one_in: u64,
    pub seed: u64,
    /// Shut the sending direction down at the end.
    pub shutdown: bool,
}

impl SendCfg {
    pub fn new(tag: u8, total: u64) -> SendCfg {
        SendCfg {
            tag,
            total,
            chunk: 256 * 1024,
            random: false,
            switch_one_in: 0,
            seed: tag as u64,
            shutdown: true,
        }
    }

    /// Reads the settings a parent passed in the environment (`VMC_IT_*`).
    pub fn from_env(tag: u8) -> SendCfg {
        SendCfg {
            tag,
            total: env_u64("VMC_IT_TOTAL", 1 << 20),
            chunk: env_u64("VMC_IT_CHUNK", 256 * 1024) as usize,
            random: env_u64("VMC_IT_RANDOM", 0) != 0,
            switch_one_in: env_u64("VMC_IT_SWITCH", 0),
            seed: env_u64("VMC_IT_SEED", 1) ^ tag as u64,
            shutdown: true,
        }
    }

    /// The settings as environment variables for a child.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("VMC_IT_TOTAL", self.total.to_string()),
            ("VMC_IT_CHUNK", self.chunk.to_string()),
            ("VMC_IT_RANDOM", (self.random as u8).to_string()),
            ("VMC_IT_SWITCH", self.switch_one_in.to_string()),
            ("VMC_IT_SEED", self.seed.to_string()),
        ]
    }
}

/// What writing a stream did.
#[derive(Debug)]
pub struct Sent {
    pub bytes: u64,
    pub switches: u64,
    /// The error that ended the stream early, if one did.
    pub error: Option<io::Error>,
    pub elapsed: Duration,
}

/// Writes stream `cfg.tag` on `s` (see [`SendCfg`]).
pub fn write_stream(s: &TcpStream, cfg: &SendCfg) -> Sent {
    let started = Instant::now();
    let mut rng = Rng::new(cfg.seed);
    let mut buf = vec![0u8; cfg.chunk];
    let mut off = 0u64;
    let mut switches = 0u64;
    let mut w = s;
    let error = loop {
        if off >= cfg.total {
            if cfg.shutdown {
                if let Err(e) = s.shutdown(std::net::Shutdown::Write) {
                    break Some(e);
                }
            }
            break None;
        }
        if cfg.switch_one_in > 0 && rng.below(cfg.switch_one_in) == 0 {
            let to = match s.send_path() {
                Path::Shm => Path::Tcp,
                Path::Tcp => Path::Shm,
            };
            if let Err(e) = s.set_send_path(to) {
                break Some(e);
            }
            switches += 1;
        }
        let want = if cfg.random {
            1 + rng.below(cfg.chunk as u64)
        } else {
            cfg.chunk as u64
        };
        let n = want.min(cfg.total - off) as usize;
        fill(cfg.tag, off, &mut buf[..n]);
        if let Err(e) = w.write_all(&buf[..n]) {
            break Some(e);
        }
        off += n as u64;
    };
    Sent {
        bytes: off,
        switches,
        error,
        elapsed: started.elapsed(),
    }
}

/// What reading a stream got.
#[derive(Debug)]
pub struct Received {
    /// Correct bytes received.
    pub bytes: u64,
    /// `None`: the stream ended cleanly (a read returned 0).
    pub error: Option<io::Error>,
    pub elapsed: Duration,
}

/// Reads stream `tag` from `s` to its end (or a read error), checking every byte
/// against its offset; panics at the first wrong byte. `chunk`: largest read;
/// `random`: random read sizes.
pub fn read_stream(s: &TcpStream, tag: u8, chunk: usize, random: bool, seed: u64) -> Received {
    let started = Instant::now();
    let mut rng = Rng::new(seed ^ 0xabcdef);
    let mut buf = vec![0u8; chunk];
    let mut scratch = vec![0u8; chunk];
    let mut off = 0u64;
    let mut r = s;
    let error = loop {
        let want = if random {
            1 + rng.below(chunk as u64) as usize
        } else {
            chunk
        };
        match r.read(&mut buf[..want]) {
            Ok(0) => break None,
            Ok(n) => {
                if let Err(e) = check(tag, off, &buf[..n], &mut scratch) {
                    panic!(
                        "{e}; recv path {:?}, traffic {:?}",
                        s.recv_path(),
                        s.traffic()
                    );
                }
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    Received {
        bytes: off,
        error,
        elapsed: started.elapsed(),
    }
}

/// MiB/s.
pub fn rate(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

/// Copies the test binary to a fresh world-readable directory (for a child that
/// runs as another user and may not reach the build directory).
pub fn public_copy_of_test_binary() -> io::Result<(tempfile::TempDir, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("vmc-it-bin-").tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let src = std::env::current_exe()?;
    let dst = dir.path().join(src.file_name().unwrap());
    std::fs::copy(&src, &dst)?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
    Ok((dir, dst))
}

/// True if `path` exists (for messages).
pub fn exists(path: &FsPath) -> bool {
    path.symlink_metadata().is_ok()
}

/// Writes `out` on a clone of `s` from another thread while reading stream `in_tag`
/// here; returns both outcomes once both ended.
pub fn duplex(
    s: &TcpStream,
    out: &SendCfg,
    in_tag: u8,
    read_chunk: usize,
    random_reads: bool,
) -> (Sent, Received) {
    let w = s.try_clone().unwrap();
    let cfg = out.clone();
    let writer = thread::spawn(move || write_stream(&w, &cfg));
    let got = read_stream(s, in_tag, read_chunk, random_reads, out.seed);
    let sent = writer
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    (sent, got)
}

/// A `key=value` summary of a connection's end, for a child to report.
pub fn summary(s: &TcpStream, sent: &Sent, got: &Received) -> String {
    let t = s.traffic();
    format!(
        "sent={} got={} switches={} accel={} reason={} shm_out={} tcp_out={} shm_in={} tcp_in={} send_err={} recv_err={}",
        sent.bytes,
        got.bytes,
        sent.switches,
        s.is_accelerated() as u8,
        s.fallback_reason().map_or("none", |f| f.code()),
        t.shm_out,
        t.tcp_out,
        t.shm_in,
        t.tcp_in,
        sent.error.as_ref().map_or("none".to_string(), |e| format!("{:?}", e.kind())),
        got.error.as_ref().map_or("none".to_string(), |e| format!("{:?}", e.kind())),
    )
}

/// Parses a [`summary`].
pub struct Summary(pub std::collections::HashMap<String, String>);

impl Summary {
    pub fn parse(s: &str) -> Summary {
        Summary(
            s.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
    pub fn str(&self, k: &str) -> &str {
        self.0
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {k} in summary"))
    }
    pub fn u64(&self, k: &str) -> u64 {
        self.str(k).parse().unwrap()
    }
}

/// Echoes one connection accepted from a std listener until its client shuts its
/// sending direction down; returns the bytes echoed.
pub fn std_echo_one(l: std::net::TcpListener) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
            total += n as u64;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        total
    })
}

/// Echoes a vmc connection until its peer shuts its sending direction down; returns
/// the bytes echoed.
pub fn vmc_echo(s: &TcpStream) -> u64 {
    let mut s = s;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).unwrap();
        total += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    total
}

/// Writes stream 1 (`total` bytes) to an echo server through a vmc connection while
/// reading it back, checking every byte; returns the bytes read back.
pub fn vmc_through_echo(s: &TcpStream, total: u64) -> u64 {
    let mut cfg = SendCfg::new(1, total);
    cfg.chunk = 100_000;
    cfg.random = true;
    let (sent, got) = duplex(s, &cfg, 1, 64 * 1024, true);
    assert!(sent.error.is_none(), "{:?}", sent.error);
    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(sent.bytes, total);
    got.bytes
}

/// The same through a plain std connection.
pub fn std_through_echo(s: std::net::TcpStream, total: u64) -> u64 {
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut buf = vec![0u8; 100_000];
        let mut off = 0u64;
        while off < total {
            let n = (buf.len() as u64).min(total - off) as usize;
            fill(1, off, &mut buf[..n]);
            w.write_all(&buf[..n]).unwrap();
            off += n as u64;
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut buf = vec![0u8; 64 * 1024];
    let mut scratch = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        check(1, off, &buf[..n], &mut scratch).unwrap();
        off += n as u64;
    }
    writer.join().unwrap();
    off
}
