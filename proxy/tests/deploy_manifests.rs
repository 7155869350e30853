//! The manifests in `deploy/` are valid Kubernetes objects ferry can run with: every document
//! parses into its k8s-openapi type without losing a field (a typo would), the DaemonSet's
//! arguments parse with ferry's own command line, its ConfigMap's `config.conf` parses with
//! ferry's KubeProxyConfiguration reader, and the RBAC grants only what ferry reads. Also: a
//! real kube-proxy ConfigMap (kubeadm's) configures ferry.

#![expect(clippy::unwrap_used, reason = "test helpers panic with the failure, like the tests")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use proxy::backend::BackendKind;
use proxy::cli::{Cli, Command};
use serde::Deserialize;
use serde::de::DeserializeOwned;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document in deploy/, with its file name.
fn documents() -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !value.is_null() {
                out.push((name.clone(), value));
            }
        }
    }
    out
}

/// Parses `value` as `T` and checks that serializing it back gives the same document: a field
/// the type does not have (a typo, a wrong indentation) would be dropped and show up here.
fn typed<T: DeserializeOwned + serde::Serialize>(file: &str, value: &serde_json::Value) -> T {
    let t: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(&back, value, "{file}: fields lost or changed when read as a typed object");
    t
}

struct Deploy {
    daemonset: DaemonSet,
    service_account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    config_map: ConfigMap,
}

fn deploy() -> Deploy {
    let mut objects: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut kustomize_resources = None;
    let mut files = BTreeSet::new();
    for (file, doc) in documents() {
        let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{file}: no kind")).to_owned();
        if kind == "Kustomization" {
            let resources: BTreeSet<String> =
                doc["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
            kustomize_resources = Some(resources);
            continue;
        }
        files.insert(file.clone());
        assert!(objects.insert(kind.clone(), doc).is_none(), "{file}: a second {kind}");
    }
    assert_eq!(kustomize_resources, Some(files), "kustomization.yaml lists every manifest");
    let take = |kind: &str| objects.get(kind).unwrap_or_else(|| panic!("no {kind} in deploy/")).clone();
    let d = Deploy {
        daemonset: typed("DaemonSet", &take("DaemonSet")),
        service_account: typed("ServiceAccount", &take("ServiceAccount")),
        role: typed("ClusterRole", &take("ClusterRole")),
        binding: typed("ClusterRoleBinding", &take("ClusterRoleBinding")),
        config_map: typed("ConfigMap", &take("ConfigMap")),
    };
    let known = ["DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap"];
    let extra: Vec<&String> = objects.keys().filter(|k| !known.contains(&k.as_str())).collect();
    assert!(extra.is_empty(), "deploy/ has kinds this test does not check: {extra:?}");
    d
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let d = deploy();
    for (what, ns) in [
        ("DaemonSet", d.daemonset.metadata.namespace.as_deref()),
        ("ServiceAccount", d.service_account.metadata.namespace.as_deref()),
        ("ConfigMap", d.config_map.metadata.namespace.as_deref()),
    ] {
        assert_eq!(ns, Some("kube-system"), "{what}");
    }
}

#[test]
fn the_daemonset_runs_on_every_node_in_the_host_network_with_capabilities_not_privileged() {
    let d = deploy();
    let spec = d.daemonset.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(spec.service_account_name, d.service_account.metadata.name);
    let tolerations = spec.tolerations.unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );
    let [c] = spec.containers.as_slice() else { panic!("one container") };
    let sc = c.security_context.clone().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.unwrap();
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert!(added.contains("NET_ADMIN") && added.contains("SYS_ADMIN"), "{added:?}");
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));

    let env: BTreeMap<&str, String> = c
        .env
        .iter()
        .flatten()
        .map(|e| {
            let v = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.clone());
            (e.name.as_str(), v.or_else(|| e.value.clone()).unwrap_or_default())
        })
        .collect();
    assert_eq!(env["NODE_NAME"], "spec.nodeName");
    assert_eq!(env["NODE_IPS"], "status.hostIPs");

    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (g.path.clone().unwrap(), serde_json::to_value(&g.port).unwrap())
    };
    assert_eq!(probe(&c.liveness_probe), ("/livez".to_owned(), serde_json::json!(10256)));
    assert_eq!(probe(&c.readiness_probe), ("/readyz".to_owned(), serde_json::json!(10256)));

    let volumes = spec.volumes.unwrap_or_default();
    let bpffs = volumes.iter().find_map(|v| v.host_path.as_ref().filter(|h| h.path == "/sys/fs/bpf"));
    assert!(bpffs.is_some(), "the host's bpffs is mounted");
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let config_volume = volumes.iter().find(|v| v.config_map.is_some()).unwrap();
    assert_eq!(config_volume.config_map.as_ref().unwrap().name, d.config_map.metadata.name.clone().unwrap());
    let config_mount = mounts.iter().find(|m| m.name == config_volume.name).unwrap();

    // The arguments are ferry's: they parse, with the downward-API variables filled in.
    let args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .map(|a| a.replace("$(NODE_NAME)", "node-a").replace("$(NODE_IPS)", "192.168.0.10,fd00::10"))
        .collect();
    let mut argv = c.command.clone().unwrap();
    argv.extend(args);
    let Command::Run(run) = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).command
    else {
        panic!("{argv:?} is not `ferry run`")
    };
    let config = run.config.clone().unwrap();
    assert_eq!(config.parent().unwrap(), Path::new(&config_mount.mount_path));
    let key = config.file_name().unwrap().to_string_lossy();
    assert!(d.config_map.data.as_ref().unwrap().contains_key(key.as_ref()), "the ConfigMap has {key}");
    assert_eq!(run.node.node_ips, ["192.168.0.10", "fd00::10"]);
}

#[test]
fn rbac_grants_only_reads_of_what_ferry_watches_and_events() {
    let d = deploy();
    let mut grants: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in d.role.rules.unwrap() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                grants.entry(format!("{group}/{resource}")).or_default().extend(rule.verbs.iter().cloned());
            }
        }
    }
    let read: BTreeSet<String> = ["get", "list", "watch"].map(String::from).into();
    let write_events: BTreeSet<String> = ["create", "patch"].map(String::from).into();
    let expected: BTreeMap<String, BTreeSet<String>> = [
        ("/services", &read),
        ("/nodes", &read),
        ("discovery.k8s.io/endpointslices", &read),
        ("networking.k8s.io/servicecidrs", &read),
        ("/events", &write_events),
        ("events.k8s.io/events", &write_events),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.clone()))
    .collect();
    assert_eq!(grants, expected);
    assert_eq!(d.binding.role_ref.name, d.role.metadata.name.unwrap());
    let subject = &d.binding.subjects.unwrap()[0];
    assert_eq!(Some(&subject.name), d.service_account.metadata.name.as_ref());
    assert_eq!(subject.namespace, d.service_account.metadata.namespace);
}

#[test]
fn the_config_map_is_a_kube_proxy_configuration_ferry_reads_without_warnings() {
    let d = deploy();
    let text = &d.config_map.data.unwrap()["config.conf"];
    let c = proxy::config::parse(text).unwrap();
    assert_eq!(c.mode, Some(BackendKind::Nftables));
    assert_eq!(c.unknown_fields, Vec::<String>::new());
    assert_eq!(c.not_applied, Vec::<String>::new());
    assert!(!c.cluster_cidrs.is_empty());
    assert_eq!(c.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
}

#[test]
fn the_container_image_builds_with_the_setup_toolchain_and_ships_nft() {
    let text = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    assert!(text.contains("RUN cargo xtask setup"), "the builder installs the toolchain like setup does");
    assert!(text.contains("debian:bookworm-slim"));
    assert!(text.contains("nftables") && text.contains("conntrack"));
    assert_eq!(text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")), 2, "two stages");
}

/// kubeadm's `kube-proxy` ConfigMap (Kubernetes 1.31, `kubectl -n kube-system get cm kube-proxy
/// -o yaml`, cluster-specific metadata trimmed), with an operator's nftables mode.
const KUBEADM_CONFIG_MAP: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  annotations:
    kubeadm.kubernetes.io/component-config.hash: sha256:0d4f8a1c
  labels:
    app: kube-proxy
  name: kube-proxy
  namespace: kube-system
data:
  config.conf: |-
    apiVersion: kubeproxy.config.k8s.io/v1alpha1
    bindAddress: 0.0.0.0
    bindAddressHardFail: false
    clientConnection:
      acceptContentTypes: ""
      burst: 0
      contentType: ""
      kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
      qps: 0
    clusterCIDR: 10.244.0.0/16
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
    mode: "nftables"
    nftables:
      masqueradeAll: false
      masqueradeBit: null
      minSyncPeriod: 0s
      syncPeriod: 0s
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
  kubeconfig.conf: |-
    apiVersion: v1
    kind: Config
    clusters:
    - cluster:
        certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
        server: https://control-plane.example:6443
      name: default
    contexts:
    - context:
        cluster: default
        namespace: default
        user: default
      name: default
    current-context: default
    users:
    - name: default
      user:
        tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
"#;

#[test]
fn kubeadms_kube_proxy_config_map_configures_ferry() {
    let cm: ConfigMap = serde_yaml_ng::from_str(KUBEADM_CONFIG_MAP).unwrap();
    let c = proxy::config::parse(&cm.data.unwrap()["config.conf"]).unwrap();
    assert_eq!(c.unknown_fields, Vec::<String>::new());
    assert_eq!(c.not_applied, Vec::<String>::new());
    let argv = ["ferry", "run", "--node-name", "node-a", "--node-ip", "192.168.0.10"];
    let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else { unreachable!() };
    let s = proxy::cli::run::resolve(&args, &c, None).unwrap();
    assert_eq!(s.backend, BackendKind::Nftables);
    assert_eq!(s.node.cluster_cidrs, vec!["10.244.0.0/16".parse::<ipnet::IpNet>().unwrap()]);
    assert!(s.node.nodeport_addresses.is_empty(), "null: every address");
    assert_eq!(s.sync_period, std::time::Duration::from_secs(30), "0s: the default");
    assert_eq!(
        s.min_sync_period,
        std::time::Duration::from_secs(1),
        "nftables mode reads the nftables section"
    );
    assert_eq!(s.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
    assert_eq!(s.metrics_bind_address, Some("127.0.0.1:10249".parse().unwrap()));
    assert_eq!(
        s.source,
        proxy::daemon::Source::Kube(Some("/var/lib/kube-proxy/kubeconfig.conf".into())),
        "clientConnection.kubeconfig"
    );
}
