//! `vmc stat`: this user's registered listeners and live connections.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::Serialize;
use vmc_conn::registry::{ListenerEntry, Registry};
use vmc_conn::stats::ConnStat;

#[derive(Serialize)]
struct ListenerRow {
    pid: u32,
    addr: std::net::SocketAddr,
    netns: String,
    rendezvous: std::path::PathBuf,
}

impl From<&ListenerEntry> for ListenerRow {
    fn from(e: &ListenerEntry) -> ListenerRow {
        ListenerRow {
            pid: e.pid,
            addr: e.addr,
            netns: e.netns.to_string(),
            rendezvous: e.rendezvous.clone(),
        }
    }
}

/// Runs `vmc stat`.
pub fn run(json: bool) -> Result<()> {
    let registry = Registry::open_default().context("opening the vmc registry")?;
    let listeners: Vec<ListenerRow> = registry
        .listeners()?
        .iter()
        .map(ListenerRow::from)
        .collect();
    let conns = vmc_conn::stats::connections().context("reading connection statistics")?;
    if json {
        for l in &listeners {
            println!(
                "{}",
                serde_json::json!({ "kind": "listener", "listener": l })
            );
        }
        for c in &conns {
            println!(
                "{}",
                serde_json::json!({ "kind": "connection", "connection": c })
            );
        }
        return Ok(());
    }
    print!("{}", render(&listeners, &conns));
    Ok(())
}

fn render(listeners: &[ListenerRow], conns: &[ConnStat]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "listeners ({}):", listeners.len());
    if !listeners.is_empty() {
        let _ = writeln!(out, "  {:<8} {:<24} {:<18}", "pid", "address", "netns");
        for l in listeners {
            let _ = writeln!(
                out,
                "  {:<8} {:<24} {:<18}",
                l.pid,
                l.addr.to_string(),
                l.netns
            );
        }
    }
    let _ = writeln!(out, "connections ({}):", conns.len());
    if !conns.is_empty() {
        let _ = writeln!(
            out,
            "  {:<8} {:<22} {:<22} {:<9} {:>12} {:>12} {:>12} {:>12}  fallback",
            "pid", "local", "peer", "path", "shm in", "shm out", "tcp in", "tcp out"
        );
        for c in conns {
            // An accelerated connection shows each direction's path: send/receive.
            let path = if c.path == "shm" {
                format!("{}/{}", c.send_path, c.recv_path)
            } else {
                c.path.to_string()
            };
            let _ = writeln!(
                out,
                "  {:<8} {:<22} {:<22} {:<9} {:>12} {:>12} {:>12} {:>12}  {}",
                c.pid,
                c.local.to_string(),
                c.peer.to_string(),
                path,
                c.shm_in,
                c.shm_out,
                c.tcp_in,
                c.tcp_out,
                c.fallback.unwrap_or("-")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_tables_render() {
        let out = render(&[], &[]);
        assert!(
            out.contains("listeners (0)") && out.contains("connections (0)"),
            "{out}"
        );
    }
}
