//! `cargo xtask bench-datapath`: what a Service costs a connection. TCP connection setup
//! latency (p50, p99) and iperf3 throughput to a ClusterIP versus straight to the pod IP, with
//! 1, 1,000 and 10,000 services programmed, for each ferry backend that starts and for a
//! kube-proxy-shaped ruleset of the same services.
//!
//! Run (root): `cargo xtask bench-datapath [--services 1,1000,10000]
//! [--backends nftables,ebpf,ebpf-bypass] [--no-offload] [--json FILE] [--svg FILE]`.
//! `--no-offload` measures throughput with MTU-sized packets (TSO/GSO off on the client pod):
//! bound by the cost per packet, where the data planes differ, rather than by copying data.
//!
//! Every data plane gets its own copy of the sandbox's cluster (a node with a client pod and a
//! server pod): "no ruleset" (the baseline), ferry with each backend, and the kube-proxy shape.
//! All are programmed at once, and the measurements rotate between them — connection by
//! connection for latency, run by run for iperf3 — so a burst of other work on the machine hits
//! every data plane alike and the ratios compare on the same machine state. Everything stays
//! between the sandboxes' namespaces.
//!
//! The measured service (`target`, ClusterIP 10.96.0.10, ports 80 → 8080 and 5201 → 5201) has
//! one endpoint, the server pod, so iperf3's control and data connections meet the same server;
//! the other services are the synthetic set (10 endpoints each) that only fill the tables.
//! Latency: `connect()` from the client pod until the handshake completes, after a warm-up;
//! each connection then reads the responder's reply (which names the pod that served, so a
//! wrong DNAT is counted) and closes with a reset, leaving no TIME_WAIT. Throughput: `iperf3 -t
//! N -O 1`, server in the server pod, client in the client pod; the median of the rounds.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use ferry_sandbox::{Cluster, ClusterSpec, Netns, Process, Reply, Sandbox};
use nix::sys::socket::{setsockopt, sockopt};
use serde::Serialize;

use crate::bench::ferry::{binary, stop_and_clean, tail, wait_syncs};
use crate::bench::kube_proxy;
use crate::bench::services::{self, Endpoint, Port, Service};
use crate::bench::svg::{self, Chart, Series};
use crate::bench::{Machine, TempDir, cell, percentile, print_table, timed_command, write_json, write_svg};
use crate::setup;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nftables,
    Ebpf,
    /// The eBPF backend with `--bypass-netfilter`.
    #[value(name = "ebpf-bypass")]
    #[serde(rename = "ebpf-bypass")]
    EbpfBypass,
}

impl Backend {
    /// The data plane's name in the report.
    fn name(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::Ebpf => "ebpf",
            Self::EbpfBypass => "ebpf --bypass-netfilter",
        }
    }

    /// `ferry run --backend`'s value.
    fn ferry_backend(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::Ebpf | Self::EbpfBypass => "ebpf",
        }
    }

    fn is_ebpf(self) -> bool {
        self != Self::Nftables
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Numbers of services programmed, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    pub services: Vec<usize>,
    /// ferry backends to measure; one that does not start is reported and skipped.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "nftables,ebpf,ebpf-bypass")]
    pub backends: Vec<Backend>,
    /// Connections per latency measurement (each data plane and target).
    #[arg(long, default_value_t = 5000)]
    pub connects: usize,
    /// Upper bound on the latency phase at one size, in seconds.
    #[arg(long, default_value_t = 120)]
    pub connect_budget: u64,
    /// Seconds of each iperf3 run (after one omitted second); 0 skips throughput.
    #[arg(long, default_value_t = 2)]
    pub iperf_seconds: u32,
    /// iperf3 runs per data plane and target; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub iperf_rounds: usize,
    /// Turn TSO and GSO off on the client pod's interface, so that every data plane forwards
    /// MTU-sized packets (throughput bound by the cost per packet) instead of ~64 KiB
    /// superpackets (bound by copying data, where a few hundred nanoseconds per superpacket
    /// vanish).
    #[arg(long)]
    pub no_offload: bool,
    /// Endpoints of each filler service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// The kube-proxy-shaped ruleset is skipped above this many services (it takes minutes to
    /// load at 10,000 on a 2-core machine).
    #[arg(long, default_value_t = 10_000)]
    pub kube_proxy_max: usize,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also plot latency and throughput against the number of services (SVG).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Use this ferry binary instead of a release build of this checkout.
    #[arg(long, value_name = "PATH")]
    pub ferry: Option<PathBuf>,
    /// What the --ferry binary was built from, for the report (e.g. a commit).
    #[arg(long, value_name = "TEXT", requires = "ferry")]
    pub ferry_label: Option<String>,
}

const HTTP_PORT: u16 = 80;
const RESPONDER_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const WARMUP: usize = 50;
/// A handshake not done by then lost a packet (the SYN is only retransmitted after 1 s): it is
/// counted as failed rather than stalling the rotation.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);

const NONE: &str = "no ruleset";
const KUBE_PROXY: &str = "kube-proxy shape";

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    connects: usize,
    iperf_seconds: u32,
    iperf_rounds: usize,
    /// TSO and GSO off on the client pod's interface (`--no-offload`).
    no_offload: bool,
    measurements: Vec<Measurement>,
    /// Data planes that could not be measured, and why.
    unavailable: Vec<Unavailable>,
    loadavg_at_end: String,
}

#[derive(Debug, Clone, Serialize)]
struct Measurement {
    dataplane: String,
    services: usize,
    /// `clusterip` or `pod`.
    target: &'static str,
    address: String,
    /// Time to program the ruleset (ferry's backend sync, or `nft -f` for the kube-proxy shape).
    program_ms: Option<f64>,
    connects: usize,
    failures: usize,
    wrong_endpoint: usize,
    p10_us: f64,
    p25_us: f64,
    p50_us: f64,
    p75_us: f64,
    p90_us: f64,
    p99_us: f64,
    mean_us: f64,
    throughput_gbit_s: Option<f64>,
    throughput_rounds_gbit_s: Vec<f64>,
    /// The first few failed connections' errors.
    errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Unavailable {
    dataplane: String,
    services: usize,
    reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Baseline,
    Ferry(Backend),
    KubeProxy,
}

/// One data plane in its own copy of the cluster.
struct Plane {
    name: String,
    kind: Kind,
    cluster: Cluster,
    server: SocketAddr,
    iperf: Option<Process>,
    ferry: Option<Process>,
    cgroup: Option<OwnCgroup>,
    program_ms: Option<f64>,
    /// Programmed and verified at the current size.
    active: bool,
    /// Failed in a way that will not change with the size (e.g. backend not built).
    disabled: bool,
    /// Dropped last: its namespaces go after everything running in them has been stopped.
    _sandbox: Sandbox,
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(setup::is_root()?, "bench-datapath creates network namespaces: run it as root");
    ensure!(
        !args.services.is_empty() && args.services.iter().all(|&n| n >= 1),
        "--services needs counts ≥ 1"
    );
    ensure!(args.connects > 0, "--connects must be positive");
    setup::run(&setup::Args::default())?;
    let ferry = binary(args.ferry.as_deref())?;
    let machine = Machine::detect(args.ferry_label.as_deref());
    machine.print();

    let mut kinds = vec![Kind::Baseline];
    kinds.extend(args.backends.iter().map(|&b| Kind::Ferry(b)));
    kinds.push(Kind::KubeProxy);
    let mut planes = Vec::new();
    for kind in kinds {
        planes.push(Plane::build(kind, args.iperf_seconds > 0, args.no_offload)?);
    }
    println!(
        "\n{} copies of the cluster: client pod 10.0.1.2 → server pod 10.0.1.10, ClusterIP 10.96.0.10",
        planes.len()
    );

    let mut measurements = Vec::new();
    let mut unavailable = Vec::new();
    for &n in &args.services {
        println!("\n▶ {n} services");
        let services = service_set(n, args.endpoints)?;
        let dir = TempDir::new(&format!("bench-datapath-{n}"))?;
        services::write_manifests(&dir.0, &services)?;
        for plane in &mut planes {
            if plane.disabled {
                continue;
            }
            if plane.kind == Kind::KubeProxy && n > args.kube_proxy_max {
                let reason = format!(
                    "skipped above {} services (takes minutes; --kube-proxy-max raises it)",
                    args.kube_proxy_max
                );
                println!("  {}: {reason}", plane.name);
                unavailable.push(Unavailable { dataplane: plane.name.clone(), services: n, reason });
                continue;
            }
            match plane.program(&ferry, &dir.0, &services) {
                Ok(()) => {
                    plane.active = true;
                    println!(
                        "  {}: programmed{}",
                        plane.name,
                        plane.program_ms.map(|t| format!(" in {t:.0} ms")).unwrap_or_default()
                    );
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    println!("  {}: not measured: {}", plane.name, first_line(&reason));
                    unavailable.push(Unavailable { dataplane: plane.name.clone(), services: n, reason });
                    // A ferry backend that does not start won't start at the next size either;
                    // nftables failing is a bug worth seeing at every size.
                    plane.disabled = matches!(plane.kind, Kind::Ferry(b) if b.is_ebpf());
                    if let Err(e) = plane.unprogram(&ferry) {
                        // Whatever it left in its node namespace must not meet the next size.
                        println!("  {}: cleaning up after the failure failed too: {e:#}", plane.name);
                        plane.disabled = true;
                    }
                }
            }
        }
        let result = measure_size(args, &planes, n);
        for plane in &mut planes {
            if plane.active {
                plane.unprogram(&ferry)?;
            }
        }
        measurements.extend(result?);
    }
    for plane in &mut planes {
        if let Some(p) = plane.iperf.take() {
            p.kill()?;
        }
    }
    drop(planes);

    let report = Report {
        machine,
        connects: args.connects,
        iperf_seconds: args.iperf_seconds,
        iperf_rounds: args.iperf_rounds,
        no_offload: args.no_offload,
        measurements,
        unavailable,
        loadavg_at_end: crate::bench::loadavg(),
    };
    print_report(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.svg {
        write_svg(path, &plot(&report))?;
    }
    Ok(())
}

/// The measured service (index 0, one endpoint: the server pod) and `n - 1` fillers.
fn service_set(n: usize, endpoints: usize) -> Result<Vec<Service>> {
    let mut all = services::synthetic_set(n, endpoints)?;
    if let Some(target) = all.first_mut() {
        *target = Service {
            name: "target".into(),
            cluster_ip: services::cluster_ip(0),
            ports: vec![
                Port { name: "http", port: HTTP_PORT, target: RESPONDER_PORT },
                Port { name: "iperf", port: IPERF_PORT, target: IPERF_PORT },
            ],
            endpoints: vec![Endpoint { ip: SERVER_POD, node: "node" }],
        };
    }
    Ok(all)
}

/// The server pod of every copy of the cluster: the first local pod.
const SERVER_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);

impl Plane {
    fn build(kind: Kind, iperf: bool, no_offload: bool) -> Result<Self> {
        let (name, hint) = match kind {
            Kind::Baseline => (NONE.to_owned(), "bench_dp_none"),
            Kind::Ferry(b) => (
                format!("ferry {}", b.name()),
                match b {
                    Backend::Nftables => "bench_dp_nft",
                    Backend::Ebpf => "bench_dp_ebpf",
                    Backend::EbpfBypass => "bench_dp_ebpfb",
                },
            ),
            Kind::KubeProxy => (KUBE_PROXY.to_owned(), "bench_dp_kube_proxy"),
        };
        let sandbox = Sandbox::new(hint)?;
        let cluster = Cluster::build(
            &sandbox,
            &ClusterSpec { local_pods: 1, remote_pods: 0, responder_port: Some(RESPONDER_PORT) },
        )?;
        let pod = cluster.pods.first().context("the cluster has no pod")?;
        ensure!(pod.ip4 == SERVER_POD, "the server pod is {}, expected {SERVER_POD}", pod.ip4);
        if no_offload {
            cluster.client.ns.exec(&["ethtool", "-K", "eth0", "tso", "off", "gso", "off"])?;
        }
        let iperf = if iperf {
            let mut args = vec!["iperf3", "-s", "-p", "5201", "--forceflush"];
            args.extend(IPERF_SERVER_CPU);
            let p = pod.ns.spawn(&args)?;
            p.wait_for_output("Server listening", Duration::from_secs(10))?;
            Some(p)
        } else {
            None
        };
        Ok(Self {
            name,
            kind,
            server: SocketAddr::new(SERVER_POD.into(), RESPONDER_PORT),
            cluster,
            iperf,
            ferry: None,
            cgroup: None,
            program_ms: None,
            active: false,
            disabled: false,
            _sandbox: sandbox,
        })
    }

    fn node(&self) -> &Netns {
        &self.cluster.node.ns
    }

    /// Programs the services (ferry from the manifests in `dir`), then checks one request
    /// through the ClusterIP reaches the server pod.
    fn program(&mut self, ferry: &Path, dir: &Path, services: &[Service]) -> Result<()> {
        self.program_ms = None;
        match self.kind {
            Kind::Baseline => return Ok(()),
            Kind::Ferry(backend) => {
                let mut cmd: Vec<String> = vec![
                    ferry.display().to_string(),
                    "run".into(),
                    "--backend".into(),
                    backend.ferry_backend().into(),
                    "--manifests".into(),
                    dir.display().to_string(),
                ];
                cmd.extend(self.cluster.node_flags());
                cmd.extend(["--min-sync-period", "100ms", "--sync-period", "1h"].map(String::from));
                if backend == Backend::EbpfBypass {
                    cmd.push("--bypass-netfilter".into());
                }
                if backend.is_ebpf() {
                    let tag = format!("{backend:?}").to_lowercase();
                    let cgroup = ebpf_preflight(ferry, dir, &self.cluster, &tag)?;
                    // `ip netns exec` mounts a fresh /sys, hiding the cgroup hierarchy; reach our
                    // cgroup through this process's root instead.
                    let seen = format!("/proc/{}/root{}", std::process::id(), cgroup.0.display());
                    cmd.extend(["--cgroup-path".to_owned(), seen]);
                    self.cgroup = Some(cgroup);
                }
                let proc = self.node().command(&cmd)?.env("RUST_BACKTRACE", "0").spawn()?;
                self.ferry = Some(proc.clone());
                let timeout = Duration::from_secs(60) + Duration::from_millis(6) * services.len() as u32;
                let lines = wait_syncs(&proc, 1, timeout)?;
                self.program_ms = lines.first().map(|l| l.took_ms);
            }
            Kind::KubeProxy => {
                let opts = kube_proxy::Options {
                    cluster_cidr: self.cluster.cluster_cidr4.to_string(),
                    service_cidr: self.cluster.service_cidr4.to_string(),
                };
                let script = kube_proxy::full_sync(services, &opts);
                let (took, _) = timed_command(
                    self.node(),
                    &["nft", "-f", "-"],
                    Some(&script),
                    Duration::from_secs(1800),
                )?;
                self.program_ms = Some(took.as_secs_f64() * 1e3);
            }
        }
        let cluster_ip = SocketAddr::new(services::cluster_ip(0).into(), HTTP_PORT);
        let reply = self
            .cluster
            .client
            .ns
            .tcp_request(cluster_ip, Duration::from_secs(2))
            .context("the ClusterIP does not answer")?;
        ensure!(
            reply.server == self.server,
            "ClusterIP served by {} instead of {}",
            reply.server,
            self.server
        );
        Ok(())
    }

    /// Removes what `program` installed; the node namespace is left without any table.
    fn unprogram(&mut self, ferry: &Path) -> Result<()> {
        self.active = false;
        match self.kind {
            Kind::Baseline => {}
            Kind::Ferry(backend) => {
                if let Some(proc) = self.ferry.take() {
                    stop_and_clean(ferry, &proc, self.node(), backend.ferry_backend())?;
                }
                self.cgroup = None;
            }
            Kind::KubeProxy => {
                let tables = self.node().exec(&["nft", "list", "tables"])?;
                if tables.contains(kube_proxy::TABLE) {
                    self.node().exec(&["nft", "delete", "table", "ip", kube_proxy::TABLE])?;
                }
            }
        }
        let left = self.node().exec(&["nft", "list", "tables"])?;
        ensure!(left.trim().is_empty(), "{}: tables left behind: {left}", self.name);
        Ok(())
    }

    /// The targets measured: the ClusterIP (not without a ruleset) and the pod IP.
    fn targets(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut t = Vec::new();
        if self.kind != Kind::Baseline {
            t.push(("clusterip", SocketAddr::new(services::cluster_ip(0).into(), HTTP_PORT)));
        }
        t.push(("pod", self.server));
        t
    }
}

/// Latency and throughput of every active data plane and target, interleaved.
fn measure_size(args: &Args, planes: &[Plane], n: usize) -> Result<Vec<Measurement>> {
    let pairs: Vec<(&Plane, &'static str, SocketAddr)> = planes
        .iter()
        .filter(|p| p.active || p.kind == Kind::Baseline)
        .flat_map(|p| p.targets().into_iter().map(move |(t, a)| (p, t, a)))
        .collect();
    let targets: Vec<(Netns, SocketAddr, SocketAddr)> =
        pairs.iter().map(|(plane, _, addr)| (plane.cluster.client.ns.clone(), *addr, plane.server)).collect();
    let lat = interleaved_latency(&targets, args.connects, Duration::from_secs(args.connect_budget))?;

    let mut tput: Vec<Vec<f64>> = pairs.iter().map(|_| Vec::new()).collect();
    if args.iperf_seconds > 0 {
        for round in 0..args.iperf_rounds {
            for k in 0..pairs.len() {
                let i = (k + round) % pairs.len();
                let (plane, _, addr) = pairs[i];
                let server = plane.iperf.as_ref().context("no iperf3 server")?;
                let target = SocketAddr::new(addr.ip(), IPERF_PORT);
                tput[i].push(throughput(&plane.cluster.client.ns, target, args.iperf_seconds, server)?);
            }
        }
    }

    let mut out = Vec::new();
    for (i, (plane, target, addr)) in pairs.iter().enumerate() {
        let l = &lat[i];
        ensure!(!l.samples_us.is_empty(), "{} {target}: no connection succeeded", plane.name);
        let mut sorted = l.samples_us.clone();
        sorted.sort_by(f64::total_cmp);
        let mut rounds = tput[i].clone();
        rounds.sort_by(f64::total_cmp);
        let m = Measurement {
            dataplane: plane.name.clone(),
            services: n,
            target,
            address: addr.to_string(),
            program_ms: plane.program_ms,
            connects: sorted.len(),
            failures: l.failures,
            wrong_endpoint: l.wrong_endpoint,
            p10_us: percentile(&sorted, 10.0),
            p25_us: percentile(&sorted, 25.0),
            p50_us: percentile(&sorted, 50.0),
            p75_us: percentile(&sorted, 75.0),
            p90_us: percentile(&sorted, 90.0),
            p99_us: percentile(&sorted, 99.0),
            mean_us: sorted.iter().sum::<f64>() / sorted.len() as f64,
            throughput_gbit_s: (!rounds.is_empty()).then(|| percentile(&rounds, 50.0)),
            throughput_rounds_gbit_s: tput[i].clone(),
            errors: l.errors.clone(),
        };
        println!("  {}, {target}: {}", plane.name, summary(&m));
        out.push(m);
    }
    Ok(out)
}

#[derive(Default)]
struct Latency {
    samples_us: Vec<f64>,
    failures: usize,
    wrong_endpoint: usize,
    /// The first few failures' messages.
    errors: Vec<String>,
}

impl Latency {
    fn record(&mut self, result: Result<(Duration, SocketAddr)>, expect: SocketAddr) {
        match result {
            Ok((took, server)) => {
                self.samples_us.push(took.as_secs_f64() * 1e6);
                if server != expect {
                    self.wrong_endpoint += 1;
                }
            }
            Err(e) => {
                self.failures += 1;
                if self.errors.len() < 3 {
                    self.errors.push(format!("{e:#}"));
                }
            }
        }
    }
}

/// Latency to every target: one connection to each in turn, the order rotating every round,
/// so whatever else the machine does at a moment hits all targets alike. One thread of its own
/// enters each target's client namespace for its connection (the caller's never moves). Each
/// target first gets untimed warm-up connections (neighbour entries, caches).
fn interleaved_latency(
    targets: &[(Netns, SocketAddr, SocketAddr)],
    count: usize,
    budget: Duration,
) -> Result<Vec<Latency>> {
    let measure = || -> Result<Vec<Latency>> {
        let mut lat: Vec<Latency> = targets.iter().map(|_| Latency::default()).collect();
        for (ns, addr, _) in targets {
            let _inside = ns.enter()?;
            for _ in 0..WARMUP {
                let _ = one_connection(*addr);
            }
        }
        let deadline = Instant::now() + budget;
        for round in 0..count {
            if Instant::now() > deadline {
                println!("  latency: stopped at the {budget:?} budget after {round} rounds");
                break;
            }
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                let (ns, addr, expect) = &targets[i];
                let result = {
                    let _inside = ns.enter()?;
                    one_connection(*addr)
                };
                lat[i].record(result, *expect);
            }
        }
        Ok(lat)
    };
    std::thread::scope(|scope| match scope.spawn(measure).join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// Connects (timed), reads the responder's reply, closes with a reset (no TIME_WAIT).
fn one_connection(target: SocketAddr) -> Result<(Duration, SocketAddr)> {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    let took = started.elapsed();
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut reply = String::new();
    (&stream).take(256).read_to_string(&mut reply)?;
    setsockopt(&stream, sockopt::Linger, &nix::libc::linger { l_onoff: 1, l_linger: 0 })?;
    drop(stream);
    let reply = Reply::parse(&reply).with_context(|| format!("unexpected reply {reply:?}"))?;
    Ok((took, reply.server))
}

/// iperf3's server and client each pinned to a core of their own (`-A`), so every data plane
/// is measured with the same placement. Left to the scheduler, single runs clustered at
/// ≈ 16.5 or ≈ 20 Gbit/s for every data plane alike (where the two processes landed); the
/// sender's core also runs the veth path (both TC programs, netfilter) in its softirq.
const IPERF_SERVER_CPU: [&str; 2] = ["-A", "0"];
const IPERF_CLIENT_CPU: [&str; 2] = ["-A", "1"];

/// iperf3 from `client` to `target` for `seconds` (+1 omitted), in Gbit/s.
fn throughput(client: &Netns, target: SocketAddr, seconds: u32, server: &Process) -> Result<f64> {
    let (ip, port, secs) = (target.ip().to_string(), target.port().to_string(), seconds.to_string());
    let mut args =
        vec!["iperf3", "-c", &ip, "-p", &port, "-t", &secs, "-O", "1", "-J", "--connect-timeout", "3000"];
    args.extend(IPERF_CLIENT_CPU);
    let bound = Duration::from_secs(u64::from(seconds) + 20);
    let out = match timed_command(client, &args, None, bound) {
        Ok((_, out)) => out,
        Err(e) => bail!("iperf3 to {target}: {e:#}\nserver: {}", tail(&server.output(), 5)),
    };
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    if let Some(err) = json.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 to {target}: {err}");
    }
    let bps = json
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("iperf3 -J output has no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

/// A cgroup of our own for eBPF socket programs (never the root cgroup), removed on drop.
struct OwnCgroup(PathBuf);

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("could not remove cgroup {}: {e}", self.0.display());
        }
    }
}

/// Whether `ferry run --backend ebpf` can be tried safely, and a cgroup for it. `ferry render`
/// touches nothing, so it is tried first; `run` is only started when it accepts `--cgroup-path`
/// (otherwise its socket programs would attach to the root cgroup, i.e. the whole machine).
/// `tag` tells the cgroups of several eBPF data planes apart.
fn ebpf_preflight(ferry: &Path, dir: &Path, cluster: &Cluster, tag: &str) -> Result<OwnCgroup> {
    let render = Command::new(ferry)
        .env("RUST_BACKTRACE", "0")
        .args(["render", "--backend", "ebpf", "--manifests"])
        .arg(dir)
        .args(cluster.node_flags())
        .output()
        .context("running ferry render --backend ebpf")?;
    if !render.status.success() {
        let err = String::from_utf8_lossy(&render.stderr);
        bail!("`ferry render --backend ebpf` fails: {}", first_line(err.trim()));
    }
    let help = Command::new(ferry).args(["run", "--help"]).output().context("ferry run --help")?;
    if !String::from_utf8_lossy(&help.stdout).contains("--cgroup-path") {
        bail!(
            "`ferry run` has no --cgroup-path yet; not started, its socket programs would attach to the root cgroup"
        );
    }
    let root = cgroup2_mount()?;
    let dir = root.join(format!("ferry-bench-{}-{tag}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    Ok(OwnCgroup(dir))
}

/// Where the cgroup v2 hierarchy is mounted.
fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
        .context("no cgroup v2 hierarchy is mounted")
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn summary(m: &Measurement) -> String {
    let mut s = format!(
        "p50 {:.0} µs, p99 {:.0} µs over {} connects ({} failed, {} wrong endpoint)",
        m.p50_us, m.p99_us, m.connects, m.failures, m.wrong_endpoint
    );
    if let Some(t) = m.throughput_gbit_s {
        s.push_str(&format!(", {t:.1} Gbit/s"));
    }
    if let Some(e) = m.errors.first() {
        s.push_str(&format!("; first failure: {e}"));
    }
    s
}

fn find<'a>(report: &'a Report, dataplane: &str, n: usize, target: &str) -> Option<&'a Measurement> {
    report.measurements.iter().find(|m| m.dataplane == dataplane && m.services == n && m.target == target)
}

fn dataplanes(report: &Report) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for m in &report.measurements {
        if !names.contains(&m.dataplane) {
            names.push(m.dataplane.clone());
        }
    }
    names
}

fn sizes(report: &Report) -> Vec<usize> {
    let mut sizes: Vec<usize> = report.measurements.iter().map(|m| m.services).collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

fn print_report(report: &Report) {
    println!(
        "\ndata path: {} connects per row, iperf3 median of {} × {} s{}",
        report.connects,
        report.iperf_rounds,
        report.iperf_seconds,
        if report.no_offload { ", TSO/GSO off on the client pod" } else { "" }
    );
    let headers = [
        "services",
        "data plane",
        "target",
        "p25 µs",
        "p50 µs",
        "p75 µs",
        "p99 µs",
        "mean µs",
        "Gbit/s",
        "failed",
        "programmed ms",
    ];
    let rows: Vec<Vec<String>> = report
        .measurements
        .iter()
        .map(|m| {
            vec![
                m.services.to_string(),
                m.dataplane.clone(),
                m.target.to_owned(),
                cell(Some(m.p25_us)),
                cell(Some(m.p50_us)),
                cell(Some(m.p75_us)),
                cell(Some(m.p99_us)),
                cell(Some(m.mean_us)),
                cell(m.throughput_gbit_s),
                (m.failures + m.wrong_endpoint).to_string(),
                cell(m.program_ms),
            ]
        })
        .collect();
    print_table(&headers, &rows);

    println!("\nratios: ClusterIP ÷ pod IP under the same ruleset; ClusterIP ÷ kube-proxy shape's ClusterIP");
    let headers =
        ["services", "data plane", "p50 CIP/pod", "p99 CIP/pod", "Gbit/s CIP/pod", "p50 ÷ kp", "p99 ÷ kp"];
    let mut rows = Vec::new();
    for n in sizes(report) {
        for d in dataplanes(report) {
            let (Some(c), Some(p)) = (find(report, &d, n, "clusterip"), find(report, &d, n, "pod")) else {
                continue;
            };
            let kp = find(report, KUBE_PROXY, n, "clusterip");
            let tput = c.throughput_gbit_s.zip(p.throughput_gbit_s).map(|(a, b)| a / b);
            let ratio = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"));
            rows.push(vec![
                n.to_string(),
                d.clone(),
                ratio(Some(c.p50_us / p.p50_us)),
                ratio(Some(c.p99_us / p.p99_us)),
                ratio(tput),
                ratio(kp.map(|k| c.p50_us / k.p50_us)),
                ratio(kp.map(|k| c.p99_us / k.p99_us)),
            ]);
        }
    }
    print_table(&headers, &rows);
    for u in &report.unavailable {
        println!("  not measured: {} at {} services: {}", u.dataplane, u.services, first_line(&u.reason));
    }
}

fn color(dataplane: &str) -> &'static str {
    match dataplane {
        "ferry nftables" => crate::bench_kernel::FERRY_NFT,
        "ferry ebpf" => "#2ca02c",
        "ferry ebpf --bypass-netfilter" => "#9467bd",
        KUBE_PROXY => crate::bench_kernel::KUBE_PROXY,
        _ => "#7f7f7f",
    }
}

fn plot(report: &Report) -> String {
    let sizes = sizes(report);
    let points = |d: &str, target: &str, f: fn(&Measurement) -> Option<f64>| -> Vec<(f64, f64)> {
        sizes.iter().filter_map(|&n| find(report, d, n, target).and_then(f).map(|v| (n as f64, v))).collect()
    };
    let mut latency = Vec::new();
    let mut tput = Vec::new();
    for d in dataplanes(report) {
        let c = color(&d);
        let target = if d == NONE { "pod" } else { "clusterip" };
        let shown = if d == NONE { format!("pod IP, {NONE}") } else { format!("{d} → ClusterIP") };
        for (what, dashed, f) in [
            ("p50", false, (|m| Some(m.p50_us)) as fn(&Measurement) -> Option<f64>),
            ("p99", true, |m| Some(m.p99_us)),
        ] {
            latency.push(Series {
                name: format!("{shown} {what}"),
                color: c,
                dashed,
                points: points(&d, target, f),
            });
        }
        tput.push(Series {
            name: shown,
            color: c,
            dashed: d == NONE,
            points: points(&d, target, |m| m.throughput_gbit_s),
        });
    }
    let m = &report.machine;
    let caption = format!(
        "cargo xtask bench-datapath · {} connects · {} × {} · kernel {} · ferry {} · load {} → {}",
        report.connects, m.cpus, m.cpu, m.kernel, m.ferry_commit, m.loadavg_at_start, report.loadavg_at_end
    );
    let charts = [
        Chart {
            title: "TCP connection setup latency".into(),
            x_label: "services programmed".into(),
            y_label: "microseconds".into(),
            x_log: true,
            y_log: false,
            series: latency,
        },
        Chart {
            title: "Throughput (iperf3, one stream, median)".into(),
            x_label: "services programmed".into(),
            y_label: "Gbit/s".into(),
            x_log: true,
            y_log: false,
            series: tput,
        },
    ];
    svg::render(&caption, &charts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_service_should_have_the_server_pod_as_only_endpoint() {
        let all = service_set(3, 10).expect("3 services fit");
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].endpoints, vec![Endpoint { ip: SERVER_POD, node: "node" }]);
        assert_eq!(all[0].ports.len(), 2);
        assert_eq!(all[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(all[2].endpoints.len(), 10);
    }
}
