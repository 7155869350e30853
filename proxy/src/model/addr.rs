//! Address parsing with kube-proxy's tolerance.
//!
//! The API server has historically accepted IPv4 octets with leading zeros ("010.001.002.003"),
//! and kube-proxy parses them "sloppily" as *decimal* (Go's pre-1.17 `net.ParseIP`), so
//! existing objects keep working. ferry does the same so that a cluster migrating from
//! kube-proxy sees identical addresses. Anything else that std rejects is rejected.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// Parses an IP address the way kube-proxy's `ParseIPSloppy` does.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    parse_ipv4_leading_zeros(s).map(IpAddr::V4)
}

/// Parses a CIDR the way kube-proxy's `ParseCIDRSloppy` does; the result is truncated to its
/// network address (a source range "10.0.0.1/8" means 10.0.0.0/8).
pub fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let (addr, len) = s.split_once('/')?;
    let ip = parse_ip_sloppy(addr)?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

fn parse_ipv4_leading_zeros(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// The IP family of an address; ferry plans each family separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }

    /// Parses the Kubernetes spelling used in `spec.ipFamilies` and `addressType`.
    pub fn from_k8s(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }

    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zero_octets_are_read_as_decimal_like_kube_proxy() {
        assert_eq!(parse_ip_sloppy("010.001.002.003"), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(parse_ip_sloppy("10.96.0.010"), Some("10.96.0.10".parse().unwrap()));
    }

    #[test]
    fn malformed_addresses_are_rejected() {
        for bad in ["", "10.0.0", "10.0.0.256", "10.0.0.1.2", "1e.0.0.1", "0010.0.0.1", "::g", "10.0.0.1 x"] {
            assert_eq!(parse_ip_sloppy(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cidrs_are_truncated_and_sloppy() {
        assert_eq!(parse_cidr_sloppy("10.0.0.1/8"), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_cidr_sloppy("010.0.0.0/8"), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_cidr_sloppy("fd00::1/64"), Some("fd00::/64".parse().unwrap()));
        assert_eq!(parse_cidr_sloppy("10.0.0.0/33"), None);
        assert_eq!(parse_cidr_sloppy("10.0.0.0"), None);
        assert_eq!(parse_cidr_sloppy("10.0.0.0/+8"), None);
    }
}
