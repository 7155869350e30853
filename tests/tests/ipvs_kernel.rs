//! The IPVS backend against the kernel, in sandbox namespaces: IPVS services and real servers
//! through generic netlink, `kube-ipvs0` through rtnetlink, the nftables table, incremental
//! syncs equal to a full one, and real TCP/UDP traffic through a ClusterIP, a NodePort and a
//! LoadBalancer IP under policy Local.
//!
//! The IPVS connection timeouts a sync sets are read back through `ipvsadm`, and stale
//! services inside `excludeCIDRs` survive full syncs and cleanup.
//!
//! Kernels without IPVS (or the dummy module) cannot run most of them: those are ignored with
//! the reason, and run inside the test VM (`cargo xtask vm-test`, Debian's 6.1 kernel) or
//! anywhere with `--include-ignored`. The nftables test runs everywhere. Needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ferry_sandbox::{Cluster, ClusterSpec, Netns, Proto, Reply, Sandbox};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proxy::backend::ipvs::address::{DUMMY_IFNAME, Rtnetlink, ServiceAddresses};
use proxy::backend::ipvs::filter;
use proxy::backend::ipvs::kernel::{Ipvs, NetlinkIpvs};
use proxy::backend::ipvs::netlink::{Dest, ServiceKey, ServiceSpec, Timeouts};
use proxy::backend::{BackendKind, BackendOptions, build};
use proxy::model::{IpFamily, Kind, Protocol};
use proxy::plan::{NodeConfig, Plan, Planner};
use proxy::store::{Object, Store, StoreEvent};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(2);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn tcp(addr: &str, port: u16) -> ServiceKey {
    ServiceKey::Addr { protocol: Protocol::Tcp, addr: ip(addr), port }
}

/// `ipvsadm -Sn`-like dump of a namespace's IPVS table: services with their real servers.
fn table(ipvs: &mut dyn Ipvs) -> BTreeMap<ServiceKey, (ServiceSpec, BTreeMap<SocketAddr, u32>)> {
    ipvs.services()
        .expect("list services")
        .into_iter()
        .map(|s| {
            let dests =
                ipvs.dests(&s.key).expect("list dests").into_iter().map(|d| (d.addr, d.weight)).collect();
            (s.key, (s.spec, dests))
        })
        .collect()
}

#[test]
#[ignore = "needs IPVS and the dummy module: cargo xtask vm-test"]
fn services_and_real_servers_round_trip_through_generic_netlink() {
    let sb = Sandbox::new("ipvs-nl").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    let mut ipvs = NetlinkIpvs::open(Some(ns.name())).expect("IPVS generic netlink family");
    assert!(ipvs.services().expect("list").is_empty(), "a fresh namespace has no IPVS services");

    let v4 = tcp("10.96.0.10", 80);
    let v6 = ServiceKey::Addr { protocol: Protocol::Udp, addr: ip("fd00:96::10"), port: 53 };
    let fw = ServiceKey::FwMark { family: IpFamily::V4, mark: 0x0f00_0001 };
    let rr = ServiceSpec::new("rr", IpFamily::V4, None);
    let sticky6 = ServiceSpec::new("sh", IpFamily::V6, Some(10800));
    ipvs.add_service(&v4, &rr).expect("add IPv4 TCP service");
    ipvs.add_service(&v6, &sticky6).expect("add IPv6 UDP service with persistence");
    ipvs.add_service(&fw, &rr).expect("add firewall-mark service");
    let err = ipvs.add_service(&v4, &rr).expect_err("a second add of the same service");
    assert_eq!(err.errno(), Some(17), "EEXIST: {err}");

    ipvs.add_dest(&v4, &Dest { addr: sa("10.0.1.10:8080"), weight: 1 }).expect("add dest");
    ipvs.add_dest(&v4, &Dest { addr: sa("10.0.2.10:8080"), weight: 1 }).expect("add dest");
    ipvs.add_dest(&v6, &Dest { addr: sa("[fd00:10::1:10]:5353"), weight: 1 }).expect("add IPv6 dest");
    ipvs.add_dest(&fw, &Dest { addr: sa("10.0.1.10:8080"), weight: 1 })
        .expect("add dest to the mark service");

    let t = table(&mut ipvs);
    assert_eq!(t.len(), 3);
    assert_eq!(t[&v4].0, rr);
    assert_eq!(t[&v6].0, sticky6, "persistence, timeout and the /128 netmask come back");
    assert_eq!(t[&v4].1, BTreeMap::from([(sa("10.0.1.10:8080"), 1), (sa("10.0.2.10:8080"), 1)]));
    assert_eq!(t[&v6].1, BTreeMap::from([(sa("[fd00:10::1:10]:5353"), 1)]));
    assert_eq!(t[&fw].1, BTreeMap::from([(sa("10.0.1.10:8080"), 1)]));

    // Terminating: weight 0. Then the scheduler and persistence change in place.
    ipvs.edit_dest(&v4, &Dest { addr: sa("10.0.2.10:8080"), weight: 0 }).expect("edit dest");
    let sticky4 = ServiceSpec::new("wrr", IpFamily::V4, Some(60));
    ipvs.edit_service(&v4, &sticky4).expect("edit service");
    let t = table(&mut ipvs);
    assert_eq!(t[&v4].0, sticky4);
    assert_eq!(t[&v4].1[&sa("10.0.2.10:8080")], 0);
    let status = ipvs.dests(&v4).expect("dests");
    assert!(status.iter().all(|d| d.forward == 0 && !d.busy()), "NAT forwarding, no connections: {status:?}");

    ipvs.del_dest(&v4, &sa("10.0.2.10:8080")).expect("delete dest");
    ipvs.del_dest(&v4, &sa("10.0.2.10:8080")).expect("deleting it again is not an error");
    ipvs.del_service(&v6).expect("delete service");
    ipvs.del_service(&v6).expect("deleting it again is not an error");
    let t = table(&mut ipvs);
    assert_eq!(t.keys().copied().collect::<Vec<_>>(), vec![v4, fw]);
    assert_eq!(t[&v4].1.len(), 1);
    for key in [v4, fw] {
        ipvs.del_service(&key).expect("delete");
    }
    assert!(ipvs.services().expect("list").is_empty());
}

#[test]
#[ignore = "needs IPVS and the dummy module: cargo xtask vm-test"]
fn kube_ipvs0_holds_service_addresses_of_both_families() {
    let sb = Sandbox::new("ipvs-dummy").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    let mut links = Rtnetlink::open(Some(ns.name())).expect("rtnetlink");
    assert!(links.addresses().expect("no link yet").is_empty());
    links.ensure_link().expect("create kube-ipvs0");
    links.ensure_link().expect("ensuring it again is not an error");
    for a in ["10.96.0.10", "198.18.0.1", "fd00:96::10"] {
        links.add(ip(a)).expect("add address");
    }
    links.add(ip("10.96.0.10")).expect("adding it again is not an error");
    assert_eq!(
        links.addresses().expect("list"),
        BTreeSet::from([ip("10.96.0.10"), ip("198.18.0.1"), ip("fd00:96::10")])
    );
    let shown = ns.ip(&["-d", "addr", "show", "dev", DUMMY_IFNAME]).expect("ip addr show");
    assert!(shown.contains("dummy"), "{shown}");
    assert!(shown.contains("inet 10.96.0.10/32") && shown.contains("inet6 fd00:96::10/128"), "{shown}");
    // The kernel takes them as local: a local route each.
    let local = ns.ip(&["route", "show", "table", "local", "dev", DUMMY_IFNAME]).expect("routes");
    assert!(local.contains("local 10.96.0.10"), "{local}");
    links.del(ip("198.18.0.1")).expect("remove address");
    links.del(ip("198.18.0.1")).expect("removing it again is not an error");
    assert_eq!(links.addresses().expect("list").len(), 2);
    assert!(links.local_addresses().expect("all").contains(&ip("10.96.0.10")));
    assert!(links.remove_link().expect("delete link"));
    assert!(!links.remove_link().expect("nothing left"));
    assert!(ns.ip(&["link", "show", DUMMY_IFNAME]).is_err(), "kube-ipvs0 is gone");
}

/// The table of both families, a full set of elements, then incremental element changes:
/// every statement is accepted by the kernel. IPVS is not needed for this one.
#[test]
fn the_nftables_table_and_its_element_updates_are_accepted_by_the_kernel() {
    let sb = Sandbox::new("ipvs-nft").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    let (store, cfg) = store_with(&[web_service(&["10.0.1.10", "10.0.2.10"], 30080, true)]);
    let plan = planned(&store, &cfg);
    let backend = build(BackendKind::Ipvs, &BackendOptions::default()).expect("backend");
    let text = backend.render(&plan, &cfg);
    let script = &text[text.find("add table ip ferry_ipvs").expect("the table")..];
    ns.exec_with_input(&["nft", "-f", "-"], script).unwrap_or_else(|e| panic!("nft refused:\n{script}\n{e}"));
    let listed = ns.exec(&["nft", "list", "table", "ip", "ferry_ipvs"]).expect("list");
    for needle in ["sc_marks", "198.18.0.1 . tcp . 80", "10.96.0.0/16", "ct mark set ct mark | 0x00004000"] {
        assert!(listed.contains(needle), "missing {needle:?} in\n{listed}");
    }
    let added = filter::Element {
        family: IpFamily::V4,
        set: "no_endpoints",
        key: "10.96.0.99 . udp . 53".into(),
        value: Some(filter::REJECT.into()),
    };
    let removed = filter::Element {
        family: IpFamily::V4,
        set: "frontends",
        key: "10.96.0.10 . tcp . 80".into(),
        value: None,
    };
    ns.exec_with_input(&["nft", "-f", "-"], &filter::element_script(&[&removed], &[&added]))
        .expect("elements");
    ns.exec_with_input(&["nft", "-f", "-"], &filter::cluster_ips_script(&plan, IpFamily::V6)).expect("flush");
    ns.exec_with_input(&["nft", "-f", "-"], &filter::cleanup_script()).expect("cleanup");
    ns.exec_with_input(&["nft", "-f", "-"], &filter::cleanup_script()).expect("cleanup is idempotent");
}

fn config() -> NodeConfig {
    let mut c = NodeConfig::for_test("node", &["192.168.0.10", "fd00::10"], &["10.0.0.0/16", "fd00:10::/64"]);
    c.service_cidrs = vec!["10.96.0.0/16".parse().expect("cidr"), "fd00:96::/112".parse().expect("cidr")];
    c
}

/// Service `web` (LoadBalancer 198.18.0.1, NodePort `node_port`, 10.96.0.10:80 → 8080) with
/// endpoints on this node (10.0.1.x) or node2.
fn web_service(endpoints: &[&str], node_port: u16, local: bool) -> (Object, Vec<Object>) {
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "t"},
        "spec": {"type": "LoadBalancer", "clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"],
                 "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                 "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": node_port},
                           {"name": "u", "port": 80, "protocol": "UDP", "nodePort": node_port}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.1"}]}}});
    let eps: Vec<_> = endpoints
        .iter()
        .map(|e| {
            json!({"addresses": [e], "nodeName": if e.starts_with("10.0.1.") { "node" } else { "node2" },
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-4", "namespace": "t", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}, {"name": "u", "port": 8080, "protocol": "UDP"}],
        "endpoints": eps});
    let svc: Service = serde_json::from_value(svc).expect("service");
    let slice: EndpointSlice = serde_json::from_value(slice).expect("slice");
    (Object::Service(Arc::new(svc)), vec![Object::EndpointSlice(Arc::new(slice))])
}

fn store_with(services: &[(Object, Vec<Object>)]) -> (Store, NodeConfig) {
    let mut store = Store::new();
    store.handle(StoreEvent::Replace { kinds: vec![Kind::Service, Kind::EndpointSlice], objects: vec![] });
    for (svc, slices) in services {
        store.handle(StoreEvent::Apply(svc.clone()));
        for s in slices {
            store.handle(StoreEvent::Apply(s.clone()));
        }
    }
    (store, config())
}

fn planned(store: &Store, cfg: &NodeConfig) -> Plan {
    let mut planner = Planner::new();
    planner.update(store, cfg, &proxy::store::Changes { all: true, ..Default::default() });
    planner.plan().clone()
}

/// Incremental syncs of a changing service leave exactly what a full sync into a fresh
/// namespace makes; a restarted backend adopts it without changes.
#[test]
#[ignore = "needs IPVS and the dummy module: cargo xtask vm-test"]
fn incremental_syncs_match_a_full_sync_and_a_restart_adopts_them() {
    let sb = Sandbox::new("ipvs-incr").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    let fresh_ns = sb.netns("fresh").expect("netns");
    // The node's addresses, where its NodePort services live (cleanup recognises them there).
    for n in [&ns, &fresh_ns] {
        n.ip(&["link", "set", "lo", "up"]).expect("lo up");
        n.addr("lo", "192.168.0.10/32").expect("node address");
        n.addr("lo", "fd00::10/128").expect("node address");
    }
    let options =
        |ns: &Netns| BackendOptions { netns: Some(ns.name().to_owned()), ..BackendOptions::default() };
    let mut backend = build(BackendKind::Ipvs, &options(&ns)).expect("backend");
    let cfg = config();
    let mut store = Store::new();
    let mut planner = Planner::new();
    store.handle(StoreEvent::Replace { kinds: vec![Kind::Service, Kind::EndpointSlice], objects: vec![] });
    let steps: &[(&[&str], u16, bool)] = &[
        (&["10.0.1.10", "10.0.2.10"], 30080, false),
        (&["10.0.1.10", "10.0.2.10", "10.0.2.11"], 30080, false),
        (&["10.0.2.10"], 30080, true),
        (&["10.0.1.10", "10.0.2.10"], 30081, true),
        (&[], 30081, true),
        (&["10.0.1.12"], 30081, false),
    ];
    for (i, (eps, np, local)) in steps.iter().enumerate() {
        let (svc, slices) = web_service(eps, *np, *local);
        store.handle(StoreEvent::Apply(svc));
        for s in slices {
            store.handle(StoreEvent::Apply(s));
        }
        let changes = store.take_changes();
        let diff = planner.update(&store, &cfg, &changes);
        let report =
            backend.sync(planner.plan(), Some(&diff), &cfg).unwrap_or_else(|e| panic!("step {i}: {e}"));
        assert_eq!(report.full, i == 0, "step {i}");
    }
    let mut fresh = build(BackendKind::Ipvs, &options(&fresh_ns)).expect("backend");
    fresh.sync(planner.plan(), None, &cfg).expect("full sync into a fresh namespace");
    let mut here = NetlinkIpvs::open(Some(ns.name())).expect("ipvs");
    let mut there = NetlinkIpvs::open(Some(fresh_ns.name())).expect("ipvs");
    assert_eq!(table(&mut here), table(&mut there), "incremental state differs from a full sync");
    let elements = |ns: &Netns| ns.exec(&["nft", "list", "table", "ip", "ferry_ipvs"]).expect("list");
    assert_eq!(elements(&ns), elements(&fresh_ns));

    let before = table(&mut here);
    let mut restarted = build(BackendKind::Ipvs, &options(&ns)).expect("backend");
    let report = restarted.sync(planner.plan(), None, &cfg).expect("adopting full sync");
    assert_eq!(report.operations, 0, "a restart changes nothing");
    assert_eq!(table(&mut here), before);

    restarted.cleanup().expect("cleanup");
    assert!(here.services().expect("list").is_empty(), "cleanup removed every service");
    assert!(ns.ip(&["link", "show", DUMMY_IFNAME]).is_err(), "cleanup removed kube-ipvs0");
    assert!(ns.exec(&["nft", "list", "table", "ip", "ferry_ipvs"]).is_err(), "cleanup removed the table");
}

fn request(from: &Netns, to: SocketAddr, proto: Proto) -> Reply {
    from.request(proto, None, to, TIMEOUT)
        .unwrap_or_else(|e| panic!("{proto} request from {from} to {to}: {e}"))
}

/// Real traffic in the sandbox cluster (a node, pods on it and on node2, an outside host) with
/// the backend programming the node namespace.
#[test]
#[ignore = "needs IPVS and the dummy module: cargo xtask vm-test"]
fn traffic_reaches_pods_through_cluster_ip_nodeport_and_a_local_policy_load_balancer_ip() {
    let port = 8080;
    let sb = Sandbox::new("ipvs-traffic").expect("sandbox");
    let cluster =
        Cluster::build(&sb, &ClusterSpec { local_pods: 2, remote_pods: 1, responder_port: Some(port) })
            .expect("cluster");
    let node = &cluster.node;
    let cfg = NodeConfig {
        node_name: node.name.clone(),
        node_ips: node.ips().to_vec(),
        cluster_cidrs: vec![cluster.cluster_cidr4.into(), cluster.cluster_cidr6.into()],
        service_cidrs: vec![cluster.service_cidr4.into(), cluster.service_cidr6.into()],
        ..NodeConfig::default()
    };
    // The outside host reaches the LoadBalancer IP through the node.
    cluster.ext.ns.route_via("198.18.0.1/32", node.ip4.into()).expect("route to the LB IP");
    let local: Vec<String> = cluster.pods.iter().map(|p| p.ip4.to_string()).collect();
    let remote = cluster.remote_pods[0].ip4.to_string();
    let all: Vec<&str> = local.iter().map(String::as_str).chain([remote.as_str()]).collect();
    let (svc, slices) = web_service(&all, 30080, true);
    let mut store = Store::new();
    store.handle(StoreEvent::Replace { kinds: vec![Kind::Service, Kind::EndpointSlice], objects: vec![] });
    store.handle(StoreEvent::Apply(svc));
    for s in slices {
        store.handle(StoreEvent::Apply(s));
    }
    // Endpoints are on "node"/"node2" by address; the sandbox names its nodes otherwise.
    let cfg = NodeConfig { node_name: "node".into(), ..cfg };
    let mut planner = Planner::new();
    let changes = store.take_changes();
    let diff = planner.update(&store, &cfg, &changes);
    let options = BackendOptions { netns: Some(node.ns.name().to_owned()), ..BackendOptions::default() };
    let mut backend = build(BackendKind::Ipvs, &options).expect("backend");
    backend.sync(planner.plan(), Some(&diff), &cfg).expect("sync");

    let served_by = |r: &Reply| r.server.ip().to_string();
    let client = &cluster.client;
    let cluster_ip = sa("10.96.0.10:80");
    // ClusterIP from a pod: every endpoint serves over rounds, the pod's address is kept.
    for proto in [Proto::Tcp, Proto::Udp] {
        let mut seen = BTreeSet::new();
        for _ in 0..12 {
            let r = request(&client.ns, cluster_ip, proto);
            assert_eq!(r.peer.ip(), IpAddr::from(client.ip4), "{proto}: no masquerade for a pod");
            seen.insert(served_by(&r));
        }
        assert_eq!(seen.len(), all.len(), "{proto}: rr reaches every endpoint, saw {seen:?}");
    }
    // NodePort from outside under policy Local: only local endpoints, client address kept.
    let nodeport = SocketAddr::new(node.ip4.into(), 30080);
    for proto in [Proto::Tcp, Proto::Udp] {
        for _ in 0..6 {
            let r = request(&cluster.ext.ns, nodeport, proto);
            assert!(local.contains(&served_by(&r)), "{proto}: local endpoint expected, got {r:?}");
            assert_eq!(r.peer.ip(), IpAddr::from(cluster.ext.ip4), "{proto}: client address kept");
        }
    }
    // The LoadBalancer IP from a pod short-circuits to every endpoint (firewall-mark service).
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        seen.insert(served_by(&request(&client.ns, sa("198.18.0.1:80"), Proto::Tcp)));
    }
    assert!(seen.contains(&remote), "pods reach remote endpoints of a Local LB IP: {seen:?}");
    // From the node itself: masqueraded (the ClusterIP would be the source otherwise).
    let r = request(&node.ns, cluster_ip, Proto::Tcp);
    assert_ne!(r.peer.ip(), ip("10.96.0.10"), "node traffic is masqueraded: {r:?}");
    // An undefined port on the ClusterIP is refused at once; an unallocated service address
    // is dropped.
    let refused = client.ns.tcp_request(sa("10.96.0.10:81"), TIMEOUT).expect_err("port 81 is not defined");
    assert!(refused.is_refused(), "REJECT, not a timeout: {refused}");
    assert!(client.ns.tcp_request(sa("10.96.0.77:80"), Duration::from_millis(400)).is_err());

    // Policy Cluster now: outside traffic is masqueraded and reaches the remote pod too.
    let (svc, slices) = web_service(&all, 30080, false);
    store.handle(StoreEvent::Apply(svc));
    for s in slices {
        store.handle(StoreEvent::Apply(s));
    }
    let changes = store.take_changes();
    let diff = planner.update(&store, &cfg, &changes);
    assert!(!backend.sync(planner.plan(), Some(&diff), &cfg).expect("sync").full);
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        let r = request(&cluster.ext.ns, nodeport, Proto::Tcp);
        assert_ne!(r.peer.ip(), IpAddr::from(cluster.ext.ip4), "masqueraded under policy Cluster: {r:?}");
        seen.insert(served_by(&r));
    }
    assert!(seen.contains(&remote), "{seen:?}");
    backend.cleanup().expect("cleanup");
}

/// `ipvsadm -L --timeout` in `ns`: "Timeout (tcp tcpfin udp): 900 120 300".
fn ipvsadm_timeouts(ns: &Netns) -> String {
    let out =
        ns.exec(&["ipvsadm", "-L", "--timeout"]).expect("ipvsadm -L --timeout (apt-get install ipvsadm)");
    out.trim().to_owned()
}

/// The timeouts given to the backend are in the namespace after its first sync (ipvsadm reads
/// them with its own netlink code), a 0 one keeps the kernel's value, and a full sync puts back
/// what someone else changed.
#[test]
#[ignore = "needs IPVS and the dummy module: cargo xtask vm-test"]
fn timeouts_are_set_by_the_first_sync_and_repaired_by_a_full_one() {
    let sb = Sandbox::new("ipvs-timeouts").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    let mut ipvs = NetlinkIpvs::open(Some(ns.name())).expect("ipvs");
    assert_eq!(ipvs.timeouts().expect("GET_CONFIG"), Timeouts { tcp: 900, tcp_fin: 120, udp: 300 });
    assert_eq!(ipvsadm_timeouts(&ns), "Timeout (tcp tcpfin udp): 900 120 300", "a fresh namespace");

    let (store, cfg) = store_with(&[web_service(&["10.0.1.10", "10.0.2.10"], 30080, false)]);
    let plan = planned(&store, &cfg);
    let options = BackendOptions {
        netns: Some(ns.name().to_owned()),
        ipvs_timeouts: Timeouts { tcp: 3600, tcp_fin: 0, udp: 45 },
        ..BackendOptions::default()
    };
    let mut backend = build(BackendKind::Ipvs, &options).expect("backend");
    backend.sync(&plan, None, &cfg).expect("first sync");
    assert_eq!(ipvsadm_timeouts(&ns), "Timeout (tcp tcpfin udp): 3600 120 45", "tcpfin 0: unchanged");
    assert_eq!(ipvs.timeouts().expect("GET_CONFIG"), Timeouts { tcp: 3600, tcp_fin: 120, udp: 45 });
    let report = backend.sync(&plan, None, &cfg).expect("full sync");
    assert_eq!(report.operations, 0, "nothing changed: the timeouts are not sent again");

    // Drift: someone runs `ipvsadm --set 900 60 0`.
    ns.exec(&["ipvsadm", "--set", "900", "60", "0"]).expect("ipvsadm --set");
    assert_eq!(ipvsadm_timeouts(&ns), "Timeout (tcp tcpfin udp): 900 60 45");
    let report = backend.sync(&plan, None, &cfg).expect("full sync");
    assert_eq!(report.operations, 1, "one SET_CONFIG");
    assert_eq!(
        ipvsadm_timeouts(&ns),
        "Timeout (tcp tcpfin udp): 3600 60 45",
        "ferry's two are back; the FIN timeout it does not set stays as set"
    );
    backend.cleanup().expect("cleanup");
}

/// Stale services on addresses ferry owns (the node's, kube-ipvs0's) are deleted by a full
/// sync unless their address is in `excludeCIDRs`; cleanup spares those as well.
#[test]
#[ignore = "needs IPVS and the dummy module: cargo xtask vm-test"]
fn stale_services_in_excluded_cidrs_survive_a_full_sync_and_cleanup() {
    let sb = Sandbox::new("ipvs-exclude").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    ns.addr("lo", "192.168.0.10/32").expect("node address");
    ns.addr("lo", "fd00::10/128").expect("node address");
    // An IPv4-only Service: its NodePort lives on 192.168.0.10 only, outside the exclusion.
    let (store, cfg) = store_with(&[web_service(&["10.0.1.10"], 30080, false)]);
    let plan = planned(&store, &cfg);
    let options = BackendOptions {
        netns: Some(ns.name().to_owned()),
        ipvs_exclude_cidrs: vec!["fd00::/64".parse().expect("cidr")],
        ..BackendOptions::default()
    };
    let mut backend = build(BackendKind::Ipvs, &options).expect("backend");
    backend.sync(&plan, None, &cfg).expect("first sync");
    let ours = table(&mut NetlinkIpvs::open(Some(ns.name())).expect("ipvs"));

    // Another program's service on the node's IPv6 address (excluded), one on its IPv4
    // address and one left on kube-ipvs0 (both not excluded).
    let mut ipvs = NetlinkIpvs::open(Some(ns.name())).expect("ipvs");
    let foreign = ServiceKey::Addr { protocol: Protocol::Tcp, addr: ip("fd00::10"), port: 9000 };
    let stale_node = tcp("192.168.0.10", 9001);
    let stale_dummy = tcp("10.96.0.99", 80);
    let mut links = Rtnetlink::open(Some(ns.name())).expect("rtnetlink");
    links.add(ip("10.96.0.99")).expect("address on kube-ipvs0");
    ipvs.add_service(&foreign, &ServiceSpec::new("rr", IpFamily::V6, None)).expect("add");
    ipvs.add_dest(&foreign, &Dest { addr: sa("[fd00::20]:9000"), weight: 1 }).expect("add dest");
    for key in [stale_node, stale_dummy] {
        ipvs.add_service(&key, &ServiceSpec::new("rr", IpFamily::V4, None)).expect("add");
    }

    backend.sync(&plan, None, &cfg).expect("full sync");
    let mut want = ours.clone();
    want.insert(
        foreign,
        (ServiceSpec::new("rr", IpFamily::V6, None), BTreeMap::from([(sa("[fd00::20]:9000"), 1)])),
    );
    assert_eq!(table(&mut ipvs), want, "the excluded service is untouched, the other two are gone");
    let shown = ns.exec(&["ipvsadm", "-Ln"]).expect("ipvsadm -Ln");
    assert!(shown.contains("[fd00::10]:9000"), "{shown}");
    assert!(!shown.contains("192.168.0.10:9001") && !shown.contains("10.96.0.99:80"), "{shown}");

    backend.cleanup().expect("cleanup");
    assert_eq!(
        table(&mut ipvs).into_keys().collect::<Vec<_>>(),
        vec![foreign],
        "cleanup removed ferry's services and spared the excluded one"
    );
    ipvs.del_service(&foreign).expect("delete");
}
