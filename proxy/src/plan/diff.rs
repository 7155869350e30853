//! The difference between two plans: what an incremental backend must change.

use std::sync::Arc;

use super::{Plan, ServicePortPlan};

#[derive(Debug, Default, Clone)]
pub struct PlanDiff {
    pub added: Vec<Arc<ServicePortPlan>>,
    /// (previous, current)
    pub changed: Vec<(Arc<ServicePortPlan>, Arc<ServicePortPlan>)>,
    pub removed: Vec<Arc<ServicePortPlan>>,
    pub cluster_ips_changed: bool,
    pub service_cidrs_changed: bool,
}

impl PlanDiff {
    pub fn between(old: &Plan, new: &Plan) -> Self {
        let mut diff = PlanDiff::default();
        for (k, p) in &new.ports {
            match old.ports.get(k) {
                None => diff.added.push(p.clone()),
                Some(prev) if prev != p => diff.changed.push((prev.clone(), p.clone())),
                Some(_) => {}
            }
        }
        for (k, p) in &old.ports {
            if !new.ports.contains_key(k) {
                diff.removed.push(p.clone());
            }
        }
        diff.cluster_ips_changed = old.cluster_ips != new.cluster_ips;
        diff.service_cidrs_changed = old.service_cidrs != new.service_cidrs;
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && !self.cluster_ips_changed
            && !self.service_cidrs_changed
    }

    /// Number of service ports touched.
    pub fn len(&self) -> usize {
        self.added.len() + self.changed.len() + self.removed.len()
    }
}
