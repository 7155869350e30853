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
//!
//! Masquerade is a mark for a small nftables rule (see docs/ebpf.md). Map layouts, names and
//! counter indices live in `proxy-common`. Programs only read the maps userspace writes and
//! update their own state (connections, affinity, counters).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, bpf_sock_addr},
    helpers::{bpf_csum_diff, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, classifier, map},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SockAddrContext, TcContext},
};
use proxy_common::{
    AffinityKey, AffinityValue, CtValue, Endpoint, EndpointKey, FlowKey, FrontendKey, FrontendValue,
    MaglevTable, NODE_PORT_ADDR_V4, NODE_PORT_ADDR_V6, RevNatValue, SockKey, SourceRangeKey, Stat, crc32c,
    ct, dst_policy, flow_hash, frontend, ipv4_mapped, maps as m, mark, node_addr, protocol,
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
    ipv6: bool,
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the transport header.
    l4: usize,
    protocol: u8,
    /// IPv6 or IPv4-mapped, network byte order.
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// Network byte order, as in the header.
    sport: u16,
    dport: u16,
    /// TCP flags byte (0 for other protocols).
    tcp_flags: u8,
}

impl Packet {
    /// A TCP SYN without ACK: the only TCP packet that opens a connection.
    #[inline(always)]
    fn is_tcp_syn(&self) -> bool {
        self.protocol == protocol::TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
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
struct Rewrite {
    addr_off: usize,
    port_off: usize,
    old_addr: [u8; 16],
    new_addr: [u8; 16],
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
    key: FrontendKey,
    fe: FrontendValue,
    ct: CtValue,
    original: RevNatValue,
    chosen: Chosen,
    akey: AffinityKey,
    aval: AffinityValue,
    rw: Rewrite,
    sock: SockKey,
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
    if !lookup_frontend(&s.pkt.daddr, s.pkt.dport, s.pkt.protocol, &mut s.key, &mut s.fe) {
        if s.pkt.protocol != protocol::TCP || s.pkt.is_tcp_syn() {
            end_superseded_connection(ctx, s);
        }
        return Ok(no_frontend(ctx, s));
    }
    fill_flow(&mut s.flow, &s.pkt);
    // A known connection follows its entry; a TCP SYN re-chooses unless the frontend still
    // uses the set the entry came from (a retransmitted SYN keeps its endpoint).
    if let Some(entry) = CONNTRACK.get_ptr(&s.flow) {
        // SAFETY: copied out at once; the program writes entries whole.
        s.ct = unsafe { *entry };
        let syn = s.pkt.is_tcp_syn();
        let keep = !syn || s.ct.set == s.fe.set || s.ct.set == s.fe.sc_set;
        if keep {
            if syn {
                // A (re)opening keeps its reply entry too, whatever evicted or ended it.
                fill_reply(s);
                if REVNAT.insert(&s.reply, &s.original, 0).is_err() {
                    count(Stat::MapUpdateFailed);
                }
            }
            set_dst_rewrite(&mut s.rw, &s.pkt, &s.ct.addr, s.ct.port);
            rewrite(ctx, &s.pkt, &s.rw)?;
            if s.ct.flags & ct::MASQUERADE != 0 {
                set_mark(ctx, mark::MASQUERADE);
            }
            count(Stat::Established);
            return Ok(TC_ACT_OK as i32);
        }
    }
    if s.pkt.protocol == protocol::TCP && !s.pkt.is_tcp_syn() {
        count(Stat::NoConnection);
        return Ok(TC_ACT_OK as i32);
    }
    Ok(new_connection(ctx, s))
}

/// A packet that may open a flow (TCP SYN, any UDP/SCTP packet) to no frontend. If a translated
/// connection had exactly its addresses and ports after DNAT (client → endpoint) and came in on
/// the same interface, that connection is over: the client now talks to the endpoint directly
/// (netfilter's conntrack sees both as one tuple too). Its entries go, or the reply entry would
/// rewrite this flow's replies to the frontend. Seen on another interface, the packet is the
/// connection's own, already translated (a bridge of pod veths runs the program again).
#[inline(never)]
fn end_superseded_connection(ctx: &TcContext, s: &mut Scratch) {
    s.reply.saddr = s.pkt.daddr;
    s.reply.daddr = s.pkt.saddr;
    s.reply.sport = s.pkt.dport;
    s.reply.dport = s.pkt.sport;
    s.reply.protocol = s.pkt.protocol;
    s.reply._pad = [0; 3];
    let Some(original) = REVNAT.get_ptr(&s.reply) else { return };
    // SAFETY: copied out at once.
    s.original = unsafe { *original };
    s.flow.saddr = s.pkt.saddr;
    s.flow.daddr = s.original.addr;
    s.flow.sport = s.pkt.sport;
    s.flow.dport = s.original.port;
    s.flow.protocol = s.pkt.protocol;
    s.flow._pad = [0; 3];
    // SAFETY: reading a field of the context the kernel passed.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if let Some(entry) = CONNTRACK.get_ptr(&s.flow) {
        // SAFETY: copied out at once.
        let entry = unsafe { *entry };
        if entry.ifindex != ifindex {
            return;
        }
        // Only the connection this reply entry was made for: the client may have opened
        // another one to the frontend from the same port since.
        if addr_eq(&entry.addr, &s.pkt.daddr) && entry.port == s.pkt.dport {
            let _ = CONNTRACK.remove(&s.flow);
        }
    }
    let _ = REVNAT.remove(&s.reply);
    count(Stat::Superseded);
}

/// The reply key of connection `s.flow` translated to `s.ct`, and its frontend in `s.original`.
#[inline(always)]
fn fill_reply(s: &mut Scratch) {
    s.reply.saddr = s.ct.addr;
    s.reply.daddr = s.flow.saddr;
    s.reply.sport = s.ct.port;
    s.reply.dport = s.flow.sport;
    s.reply.protocol = s.flow.protocol;
    s.reply._pad = [0; 3];
    s.original.addr = s.flow.daddr;
    s.original.port = s.flow.dport;
    s.original._pad = 0;
}

#[inline(always)]
fn fill_flow(flow: &mut FlowKey, pkt: &Packet) {
    flow.saddr = pkt.saddr;
    flow.daddr = pkt.daddr;
    flow.sport = pkt.sport;
    flow.dport = pkt.dport;
    flow.protocol = pkt.protocol;
    flow._pad = [0; 3];
}

/// Finds the frontend of a destination into `out`: an address frontend first, then a
/// NodePort on a node address. `key` is working memory.
#[inline(always)]
fn lookup_frontend(
    daddr: &[u8; 16],
    dport: u16,
    proto: u8,
    key: &mut FrontendKey,
    out: &mut FrontendValue,
) -> bool {
    key.addr = *daddr;
    key.port = dport;
    key.protocol = proto;
    key._pad = 0;
    // SAFETY: values are copied out at once; userspace replaces entries whole.
    if let Some(fe) = unsafe { SERVICES.get(&*key) } {
        *out = *fe;
        return true;
    }
    // SAFETY: as above.
    let flags = unsafe { NODE_ADDRS.get(daddr) }.copied().unwrap_or(0);
    if flags & node_addr::NODE_PORT == 0 {
        return false;
    }
    key.addr = if is_mapped(daddr) { NODE_PORT_ADDR_V4 } else { NODE_PORT_ADDR_V6 };
    // SAFETY: as above.
    match unsafe { SERVICES.get(&*key) } {
        Some(fe) => {
            *out = *fe;
            true
        }
        None => false,
    }
}

/// A TCP/UDP/SCTP packet to no frontend: an undefined port of a ClusterIP is rejected, an
/// unallocated address of a service CIDR dropped, anything else left alone.
#[inline(always)]
fn no_frontend(ctx: &TcContext, s: &Scratch) -> i32 {
    match DST_POLICY.get(&Key::new(128, s.pkt.daddr)).copied() {
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
    let is_pod = POD_CIDRS.get(&Key::new(128, s.pkt.saddr)).is_some();
    // SAFETY: copied out at once.
    let is_node = unsafe { NODE_ADDRS.get(&s.pkt.saddr) }.copied().unwrap_or(0) & node_addr::NODE != 0;
    if s.fe.flags & frontend::SOURCE_RANGES != 0 {
        let key = SourceRangeKey { service_id: s.fe.service_id.to_be(), addr: s.pkt.saddr };
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
    let masquerade = s.chosen.masquerade || addr_eq(&s.chosen.endpoint.addr, &s.pkt.saddr);
    s.ct.addr = s.chosen.endpoint.addr;
    s.ct.port = s.chosen.endpoint.port;
    s.ct.flags = if masquerade { ct::MASQUERADE } else { 0 };
    s.ct._pad = 0;
    s.ct.set = s.chosen.set;
    s.ct.index = s.chosen.index;
    // SAFETY: reading a field of the context the kernel passed.
    s.ct.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    fill_reply(s);
    if CONNTRACK.insert(&s.flow, &s.ct, 0).is_err() || REVNAT.insert(&s.reply, &s.original, 0).is_err() {
        count(Stat::MapUpdateFailed);
    }
    set_dst_rewrite(&mut s.rw, &s.pkt, &s.ct.addr, s.ct.port);
    if rewrite(ctx, &s.pkt, &s.rw).is_err() {
        count(Stat::ParseError);
        return TC_ACT_OK as i32;
    }
    if masquerade {
        set_mark(ctx, mark::MASQUERADE);
    }
    count(Stat::ServiceHit);
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
        s.akey.client = s.flow.saddr;
        // SAFETY: a plain helper call.
        now = unsafe { bpf_ktime_get_ns() };
        if let Some(a) = AFFINITY.get_ptr(&s.akey) {
            // SAFETY: copied out at once.
            s.aval = unsafe { *a };
            let fresh = now.wrapping_sub(s.aval.last_seen_ns) <= timeout_ns;
            let key = EndpointKey { set, index: s.aval.index };
            // SAFETY: as above.
            if fresh && let Some(ep) = unsafe { ENDPOINTS.get(&key) } {
                if addr_eq(&ep.addr, &s.aval.addr) && ep.port == s.aval.port {
                    s.chosen.endpoint = *ep;
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
    s.chosen.endpoint = *ep;
    s.chosen.index = index;
    if affinity {
        s.aval.last_seen_ns = now;
        s.aval.addr = ep.addr;
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
    fill_flow(&mut s.flow, &s.pkt);
    let Some(original) = REVNAT.get_ptr(&s.flow) else {
        return Ok(TC_ACT_OK as i32);
    };
    // SAFETY: copied out at once.
    s.original = unsafe { *original };
    let addr_off = if s.pkt.ipv6 { s.pkt.l3 + 8 } else { s.pkt.l3 + 12 };
    s.rw.addr_off = addr_off;
    s.rw.port_off = s.pkt.l4;
    s.rw.old_addr = s.pkt.saddr;
    s.rw.new_addr = s.original.addr;
    s.rw.old_port = s.pkt.sport;
    s.rw.new_port = s.original.port;
    rewrite(ctx, &s.pkt, &s.rw)?;
    count(Stat::ReverseNat);
    Ok(TC_ACT_OK as i32)
}

/// Parses Ethernet, IPv4/IPv6 and the ports into `pkt`: [`PARSED`], [`NOT_APPLICABLE`] (not
/// TCP/UDP/SCTP over IP, or a non-first fragment) or [`PARSE_ERROR`].
#[inline(never)]
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
    match ether_type {
        ETH_P_IPV4 => {
            // One copy of the fixed header instead of a helper call per field.
            let h: [u8; IPV4_MIN_HDR_LEN] = load(ctx, l3)?;
            if h[0] >> 4 != 4 {
                return Err(ParseError);
            }
            let header_len = usize::from(h[0] & 0x0f) * 4;
            if header_len < IPV4_MIN_HDR_LEN {
                return Err(ParseError);
            }
            // Flags and fragment offset: a non-first fragment has no transport header.
            if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                return Ok(false);
            }
            pkt.ipv6 = false;
            pkt.protocol = h[9];
            pkt.saddr = ipv4_mapped([h[12], h[13], h[14], h[15]]);
            pkt.daddr = ipv4_mapped([h[16], h[17], h[18], h[19]]);
            pkt.l4 = l3 + header_len;
        }
        ETH_P_IPV6 => {
            let h: [u8; IPV6_HDR_LEN] = load(ctx, l3)?;
            if h[0] >> 4 != 6 {
                return Err(ParseError);
            }
            pkt.ipv6 = true;
            let mut saddr = [0u8; 16];
            saddr.copy_from_slice(&h[8..24]);
            let mut daddr = [0u8; 16];
            daddr.copy_from_slice(&h[24..40]);
            pkt.saddr = saddr;
            pkt.daddr = daddr;
            let mut next_header: u8 = h[6];
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
            pkt.protocol = next_header;
            pkt.l4 = l4;
        }
        _ => return Ok(false),
    }
    if !matches!(pkt.protocol, protocol::TCP | protocol::UDP | protocol::SCTP) {
        return Ok(false);
    }
    // TCP, UDP and SCTP all start with the source and destination ports (kept in network
    // order: the raw bytes read as a native u16); TCP's flags are byte 13.
    if pkt.protocol == protocol::TCP {
        let t: [u8; 14] = load(ctx, pkt.l4)?;
        pkt.sport = u16::from_ne_bytes([t[0], t[1]]);
        pkt.dport = u16::from_ne_bytes([t[2], t[3]]);
        pkt.tcp_flags = t[13];
    } else {
        let t: [u8; 4] = load(ctx, pkt.l4)?;
        pkt.sport = u16::from_ne_bytes([t[0], t[1]]);
        pkt.dport = u16::from_ne_bytes([t[2], t[3]]);
        pkt.tcp_flags = 0;
    }
    Ok(true)
}

/// The common case read with direct packet access (no helper calls): IPv4 without options or
/// IPv6 without extension headers, TCP/UDP/SCTP, the first 14 bytes of the transport header in
/// the linear part of the skb. `None`: not that case, [`parse_into`]'s helper path decides.
#[inline(always)]
fn parse_direct(ctx: &TcContext, pkt: &mut Packet) -> Option<Result<bool, ParseError>> {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HDR_LEN > end {
        return None;
    }
    // SAFETY: inside [data, data_end), checked above (and by the verifier).
    let ether_type = u16::from_be_bytes(unsafe { *((data + 12) as *const [u8; 2]) });
    let l4 = match ether_type {
        ETH_P_IPV4 => {
            if data + ETH_HDR_LEN + IPV4_MIN_HDR_LEN + 14 > end {
                return None;
            }
            // SAFETY: as above.
            let h = unsafe { *((data + ETH_HDR_LEN) as *const [u8; IPV4_MIN_HDR_LEN]) };
            if h[0] != 0x45 || u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                return None;
            }
            pkt.ipv6 = false;
            pkt.protocol = h[9];
            pkt.saddr = ipv4_mapped([h[12], h[13], h[14], h[15]]);
            pkt.daddr = ipv4_mapped([h[16], h[17], h[18], h[19]]);
            ETH_HDR_LEN + IPV4_MIN_HDR_LEN
        }
        ETH_P_IPV6 => {
            if data + ETH_HDR_LEN + IPV6_HDR_LEN + 14 > end {
                return None;
            }
            // SAFETY: as above.
            let h = unsafe { &*((data + ETH_HDR_LEN) as *const [u8; IPV6_HDR_LEN]) };
            if h[0] >> 4 != 6 || !matches!(h[6], protocol::TCP | protocol::UDP | protocol::SCTP) {
                return None;
            }
            pkt.ipv6 = true;
            pkt.protocol = h[6];
            pkt.saddr.copy_from_slice(&h[8..24]);
            pkt.daddr.copy_from_slice(&h[24..40]);
            ETH_HDR_LEN + IPV6_HDR_LEN
        }
        ETH_P_ARP => return Some(Ok(false)),
        _ => return None,
    };
    if !matches!(pkt.protocol, protocol::TCP | protocol::UDP | protocol::SCTP) {
        return Some(Ok(false));
    }
    // SAFETY: `l4 + 14` is within the bound checked above.
    let t = unsafe { *((data + l4) as *const [u8; 14]) };
    pkt.l3 = ETH_HDR_LEN;
    pkt.l4 = l4;
    pkt.sport = u16::from_ne_bytes([t[0], t[1]]);
    pkt.dport = u16::from_ne_bytes([t[2], t[3]]);
    pkt.tcp_flags = if pkt.protocol == protocol::TCP { t[13] } else { 0 };
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

/// Prepares the destination rewrite (DNAT) of `pkt` to `addr`, `port`.
#[inline(always)]
fn set_dst_rewrite(rw: &mut Rewrite, pkt: &Packet, addr: &[u8; 16], port: u16) {
    rw.addr_off = if pkt.ipv6 { pkt.l3 + 24 } else { pkt.l3 + 16 };
    rw.port_off = pkt.l4 + 2;
    rw.old_addr = pkt.daddr;
    rw.new_addr = *addr;
    rw.old_port = pkt.dport;
    rw.new_port = port;
}

/// Rewrites one address and port, fixing the IPv4 header checksum and the transport checksum
/// (pseudo-header and port). A separate BPF function so that its stack is not its callers'.
#[inline(never)]
fn rewrite(ctx: &TcContext, pkt: &Packet, change: &Rewrite) -> Result<(), ParseError> {
    let csum = l4_checksum(pkt.protocol);
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
        if pkt.protocol == protocol::SCTP {
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
#[inline(always)]
fn sock_user_addr(sa: &bpf_sock_addr, ipv6: bool, out: &mut [u8; 16]) {
    if ipv6 {
        let w = sa.user_ip6;
        out[0..4].copy_from_slice(&w[0].to_ne_bytes());
        out[4..8].copy_from_slice(&w[1].to_ne_bytes());
        out[8..12].copy_from_slice(&w[2].to_ne_bytes());
        out[12..16].copy_from_slice(&w[3].to_ne_bytes());
    } else {
        *out = ipv4_mapped(sa.user_ip4.to_ne_bytes());
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
    sock_user_addr(sa, ipv6, &mut s.flow.daddr);
    let dport = sa.user_port as u16;
    let daddr = s.flow.daddr;
    if !lookup_frontend(&daddr, dport, proto, &mut s.key, &mut s.fe) {
        return 1;
    }
    // SAFETY: a plain helper call on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    s.flow.saddr = [0; 16];
    s.flow.sport = (cookie as u16).to_be();
    s.flow.dport = dport;
    s.flow.protocol = proto;
    s.flow._pad = [0; 3];
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
    s.sock.addr = s.chosen.endpoint.addr;
    s.sock.port = s.chosen.endpoint.port;
    s.sock._pad = [0; 6];
    s.original.addr = daddr;
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
    sock_user_addr(sa, ipv6, &mut s.sock.addr);
    s.sock.port = sa.user_port as u16;
    s.sock._pad = [0; 6];
    if let Some(original) = SOCK_REVNAT.get_ptr(&s.sock) {
        // SAFETY: copied out at once.
        s.original = unsafe { *original };
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
