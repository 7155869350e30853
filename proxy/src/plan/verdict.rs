//! What happens to one new connection, decided from the plan alone.
//!
//! This is the reference statement of ferry's packet semantics: `ferry trace` prints it, the
//! backends compile the same decisions into the kernel, and the end-to-end suites check that
//! the kernel agrees with it.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::{NodeConfig, Plan, ServicePortPlan};
use crate::model::Protocol;

/// Where a connection comes from, as the data path can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The node itself (one of `--node-ip`, or loopback).
    Node,
    /// Inside `--cluster-cidr`: a pod, on this node or another.
    Pod,
    /// Anything else.
    External,
}

/// Which kind of frontend a connection matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontendKind {
    ClusterIp,
    LoadBalancerIp,
    ExternalIp,
    NodePort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    Endpoints,
    Reject,
    Drop,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub verdict: VerdictKind,
    pub endpoints: Vec<SocketAddr>,
    pub masquerade: bool,
    #[serde(skip)]
    pub source: SourceKind,
    #[serde(skip)]
    pub frontend: Option<(FrontendKind, String)>,
    /// Why, step by step, for people.
    #[serde(skip)]
    pub explanation: Vec<String>,
}

impl Verdict {
    fn new(source: SourceKind) -> Self {
        Self {
            verdict: VerdictKind::None,
            endpoints: vec![],
            masquerade: false,
            source,
            frontend: None,
            explanation: vec![],
        }
    }

    fn finish(mut self, verdict: VerdictKind, why: impl Into<String>) -> Self {
        self.verdict = verdict;
        self.explanation.push(why.into());
        self
    }
}

pub fn classify_source(config: &NodeConfig, src: IpAddr) -> SourceKind {
    if src.is_loopback() || config.is_node_ip(&src) {
        SourceKind::Node
    } else if config.is_pod_source(&src) {
        SourceKind::Pod
    } else {
        SourceKind::External
    }
}

/// The verdict for a new connection from `src` to `dst` over `protocol`.
pub fn trace(plan: &Plan, config: &NodeConfig, src: IpAddr, dst: SocketAddr, protocol: Protocol) -> Verdict {
    let source = classify_source(config, src);
    let mut v = Verdict::new(source);
    v.explanation.push(format!(
        "source {src} is {}",
        match source {
            SourceKind::Node => "this node",
            SourceKind::Pod => "a pod (inside --cluster-cidr)",
            SourceKind::External => "external to the cluster",
        }
    ));
    let daddr = dst.ip();
    let matches_port = |p: &ServicePortPlan| p.protocol == protocol && p.port == dst.port();
    let nodeport_ok = config.nodeport_ips(crate::model::IpFamily::of(&daddr)).contains(&daddr);

    // Same precedence as the data path: service IPs first, NodePorts last.
    for p in plan.ports.values() {
        if p.cluster_ip == daddr && matches_port(p) {
            v.frontend = Some((FrontendKind::ClusterIp, p.name.to_string()));
            v.explanation.push(format!("matches ClusterIP of {}", p.name));
            return cluster_ip(v, p, config, src);
        }
    }
    for p in plan.ports.values() {
        if matches_port(p) && p.load_balancer_ips.contains(&daddr) {
            v.frontend = Some((FrontendKind::LoadBalancerIp, p.name.to_string()));
            v.explanation.push(format!("matches LoadBalancer IP of {}", p.name));
            if !p.source_ranges.is_empty() && !p.source_ranges.iter().any(|n| n.contains(&src)) {
                return v.finish(VerdictKind::Drop, "source is outside loadBalancerSourceRanges");
            }
            return external(v, p, config, src);
        }
        if matches_port(p) && p.external_ips.contains(&daddr) {
            v.frontend = Some((FrontendKind::ExternalIp, p.name.to_string()));
            v.explanation.push(format!("matches external IP of {}", p.name));
            return external(v, p, config, src);
        }
    }
    if nodeport_ok {
        for p in plan.ports.values() {
            if p.protocol == protocol
                && p.node_port == Some(dst.port())
                && crate::model::IpFamily::of(&daddr) == p.family
            {
                v.frontend = Some((FrontendKind::NodePort, p.name.to_string()));
                v.explanation.push(format!("matches NodePort {} of {}", dst.port(), p.name));
                return external(v, p, config, src);
            }
        }
    }
    if plan.cluster_ips.contains(&daddr) {
        return v.finish(
            VerdictKind::Reject,
            format!("{daddr} is a ClusterIP but {}/{protocol} is not one of its ports", dst.port()),
        );
    }
    if plan.service_cidrs.iter().any(|n| n.contains(&daddr)) {
        return v.finish(VerdictKind::Drop, format!("{daddr} is in a service CIDR but not allocated"));
    }
    v.finish(VerdictKind::None, "no service matches; ferry does not touch it")
}

fn cluster_ip(mut v: Verdict, p: &ServicePortPlan, config: &NodeConfig, src: IpAddr) -> Verdict {
    let eps = p.internal_endpoints();
    if eps.is_empty() {
        return if p.has_endpoints {
            v.finish(VerdictKind::Drop, "internalTrafficPolicy Local and no endpoint on this node")
        } else {
            v.finish(VerdictKind::Reject, "service has no endpoints")
        };
    }
    if config.masquerade_all {
        v.masquerade = true;
        v.explanation.push("masquerade: --masquerade-all".into());
    } else if config.has_local_detector(crate::model::IpFamily::of(&src)) && v.source != SourceKind::Pod {
        v.masquerade = true;
        v.explanation.push("masquerade: source is not a pod".into());
    }
    to_endpoints(
        v,
        eps,
        src,
        if p.internal_policy_local {
            "local endpoints (internalTrafficPolicy Local)"
        } else {
            "cluster endpoints"
        },
    )
}

fn external(mut v: Verdict, p: &ServicePortPlan, config: &NodeConfig, src: IpAddr) -> Verdict {
    if !p.has_endpoints {
        return v.finish(VerdictKind::Reject, "service has no endpoints");
    }
    if !p.external_policy_local {
        v.masquerade = true;
        v.explanation.push("masquerade: external traffic under externalTrafficPolicy Cluster".into());
        return to_endpoints(v, &p.cluster_endpoints, src, "cluster endpoints");
    }
    if v.source == SourceKind::Pod && config.has_local_detector(crate::model::IpFamily::of(&src)) {
        return to_endpoints(
            v,
            &p.cluster_endpoints,
            src,
            "cluster endpoints (pod traffic short-circuits externalTrafficPolicy Local)",
        );
    }
    if v.source == SourceKind::Node {
        v.masquerade = true;
        v.explanation
            .push("masquerade: the node itself reaches an externalTrafficPolicy Local frontend".into());
        return to_endpoints(
            v,
            &p.cluster_endpoints,
            src,
            "cluster endpoints (node traffic short-circuits externalTrafficPolicy Local)",
        );
    }
    if p.local_endpoints.is_empty() {
        return v.finish(VerdictKind::Drop, "externalTrafficPolicy Local and no endpoint on this node");
    }
    to_endpoints(
        v,
        &p.local_endpoints,
        src,
        "local endpoints (externalTrafficPolicy Local keeps the client address)",
    )
}

fn to_endpoints(mut v: Verdict, eps: &[SocketAddr], src: IpAddr, which: &str) -> Verdict {
    v.endpoints = eps.to_vec();
    if eps.iter().any(|e| e.ip() == src) && !v.masquerade {
        v.masquerade = true;
        v.explanation.push("masquerade: hairpin (the source is one of the endpoints)".into());
    }
    v.finish(VerdictKind::Endpoints, format!("forward to one of {} {which}", eps.len()))
}
