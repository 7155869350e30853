//! Kernel tests of the sandbox itself: the topology carries traffic with the right addresses,
//! and everything is removed again, also after a panic. They need root:
//! `sudo -E cargo test -p ferry-sandbox --test sandbox`.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::sync::{Barrier, Mutex};
use std::time::Duration;

use ferry_sandbox::{Cluster, ClusterSpec, Netns, Process, Proto, Responder, Sandbox, Signal};

const TIMEOUT: Duration = Duration::from_secs(3);

fn sandbox(test: &str) -> Sandbox {
    Sandbox::new(test).unwrap_or_else(|e| panic!("cannot create the sandbox for {test}: {e}"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

/// Two namespaces `a` (10.9.0.1, fd09::1) and `b` (10.9.0.2, fd09::2) on one veth.
fn pair(sb: &Sandbox) -> (Netns, Netns) {
    let a = sb.netns("a").expect("netns a");
    let b = sb.netns("b").expect("netns b");
    sb.link(&a, "eth0", &b, "eth0").expect("veth a-b");
    for (ns, v4, v6) in [(&a, "10.9.0.1/24", "fd09::1/64"), (&b, "10.9.0.2/24", "fd09::2/64")] {
        ns.addr("eth0", v4).expect("IPv4 address");
        ns.addr("eth0", v6).expect("IPv6 address");
    }
    (a, b)
}

/// The namespaces `ip netns list` shows.
fn listed_namespaces() -> Vec<String> {
    let ip = if std::path::Path::new("/usr/sbin/ip").exists() { "/usr/sbin/ip" } else { "ip" };
    let output = Command::new(ip).args(["netns", "list"]).output().expect("ip netns list");
    assert!(output.status.success(), "ip netns list: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The network namespace the current thread is in, as `net:[inode]`.
fn current_netns() -> String {
    std::fs::read_link("/proc/thread-self/ns/net")
        .expect("readlink /proc/thread-self/ns/net")
        .to_string_lossy()
        .into_owned()
}

fn inode_of(ns: &Netns) -> String {
    let ino = std::fs::metadata(ns.path()).expect("stat the namespace").ino();
    format!("net:[{ino}]")
}

#[test]
fn pods_should_reach_each_other_with_their_own_addresses_over_tcp_and_udp_on_both_families() {
    let sb = sandbox("pods_reach_each_other");
    let cluster = Cluster::build(&sb, &ClusterSpec::default()).expect("build the cluster");
    let port = cluster.responder_port.expect("responders started");
    assert_eq!(cluster.pods.len(), 2);
    assert_eq!(cluster.remote_pods.len(), 1);

    // Local pods through the node, the remote pod through both nodes.
    for target in cluster.pods.iter().chain(&cluster.remote_pods) {
        for (client_ip, target_addr) in
            [(cluster.client.ips()[0], target.addr4(port)), (cluster.client.ips()[1], target.addr6(port))]
        {
            for proto in [Proto::Tcp, Proto::Udp] {
                let reply = cluster
                    .client
                    .ns
                    .request(proto, None, target_addr, TIMEOUT)
                    .unwrap_or_else(|e| panic!("client -> {} {target_addr}/{proto}: {e}", target.name));
                assert_eq!(reply.server, target_addr, "{proto} to {target_addr}: wrong server");
                assert_eq!(reply.peer.ip(), client_ip, "{proto} to {target_addr}: source rewritten");
            }
        }
    }

    // Pods reach the client pod back, and the remote pod reaches a local one.
    let rpod = &cluster.remote_pods[0];
    let reply = rpod.ns.tcp_request(cluster.pods[1].addr6(port), TIMEOUT).expect("rpod0 -> pod1 over IPv6");
    assert_eq!(reply.peer.ip(), IpAddr::from(rpod.ip6));

    // The external client reaches the node over the LAN bridge.
    cluster.node.ns.responder(cluster.node.ip4.into(), 9000, Proto::Tcp).expect("responder on the node");
    let reply = cluster
        .ext
        .ns
        .tcp_request(SocketAddr::new(cluster.node.ip4.into(), 9000), TIMEOUT)
        .expect("ext -> node");
    assert_eq!(reply.peer.ip(), IpAddr::from(cluster.ext.ip4));

    // Nothing leads out: the pods' only way is their node, and the node has no default route.
    let routes = cluster.node.ns.ip(&["route", "show", "default"]).expect("node routes");
    assert_eq!(routes.trim(), "", "the node must have no default route");
}

#[test]
fn sandbox_should_remove_its_namespaces_and_processes_when_a_test_panics() {
    let seen: Mutex<Option<(Vec<String>, Responder, Process)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let sb = sandbox("panicking_test");
        let (a, b) = pair(&sb);
        let responder = b.responder(ip("10.9.0.2"), 0, Proto::Tcp).expect("responder");
        let process = a.spawn(&["sleep", "600"]).expect("spawn sleep");
        let names = sb.namespaces();
        assert!(listed_namespaces().contains(&names[0]), "{} should exist while the test runs", names[0]);
        *seen.lock().expect("lock") = Some((names, responder, process));
        panic!("deliberate panic: the sandbox must clean up while unwinding");
    }));
    assert!(result.is_err(), "the closure should have panicked");

    let (names, responder, process) = seen.lock().expect("lock").take().expect("the sandbox was built");
    assert_eq!(names.len(), 2);
    let listed = listed_namespaces();
    for name in &names {
        assert!(!listed.contains(name), "namespace {name} left behind: {listed:?}");
    }
    assert!(!responder.is_running(), "the responder thread should have stopped");
    assert!(process.try_wait().expect("try_wait").is_some(), "the spawned process should be dead");
    assert!(
        !std::path::Path::new(&format!("/proc/{}", process.pid())).exists(),
        "the process should be reaped"
    );
}

#[test]
fn sandboxes_with_the_same_test_name_should_not_collide() {
    let barrier = Barrier::new(2);
    let results: Vec<(String, Vec<String>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    // Same names, same addresses, same port: only the namespaces tell them apart.
                    let sb = sandbox("same_name");
                    let (a, b) = pair(&sb);
                    b.responder(ip("10.9.0.2"), 7000, Proto::Tcp).expect("responder");
                    let reply = a.tcp_request(addr("10.9.0.2:7000"), TIMEOUT).expect("a -> b");
                    assert_eq!(reply.peer.ip(), ip("10.9.0.1"));
                    (sb.prefix().to_owned(), sb.namespaces())
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("sandbox thread")).collect()
    });
    assert_ne!(results[0].0, results[1].0, "prefixes must differ");
    assert!(results[0].0.contains("same_name"), "the prefix keeps the test name: {}", results[0].0);
    let listed = listed_namespaces();
    for name in results.iter().flat_map(|(_, names)| names) {
        assert!(!listed.contains(name), "namespace {name} left behind");
    }
}

#[test]
fn run_and_enter_should_switch_only_the_namespace_of_their_own_thread() {
    let sb = sandbox("run_and_enter");
    let ns = sb.netns("x").expect("netns");
    let outside = current_netns();

    let inside = ns.run(current_netns).expect("run");
    assert_eq!(inside, inode_of(&ns));
    assert_eq!(current_netns(), outside, "run must not move the calling thread");

    {
        let _guard = ns.enter().expect("enter");
        assert_eq!(current_netns(), inode_of(&ns));
    }
    assert_eq!(current_netns(), outside, "the guard must restore the namespace");

    let panicked =
        std::panic::catch_unwind(AssertUnwindSafe(|| ns.run(|| panic!("deliberate panic in run"))));
    assert!(panicked.is_err(), "a panic inside run reaches the caller");
    assert_eq!(current_netns(), outside);
}

#[test]
fn exec_should_run_inside_the_namespace_and_report_failures_with_stderr() {
    let root_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("root ip_forward");
    let sb = sandbox("exec");
    let (a, _b) = pair(&sb);

    // The forwarding sysctls are set in the namespace, not in the root namespace.
    let forwarding = a.exec(&["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]);
    assert_eq!(forwarding.expect("sysctl").split_whitespace().collect::<Vec<_>>(), ["1", "1"]);
    let rp_filter = a.exec(&["sysctl", "-n", "net.ipv4.conf.all.rp_filter"]).expect("sysctl");
    assert_eq!(rp_filter.trim(), "0");
    let after = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("root ip_forward");
    assert_eq!(after, root_forwarding, "the root namespace's sysctls are untouched");

    let addrs = a.exec(&["ip", "-o", "addr", "show", "dev", "eth0"]).expect("ip addr");
    assert!(addrs.contains("10.9.0.1/24") && addrs.contains("fd09::1/64"), "{addrs}");

    let table = "table inet ferry_sandbox_test {\n chain c {\n type filter hook input priority 0;\n }\n}\n";
    a.exec_with_input(&["nft", "-f", "-"], table).expect("nft -f -");
    let tables = a.exec(&["nft", "list", "tables"]).expect("nft list tables");
    assert!(tables.contains("ferry_sandbox_test"), "{tables}");

    let err = a.exec(&["ip", "link", "show", "nosuchdev"]).expect_err("a missing device fails");
    let message = err.to_string();
    assert!(message.contains("ip link show nosuchdev"), "the command is named: {message}");
    assert!(message.contains("nosuchdev\" does not exist"), "stderr is included: {message}");
}

#[test]
fn spawned_processes_should_run_in_the_namespace_until_signalled() {
    let sb = sandbox("spawn");
    let ns = sb.netns("x").expect("netns");
    let process = ns
        .spawn(&[
            "sh",
            "-c",
            "echo ready $(readlink /proc/self/ns/net); trap 'exit 7' TERM; while :; do sleep 0.1; done",
        ])
        .expect("spawn");
    process.wait_for_output("ready", TIMEOUT).expect("ready line");
    assert!(process.output().contains(&inode_of(&ns)), "runs in the namespace: {}", process.output());
    assert!(process.try_wait().expect("try_wait").is_none());

    process.signal(Signal::SIGTERM).expect("SIGTERM");
    let status = process.wait_timeout(TIMEOUT).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(7));
}

#[test]
fn requests_should_tell_a_refused_connection_from_a_dropped_one() {
    let sb = sandbox("refused_or_dropped");
    let (a, b) = pair(&sb);
    let short = Duration::from_millis(300);

    for target in [addr("10.9.0.2:9"), addr("[fd09::2]:9")] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let err = a.request(proto, None, target, TIMEOUT).expect_err("nothing listens");
            assert!(err.is_refused(), "{proto} to {target}: {err}");
        }
    }

    b.exec_with_input(
        &["nft", "-f", "-"],
        "table inet t {\n chain input {\n type filter hook input priority 0;\n th dport 9 drop\n }\n}\n",
    )
    .expect("nft drop rule");
    for target in [addr("10.9.0.2:9"), addr("[fd09::2]:9")] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let err = a.request(proto, None, target, short).expect_err("dropped");
            assert!(err.is_timeout(), "{proto} to {target}: {err}");
        }
    }
}

#[test]
fn requests_from_a_chosen_source_address_should_be_seen_with_that_address() {
    let sb = sandbox("chosen_source");
    let (a, b) = pair(&sb);
    a.addr("eth0", "10.9.0.3/24").expect("second IPv4 address");
    a.addr("eth0", "fd09::3/64").expect("second IPv6 address");
    for (server, source) in [("10.9.0.2", "10.9.0.3:0"), ("fd09::2", "[fd09::3]:0")] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let responder = b.responder(ip(server), 0, proto).expect("responder");
            let reply = a.request(proto, Some(addr(source)), responder.addr(), TIMEOUT).expect("request");
            assert_eq!(reply.server, responder.addr());
            assert_eq!(reply.peer.ip(), addr(source).ip(), "{proto}");
            assert_eq!(responder.served(), 1);
        }
    }
}

#[test]
fn remove_stale_namespaces_should_delete_only_those_of_dead_processes() {
    let sb = sandbox("stale");
    let live = sb.netns("live").expect("netns");
    // A namespace named like one left by a killed test process.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead_pid = child.id();
    child.wait().expect("wait for true");
    let stale = format!("fy{dead_pid}-0-stale-x");
    let ip = if std::path::Path::new("/usr/sbin/ip").exists() { "/usr/sbin/ip" } else { "ip" };
    let added = Command::new(ip).args(["netns", "add", &stale]).status().expect("ip netns add");
    assert!(added.success());

    let removed = ferry_sandbox::remove_stale_namespaces().expect("remove stale namespaces");
    assert!(removed.contains(&stale), "{stale} should be removed: {removed:?}");
    let listed = listed_namespaces();
    assert!(!listed.contains(&stale));
    assert!(listed.contains(&live.name().to_owned()), "a live sandbox's namespace stays");
}
