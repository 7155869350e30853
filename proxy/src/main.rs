use std::io::IsTerminal;

use clap::Parser;
use proxy::backend::{self, BackendOptions};
use proxy::cli::{Cli, Command, render, run, status, trace};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
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
            let options = BackendOptions { bpffs: args.bpffs.clone(), ..BackendOptions::default() };
            backend::build(args.backend, &options)?.cleanup()?;
            Ok(())
        }
    }
}
