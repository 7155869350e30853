//! The difference between two plans: what an incremental backend must change.

use std::net::IpAddr;
use std::sync::Arc;

use super::{Plan, ServicePortPlan};

#[derive(Debug, Default, Clone)]
pub struct PlanDiff {
    pub added: Vec<Arc<ServicePortPlan>>,
    /// (previous, current)
    pub changed: Vec<(Arc<ServicePortPlan>, Arc<ServicePortPlan>)>,
    pub removed: Vec<Arc<ServicePortPlan>>,
    pub cluster_ips_changed: bool,
    /// Which ClusterIPs became allocated and which were freed, so a backend can update its set
    /// of them by the change rather than by comparing every address (a one-service add).
    pub cluster_ips_added: Vec<IpAddr>,
    pub cluster_ips_removed: Vec<IpAddr>,
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
        diff.cluster_ips_added = new.cluster_ips.difference(&old.cluster_ips).copied().collect();
        diff.cluster_ips_removed = old.cluster_ips.difference(&new.cluster_ips).copied().collect();
        diff.cluster_ips_changed = !diff.cluster_ips_added.is_empty() || !diff.cluster_ips_removed.is_empty();
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
