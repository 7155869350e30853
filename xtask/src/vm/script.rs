//! The guest's `/init`: a busybox shell script that prepares the machine the kernel tests
//! expect (proc, sys, devtmpfs, tmpfs `/run` and `/tmp`, bpffs, cgroup2, the modules, `lo`,
//! the host's directories over 9p at their host paths), runs each step, prints the
//! [`markers`](super::markers) the host follows, and powers off.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Result, anyhow};

use super::markers;

/// Where busybox and its applet links live in the guest: last on `PATH`, so the real `ip`,
/// `tc` and `sysctl` copied from the host come first for everything but busybox's own shell,
/// which runs only this script.
pub const BUSYBOX_DIR: &str = "/busybox/bin";
/// The file listing the modules to `insmod` at boot, in order.
pub const MODULE_LIST: &str = "/etc/ferry-vm/modules";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/busybox/bin";
/// The 9p message size: large reads make loading test binaries of hundreds of MB faster.
const MSIZE: u32 = 512 * 1024;

/// A host directory shared into the guest at the same path.
#[derive(Debug, Clone)]
pub struct Share {
    /// The 9p mount tag (QEMU's `mount_tag`).
    pub tag: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// One thing the guest runs; its exit status is reported.
#[derive(Debug, Clone)]
pub struct Step {
    /// For people: shown in the markers and the summary.
    pub name: String,
    /// The working directory (the test binaries run in their package directory, as under cargo).
    pub cwd: Option<PathBuf>,
    /// Environment added for this step.
    pub env: Vec<(String, String)>,
    pub command: StepCommand,
}

#[derive(Debug, Clone)]
pub enum StepCommand {
    /// A program and its arguments, quoted for the shell.
    Argv(Vec<String>),
    /// A shell command line, run by `bash -c` as written (not busybox's `sh`, whose own
    /// applets would shadow the real `ip` and `tc`).
    Shell(String),
}

/// Everything the guest does, in order.
#[derive(Debug, Clone, Default)]
pub struct GuestPlan {
    pub shares: Vec<Share>,
    /// Environment of every step.
    pub env: Vec<(String, String)>,
    pub steps: Vec<Step>,
}

fn quote(word: &str) -> Result<String> {
    shlex::try_quote(word)
        .map(|q| q.into_owned())
        .map_err(|e| anyhow!("cannot quote {word:?} for the shell: {e}"))
}

/// A name for a marker line: one line, no leading or trailing blanks.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `/init` script for `plan`.
pub fn init_script(plan: &GuestPlan) -> Result<String> {
    let mut s = String::new();
    let (booted, start, end, exit, failed) =
        (markers::BOOTED, markers::START, markers::END, markers::EXIT, markers::FAILED);
    writeln!(
        s,
        r#"#!{BUSYBOX_DIR}/sh
# /init of ferry's test VM, written by `cargo xtask vm-test`.
export PATH={PATH}
export HOME=/root TMPDIR=/tmp
fail() {{
    echo "{failed} $*"
    poweroff -f
}}
mount -t proc proc /proc || fail mount /proc
mount -t sysfs sysfs /sys || fail mount /sys
mount -t devtmpfs devtmpfs /dev || fail mount /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run || fail mount /run
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail mount /tmp
mkdir -p /run/netns /var /root
ln -s /run /var/run
mount -t bpf bpf /sys/fs/bpf || fail mount bpffs
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail mount cgroup2
# Modules the kernel asks for by itself (nftables expressions, qdiscs) come from busybox.
echo {BUSYBOX_DIR}/modprobe > /proc/sys/kernel/modprobe
while read -r module; do
    insmod "$module" || echo "ferry-vm: insmod $module failed"
done < {MODULE_LIST}
ip link set lo up || fail ip link set lo up
hostname ferry-vm"#
    )?;
    for share in &plan.shares {
        let path = quote(&share.path.to_string_lossy())?;
        let ro = if share.read_only { ",ro" } else { "" };
        writeln!(
            s,
            "mkdir -p {path} && mount -t 9p -o trans=virtio,version=9p2000.L,msize={MSIZE},cache=loose{ro} {tag} {path} \
             || fail mount 9p {path}",
            tag = quote(&share.tag)?,
        )?;
    }
    for (key, value) in &plan.env {
        writeln!(s, "export {key}={}", quote(value)?)?;
    }
    writeln!(s, r#"echo "{booted} $(cut -d' ' -f1 /proc/uptime) $(uname -r)""#)?;
    writeln!(s, "overall=0")?;
    for (i, step) in plan.steps.iter().enumerate() {
        let n = i + 1;
        writeln!(s, "echo {}", quote(&format!("{start} {n} {}", one_line(&step.name)))?)?;
        let mut line = String::from("(");
        if let Some(cwd) = &step.cwd {
            write!(line, "cd {} && ", quote(&cwd.to_string_lossy())?)?;
        }
        line.push_str("exec ");
        if !step.env.is_empty() {
            line.push_str("env ");
            for (key, value) in &step.env {
                write!(line, "{} ", quote(&format!("{key}={value}"))?)?;
            }
        }
        match &step.command {
            StepCommand::Argv(argv) => {
                let words = argv.iter().map(|w| quote(w)).collect::<Result<Vec<_>>>()?;
                line.push_str(&words.join(" "));
            }
            StepCommand::Shell(command) => write!(line, "bash -c {}", quote(command)?)?,
        }
        // Nothing in the guest reads the console: a test that did would wait for ever.
        line.push_str(") </dev/null");
        writeln!(s, "{line}")?;
        writeln!(s, "status=$?")?;
        writeln!(s, "echo \"{end} {n} $status\"")?;
        writeln!(s, "[ $overall -eq 0 ] && overall=$status")?;
    }
    writeln!(s, "echo \"{exit} $overall\"")?;
    writeln!(s, "poweroff -f")?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> GuestPlan {
        GuestPlan {
            shares: vec![Share { tag: "share0".into(), path: "/work/main".into(), read_only: true }],
            env: vec![("FERRY_BIN".into(), "/work/main/target/debug/ferry".into())],
            steps: vec![
                Step {
                    name: "nftables_e2e".into(),
                    cwd: Some("/work/main/tests".into()),
                    env: vec![("CARGO_MANIFEST_DIR".into(), "/work/main/tests".into())],
                    command: StepCommand::Argv(vec![
                        "/work/main/target/debug/deps/nftables_e2e-1".into(),
                        "--test-threads=1".into(),
                        "ipvs::a b".into(),
                    ]),
                },
                Step {
                    name: "smoke\nline".into(),
                    cwd: None,
                    env: vec![],
                    command: StepCommand::Shell("uname -r | grep '^6.1'".into()),
                },
            ],
        }
    }

    #[test]
    fn init_script_should_prepare_the_machine_before_any_step() {
        let s = init_script(&plan()).expect("script");
        assert!(s.starts_with("#!/busybox/bin/sh\n"));
        let first_step = s.find("FERRY-VM-START 1").expect("step 1");
        for needed in [
            "mount -t proc",
            "mount -t bpf bpf /sys/fs/bpf",
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup",
            "/run/netns",
            "< /etc/ferry-vm/modules",
            "ip link set lo up",
            "mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose,ro share0 /work/main",
            "export FERRY_BIN=/work/main/target/debug/ferry",
            "FERRY-VM-BOOTED",
        ] {
            let at = s.find(needed).unwrap_or_else(|| panic!("{needed:?} missing from\n{s}"));
            assert!(at < first_step, "{needed:?} comes after the first step");
        }
    }

    #[test]
    fn init_script_should_run_each_step_quoted_and_report_its_status() {
        let s = init_script(&plan()).expect("script");
        assert!(s.contains(
            "(cd /work/main/tests && exec env 'CARGO_MANIFEST_DIR=/work/main/tests' \
             /work/main/target/debug/deps/nftables_e2e-1 '--test-threads=1' 'ipvs::a b') </dev/null\n"
        ));
        assert!(s.contains(r#"(exec bash -c "uname -r | grep '"'^6.1'"'") </dev/null"#));
        assert!(s.contains("echo 'FERRY-VM-START 2 smoke line'\n"));
        assert!(s.contains("echo \"FERRY-VM-END 1 $status\"\n"));
        // The overall status is the first failure's; the exit marker comes last before poweroff.
        assert!(s.contains("[ $overall -eq 0 ] && overall=$status"));
        assert!(s.ends_with("echo \"FERRY-VM-EXIT $overall\"\npoweroff -f\n"));
    }

    #[test]
    fn init_script_should_parse_as_a_shell_script() {
        // The generated script must at least parse; busybox is what runs it in the guest.
        let s = init_script(&plan()).expect("script");
        let status = std::process::Command::new("busybox")
            .args(["sh", "-n", "-c", &s])
            .status()
            .or_else(|_| std::process::Command::new("sh").args(["-n", "-c", &s]).status())
            .expect("a shell");
        assert!(status.success(), "the script does not parse:\n{s}");
    }
}
