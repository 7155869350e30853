//! The daemon end to end in-process, without root: the real sync loop, manifest source, health,
//! metrics and admin servers, with an in-memory backend that can be told to fail. Every server
//! listens on 127.0.0.1 (ephemeral ports, healthCheckNodePorts included through
//! `--nodeport-addresses 127.0.0.1/32`); nothing touches the kernel's packet path.
//!
//! The kernel-backed counterpart, `ferry run` in a sandboxed node, is
//! `tests/tests/ops_e2e.rs`.

#![expect(clippy::unwrap_used, reason = "test helpers panic with the failure, like the tests")]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use proxy::admin::StatusReport;
use proxy::backend::{Backend, BackendError, BackendKind, BackendOptions, SyncReport};
use proxy::daemon::{self, Settings, Source};
use proxy::health::WEIGHT_HEADER;
use proxy::httpd::{self, ListenAddr};
use proxy::metrics::sample;
use proxy::plan::{NodeConfig, Plan, PlanDiff};

const WAIT: Duration = Duration::from_secs(15);
const NODE: &str = "node-a";

/// Counts syncs; fails while `fail` is set.
struct FakeBackend {
    fail: Arc<AtomicBool>,
    syncs: Arc<AtomicUsize>,
}

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn render(&self, _plan: &Plan, _config: &NodeConfig) -> String {
        String::new()
    }

    fn sync(
        &mut self,
        plan: &Plan,
        diff: Option<&PlanDiff>,
        _: &NodeConfig,
    ) -> Result<SyncReport, BackendError> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable(BackendKind::Ipvs));
        }
        Ok(SyncReport {
            full: diff.is_none(),
            operations: diff.map_or(plan.ports.len(), PlanDiff::len),
            duration: Duration::ZERO,
        })
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tcp(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn node_yaml(deleting: bool) -> String {
    let deletion =
        if deleting { "  deletionTimestamp: \"2025-01-01T00:00:00Z\"\n  finalizers: [x]\n" } else { "" };
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n{deletion}")
}

/// A LoadBalancer service with externalTrafficPolicy Local and one endpoint on `endpoint_node`.
fn service_yaml(hc_port: u16, endpoint_node: &str, ready: bool) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: shop}}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]\n  externalTrafficPolicy: Local\n  \
         healthCheckNodePort: {hc_port}\n  ports: [{{name: http, port: 80, protocol: TCP, nodePort: 30080}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: lb-1\n  namespace: shop\n  \
         labels: {{kubernetes.io/service-name: lb}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\n\
         endpoints:\n- addresses: [10.244.1.5]\n  nodeName: {endpoint_node}\n  conditions: {{ready: {ready}, serving: true}}\n"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

struct Harness {
    dir: tempfile::TempDir,
    healthz: ListenAddr,
    metrics: ListenAddr,
    admin: ListenAddr,
    hc_port: u16,
    fail: Arc<AtomicBool>,
    daemon: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    async fn start(sync_period: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hc_port = free_port();
        write(dir.path(), "node.yaml", &node_yaml(false));
        write(dir.path(), "lb.yaml", &service_yaml(hc_port, NODE, true));
        let (healthz, metrics, admin) = (free_port(), free_port(), free_port());
        let mut node = NodeConfig::for_test(NODE, &["127.0.0.1"], &["10.244.0.0/16"]);
        node.nodeport_addresses = vec!["127.0.0.1/32".parse().unwrap()];
        let settings = Settings {
            backend: BackendKind::Nftables,
            backend_options: BackendOptions::default(),
            source: Source::Manifests(dir.path().to_owned()),
            node,
            sync_period,
            min_sync_period: Duration::from_millis(50),
            sync_burst: 2,
            healthz_bind_address: Some(tcp(healthz)),
            metrics_bind_address: Some(tcp(metrics)),
            admin_address: Some(ListenAddr::Tcp(tcp(admin))),
            bind_address_hard_fail: true,
            config_file: None,
        };
        let fail = Arc::new(AtomicBool::new(false));
        let backend = FakeBackend { fail: Arc::clone(&fail), syncs: Arc::default() };
        let daemon = tokio::spawn(daemon::run_with_backend(settings, Box::new(backend), None));
        let h = Self {
            dir,
            healthz: ListenAddr::Tcp(tcp(healthz)),
            metrics: ListenAddr::Tcp(tcp(metrics)),
            admin: ListenAddr::Tcp(tcp(admin)),
            hc_port,
            fail,
            daemon,
        };
        h.wait_for("the first sync", |s| s.syncs.iter().any(|r| r.ok)).await;
        h
    }

    async fn status(&self) -> StatusReport {
        let (code, body) = httpd::get(&self.admin, "/status", WAIT).await.unwrap();
        assert_eq!(code, StatusCode::OK, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&StatusReport) -> bool) -> StatusReport {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(!self.daemon.is_finished(), "the daemon stopped while waiting for {what}");
            if let Ok((StatusCode::OK, body)) = httpd::get(&self.admin, "/status", WAIT).await {
                let s: StatusReport = serde_json::from_str(&body).unwrap();
                if cond(&s) {
                    return s;
                }
                assert!(Instant::now() < deadline, "no {what} within {WAIT:?}; last status: {s:#?}");
            }
            assert!(Instant::now() < deadline, "no {what} within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET on the healthCheckNodePort: status, weight header, JSON body.
    async fn health_check(&self) -> (StatusCode, String, serde_json::Value) {
        let r = httpd::get_response(&ListenAddr::Tcp(tcp(self.hc_port)), "/", WAIT).await.unwrap();
        let weight =
            r.headers().get(WEIGHT_HEADER).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        (r.status(), weight, serde_json::from_str(r.body()).unwrap())
    }

    async fn wait_health_check(&self, status: StatusCode) -> (String, serde_json::Value) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (code, weight, body) = self.health_check().await;
            if code == status {
                return (weight, body);
            }
            assert!(Instant::now() < deadline, "healthCheckNodePort still answers {code} {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn get(&self, addr: &ListenAddr, path: &str) -> (StatusCode, String) {
        httpd::get(addr, path, WAIT).await.unwrap()
    }

    async fn metrics(&self) -> String {
        let (code, body) = self.get(&self.metrics, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        body
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.daemon.abort();
    }
}

fn metric(text: &str, name: &str) -> f64 {
    sample(text, name).unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_node_port_follows_local_endpoints_and_goes_away_with_the_service() {
    let h = Harness::start(Duration::from_secs(30)).await;
    let (weight, body) = h.wait_health_check(StatusCode::OK).await;
    assert_eq!(weight, "1");
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "shop", "name": "lb"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );

    // The endpoint moves to another node: no local endpoint, 503.
    write(h.dir.path(), "lb.yaml", &service_yaml(h.hc_port, "node-b", true));
    let (weight, body) = h.wait_health_check(StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!((weight.as_str(), &body["localEndpoints"]), ("0", &serde_json::json!(0)));
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"}"),
        1.0
    );

    // Back on this node but not ready (terminating): kube-proxy counts ready endpoints only.
    write(h.dir.path(), "lb.yaml", &service_yaml(h.hc_port, NODE, false));
    h.wait_for("the not-ready endpoint", |s| {
        s.health_check_node_ports.first().is_some_and(|p| p.local_endpoints == 0)
            && s.service_ports.first().is_some_and(|p| p.endpoints == 1)
    })
    .await;
    assert_eq!(h.health_check().await.0, StatusCode::SERVICE_UNAVAILABLE);

    write(h.dir.path(), "lb.yaml", &service_yaml(h.hc_port, NODE, true));
    h.wait_health_check(StatusCode::OK).await;

    // The service goes: so does its server.
    std::fs::remove_file(h.dir.path().join("lb.yaml")).unwrap();
    h.wait_for("the service's removal", |s| s.service_ports.is_empty()).await;
    let gone = httpd::get(&ListenAddr::Tcp(tcp(h.hc_port)), "/", WAIT).await;
    assert!(matches!(gone, Err(httpd::HttpError::Connect { .. })), "{gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_status_and_healthz_report_syncs() {
    let h = Harness::start(Duration::from_secs(30)).await;
    let (code, body) = h.get(&h.healthz, "/healthz").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["nodeEligible"], true);
    assert!(v["lastUpdated"].as_str().is_some_and(|s| s.ends_with('Z')), "{body}");
    assert!(v["currentTime"].is_string());
    let (code, body) = h.get(&h.healthz, "/livez").await;
    assert_eq!(code, StatusCode::OK);
    assert!(!body.contains("nodeEligible"), "{body}");
    assert_eq!(h.get(&h.healthz, "/readyz").await.0, StatusCode::OK, "ready after the first sync");

    // A change: a partial sync, and network programming latency observed.
    write(h.dir.path(), "lb.yaml", &service_yaml(h.hc_port, "node-b", true));
    let s =
        h.wait_for("a partial sync", |s| s.syncs.iter().any(|r| r.kind == "partial" && r.changed > 0)).await;
    assert_eq!((s.node.as_str(), s.backend.as_str(), s.services), (NODE, "fake", 1));
    let port = &s.service_ports[0];
    assert_eq!(port.service, "shop/lb");
    assert_eq!(port.frontends, ["10.96.0.10:80", "127.0.0.1:30080 (NodePort)"]);

    let m = h.metrics().await;
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_proxy_healthz_total{code=\"200\"}",
        "kubeproxy_proxy_livez_total{code=\"200\"}",
    ] {
        assert!(metric(&m, name) >= 1.0, "{name} should count something:\n{m}");
    }
    assert!(metric(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.6e9);
    assert!(metric(&m, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 1.6e9);
    assert_eq!(metric(&m, "kubeproxy_sync_proxy_rules_service_changes_pending"), 0.0);
    assert_eq!(metric(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"), 0.0);
    assert_eq!(metric(&m, "ferry_services"), 1.0);
    assert_eq!(metric(&m, "ferry_service_ports"), 1.0);
    assert_eq!(metric(&m, "ferry_sync_failures_total"), 0.0);

    // A skipped object shows up by reason, in metrics and status.
    write(
        h.dir.path(),
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec:\n  clusterIP: 10.96.0.300\n  \
         ports: [{port: 80}]\n",
    );
    let s = h.wait_for("the skipped service", |s| !s.skipped.is_empty()).await;
    assert_eq!(s.skipped[0].object, "Service shop/bad", "{s:#?}");
    let m = h.metrics().await;
    assert!(m.lines().any(|l| l.starts_with("ferry_skipped_objects_total{reason=")), "{m}");

    let (code, mode) = h.get(&h.metrics, "/proxyMode").await;
    assert_eq!((code, mode.as_str()), (StatusCode::OK, "fake"));
    let (_, configz) = h.get(&h.metrics, "/configz").await;
    let c: serde_json::Value = serde_json::from_str(&configz).unwrap();
    assert_eq!(c["min_sync_period"], "50ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_syncs_back_off_turn_health_unhealthy_and_recover_with_a_full_sync() {
    // Health timeout = 2 x sync period = 2s.
    let h = Harness::start(Duration::from_secs(1)).await;
    h.fail.store(true, Ordering::SeqCst);
    write(h.dir.path(), "lb.yaml", &service_yaml(h.hc_port, "node-b", true));
    let s = h.wait_for("a failed sync", |s| s.syncs.iter().any(|r| !r.ok)).await;
    let failed = s.syncs.iter().find(|r| !r.ok).unwrap();
    assert!(failed.error.as_deref().is_some_and(|e| e.contains("not available")), "{failed:?}");

    let deadline = Instant::now() + WAIT;
    loop {
        let (code, _) = h.get(&h.healthz, "/livez").await;
        if code == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(Instant::now() < deadline, "/livez stayed {code} while syncs failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.get(&h.healthz, "/healthz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.get(&h.healthz, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (_, _, body) = h.health_check().await;
    assert_eq!(body["serviceProxyHealthy"], false);
    let m = h.metrics().await;
    assert!(metric(&m, "ferry_sync_failures_total") >= 1.0);
    assert!(metric(&m, "kubeproxy_proxy_livez_total{code=\"503\"}") >= 1.0);
    assert_eq!(
        metric(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        1.0,
        "the change still waits"
    );

    h.fail.store(false, Ordering::SeqCst);
    let s = h.wait_for("recovery", |s| s.syncs.last().is_some_and(|r| r.ok)).await;
    let last_failure = s.syncs.iter().rposition(|r| !r.ok).unwrap();
    assert_eq!(s.syncs[last_failure + 1].kind, "full", "the retry after a failure is a full sync");
    assert!(s.healthy);
    assert_eq!(h.get(&h.healthz, "/healthz").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_being_deleted_fails_healthz_but_not_livez() {
    let h = Harness::start(Duration::from_secs(30)).await;
    h.wait_health_check(StatusCode::OK).await;
    write(h.dir.path(), "node.yaml", &node_yaml(true));
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = h.get(&h.healthz, "/healthz").await;
        if code == StatusCode::SERVICE_UNAVAILABLE {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["nodeEligible"], false);
            break;
        }
        assert!(Instant::now() < deadline, "/healthz stayed {code}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.get(&h.healthz, "/livez").await.0, StatusCode::OK);
    let (_weight, body) = h.wait_health_check(StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        (body["localEndpoints"].as_u64(), body["serviceProxyHealthy"].as_bool()),
        (Some(1), Some(false))
    );
    assert!(!h.status().await.node_eligible);
}
