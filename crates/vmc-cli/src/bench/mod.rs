//! `vmc bench`: orchestration of measured runs, one server process per run.
//!
//! For each transport the client (this process) re-executes its own binary
//! as the hidden `__bench-server` subcommand. The server listens, prints
//! `READY <addr>` on its stdout and serves; the client reads that line,
//! connects, measures, closes the server's stdin and waits for it to exit.
//! Before exiting the server reports how many connections it accepted and how
//! many of them were accelerated (`ACCEL <accelerated> <accepted>`, preceded by
//! a `NOTACCEL <count> <why>` line per reason a `vmc` connection was not).
//!
//! - rr and stream: `--conns N` connections, each driven by its own client
//!   thread and served by its own server thread. The server accepts exactly N,
//!   serves them, reports and exits.
//! - crr: N client threads each connect, make one request/response and close,
//!   over and over. The server runs a pool of N threads, each accepting on the
//!   shared listener and serving the connection it got to its end (read the
//!   request, echo it, wait for the client's close) before accepting again; it
//!   stops when its stdin closes (the client's signal that the run is over).
//!
//! All of a run's client threads connect first, meet at a barrier and then
//! share one schedule (warm-up end, deadline), so their measured intervals
//! coincide. A [`ServerGuard`] kills and reaps the server if anything fails,
//! and the server asks the kernel to kill it if its parent dies
//! (`PR_SET_PDEATHSIG`), so no run leaves a process behind.

pub mod crr;
pub mod idle;
pub mod memcpy;
pub mod progress;
pub mod report;
pub mod ring;
pub mod rr;
pub mod stream;
pub mod transport;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use progress::Ticker;
use transport::{Conn, ShmTuning, Transport, VmcState};

/// What a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Request/response: round-trip latency of `size`-byte ping-pongs.
    Rr,
    /// Bulk one-way transfer of `size`-byte writes: throughput.
    Stream,
    /// Connect, one `size`-byte request and response, close: connection rate.
    Crr,
}

impl Mode {
    /// The name used on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Rr => "rr",
            Mode::Stream => "stream",
            Mode::Crr => "crr",
        }
    }

    /// The message size used when none is given.
    pub fn default_size(self) -> usize {
        match self {
            Mode::Rr | Mode::Crr => 64,
            Mode::Stream => 65536,
        }
    }

    /// The transports run when none are given.
    pub fn default_transports(self) -> &'static [Transport] {
        match self {
            Mode::Rr | Mode::Stream => &Transport::ALL,
            Mode::Crr => &[Transport::Vmc, Transport::Tcp],
        }
    }

    /// Whether the mode can run over `transport` (crr measures TCP connection
    /// set-up, so it needs a TCP transport).
    pub fn supports(self, transport: Transport) -> bool {
        self != Mode::Crr || transport.is_tcp()
    }
}

/// Everything a suite of runs (one per transport) needs.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// rr, stream or crr.
    pub mode: Mode,
    /// Bytes per message (rr, crr) or per write (stream), at least 1.
    pub size: usize,
    /// Connections (rr, stream) or connecting client threads (crr) in parallel.
    pub conns: usize,
    /// Idle vmc connections held open in the client process during each run.
    pub idle: usize,
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

/// The figures of one run; with several connections, the aggregate over all of them.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// rr, stream or crr.
    pub mode: Mode,
    /// The transport measured.
    pub transport: Transport,
    /// Bytes per message or write.
    pub size: usize,
    /// Connections (rr, stream) or connecting threads (crr) in parallel.
    pub conns: usize,
    /// Measured wall time (the longest of the connections').
    pub seconds: f64,
    /// Median round trip (rr) or connect-to-response time (crr), over all connections.
    pub rtt_p50_us: Option<f64>,
    /// 99th percentile of the same.
    pub rtt_p99_us: Option<f64>,
    /// Transactions per second, summed over the connections (rr, crr).
    pub trans_per_s: Option<f64>,
    /// Throughput in 1e9 bytes/s, summed over the connections (stream).
    pub gbytes_per_s: Option<f64>,
    /// Connections opened (and closed) per second (crr).
    pub conns_per_s: Option<f64>,
    /// Connections the server accepted during the run (crr: warm-up included).
    pub accepted_conns: u64,
    /// vmc only: how many of those carried bytes over shared memory.
    pub accelerated_conns: Option<u64>,
    /// Idle (accelerated) connections open in the client process during the run.
    pub idle_conns: usize,
}

impl RunResult {
    /// `trans_per_s` per connection (or per client thread, for crr).
    pub fn per_conn_trans_per_s(&self) -> Option<f64> {
        self.trans_per_s.map(|t| t / self.conns as f64)
    }

    /// `gbytes_per_s` per connection.
    pub fn per_conn_gbytes_per_s(&self) -> Option<f64> {
        self.gbytes_per_s.map(|g| g / self.conns as f64)
    }
}

/// The results of one mode over several transports.
#[derive(Clone, Debug)]
pub struct Suite {
    /// rr, stream or crr.
    pub mode: Mode,
    /// Bytes per message or write.
    pub size: usize,
    /// Connections (or crr client threads) in parallel.
    pub conns: usize,
    /// Measured time per transport.
    pub duration: Duration,
    /// Single-thread memcpy bandwidth measured before a stream suite.
    pub memcpy_gbytes_per_s: Option<f64>,
    /// The plain-ring yardstick measured before a stream suite (see [`ring`]).
    pub ring_gbytes_per_s: Option<f64>,
    /// The ring capacity the yardstick and the shm transports use.
    pub capacity: usize,
    /// Successful runs, in run order.
    pub results: Vec<RunResult>,
}

/// Run every transport of `config` in order.
///
/// A transport that fails is reported on stderr and skipped; the failures
/// are returned next to the suite so the caller can decide the exit status.
pub fn run_suite(config: &BenchConfig) -> (Suite, Vec<Failure>) {
    let stream = config.mode == Mode::Stream;
    let capacity = config
        .tuning
        .capacity
        .unwrap_or(vmc_channel::config::DEFAULT_CAPACITY);
    let memcpy_gbytes_per_s =
        stream.then(|| memcpy::bandwidth_gbytes_per_s(config.size, Duration::from_millis(300)));
    let ring_gbytes_per_s = stream
        .then(|| ring::gbytes_per_s(config.size, capacity, Duration::from_millis(600)))
        .flatten();
    let mut suite = Suite {
        mode: config.mode,
        size: config.size,
        conns: config.conns,
        duration: config.duration,
        memcpy_gbytes_per_s,
        ring_gbytes_per_s,
        capacity,
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

/// `vmc bench`: run the suite `repeat` times and print each table (or JSON lines),
/// then, after several, the spread of every figure.
pub fn command(config: &BenchConfig, json: bool, repeat: usize) -> Result<()> {
    let mut suites = Vec::new();
    let mut failures = Vec::new();
    for round in 0..repeat {
        let (suite, failed) = run_suite(config);
        let mut stdout = std::io::stdout().lock();
        if json {
            let bound = report::two_copy_bound(&suite);
            for result in &suite.results {
                writeln!(
                    stdout,
                    "{}",
                    report::json_line(result, bound, suite.ring_gbytes_per_s)
                )?;
            }
        } else if !suite.results.is_empty() {
            if repeat > 1 {
                writeln!(stdout, "run {} of {repeat}", round + 1)?;
            }
            writeln!(stdout, "{}", report::render(&suite))?;
        }
        stdout.flush()?;
        failures.extend(failed);
        suites.push(suite);
    }
    if repeat > 1 && !json {
        let mut stdout = std::io::stdout().lock();
        write!(stdout, "{}", report::render_spread(&suites))?;
        stdout.flush()?;
    }
    fail_if_any(&failures, config.transports.len() * repeat)
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

/// When a run's client threads stop warming up and stop measuring; one for all
/// of a run's connections, so that they measure the same interval.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// End of the unmeasured warm-up; measuring starts at the first transaction after it.
    pub warm_end: Instant,
    /// The last measured transaction (or write batch) is the one that ends after this.
    pub deadline: Instant,
}

impl Schedule {
    /// Warm up for `warmup` from `start`, then measure for `duration`.
    pub fn new(start: Instant, warmup: Duration, duration: Duration) -> Self {
        let warm_end = start + warmup;
        Schedule {
            warm_end,
            deadline: warm_end + duration,
        }
    }
}

/// How many connections one side saw, how many were accelerated, and why the others were not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Connections counted.
    pub total: u64,
    /// Connections that carried bytes over shared memory (vmc).
    pub accelerated: u64,
    /// For vmc connections that were not accelerated: why, and how many.
    pub why_not: BTreeMap<String, u64>,
}

impl Tally {
    /// Count one connection, given its [`Conn::vmc_state`].
    pub fn add(&mut self, state: Option<VmcState>) {
        self.total += 1;
        match state.as_ref().map(VmcState::why_not) {
            Some(None) => self.accelerated += 1,
            Some(Some(why)) => *self.why_not.entry(why).or_default() += 1,
            None => {}
        }
    }

    /// Add up two tallies.
    pub fn merge(&mut self, other: Tally) {
        self.total += other.total;
        self.accelerated += other.accelerated;
        for (why, n) in other.why_not {
            *self.why_not.entry(why).or_default() += n;
        }
    }

    /// The `NOTACCEL` and `ACCEL` lines a server prints last.
    fn server_lines(&self) -> String {
        let mut out = String::new();
        for (why, n) in &self.why_not {
            out.push_str(&format!("NOTACCEL {n} {}\n", why.replace('\n', " ")));
        }
        out.push_str(&format!("ACCEL {} {}\n", self.accelerated, self.total));
        out
    }

    /// Parse a server's `NOTACCEL`/`ACCEL` line into `self`; whether it was one.
    fn parse_line(&mut self, line: &str) -> Result<bool> {
        let bad = || anyhow!("malformed report line from the bench server: {line:?}");
        if let Some(rest) = line.strip_prefix("ACCEL ") {
            let (acc, total) = rest.split_once(' ').ok_or_else(bad)?;
            self.accelerated = acc.parse().map_err(|_| bad())?;
            self.total = total.parse().map_err(|_| bad())?;
            Ok(true)
        } else if let Some(rest) = line.strip_prefix("NOTACCEL ") {
            let (n, why) = rest.split_once(' ').ok_or_else(bad)?;
            *self.why_not.entry(why.to_owned()).or_default() +=
                n.parse::<u64>().map_err(|_| bad())?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// "  3 x why" lines for a warning.
    fn reasons(&self, side: &str) -> String {
        self.why_not
            .iter()
            .map(|(why, n)| format!("\n  {side}: {n} x {why}"))
            .collect()
    }
}

/// Run `work` once per item, each on its own thread, all starting together.
///
/// The threads meet at a barrier, then share one [`Schedule`] that starts when
/// the first of them leaves it. The first thread draws `ticker`. If one fails,
/// `abort` is raised so that loops which watch it stop early; the first error
/// (in item order, with `what` and the item's number as its context) is returned.
fn in_parallel<I, T, F>(
    what: &str,
    items: Vec<I>,
    warmup: Duration,
    duration: Duration,
    ticker: Ticker,
    work: F,
) -> Result<Vec<T>>
where
    I: Send,
    T: Send,
    F: Fn(I, Schedule, &mut Ticker, &AtomicBool) -> Result<T> + Sync,
{
    let barrier = Barrier::new(items.len());
    let start = OnceLock::new();
    let abort = AtomicBool::new(false);
    let mut ticker = Some(ticker);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|item| {
                let mut ticker = ticker.take().unwrap_or_else(Ticker::hidden);
                let (barrier, start, abort, work) = (&barrier, &start, &abort, &work);
                scope.spawn(move || {
                    barrier.wait();
                    let schedule =
                        Schedule::new(*start.get_or_init(Instant::now), warmup, duration);
                    let out = work(item, schedule, &mut ticker, abort);
                    if out.is_err() {
                        abort.store(true, Ordering::Relaxed);
                    }
                    out
                })
            })
            .collect();
        let mut results = Vec::with_capacity(handles.len());
        let mut first_error = None;
        for (i, handle) in handles.into_iter().enumerate() {
            match handle.join() {
                Ok(Ok(out)) => results.push(out),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e.context(format!("{what} {}", i + 1)));
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow!("{what} {}: its thread panicked", i + 1));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(results),
        }
    })
}

/// What the clients of one run measured, summed over their connections.
struct Measured {
    seconds: f64,
    hist: Option<hdrhistogram::Histogram<u64>>,
    transactions_per_s: f64,
    gbytes_per_s: f64,
    /// The clients' own view of acceleration (vmc).
    tally: Tally,
}

impl Measured {
    fn new() -> Self {
        Measured {
            seconds: 0.0,
            hist: None,
            transactions_per_s: 0.0,
            gbytes_per_s: 0.0,
            tally: Tally::default(),
        }
    }

    fn add_hist(&mut self, hist: hdrhistogram::Histogram<u64>) -> Result<()> {
        match &mut self.hist {
            None => self.hist = Some(hist),
            Some(all) => all.add(&hist).context("merging latency histograms")?,
        }
        Ok(())
    }
}

/// One measured run over `transport`, with its own server process.
fn run_one(config: &BenchConfig, transport: Transport) -> Result<RunResult> {
    let (mode, size, n) = (config.mode, config.size, config.conns.max(1));
    if !mode.supports(transport) {
        bail!(
            "the {} mode measures TCP connection set-up and runs over vmc and tcp only, not {transport}",
            mode.name()
        );
    }
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

    let idle = match config.idle {
        0 => None,
        n => Some(idle::open(n).context("opening the idle connections")?),
    };
    let idle_conns = idle.as_ref().map_or(0, |s| s.accelerated);
    let mut server = ServerGuard::spawn(config, transport, path.as_deref(), &label)?;
    let addr = server.wait_ready(Duration::from_secs(10))?;
    tracing::debug!(%transport, %addr, conns = n, "server ready");

    let total = config.warmup + config.duration;
    let ticker =
        if config.progress && total > Duration::from_secs(1) && std::io::stderr().is_terminal() {
            Ticker::new(&label, total)
        } else {
            Ticker::hidden()
        };
    let (warmup, duration) = (config.warmup, config.duration);
    let mut measured = Measured::new();

    match mode {
        Mode::Rr | Mode::Stream => {
            let conns = (0..n)
                .map(|i| {
                    transport::connect(transport, &addr).with_context(|| {
                        format!(
                            "connecting to the {transport} bench server at {addr} (connection {} of {n})",
                            i + 1
                        )
                    })
                })
                .collect::<Result<Vec<Box<dyn Conn>>>>()?;
            let outcomes = in_parallel(
                "connection",
                conns,
                warmup,
                duration,
                ticker,
                |mut conn, schedule, ticker, _| {
                    let outcome = match mode {
                        Mode::Rr => Ok(rr::client(&mut *conn, size, schedule, ticker)?),
                        _ => Err(stream::client(&mut *conn, size, schedule, ticker)?),
                    };
                    Ok((outcome, conn.vmc_state()))
                },
            )?;
            for (i, (outcome, state)) in outcomes.into_iter().enumerate() {
                measured.tally.add(state);
                match outcome {
                    Ok(rr) => {
                        let rate = rr.transactions as f64 / rr.seconds;
                        tracing::debug!(%transport, connection = i + 1, trans_per_s = rate, "rr");
                        measured.seconds = measured.seconds.max(rr.seconds);
                        measured.transactions_per_s += rate;
                        measured.add_hist(rr.hist)?;
                    }
                    Err(stream) => {
                        let rate = stream.bytes as f64 / stream.seconds / 1e9;
                        tracing::debug!(%transport, connection = i + 1, gbytes_per_s = rate, "stream");
                        measured.seconds = measured.seconds.max(stream.seconds);
                        measured.gbytes_per_s += rate;
                    }
                }
            }
        }
        Mode::Crr => {
            let addr = addr.as_str();
            let outcomes = in_parallel(
                "client thread",
                (0..n).collect(),
                warmup,
                duration,
                ticker,
                |_, schedule, ticker, abort| {
                    crr::client(transport, addr, size, schedule, ticker, abort)
                },
            )?;
            for (i, out) in outcomes.into_iter().enumerate() {
                let rate = out.transactions as f64 / out.seconds;
                tracing::debug!(%transport, thread = i + 1, conns_per_s = rate, "crr");
                measured.seconds = measured.seconds.max(out.seconds);
                measured.transactions_per_s += rate;
                measured.add_hist(out.hist)?;
                measured.tally.merge(out.tally);
            }
        }
    }

    let served = server.finish(Duration::from_secs(10))?;
    drop(dir);
    if transport == Transport::Vmc
        && (served.accelerated < served.total || !measured.tally.why_not.is_empty())
    {
        eprintln!(
            "vmc: {label}: only {} of the {} connections the server accepted were accelerated \
             (carried bytes over shared memory); the others ran as plain TCP:{}{}",
            served.accelerated,
            served.total,
            served.reasons("server"),
            measured.tally.reasons("client"),
        );
    }

    let us = |q: f64| {
        measured
            .hist
            .as_ref()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
    };
    let per_s = (mode != Mode::Stream).then_some(measured.transactions_per_s);
    Ok(RunResult {
        mode,
        transport,
        size,
        conns: n,
        seconds: measured.seconds,
        rtt_p50_us: us(0.50),
        rtt_p99_us: us(0.99),
        trans_per_s: per_s,
        gbytes_per_s: (mode == Mode::Stream).then_some(measured.gbytes_per_s),
        conns_per_s: per_s.filter(|_| mode == Mode::Crr),
        accepted_conns: served.total,
        accelerated_conns: (transport == Transport::Vmc).then_some(served.accelerated),
        idle_conns,
    })
}

/// A bench server child process, killed and reaped when dropped.
pub struct ServerGuard {
    child: Option<Child>,
    /// Closing it tells a crr server that the run is over.
    stdin: Option<ChildStdin>,
    /// The server's stdout, line by line, from a reader thread.
    lines: Option<mpsc::Receiver<std::io::Result<String>>>,
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
            .args(["--conns", &config.conns.max(1).to_string()])
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
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        tracing::debug!(?cmd, "spawning bench server");
        let mut child = cmd.spawn().context("starting the bench server process")?;
        let stdin = child.stdin.take();
        Ok(ServerGuard {
            child: Some(child),
            stdin,
            lines: None,
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
            for line in BufReader::new(stdout).lines() {
                let failed = line.is_err();
                if tx.send(line).is_err() || failed {
                    break;
                }
            }
        });
        let first = rx.recv_timeout(timeout);
        self.lines = Some(rx);
        let line = match first {
            Ok(read) => read.context("reading the bench server's READY line")?,
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "{}: the bench server did not become ready within {timeout:?}",
                self.label
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => String::new(),
        };
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

    /// Tell the server the run is over (close its stdin), read its report and
    /// wait for it to exit; an error if it fails, lingers or reports nothing.
    fn finish(mut self, timeout: Duration) -> Result<Tally> {
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        let lines = self
            .lines
            .take()
            .ok_or_else(|| anyhow!("the bench server was never ready"))?;
        let mut tally = Tally::default();
        let mut reported = false;
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let line = line.context("reading the bench server's report")?;
                    if tally.parse_line(&line)? {
                        reported |= line.starts_with("ACCEL ");
                    } else {
                        tracing::debug!("bench server said: {line}");
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "{}: the bench server did not exit within {timeout:?} after the run",
                    self.label
                ),
            }
        }
        match self.wait_status(deadline.saturating_duration_since(Instant::now())) {
            Some(status) if status.success() => {
                self.child = None;
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
        if !reported {
            bail!(
                "{}: the bench server did not report its connections",
                self.label
            );
        }
        Ok(tally)
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
    /// rr, stream: connections to accept and serve in parallel; crr: serving threads.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
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

/// The server process: listen, announce, serve, report the connections, exit.
///
/// Failures before the first connection is accepted are reported to the client
/// as an `ERROR <message>` line instead of `READY`, and the process exits with
/// status 3 without printing anything else; later failures return an error.
pub fn serve(args: &ServerArgs) -> Result<()> {
    let listener = match server_setup(args) {
        Ok(listener) => listener,
        Err(err) => {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "ERROR {}", format!("{err:#}").replace('\n', " "));
            let _ = stdout.flush();
            std::process::exit(3);
        }
    };
    let tally = match args.mode {
        Mode::Rr | Mode::Stream => serve_each(&listener, args)?,
        Mode::Crr => crr::serve(&listener, args.size, args.conns.max(1), || {
            // The client closes our stdin when the run is over (or dies).
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        })?,
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(tally.server_lines().as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// rr and stream: accept `args.conns` connections, serve each on its own thread.
///
/// The listener stays open until they are all served: a vmc client looks its
/// listener up after its TCP connection is established, so closing the
/// listener right after `accept` could leave its connection on TCP.
fn serve_each(listener: &transport::Listener, args: &ServerArgs) -> Result<Tally> {
    let conns = (0..args.conns.max(1))
        .map(|i| {
            listener
                .accept()
                .with_context(|| format!("accepting bench connection {}", i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let (mode, size) = (args.mode, args.size);
    std::thread::scope(|scope| {
        let handles: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                scope.spawn(move || -> Result<Option<VmcState>> {
                    match mode {
                        Mode::Rr => rr::server(&mut *conn, size)?,
                        _ => stream::server(&mut *conn, size)?,
                    }
                    Ok(conn.vmc_state())
                })
            })
            .collect();
        let mut tally = Tally::default();
        let mut first_error = None;
        for (i, handle) in handles.into_iter().enumerate() {
            match handle.join() {
                Ok(Ok(state)) => tally.add(state),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e.context(format!("connection {}", i + 1)));
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow!("server thread {} panicked", i + 1));
                }
            }
        }
        first_error.map_or(Ok(tally), Err)
    })
}

fn server_setup(args: &ServerArgs) -> Result<transport::Listener> {
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
    if !args.mode.supports(args.transport) {
        bail!(
            "the {} mode does not run over {}",
            args.mode.name(),
            args.transport
        );
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
