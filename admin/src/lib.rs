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
pub mod limit;

/// A response: status, content type, body.
pub type Reply = (StatusCode, &'static str, String);

/// Answers one request from its method, path and query.
pub type Route = Arc<dyn Fn(&Method, &str, Option<&str>) -> Reply + Send + Sync>;

/// The content type of [`render`]'s output: the Prometheus text format 0.0.4, which every
/// Prometheus scrapes and `promtool check metrics` reads.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

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

/// The Prometheus text exposition (format 0.0.4, [`PROMETHEUS_TEXT`]) of `registry`; empty if
/// encoding fails.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        return String::new();
    }
    openmetrics_to_prometheus(&out)
}

/// Rewrites the OpenMetrics text that `prometheus-client` writes into the Prometheus text
/// format. The samples are the same; the metadata differs: OpenMetrics names a counter family
/// without `_total` (`# TYPE x counter`, sample `x_total`), which the Prometheus parser reads as
/// a family `x` with no samples and a family `x_total` with no help or type; it also has
/// `# UNIT`, `# EOF` and the type `unknown` (Prometheus: `untyped`).
fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, kind)| *kind == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(if prefix == "# TYPE " && text == "unknown" {
                    "untyped"
                } else {
                    text
                });
            }
            None => {
                // A counter's `_created` sample has no place in the Prometheus format.
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                if name.strip_suffix("_created").is_some_and(|f| counters.contains(f)) {
                    continue;
                }
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        who: String,
    }

    #[test]
    fn counters_are_named_with_total_in_their_help_and_type() {
        let mut registry = Registry::with_prefix("trellis");
        let opened = Family::<Labels, Counter>::default();
        opened.get_or_create(&Labels { who: "a".into() }).inc();
        registry.register("tcp_connections_opened", "TCP connections opened", opened);
        registry.register("config_version", "Config version", Gauge::<i64>::default());
        registry.register("build_seconds", "Build time", Histogram::new([0.1, 1.0]));
        let text = render(&registry);
        assert!(
            text.contains("# HELP trellis_tcp_connections_opened_total TCP connections opened.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE trellis_tcp_connections_opened_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("trellis_tcp_connections_opened_total{who=\"a\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE trellis_config_version gauge\n"), "{text}");
        assert!(text.contains("# TYPE trellis_build_seconds histogram\n"), "{text}");
        assert!(text.contains("trellis_build_seconds_bucket{le=\"+Inf\"} 0\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
