//! The synthetic services both benchmarks program, described once so that ferry (through
//! manifests) and the kube-proxy-shaped ruleset get exactly the same services.
//!
//! Shape: kube-proxy's BenchmarkSyncProxyRules — ClusterIP services with one TCP port and
//! `endpoints` ready endpoints each, as in `bench/src/lib.rs`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};

/// Namespace of every generated object.
pub const NAMESPACE: &str = "bench";
/// Services per manifest file, so a one-service edit re-parses one small file.
const CHUNK: usize = 1000;
/// ClusterIPs are `10.96.0.10 + index`: inside the sandbox's service CIDR 10.96.0.0/16.
const FIRST_CLUSTER_IP: u32 = u32::from_be_bytes([10, 96, 0, 10]);
/// Most services fit in 10.96.0.0/16 after the first ten addresses.
pub const MAX_SERVICES: usize = 65_000;
/// Synthetic endpoints: `10.128.0.0 + i * endpoints + e` (in 10.128.0.0/9), never an address in
/// the sandbox.
const FIRST_ENDPOINT: u32 = u32::from_be_bytes([10, 128, 0, 0]);
/// Replacement endpoints for one-endpoint changes: `10.127.0.0 + generation`.
const FIRST_REPLACEMENT: u32 = u32::from_be_bytes([10, 127, 0, 0]);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: &'static str,
    pub port: u16,
    pub target: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// The Kubernetes node it runs on (`node` is the node under test).
    pub node: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Endpoint>,
}

pub fn cluster_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(FIRST_CLUSTER_IP + index as u32)
}

/// Service `index` of the synthetic set: port `p` 80 → 8080, `endpoints` endpoints alternating
/// between `node` and `node2`.
pub fn synthetic(index: usize, endpoints: usize) -> Service {
    Service {
        name: format!("svc-{index}"),
        cluster_ip: cluster_ip(index),
        ports: vec![Port { name: "p", port: 80, target: 8080 }],
        endpoints: (0..endpoints)
            .map(|e| Endpoint {
                ip: Ipv4Addr::from(FIRST_ENDPOINT + (index * endpoints + e) as u32),
                node: if e % 2 == 0 { "node" } else { "node2" },
            })
            .collect(),
    }
}

/// Services `0..count` of the synthetic set.
pub fn synthetic_set(count: usize, endpoints: usize) -> Result<Vec<Service>> {
    ensure!(count <= MAX_SERVICES, "at most {MAX_SERVICES} services fit in the service CIDR 10.96.0.0/16");
    Ok((0..count).map(|i| synthetic(i, endpoints)).collect())
}

/// `service` with its last endpoint replaced by a new address: a one-endpoint change.
pub fn with_one_endpoint_replaced(service: &Service, generation: u32) -> Service {
    let mut changed = service.clone();
    if let Some(last) = changed.endpoints.last_mut() {
        last.ip = Ipv4Addr::from(FIRST_REPLACEMENT + generation);
    }
    changed
}

/// Writes `services` as manifest files (`svc-NNNN.yaml`, [`CHUNK`] services each) into `dir`.
pub fn write_manifests(dir: &Path, services: &[Service]) -> Result<()> {
    for (chunk, group) in services.chunks(CHUNK).enumerate() {
        write_atomically(&chunk_file(dir, chunk), &yaml(group))?;
    }
    Ok(())
}

/// Rewrites the manifest file holding service `index` (after a change to it).
pub fn rewrite_manifest_of(dir: &Path, services: &[Service], index: usize) -> Result<()> {
    let chunk = index / CHUNK;
    let group = services.chunks(CHUNK).nth(chunk).context("no such service")?;
    write_atomically(&chunk_file(dir, chunk), &yaml(group))
}

fn chunk_file(dir: &Path, chunk: usize) -> PathBuf {
    dir.join(format!("svc-{chunk:04}.yaml"))
}

/// Written under another name and renamed, so ferry never reads half a file.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Services and EndpointSlices as `kubectl get -o yaml` would accept them (flow style, small).
pub fn yaml(services: &[Service]) -> String {
    let mut out = String::with_capacity(services.len() * 600);
    for s in services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| {
                format!("{{name: {}, port: {}, targetPort: {}, protocol: TCP}}", p.name, p.port, p.target)
            })
            .collect();
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
             spec: {{type: ClusterIP, clusterIP: {ip}, ports: [{ports}]}}\n",
            name = s.name,
            ip = s.cluster_ip,
            ports = ports.join(", "),
        );
        let slice_ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{{name: {}, port: {}, protocol: TCP}}", p.name, p.target))
            .collect();
        let endpoints: Vec<String> =
            s.endpoints.iter().map(|e| format!("{{addresses: [{}], nodeName: {}}}", e.ip, e.node)).collect();
        let _ = write!(
            out,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-x, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{ports}]\nendpoints: [{endpoints}]\n",
            name = s.name,
            ports = slice_ports.join(", "),
            endpoints = endpoints.join(", "),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_services_should_not_collide_with_the_sandbox() {
        let s = synthetic(0, 10);
        assert_eq!(s.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(s.endpoints[9].ip, Ipv4Addr::new(10, 128, 0, 9));
        let last = synthetic(MAX_SERVICES - 1, 10);
        assert!(last.cluster_ip < Ipv4Addr::new(10, 97, 0, 0));
        assert!(last.endpoints[9].ip < Ipv4Addr::new(10, 255, 255, 255), "inside 10.128.0.0/9");
    }

    #[test]
    fn a_one_endpoint_change_should_replace_exactly_one_address() {
        let s = synthetic(3, 10);
        let changed = with_one_endpoint_replaced(&s, 1);
        let same = s.endpoints.iter().zip(&changed.endpoints).filter(|(a, b)| a == b).count();
        assert_eq!(same, 9);
    }

    #[test]
    fn yaml_should_hold_a_service_and_a_slice_per_service() {
        let text = yaml(&[synthetic(0, 2), synthetic(1, 2)]);
        assert_eq!(text.matches("kind: Service\n").count(), 2);
        assert_eq!(text.matches("kind: EndpointSlice").count(), 2);
        assert!(text.contains("endpoints: [{addresses: [10.128.0.2], nodeName: node}"), "{text}");
    }
}
