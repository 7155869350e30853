//! Boots the guest under QEMU and follows its serial console.
//!
//! The machine is QEMU's `microvm` (no PCI, no firmware: the kernel's PVH entry is called
//! directly) with TCG, because this machine is itself a guest whose KVM cannot run a stock kernel.
//! Devices are virtio-mmio; the console is the first serial port on QEMU's stdout, streamed line
//! by line to ours while the [`markers`](super::markers) are picked out.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    markers::{self, Event},
    script::Share,
};

/// The machine to boot.
#[derive(Debug, Clone)]
pub struct Machine {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub shares: Vec<Share>,
    /// The guest's clock, given to the kernel rather than measured (see [`Clock`]).
    pub clock: Option<Clock>,
    /// Extra kernel command line.
    pub append: Option<String>,
}

/// The TSC frequency and the kernel's tick rate.
///
/// Under TCG the guest's TSC is the host's, but the kernel calibrates it against the PIT by
/// timing a busy loop, which fails on a loaded host; with no HPET or ACPI PM timer on microvm
/// to fall back on, the boot then hangs (seen with the build running beside it). Giving the
/// kernel the frequency (`tsc_early_khz`) and the delay-loop constant (`lpj`) skips both
/// calibrations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    pub tsc_khz: u64,
    /// `CONFIG_HZ` of the guest kernel.
    pub hz: u64,
}

impl Clock {
    fn command_line(self) -> String {
        // With a TSC, loops_per_jiffy counts TSC cycles per tick.
        let lpj = self.tsc_khz * 1000 / self.hz.max(1);
        format!("tsc_early_khz={} lpj={lpj} tsc=reliable", self.tsc_khz)
    }
}

/// The host's TSC frequency from `/proc/cpuinfo` (`cpu MHz` of the first CPU). On a virtual
/// machine without frequency scaling, as this kind of machine is, that is the TSC's rate.
pub fn host_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "cpu MHz").then(|| value.trim().parse().ok()).flatten()
    })?;
    // Anything below 100 MHz is not a real TSC rate.
    (mhz >= 100.0).then(|| (mhz * 1000.0).round() as u64)
}

/// How a step ended, with its wall time as seen from the host.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub name: String,
    pub status: i32,
    pub took: Duration,
}

/// What the run showed.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// From starting QEMU to the boot marker.
    pub boot: Duration,
    /// The guest's uptime at the boot marker.
    pub guest_boot_secs: f64,
    pub release: String,
    pub steps: Vec<StepResult>,
    /// The guest's overall status (the first failing step's).
    pub status: i32,
    pub total: Duration,
}

/// The kernel command line: quiet (test output shares the console), no reboot loop on a panic.
fn kernel_command_line(clock: Option<Clock>, extra: Option<&str>) -> String {
    let mut line = String::from("console=ttyS0 quiet panic=-1 pci=off rdinit=/init");
    if let Some(clock) = clock {
        line.push(' ');
        line.push_str(&clock.command_line());
    }
    if let Some(extra) = extra {
        line.push(' ');
        line.push_str(extra);
    }
    line
}

/// QEMU's arguments for `machine`.
pub fn arguments(machine: &Machine) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "microvm",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        // Power off and reboot both end QEMU.
        "-no-reboot",
    ]
    .map(str::to_owned)
    .into();
    args.extend(["-smp".into(), machine.cpus.to_string(), "-m".into(), machine.memory_mib.to_string()]);
    args.extend(["-kernel".into(), machine.vmlinux.display().to_string()]);
    args.extend(["-initrd".into(), machine.initramfs.display().to_string()]);
    args.extend(["-append".into(), kernel_command_line(machine.clock, machine.append.as_deref())]);
    for (i, share) in machine.shares.iter().enumerate() {
        let ro = if share.read_only { ",readonly=on" } else { "" };
        // QEMU's option syntax doubles a comma inside a value.
        let path = share.path.display().to_string().replace(',', ",,");
        args.extend([
            "-fsdev".into(),
            format!("local,id=fs{i},path={path},security_model=none{ro}"),
            "-device".into(),
            format!("virtio-9p-device,fsdev=fs{i},mount_tag={}", share.tag),
        ]);
    }
    args
}

/// Kills QEMU (which this process started) if the run ends early.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// How long the guest may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From starting QEMU to the boot marker.
    pub boot: Duration,
    /// For each step, and between two markers outside steps.
    pub step: Duration,
}

/// Boots `machine`, streams its console to stdout and waits for the exit marker; kills QEMU
/// when the boot or a step takes longer than `timeouts` allow.
pub fn run(machine: &Machine, timeouts: Timeouts) -> Result<Outcome> {
    let qemu = "qemu-system-x86_64";
    let args = arguments(machine);
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {qemu} (apt package qemu-system-x86)"))?;
    let stdout = child.stdout.take().context("QEMU's stdout")?;
    let mut guard = Guard(child);

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
            if tx.send(text).is_err() {
                break;
            }
        }
    });

    let mut deadline = start + timeouts.boot;
    let mut boot = None;
    let mut guest_boot_secs = 0.0;
    let mut release = String::new();
    let mut steps = Vec::new();
    let mut current: Option<(String, Instant)> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let doing = match (&current, boot) {
                    (Some((name, _)), _) => format!("{name} took longer than {}s", timeouts.step.as_secs()),
                    (None, Some(_)) => {
                        format!("nothing happened between steps for {}s", timeouts.step.as_secs())
                    }
                    (None, None) => format!("the guest did not boot within {}s", timeouts.boot.as_secs()),
                };
                bail!("{doing}; killed the VM");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = guard.0.wait()?;
                bail!(
                    "QEMU ended ({status}) before the guest reported its exit status (see its output above)"
                );
            }
        };
        println!("{line}");
        let event = markers::parse(&line);
        if matches!(event, Some(Event::Booted { .. } | Event::Start { .. } | Event::End { .. })) {
            deadline = Instant::now() + timeouts.step;
        }
        match event {
            Some(Event::Booted { uptime, release: r }) => {
                let took = start.elapsed();
                println!("vm: booted {r} in {:.1}s (guest uptime {uptime:.2}s)", took.as_secs_f64());
                boot = Some(took);
                guest_boot_secs = uptime;
                release = r;
            }
            Some(Event::Start { name, .. }) => current = Some((name, Instant::now())),
            Some(Event::End { status, .. }) => {
                if let Some((name, started)) = current.take() {
                    let took = started.elapsed();
                    println!("vm: {name}: exit status {status} after {:.1}s", took.as_secs_f64());
                    steps.push(StepResult { name, status, took });
                }
            }
            Some(Event::Exit { status }) => {
                // poweroff -f follows; give QEMU a moment to end by itself.
                let until = Instant::now() + Duration::from_secs(10);
                while Instant::now() < until && matches!(guard.0.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return Ok(Outcome {
                    boot: boot.unwrap_or_default(),
                    guest_boot_secs,
                    release,
                    steps,
                    status,
                    total: start.elapsed(),
                });
            }
            Some(Event::Failed { what }) => bail!("the guest could not prepare itself: {what}"),
            Some(Event::Panic { message }) => {
                // Let the panic's backtrace reach the output before QEMU goes.
                let until = Instant::now() + Duration::from_secs(2);
                while let Ok(line) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    println!("{line}");
                }
                bail!("the guest kernel panicked: {message}");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_should_describe_a_microvm_with_tcg_and_9p_shares() {
        let machine = Machine {
            vmlinux: "/c/vmlinux".into(),
            initramfs: "/c/initramfs.cpio".into(),
            memory_mib: 2048,
            cpus: 2,
            shares: vec![Share { tag: "share0".into(), path: "/work/a,b".into(), read_only: true }],
            clock: Some(Clock { tsc_khz: 1_996_249, hz: 250 }),
            append: Some("loglevel=7".into()),
        };
        let args = arguments(&machine).join(" ");
        for expected in [
            "-M microvm -accel tcg,thread=multi",
            "-serial stdio",
            "-smp 2 -m 2048",
            "-kernel /c/vmlinux -initrd /c/initramfs.cpio",
            "-fsdev local,id=fs0,path=/work/a,,b,security_model=none,readonly=on",
            "-device virtio-9p-device,fsdev=fs0,mount_tag=share0",
        ] {
            assert!(args.contains(expected), "{expected:?} missing in {args}");
        }
        assert!(args.contains("tsc_early_khz=1996249 lpj=7984996 tsc=reliable loglevel=7"), "{args}");
        assert!(kernel_command_line(None, None).ends_with("rdinit=/init"));
    }

    #[test]
    fn host_tsc_khz_should_read_the_first_cpus_frequency() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 1996.249\n\nprocessor\t: 1\ncpu MHz\t\t: 1.0\n";
        assert_eq!(host_tsc_khz(cpuinfo), Some(1_996_249));
        assert_eq!(host_tsc_khz("cpu MHz : 1.0\n"), None);
        assert_eq!(host_tsc_khz("processor : 0\n"), None);
    }
}
