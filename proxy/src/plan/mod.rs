//! The plan: what this node must do for every service port, per IP family.
//!
//! A pure function of the store and the node's configuration: no I/O, no globals. All
//! Kubernetes semantics live here (and in [`endpoints`]), so every backend compiles the same
//! decisions. [`Planner`] keeps the last plan and re-plans only the services that changed,
//! returning a [`PlanDiff`] for incremental backends.

pub mod diff;
pub mod endpoints;
pub mod verdict;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{IpFamily, Protocol, Service, ServiceKey, ServicePortName};
use crate::store::{Changes, Store};
pub use diff::PlanDiff;
use endpoints::{CandidateEndpoint, Locality, categorize, merge};

/// This node's configuration: everything the plan needs besides the watched objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    pub node_name: String,
    /// Every address of the node.
    pub node_ips: Vec<IpAddr>,
    /// Local-traffic detector: sources inside these are pods. Empty: no detector.
    pub cluster_cidrs: Vec<IpNet>,
    /// Service CIDRs given on the command line, added to those of ServiceCIDR objects.
    pub service_cidrs: Vec<IpNet>,
    /// Addresses NodePorts answer on; empty means every local address.
    pub nodeport_addresses: Vec<IpNet>,
    pub masquerade_all: bool,
}

impl NodeConfig {
    pub fn for_test(node_name: &str, node_ips: &[&str], cluster_cidrs: &[&str]) -> Self {
        #[expect(clippy::unwrap_used, reason = "test helper with literal input")]
        Self {
            node_name: node_name.into(),
            node_ips: node_ips.iter().map(|s| s.parse().unwrap()).collect(),
            cluster_cidrs: cluster_cidrs.iter().map(|s| s.parse().unwrap()).collect(),
            ..Self::default()
        }
    }

    pub fn cluster_cidrs(&self, family: IpFamily) -> impl Iterator<Item = &IpNet> {
        self.cluster_cidrs.iter().filter(move |n| IpFamily::of_net(n) == family)
    }

    pub fn has_local_detector(&self, family: IpFamily) -> bool {
        self.cluster_cidrs(family).next().is_some()
    }

    pub fn is_pod_source(&self, ip: &IpAddr) -> bool {
        self.cluster_cidrs.iter().any(|n| n.contains(ip))
    }

    pub fn is_node_ip(&self, ip: &IpAddr) -> bool {
        self.node_ips.contains(ip)
    }

    /// Node addresses NodePorts answer on, in one family.
    pub fn nodeport_ips(&self, family: IpFamily) -> Vec<IpAddr> {
        self.node_ips
            .iter()
            .copied()
            .filter(|ip| IpFamily::of(ip) == family)
            .filter(|ip| {
                self.nodeport_addresses.is_empty() || self.nodeport_addresses.iter().any(|n| n.contains(ip))
            })
            .collect()
    }
}

/// What the node does for one service port in one family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePortPlan {
    pub name: ServicePortName,
    pub family: IpFamily,
    pub protocol: Protocol,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    pub internal_policy_local: bool,
    pub external_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    pub affinity_timeout: Option<u32>,
    /// Endpoints for traffic under the Cluster policy (after topology and terminating fallback).
    pub cluster_endpoints: Vec<SocketAddr>,
    /// This node's endpoints, for traffic under a Local policy.
    pub local_endpoints: Vec<SocketAddr>,
    /// Some usable endpoint exists anywhere; without one every frontend REJECTs.
    pub has_endpoints: bool,
    /// Addresses of this node's endpoints among those in use. A connection from one of them
    /// that lands back on itself (hairpin) must be masqueraded, or the pod would drop the reply
    /// it sees coming from itself.
    pub hairpin_ips: Vec<IpAddr>,
    /// Every endpoint still serving (ready, or serving while terminating), whatever the
    /// policies and topology chose: flows already on one of them are left alone (conntrack
    /// cleanup only removes flows to endpoints that stopped serving, as kube-proxy does).
    pub serving_endpoints: Vec<SocketAddr>,
}

impl ServicePortPlan {
    /// The plan of the simplest service port: a ClusterIP only, Cluster policies, every one of
    /// `endpoints` ready. The starting point of backend tests, which change what they need.
    pub fn cluster_ip_only(
        name: ServicePortName,
        cluster_ip: IpAddr,
        port: u16,
        endpoints: Vec<SocketAddr>,
    ) -> Self {
        Self {
            protocol: name.protocol,
            name,
            family: IpFamily::of(&cluster_ip),
            cluster_ip,
            port,
            node_port: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            internal_policy_local: false,
            external_policy_local: false,
            health_check_node_port: None,
            affinity_timeout: None,
            has_endpoints: !endpoints.is_empty(),
            local_endpoints: Vec::new(),
            hairpin_ips: Vec::new(),
            serving_endpoints: endpoints.clone(),
            cluster_endpoints: endpoints,
        }
    }

    /// Endpoints for traffic to the ClusterIP.
    pub fn internal_endpoints(&self) -> &[SocketAddr] {
        if self.internal_policy_local { &self.local_endpoints } else { &self.cluster_endpoints }
    }

    /// Endpoints for traffic from outside the cluster to NodePorts, LoadBalancer and external IPs.
    pub fn external_endpoints(&self) -> &[SocketAddr] {
        if self.external_policy_local { &self.local_endpoints } else { &self.cluster_endpoints }
    }

    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.load_balancer_ips.is_empty()
    }

    /// External frontends: LoadBalancer ingress IPs and external IPs.
    pub fn external_addresses(&self) -> impl Iterator<Item = &IpAddr> {
        self.load_balancer_ips.iter().chain(&self.external_ips)
    }
}

/// Identifies a service port within a plan; ordered by family, then name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortKey {
    pub family: IpFamily,
    pub name: ServicePortName,
}

/// The whole plan for this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ports: BTreeMap<PortKey, Arc<ServicePortPlan>>,
    /// Every allocated ClusterIP, also of services without ports (traffic to an undefined port
    /// on one is REJECTed).
    pub cluster_ips: BTreeSet<IpAddr>,
    /// Service CIDRs (flags and ServiceCIDR objects): unallocated addresses in them are DROPped.
    pub service_cidrs: Vec<IpNet>,
}

impl Plan {
    pub fn family(&self, family: IpFamily) -> impl Iterator<Item = &Arc<ServicePortPlan>> {
        self.ports.iter().filter(move |(k, _)| k.family == family).map(|(_, v)| v)
    }
}

/// Plans one service: its ports in every family it has a ClusterIP in.
pub fn plan_service(svc: &Service, store: &Store, config: &NodeConfig) -> Vec<ServicePortPlan> {
    let zone = store.node().and_then(|n| n.zone());
    let locality = Locality { node_name: &config.node_name, zone };
    let mut out = Vec::new();
    for family in IpFamily::ALL {
        let Some(cluster_ip) = svc.cluster_ip(family) else { continue };
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter().copied().filter(|ip| IpFamily::of(ip) == family).collect()
        };
        let external_ips = of_family(&svc.external_ips);
        let load_balancer_ips = of_family(&svc.load_balancer_ips);
        let source_ranges: Vec<IpNet> =
            svc.source_ranges.iter().copied().filter(|n| IpFamily::of_net(n) == family).collect();
        for port in &svc.ports {
            let name = ServicePortName {
                service: svc.key.clone(),
                port: port.name.clone(),
                protocol: port.protocol,
            };
            let candidates =
                merge(store.slices_of(&svc.key).filter(|s| s.family == family).flat_map(|slice| {
                    slice
                        .ports
                        .iter()
                        .filter(|p| p.name == port.name && p.protocol == port.protocol)
                        .flat_map(move |p| {
                            slice.endpoints.iter().map(move |ep| CandidateEndpoint {
                                addr: SocketAddr::new(ep.ip, p.port),
                                local: ep.node_name.as_deref() == Some(config.node_name.as_str()),
                                ready: ep.ready,
                                serving: ep.serving,
                                terminating: ep.terminating,
                                zone_hints: ep.zone_hints.clone(),
                                node_hints: ep.node_hints.clone(),
                            })
                        })
                }));
            let externally_accessible =
                port.node_port.is_some() || !external_ips.is_empty() || !load_balancer_ips.is_empty();
            let external_policy_local = svc.external_policy_local && externally_accessible;
            let uses_cluster = !svc.internal_policy_local || externally_accessible;
            let uses_local = svc.internal_policy_local || external_policy_local;
            let cat = categorize(&candidates, locality, uses_cluster, uses_local);
            let mut hairpin_ips: Vec<IpAddr> = candidates
                .iter()
                .filter(|c| c.local && (cat.cluster.contains(&c.addr) || cat.local.contains(&c.addr)))
                .map(|c| c.addr.ip())
                .collect();
            hairpin_ips.sort();
            hairpin_ips.dedup();
            out.push(ServicePortPlan {
                name,
                family,
                protocol: port.protocol,
                cluster_ip,
                port: port.port,
                node_port: port.node_port,
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                source_ranges: source_ranges.clone(),
                internal_policy_local: svc.internal_policy_local,
                external_policy_local,
                health_check_node_port: svc.health_check_node_port,
                affinity_timeout: svc.affinity_timeout,
                cluster_endpoints: cat.cluster,
                local_endpoints: cat.local,
                has_endpoints: cat.has_any,
                hairpin_ips,
                serving_endpoints: candidates
                    .iter()
                    .filter(|c| c.ready || c.serving)
                    .map(|c| c.addr)
                    .collect(),
            });
        }
    }
    out
}

/// Builds the plan for every service in the store.
pub fn build(store: &Store, config: &NodeConfig) -> Plan {
    let mut plan = Plan::default();
    for svc in store.services() {
        plan.cluster_ips.extend(svc.cluster_ips.iter().copied());
        for p in plan_service(svc, store, config) {
            plan.ports.insert(PortKey { family: p.family, name: p.name.clone() }, Arc::new(p));
        }
    }
    plan.service_cidrs = service_cidrs(store, config);
    plan
}

fn service_cidrs(store: &Store, config: &NodeConfig) -> Vec<IpNet> {
    let mut cidrs: Vec<IpNet> = config.service_cidrs.iter().chain(store.service_cidrs()).copied().collect();
    cidrs.sort();
    cidrs.dedup();
    cidrs
}

/// Keeps the applied plan and updates it incrementally from the store's changes.
#[derive(Debug, Default)]
pub struct Planner {
    plan: Plan,
    /// ClusterIPs by owning service, with a count per address: a malformed cluster can list one
    /// address twice, and it stays allocated until its last owner goes.
    ips_of_service: HashMap<ServiceKey, Vec<IpAddr>>,
    ip_owners: HashMap<IpAddr, u32>,
    /// The first update plans everything: the config's service CIDRs, all services.
    initialized: bool,
    /// Plan keys by service, so re-planning one service never scans the whole plan.
    ports_of_service: HashMap<ServiceKey, Vec<PortKey>>,
}

impl Planner {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Re-plans what `changes` names (everything when `changes.all`) and returns the difference.
    pub fn update(&mut self, store: &Store, config: &NodeConfig, changes: &Changes) -> PlanDiff {
        if changes.all || !self.initialized {
            self.initialized = true;
            let new = build(store, config);
            let diff = PlanDiff::between(&self.plan, &new);
            self.plan = new;
            self.ips_of_service = store.services().map(|s| (s.key.clone(), s.cluster_ips.clone())).collect();
            self.ports_of_service.clear();
            for k in self.plan.ports.keys() {
                self.ports_of_service.entry(k.name.service.clone()).or_default().push(k.clone());
            }
            self.ip_owners.clear();
            for ip in self.ips_of_service.values().flatten() {
                *self.ip_owners.entry(*ip).or_default() += 1;
            }
            return diff;
        }
        let mut diff = PlanDiff::default();
        for key in &changes.services {
            self.replan_service(key, store, config, &mut diff);
        }
        diff
    }

    fn replan_service(&mut self, key: &ServiceKey, store: &Store, config: &NodeConfig, diff: &mut PlanDiff) {
        let old: Vec<PortKey> = self.ports_of_service.remove(key).unwrap_or_default();
        let svc = store.service(key);
        let mut fresh: BTreeMap<PortKey, ServicePortPlan> = BTreeMap::new();
        if let Some(svc) = svc {
            for p in plan_service(svc, store, config) {
                fresh.insert(PortKey { family: p.family, name: p.name.clone() }, p);
            }
        }
        for k in old {
            if !fresh.contains_key(&k)
                && let Some(prev) = self.plan.ports.remove(&k)
            {
                diff.removed.push(prev);
            }
        }
        if !fresh.is_empty() {
            self.ports_of_service.insert(key.clone(), fresh.keys().cloned().collect());
        }
        for (k, p) in fresh {
            match self.plan.ports.get(&k) {
                Some(prev) if **prev == p => {}
                Some(prev) => {
                    let prev = prev.clone();
                    let p = Arc::new(p);
                    self.plan.ports.insert(k, p.clone());
                    diff.changed.push((prev, p));
                }
                None => {
                    let p = Arc::new(p);
                    self.plan.ports.insert(k, p.clone());
                    diff.added.push(p);
                }
            }
        }
        // ClusterIPs of a service without ports still count as allocated.
        let new_ips = svc.map(|s| s.cluster_ips.clone()).unwrap_or_default();
        let old_ips = self.ips_of_service.remove(key).unwrap_or_default();
        if new_ips != old_ips {
            for ip in &old_ips {
                if let Some(n) = self.ip_owners.get_mut(ip) {
                    *n -= 1;
                    if *n == 0 {
                        self.ip_owners.remove(ip);
                        self.plan.cluster_ips.remove(ip);
                        diff.cluster_ips_changed = true;
                        diff.cluster_ips_removed.push(*ip);
                    }
                }
            }
            for ip in &new_ips {
                let n = self.ip_owners.entry(*ip).or_default();
                *n += 1;
                if *n == 1 {
                    self.plan.cluster_ips.insert(*ip);
                    diff.cluster_ips_changed = true;
                    // Freed and taken again in one update (one service handing its address
                    // to another): no change.
                    match diff.cluster_ips_removed.iter().position(|r| r == ip) {
                        Some(i) => {
                            diff.cluster_ips_removed.swap_remove(i);
                        }
                        None => diff.cluster_ips_added.push(*ip),
                    }
                }
            }
        }
        if !new_ips.is_empty() {
            self.ips_of_service.insert(key.clone(), new_ips);
        }
    }
}

#[cfg(test)]
mod tests;
