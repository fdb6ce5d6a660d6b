//! The small HTTP/1.1 endpoints every Trellis process serves (trellisd's admin, ztunnel's
//! metrics on 15020, readiness on 15021 and admin on 15000): one server loop, one Prometheus
//! renderer. Each process supplies a [`Route`]; this crate owns the sockets. [`client`] is the
//! other side: the GET that the CLI, the lab, the benchmarks and the tests read them with.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub mod client;

/// A response: status, content type, body.
pub type Reply = (StatusCode, &'static str, String);

/// Answers one request from its method, path and query.
pub type Route = Arc<dyn Fn(&Method, &str, Option<&str>) -> Reply + Send + Sync>;

/// The content type of [`render`]'s output.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `route` over HTTP/1.1 on `listener` until the task is aborted; accept errors (out of
/// descriptors, say) are retried after a short pause.
pub async fn serve_routes(listener: TcpListener, route: Route) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, content_type, body) = route(req.method(), req.uri().path(), req.uri().query());
                let response = Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default();
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// The Prometheus (OpenMetrics) text exposition of `registry` (empty if encoding fails).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
