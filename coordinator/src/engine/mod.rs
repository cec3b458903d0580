//! The engine: the scheduling core of the leader and the thin async driver around it.
//!
//! - [`machine`] is the core, a pure state machine: it owns every piece of
//!   scheduling state (jobs and their ticks, runs, workers, timers) and changes it
//!   only when it is given an input (a worker message, a job change, an admin call,
//!   the timers coming due, a store answer) and the time; it answers effects (send
//!   this assignment, record these fires, check the fence, save this run, answer
//!   this call). No I/O, no tasks, no clock: its promises are unit tests
//!   (`tests.rs`) and a deterministic simulation (`sim.rs`).
//! - `driver.rs` is the only async part: it turns [`EngineHandle`] calls into
//!   inputs, sleeps until the core's next timer, performs the effects (worker
//!   session channels, the run store, the background history writer) and feeds
//!   store answers back. gRPC handlers, the job watcher and the clock reach the
//!   scheduling state only through it, so a fire, a worker's death and a result
//!   never interleave half-way.
//!
//! The core's concerns, one file each: `jobs.rs` (jobs and their ticks),
//! `dispatch.rs` (planning, recording and sending fires), `routing.rs` (which worker
//! a shard goes to: a pure function), `runs.rs` (results, deadlines, retries, kill,
//! run end), `workers.rs` (sessions, heartbeats, capacity, death, takeover),
//! `adopt.rs` (a new leader taking over runs in progress), `flows.rs` (workflow
//! runs: firing nodes, their ends, kill, reconcile after adoption, rerun).

mod adopt;
mod dispatch;
mod driver;
mod flows;
mod jobs;
mod machine;
mod routing;
mod runs;
mod workers;

#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use chime_shared::clock::Clock;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{CoordError, Result};
use crate::model::{RunRecord, WorkerView};
use crate::store::{JobStore, RunStore, StoredJob};

pub use workers::{Assignment, EndReason, SessionAccepted, ToWorker, WorkerHello};

/// Session types, for the gRPC edge.
pub mod workers_api {
    pub use super::workers::{Assignment, EndReason, SessionAccepted, ToWorker, WorkerHello};
}

/// Names one shard attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardKey {
    /// Run id.
    pub run_id: String,
    /// Shard index.
    pub shard: u32,
    /// Assignment number.
    pub attempt: u32,
}

/// How a shard attempt ended, as a worker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardOutcome {
    /// Success, with the handler's output.
    Succeeded(String),
    /// Failure, with the error.
    Failed(String),
    /// Stopped (cancel or drain).
    Cancelled(String),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Heartbeat interval told to workers, ms.
    pub heartbeat_interval_ms: u64,
    /// A worker missing this many heartbeats is dead.
    pub dead_after_beats: u32,
    /// This coordinator's gRPC address, as workers should reach it.
    pub advertise: String,
    /// Scheduled ticks are planned and recorded this long before their instant, so
    /// that at the instant only the assignments go out (0: record at the instant).
    /// At most [`MAX_PREPARE_AHEAD_MS`], which stays below any adoption grace.
    pub prepare_ahead_ms: u64,
}

/// The longest `prepare_ahead_ms`. A new leader adopting a fire recorded ahead
/// sends it no earlier than its adoption grace (at least 2 s) and its instant.
pub const MAX_PREPARE_AHEAD_MS: u64 = 1_000;

/// The default `prepare_ahead_ms`: ahead enough to record ten thousand fires of
/// one second on a small machine (about 300 ms with the history writes of the
/// second before competing), and a job whose last run still goes then gets a
/// second look 250 ms before the instant. Routing decided ahead is checked again
/// at the instant (a worker gone or full is replaced).
pub const DEFAULT_PREPARE_AHEAD_MS: u64 = 600;

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 2_000,
            dead_after_beats: 3,
            advertise: String::new(),
            prepare_ahead_ms: DEFAULT_PREPARE_AHEAD_MS,
        }
    }
}

/// A job's trigger state, for the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TriggerState {
    /// Next fire, Unix ms.
    pub next_fire_ms: Option<i64>,
    /// Last scheduled instant fired, Unix ms.
    pub last_fire_ms: Option<i64>,
}

/// Messages the engine's driver understands.
pub(crate) enum Cmd {
    Register(
        WorkerHello,
        mpsc::Sender<ToWorker>,
        oneshot::Sender<Result<SessionAccepted>>,
    ),
    Heartbeat(String, u64, Vec<ShardKey>),
    Started(String, u64, ShardKey, i64),
    Log(ShardKey, String),
    Result(String, u64, ShardKey, ShardOutcome),
    Draining(String, u64),
    Closed(String, u64),
    JobPut(StoredJob),
    JobDeleted(String),
    Trigger(String, Option<String>, oneshot::Sender<Result<RunRecord>>),
    Kill(String, oneshot::Sender<Result<RunRecord>>),
    Rerun(Box<RunRecord>, String, oneshot::Sender<Result<RunRecord>>),
    Workers(oneshot::Sender<Vec<WorkerView>>),
    States(oneshot::Sender<HashMap<String, TriggerState>>),
    ActiveRun(String, oneshot::Sender<Option<RunRecord>>),
    /// Stop and hand over (see [`EngineHandle::hand_over`]).
    HandOver(oneshot::Sender<bool>),
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

/// A cheap handle to the engine task.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
}

impl EngineHandle {
    pub(crate) async fn send(&self, cmd: Cmd) -> Result<()> {
        self.tx
            .send(cmd)
            .await
            .map_err(|_| CoordError::Unavailable("the engine stopped".into()))
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await
            .map_err(|_| CoordError::Unavailable("the engine stopped".into()))
    }

    /// A worker session starts. `out` carries what the engine sends the worker; the
    /// engine drops it when the session ends, after an [`ToWorker::End`] saying why.
    pub async fn register(
        &self,
        hello: WorkerHello,
        out: mpsc::Sender<ToWorker>,
    ) -> Result<SessionAccepted> {
        self.ask(|tx| Cmd::Register(hello, out, tx)).await?
    }

    /// A heartbeat of session `session`, with the shards the worker runs.
    pub async fn heartbeat(
        &self,
        worker: &str,
        session: u64,
        running: Vec<ShardKey>,
    ) -> Result<()> {
        self.send(Cmd::Heartbeat(worker.to_owned(), session, running))
            .await
    }

    /// A shard started on the worker.
    pub async fn started(
        &self,
        worker: &str,
        session: u64,
        key: ShardKey,
        at_ms: i64,
    ) -> Result<()> {
        self.send(Cmd::Started(worker.to_owned(), session, key, at_ms))
            .await
    }

    /// A log line of a shard.
    pub async fn log(&self, key: ShardKey, line: String) -> Result<()> {
        self.send(Cmd::Log(key, line)).await
    }

    /// A shard attempt ended.
    pub async fn result(
        &self,
        worker: &str,
        session: u64,
        key: ShardKey,
        outcome: ShardOutcome,
    ) -> Result<()> {
        self.send(Cmd::Result(worker.to_owned(), session, key, outcome))
            .await
    }

    /// The worker announced a drain.
    pub async fn draining(&self, worker: &str, session: u64) -> Result<()> {
        self.send(Cmd::Draining(worker.to_owned(), session)).await
    }

    /// The session ended.
    pub async fn closed(&self, worker: &str, session: u64) -> Result<()> {
        self.send(Cmd::Closed(worker.to_owned(), session)).await
    }

    /// A job was written (by the admin API or seen by the watcher).
    pub async fn job_put(&self, job: StoredJob) -> Result<()> {
        self.send(Cmd::JobPut(job)).await
    }

    /// A job was deleted.
    pub async fn job_deleted(&self, name: &str) -> Result<()> {
        self.send(Cmd::JobDeleted(name.to_owned())).await
    }

    /// Fires a job now.
    pub async fn trigger(&self, name: &str, params: Option<String>) -> Result<RunRecord> {
        self.ask(|tx| Cmd::Trigger(name.to_owned(), params, tx))
            .await?
    }

    /// Cancels every unfinished shard of a run.
    pub async fn kill(&self, run_id: &str) -> Result<RunRecord> {
        self.ask(|tx| Cmd::Kill(run_id.to_owned(), tx)).await?
    }

    /// Starts finished workflow run `old` (as stored) again from node `node`:
    /// that node and what follows it run again, the rest keep their results.
    pub async fn rerun(&self, old: RunRecord, node: &str) -> Result<RunRecord> {
        self.ask(|tx| Cmd::Rerun(Box::new(old), node.to_owned(), tx))
            .await?
    }

    /// Connected workers.
    pub async fn workers(&self) -> Result<Vec<WorkerView>> {
        self.ask(Cmd::Workers).await
    }

    /// Trigger state of every job.
    pub async fn states(&self) -> Result<HashMap<String, TriggerState>> {
        self.ask(Cmd::States).await
    }

    /// A run this engine has, or a finished run whose last snapshot is not in the
    /// store yet: what the store says can be older, never newer.
    pub async fn active_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        self.ask(|tx| Cmd::ActiveRun(run_id.to_owned(), tx)).await
    }

    /// Stops the engine for a graceful hand-over: nothing more is sent, every
    /// session ends, every run snapshot is written, then a note tells the next
    /// leader that the records are exact (`RunStore::hand_over`), so it takes the
    /// runs in progress over at once instead of waiting out the adoption grace.
    /// Answers whether the note was left (not when a newer leader was seen, or the
    /// store failed: the next leader then adopts with the grace, as after a crash).
    pub async fn hand_over(&self) -> Result<bool> {
        self.ask(Cmd::HandOver).await
    }
}

/// A leader's term, as its engine starts.
#[derive(Debug, Default)]
pub struct Term {
    /// Its fencing token.
    pub fence: i64,
    /// What the previous leader handed over (`FenceInstall::HandedOver`): the runs
    /// it recorded ahead and never sent. `None`: it left no note.
    pub handover: Option<Vec<String>>,
    /// A follower's warm copy of the jobs (see [`crate::warm`]) to start from
    /// instead of listing them. `None`: list them.
    pub warm: Option<crate::store::Preloaded>,
}

/// Starts the engine of a leader for `term`: loads jobs, trigger state and the
/// runs a previous leader left in progress (adopting them), handles missed ticks,
/// then runs until `shutdown` (or a hand-over). `lost` is cancelled if a fire
/// record shows that another coordinator leads. Answers its handle and task.
pub async fn start(
    jobs: JobStore,
    run_store: Arc<dyn RunStore>,
    clock: Arc<dyn Clock>,
    opts: EngineOptions,
    term: Term,
    lost: CancellationToken,
    shutdown: CancellationToken,
) -> Result<(EngineHandle, tokio::task::JoinHandle<()>)> {
    driver::start(jobs, run_store, clock, opts, term, lost, shutdown).await
}
