//! The metrics server on `--metrics-bind-address` (default `127.0.0.1:10249`, kube-proxy's).
//!
//! Each component registers its own metrics into one [`Registry`] before the server starts
//! (`register(&mut Registry)` next to the code that updates them: the sync loop's in
//! `daemon::metrics`, health's in [`crate::health`]); names follow kube-proxy where the meaning is
//! the same, ferry's own start with `ferry_`. The server answers:
//!
//! - `/metrics`: Prometheus text format 0.0.4, or OpenMetrics when the scraper asks for it;
//! - `/proxyMode`: the backend's name, as kube-proxy answers its mode;
//! - `/configz`: the effective configuration as JSON;
//! - `/healthz`: `ok` (the metrics server itself is up; ferry's health is on the healthz port).

use std::sync::Arc;

use hyper::StatusCode;
use hyper::header::ACCEPT;
use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::registry::Registry;

use crate::httpd::{self, Handler};

/// The content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encodes the registry: OpenMetrics when `openmetrics`, else Prometheus text 0.0.4.
pub fn encode(registry: &Registry, openmetrics: bool) -> (String, &'static str) {
    let mut out = String::new();
    let (result, content_type) = if openmetrics {
        (text::encode(&mut out, registry), OPENMETRICS_CONTENT_TYPE)
    } else {
        (prometheus_text::encode(&mut out, registry), prometheus_text::CONTENT_TYPE)
    };
    if let Err(e) = result {
        tracing::error!("encoding metrics: {e}");
    }
    (out, content_type)
}

/// The metrics server's handler. `proxy_mode` answers `/proxyMode`, `configz` `/configz`.
pub fn handler(registry: Arc<Registry>, proxy_mode: &'static str, configz: String) -> Handler {
    httpd::handler(move |req| match req.uri.path() {
        "/metrics" => {
            let openmetrics = req
                .headers
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let (body, content_type) = encode(&registry, openmetrics);
            httpd::respond(StatusCode::OK, content_type, body)
        }
        "/proxyMode" => httpd::text(StatusCode::OK, proxy_mode),
        "/configz" => httpd::json(StatusCode::OK, configz.clone()),
        "/healthz" => httpd::text(StatusCode::OK, "ok"),
        _ => httpd::not_found(),
    })
}

/// Finds `name` (with labels, e.g. `x_total{code="200"}`) in Prometheus text and returns its
/// value: for tests and `ferry status`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        (series == name).then(|| value.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::metrics::counter::Counter;

    use super::*;
    use crate::httpd::{ListenAddr, Server};

    #[tokio::test]
    async fn the_server_serves_prometheus_text_and_openmetrics_on_request() {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        registry.register("ferry_things", "Things", c.clone());
        c.inc_by(3);
        let h = handler(Arc::new(registry), "nftables", "{}".into());
        let server = Server::bind(&"127.0.0.1:0".parse().unwrap(), "metrics", h).await.unwrap();
        let addr: ListenAddr = server.addr().parse().unwrap();
        let (status, body) = httpd::get(&addr, "/metrics", Duration::from_secs(5)).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("# TYPE ferry_things_total counter"), "{body}");
        assert_eq!(sample(&body, "ferry_things_total"), Some(3.0));
        let (_, mode) = httpd::get(&addr, "/proxyMode", Duration::from_secs(5)).await.unwrap();
        assert_eq!(mode, "nftables");
        let (status, _) = httpd::get(&addr, "/nothing", Duration::from_secs(5)).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn openmetrics_encoding_ends_with_eof() {
        let registry = Registry::default();
        let (body, ct) = encode(&registry, true);
        assert_eq!(ct, OPENMETRICS_CONTENT_TYPE);
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
