//! Echo-who-you-are servers and their clients.
//!
//! A responder answers every TCP connection and every UDP datagram with one line,
//! `<its own address:port> <the peer's address:port>\n` (IPv6 as `[addr]:port`), then closes
//! the connection. The client side parses that into a [`Reply`], so a test sees both which
//! endpoint served (after DNAT, the pod's address) and which source that endpoint saw (the
//! client's own address, or the node's when masqueraded).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::{Error, Netns, Result};

/// How often a responder checks whether its sandbox is being dropped.
const POLL: Duration = Duration::from_millis(100);

/// Largest reply a client accepts.
const MAX_REPLY: u64 = 1024;

/// Transport protocol of a responder or request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    /// Lower case, as in `ferry trace --to IP:PORT/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// What a responder answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reply {
    /// The responder's own address: the endpoint that served (after any DNAT).
    pub server: SocketAddr,
    /// The source address the responder saw: the client's, or the masquerading node's.
    pub peer: SocketAddr,
}

impl Reply {
    /// Parses a responder's line `<server> <peer>`.
    pub fn parse(line: &str) -> Option<Self> {
        let (server, peer) = line.trim_end().split_once(' ')?;
        Some(Self { server: server.parse().ok()?, peer: peer.parse().ok()? })
    }

    fn line(server: SocketAddr, peer: SocketAddr) -> String {
        // A dual-stack socket sees IPv4 peers as ::ffff:a.b.c.d; report them as IPv4.
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        format!("{} {}\n", canonical(server), canonical(peer))
    }
}

/// A running responder; see [`Netns::responder`]. It runs until the sandbox is dropped.
#[derive(Clone, Debug)]
pub struct Responder {
    addr: SocketAddr,
    proto: Proto,
    served: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
}

impl Responder {
    /// The address it listens on (with the actual port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// How many connections or datagrams it received (counted before answering).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// False once its thread has ended (after the sandbox was dropped).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}

/// Clears the running flag when the responder thread ends, however it ends.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Netns {
    /// Starts a responder on `ip:port` (port 0 picks one) inside this namespace, on a thread
    /// that entered it; returns once it is listening. It stops when the sandbox is dropped.
    ///
    /// Bind a specific address: a UDP responder on an unspecified address (`0.0.0.0`) would
    /// report that address as its own and let routing pick its replies' source.
    pub fn responder(&self, ip: IpAddr, port: u16, proto: Proto) -> Result<Responder> {
        let shared = self.shared()?;
        let stop = shared.stop_flag();
        let file = self.open()?;
        let addr = SocketAddr::new(ip, port);
        let served = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<SocketAddr>>();
        let ns = self.name().to_owned();
        let thread = {
            let served = Arc::clone(&served);
            let running = Running(Arc::clone(&running));
            let thread_ns = ns.clone();
            std::thread::Builder::new()
                .name(format!("responder {proto} {addr}"))
                .spawn(move || {
                    let ns = thread_ns;
                    let _running = running;
                    let bound = setns(&file, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| Error::Enter { ns: ns.clone(), source: e.into() })
                        .and_then(|()| {
                            Listener::bind(addr, proto).map_err(|source| Error::Io {
                                what: format!("binding a {proto} responder to {addr} in {ns}"),
                                source,
                            })
                        });
                    drop(file);
                    match bound {
                        Ok((listener, local)) => {
                            // The caller may have given up waiting; serve anyway until stopped.
                            let _ = ready_tx.send(Ok(local));
                            listener.serve(&stop, &served);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|source| Error::Io {
                    what: format!("starting a responder thread for {ns}"),
                    source,
                })?
        };
        shared.add_responder(thread);
        let addr = ready_rx.recv().map_err(|_| Error::Io {
            what: format!("starting the {proto} responder on {addr} in {ns}"),
            source: io::Error::other("responder thread ended before it was ready"),
        })??;
        Ok(Responder { addr, proto, served, running })
    }

    /// Connects over TCP to `target` from inside this namespace and returns the responder's
    /// reply. `timeout` bounds the connect and each read.
    pub fn tcp_request(&self, target: SocketAddr, timeout: Duration) -> Result<Reply> {
        self.request(Proto::Tcp, None, target, timeout)
    }

    /// [`tcp_request`](Self::tcp_request) from a given local address (port 0: any port).
    pub fn tcp_request_from(
        &self,
        source: SocketAddr,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Reply> {
        self.request(Proto::Tcp, Some(source), target, timeout)
    }

    /// Sends one UDP datagram to `target` from inside this namespace and returns the reply. The
    /// socket is connected, so only a reply from `target` itself counts (as after a correct
    /// reverse NAT); an ICMP port unreachable makes [`Error::is_refused`] true.
    pub fn udp_request(&self, target: SocketAddr, timeout: Duration) -> Result<Reply> {
        self.request(Proto::Udp, None, target, timeout)
    }

    /// [`udp_request`](Self::udp_request) from a given local address (port 0: any port).
    pub fn udp_request_from(
        &self,
        source: SocketAddr,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Reply> {
        self.request(Proto::Udp, Some(source), target, timeout)
    }

    /// One request to a responder; `source` optionally binds the client's local address.
    pub fn request(
        &self,
        proto: Proto,
        source: Option<SocketAddr>,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Reply> {
        let text = self
            .run(|| match proto {
                Proto::Tcp => tcp_exchange(source, target, timeout),
                Proto::Udp => udp_exchange(source, target, timeout),
            })?
            .map_err(|source| Error::Request { ns: self.name().to_owned(), proto, target, source })?;
        Reply::parse(&text).ok_or(Error::BadReply { target, reply: text })
    }
}

enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Listener {
    fn bind(addr: SocketAddr, proto: Proto) -> io::Result<(Self, SocketAddr)> {
        match proto {
            Proto::Tcp => {
                let listener = TcpListener::bind(addr)?;
                // accept() honours SO_RCVTIMEO, so the loop can check the stop flag.
                setsockopt(&listener, sockopt::ReceiveTimeout, &timeval(POLL))?;
                let local = listener.local_addr()?;
                Ok((Self::Tcp(listener), local))
            }
            Proto::Udp => {
                let socket = UdpSocket::bind(addr)?;
                socket.set_read_timeout(Some(POLL))?;
                let local = socket.local_addr()?;
                Ok((Self::Udp(socket), local))
            }
        }
    }

    fn serve(self, stop: &AtomicBool, served: &AtomicU64) {
        match self {
            Self::Tcp(listener) => {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            // Counted first, so a client that has its reply sees the count.
                            served.fetch_add(1, Ordering::Relaxed);
                            // A client that went away needs no answer.
                            let _ = answer_tcp(stream, peer);
                        }
                        Err(e) if is_retry(&e) => {}
                        // E.g. out of file descriptors: back off rather than spin.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }
            Self::Udp(socket) => {
                let Ok(local) = socket.local_addr() else {
                    return;
                };
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    match socket.recv_from(&mut buf) {
                        Ok((_, peer)) => {
                            served.fetch_add(1, Ordering::Relaxed);
                            // Best effort, like any UDP server.
                            let _ = socket.send_to(Reply::line(local, peer).as_bytes(), peer);
                        }
                        Err(e) if is_retry(&e) => {}
                        // ICMP errors from earlier replies surface here; ignore them.
                        Err(_) => {}
                    }
                }
            }
        }
    }
}

fn answer_tcp(mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let local = stream.local_addr()?;
    stream.write_all(Reply::line(local, peer).as_bytes())
}

fn is_retry(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

fn tcp_exchange(source: Option<SocketAddr>, target: SocketAddr, timeout: Duration) -> io::Result<String> {
    let fd = socket(family_of(target), SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // connect() honours SO_SNDTIMEO (failing with EINPROGRESS), reads SO_RCVTIMEO.
    setsockopt(&fd, sockopt::SendTimeout, &timeval(timeout))?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeval(timeout))?;
    if let Some(source) = source {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        bind(fd.as_raw_fd(), &SockaddrStorage::from(source))?;
    }
    connect(fd.as_raw_fd(), &SockaddrStorage::from(target)).map_err(|e| match e {
        Errno::EINPROGRESS | Errno::EAGAIN | Errno::ETIMEDOUT => timed_out(timeout),
        e => e.into(),
    })?;
    let mut reply = String::new();
    TcpStream::from(fd).take(MAX_REPLY).read_to_string(&mut reply).map_err(|e| normalize(e, timeout))?;
    Ok(reply)
}

fn udp_exchange(source: Option<SocketAddr>, target: SocketAddr, timeout: Duration) -> io::Result<String> {
    let fd = socket(family_of(target), SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    if let Some(source) = source {
        // A caller reusing the source port of its previous request may find that socket still
        // open: a process another test thread forked in the meantime holds a copy of every fd
        // until its exec closes them. Both sockets carry SO_REUSEADDR, so the bind succeeds;
        // the replies still reach this one, the only socket connected to `target`.
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        bind(fd.as_raw_fd(), &SockaddrStorage::from(source))?;
    }
    let socket = UdpSocket::from(fd);
    socket.connect(target)?;
    socket.set_read_timeout(Some(nonzero(timeout)))?;
    socket.send(b"who\n")?;
    let mut buf = [0u8; MAX_REPLY as usize];
    let n = socket.recv(&mut buf).map_err(|e| normalize(e, timeout))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn family_of(target: SocketAddr) -> AddressFamily {
    match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn normalize(e: io::Error, timeout: Duration) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock { timed_out(timeout) } else { e }
}

fn timed_out(timeout: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))
}

/// Zero means "no timeout" to the socket options; make it the shortest real one instead.
fn nonzero(timeout: Duration) -> Duration {
    timeout.max(Duration::from_millis(1))
}

fn timeval(timeout: Duration) -> TimeVal {
    let micros = i64::try_from(nonzero(timeout).as_micros()).unwrap_or(i64::MAX / 2);
    TimeVal::microseconds(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("a valid socket address")
    }

    #[test]
    fn reply_should_round_trip_ipv4_and_ipv6() {
        let v4 = Reply::line(addr("10.0.1.10:8080"), addr("10.0.1.2:40000"));
        assert_eq!(v4, "10.0.1.10:8080 10.0.1.2:40000\n");
        let v6 = Reply::line(addr("[fd00:10::1:10]:8080"), addr("[::ffff:10.0.1.2]:40000"));
        assert_eq!(v6, "[fd00:10::1:10]:8080 10.0.1.2:40000\n");
        let reply = Reply::parse(&v6).expect("a valid reply");
        assert_eq!(reply.server, addr("[fd00:10::1:10]:8080"));
        assert_eq!(reply.peer, addr("10.0.1.2:40000"));
        assert_eq!(Reply::parse("garbage"), None);
    }
}
