//! Real, unmodified programs under `vmc run`: sockperf (ping-pong and throughput, with
//! epoll, poll and select), iperf3 (one stream, reverse, four streams), redis-server
//! with redis-benchmark and redis-cli, curl downloading from python3's http.server,
//! and `cat` exec'd inetd-style onto a connection python3 accelerated.
//!
//! Each pair runs with both ends under `vmc run`, so that vmc can carry the connection
//! over shared memory, and once mixed (one end plain), so that vmc must leave it on TCP.
//! A test checks the data first: sockperf's own reply comparison (`--data-integrity`),
//! sequence counters and message counts on both ends; iperf3's byte counts; values
//! read back from redis; the downloaded file byte for byte. Then it checks what every
//! process under vmc wrote to `VMC_REPORT` when it exited: both-under-vmc runs must
//! report `accelerated >= 1` and bytes over shared memory; in mixed runs, every line
//! written must report `accelerated == 0` (a missing line is tolerated there, as in
//! vmc-preload's conformance tests). A failure message names the check that failed and
//! ends with the tail of every process's output and the report file; with
//! `--nocapture`, each test prints its figures and report lines as it goes.
//! `VMC_PRELOAD_LIB=FILE` tests another build of the library; `VMC_LOG` is passed on
//! (the log goes to each process's stderr, shown on failure).
//!
//! The programs come from Debian packages (`scripts/test-all` installs them); the
//! preload library must be built next to the `vmc` binary (`cargo build --release
//! --workspace`). The tests take turns (each loads both cores) and each works in its
//! own temporary directory, registry and report file. Every wait is bounded, and a
//! process still running when a test ends (or fails) is killed.
//!
//! Servers are stopped so that they exit through `exit()` and write their report:
//! sockperf and python3 with SIGINT (SIGTERM kills both without running exit
//! handlers), redis-server with SIGTERM (it shuts down and exits 0); `iperf3 -s -1`
//! exits by itself after one test. Readiness is read from `/proc/net/tcp{,6}` (a LISTEN socket on the port),
//! not probed with a connection: a probe would end `iperf3 -s -1`'s single test and
//! count as a plain connection in the server's report.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;

/// The tests take turns: each saturates both cores of a CI machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// A python script with `echo(c)` defined first: echo what connection `c` sends
/// until it closes, then close it.
macro_rules! echo_py {
    ($body:literal) => {
        concat!(
            "def echo(c):\n",
            "    while True:\n",
            "        d = c.recv(65536)\n",
            "        if not d:\n",
            "            break\n",
            "        c.sendall(d)\n",
            "    c.close()\n",
            $body
        )
    };
}

/// How long a server may take to start listening, or to exit once told to.
const SERVER_WAIT: Duration = Duration::from_secs(15);
/// How long a client run may take (they take 1-3 s normally).
const CLIENT_WAIT: Duration = Duration::from_secs(60);

/// Bytes iperf3 sends per run (`-n`).
const IPERF_BYTES: u64 = 1 << 30;
/// The file curl downloads.
const HTTP_FILE_BYTES: u64 = 100 << 20;

// ---------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------

/// Whether a program runs under `vmc run` or as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Vmc,
    Plain,
}

/// A process a test started, for the failure context.
struct ProcInfo {
    label: String,
    side: Side,
    pid: u32,
    cmdline: String,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

/// A running process; killed if still running when dropped (a failing test).
struct Proc {
    child: Child,
    label: String,
}

impl Proc {
    fn who(&self) -> Who {
        Who {
            label: self.label.clone(),
            pid: self.child.id(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A finished process and its output.
struct Done {
    label: String,
    pid: u32,
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Done {
    fn who(&self) -> Who {
        Who {
            label: self.label.clone(),
            pid: self.pid,
        }
    }

    fn out(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&self.stdout))
    }

    fn err(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&self.stderr))
    }
}

/// A process to look up in the report file.
#[derive(Clone)]
struct Who {
    label: String,
    pid: u32,
}

/// One test: its directory, registry, report file and processes. Holds the turn.
struct Case {
    name: &'static str,
    dir: tempfile::TempDir,
    registry: PathBuf,
    report: PathBuf,
    procs: RefCell<Vec<ProcInfo>>,
    started: Instant,
    _turn: MutexGuard<'static, ()>,
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.public_dir());
        eprintln!(
            "[{}] took {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

impl Case {
    fn new(name: &'static str) -> Case {
        let turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // VMC_PRELOAD_LIB (which `vmc run` honours) tests another build of the library.
        let lib = std::env::var_os("VMC_PRELOAD_LIB").map_or_else(
            || vmc_bin().with_file_name("libvmc_preload.so"),
            PathBuf::from,
        );
        assert!(
            lib.is_file(),
            "{} is missing: `vmc run` needs the preload library next to the vmc binary. \
             Build it with `cargo build --release --workspace` (`cargo build --workspace` \
             for a debug `cargo test`); scripts/test-all does this before testing.",
            lib.display()
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("vmc-real-{name}-"))
            .tempdir()
            .expect("create a temporary directory");
        // vmc creates the registry and its parent itself (mode 0700, which it checks).
        let registry = dir.path().join("vmc").join("listeners");
        let report = dir.path().join("report.jsonl");
        Case {
            name,
            dir,
            registry,
            report,
            procs: RefCell::new(Vec::new()),
            started: Instant::now(),
            _turn: turn,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The registry every user shares, for this case: outside the case directory
    /// (which only root can enter), so that processes that became another user
    /// reach it.
    fn public_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!(
            "vmc-real-public-{}-{}",
            std::process::id(),
            self.name
        ))
    }

    /// Panics with `msg`, then every process's output and the report file.
    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!("[{}] {msg}\n{}", self.name, self.context())
    }

    fn check(&self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.fail(msg());
        }
    }

    fn context(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "---------- context of [{}]", self.name);
        for p in self.procs.borrow().iter() {
            let status = match p.status {
                Some(st) => st.to_string(),
                None => "still running (killed when the test ends)".into(),
            };
            let _ = writeln!(
                s,
                "-- {} [{:?}] pid {}: {}\n   $ {}",
                p.label, p.side, p.pid, status, p.cmdline
            );
            for (what, path) in [("stdout", &p.stdout), ("stderr", &p.stderr)] {
                let t = tail(path, 25);
                if !t.is_empty() {
                    let _ = writeln!(s, "   {what} (last lines):\n{t}");
                }
            }
        }
        match fs::read_to_string(&self.report) {
            Ok(r) if !r.is_empty() => {
                let _ = writeln!(
                    s,
                    "-- VMC_REPORT {}:\n{}",
                    self.report.display(),
                    r.trim_end()
                );
            }
            _ => {
                let _ = writeln!(s, "-- VMC_REPORT: empty (no process wrote a line)");
            }
        }
        s
    }

    /// A command for `program args`, under `vmc run` or plain, with this case's
    /// registry and report file, and of the caller's vmc settings only VMC_LOG,
    /// VMC_LOG_FILE and VMC_PRELOAD_LIB.
    fn command(&self, side: Side, program: &Path, args: &[&str]) -> Command {
        let mut cmd = match side {
            Side::Vmc => {
                let mut c = Command::new(vmc_bin());
                c.arg("run").arg("--").arg(program);
                c
            }
            Side::Plain => Command::new(program),
        };
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("VMC_")
                && !["VMC_LOG", "VMC_LOG_FILE", "VMC_PRELOAD_LIB"].contains(&&*k)
            {
                cmd.env_remove(&*k);
            }
        }
        cmd.args(args)
            .env_remove("LD_PRELOAD")
            .env("VMC_REGISTRY_DIR", &self.registry)
            .env("VMC_PUBLIC_DIR", self.public_dir())
            .env("VMC_REPORT", &self.report)
            .current_dir(self.dir.path());
        cmd
    }

    /// Starts `program args`; stdout and stderr go to files in the case directory.
    fn spawn(
        &self,
        side: Side,
        label: &str,
        program: &Path,
        args: &[&str],
        stdin: Option<&Path>,
    ) -> Proc {
        let n = self.procs.borrow().len();
        let file_label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let stdout = self.path(&format!("{n:02}-{file_label}.stdout"));
        let stderr = self.path(&format!("{n:02}-{file_label}.stderr"));
        let mut cmd = self.command(side, program, args);
        cmd.stdout(File::create(&stdout).expect("create stdout file"))
            .stderr(File::create(&stderr).expect("create stderr file"))
            .stdin(match stdin {
                Some(p) => Stdio::from(File::open(p).expect("open stdin file")),
                None => Stdio::null(),
            });
        let cmdline = format!(
            "{}{} {}",
            if side == Side::Vmc { "vmc run -- " } else { "" },
            program.display(),
            args.iter()
                .map(|a| if a.is_empty() { "''" } else { a })
                .collect::<Vec<_>>()
                .join(" ")
        );
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| self.fail(format!("cannot start {label} ({cmdline}): {e}")));
        self.procs.borrow_mut().push(ProcInfo {
            label: label.to_string(),
            side,
            pid: child.id(),
            cmdline,
            stdout,
            stderr,
            status: None,
        });
        Proc {
            child,
            label: label.to_string(),
        }
    }

    fn note_exit(&self, pid: u32, status: ExitStatus) {
        if let Some(p) = self.procs.borrow_mut().iter_mut().find(|p| p.pid == pid) {
            p.status = Some(status);
        }
    }

    /// Waits for `p` to exit; kills it and fails after `timeout`.
    fn wait(&self, p: &mut Proc, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match p.child.try_wait() {
                Ok(Some(status)) => {
                    self.note_exit(p.child.id(), status);
                    return status;
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(ms(10)),
                Ok(None) => {
                    let _ = p.child.kill();
                    if let Ok(st) = p.child.wait() {
                        self.note_exit(p.child.id(), st);
                    }
                    self.fail(format!(
                        "{} (pid {}) did not finish within {timeout:?}; killed it",
                        p.label,
                        p.child.id()
                    ));
                }
                Err(e) => self.fail(format!("waiting for {}: {e}", p.label)),
            }
        }
    }

    /// Runs `program args` to the end and returns its output.
    fn run(
        &self,
        side: Side,
        label: &str,
        program: &Path,
        args: &[&str],
        stdin: Option<&Path>,
    ) -> Done {
        let mut p = self.spawn(side, label, program, args, stdin);
        let status = self.wait(&mut p, CLIENT_WAIT);
        let (stdout, stderr) = {
            let procs = self.procs.borrow();
            let info = procs.iter().find(|i| i.pid == p.child.id()).unwrap();
            (
                fs::read(&info.stdout).unwrap_or_default(),
                fs::read(&info.stderr).unwrap_or_default(),
            )
        };
        Done {
            label: label.to_string(),
            pid: p.child.id(),
            status,
            stdout,
            stderr,
        }
    }

    /// [`Case::run`], which must exit 0.
    fn run_ok(
        &self,
        side: Side,
        label: &str,
        program: &Path,
        args: &[&str],
        stdin: Option<&Path>,
    ) -> Done {
        let d = self.run(side, label, program, args, stdin);
        self.check(d.status.success(), || {
            format!("{label} (pid {}) failed: {}", d.pid, d.status)
        });
        d
    }

    /// Waits until something listens on `port` (while `server` runs).
    fn wait_listening(&self, server: &mut Proc, port: u16) {
        let deadline = Instant::now() + SERVER_WAIT;
        loop {
            if let Ok(Some(st)) = server.child.try_wait() {
                self.note_exit(server.child.id(), st);
                self.fail(format!(
                    "{} exited ({st}) before listening on port {port}",
                    server.label
                ));
            }
            if listening(port) {
                return;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "{} did not listen on port {port} within {SERVER_WAIT:?}",
                    server.label
                ));
            }
            std::thread::sleep(ms(10));
        }
    }

    /// Sends `sig` to `p` and waits for it to exit.
    fn stop(&self, p: &mut Proc, sig: Signal) -> ExitStatus {
        let pid = Pid::from_raw(p.child.id() as i32).expect("a child's pid is positive");
        if let Err(e) = kill_process(pid, sig) {
            self.fail(format!("cannot signal {} (pid {pid:?}): {e}", p.label));
        }
        self.wait(p, SERVER_WAIT)
    }

    /// Output of a process, by pid (for servers, after they exited).
    fn stdout_of(&self, p: &Proc) -> String {
        let procs = self.procs.borrow();
        let info = procs.iter().find(|i| i.pid == p.child.id()).unwrap();
        strip_ansi(&String::from_utf8_lossy(
            &fs::read(&info.stdout).unwrap_or_default(),
        ))
    }

    /// A file in the case directory.
    fn write_file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, contents).expect("write a file into the case directory");
        p
    }

    fn reports(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.report).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    self.fail(format!("VMC_REPORT line is not JSON ({e}): {l:?}"))
                })
            })
            .collect()
    }

    /// The report line of `pid`: `Ok(None)` if there is none; `Err` if several.
    fn report_of(&self, pid: u32) -> Result<Option<Value>, String> {
        let mine: Vec<Value> = self
            .reports()
            .into_iter()
            .filter(|r| r["pid"].as_u64() == Some(u64::from(pid)))
            .collect();
        match mine.len() {
            0 => Ok(None),
            1 => Ok(mine.into_iter().next()),
            n => Err(format!("{n} report lines (expected one per process)")),
        }
    }

    /// Both ends ran under vmc: every process in `who` must have written its report
    /// line, with `accelerated >= 1` and bytes over shared memory.
    fn expect_accelerated(&self, who: &[Who]) {
        let mut problems = Vec::new();
        for w in who {
            match self.report_of(w.pid) {
                Err(e) => problems.push(format!("{} (pid {}): {e}", w.label, w.pid)),
                Ok(None) => problems.push(format!(
                    "{} (pid {}): no report line (the preload library wrote none: still a \
                     stub, or the process did not exit through exit())",
                    w.label, w.pid
                )),
                Ok(Some(r)) => {
                    eprintln!("[{}] {} reported {r}", self.name, w.label);
                    let acc = field(&r, "accelerated");
                    let shm = field(&r, "shm_in") + field(&r, "shm_out");
                    if acc < 1 || shm == 0 {
                        problems.push(format!(
                            "{} (pid {}): accelerated={acc}, shm_in+shm_out={shm}: {r}",
                            w.label, w.pid
                        ));
                    }
                }
            }
        }
        if !problems.is_empty() {
            self.fail(format!(
                "ACCELERATION CHECK FAILED (the data checks passed): both ends ran under \
                 `vmc run`, so each process must report accelerated >= 1 and shm bytes > 0 \
                 in VMC_REPORT:\n  {}",
                problems.join("\n  ")
            ));
        }
    }

    /// Most of a bulk transfer's `bytes` must have gone over shared memory, as seen by
    /// `who` (one end of it): a run that fell back to TCP early must not pass as vmc.
    fn expect_bulk_over_shm(&self, who: &Who, bytes: u64) {
        let r = match self.report_of(who.pid) {
            Ok(Some(r)) => r,
            _ => return, // expect_accelerated has said why
        };
        let shm = field(&r, "shm_in") + field(&r, "shm_out");
        self.check(shm >= bytes / 2, || {
            format!(
                "ACCELERATION CHECK FAILED (the data checks passed): {} (pid {}) moved \
                 {bytes} payload bytes, but only {shm} went over shared memory: {r}",
                who.label, who.pid
            )
        });
    }

    /// One end ran plain: vmc must not have accelerated anything. A process under vmc
    /// that wrote its line must report accelerated == 0, no shm bytes and its plain
    /// connection(s); a missing line is tolerated (noted on stderr).
    fn expect_fallback(&self, who: &[Who]) {
        let mut problems = Vec::new();
        for w in who {
            match self.report_of(w.pid) {
                Err(e) => problems.push(format!("{} (pid {}): {e}", w.label, w.pid)),
                Ok(None) => eprintln!(
                    "[{}] note: {} (pid {}) wrote no VMC_REPORT line; the mixed-run check \
                     (accelerated == 0) has nothing to check",
                    self.name, w.label, w.pid
                ),
                Ok(Some(r)) => {
                    eprintln!("[{}] {} reported {r}", self.name, w.label);
                    let acc = field(&r, "accelerated");
                    let shm = field(&r, "shm_in") + field(&r, "shm_out");
                    let plain = field(&r, "plain");
                    if acc != 0 || shm != 0 || plain == 0 {
                        problems.push(format!(
                            "{} (pid {}): accelerated={acc} shm_in+shm_out={shm} plain={plain} \
                             (expected 0, 0, >= 1): {r}",
                            w.label, w.pid
                        ));
                    }
                }
            }
        }
        if !problems.is_empty() {
            self.fail(format!(
                "MIXED-RUN CHECK FAILED (the data checks passed): one end ran without vmc, \
                 so the connections must stay plain TCP:\n  {}",
                problems.join("\n  ")
            ));
        }
    }
}

fn field(r: &Value, name: &str) -> u64 {
    r[name].as_u64().unwrap_or(0)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn vmc_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmc"))
}

/// `name` in PATH; fails (saying how to install it) if it is not installed.
fn program(name: &str) -> PathBuf {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "`{name}` is not installed (not in PATH). These tests run real programs from \
         Debian packages; scripts/test-all installs them, or run \
         `apt-get install -y sockperf iperf3 redis-server redis-tools curl wrk python3`"
    )
}

/// The system's python3 (not a pyenv-style shim script, which would run a shell and
/// several helper processes under the preload library before python itself).
fn python3() -> PathBuf {
    let system = Path::new("/usr/bin/python3");
    if system.is_file() {
        system.to_path_buf()
    } else {
        program("python3")
    }
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether a TCP socket (v4 or v6) listens on `port`, from /proc/net/tcp{,6}.
fn listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3
                    && cols[3] == "0A"
                    && cols[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
        })
    })
}

/// Whether SIGINT is ignored in this process (then children inherit that, and
/// python3 does not install its KeyboardInterrupt handler).
fn sigint_ignored() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (2 - 1)) != 0)
}

/// The last `n` lines of a file (carriage returns count as line ends).
fn tail(path: &Path, n: usize) -> String {
    let text = strip_ansi(&String::from_utf8_lossy(
        &fs::read(path).unwrap_or_default(),
    ));
    let text = text.replace('\r', "\n");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| {
            let l: String = l.chars().take(300).collect();
            format!("     | {l}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Removes terminal colour sequences (sockperf prints some).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The number right after `key` in `text` (first occurrence), e.g.
/// `number_after("SentMessages=12; ...", "SentMessages=")`.
fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = text[text.find(key)? + key.len()..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A deterministic pseudo-random byte stream (xorshift64*).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }

    /// `n` characters from [A-Za-z0-9].
    fn word(&mut self, n: usize) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        (0..n)
            .map(|_| ALPHABET[(self.next() % ALPHABET.len() as u64) as usize] as char)
            .collect()
    }
}

// ---------------------------------------------------------------------------------
// sockperf
// ---------------------------------------------------------------------------------

/// Fails if sockperf printed an error (it also exits 0 on bad arguments, so its
/// output is what counts).
fn sockperf_clean(case: &Case, d: &Done) {
    for line in d.out().lines().chain(d.err().lines()) {
        let l = line.trim();
        if (l.starts_with("sockperf")
            && (l.contains("ERROR") || l.contains("integrity test failed")))
            || l.starts_with("Usage:")
        {
            case.fail(format!("{} reported an error: {l}", d.label));
        }
    }
    case.check(d.status.success(), || {
        format!("{} (pid {}) failed: {}", d.label, d.pid, d.status)
    });
}

/// Checks a ping-pong run's summary; returns the messages it sent in all (what the
/// server must have handled).
fn check_pingpong(case: &Case, d: &Done) -> u64 {
    sockperf_clean(case, d);
    let out = d.out();
    let line = |key: &str| {
        out.lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| case.fail(format!("{}: no line with {key:?}", d.label)))
            .to_string()
    };
    let num = |l: &str, key: &str| {
        number_after(l, key)
            .unwrap_or_else(|| case.fail(format!("{}: cannot parse {key:?} in {l:?}", d.label)))
    };
    let total = line("[Total Run]");
    let (sent, received) = (
        num(&total, "SentMessages="),
        num(&total, "ReceivedMessages="),
    );
    // The one message sent when the timer ended may have no reply yet.
    case.check(
        sent > 0.0 && (sent - received == 0.0 || sent - received == 1.0),
        || {
            format!(
                "{}: sent {sent} but received {received} replies: {total:?}",
                d.label
            )
        },
    );
    let valid = line("[Valid Duration]");
    let (vs, vr) = (
        num(&valid, "SentMessages="),
        num(&valid, "ReceivedMessages="),
    );
    case.check(vs > 0.0 && vs == vr, || {
        format!(
            "{}: measured phase sent {vs}, received {vr}: {valid:?}",
            d.label
        )
    });
    let counters = line("# dropped messages");
    for key in [
        "dropped messages =",
        "duplicated messages =",
        "out-of-order messages =",
    ] {
        let n = num(&counters, key);
        case.check(n == 0.0, || format!("{}: {key} {n}: {counters:?}", d.label));
    }
    let observations = num(&line(" observations"), "Total ");
    case.check(observations > 0.0 && observations == vr, || {
        format!("{}: {observations} observations for {vr} replies", d.label)
    });
    let avg = num(&line("avg-latency="), "avg-latency=");
    let p50 = num(&line("percentile 50.000"), "percentile 50.000 =");
    let max = num(&line("<MAX> observation"), "<MAX> observation =");
    case.check(avg > 0.0 && p50 > 0.0 && max >= p50, || {
        format!("{}: odd latencies avg={avg} p50={p50} max={max}", d.label)
    });
    eprintln!(
        "[{}] {}: {received} round trips, {observations} observed, avg {avg} us, p50 {p50} us",
        case.name, d.label
    );
    sent as u64
}

/// Checks a throughput run's summary; returns the messages it sent.
fn check_throughput(case: &Case, d: &Done) -> u64 {
    sockperf_clean(case, d);
    let out = d.out();
    let sent = out
        .lines()
        .find_map(|l| number_after(l, "Total of "))
        .unwrap_or_else(|| case.fail(format!("{}: no \"Total of N messages sent\"", d.label)));
    let mbps = out
        .lines()
        .find_map(|l| number_after(l, "BandWidth is "))
        .unwrap_or_else(|| case.fail(format!("{}: no \"BandWidth is X MBps\"", d.label)));
    case.check(sent > 0.0 && mbps > 0.0, || {
        format!("{}: sent {sent} messages at {mbps} MB/s", d.label)
    });
    eprintln!("[{}] {}: {sent} messages, {mbps} MB/s", case.name, d.label);
    sent as u64
}

/// Stops a sockperf server with SIGINT (it exits through exit() then; SIGTERM would
/// kill it) and returns the messages it says it handled.
fn stop_sockperf_server(case: &Case, server: &mut Proc) -> u64 {
    let st = case.stop(server, Signal::INT);
    case.check(st.success(), || {
        format!("{} exited with {st}", server.label)
    });
    let out = case.stdout_of(server);
    for l in out.lines() {
        if l.contains("ERROR") {
            case.fail(format!("{} reported an error: {l}", server.label));
        }
    }
    out.lines()
        .find_map(|l| number_after(l, "sockperf: Total "))
        .unwrap_or_else(|| {
            case.fail(format!(
                "{}: no \"Total N messages received and handled\" at exit",
                server.label
            ))
        }) as u64
}

/// A sockperf server on a fresh port, its feed file and the iomux `mode`.
fn sockperf_server(case: &Case, side: Side, mode: &str, label: &str) -> (Proc, String) {
    let port = free_port();
    let feed = case.write_file(
        &format!("feed-{port}.txt"),
        format!("T:127.0.0.1:{port}\n").as_bytes(),
    );
    let feed = feed.to_str().unwrap().to_string();
    let mut server = case.spawn(
        side,
        label,
        &program("sockperf"),
        &["sr", "-f", &feed, "-F", mode],
        None,
    );
    case.wait_listening(&mut server, port);
    (server, feed)
}

/// Throughput then ping-pong against one server (the ping-pong second: by the time it
/// ends, the server has read everything the throughput client sent). Returns the
/// clients and the messages they sent in all.
fn sockperf_clients(
    case: &Case,
    side: Side,
    feed: &str,
    mode: &str,
    pp_sizes: &[&str],
) -> (Vec<Who>, u64) {
    let sockperf = program("sockperf");
    let tp = case.run(
        side,
        &format!("sockperf tp {mode}"),
        &sockperf,
        &["tp", "-f", feed, "-F", mode, "-t", "1", "-m", "65000"],
        None,
    );
    let tp_sent = check_throughput(case, &tp);
    // sockperf sizes its table of send times for --mps messages per second (600k
    // by default) and stops with "ERROR: _seqN > m_maxSequenceNo" when round trips
    // are faster, as over shared memory they are; 5M/s costs it ~160 MB.
    let mut args = vec![
        "pp",
        "-f",
        feed,
        "-F",
        mode,
        "-t",
        "1",
        "--mps",
        "5000000",
        "--data-integrity",
    ];
    args.extend_from_slice(pp_sizes);
    let pp = case.run(side, &format!("sockperf pp {mode}"), &sockperf, &args, None);
    let pp_sent = check_pingpong(case, &pp);
    (vec![tp.who(), pp.who()], tp_sent + pp_sent)
}

fn sockperf_both_under_vmc(name: &'static str, mode: &str, pp_sizes: &[&str]) {
    program("sockperf");
    let case = Case::new(name);
    let (mut server, feed) = sockperf_server(&case, Side::Vmc, mode, "sockperf server");
    let (clients, sent) = sockperf_clients(&case, Side::Vmc, &feed, mode, pp_sizes);
    let handled = stop_sockperf_server(&case, &mut server);
    case.check(handled == sent, || {
        format!("the clients sent {sent} messages, the server handled {handled}")
    });
    let mut who = clients;
    who.push(server.who());
    case.expect_accelerated(&who);
}

#[test]
fn sockperf_epoll_both_under_vmc() {
    sockperf_both_under_vmc("sockperf_epoll", "epoll", &["-m", "64"]);
}

#[test]
fn sockperf_poll_both_under_vmc() {
    // Message sizes vary from 14 to 2800 bytes.
    sockperf_both_under_vmc("sockperf_poll", "poll", &["-m", "1407", "-r", "1393"]);
}

#[test]
fn sockperf_select_both_under_vmc() {
    // Message sizes vary from 1000 to 63000 bytes.
    sockperf_both_under_vmc("sockperf_select", "select", &["-m", "32000", "-r", "31000"]);
}

#[test]
fn sockperf_mixed_falls_back() {
    program("sockperf");
    let case = Case::new("sockperf_mixed");
    // Plain server, clients under vmc.
    let (mut server, feed) = sockperf_server(&case, Side::Plain, "epoll", "plain sockperf server");
    let (vmc_clients, sent) = sockperf_clients(&case, Side::Vmc, &feed, "epoll", &["-m", "64"]);
    let handled = stop_sockperf_server(&case, &mut server);
    case.check(handled == sent, || {
        format!("the vmc clients sent {sent} messages, the plain server handled {handled}")
    });
    // Server under vmc, plain clients.
    let (mut server, feed) = sockperf_server(&case, Side::Vmc, "poll", "vmc sockperf server");
    let (_, sent) = sockperf_clients(&case, Side::Plain, &feed, "poll", &["-m", "300"]);
    let handled = stop_sockperf_server(&case, &mut server);
    case.check(handled == sent, || {
        format!("the plain clients sent {sent} messages, the vmc server handled {handled}")
    });
    let mut who = vmc_clients;
    who.push(server.who());
    case.expect_fallback(&who);
}

// ---------------------------------------------------------------------------------
// iperf3
// ---------------------------------------------------------------------------------

/// `iperf3 -s -1` and one client run of IPERF_BYTES (`-n`) with `extra` arguments.
/// Returns the server and the client, and the bytes the client's side sent (forward)
/// or received (-R).
fn iperf3_run(
    case: &Case,
    server_side: Side,
    client_side: Side,
    extra: &[&str],
) -> (Who, Who, u64) {
    let iperf3 = program("iperf3");
    let port = free_port();
    let port_s = port.to_string();
    let mut server = case.spawn(
        server_side,
        "iperf3 server",
        &iperf3,
        &["-s", "-p", &port_s, "-1"],
        None,
    );
    case.wait_listening(&mut server, port);
    let n = IPERF_BYTES.to_string();
    let mut args = vec!["-c", "127.0.0.1", "-p", &port_s, "-n", &n, "--json"];
    args.extend_from_slice(extra);
    let label = format!("iperf3 client {}", extra.join(" "));
    let client = case.run(client_side, label.trim(), &iperf3, &args, None);
    let json: Value = serde_json::from_slice(&client.stdout)
        .unwrap_or_else(|e| case.fail(format!("{}: stdout is not JSON ({e})", client.label)));
    case.check(json.get("error").is_none(), || {
        format!(
            "{}: iperf3 reported an error: {}",
            client.label, json["error"]
        )
    });
    case.check(client.status.success(), || {
        format!("{} failed: {}", client.label, client.status)
    });
    let reverse = extra.contains(&"-R");
    let streams: u64 = extra
        .iter()
        .position(|a| *a == "-P")
        .map_or(1, |i| extra[i + 1].parse().unwrap());
    let bytes = |v: &Value| {
        v["bytes"]
            .as_u64()
            .unwrap_or_else(|| case.fail(format!("{}: no byte count in {v}", client.label)))
    };
    let sent = bytes(&json["end"]["sum_sent"]);
    let received = bytes(&json["end"]["sum_received"]);
    case.check(
        sent >= IPERF_BYTES && received > 0 && received <= sent,
        || {
            format!(
                "{}: sent {sent} bytes (asked for {IPERF_BYTES}), received {received}",
                client.label
            )
        },
    );
    if reverse {
        // With -n and -R the receiving client ends the test itself, after the last
        // byte: the counts must match exactly.
        case.check(received == sent, || {
            format!(
                "{}: the server sent {sent} bytes, the client received {received}",
                client.label
            )
        });
    } else {
        // Forward, the server stops counting when the client announces the end, so
        // what is still in flight then (socket buffers) is not counted: plain TCP
        // loses up to ~12 MB per stream this way under load. More is a lost byte.
        let slack = streams * (64 << 20);
        case.check(sent - received <= slack, || {
            format!(
                "{}: sent {sent} bytes, received only {received} (more than {slack} short)",
                client.label
            )
        });
    }
    let per_stream = json["end"]["streams"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    case.check(per_stream.len() as u64 == streams, || {
        format!(
            "{}: {} streams in the result, expected {streams}",
            client.label,
            per_stream.len()
        )
    });
    for s in &per_stream {
        case.check(bytes(&s["sender"]) > 0 && bytes(&s["receiver"]) > 0, || {
            format!("{}: a stream carried nothing: {s}", client.label)
        });
    }
    let st = case.wait(&mut server, SERVER_WAIT);
    case.check(st.success(), || format!("iperf3 server exited with {st}"));
    let gbits = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    eprintln!(
        "[{}] {}: sent {sent}, received {received} bytes, {gbits:.1} Gbit/s",
        case.name, client.label
    );
    (
        server.who(),
        client.who(),
        if reverse { received } else { sent },
    )
}

fn iperf3_both_under_vmc(name: &'static str, extra: &[&str]) {
    program("iperf3");
    let case = Case::new(name);
    let (server, client, bytes) = iperf3_run(&case, Side::Vmc, Side::Vmc, extra);
    case.expect_accelerated(&[server, client.clone()]);
    case.expect_bulk_over_shm(&client, bytes);
}

#[test]
fn iperf3_forward_both_under_vmc() {
    iperf3_both_under_vmc("iperf3_forward", &[]);
}

#[test]
fn iperf3_reverse_both_under_vmc() {
    iperf3_both_under_vmc("iperf3_reverse", &["-R"]);
}

#[test]
fn iperf3_four_streams_both_under_vmc() {
    iperf3_both_under_vmc("iperf3_four_streams", &["-P", "4"]);
}

#[test]
fn iperf3_mixed_falls_back() {
    program("iperf3");
    let case = Case::new("iperf3_mixed");
    let (_, vmc_client, _) = iperf3_run(&case, Side::Plain, Side::Vmc, &["-P", "2"]);
    let (vmc_server, _, _) = iperf3_run(&case, Side::Vmc, Side::Plain, &["-R"]);
    case.expect_fallback(&[vmc_client, vmc_server]);
}

// ---------------------------------------------------------------------------------
// redis
// ---------------------------------------------------------------------------------

struct Redis {
    proc: Proc,
    port: String,
}

fn redis_server(case: &Case, side: Side) -> Redis {
    let port = free_port();
    let port_s = port.to_string();
    let mut proc = case.spawn(
        side,
        "redis-server",
        &program("redis-server"),
        &["--port", &port_s, "--save", "", "--appendonly", "no"],
        None,
    );
    case.wait_listening(&mut proc, port);
    Redis { proc, port: port_s }
}

/// Stops redis-server with SIGTERM (it shuts down and exits 0).
fn stop_redis(case: &Case, r: &mut Redis) {
    let st = case.stop(&mut r.proc, Signal::TERM);
    case.check(st.success(), || format!("redis-server exited with {st}"));
}

/// `redis-cli -h 127.0.0.1 -p PORT args`, which must succeed.
fn redis_cli(
    case: &Case,
    side: Side,
    r: &Redis,
    label: &str,
    args: &[&str],
    stdin: Option<&Path>,
) -> Done {
    let mut all = vec!["-h", "127.0.0.1", "-p", &r.port];
    all.extend_from_slice(args);
    // redis-cli exits 0 after an error reply too: callers compare the replies.
    case.run_ok(side, label, &program("redis-cli"), &all, stdin)
}

/// redis-benchmark with `extra` arguments; checks every test in `tests` printed its
/// requests per second and nothing printed an error. Returns the run.
fn redis_benchmark(case: &Case, side: Side, r: &Redis, tests: &[&str], extra: &[&str]) -> Done {
    let mut args = vec!["-h", "127.0.0.1", "-p", &r.port, "-c", "50", "-q"];
    let t = tests.join(",").to_lowercase();
    args.extend_from_slice(&["-t", &t]);
    args.extend_from_slice(extra);
    let label = format!("redis-benchmark {}", extra.join(" "));
    let d = case.run_ok(side, &label, &program("redis-benchmark"), &args, None);
    // Its errors go to stdout or stderr; stderr also holds vmc's log with VMC_LOG set.
    let mut text = d.out();
    if std::env::var_os("VMC_LOG").is_none() {
        text = format!("{text}\n{}", d.err());
    }
    let text = text.replace('\r', "\n");
    for l in text.lines() {
        if l.contains("Error") || l.contains("ERR") || l.contains("rror from server") {
            case.fail(format!("{label} reported an error: {l}"));
        }
    }
    for test in tests {
        let rps = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{test}: ")))
            .find(|l| l.contains("requests per second"))
            .and_then(|l| number_after(l, ""))
            .unwrap_or_else(|| case.fail(format!("{label}: no \"{test}: N requests per second\"")));
        case.check(rps > 0.0, || format!("{label}: {test} at {rps} requests/s"));
        eprintln!("[{}] {label}: {test} {rps} requests/s", case.name);
    }
    d
}

/// Writes known values with redis-cli and reads them back: a 1 MiB binary value
/// (`-x`), 300 keys of 1-3000 characters and a list (commands from stdin), 10000 keys
/// through `--pipe`. Returns the redis-cli runs.
fn redis_data_roundtrip(case: &Case, side: Side, r: &Redis) -> Vec<Who> {
    let mut who = Vec::new();
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);

    // 1 MiB of random bytes, through stdin.
    let big = noise.bytes(1 << 20);
    let big_file = case.write_file("big.bin", &big);
    let d = redis_cli(
        case,
        side,
        r,
        "redis-cli -x SET",
        &["-x", "SET", "big"],
        Some(&big_file),
    );
    case.check(d.out().trim() == "OK", || {
        format!("SET big replied {:?}", d.out())
    });
    who.push(d.who());
    // A PING first: redis answers on a non-blocking socket, which never waits for the
    // client's ACK, so a connection's first reply may go on TCP while the channel is
    // being set up (see MGET below). The client ACKs before it reads PONG, so the
    // megabyte that follows must go over shared memory.
    let get_big = case.write_file("get-big.txt", b"PING\nGET big\n");
    let d = redis_cli(
        case,
        side,
        r,
        "redis-cli GET big",
        &["--raw"],
        Some(&get_big),
    );
    who.push(d.who());
    let mut expected = b"PONG\n".to_vec();
    expected.extend_from_slice(&big);
    expected.push(b'\n');
    if d.stdout != expected {
        let at = d.stdout.iter().zip(&expected).position(|(a, b)| a != b);
        case.fail(format!(
            "GET big returned {} bytes, expected {} (the value plus a newline); first \
             difference at {at:?}",
            d.stdout.len(),
            expected.len()
        ));
    }

    // 300 keys and a list, one command per line.
    let values: Vec<String> = (0..300).map(|i| noise.word(1 + (i * 997) % 3000)).collect();
    let mut set = String::new();
    let mut get = String::new();
    let mut expect_get = String::new();
    for (i, v) in values.iter().enumerate() {
        let _ = writeln!(set, "SET key:{i} {v}");
        let _ = writeln!(get, "GET key:{i}");
        let _ = writeln!(expect_get, "{v}");
    }
    let items: Vec<String> = (0..20)
        .map(|i| format!("item-{i}-{}", noise.word(8)))
        .collect();
    let _ = writeln!(set, "LPUSH list {}", items.join(" "));
    let _ = writeln!(get, "LRANGE list 0 -1");
    for item in items.iter().rev() {
        let _ = writeln!(expect_get, "{item}");
    }
    let set_file = case.write_file("set.txt", set.as_bytes());
    let get_file = case.write_file("get.txt", get.as_bytes());
    let d = redis_cli(
        case,
        side,
        r,
        "redis-cli SET x300 LPUSH",
        &["--raw"],
        Some(&set_file),
    );
    who.push(d.who());
    let expect_set = format!("{}{}\n", "OK\n".repeat(values.len()), items.len());
    case.check(d.out() == expect_set, || {
        format!(
            "300 SETs and an LPUSH replied {:?}...",
            &d.out()[..d.out().len().min(200)]
        )
    });
    let d = redis_cli(
        case,
        side,
        r,
        "redis-cli GET x300 LRANGE",
        &["--raw"],
        Some(&get_file),
    );
    who.push(d.who());
    if d.out() != expect_get {
        let got = d.out();
        let bad = got
            .lines()
            .zip(expect_get.lines())
            .position(|(a, b)| a != b);
        case.fail(format!(
            "reading back 300 keys and the list: {} lines, expected {}; first different \
             line: {bad:?}",
            got.lines().count(),
            expect_get.lines().count()
        ));
    }

    // 10000 SETs in the protocol, through --pipe.
    let mut proto = Vec::new();
    for i in 0..10_000u64 {
        let (k, v) = (format!("pipe:{i}"), (i * i).to_string());
        let _ = write!(
            proto,
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        );
    }
    let proto_file = case.write_file("pipe.resp", &proto);
    let d = redis_cli(
        case,
        side,
        r,
        "redis-cli --pipe",
        &["--pipe"],
        Some(&proto_file),
    );
    who.push(d.who());
    case.check(d.out().contains("errors: 0, replies: 10000"), || {
        format!("redis-cli --pipe said {:?}", d.out())
    });
    let d = redis_cli(
        case,
        side,
        r,
        "redis-cli MGET",
        &["--raw", "MGET", "pipe:0", "pipe:1234", "pipe:9999", "key:7"],
        None,
    );
    // One command and its short reply: the reply goes on TCP while the channel is
    // set up (the accepting side offers it when the command arrives), so this
    // client is checked for its data only.
    let expect = format!("0\n1522756\n99980001\n{}\n", values[7]);
    case.check(d.out() == expect, || format!("MGET returned {:?}", d.out()));
    who
}

#[test]
fn redis_both_under_vmc() {
    for p in ["redis-server", "redis-benchmark", "redis-cli"] {
        program(p);
    }
    let case = Case::new("redis");
    let mut r = redis_server(&case, Side::Vmc);
    let mut who = vec![r.proc.who()];
    let tests = ["SET", "GET", "LPUSH"];
    who.push(redis_benchmark(&case, Side::Vmc, &r, &tests, &["-n", "50000"]).who());
    who.push(redis_benchmark(&case, Side::Vmc, &r, &tests, &["-n", "100000", "-P", "16"]).who());
    // A new connection for every request (-k 0): channels set up and torn down
    // 3000 times in a row between the same two processes (spare segments reused).
    let short = ["-n", "3000", "-c", "1", "-k", "0"];
    who.push(redis_benchmark(&case, Side::Vmc, &r, &["LPUSH"], &short).who());
    // Every LPUSH of the benchmarks added one element to "mylist".
    let d = redis_cli(
        &case,
        Side::Vmc,
        &r,
        "redis-cli LLEN",
        &["LLEN", "mylist"],
        None,
    );
    case.check(d.out().trim() == "153000", || {
        format!(
            "LLEN mylist = {:?} after 50000 + 100000 + 3000 LPUSHes",
            d.out().trim()
        )
    });
    // (One command, one short reply: checked for its data only, see MGET.)
    who.extend(redis_data_roundtrip(&case, Side::Vmc, &r));
    stop_redis(&case, &mut r);
    case.expect_accelerated(&who);
}

#[test]
fn redis_mixed_falls_back() {
    for p in ["redis-server", "redis-benchmark", "redis-cli"] {
        program(p);
    }
    let case = Case::new("redis_mixed");
    let tests = ["SET", "GET"];
    // Plain server, clients under vmc.
    let mut r = redis_server(&case, Side::Plain);
    let mut who = vec![redis_benchmark(&case, Side::Vmc, &r, &tests, &["-n", "20000"]).who()];
    who.extend(redis_data_roundtrip(&case, Side::Vmc, &r));
    stop_redis(&case, &mut r);
    // Server under vmc, plain clients (non-blocking connects, epoll on both sides).
    let mut r = redis_server(&case, Side::Vmc);
    redis_benchmark(&case, Side::Plain, &r, &tests, &["-n", "20000", "-P", "16"]);
    redis_data_roundtrip(&case, Side::Plain, &r);
    stop_redis(&case, &mut r);
    who.push(r.proc.who());
    case.expect_fallback(&who);
}

// ---------------------------------------------------------------------------------
// curl and python3 -m http.server
// ---------------------------------------------------------------------------------

/// Compares two files; returns the first differing offset, if any.
fn first_difference(a: &Path, b: &Path) -> std::io::Result<Option<u64>> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < la.min(lb) {
        let n = ((la.min(lb) - offset) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(offset + i as u64));
        }
        offset += n as u64;
    }
    Ok((la != lb).then_some(offset))
}

/// python3's http.server serving a 100 MiB random file, curl downloading it; the
/// download must equal the file. Returns the server and curl.
fn http_download(case: &Case, server_side: Side, client_side: Side) -> (Option<Who>, Who) {
    let www = case.path("www");
    fs::create_dir(&www).expect("create the served directory");
    let file = www.join("file");
    {
        let mut w = BufWriter::new(File::create(&file).expect("create the served file"));
        let mut noise = Noise(0x0123_4567_89ab_cdef);
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..HTTP_FILE_BYTES >> 20 {
            noise.fill(&mut chunk);
            w.write_all(&chunk).expect("write the served file");
        }
        w.flush().expect("write the served file");
    }
    let port = free_port();
    let port_s = port.to_string();
    let mut server = case.spawn(
        server_side,
        "python3 http.server",
        &python3(),
        &[
            "-m",
            "http.server",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--directory",
            www.to_str().unwrap(),
        ],
        None,
    );
    case.wait_listening(&mut server, port);
    let out = case.path("download");
    let url = format!("http://127.0.0.1:{port}/file");
    let started = Instant::now();
    let curl = case.run_ok(
        client_side,
        "curl",
        &program("curl"),
        &[
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            "--max-time",
            "50",
            "-o",
            out.to_str().unwrap(),
            &url,
        ],
        None,
    );
    let took = started.elapsed();
    match first_difference(&file, &out) {
        Ok(None) => {}
        Ok(Some(at)) => case.fail(format!(
            "the download differs from the served file ({} vs {} bytes), first at byte {at}",
            fs::metadata(&out).map_or(0, |m| m.len()),
            HTTP_FILE_BYTES
        )),
        Err(e) => case.fail(format!("cannot compare the download: {e}")),
    }
    eprintln!(
        "[{}] curl: {HTTP_FILE_BYTES} bytes identical, {:.0} MB/s",
        case.name,
        HTTP_FILE_BYTES as f64 / took.as_secs_f64() / 1e6
    );
    // SIGINT: KeyboardInterrupt, then a normal exit (SIGTERM would kill python
    // without running exit handlers). Unless SIGINT is ignored here, and so in the
    // child: then python cannot be stopped gracefully and writes no report.
    let server_who = if sigint_ignored() {
        eprintln!(
            "[{}] note: SIGINT is ignored in this process, so python3 would ignore it \
             too: stopping it with SIGTERM, without its report",
            case.name
        );
        case.stop(&mut server, Signal::TERM);
        None
    } else {
        let st = case.stop(&mut server, Signal::INT);
        case.check(st.success(), || {
            format!("python3 http.server exited with {st}")
        });
        Some(server.who())
    };
    (server_who, curl.who())
}

#[test]
fn http_download_both_under_vmc() {
    program("curl");
    python3();
    let case = Case::new("http_download");
    let (server, curl) = http_download(&case, Side::Vmc, Side::Vmc);
    let mut who = vec![curl.clone()];
    who.extend(server);
    case.expect_accelerated(&who);
    case.expect_bulk_over_shm(&curl, HTTP_FILE_BYTES);
}

#[test]
fn http_download_mixed_falls_back() {
    program("curl");
    python3();
    let case = Case::new("http_download_mixed");
    let (server, _) = http_download(&case, Side::Vmc, Side::Plain);
    case.expect_fallback(&server.into_iter().collect::<Vec<_>>());
}

/// An inetd-style server: accepts one connection, exchanges a greeting with the
/// client (so the connection is accelerated), then forks a child that makes the
/// connection its stdin and stdout and execs `cat` (once the client says, through
/// the FIFO `argv[2]`, that it put bytes on the ring); the parent closes its copy.
const EXEC_SERVER_PY: &str = r#"
import os, socket, sys
filled = sys.argv[2]
os.mkfifo(filled)
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(8)
c, _ = l.accept()
assert c.recv(5, socket.MSG_WAITALL) == b"hello"
c.sendall(b"ready")
pid = os.fork()
if pid == 0:
    # Bytes on the ring first: those must reach cat too.
    with open(filled, "rb") as f:
        assert f.read(1) == b"x", "the client did not say it filled the ring"
    os.dup2(c.fileno(), 0)
    os.dup2(c.fileno(), 1)
    c.close()
    l.close()
    os.execvp("cat", ["cat"])
c.close()
_, st = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(st))
"#;

/// Its client: the greeting, then `n` bytes sent (from a thread) while the echo is
/// read back and compared. Once the first 96 KiB are sent (on the ring, which holds
/// 128 KiB and nobody reads yet), it tells the server through the FIFO `argv[3]`.
const EXEC_CLIENT_PY: &str = r#"
import socket, sys, threading
port, n, filled = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"hello")
assert s.recv(5, socket.MSG_WAITALL) == b"ready"
block = bytes((i * 7 + i // 251) & 255 for i in range(1 << 20))
def send():
    first = 96 << 10
    s.sendall(block[:first])
    with open(filled, "wb") as f:
        f.write(b"x")
    s.sendall(block[first:])
    for _ in range((n >> 20) - 1):
        s.sendall(block)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
got, bad = 0, 0
pending = b""
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    pending += b
    while len(pending) >= len(block):
        bad += pending[:len(block)] != block
        pending = pending[len(block):]
        got += len(block)
t.join()
got += len(pending)
print(f"echoed {got} bad_blocks {bad} tail {len(pending)}")
"#;

/// exec in the middle of an accelerated connection, with real programs: python
/// hands the connection to `cat` (fork, dup2, exec) and `cat` echoes 32 MiB. Before
/// the exec vmc moves the connection to TCP for good; the bytes the client had
/// already put on the ring reach `cat` all the same.
#[test]
fn exec_hands_an_accelerated_connection_to_cat() {
    program("cat");
    python3();
    let case = Case::new("exec_cat");
    let server_py = case.write_file("server.py", EXEC_SERVER_PY.as_bytes());
    let client_py = case.write_file("client.py", EXEC_CLIENT_PY.as_bytes());
    let port = free_port();
    let port_s = port.to_string();
    let bytes: u64 = 32 << 20;
    // The server makes it before it listens; the client writes a byte to it.
    let filled = case.path("filled.fifo");
    let filled = filled.to_str().unwrap();
    let mut server = case.spawn(
        Side::Vmc,
        "python3 server (exec cat)",
        &python3(),
        &[server_py.to_str().unwrap(), &port_s, filled],
        None,
    );
    case.wait_listening(&mut server, port);
    let client = case.run_ok(
        Side::Vmc,
        "python3 client",
        &python3(),
        &[
            client_py.to_str().unwrap(),
            &port_s,
            &bytes.to_string(),
            filled,
        ],
        None,
    );
    let out = client.out();
    case.check(
        out.trim() == format!("echoed {bytes} bad_blocks 0 tail 0"),
        || format!("the echo is not what was sent: {out:?}"),
    );
    let st = case.wait(&mut server, SERVER_WAIT);
    case.check(st.success(), || format!("the server exited with {st}"));
    // The connection was accelerated when the exec came, and the client had put at
    // least 96 KiB on the ring (128 KiB) by then: those bytes were sent again on TCP.
    case.expect_accelerated(&[client.who()]);
    let r = case
        .report_of(client.pid)
        .ok()
        .flatten()
        .unwrap_or_default();
    case.check(field(&r, "shm_out") > 64 << 10, || {
        format!("the client should have had bytes on the ring at the exec: {r}")
    });
}

/// A server for `closing_descriptors_it_does_not_own`: echoes one message on each of
/// `n` connections, one after the other, then exits.
const ECHO_N_SERVER_PY: &str = echo_py!(
    r#"
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(8)
for _ in range(int(sys.argv[2])):
    c, _ = l.accept()
    echo(c)
"#
);

/// Its client: short connections, then it closes descriptors it did not open (vmc's
/// memfds and eventfds, as a loop closing "everything but mine" would), opens files
/// under the freed numbers, makes more connections and checks its files were not
/// touched: what vmc kept between connections under those numbers (spare channels,
/// its thread's bell) must be forgotten, never written, read or closed. Then
/// closerange over everything, which closes around vmc's own descriptors (the
/// program would not have had those numbers without vmc): vmc keeps working.
const CLOSERANGE_CLIENT_PY: &str = r#"
import os, socket, sys
port, rounds, d = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
seq = 0
def rt():
    global seq
    seq += 1
    s = socket.create_connection(("127.0.0.1", port))
    # Two round trips: the first goes on TCP while the channel is set up.
    for k in range(2):
        msg = b"m%05d-%d" % (seq, k)
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            part = s.recv(64)
            assert part, "EOF before the echo"
            got += part
        assert got == msg, (got, msg)
    s.close()
def vmc_kept():
    # vmc hides its own from listings of /proc/self/fd: probe the numbers.
    fds = []
    for fd in range(3, 4096):
        try:
            link = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            continue
        if "eventfd" in link or "vmc-channel" in link:
            fds.append(fd)
    return fds
files = []
def take_numbers(tag):
    for k in range(48):
        f = os.open(os.path.join(d, "%s%d" % (tag, k)), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(f, b"file %s %d\n" % (tag.encode(), k))
        files.append((f, b"file %s %d\n" % (tag.encode(), k)))
for _ in range(rounds):
    rt()
kept = vmc_kept()
for fd in kept:
    os.close(fd)
take_numbers("a")
for _ in range(rounds):
    rt()
os.closerange(3, 65536)
files.clear()
take_numbers("b")
for _ in range(rounds):
    rt()
bad = []
for f, want in files:
    os.lseek(f, 0, 0)
    if os.read(f, 100) != want or os.fstat(f).st_size != len(want):
        bad.append(f)
print("closed %s; files changed: %s" % ("some" if kept else "none", bad))
"#;

#[test]
fn closing_descriptors_it_does_not_own() {
    python3();
    let case = Case::new("closerange");
    let server_py = case.write_file("server.py", ECHO_N_SERVER_PY.as_bytes());
    let client_py = case.write_file("client.py", CLOSERANGE_CLIENT_PY.as_bytes());
    let files = case.path("files");
    fs::create_dir_all(&files).expect("a directory for the client's files");
    let port = free_port();
    let port_s = port.to_string();
    let rounds = 20;
    let mut server = case.spawn(
        Side::Vmc,
        "python3 echo server",
        &python3(),
        &[
            server_py.to_str().unwrap(),
            &port_s,
            &(3 * rounds).to_string(),
        ],
        None,
    );
    case.wait_listening(&mut server, port);
    let client = case.run_ok(
        Side::Vmc,
        "python3 client (closing vmc's descriptors)",
        &python3(),
        &[
            client_py.to_str().unwrap(),
            &port_s,
            &rounds.to_string(),
            files.to_str().unwrap(),
        ],
        None,
    );
    let out = client.out();
    case.check(out.trim() == "closed some; files changed: []", || {
        format!("the client's files or echoes are wrong: {out:?}")
    });
    let st = case.wait(&mut server, SERVER_WAIT);
    case.check(st.success(), || format!("the server exited with {st}"));
    // vmc's descriptors survived the closerange: both ends stay accelerated.
    case.expect_accelerated(&[server.who(), client.who()]);
}

/// A process whose hard open-files limit is below vmc's base cannot hide vmc's
/// descriptors: its connections stay plain TCP, counted as such, with every echo
/// and every descriptor number as without vmc.
#[test]
fn a_hard_limit_below_the_base_falls_back_to_plain_tcp() {
    python3();
    let case = Case::new("hardlimit");
    let server_py = case.write_file("server.py", ECHO_MANY_SERVER_PY.as_bytes());
    let client_py = case.write_file("client.py", DESCRIPTOR_CLIENT_PY.as_bytes());
    let n = 50;
    let port = free_port();
    let mut server = case.spawn(
        Side::Vmc,
        "python3 epoll echo server",
        &python3(),
        &[
            server_py.to_str().unwrap(),
            &port.to_string(),
            &(2 * n).to_string(),
        ],
        None,
    );
    case.wait_listening(&mut server, port);
    let script = format!(
        "ulimit -n 900 && exec {} {} {port} {n}",
        python3().display(),
        client_py.display()
    );
    let args = ["-c", script.as_str()];
    let sh = Path::new("/bin/sh");
    let plain = case.run_ok(Side::Plain, "plain client", sh, &args, None);
    let vmc = case.run_ok(
        Side::Vmc,
        "client under vmc, hard limit 900",
        sh,
        &args,
        None,
    );
    let (plain, vmc_out) = (plain.out(), vmc.out());
    case.check(plain.contains(&format!("{n} echoes checked")), || {
        format!("the plain client did not finish: {plain:?}")
    });
    case.check(plain == vmc_out, || {
        format!("output differs:\n plain: {plain}\n vmc:   {vmc_out}")
    });
    let st = case.wait(&mut server, SERVER_WAIT);
    case.check(st.success(), || format!("the server exited with {st}"));
    let report = case.report_of(vmc.pid).ok().flatten().unwrap_or_default();
    case.check(
        field(&report, "accelerated") == 0 && field(&report, "plain") == n,
        || format!("expected {n} plain connections and none accelerated: {report}"),
    );
}

/// A server for [`DESCRIPTOR_CLIENT_PY`]: accepts every connection on one epoll
/// loop, echoes, and exits once `argv[2]` connections have come and gone.
const ECHO_MANY_SERVER_PY: &str = r#"
import selectors, socket, sys
sel = selectors.DefaultSelector()
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(1024)
sel.register(l, selectors.EVENT_READ)
left = int(sys.argv[2])
while left:
    for k, _ in sel.select():
        if k.fileobj is l:
            c, _ = l.accept()
            sel.register(c, selectors.EVENT_READ)
            continue
        d = k.fileobj.recv(65536)
        if d:
            k.fileobj.sendall(d)
        else:
            sel.unregister(k.fileobj)
            k.fileobj.close()
            left -= 1
"#;

/// Opens `argv[2]` connections (and a file and a duplicate every tenth), prints
/// every descriptor number it got, then sends one message on each and waits for
/// the echoes with `select()`, which only takes numbers below 1024.
const DESCRIPTOR_CLIENT_PY: &str = r#"
import os, select, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
socks, seen = [], []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    socks.append(s)
    seen.append(s.fileno())
    if i % 10 == 0:
        f = open("/dev/null")
        seen.append(f.fileno())
        f.close()
        d = os.dup(s.fileno())
        seen.append(d)
        os.close(d)
for i, s in enumerate(socks):
    s.sendall(b"%05d" % i)
pending = dict((s, b"%05d" % i) for i, s in enumerate(socks))
while pending:
    ready, _, _ = select.select(list(pending), [], [], 20)
    assert ready, "select timed out"
    for s in ready:
        got = s.recv(5)
        assert got == pending.pop(s), got
print(" ".join(map(str, seen)))
print("highest %d, %d echoes checked" % (max(seen), n))
"#;

/// The program sees the descriptor numbers it would see without vmc: a client
/// under vmc run, whose 300 connections are all accelerated, prints the same
/// numbers as the same client run plainly (both with a soft open-files limit of
/// 512, below vmc's 1024), and its select() over them works
/// (before vmc kept its descriptors out of the way, 100 connections took the
/// client to number 701, and 300 overflowed select's 1024).
#[test]
fn descriptor_numbers_are_the_programs_own() {
    python3();
    let case = Case::new("fdnumbers");
    let server_py = case.write_file("server.py", ECHO_MANY_SERVER_PY.as_bytes());
    let client_py = case.write_file("client.py", DESCRIPTOR_CLIENT_PY.as_bytes());
    let n = 300;
    let port = free_port();
    let port_s = port.to_string();
    let mut server = case.spawn(
        Side::Vmc,
        "python3 epoll echo server",
        &python3(),
        &[server_py.to_str().unwrap(), &port_s, &(2 * n).to_string()],
        None,
    );
    case.wait_listening(&mut server, port);
    // Under a soft open-files limit of 512 the program lowered itself: vmc lifts
    // it for each of its own descriptors and puts it back.
    let script = format!(
        "ulimit -Sn 512 && exec {} {} {port} {n}",
        python3().display(),
        client_py.display()
    );
    let args = ["-c", script.as_str()];
    let sh = Path::new("/bin/sh");
    let plain = case.run_ok(Side::Plain, "plain client", sh, &args, None);
    let vmc = case.run_ok(Side::Vmc, "client under vmc", sh, &args, None);
    let (plain, vmc_out) = (plain.out(), vmc.out());
    case.check(plain.contains(&format!("{n} echoes checked")), || {
        format!("the plain client did not finish: {plain:?}")
    });
    case.check(plain == vmc_out, || {
        format!("descriptor numbers differ:\n plain: {plain}\n vmc:   {vmc_out}")
    });
    let st = case.wait(&mut server, SERVER_WAIT);
    case.check(st.success(), || format!("the server exited with {st}"));
    case.expect_accelerated(&[vmc.who()]);
}

/// A keep-alive HTTP server on one epoll loop: every request gets the same 4 KiB
/// body (pipelined requests each get theirs).
const HTTP_4K_SERVER_PY: &str = r#"
import selectors, socket, sys
body = bytes((i * 7) % 251 for i in range(4096))
resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n" % len(body) + body
sel = selectors.DefaultSelector()
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(1024)
l.setblocking(False)
sel.register(l, selectors.EVENT_READ)
pending = {}
while True:
    for k, _ in sel.select():
        s = k.fileobj
        if s is l:
            try:
                c, _ = l.accept()
            except BlockingIOError:
                continue
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            pending[c] = b""
            continue
        try:
            d = s.recv(65536)
        except (BlockingIOError, InterruptedError):
            continue
        except ConnectionError:
            d = b""
        if not d:
            sel.unregister(s)
            pending.pop(s, None)
            s.close()
            continue
        b = pending[s] + d
        n = b.count(b"\r\n\r\n")
        pending[s] = b[b.rfind(b"\r\n\r\n") + 4:] if n else b
        if n:
            s.setblocking(True)
            s.sendall(resp * n)
            s.setblocking(False)
"#;

/// The HTTP response of [`HTTP_4K_SERVER_PY`], in bytes.
const HTTP_4K_RESPONSE: f64 = 4096.0 + 81.0;

/// wrk sizes its event table for the connections it opens (10 + 3 per connection)
/// and counts a descriptor beyond it as a failed connect: under vmc, before vmc's
/// descriptors moved out of the way, 20 connections already overflowed it. Here 200
/// connections, under a soft open-files limit of 1024 (so that vmc has to lift
/// the limit for each of its descriptors), must give no socket error, only 2xx
/// answers of the right size, and all be accelerated.
#[test]
fn wrk_with_200_connections_sees_no_socket_errors() {
    let wrk = program("wrk");
    python3();
    let case = Case::new("wrk200");
    let server_py = case.write_file("server.py", HTTP_4K_SERVER_PY.as_bytes());
    let port = free_port();
    let port_s = port.to_string();
    let mut server = case.spawn(
        Side::Vmc,
        "python3 HTTP server",
        &python3(),
        &[server_py.to_str().unwrap(), &port_s],
        None,
    );
    case.wait_listening(&mut server, port);
    let script = format!(
        "ulimit -Sn 1024 && exec {} -t2 -c200 -d2s http://127.0.0.1:{port}/",
        wrk.display()
    );
    let run = case.run_ok(
        Side::Vmc,
        "wrk -t2 -c200",
        Path::new("/bin/sh"),
        &["-c", &script],
        None,
    );
    let out = run.out();
    case.check(
        !out.contains("Socket errors") && !out.contains("Non-2xx"),
        || format!("wrk saw errors:\n{out}"),
    );
    // "N requests in Xs, Y.YYMB read": every response whole.
    let line = out
        .lines()
        .find(|l| l.contains("requests in"))
        .unwrap_or("");
    let words: Vec<&str> = line.split_whitespace().collect();
    let requests: f64 = words.first().and_then(|w| w.parse().ok()).unwrap_or(0.0);
    let read = words.get(4).copied().unwrap_or("");
    let mib = |suffix: &str, scale: f64| {
        read.strip_suffix(suffix)?
            .parse::<f64>()
            .ok()
            .map(|v| v * scale)
    };
    let bytes = mib("GB", 1024.0 * 1024.0 * 1024.0)
        .or_else(|| mib("MB", 1024.0 * 1024.0))
        .or_else(|| mib("KB", 1024.0))
        .unwrap_or(0.0);
    case.check(requests > 1000.0, || {
        format!("wrk made few requests:\n{out}")
    });
    let per = bytes / requests.max(1.0);
    case.check((per / HTTP_4K_RESPONSE - 1.0).abs() < 0.01, || {
        format!("{per:.0} bytes read per request, not {HTTP_4K_RESPONSE}:\n{out}")
    });
    case.stop(&mut server, Signal::TERM);
    case.expect_accelerated(&[run.who()]);
}

/// socketserver.ForkingTCPServer echo: a process forked per connection, which
/// serves it and ends with `os._exit`.
const FORKING_ECHO_SERVER_PY: &str = r#"
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(65536)
            if not d:
                return
            self.request.sendall(d)
class Server(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = 64
Server(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"#;

/// `argv[2]` connections, each with `argv[3]` random messages of 1 to 4000 bytes,
/// every echo checked.
const ECHO_ROUNDS_CLIENT_PY: &str = r#"
import os, random, socket, sys
port, conns, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(9)
checked = 0
for c in range(conns):
    s = socket.create_connection(("127.0.0.1", port))
    for r in range(rounds):
        msg = rng.randbytes(rng.randint(1, 4000))
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            part = s.recv(65536)
            assert part, "EOF before the echo"
            got += part
        assert got == msg, "echo differs"
        checked += 1
    s.close()
print("%d echoes checked" % checked)
"#;

/// A fork-per-connection server under vmc: its forked children serve accelerated
/// connections to clients under vmc, and plain ones to plain clients, every echo
/// checked.
#[test]
fn forking_tcp_server_serves_vmc_and_plain_clients() {
    python3();
    let case = Case::new("forking");
    let server_py = case.write_file("server.py", FORKING_ECHO_SERVER_PY.as_bytes());
    let client_py = case.write_file("client.py", ECHO_ROUNDS_CLIENT_PY.as_bytes());
    let port = free_port();
    let port_s = port.to_string();
    let mut server = case.spawn(
        Side::Vmc,
        "python3 ForkingTCPServer",
        &python3(),
        &[server_py.to_str().unwrap(), &port_s],
        None,
    );
    case.wait_listening(&mut server, port);
    let args = [client_py.to_str().unwrap(), &port_s, "50", "20"];
    let vmc = case.run_ok(Side::Vmc, "client under vmc", &python3(), &args, None);
    let plain = case.run_ok(Side::Plain, "plain client", &python3(), &args, None);
    for (who, d) in [("vmc", &vmc), ("plain", &plain)] {
        let out = d.out();
        case.check(out.trim() == "1000 echoes checked", || {
            format!("the {who} client's echoes: {out:?}")
        });
    }
    case.stop(&mut server, Signal::TERM);
    case.expect_accelerated(&[vmc.who()]);
}

/// A pre-forking server: the master listens, forks `argv[2]` workers that each
/// accept and echo, and waits for SIGTERM, then ends them.
const PREFORK_ECHO_SERVER_PY: &str = echo_py!(
    r#"
import os, signal, socket, sys
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(128)
kids = []
for w in range(int(sys.argv[2])):
    pid = os.fork()
    if pid == 0:
        while True:
            c, _ = l.accept()
            echo(c)
    kids.append(pid)
signal.sigwait([signal.SIGTERM])
for k in kids:
    os.kill(k, signal.SIGKILL)
    os.waitpid(k, 0)
"#
);

/// Its client: `argv[2]` threads at once, each making `argv[3]` connections one
/// after another with `argv[4]` checked echoes on each; so that workers race to
/// accept.
const PARALLEL_ECHO_CLIENT_PY: &str = r#"
import random, socket, sys, threading
port, threads, conns, rounds = (int(a) for a in sys.argv[1:5])
checked = [0] * threads
def run(t):
    rng = random.Random(t)
    for c in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        for r in range(rounds):
            msg = rng.randbytes(rng.randint(1, 4000))
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                part = s.recv(65536)
                assert part, "EOF before the echo"
                got += part
            assert got == msg, "echo differs"
            checked[t] += 1
        s.close()
ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print("%d echoes checked" % sum(checked))
"#;

/// The master/worker model: the master registered the listener, its forked workers
/// race to accept, and the worker that accepted a connection completes its
/// handshake (it calls the client's offer socket, see vmc_conn's handshake): every
/// connection accelerated, with 6 clients at once on 3 workers.
#[test]
fn preforked_workers_accept_accelerated_connections() {
    python3();
    let case = Case::new("prefork");
    let server_py = case.write_file("server.py", PREFORK_ECHO_SERVER_PY.as_bytes());
    let client_py = case.write_file("client.py", PARALLEL_ECHO_CLIENT_PY.as_bytes());
    let port = free_port();
    let port_s = port.to_string();
    let mut server = case.spawn(
        Side::Vmc,
        "python3 pre-forking server, 3 workers",
        &python3(),
        &[server_py.to_str().unwrap(), &port_s, "3"],
        None,
    );
    case.wait_listening(&mut server, port);
    let args = [client_py.to_str().unwrap(), &port_s, "6", "10", "10"];
    let vmc = case.run_ok(
        Side::Vmc,
        "6 client threads under vmc",
        &python3(),
        &args,
        None,
    );
    let out = vmc.out();
    case.check(out.trim() == "600 echoes checked", || {
        format!("the client's echoes: {out:?}")
    });
    let st = case.stop(&mut server, Signal::TERM);
    case.check(st.success(), || format!("the server exited with {st}"));
    case.expect_accelerated(&[vmc.who()]);
    let report = case.report_of(vmc.pid).ok().flatten().unwrap_or_default();
    case.check(field(&report, "plain") == 0, || {
        format!("some connections stayed plain: {report}")
    });
}

/// A launcher that does not run vmc (as systemd does for socket activation): it
/// listens, puts the listening socket at descriptor 3 and execs `argv[2:]`, which
/// serves on it.
const ACTIVATION_LAUNCHER_PY: &str = r#"
import os, socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(64)
if l.fileno() != 3:
    os.dup2(l.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.argv[2], sys.argv[2:])
"#;

/// A socket-activated echo server: it never calls `listen` itself; it accepts
/// `argv[1]` connections on descriptor 3 and echoes each until it closes.
const ACTIVATED_SERVER_PY: &str = echo_py!(
    r#"
import os, socket, sys
assert os.environ.get("LISTEN_FDS") == "1"
l = socket.socket(fileno=3)
for _ in range(int(sys.argv[1])):
    c, _ = l.accept()
    echo(c)
"#
);

/// Socket activation: the server under `vmc run` got its listening socket from a
/// launcher without vmc and never called `listen`. vmc registers the listener at
/// its first accept; every connection after the first is accelerated, every echo
/// checked.
#[test]
fn a_socket_activated_server_is_accelerated_after_its_first_accept() {
    python3();
    let case = Case::new("activation");
    let launcher = case.write_file("launcher.py", ACTIVATION_LAUNCHER_PY.as_bytes());
    let server_py = case.write_file("server.py", ACTIVATED_SERVER_PY.as_bytes());
    let client_py = case.write_file("client.py", ECHO_ROUNDS_CLIENT_PY.as_bytes());
    let port = free_port();
    let port_s = port.to_string();
    let conns = 10;
    let conns_s = conns.to_string();
    let python = python3();
    let vmc = vmc_bin();
    let mut server = case.spawn(
        Side::Plain,
        "launcher (plain) exec'ing vmc run -- python3 server",
        &python,
        &[
            launcher.to_str().unwrap(),
            &port_s,
            vmc.to_str().unwrap(),
            "run",
            "--",
            python.to_str().unwrap(),
            server_py.to_str().unwrap(),
            &conns_s,
        ],
        None,
    );
    case.wait_listening(&mut server, port);
    let args = [client_py.to_str().unwrap(), &port_s, &conns_s, "10"];
    let client = case.run_ok(Side::Vmc, "client under vmc", &python, &args, None);
    let out = client.out();
    case.check(out.trim() == "100 echoes checked", || {
        format!("the client's echoes: {out:?}")
    });
    let st = case.wait(&mut server, SERVER_WAIT);
    case.check(st.success(), || format!("the server exited with {st}"));
    let report = case
        .report_of(client.pid)
        .ok()
        .flatten()
        .unwrap_or_default();
    case.check(field(&report, "accelerated") >= conns - 1, || {
        format!("only the first connection may stay plain: {report}")
    });
}

/// An echo server in a `SO_REUSEPORT` group: it binds the shared port and echoes
/// the connections the kernel gives it until SIGTERM, then prints how many.
const REUSEPORT_SERVER_PY: &str = echo_py!(
    r#"
import signal, socket, sys
served = 0
def stop(*_):
    print("served %d" % served, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(64)
print("listening", flush=True)
while True:
    c, _ = l.accept()
    echo(c)
    served += 1
"#
);

/// Two processes share a port with `SO_REUSEPORT`, each its own listener and
/// registry entry; the kernel picks which one accepts each connection, whatever
/// entry the client found. Every connection is accelerated and both serve some.
#[test]
fn reuseport_groups_accelerate_whichever_process_accepts() {
    python3();
    let case = Case::new("reuseport");
    let server_py = case.write_file("server.py", REUSEPORT_SERVER_PY.as_bytes());
    let client_py = case.write_file("client.py", ECHO_ROUNDS_CLIENT_PY.as_bytes());
    let port = free_port();
    let port_s = port.to_string();
    let python = python3();
    let mut servers: Vec<Proc> = (0..2)
        .map(|i| {
            let mut s = case.spawn(
                Side::Vmc,
                &format!("python3 SO_REUSEPORT server {i}"),
                &python,
                &[server_py.to_str().unwrap(), &port_s],
                None,
            );
            case.wait_listening(&mut s, port);
            s
        })
        .collect();
    // Both bound: each printed "listening" (the port answered after the first).
    for s in &servers {
        let deadline = Instant::now() + SERVER_WAIT;
        while !case.stdout_of(s).contains("listening") {
            case.check(Instant::now() < deadline, || {
                format!("{} did not start listening", s.label)
            });
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let args = [client_py.to_str().unwrap(), &port_s, "40", "5"];
    let client = case.run_ok(Side::Vmc, "client under vmc", &python, &args, None);
    let out = client.out();
    case.check(out.trim() == "200 echoes checked", || {
        format!("the client's echoes: {out:?}")
    });
    let mut served = Vec::new();
    for s in &mut servers {
        let st = case.stop(s, Signal::TERM);
        case.check(st.success(), || format!("{} exited with {st}", s.label));
        let out = case.stdout_of(s);
        let n: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("served "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        served.push(n);
    }
    case.check(served.iter().all(|&n| n > 0), || {
        format!("both members must serve some connections: {served:?}")
    });
    let report = case
        .report_of(client.pid)
        .ok()
        .flatten()
        .unwrap_or_default();
    case.check(field(&report, "plain") == 0, || {
        format!("some connections stayed plain: {report}")
    });
    case.expect_accelerated(&[client.who()]);
}

/// An echo server that becomes another user (`argv[3]`) before it listens, with
/// vmc's default (per-user) registry: it registers and publishes as that user.
const SETUID_BEFORE_LISTEN_SERVER_PY: &str = echo_py!(
    r#"
import os, socket, sys
port, n, uid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
os.environ.pop("VMC_REGISTRY_DIR", None)  # the new user's own, by default
os.setgid(uid)
os.setuid(uid)
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port))
l.listen(16)
for _ in range(n):
    c, _ = l.accept()
    echo(c)
"#
);

/// A master that listens as root and forks a worker that becomes another user
/// (`argv[3]`) and then accepts: Apache's and nginx's way.
const SETUID_AFTER_LISTEN_SERVER_PY: &str = echo_py!(
    r#"
import os, socket, sys
port, n, uid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port))
l.listen(16)
pid = os.fork()
if pid == 0:
    os.setgid(uid)
    os.setuid(uid)
    for _ in range(n):
        c, _ = l.accept()
        echo(c)
    os._exit(0)
_, st = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(st))
"#
);

/// Servers that run as another user than their (root) client, both under vmc:
/// one that drops to `nobody` before listening, and a root master whose worker
/// drops to `nobody` after the master listened. Each end proves to the other that
/// it holds its end of the connection (the kernel's socket table, the accepted
/// socket itself); every connection is accelerated, every echo checked.
#[test]
fn servers_running_as_another_user_accelerate_a_root_client() {
    python3();
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipping: needs root to become another user");
        return;
    }
    let case = Case::new("setuid");
    let client_py = case.write_file("client.py", ECHO_ROUNDS_CLIENT_PY.as_bytes());
    let python = python3();
    let conns = 5;
    for (label, code) in [
        (
            "setuid(nobody) before listen",
            SETUID_BEFORE_LISTEN_SERVER_PY,
        ),
        (
            "root master, worker setuid(nobody) after listen",
            SETUID_AFTER_LISTEN_SERVER_PY,
        ),
    ] {
        let server_py = case.write_file("server.py", code.as_bytes());
        let port = free_port();
        let port_s = port.to_string();
        let mut server = case.spawn(
            Side::Vmc,
            label,
            &python,
            &[
                server_py.to_str().unwrap(),
                &port_s,
                &conns.to_string(),
                "65534",
            ],
            None,
        );
        case.wait_listening(&mut server, port);
        let args = [
            client_py.to_str().unwrap(),
            &port_s,
            &conns.to_string(),
            "10",
        ];
        let client = case.run_ok(Side::Vmc, "root client", &python, &args, None);
        let out = client.out();
        case.check(out.trim() == "50 echoes checked", || {
            format!("{label}: the client's echoes: {out:?}")
        });
        let st = case.wait(&mut server, SERVER_WAIT);
        case.check(st.success(), || {
            format!("{label}: the server exited with {st}")
        });
        let report = case
            .report_of(client.pid)
            .ok()
            .flatten()
            .unwrap_or_default();
        case.check(field(&report, "accelerated") == conns, || {
            format!("{label}: every connection must be accelerated: {report}")
        });
    }
}

/// Apache httpd as deployed: the master listens as root, its workers run as
/// `www-data`; `{dir}` is a directory every user can read. `{mpm}` is replaced by
/// the MPM's module and settings.
const APACHE_CONF: &str = include_str!("../../../bench/apache/httpd.conf");

/// Prefork: 64 single-threaded worker processes.
const APACHE_PREFORK: &str = include_str!("../../../bench/apache/prefork.conf");

/// Event: 2 processes of 128 worker threads, whose listener thread keeps the idle
/// kept-alive connections (room for 200 of them, so that wrk's 200 are never shed).
const APACHE_EVENT: &str = include_str!("../../../bench/apache/event.conf");

/// A number `ab` printed after `label` (for example `Failed requests:`).
fn ab_field(out: &str, label: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.starts_with(label))?;
    line[label.len()..].split_whitespace().next()?.parse().ok()
}

/// Apache under vmc with the MPM `mpm` (its settings), workers as www-data, the load
/// as root under vmc. wrk with 50 keep-alive connections on a 4 KiB page (no error,
/// every connection accelerated); `ab -k -c 50` on the page and on a 10 MB file
/// (every response complete and of the right length, every connection
/// accelerated); curl fetching the file (checksummed); with `c200`, wrk with 200
/// connections too (no socket error).
fn apache_serves_accelerated_clients(name: &'static str, mpm: &str, c200: bool) {
    let apache = program("apache2");
    let wrk = program("wrk");
    let ab = program("ab");
    let curl = program("curl");
    let case = Case::new(name);
    // Outside the case directory, which only root can enter.
    let dir = std::env::temp_dir().join(format!("vmc-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("www")).expect("the document root");
    let mut noise = Noise(0x5eed_a9ac_4e00_0001);
    let page = noise.bytes(4096);
    let big = noise.bytes(10 << 20);
    fs::write(dir.join("www/4k.bin"), &page).expect("the page");
    fs::write(dir.join("www/10m.bin"), &big).expect("the file");
    let open = |p: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode));
    };
    open(&dir, 0o755);
    open(&dir.join("www"), 0o755);
    open(&dir.join("www/4k.bin"), 0o644);
    open(&dir.join("www/10m.bin"), 0o644);
    let port = free_port();
    let conf = APACHE_CONF
        .replace("{mpm}", mpm)
        .replace("{port}", &port.to_string())
        .replace("{dir}", dir.to_str().unwrap());
    let conf_file = case.write_file("httpd.conf", conf.as_bytes());
    // In a session of its own: its master signals its whole process group.
    let mut server = case.spawn(
        Side::Vmc,
        &format!("apache2 {name} (www-data workers)"),
        &program("setsid"),
        &[
            apache.to_str().unwrap(),
            "-f",
            conf_file.to_str().unwrap(),
            "-DFOREGROUND",
        ],
        None,
    );
    case.wait_listening(&mut server, port);
    // Every worker up: each publishes the listener in the shared registry when it
    // becomes www-data (an entry of its own user; the master's is ours).
    let workers: usize = mpm
        .lines()
        .find_map(|l| l.strip_prefix("StartServers "))
        .and_then(|n| n.trim().parse().ok())
        .expect("StartServers in the MPM's settings");
    let listeners = case.public_dir().join("listeners");
    let prefix = format!("l-{port}-");
    let me = rustix::process::geteuid().as_raw();
    let deadline = Instant::now() + SERVER_WAIT;
    loop {
        use std::os::unix::fs::MetadataExt;
        let published = fs::read_dir(&listeners).map_or(0, |rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .filter(|e| e.metadata().is_ok_and(|m| m.uid() != me))
                .count()
        });
        if published >= workers {
            break;
        }
        case.check(Instant::now() < deadline, || {
            format!(
                "only {published} of the {workers} workers published the listener in {}",
                listeners.display()
            )
        });
        std::thread::sleep(ms(10));
    }

    let page_url = format!("http://127.0.0.1:{port}/4k.bin");
    let big_url = format!("http://127.0.0.1:{port}/10m.bin");
    let mut loads = Vec::new();
    let mut wrk_run = |conns: u32| {
        let c = format!("-c{conns}");
        let load = case.run_ok(
            Side::Vmc,
            &format!("wrk -t2 {c}"),
            &wrk,
            &["-t2", &c, "-d2s", &page_url],
            None,
        );
        let out = load.out();
        // "Socket errors: connect 0, read 8, write 0, timeout 0". With 200
        // connections the event MPM closes a few kept-alive ones now and then on
        // its own (read errors; seen without vmc at either end: 8 in one of four
        // runs), so only those are let through there; vmc's own failures would be
        // connects (descriptors), writes or timeouts.
        let errors = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Socket errors: "));
        let allowed = |e: &str| {
            conns == 200
                && e.split(", ")
                    .all(|kv| kv.starts_with("read ") || kv.ends_with(" 0"))
        };
        case.check(
            errors.map_or(true, allowed) && !out.contains("Non-2xx"),
            || format!("wrk {c} saw errors:\n{out}"),
        );
        let report = case.report_of(load.pid).ok().flatten().unwrap_or_default();
        case.check(field(&report, "accelerated") >= conns as u64, || {
            format!("wrk's {conns} connections must be accelerated: {report}")
        });
        loads.push(load.who());
    };
    wrk_run(50);
    if c200 {
        wrk_run(200);
    }
    for (what, url, n, len) in [
        ("the page", &page_url, 5000, page.len()),
        ("the 10 MB file", &big_url, 100, big.len()),
    ] {
        let n_s = n.to_string();
        let run = case.run_ok(
            Side::Vmc,
            &format!("ab -k -c 50 -n {n} ({what})"),
            &ab,
            &["-k", "-c", "50", "-n", &n_s, url],
            None,
        );
        let out = run.out();
        let got = |label| ab_field(&out, label);
        case.check(
            got("Complete requests:") == Some(n)
                && got("Failed requests:") == Some(0)
                && got("Keep-Alive requests:") == Some(n)
                && got("Document Length:") == Some(len as u64)
                && !out.contains("Non-2xx"),
            || format!("ab on {what}: not every response whole and kept alive:\n{out}"),
        );
        let report = case.report_of(run.pid).ok().flatten().unwrap_or_default();
        case.check(field(&report, "accelerated") >= 50, || {
            format!("ab's 50 connections must be accelerated ({what}): {report}")
        });
        loads.push(run.who());
    }
    let got = case.path("10m.bin");
    let fetch = case.run_ok(
        Side::Vmc,
        "curl 10 MB",
        &curl,
        &["-sS", "-o", got.to_str().unwrap(), &big_url],
        None,
    );
    let body = fs::read(&got).unwrap_or_default();
    case.check(body == big, || {
        format!("curl got {} bytes, not the 10 MB file", body.len())
    });
    loads.push(fetch.who());
    case.stop(&mut server, Signal::TERM);
    case.expect_accelerated(&loads);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn apache_prefork_workers_as_www_data_serve_accelerated_clients() {
    apache_serves_accelerated_clients("apache-prefork", APACHE_PREFORK, false);
}

/// The event MPM hands kept-alive connections from its worker threads to a
/// listener thread that sleeps in epoll_wait meanwhile (see the conformance case
/// `handoff`): without vmc waking it, `ab -k` crawled at a request per wake-up.
#[test]
fn apache_event_workers_as_www_data_serve_accelerated_clients() {
    apache_serves_accelerated_clients("apache-event", APACHE_EVENT, true);
}

/// An echo server that becomes `nobody` before it listens, then waits until the
/// file `argv[2]` exists (at most 20 s, well within the offer's 30 s) before it
/// accepts its one connection (so that its client's offer socket waits meanwhile).
const SLOW_NOBODY_SERVER_PY: &str = echo_py!(
    r#"
import os, socket, sys, time
port, go = int(sys.argv[1]), sys.argv[2]
os.environ.pop("VMC_REGISTRY_DIR", None)
os.setgid(65534)
os.setuid(65534)
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port))
l.listen(4)
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)
c, _ = l.accept()
echo(c)
"#
);

/// A third user's attempts on a waiting client's offer socket (`argv[1]`, for the
/// connection `argv[2]` -> `argv[3]`): a mirrored ATTACH without a proof, then one
/// with its own TCP socket as the "proof"; the client must hang up on both. Also
/// tries to read what is not its own.
const THIRD_USER_PY: &str = r#"
import os, socket, sys
path, client, server = sys.argv[1], sys.argv[2], sys.argv[3]
def addr(s):
    host, port = s.rsplit(":", 1)
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(host) + int(port).to_bytes(2, "big")
frame = b"VMCT\x01\0\0\0" + addr(server) + addr(client) + b"\0\0\0\0"
assert len(frame) == 48
for attempt in ("no proof", "a foreign proof"):
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.connect(path)
    if attempt == "no proof":
        u.sendall(frame)
    else:
        host, port = server.rsplit(":", 1)
        mine = socket.create_connection((host, int(port)))
        socket.send_fds(u, [frame], [mine.fileno()])
    u.settimeout(10)
    got = u.recv(4096)
    print("%s: %s" % (attempt, "hung up" if got == b"" else "ANSWERED %r" % got[:16]), flush=True)
for what in (sys.argv[4], sys.argv[5]):
    try:
        os.listdir(what)
        print("listed %s" % what)
    except PermissionError:
        print("cannot list %s" % what)
"#;

/// The isolation matrix: a server of user nobody, its root client, and a third user
/// who computes the client's offer socket and calls it while the client waits,
/// without a proof and with a foreign one. The client hangs up on both and is
/// accelerated with the real server once it accepts; the third user cannot list
/// the server's registry or the shared offers directory. Every echo checked.
#[test]
fn a_third_user_gets_nothing_from_a_waiting_offer() {
    python3();
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipping: needs root to run three users");
        return;
    }
    let case = Case::new("third-user");
    // Scripts the other users can read.
    let dir = std::env::temp_dir().join(format!("vmc-third-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("a directory for the scripts");
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
    }
    let server_py = dir.join("server.py");
    let third_py = dir.join("third.py");
    fs::write(&server_py, SLOW_NOBODY_SERVER_PY).unwrap();
    fs::write(&third_py, THIRD_USER_PY).unwrap();
    let client_py = case.write_file("client.py", ECHO_ROUNDS_CLIENT_PY.as_bytes());
    let python = python3();
    let port = free_port();
    let port_s = port.to_string();
    // Made once the third user is done: the server accepts then.
    let go = dir.join("go");
    let mut server = case.spawn(
        Side::Vmc,
        "nobody server, accepts when told",
        &python,
        &[server_py.to_str().unwrap(), &port_s, go.to_str().unwrap()],
        None,
    );
    case.wait_listening(&mut server, port);
    let mut client = case.spawn(
        Side::Vmc,
        "root client",
        &python,
        &[client_py.to_str().unwrap(), &port_s, "1", "20"],
        None,
    );
    // Its offer socket, in the shared offers directory (root may list it).
    let offers = case.public_dir().join("offers");
    let deadline = Instant::now() + SERVER_WAIT;
    let offer = loop {
        let found = fs::read_dir(&offers).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(&format!("{port:04x}.sock")))
        });
        if let Some(p) = found {
            break p;
        }
        case.check(Instant::now() < deadline, || {
            "the client bound no offer socket in the shared directory".to_string()
        });
        std::thread::sleep(Duration::from_millis(10));
    };
    // o-<ns>-<client ip>-<client port>-<server ip>-<server port>.sock
    let name = offer.file_name().unwrap().to_string_lossy().into_owned();
    let parts: Vec<&str> = name.trim_end_matches(".sock").split('-').collect();
    let cport = u16::from_str_radix(parts[3], 16).expect("the client's port");
    let third = case.run_ok(
        Side::Plain,
        "a third user (uid 4242)",
        &program("setpriv"),
        &[
            "--reuid",
            "4242",
            "--regid",
            "4242",
            "--clear-groups",
            "--",
            python.to_str().unwrap(),
            third_py.to_str().unwrap(),
            offer.to_str().unwrap(),
            &format!("127.0.0.1:{cport}"),
            &format!("127.0.0.1:{port}"),
            "/dev/shm/vmc-65534/listeners",
            offers.to_str().unwrap(),
        ],
        None,
    );
    let out = third.out();
    case.check(
        out.contains("no proof: hung up")
            && out.contains("a foreign proof: hung up")
            && out.contains("cannot list /dev/shm/vmc-65534/listeners")
            && out.contains(&format!("cannot list {}", offers.display())),
        || format!("the third user got something:\n{out}"),
    );
    fs::write(&go, b"").expect("telling the server to accept");
    let st = case.wait(&mut client, CLIENT_WAIT);
    case.check(st.success(), || format!("the client exited with {st}"));
    let echoed = case.stdout_of(&client);
    case.check(echoed.trim() == "20 echoes checked", || {
        format!("the client's echoes: {echoed:?}")
    });
    let report = case
        .report_of(client.child.id())
        .ok()
        .flatten()
        .unwrap_or_default();
    case.check(field(&report, "accelerated") == 1, || {
        format!("the client must be accelerated with the real server: {report}")
    });
    let st = case.wait(&mut server, SERVER_WAIT);
    case.check(st.success(), || format!("the server exited with {st}"));
    let _ = fs::remove_dir_all(&dir);
}
