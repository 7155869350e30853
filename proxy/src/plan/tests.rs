//! Semantics of the plan and of verdicts, case by case (kube-proxy is the reference).

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::verdict::{VerdictKind, trace};
use super::*;
use crate::model::Protocol;
use crate::store::{Object, StoreEvent};

const NODE: &str = "node-a";

fn config() -> NodeConfig {
    let mut c = NodeConfig::for_test(NODE, &["192.168.0.10", "fd00::10"], &["10.0.0.0/16", "fd00:10::/64"]);
    c.service_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
    c
}

fn service(name: &str, spec: Value) -> Object {
    service_with(name, spec, json!({}), json!({}))
}

fn service_with(name: &str, spec: Value, status: Value, labels: Value) -> Object {
    let v = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "labels": labels}, "spec": spec, "status": status});
    Object::Service(std::sync::Arc::new(serde_json::from_value(v).unwrap()))
}

/// An endpoint: (ip, node, ready, serving, terminating, zone hint).
struct Ep(&'static str, &'static str, bool, bool, bool, Option<&'static str>);

fn ready(ip: &'static str, node: &'static str) -> Ep {
    Ep(ip, node, true, true, false, None)
}

fn slice(name: &str, svc: &str, family: &str, port: i32, eps: &[Ep]) -> Object {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|e| {
            let mut v = json!({"addresses": [e.0], "nodeName": e.1,
                "conditions": {"ready": e.2, "serving": e.3, "terminating": e.4}});
            if let Some(z) = e.5 {
                v["hints"] = json!({"forZones": [{"name": z}]});
            }
            v
        })
        .collect();
    let v = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": family, "ports": [{"name": "http", "port": port, "protocol": "TCP"}], "endpoints": endpoints});
    Object::EndpointSlice(std::sync::Arc::new(serde_json::from_value(v).unwrap()))
}

fn node(zone: &str) -> Object {
    let v = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone}}});
    Object::Node(std::sync::Arc::new(serde_json::from_value(v).unwrap()))
}

fn store_of(objects: Vec<Object>) -> Store {
    let mut s = Store::new();
    s.handle(StoreEvent::Replace {
        kinds: vec![crate::model::Kind::Service, crate::model::Kind::EndpointSlice, crate::model::Kind::Node],
        objects,
    });
    s
}

fn web(extra: Value) -> Value {
    let mut spec =
        json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    spec
}

fn three_endpoints() -> Object {
    slice(
        "web-1",
        "web",
        "IPv4",
        8080,
        &[ready("10.0.1.10", NODE), ready("10.0.1.11", NODE), ready("10.0.2.10", "node-b")],
    )
}

fn only_port(plan: &Plan) -> &ServicePortPlan {
    assert_eq!(plan.ports.len(), 1, "{:?}", plan.ports.keys());
    plan.ports.values().next().unwrap()
}

fn addrs(v: &[&str]) -> Vec<SocketAddr> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

fn t(plan: &Plan, config: &NodeConfig, from: &str, to: &str) -> verdict::Verdict {
    trace(plan, config, from.parse().unwrap(), to.parse().unwrap(), Protocol::Tcp)
}

#[test]
fn cluster_ip_uses_all_ready_endpoints_and_keeps_pod_sources() {
    let cfg = config();
    let plan = build(&store_of(vec![service("web", web(json!({}))), three_endpoints()]), &cfg);
    let p = only_port(&plan);
    assert_eq!(p.cluster_endpoints, addrs(&["10.0.1.10:8080", "10.0.1.11:8080", "10.0.2.10:8080"]));
    let v = t(&plan, &cfg, "10.0.1.2", "10.96.0.10:80");
    assert_eq!(v.verdict, VerdictKind::Endpoints);
    assert!(!v.masquerade);
    assert!(t(&plan, &cfg, "192.168.0.100", "10.96.0.10:80").masquerade, "off-node source to ClusterIP");
}

#[test]
fn service_without_endpoints_rejects_and_undefined_port_rejects() {
    let cfg = config();
    let plan = build(&store_of(vec![service("web", web(json!({})))]), &cfg);
    assert_eq!(t(&plan, &cfg, "10.0.1.2", "10.96.0.10:80").verdict, VerdictKind::Reject);
    assert_eq!(t(&plan, &cfg, "10.0.1.2", "10.96.0.10:81").verdict, VerdictKind::Reject);
    assert_eq!(t(&plan, &cfg, "10.0.1.2", "10.96.0.99:80").verdict, VerdictKind::Drop, "unallocated");
    assert_eq!(t(&plan, &cfg, "10.0.1.2", "10.97.0.1:80").verdict, VerdictKind::None);
}

#[test]
fn terminating_endpoints_serve_only_when_no_ready_ones_exist() {
    let cfg = config();
    let term = Ep("10.0.1.12", NODE, false, true, true, None);
    let not_serving = Ep("10.0.1.13", NODE, false, false, true, None);
    let plan = build(
        &store_of(vec![
            service("web", web(json!({}))),
            slice("s", "web", "IPv4", 8080, &[ready("10.0.1.10", NODE), term, not_serving]),
        ]),
        &cfg,
    );
    assert_eq!(only_port(&plan).cluster_endpoints, addrs(&["10.0.1.10:8080"]));
    let term = Ep("10.0.1.12", NODE, false, true, true, None);
    let not_serving = Ep("10.0.1.13", NODE, false, false, true, None);
    let plan = build(
        &store_of(vec![
            service("web", web(json!({}))),
            slice("s", "web", "IPv4", 8080, &[term, not_serving]),
        ]),
        &cfg,
    );
    assert_eq!(only_port(&plan).cluster_endpoints, addrs(&["10.0.1.12:8080"]));
}

#[test]
fn external_policy_local_keeps_source_uses_local_endpoints_and_short_circuits_pods() {
    let cfg = config();
    let spec = web(json!({"type": "NodePort", "externalTrafficPolicy": "Local",
        "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]}));
    let plan = build(&store_of(vec![service("web", spec), three_endpoints()]), &cfg);
    let p = only_port(&plan);
    assert_eq!(p.local_endpoints, addrs(&["10.0.1.10:8080", "10.0.1.11:8080"]));
    let ext = t(&plan, &cfg, "192.168.0.100", "192.168.0.10:30080");
    assert_eq!(ext.endpoints, p.local_endpoints);
    assert!(!ext.masquerade);
    let pod = t(&plan, &cfg, "10.0.1.2", "192.168.0.10:30080");
    assert_eq!(pod.endpoints.len(), 3, "pods short-circuit to cluster endpoints");
    assert!(!pod.masquerade);
    let node = t(&plan, &cfg, "192.168.0.10", "192.168.0.10:30080");
    assert_eq!(node.endpoints.len(), 3);
    assert!(node.masquerade, "the node itself is masqueraded");
}

#[test]
fn external_policy_local_without_local_endpoints_drops_external_traffic() {
    let cfg = config();
    let spec = web(json!({"type": "NodePort", "externalTrafficPolicy": "Local",
        "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]}));
    let remote_only = slice("s", "web", "IPv4", 8080, &[ready("10.0.2.10", "node-b")]);
    let plan = build(&store_of(vec![service("web", spec), remote_only]), &cfg);
    assert_eq!(t(&plan, &cfg, "192.168.0.100", "192.168.0.10:30080").verdict, VerdictKind::Drop);
    assert_eq!(t(&plan, &cfg, "10.0.1.2", "192.168.0.10:30080").verdict, VerdictKind::Endpoints);
}

#[test]
fn external_policy_cluster_masquerades_nodeport_traffic() {
    let cfg = config();
    let spec = web(json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
    let plan = build(&store_of(vec![service("web", spec), three_endpoints()]), &cfg);
    let v = t(&plan, &cfg, "192.168.0.100", "192.168.0.10:30080");
    assert_eq!(v.endpoints.len(), 3);
    assert!(v.masquerade);
}

#[test]
fn internal_policy_local_uses_only_local_endpoints_or_drops() {
    let cfg = config();
    let plan = build(
        &store_of(vec![service("web", web(json!({"internalTrafficPolicy": "Local"}))), three_endpoints()]),
        &cfg,
    );
    assert_eq!(t(&plan, &cfg, "10.0.1.2", "10.96.0.10:80").endpoints.len(), 2);
    let remote_only = slice("s", "web", "IPv4", 8080, &[ready("10.0.2.10", "node-b")]);
    let plan = build(
        &store_of(vec![service("web", web(json!({"internalTrafficPolicy": "Local"}))), remote_only]),
        &cfg,
    );
    assert_eq!(t(&plan, &cfg, "10.0.1.2", "10.96.0.10:80").verdict, VerdictKind::Drop);
}

#[test]
fn zone_hints_are_used_only_when_every_endpoint_has_one_and_one_matches() {
    let cfg = config();
    let hinted = slice(
        "s",
        "web",
        "IPv4",
        8080,
        &[
            Ep("10.0.1.10", NODE, true, true, false, Some("a")),
            Ep("10.0.2.10", "node-b", true, true, false, Some("b")),
        ],
    );
    let plan = build(&store_of(vec![service("web", web(json!({}))), hinted, node("a")]), &cfg);
    assert_eq!(only_port(&plan).cluster_endpoints, addrs(&["10.0.1.10:8080"]));

    let partly = slice(
        "s",
        "web",
        "IPv4",
        8080,
        &[
            Ep("10.0.1.10", NODE, true, true, false, Some("a")),
            Ep("10.0.2.10", "node-b", true, true, false, None),
        ],
    );
    let plan = build(&store_of(vec![service("web", web(json!({}))), partly, node("a")]), &cfg);
    assert_eq!(only_port(&plan).cluster_endpoints.len(), 2, "a missing hint disables topology");

    let other_zone =
        slice("s", "web", "IPv4", 8080, &[Ep("10.0.2.10", "node-b", true, true, false, Some("b"))]);
    let plan = build(&store_of(vec![service("web", web(json!({}))), other_zone, node("a")]), &cfg);
    assert_eq!(only_port(&plan).cluster_endpoints.len(), 1, "no hint for our zone: hints ignored");
}

#[test]
fn load_balancer_ips_honour_ip_mode_proxy_and_source_ranges() {
    let cfg = config();
    let spec = web(json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24"],
        "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
    let status = json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"ip": "198.51.100.2", "ipMode": "Proxy"}]}});
    let plan = build(&store_of(vec![service_with("web", spec, status, json!({})), three_endpoints()]), &cfg);
    let p = only_port(&plan);
    assert_eq!(p.load_balancer_ips, vec!["198.51.100.1".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(t(&plan, &cfg, "203.0.113.5", "198.51.100.1:80").verdict, VerdictKind::Endpoints);
    assert_eq!(t(&plan, &cfg, "192.0.2.5", "198.51.100.1:80").verdict, VerdictKind::Drop);
    assert_eq!(
        t(&plan, &cfg, "192.0.2.5", "192.168.0.10:30080").verdict,
        VerdictKind::Endpoints,
        "NodePorts bypass"
    );
    assert_eq!(t(&plan, &cfg, "203.0.113.5", "198.51.100.2:80").verdict, VerdictKind::None, "ipMode Proxy");
}

#[test]
fn hairpin_traffic_is_masqueraded() {
    let cfg = config();
    let plan = build(&store_of(vec![service("web", web(json!({}))), three_endpoints()]), &cfg);
    assert!(t(&plan, &cfg, "10.0.1.10", "10.96.0.10:80").masquerade);
    assert_eq!(only_port(&plan).hairpin_ips.len(), 2, "only this node's endpoints");
}

#[test]
fn masquerade_all_masquerades_pod_traffic_to_cluster_ips() {
    let mut cfg = config();
    cfg.masquerade_all = true;
    let plan = build(&store_of(vec![service("web", web(json!({}))), three_endpoints()]), &cfg);
    assert!(t(&plan, &cfg, "10.0.1.2", "10.96.0.10:80").masquerade);
}

#[test]
fn headless_external_name_and_other_proxies_services_are_skipped() {
    let cfg = config();
    let objects = vec![
        service("headless", json!({"clusterIP": "None", "ports": [{"port": 80}]})),
        service("ext", json!({"type": "ExternalName", "externalName": "example.com"})),
        service_with(
            "other",
            web(json!({})),
            json!({}),
            json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
        ),
    ];
    let store = store_of(objects);
    assert!(build(&store, &cfg).ports.is_empty());
    assert_eq!(store.problems().count(), 0, "skipping is not an error");
}

#[test]
fn dual_stack_services_get_a_plan_per_family() {
    let cfg = config();
    let spec = json!({"clusterIPs": ["10.96.0.10", "fd00:96::10"], "ipFamilies": ["IPv4", "IPv6"],
        "ports": [{"name": "http", "port": 80}]});
    let v6 = slice("s6", "web", "IPv6", 8080, &[ready("fd00:10::1:10", NODE)]);
    let plan = build(&store_of(vec![service("web", spec), three_endpoints(), v6]), &cfg);
    assert_eq!(plan.family(crate::model::IpFamily::V4).count(), 1);
    let p6: Vec<_> = plan.family(crate::model::IpFamily::V6).collect();
    assert_eq!(p6[0].cluster_endpoints, addrs(&["[fd00:10::1:10]:8080"]));
}

#[test]
fn endpoints_duplicated_across_slices_are_merged() {
    let cfg = config();
    let a = slice("a", "web", "IPv4", 8080, &[ready("10.0.1.10", NODE), ready("10.0.1.11", NODE)]);
    let b = slice("b", "web", "IPv4", 8080, &[ready("10.0.1.11", NODE)]);
    let plan = build(&store_of(vec![service("web", web(json!({}))), a, b]), &cfg);
    assert_eq!(only_port(&plan).cluster_endpoints.len(), 2);
}

#[test]
fn invalid_objects_are_reported_and_skipped_without_touching_others() {
    let cfg = config();
    let bad_ip = service("bad-ip", json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}));
    let wrong_family = service(
        "bad-family",
        json!({"clusterIPs": ["10.96.0.11"], "ipFamilies": ["IPv6"], "ports": [{"port": 80}]}),
    );
    let bad_proto =
        service("bad-proto", json!({"clusterIP": "10.96.0.12", "ports": [{"port": 80, "protocol": "QUIC"}]}));
    let bad_port = service("bad-port", json!({"clusterIP": "10.96.0.13", "ports": [{"port": 70000}]}));
    let store = store_of(vec![
        service("web", web(json!({}))),
        three_endpoints(),
        bad_ip,
        wrong_family,
        bad_proto,
        bad_port,
    ]);
    let plan = build(&store, &cfg);
    assert_eq!(plan.ports.len(), 1);
    assert_eq!(only_port(&plan).cluster_endpoints.len(), 3);
    let problems: Vec<String> = store.problems().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(problems.iter().any(|p| p.contains("ns/bad-ip") && p.contains("10.96.0.300")), "{problems:#?}");
    assert!(problems.iter().any(|p| p.contains("ns/bad-proto") && p.contains("QUIC")), "{problems:#?}");
}

#[test]
fn leading_zero_cluster_ips_are_normalised_like_kube_proxy() {
    let cfg = config();
    let plan = build(
        &store_of(vec![service("web", web(json!({"clusterIP": "010.096.000.010"}))), three_endpoints()]),
        &cfg,
    );
    assert_eq!(only_port(&plan).cluster_ip, "10.96.0.10".parse::<std::net::IpAddr>().unwrap());
}

#[test]
fn one_slice_change_replans_only_its_service_and_reports_it_changed() {
    let cfg = config();
    let mut store = store_of(vec![
        service("web", web(json!({}))),
        three_endpoints(),
        service("other", json!({"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]})),
    ]);
    let mut planner = Planner::new();
    let initial = store.take_changes();
    let first = planner.update(&store, &cfg, &initial);
    assert_eq!(first.added.len(), 2);
    store.handle(StoreEvent::Apply(slice("web-1", "web", "IPv4", 8080, &[ready("10.0.1.10", NODE)])));
    let changes = store.take_changes();
    assert_eq!(changes.services.len(), 1);
    let diff = planner.update(&store, &cfg, &changes);
    assert_eq!((diff.added.len(), diff.changed.len(), diff.removed.len()), (0, 1, 0));
    assert_eq!(diff.changed[0].1.cluster_endpoints.len(), 1);
    assert_eq!(planner.plan(), &build(&store, &cfg), "incremental equals from-scratch");
}

#[test]
fn relist_keeps_unchanged_services_and_removes_vanished_ones() {
    let cfg = config();
    let mut store = store_of(vec![
        service("web", web(json!({}))),
        three_endpoints(),
        service("gone", web(json!({"clusterIP": "10.96.0.30"}))),
    ]);
    let mut planner = Planner::new();
    let initial = store.take_changes();
    planner.update(&store, &cfg, &initial);
    store.handle(StoreEvent::Replace {
        kinds: vec![crate::model::Kind::Service],
        objects: vec![service("web", web(json!({})))],
    });
    let changes = store.take_changes();
    assert_eq!(changes.services.len(), 1, "only the vanished service changed: {changes:?}");
    let diff = planner.update(&store, &cfg, &changes);
    assert_eq!(diff.removed.len(), 1);
    assert!(diff.changed.is_empty() && diff.added.is_empty());
}

#[test]
fn the_diff_names_the_cluster_ips_allocated_and_freed_and_not_an_address_handed_over() {
    let cfg = config();
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    let mut store = store_of(vec![service("a", web(json!({"clusterIP": "10.96.0.30"})))]);
    let mut planner = Planner::new();
    let initial = store.take_changes();
    assert_eq!(planner.update(&store, &cfg, &initial).cluster_ips_added, vec![ip("10.96.0.30")]);

    store.handle(StoreEvent::Apply(service("b", web(json!({"clusterIP": "10.96.0.31"})))));
    let changes = store.take_changes();
    let diff = planner.update(&store, &cfg, &changes);
    assert_eq!((diff.cluster_ips_added, diff.cluster_ips_removed), (vec![ip("10.96.0.31")], vec![]));

    // `a` goes and `c` takes its address in the same update: nothing to change in the kernel.
    let a = crate::model::ObjectRef::new(crate::model::Kind::Service, Some("ns"), Some("a"));
    store.handle(StoreEvent::Delete(a));
    store.handle(StoreEvent::Apply(service("c", web(json!({"clusterIP": "10.96.0.30"})))));
    let changes = store.take_changes();
    let diff = planner.update(&store, &cfg, &changes);
    assert!(diff.cluster_ips_added.is_empty() && diff.cluster_ips_removed.is_empty(), "{diff:?}");
    assert_eq!(planner.plan(), &build(&store, &cfg), "incremental equals from-scratch");
}

mod property {
    use proptest::prelude::*;

    use super::*;

    fn arb_ip() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("10.96.0.10".to_owned()),
            Just("fd00:96::1".to_owned()),
            Just("None".to_owned()),
            Just("".to_owned()),
            "[0-9]{1,4}\\.[0-9]{1,4}\\.[0-9]{1,3}\\.[0-9]{1,3}",
            ".{0,12}",
        ]
    }

    fn arb_service() -> impl Strategy<Value = Value> {
        (
            arb_ip(),
            prop::collection::vec(
                (any::<i32>(), prop::option::of(any::<i32>()), "(TCP|UDP|SCTP|ICMP|)"),
                0..4,
            ),
            prop::option::of("(ClusterIP|NodePort|LoadBalancer|ExternalName|Weird)"),
            prop::option::of("(Local|Cluster|x)"),
            prop::collection::vec(arb_ip(), 0..3),
        )
            .prop_map(|(ip, ports, type_, policy, ext)| {
                let ports: Vec<Value> = ports
                    .into_iter()
                    .map(|(port, np, proto)| json!({"port": port, "nodePort": np, "protocol": proto}))
                    .collect();
                json!({"clusterIP": ip, "ports": ports, "type": type_, "externalTrafficPolicy": policy,
                    "externalIPs": ext, "sessionAffinity": "ClientIP"})
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn arbitrary_services_never_panic_and_never_remove_a_valid_one(spec in arb_service(), ep in arb_ip()) {
            let cfg = config();
            let bad = service("fuzz", spec);
            let ep_slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "f", "namespace": "ns", "labels": {"kubernetes.io/service-name": "fuzz"}},
                "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": [{"addresses": [ep]}]});
            let fuzz_slice = Object::EndpointSlice(std::sync::Arc::new(serde_json::from_value(ep_slice).unwrap()));
            let store = store_of(vec![service("web", web(json!({}))), three_endpoints(), bad, fuzz_slice]);
            let plan = build(&store, &cfg);
            let web = plan.ports.values().find(|p| p.name.service.name == "web");
            prop_assert!(web.is_some_and(|p| p.cluster_endpoints.len() == 3));
            for p in plan.ports.values() {
                let _ = trace(&plan, &cfg, "10.0.1.2".parse().unwrap(), SocketAddr::new(p.cluster_ip, p.port), p.protocol);
            }
        }
    }
}
