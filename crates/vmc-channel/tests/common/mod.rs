//! Helpers shared by the integration tests of `vmc-channel`: a small PRNG, an
//! offset-derived byte pattern, a streaming checksum, deadlines and child
//! processes that are the test binary itself.
#![allow(dead_code)]

use std::io;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmc_channel::WakeMode;
// Not every test binary that includes this module uses each of these.
#[allow(unused_imports)]
pub use vmc_testkit::{fd_count, spawn_with_tid, wait_asleep};

pub const ALL_WAKE_MODES: [WakeMode; 3] = [WakeMode::Futex, WakeMode::EventFd, WakeMode::Poll];

/// SplitMix64: small, fast, good enough to pick sizes and fill buffers.
#[derive(Clone, Debug)]
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        assert!(lo <= hi);
        lo + (self.next_u64() % ((hi - lo) as u64 + 1)) as usize
    }

    pub fn chance(&mut self, one_in: u64) -> bool {
        self.next_u64() % one_in == 0
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// A seed from `VMC_TEST_SEED` if set (to replay a failure), else from the clock;
/// printed so that a failing run can be replayed.
pub fn test_seed(what: &str) -> u64 {
    let seed = match std::env::var("VMC_TEST_SEED") {
        Ok(s) => s.parse().expect("VMC_TEST_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("{what}: seed {seed} (replay with VMC_TEST_SEED={seed})");
    seed
}

/// The byte at stream offset `off` of the stream identified by `seed`.
#[inline]
pub fn pattern_byte(seed: u64, off: u64) -> u8 {
    ((off ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Fills `buf` with the stream bytes starting at offset `off`.
pub fn fill_pattern(seed: u64, off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, off + i as u64);
    }
}

/// Panics (naming the offset) unless `buf` holds the stream bytes at `off`.
#[track_caller]
pub fn check_pattern(seed: u64, off: u64, buf: &[u8]) {
    for (i, &b) in buf.iter().enumerate() {
        let want = pattern_byte(seed, off + i as u64);
        if b != want {
            panic!(
                "stream {seed:#x}: byte at offset {} is {b:#04x}, expected {want:#04x}",
                off + i as u64
            );
        }
    }
}

/// A streaming, order-sensitive 64-bit checksum whose value does not depend on
/// how the stream is cut into pieces. Word at a time, so gigabytes cost little
/// even in the debug profile.
#[derive(Clone, Debug)]
pub struct Checksum {
    h: u64,
    pend: u64,
    npend: u32,
    count: u64,
}

const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    pub fn new() -> Checksum {
        Checksum {
            h: 0xcbf2_9ce4_8422_2325,
            pend: 0,
            npend: 0,
            count: 0,
        }
    }

    #[inline(always)]
    fn mix(&mut self, w: u64) {
        self.h = (self.h.rotate_left(23) ^ w).wrapping_mul(MIX);
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.count += data.len() as u64;
        while self.npend != 0 && !data.is_empty() {
            self.pend |= (data[0] as u64) << (8 * self.npend);
            self.npend += 1;
            data = &data[1..];
            if self.npend == 8 {
                let w = std::mem::take(&mut self.pend);
                self.npend = 0;
                self.mix(w);
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().unwrap()));
        }
        for &b in chunks.remainder() {
            self.pend |= (b as u64) << (8 * self.npend);
            self.npend += 1;
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// `(bytes, checksum)`.
    pub fn finish(&self) -> (u64, u64) {
        let mut h = self.h;
        if self.npend > 0 {
            h = (h.rotate_left(23) ^ self.pend).wrapping_mul(MIX);
        }
        h ^= self.count;
        h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        (self.count, h)
    }

    /// `finish` as 16 bytes, to send over a channel.
    pub fn report(&self) -> [u8; 16] {
        let (n, h) = self.finish();
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&n.to_le_bytes());
        out[8..].copy_from_slice(&h.to_le_bytes());
        out
    }
}

pub fn parse_report(b: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        u64::from_le_bytes(b[8..].try_into().unwrap()),
    )
}

/// Runs `f` on a thread and returns its result, panicking if it takes longer
/// than `limit` (the thread is then abandoned) or re-raising its panic.
#[track_caller]
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let v = f();
        let _ = tx.send(v);
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: not done within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("thread ended without a result"),
        },
    }
}

/// Asserts that `kind` is what an error was expected to be.
#[track_caller]
pub fn assert_kind<T>(r: io::Result<T>, kind: io::ErrorKind) -> io::Error {
    match r {
        Ok(_) => panic!("expected a {kind:?} error, got Ok"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "unexpected error: {e}");
            e
        }
    }
}

/// Names in `dir` that start with `chan-` (or `.tmp-`): leftovers of segments.
pub fn segment_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("chan-") || n.starts_with(".tmp-"))
        .collect();
    v.sort();
    v
}

/// Environment variable naming the role of a re-executed test binary.
pub const ROLE_ENV: &str = "VMC_TEST_CHILD_ROLE";

/// A child process running this very test binary with only `entry` selected,
/// killed (SIGKILL) and reaped on drop unless already waited for.
pub struct ChildProc {
    child: Option<Child>,
    pid: i32,
}

/// Starts this test binary again, running only the test `entry` with
/// `ROLE_ENV=role` and the extra environment `env`.
pub fn spawn_self(entry: &str, role: &str, env: &[(&str, String)]) -> ChildProc {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", entry, "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE_ENV, role)
        .env_remove("VMC_RING_BYTES")
        .env_remove("VMC_WAKE")
        .env_remove("VMC_SPIN_US")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawning the test binary as a child");
    let pid = child.id() as i32;
    ChildProc {
        child: Some(child),
        pid,
    }
}

impl ChildProc {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends SIGKILL (the child is reaped by `wait` or on drop).
    pub fn kill9(&self) {
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        let r = unsafe { libc::kill(self.pid, libc::SIGKILL) };
        assert_eq!(r, 0, "kill: {}", io::Error::last_os_error());
    }

    /// Waits at most `limit` for the child to exit (then kills it and panics).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("child already waited for");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child {} still running after {limit:?}", self.pid);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits at most `limit` and asserts the child succeeded.
    #[track_caller]
    pub fn wait_success(&mut self, limit: Duration) {
        let st = self.wait(limit);
        assert!(st.success(), "child {} failed: {st}", self.pid);
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The value of a variable the parent passes to its child.
pub fn child_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child: {name} not set"))
}

pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}
