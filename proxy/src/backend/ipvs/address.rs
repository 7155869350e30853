//! The dummy interface `kube-ipvs0` holding every ClusterIP, external IP and LoadBalancer IP,
//! so the kernel takes packets to them as local and IPVS (which hooks local input and output)
//! sees them. Managed over rtnetlink; addresses are /32 and /128, IPv6 ones without duplicate
//! address detection, and the link is up so IPv6 addresses get their local routes.

use std::collections::BTreeSet;
use std::net::IpAddr;

use netlink_packet_core::{NetlinkDeserializable, NetlinkHeader};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::socket::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NlSocket, SocketError, encode,
};

/// kube-proxy's name, so tooling and operators find the addresses where they expect them.
pub const DUMMY_IFNAME: &str = "kube-ipvs0";

const NETLINK_ROUTE: isize = 0;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;

/// The interface holding service addresses.
pub trait ServiceAddresses: Send {
    /// Creates `kube-ipvs0` (type dummy) when missing and sets it up.
    fn ensure_link(&mut self) -> Result<(), SocketError>;
    /// Addresses on `kube-ipvs0`; empty when it does not exist.
    fn addresses(&mut self) -> Result<BTreeSet<IpAddr>, SocketError>;
    fn add(&mut self, ip: IpAddr) -> Result<(), SocketError>;
    /// One already gone is not an error.
    fn del(&mut self, ip: IpAddr) -> Result<(), SocketError>;
    /// Deletes `kube-ipvs0` with its addresses; false when there was none.
    fn remove_link(&mut self) -> Result<bool, SocketError>;
    /// Every address of every interface of the namespace (to recognise NodePort services).
    fn local_addresses(&mut self) -> Result<BTreeSet<IpAddr>, SocketError>;
}

/// `kube-ipvs0` over rtnetlink.
#[derive(Debug)]
pub struct Rtnetlink {
    socket: NlSocket,
    /// Interface index of `kube-ipvs0`, once known.
    index: Option<u32>,
}

impl Rtnetlink {
    pub fn open(netns: Option<&str>) -> Result<Self, SocketError> {
        Ok(Self { socket: NlSocket::open(NETLINK_ROUTE, netns)?, index: None })
    }

    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<(), SocketError> {
        let seq = self.socket.next_seq();
        let bytes = encode(msg, NLM_F_REQUEST | NLM_F_ACK | flags, seq);
        self.socket.request(op, &bytes, seq)
    }

    fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
        each: &mut dyn FnMut(RouteNetlinkMessage),
    ) -> Result<(), SocketError> {
        let seq = self.socket.next_seq();
        let bytes = encode(msg, NLM_F_REQUEST | flags, seq);
        self.socket.dump(op, &bytes, seq, &mut |ty, payload| {
            let mut header = NetlinkHeader::default();
            header.message_type = ty;
            let msg = RouteNetlinkMessage::deserialize(&header, payload)
                .map_err(|e| SocketError::Decode { op: op(), reason: e.to_string() })?;
            each(msg);
            Ok(())
        })
    }

    /// The index of `kube-ipvs0`, None when it does not exist.
    fn lookup(&mut self) -> Result<Option<u32>, SocketError> {
        if self.index.is_some() {
            return Ok(self.index);
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(DUMMY_IFNAME.to_owned()));
        let mut index = None;
        let op = || format!("looking up {DUMMY_IFNAME}");
        match self.dump(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK, &op, &mut |reply| {
            if let RouteNetlinkMessage::NewLink(link) = reply {
                index = Some(link.header.index);
            }
        }) {
            Err(e) if e.errno() == Some(ENODEV) => return Ok(None),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        self.index = index;
        Ok(index)
    }

    fn address_message(index: u32, ip: IpAddr) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.prefix_len = if ip.is_ipv4() { 32 } else { 128 };
        msg.header.scope = AddressScope::Universe;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(ip));
        msg.attributes.push(AddressAttribute::Address(ip));
        if ip.is_ipv6() {
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        msg
    }

    fn dump_addresses(&mut self, index: Option<u32>) -> Result<BTreeSet<IpAddr>, SocketError> {
        let mut out = BTreeSet::new();
        let op = || "listing addresses".to_owned();
        self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
            &op,
            &mut |reply| {
                // The up link gets an IPv6 link-local address of the kernel's: not ferry's.
                if let RouteNetlinkMessage::NewAddress(a) = reply
                    && index.is_none_or(|i| a.header.index == i)
                    && a.header.scope != AddressScope::Link
                {
                    for attr in &a.attributes {
                        if let AddressAttribute::Address(ip) = attr {
                            out.insert(*ip);
                        }
                    }
                }
            },
        )?;
        Ok(out)
    }
}

impl ServiceAddresses for Rtnetlink {
    fn ensure_link(&mut self) -> Result<(), SocketError> {
        // Someone may have deleted it since: look again.
        self.index = None;
        if self.lookup()?.is_none() {
            let mut msg = LinkMessage::default();
            msg.attributes.push(LinkAttribute::IfName(DUMMY_IFNAME.to_owned()));
            msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Dummy)]));
            let op = || format!("creating {DUMMY_IFNAME} (type dummy: is the dummy module there?)");
            match self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL, &op) {
                Err(e) if e.errno() == Some(EEXIST) => {}
                other => other?,
            }
        }
        let index = self.lookup()?.ok_or_else(|| SocketError::Decode {
            op: format!("creating {DUMMY_IFNAME}"),
            reason: "the link is not there after its creation".into(),
        })?;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), 0, &|| format!("setting {DUMMY_IFNAME} up"))
    }

    fn addresses(&mut self) -> Result<BTreeSet<IpAddr>, SocketError> {
        match self.lookup()? {
            None => Ok(BTreeSet::new()),
            Some(index) => self.dump_addresses(Some(index)),
        }
    }

    fn add(&mut self, ip: IpAddr) -> Result<(), SocketError> {
        let index = self.lookup()?.ok_or_else(|| SocketError::Decode {
            op: format!("adding {ip} to {DUMMY_IFNAME}"),
            reason: "the interface does not exist".into(),
        })?;
        let msg = RouteNetlinkMessage::NewAddress(Self::address_message(index, ip));
        match self.request(msg, NLM_F_CREATE | NLM_F_EXCL, &|| format!("adding {ip} to {DUMMY_IFNAME}")) {
            Err(e) if e.errno() == Some(EEXIST) => Ok(()),
            other => other,
        }
    }

    fn del(&mut self, ip: IpAddr) -> Result<(), SocketError> {
        let Some(index) = self.lookup()? else { return Ok(()) };
        let msg = RouteNetlinkMessage::DelAddress(Self::address_message(index, ip));
        match self.request(msg, 0, &|| format!("removing {ip} from {DUMMY_IFNAME}")) {
            Err(e) if e.errno() == Some(EADDRNOTAVAIL) || e.errno() == Some(ENODEV) => Ok(()),
            other => other,
        }
    }

    fn remove_link(&mut self) -> Result<bool, SocketError> {
        let Some(index) = self.lookup()? else { return Ok(false) };
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.index = None;
        match self.request(RouteNetlinkMessage::DelLink(msg), 0, &|| format!("deleting {DUMMY_IFNAME}")) {
            Err(e) if e.errno() == Some(ENODEV) => Ok(false),
            Err(e) => Err(e),
            Ok(()) => Ok(true),
        }
    }

    fn local_addresses(&mut self) -> Result<BTreeSet<IpAddr>, SocketError> {
        self.dump_addresses(None)
    }
}

/// In-memory `kube-ipvs0` for tests.
#[derive(Debug, Default, Clone)]
pub struct FakeAddresses {
    pub link: bool,
    pub addresses: BTreeSet<IpAddr>,
    /// Addresses of the node's other interfaces.
    pub node_addresses: BTreeSet<IpAddr>,
    pub log: Vec<String>,
}

impl ServiceAddresses for FakeAddresses {
    fn ensure_link(&mut self) -> Result<(), SocketError> {
        if !self.link {
            self.link = true;
            self.log.push(format!("link add {DUMMY_IFNAME}"));
        }
        Ok(())
    }

    fn addresses(&mut self) -> Result<BTreeSet<IpAddr>, SocketError> {
        Ok(self.addresses.clone())
    }

    fn add(&mut self, ip: IpAddr) -> Result<(), SocketError> {
        if !self.link {
            return Err(SocketError::Kernel {
                op: format!("add {ip}"),
                errno: ENODEV,
                source: std::io::Error::from_raw_os_error(ENODEV),
            });
        }
        if self.addresses.insert(ip) {
            self.log.push(format!("addr add {ip}"));
        }
        Ok(())
    }

    fn del(&mut self, ip: IpAddr) -> Result<(), SocketError> {
        if self.addresses.remove(&ip) {
            self.log.push(format!("addr del {ip}"));
        }
        Ok(())
    }

    fn remove_link(&mut self) -> Result<bool, SocketError> {
        let had = self.link;
        self.link = false;
        self.addresses.clear();
        if had {
            self.log.push(format!("link del {DUMMY_IFNAME}"));
        }
        Ok(had)
    }

    fn local_addresses(&mut self) -> Result<BTreeSet<IpAddr>, SocketError> {
        Ok(self.addresses.union(&self.node_addresses).copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Emitable;

    use super::*;

    #[test]
    fn service_addresses_are_host_addresses_and_ipv6_ones_skip_dad() {
        let msg = Rtnetlink::address_message(7, "10.96.0.10".parse().unwrap());
        let mut b = vec![0; msg.buffer_len()];
        msg.emit(&mut b);
        // ifaddrmsg: AF_INET, /32, flags 0, scope universe, index 7; IFA_LOCAL, IFA_ADDRESS.
        #[rustfmt::skip]
        assert_eq!(b, vec![2, 32, 0, 0, 7, 0, 0, 0, 8, 0, 2, 0, 10, 96, 0, 10, 8, 0, 1, 0, 10, 96, 0, 10]);
        let msg = Rtnetlink::address_message(7, "fd00::10".parse().unwrap());
        assert_eq!(msg.header.prefix_len, 128);
        assert!(msg.attributes.contains(&AddressAttribute::Flags(AddressFlags::Nodad)));
        assert_eq!(RouteNetlinkMessage::NewAddress(msg).message_type(), 20, "RTM_NEWADDR");
    }
}
