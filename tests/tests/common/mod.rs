//! The fixture of the end-to-end suites: a sandboxed [`Cluster`], a manifest directory written
//! from the cluster's real pod addresses, and `ferry run` inside the node namespace, for one
//! data plane ([`Backend`]: nftables, eBPF, IPVS). The end-to-end suite (`e2e.rs`) runs each of
//! its tests once per backend.
//!
//! Everything is per test: its own sandbox (namespaces named after the test), its own manifest
//! directory, its own ferry process. Dropping the [`Fixture`] (also while a test panics) stops
//! ferry, removes the namespaces with everything in them and deletes the manifest directory
//! (eBPF: also the test's bpffs and its cgroup). Nothing is added to the root namespace.
//!
//! The ferry binary is `$FERRY_BIN`, else `<target dir>/debug/ferry` (`cargo xtask test` builds
//! it; by hand: `cargo build -p proxy`).

#![allow(dead_code, reason = "shared by several test binaries, each using a part of it")]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_sandbox::{Cluster, ClusterSpec, Netns, Pod, Process, Proto, Reply, Sandbox, Signal};

/// Timeout of a request that must be answered.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request waits before it counts as dropped.
pub const DROP_TIMEOUT: Duration = Duration::from_millis(400);
/// How long ferry may take to start and program the node.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a manifest change may take to be programmed (poll 300 ms, debounce 200 ms,
/// `--min-sync-period`), with room for a loaded machine.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// `--sync-period`: how often ferry rewrites its whole state.
pub const SYNC_PERIOD: Duration = Duration::from_secs(2);
/// Port of the pods' responders (TCP and UDP, both families).
pub const POD_PORT: u16 = 8080;
/// Namespace of the test Services.
const NAMESPACE: &str = "e2e";
/// The interface in the node namespace that the service CIDRs are routed to, so that
/// connections the node itself opens to a ClusterIP have a route (as on a real node). It is an
/// empty bridge, which like a dummy device discards what it is given (kernels without the dummy
/// module have bridges: the LAN is one).
const SERVICE_ROUTE_DEV: &str = "svc0";

pub mod backend;

pub use backend::Backend;
use backend::{BackendEnv, ebpf_delete_frontend, ebpf_programmed};

/// The ferry binary under test.
pub fn ferry_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FERRY_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/ferry");
    assert!(
        bin.exists(),
        "the ferry binary {} is missing: run `cargo build -p proxy` first (or set FERRY_BIN)",
        bin.display()
    );
    bin
}

/// A sandboxed cluster with ferry programming its node from a manifest directory.
pub struct Fixture {
    pub cluster: Cluster,
    pub backend: Backend,
    manifests: ManifestDir,
    extra_flags: Vec<String>,
    sync_period: Duration,
    ferry: Option<Process>,
    /// The backend's per-test resources outside the namespaces; dropped after ferry stopped.
    env: BackendEnv,
    /// Dropped last: removes the namespaces and kills what runs in them.
    sb: Sandbox,
}

impl Fixture {
    /// Builds the cluster (two local pods, one remote pod, responders on [`POD_PORT`]) and the
    /// node's service route; ferry is started by [`start`](Self::start).
    pub fn new(test: &str, backend: Backend) -> Self {
        Self::with_spec(
            test,
            backend,
            &ClusterSpec { local_pods: 2, remote_pods: 1, responder_port: Some(POD_PORT) },
        )
    }

    pub fn with_spec(test: &str, backend: Backend, spec: &ClusterSpec) -> Self {
        let sb = Sandbox::new(test).unwrap_or_else(|e| panic!("sandbox for {test}: {e}"));
        let cluster = Cluster::build(&sb, spec).unwrap_or_else(|e| panic!("cluster for {test}: {e}"));
        let node = &cluster.node;
        let ns = &node.ns;
        let setup = || -> ferry_sandbox::Result<()> {
            ns.ip(&["link", "add", SERVICE_ROUTE_DEV, "type", "bridge"])?;
            ns.ip(&["link", "set", SERVICE_ROUTE_DEV, "up"])?;
            let (cidr4, src4) = (cluster.service_cidr4.to_string(), node.ip4.to_string());
            let (cidr6, src6) = (cluster.service_cidr6.to_string(), node.ip6.to_string());
            ns.ip(&["-4", "route", "add", &cidr4, "dev", SERVICE_ROUTE_DEV, "src", &src4])?;
            ns.ip(&["-6", "route", "add", &cidr6, "dev", SERVICE_ROUTE_DEV, "src", &src6])?;
            Ok(())
        };
        setup().unwrap_or_else(|e| panic!("service route in the node namespace: {e}"));
        let manifests = ManifestDir::create(&std::env::temp_dir().join(format!("{}manifests", sb.prefix())));
        manifests.write("node.yaml", &node_yaml(&node.name));
        let env = BackendEnv::create(backend, sb.prefix());
        Self {
            cluster,
            backend,
            manifests,
            extra_flags: Vec::new(),
            sync_period: SYNC_PERIOD,
            ferry: None,
            env,
            sb,
        }
    }

    /// `--sync-period` for the next start, instead of [`SYNC_PERIOD`].
    pub fn with_sync_period(mut self, period: Duration) -> Self {
        self.sync_period = period;
        self
    }

    /// Extra `ferry run` flags (e.g. `--masquerade-all`), for the next start.
    pub fn with_flags(mut self, flags: &[&str]) -> Self {
        self.extra_flags = flags.iter().map(|f| (*f).to_owned()).collect();
        self
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sb
    }

    /// Writes `services` and starts ferry; returns once it has programmed them.
    pub fn start(&mut self, services: &[&Svc]) {
        for svc in services {
            self.manifests.write(&svc.file_name(), &svc.yaml(&self.cluster));
        }
        self.start_ferry();
    }

    /// Starts `ferry run` in the node namespace and waits for its first sync.
    pub fn start_ferry(&mut self) {
        assert!(self.ferry.is_none(), "ferry is already running");
        let mut args: Vec<String> = vec![
            ferry_bin().to_string_lossy().into_owned(),
            "run".into(),
            "--backend".into(),
            self.backend.name().into(),
            "--manifests".into(),
            self.manifests.path.to_string_lossy().into_owned(),
        ];
        args.extend(self.cluster.node_flags());
        args.extend(self.env.run_flags());
        let min_sync = self.sync_period.min(Duration::from_millis(100));
        args.push("--min-sync-period".into());
        args.push(format!("{}ms", min_sync.as_millis()));
        args.push("--sync-period".into());
        args.push(format!("{}ms", self.sync_period.as_millis()));
        args.extend(self.extra_flags.iter().cloned());
        let process = self
            .cluster
            .node
            .ns
            .command(&args)
            .and_then(|c| c.env("NO_COLOR", "1").env("RUST_LOG", "info").spawn())
            .unwrap_or_else(|e| panic!("starting ferry: {e}"));
        self.ferry = Some(process);
        self.wait_for_sync(0, SyncKind::Any, START_TIMEOUT);
    }

    /// Stops ferry with SIGTERM (its data path stays) and checks that it exits cleanly.
    pub fn stop_ferry(&mut self) {
        let ferry = self.ferry.take().expect("ferry is running");
        ferry.signal(Signal::SIGTERM).unwrap_or_else(|e| panic!("SIGTERM to ferry: {e}"));
        let status =
            ferry.wait_timeout(Duration::from_secs(5)).unwrap_or_else(|e| panic!("ferry's exit: {e}"));
        assert!(
            status.success(),
            "ferry exited with {status} after SIGTERM; its output:\n{}",
            ferry.output()
        );
    }

    pub fn ferry(&self) -> &Process {
        self.ferry.as_ref().expect("ferry is running")
    }

    /// What ferry has printed so far.
    pub fn log(&self) -> String {
        strip_ansi(&self.ferry().output())
    }

    /// A position in ferry's output, for [`wait_for_sync`](Self::wait_for_sync).
    pub fn mark(&self) -> usize {
        self.log().len()
    }

    /// Waits for a sync of `kind` logged after `mark`; panics on timeout or a failed sync.
    pub fn wait_for_sync(&self, mark: usize, kind: SyncKind, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            let new = log.get(mark..).unwrap_or("");
            if let Some(line) =
                new.lines().find(|l| l.contains("sync failed") || l.contains("nftables sync failed"))
            {
                panic!("ferry failed to sync: {line}\nits output:\n{log}");
            }
            if new.lines().filter_map(SyncLine::parse).any(|s| kind.matches(&s)) {
                return;
            }
            if let Ok(Some(status)) = self.ferry().try_wait() {
                panic!("ferry exited ({status}) while we waited for a sync; its output:\n{log}");
            }
            assert!(Instant::now() < deadline, "no {kind:?} sync within {timeout:?}; ferry's output:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a request from the client pod to `target` is answered: objects are parsed
    /// before the sync that programs them, and a Service may be synced before the
    /// EndpointSlice beside it (REJECT meanwhile), as with the API.
    pub fn wait_until_answered(&self, proto: Proto, target: SocketAddr) {
        let deadline = Instant::now() + SYNC_TIMEOUT * 3;
        while let Err(e) = try_request(&self.cluster.client.ns, proto, target, DROP_TIMEOUT) {
            assert!(Instant::now() < deadline, "{proto:?} to {target} never answered: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until ferry's output after `mark` contains `needle`.
    pub fn wait_for_log(&self, mark: usize, needle: &str) {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            let log = self.log();
            if log.get(mark..).is_some_and(|l| l.contains(needle)) {
                return;
            }
            assert!(Instant::now() < deadline, "ferry did not log {needle:?}; its output:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes (or rewrites) a service's manifest and waits until ferry has programmed the change.
    pub fn apply(&self, svc: &Svc) {
        let mark = self.mark();
        self.manifests.write(&svc.file_name(), &svc.yaml(&self.cluster));
        self.wait_for_sync(mark, SyncKind::Changed, SYNC_TIMEOUT);
    }

    /// Removes a service's manifest and waits until ferry has programmed the removal.
    pub fn delete(&self, svc: &Svc) {
        let mark = self.mark();
        let path = self.manifests.path.join(svc.file_name());
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
        self.wait_for_sync(mark, SyncKind::Changed, SYNC_TIMEOUT);
    }

    /// Writes a raw manifest file (no waiting).
    pub fn write_manifest(&self, file: &str, text: &str) {
        self.manifests.write(file, text);
    }

    /// The ClusterIP of service number `n` in one family.
    pub fn cluster_ip(&self, n: u8, family: Family) -> IpAddr {
        cluster_ip(&self.cluster, n, family)
    }

    /// `ClusterIP:port` of service number `n`.
    pub fn cluster_addr(&self, n: u8, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.cluster_ip(n, family), port)
    }

    /// The node's address of a family, as NodePort clients use it.
    pub fn node_addr(&self, family: Family, port: u16) -> SocketAddr {
        let ip = match family {
            Family::V4 => IpAddr::from(self.cluster.node.ip4),
            Family::V6 => IpAddr::from(self.cluster.node.ip6),
        };
        SocketAddr::new(ip, port)
    }

    /// The responder addresses of `pods` in one family.
    pub fn endpoints(&self, pods: &[&Pod], family: Family) -> Vec<SocketAddr> {
        pods.iter().map(|p| pod_addr(p, family)).collect()
    }

    /// Every pod that can serve: the local pods, then the remote ones.
    pub fn serving_pods(&self) -> Vec<&Pod> {
        self.cluster.pods.iter().chain(&self.cluster.remote_pods).collect()
    }

    /// The source an endpoint sees when the node masquerades a connection to it: the node's
    /// address on the interface toward it (the pod gateway for local pods, the LAN address for
    /// pods on other nodes).
    pub fn masquerade_source(&self, endpoint: SocketAddr) -> IpAddr {
        let node = &self.cluster.node;
        let local =
            self.cluster.pods.iter().chain([&self.cluster.client]).any(|p| p.ips().contains(&endpoint.ip()));
        match (endpoint.ip(), local) {
            (IpAddr::V4(_), true) => node.gateway4.into(),
            (IpAddr::V6(_), true) => node.gateway6.into(),
            (IpAddr::V4(_), false) => node.ip4.into(),
            (IpAddr::V6(_), false) => node.ip6.into(),
        }
    }

    /// Runs `nft` in the node namespace.
    pub fn nft(&self, args: &[&str]) -> ferry_sandbox::Result<String> {
        let mut all = vec!["nft"];
        all.extend_from_slice(args);
        self.cluster.node.ns.exec(&all)
    }

    /// Runs the ferry binary with `args` in the node namespace, to completion.
    pub fn ferry_command(&self, args: &[&str]) -> ferry_sandbox::Result<String> {
        let bin = ferry_bin();
        let mut all = vec![bin.to_string_lossy().into_owned()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        self.cluster.node.ns.command(&all)?.env("NO_COLOR", "1").output()
    }

    /// `ferry cleanup` for this backend, with the flags its kernel state needs.
    pub fn ferry_cleanup(&self) -> ferry_sandbox::Result<String> {
        let mut args = vec!["cleanup".to_owned(), "--backend".to_owned(), self.backend.name().to_owned()];
        args.extend(self.env.cleanup_flags());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ferry_command(&args)
    }

    /// The backend's per-test resources (eBPF: bpffs and cgroup).
    pub fn env(&self) -> &BackendEnv {
        &self.env
    }

    /// `n` requests from a process of the node itself (inside the backend's cgroup, where it
    /// has one: eBPF translates node processes with socket programs on that cgroup), each
    /// answered or an error.
    pub fn node_requests(
        &self,
        proto: Proto,
        target: SocketAddr,
        n: usize,
        timeout: Duration,
    ) -> Vec<Result<Reply, String>> {
        let cgroup = self.env.node_cgroup().map_or_else(|| "-".to_owned(), |p| p.display().to_string());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-client"))
            .arg(self.cluster.node.ns.path())
            .args([&cgroup, &proto.to_string(), &target.to_string(), &n.to_string()])
            .arg(timeout.as_millis().to_string())
            .output()
            .unwrap_or_else(|e| panic!("starting the node client: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "node client {proto} to {target}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let results: Vec<Result<Reply, String>> = stdout
            .lines()
            .map(|l| match l.strip_prefix("ok ") {
                Some(reply) => Reply::parse(reply).ok_or_else(|| format!("bad reply {reply:?}")),
                None => Err(l.to_owned()),
            })
            .collect();
        assert_eq!(results.len(), n, "node client output: {stdout}");
        results
    }

    /// `n` requests from a process of the node that must all be answered.
    pub fn node_sample(&self, proto: Proto, target: SocketAddr, n: usize) -> Vec<Reply> {
        self.node_requests(proto, target, n, TIMEOUT)
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|e| panic!("{proto} request {i} from the node to {target}: {e}")))
            .collect()
    }

    /// What the backend has programmed in the kernel, as sorted lines (nftables: ferry's two
    /// tables; eBPF: the maps, endpoint sets resolved; IPVS: the virtual servers).
    pub fn programmed(&self) -> Vec<String> {
        match self.backend {
            Backend::Nftables => {
                let mut out = Vec::new();
                for family in ["ip", "ip6"] {
                    let listing = self
                        .nft(&["list", "table", family, "ferry"])
                        .unwrap_or_else(|e| panic!("listing ferry's {family} table: {e}"));
                    out.extend(
                        listing
                            .split(['\n', ','])
                            .map(|s| format!("{family}: {}", s.trim()))
                            .filter(|s| !s.ends_with(": ")),
                    );
                }
                out.sort();
                out
            }
            Backend::Ebpf | Backend::EbpfBypass => {
                ebpf_programmed(self.env.bpffs().expect("eBPF has a bpffs"))
            }
            Backend::Ipvs => {
                let listing = self
                    .cluster
                    .node
                    .ns
                    .exec(&["ipvsadm", "-S", "-n"])
                    .unwrap_or_else(|e| panic!("listing the IPVS virtual servers: {e}"));
                let mut out: Vec<String> = listing.lines().map(str::to_owned).collect();
                out.sort();
                out
            }
        }
    }

    /// Deletes the backend's kernel entry for the frontend `ip:port/proto` behind ferry's back,
    /// with the tool an operator would use.
    pub fn delete_programmed_frontend(&self, ip: IpAddr, port: u16, proto: Proto) {
        match self.backend {
            Backend::Nftables => {
                let (family, proto_name) = (if ip.is_ipv4() { "ip" } else { "ip6" }, proto.to_string());
                let element = format!("{{ {ip} . {proto_name} . {port} }}");
                self.nft(&["delete", "element", family, "ferry", "frontends", &element]).unwrap_or_else(
                    |e| panic!("deleting {element} from ferry's {family} frontends map: {e}"),
                );
            }
            Backend::Ebpf | Backend::EbpfBypass => {
                ebpf_delete_frontend(self.env.bpffs().expect("eBPF has a bpffs"), ip, port, proto)
            }
            Backend::Ipvs => {
                let flag = if proto == Proto::Tcp { "-t" } else { "-u" };
                let service = SocketAddr::new(ip, port).to_string();
                self.cluster
                    .node
                    .ns
                    .exec(&["ipvsadm", "-D", flag, &service])
                    .unwrap_or_else(|e| panic!("deleting the IPVS virtual server {service}: {e}"));
            }
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The sandbox kills ferry too; stopping it first keeps it from acting on half-removed
        // namespaces. Never panic here: this may run while a test unwinds.
        if let Some(ferry) = self.ferry.take() {
            if std::thread::panicking() {
                eprintln!("ferry's output:\n{}", strip_ansi(&ferry.output()));
            }
            if let Err(e) = ferry.kill() {
                eprintln!("stopping ferry: {e}");
            }
        }
    }
}

/// Which syncs [`Fixture::wait_for_sync`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    Any,
    /// One that programmed a change of the plan.
    Changed,
    /// A full rewrite of the state.
    Full,
}

impl SyncKind {
    fn matches(self, s: &SyncLine) -> bool {
        match self {
            SyncKind::Any => true,
            SyncKind::Changed => s.changed > 0,
            SyncKind::Full => s.full,
        }
    }
}

/// ferry's `synced full=… changed=…` log line.
struct SyncLine {
    full: bool,
    changed: u64,
}

impl SyncLine {
    fn parse(line: &str) -> Option<Self> {
        if !line.contains(" synced") {
            return None;
        }
        let field = |name: &str| {
            line.split_whitespace().find_map(|w| w.strip_prefix(name).and_then(|w| w.strip_prefix('=')))
        };
        Some(Self { full: field("full")? == "true", changed: field("changed")?.parse().ok()? })
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI sequences end with a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A temporary manifest directory, removed on drop.
struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    fn create(path: &Path) -> Self {
        // A leftover of a killed run with the same (reused) pid would confuse this one.
        let _ = std::fs::remove_dir_all(path);
        std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path: path.to_owned() }
    }

    /// Writes `file` atomically, so ferry never reads half of it.
    fn write(&self, file: &str, text: &str) {
        let tmp = self.path.join(format!(".{file}.tmp"));
        let dst = self.path.join(file);
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &dst).unwrap_or_else(|e| panic!("renaming to {}: {e}", dst.display()));
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("removing {}: {e}", self.path.display());
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];
}

pub fn pod_addr(pod: &Pod, family: Family) -> SocketAddr {
    match family {
        Family::V4 => pod.addr4(POD_PORT),
        Family::V6 => pod.addr6(POD_PORT),
    }
}

pub fn pod_ip(pod: &Pod, family: Family) -> IpAddr {
    pod_addr(pod, family).ip()
}

/// ClusterIP number `n` of the cluster's service CIDRs: `10.96.0.<n>`, `fd00:96::<n>`.
fn cluster_ip(cluster: &Cluster, n: u8, family: Family) -> IpAddr {
    match family {
        Family::V4 => {
            let [a, b, c, _] = cluster.service_cidr4.network().octets();
            Ipv4Addr::new(a, b, c, n).into()
        }
        Family::V6 => {
            let mut s = cluster.service_cidr6.network().segments();
            // Same digits as the IPv4 twin: 10 → fd00:96::10.
            s[7] = u16::from_str_radix(&n.to_string(), 16).unwrap_or(u16::from(n));
            Ipv6Addr::from(s).into()
        }
    }
}

/// A Service port.
#[derive(Clone, Debug)]
pub struct SvcPort {
    pub name: &'static str,
    pub proto: Proto,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// Conditions of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpState {
    Ready,
    /// Terminating but still serving.
    Terminating,
}

/// A dual-stack Service of namespace `e2e`, with its IPv4 and IPv6 EndpointSlices; every port
/// targets `target_port` (the pods' responders on [`POD_PORT`] unless changed).
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    pub type_: &'static str,
    /// Its ClusterIPs are `10.96.0.<ip>` and `fd00:96::<ip>`.
    pub ip: u8,
    pub ports: Vec<SvcPort>,
    pub target_port: u16,
    /// Node name, addresses and state of each endpoint.
    pub endpoints: Vec<(String, Ipv4Addr, Ipv6Addr, EpState)>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub affinity_timeout: Option<u32>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress`: address and `ipMode`.
    pub ingress: Vec<(IpAddr, &'static str)>,
    pub source_ranges: Vec<String>,
}

impl Svc {
    /// A ClusterIP service with ports `http` 80/TCP and `dns` 53/UDP.
    pub fn new(name: &str, ip: u8) -> Self {
        Self {
            name: name.to_owned(),
            type_: "ClusterIP",
            ip,
            ports: vec![
                SvcPort { name: "http", proto: Proto::Tcp, port: 80, node_port: None },
                SvcPort { name: "dns", proto: Proto::Udp, port: 53, node_port: None },
            ],
            target_port: POD_PORT,
            endpoints: Vec::new(),
            external_policy_local: false,
            internal_policy_local: false,
            affinity_timeout: None,
            external_ips: Vec::new(),
            ingress: Vec::new(),
            source_ranges: Vec::new(),
        }
    }

    /// Type NodePort (or LoadBalancer, see [`load_balancer`](Self::load_balancer)), with
    /// NodePorts for `http` and `dns`.
    pub fn node_port(mut self, tcp: u16, udp: u16) -> Self {
        self.type_ = "NodePort";
        for p in &mut self.ports {
            p.node_port = Some(if p.proto == Proto::Tcp { tcp } else { udp });
        }
        self
    }

    /// Type LoadBalancer with these ingress addresses and `ipMode`s.
    pub fn load_balancer(mut self, ingress: &[(IpAddr, &'static str)]) -> Self {
        self.type_ = "LoadBalancer";
        self.ingress = ingress.to_vec();
        self
    }

    pub fn endpoint(mut self, pod: &Pod, state: EpState) -> Self {
        self.endpoints.push((pod.node.clone(), pod.ip4, pod.ip6, state));
        self
    }

    pub fn ready(mut self, pods: &[&Pod]) -> Self {
        for pod in pods {
            self = self.endpoint(pod, EpState::Ready);
        }
        self
    }

    pub fn file_name(&self) -> String {
        format!("{}.yaml", self.name)
    }

    /// The manifest: the Service and its two EndpointSlices.
    pub fn yaml(&self, cluster: &Cluster) -> String {
        let mut y = String::new();
        let ip4 = cluster_ip(cluster, self.ip, Family::V4);
        let ip6 = cluster_ip(cluster, self.ip, Family::V6);
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n  \
             type: {type_}\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
             clusterIP: \"{ip4}\"\n  clusterIPs: [\"{ip4}\", \"{ip6}\"]\n",
            name = self.name,
            type_ = self.type_,
        );
        if self.external_policy_local {
            y.push_str("  externalTrafficPolicy: Local\n");
        }
        if self.internal_policy_local {
            y.push_str("  internalTrafficPolicy: Local\n");
        }
        if let Some(t) = self.affinity_timeout {
            let _ = write!(
                y,
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n"
            );
        }
        if !self.external_ips.is_empty() {
            let _ = writeln!(y, "  externalIPs: [{}]", quoted(&self.external_ips));
        }
        if !self.source_ranges.is_empty() {
            let _ = writeln!(y, "  loadBalancerSourceRanges: [{}]", quoted(&self.source_ranges));
        }
        y.push_str("  ports:\n");
        for p in &self.ports {
            let _ = write!(
                y,
                "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}\n",
                p.name,
                proto_name(p.proto),
                p.port,
                self.target_port
            );
            if let Some(np) = p.node_port {
                let _ = writeln!(y, "    nodePort: {np}");
            }
        }
        if !self.ingress.is_empty() {
            y.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for (ip, mode) in &self.ingress {
                let _ = write!(y, "    - ip: \"{ip}\"\n      ipMode: {mode}\n");
            }
        }
        for (family, suffix, address_type) in [(Family::V4, "v4", "IPv4"), (Family::V6, "v6", "IPv6")] {
            let _ = write!(
                y,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{suffix}\n  \
                 namespace: {NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {name}\n\
                 addressType: {address_type}\nports:\n",
                name = self.name,
            );
            for p in &self.ports {
                let _ = write!(
                    y,
                    "- name: {}\n  protocol: {}\n  port: {}\n",
                    p.name,
                    proto_name(p.proto),
                    self.target_port
                );
            }
            y.push_str(if self.endpoints.is_empty() { "endpoints: []\n" } else { "endpoints:\n" });
            for (node, ip4, ip6, state) in &self.endpoints {
                let ip: IpAddr = if family == Family::V4 { (*ip4).into() } else { (*ip6).into() };
                let conditions = match state {
                    EpState::Ready => "{ready: true, serving: true, terminating: false}",
                    EpState::Terminating => "{ready: false, serving: true, terminating: true}",
                };
                let _ =
                    write!(y, "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {conditions}\n");
            }
        }
        y
    }
}

fn quoted<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ")
}

fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
    }
}

fn node_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\n"
    )
}

/// Source ports of requests, below the ephemeral range: [`try_request`] takes a new one each
/// time.
const SOURCE_PORTS: std::ops::Range<u16> = 20_000..32_000;
static NEXT_SOURCE_PORT: AtomicU16 = AtomicU16::new(SOURCE_PORTS.start);

/// One request from a source port no earlier request of the test used. With the kernel's
/// random ephemeral ports a UDP request could reuse the tuple of an earlier one and follow its
/// conntrack entry to an endpoint that has since been removed: true to life, but removing such
/// entries is conntrack cleanup's job (its own suite), not the data plane's.
pub fn try_request(
    ns: &Netns,
    proto: Proto,
    target: SocketAddr,
    timeout: Duration,
) -> ferry_sandbox::Result<Reply> {
    ns.request(proto, Some(fresh_source(target)), target, timeout)
}

/// A local address for a request to `target`: any address of its family, and a source port no
/// earlier request of the test used.
pub fn fresh_source(target: SocketAddr) -> SocketAddr {
    let port = NEXT_SOURCE_PORT
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
            Some(if p + 1 >= SOURCE_PORTS.end { SOURCE_PORTS.start } else { p + 1 })
        })
        .unwrap_or(SOURCE_PORTS.start);
    let any: IpAddr =
        if target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    SocketAddr::new(any, port)
}

/// One request that must be answered. A UDP datagram without an answer within the timeout is
/// sent once more, from a fresh port, as a DNS client would: in the 6.1 VM (TCG emulation) a
/// datagram now and then went unanswered for 2 s while ferry's periodic full sync held a vCPU
/// (`load_balancer_source_ranges_…`, nftables and IPVS alike, one datagram of dozens). A data
/// plane that drops the flow drops the second datagram too, and tests of flows that must keep
/// their source port (conntrack cleanup) do not come through here.
pub fn request(ns: &Netns, proto: Proto, target: SocketAddr) -> Reply {
    let answer = match try_request(ns, proto, target, TIMEOUT) {
        Err(e) if proto == Proto::Udp && e.is_timeout() => {
            eprintln!("udp to {target} from {ns}: {e}; sending again from a fresh port");
            try_request(ns, proto, target, TIMEOUT)
        }
        answer => answer,
    };
    answer.unwrap_or_else(|e| panic!("{proto} to {target} from {ns}: {e}"))
}

/// `n` requests that must all be answered.
pub fn sample(ns: &Netns, proto: Proto, target: SocketAddr, n: usize) -> Vec<Reply> {
    (0..n).map(|_| request(ns, proto, target)).collect()
}

/// How many replies each server gave.
pub fn served_by(replies: &[Reply]) -> BTreeMap<SocketAddr, usize> {
    let mut out = BTreeMap::new();
    for r in replies {
        *out.entry(r.server).or_default() += 1;
    }
    out
}

/// Every reply came from one of `endpoints`, and each of them answered at least once.
pub fn assert_spread(replies: &[Reply], endpoints: &[SocketAddr], what: &str) {
    let seen = served_by(replies);
    let expected: BTreeSet<SocketAddr> = endpoints.iter().copied().collect();
    let got: BTreeSet<SocketAddr> = seen.keys().copied().collect();
    assert_eq!(got, expected, "{what}: expected replies from exactly {expected:?}, got {seen:?}");
}

/// The request is refused at once (TCP reset, ICMP port unreachable): a REJECT.
pub fn assert_refused(ns: &Netns, proto: Proto, target: SocketAddr, what: &str) {
    let started = Instant::now();
    match try_request(ns, proto, target, TIMEOUT) {
        Ok(reply) => panic!("{what}: {proto} to {target} should be refused, but {} answered", reply.server),
        Err(e) => assert!(e.is_refused(), "{what}: {proto} to {target} should be refused, got: {e}"),
    }
    assert!(started.elapsed() < TIMEOUT, "{what}: refused only after {:?}", started.elapsed());
}

/// The request goes unanswered, without any error coming back: a DROP.
pub fn assert_dropped(ns: &Netns, proto: Proto, target: SocketAddr, what: &str) {
    match try_request(ns, proto, target, DROP_TIMEOUT) {
        Ok(reply) => panic!("{what}: {proto} to {target} should be dropped, but {} answered", reply.server),
        Err(e) => assert!(e.is_timeout(), "{what}: {proto} to {target} should time out (dropped), got: {e}"),
    }
}

/// A line-echo TCP server bound inside a namespace: a connection that stays open for as long
/// as the test wants (the responders close after one line). Stops on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        // The socket belongs to the namespace it was created in; serving it needs no setns.
        let listener = ns
            .run(|| TcpListener::bind(addr))
            .and_then(|r| {
                r.map_err(|e| ferry_sandbox::Error::Io { what: format!("binding {addr}"), source: e })
            })
            .unwrap_or_else(|e| panic!("echo server in {ns}: {e}"));
        listener.set_nonblocking(true).expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let stop = Arc::clone(&stop);
                            conns.push(std::thread::spawn(move || echo(stream, &stop)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        Self { addr, stop, thread: Some(thread) }
    }
}

fn echo(stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                if writer.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP connection opened from inside a namespace, then used from the test thread.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    target: SocketAddr,
}

impl Conn {
    pub fn open(ns: &Netns, target: SocketAddr) -> Self {
        let stream = ns
            .run(|| TcpStream::connect_timeout(&target, TIMEOUT))
            .and_then(|r| {
                r.map_err(|e| ferry_sandbox::Error::Io { what: format!("connecting to {target}"), source: e })
            })
            .unwrap_or_else(|e| panic!("from {ns}: {e}"));
        stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        let writer = stream.try_clone().expect("clone the stream");
        Self { reader: BufReader::new(stream), writer, target }
    }

    /// Sends `text` and expects it back.
    pub fn echo(&mut self, text: &str) {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .unwrap_or_else(|e| panic!("sending {text:?} to {}: {e}", self.target));
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading {text:?} back from {}: {e}", self.target));
        assert_eq!(line.trim_end(), text, "echo from {} over the kept connection", self.target);
    }
}
