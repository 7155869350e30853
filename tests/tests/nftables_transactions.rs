//! Every transaction the nftables backend emits is accepted by the kernel, in any order of plan
//! changes, and leaves exactly the state a fresh full sync would: a randomized sequence of
//! services (endpoint counts, policies, NodePorts, LoadBalancer IPs with source ranges, shared
//! external IPs, session affinity, IPv4 and IPv6) is applied incrementally in a sandbox
//! namespace, and the kernel's element counts are compared with a from-scratch compile.
//! Needs root: `cargo xtask test -p ferry-sandbox -- nftables_transactions`.

use std::collections::BTreeMap;

use ferry_sandbox::{Netns, Sandbox};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proxy::backend::{BackendKind, BackendOptions, build};
use proxy::model::Kind;
use proxy::plan::{NodeConfig, Planner};
use proxy::store::{Object, Store, StoreEvent};
use serde_json::json;

/// xorshift: deterministic, so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn config() -> NodeConfig {
    let mut c = NodeConfig::for_test("node", &["192.168.0.10", "fd00::10"], &["10.0.0.0/16", "fd00:10::/64"]);
    c.service_cidrs = vec!["10.96.0.0/16".parse().expect("cidr"), "fd00:96::/112".parse().expect("cidr")];
    c
}

fn service(i: u64, rng: &mut Rng) -> (Object, Vec<Object>) {
    let kind = ["ClusterIP", "NodePort", "LoadBalancer"][rng.below(3) as usize];
    let dual = rng.below(3) == 0;
    let protocol = ["TCP", "UDP", "SCTP"][rng.below(3) as usize];
    let mut spec = json!({
        "type": kind,
        "clusterIPs": if dual { json!([format!("10.96.1.{i}"), format!("fd00:96::1:{i}")]) } else { json!([format!("10.96.1.{i}")]) },
        "ipFamilies": if dual { json!(["IPv4", "IPv6"]) } else { json!(["IPv4"]) },
        "ports": [{"name": "p", "port": 80, "protocol": protocol,
                   "nodePort": if kind == "ClusterIP" { json!(null) } else { json!(30000 + i) }}],
        "externalTrafficPolicy": if rng.below(2) == 0 { "Local" } else { "Cluster" },
        "internalTrafficPolicy": if rng.below(4) == 0 { "Local" } else { "Cluster" },
    });
    if rng.below(4) == 0 {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 60 + rng.below(3) * 60}});
    }
    if rng.below(3) == 0 {
        // A small pool, so two services often claim the same external IP and port.
        spec["externalIPs"] = json!([format!("203.0.113.{}", rng.below(3))]);
    }
    if kind == "LoadBalancer" && rng.below(2) == 0 {
        spec["loadBalancerSourceRanges"] = json!(["198.51.100.0/24", "192.0.2.0/25"]);
    }
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("s{i}"), "namespace": "t"},
        "spec": spec, "status": {"loadBalancer": {"ingress": [{"ip": format!("198.18.0.{i}")}]}}});
    let svc: Service = serde_json::from_value(svc).expect("service");
    let mut slices = vec![];
    for (family, fmt) in [("IPv4", 4), ("IPv6", 6)] {
        let n = rng.below(5);
        let eps: Vec<_> = (0..n)
            .map(|e| {
                let ip = if fmt == 4 {
                    format!("10.0.{}.{}", 1 + e % 2, 10 + i * 5 + e)
                } else {
                    format!("fd00:10::{}:{}", 1 + e % 2, 10 + i * 5 + e)
                };
                let terminating = rng.below(5) == 0;
                json!({"addresses": [ip], "nodeName": if e % 2 == 0 { "node" } else { "node2" },
                       "conditions": {"ready": !terminating, "serving": true, "terminating": terminating}})
            })
            .collect();
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("s{i}-{fmt}"), "namespace": "t", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": family, "ports": [{"name": "p", "port": 8080, "protocol": svc.spec.as_ref().and_then(|s| s.ports.as_ref()).and_then(|p| p[0].protocol.clone())}],
            "endpoints": eps});
        let slice: EndpointSlice = serde_json::from_value(slice).expect("slice");
        slices.push(Object::EndpointSlice(std::sync::Arc::new(slice)));
    }
    (Object::Service(std::sync::Arc::new(svc)), slices)
}

/// Element counts per set of ferry's tables, as the kernel holds them.
fn kernel_counts(ns: &Netns) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for fam in ["ip", "ip6"] {
        let json = ns.exec(&["nft", "-j", "list", "table", fam, "ferry"]).expect("list table");
        let doc: serde_json::Value = serde_json::from_str(&json).expect("nft json");
        for item in doc["nftables"].as_array().expect("array") {
            for kind in ["set", "map"] {
                if let Some(set) = item.get(kind) {
                    let name = set["name"].as_str().expect("name");
                    // Affinity sets are filled by traffic, not by ferry.
                    if name.starts_with("aff_") {
                        continue;
                    }
                    let n = set.get("elem").and_then(|e| e.as_array()).map_or(0, Vec::len);
                    out.insert(format!("{fam} {name}"), n);
                }
            }
        }
    }
    out
}

fn chains(ns: &Netns) -> Vec<String> {
    let mut v: Vec<String> = ["ip", "ip6"]
        .iter()
        .flat_map(|fam| {
            let out = ns.exec(&["nft", "-t", "list", "table", fam, "ferry"]).expect("list");
            out.lines()
                .filter_map(|l| {
                    l.trim().strip_prefix("chain ").map(|c| format!("{fam} {}", c.trim_end_matches(" {")))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn random_incremental_syncs_are_accepted_and_match_a_full_sync() {
    for seed in [0x5eed_f00d_1234_5678, 0x0123_4567_89ab_cdef, 0xdead_beef_cafe_f00d] {
        replay(seed);
    }
}

fn replay(seed: u64) {
    let sb = Sandbox::new("nft-tx").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    let scratch = sb.netns("fresh").expect("netns");
    let cfg = config();
    let options = BackendOptions { netns: Some(ns.name().to_owned()), ..BackendOptions::default() };
    let mut backend = build(BackendKind::Nftables, &options).expect("backend");
    let mut store = Store::new();
    let mut planner = Planner::new();
    let mut rng = Rng(seed);
    let mut live: BTreeMap<u64, (Object, Vec<Object>)> = BTreeMap::new();
    store.handle(StoreEvent::Replace { kinds: vec![Kind::Service, Kind::EndpointSlice], objects: vec![] });

    for step in 0..60 {
        let i = rng.below(12);
        if live.contains_key(&i) && rng.below(3) == 0 {
            let (svc, slices) = live.remove(&i).expect("present");
            store.handle(StoreEvent::Delete(svc.object_ref()));
            for s in slices {
                store.handle(StoreEvent::Delete(s.object_ref()));
            }
        } else {
            let (svc, slices) = service(i, &mut rng);
            store.handle(StoreEvent::Apply(svc.clone()));
            for s in &slices {
                store.handle(StoreEvent::Apply(s.clone()));
            }
            live.insert(i, (svc, slices));
        }
        let changes = store.take_changes();
        let diff = planner.update(&store, &cfg, &changes);
        // (No table before the first sync.)
        let before = if step == 0 { BTreeMap::new() } else { rule_handles(&ns) };
        let report = backend
            .sync(planner.plan(), Some(&diff), &cfg)
            .unwrap_or_else(|e| panic!("seed {seed:#x} step {step}: the kernel refused a transaction: {e}"));
        assert!(step == 0 || !report.full, "step {step}: expected a partial sync");
        // A partial sync creates and deletes chains but never rewrites one in place: a new
        // connection running a rewritten chain may find no endpoint.
        for (chain, now) in rule_handles(&ns) {
            if let Some(was) = before.get(&chain) {
                assert_eq!(was, &now, "seed {seed:#x} step {step}: {chain} was rewritten");
            }
        }
    }

    // The same plan, compiled from scratch into an empty namespace, must give the same state.
    let mut fresh = build(
        BackendKind::Nftables,
        &BackendOptions { netns: Some(scratch.name().to_owned()), ..BackendOptions::default() },
    )
    .expect("backend");
    fresh.sync(planner.plan(), None, &cfg).expect("full sync into a fresh namespace");
    // Partial syncs keep endpoint slots that emptied (the next full sync prunes them), so
    // compare what is filled.
    let filled = |m: BTreeMap<String, usize>| -> BTreeMap<String, usize> {
        m.into_iter().filter(|(_, n)| *n > 0).collect()
    };
    assert_eq!(
        filled(kernel_counts(&ns)),
        filled(kernel_counts(&scratch)),
        "incremental state differs from a full sync"
    );

    // A restarted ferry (a new backend) adopts the table: its full sync is accepted and removes
    // nothing it still wants; chains no longer wanted are gone.
    let mut restarted = build(BackendKind::Nftables, &options).expect("backend");
    restarted.sync(planner.plan(), None, &cfg).expect("full sync over an existing table");
    assert_eq!(kernel_counts(&ns), kernel_counts(&scratch));
    assert_eq!(chains(&ns), chains(&scratch), "stale chains were not removed");

    restarted.cleanup().expect("cleanup");
    let left = ns.exec(&["nft", "list", "tables"]).expect("list tables");
    assert!(!left.contains("ferry"), "cleanup left {left}");
}

/// Handles of the rules in each chain of ferry's tables: a rewritten rule gets a new handle.
fn rule_handles(ns: &Netns) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for fam in ["ip", "ip6"] {
        let json = ns.exec(&["nft", "-a", "-j", "list", "table", fam, "ferry"]).expect("list table");
        let doc: serde_json::Value = serde_json::from_str(&json).expect("nft json");
        for item in doc["nftables"].as_array().expect("array") {
            if let Some(rule) = item.get("rule") {
                let chain = rule["chain"].as_str().expect("chain");
                let handle = rule["handle"].as_u64().expect("handle");
                out.entry(format!("{fam} {chain}")).or_default().push(handle);
            }
        }
    }
    out
}

/// Pick, slot and affinity chains: the ones whose rules choose an endpoint.
fn chooses_endpoints(chain: &str) -> bool {
    let name = chain.split_once(' ').map_or(chain, |(_, n)| n);
    name.starts_with("pick_") || name.starts_with("aff") || name.contains("_ep_")
}

/// A full sync rewrites the static chains (which repairs the hooks) but leaves the chains that
/// choose endpoints as they are: rewriting one while traffic flows made a new connection now
/// and then find no endpoint (`e2e repeated_full_syncs_lose_no_connection`). That holds for a
/// periodic full sync and for the first one of a restarted ferry adopting the table: the names
/// of those chains say what they hold.
#[test]
fn neither_a_full_sync_nor_a_restart_rewrites_the_chains_that_choose_endpoints() {
    let sb = Sandbox::new("nft-keep").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    let cfg = config();
    let options = BackendOptions { netns: Some(ns.name().to_owned()), ..BackendOptions::default() };
    let mut backend = build(BackendKind::Nftables, &options).expect("backend");
    let mut store = Store::new();
    let mut planner = Planner::new();
    let mut rng = Rng(0x6b65_6570_6368_6169);
    let mut objects = Vec::new();
    for i in 0..12 {
        let (svc, slices) = service(i, &mut rng);
        objects.push(svc);
        objects.extend(slices);
    }
    store.handle(StoreEvent::Replace { kinds: vec![Kind::Service, Kind::EndpointSlice], objects });
    let changes = store.take_changes();
    planner.update(&store, &cfg, &changes);
    backend.sync(planner.plan(), None, &cfg).expect("first full sync");
    let first = rule_handles(&ns);
    let dynamic: Vec<&String> = first.keys().filter(|c| chooses_endpoints(c)).collect();
    assert!(
        dynamic.iter().any(|c| c.contains("pick_"))
            && dynamic.iter().any(|c| c.contains("_ep_"))
            && dynamic.iter().any(|c| c.contains("affh_")),
        "the services should need pick, slot and affinity chains: {dynamic:?}"
    );

    let report = backend.sync(planner.plan(), None, &cfg).expect("periodic full sync");
    assert!(report.full);
    let second = rule_handles(&ns);
    for (chain, handles) in &first {
        let now = second.get(chain).unwrap_or_else(|| panic!("{chain} is gone"));
        if chooses_endpoints(chain) {
            assert_eq!(handles, now, "{chain} was rewritten by a periodic full sync");
        } else {
            assert_ne!(handles, now, "{chain} was not rewritten: a deleted rule would stay deleted");
        }
    }

    let mut restarted = build(BackendKind::Nftables, &options).expect("backend");
    restarted.sync(planner.plan(), None, &cfg).expect("full sync over an existing table");
    let third = rule_handles(&ns);
    assert_eq!(
        second.keys().collect::<Vec<_>>(),
        third.keys().collect::<Vec<_>>(),
        "a restart changed the set of chains"
    );
    for (chain, handles) in &second {
        if chooses_endpoints(chain) {
            assert_eq!(Some(handles), third.get(chain), "{chain} was rewritten by a restarted ferry");
        } else {
            assert_ne!(Some(handles), third.get(chain), "{chain} was not rewritten by a restarted ferry");
        }
    }
    restarted.cleanup().expect("cleanup");
}

/// The elements of one set of ferry's IPv4 table, as nft lists them.
fn set_elements(ns: &Netns, set: &str) -> String {
    let out = ns.exec(&["nft", "list", "set", "ip", "ferry", set]).expect("list set");
    out.lines().filter(|l| l.contains("elements")).collect::<Vec<_>>().join("\n")
}

/// A full sync gives the interval sets only their changes, but `pod_cidrs` and `service_cidrs`
/// are `auto-merge` sets: two adjacent prefixes are one range in the kernel, from which nft
/// cannot delete one of them. A change of the list is accepted and leaves exactly the new one.
#[test]
fn a_changed_cluster_cidr_list_replaces_merged_ranges() {
    let sb = Sandbox::new("nft-merged").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    let options = BackendOptions { netns: Some(ns.name().to_owned()), ..BackendOptions::default() };
    let mut backend = build(BackendKind::Nftables, &options).expect("backend");
    let store = Store::new();
    let mut planner = Planner::new();
    let cidrs = |list: &[&str]| NodeConfig::for_test("node", &["192.168.0.10"], list);
    let steps: [(&[&str], &str); 3] = [
        (&["10.1.0.0/16", "10.2.0.0/16"], "10.1.0.0-10.2.255.255"),
        (&["10.1.0.0/16"], "10.1.0.0/16"),
        (&["10.1.0.0/16", "10.2.0.0/16", "10.4.0.0/16"], "10.1.0.0-10.2.255.255, 10.4.0.0/16"),
    ];
    for (list, listed) in steps {
        let cfg = cidrs(list);
        planner.update(&store, &cfg, &Default::default());
        let report = backend
            .sync(planner.plan(), None, &cfg)
            .unwrap_or_else(|e| panic!("full sync with {list:?}: {e}"));
        assert!(report.full);
        let elements = set_elements(&ns, "pod_cidrs");
        assert!(
            elements.contains(&format!("{{ {listed} }}")),
            "cluster CIDRs {list:?}: pod_cidrs holds {elements}"
        );
    }
    backend.cleanup().expect("cleanup");
}

/// Periodic full syncs give the interval sets only their changes, from what ferry remembers,
/// so they leave a hand edit of them alone; a restarted ferry reads them back and repairs it.
#[test]
fn a_restart_reads_the_interval_sets_back_and_repairs_a_hand_edit() {
    let sb = Sandbox::new("nft-readback").expect("sandbox");
    let ns = sb.netns("node").expect("netns");
    let options = BackendOptions { netns: Some(ns.name().to_owned()), ..BackendOptions::default() };
    let mut backend = build(BackendKind::Nftables, &options).expect("backend");
    let store = Store::new();
    let mut planner = Planner::new();
    let cfg = NodeConfig::for_test("node", &["192.168.0.10"], &["10.0.0.0/16"]);
    planner.update(&store, &cfg, &Default::default());
    backend.sync(planner.plan(), None, &cfg).expect("first full sync");
    assert!(set_elements(&ns, "pod_cidrs").contains("{ 10.0.0.0/16 }"));
    let stray = "198.18.0.9 . tcp . 80 . 10.9.0.0-10.9.0.5";
    ns.exec(&["nft", "delete", "element", "ip", "ferry", "pod_cidrs", "{ 10.0.0.0/16 }"])
        .expect("hand delete");
    ns.exec(&["nft", "add", "element", "ip", "ferry", "firewall_allow", &format!("{{ {stray} }}")])
        .expect("hand add");

    backend.sync(planner.plan(), None, &cfg).expect("periodic full sync");
    assert_eq!(set_elements(&ns, "pod_cidrs"), "", "a periodic full sync rewrote pod_cidrs");
    assert!(set_elements(&ns, "firewall_allow").contains("10.9.0.0-10.9.0.5"));

    let mut restarted = build(BackendKind::Nftables, &options).expect("backend");
    restarted.sync(planner.plan(), None, &cfg).expect("full sync of a restarted ferry");
    assert!(set_elements(&ns, "pod_cidrs").contains("{ 10.0.0.0/16 }"), "pod_cidrs not repaired");
    assert_eq!(set_elements(&ns, "firewall_allow"), "", "the hand-added element stayed");
    restarted.cleanup().expect("cleanup");
}
