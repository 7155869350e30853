//! The IPVS data plane (`--backend ipvs`): every frontend of the plan is an IPVS virtual
//! service whose real servers are its endpoints (NAT forwarding); service addresses live on
//! the dummy interface `kube-ipvs0`; what IPVS cannot express (REJECT/DROP, masquerade,
//! source ranges, the externalTrafficPolicy Local short-circuit) is a small nftables table of
//! ferry's own. Semantics and layout: `docs/ipvs.md`.
//!
//! - [`netlink`]: IPVS generic netlink messages (encoding, parsing).
//! - [`socket`]: a netlink socket in ferry's namespace (requests, dumps).
//! - [`kernel`]: the IPVS table behind a trait, over netlink, and an in-memory fake.
//! - [`address`]: `kube-ipvs0` and its addresses over rtnetlink, and a fake.
//! - [`compile`]: one service port → virtual services, addresses, nftables elements (pure).
//! - [`state`]: what is programmed, and the smallest change to a new plan.
//! - [`filter`]: the nftables table.
//! - [`sysctl`]: the per-namespace sysctls IPVS mode needs.

pub mod address;
pub mod compile;
pub mod filter;
pub mod kernel;
pub mod netlink;
pub mod socket;
pub mod state;
pub mod sysctl;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tracing::{debug, info};

use super::nftables::{NftCommand, NftError, NftRunner};
use super::{Backend, BackendError, BackendOptions, SyncReport};
use crate::model::IpFamily;
use crate::plan::{NodeConfig, Plan, PlanDiff, PortKey};
use address::{Rtnetlink, ServiceAddresses};
use kernel::{Ipvs, NetlinkIpvs};
pub use netlink::Timeouts;
use netlink::{Dest, ServiceKey, ServiceSpec};
use socket::SocketError;
use state::{Changes, State};

/// kube-proxy's default scheduler.
pub const DEFAULT_SCHEDULER: &str = "rr";

/// Schedulers of Linux's IPVS (each an `ip_vs_<name>` module the kernel loads on first use).
pub const SCHEDULERS: &[&str] =
    &["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos"];

/// The longest IPVS timeout every kernel accepts: it keeps them in jiffies in an `int` and
/// refuses more than `INT_MAX / HZ` seconds; HZ is at most 1000 (24 days, 20:31:23).
pub const MAX_TIMEOUT_SECS: u32 = i32::MAX as u32 / 1000;

/// An IPVS timeout in the seconds the kernel takes; 0 means "leave the kernel's value".
/// Refuses what IPVS cannot keep: fractions of a second (kube-proxy would truncate them,
/// turning `500ms` into "unchanged") and more than [`MAX_TIMEOUT_SECS`].
pub fn timeout_secs(d: Duration) -> Result<u32, String> {
    if d.subsec_nanos() != 0 {
        return Err("IPVS timeouts are whole seconds".into());
    }
    match u32::try_from(d.as_secs()) {
        Ok(s) if s <= MAX_TIMEOUT_SECS => Ok(s),
        _ => Err(format!("longer than IPVS accepts (at most {MAX_TIMEOUT_SECS}s, about 24 days)")),
    }
}

const EEXIST: i32 = 17;
const ENOENT: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error(transparent)]
    Netlink(#[from] SocketError),
    #[error("nftables: {0}")]
    Nft(#[from] NftError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    #[error("invalid option: {0}")]
    Invalid(String),
}

/// What the IPVS backend needs besides the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsOptions {
    /// `--ipvs-scheduler` / `ipvs.scheduler`.
    pub scheduler: String,
    /// Program this named network namespace (tests); None: ferry's own.
    pub netns: Option<String>,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout` (and `ipvs.*Timeout`):
    /// set in the namespace when any is non-zero; a 0 one stays as the kernel has it.
    pub timeouts: Timeouts,
    /// `--ipvs-exclude-cidrs` / `ipvs.excludeCIDRs`: stale virtual services on these addresses
    /// are never deleted (someone else's on the node's addresses).
    pub exclude_cidrs: Vec<IpNet>,
}

impl Default for IpvsOptions {
    fn default() -> Self {
        Self {
            scheduler: DEFAULT_SCHEDULER.to_owned(),
            netns: None,
            timeouts: Timeouts::default(),
            exclude_cidrs: Vec::new(),
        }
    }
}

impl From<&super::BackendOptions> for IpvsOptions {
    fn from(o: &super::BackendOptions) -> Self {
        Self {
            scheduler: o.ipvs_scheduler.clone().unwrap_or_else(|| DEFAULT_SCHEDULER.to_owned()),
            netns: o.netns.clone(),
            timeouts: o.ipvs_timeouts,
            exclude_cidrs: o.ipvs_exclude_cidrs.clone(),
        }
    }
}

impl IpvsOptions {
    fn validate(&self) -> Result<(), IpvsError> {
        if !SCHEDULERS.contains(&self.scheduler.as_str()) {
            return Err(IpvsError::Invalid(format!(
                "IPVS scheduler {:?} is not one of {}",
                self.scheduler,
                SCHEDULERS.join(", ")
            )));
        }
        let t = &self.timeouts;
        for (name, secs) in [("TCP", t.tcp), ("TCP FIN", t.tcp_fin), ("UDP", t.udp)] {
            if secs > MAX_TIMEOUT_SECS {
                return Err(IpvsError::Invalid(format!(
                    "IPVS {name} timeout {secs}s is longer than IPVS accepts (at most {MAX_TIMEOUT_SECS}s)"
                )));
            }
        }
        Ok(())
    }
}

pub struct IpvsBackend {
    options: IpvsOptions,
    nft: Box<dyn NftRunner>,
    /// Opened on first use, so `render` needs no kernel.
    ipvs: Option<Box<dyn Ipvs>>,
    addresses: Option<Box<dyn ServiceAddresses>>,
    /// Sysctls are written once per process (real kernels only).
    sysctls_pending: bool,
    state: State,
    /// False until a full sync succeeded, and again after a failure: the kernel may then
    /// differ from `state`, so the next sync reconciles everything.
    in_sync: bool,
    /// The plan-wide elements (ClusterIPs, service and pod CIDRs) of the last full sync.
    globals: Vec<filter::Element>,
    /// The configuration of the last sync: NodePort services follow the node's addresses,
    /// which are not part of the plan.
    last_config: Option<NodeConfig>,
}

impl IpvsBackend {
    pub fn new(options: IpvsOptions) -> Result<Self, IpvsError> {
        options.validate()?;
        let nft = match &options.netns {
            Some(ns) => NftCommand::in_netns(ns),
            None => NftCommand::new(),
        };
        Ok(Self {
            options,
            nft: Box::new(nft),
            ipvs: None,
            addresses: None,
            sysctls_pending: true,
            state: State::default(),
            globals: Vec::new(),
            in_sync: false,
            last_config: None,
        })
    }

    /// A backend over the given kernel interfaces (tests: in-memory fakes); no sysctls.
    pub fn with_parts(
        options: IpvsOptions,
        nft: Box<dyn NftRunner>,
        ipvs: Box<dyn Ipvs>,
        addresses: Box<dyn ServiceAddresses>,
    ) -> Self {
        Self {
            options,
            nft,
            ipvs: Some(ipvs),
            addresses: Some(addresses),
            sysctls_pending: false,
            state: State::default(),
            globals: Vec::new(),
            in_sync: false,
            last_config: None,
        }
    }

    /// Takes new options (a configuration reload): the next sync is a full one, which applies
    /// a changed scheduler to every service and changed timeouts to the namespace. The
    /// namespace stays the same.
    pub fn reconfigure(&mut self, options: IpvsOptions) -> Result<(), IpvsError> {
        options.validate()?;
        let netns = self.options.netns.clone();
        self.options = IpvsOptions { netns, ..options };
        self.in_sync = false;
        Ok(())
    }

    /// Opens the sockets and applies the sysctls (after IPVS is loaded: its sysctls appear
    /// with the module).
    fn kernel(
        &mut self,
    ) -> Result<(&mut dyn Ipvs, &mut dyn ServiceAddresses, &mut dyn NftRunner), IpvsError> {
        if self.ipvs.is_none() {
            self.ipvs = Some(Box::new(NetlinkIpvs::open(self.options.netns.as_deref())?));
        }
        if self.addresses.is_none() {
            self.addresses = Some(Box::new(Rtnetlink::open(self.options.netns.as_deref())?));
        }
        if self.sysctls_pending {
            let set = sysctl::apply(self.options.netns.as_deref())?;
            info!(sysctls = ?set, "IPVS sysctls set in ferry's network namespace");
            self.sysctls_pending = false;
        }
        match (self.ipvs.as_deref_mut(), self.addresses.as_deref_mut()) {
            (Some(i), Some(a)) => Ok((i, a, self.nft.as_mut())),
            _ => Err(IpvsError::Invalid("kernel interfaces not open".into())),
        }
    }

    fn full_sync(&mut self, plan: &Plan, config: &NodeConfig) -> Result<usize, IpvsError> {
        let new = State::build(plan, config, &self.options.scheduler, &self.state);
        // What the table holds, when known: it is then rewritten in place (`refresh_script`).
        let held: Option<Vec<filter::Element>> = self
            .in_sync
            .then(|| self.state.all_elements().into_iter().chain(&self.globals).cloned().collect());
        let mut script = String::new();
        let mut globals = Vec::new();
        for family in IpFamily::ALL {
            globals.extend(filter::global_elements(plan, config, family));
        }
        for family in IpFamily::ALL {
            let mut elements = new.all_elements();
            elements.extend(globals.iter());
            script.push_str(&match &held {
                Some(held) => filter::refresh_script(family, config, &elements, held),
                None => filter::full_script(family, config, &elements),
            });
        }
        let timeouts = self.options.timeouts;
        let exclude_cidrs = self.options.exclude_cidrs.clone();
        let (ipvs, links, nft) = self.kernel()?;
        links.ensure_link()?;
        let mut ops = 0;
        // Read back at every full sync, so that a change by someone else is repaired.
        if timeouts.any() {
            let have = ipvs.timeouts()?;
            if !timeouts.satisfied_by(&have) {
                ipvs.set_timeouts(&timeouts)?;
                info!(was = %have, now = %timeouts.applied_to(&have), "IPVS timeouts (tcp tcpfin udp) set");
                ops += 1;
            }
        }
        let have_addrs = links.addresses()?;
        let want_addrs = new.all_addresses();
        for a in want_addrs.difference(&have_addrs) {
            links.add(*a)?;
            ops += 1;
        }
        let kernel_services: BTreeMap<ServiceKey, ServiceSpec> =
            ipvs.services()?.into_iter().map(|s| (s.key, s.spec)).collect();
        let desired = new.all_services();
        for (key, (spec, dests)) in &desired {
            let fresh = match kernel_services.get(key) {
                None => {
                    ensure_service(ipvs, key, spec)?;
                    true
                }
                Some(have) if have != spec => {
                    ipvs.edit_service(key, spec)?;
                    ops += 1;
                    false
                }
                Some(_) => false,
            };
            ops += usize::from(fresh) + reconcile_dests(ipvs, key, dests, fresh)?;
        }
        nft.apply(&script)?;
        // Only now that the new state is in place does anything go away.
        let mut owned: BTreeSet<IpAddr> = have_addrs.union(&want_addrs).copied().collect();
        owned.extend(config.node_ips.iter().copied());
        for key in kernel_services.keys() {
            if desired.contains_key(key) || !is_ferrys(key, &owned) {
                continue;
            }
            if excluded(key, &exclude_cidrs) {
                debug!(service = %key, "stale IPVS service in excludeCIDRs: kept");
                continue;
            }
            debug!(service = %key, "deleting stale IPVS service");
            ipvs.del_service(key)?;
            ops += 1;
        }
        for a in have_addrs.difference(&want_addrs) {
            links.del(*a)?;
            ops += 1;
        }
        self.state = new;
        self.globals = globals;
        Ok(ops)
    }

    fn partial_sync(
        &mut self,
        diff: &PlanDiff,
        plan: &Plan,
        config: &NodeConfig,
    ) -> Result<usize, IpvsError> {
        let mut changes = Changes::default();
        let key_of = |p: &crate::plan::ServicePortPlan| PortKey { family: p.family, name: p.name.clone() };
        let present = diff.added.iter().chain(diff.changed.iter().map(|(_, p)| p));
        for p in present {
            merge(&mut changes, self.state.set_port(&key_of(p), Some(p), config, &self.options.scheduler));
        }
        for p in &diff.removed {
            merge(&mut changes, self.state.set_port(&key_of(p), None, config, &self.options.scheduler));
        }
        let mut script = String::new();
        if !changes.elements_added.is_empty() || !changes.elements_removed.is_empty() {
            let removed: Vec<&filter::Element> = changes.elements_removed.iter().collect();
            let added: Vec<&filter::Element> = changes.elements_added.iter().collect();
            script.push_str(&filter::element_script(&removed, &added));
        }
        if diff.cluster_ips_changed {
            for family in IpFamily::ALL {
                script.push_str(&filter::cluster_ips_script(plan, family));
            }
        }
        if changes.is_empty() && script.is_empty() {
            return Ok(0);
        }
        let (ipvs, links, nft) = self.kernel()?;
        let mut ops = 0;
        for a in &changes.addresses_added {
            links.add(*a)?;
            ops += 1;
        }
        let mut gone = Vec::new();
        for (key, before, after) in &changes.services {
            match (before, after) {
                (None, Some((spec, dests))) => {
                    ensure_service(ipvs, key, spec)?;
                    ops += 1 + reconcile_dests(ipvs, key, dests, true)?;
                }
                (Some((old_spec, _)), Some((spec, dests))) => {
                    if old_spec != spec {
                        ipvs.edit_service(key, spec)?;
                        ops += 1;
                    }
                    ops += reconcile_dests(ipvs, key, dests, false)?;
                }
                (Some(_), None) => gone.push(*key),
                (None, None) => {}
            }
        }
        if !script.is_empty() {
            nft.apply(&script)?;
            ops += changes.elements_added.len() + changes.elements_removed.len();
        }
        for key in gone {
            ipvs.del_service(&key)?;
            ops += 1;
        }
        for a in &changes.addresses_removed {
            links.del(*a)?;
            ops += 1;
        }
        debug!(operations = ops, ports = diff.len(), "IPVS partial sync");
        Ok(ops)
    }

    /// The virtual services, addresses and nftables table of a full sync of `plan`.
    fn describe(&self, plan: &Plan, config: &NodeConfig) -> String {
        let st = State::build(plan, config, &self.options.scheduler, &State::default());
        let mut out = String::from("# IPVS virtual services (ipvsadm -Sn form)\n");
        for (key, (spec, dests)) in st.all_services() {
            let _ = write!(out, "-A {key} -s {}", spec.scheduler);
            if let Some(t) = spec.persistent() {
                let _ = write!(out, " -p {t}");
            }
            out.push('\n');
            for d in dests {
                let _ = writeln!(out, "-a {key} -r {} -m -w {}", d.addr, d.weight);
            }
        }
        let t = &self.options.timeouts;
        if t.any() {
            // 0: left as the kernel has it.
            let _ = writeln!(out, "--set {t}");
        }
        let addrs: Vec<String> = st.all_addresses().iter().map(IpAddr::to_string).collect();
        let _ = writeln!(out, "\n# {} addresses\n{}", address::DUMMY_IFNAME, addrs.join("\n"));
        out.push_str("\n# nftables (what IPVS cannot express)\n");
        for family in IpFamily::ALL {
            let globals = filter::global_elements(plan, config, family);
            let mut elements = st.all_elements();
            elements.extend(globals.iter());
            out.push_str(&filter::full_script(family, config, &elements));
        }
        out
    }
}

fn merge(into: &mut Changes, c: Changes) {
    into.services.extend(c.services);
    into.addresses_added.extend(c.addresses_added);
    into.addresses_removed.extend(c.addresses_removed);
    into.elements_added.extend(c.elements_added);
    into.elements_removed.extend(c.elements_removed);
}

/// Services ferry made: on an address it manages (kube-ipvs0's, the node's for NodePorts),
/// or with one of its firewall marks.
fn is_ferrys(key: &ServiceKey, addresses: &BTreeSet<IpAddr>) -> bool {
    match key {
        ServiceKey::Addr { addr, .. } => addresses.contains(addr),
        ServiceKey::FwMark { mark, .. } => compile::is_ferry_mark(*mark),
    }
}

/// Whether a stale service on `key` must be left alone: its address is in one of
/// `excludeCIDRs` (firewall-mark services have no address).
fn excluded(key: &ServiceKey, exclude_cidrs: &[IpNet]) -> bool {
    match key {
        ServiceKey::Addr { addr, .. } => exclude_cidrs.iter().any(|n| n.contains(addr)),
        ServiceKey::FwMark { .. } => false,
    }
}

/// Adds a service; one already there (left by an earlier run, or made meanwhile) is edited.
fn ensure_service(ipvs: &mut dyn Ipvs, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), IpvsError> {
    match ipvs.add_service(key, spec) {
        Err(e) if e.errno() == Some(EEXIST) => Ok(ipvs.edit_service(key, spec)?),
        other => Ok(other?),
    }
}

/// Brings the real servers of `key` to `want`; returns the operations done. A real server
/// that leaves keeps running connections: TCP ones with connections (or persistence
/// templates) get weight 0 and are deleted by a later sync once idle (kube-proxy's graceful
/// termination); the rest are deleted at once.
fn reconcile_dests(
    ipvs: &mut dyn Ipvs,
    key: &ServiceKey,
    want: &[Dest],
    fresh: bool,
) -> Result<usize, IpvsError> {
    let mut ops = 0;
    let have: BTreeMap<SocketAddr, netlink::DestStatus> =
        if fresh { BTreeMap::new() } else { ipvs.dests(key)?.into_iter().map(|d| (d.addr, d)).collect() };
    for d in want {
        match have.get(&d.addr) {
            None => match ipvs.add_dest(key, d) {
                Err(e) if e.errno() == Some(EEXIST) => ipvs.edit_dest(key, d)?,
                other => other?,
            },
            Some(h) if h.weight != d.weight || h.forward != netlink::FWD_MASQ => {
                if h.forward != netlink::FWD_MASQ {
                    // The forwarding method cannot be edited in place.
                    ipvs.del_dest(key, &d.addr)?;
                    ipvs.add_dest(key, d)?;
                } else {
                    ipvs.edit_dest(key, d)?;
                }
            }
            Some(_) => continue,
        }
        ops += 1;
    }
    for (addr, h) in &have {
        if want.iter().any(|d| d.addr == *addr) {
            continue;
        }
        if key.drains() && h.busy() {
            if h.weight != 0 {
                ipvs.edit_dest(key, &Dest { addr: *addr, weight: 0 })?;
                ops += 1;
            }
        } else {
            ipvs.del_dest(key, addr)?;
            ops += 1;
        }
    }
    Ok(ops)
}

impl Backend for IpvsBackend {
    fn name(&self) -> &'static str {
        "ipvs"
    }

    /// IPVS keeps its own connection table (`expire_nodest_conn` ends flows of deleted real
    /// servers), but with `vs/conntrack=1` UDP flows also sit in conntrack, whose entries to
    /// an endpoint that stopped serving would keep steering replies: clean them up as for
    /// nftables.
    fn nat_in_conntrack(&self) -> bool {
        true
    }

    fn render(&self, plan: &Plan, config: &NodeConfig) -> String {
        self.describe(plan, config)
    }

    fn sync(
        &mut self,
        plan: &Plan,
        diff: Option<&PlanDiff>,
        config: &NodeConfig,
    ) -> Result<SyncReport, BackendError> {
        let config_changed = self.last_config.as_ref() != Some(config);
        let full = !self.in_sync || config_changed || diff.is_none_or(|d| d.service_cidrs_changed);
        let report = SyncReport::run("IPVS", full, || match diff {
            Some(d) if !full => self.partial_sync(d, plan, config),
            _ => self.full_sync(plan, config),
        });
        self.in_sync = report.is_ok();
        let report = report?;
        self.last_config = Some(config.clone());
        Ok(report)
    }

    fn apply_options(&mut self, options: &BackendOptions) -> Result<bool, BackendError> {
        let new = IpvsOptions { netns: self.options.netns.clone(), ..IpvsOptions::from(options) };
        if new == self.options {
            return Ok(false);
        }
        self.reconfigure(new)?;
        Ok(true)
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let netns = self.options.netns.clone();
        if self.addresses.is_none() {
            self.addresses = Some(Box::new(Rtnetlink::open(netns.as_deref()).map_err(IpvsError::from)?));
        }
        let Some(links) = self.addresses.as_deref_mut() else { return Ok(()) };
        let mut owned = links.addresses().map_err(IpvsError::from)?;
        owned.extend(links.local_addresses().map_err(IpvsError::from)?);
        if self.ipvs.is_none() {
            match NetlinkIpvs::open(netns.as_deref()) {
                Ok(k) => self.ipvs = Some(Box::new(k)),
                // No IPVS in this kernel: no services to remove.
                Err(e) if e.errno() == Some(ENOENT) => {
                    info!("IPVS is not loaded: no IPVS services to remove")
                }
                Err(e) => return Err(IpvsError::from(e).into()),
            }
        }
        if let Some(ipvs) = self.ipvs.as_deref_mut() {
            for s in ipvs.services().map_err(IpvsError::from)? {
                if is_ferrys(&s.key, &owned) && !excluded(&s.key, &self.options.exclude_cidrs) {
                    ipvs.del_service(&s.key).map_err(IpvsError::from)?;
                }
            }
        }
        self.nft.apply(&filter::cleanup_script()).map_err(IpvsError::from)?;
        if let Some(links) = self.addresses.as_deref_mut() {
            links.remove_link().map_err(IpvsError::from)?;
        }
        self.state = State::default();
        self.in_sync = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
