//! `cargo xtask setup`: installs what the build and the tests need on a Debian 12 machine, and
//! does nothing for what is already there, so a second run takes well under a second.
//!
//! Everything comes from Debian's apt and crates.io (see `shared/TOOLCHAIN.md`):
//! 1. apt packages: Debian's Rust toolchain with its source and LLVM 22 for the eBPF build, and
//!    the kernel tools the tests drive, QEMU and what `cargo xtask vm-test` builds its guest
//!    with (`apt-get update` only when something is missing);
//! 2. the rustup toolchain [`ebpf::TOOLCHAIN`] linked to Debian's compiler in `/usr`;
//! 3. bpf-linker [`ebpf::BPF_LINKER_VERSION`] built against LLVM 22 into [`ebpf::tools_dir`].

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::ebpf::toolchain as ebpf;

/// Debian packages the eBPF toolchain needs.
const TOOLCHAIN_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "llvm-22-dev"];
/// Debian packages the kernel tests drive.
const TEST_PACKAGES: &[&str] = &["nftables", "conntrack", "iperf3", "iproute2", "ethtool"];
/// Debian packages of `cargo xtask vm-test`: QEMU, the guest's busybox, cpio for its
/// initramfs, kmod (depmod, modprobe) and xz-utils for the kernel package, and ipvsadm, which
/// the e2e fixture uses in the guest to read and damage IPVS state independently of ferry.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "kmod", "xz-utils", "ipvsadm"];

/// Options of `cargo xtask setup`.
#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Only report what is missing; install nothing (exit status 1 when something is).
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    let tools = ebpf::tools_dir();
    let mut missing = Vec::new();

    step("apt packages", &mut missing, || apt_packages(args.check))?;
    step("rustup toolchain", &mut missing, || rustup_toolchain(args.check))?;
    step("bpf-linker", &mut missing, || bpf_linker(&tools, args.check))?;
    if missing.is_empty() {
        // The same check proxy/build.rs makes before every eBPF build.
        ebpf::check_all(&tools).map_err(anyhow::Error::msg)?;
    }

    let took = start.elapsed().as_secs_f64();
    if !missing.is_empty() {
        bail!("setup --check: missing {} ({took:.1}s); run `cargo xtask setup`", missing.join(", "));
    }
    println!("setup: done in {took:.1}s");
    Ok(())
}

/// What a step found.
enum Outcome {
    /// Already in place (description).
    Present(String),
    /// Installed now (description).
    Installed(String),
    /// Not there and `--check` asked not to install (what is missing).
    Missing(String),
}

fn step(name: &str, missing: &mut Vec<String>, f: impl FnOnce() -> Result<Outcome>) -> Result<()> {
    let start = Instant::now();
    let outcome = f().with_context(|| format!("setup: {name}"))?;
    let took = start.elapsed().as_secs_f64();
    match outcome {
        Outcome::Present(what) => println!("setup: {name}: present: {what} ({took:.2}s)"),
        Outcome::Installed(what) => println!("setup: {name}: installed {what} ({took:.1}s)"),
        Outcome::Missing(what) => {
            println!("setup: {name}: MISSING: {what}");
            missing.push(what);
        }
    }
    Ok(())
}

fn apt_packages(check: bool) -> Result<Outcome> {
    let all = TOOLCHAIN_PACKAGES.iter().chain(TEST_PACKAGES).chain(VM_PACKAGES);
    let mut missing = Vec::new();
    for &package in all.clone() {
        if !dpkg_installed(package)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        let count = TOOLCHAIN_PACKAGES.len() + TEST_PACKAGES.len() + VM_PACKAGES.len();
        return Ok(Outcome::Present(format!("{count} packages")));
    }
    let list = missing.join(" ");
    if check {
        return Ok(Outcome::Missing(format!("apt packages {list}")));
    }
    ensure!(is_root()?, "not root: cannot install {list}; run `cargo xtask setup` as root");
    // Debian's security archive keeps only the newest rustc-web: never pin its version.
    println!("setup: apt packages: installing {list}");
    run_cmd(Command::new("apt-get").arg("update"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    for package in &missing {
        ensure!(dpkg_installed(package)?, "{package} is still not installed after apt-get install");
    }
    Ok(Outcome::Installed(list))
}

fn dpkg_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    // "ii " = desired install, currently installed, no error.
    Ok(out.status.success() && out.stdout.starts_with(b"ii"))
}

fn rustup_toolchain(check: bool) -> Result<Outcome> {
    let name = ebpf::TOOLCHAIN;
    let list = capture(Command::new("rustup").args(["toolchain", "list", "-v"]))
        .context("rustup is needed (it is preinstalled on this kind of machine)")?;
    // Lines look like `ferry-bpf /usr` (a linked toolchain shows its path).
    let linked_to = list.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(name)).then(|| words.last().unwrap_or_default().to_owned())
    });
    match linked_to.as_deref() {
        Some(path) if Path::new(path) == Path::new(ebpf::TOOLCHAIN_PATH) => {
            let sysroot = ebpf::check_toolchain().map_err(anyhow::Error::msg)?;
            let version = capture(Command::new("/usr/bin/rustc").arg("--version"))?;
            Ok(Outcome::Present(format!("{name} -> {} ({})", sysroot.display(), version.trim())))
        }
        _ if check => Ok(Outcome::Missing(format!("rustup toolchain {name} -> {}", ebpf::TOOLCHAIN_PATH))),
        other => {
            if other.is_some() {
                // Linked elsewhere: relink to Debian's compiler.
                run_cmd(Command::new("rustup").args(["toolchain", "uninstall", name]))?;
            }
            run_cmd(Command::new("rustup").args(["toolchain", "link", name, ebpf::TOOLCHAIN_PATH]))?;
            ebpf::check_toolchain().map_err(anyhow::Error::msg)?;
            Ok(Outcome::Installed(format!("{name} -> {}", ebpf::TOOLCHAIN_PATH)))
        }
    }
}

fn bpf_linker(tools: &Path, check: bool) -> Result<Outcome> {
    let linker = ebpf::bpf_linker_path(tools);
    let llvm = format!("libLLVM.so.{}", ebpf::LLVM_MAJOR);
    let problem = match ebpf::check_bpf_linker(tools) {
        Ok(()) if links_llvm(&linker, &llvm)? => {
            return Ok(Outcome::Present(format!(
                "{} {} (LLVM {})",
                linker.display(),
                ebpf::BPF_LINKER_VERSION,
                ebpf::LLVM_MAJOR
            )));
        }
        Ok(()) => format!("{} does not link {llvm}", linker.display()),
        Err(e) => e,
    };
    if check {
        return Ok(Outcome::Missing(problem));
    }
    println!(
        "setup: bpf-linker: {problem}; building {} with LLVM {} (about a minute)",
        ebpf::BPF_LINKER_VERSION,
        ebpf::LLVM_MAJOR
    );
    let mut cmd = Command::new("/usr/bin/cargo");
    ebpf::clean_env(&mut cmd);
    // Without LLVM_PREFIX the build finds /usr/bin/llvm-config (LLVM 14) and fails to link;
    // /usr/bin/cargo would run the first `rustc` on PATH (rustup's), hence RUSTC.
    cmd.env("LLVM_PREFIX", format!("/usr/lib/llvm-{}", ebpf::LLVM_MAJOR))
        .env("RUSTC", "/usr/bin/rustc")
        .args(["install", "bpf-linker", "--version", ebpf::BPF_LINKER_VERSION])
        .args(["--locked", "--force", "--no-default-features"])
        .args(["--features", &format!("llvm-{}", ebpf::LLVM_MAJOR)])
        .arg("--root")
        .arg(tools);
    run_cmd(&mut cmd)?;
    ebpf::check_bpf_linker(tools).map_err(anyhow::Error::msg)?;
    ensure!(links_llvm(&linker, &llvm)?, "{} does not link {llvm} after install", linker.display());
    Ok(Outcome::Installed(format!("{} {}", linker.display(), ebpf::BPF_LINKER_VERSION)))
}

/// Whether `binary` is dynamically linked against `library` (bpf-linker links LLVM's shared
/// library, so this tells which LLVM it was built with).
fn links_llvm(binary: &Path, library: &str) -> Result<bool> {
    let out = capture(Command::new("ldd").arg(binary))?;
    Ok(out.lines().any(|line| line.trim_start().starts_with(library) && !line.contains("not found")))
}

pub fn is_root() -> Result<bool> {
    Ok(capture(Command::new("id").arg("-u"))?.trim() == "0")
}

/// Runs `cmd` with inherited output; fails on a non-zero exit.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.stdin(Stdio::null()).status().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails on a non-zero exit.
fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", out.status);
    Ok(String::from_utf8(out.stdout)?)
}
