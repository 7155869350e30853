//! `cargo xtask test`: the project's test command (README, CI). Runs setup first (idempotent,
//! so a fresh machine works), then every unit and kernel test of the workspace.
//!
//! The kernel tests create network namespaces, veths and BPF programs, so they need root; this
//! refuses to start without it rather than letting them skip or fail one by one.
//!
//! A full run (no cargo arguments) then runs [`vm::CI_SUITES`] again in a QEMU VM on Debian's
//! 6.1 kernel (`cargo xtask vm-test`, docs/vm.md); `--no-vm` or `FERRY_VM=0` skips that part.

use std::{ffi::OsString, process::Command};

use anyhow::{Context as _, Result, ensure};

use crate::{setup, vm, workspace_root};

/// Options of `cargo xtask test`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Skip the suites in the 6.1 VM (also `FERRY_VM=0`).
    #[arg(long)]
    pub no_vm: bool,
    /// Extra arguments for `cargo test`: `-p <crate>` replaces `--workspace`; `-- <filter>`
    /// selects tests by name.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cargo_args: Vec<OsString>,
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(
        setup::is_root()?,
        "cargo xtask test runs kernel tests (network namespaces, BPF): run it as root"
    );
    setup::run(&setup::Args::default())?;

    // The cargo that runs us, so `cargo +toolchain xtask test` keeps its toolchain.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The kernel suites run the `ferry` binary in their namespaces; build it first so they
    // test the code of this checkout, also with `-p ferry-sandbox`.
    let status = Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["build", "-p", "proxy", "--bin", "ferry"])
        .status()
        .context("building ferry")?;
    ensure!(status.success(), "building ferry failed: {status}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), std::path::PathBuf::from);
    let mut cmd = Command::new(cargo);
    cmd.env("FERRY_BIN", target.join("debug/ferry"));
    cmd.current_dir(workspace_root()).arg("test");
    let selects_packages = args
        .cargo_args
        .iter()
        .take_while(|arg| *arg != "--")
        .filter_map(|arg| arg.to_str())
        .any(|arg| arg.starts_with("-p") || arg.starts_with("--package"));
    if !selects_packages {
        cmd.arg("--workspace");
    }
    cmd.args(&args.cargo_args);
    println!("xtask test: {cmd:?}");
    let status = cmd.status().context("starting cargo test")?;
    ensure!(status.success(), "cargo test failed: {status}");

    if args.no_vm || std::env::var_os("FERRY_VM").is_some_and(|v| v == "0") {
        println!("xtask test: the VM suites are skipped (--no-vm or FERRY_VM=0)");
    } else if !args.cargo_args.is_empty() {
        println!(
            "xtask test: cargo arguments given: the VM suites are skipped (`cargo xtask vm-test` runs them)"
        );
    } else {
        println!(
            "xtask test: the kernel suites on Debian's 6.1 kernel in a VM: {}",
            vm::CI_SUITES.join(", ")
        );
        vm::run(&vm::Args::with_suites(vm::CI_SUITES))?;
    }
    Ok(())
}
