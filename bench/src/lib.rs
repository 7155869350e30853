//! Synthetic clusters for ferry's benchmarks: kube-proxy's BenchmarkSyncProxyRules shape
//! (ClusterIP services, one TCP port, N ready endpoints each).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proxy::backend::nftables::{NftError, NftRunner};
use proxy::plan::NodeConfig;
use proxy::store::{Object, Store, StoreEvent};

pub fn service(i: usize) -> Object {
    Object::Service(std::sync::Arc::new(Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some("bench".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip(i)),
            ports: Some(vec![ServicePort { name: Some("p".into()), port: 80, ..Default::default() }]),
            ..Default::default()
        }),
        status: None,
    }))
}

pub fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", (i >> 8) & 0xff, i & 0xff)
}

/// The slice of service `i` with `endpoints` ready endpoints; `generation` shifts the addresses
/// so a benchmark can produce a changed slice.
pub fn slice(i: usize, endpoints: usize, generation: usize) -> Object {
    let eps = (0..endpoints)
        .map(|e| {
            let n = i * endpoints + e + generation;
            Endpoint {
                addresses: vec![format!("10.{}.{}.{}", 1 + ((n >> 16) & 0x7f), (n >> 8) & 0xff, n & 0xff)],
                node_name: Some(if e % 2 == 0 { "node".into() } else { "other".into() }),
                conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
                ..Default::default()
            }
        })
        .collect();
    Object::EndpointSlice(std::sync::Arc::new(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-abc")),
            namespace: Some("bench".into()),
            labels: Some([("kubernetes.io/service-name".to_owned(), format!("svc-{i}"))].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: eps,
        ports: Some(vec![EndpointPort { name: Some("p".into()), port: Some(8080), ..Default::default() }]),
    }))
}

pub fn objects(services: usize, endpoints: usize) -> Vec<Object> {
    (0..services).flat_map(|i| [service(i), slice(i, endpoints, 0)]).collect()
}

pub fn store(services: usize, endpoints: usize) -> Store {
    let mut s = Store::new();
    s.handle(StoreEvent::Replace {
        kinds: vec![proxy::model::Kind::Service, proxy::model::Kind::EndpointSlice],
        objects: objects(services, endpoints),
    });
    s
}

pub fn config() -> NodeConfig {
    NodeConfig::for_test("node", &["192.168.0.10"], &["10.0.0.0/8"])
}

/// Keeps the scripts a backend would send to nft, without a kernel.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    pub scripts: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl NftRunner for RecordingRunner {
    fn apply(&mut self, script: &str) -> Result<(), NftError> {
        if let Ok(mut s) = self.scripts.lock() {
            s.push(script.to_owned());
        }
        Ok(())
    }

    fn list_json(&mut self, _args: &[&str]) -> Result<String, NftError> {
        Ok(r#"{"nftables": []}"#.to_owned())
    }
}
