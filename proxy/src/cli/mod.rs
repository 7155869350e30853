//! Command-line interface: `ferry run | render | trace | cleanup | status`.

pub mod render;
pub mod run;
pub mod status;
pub mod trace;

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::backend::BackendKind;
use crate::config::{NodePortAddress, resolve_node_port_addresses};
use crate::model::{parse_cidr_sloppy, parse_ip_sloppy};
use crate::plan::NodeConfig;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "A kube-proxy replacement: Services to Pods via nftables, eBPF or IPVS"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the cluster (or a manifest directory) and program this node.
    Run(run::RunArgs),
    /// Print what would be programmed; touches nothing.
    Render(render::RenderArgs),
    /// Explain what happens to one new connection.
    Trace(trace::TraceArgs),
    /// Remove everything ferry installed on this node.
    Cleanup(CleanupArgs),
    /// What the running daemon has programmed, and its last syncs.
    Status(status::StatusArgs),
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[arg(long, value_enum, default_value = "nftables")]
    pub backend: BackendKind,
    /// eBPF: the bpffs ferry pinned its maps and links under.
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<std::path::PathBuf>,
    /// IPVS: virtual services on addresses in these CIDRs are left alone (as `ferry run`'s
    /// --ipvs-exclude-cidrs / ipvs.excludeCIDRs).
    #[arg(long = "ipvs-exclude-cidrs", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr_arg)]
    pub ipvs_exclude_cidrs: Vec<ipnet::IpNet>,
}

fn parse_cidr_arg(s: &str) -> Result<ipnet::IpNet, String> {
    crate::model::addr::parse_cidr_sloppy(s).ok_or_else(|| format!("{s:?} is not a CIDR"))
}

/// Flags describing this node, shared by every command that plans.
#[derive(Debug, Clone, Args, Default)]
pub struct NodeFlags {
    /// This node's name (endpoints with this nodeName are local).
    #[arg(long)]
    pub node_name: Option<String>,
    /// An address of this node; repeat (or separate with commas) for every address
    /// (dual-stack: one per family at least).
    #[arg(long = "node-ip", value_name = "IP", value_delimiter = ',')]
    pub node_ips: Vec<String>,
    /// Pod CIDR of the cluster, the local-traffic detector; repeat (or comma-separate) per family.
    #[arg(long = "cluster-cidr", value_name = "CIDR", value_delimiter = ',')]
    pub cluster_cidrs: Vec<String>,
    /// Service CIDR, added to ServiceCIDR objects; repeat (or comma-separate) per family.
    #[arg(long = "service-cidr", value_name = "CIDR", value_delimiter = ',')]
    pub service_cidrs: Vec<String>,
    /// Only node addresses inside these CIDRs answer NodePorts (default: all); kube-proxy's
    /// keywords `primary` (the first --node-ip of each family), `localhost` and `all` work too.
    #[arg(long = "nodeport-addresses", value_name = "CIDR", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Masquerade all traffic sent to ClusterIPs (`--masquerade-all=false` overrides --config).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,
}

impl NodeFlags {
    /// Validates the flags into a node configuration; `default_name` fills a missing name.
    pub fn to_config(&self, default_name: Option<&str>) -> anyhow::Result<NodeConfig> {
        let node_name = match (&self.node_name, default_name) {
            (Some(n), _) => n.clone(),
            (None, Some(n)) => n.to_owned(),
            (None, None) => String::new(),
        };
        let node_ips: Vec<IpAddr> =
            self.node_ips.iter().map(|s| ip(s, "--node-ip")).collect::<anyhow::Result<_>>()?;
        let nodeport_addresses = self
            .nodeport_addresses
            .iter()
            .map(|s| match NodePortAddress::parse(s) {
                Some(a) => Ok(a),
                None => bail!("--nodeport-addresses {s:?} is not a CIDR (nor primary, localhost, all)"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(NodeConfig {
            node_name,
            nodeport_addresses: resolve_node_port_addresses(&nodeport_addresses, &node_ips),
            node_ips,
            cluster_cidrs: cidrs(&self.cluster_cidrs, "--cluster-cidr")?,
            service_cidrs: cidrs(&self.service_cidrs, "--service-cidr")?,
            masquerade_all: self.masquerade_all.unwrap_or(false),
        })
    }
}

fn ip(s: &str, flag: &str) -> anyhow::Result<IpAddr> {
    parse_ip_sloppy(s).with_context(|| format!("{flag} {s:?} is not an IP address"))
}

fn cidrs(v: &[String], flag: &str) -> anyhow::Result<Vec<IpNet>> {
    v.iter()
        .map(|s| match parse_cidr_sloppy(s) {
            Some(n) => Ok(n),
            None => bail!("{flag} {s:?} is not a CIDR"),
        })
        .collect()
}

/// `--manifests DIR` for the offline commands.
#[derive(Debug, Clone, Args)]
pub struct ManifestArgs {
    /// Directory of YAML manifests (Service, EndpointSlice, Node, ServiceCIDR).
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
}
