//! The ready-made topology of DESIGN.md, for the nftables and eBPF suites and the demo.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::{Error, Netns, Proto, Result, Sandbox};

/// First host number of the pods (`10.0.1.10`, …); `.1` is the gateway, `.2` the client.
const FIRST_POD: usize = 10;
const CLIENT_HOST: u8 = 2;
const GATEWAY_HOST: u8 = 1;
const MAX_PODS: usize = 240;

/// What to build; [`Default`] gives two local pods, one remote pod and responders on 8080.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Pods on `node` (besides the client pod).
    pub local_pods: usize,
    /// Pods on `node2`.
    pub remote_pods: usize,
    /// When set, every pod (client included) runs TCP and UDP responders on this port, on its
    /// IPv4 and its IPv6 address.
    pub responder_port: Option<u16>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self { local_pods: 2, remote_pods: 1, responder_port: Some(8080) }
    }
}

/// A namespace with one address per family on `iface` (the external client).
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: Netns,
    pub iface: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Host {
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ip4.into(), self.ip6.into()]
    }
}

/// A node namespace: its LAN addresses and the pod CIDR it routes to its pods.
#[derive(Clone, Debug)]
pub struct Node {
    /// `node` or `node2`, also the Kubernetes node name.
    pub name: String,
    pub ns: Netns,
    /// The LAN interface (`eth0`).
    pub iface: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub pod_cidr4: Ipv4Net,
    pub pod_cidr6: Ipv6Net,
    /// Gateway address of its pods, on every pod veth's node side.
    pub gateway4: Ipv4Addr,
    pub gateway6: Ipv6Addr,
}

impl Node {
    /// The node IPs (what `--node-ip` lists).
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ip4.into(), self.ip6.into()]
    }
}

/// A pod namespace with one address per family on `eth0`.
#[derive(Clone, Debug)]
pub struct Pod {
    /// `client`, `pod<i>` or `rpod<i>`; also the name of its veth on the node side.
    pub name: String,
    pub ns: Netns,
    /// The name of the node it runs on.
    pub node: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Pod {
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ip4.into(), self.ip6.into()]
    }

    /// Its IPv4 address with `port`.
    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip4.into(), port)
    }

    /// Its IPv6 address with `port`.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip6.into(), port)
    }
}

/// The topology of DESIGN.md, built by [`Cluster::build`]. All addresses are fields, so tests
/// don't repeat them.
///
/// ```text
///   ext (192.168.0.100, fd00::100)          routes the service CIDRs via node
///    │
///   lan: bridge br0 ─── node2 (192.168.0.11, fd00::11) ─┬─ rpod0 (10.0.2.10, fd00:10::2:10)
///    │                                                   └─ …
///   node (192.168.0.10, fd00::10)
///    ├─ client (10.0.1.2, fd00:10::1:2)
///    ├─ pod0   (10.0.1.10, fd00:10::1:10)
///    └─ …
/// ```
/// Each pod sits on its own veth (`eth0` in the pod, `client`/`pod<i>`/`rpod<i>` on the node),
/// like the ptp CNI plugin: the node side holds the pod CIDR's gateway address (`10.0.1.1/32`,
/// `fd00:10::1:1/128`, the same on every pod veth) and a host route to the pod; the pod holds a
/// /32 and /128 with a default route via that gateway. The nodes route each other's pod CIDRs.
/// Cluster CIDRs are `10.0.0.0/16` and `fd00:10::/64`, service CIDRs `10.96.0.0/16` and
/// `fd00:96::/112`. Nothing leads out of the sandbox: the LAN bridge has no uplink.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// The LAN segment: a bridge joining `node`, `node2` and `ext`. Holds no addresses.
    pub lan: Netns,
    /// Where ferry runs.
    pub node: Node,
    /// The other node, holding the remote pods.
    pub node2: Node,
    /// A client outside the cluster, on the LAN, with routes to the service CIDRs via `node`.
    pub ext: Host,
    /// A client pod on `node`.
    pub client: Pod,
    /// Pods on `node`.
    pub pods: Vec<Pod>,
    /// Pods on `node2`.
    pub remote_pods: Vec<Pod>,
    pub cluster_cidr4: Ipv4Net,
    pub cluster_cidr6: Ipv6Net,
    pub service_cidr4: Ipv4Net,
    pub service_cidr6: Ipv6Net,
    /// The port of the pods' responders, if started.
    pub responder_port: Option<u16>,
}

impl Cluster {
    /// Builds the topology in `sb` and starts the pods' responders.
    pub fn build(sb: &Sandbox, spec: &ClusterSpec) -> Result<Self> {
        if spec.local_pods > MAX_PODS || spec.remote_pods > MAX_PODS {
            return Err(Error::Invalid {
                what: "cluster spec",
                value: format!("{spec:?}"),
                reason: "at most 240 pods per node",
            });
        }
        let cluster_cidr4 = net4(Ipv4Addr::new(10, 0, 0, 0), 16)?;
        let cluster_cidr6 = net6(ip6(10, 0, 0), 64)?;
        let service_cidr4 = net4(Ipv4Addr::new(10, 96, 0, 0), 16)?;
        let service_cidr6 = net6(ip6(96, 0, 0), 112)?;

        let lan = sb.netns("lan")?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;

        let node = Self::node(sb, &lan, "node", 10, 1)?;
        let node2 = Self::node(sb, &lan, "node2", 11, 2)?;
        let ext_ns = sb.netns("ext")?;
        let ext = Host {
            ip4: Ipv4Addr::new(192, 168, 0, 100),
            ip6: ip6(0, 0, 100),
            iface: "eth0".to_owned(),
            ns: ext_ns,
        };
        Self::join_lan(sb, &lan, "ext", &ext.ns, ext.ip4, ext.ip6)?;
        ext.ns.route_via(&service_cidr4.to_string(), node.ip4.into())?;
        ext.ns.route_via(&service_cidr6.to_string(), node.ip6.into())?;

        // Each node reaches the other's pods through the other node.
        for (from, to) in [(&node, &node2), (&node2, &node)] {
            from.ns.route_via(&to.pod_cidr4.to_string(), to.ip4.into())?;
            from.ns.route_via(&to.pod_cidr6.to_string(), to.ip6.into())?;
        }

        let client = Self::pod(sb, &node, "client", CLIENT_HOST)?;
        let pods = (0..spec.local_pods)
            .map(|i| Self::pod(sb, &node, &format!("pod{i}"), host_number(i)))
            .collect::<Result<Vec<_>>>()?;
        let remote_pods = (0..spec.remote_pods)
            .map(|i| Self::pod(sb, &node2, &format!("rpod{i}"), host_number(i)))
            .collect::<Result<Vec<_>>>()?;

        if let Some(port) = spec.responder_port {
            for pod in std::iter::once(&client).chain(&pods).chain(&remote_pods) {
                for ip in pod.ips() {
                    for proto in [Proto::Tcp, Proto::Udp] {
                        pod.ns.responder(ip, port, proto)?;
                    }
                }
            }
        }

        Ok(Self {
            lan,
            node,
            node2,
            ext,
            client,
            pods,
            remote_pods,
            cluster_cidr4,
            cluster_cidr6,
            service_cidr4,
            service_cidr6,
            responder_port: spec.responder_port,
        })
    }

    /// All pods: the client, the local pods, then the remote pods.
    pub fn all_pods(&self) -> impl Iterator<Item = &Pod> {
        std::iter::once(&self.client).chain(&self.pods).chain(&self.remote_pods)
    }

    /// `ferry run|render|trace` flags describing `node`: `--node-name`, `--node-ip`,
    /// `--cluster-cidr` and `--service-cidr` for both families.
    pub fn node_flags(&self) -> Vec<String> {
        let mut flags = vec!["--node-name".to_owned(), self.node.name.clone()];
        for ip in self.node.ips() {
            flags.extend(["--node-ip".to_owned(), ip.to_string()]);
        }
        for cidr in [self.cluster_cidr4.to_string(), self.cluster_cidr6.to_string()] {
            flags.extend(["--cluster-cidr".to_owned(), cidr]);
        }
        for cidr in [self.service_cidr4.to_string(), self.service_cidr6.to_string()] {
            flags.extend(["--service-cidr".to_owned(), cidr]);
        }
        flags
    }

    /// A node on the LAN: `192.168.0.<lan_host>`, `fd00::<lan_host>`, pods in
    /// `10.0.<index>.0/24` and `fd00:10::<index>:0/112`.
    fn node(sb: &Sandbox, lan: &Netns, name: &str, lan_host: u8, index: u8) -> Result<Node> {
        let ns = sb.netns(name)?;
        let node = Node {
            name: name.to_owned(),
            iface: "eth0".to_owned(),
            ip4: Ipv4Addr::new(192, 168, 0, lan_host),
            ip6: ip6(0, 0, lan_host),
            pod_cidr4: net4(Ipv4Addr::new(10, 0, index, 0), 24)?,
            pod_cidr6: net6(ip6(10, index, 0), 112)?,
            gateway4: Ipv4Addr::new(10, 0, index, GATEWAY_HOST),
            gateway6: ip6(10, index, GATEWAY_HOST),
            ns,
        };
        Self::join_lan(sb, lan, name, &node.ns, node.ip4, node.ip6)?;
        Ok(node)
    }

    /// Plugs `ns` into the LAN bridge as `eth0`, with /24 and /64 addresses.
    fn join_lan(
        sb: &Sandbox,
        lan: &Netns,
        port: &str,
        ns: &Netns,
        ip4: Ipv4Addr,
        ip6: Ipv6Addr,
    ) -> Result<()> {
        sb.link(lan, port, ns, "eth0")?;
        lan.ip(&["link", "set", port, "master", "br0"])?;
        ns.addr("eth0", &format!("{ip4}/24"))?;
        ns.addr("eth0", &format!("{ip6}/64"))
    }

    /// A pod on `node` with host number `host` in its pod CIDRs (the IPv6 address uses the same
    /// digits: host 10 is `10.0.1.10` and `fd00:10::1:10`).
    fn pod(sb: &Sandbox, node: &Node, name: &str, host: u8) -> Result<Pod> {
        let ns = sb.netns(name)?;
        let octets = node.pod_cidr4.network().octets();
        let ip4 = Ipv4Addr::new(octets[0], octets[1], octets[2], host);
        let index = octets[2];
        let v6 = ip6(10, index, host);
        sb.link(&node.ns, name, &ns, "eth0")?;
        node.ns.addr(name, &format!("{}/32", node.gateway4))?;
        node.ns.addr(name, &format!("{}/128", node.gateway6))?;
        node.ns.route_dev(&format!("{ip4}/32"), name)?;
        node.ns.route_dev(&format!("{v6}/128"), name)?;
        ns.addr("eth0", &format!("{ip4}/32"))?;
        ns.addr("eth0", &format!("{v6}/128"))?;
        ns.route_dev(&format!("{}/32", node.gateway4), "eth0")?;
        ns.route_dev(&format!("{}/128", node.gateway6), "eth0")?;
        ns.route_via("default", node.gateway4.into())?;
        ns.route_via("default", node.gateway6.into())?;
        Ok(Pod { name: name.to_owned(), ns, node: node.name.clone(), ip4, ip6: v6 })
    }
}

fn host_number(i: usize) -> u8 {
    // Bounded by MAX_PODS in `build`.
    u8::try_from(FIRST_POD + i).unwrap_or(u8::MAX)
}

/// `fd00:<a>::<b>:<c>` written with the decimal digits of `a`, `b` and `c`, so that IPv6
/// addresses read like their IPv4 twins (`10.0.1.10` ↔ `fd00:10::1:10`).
fn ip6(a: u8, b: u8, c: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, same_digits(a), 0, 0, 0, 0, same_digits(b), same_digits(c))
}

/// The hex number written with the decimal digits of `n`: 10 → 0x10.
fn same_digits(n: u8) -> u16 {
    let n = u16::from(n);
    n / 100 * 0x100 + n / 10 % 10 * 0x10 + n % 10
}

fn net4(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Net> {
    Ipv4Net::new(addr, prefix).map_err(|_| Error::Invalid {
        what: "IPv4 prefix",
        value: format!("{addr}/{prefix}"),
        reason: "prefix too long",
    })
}

fn net6(addr: Ipv6Addr, prefix: u8) -> Result<Ipv6Net> {
    Ipv6Net::new(addr, prefix).map_err(|_| Error::Invalid {
        what: "IPv6 prefix",
        value: format!("{addr}/{prefix}"),
        reason: "prefix too long",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_should_read_like_their_ipv4_twins() {
        assert_eq!(ip6(10, 1, 10).to_string(), "fd00:10::1:10");
        assert_eq!(ip6(0, 0, 100).to_string(), "fd00::100");
        assert_eq!(ip6(10, 2, 250).to_string(), "fd00:10::2:250");
        assert_eq!(ip6(96, 0, 0).to_string(), "fd00:96::");
    }
}
