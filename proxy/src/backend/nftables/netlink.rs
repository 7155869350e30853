//! Set and map elements written straight to the kernel over nfnetlink, in one batch (one
//! atomic transaction).
//!
//! `nft -f` spends most of a large sync parsing and evaluating element text in userspace
//! (about 1.5 s of CPU for 100,000 map elements here) and costs a process start per sync; the
//! kernel itself inserts them in a fraction of that. Structure (chains, rules, set
//! declarations) still goes through `nft`, which is rare and small; elements, the bulk and the
//! everyday change, go here. Interval sets stay with `nft`, which computes their ranges.
//!
//! Element text (`10.96.0.10 . tcp . 80`, `10.0.1.10 . 8080`, `goto pick_ip_3_5d0e8a1f`) is encoded at
//! this one boundary into nftables' register layout: each concatenated field padded to 4 bytes,
//! addresses and ports in network byte order.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send, socket,
};

use super::NftError;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

const NF_DROP: i32 = 0;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;

/// Elements per netlink message; the kernel limits one message to 64 KiB of attributes.
const ELEMENTS_PER_MESSAGE: usize = 512;

/// One step of a batch.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// Remove every element of the set.
    Flush {
        set: &'a str,
    },
    Delete {
        set: &'a str,
        keys: &'a [String],
    },
    /// Elements as `key` or `key : value` text.
    Add {
        set: &'a str,
        elements: &'a [String],
    },
}

/// An nfnetlink socket in the namespace ferry programs.
pub struct ElementWriter {
    fd: OwnedFd,
    seq: u32,
}

impl std::fmt::Debug for ElementWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElementWriter").field("fd", &self.fd.as_raw_fd()).finish()
    }
}

impl ElementWriter {
    /// Opens the socket in this thread's network namespace, or inside the named one (a helper
    /// thread enters it; the socket stays bound to the namespace it was created in).
    pub fn new(netns: Option<&str>) -> Result<Self, NftError> {
        let fd = match netns {
            None => open_socket(),
            Some(name) => {
                let path = format!("/run/netns/{name}");
                std::thread::scope(|s| {
                    s.spawn(|| -> io::Result<OwnedFd> {
                        let ns = std::fs::File::open(&path)?;
                        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(io::Error::from)?;
                        open_socket()
                    })
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
                })
            }
        }
        .map_err(NftError::Netlink)?;
        Ok(Self { fd, seq: 1 })
    }

    /// Applies `ops` to table `ferry` of `family` (`ip` or `ip6`) as one transaction.
    pub fn apply(&mut self, family: &str, table: &str, ops: &[Op<'_>]) -> Result<usize, NftError> {
        let nfproto: u8 = if family == "ip6" { 10 } else { 2 };
        let mut buf = Vec::with_capacity(64 * 1024);
        let begin = self.next_seq();
        put_message(&mut buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin, 0, NFNL_SUBSYS_NFTABLES, |_| {
            Ok(())
        })?;
        let mut messages: Vec<(u32, String)> = Vec::new();
        let mut written = 0;
        for op in ops {
            match op {
                Op::Flush { set } => {
                    let seq = self.next_seq();
                    put_message(
                        &mut buf,
                        msg_type(NFT_MSG_DELSETELEM),
                        NLM_F_REQUEST | NLM_F_ACK,
                        seq,
                        nfproto,
                        0,
                        |b| {
                            put_str(b, NFTA_SET_ELEM_LIST_TABLE, table);
                            put_str(b, NFTA_SET_ELEM_LIST_SET, set);
                            Ok(())
                        },
                    )?;
                    messages.push((seq, format!("flush set {family} {table} {set}")));
                }
                Op::Delete { set, keys } | Op::Add { set, elements: keys } => {
                    let add = matches!(op, Op::Add { .. });
                    for chunk in keys.chunks(ELEMENTS_PER_MESSAGE) {
                        let seq = self.next_seq();
                        let (ty, flags) = if add {
                            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
                        } else {
                            (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
                        };
                        put_message(&mut buf, msg_type(ty), flags, seq, nfproto, 0, |b| {
                            put_str(b, NFTA_SET_ELEM_LIST_TABLE, table);
                            put_str(b, NFTA_SET_ELEM_LIST_SET, set);
                            nested(b, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                                for text in chunk {
                                    nested(b, NFTA_LIST_ELEM, |b| put_element(b, text, add))?;
                                }
                                Ok(())
                            })
                        })?;
                        written += chunk.len();
                        let verb = if add { "add" } else { "delete" };
                        messages.push((
                            seq,
                            format!("{verb} element {family} {table} {set} {{ {} … }}", chunk[0]),
                        ));
                    }
                }
            }
        }
        let end = self.next_seq();
        put_message(&mut buf, NFNL_MSG_BATCH_END, NLM_F_REQUEST, end, 0, NFNL_SUBSYS_NFTABLES, |_| Ok(()))?;
        if messages.is_empty() {
            return Ok(0);
        }
        self.send_all(&buf)?;
        self.read_acks(&messages)?;
        Ok(written)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// The kernel processes a batch only when it arrives as one datagram, so the socket's send
    /// buffer is raised to fit it (as nft does).
    fn send_all(&self, buf: &[u8]) -> Result<(), NftError> {
        // Each acknowledgement echoes its request, and all of them are queued while the kernel
        // processes the batch, before ferry reads any: the receive buffer must hold a batch too.
        let size = buf.len().saturating_add(64 * 1024);
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&self.fd, sockopt::SndBufForce, &size).map_err(|e| NftError::Netlink(e.into()))?;
        setsockopt(&self.fd, sockopt::RcvBufForce, &size).map_err(|e| NftError::Netlink(e.into()))?;
        let sent =
            send(self.fd.as_raw_fd(), buf, MsgFlags::empty()).map_err(|e| NftError::Netlink(e.into()))?;
        if sent != buf.len() {
            return Err(NftError::Netlink(io::Error::other(format!("sent {sent} of {} bytes", buf.len()))));
        }
        Ok(())
    }

    /// Every message asked for an ACK: read until all arrived; the first error fails the batch
    /// (the kernel then aborts the whole transaction).
    fn read_acks(&self, messages: &[(u32, String)]) -> Result<(), NftError> {
        let mut pending: std::collections::HashSet<u32> = messages.iter().map(|(s, _)| *s).collect();
        let mut first_error: Option<NftError> = None;
        let mut buf = vec![0u8; 64 * 1024];
        while !pending.is_empty() {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| NftError::Netlink(e.into()))?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
                let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
                let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or_default());
                if len < 16 || off + len > n {
                    return Err(NftError::Netlink(io::Error::other("truncated netlink reply")));
                }
                // Replies to an earlier, abandoned batch carry sequence numbers not asked for.
                if ty == NLMSG_ERROR && len >= 20 && pending.contains(&seq) {
                    let errno = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or_default());
                    pending.remove(&seq);
                    if errno != 0 && first_error.is_none() {
                        let what = messages.iter().find(|(s, _)| *s == seq).map_or("?", |(_, w)| w.as_str());
                        first_error = Some(NftError::Rejected {
                            stderr: format!("{}: {what}", io::Error::from_raw_os_error(-errno)),
                        });
                        // The kernel aborts the batch at the first error and acknowledges
                        // nothing after it.
                        pending.clear();
                    }
                }
                off += (len + 3) & !3;
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn open_socket() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    // A lost acknowledgement must fail the sync, not hang the daemon.
    let timeout = nix::sys::time::TimeVal::new(10, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
    Ok(fd)
}

fn msg_type(nft_msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | nft_msg
}

fn put_message(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), NftError>,
) -> Result<(), NftError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    body(buf)?;
    let len = u32::try_from(buf.len() - start)
        .map_err(|_| NftError::Netlink(io::Error::other("message too large")))?;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    Ok(())
}

fn put_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize((buf.len() + 3) & !3, 0);
}

fn put_str(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let mut data = s.as_bytes().to_vec();
    data.push(0);
    put_attr(buf, ty, &data);
}

fn nested(
    buf: &mut Vec<u8>,
    ty: u16,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), NftError>,
) -> Result<(), NftError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    body(buf)?;
    let len = u16::try_from(buf.len() - start)
        .map_err(|_| NftError::Netlink(io::Error::other("attribute too large")))?;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    Ok(())
}

fn put_element(buf: &mut Vec<u8>, text: &str, with_value: bool) -> Result<(), NftError> {
    let (key, value) = match text.split_once(" : ") {
        Some((k, v)) => (k, Some(v)),
        None => (text, None),
    };
    let key = encode_concat(key)?;
    nested(buf, NFTA_SET_ELEM_KEY, |b| {
        put_attr(b, NFTA_DATA_VALUE, &key);
        Ok(())
    })?;
    if let (true, Some(v)) = (with_value, value) {
        nested(buf, NFTA_SET_ELEM_DATA, |b| put_value(b, v))?;
    }
    Ok(())
}

fn put_value(buf: &mut Vec<u8>, v: &str) -> Result<(), NftError> {
    let verdict = |b: &mut Vec<u8>, code: i32, chain: Option<&str>| {
        nested(b, NFTA_DATA_VERDICT, |b| {
            put_attr(b, NFTA_VERDICT_CODE, &code.to_be_bytes());
            if let Some(c) = chain {
                put_str(b, NFTA_VERDICT_CHAIN, c);
            }
            Ok(())
        })
    };
    if let Some(chain) = v.strip_prefix("goto ") {
        verdict(buf, NFT_GOTO, Some(chain))
    } else if let Some(chain) = v.strip_prefix("jump ") {
        verdict(buf, NFT_JUMP, Some(chain))
    } else if v == "drop" {
        verdict(buf, NF_DROP, None)
    } else {
        let data = encode_concat(v)?;
        put_attr(buf, NFTA_DATA_VALUE, &data);
        Ok(())
    }
}

/// Encodes `a . b . c` the way nftables lays out a concatenation in registers.
pub fn encode_concat(text: &str) -> Result<Vec<u8>, NftError> {
    let mut out = Vec::with_capacity(40);
    for field in text.split(" . ") {
        let field = field.trim();
        match field {
            "tcp" => out.extend_from_slice(&[6, 0, 0, 0]),
            "udp" => out.extend_from_slice(&[17, 0, 0, 0]),
            "sctp" => out.extend_from_slice(&[132, 0, 0, 0]),
            _ => {
                if let Ok(port) = field.parse::<u16>() {
                    out.extend_from_slice(&port.to_be_bytes());
                    out.extend_from_slice(&[0, 0]);
                } else if let Ok(ip) = field.parse::<IpAddr>() {
                    match ip {
                        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
                        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
                    }
                } else {
                    return Err(NftError::Netlink(io::Error::other(format!(
                        "cannot encode element field {field:?} of {text:?}"
                    ))));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenations_are_padded_to_registers_in_network_order() {
        assert_eq!(
            encode_concat("10.96.0.10 . tcp . 80").unwrap(),
            vec![10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0]
        );
        assert_eq!(encode_concat("udp . 30080").unwrap(), vec![17, 0, 0, 0, 0x75, 0x80, 0, 0]);
        assert_eq!(encode_concat("fd00::1 . 8080").unwrap().len(), 20);
        assert!(encode_concat("10.0.0.0/8").is_err(), "intervals stay with nft");
    }
}
