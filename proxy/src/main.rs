use std::io::IsTerminal;

use clap::Parser;
use proxy::backend::{self, BackendOptions};
use proxy::cli::{Cli, Command, render, run, status, trace};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(run::run(args))
        }
        Command::Render(args) => render::run(&args),
        Command::Trace(args) => trace::run(&args),
        Command::Status(args) => status::run(&args),
        Command::Cleanup(args) => {
            let options = BackendOptions {
                bpffs: args.bpffs.clone(),
                ipvs_exclude_cidrs: args.ipvs_exclude_cidrs.clone(),
                ..BackendOptions::default()
            };
            backend::build(args.backend, &options)?.cleanup()?;
            Ok(())
        }
    }
}

/// glibc gives threads their own arenas, and memory freed in one arena is not reused by threads
/// of another: the manifest parse (on one tokio worker) and the full sync's transient buffers
/// (on whichever worker runs it) then each keep their own high-water mark. One arena cut ferry's
/// peak RSS at 10,000 services from 208 to 141 MiB; with two, the result depended on which
/// worker ran the sync. ferry's work is one loop, so the shared lock costs nothing measurable
/// (docs/benchmarks.md). Set before any thread exists.
#[cfg_attr(
    all(target_os = "linux", target_env = "gnu"),
    expect(unsafe_code, reason = "mallopt(3) through libc")
)]
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
