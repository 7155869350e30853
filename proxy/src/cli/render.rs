//! `ferry render`: the plan, and what a backend would program for it.

use std::fmt::Write;

use clap::Args;

use super::{ManifestArgs, NodeFlags};
use crate::backend::{self, BackendKind, BackendOptions};
use crate::plan::{self, Plan};
use crate::source::manifests;
use crate::store::Store;

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub manifests: ManifestArgs,
    #[command(flatten)]
    pub node: NodeFlags,
    #[arg(long, value_enum, default_value = "nftables")]
    pub backend: BackendKind,
    /// Print only the plan, not the backend's program.
    #[arg(long)]
    pub plan_only: bool,
}

pub fn run(args: &RenderArgs) -> anyhow::Result<()> {
    let (store, config) = load(&args.manifests, &args.node)?;
    let plan = plan::build(&store, &config);
    print!("{}", describe_plan(&plan));
    for p in store.problems() {
        println!("# skipped: {p}");
    }
    if args.plan_only {
        return Ok(());
    }
    let backend = backend::build(args.backend, &BackendOptions::default())?;
    println!("\n# {} program ferry would apply:", backend.name());
    print!("{}", backend.render(&plan, &config));
    Ok(())
}

/// Reads a manifest directory into a store, and the node configuration (the node name defaults
/// to the only Node object in the directory, if there is one).
pub fn load(m: &ManifestArgs, node: &NodeFlags) -> anyhow::Result<(Store, crate::plan::NodeConfig)> {
    let (event, errors) = manifests::load_once(&m.manifests)?;
    for e in &errors {
        eprintln!("warning: {e}");
    }
    let mut store = Store::new();
    store.handle(event);
    let node_name = store.node().map(|n| n.name.clone());
    let config = node.to_config(node_name.as_deref())?;
    Ok((store, config))
}

pub fn describe_plan(plan: &Plan) -> String {
    let mut out = String::new();
    for p in plan.ports.values() {
        let _ = writeln!(out, "{} {}: clusterIP {}:{}", p.family, p.name, p.cluster_ip, p.port);
        if let Some(np) = p.node_port {
            let _ = writeln!(out, "  nodePort {np}");
        }
        for ip in &p.load_balancer_ips {
            let _ = writeln!(out, "  loadBalancer {ip}");
        }
        for ip in &p.external_ips {
            let _ = writeln!(out, "  externalIP {ip}");
        }
        if !p.source_ranges.is_empty() {
            let r: Vec<String> = p.source_ranges.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "  sourceRanges {}", r.join(","));
        }
        let pol = |local| if local { "Local" } else { "Cluster" };
        let _ = writeln!(
            out,
            "  policy internal={} external={}{}",
            pol(p.internal_policy_local),
            pol(p.external_policy_local),
            p.affinity_timeout.map(|t| format!(" affinity=ClientIP/{t}s")).unwrap_or_default()
        );
        let eps =
            |v: &[std::net::SocketAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
        let _ = writeln!(out, "  cluster endpoints: [{}]", eps(&p.cluster_endpoints));
        if p.internal_policy_local || p.external_policy_local {
            let _ = writeln!(out, "  local endpoints: [{}]", eps(&p.local_endpoints));
        }
        if !p.has_endpoints {
            let _ = writeln!(out, "  no endpoints: REJECT");
        }
    }
    out
}
