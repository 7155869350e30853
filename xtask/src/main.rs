//! ferry's developer tasks: `cargo xtask <command>` (the alias is in `.cargo/config.toml`).
//!
//! Each command lives in its own module; add a module and a variant of [`Command`] for a new one.

mod bench;
mod bench_datapath;
mod bench_kernel;
mod demo;
mod ebpf;
mod setup;
mod test;
mod vm;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "ferry's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install the toolchain and the tools the build and tests need (idempotent).
    Setup(setup::Args),
    /// Build the eBPF object on its own (proxy's build script does the same).
    BuildEbpf(ebpf::Args),
    /// Run setup, then every unit and kernel test (needs root).
    Test(test::Args),
    /// ferry's main job in a sandbox of network namespaces, with live manifest edits (needs root).
    Demo(demo::Args),
    /// Kernel apply benchmark: ferry's nftables sync beside a kube-proxy-shaped ruleset (root).
    BenchKernel(bench_kernel::Args),
    /// Data-path benchmark: connection latency and throughput through a ClusterIP (root).
    BenchDatapath(bench_datapath::Args),
    /// The kernel test suites in a QEMU VM on Debian's 6.1 kernel (root; see docs/vm.md).
    VmTest(vm::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup(args) => setup::run(&args),
        Command::BuildEbpf(args) => ebpf::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::BenchKernel(args) => bench_kernel::run(&args),
        Command::BenchDatapath(args) => bench_datapath::run(&args),
        Command::VmTest(args) => vm::run(&args),
    };
    // One line per cause, no backtrace: these errors are for people, not for debugging xtask.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The root of the cargo workspace (xtask's parent directory).
fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().map_or_else(|| manifest_dir.clone(), PathBuf::from)
}
