//! `chime-coordinator`: fires jobs and hands their shards to workers.
//!
//! - [`model`]: jobs, runs, shards (the domain; no generated types).
//! - [`schedule`]: cron (seconds, time zones, DST), fixed rate/delay, once, manual.
//! - [`store`]: job definitions (etcd or memory), run history and fire records
//!   (Redis or memory).
//! - [`engine`]: the one task that owns scheduling state: triggers, routing, shard
//!   assignment, results, retries, timeouts, failover, overlap and misfire policies.
//! - [`grpc`]: the worker gateway and the admin API, thin adapters over the engine
//!   and the job store.
//!
//! [`serve`] is what the binary calls: it takes a bound listener, built stores and
//! a shutdown future. Architecture invariant: nothing here reads config files,
//! binds ports by itself or installs a logger.

pub mod engine;
pub mod error;
pub mod grpc;
pub mod model;
pub mod schedule;
pub mod store;

use std::sync::Arc;

use chime_shared::clock::Clock;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::{CoordError, Result};

/// What a coordinator needs to run.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Job definitions.
    pub jobs: store::JobStore,
    /// Run history and fire records.
    pub runs: Arc<dyn store::RunStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Engine settings.
    pub options: engine::EngineOptions,
}

/// Runs a coordinator on `listener` (gRPC: worker gateway and admin API) until
/// `shutdown` fires.
pub async fn serve(deps: Deps, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let (engine, task) = engine::start(
        deps.jobs.clone(),
        deps.runs.clone(),
        deps.clock.clone(),
        deps.options.clone(),
        0,
        shutdown.clone(),
    )
    .await?;
    let server = grpc::server(engine, deps.jobs, deps.runs, deps.clock);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stop = shutdown.clone();
    server
        .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
        .await
        .map_err(|e| CoordError::Unavailable(format!("grpc server: {e}")))?;
    shutdown.cancel();
    let _ = task.await;
    Ok(())
}
