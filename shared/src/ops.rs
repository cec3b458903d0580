//! The operational HTTP endpoints every long-running chime process serves:
//! `/livez` (the process runs), `/readyz` (it can do its job: its own check), and
//! `/metrics` (Prometheus text). The coordinator adds its console and JSON API to
//! the same router.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::telemetry;

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
/// A TLS handshake, or a request's headers, must arrive within this; a client that
/// opens a connection and goes quiet is dropped.
const SLOW_CLIENT: Duration = Duration::from_secs(10);
/// On shutdown, how long open connections may finish their requests.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown`: HTTP/1.1 and HTTP/2, over TLS
/// when `tls` is given. Bounded against hostile clients: at most
/// [`MAX_CONNECTIONS`] connections, and a handshake or a request's headers that take
/// longer than 10 s end the connection.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(SLOW_CLIENT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let (builder, acceptor, watcher) = (builder.clone(), acceptor.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
                Some(a) => {
                    let Ok(Ok(tls)) = tokio::time::timeout(SLOW_CLIENT, a.accept(stream)).await
                    else {
                        return;
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
            }
        });
    }
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
    Ok(())
}
