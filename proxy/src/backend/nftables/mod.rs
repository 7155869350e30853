//! The nftables data plane (default). Layout and rationale: README.md beside this file.

pub mod compile;
pub mod family;
pub mod layout;
pub mod runner;
pub mod state;

use std::collections::BTreeSet;
use std::time::Instant;

use tracing::{debug, warn};

use super::{Backend, BackendError, SyncReport};
use crate::plan::{NodeConfig, Plan, PlanDiff, PortKey, ServicePortPlan};
use family::Fam;
pub use runner::{NftCommand, NftRunner};
use state::{FamilyState, TABLE, Transaction};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft rejected the transaction: {stderr}")]
    Rejected { stderr: String },
    #[error("cannot read nft's listing: {0}")]
    Listing(String),
}

pub struct NftBackend {
    runner: Box<dyn NftRunner>,
    families: [FamilyState; 2],
    /// False until a full sync succeeded, and again after a failed transaction: the kernel may
    /// then differ from what ferry believes, so the next sync rewrites everything.
    in_sync: bool,
}

impl NftBackend {
    pub fn new(runner: Box<dyn NftRunner>) -> Self {
        Self {
            runner,
            families: [FamilyState::new(family::V4), FamilyState::new(family::V6)],
            in_sync: false,
        }
    }

    fn rebuild(&mut self, plan: &Plan, config: &NodeConfig) {
        self.families = [FamilyState::new(family::V4), FamilyState::new(family::V6)];
        for st in &mut self.families {
            let fam = st.fam();
            let mut scratch = Transaction::default();
            for p in plan.family(fam.family) {
                st.add_port_fresh(&key_of(p), compile::compile(p, fam));
            }
            for (set, members) in state::globals(plan, fam, config) {
                st.set_global(set, members, &mut scratch);
            }
        }
    }

    fn full_sync(&mut self, plan: &Plan, config: &NodeConfig) -> Result<usize, NftError> {
        self.rebuild(plan, config);
        let mut script = String::new();
        for i in 0..self.families.len() {
            let fam = self.families[i].fam();
            let (have_chains, have_sets) = kernel_names(self.runner.as_mut(), fam)?;
            let st = &self.families[i];
            let (want_chains, want_sets) = st.wanted_names(config);
            let stale_chains: Vec<String> = have_chains.difference(&want_chains).cloned().collect();
            let stale_sets: Vec<String> = have_sets.difference(&want_sets).cloned().collect();
            script.push_str(&st.full_script(config, &stale_chains, &stale_sets));
        }
        self.runner.apply(&script)?;
        for st in &mut self.families {
            st.settle_slots();
        }
        Ok(self.families.iter().map(FamilyState::element_count).sum())
    }

    fn partial_sync(&mut self, diff: &PlanDiff, plan: &Plan, config: &NodeConfig) -> Result<usize, NftError> {
        let mut script = String::new();
        let mut operations = 0;
        for st in &mut self.families {
            let fam = st.fam();
            let mut tx = Transaction::default();
            let ports = diff
                .added
                .iter()
                .map(|p| (p, true))
                .chain(diff.changed.iter().map(|(_, p)| (p, true)))
                .chain(diff.removed.iter().map(|p| (p, false)));
            for (p, present) in ports.filter(|(p, _)| p.family == fam.family) {
                let c = present.then(|| compile::compile(p, fam));
                st.set_port(&key_of(p), c, &mut tx);
            }
            if diff.cluster_ips_changed {
                for (set, members) in state::globals(plan, fam, config) {
                    if set == "cluster_ips" {
                        st.set_global(set, members, &mut tx);
                    }
                }
            }
            operations += tx.operations;
            if !tx.is_empty() {
                tx.render(fam, &mut script);
            }
        }
        if !script.is_empty() {
            debug!(operations, "nftables partial sync");
            self.runner.apply(&script)?;
        }
        Ok(operations)
    }
}

/// Names of the chains and sets (maps included) in ferry's table of one family.
fn kernel_names(
    runner: &mut dyn NftRunner,
    fam: Fam,
) -> Result<(BTreeSet<String>, BTreeSet<String>), NftError> {
    let mut chains = BTreeSet::new();
    let mut sets = BTreeSet::new();
    for what in ["chains", "sets", "maps"] {
        let into = if what == "chains" { &mut chains } else { &mut sets };
        // Terse (-t): names and declarations only; listing 100k elements would take seconds.
        let json = runner.list_json(&["-t", "list", what, fam.ip])?;
        let doc: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| NftError::Listing(e.to_string()))?;
        for item in doc.get("nftables").and_then(|v| v.as_array()).into_iter().flatten() {
            for kind in ["chain", "set", "map"] {
                if let Some(obj) = item.get(kind)
                    && obj.get("table").and_then(|t| t.as_str()) == Some(TABLE)
                    && let Some(name) = obj.get("name").and_then(|n| n.as_str())
                {
                    into.insert(name.to_owned());
                }
            }
        }
    }
    Ok((chains, sets))
}

fn key_of(p: &ServicePortPlan) -> PortKey {
    PortKey { family: p.family, name: p.name.clone() }
}

impl Backend for NftBackend {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn render(&self, plan: &Plan, config: &NodeConfig) -> String {
        let mut copy = NftBackend::new(Box::new(NftCommand::new()));
        copy.rebuild(plan, config);
        copy.families.iter().map(|st| st.full_script(config, &[], &[])).collect()
    }

    fn sync(
        &mut self,
        plan: &Plan,
        diff: Option<&PlanDiff>,
        config: &NodeConfig,
    ) -> Result<SyncReport, BackendError> {
        let start = Instant::now();
        let full = !self.in_sync || diff.is_none() || diff.is_some_and(|d| d.service_cidrs_changed);
        let result = match diff {
            Some(d) if !full => self.partial_sync(d, plan, config),
            _ => self.full_sync(plan, config),
        };
        match result {
            Ok(operations) => {
                self.in_sync = true;
                Ok(SyncReport { full, operations, duration: start.elapsed() })
            }
            Err(e) => {
                warn!(full, "nftables sync failed; the next sync rewrites the whole table: {e}");
                self.in_sync = false;
                Err(e.into())
            }
        }
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let mut script = String::new();
        for fam in [family::V4, family::V6] {
            // `add` first makes the delete idempotent.
            script.push_str(&format!("add table {ip} {TABLE}\ndelete table {ip} {TABLE}\n", ip = fam.ip));
        }
        self.runner.apply(&script)?;
        self.in_sync = false;
        Ok(())
    }
}
