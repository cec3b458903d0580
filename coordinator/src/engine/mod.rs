//! The engine: one task that owns every piece of mutable scheduling state (jobs and
//! their next fires, runs in progress, connected workers, timers) and changes it only
//! in response to messages. gRPC handlers, the job watcher and the clock talk to it
//! through [`EngineHandle`]; nothing else holds a lock on scheduling state, so a fire,
//! a worker's death and a result can never interleave half-way.
//!
//! Timers (next fires, shard deadlines, retries, the heartbeat sweep, pending
//! assignments) live in one heap; the loop sleeps until the earliest. Store writes on
//! the fire path (the fire record, which makes each fire happen once) are awaited;
//! run history is written by a background task that coalesces snapshots.

mod adopt;
mod dispatch;
mod runs;
mod workers;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chime_shared::clock::Clock;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{CoordError, Result};
use crate::model::{JobSpec, RunRecord, WorkerView};
use crate::schedule::Compiled;
use crate::store::{JobStore, RunStore, StoredJob};

pub use workers::{Assignment, SessionAccepted, ToWorker, WorkerHello};

/// Session types, for the gRPC edge.
pub mod workers_api {
    pub use super::workers::{Assignment, SessionAccepted, ToWorker, WorkerHello};
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

/// The default `prepare_ahead_ms`: ahead enough to record a thousand fires of one
/// second on a small machine (about 40 ms), short enough that routing decided
/// ahead is still fresh at the instant.
pub const DEFAULT_PREPARE_AHEAD_MS: u64 = 250;

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

/// Messages the engine understands.
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
    Workers(oneshot::Sender<Vec<WorkerView>>),
    States(oneshot::Sender<HashMap<String, TriggerState>>),
    ActiveRun(String, oneshot::Sender<Option<RunRecord>>),
}

/// A cheap handle to the engine task.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
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

    /// A worker session starts.
    pub async fn register(
        &self,
        hello: WorkerHello,
        out: mpsc::Sender<ToWorker>,
    ) -> Result<SessionAccepted> {
        self.ask(|tx| Cmd::Register(hello, out, tx)).await?
    }

    /// A heartbeat of session `session`.
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

    /// Connected workers.
    pub async fn workers(&self) -> Result<Vec<WorkerView>> {
        self.ask(Cmd::Workers).await
    }

    /// Trigger state of every job.
    pub async fn states(&self) -> Result<HashMap<String, TriggerState>> {
        self.ask(Cmd::States).await
    }

    /// A run in progress, if this engine has it.
    pub async fn active_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        self.ask(|tx| Cmd::ActiveRun(run_id.to_owned(), tx)).await
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Fire `job` for tick `at` (generation guards against stale timers); `rearm`:
    /// arm the job's next tick too (not when this is a prepared tick's fallback,
    /// whose next tick is armed already).
    Fire {
        job: String,
        at: i64,
        generation: u64,
        rearm: bool,
    },
    /// Plan and record `job`'s tick `at` ahead of `go_at` (its instant with jitter).
    Prepare {
        job: String,
        at: i64,
        go_at: i64,
        generation: u64,
    },
    /// Send the assignments of a run recorded ahead (its instant came).
    Go(String),
    /// A shard's deadline.
    Deadline(ShardKey),
    /// A failed shard's retry.
    Retry { run_id: String, shard: u32 },
    /// Look for dead workers.
    Sweep,
    /// Try to place pending shards.
    Pending,
    /// Start a buffered fire (its job's previous run ended).
    Buffered {
        job: String,
        at: i64,
        run_id: String,
    },
    /// An adopted shard's worker had time to report it; take it over if it did not.
    Adopt(ShardKey),
}

#[derive(Debug)]
struct JobState {
    spec: JobSpec,
    version: i64,
    compiled: Compiled,
    generation: u64,
    next_fire: Option<i64>,
    last_fire: Option<i64>,
    running: BTreeSet<String>,
    buffered: Option<(i64, String)>,
    /// A fire recorded ahead whose instant has not come (its run id).
    prepared: Option<String>,
    rr: u64,
}

#[derive(Debug)]
struct WorkerState {
    hello: WorkerHello,
    session: u64,
    tx: mpsc::Sender<ToWorker>,
    running: HashSet<(String, u32)>,
    connected_at_ms: i64,
    last_beat_ms: i64,
    last_assigned_ms: i64,
    draining: bool,
}

/// The engine's state (owned by its task).
pub(crate) struct Engine {
    clock: Arc<dyn Clock>,
    opts: EngineOptions,
    jobs: HashMap<String, JobState>,
    runs: HashMap<String, RunRecord>,
    workers: BTreeMap<String, WorkerState>,
    timers: BinaryHeap<Reverse<(i64, u64, Timer)>>,
    timer_seq: u64,
    sessions: u64,
    pending: BTreeSet<(String, u32)>,
    /// Runs recorded ahead of their instant, not sent yet, by run id. Kept out of
    /// `runs` on purpose: nothing that reacts to workers (deaths, heartbeats,
    /// placement) may send them early.
    prepared: HashMap<String, RunRecord>,
    run_store: Arc<dyn RunStore>,
    history: mpsc::UnboundedSender<RunRecord>,
    fence: i64,
    fenced_out: bool,
    /// Cancelled when a fire record says another coordinator leads.
    lost: CancellationToken,
    /// Until then, shards of adopted runs wait for their workers to report them.
    adopt_until: i64,
}

/// Starts the engine of a leader with fencing token `fence`: loads jobs, trigger
/// state and the runs a previous leader left in progress (adopting them), handles
/// missed ticks, then runs until `shutdown`. `lost` is cancelled if a fire record
/// shows that another coordinator leads. Answers its handle and task.
pub async fn start(
    jobs: JobStore,
    run_store: Arc<dyn RunStore>,
    clock: Arc<dyn Clock>,
    opts: EngineOptions,
    fence: i64,
    lost: CancellationToken,
    shutdown: CancellationToken,
) -> Result<(EngineHandle, tokio::task::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(4096);
    let history = spawn_history_writer(run_store.clone(), shutdown.clone());
    let mut engine = Engine {
        clock,
        opts,
        jobs: HashMap::new(),
        runs: HashMap::new(),
        workers: BTreeMap::new(),
        timers: BinaryHeap::new(),
        timer_seq: 0,
        sessions: 0,
        pending: BTreeSet::new(),
        prepared: HashMap::new(),
        run_store,
        history,
        fence,
        fenced_out: false,
        lost,
        adopt_until: 0,
    };
    let (stored, revision) = jobs.list().await?;
    let last = engine.run_store.trigger_state().await?;
    let active = engine.run_store.active_runs().await?;
    // Jobs first (without their missed ticks), then the runs in progress, then the
    // missed ticks: overlap policies see the adopted runs.
    let mut missed = Vec::new();
    for j in stored {
        let name = j.spec.name.clone();
        if let Some(ticks) = engine.put_job(j, last.get(&name).copied(), true) {
            missed.push((name, ticks));
        }
    }
    engine.adopt(active);
    for (name, ticks) in missed {
        engine.misfire(&name, ticks).await;
    }
    engine.schedule(engine.now() + 1_000, Timer::Sweep);
    let handle = EngineHandle { tx };
    spawn_job_watcher(jobs, revision, handle.clone(), shutdown.clone());
    let task = tokio::spawn(engine.run(rx, shutdown));
    Ok((handle, task))
}

impl Engine {
    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn schedule(&mut self, at: i64, t: Timer) {
        self.timer_seq += 1;
        self.timers.push(Reverse((at, self.timer_seq, t)));
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, shutdown: CancellationToken) {
        info!(jobs = self.jobs.len(), "engine running");
        loop {
            let wait = self
                .timers
                .peek()
                .map(|Reverse((at, _, _))| (*at - self.now()).max(0) as u64)
                .unwrap_or(60_000);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(c) => self.handle(c).await,
                    None => break,
                },
                _ = tokio::time::sleep(Duration::from_millis(wait)) => self.due().await,
            }
        }
        info!("engine stopped");
    }

    /// Runs every timer that is due; fires due at the same time go out as one batch.
    async fn due(&mut self) {
        let now = self.now();
        let mut fires = Vec::new();
        let mut early = Vec::new();
        let mut go = Vec::new();
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, t))) = self.timers.pop() else {
                break;
            };
            match t {
                Timer::Fire {
                    job,
                    at,
                    generation,
                    rearm,
                } => {
                    if self.tick_is_live(&job, generation) {
                        fires.push((job, at, rearm));
                    }
                }
                Timer::Prepare {
                    job,
                    at,
                    go_at,
                    generation,
                } => {
                    if self.tick_is_live(&job, generation) {
                        early.push((job, at, go_at, generation));
                    }
                }
                Timer::Go(run_id) => go.push(run_id),
                Timer::Deadline(key) => self.deadline(key),
                Timer::Retry { run_id, shard } => self.retry(&run_id, shard),
                Timer::Sweep => {
                    self.sweep();
                    self.schedule(now + 1_000, Timer::Sweep);
                }
                Timer::Pending => self.place_pending(),
                Timer::Buffered { job, at, run_id } => self.start_buffered(&job, at, run_id).await,
                Timer::Adopt(key) => self.adopt_deadline(key),
            }
        }
        // Fires whose instant is now first, then the ones prepared ahead.
        if !go.is_empty() {
            self.go_prepared(go).await;
        }
        if !fires.is_empty() {
            self.fire_ticks(fires).await;
        }
        if !early.is_empty() {
            self.prepare_ticks(early).await;
        }
    }

    /// Whether a tick armed under `generation` of `job` still stands.
    fn tick_is_live(&self, job: &str, generation: u64) -> bool {
        self.jobs
            .get(job)
            .is_some_and(|j| j.generation == generation && !j.spec.paused)
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Register(hello, tx, reply) => {
                let r = self.register(hello, tx);
                let _ = reply.send(r);
            }
            Cmd::Heartbeat(w, s, running) => self.heartbeat(&w, s, running),
            Cmd::Started(w, s, key, at) => self.started(&w, s, key, at),
            Cmd::Log(key, line) => self.log_line(key, line),
            Cmd::Result(w, s, key, outcome) => self.shard_result(&w, s, key, outcome).await,
            Cmd::Draining(w, s) => self.draining(&w, s),
            Cmd::Closed(w, s) => self.closed(&w, s),
            Cmd::JobPut(j) => {
                self.put_job(j, None, false);
            }
            Cmd::JobDeleted(name) => {
                if self.jobs.remove(&name).is_some() {
                    info!(job = %name, "job deleted");
                }
            }
            Cmd::Trigger(name, params, reply) => {
                let r = self.trigger(&name, params).await;
                let _ = reply.send(r);
            }
            Cmd::Kill(run_id, reply) => {
                let r = self.kill(&run_id);
                let _ = reply.send(r);
            }
            Cmd::Workers(reply) => {
                let _ = reply.send(self.worker_views());
            }
            Cmd::States(reply) => {
                let s = self
                    .jobs
                    .iter()
                    .map(|(n, j)| {
                        (
                            n.clone(),
                            TriggerState {
                                // A tick prepared ahead is next until it goes out.
                                next_fire_ms: j
                                    .prepared
                                    .as_ref()
                                    .and_then(|id| self.prepared.get(id))
                                    .map(|r| r.scheduled_at_ms)
                                    .or(j.next_fire),
                                last_fire_ms: j.last_fire,
                            },
                        )
                    })
                    .collect();
                let _ = reply.send(s);
            }
            Cmd::ActiveRun(id, reply) => {
                let run = self.runs.get(&id).or(self.prepared.get(&id));
                let _ = reply.send(run.cloned());
            }
        }
    }

    /// Adds or replaces a job. At startup (`startup`), answers the ticks missed since
    /// `last`, for the job's misfire policy.
    fn put_job(&mut self, stored: StoredJob, last: Option<i64>, startup: bool) -> Option<Vec<i64>> {
        let name = stored.spec.name.clone();
        if self
            .jobs
            .get(&name)
            .is_some_and(|j| j.version >= stored.version)
        {
            return None;
        }
        // Jobs reach the store through the API (validated) or `etcdctl put` (not):
        // validate again, so a hand-written job cannot take the engine down.
        let compiled = match stored
            .spec
            .validate()
            .and_then(|()| Compiled::of(&stored.spec))
        {
            Ok(c) => c,
            Err(e) => {
                warn!(job = %name, error = %e, "stored job is invalid; not scheduling it");
                return None;
            }
        };
        let now = self.now();
        let prev = self.jobs.remove(&name);
        let last_fire = prev.as_ref().and_then(|p| p.last_fire).or(last);
        let generation = prev.as_ref().map_or(0, |p| p.generation) + 1;
        let was_paused = prev.as_ref().is_some_and(|p| p.spec.paused);
        let mut state = JobState {
            spec: stored.spec,
            version: stored.version,
            compiled,
            generation,
            next_fire: None,
            last_fire,
            running: prev.as_ref().map(|p| p.running.clone()).unwrap_or_default(),
            buffered: prev.as_ref().and_then(|p| p.buffered.clone()),
            prepared: prev.as_ref().and_then(|p| p.prepared.clone()),
            rr: prev.as_ref().map_or(0, |p| p.rr),
        };
        let mut misfired = Vec::new();
        if !state.spec.paused {
            // A resumed job starts from now; at startup, missed ticks are misfires.
            let from = match (startup, last_fire) {
                (true, Some(l)) if !was_paused => l,
                _ => now.max(last_fire.unwrap_or(i64::MIN)),
            };
            if startup && from < now {
                let (ticks, more) = state.compiled.ticks_between(&state.spec, from, now, 10_000);
                misfired = ticks;
                if more {
                    warn!(job = %name, "more than 10,000 missed ticks; the oldest are dropped");
                }
            }
            state.next_fire = match state.compiled {
                Compiled::Delay { delay_ms } if prev.is_none() => {
                    Some(now.max(state.spec.start_at_ms) + delay_ms)
                }
                Compiled::Delay { .. } => prev.as_ref().and_then(|p| p.next_fire),
                _ => state
                    .compiled
                    .next_after(&state.spec, now.max(last_fire.unwrap_or(i64::MIN))),
            };
        }
        let (next, jitter_ms) = (state.next_fire, state.spec.jitter_ms);
        self.jobs.insert(name.clone(), state);
        if let Some(at) = next {
            self.arm_tick(&name, at, generation, jitter_ms);
        }
        (!misfired.is_empty()).then_some(misfired)
    }

    fn worker_views(&self) -> Vec<WorkerView> {
        self.workers
            .iter()
            .map(|(id, w)| WorkerView {
                worker_id: id.clone(),
                group: w.hello.group.clone(),
                handlers: w.hello.handlers.clone(),
                capacity: w.hello.capacity,
                running: w.running.len() as u32,
                labels: w.hello.labels.clone(),
                connected_at_ms: w.connected_at_ms,
                last_heartbeat_ms: w.last_beat_ms,
                draining: w.draining,
            })
            .collect()
    }

    /// Queues a run snapshot for the history writer.
    fn save(&self, run: &RunRecord) {
        let _ = self.history.send(run.clone());
    }
}

/// How long the history writer gathers run snapshots before writing them, ms. A
/// leader that dies meanwhile loses nothing: each fire's run is recorded with the
/// fire, and workers send the results of the last minute again to the next leader.
const HISTORY_COALESCE_MS: u64 = 200;

/// Writes run snapshots to the run store, latest per run, in the background.
fn spawn_history_writer(
    store: Arc<dyn RunStore>,
    shutdown: CancellationToken,
) -> mpsc::UnboundedSender<RunRecord> {
    let (tx, mut rx) = mpsc::unbounded_channel::<RunRecord>();
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => return },
                _ = shutdown.cancelled() => {
                    // Flush what is queued, then stop.
                    let mut last: HashMap<String, RunRecord> = HashMap::new();
                    while let Ok(r) = rx.try_recv() {
                        last.insert(r.run_id.clone(), r);
                    }
                    for r in last.values() {
                        let _ = store.save_run(r).await;
                    }
                    return;
                }
            };
            // Let snapshots gather first: a short run's start and end then cost one
            // write, and the writes of a burst of fires land after the burst went
            // out instead of competing with it for Redis and the CPU.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(HISTORY_COALESCE_MS)) => {}
                _ = shutdown.cancelled() => {}
            }
            let mut batch: HashMap<String, RunRecord> = HashMap::new();
            batch.insert(first.run_id.clone(), first);
            while let Ok(r) = rx.try_recv() {
                batch.insert(r.run_id.clone(), r);
            }
            for r in batch.values() {
                if let Err(e) = store.save_run(r).await {
                    warn!(run_id = %r.run_id, error = %e, "saving run history failed");
                }
            }
        }
    });
    tx
}

/// Follows job definitions in the store and tells the engine, in revision order.
fn spawn_job_watcher(jobs: JobStore, last: i64, engine: EngineHandle, shutdown: CancellationToken) {
    use chime_shared::config::follow::{Followed, follow};
    use chime_shared::config::source::Change;
    tokio::spawn(follow(jobs.source(), last, "jobs", shutdown, move |f| {
        let engine = engine.clone();
        async move {
            match f {
                Followed::Changes(changes) => {
                    for c in changes {
                        match c {
                            Change::Put {
                                key,
                                value,
                                revision,
                            } => {
                                if let Some(name) = key.strip_prefix("jobs/") {
                                    match JobStore::decode(&value, revision) {
                                        Ok(job) => {
                                            let _ = engine.job_put(job).await;
                                        }
                                        Err(e) => {
                                            warn!(job = name, error = %e, "unreadable job written to the store")
                                        }
                                    }
                                }
                            }
                            Change::Delete { key, .. } => {
                                if let Some(name) = key.strip_prefix("jobs/") {
                                    let _ = engine.job_deleted(name).await;
                                }
                            }
                        }
                    }
                }
                // After a compaction: the engine's jobs become exactly the stored
                // ones, including deletions the watch never reported.
                Followed::Reloaded(snapshot) => {
                    let stored = JobStore::jobs_in(&snapshot);
                    if let Ok(held) = engine.states().await {
                        for name in held.keys() {
                            if !stored.iter().any(|j| &j.spec.name == name) {
                                let _ = engine.job_deleted(name).await;
                            }
                        }
                    }
                    for j in stored {
                        let _ = engine.job_put(j).await;
                    }
                }
            }
        }
    }));
}
