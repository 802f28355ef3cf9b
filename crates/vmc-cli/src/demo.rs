//! `vmc demo`: a short, explained comparison of vmc (its channel alone, and a TCP
//! connection it accelerates), TCP and Unix sockets.
//!
//! It runs the same code as `vmc bench` twice, rr with 64-byte messages and
//! stream with 64 KiB writes, over every transport for 1.5 s each (0.3 s with
//! `--quick`), prints both tables and then explains what the figures mean.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use crate::bench::report::{self, fmt_us};
use crate::bench::transport::{ShmTuning, Transport};
use crate::bench::{self, BenchConfig, Mode, Suite};

/// What the demo compares: vmc's channel, a vmc-accelerated TCP connection, and
/// the two kernel paths a co-resident pair uses today.
const DEMO_TRANSPORTS: [Transport; 4] = [
    Transport::Shm,
    Transport::Vmc,
    Transport::Tcp,
    Transport::Unix,
];

/// Run the demo; an error if any transport failed (after printing what did run).
pub fn run(quick: bool) -> Result<()> {
    let (duration, warmup) = if quick {
        (Duration::from_millis(300), Duration::from_millis(50))
    } else {
        (Duration::from_millis(1500), Duration::from_millis(200))
    };
    let config = |mode: Mode| BenchConfig {
        mode,
        size: mode.default_size(),
        conns: 1,
        idle: 0,
        duration,
        warmup,
        transports: DEMO_TRANSPORTS.to_vec(),
        tuning: ShmTuning::default(),
        progress: true,
    };

    println!(
        "vmc demo: the same traffic over vmc's shared-memory channel (shm), a TCP\n\
         connection vmc accelerates (vmc), TCP over loopback (tcp) and a Unix-domain\n\
         socket (unix), {:.1} s per run.\n",
        duration.as_secs_f64()
    );
    let mut failures = Vec::new();
    let mut suites = Vec::new();
    for mode in [Mode::Rr, Mode::Stream] {
        let (suite, failed) = bench::run_suite(&config(mode));
        if !suite.results.is_empty() {
            println!("{}", report::render(&suite));
        }
        failures.extend(failed);
        suites.push(suite);
    }
    print!("{}", explain(&suites[0], &suites[1]));
    bench::fail_if_any(&failures, 2 * DEMO_TRANSPORTS.len())
}

fn result(suite: &Suite, transport: Transport) -> Option<&bench::RunResult> {
    suite.results.iter().find(|r| r.transport == transport)
}

/// Word-wrap `text` into a "- " bullet of at most `WIDTH` columns; a
/// no-break space (U+00A0) keeps two words together and prints as a space.
fn bullet(out: &mut String, text: &str) {
    const WIDTH: usize = 78;
    let mut line = String::from("-");
    for word in text.split([' ', '\n']).filter(|w| !w.is_empty()) {
        let word = word.replace('\u{a0}', " ");
        let word = word.as_str();
        if line.len() + 1 + word.len() > WIDTH && line.len() > 2 {
            out.push_str(&line);
            out.push('\n');
            line = String::from(" ");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// The closing explanation, quoting the measured figures where they exist.
fn explain(rr: &Suite, stream: &Suite) -> String {
    let mut out = String::from("What the numbers mean:\n");
    bullet(
        &mut out,
        "A round trip (rr) is one 64-byte request plus one 64-byte response between \
         two processes; p50 is the median round trip, p99 the one that only 1% exceed, \
         and trans/s counts complete round trips per second on one connection.",
    );
    let tcp_rr = result(rr, Transport::Tcp);
    // Quote shm if it ran, otherwise whatever else did.
    let other = [Transport::Shm, Transport::Unix]
        .into_iter()
        .find_map(|t| result(rr, t));
    let quoted = other.zip(tcp_rr).and_then(|(x, tcp)| {
        Some((
            x,
            x.rtt_p50_us?,
            tcp.rtt_p50_us?,
            report::ratio_vs_tcp(x, Some(tcp))?,
        ))
    });
    let mut ratios = String::from(
        "\"vs tcp\" compares each transport with TCP over loopback: TCP's median round \
         trip divided by this one's for rr, this throughput divided by TCP's for stream.",
    );
    if let Some((x, x_us, tcp_us, ratio)) = quoted {
        let _ = write!(
            ratios,
            " Here a {} round trip took {} us against {} us for TCP: {}.",
            x.transport,
            fmt_us(x_us),
            fmt_us(tcp_us),
            report::fmt_ratio(x.transport, Some(ratio)).replace(' ', "\u{a0}")
        );
    }
    bullet(&mut out, &ratios);
    bullet(
        &mut out,
        "shm is vmc's own channel: the bytes move through rings in memory that both \
         processes map, without a system call per message while both sides are busy; \
         tcp and unix go through the kernel on every send and receive. vmc is a real \
         TCP connection (vmc_conn::TcpStream) whose bytes vmc moved onto such a \
         channel, because both ends run vmc on this machine: same program, same \
         socket addresses, the speed of shm; `accel` says it really happened.",
    );
    let bound = report::two_copy_bound(stream)
        .map(|b| format!(" (here {b:.1} GB/s)"))
        .unwrap_or_default();
    bullet(
        &mut out,
        &format!(
            "stream is one-way bulk transfer in 64 KiB writes. A ring copies each byte \
             twice (into the ring, then out of it); half of what one core can memcpy is \
             the 2-copy bound{bound}, the yardstick for how close a stream comes to the \
             machine's limit. The two copies run on two cores at once, so a ring can \
             reach it, and in a good run pass it slightly; the bytes must still cross \
             between the cores' caches, which keeps it from going much beyond."
        ),
    );
    if let Some(ring) = stream.ring_gbytes_per_s {
        let share = result(stream, Transport::Shm)
            .and_then(|r| r.gbytes_per_s)
            .map(|g| format!("; shm kept {:.0}% of it", 100.0 * g / ring))
            .unwrap_or_default();
        bullet(
            &mut out,
            &format!(
                "The plain ring ({ring:.1} GB/s here{share}) is the other yardstick: the \
                 same ring alone between two threads that only spin, measured just before \
                 the transports. It is what a ring of this size does on the two cores this \
                 run got, which may share a cache or be far apart; a transport's share of \
                 it is what its protocol and its waiting keep."
            ),
        );
    }
    bullet(
        &mut out,
        "Figures vary from run to run, more so on a shared or virtual machine: trust \
         the ratios more than the absolute values, and use `vmc bench` with a longer \
         --duration for steadier numbers.",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::RunResult;

    #[test]
    fn explanation_quotes_the_figures_when_present() {
        let rr_result = |transport, p50| RunResult {
            mode: Mode::Rr,
            transport,
            size: 64,
            conns: 1,
            seconds: 1.0,
            rtt_p50_us: Some(p50),
            rtt_p99_us: Some(p50),
            trans_per_s: Some(1.0),
            gbytes_per_s: None,
            conns_per_s: None,
            accepted_conns: 1,
            accelerated_conns: None,
            idle_conns: 0,
        };
        let rr = Suite {
            mode: Mode::Rr,
            size: 64,
            conns: 1,
            duration: Duration::from_secs(1),
            memcpy_gbytes_per_s: None,
            ring_gbytes_per_s: None,
            capacity: 128 * 1024,
            results: vec![
                rr_result(Transport::Shm, 2.0),
                rr_result(Transport::Tcp, 20.0),
            ],
        };
        let stream = Suite {
            mode: Mode::Stream,
            size: 65536,
            conns: 1,
            duration: Duration::from_secs(1),
            memcpy_gbytes_per_s: Some(30.0),
            ring_gbytes_per_s: Some(12.0),
            capacity: 128 * 1024,
            results: vec![],
        };
        let text = explain(&rr, &stream);
        assert!(text.contains("10.0x faster"), "{text}");
        assert!(text.contains("here 15.0 GB/s"), "{text}");
        assert!(text.contains("12.0 GB/s here"), "{text}");
        assert!(text.lines().all(|l| l.len() <= 78), "{text}");
        let empty = Suite {
            results: vec![],
            ..rr
        };
        assert!(!explain(&empty, &stream).contains("Here a"));
    }
}
