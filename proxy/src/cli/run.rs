//! `ferry run`: the daemon. Sources feed the store; a bounded-frequency loop re-plans what
//! changed and hands the plan diff to the backend.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{error, info, warn};

use super::NodeFlags;
use crate::backend::{self, BackendKind, BackendOptions};
use crate::model::Kind;
use crate::plan::Planner;
use crate::source::kube as kube_source;
use crate::source::manifests;
use crate::store::{Store, StoreEvent};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(long, value_enum, default_value = "nftables")]
    pub backend: BackendKind,
    /// Read objects from this directory instead of the Kubernetes API.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig to reach the API server; without it and without --manifests, the in-cluster
    /// configuration (or $KUBECONFIG) is used.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Full resync interval: rewrites the whole state, repairing drift.
    #[arg(long, value_parser = humantime_duration, default_value = "30s")]
    pub sync_period: Duration,
    /// Minimum time between two syncs; changes arriving faster are merged.
    #[arg(long, value_parser = humantime_duration, default_value = "1s")]
    pub min_sync_period: Duration,
}

/// Parses `500ms`, `2s`, `1m`, `1h`.
pub fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 2s, 1m"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    })
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node_name = args.node.node_name.clone().context("--node-name is required")?;
    let config = args.node.to_config(Some(&node_name))?;
    let mut backend = backend::build(args.backend, &BackendOptions::default())?;
    let (tx, mut rx) = mpsc::channel::<StoreEvent>(1024);
    let required: &[Kind] = match &args.manifests {
        Some(dir) => {
            let dir = dir.clone();
            std::fs::read_dir(&dir).with_context(|| format!("--manifests {}", dir.display()))?;
            tokio::spawn(manifests::follow(dir, Duration::from_millis(300), Duration::from_millis(200), tx));
            &[Kind::Service, Kind::EndpointSlice]
        }
        None => {
            let client = kube_source::client(args.kubeconfig.as_deref()).await?;
            let name = node_name.clone();
            tokio::spawn(async move {
                if let Err(e) = kube_source::run(client, name, tx).await {
                    error!("Kubernetes API source stopped: {e:#}");
                }
            });
            // kube-proxy waits for both before its first sync; the Node and ServiceCIDRs
            // refine the plan when they arrive.
            &[Kind::Service, Kind::EndpointSlice]
        }
    };
    info!(backend = backend.name(), node = %config.node_name, "ferry starting");

    let mut store = Store::new();
    let mut planner = Planner::new();
    let mut last_sync: Option<Instant> = None;
    let mut next_full = Instant::now();
    let mut full_due = true;
    let mut backoff = Duration::from_secs(1);
    let mut terminate = std::pin::pin!(shutdown_signal());
    loop {
        let wake = if store.has_listed(required) && (full_due || !store.pending_changes().is_empty()) {
            let earliest = last_sync.map(|t| t + args.min_sync_period).unwrap_or_else(Instant::now);
            if full_due { earliest.max(next_full) } else { earliest }
        } else {
            next_full
        };
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    store.handle(ev);
                    while let Ok(ev) = rx.try_recv() {
                        store.handle(ev);
                    }
                    continue;
                }
                None => anyhow::bail!("source stopped"),
            },
            _ = &mut terminate => {
                info!("terminating; the data path stays programmed");
                return Ok(());
            }
            _ = sleep_until(wake) => {}
        }
        if Instant::now() >= next_full {
            full_due = true;
        }
        if !store.has_listed(required) || (!full_due && store.pending_changes().is_empty()) {
            continue;
        }
        let changes = store.take_changes();
        let diff = planner.update(&store, &config, &changes);
        let started = Instant::now();
        last_sync = Some(started);
        let result = backend.sync(planner.plan(), if full_due { None } else { Some(&diff) }, &config);
        match result {
            Ok(report) => {
                info!(
                    full = report.full,
                    services = store.service_count(),
                    ports = planner.plan().ports.len(),
                    changed = diff.len(),
                    operations = report.operations,
                    took_ms = (report.duration.as_secs_f64() * 1e4).round() / 10.0,
                    "synced"
                );
                if full_due {
                    next_full = started + args.sync_period;
                }
                full_due = false;
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                error!("sync failed, retrying in {backoff:?} with a full sync: {e}");
                full_due = true;
                next_full = Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            warn!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
