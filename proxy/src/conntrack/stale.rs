//! Which UDP flows a plan change leaves stale: a pure function of the [`PlanDiff`].
//!
//! UDP has no connection to tear down, so a conntrack entry outlives the endpoint it was DNATed
//! to: as long as the client keeps sending from the same socket (a resolver's long-lived DNS
//! socket), its datagrams follow the entry to the endpoint that is gone, and the new rules are
//! never consulted. kube-proxy therefore deletes such entries after each sync
//! (pkg/proxy/conntrack/cleanup.go); these are its rules, per service port of protocol UDP:
//!
//! - **An endpoint stops being used** (removed from the port's endpoints, or no longer
//!   serving): delete the flows to each of the port's frontends — ClusterIP, LoadBalancer IPs and
//!   external IPs at the service port, and the NodePort on any address — whose reply comes from
//!   that endpoint. Flows to the endpoints that remain are not touched.
//! - **A port starts having endpoints** (0 → some, including a port that appears with
//!   endpoints): delete the flows to its frontends that no current endpoint answers. While a
//!   frontend had nothing behind it, a datagram the node let through (no rule yet, or no
//!   service CIDR to drop it by) left an entry with no DNAT, which keeps that client talking
//!   to nowhere.
//! - **A port is removed**: delete every flow to its frontends.
//!
//! Where ferry differs, it is by being narrower or by closing a gap in the same spirit:
//! - Frontends are matched with their port, and endpoints by address *and* port (kube-proxy's
//!   diff-based cleanup matched addresses only), so another port of the same Service or pod
//!   is never disturbed.
//! - When a port starts having endpoints, kube-proxy's diff-based cleanup deleted every flow to
//!   its frontends; ferry keeps those already DNATed to a current endpoint, as kube-proxy's
//!   current full reconciliation does. This matters on ferry's start, where every port appears
//!   at once: healthy flows survive a restart or upgrade of ferry.
//! - A frontend added to a port that already has endpoints (a new external IP or NodePort) is
//!   treated like a port that starts having endpoints.
//! - A removed port clears its external frontends and NodePort as well as its ClusterIP
//!   (kube-proxy's diff-based cleanup cleared only the ClusterIP).
//!
//! "Used endpoints" are the plan's cluster and node-local endpoint sets. kube-proxy instead
//! looks at every *serving* endpoint, regardless of traffic policy, topology hints or the
//! terminating fallback, so that a policy or topology change never cuts a running flow; the
//! plan does not carry that set today, so here an endpoint that leaves this node's sets while
//! still serving (a topology hint moves it away, or it starts terminating while ready ones
//! exist) has its UDP flows re-balanced too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::model::{IpFamily, Protocol};
use crate::plan::{PlanDiff, ServicePortPlan};

/// One class of UDP conntrack entries to delete (a `conntrack -D -p udp` filter).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Filter {
    pub family: IpFamily,
    /// The original destination address; `None` matches any address (a NodePort, which
    /// answers on every node address).
    pub dst_ip: Option<IpAddr>,
    /// The original destination port.
    pub dst_port: u16,
    /// Which flows to that destination, by the source of their replies.
    pub reply: Reply,
}

/// The reply side of a [`Filter`]: after DNAT, replies come from the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Reply {
    /// Every flow.
    Any,
    /// Flows DNATed to this (stale) endpoint.
    From(SocketAddr),
    /// Flows not DNATed to any of these (current) endpoints, sorted: those without DNAT, and
    /// those to other endpoints.
    NotFrom(Vec<SocketAddr>),
}

impl Reply {
    fn matches(&self, reply_src: SocketAddr) -> bool {
        match self {
            Reply::Any => true,
            Reply::From(ep) => *ep == reply_src,
            Reply::NotFrom(eps) => !eps.contains(&reply_src),
        }
    }
}

impl Filter {
    /// Whether a UDP flow (original destination, reply source) matches.
    pub fn matches(&self, orig_dst: SocketAddr, reply_src: SocketAddr) -> bool {
        IpFamily::of(&orig_dst.ip()) == self.family
            && orig_dst.port() == self.dst_port
            && self.dst_ip.is_none_or(|ip| ip == orig_dst.ip())
            && self.reply.matches(reply_src)
    }

    fn destination(&self) -> (IpFamily, Option<IpAddr>, u16) {
        (self.family, self.dst_ip, self.dst_port)
    }
}

impl fmt::Display for Filter {
    /// The `conntrack` command line that deletes the same entries (for logs and people);
    /// `conntrack` has no negated match, so [`Reply::NotFrom`] is a comment.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.family {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        };
        write!(f, "conntrack -D -f {family} -p udp")?;
        if let Some(ip) = self.dst_ip {
            write!(f, " --orig-dst {ip}")?;
        }
        write!(f, " --orig-port-dst {}", self.dst_port)?;
        match &self.reply {
            Reply::Any => Ok(()),
            Reply::From(ep) => write!(f, " --reply-src {} --reply-port-src {}", ep.ip(), ep.port()),
            Reply::NotFrom(eps) => {
                let eps: Vec<String> = eps.iter().map(SocketAddr::to_string).collect();
                write!(f, "  # unless the reply comes from {}", eps.join(", "))
            }
        }
    }
}

/// The UDP flows to delete after a sync: a set of [`Filter`]s, deduplicated and ordered.
/// Accumulate them over syncs that failed ([`extend`](Self::extend)) and delete them once one
/// succeeded, so that a failed sync does not lose a cleanup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StaleFlows {
    filters: BTreeSet<Filter>,
}

impl StaleFlows {
    pub fn filters(&self) -> impl Iterator<Item = &Filter> {
        self.filters.iter()
    }

    /// The filters of one family.
    pub fn family(&self, family: IpFamily) -> impl Iterator<Item = &Filter> {
        self.filters.iter().filter(move |f| f.family == family)
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }

    pub fn extend(&mut self, other: StaleFlows) {
        self.filters.extend(other.filters);
        self.normalize();
    }

    pub fn clear(&mut self) {
        self.filters.clear();
    }

    /// Whether a UDP flow matches any filter.
    pub fn matches(&self, orig_dst: SocketAddr, reply_src: SocketAddr) -> bool {
        self.filters.iter().any(|f| f.matches(orig_dst, reply_src))
    }

    fn insert(&mut self, frontend: Frontend, reply: Reply) {
        self.filters.insert(frontend.filter(reply));
    }

    /// One filter per destination where one covers the others: `Any` covers everything; the
    /// `NotFrom` of several syncs merge into one (a flow matches either when its endpoint is
    /// missing from either list); `NotFrom` covers the `From` of endpoints it doesn't list.
    fn normalize(&mut self) {
        let mut by_destination: BTreeMap<(IpFamily, Option<IpAddr>, u16), Vec<Reply>> = BTreeMap::new();
        for f in std::mem::take(&mut self.filters) {
            by_destination.entry(f.destination()).or_default().push(f.reply);
        }
        for ((family, dst_ip, dst_port), replies) in by_destination {
            let mut not_from: Option<Vec<SocketAddr>> = None;
            let mut from = BTreeSet::new();
            let mut any = false;
            for reply in replies {
                match reply {
                    Reply::Any => any = true,
                    Reply::From(ep) => {
                        from.insert(ep);
                    }
                    Reply::NotFrom(eps) => {
                        not_from = Some(match not_from {
                            None => eps,
                            Some(kept) => kept.into_iter().filter(|e| eps.contains(e)).collect(),
                        });
                    }
                }
            }
            let mut add = |reply| self.filters.insert(Filter { family, dst_ip, dst_port, reply });
            if any {
                add(Reply::Any);
                continue;
            }
            for ep in from {
                if not_from.as_ref().is_none_or(|kept| kept.contains(&ep)) {
                    add(Reply::From(ep));
                }
            }
            if let Some(kept) = not_from {
                add(Reply::NotFrom(kept));
            }
        }
    }
}

/// A frontend of a UDP service port: an address with the service port, or a NodePort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Frontend {
    Addr(IpAddr, u16),
    NodePort(IpFamily, u16),
}

impl Frontend {
    fn filter(self, reply: Reply) -> Filter {
        let (family, dst_ip, dst_port) = match self {
            Frontend::Addr(ip, port) => (IpFamily::of(&ip), Some(ip), port),
            Frontend::NodePort(family, port) => (family, None, port),
        };
        Filter { family, dst_ip, dst_port, reply }
    }
}

fn frontends(p: &ServicePortPlan) -> BTreeSet<Frontend> {
    let mut out: BTreeSet<Frontend> = std::iter::once(&p.cluster_ip)
        .chain(p.external_addresses())
        .map(|ip| Frontend::Addr(*ip, p.port))
        .collect();
    if let Some(node_port) = p.node_port {
        out.insert(Frontend::NodePort(p.family, node_port));
    }
    out
}

/// Endpoints whose flows stay: every serving endpoint, as kube-proxy keeps them, also those
/// that policies or topology no longer choose for new flows.
fn used_endpoints(p: &ServicePortPlan) -> BTreeSet<SocketAddr> {
    p.serving_endpoints.iter().chain(&p.cluster_endpoints).chain(&p.local_endpoints).copied().collect()
}

/// Frontends that start having endpoints: their flows that no current endpoint answers.
fn opened(out: &mut StaleFlows, p: &ServicePortPlan, frontends: Vec<Frontend>) {
    let current: Vec<SocketAddr> = used_endpoints(p).into_iter().collect();
    for f in frontends {
        out.insert(f, Reply::NotFrom(current.clone()));
    }
}

fn is_udp(p: &ServicePortPlan) -> bool {
    p.protocol == Protocol::Udp
}

/// The UDP flows that the change from the previous plan to the current one leaves stale; see
/// the module documentation for the rules. Pure: touches nothing.
pub fn stale_flows(diff: &PlanDiff) -> StaleFlows {
    let mut out = StaleFlows::default();
    for p in diff.added.iter().filter(|p| is_udp(p) && p.has_endpoints) {
        opened(&mut out, p, frontends(p).into_iter().collect());
    }
    for (old, new) in diff.changed.iter().filter(|(old, new)| is_udp(old) && is_udp(new)) {
        let (old_frontends, new_frontends) = (frontends(old), frontends(new));
        let kept = used_endpoints(new);
        for gone in used_endpoints(old).difference(&kept) {
            // Frontends the port just lost as well: their flows still lead to the endpoint.
            for f in old_frontends.union(&new_frontends) {
                out.insert(*f, Reply::From(*gone));
            }
        }
        if new.has_endpoints {
            let fresh: Vec<Frontend> = if old.has_endpoints {
                new_frontends.difference(&old_frontends).copied().collect()
            } else {
                new_frontends.iter().copied().collect()
            };
            opened(&mut out, new, fresh);
        }
    }
    for p in diff.removed.iter().filter(|p| is_udp(p)) {
        for f in frontends(p) {
            out.insert(f, Reply::Any);
        }
    }
    out.normalize();
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{ServiceKey, ServicePortName};

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an IP address")
    }

    /// `dns` 53/UDP of e2e/svc on ClusterIP 10.96.0.10, endpoints on 8053.
    fn udp_port(endpoints: &[&str]) -> ServicePortPlan {
        let name = ServicePortName {
            service: ServiceKey::new("e2e", "svc"),
            port: "dns".into(),
            protocol: Protocol::Udp,
        };
        let eps = endpoints.iter().map(|e| sa(e)).collect();
        let mut p = ServicePortPlan::cluster_ip_only(name, ip("10.96.0.10"), 53, eps);
        // The cases stand for endpoints going away by editing `cluster_endpoints`; none of
        // them may still count as serving.
        p.serving_endpoints.clear();
        p
    }

    fn exposed(mut p: ServicePortPlan) -> ServicePortPlan {
        p.node_port = Some(30053);
        p.external_ips = vec![ip("203.0.113.7")];
        p.load_balancer_ips = vec![ip("203.0.113.8")];
        p
    }

    fn changed(old: ServicePortPlan, new: ServicePortPlan) -> PlanDiff {
        PlanDiff { changed: vec![(Arc::new(old), Arc::new(new))], ..PlanDiff::default() }
    }

    fn commands(s: &StaleFlows) -> Vec<String> {
        s.filters().map(ToString::to_string).collect()
    }

    #[test]
    fn a_removed_endpoint_clears_its_flows_on_every_frontend_and_keeps_the_others() {
        let old = exposed(udp_port(&["10.0.1.10:8053", "10.0.1.11:8053"]));
        let new = exposed(udp_port(&["10.0.1.11:8053"]));
        let stale = stale_flows(&changed(old, new));
        assert_eq!(
            commands(&stale),
            [
                "conntrack -D -f ipv4 -p udp --orig-port-dst 30053 --reply-src 10.0.1.10 --reply-port-src 8053",
                "conntrack -D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.0.1.10 --reply-port-src 8053",
                "conntrack -D -f ipv4 -p udp --orig-dst 203.0.113.7 --orig-port-dst 53 --reply-src 10.0.1.10 --reply-port-src 8053",
                "conntrack -D -f ipv4 -p udp --orig-dst 203.0.113.8 --orig-port-dst 53 --reply-src 10.0.1.10 --reply-port-src 8053",
            ]
        );
        assert!(stale.matches(sa("10.96.0.10:53"), sa("10.0.1.10:8053")));
        assert!(stale.matches(sa("192.168.0.10:30053"), sa("10.0.1.10:8053")), "NodePort on any address");
        assert!(!stale.matches(sa("10.96.0.10:53"), sa("10.0.1.11:8053")), "the remaining endpoint");
        assert!(!stale.matches(sa("10.96.0.10:54"), sa("10.0.1.10:8053")), "another port");
        assert!(!stale.matches(sa("10.96.0.10:53"), sa("10.0.1.10:9053")), "another port of the pod");
    }

    #[test]
    fn the_last_endpoint_going_away_clears_its_flows_only() {
        let stale = stale_flows(&changed(udp_port(&["10.0.1.10:8053"]), udp_port(&[])));
        assert_eq!(
            commands(&stale),
            [
                "conntrack -D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.0.1.10 --reply-port-src 8053"
            ]
        );
    }

    #[test]
    fn a_port_going_from_no_endpoints_to_some_clears_the_flows_its_endpoints_do_not_answer() {
        let stale = stale_flows(&changed(exposed(udp_port(&[])), exposed(udp_port(&["10.0.1.10:8053"]))));
        assert_eq!(
            commands(&stale),
            [
                "conntrack -D -f ipv4 -p udp --orig-port-dst 30053  # unless the reply comes from 10.0.1.10:8053",
                "conntrack -D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53  # unless the reply comes from 10.0.1.10:8053",
                "conntrack -D -f ipv4 -p udp --orig-dst 203.0.113.7 --orig-port-dst 53  # unless the reply comes from 10.0.1.10:8053",
                "conntrack -D -f ipv4 -p udp --orig-dst 203.0.113.8 --orig-port-dst 53  # unless the reply comes from 10.0.1.10:8053",
            ]
        );
        assert!(stale.matches(sa("10.96.0.10:53"), sa("10.96.0.10:53")), "an entry without DNAT");
        assert!(stale.matches(sa("10.96.0.10:53"), sa("10.0.1.99:8053")), "DNATed elsewhere");
        assert!(!stale.matches(sa("10.96.0.10:53"), sa("10.0.1.10:8053")), "DNATed to the endpoint");
    }

    #[test]
    fn an_added_port_with_endpoints_clears_flows_its_endpoints_do_not_answer_and_one_without_does_nothing() {
        // Also ferry's first sync after a start: flows already DNATed to a current endpoint stay.
        let with = PlanDiff { added: vec![Arc::new(udp_port(&["10.0.1.10:8053"]))], ..PlanDiff::default() };
        assert_eq!(
            commands(&stale_flows(&with)),
            [
                "conntrack -D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53  # unless the reply comes from 10.0.1.10:8053"
            ]
        );
        let without = PlanDiff { added: vec![Arc::new(udp_port(&[]))], ..PlanDiff::default() };
        assert!(stale_flows(&without).is_empty());
    }

    #[test]
    fn a_removed_port_clears_every_flow_to_its_frontends() {
        let diff = PlanDiff {
            removed: vec![Arc::new(exposed(udp_port(&["10.0.1.10:8053"])))],
            ..PlanDiff::default()
        };
        let stale = stale_flows(&diff);
        assert_eq!(stale.len(), 4);
        assert!(stale.filters().all(|f| f.reply == Reply::Any));
        assert!(stale.matches(sa("203.0.113.8:53"), sa("10.0.1.10:8053")));
    }

    #[test]
    fn a_frontend_added_to_a_serving_port_is_cleared_and_the_old_ones_are_not() {
        let old = udp_port(&["10.0.1.10:8053"]);
        let new = exposed(udp_port(&["10.0.1.10:8053"]));
        let stale = stale_flows(&changed(old, new));
        assert_eq!(
            commands(&stale),
            [
                "conntrack -D -f ipv4 -p udp --orig-port-dst 30053  # unless the reply comes from 10.0.1.10:8053",
                "conntrack -D -f ipv4 -p udp --orig-dst 203.0.113.7 --orig-port-dst 53  # unless the reply comes from 10.0.1.10:8053",
                "conntrack -D -f ipv4 -p udp --orig-dst 203.0.113.8 --orig-port-dst 53  # unless the reply comes from 10.0.1.10:8053",
            ]
        );
    }

    #[test]
    fn an_endpoint_removed_with_a_frontend_is_cleared_on_that_frontend_too() {
        let old = exposed(udp_port(&["10.0.1.10:8053", "10.0.1.11:8053"]));
        let new = udp_port(&["10.0.1.11:8053"]);
        let stale = stale_flows(&changed(old, new));
        assert!(stale.matches(sa("203.0.113.7:53"), sa("10.0.1.10:8053")));
        assert!(stale.matches(sa("192.168.0.10:30053"), sa("10.0.1.10:8053")));
        // Removing a frontend alone cuts no flow, as for TCP.
        assert!(!stale.matches(sa("203.0.113.7:53"), sa("10.0.1.11:8053")));
    }

    #[test]
    fn local_endpoints_count_as_used() {
        let mut old = udp_port(&[]);
        old.internal_policy_local = true;
        old.local_endpoints = vec![sa("10.0.1.10:8053")];
        old.has_endpoints = true;
        let mut new = old.clone();
        new.local_endpoints.clear();
        let stale = stale_flows(&changed(old.clone(), new));
        assert!(stale.matches(sa("10.96.0.10:53"), sa("10.0.1.10:8053")));
        // Moving between the sets is no change.
        let mut moved = old.clone();
        moved.internal_policy_local = false;
        moved.cluster_endpoints = moved.local_endpoints.clone();
        assert!(stale_flows(&changed(old, moved)).is_empty());
    }

    #[test]
    fn tcp_ports_and_unchanged_endpoints_clear_nothing() {
        let mut tcp_old = udp_port(&["10.0.1.10:8080"]);
        tcp_old.protocol = Protocol::Tcp;
        let mut tcp_new = tcp_old.clone();
        tcp_new.cluster_endpoints.clear();
        tcp_new.has_endpoints = false;
        let mut diff = changed(tcp_old.clone(), tcp_new);
        diff.removed.push(Arc::new(tcp_old.clone()));
        diff.added.push(Arc::new(tcp_old));
        assert!(stale_flows(&diff).is_empty());
        let mut affinity = udp_port(&["10.0.1.10:8053"]);
        let before = affinity.clone();
        affinity.affinity_timeout = Some(10);
        assert!(stale_flows(&changed(before, affinity)).is_empty());
    }

    #[test]
    fn ipv6_ports_get_ipv6_filters() {
        let mut old = udp_port(&["[fd00:10::1:10]:8053"]);
        old.family = IpFamily::V6;
        old.cluster_ip = ip("fd00:96::10");
        old.node_port = Some(30053);
        let mut new = old.clone();
        new.cluster_endpoints.clear();
        new.has_endpoints = false;
        let stale = stale_flows(&changed(old, new));
        assert!(stale.filters().all(|f| f.family == IpFamily::V6));
        assert!(stale.matches(sa("[fd00::10]:30053"), sa("[fd00:10::1:10]:8053")));
        assert!(!stale.matches(sa("192.168.0.10:30053"), sa("10.0.1.10:8053")), "the other family");
        assert_eq!(stale.family(IpFamily::V4).count(), 0);
    }

    #[test]
    fn accumulated_flows_drop_endpoint_filters_covered_by_a_whole_frontend() {
        let mut pending = stale_flows(&changed(
            udp_port(&["10.0.1.10:8053", "10.0.1.11:8053"]),
            udp_port(&["10.0.1.11:8053"]),
        ));
        assert_eq!(pending.len(), 1);
        pending.extend(stale_flows(&PlanDiff {
            removed: vec![Arc::new(udp_port(&["10.0.1.11:8053"]))],
            ..PlanDiff::default()
        }));
        assert_eq!(
            commands(&pending),
            ["conntrack -D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53"]
        );
        pending.clear();
        assert!(pending.is_empty());
    }

    #[test]
    fn accumulated_filters_of_one_frontend_merge_into_the_narrowest_set_that_matches_the_same_flows() {
        let (a, b, c) = (sa("10.0.1.10:8053"), sa("10.0.1.11:8053"), sa("10.0.1.12:8053"));
        let opened = |eps: &[&str]| {
            stale_flows(&PlanDiff { added: vec![Arc::new(udp_port(eps))], ..PlanDiff::default() })
        };
        // Opened with A and B, then (before a cleanup) A and B again and C: a flow is stale
        // under either when its endpoint is missing from either list.
        let mut pending = opened(&["10.0.1.10:8053", "10.0.1.11:8053"]);
        pending.extend(opened(&["10.0.1.11:8053", "10.0.1.12:8053"]));
        let replies: Vec<&Reply> = pending.filters().map(|f| &f.reply).collect();
        assert_eq!(replies, [&Reply::NotFrom(vec![b])]);
        // A stale endpoint that the merged list already excludes needs no filter of its own;
        // one it still lists does.
        pending.extend(stale_flows(&changed(
            udp_port(&["10.0.1.10:8053", "10.0.1.11:8053"]),
            udp_port(&["10.0.1.11:8053"]),
        )));
        assert_eq!(pending.len(), 1, "A is covered");
        pending.extend(stale_flows(&changed(udp_port(&["10.0.1.11:8053"]), udp_port(&["10.0.1.12:8053"]))));
        let replies: Vec<&Reply> = pending.filters().map(|f| &f.reply).collect();
        assert_eq!(replies, [&Reply::From(b), &Reply::NotFrom(vec![b])]);
        for (ep, stale) in [(a, true), (b, true), (c, true)] {
            assert_eq!(pending.matches(sa("10.96.0.10:53"), ep), stale, "{ep}");
        }
    }

    /// The plan's own diff, end to end: a slice change that drops one endpoint.
    #[test]
    fn a_planner_diff_dropping_an_endpoint_yields_its_filters() {
        use crate::plan::{NodeConfig, Planner};
        use crate::source::manifests::parse_file;
        use crate::store::{Store, StoreEvent};

        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: e2e}\nspec:\n  \
                       clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]\n  ports:\n  - {name: dns, protocol: UDP, port: 53}\n";
        let slice = |eps: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-a\n  namespace: e2e\n  \
                 labels: {{kubernetes.io/service-name: dns}}\naddressType: IPv4\n\
                 ports: [{{name: dns, protocol: UDP, port: 8053}}]\nendpoints: [{eps}]\n"
            )
        };
        let ep = |ip: &str| format!("{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}");
        let apply = |store: &mut Store, text: &str| {
            for obj in parse_file(std::path::Path::new("test.yaml"), text).expect("valid YAML") {
                store.handle(StoreEvent::Apply(obj));
            }
        };
        let config = NodeConfig::for_test("node", &["192.168.0.10"], &["10.0.0.0/16"]);
        let mut store = Store::new();
        let mut planner = Planner::new();
        apply(&mut store, service);
        apply(&mut store, &slice(&format!("{}, {}", ep("10.0.1.10"), ep("10.0.1.11"))));
        let changes = store.take_changes();
        let first = planner.update(&store, &config, &changes);
        assert_eq!(
            commands(&stale_flows(&first)),
            [
                "conntrack -D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53  # unless the reply comes from \
                 10.0.1.10:8053, 10.0.1.11:8053"
            ],
            "the first sync opens the port"
        );
        apply(&mut store, &slice(&ep("10.0.1.11")));
        let changes = store.take_changes();
        let second = planner.update(&store, &config, &changes);
        assert_eq!(
            commands(&stale_flows(&second)),
            [
                "conntrack -D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.0.1.10 --reply-port-src 8053"
            ]
        );
    }
}
