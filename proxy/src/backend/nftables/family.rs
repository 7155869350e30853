//! Per-family spellings of nftables syntax.

use crate::model::IpFamily;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fam {
    pub family: IpFamily,
    /// Table family and payload protocol keyword: `ip` or `ip6`.
    pub ip: &'static str,
    pub addr_type: &'static str,
    pub loopback: &'static str,
}

pub const V4: Fam = Fam { family: IpFamily::V4, ip: "ip", addr_type: "ipv4_addr", loopback: "127.0.0.0/8" };
pub const V6: Fam = Fam { family: IpFamily::V6, ip: "ip6", addr_type: "ipv6_addr", loopback: "::1" };

impl Fam {
    pub fn of(family: IpFamily) -> Fam {
        match family {
            IpFamily::V4 => V4,
            IpFamily::V6 => V6,
        }
    }
}
