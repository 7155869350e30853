//! A client process for the kernel tests: requests to a sandbox responder from inside a network
//! namespace, optionally from inside a cgroup v2 directory first.
//!
//! The end-to-end suites use it to play "a process of the node": eBPF's socket programs act on
//! sockets by the cgroup of the process that created them, and a cgroup holds whole processes,
//! so such a client cannot be a thread of the test. It moves itself into the cgroup *before*
//! entering the namespace (`ip netns exec` would hide the cgroup hierarchy behind a fresh /sys).
//!
//! ```text
//! sandbox-client NETNS_PATH CGROUP_DIR|- tcp|udp TARGET COUNT TIMEOUT_MS
//! ```
//! prints one line per request: `ok <server> <peer>` (the responder's reply) or
//! `err <refused|timeout|other> <message>`.

use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [netns, cgroup, proto, target, count, timeout_ms] = args.as_slice() else {
        bail!("usage: sandbox-client NETNS_PATH CGROUP_DIR|- tcp|udp TARGET COUNT TIMEOUT_MS");
    };
    let target: SocketAddr = target.parse().with_context(|| format!("target {target}"))?;
    let count: usize = count.parse().with_context(|| format!("count {count}"))?;
    let timeout = Duration::from_millis(timeout_ms.parse().with_context(|| format!("timeout {timeout_ms}"))?);
    if cgroup != "-" {
        let procs = std::path::Path::new(cgroup).join("cgroup.procs");
        // "0" moves the writing process; its sockets are created afterwards, so they belong here.
        std::fs::write(&procs, "0").with_context(|| format!("joining {}", procs.display()))?;
    }
    let ns = File::open(netns).with_context(|| format!("opening {netns}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {netns}"))?;
    for _ in 0..count {
        let result = match proto.as_str() {
            "tcp" => tcp(target, timeout),
            "udp" => udp(target, timeout),
            other => bail!("protocol {other}: tcp or udp"),
        };
        match result {
            Ok(line) => println!("ok {}", line.trim_end()),
            Err(e) => {
                let kind = match e.kind() {
                    io::ErrorKind::ConnectionRefused => "refused",
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout",
                    _ => "other",
                };
                println!("err {kind} {e}");
            }
        }
    }
    Ok(())
}

fn tcp(target: SocketAddr, timeout: Duration) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    stream.take(1024).read_to_string(&mut line)?;
    Ok(line)
}

fn udp(target: SocketAddr, timeout: Duration) -> io::Result<String> {
    let any: IpAddr =
        if target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
    // Connected: only a reply from the target itself counts, and ICMP errors surface.
    socket.connect(target)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(b"?\n")?;
    let mut buf = [0u8; 1024];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
