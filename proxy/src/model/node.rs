//! The Node ferry runs on: its topology labels and whether it is going away.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Taint the cluster autoscaler puts on a node it is about to delete; kube-proxy reports
/// unhealthy then so load balancers drain the node first.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    pub to_be_deleted_taint: bool,
}

impl NodeInfo {
    pub fn from_k8s(node: &core::Node) -> Option<Self> {
        let name = node.metadata.name.clone()?;
        let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
        Some(Self {
            name,
            labels: node.metadata.labels.clone().unwrap_or_default(),
            deleting: node.metadata.deletion_timestamp.is_some(),
            to_be_deleted_taint: taints.into_iter().flatten().any(|t| t.key == TO_BE_DELETED_TAINT),
        })
    }

    pub fn zone(&self) -> Option<&str> {
        self.labels.get(ZONE_LABEL).map(String::as_str)
    }
}
