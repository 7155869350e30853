//! Service: the parts of `v1.Service` that change what a node programs.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;

use super::{
    IpFamily, Kind, ObjectRef, Problem, ProblemReason, Protocol, ServiceKey, parse_cidr_sloppy,
    parse_ip_sloppy, port_from_i32,
};

/// Label that hands a Service to another proxy; kube-proxy ignores such Services.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the endpoints controller sets on headless Services' slices and kube-proxy skips.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Legacy annotation for source ranges, read when the spec field is empty (as kube-proxy does).
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    /// Allocated ClusterIPs, at most one per family.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs that the node must handle (`ipMode: Proxy` ones are left to the
    /// load balancer and not listed).
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    /// `externalTrafficPolicy: Local` (only meaningful when externally accessible).
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    /// ClientIP session affinity timeout in seconds, when affinity is on.
    pub affinity_timeout: Option<u32>,
    pub node_ports_allowed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// Outcome of reading one Service.
#[derive(Debug)]
pub enum ServiceRead {
    /// Usable, maybe with parts skipped (reported in `problems`).
    Usable(Service, Vec<Problem>),
    /// Not ferry's to program (headless, ExternalName, another proxy's); not an error.
    Ignored(&'static str),
    /// Unusable as a whole.
    Invalid(Problem),
}

impl Service {
    /// Reads a Service the way kube-proxy's service change tracker does.
    pub fn from_k8s(svc: &core::Service) -> ServiceRead {
        let meta = &svc.metadata;
        let object = ObjectRef::new(Kind::Service, meta.namespace.as_deref(), meta.name.as_deref());
        let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            return ServiceRead::Invalid(problem(
                &object,
                ProblemReason::Malformed,
                "missing metadata.namespace or metadata.name",
            ));
        };
        if meta.labels.as_ref().is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
            return ServiceRead::Ignored("labelled service.kubernetes.io/service-proxy-name");
        }
        let Some(spec) = svc.spec.as_ref() else {
            return ServiceRead::Invalid(problem(&object, ProblemReason::Malformed, "missing spec"));
        };
        let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
        if type_ == "ExternalName" {
            return ServiceRead::Ignored("type ExternalName");
        }
        let mut problems = Vec::new();

        let raw_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            (_, Some(ip)) => vec![ip.as_str()],
            _ => vec![],
        };
        if raw_ips.iter().any(|ip| ip.is_empty() || *ip == "None") {
            return ServiceRead::Ignored("headless (clusterIP None)");
        }
        if raw_ips.is_empty() {
            return ServiceRead::Invalid(problem(
                &object,
                ProblemReason::InvalidField,
                "no spec.clusterIP allocated",
            ));
        }
        let mut cluster_ips = Vec::new();
        for (i, raw) in raw_ips.iter().enumerate() {
            let Some(ip) = parse_ip_sloppy(raw) else {
                return ServiceRead::Invalid(problem(
                    &object,
                    ProblemReason::InvalidIp,
                    format!("spec.clusterIPs[{i}] {raw:?} is not an IP address"),
                ));
            };
            let declared = spec.ip_families.as_ref().and_then(|f| f.get(i)).map(String::as_str);
            if let Some(declared) = declared {
                match IpFamily::from_k8s(declared) {
                    Some(family) if family == IpFamily::of(&ip) => {}
                    _ => {
                        return ServiceRead::Invalid(problem(
                            &object,
                            ProblemReason::WrongFamily,
                            format!(
                                "spec.clusterIPs[{i}] {raw} does not match spec.ipFamilies[{i}] {declared}"
                            ),
                        ));
                    }
                }
            }
            if cluster_ips.iter().any(|c| IpFamily::of(c) == IpFamily::of(&ip)) {
                return ServiceRead::Invalid(problem(
                    &object,
                    ProblemReason::WrongFamily,
                    format!("spec.clusterIPs has two {} addresses", IpFamily::of(&ip)),
                ));
            }
            cluster_ips.push(ip);
        }

        let node_ports_allowed = matches!(type_, "NodePort" | "LoadBalancer");
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let label = p.name.clone().unwrap_or_else(|| i.to_string());
            let protocol = match Protocol::from_k8s(p.protocol.as_deref()) {
                Ok(proto) => proto,
                Err(e) => {
                    problems.push(problem(
                        &object,
                        ProblemReason::UnknownProtocol,
                        format!("port {label}: {e}"),
                    ));
                    continue;
                }
            };
            let Some(port) = port_from_i32(p.port) else {
                problems.push(problem(
                    &object,
                    ProblemReason::InvalidPort,
                    format!("port {label}: port {} out of range", p.port),
                ));
                continue;
            };
            let node_port = match p.node_port {
                Some(np) if node_ports_allowed => match port_from_i32(np) {
                    Some(np) => Some(np),
                    None => {
                        problems.push(problem(
                            &object,
                            ProblemReason::InvalidPort,
                            format!("port {label}: nodePort {np} out of range"),
                        ));
                        continue;
                    }
                },
                _ => None,
            };
            ports.push(ServicePort { name: p.name.clone().unwrap_or_default(), protocol, port, node_port });
        }

        let external_ips =
            parse_ip_list(&object, "spec.externalIPs", spec.external_ips.iter().flatten(), &mut problems);
        let load_balancer_ips = if type_ == "LoadBalancer" {
            let ingress =
                svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
            let vip = ingress
                .into_iter()
                .flatten()
                .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|ing| ing.ip.as_ref());
            parse_ip_list(&object, "status.loadBalancer.ingress", vip, &mut problems)
        } else {
            Vec::new()
        };

        let mut source_ranges = Vec::new();
        if type_ == "LoadBalancer" {
            let from_spec =
                spec.load_balancer_source_ranges.iter().flatten().map(String::as_str).collect::<Vec<_>>();
            let raw: Vec<&str> = if from_spec.is_empty() {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
                    .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect())
                    .unwrap_or_default()
            } else {
                from_spec
            };
            for r in raw {
                match parse_cidr_sloppy(r) {
                    Some(net) => source_ranges.push(net),
                    None => problems.push(problem(
                        &object,
                        ProblemReason::InvalidIp,
                        format!("loadBalancerSourceRanges: {r:?} is not a CIDR"),
                    )),
                }
            }
        }

        let externally_accessible =
            node_ports_allowed || !external_ips.is_empty() || !load_balancer_ips.is_empty();
        let external_policy_local =
            externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
        let health_check_node_port = if external_policy_local && type_ == "LoadBalancer" {
            spec.health_check_node_port.and_then(port_from_i32)
        } else {
            None
        };
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });

        ServiceRead::Usable(
            Service {
                key: ServiceKey::new(namespace, name),
                cluster_ips,
                ports,
                external_ips,
                load_balancer_ips,
                source_ranges,
                external_policy_local,
                internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                health_check_node_port,
                affinity_timeout,
                node_ports_allowed,
            },
            problems,
        )
    }

    pub fn cluster_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.cluster_ips.iter().copied().find(|ip| IpFamily::of(ip) == family)
    }
}

fn parse_ip_list<'a>(
    object: &ObjectRef,
    field: &str,
    raw: impl Iterator<Item = &'a String>,
    problems: &mut Vec<Problem>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for r in raw {
        match parse_ip_sloppy(r) {
            Some(ip) if !out.contains(&ip) => out.push(ip),
            Some(_) => {}
            None => problems.push(problem(
                object,
                ProblemReason::InvalidIp,
                format!("{field}: {r:?} is not an IP address"),
            )),
        }
    }
    out
}

pub(crate) fn problem(object: &ObjectRef, reason: ProblemReason, detail: impl Into<String>) -> Problem {
    Problem { object: object.clone(), reason, detail: detail.into() }
}
