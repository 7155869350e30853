//! The nftables data plane (default). Layout and rationale: README.md beside this file.

pub mod compile;
pub mod family;
pub mod layout;
pub mod netlink;
pub mod ranges;
pub mod runner;
pub mod state;

use std::collections::BTreeSet;

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
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
}

/// Element changes of one family: sets to flush, then (set, keys to delete, elements to add).
type FamilyBatch = (Fam, Vec<String>, Vec<(String, Vec<String>, Vec<String>)>);

pub struct NftBackend {
    runner: Box<dyn NftRunner>,
    /// Writes set elements over netlink; None: everything goes through `nft` (render, tests
    /// without a kernel).
    elements: Option<ElementPath>,
    families: [FamilyState; 2],
    /// False until a full sync succeeded, and again after a failed transaction: the kernel may
    /// then differ from what ferry believes, so the next sync is a full one (which still keeps
    /// the endpoint-choosing chains it finds: their names say what they hold).
    in_sync: bool,
    /// The last sync failed: the next full sync flushes and refills the interval sets rather
    /// than reading them back, so that an element it cannot delete by its listed text (a hand
    /// edit) costs one failed sync, not every one after it.
    failed: bool,
}

impl NftBackend {
    /// A backend that sends everything, elements included, as `nft` scripts.
    pub fn new(runner: Box<dyn NftRunner>) -> Self {
        Self {
            runner,
            elements: None,
            families: [FamilyState::new(family::V4), FamilyState::new(family::V6)],
            in_sync: false,
            failed: false,
        }
    }

    /// The production backend: structure through `nft`, set elements over netlink, in the
    /// current network namespace or the named one.
    pub fn with_netlink(runner: Box<dyn NftRunner>, netns: Option<String>) -> Self {
        let mut b = Self::new(runner);
        b.elements = Some(ElementPath { netns, writer: None });
        b
    }

    /// Runs a three-step change: `before` (nft), element ops per family (netlink), `after`.
    fn apply_split(&mut self, before: &str, batches: &[FamilyBatch], after: &str) -> Result<(), NftError> {
        if !before.is_empty() {
            self.runner.apply(before)?;
        }
        if let Some(path) = &mut self.elements {
            let writer = path.writer()?;
            for (fam, flush, sets) in batches {
                let mut ops: Vec<netlink::Op<'_>> =
                    flush.iter().map(|set| netlink::Op::Flush { set }).collect();
                for (set, keys, _) in sets.iter().filter(|(_, k, _)| !k.is_empty()) {
                    ops.push(netlink::Op::Delete { set, keys });
                }
                for (set, _, elements) in sets.iter().filter(|(_, _, e)| !e.is_empty()) {
                    ops.push(netlink::Op::Add { set, elements });
                }
                if !ops.is_empty()
                    && let Err(e) = writer.apply(fam.ip, TABLE, &ops)
                {
                    // Start the next sync on a fresh socket: nothing queued on this one
                    // (late acknowledgements, an overflow) can be trusted.
                    path.writer = None;
                    return Err(e);
                }
            }
        }
        if !after.is_empty() {
            self.runner.apply(after)?;
        }
        Ok(())
    }

    /// Builds the state for `plan` from scratch.
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
        // What the kernel's interval sets hold (`full_split` says why it matters): known if the
        // last sync succeeded, else read back from the kernel (start, adoption), unless the
        // last sync failed.
        let remembered = self.in_sync.then(|| self.families.each_ref().map(FamilyState::range_elements));
        self.rebuild(plan, config);
        let netlink = self.elements.is_some();
        let (mut before, mut after) = (String::new(), String::new());
        let mut batches = Vec::new();
        for (i, st) in self.families.iter().enumerate() {
            let fam = st.fam();
            let (have_chains, have_sets) = kernel_names(self.runner.as_mut(), fam)?;
            let (want_chains, want_sets) = st.wanted_names(config);
            let stale_chains: Vec<String> = have_chains.difference(&want_chains).cloned().collect();
            let stale_sets: Vec<String> = have_sets.difference(&want_sets).cloned().collect();
            // Also when out of sync (start, adoption, a failed sync): a kept chain's name says
            // what it holds.
            let keep = st.kept_chains(&have_chains);
            let ranges = match &remembered {
                // A set missing from the kernel (a table deleted by hand) is created and filled.
                Some(r) => Some(
                    r[i].iter()
                        .filter(|(set, _)| have_sets.contains(**set))
                        .map(|(s, e)| (*s, e.clone()))
                        .collect(),
                ),
                None if self.failed => None,
                None => match ranges::read(self.runner.as_mut(), fam, &have_sets, &st.range_elements()) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        warn!(error = %e, "cannot read the interval sets back: they are flushed and refilled");
                        None
                    }
                },
            };
            let (split, flush) =
                st.full_split(config, &stale_chains, &stale_sets, keep, ranges.as_ref(), netlink);
            before.push_str(&split.before);
            after.push_str(&split.after);
            batches.push((fam, flush, split.netlink));
        }
        if netlink {
            self.apply_split(&before, &batches, &after)?;
        } else {
            before.push_str(&after);
            self.runner.apply(&before)?;
        }
        for st in &mut self.families {
            st.settle_slots();
        }
        Ok(self.families.iter().map(FamilyState::element_count).sum())
    }

    fn partial_sync(&mut self, diff: &PlanDiff) -> Result<usize, NftError> {
        let netlink = self.elements.is_some();
        let (mut before, mut after) = (String::new(), String::new());
        let mut batches = Vec::new();
        let mut operations = 0;
        for st in &mut self.families {
            let fam = st.fam();
            let mut tx = Transaction::default();
            // (before, after) per port; the state compiles nothing ahead, so the old
            // contribution is compiled again from the old plan.
            let ports = diff
                .added
                .iter()
                .map(|p| (None, Some(p)))
                .chain(diff.changed.iter().map(|(old, new)| (Some(old), Some(new))))
                .chain(diff.removed.iter().map(|p| (Some(p), None)));
            for (old, new) in ports {
                let Some(p) = new.or(old).filter(|p| p.family == fam.family) else { continue };
                let compiled =
                    |p: Option<&std::sync::Arc<ServicePortPlan>>| p.map(|p| compile::compile(p, fam));
                st.set_port(&key_of(p), compiled(old), compiled(new), &mut tx);
            }
            if diff.cluster_ips_changed {
                let of_family = |ips: &[std::net::IpAddr]| -> Vec<String> {
                    let fam_ips = ips.iter().filter(|ip| crate::model::IpFamily::of(ip) == fam.family);
                    fam_ips.map(ToString::to_string).collect()
                };
                let (added, removed) =
                    (of_family(&diff.cluster_ips_added), of_family(&diff.cluster_ips_removed));
                st.change_global("cluster_ips", added, removed, &mut tx);
            }
            operations += tx.operations;
            if !tx.is_empty() {
                let split = tx.split(fam, netlink);
                before.push_str(&split.before);
                after.push_str(&split.after);
                batches.push((fam, Vec::new(), split.netlink));
            }
        }
        if operations > 0 {
            debug!(operations, "nftables partial sync");
            self.apply_split(&before, &batches, &after)?;
        }
        Ok(operations)
    }
}

/// The netlink socket, opened on first use (so `render` never needs one).
struct ElementPath {
    netns: Option<String>,
    writer: Option<netlink::ElementWriter>,
}

impl ElementPath {
    fn writer(&mut self) -> Result<&mut netlink::ElementWriter, NftError> {
        if self.writer.is_none() {
            self.writer = Some(netlink::ElementWriter::new(self.netns.as_deref())?);
        }
        self.writer.as_mut().ok_or_else(|| NftError::Netlink(std::io::Error::other("no netlink socket")))
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

    fn nat_in_conntrack(&self) -> bool {
        true
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
        let full = !self.in_sync || diff.is_none_or(|d| d.service_cidrs_changed);
        let report = SyncReport::run("nftables", full, || match diff {
            Some(d) if !full => self.partial_sync(d),
            _ => self.full_sync(plan, config),
        });
        self.in_sync = report.is_ok();
        self.failed = report.is_err();
        Ok(report?)
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
