//! `vmc stat`: this user's registered listeners and live connections; `vmc
//! migrate`: move a live connection between shared memory and TCP.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::Serialize;
use vmc_conn::registry::{ListenerEntry, Registry};
use vmc_conn::stats::ConnStat;

#[derive(Serialize)]
struct ListenerRow {
    /// 0 for another user's listener (the shared registry names no process).
    pid: u32,
    uid: u32,
    addr: std::net::SocketAddr,
    netns: String,
    offers: std::path::PathBuf,
}

impl From<&ListenerEntry> for ListenerRow {
    fn from(e: &ListenerEntry) -> ListenerRow {
        ListenerRow {
            pid: e.pid,
            uid: e.uid,
            addr: e.addr,
            netns: e.netns.to_string(),
            offers: e.offers.clone(),
        }
    }
}

/// Runs `vmc stat`.
pub fn run(json: bool) -> Result<()> {
    let registry = Registry::open_default().context("opening the vmc registry")?;
    let mut listeners: Vec<ListenerRow> = registry
        .listeners()?
        .iter()
        .map(ListenerRow::from)
        .collect();
    // Root sees every user's listeners too, as published for other users.
    if vmc_os::euid() == 0 {
        if let Ok(public) = Registry::open_public() {
            if let Ok(all) = public.listeners() {
                listeners.extend(all.iter().filter(|e| e.uid != 0).map(ListenerRow::from));
            }
        }
    }
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
        let _ = writeln!(
            out,
            "  {:<8} {:<8} {:<24} {:<18}",
            "pid", "uid", "address", "netns"
        );
        for l in listeners {
            let pid = match l.pid {
                0 => "-".to_string(),
                p => p.to_string(),
            };
            let _ = writeln!(
                out,
                "  {:<8} {:<8} {:<24} {:<18}",
                pid,
                l.uid,
                l.addr.to_string(),
                l.netns
            );
        }
    }
    let _ = writeln!(out, "connections ({}):", conns.len());
    if !conns.is_empty() {
        let _ = writeln!(
            out,
            "  {:<10} {:<22} {:<22} {:<9} {:>12} {:>12} {:>12} {:>12}  fallback",
            "id", "local", "peer", "path", "shm in", "shm out", "tcp in", "tcp out"
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
                "  {:<10} {:<22} {:<22} {:<9} {:>12} {:>12} {:>12} {:>12}  {}",
                c.id,
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

/// Runs `vmc migrate ID --to PATH`: asks the connection `id` (as `vmc stat` lists
/// it) and, unless `one_end`, the other end of it (the connection of this user
/// whose addresses mirror it) to send on `to`. Each end moves its sending
/// direction at its next write, at an exact byte boundary; this waits up to
/// `wait` to report that they did.
pub fn migrate(
    id: &str,
    to: vmc_conn::Path,
    one_end: bool,
    wait: std::time::Duration,
) -> Result<()> {
    let conns = vmc_conn::stats::connections().context("reading connection statistics")?;
    let Some(c) = conns.iter().find(|c| c.id == id) else {
        anyhow::bail!("no live connection {id} (see `vmc stat`)");
    };
    let mut ends = vec![c.clone()];
    if !one_end {
        match conns
            .iter()
            .find(|o| o.local == c.peer && o.peer == c.local)
        {
            Some(o) => ends.push(o.clone()),
            None => eprintln!(
                "vmc migrate: the other end of {id} is not a vmc connection of this user; \
                 moving this end only"
            ),
        }
    }
    let name = |p: vmc_conn::Path| match p {
        vmc_conn::Path::Tcp => "tcp",
        vmc_conn::Path::Shm => "shm",
    };
    for e in &ends {
        if to == vmc_conn::Path::Shm && e.path != "shm" {
            anyhow::bail!(
                "{} ({} -> {}) is not accelerated ({}): it cannot send on shm",
                e.id,
                e.local,
                e.peer,
                e.fallback.unwrap_or(e.path)
            );
        }
    }
    for e in &ends {
        vmc_conn::stats::request_path(e, to).with_context(|| format!("asking {} to move", e.id))?;
        println!(
            "asked {} ({} -> {}) to send on {}",
            e.id,
            e.local,
            e.peer,
            name(to)
        );
    }
    let deadline = std::time::Instant::now() + wait;
    loop {
        let now = vmc_conn::stats::connections().context("reading connection statistics")?;
        let pending: Vec<&ConnStat> = ends
            .iter()
            .filter(|e| {
                now.iter()
                    .find(|n| n.id == e.id && n.local == e.local)
                    .is_some_and(|n| n.send_path != name(to))
            })
            .collect();
        if pending.is_empty() {
            println!("done: every end asked now sends on {}", name(to));
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            for p in pending {
                println!("{} has not written since: it moves at its next write", p.id);
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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
