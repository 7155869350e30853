//! End-to-end suite of operating ferry: the real `ferry run --manifests` in a sandboxed node
//! namespace (the fixture of `common/`), asked over HTTP from inside the sandbox the way the
//! kubelet (probes), a cloud load balancer (healthCheckNodePort) and Prometheus would:
//!
//! - `/healthz`, `/livez` and `/readyz` on the default `--healthz-bind-address` (0.0.0.0:10256);
//! - a healthCheckNodePort, probed from the external client on both node addresses, answering
//!   200 while the node has a local endpoint and 503 when it has none, and going away with its
//!   service;
//! - `/metrics` on the default 127.0.0.1:10249, every line parsed, the sync metrics present;
//! - `ferry status` (text and `-o json`) against the default admin address;
//! - SIGHUP forcing a full resync; `--config` with a KubeProxyConfiguration moving the servers.
//!
//! Every port is bound inside the sandbox's namespaces; nothing touches the root namespace.
//! Runs as root (`cargo xtask test -p ferry-sandbox -- ops`).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Backend, Family, Fixture, SyncKind};
use ferry_sandbox::{Netns, Signal};

const BACKEND: Backend = Backend::Nftables;
/// The healthCheckNodePort of the test's LoadBalancer service.
const HC_PORT: u16 = 32100;
const WAIT: Duration = Duration::from_secs(10);

/// An HTTP answer, as a load balancer's probe sees it.
#[derive(Debug)]
struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// `GET path` from inside `ns`, over a fresh connection (HTTP/1.1, `Connection: close`).
fn get(ns: &Netns, addr: SocketAddr, path: &str) -> std::io::Result<Http> {
    let path = path.to_owned();
    ns.run(move || -> std::io::Result<Http> {
        let mut s = TcpStream::connect_timeout(&addr, WAIT)?;
        s.set_read_timeout(Some(WAIT))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not HTTP: {raw:?}"));
        let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
        let mut lines = head.split("\r\n");
        let status =
            lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok(Http { status, headers, body: body.to_owned() })
    })
    .unwrap_or_else(|e| panic!("entering {ns}: {e}"))
}

fn must_get(ns: &Netns, addr: SocketAddr, path: &str) -> Http {
    get(ns, addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path} from {ns}: {e}"))
}

/// Polls until `GET` answers `status`.
fn wait_status(ns: &Netns, addr: SocketAddr, path: &str, status: u16) -> Http {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = get(ns, addr, path);
        if let Ok(r) = &last
            && r.status == status
        {
            return last.unwrap_or_else(|_| unreachable!());
        }
        assert!(Instant::now() < deadline, "http://{addr}{path} from {ns}: wanted {status}, last {last:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A LoadBalancer service with externalTrafficPolicy Local, healthCheckNodePort [`HC_PORT`] and
/// one endpoint: the pod at `ip` on node `node`.
fn lb_yaml(fx: &Fixture, node: &str, ip: IpAddr) -> String {
    let cluster_ip = fx.cluster_ip(30, Family::V4);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: e2e}}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: \"{cluster_ip}\"\n  clusterIPs: [\"{cluster_ip}\"]\n  externalTrafficPolicy: Local\n  \
         healthCheckNodePort: {HC_PORT}\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: {port}, nodePort: 30130}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: lb-v4\n  namespace: e2e\n  \
         labels: {{kubernetes.io/service-name: lb}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\n\
         endpoints:\n- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: true, serving: true, terminating: false}}\n",
        port = common::POD_PORT,
    )
}

/// Checks every line of a Prometheus text exposition: comments, or `name{labels} value`.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) =
            line.rsplit_once(' ').unwrap_or_else(|| panic!("metric line without value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("{line:?}: value {v:?}: {e}")),
        };
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "bad labels in {line:?}");
        }
        out.push((series.to_owned(), value));
    }
    out
}

fn metric(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("{series} missing from the metrics"))
}

#[test]
fn health_health_check_node_port_metrics_and_status_of_a_running_ferry() {
    let mut fx = Fixture::new("ops_health", BACKEND);
    let node_name = fx.cluster.node.name.clone();
    let local_pod = fx.cluster.pods[0].ip4;
    fx.write_manifest("lb.yaml", &lb_yaml(&fx, &node_name, local_pod.into()));
    fx.start(&[]);
    let node = &fx.cluster.node.ns;
    let ext = &fx.cluster.ext.ns;

    // The kubelet's probes, on the default --healthz-bind-address.
    let healthz = wait_status(node, localhost(10256), "/healthz", 200);
    let v = healthz.json();
    assert_eq!(v["nodeEligible"], true, "{v}");
    assert!(v["lastUpdated"].is_string() && v["currentTime"].is_string(), "{v}");
    assert_eq!(healthz.header("content-type"), Some("application/json"));
    assert_eq!(must_get(node, localhost(10256), "/livez").status, 200);
    assert_eq!(must_get(node, localhost(10256), "/readyz").status, 200, "ready: the first sync is done");
    // 0.0.0.0: the node address answers too.
    assert_eq!(must_get(ext, fx.node_addr(Family::V4, 10256), "/healthz").status, 200);

    // A load balancer probes the healthCheckNodePort on both node addresses.
    for family in Family::ALL {
        let hc = wait_status(ext, fx.node_addr(family, HC_PORT), "/", 200);
        assert_eq!(hc.header("x-load-balancing-endpoint-weight"), Some("1"), "{hc:?}");
        assert_eq!(
            hc.json(),
            serde_json::json!({"service": {"namespace": "e2e", "name": "lb"}, "localEndpoints": 1, "serviceProxyHealthy": true})
        );
    }

    // The only endpoint moves to the other node: 503, weight 0.
    let remote = fx.cluster.remote_pods[0].clone();
    let mark = fx.mark();
    fx.write_manifest("lb.yaml", &lb_yaml(&fx, &remote.node, remote.ip4.into()));
    fx.wait_for_sync(mark, SyncKind::Changed, WAIT);
    let hc = wait_status(ext, fx.node_addr(Family::V4, HC_PORT), "/", 503);
    assert_eq!(hc.header("x-load-balancing-endpoint-weight"), Some("0"));
    assert_eq!(hc.json()["localEndpoints"], 0);

    // And back.
    let mark = fx.mark();
    fx.write_manifest("lb.yaml", &lb_yaml(&fx, &node_name, local_pod.into()));
    fx.wait_for_sync(mark, SyncKind::Changed, WAIT);
    wait_status(ext, fx.node_addr(Family::V4, HC_PORT), "/", 200);

    // Prometheus scrapes the default --metrics-bind-address.
    let scrape = must_get(node, localhost(10249), "/metrics");
    assert_eq!(scrape.status, 200);
    let samples = parse_metrics(&scrape.body);
    for series in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_proxy_healthz_total{code=\"200\"}",
        "kubeproxy_proxy_livez_total{code=\"200\"}",
        "ferry_services",
    ] {
        assert!(metric(&samples, series) >= 1.0, "{series}:\n{}", scrape.body);
    }
    assert!(metric(&samples, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.6e9);
    assert_eq!(metric(&samples, "ferry_sync_failures_total"), 0.0);
    assert_eq!(must_get(node, localhost(10249), "/proxyMode").body, "nftables");

    // ferry status, on the default admin address.
    let text = fx.ferry_command(&["status"]).unwrap_or_else(|e| panic!("ferry status: {e}"));
    let row =
        text.lines().find(|l| l.starts_with("e2e/lb ")).unwrap_or_else(|| panic!("no e2e/lb row:\n{text}"));
    assert!(row.contains(&format!("{}:80", fx.cluster_ip(30, Family::V4))), "{row}");
    assert!(text.contains(&format!("on node {node_name}, backend nftables: healthy")), "{text}");
    assert!(text.lines().any(|l| l.starts_with(&HC_PORT.to_string()) && l.contains("yes (200)")), "{text}");
    let json =
        fx.ferry_command(&["status", "-o", "json"]).unwrap_or_else(|e| panic!("ferry status -o json: {e}"));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(v["service_ports"][0]["service"], "e2e/lb", "{v}");
    assert_eq!(v["service_ports"][0]["local_endpoints"], 1, "{v}");
    assert!(
        v["syncs"].as_array().is_some_and(|s| s.iter().any(|s| s["kind"] == "full" && s["ok"] == true)),
        "{v}"
    );

    // SIGHUP: a full resync (no --config to re-read).
    let mark = fx.mark();
    fx.ferry().signal(Signal::SIGHUP).unwrap_or_else(|e| panic!("SIGHUP: {e}"));
    fx.wait_for_sync(mark, SyncKind::Full, WAIT);

    // The service goes, and so does its health check server.
    let mark = fx.mark();
    fx.write_manifest("lb.yaml", "");
    fx.wait_for_sync(mark, SyncKind::Changed, WAIT);
    let deadline = Instant::now() + WAIT;
    while get(ext, fx.node_addr(Family::V4, HC_PORT), "/").is_ok() {
        assert!(Instant::now() < deadline, "the healthCheckNodePort server outlived its service");
        std::thread::sleep(Duration::from_millis(50));
    }
    fx.stop_ferry();
}

/// A per-test file outside the manifest directory, removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_kube_proxy_configuration_file_moves_the_servers() {
    let fx = Fixture::new("ops_config", BACKEND);
    let config = TempFile(std::env::temp_dir().join(format!("{}kube-proxy.yaml", fx.sandbox().prefix())));
    std::fs::write(
        &config.0,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n\
         healthzBindAddress: 127.0.0.1:20256\nmetricsBindAddress: 127.0.0.1:20249\n\
         conntrack: {maxPerCore: 32768}\nnotAKubeProxyField: 1\n",
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", config.0.display()));
    let path = config.0.to_string_lossy().into_owned();
    let mut fx = fx.with_flags(&["--config", &path, "--admin-address", "127.0.0.1:20247"]);
    fx.start(&[]);
    let node = &fx.cluster.node.ns;
    assert_eq!(wait_status(node, localhost(20256), "/healthz", 200).status, 200);
    assert!(get(node, localhost(10256), "/healthz").is_err(), "the default healthz address is not used");
    let configz = must_get(node, localhost(20249), "/configz").json();
    assert_eq!(configz["config_file"], path.as_str(), "{configz}");
    let log = fx.log();
    assert!(log.contains("unknown field notAKubeProxyField"), "{log}");
    assert!(log.contains("not applied: conntrack.maxPerCore=32768"), "{log}");
    let status = fx
        .ferry_command(&["status", "--admin", "127.0.0.1:20247", "-o", "json"])
        .unwrap_or_else(|e| panic!("ferry status: {e}"));
    assert!(status.contains("\"backend\": \"nftables\""), "{status}");

    // SIGHUP re-reads the changed file (the fixture's flags still win) and resyncs everything.
    let text = std::fs::read_to_string(&config.0).unwrap_or_else(|e| panic!("{e}"));
    let text = text.replace("mode: nftables\n", "mode: nftables\nnftables: {minSyncPeriod: 50ms}\n");
    std::fs::write(&config.0, text).unwrap_or_else(|e| panic!("{e}"));
    let mark = fx.mark();
    fx.ferry().signal(Signal::SIGHUP).unwrap_or_else(|e| panic!("SIGHUP: {e}"));
    fx.wait_for_log(mark, "configuration reloaded");
    fx.wait_for_sync(mark, SyncKind::Full, WAIT);
    fx.stop_ferry();
}
