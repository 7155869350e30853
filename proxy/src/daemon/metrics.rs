//! The sync loop's metrics: kube-proxy's names where the meaning is the same, ferry's own under
//! `ferry_`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

use super::plan_stats::PlanStats;
use super::schedule::SyncKind;
use crate::backend::DataPathStats;
use crate::model::ProblemReason;
use crate::plan::Plan;

type Label = [(&'static str, &'static str); 1];

#[derive(Debug, Clone)]
pub struct SyncMetrics {
    sync_duration: Histogram,
    full_duration: Histogram,
    partial_duration: Histogram,
    network_programming: Histogram,
    conntrack_cleanup: Histogram,
    last_timestamp: Gauge<f64, AtomicU64>,
    last_queued_timestamp: Gauge<f64, AtomicU64>,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    no_local_endpoints: Family<Label, Gauge>,
    sync_failures: Counter,
    skipped_objects: Family<Label, Counter>,
    services: Gauge,
    service_ports: Gauge,
    health_check_servers: Gauge,
    config_reloads: Family<Label, Counter>,
    bpf_packets: Family<Label, Counter>,
    bpf_map_entries: Family<Label, Gauge>,
    bpf_map_max_entries: Family<Label, Gauge>,
    /// The eBPF counters' values at the last report, to count what they added since.
    bpf_last: BTreeMap<&'static str, u64>,
}

/// kube-proxy's buckets for rule sync durations: 1ms to ~16s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's buckets for network programming latency: 0.25s to 7.5 minutes.
fn programming_buckets() -> impl Iterator<Item = f64> {
    linear_buckets(0.25, 0.25, 2)
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(300.0, 10.0, 12))
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl SyncMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            sync_duration: Histogram::new(sync_buckets()),
            full_duration: Histogram::new(sync_buckets()),
            partial_duration: Histogram::new(sync_buckets()),
            network_programming: Histogram::new(programming_buckets()),
            conntrack_cleanup: Histogram::new(sync_buckets()),
            last_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            sync_failures: Counter::default(),
            skipped_objects: Family::default(),
            services: Gauge::default(),
            service_ports: Gauge::default(),
            health_check_servers: Gauge::default(),
            config_reloads: Family::default(),
            bpf_packets: Family::default(),
            bpf_map_entries: Family::default(),
            bpf_map_max_entries: Family::default(),
            bpf_last: BTreeMap::new(),
        };
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.full_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.partial_duration.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds (from the EndpointSlice's trigger time, \
             else from ferry receiving the change, to programmed)",
            m.network_programming.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "Time to delete stale UDP conntrack entries after a sync, in seconds",
            m.conntrack_cleanup.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        // A gauge despite its name, as in kube-proxy.
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        r.register(
            "ferry_sync_failures",
            "Syncs that failed (each is retried as a full sync)",
            m.sync_failures.clone(),
        );
        r.register(
            "ferry_skipped_objects",
            "Objects (or parts of them) skipped as unusable, by reason",
            m.skipped_objects.clone(),
        );
        r.register("ferry_services", "Services ferry programs", m.services.clone());
        r.register("ferry_service_ports", "Service ports programmed, per IP family", m.service_ports.clone());
        r.register(
            "ferry_health_check_node_port_servers",
            "healthCheckNodePort servers wanted by the plan",
            m.health_check_servers.clone(),
        );
        r.register(
            "ferry_config_reloads",
            "Configuration reloads (SIGHUP or a changed --config file), by result",
            m.config_reloads.clone(),
        );
        r.register(
            "ferry_bpf_packets",
            "Packets the eBPF programs handled, by what happened to them (the names of `ferry status`)",
            m.bpf_packets.clone(),
        );
        r.register(
            "ferry_bpf_map_entries",
            "Entries of each eBPF map, counted at the last full sync",
            m.bpf_map_entries.clone(),
        );
        r.register("ferry_bpf_map_max_entries", "Capacity of each eBPF map", m.bpf_map_max_entries.clone());
        for policy in ["internal", "external"] {
            m.no_local_endpoints.get_or_create(&[("traffic_policy", policy)]).set(0);
        }
        m
    }

    /// Events received, by the kind of object they are about.
    pub fn events(&self, service_objects: usize, endpoint_objects: usize) {
        self.service_changes_total.inc_by(service_objects as u64);
        self.endpoint_changes_total.inc_by(endpoint_objects as u64);
    }

    pub fn pending(&self, services: usize, endpoints: usize) {
        self.service_changes_pending.set(as_i64(services));
        self.endpoint_changes_pending.set(as_i64(endpoints));
    }

    pub fn queued(&self, at: SystemTime) {
        self.last_queued_timestamp.set(unix_seconds(at));
    }

    /// Follows the store's problem counters (totals since start, by reason).
    pub fn skipped(&self, counts: &BTreeMap<ProblemReason, u64>) {
        for (reason, n) in counts {
            let c = self.skipped_objects.get_or_create(&[("reason", reason.as_str())]);
            let seen = c.get();
            if *n > seen {
                c.inc_by(n - seen);
            }
        }
    }

    /// A successful sync: its duration, when, what it programmed and how long its changes
    /// waited.
    pub fn synced(
        &self,
        kind: SyncKind,
        took: Duration,
        at: SystemTime,
        programmed: impl Iterator<Item = SystemTime>,
    ) {
        let secs = took.as_secs_f64();
        self.sync_duration.observe(secs);
        match kind {
            SyncKind::Full => self.full_duration.observe(secs),
            SyncKind::Partial => self.partial_duration.observe(secs),
        }
        self.last_timestamp.set(unix_seconds(at));
        for trigger in programmed {
            self.network_programming.observe(at.duration_since(trigger).unwrap_or_default().as_secs_f64());
        }
    }

    /// What the plan holds now.
    pub fn plan(&self, services: usize, plan: &Plan, stats: &PlanStats, health_check_servers: usize) {
        self.services.set(as_i64(services));
        self.service_ports.set(as_i64(plan.ports.len()));
        self.health_check_servers.set(as_i64(health_check_servers));
        let (internal, external) = stats.no_local_endpoints();
        self.no_local_endpoints.get_or_create(&[("traffic_policy", "internal")]).set(as_i64(internal));
        self.no_local_endpoints.get_or_create(&[("traffic_policy", "external")]).set(as_i64(external));
    }

    pub fn failed(&self) {
        self.sync_failures.inc();
    }

    pub fn conntrack_cleanup(&self, took: std::time::Duration) {
        self.conntrack_cleanup.observe(took.as_secs_f64());
    }

    /// Follows the eBPF programs' counters (packets by what happened to them) and the maps'
    /// occupancy, after each sync.
    pub fn data_path(&mut self, stats: &DataPathStats) {
        for &(name, value) in &stats.counters {
            let before = self.bpf_last.insert(name, value).unwrap_or(0);
            // Smaller than before: the counters were created anew (`ferry cleanup`).
            let added = if value >= before { value - before } else { value };
            self.bpf_packets.get_or_create(&[("counter", name)]).inc_by(added);
        }
        for &(map, entries, max) in &stats.maps {
            self.bpf_map_entries.get_or_create(&[("map", map)]).set(as_i64(entries));
            self.bpf_map_max_entries.get_or_create(&[("map", map)]).set(i64::from(max));
        }
    }

    pub fn reload(&self, ok: bool) {
        self.config_reloads.get_or_create(&[("result", if ok { "ok" } else { "error" })]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{encode, sample};

    #[test]
    fn every_sync_metric_is_exported_under_its_kube_proxy_name() {
        let mut r = Registry::default();
        let m = SyncMetrics::register(&mut r);
        let now = SystemTime::now();
        m.events(2, 3);
        m.synced(
            SyncKind::Full,
            Duration::from_millis(3),
            now,
            [now - Duration::from_millis(500)].into_iter(),
        );
        m.synced(SyncKind::Partial, Duration::from_millis(1), now, std::iter::empty());
        m.skipped(&BTreeMap::from([(ProblemReason::InvalidIp, 2)]));
        m.skipped(&BTreeMap::from([(ProblemReason::InvalidIp, 3)]));
        m.failed();
        let (text, _) = encode(&r, false);
        let get = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
        assert_eq!(get("kubeproxy_sync_proxy_rules_duration_seconds_count"), 2.0);
        assert_eq!(get("kubeproxy_sync_full_proxy_rules_duration_seconds_count"), 1.0);
        assert_eq!(get("kubeproxy_sync_partial_proxy_rules_duration_seconds_count"), 1.0);
        assert_eq!(get("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"}"), 1.0);
        assert_eq!(get("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"}"), 0.0);
        assert!(get("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.6e9);
        assert_eq!(get("kubeproxy_sync_proxy_rules_service_changes_total"), 2.0);
        assert_eq!(get("kubeproxy_sync_proxy_rules_endpoint_changes_total"), 3.0);
        assert_eq!(
            get("kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}"),
            0.0
        );
        assert_eq!(get("ferry_sync_failures_total"), 1.0);
        assert_eq!(get("ferry_skipped_objects_total{reason=\"invalid_ip\"}"), 3.0);
        assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge"), "{text}");
    }

    #[test]
    fn the_ebpf_counters_become_counters_that_survive_a_reset_of_the_kernels() {
        let mut r = Registry::default();
        let mut m = SyncMetrics::register(&mut r);
        let report = |established, maps| DataPathStats {
            counters: vec![("established", established), ("bypassed", 0)],
            maps,
        };
        m.data_path(&report(10, vec![("CONNTRACK", 3, 262_144)]));
        m.data_path(&report(25, vec![]));
        // The kernel's counters started again from zero (the maps were created anew).
        m.data_path(&report(4, vec![]));
        let (text, _) = encode(&r, false);
        let get = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
        assert_eq!(get("ferry_bpf_packets_total{counter=\"established\"}"), 29.0);
        assert_eq!(get("ferry_bpf_packets_total{counter=\"bypassed\"}"), 0.0);
        assert_eq!(get("ferry_bpf_map_entries{map=\"CONNTRACK\"}"), 3.0);
        assert_eq!(get("ferry_bpf_map_max_entries{map=\"CONNTRACK\"}"), 262_144.0);
    }
}
