//! Building ferry's eBPF object: the toolchain it needs and the one cargo invocation that
//! builds it.
//!
//! This file is compiled twice: as `xtask`'s `ebpf::toolchain` module (`cargo xtask build-ebpf`,
//! and the checks of `cargo xtask setup`) and by `proxy/build.rs` through `#[path]`, so the object that
//! `proxy` embeds is built exactly as the xtask builds it. It therefore uses only `std`.
//!
//! The toolchain (see `shared/TOOLCHAIN.md`): Debian's rustc with its Rust source, linked into
//! rustup as [`TOOLCHAIN`], `RUSTC_BOOTSTRAP=1` so that this stable compiler accepts
//! `-Z build-std=core`, and bpf-linker [`BPF_LINKER_VERSION`] built against the same LLVM in
//! [`tools_dir`]. `cargo xtask setup` installs all of it.

use std::{
    env, fmt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

/// Name of the rustup toolchain linked to Debian's compiler.
pub const TOOLCHAIN: &str = "ferry-bpf";
/// Where Debian's `rustc-web` lives (`/usr/bin/rustc`, `/usr/lib/rustlib/src/rust`).
pub const TOOLCHAIN_PATH: &str = "/usr";
/// The bpf-linker release we build; 0.13.0 is the one that supports LLVM 22.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker's LLVM must be at least as new as rustc's; Debian's rustc 1.96 uses LLVM 22.
pub const LLVM_MAJOR: u32 = 22;
/// Target of the eBPF crate.
pub const BPF_TARGET: &str = "bpfel-unknown-none";
/// Name of the object the eBPF crate's binary target produces.
pub const OBJECT_NAME: &str = "ferry-ebpf";
/// What to tell someone whose toolchain is missing.
pub const SETUP_HINT: &str = "run `cargo xtask setup`";

/// The directory ferry's own tools (bpf-linker) are installed into: `$FERRY_TOOLS`, else
/// `$HOME/.cache/ferry-tools`. It is outside the clone so that a fresh clone reuses it.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("FERRY_TOOLS").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("ferry-tools")
}

/// The bpf-linker binary inside a tools directory.
pub fn bpf_linker_path(tools: &Path) -> PathBuf {
    tools.join("bin").join("bpf-linker")
}

/// Checks that `bpf-linker` in `tools` is [`BPF_LINKER_VERSION`]. On failure, says what is wrong
/// in one line.
pub fn check_bpf_linker(tools: &Path) -> Result<(), String> {
    let linker = bpf_linker_path(tools);
    if !linker.exists() {
        return Err(format!("bpf-linker not found at {}", linker.display()));
    }
    let out = run_quiet(Command::new(&linker).arg("--version"))
        .map_err(|e| format!("{} --version: {e}", linker.display()))?;
    let version = out.trim();
    if version != format!("bpf-linker {BPF_LINKER_VERSION}") {
        return Err(format!("{} is `{version}`, want bpf-linker {BPF_LINKER_VERSION}", linker.display()));
    }
    Ok(())
}

/// Checks that the rustup toolchain [`TOOLCHAIN`] exists and has the Rust source `build-std`
/// needs. Returns the toolchain's sysroot.
pub fn check_toolchain() -> Result<PathBuf, String> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]);
    clean_env(&mut cmd);
    let sysroot =
        run_quiet(&mut cmd).map_err(|e| format!("rustup toolchain `{TOOLCHAIN}` is not usable ({e})"))?;
    let sysroot = PathBuf::from(sysroot.trim());
    let core = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core.exists() {
        return Err(format!(
            "the Rust source for build-std is missing ({} not found; Debian package rust-web-src)",
            core.display()
        ));
    }
    Ok(sysroot)
}

/// Everything [`build`] needs, checked; the error is one line ending in [`SETUP_HINT`].
pub fn check_all(tools: &Path) -> Result<(), String> {
    check_bpf_linker(tools)
        .and_then(|()| check_toolchain().map(drop))
        .map_err(|e| format!("eBPF toolchain incomplete: {e}; {SETUP_HINT}"))
}

/// Why [`build`] failed.
#[derive(Debug)]
pub enum BuildError {
    /// A piece of the toolchain is missing (one line, ends with [`SETUP_HINT`]).
    Toolchain(String),
    /// cargo could not be started or the build failed; `output` is its captured stderr (empty
    /// when it went to the terminal).
    Cargo { message: String, output: String },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Toolchain(message) => f.write_str(message),
            Self::Cargo { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for BuildError {}

/// A built object.
#[derive(Debug)]
pub struct Built {
    /// The object file, inside the target directory.
    pub object: PathBuf,
    /// cargo's stderr when it was captured (for forwarding warnings), else empty.
    pub output: String,
}

/// Builds the eBPF crate in `ebpf_dir` (release, [`BPF_TARGET`]) into `target_dir` and returns
/// the object's path. With `capture`, cargo's stderr is returned instead of shown (build scripts
/// must not write to stdout). cargo's own freshness check makes a repeated call cheap.
pub fn build(ebpf_dir: &Path, target_dir: &Path, tools: &Path, capture: bool) -> Result<Built, BuildError> {
    check_all(tools).map_err(BuildError::Toolchain)?;

    let mut path = env::split_paths(&env::var_os("PATH").unwrap_or_default()).collect::<Vec<_>>();
    path.insert(0, tools.join("bin"));
    let path = env::join_paths(path).map_err(|e| BuildError::Cargo {
        message: format!("cannot put {} on PATH: {e}", tools.display()),
        output: String::new(),
    })?;

    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--release", "--locked"])
        .args(["--target", BPF_TARGET, "--bin", OBJECT_NAME])
        .arg("--target-dir")
        .arg(target_dir)
        // The crate's .cargo/config.toml (build-std, rustflags) applies only from its directory.
        .current_dir(ebpf_dir)
        .stdin(Stdio::null());
    clean_env(&mut cmd);
    cmd.env("PATH", path).env("RUSTC_BOOTSTRAP", "1");

    let (status, output) = if capture {
        // Nothing on stdout without --message-format; stderr carries progress and diagnostics.
        let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().map_err(|e| spawn_error(&e))?;
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    } else {
        let status = cmd.status().map_err(|e| spawn_error(&e))?;
        (status, String::new())
    };
    if !status.success() {
        return Err(BuildError::Cargo {
            message: format!("building the eBPF crate in {} failed ({status})", ebpf_dir.display()),
            output,
        });
    }
    let object = target_dir.join(BPF_TARGET).join("release").join(OBJECT_NAME);
    if !object.is_file() {
        return Err(BuildError::Cargo {
            message: format!("the eBPF build produced no {}", object.display()),
            output,
        });
    }
    Ok(Built { object, output })
}

fn spawn_error(e: &std::io::Error) -> BuildError {
    BuildError::Cargo {
        message: format!("cannot run `rustup run {TOOLCHAIN} cargo`: {e}; {SETUP_HINT}"),
        output: String::new(),
    }
}

/// Removes what an outer cargo (running xtask or a build script) exported, so the inner cargo
/// and rustc are chosen only by `rustup run` and configured only by the eBPF crate: the outer
/// `RUSTC`, clippy's `RUSTC_WORKSPACE_WRAPPER`, `CARGO_ENCODED_RUSTFLAGS`, `CARGO_TARGET_DIR`,
/// `RUSTUP_TOOLCHAIN`, … The jobserver (`CARGO_MAKEFLAGS`) and `CARGO_HOME` are kept.
pub fn clean_env(cmd: &mut Command) {
    const BUILD_SCRIPT_VARS: &[&str] = &[
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTUP_TOOLCHAIN",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
    ];
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer_cargo = key.starts_with("CARGO") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS";
        if outer_cargo || BUILD_SCRIPT_VARS.contains(&key) {
            cmd.env_remove(key);
        }
    }
}

/// Runs a command that should succeed quickly and returns its stdout; the error carries the
/// first line of stderr.
fn run_quiet(cmd: &mut Command) -> Result<String, String> {
    let Output { status, stdout, stderr } = cmd.stdin(Stdio::null()).output().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&stderr);
        let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        Err(format!("{status}: {}", first.trim()))
    }
}
