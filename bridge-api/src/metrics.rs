//! Prometheus metrics of bridge-api: requests by route and status, latency, the open SSE tails
//! and what the SSE drop policy threw away.
//!
//! The route label is the matched route template (`/v1/devices/{id}/messages`), never the raw
//! path, so device ids cannot explode the label space; the method label is one of the standard
//! methods or `other`, for the same reason.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TailLabels {
    kind: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s: from a local publish to a device ACK near the timeout cap.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The metric handles, shared by every request.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    sse_dropped: Counter,
    sse_tails: Family<TailLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("devgate_bridge");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route template, method and status",
            requests.clone(),
        );
        let latency = HistogramFamily::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head, by route template",
            latency.clone(),
        );
        let sse_dropped = Counter::default();
        registry.register(
            "sse_dropped_events",
            "Uplink events dropped because an SSE client read too slowly",
            sse_dropped.clone(),
        );
        let sse_tails = Family::<TailLabels, Gauge>::default();
        registry.register(
            "sse_tails",
            "Open SSE uplink tails, by kind (device: one device, all: `-`)",
            sse_tails.clone(),
        );
        // Both kinds from the start, so a dashboard sees 0 rather than no series.
        for kind in ["device", "all"] {
            let _ = sse_tails.get_or_create(&TailLabels { kind });
        }
        Metrics {
            registry: Arc::new(registry),
            requests,
            latency,
            sse_dropped,
            sse_tails,
        }
    }

    /// The registry, for `/metrics`.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Counts events the SSE drop policy discarded.
    pub fn sse_dropped(&self, n: u64) {
        self.sse_dropped.inc_by(n);
    }

    /// The gauge of open tails of one kind (`device` or `all`).
    pub fn sse_tails(&self, every_device: bool) -> Gauge {
        let kind = if every_device { "all" } else { "device" };
        self.sse_tails.get_or_create(&TailLabels { kind }).clone()
    }
}

/// The `method` label of a request: the standard methods by name, anything else `other`.
///
/// HTTP lets a client send any token as its method, and this middleware runs before
/// authentication and for unknown routes, so the raw method as a label would let anyone create
/// series without bound (`curl -X AAAA1`, `-X AAAA2`, ...) until Prometheus or this process runs
/// out of memory.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Middleware recording every request's route, status and latency.
pub async fn track(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics
        .latency
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_methods_keep_their_name_and_the_rest_are_other() {
        for (method, label) in [
            (Method::GET, "GET"),
            (Method::DELETE, "DELETE"),
            (Method::PATCH, "PATCH"),
            (Method::TRACE, "TRACE"),
        ] {
            assert_eq!(method_label(&method), label);
        }
        for raw in [&b"AAAA1"[..], b"get", b"PROPFIND"] {
            let method = Method::from_bytes(raw).expect("method token");
            assert_eq!(method_label(&method), "other", "{method}");
        }
    }
}
