//! Kernel smoke test of ferry's eBPF object: the object `proxy` embeds loads, its TC ingress
//! program attaches to a veth inside a sandbox namespace, and real traffic from a peer
//! namespace moves the right counters: frontends without endpoints (REJECT), misses, and
//! parse errors.
//!
//! Runs as root (`cargo xtask test`); everything it creates lives in the sandbox's namespaces
//! (the program is attached to the node namespace's `eth0` with TCX, or a cls_bpf filter before
//! kernel 6.6; no pins) and goes away with them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, tc},
};
use ferry_sandbox::{Netns, Sandbox};
use proxy_common::{FrontendKey, FrontendValue, Stat, maps, programs, protocol};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Service VIPs: not on any interface; the client routes them through the node, as a pod's
/// traffic to a ClusterIP reaches its node.
const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x5, 0, 0, 0, 0, 0x10);
const NODE_PORT: u16 = 30080;

#[test]
fn tc_ingress_counts_frontends_without_endpoints_misses_and_parse_errors() {
    let sb = Sandbox::new("ebpf_smoke").expect("sandbox (the kernel tests run as root)");
    let node = sb.netns("node").expect("node namespace");
    let client = sb.netns("client").expect("client namespace");
    sb.link(&node, "eth0", &client, "eth0").expect("veth");
    for (ns, cidr) in [
        (&node, format!("{NODE_IP}/24")),
        (&node, format!("{NODE_IP6}/64")),
        (&client, format!("{CLIENT_IP}/24")),
        (&client, format!("{CLIENT_IP6}/64")),
    ] {
        ns.addr("eth0", &cidr).expect("address");
    }
    client.route_via("198.51.100.0/24", IpAddr::V4(NODE_IP)).expect("client route to the VIPs");
    client.route_via("2001:db8:5::/64", IpAddr::V6(NODE_IP6)).expect("client route to the IPv6 VIPs");

    let mut ebpf = load_and_attach(&node, "eth0");
    {
        let mut services: HashMap<_, FrontendKey, FrontendValue> =
            HashMap::try_from(ebpf.map_mut(maps::SERVICES).expect("the object has the SERVICES map"))
                .expect("SERVICES is a hash map of FrontendKey -> FrontendValue");
        let frontends = [
            (FrontendKey::ipv4(VIP.octets(), 53, protocol::UDP), 1),
            (FrontendKey::ipv4(NODE_IP.octets(), NODE_PORT, protocol::TCP), 2),
            (FrontendKey::ipv6(VIP6.octets(), 53, protocol::UDP), 3),
        ];
        for (key, service_id) in frontends {
            // No endpoint set: every new connection is marked for REJECT (no nftables here, so
            // the packets go on and are counted).
            services
                .insert(key, FrontendValue { service_id, ..FrontendValue::default() }, 0)
                .expect("insert a frontend");
        }
    }

    client
        .run(|| {
            // Frontend hits (marked for REJECT): a UDP datagram to an IPv4 VIP, a TCP SYN to a NodePort (the node
            // answers RST, so exactly one SYN), a UDP datagram to an IPv6 VIP.
            send_udp(SocketAddr::new(IpAddr::V4(VIP), 53));
            send_tcp_syn(SocketAddr::new(IpAddr::V4(NODE_IP), NODE_PORT));
            send_udp(SocketAddr::new(IpAddr::V6(VIP6), 53));
            // Misses: the same addresses on ports that are no frontend.
            send_udp(SocketAddr::new(IpAddr::V4(VIP), 54));
            send_tcp_syn(SocketAddr::new(IpAddr::V4(NODE_IP), NODE_PORT + 1));
            // A parse error: an IPv4 EtherType followed by 8 bytes of a 20-byte header.
            send_truncated_ipv4_frame("eth0");
        })
        .expect("run in the client namespace");

    let expected = [(Stat::Reject, 3), (Stat::ServiceMiss, 2), (Stat::ParseError, 1)];
    let stats = wait_for_stats(&ebpf, &expected);
    for (stat, want) in expected {
        assert_eq!(stats[stat.index() as usize], want, "counter {} (all: {})", stat.name(), describe(&stats));
    }
    // ARP and IPv6 neighbour discovery reached the node too.
    assert!(
        stats[Stat::NotApplicable.index() as usize] > 0,
        "ARP/ND counted as not applicable (all: {})",
        describe(&stats)
    );
}

/// Loads the embedded object and attaches the TC ingress program to `iface` in `ns`. Only the
/// attachment depends on the namespace (the interface index is looked up and the TCX link made
/// from a thread inside it); the returned `Ebpf` keeps the link alive until dropped.
fn load_and_attach(ns: &Netns, iface: &str) -> Ebpf {
    ns.run(|| {
        let mut ebpf = proxy::backend::ebpf::kernel::load_object().expect("load the eBPF object");
        let program: &mut SchedClassifier = ebpf
            .program_mut(programs::TC_INGRESS)
            .expect("the object has the TC ingress program")
            .try_into()
            .expect("it is a TC classifier");
        program.load().expect("the verifier accepts the program");
        // aya attaches with TCX from kernel 6.6 on and with a cls_bpf filter before, which
        // needs the clsact qdisc; TCX ignores it.
        tc::qdisc_add_clsact(iface).expect("add the clsact qdisc");
        program.attach(iface, TcAttachType::Ingress).expect("attach to ingress (TCX or cls_bpf)");
        ebpf
    })
    .expect("run in the node namespace")
}

/// Polls the counters until they reach `expected` (delivery across a veth is asynchronous),
/// then returns them summed over CPUs; returns what it has after 5 s.
fn wait_for_stats(ebpf: &Ebpf, expected: &[(Stat, u64)]) -> Vec<u64> {
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(maps::STATS).expect("the object has the STATS map"))
            .expect("STATS is a per-CPU array of u64");
    let read = || -> Vec<u64> {
        Stat::ALL
            .iter()
            .map(|stat| {
                let per_cpu = stats.get(&stat.index(), 0).expect("read a counter");
                per_cpu.iter().sum()
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sums = read();
        let reached = expected.iter().all(|&(stat, want)| sums[stat.index() as usize] >= want);
        if reached || Instant::now() > deadline {
            // A little longer, so that a packet counted twice would show.
            std::thread::sleep(Duration::from_millis(100));
            return read();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn describe(stats: &[u64]) -> String {
    Stat::ALL
        .iter()
        .map(|stat| format!("{}={}", stat.name(), stats[stat.index() as usize]))
        .collect::<Vec<_>>()
        .join(" ")
}

fn send_udp(to: SocketAddr) {
    let bind: SocketAddr =
        if to.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(bind).expect("bind a UDP socket");
    socket.send_to(b"ferry", to).expect("send a UDP datagram");
}

/// Sends one SYN: the peer refuses (RST) well before the first retransmission (1 s).
fn send_tcp_syn(to: SocketAddr) {
    let result = TcpStream::connect_timeout(&to, Duration::from_millis(500));
    assert!(result.is_err(), "nothing listens on {to}, the connection must fail");
}

/// Sends an Ethernet frame whose IPv4 header is cut short, through an `AF_PACKET` socket on
/// `iface` of the current thread's namespace.
#[expect(unsafe_code, reason = "AF_PACKET is reached through libc; std has no raw link-layer sockets")]
fn send_truncated_ipv4_frame(iface: &str) {
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]); // destination: broadcast
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // source: locally administered
    frame.extend_from_slice(&0x0800_u16.to_be_bytes()); // EtherType IPv4
    frame.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0, 0]); // 8 of the header's 20 bytes

    let name = std::ffi::CString::new(iface).expect("interface name");
    // SAFETY: plain libc calls with valid pointers and lengths; the fd is closed below.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert_ne!(ifindex, 0, "interface {iface} exists");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(sent, frame.len() as isize, "send the truncated frame: {error}");
    }
}
