//! The eBPF data plane: the plan compiled into BPF maps read by ferry's TC and socket programs
//! (`proxy-ebpf`). Layout, hooks and what other components may rely on: `docs/ebpf.md`.
//!
//! - [`compile`]: one service port → frontends, endpoint lists, source ranges (pure).
//! - [`state`]: what is in the maps and the ordered writes to a new plan (atomic set flips,
//!   deferred deletion, drift repair, adoption of pinned maps after a restart).
//! - [`maps`]: the map interface, an in-memory fake and the dump `ferry render` prints.
//! - [`kernel`]: loading, pinning, TC/cgroup attachment, aya map access.
//! - [`pins`]: pinned maps of an earlier ferry checked against this one's object.
//! - [`maglev`]: consistent hashing for external frontends.

pub mod btf;
pub mod compile;
pub mod kernel;
pub mod kernel_skb;
pub mod maglev;
pub mod maps;
pub mod pins;
pub mod state;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use aya::util::KernelVersion;
use proxy_common::{Stat, mark};
use tracing::{debug, info, warn};

use super::nftables::{NftCommand, NftRunner};
use super::{Backend, BackendError, DataPathStats, SyncReport};
use crate::plan::{NodeConfig, Plan, PlanDiff};
use kernel::{Kernel, KernelError};
use maps::{DataPathMaps, FakeMaps};
use state::State;

/// nftables table holding the two rules the programs hand work to (masquerade, reject).
pub const NFT_TABLE: &str = "ferry_ebpf";

/// Capacities of the maps (`max_entries`), applied when the maps are created. Maps already
/// pinned keep the size they were created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub endpoints: u32,
    pub maglev: u32,
    pub conntrack: u32,
    pub revnat: u32,
    pub affinity: u32,
    pub source_ranges: u32,
    pub dst_policy: u32,
    pub sock_revnat: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        use proxy_common::maps as m;
        Self {
            services: m::SERVICES_MAX_ENTRIES,
            endpoints: m::ENDPOINTS_MAX_ENTRIES,
            maglev: m::MAGLEV_MAX_ENTRIES,
            conntrack: m::CONNTRACK_MAX_ENTRIES,
            revnat: m::REVNAT_MAX_ENTRIES,
            affinity: m::AFFINITY_MAX_ENTRIES,
            source_ranges: m::SOURCE_RANGES_MAX_ENTRIES,
            dst_policy: m::DST_POLICY_MAX_ENTRIES,
            sock_revnat: m::SOCK_REVNAT_MAX_ENTRIES,
        }
    }
}

impl MapSizes {
    /// (map name, max_entries) for the loader.
    pub fn entries(&self) -> [(&'static str, u32); 9] {
        use proxy_common::maps as m;
        [
            (m::SERVICES, self.services),
            (m::ENDPOINTS, self.endpoints),
            (m::MAGLEV, self.maglev),
            (m::CONNTRACK, self.conntrack),
            (m::REVNAT, self.revnat),
            (m::AFFINITY, self.affinity),
            (m::SOURCE_RANGES, self.source_ranges),
            (m::DST_POLICY, self.dst_policy),
            (m::SOCK_REVNAT, self.sock_revnat),
        ]
    }
}

/// Which kernel hook carries the TC programs (`--tc-attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX on kernels that have it (6.6 and later), netlink cls_bpf before.
    #[default]
    Auto,
    /// TCX links (`bpf_link`, kernel 6.6+), pinned under `<bpffs>/ferry/links`.
    Tcx,
    /// cls_bpf filters on the interface's clsact qdisc, through netlink (any kernel).
    Netlink,
}

/// The hook [`TcAttach`] resolved to on the running kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcHook {
    Tcx,
    Netlink,
}

impl TcAttach {
    pub fn resolve(self) -> TcHook {
        match self {
            Self::Tcx => TcHook::Tcx,
            Self::Netlink => TcHook::Netlink,
            // The same test aya's own attach() makes: TCX arrived in 6.6.
            Self::Auto => match KernelVersion::current() {
                Ok(v) if v >= KernelVersion::new(6, 6, 0) => TcHook::Tcx,
                _ => TcHook::Netlink,
            },
        }
    }
}

/// What the eBPF backend needs besides the plan.
#[derive(Debug, Clone)]
pub struct EbpfOptions {
    /// The bpffs ferry pins under (`<bpffs>/ferry/…`); mounted when nothing is there.
    pub bpffs: PathBuf,
    /// cgroup v2 directory for the socket programs; None: node processes are not translated.
    pub cgroup_path: Option<PathBuf>,
    /// Interfaces to attach the TC programs to; empty: every interface but `lo`, rescanned at
    /// each sync (new pod veths are picked up with the endpoint change that brings them).
    pub interfaces: Vec<String>,
    pub tc_attach: TcAttach,
    pub map_sizes: MapSizes,
    /// Maglev table size, a prime ≤ 65,537.
    pub maglev_table_size: u32,
    /// `--bypass-netfilter`: translated packets skip netfilter (see [`kernel::ProgramSettings`]).
    pub bypass_netfilter: bool,
    /// Attach and run `nft` inside this named network namespace (tests, benchmarks);
    /// None: ferry's own.
    pub netns: Option<String>,
}

impl Default for EbpfOptions {
    fn default() -> Self {
        Self {
            bpffs: PathBuf::from("/sys/fs/bpf"),
            cgroup_path: None,
            interfaces: Vec::new(),
            tc_attach: TcAttach::Auto,
            map_sizes: MapSizes::default(),
            maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
            bypass_netfilter: false,
            netns: None,
        }
    }
}

impl From<&super::BackendOptions> for EbpfOptions {
    fn from(o: &super::BackendOptions) -> Self {
        let defaults = Self::default();
        Self {
            bpffs: o.bpffs.clone().unwrap_or(defaults.bpffs),
            cgroup_path: o.cgroup_path.clone(),
            interfaces: o.interfaces.clone(),
            tc_attach: o.tc_attach,
            map_sizes: o.ebpf_map_sizes.clone(),
            maglev_table_size: o.maglev_table_size.unwrap_or(defaults.maglev_table_size),
            bypass_netfilter: o.bypass_netfilter,
            netns: o.netns.clone(),
        }
    }
}

/// The root of the cgroup v2 hierarchy (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid hosts): DESIGN.md's default for `--cgroup-path`. Tests pass a cgroup they created.
pub fn default_cgroup_path() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Map(#[from] maps::MapError),
    #[error("nftables: {0}")]
    Nft(#[from] super::nftables::NftError),
    #[error("invalid option: {0}")]
    Invalid(String),
}

/// The nftables table of the eBPF backend: reject and masquerade what the programs marked.
pub fn nft_script() -> String {
    let (masq, reject) = (mark::MASQUERADE, mark::REJECT);
    format!(
        "add table inet {NFT_TABLE}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
         \tcomment \"ferry eBPF backend: acts on marks set by the TC programs\"\n\
         \tchain reject_marked {{\n\
         \t\ttype filter hook prerouting priority dstnat + 10; policy accept;\n\
         \t\tmeta mark & {reject:#x} == {reject:#x} meta l4proto tcp reject with tcp reset\n\
         \t\tmeta mark & {reject:#x} == {reject:#x} reject\n\
         \t}}\n\
         \tchain masquerade_marked {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {masq:#x} == {masq:#x} meta mark set meta mark & {keep:#x} masquerade fully-random\n\
         \t}}\n\
         }}\n",
        keep = !masq,
    )
}

pub struct EbpfBackend {
    options: EbpfOptions,
    nft: Box<dyn NftRunner>,
    kernel: Option<Kernel>,
    state: State,
    attached: BTreeSet<String>,
    cgroup_attached: bool,
    in_sync: bool,
    /// Map occupancy counted at the last full sync (counting walks every key: too slow for
    /// each sync), for metrics.
    occupancy: Vec<(&'static str, usize, u32)>,
}

impl EbpfBackend {
    pub fn new(options: EbpfOptions) -> Result<Self, EbpfError> {
        if !maglev::is_prime(options.maglev_table_size)
            || options.maglev_table_size as usize > proxy_common::MAGLEV_MAX_SIZE
        {
            return Err(EbpfError::Invalid(format!(
                "Maglev table size {} must be a prime ≤ {}",
                options.maglev_table_size,
                proxy_common::MAGLEV_MAX_SIZE
            )));
        }
        let nft = match &options.netns {
            Some(ns) => NftCommand::in_netns(ns),
            None => NftCommand::new(),
        };
        Ok(Self {
            state: State::new(options.maglev_table_size),
            options,
            nft: Box::new(nft),
            kernel: None,
            attached: BTreeSet::new(),
            cgroup_attached: false,
            in_sync: false,
            occupancy: Vec::new(),
        })
    }

    pub fn options(&self) -> &EbpfOptions {
        &self.options
    }

    fn kernel(&mut self) -> Result<&mut Kernel, EbpfError> {
        if self.kernel.is_none() {
            let bpffs = self.options.bpffs.clone();
            let sizes = self.options.map_sizes.clone();
            let settings = kernel::ProgramSettings {
                bypass_netfilter: self.options.bypass_netfilter,
                ..Default::default()
            };
            let kernel = kernel::in_netns(self.options.netns.as_deref(), move || {
                Kernel::load_with(&bpffs, &sizes, &settings)
            })??;
            self.kernel = Some(kernel);
        }
        self.kernel.as_mut().ok_or_else(|| EbpfError::Invalid("kernel not loaded".into()))
    }

    /// Attaches the TC programs to interfaces that do not have them yet (all of them on a full
    /// sync, which also replaces the program of links left by an earlier ferry).
    fn attach(&mut self, full: bool) -> Result<(), EbpfError> {
        let wanted = self.options.interfaces.clone();
        let netns = self.options.netns.clone();
        let hook = self.options.tc_attach.resolve();
        let mut attached = if full { BTreeSet::new() } else { self.attached.clone() };
        let kernel = self.kernel()?;
        let result =
            kernel::in_netns(netns.as_deref(), move || -> Result<BTreeSet<String>, KernelError> {
                let present = kernel::interfaces();
                let targets: Vec<String> = if wanted.is_empty() {
                    present.iter().filter(|i| *i != "lo").cloned().collect()
                } else {
                    wanted.iter().filter(|i| present.contains(i)).cloned().collect()
                };
                attached.retain(|i| present.contains(i));
                for iface in targets {
                    if !attached.contains(&iface) {
                        kernel.attach_tc(&iface, hook)?;
                        attached.insert(iface);
                    }
                }
                Ok(attached)
            })??;
        if result != self.attached {
            info!(interfaces = ?result, ?hook, "eBPF TC programs attached");
        }
        self.attached = result;
        if !self.cgroup_attached
            && let Some(cgroup) = self.options.cgroup_path.clone()
        {
            self.kernel()?.attach_cgroup(&cgroup)?;
            self.cgroup_attached = true;
            info!(cgroup = %cgroup.display(), "eBPF socket programs attached");
        }
        Ok(())
    }

    fn do_sync(
        &mut self,
        plan: &Plan,
        diff: Option<&PlanDiff>,
        config: &NodeConfig,
        full: bool,
    ) -> Result<usize, EbpfError> {
        if full {
            self.nft.apply(&nft_script())?;
        }
        self.kernel()?;
        let Self { kernel, state, .. } = self;
        let maps = kernel
            .as_mut()
            .map(|k| k.maps())
            .ok_or_else(|| EbpfError::Invalid("kernel not loaded".into()))?;
        match diff {
            Some(d) if !full => state.partial(plan, d, config, maps)?,
            _ => state.full(plan, config, maps)?,
        }
        let mut operations = state.operations;
        if let (Some(d), Some(k)) = (diff, kernel.as_mut()) {
            let purged = k.maps().purge_udp_connections(&gone_udp_endpoints(d));
            if purged > 0 {
                debug!(purged, "UDP connections to endpoints that went away");
            }
            operations += purged;
        }
        // Programs attach after the maps are filled, so they never see a half-empty table.
        self.attach(full)?;
        if full {
            self.report_pressure();
        }
        Ok(operations)
    }

    /// Logs map occupancy; warns above 90 %, and when a quarter of the frontend filter's bits
    /// are set (bits are only cleared when ferry starts, so addresses that were frontends
    /// accumulate while it runs; the more bits, the more packets to no service take the full
    /// path).
    fn report_pressure(&mut self) {
        let (bits, size) = self.state.filter_fill();
        if bits > size / 4 {
            warn!(bits, size, "eBPF frontend filter over a quarter full: a restart of ferry rebuilds it");
        } else {
            debug!(bits, size, "eBPF frontend filter");
        }
        let Some(kernel) = self.kernel.as_mut() else { return };
        self.occupancy = kernel.maps().occupancy();
        for &(name, used, max) in &self.occupancy {
            let ratio = used as f64 / f64::from(max.max(1));
            if ratio > 0.9 {
                warn!(map = name, used, max, "eBPF map almost full");
            } else {
                debug!(map = name, used, max, "eBPF map occupancy");
            }
        }
    }

    /// What the live maps hold, their occupancy and the program counters.
    pub fn dump(&mut self) -> Result<String, EbpfError> {
        describe(self.kernel()?.maps())
    }

    /// The summed program counters, indexed by `proxy_common::Stat`.
    pub fn stats(&mut self) -> Result<Vec<u64>, EbpfError> {
        Ok(self.kernel()?.maps().stats())
    }

    /// Map occupancy: (name, entries, capacity).
    pub fn occupancy(&mut self) -> Result<Vec<(&'static str, usize, u32)>, EbpfError> {
        Ok(self.kernel()?.maps().occupancy())
    }

    /// The map interface of the loaded object (tests, benchmarks).
    pub fn maps(&mut self) -> Result<&mut dyn DataPathMaps, EbpfError> {
        Ok(self.kernel()?.maps())
    }

    /// The loaded object (tests, benchmarks: BPF_PROG_TEST_RUN).
    pub fn loaded(&mut self) -> Result<&mut Kernel, EbpfError> {
        self.kernel()
    }

    /// Interfaces the TC programs are attached to.
    pub fn attached_interfaces(&self) -> Vec<String> {
        self.attached.iter().cloned().collect()
    }
}

/// The maps' contents, occupancy and counters, as text for people.
fn describe(maps: &mut dyn DataPathMaps) -> Result<String, EbpfError> {
    let mut out = maps::dump(maps)?;
    let _ = writeln!(out, "# occupancy");
    for (name, used, max) in maps.occupancy() {
        let _ = writeln!(out, "{name} {used}/{max}");
    }
    let _ = writeln!(out, "# counters");
    for (stat, value) in Stat::ALL.iter().zip(maps.stats()) {
        let _ = writeln!(out, "{} {value}", stat.name());
    }
    Ok(out)
}

/// UDP endpoints a diff takes away: in a changed or removed port's previous endpoints and no
/// longer serving in its new version (flows on a serving-but-terminating endpoint are left
/// alone, as kube-proxy does).
pub fn gone_udp_endpoints(diff: &PlanDiff) -> std::collections::HashSet<std::net::SocketAddr> {
    use crate::model::Protocol;
    let mut gone = std::collections::HashSet::new();
    let used = |p: &crate::plan::ServicePortPlan| -> BTreeSet<std::net::SocketAddr> {
        p.cluster_endpoints.iter().chain(&p.local_endpoints).copied().collect()
    };
    for (old, new) in &diff.changed {
        if old.protocol == Protocol::Udp {
            let keep: BTreeSet<std::net::SocketAddr> =
                used(new).into_iter().chain(new.serving_endpoints.iter().copied()).collect();
            gone.extend(used(old).into_iter().filter(|e| !keep.contains(e)));
        }
    }
    for old in diff.removed.iter().filter(|p| p.protocol == Protocol::Udp) {
        gone.extend(used(old));
    }
    gone
}

/// The map contents a full sync of `plan` writes, as text (touches nothing).
pub fn render(plan: &Plan, config: &NodeConfig, maglev_table_size: u32) -> String {
    let mut fake = FakeMaps::default();
    let mut state = State::new(maglev_table_size);
    let mut out = String::new();
    match state
        .full(plan, config, &mut fake)
        .map_err(EbpfError::from)
        .and_then(|()| Ok(maps::dump(&mut fake)?))
    {
        Ok(text) => out.push_str(&text),
        Err(e) => {
            let _ = writeln!(out, "# error: {e}");
        }
    }
    let _ = writeln!(out, "# nftables (marks set by the programs)");
    out.push_str(&nft_script());
    out
}

impl Backend for EbpfBackend {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn render(&self, plan: &Plan, config: &NodeConfig) -> String {
        render(plan, config, self.options.maglev_table_size)
    }

    fn sync(
        &mut self,
        plan: &Plan,
        diff: Option<&PlanDiff>,
        config: &NodeConfig,
    ) -> Result<SyncReport, BackendError> {
        let full = !self.in_sync || diff.is_none();
        let report = SyncReport::run("eBPF", full, || self.do_sync(plan, diff, config, full));
        self.in_sync = report.is_ok();
        Ok(report?)
    }

    /// The maps as the kernel holds them, read back through their pins (a handle of its own:
    /// the sync's handles stay untouched), with occupancy and the program counters.
    fn programmed(&self) -> Option<String> {
        self.kernel.as_ref()?;
        let text = kernel::KernelMaps::open_pinned(&self.options.bpffs, &self.options.map_sizes)
            .map_err(EbpfError::from)
            .and_then(|mut maps| describe(&mut maps));
        let mut out = format!(
            "# TC programs ({:?} hook) on: {}\n",
            self.options.tc_attach.resolve(),
            self.attached.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        out.push_str(&text.unwrap_or_else(|e| format!("# reading the pinned maps failed: {e}\n")));
        Some(out)
    }

    fn data_path_stats(&mut self) -> Option<DataPathStats> {
        let counters = self.kernel.as_mut()?.maps().stats();
        Some(DataPathStats {
            counters: Stat::ALL.iter().map(|s| s.name()).zip(counters).collect(),
            maps: self.occupancy.clone(),
        })
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        // Our own handles first, so that removing the pins releases the last references.
        self.kernel = None;
        self.attached.clear();
        self.cgroup_attached = false;
        self.in_sync = false;
        self.state = State::new(self.options.maglev_table_size);
        let bpffs = self.options.bpffs.clone();
        if is_bpffs_with_pins(&bpffs) {
            kernel::remove_pins(&bpffs).map_err(|e| BackendError::Ebpf(e.into()))?;
        }
        // Filters hold their programs themselves (no pin): delete them whatever the hook of
        // this run, since an earlier run may have used the other one.
        let filters = kernel::in_netns(self.options.netns.as_deref(), kernel::detach_filters)
            .and_then(|r| r)
            .map_err(|e| BackendError::Ebpf(e.into()))?;
        if filters > 0 {
            info!(filters, "eBPF cls_bpf filters deleted");
        }
        self.nft
            .apply(&format!("add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"))
            .map_err(|e| BackendError::Ebpf(e.into()))?;
        Ok(())
    }
}

fn is_bpffs_with_pins(bpffs: &Path) -> bool {
    kernel::pin_root(bpffs).exists()
}

#[cfg(test)]
mod tests;
