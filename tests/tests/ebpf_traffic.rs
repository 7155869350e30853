//! Real traffic through ferry's eBPF backend in the sandbox topology of DESIGN.md: the backend
//! (`EbpfBackend`, built directly) attaches its TC programs to every interface of the node
//! namespace, pins its maps and links under a bpffs the test mounts on its own directory, and
//! installs its small nftables table in the node namespace. Pods, an external client and
//! processes of the node (through the socket programs on a cgroup the test creates) reach
//! services; the responders say which endpoint served and which source it saw.
//!
//! Runs as root (`cargo xtask test`). Everything lives in the sandbox's namespaces, the test's
//! bpffs and the test's cgroup, all removed on drop (also on panic). Nothing is attached to the
//! root namespace or the root cgroup.

mod ebpf_common;
// Not in ebpf_common: the criterion benches share that module and do not link the sandbox.
#[path = "ebpf_common/tc.rs"]
mod tc;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use aya::maps::MapData;
use ebpf_common::{Bpffs, PortPlan, plan_of};
use ferry_sandbox::{Cluster, ClusterSpec, Netns, Proto, Reply, Sandbox};
use proxy::backend::Backend;
use proxy::backend::ebpf::{EbpfBackend, EbpfOptions, TcAttach, TcHook};
use proxy::conntrack::{Flow, Netlink};
use proxy::model::IpFamily;
use proxy::plan::{NodeConfig, Plan};
use proxy_common::{Stat, maps, programs};
use tc::tc_programs;

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);
const SPREAD: usize = 40;

/// A cgroup v2 directory of this test; removed on drop (after its processes exited).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn create(test: &str) -> Self {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
            .expect("a cgroup v2 hierarchy");
        let dir = root.join(format!("ferry-test-{}-{test}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.0.display());
    }
}

struct Env {
    cluster: Cluster,
    backend: EbpfBackend,
    config: NodeConfig,
    // Dropped after the backend: the pins go with the bpffs, the programs with the namespaces.
    _fs: Bpffs,
    cgroup: TestCgroup,
    /// Dropped last: removes the namespaces.
    _sb: Sandbox,
}

fn env(test: &str) -> Env {
    env_with(test, |_| {})
}

/// The test's environment, with the backend's options changed by `tune`.
fn env_with(test: &str, tune: impl FnOnce(&mut EbpfOptions)) -> Env {
    let sb = Sandbox::new(test).expect("sandbox (kernel tests run as root)");
    let cluster =
        Cluster::build(&sb, &ClusterSpec { local_pods: 2, remote_pods: 1, responder_port: Some(PORT) })
            .expect("cluster");
    let fs = Bpffs::mount(test);
    let cgroup = TestCgroup::create(test);
    let mut options = EbpfOptions {
        bpffs: fs.path().to_path_buf(),
        cgroup_path: Some(cgroup.0.clone()),
        netns: Some(cluster.node.ns.name().to_owned()),
        ..EbpfOptions::default()
    };
    tune(&mut options);
    let backend = EbpfBackend::new(options).expect("backend");
    let mut config = NodeConfig::for_test(
        "node",
        &[&cluster.node.ip4.to_string(), &cluster.node.ip6.to_string()],
        &[&cluster.cluster_cidr4.to_string(), &cluster.cluster_cidr6.to_string()],
    );
    config.service_cidrs = vec![cluster.service_cidr4.into(), cluster.service_cidr6.into()];
    Env { cluster, backend, config, _fs: fs, cgroup, _sb: sb }
}

impl Env {
    fn endpoints(&self, v6: bool) -> Vec<SocketAddr> {
        self.cluster
            .pods
            .iter()
            .chain(&self.cluster.remote_pods)
            .map(|p| if v6 { p.addr6(PORT) } else { p.addr4(PORT) })
            .collect()
    }

    fn vip(&self, n: u8, v6: bool) -> IpAddr {
        if v6 {
            format!("fd00:96::{n}").parse().expect("v6")
        } else {
            format!("10.96.0.{n}").parse().expect("v4")
        }
    }

    fn sync(&mut self, plan: &Plan) -> usize {
        self.backend.sync(plan, None, &self.config).expect("eBPF sync").operations
    }

    /// One of the programs' counters, summed over CPUs.
    fn stat(&mut self, stat: Stat) -> u64 {
        self.backend.stats().expect("the programs' counters")[stat.index() as usize]
    }

    /// The source an endpoint sees when the node masquerades toward it.
    fn masquerade_source(&self, endpoint: SocketAddr) -> IpAddr {
        let local = self.cluster.pods.iter().any(|p| p.ips().contains(&endpoint.ip()));
        match (local, endpoint.is_ipv6()) {
            (true, false) => self.cluster.node.gateway4.into(),
            (true, true) => self.cluster.node.gateway6.into(),
            (false, false) => self.cluster.node.ip4.into(),
            (false, true) => self.cluster.node.ip6.into(),
        }
    }
}

fn sample(ns: &Netns, proto: Proto, target: SocketAddr, n: usize) -> Vec<Reply> {
    (0..n)
        .map(|i| {
            ns.request(proto, None, target, TIMEOUT)
                .unwrap_or_else(|e| panic!("{proto} request {i} from {} to {target}: {e}", ns.name()))
        })
        .collect()
}

fn servers(replies: &[Reply]) -> BTreeSet<SocketAddr> {
    replies.iter().map(|r| r.server).collect()
}

#[test]
fn pods_and_outside_clients_reach_services_over_tcp_and_udp_on_both_families() {
    let mut e = env("ebpf_traffic");
    let mut ports = Vec::new();
    for v6 in [false, true] {
        let eps = e.endpoints(v6);
        let vip = e.vip(10, v6).to_string();
        ports.push(PortPlan::cluster_ip("web", &vip, 80, &eps).node_port(if v6 { 30081 } else { 30080 }));
        ports.push(PortPlan::cluster_ip("dns", &vip, 53, &eps).udp());
        ports.push(PortPlan::cluster_ip("empty", &e.vip(20, v6).to_string(), 80, &[]));
    }
    let plan = plan_of(&ports);
    e.sync(&plan);
    let attached = e.backend.attached_interfaces();
    for iface in ["eth0", "client", "pod0", "pod1"] {
        assert!(attached.iter().any(|a| a == iface), "TC programs on {iface}: {attached:?}");
    }
    // `ferry status`'s view: the maps read back from the kernel list every frontend and
    // endpoint.
    let programmed = e.backend.programmed().expect("the eBPF backend reads its maps back");
    for frontend in
        ["10.96.0.10:80/tcp", "10.96.0.10:53/udp", "[fd00:96::10]:80/tcp", "<node-ipv4>:30080/tcp"]
    {
        assert!(programmed.contains(frontend), "{frontend} in:\n{programmed}");
    }
    for ep in e.endpoints(false).into_iter().chain(e.endpoints(true)) {
        assert!(programmed.contains(&format!(" {ep}\n")), "endpoint {ep} in:\n{programmed}");
    }

    for v6 in [false, true] {
        let client = &e.cluster.client;
        the_client_pod_reaches_every_endpoint_keeping_its_source(&e, v6);

        // From outside to the NodePort: masqueraded (policy Cluster), Maglev spreads flows.
        let node_ip = if v6 { IpAddr::V6(e.cluster.node.ip6) } else { IpAddr::V4(e.cluster.node.ip4) };
        let target = SocketAddr::new(node_ip, if v6 { 30081 } else { 30080 });
        let replies = sample(&e.cluster.ext.ns, Proto::Tcp, target, SPREAD);
        assert!(servers(&replies).len() >= 2, "NodePort flows spread: {:?}", servers(&replies));
        for r in &replies {
            assert_eq!(
                r.peer.ip(),
                e.masquerade_source(r.server),
                "external NodePort traffic is masqueraded"
            );
        }

        // No endpoints: refused at once (REJECT through the nftables rule).
        let target = SocketAddr::new(e.vip(20, v6), 80);
        let err = client.ns.tcp_request(target, TIMEOUT).expect_err("a service without endpoints refuses");
        assert!(err.is_refused(), "REJECT is a TCP RST: {err}");

        // A pod reaching itself through the service sees a masqueraded source.
        a_pod_reaching_itself_is_masqueraded(&e, v6);
    }
}

/// Translated packets pass receivers that verify their checksums, whether the sender left the
/// transport checksum to offload (CHECKSUM_PARTIAL when the programs see the packet: the field
/// holds only the pseudo-header sum) or computed it (CHECKSUM_NONE). The node's interfaces
/// finish checksums in software (transmit offload off), so the endpoints and the client check
/// every packet; with offload on, a veth receiver would trust an unfinished checksum and a
/// wrong update would go unnoticed. Covers both checksum paths of the programs: in the program
/// where the kernel lets them read the state (6.2+), the helpers otherwise.
#[test]
fn receivers_that_verify_checksums_accept_translated_packets_from_offloading_and_computing_senders() {
    for sender_offload in [true, false] {
        let mut e = env(if sender_offload { "csum_offload" } else { "csum_computed" });
        for iface in ["client", "pod0", "pod1", "eth0"] {
            e.cluster.node.ns.set_checksum_offload(iface, false, true).expect("node interface");
        }
        for pod in std::iter::once(&e.cluster.client).chain(&e.cluster.pods).chain(&e.cluster.remote_pods) {
            pod.ns.set_checksum_offload("eth0", sender_offload, true).expect("pod interface");
        }
        let mut ports = Vec::new();
        for v6 in [false, true] {
            let (eps, vip) = (e.endpoints(v6), e.vip(10, v6).to_string());
            ports.push(PortPlan::cluster_ip("web", &vip, 80, &eps));
            ports.push(PortPlan::cluster_ip("dns", &vip, 53, &eps).udp());
        }
        e.sync(&plan_of(&ports));
        for v6 in [false, true] {
            the_client_pod_reaches_every_endpoint_keeping_its_source(&e, v6);
        }
    }
}

/// The client pod reaches every endpoint of `web` (TCP 80) and `dns` (UDP 53) on VIP 10 of
/// the family, and the endpoints see its own address.
fn the_client_pod_reaches_every_endpoint_keeping_its_source(e: &Env, v6: bool) {
    let eps: BTreeSet<SocketAddr> = e.endpoints(v6).into_iter().collect();
    let client = &e.cluster.client;
    let client_ip = if v6 { IpAddr::V6(client.ip6) } else { IpAddr::V4(client.ip4) };
    for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
        let target = SocketAddr::new(e.vip(10, v6), port);
        let replies = sample(&client.ns, proto, target, SPREAD);
        assert_eq!(servers(&replies), eps, "{proto} from the client pod to {target} reaches every endpoint");
        for r in &replies {
            assert_eq!(r.peer.ip(), client_ip, "pod traffic keeps its source ({proto} {target})");
        }
    }
}

/// pod0 reaches itself through VIP 10's port 80 at least once in [`SPREAD`] requests and then
/// sees a masqueraded source (hairpin); the other endpoints see pod0.
fn a_pod_reaching_itself_is_masqueraded(e: &Env, v6: bool) {
    let pod0 = &e.cluster.pods[0];
    let own = if v6 { pod0.addr6(PORT) } else { pod0.addr4(PORT) };
    let replies = sample(&pod0.ns, Proto::Tcp, SocketAddr::new(e.vip(10, v6), 80), SPREAD);
    assert!(servers(&replies).contains(&own), "pod0 reached itself at least once in {SPREAD}");
    for r in &replies {
        let expected = if r.server == own { e.masquerade_source(own) } else { own.ip() };
        assert_eq!(r.peer.ip(), expected, "hairpin is masqueraded, other endpoints see pod0");
    }
}

/// `--bypass-netfilter`: pods reach services over TCP and UDP on both families with their
/// packets sent straight to the next hop in both directions, so the node's conntrack never
/// sees those flows (it does without the option: the second half). Connections that need
/// masquerade (a pod reaching itself, outside clients of a NodePort with policy Cluster) still
/// go through netfilter and work.
#[test]
fn with_netfilter_bypassed_pods_reach_services_and_the_node_conntrack_sees_none_of_it() {
    for bypass in [true, false] {
        let mut e =
            env_with(if bypass { "ebpf_bypass" } else { "ebpf_no_bypass" }, |o| o.bypass_netfilter = bypass);
        let mut ports = Vec::new();
        for v6 in [false, true] {
            let eps = e.endpoints(v6);
            let vip = e.vip(10, v6).to_string();
            ports.push(PortPlan::cluster_ip("web", &vip, 80, &eps).node_port(if v6 { 30081 } else { 30080 }));
            ports.push(PortPlan::cluster_ip("dns", &vip, 53, &eps).udp());
        }
        e.sync(&plan_of(&ports));
        let bypassed_before = e.stat(Stat::Bypassed);
        for v6 in [false, true] {
            the_client_pod_reaches_every_endpoint_keeping_its_source(&e, v6);
            let client_ip =
                if v6 { IpAddr::V6(e.cluster.client.ip6) } else { IpAddr::V4(e.cluster.client.ip4) };
            let family = if v6 { IpFamily::V6 } else { IpFamily::V4 };
            let seen: Vec<Flow> = e
                .cluster
                .node
                .ns
                .run(|| Netlink::open().and_then(|mut t| t.udp_flows(family)))
                .expect("a thread in the node namespace")
                .unwrap_or_else(|e| panic!("dumping the node's conntrack table: {e}"));
            let from_client: Vec<&Flow> =
                seen.iter().filter(|f| [f.orig_src.ip(), f.orig_dst.ip()].contains(&client_ip)).collect();
            if bypass {
                assert!(
                    from_client.is_empty(),
                    "{} UDP flows of the client in the node's conntrack, e.g. {:?}",
                    from_client.len(),
                    from_client.first()
                );
            } else {
                assert!(
                    !from_client.is_empty(),
                    "without the bypass conntrack tracks the client's UDP flows"
                );
            }

            // Masqueraded connections take the stack's path either way.
            a_pod_reaching_itself_is_masqueraded(&e, v6);
            let node_ip = if v6 { IpAddr::V6(e.cluster.node.ip6) } else { IpAddr::V4(e.cluster.node.ip4) };
            let target = SocketAddr::new(node_ip, if v6 { 30081 } else { 30080 });
            let replies = sample(&e.cluster.ext.ns, Proto::Tcp, target, SPREAD);
            for r in &replies {
                assert_eq!(r.peer.ip(), e.masquerade_source(r.server), "NodePort traffic is masqueraded");
            }
        }
        let bypassed = e.stat(Stat::Bypassed) - bypassed_before;
        if bypass {
            // Both families, TCP and UDP, SPREAD requests each: every request's packets (at
            // least one each way) skipped netfilter.
            assert!(bypassed >= 2 * 2 * 2 * SPREAD as u64, "packets sent straight on: {bypassed}");
        } else {
            assert_eq!(bypassed, 0, "nothing bypasses netfilter without the option");
        }
    }
}

#[test]
fn processes_of_the_node_reach_a_cluster_ip_through_the_socket_programs() {
    let mut e = env("ebpf_sockets");
    let eps = e.endpoints(false);
    e.sync(&plan_of(&[PortPlan::cluster_ip("web", "10.96.0.10", 80, &eps)]));
    // A shell in the test's cgroup, inside the node namespace, connects to the ClusterIP.
    let procs = e.cgroup.0.join("cgroup.procs");
    let script = format!(
        "echo $$ > {procs} && exec ip netns exec {ns} bash -c 'exec 3<>/dev/tcp/10.96.0.10/80; cat <&3'",
        procs = procs.display(),
        ns = e.cluster.node.ns.name()
    );
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let out = Command::new("bash").arg("-c").arg(&script).output().expect("bash");
        let text = String::from_utf8_lossy(&out.stdout);
        let reply = Reply::parse(text.trim()).unwrap_or_else(|| {
            panic!("node process got {text:?}, stderr {:?}", String::from_utf8_lossy(&out.stderr))
        });
        seen.insert(reply.server);
    }
    assert!(seen.len() >= 2, "node connections spread over endpoints: {seen:?}");
}

#[test]
fn a_restarted_backend_adopts_the_pinned_data_path_and_an_established_connection_survives() {
    let mut e = env("ebpf_restart");
    restart_keeps_an_established_connection(&mut e);
}

/// A restart of a ferry whose programs lay out a pinned map differently (an upgrade) creates
/// that map afresh instead of handing the old one to programs that would misread it, and
/// reuses the maps that still fit, also one configured with another capacity now (resizing
/// would drop its entries). Here ferry stops, `AFFINITY`'s pin is replaced by a map of another
/// layout (`SERVICES`'s map, pinned under its name), as another version might have left it,
/// and the new ferry is configured with twice the `CONNTRACK` capacity.
#[test]
fn a_restart_recreates_a_pinned_map_of_another_layout_and_reuses_the_others() {
    let mut e = env("ebpf_layout");
    let eps = e.endpoints(false);
    let plan = plan_of(&[PortPlan::cluster_ip("web", "10.96.0.40", 80, &eps)]);
    e.sync(&plan);
    let pins = e.backend.options().bpffs.join("ferry").join("maps");
    let info = |name: &str| {
        MapData::from_pin(pins.join(name))
            .and_then(|m| m.info())
            .unwrap_or_else(|err| panic!("pinned {name}: {err}"))
    };
    let layout = |name: &str| {
        let i = info(name);
        (i.key_size(), i.value_size())
    };
    let affinity_layout = layout(maps::AFFINITY);
    assert_ne!(affinity_layout, layout(maps::SERVICES), "the test needs two layouts");
    let conntrack = info(maps::CONNTRACK);

    let mut options = e.backend.options().clone();
    options.map_sizes.conntrack *= 2;
    drop(std::mem::replace(&mut e.backend, EbpfBackend::new(options).expect("backend")));
    std::fs::remove_file(pins.join(maps::AFFINITY)).expect("unpinning AFFINITY");
    MapData::from_pin(pins.join(maps::SERVICES))
        .expect("SERVICES")
        .pin(pins.join(maps::AFFINITY))
        .expect("pinning SERVICES's map as AFFINITY");
    e.sync(&plan);

    assert_eq!(layout(maps::AFFINITY), affinity_layout, "AFFINITY was handed over with another layout");
    let now = info(maps::CONNTRACK);
    assert_eq!(now.id(), conntrack.id(), "CONNTRACK still fits, yet it was replaced");
    assert_eq!(now.max_entries(), conntrack.max_entries(), "a pinned map keeps its capacity");
    let target: SocketAddr = "10.96.0.40:80".parse().expect("addr");
    let reply = e.cluster.client.ns.tcp_request(target, TIMEOUT);
    assert!(reply.is_ok(), "the service after the restart: {reply:?}");
}

/// Kernels before 6.6 have no TCX: there the programs sit in cls_bpf filters on the clsact
/// qdisc (`--tc-attach=netlink`, what `auto` picks on such kernels). The filters, not ferry,
/// hold the programs; a restart replaces the program in the same filter; a switch of hook
/// leaves one attachment, not two; cleanup deletes the filters.
#[test]
fn on_the_netlink_hook_a_restart_replaces_the_filters_program_and_cleanup_deletes_the_filters() {
    let mut e = env_with("ebpf_netlink", |o| o.tc_attach = TcAttach::Netlink);
    let node = e.cluster.node.ns.clone();
    // Program names as each listing shows them (TCX: the kernel's, cut to 15 characters).
    let filters =
        vec![format!("cls_bpf:{}", programs::TC_INGRESS), format!("cls_bpf:{}", programs::TC_EGRESS)];
    let links: Vec<String> =
        [programs::TC_INGRESS, programs::TC_EGRESS].iter().map(|p| format!("tcx:{:.15}", p)).collect();
    let plan = restart_keeps_an_established_connection(&mut e);
    // One filter per direction after two full syncs: replaced, not added.
    for iface in ["eth0", "client", "pod0", "pod1"] {
        assert_eq!(tc_programs(&node, iface), filters, "programs on {iface}");
    }

    // A restart with the other hook moves the programs; nothing is left on the first one.
    // Kernels before 6.6 have only the netlink hook: nothing to switch to there.
    if TcAttach::Auto.resolve() == TcHook::Tcx {
        let tcx = EbpfOptions { tc_attach: TcAttach::Tcx, ..e.backend.options().clone() };
        drop(std::mem::replace(&mut e.backend, EbpfBackend::new(tcx).expect("backend")));
        e.sync(&plan);
        assert_eq!(tc_programs(&node, "eth0"), links, "after switching to TCX");
        let netlink = EbpfOptions { tc_attach: TcAttach::Netlink, ..e.backend.options().clone() };
        drop(std::mem::replace(&mut e.backend, EbpfBackend::new(netlink).expect("backend")));
        e.sync(&plan);
        assert_eq!(tc_programs(&node, "eth0"), filters, "after switching back to netlink");
    }

    e.backend.cleanup().expect("cleanup");
    for iface in ["eth0", "client", "pod0", "pod1"] {
        assert_eq!(tc_programs(&node, iface), Vec::<String>::new(), "programs left on {iface}");
    }
    let target: SocketAddr = "10.96.0.30:90".parse().expect("addr");
    let after = e.cluster.client.ns.tcp_request(target, TIMEOUT);
    assert!(after.is_err(), "the service is gone with the filters: {after:?}");
}

/// A connection to a ClusterIP keeps working while the backend is dropped and a new one
/// adopts what the first left in the kernel.
fn restart_keeps_an_established_connection(e: &mut Env) -> Plan {
    // A long-lived echo server on pod0.
    let pod0 = e.cluster.pods[0].clone();
    let echo_addr = SocketAddr::new(pod0.ip4.into(), 9000);
    let listener = pod0.ns.run(move || TcpListener::bind(echo_addr)).expect("netns").expect("bind echo");
    std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut w = stream;
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                let _ = w.write_all(line.as_bytes());
                line.clear();
            }
        }
    });
    let plan = plan_of(&[PortPlan::cluster_ip("echo", "10.96.0.30", 90, &[echo_addr])]);
    e.sync(&plan);
    let target: SocketAddr = "10.96.0.30:90".parse().expect("addr");
    let stream = e
        .cluster
        .client
        .ns
        .run(move || TcpStream::connect_timeout(&target, TIMEOUT))
        .expect("netns")
        .expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut echo = |text: &str| {
        (&stream).write_all(format!("{text}\n").as_bytes()).expect("write");
        let mut line = String::new();
        reader.read_line(&mut line).expect("echo");
        assert_eq!(line.trim(), text);
    };
    echo("before");

    // ferry stops (its handles go; pins keep maps and links) and a new one starts.
    let options = e.backend.options().clone();
    drop(std::mem::replace(&mut e.backend, EbpfBackend::new(options).expect("backend")));
    echo("while ferry is away");
    let operations = e.sync(&plan);
    echo("after the restart");
    // Only the node-wide entries a fresh state rewrites; no set or frontend is touched.
    assert_eq!(operations, 0, "the restarted backend adopts what is pinned");
    plan
}
