//! What ferry has written to the maps, and the ordered writes that move them to a new plan.
//!
//! Endpoint sets are immutable: a set id names one endpoint list forever. A changed list is
//! written under a fresh id (slots, then its Maglev table), then every frontend using it is
//! replaced in one map update each, so a packet sees the old set or the new one, never half.
//! Sets no longer referenced are *retired* and deleted at the next sync, so a packet that read
//! the old frontend value a moment before the flip still finds its slots. Identical lists are
//! shared between frontends and service ports (reference counted).
//!
//! A full sync also reads the kernel maps back: entries that differ are rewritten, extra ones
//! removed (drift repair), and after a restart the sets already in the pinned maps are adopted
//! when their content matches, so a restarted ferry rewrites nothing that is right.
//!
//! The frontend filter's bit for an address (a frontend's, a NodePort node address, an
//! allocated ClusterIP) is set before the first entry naming the address is written, and never
//! cleared (see `proxy_common::frontend_filter`); the filter is switched on at the end of the
//! first full sync, when every bit and the service CIDR list are in place, and off while the
//! service CIDRs do not fit in the list.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;

use proxy_common::{
    Endpoint, EndpointKey, FrontendKey, FrontendValue, MAGLEV_MAX_SIZE, MaglevTable, NODE_PORT_ADDR_V4,
    NODE_PORT_ADDR_V6, ServiceCidrs, dst_policy, frontend_filter, node_addr,
};

use super::compile::{self, EndpointList, PortMaps};
use super::maglev;
use super::maps::{Cidr, DataPathMaps, MapError, SourceRange, addr16, cidr, ip_of};
use crate::plan::{NodeConfig, Plan, PlanDiff, PortKey, ServicePortPlan};

#[derive(Debug)]
struct SetInfo {
    id: u32,
    refs: u32,
}

/// What one service port owns in the maps.
#[derive(Debug, Default, Clone)]
struct PortState {
    service_id: u32,
    frontends: Vec<FrontendKey>,
    sets: Vec<u32>,
    source_ranges: Vec<SourceRange>,
}

pub struct State {
    maglev_size: u32,
    sets: HashMap<EndpointList, SetInfo>,
    set_lists: HashMap<u32, EndpointList>,
    next_set: u32,
    retired: Vec<u32>,
    ports: HashMap<PortKey, PortState>,
    service_ids: HashMap<PortKey, u32>,
    used_service_ids: HashSet<u32>,
    free_service_ids: Vec<u32>,
    next_service_id: u32,
    /// Frontend entries in force and their owner (the first port that claimed the key).
    frontends: BTreeMap<FrontendKey, (FrontendValue, PortKey)>,
    source_ranges: BTreeSet<SourceRange>,
    node_addrs: BTreeMap<[u8; 16], u32>,
    pod_cidrs: BTreeSet<Cidr>,
    dst_policy: BTreeMap<Cidr, u32>,
    /// Frontend entries found in the pinned maps at start: not rewritten when they already
    /// hold what the plan wants.
    adopted_frontends: HashMap<FrontendKey, FrontendValue>,
    /// Words of the frontend filter ferry has set (and found set at start), by index.
    filter: HashMap<u32, u64>,
    filter_enabled: bool,
    /// The service CIDR list as written; `None`: more CIDRs than it holds (filter off).
    filter_cidrs: Option<ServiceCidrs>,
    /// During the first full sync after adopting pinned maps: the bits the filter needs (this
    /// sync's marks and the destinations of live connections); the others are cleared at its
    /// end. Until then every adopted bit stays, so no packet meets a bit cleared too early.
    filter_rebuild: Option<HashMap<u32, u64>>,
    filter_adopted: bool,
    /// Map writes and deletes of the current sync.
    pub operations: usize,
}

impl State {
    pub fn new(maglev_size: u32) -> Self {
        Self {
            maglev_size: maglev_size.clamp(1, MAGLEV_MAX_SIZE as u32),
            sets: HashMap::new(),
            set_lists: HashMap::new(),
            next_set: 1,
            retired: Vec::new(),
            ports: HashMap::new(),
            service_ids: HashMap::new(),
            used_service_ids: HashSet::new(),
            free_service_ids: Vec::new(),
            next_service_id: 1,
            frontends: BTreeMap::new(),
            source_ranges: BTreeSet::new(),
            node_addrs: BTreeMap::new(),
            pod_cidrs: BTreeSet::new(),
            dst_policy: BTreeMap::new(),
            adopted_frontends: HashMap::new(),
            filter: HashMap::new(),
            filter_enabled: false,
            filter_cidrs: Some(ServiceCidrs::default()),
            filter_rebuild: None,
            filter_adopted: false,
            operations: 0,
        }
    }

    /// Sets the frontend filter's bit of `addr` (a frontend's address, or a node address
    /// NodePorts answer on) unless it is set already.
    fn mark_frontend(&mut self, addr: &[u8; 16], maps: &mut dyn DataPathMaps) -> Result<(), MapError> {
        if *addr == NODE_PORT_ADDR_V4 || *addr == NODE_PORT_ADDR_V6 {
            return Ok(());
        }
        let (index, mask) = frontend_filter::word_and_mask(frontend_filter::bit(addr));
        if let Some(needed) = &mut self.filter_rebuild {
            *needed.entry(index).or_insert(0) |= mask;
        }
        let word = self.filter.entry(index).or_insert(0);
        if *word & mask == 0 {
            *word |= mask;
            maps.frontend_filter().set(index, *word)?;
            self.operations += 1;
        }
        Ok(())
    }

    /// Writes the service CIDR list (one map update), or switches the filter off when the
    /// CIDRs do not fit.
    fn set_filter_cidrs(&mut self, plan: &Plan, maps: &mut dyn DataPathMaps) -> Result<(), MapError> {
        if plan.service_cidrs.len() > ServiceCidrs::MAX {
            if self.filter_enabled {
                maps.frontend_filter().set(frontend_filter::ENABLED_WORD, 0)?;
                self.filter_enabled = false;
                self.operations += 1;
            }
            self.filter_cidrs = None;
            return Ok(());
        }
        let mut want = ServiceCidrs { count: plan.service_cidrs.len() as u32, ..ServiceCidrs::default() };
        for (slot, net) in want.cidrs.iter_mut().zip(&plan.service_cidrs) {
            let (len, addr) = cidr(net);
            *slot = frontend_filter::cidr_words(&addr, len);
        }
        if self.filter_cidrs != Some(want) {
            maps.service_cidrs().set(&want)?;
            self.operations += 1;
            self.filter_cidrs = Some(want);
        }
        Ok(())
    }

    /// Bits of the frontend filter set, and its size in bits.
    pub fn filter_fill(&self) -> (u32, u32) {
        (self.filter.values().map(|w| w.count_ones()).sum(), 1 << frontend_filter::BITS_LOG2)
    }

    /// Number of endpoint sets in use.
    pub fn set_count(&self) -> usize {
        self.sets.len()
    }

    /// Deletes the sets retired by the previous sync (their grace period is over).
    fn collect_retired(&mut self, maps: &mut dyn DataPathMaps) -> Result<(), MapError> {
        for id in std::mem::take(&mut self.retired) {
            // A retired set may have been adopted again since (same list reappeared).
            if self.set_lists.get(&id).is_some_and(|l| self.sets.get(l).is_some_and(|s| s.refs > 0)) {
                continue;
            }
            if let Some(list) = self.set_lists.remove(&id) {
                self.sets.remove(&list);
                for index in 0..list.endpoints.len() as u32 {
                    maps.endpoints().del(&EndpointKey { set: id, index })?;
                    self.operations += 1;
                }
                if list.maglev {
                    maps.maglev().del(&id)?;
                    self.operations += 1;
                }
            }
        }
        Ok(())
    }

    /// The id of a set holding `list`, written now if it is new.
    fn acquire(&mut self, list: &EndpointList, maps: &mut dyn DataPathMaps) -> Result<u32, MapError> {
        if let Some(info) = self.sets.get_mut(list) {
            info.refs += 1;
            return Ok(info.id);
        }
        let id = self.next_set;
        self.next_set = self.next_set.wrapping_add(1).max(1);
        write_set(maps, id, list, self.maglev_size)?;
        self.operations += list.endpoints.len() + usize::from(list.maglev);
        self.sets.insert(list.clone(), SetInfo { id, refs: 1 });
        self.set_lists.insert(id, list.clone());
        Ok(id)
    }

    fn release(&mut self, id: u32) {
        if let Some(list) = self.set_lists.get(&id)
            && let Some(info) = self.sets.get_mut(list)
        {
            info.refs = info.refs.saturating_sub(1);
            if info.refs == 0 {
                self.retired.push(id);
            }
        }
    }

    fn service_id(&mut self, key: &PortKey) -> u32 {
        if let Some(id) = self.service_ids.get(key) {
            return *id;
        }
        let id = loop {
            let id = self.free_service_ids.pop().unwrap_or_else(|| {
                let id = self.next_service_id;
                self.next_service_id += 1;
                id
            });
            if !self.used_service_ids.contains(&id) {
                break id;
            }
        };
        self.service_ids.insert(key.clone(), id);
        self.used_service_ids.insert(id);
        id
    }

    /// Brings one service port to `plan` (`None`: removed). Order: new sets and source ranges,
    /// then frontends (each flips atomically), then stale frontends and ranges; old sets are
    /// retired.
    pub fn set_port(
        &mut self,
        key: &PortKey,
        plan: Option<&ServicePortPlan>,
        config: &NodeConfig,
        maps: &mut dyn DataPathMaps,
    ) -> Result<(), MapError> {
        let old = self.ports.remove(key).unwrap_or_default();
        let mut new = PortState::default();
        if let Some(p) = plan {
            if !self.service_ids.contains_key(key) {
                // After a restart, keep the id the pinned ClusterIP entry carries.
                let cluster = FrontendKey::from_raw(
                    addr16(p.cluster_ip),
                    p.port.to_be(),
                    compile::protocol_number(p.protocol),
                );
                if let Some(v) = self.adopted_frontends.get(&cluster)
                    && self.used_service_ids.insert(v.service_id)
                {
                    self.service_ids.insert(key.clone(), v.service_id);
                }
            }
            new.service_id = self.service_id(key);
            let compiled: PortMaps = compile::compile(p, config, new.service_id);
            let mut ids = Vec::with_capacity(compiled.lists.len());
            for list in &compiled.lists {
                ids.push(self.acquire(list, maps)?);
            }
            new.sets = ids.clone();
            for range in &compiled.source_ranges {
                if self.source_ranges.insert(*range) {
                    maps.source_ranges().put(range, &1)?;
                    self.operations += 1;
                }
            }
            new.source_ranges = compiled.source_ranges.clone();
            for t in &compiled.frontends {
                let (set, count) =
                    t.main.map_or((0, 0), |i| (ids[i], compiled.lists[i].endpoints.len() as u32));
                let (sc_set, sc_count) =
                    t.short_circuit.map_or((0, 0), |i| (ids[i], compiled.lists[i].endpoints.len() as u32));
                let value = FrontendValue {
                    service_id: new.service_id,
                    flags: t.flags,
                    set,
                    count,
                    sc_set,
                    sc_count,
                    affinity_timeout: t.affinity_timeout,
                    _pad: 0,
                };
                self.mark_frontend(&t.key.addr, maps)?;
                match self.frontends.get(&t.key) {
                    Some((_, owner)) if owner != key => continue,
                    Some((current, _)) if *current == value => {}
                    None if self.adopted_frontends.get(&t.key) == Some(&value) => {}
                    _ => {
                        maps.services().put(&t.key, &value)?;
                        self.operations += 1;
                    }
                }
                self.frontends.insert(t.key, (value, key.clone()));
                new.frontends.push(t.key);
            }
        }
        for fk in &old.frontends {
            if !new.frontends.contains(fk) && self.frontends.get(fk).is_some_and(|(_, owner)| owner == key) {
                maps.services().del(fk)?;
                self.operations += 1;
                self.frontends.remove(fk);
            }
        }
        for range in &old.source_ranges {
            if !new.source_ranges.contains(range) && self.source_ranges.remove(range) {
                maps.source_ranges().del(range)?;
                self.operations += 1;
            }
        }
        for id in &old.sets {
            self.release(*id);
        }
        if plan.is_some() {
            self.ports.insert(key.clone(), new);
        } else if let Some(id) = self.service_ids.remove(key) {
            self.used_service_ids.remove(&id);
            self.free_service_ids.push(id);
        }
        Ok(())
    }

    /// Node-wide entries (node addresses, cluster CIDRs, ClusterIPs and service CIDRs).
    pub fn set_globals(
        &mut self,
        plan: &Plan,
        config: &NodeConfig,
        maps: &mut dyn DataPathMaps,
    ) -> Result<(), MapError> {
        let g = compile::globals(plan, config);
        let node: BTreeMap<[u8; 16], u32> = g.node_addrs.into_iter().collect();
        for (k, v) in &node {
            if v & node_addr::NODE_PORT != 0 {
                self.mark_frontend(k, maps)?;
            }
            if self.node_addrs.get(k) != Some(v) {
                maps.node_addrs().put(k, v)?;
                self.operations += 1;
            }
        }
        for k in self.node_addrs.keys().filter(|k| !node.contains_key(*k)) {
            maps.node_addrs().del(k)?;
            self.operations += 1;
        }
        self.node_addrs = node;
        let pods: BTreeSet<Cidr> = g.pod_cidrs.into_iter().collect();
        for k in pods.difference(&self.pod_cidrs) {
            maps.pod_cidrs().put(k, &1)?;
            self.operations += 1;
        }
        for k in self.pod_cidrs.difference(&pods) {
            maps.pod_cidrs().del(k)?;
            self.operations += 1;
        }
        self.pod_cidrs = pods;
        let dst: BTreeMap<Cidr, u32> = g.dst_policy.into_iter().collect();
        self.set_filter_cidrs(plan, maps)?;
        for (k, v) in &dst {
            if *v == dst_policy::REJECT {
                self.mark_frontend(&k.1, maps)?;
            }
            if self.dst_policy.get(k) != Some(v) {
                maps.dst_policy().put(k, v)?;
                self.operations += 1;
            }
        }
        for k in self.dst_policy.keys().filter(|k| !dst.contains_key(*k)) {
            maps.dst_policy().del(k)?;
            self.operations += 1;
        }
        self.dst_policy = dst;
        Ok(())
    }

    /// Applies a plan diff: only the service ports it names (and the ClusterIP entries when
    /// they changed).
    pub fn partial(
        &mut self,
        plan: &Plan,
        diff: &PlanDiff,
        config: &NodeConfig,
        maps: &mut dyn DataPathMaps,
    ) -> Result<(), MapError> {
        self.operations = 0;
        self.collect_retired(maps)?;
        for p in diff.added.iter().chain(diff.changed.iter().map(|(_, p)| p)) {
            self.set_port(&PortKey { family: p.family, name: p.name.clone() }, Some(p), config, maps)?;
        }
        for p in &diff.removed {
            self.set_port(&PortKey { family: p.family, name: p.name.clone() }, None, config, maps)?;
        }
        if diff.service_cidrs_changed {
            self.set_globals(plan, config, maps)?;
        } else if diff.cluster_ips_changed {
            self.change_cluster_ips(plan, diff, maps)?;
        }
        Ok(())
    }

    /// The REJECT entries of allocated ClusterIPs, changed by the diff's delta: O(change), where
    /// [`Self::set_globals`] compares every address (a one-service add at 50,000 services).
    fn change_cluster_ips(
        &mut self,
        plan: &Plan,
        diff: &PlanDiff,
        maps: &mut dyn DataPathMaps,
    ) -> Result<(), MapError> {
        // A service CIDR of a single address keeps its own entry.
        let is_cidr = |key: &Cidr| plan.service_cidrs.iter().any(|n| cidr(n) == *key);
        for ip in &diff.cluster_ips_removed {
            let key: Cidr = (128, addr16(*ip));
            if !is_cidr(&key) && self.dst_policy.remove(&key).is_some() {
                maps.dst_policy().del(&key)?;
                self.operations += 1;
            }
        }
        for ip in &diff.cluster_ips_added {
            let key: Cidr = (128, addr16(*ip));
            self.mark_frontend(&key.1, maps)?;
            if let std::collections::btree_map::Entry::Vacant(entry) = self.dst_policy.entry(key) {
                maps.dst_policy().put(&key, &dst_policy::REJECT)?;
                entry.insert(dst_policy::REJECT);
                self.operations += 1;
            }
        }
        Ok(())
    }

    /// Re-applies everything: every port of `plan` (unchanged ones write nothing), removal of
    /// ports no longer planned, then a comparison with what the kernel maps hold that rewrites
    /// what differs and deletes what ferry does not want.
    pub fn full(
        &mut self,
        plan: &Plan,
        config: &NodeConfig,
        maps: &mut dyn DataPathMaps,
    ) -> Result<(), MapError> {
        self.operations = 0;
        if self.ports.is_empty() && self.sets.is_empty() {
            self.adopt(maps)?;
        }
        self.collect_retired(maps)?;
        for (key, p) in &plan.ports {
            self.set_port(key, Some(p), config, maps)?;
        }
        let gone: Vec<PortKey> =
            self.ports.keys().filter(|k| !plan.ports.contains_key(*k)).cloned().collect();
        for key in gone {
            self.set_port(&key, None, config, maps)?;
        }
        // Adopted sets nothing uses.
        let unused: Vec<u32> = self.sets.values().filter(|s| s.refs == 0).map(|s| s.id).collect();
        for id in unused {
            if !self.retired.contains(&id) {
                self.retired.push(id);
            }
        }
        self.set_globals(plan, config, maps)?;
        self.adopted_frontends.clear();
        // Adopted ranges nothing claims any more are deleted by the repair.
        self.source_ranges = self.ports.values().flat_map(|p| p.source_ranges.iter().copied()).collect();
        self.repair(maps)
    }

    /// After a restart: takes the sets found in the pinned maps as known (unreferenced) sets,
    /// so identical lists are reused instead of rewritten, and numbers new sets after them.
    fn adopt(&mut self, maps: &mut dyn DataPathMaps) -> Result<(), MapError> {
        let mut found: BTreeMap<u32, Vec<(u32, Endpoint)>> = BTreeMap::new();
        for (k, v) in maps.endpoints().list()? {
            found.entry(k.set).or_default().push((k.index, v));
        }
        let maglev: BTreeSet<u32> = maps.maglev().keys()?.into_iter().collect();
        for (id, mut slots) in found {
            slots.sort_by_key(|(i, _)| *i);
            let dense = slots.iter().enumerate().all(|(n, (i, _))| n as u32 == *i);
            let list = EndpointList {
                endpoints: slots
                    .iter()
                    .map(|(_, e)| SocketAddr::new(ip_of(&e.addr), u16::from_be(e.port)))
                    .collect(),
                maglev: maglev.contains(&id),
            };
            self.next_set = self.next_set.max(id.wrapping_add(1));
            if dense && !self.sets.contains_key(&list) {
                self.sets.insert(list.clone(), SetInfo { id, refs: 0 });
                self.set_lists.insert(id, list);
            } else {
                // Not a set ferry could have written: delete at the next sync.
                self.set_lists.insert(id, list);
                self.retired.push(id);
            }
        }
        for id in maglev {
            self.next_set = self.next_set.max(id.wrapping_add(1));
        }
        self.adopted_frontends = maps.services().list()?.into_iter().collect();
        self.node_addrs = maps.node_addrs().list()?.into_iter().collect();
        self.pod_cidrs = maps.pod_cidrs().keys()?.into_iter().collect();
        self.dst_policy = maps.dst_policy().list()?.into_iter().collect();
        self.source_ranges = maps.source_ranges().keys()?.into_iter().collect();
        // Bits an earlier run set are kept through this sync; at its end only those of its
        // frontends and of live connections stay (see `filter_rebuild`).
        if !self.filter_adopted {
            self.filter_adopted = true;
            let mut needed: HashMap<u32, u64> = HashMap::new();
            for addr in maps.connection_destinations()? {
                let (index, mask) = frontend_filter::word_and_mask(frontend_filter::bit(&addr));
                *needed.entry(index).or_insert(0) |= mask;
            }
            self.filter_rebuild = Some(needed);
        }
        let words = maps.frontend_filter().nonzero()?;
        self.filter_enabled = words.iter().any(|(i, _)| *i == frontend_filter::ENABLED_WORD);
        self.filter = words.into_iter().filter(|(i, _)| *i != frontend_filter::ENABLED_WORD).collect();
        self.filter_cidrs = Some(maps.service_cidrs().get()?);
        Ok(())
    }

    /// Compares the kernel maps with this state: rewrites missing or different entries and
    /// deletes those ferry does not want.
    fn repair(&mut self, maps: &mut dyn DataPathMaps) -> Result<(), MapError> {
        let kernel: HashMap<FrontendKey, FrontendValue> = maps.services().list()?.into_iter().collect();
        for (k, (v, _)) in &self.frontends {
            if kernel.get(k) != Some(v) {
                maps.services().put(k, v)?;
                self.operations += 1;
            }
        }
        for k in kernel.keys().filter(|k| !self.frontends.contains_key(*k)) {
            maps.services().del(k)?;
            self.operations += 1;
        }
        // Endpoint slots: sets are immutable, so a missing or different slot is drift.
        let kernel: HashMap<EndpointKey, Endpoint> = maps.endpoints().list()?.into_iter().collect();
        for (id, list) in &self.set_lists {
            for (index, ep) in list.endpoints.iter().enumerate() {
                let key = EndpointKey { set: *id, index: index as u32 };
                let want = endpoint(ep);
                if kernel.get(&key) != Some(&want) {
                    maps.endpoints().put(&key, &want)?;
                    self.operations += 1;
                }
            }
        }
        for k in kernel.keys().filter(|k| !self.set_lists.contains_key(&k.set)) {
            maps.endpoints().del(k)?;
            self.operations += 1;
        }
        let kernel: BTreeSet<u32> = maps.maglev().keys()?.into_iter().collect();
        for (id, list) in &self.set_lists {
            if list.maglev && !kernel.contains(id) {
                maps.maglev().put(id, &maglev_table(&list.endpoints, self.maglev_size))?;
                self.operations += 1;
            }
        }
        for id in kernel.iter().filter(|id| !self.set_lists.get(id).is_some_and(|l| l.maglev)) {
            maps.maglev().del(id)?;
            self.operations += 1;
        }
        let kernel: BTreeSet<SourceRange> = maps.source_ranges().keys()?.into_iter().collect();
        for r in self.source_ranges.difference(&kernel) {
            maps.source_ranges().put(r, &1)?;
            self.operations += 1;
        }
        for r in kernel.difference(&self.source_ranges) {
            maps.source_ranges().del(r)?;
            self.operations += 1;
        }
        let kernel: BTreeMap<[u8; 16], u32> = maps.node_addrs().list()?.into_iter().collect();
        for (k, v) in &self.node_addrs {
            if kernel.get(k) != Some(v) {
                maps.node_addrs().put(k, v)?;
                self.operations += 1;
            }
        }
        for k in kernel.keys().filter(|k| !self.node_addrs.contains_key(*k)) {
            maps.node_addrs().del(k)?;
            self.operations += 1;
        }
        let kernel: BTreeSet<Cidr> = maps.pod_cidrs().keys()?.into_iter().collect();
        for k in self.pod_cidrs.difference(&kernel) {
            maps.pod_cidrs().put(k, &1)?;
            self.operations += 1;
        }
        for k in kernel.difference(&self.pod_cidrs) {
            maps.pod_cidrs().del(k)?;
            self.operations += 1;
        }
        let kernel: BTreeMap<Cidr, u32> = maps.dst_policy().list()?.into_iter().collect();
        for (k, v) in &self.dst_policy {
            if kernel.get(k) != Some(v) {
                maps.dst_policy().put(k, v)?;
                self.operations += 1;
            }
        }
        for k in kernel.keys().filter(|k| !self.dst_policy.contains_key(*k)) {
            maps.dst_policy().del(k)?;
            self.operations += 1;
        }
        if let Some(needed) = self.filter_rebuild.take() {
            let indices: HashSet<u32> = self.filter.keys().chain(needed.keys()).copied().collect();
            for index in indices {
                let want = needed.get(&index).copied().unwrap_or(0);
                if self.filter.get(&index).copied().unwrap_or(0) != want {
                    maps.frontend_filter().set(index, want)?;
                    self.operations += 1;
                }
            }
            self.filter = needed;
        }
        // The filter: only missing bits are drift (extra ones cost a lookup, never a packet).
        for (index, word) in &mut self.filter {
            let kernel = maps.frontend_filter().get(*index)?;
            if kernel & *word != *word {
                *word |= kernel;
                maps.frontend_filter().set(*index, *word)?;
                self.operations += 1;
            }
        }
        let Some(cidrs) = self.filter_cidrs else { return Ok(()) };
        if maps.service_cidrs().get()? != cidrs {
            maps.service_cidrs().set(&cidrs)?;
            self.operations += 1;
        }
        if !self.filter_enabled || maps.frontend_filter().get(frontend_filter::ENABLED_WORD)? == 0 {
            maps.frontend_filter().set(frontend_filter::ENABLED_WORD, 1)?;
            self.filter_enabled = true;
            self.operations += 1;
        }
        Ok(())
    }
}

fn endpoint(ep: &SocketAddr) -> Endpoint {
    Endpoint { addr: addr16(ep.ip()), port: ep.port().to_be(), _pad: 0 }
}

/// The Maglev table of a list, boxed (256 KiB).
pub fn maglev_table(endpoints: &[SocketAddr], size: u32) -> Box<MaglevTable> {
    let mut table = Box::new(MaglevTable { size, _pad: 0, entries: [0; MAGLEV_MAX_SIZE] });
    for (slot, e) in table.entries.iter_mut().zip(maglev::table(endpoints, size)) {
        *slot = e;
    }
    table
}

/// Writes a new set: its slots, then its Maglev table.
fn write_set(
    maps: &mut dyn DataPathMaps,
    id: u32,
    list: &EndpointList,
    maglev_size: u32,
) -> Result<(), MapError> {
    for (index, ep) in list.endpoints.iter().enumerate() {
        maps.endpoints().put(&EndpointKey { set: id, index: index as u32 }, &endpoint(ep))?;
    }
    if list.maglev {
        maps.maglev().put(&id, &maglev_table(&list.endpoints, maglev_size))?;
    }
    Ok(())
}
