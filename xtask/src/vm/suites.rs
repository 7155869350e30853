//! The test suites the guest runs: cargo builds their binaries on the host (`cargo test
//! --no-run --message-format=json`), and the guest runs each executable as cargo would (in its
//! package directory, with `CARGO_MANIFEST_DIR`), reaching it over 9p at its host path.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Deserialize;

/// One suite to run: a test target and the arguments for its binary.
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteSpec {
    pub target: String,
    pub args: Vec<String>,
}

impl SuiteSpec {
    /// Parses `--suite` values: the test target's name, then arguments for its binary, split as
    /// a shell would (`"nftables_e2e ipvs:: --include-ignored"`).
    pub fn parse(spec: &str) -> Result<Self> {
        let Some(words) = shlex::split(spec) else { bail!("cannot split suite {spec:?} into words") };
        let mut words = words.into_iter();
        let Some(target) = words.next() else { bail!("empty suite") };
        Ok(Self { target, args: words.collect() })
    }
}

/// A built test binary.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub target: String,
    pub executable: PathBuf,
    /// The package directory (where cargo runs the binary).
    pub manifest_dir: PathBuf,
}

/// The parts of cargo's JSON messages we read.
#[derive(Debug, Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    target: Option<Target>,
    #[serde(default)]
    executable: Option<PathBuf>,
    #[serde(default)]
    manifest_path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

/// The test executables in cargo's `--message-format=json` output, by target name.
pub fn parse_artifacts(json_lines: &str) -> Result<Vec<Built>> {
    let mut built = Vec::new();
    for line in json_lines.lines().filter(|l| l.starts_with('{')) {
        let message: Message =
            serde_json::from_str(line).with_context(|| format!("parsing cargo's message {line}"))?;
        if message.reason != "compiler-artifact" {
            continue;
        }
        let (Some(target), Some(executable), Some(manifest)) =
            (message.target, message.executable, message.manifest_path)
        else {
            continue;
        };
        if !target.kind.iter().any(|k| k == "test") {
            continue;
        }
        let manifest_dir = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
        built.push(Built { target: target.name, executable, manifest_dir });
    }
    Ok(built)
}

/// Builds the test targets `targets` of `package` and returns their executables, in order.
pub fn build_tests(cargo: &Path, workspace: &Path, package: &str, targets: &[&str]) -> Result<Vec<Built>> {
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace).args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
        "-p",
        package,
    ]);
    for target in targets {
        cmd.args(["--test", target]);
    }
    println!("vm: {cmd:?}");
    let out =
        cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).output().context("starting cargo test --no-run")?;
    ensure!(out.status.success(), "building the test binaries failed: {}", out.status);
    let all = parse_artifacts(&String::from_utf8_lossy(&out.stdout))?;
    targets
        .iter()
        .map(|target| {
            all.iter().find(|b| b.target == *target).cloned().with_context(|| {
                format!("cargo built no test binary named {target} in {package} (see tests/Cargo.toml, tests/tests/)")
            })
        })
        .collect()
}

/// Builds the `ferry` binary and returns its path.
pub fn build_ferry(cargo: &Path, workspace: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace).args([
        "build",
        "-p",
        "proxy",
        "--bin",
        "ferry",
        "--message-format=json-render-diagnostics",
    ]);
    println!("vm: {cmd:?}");
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).output().context("starting cargo build")?;
    ensure!(out.status.success(), "building ferry failed: {}", out.status);
    for line in out.stdout.lines() {
        let line = line?;
        if let Ok(Message { reason, target: Some(target), executable: Some(exe), .. }) =
            serde_json::from_str(&line)
            && reason == "compiler-artifact"
            && target.name == "ferry"
        {
            return Ok(exe);
        }
    }
    bail!("cargo built no ferry executable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_should_split_a_suite_into_target_and_arguments() {
        assert_eq!(
            SuiteSpec::parse("nftables_e2e 'ipvs::a b' --include-ignored").expect("parse"),
            SuiteSpec {
                target: "nftables_e2e".into(),
                args: vec!["ipvs::a b".into(), "--include-ignored".into()]
            }
        );
        assert_eq!(SuiteSpec::parse("sandbox").expect("parse").args, Vec::<String>::new());
        assert!(SuiteSpec::parse("  ").is_err());
        assert!(SuiteSpec::parse("a 'unclosed").is_err());
    }

    #[test]
    fn parse_artifacts_should_keep_test_executables_only() {
        let lines = [
            r#"{"reason":"compiler-artifact","package_id":"x","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["lib"],"name":"ferry_sandbox"},"executable":null}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"sandbox"},"executable":"/w/target/debug/deps/sandbox-1"}"#,
            r#"{"reason":"build-script-executed","package_id":"y"}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/w/proxy/Cargo.toml","target":{"kind":["bin"],"name":"ferry"},"executable":"/w/target/debug/ferry"}"#,
            "warning: not json",
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            parse_artifacts(&lines).expect("parse"),
            [Built {
                target: "sandbox".into(),
                executable: "/w/target/debug/deps/sandbox-1".into(),
                manifest_dir: "/w/tests".into(),
            }]
        );
    }
}
