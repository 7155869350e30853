//! ferry's eBPF data path: Service-to-Pod translation before netfilter.
//!
//! - [`ferry_tc_ingress`] (TC ingress of the node's interfaces, pod veths included): a packet
//!   of a known connection ([`CONNTRACK`]) is translated to its endpoint; a new connection to a
//!   frontend ([`SERVICES`]) gets an endpoint (random, Maglev or session affinity), DNAT, and
//!   entries in [`CONNTRACK`] and [`REVNAT`]. No endpoints → the REJECT mark (nftables sends the
//!   RST / ICMP), policy Local without local endpoints or a source outside the ranges → DROP.
//! - [`ferry_tc_egress`] (TC egress of the same interfaces): replies get their source
//!   translated back to the frontend ([`REVNAT`]), after netfilter undid any masquerade.
//! - cgroup sock_addr programs: processes of the node connect/send directly to an endpoint.
//! - With `--bypass-netfilter` ([`BYPASS_NETFILTER`]), the ingress program also forwards:
//!   translated packets without masquerade go straight to their next hop, and replies are
//!   translated back on ingress and sent the same way.
//!
//! Masquerade is a mark for a small nftables rule (see docs/ebpf.md). Map layouts, names and
//! counter indices live in `proxy-common`. Programs only read the maps userspace writes and
//! update their own state (connections, affinity, counters).
#![no_std]
#![no_main]
// `asm!` for BPF: the placeholder of `kernel_skb` (no kfunc linking in aya-obj 0.3).
#![feature(asm_experimental_arch)]

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
        TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup, bpf_sock_addr,
    },
    helpers::{
        bpf_csum_diff, bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_redirect,
    },
    macros::{cgroup_sock_addr, classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SockAddrContext, TcContext},
};
use proxy_common::{
    AffinityKey, AffinityValue, CtValue, Endpoint, EndpointKey, FlowKey, FrontendKey, FrontendValue,
    MaglevTable, NODE_PORT_ADDR_V4, NODE_PORT_ADDR_V6, RevNatValue, ServiceCidrs, SockKey, SourceRangeKey,
    Stat, crc32c, ct, dst_policy, flow_hash, frontend, frontend_filter, kernel_skb as ks, maps as m, mark,
    node_addr, protocol,
};

#[map]
static SERVICES: HashMap<FrontendKey, FrontendValue> = HashMap::with_max_entries(m::SERVICES_MAX_ENTRIES, 0);
#[map]
static ENDPOINTS: HashMap<EndpointKey, Endpoint> = HashMap::with_max_entries(m::ENDPOINTS_MAX_ENTRIES, 0);
/// Not preallocated: a table is 256 KiB.
#[map]
static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::with_max_entries(m::MAGLEV_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static CONNTRACK: LruHashMap<FlowKey, CtValue> = LruHashMap::with_max_entries(m::CONNTRACK_MAX_ENTRIES, 0);
#[map]
static REVNAT: LruHashMap<FlowKey, RevNatValue> = LruHashMap::with_max_entries(m::REVNAT_MAX_ENTRIES, 0);
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(m::AFFINITY_MAX_ENTRIES, 0);
#[map]
static NODE_ADDRS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(m::NODE_ADDRS_MAX_ENTRIES, 0);
#[map]
static POD_CIDRS: LpmTrie<[u8; 16], u32> =
    LpmTrie::with_max_entries(m::POD_CIDRS_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static DST_POLICY: LpmTrie<[u8; 16], u32> =
    LpmTrie::with_max_entries(m::DST_POLICY_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::with_max_entries(m::SOURCE_RANGES_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static SOCK_REVNAT: LruHashMap<SockKey, RevNatValue> =
    LruHashMap::with_max_entries(m::SOCK_REVNAT_MAX_ENTRIES, 0);
/// Per-CPU packet counters indexed by `proxy_common::Stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);
#[map]
static FRONTEND_FILTER: Array<u64> = Array::with_max_entries(m::FRONTEND_FILTER_MAX_ENTRIES, 0);
#[map]
static SERVICE_CIDRS: Array<ServiceCidrs> = Array::with_max_entries(1, 0);

/// `BPF_F_NO_PREALLOC` (LPM tries require it).
const BPF_F_NO_PREALLOC: u32 = 1;

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const IPV4_MIN_HDR_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;

/// IPv6 extension headers walked to reach the transport header.
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// At most this many extension headers are skipped (a bound for the verifier).
const MAX_IPV6_EXT_HDRS: usize = 4;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// The packet could not be parsed; counted as [`Stat::ParseError`], passed untouched.
struct ParseError;

/// The parts of a TCP/UDP/SCTP packet the service path reads.
struct Packet {
    /// Addresses (IPv6 or IPv4-mapped), ports and protocol in network byte order, as they are
    /// in the headers: on ingress this is the packet's `CONNTRACK` key, on egress its `REVNAT` key.
    flow: FlowKey,
    ipv6: bool,
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the transport header.
    l4: usize,
    /// TCP flags byte (0 for other protocols).
    tcp_flags: u8,
}

impl Packet {
    /// A TCP SYN without ACK: the only TCP packet that opens a connection.
    #[inline(always)]
    fn is_tcp_syn(&self) -> bool {
        self.flow.protocol == protocol::TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

// Writing keys without memset and byte loops. bpf-linker has LLVM expand `memcpy` with the
// alignment it knows and leaves `memset` and `memmove` as calls to a byte-at-a-time loop (a
// 3-byte `_pad = [0; 3]` was a call; copying a 32-byte map value out was a 32-iteration loop;
// together most of an established packet's cost). So keys are written as whole 8-byte words and
// values are read field by field.

/// Offset of `sport` in [`FlowKey`]: `sport`, `dport`, `protocol` and the padding are its last
/// 8 bytes.
const FLOW_TAIL: usize = core::mem::offset_of!(FlowKey, sport);
const _: () = assert!(FLOW_TAIL == 32 && core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::align_of::<FlowKey>() == 8 && cfg!(target_endian = "little"));

/// `key`'s ports, protocol and (zero) padding in one store.
#[inline(always)]
fn set_flow_tail(key: &mut FlowKey, sport: u16, dport: u16, proto: u8) {
    let tail = u64::from(sport) | u64::from(dport) << 16 | u64::from(proto) << 32;
    // SAFETY: FlowKey is 8-aligned and its last 8 bytes are these fields (little endian).
    unsafe { (key as *mut FlowKey).cast::<u8>().add(FLOW_TAIL).cast::<u64>().write(tail) }
}

/// The two 8-byte words of an IPv4-mapped address from the IPv4 address as read from the
/// header (a native-endian `u32` of the four network-order bytes).
#[inline(always)]
fn mapped_words(addr: u32) -> [u64; 2] {
    [0, 0xffff_0000 | u64::from(addr) << 32]
}

/// Copies an address as four 4-byte words: an array assignment is a `memmove` call here (a
/// byte loop, see above), even between fields of different structs.
///
/// # Safety
/// Both must be 4-aligned: the address fields of ferry's map types and of [`Scratch`] are
/// (`proxy_common` aligns its types for this).
#[inline(always)]
unsafe fn copy_addr(dst: &mut [u8; 16], src: &[u8; 16]) {
    let (d, s) = (dst.as_mut_ptr().cast::<u32>(), src.as_ptr().cast::<u32>());
    // SAFETY: 16 bytes each, 4-aligned by the caller's guarantee.
    unsafe {
        d.write(s.read());
        d.add(1).write(s.add(1).read());
        d.add(2).write(s.add(2).read());
        d.add(3).write(s.add(3).read());
    }
}

/// `key.daddr` as 8-byte words.
#[inline(always)]
fn daddr_words(key: &FlowKey) -> [u64; 2] {
    let p = (key as *const FlowKey).cast::<u64>();
    // SAFETY: FlowKey is 8-aligned; daddr is bytes 16..32.
    unsafe { [p.add(2).read(), p.add(3).read()] }
}

/// `key.port` and the (zero) padding after it in one store.
#[inline(always)]
fn set_sock_port(key: &mut SockKey, port: u16) {
    const PORT: usize = core::mem::offset_of!(SockKey, port);
    const _: () = assert!(PORT == 24 && core::mem::size_of::<SockKey>() == 32);
    // SAFETY: SockKey is 8-aligned (a u64 first) and its last 8 bytes are the port and padding.
    unsafe { (key as *mut SockKey).cast::<u8>().add(PORT).cast::<u64>().write(u64::from(port)) }
}

/// Writes the addresses of `key` as 8-byte words (`saddr` then `daddr`). Volatile stores:
/// LLVM would merge adjacent stores of zero into a `memset` call.
#[inline(always)]
fn set_flow_addrs(key: &mut FlowKey, saddr: [u64; 2], daddr: [u64; 2]) {
    let p = (key as *mut FlowKey).cast::<u64>();
    // SAFETY: FlowKey is 8-aligned; saddr and daddr are its first 32 bytes.
    unsafe {
        p.write_volatile(saddr[0]);
        p.add(1).write_volatile(saddr[1]);
        p.add(2).write_volatile(daddr[0]);
        p.add(3).write_volatile(daddr[1]);
    }
}

/// Load-time setting (`EbpfLoader::override_global`, `--bypass-netfilter`): a translated packet
/// whose connection needs no masquerade goes straight to its next hop (`bpf_fib_lookup`, then
/// `bpf_redirect` to the route's interface), and replies are translated back on ingress and
/// sent the same way. Such packets skip netfilter (conntrack, NAT, filter chains) and the
/// stack's forwarding: faster, but invisible to firewall rules of the node (see docs/ebpf.md).
/// Zero: everything goes through the stack. A constant for the verifier, which drops the
/// branches it disables.
#[unsafe(no_mangle)]
static BYPASS_NETFILTER: u8 = 0;

#[inline(always)]
fn bypass_netfilter() -> bool {
    // SAFETY: a read-only global; volatile so the compiler does not fold in the zero above.
    unsafe { core::ptr::read_volatile(&BYPASS_NETFILTER) != 0 }
}

/// Where `ip_summed` is in the kernel's `struct sk_buff` (see `proxy_common::kernel_skb`); set
/// by the loader together with the call in [`kernel_skb`], constants for the verifier.
#[unsafe(no_mangle)]
static SKB_IP_SUMMED_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SKB_IP_SUMMED_SHIFT: u32 = 0;

/// The kernel's `struct sk_buff` of `ctx`, or null where the loader found no
/// `bpf_cast_to_kern_ctx` (before Linux 6.2). The instruction is the loader's placeholder
/// (`proxy_common::kernel_skb::PLACEHOLDER`); the verifier turns the kfunc into a register move.
#[inline(always)]
fn kernel_skb(ctx: &TcContext) -> *const u8 {
    let skb: *const u8;
    // SAFETY: one instruction: the kfunc call (argument r1, result r0, r1-r5 clobbered, as for
    // any call) or `r0 = 0`.
    unsafe {
        core::arch::asm!(
            ".quad {insn}",
            insn = const ks::PLACEHOLDER,
            inlateout("r1") ctx.skb.skb => _,
            lateout("r0") skb,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack),
        );
    }
    skb
}

/// The packet's checksum state (`ip_summed`: NONE, UNNECESSARY, COMPLETE or PARTIAL), where
/// the kernel lets the program read it.
#[inline(always)]
fn checksum_state(ctx: &TcContext) -> Option<u8> {
    let skb = kernel_skb(ctx);
    if skb.is_null() {
        return None;
    }
    // SAFETY: read-only globals; volatile so the compiler does not fold in the zeros above.
    let (offset, shift) = unsafe {
        (core::ptr::read_volatile(&SKB_IP_SUMMED_OFFSET), core::ptr::read_volatile(&SKB_IP_SUMMED_SHIFT))
    };
    // SAFETY: a byte of the sk_buff at a constant offset; the verifier checks it against the
    // kernel's BTF (and turns the load into one that cannot fault).
    let byte = unsafe { *skb.add(offset as usize) };
    Some((byte >> shift) & 3)
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A DNATed packet of connection `s.pkt` → `s.ct` (no masquerade): sent to the endpoint's next
/// hop, or left to the stack when the route needs it (see [`next_hop_known`]).
#[inline(never)]
fn forward_translated(ctx: &TcContext, s: &mut Scratch) -> i32 {
    let flow = &s.pkt.flow;
    fill_fib(ctx, &mut s.fib, &s.pkt, [&flow.saddr, &s.ct.addr], [flow.sport, s.ct.port]);
    if !next_hop_known(ctx, &s.pkt, &mut s.fib) {
        return TC_ACT_OK as i32;
    }
    send_to_next_hop(ctx, &s.pkt, &s.fib)
}

/// [`reply_straight_to_client`]: the packet is no reply of a translated connection.
const NOT_A_REPLY: i32 = -1;

/// A reply from an endpoint, seen on ingress: translated back to its frontend (as the egress
/// program would after netfilter) and sent to the client's next hop. When the route needs the
/// stack, the packet is left untouched and follows today's path (netfilter, then the egress
/// program's reverse translation). [`NOT_A_REPLY`] when `REVNAT` has no entry for it.
#[inline(never)]
fn reply_straight_to_client(ctx: &TcContext, s: &mut Scratch) -> i32 {
    let Some(original) = REVNAT.get_ptr(&s.pkt.flow) else { return NOT_A_REPLY };
    // SAFETY: a map value, valid during this run; copied out at once.
    copy_revnat(&mut s.original, unsafe { &*original });
    let flow = &s.pkt.flow;
    fill_fib(ctx, &mut s.fib, &s.pkt, [&s.original.addr, &flow.daddr], [s.original.port, flow.dport]);
    if !next_hop_known(ctx, &s.pkt, &mut s.fib) {
        return TC_ACT_OK as i32;
    }
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.rw.new_addr, &s.original.addr) };
    s.rw.new_port = s.original.port;
    if rewrite(ctx, &s.pkt, false, &mut s.rw).is_err() {
        count(Stat::ParseError);
        return TC_ACT_OK as i32;
    }
    count(Stat::ReverseNat);
    send_to_next_hop(ctx, &s.pkt, &s.fib)
}

/// The route lookup's parameters for a packet from `addrs[0]`:`ports[0]` to
/// `addrs[1]`:`ports[1]` (network order), arriving on the packet's interface. `tot_len` zero:
/// the kernel checks the packet (GSO-aware) against the route's MTU instead.
#[inline(always)]
fn fill_fib(ctx: &TcContext, fib: &mut bpf_fib_lookup, pkt: &Packet, addrs: [&[u8; 16]; 2], ports: [u16; 2]) {
    let ([saddr, daddr], [sport, dport]) = (addrs, ports);
    // SAFETY: reading a field of the context the kernel passed.
    fib.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    fib.family = if pkt.ipv6 { AF_INET6 } else { AF_INET };
    fib.l4_protocol = pkt.flow.protocol;
    fib.sport = sport;
    fib.dport = dport;
    fib.__bindgen_anon_1.tot_len = 0;
    fib.__bindgen_anon_2.flowinfo = 0;
    let (src, dst) = (words16(saddr), words16(daddr));
    if pkt.ipv6 {
        fib.__bindgen_anon_3.ipv6_src = src;
        fib.__bindgen_anon_4.ipv6_dst = dst;
    } else {
        fib.__bindgen_anon_3.ipv4_src = src[3];
        fib.__bindgen_anon_4.ipv4_dst = dst[3];
    }
}

/// Looks up the route of `fib`: true when it is forwarded to a next hop whose link-layer
/// address is known and the packet may be forwarded. Otherwise (no route, a local
/// destination, an unresolved neighbour, a packet too big, a hop limit of 1) the stack must
/// handle the packet.
#[inline(always)]
fn next_hop_known(ctx: &TcContext, pkt: &Packet, fib: &mut bpf_fib_lookup) -> bool {
    // SAFETY: the argument types the helper takes; `fib` is per-CPU scratch memory.
    let found =
        unsafe { fib_lookup(ctx.skb.skb.cast(), fib, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    found == i64::from(BPF_FIB_LKUP_RET_SUCCESS)
        && forward_header(ctx).is_some_and(|h| hop_limit(&h, pkt) > 1)
}

/// Bytes of the headers [`send_to_next_hop`] rewrites: Ethernet and the first 12 of IP (TTL
/// and IPv4 header checksum, or IPv6's hop limit).
const FORWARD_HEADER: usize = ETH_HDR_LEN + 12;

/// The first [`FORWARD_HEADER`] bytes of the packet as 16-bit words (as read: network order),
/// read in place. The IP header is always at [`ETH_HDR_LEN`] (no VLAN tags are parsed).
#[inline(always)]
fn forward_header(ctx: &TcContext) -> Option<[u16; FORWARD_HEADER / 2]> {
    let data = ctx.data();
    if data + FORWARD_HEADER > ctx.data_end() {
        return None;
    }
    let p = data as *const u16;
    let mut h = [0u16; FORWARD_HEADER / 2];
    for (i, w) in h.iter_mut().enumerate() {
        // SAFETY: inside [data, data_end), checked above (see `parse_direct` on alignment).
        *w = unsafe { *p.add(i) };
    }
    Some(h)
}

/// The TTL (IPv4 byte 8) or hop limit (IPv6 byte 7) in `h` ([`forward_header`]).
#[inline(always)]
fn hop_limit(h: &[u16; FORWARD_HEADER / 2], pkt: &Packet) -> u8 {
    let [first, second] = h[if pkt.ipv6 { 10 } else { 11 }].to_ne_bytes();
    if pkt.ipv6 { second } else { first }
}

/// Does what forwarding would: one less TTL / hop limit (and the IPv4 header checksum), the
/// next hop's and the interface's link-layer addresses, written in one store; then redirects to
/// that interface. The caller checked the hop limit is above 1.
#[inline(always)]
fn send_to_next_hop(ctx: &TcContext, pkt: &Packet, fib: &bpf_fib_lookup) -> i32 {
    let Some(mut h) = forward_header(ctx) else { return TC_ACT_OK as i32 };
    if pkt.ipv6 {
        // Bytes 20 and 21 (IPv6 6 and 7): next header, hop limit.
        h[10] = h[10].wrapping_sub(0x0100);
    } else {
        // Bytes 22 and 23 (IPv4 8 and 9): TTL, protocol; then the header checksum. Ones'
        // complement sums are the same in either byte order, so the words stay as read.
        let old = h[11];
        h[11] = old.wrapping_sub(1);
        h[12] = csum_replace2(h[12], old, h[11]);
    }
    let (d, m) = (&fib.dmac, &fib.smac);
    let w = |b: &[u8; 6], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    (h[0], h[1], h[2]) = (w(d, 0), w(d, 2), w(d, 4));
    (h[3], h[4], h[5]) = (w(m, 0), w(m, 2), w(m, 4));
    if ctx.store(0, &h, 0).is_err() {
        return TC_ACT_OK as i32;
    }
    count(Stat::Bypassed);
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(fib.ifindex, 0) as i32 }
}

/// The endpoint chosen for a new connection.
struct Chosen {
    endpoint: Endpoint,
    set: u32,
    index: u32,
    /// Masquerade required by the frontend and source (hairpin is checked by the caller).
    masquerade: bool,
}

/// One address and port rewrite: offsets in the packet, old and new values (network order).
/// `repr(C)` with the addresses first: 8-aligned, so they are copied as 8-byte words.
#[repr(C)]
struct Rewrite {
    old_addr: [u8; 16],
    new_addr: [u8; 16],
    addr_off: usize,
    port_off: usize,
    old_port: u16,
    new_port: u16,
}

/// Per-CPU working memory. The BPF stack (512 bytes for a whole call chain) cannot hold the
/// keys and values one packet needs, so they live here. Slots: [`SLOT_INGRESS`],
/// [`SLOT_EGRESS`], [`SLOT_SOCKET`] (a softirq may interrupt a socket program on its CPU and
/// run a TC program; TC programs do not interrupt each other).
struct Scratch {
    pkt: Packet,
    flow: FlowKey,
    reply: FlowKey,
    /// Another connection's key, built by [`end_connection_holding_reply`].
    other: FlowKey,
    key: FrontendKey,
    fe: FrontendValue,
    ct: CtValue,
    original: RevNatValue,
    chosen: Chosen,
    akey: AffinityKey,
    aval: AffinityValue,
    rw: Rewrite,
    sock: SockKey,
    /// Parameters and result of the route lookup of [`next_hop_known`].
    fib: bpf_fib_lookup,
}

const SLOT_INGRESS: u32 = 0;
const SLOT_EGRESS: u32 = 1;
const SLOT_SOCKET: u32 = 2;

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(3, 0);

#[inline(always)]
fn scratch(slot: u32) -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot used by one program kind, which does not nest with itself.
    SCRATCH.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

#[classifier]
pub fn ferry_tc_ingress(ctx: TcContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(action) => action,
        Err(ParseError) => {
            count(Stat::ParseError);
            TC_ACT_OK as i32
        }
    }
}

#[classifier]
pub fn ferry_tc_egress(ctx: TcContext) -> i32 {
    match try_egress(&ctx) {
        Ok(action) => action,
        Err(ParseError) => {
            count(Stat::ParseError);
            TC_ACT_OK as i32
        }
    }
}

/// Results of [`parse`].
const PARSED: i32 = 0;
const NOT_APPLICABLE: i32 = 1;
const PARSE_ERROR: i32 = -1;

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<i32, ParseError> {
    let s = scratch(SLOT_INGRESS).ok_or(ParseError)?;
    match parse(ctx, &mut s.pkt) {
        PARSED => {}
        NOT_APPLICABLE => {
            count(Stat::NotApplicable);
            return Ok(TC_ACT_OK as i32);
        }
        _ => return Err(ParseError),
    }
    if bypass_netfilter() {
        let action = reply_straight_to_client(ctx, s);
        if action != NOT_A_REPLY {
            return Ok(action);
        }
    }
    let syn = s.pkt.is_tcp_syn();
    if !may_be_frontend(&s.pkt.flow) {
        if s.pkt.flow.protocol != protocol::TCP || syn {
            end_superseded_connection(ctx, s);
        }
        // No frontend and no allocated ClusterIP here: only a service CIDR can say DROP.
        if in_service_cidr(&s.pkt.flow) {
            count(Stat::Drop);
            return Ok(TC_ACT_SHOT);
        }
        count(Stat::ServiceMiss);
        return Ok(TC_ACT_OK as i32);
    }
    // A TCP packet after the SYN follows its connection's entry before any frontend lookup,
    // as netfilter's conntrack keeps NATing an established connection whatever happens to the
    // rules: a deleted frontend's connections keep their endpoint (as with the nftables
    // backend and kube-proxy), and the established path costs one lookup, not two.
    if s.pkt.flow.protocol == protocol::TCP && !syn {
        if let Some(entry) = CONNTRACK.get_ptr(&s.pkt.flow) {
            // SAFETY: a map value, valid during this run; copied out at once (the program
            // writes entries whole).
            copy_ct(&mut s.ct, unsafe { &*entry });
            return follow_connection(ctx, s);
        }
        if lookup_frontend(&s.pkt.flow, &mut s.key).is_some() {
            count(Stat::NoConnection);
            return Ok(TC_ACT_OK as i32);
        }
        return Ok(no_frontend(ctx, s));
    }
    let Some(fe) = lookup_frontend(&s.pkt.flow, &mut s.key) else {
        end_superseded_connection(ctx, s);
        return Ok(no_frontend(ctx, s));
    };
    // A UDP/SCTP packet follows its entry; a TCP SYN re-chooses unless the frontend still uses
    // the set the entry came from (a retransmitted SYN keeps its endpoint).
    if let Some(entry) = CONNTRACK.get_ptr(&s.pkt.flow) {
        // SAFETY: as above.
        copy_ct(&mut s.ct, unsafe { &*entry });
        if !syn || s.ct.set == fe.set || s.ct.set == fe.sc_set {
            if syn {
                // A (re)opening keeps its reply entry too, whatever evicted or ended it.
                s.flow = s.pkt.flow;
                fill_reply(s);
                end_connection_holding_reply(s);
                if REVNAT.insert(&s.reply, &s.original, 0).is_err() {
                    count(Stat::MapUpdateFailed);
                }
            }
            return follow_connection(ctx, s);
        }
    }
    copy_frontend(&mut s.fe, fe);
    s.flow = s.pkt.flow;
    Ok(new_connection(ctx, s))
}

/// False when [`FRONTEND_FILTER`] proves that `flow`'s destination is no frontend address (and
/// was none since ferry started: bits stay set), so no map of the translation path can match.
#[inline(always)]
fn may_be_frontend(flow: &FlowKey) -> bool {
    let [a, b] = daddr_words(flow);
    // The XOR of the address's four 4-byte words, as `frontend_filter::bit` folds them.
    let x = a ^ b;
    let bit = frontend_filter::bit_of_words([x as u32, (x >> 32) as u32, 0, 0]);
    let (word, mask) = frontend_filter::word_and_mask(bit);
    if FRONTEND_FILTER.get(word).is_none_or(|w| *w & mask != 0) {
        return true;
    }
    // A clear bit counts once the filter is complete.
    FRONTEND_FILTER.get(frontend_filter::ENABLED_WORD).is_none_or(|w| *w == 0)
}

/// Whether `flow`'s destination is in one of the service CIDRs ([`SERVICE_CIDRS`]).
#[inline(always)]
fn in_service_cidr(flow: &FlowKey) -> bool {
    let Some(list) = SERVICE_CIDRS.get(0) else { return false };
    let [a, b] = daddr_words(flow);
    let count = list.count as usize;
    for (n, [net0, net1, mask0, mask1]) in list.cidrs.iter().enumerate() {
        if n >= count {
            return false;
        }
        if a & mask0 == *net0 && b & mask1 == *net1 {
            return true;
        }
    }
    false
}

/// DNAT of a packet of the known connection `s.ct`.
#[inline(always)]
fn follow_connection(ctx: &TcContext, s: &mut Scratch) -> Result<i32, ParseError> {
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.rw.new_addr, &s.ct.addr) };
    s.rw.new_port = s.ct.port;
    rewrite(ctx, &s.pkt, true, &mut s.rw)?;
    count(Stat::Established);
    if s.ct.flags & ct::MASQUERADE != 0 {
        set_mark(ctx, mark::MASQUERADE);
        return Ok(TC_ACT_OK as i32);
    }
    if bypass_netfilter() {
        return Ok(forward_translated(ctx, s));
    }
    Ok(TC_ACT_OK as i32)
}

/// Copies a map value field by field (see [`set_flow_tail`] for why not `*dst = *src`).
#[inline(always)]
fn copy_ct(dst: &mut CtValue, src: &CtValue) {
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut dst.addr, &src.addr) };
    dst.port = src.port;
    dst.flags = src.flags;
    dst._pad = 0;
    dst.set = src.set;
    dst.index = src.index;
    dst.ifindex = src.ifindex;
}

#[inline(always)]
fn copy_frontend(dst: &mut FrontendValue, src: &FrontendValue) {
    dst.service_id = src.service_id;
    dst.flags = src.flags;
    dst.set = src.set;
    dst.count = src.count;
    dst.sc_set = src.sc_set;
    dst.sc_count = src.sc_count;
    dst.affinity_timeout = src.affinity_timeout;
    dst._pad = 0;
}

#[inline(always)]
fn copy_endpoint(dst: &mut Endpoint, src: &Endpoint) {
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut dst.addr, &src.addr) };
    dst.port = src.port;
    dst._pad = 0;
}

#[inline(always)]
fn copy_revnat(dst: &mut RevNatValue, src: &RevNatValue) {
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut dst.addr, &src.addr) };
    dst.port = src.port;
    dst._pad = 0;
}

/// A packet that may open a flow (TCP SYN, any UDP/SCTP packet) to no frontend. If a translated
/// connection had exactly its addresses and ports after DNAT (client → endpoint) and came in on
/// the same interface, that connection is over: the client now talks to the endpoint directly
/// (netfilter's conntrack sees both as one tuple too). Its entries go, or the reply entry would
/// rewrite this flow's replies to the frontend. Seen on another interface, the packet is the
/// connection's own, already translated (a bridge of pod veths runs the program again).
#[inline(never)]
fn end_superseded_connection(ctx: &TcContext, s: &mut Scratch) {
    let pkt = &s.pkt.flow;
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.reply.saddr, &pkt.daddr) };
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.reply.daddr, &pkt.saddr) };
    set_flow_tail(&mut s.reply, pkt.dport, pkt.sport, pkt.protocol);
    let Some(original) = REVNAT.get_ptr(&s.reply) else { return };
    // SAFETY: a map value, valid during this run; copied out at once.
    copy_revnat(&mut s.original, unsafe { &*original });
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.flow.saddr, &pkt.saddr) };
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.flow.daddr, &s.original.addr) };
    set_flow_tail(&mut s.flow, pkt.sport, s.original.port, pkt.protocol);
    // SAFETY: reading a field of the context the kernel passed.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if let Some(entry) = CONNTRACK.get_ptr(&s.flow) {
        // SAFETY: as above.
        copy_ct(&mut s.ct, unsafe { &*entry });
        if s.ct.ifindex != ifindex {
            return;
        }
        // Only the connection this reply entry was made for: the client may have opened
        // another one to the frontend from the same port since.
        if addr_eq(&s.ct.addr, &pkt.daddr) && s.ct.port == pkt.dport {
            let _ = CONNTRACK.remove(&s.flow);
        }
    }
    let _ = REVNAT.remove(&s.reply);
    count(Stat::Superseded);
}

/// Called before connection `s.flow` writes its reply entry `s.reply` (frontend
/// `s.original`). If a connection to another frontend holds that entry, the client reused its
/// source port for two frontends with a common endpoint: after DNAT both are client:port ↔
/// endpoint. That connection ends (its `CONNTRACK` entry goes, counter `superseded`), so that
/// its next packet opens it again and takes the entry back; kept, its replies would be
/// rewritten to this frontend's address and never reach the client's socket. Netfilter
/// remaps the second connection's source port instead; ferry does not, so two such flows that
/// exchange packets at the same moment can still see each other's replies.
#[inline(never)]
fn end_connection_holding_reply(s: &mut Scratch) {
    let Some(held) = REVNAT.get_ptr(&s.reply) else { return };
    // SAFETY: a map value, valid during this run; read at once.
    let held = unsafe { &*held };
    if addr_eq(&held.addr, &s.original.addr) && held.port == s.original.port {
        return;
    }
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.other.saddr, &s.flow.saddr) };
    // SAFETY: as above.
    unsafe { copy_addr(&mut s.other.daddr, &held.addr) };
    set_flow_tail(&mut s.other, s.flow.sport, held.port, s.flow.protocol);
    let _ = CONNTRACK.remove(&s.other);
    count(Stat::Superseded);
}

/// The reply key of connection `s.flow` translated to `s.ct`, and its frontend in `s.original`.
#[inline(always)]
fn fill_reply(s: &mut Scratch) {
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.reply.saddr, &s.ct.addr) };
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.reply.daddr, &s.flow.saddr) };
    set_flow_tail(&mut s.reply, s.ct.port, s.flow.sport, s.flow.protocol);
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.original.addr, &s.flow.daddr) };
    s.original.port = s.flow.dport;
    s.original._pad = 0;
}

/// The frontend of `flow`'s destination: an address frontend first, then a NodePort on a node
/// address. `key` is working memory. The value is read in place (a few fields; whoever needs
/// all of it copies it with [`copy_frontend`]): userspace replaces entries whole.
#[inline(always)]
fn lookup_frontend(flow: &FlowKey, key: &mut FrontendKey) -> Option<&'static FrontendValue> {
    let daddr = &flow.daddr;
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut key.addr, daddr) };
    key.port = flow.dport;
    key.protocol = flow.protocol;
    key._pad = 0;
    // SAFETY: a map value, valid during this program run.
    if let Some(fe) = unsafe { SERVICES.get(&*key) } {
        return Some(fe);
    }
    // SAFETY: as above.
    let flags = unsafe { NODE_ADDRS.get(daddr) }.copied().unwrap_or(0);
    if flags & node_addr::NODE_PORT == 0 {
        return None;
    }
    let any = if is_mapped(daddr) { NODE_PORT_ADDR_V4 } else { NODE_PORT_ADDR_V6 };
    let w = |i: usize| u32::from_ne_bytes([any[i], any[i + 1], any[i + 2], any[i + 3]]);
    let p = key.addr.as_mut_ptr().cast::<u32>();
    // SAFETY: FrontendKey is 4-aligned, its address its first 16 bytes.
    unsafe {
        p.write(w(0));
        p.add(1).write(w(4));
        p.add(2).write(w(8));
        p.add(3).write(w(12));
    }
    // SAFETY: as above.
    unsafe { SERVICES.get(&*key) }
}

/// A TCP/UDP/SCTP packet to no frontend: an undefined port of a ClusterIP is rejected, an
/// unallocated address of a service CIDR dropped, anything else left alone.
#[inline(always)]
fn no_frontend(ctx: &TcContext, s: &Scratch) -> i32 {
    match DST_POLICY.get(&Key::new(128, s.pkt.flow.daddr)).copied() {
        Some(dst_policy::REJECT) => {
            set_mark(ctx, mark::REJECT);
            count(Stat::Reject);
            TC_ACT_OK as i32
        }
        Some(dst_policy::DROP) => {
            count(Stat::Drop);
            TC_ACT_SHOT
        }
        _ => {
            count(Stat::ServiceMiss);
            TC_ACT_OK as i32
        }
    }
}

/// What [`choose`] knows about the source (bits): inside the cluster CIDRs, one of the node's.
const SOURCE_POD: u32 = 1;
const SOURCE_NODE: u32 = 2;

/// Results of [`choose`]: an endpoint was written to `Scratch::chosen`.
const CHOSEN: u32 = 0;
/// No endpoint in the set: REJECT.
const CHOICE_REJECT: u32 = 1;
/// No endpoint in the set: DROP.
const CHOICE_DROP: u32 = 2;
/// The frontend names a slot that does not exist (a bug or a racing cleanup).
const CHOICE_MISSING: u32 = 3;

/// A new connection (`s.pkt`, `s.flow`, frontend `s.fe`): source checks, endpoint choice,
/// connection entries, DNAT. A separate BPF function so that its stack is not its caller's.
#[inline(never)]
fn new_connection(ctx: &TcContext, s: &mut Scratch) -> i32 {
    let is_pod = POD_CIDRS.get(&Key::new(128, s.flow.saddr)).is_some();
    // SAFETY: copied out at once.
    let is_node = unsafe { NODE_ADDRS.get(&s.flow.saddr) }.copied().unwrap_or(0) & node_addr::NODE != 0;
    if s.fe.flags & frontend::SOURCE_RANGES != 0 {
        let key = SourceRangeKey { service_id: s.fe.service_id.to_be(), addr: s.flow.saddr };
        if SOURCE_RANGES.get(&Key::new(SourceRangeKey::prefix_len(128), key)).is_none() {
            count(Stat::Drop);
            return TC_ACT_SHOT;
        }
    }
    let source = if is_pod { SOURCE_POD } else { 0 } | if is_node { SOURCE_NODE } else { 0 };
    match choose(s, source) {
        CHOSEN => {}
        CHOICE_REJECT => {
            set_mark(ctx, mark::REJECT);
            count(Stat::Reject);
            return TC_ACT_OK as i32;
        }
        CHOICE_DROP => {
            count(Stat::Drop);
            return TC_ACT_SHOT;
        }
        _ => {
            count(Stat::EndpointMissing);
            return TC_ACT_OK as i32;
        }
    }
    let masquerade = s.chosen.masquerade || addr_eq(&s.chosen.endpoint.addr, &s.flow.saddr);
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.ct.addr, &s.chosen.endpoint.addr) };
    s.ct.port = s.chosen.endpoint.port;
    s.ct.flags = if masquerade { ct::MASQUERADE } else { 0 };
    s.ct._pad = 0;
    s.ct.set = s.chosen.set;
    s.ct.index = s.chosen.index;
    // SAFETY: reading a field of the context the kernel passed.
    s.ct.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    fill_reply(s);
    end_connection_holding_reply(s);
    if CONNTRACK.insert(&s.flow, &s.ct, 0).is_err() || REVNAT.insert(&s.reply, &s.original, 0).is_err() {
        count(Stat::MapUpdateFailed);
    }
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.rw.new_addr, &s.ct.addr) };
    s.rw.new_port = s.ct.port;
    if rewrite(ctx, &s.pkt, true, &mut s.rw).is_err() {
        count(Stat::ParseError);
        return TC_ACT_OK as i32;
    }
    count(Stat::ServiceHit);
    if masquerade {
        set_mark(ctx, mark::MASQUERADE);
        return TC_ACT_OK as i32;
    }
    if bypass_netfilter() {
        return forward_translated(ctx, s);
    }
    TC_ACT_OK as i32
}

/// The set, then the slot, for a new connection of `s.flow` to frontend `s.fe` (shared by TC
/// and socket paths); writes `s.chosen` and returns [`CHOSEN`], or says why there is none.
/// A separate BPF function: a scalar result keeps its stack out of its callers'.
#[inline(never)]
fn choose(s: &mut Scratch, source: u32) -> u32 {
    let fe = &s.fe;
    let is_pod = source & SOURCE_POD != 0;
    let is_node = source & SOURCE_NODE != 0;
    let mut masquerade =
        fe.flags & frontend::MASQ_ALWAYS != 0 || (fe.flags & frontend::MASQ_NOT_POD != 0 && !is_pod);
    let pod_sc = fe.flags & frontend::SHORT_CIRCUIT_PODS != 0 && is_pod;
    let node_sc = fe.flags & frontend::SHORT_CIRCUIT_NODE != 0 && is_node;
    let short_circuit = (pod_sc || node_sc) && fe.sc_count != 0;
    let (set, n) = if short_circuit { (fe.sc_set, fe.sc_count) } else { (fe.set, fe.count) };
    if short_circuit && node_sc {
        masquerade = true;
    }
    if n == 0 {
        return if fe.flags & frontend::EMPTY_DROP != 0 { CHOICE_DROP } else { CHOICE_REJECT };
    }
    let affinity = fe.affinity_timeout != 0;
    let timeout_ns = u64::from(fe.affinity_timeout) * 1_000_000_000;
    let maglev = !short_circuit && fe.flags & frontend::MAGLEV != 0;
    s.chosen.set = set;
    s.chosen.masquerade = masquerade;
    let mut now = 0;
    if affinity {
        s.akey.service_id = fe.service_id;
        s.akey.short_circuit = short_circuit as u32;
        // SAFETY: fields of 4-aligned types.
        unsafe { copy_addr(&mut s.akey.client, &s.flow.saddr) };
        // SAFETY: a plain helper call.
        now = unsafe { bpf_ktime_get_ns() };
        if let Some(a) = AFFINITY.get_ptr(&s.akey) {
            // SAFETY: a map value, valid during this run; copied out at once.
            let a = unsafe { &*a };
            s.aval.last_seen_ns = a.last_seen_ns;
            // SAFETY: fields of 4-aligned types.
            unsafe { copy_addr(&mut s.aval.addr, &a.addr) };
            s.aval.port = a.port;
            s.aval._pad = 0;
            s.aval.index = a.index;
            let fresh = now.wrapping_sub(s.aval.last_seen_ns) <= timeout_ns;
            let key = EndpointKey { set, index: s.aval.index };
            // SAFETY: as above.
            if fresh && let Some(ep) = unsafe { ENDPOINTS.get(&key) } {
                if addr_eq(&ep.addr, &s.aval.addr) && ep.port == s.aval.port {
                    copy_endpoint(&mut s.chosen.endpoint, ep);
                    s.chosen.index = s.aval.index;
                    s.aval.last_seen_ns = now;
                    if AFFINITY.insert(&s.akey, &s.aval, 0).is_err() {
                        count(Stat::MapUpdateFailed);
                    }
                    return CHOSEN;
                }
            }
        }
    }
    let index = if maglev {
        match maglev_slot(set, &s.flow) {
            Some(i) => i,
            None => return CHOICE_MISSING,
        }
    } else {
        // SAFETY: a plain helper call.
        (unsafe { bpf_get_prandom_u32() }) % n
    };
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(&EndpointKey { set, index }) }) else {
        return CHOICE_MISSING;
    };
    copy_endpoint(&mut s.chosen.endpoint, ep);
    s.chosen.index = index;
    if affinity {
        s.aval.last_seen_ns = now;
        // SAFETY: fields of 4-aligned types.
        unsafe { copy_addr(&mut s.aval.addr, &ep.addr) };
        s.aval.port = ep.port;
        s.aval._pad = 0;
        s.aval.index = index;
        if AFFINITY.insert(&s.akey, &s.aval, 0).is_err() {
            count(Stat::MapUpdateFailed);
        }
    }
    CHOSEN
}

/// The slot Maglev assigns to `flow` in `set`'s table.
#[inline(always)]
fn maglev_slot(set: u32, flow: &FlowKey) -> Option<u32> {
    let table: *const MaglevTable = MAGLEV.get_ptr(&set)?;
    // SAFETY: a map value pointer, valid for this program run; only fields are read.
    let size = unsafe { (*table).size };
    if size == 0 {
        return None;
    }
    let i = (flow_hash(flow) % size) as usize;
    // SAFETY: as above; `get` bounds-checks against the array length.
    unsafe { (*table).entries.get(i).copied() }
}

#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<i32, ParseError> {
    let s = scratch(SLOT_EGRESS).ok_or(ParseError)?;
    match parse(ctx, &mut s.pkt) {
        PARSED => {}
        NOT_APPLICABLE => return Ok(TC_ACT_OK as i32),
        _ => return Err(ParseError),
    }
    let Some(original) = REVNAT.get_ptr(&s.pkt.flow) else {
        return Ok(TC_ACT_OK as i32);
    };
    // SAFETY: a map value, valid during this run; copied out at once.
    copy_revnat(&mut s.original, unsafe { &*original });
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.rw.new_addr, &s.original.addr) };
    s.rw.new_port = s.original.port;
    rewrite(ctx, &s.pkt, false, &mut s.rw)?;
    count(Stat::ReverseNat);
    Ok(TC_ACT_OK as i32)
}

/// Parses Ethernet, IPv4/IPv6 and the ports into `pkt`: [`PARSED`], [`NOT_APPLICABLE`] (not
/// TCP/UDP/SCTP over IP, or a non-first fragment) or [`PARSE_ERROR`].
#[inline(always)]
fn parse(ctx: &TcContext, pkt: &mut Packet) -> i32 {
    match parse_into(ctx, pkt) {
        Ok(true) => PARSED,
        Ok(false) => NOT_APPLICABLE,
        Err(ParseError) => PARSE_ERROR,
    }
}

#[inline(always)]
fn parse_into(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, ParseError> {
    if let Some(result) = parse_direct(ctx, pkt) {
        return result;
    }
    let ether_type = u16::from_be(load::<u16>(ctx, 12)?);
    let l3 = ETH_HDR_LEN;
    pkt.l3 = l3;
    let proto;
    match ether_type {
        ETH_P_IPV4 => {
            // One copy of the fixed header instead of a helper call per field.
            let h: [u32; IPV4_MIN_HDR_LEN / 4] = load(ctx, l3)?;
            let [b0, _, _, _] = h[0].to_ne_bytes();
            let [_, _, f0, f1] = h[1].to_ne_bytes();
            let [_, p, _, _] = h[2].to_ne_bytes();
            if b0 >> 4 != 4 {
                return Err(ParseError);
            }
            let header_len = usize::from(b0 & 0x0f) * 4;
            if header_len < IPV4_MIN_HDR_LEN {
                return Err(ParseError);
            }
            // Flags and fragment offset: a non-first fragment has no transport header.
            if u16::from_be_bytes([f0, f1]) & 0x1fff != 0 {
                return Ok(false);
            }
            pkt.ipv6 = false;
            proto = p;
            set_flow_addrs(&mut pkt.flow, mapped_words(h[3]), mapped_words(h[4]));
            pkt.l4 = l3 + header_len;
        }
        ETH_P_IPV6 => {
            let h: [u64; IPV6_HDR_LEN / 8] = load(ctx, l3)?;
            let [b0, _, _, _, _, _, next, _] = h[0].to_ne_bytes();
            if b0 >> 4 != 6 {
                return Err(ParseError);
            }
            pkt.ipv6 = true;
            set_flow_addrs(&mut pkt.flow, [h[1], h[2]], [h[3], h[4]]);
            let mut next_header: u8 = next;
            let mut l4 = l3 + IPV6_HDR_LEN;
            let mut found = false;
            for _ in 0..MAX_IPV6_EXT_HDRS {
                match next_header {
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                        // Next header, then the length in 8-octet units not counting the first 8.
                        let [next, len]: [u8; 2] = load(ctx, l4)?;
                        next_header = next;
                        l4 += (usize::from(len) + 1) * 8;
                    }
                    IPPROTO_FRAGMENT => {
                        let [next, _reserved]: [u8; 2] = load(ctx, l4)?;
                        let frag = u16::from_be(load::<u16>(ctx, l4 + 2)?);
                        if frag & 0xfff8 != 0 {
                            return Ok(false);
                        }
                        next_header = next;
                        l4 += 8;
                    }
                    _ => {
                        found = true;
                        break;
                    }
                }
            }
            if !found {
                return Err(ParseError);
            }
            proto = next_header;
            pkt.l4 = l4;
        }
        _ => return Ok(false),
    }
    if !matches!(proto, protocol::TCP | protocol::UDP | protocol::SCTP) {
        return Ok(false);
    }
    // TCP, UDP and SCTP all start with the source and destination ports (kept in network
    // order: the raw bytes read as a native u16); TCP's flags are byte 13.
    let ports: [u16; 2] = load(ctx, pkt.l4)?;
    pkt.tcp_flags = if proto == protocol::TCP { load::<u8>(ctx, pkt.l4 + 13)? } else { 0 };
    set_flow_tail(&mut pkt.flow, ports[0], ports[1], proto);
    Ok(true)
}

/// The common case read with direct packet access (no helper calls): IPv4 without options or
/// IPv6 without extension headers, TCP/UDP/SCTP, the first 14 bytes of the transport header in
/// the linear part of the skb. `None`: not that case, [`parse_into`]'s helper path decides.
///
/// Header fields are read as 2-, 4- and 8-byte words: the verifier's model of packet data
/// (`NET_IP_ALIGN`) keeps IP header fields naturally aligned, and where the hardware needs
/// alignment the kernel enforces that model; the x86-64 and arm64 JITs load any alignment. A
/// byte-by-byte read costs an instruction per byte.
#[inline(always)]
fn parse_direct(ctx: &TcContext, pkt: &mut Packet) -> Option<Result<bool, ParseError>> {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HDR_LEN > end {
        return None;
    }
    // SAFETY: inside [data, data_end), checked above (and by the verifier).
    let ether_type = u16::from_be(unsafe { *((data + 12) as *const u16) });
    let (proto, l4) = match ether_type {
        ETH_P_IPV4 => {
            const L4: usize = ETH_HDR_LEN + IPV4_MIN_HDR_LEN;
            if data + L4 + 14 > end {
                return None;
            }
            let ip = data + ETH_HDR_LEN;
            // SAFETY: as above.
            let (b0, frag, proto, saddr, daddr) = unsafe {
                (
                    *(ip as *const u8),
                    *((ip + 6) as *const u16),
                    *((ip + 9) as *const u8),
                    *((ip + 12) as *const u32),
                    *((ip + 16) as *const u32),
                )
            };
            if b0 != 0x45 || u16::from_be(frag) & 0x1fff != 0 {
                return None;
            }
            pkt.ipv6 = false;
            set_flow_addrs(&mut pkt.flow, mapped_words(saddr), mapped_words(daddr));
            (proto, L4)
        }
        ETH_P_IPV6 => {
            const L4: usize = ETH_HDR_LEN + IPV6_HDR_LEN;
            if data + L4 + 14 > end {
                return None;
            }
            let ip = data + ETH_HDR_LEN;
            // SAFETY: as above.
            let (b0, proto) = unsafe { (*(ip as *const u8), *((ip + 6) as *const u8)) };
            if b0 >> 4 != 6 || !matches!(proto, protocol::TCP | protocol::UDP | protocol::SCTP) {
                return None;
            }
            let a = (ip + 8) as *const u64;
            pkt.ipv6 = true;
            // SAFETY: as above (bytes 8..40 of the IPv6 header).
            unsafe { set_flow_addrs(&mut pkt.flow, [*a, *a.add(1)], [*a.add(2), *a.add(3)]) };
            (proto, L4)
        }
        ETH_P_ARP => return Some(Ok(false)),
        _ => return None,
    };
    if !matches!(proto, protocol::TCP | protocol::UDP | protocol::SCTP) {
        return Some(Ok(false));
    }
    let t = data + l4;
    // SAFETY: `l4 + 14` is within the bound checked above.
    let (sport, dport, flags) =
        unsafe { (*(t as *const u16), *((t + 2) as *const u16), *((t + 13) as *const u8)) };
    pkt.l3 = ETH_HDR_LEN;
    pkt.l4 = l4;
    pkt.tcp_flags = if proto == protocol::TCP { flags } else { 0 };
    set_flow_tail(&mut pkt.flow, sport, dport, proto);
    Some(Ok(true))
}

/// Offset of the transport checksum from the transport header, and the l4_csum_replace flags
/// for it; `None` for SCTP (its CRC32c does not cover the addresses; a port change is
/// [`sctp_port_checksum`]'s).
#[inline(always)]
fn l4_checksum(protocol: u8) -> Option<(usize, u64)> {
    match protocol {
        protocol::TCP => Some((16, 0)),
        protocol::UDP => Some((6, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    }
}

/// Replaces the destination (`dst`: DNAT on ingress) or the source (reverse translation on
/// egress) address and port of `pkt` with `rw.new_addr`, `rw.new_port` (network order),
/// fixing the IPv4 header checksum and the transport checksum. A separate BPF function so
/// that its stack is not its callers'.
#[inline(always)]
fn rewrite(ctx: &TcContext, pkt: &Packet, dst: bool, rw: &mut Rewrite) -> Result<(), ParseError> {
    if !pkt.ipv6
        && pkt.l3 == ETH_HDR_LEN
        && pkt.l4 == ETH_HDR_LEN + IPV4_MIN_HDR_LEN
        && pkt.flow.protocol != protocol::SCTP
        && let Some(done) = rewrite_ipv4(ctx, pkt.flow.protocol, dst, &rw.new_addr, rw.new_port)
    {
        return done;
    }
    if pkt.ipv6
        && pkt.l3 == ETH_HDR_LEN
        && pkt.l4 == ETH_HDR_LEN + IPV6_HDR_LEN
        && let Some(done) = rewrite_ipv6(ctx, pkt.flow.protocol, dst, &rw.new_addr, rw.new_port)
    {
        return done;
    }
    let flow = &pkt.flow;
    if dst {
        rw.addr_off = if pkt.ipv6 { pkt.l3 + 24 } else { pkt.l3 + 16 };
        rw.port_off = pkt.l4 + 2;
        // SAFETY: fields of 4-aligned types.
        unsafe { copy_addr(&mut rw.old_addr, &flow.daddr) };
        rw.old_port = flow.dport;
    } else {
        rw.addr_off = if pkt.ipv6 { pkt.l3 + 8 } else { pkt.l3 + 12 };
        rw.port_off = pkt.l4;
        // SAFETY: fields of 4-aligned types.
        unsafe { copy_addr(&mut rw.old_addr, &flow.saddr) };
        rw.old_port = flow.sport;
    }
    rewrite_general(ctx, pkt, rw)
}

/// The common case of [`rewrite`]: TCP or UDP over IPv4 without options, headers in the
/// linear part. Where the program can read the skb's checksum state, one store does it all
/// ([`rewrite_ipv4_in_one_store`]). Otherwise one `bpf_skb_store_bytes` writes bytes 8..24 of
/// the IP header and the ports (TTL and protocol, the header checksum updated here, both
/// addresses, both ports; the unchanged ones as they were), then `bpf_l4_csum_replace` updates
/// the transport checksum for the address (pseudo-header) and for the port: the helper knows
/// the state (a CHECKSUM_PARTIAL packet holds only the pseudo-header sum, a CHECKSUM_COMPLETE
/// one has `skb->csum` to keep right). `None`: not in the linear part, the general case applies.
#[inline(always)]
fn rewrite_ipv4(
    ctx: &TcContext,
    proto: u8,
    dst: bool,
    addr: &[u8; 16],
    port: u16,
) -> Option<Result<(), ParseError>> {
    const IP: usize = ETH_HDR_LEN;
    const L4: usize = ETH_HDR_LEN + IPV4_MIN_HDR_LEN;
    if let Some(state) = checksum_state(ctx) {
        // The transport checksum is at byte 16 of TCP (word 7 of the store: 3 of the IP
        // header, 4 of TCP, low half) and byte 6 of UDP (word 4, high half).
        let done = match proto {
            protocol::TCP => rewrite_ipv4_in_one_store::<8>(ctx, state, dst, addr, port, (7, 0, false)),
            protocol::UDP => rewrite_ipv4_in_one_store::<5>(ctx, state, dst, addr, port, (4, 16, true)),
            _ => None,
        };
        if done.is_some() {
            return done;
        }
    }
    // TTL, protocol, checksum | saddr | daddr | sport, dport.
    let mut w = read_words::<4>(ctx, IP + 8)?;
    let (old_addr, new_addr, old_port) = translate_ipv4_words(&mut w, dst, addr, port);
    if ctx.store(IP + 8, &w, 0).is_err() {
        return Some(Err(ParseError));
    }
    // Differences, not old and new values: the helper then adds one number instead of running
    // `csum_partial` over an array of two.
    if let Some((off, flags)) = l4_checksum(proto) {
        if old_addr != new_addr
            && ctx
                .l4_csum_replace(
                    L4 + off,
                    0,
                    u64::from(csum_diff4(old_addr, new_addr)),
                    flags | u64::from(BPF_F_PSEUDO_HDR),
                )
                .is_err()
        {
            return Some(Err(ParseError));
        }
        if old_port != port
            && ctx
                .l4_csum_replace(L4 + off, 0, u64::from(u32::from(!old_port) + u32::from(port)), flags)
                .is_err()
        {
            return Some(Err(ParseError));
        }
    }
    Some(Ok(()))
}

/// `N` 4-byte words of the packet from offset `at`, or `None` past the linear part.
#[inline(always)]
fn read_words<const N: usize>(ctx: &TcContext, at: usize) -> Option<[u32; N]> {
    let data = ctx.data();
    if data + at + 4 * N > ctx.data_end() {
        return None;
    }
    let mut w = [0u32; N];
    for (i, word) in w.iter_mut().enumerate() {
        // SAFETY: inside [data, data_end), checked above (see `parse_direct` on alignment).
        *word = unsafe { *((data + at + 4 * i) as *const u32) };
    }
    Some(w)
}

/// In words read from byte 8 of an IPv4 header (TTL, protocol, checksum | saddr | daddr |
/// ports): puts `addr` and `port` in place of the destination (`dst`) or source address and
/// port, and updates the header checksum. Returns the old address, the new one and the old
/// port, as read.
#[inline(always)]
fn translate_ipv4_words<const N: usize>(
    w: &mut [u32; N],
    dst: bool,
    addr: &[u8; 16],
    port: u16,
) -> (u32, u32, u16) {
    let new_addr = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    let (ai, shift) = if dst { (2, 16) } else { (1, 0) };
    let old_addr = w[ai];
    let old_port = (w[3] >> shift) as u16;
    w[ai] = new_addr;
    w[3] = (w[3] & !(0xffff << shift)) | u32::from(port) << shift;
    let check = csum_replace4((w[0] >> 16) as u16, old_addr, new_addr);
    w[0] = (w[0] & 0xffff) | u32::from(check) << 16;
    (old_addr, new_addr, old_port)
}

/// TCP or UDP over IPv6 without extension headers, in one store where the checksum state is
/// known (see [`rewrite_ipv6_in_one_store`]); `None`: the general path applies. The store
/// starts at the replaced address: the destination (offset 24) runs into the transport
/// header; the source (offset 8) has the destination between it and the ports.
#[inline(always)]
fn rewrite_ipv6(
    ctx: &TcContext,
    proto: u8,
    dst: bool,
    addr: &[u8; 16],
    port: u16,
) -> Option<Result<(), ParseError>> {
    const IP: usize = ETH_HDR_LEN;
    let state = checksum_state(ctx)?;
    // (offset, ports word, dst) and (checksum word, shift, zero is none): the TCP checksum is
    // at byte 16 of its header (low half of a word), UDP's at byte 6 (high half).
    match (proto, dst) {
        (protocol::TCP, true) => {
            rewrite_ipv6_in_one_store::<9>(ctx, state, (IP + 24, 4, true), addr, port, (8, 0, false))
        }
        (protocol::TCP, false) => {
            rewrite_ipv6_in_one_store::<13>(ctx, state, (IP + 8, 8, false), addr, port, (12, 0, false))
        }
        (protocol::UDP, true) => {
            rewrite_ipv6_in_one_store::<6>(ctx, state, (IP + 24, 4, true), addr, port, (5, 16, true))
        }
        (protocol::UDP, false) => {
            rewrite_ipv6_in_one_store::<10>(ctx, state, (IP + 8, 8, false), addr, port, (9, 16, true))
        }
        _ => None,
    }
}

/// [`rewrite_ipv4`] where the checksum state is known: bytes 8.. of the IP header up to the
/// end of the transport checksum (`N` words) are read, rewritten (address, port, both
/// checksums, see [`update_l4_check`]) and written back in one `bpf_skb_store_bytes`.
/// `BPF_F_RECOMPUTE_CSUM` keeps a CHECKSUM_COMPLETE packet's `skb->csum` equal to the sum of its
/// bytes (the helper does nothing in the other states). `check`: the word and shift of the
/// transport checksum in the store, and whether zero means "none" (UDP). `None`: the bytes are
/// not in the linear part.
#[inline(always)]
fn rewrite_ipv4_in_one_store<const N: usize>(
    ctx: &TcContext,
    state: u8,
    dst: bool,
    addr: &[u8; 16],
    port: u16,
    check: (usize, u32, bool),
) -> Option<Result<(), ParseError>> {
    const AT: usize = ETH_HDR_LEN + 8;
    let (cw, cshift, zero_is_none) = check;
    let mut w = read_words::<N>(ctx, AT)?;
    let (old_addr, new_addr, old_port) = translate_ipv4_words(&mut w, dst, addr, port);
    let diff = u64::from(csum_diff4(old_addr, new_addr));
    update_l4_check(&mut w[cw], cshift, zero_is_none, state, diff, old_port, port);
    Some(ctx.store(AT, &w, u64::from(BPF_F_RECOMPUTE_CSUM)).map_err(|_| ParseError))
}

/// [`rewrite_ipv4_in_one_store`] for IPv6 without extension headers: `N` words from `at`, the
/// address being replaced in words 0..4, the ports in word `pw` (`dst`: the destination port,
/// the high half), the transport checksum as `check` says. No IP header checksum.
#[inline(always)]
fn rewrite_ipv6_in_one_store<const N: usize>(
    ctx: &TcContext,
    state: u8,
    (at, pw, dst): (usize, usize, bool),
    addr: &[u8; 16],
    port: u16,
    check: (usize, u32, bool),
) -> Option<Result<(), ParseError>> {
    let (cw, cshift, zero_is_none) = check;
    let mut w = read_words::<N>(ctx, at)?;
    let new = words16(addr);
    let mut diff = 0u64;
    for (old, new) in w.iter_mut().zip(new) {
        diff += u64::from(csum_diff4(*old, new));
        *old = new;
    }
    let shift = if dst { 16 } else { 0 };
    let old_port = (w[pw] >> shift) as u16;
    w[pw] = (w[pw] & !(0xffff << shift)) | u32::from(port) << shift;
    update_l4_check(&mut w[cw], cshift, zero_is_none, state, diff, old_port, port);
    Some(ctx.store(at, &w, u64::from(BPF_F_RECOMPUTE_CSUM)).map_err(|_| ParseError))
}

/// The transport checksum (the half of `word` at `shift`) after an address change whose
/// ones'-complement difference is `addr_diff` and a port change, as the kernel's
/// `inet_proto_csum_replace_by_diff` would make it: a CHECKSUM_PARTIAL packet's field holds the
/// pseudo-header sum, which takes only the address change (the port is summed when the
/// checksum is completed); any other state holds the full checksum, which takes both.
/// `zero_is_none`: UDP, whose zero means "no checksum" (left alone; a zero result is written
/// as 0xffff), as `BPF_F_MARK_MANGLED_0`.
#[inline(always)]
fn update_l4_check(
    word: &mut u32,
    shift: u32,
    zero_is_none: bool,
    state: u8,
    addr_diff: u64,
    old_port: u16,
    port: u16,
) {
    let old = (*word >> shift) as u16;
    if zero_is_none && old == 0 {
        return;
    }
    let mut new = if state == ks::CHECKSUM_PARTIAL {
        fold16(u64::from(old) + addr_diff)
    } else {
        !fold16(u64::from(!old) + addr_diff + u64::from(!old_port) + u64::from(port))
    };
    if zero_is_none && new == 0 {
        new = 0xffff;
    }
    *word = (*word & !(0xffff << shift)) | u32::from(new) << shift;
}

/// A ones'-complement sum folded to 16 bits with end-around carries.
#[inline(always)]
fn fold16(sum: u64) -> u16 {
    let mut s = (sum & 0xffff_ffff) + (sum >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The ones'-complement difference `to - from` as a 32-bit partial sum (the kernel's
/// `csum_sub(to, from)`; any representative works, the helper folds it).
#[inline(always)]
fn csum_diff4(from: u32, to: u32) -> u32 {
    let sum = u64::from(to) + u64::from(!from);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// An Internet checksum after one 32-bit word of the data it covers changed from `from` to
/// `to` (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')); every value as read from the packet.
#[inline(always)]
fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    !fold16(
        u64::from(!check)
            + u64::from(!(from as u16))
            + u64::from(!((from >> 16) as u16))
            + u64::from(to & 0xffff)
            + u64::from(to >> 16),
    )
}

/// An Internet checksum after one 16-bit word of the data it covers changed from `from` to
/// `to` (RFC 1624, eqn. 3), every value as read from the packet.
#[inline(always)]
fn csum_replace2(check: u16, from: u16, to: u16) -> u16 {
    !fold16(u64::from(!check) + u64::from(!from) + u64::from(to))
}

/// Rewrites one address and port with helper calls (any header layout, IPv6, SCTP), fixing
/// the IPv4 header checksum and the transport checksum (pseudo-header and port).
#[inline(never)]
fn rewrite_general(ctx: &TcContext, pkt: &Packet, change: &Rewrite) -> Result<(), ParseError> {
    let csum = l4_checksum(pkt.flow.protocol);
    if !addr_eq(&change.old_addr, &change.new_addr) {
        let diff = if pkt.ipv6 {
            let mut from = words16(&change.old_addr);
            let mut to = words16(&change.new_addr);
            ctx.store(change.addr_off, &change.new_addr, 0).map_err(|_| ParseError)?;
            // SAFETY: both buffers are 16 bytes on the stack.
            unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) }
        } else {
            let (o, n) = (&change.old_addr, &change.new_addr);
            let mut from = [u32::from_ne_bytes([o[12], o[13], o[14], o[15]])];
            let mut to = [u32::from_ne_bytes([n[12], n[13], n[14], n[15]])];
            ctx.store(change.addr_off, &to[0], 0).map_err(|_| ParseError)?;
            // SAFETY: both buffers are 4 bytes on the stack.
            let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 4, to.as_mut_ptr(), 4, 0) };
            // IPv4 header checksum at offset 10.
            ctx.l3_csum_replace(pkt.l3 + 10, 0, diff as u64, 0).map_err(|_| ParseError)?;
            diff
        };
        if let Some((off, flags)) = csum {
            ctx.l4_csum_replace(pkt.l4 + off, 0, diff as u64, flags | u64::from(BPF_F_PSEUDO_HDR))
                .map_err(|_| ParseError)?;
        }
    }
    if change.old_port != change.new_port {
        if pkt.flow.protocol == protocol::SCTP {
            sctp_port_checksum(ctx, pkt, change)?;
        }
        ctx.store(change.port_off, &change.new_port, 0).map_err(|_| ParseError)?;
        if let Some((off, flags)) = csum {
            ctx.l4_csum_replace(
                pkt.l4 + off,
                u64::from(change.old_port),
                u64::from(change.new_port),
                flags | 2,
            )
            .map_err(|_| ParseError)?;
        }
    }
    Ok(())
}

/// Offset of the checksum in the SCTP common header.
const SCTP_CHECKSUM_OFF: usize = 8;

/// Updates the SCTP checksum (CRC32c over the whole SCTP packet) for the port change of
/// `change`, from the length of the packet alone (`proxy_common::crc32c`). A zero checksum is
/// left alone: Linux sends SCTP with the checksum zero and to be filled in by the device or the
/// stack (CHECKSUM_PARTIAL, e.g. over veth), which then covers the rewritten port; a computed
/// CRC32c is zero for one packet in 2^32.
#[inline(never)]
fn sctp_port_checksum(ctx: &TcContext, pkt: &Packet, change: &Rewrite) -> Result<(), ParseError> {
    let checksum_off = pkt.l4 + SCTP_CHECKSUM_OFF;
    let checksum: u32 = load(ctx, checksum_off)?;
    if checksum == 0 {
        return Ok(());
    }
    // The SCTP packet's length from the IP header (an Ethernet frame may carry padding).
    let sctp_len = if pkt.ipv6 {
        let payload = u16::from_be(load::<u16>(ctx, pkt.l3 + 4)?) as usize;
        (pkt.l3 + IPV6_HDR_LEN + payload).checked_sub(pkt.l4)
    } else {
        let total = u16::from_be(load::<u16>(ctx, pkt.l3 + 2)?) as usize;
        (pkt.l3 + total).checked_sub(pkt.l4)
    };
    let after = sctp_len.and_then(|len| (pkt.l4 + len).checked_sub(change.port_off + 2)).ok_or(ParseError)?;
    let updated = checksum ^ crc32c::port_change(change.old_port, change.new_port, after as u16);
    ctx.store(checksum_off, &updated, 0).map_err(|_| ParseError)
}

// ---- cgroup sock_addr programs: processes of the node ----

#[cgroup_sock_addr(connect4)]
pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
    sock_translate(&ctx, false, true)
}

#[cgroup_sock_addr(connect6)]
pub fn ferry_connect6(ctx: SockAddrContext) -> i32 {
    sock_translate(&ctx, true, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ferry_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_translate(&ctx, false, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ferry_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_translate(&ctx, true, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ferry_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ferry_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ferry_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn ferry_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx, true)
}

/// Reads the user address of a sock_addr context as a 16-byte address.
///
/// # Safety
/// `out` is 4-aligned (see [`copy_addr`]).
#[inline(always)]
unsafe fn sock_user_addr(sa: &bpf_sock_addr, ipv6: bool, out: &mut [u8; 16]) {
    let w = if ipv6 { sa.user_ip6 } else { [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), sa.user_ip4] };
    let p = out.as_mut_ptr().cast::<u32>();
    // SAFETY: 16 bytes, 4-aligned by the caller's guarantee.
    unsafe {
        p.write(w[0]);
        p.add(1).write(w[1]);
        p.add(2).write(w[2]);
        p.add(3).write(w[3]);
    }
}

#[inline(always)]
fn sock_set_user_addr(sa: &mut bpf_sock_addr, ipv6: bool, addr: &[u8; 16], port: u16) {
    if ipv6 {
        let w = words16(addr);
        sa.user_ip6[0] = w[0];
        sa.user_ip6[1] = w[1];
        sa.user_ip6[2] = w[2];
        sa.user_ip6[3] = w[3];
    } else {
        sa.user_ip4 = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    }
    sa.user_port = u32::from(port);
}

/// connect/sendmsg: a frontend becomes an endpoint chosen as for a packet from the node. A
/// frontend with nothing to offer refuses the call (EPERM) for REJECT and DROP alike.
#[inline(always)]
fn sock_translate(ctx: &SockAddrContext, ipv6: bool, connected: bool) -> i32 {
    let Some(s) = scratch(SLOT_SOCKET) else { return 1 };
    // SAFETY: the context pointer the kernel passed; the verifier checks each field access.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.protocol {
        6 => protocol::TCP,
        17 => protocol::UDP,
        _ => return 1,
    };
    // SAFETY: a field of a 4-aligned type.
    unsafe { sock_user_addr(sa, ipv6, &mut s.flow.daddr) };
    let dport = sa.user_port as u16;
    set_flow_tail(&mut s.flow, 0, dport, proto);
    let Some(fe) = lookup_frontend(&s.flow, &mut s.key) else {
        return 1;
    };
    copy_frontend(&mut s.fe, fe);
    // SAFETY: a plain helper call on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let daddr_w = daddr_words(&s.flow);
    set_flow_addrs(&mut s.flow, [0, 0], daddr_w);
    set_flow_tail(&mut s.flow, (cookie as u16).to_be(), dport, proto);
    match choose(s, SOURCE_NODE) {
        CHOSEN => {}
        CHOICE_REJECT | CHOICE_DROP => {
            count(if s.fe.flags & frontend::EMPTY_DROP != 0 { Stat::Drop } else { Stat::Reject });
            return 0;
        }
        _ => {
            count(Stat::EndpointMissing);
            return 1;
        }
    }
    if ipv6 == is_mapped(&s.chosen.endpoint.addr) {
        // An endpoint of the other family cannot serve this socket.
        count(Stat::EndpointMissing);
        return 1;
    }
    s.sock.cookie = cookie;
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.sock.addr, &s.chosen.endpoint.addr) };
    set_sock_port(&mut s.sock, s.chosen.endpoint.port);
    // SAFETY: fields of 4-aligned types.
    unsafe { copy_addr(&mut s.original.addr, &s.flow.daddr) };
    s.original.port = dport;
    s.original._pad = 0;
    let flags = if connected { 0 } else { u64::from(BPF_NOEXIST) };
    let _ = SOCK_REVNAT.insert(&s.sock, &s.original, flags);
    sock_set_user_addr(sa, ipv6, &s.chosen.endpoint.addr, s.chosen.endpoint.port);
    count(Stat::SocketTranslated);
    1
}

/// recvmsg/getpeername: an endpoint the socket was sent to reads as its frontend.
#[inline(always)]
fn sock_reverse(ctx: &SockAddrContext, ipv6: bool) -> i32 {
    let Some(s) = scratch(SLOT_SOCKET) else { return 1 };
    // SAFETY: as in `sock_translate`.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: a plain helper call on the context.
    s.sock.cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: a field of a 4-aligned type.
    unsafe { sock_user_addr(sa, ipv6, &mut s.sock.addr) };
    set_sock_port(&mut s.sock, sa.user_port as u16);
    if let Some(original) = SOCK_REVNAT.get_ptr(&s.sock) {
        // SAFETY: a map value, valid during this run; copied out at once.
        copy_revnat(&mut s.original, unsafe { &*original });
        sock_set_user_addr(sa, ipv6, &s.original.addr, s.original.port);
    }
    1
}

// ---- helpers ----

/// Copies a `T` out of the packet at `offset` (bpf_skb_load_bytes: works on non-linear skbs
/// and does the bounds check).
#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, ParseError> {
    ctx.load(offset).map_err(|_| ParseError)
}

#[inline(always)]
fn set_mark(ctx: &TcContext, bits: u32) {
    // SAFETY: reading a field of the context the kernel passed.
    let current = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(current | bits);
}

#[inline(always)]
fn is_mapped(addr: &[u8; 16]) -> bool {
    u64::from_ne_bytes([addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7]]) == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

/// Compares two addresses as two 64-bit words (no memcmp in BPF).
#[inline(always)]
fn addr_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let w = |x: &[u8; 16], i: usize| {
        u64::from_ne_bytes([x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5], x[i + 6], x[i + 7]])
    };
    w(a, 0) == w(b, 0) && w(a, 8) == w(b, 8)
}

#[inline(always)]
fn words16(a: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

#[inline(always)]
fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat.index()) {
        // SAFETY: a per-CPU slot: nothing else writes it while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
