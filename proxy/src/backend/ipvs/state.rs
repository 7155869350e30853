//! What ferry has programmed, per service port, and the smallest change to a new plan.
//!
//! Two service ports can claim the same kernel object (two Services listing one external IP
//! and port): every object keeps its claimants in order and the first one's version is in
//! force; when it goes, the next takes over. Comparing the objects in force before and after
//! a port's change gives exactly the kernel operations of a partial sync.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::compile::{self, Context, Output, VirtualService};
use super::filter::Element;
use super::netlink::{Dest, ServiceKey, ServiceSpec};
use crate::plan::{NodeConfig, Plan, PortKey, ServicePortPlan};

/// Objects of one kind with their claimants; the first claim is in force.
#[derive(Debug, Clone)]
pub struct Claims<K, V> {
    by_key: BTreeMap<K, Vec<(PortKey, V)>>,
}

impl<K, V> Default for Claims<K, V> {
    fn default() -> Self {
        Self { by_key: BTreeMap::new() }
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> Claims<K, V> {
    pub fn in_force(&self, key: &K) -> Option<&V> {
        self.by_key.get(key).and_then(|c| c.first()).map(|(_, v)| v)
    }

    fn claim(&mut self, owner: &PortKey, key: K, value: V) {
        let claims = self.by_key.entry(key).or_default();
        match claims.iter_mut().find(|(o, _)| o == owner) {
            Some((_, v)) => *v = value,
            None => claims.push((owner.clone(), value)),
        }
    }

    fn release(&mut self, owner: &PortKey, key: &K) {
        if let Some(claims) = self.by_key.get_mut(key) {
            claims.retain(|(o, _)| o != owner);
            if claims.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.by_key.iter().filter_map(|(k, c)| c.first().map(|(_, v)| (k, v)))
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// A virtual service in force: its spec and real servers.
pub type ServiceValue = (ServiceSpec, Vec<Dest>);
type ElementKey = Element;

/// The change of one object kind: (key, before, after) for every object whose version in
/// force changed.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    pub services: Vec<(ServiceKey, Option<ServiceValue>, Option<ServiceValue>)>,
    pub addresses_added: Vec<IpAddr>,
    pub addresses_removed: Vec<IpAddr>,
    pub elements_added: Vec<Element>,
    pub elements_removed: Vec<Element>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.addresses_added.is_empty()
            && self.addresses_removed.is_empty()
            && self.elements_added.is_empty()
            && self.elements_removed.is_empty()
    }
}

#[derive(Debug, Default, Clone)]
pub struct State {
    ports: HashMap<PortKey, Output>,
    pub services: Claims<ServiceKey, ServiceValue>,
    pub addresses: Claims<IpAddr, ()>,
    /// Elements keyed by (family, set, key); the value is the whole element.
    pub elements: Claims<(crate::model::IpFamily, &'static str, String), ElementKey>,
    marks: BTreeMap<PortKey, u32>,
    used_marks: BTreeSet<u32>,
}

impl State {
    /// The state of a full sync of `plan`; firewall marks already given (`previous`) are kept.
    pub fn build(plan: &Plan, config: &NodeConfig, scheduler: &str, previous: &State) -> State {
        let mut st = State::default();
        for (key, p) in &plan.ports {
            if let Some(m) = previous.marks.get(key).filter(|_| needs_mark(p, config)) {
                st.marks.insert(key.clone(), *m);
                st.used_marks.insert(*m);
            }
        }
        for (key, p) in &plan.ports {
            let out = st.compile(key, p, config, scheduler);
            st.apply(key, Some(out));
        }
        st
    }

    fn compile(
        &mut self,
        key: &PortKey,
        p: &ServicePortPlan,
        config: &NodeConfig,
        scheduler: &str,
    ) -> Output {
        let nodeport_ips = config.nodeport_ips(p.family);
        let mark = if compile::needs_mark(p, &nodeport_ips) {
            Some(self.mark_for(key))
        } else {
            self.release_mark(key);
            None
        };
        compile::compile(p, Context { scheduler, nodeport_ips: &nodeport_ips }, mark)
    }

    fn mark_for(&mut self, key: &PortKey) -> u32 {
        if let Some(m) = self.marks.get(key) {
            return *m;
        }
        let mut m = compile::preferred_mark(&key.name.to_string(), key.family);
        while self.used_marks.contains(&m) {
            m = compile::MARK_BASE + (m - compile::MARK_BASE + 1) % compile::MARK_SPACE;
        }
        self.marks.insert(key.clone(), m);
        self.used_marks.insert(m);
        m
    }

    fn release_mark(&mut self, key: &PortKey) {
        if let Some(m) = self.marks.remove(key) {
            self.used_marks.remove(&m);
        }
    }

    /// Replaces what `key` contributes (None: the port is gone) and returns what changed.
    pub fn set_port(
        &mut self,
        key: &PortKey,
        port: Option<&ServicePortPlan>,
        config: &NodeConfig,
        scheduler: &str,
    ) -> Changes {
        let out = match port {
            Some(p) => Some(self.compile(key, p, config, scheduler)),
            None => {
                self.release_mark(key);
                None
            }
        };
        self.apply(key, out)
    }

    fn apply(&mut self, key: &PortKey, new: Option<Output>) -> Changes {
        let old = self.ports.remove(key).unwrap_or_default();
        let new_out = new.clone().unwrap_or_default();
        let mut changes = Changes::default();

        let svc_keys: BTreeSet<ServiceKey> =
            old.services.iter().chain(&new_out.services).map(|s| s.key).collect();
        let before: Vec<Option<ServiceValue>> =
            svc_keys.iter().map(|k| self.services.in_force(k).cloned()).collect();
        for s in &old.services {
            self.services.release(key, &s.key);
        }
        for VirtualService { key: k, spec, dests } in &new_out.services {
            self.services.claim(key, *k, (spec.clone(), dests.clone()));
        }
        for (k, b) in svc_keys.iter().zip(before) {
            let a = self.services.in_force(k).cloned();
            if a != b {
                changes.services.push((*k, b, a));
            }
        }

        let addr_keys: BTreeSet<IpAddr> = old.addresses.iter().chain(&new_out.addresses).copied().collect();
        let before: Vec<bool> = addr_keys.iter().map(|a| self.addresses.in_force(a).is_some()).collect();
        for a in &old.addresses {
            self.addresses.release(key, a);
        }
        for a in &new_out.addresses {
            self.addresses.claim(key, *a, ());
        }
        for (a, b) in addr_keys.iter().zip(before) {
            match (b, self.addresses.in_force(a).is_some()) {
                (false, true) => changes.addresses_added.push(*a),
                (true, false) => changes.addresses_removed.push(*a),
                _ => {}
            }
        }

        let el_key = |e: &Element| (e.family, e.set, e.key.clone());
        let el_keys: BTreeSet<_> = old.elements.iter().chain(&new_out.elements).map(el_key).collect();
        let before: Vec<Option<Element>> =
            el_keys.iter().map(|k| self.elements.in_force(k).cloned()).collect();
        for e in &old.elements {
            self.elements.release(key, &el_key(e));
        }
        for e in &new_out.elements {
            self.elements.claim(key, el_key(e), e.clone());
        }
        for (k, b) in el_keys.iter().zip(before) {
            let a = self.elements.in_force(k).cloned();
            if a != b {
                changes.elements_removed.extend(b);
                changes.elements_added.extend(a);
            }
        }

        if let Some(out) = new {
            self.ports.insert(key.clone(), out);
        }
        changes
    }

    /// Every virtual service in force.
    pub fn all_services(&self) -> BTreeMap<ServiceKey, &ServiceValue> {
        self.services.iter().map(|(k, v)| (*k, v)).collect()
    }

    pub fn all_addresses(&self) -> BTreeSet<IpAddr> {
        self.addresses.iter().map(|(a, _)| *a).collect()
    }

    pub fn all_elements(&self) -> Vec<&Element> {
        self.elements.iter().map(|(_, e)| e).collect()
    }
}

fn needs_mark(p: &ServicePortPlan, config: &NodeConfig) -> bool {
    compile::needs_mark(p, &config.nodeport_ips(p.family))
}
