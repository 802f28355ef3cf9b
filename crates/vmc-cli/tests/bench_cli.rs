//! End-to-end tests of the `vmc` binary: `bench --json` output and errors.
//!
//! All three transports run, shm (vmc's channel) included.

use std::process::{Command, Output};

use serde_json::Value;

fn vmc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmc"))
        .args(args)
        .env_remove("VMC_LOG")
        .output()
        .expect("run vmc")
}

fn json_lines(out: &Output) -> Vec<Value> {
    let stdout = String::from_utf8(out.stdout.clone()).expect("utf-8 stdout");
    assert!(
        out.status.success(),
        "vmc failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect()
}

fn positive(v: &Value, field: &str) -> f64 {
    let x = v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} not a number in {v}"));
    assert!(x > 0.0, "{field} = {x} in {v}");
    x
}

const COMMON: [&str; 6] = [
    "--transport",
    "shm,tcp,unix",
    "--duration",
    "0.3",
    "--warmup",
    "0.05",
];

#[test]
fn bench_rr_json() {
    let mut args = vec!["bench", "rr", "--json"];
    args.extend(COMMON);
    let lines = json_lines(&vmc(&args));
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, transport) in lines.iter().zip(["shm", "tcp", "unix"]) {
        assert_eq!(line.as_object().unwrap().len(), 8, "{line}");
        assert_eq!(line["mode"], "rr");
        assert_eq!(line["transport"], transport);
        assert_eq!(line["size"], 64);
        positive(line, "seconds");
        let p50 = positive(line, "rtt_p50_us");
        let p99 = positive(line, "rtt_p99_us");
        assert!(p99 >= p50, "{line}");
        positive(line, "trans_per_s");
        assert!(line["gbytes_per_s"].is_null(), "{line}");
    }
}

#[test]
fn bench_stream_json() {
    let mut args = vec!["bench", "stream", "--json", "--size", "32K"];
    args.extend(COMMON);
    let lines = json_lines(&vmc(&args));
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, transport) in lines.iter().zip(["shm", "tcp", "unix"]) {
        assert_eq!(line.as_object().unwrap().len(), 9, "{line}");
        assert_eq!(line["mode"], "stream");
        assert_eq!(line["transport"], transport);
        assert_eq!(line["size"], 32768);
        positive(line, "seconds");
        positive(line, "gbytes_per_s");
        positive(line, "memcpy_2copy_gbytes_per_s");
        assert!(line["trans_per_s"].is_null(), "{line}");
        assert!(line["rtt_p50_us"].is_null(), "{line}");
    }
}

#[test]
fn bench_table_output() {
    let out = vmc(&[
        "bench",
        "rr",
        "--transport",
        "unix",
        "--duration",
        "0.1",
        "--warmup",
        "0",
        "--size",
        "7",
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines().skip(1);
    assert!(lines.next().unwrap().starts_with("transport"), "{stdout}");
    let row = lines.next().unwrap();
    assert!(row.starts_with("unix") && row.ends_with('-'), "{stdout}");
}

#[test]
fn unknown_transport_is_an_error_listing_valid_ones() {
    let out = vmc(&["bench", "rr", "--transport", "tcp,carrier-pigeon"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("carrier-pigeon"), "{stderr}");
    for name in ["shm", "tcp", "unix"] {
        assert!(stderr.contains(name), "{stderr}");
    }
}

#[test]
fn help_lists_the_subcommands() {
    let out = vmc(&["--help"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("bench") && stdout.contains("demo"),
        "{stdout}"
    );
    assert!(!stdout.contains("__bench-server"), "{stdout}");
}

#[test]
fn demo_quick_prints_tables_and_explanation() {
    let out = vmc(&["demo", "--quick"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}\n{stdout}");
    for needle in [
        "transport",
        "% of 2-copy bound",
        "What the numbers mean",
        "\nshm ",
        "\ntcp ",
        "\nunix ",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}
