//! Kubernetes API source: kube-runtime watchers for Services, EndpointSlices, this node's Node
//! and ServiceCIDRs, each turned into [`StoreEvent`]s.
//!
//! A watcher's initial list, and every relist after a dropped watch that cannot resume or a
//! `410 Gone`, arrives as `Init`, `InitApply`… and `InitDone`. The objects are buffered and sent
//! as ONE [`StoreEvent::Replace`] for that kind, so the store swaps in the new truth in a single
//! step: services present before and after a relist never disappear in between, and those
//! deleted while the watch was down are removed (the store diffs the replacement).
//!
//! Watch errors are logged with the kind and the reason, and the watcher retries with
//! kube-runtime's default backoff; one kind failing never stops the others. The ServiceCIDR API
//! is optional (networking.k8s.io/v1 since Kubernetes 1.33): while it is not served, the kind
//! counts as listed and empty, and the watcher retries slowly.

use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::model::Kind;
use crate::store::{Object, StoreEvent};

/// kube-proxy's label selector for Services and EndpointSlices: not another proxy's
/// ([`SERVICE_PROXY_NAME_LABEL`]), not headless ([`HEADLESS_LABEL`]).
///
/// [`SERVICE_PROXY_NAME_LABEL`]: crate::model::service::SERVICE_PROXY_NAME_LABEL
/// [`HEADLESS_LABEL`]: crate::model::service::HEADLESS_LABEL
pub const LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// How long to wait before asking again for an optional API the server does not serve.
pub const DEFAULT_API_MISSING_RETRY: Duration = Duration::from_secs(300);

/// Tunables of the API source; [`Options::default`] is what `ferry run` uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Retry interval while the ServiceCIDR API answers 404 (older clusters).
    pub api_missing_retry: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { api_missing_retry: DEFAULT_API_MISSING_RETRY }
    }
}

/// A client from the given kubeconfig file, else the default configuration: `$KUBECONFIG` or
/// `~/.kube/config` when present, otherwise the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("invalid kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes client configuration (no kubeconfig and not in a cluster)")?,
    };
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

/// Watches Services, EndpointSlices, the Node `node_name` and ServiceCIDRs and sends what
/// changes to `tx`, until the receiver is dropped.
pub async fn run(
    client: kube::Client,
    node_name: String,
    tx: mpsc::Sender<StoreEvent>,
) -> anyhow::Result<()> {
    run_with(client, node_name, Options::default(), tx).await
}

/// [`run`] with explicit [`Options`].
pub async fn run_with(
    client: kube::Client,
    node_name: String,
    options: Options,
    tx: mpsc::Sender<StoreEvent>,
) -> anyhow::Result<()> {
    anyhow::ensure!(!node_name.is_empty(), "the node name must not be empty");
    let proxied = watcher::Config::default().labels(LABEL_SELECTOR);
    let this_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let services = Watch {
        kind: Kind::Service,
        api: Api::<core::Service>::all(client.clone()),
        config: proxied.clone(),
        wrap: |o| Object::Service(std::sync::Arc::new(o)),
        optional: false,
    };
    let slices = Watch {
        kind: Kind::EndpointSlice,
        api: Api::<discovery::EndpointSlice>::all(client.clone()),
        config: proxied,
        wrap: |o| Object::EndpointSlice(std::sync::Arc::new(o)),
        optional: false,
    };
    let node = Watch {
        kind: Kind::Node,
        api: Api::<core::Node>::all(client.clone()),
        config: this_node,
        wrap: |o| Object::Node(std::sync::Arc::new(o)),
        optional: false,
    };
    let cidrs = Watch {
        kind: Kind::ServiceCIDR,
        api: Api::<networking::ServiceCIDR>::all(client),
        config: watcher::Config::default(),
        wrap: |o| Object::ServiceCidr(std::sync::Arc::new(o)),
        optional: true,
    };
    info!(node = %node_name, selector = LABEL_SELECTOR, "watching the Kubernetes API");
    // A watch ends only when the receiver is gone, and then they all must; `closed()` notices
    // that even while every watch is quiet.
    let Closed = tokio::select! {
        closed = services.run(&options, &tx) => closed,
        closed = slices.run(&options, &tx) => closed,
        closed = node.run(&options, &tx) => closed,
        closed = cidrs.run(&options, &tx) => closed,
        () = tx.closed() => Closed,
    };
    debug!("store channel closed; API watches stopped");
    Ok(())
}

/// The store's receiver is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Closed;

/// One kind's watch.
struct Watch<K> {
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(K) -> Object,
    /// An API that older clusters do not serve: a 404 means "no objects", not an error.
    optional: bool,
}

impl<K> Watch<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    /// Runs until the receiver is gone.
    async fn run(self, options: &Options, tx: &mpsc::Sender<StoreEvent>) -> Closed {
        let mut translate = Translate::new(self.kind, self.wrap);
        let mut missing_reported = false;
        loop {
            let mut stream = watcher(self.api.clone(), self.config.clone()).default_backoff().boxed();
            if let Err(closed) =
                self.follow(&mut stream, &mut translate, &mut missing_reported, options, tx).await
            {
                return closed;
            }
            debug!(kind = %self.kind, "starting the watch over with a new list");
        }
    }

    /// Forwards one watcher stream's events; returns `Ok` when the stream must be replaced.
    async fn follow(
        &self,
        stream: &mut (impl Stream<Item = watcher::Result<watcher::Event<K>>> + Unpin),
        translate: &mut Translate<K>,
        missing_reported: &mut bool,
        options: &Options,
        tx: &mpsc::Sender<StoreEvent>,
    ) -> Result<(), Closed> {
        let kind = self.kind;
        while let Some(item) = stream.next().await {
            let err = match item {
                Ok(event) => {
                    if let Some(out) = translate.event(event) {
                        if let StoreEvent::Replace { objects, .. } = &out {
                            if std::mem::take(missing_reported) {
                                info!(%kind, "API is now served");
                            }
                            info!(%kind, objects = objects.len(), "listed");
                        }
                        tx.send(out).await.map_err(|_| Closed)?;
                    }
                    continue;
                }
                Err(err) => err,
            };
            let status = api_status(&err);
            match status {
                Some((404, _)) if self.optional => {
                    if !*missing_reported {
                        info!(
                            %kind,
                            retry = ?options.api_missing_retry,
                            "API not served by this cluster; treating it as empty and retrying slowly"
                        );
                        *missing_reported = true;
                        // Nothing of this kind exists: say so, so nothing waits for its list.
                        translate.reset();
                        tx.send(StoreEvent::Replace { kinds: vec![kind], objects: Vec::new() })
                            .await
                            .map_err(|_| Closed)?;
                    } else {
                        debug!(%kind, "API still not served");
                    }
                    tokio::time::sleep(options.api_missing_retry).await;
                }
                // A normal relist: the watcher starts over with a fresh list by itself.
                Some((410, reason)) if matches!(err, watcher::Error::WatchError(_)) => {
                    info!(%kind, reason, "watch expired (410 Gone); relisting");
                }
                // A server that refuses the resumed watch with an HTTP 410 leaves the watcher
                // retrying the same stale version forever: start over with a new list.
                Some((410, reason)) => {
                    info!(%kind, reason, error = %err, "watch cannot resume (410 Gone)");
                    return Ok(());
                }
                Some((code, reason)) => warn!(%kind, code, reason, error = %err, "watch error; retrying"),
                None => warn!(%kind, error = %err, "watch error; retrying"),
            }
        }
        // A watcher stream never ends; if it ever does, start a new one.
        Ok(())
    }
}

/// The API status code and reason behind a watcher error, if the server answered one.
fn api_status(err: &watcher::Error) -> Option<(u16, String)> {
    let status = match err {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s,
        _ => return None,
    };
    let reason = if status.reason.is_empty() { status.message.clone() } else { status.reason.clone() };
    Some((status.code, reason))
}

/// Watcher events to store events: the initial list (or a relist) is buffered and delivered
/// as one [`StoreEvent::Replace`].
struct Translate<K> {
    kind: Kind,
    wrap: fn(K) -> Object,
    /// `Some` between `Init` and `InitDone`.
    buffer: Option<Vec<Object>>,
}

impl<K> Translate<K> {
    fn new(kind: Kind, wrap: fn(K) -> Object) -> Self {
        Self { kind, wrap, buffer: None }
    }

    /// Drops a half-received list.
    fn reset(&mut self) {
        self.buffer = None;
    }

    fn event(&mut self, event: watcher::Event<K>) -> Option<StoreEvent> {
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(obj) => {
                self.buffer.get_or_insert_with(Vec::new).push((self.wrap)(obj));
                None
            }
            watcher::Event::InitDone => {
                let objects = self.buffer.take().unwrap_or_default();
                Some(StoreEvent::Replace { kinds: vec![self.kind], objects })
            }
            watcher::Event::Apply(obj) => Some(StoreEvent::Apply((self.wrap)(obj))),
            watcher::Event::Delete(obj) => Some(StoreEvent::Delete((self.wrap)(obj).object_ref())),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::model::ObjectRef;

    fn svc(name: &str) -> core::Service {
        core::Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("d".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn translate() -> Translate<core::Service> {
        Translate::new(Kind::Service, |o| Object::Service(std::sync::Arc::new(o)))
    }

    fn names(event: &StoreEvent) -> Vec<String> {
        match event {
            StoreEvent::Replace { objects, .. } => objects.iter().map(|o| o.object_ref().name).collect(),
            other => panic!("expected a Replace, got {other:?}"),
        }
    }

    #[test]
    fn init_list_is_buffered_into_one_replace_of_that_kind() {
        let mut t = translate();
        assert!(t.event(watcher::Event::Init).is_none());
        assert!(t.event(watcher::Event::InitApply(svc("a"))).is_none());
        assert!(t.event(watcher::Event::InitApply(svc("b"))).is_none());
        let out = t.event(watcher::Event::InitDone).expect("InitDone yields the list");
        assert!(matches!(&out, StoreEvent::Replace { kinds, .. } if kinds == &[Kind::Service]));
        assert_eq!(names(&out), ["a", "b"]);
    }

    #[test]
    fn a_restarted_list_drops_what_the_interrupted_one_buffered() {
        let mut t = translate();
        t.event(watcher::Event::Init);
        t.event(watcher::Event::InitApply(svc("stale")));
        t.event(watcher::Event::Init);
        t.event(watcher::Event::InitApply(svc("fresh")));
        let out = t.event(watcher::Event::InitDone).expect("InitDone yields the list");
        assert_eq!(names(&out), ["fresh"]);
    }

    #[test]
    fn an_empty_list_is_still_a_replace() {
        let mut t = translate();
        t.event(watcher::Event::Init);
        let out = t.event(watcher::Event::InitDone).expect("InitDone yields the list");
        assert!(names(&out).is_empty());
    }

    #[test]
    fn applies_and_deletes_pass_straight_through() {
        let mut t = translate();
        assert!(matches!(
            t.event(watcher::Event::Apply(svc("a"))),
            Some(StoreEvent::Apply(Object::Service(_)))
        ));
        let Some(StoreEvent::Delete(r)) = t.event(watcher::Event::Delete(svc("a"))) else {
            panic!("a Delete event becomes a store Delete");
        };
        assert_eq!(r, ObjectRef::new(Kind::Service, Some("d"), Some("a")));
    }

    #[test]
    fn label_selector_excludes_other_proxies_and_headless_services() {
        use crate::model::service::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};
        assert_eq!(LABEL_SELECTOR, format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"));
    }

    #[test]
    fn status_code_and_reason_are_read_from_api_errors() {
        let status = kube::core::Status::failure("too old resource version", "Expired").with_code(410);
        let err = watcher::Error::WatchError(status.boxed());
        assert_eq!(api_status(&err), Some((410, "Expired".to_owned())));
        assert_eq!(api_status(&watcher::Error::NoResourceVersion), None);
    }
}
