//! Presenting results: the human table, the JSON lines, and the ratios.
//!
//! The ratio column compares each transport with TCP loopback: for rr it is
//! TCP's median round trip divided by this transport's (how many times
//! faster a round trip is), for stream this transport's throughput divided by
//! TCP's. Both read "N.Nx faster" (or "slower"); the TCP row is the baseline,
//! and "-" means TCP was not part of the run.

use std::fmt::Write as _;

use serde::Serialize;

use super::transport::Transport;
use super::{Mode, RunResult, Suite};

/// One `--json` output line; the field names are a stable interface.
#[derive(Serialize)]
struct JsonLine {
    mode: Mode,
    transport: Transport,
    size: usize,
    seconds: f64,
    rtt_p50_us: Option<f64>,
    rtt_p99_us: Option<f64>,
    trans_per_s: Option<f64>,
    gbytes_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memcpy_2copy_gbytes_per_s: Option<f64>,
}

/// The JSON object (one line, no newline) for one result.
///
/// `memcpy_2copy` is the 2-copy bound in GB/s; it is emitted only for stream results.
pub fn json_line(result: &RunResult, memcpy_2copy: Option<f64>) -> String {
    let line = JsonLine {
        mode: result.mode,
        transport: result.transport,
        size: result.size,
        seconds: result.seconds,
        rtt_p50_us: result.rtt_p50_us,
        rtt_p99_us: result.rtt_p99_us,
        trans_per_s: result.trans_per_s,
        gbytes_per_s: result.gbytes_per_s,
        memcpy_2copy_gbytes_per_s: match result.mode {
            Mode::Stream => memcpy_2copy,
            Mode::Rr => None,
        },
    };
    serde_json::to_string(&line).expect("a plain struct serializes")
}

/// How `result` compares with `tcp` (> 1 means better than TCP), if both figures exist.
pub fn ratio_vs_tcp(result: &RunResult, tcp: Option<&RunResult>) -> Option<f64> {
    let tcp = tcp?;
    let ratio = match result.mode {
        Mode::Rr => tcp.rtt_p50_us? / result.rtt_p50_us?,
        Mode::Stream => result.gbytes_per_s? / tcp.gbytes_per_s?,
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

/// The 2-copy bound (GB/s) of a stream suite: half the memcpy bandwidth.
pub fn two_copy_bound(suite: &Suite) -> Option<f64> {
    suite.memcpy_gbytes_per_s.map(|m| m / 2.0)
}

/// The human report of one suite: a title line, for stream the memcpy bound, and the table.
pub fn render(suite: &Suite) -> String {
    let tcp = suite.results.iter().find(|r| r.transport == Transport::Tcp);
    let mut out = String::new();
    match suite.mode {
        Mode::Rr => {
            let _ = writeln!(
                out,
                "rr: {} request + {} response per round trip, {:.1} s per transport",
                fmt_size(suite.size),
                fmt_size(suite.size),
                suite.duration.as_secs_f64()
            );
            let rows: Vec<Vec<String>> = suite
                .results
                .iter()
                .map(|r| {
                    vec![
                        r.transport.to_string(),
                        fmt_size(r.size),
                        r.rtt_p50_us.map_or("-".into(), fmt_us),
                        r.rtt_p99_us.map_or("-".into(), fmt_us),
                        r.trans_per_s.map_or("-".into(), fmt_count),
                        fmt_ratio(r.transport, ratio_vs_tcp(r, tcp)),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["transport", "size", "p50 us", "p99 us", "trans/s", "vs tcp"],
                &rows,
            ));
        }
        Mode::Stream => {
            let bound = two_copy_bound(suite);
            let _ = writeln!(
                out,
                "stream: {} writes, one direction, {:.1} s per transport",
                fmt_size(suite.size),
                suite.duration.as_secs_f64()
            );
            if let (Some(memcpy), Some(bound)) = (suite.memcpy_gbytes_per_s, bound) {
                let _ = writeln!(
                    out,
                    "memcpy (one thread, {} chunks): {memcpy:.2} GB/s  =>  2-copy bound: {bound:.2} GB/s",
                    fmt_size(suite.size)
                );
            }
            let rows: Vec<Vec<String>> = suite
                .results
                .iter()
                .map(|r| {
                    let of_bound = match (r.gbytes_per_s, bound) {
                        (Some(g), Some(b)) if b > 0.0 => fmt_percent(100.0 * g / b),
                        _ => "-".into(),
                    };
                    vec![
                        r.transport.to_string(),
                        fmt_size(r.size),
                        r.gbytes_per_s.map_or("-".into(), fmt_gbps),
                        fmt_ratio(r.transport, ratio_vs_tcp(r, tcp)),
                        of_bound,
                    ]
                })
                .collect();
            out.push_str(&table(
                &["transport", "size", "GB/s", "vs tcp", "% of 2-copy bound"],
                &rows,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rr(transport: Transport, p50: f64) -> RunResult {
        RunResult {
            mode: Mode::Rr,
            transport,
            size: 64,
            seconds: 1.0,
            rtt_p50_us: Some(p50),
            rtt_p99_us: Some(p50 * 2.0),
            trans_per_s: Some(1e6 / p50),
            gbytes_per_s: None,
        }
    }

    fn stream(transport: Transport, gbps: f64) -> RunResult {
        RunResult {
            mode: Mode::Stream,
            transport,
            size: 65536,
            seconds: 1.0,
            rtt_p50_us: None,
            rtt_p99_us: None,
            trans_per_s: None,
            gbytes_per_s: Some(gbps),
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
        let line = json_line(&rr(Transport::Unix, 12.5), Some(9.0));
        assert!(!line.contains('\n'));
        assert_eq!(
            keys(&line),
            [
                "gbytes_per_s",
                "mode",
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
        assert!(v["gbytes_per_s"].is_null());
    }

    #[test]
    fn stream_json_adds_the_memcpy_bound() {
        let line = json_line(&stream(Transport::Shm, 4.0), Some(8.0));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(keys(&line).len(), 9);
        assert_eq!(v["mode"], "stream");
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
            duration: Duration::from_secs(3),
            memcpy_gbytes_per_s: None,
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
            duration: Duration::from_secs(3),
            memcpy_gbytes_per_s: Some(20.0),
            results: vec![stream(Transport::Unix, 5.0)],
        };
        let text = render(&suite);
        assert!(text.contains("2-copy bound: 10.00 GB/s"), "{text}");
        let row = text.lines().last().unwrap();
        assert!(row.starts_with("unix") && row.ends_with("50%"), "{text}");
        assert!(row.contains(" - "), "no tcp => '-' ratio: {text}");
    }
}
