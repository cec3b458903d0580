//! Firing. Every fire is decided first (*plan*: the overlap policy, the run, which
//! worker each shard goes to), then recorded in one store call together with the
//! planned run (which refuses a duplicate fire id and a deposed leader), and only
//! then carried out (*apply*: assignments sent). A leader that dies after the record
//! leaves a run a new leader adopts; one that dies before leaves nothing, and the
//! tick is a misfire for the next leader. Also: misfire policies and routing.
//!
//! Scheduled ticks are *prepared*: planned and recorded `prepare_ahead_ms` before
//! their instant, so that at the instant only the assignments go out (recording a
//! thousand fires of one second takes tens of milliseconds of Redis). A tick is
//! prepared only when its job has nothing running or waiting, so the overlap policy
//! decided ahead can only be wrong if a run starts in between (a manual trigger or
//! a child fire): *go* applies the policy again then. At the instant, go checks the
//! fencing token once more (a leader deposed in between sends nothing; the new one
//! adopts the recorded runs, and sends them no earlier than their instant), drops
//! fires whose job was paused or deleted meanwhile (recorded as skipped), and moves
//! shards whose planned worker left to another.

use std::collections::HashMap;

use chime_shared::queue::fnv1a64;
use tracing::{debug, info, warn};

use super::workers::{Assignment, ToWorker};
use super::{Engine, ShardKey, Timer};
use crate::error::{CoordError, Result};
use crate::model::{Misfire, Overlap, Routing, RunRecord, RunState, ShardRecord};
use crate::store::{FireAnswer, FireRecord};

/// The fire id of a scheduled tick.
pub(crate) fn fire_id(job: &str, at: i64) -> String {
    format!("{job}@{at}")
}

/// What a fire will do, decided before it is recorded.
#[derive(Debug)]
pub(super) enum Plan {
    /// Start `run` (shards planned), after cancelling the `cover`ed runs.
    Start { run: RunRecord, cover: Vec<String> },
    /// Recorded as skipped.
    Skip(RunRecord),
    /// Kept as the job's one waiting fire.
    Buffer(RunRecord),
}

impl Plan {
    fn run(&self) -> &RunRecord {
        match self {
            Plan::Start { run, .. } | Plan::Skip(run) | Plan::Buffer(run) => run,
        }
    }
}

/// Fires recorded in one store call before they are applied (see `fire_many`).
const RECORD_SLICE: usize = 100;

/// A fire to plan.
pub(super) struct Fire {
    pub(super) job: String,
    pub(super) at: i64,
    pub(super) cause: &'static str,
    pub(super) params: Option<String>,
    pub(super) parent: String,
    pub(super) run_id: String,
    pub(super) fire_id: String,
}

impl Fire {
    /// A scheduled (or misfired) tick.
    pub(super) fn tick(job: &str, at: i64, cause: &'static str) -> Self {
        let id = fire_id(job, at);
        Self {
            job: job.to_owned(),
            at,
            cause,
            params: None,
            parent: String::new(),
            run_id: id.clone(),
            fire_id: id,
        }
    }
}

fn bare_run(f: &Fire, now: i64, state: RunState, note: &str) -> RunRecord {
    RunRecord {
        run_id: f.run_id.clone(),
        fire_id: f.fire_id.clone(),
        job: f.job.clone(),
        cause: f.cause.to_owned(),
        scheduled_at_ms: f.at,
        fired_at_ms: now,
        finished_at_ms: if state.is_final() { now } else { 0 },
        state,
        params: f.params.clone().unwrap_or_default(),
        shards: Vec::new(),
        parent_run_id: f.parent.clone(),
        note: note.to_owned(),
        fence: 0,
    }
}

impl Engine {
    /// Fires due ticks: plans each, records them all in one call, applies the
    /// recorded ones, and schedules each job's next tick.
    pub(super) async fn fire_ticks(&mut self, ticks: Vec<(String, i64, bool)>) {
        for (job, at, rearm) in &ticks {
            if *rearm {
                self.schedule_next(job, *at);
            }
        }
        let fires = ticks
            .into_iter()
            .map(|(j, at, _)| Fire::tick(&j, at, "scheduled"))
            .collect();
        self.fire_many(fires).await;
    }

    /// Arms tick `at` of `job` (plus up to `jitter_ms`): ahead of it to be prepared
    /// when there is time for that, else at the instant.
    pub(super) fn arm_tick(&mut self, job: &str, at: i64, generation: u64, jitter_ms: u64) {
        let jitter = if jitter_ms > 0 {
            fastrand::u64(0..=jitter_ms) as i64
        } else {
            0
        };
        let go_at = at + jitter;
        let lead = self.opts.prepare_ahead_ms as i64;
        let job = job.to_owned();
        if lead > 0 && go_at - lead > self.now() {
            self.schedule(
                go_at - lead,
                Timer::Prepare {
                    job,
                    at,
                    go_at,
                    generation,
                },
            );
        } else {
            self.fire_at(go_at, job, at, generation, true);
        }
    }

    /// Arms the ordinary fire (record, then send) of tick `at` of `job` at `go_at`.
    fn fire_at(&mut self, go_at: i64, job: String, at: i64, generation: u64, rearm: bool) {
        self.schedule(
            go_at,
            Timer::Fire {
                job,
                at,
                generation,
                rearm,
            },
        );
    }

    /// Prepares ticks ahead of their instant: each job's next tick is armed, and
    /// the fire is planned and recorded now and sent at the instant (`go_prepared`).
    /// A job with a run going or waiting (or another prepared fire) is fired at the
    /// instant instead, where its overlap policy sees what runs then.
    pub(super) async fn prepare_ticks(&mut self, ticks: Vec<(String, i64, i64, u64)>) {
        let mut go_at = HashMap::new();
        let mut fires = Vec::new();
        for (job, at, go, generation) in ticks {
            self.schedule_next(&job, at);
            let idle = self.jobs.get(&job).is_some_and(|j| {
                j.running.is_empty() && j.buffered.is_none() && j.prepared.is_none()
            });
            if idle && !self.fenced_out {
                go_at.insert(fire_id(&job, at), (go, generation));
                fires.push(Fire::tick(&job, at, "scheduled"));
            } else {
                self.fire_at(go, job, at, generation, false);
            }
        }
        let plans = fires
            .into_iter()
            .map(|f| {
                let (go, _) = go_at[&f.fire_id];
                self.plan(f).map(|mut p| {
                    // Times as they will be when it goes out.
                    if let Plan::Start { run, .. } = &mut p {
                        run.fired_at_ms = go;
                        for s in run.shards.iter_mut().filter(|s| s.started_at_ms > 0) {
                            s.started_at_ms = go;
                        }
                    }
                    p
                })
            })
            .collect();
        self.record_plans(plans, move |e, plan, answer| {
            let (go, generation) = go_at[&plan.run().fire_id];
            e.settle_prepared(plan, answer, go, generation)
        })
        .await;
    }

    /// Keeps a prepared fire by what its record answered.
    fn settle_prepared(
        &mut self,
        plan: Plan,
        answer: Option<FireAnswer>,
        go_at: i64,
        generation: u64,
    ) -> Option<RunRecord> {
        match (plan, answer) {
            (Plan::Start { run, .. }, Some(FireAnswer::Recorded)) => {
                self.note_fired(&run);
                if let Some(j) = self.jobs.get_mut(&run.job) {
                    j.prepared = Some(run.run_id.clone());
                }
                let run_id = run.run_id.clone();
                self.prepared.insert(run_id.clone(), run.clone());
                self.schedule(go_at, Timer::Go(run_id));
                Some(run)
            }
            // Not recorded (the store failed): try the ordinary way at the instant.
            (plan, None) => {
                let run = plan.run();
                self.fire_at(
                    go_at,
                    run.job.clone(),
                    run.scheduled_at_ms,
                    generation,
                    false,
                );
                None
            }
            // A duplicate, a stale fence, or a recorded skip or buffer (which an idle
            // job's plan never is): as any fire.
            (plan, answer) => self.settle_fire(plan, answer),
        }
    }

    /// The instant of prepared runs came: unless the fencing token went stale
    /// meanwhile, each goes out (see `go_one`).
    pub(super) async fn go_prepared(&mut self, run_ids: Vec<String>) {
        let mut ready = Vec::with_capacity(run_ids.len());
        for id in run_ids {
            if let Some(run) = self.prepared.remove(&id) {
                if let Some(j) = self.jobs.get_mut(&run.job) {
                    j.prepared = None;
                }
                ready.push(run);
            }
        }
        if ready.is_empty() || self.fenced_out {
            return;
        }
        match self.run_store.fence_holds(self.fence).await {
            Ok(true) => {
                for run in ready {
                    self.go_one(run);
                }
            }
            Ok(false) => {
                // The runs stay recorded: the newer leader adopts and sends them.
                warn!(
                    runs = ready.len(),
                    "fencing token is stale: another coordinator leads; not sending prepared fires"
                );
                self.fenced_out = true;
                self.lost.cancel();
            }
            Err(e) => {
                // Unsure who leads: ask again shortly (late rather than twice).
                warn!(error = %e, runs = ready.len(), "cannot check the fencing token; retrying");
                let retry = self.now() + 100;
                for run in ready {
                    let id = run.run_id.clone();
                    if let Some(j) = self.jobs.get_mut(&run.job) {
                        j.prepared = Some(id.clone());
                    }
                    self.prepared.insert(id.clone(), run);
                    self.schedule(retry, Timer::Go(id));
                }
            }
        }
    }

    /// Sends one prepared run, after what changed since it was planned: its job
    /// paused or deleted (dropped as skipped), a run started meanwhile (the overlap
    /// policy again), a planned worker gone (the shard goes to another).
    fn go_one(&mut self, mut run: RunRecord) {
        let now = self.now();
        let Some(j) = self.jobs.get_mut(&run.job) else {
            self.end_prepared(
                run,
                RunState::Skipped,
                "skipped: the job was deleted before the fire went out",
            );
            return;
        };
        if j.spec.paused {
            self.end_prepared(
                run,
                RunState::Skipped,
                "skipped: the job was paused before the fire went out",
            );
            return;
        }
        let cover = match overlap_call(j) {
            OverlapCall::Start { cover } => cover,
            OverlapCall::Skip(note) => {
                self.end_prepared(run, RunState::Skipped, note);
                return;
            }
            OverlapCall::Buffer => {
                j.buffered = Some((run.scheduled_at_ms, run.run_id.clone()));
                run.shards.clear();
                run.state = RunState::Pending;
                run.note = BUFFERED.to_owned();
                self.save(&run);
                return;
            }
        };
        run.fired_at_ms = now;
        let mut moved = Vec::new();
        for s in run
            .shards
            .iter_mut()
            .filter(|s| s.state == RunState::Running)
        {
            if self.workers.get(&s.worker_id).is_some_and(|w| !w.draining) {
                s.started_at_ms = now;
            } else {
                s.state = RunState::Pending;
                s.worker_id.clear();
                s.started_at_ms = 0;
                moved.push(s.index);
            }
        }
        metrics::histogram!(chime_shared::telemetry::TRIGGER_LAG_SECONDS)
            .record((now - run.scheduled_at_ms).max(0) as f64 / 1000.0);
        let run_id = run.run_id.clone();
        self.apply(Plan::Start { run, cover });
        if !moved.is_empty() {
            for shard in moved {
                self.assign_shard(&run_id, shard, None);
            }
            if let Some(r) = self.runs.get(&run_id) {
                self.save(r);
            }
        }
    }

    /// Takes a prepared run back before its instant (kill): ends it as `state`.
    pub(super) fn drop_prepared(
        &mut self,
        run_id: &str,
        state: RunState,
        note: &str,
    ) -> Option<RunRecord> {
        let run = self.prepared.remove(run_id)?;
        if let Some(j) = self.jobs.get_mut(&run.job) {
            j.prepared = None;
        }
        Some(self.end_prepared(run, state, note))
    }

    /// Ends a prepared run that will not go out, in the history.
    fn end_prepared(&mut self, mut run: RunRecord, state: RunState, note: &str) -> RunRecord {
        debug!(run_id = %run.run_id, note, "prepared fire not sent");
        run.state = state;
        run.note = note.to_owned();
        run.finished_at_ms = self.now();
        run.shards.clear();
        self.save(&run);
        metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "skipped").increment(1);
        run
    }

    /// Plans, records and applies fires; answers each fire's run (None when not
    /// recorded: a duplicate, a store failure, or a stale fence).
    ///
    /// Fires are recorded and applied a slice at a time, so the first fires of a
    /// big batch (a thousand jobs on the same second) reach their workers while
    /// later slices are still being recorded, instead of all waiting for the last
    /// record. Each fire is still recorded before it is dispatched.
    pub(super) async fn fire_many(&mut self, fires: Vec<Fire>) -> Vec<Option<RunRecord>> {
        if self.fenced_out {
            return fires.iter().map(|_| None).collect();
        }
        let plans: Vec<Option<Plan>> = fires.into_iter().map(|f| self.plan(f)).collect();
        self.record_plans(plans, Self::settle_fire).await
    }

    /// Records planned fires a slice at a time and hands each to `settle` with its
    /// answer (None: the store failed, so it is not recorded); answers what `settle`
    /// answers, in order.
    async fn record_plans(
        &mut self,
        mut plans: Vec<Option<Plan>>,
        mut settle: impl FnMut(&mut Self, Plan, Option<FireAnswer>) -> Option<RunRecord> + Send,
    ) -> Vec<Option<RunRecord>> {
        for p in plans.iter_mut().flatten() {
            match p {
                Plan::Start { run, .. } | Plan::Skip(run) | Plan::Buffer(run) => {
                    run.fence = self.fence
                }
            }
        }
        let mut out = Vec::with_capacity(plans.len());
        let mut plans = plans.into_iter().peekable();
        while plans.peek().is_some() {
            let slice: Vec<Option<Plan>> = plans.by_ref().take(RECORD_SLICE).collect();
            if self.fenced_out {
                out.extend(slice.iter().map(|_| None));
                continue;
            }
            let records: Vec<FireRecord> = slice
                .iter()
                .flatten()
                .map(|p| FireRecord {
                    fire_id: p.run().fire_id.clone(),
                    job: p.run().job.clone(),
                    at: p.run().scheduled_at_ms,
                    run: p.run().clone(),
                })
                .collect();
            let answers = match self.run_store.record_fires(self.fence, &records).await {
                Ok(a) => a,
                Err(e) => {
                    // Without the record a fire could happen twice (or, for a deposed
                    // leader, at all): settle this slice and the rest as unrecorded.
                    let left = slice.len() + plans.len();
                    warn!(error = %e, fires = left, "cannot record fires; not firing them");
                    for plan in slice.into_iter().chain(plans.by_ref()) {
                        out.push(plan.and_then(|p| settle(self, p, None)));
                    }
                    return out;
                }
            };
            let mut answers = answers.into_iter();
            for plan in slice {
                let Some(plan) = plan else {
                    out.push(None);
                    continue;
                };
                // A short answer list counts as duplicates: never fire unrecorded.
                let answer = answers.next().unwrap_or(FireAnswer::Duplicate);
                out.push(settle(self, plan, Some(answer)));
            }
        }
        out
    }

    /// Applies one planned fire by what its record answered (None: not recorded,
    /// so not fired).
    fn settle_fire(&mut self, plan: Plan, answer: Option<FireAnswer>) -> Option<RunRecord> {
        match answer.unwrap_or(FireAnswer::Duplicate) {
            FireAnswer::Recorded => {
                let run = plan.run().clone();
                self.note_fired(&run);
                metrics::histogram!(chime_shared::telemetry::TRIGGER_LAG_SECONDS)
                    .record((run.fired_at_ms - run.scheduled_at_ms).max(0) as f64 / 1000.0);
                self.apply(plan);
                Some(run)
            }
            FireAnswer::Duplicate => {
                debug!(fire_id = %plan.run().fire_id, "fire already recorded; skipping");
                self.unplan(&plan);
                None
            }
            FireAnswer::Fenced => {
                if !self.fenced_out {
                    warn!("fencing token is stale: another coordinator leads; not firing");
                    self.lost.cancel();
                }
                self.fenced_out = true;
                self.unplan(&plan);
                None
            }
        }
    }

    /// A scheduled tick was recorded: it is its job's last fired instant.
    fn note_fired(&mut self, run: &RunRecord) {
        if let Some(j) = self.jobs.get_mut(&run.job)
            && run.cause != "manual"
            && run.cause != "child"
        {
            j.last_fire = Some(
                j.last_fire
                    .map_or(run.scheduled_at_ms, |l| l.max(run.scheduled_at_ms)),
            );
        }
    }

    /// Schedules the tick after `after` (time-based schedules only).
    fn schedule_next(&mut self, job: &str, after: i64) {
        let Some(j) = self.jobs.get_mut(job) else {
            return;
        };
        if matches!(j.compiled, crate::schedule::Compiled::Delay { .. }) {
            j.next_fire = None;
            return;
        }
        j.next_fire = j.compiled.next_after(&j.spec, after);
        if let Some(at) = j.next_fire {
            let (generation, jitter_ms) = (j.generation, j.spec.jitter_ms);
            self.arm_tick(job, at, generation, jitter_ms);
        }
    }

    /// Ticks no coordinator fired (found at startup), per the misfire policy.
    pub(super) async fn misfire(&mut self, job: &str, ticks: Vec<i64>) {
        let Some(j) = self.jobs.get(job) else { return };
        let (policy, window) = (j.spec.misfire, j.spec.catch_up_window_ms as i64);
        let now = self.now();
        let (fire, skip): (Vec<i64>, Vec<i64>) = match policy {
            Misfire::Skip => (Vec::new(), ticks),
            Misfire::FireOnce => {
                let last = ticks.last().copied();
                (
                    last.into_iter().collect(),
                    ticks[..ticks.len().saturating_sub(1)].to_vec(),
                )
            }
            Misfire::FireAll => ticks.into_iter().partition(|t| now - t <= window),
        };
        info!(
            job,
            fired = fire.len(),
            skipped = skip.len(),
            ?policy,
            "handling missed ticks"
        );
        if !skip.is_empty() {
            self.report_skipped(
                job,
                &skip,
                &format!("missed tick, misfire policy {policy:?}"),
            )
            .await;
        }
        if !fire.is_empty() {
            self.fire_many(
                fire.into_iter()
                    .map(|t| Fire::tick(job, t, "misfire"))
                    .collect(),
            )
            .await;
        }
    }

    /// Reports skipped ticks in the run history (recorded like fires, so a tick is
    /// never both skipped and fired): one run per tick for the latest hundred, and
    /// one summary run for the rest.
    async fn report_skipped(&mut self, job: &str, ticks: &[i64], why: &str) {
        let now = self.now();
        let cut = ticks.len().saturating_sub(100);
        if cut > 0 {
            let note = format!(
                "{why}: {cut} earlier ticks from {} to {} skipped",
                ticks[0],
                ticks[cut - 1]
            );
            let mut f = Fire::tick(job, ticks[cut - 1], "misfire");
            f.run_id = format!("{job}@skipped-{}-{}", ticks[0], ticks[cut - 1]);
            f.fire_id = f.run_id.clone();
            self.save(&bare_run(&f, now, RunState::Skipped, &note));
        }
        let fence = self.fence;
        let records: Vec<FireRecord> = ticks[cut..]
            .iter()
            .map(|t| {
                let f = Fire::tick(job, *t, "misfire");
                let mut run = bare_run(&f, now, RunState::Skipped, why);
                run.fence = fence;
                FireRecord {
                    fire_id: f.fire_id.clone(),
                    job: job.to_owned(),
                    at: *t,
                    run,
                }
            })
            .collect();
        if let Err(e) = self.run_store.record_fires(self.fence, &records).await {
            warn!(error = %e, "cannot record skipped ticks");
        }
        metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "skipped")
            .increment(ticks.len() as u64);
    }

    /// Fires a job now (admin trigger).
    pub(super) async fn trigger(&mut self, job: &str, params: Option<String>) -> Result<RunRecord> {
        if !self.jobs.contains_key(job) {
            return Err(CoordError::NotFound(format!("job {job:?}")));
        }
        if params
            .as_ref()
            .is_some_and(|p| p.len() > crate::model::MAX_PARAMS_BYTES)
        {
            return Err(CoordError::invalid("params", "is larger than 64 KiB"));
        }
        let now = self.now();
        let id = format!("{job}@m{now}-{:04x}", fastrand::u16(..));
        let fire = Fire {
            job: job.to_owned(),
            at: now,
            cause: "manual",
            params,
            parent: String::new(),
            run_id: id.clone(),
            fire_id: id,
        };
        self.fire_many(vec![fire])
            .await
            .pop()
            .flatten()
            .ok_or_else(|| CoordError::Unavailable("the fire could not be recorded".into()))
    }

    /// Decides what a fire does (no side effect but routing counters).
    fn plan(&mut self, f: Fire) -> Option<Plan> {
        let now = self.now();
        let cover = match overlap_call(self.jobs.get(&f.job)?) {
            OverlapCall::Start { cover } => cover,
            OverlapCall::Skip(note) => {
                return Some(Plan::Skip(bare_run(&f, now, RunState::Skipped, note)));
            }
            OverlapCall::Buffer => {
                return Some(Plan::Buffer(bare_run(&f, now, RunState::Pending, BUFFERED)));
            }
        };
        let (job, params) = (f.job.clone(), f.params.clone());
        Some(Plan::Start {
            run: self.plan_run(&job, f, params, now),
            cover,
        })
    }

    /// The run of a fire with its shards and the worker each goes to.
    fn plan_run(&mut self, job: &str, f: Fire, params: Option<String>, now: i64) -> RunRecord {
        let spec = match self.jobs.get(job) {
            Some(j) => j.spec.clone(),
            None => return bare_run(&f, now, RunState::Skipped, "job deleted"),
        };
        let workers = self.candidates(&spec.group, &spec.handler, None);
        let total = if spec.routing == Routing::ShardingBroadcast {
            if spec.shard_count > 0 {
                spec.shard_count
            } else {
                workers.len().max(1) as u32
            }
        } else {
            1
        };
        let mut run = bare_run(&f, now, RunState::Pending, "");
        run.fence = self.fence;
        run.params = params.unwrap_or(spec.params.clone());
        for i in 0..total {
            let worker = if spec.routing == Routing::ShardingBroadcast {
                // Stable spread: shard i goes to the i-th live worker (by id), wrapping.
                (!workers.is_empty()).then(|| workers[i as usize % workers.len()].clone())
            } else {
                self.pick(&spec, &run.job, &run.params, None)
            };
            let running = worker.is_some();
            run.shards.push(ShardRecord {
                index: i,
                total,
                worker_id: worker.unwrap_or_default(),
                attempt: u32::from(running),
                failures: 0,
                state: if running {
                    RunState::Running
                } else {
                    RunState::Pending
                },
                started_at_ms: if running { now } else { 0 },
                finished_at_ms: 0,
                output: String::new(),
                error: String::new(),
                log_tail: Vec::new(),
                shard_params: spec
                    .shard_params
                    .get(i as usize)
                    .cloned()
                    .unwrap_or_default(),
            });
        }
        if run.shards.iter().any(|s| s.state == RunState::Running) {
            run.state = RunState::Running;
        }
        run
    }

    /// Undoes what planning reserved (nothing but routing counters, which stay).
    fn unplan(&mut self, _plan: &Plan) {}

    /// Carries out a recorded plan.
    pub(super) fn apply(&mut self, plan: Plan) {
        match plan {
            Plan::Skip(run) => {
                debug!(run_id = %run.run_id, note = %run.note, "fire skipped");
                metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "skipped")
                    .increment(1);
            }
            Plan::Buffer(run) => {
                if let Some(j) = self.jobs.get_mut(&run.job) {
                    j.buffered = Some((run.scheduled_at_ms, run.run_id));
                }
            }
            Plan::Start { run, cover } => {
                for r in cover {
                    let _ =
                        self.cancel_run(&r, &format!("covered by the newer run {}", run.run_id));
                }
                metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "fired")
                    .increment(1);
                debug!(run_id = %run.run_id, shards = run.shards.len(), cause = %run.cause, "run started");
                self.start_planned(run);
            }
        }
    }

    /// Takes a planned run in and sends its assignments.
    pub(super) fn start_planned(&mut self, run: RunRecord) {
        let run_id = run.run_id.clone();
        if let Some(j) = self.jobs.get_mut(&run.job) {
            j.running.insert(run_id.clone());
        }
        let shards: Vec<(u32, bool)> = run
            .shards
            .iter()
            .map(|s| (s.index, s.state == RunState::Running))
            .collect();
        self.runs.insert(run_id.clone(), run);
        for (i, running) in shards {
            if running {
                self.send_assignment(&run_id, i);
            } else {
                self.wait_for_worker(&run_id, i);
            }
        }
    }

    /// Starts a buffered fire now that the job's previous run ended.
    pub(super) async fn start_buffered(&mut self, job: &str, at: i64, run_id: String) {
        let now = self.now();
        let mut f = Fire::tick(job, at, "buffered");
        f.run_id = run_id.clone();
        f.fire_id = run_id;
        let run = self.plan_run(job, f, None, now);
        // The fire was recorded when it was buffered; save the run before it goes
        // out, so a new leader adopts it rather than starting it again.
        if let Err(e) = self.run_store.save_run(&run).await {
            warn!(run_id = %run.run_id, error = %e, "cannot save the buffered run; starting it anyway");
        }
        self.start_planned(run);
    }

    /// Live, not draining workers of `group` that run `handler`, by id.
    pub(super) fn candidates(
        &self,
        group: &str,
        handler: &str,
        exclude: Option<&str>,
    ) -> Vec<String> {
        self.workers
            .iter()
            .filter(|(id, w)| {
                !w.draining
                    && w.hello.group == group
                    && w.hello.handlers.iter().any(|h| h == handler)
                    && Some(id.as_str()) != exclude
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A worker for one shard by the job's routing, preferring not to use `avoid`.
    fn pick(
        &mut self,
        spec: &crate::model::JobSpec,
        job: &str,
        params: &str,
        avoid: Option<&str>,
    ) -> Option<String> {
        let mut cands = self.candidates(&spec.group, &spec.handler, avoid);
        if cands.is_empty() {
            cands = self.candidates(&spec.group, &spec.handler, None);
        }
        if cands.is_empty() {
            return None;
        }
        let n = cands.len();
        Some(match spec.routing {
            // A takeover or retry of a broadcast shard: the least loaded worker.
            Routing::ShardingBroadcast | Routing::LeastLoaded => self.least_loaded(&cands),
            Routing::RoundRobin => {
                let rr = self.jobs.get_mut(job).map_or(0, |j| {
                    j.rr += 1;
                    j.rr - 1
                });
                cands[(rr % n as u64) as usize].clone()
            }
            Routing::Random => cands[fastrand::usize(..n)].clone(),
            Routing::ConsistentHash => {
                let key = hash_key(params, &spec.hash_param);
                // Rendezvous hashing: stable while the worker set is.
                cands
                    .iter()
                    .max_by_key(|w| fnv1a64(format!("{key}\u{1}{w}").as_bytes()))
                    .cloned()?
            }
            Routing::LeastRecentlyUsed => cands
                .iter()
                .min_by_key(|w| self.workers.get(*w).map_or(0, |s| s.last_assigned_ms))
                .cloned()?,
            Routing::Failover | Routing::First => cands[0].clone(),
            Routing::Last => cands[n - 1].clone(),
            Routing::BusyOver => cands
                .iter()
                .find(|w| {
                    self.workers.get(*w).is_some_and(|s| {
                        !s.running
                            .iter()
                            .any(|(r, _)| self.runs.get(r).is_some_and(|x| x.job == job))
                    })
                })
                .cloned()
                .unwrap_or_else(|| cands[0].clone()),
        })
    }

    fn least_loaded(&self, cands: &[String]) -> String {
        cands
            .iter()
            .min_by_key(|w| {
                (
                    self.workers.get(*w).map_or(usize::MAX, |s| s.running.len()),
                    (*w).clone(),
                )
            })
            .cloned()
            .unwrap_or_default()
    }

    /// Gives shard `shard` of a run in progress to a (new) worker by the job's
    /// routing, preferring not to use `avoid`: a retry, a takeover, or a shard that
    /// was waiting for a worker. A new assignment number each time.
    pub(super) fn assign_shard(&mut self, run_id: &str, shard: u32, avoid: Option<String>) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let (job, params) = (run.job.clone(), run.params.clone());
        let worker = match self.jobs.get(&job).map(|j| j.spec.clone()) {
            Some(spec) => self.pick(&spec, &job, &params, avoid.as_deref()),
            None => None,
        };
        let now = self.now();
        let Some(s) = self
            .runs
            .get_mut(run_id)
            .and_then(|r| r.shards.get_mut(shard as usize))
        else {
            return;
        };
        if s.state.is_final() {
            return;
        }
        let previous = std::mem::take(&mut s.worker_id);
        match worker {
            Some(w) => {
                s.attempt += 1;
                s.worker_id = w;
                s.state = RunState::Running;
                s.started_at_ms = now;
            }
            None => s.state = RunState::Pending,
        }
        let placed = s.state == RunState::Running;
        if let Some(p) = self.workers.get_mut(&previous) {
            p.running.remove(&(run_id.to_owned(), shard));
        }
        if let Some(r) = self.runs.get_mut(run_id)
            && r.state == RunState::Pending
            && placed
        {
            r.state = RunState::Running;
        }
        if placed {
            self.send_assignment(run_id, shard);
        } else {
            self.wait_for_worker(run_id, shard);
        }
    }

    fn wait_for_worker(&mut self, run_id: &str, shard: u32) {
        let now = self.now();
        self.pending.insert((run_id.to_owned(), shard));
        self.schedule(now + 1_000, Timer::Pending);
    }

    /// Sends the current attempt of a shard to its worker (and arms its deadline).
    pub(super) fn send_assignment(&mut self, run_id: &str, shard: u32) {
        let now = self.now();
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let Some(s) = run.shards.get(shard as usize) else {
            return;
        };
        let timeout = self.jobs.get(&run.job).map_or(0, |j| j.spec.timeout_ms) as i64;
        let key = ShardKey {
            run_id: run_id.to_owned(),
            shard,
            attempt: s.attempt,
        };
        let worker = s.worker_id.clone();
        let a = Assignment {
            key: key.clone(),
            fire_id: run.fire_id.clone(),
            job: run.job.clone(),
            handler: self
                .jobs
                .get(&run.job)
                .map(|j| j.spec.handler.clone())
                .unwrap_or_default(),
            params: run.params.clone(),
            shard_params: s.shard_params.clone(),
            shard_total: s.total,
            deadline_ms: if timeout > 0 { now + timeout } else { 0 },
            scheduled_at_ms: run.scheduled_at_ms,
        };
        self.pending.remove(&(run_id.to_owned(), shard));
        if !self.send(&worker, ToWorker::Assign(a)) {
            warn!(worker_id = %worker, run_id, shard, "assignment could not be sent; placing it elsewhere");
            if let Some(s) = self
                .runs
                .get_mut(run_id)
                .and_then(|r| r.shards.get_mut(shard as usize))
            {
                s.state = RunState::Pending;
                s.worker_id.clear();
            }
            self.wait_for_worker(run_id, shard);
            return;
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.running.insert((run_id.to_owned(), shard));
            w.last_assigned_ms = now;
        }
        if timeout > 0 {
            self.schedule(now + timeout, Timer::Deadline(key));
        }
    }

    /// Tries again to place shards that had no worker.
    pub(super) fn place_pending(&mut self) {
        // Right after taking over, workers may still report shards of adopted runs
        // they run: those wait for the grace. This leader's own runs (a misfire
        // fired at startup before any worker registered) need not.
        let adopting = self.now() < self.adopt_until;
        if adopting {
            let at = self.adopt_until;
            self.schedule(at, Timer::Pending);
        }
        let pending: Vec<(String, u32)> = self.pending.iter().cloned().collect();
        for (run_id, shard) in pending {
            if adopting
                && self
                    .runs
                    .get(&run_id)
                    .is_some_and(|r| r.fence != self.fence)
            {
                continue;
            }
            let waiting = self
                .runs
                .get(&run_id)
                .and_then(|r| r.shards.get(shard as usize))
                .is_some_and(|s| s.state == RunState::Pending && s.worker_id.is_empty());
            if waiting {
                self.assign_shard(&run_id, shard, None);
            } else {
                self.pending.remove(&(run_id, shard));
            }
        }
    }
}

/// What a job's overlap policy makes of a new fire, given what the job runs now.
enum OverlapCall {
    /// Start it, after cancelling these runs (`cancel-running`).
    Start { cover: Vec<String> },
    /// Skip it, with this note.
    Skip(&'static str),
    /// Keep it as the job's one waiting fire.
    Buffer,
}

/// The overlap policy of `j` applied to a new fire (at planning, and again when a
/// fire prepared ahead goes out).
fn overlap_call(j: &super::JobState) -> OverlapCall {
    if j.running.is_empty() {
        return OverlapCall::Start { cover: Vec::new() };
    }
    match j.spec.overlap {
        Overlap::Allow => OverlapCall::Start { cover: Vec::new() },
        Overlap::Skip => OverlapCall::Skip("skipped: the previous run is still going"),
        Overlap::BufferOne if j.buffered.is_some() => {
            OverlapCall::Skip("skipped: one fire is already waiting")
        }
        Overlap::BufferOne => OverlapCall::Buffer,
        Overlap::CancelRunning => OverlapCall::Start {
            cover: j.running.iter().cloned().collect(),
        },
    }
}

/// The note of a buffered fire's run record.
pub(crate) const BUFFERED: &str = "buffered until the running run ends";

/// The value consistent hashing hashes: the top-level JSON field `param` of the
/// params, or the whole params.
fn hash_key(params: &str, param: &str) -> String {
    if param.is_empty() {
        return params.to_owned();
    }
    serde_json::from_str::<serde_json::Value>(params)
        .ok()
        .and_then(|v| v.get(param).cloned())
        .map(|v| match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
        .unwrap_or_default()
}
