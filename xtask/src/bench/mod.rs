//! Shared pieces of `cargo xtask bench-kernel` and `cargo xtask bench-datapath`: the synthetic
//! services, the kube-proxy-shaped reference ruleset, running ferry, the report (machine,
//! tables, JSON) and the SVG plots.

pub mod ferry;
pub mod kube_proxy;
pub mod services;
pub mod svg;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use ferry_sandbox::Netns;
use serde::Serialize;

use crate::workspace_root;

/// What the numbers were measured on; printed and kept in the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: u64,
    pub kernel: String,
    pub nft: String,
    /// The commit ferry was built from (`--ferry-label` for a `--ferry` binary).
    pub ferry_commit: String,
    /// 1-, 5- and 15-minute load averages when the run started: others may be building.
    pub loadavg_at_start: String,
}

impl Machine {
    /// `ferry_label` describes a `--ferry` binary; without it, ferry is this checkout.
    pub fn detect(ferry_label: Option<&str>) -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| (kib + (1 << 19)) >> 20);
        let output = |program: &str, args: &[&str]| {
            Command::new(program)
                .current_dir(workspace_root())
                .args(args)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        let commit = match ferry_label {
            Some(label) => label.to_owned(),
            None => {
                let mut commit = output("git", &["rev-parse", "--short", "HEAD"]);
                if !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
                    commit.push_str(" (with uncommitted changes)");
                }
                commit
            }
        };
        Self {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            nft: output("nft", &["--version"]),
            ferry_commit: commit,
            loadavg_at_start: loadavg(),
        }
    }

    pub fn print(&self) {
        println!(
            "machine: {} × {}, {} GiB, kernel {}, {}, ferry {}, load average {}",
            self.cpus,
            self.cpu,
            self.memory_gib,
            self.kernel,
            self.nft,
            self.ferry_commit,
            self.loadavg_at_start
        );
    }
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Nearest-rank percentile `p` (0–100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints rows under headers, columns padded to their widest cell.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:>w$}")).collect();
        println!("  {}", padded.join("  "));
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// `v` with one decimal, or `—` when absent.
pub fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") })
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("encoding JSON")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

pub fn write_svg(path: &Path, svg: &str) -> Result<()> {
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Runs `args` inside `ns` and returns how long it took and its stdout; `input` goes to its
/// stdin. Killed after `timeout`. The command is forked from a thread that entered the
/// namespace (no `ip netns exec` in the measured time).
pub fn timed_command(
    ns: &Netns,
    args: &[&str],
    input: Option<&str>,
    timeout: Duration,
) -> Result<(Duration, String)> {
    let (program, rest) = args.split_first().context("empty command")?;
    let shown = args.join(" ");
    ns.run(|| -> Result<(Duration, String)> {
        let started = Instant::now();
        let mut child = Command::new(program)
            .args(rest)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        let writer = match (input, child.stdin.take()) {
            (Some(text), Some(mut stdin)) => {
                let text = text.to_owned();
                Some(std::thread::spawn(move || stdin.write_all(text.as_bytes())))
            }
            _ => None,
        };
        let mut pipes = Vec::new();
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ] {
            pipes.push(pipe.map(|mut p| {
                std::thread::spawn(move || {
                    let mut text = String::new();
                    let _ = p.read_to_string(&mut text);
                    text
                })
            }));
        }
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for the command")? {
                break status;
            }
            if started.elapsed() > timeout {
                // Our own child: kill it through its handle.
                let _ = child.kill();
                let _ = child.wait();
                bail!("{shown} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let took = started.elapsed();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        let mut texts = pipes.into_iter().map(|p| p.and_then(|t| t.join().ok()).unwrap_or_default());
        let (stdout, stderr) = (texts.next().unwrap_or_default(), texts.next().unwrap_or_default());
        if !status.success() {
            bail!("{shown} failed ({status}): {}", stderr.trim().chars().take(2000).collect::<String>());
        }
        Ok((took, stdout))
    })?
}

/// A private scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ferry-{what}-{}", std::process::id()));
        // A leftover of a killed run with the same pid holds only generated files.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_should_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
