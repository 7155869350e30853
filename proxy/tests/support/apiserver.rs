//! A fake Kubernetes API server, for driving the real kube-rs client end to end.
//!
//! It speaks just enough HTTP/1.1 list/watch for kube-runtime's watcher, over plain HTTP on
//! 127.0.0.1, for Services, EndpointSlices, Nodes and ServiceCIDRs, and it behaves like the real
//! one where the watcher's correctness depends on it:
//! - one global resource version counter (etcd's revision), stamped on every object a test
//!   applies or deletes; a list returns the objects and the current version;
//! - a watch from version N first replays every change after N, then streams live ones as
//!   newline-delimited JSON watch events over a chunked response; a watch from a version older
//!   than the compaction point is answered `410 Gone` (as an ERROR event, or as an HTTP status);
//! - label selectors (`k`, `!k`, `k=v`, `k!=v`) and field selectors (`metadata.name`,
//!   `metadata.namespace`) filter lists and watches; an object that stops matching is DELETED
//!   for that watch, one that starts matching is ADDED;
//! - a collection can be "not served" (404, like ServiceCIDR on an old cluster).
//!
//! Tests steer it: push changes, send bookmarks, drop watch connections mid-stream, expire
//! watches with a 410, hold new watch requests until released, and read every request sent.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, std::io::Error>;
type Chunk = Result<Frame<Bytes>, std::io::Error>;

/// How long [`FakeApiServer::wait_until`] waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(20);

/// The collections the fake server holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
    ServiceCidrs,
}

impl Resource {
    pub const ALL: [Resource; 4] =
        [Resource::Services, Resource::EndpointSlices, Resource::Nodes, Resource::ServiceCidrs];

    pub fn path(self) -> &'static str {
        match self {
            Resource::Services => "/api/v1/services",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Resource::Nodes => "/api/v1/nodes",
            Resource::ServiceCidrs => "/apis/networking.k8s.io/v1/servicecidrs",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::Services | Resource::Nodes => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::ServiceCidrs => "networking.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
            Resource::ServiceCidrs => "ServiceCIDR",
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.path() == path)
    }
}

/// How a watch resuming from a compacted version is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneStyle {
    /// HTTP 200 and one `{"type":"ERROR","object":{"kind":"Status","code":410,...}}` event, as
    /// the real API server answers.
    Event,
    /// An HTTP 410 response carrying a Status.
    HttpStatus,
}

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Request {
    pub resource: Option<Resource>,
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
}

impl Request {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch") == Some("true")
    }
}

/// One change to one object, kept for watches that resume from an older version.
#[derive(Debug, Clone)]
struct Change {
    version: u64,
    old: Option<Value>,
    new: Option<Value>,
}

struct LiveWatch {
    selector: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Chunk>,
}

struct Collection {
    served: bool,
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    /// A watch from a version below this is answered 410 Gone.
    compacted: u64,
    gone_style: GoneStyle,
    watches: Vec<LiveWatch>,
    /// Open watches that no longer receive events (see [`FakeApiServer::stall_watches`]).
    stalled: Vec<LiveWatch>,
    /// `false` while new watch requests are held back.
    gate: watch::Sender<bool>,
    held: usize,
}

impl Collection {
    fn new() -> Self {
        Self {
            served: true,
            objects: BTreeMap::new(),
            history: Vec::new(),
            compacted: 0,
            gone_style: GoneStyle::Event,
            watches: Vec::new(),
            stalled: Vec::new(),
            gate: watch::Sender::new(true),
            held: 0,
        }
    }

    fn broadcast(&mut self, change: &Change) {
        self.watches.retain(|w| match render(change, &w.selector) {
            Some(line) => w.tx.send(Ok(Frame::data(line))).is_ok(),
            None => !w.tx.is_closed(),
        });
    }
}

struct State {
    revision: u64,
    collections: HashMap<Resource, Collection>,
    requests: Vec<Request>,
}

/// The fake API server; it stops accepting connections when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 with an ephemeral port and empty collections.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server to 127.0.0.1");
        let addr = listener.local_addr().expect("the fake API server's address");
        let state = Arc::new(Mutex::new(State {
            revision: 1,
            collections: Resource::ALL.into_iter().map(|r| (r, Collection::new())).collect(),
            requests: Vec::new(),
        }));
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    // A dropped watch ends its connection with an error; nothing to report.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state, accept }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server into `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: tester\n  user:\n    token: not-a-secret\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Creates or replaces an object (`apiVersion` and `kind` are filled in when missing) and
    /// returns the resource version it got.
    pub fn apply(&self, resource: Resource, mut object: Value) -> u64 {
        let mut state = self.lock();
        state.revision += 1;
        let version = state.revision;
        let map = object.as_object_mut().expect("an object is a JSON map");
        map.entry("apiVersion").or_insert_with(|| resource.api_version().into());
        map.entry("kind").or_insert_with(|| resource.kind().into());
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        meta["resourceVersion"] = version.to_string().into();
        let key = key_of(&object);
        let collection = state.collections.get_mut(&resource).expect("every collection exists");
        let old = collection.objects.insert(key, object.clone());
        let change = Change { version, old, new: Some(object) };
        collection.broadcast(&change);
        collection.history.push(change);
        version
    }

    /// Deletes an object; returns the resource version of the deletion.
    pub fn delete(&self, resource: Resource, namespace: Option<&str>, name: &str) -> u64 {
        let mut state = self.lock();
        state.revision += 1;
        let version = state.revision;
        let collection = state.collections.get_mut(&resource).expect("every collection exists");
        let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
        let mut old =
            collection.objects.remove(&key).unwrap_or_else(|| panic!("no {resource:?} {key:?} to delete"));
        old["metadata"]["resourceVersion"] = version.to_string().into();
        let change = Change { version, old: Some(old), new: None };
        collection.broadcast(&change);
        collection.history.push(change);
        version
    }

    /// Sends a BOOKMARK at the current version to every watch of `resource` that asked for them.
    pub fn bookmark(&self, resource: Resource) {
        let mut state = self.lock();
        let version = state.revision;
        let collection = state.collections.get_mut(&resource).expect("every collection exists");
        let line = event_line(
            "BOOKMARK",
            &json!({
                "apiVersion": resource.api_version(),
                "kind": resource.kind(),
                "metadata": {"resourceVersion": version.to_string()},
            }),
        );
        collection.watches.retain(|w| !w.bookmarks || w.tx.send(Ok(Frame::data(line.clone()))).is_ok());
    }

    /// Aborts every open watch connection of `resource` mid-stream (no terminating chunk);
    /// returns how many there were.
    pub fn drop_watches(&self, resource: Resource) -> usize {
        let mut state = self.lock();
        let collection = state.collections.get_mut(&resource).expect("every collection exists");
        let dropped = collection.watches.len() + collection.stalled.len();
        let stalled = std::mem::take(&mut collection.stalled);
        for w in collection.watches.drain(..).chain(stalled) {
            let _ =
                w.tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "dropped by test")));
        }
        dropped
    }

    /// Answers every open watch of `resource` with an ERROR 410 Gone event and closes it, and
    /// compacts, so resuming from any version seen so far is refused too; returns how many
    /// watches there were.
    pub fn expire_watches(&self, resource: Resource) -> usize {
        self.compact(resource);
        let mut state = self.lock();
        let collection = state.collections.get_mut(&resource).expect("every collection exists");
        let expired = collection.watches.len() + collection.stalled.len();
        let line = gone_line(collection.compacted);
        let stalled = std::mem::take(&mut collection.stalled);
        for w in collection.watches.drain(..).chain(stalled) {
            let _ = w.tx.send(Ok(Frame::data(line.clone())));
        }
        expired
    }

    /// Open watches of `resource` stop receiving events, as when the server's watch cache
    /// falls behind; [`Self::expire_watches`] then ends them with 410 Gone.
    pub fn stall_watches(&self, resource: Resource) -> usize {
        let mut state = self.lock();
        let collection = state.collections.get_mut(&resource).expect("every collection exists");
        let live = std::mem::take(&mut collection.watches);
        let stalled = live.len();
        collection.stalled.extend(live);
        stalled
    }

    /// Forgets the change history of `resource`: a watch resuming from any version up to now
    /// is answered 410 Gone and the client must relist.
    pub fn compact(&self, resource: Resource) {
        let mut state = self.lock();
        let floor = state.revision;
        let collection = state.collections.get_mut(&resource).expect("every collection exists");
        collection.compacted = floor;
        collection.history.clear();
    }

    pub fn set_gone_style(&self, resource: Resource, style: GoneStyle) {
        self.lock().collections.get_mut(&resource).expect("every collection exists").gone_style = style;
    }

    /// Whether `resource` is served at all; when not, every request for it gets a 404.
    pub fn set_served(&self, resource: Resource, served: bool) {
        self.lock().collections.get_mut(&resource).expect("every collection exists").served = served;
    }

    /// New watch requests for `resource` wait (without an answer) until [`Self::release_watches`].
    pub fn hold_watches(&self, resource: Resource) {
        self.lock().collections.get_mut(&resource).expect("every collection exists").gate.send_replace(false);
    }

    pub fn release_watches(&self, resource: Resource) {
        self.lock().collections.get_mut(&resource).expect("every collection exists").gate.send_replace(true);
    }

    /// Watch requests of `resource` currently held back.
    pub fn held_watches(&self, resource: Resource) -> usize {
        self.lock().collections.get(&resource).map_or(0, |c| c.held)
    }

    /// Open watch streams of `resource`.
    pub fn live_watches(&self, resource: Resource) -> usize {
        let mut state = self.lock();
        let collection = state.collections.get_mut(&resource).expect("every collection exists");
        collection.watches.retain(|w| !w.tx.is_closed());
        collection.watches.len()
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Requests for `resource` so far; `watch` picks watches or lists.
    pub fn requests_for(&self, resource: Resource, watch: bool) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.resource == Some(resource) && r.is_watch() == watch)
            .collect()
    }

    /// Polls `condition` until it holds; fails the test after [`WAIT`].
    pub async fn wait_until(&self, what: &str, condition: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !condition(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out after {WAIT:?} waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn key_of(object: &Value) -> (String, String) {
    let field = |k: &str| object["metadata"][k].as_str().unwrap_or_default().to_owned();
    (field("namespace"), field("name"))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn gone_status(floor: u64) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version (compacted at {floor})"),
        "reason": "Expired",
        "code": 410,
    })
}

fn gone_line(floor: u64) -> Bytes {
    event_line("ERROR", &gone_status(floor))
}

/// The watch event `change` makes for a watch with `selector`, if any.
fn render(change: &Change, selector: &Selector) -> Option<Bytes> {
    let matches = |o: &Option<Value>| o.as_ref().is_some_and(|o| selector.matches(o));
    let (kind, object) = match (matches(&change.old), matches(&change.new)) {
        (false, true) => ("ADDED", change.new.as_ref()),
        (true, true) => ("MODIFIED", change.new.as_ref()),
        // Stopped matching: DELETED with the new state; gone: DELETED with the last state.
        (true, false) => ("DELETED", change.new.as_ref().or(change.old.as_ref())),
        (false, false) => return None,
    };
    object.map(|o| event_line(kind, o))
}

/// Label and field selectors of one request.
#[derive(Debug, Clone, Default)]
struct Selector {
    labels: Vec<Term>,
    fields: Vec<Term>,
}

#[derive(Debug, Clone)]
enum Term {
    Exists(String),
    Absent(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl Term {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((k, v)) = s.split_once("!=") {
            Ok(Term::NotEquals(k.into(), v.into()))
        } else if let Some((k, v)) = s.split_once("==").or_else(|| s.split_once('=')) {
            Ok(Term::Equals(k.into(), v.into()))
        } else if let Some(k) = s.strip_prefix('!') {
            Ok(Term::Absent(k.into()))
        } else if !s.is_empty() && !s.contains([' ', '(']) {
            Ok(Term::Exists(s.into()))
        } else {
            Err(format!("unsupported selector term {s:?}"))
        }
    }

    fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Term::Exists(k) => get(k).is_some(),
            Term::Absent(k) => get(k).is_none(),
            Term::Equals(k, v) => get(k).as_deref() == Some(v),
            Term::NotEquals(k, v) => get(k).as_deref() != Some(v),
        }
    }
}

impl Selector {
    fn parse(query: &BTreeMap<String, String>) -> Result<Self, String> {
        let terms = |key: &str| -> Result<Vec<Term>, String> {
            query.get(key).map_or(Ok(Vec::new()), |s| s.split(',').map(Term::parse).collect())
        };
        let selector = Self { labels: terms("labelSelector")?, fields: terms("fieldSelector")? };
        for f in &selector.fields {
            let (Term::Equals(k, _) | Term::NotEquals(k, _) | Term::Exists(k) | Term::Absent(k)) = f;
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(format!("field label not supported: {k}"));
            }
        }
        Ok(selector)
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        let label = |k: &str| meta["labels"][k].as_str().map(str::to_owned);
        let field = |k: &str| match k {
            "metadata.name" => Some(meta["name"].as_str().unwrap_or_default().to_owned()),
            "metadata.namespace" => Some(meta["namespace"].as_str().unwrap_or_default().to_owned()),
            _ => None,
        };
        self.labels.iter().all(|t| t.matches(label)) && self.fields.iter().all(|t| t.matches(field))
    }
}

fn decode_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(body.to_string())).map_err(|never: Infallible| match never {}).boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("a header"));
    response
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    full(code, &body)
}

fn streaming(rx: mpsc::UnboundedReceiver<Chunk>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("a header"));
    response
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A test that panicked while holding the lock has failed already; keep serving.
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn not_found() -> Response<Body> {
    status_response(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource")
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = decode_query(req.uri().query().unwrap_or_default());
    let request = Request { resource: Resource::from_path(&path), path, query };
    lock(&state).requests.push(request.clone());
    let Some(resource) = request.resource else { return Ok(not_found()) };
    let selector = match Selector::parse(&request.query) {
        Ok(s) => s,
        Err(e) => return Ok(status_response(StatusCode::BAD_REQUEST, "BadRequest", &e)),
    };
    let held = {
        let mut state = lock(&state);
        let revision = state.revision;
        let collection = state.collections.get_mut(&resource).expect("every collection exists");
        if !collection.served {
            return Ok(not_found());
        }
        if !request.is_watch() {
            let items: Vec<&Value> = collection.objects.values().filter(|o| selector.matches(o)).collect();
            let list = json!({
                "apiVersion": resource.api_version(),
                "kind": format!("{}List", resource.kind()),
                "metadata": {"resourceVersion": revision.to_string()},
                "items": items,
            });
            return Ok(full(StatusCode::OK, &list));
        }
        if *collection.gate.borrow() {
            None
        } else {
            collection.held += 1;
            Some(collection.gate.subscribe())
        }
    };
    // A watch: wait while the test holds watches back.
    if let Some(mut gate) = held {
        let _ = gate.wait_for(|open| *open).await;
        lock(&state).collections.get_mut(&resource).expect("every collection exists").held -= 1;
    }
    let mut state = lock(&state);
    let current = state.revision;
    let collection = state.collections.get_mut(&resource).expect("every collection exists");
    Ok(start_watch(collection, current, selector, &request))
}

fn start_watch(
    collection: &mut Collection,
    current: u64,
    selector: Selector,
    request: &Request,
) -> Response<Body> {
    let from = match request.param("resourceVersion").map(str::parse::<u64>) {
        None | Some(Ok(0)) => current,
        Some(Ok(v)) => v,
        Some(Err(_)) => {
            return status_response(StatusCode::BAD_REQUEST, "BadRequest", "resourceVersion is not a number");
        }
    };
    if from < collection.compacted {
        let floor = collection.compacted;
        return match collection.gone_style {
            GoneStyle::Event => {
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = tx.send(Ok(Frame::data(gone_line(floor))));
                streaming(rx)
            }
            GoneStyle::HttpStatus => full(StatusCode::GONE, &gone_status(floor)),
        };
    }
    let (tx, rx) = mpsc::unbounded_channel();
    for change in collection.history.iter().filter(|c| c.version > from) {
        if let Some(line) = render(change, &selector) {
            let _ = tx.send(Ok(Frame::data(line)));
        }
    }
    let bookmarks = request.param("allowWatchBookmarks") == Some("true");
    collection.watches.push(LiveWatch { selector, bookmarks, tx });
    streaming(rx)
}
