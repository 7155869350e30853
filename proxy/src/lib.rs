//! ferry: a kube-proxy replacement.
//!
//! Data flows `source → store → plan → backend → kernel`; see `docs/architecture.md`.

pub mod admin;
pub mod backend;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod ebpf_object;
pub mod health;
pub mod httpd;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod source;
pub mod store;
