//! Builds ferry's eBPF object (crate `proxy-ebpf`) and puts it in `OUT_DIR/ferry-ebpf`, where
//! `src/ebpf_object.rs` embeds it.
//!
//! The build itself is shared with `cargo xtask build-ebpf` (`xtask/src/ebpf/toolchain.rs`): the
//! same checks, the same cargo invocation and the same target directory (`target/bpf`), so the
//! two reuse each other's work and a profile change does not rebuild the object. When the
//! toolchain is missing the build stops with one line that says to run `cargo xtask setup`.

#[allow(dead_code, reason = "shared with xtask, which uses the parts this script does not")]
#[path = "../xtask/src/ebpf/toolchain.rs"]
mod toolchain;

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Toolchain(message)) => {
            // `cargo::error` alone fails the build with just `error: proxy@…: <message>`.
            println!("cargo::error={message}");
            ExitCode::SUCCESS
        }
        Err(Failure::Build(message)) => {
            // A failed exit status makes cargo show our stderr: the compiler's diagnostics.
            println!("cargo::error={message}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    /// Nothing to show but the message (the toolchain is missing, …).
    Toolchain(String),
    /// The build ran and failed: its output is on our stderr.
    Build(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self::Toolchain(message)
    }
}

fn run() -> Result<(), Failure> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let root = manifest_dir.parent().ok_or_else(|| "proxy's manifest directory has no parent".to_owned())?;
    let ebpf_dir = root.join("proxy-ebpf");

    // What the object is built from. Listing paths also stops cargo from rerunning this script
    // for every change in `proxy` itself.
    for path in [
        "proxy-ebpf/src",
        "proxy-ebpf/Cargo.toml",
        "proxy-ebpf/Cargo.lock",
        "proxy-ebpf/.cargo/config.toml",
        "proxy-common/src",
        "proxy-common/Cargo.toml",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(path).display());
    }
    println!("cargo::rerun-if-env-changed=FERRY_TOOLS");

    let target_dir = bpf_target_dir(&out_dir);
    let built =
        toolchain::build(&ebpf_dir, &target_dir, &toolchain::tools_dir(), true).map_err(|e| match e {
            toolchain::BuildError::Toolchain(message) => Failure::Toolchain(message),
            toolchain::BuildError::Cargo { message, output } => {
                eprintln!("{output}");
                Failure::Build(format!("{message}; its output is below, or run `cargo xtask build-ebpf`"))
            }
        })?;
    // Compiler warnings in the eBPF crate would otherwise stay hidden in the captured output.
    for line in built.output.lines() {
        if line.starts_with("warning") {
            println!("cargo::warning=proxy-ebpf: {line}");
        }
    }

    let dst = out_dir.join(toolchain::OBJECT_NAME);
    fs::copy(&built.object, &dst)
        .map_err(|e| format!("copying {} to {}: {e}", built.object.display(), dst.display()))?;
    Ok(())
}

/// `target/bpf` next to the profile directories of the workspace's target directory (the
/// ancestor of `OUT_DIR` that holds cargo's `CACHEDIR.TAG`), else a directory in `OUT_DIR`.
fn bpf_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map_or_else(|| out_dir.join("bpf-target"), |target| target.join("bpf"))
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|e| format!("{name}: {e}"))
}
