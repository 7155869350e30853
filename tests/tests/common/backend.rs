//! The data planes the end-to-end suite runs against, and what a test needs to know about each
//! beyond `--backend`: its extra flags, the per-test kernel resources it needs (eBPF: a bpffs
//! and a cgroup), how to read what it programmed, how to break one of its entries by hand (drift)
//! and how to tell that `ferry cleanup` removed it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_sandbox::Proto;
use proxy::backend::ebpf::MapSizes;
use proxy::backend::ebpf::kernel::KernelMaps;
use proxy::backend::ebpf::maps::{DataPathMaps, addr16, ip_of};
use proxy_common::{FrontendKey, protocol};

#[path = "../ebpf_common/bpffs.rs"]
mod bpffs;
#[path = "../ebpf_common/tc.rs"]
mod tc;
pub use bpffs::Bpffs;
#[allow(unused_imports, reason = "not every test binary lists TC programs")]
pub use tc::tc_programs;

/// The data plane under test: the one place a suite names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Ebpf,
    /// The eBPF backend with `--bypass-netfilter`.
    EbpfBypass,
    /// Needs a kernel with IPVS (not this machine's): run inside the VM harness.
    Ipvs,
}

impl Backend {
    /// The `--backend` value.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::Ebpf | Backend::EbpfBypass => "ebpf",
            Backend::Ipvs => "ipvs",
        }
    }
}

/// Kernel resources of one test that live outside its namespaces, removed on drop (after
/// ferry stopped: the fixture drops this after killing it).
pub enum BackendEnv {
    Plain,
    Ebpf {
        /// Mounted by the test before ferry starts, so that the test sees ferry's pins.
        bpffs: Bpffs,
        /// Dropped after the bpffs: its socket-program links are pinned there.
        cgroup: TestCgroup,
        /// `--bypass-netfilter`.
        bypass_netfilter: bool,
    },
}

impl BackendEnv {
    pub fn create(backend: Backend, prefix: &str) -> Self {
        match backend {
            Backend::Nftables | Backend::Ipvs => BackendEnv::Plain,
            Backend::Ebpf | Backend::EbpfBypass => BackendEnv::Ebpf {
                bpffs: Bpffs::mount(prefix),
                cgroup: TestCgroup::create(prefix),
                bypass_netfilter: backend == Backend::EbpfBypass,
            },
        }
    }

    /// `ferry run` flags for these resources.
    pub fn run_flags(&self) -> Vec<String> {
        match self {
            BackendEnv::Plain => Vec::new(),
            BackendEnv::Ebpf { bpffs, cgroup, bypass_netfilter } => {
                let mut flags = vec![
                    "--bpffs".into(),
                    bpffs.path().display().to_string(),
                    "--cgroup-path".into(),
                    cgroup.seen_by_ferry().display().to_string(),
                ];
                if *bypass_netfilter {
                    flags.push("--bypass-netfilter".into());
                }
                flags
            }
        }
    }

    /// `ferry cleanup` flags.
    pub fn cleanup_flags(&self) -> Vec<String> {
        match self {
            BackendEnv::Plain => Vec::new(),
            BackendEnv::Ebpf { bpffs, .. } => vec!["--bpffs".into(), bpffs.path().display().to_string()],
        }
    }

    /// The cgroup the node's own client processes must run in, if the backend has one.
    pub fn node_cgroup(&self) -> Option<&Path> {
        match self {
            BackendEnv::Plain => None,
            BackendEnv::Ebpf { cgroup, .. } => Some(&cgroup.0),
        }
    }

    pub fn bpffs(&self) -> Option<&Path> {
        match self {
            BackendEnv::Plain => None,
            BackendEnv::Ebpf { bpffs, .. } => Some(bpffs.path()),
        }
    }
}

/// A cgroup v2 directory of one test, for eBPF's socket programs (never the root cgroup).
/// Removed on drop, once the processes in it have exited.
pub struct TestCgroup(PathBuf);

impl TestCgroup {
    fn create(prefix: &str) -> Self {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
            .expect("a cgroup v2 hierarchy");
        let dir = root.join(format!("ferry-e2e-{}", prefix.trim_end_matches('-')));
        // A leftover of a killed run with the same (reused) pid.
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Self(dir)
    }

    /// The same directory as ferry sees it: `ip netns exec` mounts a fresh /sys, hiding the
    /// cgroup hierarchy, so ferry reaches it through this process's root.
    fn seen_by_ferry(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", std::process::id(), self.0.display()))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.0.display());
    }
}

/// The pinned maps of the ferry of one test.
pub fn ebpf_maps(bpffs: &Path) -> KernelMaps {
    KernelMaps::open_pinned(bpffs, &MapSizes::default())
        .unwrap_or_else(|e| panic!("opening ferry's pinned maps under {}: {e}", bpffs.display()))
}

/// What ferry's eBPF maps make of every frontend: its flags and the endpoints of its sets,
/// resolved (set ids are left out: a changed set gets a fresh id, and an old one is deleted
/// one sync later), plus the node-wide maps. Sorted lines.
pub fn ebpf_programmed(bpffs: &Path) -> Vec<String> {
    let mut maps = ebpf_maps(bpffs);
    let endpoints = maps.endpoints().list().expect("listing ENDPOINTS");
    let slots = |set: u32, count: u32| -> Vec<String> {
        (0..count)
            .map(|i| {
                endpoints
                    .iter()
                    .find(|(k, _)| k.set == set && k.index == i)
                    .map(|(_, e)| SocketAddr::new(ip_of(&e.addr), u16::from_be(e.port)).to_string())
                    .unwrap_or_else(|| format!("<slot {i} of set {set} missing>"))
            })
            .collect()
    };
    let mut out = Vec::new();
    for (k, v) in maps.services().list().expect("listing SERVICES") {
        let mut main = slots(v.set, v.count);
        main.sort();
        let mut sc = slots(v.sc_set, v.sc_count);
        sc.sort();
        out.push(format!(
            "frontend {} port {} proto {} flags {:#x} affinity {} endpoints {main:?} short-circuit {sc:?}",
            ip_of(&k.addr),
            k.port(),
            k.protocol,
            v.flags,
            v.affinity_timeout,
        ));
    }
    for (k, v) in maps.node_addrs().list().expect("listing NODE_ADDRS") {
        out.push(format!("node address {} flags {v:#x}", ip_of(&k)));
    }
    for ((len, addr), v) in maps.pod_cidrs().list().expect("listing POD_CIDRS") {
        out.push(format!("pod cidr {}/{len} {v}", ip_of(&addr)));
    }
    for ((len, addr), v) in maps.dst_policy().list().expect("listing DST_POLICY") {
        out.push(format!("destination {}/{len} policy {v}", ip_of(&addr)));
    }
    out.sort();
    out
}

/// Deletes the eBPF frontend `ip:port/proto` from the pinned SERVICES map, as an operator with
/// bpftool could.
pub fn ebpf_delete_frontend(bpffs: &Path, ip: IpAddr, port: u16, proto: Proto) {
    let mut maps = ebpf_maps(bpffs);
    let proto = match proto {
        Proto::Tcp => protocol::TCP,
        Proto::Udp => protocol::UDP,
    };
    let key = FrontendKey::from_raw(addr16(ip), port.to_be(), proto);
    let present = maps.services().keys().expect("listing SERVICES").contains(&key);
    assert!(present, "no SERVICES entry for {ip}:{port}/{proto}");
    maps.services().del(&key).unwrap_or_else(|e| panic!("deleting {ip}:{port} from SERVICES: {e}"));
}
