//! Sources feed the store: the Kubernetes API (kube-rs watchers) or a manifest directory.

pub mod kube;
pub mod manifests;
