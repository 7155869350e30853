//! Unit tests of the eBPF backend against the fake maps: what a plan compiles to, and that
//! syncs write only what changed, flip sets atomically and repair drift.

use std::net::SocketAddr;
use std::sync::Arc;

use proxy_common::{EndpointKey, FrontendKey, frontend, protocol};

use super::maps::{FakeMaps, MapTable};
use super::state::State;
use crate::model::{Protocol, ServiceKey, ServicePortName};
use crate::plan::{NodeConfig, Plan, PlanDiff, PortKey, ServicePortPlan};

fn port(name: &str, ip: &str, endpoints: &[&str]) -> ServicePortPlan {
    let eps: Vec<SocketAddr> = endpoints.iter().map(|e| e.parse().expect("endpoint")).collect();
    let name = ServicePortName {
        service: ServiceKey { namespace: "default".into(), name: name.into() },
        port: String::new(),
        protocol: Protocol::Tcp,
    };
    ServicePortPlan::cluster_ip_only(name, ip.parse().expect("ip"), 80, eps)
}

fn plan(ports: &[ServicePortPlan]) -> Plan {
    let mut plan = Plan::default();
    for p in ports {
        plan.cluster_ips.insert(p.cluster_ip);
        plan.ports.insert(PortKey { family: p.family, name: p.name.clone() }, Arc::new(p.clone()));
    }
    plan
}

fn config() -> NodeConfig {
    NodeConfig::for_test("node", &["192.168.0.10"], &["10.0.0.0/16"])
}

fn vip(ip: [u8; 4]) -> FrontendKey {
    FrontendKey::ipv4(ip, 80, protocol::TCP)
}

#[test]
fn a_cluster_ip_becomes_one_frontend_and_one_endpoint_set() {
    let p = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080"])]);
    let mut maps = FakeMaps::default();
    let mut state = State::new(251);
    state.full(&p, &config(), &mut maps).expect("sync");
    let fe = maps.services.0[&vip([10, 96, 0, 10])];
    assert_eq!(fe.count, 2);
    assert_eq!(fe.flags, frontend::MASQ_NOT_POD, "off-cluster sources are masqueraded");
    assert_eq!(maps.endpoints.0.len(), 2);
    assert!(maps.maglev.0.is_empty(), "ClusterIPs choose randomly");
    let text = super::render(&p, &config(), 251);
    assert!(text.contains("10.96.0.10:80/tcp service=1 set=1x2 flags=masq-not-pod"), "{text}");
    assert!(text.contains("set=1 index=1 10.0.2.10:8080"), "{text}");
    assert!(text.contains("10.96.0.10/32 reject"), "{text}");
    assert!(text.contains("masquerade fully-random"), "{text}");
}

#[test]
fn an_endpoint_change_writes_a_new_set_flips_the_frontend_and_deletes_the_old_set_one_sync_later() {
    let before = port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080"]);
    let other = port("db", "10.96.0.11", &["10.0.1.20:5432"]);
    let mut maps = FakeMaps::default();
    let mut state = State::new(251);
    state.full(&plan(&[before.clone(), other.clone()]), &config(), &mut maps).expect("sync");
    let old_set = maps.services.0[&vip([10, 96, 0, 10])].set;
    let db = maps.services.0[&vip([10, 96, 0, 11])];

    let after = port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080", "10.0.2.11:8080"]);
    let diff = PlanDiff { changed: vec![(Arc::new(before), Arc::new(after.clone()))], ..PlanDiff::default() };
    let p = plan(&[after, other]);
    state.partial(&p, &diff, &config(), &mut maps).expect("partial sync");
    assert_eq!(state.operations, 4, "three slots and one frontend");
    let fe = maps.services.0[&vip([10, 96, 0, 10])];
    assert_ne!(fe.set, old_set, "a changed list gets a new set id");
    assert_eq!(fe.count, 3);
    assert_eq!(maps.services.0[&vip([10, 96, 0, 11])], db, "the other service is untouched");
    assert!(
        maps.endpoints.0.contains_key(&EndpointKey { set: old_set, index: 0 }),
        "the old set stays for packets that read the frontend before the flip"
    );
    state.partial(&p, &PlanDiff::default(), &config(), &mut maps).expect("next sync");
    assert!(!maps.endpoints.0.keys().any(|k| k.set == old_set), "retired set deleted one sync later");
}

#[test]
fn a_full_sync_repairs_drift_and_a_restarted_state_adopts_the_maps_without_writing() {
    let p = plan(&[
        port("web", "10.96.0.10", &["10.0.1.10:8080"]),
        port("db", "10.96.0.11", &["10.0.1.20:5432"]),
    ]);
    let mut maps = FakeMaps::default();
    let mut state = State::new(251);
    state.full(&p, &config(), &mut maps).expect("sync");
    let good = maps.services.0.clone();

    maps.services.del(&vip([10, 96, 0, 10])).expect("drift: a frontend deleted");
    maps.services.put(&vip([10, 96, 9, 9]), &good[&vip([10, 96, 0, 11])]).expect("drift: a stray frontend");
    state.full(&p, &config(), &mut maps).expect("repair");
    assert_eq!(maps.services.0, good, "repaired");

    let mut restarted = State::new(251);
    restarted.full(&p, &config(), &mut maps).expect("sync after a restart");
    assert_eq!(restarted.operations, 0, "identical sets are adopted, frontends already right");
    assert_eq!(maps.services.0, good);
}

#[test]
fn external_frontends_use_maglev_and_policy_local_short_circuits_pods() {
    let mut p = port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080"]);
    p.node_port = Some(30080);
    p.external_policy_local = true;
    p.local_endpoints = vec!["10.0.1.10:8080".parse().expect("ep")];
    let mut maps = FakeMaps::default();
    let mut state = State::new(251);
    state.full(&plan(&[p]), &config(), &mut maps).expect("sync");
    let np = maps.services.0[&FrontendKey::from_raw(proxy_common::NODE_PORT_ADDR_V4, 30080u16.to_be(), 6)];
    assert_eq!(np.count, 1, "outside clients: local endpoints");
    assert_eq!(np.sc_count, 2, "pods and the node: cluster endpoints");
    for flag in
        [frontend::MAGLEV, frontend::NODE_PORT, frontend::SHORT_CIRCUIT_PODS, frontend::SHORT_CIRCUIT_NODE]
    {
        assert_ne!(np.flags & flag, 0, "flag {flag:#x}");
    }
    assert_eq!(np.flags & frontend::MASQ_ALWAYS, 0, "policy Local keeps the client address");
    assert_eq!(maps.maglev.0.len(), 1, "one Maglev table, for the local set");
    assert_eq!(maps.maglev.0[&np.set].size, 251);
}

#[test]
fn a_service_added_and_removed_by_diffs_leaves_the_maps_a_full_sync_would_write() {
    let web = port("web", "10.96.0.10", &["10.0.1.10:8080"]);
    let db = port("db", "10.96.0.11", &["10.0.1.20:5432"]);
    let mut maps = FakeMaps::default();
    let mut state = State::new(251);
    state.full(&plan(std::slice::from_ref(&web)), &config(), &mut maps).expect("sync");

    let both = plan(&[web.clone(), db.clone()]);
    let added = PlanDiff {
        added: vec![Arc::new(db.clone())],
        cluster_ips_changed: true,
        cluster_ips_added: vec![db.cluster_ip],
        ..PlanDiff::default()
    };
    state.partial(&both, &added, &config(), &mut maps).expect("add");
    let mut fresh = FakeMaps::default();
    State::new(251).full(&both, &config(), &mut fresh).expect("full");
    assert_eq!(maps.dst_policy.0, fresh.dst_policy.0, "the new ClusterIP rejects unknown ports");
    assert_eq!(maps.services.0.len(), fresh.services.0.len());

    let removed = PlanDiff {
        removed: vec![Arc::new(db.clone())],
        cluster_ips_changed: true,
        cluster_ips_removed: vec![db.cluster_ip],
        ..PlanDiff::default()
    };
    let only_web = plan(std::slice::from_ref(&web));
    state.partial(&only_web, &removed, &config(), &mut maps).expect("remove");
    let mut fresh = FakeMaps::default();
    State::new(251).full(&only_web, &config(), &mut fresh).expect("full");
    assert_eq!(maps.dst_policy.0, fresh.dst_policy.0, "its ClusterIP is unallocated again");
}

#[test]
fn the_frontend_filter_covers_every_frontend_and_node_port_address_and_keeps_removed_ones() {
    use proxy_common::{NODE_PORT_ADDR_V4, NODE_PORT_ADDR_V6, frontend_filter, node_addr};
    let has = |maps: &FakeMaps, addr: &[u8; 16]| {
        let (word, mask) = frontend_filter::word_and_mask(frontend_filter::bit(addr));
        maps.frontend_filter.0.get(&word).is_some_and(|w| w & mask != 0)
    };
    let web = port("web", "10.96.0.10", &["10.0.1.10:8080"]);
    let db = port("db", "10.96.0.11", &["10.0.1.20:5432"]);
    let mut maps = FakeMaps::default();
    let mut state = State::new(251);
    state.full(&plan(&[web.clone(), db]), &config(), &mut maps).expect("sync");
    assert_eq!(maps.frontend_filter.0.get(&frontend_filter::ENABLED_WORD), Some(&1), "switched on");
    let mut addrs: Vec<[u8; 16]> = maps.services.0.keys().map(|k| k.addr).collect();
    addrs.retain(|a| *a != NODE_PORT_ADDR_V4 && *a != NODE_PORT_ADDR_V6);
    addrs.extend(maps.node_addrs.0.iter().filter(|(_, f)| *f & node_addr::NODE_PORT != 0).map(|(a, _)| *a));
    assert!(addrs.len() >= 3, "two ClusterIPs and the node address: {addrs:?}");
    for a in &addrs {
        assert!(has(&maps, a), "{a:?}");
    }
    let bits: u32 = maps
        .frontend_filter
        .0
        .iter()
        .filter(|(i, _)| **i != frontend_filter::ENABLED_WORD)
        .map(|(_, w)| w.count_ones())
        .sum();
    assert_eq!(bits as usize, addrs.len(), "nothing else");
    assert_eq!(state.filter_fill(), (bits, 1 << frontend_filter::BITS_LOG2), "what the fill warning reads");

    let db_ip = super::maps::addr16("10.96.0.11".parse().expect("ip"));
    state.full(&plan(std::slice::from_ref(&web)), &config(), &mut maps).expect("db removed");
    assert!(has(&maps, &db_ip), "a removed frontend's connections may still follow CONNTRACK");

    maps.frontend_filter.0.clear();
    state.full(&plan(&[web]), &config(), &mut maps).expect("repair");
    assert!(has(&maps, &db_ip) && has(&maps, &addrs[0]), "bits lost by drift come back");
    assert_eq!(maps.frontend_filter.0.get(&frontend_filter::ENABLED_WORD), Some(&1));
}

#[test]
fn the_service_cidrs_are_listed_for_the_filter_which_stays_off_when_they_do_not_fit() {
    use proxy_common::frontend_filter::{self as ff, ENABLED_WORD};
    let web = port("web", "10.96.0.10", &["10.0.1.10:8080"]);
    let mut p = plan(&[web]);
    p.service_cidrs = vec!["10.96.0.0/16".parse().expect("cidr"), "fd00:96::/112".parse().expect("cidr")];
    let mut maps = FakeMaps::default();
    let mut state = State::new(251);
    state.full(&p, &config(), &mut maps).expect("sync");
    let list = maps.service_cidrs.0;
    assert_eq!(list.count, 2);
    for (slot, net) in list.cidrs.iter().zip(&p.service_cidrs) {
        let (len, addr) = super::maps::cidr(net);
        assert_eq!(*slot, ff::cidr_words(&addr, len), "{net}");
    }
    let enabled = |maps: &FakeMaps| maps.frontend_filter.0.get(&ENABLED_WORD).copied().unwrap_or(0);
    assert_eq!(enabled(&maps), 1);
    let text = super::maps::dump(&mut maps).expect("dump");
    assert!(text.contains("# SERVICE_CIDRS\n10.96.0.0/16\nfd00:96::/112\n"), "{text}");

    p.service_cidrs = (0..9u8).map(|i| format!("10.{}.0.0/16", 100 + i).parse().expect("cidr")).collect();
    let diff = PlanDiff { service_cidrs_changed: true, ..PlanDiff::default() };
    state.partial(&p, &diff, &config(), &mut maps).expect("nine service CIDRs");
    assert_eq!(enabled(&maps), 0, "more service CIDRs than the list holds: off at once");
    state.full(&p, &config(), &mut maps).expect("full");
    assert_eq!(enabled(&maps), 0, "and it stays off");
    p.service_cidrs.truncate(1);
    state.full(&p, &config(), &mut maps).expect("one service CIDR again");
    assert_eq!((enabled(&maps), maps.service_cidrs.0.count), (1, 1));

    maps.service_cidrs.0 = proxy_common::ServiceCidrs::default();
    state.full(&p, &config(), &mut maps).expect("repair");
    assert_eq!(maps.service_cidrs.0.count, 1, "a lost list comes back");
}

#[test]
fn a_restart_rebuilds_the_frontend_filter_keeping_the_bits_of_live_connections() {
    use proxy_common::frontend_filter;
    let has = |maps: &FakeMaps, ip: &str| {
        let addr = super::maps::addr16(ip.parse().expect("ip"));
        let (word, mask) = frontend_filter::word_and_mask(frontend_filter::bit(&addr));
        maps.frontend_filter.0.get(&word).is_some_and(|w| w & mask != 0)
    };
    let ports = [
        port("web", "10.96.0.10", &["10.0.1.10:8080"]),
        port("db", "10.96.0.11", &["10.0.1.20:5432"]),
        port("cache", "10.96.0.12", &["10.0.1.30:6379"]),
    ];
    let mut maps = FakeMaps::default();
    State::new(251).full(&plan(&ports), &config(), &mut maps).expect("sync");
    // While ferry is down, web and db are deleted; a client still talks to web.
    maps.connections.push(super::maps::addr16("10.96.0.10".parse().expect("ip")));
    let mut restarted = State::new(251);
    restarted.full(&plan(&ports[2..]), &config(), &mut maps).expect("sync after the restart");
    assert!(has(&maps, "10.96.0.10"), "a live connection's frontend keeps its bit");
    assert!(!has(&maps, "10.96.0.11"), "a deleted frontend without connections loses it");
    assert!(has(&maps, "10.96.0.12"));
    let words = maps.frontend_filter.0.clone();
    maps.connections.clear();
    restarted.full(&plan(&ports[2..]), &config(), &mut maps).expect("the next full sync");
    assert_eq!(maps.frontend_filter.0, words, "rebuilt at the start only: the bit stays");
}
