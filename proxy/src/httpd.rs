//! The small HTTP/1.1 server (and client) behind ferry's side paths: `/healthz` and `/livez`,
//! the healthCheckNodePort servers, `/metrics` and the admin endpoint.
//!
//! hyper 1 directly, no framework: a handler maps the request head to a response. Every server
//! is a task owning its listener and its connections; dropping the [`Server`] aborts them all,
//! which is how a healthCheckNodePort server goes away with its service. Connections are capped
//! and a request head must arrive within [`HEADER_TIMEOUT`]: some of these ports face the
//! outside world (load balancers probe them on every node address).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::http::request::Parts;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error, info, warn};

/// How long a client may take to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one server keeps open at most; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Pause between two attempts to bind an address that was busy (kube-proxy retries every 5s).
pub const BIND_RETRY: Duration = Duration::from_secs(5);

pub type Response = hyper::Response<Full<Bytes>>;
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// Maps a request head (bodies are never read) to a response.
pub type Handler = Arc<dyn Fn(Parts) -> ResponseFuture + Send + Sync>;

/// A handler that answers at once.
pub fn handler(f: impl Fn(&Parts) -> Response + Send + Sync + 'static) -> Handler {
    Arc::new(move |parts: Parts| {
        let response = f(&parts);
        Box::pin(async move { response })
    })
}

/// A response with a body and its content type.
pub fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response {
    let mut r = hyper::Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response {
    respond(status, "text/plain; charset=utf-8", body)
}

pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response {
    let mut r = respond(status, "application/json", body);
    r.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

pub fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("{addr}: {source}")]
    Protocol { addr: String, source: hyper::Error },
    #[error("{addr}: no answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr}: invalid request for {path:?}: {source}")]
    Request { addr: String, path: String, source: hyper::http::Error },
}

/// Where a server listens: a TCP address, or a unix socket (`unix:/run/ferry/admin.sock`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => a.fmt(f),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl From<ListenAddr> for String {
    fn from(a: ListenAddr) -> String {
        a.to_string()
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a unix socket needs an absolute path (unix:/run/ferry/admin.sock)"
                ));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse().map(ListenAddr::Tcp).map_err(|_| format!("{s:?} is not IP:PORT or unix:/PATH"))
    }
}

/// A running server. Dropping it stops the listener and every connection.
#[derive(Debug)]
pub struct Server {
    addr: String,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `addr` and serves `handler` on it.
    pub async fn bind(addr: &ListenAddr, name: &'static str, handler: Handler) -> Result<Self, HttpError> {
        let listener = Listener::bind(addr).await?;
        Ok(Self::serve(listener, name, handler))
    }

    /// Serves on an already bound listener.
    pub fn serve(listener: Listener, name: &'static str, handler: Handler) -> Self {
        let addr = listener.local_addr();
        debug!(server = name, %addr, "serving");
        let task = tokio::spawn(accept_loop(listener, name, handler));
        Self { addr, task }
    }

    /// Keeps trying to bind `addr` every [`BIND_RETRY`] until it works, logging each failure,
    /// then serves. For servers whose absence must not stop ferry (`--bind-address-hard-fail`
    /// off, as kube-proxy does).
    pub fn bind_with_retry(addr: ListenAddr, name: &'static str, handler: Handler) -> Self {
        let label = addr.to_string();
        let task = tokio::spawn(async move {
            loop {
                match Listener::bind(&addr).await {
                    Ok(listener) => {
                        info!(server = name, addr = %listener.local_addr(), "listening");
                        return accept_loop(listener, name, handler).await;
                    }
                    Err(e) => {
                        error!(server = name, "{e}; retrying in {BIND_RETRY:?}");
                        tokio::time::sleep(BIND_RETRY).await;
                    }
                }
            }
        });
        Self { addr: label, task }
    }

    /// The address served (with the port the kernel chose for port 0).
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> Result<Self, HttpError> {
        let err = |source| HttpError::Bind { addr: addr.to_string(), source };
        match addr {
            ListenAddr::Tcp(a) => TcpListener::bind(a).await.map(Listener::Tcp).map_err(err),
            ListenAddr::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(err)?;
                }
                // A socket left by a previous ferry (SIGKILL, crash) would make bind fail.
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(err(e)),
                }
                UnixListener::bind(path).map(|l| Listener::Unix(l, path.clone())).map_err(err)
            }
        }
    }

    /// Port `port` on every address of both families: `[::]` with IPV6_V6ONLY off, so one
    /// socket takes IPv4 too (Go's `:port`, which kube-proxy's health servers use); `0.0.0.0`
    /// alone when the kernel has no IPv6.
    pub fn bind_any(port: u16) -> Result<Self, HttpError> {
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        match bind_tcp_socket(v6, Some(false)) {
            Ok(l) => Ok(Listener::Tcp(l)),
            Err(e) if e.raw_os_error() == Some(EAFNOSUPPORT) => {
                let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
                bind_tcp_socket(v4, None)
                    .map(Listener::Tcp)
                    .map_err(|source| HttpError::Bind { addr: v4.to_string(), source })
            }
            Err(source) => Err(HttpError::Bind { addr: format!(":{port}"), source }),
        }
    }

    /// One address, without touching the other family.
    pub fn bind_ip(addr: SocketAddr) -> Result<Self, HttpError> {
        let only_v6 = addr.is_ipv6().then_some(true);
        bind_tcp_socket(addr, only_v6)
            .map(Listener::Tcp)
            .map_err(|source| HttpError::Bind { addr: addr.to_string(), source })
    }

    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_else(|e| format!("?({e})")),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

/// Linux's errno for "address family not supported" (a kernel booted with ipv6.disable=1).
const EAFNOSUPPORT: i32 = 97;

fn bind_tcp_socket(addr: SocketAddr, only_v6: Option<bool>) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(v) = only_v6 {
        socket.set_only_v6(v)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(listener: Listener, name: &'static str, handler: Handler) {
    // Dropped (and with it every connection) when the server's task is aborted.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!(server = name, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if conns.len() >= MAX_CONNECTIONS {
            debug!(server = name, "too many connections; closing a new one");
            continue;
        }
        let handler = Arc::clone(&handler);
        conns.spawn(async move {
            let result = match stream {
                Stream::Tcp(s) => serve_connection(s, handler).await,
                Stream::Unix(s) => serve_connection(s, handler).await,
            };
            if let Err(e) = result {
                debug!(server = name, "connection: {e}");
            }
        });
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn serve_connection<S>(stream: S, handler: Handler) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let (parts, _body) = req.into_parts();
        let response = handler(parts);
        async move { Ok::<_, Infallible>(response.await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

/// `GET path` on `addr`: the status and the body. For `ferry status` and tests.
pub async fn get(
    addr: &ListenAddr,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, String), HttpError> {
    let r = get_response(addr, path, timeout).await?;
    Ok((r.status(), r.into_body()))
}

/// `GET path` on `addr`: the whole response, headers included.
pub async fn get_response(
    addr: &ListenAddr,
    path: &str,
    timeout: Duration,
) -> Result<hyper::Response<String>, HttpError> {
    let label = addr.to_string();
    let work = async {
        match addr {
            ListenAddr::Tcp(a) => {
                let s = TcpStream::connect(a)
                    .await
                    .map_err(|source| HttpError::Connect { addr: label.clone(), source })?;
                get_on(s, &label, path).await
            }
            ListenAddr::Unix(p) => {
                let s = UnixStream::connect(p)
                    .await
                    .map_err(|source| HttpError::Connect { addr: label.clone(), source })?;
                get_on(s, &label, path).await
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(HttpError::Timeout { addr: label.clone(), timeout }))
}

async fn get_on<S>(stream: S, addr: &str, path: &str) -> Result<hyper::Response<String>, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proto = |source| HttpError::Protocol { addr: addr.to_owned(), source };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(proto)?;
    let conn = tokio::spawn(conn);
    let request = Request::get(path)
        .header(HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|source| HttpError::Request { addr: addr.to_owned(), path: path.to_owned(), source })?;
    let response = sender.send_request(request).await.map_err(proto)?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(proto)?.to_bytes();
    conn.abort();
    Ok(hyper::Response::from_parts(parts, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_tcp_and_unix_forms() {
        assert_eq!("127.0.0.1:10247".parse(), Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 10247)))));
        assert_eq!(
            "unix:/run/ferry/admin.sock".parse(),
            Ok(ListenAddr::Unix("/run/ferry/admin.sock".into()))
        );
        assert!("unix:relative.sock".parse::<ListenAddr>().is_err());
        assert!("localhost:80".parse::<ListenAddr>().is_err());
        assert_eq!(ListenAddr::Unix("/x.sock".into()).to_string(), "unix:/x.sock");
    }

    #[tokio::test]
    async fn a_server_answers_over_tcp_and_stops_when_dropped() {
        let h = handler(|p| text(StatusCode::OK, format!("you asked for {}", p.uri.path())));
        let server = Server::bind(&"127.0.0.1:0".parse().unwrap(), "test", h).await.unwrap();
        let addr: ListenAddr = server.addr().parse().unwrap();
        let (status, body) = get(&addr, "/hello", Duration::from_secs(5)).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "you asked for /hello"));
        drop(server);
        tokio::task::yield_now().await;
        assert!(get(&addr, "/hello", Duration::from_secs(5)).await.is_err(), "the listener is closed");
    }

    #[tokio::test]
    async fn a_server_answers_over_a_unix_socket_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let addr = ListenAddr::Unix(dir.path().join("sub/admin.sock"));
        let first = Server::bind(&addr, "test", handler(|_| text(StatusCode::OK, "1"))).await.unwrap();
        drop(first);
        let second = Server::bind(&addr, "test", handler(|_| text(StatusCode::OK, "2"))).await.unwrap();
        let (_, body) = get(&addr, "/", Duration::from_secs(5)).await.unwrap();
        assert_eq!(body, "2");
        drop(second);
    }
}
