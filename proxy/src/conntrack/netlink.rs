//! The kernel's conntrack table over ctnetlink (`NETLINK_NETFILTER`, subsystem
//! `NFNL_SUBSYS_CTNETLINK`): dumps of one family's UDP flows, read as they stream, and deletes
//! by original tuple, zone and entry id, many per datagram. These are the requests of
//! `conntrack -L` and `conntrack -D`; kube-proxy's netlink library does the same (dump, filter
//! in userspace, delete each match).
//!
//! Dumps ask the kernel to filter (`CTA_FILTER`, Linux 5.8): UDP only, and one destination port
//! when given, so the kernel walks its table but sends only candidates. Older kernels ignore
//! the attribute and send everything; the parser skips what is not UDP and the caller filters
//! the rest, so the result is the same. Dump entries are parsed attribute by attribute, reading
//! only the tuples, id and zone: that is the part that grows with the table. Requests are built
//! with netlink-packet-netfilter's types.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{
    DefaultNla, Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NlasIterator,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use super::{ConntrackError, Flow, Table};
use crate::model::IpFamily;

// linux/netlink.h
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
// linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u8 = 1;
const NFGENMSG_LEN: usize = 4;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
// net/netfilter/nf_internals.h (ABI, not exported): which tuple fields a dump filter compares.
const CTA_FILTER_F_CTA_PROTO_NUM: u32 = 1 << 3;
const CTA_FILTER_F_CTA_PROTO_DST_PORT: u32 = 1 << 5;
const IPPROTO_UDP: u8 = 17;
const ENOENT: i32 = 2;
/// Receive buffer: the kernel fills dump datagrams up to about 32 KiB.
const RECV_BUFFER: usize = 64 * 1024;
/// Deletes per datagram (each answered by an ack).
const DELETE_BATCH: usize = 128;
/// How long a receive waits: a lost answer fails the cleanup instead of hanging the daemon.
const RECV_TIMEOUT_SECS: i64 = 10;

/// A ctnetlink socket in the network namespace of the thread that opened it.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a ctnetlink socket in the calling thread's network namespace (needs CAP_NET_ADMIN
    /// there).
    pub fn open() -> Result<Self, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Open)?;
        socket.bind_auto().map_err(ConntrackError::Open)?;
        socket.connect(&NlAddr::new(0, 0)).map_err(ConntrackError::Open)?;
        // Errors echo the request's header only, not the whole request.
        socket.set_cap_ack(true).map_err(ConntrackError::Open)?;
        let timeout = TimeVal::new(RECV_TIMEOUT_SECS, 0);
        setsockopt(&socket, sockopt::ReceiveTimeout, &timeout).map_err(|e| ConntrackError::Open(e.into()))?;
        Ok(Self { socket, seq: 0, buf: Vec::with_capacity(RECV_BUFFER) })
    }

    /// Every UDP flow of `family` (what `conntrack -L -p udp` lists).
    pub fn udp_flows(&mut self, family: IpFamily) -> Result<Vec<Flow>, ConntrackError> {
        let mut out = Vec::new();
        self.for_each_udp(family, None, &mut |f| out.push(f))?;
        Ok(out)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, op: &'static str, bytes: &[u8]) -> Result<(), ConntrackError> {
        let sent = self.socket.send(bytes, 0).map_err(|source| ConntrackError::Io { op, source })?;
        if sent != bytes.len() {
            return Err(ConntrackError::Io { op, source: io::Error::other("short send") });
        }
        Ok(())
    }

    /// Receives one datagram and hands each netlink message in it to `each`.
    fn recv(
        &mut self,
        op: &'static str,
        each: &mut dyn FnMut(u32, Message<'_>) -> Result<(), ConntrackError>,
    ) -> Result<(), ConntrackError> {
        self.buf.clear();
        let n = self.socket.recv(&mut self.buf, 0).map_err(|source| {
            let source = if source.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {RECV_TIMEOUT_SECS} s"))
            } else {
                source
            };
            ConntrackError::Io { op, source }
        })?;
        if n > self.buf.len() {
            return Err(ConntrackError::Decode { op, reason: format!("datagram of {n} bytes truncated") });
        }
        for_each_message(&self.buf[..n], op, each)
    }
}

impl Table for Netlink {
    fn for_each_udp(
        &mut self,
        family: IpFamily,
        dst_port: Option<u16>,
        visit: &mut dyn FnMut(Flow),
    ) -> Result<(), ConntrackError> {
        const OP: &str = "dump";
        let seq = self.next_seq();
        self.send(OP, &dump_request(family, dst_port, seq))?;
        let mut done = false;
        while !done {
            self.recv(OP, &mut |msg_seq, msg| {
                if msg_seq != seq {
                    return Ok(());
                }
                match msg {
                    Message::Done => done = true,
                    Message::Ack(0) => {}
                    Message::Ack(code) => {
                        return Err(ConntrackError::Kernel {
                            op: OP,
                            source: io::Error::from_raw_os_error(-code),
                        });
                    }
                    Message::Entry(attributes) => {
                        if let Some(flow) = udp_flow(attributes) {
                            visit(flow);
                        }
                    }
                    Message::Other => {}
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<usize, ConntrackError> {
        const OP: &str = "delete";
        let mut deleted = 0;
        for batch in flows.chunks(DELETE_BATCH) {
            let first = self.seq.wrapping_add(1);
            let mut bytes = Vec::new();
            for flow in batch {
                let seq = self.next_seq();
                bytes.extend_from_slice(&delete_request(flow, seq));
            }
            self.send(OP, &bytes)?;
            let mut pending = batch.len();
            while pending > 0 {
                self.recv(OP, &mut |seq, msg| {
                    let Message::Ack(code) = msg else { return Ok(()) };
                    if seq.wrapping_sub(first) as usize >= batch.len() {
                        return Ok(());
                    }
                    pending -= 1;
                    match code {
                        0 => deleted += 1,
                        // Expired, or replaced by a new entry with another id, since the dump.
                        code if code == -ENOENT => {}
                        code => {
                            let source = io::Error::from_raw_os_error(-code);
                            return Err(ConntrackError::Kernel { op: OP, source });
                        }
                    }
                    Ok(())
                })?;
            }
        }
        Ok(deleted)
    }
}

/// One netlink message from the kernel, as far as ferry cares.
#[derive(Debug, PartialEq, Eq)]
enum Message<'a> {
    /// The end of a dump.
    Done,
    /// `NLMSG_ERROR`: 0 acknowledges a request, a negative errno refuses it.
    Ack(i32),
    /// A conntrack entry: its attributes.
    Entry(&'a [u8]),
    Other,
}

/// Hands each netlink message of a datagram to `each`, with its sequence number.
fn for_each_message(
    mut bytes: &[u8],
    op: &'static str,
    each: &mut dyn FnMut(u32, Message<'_>) -> Result<(), ConntrackError>,
) -> Result<(), ConntrackError> {
    let decode = |reason: String| ConntrackError::Decode { op, reason };
    while !bytes.is_empty() {
        let buf = NetlinkBuffer::new_checked(bytes).map_err(|e| decode(e.to_string()))?;
        let len = buf.length() as usize;
        let payload = buf.payload();
        let msg = match buf.message_type() {
            NLMSG_DONE => Message::Done,
            NLMSG_ERROR => {
                let code = payload.get(..4).ok_or_else(|| decode("short NLMSG_ERROR".into()))?;
                Message::Ack(i32::from_ne_bytes([code[0], code[1], code[2], code[3]]))
            }
            t if t == (NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW) => {
                Message::Entry(payload.get(NFGENMSG_LEN..).ok_or_else(|| decode("short entry".into()))?)
            }
            _ => Message::Other,
        };
        each(buf.sequence_number(), msg)?;
        // Messages are padded to 4 bytes; the last one may not be.
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(())
}

/// The UDP flow a dumped entry describes; None for other protocols (or a malformed entry).
fn udp_flow(attributes: &[u8]) -> Option<Flow> {
    let (mut orig, mut reply, mut id, mut zone) = (None, None, None, None);
    for nla in NlasIterator::new(attributes) {
        let nla = nla.ok()?;
        match nla.kind() {
            CTA_TUPLE_ORIG => orig = Some(udp_tuple(nla.value())?),
            CTA_TUPLE_REPLY => reply = Some(udp_tuple(nla.value())?),
            CTA_ID => id = nla.value().try_into().ok().map(u32::from_be_bytes),
            CTA_ZONE => zone = nla.value().try_into().ok().map(u16::from_be_bytes),
            _ => {}
        }
    }
    let ((orig_src, orig_dst), (reply_src, reply_dst)) = (orig?, reply?);
    Some(Flow { orig_src, orig_dst, reply_src, reply_dst, id, zone })
}

/// A tuple's (source, destination) when it is UDP.
fn udp_tuple(tuple: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for nla in NlasIterator::new(tuple) {
        let nla = nla.ok()?;
        match nla.kind() {
            CTA_TUPLE_IP => {
                for ip in NlasIterator::new(nla.value()) {
                    let ip = ip.ok()?;
                    match ip.kind() {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(ip_of(ip.value())?),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(ip_of(ip.value())?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for p in NlasIterator::new(nla.value()) {
                    let p = p.ok()?;
                    match p.kind() {
                        CTA_PROTO_NUM => proto = p.value().first().copied(),
                        CTA_PROTO_SRC_PORT => sport = p.value().try_into().ok().map(u16::from_be_bytes),
                        CTA_PROTO_DST_PORT => dport = p.value().try_into().ok().map(u16::from_be_bytes),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if proto != Some(IPPROTO_UDP) {
        return None;
    }
    Some((SocketAddr::new(src?, sport?), SocketAddr::new(dst?, dport?)))
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(Ipv4Addr::from(v4).into());
    }
    <[u8; 16]>::try_from(bytes).ok().map(|v6| Ipv6Addr::from(v6).into())
}

fn proto_family(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

fn request(family: IpFamily, flags: u16, seq: u32, message: ConntrackMessage) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let inner = NetfilterMessage::new(NetfilterHeader::new(proto_family(family), 0, 0), message);
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(inner));
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    bytes
}

/// `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`: the family's UDP entries, to `dst_port` if given.
fn dump_request(family: IpFamily, dst_port: Option<u16>, seq: u32) -> Vec<u8> {
    let mut proto = vec![ProtoTuple::Protocol(Protocol::Udp)];
    let mut flags = CTA_FILTER_F_CTA_PROTO_NUM;
    if let Some(port) = dst_port {
        proto.push(ProtoTuple::DestinationPort(port));
        flags |= CTA_FILTER_F_CTA_PROTO_DST_PORT;
    }
    // Plain attributes, as the crate's conntrack attributes drop the nested flag of an
    // attribute they don't know, and the kernel parses CTA_FILTER strictly.
    let tuple = emitted(&Tuple::Proto(proto));
    let filter = emitted(&DefaultNla::new(CTA_FILTER_ORIG_FLAGS, flags.to_ne_bytes().to_vec()));
    let attributes = vec![
        DefaultNla::new(CTA_TUPLE_ORIG | NLA_F_NESTED, tuple),
        DefaultNla::new(CTA_FILTER | NLA_F_NESTED, filter),
    ];
    let get = ConntrackMessage::Other { message_type: IPCTNL_MSG_CT_GET, attributes };
    request(family, NLM_F_REQUEST | NLM_F_DUMP, seq, get)
}

fn emitted(nla: &impl Emitable) -> Vec<u8> {
    let mut bytes = vec![0; nla.buffer_len()];
    nla.emit(&mut bytes);
    bytes
}

/// `IPCTNL_MSG_CT_DELETE` of exactly this entry: its original tuple, zone and id.
fn delete_request(flow: &Flow, seq: u32) -> Vec<u8> {
    let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(flow.orig_src.ip()),
            IPTuple::DestinationAddress(flow.orig_dst.ip()),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Udp),
            ProtoTuple::SourcePort(flow.orig_src.port()),
            ProtoTuple::DestinationPort(flow.orig_dst.port()),
        ]),
    ])];
    if let Some(zone) = flow.zone {
        attributes.push(ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, zone.to_be_bytes().to_vec())));
    }
    if let Some(id) = flow.id {
        attributes.push(ConntrackAttribute::Other(DefaultNla::new(CTA_ID, id.to_be_bytes().to_vec())));
    }
    request(flow.family(), NLM_F_REQUEST | NLM_F_ACK, seq, ConntrackMessage::Delete(attributes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    #[test]
    fn a_delete_names_the_original_tuple_and_the_entry_id() {
        let flow = Flow {
            id: Some(0x0102_0304),
            ..Flow::udp(sa("10.0.1.2:40000"), sa("10.96.0.10:53"), sa("10.0.1.10:8053"), sa("10.0.1.2:40000"))
        };
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            // nlmsghdr: length 80, type IPCTNL_MSG_CT_DELETE of ctnetlink (1 << 8 | 2), flags REQUEST|ACK, seq 7, port 0
            &[80, 0, 0, 0, 2, 1, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0][..],
            // nfgenmsg: AF_INET, version 0, res_id 0
            &[2, 0, 0, 0],
            // CTA_TUPLE_ORIG (nested), 52 bytes
            &[52, 0, 1, 0x80],
            //   CTA_TUPLE_IP (nested): CTA_IP_V4_SRC 10.0.1.2, CTA_IP_V4_DST 10.96.0.10
            &[20, 0, 1, 0x80, 8, 0, 1, 0, 10, 0, 1, 2, 8, 0, 2, 0, 10, 96, 0, 10],
            //   CTA_TUPLE_PROTO (nested): CTA_PROTO_NUM 17, CTA_PROTO_SRC_PORT 40000, CTA_PROTO_DST_PORT 53
            &[28, 0, 2, 0x80, 5, 0, 1, 0, 17, 0, 0, 0, 6, 0, 2, 0, 0x9c, 0x40, 0, 0, 6, 0, 3, 0, 0, 53, 0, 0],
            // CTA_ID, big endian
            &[8, 0, 12, 0, 1, 2, 3, 4],
        ]
        .concat();
        assert_eq!(delete_request(&flow, 7), expected);
        let zoned = Flow { zone: Some(9), id: None, ..flow };
        assert_eq!(delete_request(&zoned, 7)[72..], [6, 0, 18, 0, 0, 9, 0, 0], "CTA_ZONE, big endian");
    }

    #[test]
    fn a_dump_asks_the_kernel_for_udp_flows_to_one_port() {
        let flags = |f: u32| f.to_ne_bytes();
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            // nlmsghdr: length 56, type IPCTNL_MSG_CT_GET (1 << 8 | 1), flags REQUEST|DUMP, seq 3
            &[56, 0, 0, 0, 1, 1, 1, 3, 3, 0, 0, 0, 0, 0, 0, 0][..],
            // nfgenmsg: AF_INET6
            &[10, 0, 0, 0],
            // CTA_TUPLE_ORIG { CTA_TUPLE_PROTO { CTA_PROTO_NUM 17, CTA_PROTO_DST_PORT 53 } }
            &[24, 0, 1, 0x80, 20, 0, 2, 0x80, 5, 0, 1, 0, 17, 0, 0, 0, 6, 0, 3, 0, 0, 53, 0, 0],
            // CTA_FILTER (nested) { CTA_FILTER_ORIG_FLAGS: PROTO_NUM | PROTO_DST_PORT }
            &[12, 0, 25, 0x80, 8, 0, 1, 0], &flags(1 << 3 | 1 << 5),
        ]
        .concat();
        assert_eq!(dump_request(IpFamily::V6, Some(53), 3), expected);
        let all = dump_request(IpFamily::V4, None, 4);
        assert_eq!(all.len(), 48, "without a port: protocol only");
        assert_eq!(all[all.len() - 4..], flags(1 << 3));
    }

    /// Builds a dump datagram the way the kernel lays it out: one `IPCTNL_MSG_CT_NEW` per entry.
    fn dumped(entries: Vec<Vec<ConntrackAttribute>>) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (i, attributes) in entries.into_iter().enumerate() {
            let mut header = NetlinkHeader::default();
            header.sequence_number = 1;
            header.flags = 2; // NLM_F_MULTI
            let inner = NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv6, 0, 0),
                ConntrackMessage::New(attributes),
            );
            let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(inner));
            packet.finalize();
            let mut b = vec![0; packet.buffer_len()];
            packet.serialize(&mut b);
            assert_eq!(b.len() % 4, 0, "entry {i} is padded");
            bytes.extend(b);
        }
        // NLMSG_DONE with its int payload.
        bytes.extend([20, 0, 0, 0, 3, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        bytes
    }

    fn entry(proto: Protocol) -> Vec<ConntrackAttribute> {
        let ip = |src: &str, dst: &str| {
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.parse().expect("an IP")),
                IPTuple::DestinationAddress(dst.parse().expect("an IP")),
            ])
        };
        let ports = |s: u16, d: u16| {
            Tuple::Proto(vec![
                ProtoTuple::Protocol(proto),
                ProtoTuple::SourcePort(s),
                ProtoTuple::DestinationPort(d),
            ])
        };
        vec![
            ConntrackAttribute::CtaTupleOrig(vec![ip("fd00:10::1:2", "fd00:96::10"), ports(40000, 53)]),
            ConntrackAttribute::CtaTupleReply(vec![ip("fd00:10::1:10", "fd00:10::1:2"), ports(8053, 40000)]),
            ConntrackAttribute::CtaStatus(netlink_packet_netfilter::conntrack::Status::from_bits_retain(
                0x18a,
            )),
            ConntrackAttribute::CtaTimeout(117),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ID, vec![0xde, 0xad, 0xbe, 0xef])),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, vec![0, 9])),
        ]
    }

    /// Entries as the kernel dumps them (tuples, id, zone and attributes ferry ignores) parse
    /// into flows; other protocols are skipped, and the delete built from a flow names the
    /// same entry.
    #[test]
    fn dumped_entries_parse_into_udp_flows() {
        let datagram = dumped(vec![entry(Protocol::Udp), entry(Protocol::Tcp)]);
        let mut flows = Vec::new();
        let mut done = false;
        for_each_message(&datagram, "dump", &mut |seq, msg| {
            assert_eq!(seq, 1);
            match msg {
                Message::Entry(attributes) => flows.push(udp_flow(attributes)),
                Message::Done => done = true,
                other => panic!("unexpected {other:?}"),
            }
            Ok(())
        })
        .expect("valid messages");
        let flow = Flow {
            id: Some(0xdead_beef),
            zone: Some(9),
            ..Flow::udp(
                sa("[fd00:10::1:2]:40000"),
                sa("[fd00:96::10]:53"),
                sa("[fd00:10::1:10]:8053"),
                sa("[fd00:10::1:2]:40000"),
            )
        };
        assert_eq!(flows, [Some(flow.clone()), None], "the TCP entry is skipped");
        assert!(done);
        let delete = delete_request(&flow, 1);
        assert_eq!(delete[16], 10, "nfgenmsg family AF_INET6");
        assert_eq!(
            delete[delete.len() - 16..],
            [6, 0, 18, 0, 0, 9, 0, 0, 8, 0, 12, 0, 0xde, 0xad, 0xbe, 0xef]
        );
    }

    #[test]
    fn acks_and_errors_parse_with_their_sequence_numbers() {
        // Two NLMSG_ERROR messages in one datagram (NLM_F_CAPPED: the request's header only):
        // an ack for seq 5 and ENOENT for seq 6.
        #[rustfmt::skip]
        let datagram: Vec<u8> = [
            &[36, 0, 0, 0, 2, 0, 0, 1, 5, 0, 0, 0, 0, 0, 0, 0][..], &[0, 0, 0, 0],
            &[20, 0, 0, 0, 2, 1, 5, 0, 5, 0, 0, 0, 0, 0, 0, 0],
            &[36, 0, 0, 0, 2, 0, 0, 1, 6, 0, 0, 0, 0, 0, 0, 0], &(-ENOENT).to_ne_bytes(),
            &[20, 0, 0, 0, 2, 1, 5, 0, 6, 0, 0, 0, 0, 0, 0, 0],
        ]
        .concat();
        let mut seen = Vec::new();
        for_each_message(&datagram, "delete", &mut |seq, msg| {
            seen.push((seq, msg == Message::Ack(0), msg == Message::Ack(-ENOENT)));
            Ok(())
        })
        .expect("valid messages");
        assert_eq!(seen, [(5, true, false), (6, false, true)]);
    }

    #[test]
    fn malformed_datagrams_are_errors_not_panics() {
        let err = for_each_message(&[36, 0, 0, 0, 2, 0], "dump", &mut |_, _| Ok(()));
        assert!(matches!(err, Err(ConntrackError::Decode { op: "dump", .. })), "{err:?}");
        // A truncated entry attribute is no flow.
        assert_eq!(udp_flow(&[52, 0, 1, 0x80, 20, 0]), None);
    }
}
