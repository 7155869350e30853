//! `cargo xtask vm-test`: runs ferry's kernel test binaries on another kernel (Debian's 6.1 LTS
//! by default) inside a QEMU VM, so that what this machine's kernel lacks (IPVS) can be tested
//! for real and the nftables and eBPF suites are also proven on an older kernel.
//!
//! The parts: [`kernel`] fetches and unpacks the kernel package (cached), [`suites`] builds the
//! test binaries on the host, [`script`] writes the guest's `/init`, [`initramfs`] packs the
//! guest's root file system, [`qemu`] boots it and follows the console through [`markers`].
//! The workspace (with `target/`) is shared read-only over 9p at its host path, so binaries and
//! `CARGO_MANIFEST_DIR`-relative paths work unchanged. See docs/vm.md.

mod initramfs;
mod kernel;
mod markers;
mod modules;
mod qemu;
mod script;
mod suites;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use self::{
    script::{GuestPlan, Share, Step, StepCommand},
    suites::SuiteSpec,
};
use crate::{ebpf::toolchain::tools_dir, workspace_root};

/// The suites `vm-test` runs without `--suite` or `--run`: every kernel suite, with the tests
/// ignored on hosts without IPVS (about 30 minutes under TCG).
pub const DEFAULT_SUITES: &[&str] = &[
    "sandbox",
    "e2e --include-ignored",
    "conntrack_e2e",
    "ops_e2e",
    "nftables_transactions",
    "full_sync_lookups --include-ignored",
    "ipvs_kernel --include-ignored",
    "ebpf_smoke",
    "ebpf_datapath",
    "ebpf_traffic",
];

/// The suites `cargo xtask test` runs in the VM after the host tests: IPVS, which only the VM
/// has, the shared e2e suite with nftables and eBPF on 6.1 (eBPF there attaches through
/// netlink cls_bpf filters: no TCX before 6.6), the eBPF programs through the 6.1 verifier
/// (`ebpf_traffic` includes `--bypass-netfilter`), leaving out the per-packet timing bound,
/// which emulation cannot meet (docs/vm.md), and the interval-set lookups of the nftables and
/// IPVS backends under full syncs. `e2e ebpf_bypass::` is not among them: docs/vm.md says why. About 25
/// minutes under TCG.
pub const CI_SUITES: &[&str] = &[
    "ipvs_kernel --include-ignored",
    "e2e --include-ignored ipvs::",
    "e2e nftables::",
    "e2e ebpf::",
    "ebpf_datapath --skip a_program_run_costs_little_with_ten_thousand_services",
    "ebpf_smoke",
    "ebpf_traffic",
    // Interval-set lookups during full syncs: 6.1 is the kernel that missed.
    "full_sync_lookups --include-ignored",
];

/// Checks that the guest is what the tests expect, before any suite runs.
const SMOKE: &str = r#"set -e
case "$(uname -r)" in 6.1.*) ;; *) echo "vm smoke: kernel $(uname -r) is not 6.1"; exit 1 ;; esac
ip netns add ferry-vm-smoke
ip -n ferry-vm-smoke link set lo up
ip netns exec ferry-vm-smoke nft list ruleset
ip netns del ferry-vm-smoke
grep -q 'IP Virtual Server' /proc/net/ip_vs
grep -q ' /sys/fs/bpf bpf ' /proc/mounts
grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts
test -s /sys/kernel/btf/vmlinux
echo "vm smoke: ok on $(uname -r)""#;

/// Options of `cargo xtask vm-test`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The Debian package of the guest kernel (a metapackage is resolved to its image package).
    #[arg(long, default_value = "linux-image-amd64")]
    pub kernel_package: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Seconds one step (a suite, a --run command) may take before the VM is killed.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Seconds the guest may take to boot.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// A test target of --package and arguments for its binary, as one shell-quoted string
    /// ("e2e ipvs:: --include-ignored"); repeat for several suites in one boot.
    /// Default: every kernel suite, listed in docs/vm.md (none when --run is given).
    #[arg(long = "suite", value_name = "TARGET [ARGS]")]
    pub suites: Vec<String>,
    /// A shell command line to run in the guest (after the suites); repeatable.
    #[arg(long = "run", value_name = "COMMAND")]
    pub commands: Vec<String>,
    /// The package whose test targets --suite names.
    #[arg(long, default_value = "ferry-sandbox")]
    pub package: String,
    /// `--test-threads` for each test binary (unless its arguments set it). Under TCG one test
    /// at a time keeps the tests' timeouts meaningful.
    #[arg(long, default_value_t = 1)]
    pub test_threads: u32,
    /// The guest's TSC frequency in kHz [default: the host's, from /proc/cpuinfo].
    #[arg(long, value_name = "KHZ")]
    pub tsc_khz: Option<u64>,
    /// Extra kernel command line.
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Keep the initramfs and its staging directory (their path is printed).
    #[arg(long)]
    pub keep: bool,
    /// Arguments for every suite's test binary (test name filters, --include-ignored, --exact...).
    #[arg(last = true, value_name = "TEST ARGS")]
    pub test_args: Vec<String>,
}

impl Args {
    /// The defaults with these suites, for `cargo xtask test`.
    pub fn with_suites(suites: &[&str]) -> Self {
        Self {
            kernel_package: "linux-image-amd64".into(),
            memory: 2048,
            cpus: 2,
            timeout: 1800,
            boot_timeout: 120,
            suites: suites.iter().map(|s| (*s).to_owned()).collect(),
            commands: Vec::new(),
            package: "ferry-sandbox".into(),
            test_threads: 1,
            tsc_khz: None,
            append: None,
            keep: false,
            test_args: Vec::new(),
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    let cache = tools_dir().join("vm");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let root = workspace_root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let cargo = PathBuf::from(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));

    let specs = if args.suites.is_empty() && args.commands.is_empty() {
        DEFAULT_SUITES.iter().map(|s| SuiteSpec::parse(s)).collect::<Result<Vec<_>>>()?
    } else {
        args.suites.iter().map(|s| SuiteSpec::parse(s)).collect::<Result<Vec<_>>>()?
    };

    let kernel = kernel::prepare(&cache, &args.kernel_package)?;
    println!("vm: kernel {} ({} {})", kernel.release, kernel.package, kernel.version);

    let mut plan = GuestPlan {
        shares: shares(&root, &target_dir),
        // FERRY_IN_VM tells a test it runs emulated (TCG): a per-packet timing bound, say, does
        // not hold there.
        env: vec![("RUST_BACKTRACE".into(), "1".into()), ("FERRY_IN_VM".into(), "tcg".into())],
        steps: vec![Step {
            name: "vm-smoke".into(),
            cwd: None,
            env: Vec::new(),
            command: StepCommand::Shell(SMOKE.into()),
        }],
    };
    if let Some(log) = std::env::var_os("RUST_LOG") {
        plan.env.push(("RUST_LOG".into(), log.to_string_lossy().into_owned()));
    }
    let mut binaries = Vec::new();
    if !specs.is_empty() {
        let ferry = suites::build_ferry(&cargo, &root)?;
        let targets: Vec<&str> = specs.iter().map(|s| s.target.as_str()).collect();
        let built = suites::build_tests(&cargo, &root, &args.package, &targets)?;
        plan.env.push(("FERRY_BIN".into(), ferry.display().to_string()));
        binaries.push(ferry);
        for (spec, built) in specs.iter().zip(built) {
            plan.steps.push(suite_step(spec, &built, args));
            binaries.push(built.executable);
        }
    }
    for (i, command) in args.commands.iter().enumerate() {
        plan.steps.push(Step {
            name: format!("run {}: {command}", i + 1),
            cwd: Some(root.clone()),
            env: Vec::new(),
            command: StepCommand::Shell(command.clone()),
        });
    }
    for binary in &binaries {
        ensure!(
            plan.shares.iter().any(|s| binary.starts_with(&s.path)),
            "{} is outside the directories shared with the guest",
            binary.display()
        );
    }

    let work =
        tempfile::Builder::new().prefix("run-").tempdir_in(&cache).context("creating a work directory")?;
    let packed = Instant::now();
    let init = script::init_script(&plan)?;
    let built = initramfs::build(work.path(), &kernel, &init, &binaries)?;
    println!(
        "vm: initramfs {:.1} MiB ({} modules shipped, {} loaded at boot; tools {}) in {:.1}s",
        built.bytes as f64 / (1024.0 * 1024.0),
        built.modules.shipped,
        built.modules.boot.len(),
        built.tools.join(" "),
        packed.elapsed().as_secs_f64()
    );
    if !built.modules.missing.is_empty() {
        println!("vm: warning: kernel {} lacks modules {}", kernel.release, built.modules.missing.join(" "));
    }

    let tsc_khz = match args.tsc_khz {
        Some(khz) => Some(khz),
        None => qemu::host_tsc_khz(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()),
    };
    if tsc_khz.is_none() {
        println!(
            "vm: warning: no TSC frequency in /proc/cpuinfo; the guest calibrates its own (may hang on a busy host; see --tsc-khz)"
        );
    }
    let clock = tsc_khz.map(|tsc_khz| kernel.hz().map(|hz| qemu::Clock { tsc_khz, hz })).transpose()?;
    let machine = qemu::Machine {
        vmlinux: kernel.vmlinux.clone(),
        initramfs: built.archive.clone(),
        memory_mib: args.memory,
        cpus: args.cpus,
        shares: plan.shares.clone(),
        clock,
        append: args.append.clone(),
    };
    let prepared = start.elapsed();
    let timeouts = qemu::Timeouts {
        boot: Duration::from_secs(args.boot_timeout),
        step: Duration::from_secs(args.timeout),
    };
    let outcome = qemu::run(&machine, timeouts);
    if args.keep {
        let kept = work.keep();
        println!("vm: kept {}", kept.display());
    }
    let outcome = outcome?;
    print_summary(&kernel, prepared, &outcome);
    ensure!(
        outcome.steps.len() == plan.steps.len(),
        "the guest reported {} of {} steps",
        outcome.steps.len(),
        plan.steps.len()
    );
    let failed: Vec<&str> = outcome.steps.iter().filter(|s| s.status != 0).map(|s| s.name.as_str()).collect();
    ensure!(outcome.status == 0 && failed.is_empty(), "in the VM, failed: {}", failed.join(", "));
    Ok(())
}

/// The workspace, and the target directory when it lies elsewhere: read-only, at their host paths.
fn shares(root: &Path, target_dir: &Path) -> Vec<Share> {
    let mut paths = vec![root.to_path_buf()];
    if !target_dir.starts_with(root) {
        paths.push(target_dir.to_path_buf());
    }
    paths
        .into_iter()
        .enumerate()
        .map(|(i, path)| Share { tag: format!("share{i}"), path, read_only: true })
        .collect()
}

/// A test binary run as cargo runs it, with this run's arguments.
fn suite_step(spec: &SuiteSpec, built: &suites::Built, args: &Args) -> Step {
    let mut argv = vec![built.executable.display().to_string()];
    argv.extend(spec.args.iter().cloned());
    argv.extend(args.test_args.iter().cloned());
    if !argv.iter().any(|a| a.starts_with("--test-threads")) {
        argv.push(format!("--test-threads={}", args.test_threads));
    }
    let mut name = spec.target.clone();
    for arg in spec.args.iter().chain(&args.test_args) {
        name.push(' ');
        name.push_str(arg);
    }
    Step {
        name,
        cwd: Some(built.manifest_dir.clone()),
        env: vec![("CARGO_MANIFEST_DIR".into(), built.manifest_dir.display().to_string())],
        command: StepCommand::Argv(argv),
    }
}

fn print_summary(kernel: &kernel::Kernel, prepared: Duration, outcome: &qemu::Outcome) {
    println!(
        "vm: summary: kernel {} ({} {}); prepared in {:.1}s, booted in {:.1}s (guest {:.2}s), total {:.1}s",
        outcome.release,
        kernel.package,
        kernel.version,
        prepared.as_secs_f64(),
        outcome.boot.as_secs_f64(),
        outcome.guest_boot_secs,
        outcome.total.as_secs_f64()
    );
    for step in &outcome.steps {
        let verdict =
            if step.status == 0 { "ok  ".to_owned() } else { format!("FAIL (exit {})", step.status) };
        println!("vm:   {verdict} {:>7.1}s  {}", step.took.as_secs_f64(), step.name);
    }
}

/// Runs `cmd` and returns its stdout; fails with its stderr on a non-zero exit.
fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with its output captured; fails with its stderr on a non-zero exit.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    capture(cmd).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suite_lists_should_parse_into_targets_and_arguments() {
        for spec in DEFAULT_SUITES.iter().chain(CI_SUITES) {
            let suite = SuiteSpec::parse(spec).expect("parse");
            assert!(!suite.target.contains(' '), "{spec}");
        }
        let e2e = SuiteSpec::parse(CI_SUITES[1]).expect("parse");
        assert_eq!(e2e.target, "e2e");
        assert_eq!(e2e.args, ["--include-ignored", "ipvs::"]);
    }

    #[test]
    fn suite_step_should_run_the_binary_in_its_package_directory_with_one_test_thread() {
        let built = suites::Built {
            target: "e2e".into(),
            executable: "/w/target/debug/deps/e2e-1".into(),
            manifest_dir: "/w/tests".into(),
        };
        let mut args = Args::with_suites(&[]);
        args.test_args = vec!["--nocapture".into()];
        let step = suite_step(&SuiteSpec::parse("e2e ipvs::").expect("parse"), &built, &args);
        assert_eq!(step.name, "e2e ipvs:: --nocapture");
        assert_eq!(step.cwd.as_deref(), Some(Path::new("/w/tests")));
        let StepCommand::Argv(argv) = step.command else { panic!("an argv") };
        assert_eq!(argv, ["/w/target/debug/deps/e2e-1", "ipvs::", "--nocapture", "--test-threads=1"]);
        args.test_args = vec!["--test-threads=2".into()];
        let step = suite_step(&SuiteSpec::parse("e2e").expect("parse"), &built, &args);
        let StepCommand::Argv(argv) = step.command else { panic!("an argv") };
        assert_eq!(argv, ["/w/target/debug/deps/e2e-1", "--test-threads=2"]);
    }
}
