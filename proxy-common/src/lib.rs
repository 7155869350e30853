//! Types shared by ferry's eBPF programs (`proxy-ebpf`) and userspace (`proxy`).
//!
//! Everything a BPF map holds is defined here once: map names, sizes, keys and values. The rules
//! every type follows, so both sides agree on the bytes:
//! - `#[repr(C)]` with explicit padding fields (no implicit padding, no `bool` or `Option`), so
//!   the kernel's hash of a key never covers uninitialised bytes; padding must be zero.
//! - The byte order of every multi-byte field is stated on the field. Packet-derived fields stay
//!   in network byte order (the program compares them with packet bytes as they are); fields only
//!   userspace assigns are in host byte order. Conversion happens in the constructors here.
//! - With the `user` feature the types implement [`aya::Pod`] so userspace can put them in maps.
#![no_std]

/// Names of the programs in the eBPF object, as userspace looks them up.
pub mod programs {
    /// TC classifier on the ingress of node interfaces: the service translation path. Today it
    /// matches the packet's destination against [`crate::maps::SERVICES`] and counts.
    pub const TC_INGRESS: &str = "ferry_tc_ingress";
}

/// Names and sizes of the maps in the eBPF object.
pub mod maps {
    /// `HashMap<FrontendKey, FrontendValue>`: every service frontend (ClusterIP, NodePort, …
    /// address, port and protocol) this node serves.
    pub const SERVICES: &str = "SERVICES";
    /// Capacity of [`SERVICES`].
    pub const SERVICES_MAX_ENTRIES: u32 = 65_536;
    /// `PerCpuArray<u64>` of packet counters, indexed by [`crate::Stat`]; userspace sums the
    /// per-CPU values.
    pub const STATS: &str = "STATS";
}

/// IANA protocol numbers of the transport protocols a service port can use.
pub mod protocol {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// Key of [`maps::SERVICES`]: the destination of a packet that a service frontend matches.
///
/// Layout (20 bytes, alignment 2, no implicit padding):
///
/// | offset | field      | byte order                                                        |
/// |--------|------------|-------------------------------------------------------------------|
/// | 0      | `addr`     | network; IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`)              |
/// | 16     | `port`     | network (big endian), exactly as in the TCP/UDP/SCTP header       |
/// | 18     | `protocol` | single byte, an IANA protocol number from [`protocol`]            |
/// | 19     | `_pad`     | always 0                                                          |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
        let [a, b, c, d] = addr;
        Self::from_raw([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d], port.to_be(), protocol)
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

/// Value of [`maps::SERVICES`]: what the data path knows about a frontend.
///
/// Layout (4 bytes, alignment 4): `service_id` in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendValue {
    /// Identifier of the service port this frontend belongs to, assigned by userspace; host
    /// byte order. The backend and reverse-NAT maps of the translation path will be keyed by it.
    pub service_id: u32,
}

/// Indices of the counters in [`maps::STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stat {
    /// A TCP/UDP/SCTP packet whose (destination address, port, protocol) is a service frontend.
    ServiceHit = 0,
    /// A TCP/UDP/SCTP packet to no service frontend.
    ServiceMiss = 1,
    /// A packet the program could not parse (truncated or malformed headers).
    ParseError = 2,
    /// A packet the service path does not handle: not IPv4/IPv6 (ARP, …), another transport
    /// (ICMP, …) or a non-first IP fragment.
    NotApplicable = 3,
}

impl Stat {
    /// Number of counters, the `max_entries` of [`maps::STATS`].
    pub const COUNT: u32 = 4;
    /// Every counter, in index order.
    pub const ALL: [Self; Self::COUNT as usize] =
        [Self::ServiceHit, Self::ServiceMiss, Self::ParseError, Self::NotApplicable];

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
        }
    }
}

// Layout checks: a change here is a change of the kernel ABI between program and userspace.
const _: () = {
    assert!(core::mem::size_of::<FrontendKey>() == 20);
    assert!(core::mem::align_of::<FrontendKey>() == 2);
    assert!(core::mem::offset_of!(FrontendKey, port) == 16);
    assert!(core::mem::offset_of!(FrontendKey, protocol) == 18);
    assert!(core::mem::size_of::<FrontendValue>() == 4);
};

#[cfg(feature = "user")]
#[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait: it asserts the types are plain bytes")]
mod pod {
    // SAFETY: `#[repr(C)]`, only integer fields and explicit padding: every bit pattern is valid
    // and there are no implicit padding bytes (checked by the layout assertions above).
    unsafe impl aya::Pod for super::FrontendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FrontendValue {}
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
    fn stats_indices_are_dense_and_in_order() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(stat.index() as usize, i, "{}", stat.name());
        }
    }
}
