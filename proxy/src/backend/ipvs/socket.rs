//! A netlink socket in the network namespace ferry programs, with the two exchanges the IPVS
//! backend needs: a request answered by an acknowledgement, and a dump. Generic netlink (IPVS)
//! and rtnetlink (the dummy interface) share it.

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// A lost answer fails the sync instead of hanging the daemon.
const RECV_TIMEOUT_SECS: i64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{op}: {source}")]
    Io { op: String, source: io::Error },
    /// The kernel refused the request with this errno.
    #[error("{op}: {source}")]
    Kernel { op: String, errno: i32, source: io::Error },
    #[error("{op}: cannot decode the kernel's answer: {reason}")]
    Decode { op: String, reason: String },
}

impl SocketError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            SocketError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Encodes `inner` as one netlink message.
pub fn encode<I>(inner: I, flags: u16, seq: u32) -> Vec<u8>
where
    I: NetlinkSerializable + std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    msg.finalize();
    let mut out = vec![0; msg.buffer_len()];
    msg.serialize(&mut out);
    out
}

/// Receives each answer of a dump: message type and payload.
pub type OnMessage<'a> = dyn FnMut(u16, &[u8]) -> Result<(), SocketError> + 'a;
/// Receives each message of a datagram: sequence number, type and payload.
type OnRaw<'a> = dyn FnMut(u32, u16, &[u8]) -> Result<(), SocketError> + 'a;

pub struct NlSocket {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for NlSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NlSocket").field("fd", &self.socket.as_raw_fd()).finish()
    }
}

impl NlSocket {
    /// Opens a socket of netlink `protocol` in this thread's namespace, or in the named one
    /// (`/run/netns/<name>`): a helper thread enters it, and the socket stays bound to the
    /// namespace it was created in.
    pub fn open(protocol: isize, netns: Option<&str>) -> Result<Self, SocketError> {
        let open = move || -> io::Result<Socket> {
            let mut socket = Socket::new(protocol)?;
            socket.bind_auto()?;
            socket.connect(&SocketAddr::new(0, 0))?;
            // Errors echo only the request's header.
            socket.set_cap_ack(true)?;
            setsockopt(&socket, sockopt::ReceiveTimeout, &TimeVal::new(RECV_TIMEOUT_SECS, 0))
                .map_err(io::Error::from)?;
            Ok(socket)
        };
        let socket = in_netns(netns, open)
            .map_err(|source| SocketError::Io { op: "opening a netlink socket".into(), source })?;
        Ok(Self { socket, seq: 0, buf: Vec::with_capacity(64 * 1024) })
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request made with `NLM_F_ACK` and sequence number `seq`, and waits for its answer.
    pub fn request(&mut self, op: &dyn Fn() -> String, bytes: &[u8], seq: u32) -> Result<(), SocketError> {
        self.send(op, bytes)?;
        let mut done = false;
        while !done {
            self.recv(op, &mut |msg_seq, ty, payload| {
                if msg_seq != seq {
                    return Ok(());
                }
                if ty == NLMSG_ERROR {
                    done = true;
                    return ack(op, payload);
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Sends a dump request and hands every answer (message type, payload) to `each`.
    pub fn dump(
        &mut self,
        op: &dyn Fn() -> String,
        bytes: &[u8],
        seq: u32,
        each: &mut OnMessage<'_>,
    ) -> Result<(), SocketError> {
        self.send(op, bytes)?;
        let mut done = false;
        while !done {
            self.recv(op, &mut |msg_seq, ty, payload| {
                if msg_seq != seq {
                    return Ok(());
                }
                match ty {
                    NLMSG_DONE => {
                        done = true;
                        Ok(())
                    }
                    NLMSG_ERROR => {
                        done = true;
                        ack(op, payload)
                    }
                    NLMSG_NOOP => Ok(()),
                    _ => each(ty, payload),
                }
            })?;
        }
        Ok(())
    }

    fn send(&self, op: &dyn Fn() -> String, bytes: &[u8]) -> Result<(), SocketError> {
        let sent = self.socket.send(bytes, 0).map_err(|source| SocketError::Io { op: op(), source })?;
        if sent != bytes.len() {
            return Err(SocketError::Io { op: op(), source: io::Error::other("short send") });
        }
        Ok(())
    }

    /// Receives one datagram and hands each message in it to `each` (sequence, type, payload).
    fn recv(&mut self, op: &dyn Fn() -> String, each: &mut OnRaw<'_>) -> Result<(), SocketError> {
        self.buf.clear();
        let n = self.socket.recv(&mut self.buf, 0).map_err(|source| {
            let source = if source.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {RECV_TIMEOUT_SECS} s"))
            } else {
                source
            };
            SocketError::Io { op: op(), source }
        })?;
        let mut bytes = self.buf.get(..n).unwrap_or_default();
        while !bytes.is_empty() {
            let msg = NetlinkBuffer::new_checked(bytes)
                .map_err(|e| SocketError::Decode { op: op(), reason: e.to_string() })?;
            let len = msg.length() as usize;
            each(msg.sequence_number(), msg.message_type(), msg.payload())?;
            bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
        Ok(())
    }
}

/// An `NLMSG_ERROR` payload: 0 acknowledges, a negative errno refuses.
fn ack(op: &dyn Fn() -> String, payload: &[u8]) -> Result<(), SocketError> {
    let code = payload
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(i32::from_ne_bytes)
        .ok_or_else(|| SocketError::Decode { op: op(), reason: "short NLMSG_ERROR".into() })?;
    if code == 0 {
        Ok(())
    } else {
        Err(SocketError::Kernel { op: op(), errno: -code, source: io::Error::from_raw_os_error(-code) })
    }
}

/// Runs `f` in this thread's namespace, or on a helper thread inside `/run/netns/<netns>`.
pub fn in_netns<T: Send>(netns: Option<&str>, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let Some(name) = netns else { return f() };
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| -> io::Result<T> {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
    })
}
