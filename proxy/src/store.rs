//! The store: ferry's validated copy of the objects it watches, and what changed since the last
//! sync.
//!
//! Sources feed [`StoreEvent`]s in; the sync loop takes the accumulated [`Changes`] out and
//! re-plans only the services they name (kube-proxy's change trackers). Changes to the Node or
//! to ServiceCIDRs affect every service and mark a full re-plan.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use tracing::{info, warn};

use crate::model::endpoint_slice::SliceRead;
use crate::model::service::ServiceRead;
use crate::model::{
    EndpointSlice, Kind, NodeInfo, ObjectRef, Problem, ProblemReason, Service, ServiceKey, parse_cidr_sloppy,
};

/// An API object as a source delivers it. Shared, so a source can keep the objects it
/// delivered (the manifest source re-sends every file's content) without copying them.
#[derive(Debug, Clone)]
pub enum Object {
    Service(Arc<core::Service>),
    EndpointSlice(Arc<discovery::EndpointSlice>),
    Node(Arc<core::Node>),
    ServiceCidr(Arc<networking::ServiceCIDR>),
}

impl Object {
    pub fn object_ref(&self) -> ObjectRef {
        let (kind, meta) = match self {
            Object::Service(o) => (Kind::Service, &o.metadata),
            Object::EndpointSlice(o) => (Kind::EndpointSlice, &o.metadata),
            Object::Node(o) => (Kind::Node, &o.metadata),
            Object::ServiceCidr(o) => (Kind::ServiceCIDR, &o.metadata),
        };
        ObjectRef::new(kind, meta.namespace.as_deref(), meta.name.as_deref())
    }

    pub fn kind(&self) -> Kind {
        self.object_ref().kind
    }
}

/// What a source reports.
#[derive(Debug, Clone)]
pub enum StoreEvent {
    Apply(Object),
    Delete(ObjectRef),
    /// The complete current set of objects of these kinds (an initial list or a relist).
    /// Objects not in it are deleted, all in one step, so a relist never shows a moment where
    /// existing services are missing.
    Replace {
        kinds: Vec<Kind>,
        objects: Vec<Object>,
    },
    /// Several events that belong together (one manifest file's edit), handled before the
    /// next sync can start, so a sync never sees half of them.
    Batch(Vec<StoreEvent>),
}

/// What changed since the last [`Store::take_changes`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub services: HashSet<ServiceKey>,
    /// Node or ServiceCIDR changed: every service must be re-planned.
    pub all: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }
}

#[derive(Debug, Default)]
pub struct Store {
    services: HashMap<ServiceKey, Service>,
    slices: HashMap<ObjectRef, EndpointSlice>,
    slices_by_service: HashMap<ServiceKey, BTreeSet<ObjectRef>>,
    node: Option<NodeInfo>,
    service_cidrs: BTreeMap<String, Vec<IpNet>>,
    problems: BTreeMap<ObjectRef, Vec<Problem>>,
    problem_counts: BTreeMap<ProblemReason, u64>,
    changes: Changes,
    /// Kinds whose initial list has arrived.
    listed: BTreeSet<Kind>,
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn handle(&mut self, event: StoreEvent) {
        match event {
            StoreEvent::Apply(obj) => {
                self.listed.insert(obj.kind());
                self.apply(obj);
            }
            StoreEvent::Delete(r) => self.delete(&r),
            StoreEvent::Replace { kinds, objects } => {
                let incoming: HashSet<ObjectRef> = objects.iter().map(Object::object_ref).collect();
                let stale: Vec<ObjectRef> =
                    self.object_refs().filter(|r| kinds.contains(&r.kind) && !incoming.contains(r)).collect();
                for obj in objects {
                    self.apply(obj);
                }
                for r in stale {
                    self.delete(&r);
                }
                self.listed.extend(kinds);
            }
            StoreEvent::Batch(events) => {
                for event in events {
                    self.handle(event);
                }
            }
        }
    }

    fn object_refs(&self) -> impl Iterator<Item = ObjectRef> + '_ {
        let services =
            self.services.keys().map(|k| ObjectRef::new(Kind::Service, Some(&k.namespace), Some(&k.name)));
        let slices = self.slices.keys().cloned();
        let node = self.node.iter().map(|n| ObjectRef::new(Kind::Node, None, Some(&n.name)));
        let cidrs = self.service_cidrs.keys().map(|n| ObjectRef::new(Kind::ServiceCIDR, None, Some(n)));
        // Objects that were skipped as invalid are not stored but must still be deletable.
        let problems = self.problems.keys().cloned();
        let mut all: Vec<ObjectRef> =
            services.chain(slices).chain(node).chain(cidrs).chain(problems).collect();
        all.sort();
        all.dedup();
        all.into_iter()
    }

    /// True once every kind in `kinds` has had its initial list: ferry programs nothing before.
    pub fn has_listed(&self, kinds: &[Kind]) -> bool {
        kinds.iter().all(|k| self.listed.contains(k))
    }

    fn apply(&mut self, obj: Object) {
        let object = obj.object_ref();
        match obj {
            Object::Service(svc) => {
                let key = ServiceKey::new(&object.namespace, &object.name);
                match Service::from_k8s(&svc) {
                    ServiceRead::Usable(service, problems) => {
                        self.set_problems(&object, problems);
                        if self.services.get(&key) != Some(&service) {
                            self.services.insert(key.clone(), service);
                            self.changes.services.insert(key);
                        }
                    }
                    ServiceRead::Ignored(why) => {
                        self.set_problems(&object, Vec::new());
                        if self.services.remove(&key).is_some() {
                            info!(service = %key, reason = why, "service no longer handled by ferry");
                            self.changes.services.insert(key);
                        }
                    }
                    ServiceRead::Invalid(p) => {
                        self.set_problems(&object, vec![p]);
                        if self.services.remove(&key).is_some() {
                            self.changes.services.insert(key);
                        }
                    }
                }
            }
            Object::EndpointSlice(slice) => match EndpointSlice::from_k8s(&slice) {
                SliceRead::Usable(slice, problems) => {
                    self.set_problems(&object, problems);
                    if self.slices.get(&object) != Some(&slice) {
                        self.remove_slice(&object);
                        self.changes.services.insert(slice.service.clone());
                        self.slices_by_service
                            .entry(slice.service.clone())
                            .or_default()
                            .insert(object.clone());
                        self.slices.insert(object, slice);
                    }
                }
                SliceRead::Ignored(_) => {
                    self.set_problems(&object, Vec::new());
                    self.remove_slice(&object);
                }
                SliceRead::Invalid(p) => {
                    self.set_problems(&object, vec![p]);
                    self.remove_slice(&object);
                }
            },
            Object::Node(node) => {
                let info = NodeInfo::from_k8s(&node);
                if self.node != info {
                    self.node = info;
                    self.changes.all = true;
                }
            }
            Object::ServiceCidr(cidr) => {
                let mut nets = Vec::new();
                let mut problems = Vec::new();
                for raw in cidr.spec.iter().flat_map(|s| s.cidrs.iter().flatten()) {
                    match parse_cidr_sloppy(raw) {
                        Some(net) => nets.push(net),
                        None => problems.push(Problem {
                            object: object.clone(),
                            reason: ProblemReason::InvalidIp,
                            detail: format!("spec.cidrs: {raw:?} is not a CIDR"),
                        }),
                    }
                }
                self.set_problems(&object, problems);
                if self.service_cidrs.get(&object.name) != Some(&nets) {
                    self.service_cidrs.insert(object.name.clone(), nets);
                    self.changes.all = true;
                }
            }
        }
    }

    fn delete(&mut self, object: &ObjectRef) {
        self.problems.remove(object);
        match object.kind {
            Kind::Service => {
                let key = ServiceKey::new(&object.namespace, &object.name);
                if self.services.remove(&key).is_some() {
                    self.changes.services.insert(key);
                }
            }
            Kind::EndpointSlice => self.remove_slice(object),
            Kind::Node => {
                if self.node.as_ref().is_some_and(|n| n.name == object.name) {
                    self.node = None;
                    self.changes.all = true;
                }
            }
            Kind::ServiceCIDR => {
                if self.service_cidrs.remove(&object.name).is_some() {
                    self.changes.all = true;
                }
            }
        }
    }

    fn remove_slice(&mut self, object: &ObjectRef) {
        if let Some(old) = self.slices.remove(object) {
            self.changes.services.insert(old.service.clone());
            if let Some(set) = self.slices_by_service.get_mut(&old.service) {
                set.remove(object);
                if set.is_empty() {
                    self.slices_by_service.remove(&old.service);
                }
            }
        }
    }

    fn set_problems(&mut self, object: &ObjectRef, problems: Vec<Problem>) {
        if problems.is_empty() {
            self.problems.remove(object);
            return;
        }
        if self.problems.get(object) == Some(&problems) {
            return;
        }
        for p in &problems {
            warn!(object = %p.object, reason = p.reason.as_str(), "skipping: {}", p.detail);
            *self.problem_counts.entry(p.reason).or_default() += 1;
        }
        self.problems.insert(object.clone(), problems);
    }

    /// Takes the changes accumulated since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Changes waiting for the next sync (kube-proxy's "pending changes").
    pub fn pending_changes(&self) -> &Changes {
        &self.changes
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.get(key)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slices_of<'a>(&'a self, key: &ServiceKey) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.slices_by_service.get(key).into_iter().flatten().filter_map(|r| self.slices.get(r))
    }

    pub fn node(&self) -> Option<&NodeInfo> {
        self.node.as_ref()
    }

    /// Service CIDRs from ServiceCIDR objects.
    pub fn service_cidrs(&self) -> impl Iterator<Item = &IpNet> {
        self.service_cidrs.values().flatten()
    }

    /// Objects (or parts) currently skipped, with the reasons.
    pub fn problems(&self) -> impl Iterator<Item = &Problem> {
        self.problems.values().flatten()
    }

    /// How many problems were reported since start, by reason (a counter, for metrics).
    pub fn problem_counts(&self) -> &BTreeMap<ProblemReason, u64> {
        &self.problem_counts
    }
}
