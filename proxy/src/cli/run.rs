//! `ferry run`: resolves the flags and `--config` into the daemon's settings, then runs it
//! (`crate::daemon`). Flags override the file; the file overrides the defaults.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use tracing::{info, warn};

use super::NodeFlags;
use crate::admin::{DEFAULT_ADMIN_ADDRESS, parse_admin_address};
use crate::backend::{BackendKind, BackendOptions, ebpf, ipvs};
use crate::config::{self, HEALTHZ_PORT, KubeProxyConfig, METRICS_PORT, parse_bind_address};
use crate::daemon::{self, DEFAULT_BURST, Settings, Source};
use crate::model::parse_cidr_sloppy;

/// kube-proxy's defaults.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Data plane [default: --config's mode, else nftables].
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Read objects from this directory instead of the Kubernetes API.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig to reach the API server; without it and without --manifests, --config's
    /// clientConnection.kubeconfig, else the in-cluster configuration (or $KUBECONFIG).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// kube-proxy's configuration file (KubeProxyConfiguration, kubeproxy.config.k8s.io/v1alpha1);
    /// flags override it. Re-read on SIGHUP and when its content changes.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Full resync interval: rewrites the whole state, repairing drift [default: 30s].
    #[arg(long, value_name = "DUR", value_parser = humantime_duration)]
    pub sync_period: Option<Duration>,
    /// Minimum time between two syncs (after a burst); changes arriving faster are merged
    /// [default: 1s].
    #[arg(long, value_name = "DUR", value_parser = humantime_duration)]
    pub min_sync_period: Option<Duration>,
    /// Syncs that may run back to back before --min-sync-period applies.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BURST)]
    pub sync_burst: u32,
    /// /healthz and /livez server, IP:PORT (or IP); "" disables it [default: 0.0.0.0:10256].
    #[arg(long, value_name = "ADDR")]
    pub healthz_bind_address: Option<String>,
    /// Prometheus /metrics server, IP:PORT (or IP); "" disables it [default: 127.0.0.1:10249].
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind_address: Option<String>,
    /// Admin endpoint `ferry status` reads: IP:PORT or unix:/PATH; "" disables it.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN_ADDRESS)]
    pub admin_address: String,
    /// Exit when a server cannot bind its address, instead of retrying every 5s.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub bind_address_hard_fail: Option<bool>,
    /// eBPF: interfaces for the TC programs [default: every interface but lo, rescanned at
    /// every sync].
    #[arg(long, value_name = "IF", value_delimiter = ',')]
    pub interfaces: Vec<String>,
    /// eBPF: the kernel hook of the TC programs: tcx (kernel 6.6+), netlink (cls_bpf on a
    /// clsact qdisc, any kernel) or auto (tcx where the kernel has it).
    #[arg(long, value_enum, value_name = "HOOK", default_value = "auto")]
    pub tc_attach: ebpf::TcAttach,
    /// eBPF: send translated packets of connections that need no masquerade straight to their
    /// next hop (route lookup and redirect in the TC program), and translate their replies on
    /// ingress. They skip netfilter: faster, but the node's firewall rules (a CNI's network
    /// policy in FORWARD, for one) no longer see them. Off by default.
    #[arg(long)]
    pub bypass_netfilter: bool,
    /// eBPF: the bpffs ferry pins its maps and links under, mounted when nothing is there
    /// [default: /sys/fs/bpf].
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// eBPF: cgroup v2 directory for the socket programs (node processes reaching Services)
    /// [default: the root of the cgroup v2 hierarchy].
    #[arg(long, value_name = "DIR")]
    pub cgroup_path: Option<PathBuf>,
    #[command(flatten)]
    pub ipvs: Box<IpvsFlags>,
}

/// The IPVS backend's flags. Boxed: inline they would make `ferry run`'s arguments a variant
/// of `cli::Command` over 200 bytes larger than the next one (clippy's large_enum_variant).
#[derive(Debug, Clone, Args)]
pub struct IpvsFlags {
    /// IPVS: the scheduler of every virtual service (rr, wrr, lc, wlc, sh, mh, ...)
    /// [default: --config's ipvs.scheduler, else rr].
    #[arg(long = "ipvs-scheduler", value_name = "NAME")]
    pub scheduler: Option<String>,
    /// IPVS: idle timeout of established TCP connections, whole seconds; 0 keeps the kernel's
    /// (15m) [default: --config's ipvs.tcpTimeout, else 0].
    #[arg(long = "ipvs-tcp-timeout", value_name = "DUR", value_parser = humantime_duration)]
    pub tcp_timeout: Option<Duration>,
    /// IPVS: timeout of TCP connections after a FIN, whole seconds; 0 keeps the kernel's (2m)
    /// [default: --config's ipvs.tcpFinTimeout, else 0].
    #[arg(long = "ipvs-tcpfin-timeout", value_name = "DUR", value_parser = humantime_duration)]
    pub tcp_fin_timeout: Option<Duration>,
    /// IPVS: idle timeout of UDP flows, whole seconds; 0 keeps the kernel's (5m) [default:
    /// --config's ipvs.udpTimeout, else 0].
    #[arg(long = "ipvs-udp-timeout", value_name = "DUR", value_parser = humantime_duration)]
    pub udp_timeout: Option<Duration>,
    /// IPVS: CIDRs whose virtual services ferry never deletes when it removes stale ones
    /// (services of other programs on the node's addresses); comma-separated or repeated
    /// [default: --config's ipvs.excludeCIDRs].
    #[arg(long = "ipvs-exclude-cidrs", value_name = "CIDR", value_delimiter = ',')]
    pub exclude_cidrs: Vec<String>,
}

/// Parses `500ms`, `2s`, `1m30s`, `1h`; a bare number is seconds.
pub fn humantime_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let resolved = settings(&args)?;
    let reload: Option<daemon::Reload> = args.config.is_some().then(|| {
        let args = args.clone();
        Box::new(move || settings(&args)) as daemon::Reload
    });
    daemon::run(resolved, reload).await
}

/// Reads `--config` (if any) and resolves every setting.
pub fn settings(args: &RunArgs) -> anyhow::Result<Settings> {
    let file = match &args.config {
        Some(path) => {
            let c = config::load(path).with_context(|| format!("--config {}", path.display()))?;
            for field in &c.unknown_fields {
                warn!(file = %path.display(), "unknown field {field} (not in KubeProxyConfiguration v1alpha1); ignored");
            }
            for note in &c.not_applied {
                info!(file = %path.display(), "not applied: {note}");
            }
            c
        }
        None => KubeProxyConfig::default(),
    };
    resolve(args, &file, std::env::var("NODE_NAME").ok())
}

/// Flags over the file over the defaults. `env_node_name` is `$NODE_NAME`.
pub fn resolve(
    args: &RunArgs,
    file: &KubeProxyConfig,
    env_node_name: Option<String>,
) -> anyhow::Result<Settings> {
    let node_name = args
        .node
        .node_name
        .clone()
        .or_else(|| file.hostname_override.clone())
        .or(env_node_name.filter(|n| !n.is_empty()))
        .or_else(hostname)
        .context("no node name: pass --node-name (or hostnameOverride, $NODE_NAME)")?;
    let mut node = args.node.to_config(Some(&node_name))?;
    if node.node_ips.is_empty()
        && let Some(ip) = file.bind_address
    {
        node.node_ips.push(ip);
    }
    if args.node.cluster_cidrs.is_empty() {
        node.cluster_cidrs = file.cluster_cidrs.clone();
    }
    if args.node.nodeport_addresses.is_empty() {
        node.nodeport_addresses =
            config::resolve_node_port_addresses(&file.node_port_addresses, &node.node_ips);
    }
    if args.node.masquerade_all.is_none() {
        node.masquerade_all = file.masquerade_all;
    }
    if node.node_ips.is_empty() {
        warn!("no --node-ip: NodePorts answer on no address of this node");
    }

    let sync_period = args.sync_period.or(file.sync_period).unwrap_or(DEFAULT_SYNC_PERIOD);
    let min_sync_period = args.min_sync_period.or(file.min_sync_period).unwrap_or(DEFAULT_MIN_SYNC_PERIOD);
    if sync_period.is_zero() {
        bail!("--sync-period must be greater than 0");
    }
    if min_sync_period > sync_period {
        bail!(
            "--min-sync-period ({}) must not exceed --sync-period ({})",
            config::format_duration(min_sync_period),
            config::format_duration(sync_period)
        );
    }
    let bind =
        |flag: &Option<String>, name: &str, port: u16, from_file: Option<std::net::SocketAddr>, default| {
            match flag.as_deref() {
                Some("") => Ok(None),
                Some(s) => parse_bind_address(s, port)
                    .map(Some)
                    .with_context(|| format!("--{name} {s:?} is not IP:PORT or IP")),
                None => Ok(Some(from_file.unwrap_or(default))),
            }
        };
    let healthz_bind_address = bind(
        &args.healthz_bind_address,
        "healthz-bind-address",
        HEALTHZ_PORT,
        file.healthz_bind_address,
        file.default_healthz_address(),
    )?;
    let metrics_bind_address = bind(
        &args.metrics_bind_address,
        "metrics-bind-address",
        METRICS_PORT,
        file.metrics_bind_address,
        file.default_metrics_address(),
    )?;
    let admin_address =
        parse_admin_address(&args.admin_address).map_err(|e| anyhow::anyhow!("--admin-address: {e}"))?;
    let source = match &args.manifests {
        Some(dir) => Source::Manifests(dir.clone()),
        None => Source::Kube(args.kubeconfig.clone().or_else(|| file.kubeconfig.clone())),
    };
    let backend = args.backend.or(file.mode).unwrap_or(BackendKind::Nftables);
    let cgroup_path = match (&args.cgroup_path, backend) {
        (Some(p), _) => Some(p.clone()),
        (None, BackendKind::Ebpf) => ebpf::default_cgroup_path(),
        (None, _) => None,
    };
    // Each timeout flag overrides its own field of the file (0 included: "the kernel's").
    let ipvs_timeout = |flag: Option<Duration>, name: &str, from_file: Option<Duration>, field: &str| {
        let (d, source) = match flag {
            Some(d) => (d, format!("--{name}")),
            None => (from_file.unwrap_or_default(), format!("ipvs.{field}")),
        };
        ipvs::timeout_secs(d).map_err(|e| anyhow!("{source} {}: {e}", config::format_duration(d)))
    };
    let ipvs_timeouts = ipvs::Timeouts {
        tcp: ipvs_timeout(args.ipvs.tcp_timeout, "ipvs-tcp-timeout", file.ipvs_tcp_timeout, "tcpTimeout")?,
        tcp_fin: ipvs_timeout(
            args.ipvs.tcp_fin_timeout,
            "ipvs-tcpfin-timeout",
            file.ipvs_tcp_fin_timeout,
            "tcpFinTimeout",
        )?,
        udp: ipvs_timeout(args.ipvs.udp_timeout, "ipvs-udp-timeout", file.ipvs_udp_timeout, "udpTimeout")?,
    };
    let ipvs_exclude_cidrs = if args.ipvs.exclude_cidrs.is_empty() {
        file.ipvs_exclude_cidrs.clone()
    } else {
        args.ipvs
            .exclude_cidrs
            .iter()
            .map(|c| {
                parse_cidr_sloppy(c).with_context(|| format!("--ipvs-exclude-cidrs {c:?} is not a CIDR"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let backend_options = BackendOptions {
        bpffs: args.bpffs.clone(),
        cgroup_path,
        interfaces: args.interfaces.clone(),
        tc_attach: args.tc_attach,
        bypass_netfilter: args.bypass_netfilter,
        ipvs_scheduler: args.ipvs.scheduler.clone().or_else(|| file.ipvs_scheduler.clone()),
        ipvs_timeouts,
        ipvs_exclude_cidrs,
        ..BackendOptions::default()
    };
    Ok(Settings {
        backend,
        backend_options,
        source,
        node,
        sync_period,
        min_sync_period,
        sync_burst: args.sync_burst.max(1),
        healthz_bind_address,
        metrics_bind_address,
        admin_address,
        bind_address_hard_fail: args.bind_address_hard_fail.unwrap_or(file.bind_address_hard_fail),
        config_file: args.config.clone(),
    })
}

/// The host's name, as kube-proxy defaults the node name (lower-cased).
fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim().to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::httpd::ListenAddr;

    fn args(flags: &[&str]) -> RunArgs {
        let mut argv = vec!["ferry", "run"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn file(text: &str) -> KubeProxyConfig {
        config::parse(&format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{text}"
        ))
        .unwrap()
    }

    #[test]
    fn defaults_are_kube_proxys() {
        let s = resolve(&args(&["--node-name", "n1"]), &KubeProxyConfig::default(), None).unwrap();
        assert_eq!(s.backend, BackendKind::Nftables);
        assert_eq!(
            (s.sync_period, s.min_sync_period, s.sync_burst),
            (DEFAULT_SYNC_PERIOD, DEFAULT_MIN_SYNC_PERIOD, 2)
        );
        assert_eq!(s.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(s.metrics_bind_address, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!(s.admin_address, Some(ListenAddr::Tcp("127.0.0.1:10247".parse().unwrap())));
        assert_eq!(s.source, Source::Kube(None));
        assert!(!s.bind_address_hard_fail);
    }

    #[test]
    fn the_file_fills_what_flags_leave_out_and_flags_win() {
        let f = file(
            "mode: ipvs\nhostnameOverride: from-file\nclusterCIDR: 10.244.0.0/16\nmasqueradeAll: false\n\
             iptables: {masqueradeAll: true}\nipvs: {syncPeriod: 1m, minSyncPeriod: 5s}\n\
             nodePortAddresses: [primary]\nbindAddress: 192.168.1.10\nmetricsBindAddress: 0.0.0.0:9100\n\
             clientConnection: {kubeconfig: /etc/kp.conf}\n",
        );
        let s = resolve(&args(&[]), &f, Some("from-env".into())).unwrap();
        assert_eq!(s.backend, BackendKind::Ipvs);
        assert_eq!(s.node.node_name, "from-file");
        assert_eq!(s.node.node_ips, vec!["192.168.1.10".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(s.node.cluster_cidrs, vec!["10.244.0.0/16".parse::<ipnet::IpNet>().unwrap()]);
        assert_eq!(s.node.nodeport_addresses, vec!["192.168.1.10/32".parse::<ipnet::IpNet>().unwrap()]);
        assert!(s.node.masquerade_all);
        assert_eq!((s.sync_period, s.min_sync_period), (Duration::from_secs(60), Duration::from_secs(5)));
        assert_eq!(s.metrics_bind_address, Some("0.0.0.0:9100".parse().unwrap()));
        assert_eq!(s.source, Source::Kube(Some("/etc/kp.conf".into())));

        let s = resolve(
            &args(&[
                "--backend=nftables",
                "--node-name=flag",
                "--node-ip=10.0.0.1",
                "--cluster-cidr=10.1.0.0/16,fd00:1::/64",
                "--masquerade-all=false",
                "--sync-period=10s",
                "--min-sync-period=100ms",
                "--metrics-bind-address=",
                "--healthz-bind-address=127.0.0.1",
                "--nodeport-addresses=10.0.0.0/8",
                "--kubeconfig=/k",
            ]),
            &f,
            None,
        )
        .unwrap();
        assert_eq!(s.backend, BackendKind::Nftables);
        assert_eq!(s.node.node_name, "flag");
        assert_eq!(s.node.cluster_cidrs.len(), 2, "comma-separated like kube-proxy's --cluster-cidr");
        assert!(!s.node.masquerade_all);
        assert_eq!((s.sync_period, s.min_sync_period), (Duration::from_secs(10), Duration::from_millis(100)));
        assert_eq!(s.metrics_bind_address, None, "\"\" disables");
        assert_eq!(s.healthz_bind_address, Some("127.0.0.1:10256".parse().unwrap()));
        assert_eq!(s.node.nodeport_addresses, vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]);
        assert_eq!(s.source, Source::Kube(Some("/k".into())));
    }

    #[test]
    fn ebpf_flags_reach_the_backend_options() {
        let s = resolve(
            &args(&[
                "--node-name=n",
                "--backend=ebpf",
                "--interfaces=eth0,eth1",
                "--bpffs=/run/t/bpf",
                "--cgroup-path=/sys/fs/cgroup/t",
            ]),
            &KubeProxyConfig::default(),
            None,
        )
        .unwrap();
        let o = &s.backend_options;
        assert_eq!(o.interfaces, ["eth0", "eth1"]);
        assert_eq!(o.bpffs.as_deref(), Some(std::path::Path::new("/run/t/bpf")));
        assert_eq!(o.cgroup_path.as_deref(), Some(std::path::Path::new("/sys/fs/cgroup/t")));
        let s = resolve(&args(&["--node-name=n"]), &KubeProxyConfig::default(), None).unwrap();
        assert_eq!(s.backend_options.cgroup_path, None, "nftables attaches no socket programs");
    }

    #[test]
    fn the_ipvs_scheduler_comes_from_the_flag_over_the_config_file() {
        let f = file("mode: ipvs\nipvs:\n  scheduler: lc\n");
        let s = resolve(&args(&["--node-name=n"]), &f, None).unwrap();
        assert_eq!(s.backend, BackendKind::Ipvs);
        assert_eq!(s.backend_options.ipvs_scheduler.as_deref(), Some("lc"));
        let s = resolve(&args(&["--node-name=n", "--ipvs-scheduler=mh"]), &f, None).unwrap();
        assert_eq!(s.backend_options.ipvs_scheduler.as_deref(), Some("mh"));
    }

    #[test]
    fn ipvs_timeouts_and_exclude_cidrs_come_from_the_flags_over_the_config_file() {
        let f = file(
            "mode: ipvs\nipvs:\n  tcpTimeout: 1h\n  tcpFinTimeout: 30s\n  udpTimeout: 2m\n  \
             excludeCIDRs: [192.168.0.0/24]\n",
        );
        let s = resolve(&args(&["--node-name=n"]), &f, None).unwrap();
        let o = &s.backend_options;
        assert_eq!(o.ipvs_timeouts, ipvs::Timeouts { tcp: 3600, tcp_fin: 30, udp: 120 });
        assert_eq!(o.ipvs_exclude_cidrs, vec!["192.168.0.0/24".parse::<ipnet::IpNet>().unwrap()]);

        // One flag overrides its own field only; 0 is a value ("the kernel's"), not "unset".
        let s = resolve(
            &args(&[
                "--node-name=n",
                "--ipvs-tcp-timeout=15m",
                "--ipvs-udp-timeout=0",
                "--ipvs-exclude-cidrs=10.1.0.0/16,fd00:1::/64",
            ]),
            &f,
            None,
        )
        .unwrap();
        let o = &s.backend_options;
        assert_eq!(o.ipvs_timeouts, ipvs::Timeouts { tcp: 900, tcp_fin: 30, udp: 0 });
        assert_eq!(
            o.ipvs_exclude_cidrs,
            vec!["10.1.0.0/16".parse::<ipnet::IpNet>().unwrap(), "fd00:1::/64".parse().unwrap()]
        );

        let none = resolve(&args(&["--node-name=n"]), &KubeProxyConfig::default(), None).unwrap();
        assert_eq!(none.backend_options.ipvs_timeouts, ipvs::Timeouts::default(), "nothing set");
        assert!(none.backend_options.ipvs_exclude_cidrs.is_empty());
    }

    #[test]
    fn invalid_ipvs_flags_are_errors_naming_them() {
        let err = |flags: &[&str]| {
            let mut all = vec!["--node-name=n"];
            all.extend_from_slice(flags);
            resolve(&args(&all), &KubeProxyConfig::default(), None).unwrap_err().to_string()
        };
        assert_eq!(
            err(&["--ipvs-tcpfin-timeout=1500ms"]),
            "--ipvs-tcpfin-timeout 1.5s: IPVS timeouts are whole seconds"
        );
        assert_eq!(
            err(&["--ipvs-udp-timeout=1000h"]),
            "--ipvs-udp-timeout 1000h: longer than IPVS accepts (at most 2147483s, about 24 days)"
        );
        assert_eq!(
            err(&["--ipvs-exclude-cidrs=10.0.0.0/8,nowhere"]),
            "--ipvs-exclude-cidrs \"nowhere\" is not a CIDR"
        );
        let e = Cli::try_parse_from(["ferry", "run", "--ipvs-tcp-timeout=-1s"]).unwrap_err().to_string();
        assert!(e.contains("--ipvs-tcp-timeout") && e.contains("must not be negative"), "{e}");
    }

    #[test]
    fn node_name_falls_back_to_node_name_env() {
        let s = resolve(&args(&[]), &KubeProxyConfig::default(), Some("env-node".into())).unwrap();
        assert_eq!(s.node.node_name, "env-node");
    }

    #[test]
    fn invalid_flags_are_errors_naming_them() {
        let e = resolve(
            &args(&["--node-name=n", "--healthz-bind-address=nowhere"]),
            &KubeProxyConfig::default(),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--healthz-bind-address \"nowhere\""), "{e}");
        let e = resolve(
            &args(&["--node-name=n", "--sync-period=1s", "--min-sync-period=2s"]),
            &KubeProxyConfig::default(),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--min-sync-period (2s) must not exceed --sync-period (1s)"), "{e}");
        assert!(Cli::try_parse_from(["ferry", "run", "--sync-period", "soon"]).is_err());
    }
}
