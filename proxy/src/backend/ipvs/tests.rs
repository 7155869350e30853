//! Unit tests of the IPVS backend: what each kind of service port compiles to, and that syncs
//! over in-memory IPVS, `kube-ipvs0` and nft do only what changed, drain real servers, repair
//! drift and adopt what a previous run left.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use super::address::{FakeAddresses, ServiceAddresses};
use super::compile::{self, Context, Output};
use super::filter;
use super::kernel::{FakeIpvs, Ipvs};
use super::netlink::{Dest, DestStatus, Service, ServiceKey, ServiceSpec, Timeouts};
use super::socket::SocketError;
use super::{IpvsBackend, IpvsOptions};
use crate::backend::Backend;
use crate::backend::nftables::{NftError, NftRunner};
use crate::model::{IpFamily, Protocol, ServiceKey as SvcKey, ServicePortName};
use crate::plan::{NodeConfig, Plan, PlanDiff, PortKey, ServicePortPlan};

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn port(name: &str, cluster_ip: &str, endpoints: &[&str]) -> ServicePortPlan {
    let eps: Vec<SocketAddr> = endpoints.iter().map(|e| sa(e)).collect();
    let name = ServicePortName {
        service: SvcKey { namespace: "default".into(), name: name.into() },
        port: String::new(),
        protocol: Protocol::Tcp,
    };
    ServicePortPlan::cluster_ip_only(name, ip(cluster_ip), 80, eps)
}

fn key(p: &ServicePortPlan) -> PortKey {
    PortKey { family: p.family, name: p.name.clone() }
}

fn plan(ports: &[ServicePortPlan]) -> Plan {
    let mut plan = Plan::default();
    for p in ports {
        plan.cluster_ips.insert(p.cluster_ip);
        plan.ports.insert(key(p), Arc::new(p.clone()));
    }
    plan.service_cidrs = vec!["10.96.0.0/16".parse().expect("cidr")];
    plan
}

fn config() -> NodeConfig {
    NodeConfig::for_test("node", &["192.168.0.10", "fd00::10"], &["10.0.0.0/16"])
}

fn compiled(p: &ServicePortPlan, mark: Option<u32>) -> Output {
    let nodeport_ips = config().nodeport_ips(p.family);
    compile::compile(p, Context { scheduler: "rr", nodeport_ips: &nodeport_ips }, mark)
}

fn tcp(addr: &str, port: u16) -> ServiceKey {
    ServiceKey::Addr { protocol: Protocol::Tcp, addr: ip(addr), port }
}

fn elements(out: &Output) -> Vec<String> {
    out.elements
        .iter()
        .map(|e| match &e.value {
            Some(v) => format!("{} {} : {v}", e.set, e.key),
            None => format!("{} {}", e.set, e.key),
        })
        .collect()
}

fn dests(out: &Output, key: &ServiceKey) -> Vec<(SocketAddr, u32)> {
    let s = out.services.iter().find(|s| s.key == *key).unwrap_or_else(|| panic!("no {key} in {out:?}"));
    s.dests.iter().map(|d| (d.addr, d.weight)).collect()
}

#[test]
fn a_cluster_ip_is_one_virtual_service_with_its_endpoints_and_its_address_on_the_dummy() {
    let out = compiled(&port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080"]), None);
    assert_eq!(out.services.len(), 1);
    assert_eq!(out.services[0].spec, ServiceSpec::new("rr", IpFamily::V4, None));
    assert_eq!(
        dests(&out, &tcp("10.96.0.10", 80)),
        vec![(sa("10.0.1.10:8080"), 1), (sa("10.0.2.10:8080"), 1)]
    );
    assert_eq!(out.addresses, vec![ip("10.96.0.10")]);
    assert_eq!(elements(&out), vec!["frontends 10.96.0.10 . tcp . 80"]);
}

#[test]
fn without_endpoints_a_cluster_ip_rejects_and_gets_no_virtual_service() {
    let out = compiled(&port("web", "10.96.0.10", &[]), None);
    assert!(out.services.is_empty());
    assert_eq!(out.addresses, vec![ip("10.96.0.10")]);
    assert_eq!(elements(&out), vec!["no_endpoints 10.96.0.10 . tcp . 80 : goto reject_chain"]);
}

#[test]
fn internal_policy_local_without_a_local_endpoint_drops_and_with_one_uses_only_it() {
    let mut p = port("web", "10.96.0.10", &["10.0.2.10:8080"]);
    p.internal_policy_local = true;
    assert_eq!(elements(&compiled(&p, None)), vec!["no_endpoints 10.96.0.10 . tcp . 80 : drop"]);
    p.cluster_endpoints.push(sa("10.0.1.10:8080"));
    p.local_endpoints = vec![sa("10.0.1.10:8080")];
    assert_eq!(dests(&compiled(&p, None), &tcp("10.96.0.10", 80)), vec![(sa("10.0.1.10:8080"), 1)]);
}

#[test]
fn a_nodeport_under_policy_cluster_is_a_service_on_each_node_address_and_masquerades() {
    let mut p = port("web", "10.96.0.10", &["10.0.1.10:8080"]);
    p.node_port = Some(30080);
    let out = compiled(&p, None);
    let keys: Vec<ServiceKey> = out.services.iter().map(|s| s.key).collect();
    assert_eq!(keys, vec![tcp("10.96.0.10", 80), tcp("192.168.0.10", 30080)], "the IPv4 node address only");
    assert_eq!(out.addresses, vec![ip("10.96.0.10")], "node addresses are not put on the dummy");
    assert!(elements(&out).contains(&"ext_masq 192.168.0.10 . tcp . 30080".to_owned()));
}

#[test]
fn policy_local_gets_local_endpoints_for_outsiders_and_a_mark_service_with_all_of_them_for_pods() {
    let mut p = port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080"]);
    p.load_balancer_ips = vec![ip("198.18.0.1")];
    p.external_policy_local = true;
    p.local_endpoints = vec![sa("10.0.1.10:8080")];
    let nodeport_ips = config().nodeport_ips(IpFamily::V4);
    assert!(compile::needs_mark(&p, &nodeport_ips));
    let mark = compile::MARK_BASE + 5;
    let out = compiled(&p, Some(mark));
    assert_eq!(dests(&out, &tcp("198.18.0.1", 80)), vec![(sa("10.0.1.10:8080"), 1)]);
    let fw = ServiceKey::FwMark { family: IpFamily::V4, mark };
    assert_eq!(dests(&out, &fw), vec![(sa("10.0.1.10:8080"), 1), (sa("10.0.2.10:8080"), 1)]);
    let els = elements(&out);
    assert!(els.contains(&"ext_local 198.18.0.1 . tcp . 80".to_owned()), "{els:?}");
    assert!(els.contains(&format!("sc_marks 198.18.0.1 . tcp . 80 : {mark:#x}")), "{els:?}");
    assert!(!els.iter().any(|e| e.starts_with("ext_masq")), "no masquerade: the client address is kept");
    assert_eq!(out.addresses, vec![ip("10.96.0.10"), ip("198.18.0.1")]);
}

#[test]
fn policy_local_without_a_local_endpoint_drops_outsiders_but_keeps_the_short_circuit() {
    let mut p = port("web", "10.96.0.10", &["10.0.2.10:8080"]);
    p.node_port = Some(30080);
    p.external_policy_local = true;
    let out = compiled(&p, Some(compile::MARK_BASE));
    let keys: Vec<ServiceKey> = out.services.iter().map(|s| s.key).collect();
    assert_eq!(
        keys,
        vec![tcp("10.96.0.10", 80), ServiceKey::FwMark { family: IpFamily::V4, mark: compile::MARK_BASE }],
        "no address service for the NodePort"
    );
    assert!(elements(&out).contains(&"no_local 192.168.0.10 . tcp . 30080".to_owned()));
}

#[test]
fn external_frontends_without_endpoints_reject() {
    let mut p = port("web", "10.96.0.10", &[]);
    p.external_ips = vec![ip("203.0.113.1")];
    p.node_port = Some(30080);
    let els = elements(&compiled(&p, None));
    assert!(els.contains(&"no_endpoints 203.0.113.1 . tcp . 80 : goto reject_chain".to_owned()));
    assert!(els.contains(&"no_endpoints 192.168.0.10 . tcp . 30080 : goto reject_chain".to_owned()));
}

#[test]
fn source_ranges_guard_load_balancer_ips_only() {
    let mut p = port("web", "10.96.0.10", &["10.0.1.10:8080"]);
    p.load_balancer_ips = vec![ip("198.18.0.1")];
    p.node_port = Some(30080);
    p.source_ranges =
        vec!["198.51.100.0/24".parse().expect("cidr"), "198.51.100.0/25".parse().expect("cidr")];
    let els = elements(&compiled(&p, None));
    let fw: Vec<&String> = els.iter().filter(|e| e.starts_with("firewall")).collect();
    assert_eq!(
        fw,
        vec!["firewall_allow 198.18.0.1 . tcp . 80 . 198.51.100.0/24", "firewall 198.18.0.1 . tcp . 80"]
    );
}

#[test]
fn client_ip_affinity_is_persistence_with_the_timeout_and_a_host_netmask() {
    let mut p = port("web", "fd00:96::10", &["[fd00:10::1:10]:8080"]);
    p.affinity_timeout = Some(10800);
    let out = compiled(&p, None);
    assert_eq!(out.services[0].spec.persistent(), Some(10800));
    assert_eq!(out.services[0].spec.netmask, 128u32.to_ne_bytes(), "/128 for IPv6");
    let mut p = port("web", "10.96.0.10", &["10.0.1.10:8080"]);
    p.affinity_timeout = Some(60);
    assert_eq!(compiled(&p, None).services[0].spec.netmask, [255; 4], "/32 for IPv4");
}

#[test]
fn terminating_endpoints_stay_with_weight_zero_and_hairpin_addresses_are_listed() {
    let mut p = port("web", "10.96.0.10", &["10.0.1.10:8080"]);
    p.serving_endpoints.push(sa("10.0.1.11:8080"));
    p.hairpin_ips = vec![ip("10.0.1.10")];
    let out = compiled(&p, None);
    assert_eq!(
        dests(&out, &tcp("10.96.0.10", 80)),
        vec![(sa("10.0.1.10:8080"), 1), (sa("10.0.1.11:8080"), 0)]
    );
    assert!(elements(&out).contains(&"hairpin 10.0.1.10 . 10.0.1.10".to_owned()));
}

#[test]
fn the_table_rejects_drops_marks_and_masquerades_where_ipvs_cannot() {
    let text = filter::full_script(IpFamily::V4, &config(), &[]);
    for rule in [
        "add table ip ferry_ipvs\ndelete table ip ferry_ipvs\n",
        "type filter hook prerouting priority -140; policy accept;",
        "type filter hook output priority -140; policy accept;",
        "ip daddr . meta l4proto . th dport vmap @no_endpoints",
        "ip saddr @pod_cidrs ip daddr . meta l4proto . th dport @ext_local meta mark set ip daddr . meta l4proto . th dport map @sc_marks return",
        "ip daddr . meta l4proto . th dport @no_local drop",
        "ip daddr @cluster_ips ip saddr != @pod_cidrs ct mark set ct mark | 0x4000",
        "ip daddr . meta l4proto . th dport @ext_masq ct mark set ct mark | 0x4000",
        "ip daddr @cluster_ips goto reject_chain",
        "ip daddr @service_cidrs drop",
        "ct mark & 0x4000 == 0x4000 masquerade fully-random",
        "ip saddr . ip daddr @hairpin masquerade fully-random",
        "ip daddr . meta l4proto . th dport @firewall ip daddr . meta l4proto . th dport . ip saddr != @firewall_allow drop",
    ] {
        assert!(text.contains(rule), "missing {rule:?} in\n{text}");
    }
    let mut all = config();
    all.masquerade_all = true;
    let text = filter::full_script(IpFamily::V6, &all, &[]);
    assert!(text.contains("ip6 daddr @cluster_ips ct mark set ct mark | 0x4000"), "{text}");
    assert!(!text.contains("ip6 saddr @pod_cidrs"), "no IPv6 detector configured:\n{text}");
}

#[test]
fn element_changes_delete_before_they_add() {
    let old = filter::Element {
        family: IpFamily::V4,
        set: "no_endpoints",
        key: "10.96.0.10 . tcp . 80".into(),
        value: Some("drop".into()),
    };
    let new = filter::Element {
        family: IpFamily::V6,
        set: "frontends",
        key: "fd00::1 . udp . 53".into(),
        value: None,
    };
    assert_eq!(
        filter::element_script(&[&old], &[&new]),
        "delete element ip ferry_ipvs no_endpoints { 10.96.0.10 . tcp . 80 }\nadd element ip6 ferry_ipvs frontends { fd00::1 . udp . 53 }\n"
    );
}

// ---- the backend over fakes ----

/// A fake shared between the backend and the test.
#[derive(Default)]
struct Shared<T>(Arc<Mutex<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Shared<T> {
    fn get(&self) -> std::sync::MutexGuard<'_, T> {
        self.0.lock().expect("lock")
    }
}

impl Ipvs for Shared<FakeIpvs> {
    fn services(&mut self) -> Result<Vec<Service>, SocketError> {
        self.get().services()
    }
    fn dests(&mut self, key: &ServiceKey) -> Result<Vec<DestStatus>, SocketError> {
        self.get().dests(key)
    }
    fn add_service(&mut self, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), SocketError> {
        self.get().add_service(key, spec)
    }
    fn edit_service(&mut self, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), SocketError> {
        self.get().edit_service(key, spec)
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), SocketError> {
        self.get().del_service(key)
    }
    fn add_dest(&mut self, key: &ServiceKey, dest: &Dest) -> Result<(), SocketError> {
        self.get().add_dest(key, dest)
    }
    fn edit_dest(&mut self, key: &ServiceKey, dest: &Dest) -> Result<(), SocketError> {
        self.get().edit_dest(key, dest)
    }
    fn del_dest(&mut self, key: &ServiceKey, addr: &SocketAddr) -> Result<(), SocketError> {
        self.get().del_dest(key, addr)
    }
    fn timeouts(&mut self) -> Result<Timeouts, SocketError> {
        self.get().timeouts()
    }
    fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), SocketError> {
        self.get().set_timeouts(timeouts)
    }
}

impl ServiceAddresses for Shared<FakeAddresses> {
    fn ensure_link(&mut self) -> Result<(), SocketError> {
        self.get().ensure_link()
    }
    fn addresses(&mut self) -> Result<std::collections::BTreeSet<IpAddr>, SocketError> {
        self.get().addresses()
    }
    fn add(&mut self, ip: IpAddr) -> Result<(), SocketError> {
        self.get().add(ip)
    }
    fn del(&mut self, ip: IpAddr) -> Result<(), SocketError> {
        self.get().del(ip)
    }
    fn remove_link(&mut self) -> Result<bool, SocketError> {
        self.get().remove_link()
    }
    fn local_addresses(&mut self) -> Result<std::collections::BTreeSet<IpAddr>, SocketError> {
        self.get().local_addresses()
    }
}

/// Records the scripts given to nft; rejects the next one while the flag is set.
#[derive(Default)]
struct Scripts(Vec<String>, bool);

impl NftRunner for Shared<Scripts> {
    fn apply(&mut self, script: &str) -> Result<(), NftError> {
        let mut scripts = self.get();
        if std::mem::take(&mut scripts.1) {
            return Err(NftError::Rejected { stderr: "injected failure".into() });
        }
        scripts.0.push(script.to_owned());
        Ok(())
    }
    fn list_json(&mut self, _args: &[&str]) -> Result<String, NftError> {
        Ok("{\"nftables\": []}".into())
    }
}

struct Rig {
    ipvs: Shared<FakeIpvs>,
    links: Shared<FakeAddresses>,
    nft: Shared<Scripts>,
    backend: IpvsBackend,
}

impl Rig {
    fn new() -> Self {
        Self::over(Shared::default(), Shared::default())
    }

    fn with_options(options: IpvsOptions) -> Self {
        Self::built(options, Shared::default(), Shared::default())
    }

    /// A backend over kernel state that already exists (a restart).
    fn over(ipvs: Shared<FakeIpvs>, links: Shared<FakeAddresses>) -> Self {
        Self::built(IpvsOptions::default(), ipvs, links)
    }

    fn built(options: IpvsOptions, ipvs: Shared<FakeIpvs>, links: Shared<FakeAddresses>) -> Self {
        let nft = Shared::<Scripts>::default();
        let backend = IpvsBackend::with_parts(
            options,
            Box::new(nft.clone()),
            Box::new(ipvs.clone()),
            Box::new(links.clone()),
        );
        Self { ipvs, links, nft, backend }
    }

    fn sync(&mut self, plan: &Plan, diff: Option<&PlanDiff>) -> crate::backend::SyncReport {
        self.backend.sync(plan, diff, &config()).expect("sync")
    }

    /// Clears the operation logs.
    fn take_log(&self) -> Vec<String> {
        let mut log = std::mem::take(&mut self.ipvs.get().log);
        log.extend(std::mem::take(&mut self.links.get().log));
        log
    }
}

#[test]
fn a_full_sync_programs_services_dests_addresses_and_the_table() {
    let mut rig = Rig::new();
    let mut np = port("np", "10.96.0.11", &["10.0.1.11:8080"]);
    np.node_port = Some(30080);
    let p = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080"]), np]);
    let report = rig.sync(&p, None);
    assert!(report.full);
    assert_eq!(
        rig.ipvs.get().dump(),
        "-A -t 10.96.0.10:80 -s rr\n\
         -a -t 10.96.0.10:80 -r 10.0.1.10:8080 -m -w 1\n\
         -a -t 10.96.0.10:80 -r 10.0.2.10:8080 -m -w 1\n\
         -A -t 10.96.0.11:80 -s rr\n\
         -a -t 10.96.0.11:80 -r 10.0.1.11:8080 -m -w 1\n\
         -A -t 192.168.0.10:30080 -s rr\n\
         -a -t 192.168.0.10:30080 -r 10.0.1.11:8080 -m -w 1\n"
    );
    let links = rig.links.get();
    assert!(links.link);
    assert_eq!(links.addresses.iter().copied().collect::<Vec<_>>(), vec![ip("10.96.0.10"), ip("10.96.0.11")]);
    let scripts = &rig.nft.get().0;
    assert_eq!(scripts.len(), 1, "one nft transaction for both families");
    assert!(scripts[0].contains("add element ip ferry_ipvs frontends { 10.96.0.10 . tcp . 80, 10.96.0.11 . tcp . 80, 192.168.0.10 . tcp . 30080 }"), "{}", scripts[0]);
    assert!(scripts[0].contains("add element ip ferry_ipvs service_cidrs { 10.96.0.0/16 }"));
    assert!(scripts[0].contains("add element ip ferry_ipvs pod_cidrs { 10.0.0.0/16 }"));
}

#[test]
fn a_partial_sync_touches_only_the_changed_endpoint() {
    let mut rig = Rig::new();
    let web = port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080"]);
    let other = port("other", "10.96.0.11", &["10.0.1.11:8080"]);
    let p1 = plan(&[web.clone(), other]);
    rig.sync(&p1, None);
    rig.take_log();
    rig.nft.get().0.clear();

    let web2 = port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.3.10:8080"]);
    let mut p2 = p1.clone();
    p2.ports.insert(key(&web2), Arc::new(web2.clone()));
    let diff = PlanDiff::between(&p1, &p2);
    let report = rig.sync(&p2, Some(&diff));
    assert!(!report.full);
    assert_eq!(
        rig.take_log(),
        vec!["-a -t 10.96.0.10:80 -r 10.0.3.10:8080 -w 1", "-d -t 10.96.0.10:80 -r 10.0.2.10:8080"]
    );
    assert!(rig.nft.get().0.is_empty(), "no table change");
    assert_eq!(report.operations, 2);
}

#[test]
fn after_a_failed_sync_the_next_one_is_full_even_with_a_diff() {
    let mut rig = Rig::new();
    let p1 = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080"])]);
    rig.sync(&p1, None);
    // Losing its endpoints turns the service into a REJECT element: a table change, refused.
    let p2 = plan(&[port("web", "10.96.0.10", &[])]);
    rig.nft.get().1 = true;
    let failed = rig.backend.sync(&p2, Some(&PlanDiff::between(&p1, &p2)), &config());
    assert!(failed.is_err(), "the injected nft failure fails the sync");

    // What the failed sync left half-done is unknown: the next sync rewrites everything.
    let p3 = plan(&[port("web", "10.96.0.10", &["10.0.1.11:8080"])]);
    let report = rig.sync(&p3, Some(&PlanDiff::between(&p2, &p3)));
    assert!(report.full, "the sync after a failure is full");
    assert_eq!(
        rig.ipvs.get().dump(),
        "-A -t 10.96.0.10:80 -s rr\n-a -t 10.96.0.10:80 -r 10.0.1.11:8080 -m -w 1\n"
    );
    let again = rig.sync(&p3, Some(&PlanDiff::between(&p3, &p3)));
    assert!(!again.full, "and the one after it is partial again");
}

#[test]
fn losing_every_endpoint_swaps_the_service_for_a_reject_and_back() {
    let mut rig = Rig::new();
    let web = port("web", "10.96.0.10", &["10.0.1.10:8080"]);
    let p1 = plan(&[web]);
    rig.sync(&p1, None);
    rig.take_log();
    let p2 = plan(&[port("web", "10.96.0.10", &[])]);
    rig.sync(&p2, Some(&PlanDiff::between(&p1, &p2)));
    assert_eq!(rig.take_log(), vec!["-D -t 10.96.0.10:80"], "the address stays: the port still exists");
    assert_eq!(
        rig.nft.get().0.last().map(String::as_str),
        Some(
            "delete element ip ferry_ipvs frontends { 10.96.0.10 . tcp . 80 }\n\
             add element ip ferry_ipvs no_endpoints { 10.96.0.10 . tcp . 80 : goto reject_chain }\n"
        )
    );
    rig.sync(&p1, Some(&PlanDiff::between(&p2, &p1)));
    assert_eq!(
        rig.take_log(),
        vec!["-A -t 10.96.0.10:80 -s rr", "-a -t 10.96.0.10:80 -r 10.0.1.10:8080 -w 1"]
    );
}

#[test]
fn a_removed_tcp_real_server_with_connections_drains_at_weight_zero_then_goes() {
    let mut rig = Rig::new();
    let p1 = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080"])]);
    rig.sync(&p1, None);
    let vs = tcp("10.96.0.10", 80);
    rig.ipvs.get().set_active(&vs, &sa("10.0.2.10:8080"), 3);
    rig.take_log();
    let p2 = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080"])]);
    rig.sync(&p2, Some(&PlanDiff::between(&p1, &p2)));
    assert_eq!(rig.take_log(), vec!["-e -t 10.96.0.10:80 -r 10.0.2.10:8080 -w 0"]);
    // Still busy at the periodic resync: left alone.
    rig.sync(&p2, None);
    assert_eq!(rig.take_log(), Vec::<String>::new());
    rig.ipvs.get().set_active(&vs, &sa("10.0.2.10:8080"), 0);
    rig.sync(&p2, None);
    assert_eq!(rig.take_log(), vec!["-d -t 10.96.0.10:80 -r 10.0.2.10:8080"]);
}

#[test]
fn udp_real_servers_are_removed_at_once() {
    let mut rig = Rig::new();
    let mut dns = port("dns", "10.96.0.10", &["10.0.1.10:53", "10.0.2.10:53"]);
    dns.protocol = Protocol::Udp;
    dns.name.protocol = Protocol::Udp;
    let p1 = plan(&[dns.clone()]);
    rig.sync(&p1, None);
    let vs = ServiceKey::Addr { protocol: Protocol::Udp, addr: ip("10.96.0.10"), port: 80 };
    rig.ipvs.get().set_active(&vs, &sa("10.0.2.10:53"), 1);
    rig.take_log();
    dns.cluster_endpoints.pop();
    dns.serving_endpoints.pop();
    let p2 = plan(&[dns]);
    rig.sync(&p2, Some(&PlanDiff::between(&p1, &p2)));
    assert_eq!(rig.take_log(), vec!["-d -u 10.96.0.10:80 -r 10.0.2.10:53"]);
}

#[test]
fn a_full_sync_repairs_drift_and_removes_stale_services_of_ferrys_addresses_only() {
    let mut rig = Rig::new();
    let p = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080"])]);
    rig.sync(&p, None);
    {
        let mut k = rig.ipvs.get();
        k.del_service(&tcp("10.96.0.10", 80)).expect("delete");
        // A leftover on kube-ipvs0 and a service of someone else's.
        k.add_service(&tcp("10.96.0.99", 80), &ServiceSpec::new("rr", IpFamily::V4, None)).expect("add");
        k.add_service(&tcp("172.16.0.1", 443), &ServiceSpec::new("rr", IpFamily::V4, None)).expect("add");
    }
    rig.links.get().addresses.insert(ip("10.96.0.99"));
    rig.take_log();
    rig.sync(&p, None);
    let log = rig.take_log();
    assert_eq!(
        log,
        vec![
            "-A -t 10.96.0.10:80 -s rr",
            "-a -t 10.96.0.10:80 -r 10.0.1.10:8080 -w 1",
            "-D -t 10.96.0.99:80",
            "addr del 10.96.0.99",
        ]
    );
    assert!(rig.ipvs.get().table.contains_key(&tcp("172.16.0.1", 443)), "not ferry's: kept");
}

#[test]
fn a_restarted_ferry_adopts_what_it_left_without_touching_it() {
    let mut first = Rig::new();
    let mut lb = port("lb", "10.96.0.12", &["10.0.1.12:8080", "10.0.2.12:8080"]);
    lb.load_balancer_ips = vec![ip("198.18.0.1")];
    lb.node_port = Some(30081);
    lb.external_policy_local = true;
    lb.local_endpoints = vec![sa("10.0.1.12:8080")];
    lb.affinity_timeout = Some(300);
    let p = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080"]), lb]);
    first.sync(&p, None);
    let before = first.ipvs.get().dump();
    assert!(before.contains("-A -f 25"), "a firewall-mark service for the short-circuit:\n{before}");
    assert!(before.contains("-p 300"), "{before}");

    let mut second = Rig::over(first.ipvs.clone(), first.links.clone());
    second.take_log();
    let report = second.sync(&p, None);
    assert_eq!(second.take_log(), Vec::<String>::new(), "same marks, same services: nothing to do");
    assert_eq!(report.operations, 0);
    assert_eq!(second.ipvs.get().dump(), before);
}

#[test]
fn two_services_claiming_one_external_ip_hand_it_over() {
    let mut rig = Rig::new();
    let mut a = port("a", "10.96.0.10", &["10.0.1.10:8080"]);
    a.external_ips = vec![ip("203.0.113.1")];
    let mut b = port("b", "10.96.0.11", &["10.0.1.11:8080"]);
    b.external_ips = vec![ip("203.0.113.1")];
    let p1 = plan(&[a, b.clone()]);
    rig.sync(&p1, None);
    let ext = tcp("203.0.113.1", 80);
    let first_owner: Vec<SocketAddr> = rig.ipvs.get().table[&ext].1.keys().copied().collect();
    rig.take_log();
    let p2 = plan(&[b]);
    rig.sync(&p2, Some(&PlanDiff::between(&p1, &p2)));
    let now: Vec<SocketAddr> = rig.ipvs.get().table[&ext].1.keys().copied().collect();
    assert_eq!(first_owner, vec![sa("10.0.1.10:8080")]);
    assert_eq!(now, vec![sa("10.0.1.11:8080")], "b's endpoints take over");
    assert!(rig.links.get().addresses.contains(&ip("203.0.113.1")), "still claimed by b");
}

#[test]
fn cleanup_removes_ferrys_services_the_dummy_and_the_tables() {
    let mut rig = Rig::new();
    let mut np = port("np", "10.96.0.11", &["10.0.1.11:8080"]);
    np.node_port = Some(30080);
    rig.sync(&plan(&[np]), None);
    rig.links.get().node_addresses.insert(ip("192.168.0.10"));
    rig.ipvs
        .get()
        .add_service(&tcp("172.16.0.1", 443), &ServiceSpec::new("rr", IpFamily::V4, None))
        .expect("add");
    rig.backend.cleanup().expect("cleanup");
    let left: Vec<ServiceKey> = rig.ipvs.get().table.keys().copied().collect();
    assert_eq!(left, vec![tcp("172.16.0.1", 443)]);
    assert!(!rig.links.get().link);
    assert_eq!(rig.nft.get().0.last().map(String::as_str), Some(filter::cleanup_script().as_str()));
}

#[test]
fn render_prints_virtual_services_addresses_and_the_table() {
    let options = IpvsOptions {
        scheduler: "wrr".into(),
        timeouts: Timeouts { tcp: 3600, tcp_fin: 0, udp: 60 },
        ..IpvsOptions::default()
    };
    let backend = IpvsBackend::new(options).expect("backend");
    let mut web = port("web", "10.96.0.10", &["10.0.1.10:8080"]);
    web.affinity_timeout = Some(60);
    let text = backend.render(&plan(&[web]), &config());
    assert!(
        text.contains("-A -t 10.96.0.10:80 -s wrr -p 60\n-a -t 10.96.0.10:80 -r 10.0.1.10:8080 -m -w 1\n"),
        "{text}"
    );
    assert!(text.contains("# kube-ipvs0 addresses\n10.96.0.10\n"), "{text}");
    assert!(text.contains("\n--set 3600 0 60\n"), "the timeouts, ipvsadm's way: {text}");
    assert!(text.contains("table ip ferry_ipvs {"), "{text}");
    assert!(text.contains("table ip6 ferry_ipvs {"), "{text}");
}

#[test]
fn an_unknown_scheduler_is_refused() {
    let options = IpvsOptions { scheduler: "fastest".into(), ..IpvsOptions::default() };
    let err = IpvsBackend::new(options).err().expect("refused");
    assert!(err.to_string().contains("\"fastest\" is not one of rr, wrr"), "{err}");
}

// ---- timeouts and excludeCIDRs ----

fn with_timeouts(tcp: u32, tcp_fin: u32, udp: u32) -> IpvsOptions {
    IpvsOptions { timeouts: Timeouts { tcp, tcp_fin, udp }, ..IpvsOptions::default() }
}

#[test]
fn timeouts_are_set_at_the_first_full_sync_not_resent_when_unchanged_and_reset_after_drift() {
    let mut rig = Rig::with_options(with_timeouts(3600, 0, 60));
    let p1 = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080"])]);
    let report = rig.sync(&p1, None);
    let log = rig.take_log();
    assert_eq!(log.first().map(String::as_str), Some("--set 3600 0 60"), "{log:?}");
    assert_eq!(
        rig.ipvs.get().timeouts,
        Timeouts { tcp: 3600, tcp_fin: 120, udp: 60 },
        "the FIN timeout (0) keeps the kernel's value"
    );
    assert_eq!(report.operations, 4, "the timeouts, the address, the service and its real server");

    // Unchanged: neither a partial nor a full sync sends them again.
    let p2 = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080", "10.0.2.10:8080"])]);
    rig.sync(&p2, Some(&PlanDiff::between(&p1, &p2)));
    let report = rig.sync(&p2, None);
    assert!(!rig.take_log().iter().any(|l| l.starts_with("--set")));
    assert_eq!(report.operations, 0);

    // Someone else changes one (ipvsadm --set 900 0 0): the next full sync puts it back.
    rig.ipvs.get().timeouts.tcp = 900;
    let report = rig.sync(&p2, None);
    assert_eq!(rig.take_log(), vec!["--set 3600 0 60"]);
    assert_eq!(report.operations, 1);
    assert_eq!(rig.ipvs.get().timeouts, Timeouts { tcp: 3600, tcp_fin: 120, udp: 60 });
}

#[test]
fn without_timeouts_the_kernels_are_left_alone() {
    let mut rig = Rig::new();
    rig.ipvs.get().timeouts = Timeouts { tcp: 7, tcp_fin: 8, udp: 9 };
    rig.sync(&plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080"])]), None);
    assert!(!rig.take_log().iter().any(|l| l.starts_with("--set")));
    assert_eq!(rig.ipvs.get().timeouts, Timeouts { tcp: 7, tcp_fin: 8, udp: 9 });
}

#[test]
fn reconfigured_timeouts_apply_at_the_next_sync_even_with_a_diff() {
    let mut rig = Rig::with_options(with_timeouts(3600, 0, 0));
    let p = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080"])]);
    rig.sync(&p, None);
    rig.take_log();
    rig.backend.reconfigure(with_timeouts(1800, 30, 0)).expect("valid options");
    let report = rig.sync(&p, Some(&PlanDiff::between(&p, &p)));
    assert!(report.full, "new options: a full sync");
    assert_eq!(rig.take_log(), vec!["--set 1800 30 0"]);
    assert_eq!(rig.ipvs.get().timeouts, Timeouts { tcp: 1800, tcp_fin: 30, udp: 300 });
    let err = rig.backend.reconfigure(with_timeouts(0, 0, u32::MAX)).expect_err("refused");
    assert!(err.to_string().contains("IPVS UDP timeout 4294967295s is longer than IPVS accepts"), "{err}");
}

#[test]
fn reloaded_options_reach_the_running_backend_through_apply_options() {
    use crate::backend::{Backend as _, BackendOptions};
    let mut rig = Rig::with_options(with_timeouts(3600, 0, 0));
    let p = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080"])]);
    rig.sync(&p, None);
    rig.take_log();
    let reload = |tcp: u32, scheduler: Option<&str>| BackendOptions {
        ipvs_timeouts: Timeouts { tcp, tcp_fin: 0, udp: 0 },
        ipvs_scheduler: scheduler.map(str::to_owned),
        ..BackendOptions::default()
    };
    assert!(!rig.backend.apply_options(&reload(3600, None)).expect("valid"), "nothing changed");
    assert!(!rig.sync(&p, Some(&PlanDiff::between(&p, &p))).full);

    assert!(rig.backend.apply_options(&reload(1800, Some("lc"))).expect("valid"), "taken");
    let report = rig.sync(&p, Some(&PlanDiff::between(&p, &p)));
    assert!(report.full, "new options: a full sync");
    assert_eq!(rig.ipvs.get().timeouts.tcp, 1800);
    assert!(rig.ipvs.get().dump().contains("-s lc"), "{}", rig.ipvs.get().dump());

    let refused = rig.backend.apply_options(&reload(1800, Some("nope")));
    assert!(refused.is_err(), "an unknown scheduler is refused");
    assert!(rig.ipvs.get().dump().contains("-s lc"), "and the running options stay");
}

#[test]
fn absurd_timeouts_are_refused_and_fractions_of_a_second_too() {
    let err = IpvsBackend::new(with_timeouts(super::MAX_TIMEOUT_SECS + 1, 0, 0)).err().expect("refused");
    assert!(err.to_string().contains("IPVS TCP timeout 2147484s is longer than IPVS accepts"), "{err}");
    assert!(IpvsBackend::new(with_timeouts(super::MAX_TIMEOUT_SECS, 1, 1)).is_ok());
    use std::time::Duration;
    assert_eq!(super::timeout_secs(Duration::from_secs(900)), Ok(900));
    assert_eq!(super::timeout_secs(Duration::ZERO), Ok(0));
    assert_eq!(
        super::timeout_secs(Duration::from_millis(1500)),
        Err("IPVS timeouts are whole seconds".to_owned())
    );
    assert!(super::timeout_secs(Duration::from_secs(30 * 86400)).is_err());
}

#[test]
fn stale_services_in_excluded_cidrs_survive_full_syncs_and_cleanup_while_others_go() {
    let options = IpvsOptions {
        exclude_cidrs: vec!["192.168.0.0/24".parse().expect("cidr"), "10.96.5.0/24".parse().expect("cidr")],
        ..IpvsOptions::default()
    };
    let mut rig = Rig::with_options(options);
    let p = plan(&[port("web", "10.96.0.10", &["10.0.1.10:8080"])]);
    rig.sync(&p, None);
    let rr = ServiceSpec::new("rr", IpFamily::V4, None);
    // Stale services on addresses ferry owns: the node's (someone else's load balancer on
    // it), kube-ipvs0's inside an excluded CIDR, and kube-ipvs0's outside.
    let kept_node = tcp("192.168.0.10", 9000);
    let kept_dummy = tcp("10.96.5.1", 80);
    let stale = tcp("10.96.0.99", 80);
    {
        let mut k = rig.ipvs.get();
        for key in [kept_node, kept_dummy, stale] {
            k.add_service(&key, &rr).expect("add");
        }
    }
    rig.links.get().addresses.extend([ip("10.96.5.1"), ip("10.96.0.99")]);
    rig.take_log();
    rig.sync(&p, None);
    assert_eq!(
        rig.take_log(),
        vec!["-D -t 10.96.0.99:80", "addr del 10.96.0.99", "addr del 10.96.5.1"],
        "only the service outside excludeCIDRs goes; stale addresses go as kube-proxy unbinds them"
    );
    let left: Vec<ServiceKey> = rig.ipvs.get().table.keys().copied().collect();
    assert_eq!(left, vec![tcp("10.96.0.10", 80), kept_dummy, kept_node]);

    rig.links.get().node_addresses.insert(ip("192.168.0.10"));
    rig.links.get().addresses.insert(ip("10.96.5.1"));
    rig.backend.cleanup().expect("cleanup");
    let left: Vec<ServiceKey> = rig.ipvs.get().table.keys().copied().collect();
    assert_eq!(left, vec![kept_dummy, kept_node], "cleanup spares excludeCIDRs too");
}

/// Once a sync succeeded, a full sync rewrites the table in place and gives the interval sets
/// only their changes: deleting the table or flushing one of them made lookups miss on 6.1.
#[test]
fn a_full_sync_after_a_successful_one_rewrites_the_table_in_place_and_only_changed_interval_sets() {
    let mut rig = Rig::new();
    let mut lb = port("lb", "10.96.0.10", &["10.0.1.10:8080"]);
    lb.load_balancer_ips = vec![ip("198.18.0.1")];
    lb.source_ranges = vec!["198.51.100.0/24".parse().expect("cidr")];
    let first = plan(&[lb.clone()]);
    rig.sync(&first, None);
    assert!(
        rig.nft.get().0[0].contains("delete table ip ferry_ipvs"),
        "the first full sync replaces the table"
    );

    lb.source_ranges.push("203.0.113.0/24".parse().expect("cidr"));
    let second = plan(&[lb]);
    assert!(rig.sync(&second, None).full);
    let script = rig.nft.get().0[1].clone();
    assert!(!script.contains("delete table") && !script.contains("table ip ferry_ipvs {"), "{script}");
    for set in ["pod_cidrs", "service_cidrs", "firewall_allow"] {
        assert!(!script.contains(&format!("flush set ip ferry_ipvs {set}")), "{set} flushed:\n{script}");
    }
    assert!(script.contains("flush set ip ferry_ipvs frontends"), "{script}");
    assert!(script.contains("flush chain ip ferry_ipvs firewall_check"), "{script}");
    let firewall_allow: Vec<&str> = script.lines().filter(|l| l.contains(" firewall_allow ")).collect();
    assert_eq!(
        firewall_allow,
        vec!["add element ip ferry_ipvs firewall_allow { 198.18.0.1 . tcp . 80 . 203.0.113.0/24 }"],
        "{script}"
    );
    assert!(!script.contains("pod_cidrs {"), "pod_cidrs did not change:\n{script}");

    // An `auto-merge` set that changes is refilled: nft cannot delete a prefix the kernel
    // merged into a range.
    let mut wider = config();
    wider.cluster_cidrs.push("10.1.0.0/16".parse().expect("cidr"));
    rig.backend.sync(&second, None, &wider).expect("sync");
    let script = rig.nft.get().0.last().expect("script").clone();
    assert!(script.contains("flush set ip ferry_ipvs pod_cidrs\n"), "{script}");
    assert!(script.contains("add element ip ferry_ipvs pod_cidrs { 10.0.0.0/16, 10.1.0.0/16 }"), "{script}");
    assert!(
        !script.contains("element ip ferry_ipvs firewall_allow"),
        "firewall_allow did not change:\n{script}"
    );

    // A failed sync: the next full sync cannot know the table and replaces it again.
    rig.nft.get().1 = true;
    assert!(rig.backend.sync(&second, None, &config()).is_err());
    rig.sync(&second, None);
    assert!(rig.nft.get().0.last().expect("script").contains("delete table ip ferry_ipvs"));
}
