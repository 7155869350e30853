//! Program-level tests of ferry's eBPF data path: crafted packets run through the TC programs
//! with BPF_PROG_TEST_RUN, with the maps written by the backend's own state machine from a
//! plan. Each test checks the rewritten headers (addresses, ports, IPv4 header and TCP/UDP
//! checksums), the verdict and the marks (masquerade, reject).
//!
//! Runs as root (`cargo xtask test`). Nothing is attached anywhere: programs are only loaded,
//! and their maps pinned under a bpffs this test mounts on its own temporary directory and
//! unmounts on drop (also on panic).

mod ebpf_common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ebpf_common::{Bpffs, Frame, PortPlan, TestRun, plan_of};
use proxy::backend::ebpf::kernel::{Kernel, ProgramSettings};
use proxy::backend::ebpf::state::State;
use proxy::backend::ebpf::{MapSizes, kernel_skb, maglev};
use proxy::plan::NodeConfig;
use proxy_common::{Stat, mark, programs};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

fn v4(s: &str) -> Ipv4Addr {
    s.parse().expect("IPv4 literal")
}

fn sock(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

fn config() -> NodeConfig {
    let mut c = NodeConfig::for_test("node", &["192.168.0.10", "fd00::10"], &["10.0.0.0/16", "fd00:10::/64"]);
    c.service_cidrs = vec!["10.96.0.0/16".parse().expect("cidr"), "fd00:96::/112".parse().expect("cidr")];
    c
}

/// Loads the object with fresh maps and writes `plan` through the backend's state machine.
fn load(test: &str, ports: &[PortPlan]) -> (Bpffs, Kernel) {
    load_with(test, ports, &ProgramSettings::default())
}

fn load_with(test: &str, ports: &[PortPlan], settings: &ProgramSettings) -> (Bpffs, Kernel) {
    let fs = Bpffs::mount(test);
    let mut kernel =
        Kernel::load_with(fs.path(), &MapSizes::default(), settings).expect("load ferry's eBPF object");
    let plan = plan_of(ports);
    let mut state = State::new(maglev::DEFAULT_TABLE_SIZE);
    state.full(&plan, &config(), kernel.maps()).expect("write the maps");
    (fs, kernel)
}

fn stat(kernel: &mut Kernel, s: Stat) -> u64 {
    use proxy::backend::ebpf::maps::DataPathMaps;
    kernel.maps().stats()[s.index() as usize]
}

/// Both ways the programs update transport checksums: reading the checksum state where the
/// kernel allows it (Linux 6.2+), and the `bpf_l4_csum_replace` helpers. Loads `ports` once
/// per way and checks the kernel took the way asked for.
fn for_each_checksum_path(test: &str, ports: &[PortPlan], mut check: impl FnMut(&str, Kernel)) {
    let kernel_allows = kernel_skb::probe(std::path::Path::new(kernel_skb::VMLINUX_BTF)).is_ok();
    for helpers_only in [false, true] {
        let settings = ProgramSettings { checksum_helpers_only: helpers_only, ..Default::default() };
        let (_fs, kernel) = load_with(&format!("{test}_{}", u8::from(helpers_only)), ports, &settings);
        assert_eq!(kernel.checksums_in_program(), kernel_allows && !helpers_only);
        let path = if kernel.checksums_in_program() { "in the program" } else { "helpers" };
        check(path, kernel);
    }
}

#[test]
fn a_syn_to_a_cluster_ip_is_translated_to_an_endpoint_with_valid_checksums_and_later_packets_follow_it() {
    let eps = [sock("10.0.1.10:8080"), sock("10.0.1.11:8080"), sock("10.0.2.10:8080")];
    for_each_checksum_path(
        "cluster_ip_tcp",
        &[PortPlan::cluster_ip("web", "10.96.0.10", 80, &eps)],
        |path, kernel| syn_and_followers(&eps, path, kernel),
    );
}

fn syn_and_followers(eps: &[SocketAddr], path: &str, mut kernel: Kernel) {
    let client = v4("10.0.1.2");
    let syn = Frame::tcp4(client, 40000, v4("10.96.0.10"), 80, Frame::SYN);
    let out = TestRun::ingress(&kernel, &syn);
    assert_eq!(out.verdict, TC_ACT_OK);
    let p = out.parse();
    assert!(p.checksums_valid, "IPv4 header and TCP checksums after DNAT ({path}): {p:?}");
    assert_eq!(p.src, SocketAddr::new(client.into(), 40000), "the source is kept");
    assert!(eps.contains(&p.dst), "DNAT to an endpoint, got {}", p.dst);
    assert_eq!(out.mark & mark::MASQUERADE, 0, "a pod source is not masqueraded");
    let chosen = p.dst;

    // Every later packet (and a retransmitted SYN) goes to the same endpoint.
    for flags in [Frame::ACK, Frame::ACK | Frame::PSH, Frame::SYN] {
        let pkt = Frame::tcp4(client, 40000, v4("10.96.0.10"), 80, flags);
        let p = TestRun::ingress(&kernel, &pkt).parse();
        assert_eq!(p.dst, chosen, "flags {flags:#x} follow the connection");
        assert!(p.checksums_valid, "{path}: {p:?}");
    }
    assert_eq!(stat(&mut kernel, Stat::ServiceHit), 1);
    assert_eq!(stat(&mut kernel, Stat::Established), 3);

    // The reply, leaving toward the client, reads as coming from the ClusterIP.
    let IpAddr::V4(ep_ip) = chosen.ip() else { panic!("IPv4 endpoint") };
    let reply = Frame::tcp4(ep_ip, chosen.port(), client, 40000, Frame::SYN | Frame::ACK);
    let out = TestRun::egress(&kernel, &reply);
    assert_eq!(out.verdict, TC_ACT_OK);
    let p = out.parse();
    assert_eq!(p.src, sock("10.96.0.10:80"), "reverse translation");
    assert_eq!(p.dst, SocketAddr::new(client.into(), 40000));
    assert!(p.checksums_valid, "checksums after reverse translation ({path}): {p:?}");

    // A non-SYN packet of an unknown connection is left alone.
    let stray = Frame::tcp4(client, 40001, v4("10.96.0.10"), 80, Frame::ACK);
    let p = TestRun::ingress(&kernel, &stray).parse();
    assert_eq!(p.dst, sock("10.96.0.10:80"));
    assert_eq!(stat(&mut kernel, Stat::NoConnection), 1);
}

#[test]
fn tcp_and_udp_over_ipv6_are_translated_both_ways_with_valid_checksums() {
    let eps = [sock("[fd00:10::1:10]:5353")];
    let ports = [
        PortPlan::cluster_ip("dns", "fd00:96::a", 53, &eps).udp(),
        PortPlan::cluster_ip("web", "fd00:96::a", 80, &eps),
    ];
    let client: Ipv6Addr = "fd00:10::1:2".parse().expect("v6");
    let vip: Ipv6Addr = "fd00:96::a".parse().expect("v6");
    let ep: Ipv6Addr = "fd00:10::1:10".parse().expect("v6");
    for_each_checksum_path("ipv6", &ports, |path, kernel| {
        let out = TestRun::ingress(&kernel, &Frame::udp6(client, 3333, vip, 53, b"question"));
        let p = out.parse();
        assert_eq!(p.dst, eps[0], "DNAT to the endpoint, port included");
        assert!(p.checksums_valid, "UDP checksum over the IPv6 pseudo-header ({path}): {p:?}");
        let out = TestRun::egress(&kernel, &Frame::udp6(ep, 5353, client, 3333, b"answer"));
        let p = out.parse();
        assert_eq!(p.src, SocketAddr::new(vip.into(), 53));
        assert!(p.checksums_valid, "{path}: {p:?}");
        for flags in [Frame::SYN, Frame::ACK] {
            let p = TestRun::ingress(&kernel, &Frame::tcp6(client, 4444, vip, 80, flags)).parse();
            assert_eq!(p.dst, eps[0]);
            assert!(p.checksums_valid, "TCP over IPv6, flags {flags:#x} ({path}): {p:?}");
        }
        let p = TestRun::egress(&kernel, &Frame::tcp6(ep, 5353, client, 4444, Frame::ACK)).parse();
        assert_eq!(p.src, SocketAddr::new(vip.into(), 80));
        assert!(p.checksums_valid, "TCP reply over IPv6 ({path}): {p:?}");
    });
}

#[test]
fn udp_over_ipv4_is_translated_both_ways_with_valid_checksums() {
    let eps = [sock("10.0.1.10:5353")];
    let ports = [PortPlan::cluster_ip("dns", "10.96.0.53", 53, &eps).udp()];
    for_each_checksum_path("udp_ipv4", &ports, |path, kernel| {
        let p =
            TestRun::ingress(&kernel, &Frame::udp4(v4("10.0.1.2"), 3333, v4("10.96.0.53"), 53, b"q")).parse();
        assert_eq!(p.dst, eps[0]);
        assert!(p.checksums_valid, "UDP and IPv4 header checksums after DNAT ({path}): {p:?}");
        let p =
            TestRun::egress(&kernel, &Frame::udp4(v4("10.0.1.10"), 5353, v4("10.0.1.2"), 3333, b"a")).parse();
        assert_eq!(p.src, sock("10.96.0.53:53"));
        assert!(p.checksums_valid, "after reverse translation ({path}): {p:?}");
    });
}

#[test]
fn udp_over_ipv4_without_checksum_keeps_it_zero() {
    let eps = [sock("10.0.1.10:5353")];
    let ports = [PortPlan::cluster_ip("dns", "10.96.0.53", 53, &eps).udp()];
    for_each_checksum_path("udp_zero_csum", &ports, |path, kernel| {
        let mut frame = Frame::udp4(v4("10.0.1.2"), 3333, v4("10.96.0.53"), 53, b"q");
        frame.zero_udp_checksum();
        let p = TestRun::ingress(&kernel, &frame).parse();
        assert_eq!(p.dst, eps[0]);
        assert_eq!(p.l4_checksum, 0, "a zero UDP checksum means none and stays zero ({path})");
        assert!(p.ip_checksum_valid);
    });
}

#[test]
fn verdicts_reject_drop_and_masquerade_are_marks_and_shots() {
    let ports = [
        PortPlan::cluster_ip("empty", "10.96.0.20", 80, &[]),
        PortPlan::cluster_ip("web", "10.96.0.10", 80, &[sock("10.0.1.10:8080")]),
        PortPlan::cluster_ip("itp-local", "10.96.0.30", 80, &[sock("10.0.2.10:8080")]).internal_local(&[]),
    ];
    let (_fs, mut kernel) = load("verdicts", &ports);
    let pod = v4("10.0.1.2");
    let syn = |dst: &str, port| Frame::tcp4(pod, 40000, v4(dst), port, Frame::SYN);

    let out = TestRun::ingress(&kernel, &syn("10.96.0.20", 80));
    assert_eq!(
        (out.verdict, out.mark & mark::REJECT),
        (TC_ACT_OK, mark::REJECT),
        "no endpoints: REJECT mark"
    );
    let out = TestRun::ingress(&kernel, &syn("10.96.0.10", 81));
    assert_eq!(out.mark & mark::REJECT, mark::REJECT, "undefined port of a ClusterIP: REJECT mark");
    assert_eq!(TestRun::ingress(&kernel, &syn("10.96.0.99", 80)).verdict, TC_ACT_SHOT, "unallocated: DROP");
    assert_eq!(
        TestRun::ingress(&kernel, &syn("10.96.0.30", 80)).verdict,
        TC_ACT_SHOT,
        "internalTrafficPolicy Local without a local endpoint: DROP"
    );
    assert_eq!(TestRun::ingress(&kernel, &syn("192.0.2.1", 80)).verdict, TC_ACT_OK, "not a service");

    // Off-cluster sources are masqueraded on ClusterIPs; a pod reaching itself is too.
    let ext = Frame::tcp4(v4("192.168.0.100"), 40000, v4("10.96.0.10"), 80, Frame::SYN);
    assert_eq!(TestRun::ingress(&kernel, &ext).mark & mark::MASQUERADE, mark::MASQUERADE);
    let hairpin = Frame::tcp4(v4("10.0.1.10"), 40000, v4("10.96.0.10"), 80, Frame::SYN);
    let out = TestRun::ingress(&kernel, &hairpin);
    assert_eq!(out.parse().dst, sock("10.0.1.10:8080"));
    assert_eq!(out.mark & mark::MASQUERADE, mark::MASQUERADE, "hairpin");
    assert_eq!(stat(&mut kernel, Stat::Reject), 2);
    assert_eq!(stat(&mut kernel, Stat::Drop), 2);
}

#[test]
fn node_ports_and_load_balancer_ips_follow_policies_source_ranges_and_maglev() {
    let cluster = [sock("10.0.1.10:8080"), sock("10.0.1.11:8080"), sock("10.0.2.10:8080")];
    let ports = [
        PortPlan::cluster_ip("np", "10.96.0.10", 80, &cluster).node_port(30080),
        PortPlan::cluster_ip("local", "10.96.0.11", 80, &cluster)
            .node_port(30081)
            .external_local(&[sock("10.0.1.10:8080")]),
        PortPlan::cluster_ip("nolocal", "10.96.0.12", 80, &[sock("10.0.2.10:8080")])
            .node_port(30082)
            .external_local(&[]),
        PortPlan::cluster_ip("lb", "10.96.0.13", 80, &cluster)
            .load_balancer("203.0.113.1")
            .source_ranges(&["198.51.100.0/24"]),
    ];
    let (_fs, kernel) = load("external", &ports);
    let node = v4("192.168.0.10");
    let ext = v4("198.51.100.7");

    // Cluster policy: masqueraded, and Maglev: one flow always lands on the same endpoint,
    // while many flows use every endpoint.
    let mut seen = std::collections::BTreeSet::new();
    for sport in 1000..1060 {
        let out = TestRun::ingress(&kernel, &Frame::tcp4(ext, sport, node, 30080, Frame::SYN));
        assert_eq!(out.mark & mark::MASQUERADE, mark::MASQUERADE, "external, policy Cluster");
        let first = out.parse().dst;
        assert!(out.parse().checksums_valid);
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "Maglev spreads flows over every endpoint: {seen:?}");

    // Policy Local: outside clients keep their address and reach local endpoints only.
    for sport in 2000..2020 {
        let out = TestRun::ingress(&kernel, &Frame::tcp4(ext, sport, node, 30081, Frame::SYN));
        assert_eq!(out.parse().dst, sock("10.0.1.10:8080"));
        assert_eq!(out.mark & mark::MASQUERADE, 0, "policy Local keeps the client address");
    }
    // … pods short-circuit to every endpoint.
    let mut from_pods = std::collections::BTreeSet::new();
    for sport in 3000..3060 {
        let out = TestRun::ingress(&kernel, &Frame::tcp4(v4("10.0.1.2"), sport, node, 30081, Frame::SYN));
        from_pods.insert(out.parse().dst);
    }
    assert_eq!(from_pods.len(), 3, "pods use the cluster endpoints: {from_pods:?}");
    // No local endpoint: outside traffic is dropped.
    let out = TestRun::ingress(&kernel, &Frame::tcp4(ext, 4000, node, 30082, Frame::SYN));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    // NodePorts answer only on node addresses.
    let out = TestRun::ingress(&kernel, &Frame::tcp4(ext, 4001, v4("192.168.0.99"), 30080, Frame::SYN));
    assert_eq!(out.parse().dst, sock("192.168.0.99:30080"), "not a node address: untouched");

    // Source ranges guard the LoadBalancer IP.
    let lb = v4("203.0.113.1");
    let inside = TestRun::ingress(&kernel, &Frame::tcp4(ext, 5000, lb, 80, Frame::SYN));
    assert!(cluster.contains(&inside.parse().dst), "inside the ranges: served");
    let outside = TestRun::ingress(&kernel, &Frame::tcp4(v4("192.0.2.50"), 5000, lb, 80, Frame::SYN));
    assert_eq!(outside.verdict, TC_ACT_SHOT, "outside the ranges: dropped");
}

#[test]
fn session_affinity_sends_every_new_connection_of_a_client_to_one_endpoint() {
    let eps = [sock("10.0.1.10:8080"), sock("10.0.1.11:8080"), sock("10.0.2.10:8080")];
    let (_fs, kernel) =
        load("affinity", &[PortPlan::cluster_ip("sticky", "10.96.0.10", 80, &eps).affinity(600)]);
    for client in ["10.0.1.2", "10.0.1.3", "10.0.1.4"] {
        let mut seen = std::collections::BTreeSet::new();
        for sport in 10000..10030 {
            let out =
                TestRun::ingress(&kernel, &Frame::tcp4(v4(client), sport, v4("10.96.0.10"), 80, Frame::SYN));
            seen.insert(out.parse().dst);
        }
        assert_eq!(seen.len(), 1, "client {client} sticks to one endpoint: {seen:?}");
    }
}

/// 10,000 ClusterIP services (10.96.0.1 …) × 10 endpoints each, spread over three nodes.
fn ten_thousand_services() -> Vec<PortPlan> {
    (0..10_000u32)
        .map(|i| {
            let vip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            let eps: Vec<SocketAddr> = (0..10)
                .map(|e| {
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, (e % 3) as u8 + 1, 10 + e as u8)), 8080)
                })
                .collect();
            PortPlan::cluster_ip(&format!("svc{i}"), &vip, 80, &eps)
        })
        .collect()
}

/// With 10,000 services × 10 endpoints loaded: the kernel-timed cost of one run per path, each
/// run on a fresh copy of its frame (see `ebpf_common::timing` for why not `repeat`), medians
/// of interleaved rounds, beside an empty program's (the harness's own cost). The counters
/// prove that every timed run took the path it is named after. Timing is only printed (the
/// figures go to docs/ebpf.md); the bound is a sanity check, far above any real cost.
#[test]
fn a_program_run_costs_little_with_ten_thousand_services() {
    use ebpf_common::timing::{EmptyProgram, interleaved_medians, pin_to_current_cpu, run_once_ns};
    pin_to_current_cpu();
    let ports = ten_thousand_services();
    let (_fs, mut kernel) = load("per_packet", &ports);
    let (client, vip) = (v4("10.0.1.2"), v4("10.96.20.5"));
    let syn = Frame::tcp4(client, 40000, vip, 80, Frame::SYN);
    let endpoint = TestRun::ingress(&kernel, &syn).parse().dst;
    let IpAddr::V4(ep_ip) = endpoint.ip() else { panic!("an IPv4 endpoint") };
    let ack = Frame::tcp4(client, 40000, vip, 80, Frame::ACK);
    let miss = Frame::tcp4(client, 40000, v4("192.0.2.1"), 80, Frame::ACK);
    let mut arp = miss.clone();
    arp.0[12..14].copy_from_slice(&[0x08, 0x06]);
    let reply = Frame::tcp4(ep_ip, endpoint.port(), client, 40000, Frame::ACK);
    let stranger = Frame::tcp4(ep_ip, endpoint.port(), client, 40001, Frame::ACK);
    let new_syns: Vec<Frame> =
        (0..20_000u16).map(|i| Frame::tcp4(client, 1024 + i, vip, 80, Frame::SYN)).collect();

    let paths =
        [Stat::Established, Stat::ServiceHit, Stat::ServiceMiss, Stat::NotApplicable, Stat::ReverseNat];
    let before = paths.map(|s| stat(&mut kernel, s));
    let (rounds, per_round) = (20, 1000);
    let empty = EmptyProgram::load();
    let names = [
        "empty program (harness floor)",
        "ingress, packet of an established service connection",
        "ingress, new connection (SYN)",
        "ingress, TCP packet to no service",
        "ingress, non-IP frame",
        "egress, reply of a service connection",
        "egress, packet without a reverse entry",
    ];
    let medians = {
        let k = &kernel;
        let mut next_syn = new_syns.iter();
        let mut empty_run = || empty.run_ns(&ack);
        let mut established = || run_once_ns(k, programs::TC_INGRESS, &ack);
        let mut new = || run_once_ns(k, programs::TC_INGRESS, next_syn.next().expect("enough SYNs"));
        let mut not_a_service = || run_once_ns(k, programs::TC_INGRESS, &miss);
        let mut non_ip = || run_once_ns(k, programs::TC_INGRESS, &arp);
        let mut reverse = || run_once_ns(k, programs::TC_EGRESS, &reply);
        let mut no_reverse = || run_once_ns(k, programs::TC_EGRESS, &stranger);
        let mut cases: [(&str, &mut dyn FnMut() -> u32); 7] = [
            (names[0], &mut empty_run),
            (names[1], &mut established),
            (names[2], &mut new),
            (names[3], &mut not_a_service),
            (names[4], &mut non_ip),
            (names[5], &mut reverse),
            (names[6], &mut no_reverse),
        ];
        interleaved_medians(&mut cases, rounds, per_round)
    };
    let after = paths.map(|s| stat(&mut kernel, s));
    let n = (rounds * per_round) as u64;
    // Egress counts nothing on a miss, so its runs leave the ingress counters alone.
    assert_eq!(
        after.iter().zip(before).map(|(a, b)| a - b).collect::<Vec<_>>(),
        [n, n, n, n, n],
        "{paths:?}"
    );

    println!("per packet with 10,000 services, median of {} kernel-timed runs each (repeat = 1):", n);
    for (name, median) in names.iter().zip(&medians) {
        println!(
            "  {name}: {median} ns ({} ns above the empty program)",
            i64::from(*median) - i64::from(medians[0])
        );
    }
    assert!(medians[1] < 10_000, "an established packet costs {} ns", medians[1]);
}

/// The method, BPF_PROG_TEST_RUN with `repeat` (the kernel's average over N runs on
/// one skb, cache-warm), made to measure what it names: a rewriting path sees its own output
/// from the second run on, so the fixture adds two services whose only endpoint is the other's
/// ClusterIP, and a client connection to each. An established packet to A is DNATed to B,
/// which is then a packet of the connection to B, DNATed back to A, and so on: every run is an
/// established service hit (the counters check it), and the same for the replies. Each case
/// takes turns round after round beside the empty program; medians of the rounds' averages.
/// Only printed (docs/ebpf.md), never asserted.
#[test]
fn repeated_runs_of_a_packet_that_stays_a_service_hit_with_ten_thousand_services() {
    use ebpf_common::timing::{EmptyProgram, median, pin_to_current_cpu};
    let cpu = pin_to_current_cpu();
    let (a, b) = ("10.96.100.1", "10.96.100.2");
    let mut ports = ten_thousand_services();
    // Ports change too, as from a service port to a target port (one more checksum update).
    ports.push(PortPlan::cluster_ip("cycle-a", a, 80, &[sock(&format!("{b}:8080"))]));
    ports.push(PortPlan::cluster_ip("cycle-b", b, 8080, &[sock(&format!("{a}:80"))]));
    let (fs, mut kernel) = load("per_packet_repeat", &ports);
    // The same programs on the same maps, with the checksum helpers only (the path of kernels
    // before 6.2): their difference is what reading the checksum state saves.
    let helpers_only = ProgramSettings { checksum_helpers_only: true, ..Default::default() };
    let helpers = Kernel::load_with(fs.path(), &MapSizes::default(), &helpers_only).expect("load");
    let client = v4("10.0.1.2");
    for (vip, other) in [((a, 80), (b, 8080)), ((b, 8080), (a, 80))] {
        let syn = TestRun::ingress(&kernel, &Frame::tcp4(client, 40000, v4(vip.0), vip.1, Frame::SYN));
        assert_eq!(syn.parse().dst, SocketAddr::new(IpAddr::V4(v4(other.0)), other.1));
    }
    let ack = Frame::tcp4(client, 40000, v4(a), 80, Frame::ACK);
    let reply = Frame::tcp4(v4(b), 8080, client, 40000, Frame::ACK);
    let miss = Frame::tcp4(client, 40000, v4("192.0.2.1"), 80, Frame::ACK);
    let stranger = Frame::tcp4(v4("10.0.1.10"), 8080, client, 40001, Frame::ACK);
    let mut arp = miss.clone();
    arp.0[12..14].copy_from_slice(&[0x08, 0x06]);
    let helpers_row = if kernel.checksums_in_program() {
        "ingress, established, checksum helpers only"
    } else {
        "ingress, established (checksum helpers on this kernel anyway)"
    };
    let cases = [
        (
            "ingress, packet of an established service connection",
            programs::TC_INGRESS,
            &ack,
            Stat::Established,
        ),
        (helpers_row, programs::TC_INGRESS, &ack, Stat::Established),
        ("ingress, TCP packet to no service", programs::TC_INGRESS, &miss, Stat::ServiceMiss),
        ("ingress, non-IP frame", programs::TC_INGRESS, &arp, Stat::NotApplicable),
        ("egress, reply of a service connection", programs::TC_EGRESS, &reply, Stat::ReverseNat),
        ("egress, packet without a reverse entry", programs::TC_EGRESS, &stranger, Stat::ReverseNat),
    ];
    let (rounds, repeat) = (15, 100_000u32);
    let empty = EmptyProgram::load();
    let mut empty_samples = Vec::new();
    let mut samples = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        empty_samples.push(empty.repeat_ns(&ack, repeat));
        for (i, ((_, program, frame, stat_of), out)) in cases.iter().zip(samples.iter_mut()).enumerate() {
            let before = stat(&mut kernel, *stat_of);
            let run_on = if i == 1 { &helpers } else { &kernel };
            out.push(TestRun::repeat(run_on, program, frame, repeat) as u32);
            let counted = stat(&mut kernel, *stat_of) - before;
            // A reply without a reverse entry counts nothing.
            let expected = if std::ptr::eq(*frame, &stranger) { 0 } else { u64::from(repeat) };
            assert_eq!(counted, expected, "runs counted as {stat_of:?} for {:?}", frame.0.len());
        }
    }
    let floor = median(&mut empty_samples);
    println!(
        "per packet with 10,000 services, median of {rounds} averages of {repeat} repeated runs on CPU {cpu}:"
    );
    println!("  empty program (harness floor): {floor} ns");
    for ((name, ..), s) in cases.iter().zip(samples.iter_mut()) {
        let m = median(s);
        println!("  {name}: {m} ns ({} ns above the empty program)", i64::from(m) - i64::from(floor));
    }
}

/// A tool, not a check: times variants of the eBPF object against each other, interleaved, on
/// the frames of the test above. `FERRY_EBPF_OBJECTS=name=path,name=path` names objects built
/// from modified sources (`cargo xtask build-ebpf`, then copy `target/bpf/…/ferry-ebpf`); each is
/// loaded beside ferry's own, sharing its pinned maps, and opens the test connection on its own
/// unpinned maps too. Prints the median of each (object, frame) and of the empty program.
/// Run: `FERRY_EBPF_OBJECTS=… cargo test -p ferry-sandbox --test ebpf_datapath -- --ignored
/// compare_objects --nocapture`.
#[test]
#[ignore = "a measuring tool; needs FERRY_EBPF_OBJECTS"]
fn compare_objects() {
    use aya::programs::SchedClassifier;
    use ebpf_common::timing::{EmptyProgram, median, pin_to_current_cpu, run_prog_once_ns};
    pin_to_current_cpu();
    let spec = std::env::var("FERRY_EBPF_OBJECTS").unwrap_or_default();
    let objects: Vec<(&str, &str)> = spec.split(',').filter_map(|o| o.split_once('=')).collect();
    assert!(!objects.is_empty(), "FERRY_EBPF_OBJECTS=name=path,… names the objects to compare");
    let ports = ten_thousand_services();
    let (fs, kernel) = load("compare_objects", &ports);
    let (client, vip) = (v4("10.0.1.2"), v4("10.96.20.5"));
    let syn = Frame::tcp4(client, 40000, vip, 80, Frame::SYN);
    let endpoint = TestRun::ingress(&kernel, &syn).parse().dst;
    let IpAddr::V4(ep_ip) = endpoint.ip() else { panic!("an IPv4 endpoint") };
    let ack = Frame::tcp4(client, 40000, vip, 80, Frame::ACK);
    let miss = Frame::tcp4(client, 40000, v4("192.0.2.1"), 80, Frame::ACK);
    let reply = Frame::tcp4(ep_ip, endpoint.port(), client, 40000, Frame::ACK);
    let mut loaded = Vec::new();
    let probed = kernel_skb::probe(std::path::Path::new(kernel_skb::VMLINUX_BTF));
    let helpers = Err(kernel_skb::NoAccess::Disabled);
    // Each object twice: as the kernel allows (checksum state read where it can be) and with
    // the checksum helpers only.
    let variants: Vec<(String, &str, _)> = objects
        .iter()
        .flat_map(|(name, path)| {
            [(name.to_string(), *path, &probed), (format!("{name}-helpers"), *path, &helpers)]
        })
        .collect();
    for (name, path, access) in &variants {
        let mut loader = aya::EbpfLoader::new();
        for map in proxy_common::maps::PINNED {
            loader
                .map_pin_path(map, proxy::backend::ebpf::kernel::pin_root(fs.path()).join("maps").join(map));
        }
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let linked = proxy::backend::ebpf::kernel::link_object(&mut loader, &bytes, access);
        let mut object = loader.load(linked.bytes()).unwrap_or_else(|e| panic!("loading {path}: {e}"));
        for program in [programs::TC_INGRESS, programs::TC_EGRESS] {
            let prog: &mut SchedClassifier =
                object.program_mut(program).and_then(|p| p.try_into().ok()).expect("a TC program");
            prog.load().unwrap_or_else(|e| panic!("verifying {program} of {path}: {e}"));
        }
        let ingress: &SchedClassifier =
            object.program(programs::TC_INGRESS).and_then(|p| p.try_into().ok()).expect("loaded");
        run_prog_once_ns(ingress, &syn);
        loaded.push((name.as_str(), object));
    }
    let cases = [
        ("ack", programs::TC_INGRESS, &ack),
        ("reply", programs::TC_EGRESS, &reply),
        ("miss", programs::TC_INGRESS, &miss),
    ];
    let empty = EmptyProgram::load();
    let mut samples = vec![Vec::new(); 1 + loaded.len() * cases.len()];
    for _ in 0..20 {
        samples[0].extend((0..500).map(|_| empty.run_ns(&ack)));
        for (i, (_, object)) in loaded.iter().enumerate() {
            for (j, (_, program, frame)) in cases.iter().enumerate() {
                let prog: &SchedClassifier =
                    object.program(program).and_then(|p| p.try_into().ok()).expect("loaded");
                samples[1 + i * cases.len() + j].extend((0..500).map(|_| run_prog_once_ns(prog, frame)));
            }
        }
    }
    println!("empty program: {} ns", median(&mut samples[0]));
    for (i, (name, _)) in loaded.iter().enumerate() {
        for (j, (case, _, _)) in cases.iter().enumerate() {
            println!("{name} {case}: {} ns", median(&mut samples[1 + i * cases.len() + j]));
        }
    }
}

/// Why the timing above runs each packet once: BPF_PROG_TEST_RUN with `repeat` runs the program
/// again and again on one skb, so from the second run on a ClusterIP packet is the pod-addressed
/// packet the first run made of it, which is no service.
#[test]
fn a_repeated_test_run_measures_the_packet_its_first_run_rewrote() {
    let (_fs, mut kernel) =
        load("repeat_rewrites", &[PortPlan::cluster_ip("web", "10.96.0.10", 80, &[sock("10.0.1.10:8080")])]);
    let (client, vip) = (v4("10.0.1.2"), v4("10.96.0.10"));
    TestRun::ingress(&kernel, &Frame::tcp4(client, 40000, vip, 80, Frame::SYN));
    let ack = Frame::tcp4(client, 40000, vip, 80, Frame::ACK);
    let before = (stat(&mut kernel, Stat::Established), stat(&mut kernel, Stat::ServiceMiss));
    TestRun::repeat(&kernel, programs::TC_INGRESS, &ack, 1000);
    let after = (stat(&mut kernel, Stat::Established), stat(&mut kernel, Stat::ServiceMiss));
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 999), "(established, no service) runs");
}

#[test]
fn udp_flows_to_an_endpoint_that_went_away_choose_again_after_the_sync() {
    use proxy::plan::PlanDiff;
    use std::sync::Arc;
    let a = sock("10.0.1.10:5353");
    let b = sock("10.0.1.11:5353");
    let before = PortPlan::cluster_ip("dns", "10.96.0.53", 53, &[a]).udp();
    let (_fs, mut kernel) = load("udp_purge", std::slice::from_ref(&before));
    let datagram = Frame::udp4(v4("10.0.1.2"), 3333, v4("10.96.0.53"), 53, b"q");
    assert_eq!(TestRun::ingress(&kernel, &datagram).parse().dst, a);

    // The endpoint is replaced; the flow's entry still names it until the sync purges it.
    let after = PortPlan::cluster_ip("dns", "10.96.0.53", 53, &[b]).udp();
    let plan = plan_of(std::slice::from_ref(&after));
    let diff = PlanDiff { changed: vec![(Arc::new(before.0), Arc::new(after.0))], ..PlanDiff::default() };
    let mut state = State::new(maglev::DEFAULT_TABLE_SIZE);
    state
        .full(
            &plan_of(&[PortPlan::cluster_ip("dns", "10.96.0.53", 53, &[a]).udp()]),
            &config(),
            kernel.maps(),
        )
        .expect("adopt");
    state.partial(&plan, &diff, &config(), kernel.maps()).expect("partial sync");
    assert_eq!(TestRun::ingress(&kernel, &datagram).parse().dst, a, "the established flow follows its entry");
    let gone = proxy::backend::ebpf::gone_udp_endpoints(&diff);
    assert_eq!(kernel.maps().purge_udp_connections(&gone), 1);
    assert_eq!(TestRun::ingress(&kernel, &datagram).parse().dst, b, "after the purge the flow chooses again");
}

/// ClusterIP 10.96.0.10:80 with one endpoint, and a connection to it opened from
/// 10.0.1.2:40000 (its SYN translated). Returns the endpoint.
fn one_open_connection(test: &str) -> (Bpffs, Kernel, SocketAddr) {
    let endpoint = sock("10.0.1.10:8080");
    let (fs, kernel) = load(test, &[PortPlan::cluster_ip("web", "10.96.0.10", 80, &[endpoint])]);
    let syn = Frame::tcp4(v4("10.0.1.2"), 40000, v4("10.96.0.10"), 80, Frame::SYN);
    assert_eq!(TestRun::ingress(&kernel, &syn).parse().dst, endpoint, "the connection's SYN");
    (fs, kernel, endpoint)
}

/// As netfilter's conntrack keeps NATing an established connection whatever the rules become
/// (the nftables backend, kube-proxy), a TCP connection keeps its endpoint both ways after its
/// frontend is deleted; a new connection to the address is no longer translated (dropped: the
/// address is now an unallocated one of the service CIDR).
#[test]
fn an_established_tcp_connection_outlives_its_deleted_frontend_and_new_ones_are_dropped() {
    let (_fs, mut kernel, endpoint) = one_open_connection("deleted_frontend");
    let (client, vip) = (v4("10.0.1.2"), v4("10.96.0.10"));

    let mut state = State::new(maglev::DEFAULT_TABLE_SIZE);
    state.full(&plan_of(&[]), &config(), kernel.maps()).expect("a full sync without the service");
    let established = stat(&mut kernel, Stat::Established);
    let out = TestRun::ingress(&kernel, &Frame::tcp4(client, 40000, vip, 80, Frame::ACK)).parse();
    assert_eq!(out.dst, endpoint, "the established connection");
    assert!(out.checksums_valid, "{out:?}");
    assert_eq!(stat(&mut kernel, Stat::Established), established + 1);
    let reply = TestRun::egress(&kernel, &Frame::tcp4(v4("10.0.1.10"), 8080, client, 40000, Frame::ACK));
    assert_eq!(reply.parse().src, sock("10.96.0.10:80"), "its reply");

    let syn = TestRun::ingress(&kernel, &Frame::tcp4(client, 40001, vip, 80, Frame::SYN));
    assert_eq!(syn.verdict, TC_ACT_SHOT, "a new connection to the deleted frontend");
    let datagram = TestRun::ingress(&kernel, &Frame::udp4(client, 40000, vip, 80, b"q"));
    assert_eq!(datagram.verdict, TC_ACT_SHOT, "a datagram to the deleted frontend");
}

/// The program consults the frontend filter: with a frontend's bit cleared by hand its address
/// is no frontend any more, nor an allocated ClusterIP, only an address of a service CIDR (the
/// filter's list): a SYN and the connection's next packet are dropped untranslated, an address
/// outside the service CIDRs is left alone. A filter not switched on is ignored.
#[test]
fn a_clear_frontend_filter_bit_skips_the_lookups_and_a_filter_not_switched_on_is_ignored() {
    use proxy::backend::ebpf::maps::DataPathMaps;
    use proxy_common::frontend_filter;
    let (_fs, mut kernel, endpoint) = one_open_connection("frontend_filter");
    let (client, vip) = (v4("10.0.1.2"), v4("10.96.0.10"));
    let ack = Frame::tcp4(client, 40000, vip, 80, Frame::ACK);
    assert_eq!(TestRun::ingress(&kernel, &ack).parse().dst, endpoint);

    let (word, _) =
        frontend_filter::word_and_mask(frontend_filter::bit(&proxy_common::ipv4_mapped([10, 96, 0, 10])));
    kernel.maps().frontend_filter().set(word, 0).expect("clear the word");
    let drops = stat(&mut kernel, Stat::Drop);
    let syn = TestRun::ingress(&kernel, &Frame::tcp4(client, 40001, vip, 80, Frame::SYN));
    assert_eq!((syn.verdict, syn.parse().dst), (TC_ACT_SHOT, sock("10.96.0.10:80")), "dropped untranslated");
    let next = TestRun::ingress(&kernel, &ack);
    assert_eq!((next.verdict, next.parse().dst), (TC_ACT_SHOT, sock("10.96.0.10:80")), "no CONNTRACK lookup");
    assert_eq!(stat(&mut kernel, Stat::Drop), drops + 2);
    let v6 = Frame::tcp6(
        "fd00:10::2".parse().expect("v6"),
        40001,
        "fd00:96::1".parse().expect("v6"),
        80,
        Frame::SYN,
    );
    assert_eq!(TestRun::ingress(&kernel, &v6).verdict, TC_ACT_SHOT, "in the IPv6 service CIDR");
    for outside in [v4("10.97.0.1"), v4("192.0.2.1")] {
        let out = TestRun::ingress(&kernel, &Frame::tcp4(client, 40001, outside, 80, Frame::SYN));
        assert_eq!(out.verdict, TC_ACT_OK, "{outside}: outside the service CIDRs, left alone");
    }

    kernel.maps().frontend_filter().set(frontend_filter::ENABLED_WORD, 0).expect("switch it off");
    assert_eq!(TestRun::ingress(&kernel, &ack).parse().dst, endpoint, "the full path again");
    let syn = TestRun::ingress(&kernel, &Frame::tcp4(client, 40002, vip, 80, Frame::SYN));
    assert_eq!(syn.parse().dst, endpoint);
}

/// A restart rebuilds the frontend filter from the plan and the destinations in `CONNTRACK`:
/// a frontend deleted while ferry was down keeps its bit while a connection to it lives (and
/// the connection its translation), one without connections loses it.
#[test]
fn a_restart_rebuilds_the_frontend_filter_and_a_connection_to_a_deleted_frontend_survives() {
    use proxy::backend::ebpf::maps::DataPathMaps;
    use proxy_common::frontend_filter;
    let has_bit = |kernel: &mut Kernel, addr: [u8; 4]| {
        let (word, mask) =
            frontend_filter::word_and_mask(frontend_filter::bit(&proxy_common::ipv4_mapped(addr)));
        kernel.maps().frontend_filter().get(word).expect("filter word") & mask != 0
    };
    let web = sock("10.0.1.10:8080");
    let (_fs, mut kernel) = load(
        "filter_rebuild",
        &[
            PortPlan::cluster_ip("web", "10.96.0.10", 80, &[web]),
            PortPlan::cluster_ip("db", "10.96.0.11", 80, &[sock("10.0.1.20:5432")]),
        ],
    );
    let client = v4("10.0.1.2");
    assert_eq!(
        TestRun::ingress(&kernel, &Frame::tcp4(client, 40000, v4("10.96.0.10"), 80, Frame::SYN)).parse().dst,
        web
    );
    assert!(has_bit(&mut kernel, [10, 96, 0, 10]) && has_bit(&mut kernel, [10, 96, 0, 11]));

    let mut restarted = State::new(maglev::DEFAULT_TABLE_SIZE);
    restarted.full(&plan_of(&[]), &config(), kernel.maps()).expect("a restart with both services gone");
    assert!(has_bit(&mut kernel, [10, 96, 0, 10]), "a live connection's frontend keeps its bit");
    assert!(!has_bit(&mut kernel, [10, 96, 0, 11]), "a frontend without connections loses it");
    let ack = TestRun::ingress(&kernel, &Frame::tcp4(client, 40000, v4("10.96.0.10"), 80, Frame::ACK));
    assert_eq!(ack.parse().dst, web, "the connection keeps its endpoint");
    let syn = TestRun::ingress(&kernel, &Frame::tcp4(client, 40001, v4("10.96.0.11"), 80, Frame::SYN));
    assert_eq!(syn.verdict, TC_ACT_SHOT, "an unallocated address of the service CIDR");
}

/// The benchmarks' bug: a client connects to a ClusterIP from source port S (translated to
/// endpoint E), then straight to E from the same S. The second flow has the same addresses and
/// ports after DNAT as the first, so the first flow's reverse entry matched its replies and
/// rewrote their source to the ClusterIP: the client never saw E answer. A packet opening a flow
/// to no frontend (a TCP SYN, any UDP datagram) from the interface the service flow came in on
/// ends that service flow's entries.
#[test]
fn a_direct_flow_reusing_a_finished_service_flows_addresses_and_ports_is_not_reverse_translated() {
    let ep = sock("10.0.1.10:8080");
    let ports = [
        PortPlan::cluster_ip("web", "10.96.0.10", 80, &[ep]),
        PortPlan::cluster_ip("dns", "10.96.0.10", 53, &[ep]).udp(),
    ];
    let (_fs, kernel) = load("direct_reuse", &ports);
    let (client, vip, ep_ip) = (v4("10.0.1.2"), v4("10.96.0.10"), v4("10.0.1.10"));
    let via_service = SocketAddr::new(vip.into(), 80);

    // 1. Through the service: DNAT on the way in, reverse translation on the way out.
    let p = TestRun::ingress(&kernel, &Frame::tcp4(client, 40000, vip, 80, Frame::SYN)).parse();
    assert_eq!(p.dst, ep);
    let synack = Frame::tcp4(ep_ip, 8080, client, 40000, Frame::SYN | Frame::ACK);
    assert_eq!(TestRun::egress(&kernel, &synack).parse().src, via_service);

    // 2. Straight to the endpoint from the same port: untouched both ways.
    let p = TestRun::ingress(&kernel, &Frame::tcp4(client, 40000, ep_ip, 8080, Frame::SYN)).parse();
    assert_eq!(p.dst, ep, "a SYN to a pod is not a service's");
    let p = TestRun::egress(&kernel, &synack).parse();
    assert_eq!(p.src, ep, "the pod's SYN-ACK to a direct SYN keeps its source");
    let data = Frame::tcp4(ep_ip, 8080, client, 40000, Frame::ACK | Frame::PSH);
    assert_eq!(TestRun::egress(&kernel, &data).parse().src, ep, "and so do its later packets");

    // 3. The service again from the same port: a new translated connection, replies translated.
    let p = TestRun::ingress(&kernel, &Frame::tcp4(client, 40000, vip, 80, Frame::SYN)).parse();
    assert_eq!(p.dst, ep);
    assert_eq!(TestRun::egress(&kernel, &synack).parse().src, via_service, "service replies again");

    // The same for UDP, where every datagram may open a flow.
    let q = |dst: Ipv4Addr, port| Frame::udp4(client, 3333, dst, port, b"q");
    let answer = Frame::udp4(ep_ip, 8080, client, 3333, b"a");
    assert_eq!(TestRun::ingress(&kernel, &q(vip, 53)).parse().dst, ep);
    assert_eq!(TestRun::egress(&kernel, &answer).parse().src, sock("10.96.0.10:53"));
    assert_eq!(TestRun::ingress(&kernel, &q(ep_ip, 8080)).parse().dst, ep);
    assert_eq!(TestRun::egress(&kernel, &answer).parse().src, ep, "a direct datagram's answer");
    assert_eq!(TestRun::ingress(&kernel, &q(vip, 53)).parse().dst, ep);
    assert_eq!(TestRun::egress(&kernel, &answer).parse().src, sock("10.96.0.10:53"));
}

/// A client reusing one UDP source port for two frontends with a common endpoint: after DNAT
/// both flows are client:port ↔ endpoint, one reply entry. Whichever flow sent last owns it
/// (the other flow's connection entry goes), so every answer carries the address of the frontend
/// its question went to, also when the client goes back to the first.
#[test]
fn a_port_reused_for_two_frontends_with_a_common_endpoint_answers_each_from_its_frontend() {
    let ep = sock("10.0.1.10:8080");
    let ports = [
        PortPlan::cluster_ip("dns-a", "10.96.0.10", 53, &[ep]).udp(),
        PortPlan::cluster_ip("dns-b", "10.96.0.11", 53, &[ep]).udp(),
    ];
    let (_fs, mut kernel) = load("two_frontends_one_tuple", &ports);
    let (client, ep_ip) = (v4("10.0.1.2"), v4("10.0.1.10"));
    let answer = Frame::udp4(ep_ip, 8080, client, 3333, b"a");
    for (i, vip) in ["10.96.0.10", "10.96.0.11", "10.96.0.10", "10.96.0.11"].into_iter().enumerate() {
        let q = Frame::udp4(client, 3333, v4(vip), 53, b"q");
        assert_eq!(TestRun::ingress(&kernel, &q).parse().dst, ep, "question {i} to {vip}");
        let a = TestRun::egress(&kernel, &answer).parse();
        assert_eq!(a.src, SocketAddr::new(v4(vip).into(), 53), "answer {i} comes from {vip}");
    }
    assert_eq!(stat(&mut kernel, Stat::Superseded), 3, "each switch ends the other flow");
}

/// The translated packet itself may meet the ingress program again on the same node (a bridge
/// of pod veths carries the programs too): after DNAT it looks exactly like a direct packet, but
/// it comes in on another interface, and must not end its own connection.
#[test]
fn a_translated_packet_seen_again_on_another_interface_keeps_its_connection() {
    let ep = sock("10.0.1.10:8080");
    let (_fs, kernel) = load("bridge_again", &[PortPlan::cluster_ip("web", "10.96.0.10", 80, &[ep])]);
    let (client, vip, ep_ip) = (v4("10.0.1.2"), v4("10.96.0.10"), v4("10.0.1.10"));
    let syn = Frame::tcp4(client, 40000, vip, 80, Frame::SYN);
    let translated = TestRun::ingress_on(&kernel, &syn, 7);
    assert_eq!(translated.parse().dst, ep);
    // The bridge's ingress (another ifindex) sees the translated SYN.
    let again = TestRun::ingress_on(&kernel, &Frame(translated.data.clone()), 8);
    assert_eq!(again.parse().dst, ep);
    let synack = Frame::tcp4(ep_ip, 8080, client, 40000, Frame::SYN | Frame::ACK);
    assert_eq!(TestRun::egress(&kernel, &synack).parse().src, sock("10.96.0.10:80"));
}

/// SCTP's checksum is a CRC32c over the whole SCTP packet (no pseudo-header): an address change
/// leaves it valid, a port change must update it, both ways, on both families. A zero checksum
/// (to be filled in by the device or the stack after the program) stays zero.
#[test]
fn sctp_port_translation_keeps_the_crc32c_valid_both_ways() {
    let cases: [(&str, &str, &str); 2] =
        [("10.96.0.40", "10.0.1.10", "10.0.1.2"), ("fd00:96::40", "fd00:10::1:10", "fd00:10::1:2")];
    let mut ports = Vec::new();
    for (vip, ep, _) in cases {
        let ep: IpAddr = ep.parse().expect("IP");
        ports.push(PortPlan::cluster_ip("sctp-nat", vip, 80, &[SocketAddr::new(ep, 8080)]).sctp());
        ports.push(PortPlan::cluster_ip("sctp-same", vip, 9000, &[SocketAddr::new(ep, 9000)]).sctp());
    }
    let (_fs, mut kernel) = load("sctp_crc", &ports);
    for (vip, ep, client) in cases {
        let (vip, ep, client): (IpAddr, IpAddr, IpAddr) =
            (vip.parse().expect("IP"), ep.parse().expect("IP"), client.parse().expect("IP"));
        for payload in [&b"x"[..], &[0x5a; 1200][..]] {
            let init = Frame::sctp(client, 5000, vip, 80, payload);
            let p = TestRun::ingress(&kernel, &init).parse();
            assert_eq!(p.dst, SocketAddr::new(ep, 8080), "SCTP DNAT, port included");
            assert!(
                p.checksums_valid,
                "CRC32c after DNAT with a port change ({} bytes): {p:?}",
                payload.len()
            );
            let reply = Frame::sctp(ep, 8080, client, 5000, payload);
            let p = TestRun::egress(&kernel, &reply).parse();
            assert_eq!(p.src, SocketAddr::new(vip, 80), "SCTP reverse translation");
            assert!(p.checksums_valid, "CRC32c after the reverse translation: {p:?}");

            // Same port: only the address changes, which the CRC does not cover.
            let same = Frame::sctp(client, 5001, vip, 9000, payload);
            let out = TestRun::ingress(&kernel, &same).parse();
            assert_eq!(out.dst, SocketAddr::new(ep, 9000));
            assert!(out.checksums_valid, "CRC32c after DNAT without a port change: {out:?}");
        }
        let mut offloaded = Frame::sctp(client, 5002, vip, 80, b"later");
        offloaded.zero_sctp_checksum();
        let p = TestRun::ingress(&kernel, &offloaded).parse();
        assert_eq!(p.dst, SocketAddr::new(ep, 8080));
        assert_eq!(p.l4_checksum, 0, "a checksum left to the device stays zero");
    }
    assert_eq!(stat(&mut kernel, Stat::ParseError), 0);
}

/// The verifier walks every path of a program and gives up after a million instructions; a
/// change that forks its state per branch-free bit trick (as a bit-by-bit CRC multiplication
/// did) fails to load at all. The budget used stays far from the limit.
#[test]
fn the_tc_programs_verify_well_within_the_kernels_budget() {
    let (_fs, kernel) = load("verifier_budget", &[]);
    for name in [programs::TC_INGRESS, programs::TC_EGRESS] {
        let info = kernel.tc_program(name).expect("loaded").info().expect("program info");
        let verified = info.verified_instruction_count().expect("kernel ≥ 5.16 reports it");
        println!("{name}: {verified} instructions verified");
        assert!(verified < 200_000, "{name}: {verified} of the verifier's 1,000,000 instructions");
    }
}
