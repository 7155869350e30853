//! A ruleset shaped the way kube-proxy's nftables mode structures it, for the same services
//! ferry programs, so the benchmarks measure the ratio instead of quoting it.
//!
//! Written from reading kube-proxy's `pkg/proxy/nftables/proxier.go` (Kubernetes 1.33); no code
//! is taken from it. The shape, for ClusterIP services with Cluster traffic policy:
//! - table `ip kube-proxy`; base chains `filter-{prerouting,input,forward,output}` at
//!   dstnat − 10, `filter-output-post-dnat` at dstnat + 10, `nat-{prerouting,output}` at dstnat,
//!   `nat-postrouting` at srcnat, jumping to `services`, `masquerading`, `firewall-check`,
//!   `service-endpoints-check`, `nodeport-endpoints-check`, `cluster-ips-check`;
//! - verdict maps `service-ips` (addr . proto . port → `goto service-…`), `service-nodeports`,
//!   `no-endpoint-services`, `no-endpoint-nodeports`, `firewall-ips`; set `cluster-ips`;
//! - **a chain per service port** `service-<hash>-<ns>/<name>/tcp/<port>`: a masquerade-mark rule
//!   for traffic from outside the cluster CIDR, then `numgen random mod N vmap { i : goto
//!   endpoint-… }`;
//! - **a chain per endpoint** `endpoint-<hash>-<ns>/<name>/tcp/<port>__<ip>/<port>`: hairpin
//!   masquerade mark, then `dnat to ip:port`.
//!
//! Each sync kube-proxy runs `nft --json list chains ip` and `nft --json list sets ip` (to
//! find stale chains and affinity sets) and then one `nft -f` transaction. A full sync adds
//! and flushes every chain, flushes and refills the maps; a partial sync (kube-proxy ≥ 1.31)
//! rewrites only the chains of changed services and flushes the chains that went stale.
//! kube-proxy's own Go work (change tracking, building the transaction) is not modelled: the
//! timings here are the kernel side only, a lower bound for kube-proxy.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::services::{Endpoint, NAMESPACE, Port, Service};

pub const TABLE: &str = "kube-proxy";
const MASQ_MARK: &str = "0x4000";

/// The node's parameters the ruleset depends on.
#[derive(Debug, Clone)]
pub struct Options {
    /// The local-traffic detector (`--cluster-cidr`).
    pub cluster_cidr: String,
    pub service_cidr: String,
}

/// The transaction of kube-proxy's first (full) sync of `services`.
pub fn full_sync(services: &[Service], opts: &Options) -> String {
    let mut tx = Tx::default();
    setup(&mut tx, opts);
    for s in services {
        for port in &s.ports {
            service_port(&mut tx, s, port, opts, true);
        }
    }
    tx.text
}

/// The transaction of a partial sync after `old` changed into `new` (same name and ports).
pub fn partial_sync(old: &Service, new: &Service, opts: &Options) -> String {
    let mut tx = Tx::default();
    for port in &new.ports {
        service_port(&mut tx, new, port, opts, false);
    }
    // Chains of endpoints that went away are flushed now and deleted by a later sync.
    let current: BTreeSet<String> = new
        .ports
        .iter()
        .flat_map(|p| new.endpoints.iter().map(move |e| endpoint_chain(&new.name, p, e)))
        .collect();
    for port in &old.ports {
        for e in &old.endpoints {
            let chain = endpoint_chain(&old.name, port, e);
            if !current.contains(&chain) {
                tx.line(format_args!("flush chain ip {TABLE} {chain}"));
            }
        }
    }
    tx.text
}

/// Commands run around every transaction, as knftables' `List` does.
pub const LIST_COMMANDS: [[&str; 5]; 2] =
    [["nft", "--json", "list", "chains", "ip"], ["nft", "--json", "list", "sets", "ip"]];

#[derive(Default)]
struct Tx {
    text: String,
    chains: BTreeSet<String>,
}

impl Tx {
    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        let _ = self.text.write_fmt(args);
        self.text.push('\n');
    }

    /// kube-proxy's `ensureChain`: add and flush once per transaction.
    fn ensure_chain(&mut self, chain: &str) {
        if self.chains.insert(chain.to_owned()) {
            self.line(format_args!("add chain ip {TABLE} {chain}"));
            self.line(format_args!("flush chain ip {TABLE} {chain}"));
        }
    }

    fn rule(&mut self, chain: &str, rule: &str) {
        self.line(format_args!("add rule ip {TABLE} {chain} {rule}"));
    }
}

fn setup(tx: &mut Tx, opts: &Options) {
    tx.line(format_args!("add table ip {TABLE} {{ comment \"rules for kube-proxy\" ; }}"));
    // Numeric priorities: dstnat = -100, srcnat = 100 (nft 1.0.6 rejects names on output).
    let base = [
        ("filter-prerouting", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("filter-output-post-dnat", "filter", "output", -90),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ];
    for (name, kind, hook, priority) in base {
        tx.line(format_args!(
            "add chain ip {TABLE} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        ));
        tx.line(format_args!("flush chain ip {TABLE} {name}"));
    }
    let jumps = [
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        ("cluster-ips-check", "filter-output-post-dnat", "ct state new "),
    ];
    for (to, from, condition) in jumps {
        tx.ensure_chain(to);
        tx.rule(from, &format!("{condition}jump {to}"));
    }
    for chain in ["services", "cluster-ips-check", "masquerading", "mark-for-masquerade"] {
        tx.ensure_chain(chain);
    }
    tx.rule("mark-for-masquerade", &format!("mark set mark or {MASQ_MARK}"));
    tx.rule("masquerading", &format!("mark and {MASQ_MARK} == 0 return"));
    tx.rule("masquerading", &format!("mark set mark xor {MASQ_MARK}"));
    tx.rule("masquerading", "masquerade fully-random");

    tx.line(format_args!(
        "add set ip {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    ));
    tx.rule("cluster-ips-check", "ip daddr @cluster-ips reject");
    tx.rule("cluster-ips-check", &format!("ip daddr {{ {} }} drop", opts.service_cidr));

    let addr_map = "type ipv4_addr . inet_proto . inet_service : verdict";
    let port_map = "type inet_proto . inet_service : verdict";
    tx.line(format_args!("add map ip {TABLE} no-endpoint-services {{ {addr_map} ; }}"));
    tx.line(format_args!("add map ip {TABLE} no-endpoint-nodeports {{ {port_map} ; }}"));
    tx.line(format_args!("add chain ip {TABLE} reject-chain"));
    tx.line(format_args!("flush chain ip {TABLE} reject-chain"));
    tx.rule("reject-chain", "reject");
    tx.rule("service-endpoints-check", "ip daddr . meta l4proto . th dport vmap @no-endpoint-services");
    tx.rule(
        "nodeport-endpoints-check",
        "ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports",
    );
    tx.line(format_args!("add map ip {TABLE} firewall-ips {{ {addr_map} ; }}"));
    tx.ensure_chain("firewall-check");
    tx.rule("firewall-check", "ip daddr . meta l4proto . th dport vmap @firewall-ips");
    tx.line(format_args!("add map ip {TABLE} service-ips {{ {addr_map} ; }}"));
    tx.line(format_args!("add map ip {TABLE} service-nodeports {{ {port_map} ; }}"));
    tx.rule("services", "ip daddr . meta l4proto . th dport vmap @service-ips");
    tx.rule(
        "services",
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
    );
    tx.line(format_args!("flush set ip {TABLE} cluster-ips"));
    for map in
        ["service-ips", "firewall-ips", "no-endpoint-services", "no-endpoint-nodeports", "service-nodeports"]
    {
        tx.line(format_args!("flush map ip {TABLE} {map}"));
    }
}

/// Chains, rules and (on a full sync) map elements of one service port.
fn service_port(tx: &mut Tx, s: &Service, port: &Port, opts: &Options, elements: bool) {
    let chain = service_chain(&s.name, port);
    let endpoint_chains: Vec<String> = s.endpoints.iter().map(|e| endpoint_chain(&s.name, port, e)).collect();
    for c in &endpoint_chains {
        tx.ensure_chain(c);
    }
    if s.endpoints.is_empty() {
        if elements {
            tx.line(format_args!(
                "add element ip {TABLE} no-endpoint-services {{ {} . tcp . {} : goto reject-chain }}",
                s.cluster_ip, port.port
            ));
        }
        return;
    }
    tx.ensure_chain(&chain);
    if elements {
        tx.line(format_args!("add element ip {TABLE} cluster-ips {{ {} }}", s.cluster_ip));
        tx.line(format_args!(
            "add element ip {TABLE} service-ips {{ {} . tcp . {} : goto {chain} }}",
            s.cluster_ip, port.port
        ));
    }
    tx.rule(
        &chain,
        &format!(
            "ip daddr {} tcp dport {} ip saddr != {} jump mark-for-masquerade",
            s.cluster_ip, port.port, opts.cluster_cidr
        ),
    );
    let vmap: Vec<String> =
        endpoint_chains.iter().enumerate().map(|(i, c)| format!("{i} : goto {c}")).collect();
    tx.rule(&chain, &format!("numgen random mod {} vmap {{ {} }}", vmap.len(), vmap.join(", ")));
    for (e, c) in s.endpoints.iter().zip(&endpoint_chains) {
        tx.rule(c, &format!("ip saddr {} jump mark-for-masquerade", e.ip));
        tx.rule(c, &format!("meta l4proto tcp dnat to {}:{}", e.ip, port.target));
    }
}

fn service_chain(service: &str, port: &Port) -> String {
    let base = format!("{NAMESPACE}/{service}/tcp/{}", port.name);
    format!("service-{}-{base}", hash8(&base))
}

fn endpoint_chain(service: &str, port: &Port, e: &Endpoint) -> String {
    let base = format!("{NAMESPACE}/{service}/tcp/{}__{}/{}", port.name, e.ip, port.target);
    format!("endpoint-{}-{base}", hash8(&base))
}

/// Eight base32 characters of a hash of `name`, like kube-proxy's chain-name prefix (which
/// uses SHA-256; any stable hash gives the same name lengths).
fn hash8(name: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..8).map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::services::{synthetic, with_one_endpoint_replaced};

    fn opts() -> Options {
        Options { cluster_cidr: "10.0.0.0/16".into(), service_cidr: "10.96.0.0/16".into() }
    }

    #[test]
    fn full_sync_should_have_a_chain_per_service_and_per_endpoint() {
        let services = [synthetic(0, 3), synthetic(1, 3)];
        let tx = full_sync(&services, &opts());
        let chains = |prefix: &str| {
            let start = format!("add chain ip kube-proxy {prefix}");
            tx.lines().filter(|l| l.starts_with(&start) && l.contains("/tcp/")).count()
        };
        let (service_chains, endpoint_chains) = (chains("service-"), chains("endpoint-"));
        assert_eq!((service_chains, endpoint_chains), (2, 6));
        assert_eq!(tx.matches("numgen random mod 3 vmap").count(), 2);
        assert_eq!(tx.matches("add element ip kube-proxy service-ips").count(), 2);
        assert!(tx.contains("meta l4proto tcp dnat to 10.128.0.4:8080"), "{tx}");
    }

    #[test]
    fn partial_sync_should_rewrite_one_service_and_flush_the_stale_endpoint() {
        let old = synthetic(5, 10);
        let new = with_one_endpoint_replaced(&old, 1);
        let tx = partial_sync(&old, &new, &opts());
        assert_eq!(tx.matches("add chain").count(), 11, "10 endpoint chains and the service chain");
        assert!(!tx.contains("add element"), "an endpoint change leaves the maps alone");
        let stale = endpoint_chain(&old.name, &old.ports[0], &old.endpoints[9]);
        assert!(tx.ends_with(&format!("flush chain ip kube-proxy {stale}\n")), "{tx}");
    }

    #[test]
    fn chain_names_should_look_like_kube_proxys() {
        let name = service_chain("svc-1", &Port { name: "p", port: 80, target: 8080 });
        assert_eq!(name.len(), "service-".len() + 8 + "-bench/svc-1/tcp/p".len());
        assert!(name.ends_with("-bench/svc-1/tcp/p"));
    }
}
