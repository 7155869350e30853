//! Compiles one service port of the plan into its map entries: frontends with their flags,
//! the endpoint lists they choose from, and source ranges. Pure: set ids are assigned later
//! ([`super::state`]). The decisions mirror `plan::verdict` (the reference) and the nftables
//! backend's `compile.rs`.

use std::net::{IpAddr, SocketAddr};

use proxy_common::{FrontendKey, NODE_PORT_ADDR_V4, NODE_PORT_ADDR_V6, frontend, protocol};

use super::maps::{SourceRange, addr16, cidr};
use crate::model::{IpFamily, Protocol};
use crate::plan::{NodeConfig, Plan, ServicePortPlan};

/// A list of endpoints a frontend chooses from, and whether it needs a Maglev table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointList {
    pub endpoints: Vec<SocketAddr>,
    pub maglev: bool,
}

/// A frontend before set ids are known: which of the port's lists it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendTemplate {
    pub key: FrontendKey,
    pub flags: u32,
    /// Index into [`PortMaps::lists`] of the main set; `None`: no endpoints (REJECT/DROP).
    pub main: Option<usize>,
    /// Index of the short-circuit set.
    pub short_circuit: Option<usize>,
    pub affinity_timeout: u32,
}

/// Everything one service port puts into the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortMaps {
    pub frontends: Vec<FrontendTemplate>,
    pub lists: Vec<EndpointList>,
    pub source_ranges: Vec<SourceRange>,
}

impl PortMaps {
    /// The index of `list`, added if new (a port's frontends often share one list).
    fn list(&mut self, endpoints: &[SocketAddr], maglev: bool) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        let list = EndpointList { endpoints: endpoints.to_vec(), maglev };
        Some(self.lists.iter().position(|l| *l == list).unwrap_or_else(|| {
            self.lists.push(list);
            self.lists.len() - 1
        }))
    }
}

pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => protocol::TCP,
        Protocol::Udp => protocol::UDP,
        Protocol::Sctp => protocol::SCTP,
    }
}

fn key(ip: IpAddr, port: u16, proto: u8) -> FrontendKey {
    FrontendKey::from_raw(addr16(ip), port.to_be(), proto)
}

/// Compiles one service port; `service_id` keys its source ranges and affinity.
pub fn compile(p: &ServicePortPlan, config: &NodeConfig, service_id: u32) -> PortMaps {
    let mut out = PortMaps::default();
    let proto = protocol_number(p.protocol);
    let affinity_timeout = p.affinity_timeout.unwrap_or(0);
    let detector = config.has_local_detector(p.family);

    // ClusterIP: random choice among the internal endpoints.
    let internal = p.internal_endpoints();
    let mut flags = 0;
    if internal.is_empty() && p.has_endpoints {
        flags |= frontend::EMPTY_DROP;
    }
    if config.masquerade_all {
        flags |= frontend::MASQ_ALWAYS;
    } else if detector {
        flags |= frontend::MASQ_NOT_POD;
    }
    let main = out.list(internal, false);
    out.frontends.push(FrontendTemplate {
        key: key(p.cluster_ip, p.port, proto),
        flags,
        main,
        short_circuit: None,
        affinity_timeout,
    });

    // External frontends: LoadBalancer ingress IPs, external IPs, the NodePort.
    let mut externals: Vec<(FrontendKey, u32)> = Vec::new();
    for lb in &p.load_balancer_ips {
        let ranges = if p.source_ranges.is_empty() { 0 } else { frontend::SOURCE_RANGES };
        externals.push((key(*lb, p.port, proto), ranges));
    }
    for ip in &p.external_ips {
        externals.push((key(*ip, p.port, proto), 0));
    }
    if let Some(np) = p.node_port {
        let any = if p.family == IpFamily::V4 { NODE_PORT_ADDR_V4 } else { NODE_PORT_ADDR_V6 };
        externals.push((FrontendKey::from_raw(any, np.to_be(), proto), frontend::NODE_PORT));
    }
    for (fkey, extra) in externals {
        let mut flags = extra | frontend::MAGLEV;
        let (main, short_circuit) = if !p.has_endpoints {
            (None, None)
        } else if !p.external_policy_local {
            flags |= frontend::MASQ_ALWAYS;
            (out.list(&p.cluster_endpoints, true), None)
        } else {
            // Policy Local: outside clients keep their address and reach local endpoints
            // only (none: DROP); pods and the node short-circuit to the cluster endpoints.
            flags |= frontend::SHORT_CIRCUIT_NODE;
            if detector {
                flags |= frontend::SHORT_CIRCUIT_PODS;
            }
            if p.local_endpoints.is_empty() {
                flags |= frontend::EMPTY_DROP;
            }
            (out.list(&p.local_endpoints, true), out.list(&p.cluster_endpoints, false))
        };
        out.frontends.push(FrontendTemplate { key: fkey, flags, main, short_circuit, affinity_timeout });
    }

    if !p.source_ranges.is_empty() && !p.load_balancer_ips.is_empty() {
        for net in ipnet::IpNet::aggregate(&p.source_ranges) {
            out.source_ranges.push((service_id, cidr(&net)));
        }
    }
    out
}

/// The node-wide entries: NODE_ADDRS, POD_CIDRS, DST_POLICY.
pub struct Globals {
    pub node_addrs: Vec<([u8; 16], u32)>,
    pub pod_cidrs: Vec<super::maps::Cidr>,
    pub dst_policy: Vec<(super::maps::Cidr, u32)>,
}

pub fn globals(plan: &Plan, config: &NodeConfig) -> Globals {
    use proxy_common::{dst_policy, node_addr};
    let mut node_addrs: Vec<([u8; 16], u32)> = Vec::new();
    for ip in &config.node_ips {
        let mut flags = node_addr::NODE;
        if config.nodeport_ips(IpFamily::of(ip)).contains(ip) {
            flags |= node_addr::NODE_PORT;
        }
        node_addrs.push((addr16(*ip), flags));
    }
    node_addrs.sort();
    node_addrs.dedup_by_key(|(a, _)| *a);
    let mut pod_cidrs: Vec<_> = config.cluster_cidrs.iter().map(cidr).collect();
    pod_cidrs.sort();
    pod_cidrs.dedup();
    let mut dst: Vec<(super::maps::Cidr, u32)> = plan
        .service_cidrs
        .iter()
        .map(|n| (cidr(n), dst_policy::DROP))
        .chain(plan.cluster_ips.iter().map(|ip| ((128, addr16(*ip)), dst_policy::REJECT)))
        .collect();
    dst.sort();
    dst.dedup_by_key(|(c, _)| *c);
    Globals { node_addrs, pod_cidrs, dst_policy: dst }
}
