//! ferry's eBPF data path.
//!
//! Today one program, [`ferry_tc_ingress`]: a TC classifier for the ingress of node interfaces
//! that parses Ethernet, IPv4/IPv6 and the TCP/UDP/SCTP ports, looks the destination up in the
//! service frontend map and counts the result. It is the seed of the service translation path:
//! the lookup result is where backend selection and DNAT will go. It never changes a packet and
//! always returns `TC_ACT_OK`.
//!
//! Map layouts, names and counter indices live in `proxy-common`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use proxy_common::{FrontendKey, FrontendValue, Stat, maps::SERVICES_MAX_ENTRIES, protocol};

/// Service frontends: see `proxy_common::maps::SERVICES`.
#[map]
static SERVICES: HashMap<FrontendKey, FrontendValue> = HashMap::with_max_entries(SERVICES_MAX_ENTRIES, 0);

/// Per-CPU packet counters indexed by `proxy_common::Stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const IPV4_MIN_HDR_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;

/// IPv6 extension headers walked to reach the transport header.
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// At most this many extension headers are skipped (a bound for the verifier).
const MAX_IPV6_EXT_HDRS: usize = 4;

/// Why a packet could not be parsed. The code goes to the debug log; the packet is counted as
/// [`Stat::ParseError`].
#[derive(Clone, Copy)]
#[repr(u8)]
enum ParseError {
    /// The packet ended before a header it announces.
    Truncated = 1,
    /// An IPv4 header length below 20 bytes.
    BadIpv4HeaderLength = 2,
    /// An IP version field that does not match the EtherType.
    BadIpVersion = 3,
    /// More IPv6 extension headers than we walk.
    TooManyIpv6ExtHeaders = 4,
}

/// What the service path does with a packet.
enum Verdict {
    /// The destination is a service frontend.
    Service(FrontendValue),
    /// A TCP/UDP/SCTP packet to no frontend.
    NoService,
    /// Not something the service path handles.
    NotApplicable,
}

/// The destination of a packet as the service path sees it.
struct Destination {
    /// IPv6 or IPv4-mapped address, network byte order.
    addr: [u8; 16],
    /// IANA protocol number of the transport header.
    protocol: u8,
    /// Offset of the transport header from the start of the packet.
    l4_offset: usize,
}

#[classifier]
pub fn ferry_tc_ingress(ctx: TcContext) -> i32 {
    let stat = match try_tc_ingress(&ctx) {
        Ok(Verdict::Service(_frontend)) => Stat::ServiceHit,
        Ok(Verdict::NoService) => Stat::ServiceMiss,
        Ok(Verdict::NotApplicable) => Stat::NotApplicable,
        Err(err) => {
            debug!(&ctx, "ferry_tc_ingress: parse error {}", err as u8);
            Stat::ParseError
        }
    };
    count(stat);
    TC_ACT_OK as i32
}

#[inline(always)]
fn try_tc_ingress(ctx: &TcContext) -> Result<Verdict, ParseError> {
    let Some(dst) = destination(ctx)? else {
        return Ok(Verdict::NotApplicable);
    };
    if !matches!(dst.protocol, protocol::TCP | protocol::UDP | protocol::SCTP) {
        return Ok(Verdict::NotApplicable);
    }
    // TCP, UDP and SCTP all carry the destination port at offset 2 of their header.
    let port_be: u16 = load(ctx, dst.l4_offset + 2)?;
    let key = FrontendKey::from_raw(dst.addr, port_be, dst.protocol);
    // SAFETY: the value is copied out at once; userspace only replaces entries whole.
    match unsafe { SERVICES.get(&key) } {
        Some(frontend) => Ok(Verdict::Service(*frontend)),
        None => Ok(Verdict::NoService),
    }
}

/// Parses the Ethernet and IP headers; `None` for packets that are not IPv4/IPv6 or that carry
/// no transport header (non-first fragments).
#[inline(always)]
fn destination(ctx: &TcContext) -> Result<Option<Destination>, ParseError> {
    let ether_type = u16::from_be(load::<u16>(ctx, 12)?);
    match ether_type {
        ETH_P_IPV4 => ipv4_destination(ctx, ETH_HDR_LEN),
        ETH_P_IPV6 => ipv6_destination(ctx, ETH_HDR_LEN),
        _ => Ok(None),
    }
}

#[inline(always)]
fn ipv4_destination(ctx: &TcContext, offset: usize) -> Result<Option<Destination>, ParseError> {
    let version_ihl: u8 = load(ctx, offset)?;
    if version_ihl >> 4 != 4 {
        return Err(ParseError::BadIpVersion);
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if header_len < IPV4_MIN_HDR_LEN {
        return Err(ParseError::BadIpv4HeaderLength);
    }
    // Flags and fragment offset: a non-first fragment has no transport header.
    let frag = u16::from_be(load::<u16>(ctx, offset + 6)?);
    if frag & 0x1fff != 0 {
        return Ok(None);
    }
    let protocol: u8 = load(ctx, offset + 9)?;
    let [a, b, c, d]: [u8; 4] = load(ctx, offset + 16)?;
    Ok(Some(Destination {
        addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        protocol,
        l4_offset: offset + header_len,
    }))
}

#[inline(always)]
fn ipv6_destination(ctx: &TcContext, offset: usize) -> Result<Option<Destination>, ParseError> {
    let version: u8 = load(ctx, offset)?;
    if version >> 4 != 6 {
        return Err(ParseError::BadIpVersion);
    }
    let addr: [u8; 16] = load(ctx, offset + 24)?;
    let mut next_header: u8 = load(ctx, offset + 6)?;
    let mut l4_offset = offset + IPV6_HDR_LEN;
    for _ in 0..MAX_IPV6_EXT_HDRS {
        match next_header {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                // Next header, then the length in 8-octet units not counting the first 8.
                let [next, len]: [u8; 2] = load(ctx, l4_offset)?;
                next_header = next;
                l4_offset += (usize::from(len) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let [next, _reserved]: [u8; 2] = load(ctx, l4_offset)?;
                let frag = u16::from_be(load::<u16>(ctx, l4_offset + 2)?);
                if frag & 0xfff8 != 0 {
                    return Ok(None);
                }
                next_header = next;
                l4_offset += 8;
            }
            protocol => {
                return Ok(Some(Destination { addr, protocol, l4_offset }));
            }
        }
    }
    Err(ParseError::TooManyIpv6ExtHeaders)
}

/// Copies a `T` out of the packet at `offset` (bpf_skb_load_bytes: works on non-linear skbs
/// and does the bounds check).
#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, ParseError> {
    ctx.load(offset).map_err(|_| ParseError::Truncated)
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
