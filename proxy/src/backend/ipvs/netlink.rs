//! IPVS messages of the kernel's generic netlink family "IPVS" (include/uapi/linux/ip_vs.h):
//! commands with a service nested in `IPVS_CMD_ATTR_SERVICE` and a real server nested in
//! `IPVS_CMD_ATTR_DEST`, and the connection timeouts of `IPVS_CMD_SET_CONFIG` /
//! `IPVS_CMD_GET_CONFIG` as first-level u32 attributes.
//!
//! netlink-packet-generic supplies the generic header and the family resolution; no maintained
//! crate models the IPVS attributes, so they are encoded here, at this one boundary: ports in
//! network byte order, everything else (family, protocol, fwmark, weight, timeout) in host
//! order, as the kernel's `nla_put_be16` / `nla_put_u32` calls have it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLA_F_NESTED, Nla, NlaBuffer, NlasIterator, ParseableParametrized,
};
use netlink_packet_generic::GenlHeader;
use netlink_packet_generic::traits::GenlFamily;

use crate::model::{IpFamily, Protocol};

pub const FAMILY_NAME: &str = "IPVS";
pub const FAMILY_VERSION: u8 = 1;

// Commands.
pub const CMD_NEW_SERVICE: u8 = 1;
pub const CMD_SET_SERVICE: u8 = 2;
pub const CMD_DEL_SERVICE: u8 = 3;
pub const CMD_GET_SERVICE: u8 = 4;
pub const CMD_NEW_DEST: u8 = 5;
pub const CMD_SET_DEST: u8 = 6;
pub const CMD_DEL_DEST: u8 = 7;
pub const CMD_GET_DEST: u8 = 8;
pub const CMD_SET_CONFIG: u8 = 12;
pub const CMD_GET_CONFIG: u8 = 13;

// First-level attributes.
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;

// Service attributes.
const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;

// Destination attributes.
const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_PERSIST_CONNS: u16 = 9;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_PERSISTENT`: session affinity (one client sticks to one real server).
pub const SVC_F_PERSISTENT: u32 = 0x1;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every service it lists; never part of a spec.
pub const SVC_F_HASHED: u32 = 0x2;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding, the only method ferry uses.
pub const FWD_MASQ: u32 = 0;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Identity of a virtual service: address, protocol and port, or a firewall mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceKey {
    Addr { protocol: Protocol, addr: IpAddr, port: u16 },
    FwMark { family: IpFamily, mark: u32 },
}

impl ServiceKey {
    pub fn family(&self) -> IpFamily {
        match self {
            ServiceKey::Addr { addr, .. } => IpFamily::of(addr),
            ServiceKey::FwMark { family, .. } => *family,
        }
    }

    /// Real servers of a UDP or SCTP service are removed at once: there is no connection
    /// state to drain (kube-proxy does the same).
    pub fn drains(&self) -> bool {
        matches!(self, ServiceKey::Addr { protocol: Protocol::Tcp, .. } | ServiceKey::FwMark { .. })
    }
}

/// `ipvsadm`'s spelling: `-t 10.96.0.10:80`, `-u [fd00::10]:53`, `-f 251658241 -6`.
impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceKey::Addr { protocol, addr, port } => {
                let flag = match protocol {
                    Protocol::Tcp => "-t",
                    Protocol::Udp => "-u",
                    Protocol::Sctp => "--sctp-service",
                };
                write!(f, "{flag} {}", SocketAddr::new(*addr, *port))
            }
            ServiceKey::FwMark { family: IpFamily::V4, mark } => write!(f, "-f {mark}"),
            ServiceKey::FwMark { family: IpFamily::V6, mark } => write!(f, "-f {mark} -6"),
        }
    }
}

/// Everything of a virtual service besides its identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceSpec {
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` without `HASHED`.
    pub flags: u32,
    /// Persistence timeout in seconds (session affinity).
    pub timeout: u32,
    /// Persistence netmask exactly as the kernel keeps it: a network-order mask for IPv4,
    /// a prefix length in host order for IPv6.
    pub netmask: [u8; 4],
}

impl ServiceSpec {
    /// A service scheduling with `scheduler`; `affinity`: ClientIP session affinity with this
    /// timeout, one client address (/32, /128) per template.
    pub fn new(scheduler: &str, family: IpFamily, affinity: Option<u32>) -> Self {
        Self {
            scheduler: scheduler.to_owned(),
            flags: if affinity.is_some() { SVC_F_PERSISTENT } else { 0 },
            timeout: affinity.unwrap_or(0),
            netmask: host_netmask(family),
        }
    }

    pub fn persistent(&self) -> Option<u32> {
        (self.flags & SVC_F_PERSISTENT != 0).then_some(self.timeout)
    }
}

/// The persistence netmask that keys templates by the whole client address.
pub fn host_netmask(family: IpFamily) -> [u8; 4] {
    match family {
        IpFamily::V4 => [0xff; 4],
        IpFamily::V6 => 128u32.to_ne_bytes(),
    }
}

/// A virtual service as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    pub spec: ServiceSpec,
}

/// A real server of a virtual service (NAT forwarding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dest {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// A real server as the kernel lists it, with its connection counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestStatus {
    pub addr: SocketAddr,
    pub weight: u32,
    pub forward: u32,
    pub active: u32,
    pub inactive: u32,
    pub persistent: u32,
}

impl DestStatus {
    /// Connections (or persistence templates) still pointing at this real server.
    pub fn busy(&self) -> bool {
        self.active > 0 || self.inactive > 0 || self.persistent > 0
    }
}

/// IPVS connection timeouts of a network namespace, in seconds: TCP established, TCP
/// FIN_WAIT, UDP (`ipvsadm --set tcp tcpfin udp`). In a request, 0 leaves that timeout as
/// the kernel has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

impl Timeouts {
    /// What a kernel starts every namespace with (15 min, 2 min, 5 min).
    pub const KERNEL_DEFAULTS: Timeouts = Timeouts { tcp: 900, tcp_fin: 120, udp: 300 };

    /// Whether any timeout is to be set (kube-proxy sets them only then).
    pub fn any(&self) -> bool {
        self.tcp != 0 || self.tcp_fin != 0 || self.udp != 0
    }

    /// Whether the kernel's `have` already carries every timeout set here.
    pub fn satisfied_by(&self, have: &Timeouts) -> bool {
        let ok = |want: u32, have: u32| want == 0 || want == have;
        ok(self.tcp, have.tcp) && ok(self.tcp_fin, have.tcp_fin) && ok(self.udp, have.udp)
    }

    /// `have` with the timeouts set here applied, as the kernel does it.
    pub fn applied_to(&self, have: &Timeouts) -> Timeouts {
        let pick = |want: u32, have: u32| if want == 0 { have } else { want };
        Timeouts {
            tcp: pick(self.tcp, have.tcp),
            tcp_fin: pick(self.tcp_fin, have.tcp_fin),
            udp: pick(self.udp, have.udp),
        }
    }
}

/// `ipvsadm --set`'s order: tcp tcpfin udp.
impl std::fmt::Display for Timeouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.tcp, self.tcp_fin, self.udp)
    }
}

/// One attribute of a service or destination: its type and value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub kind: u16,
    pub value: Vec<u8>,
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        self.value.len()
    }
    fn kind(&self) -> u16 {
        self.kind
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        buffer[..self.value.len()].copy_from_slice(&self.value);
    }
}

/// A first-level attribute: a nested service or destination, a timeout (u32 seconds, host
/// order), or one ferry does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdAttr {
    Service(Vec<Attr>),
    Dest(Vec<Attr>),
    Timeout { kind: u16, secs: u32 },
    Other(DefaultNla),
}

impl Nla for CmdAttr {
    fn value_len(&self) -> usize {
        match self {
            CmdAttr::Service(a) | CmdAttr::Dest(a) => a.as_slice().buffer_len(),
            CmdAttr::Timeout { .. } => 4,
            CmdAttr::Other(n) => n.value_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            CmdAttr::Service(_) => CMD_ATTR_SERVICE | NLA_F_NESTED,
            CmdAttr::Dest(_) => CMD_ATTR_DEST | NLA_F_NESTED,
            CmdAttr::Timeout { kind, .. } => *kind,
            CmdAttr::Other(n) => n.kind(),
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            CmdAttr::Service(a) | CmdAttr::Dest(a) => a.as_slice().emit(buffer),
            CmdAttr::Timeout { secs, .. } => buffer[..4].copy_from_slice(&secs.to_ne_bytes()),
            CmdAttr::Other(n) => n.emit_value(buffer),
        }
    }
}

/// The payload of an IPVS generic netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: u8,
    pub attrs: Vec<CmdAttr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        FAMILY_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        FAMILY_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let mut attrs = Vec::new();
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            // The kernel nests without NLA_F_NESTED (nla_nest_start_noflag): go by type.
            attrs.push(match nla.kind() {
                CMD_ATTR_SERVICE => CmdAttr::Service(nested(nla.value())?),
                CMD_ATTR_DEST => CmdAttr::Dest(nested(nla.value())?),
                kind @ (CMD_ATTR_TIMEOUT_TCP | CMD_ATTR_TIMEOUT_TCP_FIN | CMD_ATTR_TIMEOUT_UDP) => {
                    let secs = u32_ne(nla.value())
                        .ok_or_else(|| DecodeError::from(format!("timeout attribute {kind} is not a u32")))?;
                    CmdAttr::Timeout { kind, secs }
                }
                _ => CmdAttr::Other(DefaultNla::new(nla.kind(), nla.value().to_vec())),
            });
        }
        Ok(Self { cmd: header.cmd, attrs })
    }
}

fn nested(buf: &[u8]) -> Result<Vec<Attr>, DecodeError> {
    NlasIterator::new(buf)
        .map(|nla: Result<NlaBuffer<&[u8]>, DecodeError>| {
            nla.map(|nla| Attr { kind: nla.kind(), value: nla.value().to_vec() })
        })
        .collect()
}

fn attr(kind: u16, value: impl Into<Vec<u8>>) -> Attr {
    Attr { kind, value: value.into() }
}

fn af(family: IpFamily) -> u16 {
    match family {
        IpFamily::V4 => AF_INET,
        IpFamily::V6 => AF_INET6,
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn protocol_number(p: Protocol) -> u16 {
    u16::from(p.number())
}

/// The attributes naming a service (all a delete or a destination command needs).
fn key_attrs(key: &ServiceKey) -> Vec<Attr> {
    match key {
        ServiceKey::Addr { protocol, addr, port } => vec![
            attr(SVC_ATTR_AF, af(IpFamily::of(addr)).to_ne_bytes()),
            attr(SVC_ATTR_PROTOCOL, protocol_number(*protocol).to_ne_bytes()),
            attr(SVC_ATTR_ADDR, ip_bytes(addr)),
            attr(SVC_ATTR_PORT, port.to_be_bytes()),
        ],
        ServiceKey::FwMark { family, mark } => {
            vec![attr(SVC_ATTR_AF, af(*family).to_ne_bytes()), attr(SVC_ATTR_FWMARK, mark.to_ne_bytes())]
        }
    }
}

/// A service with every field the kernel requires to create or edit one.
fn full_service_attrs(key: &ServiceKey, spec: &ServiceSpec) -> Vec<Attr> {
    let mut attrs = key_attrs(key);
    let mut sched = spec.scheduler.as_bytes().to_vec();
    sched.push(0);
    attrs.push(attr(SVC_ATTR_SCHED_NAME, sched));
    // struct ip_vs_flags { flags, mask }: a full mask replaces every flag.
    let mut flags = spec.flags.to_ne_bytes().to_vec();
    flags.extend_from_slice(&u32::MAX.to_ne_bytes());
    attrs.push(attr(SVC_ATTR_FLAGS, flags));
    attrs.push(attr(SVC_ATTR_TIMEOUT, spec.timeout.to_ne_bytes()));
    attrs.push(attr(SVC_ATTR_NETMASK, spec.netmask));
    attrs
}

fn dest_key_attrs(addr: &SocketAddr) -> Vec<Attr> {
    vec![
        attr(DEST_ATTR_ADDR, ip_bytes(&addr.ip())),
        attr(DEST_ATTR_PORT, addr.port().to_be_bytes()),
        attr(DEST_ATTR_ADDR_FAMILY, af(IpFamily::of(&addr.ip())).to_ne_bytes()),
    ]
}

fn full_dest_attrs(dest: &Dest) -> Vec<Attr> {
    let mut attrs = dest_key_attrs(&dest.addr);
    attrs.push(attr(DEST_ATTR_FWD_METHOD, FWD_MASQ.to_ne_bytes()));
    attrs.push(attr(DEST_ATTR_WEIGHT, dest.weight.to_ne_bytes()));
    attrs.push(attr(DEST_ATTR_U_THRESH, 0u32.to_ne_bytes()));
    attrs.push(attr(DEST_ATTR_L_THRESH, 0u32.to_ne_bytes()));
    attrs
}

/// `IPVS_CMD_NEW_SERVICE` / `IPVS_CMD_SET_SERVICE`.
pub fn put_service(cmd: u8, key: &ServiceKey, spec: &ServiceSpec) -> IpvsMessage {
    IpvsMessage { cmd, attrs: vec![CmdAttr::Service(full_service_attrs(key, spec))] }
}

/// `IPVS_CMD_DEL_SERVICE`, or `IPVS_CMD_GET_DEST` (a dump of the service's real servers).
pub fn name_service(cmd: u8, key: &ServiceKey) -> IpvsMessage {
    IpvsMessage { cmd, attrs: vec![CmdAttr::Service(key_attrs(key))] }
}

/// `IPVS_CMD_GET_SERVICE` as a dump: no attributes.
pub fn list_services() -> IpvsMessage {
    IpvsMessage { cmd: CMD_GET_SERVICE, attrs: vec![] }
}

/// `IPVS_CMD_NEW_DEST` / `IPVS_CMD_SET_DEST`.
pub fn put_dest(cmd: u8, key: &ServiceKey, dest: &Dest) -> IpvsMessage {
    IpvsMessage { cmd, attrs: vec![CmdAttr::Service(key_attrs(key)), CmdAttr::Dest(full_dest_attrs(dest))] }
}

/// `IPVS_CMD_DEL_DEST`.
pub fn del_dest(key: &ServiceKey, addr: &SocketAddr) -> IpvsMessage {
    IpvsMessage {
        cmd: CMD_DEL_DEST,
        attrs: vec![CmdAttr::Service(key_attrs(key)), CmdAttr::Dest(dest_key_attrs(addr))],
    }
}

/// `IPVS_CMD_SET_CONFIG` with the timeouts to set; a 0 one is left out (the kernel would
/// ignore it as well), as ipvsadm does.
pub fn set_config(timeouts: &Timeouts) -> IpvsMessage {
    let attrs = [
        (CMD_ATTR_TIMEOUT_TCP, timeouts.tcp),
        (CMD_ATTR_TIMEOUT_TCP_FIN, timeouts.tcp_fin),
        (CMD_ATTR_TIMEOUT_UDP, timeouts.udp),
    ]
    .into_iter()
    .filter(|(_, secs)| *secs != 0)
    .map(|(kind, secs)| CmdAttr::Timeout { kind, secs })
    .collect();
    IpvsMessage { cmd: CMD_SET_CONFIG, attrs }
}

/// `IPVS_CMD_GET_CONFIG`: a plain request (the kernel has no dump for it), no attributes.
pub fn get_config() -> IpvsMessage {
    IpvsMessage { cmd: CMD_GET_CONFIG, attrs: vec![] }
}

/// The timeouts of the kernel's answer to `IPVS_CMD_GET_CONFIG` (an `IPVS_CMD_SET_CONFIG`
/// message). A kernel without TCP or UDP support in IPVS leaves those out: 0.
pub fn parse_config(msg: &IpvsMessage) -> Result<Timeouts, DecodeError> {
    if msg.cmd != CMD_SET_CONFIG {
        return Err(DecodeError::from(format!("IPVS command {} is not a configuration", msg.cmd)));
    }
    let mut t = Timeouts::default();
    for a in &msg.attrs {
        match a {
            CmdAttr::Timeout { kind: CMD_ATTR_TIMEOUT_TCP, secs } => t.tcp = *secs,
            CmdAttr::Timeout { kind: CMD_ATTR_TIMEOUT_TCP_FIN, secs } => t.tcp_fin = *secs,
            CmdAttr::Timeout { kind: CMD_ATTR_TIMEOUT_UDP, secs } => t.udp = *secs,
            _ => {}
        }
    }
    Ok(t)
}

fn find(attrs: &[Attr], kind: u16) -> Option<&[u8]> {
    attrs.iter().find(|a| a.kind & !NLA_F_NESTED == kind).map(|a| a.value.as_slice())
}

fn u16_ne(v: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?))
}

fn u32_ne(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn u16_be(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?))
}

fn family_of(af: u16) -> Result<IpFamily, DecodeError> {
    match af {
        AF_INET => Ok(IpFamily::V4),
        AF_INET6 => Ok(IpFamily::V6),
        other => Err(DecodeError::from(format!("address family {other} is neither AF_INET nor AF_INET6"))),
    }
}

/// An address in the kernel's `union nf_inet_addr` (16 bytes, IPv4 in the first 4).
fn ip_of(family: IpFamily, v: &[u8]) -> Result<IpAddr, DecodeError> {
    let short = || DecodeError::from(format!("address of {} bytes", v.len()));
    Ok(match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(v.get(..4).ok_or_else(short)?).map_err(|_| short())?,
        )),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(v.get(..16).ok_or_else(short)?).map_err(|_| short())?,
        )),
    })
}

fn missing(what: &str) -> DecodeError {
    DecodeError::from(format!("IPVS message without {what}"))
}

/// The service an `IPVS_CMD_NEW_SERVICE` message of a dump describes. `Ok(None)`: a protocol
/// ferry does not program (an IPVS service someone else made).
pub fn parse_service(msg: &IpvsMessage) -> Result<Option<Service>, DecodeError> {
    let attrs = msg
        .attrs
        .iter()
        .find_map(|a| if let CmdAttr::Service(s) = a { Some(s.as_slice()) } else { None })
        .ok_or_else(|| missing("IPVS_CMD_ATTR_SERVICE"))?;
    let family = family_of(find(attrs, SVC_ATTR_AF).and_then(u16_ne).ok_or_else(|| missing("AF"))?)?;
    let key = match find(attrs, SVC_ATTR_FWMARK).and_then(u32_ne).filter(|m| *m != 0) {
        Some(mark) => ServiceKey::FwMark { family, mark },
        None => {
            let number =
                find(attrs, SVC_ATTR_PROTOCOL).and_then(u16_ne).ok_or_else(|| missing("protocol"))?;
            let protocol = match number {
                6 => Protocol::Tcp,
                17 => Protocol::Udp,
                132 => Protocol::Sctp,
                _ => return Ok(None),
            };
            let addr = ip_of(family, find(attrs, SVC_ATTR_ADDR).ok_or_else(|| missing("address"))?)?;
            let port = find(attrs, SVC_ATTR_PORT).and_then(u16_be).ok_or_else(|| missing("port"))?;
            ServiceKey::Addr { protocol, addr, port }
        }
    };
    let scheduler = find(attrs, SVC_ATTR_SCHED_NAME).ok_or_else(|| missing("scheduler"))?;
    let scheduler =
        String::from_utf8_lossy(scheduler.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
    let flags = find(attrs, SVC_ATTR_FLAGS).and_then(u32_ne).ok_or_else(|| missing("flags"))?;
    let timeout = find(attrs, SVC_ATTR_TIMEOUT).and_then(u32_ne).unwrap_or(0);
    let netmask = find(attrs, SVC_ATTR_NETMASK)
        .and_then(|v| v.get(..4))
        .and_then(|v| <[u8; 4]>::try_from(v).ok())
        .unwrap_or_default();
    Ok(Some(Service { key, spec: ServiceSpec { scheduler, flags: flags & !SVC_F_HASHED, timeout, netmask } }))
}

/// The real server an `IPVS_CMD_NEW_DEST` message of a dump describes; `family` is the
/// service's, for kernels that do not report the destination's own.
pub fn parse_dest(msg: &IpvsMessage, family: IpFamily) -> Result<DestStatus, DecodeError> {
    let attrs = msg
        .attrs
        .iter()
        .find_map(|a| if let CmdAttr::Dest(d) = a { Some(d.as_slice()) } else { None })
        .ok_or_else(|| missing("IPVS_CMD_ATTR_DEST"))?;
    let family = match find(attrs, DEST_ATTR_ADDR_FAMILY).and_then(u16_ne) {
        Some(af) => family_of(af)?,
        None => family,
    };
    let ip = ip_of(family, find(attrs, DEST_ATTR_ADDR).ok_or_else(|| missing("destination address"))?)?;
    let port = find(attrs, DEST_ATTR_PORT).and_then(u16_be).ok_or_else(|| missing("destination port"))?;
    let count = |kind| find(attrs, kind).and_then(u32_ne).unwrap_or(0);
    Ok(DestStatus {
        addr: SocketAddr::new(ip, port),
        weight: count(DEST_ATTR_WEIGHT),
        forward: count(DEST_ATTR_FWD_METHOD),
        active: count(DEST_ATTR_ACTIVE_CONNS),
        inactive: count(DEST_ATTR_INACT_CONNS),
        persistent: count(DEST_ATTR_PERSIST_CONNS),
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_generic::GenlMessage;

    use super::*;

    /// The whole netlink message as the kernel receives it, with family id 0x1c.
    fn bytes(msg: IpvsMessage, flags: u16, seq: u32) -> Vec<u8> {
        let mut genl = GenlMessage::from_payload(msg);
        genl.set_resolved_family_id(0x1c);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(genl));
        nl.finalize();
        let mut out = vec![0; nl.buffer_len()];
        nl.serialize(&mut out);
        out
    }

    fn tcp(addr: &str, port: u16) -> ServiceKey {
        ServiceKey::Addr { protocol: Protocol::Tcp, addr: addr.parse().unwrap(), port }
    }

    #[test]
    fn a_new_service_has_the_kernel_layout() {
        let key = tcp("10.96.0.10", 80);
        let spec = ServiceSpec::new("rr", IpFamily::V4, None);
        let got = bytes(put_service(CMD_NEW_SERVICE, &key, &spec), 0x5, 7);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            // nlmsghdr: length 92, type 0x1c (the resolved family), flags REQUEST|ACK, seq 7, port 0
            &[92, 0, 0, 0, 0x1c, 0, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0][..],
            // genlmsghdr: IPVS_CMD_NEW_SERVICE, version 1
            &[1, 1, 0, 0],
            // IPVS_CMD_ATTR_SERVICE, nested, 72 bytes
            &[72, 0, 1, 0x80],
            //   IPVS_SVC_ATTR_AF AF_INET (u16), IPVS_SVC_ATTR_PROTOCOL IPPROTO_TCP (u16)
            &[6, 0, 1, 0, 2, 0, 0, 0, 6, 0, 2, 0, 6, 0, 0, 0],
            //   IPVS_SVC_ATTR_ADDR 10.96.0.10, IPVS_SVC_ATTR_PORT 80 in network order
            &[8, 0, 3, 0, 10, 96, 0, 10, 6, 0, 4, 0, 0, 80, 0, 0],
            //   IPVS_SVC_ATTR_SCHED_NAME "rr\0"
            &[7, 0, 6, 0, b'r', b'r', 0, 0],
            //   IPVS_SVC_ATTR_FLAGS struct ip_vs_flags { flags 0, mask ~0 }
            &[12, 0, 7, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            //   IPVS_SVC_ATTR_TIMEOUT 0, IPVS_SVC_ATTR_NETMASK 255.255.255.255
            &[8, 0, 8, 0, 0, 0, 0, 0, 8, 0, 9, 0, 0xff, 0xff, 0xff, 0xff],
        ]
        .concat();
        assert_eq!(got, want);
    }

    #[test]
    fn session_affinity_sets_the_persistent_flag_timeout_and_a_host_netmask() {
        let key = ServiceKey::Addr { protocol: Protocol::Udp, addr: "fd00::10".parse().unwrap(), port: 53 };
        let spec = ServiceSpec::new("sh", IpFamily::V6, Some(10800));
        let msg = put_service(CMD_SET_SERVICE, &key, &spec);
        let CmdAttr::Service(attrs) = &msg.attrs[0] else { panic!("{msg:?}") };
        assert_eq!(find(attrs, SVC_ATTR_AF), Some(&10u16.to_ne_bytes()[..]));
        assert_eq!(find(attrs, SVC_ATTR_PROTOCOL), Some(&17u16.to_ne_bytes()[..]));
        assert_eq!(find(attrs, SVC_ATTR_ADDR).map(<[u8]>::len), Some(16));
        assert_eq!(find(attrs, SVC_ATTR_PORT), Some(&[0, 53][..]));
        assert_eq!(find(attrs, SVC_ATTR_FLAGS).map(|v| v[..4].to_vec()), Some(1u32.to_ne_bytes().to_vec()));
        assert_eq!(find(attrs, SVC_ATTR_TIMEOUT), Some(&10800u32.to_ne_bytes()[..]));
        // IPv6 persistence netmasks are prefix lengths.
        assert_eq!(find(attrs, SVC_ATTR_NETMASK), Some(&128u32.to_ne_bytes()[..]));
    }

    #[test]
    fn a_new_dest_names_its_service_and_carries_every_required_field() {
        let key = ServiceKey::FwMark { family: IpFamily::V4, mark: 0x0f00_0001 };
        let dest = Dest { addr: "10.0.1.10:8080".parse().unwrap(), weight: 1 };
        let got = bytes(put_dest(CMD_NEW_DEST, &key, &dest), 0x5, 9);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[100, 0, 0, 0, 0x1c, 0, 5, 0, 9, 0, 0, 0, 0, 0, 0, 0][..],
            // genlmsghdr: IPVS_CMD_NEW_DEST, version 1
            &[5, 1, 0, 0],
            // IPVS_CMD_ATTR_SERVICE: AF_INET, IPVS_SVC_ATTR_FWMARK (host order)
            &[20, 0, 1, 0x80, 6, 0, 1, 0, 2, 0, 0, 0, 8, 0, 5, 0],
            &0x0f00_0001u32.to_ne_bytes(),
            // IPVS_CMD_ATTR_DEST, nested, 60 bytes
            &[60, 0, 2, 0x80],
            //   IPVS_DEST_ATTR_ADDR 10.0.1.10, IPVS_DEST_ATTR_PORT 8080 (0x1f90, network order)
            &[8, 0, 1, 0, 10, 0, 1, 10, 6, 0, 2, 0, 0x1f, 0x90, 0, 0],
            //   IPVS_DEST_ATTR_ADDR_FAMILY AF_INET
            &[6, 0, 11, 0, 2, 0, 0, 0],
            //   IPVS_DEST_ATTR_FWD_METHOD MASQ 0, IPVS_DEST_ATTR_WEIGHT 1
            &[8, 0, 3, 0, 0, 0, 0, 0, 8, 0, 4, 0], &1u32.to_ne_bytes(),
            //   IPVS_DEST_ATTR_U_THRESH 0, IPVS_DEST_ATTR_L_THRESH 0
            &[8, 0, 5, 0, 0, 0, 0, 0, 8, 0, 6, 0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(got, want);
    }

    /// A dump reply as the kernel writes it: nested without NLA_F_NESTED, addresses in a
    /// 16-byte `union nf_inet_addr`, stats the parser skips.
    #[test]
    fn a_dumped_service_and_dest_parse_back() {
        let mut svc = vec![
            attr(SVC_ATTR_AF, AF_INET.to_ne_bytes()),
            attr(SVC_ATTR_PROTOCOL, 6u16.to_ne_bytes()),
            attr(SVC_ATTR_ADDR, [10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            attr(SVC_ATTR_PORT, 80u16.to_be_bytes()),
            attr(SVC_ATTR_SCHED_NAME, *b"wrr\0"),
        ];
        let mut flags = (SVC_F_PERSISTENT | SVC_F_HASHED).to_ne_bytes().to_vec();
        flags.extend_from_slice(&u32::MAX.to_ne_bytes());
        svc.push(attr(SVC_ATTR_FLAGS, flags));
        svc.push(attr(SVC_ATTR_TIMEOUT, 600u32.to_ne_bytes()));
        svc.push(attr(SVC_ATTR_NETMASK, [0xff; 4]));
        svc.push(attr(10, vec![4, 0, 1, 0])); // IPVS_SVC_ATTR_STATS
        let mut wire = vec![0; CmdAttr::Service(svc.clone()).buffer_len()];
        CmdAttr::Service(svc).emit(&mut wire);
        wire[3] = 0; // no NLA_F_NESTED, as nla_nest_start_noflag writes it
        let header = GenlHeader { cmd: CMD_NEW_SERVICE, version: 1 };
        let msg = IpvsMessage::parse_with_param(&wire[..], header).unwrap();
        let parsed = parse_service(&msg).unwrap().unwrap();
        assert_eq!(parsed.key, tcp("10.96.0.10", 80));
        assert_eq!(parsed.spec, ServiceSpec::new("wrr", IpFamily::V4, Some(600)), "HASHED is dropped");

        let dest = vec![
            attr(DEST_ATTR_ADDR, "fd00:10::1:10".parse::<Ipv6Addr>().unwrap().octets()),
            attr(DEST_ATTR_PORT, 8080u16.to_be_bytes()),
            attr(DEST_ATTR_FWD_METHOD, 0u32.to_ne_bytes()),
            attr(DEST_ATTR_WEIGHT, 0u32.to_ne_bytes()),
            attr(DEST_ATTR_ACTIVE_CONNS, 3u32.to_ne_bytes()),
            attr(DEST_ATTR_INACT_CONNS, 1u32.to_ne_bytes()),
            attr(DEST_ATTR_PERSIST_CONNS, 0u32.to_ne_bytes()),
            attr(DEST_ATTR_ADDR_FAMILY, AF_INET6.to_ne_bytes()),
        ];
        let mut wire = vec![0; CmdAttr::Dest(dest.clone()).buffer_len()];
        CmdAttr::Dest(dest).emit(&mut wire);
        let msg =
            IpvsMessage::parse_with_param(&wire[..], GenlHeader { cmd: CMD_NEW_DEST, version: 1 }).unwrap();
        let d = parse_dest(&msg, IpFamily::V6).unwrap();
        assert_eq!(d.addr, "[fd00:10::1:10]:8080".parse().unwrap());
        assert_eq!((d.weight, d.active, d.inactive), (0, 3, 1));
        assert!(d.busy());
    }

    #[test]
    fn round_trips_through_the_encoder_and_the_parser() {
        for (key, spec) in [
            (tcp("192.168.0.10", 30080), ServiceSpec::new("rr", IpFamily::V4, None)),
            (
                ServiceKey::Addr { protocol: Protocol::Sctp, addr: "fd00::1".parse().unwrap(), port: 9 },
                ServiceSpec::new("mh", IpFamily::V6, Some(30)),
            ),
            (
                ServiceKey::FwMark { family: IpFamily::V6, mark: 7 },
                ServiceSpec::new("lc", IpFamily::V6, None),
            ),
        ] {
            let msg = put_service(CMD_NEW_SERVICE, &key, &spec);
            let mut wire = vec![0; msg.buffer_len()];
            msg.emit(&mut wire);
            let back =
                IpvsMessage::parse_with_param(&wire[..], GenlHeader { cmd: CMD_NEW_SERVICE, version: 1 })
                    .unwrap();
            assert_eq!(back, msg);
            assert_eq!(parse_service(&back).unwrap(), Some(Service { key, spec }));
        }
    }

    #[test]
    fn set_config_carries_the_timeouts_as_first_level_u32_attributes() {
        let t = Timeouts { tcp: 3600, tcp_fin: 30, udp: 120 };
        let got = bytes(set_config(&t), 0x5, 3);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            // nlmsghdr: length 44, type 0x1c, flags REQUEST|ACK, seq 3, port 0
            &[44, 0, 0, 0, 0x1c, 0, 5, 0, 3, 0, 0, 0, 0, 0, 0, 0][..],
            // genlmsghdr: IPVS_CMD_SET_CONFIG (12), version 1
            &[12, 1, 0, 0],
            // IPVS_CMD_ATTR_TIMEOUT_TCP (4): u32 3600 (0x0e10) in host order, not nested
            &[8, 0, 4, 0], &3600u32.to_ne_bytes(),
            // IPVS_CMD_ATTR_TIMEOUT_TCP_FIN (5): 30
            &[8, 0, 5, 0], &30u32.to_ne_bytes(),
            // IPVS_CMD_ATTR_TIMEOUT_UDP (6): 120
            &[8, 0, 6, 0], &120u32.to_ne_bytes(),
        ]
        .concat();
        assert_eq!(got, want);

        // A timeout of 0 is left out: the kernel keeps its value.
        let got = bytes(set_config(&Timeouts { tcp: 0, tcp_fin: 0, udp: 45 }), 0x5, 4);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[28, 0, 0, 0, 0x1c, 0, 5, 0, 4, 0, 0, 0, 0, 0, 0, 0][..],
            &[12, 1, 0, 0],
            &[8, 0, 6, 0], &45u32.to_ne_bytes(),
        ]
        .concat();
        assert_eq!(got, want);

        // IPVS_CMD_GET_CONFIG (13): no attributes.
        assert_eq!(
            bytes(get_config(), 0x5, 5),
            [20, 0, 0, 0, 0x1c, 0, 5, 0, 5, 0, 0, 0, 0, 0, 0, 0, 13, 1, 0, 0]
        );
    }

    /// The kernel answers GET_CONFIG with a SET_CONFIG message holding all three timeouts.
    #[test]
    fn the_get_config_answer_parses_to_the_timeouts() {
        #[rustfmt::skip]
        let wire: Vec<u8> = [
            &[8, 0, 4, 0][..], &900u32.to_ne_bytes(),
            &[8, 0, 5, 0], &120u32.to_ne_bytes(),
            &[8, 0, 6, 0], &300u32.to_ne_bytes(),
        ]
        .concat();
        let header = GenlHeader { cmd: CMD_SET_CONFIG, version: 1 };
        let msg = IpvsMessage::parse_with_param(&wire[..], header).unwrap();
        assert_eq!(parse_config(&msg).unwrap(), Timeouts::KERNEL_DEFAULTS);
        let round = set_config(&Timeouts { tcp: 1, tcp_fin: 2, udp: 3 });
        let mut wire = vec![0; round.buffer_len()];
        round.emit(&mut wire);
        let back = IpvsMessage::parse_with_param(&wire[..], header).unwrap();
        assert_eq!(back, round);
        assert_eq!(parse_config(&back).unwrap(), Timeouts { tcp: 1, tcp_fin: 2, udp: 3 });
        // Another command, or a timeout that is not a u32, is an error.
        assert!(parse_config(&list_services()).is_err());
        let short = [6, 0, 4, 0, 1, 0, 0, 0];
        assert!(IpvsMessage::parse_with_param(&short[..], header).is_err());
    }

    #[test]
    fn timeouts_compare_and_apply_like_the_kernel_with_zero_as_unchanged() {
        let want = Timeouts { tcp: 3600, tcp_fin: 0, udp: 0 };
        assert!(want.any() && !Timeouts::default().any());
        assert!(!want.satisfied_by(&Timeouts::KERNEL_DEFAULTS));
        let after = want.applied_to(&Timeouts::KERNEL_DEFAULTS);
        assert_eq!(after, Timeouts { tcp: 3600, tcp_fin: 120, udp: 300 });
        assert!(want.satisfied_by(&after));
        assert_eq!(after.to_string(), "3600 120 300");
    }

    #[test]
    fn a_service_of_an_unknown_protocol_is_skipped_not_an_error() {
        let svc = vec![
            attr(SVC_ATTR_AF, AF_INET.to_ne_bytes()),
            attr(SVC_ATTR_PROTOCOL, 33u16.to_ne_bytes()),
            attr(SVC_ATTR_ADDR, [10, 0, 0, 1]),
            attr(SVC_ATTR_PORT, 1u16.to_be_bytes()),
        ];
        let msg = IpvsMessage { cmd: CMD_NEW_SERVICE, attrs: vec![CmdAttr::Service(svc)] };
        assert_eq!(parse_service(&msg).unwrap(), None);
        let msg = IpvsMessage { cmd: CMD_NEW_SERVICE, attrs: vec![] };
        assert!(parse_service(&msg).is_err());
    }
}
