//! Firing, in the core. Every fire is decided first (*plan*: the overlap policy,
//! the run, which worker each shard goes to), then recorded in one store request
//! together with the planned run (which refuses a duplicate fire id and a deposed
//! leader), and only then carried out (*apply*: assignments sent). A leader that
//! dies after the record leaves a run a new leader adopts; one that dies before
//! leaves nothing, and the tick is a misfire for the next leader. Also: misfire
//! policies, placing shards, and sending them.
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
//! shards whose planned worker left (or is full) to another.
//!
//! Shards planned for a worker count against its capacity from the plan on (they
//! are *reserved*), so a batch of a thousand fires planned at once never plans
//! more shards for a worker than it has room for.

use std::collections::{BTreeMap, VecDeque};

use tracing::{debug, info, warn};

use super::ShardKey;
use super::machine::{CallId, Effect, Machine, Reply, Request, Timer, Waiting, Work};
use super::routing::{self, Candidate};
use super::workers::{Assignment, ToWorker};
use crate::error::CoordError;
use crate::model::{JobSpec, Misfire, Overlap, Routing, RunRecord, RunState, ShardRecord};
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
    pub(super) fn run(&self) -> &RunRecord {
        match self {
            Plan::Start { run, .. } | Plan::Skip(run) | Plan::Buffer(run) => run,
        }
    }
}

/// Fires recorded in one store request before they are applied (see `fire_many`).
const RECORD_SLICE: usize = 100;

/// Fires prepared ahead recorded in one store request. They go out at their
/// instant, not when recorded, so nothing waits for the first of a slice; a big
/// slice lets the store send its script calls back to back (10,000 jobs on one
/// second are recorded in 10 requests instead of 100, each a round trip and a
/// step of the engine).
const PREPARED_SLICE: usize = 1_000;

/// Prepared runs sent in one step at their instant: the first assignments of a big
/// batch leave while the core makes the next ones.
const SEND_SLICE: usize = 50;

/// How long before its instant a tick whose job was busy at its first look is
/// looked at again (see `prepare_ticks`); a lead no longer than this gives one look.
pub(super) const LATE_LEAD_MS: i64 = 250;

/// A fire to plan.
#[derive(Debug)]
pub(super) struct Fire {
    pub(super) job: String,
    pub(super) at: i64,
    pub(super) cause: &'static str,
    pub(super) params: Option<String>,
    pub(super) parent: String,
    pub(super) run_id: String,
    pub(super) fire_id: String,
    /// A workflow run's nodes as they start (a rerun's); empty: from the
    /// workflow's definition.
    pub(super) nodes: Vec<crate::workflow::NodeRecord>,
}

/// Whether a run of this cause is a tick of its job's schedule (scheduled,
/// misfired, buffered): only those move the job's last fired instant, and only
/// those are kept to report when the store cannot record them.
pub(super) fn is_tick(cause: &str) -> bool {
    !matches!(
        cause,
        "manual" | "child" | super::flows::NODE_CAUSE | super::flows::RERUN_CAUSE
    )
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
            nodes: Vec::new(),
        }
    }
}

/// How recorded plans are carried out.
#[derive(Debug)]
pub(super) enum Settle {
    /// At once.
    Fire,
    /// At their instant (fires prepared ahead): fire id → (go at, job generation).
    Prepared(BTreeMap<String, (i64, u64)>),
}

/// Planned fires being recorded a slice at a time.
#[derive(Debug)]
pub(super) struct Recording {
    /// Plans not recorded yet (None: nothing to record, e.g. the job was deleted).
    pub(super) plans: VecDeque<Option<Plan>>,
    pub(super) settle: Settle,
    /// Each fire's run, in order (None: not recorded).
    pub(super) out: Vec<Option<RunRecord>>,
    /// The call the first fire's run answers.
    pub(super) reply: Option<CallId>,
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
        nodes: Vec::new(),
    }
}

impl Machine {
    /// Fires due ticks: plans each, records them, applies the recorded ones, and
    /// arms each job's next tick.
    pub(super) fn fire_ticks(&mut self, ticks: Vec<(String, i64, bool)>) {
        for (job, at, rearm) in &ticks {
            if *rearm {
                self.schedule_next(job, *at);
            }
        }
        let fires = ticks
            .into_iter()
            .map(|(j, at, _)| Fire::tick(&j, at, "scheduled"))
            .collect();
        self.fire_many(fires, None);
    }

    /// Prepares ticks ahead of their instant: each job's next tick is armed, and
    /// the fire is planned and recorded now and sent at the instant (`go_prepared`).
    /// A job with a run going or waiting (or another prepared fire) is fired at the
    /// instant instead, where its overlap policy sees what runs then.
    ///
    /// A job busy when its tick is first looked at (a long lead: its run of the
    /// last second may still be going) is looked at again [`LATE_LEAD_MS`] before
    /// the instant, when that run has most likely ended, rather than fired at the
    /// instant straight away: at 10,000 jobs a second, recording at the instant is
    /// what makes a second late.
    pub(super) fn prepare_ticks(&mut self, ticks: Vec<(String, i64, i64, u64)>) {
        let mut go_at = BTreeMap::new();
        let mut plans = VecDeque::new();
        for (job, at, go, generation) in ticks {
            let idle = self.jobs.get(&job).is_some_and(|j| {
                j.running.is_empty() && j.buffered.is_none() && j.prepared.is_none()
            });
            if !idle && !self.fenced_out && go - LATE_LEAD_MS > self.now {
                self.timers.schedule(
                    go - LATE_LEAD_MS,
                    super::machine::Timer::Prepare {
                        job,
                        at,
                        go_at: go,
                        generation,
                    },
                );
                continue;
            }
            self.schedule_next(&job, at);
            if !idle || self.fenced_out {
                self.fire_at(go, job, at, generation, false);
                continue;
            }
            let f = Fire::tick(&job, at, "scheduled");
            go_at.insert(f.fire_id.clone(), (go, generation));
            let plan = self.plan(f).map(|mut p| {
                // Times as they will be when it goes out.
                if let Plan::Start { run, .. } = &mut p {
                    run.fired_at_ms = go;
                    for s in run.shards.iter_mut().filter(|s| s.started_at_ms > 0) {
                        s.started_at_ms = go;
                    }
                }
                p
            });
            plans.push_back(plan);
        }
        if !plans.is_empty() {
            self.spawn(Work::Record(Recording {
                plans,
                settle: Settle::Prepared(go_at),
                out: Vec::new(),
                reply: None,
            }));
        }
    }

    /// Plans fires and starts recording them (see `record_next`); the first one's
    /// run (or an error) answers `reply`.
    ///
    /// Fires are recorded and applied a slice at a time, so the first fires of a
    /// big batch (a thousand jobs on the same second) reach their workers while
    /// later slices are still being recorded, instead of all waiting for the last
    /// record. Each fire is still recorded before it is dispatched.
    pub(super) fn fire_many(&mut self, fires: Vec<Fire>, reply: Option<CallId>) {
        if self.fenced_out {
            if let Some(call) = reply {
                self.reply_run(call, None);
            }
            return;
        }
        let plans = fires.into_iter().map(|f| self.plan(f)).collect();
        self.spawn(Work::Record(Recording {
            plans,
            settle: Settle::Fire,
            out: Vec::new(),
            reply,
        }));
    }

    /// Asks the store to record the next slice of `rec`, or finishes it.
    pub(super) fn record_next(&mut self, mut rec: Recording) {
        loop {
            if rec.plans.is_empty() {
                self.recording_done(rec);
                return;
            }
            let slice_len = match rec.settle {
                Settle::Fire => RECORD_SLICE,
                Settle::Prepared(_) => PREPARED_SLICE,
            };
            let n = rec.plans.len().min(slice_len);
            let mut slice: Vec<Option<Plan>> = rec.plans.drain(..n).collect();
            let reported = if self.fenced_out {
                Vec::new()
            } else {
                self.carry_backlog(&mut slice, &mut rec.settle)
            };
            if self.fenced_out {
                for p in slice {
                    if let Some(p) = &p {
                        self.release(p.run());
                    }
                    rec.out.push(None);
                }
                continue;
            }
            let fires: Vec<FireRecord> = reported
                .iter()
                .cloned()
                .chain(slice.iter().flatten().map(|p| FireRecord {
                    fire_id: p.run().fire_id.clone(),
                    job: p.run().job.clone(),
                    at: p.run().scheduled_at_ms,
                    run: p.run().clone(),
                }))
                .collect();
            if fires.is_empty() {
                rec.out.extend(slice.iter().map(|_| None));
                continue;
            }
            let fence = self.fence;
            self.request(
                Request::Record { fence, fires },
                Waiting::Record {
                    rec,
                    slice,
                    reported,
                },
            );
            return;
        }
    }

    /// The store answered the record of `slice`: settle each fire, then go on.
    pub(super) fn record_answered(
        &mut self,
        mut rec: Recording,
        slice: Vec<Option<Plan>>,
        answer: std::result::Result<Vec<FireAnswer>, String>,
    ) {
        match answer {
            Err(e) => {
                // Without the record a fire could happen twice (or, for a deposed
                // leader, at all): settle this slice and the rest as unrecorded.
                let left = slice.len() + rec.plans.len();
                if matches!(rec.settle, Settle::Fire) {
                    warn!(error = %e, fires = left, "cannot record fires; not firing them");
                    metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "unrecorded")
                        .increment(left as u64);
                } else {
                    warn!(error = %e, fires = left, "cannot record fires ahead; firing them at their instant");
                }
                let rest: Vec<Option<Plan>> = rec.plans.drain(..).collect();
                // The store may have applied the record all the same.
                let retried = slice
                    .iter()
                    .chain(rest.iter())
                    .flatten()
                    .map(Plan::run)
                    .filter(|r| is_tick(&r.cause) || r.cause == super::flows::NODE_CAUSE)
                    .map(|r| r.fire_id.clone());
                self.maybe_recorded.extend(retried);
                if matches!(rec.settle, Settle::Fire) {
                    // Neither fired nor in the history: kept, so they are reported
                    // (or fired late, per the misfire policy) once the store is back.
                    let ticks: Vec<(String, i64)> = slice
                        .iter()
                        .chain(rest.iter())
                        .flatten()
                        .map(Plan::run)
                        .filter(|r| is_tick(&r.cause))
                        .map(|r| (r.job.clone(), r.scheduled_at_ms))
                        .collect();
                    self.keep_unrecorded(ticks.iter().map(|(j, t)| (j.as_str(), *t)));
                }
                for plan in slice.into_iter().chain(rest) {
                    let run = plan.and_then(|p| self.settle(&rec.settle, p, None));
                    rec.out.push(run);
                }
                self.arm_going();
                self.recording_done(rec);
            }
            Ok(answers) => {
                let mut answers = answers.into_iter();
                for plan in slice {
                    let Some(plan) = plan else {
                        rec.out.push(None);
                        continue;
                    };
                    // A short answer list counts as duplicates: never fire unrecorded.
                    let answer = answers.next().unwrap_or(FireAnswer::Duplicate);
                    let run = self.settle(&rec.settle, plan, Some(answer));
                    rec.out.push(run);
                }
                self.arm_going();
                self.spawn(Work::Record(rec));
                // The store records again: the ticks it could not are handled now.
                self.misfire_unrecorded();
            }
        }
    }

    fn recording_done(&mut self, mut rec: Recording) {
        if let Some(call) = rec.reply {
            let first = if rec.out.is_empty() {
                None
            } else {
                rec.out.swap_remove(0)
            };
            self.reply_run(call, first);
        }
    }

    fn reply_run(&mut self, call: CallId, run: Option<RunRecord>) {
        let r = run.ok_or_else(|| CoordError::Unavailable("the fire could not be recorded".into()));
        self.effect(Effect::Reply(call, Reply::Run(r)));
    }

    fn settle(
        &mut self,
        how: &Settle,
        plan: Plan,
        answer: Option<FireAnswer>,
    ) -> Option<RunRecord> {
        let own = self.own_lost_record(&plan.run().fire_id, answer);
        if own != answer {
            // The store holds the plan of the lost record, not this one: this plan
            // is written before any of its shards goes out, so a leader adopting
            // the run after a crash finds the shards as sent (same total, same
            // workers).
            self.effect(Effect::SaveNow(plan.run().clone()));
        }
        let answer = own;
        match how {
            Settle::Fire => self.settle_fire(plan, answer),
            Settle::Prepared(go_at) => {
                let (go, generation) = go_at
                    .get(&plan.run().fire_id)
                    .copied()
                    .unwrap_or((plan.run().scheduled_at_ms, 0));
                self.settle_prepared(plan, answer, go, generation)
            }
        }
    }

    /// What a record's `answer` means for `fire_id`: a duplicate of a fire whose
    /// earlier record failed (see `Machine::maybe_recorded`) was recorded by this
    /// leader's lost request and never sent, so it counts as recorded now. The
    /// fence is checked before the fire ids, so another leader's record of it
    /// would have answered `Fenced`, and a fire recorded again here was never
    /// sent: the record failed, so it was settled unrecorded.
    pub(super) fn own_lost_record(
        &mut self,
        fire_id: &str,
        answer: Option<FireAnswer>,
    ) -> Option<FireAnswer> {
        match answer {
            Some(FireAnswer::Duplicate) if self.maybe_recorded.remove(fire_id) => {
                info!(
                    fire_id,
                    "the store had applied a record whose answer was lost; taking it as recorded"
                );
                Some(FireAnswer::Recorded)
            }
            Some(FireAnswer::Recorded) => {
                self.maybe_recorded.remove(fire_id);
                answer
            }
            answer => answer,
        }
    }

    /// Applies one planned fire by what its record answered (None: not recorded,
    /// so not fired).
    fn settle_fire(&mut self, plan: Plan, answer: Option<FireAnswer>) -> Option<RunRecord> {
        self.release(plan.run());
        if plan.run().cause == super::flows::NODE_CAUSE {
            self.node_fire_settled(plan.run(), answer);
        }
        match answer.unwrap_or(FireAnswer::Duplicate) {
            FireAnswer::Recorded => {
                let run = plan.run().clone();
                self.note_fired(&run);
                self.meters
                    .trigger_lag
                    .record((run.fired_at_ms - run.scheduled_at_ms).max(0) as f64 / 1000.0);
                self.apply(plan);
                Some(run)
            }
            FireAnswer::Duplicate => {
                debug!(fire_id = %plan.run().fire_id, "fire already recorded; skipping");
                None
            }
            FireAnswer::Fenced => {
                if !self.fenced_out {
                    warn!("fencing token is stale: another coordinator leads; not firing");
                    self.effect(Effect::LostLead);
                }
                self.fenced_out = true;
                None
            }
        }
    }

    /// Arms one [`Timer::Go`] per instant for the runs just recorded ahead.
    fn arm_going(&mut self) {
        let mut going = std::mem::take(&mut self.runs.going).into_iter().peekable();
        while let Some((at, first)) = going.next() {
            let mut ids = vec![first];
            while let Some((_, id)) = going.next_if(|(next, _)| *next == at) {
                ids.push(id);
            }
            self.timers.schedule(at, Timer::Go(ids));
        }
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
            // Its shards stay reserved for their workers until it goes out.
            (Plan::Start { run, .. }, Some(FireAnswer::Recorded)) => {
                self.note_fired(&run);
                if let Some(j) = self.jobs.get_mut(&run.job) {
                    j.prepared = Some(run.run_id.clone());
                }
                let run_id = run.run_id.clone();
                self.runs.prepared.insert(run_id.clone(), run.clone());
                self.runs.going.push((go_at, run_id));
                Some(run)
            }
            // Not recorded (the store failed): try the ordinary way at the instant.
            (plan, None) => {
                self.release(plan.run());
                let run = plan.run();
                let (job, at) = (run.job.clone(), run.scheduled_at_ms);
                self.fire_at(go_at, job, at, generation, false);
                None
            }
            // A duplicate, a stale fence, or a recorded skip or buffer (which an idle
            // job's plan never is): as any fire.
            (plan, answer) => self.settle_fire(plan, answer),
        }
    }

    /// The instant of prepared runs came: unless the fencing token went stale
    /// (checked first), each goes out (see `go_one`). The runs stay prepared until
    /// their slice is sent, so the check is asked before any per-run work: at
    /// 10,000 runs on one instant, the first assignments leave one round trip after
    /// it rather than after 10,000 take-outs and the round trip.
    pub(super) fn go_prepared(&mut self, mut run_ids: Vec<String>) {
        run_ids.retain(|id| self.runs.prepared.contains_key(id));
        if run_ids.is_empty() || self.fenced_out {
            return;
        }
        let fence = self.fence;
        self.request(Request::CheckFence { fence }, Waiting::Fence(run_ids));
    }

    /// The fence check before prepared runs go out answered.
    pub(super) fn fence_answered(
        &mut self,
        ready: Vec<String>,
        answer: std::result::Result<bool, String>,
    ) {
        match answer {
            Ok(true) => {
                // A slice per step: the driver sends each before the next is made.
                let mut ready = ready.into_iter().peekable();
                while ready.peek().is_some() {
                    self.spawn(Work::Send(ready.by_ref().take(SEND_SLICE).collect()));
                }
            }
            Ok(false) => {
                // The runs stay recorded: the newer leader adopts and sends them.
                warn!(
                    runs = ready.len(),
                    "fencing token is stale: another coordinator leads; not sending prepared fires"
                );
                for id in &ready {
                    self.take_prepared(id);
                }
                if !self.fenced_out {
                    self.effect(Effect::LostLead);
                }
                self.fenced_out = true;
            }
            Err(e) => {
                // Unsure who leads: ask again shortly (late rather than twice). The
                // runs are still prepared, their shards still reserved.
                warn!(error = %e, runs = ready.len(), "cannot check the fencing token; retrying");
                let retry = self.now + 100;
                self.timers.schedule(retry, Timer::Go(ready));
            }
        }
    }

    /// Sends a slice of prepared runs whose fence check passed (a run killed or
    /// taken back since is no longer prepared, and is not sent).
    pub(super) fn send_prepared(&mut self, ids: Vec<String>) {
        for id in ids {
            if let Some(run) = self.take_prepared(&id) {
                self.go_one(run);
            }
        }
    }

    /// Takes a prepared run out (its instant came, or it was killed), releasing
    /// its reserved shards.
    fn take_prepared(&mut self, run_id: &str) -> Option<RunRecord> {
        let run = self.runs.prepared.remove(run_id)?;
        if let Some(j) = self.jobs.get_mut(&run.job) {
            j.prepared = None;
        }
        self.release(&run);
        Some(run)
    }

    /// Sends one prepared run, after what changed since it was planned: its job
    /// paused or deleted (dropped as skipped), a run started meanwhile (the overlap
    /// policy again), a planned worker gone, draining or full (the shard goes to
    /// another).
    pub(super) fn go_one(&mut self, mut run: RunRecord) {
        let now = self.now;
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
        // Shards planned with no worker (none was connected when the run was
        // prepared, e.g. right after an election) are placed now when no other
        // shard waits for a worker: one may have come since, and the next
        // placement round would make them a second late. When shards do wait (for
        // capacity), these queue behind them.
        let mut moved: Vec<u32> = if self.runs.pending.is_empty() {
            run.shards
                .iter()
                .filter(|s| s.state == RunState::Pending && s.worker_id.is_empty())
                .map(|s| s.index)
                .collect()
        } else {
            Vec::new()
        };
        let mut kept: BTreeMap<String, usize> = BTreeMap::new();
        for s in run
            .shards
            .iter_mut()
            .filter(|s| s.state == RunState::Running)
        {
            let extra = kept.get(&s.worker_id).copied().unwrap_or(0);
            if self.has_room(&s.worker_id, extra) {
                *kept.entry(s.worker_id.clone()).or_default() += 1;
                s.started_at_ms = now;
            } else {
                s.state = RunState::Pending;
                s.worker_id.clear();
                s.started_at_ms = 0;
                moved.push(s.index);
            }
        }
        self.meters
            .trigger_lag
            .record((now - run.scheduled_at_ms).max(0) as f64 / 1000.0);
        let run_id = run.run_id.clone();
        self.apply(Plan::Start { run, cover });
        if !moved.is_empty() {
            for shard in moved {
                self.assign_shard(&run_id, shard, None);
            }
            if let Some(r) = self.runs.active.get(&run_id).cloned() {
                self.save(&r);
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
        let run = self.take_prepared(run_id)?;
        Some(self.end_prepared(run, state, note))
    }

    /// Ends a prepared run that will not go out, in the history.
    fn end_prepared(&mut self, mut run: RunRecord, state: RunState, note: &str) -> RunRecord {
        debug!(run_id = %run.run_id, note, "prepared fire not sent");
        run.state = state;
        run.note = note.to_owned();
        run.finished_at_ms = self.now;
        run.shards.clear();
        // A workflow run's nodes end with it: none of them was fired.
        for n in run.nodes.iter_mut() {
            n.state = state;
            n.error = note.to_owned();
            n.finished_at_ms = self.now;
        }
        self.save(&run);
        metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "skipped").increment(1);
        run
    }

    /// A scheduled tick was recorded: it is its job's last fired instant.
    fn note_fired(&mut self, run: &RunRecord) {
        if let Some(j) = self.jobs.get_mut(&run.job)
            && is_tick(&run.cause)
        {
            j.last_fire = Some(
                j.last_fire
                    .map_or(run.scheduled_at_ms, |l| l.max(run.scheduled_at_ms)),
            );
        }
    }

    /// Takes into `slice`'s request the older ticks of its jobs that the store
    /// could not record (`Machine::unrecorded`): those the misfire policy fires
    /// are planned into the slice ahead of the newer tick, and the others are
    /// answered as skipped reports recorded in the same request, ahead of it.
    ///
    /// Why in the same request: a job's newest recorded instant is where a new
    /// leader starts looking for missed ticks. Recorded alone, a newer tick would
    /// move it past the older ones, and a crash before they were reported lost
    /// them unreported. The store applies a request's records in order, so the
    /// older ticks are never behind a newer one.
    pub(super) fn carry_backlog(
        &mut self,
        slice: &mut Vec<Option<Plan>>,
        settle: &mut Settle,
    ) -> Vec<FireRecord> {
        if self.unrecorded.is_empty() {
            return Vec::new();
        }
        // The newest tick of each job in the slice.
        let mut newest: BTreeMap<String, i64> = BTreeMap::new();
        for run in slice.iter().flatten().map(Plan::run) {
            if is_tick(&run.cause) {
                let t = newest.entry(run.job.clone()).or_insert(run.scheduled_at_ms);
                *t = (*t).max(run.scheduled_at_ms);
            }
        }
        let mut reported = Vec::new();
        let mut planned = Vec::new();
        for (job, at) in newest {
            let Some(backlog) = self.unrecorded.get_mut(&job) else {
                continue;
            };
            let older: Vec<i64> = backlog.range(..at).copied().collect();
            for t in &older {
                backlog.remove(t);
            }
            if backlog.is_empty() {
                self.unrecorded.remove(&job);
            }
            if older.is_empty() {
                continue;
            }
            let (fire, skip) = self.misfire_split(&job, older);
            let fence = self.fence;
            for t in skip {
                let f = Fire::tick(&job, t, "misfire");
                let mut run = bare_run(
                    &f,
                    self.now,
                    RunState::Skipped,
                    "missed tick: the store could not record it",
                );
                run.fence = fence;
                reported.push(FireRecord {
                    fire_id: f.fire_id.clone(),
                    job: job.clone(),
                    at: t,
                    run,
                });
            }
            let generation = self.jobs.get(&job).map_or(0, |j| j.generation);
            for t in fire {
                let f = Fire::tick(&job, t, "misfire");
                // Late already: a prepared slice sends it as soon as it is
                // recorded (or, if the record fails, fires it again at once under
                // the job's live generation).
                if let Settle::Prepared(go_at) = settle {
                    go_at.insert(f.fire_id.clone(), (self.now, generation));
                }
                planned.push(self.plan(f));
            }
        }
        if !planned.is_empty() {
            planned.append(slice);
            *slice = planned;
        }
        if !reported.is_empty() {
            metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "skipped")
                .increment(reported.len() as u64);
        }
        reported
    }

    /// The answer to a record that carried `reported` (skipped reports, first in
    /// the request) ahead of a slice: the reports' answers are taken off, and the
    /// rest is the slice's.
    pub(super) fn backlog_answered(
        &mut self,
        reported: Vec<FireRecord>,
        answer: std::result::Result<Vec<FireAnswer>, String>,
    ) -> std::result::Result<Vec<FireAnswer>, String> {
        if reported.is_empty() {
            return answer;
        }
        match answer {
            Err(e) => {
                self.maybe_recorded
                    .extend(reported.iter().map(|f| f.fire_id.clone()));
                self.keep_unrecorded(reported.iter().map(|f| (f.job.as_str(), f.at)));
                Err(e)
            }
            Ok(mut answers) => {
                let rest = answers.split_off(reported.len().min(answers.len()));
                self.skipped_answered(&reported, answers);
                Ok(rest)
            }
        }
    }

    /// The store recorded skipped reports `fires`: a duplicate of this leader's own
    /// lost record of the tick (a fire never sent, or this very report) is
    /// replaced by the report.
    pub(super) fn skipped_answered(&mut self, fires: &[FireRecord], answers: Vec<FireAnswer>) {
        for (f, a) in fires.iter().zip(answers) {
            if a == FireAnswer::Duplicate
                && self.own_lost_record(&f.fire_id, Some(a)) == Some(FireAnswer::Recorded)
            {
                self.save(&f.run);
            }
        }
    }

    /// Keeps scheduled ticks the store could not record (see `Machine::unrecorded`).
    pub(super) fn keep_unrecorded<'a>(&mut self, ticks: impl Iterator<Item = (&'a str, i64)>) {
        for (job, at) in ticks {
            self.unrecorded
                .entry(job.to_owned())
                .or_default()
                .insert(at);
        }
    }

    /// Applies each job's misfire policy to the ticks the store could not record.
    fn misfire_unrecorded(&mut self) {
        for (job, ticks) in std::mem::take(&mut self.unrecorded) {
            warn!(
                job,
                ticks = ticks.len(),
                "ticks the store could not record; handling them as missed"
            );
            self.misfire(&job, ticks.into_iter().collect());
        }
    }

    /// Missed `ticks` of `job` (in order) → (those its misfire policy fires, those
    /// it skips). A job that is gone skips them all.
    fn misfire_split(&self, job: &str, ticks: Vec<i64>) -> (Vec<i64>, Vec<i64>) {
        let Some(j) = self.jobs.get(job) else {
            return (Vec::new(), ticks);
        };
        let (policy, window) = (j.spec.misfire, j.spec.catch_up_window_ms as i64);
        let now = self.now;
        match policy {
            Misfire::Skip => (Vec::new(), ticks),
            Misfire::FireOnce => {
                let last = ticks.last().copied();
                (
                    last.into_iter().collect(),
                    ticks[..ticks.len().saturating_sub(1)].to_vec(),
                )
            }
            Misfire::FireAll => ticks.into_iter().partition(|t| now - t <= window),
        }
    }

    /// Ticks no coordinator fired (found at startup, or not recorded while the
    /// store was down), per the misfire policy.
    pub(super) fn misfire(&mut self, job: &str, ticks: Vec<i64>) {
        let Some(j) = self.jobs.get(job) else { return };
        let policy = j.spec.misfire;
        let (fire, skip) = self.misfire_split(job, ticks);
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
            );
        }
        if !fire.is_empty() {
            let fires = fire
                .into_iter()
                .map(|t| Fire::tick(job, t, "misfire"))
                .collect();
            self.spawn(Work::Fire { fires, reply: None });
        }
    }

    /// Reports skipped ticks in the run history (recorded like fires, so a tick is
    /// never both skipped and fired): one run per tick for the latest hundred, and
    /// one summary run for the rest.
    fn report_skipped(&mut self, job: &str, ticks: &[i64], why: &str) {
        let now = self.now;
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
        self.spawn(Work::RecordSkipped(records));
        metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "skipped")
            .increment(ticks.len() as u64);
    }

    /// Fires a job now (admin trigger); the run answers `call`.
    pub(super) fn trigger(&mut self, call: CallId, job: &str, params: Option<String>) {
        let refused = if !self.jobs.contains_key(job) {
            Some(CoordError::NotFound(format!("job {job:?}")))
        } else if params
            .as_ref()
            .is_some_and(|p| p.len() > crate::model::MAX_PARAMS_BYTES)
        {
            Some(CoordError::invalid("params", "is larger than 64 KiB"))
        } else {
            None
        };
        if let Some(e) = refused {
            self.effect(Effect::Reply(call, Reply::Run(Err(e))));
            return;
        }
        let now = self.now;
        let id = format!("{job}@m{now}-{:04x}", self.rng.u16(..));
        let fire = Fire {
            job: job.to_owned(),
            at: now,
            cause: "manual",
            params,
            parent: String::new(),
            run_id: id.clone(),
            fire_id: id,
            nodes: Vec::new(),
        };
        self.spawn(Work::Fire {
            fires: vec![fire],
            reply: Some(call),
        });
    }

    /// Decides what a fire does (no side effect but routing counters and the
    /// shards it reserves).
    fn plan(&mut self, f: Fire) -> Option<Plan> {
        let now = self.now;
        let fence = self.fence;
        let fenced = |mut r: RunRecord| {
            r.fence = fence;
            r
        };
        let job = self.jobs.get(&f.job)?;
        // A node's run always starts: the workflow as a whole has the overlap
        // policy (a node skipped for its job's would stall the workflow).
        let call = if f.cause == super::flows::NODE_CAUSE {
            OverlapCall::Start { cover: Vec::new() }
        } else {
            overlap_call(job)
        };
        let cover = match call {
            OverlapCall::Start { cover } => cover,
            OverlapCall::Skip(note) => {
                return Some(Plan::Skip(fenced(bare_run(
                    &f,
                    now,
                    RunState::Skipped,
                    note,
                ))));
            }
            OverlapCall::Buffer => {
                return Some(Plan::Buffer(fenced(bare_run(
                    &f,
                    now,
                    RunState::Pending,
                    BUFFERED,
                ))));
            }
        };
        let (job, params) = (f.job.clone(), f.params.clone());
        Some(Plan::Start {
            run: self.plan_run(&job, f, params, now),
            cover,
        })
    }

    /// The run of a fire with its shards and the worker each goes to; the shards
    /// it places are reserved for their workers (see [`Machine::release`]).
    fn plan_run(&mut self, job: &str, mut f: Fire, params: Option<String>, now: i64) -> RunRecord {
        let spec = match self.jobs.get(job) {
            Some(j) => j.spec.clone(),
            None => return bare_run(&f, now, RunState::Skipped, "job deleted"),
        };
        if let Some(wf) = &spec.workflow {
            // No shards: its nodes start once it is recorded (`start_planned`).
            let mut run = bare_run(&f, now, RunState::Running, "");
            run.fence = self.fence;
            run.params = params.unwrap_or(spec.params.clone());
            run.nodes = match std::mem::take(&mut f.nodes) {
                n if n.is_empty() => crate::workflow::NodeRecord::plan(&spec.name, wf),
                n => n,
            };
            return run;
        }
        let live = self.candidates(&spec, None);
        let total = if spec.routing == Routing::ShardingBroadcast {
            if spec.shard_count > 0 {
                spec.shard_count
            } else {
                live.len().max(1) as u32
            }
        } else {
            1
        };
        let mut run = bare_run(&f, now, RunState::Pending, "");
        run.fence = self.fence;
        run.params = params.unwrap_or(spec.params.clone());
        for i in 0..total {
            let worker = if spec.routing == Routing::ShardingBroadcast {
                // Stable spread: shard i goes to the i-th live worker (by id),
                // wrapping; a full one gives way to the least loaded with room.
                match live.get(i as usize % live.len().max(1)) {
                    Some(w) if self.has_room(w, 0) => Some(w.clone()),
                    Some(_) => self.pick(&spec, &run.job, &run.params, None),
                    None => None,
                }
            } else {
                self.pick(&spec, &run.job, &run.params, None)
            };
            if let Some(w) = &worker {
                *self.workers.reserved.entry(w.clone()).or_default() += 1;
            }
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

    /// Counts the placed shards of a planned run against their workers' capacity.
    pub(super) fn reserve(&mut self, run: &RunRecord) {
        for s in run.shards.iter().filter(|s| s.state == RunState::Running) {
            *self
                .workers
                .reserved
                .entry(s.worker_id.clone())
                .or_default() += 1;
        }
    }

    /// Undoes [`Machine::reserve`] (the run went out, or will not).
    pub(super) fn release(&mut self, run: &RunRecord) {
        for s in run.shards.iter().filter(|s| s.state == RunState::Running) {
            if let Some(n) = self.workers.reserved.get_mut(&s.worker_id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.workers.reserved.remove(&s.worker_id);
                }
            }
        }
    }

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
                self.meters.fired.increment(1);
                self.fired_in_step += 1;
                debug!(run_id = %run.run_id, shards = run.shards.len(), cause = %run.cause, "run started");
                self.start_planned(run);
            }
        }
    }

    /// Takes a planned run in and sends its assignments.
    pub(super) fn start_planned(&mut self, run: RunRecord) {
        if let Some(j) = self.jobs.get_mut(&run.job) {
            j.running.insert(run.run_id.clone());
        }
        // The assignments are built from the run in hand, before it moves into the
        // book: at 10,000 fires on one instant, looking each run up again per shard
        // was a measurable share of the time the last fire waited.
        let mut sends = Vec::with_capacity(run.shards.len());
        let mut waiting = Vec::new();
        for s in &run.shards {
            if s.state == RunState::Running {
                sends.push((s.worker_id.clone(), self.assignment(&run, s)));
            } else {
                waiting.push(s.index);
            }
        }
        let run_id = run.run_id.clone();
        let workflow = run.is_workflow();
        self.runs.active.insert(run_id.clone(), run);
        for (worker, a) in sends {
            self.deliver(worker, a);
        }
        for i in waiting {
            self.wait_for_worker(&run_id, i);
        }
        if workflow {
            self.advance(&run_id);
        }
    }

    /// The fence check before buffered fires start answered: they start if this
    /// coordinator still leads (a buffered fire was recorded long before it goes
    /// out, like a prepared one; a deposed leader must not send it).
    pub(super) fn buffered_answered(
        &mut self,
        fires: Vec<(String, i64, String)>,
        answer: std::result::Result<bool, String>,
    ) {
        match answer {
            Ok(true) => {
                for (job, at, run_id) in fires {
                    self.start_buffered(&job, at, run_id);
                }
            }
            Ok(false) => {
                warn!(
                    fires = fires.len(),
                    "fencing token is stale: another coordinator leads; not starting buffered fires"
                );
                if !self.fenced_out {
                    self.effect(Effect::LostLead);
                }
                self.fenced_out = true;
            }
            Err(e) => {
                warn!(error = %e, fires = fires.len(), "cannot check the fencing token; retrying");
                let retry = self.now + 100;
                for (job, at, run_id) in fires {
                    self.timers
                        .schedule(retry, Timer::Buffered { job, at, run_id });
                }
            }
        }
    }

    /// Starts a buffered fire now that the job's previous run ended.
    fn start_buffered(&mut self, job: &str, at: i64, run_id: String) {
        let now = self.now;
        let mut f = Fire::tick(job, at, "buffered");
        f.run_id = run_id.clone();
        f.fire_id = run_id;
        let run = self.plan_run(job, f, None, now);
        self.release(&run);
        // The fire was recorded when it was buffered; save the run before it goes
        // out, so a new leader adopts it rather than starting it again.
        self.effect(Effect::SaveNow(run.clone()));
        self.start_planned(run);
    }

    /// Live, not draining workers serving `spec`'s group and handler, by id (with
    /// room or not), except `exclude`.
    pub(super) fn candidates(&self, spec: &JobSpec, exclude: Option<&str>) -> Vec<String> {
        self.workers
            .live
            .iter()
            .filter(|(id, w)| {
                !w.draining
                    && w.hello.group == spec.group
                    && w.hello.handlers.contains(&spec.handler)
                    && Some(id.as_str()) != exclude
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Shards `worker` runs plus shards planned for it.
    pub(super) fn load(&self, worker: &str) -> usize {
        self.workers.live.get(worker).map_or(0, |w| w.running.len())
            + self.workers.reserved.get(worker).copied().unwrap_or(0) as usize
    }

    /// Whether `worker` is live, not draining, and has room for `extra` + 1 more
    /// shards under its capacity.
    pub(super) fn has_room(&self, worker: &str, extra: usize) -> bool {
        self.workers
            .live
            .get(worker)
            .is_some_and(|w| !w.draining && self.load(worker) + extra < w.hello.capacity as usize)
    }

    /// A worker with room for one shard of `spec` by the job's routing, preferring
    /// not to use `avoid`.
    fn pick(
        &mut self,
        spec: &JobSpec,
        job: &str,
        params: &str,
        avoid: Option<&str>,
    ) -> Option<String> {
        let mut cands = self.with_room(spec, job, avoid);
        if cands.is_empty() && avoid.is_some() {
            cands = self.with_room(spec, job, None);
        }
        if cands.is_empty() {
            return None;
        }
        let rr = match spec.routing {
            Routing::RoundRobin => self.jobs.get_mut(job).map_or(0, |j| {
                j.rr += 1;
                j.rr - 1
            }),
            _ => 0,
        };
        let key = match spec.routing {
            Routing::ConsistentHash => routing::hash_key(params, &spec.hash_param),
            _ => String::new(),
        };
        routing::route(spec.routing, &cands, rr, &key, &mut self.rng)
    }

    /// The routing candidates for `spec` that have room.
    fn with_room(&self, spec: &JobSpec, job: &str, avoid: Option<&str>) -> Vec<Candidate> {
        self.candidates(spec, avoid)
            .into_iter()
            .filter(|id| self.has_room(id, 0))
            .map(|id| {
                let w = &self.workers.live[&id];
                Candidate {
                    load: self.load(&id),
                    last_assigned_ms: w.last_assigned_ms,
                    runs_job: spec.routing == Routing::BusyOver
                        && w.running
                            .keys()
                            .any(|(r, _)| self.runs.active.get(r).is_some_and(|x| x.job == job)),
                    id,
                }
            })
            .collect()
    }

    /// Gives shard `shard` of a run in progress to a (new) worker by the job's
    /// routing, preferring not to use `avoid`: a retry, a takeover, or a shard that
    /// was waiting for a worker. A new assignment number each time.
    pub(super) fn assign_shard(&mut self, run_id: &str, shard: u32, avoid: Option<String>) {
        let Some(run) = self.runs.active.get(run_id) else {
            return;
        };
        let (job, params) = (run.job.clone(), run.params.clone());
        let worker = match self.jobs.get(&job).map(|j| j.spec.clone()) {
            Some(spec) => self.pick(&spec, &job, &params, avoid.as_deref()),
            None => {
                // Its job was deleted: no worker will be picked for it ever, and
                // a run waiting forever would stall a workflow it is a node of.
                self.fail_orphan(run_id, shard);
                return;
            }
        };
        let now = self.now;
        let Some(s) = self
            .runs
            .active
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
        self.unhold(&previous, run_id, shard);
        if let Some(r) = self.runs.active.get_mut(run_id)
            && r.state == RunState::Pending
            && placed
        {
            r.state = RunState::Running;
        }
        if placed {
            self.send_assignment(run_id, shard);
            // Saved at once (coalesced): a next leader must know this attempt, or
            // it would start the shard again under the same number.
            if let Some(r) = self.runs.active.get(run_id).cloned() {
                self.save(&r);
            }
        } else {
            self.wait_for_worker(run_id, shard);
        }
    }

    /// Ends a shard whose job was deleted as failed (it is not run again), and
    /// its run if that was its last.
    fn fail_orphan(&mut self, run_id: &str, shard: u32) {
        let now = self.now;
        let Some(s) = self
            .runs
            .active
            .get_mut(run_id)
            .and_then(|r| r.shards.get_mut(shard as usize))
            .filter(|s| !s.state.is_final())
        else {
            return;
        };
        let previous = std::mem::take(&mut s.worker_id);
        s.state = RunState::Failed;
        s.error = "its job was deleted before it could run again".into();
        s.finished_at_ms = now;
        self.unhold(&previous, run_id, shard);
        self.runs.pending.remove(&(run_id.to_owned(), shard));
        self.maybe_finish(run_id);
    }

    pub(super) fn wait_for_worker(&mut self, run_id: &str, shard: u32) {
        self.runs.pending.insert((run_id.to_owned(), shard));
        let at = self.now + 1_000;
        self.arm_pending(at);
    }

    /// Arms a [`Timer::Pending`] at `at` unless one fires at or before it.
    pub(super) fn arm_pending(&mut self, at: i64) {
        if self.runs.pending_wake.is_none_or(|w| w > at) {
            self.runs.pending_wake = Some(at);
            self.timers.schedule(at, Timer::Pending);
        }
    }

    /// Sends the current attempt of a shard to its worker (and arms its deadline).
    pub(super) fn send_assignment(&mut self, run_id: &str, shard: u32) {
        let Some(run) = self.runs.active.get(run_id) else {
            return;
        };
        let Some(s) = run.shards.get(shard as usize) else {
            return;
        };
        let a = self.assignment(run, s);
        self.deliver(s.worker_id.clone(), a);
    }

    /// The assignment of shard `s` of `run` to its planned worker, sent now.
    fn assignment(&self, run: &RunRecord, s: &ShardRecord) -> Assignment {
        let now = self.now;
        let job = self.jobs.get(&run.job);
        let timeout = job.map_or(0, |j| j.spec.timeout_ms) as i64;
        // The earliest the engine could hand the shard to another worker: its
        // heartbeats leaving it out once the interval's grace passed (see
        // `heartbeat`; two late beats can arrive together), or the worker declared
        // dead. A worker that reads the `Assign` later must not start it.
        let interval = self.opts.heartbeat_interval_ms as i64;
        let dead_at = self.workers.live.get(&s.worker_id).map_or(now, |w| {
            w.last_beat_ms + interval * i64::from(self.opts.dead_after_beats)
        });
        Assignment {
            key: ShardKey {
                run_id: run.run_id.clone(),
                shard: s.index,
                attempt: s.attempt,
            },
            fire_id: run.fire_id.clone(),
            job: run.job.clone(),
            handler: job.map(|j| j.spec.handler.clone()).unwrap_or_default(),
            params: run.params.clone(),
            shard_params: s.shard_params.clone(),
            shard_total: s.total,
            deadline_ms: if timeout > 0 { now + timeout } else { 0 },
            scheduled_at_ms: run.scheduled_at_ms,
            start_by_ms: (now + interval).min(dead_at),
        }
    }

    /// Sends assignment `a` to `worker` and holds the shard there (or, when the
    /// worker is gone, puts the shard back to wait for another).
    fn deliver(&mut self, worker: String, a: Assignment) {
        let now = self.now;
        let deadline = (a.deadline_ms > 0).then(|| (a.deadline_ms, a.key.clone()));
        let (run_id, shard, attempt) = (a.key.run_id.clone(), a.key.shard, a.key.attempt);
        // Checked first: the key is built (an allocation) only when a shard waits.
        if !self.runs.pending.is_empty() {
            self.runs.pending.remove(&(run_id.clone(), shard));
        }
        // Fields borrowed apart: the worker is looked up once to send and to hold.
        let (live, effects) = (&mut self.workers.live, &mut self.effects);
        let Some(w) = live.get_mut(&worker) else {
            warn!(worker_id = %worker, run_id, shard, "assignment could not be sent; placing it elsewhere");
            self.back_to_pending(&run_id, shard);
            return;
        };
        effects.push(Effect::Send {
            session: w.session,
            msg: ToWorker::Assign(a),
        });
        w.running.insert(
            (run_id, shard),
            super::machine::Held {
                attempt,
                since: now,
                missed: 0,
            },
        );
        w.last_assigned_ms = now;
        if let Some((at, key)) = deadline {
            self.timers.schedule(at, Timer::Deadline(key));
        }
    }

    /// A shard whose assignment did not reach its worker waits for another.
    pub(super) fn back_to_pending(&mut self, run_id: &str, shard: u32) {
        if let Some(s) = self
            .runs
            .active
            .get_mut(run_id)
            .and_then(|r| r.shards.get_mut(shard as usize))
        {
            s.state = RunState::Pending;
            s.worker_id.clear();
        }
        self.wait_for_worker(run_id, shard);
    }

    /// Tries again to place shards that had no worker.
    pub(super) fn place_pending(&mut self) {
        // Right after taking over, workers may still report shards of adopted runs
        // they run: those wait for the grace. This leader's own runs (a misfire
        // fired at startup before any worker registered) need not, nor do shards a
        // leader that handed over left waiting (it never sent them).
        let adopting = self.now < self.runs.adopt_until && !self.runs.handed_over;
        if adopting {
            let at = self.runs.adopt_until;
            self.arm_pending(at);
        }
        let pending: Vec<(String, u32)> = self.runs.pending.iter().cloned().collect();
        for (run_id, shard) in pending {
            if adopting
                && self
                    .runs
                    .active
                    .get(&run_id)
                    .is_some_and(|r| r.fence != self.fence)
            {
                continue;
            }
            let waiting = self
                .runs
                .active
                .get(&run_id)
                .and_then(|r| r.shards.get(shard as usize))
                .is_some_and(|s| s.state == RunState::Pending && s.worker_id.is_empty());
            if waiting {
                self.assign_shard(&run_id, shard, None);
            } else {
                self.runs.pending.remove(&(run_id, shard));
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
fn overlap_call(j: &super::jobs::JobState) -> OverlapCall {
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
