//! Endpoint selection for one service port: which endpoints serve cluster-wide traffic and which
//! serve node-local traffic, after topology hints and the terminating-endpoint fallback.
//!
//! This mirrors kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go) rule for rule; it is
//! the only place in ferry that decides it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// One endpoint of one service port, as the store merged it from the slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateEndpoint {
    pub addr: SocketAddr,
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

impl CandidateEndpoint {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// Where this node sits, for topology.
#[derive(Debug, Clone, Copy)]
pub struct Locality<'a> {
    pub node_name: &'a str,
    pub zone: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameZone,
    SameNode,
}

/// Endpoints chosen for one service port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categorized {
    pub cluster: Vec<SocketAddr>,
    pub local: Vec<SocketAddr>,
    /// Some endpoint is usable somewhere in the cluster (ready, or serving and terminating).
    pub has_any: bool,
}

/// `uses_cluster`: internal policy Cluster, or externally accessible (short-circuit needs
/// cluster endpoints even under external policy Local). `uses_local`: internal policy Local, or
/// external policy Local.
pub fn categorize(
    endpoints: &[CandidateEndpoint],
    locality: Locality<'_>,
    uses_cluster: bool,
    uses_local: bool,
) -> Categorized {
    let mut out = Categorized::default();
    if uses_cluster {
        let mode = topology_mode(endpoints, locality);
        out.cluster = pick(endpoints, |ep| ep.ready && available_for_topology(ep, mode, locality));
        if out.cluster.is_empty() {
            out.cluster = pick(endpoints, CandidateEndpoint::serving_terminating);
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !uses_local {
        return out;
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for ep in endpoints {
        if ep.ready {
            out.has_any = true;
            local_ready |= ep.local;
        } else if ep.serving_terminating() {
            out.has_any = true;
            local_serving_terminating |= ep.local;
        }
    }
    if local_ready {
        out.local = pick(endpoints, |ep| ep.local && ep.ready);
    } else if local_serving_terminating {
        out.local = pick(endpoints, |ep| ep.local && ep.serving_terminating());
    }
    out
}

fn pick(endpoints: &[CandidateEndpoint], keep: impl Fn(&CandidateEndpoint) -> bool) -> Vec<SocketAddr> {
    endpoints.iter().filter(|ep| keep(ep)).map(|ep| ep.addr).collect()
}

/// Hints are honoured only when every ready endpoint carries them and at least one names this
/// node (or zone); otherwise traffic would concentrate or black-hole, so they are ignored.
fn topology_mode(endpoints: &[CandidateEndpoint], locality: Locality<'_>) -> TopologyMode {
    let mut all_node_hints = true;
    let mut any_for_node = false;
    let mut all_zone_hints = true;
    let mut any_for_zone = false;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|ep| ep.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.iter().any(|n| n == locality.node_name) {
            any_for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if locality.zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)) {
            any_for_zone = true;
        }
    }
    if !any_ready {
        return TopologyMode::None;
    }
    if all_node_hints && any_for_node {
        return TopologyMode::SameNode;
    }
    if all_zone_hints && any_for_zone {
        return TopologyMode::SameZone;
    }
    TopologyMode::None
}

fn available_for_topology(ep: &CandidateEndpoint, mode: TopologyMode, locality: Locality<'_>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => ep.node_hints.iter().any(|n| n == locality.node_name),
        TopologyMode::SameZone => locality.zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)),
    }
}

/// Merges endpoints of one service port from several slices, deduplicating by address as
/// kube-proxy does: the first occurrence wins, except that a local copy replaces a remote one.
pub fn merge(candidates: impl IntoIterator<Item = CandidateEndpoint>) -> Vec<CandidateEndpoint> {
    let mut by_addr: BTreeMap<SocketAddr, CandidateEndpoint> = BTreeMap::new();
    for ep in candidates {
        match by_addr.get(&ep.addr) {
            Some(existing) if existing.local || !ep.local => {}
            _ => {
                by_addr.insert(ep.addr, ep);
            }
        }
    }
    by_addr.into_values().collect()
}
