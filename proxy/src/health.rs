//! Health, with kube-proxy's meaning.
//!
//! - [`ProxyHealth`]: is ferry keeping up? Healthy while no change has waited longer than the
//!   health timeout (2 × `--sync-period`, as kube-proxy) for a successful sync. Startup counts as
//!   a queued change, so a ferry that never manages its first sync turns unhealthy too. A failed
//!   sync keeps the change queued.
//! - `/livez` reports exactly that; `/healthz` also requires the Node to be eligible: not being
//!   deleted and without the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint, so
//!   load balancers drain a node before it goes.
//! - `/readyz` (ferry's own): `/healthz` once the first sync has succeeded. kube-proxy's
//!   `/healthz` is healthy while starting, which makes it useless to gate a rolling update;
//!   the DaemonSet's readiness probe uses this one.
//! - [`ServiceHealthServers`]: for every service with `externalTrafficPolicy: Local` and a
//!   `healthCheckNodePort`, an HTTP server on that port answering 200 when this node has ready
//!   local endpoints (and `/healthz` would be 200), 503 otherwise, with kube-proxy's JSON body and
//!   `X-Load-Balancing-Endpoint-Weight` header. The servers follow the plan after every sync.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use hyper::StatusCode;
use hyper::header::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tracing::{info, warn};

use crate::httpd::{self, Handler, Listener, Server};
use crate::model::{IpFamily, NodeInfo, ServiceKey};
use crate::plan::ServicePortPlan;
use crate::store::Store;

/// The header load balancers read to weigh this node (kube-proxy's name).
pub const WEIGHT_HEADER: &str = "x-load-balancing-endpoint-weight";

/// Whether ferry keeps the node programmed; shared by the sync loop and the HTTP servers.
#[derive(Debug)]
pub struct ProxyHealth {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    timeout: Duration,
    started: SystemTime,
    last_updated: Option<SystemTime>,
    /// When the oldest change still waiting for a successful sync was queued.
    oldest_queued: Option<Instant>,
    node_eligible: bool,
}

impl State {
    fn synced(&self) -> bool {
        self.last_updated.is_some()
    }
}

/// One reading of [`ProxyHealth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthReport {
    /// No change has waited longer than the timeout (what `/livez` reports).
    pub healthy: bool,
    /// The Node is not going away.
    pub node_eligible: bool,
    /// The last successful sync (ferry's start before the first).
    pub last_updated: SystemTime,
    pub current_time: SystemTime,
    /// A sync has succeeded since the start.
    pub synced: bool,
}

impl HealthReport {
    /// What `/healthz` (and a healthCheckNodePort's `serviceProxyHealthy`) reports.
    pub fn healthz(&self) -> bool {
        self.healthy && self.node_eligible
    }

    /// What `/readyz` reports.
    pub fn readyz(&self) -> bool {
        self.synced && self.healthz()
    }
}

impl ProxyHealth {
    /// A health that expects its first sync within `timeout` of `now`.
    pub fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            state: Mutex::new(State {
                timeout,
                started: SystemTime::now(),
                last_updated: None,
                oldest_queued: Some(now),
                node_eligible: true,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change is waiting to be programmed (kube-proxy's `QueuedUpdate`); the first one since
    /// the last successful sync starts the clock.
    pub fn queued_update(&self, now: Instant) {
        self.lock().oldest_queued.get_or_insert(now);
    }

    /// Everything queued so far is programmed (kube-proxy's `Updated`).
    pub fn updated(&self, wall: SystemTime) {
        let mut s = self.lock();
        s.oldest_queued = None;
        s.last_updated = Some(wall);
    }

    pub fn set_timeout(&self, timeout: Duration) {
        self.lock().timeout = timeout;
    }

    /// Follows the Node: being deleted or tainted for deletion makes it ineligible.
    pub fn set_node(&self, node: Option<&NodeInfo>) {
        let eligible = node.is_none_or(|n| !n.deleting && !n.to_be_deleted_taint);
        let mut s = self.lock();
        if s.node_eligible != eligible {
            info!(eligible, "node eligibility for load-balancer traffic changed");
        }
        s.node_eligible = eligible;
    }

    pub fn report(&self, now: Instant, wall: SystemTime) -> HealthReport {
        let s = self.lock();
        let healthy = s.oldest_queued.is_none_or(|t| now.saturating_duration_since(t) < s.timeout);
        HealthReport {
            healthy,
            node_eligible: s.node_eligible,
            last_updated: s.last_updated.unwrap_or(s.started),
            current_time: wall,
            synced: s.synced(),
        }
    }

    pub fn report_now(&self) -> HealthReport {
        self.report(Instant::now(), SystemTime::now())
    }
}

/// RFC 3339 in UTC with the fraction it needs, e.g. `2025-01-02T03:04:05.123456789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_else(|_| "invalid time".into())
}

type CodeLabel = [(&'static str, &'static str); 1];

/// `kubeproxy_proxy_healthz_total{code}` and `kubeproxy_proxy_livez_total{code}`.
#[derive(Debug, Clone, Default)]
pub struct HealthMetrics {
    healthz: Family<CodeLabel, Counter>,
    livez: Family<CodeLabel, Counter>,
}

impl HealthMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        registry.register("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", m.livez.clone());
        m
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthzBody {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
}

/// `/healthz`, `/livez` and `/readyz` (for `--healthz-bind-address`).
pub fn handler(health: Arc<ProxyHealth>, metrics: HealthMetrics) -> Handler {
    httpd::handler(move |req| {
        let report = health.report_now();
        let (ok, node_eligible, counter) = match req.uri.path() {
            "/healthz" => (report.healthz(), Some(report.node_eligible), Some(&metrics.healthz)),
            "/livez" => (report.healthy, None, Some(&metrics.livez)),
            "/readyz" => (report.readyz(), Some(report.node_eligible), None),
            _ => return httpd::not_found(),
        };
        let (status, code) =
            if ok { (StatusCode::OK, "200") } else { (StatusCode::SERVICE_UNAVAILABLE, "503") };
        if let Some(counter) = counter {
            counter.get_or_create(&[("code", code)]).inc();
        }
        // As kube-proxy: while healthy, lastUpdated is "now" (older clients read a recent
        // lastUpdated as healthy); otherwise the last successful sync.
        let last_updated = if ok { report.current_time } else { report.last_updated };
        let body = HealthzBody {
            last_updated: rfc3339(last_updated),
            current_time: rfc3339(report.current_time),
            node_eligible,
        };
        httpd::json(status, serde_json::to_string(&body).unwrap_or_default())
    })
}

/// What one healthCheckNodePort server reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

/// The healthCheckNodePort servers the plan asks for, with their local endpoint counts. Ports
/// claimed by two services (the API server prevents it) go to the first in plan order.
pub fn wanted_service_health<'a>(
    ports: impl Iterator<Item = &'a ServicePortPlan>,
    store: &Store,
    node_name: &str,
) -> Vec<ServiceHealth> {
    let mut by_port: BTreeMap<u16, ServiceHealth> = BTreeMap::new();
    let mut seen: BTreeSet<&ServiceKey> = BTreeSet::new();
    for p in ports {
        let Some(port) = p.health_check_node_port.filter(|_| p.external_policy_local) else { continue };
        let key = &p.name.service;
        if !seen.insert(key) {
            continue;
        }
        if let Some(other) = by_port.get(&port) {
            warn!(
                service = %key,
                port,
                "healthCheckNodePort already used by {}/{}; not serving it twice",
                other.namespace,
                other.name
            );
            continue;
        }
        by_port.insert(
            port,
            ServiceHealth {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                port,
                local_endpoints: local_ready_endpoints(store, key, node_name),
            },
        );
    }
    by_port.into_values().collect()
}

/// Ready endpoints of `key` on node `node_name`, as kube-proxy counts them for health checks:
/// serving-but-terminating endpoints do not count (a load balancer should drain the node
/// while they finish), each address once across ports, the larger family for dual-stack.
pub fn local_ready_endpoints(store: &Store, key: &ServiceKey, node_name: &str) -> usize {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for slice in store.slices_of(key) {
        for ep in &slice.endpoints {
            if ep.ready && ep.node_name.as_deref() == Some(node_name) {
                match IpFamily::of(&ep.ip) {
                    IpFamily::V4 => v4.insert(ep.ip),
                    IpFamily::V6 => v6.insert(ep.ip),
                };
            }
        }
    }
    v4.len().max(v6.len())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceHealthBody<'a> {
    service: ServiceRef<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

type Counts = Arc<RwLock<BTreeMap<u16, ServiceHealth>>>;

/// The healthCheckNodePort servers of this node.
#[derive(Debug)]
pub struct ServiceHealthServers {
    health: Arc<ProxyHealth>,
    /// Addresses to listen on; `None`: every address (`[::]`, dual-stack).
    addresses: Option<Vec<IpAddr>>,
    counts: Counts,
    servers: BTreeMap<u16, Vec<Server>>,
}

impl ServiceHealthServers {
    pub fn new(health: Arc<ProxyHealth>, addresses: Option<Vec<IpAddr>>) -> Self {
        Self { health, addresses, counts: Counts::default(), servers: BTreeMap::new() }
    }

    /// Listens on other addresses from now on (after a configuration reload); every server is
    /// re-bound at the next [`sync`](Self::sync).
    pub fn set_addresses(&mut self, addresses: Option<Vec<IpAddr>>) {
        if self.addresses != addresses {
            self.addresses = addresses;
            self.servers.clear();
        }
    }

    /// Starts servers for new ports, stops those no longer wanted, updates the counts. A port
    /// that cannot be bound is logged and retried at the next sync. Needs a Tokio runtime.
    pub fn sync(&mut self, wanted: Vec<ServiceHealth>) {
        let wanted: BTreeMap<u16, ServiceHealth> = wanted.into_iter().map(|s| (s.port, s)).collect();
        self.servers.retain(|port, _| {
            let keep = wanted.contains_key(port);
            if !keep {
                info!(port, "healthCheckNodePort server stopped");
            }
            keep
        });
        *self.counts.write().unwrap_or_else(PoisonError::into_inner) = wanted.clone();
        for (port, svc) in &wanted {
            if self.servers.contains_key(port) {
                continue;
            }
            match self.bind(*port) {
                Ok(servers) => {
                    info!(port, service = %format!("{}/{}", svc.namespace, svc.name), "healthCheckNodePort server started");
                    self.servers.insert(*port, servers);
                }
                Err(e) => warn!(
                    service = %format!("{}/{}", svc.namespace, svc.name),
                    "healthCheckNodePort server: {e}; retrying at the next sync"
                ),
            }
        }
    }

    fn bind(&self, port: u16) -> Result<Vec<Server>, httpd::HttpError> {
        let listeners = match &self.addresses {
            None => vec![Listener::bind_any(port)?],
            Some(ips) => ips
                .iter()
                .map(|ip| Listener::bind_ip(SocketAddr::new(*ip, port)))
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(listeners
            .into_iter()
            .map(|l| Server::serve(l, "healthCheckNodePort", self.port_handler(port)))
            .collect())
    }

    fn port_handler(&self, port: u16) -> Handler {
        let counts = Arc::clone(&self.counts);
        let health = Arc::clone(&self.health);
        httpd::handler(move |_| {
            let Some(svc) = counts.read().unwrap_or_else(PoisonError::into_inner).get(&port).cloned() else {
                return httpd::text(StatusCode::SERVICE_UNAVAILABLE, "no service on this port\n");
            };
            service_health_response(&svc, health.report_now().healthz())
        })
    }

    /// The servers wanted by the last sync, and whether each is listening.
    pub fn status(&self) -> Vec<(ServiceHealth, bool)> {
        let counts = self.counts.read().unwrap_or_else(PoisonError::into_inner);
        counts
            .values()
            .map(|s| (s.clone(), self.servers.get(&s.port).is_some_and(|v| !v.is_empty())))
            .collect()
    }
}

/// kube-proxy's answer: 200 when there are local endpoints and the proxy is healthy, else 503;
/// the endpoint count in the weight header either way.
pub fn service_health_response(svc: &ServiceHealth, proxy_healthy: bool) -> httpd::Response {
    let status = if svc.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = ServiceHealthBody {
        service: ServiceRef { namespace: &svc.namespace, name: &svc.name },
        local_endpoints: svc.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    let mut r = httpd::json(status, serde_json::to_string(&body).unwrap_or_default());
    r.headers_mut().insert(WEIGHT_HEADER, HeaderValue::from(svc.local_endpoints));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(deleting: bool, taint: bool) -> NodeInfo {
        NodeInfo { name: "n".into(), deleting, to_be_deleted_taint: taint, ..NodeInfo::default() }
    }

    #[test]
    fn health_is_good_at_start_and_bad_when_the_first_sync_never_comes() {
        let t0 = Instant::now();
        let h = ProxyHealth::new(Duration::from_secs(60), t0);
        let r = h.report(t0 + Duration::from_secs(59), SystemTime::now());
        assert!(r.healthy && r.healthz());
        assert!(!r.readyz(), "not ready before the first sync");
        assert!(!h.report(t0 + Duration::from_secs(60), SystemTime::now()).healthy);
        h.updated(SystemTime::now());
        assert!(h.report(t0 + Duration::from_secs(60), SystemTime::now()).readyz());
    }

    #[test]
    fn a_sync_clears_queued_changes_and_a_new_change_restarts_the_clock() {
        let t0 = Instant::now();
        let h = ProxyHealth::new(Duration::from_secs(60), t0);
        h.updated(SystemTime::now());
        let later = t0 + Duration::from_secs(600);
        assert!(h.report(later, SystemTime::now()).healthy, "nothing pending: healthy however long");
        h.queued_update(later);
        h.queued_update(later + Duration::from_secs(30)); // not the oldest: ignored
        assert!(h.report(later + Duration::from_secs(59), SystemTime::now()).healthy);
        assert!(!h.report(later + Duration::from_secs(61), SystemTime::now()).healthy);
        h.updated(SystemTime::now());
        assert!(h.report(later + Duration::from_secs(61), SystemTime::now()).healthy);
    }

    #[test]
    fn a_node_being_deleted_or_tainted_is_not_eligible_but_stays_live() {
        let t0 = Instant::now();
        let h = ProxyHealth::new(Duration::from_secs(60), t0);
        for (n, eligible) in
            [(node(false, false), true), (node(true, false), false), (node(false, true), false)]
        {
            h.set_node(Some(&n));
            let r = h.report(t0, SystemTime::now());
            assert_eq!((r.healthy, r.node_eligible, r.healthz()), (true, eligible, eligible), "{n:?}");
        }
        h.set_node(None);
        assert!(h.report(t0, SystemTime::now()).node_eligible);
    }

    #[test]
    fn rfc3339_prints_utc_with_fraction() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.25Z");
    }

    #[test]
    fn service_health_answers_like_kube_proxy() {
        let svc =
            ServiceHealth { namespace: "ns".into(), name: "lb".into(), port: 30000, local_endpoints: 2 };
        let r = service_health_response(&svc, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[WEIGHT_HEADER], "2");
        let r = service_health_response(&svc, false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "proxy unhealthy");
        let none = ServiceHealth { local_endpoints: 0, ..svc };
        let r = service_health_response(&none, true);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[WEIGHT_HEADER], "0");
    }
}
