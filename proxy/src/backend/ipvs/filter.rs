//! ferry's nftables table in IPVS mode, `ip ferry_ipvs` and `ip6 ferry_ipvs`: what IPVS cannot
//! express, as kube-proxy's IPVS mode does with iptables and ipsets.
//!
//! - REJECT (no endpoints, undefined port on a ClusterIP) and DROP (unallocated address in a
//!   service CIDR, internal or external traffic policy Local without a local endpoint) for
//!   new connections, before IPVS sees them (IPVS hooks local input at priority 98 and local
//!   output at -98; ferry's chains run at -140).
//! - Masquerade: the connection is marked with bit 0x4000 of its *conntrack* mark (the packet
//!   mark is taken by IPVS firewall marks) and masqueraded in postrouting; hairpin connections
//!   (an endpoint reaching itself) by address pair. `net.ipv4.vs.conntrack=1` keeps IPVS
//!   connections in conntrack, so the nat hook sees them.
//! - externalTrafficPolicy Local short-circuit: pods and the node get packet mark M, and
//!   IPVS looks firewall-mark services up before address services, so the port's mark service
//!   (cluster endpoints) serves them while outside clients reach the address service (local
//!   endpoints, client address kept).
//! - loadBalancerSourceRanges: new connections to a guarded LoadBalancer frontend from
//!   outside the ranges are dropped.
//!
//! Every frontend set is keyed by `addr . proto . port`, as in the nftables backend. A full
//! sync rewrites the table in one `nft -f` transaction: replaced whole when ferry does not know
//! what it holds (start, after a failure), otherwise in place with only the changes of the
//! interval sets ([`refresh_script`] says why). Incremental syncs add and delete elements only.

use std::fmt::Write as _;

use std::collections::BTreeSet;

use crate::backend::nftables::family::{self, Fam};
use crate::backend::nftables::layout::{AUTO_MERGED, INTERVAL_SETS};
use crate::model::IpFamily;
use crate::plan::{NodeConfig, Plan};

pub const TABLE: &str = "ferry_ipvs";
/// Bit of the conntrack mark meaning "masquerade this connection" (kube-proxy's masquerade bit).
pub const MASQ_CT_MARK: u32 = 0x4000;
pub const REJECT: &str = "goto reject_chain";

/// One element of a set or map of the table of one family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub family: IpFamily,
    pub set: &'static str,
    pub key: String,
    /// Map value.
    pub value: Option<String>,
}

impl Element {
    fn text(&self) -> String {
        match &self.value {
            Some(v) => format!("{} : {v}", self.key),
            None => self.key.clone(),
        }
    }
}

/// Set and map declarations (name, body).
fn sets(fam: Fam) -> Vec<(&'static str, String)> {
    let addr = fam.addr_type;
    let fe = format!("{addr} . inet_proto . inet_service");
    vec![
        ("cluster_ips", format!("type {addr}; comment \"allocated ClusterIPs\";")),
        ("service_cidrs", format!("type {addr}; flags interval; auto-merge; comment \"service CIDRs\";")),
        (
            "pod_cidrs",
            format!("type {addr}; flags interval; auto-merge; comment \"local-traffic detector\";"),
        ),
        ("frontends", format!("type {fe}; comment \"frontends with an IPVS service\";")),
        ("ext_masq", format!("type {fe}; comment \"external frontends under policy Cluster\";")),
        ("ext_local", format!("type {fe}; comment \"external frontends under policy Local\";")),
        ("no_local", format!("type {fe}; comment \"policy Local without a local endpoint\";")),
        ("firewall", format!("type {fe}; comment \"LoadBalancer frontends with source ranges\";")),
        ("firewall_allow", format!("type {fe} . {addr}; flags interval; comment \"allowed sources\";")),
        ("hairpin", format!("type {addr} . {addr}; comment \"endpoint . itself\";")),
    ]
}

fn maps(fam: Fam) -> Vec<(&'static str, String)> {
    let fe = format!("{} . inet_proto . inet_service", fam.addr_type);
    vec![
        ("no_endpoints", format!("type {fe} : verdict; comment \"REJECT or DROP\";")),
        ("sc_marks", format!("type {fe} : mark; comment \"firewall mark of the short-circuit service\";")),
    ]
}

/// Chains (name, hook declaration, rules).
fn chains(fam: Fam, config: &NodeConfig) -> Vec<(&'static str, Option<&'static str>, Vec<String>)> {
    let ip = fam.ip;
    let fe = format!("{ip} daddr . meta l4proto . th dport");
    let masq = format!("ct mark set ct mark | {MASQ_CT_MARK:#x}");
    let detector = config.has_local_detector(fam.family);

    let mut remote = vec![format!("{fe} vmap @no_endpoints")];
    if detector {
        remote.push(format!("{ip} saddr @pod_cidrs {fe} @ext_local meta mark set {fe} map @sc_marks return"));
    }
    remote.push(format!("{fe} @no_local drop"));
    if config.masquerade_all {
        remote.push(format!("{ip} daddr @cluster_ips {masq}"));
    } else if detector {
        remote.push(format!("{ip} daddr @cluster_ips {ip} saddr != @pod_cidrs {masq}"));
    }
    remote.push(format!("{fe} @ext_masq {masq}"));
    remote.push(format!("{fe} @frontends return"));
    remote.push(format!("{ip} daddr @cluster_ips goto reject_chain"));
    remote.push(format!("{ip} daddr @service_cidrs drop"));

    // The node's own connections take a ClusterIP as source address (it is local, on
    // kube-ipvs0), which no endpoint can answer: they are always masqueraded, as in
    // kube-proxy's IPVS mode.
    let node = vec![
        format!("{fe} vmap @no_endpoints"),
        format!("{fe} @ext_local {masq} meta mark set {fe} map @sc_marks return"),
        format!("{ip} daddr @cluster_ips {masq}"),
        format!("{fe} @ext_masq {masq}"),
        format!("{fe} @frontends return"),
        format!("{ip} daddr @cluster_ips goto reject_chain"),
        format!("{ip} daddr @service_cidrs drop"),
    ];
    vec![
        ("reject_chain", None, vec!["meta l4proto tcp reject with tcp reset".into(), "reject".into()]),
        ("firewall_check", None, vec![format!("{fe} @firewall {fe} . {ip} saddr != @firewall_allow drop")]),
        ("from_remote", None, remote),
        ("from_node", None, node),
        (
            "prerouting",
            Some("type filter hook prerouting priority -140; policy accept;"),
            vec!["ct state new jump firewall_check".into(), "ct state new jump from_remote".into()],
        ),
        (
            "output",
            Some("type filter hook output priority -140; policy accept;"),
            vec!["ct state new jump firewall_check".into(), "ct state new jump from_node".into()],
        ),
        (
            "postrouting",
            Some("type nat hook postrouting priority srcnat; policy accept;"),
            vec![
                format!("ct mark & {MASQ_CT_MARK:#x} == {MASQ_CT_MARK:#x} masquerade fully-random"),
                format!("{ip} saddr . {ip} daddr @hairpin masquerade fully-random"),
            ],
        ),
    ]
}

/// Elements fixed by the node's configuration and the plan's global sets.
pub fn global_elements(plan: &Plan, config: &NodeConfig, family: IpFamily) -> Vec<Element> {
    let mut out = Vec::new();
    let mut push = |set, key: String| out.push(Element { family, set, key, value: None });
    for ip in plan.cluster_ips.iter().filter(|ip| IpFamily::of(ip) == family) {
        push("cluster_ips", ip.to_string());
    }
    for n in plan.service_cidrs.iter().filter(|n| IpFamily::of_net(n) == family) {
        push("service_cidrs", n.to_string());
    }
    for n in config.cluster_cidrs(family) {
        push("pod_cidrs", n.to_string());
    }
    out
}

/// The whole table of one family with `elements` (every element of that family), replacing
/// whatever table of that name exists, in one transaction.
pub fn full_script(family: IpFamily, config: &NodeConfig, elements: &[&Element]) -> String {
    let fam = family::Fam::of(family);
    let ip = fam.ip;
    let mut s = String::new();
    // `add` first makes the delete succeed when there is no table yet.
    let _ = writeln!(s, "add table {ip} {TABLE}\ndelete table {ip} {TABLE}\ntable {ip} {TABLE} {{");
    let _ = writeln!(s, "\tcomment \"ferry IPVS backend: what IPVS cannot express\"");
    for (name, body) in sets(fam) {
        let _ = writeln!(s, "\tset {name} {{ {body} }}");
    }
    for (name, body) in maps(fam) {
        let _ = writeln!(s, "\tmap {name} {{ {body} }}");
    }
    for (name, hook, rules) in chains(fam, config) {
        let _ = writeln!(s, "\tchain {name} {{");
        if let Some(h) = hook {
            let _ = writeln!(s, "\t\t{h}");
        }
        for r in rules {
            let _ = writeln!(s, "\t\t{r}");
        }
        let _ = writeln!(s, "\t}}");
    }
    s.push_str("}\n");
    write_elements(&mut s, ip, "add", elements.iter().copied().filter(|e| e.family == family));
    s
}

/// `add element` (with values) or `delete element` (keys) lines, a thousand elements a line.
fn write_elements<'a>(s: &mut String, ip: &str, verb: &str, elements: impl Iterator<Item = &'a Element>) {
    let mut by_set: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for e in elements {
        by_set.entry(e.set).or_default().push(if verb == "add" { e.text() } else { e.key.clone() });
    }
    for (set, items) in by_set {
        for chunk in items.chunks(1000) {
            let _ = writeln!(s, "{verb} element {ip} {TABLE} {set} {{ {} }}", chunk.join(", "));
        }
    }
}

/// The whole table of one family, rewritten in place in one transaction, for a table that
/// `held` describes (the last sync succeeded): chains and exact-match sets are flushed and
/// refilled, the interval sets ([`INTERVAL_SETS`]) get only their changes (an `auto-merge` one
/// that changed is refilled: [`AUTO_MERGED`]). Flushing and
/// refilling an interval set, or replacing it by a new one as `full_script` does, lets lookups
/// in it miss while the transaction commits (Linux 6.1; the nftables backend's README.md,
/// "Transactions"): a new connection from inside a LoadBalancer's source ranges was dropped.
/// Nothing is declared: if the table is gone the script fails, and the full sync after that
/// failure recreates it with `full_script`.
pub fn refresh_script(
    family: IpFamily,
    config: &NodeConfig,
    elements: &[&Element],
    held: &[Element],
) -> String {
    let fam = family::Fam::of(family);
    let ip = fam.ip;
    let mut s = String::new();
    for (name, _) in sets(fam).into_iter().filter(|(name, _)| !INTERVAL_SETS.contains(name)) {
        let _ = writeln!(s, "flush set {ip} {TABLE} {name}");
    }
    for (name, _) in maps(fam) {
        let _ = writeln!(s, "flush map {ip} {TABLE} {name}");
    }
    for (name, _, rules) in chains(fam, config) {
        let _ = writeln!(s, "flush chain {ip} {TABLE} {name}");
        for r in rules {
            let _ = writeln!(s, "add rule {ip} {TABLE} {name} {r}");
        }
    }
    let of_family = |e: &&Element| e.family == family;
    let wanted: BTreeSet<&Element> = elements.iter().copied().filter(of_family).collect();
    let mut held: BTreeSet<&Element> = held.iter().filter(of_family).collect();
    for set in AUTO_MERGED {
        if !held.iter().filter(|e| e.set == set).eq(wanted.iter().filter(|e| e.set == set)) {
            let _ = writeln!(s, "flush set {ip} {TABLE} {set}");
            held.retain(|e| e.set != set);
        }
    }
    let gone = held.iter().copied().filter(|e| INTERVAL_SETS.contains(&e.set) && !wanted.contains(e));
    write_elements(&mut s, ip, "delete", gone);
    let added = wanted.iter().copied().filter(|e| !INTERVAL_SETS.contains(&e.set) || !held.contains(e));
    write_elements(&mut s, ip, "add", added);
    s
}

/// Element changes as one transaction: deletions first (a map key changing value is deleted
/// and added again), then additions.
pub fn element_script(deleted: &[&Element], added: &[&Element]) -> String {
    let mut s = String::new();
    for e in deleted {
        let ip = Fam::of(e.family).ip;
        let _ = writeln!(s, "delete element {ip} {TABLE} {} {{ {} }}", e.set, e.key);
    }
    for e in added {
        let ip = Fam::of(e.family).ip;
        let _ = writeln!(s, "add element {ip} {TABLE} {} {{ {} }}", e.set, e.text());
    }
    s
}

/// Replaces the ClusterIPs of one family (they change with services that have no ports too).
pub fn cluster_ips_script(plan: &Plan, family: IpFamily) -> String {
    let ip = Fam::of(family).ip;
    let mut s = format!("flush set {ip} {TABLE} cluster_ips\n");
    let ips: Vec<String> =
        plan.cluster_ips.iter().filter(|a| IpFamily::of(a) == family).map(|a| a.to_string()).collect();
    for chunk in ips.chunks(1000) {
        let _ = writeln!(s, "add element {ip} {TABLE} cluster_ips {{ {} }}", chunk.join(", "));
    }
    s
}

/// Deletes both tables (adding them first makes this succeed when they are gone).
pub fn cleanup_script() -> String {
    ["ip", "ip6"].iter().map(|ip| format!("add table {ip} {TABLE}\ndelete table {ip} {TABLE}\n")).collect()
}
