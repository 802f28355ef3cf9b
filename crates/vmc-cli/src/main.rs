//! `vmc`: the command-line front end of vmc, the co-resident communication
//! accelerator that moves TCP connections' bytes onto shared-memory rings.
//!
//! Subcommands: `bench` (latency, throughput and connection rate of shm, vmc's
//! accelerated TCP, TCP and Unix sockets), `demo` (a short guided comparison),
//! `run` (an unmodified program under the preload library), `stat` and `migrate`
//! (live connections), and the hidden
//! `__bench-server` that `bench` spawns for the other end of each run.
//! Logging goes to stderr, filtered by `VMC_LOG` (e.g. `VMC_LOG=debug`).

#![forbid(unsafe_code)]

mod bench;
mod demo;
mod run;
mod stat;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

use bench::transport::{ShmTuning, Transport};
use bench::{BenchConfig, Mode, ServerArgs};

/// vmc moves co-resident TCP connections' bytes onto shared-memory rings.
#[derive(Debug, Parser)]
#[command(name = "vmc", version, propagate_version = true)]
#[command(after_help = "\
Start with `vmc demo` for a quick, explained look; use `vmc bench` for numbers
you can script (`--json`). Set VMC_LOG (e.g. VMC_LOG=debug) for diagnostics on stderr.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure round-trip latency (rr), throughput (stream) or connection rate (crr).
    #[command(after_help = "\
Modes:
  rr      request/response round trips, one at a time per connection (latency)
  stream  one-way bulk writes (throughput)
  crr     connect, one request/response, close, over and over (connection rate)

Transports:
  shm     vmc's shared-memory channel alone
  vmc     vmc's TCP connection (vmc_conn): starts on loopback TCP, moves onto shared memory
  tcp     TCP over loopback (std), TCP_NODELAY
  unix    a Unix-domain stream socket
  rr and stream run shm,tcp,unix unless told; crr runs over vmc and tcp only (default vmc,tcp).

Examples:
  vmc bench rr                                  64-byte round trips over shm, tcp and unix
  vmc bench rr --transport vmc,tcp --conns 4    4 connections at once, aggregate and per connection
  vmc bench stream --size 1M --duration 5       1 MiB writes for 5 s per transport
  vmc bench crr                                 connections per second, vmc vs tcp
  vmc bench crr --conns 2 --json                2 connecting threads, one JSON object per transport

Each run starts a fresh server process (this binary, re-executed). For vmc runs the
`accel` column shows how many of the connections the server accepted carried bytes
over shared memory (accelerated/accepted; JSON: accelerated_conns, accepted_conns);
connections that stayed on TCP are also listed, with the reason, on stderr.")]
    Bench(BenchArgs),
    /// Run a short shm vs TCP vs Unix comparison (about 10 s) and explain the numbers.
    Demo(DemoArgs),
    /// Run an unmodified program with its TCP connections accelerated (LD_PRELOAD).
    #[command(after_help = "\
Both ends of a connection must run under vmc (or preload the library) and share the
machine; every other connection stays plain TCP. Examples:
  vmc run -- redis-server --port 7000
  vmc run -- redis-benchmark -p 7000 -t get,set
Environment: VMC_DISABLE=1 turns vmc off, VMC_LOG=debug logs to stderr (VMC_LOG_FILE
to a file instead), VMC_REPORT=FILE appends a JSON summary per process at exit.")]
    Run(RunArgs),
    /// List this user's vmc listeners and live connections (path, bytes, fallback reason).
    Stat(StatArgs),
    /// Move a live connection between shared memory and TCP, at an exact byte boundary.
    #[command(after_help = "\
ID is the connection's id in `vmc stat` (pid.slot). Both ends move (their sending
directions), each at its next write; nothing is lost, duplicated or reordered.
Examples:
  vmc migrate 12345.0 --to tcp     both directions of the connection onto TCP
  vmc migrate 12345.0 --to shm     and back onto shared memory")]
    Migrate(MigrateArgs),
    /// Serve one bench connection (spawned by `vmc bench`; not for direct use).
    #[command(name = "__bench-server", hide = true)]
    BenchServer(ServerArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The program to run, and its arguments (after `--`)
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<std::ffi::OsString>,
}

#[derive(Debug, clap::Args)]
struct StatArgs {
    /// One JSON object per listener and connection, on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PathArg {
    Tcp,
    Shm,
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// The connection, as `vmc stat` lists it (pid.slot)
    id: String,
    /// The path to send on
    #[arg(long, value_enum)]
    to: PathArg,
    /// Move only this end's sending direction, not the other end's too
    #[arg(long)]
    one_end: bool,
    /// Seconds to wait for the ends to report the move
    #[arg(long, default_value_t = 2.0, value_parser = parse_secs)]
    wait: f64,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// rr: round trips (latency); stream: bulk writes (throughput); crr: connect/request/close (rate)
    #[arg(value_enum, hide_possible_values = true)]
    mode: Mode,
    /// Bytes per message (rr, crr) or per write (stream), K/M/G suffixes allowed
    /// [default: 64 for rr and crr, 64K for stream]
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    size: Option<usize>,
    /// Connections in parallel, each on its own client and server thread (crr:
    /// client threads connecting in parallel). Figures are aggregates, plus per connection.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=128))]
    conns: u16,
    /// Idle vmc connections to hold open in this process during each run (shows
    /// that an active connection's cost does not grow with the open ones).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20000))]
    idle: u32,
    /// Measured seconds per transport.
    #[arg(long, value_name = "SECS", default_value_t = 3.0, value_parser = parse_positive_secs)]
    duration: f64,
    /// Unmeasured seconds per transport before measuring.
    #[arg(long, value_name = "SECS", default_value_t = 0.3, value_parser = parse_secs)]
    warmup: f64,
    /// Transports to run, comma separated, in this order (shm, vmc, tcp, unix)
    /// [default: shm,tcp,unix; for crr: vmc,tcp]
    #[arg(
        long,
        value_name = "LIST",
        value_enum,
        value_delimiter = ',',
        hide_possible_values = true
    )]
    transport: Option<Vec<Transport>>,
    /// Print one JSON object per transport on stdout (and nothing else).
    #[arg(long)]
    json: bool,
    /// shm only: ring bytes per direction [default: the library's; vmc: VMC_RING_BYTES].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    capacity: Option<usize>,
    /// shm only: microseconds a blocked side spins before sleeping [default: the library's;
    /// vmc: VMC_SPIN_US].
    #[arg(long, value_name = "N")]
    spin_us: Option<u64>,
    /// Run the whole comparison (yardsticks and every transport) N times back to back,
    /// then print the spread (min, median, max) of each figure.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    repeat: u16,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Much shorter runs (for tests and impatient people); the numbers get noisier.
    #[arg(long)]
    quick: bool,
}

/// Parse a byte count like `64`, `64K`, `64KiB`, `1M`, `1g` (binary multiples), at least 1.
fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: usize = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a byte count (e.g. 64, 64K, 1M)"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size suffix '{other}' (use K, M or G)")),
    };
    let bytes = number
        .checked_mul(1usize << shift)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    if bytes == 0 {
        return Err("must be at least 1 byte".to_owned());
    }
    Ok(bytes)
}

/// Parse a non-negative, finite number of seconds.
fn parse_secs(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err("must be between 0 and 86400 seconds".to_owned());
    }
    Ok(secs)
}

/// Parse a positive, finite number of seconds.
fn parse_positive_secs(text: &str) -> Result<f64, String> {
    let secs = parse_secs(text)?;
    if secs <= 0.0 {
        return Err("must be more than 0 seconds".to_owned());
    }
    Ok(secs)
}

impl BenchArgs {
    /// The suite to run, or why these arguments do not make one.
    fn config(&self) -> Result<BenchConfig, String> {
        let transports = match &self.transport {
            Some(list) => list.clone(),
            None => self.mode.default_transports().to_vec(),
        };
        let unsupported: Vec<&str> = transports
            .iter()
            .filter(|t| !self.mode.supports(**t))
            .map(|t| t.name())
            .collect();
        if !unsupported.is_empty() {
            return Err(format!(
                "the {} mode measures TCP connection set-up: it runs over vmc and tcp only, \
                 not {}",
                self.mode.name(),
                unsupported.join(", ")
            ));
        }
        Ok(BenchConfig {
            mode: self.mode,
            size: self.size.unwrap_or(self.mode.default_size()),
            conns: usize::from(self.conns),
            idle: self.idle as usize,
            duration: Duration::from_secs_f64(self.duration),
            warmup: Duration::from_secs_f64(self.warmup),
            transports,
            tuning: ShmTuning {
                capacity: self.capacity,
                spin: self.spin_us.map(Duration::from_micros),
            },
            progress: !self.json,
        })
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(args) => {
            let config = args.config().unwrap_or_else(|message| {
                // A usage error, reported (and exiting with status 2) like clap's own.
                let mut cli = Cli::command();
                cli.build();
                let bench = cli
                    .find_subcommand_mut("bench")
                    .expect("bench is a subcommand");
                bench
                    .error(clap::error::ErrorKind::ArgumentConflict, message)
                    .exit()
            });
            bench::command(&config, args.json, usize::from(args.repeat))
        }
        Command::Demo(args) => demo::run(args.quick),
        Command::Stat(args) => stat::run(args.json),
        Command::Migrate(args) => stat::migrate(
            &args.id,
            match args.to {
                PathArg::Tcp => vmc_conn::Path::Tcp,
                PathArg::Shm => vmc_conn::Path::Shm,
            },
            args.one_end,
            Duration::from_secs_f64(args.wait),
        ),
        Command::Run(mut args) => {
            let program = args.command.remove(0);
            run::run(program, args.command)
        }
        Command::BenchServer(args) => bench::serve(&args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let who = match cli.command {
        Command::BenchServer(ref args) => {
            format!("vmc bench server ({} {})", args.mode.name(), args.transport)
        }
        _ => "vmc".to_owned(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{who}: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12x").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn seconds_parse() {
        assert_eq!(parse_secs("0"), Ok(0.0));
        assert_eq!(parse_positive_secs("0.25"), Ok(0.25));
        assert!(parse_positive_secs("0").is_err());
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("nan").is_err());
        assert!(parse_secs("inf").is_err());
    }

    #[test]
    fn bench_defaults() {
        let cli = Cli::try_parse_from(["vmc", "bench", "stream"]).unwrap();
        let Command::Bench(args) = cli.command else {
            panic!("not bench")
        };
        let config = args.config().unwrap();
        assert_eq!(config.size, 65536);
        assert_eq!(config.conns, 1);
        assert_eq!(config.transports, Transport::ALL);
        assert_eq!(config.duration, Duration::from_secs(3));
        assert_eq!(config.warmup, Duration::from_millis(300));
        assert_eq!(config.tuning, ShmTuning::default());

        let cli = Cli::try_parse_from(["vmc", "bench", "rr", "--transport", "unix,tcp"]).unwrap();
        let Command::Bench(args) = cli.command else {
            panic!("not bench")
        };
        let config = args.config().unwrap();
        assert_eq!(config.size, 64);
        assert_eq!(config.transports, [Transport::Unix, Transport::Tcp]);
    }

    fn bench_config(args: &[&str]) -> Result<BenchConfig, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        let Command::Bench(args) = cli.command else {
            panic!("not bench")
        };
        args.config()
    }

    #[test]
    fn crr_defaults_to_vmc_and_tcp_and_refuses_the_others() {
        let config = bench_config(&["vmc", "bench", "crr"]).unwrap();
        assert_eq!(config.mode, Mode::Crr);
        assert_eq!(config.size, 64);
        assert_eq!(config.transports, [Transport::Vmc, Transport::Tcp]);
        let err =
            bench_config(&["vmc", "bench", "crr", "--transport", "tcp,unix,shm"]).unwrap_err();
        assert!(err.contains("not unix, shm"), "{err}");
        // rr and stream keep their default; vmc only when asked.
        let config =
            bench_config(&["vmc", "bench", "rr", "--transport", "vmc", "--conns", "8"]).unwrap();
        assert_eq!(config.transports, [Transport::Vmc]);
        assert_eq!(config.conns, 8);
    }

    #[test]
    fn conns_must_be_sensible() {
        assert!(bench_config(&["vmc", "bench", "rr", "--conns", "0"]).is_err());
        assert!(bench_config(&["vmc", "bench", "rr", "--conns", "129"]).is_err());
        assert!(bench_config(&["vmc", "bench", "rr", "--conns", "x"]).is_err());
    }

    #[test]
    fn unknown_transport_lists_the_valid_ones() {
        let err =
            Cli::try_parse_from(["vmc", "bench", "rr", "--transport", "tcp,udp"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("udp"), "{text}");
        assert!(
            text.contains("shm")
                && text.contains("tcp")
                && text.contains("unix")
                && text.contains("vmc"),
            "{text}"
        );
    }
}
