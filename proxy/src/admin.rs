//! The admin endpoint `ferry status` reads: `GET /status` on `--admin-address` (default
//! `127.0.0.1:10247`, or a unix socket `unix:/run/ferry/admin.sock`), a JSON [`StatusReport`]
//! of what the daemon has programmed and its last syncs. Read-only, and on loopback by default:
//! it tells what Services exist, which any pod can learn from the API anyway, but nothing more.
//!
//! The report is built by the sync loop itself (a request travels to it over a channel), so it
//! is consistent with one moment of the loop, and costs nothing while nobody asks.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::httpd::{self, Handler, ListenAddr};
use crate::plan::{NodeConfig, ServicePortPlan};

/// kube-proxy's ports are 10249 (metrics) and 10256 (healthz); 10247 sits next to them, clear of
/// the kubelet's 10248/10250/10255 and the control plane's 10257/10259.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:10247";
/// How many syncs the report keeps.
pub const SYNC_HISTORY: usize = 16;
/// How long the handler waits for the sync loop (which may be in the middle of a sync).
const LOOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests the sync loop answers.
pub type StatusRequest = oneshot::Sender<StatusReport>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: String,
    pub backend: String,
    pub version: String,
    /// RFC 3339.
    pub started: String,
    pub now: String,
    /// `/livez`: syncs keep up.
    pub healthy: bool,
    /// `/healthz` also needs this: the Node is not going away.
    pub node_eligible: bool,
    /// The last successful sync, RFC 3339.
    pub last_synced: Option<String>,
    pub services: usize,
    pub service_ports: Vec<PortStatus>,
    /// Newest last.
    pub syncs: Vec<SyncRecord>,
    pub health_check_node_ports: Vec<HealthCheckStatus>,
    pub skipped: Vec<SkippedObject>,
    /// What the backend has programmed, read back from the kernel (`Backend::programmed`;
    /// the eBPF maps); absent for backends without such a view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed: Option<String>,
}

/// One programmed service port in one family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatus {
    /// `namespace/name`.
    pub service: String,
    /// The port's name, empty for a single unnamed port.
    pub port: String,
    pub protocol: String,
    pub family: String,
    /// Addresses that reach it, each `ip:port` with its kind when not the ClusterIP:
    /// `*:30080 (NodePort)`, `203.0.113.7:80 (LoadBalancer)`, `198.51.100.2:80 (externalIP)`.
    pub frontends: Vec<String>,
    /// Endpoints for Cluster-policy traffic.
    pub endpoints: usize,
    /// This node's endpoints (Local policies).
    pub local_endpoints: usize,
    pub internal_policy: String,
    pub external_policy: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// When it started, RFC 3339.
    pub time: String,
    /// `full` or `partial`.
    pub kind: String,
    pub ok: bool,
    pub duration_seconds: f64,
    /// Kernel objects written or deleted.
    pub operations: usize,
    /// Service ports whose plan changed.
    pub changed: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckStatus {
    pub service: String,
    pub port: u16,
    pub local_endpoints: usize,
    pub listening: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedObject {
    pub object: String,
    pub reason: String,
    pub detail: String,
}

/// The last syncs, oldest first.
#[derive(Debug, Default)]
pub struct SyncHistory {
    records: VecDeque<SyncRecord>,
}

impl SyncHistory {
    pub fn push(&mut self, r: SyncRecord) {
        if self.records.len() == SYNC_HISTORY {
            self.records.pop_front();
        }
        self.records.push_back(r);
    }

    pub fn records(&self) -> Vec<SyncRecord> {
        self.records.iter().cloned().collect()
    }
}

fn addr(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// A service port as `ferry status` shows it.
pub fn port_status(p: &ServicePortPlan, config: &NodeConfig) -> PortStatus {
    let mut frontends = vec![addr(p.cluster_ip, p.port)];
    if let Some(np) = p.node_port {
        let ips = config.nodeport_ips(p.family);
        if config.nodeport_addresses.is_empty() || ips.is_empty() {
            frontends.push(format!("*:{np} (NodePort)"));
        } else {
            frontends.extend(ips.iter().map(|ip| format!("{} (NodePort)", addr(*ip, np))));
        }
    }
    frontends.extend(p.load_balancer_ips.iter().map(|ip| format!("{} (LoadBalancer)", addr(*ip, p.port))));
    frontends.extend(p.external_ips.iter().map(|ip| format!("{} (externalIP)", addr(*ip, p.port))));
    let policy = |local| if local { "Local" } else { "Cluster" }.to_owned();
    PortStatus {
        service: p.name.service.to_string(),
        port: p.name.port.clone(),
        protocol: p.protocol.as_str().to_ascii_uppercase(),
        family: p.family.to_string(),
        frontends,
        endpoints: p.cluster_endpoints.len(),
        local_endpoints: p.local_endpoints.len(),
        internal_policy: policy(p.internal_policy_local),
        external_policy: policy(p.external_policy_local),
    }
}

/// `/status` (asks the sync loop) and `/healthz` (the admin server itself).
pub fn handler(loop_tx: mpsc::Sender<StatusRequest>) -> Handler {
    std::sync::Arc::new(move |req| {
        let loop_tx = loop_tx.clone();
        Box::pin(async move {
            match req.uri.path() {
                "/status" => {}
                "/healthz" => return httpd::text(StatusCode::OK, "ok"),
                _ => return httpd::not_found(),
            }
            let (tx, rx) = oneshot::channel();
            if loop_tx.send(tx).await.is_err() {
                return httpd::text(StatusCode::SERVICE_UNAVAILABLE, "the sync loop has stopped\n");
            }
            match tokio::time::timeout(LOOP_TIMEOUT, rx).await {
                Ok(Ok(report)) => match serde_json::to_string(&report) {
                    Ok(body) => httpd::json(StatusCode::OK, body),
                    Err(e) => httpd::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                },
                _ => httpd::text(StatusCode::SERVICE_UNAVAILABLE, "the sync loop did not answer in time\n"),
            }
        })
    })
}

/// Parses `--admin-address`: `IP:PORT`, `unix:/PATH`, or `""` (no admin endpoint).
pub fn parse_admin_address(s: &str) -> Result<Option<ListenAddr>, String> {
    if s.is_empty() { Ok(None) } else { s.parse().map(Some) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{IpFamily, Protocol, ServiceKey, ServicePortName};

    fn plan_port() -> ServicePortPlan {
        ServicePortPlan {
            name: ServicePortName {
                service: ServiceKey::new("ns", "web"),
                port: "http".into(),
                protocol: Protocol::Tcp,
            },
            family: IpFamily::V6,
            protocol: Protocol::Tcp,
            cluster_ip: "fd00::10".parse().unwrap(),
            port: 80,
            node_port: Some(30080),
            external_ips: vec!["2001:db8::7".parse().unwrap()],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            internal_policy_local: false,
            external_policy_local: true,
            health_check_node_port: Some(31000),
            affinity_timeout: None,
            cluster_endpoints: vec!["[fd00:1::1]:8080".parse().unwrap(), "[fd00:2::1]:8080".parse().unwrap()],
            local_endpoints: vec!["[fd00:1::1]:8080".parse().unwrap()],
            has_endpoints: true,
            hairpin_ips: vec![],
            serving_endpoints: Vec::new(),
        }
    }

    #[test]
    fn a_port_lists_its_frontends_and_endpoint_counts() {
        let s = port_status(&plan_port(), &NodeConfig::default());
        assert_eq!(s.frontends, ["[fd00::10]:80", "*:30080 (NodePort)", "[2001:db8::7]:80 (externalIP)"]);
        assert_eq!((s.endpoints, s.local_endpoints), (2, 1));
        assert_eq!(
            (s.protocol.as_str(), s.family.as_str(), s.external_policy.as_str()),
            ("TCP", "IPv6", "Local")
        );
        let mut cfg = NodeConfig::for_test("n", &["fd00::1", "10.0.0.1"], &[]);
        cfg.nodeport_addresses = vec!["fd00::/64".parse().unwrap()];
        assert_eq!(port_status(&plan_port(), &cfg).frontends[1], "[fd00::1]:30080 (NodePort)");
    }

    #[test]
    fn the_history_keeps_the_last_syncs() {
        let mut h = SyncHistory::default();
        for i in 0..SYNC_HISTORY + 3 {
            h.push(SyncRecord {
                time: i.to_string(),
                kind: "partial".into(),
                ok: true,
                duration_seconds: 0.0,
                operations: i,
                changed: 0,
                error: None,
            });
        }
        let r = h.records();
        assert_eq!(r.len(), SYNC_HISTORY);
        assert_eq!(r.last().map(|r| r.operations), Some(SYNC_HISTORY + 2));
    }

    #[tokio::test]
    async fn the_handler_asks_the_loop_and_returns_its_json() {
        let (tx, mut rx) = mpsc::channel::<StatusRequest>(1);
        let report = StatusReport {
            node: "n".into(),
            backend: "nftables".into(),
            version: "0".into(),
            started: "t".into(),
            now: "t".into(),
            healthy: true,
            node_eligible: true,
            last_synced: None,
            services: 0,
            service_ports: vec![port_status(&plan_port(), &NodeConfig::default())],
            syncs: vec![],
            health_check_node_ports: vec![],
            skipped: vec![],
            programmed: Some("# SERVICES (0 entries)\n".into()),
        };
        let expected = report.clone();
        tokio::spawn(async move {
            if let Some(reply) = rx.recv().await {
                let _ = reply.send(report);
            }
        });
        let h: Handler = handler(tx);
        let req = hyper::Request::get("/status").body(()).unwrap().into_parts().0;
        let resp = h(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        let got: StatusReport = serde_json::from_slice(&body).unwrap();
        assert_eq!(got, expected);
    }
}
