//! What the daemon reports about the plan after each sync — the service ports that need a
//! health-check server, and the ports left without a local endpoint — kept up to date from the
//! plan diffs, so that a one-endpoint change costs O(change) here too and not a walk over every
//! service port (50,000 at the large end).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::plan::{PlanDiff, PortKey, ServicePortPlan};

#[derive(Debug, Default)]
pub struct PlanStats {
    /// Ports with a Local external policy and a healthCheckNodePort, in plan order (the first
    /// port of a service, and the first service of a health-check port, wins).
    health_checked: BTreeMap<PortKey, Arc<ServicePortPlan>>,
    no_local_internal: usize,
    no_local_external: usize,
}

impl PlanStats {
    /// Follows the planner: call with every diff it returns, whether or not the sync succeeds.
    pub fn update(&mut self, diff: &PlanDiff) {
        let old = diff.removed.iter().chain(diff.changed.iter().map(|(old, _)| old));
        for p in old {
            self.count(p, false);
            self.health_checked.remove(&key(p));
        }
        let new = diff.added.iter().chain(diff.changed.iter().map(|(_, new)| new));
        for p in new {
            self.count(p, true);
            if p.external_policy_local && p.health_check_node_port.is_some() {
                self.health_checked.insert(key(p), p.clone());
            }
        }
    }

    /// Ports that need a health-check server, in plan order.
    pub fn health_checked(&self) -> impl Iterator<Item = &ServicePortPlan> {
        self.health_checked.values().map(AsRef::as_ref)
    }

    /// Service ports with a Local policy whose endpoints are all on other nodes: (internal,
    /// external), as kube-proxy counts them (traffic to them is dropped).
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        (self.no_local_internal, self.no_local_external)
    }

    fn count(&mut self, p: &ServicePortPlan, add: bool) {
        if !p.has_endpoints || !p.local_endpoints.is_empty() {
            return;
        }
        let step = |n: &mut usize, applies: bool| {
            if applies {
                *n = if add { *n + 1 } else { n.saturating_sub(1) };
            }
        };
        step(&mut self.no_local_internal, p.internal_policy_local);
        step(&mut self.no_local_external, p.external_policy_local);
    }
}

fn key(p: &ServicePortPlan) -> PortKey {
    PortKey { family: p.family, name: p.name.clone() }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::plan::{NodeConfig, Planner};
    use crate::store::{Changes, Object, Store, StoreEvent};

    const NODE: &str = "node-a";

    fn lb(name: &str, health_port: u16) -> Object {
        let v = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                "healthCheckNodePort": health_port,
                "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]}});
        Object::Service(Arc::new(serde_json::from_value(v).unwrap()))
    }

    fn slice(svc: &str, node: &str) -> Object {
        let v = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{svc}-1"), "namespace": "ns",
                "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.1.5"], "nodeName": node, "conditions": {"ready": true}}]});
        Object::EndpointSlice(Arc::new(serde_json::from_value(v).unwrap()))
    }

    /// Applies `event`, re-plans what it changed and feeds the diff to `stats`.
    fn step(store: &mut Store, planner: &mut Planner, stats: &mut PlanStats, event: StoreEvent) {
        let config = NodeConfig::for_test(NODE, &["192.168.0.10"], &["10.0.0.0/16"]);
        store.handle(event);
        let changes: Changes = store.take_changes();
        stats.update(&planner.update(store, &config, &changes));
    }

    #[test]
    fn stats_follow_the_diffs_through_add_change_and_removal() {
        let (mut store, mut planner, mut stats) = (Store::new(), Planner::new(), PlanStats::default());
        let kinds =
            vec![crate::model::Kind::Service, crate::model::Kind::EndpointSlice, crate::model::Kind::Node];
        let all = vec![lb("web", 32000), slice("web", "node-b")];
        step(&mut store, &mut planner, &mut stats, StoreEvent::Replace { kinds, objects: all });
        assert_eq!(stats.no_local_endpoints(), (0, 1), "the only endpoint is on another node");
        let ports: Vec<Option<u16>> = stats.health_checked().map(|p| p.health_check_node_port).collect();
        assert_eq!(ports, vec![Some(32000)]);

        step(&mut store, &mut planner, &mut stats, StoreEvent::Apply(slice("web", NODE)));
        assert_eq!(stats.no_local_endpoints(), (0, 0), "the endpoint moved here");
        assert_eq!(stats.health_checked().count(), 1);

        let gone = crate::model::ObjectRef::new(crate::model::Kind::Service, Some("ns"), Some("web"));
        step(&mut store, &mut planner, &mut stats, StoreEvent::Delete(gone));
        assert_eq!(stats.health_checked().count(), 0);
        assert_eq!(stats.no_local_endpoints(), (0, 0));
    }
}
