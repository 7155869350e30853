//! `cargo xtask demo`: ferry's main job on an embedded default. Builds a sandbox (a node, three
//! pods, a client, an external host), runs `ferry run --backend nftables --manifests` inside the
//! node namespace on a copy of `examples/demo`, sends traffic to the Service, edits the manifests
//! live (scale down, then up) and shows the effect. Everything is removed at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use ferry_sandbox::{Cluster, ClusterSpec, Process, Sandbox, Signal};

use crate::{setup, workspace_root};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Requests per round.
    #[arg(long, default_value_t = 30)]
    pub requests: usize,
}

const CLUSTER_IP: &str = "10.96.0.10:80";
const CLUSTER_IP6: &str = "[fd00:96::10]:80";
const NODE_PORT: &str = "192.168.0.10:30080";

pub fn run(args: &Args) -> Result<()> {
    ensure!(setup::is_root()?, "the demo creates network namespaces: run it as root");
    setup::run(&setup::Args::default())?;
    let ferry = build_ferry()?;

    say("creating the sandbox: a node with 3 pods and a client pod, a second node, an external host");
    let sb = Sandbox::new("demo")?;
    let cluster =
        Cluster::build(&sb, &ClusterSpec { local_pods: 3, remote_pods: 0, responder_port: Some(8080) })?;
    // Node-originated connections to ClusterIPs need some route before DNAT re-routes them;
    // it stays inside the node's namespace.
    cluster.node.ns.route_dev(&cluster.service_cidr4.to_string(), "lo")?;

    let dir = tempdir()?;
    for f in ["node.yaml", "web.yaml"] {
        std::fs::copy(workspace_root().join("examples/demo").join(f), dir.join(f))
            .with_context(|| format!("copying examples/demo/{f}"))?;
    }
    let mut cmd: Vec<String> =
        vec![ferry.display().to_string(), "run".into(), "--backend".into(), "nftables".into()];
    cmd.extend(["--manifests".into(), dir.display().to_string()]);
    cmd.extend(cluster.node_flags());
    cmd.extend(["--min-sync-period".into(), "100ms".into()]);
    say(&format!("starting in the node namespace: ferry {}", cmd[1..].join(" ")));
    let proc = cluster.node.ns.spawn(&cmd)?;
    wait_syncs(&proc, 1)?;
    println!("  ferry programmed the node: {}", last_sync_line(&proc));

    let client = &cluster.client.ns;
    say(&format!("{} TCP requests from the client pod to ClusterIP {CLUSTER_IP}", args.requests));
    show(&spread(|| client.tcp_request(parse(CLUSTER_IP), Duration::from_secs(1)), args.requests));
    say(&format!("{} UDP requests to {}/udp (the service's second port)", args.requests, "10.96.0.10:53"));
    show(&spread(|| client.udp_request(parse("10.96.0.10:53"), Duration::from_secs(1)), args.requests));
    say(&format!("{} TCP requests over IPv6 to {CLUSTER_IP6}", args.requests));
    show(&spread(|| client.tcp_request(parse(CLUSTER_IP6), Duration::from_secs(1)), args.requests));
    say(&format!(
        "{} TCP requests from the external host to NodePort {NODE_PORT} (masqueraded)",
        args.requests
    ));
    show(&spread(|| cluster.ext.ns.tcp_request(parse(NODE_PORT), Duration::from_secs(1)), args.requests));

    say("editing web.yaml live: scale down to one endpoint (10.0.1.10)");
    let full = std::fs::read_to_string(dir.join("web.yaml"))?;
    let one = scale_down(&full);
    std::fs::write(dir.join("web.yaml"), &one)?;
    wait_syncs(&proc, 2)?;
    println!("  {}", last_sync_line(&proc));
    show(&spread(|| client.tcp_request(parse(CLUSTER_IP), Duration::from_secs(1)), args.requests));

    say("scaling back up to three endpoints");
    std::fs::write(dir.join("web.yaml"), &full)?;
    wait_syncs(&proc, 3)?;
    println!("  {}", last_sync_line(&proc));
    show(&spread(|| client.tcp_request(parse(CLUSTER_IP), Duration::from_secs(1)), args.requests));

    say("ferry trace: what happens to a connection from the external host to the NodePort");
    let trace = Command::new(&ferry)
        .args(["trace", "--manifests"])
        .arg(&dir)
        .args(cluster.node_flags())
        .args(["--from", "192.168.0.100", "--to", "192.168.0.10:30080/tcp"])
        .output()
        .context("running ferry trace")?;
    print!("{}", String::from_utf8_lossy(&trace.stdout));

    say("stopping ferry and removing the sandbox");
    proc.signal(Signal::SIGTERM)?;
    let _ = proc.wait_timeout(Duration::from_secs(5));
    drop(sb);
    let _ = std::fs::remove_dir_all(&dir);
    say("done");
    Ok(())
}

fn build_ferry() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "-p", "proxy", "--bin", "ferry"])
        .status()
        .context("building ferry")?;
    ensure!(status.success(), "building ferry failed");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
    Ok(target.join("debug/ferry"))
}

fn say(s: &str) {
    println!("\n\u{25b6} {s}");
}

fn parse(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| unreachable!("constant address {s}"))
}

/// Keeps only the first endpoint of each slice in the demo manifest.
fn scale_down(yaml: &str) -> String {
    let mut out = String::new();
    let mut in_endpoints = false;
    let mut kept = 0;
    let mut skipping = false;
    for line in yaml.lines() {
        if line.starts_with("endpoints:") {
            in_endpoints = true;
            kept = 0;
        } else if !line.starts_with(' ') && !line.starts_with("- ") {
            in_endpoints = false;
        }
        if in_endpoints && line.starts_with("- addresses:") {
            kept += 1;
            skipping = kept > 1;
        }
        if !(in_endpoints && skipping) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn wait_syncs(proc: &Process, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if proc.output().matches(" synced").count() >= n {
            return Ok(());
        }
        if let Ok(Some(status)) = proc.try_wait() {
            bail!("ferry exited ({status}):\n{}", proc.output());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("ferry did not sync in time:\n{}", proc.output())
}

fn last_sync_line(proc: &Process) -> String {
    let out = proc.output();
    let line = out.lines().rfind(|l| l.contains(" synced")).unwrap_or_default();
    // Drop the timestamp and level for the demo's eyes.
    line.split_once("synced").map(|(_, rest)| format!("synced{rest}")).unwrap_or_default()
}

fn spread<E: std::fmt::Display>(
    mut request: impl FnMut() -> std::result::Result<ferry_sandbox::Reply, E>,
    n: usize,
) -> BTreeMap<String, (usize, String)> {
    let mut seen: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for _ in 0..n {
        match request() {
            Ok(r) => {
                let e = seen.entry(r.server.to_string()).or_default();
                e.0 += 1;
                e.1 = r.peer.ip().to_string();
            }
            Err(err) => seen.entry(format!("failed: {err}")).or_default().0 += 1,
        }
    }
    seen
}

fn show(seen: &BTreeMap<String, (usize, String)>) {
    for (server, (count, peer)) in seen {
        let bar = "\u{2588}".repeat(*count);
        if peer.is_empty() {
            println!("  {server:<26} {count:>3} {bar}");
        } else {
            println!("  {server:<26} {count:>3} {bar:<30} (pod saw source {peer})");
        }
    }
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
