//! Running the real `ferry` daemon for the benchmarks: release build, its "synced" log lines,
//! its peak memory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use ferry_sandbox::{Netns, Process, Signal};

use crate::workspace_root;

/// `explicit` when given (checked to exist), else a release build of this checkout.
pub fn binary(explicit: Option<&Path>) -> Result<PathBuf> {
    match explicit {
        Some(path) => {
            ensure!(path.is_file(), "--ferry {}: no such file", path.display());
            Ok(path.canonicalize()?)
        }
        None => build_release(),
    }
}

/// Builds `ferry` in release mode (waits for cargo's lock if another build runs) and returns it.
pub fn build_release() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("building ferry (release)…");
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--release", "--quiet", "-p", "proxy", "--bin", "ferry"])
        .status()
        .context("building ferry")?;
    ensure!(status.success(), "building ferry failed: {status}");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
    Ok(target.join("release/ferry"))
}

/// One `synced` line of `ferry run`.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncLine {
    pub full: bool,
    pub services: usize,
    pub operations: usize,
    /// The backend's own measure: compile + kernel apply.
    pub took_ms: f64,
}

/// Every `synced` line in ferry's output, in order.
pub fn sync_lines(output: &str) -> Vec<SyncLine> {
    output
        .lines()
        .filter(|l| l.contains(" synced"))
        .filter_map(|l| {
            let field = |name: &str| {
                l.split_whitespace().find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            };
            Some(SyncLine {
                full: field("full")? == "true",
                services: field("services")?.parse().ok()?,
                operations: field("operations")?.parse().ok()?,
                took_ms: field("took_ms")?.parse().ok()?,
            })
        })
        .collect()
}

/// Waits until ferry has logged `n` syncs; fails when it exits or after `timeout`.
pub fn wait_syncs(proc: &Process, n: usize, timeout: Duration) -> Result<Vec<SyncLine>> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = proc.output();
        let lines = sync_lines(&out);
        if lines.len() >= n {
            return Ok(lines);
        }
        if out.contains("sync failed") {
            bail!("ferry reported a failed sync:\n{}", tail(&out, 20));
        }
        if let Some(status) = proc.try_wait()? {
            bail!("ferry exited ({status}):\n{}", tail(&proc.output(), 20));
        }
        if Instant::now() >= deadline {
            bail!("ferry did not log {n} syncs within {timeout:?}:\n{}", tail(&out, 20));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Peak resident set size (VmHWM) of `pid`, in KiB; checks that `pid` runs `ferry` (`ip netns
/// exec` execs its command, so the spawned pid is ferry's own).
pub fn peak_rss_kib(pid: u32, ferry: &Path) -> Result<u64> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).context("reading ferry's /proc/<pid>/exe")?;
    ensure!(exe == ferry.canonicalize()?, "pid {pid} runs {}, not {}", exe.display(), ferry.display());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading ferry's status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM in /proc/<pid>/status")
}

/// Stops ferry (SIGTERM, then SIGKILL after 10 s) and removes what it programmed in `ns`.
pub fn stop_and_clean(ferry: &Path, proc: &Process, ns: &Netns, backend: &str) -> Result<()> {
    proc.signal(Signal::SIGTERM)?;
    if proc.wait_timeout(Duration::from_secs(10)).is_err() {
        proc.kill()?;
    }
    ns.exec(&[ferry.display().to_string(), "cleanup".into(), "--backend".into(), backend.into()])
        .context("ferry cleanup")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_lines_should_be_parsed_from_ferrys_log() {
        let log = "2025-01-01T00:00:00.1Z  INFO proxy::cli::run: ferry starting backend=\"nftables\"\n\
                   2025-01-01T00:00:01.1Z  INFO proxy::cli::run: synced full=true services=1000 ports=1000 changed=1000 operations=12000 took_ms=120.5\n\
                   2025-01-01T00:00:02.1Z  INFO proxy::cli::run: synced full=false services=1000 ports=1000 changed=1 operations=3 took_ms=4.2\n";
        let lines = sync_lines(log);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], SyncLine { full: true, services: 1000, operations: 12000, took_ms: 120.5 });
        assert!(!lines[1].full && lines[1].took_ms == 4.2);
    }
}
