//! Job handlers: what a worker runs when the coordinator assigns it a shard.
//!
//! A handler gets a [`JobContext`] (its shard index and total, params, attempt, a
//! cancellation token that fires on timeout, kill or drain, and a logger whose lines
//! reach the run history) and returns its output, or an error (the coordinator
//! retries the shard if the job allows it).

use std::future::Future;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::handler::HandlerError;

/// One shard to run.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// Run id.
    pub run_id: String,
    /// Fire id: `<job>@<scheduled instant>` for scheduled fires.
    pub fire_id: String,
    /// Job name.
    pub job: String,
    /// Job params.
    pub params: String,
    /// This shard's params (fixed sharding).
    pub shard_params: String,
    /// This shard's index.
    pub shard_index: u32,
    /// Shards in the run.
    pub shard_total: u32,
    /// Assignment number (1-based).
    pub attempt: u32,
    /// The tick this fire was scheduled for, Unix ms.
    pub scheduled_at_ms: i64,
    /// Deadline, coordinator clock, Unix ms (0: none).
    pub deadline_ms: i64,
    pub(crate) cancel: CancellationToken,
    pub(crate) log: LogSink,
    pub(crate) trace: Option<chime_shared::trace::TraceContext>,
}

impl JobContext {
    /// This shard's trace span (a child of the fire's), when the coordinator
    /// traces the run: the parent of the handler's own spans.
    pub fn trace_context(&self) -> Option<chime_shared::trace::TraceContext> {
        self.trace
    }
    /// Fires when the shard must stop (timeout, kill, overlap policy, drain).
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Sends a line to the run history (its last lines are kept per shard).
    pub fn log(&self, line: impl Into<String>) {
        (self.log.0)(line.into());
    }
}

/// Where a shard's log lines go: the session puts each straight onto its outbound
/// queue, in order with the shard's start and result (no task per shard to forward
/// them: at thousands of shards a second, that task was a spawn and a channel each).
#[derive(Clone)]
pub(crate) struct LogSink(pub(crate) std::sync::Arc<dyn Fn(String) + Send + Sync>);

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

/// Runs shards of one handler name. Implemented for async closures
/// `Fn(JobContext) -> impl Future<Output = Result<String, HandlerError>>`.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Runs one shard; answers its output.
    async fn run(&self, ctx: JobContext) -> Result<String, HandlerError>;
}

#[async_trait]
impl<F, Fut> JobHandler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, HandlerError>> + Send + 'static,
{
    async fn run(&self, ctx: JobContext) -> Result<String, HandlerError> {
        (self)(ctx).await
    }
}
