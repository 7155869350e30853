//! End-to-end suite of UDP conntrack cleanup (`proxy::conntrack`): the real nftables backend
//! programs a sandboxed node (`proxy::backend::build` with the node's namespace), long-lived
//! UDP sockets in pods and on the external client keep sending to Service frontends, and the
//! cleanup runs inside the node namespace (on a thread that entered it) with the diff of the
//! sync that changed the Service. Each test first shows the failure the cleanup exists for —
//! a datagram following a stale conntrack entry — and then that the cleanup ends it, touching
//! no other flow.
//!
//! Runs as root (`cargo xtask test`, or `cargo test -p ferry-sandbox --test conntrack_e2e`);
//! nothing is touched outside the test's namespaces: every netlink socket is opened inside the
//! node namespace. Timings are printed (`-- --nocapture` shows them).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_sandbox::{Cluster, ClusterSpec, Netns, Pod, Reply, Sandbox};
use proxy::backend::{self, BackendKind, BackendOptions};
use proxy::conntrack::{self, CleanupReport, Flow, Netlink, StaleFlows};
use proxy::model::IpFamily;
use proxy::plan::{NodeConfig, PlanDiff, Planner};
use proxy::source::manifests::parse_file;
use proxy::store::{Store, StoreEvent};

/// Timeout of a request that must be answered.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request waits before it counts as unanswered.
const DROP_TIMEOUT: Duration = Duration::from_millis(400);
/// Port of the pods' responders (TCP and UDP, both families).
const POD_PORT: u16 = 8080;
/// The UDP port of the test Service (`dns`, 53/UDP) and its NodePort.
const DNS: u16 = 53;
const DNS_NODE_PORT: u16 = 30053;
/// Sockets opened at most to find one whose flow lands on a given endpoint (two endpoints,
/// uniform choice: missing one in 64 tries has a chance of 2^-63).
const PIN_TRIES: usize = 64;
/// The node's discard interface for the service CIDRs: connections to a ClusterIP that no rule
/// translates follow this route to nowhere, as on a real node. An empty bridge, which discards
/// what it is given.
const SERVICE_DUMMY: &str = "svc0";

/// ClusterIP number `n`: `10.96.0.<n>` or `fd00:96::<n>` (same digits).
fn cluster_ip(n: u8, family: IpFamily) -> IpAddr {
    let text = match family {
        IpFamily::V4 => format!("10.96.0.{n}"),
        IpFamily::V6 => format!("fd00:96::{n}"),
    };
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// The external IP of the `dns` Service (TEST-NET), routed from `ext` to the node.
fn external_ip(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => Ipv4Addr::new(203, 0, 113, 10).into(),
        IpFamily::V6 => Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10).into(),
    }
}

/// A pod's responder address in one family.
fn pod_addr(pod: &Pod, family: IpFamily) -> SocketAddr {
    match family {
        IpFamily::V4 => pod.addr4(POD_PORT),
        IpFamily::V6 => pod.addr6(POD_PORT),
    }
}

fn pod_ip(pod: &Pod, family: IpFamily) -> IpAddr {
    pod_addr(pod, family).ip()
}

/// A dual-stack Service of namespace `e2e` and its two EndpointSlices, targeting the pods'
/// responders: `http` 80/TCP and `dns` 53/UDP, with NodePorts and external IPs when exposed.
#[derive(Clone)]
struct Service {
    name: &'static str,
    /// Its ClusterIPs are number `n` ([`cluster_ip`]).
    n: u8,
    exposed: bool,
    udp: bool,
    endpoints: Vec<Pod>,
}

impl Service {
    /// `dns` on ClusterIP 10, NodePorts 30080/TCP and 30053/UDP, the external IPs.
    fn dns(endpoints: &[&Pod]) -> Self {
        let endpoints = endpoints.iter().map(|p| (*p).clone()).collect();
        Self { name: "dns", n: 10, exposed: true, udp: true, endpoints }
    }

    /// `other` on ClusterIP 11, not exposed.
    fn other(endpoints: &[&Pod]) -> Self {
        Self { name: "other", n: 11, exposed: false, ..Self::dns(endpoints) }
    }

    fn yaml(&self) -> String {
        let (name, n) = (self.name, self.n);
        let (ip4, ip6) = (cluster_ip(n, IpFamily::V4), cluster_ip(n, IpFamily::V6));
        let kind = if self.exposed { "NodePort" } else { "ClusterIP" };
        let mut y = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: e2e}}\nspec:\n  type: {kind}\n  \
             ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: \"{ip4}\"\n  \
             clusterIPs: [\"{ip4}\", \"{ip6}\"]\n"
        );
        if self.exposed {
            let (e4, e6) = (external_ip(IpFamily::V4), external_ip(IpFamily::V6));
            let _ = writeln!(y, "  externalIPs: [\"{e4}\", \"{e6}\"]");
        }
        let mut ports = vec![("http", "TCP", 80, 30080)];
        if self.udp {
            ports.push(("dns", "UDP", DNS, DNS_NODE_PORT));
        }
        y.push_str("  ports:\n");
        for (port, proto, number, node_port) in &ports {
            let _ =
                write!(y, "  - {{name: {port}, protocol: {proto}, port: {number}, targetPort: {POD_PORT}");
            if self.exposed {
                let _ = write!(y, ", nodePort: {node_port}");
            }
            y.push_str("}\n");
        }
        for (family, suffix, address_type) in [(IpFamily::V4, "v4", "IPv4"), (IpFamily::V6, "v6", "IPv6")] {
            let _ = write!(
                y,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{suffix}\n  \
                 namespace: e2e\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {address_type}\nports:\n"
            );
            for (port, proto, _, _) in &ports {
                let _ = writeln!(y, "- {{name: {port}, protocol: {proto}, port: {POD_PORT}}}");
            }
            y.push_str(if self.endpoints.is_empty() { "endpoints: []\n" } else { "endpoints:\n" });
            for pod in &self.endpoints {
                let _ = writeln!(
                    y,
                    "- {{addresses: [\"{}\"], nodeName: {}, conditions: {{ready: true, serving: true, terminating: false}}}}",
                    pod_ip(pod, family),
                    pod.node
                );
            }
        }
        y
    }
}

/// ferry's control path without the daemon, on a sandboxed cluster: the store, the planner and
/// the real nftables backend programming the node namespace, one explicit sync at a time.
struct Node {
    cluster: Cluster,
    store: Store,
    planner: Planner,
    config: NodeConfig,
    backend: Box<dyn backend::Backend>,
    synced: bool,
    /// Dropped last: removes the namespaces and everything in them.
    _sandbox: Sandbox,
}

impl Node {
    /// The node (two local pods with responders), the node's route of the service CIDRs to
    /// nowhere and `ext`'s route of the external IPs to the node. Without `service_cidrs` ferry
    /// cannot tell an unallocated service address from any other and lets traffic to it through
    /// (no `--service-cidr`, a cluster without ServiceCIDR objects).
    fn new(test: &str, service_cidrs: bool) -> Self {
        let sb = Sandbox::new(test).unwrap_or_else(|e| panic!("sandbox for {test}: {e}"));
        let spec = ClusterSpec { local_pods: 2, remote_pods: 0, responder_port: Some(POD_PORT) };
        let cluster = Cluster::build(&sb, &spec).unwrap_or_else(|e| panic!("cluster for {test}: {e}"));
        let (node, ext) = (&cluster.node, &cluster.ext.ns);
        let routes = || -> ferry_sandbox::Result<()> {
            node.ns.ip(&["link", "add", SERVICE_DUMMY, "type", "bridge"])?;
            node.ns.ip(&["link", "set", SERVICE_DUMMY, "up"])?;
            let (cidr4, src4) = (cluster.service_cidr4.to_string(), node.ip4.to_string());
            let (cidr6, src6) = (cluster.service_cidr6.to_string(), node.ip6.to_string());
            node.ns.ip(&["-4", "route", "add", &cidr4, "dev", SERVICE_DUMMY, "src", &src4])?;
            node.ns.ip(&["-6", "route", "add", &cidr6, "dev", SERVICE_DUMMY, "src", &src6])?;
            ext.route_via("203.0.113.0/24", node.ip4.into())?;
            ext.route_via("2001:db8:1::/64", node.ip6.into())
        };
        routes().unwrap_or_else(|e| panic!("routes for {test}: {e}"));
        let config = NodeConfig {
            node_name: node.name.clone(),
            node_ips: node.ips().to_vec(),
            cluster_cidrs: vec![cluster.cluster_cidr4.into(), cluster.cluster_cidr6.into()],
            service_cidrs: if service_cidrs {
                vec![cluster.service_cidr4.into(), cluster.service_cidr6.into()]
            } else {
                Vec::new()
            },
            ..NodeConfig::default()
        };
        let options = BackendOptions { netns: Some(node.ns.name().to_owned()), ..BackendOptions::default() };
        let backend = backend::build(BackendKind::Nftables, &options).expect("the nftables backend");
        Self {
            cluster,
            store: Store::new(),
            planner: Planner::new(),
            config,
            backend,
            synced: false,
            _sandbox: sb,
        }
    }

    fn pod(&self, i: usize) -> Pod {
        self.cluster.pods[i].clone()
    }

    /// `ClusterIP:port` of Service number `n`.
    fn cluster_addr(&self, n: u8, family: IpFamily, port: u16) -> SocketAddr {
        SocketAddr::new(cluster_ip(n, family), port)
    }

    /// The node's address and a port, as NodePort clients use it.
    fn node_addr(&self, family: IpFamily, port: u16) -> SocketAddr {
        match family {
            IpFamily::V4 => SocketAddr::new(self.cluster.node.ip4.into(), port),
            IpFamily::V6 => SocketAddr::new(self.cluster.node.ip6.into(), port),
        }
    }

    /// Puts a Service (and its slices) into the store and programs the node; returns the diff
    /// that sync applied.
    fn apply(&mut self, svc: &Service) -> PlanDiff {
        let file = format!("{}.yaml", svc.name);
        for obj in parse_file(Path::new(&file), &svc.yaml()).expect("the Service's manifest") {
            self.store.handle(StoreEvent::Apply(obj));
        }
        let changes = self.store.take_changes();
        let diff = self.planner.update(&self.store, &self.config, &changes);
        let partial = self.synced.then_some(&diff);
        self.backend.sync(self.planner.plan(), partial, &self.config).expect("nftables sync");
        self.synced = true;
        diff
    }

    /// What a restarted ferry does: a new planner and backend, whose first sync plans and
    /// writes everything (the store stands for the relisted objects); returns that diff.
    fn restart(&mut self) -> PlanDiff {
        self.planner = Planner::new();
        let options = BackendOptions {
            netns: Some(self.cluster.node.ns.name().to_owned()),
            ..BackendOptions::default()
        };
        self.backend = backend::build(BackendKind::Nftables, &options).expect("the nftables backend");
        let diff = self.planner.update(&self.store, &self.config, &Default::default());
        self.backend.sync(self.planner.plan(), None, &self.config).expect("nftables sync");
        diff
    }

    /// Runs the cleanup for `diff` inside the node namespace; also returns the time the call
    /// took from the test's side (thread start and `setns` included).
    fn cleanup(&self, diff: &PlanDiff) -> (CleanupReport, Duration) {
        self.clean(&conntrack::stale_flows(diff))
    }

    fn clean(&self, stale: &StaleFlows) -> (CleanupReport, Duration) {
        let started = Instant::now();
        let report = self
            .cluster
            .node
            .ns
            .run(|| conntrack::cleanup(stale))
            .expect("a thread in the node namespace")
            .unwrap_or_else(|e| panic!("conntrack cleanup: {e}"));
        (report, started.elapsed())
    }

    /// The node namespace's UDP conntrack entries of one family.
    fn flows(&self, family: IpFamily) -> Vec<Flow> {
        self.cluster
            .node
            .ns
            .run(|| Netlink::open().and_then(|mut t| t.udp_flows(family)))
            .expect("a thread in the node namespace")
            .unwrap_or_else(|e| panic!("dumping the node's conntrack table: {e}"))
    }

    /// One fresh UDP request from `ns` (a new socket, so a new flow); panics unanswered.
    fn request(&self, ns: &Netns, target: SocketAddr) -> Reply {
        ns.udp_request(target, TIMEOUT).unwrap_or_else(|e| panic!("UDP from {ns} to {target}: {e}"))
    }
}

/// A long-lived UDP socket, connected to one frontend like a resolver's socket to its DNS
/// server: every datagram has the same 5-tuple, so it follows the same conntrack entry.
struct UdpClient {
    socket: UdpSocket,
    ns: String,
    target: SocketAddr,
}

impl UdpClient {
    /// Opens the socket inside `ns` (it stays there) and connects it to `target`.
    fn open(ns: &Netns, target: SocketAddr) -> Self {
        let any: IpAddr =
            if target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        let socket = ns
            .run(|| -> io::Result<UdpSocket> {
                let s = UdpSocket::bind(SocketAddr::new(any, 0))?;
                s.connect(target)?;
                Ok(s)
            })
            .expect("a thread in the client namespace")
            .unwrap_or_else(|e| panic!("UDP socket to {target} in {ns}: {e}"));
        Self { socket, ns: ns.name().to_owned(), target }
    }

    /// The client's address as the node sees it (what conntrack records as the source).
    fn source(&self, ns_ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ns_ip, self.socket.local_addr().expect("a bound socket").port())
    }

    /// Sends one datagram and waits up to `timeout` for the answer.
    ///
    /// A datagram that went nowhere can come back seconds later as an ICMP host or network
    /// unreachable (the node gave up resolving its next hop); the kernel reports that on the
    /// socket's next call. Such late reports of earlier datagrams are skipped: the answer to
    /// this one may still come. They are returned only when no answer does.
    fn ask(&self, timeout: Duration) -> io::Result<Reply> {
        let deadline = Instant::now() + timeout;
        let _ = self.socket.take_error();
        self.socket.send(b"who\n")?;
        let mut buf = [0u8; 512];
        let mut unreachable = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            self.socket.set_read_timeout(Some(left))?;
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    return Reply::parse(&text)
                        .ok_or_else(|| io::Error::other(format!("unexpected reply {text:?}")));
                }
                Err(e) if is_unreachable(&e) && Instant::now() < deadline => unreachable = Some(e),
                Err(e) if is_timeout(&e) => return Err(unreachable.unwrap_or(e)),
                Err(e) => return Err(e),
            }
        }
    }

    /// The endpoint that answers; panics when none does.
    fn served_by(&self) -> SocketAddr {
        self.ask(TIMEOUT)
            .unwrap_or_else(|e| panic!("UDP from {} to {}: no answer: {e}", self.ns, self.target))
            .server
    }

    /// No endpoint answers (twice, so it is no passing loss) and nothing refuses: the
    /// datagrams vanish.
    fn assert_black_holed(&self, what: &str) {
        for _ in 0..2 {
            match self.ask(DROP_TIMEOUT) {
                Ok(r) => panic!("{what}: {} answered from {}", self.target, r.server),
                Err(e) => assert!(
                    is_timeout(&e) || is_unreachable(&e),
                    "{what}: expected no answer (a black hole), got: {e}"
                ),
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn is_unreachable(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable)
}

/// Makes a pod's endpoint stop answering UDP without a trace: its namespace drops every UDP
/// datagram it receives (the pod's own namespace, created by the sandbox).
fn silence(pod: &Pod) {
    let rules = "table inet ferry_test_dead {\n  chain input {\n    type filter hook input priority 0;\n    \
                 meta l4proto udp drop\n  }\n}\n";
    pod.ns
        .exec_with_input(&["nft", "-f", "-"], rules)
        .unwrap_or_else(|e| panic!("silencing {}: {e}", pod.name));
}

/// Opens sockets from `ns` to `target` until one flow lands on each of `endpoints`; returns
/// those sockets, in the order of `endpoints`. The others are dropped (their conntrack entries
/// stay, which the precision checks account for).
fn pin(ns: &Netns, target: SocketAddr, endpoints: &[SocketAddr]) -> Vec<UdpClient> {
    let mut found: Vec<Option<UdpClient>> = endpoints.iter().map(|_| None).collect();
    for _ in 0..PIN_TRIES {
        if found.iter().all(Option::is_some) {
            break;
        }
        let client = UdpClient::open(ns, target);
        let server = client.served_by();
        let i = endpoints
            .iter()
            .position(|e| *e == server)
            .unwrap_or_else(|| panic!("{target} from {ns} answered by {server}, not one of {endpoints:?}"));
        found[i].get_or_insert(client);
    }
    found
        .into_iter()
        .zip(endpoints)
        .map(|(c, e)| c.unwrap_or_else(|| panic!("no flow from {ns} to {target} landed on {e}")))
        .collect()
}

/// Flows by identity: (client, frontend, kernel id).
fn by_identity(flows: Vec<Flow>) -> BTreeMap<(SocketAddr, SocketAddr, Option<u32>), Flow> {
    flows.into_iter().map(|f| ((f.orig_src, f.orig_dst, f.id), f)).collect()
}

#[test]
fn udp_flows_to_a_removed_endpoint_black_hole_until_cleanup_then_reach_a_live_endpoint() {
    let mut node = Node::new("udp_removed_endpoint", true);
    let (pod0, pod1) = (node.pod(0), node.pod(1));
    node.apply(&Service::dns(&[&pod0, &pod1]));
    let client = node.cluster.client.clone();
    let ext = node.cluster.ext.clone();

    // Per family and frontend, one socket whose flow went to pod0 and one whose flow went to pod1.
    struct Pinned {
        what: String,
        family: IpFamily,
        to_pod0: UdpClient,
        to_pod1: UdpClient,
    }
    let mut pinned = Vec::new();
    for family in IpFamily::ALL {
        let (dead, live) = (pod_addr(&pod0, family), pod_addr(&pod1, family));
        let frontends = [
            ("ClusterIP from a pod", &client.ns, node.cluster_addr(10, family, DNS)),
            ("NodePort from outside", &ext.ns, node.node_addr(family, DNS_NODE_PORT)),
            ("external IP from outside", &ext.ns, SocketAddr::new(external_ip(family), DNS)),
        ];
        for (what, ns, target) in frontends {
            let mut clients = pin(ns, target, &[dead, live]).into_iter();
            let (to_pod0, to_pod1) = (clients.next().expect("pod0's"), clients.next().expect("pod1's"));
            pinned.push(Pinned { what: format!("{what} ({target})"), family, to_pod0, to_pod1 });
        }
    }

    // pod0 leaves the Service: the rules send new flows to pod1 only...
    let diff = node.apply(&Service::dns(&[&pod1]));
    for family in IpFamily::ALL {
        for _ in 0..10 {
            let fresh = node.request(&client.ns, node.cluster_addr(10, family, DNS));
            assert_eq!(fresh.server, pod_addr(&pod1, family), "a new flow after pod0 left");
        }
    }
    // ...but the running flows still follow their conntrack entries to pod0.
    for p in &pinned {
        assert_eq!(
            p.to_pod0.served_by(),
            pod_addr(&pod0, p.family),
            "{}: the stale entry leads to pod0",
            p.what
        );
    }
    // pod0 goes away for good: its flows now end in a black hole, the others are unaffected.
    silence(&pod0);
    for p in &pinned {
        p.to_pod0.assert_black_holed(&p.what);
        assert_eq!(p.to_pod1.served_by(), pod_addr(&pod1, p.family), "{}: pod1's flow", p.what);
    }

    let before: Vec<Flow> = IpFamily::ALL.into_iter().flat_map(|f| node.flows(f)).collect();
    let to_pod0 = |f: &Flow| IpFamily::ALL.into_iter().any(|fam| f.reply_src == pod_addr(&pod0, fam));
    let stale_count = before.iter().filter(|f| to_pod0(f)).count();
    assert!(stale_count >= pinned.len(), "every pinned flow to pod0 is in the table: {before:#?}");

    let (report, wall) = node.cleanup(&diff);
    eprintln!(
        "cleanup after pod0 left: {} filters, {} UDP flows scanned, {} deleted in {:?} ({wall:?} with the \
         thread entering the namespace)",
        report.filters, report.scanned, report.deleted, report.duration
    );
    assert_eq!(report.matched, stale_count, "exactly the flows DNATed to pod0 match");
    assert_eq!(report.deleted, stale_count, "and all of them are deleted");

    // The table lost exactly those flows; every other entry is the same entry as before.
    let after = by_identity(IpFamily::ALL.into_iter().flat_map(|f| node.flows(f)).collect());
    let expected = by_identity(before.into_iter().filter(|f| !to_pod0(f)).collect());
    assert_eq!(after, expected, "only pod0's flows were deleted");

    // The very next datagram of each black-holed socket reaches pod1.
    for p in &pinned {
        assert_eq!(p.to_pod0.served_by(), pod_addr(&pod1, p.family), "{}: after cleanup", p.what);
        assert_eq!(p.to_pod1.served_by(), pod_addr(&pod1, p.family), "{}: pod1's flow", p.what);
    }
}

/// On its start ferry sees every port appear with its endpoints (kube-proxy's "newly active"
/// case, for all of them); flows already DNATed to a current endpoint are healthy and stay.
#[test]
fn healthy_udp_flows_survive_a_restart_of_ferry() {
    let mut node = Node::new("udp_restart", true);
    let (pod0, pod1) = (node.pod(0), node.pod(1));
    node.apply(&Service::dns(&[&pod0, &pod1]));
    let client = node.cluster.client.clone();
    let mut pinned = Vec::new();
    for family in IpFamily::ALL {
        let endpoints = [pod_addr(&pod0, family), pod_addr(&pod1, family)];
        let target = node.cluster_addr(10, family, DNS);
        pinned.extend(pin(&client.ns, target, &endpoints).into_iter().zip(endpoints));
    }
    let before: Vec<Flow> = IpFamily::ALL.into_iter().flat_map(|f| node.flows(f)).collect();

    let diff = node.restart();
    assert!(!diff.added.is_empty(), "a restarted ferry sees every port as added");
    let (report, wall) = node.cleanup(&diff);
    eprintln!("cleanup after a restart: {report:?} ({wall:?} with the thread entering the namespace)");
    assert_eq!(report.deleted, 0, "no flow was stale: {report:?}");
    let after: Vec<Flow> = IpFamily::ALL.into_iter().flat_map(|f| node.flows(f)).collect();
    assert_eq!(by_identity(after), by_identity(before), "every entry is the same as before");
    for (client, endpoint) in &pinned {
        assert_eq!(client.served_by(), *endpoint, "a running flow keeps its endpoint");
    }
}

/// kube-proxy's "newly active" case: while a Service has no DNAT for a frontend, a datagram
/// that the node lets through leaves an entry with a null NAT binding, and every later datagram
/// of that flow keeps it — even once the Service has endpoints.
#[test]
fn a_udp_flow_that_began_before_its_service_had_endpoints_reaches_them_after_cleanup() {
    let mut node = Node::new("udp_newly_active", false);
    let client = node.cluster.client.clone();
    let (pod0, pod1) = (node.pod(0), node.pod(1));
    // ferry runs (another Service is programmed), but knows no service CIDR: the datagrams to
    // the not yet allocated ClusterIP are let through, routed to nowhere, and recorded.
    node.apply(&Service::other(&[&pod1]));
    let sockets: Vec<(IpFamily, UdpClient)> = IpFamily::ALL
        .into_iter()
        .map(|family| (family, UdpClient::open(&client.ns, node.cluster_addr(10, family, DNS))))
        .collect();
    for (_, s) in &sockets {
        s.assert_black_holed("before the Service exists");
    }

    let diff = node.apply(&Service::dns(&[&pod0]));
    for (family, s) in &sockets {
        // A new flow is served; the running one keeps its entry without DNAT, which the
        // Service's rules now refuse as traffic to an undefined frontend.
        let fresh = node.request(&client.ns, node.cluster_addr(10, *family, DNS));
        assert_eq!(fresh.server, pod_addr(&pod0, *family));
        let answer = s.ask(TIMEOUT);
        assert!(answer.is_err(), "the running flow is not served: {answer:?}");
        let source = s.source(if *family == IpFamily::V4 { client.ip4.into() } else { client.ip6.into() });
        let entry = node.flows(*family).into_iter().find(|f| f.orig_src == source);
        let entry = entry.unwrap_or_else(|| panic!("the client's entry from {source}"));
        assert_eq!(entry.reply_src, entry.orig_dst, "an entry without DNAT: {entry}");
    }

    // The cleanup deletes the flows to the frontend that no endpoint answers: the two without
    // DNAT. The fresh flows, DNATed to pod0, stay.
    let to_frontend = |node: &Node| -> Vec<Flow> {
        IpFamily::ALL
            .into_iter()
            .flat_map(|f| {
                let frontend = node.cluster_addr(10, f, DNS);
                node.flows(f).into_iter().filter(move |flow| flow.orig_dst == frontend)
            })
            .collect()
    };
    let before = to_frontend(&node);
    assert_eq!(before.len(), 4, "per family, the running flow and the fresh one: {before:#?}");
    let (report, wall) = node.cleanup(&diff);
    eprintln!(
        "cleanup of a newly active Service: {report:?} ({wall:?} with the thread entering the namespace)"
    );
    assert_eq!(report.deleted, 2, "the entry without DNAT of each family");
    let dnated: Vec<Flow> = before.into_iter().filter(|f| f.reply_src != f.orig_dst).collect();
    assert_eq!(by_identity(to_frontend(&node)), by_identity(dnated), "the fresh flows are untouched");
    for (family, s) in &sockets {
        assert_eq!(s.served_by(), pod_addr(&pod0, *family), "after cleanup");
    }
}

#[test]
fn a_udp_port_removed_from_its_service_is_refused_to_running_flows_after_cleanup() {
    let mut node = Node::new("udp_removed_port", true);
    let pod0 = node.pod(0);
    let client = node.cluster.client.clone();
    node.apply(&Service::dns(&[&pod0]));
    let sockets: Vec<(IpFamily, UdpClient)> = IpFamily::ALL
        .into_iter()
        .map(|family| (family, UdpClient::open(&client.ns, node.cluster_addr(10, family, DNS))))
        .collect();
    for (family, s) in &sockets {
        assert_eq!(s.served_by(), pod_addr(&pod0, *family));
    }

    // The Service keeps its TCP port only: 53/UDP is now an undefined port (REJECT)...
    let tcp_only = Service { udp: false, ..Service::dns(&[&pod0]) };
    let diff = node.apply(&tcp_only);
    for (family, s) in &sockets {
        let fresh = client.ns.udp_request(node.cluster_addr(10, *family, DNS), TIMEOUT);
        assert!(fresh.as_ref().is_err_and(|e| e.is_refused()), "a new flow is refused: {fresh:?}");
        // ...yet the running flow keeps reaching the endpoint through its entry.
        assert_eq!(s.served_by(), pod_addr(&pod0, *family), "the stale entry still leads to pod0");
    }

    let (report, wall) = node.cleanup(&diff);
    eprintln!("cleanup of a removed UDP port: {report:?} ({wall:?} with the thread entering the namespace)");
    assert_eq!(report.deleted, 2, "the running flow of each family");
    for (_, s) in &sockets {
        let answer = s.ask(TIMEOUT);
        assert!(
            answer.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused),
            "after cleanup the running flow is refused like a new one: {answer:?}"
        );
    }
}

/// How long a cleanup takes when the table is large: the node namespace holds `UNRELATED`
/// UDP flows that match nothing and `STALE` flows to a NodePort, which a newly active Service
/// clears. The kernel filters the dump by destination port, so only candidates are read.
#[test]
fn cleanup_reads_a_large_table_quickly_and_deletes_only_its_matches() {
    const UNRELATED: u16 = 50_000;
    const STALE: usize = 200;
    let mut node = Node::new("udp_cleanup_scale", true);
    // Something programmed, so that the node namespace tracks connections at all.
    let pod1 = node.pod(1);
    node.apply(&Service::other(&[&pod1]));
    let node_ip = IpAddr::from(node.cluster.node.ip4);
    // Datagrams from the node to its own address, each to another closed port: one conntrack
    // entry each, and nothing leaves the namespace. Then one datagram per socket to the
    // NodePort-to-be.
    let sockets = node
        .cluster
        .node
        .ns
        .run(|| -> io::Result<Vec<UdpSocket>> {
            let bulk = UdpSocket::bind(SocketAddr::new(node_ip, 0))?;
            for port in (1..=UNRELATED).filter(|p| *p != DNS_NODE_PORT) {
                bulk.send_to(b"x", SocketAddr::new(node_ip, port))?;
            }
            let mut stale = Vec::new();
            for _ in 0..STALE {
                let s = UdpSocket::bind(SocketAddr::new(node_ip, 0))?;
                s.send_to(b"x", SocketAddr::new(node_ip, DNS_NODE_PORT))?;
                stale.push(s);
            }
            Ok(stale)
        })
        .expect("a thread in the node namespace")
        .expect("sending from the node");
    let in_table = node.flows(IpFamily::V4).len();

    // The filters of a Service that appears with a UDP NodePort (computed, not programmed).
    let stale_flows = {
        let dns = Service::dns(&[&node.pod(0)]);
        let mut store = Store::new();
        let mut planner = Planner::new();
        for obj in parse_file(Path::new("dns.yaml"), &dns.yaml()).expect("the manifest") {
            store.handle(StoreEvent::Apply(obj));
        }
        let changes = store.take_changes();
        conntrack::stale_flows(&planner.update(&store, &node.config, &changes))
    };
    let (report, wall) = node.clean(&stale_flows);
    eprintln!(
        "cleanup with {in_table} UDP flows in the table: {} filters, {} flows read, {} deleted in {:?} \
         ({wall:?} with the thread entering the namespace)",
        report.filters, report.scanned, report.deleted, report.duration
    );
    assert!(in_table > usize::from(UNRELATED), "the table was filled: {in_table} flows");
    assert_eq!((report.matched, report.deleted), (STALE, STALE));
    assert!(report.scanned < STALE + 10, "only flows to the filters' ports were examined: {report:?}");
    // A bound far above what it takes (a fraction of a second in a debug build), against a
    // cleanup that would read the table entry by entry or wait on the socket.
    assert!(report.duration < Duration::from_secs(10), "{report:?}");
    let started = Instant::now();
    let all = node.flows(IpFamily::V4).len();
    eprintln!("for comparison, reading all {all} UDP flows: {:?}", started.elapsed());
    let left = node.flows(IpFamily::V4);
    assert!(left.iter().all(|f| f.orig_dst.port() != DNS_NODE_PORT), "no flow to the NodePort is left");
    assert_eq!(left.len(), in_table - STALE, "the unrelated flows are untouched");
    drop(sockets);
}
