//! `--config FILE`: kube-proxy's `KubeProxyConfiguration` (`kubeproxy.config.k8s.io/v1alpha1`,
//! YAML), so the `config.conf` of an existing kube-proxy ConfigMap configures ferry unchanged.
//!
//! What ferry uses: `mode` (the backend; `iptables` is refused), `clusterCIDR` with
//! `detectLocalMode: ClusterCIDR`, `nodePortAddresses` (CIDRs and the `primary`, `localhost`,
//! `all` keywords), `masqueradeAll`, `syncPeriod` / `minSyncPeriod` of the mode's section,
//! `healthzBindAddress`, `metricsBindAddress`, `bindAddressHardFail`, `bindAddress` (the node's
//! primary IP when no `--node-ip` is given), `hostnameOverride` (the node name),
//! `clientConnection.kubeconfig`, and for the IPVS backend `ipvs.scheduler`, the IPVS
//! connection timeouts and `ipvs.excludeCIDRs`. Zero values (`""`, `0s`, `null`) mean "the default", as
//! kube-proxy's defaulting has it.
//!
//! Everything else kube-proxy knows is accepted; a value ferry does not apply (conntrack
//! sysctls, profiling, OOM score…) is listed in [`KubeProxyConfig::not_applied`] for the log. A
//! field kube-proxy does not know either is a warning that names it; a value that is wrong is an
//! error naming the field and the value.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;
use serde_yaml_ng::{Mapping, Value};

use crate::backend::BackendKind;
use crate::model::{IpFamily, parse_cidr_sloppy, parse_ip_sloppy};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";
/// kube-proxy's default ports.
pub const HEALTHZ_PORT: u16 = 10256;
pub const METRICS_PORT: u16 = 10249;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("not a YAML document: {0}")]
    Yaml(String),
    #[error("{field}: {value}: {reason}")]
    Invalid { field: String, value: String, reason: String },
}

fn invalid(field: &str, value: &Value, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.to_owned(), value: show(value), reason: reason.into() }
}

fn missing(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.to_owned(), value: "(missing)".into(), reason: reason.into() }
}

/// Whether a value differs from kube-proxy's zero value (`""`, `0`, `0s`, `false`, `null`,
/// empty, or a mapping of those): only such values are worth a "not applied" line.
fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::String(s) => !s.is_empty() && parse_duration(s).map(|d| !d.is_zero()).unwrap_or(true),
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Sequence(s) => s.iter().any(is_set),
        Value::Mapping(m) => m.values().any(is_set),
        Value::Tagged(t) => is_set(&t.value),
    }
}

/// A value as it appears in the file: strings quoted, the rest as YAML.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => serde_yaml_ng::to_string(other).map(|s| s.trim_end().to_owned()).unwrap_or_default(),
    }
}

/// One entry of `nodePortAddresses` / `--nodeport-addresses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodePortAddress {
    Cidr(IpNet),
    /// The node's primary address of each family (ferry: the first `--node-ip` of each).
    Primary,
    /// 127.0.0.0/8 and ::1/128.
    Localhost,
    /// 0.0.0.0/0 and ::/0.
    All,
}

impl NodePortAddress {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "primary" => Some(Self::Primary),
            "localhost" => Some(Self::Localhost),
            "all" => Some(Self::All),
            cidr => parse_cidr_sloppy(cidr).map(Self::Cidr),
        }
    }
}

/// Resolves `nodePortAddresses` to the CIDRs the plan filters node addresses with (empty: every
/// address). `primary` needs the node's addresses.
pub fn resolve_node_port_addresses(items: &[NodePortAddress], node_ips: &[IpAddr]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for item in items {
        match item {
            NodePortAddress::Cidr(n) => out.push(*n),
            NodePortAddress::All => {
                out.extend(["0.0.0.0/0", "::/0"].iter().filter_map(|s| s.parse::<IpNet>().ok()));
            }
            NodePortAddress::Localhost => {
                out.extend(["127.0.0.0/8", "::1/128"].iter().filter_map(|s| s.parse::<IpNet>().ok()));
            }
            NodePortAddress::Primary => {
                for family in IpFamily::ALL {
                    if let Some(ip) = node_ips.iter().find(|ip| IpFamily::of(ip) == family) {
                        out.push(IpNet::from(*ip));
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What ferry takes from a KubeProxyConfiguration. `None` / empty: not set (defaults apply).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KubeProxyConfig {
    pub mode: Option<BackendKind>,
    pub hostname_override: Option<String>,
    /// A specific `bindAddress`: kube-proxy's "node primary IP" override.
    pub bind_address: Option<IpAddr>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub bind_address_hard_fail: bool,
    pub cluster_cidrs: Vec<IpNet>,
    pub node_port_addresses: Vec<NodePortAddress>,
    pub masquerade_all: bool,
    /// `ipvs.scheduler`: the IPVS backend's scheduler.
    pub ipvs_scheduler: Option<String>,
    /// `ipvs.tcpTimeout`, `ipvs.tcpFinTimeout`, `ipvs.udpTimeout`: IPVS connection timeouts,
    /// whole seconds within what IPVS accepts; None: the kernel's.
    pub ipvs_tcp_timeout: Option<Duration>,
    pub ipvs_tcp_fin_timeout: Option<Duration>,
    pub ipvs_udp_timeout: Option<Duration>,
    /// `ipvs.excludeCIDRs`: stale IPVS services on these addresses are never deleted.
    pub ipvs_exclude_cidrs: Vec<IpNet>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub kubeconfig: Option<PathBuf>,
    /// Settings given a value that ferry accepts but does not apply, each with the reason.
    pub not_applied: Vec<String>,
    /// Fields that KubeProxyConfiguration v1alpha1 does not have (ignored).
    pub unknown_fields: Vec<String>,
}

impl KubeProxyConfig {
    /// The default healthz address for this configuration: `[::]` when `bindAddress` is IPv6.
    pub fn default_healthz_address(&self) -> SocketAddr {
        match self.bind_address {
            Some(IpAddr::V6(_)) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, HEALTHZ_PORT)),
            _ => SocketAddr::from((Ipv4Addr::UNSPECIFIED, HEALTHZ_PORT)),
        }
    }

    /// The default metrics address: loopback of `bindAddress`'s family.
    pub fn default_metrics_address(&self) -> SocketAddr {
        match self.bind_address {
            Some(IpAddr::V6(_)) => SocketAddr::from((Ipv6Addr::LOCALHOST, METRICS_PORT)),
            _ => SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT)),
        }
    }
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> Result<KubeProxyConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text)
}

/// Parses the text of a KubeProxyConfiguration.
pub fn parse(text: &str) -> Result<KubeProxyConfig, ConfigError> {
    let root: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
    let root = match root {
        Value::Mapping(m) => m,
        other => return Err(invalid("(document)", &other, "expected a KubeProxyConfiguration mapping")),
    };
    let mut p = Parser { cfg: KubeProxyConfig::default() };
    p.top(&root)?;
    Ok(p.cfg)
}

/// A mapping at `path` (`""` for the document).
struct Section<'a> {
    path: &'a str,
    map: &'a Mapping,
}

impl<'a> Section<'a> {
    fn field(&self, name: &str) -> String {
        if self.path.is_empty() { name.to_owned() } else { format!("{}.{name}", self.path) }
    }

    /// The field's value; `null` counts as absent.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// Names every key not in `known`.
    fn unknown(&self, known: &[&str], out: &mut Vec<String>) {
        for key in self.map.keys() {
            let name = key.as_str().map(str::to_owned).unwrap_or_else(|| show(key));
            if !known.contains(&name.as_str()) {
                out.push(self.field(&name));
            }
        }
    }

    /// The top-level section `name`, whose fields are named `name.field` (every section ferry
    /// reads sits at the top level).
    fn section(&self, name: &'a str) -> Result<Option<Section<'a>>, ConfigError> {
        debug_assert!(self.path.is_empty(), "sections are read at the top level only");
        match self.get(name) {
            None => Ok(None),
            Some(Value::Mapping(m)) => Ok(Some(Section { path: name, map: m })),
            Some(v) => Err(invalid(&self.field(name), v, "expected a mapping")),
        }
    }

    /// A string; `""` counts as absent.
    fn str(&self, name: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(invalid(&self.field(name), v, "expected a string")),
        }
    }

    fn bool(&self, name: &str) -> Result<bool, ConfigError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(invalid(&self.field(name), v, "expected true or false")),
        }
    }

    /// An integer; `None` when absent.
    fn int(&self, name: &str) -> Result<Option<i64>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
            Some(v) => Err(invalid(&self.field(name), v, "expected an integer")),
        }
    }

    /// A number (QPS is a float).
    fn number(&self, name: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(invalid(&self.field(name), v, "expected a number")),
        }
    }

    /// A Go duration (`30s`, `1m0s`, `500ms`); zero counts as absent.
    fn duration(&self, name: &str) -> Result<Option<Duration>, ConfigError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        let Value::String(s) = v else {
            return Err(invalid(&self.field(name), v, "expected a duration like \"30s\" or \"1m0s\""));
        };
        match parse_duration(s) {
            Ok(d) if d.is_zero() => Ok(None),
            Ok(d) => Ok(Some(d)),
            Err(reason) => Err(invalid(&self.field(name), v, reason)),
        }
    }

    fn str_list(&self, name: &str) -> Result<Vec<&'a str>, ConfigError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Sequence(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.as_str()),
                    other => Err(invalid(&format!("{}[{i}]", self.field(name)), other, "expected a string")),
                })
                .collect(),
            Some(v) => Err(invalid(&self.field(name), v, "expected a list of strings")),
        }
    }

    fn is_set(&self, name: &str) -> bool {
        self.get(name).is_some_and(is_set)
    }
}

struct Parser {
    cfg: KubeProxyConfig,
}

const TOP_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "featureGates",
    "clientConnection",
    "logging",
    "hostnameOverride",
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "serviceProxyName",
    "mode",
    "iptables",
    "ipvs",
    "nftables",
    "winkernel",
    "detectLocalMode",
    "detectLocal",
    "clusterCIDR",
    "nodePortAddresses",
    "oomScoreAdj",
    "conntrack",
    "configSyncPeriod",
    "portRange",
    "windowsRunAsService",
];

impl Parser {
    fn not_applied(&mut self, s: &Section<'_>, name: &str, why: &str) {
        if s.is_set(name) {
            let value = s.get(name).map(show).unwrap_or_default();
            self.cfg.not_applied.push(format!("{}={value}: {why}", s.field(name)));
        }
    }

    fn top(&mut self, map: &Mapping) -> Result<(), ConfigError> {
        let top = Section { path: "", map };
        match top.get("apiVersion") {
            Some(Value::String(s)) if s == API_VERSION => {}
            Some(v) => return Err(invalid("apiVersion", v, format!("ferry reads {API_VERSION}"))),
            None => return Err(missing("apiVersion", format!("expected {API_VERSION}"))),
        }
        match top.get("kind") {
            Some(Value::String(s)) if s == KIND => {}
            Some(v) => return Err(invalid("kind", v, format!("expected {KIND}"))),
            None => return Err(missing("kind", format!("expected {KIND}"))),
        }
        top.unknown(TOP_FIELDS, &mut self.cfg.unknown_fields);

        let mode_value = top.str("mode")?;
        self.cfg.mode = match mode_value {
            None => None,
            Some("nftables") => Some(BackendKind::Nftables),
            Some("ipvs") => Some(BackendKind::Ipvs),
            // Not a kube-proxy mode: ferry's own data plane.
            Some("ebpf") => Some(BackendKind::Ebpf),
            Some("iptables") => {
                return Err(invalid(
                    "mode",
                    &Value::from("iptables"),
                    "ferry does not implement the iptables mode; use \"nftables\" (ferry's default, \
                     the same semantics) or \"ipvs\"",
                ));
            }
            Some("kernelspace") => {
                return Err(invalid(
                    "mode",
                    &Value::from("kernelspace"),
                    "the Windows mode; ferry runs on Linux",
                ));
            }
            Some(other) => {
                return Err(invalid("mode", &Value::from(other), "expected \"\", nftables, ipvs or ebpf"));
            }
        };

        self.cfg.hostname_override = top.str("hostnameOverride")?.map(str::to_owned);
        if let Some(s) = top.str("bindAddress")? {
            let ip = parse_ip_sloppy(s)
                .ok_or_else(|| invalid("bindAddress", &Value::from(s), "not an IP address"))?;
            if !ip.is_unspecified() {
                self.cfg.bind_address = Some(ip);
            }
        }
        self.cfg.healthz_bind_address = top
            .str("healthzBindAddress")?
            .map(|s| {
                parse_bind_address(s, HEALTHZ_PORT)
                    .ok_or_else(|| invalid("healthzBindAddress", &Value::from(s), "expected IP:PORT or IP"))
            })
            .transpose()?;
        self.cfg.metrics_bind_address = top
            .str("metricsBindAddress")?
            .map(|s| {
                parse_bind_address(s, METRICS_PORT)
                    .ok_or_else(|| invalid("metricsBindAddress", &Value::from(s), "expected IP:PORT or IP"))
            })
            .transpose()?;
        self.cfg.bind_address_hard_fail = top.bool("bindAddressHardFail")?;

        if let Some(s) = top.str("serviceProxyName")? {
            return Err(invalid(
                "serviceProxyName",
                &Value::from(s),
                "ferry handles the services without a service.kubernetes.io/service-proxy-name label \
                 (kube-proxy's default); it cannot be one of several named proxies",
            ));
        }

        self.detect_local(&top)?;
        self.node_port_addresses(&top)?;
        self.periods(&top)?;
        self.conntrack(&top)?;
        self.client_connection(&top)?;

        // Accepted, not applied.
        self.not_applied(&top, "featureGates", "ferry has no feature gates");
        self.not_applied(&top, "enableProfiling", "ferry serves no profiling endpoints");
        self.not_applied(&top, "showHiddenMetricsForVersion", "ferry hides no metrics");
        self.not_applied(&top, "oomScoreAdj", "ferry leaves its OOM score to the pod (system-node-critical)");
        self.not_applied(&top, "configSyncPeriod", "ferry's watches need no periodic relist");
        self.not_applied(&top, "windowsRunAsService", "Windows only");
        top.section("logging")?;
        self.not_applied(&top, "logging", "ferry logs with tracing; set RUST_LOG (e.g. RUST_LOG=debug)");
        top.int("oomScoreAdj")?;
        top.bool("enableProfiling")?;
        // winkernel and portRange are Windows and userspace leftovers: accepted silently.
        Ok(())
    }

    fn detect_local(&mut self, top: &Section<'_>) -> Result<(), ConfigError> {
        match top.str("detectLocalMode")? {
            None | Some("ClusterCIDR") => {}
            Some(other) => {
                return Err(invalid(
                    "detectLocalMode",
                    &Value::from(other),
                    "ferry detects local traffic by clusterCIDR only (detectLocalMode: ClusterCIDR)",
                ));
            }
        }
        if let Some(d) = top.section("detectLocal")? {
            d.unknown(&["bridgeInterface", "interfaceNamePrefix"], &mut self.cfg.unknown_fields);
            d.str("bridgeInterface")?;
            d.str("interfaceNamePrefix")?;
            self.not_applied(&d, "bridgeInterface", "only used by detectLocalMode BridgeInterface");
            self.not_applied(&d, "interfaceNamePrefix", "only used by detectLocalMode InterfaceNamePrefix");
        }
        if let Some(s) = top.str("clusterCIDR")? {
            let mut cidrs: Vec<IpNet> = Vec::new();
            for part in s.split(',').map(str::trim) {
                let reason =
                    || if s.contains(',') { format!("{part:?} is not a CIDR") } else { "not a CIDR".into() };
                let net = parse_cidr_sloppy(part)
                    .ok_or_else(|| invalid("clusterCIDR", &Value::from(s), reason()))?;
                if cidrs.iter().any(|c| IpFamily::of_net(c) == IpFamily::of_net(&net)) {
                    return Err(invalid("clusterCIDR", &Value::from(s), "at most one CIDR per IP family"));
                }
                cidrs.push(net);
            }
            self.cfg.cluster_cidrs = cidrs;
        }
        Ok(())
    }

    fn node_port_addresses(&mut self, top: &Section<'_>) -> Result<(), ConfigError> {
        for (i, s) in top.str_list("nodePortAddresses")?.into_iter().enumerate() {
            let item = NodePortAddress::parse(s).ok_or_else(|| {
                invalid(
                    &format!("nodePortAddresses[{i}]"),
                    &Value::from(s),
                    "expected a CIDR, \"primary\", \"localhost\" or \"all\"",
                )
            })?;
            self.cfg.node_port_addresses.push(item);
        }
        Ok(())
    }

    /// `syncPeriod`, `minSyncPeriod` and `masqueradeAll` live in the mode's section, as
    /// kube-proxy's conversion reads them; mode "" is kube-proxy's iptables default, so its
    /// section is read first, then nftables'.
    fn periods(&mut self, top: &Section<'_>) -> Result<(), ConfigError> {
        let iptables = top.section("iptables")?;
        let ipvs = top.section("ipvs")?;
        let nftables = top.section("nftables")?;
        if let Some(s) = &iptables {
            s.unknown(
                &["masqueradeBit", "masqueradeAll", "localhostNodePorts", "syncPeriod", "minSyncPeriod"],
                &mut self.cfg.unknown_fields,
            );
            s.int("masqueradeBit")?;
            self.not_applied(s, "masqueradeBit", "ferry uses its own packet marks");
            self.not_applied(s, "localhostNodePorts", "NodePorts never answer on localhost with ferry");
        }
        if let Some(s) = &ipvs {
            s.unknown(
                &[
                    "syncPeriod",
                    "minSyncPeriod",
                    "scheduler",
                    "excludeCIDRs",
                    "strictARP",
                    "tcpTimeout",
                    "tcpFinTimeout",
                    "udpTimeout",
                ],
                &mut self.cfg.unknown_fields,
            );
            self.cfg.ipvs_scheduler = s.str("scheduler")?.map(str::to_owned);
            let timeout = |name: &str| -> Result<Option<Duration>, ConfigError> {
                let d = s.duration(name)?;
                if let (Some(d), Some(v)) = (d, s.get(name)) {
                    crate::backend::ipvs::timeout_secs(d)
                        .map_err(|reason| invalid(&s.field(name), v, reason))?;
                }
                Ok(d)
            };
            self.cfg.ipvs_tcp_timeout = timeout("tcpTimeout")?;
            self.cfg.ipvs_tcp_fin_timeout = timeout("tcpFinTimeout")?;
            self.cfg.ipvs_udp_timeout = timeout("udpTimeout")?;
            for (i, c) in s.str_list("excludeCIDRs")?.into_iter().enumerate() {
                let net = parse_cidr_sloppy(c).ok_or_else(|| {
                    invalid(&format!("{}[{i}]", s.field("excludeCIDRs")), &Value::from(c), "not a CIDR")
                })?;
                self.cfg.ipvs_exclude_cidrs.push(net);
            }
            self.not_applied(s, "strictARP", "ferry's IPVS backend always sets arp_ignore=1, arp_announce=2");
        }
        if let Some(s) = &nftables {
            s.unknown(
                &["masqueradeBit", "masqueradeAll", "syncPeriod", "minSyncPeriod", "tableName"],
                &mut self.cfg.unknown_fields,
            );
            s.int("masqueradeBit")?;
            self.not_applied(s, "masqueradeBit", "ferry uses its own packet marks");
            self.not_applied(s, "tableName", "ferry's tables have fixed names");
        }
        // Every section's values are validated, whichever is used.
        let read =
            |s: &Option<Section<'_>>| -> Result<(Option<Duration>, Option<Duration>, bool), ConfigError> {
                match s {
                    None => Ok((None, None, false)),
                    Some(s) => Ok((
                        s.duration("syncPeriod")?,
                        s.duration("minSyncPeriod")?,
                        s.bool("masqueradeAll")?,
                    )),
                }
            };
        let ipt = read(&iptables)?;
        let vs = read(&ipvs)?;
        let nft = read(&nftables)?;
        let (sync, min, masq) = match self.cfg.mode {
            Some(BackendKind::Nftables) => nft,
            // kube-proxy's ipvs mode reads masqueradeAll from the iptables section.
            Some(BackendKind::Ipvs) => (vs.0, vs.1, ipt.2),
            None | Some(BackendKind::Ebpf) => (ipt.0.or(nft.0), ipt.1.or(nft.1), ipt.2 || nft.2),
        };
        self.cfg.sync_period = sync;
        self.cfg.min_sync_period = min;
        self.cfg.masquerade_all = masq;
        Ok(())
    }

    fn conntrack(&mut self, top: &Section<'_>) -> Result<(), ConfigError> {
        let Some(c) = top.section("conntrack")? else { return Ok(()) };
        const FIELDS: &[&str] = &[
            "maxPerCore",
            "min",
            "tcpEstablishedTimeout",
            "tcpCloseWaitTimeout",
            "tcpBeLiberal",
            "udpTimeout",
            "udpStreamTimeout",
        ];
        c.unknown(FIELDS, &mut self.cfg.unknown_fields);
        for name in ["maxPerCore", "min"] {
            if let Some(n) = c.int(name)?
                && n < 0
            {
                return Err(invalid(&c.field(name), &Value::from(n), "must not be negative"));
            }
        }
        for name in ["tcpEstablishedTimeout", "tcpCloseWaitTimeout", "udpTimeout", "udpStreamTimeout"] {
            c.duration(name)?;
        }
        c.bool("tcpBeLiberal")?;
        for name in FIELDS {
            self.not_applied(
                &c,
                name,
                "ferry does not change conntrack sysctls; set net.netfilter.nf_conntrack_* on the node",
            );
        }
        Ok(())
    }

    fn client_connection(&mut self, top: &Section<'_>) -> Result<(), ConfigError> {
        let Some(c) = top.section("clientConnection")? else { return Ok(()) };
        c.unknown(
            &["kubeconfig", "acceptContentTypes", "contentType", "qps", "burst"],
            &mut self.cfg.unknown_fields,
        );
        self.cfg.kubeconfig = c.str("kubeconfig")?.map(PathBuf::from);
        c.str("acceptContentTypes")?;
        c.str("contentType")?;
        c.number("qps")?;
        c.int("burst")?;
        for name in ["acceptContentTypes", "contentType", "qps", "burst"] {
            self.not_applied(&c, name, "ferry's API client uses its own settings (watches, JSON)");
        }
        Ok(())
    }
}

/// `IP:PORT`, or an IP alone (the default port is added, as kube-proxy does).
pub fn parse_bind_address(s: &str, default_port: u16) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    let ip = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(s);
    parse_ip_sloppy(ip).map(|ip| SocketAddr::new(ip, default_port))
}

/// Parses a Go duration (`300ms`, `1.5s`, `1m30s`, `2h`, `0`), the format of the
/// configuration file; a bare integer means seconds (ferry's flags have always taken `30`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || "not a duration like 500ms, 30s, 1m30s".to_owned();
    if s.is_empty() {
        return Err(err());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().map(Duration::from_secs).map_err(|_| err());
    }
    if s.starts_with('-') {
        return Err("a duration must not be negative".into());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num.parse().map_err(|_| err())?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit (ms, s, m, h)".into()),
            other => return Err(format!("unknown unit {other:?} (ns, us, ms, s, m, h)")),
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| err())
}

/// Prints a duration the way [`parse_duration`] reads it back: `30s`, `1.5s`, `100ms`, `2m`.
pub fn format_duration(d: Duration) -> String {
    let (ms, secs) = (d.as_millis(), d.as_secs());
    if !d.subsec_nanos().is_multiple_of(1_000_000) || (!ms.is_multiple_of(1000) && ms >= 1000) {
        format!("{}s", d.as_secs_f64())
    } else if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if secs > 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs > 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `kube-proxy` ConfigMap kubeadm writes (Kubernetes 1.31), `config.conf` key, with a
    /// cluster CIDR and nftables mode set as an operator would.
    pub(crate) const KUBEADM_CONFIG: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 1s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: nftables
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 2s
  syncPeriod: 45s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    fn with(extra: &str) -> String {
        format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{extra}")
    }

    #[test]
    fn kubeadms_config_map_is_read_with_defaults_for_zero_values() {
        let c = parse(KUBEADM_CONFIG).unwrap();
        assert_eq!(c.mode, Some(BackendKind::Nftables));
        assert_eq!(
            c.cluster_cidrs,
            vec!["10.244.0.0/16".parse::<IpNet>().unwrap(), "fd00:10:244::/56".parse().unwrap()]
        );
        assert_eq!(c.sync_period, Some(Duration::from_secs(45)), "nftables mode: the nftables section");
        assert_eq!(c.min_sync_period, Some(Duration::from_secs(2)));
        assert_eq!(c.healthz_bind_address, None, "\"\" means the default");
        assert_eq!(c.metrics_bind_address, None);
        assert_eq!(c.default_healthz_address(), "0.0.0.0:10256".parse().unwrap());
        assert_eq!(c.default_metrics_address(), "127.0.0.1:10249".parse().unwrap());
        assert_eq!(c.bind_address, None, "0.0.0.0 is no node IP");
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")));
        assert!(!c.masquerade_all);
        assert_eq!(c.unknown_fields, Vec::<String>::new());
        assert_eq!(c.not_applied, Vec::<String>::new(), "zero values are not worth a log line");
    }

    #[test]
    fn mode_selects_the_backend_and_iptables_is_refused_by_name() {
        assert_eq!(parse(&with("mode: ipvs\n")).unwrap().mode, Some(BackendKind::Ipvs));
        assert_eq!(parse(&with("mode: \"\"\n")).unwrap().mode, None);
        let e = err(&with("mode: iptables\n"));
        assert!(e.starts_with("mode: \"iptables\": ferry does not implement the iptables mode"), "{e}");
        assert!(err(&with("mode: userspace\n")).starts_with("mode: \"userspace\":"));
    }

    #[test]
    fn default_mode_reads_the_iptables_section_like_kube_proxy() {
        let c =
            parse(&with("iptables:\n  syncPeriod: 1m0s\n  minSyncPeriod: 500ms\n  masqueradeAll: true\n"))
                .unwrap();
        assert_eq!(c.sync_period, Some(Duration::from_secs(60)));
        assert_eq!(c.min_sync_period, Some(Duration::from_millis(500)));
        assert!(c.masquerade_all);
    }

    #[test]
    fn unknown_fields_are_named_with_their_path() {
        let c = parse(&with("frobnicate: 1\nconntrack:\n  maxPerCore: 0\n  turbo: true\n")).unwrap();
        assert_eq!(c.unknown_fields, vec!["frobnicate".to_owned(), "conntrack.turbo".to_owned()]);
    }

    #[test]
    fn invalid_values_name_the_field_and_the_value() {
        assert_eq!(
            err(&with("nftables:\n  syncPeriod: 30 seconds\n")),
            "nftables.syncPeriod: \"30 seconds\": unknown unit \" seconds\" (ns, us, ms, s, m, h)"
        );
        assert_eq!(err(&with("clusterCIDR: 10.0.0.0/33\n")), "clusterCIDR: \"10.0.0.0/33\": not a CIDR");
        assert_eq!(
            err(&with("clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n")),
            "clusterCIDR: \"10.0.0.0/8,10.1.0.0/16\": at most one CIDR per IP family"
        );
        assert_eq!(
            err(&with("iptables: {masqueradeAll: \"yes\"}\n")).split(':').next(),
            Some("iptables.masqueradeAll")
        );
        assert_eq!(
            err(&with("healthzBindAddress: here\n")),
            "healthzBindAddress: \"here\": expected IP:PORT or IP"
        );
        assert_eq!(
            err(&with("nodePortAddresses: [10.0.0.0/8, everywhere]\n")),
            "nodePortAddresses[1]: \"everywhere\": expected a CIDR, \"primary\", \"localhost\" or \"all\""
        );
        assert_eq!(err(&with("detectLocalMode: NodeCIDR\n")).split(':').next(), Some("detectLocalMode"));
        assert_eq!(
            err(&with("conntrack:\n  maxPerCore: -1\n")),
            "conntrack.maxPerCore: -1: must not be negative"
        );
        assert!(err("apiVersion: v1\nkind: ConfigMap\n").starts_with("apiVersion: \"v1\": ferry reads"));
        assert!(err("kind: KubeProxyConfiguration\n").starts_with("apiVersion: "));
    }

    #[test]
    fn settings_ferry_does_not_apply_are_listed() {
        let c = parse(&with(
            "conntrack:\n  maxPerCore: 32768\n  tcpEstablishedTimeout: 24h0m0s\nenableProfiling: true\noomScoreAdj: -999\n",
        ))
        .unwrap();
        let joined = c.not_applied.join("\n");
        for needle in [
            "conntrack.maxPerCore=32768",
            "conntrack.tcpEstablishedTimeout=\"24h0m0s\"",
            "enableProfiling=true",
            "oomScoreAdj=-999",
        ] {
            assert!(joined.contains(needle), "{needle} missing from {joined}");
        }
    }

    #[test]
    fn ipvs_timeouts_and_exclude_cidrs_are_read() {
        let c = parse(&with(
            "mode: ipvs\nipvs:\n  tcpTimeout: 1h0m0s\n  tcpFinTimeout: 30s\n  udpTimeout: 0s\n  \
             excludeCIDRs: [192.168.0.0/24, \"fd00:1::/64\"]\n",
        ))
        .unwrap();
        assert_eq!(c.ipvs_tcp_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.ipvs_tcp_fin_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.ipvs_udp_timeout, None, "0s: the kernel's");
        assert_eq!(
            c.ipvs_exclude_cidrs,
            vec!["192.168.0.0/24".parse::<IpNet>().unwrap(), "fd00:1::/64".parse().unwrap()]
        );
        assert_eq!(c.not_applied, Vec::<String>::new(), "all four are applied now");
        let c = parse(KUBEADM_CONFIG).unwrap();
        assert_eq!((c.ipvs_tcp_timeout, c.ipvs_udp_timeout), (None, None), "kubeadm's 0s");
        assert!(c.ipvs_exclude_cidrs.is_empty(), "kubeadm's null");
    }

    #[test]
    fn invalid_ipvs_timeouts_and_exclude_cidrs_name_the_field_and_the_value() {
        assert_eq!(
            err(&with("ipvs:\n  tcpTimeout: -5m\n")),
            "ipvs.tcpTimeout: \"-5m\": a duration must not be negative"
        );
        assert_eq!(
            err(&with("ipvs:\n  udpTimeout: 100000h\n")),
            "ipvs.udpTimeout: \"100000h\": longer than IPVS accepts (at most 2147483s, about 24 days)"
        );
        assert_eq!(
            err(&with("ipvs:\n  tcpFinTimeout: 1500ms\n")),
            "ipvs.tcpFinTimeout: \"1500ms\": IPVS timeouts are whole seconds"
        );
        assert_eq!(
            err(&with("ipvs:\n  excludeCIDRs: [10.0.0.0/8, 10.1.0.0/33]\n")),
            "ipvs.excludeCIDRs[1]: \"10.1.0.0/33\": not a CIDR"
        );
        assert_eq!(
            err(&with("ipvs:\n  excludeCIDRs: 10.0.0.0/8\n")),
            "ipvs.excludeCIDRs: \"10.0.0.0/8\": expected a list of strings"
        );
    }

    #[test]
    fn bind_addresses_take_a_default_port_and_ipv6() {
        let c = parse(&with(
            "healthzBindAddress: 0.0.0.0\nmetricsBindAddress: \"[::1]:9999\"\nbindAddress: \"fd00::5\"\n",
        ))
        .unwrap();
        assert_eq!(c.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(c.metrics_bind_address, Some("[::1]:9999".parse().unwrap()));
        assert_eq!(c.bind_address, Some("fd00::5".parse().unwrap()));
        assert_eq!(c.default_healthz_address(), "[::]:10256".parse().unwrap());
        assert_eq!(c.default_metrics_address(), "[::1]:10249".parse().unwrap());
    }

    #[test]
    fn node_port_address_keywords_resolve_against_the_node() {
        let c = parse(&with("nodePortAddresses: [primary, 192.168.0.0/16, localhost]\n")).unwrap();
        let ips: Vec<IpAddr> =
            vec!["10.0.0.5".parse().unwrap(), "10.0.0.6".parse().unwrap(), "fd00::5".parse().unwrap()];
        let nets: Vec<String> = resolve_node_port_addresses(&c.node_port_addresses, &ips)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.5/32", "127.0.0.0/8", "192.168.0.0/16", "::1/128", "fd00::5/128"]);
        let all: Vec<String> = resolve_node_port_addresses(&[NodePortAddress::All], &ips)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(all, ["0.0.0.0/0", "::/0"]);
    }

    #[test]
    fn go_durations_parse_and_print() {
        for (s, d) in [
            ("30s", Duration::from_secs(30)),
            ("1m0s", Duration::from_secs(60)),
            ("1h2m3.5s", Duration::from_millis(3_723_500)),
            ("500ms", Duration::from_millis(500)),
            ("0", Duration::ZERO),
            ("45", Duration::from_secs(45)),
        ] {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for bad in ["", "1x", "-1s", "s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        for (d, s) in [
            (Duration::from_secs(30), "30s"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(s), Ok(d));
        }
    }
}
