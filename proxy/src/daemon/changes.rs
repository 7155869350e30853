//! What the pending changes are made of, for kube-proxy's change metrics and the network
//! programming latency: which services wait for a sync because of a Service event, which
//! because of an EndpointSlice event, and since when.
//!
//! The store decides what is a change (an update that changes nothing is none); this tracker
//! only attributes the services the store marks as pending to the kind of event that marked
//! them, and remembers the change's trigger time: the EndpointSlice controller's
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation when there is one (kube-proxy's
//! measure: from the Pod change to programmed), else the moment ferry received the event.

use std::collections::HashMap;
use std::time::SystemTime;

use k8s_openapi::api::discovery::v1 as discovery;

use crate::model::{Kind, ServiceKey};
use crate::store::{Changes, Object, StoreEvent};

/// The EndpointSlice controller's record of when the change it reflects happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The label naming an EndpointSlice's service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Which kind of object an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventClass {
    Service,
    Endpoints,
    /// Node, ServiceCIDR: everything is re-planned.
    Other,
}

impl EventClass {
    pub fn of(kind: Kind) -> Self {
        match kind {
            Kind::Service => EventClass::Service,
            Kind::EndpointSlice => EventClass::Endpoints,
            Kind::Node | Kind::ServiceCIDR => EventClass::Other,
        }
    }
}

/// An event as the tracker sees it, taken before the store consumes it.
#[derive(Debug, Clone)]
pub struct EventInfo {
    pub class: EventClass,
    /// The service the event is about, when the event says (not for an EndpointSlice delete).
    pub service: Option<ServiceKey>,
    /// How many API objects the event carries (one, or a whole list).
    pub objects: usize,
    /// The trigger-time annotation of an EndpointSlice.
    pub trigger: Option<SystemTime>,
}

impl EventInfo {
    /// Describes a single-kind event (see [`split_by_kind`]).
    pub fn of(event: &StoreEvent) -> Self {
        match event {
            StoreEvent::Apply(obj) => {
                let r = obj.object_ref();
                let (service, trigger) = match obj {
                    Object::Service(_) => (Some(ServiceKey::new(&r.namespace, &r.name)), None),
                    Object::EndpointSlice(s) => (slice_service(s), trigger_time(s)),
                    _ => (None, None),
                };
                Self { class: EventClass::of(r.kind), service, objects: 1, trigger }
            }
            StoreEvent::Delete(r) => {
                let service = (r.kind == Kind::Service).then(|| ServiceKey::new(&r.namespace, &r.name));
                Self { class: EventClass::of(r.kind), service, objects: 1, trigger: None }
            }
            StoreEvent::Replace { kinds, objects } => Self {
                class: kinds.first().copied().map_or(EventClass::Other, EventClass::of),
                service: None,
                objects: objects.len(),
                trigger: None,
            },
            // `split_by_kind` flattens batches; one reaching here is described by its size.
            StoreEvent::Batch(events) => {
                Self { class: EventClass::Other, service: None, objects: events.len(), trigger: None }
            }
        }
    }
}

fn slice_service(slice: &discovery::EndpointSlice) -> Option<ServiceKey> {
    let ns = slice.metadata.namespace.as_deref()?;
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey::new(ns, name))
}

fn trigger_time(slice: &discovery::EndpointSlice) -> Option<SystemTime> {
    let raw = slice.metadata.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    let ts: k8s_openapi::jiff::Timestamp = raw.parse().ok()?;
    Some(SystemTime::from(ts)).filter(|t| *t <= SystemTime::now())
}

/// Splits a `Replace` of several kinds (a manifest directory snapshot) into one per kind, and a
/// `Batch` into its events, so each can be attributed. Equivalent for the store as long as no
/// sync runs in between (the daemon handles them all before it syncs).
pub fn split_by_kind(event: StoreEvent) -> Vec<StoreEvent> {
    match event {
        StoreEvent::Batch(events) => events.into_iter().flat_map(split_by_kind).collect(),
        StoreEvent::Replace { kinds, objects } if kinds.len() > 1 => {
            let mut by_kind: Vec<(Kind, Vec<Object>)> = kinds.iter().map(|k| (*k, Vec::new())).collect();
            for obj in objects {
                let kind = obj.kind();
                match by_kind.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, v)) => v.push(obj),
                    // Not of a replaced kind: the store would apply it anyway; keep it.
                    None => by_kind.push((kind, vec![obj])),
                }
            }
            by_kind.into_iter().map(|(k, objects)| StoreEvent::Replace { kinds: vec![k], objects }).collect()
        }
        other => vec![other],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    service: bool,
    endpoints: bool,
    trigger: SystemTime,
}

/// Changes waiting for the next successful sync.
#[derive(Debug, Default)]
pub struct ChangeTracker {
    /// Services the store has marked since the last sync started.
    entries: HashMap<ServiceKey, Entry>,
    /// Changes of syncs that failed: the next (full) sync programs them.
    carried: HashMap<ServiceKey, Entry>,
}

/// What [`ChangeTracker::record`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// A service became pending.
    pub queued: bool,
}

/// The changes one sync programs.
#[derive(Debug, Default)]
pub struct InFlight {
    entries: HashMap<ServiceKey, Entry>,
}

impl InFlight {
    /// Trigger times of the changes it programs.
    pub fn triggers(&self) -> impl Iterator<Item = SystemTime> + '_ {
        self.entries.values().map(|e| e.trigger)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl ChangeTracker {
    /// Attributes what became pending in the store through `event` (already handled).
    pub fn record(&mut self, pending: &Changes, event: &EventInfo, received: SystemTime) -> Recorded {
        let trigger = event.trigger.unwrap_or(received);
        let mut queued = false;
        let mut mark = |entries: &mut HashMap<ServiceKey, Entry>, key: &ServiceKey| {
            let e = entries.entry(key.clone()).or_insert_with(|| {
                queued = true;
                Entry { service: false, endpoints: false, trigger }
            });
            e.trigger = e.trigger.min(trigger);
            match event.class {
                EventClass::Service => e.service = true,
                EventClass::Endpoints => e.endpoints = true,
                EventClass::Other => {}
            }
        };
        if let Some(key) = &event.service
            && pending.services.contains(key)
        {
            mark(&mut self.entries, key);
        }
        // The store marks only what the event touched, so any pending service not tracked yet
        // is this event's doing (an EndpointSlice delete, a list).
        if pending.services.len() > self.entries.len() {
            let new: Vec<ServiceKey> =
                pending.services.iter().filter(|k| !self.entries.contains_key(*k)).cloned().collect();
            for key in &new {
                mark(&mut self.entries, key);
            }
        }
        Recorded { queued }
    }

    /// Services waiting because of Service changes, and because of EndpointSlice changes.
    pub fn pending_counts(&self) -> (usize, usize) {
        let all = self.entries.values().chain(self.carried.values());
        all.fold((0, 0), |(s, e), x| (s + usize::from(x.service), e + usize::from(x.endpoints)))
    }

    /// Everything pending goes into the sync that starts now.
    pub fn take(&mut self) -> InFlight {
        let mut entries = std::mem::take(&mut self.entries);
        for (k, e) in self.carried.drain() {
            merge(&mut entries, k, e);
        }
        InFlight { entries }
    }

    /// The sync failed: its changes wait for the next one.
    pub fn restore(&mut self, in_flight: InFlight) {
        for (k, e) in in_flight.entries {
            merge(&mut self.carried, k, e);
        }
    }
}

fn merge(into: &mut HashMap<ServiceKey, Entry>, key: ServiceKey, e: Entry) {
    let slot = into.entry(key).or_insert(e);
    slot.service |= e.service;
    slot.endpoints |= e.endpoints;
    slot.trigger = slot.trigger.min(e.trigger);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn changes(keys: &[&str]) -> Changes {
        Changes { services: keys.iter().map(|k| ServiceKey::new("ns", *k)).collect(), all: false }
    }

    fn info(class: EventClass, service: Option<&str>) -> EventInfo {
        EventInfo { class, service: service.map(|s| ServiceKey::new("ns", s)), objects: 1, trigger: None }
    }

    #[test]
    fn pending_services_are_attributed_to_the_event_kind_that_marked_them() {
        let t = SystemTime::now();
        let mut tr = ChangeTracker::default();
        assert!(tr.record(&changes(&["a"]), &info(EventClass::Service, Some("a")), t).queued);
        // b's slice was deleted: the event does not name b, the store's pending set does.
        assert!(tr.record(&changes(&["a", "b"]), &info(EventClass::Endpoints, None), t).queued);
        // a's endpoints change too: a counts as both.
        assert!(!tr.record(&changes(&["a", "b"]), &info(EventClass::Endpoints, Some("a")), t).queued);
        // An update the store ignored (c not pending) is no change.
        tr.record(&changes(&["a", "b"]), &info(EventClass::Service, Some("c")), t);
        assert_eq!(tr.pending_counts(), (1, 2));
    }

    #[test]
    fn the_earliest_trigger_time_wins_and_failed_syncs_carry_their_changes() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut tr = ChangeTracker::default();
        let mut ev = info(EventClass::Endpoints, Some("a"));
        ev.trigger = Some(t0);
        tr.record(&changes(&["a"]), &ev, t0 + Duration::from_secs(5));
        tr.record(&changes(&["a"]), &info(EventClass::Endpoints, Some("a")), t0 + Duration::from_secs(9));
        let flight = tr.take();
        assert_eq!(flight.triggers().collect::<Vec<_>>(), vec![t0]);
        assert_eq!(tr.pending_counts(), (0, 0));
        tr.restore(flight);
        assert_eq!(tr.pending_counts(), (0, 1), "still waiting");
        tr.record(&changes(&["b"]), &info(EventClass::Service, Some("b")), t0);
        assert_eq!(tr.take().len(), 2);
    }

    #[test]
    fn a_mixed_replace_is_split_per_kind() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns"}
        }))
        .unwrap();
        let ev = StoreEvent::Replace {
            kinds: vec![Kind::Service, Kind::EndpointSlice],
            objects: vec![Object::Service(std::sync::Arc::new(svc))],
        };
        let parts = split_by_kind(ev);
        assert_eq!(parts.len(), 2);
        let classes: Vec<(EventClass, usize)> =
            parts.iter().map(EventInfo::of).map(|i| (i.class, i.objects)).collect();
        assert_eq!(classes, vec![(EventClass::Service, 1), (EventClass::Endpoints, 0)]);
    }

    #[test]
    fn a_slice_names_its_service_and_trigger_time() {
        let slice: discovery::EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "a-xyz", "namespace": "ns",
                "labels": {"kubernetes.io/service-name": "a"},
                "annotations": {TRIGGER_TIME_ANNOTATION: "2024-01-02T03:04:05Z"}
            },
            "addressType": "IPv4", "endpoints": []
        }))
        .unwrap();
        let i = EventInfo::of(&StoreEvent::Apply(Object::EndpointSlice(std::sync::Arc::new(slice))));
        assert_eq!(i.service, Some(ServiceKey::new("ns", "a")));
        assert_eq!(i.trigger, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_164_645)));
    }
}
