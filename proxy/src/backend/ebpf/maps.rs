//! The maps userspace writes, behind a trait: the kernel's (aya, [`super::kernel`]) and an
//! in-memory fake with a deterministic dump (`ferry render`, unit tests).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proxy_common::{Endpoint, EndpointKey, FrontendKey, FrontendValue, MaglevTable, ServiceCidrs, frontend};

/// A prefix of the 16-byte (IPv4-mapped) address space, as the LPM tries store it:
/// (prefix length in bits, address).
pub type Cidr = (u32, [u8; 16]);

/// A loadBalancerSourceRanges entry: (service id, prefix).
pub type SourceRange = (u32, Cidr);

#[derive(Debug, thiserror::Error)]
#[error("map {map}: {op}: {message}")]
pub struct MapError {
    pub map: &'static str,
    pub op: &'static str,
    pub message: String,
}

/// One BPF map: whole-entry writes, deletes and a listing.
pub trait MapTable<K, V>: Send {
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError>;
    /// Deleting a missing key is not an error.
    fn del(&mut self, key: &K) -> Result<(), MapError>;
    fn keys(&self) -> Result<Vec<K>, MapError>;
    fn list(&self) -> Result<Vec<(K, V)>, MapError>;
}

/// An array of 64-bit words: [`proxy_common::maps::FRONTEND_FILTER`].
pub trait WordArray: Send {
    fn get(&self, index: u32) -> Result<u64, MapError>;
    fn set(&mut self, index: u32, word: u64) -> Result<(), MapError>;
    /// The non-zero words by index (reads every word).
    fn nonzero(&self) -> Result<Vec<(u32, u64)>, MapError>;
}

/// An array map of one entry: [`proxy_common::maps::SERVICE_CIDRS`].
pub trait OneValue<T>: Send {
    fn get(&self) -> Result<T, MapError>;
    fn set(&mut self, value: &T) -> Result<(), MapError>;
}

/// The maps ferry writes. The connection-table maps (CONNTRACK, REVNAT, AFFINITY, SOCK_REVNAT)
/// belong to the programs; userspace only counts them ([`DataPathMaps::occupancy`]).
pub trait DataPathMaps: Send {
    fn services(&mut self) -> &mut dyn MapTable<FrontendKey, FrontendValue>;
    fn endpoints(&mut self) -> &mut dyn MapTable<EndpointKey, Endpoint>;
    fn maglev(&mut self) -> &mut dyn MapTable<u32, Box<MaglevTable>>;
    fn node_addrs(&mut self) -> &mut dyn MapTable<[u8; 16], u32>;
    fn pod_cidrs(&mut self) -> &mut dyn MapTable<Cidr, u32>;
    fn dst_policy(&mut self) -> &mut dyn MapTable<Cidr, u32>;
    fn source_ranges(&mut self) -> &mut dyn MapTable<SourceRange, u32>;
    fn frontend_filter(&mut self) -> &mut dyn WordArray;
    fn service_cidrs(&mut self) -> &mut dyn OneValue<ServiceCidrs>;
    /// The destination addresses of the connections in `CONNTRACK` (as their clients sent
    /// them): what the frontend filter must keep when it is rebuilt.
    fn connection_destinations(&self) -> Result<Vec<[u8; 16]>, MapError>;
    /// (map name, entries, capacity) of every map, for pressure reports.
    fn occupancy(&mut self) -> Vec<(&'static str, usize, u32)>;
    /// The summed per-CPU counters, indexed by `proxy_common::Stat` (empty for the fake).
    fn stats(&self) -> Vec<u64>;
}

/// An in-memory map.
#[derive(Debug, Clone)]
pub struct FakeTable<K, V>(pub BTreeMap<K, V>);

impl<K, V> Default for FakeTable<K, V> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<K: Ord + Clone + Send, V: Clone + Send> MapTable<K, V> for FakeTable<K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.0.insert(key.clone(), value.clone());
        Ok(())
    }

    fn del(&mut self, key: &K) -> Result<(), MapError> {
        self.0.remove(key);
        Ok(())
    }

    fn keys(&self) -> Result<Vec<K>, MapError> {
        Ok(self.0.keys().cloned().collect())
    }

    fn list(&self) -> Result<Vec<(K, V)>, MapError> {
        Ok(self.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

impl WordArray for FakeTable<u32, u64> {
    fn get(&self, index: u32) -> Result<u64, MapError> {
        Ok(self.0.get(&index).copied().unwrap_or(0))
    }

    fn set(&mut self, index: u32, word: u64) -> Result<(), MapError> {
        if word == 0 {
            self.0.remove(&index);
        } else {
            self.0.insert(index, word);
        }
        Ok(())
    }

    fn nonzero(&self) -> Result<Vec<(u32, u64)>, MapError> {
        Ok(self.0.iter().map(|(i, w)| (*i, *w)).collect())
    }
}

/// An in-memory one-entry array.
#[derive(Debug, Clone, Default)]
pub struct FakeValue<T>(pub T);

impl<T: Clone + Send> OneValue<T> for FakeValue<T> {
    fn get(&self) -> Result<T, MapError> {
        Ok(self.0.clone())
    }

    fn set(&mut self, value: &T) -> Result<(), MapError> {
        self.0 = value.clone();
        Ok(())
    }
}

/// The fake data path: maps in memory.
#[derive(Default)]
pub struct FakeMaps {
    pub services: FakeTable<FrontendKey, FrontendValue>,
    pub endpoints: FakeTable<EndpointKey, Endpoint>,
    pub maglev: FakeTable<u32, Box<MaglevTable>>,
    pub node_addrs: FakeTable<[u8; 16], u32>,
    pub pod_cidrs: FakeTable<Cidr, u32>,
    pub dst_policy: FakeTable<Cidr, u32>,
    pub source_ranges: FakeTable<SourceRange, u32>,
    pub frontend_filter: FakeTable<u32, u64>,
    pub service_cidrs: FakeValue<ServiceCidrs>,
    /// Destinations of the connections the programs would have recorded.
    pub connections: Vec<[u8; 16]>,
}

impl DataPathMaps for FakeMaps {
    fn services(&mut self) -> &mut dyn MapTable<FrontendKey, FrontendValue> {
        &mut self.services
    }
    fn endpoints(&mut self) -> &mut dyn MapTable<EndpointKey, Endpoint> {
        &mut self.endpoints
    }
    fn maglev(&mut self) -> &mut dyn MapTable<u32, Box<MaglevTable>> {
        &mut self.maglev
    }
    fn node_addrs(&mut self) -> &mut dyn MapTable<[u8; 16], u32> {
        &mut self.node_addrs
    }
    fn pod_cidrs(&mut self) -> &mut dyn MapTable<Cidr, u32> {
        &mut self.pod_cidrs
    }
    fn dst_policy(&mut self) -> &mut dyn MapTable<Cidr, u32> {
        &mut self.dst_policy
    }
    fn source_ranges(&mut self) -> &mut dyn MapTable<SourceRange, u32> {
        &mut self.source_ranges
    }
    fn frontend_filter(&mut self) -> &mut dyn WordArray {
        &mut self.frontend_filter
    }
    fn service_cidrs(&mut self) -> &mut dyn OneValue<ServiceCidrs> {
        &mut self.service_cidrs
    }
    fn connection_destinations(&self) -> Result<Vec<[u8; 16]>, MapError> {
        Ok(self.connections.clone())
    }
    fn occupancy(&mut self) -> Vec<(&'static str, usize, u32)> {
        use proxy_common::maps as m;
        vec![
            (m::SERVICES, self.services.0.len(), m::SERVICES_MAX_ENTRIES),
            (m::ENDPOINTS, self.endpoints.0.len(), m::ENDPOINTS_MAX_ENTRIES),
            (m::MAGLEV, self.maglev.0.len(), m::MAGLEV_MAX_ENTRIES),
        ]
    }
    fn stats(&self) -> Vec<u64> {
        Vec::new()
    }
}

/// The address of a 16-byte (possibly IPv4-mapped) map address.
pub fn ip_of(addr: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The 16-byte map form of an address.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The LPM form of a prefix: IPv4 prefixes grow by the 96 bits of the mapping.
pub fn cidr(net: &ipnet::IpNet) -> Cidr {
    match net {
        ipnet::IpNet::V4(n) => (96 + u32::from(n.prefix_len()), addr16(IpAddr::V4(n.network()))),
        ipnet::IpNet::V6(n) => (u32::from(n.prefix_len()), addr16(IpAddr::V6(n.network()))),
    }
}

fn cidr_text(c: &Cidr) -> String {
    match ip_of(&c.1) {
        ip @ IpAddr::V4(_) => format!("{ip}/{}", c.0.saturating_sub(96)),
        ip => format!("{ip}/{}", c.0),
    }
}

fn socket_text(addr: &[u8; 16], port_be: u16) -> String {
    SocketAddr::new(ip_of(addr), u16::from_be(port_be)).to_string()
}

fn frontend_text(k: &FrontendKey) -> String {
    let proto = match k.protocol {
        6 => "tcp",
        17 => "udp",
        132 => "sctp",
        _ => "?",
    };
    let addr = if k.addr == proxy_common::NODE_PORT_ADDR_V4 {
        format!("<node-ipv4>:{}", k.port())
    } else if k.addr == proxy_common::NODE_PORT_ADDR_V6 {
        format!("[<node-ipv6>]:{}", k.port())
    } else {
        socket_text(&k.addr, k.port)
    };
    format!("{addr}/{proto}")
}

fn flags_text(flags: u32) -> String {
    let names = [
        (frontend::EMPTY_DROP, "empty-drop"),
        (frontend::MASQ_ALWAYS, "masq"),
        (frontend::MASQ_NOT_POD, "masq-not-pod"),
        (frontend::SHORT_CIRCUIT_PODS, "sc-pods"),
        (frontend::SHORT_CIRCUIT_NODE, "sc-node"),
        (frontend::SOURCE_RANGES, "source-ranges"),
        (frontend::MAGLEV, "maglev"),
        (frontend::NODE_PORT, "nodeport"),
    ];
    let set: Vec<&str> = names.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| *n).collect();
    if set.is_empty() { "-".to_owned() } else { set.join(",") }
}

/// A deterministic, human-readable dump of the maps userspace writes (sorted by key).
pub fn dump(maps: &mut dyn DataPathMaps) -> Result<String, MapError> {
    let mut out = String::new();
    let mut services = maps.services().list()?;
    services.sort_by_key(|(k, _)| frontend_text(k));
    let _ = writeln!(out, "# {} ({} entries)", proxy_common::maps::SERVICES, services.len());
    for (k, v) in &services {
        let _ = write!(
            out,
            "{} service={} set={}x{} flags={}",
            frontend_text(k),
            v.service_id,
            v.set,
            v.count,
            flags_text(v.flags)
        );
        if v.sc_count > 0 {
            let _ = write!(out, " sc-set={}x{}", v.sc_set, v.sc_count);
        }
        if v.affinity_timeout > 0 {
            let _ = write!(out, " affinity={}s", v.affinity_timeout);
        }
        out.push('\n');
    }
    let endpoints = maps.endpoints().list()?;
    let _ = writeln!(out, "# {} ({} entries)", proxy_common::maps::ENDPOINTS, endpoints.len());
    for (k, v) in &endpoints {
        let _ = writeln!(out, "set={} index={} {}", k.set, k.index, socket_text(&v.addr, v.port));
    }
    let maglev = maps.maglev().keys()?;
    let _ = writeln!(out, "# {} ({} tables)", proxy_common::maps::MAGLEV, maglev.len());
    for set in &maglev {
        let _ = writeln!(out, "set={set}");
    }
    let mut node = maps.node_addrs().list()?;
    node.sort();
    let _ = writeln!(out, "# {}", proxy_common::maps::NODE_ADDRS);
    for (k, v) in &node {
        let _ = writeln!(out, "{} flags={v:#x}", ip_of(k));
    }
    let _ = writeln!(out, "# {}", proxy_common::maps::POD_CIDRS);
    for (k, _) in maps.pod_cidrs().list()? {
        let _ = writeln!(out, "{}", cidr_text(&k));
    }
    let _ = writeln!(out, "# {}", proxy_common::maps::DST_POLICY);
    for (k, v) in maps.dst_policy().list()? {
        let verdict = if v == proxy_common::dst_policy::REJECT { "reject" } else { "drop" };
        let _ = writeln!(out, "{} {verdict}", cidr_text(&k));
    }
    let _ = writeln!(out, "# {}", proxy_common::maps::SOURCE_RANGES);
    for ((service, k), _) in maps.source_ranges().list()? {
        let _ = writeln!(out, "service={service} {}", cidr_text(&k));
    }
    let words = maps.frontend_filter().nonzero()?;
    let enabled = words.iter().any(|(i, _)| *i == proxy_common::frontend_filter::ENABLED_WORD);
    let bits: u32 = words
        .iter()
        .filter(|(i, _)| *i != proxy_common::frontend_filter::ENABLED_WORD)
        .map(|(_, w)| w.count_ones())
        .sum();
    let _ = writeln!(
        out,
        "# {} ({}, {bits} of {} bits set)",
        proxy_common::maps::FRONTEND_FILTER,
        if enabled { "in use" } else { "not in use" },
        1u32 << proxy_common::frontend_filter::BITS_LOG2
    );
    let cidrs = maps.service_cidrs().get()?;
    let _ = writeln!(out, "# {}", proxy_common::maps::SERVICE_CIDRS);
    for [n0, n1, m0, m1] in cidrs.cidrs.iter().take(cidrs.count as usize) {
        let bytes = |a: u64, b: u64| {
            let mut out = [0u8; 16];
            out[..8].copy_from_slice(&a.to_ne_bytes());
            out[8..].copy_from_slice(&b.to_ne_bytes());
            out
        };
        let len = u128::from_be_bytes(bytes(*m0, *m1)).leading_ones();
        let _ = writeln!(out, "{}", cidr_text(&(len, bytes(*n0, *n1))));
    }
    Ok(out)
}

/// An unspecified address of the family of `addr` (for NodePort keys).
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}
