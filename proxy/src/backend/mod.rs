//! Backends compile the plan into a data plane. Each one applies the difference between the
//! last applied plan and the new one, and can re-apply everything to repair drift.

pub mod ebpf;
pub mod ipvs;
pub mod nftables;

use std::time::{Duration, Instant};

use crate::plan::{NodeConfig, Plan, PlanDiff};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Nftables,
    Ebpf,
    Ipvs,
}

/// What a data plane of its own counts (the eBPF programs' counters) and how full its maps
/// are, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataPathStats {
    /// (counter name, value summed over CPUs), since the counters were created.
    pub counters: Vec<(&'static str, u64)>,
    /// (map name, entries, capacity), as counted at the last full sync.
    pub maps: Vec<(&'static str, usize, u32)>,
}

/// How much a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub full: bool,
    /// Kernel objects (rules, set elements, map entries) written or deleted.
    pub operations: usize,
    #[serde(skip)]
    pub duration: Duration,
}

impl SyncReport {
    /// Runs one sync's `work` and times it. The caller stays in sync only on success: after
    /// a failure its next sync must be a full one, rewriting whatever this one left
    /// half-applied.
    pub(crate) fn run<E: std::fmt::Display>(
        backend: &str,
        full: bool,
        work: impl FnOnce() -> Result<usize, E>,
    ) -> Result<Self, E> {
        let start = Instant::now();
        let operations = work().inspect_err(|e| {
            tracing::warn!(full, "{backend} sync failed; the next sync is a full one: {e}");
        })?;
        Ok(Self { full, operations, duration: start.elapsed() })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("nftables: {0}")]
    Nft(#[from] nftables::NftError),
    #[error("eBPF: {0}")]
    Ebpf(#[from] ebpf::EbpfError),
    #[error("IPVS: {0}")]
    Ipvs(#[from] ipvs::IpvsError),
    #[error("backend {0:?} is not available in this build (see README, \"Not done yet\")")]
    Unavailable(BackendKind),
}

/// What a backend needs to know about the node beyond the plan (from `ferry run`'s flags).
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Run `nft` inside this named network namespace (tests, benchmarks); None: ferry's own.
    pub netns: Option<String>,
    /// eBPF (`--bpffs`): the bpffs ferry pins its maps and links under, mounted when nothing
    /// is there; None: /sys/fs/bpf.
    pub bpffs: Option<std::path::PathBuf>,
    /// eBPF (`--cgroup-path`): the cgroup v2 directory for the socket programs (node
    /// processes reaching services); None: no socket programs. `ebpf::default_cgroup_path`
    /// finds the root of the hierarchy.
    pub cgroup_path: Option<std::path::PathBuf>,
    /// eBPF (`--interfaces`): interfaces for the TC programs; empty: all but `lo`, rescanned
    /// at every sync.
    pub interfaces: Vec<String>,
    /// eBPF (`--tc-attach`): TCX links or netlink cls_bpf filters; Auto: by kernel version.
    pub tc_attach: ebpf::TcAttach,
    /// eBPF: map capacities.
    pub ebpf_map_sizes: ebpf::MapSizes,
    /// eBPF: Maglev table size, a prime ≤ 65,537; None: 65,537.
    pub maglev_table_size: Option<u32>,
    /// eBPF (`--bypass-netfilter`): translated packets of connections without masquerade go
    /// straight to their next hop, skipping netfilter.
    pub bypass_netfilter: bool,
    /// IPVS (`--ipvs-scheduler`, `ipvs.scheduler`): the scheduler of every virtual service;
    /// None: rr.
    pub ipvs_scheduler: Option<String>,
    /// IPVS (`--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout`, `ipvs.*Timeout`):
    /// connection timeouts in seconds, set in the namespace when any is non-zero; 0: the
    /// kernel's.
    pub ipvs_timeouts: ipvs::Timeouts,
    /// IPVS (`--ipvs-exclude-cidrs`, `ipvs.excludeCIDRs`): stale virtual services on these
    /// addresses are never deleted.
    pub ipvs_exclude_cidrs: Vec<ipnet::IpNet>,
}

/// Creates the backend `kind`; the one place that knows which backends exist.
pub fn build(kind: BackendKind, options: &BackendOptions) -> Result<Box<dyn Backend>, BackendError> {
    let nft = || match &options.netns {
        Some(ns) => nftables::NftCommand::in_netns(ns),
        None => nftables::NftCommand::new(),
    };
    match kind {
        BackendKind::Nftables => {
            Ok(Box::new(nftables::NftBackend::with_netlink(Box::new(nft()), options.netns.clone())))
        }
        BackendKind::Ebpf => Ok(Box::new(ebpf::EbpfBackend::new(ebpf::EbpfOptions::from(options))?)),
        BackendKind::Ipvs => Ok(Box::new(ipvs::IpvsBackend::new(ipvs::IpvsOptions::from(options))?)),
    }
}

/// A data plane.
pub trait Backend: Send {
    fn name(&self) -> &'static str;

    /// What a full sync of `plan` would program, as text for people (`ferry render`).
    fn render(&self, plan: &Plan, config: &NodeConfig) -> String;

    /// Brings the kernel to `plan`. With `diff`, only what it names is touched; without, the
    /// whole state is re-applied (first sync, periodic resync, after an error).
    fn sync(
        &mut self,
        plan: &Plan,
        diff: Option<&PlanDiff>,
        config: &NodeConfig,
    ) -> Result<SyncReport, BackendError>;

    /// Removes everything this backend installed.
    fn cleanup(&mut self) -> Result<(), BackendError>;

    /// Takes the options of a reloaded configuration (SIGHUP, `--config` edited). A backend
    /// whose options can change while it runs keeps the new ones, makes its next sync a full
    /// one and returns true; the others keep what they were built with (false).
    fn apply_options(&mut self, _options: &BackendOptions) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// What this backend has programmed, read back from the kernel, as text for people
    /// (`ferry status`); None when it has no such view or has programmed nothing yet.
    fn programmed(&self) -> Option<String> {
        None
    }

    /// The data path's own counters and map occupancy (eBPF); None for data planes that have
    /// none or before anything is loaded.
    fn data_path_stats(&mut self) -> Option<DataPathStats> {
        None
    }

    /// Whether Service NAT lives in conntrack entries (netfilter DNAT), so that UDP entries
    /// pointing at an endpoint that stopped serving must be deleted after a sync.
    fn nat_in_conntrack(&self) -> bool {
        false
    }
}
