//! ferry: a kube-proxy replacement.
//!
//! Data flows `source → store → plan → backend → kernel`; see `docs/architecture.md`.

pub mod backend;
pub mod cli;
pub mod ebpf_object;
pub mod model;
pub mod plan;
pub mod source;
pub mod store;
