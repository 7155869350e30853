//! ferry: a kube-proxy replacement.
//!
//! Data flows `source → store → plan → backend → kernel`; see `docs/architecture.md`.
