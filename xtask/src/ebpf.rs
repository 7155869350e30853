//! `cargo xtask build-ebpf`: builds the eBPF object on its own, with cargo's output on the
//! terminal, into the same directory `proxy/build.rs` uses (`target/bpf`), so either one
//! reuses the other's work.

#[allow(dead_code, reason = "shared with proxy/build.rs; each side uses a different part")]
pub mod toolchain;

use std::{path::PathBuf, time::Instant};

use anyhow::{Result, bail};

use crate::workspace_root;

/// Options of `cargo xtask build-ebpf`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// cargo target directory for the eBPF crate [default: <workspace>/target/bpf].
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    let root = workspace_root();
    let target_dir = args.target_dir.clone().unwrap_or_else(|| root.join("target").join("bpf"));
    let start = Instant::now();
    let built = match toolchain::build(&root.join("proxy-ebpf"), &target_dir, &toolchain::tools_dir(), false)
    {
        Ok(built) => built,
        Err(e) => bail!("{e}"),
    };
    let size = std::fs::metadata(&built.object)?.len();
    println!(
        "build-ebpf: {} ({size} bytes) in {:.1}s",
        built.object.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
