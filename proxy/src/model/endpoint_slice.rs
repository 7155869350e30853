//! EndpointSlice: the endpoints of one Service, in one address family.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1 as discovery;

use super::service::problem;
use super::{
    IpFamily, Kind, ObjectRef, Problem, ProblemReason, Protocol, ServiceKey, parse_ip_sloppy, port_from_i32,
};

/// Label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub object: ObjectRef,
    pub service: ServiceKey,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The first address of the endpoint; like kube-proxy, ferry ignores the others.
    pub ip: IpAddr,
    pub node_name: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// Outcome of reading one EndpointSlice.
#[derive(Debug)]
pub enum SliceRead {
    Usable(EndpointSlice, Vec<Problem>),
    /// Not for ferry (FQDN address type, no owning service label); not an error.
    Ignored(&'static str),
    Invalid(Problem),
}

impl EndpointSlice {
    pub fn from_k8s(slice: &discovery::EndpointSlice) -> SliceRead {
        let meta = &slice.metadata;
        let object = ObjectRef::new(Kind::EndpointSlice, meta.namespace.as_deref(), meta.name.as_deref());
        let (Some(namespace), Some(_)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            return SliceRead::Invalid(problem(
                &object,
                ProblemReason::Malformed,
                "missing metadata.namespace or metadata.name",
            ));
        };
        let Some(service) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            return SliceRead::Ignored("no kubernetes.io/service-name label");
        };
        let family = match slice.address_type.as_str() {
            "FQDN" => return SliceRead::Ignored("addressType FQDN"),
            t => match IpFamily::from_k8s(t) {
                Some(f) => f,
                None => {
                    return SliceRead::Invalid(problem(
                        &object,
                        ProblemReason::InvalidField,
                        format!("unknown addressType {t:?}"),
                    ));
                }
            },
        };
        let mut problems = Vec::new();
        let mut ports = Vec::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
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
            // A slice port without a number means "all ports" for selector-less Services; kube-proxy
            // cannot use it and neither can ferry.
            let Some(port) = p.port.and_then(port_from_i32) else {
                problems.push(problem(
                    &object,
                    ProblemReason::InvalidPort,
                    format!("port {label}: missing or out-of-range port {:?}", p.port),
                ));
                continue;
            };
            ports.push(SlicePort { name: p.name.clone().unwrap_or_default(), protocol, port });
        }
        let mut endpoints = Vec::new();
        for (i, ep) in slice.endpoints.iter().enumerate() {
            let Some(raw) = ep.addresses.first() else {
                continue;
            };
            let Some(ip) = parse_ip_sloppy(raw) else {
                problems.push(problem(
                    &object,
                    ProblemReason::InvalidIp,
                    format!("endpoints[{i}]: {raw:?} is not an IP address"),
                ));
                continue;
            };
            if IpFamily::of(&ip) != family {
                problems.push(problem(
                    &object,
                    ProblemReason::WrongFamily,
                    format!("endpoints[{i}]: {ip} in a slice of addressType {family}"),
                ));
                continue;
            }
            let cond = ep.conditions.as_ref();
            // Unset conditions mean "unknown", which the API defines as ready for `ready` and as
            // equal to `ready` for `serving`.
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let hints = ep.hints.as_ref();
            endpoints.push(Endpoint {
                ip,
                node_name: ep.node_name.clone(),
                ready,
                serving,
                terminating,
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
            });
        }
        SliceRead::Usable(
            EndpointSlice {
                object,
                service: ServiceKey::new(namespace, service.as_str()),
                family,
                ports,
                endpoints,
            },
            problems,
        )
    }
}
