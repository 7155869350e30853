//! Types shared by ferry's eBPF programs (`proxy-ebpf`) and userspace (`proxy`).
//!
//! Everything a BPF map holds is defined here once: map names, sizes, keys and values. The rules
//! every type follows, so both sides agree on the bytes:
//! - `#[repr(C)]` with explicit padding fields (no implicit padding, no `bool` or `Option`), so
//!   the kernel's hash of a key never covers uninitialised bytes; padding must be zero.
//! - The byte order of every multi-byte field is stated on the field. Packet-derived fields stay
//!   in network byte order (the program compares them with packet bytes as they are); fields only
//!   userspace assigns are in host byte order. Conversion happens in the constructors here.
//! - Addresses are 16 bytes: IPv6, or IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
//! - With the `user` feature the types implement [`aya::Pod`] so userspace can put them in maps.
//!
//! The data path these maps drive is described in `docs/ebpf.md`.
#![no_std]

pub mod crc32c;

/// Names of the programs in the eBPF object, as userspace looks them up.
pub mod programs {
    /// TC classifier on the ingress of node interfaces: new connections to a frontend are
    /// translated (DNAT) and recorded in [`crate::maps::CONNTRACK`]; later packets follow it.
    pub const TC_INGRESS: &str = "ferry_tc_ingress";
    /// Read-only global (`u8`) of the object: non-zero makes the TC programs send translated
    /// packets straight to their next hop (`--bypass-netfilter`).
    pub const BYPASS_NETFILTER: &str = "BYPASS_NETFILTER";
    /// TC classifier on the egress of node interfaces: replies get their source translated
    /// back to the frontend ([`crate::maps::REVNAT`]).
    pub const TC_EGRESS: &str = "ferry_tc_egress";
    /// cgroup `connect4`/`connect6`: sockets of node processes connect to an endpoint instead
    /// of the frontend.
    pub const CONNECT4: &str = "ferry_connect4";
    pub const CONNECT6: &str = "ferry_connect6";
    /// cgroup `sendmsg4`/`sendmsg6`: unconnected UDP sends to a frontend go to an endpoint.
    pub const SENDMSG4: &str = "ferry_sendmsg4";
    pub const SENDMSG6: &str = "ferry_sendmsg6";
    /// cgroup `recvmsg4`/`recvmsg6`: replies on those sockets appear to come from the frontend.
    pub const RECVMSG4: &str = "ferry_recvmsg4";
    pub const RECVMSG6: &str = "ferry_recvmsg6";
    /// cgroup `getpeername4`/`getpeername6`: a connected socket's peer reads as the frontend.
    pub const GETPEERNAME4: &str = "ferry_getpeername4";
    pub const GETPEERNAME6: &str = "ferry_getpeername6";
}

/// The kernel's `struct sk_buff` behind a TC program's context (`bpf_cast_to_kern_ctx`, a kfunc
/// of Linux 6.2+), from which the programs read the packet's checksum state (`ip_summed`) and
/// then update the transport checksum themselves instead of through two helper calls.
///
/// The aya release this toolchain can build (aya-obj 0.3) does not link kfunc calls, so the
/// program carries a placeholder instruction, [`PLACEHOLDER`], and the loader rewrites it before
/// the object is parsed: into the kfunc call with the function's BTF id where the kernel has it,
/// or into `r0 = 0` (a constant null: the verifier drops the branch that would use it, and the
/// helper path runs). The two globals are set in the same step.
pub mod kernel_skb {
    /// The kfunc the placeholder becomes.
    pub const KFUNC: &str = "bpf_cast_to_kern_ctx";
    /// Read-only global (`u32`): byte offset of the byte holding `ip_summed` in `struct sk_buff`.
    pub const IP_SUMMED_OFFSET: &str = "SKB_IP_SUMMED_OFFSET";
    /// Read-only global (`u32`): the shift of `ip_summed`'s two bits in that byte.
    pub const IP_SUMMED_SHIFT: &str = "SKB_IP_SUMMED_SHIFT";
    /// The immediate that marks the placeholder (an arbitrary value no BTF id reaches).
    pub const PLACEHOLDER_IMM: u32 = 0x7e55_c0de;
    /// The placeholder: `call` (opcode 0x85) with source register `BPF_PSEUDO_KFUNC_CALL` (2),
    /// offset 0 (vmlinux BTF) and [`PLACEHOLDER_IMM`], as the 8 little-endian bytes of a BPF
    /// instruction read as one `u64`.
    pub const PLACEHOLDER: u64 = 0x85 | 0x20 << 8 | (PLACEHOLDER_IMM as u64) << 32;
    /// `r0 = 0` (`BPF_ALU64 | BPF_MOV | BPF_K`, opcode 0xb7), what the placeholder becomes where
    /// the kernel lacks the kfunc.
    pub const NULL: u64 = 0xb7;
    /// `ip_summed` values (include/linux/skbuff.h).
    pub const CHECKSUM_PARTIAL: u8 = 3;
}

/// Names and default sizes of the maps in the eBPF object. Userspace may override every
/// `*_MAX_ENTRIES` at load time (`BackendOptions`).
pub mod maps {
    /// `HashMap<FrontendKey, FrontendValue>`: every service frontend (ClusterIP, NodePort, …
    /// address, port and protocol) this node serves.
    pub const SERVICES: &str = "SERVICES";
    pub const SERVICES_MAX_ENTRIES: u32 = 65_536;
    /// `HashMap<EndpointKey, Endpoint>`: the endpoint slots of every endpoint set.
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const ENDPOINTS_MAX_ENTRIES: u32 = 262_144;
    /// `HashMap<u32, MaglevTable>` (not preallocated): the Maglev lookup table of each endpoint
    /// set used by external frontends, keyed by set id.
    pub const MAGLEV: &str = "MAGLEV";
    pub const MAGLEV_MAX_ENTRIES: u32 = 1024;
    /// `LruHashMap<FlowKey, CtValue>`: connections translated so far, keyed by the packet as the
    /// client sends it.
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
    /// `LruHashMap<FlowKey, RevNatValue>`: the same connections keyed by the reply as the
    /// endpoint sends it (after netfilter's un-SNAT), giving the frontend to restore.
    pub const REVNAT: &str = "REVNAT";
    pub const REVNAT_MAX_ENTRIES: u32 = 262_144;
    /// `LruHashMap<AffinityKey, AffinityValue>`: ClientIP session affinity.
    pub const AFFINITY: &str = "AFFINITY";
    pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;
    /// `HashMap<[u8; 16], u32>`: this node's addresses, value [`crate::node_addr`] flags.
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    pub const NODE_ADDRS_MAX_ENTRIES: u32 = 256;
    /// `LpmTrie<[u8; 16], u32>`: the cluster CIDRs (the local-traffic detector); value unused (1).
    pub const POD_CIDRS: &str = "POD_CIDRS";
    pub const POD_CIDRS_MAX_ENTRIES: u32 = 64;
    /// `LpmTrie<[u8; 16], u32>`: what happens to a destination that is no frontend:
    /// allocated ClusterIPs (/128) → [`crate::dst_policy::REJECT`], service CIDRs →
    /// [`crate::dst_policy::DROP`]. Longest prefix wins.
    pub const DST_POLICY: &str = "DST_POLICY";
    pub const DST_POLICY_MAX_ENTRIES: u32 = 65_536;
    /// `LpmTrie<SourceRangeKey, u32>`: loadBalancerSourceRanges per service; value unused (1).
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 16_384;
    /// `LruHashMap<SockKey, SockValue>`: unconnected UDP sends of node processes, for recvmsg.
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const SOCK_REVNAT_MAX_ENTRIES: u32 = 65_536;
    /// `PerCpuArray<u64>` of packet counters, indexed by [`crate::Stat`]; userspace sums the
    /// per-CPU values.
    pub const STATS: &str = "STATS";
    /// `Array<u64>`: a bitmap over destination addresses that may be a frontend, so that a
    /// packet to any other address skips the hash lookups ([`crate::frontend_filter`]).
    pub const FRONTEND_FILTER: &str = "FRONTEND_FILTER";
    pub const FRONTEND_FILTER_MAX_ENTRIES: u32 = 1 + (1 << (crate::frontend_filter::BITS_LOG2 - 6));
    /// `Array<ServiceCidrs>` of one entry: the service CIDRs, for packets the frontend filter
    /// excludes ([`crate::ServiceCidrs`]).
    pub const SERVICE_CIDRS: &str = "SERVICE_CIDRS";
    /// Every map userspace pins, in the order it creates entries.
    pub const PINNED: [&str; 14] = [
        SERVICES,
        ENDPOINTS,
        MAGLEV,
        CONNTRACK,
        REVNAT,
        AFFINITY,
        NODE_ADDRS,
        POD_CIDRS,
        DST_POLICY,
        SOURCE_RANGES,
        SOCK_REVNAT,
        STATS,
        FRONTEND_FILTER,
        SERVICE_CIDRS,
    ];
}

/// [`maps::FRONTEND_FILTER`]: one bit per hash of a destination address, set for every
/// address a frontend key names (and every node address NodePorts answer on) before its
/// `SERVICES` entry is written. A clear bit proves the address is no frontend, so the TC
/// program skips `CONNTRACK`, `SERVICES` and `NODE_ADDRS` for it; a set bit proves nothing
/// (collisions), the full path decides. Bits are never cleared while ferry runs: a deleted
/// frontend's TCP connections keep following their `CONNTRACK` entries (docs/ebpf.md).
/// Word [`ENABLED_WORD`](frontend_filter::ENABLED_WORD) is non-zero once every bit is in place;
/// until then (a first start, an upgrade that brings the map) the program ignores the filter.
/// For an address the filter excludes, only the service CIDRs matter (an unallocated address in
/// one is dropped; allocated ClusterIPs have their bit set): [`maps::SERVICE_CIDRS`] lists them
/// in one map value, so one lookup replaces `DST_POLICY`'s trie walk. With more service CIDRs
/// than it holds the filter stays off.
pub mod frontend_filter {
    /// log2 of the number of bits: 2^20 bits, 128 KiB.
    pub const BITS_LOG2: u32 = 20;
    /// Index of the word that says the filter is complete.
    pub const ENABLED_WORD: u32 = 0;

    /// The bit of an address given as its four 4-byte words (native byte order, as read from
    /// the 16-byte map form): multiplicative hashing of their XOR.
    #[inline(always)]
    pub const fn bit_of_words(w: [u32; 4]) -> u32 {
        (w[0] ^ w[1] ^ w[2] ^ w[3]).wrapping_mul(0x9e37_79b1) >> (32 - BITS_LOG2)
    }

    /// The bit of a 16-byte (IPv4-mapped) address.
    #[inline(always)]
    pub fn bit(addr: &[u8; 16]) -> u32 {
        let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
        bit_of_words([w(0), w(4), w(8), w(12)])
    }

    /// The four words of a service CIDR in [`crate::ServiceCidrs`]: the network address and
    /// the mask, each as two 8-byte words read (native order) from the 16-byte form; the prefix
    /// length counts bits of that form (IPv4 prefixes are 96 longer).
    pub fn cidr_words(addr: &[u8; 16], prefix_len: u32) -> [u64; 4] {
        let len = prefix_len.min(128);
        let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
        let mask = mask.to_be_bytes();
        let w = |b: &[u8; 16], i: usize| {
            u64::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]])
        };
        let (m0, m1) = (w(&mask, 0), w(&mask, 8));
        [w(addr, 0) & m0, w(addr, 8) & m1, m0, m1]
    }

    /// The array index (after [`ENABLED_WORD`]) and mask of a bit.
    #[inline(always)]
    pub const fn word_and_mask(bit: u32) -> (u32, u64) {
        (1 + (bit >> 6), 1u64 << (bit & 63))
    }
}

/// IANA protocol numbers of the transport protocols a service port can use.
pub mod protocol {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// Bits of `skb->mark` the TC programs set; acted on by the small nftables table `ferry_ebpf`
/// (see docs/ebpf.md).
pub mod mark {
    /// Masquerade this connection (SNAT to the outgoing interface's address) in postrouting.
    /// kube-proxy's bit, so the two agree.
    pub const MASQUERADE: u32 = 0x4000;
    /// Reject this packet (TCP RST, or ICMP port unreachable) in prerouting.
    pub const REJECT: u32 = 0x8000;
}

/// Flags of [`FrontendValue::flags`].
pub mod frontend {
    /// With no endpoint in the chosen set: DROP (policy Local, none local). Otherwise REJECT.
    pub const EMPTY_DROP: u32 = 1 << 0;
    /// Masquerade every new connection (external under policy Cluster, `--masquerade-all`).
    pub const MASQ_ALWAYS: u32 = 1 << 1;
    /// Masquerade new connections whose source is not inside the cluster CIDRs (ClusterIP with
    /// a local-traffic detector).
    pub const MASQ_NOT_POD: u32 = 1 << 2;
    /// externalTrafficPolicy Local: sources inside the cluster CIDRs use the short-circuit set.
    pub const SHORT_CIRCUIT_PODS: u32 = 1 << 3;
    /// externalTrafficPolicy Local: the node's own addresses use the short-circuit set, masqueraded.
    pub const SHORT_CIRCUIT_NODE: u32 = 1 << 4;
    /// Check the source against [`crate::maps::SOURCE_RANGES`] (LoadBalancer IPs with ranges).
    pub const SOURCE_RANGES: u32 = 1 << 5;
    /// Choose from the main set with its Maglev table (external frontends) instead of randomly.
    pub const MAGLEV: u32 = 1 << 6;
    /// A NodePort (key with a wildcard address): matched only on node addresses.
    pub const NODE_PORT: u32 = 1 << 7;
}

/// Values of [`maps::NODE_ADDRS`] (bits).
pub mod node_addr {
    /// One of the node's addresses (`--node-ip`).
    pub const NODE: u32 = 1 << 0;
    /// NodePorts answer on it (`--nodeport-addresses`).
    pub const NODE_PORT: u32 = 1 << 1;
}

/// Values of [`maps::DST_POLICY`].
pub mod dst_policy {
    pub const REJECT: u32 = 1;
    pub const DROP: u32 = 2;
}

/// Flags of [`CtValue::flags`].
pub mod ct {
    /// Every packet of the connection gets [`crate::mark::MASQUERADE`].
    pub const MASQUERADE: u8 = 1 << 0;
}

/// The largest Maglev table: the value size of [`maps::MAGLEV`]. A smaller prime can be used
/// ([`MaglevTable::size`]).
pub const MAGLEV_MAX_SIZE: usize = 65_537;

/// The IPv4-mapped IPv6 form of an IPv4 address.
#[inline(always)]
pub const fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    let [a, b, c, d] = addr;
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]
}

/// The address of a NodePort frontend key: any node address of the family.
pub const NODE_PORT_ADDR_V4: [u8; 16] = ipv4_mapped([0, 0, 0, 0]);
pub const NODE_PORT_ADDR_V6: [u8; 16] = [0; 16];

/// Value of [`maps::SERVICE_CIDRS`]: `count` service CIDRs as
/// [`frontend_filter::cidr_words`]. Layout (264 bytes, alignment 8).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCidrs {
    /// Host byte order; at most [`ServiceCidrs::MAX`].
    pub count: u32,
    pub _pad: u32,
    pub cidrs: [[u64; 4]; ServiceCidrs::MAX],
}

impl ServiceCidrs {
    pub const MAX: usize = 8;
}

/// Key of [`maps::SERVICES`]: the destination of a packet that a service frontend matches.
///
/// Layout (20 bytes, alignment 4, no implicit padding):
///
/// | offset | field      | byte order                                                        |
/// |--------|------------|-------------------------------------------------------------------|
/// | 0      | `addr`     | network; IPv4 as IPv4-mapped IPv6; NodePorts: [`NODE_PORT_ADDR_V4`]/[`NODE_PORT_ADDR_V6`] |
/// | 16     | `port`     | network (big endian), exactly as in the TCP/UDP/SCTP header       |
/// | 18     | `protocol` | single byte, an IANA protocol number from [`protocol`]            |
/// | 19     | `_pad`     | always 0                                                          |
///
/// The alignment (see [`FlowKey`]) lets the program copy the address as four 4-byte words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// Destination address, IPv6 or IPv4-mapped IPv6, network byte order.
    pub addr: [u8; 16],
    /// Destination port in network byte order (the raw `u16` read from the packet).
    pub port: u16,
    /// IANA protocol number.
    pub protocol: u8,
    /// Explicit padding; must be zero.
    pub _pad: u8,
}

impl FrontendKey {
    /// The key for an IPv4 frontend; `addr` is the address's octets in network order and
    /// `port` is in host byte order (it is converted here).
    pub const fn ipv4(addr: [u8; 4], port: u16, protocol: u8) -> Self {
        Self::from_raw(ipv4_mapped(addr), port.to_be(), protocol)
    }

    /// The key for an IPv6 frontend; `port` is in host byte order (it is converted here).
    pub const fn ipv6(addr: [u8; 16], port: u16, protocol: u8) -> Self {
        Self::from_raw(addr, port.to_be(), protocol)
    }

    /// The key from packet fields as they are on the wire: `addr` IPv6 or IPv4-mapped, `port_be`
    /// in network byte order. This is what the eBPF program builds.
    #[inline(always)]
    pub const fn from_raw(addr: [u8; 16], port_be: u16, protocol: u8) -> Self {
        Self { addr, port: port_be, protocol, _pad: 0 }
    }

    /// The destination port in host byte order.
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Value of [`maps::SERVICES`]: how new connections to a frontend are handled.
///
/// Layout (32 bytes, alignment 4), every field in host byte order. An endpoint *set* is a
/// group of slots `EndpointKey { set, index: 0..count }` in [`maps::ENDPOINTS`]; userspace
/// writes a changed endpoint list under a fresh set id and then replaces this value in one
/// update, so a packet sees either the old set or the new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FrontendValue {
    /// Identifier of the service port, assigned by userspace: source ranges and affinity are
    /// keyed by it.
    pub service_id: u32,
    /// [`frontend`] flags.
    pub flags: u32,
    /// The main endpoint set and its size (0: REJECT, or DROP with [`frontend::EMPTY_DROP`]).
    pub set: u32,
    pub count: u32,
    /// The short-circuit set (policy Local frontends reached by pods or the node).
    pub sc_set: u32,
    pub sc_count: u32,
    /// ClientIP affinity timeout in seconds; 0: no affinity.
    pub affinity_timeout: u32,
    /// Explicit padding; must be zero.
    pub _pad: u32,
}

/// Key of [`maps::ENDPOINTS`]. Layout (8 bytes): both fields host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub set: u32,
    pub index: u32,
}

/// Value of [`maps::ENDPOINTS`]: one endpoint. Layout (20 bytes, alignment 4, see [`FlowKey`]).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Endpoint {
    /// Network byte order, IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// Explicit padding; must be zero.
    pub _pad: u16,
}

/// Value of [`maps::MAGLEV`]: the lookup table of one endpoint set. `entries[hash % size]` is an
/// index into the set. Layout: `size` (host order), padding, then the entries (host order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevTable {
    /// The table size in use, a prime ≤ [`MAGLEV_MAX_SIZE`].
    pub size: u32,
    pub _pad: u32,
    pub entries: [u32; MAGLEV_MAX_SIZE],
}

/// Key of [`maps::CONNTRACK`] and [`maps::REVNAT`]: a packet's addresses, ports and protocol.
/// Layout (40 bytes, alignment 8): addresses and ports in network byte order.
///
/// Why the alignment (it changes no offset and no size): the eBPF program copies these types
/// field by field, and bpf-linker expands a copy with the alignment the compiler knows, so
/// byte arrays in a 2-aligned struct were copied one byte at a time. 8-aligned, an address is
/// two 8-byte moves and sport, dport, protocol and padding are one 8-byte store.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of [`maps::CONNTRACK`]: the endpoint a connection was translated to.
/// Layout (32 bytes, alignment 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// The endpoint, network byte order.
    pub addr: [u8; 16],
    pub port: u16,
    /// [`ct`] flags.
    pub flags: u8,
    pub _pad: u8,
    /// The set and slot the endpoint was chosen from (host order): a retransmitted SYN keeps
    /// the endpoint while the frontend still uses this set.
    pub set: u32,
    pub index: u32,
    /// The interface the connection's first packet came in on (`skb->ingress_ifindex`, host
    /// order). A packet to the endpoint itself from that interface, with the connection's
    /// addresses and ports after DNAT, opens a direct flow that ends this connection; seen on
    /// another interface it is this connection's own translated packet (a bridge of pod veths).
    pub ifindex: u32,
}

/// Value of [`maps::REVNAT`]: the frontend a reply's source is translated back to.
/// Layout (20 bytes, alignment 4, see [`FlowKey`]), network byte order.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}

/// Key of [`maps::AFFINITY`]: one client of one service port's endpoint set kind.
/// Layout (24 bytes, alignment 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Host order.
    pub service_id: u32,
    /// 0: the main set, 1: the short-circuit set.
    pub short_circuit: u32,
    /// The client address, network byte order.
    pub client: [u8; 16],
}

/// Value of [`maps::AFFINITY`]. Layout (32 bytes, alignment 8).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns` of the last new connection of this client.
    pub last_seen_ns: u64,
    /// The endpoint (network order) and its slot (host order): valid while the slot of the
    /// frontend's current set still holds this endpoint.
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    pub index: u32,
}

/// Key of [`maps::SOURCE_RANGES`] as the LPM trie sees it (after the 4-byte prefix length):
/// the service id in network byte order (always fully matched), then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// Network byte order.
    pub service_id: u32,
    pub addr: [u8; 16],
}

impl SourceRangeKey {
    /// The LPM prefix length of a key whose address prefix is `addr_prefix` bits of the
    /// 16-byte (mapped) address.
    pub const fn prefix_len(addr_prefix: u32) -> u32 {
        32 + addr_prefix
    }
}

/// Key of [`maps::SOCK_REVNAT`]: a node socket (its cookie) and the endpoint it sent to.
/// Layout (32 bytes, alignment 8).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    /// Network byte order.
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Indices of the counters in [`maps::STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stat {
    /// A new connection to a frontend, translated to an endpoint.
    ServiceHit = 0,
    /// A TCP/UDP/SCTP packet to no service frontend.
    ServiceMiss = 1,
    /// A packet the program could not parse (truncated or malformed headers).
    ParseError = 2,
    /// A packet the service path does not handle: not IPv4/IPv6 (ARP, …), another transport
    /// (ICMP, …) or a non-first IP fragment.
    NotApplicable = 3,
    /// A later packet of a translated connection (CONNTRACK hit).
    Established = 4,
    /// A reply translated back to its frontend (REVNAT hit).
    ReverseNat = 5,
    /// Marked for REJECT: no endpoints, or an undefined port of a ClusterIP.
    Reject = 6,
    /// Dropped: policy Local without a local endpoint, outside source ranges, unallocated
    /// service address.
    Drop = 7,
    /// A TCP packet other than a SYN to a frontend with no CONNTRACK entry (evicted, or from
    /// before ferry): left untouched.
    NoConnection = 8,
    /// A slot the frontend names is missing from ENDPOINTS (or its Maglev table): left untouched.
    EndpointMissing = 9,
    /// A CONNTRACK/REVNAT/AFFINITY insert failed.
    MapUpdateFailed = 10,
    /// A connect/sendmsg of a node process translated by the cgroup programs.
    SocketTranslated = 11,
    /// A translated connection ended because its client opened a flow with the same addresses
    /// and ports after DNAT: a direct one, or one to another frontend with a common endpoint
    /// (its entries were deleted).
    Superseded = 12,
    /// A translated packet sent straight to its next hop (`--bypass-netfilter`), either way.
    Bypassed = 13,
}

impl Stat {
    /// Number of counters, the `max_entries` of [`maps::STATS`].
    pub const COUNT: u32 = 14;
    /// Every counter, in index order.
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::ServiceHit,
        Self::ServiceMiss,
        Self::ParseError,
        Self::NotApplicable,
        Self::Established,
        Self::ReverseNat,
        Self::Reject,
        Self::Drop,
        Self::NoConnection,
        Self::EndpointMissing,
        Self::MapUpdateFailed,
        Self::SocketTranslated,
        Self::Superseded,
        Self::Bypassed,
    ];

    /// The index in [`maps::STATS`].
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A stable snake_case name, for metrics labels and dumps.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ServiceHit => "service_hit",
            Self::ServiceMiss => "service_miss",
            Self::ParseError => "parse_error",
            Self::NotApplicable => "not_applicable",
            Self::Established => "established",
            Self::ReverseNat => "reverse_nat",
            Self::Reject => "reject",
            Self::Drop => "drop",
            Self::NoConnection => "no_connection",
            Self::EndpointMissing => "endpoint_missing",
            Self::MapUpdateFailed => "map_update_failed",
            Self::SocketTranslated => "socket_translated",
            Self::Superseded => "superseded",
            Self::Bypassed => "bypassed",
        }
    }
}

/// The hash the TC program feeds to Maglev: FNV-1a over the client address and port, the
/// frontend address and port, and the protocol. Shared so that userspace tests agree with
/// the program.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 16 {
        h = (h ^ u32::from(key.saddr[i])).wrapping_mul(0x0100_0193);
        h = (h ^ u32::from(key.daddr[i])).wrapping_mul(0x0100_0193);
        i += 1;
    }
    let [s0, s1] = key.sport.to_ne_bytes();
    let [d0, d1] = key.dport.to_ne_bytes();
    for b in [s0, s1, d0, d1, key.protocol] {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    // FNV's low bits mix poorly; fold the high half in (murmur3's finaliser).
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

// Layout checks: a change here is a change of the kernel ABI between program and userspace.
const _: () = {
    assert!(core::mem::size_of::<FrontendKey>() == 20);
    assert!(core::mem::align_of::<FrontendKey>() == 4);
    assert!(core::mem::offset_of!(FrontendKey, port) == 16);
    assert!(core::mem::offset_of!(FrontendKey, protocol) == 18);
    assert!(core::mem::size_of::<FrontendValue>() == 32);
    assert!(core::mem::size_of::<EndpointKey>() == 8);
    assert!(core::mem::size_of::<Endpoint>() == 20);
    assert!(core::mem::size_of::<MaglevTable>() == 8 + 4 * MAGLEV_MAX_SIZE);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::align_of::<FlowKey>() == 8);
    assert!(core::mem::offset_of!(FlowKey, sport) == 32);
    assert!(core::mem::offset_of!(FlowKey, dport) == 34);
    assert!(core::mem::offset_of!(FlowKey, protocol) == 36);
    assert!(core::mem::size_of::<CtValue>() == 32);
    assert!(core::mem::size_of::<RevNatValue>() == 20);
    assert!(core::mem::align_of::<RevNatValue>() == 4);
    assert!(core::mem::align_of::<Endpoint>() == 4);
    assert!(core::mem::size_of::<AffinityKey>() == 24);
    assert!(core::mem::size_of::<AffinityValue>() == 32);
    assert!(core::mem::size_of::<SourceRangeKey>() == 20);
    assert!(core::mem::size_of::<SockKey>() == 32);
    assert!(core::mem::size_of::<ServiceCidrs>() == 264);
    assert!(core::mem::align_of::<ServiceCidrs>() == 8);
};

#[cfg(feature = "user")]
#[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait: it asserts the types are plain bytes")]
mod pod {
    // SAFETY (all of them): `#[repr(C)]`, only integer fields and explicit padding: every bit
    // pattern is valid and there are no implicit padding bytes (checked by the layout
    // assertions above).
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::FrontendValue {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::MaglevTable {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::RevNatValue {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::ServiceCidrs {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_key_is_ipv4_mapped_with_port_in_network_order() {
        let key = FrontendKey::ipv4([192, 0, 2, 10], 8080, protocol::UDP);
        assert_eq!(key.addr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(key.port(), 8080);
        assert_eq!(key.protocol, 17);
        assert_eq!(key._pad, 0);
    }

    #[test]
    fn ipv6_key_keeps_address_bytes() {
        let addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let key = FrontendKey::ipv6(addr, 53, protocol::TCP);
        assert_eq!(key.addr, addr);
        assert_eq!(key.port.to_ne_bytes(), [0, 53]);
    }

    #[test]
    fn frontend_filter_spreads_a_service_cidr_over_distinct_bits() {
        use frontend_filter::{BITS_LOG2, bit, word_and_mask};
        extern crate std;
        // Every address of a /16 (ClusterIPs are allocated from such ranges): few share a bit.
        let mut seen = std::collections::HashSet::new();
        for i in 0..65_536u32 {
            let [_, _, c, d] = i.to_be_bytes();
            let b = bit(&ipv4_mapped([10, 96, c, d]));
            assert!(b < 1 << BITS_LOG2);
            seen.insert(b);
        }
        assert!(seen.len() > 60_000, "{} distinct bits for 65,536 addresses", seen.len());
        let (word, mask) = word_and_mask(bit(&ipv4_mapped([10, 96, 0, 10])));
        assert!((1..maps::FRONTEND_FILTER_MAX_ENTRIES).contains(&word) && mask.count_ones() == 1);
        let [n0, n1, m0, m1] = frontend_filter::cidr_words(&ipv4_mapped([10, 96, 7, 0]), 96 + 16);
        let inside = |a: [u8; 16]| {
            let w0 = u64::from_ne_bytes(a[0..8].try_into().expect("8 bytes"));
            let w1 = u64::from_ne_bytes(a[8..16].try_into().expect("8 bytes"));
            w0 & m0 == n0 && w1 & m1 == n1
        };
        assert!(inside(ipv4_mapped([10, 96, 255, 1])) && !inside(ipv4_mapped([10, 97, 0, 1])));
        assert_ne!(
            bit(&ipv4_mapped([10, 96, 0, 10])),
            bit(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a])
        );
    }

    #[test]
    fn stats_indices_are_dense_and_in_order() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(stat.index() as usize, i, "{}", stat.name());
        }
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = FlowKey {
            saddr: ipv4_mapped([10, 0, 0, 1]),
            daddr: ipv4_mapped([10, 96, 0, 1]),
            sport: 1000u16.to_be(),
            dport: 80u16.to_be(),
            protocol: protocol::TCP,
            _pad: [0; 3],
        };
        let h = flow_hash(&base);
        assert_ne!(h, flow_hash(&FlowKey { sport: 1001u16.to_be(), ..base }));
        assert_ne!(h, flow_hash(&FlowKey { dport: 81u16.to_be(), ..base }));
        assert_ne!(h, flow_hash(&FlowKey { protocol: protocol::UDP, ..base }));
        assert_ne!(h, flow_hash(&FlowKey { saddr: ipv4_mapped([10, 0, 0, 2]), ..base }));
    }
}
