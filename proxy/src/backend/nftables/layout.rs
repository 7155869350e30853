//! The fixed part of ferry's table: sets, maps, base chains and their rules. It depends on the
//! node's configuration only, never on the number of services.

use std::fmt::Write;

use super::family::Fam;
use crate::plan::NodeConfig;

/// Mark bit for "masquerade this connection" (kube-proxy's default bit, so the two agree
/// during a migration).
pub const MASQ_MARK: u32 = 0x4000;

/// The sets with `flags interval` (elements are prefixes and ranges), of this table and of
/// the IPVS backend's. A full sync that knows what they hold writes only their changes:
/// flushing and refilling one made Linux 6.1's lookups in it miss (README.md, "Transactions").
pub const INTERVAL_SETS: [&str; 3] = ["service_cidrs", "pod_cidrs", "firewall_allow"];

/// The interval sets declared `auto-merge`: the kernel may hold two adjacent prefixes as one
/// range, from which nft cannot delete one of them ("element does not exist"), so a change to
/// one of these is a flush and refill rather than a difference.
pub const AUTO_MERGED: [&str; 2] = ["service_cidrs", "pod_cidrs"];

pub struct SetDecl {
    pub name: &'static str,
    /// Body of the declaration between the braces.
    pub body: String,
    pub is_map: bool,
}

pub fn sets(fam: Fam) -> Vec<SetDecl> {
    let addr = fam.addr_type;
    // Plain `type` declarations: nft 1.0.6 mis-reads some `typeof` declarations back from
    // the kernel, which would break every transaction after the first.
    let fe = format!("{addr} . inet_proto . inet_service");
    let np = "inet_proto . inet_service".to_owned();
    let set = |name, body: String| SetDecl { name, body, is_map: false };
    let map = |name, body: String| SetDecl { name, body, is_map: true };
    vec![
        set("cluster_ips", format!("type {addr}; comment \"allocated ClusterIPs\";")),
        set("service_cidrs", format!("type {addr}; flags interval; auto-merge; comment \"service CIDRs\";")),
        set(
            "pod_cidrs",
            format!("type {addr}; flags interval; auto-merge; comment \"local-traffic detector\";"),
        ),
        set("nodeport_ips", format!("type {addr}; comment \"--nodeport-addresses\";")),
        set("ext_masq", format!("type {fe}; comment \"external frontends under policy Cluster\";")),
        set("ext_local", format!("type {fe}; comment \"external frontends under policy Local\";")),
        set("np_masq", format!("type {np}; comment \"NodePorts under policy Cluster\";")),
        set("np_local", format!("type {np}; comment \"NodePorts under policy Local\";")),
        set("firewall", format!("type {fe}; comment \"LoadBalancer frontends with source ranges\";")),
        set("firewall_allow", format!("type {fe} . {addr}; flags interval; comment \"allowed sources\";")),
        set("hairpin", format!("type {addr} . {addr}; comment \"endpoint . itself\";")),
        map("no_endpoints", format!("type {fe} : verdict; comment \"REJECT or DROP\";")),
        map("no_endpoint_nodeports", format!("type {np} : verdict;")),
        map("frontends", format!("type {fe} : verdict;")),
        map("frontends_sc", format!("type {fe} : verdict; comment \"policy Local: pods and node\";")),
        map("nodeports", format!("type {np} : verdict;")),
        map("nodeports_sc", format!("type {np} : verdict;")),
    ]
}

pub struct ChainDecl {
    pub name: &'static str,
    /// `type … hook … priority …;` for base chains.
    pub hook: Option<&'static str>,
    pub rules: Vec<String>,
}

pub fn chains(fam: Fam, config: &NodeConfig) -> Vec<ChainDecl> {
    let ip = fam.ip;
    let fe = format!("{ip} daddr . meta l4proto . th dport");
    let np = "meta l4proto . th dport";
    let mark = format!("meta mark set meta mark | {MASQ_MARK:#x}");
    let detector = config.has_local_detector(fam.family);
    let mut nodeport_match = String::from("fib daddr type local");
    if !config.nodeport_addresses.is_empty() {
        let _ = write!(nodeport_match, " {ip} daddr @nodeport_ips");
    }
    let _ = write!(nodeport_match, " {ip} daddr != {}", fam.loopback);

    let mut services = Vec::new();
    if config.masquerade_all {
        services.push(format!("{ip} daddr @cluster_ips {mark}"));
    } else if detector {
        services.push(format!("{ip} daddr @cluster_ips {ip} saddr != @pod_cidrs {mark}"));
    }
    services.push(format!("{fe} @ext_masq {mark}"));
    if detector {
        services.push(format!("{ip} saddr @pod_cidrs {fe} vmap @frontends_sc"));
    }
    services.push(format!("fib saddr type local {fe} @ext_local {mark}"));
    services.push(format!("fib saddr type local {fe} vmap @frontends_sc"));
    services.push(format!("{fe} vmap @frontends"));
    services.push(format!("{nodeport_match} jump nodeports"));

    let mut nodeports = vec![format!("{np} @np_masq {mark}")];
    if detector {
        nodeports.push(format!("{ip} saddr @pod_cidrs {np} vmap @nodeports_sc"));
    }
    nodeports.push(format!("fib saddr type local {np} @np_local {mark}"));
    nodeports.push(format!("fib saddr type local {np} vmap @nodeports_sc"));
    nodeports.push(format!("{np} vmap @nodeports"));

    let firewall = vec![format!("ct state new {fe} @firewall {fe} . {ip} saddr != @firewall_allow drop")];
    let check = vec![
        format!("{fe} vmap @no_endpoints"),
        format!("{nodeport_match} {np} vmap @no_endpoint_nodeports"),
        format!("{ip} daddr @cluster_ips goto reject_chain"),
        format!("{ip} daddr @service_cidrs drop"),
    ];
    let chain = |name, hook, rules| ChainDecl { name, hook, rules };
    vec![
        chain("reject_chain", None, vec!["meta l4proto tcp reject with tcp reset".into(), "reject".into()]),
        chain("services", None, services),
        chain("nodeports", None, nodeports),
        chain("endpoint_check", None, check),
        chain("firewall_check", None, firewall),
        chain(
            "masquerading",
            None,
            vec![
                format!(
                    "meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} ct status dnat meta mark set meta mark & {:#x} masquerade fully-random",
                    !MASQ_MARK
                ),
                format!("ct status dnat {ip} saddr . {ip} daddr @hairpin masquerade fully-random"),
            ],
        ),
        chain(
            "nat_prerouting",
            Some("type nat hook prerouting priority dstnat; policy accept;"),
            vec!["jump services".into()],
        ),
        chain(
            "nat_output",
            Some("type nat hook output priority -100; policy accept;"),
            vec!["jump services".into()],
        ),
        chain(
            "nat_postrouting",
            Some("type nat hook postrouting priority srcnat; policy accept;"),
            vec!["jump masquerading".into()],
        ),
        chain(
            "filter_prerouting_pre_dnat",
            Some("type filter hook prerouting priority dstnat - 10; policy accept;"),
            vec!["jump firewall_check".into()],
        ),
        chain(
            "filter_output_pre_dnat",
            Some("type filter hook output priority -110; policy accept;"),
            vec!["jump firewall_check".into()],
        ),
        chain(
            "filter_prerouting",
            Some("type filter hook prerouting priority dstnat + 10; policy accept;"),
            vec!["ct state new jump endpoint_check".into()],
        ),
        chain(
            "filter_output",
            Some("type filter hook output priority -90; policy accept;"),
            vec!["ct state new jump endpoint_check".into()],
        ),
    ]
}
