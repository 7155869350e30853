//! The daemon behind `ferry run`: sources feed the store; a bounded-frequency loop re-plans
//! what changed and hands the plan diff to the backend; the side servers (health, metrics,
//! admin) report on it.
//!
//! Lifecycle:
//! - Nothing is programmed before the initial lists of Services and EndpointSlices are in.
//! - [`schedule`] decides when to sync: merged changes, at most `burst` syncs back to back and
//!   one per `min_sync_period` on average, a full resync every `sync_period`, a failed sync
//!   retried as a full one with exponential backoff.
//! - SIGTERM / SIGINT: exit at once, leaving the data path programmed, so traffic keeps flowing
//!   while the next ferry (an upgrade, a restart) starts and takes the state over.
//! - SIGHUP, or a change of the `--config` file's content (checked every
//!   [`CONFIG_POLL`]): the configuration is read again (flags still win) and what can change
//!   live is applied (node settings re-plan everything; sync periods; health timeout); a
//!   setting that needs a restart (backend, source, listen addresses) is logged as such; an
//!   invalid file is logged and the running configuration stays. Either way a full resync
//!   follows.

pub mod changes;
pub mod metrics;
pub mod plan_stats;
pub mod schedule;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{error, info, warn};

use crate::admin::{self, StatusReport, StatusRequest, SyncHistory, SyncRecord};
use crate::backend::{self, Backend, BackendKind, BackendOptions};
use crate::config::format_duration;
use crate::health::{self, HealthMetrics, ProxyHealth, ServiceHealthServers, rfc3339};
use crate::httpd::{ListenAddr, Server};
use crate::model::{IpFamily, Kind};
use crate::plan::{NodeConfig, Planner};
use crate::source::kube as kube_source;
use crate::source::manifests;
use crate::store::{Store, StoreEvent};
use changes::{ChangeTracker, EventClass, EventInfo, split_by_kind};
use metrics::SyncMetrics;
use plan_stats::PlanStats;
use schedule::{Schedule, SyncKind};

/// How often the `--config` file is checked for a new content (a ConfigMap update).
pub const CONFIG_POLL: Duration = Duration::from_secs(10);
/// kube-proxy's burst of syncs.
pub const DEFAULT_BURST: u32 = 2;
/// The kinds whose initial list must be in before anything is programmed (as kube-proxy); the
/// Node and ServiceCIDRs refine the plan when they arrive.
const REQUIRED: &[Kind] = &[Kind::Service, Kind::EndpointSlice];

/// Where objects come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Manifests(PathBuf),
    /// The API server, through this kubeconfig, or in-cluster configuration when `None`.
    Kube(Option<PathBuf>),
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// The resolved configuration of `ferry run` (flags over `--config` over defaults).
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub backend: BackendKind,
    #[serde(skip)]
    pub backend_options: BackendOptions,
    pub source: Source,
    pub node: NodeConfig,
    #[serde(serialize_with = "ser_duration")]
    pub sync_period: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub min_sync_period: Duration,
    pub sync_burst: u32,
    /// `None`: no healthz server.
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub admin_address: Option<ListenAddr>,
    /// Exit when a server cannot bind its address (else retry every 5s).
    pub bind_address_hard_fail: bool,
    pub config_file: Option<PathBuf>,
}

impl Settings {
    /// kube-proxy's health timeout.
    pub fn health_timeout(&self) -> Duration {
        2 * self.sync_period
    }

    /// The addresses healthCheckNodePort servers listen on: every address, or the node's
    /// addresses inside `--nodeport-addresses`.
    pub fn health_check_addresses(&self) -> Option<Vec<IpAddr>> {
        if self.node.nodeport_addresses.is_empty() {
            return None;
        }
        Some(IpFamily::ALL.iter().flat_map(|f| self.node.nodeport_ips(*f)).collect())
    }
}

/// Re-reads the configuration (SIGHUP): the command line's job, as it knows the flags.
pub type Reload = Box<dyn Fn() -> anyhow::Result<Settings> + Send>;

/// Runs the daemon until SIGTERM / SIGINT.
pub async fn run(settings: Settings, reload: Option<Reload>) -> anyhow::Result<()> {
    let backend = backend::build(settings.backend, &settings.backend_options)?;
    run_with_backend(settings, backend, reload).await
}

/// [`run`] with a given backend (tests drive the loop with an in-memory one). Needs Tokio's
/// multi-thread runtime: the backend's kernel calls run in `block_in_place`.
pub async fn run_with_backend(
    settings: Settings,
    backend: Box<dyn Backend>,
    reload: Option<Reload>,
) -> anyhow::Result<()> {
    // Every component registers its metrics here, before the server shares the registry.
    let mut registry = Registry::default();
    let sync_metrics = SyncMetrics::register(&mut registry);
    let health_metrics = HealthMetrics::register(&mut registry);
    // Components with metrics of their own register into `registry` here and keep their
    // handle (the eBPF data path's counters and map occupancy are the sync loop's: it reads
    // them from the backend after each sync).
    let registry = Arc::new(registry);

    let health = Arc::new(ProxyHealth::new(settings.health_timeout(), std::time::Instant::now()));
    let hard = settings.bind_address_hard_fail;
    let mut servers = Vec::new();
    if let Some(addr) = settings.healthz_bind_address {
        let h = health::handler(Arc::clone(&health), health_metrics);
        servers.push(start_server(ListenAddr::Tcp(addr), "healthz", h, hard).await?);
    }
    if let Some(addr) = settings.metrics_bind_address {
        let configz = serde_json::to_string(&settings).unwrap_or_default();
        let h = crate::metrics::handler(Arc::clone(&registry), backend.name(), configz);
        servers.push(start_server(ListenAddr::Tcp(addr), "metrics", h, hard).await?);
    }
    let (status_tx, status_rx) = mpsc::channel::<StatusRequest>(8);
    if let Some(addr) = &settings.admin_address {
        servers.push(start_server(addr.clone(), "admin", admin::handler(status_tx), hard).await?);
    }

    let (tx, rx) = mpsc::channel::<StoreEvent>(1024);
    start_source(&settings, tx).await?;
    let (reload_tx, reload_rx) = mpsc::channel::<()>(1);
    if let Some(path) = settings.config_file.clone() {
        tokio::spawn(watch_config(path, CONFIG_POLL, reload_tx.clone()));
    }
    info!(
        backend = backend.name(),
        node = %settings.node.node_name,
        sync_period = %format_duration(settings.sync_period),
        min_sync_period = %format_duration(settings.min_sync_period),
        "ferry starting"
    );
    let now = Instant::now();
    let daemon = Daemon {
        schedule: Schedule::new(now, settings.min_sync_period, settings.sync_period, settings.sync_burst),
        health_servers: ServiceHealthServers::new(Arc::clone(&health), settings.health_check_addresses()),
        settings,
        backend,
        store: Store::new(),
        planner: Planner::new(),
        plan_stats: PlanStats::default(),
        tracker: ChangeTracker::default(),
        metrics: sync_metrics,
        health,
        history: SyncHistory::default(),
        replan_all: false,
        stale_udp: crate::conntrack::StaleFlows::default(),
        started: SystemTime::now(),
        last_synced: None,
        reload,
    };
    let result = daemon.run(rx, status_rx, reload_rx).await;
    drop(servers);
    result
}

async fn start_server(
    addr: ListenAddr,
    name: &'static str,
    handler: crate::httpd::Handler,
    hard_fail: bool,
) -> anyhow::Result<Server> {
    if hard_fail {
        let s = Server::bind(&addr, name, handler).await.with_context(|| format!("the {name} server"))?;
        info!(server = name, addr = s.addr(), "listening");
        Ok(s)
    } else {
        Ok(Server::bind_with_retry(addr, name, handler))
    }
}

async fn start_source(settings: &Settings, tx: mpsc::Sender<StoreEvent>) -> anyhow::Result<()> {
    match &settings.source {
        Source::Manifests(dir) => {
            std::fs::read_dir(dir).with_context(|| format!("--manifests {}", dir.display()))?;
            tokio::spawn(manifests::follow(
                dir.clone(),
                Duration::from_millis(300),
                Duration::from_millis(200),
                tx,
            ));
        }
        Source::Kube(kubeconfig) => {
            let client = kube_source::client(kubeconfig.as_deref()).await?;
            let name = settings.node.node_name.clone();
            tokio::spawn(async move {
                if let Err(e) = kube_source::run(client, name, tx).await {
                    error!("Kubernetes API source stopped: {e:#}");
                }
            });
        }
    }
    Ok(())
}

/// Sends a reload request when the file's content changes (a ConfigMap update swaps the file;
/// its modification time alone is not reliable).
async fn watch_config(path: PathBuf, every: Duration, tx: mpsc::Sender<()>) {
    let mut last = tokio::fs::read(&path).await.ok();
    loop {
        tokio::time::sleep(every).await;
        let now = tokio::fs::read(&path).await.ok();
        if now.is_some() && now != last {
            info!(file = %path.display(), "configuration file changed");
            last = now;
            if tx.send(()).await.is_err() {
                return;
            }
        }
    }
}

struct Daemon {
    settings: Settings,
    backend: Box<dyn Backend>,
    store: Store,
    planner: Planner,
    /// Follows the planner: health-check ports and no-local-endpoint counts.
    plan_stats: PlanStats,
    schedule: Schedule,
    tracker: ChangeTracker,
    metrics: SyncMetrics,
    health: Arc<ProxyHealth>,
    health_servers: ServiceHealthServers,
    history: SyncHistory,
    /// The node configuration changed: the next sync re-plans everything.
    replan_all: bool,
    /// UDP flows to delete once a sync succeeded (nftables backend).
    stale_udp: crate::conntrack::StaleFlows,
    started: SystemTime,
    last_synced: Option<SystemTime>,
    reload: Option<Reload>,
}

impl Daemon {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<StoreEvent>,
        mut status: mpsc::Receiver<StatusRequest>,
        mut reloads: mpsc::Receiver<()>,
    ) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        // Listeners live across iterations: one created per `select!` would miss a signal that
        // arrives while a sync runs (a lost Ctrl-C).
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
        loop {
            let ready = self.store.has_listed(REQUIRED);
            let wake = ready.then(|| self.schedule.next_attempt(Instant::now(), self.pending()));
            tokio::select! {
                _ = term.recv() => {
                    info!("SIGTERM: exiting; the data path stays programmed");
                    return Ok(());
                }
                _ = interrupt.recv() => {
                    info!("SIGINT: exiting; the data path stays programmed");
                    return Ok(());
                }
                _ = hangup.recv() => {
                    info!("SIGHUP: reloading the configuration and resyncing everything");
                    self.reload();
                    continue;
                }
                Some(()) = reloads.recv() => {
                    self.reload();
                    continue;
                }
                Some(reply) = status.recv() => {
                    let _ = reply.send(self.status());
                    continue;
                }
                ev = events.recv() => match ev {
                    Some(ev) => {
                        self.handle(ev);
                        while let Ok(ev) = events.try_recv() {
                            self.handle(ev);
                        }
                        self.after_events();
                        continue;
                    }
                    None => anyhow::bail!("the source stopped"),
                },
                _ = sleep_until_some(wake) => {}
            }
            self.maybe_sync();
        }
    }

    fn pending(&self) -> bool {
        self.replan_all || !self.store.pending_changes().is_empty()
    }

    fn handle(&mut self, event: StoreEvent) {
        let received = SystemTime::now();
        for event in split_by_kind(event) {
            let info = EventInfo::of(&event);
            let tracked = self.store.has_listed(REQUIRED);
            self.store.handle(event);
            match info.class {
                EventClass::Service => self.metrics.events(info.objects, 0),
                EventClass::Endpoints => self.metrics.events(0, info.objects),
                EventClass::Other => {}
            }
            // Before the initial lists are in, nothing is "pending": it is the first sync.
            if tracked && self.tracker.record(self.store.pending_changes(), &info, received).queued {
                self.queued(received);
            }
            if tracked && self.store.pending_changes().all {
                self.queued(received);
            }
        }
    }

    fn queued(&self, at: SystemTime) {
        self.health.queued_update(std::time::Instant::now());
        self.metrics.queued(at);
    }

    fn after_events(&mut self) {
        self.health.set_node(self.store.node());
        let (s, e) = self.tracker.pending_counts();
        self.metrics.pending(s, e);
        self.metrics.skipped(self.store.problem_counts());
    }

    fn maybe_sync(&mut self) {
        let now = Instant::now();
        if !self.store.has_listed(REQUIRED) {
            return;
        }
        let Some(kind) = self.schedule.take(now, self.pending()) else { return };
        let started_wall = SystemTime::now();
        let mut changes = self.store.take_changes();
        changes.all |= std::mem::take(&mut self.replan_all);
        let in_flight = self.tracker.take();
        let diff = self.planner.update(&self.store, &self.settings.node, &changes);
        self.plan_stats.update(&diff);
        if self.backend.nat_in_conntrack() {
            // Kept until a cleanup succeeds: a failed sync's removals must not be forgotten, or
            // a client that keeps sending would stay black-holed.
            self.stale_udp.extend(crate::conntrack::stale_flows(&diff));
        }
        let plan = self.planner.plan();
        let backend = &mut self.backend;
        let node = &self.settings.node;
        // The backend talks to the kernel synchronously; the other worker keeps the servers
        // answering meanwhile.
        let result = tokio::task::block_in_place(|| {
            backend.sync(plan, if kind == SyncKind::Full { None } else { Some(&diff) }, node)
        });
        let took = now.elapsed();
        let full = kind == SyncKind::Full;
        match result {
            Ok(report) => {
                info!(
                    full,
                    services = self.store.service_count(),
                    ports = plan.ports.len(),
                    changed = diff.len(),
                    operations = report.operations,
                    took_ms = (took.as_secs_f64() * 1e4).round() / 10.0,
                    "synced"
                );
                self.schedule.succeeded(now, kind);
                let done = SystemTime::now();
                self.health.updated(done);
                self.last_synced = Some(done);
                self.metrics.synced(kind, took, done, in_flight.triggers());
                let wanted = health::wanted_service_health(
                    self.plan_stats.health_checked(),
                    &self.store,
                    &self.settings.node.node_name,
                );
                let servers = wanted.len();
                self.health_servers.sync(wanted);
                self.metrics.plan(self.store.service_count(), plan, &self.plan_stats, servers);
                if let Some(stats) = tokio::task::block_in_place(|| self.backend.data_path_stats()) {
                    self.metrics.data_path(&stats);
                }
                self.history.push(record(started_wall, full, took, report.operations, diff.len(), None));
                if !self.stale_udp.is_empty() {
                    match tokio::task::block_in_place(|| crate::conntrack::cleanup(&self.stale_udp)) {
                        Ok(r) => {
                            if r.deleted > 0 {
                                info!(
                                    deleted = r.deleted,
                                    took_ms = r.duration.as_millis() as u64,
                                    "stale UDP flows deleted"
                                );
                            }
                            self.metrics.conntrack_cleanup(r.duration);
                            self.stale_udp.clear();
                        }
                        Err(e) => warn!("UDP conntrack cleanup failed; retried after the next sync: {e}"),
                    }
                }
            }
            Err(e) => {
                let wait = self.schedule.failed(now);
                error!("sync failed, retrying in {wait:?} with a full sync: {e}");
                self.tracker.restore(in_flight);
                self.queued(started_wall);
                self.metrics.failed();
                self.history.push(record(started_wall, full, took, 0, diff.len(), Some(e.to_string())));
            }
        }
        let (s, e) = self.tracker.pending_counts();
        self.metrics.pending(s, e);
    }

    fn reload(&mut self) {
        self.schedule.request_full();
        let Some(reload) = &self.reload else {
            info!("no --config file to reload; a full resync follows");
            return;
        };
        let new = match reload() {
            Ok(new) => new,
            Err(e) => {
                error!("reloading the configuration failed; the running one stays: {e:#}");
                self.metrics.reload(false);
                return;
            }
        };
        self.metrics.reload(true);
        let old = self.settings.clone();
        let restart = [
            ("backend / mode", old.backend != new.backend),
            ("the object source", old.source != new.source),
            ("healthzBindAddress", old.healthz_bind_address != new.healthz_bind_address),
            ("metricsBindAddress", old.metrics_bind_address != new.metrics_bind_address),
            ("the admin address", old.admin_address != new.admin_address),
            ("bindAddressHardFail", old.bind_address_hard_fail != new.bind_address_hard_fail),
            ("the node name", old.node.node_name != new.node.node_name),
        ];
        for (what, changed) in restart {
            if changed {
                warn!("{what} changed in the configuration; restart ferry to apply it");
            }
        }
        let mut applied = Vec::new();
        if old.node != new.node && old.node.node_name == new.node.node_name {
            self.replan_all = true;
            self.health_servers.set_addresses(new.health_check_addresses());
            self.settings.node = new.node.clone();
            applied.push("node settings");
        }
        if (old.sync_period, old.min_sync_period, old.sync_burst)
            != (new.sync_period, new.min_sync_period, new.sync_burst)
        {
            self.schedule.set_periods(Instant::now(), new.min_sync_period, new.sync_period, new.sync_burst);
            self.health.set_timeout(new.health_timeout());
            self.settings.sync_period = new.sync_period;
            self.settings.min_sync_period = new.min_sync_period;
            self.settings.sync_burst = new.sync_burst;
            applied.push("sync periods");
        }
        match self.backend.apply_options(&new.backend_options) {
            Ok(true) => {
                self.settings.backend_options = new.backend_options.clone();
                applied.push("backend options");
            }
            Ok(false) => {}
            Err(e) => error!("the reloaded backend options are refused; the running ones stay: {e}"),
        }
        info!(applied = ?applied, "configuration reloaded");
    }

    fn status(&self) -> StatusReport {
        let report = self.health.report_now();
        let plan = self.planner.plan();
        StatusReport {
            node: self.settings.node.node_name.clone(),
            backend: self.backend.name().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started: rfc3339(self.started),
            now: rfc3339(report.current_time),
            healthy: report.healthy,
            node_eligible: report.node_eligible,
            last_synced: self.last_synced.map(rfc3339),
            services: self.store.service_count(),
            service_ports: plan.ports.values().map(|p| admin::port_status(p, &self.settings.node)).collect(),
            syncs: self.history.records(),
            health_check_node_ports: self
                .health_servers
                .status()
                .into_iter()
                .map(|(s, listening)| admin::HealthCheckStatus {
                    service: format!("{}/{}", s.namespace, s.name),
                    port: s.port,
                    local_endpoints: s.local_endpoints,
                    listening,
                })
                .collect(),
            skipped: self
                .store
                .problems()
                .map(|p| admin::SkippedObject {
                    object: p.object.to_string(),
                    reason: p.reason.as_str().to_owned(),
                    detail: p.detail.clone(),
                })
                .collect(),
            programmed: self.backend.programmed(),
        }
    }
}

fn record(
    time: SystemTime,
    full: bool,
    took: Duration,
    operations: usize,
    changed: usize,
    error: Option<String>,
) -> SyncRecord {
    SyncRecord {
        time: rfc3339(time),
        kind: if full { "full" } else { "partial" }.to_owned(),
        ok: error.is_none(),
        duration_seconds: took.as_secs_f64(),
        operations,
        changed,
        error,
    }
}

async fn sleep_until_some(t: Option<Instant>) {
    match t {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_config_file_asks_for_a_reload_and_an_unchanged_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.conf");
        std::fs::write(&path, "a").unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let watcher = tokio::spawn(watch_config(path.clone(), Duration::from_millis(20), tx));
        let quiet = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        assert!(quiet.is_err(), "no change, no reload");
        std::fs::write(&path, "b").unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got, Ok(Some(())));
        // A file that disappears (a ConfigMap swap in progress) is no change either.
        std::fs::remove_file(&path).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv()).await.is_err());
        watcher.abort();
    }
}
