//! Presenting results: the human table, the JSON lines, and the ratios.
//!
//! The ratio column compares each transport with TCP loopback: for rr it is
//! TCP's median round trip divided by this transport's (how many times
//! faster a round trip is), for stream this transport's throughput divided by
//! TCP's, for crr this transport's connection rate divided by TCP's. All read
//! "N.Nx faster" (or "slower"); the TCP row is the baseline, and "-" means TCP
//! was not part of the run.
//!
//! With several connections (`--conns N`) the figures are aggregates: rates
//! and throughputs summed over the connections, latency percentiles over all
//! their transactions together; the per-connection columns divide by N. The
//! `accel` column (vmc runs) is `accelerated/accepted`: of the connections the
//! server accepted, how many carried bytes over shared memory.

use std::fmt::Write as _;

use serde::Serialize;

use super::transport::Transport;
use super::{Mode, RunResult, Suite};

/// One `--json` output line; the field names are a stable interface.
///
/// Every mode has the fields up to `gbytes_per_s` (null where they do not
/// apply) and `conns`, `accepted_conns`, `accelerated_conns` (null unless the
/// transport is vmc); rr and crr add `per_conn_trans_per_s`, stream adds
/// `per_conn_gbytes_per_s`, `memcpy_2copy_gbytes_per_s` and `ring_gbytes_per_s` (the
/// plain-ring yardstick of the same run), crr adds `conns_per_s`.
#[derive(Serialize)]
struct JsonLine {
    mode: Mode,
    transport: Transport,
    size: usize,
    conns: usize,
    seconds: f64,
    rtt_p50_us: Option<f64>,
    rtt_p99_us: Option<f64>,
    trans_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_conn_trans_per_s: Option<f64>,
    gbytes_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_conn_gbytes_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conns_per_s: Option<f64>,
    accepted_conns: u64,
    accelerated_conns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memcpy_2copy_gbytes_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ring_gbytes_per_s: Option<f64>,
    #[serde(skip_serializing_if = "is_zero")]
    idle_conns: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The JSON object (one line, no newline) for one result.
///
/// `memcpy_2copy` is the 2-copy bound and `ring` the plain-ring yardstick, in GB/s;
/// they are emitted only for stream results.
pub fn json_line(result: &RunResult, memcpy_2copy: Option<f64>, ring: Option<f64>) -> String {
    let line = JsonLine {
        mode: result.mode,
        transport: result.transport,
        size: result.size,
        conns: result.conns,
        seconds: result.seconds,
        rtt_p50_us: result.rtt_p50_us,
        rtt_p99_us: result.rtt_p99_us,
        trans_per_s: result.trans_per_s,
        per_conn_trans_per_s: result.per_conn_trans_per_s(),
        gbytes_per_s: result.gbytes_per_s,
        per_conn_gbytes_per_s: result.per_conn_gbytes_per_s(),
        conns_per_s: match result.mode {
            Mode::Crr => result.conns_per_s,
            Mode::Rr | Mode::Stream => None,
        },
        accepted_conns: result.accepted_conns,
        accelerated_conns: result.accelerated_conns,
        memcpy_2copy_gbytes_per_s: match result.mode {
            Mode::Stream => memcpy_2copy,
            Mode::Rr | Mode::Crr => None,
        },
        ring_gbytes_per_s: match result.mode {
            Mode::Stream => ring,
            Mode::Rr | Mode::Crr => None,
        },
        idle_conns: result.idle_conns,
    };
    serde_json::to_string(&line).expect("a plain struct serializes")
}

/// How `result` compares with `tcp` (> 1 means better than TCP), if both figures exist.
pub fn ratio_vs_tcp(result: &RunResult, tcp: Option<&RunResult>) -> Option<f64> {
    let tcp = tcp?;
    let ratio = match result.mode {
        Mode::Rr => tcp.rtt_p50_us? / result.rtt_p50_us?,
        Mode::Stream => result.gbytes_per_s? / tcp.gbytes_per_s?,
        Mode::Crr => result.conns_per_s? / tcp.conns_per_s?,
    };
    ratio.is_finite().then_some(ratio).filter(|r| *r > 0.0)
}

/// The text of the "vs tcp" column.
pub fn fmt_ratio(transport: Transport, ratio: Option<f64>) -> String {
    match ratio {
        _ if transport == Transport::Tcp => "baseline".to_owned(),
        None => "-".to_owned(),
        Some(r) if r >= 1.0 => format!("{r:.1}x faster"),
        Some(r) => format!("{:.1}x slower", 1.0 / r),
    }
}

/// Microseconds with a precision that suits their magnitude.
pub fn fmt_us(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2}")
    } else if us < 1000.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// GB/s with two decimals, or three significant-ish digits below 1.
pub fn fmt_gbps(gbps: f64) -> String {
    if gbps < 1.0 {
        format!("{gbps:.3}")
    } else {
        format!("{gbps:.2}")
    }
}

/// A percentage, with one decimal below 10%.
pub fn fmt_percent(pct: f64) -> String {
    if pct < 10.0 {
        format!("{pct:.1}%")
    } else {
        format!("{pct:.0}%")
    }
}

/// A count with thousands separators: 1234567 -> "1,234,567".
pub fn fmt_count(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The `accel` cell: `accelerated/accepted` for vmc, `-` for the other transports.
pub fn fmt_accel(result: &RunResult) -> String {
    match result.accelerated_conns {
        Some(accelerated) => format!("{accelerated}/{}", result.accepted_conns),
        None => "-".to_owned(),
    }
}

/// "4 connections in parallel, " (or nothing for one).
fn fmt_parallel(conns: usize, what: &str) -> String {
    if conns > 1 {
        format!("{conns} {what} in parallel, ")
    } else {
        String::new()
    }
}

/// A byte size in the largest binary unit that divides it: 65536 -> "64 KiB".
pub fn fmt_size(bytes: usize) -> String {
    const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} B")
}

/// A plain text table: first column left-aligned, the rest right-aligned.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(text, "{cell:<w$}");
            } else {
                let _ = write!(text, "  {cell:>w$}");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// "min / median / max" of `values` formatted by `fmt` ("-" if there are none).
fn spread(mut values: Vec<f64>, fmt: impl Fn(f64) -> String) -> String {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return "-".into();
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    let median = if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    };
    format!(
        "{} / {} / {}",
        fmt(values[0]),
        fmt(median),
        fmt(values[values.len() - 1])
    )
}

/// The spread over several runs of one comparison (`vmc bench --repeat N`): per
/// transport its headline figure, its ratio to TCP and, for stream, its share of
/// each run's own yardsticks, as min / median / max over the runs.
pub fn render_spread(suites: &[Suite]) -> String {
    let Some(first) = suites.first() else {
        return String::new();
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "spread over {} runs of {} {} (min / median / max):",
        suites.len(),
        first.mode.name(),
        fmt_size(first.size)
    );
    let mut transports: Vec<Transport> = Vec::new();
    for r in suites.iter().flat_map(|s| &s.results) {
        if !transports.contains(&r.transport) {
            transports.push(r.transport);
        }
    }
    // Each run's figure for `t`, computed from that run's suite.
    let per_run = |t: Transport, f: &dyn Fn(&Suite, &RunResult) -> Option<f64>| -> Vec<f64> {
        suites
            .iter()
            .filter_map(|s| {
                let r = s.results.iter().find(|r| r.transport == t)?;
                f(s, r)
            })
            .collect()
    };
    let vs_tcp = |s: &Suite, r: &RunResult| {
        ratio_vs_tcp(r, s.results.iter().find(|r| r.transport == Transport::Tcp))
    };
    let ratio = |x: f64| format!("{x:.2}x");
    let mut rows = Vec::new();
    // rr and crr: one headline figure per transport, and its ratio to TCP.
    type Headline = (
        &'static str,
        fn(&RunResult) -> Option<f64>,
        fn(f64) -> String,
    );
    let headline: Option<Headline> = match first.mode {
        Mode::Rr => Some(("p50 us", |r| r.rtt_p50_us, fmt_us)),
        Mode::Crr => Some(("conns/s", |r| r.conns_per_s, fmt_count)),
        Mode::Stream => None,
    };
    let headers: Vec<&str> = match headline {
        Some((header, value, fmt)) => {
            for &t in &transports {
                rows.push(vec![
                    t.name().to_owned(),
                    spread(per_run(t, &|_, r| value(r)), fmt),
                    spread(per_run(t, &vs_tcp), ratio),
                ]);
            }
            vec!["transport", header, "vs tcp"]
        }
        None => {
            let share = |y: fn(&Suite) -> Option<f64>| {
                move |s: &Suite, r: &RunResult| Some(100.0 * r.gbytes_per_s? / y(s)?)
            };
            let ring = share(|s| s.ring_gbytes_per_s);
            let bound = share(two_copy_bound);
            for &t in &transports {
                rows.push(vec![
                    t.name().to_owned(),
                    spread(per_run(t, &|_, r| r.gbytes_per_s), fmt_gbps),
                    spread(per_run(t, &vs_tcp), ratio),
                    spread(per_run(t, &ring), fmt_percent),
                    spread(per_run(t, &bound), fmt_percent),
                ]);
            }
            let yardstick = |name: &str, y: fn(&Suite) -> Option<f64>| {
                vec![
                    name.to_owned(),
                    spread(suites.iter().filter_map(y).collect(), fmt_gbps),
                    String::new(),
                    String::new(),
                    String::new(),
                ]
            };
            rows.push(yardstick("plain ring", |s| s.ring_gbytes_per_s));
            rows.push(yardstick("2-copy bound", two_copy_bound));
            vec![
                "transport",
                "GB/s",
                "vs tcp",
                "% of plain ring",
                "% of 2-copy bound",
            ]
        }
    };
    out.push_str(&table(&headers, &rows));
    out
}

/// The 2-copy bound (GB/s) of a stream suite: half the memcpy bandwidth.
pub fn two_copy_bound(suite: &Suite) -> Option<f64> {
    suite.memcpy_gbytes_per_s.map(|m| m / 2.0)
}

/// The human report of one suite: a title line, for stream the memcpy bound, and the table.
///
/// Optional columns: `conns` and the per-connection figure when the suite ran
/// A table column: header, whether it is shown, and how a result fills its cell.
type Column<'a> = (&'a str, bool, Box<dyn Fn(&RunResult) -> String + 'a>);

/// A latency column (microseconds; "-" where the mode has none).
fn latency_column<'a>(header: &'a str, value: fn(&RunResult) -> Option<f64>) -> Column<'a> {
    (
        header,
        true,
        Box::new(move |r: &RunResult| value(r).map_or("-".into(), fmt_us)),
    )
}

/// more than one connection, `accel` when a vmc run is in it (always for crr).
pub fn render(suite: &Suite) -> String {
    let tcp = suite.results.iter().find(|r| r.transport == Transport::Tcp);
    let many = suite.conns > 1;
    let accel =
        suite.mode == Mode::Crr || suite.results.iter().any(|r| r.accelerated_conns.is_some());
    let mut out = String::new();
    // (header, cell) pairs, filtered by whether the column is shown.
    let columns: Vec<Column> = match suite.mode {
        Mode::Rr => {
            let _ = writeln!(
                out,
                "rr: {} request + {} response per round trip, {}{:.1} s per transport",
                fmt_size(suite.size),
                fmt_size(suite.size),
                fmt_parallel(suite.conns, "connections"),
                suite.duration.as_secs_f64()
            );
            vec![
                ("conns", many, Box::new(|r: &RunResult| r.conns.to_string())),
                ("accel", accel, Box::new(fmt_accel)),
                latency_column("p50 us", |r| r.rtt_p50_us),
                latency_column("p99 us", |r| r.rtt_p99_us),
                (
                    "trans/s",
                    true,
                    Box::new(|r: &RunResult| r.trans_per_s.map_or("-".into(), fmt_count)),
                ),
                (
                    "per conn",
                    many,
                    Box::new(|r: &RunResult| {
                        r.per_conn_trans_per_s().map_or("-".into(), fmt_count)
                    }),
                ),
                (
                    "vs tcp",
                    true,
                    Box::new(move |r: &RunResult| fmt_ratio(r.transport, ratio_vs_tcp(r, tcp))),
                ),
            ]
        }
        Mode::Stream => {
            let bound = two_copy_bound(suite);
            let _ = writeln!(
                out,
                "stream: {} writes, one direction, {}{:.1} s per transport",
                fmt_size(suite.size),
                fmt_parallel(suite.conns, "connections"),
                suite.duration.as_secs_f64()
            );
            if let (Some(memcpy), Some(bound)) = (suite.memcpy_gbytes_per_s, bound) {
                let _ = writeln!(
                    out,
                    "memcpy (one thread, {} chunks): {memcpy:.2} GB/s  =>  2-copy bound: {bound:.2} GB/s",
                    fmt_size(suite.size)
                );
            }
            let ring = suite.ring_gbytes_per_s;
            if let Some(g) = ring {
                let _ = writeln!(
                    out,
                    "plain ring ({} ring alone, two spinning threads, whole writes): {g:.2} GB/s",
                    fmt_size(suite.capacity)
                );
            }
            vec![
                ("conns", many, Box::new(|r: &RunResult| r.conns.to_string())),
                ("accel", accel, Box::new(fmt_accel)),
                (
                    "GB/s",
                    true,
                    Box::new(|r: &RunResult| r.gbytes_per_s.map_or("-".into(), fmt_gbps)),
                ),
                (
                    "per conn",
                    many,
                    Box::new(|r: &RunResult| {
                        r.per_conn_gbytes_per_s().map_or("-".into(), fmt_gbps)
                    }),
                ),
                (
                    "vs tcp",
                    true,
                    Box::new(move |r: &RunResult| fmt_ratio(r.transport, ratio_vs_tcp(r, tcp))),
                ),
                (
                    "% of plain ring",
                    ring.is_some(),
                    Box::new(move |r: &RunResult| match (r.gbytes_per_s, ring) {
                        (Some(g), Some(b)) if b > 0.0 => fmt_percent(100.0 * g / b),
                        _ => "-".into(),
                    }),
                ),
                (
                    "% of 2-copy bound",
                    true,
                    Box::new(move |r: &RunResult| match (r.gbytes_per_s, bound) {
                        (Some(g), Some(b)) if b > 0.0 => fmt_percent(100.0 * g / b),
                        _ => "-".into(),
                    }),
                ),
            ]
        }
        Mode::Crr => {
            let _ = writeln!(
                out,
                "crr: connect + {} request + {} response + close per transaction, {}{:.1} s per transport",
                fmt_size(suite.size),
                fmt_size(suite.size),
                fmt_parallel(suite.conns, "client threads"),
                suite.duration.as_secs_f64()
            );
            vec![
                ("conns", true, Box::new(|r: &RunResult| r.conns.to_string())),
                ("accel", true, Box::new(fmt_accel)),
                latency_column("p50 us", |r| r.rtt_p50_us),
                latency_column("p99 us", |r| r.rtt_p99_us),
                (
                    "conns/s",
                    true,
                    Box::new(|r: &RunResult| r.conns_per_s.map_or("-".into(), fmt_count)),
                ),
                (
                    "vs tcp",
                    true,
                    Box::new(move |r: &RunResult| fmt_ratio(r.transport, ratio_vs_tcp(r, tcp))),
                ),
            ]
        }
    };
    let shown: Vec<&Column> = columns.iter().filter(|(_, show, _)| *show).collect();
    let mut headers = vec!["transport", "size"];
    headers.extend(shown.iter().map(|(header, _, _)| *header));
    let rows: Vec<Vec<String>> = suite
        .results
        .iter()
        .map(|r| {
            let mut row = vec![r.transport.to_string(), fmt_size(r.size)];
            row.extend(shown.iter().map(|(_, _, cell)| cell(r)));
            row
        })
        .collect();
    out.push_str(&table(&headers, &rows));
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn accelerated(transport: Transport, accepted: u64) -> Option<u64> {
        (transport == Transport::Vmc).then_some(accepted)
    }

    fn rr(transport: Transport, p50: f64) -> RunResult {
        RunResult {
            mode: Mode::Rr,
            transport,
            size: 64,
            conns: 1,
            seconds: 1.0,
            rtt_p50_us: Some(p50),
            rtt_p99_us: Some(p50 * 2.0),
            trans_per_s: Some(1e6 / p50),
            gbytes_per_s: None,
            conns_per_s: None,
            accepted_conns: 1,
            accelerated_conns: accelerated(transport, 1),
            idle_conns: 0,
        }
    }

    fn stream(transport: Transport, gbps: f64) -> RunResult {
        RunResult {
            mode: Mode::Stream,
            transport,
            size: 65536,
            conns: 1,
            seconds: 1.0,
            rtt_p50_us: None,
            rtt_p99_us: None,
            trans_per_s: None,
            gbytes_per_s: Some(gbps),
            conns_per_s: None,
            accepted_conns: 1,
            accelerated_conns: accelerated(transport, 1),
            idle_conns: 0,
        }
    }

    fn crr(transport: Transport, conns_per_s: f64, accepted: u64, accel: u64) -> RunResult {
        RunResult {
            mode: Mode::Crr,
            transport,
            size: 64,
            conns: 2,
            seconds: 1.0,
            rtt_p50_us: Some(40.0),
            rtt_p99_us: Some(90.0),
            trans_per_s: Some(conns_per_s),
            gbytes_per_s: None,
            conns_per_s: Some(conns_per_s),
            accepted_conns: accepted,
            accelerated_conns: (transport == Transport::Vmc).then_some(accel),
            idle_conns: 0,
        }
    }

    fn keys(line: &str) -> Vec<String> {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn rr_json_has_exactly_the_documented_fields() {
        let line = json_line(&rr(Transport::Unix, 12.5), Some(9.0), Some(5.0));
        assert!(!line.contains('\n'));
        assert_eq!(
            keys(&line),
            [
                "accelerated_conns",
                "accepted_conns",
                "conns",
                "gbytes_per_s",
                "mode",
                "per_conn_trans_per_s",
                "rtt_p50_us",
                "rtt_p99_us",
                "seconds",
                "size",
                "trans_per_s",
                "transport"
            ]
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["mode"], "rr");
        assert_eq!(v["transport"], "unix");
        assert_eq!(v["size"], 64);
        assert_eq!(v["rtt_p50_us"], 12.5);
        assert_eq!(v["conns"], 1);
        assert_eq!(v["per_conn_trans_per_s"], v["trans_per_s"]);
        assert!(v["gbytes_per_s"].is_null());
        assert!(v["accelerated_conns"].is_null(), "not a vmc run");
    }

    #[test]
    fn crr_json_adds_the_connection_rate() {
        let line = json_line(&crr(Transport::Vmc, 5000.0, 9000, 8999), None, None);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(keys(&line).len(), 13, "{line}");
        assert_eq!(v["mode"], "crr");
        assert_eq!(v["conns"], 2);
        assert_eq!(v["conns_per_s"], 5000.0);
        assert_eq!(v["trans_per_s"], 5000.0);
        assert_eq!(v["per_conn_trans_per_s"], 2500.0);
        assert_eq!(v["accepted_conns"], 9000);
        assert_eq!(v["accelerated_conns"], 8999);
        assert!(v.get("memcpy_2copy_gbytes_per_s").is_none());
        assert!(v.get("ring_gbytes_per_s").is_none());
    }

    #[test]
    fn stream_json_adds_the_memcpy_bound_and_the_plain_ring() {
        let line = json_line(&stream(Transport::Shm, 4.0), Some(8.0), Some(6.0));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(keys(&line).len(), 14, "{line}");
        assert_eq!(v["ring_gbytes_per_s"], 6.0);
        assert_eq!(v["mode"], "stream");
        assert_eq!(v["per_conn_gbytes_per_s"], 4.0);
        assert!(v.get("per_conn_trans_per_s").is_none());
        assert_eq!(v["transport"], "shm");
        assert_eq!(v["gbytes_per_s"], 4.0);
        assert_eq!(v["memcpy_2copy_gbytes_per_s"], 8.0);
        assert!(v["trans_per_s"].is_null());
        assert!(v["rtt_p50_us"].is_null());
    }

    #[test]
    fn ratios_point_the_right_way() {
        let tcp = rr(Transport::Tcp, 30.0);
        let shm = rr(Transport::Shm, 1.5);
        assert_eq!(ratio_vs_tcp(&shm, Some(&tcp)), Some(20.0));
        assert_eq!(fmt_ratio(Transport::Shm, Some(20.0)), "20.0x faster");
        assert_eq!(fmt_ratio(Transport::Unix, Some(0.5)), "2.0x slower");
        assert_eq!(fmt_ratio(Transport::Tcp, Some(1.0)), "baseline");
        assert_eq!(fmt_ratio(Transport::Unix, None), "-");
        assert_eq!(ratio_vs_tcp(&shm, None), None);

        let tcp = stream(Transport::Tcp, 2.0);
        let shm = stream(Transport::Shm, 5.0);
        assert_eq!(ratio_vs_tcp(&shm, Some(&tcp)), Some(2.5));

        let tcp = crr(Transport::Tcp, 10000.0, 1, 0);
        let vmc = crr(Transport::Vmc, 5000.0, 1, 1);
        assert_eq!(ratio_vs_tcp(&vmc, Some(&tcp)), Some(0.5));
    }

    #[test]
    fn number_formats() {
        assert_eq!(fmt_count(1234567.4), "1,234,567");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_count(1000.0), "1,000");
        assert_eq!(fmt_us(1.234), "1.23");
        assert_eq!(fmt_us(29.61), "29.6");
        assert_eq!(fmt_us(1234.4), "1234");
        assert_eq!(fmt_size(64), "64 B");
        assert_eq!(fmt_size(65536), "64 KiB");
        assert_eq!(fmt_size(1 << 20), "1 MiB");
        assert_eq!(fmt_size(1000), "1000 B");
        assert_eq!(fmt_gbps(0.0012), "0.001");
        assert_eq!(fmt_gbps(12.345), "12.35");
        assert_eq!(fmt_percent(4.04), "4.0%");
        assert_eq!(fmt_percent(55.4), "55%");
    }

    #[test]
    fn rr_table_has_a_row_per_transport_and_ratios() {
        let suite = Suite {
            mode: Mode::Rr,
            size: 64,
            conns: 1,
            duration: Duration::from_secs(3),
            memcpy_gbytes_per_s: None,
            ring_gbytes_per_s: None,
            capacity: 128 * 1024,
            results: vec![rr(Transport::Shm, 2.0), rr(Transport::Tcp, 30.0)],
        };
        let text = render(&suite);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("transport"));
        assert!(
            lines[2].starts_with("shm") && lines[2].ends_with("15.0x faster"),
            "{text}"
        );
        assert!(
            lines[3].starts_with("tcp") && lines[3].ends_with("baseline"),
            "{text}"
        );
        // Columns line up: every row as wide as its cells need, right-aligned.
        assert_eq!(
            lines[1].find("p50 us").map(|i| i + 6),
            lines[2].find("2.00").map(|i| i + 4)
        );
    }

    #[test]
    fn stream_table_shows_the_bound_and_its_share() {
        let suite = Suite {
            mode: Mode::Stream,
            size: 65536,
            conns: 1,
            duration: Duration::from_secs(3),
            memcpy_gbytes_per_s: Some(20.0),
            ring_gbytes_per_s: Some(12.0),
            capacity: 128 * 1024,
            results: vec![stream(Transport::Unix, 5.0)],
        };
        let text = render(&suite);
        assert!(text.contains("2-copy bound: 10.00 GB/s"), "{text}");
        let row = text.lines().last().unwrap();
        assert!(row.starts_with("unix") && row.ends_with("50%"), "{text}");
        assert!(row.contains(" - "), "no tcp => '-' ratio: {text}");
        assert!(!text.contains("accel") && !text.contains("conns"), "{text}");
        assert!(text.contains("plain ring (128 KiB ring alone"), "{text}");
        assert!(row.contains(" 42% "), "5 of 12 GB/s: {text}");
    }

    #[test]
    fn the_spread_of_repeated_runs_is_min_median_max_of_each_runs_own_figures() {
        let run = |shm: f64, tcp: f64, ring: f64| Suite {
            mode: Mode::Stream,
            size: 65536,
            conns: 1,
            duration: Duration::from_secs(3),
            memcpy_gbytes_per_s: Some(20.0),
            ring_gbytes_per_s: Some(ring),
            capacity: 128 * 1024,
            results: vec![stream(Transport::Shm, shm), stream(Transport::Tcp, tcp)],
        };
        let suites = [run(4.0, 2.0, 8.0), run(6.0, 1.0, 6.0), run(5.0, 2.5, 10.0)];
        let text = render_spread(&suites);
        assert!(
            text.starts_with("spread over 3 runs of stream 64 KiB"),
            "{text}"
        );
        let row = |name: &str| row_of(&text, name);
        let shm = row("shm");
        // GB/s 4, 5, 6; vs tcp 2.0, 6.0, 2.0 per run; of each run's ring 50, 100, 50%.
        assert!(shm.contains("4.00 / 5.00 / 6.00"), "{text}");
        assert!(shm.contains("2.00x / 2.00x / 6.00x"), "{text}");
        assert!(shm.contains("50% / 50% / 100%"), "{text}");
        assert!(row("plain ring").contains("6.00 / 8.00 / 10.00"), "{text}");
        assert!(
            row("2-copy bound").contains("10.00 / 10.00 / 10.00"),
            "{text}"
        );
        assert_eq!(render_spread(&[]), "");

        let rr_run = |shm: f64| Suite {
            mode: Mode::Rr,
            size: 64,
            memcpy_gbytes_per_s: None,
            ring_gbytes_per_s: None,
            results: vec![rr(Transport::Shm, shm), rr(Transport::Tcp, 30.0)],
            ..run(0.0, 0.0, 0.0)
        };
        let text = render_spread(&[rr_run(2.0), rr_run(3.0)]);
        assert!(text.lines().nth(1).unwrap().contains("p50 us"), "{text}");
        assert!(
            row_of(&text, "shm").contains("2.00 / 2.50 / 3.00"),
            "{text}"
        );
        assert!(
            row_of(&text, "shm").contains("10.00x / 12.50x / 15.00x"),
            "{text}"
        );
        assert!(!text.contains("plain ring"), "{text}");
    }

    fn row_of(text: &str, name: &str) -> String {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row: {text}"))
            .to_owned()
    }

    #[test]
    fn several_connections_and_vmc_add_columns() {
        let mut results = vec![rr(Transport::Vmc, 10.0), rr(Transport::Tcp, 30.0)];
        for r in &mut results {
            r.conns = 4;
            r.accepted_conns = 4;
        }
        results[0].accelerated_conns = Some(3);
        let suite = Suite {
            mode: Mode::Rr,
            size: 64,
            conns: 4,
            duration: Duration::from_secs(2),
            memcpy_gbytes_per_s: None,
            ring_gbytes_per_s: None,
            capacity: 128 * 1024,
            results,
        };
        let text = render(&suite);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("4 connections in parallel"), "{text}");
        let header: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "transport",
                "size",
                "conns",
                "accel",
                "p50",
                "us",
                "p99",
                "us",
                "trans/s",
                "per",
                "conn",
                "vs",
                "tcp"
            ],
            "{text}"
        );
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(row[4], "3/4", "{text}");
        // 1e6 / 10 us = 100,000 trans/s in all, 25,000 per connection.
        assert_eq!(row[7..9], ["100,000", "25,000"], "{text}");
        assert!(lines[3].contains(" - "), "tcp has no accel figure: {text}");
    }

    #[test]
    fn crr_table_has_the_documented_columns() {
        let suite = Suite {
            mode: Mode::Crr,
            size: 64,
            conns: 2,
            duration: Duration::from_secs(2),
            memcpy_gbytes_per_s: None,
            ring_gbytes_per_s: None,
            capacity: 128 * 1024,
            results: vec![
                crr(Transport::Vmc, 5000.0, 10_000, 10_000),
                crr(Transport::Tcp, 20000.0, 40_000, 0),
            ],
        };
        let text = render(&suite);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("crr: connect + 64 B request"),
            "{text}"
        );
        let header: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "transport",
                "size",
                "conns",
                "accel",
                "p50",
                "us",
                "p99",
                "us",
                "conns/s",
                "vs",
                "tcp"
            ],
            "{text}"
        );
        assert!(
            lines[2].starts_with("vmc") && lines[2].ends_with("4.0x slower"),
            "{text}"
        );
        assert!(
            lines[2].contains("10000/10000") && lines[2].contains("5,000"),
            "{text}"
        );
        assert!(
            lines[3].starts_with("tcp") && lines[3].ends_with("baseline"),
            "{text}"
        );
    }
}
