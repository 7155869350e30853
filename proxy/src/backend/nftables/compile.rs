//! Compiles one service port into its share of ferry's nftables state: map and set elements
//! keyed by its frontends, and chains only where a service needs its own (session affinity).
//!
//! Dispatch never walks a list of services: every frontend is one element in a verdict map,
//! and endpoint choice is one lookup keyed by `frontend . numgen random mod N` in a shared
//! `pick_<space>_<N>_<hash>` chain. See README.md in this directory for the whole layout.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;

use super::family::Fam;
use crate::plan::ServicePortPlan;

/// A set or map element: the set it belongs to, its key, and (for maps) its value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub set: SetRef,
    pub key: String,
    pub value: Option<String>,
}

/// Which set an element belongs to: a fixed one of the layout, or the endpoint map of one
/// slot of one key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetRef {
    Fixed(&'static str),
    Slot(Space, usize),
}

impl std::fmt::Display for SetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetRef::Fixed(name) => f.write_str(name),
            SetRef::Slot(space, i) => write!(f, "{}_eps_{i}", space.tag()),
        }
    }
}

/// A chain owned by one service port, rewritten whole when it changes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnedChain {
    pub name: String,
    pub rules: Vec<String>,
}

/// A dynamic set owned by one service port (session affinity), kept across syncs so that
/// client affinity survives them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnedSet {
    pub name: String,
    pub timeout: u32,
}

/// Everything one service port puts into the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contribution {
    pub elements: Vec<Element>,
    pub chains: Vec<OwnedChain>,
    pub sets: Vec<OwnedSet>,
    /// Shared `pick_<space>_<N>` chains its map values jump to.
    pub pick_chains: Vec<PickChain>,
}

/// The key spaces of endpoint maps: frontends keyed by address (ClusterIP, LoadBalancer,
/// external IPs) or by port alone (NodePorts), each in a normal and a short-circuit variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Space {
    Ip,
    IpShortCircuit,
    NodePort,
    NodePortShortCircuit,
}

impl Space {
    pub const ALL: [Space; 4] =
        [Space::Ip, Space::IpShortCircuit, Space::NodePort, Space::NodePortShortCircuit];

    /// Verdict map from frontend to its endpoint choice.
    pub fn frontend_map(self) -> &'static str {
        match self {
            Space::Ip => "frontends",
            Space::IpShortCircuit => "frontends_sc",
            Space::NodePort => "nodeports",
            Space::NodePortShortCircuit => "nodeports_sc",
        }
    }

    pub fn tag(self) -> &'static str {
        match self {
            Space::Ip => "ip",
            Space::IpShortCircuit => "ipsc",
            Space::NodePort => "np",
            Space::NodePortShortCircuit => "npsc",
        }
    }

    pub fn is_nodeport(self) -> bool {
        matches!(self, Space::NodePort | Space::NodePortShortCircuit)
    }

    /// The packet expression matching this space's frontend keys.
    pub fn key_expr(self, fam: Fam) -> String {
        if self.is_nodeport() {
            "meta l4proto . th dport".to_owned()
        } else {
            format!("{} daddr . meta l4proto . th dport", fam.ip)
        }
    }
}

/// `pick_<space>_<n>_<hash>`: chooses uniformly among slots `0..n` of whatever frontend
/// jumped here.
///
/// Slot `i` of a space is a map `<space>_eps_<i>` from frontend to endpoint and a chain
/// `<space>_ep_<i>_<hash>` that DNATs through it. (A single map keyed by `frontend . numgen`
/// would save the hop, but nft 1.0.6 cannot reload a map whose `typeof` data concatenates an
/// address and a port, so ferry keeps to plain `type` declarations.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PickChain {
    pub space: Space,
    pub n: usize,
}

impl PickChain {
    pub fn name(&self, fam: Fam) -> String {
        memoized((NameOf::Pick, self.space, self.n, fam.ip), || {
            content_name(&format!("pick_{}_{}", self.space.tag(), self.n), &[self.rule(fam)])
        })
    }

    pub fn rule(&self, fam: Fam) -> String {
        let targets: Vec<String> =
            (0..self.n).map(|i| format!("{i} : goto {}", slot_chain(self.space, i, fam))).collect();
        format!("numgen random mod {} vmap {{ {} }}", self.n, targets.join(", "))
    }
}

pub fn slot_chain(space: Space, i: usize, fam: Fam) -> String {
    memoized((NameOf::Slot, space, i, fam.ip), || {
        content_name(&format!("{}_ep_{i}", space.tag()), &[slot_rule(space, i, fam)])
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum NameOf {
    Pick,
    Slot,
}

thread_local! {
    /// Pick and slot chain names by (kind, space, count or index, family). A name hashes the
    /// chain's rules, and a full compile asks for a pick chain's name once per service port:
    /// computed each time, that cost about a quarter more on 10,000 services (criterion
    /// `nft_compile_full/10000`: 388 vs 314 ms). The set of keys is bounded by the largest
    /// endpoint count.
    static CHAIN_NAMES: RefCell<HashMap<NameKey, String>> = RefCell::new(HashMap::new());
}

/// (kind, space, count or index, family keyword).
type NameKey = (NameOf, Space, usize, &'static str);

fn memoized(key: NameKey, name: impl FnOnce() -> String) -> String {
    if let Some(known) = CHAIN_NAMES.with(|m| m.borrow().get(&key).cloned()) {
        return known;
    }
    // Computed outside the borrow: a pick chain's name asks for its slot chains' names.
    let computed = name();
    CHAIN_NAMES.with(|m| m.borrow_mut().insert(key, computed.clone()));
    computed
}

/// The name of a chain that chooses endpoints (pick, slot, affinity): `prefix` and a hash of
/// the chain's rules. nft writes a chain and its rules in one transaction, so a chain of that
/// name in the kernel holds exactly these rules, whichever ferry process or version wrote it:
/// a full sync, the first one after a restart included, leaves it alone instead of rewriting it
/// (`FamilyState::kept_chains` says why that matters), and a change of the rules is a new chain.
pub fn content_name(prefix: &str, rules: &[String]) -> String {
    format!("{prefix}_{:08x}", stable_hash(&rules.join("\n")) as u32)
}

pub fn slot_rule(space: Space, i: usize, fam: Fam) -> String {
    format!(
        "meta l4proto {{ tcp, udp, sctp }} dnat {ip} to {key} map @{map}",
        ip = fam.ip,
        key = space.key_expr(fam),
        map = SetRef::Slot(space, i)
    )
}

pub fn slot_map_decl(space: Space, fam: Fam) -> String {
    let key = if space.is_nodeport() {
        "inet_proto . inet_service".to_owned()
    } else {
        format!("{} . inet_proto . inet_service", fam.addr_type)
    };
    format!("type {key} : {} . inet_service;", fam.addr_type)
}

pub const REJECT_VERDICT: &str = "goto reject_chain";

pub fn endpoint_value(ep: &SocketAddr) -> String {
    format!("{} . {}", ep.ip(), ep.port())
}

/// Compiles one service port of one family.
pub fn compile(p: &ServicePortPlan, fam: Fam) -> Contribution {
    let mut c = Contribution::default();
    let proto = p.protocol.as_str();
    let el = |c: &mut Contribution, set: &'static str, key: String, value: Option<String>| {
        c.elements.push(Element { set: SetRef::Fixed(set), key, value });
    };

    // ClusterIP.
    let key = format!("{} . {proto} . {}", p.cluster_ip, p.port);
    let internal = p.internal_endpoints();
    if internal.is_empty() {
        let verdict = if p.has_endpoints { "drop" } else { REJECT_VERDICT };
        el(&mut c, "no_endpoints", key, Some(verdict.to_owned()));
    } else {
        dispatch(&mut c, p, fam, Space::Ip, &key, internal);
    }

    // External frontends: LoadBalancer ingress IPs and external IPs, then the NodePort.
    let mut externals: Vec<(String, bool)> =
        p.external_addresses().map(|a| (format!("{a} . {proto} . {}", p.port), false)).collect();
    if let Some(np) = p.node_port {
        externals.push((format!("{proto} . {np}"), true));
    }
    for (key, nodeport) in externals {
        let (space, sc_space, no_ep, masq, local) = if nodeport {
            (Space::NodePort, Space::NodePortShortCircuit, "no_endpoint_nodeports", "np_masq", "np_local")
        } else {
            (Space::Ip, Space::IpShortCircuit, "no_endpoints", "ext_masq", "ext_local")
        };
        if !p.has_endpoints {
            el(&mut c, no_ep, key, Some(REJECT_VERDICT.to_owned()));
            continue;
        }
        if !p.external_policy_local {
            el(&mut c, masq, key.clone(), None);
            dispatch(&mut c, p, fam, space, &key, &p.cluster_endpoints);
            continue;
        }
        // externalTrafficPolicy Local: pods and the node itself short-circuit to the cluster
        // endpoints; everyone else gets this node's endpoints with the source kept, or DROP.
        el(&mut c, local, key.clone(), None);
        if !p.cluster_endpoints.is_empty() {
            dispatch(&mut c, p, fam, sc_space, &key, &p.cluster_endpoints);
        }
        if p.local_endpoints.is_empty() {
            el(&mut c, no_ep, key, Some("drop".to_owned()));
        } else {
            dispatch(&mut c, p, fam, space, &key, &p.local_endpoints);
        }
    }

    // loadBalancerSourceRanges guard LoadBalancer IPs only; NodePorts bypass them.
    if !p.source_ranges.is_empty() {
        let ranges = ipnet::IpNet::aggregate(&p.source_ranges);
        for lb in &p.load_balancer_ips {
            let key = format!("{lb} . {proto} . {}", p.port);
            for r in &ranges {
                el(&mut c, "firewall_allow", format!("{key} . {r}"), None);
            }
            el(&mut c, "firewall", key, None);
        }
    }
    for ip in &p.hairpin_ips {
        el(&mut c, "hairpin", format!("{ip} . {ip}"), None);
    }
    c
}

/// Routes `key` in `space` to `endpoints`: through the shared pick chain, or through the
/// service's own affinity chain when it has ClientIP session affinity.
fn dispatch(
    c: &mut Contribution,
    p: &ServicePortPlan,
    fam: Fam,
    space: Space,
    key: &str,
    endpoints: &[SocketAddr],
) {
    let map = space.frontend_map();
    match p.affinity_timeout {
        None => {
            let pick = PickChain { space, n: endpoints.len() };
            for (i, ep) in endpoints.iter().enumerate() {
                c.elements.push(Element {
                    set: SetRef::Slot(space, i),
                    key: key.to_owned(),
                    value: Some(endpoint_value(ep)),
                });
            }
            c.elements.push(Element {
                set: SetRef::Fixed(map),
                key: key.to_owned(),
                value: Some(format!("goto {}", pick.name(fam))),
            });
            if !c.pick_chains.contains(&pick) {
                c.pick_chains.push(pick);
            }
        }
        Some(timeout) => {
            let port_hash = stable_hash(&format!("{:?} {key}", space));
            let base = format!("aff_{port_hash:016x}");
            // Every chain here is named by its content (`content_name`): an endpoint change
            // creates a new head, switches the frontend's element to it and deletes the old one,
            // rather than rewriting a chain that new connections may be running. The client-state
            // sets are named by port and endpoint only, so they keep their entries.
            let mut head = Vec::new();
            let mut vmap = String::new();
            for (i, ep) in endpoints.iter().enumerate() {
                let ep_set = format!("{base}_{:08x}", stable_hash(&ep.to_string()) as u32);
                let rules = vec![
                    format!("update @{ep_set} {{ {} saddr }}", fam.ip),
                    format!(
                        "meta l4proto {{ tcp, udp, sctp }} dnat {} to {}",
                        fam.ip,
                        match ep {
                            SocketAddr::V4(a) => a.to_string(),
                            SocketAddr::V6(a) => a.to_string(),
                        }
                    ),
                ];
                let ep_chain = content_name(&ep_set, &rules);
                head.push(format!("{} saddr @{ep_set} goto {ep_chain}", fam.ip));
                let _ = write!(vmap, "{}{i} : goto {ep_chain}", if i == 0 { "" } else { ", " });
                c.sets.push(OwnedSet { name: ep_set, timeout });
                c.chains.push(OwnedChain { name: ep_chain, rules });
            }
            head.push(format!("numgen random mod {} vmap {{ {vmap} }}", endpoints.len()));
            let head_name = content_name(&format!("affh_{port_hash:016x}"), &head);
            c.chains.push(OwnedChain { name: head_name.clone(), rules: head });
            c.elements.push(Element {
                set: SetRef::Fixed(map),
                key: key.to_owned(),
                value: Some(format!("goto {head_name}")),
            });
        }
    }
}

/// FNV-1a: stable across runs and versions (unlike std's hasher), so chain names computed by
/// a restarted ferry match the ones in the kernel.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
