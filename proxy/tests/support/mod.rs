//! Test support for the Kubernetes API source: a fake API server, a harness that runs the real
//! source against it through a kubeconfig and feeds a real [`Store`], and object builders.

#![allow(dead_code, reason = "each test binary uses a different part of the support module")]

pub mod apiserver;

use std::time::Duration;

use proxy::model::{Kind, ServiceKey};
use proxy::source::kube::Options;
use proxy::store::{Store, StoreEvent};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use apiserver::{FakeApiServer, GoneStyle, Request, Resource};

/// The longest any single await in these tests may take.
pub const STEP: Duration = Duration::from_secs(20);

pub const NODE: &str = "node-a";

/// The real source, connected to a [`FakeApiServer`] through a kubeconfig file, feeding a store.
pub struct Harness {
    pub server: FakeApiServer,
    pub store: Store,
    /// Every event the store has processed, in order.
    pub events: Vec<StoreEvent>,
    rx: mpsc::Receiver<StoreEvent>,
    source: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.source.abort();
    }
}

impl Harness {
    /// Starts the source for node [`NODE`] against `server`.
    pub async fn start(server: FakeApiServer) -> Self {
        Self::start_with(server, Options::default()).await
    }

    pub async fn start_with(server: FakeApiServer, options: Options) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("a temporary directory for the kubeconfig");
        let kubeconfig = server.write_kubeconfig(dir.path());
        let client = tokio::time::timeout(STEP, proxy::source::kube::client(Some(&kubeconfig)))
            .await
            .expect("building the client timed out")
            .expect("a client from the kubeconfig");
        let (tx, rx) = mpsc::channel(16);
        let source = tokio::spawn(proxy::source::kube::run_with(client, NODE.to_owned(), options, tx));
        Self { server, store: Store::new(), events: Vec::new(), rx, source, _dir: dir }
    }

    /// Receives the next event and hands it to the store.
    pub async fn step(&mut self) -> StoreEvent {
        let event = tokio::time::timeout(STEP, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no store event within {STEP:?}; so far: {:#?}", self.events))
            .expect("the source stopped sending");
        self.store.handle(event.clone());
        self.events.push(event.clone());
        event
    }

    /// Processes events until `done` holds for the store.
    pub async fn until(&mut self, what: &str, done: impl Fn(&Store) -> bool) {
        self.until_checking(what, done, |_, _| {}).await;
    }

    /// Processes events until `done` holds, calling `invariant` after every event.
    pub async fn until_checking(
        &mut self,
        what: &str,
        done: impl Fn(&Store) -> bool,
        invariant: impl Fn(&Store, &StoreEvent),
    ) {
        let deadline = tokio::time::Instant::now() + STEP;
        while !done(&self.store) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}; events: {:#?}",
                self.events
            );
            let event = self.step().await;
            invariant(&self.store, &event);
        }
    }

    /// Asserts that no event arrives within `quiet`.
    pub async fn expect_no_event(&mut self, quiet: Duration) {
        if let Ok(Some(event)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            panic!("expected no store event, got {event:#?}");
        }
    }

    /// Processes the first list of every kind; returns how many Replace events each kind got
    /// and fails if anything other than a Replace came first.
    pub async fn initial_lists(&mut self) {
        let kinds = [Kind::Service, Kind::EndpointSlice, Kind::Node, Kind::ServiceCIDR];
        while !self.store.has_listed(&kinds) {
            match self.step().await {
                StoreEvent::Replace { .. } => {}
                other => panic!("expected only initial lists before every kind listed, got {other:#?}"),
            }
        }
    }

    pub fn has_service(&self, namespace: &str, name: &str) -> bool {
        self.store.service(&ServiceKey::new(namespace, name)).is_some()
    }
}

/// Logs to the test's output, filtered by `RUST_LOG` (e.g. `RUST_LOG=proxy=debug,kube=debug`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

pub fn has_service(store: &Store, namespace: &str, name: &str) -> bool {
    store.service(&ServiceKey::new(namespace, name)).is_some()
}

/// A ClusterIP Service with one TCP port 80.
pub fn service(namespace: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "metadata": {"namespace": namespace, "name": name},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

/// `service` with labels.
pub fn labelled(mut object: Value, labels: Value) -> Value {
    object["metadata"]["labels"] = labels;
    object
}

/// An IPv4 EndpointSlice of `service` with one ready endpoint per address, port 8080.
pub fn slice(namespace: &str, name: &str, service: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "test"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

pub fn node(name: &str, zone: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "spec": {},
    })
}

pub fn with_taint(mut node: Value, key: &str) -> Value {
    node["spec"]["taints"] = json!([{"key": key, "effect": "NoSchedule"}]);
    node
}

pub fn service_cidr(name: &str, cidrs: &[&str]) -> Value {
    json!({"metadata": {"name": name}, "spec": {"cidrs": cidrs}})
}

/// Kinds and object names of a Replace event.
pub fn replace_parts(event: &StoreEvent) -> Option<(Vec<Kind>, Vec<String>)> {
    match event {
        StoreEvent::Replace { kinds, objects } => {
            let mut names: Vec<String> = objects.iter().map(|o| o.object_ref().to_string()).collect();
            names.sort();
            Some((kinds.clone(), names))
        }
        _ => None,
    }
}
