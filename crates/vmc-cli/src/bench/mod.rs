//! `vmc bench`: orchestration of measured runs, one server process per run.
//!
//! For each transport the client (this process) re-executes its own binary
//! as the hidden `__bench-server` subcommand. The server listens, prints
//! `READY <addr>` on its stdout, serves exactly one connection and exits;
//! the client reads that line, connects, measures, then waits for the server
//! to exit. A [`ServerGuard`] kills and reaps the server if anything fails,
//! and the server asks the kernel to kill it if its parent dies
//! (`PR_SET_PDEATHSIG`), so no run leaves a process behind.

pub mod memcpy;
pub mod progress;
pub mod report;
pub mod rr;
pub mod stream;
pub mod transport;

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use progress::Ticker;
use transport::{ShmTuning, Transport};

/// What a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Request/response: round-trip latency of `size`-byte ping-pongs.
    Rr,
    /// Bulk one-way transfer of `size`-byte writes: throughput.
    Stream,
}

impl Mode {
    /// The name used on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Rr => "rr",
            Mode::Stream => "stream",
        }
    }

    /// The message size used when none is given.
    pub fn default_size(self) -> usize {
        match self {
            Mode::Rr => 64,
            Mode::Stream => 65536,
        }
    }
}

/// Everything a suite of runs (one per transport) needs.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// rr or stream.
    pub mode: Mode,
    /// Bytes per message (rr) or per write (stream), at least 1.
    pub size: usize,
    /// Measured time per transport.
    pub duration: Duration,
    /// Unmeasured time per transport before measuring.
    pub warmup: Duration,
    /// Transports to run, in order.
    pub transports: Vec<Transport>,
    /// shm ring size and spin.
    pub tuning: ShmTuning,
    /// Whether progress bars may be drawn (they still need stderr to be a terminal).
    pub progress: bool,
}

/// The figures of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// rr or stream.
    pub mode: Mode,
    /// The transport measured.
    pub transport: Transport,
    /// Bytes per message or write.
    pub size: usize,
    /// Measured wall time.
    pub seconds: f64,
    /// Median round trip (rr).
    pub rtt_p50_us: Option<f64>,
    /// 99th-percentile round trip (rr).
    pub rtt_p99_us: Option<f64>,
    /// Round trips per second (rr).
    pub trans_per_s: Option<f64>,
    /// Throughput in 1e9 bytes/s (stream).
    pub gbytes_per_s: Option<f64>,
}

/// The results of one mode over several transports.
#[derive(Clone, Debug)]
pub struct Suite {
    /// rr or stream.
    pub mode: Mode,
    /// Bytes per message or write.
    pub size: usize,
    /// Measured time per transport.
    pub duration: Duration,
    /// Single-thread memcpy bandwidth measured before a stream suite.
    pub memcpy_gbytes_per_s: Option<f64>,
    /// Successful runs, in run order.
    pub results: Vec<RunResult>,
}

/// Run every transport of `config` in order.
///
/// A transport that fails is reported on stderr and skipped; the failures
/// are returned next to the suite so the caller can decide the exit status.
pub fn run_suite(config: &BenchConfig) -> (Suite, Vec<Failure>) {
    let memcpy_gbytes_per_s = (config.mode == Mode::Stream)
        .then(|| memcpy::bandwidth_gbytes_per_s(config.size, Duration::from_millis(300)));
    let mut suite = Suite {
        mode: config.mode,
        size: config.size,
        duration: config.duration,
        memcpy_gbytes_per_s,
        results: Vec::new(),
    };
    let mut failures = Vec::new();
    for &transport in &config.transports {
        match run_one(config, transport) {
            Ok(result) => suite.results.push(result),
            Err(error) => {
                let run = format!("{} {transport}", config.mode.name());
                eprintln!("vmc: {run}: {error:#}");
                failures.push(Failure { run });
            }
        }
    }
    (suite, failures)
}

/// `vmc bench`: run the suite and print the table (or JSON lines).
pub fn command(config: &BenchConfig, json: bool) -> Result<()> {
    let (suite, failures) = run_suite(config);
    let mut stdout = std::io::stdout().lock();
    if json {
        let bound = report::two_copy_bound(&suite);
        for result in &suite.results {
            writeln!(stdout, "{}", report::json_line(result, bound))?;
        }
    } else if !suite.results.is_empty() {
        write!(stdout, "{}", report::render(&suite))?;
    }
    stdout.flush()?;
    fail_if_any(&failures, config.transports.len())
}

/// A run that did not produce a result; why was printed on stderr when it failed.
#[derive(Debug)]
pub struct Failure {
    /// Which run, e.g. `rr shm`.
    pub run: String,
}

/// An error summarising `failures` (already printed one by one), if there are any.
pub fn fail_if_any(failures: &[Failure], total: usize) -> Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = failures.iter().map(|f| f.run.as_str()).collect();
    bail!(
        "{} of {total} transport run(s) failed: {} (see above)",
        failures.len(),
        names.join(", ")
    )
}

/// One measured run over `transport`, with its own server process.
fn run_one(config: &BenchConfig, transport: Transport) -> Result<RunResult> {
    let (mode, size) = (config.mode, config.size);
    let label = format!("{} {transport}", mode.name());
    let dir = if transport.needs_path() {
        Some(
            tempfile::Builder::new()
                .prefix("vmc-bench-")
                .tempdir()
                .context("creating a temporary directory for the socket")?,
        )
    } else {
        None
    };
    let path = dir.as_ref().map(|d| d.path().join("bench.sock"));

    let mut server = ServerGuard::spawn(config, transport, path.as_deref(), &label)?;
    let addr = server.wait_ready(Duration::from_secs(10))?;
    tracing::debug!(%transport, %addr, "server ready");

    let mut conn = transport::connect(transport, &addr)
        .with_context(|| format!("connecting to the {transport} bench server at {addr}"))?;
    let total = config.warmup + config.duration;
    let mut ticker =
        if config.progress && total > Duration::from_secs(1) && std::io::stderr().is_terminal() {
            Ticker::new(&label, total)
        } else {
            Ticker::hidden()
        };

    let result = match mode {
        Mode::Rr => {
            let out = rr::client(
                &mut *conn,
                size,
                config.warmup,
                config.duration,
                &mut ticker,
            )?;
            let us = |q: f64| out.hist.value_at_quantile(q) as f64 / 1000.0;
            RunResult {
                mode,
                transport,
                size,
                seconds: out.seconds,
                rtt_p50_us: Some(us(0.50)),
                rtt_p99_us: Some(us(0.99)),
                trans_per_s: Some(out.transactions as f64 / out.seconds),
                gbytes_per_s: None,
            }
        }
        Mode::Stream => {
            let out = stream::client(
                &mut *conn,
                size,
                config.warmup,
                config.duration,
                &mut ticker,
            )?;
            RunResult {
                mode,
                transport,
                size,
                seconds: out.seconds,
                rtt_p50_us: None,
                rtt_p99_us: None,
                trans_per_s: None,
                gbytes_per_s: Some(out.bytes as f64 / out.seconds / 1e9),
            }
        }
    };
    drop(ticker);
    drop(conn);
    server.wait_exit(Duration::from_secs(10))?;
    drop(dir);
    Ok(result)
}

/// A bench server child process, killed and reaped when dropped.
pub struct ServerGuard {
    child: Option<Child>,
    label: String,
}

impl ServerGuard {
    fn spawn(
        config: &BenchConfig,
        transport: Transport,
        path: Option<&Path>,
        label: &str,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the vmc executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("__bench-server")
            .args(["--transport", transport.name()])
            .args(["--mode", config.mode.name()])
            .args(["--size", &config.size.to_string()])
            .args(["--parent-pid", &std::process::id().to_string()]);
        if let Some(path) = path {
            cmd.arg("--addr").arg(path);
        }
        if let Some(capacity) = config.tuning.capacity {
            cmd.args(["--capacity", &capacity.to_string()]);
        }
        if let Some(spin) = config.tuning.spin {
            cmd.args(["--spin-us", &spin.as_micros().to_string()]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        tracing::debug!(?cmd, "spawning bench server");
        let child = cmd.spawn().context("starting the bench server process")?;
        Ok(ServerGuard {
            child: Some(child),
            label: label.to_owned(),
        })
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until consumed")
    }

    /// Read the server's `READY <addr>` line; return `<addr>`.
    fn wait_ready(&mut self, timeout: Duration) -> Result<String> {
        let stdout = self
            .child()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the bench server has no stdout pipe"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        let line = match rx.recv_timeout(timeout) {
            Ok(read) => read.context("reading the bench server's READY line")?,
            Err(_) => bail!(
                "{}: the bench server did not become ready within {timeout:?}",
                self.label
            ),
        };
        let line = line.trim_end_matches('\n');
        if let Some(message) = line.strip_prefix("ERROR ") {
            bail!("{message}");
        }
        match line.strip_prefix("READY ") {
            Some(addr) if !addr.is_empty() => Ok(addr.to_owned()),
            _ => {
                let status = self.wait_status(Duration::from_secs(2));
                bail!(
                    "the bench server exited before it was ready ({}); see its message above",
                    describe(status)
                )
            }
        }
    }

    fn wait_status(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child().try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => return None,
            }
        }
    }

    /// Wait for the server to exit on its own; an error if it fails or lingers.
    fn wait_exit(mut self, timeout: Duration) -> Result<()> {
        match self.wait_status(timeout) {
            Some(status) if status.success() => {
                self.child = None;
                Ok(())
            }
            Some(status) => {
                self.child = None;
                bail!("{}: the bench server failed ({status})", self.label)
            }
            None => bail!(
                "{}: the bench server did not exit within {timeout:?} after the run",
                self.label
            ),
        }
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    status.map_or_else(|| "still running".to_owned(), |s| s.to_string())
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Arguments of the hidden `__bench-server` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// Transport to listen on.
    #[arg(long, value_enum)]
    pub transport: Transport,
    /// What to serve.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Message or write size in bytes.
    #[arg(long)]
    pub size: usize,
    /// Socket path to listen on (unix, shm).
    #[arg(long)]
    pub addr: Option<PathBuf>,
    /// shm ring bytes per direction.
    #[arg(long)]
    pub capacity: Option<usize>,
    /// shm spin time in microseconds.
    #[arg(long)]
    pub spin_us: Option<u64>,
    /// The client's pid: exit at once if it is already gone.
    #[arg(long)]
    pub parent_pid: Option<u32>,
}

/// The server process: listen, announce, serve one connection, exit.
///
/// Failures before the connection is accepted are reported to the client as
/// an `ERROR <message>` line instead of `READY`, and the process exits with
/// status 3 without printing anything else; later failures return an error.
pub fn serve(args: &ServerArgs) -> Result<()> {
    let mut listener = match server_setup(args) {
        Ok(listener) => listener,
        Err(err) => {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "ERROR {}", format!("{err:#}").replace('\n', " "));
            let _ = stdout.flush();
            std::process::exit(3);
        }
    };
    let mut conn = listener.accept().context("accepting the bench client")?;
    drop(listener);
    match args.mode {
        Mode::Rr => rr::server(&mut *conn, args.size),
        Mode::Stream => stream::server(&mut *conn, args.size),
    }
}

fn server_setup(args: &ServerArgs) -> Result<Box<dyn transport::Listener>> {
    // Die with the client, so a crashed or killed client leaves nothing behind.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .context("setting the parent-death signal")?;
    if let Some(parent) = args.parent_pid {
        if std::os::unix::process::parent_id() != parent {
            bail!("the bench client (pid {parent}) is gone");
        }
    }
    if args.size == 0 {
        bail!("--size must be at least 1");
    }
    let tuning = ShmTuning {
        capacity: args.capacity,
        spin: args.spin_us.map(Duration::from_micros),
    };
    let listener = transport::listen(args.transport, args.addr.as_deref(), &tuning)
        .with_context(|| format!("listening on {}", args.transport))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "READY {}", listener.local_addr())?;
    stdout.flush()?;
    Ok(listener)
}
