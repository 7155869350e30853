//! One service port of the plan → its IPVS virtual services with their real servers, the
//! addresses `kube-ipvs0` must hold, and its elements in ferry's nftables table (the parts
//! IPVS cannot express: REJECT/DROP, masquerade marks, source ranges, short-circuits).
//!
//! Pure: no I/O. Every frontend gets its own virtual service, as in kube-proxy's IPVS mode:
//! the ClusterIP, each LoadBalancer and external IP, and the NodePort on each node address.

use std::net::{IpAddr, SocketAddr};

use super::filter::{Element, REJECT};
use super::netlink::{Dest, ServiceKey, ServiceSpec};
use crate::model::{IpFamily, Protocol};
use crate::plan::ServicePortPlan;

/// A virtual service and its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualService {
    pub key: ServiceKey,
    pub spec: ServiceSpec,
    /// Sorted by address.
    pub dests: Vec<Dest>,
}

/// Everything one service port puts into the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub services: Vec<VirtualService>,
    /// Addresses for `kube-ipvs0`.
    pub addresses: Vec<IpAddr>,
    pub elements: Vec<Element>,
}

/// What compiling needs besides the port.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub scheduler: &'a str,
    /// Node addresses of the port's family that answer NodePorts.
    pub nodeport_ips: &'a [IpAddr],
}

/// `addr . proto . port`, the key of every frontend set.
pub fn frontend(addr: &IpAddr, protocol: Protocol, port: u16) -> String {
    format!("{addr} . {} . {port}", protocol.as_str())
}

/// The external frontends of a port: LoadBalancer IPs, external IPs, then the NodePort on
/// each node address, as (address, port, is a LoadBalancer IP).
fn externals(p: &ServicePortPlan, nodeport_ips: &[IpAddr]) -> Vec<(IpAddr, u16, bool)> {
    let mut out: Vec<(IpAddr, u16, bool)> = p.load_balancer_ips.iter().map(|a| (*a, p.port, true)).collect();
    out.extend(p.external_ips.iter().map(|a| (*a, p.port, false)));
    if let Some(np) = p.node_port {
        out.extend(nodeport_ips.iter().map(|a| (*a, np, false)));
    }
    out
}

/// Whether the port needs a firewall-mark service: externalTrafficPolicy Local with some
/// external frontend, so that pods and the node reach it through the cluster endpoints
/// while outside clients get the local ones.
pub fn needs_mark(p: &ServicePortPlan, nodeport_ips: &[IpAddr]) -> bool {
    p.external_policy_local
        && p.has_endpoints
        && !p.cluster_endpoints.is_empty()
        && !externals(p, nodeport_ips).is_empty()
}

/// Real servers: `chosen` with weight 1, and with `serving` the other endpoints still
/// serving (terminating ones) with weight 0, so connections already on them continue while
/// no new one is scheduled there.
fn dests(chosen: &[SocketAddr], serving: Option<&[SocketAddr]>) -> Vec<Dest> {
    let mut out: Vec<Dest> = chosen.iter().map(|a| Dest { addr: *a, weight: 1 }).collect();
    for a in serving.into_iter().flatten() {
        if !chosen.contains(a) {
            out.push(Dest { addr: *a, weight: 0 });
        }
    }
    out.sort();
    out.dedup_by_key(|d| d.addr);
    out
}

/// Compiles one service port; `mark` is its firewall mark when [`needs_mark`].
pub fn compile(p: &ServicePortPlan, ctx: Context<'_>, mark: Option<u32>) -> Output {
    let mut out = Output::default();
    let family = p.family;
    let spec = ServiceSpec::new(ctx.scheduler, family, p.affinity_timeout);
    let el = |out: &mut Output, set: &'static str, key: String, value: Option<String>| {
        out.elements.push(Element { family, set, key, value });
    };
    let service = |out: &mut Output, addr: IpAddr, port: u16, dests: Vec<Dest>| {
        out.services.push(VirtualService {
            key: ServiceKey::Addr { protocol: p.protocol, addr, port },
            spec: spec.clone(),
            dests,
        });
    };
    // Endpoints of the cluster set keep their terminating peers at weight 0; local sets are
    // a node's own endpoints, where the plan does not say which serving ones are local.
    let cluster_dests = || dests(&p.cluster_endpoints, Some(&p.serving_endpoints));

    // ClusterIP.
    out.addresses.push(p.cluster_ip);
    let key = frontend(&p.cluster_ip, p.protocol, p.port);
    let internal = p.internal_endpoints();
    if internal.is_empty() {
        let verdict = if p.has_endpoints { "drop" } else { REJECT };
        el(&mut out, "no_endpoints", key, Some(verdict.to_owned()));
    } else {
        let d = if p.internal_policy_local { dests(internal, None) } else { cluster_dests() };
        service(&mut out, p.cluster_ip, p.port, d);
        el(&mut out, "frontends", key, None);
    }

    // LoadBalancer IPs, external IPs, NodePorts.
    out.addresses.extend(p.external_addresses().copied());
    for (addr, port, _) in externals(p, ctx.nodeport_ips) {
        let key = frontend(&addr, p.protocol, port);
        if !p.has_endpoints {
            el(&mut out, "no_endpoints", key, Some(REJECT.to_owned()));
            continue;
        }
        el(&mut out, "frontends", key.clone(), None);
        if !p.external_policy_local {
            el(&mut out, "ext_masq", key, None);
            service(&mut out, addr, port, cluster_dests());
            continue;
        }
        el(&mut out, "ext_local", key.clone(), None);
        if let Some(m) = mark {
            el(&mut out, "sc_marks", key.clone(), Some(format!("{m:#x}")));
        }
        if p.local_endpoints.is_empty() {
            el(&mut out, "no_local", key, None);
        } else {
            service(&mut out, addr, port, dests(&p.local_endpoints, None));
        }
    }
    if let Some(mark) = mark {
        out.services.push(VirtualService {
            key: ServiceKey::FwMark { family, mark },
            spec: spec.clone(),
            dests: cluster_dests(),
        });
    }

    // loadBalancerSourceRanges guard LoadBalancer IPs only; NodePorts bypass them.
    if !p.source_ranges.is_empty() && p.has_endpoints {
        let ranges = ipnet::IpNet::aggregate(&p.source_ranges);
        for lb in &p.load_balancer_ips {
            let key = frontend(lb, p.protocol, p.port);
            for r in &ranges {
                el(&mut out, "firewall_allow", format!("{key} . {r}"), None);
            }
            el(&mut out, "firewall", key, None);
        }
    }
    for ip in &p.hairpin_ips {
        el(&mut out, "hairpin", format!("{ip} . {ip}"), None);
    }
    out.addresses.sort();
    out.addresses.dedup();
    out
}

/// Firewall marks of short-circuit services live in this range, so ferry recognises its own
/// (and leaves other fwmark services alone).
pub const MARK_BASE: u32 = 0x0f00_0000;
pub const MARK_SPACE: u32 = 0x0001_0000;

pub fn is_ferry_mark(mark: u32) -> bool {
    (MARK_BASE..MARK_BASE + MARK_SPACE).contains(&mark)
}

/// The mark a port prefers: derived from its name, so a restarted ferry picks the same one
/// and finds its services in place.
pub fn preferred_mark(name: &str, family: IpFamily) -> u32 {
    let h = crate::backend::nftables::compile::stable_hash(&format!("{name} {family:?}"));
    MARK_BASE + (h % u64::from(MARK_SPACE)) as u32
}
