//! Runs nftables scripts. Each script is one `nft -f` invocation, which the kernel applies as
//! one atomic transaction.

use std::io::Write;
use std::process::{Command, Stdio};

use super::NftError;

/// Something that applies nft scripts and lists objects; the real one runs the `nft` binary.
pub trait NftRunner: Send {
    fn apply(&mut self, script: &str) -> Result<(), NftError>;
    /// `nft -j <args>` output.
    fn list_json(&mut self, args: &[&str]) -> Result<String, NftError>;
}

/// Runs `nft`, optionally inside a named network namespace (`ip netns exec`), which is how
/// tests and benchmarks program a sandbox without entering it themselves.
#[derive(Debug, Clone, Default)]
pub struct NftCommand {
    pub netns: Option<String>,
}

impl NftCommand {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn in_netns(name: impl Into<String>) -> Self {
        Self { netns: Some(name.into()) }
    }

    fn command(&self, args: &[&str]) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]).args(args);
                c
            }
            None => {
                let mut c = Command::new("nft");
                c.args(args);
                c
            }
        }
    }
}

impl NftRunner for NftCommand {
    fn apply(&mut self, script: &str) -> Result<(), NftError> {
        let mut child = self
            .command(&["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(NftError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).map_err(NftError::Spawn)?;
        }
        let out = child.wait_with_output().map_err(NftError::Spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NftError::Rejected { stderr: summarize(&String::from_utf8_lossy(&out.stderr), script) })
        }
    }

    fn list_json(&mut self, args: &[&str]) -> Result<String, NftError> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.command(&full).stderr(Stdio::piped()).output().map_err(NftError::Spawn)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NftError::Rejected { stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
        }
    }
}

/// nft reports errors against line numbers of its input; keep the first errors and quote the
/// offending lines so a log line is enough to see what went wrong.
fn summarize(stderr: &str, script: &str) -> String {
    let lines: Vec<&str> = script.lines().collect();
    let mut out = String::new();
    for l in stderr.lines().filter(|l| l.contains("Error")).take(3) {
        out.push_str(l.trim());
        let line_no = l.split(':').nth(1).and_then(|n| n.parse::<usize>().ok());
        if let Some(text) = line_no.and_then(|n| lines.get(n.saturating_sub(1))) {
            let text: String = text.chars().take(300).collect();
            out.push_str(&format!(" [in: {text}]"));
        }
        out.push('\n');
    }
    if out.is_empty() {
        out = stderr.trim().chars().take(2000).collect();
    }
    out.trim_end().to_owned()
}
