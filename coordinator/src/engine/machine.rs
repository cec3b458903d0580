//! The engine's core: a pure state machine. [`Machine::step`] takes one [`Input`]
//! and the time, changes the scheduling state, and answers [`Effect`]s for the
//! driver to perform. It does no I/O, spawns nothing and reads no clock; its only
//! randomness (jitter, random routing, manual run ids) comes from a seeded
//! generator. Logs and metrics are written from here: they observe, never decide.
//!
//! **One store request at a time.** Recording fires and checking the fencing token
//! need the store's answer before the engine can go on. Such a request is always
//! the last effect of a step; the machine then waits for [`Input::Answer`], and
//! inputs arriving meanwhile are queued and handled after it, in order. So a fire,
//! a worker's death and a result never interleave half-way (as when the engine
//! awaited the store inline), and what continues after an answer (the next slice of
//! a big batch, the ticks due after a fence check) is kept as data in `work`.
//!
//! State is split by concern: jobs and their ticks (`jobs`), runs ([`RunBook`]:
//! active, prepared ahead, waiting for a worker), workers ([`WorkerBook`]), and the
//! timers ([`Timers`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};

use tracing::{info, warn};

use super::dispatch::{Fire, Recording};
use super::jobs::JobState;
use super::workers::{EndReason, SessionAccepted, ToWorker, WorkerHello};
use super::{EngineOptions, ShardKey, ShardOutcome, TriggerState};
use crate::error::Result;
use crate::model::{RunRecord, WorkerView};
use crate::store::{FireAnswer, FireRecord, StoredJob};

/// Names a call whose answer comes back as [`Effect::Reply`].
pub(crate) type CallId = u64;

/// What the machine is told.
#[derive(Debug)]
pub(crate) enum Input {
    /// The leader starts: the stored jobs, the last instant fired per job, and the
    /// runs a previous leader left in progress.
    Start {
        jobs: Vec<StoredJob>,
        last: HashMap<String, i64>,
        active: Vec<RunRecord>,
        /// The previous leader handed over (`FenceInstall::HandedOver`): the runs
        /// it recorded ahead and never sent. `None`: it left no note.
        handover: Option<Vec<String>>,
        /// Plans a follower made ahead, one per job of `jobs` in its order (empty:
        /// none; see `schedule::Planned`); a start uses those that still stand
        /// instead of planning again.
        ahead: Vec<Option<crate::schedule::Planned>>,
        /// The ended runs of nodes that `active`'s workflow runs do not show as
        /// ended (their snapshots are written in the background and may be
        /// behind; see `flows.rs`).
        ended_nodes: Vec<RunRecord>,
    },
    /// The earliest timer may be due (the driver slept until [`Machine::next_wake`]).
    Timers,
    /// A worker opens a session.
    Register(CallId, WorkerHello),
    /// A heartbeat, with the shards the worker runs.
    Heartbeat {
        worker: String,
        session: u64,
        running: Vec<ShardKey>,
    },
    /// A shard started on its worker (worker clock).
    Started {
        worker: String,
        key: ShardKey,
        at_ms: i64,
    },
    /// A log line of a shard.
    Log(ShardKey, String),
    /// A shard attempt ended.
    Result {
        worker: String,
        key: ShardKey,
        outcome: ShardOutcome,
    },
    /// The worker stops taking work.
    Draining { worker: String, session: u64 },
    /// The session's stream ended.
    Closed { worker: String, session: u64 },
    /// A job was written.
    JobPut(StoredJob),
    /// A job was deleted.
    JobDeleted(String),
    /// Fire a job now (admin).
    Trigger(CallId, String, Option<String>),
    /// Kill a run (admin).
    Kill(CallId, String),
    /// Start a finished workflow run again from a node (admin): the run as
    /// stored, and the node.
    Rerun(CallId, Box<RunRecord>, String),
    /// An assignment the session could not take (its channel was full or closed).
    Undelivered { session: u64, key: ShardKey },
    /// The answer to the request the machine waits for.
    Answer(Answer),
    /// Go on with the work the last step left (see [`Machine::busy`]).
    Continue,
}

/// What the machine asks the driver to do, in order.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Send a message to a worker session.
    Send { session: u64, msg: ToWorker },
    /// End a session; the worker is told why (unless it closed the stream itself).
    End { session: u64, reason: EndReason },
    /// Save a run snapshot to the history (in the background, coalesced).
    Save(RunRecord),
    /// Save a run before anything after this effect happens.
    SaveNow(RunRecord),
    /// Answer a call.
    Reply(CallId, Reply),
    /// Another coordinator leads: this engine must stop.
    LostLead,
    /// A store request; its answer must come back as [`Input::Answer`]. Always the
    /// last effect of a step.
    Request(Request),
}

/// A store request.
#[derive(Debug)]
pub(crate) enum Request {
    /// Record these fires with this fencing token (`RunStore::record_fires`).
    Record { fence: i64, fires: Vec<FireRecord> },
    /// Is this fencing token still the newest (`RunStore::fence_holds`)?
    CheckFence { fence: i64 },
}

/// A store answer (errors as text: the machine only logs them).
#[derive(Debug)]
pub(crate) enum Answer {
    /// To [`Request::Record`].
    Record(std::result::Result<Vec<FireAnswer>, String>),
    /// To [`Request::CheckFence`].
    Fence(std::result::Result<bool, String>),
}

/// The answer to a call.
#[derive(Debug)]
pub(crate) enum Reply {
    /// To [`Input::Register`].
    Registered(Result<SessionAccepted>),
    /// To [`Input::Trigger`] and [`Input::Kill`].
    Run(Result<RunRecord>),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
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
    /// Send the assignments of runs recorded ahead (their instant came). One
    /// timer carries every run of an instant recorded in one request: at 10,000
    /// jobs on a second, popping 10,000 timers was milliseconds every fire waited.
    Go(Vec<String>),
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
    /// Look at a workflow run's pending nodes again (a node's fire could not be
    /// recorded).
    Advance(String),
}

/// The timers, earliest first (ties in the order they were armed).
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(i64, u64, Timer)>>,
    seq: u64,
}

impl Timers {
    pub(super) fn schedule(&mut self, at: i64, t: Timer) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, t)));
    }

    /// The earliest timer's instant.
    pub(super) fn next(&self) -> Option<i64> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The earliest timer, if it is due at `now`.
    fn pop_due(&mut self, now: i64) -> Option<Timer> {
        if self.next()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse((_, _, t))| t)
    }

    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (i64, &Timer)> {
        self.heap.iter().map(|Reverse((at, _, t))| (*at, t))
    }
}

/// Runs, by where they are in their life.
#[derive(Debug, Default)]
pub(super) struct RunBook {
    /// Runs whose assignments went out (or wait for a worker), by run id. Hash
    /// maps, as `prepared` and the job map: nothing depends on their order, and at
    /// 10,000 fires on one instant the B-trees' string compares and moved records
    /// were a third of the time the last fire waited.
    pub(super) active: HashMap<String, RunRecord>,
    /// Runs recorded ahead of their instant, not sent yet, by run id. Kept out of
    /// `active` on purpose: nothing that reacts to workers (deaths, heartbeats,
    /// placement) may send them early.
    pub(super) prepared: HashMap<String, RunRecord>,
    /// Runs recorded ahead in the current request's answer, with when they go:
    /// their [`Timer::Go`]s are armed once the whole answer is settled.
    pub(super) going: Vec<(i64, String)>,
    /// Shards waiting for a worker.
    pub(super) pending: BTreeSet<(String, u32)>,
    /// When the earliest armed [`Timer::Pending`] fires (one is enough).
    pub(super) pending_wake: Option<i64>,
    /// Until then, shards of adopted runs wait for their workers to report them.
    pub(super) adopt_until: i64,
    /// The previous leader handed over: the shards of adopted runs it left waiting
    /// for a worker were never sent, so they need not wait out the grace.
    pub(super) handed_over: bool,
}

/// A shard a worker holds (as far as the engine knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Held {
    /// Its attempt.
    pub(super) attempt: u32,
    /// When it was sent (or reported at registration), ms.
    pub(super) since: i64,
    /// Heartbeats in a row that left it out.
    pub(super) missed: u32,
}

#[derive(Debug)]
pub(super) struct WorkerState {
    pub(super) hello: WorkerHello,
    pub(super) session: u64,
    /// Shards it runs, by (run, shard).
    pub(super) running: BTreeMap<(String, u32), Held>,
    pub(super) connected_at_ms: i64,
    pub(super) last_beat_ms: i64,
    pub(super) last_assigned_ms: i64,
    pub(super) draining: bool,
}

/// Connected workers and the shards planned for them.
#[derive(Debug, Default)]
pub(super) struct WorkerBook {
    /// Live sessions, by worker id.
    pub(super) live: BTreeMap<String, WorkerState>,
    /// The last session number given.
    pub(super) sessions: u64,
    /// Shards planned for a worker but not sent yet (fires being recorded, fires
    /// prepared ahead), by worker id: they count against its capacity.
    pub(super) reserved: BTreeMap<String, u32>,
    /// Every group a worker registered in during this term (its live-worker gauge
    /// goes to 0, not away, when its last worker leaves). Bounded by the groups
    /// that exist: `register.group` is a checked short name.
    pub(super) groups_seen: BTreeSet<String>,
}

/// What the machine does after the answer it waits for.
#[derive(Debug)]
pub(super) enum Waiting {
    /// A slice of fires is being recorded.
    Record {
        rec: Recording,
        slice: Vec<Option<super::dispatch::Plan>>,
        /// Older ticks the store could not record, reported skipped in the same
        /// request, ahead of the slice (see `Machine::carry_backlog`).
        reported: Vec<FireRecord>,
    },
    /// Skipped ticks are being recorded (on failure they are kept to report
    /// later).
    Skipped(Vec<FireRecord>),
    /// The fence is checked before these prepared runs (ids; still prepared) go
    /// out.
    Fence(Vec<String>),
    /// The fence is checked before these buffered fires start.
    Buffered(Vec<(String, i64, String)>),
}

/// Work that continues after a store answer, or waits for the one in progress.
#[derive(Debug)]
pub(super) enum Work {
    /// Scheduled ticks due now: (job, instant, rearm).
    FireTicks(Vec<(String, i64, bool)>),
    /// Ticks to prepare ahead: (job, instant, go at, generation).
    PrepareTicks(Vec<(String, i64, i64, u64)>),
    /// Fires to plan and record (manual, child, misfire); the first one's run
    /// answers `reply`.
    Fire {
        fires: Vec<Fire>,
        reply: Option<CallId>,
    },
    /// Planned fires still to record.
    Record(Recording),
    /// Prepared runs whose instant came.
    Go(Vec<String>),
    /// A slice of prepared runs (ids) to send (the fence held).
    Send(Vec<String>),
    /// Buffered fires whose job's previous run ended: (job, instant, run id).
    Buffered(Vec<(String, i64, String)>),
    /// A job's ticks missed before this leader started.
    Misfire(String, Vec<i64>),
    /// Skipped ticks to record.
    RecordSkipped(Vec<FireRecord>),
}

/// The metrics the engine records per fire and per result, registered once: a
/// macro call looks its key up in the recorder each time, at 10,000 fires a second
/// part of the time the last fire of an instant waits. (Taken when the machine is
/// made, after the binary installed its recorder.)
pub(super) struct Meters {
    pub(super) trigger_lag: metrics::Histogram,
    pub(super) fired: metrics::Counter,
    pub(super) succeeded: metrics::Counter,
    pub(super) failed: metrics::Counter,
    pub(super) cancelled: metrics::Counter,
    pub(super) runs_succeeded: metrics::Counter,
}

impl Meters {
    fn new() -> Self {
        use chime_shared::telemetry::{JOB_FIRES, RUN_RESULTS, RUNS_FINISHED, TRIGGER_LAG_SECONDS};
        Self {
            trigger_lag: metrics::histogram!(TRIGGER_LAG_SECONDS),
            fired: metrics::counter!(JOB_FIRES, "outcome" => "fired"),
            succeeded: metrics::counter!(RUN_RESULTS, "status" => "succeeded"),
            failed: metrics::counter!(RUN_RESULTS, "status" => "failed"),
            cancelled: metrics::counter!(RUN_RESULTS, "status" => "cancelled"),
            runs_succeeded: metrics::counter!(RUNS_FINISHED, "status" => "succeeded"),
        }
    }
}

impl std::fmt::Debug for Meters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Meters")
    }
}

/// The engine's core (see the module doc).
#[derive(Debug)]
pub(crate) struct Machine {
    pub(super) opts: EngineOptions,
    pub(super) fence: i64,
    /// The time of the step being handled.
    pub(super) now: i64,
    pub(super) rng: fastrand::Rng,
    /// The metrics recorded per fire and per result.
    pub(super) meters: Meters,
    /// Runs started in this step, for the console's activity (see `step`).
    pub(super) fired_in_step: u64,
    /// Boxed: a `JobState` is about 470 bytes, and inline in the map's half-full
    /// leaves 100,000 jobs took 81 MB of them (a heap profile of `bench failover
    /// --idle-jobs 100000`).
    pub(super) jobs: HashMap<String, Box<JobState>>,
    pub(super) runs: RunBook,
    pub(super) workers: WorkerBook,
    pub(super) timers: Timers,
    /// A fire record or the fence check said another coordinator leads.
    pub(super) fenced_out: bool,
    /// Scheduled ticks, by job, that were neither fired nor reported because the
    /// store could not record them (Redis down); they go through the job's misfire
    /// policy the next time a record succeeds, as a new leader's missed ticks do.
    pub(super) unrecorded: BTreeMap<String, BTreeSet<i64>>,
    /// Fire ids (ticks and workflow nodes) whose record failed: the store may have
    /// applied it all the same (a timeout, a connection cut after the write), so
    /// their run can sit in the store, in progress, never sent. When this leader
    /// records one again and the store says it was recorded before, that record
    /// was this leader's own lost one (another leader's would have been fenced),
    /// so the fire is taken as recorded now (`Dispatch::own_lost_record`) rather
    /// than dropped as a duplicate, which left the run in progress forever.
    pub(super) maybe_recorded: BTreeSet<String>,
    /// What this step answers so far (see [`Machine::effect`]).
    pub(super) effects: Vec<Effect>,
    /// Work to do before the next input, in order.
    work: VecDeque<Work>,
    /// Work started by the input or work item being handled (goes first).
    spawned: Vec<Work>,
    waiting: Option<Waiting>,
    /// Inputs that arrived while waiting for an answer.
    inbox: VecDeque<Input>,
    /// A slice of sends is ready: end the step, so they go out now.
    yield_now: bool,
}

impl Machine {
    /// A machine for a leader with fencing token `fence`; `seed` seeds its
    /// randomness.
    pub(crate) fn new(opts: EngineOptions, fence: i64, seed: u64) -> Self {
        Self {
            opts,
            fence,
            now: 0,
            rng: fastrand::Rng::with_seed(seed),
            meters: Meters::new(),
            fired_in_step: 0,
            jobs: HashMap::new(),
            runs: RunBook::default(),
            workers: WorkerBook::default(),
            timers: Timers::default(),
            fenced_out: false,
            unrecorded: BTreeMap::new(),
            maybe_recorded: BTreeSet::new(),
            effects: Vec::new(),
            work: VecDeque::new(),
            spawned: Vec::new(),
            waiting: None,
            inbox: VecDeque::new(),
            yield_now: false,
        }
    }

    /// Handles `input` at `now`; answers what to do, in order.
    pub(crate) fn step(&mut self, now: i64, input: Input) -> Vec<Effect> {
        self.now = now;
        match input {
            Input::Answer(a) => match self.waiting.take() {
                Some(w) => {
                    self.resume(w, a);
                    self.absorb();
                }
                None => warn!("a store answer nobody waits for; ignored"),
            },
            Input::Continue => {}
            // Work left by the last step (a batch going out in slices) comes first.
            other if self.waiting.is_some() || !self.work.is_empty() => self.inbox.push_back(other),
            other => {
                self.handle(other);
                self.absorb();
            }
        }
        self.pump();
        // The console's activity counts a step's fires with one call (a call per
        // fire took the recorder's lock 10,000 times at an instant).
        if self.fired_in_step > 0 {
            chime_shared::activity::add(
                "",
                chime_shared::activity::Kind::JobFired,
                std::mem::take(&mut self.fired_in_step),
            );
        }
        std::mem::take(&mut self.effects)
    }

    /// When the earliest timer is due (the driver sleeps until then).
    pub(crate) fn next_wake(&self) -> Option<i64> {
        self.timers.next()
    }

    /// Whether a store answer is awaited.
    #[cfg(test)]
    pub(crate) fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// Whether the last step stopped with work left that needs no answer (the
    /// next slice of a batch going out): the driver performs what it has, then
    /// steps again with [`Input::Continue`] before anything else, so the first
    /// assignments of a thousand leave without waiting for the last.
    pub(crate) fn busy(&self) -> bool {
        self.waiting.is_none() && !self.work.is_empty()
    }

    pub(super) fn effect(&mut self, e: Effect) {
        self.effects.push(e);
    }

    /// Starts work that runs before anything queued (in the order spawned).
    pub(super) fn spawn(&mut self, w: Work) {
        self.spawned.push(w);
    }

    /// Asks the store; the machine waits for the answer.
    pub(super) fn request(&mut self, r: Request, then: Waiting) {
        self.effects.push(Effect::Request(r));
        self.waiting = Some(then);
    }

    fn absorb(&mut self) {
        let spawned = std::mem::take(&mut self.spawned);
        for w in spawned.into_iter().rev() {
            self.work.push_front(w);
        }
    }

    /// Runs queued work, then queued inputs, until a request waits for its answer
    /// or a slice of sends is ready (`yield_now`).
    fn pump(&mut self) {
        while self.waiting.is_none() {
            if let Some(w) = self.work.pop_front() {
                self.run_work(w);
            } else if let Some(i) = self.inbox.pop_front() {
                self.handle(i);
            } else {
                break;
            }
            self.absorb();
            if std::mem::take(&mut self.yield_now) && !self.work.is_empty() {
                break;
            }
        }
    }

    fn run_work(&mut self, w: Work) {
        match w {
            Work::FireTicks(t) => self.fire_ticks(t),
            Work::PrepareTicks(t) => self.prepare_ticks(t),
            Work::Fire { fires, reply } => self.fire_many(fires, reply),
            Work::Record(rec) => self.record_next(rec),
            Work::Go(ids) => self.go_prepared(ids),
            Work::Send(ids) => {
                self.send_prepared(ids);
                self.yield_now = true;
            }
            Work::Buffered(fires) => {
                if !self.fenced_out {
                    let fence = self.fence;
                    self.request(Request::CheckFence { fence }, Waiting::Buffered(fires));
                }
            }
            Work::Misfire(job, ticks) => self.misfire(&job, ticks),
            Work::RecordSkipped(fires) => {
                if !self.fenced_out {
                    let fence = self.fence;
                    self.request(
                        Request::Record {
                            fence,
                            fires: fires.clone(),
                        },
                        Waiting::Skipped(fires),
                    );
                }
            }
        }
    }

    fn resume(&mut self, w: Waiting, a: Answer) {
        match (w, a) {
            (
                Waiting::Record {
                    rec,
                    slice,
                    reported,
                },
                Answer::Record(r),
            ) => {
                let r = self.backlog_answered(reported, r);
                self.record_answered(rec, slice, r)
            }
            (Waiting::Skipped(fires), Answer::Record(r)) => match r {
                Err(e) => {
                    warn!(error = %e, "cannot record skipped ticks; reporting them later");
                    self.maybe_recorded
                        .extend(fires.iter().map(|f| f.fire_id.clone()));
                    self.keep_unrecorded(fires.iter().map(|f| (f.job.as_str(), f.at)));
                }
                Ok(answers) => self.skipped_answered(&fires, answers),
            },
            (Waiting::Fence(ready), Answer::Fence(r)) => self.fence_answered(ready, r),
            (Waiting::Buffered(fires), Answer::Fence(r)) => self.buffered_answered(fires, r),
            // A driver bug: taken as a failure of the request waited for.
            (w, a) => {
                warn!(answer = ?a, "a store answer of the wrong kind; taken as a failure");
                let wrong = "a store answer of the wrong kind".to_owned();
                match w {
                    Waiting::Record {
                        rec,
                        slice,
                        reported,
                    } => {
                        let r = self.backlog_answered(reported, Err(wrong));
                        self.record_answered(rec, slice, r)
                    }
                    Waiting::Skipped(fires) => {
                        self.keep_unrecorded(fires.iter().map(|f| (f.job.as_str(), f.at)))
                    }
                    Waiting::Fence(ready) => self.fence_answered(ready, Err(wrong)),
                    Waiting::Buffered(fires) => self.buffered_answered(fires, Err(wrong)),
                }
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Start {
                jobs,
                last,
                active,
                handover,
                ahead,
                ended_nodes,
            } => self.begin(jobs, last, active, handover, ahead, ended_nodes),
            Input::Timers => self.due(),
            Input::Register(call, hello) => self.register(call, hello),
            Input::Heartbeat {
                worker,
                session,
                running,
            } => self.heartbeat(&worker, session, running),
            Input::Started { worker, key, at_ms } => self.started(&worker, key, at_ms),
            Input::Log(key, line) => self.log_line(key, line),
            Input::Result {
                worker,
                key,
                outcome,
            } => self.shard_result(&worker, key, outcome),
            Input::Draining { worker, session } => self.draining(&worker, session),
            Input::Closed { worker, session } => self.closed(&worker, session),
            Input::JobPut(j) => {
                self.put_job(j, None, false);
            }
            Input::JobDeleted(name) => {
                let inline = self.inline_jobs_of(&name);
                if self.jobs.remove(&name).is_some() {
                    info!(job = %name, "job deleted");
                }
                if !inline.is_empty() {
                    self.sync_inline_jobs(&name, inline);
                }
            }
            Input::Rerun(call, old, node) => self.rerun(call, *old, &node),
            Input::Trigger(call, name, params) => self.trigger(call, &name, params),
            Input::Kill(call, run_id) => {
                let r = self.kill(&run_id);
                self.effect(Effect::Reply(call, Reply::Run(r)));
            }
            Input::Undelivered { session, key } => self.undelivered(session, key),
            Input::Answer(_) => warn!("a store answer nobody waits for; ignored"),
            Input::Continue => {}
        }
    }

    /// The leader starts: jobs first (without their missed ticks), then the runs in
    /// progress, then the missed ticks, so overlap policies see the adopted runs.
    fn begin(
        &mut self,
        jobs: Vec<StoredJob>,
        last: HashMap<String, i64>,
        active: Vec<RunRecord>,
        handover: Option<Vec<String>>,
        ahead: Vec<Option<crate::schedule::Planned>>,
        ended_nodes: Vec<RunRecord>,
    ) {
        let mut missed = Vec::new();
        // Parsing every job's schedule is most of a start with many jobs: planned
        // first, on every core, then installed in order.
        let plans = super::jobs::plan_all(&jobs, &last, ahead, self.now);
        for (j, plan) in jobs.into_iter().zip(plans) {
            let name = j.spec.name.clone();
            if let Some(ticks) = self.put_planned(j, last.get(&name).copied(), true, Some(plan)) {
                missed.push((name, ticks));
            }
        }
        self.adopt(active, handover);
        self.reconcile_workflows(ended_nodes);
        for (name, ticks) in missed {
            self.spawn(Work::Misfire(name, ticks));
        }
        let at = self.now + 1_000;
        self.timers.schedule(at, Timer::Sweep);
        info!(jobs = self.jobs.len(), "engine running");
    }

    /// Runs every timer that is due; fires due at the same time go out as one batch.
    fn due(&mut self) {
        let now = self.now;
        let mut fires = Vec::new();
        let mut early = Vec::new();
        let mut go = Vec::new();
        let mut buffered = Vec::new();
        while let Some(t) = self.timers.pop_due(now) {
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
                Timer::Go(ids) => go.extend(ids),
                Timer::Deadline(key) => self.deadline(key),
                Timer::Retry { run_id, shard } => self.retry(&run_id, shard),
                Timer::Sweep => {
                    self.sweep();
                    self.timers.schedule(now + 1_000, Timer::Sweep);
                }
                Timer::Pending => {
                    if self.runs.pending_wake.is_some_and(|w| w <= now) {
                        self.runs.pending_wake = None;
                    }
                    self.place_pending();
                }
                Timer::Buffered { job, at, run_id } => buffered.push((job, at, run_id)),
                Timer::Adopt(key) => self.adopt_deadline(key),
                Timer::Advance(run_id) => self.advance(&run_id),
            }
        }
        // Fires whose instant is now first, then the ones prepared ahead.
        if !buffered.is_empty() {
            self.spawn(Work::Buffered(buffered));
        }
        if !go.is_empty() {
            self.spawn(Work::Go(go));
        }
        if !fires.is_empty() {
            self.spawn(Work::FireTicks(fires));
        }
        if !early.is_empty() {
            self.spawn(Work::PrepareTicks(early));
        }
    }

    /// Connected workers, for the admin API.
    pub(crate) fn worker_views(&self) -> Vec<WorkerView> {
        self.workers
            .live
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

    /// The runs recorded ahead of their instant and not sent yet: what a leader
    /// that stops names in its hand-over note.
    pub(crate) fn unsent_runs(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.runs.prepared.keys().cloned().collect();
        ids.sort_unstable();
        ids
    }

    /// This leader's fencing token.
    pub(crate) fn fence(&self) -> i64 {
        self.fence
    }

    /// Whether a newer leader's fencing token was seen: such a leader hands nothing
    /// over.
    pub(crate) fn is_fenced_out(&self) -> bool {
        self.fenced_out
    }

    /// Every job's trigger state, for the admin API.
    pub(crate) fn trigger_states(&self) -> HashMap<String, TriggerState> {
        self.jobs
            .iter()
            // Inline nodes' jobs are the engine's own, not stored jobs.
            .filter(|(n, _)| !crate::workflow::is_inline_job(n))
            .map(|(n, j)| {
                (
                    n.clone(),
                    TriggerState {
                        // A tick prepared ahead is next until it goes out.
                        next_fire_ms: j
                            .prepared
                            .as_ref()
                            .and_then(|id| self.runs.prepared.get(id))
                            .map(|r| r.scheduled_at_ms)
                            .or(j.next_fire),
                        last_fire_ms: j.last_fire,
                    },
                )
            })
            .collect()
    }

    /// A run in progress (sent or prepared), if the machine has it.
    pub(crate) fn active_run(&self, run_id: &str) -> Option<&RunRecord> {
        self.runs
            .active
            .get(run_id)
            .or(self.runs.prepared.get(run_id))
    }

    /// Queues a run snapshot for the history.
    pub(super) fn save(&mut self, run: &RunRecord) {
        self.effects.push(Effect::Save(run.clone()));
    }

    /// Sends `msg` to `worker`'s session; false when it has none.
    pub(super) fn send(&mut self, worker: &str, msg: ToWorker) -> bool {
        match self.workers.live.get(worker) {
            Some(w) => {
                let session = w.session;
                self.effects.push(Effect::Send { session, msg });
                true
            }
            None => false,
        }
    }

    /// Prepared runs whose Go timer fired and whose going out is queued behind
    /// the request in progress, waits for the fence check, or waits for its
    /// slice to be sent (for the invariant checks).
    #[cfg(test)]
    pub(super) fn queued_go(&self) -> Vec<&String> {
        let fence = match &self.waiting {
            Some(Waiting::Fence(ids)) => Some(ids),
            _ => None,
        };
        self.work
            .iter()
            .chain(self.spawned.iter())
            .filter_map(|w| match w {
                Work::Go(ids) | Work::Send(ids) => Some(ids),
                _ => None,
            })
            .chain(fence)
            .flatten()
            .collect()
    }

    /// Planned fires not yet recorded or settled (for the invariant checks).
    #[cfg(test)]
    pub(super) fn in_flight_plans(&self) -> Vec<&super::dispatch::Plan> {
        let mut out = Vec::new();
        let recs = self
            .work
            .iter()
            .chain(self.spawned.iter())
            .filter_map(|w| match w {
                Work::Record(r) => Some(r),
                _ => None,
            });
        for r in recs {
            out.extend(r.plans.iter().flatten());
        }
        if let Some(Waiting::Record { rec, slice, .. }) = &self.waiting {
            out.extend(rec.plans.iter().flatten());
            out.extend(slice.iter().flatten());
        }
        out
    }
}
