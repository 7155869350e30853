//! What ferry believes is in its table for one family, and the transactions that change it.
//!
//! Elements are owned by service ports. Two ports may claim the same key (two Services listing
//! the same external IP and port); the first owner's value is in force and the next one takes
//! over when it goes, so a conflict never fails a transaction.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::sync::Arc;

use super::compile::{self, Contribution, Element, OwnedChain, OwnedSet, PickChain, SetRef, Space};
use super::family::Fam;
use super::layout;
use crate::plan::{NodeConfig, Plan, PortKey};

pub const TABLE: &str = "ferry";

/// Who claims each set element.
type Owners = HashMap<SetRef, HashMap<String, Claims>>;

/// A service port claiming an element, with the value it wants (None: a set member).
type Claim = (Arc<PortKey>, Option<String>);

/// The claims on one element: the one in force, then those waiting to take over. Nearly every
/// element has a single claimant, so the waiting list stays empty and allocates nothing.
#[derive(Debug)]
struct Claims {
    first: Claim,
    waiting: Vec<Claim>,
}

#[derive(Debug)]
pub struct FamilyState {
    fam: Fam,
    /// Service ports in the state.
    ports: usize,
    /// Chains and dynamic sets of the ports that have any (session affinity). The rest of a
    /// port's contribution lives only in `owners`: when the port changes, its old contribution
    /// is compiled again from the plan diff rather than kept, which at 10,000 services saves
    /// ferry a second copy of every element.
    owned: HashMap<PortKey, (Vec<OwnedChain>, Vec<OwnedSet>)>,
    owners: Owners,
    pick_refs: HashMap<PickChain, usize>,
    /// Endpoint slots created per key space (slot maps and chains `0..n`).
    slots: BTreeMap<Space, usize>,
    /// Plan-wide sets: cluster_ips, service_cidrs, pod_cidrs, nodeport_ips.
    globals: BTreeMap<&'static str, BTreeSet<String>>,
}

/// One transaction being assembled, in the order the kernel needs: new objects before the
/// elements that reference them, deletions of referenced objects after the references go.
#[derive(Debug, Default)]
pub struct Transaction {
    slots_added: Vec<(Space, usize)>,
    /// Chains a full sync leaves as they are ([`FamilyState::kept_chains`]); slot chains
    /// are looked up here (their maps are still declared), `full_split` skips the others.
    chains_kept: BTreeSet<String>,
    sets_added: Vec<OwnedSet>,
    chains_written: Vec<(String, Vec<String>, bool)>,
    elements_deleted: BTreeMap<SetRef, Vec<String>>,
    elements_added: BTreeMap<SetRef, Vec<String>>,
    chains_deleted: Vec<String>,
    sets_deleted: Vec<String>,
    pub operations: usize,
}

impl Transaction {
    pub fn is_empty(&self) -> bool {
        self.operations == 0
    }

    /// The whole transaction as one nft script.
    pub fn render(self, fam: Fam, out: &mut String) {
        let parts = self.split(fam, false);
        out.push_str(&parts.before);
        out.push_str(&parts.after);
    }

    /// The transaction in three steps. With `netlink`, elements of exact-match sets are left
    /// out of the scripts for [`super::netlink`] to write in between: `before` creates what the
    /// elements will reference, `after` removes what they no longer reference. Interval sets
    /// stay in the scripts (added before, removed after). Consumes the transaction so that a
    /// full sync's hundreds of thousands of elements move into the batch instead of being copied.
    pub fn split(self, fam: Fam, netlink: bool) -> Split {
        let t = format!("{} {TABLE}", fam.ip);
        let mut out = String::new();
        for (space, i) in &self.slots_added {
            let map = SetRef::Slot(*space, *i);
            let chain = compile::slot_chain(*space, *i, fam);
            let _ = writeln!(out, "add map {t} {map} {{ {} }}", compile::slot_map_decl(*space, fam));
            if self.chains_kept.contains(&chain) {
                continue;
            }
            let _ = writeln!(out, "add chain {t} {chain}");
            let _ = writeln!(out, "flush chain {t} {chain}");
            let _ = writeln!(out, "add rule {t} {chain} {}", compile::slot_rule(*space, *i, fam));
        }
        for s in &self.sets_added {
            let _ = writeln!(
                out,
                "add set {t} {} {{ type {}; flags dynamic,timeout; timeout {}s; }}",
                s.name, fam.addr_type, s.timeout
            );
        }
        for (name, rules, existed) in &self.chains_written {
            let _ = writeln!(out, "add chain {t} {name}");
            if *existed {
                let _ = writeln!(out, "flush chain {t} {name}");
            }
            for r in rules {
                let _ = writeln!(out, "add rule {t} {name} {r}");
            }
        }
        let mut split = Split::default();
        let by_netlink = |set: &SetRef| netlink && !is_interval(set);
        // Without netlink every element goes into the script: deletions first, so that a key
        // deleted and re-added with another value ends with the new one.
        let mut deleted_by_script = Vec::new();
        for (set, keys) in self.elements_deleted {
            if by_netlink(&set) {
                split.netlink.push((set.to_string(), keys, Vec::new()));
            } else if netlink {
                deleted_by_script.push((set, keys));
            } else {
                write_elements(&mut out, "delete", &t, &set, &keys);
            }
        }
        for (set, elems) in self.elements_added {
            if by_netlink(&set) {
                split.netlink.push((set.to_string(), Vec::new(), elems));
            } else {
                write_elements(&mut out, "add", &t, &set, &elems);
            }
        }
        split.before = out;
        let mut out = String::new();
        // With netlink, interval-set deletions wait until the new elements are in.
        for (set, keys) in deleted_by_script {
            write_elements(&mut out, "delete", &t, &set, &keys);
        }
        // Referencing chains go before the chains they jump to: pick chains, then affinity
        // heads, then slot and per-endpoint chains.
        let mut chains = self.chains_deleted;
        chains.sort_by_key(|c| {
            let level = if c.starts_with("pick_") {
                0
            } else if c.starts_with("affh_") {
                1
            } else {
                2
            };
            (level, c.clone())
        });
        for c in chains {
            let _ = writeln!(out, "delete chain {t} {c}");
        }
        for s in &self.sets_deleted {
            let _ = writeln!(out, "delete set {t} {s}");
        }
        split.after = out;
        split
    }
}

/// A transaction cut for the netlink path; see [`Transaction::split`].
#[derive(Debug, Default)]
pub struct Split {
    pub before: String,
    /// (set, keys to delete, elements to add): deletes of all sets go before adds.
    pub netlink: Vec<(String, Vec<String>, Vec<String>)>,
    pub after: String,
}

/// Elements of the interval sets, by set name.
pub type RangeElements = BTreeMap<&'static str, BTreeSet<String>>;

/// Sets whose elements are ranges; nft computes their intervals, so they stay with nft.
pub fn is_interval(set: &SetRef) -> bool {
    matches!(set, SetRef::Fixed(name) if layout::INTERVAL_SETS.contains(name))
}

fn write_elements(out: &mut String, verb: &str, table: &str, set: &SetRef, items: &[String]) {
    // Large element lists are split so one line stays a reasonable size for nft's parser.
    for chunk in items.chunks(4096) {
        let _ = writeln!(out, "{verb} element {table} {set} {{ {} }}", chunk.join(", "));
    }
}

fn element_text(key: &str, value: &Option<String>) -> String {
    match value {
        Some(v) => format!("{key} : {v}"),
        None => key.to_owned(),
    }
}

impl FamilyState {
    pub fn new(fam: Fam) -> Self {
        Self {
            fam,
            ports: 0,
            owned: HashMap::new(),
            owners: HashMap::new(),
            pick_refs: HashMap::new(),
            slots: BTreeMap::new(),
            globals: BTreeMap::new(),
        }
    }

    pub fn fam(&self) -> Fam {
        self.fam
    }

    /// Replaces the contribution of `port`, `old` (what it was last compiled to; None when it
    /// is new) with `new` (None removes it), recording the kernel changes.
    pub fn set_port(
        &mut self,
        port: &PortKey,
        old: Option<Contribution>,
        new: Option<Contribution>,
        tx: &mut Transaction,
    ) {
        match (&old, &new) {
            (None, Some(_)) => self.ports += 1,
            (Some(_), None) => self.ports = self.ports.saturating_sub(1),
            _ => {}
        }
        let old = old.unwrap_or_default();
        let new_c = new.unwrap_or_default();

        // Owned sets (affinity): new before use, old after their chains are gone.
        let old_sets: BTreeSet<&OwnedSet> = old.sets.iter().collect();
        let new_sets: BTreeSet<&OwnedSet> = new_c.sets.iter().collect();
        for s in new_sets.difference(&old_sets) {
            tx.sets_added.push((*s).clone());
            tx.operations += 1;
        }
        for s in old_sets.difference(&new_sets) {
            if !new_c.sets.iter().any(|n| n.name == s.name) {
                tx.sets_deleted.push(s.name.clone());
                tx.operations += 1;
            }
        }
        // Owned chains.
        let old_chains: BTreeMap<&str, &OwnedChain> =
            old.chains.iter().map(|c| (c.name.as_str(), c)).collect();
        for c in &new_c.chains {
            match old_chains.get(c.name.as_str()) {
                Some(prev) if prev.rules == c.rules => {}
                prev => {
                    tx.chains_written.push((c.name.clone(), c.rules.clone(), prev.is_some()));
                    tx.operations += c.rules.len();
                }
            }
        }
        for c in &old.chains {
            if !new_c.chains.iter().any(|n| n.name == c.name) {
                tx.chains_deleted.push(c.name.clone());
                tx.operations += 1;
            }
        }
        // Shared pick chains: created on first use, deleted after the last.
        for p in &new_c.pick_chains {
            let n = self.pick_refs.entry(*p).or_default();
            *n += 1;
            if *n == 1 && !old.pick_chains.contains(p) {
                let have = self.slots.entry(p.space).or_default();
                for i in *have..p.n {
                    tx.slots_added.push((p.space, i));
                    tx.operations += 1;
                }
                *have = (*have).max(p.n);
                tx.chains_written.push((p.name(self.fam), vec![p.rule(self.fam)], false));
                tx.operations += 1;
            }
        }
        for p in &old.pick_chains {
            if let Some(n) = self.pick_refs.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.pick_refs.remove(p);
                    tx.chains_deleted.push(p.name(self.fam));
                    tx.operations += 1;
                }
            }
        }
        // Elements.
        let mut touched: BTreeSet<(SetRef, String)> = BTreeSet::new();
        let before: HashMap<(SetRef, String), Option<Option<String>>> = old
            .elements
            .iter()
            .chain(&new_c.elements)
            .map(|e| ((e.set, e.key.clone()), self.effective(e.set, &e.key)))
            .collect();
        for e in &old.elements {
            self.disown(port, e);
            touched.insert((e.set, e.key.clone()));
        }
        let owner = Arc::new(port.clone());
        for e in &new_c.elements {
            self.own(&owner, e);
            touched.insert((e.set, e.key.clone()));
        }
        for (set, key) in touched {
            let was = before.get(&(set, key.clone())).cloned().flatten();
            let now = self.effective(set, &key);
            if was == now {
                continue;
            }
            if was.is_some() {
                tx.elements_deleted.entry(set).or_default().push(key.clone());
                tx.operations += 1;
            }
            if let Some(v) = now {
                tx.elements_added.entry(set).or_default().push(element_text(&key, &v));
                tx.operations += 1;
            }
        }
        self.owned.remove(port);
        if !new_c.chains.is_empty() || !new_c.sets.is_empty() {
            self.owned.insert(port.clone(), (new_c.chains, new_c.sets));
        }
    }

    /// The value in force for a key: `None` when absent, `Some(None)` for a set member.
    fn effective(&self, set: SetRef, key: &str) -> Option<Option<String>> {
        self.owners.get(&set).and_then(|m| m.get(key)).map(|c| c.first.1.clone())
    }

    fn own(&mut self, port: &Arc<PortKey>, e: &Element) {
        let claim = (port.clone(), e.value.clone());
        match self.owners.entry(e.set).or_default().entry(e.key.clone()) {
            Entry::Occupied(mut o) => o.get_mut().waiting.push(claim),
            Entry::Vacant(v) => {
                v.insert(Claims { first: claim, waiting: Vec::new() });
            }
        }
    }

    fn disown(&mut self, port: &PortKey, e: &Element) {
        let Some(m) = self.owners.get_mut(&e.set) else { return };
        let Some(claims) = m.get_mut(&e.key) else { return };
        if *claims.first.0 == *port {
            if claims.waiting.is_empty() {
                m.remove(&e.key);
            } else {
                claims.first = claims.waiting.remove(0);
            }
        } else if let Some(i) = claims.waiting.iter().position(|(p, _)| **p == *port) {
            claims.waiting.remove(i);
        }
    }

    /// Adds a port to a fresh state without recording kernel changes: the full sync that
    /// follows writes everything anyway, and skipping the bookkeeping keeps it fast.
    pub fn add_port_fresh(&mut self, port: &PortKey, c: Contribution) {
        let owner = Arc::new(port.clone());
        for e in &c.elements {
            self.own(&owner, e);
        }
        for p in &c.pick_chains {
            *self.pick_refs.entry(*p).or_default() += 1;
        }
        self.ports += 1;
        if !c.chains.is_empty() || !c.sets.is_empty() {
            self.owned.insert(port.clone(), (c.chains, c.sets));
        }
    }

    /// Replaces a plan-wide set's members.
    pub fn set_global(&mut self, set: &'static str, members: BTreeSet<String>, tx: &mut Transaction) {
        let old = self.globals.remove(set).unwrap_or_default();
        for gone in old.difference(&members) {
            tx.elements_deleted.entry(SetRef::Fixed(set)).or_default().push(gone.clone());
            tx.operations += 1;
        }
        for new in members.difference(&old) {
            tx.elements_added.entry(SetRef::Fixed(set)).or_default().push(new.clone());
            tx.operations += 1;
        }
        self.globals.insert(set, members);
    }

    /// Adds and removes members of a plan-wide set: O(change), for incremental syncs.
    pub fn change_global(
        &mut self,
        set: &'static str,
        added: Vec<String>,
        removed: Vec<String>,
        tx: &mut Transaction,
    ) {
        let members = self.globals.entry(set).or_default();
        for gone in removed {
            if members.remove(&gone) {
                tx.elements_deleted.entry(SetRef::Fixed(set)).or_default().push(gone);
                tx.operations += 1;
            }
        }
        for new in added {
            if members.insert(new.clone()) {
                tx.elements_added.entry(SetRef::Fixed(set)).or_default().push(new);
                tx.operations += 1;
            }
        }
    }

    /// A script that makes the kernel table equal to this state whatever it held before,
    /// in one transaction: declarations are idempotent `add`s, static chains and non-dynamic
    /// sets are flushed and refilled (interval sets too: their content is unknown here),
    /// affinity sets keep their entries, and objects ferry no longer wants (`stale_chains`,
    /// `stale_sets`, read from the kernel) are deleted last.
    pub fn full_script(&self, config: &NodeConfig, stale_chains: &[String], stale_sets: &[String]) -> String {
        let (split, _) = self.full_split(config, stale_chains, stale_sets, BTreeSet::new(), None, false);
        split.before + &split.after
    }

    /// [`Self::full_script`] cut for the netlink path; also returns the sets the netlink batch
    /// must flush before refilling them (in the same kernel transaction as the refill, so
    /// no packet sees them empty). Chains in `keep` are left as they are in the kernel.
    ///
    /// `ranges`: what the kernel's interval sets hold, when known (remembered from the last
    /// sync, or read back: `NftBackend::full_sync`). They then get only their changes (an `auto-merge` set that changed is refilled:
    /// [`layout::AUTO_MERGED`]). Flushing an interval set and adding the same
    /// elements back is atomic in principle, but on Linux 6.1 a lookup in it (rbtree, or pipapo
    /// for concatenations) can miss while such a transaction commits: a pod's connection to a
    /// ClusterIP was masqueraded (the local-traffic detector missed) and a new connection from
    /// inside a LoadBalancer's source ranges dropped (kernel test `full_sync_lookups`). `None`:
    /// flushed and refilled.
    pub fn full_split(
        &self,
        config: &NodeConfig,
        stale_chains: &[String],
        stale_sets: &[String],
        keep: BTreeSet<String>,
        ranges: Option<&RangeElements>,
        netlink: bool,
    ) -> (Split, Vec<String>) {
        let fam = self.fam;
        let t = format!("{} {TABLE}", fam.ip);
        let mut out = String::new();
        let mut flush_by_netlink = Vec::new();
        let _ = writeln!(out, "add table {t}");
        for s in layout::sets(fam) {
            let kind = if s.is_map { "map" } else { "set" };
            let _ = writeln!(out, "add {kind} {t} {} {{ {} }}", s.name, s.body);
            if !is_interval(&SetRef::Fixed(s.name)) && netlink {
                flush_by_netlink.push(s.name.to_owned());
            } else if !is_interval(&SetRef::Fixed(s.name)) || ranges.is_none() {
                let _ = writeln!(out, "flush {kind} {t} {}", s.name);
            }
        }
        let mut tx = Transaction { chains_kept: keep, ..Transaction::default() };
        let chains = layout::chains(fam, config);
        // Declare every chain before any rule can jump to it.
        for c in &chains {
            match c.hook {
                Some(h) => {
                    let _ = writeln!(out, "add chain {t} {} {{ {h} }}", c.name);
                }
                None => {
                    let _ = writeln!(out, "add chain {t} {}", c.name);
                }
            }
        }
        for c in &chains {
            let _ = writeln!(out, "flush chain {t} {}", c.name);
            for r in &c.rules {
                let _ = writeln!(out, "add rule {t} {} {r}", c.name);
            }
        }
        for (space, n) in self.wanted_slots() {
            tx.slots_added.extend((0..n).map(|i| (space, i)));
            if netlink {
                flush_by_netlink.extend((0..n).map(|i| SetRef::Slot(space, i).to_string()));
            }
        }
        let mut picks: Vec<&PickChain> = self.pick_refs.keys().collect();
        picks.sort();
        for p in picks {
            let name = p.name(fam);
            if !tx.chains_kept.contains(&name) {
                tx.chains_written.push((name, vec![p.rule(fam)], true));
            }
        }
        let mut ports: Vec<_> = self.owned.iter().collect();
        ports.sort_by(|a, b| a.0.cmp(b.0));
        for (_, (chains, sets)) in ports {
            tx.sets_added.extend(sets.iter().cloned());
            for ch in chains.iter().filter(|c| !tx.chains_kept.contains(&c.name)) {
                tx.chains_written.push((ch.name.clone(), ch.rules.clone(), true));
            }
        }
        let wanted_ranges = self.range_elements();
        for (set, members) in self.owners.iter().filter(|(set, _)| !is_interval(set)) {
            let mut elements: Vec<String> =
                members.iter().map(|(key, claims)| element_text(key, &claims.first.1)).collect();
            elements.sort_unstable();
            tx.elements_added.entry(*set).or_default().extend(elements);
        }
        for (set, members) in self.globals.iter().filter(|(set, _)| !is_interval(&SetRef::Fixed(set))) {
            tx.elements_added.entry(SetRef::Fixed(set)).or_default().extend(members.iter().cloned());
        }
        let nothing = BTreeSet::new();
        for (set, wanted) in &wanted_ranges {
            let held = ranges.and_then(|r| r.get(set));
            let refill = held.is_some_and(|h| h != wanted && layout::AUTO_MERGED.contains(set));
            if refill {
                let _ = writeln!(out, "flush set {t} {set}");
            }
            let held = if refill { &nothing } else { held.unwrap_or(&nothing) };
            let gone: Vec<String> = held.difference(wanted).cloned().collect();
            if !gone.is_empty() {
                tx.elements_deleted.insert(SetRef::Fixed(set), gone);
            }
            let new: Vec<String> = wanted.difference(held).cloned().collect();
            if !new.is_empty() {
                tx.elements_added.insert(SetRef::Fixed(set), new);
            }
        }
        tx.chains_deleted = stale_chains.to_vec();
        tx.sets_deleted = stale_sets.to_vec();
        let mut split = tx.split(fam, netlink);
        out.push_str(&split.before);
        split.before = out;
        (split, flush_by_netlink)
    }

    /// The elements of the interval sets ([`is_interval`]) in this state, by set.
    pub fn range_elements(&self) -> RangeElements {
        let mut out = RangeElements::new();
        for set in layout::INTERVAL_SETS {
            let members = out.entry(set).or_default();
            if let Some(owned) = self.owners.get(&SetRef::Fixed(set)) {
                members.extend(owned.iter().map(|(key, claims)| element_text(key, &claims.first.1)));
            }
            if let Some(global) = self.globals.get(set) {
                members.extend(global.iter().cloned());
            }
        }
        out
    }

    /// The endpoint-choosing chains (pick, slot and affinity chains) that a full sync leaves
    /// alone: those this state wants that exist in the kernel (`have`). Their names are
    /// hashes of their rules ([`compile::content_name`]), so an existing one already holds what
    /// this state would write, whoever wrote it: a restarted or upgraded ferry adopts them too.
    ///
    /// Rewriting such a chain is not harmless while traffic flows. Traced with nft, a
    /// connection opened while a full sync rewrote the pick and slot chains jumped from
    /// `frontends` to its pick chain and left it without a verdict: nothing DNATed it and
    /// `endpoint_check` rejected it (about one connection in 5,000 under back-to-back full
    /// syncs; leaving either the pick or the slot chains alone made it disappear). Static
    /// chains are still rewritten, which keeps the hooks repaired; they never showed it.
    pub fn kept_chains(&self, have: &BTreeSet<String>) -> BTreeSet<String> {
        let mut keep = self.endpoint_chain_names();
        keep.retain(|c| have.contains(c));
        keep
    }

    /// Names of the endpoint-choosing chains this state wants: pick, slot and owned chains.
    fn endpoint_chain_names(&self) -> BTreeSet<String> {
        let fam = self.fam;
        let mut names: BTreeSet<String> = self.pick_refs.keys().map(|p| p.name(fam)).collect();
        for (space, n) in self.wanted_slots() {
            names.extend((0..n).map(|i| compile::slot_chain(space, i, fam)));
        }
        for (chains, _) in self.owned.values() {
            names.extend(chains.iter().map(|c| c.name.clone()));
        }
        names
    }

    /// Names of every chain and set this state wants to exist.
    pub fn wanted_names(&self, config: &NodeConfig) -> (BTreeSet<String>, BTreeSet<String>) {
        let fam = self.fam;
        let mut chains = self.endpoint_chain_names();
        chains.extend(layout::chains(fam, config).iter().map(|c| c.name.to_owned()));
        let mut sets: BTreeSet<String> = layout::sets(fam).iter().map(|s| s.name.to_owned()).collect();
        for (space, n) in self.wanted_slots() {
            sets.extend((0..n).map(|i| SetRef::Slot(space, i).to_string()));
        }
        for (_, owned_sets) in self.owned.values() {
            sets.extend(owned_sets.iter().map(|s| s.name.clone()));
        }
        (chains, sets)
    }

    /// Slots each space needs: as many as its largest endpoint set.
    fn wanted_slots(&self) -> BTreeMap<Space, usize> {
        let mut out: BTreeMap<Space, usize> = BTreeMap::new();
        for p in self.pick_refs.keys() {
            let n = out.entry(p.space).or_default();
            *n = (*n).max(p.n);
        }
        out
    }

    /// After a full sync the kernel holds exactly the wanted slots.
    pub fn settle_slots(&mut self) {
        self.slots = self.wanted_slots();
    }

    pub fn port_count(&self) -> usize {
        self.ports
    }

    pub fn element_count(&self) -> usize {
        self.owners.values().map(HashMap::len).sum::<usize>()
            + self.globals.values().map(BTreeSet::len).sum::<usize>()
    }
}

/// The plan-wide sets for a family.
pub fn globals(plan: &Plan, fam: Fam, config: &NodeConfig) -> Vec<(&'static str, BTreeSet<String>)> {
    let of_family = |ip: &std::net::IpAddr| crate::model::IpFamily::of(ip) == fam.family;
    let nets = |nets: &mut dyn Iterator<Item = &ipnet::IpNet>| -> BTreeSet<String> {
        let v: Vec<ipnet::IpNet> =
            nets.filter(|n| crate::model::IpFamily::of_net(n) == fam.family).copied().collect();
        ipnet::IpNet::aggregate(&v).iter().map(ToString::to_string).collect()
    };
    vec![
        (
            "cluster_ips",
            plan.cluster_ips.iter().filter(|ip| of_family(ip)).map(ToString::to_string).collect(),
        ),
        ("service_cidrs", nets(&mut plan.service_cidrs.iter())),
        ("pod_cidrs", nets(&mut config.cluster_cidrs.iter())),
        (
            "nodeport_ips",
            if config.nodeport_addresses.is_empty() {
                BTreeSet::new()
            } else {
                config.nodeport_ips(fam.family).iter().map(ToString::to_string).collect()
            },
        ),
    ]
}
