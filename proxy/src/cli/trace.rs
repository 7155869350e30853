//! `ferry trace`: the verdict for one new connection.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, ValueEnum};

use super::{ManifestArgs, NodeFlags};
use crate::model::{Protocol, parse_ip_sloppy};
use crate::plan::{self, verdict};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub manifests: ManifestArgs,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Source address of the connection.
    #[arg(long)]
    pub from: String,
    /// Destination, `IP:PORT[/tcp|udp|sctp]` (IPv6 as `[addr]:port`).
    #[arg(long)]
    pub to: String,
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

pub fn parse_destination(s: &str) -> anyhow::Result<(SocketAddr, Protocol)> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => {
            (a, Protocol::parse_cli(p).with_context(|| format!("unknown protocol {p:?} in --to {s:?}"))?)
        }
        None => (s, Protocol::Tcp),
    };
    let dst: SocketAddr =
        addr.parse().with_context(|| format!("--to {s:?} is not IP:PORT (IPv6 as [addr]:port)"))?;
    Ok((dst, proto))
}

pub fn run(args: &TraceArgs) -> anyhow::Result<()> {
    let src = parse_ip_sloppy(&args.from)
        .with_context(|| format!("--from {:?} is not an IP address", args.from))?;
    let (dst, proto) = parse_destination(&args.to)?;
    let (store, config) = super::render::load(&args.manifests, &args.node)?;
    let plan = plan::build(&store, &config);
    let v = verdict::trace(&plan, &config, src, dst, proto);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&v)?),
        Output::Text => {
            println!("{src} -> {dst}/{proto}");
            for line in &v.explanation {
                println!("  {line}");
            }
            let verdict = match v.verdict {
                verdict::VerdictKind::Endpoints => "endpoints",
                verdict::VerdictKind::Reject => "REJECT",
                verdict::VerdictKind::Drop => "DROP",
                verdict::VerdictKind::None => "no match",
            };
            println!("verdict: {verdict}");
            if !v.endpoints.is_empty() {
                let eps: Vec<String> = v.endpoints.iter().map(ToString::to_string).collect();
                println!("endpoints: {}", eps.join(" "));
            }
            println!("masquerade: {}", if v.masquerade { "yes" } else { "no" });
        }
    }
    Ok(())
}
