//! The operational HTTP endpoints every long-running chime process serves:
//! `/livez` (the process runs), `/readyz` (it can do its job: its own check), and
//! `/metrics` (Prometheus text). The coordinator adds its console and JSON API to
//! the same router.
//!
//! [`serve`] is how every chime HTTP listener serves a router: `axum-server` does
//! the connections (TLS handshakes, HTTP/1.1 and HTTP/2, slow-client timeouts,
//! graceful drain), and [`layers`] puts the tower layers every HTTP edge shares in
//! front of the router (tracing, metrics, load shedding over a concurrency limit,
//! a timeout per request).
//!
//! [`free_port`] picks the ports the benches and the test harness give the
//! processes they start.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::MatchedPath;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::telemetry::{self, Edge, RequestMetricsLayer};

/// A readiness check: answers whether the process is ready, with details.
pub type Readiness =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = (bool, serde_json::Value)> + Send>> + Send + Sync>;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and answers its handle.
/// Histograms of seconds get buckets from 1 ms to 60 s.
pub fn metrics() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder already installed (tests): keep ours for rendering.
            let _ = metrics::set_global_recorder(recorder);
            telemetry::describe();
            handle
        })
        .clone()
}

/// `/livez`, `/readyz` and `/metrics`.
pub fn router(ready: Readiness) -> Router {
    let handle = metrics();
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    let (ok, details) = ready().await;
                    let code = if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (code, axum::Json(details)).into_response()
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        handle.render(),
                    )
                }
            }),
        )
}

/// Most HTTP connections open at once; one more is closed as soon as it is
/// accepted (the listener keeps serving the others).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most requests handled at once over all connections of a listener; one more is
/// answered 503 at once (load shedding) rather than queued behind the others.
pub const MAX_IN_FLIGHT: usize = 512;
/// A request not answered within this is answered 503 (its handler is dropped).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A TLS handshake, a connection's first request, or a request's headers must
/// arrive within this; a client that opens a connection and goes quiet is dropped.
const SLOW_CLIENT: Duration = Duration::from_secs(10);
/// On shutdown, how long open connections may finish their requests.
const DRAIN: Duration = Duration::from_secs(5);

/// The `route` label of an HTTP request: the route template it matched (never the
/// raw path, which a client chooses), or `unmatched`.
fn route_of(_: &axum::http::Uri, extensions: &axum::http::Extensions) -> String {
    extensions
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned()
}

/// `router` behind the layers every HTTP edge of chime shares, outermost first: a
/// debug span per request, metrics ([`telemetry::REQUESTS`]), load shedding (503
/// past [`MAX_IN_FLIGHT`] requests at once), and a timeout per request (503 after
/// [`REQUEST_TIMEOUT`]). Applied per route, so metrics see the matched route;
/// the concurrency limit is one for the whole router all the same.
pub fn layers(router: Router) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(
                // Failures (5xx, e.g. a probe saying "not ready") are answers, not
                // errors of the listener: debug like the rest. Headers are never
                // recorded (they carry tokens).
                TraceLayer::new_for_http()
                    .make_span_with(DefaultMakeSpan::new().level(Level::DEBUG))
                    .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                    .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
            )
            .layer(RequestMetricsLayer::new(Edge::Http, route_of))
            .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded: too many requests at once, retry later",
                )
            }))
            .load_shed()
            .layer(GlobalConcurrencyLimitLayer::new(MAX_IN_FLIGHT))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::SERVICE_UNAVAILABLE,
                REQUEST_TIMEOUT,
            )),
    )
}

type Serving = Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// Serves `router` behind [`layers`] on `listener` until `shutdown`: HTTP/1.1 and
/// HTTP/2, over TLS when `tls` is given (its ALPN offers both). Bounded against
/// hostile clients: at most [`MAX_CONNECTIONS`] connections, and a handshake, a
/// first request or a request's headers that take longer than 10 s end the
/// connection. On shutdown the listener closes at once and open connections get
/// 5 s to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = layers(router);
    let handle = axum_server::Handle::<SocketAddr>::new();
    let mut server = axum_server::Server::<SocketAddr>::from_listener(listener)
        .handle(handle.clone())
        .first_request_timeout(SLOW_CLIENT)
        .accept_error_handler(|peer, e| match peer {
            // The listener itself (out of file descriptors and the like); the
            // server waits a moment before accepting again.
            None => tracing::warn!(error = %e, "accept failed"),
            // One connection: a failed handshake, or one over the cap.
            Some(peer) => tracing::debug!(%peer, error = %e, "connection dropped"),
        });
    server
        .http_builder()
        .http1()
        .header_read_timeout(SLOW_CLIENT);
    server
        .http_builder()
        .http2()
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .max_concurrent_streams(256);
    // axum-server has no connection cap: a connection over it gets no service,
    // which closes it before anything is read.
    let open = handle.clone();
    let make = tower::service_fn(move |_: SocketAddr| {
        let answer = if open.connection_count() >= MAX_CONNECTIONS {
            Err(std::io::Error::other("over the connection cap"))
        } else {
            Ok(router.clone())
        };
        std::future::ready(answer)
    });
    let mut serving: Serving = match tls {
        None => Box::pin(server.serve(make)),
        Some(config) => {
            let acceptor = RustlsAcceptor::new(RustlsConfig::from_config(config))
                .handshake_timeout(SLOW_CLIENT);
            Box::pin(server.acceptor(acceptor).serve(make))
        }
    };
    tokio::select! {
        done = &mut serving => return done,
        _ = shutdown.cancelled() => handle.graceful_shutdown(Some(DRAIN)),
    }
    serving.await
}

/// A free loopback port for a process a bench or a test starts, chosen **below the
/// kernel's ephemeral range** (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999
/// by default) when there is room: a port bound and released there could be handed
/// to any outgoing connection before its process binds it ("address already in
/// use", seen in `bench chaos`), one below it only to an explicit bind. Falls back
/// to a port the kernel picks.
///
/// A port is also **reserved on this machine** for [`PORT_HOLD`]: a file per port
/// under `$TMPDIR/chime-ports/`, created with `create_new`, so two processes picking
/// at the same moment (tests run in parallel, each starting its own servers) never
/// get the same one. Without it, two random picks in the same ~22,000 ports met once
/// in a CI run: a bench's client reached another test's coordinator on its port
/// ("not the leader", naming a leader of a cluster the bench never started).
pub fn free_port() -> std::io::Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    const FROM: u16 = 10_000;
    if low > FROM + 1_000 {
        for _ in 0..500 {
            let port = fastrand::u16(FROM..low);
            if reserve_port(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if reserve_port(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(
        "no free loopback port: every pick was reserved or bound",
    ))
}

/// How long a port [`free_port`] handed out stays reserved for the process that
/// asked: long enough for any test or bench to start its process and bind it (a
/// process restarted on the same port keeps it bound, or rebinds it, itself).
pub const PORT_HOLD: Duration = Duration::from_secs(30 * 60);

/// Reserves `port` for [`PORT_HOLD`]: true when no other pick holds it. A stale
/// reservation (older than the hold) is taken over; a directory that cannot be
/// written reserves nothing but does not stop the pick (the bind check remains).
fn reserve_port(port: u16) -> bool {
    let dir = std::env::temp_dir().join("chime-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let file = dir.join(port.to_string());
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
    };
    match create() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let stale = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > PORT_HOLD);
            // Remove then create_new: of two processes taking over the same stale
            // file, only one create succeeds.
            stale && std::fs::remove_file(&file).is_ok() && create().is_ok()
        }
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn ready() -> Readiness {
        Arc::new(|| Box::pin(async { (true, serde_json::json!({})) }))
    }

    #[tokio::test]
    async fn requests_past_the_concurrency_limit_are_shed_with_503() {
        // Every slot held by a request that waits until the gate closes.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let wait = gate.clone();
        let app = layers(Router::new().route(
            "/slow",
            get(move || {
                let wait = wait.clone();
                async move {
                    let _ = wait.acquire().await;
                    "done"
                }
            }),
        ));
        let get = |path: &str| {
            app.clone()
                .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
        };
        let held: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| tokio::spawn(get("/slow")))
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let shed = get("/slow").await.unwrap();
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        gate.close();
        for h in held {
            assert_eq!(h.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        // The slots came back.
        assert_eq!(get("/slow").await.unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn serves_plain_http_and_drains_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, router(ready()), None, stop.clone()));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        conn.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still listening"
        );
    }

    #[test]
    fn ports_handed_out_are_reserved_so_no_two_picks_share_one() {
        // Picks from several threads at once, as parallel tests make them.
        let picks: Vec<u16> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..25).map(|_| free_port().unwrap()).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<_> = picks.iter().collect();
        assert_eq!(distinct.len(), picks.len(), "a port was handed out twice");
        for port in picks {
            assert!(!reserve_port(port), "port {port} is not reserved");
        }
    }
}
