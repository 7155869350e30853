//! The kernel modules the guest loads at boot, and the ones it may load on demand.
//!
//! The load order comes from the host's `modprobe --show-depends` against the extracted module
//! tree, so dependencies and soft dependencies (`libcrc32c` needs a `crc32c` implementation loaded
//! before it) are resolved here, and the guest only `insmod`s a list of files. Debian 6.1 ships
//! its modules uncompressed (`CONFIG_MODULE_COMPRESS_NONE`), which busybox's `insmod` loads.
//!
//! Whole netfilter and traffic-control directories are shipped too and indexed with `depmod`,
//! so a module the kernel requests on its own (an nftables expression, a qdisc) is found by
//! busybox's `modprobe`, the kernel's module helper in the guest.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};

use super::{kernel::Kernel, run_quiet};

/// Loaded at boot, in this order (each after its dependencies).
pub const BOOT_MODULES: &[&str] = &[
    // The host's workspace is shared over 9p on virtio-mmio (microvm has no PCI).
    "virtio_mmio",
    "9pnet_virtio",
    "9p",
    // nftables with what ferry's rules and the tests use.
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_redir",
    "nft_ct",
    "nft_numgen",
    "nft_hash",
    "nft_limit",
    "nft_objref",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    // conntrack (the `conntrack` tool and ferry's UDP cleanup talk ctnetlink).
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    // IPVS and its schedulers.
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_sh",
    "ip_vs_mh",
    "ip_vs_sed",
    "ip_vs_nq",
    // Devices of the sandbox topology.
    "veth",
    "bridge",
    "dummy",
    // TC: clsact is part of sch_ingress; cls_bpf/act_bpf for BPF classifiers.
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "sctp",
];

/// Shipped whole (with their dependencies) for on-demand loading.
const ON_DEMAND_DIRS: &[&str] =
    &["kernel/net/netfilter", "kernel/net/ipv4/netfilter", "kernel/net/ipv6/netfilter", "kernel/net/sched"];

/// Index files `depmod` reads besides the modules themselves.
const INDEX_INPUTS: &[&str] = &["modules.builtin", "modules.builtin.modinfo", "modules.order"];

/// What [`stage`] put into the guest.
pub struct Staged {
    /// Guest paths of the modules to `insmod` at boot, in order.
    pub boot: Vec<String>,
    /// Names from [`BOOT_MODULES`] this kernel does not have (neither module nor built in).
    pub missing: Vec<String>,
    /// Number of module files shipped.
    pub shipped: usize,
}

/// Copies the boot modules, the on-demand directories and their dependencies into `root`
/// (the initramfs staging directory) and indexes them there.
pub fn stage(kernel: &Kernel, root: &Path) -> Result<Staged> {
    let modules_dir = kernel.modules_dir();
    // Paths relative to lib/modules/<release>, e.g. kernel/net/netfilter/nf_tables.ko.
    let mut boot = Vec::new();
    let mut missing = Vec::new();
    for name in BOOT_MODULES {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&kernel.tree)
            .args(["-S", &kernel.release, "--show-depends", name])
            .stdin(Stdio::null())
            .output()
            .context("starting modprobe (apt package kmod)")?;
        if !out.status.success() {
            missing.push((*name).to_owned());
            continue;
        }
        for path in insmod_paths(&String::from_utf8_lossy(&out.stdout)) {
            let rel = Path::new(&path)
                .strip_prefix(&modules_dir)
                .with_context(|| format!("modprobe named {path}, outside {}", modules_dir.display()))?
                .to_string_lossy()
                .into_owned();
            if !boot.contains(&rel) {
                boot.push(rel);
            }
        }
    }

    let deps_text = fs::read_to_string(modules_dir.join("modules.dep")).context("reading modules.dep")?;
    let deps = parse_modules_dep(&deps_text);
    let mut ship: BTreeSet<&str> = boot.iter().map(String::as_str).collect();
    for (module, its_deps) in &deps {
        if ON_DEMAND_DIRS.iter().any(|dir| module.starts_with(&format!("{dir}/"))) {
            ship.insert(module);
            ship.extend(its_deps.iter().map(String::as_str));
        }
    }

    let target = root.join("lib/modules").join(&kernel.release);
    for rel in &ship {
        let to = target.join(rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(modules_dir.join(rel), &to).with_context(|| format!("copying module {rel}"))?;
    }
    for index in INDEX_INPUTS {
        fs::copy(modules_dir.join(index), target.join(index)).with_context(|| format!("copying {index}"))?;
    }
    run_quiet(Command::new("depmod").arg("-b").arg(root).arg(&kernel.release))?;
    ensure!(target.join("modules.dep").exists(), "depmod wrote no modules.dep in {}", target.display());

    let prefix = format!("/lib/modules/{}", kernel.release);
    Ok(Staged {
        boot: boot.iter().map(|rel| format!("{prefix}/{rel}")).collect(),
        missing,
        shipped: ship.len(),
    })
}

/// The module files of `modprobe --show-depends` output, in load order. Lines look like
/// `insmod /lib/modules/6.1.0-56-amd64/kernel/net/9p/9pnet.ko ` (a module, maybe followed by
/// parameters) or `builtin virtio` (nothing to load).
pub fn insmod_paths(show_depends: &str) -> Vec<String> {
    show_depends
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("insmod")).then(|| words.next().map(str::to_owned)).flatten()
        })
        .collect()
}

/// `modules.dep`: each module (relative path) with all the modules it needs, e.g.
/// `kernel/net/netfilter/nft_ct.ko: kernel/net/netfilter/nf_conntrack.ko kernel/lib/libcrc32c.ko`.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((module.trim().to_owned(), deps.split_whitespace().map(str::to_owned).collect()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insmod_paths_should_keep_the_order_and_skip_builtins() {
        let out = "builtin virtio\ninsmod /t/lib/modules/6.1.0-56-amd64/kernel/crypto/crc32c_generic.ko \n\
                   insmod /t/lib/modules/6.1.0-56-amd64/kernel/lib/libcrc32c.ko \n\
                   insmod /t/lib/modules/6.1.0-56-amd64/kernel/net/sctp/sctp.ko param=1\n";
        assert_eq!(
            insmod_paths(out),
            [
                "/t/lib/modules/6.1.0-56-amd64/kernel/crypto/crc32c_generic.ko",
                "/t/lib/modules/6.1.0-56-amd64/kernel/lib/libcrc32c.ko",
                "/t/lib/modules/6.1.0-56-amd64/kernel/net/sctp/sctp.ko",
            ]
        );
    }

    #[test]
    fn parse_modules_dep_should_list_each_modules_dependencies() {
        let text = "kernel/net/netfilter/nft_ct.ko: kernel/net/netfilter/nf_conntrack.ko kernel/lib/libcrc32c.ko\n\
                    kernel/drivers/net/veth.ko:\n";
        let deps = parse_modules_dep(text);
        assert_eq!(
            deps["kernel/net/netfilter/nft_ct.ko"],
            ["kernel/net/netfilter/nf_conntrack.ko", "kernel/lib/libcrc32c.ko"]
        );
        assert!(deps["kernel/drivers/net/veth.ko"].is_empty());
        assert_eq!(deps.len(), 2);
    }
}
