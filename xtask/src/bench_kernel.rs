//! `cargo xtask bench-kernel`: ferry's real kernel apply with the nftables backend, inside a
//! sandbox namespace (never the root namespace), beside a kube-proxy-shaped ruleset for the same
//! services loaded into another namespace of the same sandbox.
//!
//! Run (root): `cargo xtask bench-kernel [--sizes 1000,10000,50000] [--json FILE] [--svg FILE]`.
//!
//! For each size N (services × `--endpoints` endpoints, kube-proxy's BenchmarkSyncProxyRules
//! shape) it starts the release `ferry run --manifests` in a fresh namespace and reads its
//! `synced … took_ms=` lines: the first sync is the full one; then one endpoint of one service
//! changes in the manifests and the next sync is the incremental one (`--changes` times, each
//! to another service; the median is reported). `took_ms` is the backend's
//! time (compile + `nft`); "end to end" is from starting the process to the first sync logged,
//! which adds reading and parsing the YAML, the manifest source's 200 ms debounce and planning.
//! Peak RSS is ferry's VmHWM after both syncs. The kube-proxy shape (see `bench/kube_proxy.rs`)
//! is timed as kube-proxy syncs: its two `nft --json list` calls plus one `nft -f` transaction,
//! for the first full sync and for the same one-endpoint change.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use ferry_sandbox::Sandbox;
use serde::Serialize;

use crate::bench::ferry::{binary, peak_rss_kib, stop_and_clean, wait_syncs};
use crate::bench::kube_proxy::{self, LIST_COMMANDS};
use crate::bench::services::{self, Service};
use crate::bench::svg::{self, Chart, Series};
use crate::bench::{Machine, TempDir, cell, percentile, print_table, timed_command, write_json, write_svg};
use crate::setup;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Numbers of services, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pub sizes: Vec<usize>,
    /// Ready endpoints per service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// One-endpoint changes per size (each to another service); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub changes: usize,
    /// The kube-proxy-shaped ruleset is skipped above this many services (its load grows
    /// faster than linearly: minutes at 10,000 on a 2-core machine).
    #[arg(long, default_value_t = 10_000)]
    pub kube_proxy_max: usize,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also plot sync time against the number of services (SVG).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Use this ferry binary instead of a release build of this checkout.
    #[arg(long, value_name = "PATH")]
    pub ferry: Option<PathBuf>,
    /// What the --ferry binary was built from, for the report (e.g. a commit).
    #[arg(long, value_name = "TEXT", requires = "ferry")]
    pub ferry_label: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    endpoints_per_service: usize,
    rows: Vec<Row>,
}

#[derive(Debug, Serialize)]
struct Row {
    services: usize,
    ferry: FerryResult,
    kube_proxy_shape: Option<KubeProxyResult>,
    kube_proxy_shape_skipped: Option<String>,
}

#[derive(Debug, Serialize)]
struct FerryResult {
    full_sync_ms: f64,
    full_sync_operations: usize,
    first_sync_end_to_end_ms: f64,
    /// Median over the changes.
    one_endpoint_sync_ms: f64,
    one_endpoint_sync_ms_each: Vec<f64>,
    one_endpoint_operations: usize,
    peak_rss_mib: f64,
}

#[derive(Debug, Serialize)]
struct KubeProxyResult {
    full_transaction_ms: f64,
    full_list_ms: f64,
    full_script_bytes: usize,
    /// Medians over the changes.
    one_endpoint_transaction_ms: f64,
    one_endpoint_list_ms: f64,
    /// (transaction, list) of each change.
    one_endpoint_each_ms: Vec<(f64, f64)>,
    one_endpoint_script_bytes: usize,
}

impl KubeProxyResult {
    fn full_ms(&self) -> f64 {
        self.full_transaction_ms + self.full_list_ms
    }

    fn one_endpoint_ms(&self) -> f64 {
        self.one_endpoint_transaction_ms + self.one_endpoint_list_ms
    }
}

/// Node flags of the namespace ferry runs in (no interfaces needed: nothing is sent).
const NODE_FLAGS: [&str; 8] = [
    "--node-name",
    "node",
    "--node-ip",
    "192.168.0.10",
    "--cluster-cidr",
    "10.0.0.0/8",
    "--service-cidr",
    "10.96.0.0/16",
];

pub fn run(args: &Args) -> Result<()> {
    ensure!(setup::is_root()?, "bench-kernel creates network namespaces: run it as root");
    ensure!(!args.sizes.is_empty(), "--sizes is empty");
    setup::run(&setup::Args::default())?;
    let ferry = binary(args.ferry.as_deref())?;
    let machine = Machine::detect(args.ferry_label.as_deref());
    machine.print();

    let mut rows = Vec::new();
    for &n in &args.sizes {
        println!("\n▶ {n} services × {} endpoints", args.endpoints);
        let original = services::synthetic_set(n, args.endpoints)?;
        // Distinct services spread over the set (and its manifest files), each changed once.
        let mut changed: Vec<usize> = Vec::new();
        for g in 0..args.changes.max(1) {
            let index = (n / 2 + g * 997) % n;
            if !changed.contains(&index) {
                changed.push(index);
            }
        }
        let sb = Sandbox::new("bench_kernel")?;
        let ferry_result = measure_ferry(&ferry, &sb, original.clone(), &changed)?;
        println!(
            "  ferry: full sync {:.1} ms ({} ops), first sync end to end {:.0} ms, one endpoint {:.1} ms, peak RSS {:.0} MiB",
            ferry_result.full_sync_ms,
            ferry_result.full_sync_operations,
            ferry_result.first_sync_end_to_end_ms,
            ferry_result.one_endpoint_sync_ms,
            ferry_result.peak_rss_mib
        );
        let (kube_proxy_shape, skipped) = if n <= args.kube_proxy_max {
            let r = measure_kube_proxy(&sb, &original, &changed)?;
            println!(
                "  kube-proxy shape: full {:.0} ms (transaction {:.0} + list {:.0}), one endpoint {:.0} ms (transaction {:.0} + list {:.0})",
                r.full_ms(),
                r.full_transaction_ms,
                r.full_list_ms,
                r.one_endpoint_ms(),
                r.one_endpoint_transaction_ms,
                r.one_endpoint_list_ms
            );
            (Some(r), None)
        } else {
            let why = format!(
                "skipped above {} services (takes minutes; --kube-proxy-max raises it)",
                args.kube_proxy_max
            );
            println!("  kube-proxy shape: {why}");
            (None, Some(why))
        };
        drop(sb);
        rows.push(Row {
            services: n,
            ferry: ferry_result,
            kube_proxy_shape,
            kube_proxy_shape_skipped: skipped,
        });
    }

    let report = Report { machine, endpoints_per_service: args.endpoints, rows };
    print_report(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.svg {
        write_svg(path, &plot(&report))?;
    }
    Ok(())
}

fn measure_ferry(
    ferry: &std::path::Path,
    sb: &Sandbox,
    mut services: Vec<Service>,
    changed: &[usize],
) -> Result<FerryResult> {
    let n = services.len();
    let ns = sb.netns("ferry")?;
    let dir = TempDir::new(&format!("bench-kernel-{n}"))?;
    services::write_manifests(&dir.0, &services)?;
    let mut cmd = vec![
        ferry.display().to_string(),
        "run".into(),
        "--backend".into(),
        "nftables".into(),
        "--manifests".into(),
        dir.0.display().to_string(),
    ];
    cmd.extend(NODE_FLAGS.iter().map(|s| (*s).to_owned()));
    cmd.extend(["--min-sync-period", "100ms", "--sync-period", "1h"].map(String::from));
    let timeout = Duration::from_secs(60) + Duration::from_millis(6) * n as u32;

    let started = Instant::now();
    let proc = ns.spawn(&cmd)?;
    let first = wait_syncs(&proc, 1, timeout)?;
    let end_to_end = started.elapsed();
    let full = first[0].clone();
    ensure!(full.full && full.services == n, "unexpected first sync: {full:?}");

    let mut each = Vec::new();
    let mut operations = 0;
    for (g, &index) in changed.iter().enumerate() {
        if let Some(s) = services.get_mut(index) {
            *s = services::with_one_endpoint_replaced(s, g as u32 + 1);
        }
        services::rewrite_manifest_of(&dir.0, &services, index)?;
        let lines = wait_syncs(&proc, g + 2, timeout)?;
        let one = lines[g + 1].clone();
        ensure!(!one.full && one.services == n, "change {g} was not synced incrementally: {one:?}");
        each.push(one.took_ms);
        operations = one.operations;
    }
    let rss_kib = peak_rss_kib(proc.pid(), ferry)?;
    let tables = ns.exec(&["nft", "list", "tables"])?;
    ensure!(tables.contains("ip ferry"), "ferry's table is missing after the syncs: {tables}");
    stop_and_clean(ferry, &proc, &ns, "nftables")?;

    Ok(FerryResult {
        full_sync_ms: full.took_ms,
        full_sync_operations: full.operations,
        first_sync_end_to_end_ms: end_to_end.as_secs_f64() * 1e3,
        one_endpoint_sync_ms: median(&each),
        one_endpoint_sync_ms_each: each,
        one_endpoint_operations: operations,
        peak_rss_mib: rss_kib as f64 / 1024.0,
    })
}

fn measure_kube_proxy(sb: &Sandbox, services: &[Service], changed: &[usize]) -> Result<KubeProxyResult> {
    let ns = sb.netns("kubeproxy")?;
    let opts = kube_proxy::Options { cluster_cidr: "10.0.0.0/8".into(), service_cidr: "10.96.0.0/16".into() };
    let bound = Duration::from_secs(1800);
    let sync = |script: &str| -> Result<(f64, f64)> {
        let mut list = Duration::ZERO;
        for cmd in LIST_COMMANDS {
            list += timed_command(&ns, &cmd, None, bound)?.0;
        }
        let (tx, _) = timed_command(&ns, &["nft", "-f", "-"], Some(script), bound)?;
        Ok((tx.as_secs_f64() * 1e3, list.as_secs_f64() * 1e3))
    };

    let full_script = kube_proxy::full_sync(services, &opts);
    println!("  kube-proxy shape: loading {:.1} MiB of nft commands…", full_script.len() as f64 / 1048576.0);
    let (full_tx, full_list) = sync(&full_script)?;
    let mut each = Vec::new();
    let mut partial_bytes = 0;
    for (g, &index) in changed.iter().enumerate() {
        let old = &services[index];
        let new = services::with_one_endpoint_replaced(old, g as u32 + 1);
        let partial_script = kube_proxy::partial_sync(old, &new, &opts);
        partial_bytes = partial_script.len();
        each.push(sync(&partial_script)?);
    }
    let chains = timed_command(&ns, &["nft", "list", "chains", "ip"], None, bound)?.1;
    let expected = services.len() * (1 + services[0].endpoints.len());
    // Per-service and per-endpoint chains are the ones named after a service port.
    let got = chains.lines().filter(|l| l.trim_start().starts_with("chain ") && l.contains("/tcp/")).count();
    ensure!(
        got == expected + changed.len(),
        "the kube-proxy shape has {got} service/endpoint chains, expected {expected} + {}",
        changed.len()
    );
    Ok(KubeProxyResult {
        full_transaction_ms: full_tx,
        full_list_ms: full_list,
        full_script_bytes: full_script.len(),
        one_endpoint_transaction_ms: median(&each.iter().map(|e| e.0).collect::<Vec<_>>()),
        one_endpoint_list_ms: median(&each.iter().map(|e| e.1).collect::<Vec<_>>()),
        one_endpoint_each_ms: each,
        one_endpoint_script_bytes: partial_bytes,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 50.0)
}

fn print_report(report: &Report) {
    println!("\nkernel apply, {} endpoints per service (ms unless noted)", report.endpoints_per_service);
    let headers = [
        "services",
        "ferry full",
        "ferry e2e first",
        "ferry 1-ep",
        "ferry RSS MiB",
        "kp-shape full",
        "kp-shape 1-ep",
        "full ×",
        "1-ep ×",
    ];
    let rows: Vec<Vec<String>> = report
        .rows
        .iter()
        .map(|r| {
            let kp = r.kube_proxy_shape.as_ref();
            vec![
                r.services.to_string(),
                cell(Some(r.ferry.full_sync_ms)),
                cell(Some(r.ferry.first_sync_end_to_end_ms)),
                cell(Some(r.ferry.one_endpoint_sync_ms)),
                cell(Some(r.ferry.peak_rss_mib)),
                cell(kp.map(KubeProxyResult::full_ms)),
                cell(kp.map(KubeProxyResult::one_endpoint_ms)),
                cell(kp.map(|k| k.full_ms() / r.ferry.full_sync_ms)),
                cell(kp.map(|k| k.one_endpoint_ms() / r.ferry.one_endpoint_sync_ms)),
            ]
        })
        .collect();
    print_table(&headers, &rows);
    println!(
        "  kp-shape = kube-proxy-shaped ruleset: 2 × `nft --json list` + `nft -f` per sync; × = kp-shape / ferry"
    );
}

fn plot(report: &Report) -> String {
    let x = |r: &Row| r.services as f64;
    let ferry_full: Vec<(f64, f64)> = report.rows.iter().map(|r| (x(r), r.ferry.full_sync_ms)).collect();
    let ferry_e2e: Vec<(f64, f64)> =
        report.rows.iter().map(|r| (x(r), r.ferry.first_sync_end_to_end_ms)).collect();
    let ferry_one: Vec<(f64, f64)> =
        report.rows.iter().map(|r| (x(r), r.ferry.one_endpoint_sync_ms)).collect();
    let kp = |f: fn(&KubeProxyResult) -> f64| -> Vec<(f64, f64)> {
        report.rows.iter().filter_map(|r| r.kube_proxy_shape.as_ref().map(|k| (x(r), f(k)))).collect()
    };
    let series = |name: &str, color: &'static str, dashed: bool, points: Vec<(f64, f64)>| Series {
        name: name.to_owned(),
        color,
        dashed,
        points,
    };
    let full = Chart {
        title: "Full sync".into(),
        x_label: "services (× 10 endpoints)".into(),
        y_label: "milliseconds (log)".into(),
        x_log: true,
        y_log: true,
        series: vec![
            series("ferry nftables: backend sync", FERRY_NFT, false, ferry_full),
            series("ferry: process start → synced", FERRY_NFT, true, ferry_e2e),
            series("kube-proxy shape: list + nft -f", KUBE_PROXY, false, kp(KubeProxyResult::full_ms)),
        ],
    };
    let one = Chart {
        title: "One endpoint changes".into(),
        x_label: "services (× 10 endpoints)".into(),
        y_label: "milliseconds (log)".into(),
        x_log: true,
        y_log: true,
        series: vec![
            series("ferry nftables: backend sync", FERRY_NFT, false, ferry_one),
            series(
                "kube-proxy shape: list + nft -f",
                KUBE_PROXY,
                false,
                kp(KubeProxyResult::one_endpoint_ms),
            ),
            series("kube-proxy shape: nft -f only", KUBE_PROXY, true, kp(|k| k.one_endpoint_transaction_ms)),
        ],
    };
    let m = &report.machine;
    let caption = format!(
        "cargo xtask bench-kernel · {} × {} · kernel {} · {} · ferry {} · load {}",
        m.cpus, m.cpu, m.kernel, m.nft, m.ferry_commit, m.loadavg_at_start
    );
    svg::render(&caption, &[full, one])
}

pub const FERRY_NFT: &str = "#1f77b4";
pub const KUBE_PROXY: &str = "#d62728";
