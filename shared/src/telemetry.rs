//! Metric names, in one place so the worker, the coordinator, the console and the
//! docs agree on them (`describe` registers their help texts). Recording goes
//! through the `metrics` facade; `ops::metrics` installs the Prometheus exporter.
//! [`RequestMetricsLayer`] is the tower layer that counts and times the requests
//! of every server edge (gRPC and HTTP).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

/// Items stored by enqueue (label `handler`).
pub const ITEMS_ENQUEUED: &str = "chime_items_enqueued_total";
/// Items handed to a handler (label `handler`).
pub const ITEMS_FIRED: &str = "chime_items_fired_total";
/// Items acknowledged after their handler succeeded (label `handler`).
pub const ITEMS_ACKED: &str = "chime_items_acked_total";
/// Items whose handler failed and that will be retried (label `handler`).
pub const ITEMS_RETRIED: &str = "chime_items_retried_total";
/// Items that failed their last attempt and went to the dead-letter set.
pub const ITEMS_DEAD_LETTERED: &str = "chime_items_dead_lettered_total";
/// Items handed back unprocessed by a draining worker.
pub const ITEMS_RELEASED: &str = "chime_items_released_total";
/// Seconds between an item's due time and its handler starting, first attempts only
/// (a retry waits for its backoff on purpose) (label `handler`).
pub const FIRE_LAG_SECONDS: &str = "chime_fire_lag_seconds";
/// Queue leases taken.
pub const QUEUE_CLAIMS: &str = "chime_queue_claims_total";
/// Claims refused because another consumer held the lease.
pub const LEASE_CONFLICTS: &str = "chime_lease_conflicts_total";
/// Pops refused because the consumer's lease had expired (fencing at work).
pub const STALE_LEASES: &str = "chime_stale_leases_total";
/// Settlements the store refused because the delivery token was stale.
pub const STALE_SETTLEMENTS: &str = "chime_stale_settlements_total";
/// Store calls that failed (label `op`).
pub const STORE_ERRORS: &str = "chime_store_errors_total";
/// Live config changes applied.
pub const CONFIG_APPLIED: &str = "chime_config_changes_applied_total";
/// Live config values refused (label `key`).
pub const CONFIG_REJECTED: &str = "chime_config_rejected_total";
/// Queue layout changes (resizes) applied by this process.
pub const LAYOUT_APPLIED: &str = "chime_queue_layout_changes_total";
/// Items moved between queues by a resize.
pub const ITEMS_MIGRATED: &str = "chime_items_migrated_total";
/// Workers connected to this coordinator.
pub const CONNECTED_WORKERS: &str = "chime_connected_workers";
/// Assignments a worker read after their start-by time and did not start (the
/// session stream was stalled; the coordinator runs them elsewhere).
pub const ASSIGNMENTS_LATE: &str = "chime_assignments_late_total";
/// Seconds between a job's scheduled instant and its fire.
pub const TRIGGER_LAG_SECONDS: &str = "chime_trigger_lag_seconds";
/// Job fires (label `outcome`: fired, skipped).
pub const JOB_FIRES: &str = "chime_job_fires_total";
/// Shard results reported by workers (label `status`).
pub const RUN_RESULTS: &str = "chime_run_results_total";
/// Runs that ended, after their retries (label `status`: succeeded, failed,
/// timed_out, cancelled), on the leader.
pub const RUNS_FINISHED: &str = "chime_runs_finished_total";
/// Live workers per worker group (label `group`), on the leader; a group whose last
/// worker left reads 0.
pub const GROUP_WORKERS: &str = "chime_group_workers";
/// How long each queue's earliest due item has been due, seconds (label `queue`; 0
/// when nothing is due), sampled on the leader: the queue's lag.
pub const QUEUE_OLDEST_DUE_AGE: &str = "chime_queue_oldest_due_age_seconds";
/// Audit entries a coordinator could not write (the changes they describe stand).
pub const AUDIT_WRITE_ERRORS: &str = "chime_audit_write_errors_total";
/// Alert notices by sink and outcome (labels `sink`: webhook, slack, dingtalk,
/// feishu, email; `outcome`: sent, retried, dropped, suppressed).
pub const ALERT_NOTICES: &str = "chime_alert_notices_total";
/// 1 on the leading coordinator, 0 elsewhere.
pub const IS_LEADER: &str = "chime_coordinator_leader";
/// Items waiting per queue (label `queue`), sampled.
pub const QUEUE_DEPTH: &str = "chime_queue_depth";
/// Items in flight per queue (label `queue`), sampled.
pub const QUEUE_IN_FLIGHT: &str = "chime_queue_in_flight";
/// Dead letters per queue (label `queue`), sampled.
pub const QUEUE_DEAD: &str = "chime_queue_dead_letters";
/// Items waiting for a handler per queue (label `queue`), sampled.
pub const QUEUE_WAITING: &str = "chime_items_waiting";
/// Items parked by this worker because no subscriber ran their handler (label
/// `handler`).
pub const ITEMS_PARKED: &str = "chime_items_parked_total";
/// Subscriber streams open on this worker's delivery service.
pub const DELIVERY_SUBSCRIBERS: &str = "chime_delivery_subscribers";
/// Deliveries handed to subscribers, by how they ended (labels `handler`,
/// `outcome`: ack, fail, release, timeout, gone, abandoned).
pub const DELIVERIES: &str = "chime_deliveries_total";

/// Requests a server edge answered (labels `edge`: grpc or http; `route`: the gRPC
/// service, or the HTTP route template; `code`: the HTTP status, or for gRPC the
/// status in the answer's head, which is where a call refused or failed before any
/// message says it, else 0).
pub const REQUESTS: &str = "chime_requests_total";
/// From a request's arrival to its answer's head (labels `edge`, `route`); for a
/// stream, until the stream is open.
pub const REQUEST_SECONDS: &str = "chime_request_duration_seconds";

/// Registers the help text of every metric.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(REQUESTS, "Requests answered, by edge, route and code.");
    describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Request arrival to the head of its answer, by edge and route."
    );
    describe_counter!(ITEMS_ENQUEUED, "Delayed items stored by enqueue.");
    describe_counter!(
        ASSIGNMENTS_LATE,
        "Shard assignments read after their start-by time and left unstarted."
    );
    describe_counter!(ITEMS_FIRED, "Delayed items handed to a handler.");
    describe_counter!(
        ITEMS_ACKED,
        "Delayed items acknowledged after their handler succeeded."
    );
    describe_counter!(
        ITEMS_RETRIED,
        "Delayed items whose handler failed and that will be retried."
    );
    describe_counter!(
        ITEMS_DEAD_LETTERED,
        "Delayed items that failed their last attempt."
    );
    describe_counter!(
        ITEMS_RELEASED,
        "Delayed items handed back by a draining worker."
    );
    describe_histogram!(
        FIRE_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Due time to handler start of delayed items."
    );
    describe_counter!(QUEUE_CLAIMS, "Queue leases taken.");
    describe_counter!(
        LEASE_CONFLICTS,
        "Queue claims refused: another consumer held the lease."
    );
    describe_counter!(
        STALE_LEASES,
        "Pops refused because the consumer's lease had expired."
    );
    describe_counter!(
        STALE_SETTLEMENTS,
        "Settlements refused because the delivery was stale."
    );
    describe_counter!(STORE_ERRORS, "Failed store calls.");
    describe_counter!(CONFIG_APPLIED, "Live config changes applied.");
    describe_counter!(CONFIG_REJECTED, "Live config values refused.");
    describe_counter!(LAYOUT_APPLIED, "Queue layout changes (resizes) applied.");
    describe_counter!(ITEMS_MIGRATED, "Items moved between queues by a resize.");
    describe_gauge!(CONNECTED_WORKERS, "Workers connected to this coordinator.");
    describe_histogram!(
        TRIGGER_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Scheduled instant to fire of jobs."
    );
    describe_counter!(
        JOB_FIRES,
        "Job fires by outcome (fired, skipped, unrecorded: the store refused the record)."
    );
    describe_counter!(RUN_RESULTS, "Shard results reported by workers, by status.");
    describe_counter!(
        RUNS_FINISHED,
        "Runs that ended after their retries, by status."
    );
    describe_gauge!(GROUP_WORKERS, "Live workers per worker group (leader).");
    describe_gauge!(
        QUEUE_OLDEST_DUE_AGE,
        metrics::Unit::Seconds,
        "How long each queue's earliest due item has been due (leader)."
    );
    describe_counter!(
        AUDIT_WRITE_ERRORS,
        "Audit entries that could not be written (the changes stand)."
    );
    describe_counter!(
        ALERT_NOTICES,
        "Alert notices by sink and outcome (sent, retried, dropped, suppressed)."
    );
    describe_counter!(
        crate::trace::SPANS_EXPORTED,
        "Trace spans sent to the OTLP receiver, by outcome (exported, failed)."
    );
    describe_counter!(
        crate::trace::SPANS_DROPPED,
        "Trace spans dropped because the export buffer was full."
    );
    describe_gauge!(IS_LEADER, "1 on the leading coordinator.");
    describe_gauge!(QUEUE_DEPTH, "Items waiting per queue.");
    describe_gauge!(QUEUE_IN_FLIGHT, "Items in flight per queue.");
    describe_gauge!(QUEUE_DEAD, "Dead letters per queue.");
    describe_gauge!(QUEUE_WAITING, "Items waiting for a handler per queue.");
    describe_counter!(
        ITEMS_PARKED,
        "Items parked because no subscriber ran their handler."
    );
    describe_gauge!(
        DELIVERY_SUBSCRIBERS,
        "Subscriber streams open on this worker's delivery service."
    );
    describe_counter!(
        DELIVERIES,
        "Deliveries handed to subscribers, by how they ended."
    );
}

/// Which edge a [`RequestMetricsLayer`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// A gRPC server (the coordinator's, the worker's delivery service).
    Grpc,
    /// An HTTP listener (console, JSON API, probes, `/metrics`).
    Http,
}

impl Edge {
    fn label(self) -> &'static str {
        match self {
            Edge::Grpc => "grpc",
            Edge::Http => "http",
        }
    }
}

/// Names a request's route for the `route` label. It must answer few distinct
/// values whatever a client sends (a route template, a known service, `other`),
/// never a raw path: a scanner would otherwise make a series per guess.
pub type RouteOf = fn(&http::Uri, &http::Extensions) -> String;

/// `path`'s gRPC service when it is one of `known`, else `other`.
pub fn grpc_service<'a>(path: &str, known: &[&'a str]) -> &'a str {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map_or("", |(service, _)| service);
    known
        .iter()
        .copied()
        .find(|k| *k == service)
        .unwrap_or("other")
}

/// Counts every request ([`REQUESTS`]) and times it to its answer's head
/// ([`REQUEST_SECONDS`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestMetricsLayer {
    edge: Edge,
    route: RouteOf,
}

impl RequestMetricsLayer {
    /// Counts `edge`'s requests by `route`.
    pub fn new(edge: Edge, route: RouteOf) -> Self {
        Self { edge, route }
    }
}

impl<S> Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics {
            inner,
            layer: *self,
        }
    }
}

/// The service [`RequestMetricsLayer`] wraps around another.
#[derive(Debug, Clone)]
pub struct RequestMetrics<S> {
    inner: S,
    layer: RequestMetricsLayer,
}

impl<S, B, ResBody> Service<http::Request<B>> for RequestMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let RequestMetricsLayer { edge, route } = self.layer;
        let route = route(req.uri(), req.extensions());
        let started = Instant::now();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let answer = answer.await;
            let code = match &answer {
                Ok(res) if edge == Edge::Grpc => res
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Ok(res) => res.status().as_str().to_owned(),
                // The connection ends without an answer (the server's own error).
                Err(_) => "error".to_owned(),
            };
            metrics::histogram!(REQUEST_SECONDS, "edge" => edge.label(), "route" => route.clone())
                .record(started.elapsed().as_secs_f64());
            metrics::counter!(REQUESTS, "edge" => edge.label(), "route" => route, "code" => code)
                .increment(1);
            answer
        })
    }
}

/// The trace layer of every gRPC server edge (the coordinator's, a worker's
/// delivery service): a debug span per call. Failures are answers like any other
/// there, and headers, which carry tokens, are never recorded.
#[cfg(feature = "server")]
pub fn grpc_trace() -> tower_http::trace::TraceLayer<tower_http::trace::GrpcMakeClassifier> {
    use tower_http::trace::{DefaultMakeSpan, DefaultOnFailure, DefaultOnResponse, TraceLayer};
    TraceLayer::new_for_grpc()
        .make_span_with(DefaultMakeSpan::new().level(tracing::Level::DEBUG))
        .on_response(DefaultOnResponse::new().level(tracing::Level::DEBUG))
        .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG))
}
#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 2] = ["chime.v1.Admin", "grpc.health.v1.Health"];

    #[test]
    fn grpc_routes_are_known_services_or_other() {
        assert_eq!(
            grpc_service("/chime.v1.Admin/ListJobs", &KNOWN),
            "chime.v1.Admin"
        );
        assert_eq!(grpc_service("/chime.v1.Admin", &KNOWN), "other");
        assert_eq!(grpc_service("/x.Guess/Y", &KNOWN), "other");
        assert_eq!(grpc_service("", &KNOWN), "other");
    }

    // Renders through the Prometheus exporter, which only `ops` brings.
    #[cfg(feature = "ops")]
    #[test]
    fn requests_are_counted_by_edge_route_and_code() {
        use tower::ServiceExt;
        fn route(uri: &http::Uri, _: &http::Extensions) -> String {
            grpc_service(uri.path(), &KNOWN).to_owned()
        }
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let svc = RequestMetricsLayer::new(Edge::Grpc, route).layer(tower::service_fn(
            |req: http::Request<()>| async move {
                let mut res = http::Response::new(());
                if req.uri().path().ends_with("/Refused") {
                    res.headers_mut()
                        .insert("grpc-status", "16".parse().unwrap());
                }
                Ok::<_, std::convert::Infallible>(res)
            },
        ));
        metrics::with_local_recorder(&recorder, || {
            rt.block_on(async {
                for path in [
                    "/chime.v1.Admin/Refused",
                    "/chime.v1.Admin/ListJobs",
                    "/a/b",
                ] {
                    let req = http::Request::builder().uri(path).body(()).unwrap();
                    svc.clone().oneshot(req).await.unwrap();
                }
            })
        });
        let text = handle.render();
        for line in [
            r#"chime_requests_total{edge="grpc",route="chime.v1.Admin",code="16"} 1"#,
            r#"chime_requests_total{edge="grpc",route="chime.v1.Admin",code="0"} 1"#,
            r#"chime_requests_total{edge="grpc",route="other",code="0"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
