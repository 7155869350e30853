//! Helpers of the eBPF suites: a per-test bpffs, plans built in code, crafted Ethernet frames
//! with correct checksums, and BPF_PROG_TEST_RUN runs of the TC programs.

#![allow(dead_code, reason = "shared by several test binaries, each using a part of it")]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use aya::programs::{TestRun as _, TestRunOptions};
use proxy::backend::ebpf::kernel::Kernel;
use proxy::model::{IpFamily, Protocol, ServiceKey, ServicePortName};
use proxy::plan::{Plan, PortKey, ServicePortPlan};
use proxy_common::programs;

mod bpffs;
pub mod timing;
pub use bpffs::Bpffs;

/// A service port plan built in code.
#[derive(Clone)]
pub struct PortPlan(pub ServicePortPlan);

impl PortPlan {
    /// A TCP ClusterIP port with `endpoints` (all ready; those in 10.0.1.0/24 and fd00:10::1:0/112 are local).
    pub fn cluster_ip(name: &str, ip: &str, port: u16, endpoints: &[SocketAddr]) -> Self {
        let cluster_ip: IpAddr = ip.parse().expect("ClusterIP literal");
        let local: Vec<SocketAddr> = endpoints.iter().copied().filter(is_local).collect();
        Self(ServicePortPlan {
            name: ServicePortName {
                service: ServiceKey { namespace: "t".into(), name: name.into() },
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            family: IpFamily::of(&cluster_ip),
            protocol: Protocol::Tcp,
            cluster_ip,
            port,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            internal_policy_local: false,
            external_policy_local: false,
            health_check_node_port: None,
            affinity_timeout: None,
            cluster_endpoints: endpoints.to_vec(),
            serving_endpoints: endpoints.to_vec(),
            hairpin_ips: local.iter().map(SocketAddr::ip).collect(),
            local_endpoints: local,
            has_endpoints: !endpoints.is_empty(),
        })
    }

    pub fn udp(mut self) -> Self {
        self.0.protocol = Protocol::Udp;
        self.0.name.protocol = Protocol::Udp;
        self
    }

    pub fn sctp(mut self) -> Self {
        self.0.protocol = Protocol::Sctp;
        self.0.name.protocol = Protocol::Sctp;
        self
    }

    pub fn node_port(mut self, port: u16) -> Self {
        self.0.node_port = Some(port);
        self
    }

    pub fn load_balancer(mut self, ip: &str) -> Self {
        self.0.load_balancer_ips.push(ip.parse().expect("IP literal"));
        self
    }

    pub fn source_ranges(mut self, ranges: &[&str]) -> Self {
        self.0.source_ranges = ranges.iter().map(|r| r.parse().expect("CIDR literal")).collect();
        self
    }

    /// internalTrafficPolicy Local with these local endpoints.
    pub fn internal_local(mut self, local: &[SocketAddr]) -> Self {
        self.0.internal_policy_local = true;
        self.0.local_endpoints = local.to_vec();
        self
    }

    /// externalTrafficPolicy Local with these local endpoints.
    pub fn external_local(mut self, local: &[SocketAddr]) -> Self {
        self.0.external_policy_local = true;
        self.0.local_endpoints = local.to_vec();
        self
    }

    pub fn affinity(mut self, seconds: u32) -> Self {
        self.0.affinity_timeout = Some(seconds);
        self
    }
}

fn is_local(ep: &SocketAddr) -> bool {
    match ep.ip() {
        IpAddr::V4(a) => a.octets()[..3] == [10, 0, 1],
        IpAddr::V6(a) => a.segments()[..7] == [0xfd00, 0x10, 0, 0, 0, 0, 1],
    }
}

/// A plan of `ports`, with their ClusterIPs allocated and the test service CIDRs.
pub fn plan_of(ports: &[PortPlan]) -> Plan {
    let mut plan = Plan::default();
    for p in ports {
        let p = &p.0;
        plan.cluster_ips.insert(p.cluster_ip);
        plan.ports.insert(PortKey { family: p.family, name: p.name.clone() }, Arc::new(p.clone()));
    }
    plan.service_cidrs = vec!["10.96.0.0/16".parse().expect("cidr"), "fd00:96::/112".parse().expect("cidr")];
    plan
}

/// An Ethernet frame carrying IPv4/IPv6 and TCP/UDP.
#[derive(Clone, Debug)]
pub struct Frame(pub Vec<u8>);

impl Frame {
    pub const SYN: u8 = 0x02;
    pub const ACK: u8 = 0x10;
    pub const PSH: u8 = 0x08;

    pub fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
        Self::build(src.into(), sport, dst.into(), dport, 6, flags, b"")
    }

    pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Self {
        Self::build(src.into(), sport, dst.into(), dport, 17, 0, payload)
    }

    pub fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Self {
        Self::build(src.into(), sport, dst.into(), dport, 6, flags, b"")
    }

    pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Self {
        Self::build(src.into(), sport, dst.into(), dport, 17, 0, payload)
    }

    /// An SCTP packet (one DATA chunk carrying `payload`) with its CRC32c.
    pub fn sctp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Self {
        Self::build(src, sport, dst, dport, 132, 0, payload)
    }

    fn build(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8, flags: u8, payload: &[u8]) -> Self {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        if proto == 132 {
            l4.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // verification tag
            l4.extend_from_slice(&[0; 4]); // checksum
            // DATA chunk: type 0, flags B|E, length, TSN, stream, sequence, PPID, data, padding.
            let chunk_len = 16 + payload.len();
            l4.extend_from_slice(&[0, 0x03]);
            l4.extend_from_slice(&(chunk_len as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
            l4.extend_from_slice(payload);
            l4.resize(l4.len().next_multiple_of(4), 0);
            let crc = crc32c(&l4);
            l4[8..12].copy_from_slice(&crc.to_le_bytes());
        } else if proto == 6 {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(5 << 4);
            l4.push(flags);
            l4.extend_from_slice(&65535u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        } else {
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        if proto != 132 {
            l4.extend_from_slice(payload);
            let csum_off = if proto == 6 { 16 } else { 6 };
            let sum = l4_checksum(&src, &dst, proto, &l4);
            l4[csum_off..csum_off + 2].copy_from_slice(&sum.to_be_bytes());
        }

        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut ip = vec![0x45, 0];
                ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                let c = fold(sum16(&ip, 0));
                ip[10..12].copy_from_slice(&(!c).to_be_bytes());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                f.extend_from_slice(&[proto, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        f.extend_from_slice(&l4);
        Self(f)
    }

    /// Sets an SCTP packet's checksum to 0, as Linux sends it when the device or the stack is
    /// to fill it in (CHECKSUM_PARTIAL).
    pub fn zero_sctp_checksum(&mut self) {
        let l4 = self.l4_offset();
        self.0[l4 + 8..l4 + 12].fill(0);
    }

    fn l4_offset(&self) -> usize {
        if u16::from_be_bytes([self.0[12], self.0[13]]) == 0x0800 { 14 + 20 } else { 14 + 40 }
    }

    /// Sets an IPv4 UDP datagram's checksum to 0 ("none").
    pub fn zero_udp_checksum(&mut self) {
        let l4 = 14 + 20;
        self.0[l4 + 6] = 0;
        self.0[l4 + 7] = 0;
    }
}

/// CRC32c (SCTP's checksum, RFC 9260 appendix A) bit by bit: independent of the program's
/// incremental update.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut r = !0u32;
    for b in data {
        r ^= u32::from(*b);
        for _ in 0..8 {
            r = if r & 1 != 0 { (r >> 1) ^ 0x82f6_3b78 } else { r >> 1 };
        }
    }
    !r
}

fn sum16(bytes: &[u8], mut acc: u32) -> u32 {
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        acc += u32::from(word);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo(src: &IpAddr, dst: &IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
        }
        _ => {}
    }
    acc + u32::from(proto) + len as u32
}

/// The TCP/UDP checksum of `l4` (its checksum field zero) over the pseudo-header.
fn l4_checksum(src: &IpAddr, dst: &IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let c = !fold(sum16(l4, pseudo(src, dst, proto, l4.len())));
    if c == 0 && proto == 17 { 0xffff } else { c }
}

/// What a program run returned.
pub struct RunOut {
    pub verdict: u32,
    /// `skb->mark` after the run.
    pub mark: u32,
    pub data: Vec<u8>,
}

#[derive(Debug)]
pub struct Parsed {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub ip_checksum_valid: bool,
    /// The transport checksum as stored (TCP/UDP: 16 bits; SCTP: the CRC32c).
    pub l4_checksum: u32,
    /// IPv4 header checksum (if IPv4) and transport checksum verify.
    pub checksums_valid: bool,
}

impl RunOut {
    pub fn parse(&self) -> Parsed {
        let d = &self.data;
        let ethertype = u16::from_be_bytes([d[12], d[13]]);
        let (src, dst, proto, l4, ip_ok) = if ethertype == 0x0800 {
            let ihl = usize::from(d[14] & 0x0f) * 4;
            let ip = &d[14..14 + ihl];
            let s = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let t = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            (IpAddr::V4(s), IpAddr::V4(t), ip[9], 14 + ihl, fold(sum16(ip, 0)) == 0xffff)
        } else {
            let s: [u8; 16] = d[22..38].try_into().expect("16 bytes");
            let t: [u8; 16] = d[38..54].try_into().expect("16 bytes");
            (IpAddr::V6(s.into()), IpAddr::V6(t.into()), d[20], 54, true)
        };
        let seg = &d[l4..];
        let sport = u16::from_be_bytes([seg[0], seg[1]]);
        let dport = u16::from_be_bytes([seg[2], seg[3]]);
        let (l4_checksum, l4_ok) = if proto == 132 {
            let stored = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let mut zeroed = seg.to_vec();
            zeroed[8..12].fill(0);
            (stored, crc32c(&zeroed) == stored)
        } else {
            let off = if proto == 6 { 16 } else { 6 };
            let c = u16::from_be_bytes([seg[off], seg[off + 1]]);
            let ok = (proto == 17 && c == 0 && src.is_ipv4())
                || fold(sum16(seg, pseudo(&src, &dst, proto, seg.len()))) == 0xffff;
            (u32::from(c), ok)
        };
        Parsed {
            src: SocketAddr::new(src, sport),
            dst: SocketAddr::new(dst, dport),
            ip_checksum_valid: ip_ok,
            l4_checksum,
            checksums_valid: ip_ok && l4_ok,
        }
    }
}

/// `struct __sk_buff` is 192 bytes on current kernels; `mark` is at offset 8.
const SKB_CTX_LEN: usize = 192;
/// Offset of `ingress_ifindex` in `struct __sk_buff` (the kernel lets a test run set it).
const SKB_INGRESS_IFINDEX: usize = 36;

pub struct TestRun;

impl TestRun {
    pub fn ingress(kernel: &Kernel, frame: &Frame) -> RunOut {
        Self::run(kernel, programs::TC_INGRESS, frame)
    }

    pub fn egress(kernel: &Kernel, frame: &Frame) -> RunOut {
        Self::run(kernel, programs::TC_EGRESS, frame)
    }

    /// The ingress program on a packet received by interface `ingress_ifindex`.
    pub fn ingress_on(kernel: &Kernel, frame: &Frame, ingress_ifindex: u32) -> RunOut {
        Self::run_with(kernel, programs::TC_INGRESS, frame, ingress_ifindex)
    }

    pub fn run(kernel: &Kernel, program: &str, frame: &Frame) -> RunOut {
        Self::run_with(kernel, program, frame, 0)
    }

    fn run_with(kernel: &Kernel, program: &str, frame: &Frame, ingress_ifindex: u32) -> RunOut {
        let prog = kernel.tc_program(program).expect("the TC program is loaded");
        let mut data_out = vec![0u8; frame.0.len() + 256];
        let mut ctx_in = vec![0u8; SKB_CTX_LEN];
        ctx_in[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let mut ctx_out = vec![0u8; SKB_CTX_LEN];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame.0),
                data_out: Some(&mut data_out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        data_out.truncate(result.data_size_out as usize);
        let mark = u32::from_ne_bytes(ctx_out[8..12].try_into().expect("4 bytes"));
        RunOut { verdict: result.return_value, mark, data: data_out }
    }

    /// Average nanoseconds per run of `program` over `repeat` runs of `frame`.
    pub fn repeat(kernel: &Kernel, program: &str, frame: &Frame, repeat: u32) -> u64 {
        let prog = kernel.tc_program(program).expect("the TC program is loaded");
        let mut data_out = vec![0u8; frame.0.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame.0),
                data_out: Some(&mut data_out),
                repeat,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        // The kernel reports the average duration per run.
        result.duration.as_nanos() as u64
    }
}

/// Counts of endpoints in replies.
pub fn histogram(addrs: impl IntoIterator<Item = SocketAddr>) -> BTreeMap<SocketAddr, usize> {
    let mut h = BTreeMap::new();
    for a in addrs {
        *h.entry(a).or_insert(0) += 1;
    }
    h
}
