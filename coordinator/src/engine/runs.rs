//! Runs in progress, in the core: what workers report, deadlines, retries with
//! backoff, kills, and what happens when a run ends (history, buffered fires,
//! fixed-delay ticks, child jobs).

use tracing::{debug, info};

use super::dispatch::Fire;
use super::machine::{Machine, Timer, Work};
use super::workers::ToWorker;
use super::{ShardKey, ShardOutcome};
use crate::error::{CoordError, Result};
use crate::model::{RunRecord, RunState, clip};

/// Log lines kept per shard.
const LOG_TAIL: usize = 20;
/// Longest log line kept.
const LOG_LINE: usize = 4 * 1024;
/// Largest output kept.
const OUTPUT: usize = 64 * 1024;

/// The backoff before retry number `failures` (1-based): doubling from `first`.
fn backoff(first: u64, failures: u32) -> i64 {
    first.saturating_mul(1 << (failures.max(1) - 1).min(20)) as i64
}

impl Machine {
    /// The shard `key` names, if it is the current attempt and not finished.
    fn current(&mut self, key: &ShardKey) -> Option<&mut crate::model::ShardRecord> {
        self.runs
            .active
            .get_mut(&key.run_id)
            .and_then(|r| r.shards.get_mut(key.shard as usize))
            .filter(|s| s.attempt == key.attempt && !s.state.is_final())
    }

    pub(super) fn started(&mut self, worker: &str, key: ShardKey, at_ms: i64) {
        if let Some(s) = self.current(&key).filter(|s| s.worker_id == worker) {
            s.started_at_ms = at_ms;
        }
    }

    pub(super) fn log_line(&mut self, key: ShardKey, line: String) {
        if let Some(s) = self.current(&key) {
            s.log_tail.push(clip(&line, LOG_LINE));
            if s.log_tail.len() > LOG_TAIL {
                s.log_tail.remove(0);
            }
        }
    }

    pub(super) fn shard_result(&mut self, worker: &str, key: ShardKey, outcome: ShardOutcome) {
        let now = self.now;
        let held = self
            .workers
            .live
            .get(worker)
            .and_then(|w| w.running.get(&(key.run_id.clone(), key.shard)))
            .is_some_and(|h| h.attempt == key.attempt);
        if held {
            self.unhold(worker, &key.run_id, key.shard);
        }
        let Some(job) = self.runs.active.get(&key.run_id).map(|r| r.job.clone()) else {
            return;
        };
        self.adopt_reported(worker, &key);
        let (retries, first_backoff) = self
            .jobs
            .get(&job)
            .map_or((0, 0), |j| (j.spec.retries, j.spec.retry_backoff_ms));
        // Taken before the shard is borrowed; counted once the result is current.
        let counted = match &outcome {
            ShardOutcome::Succeeded(_) => self.meters.succeeded.clone(),
            ShardOutcome::Failed(_) => self.meters.failed.clone(),
            ShardOutcome::Cancelled(_) => self.meters.cancelled.clone(),
        };
        let Some(s) = self.current(&key).filter(|s| s.worker_id == worker) else {
            debug!(run_id = %key.run_id, shard = key.shard, attempt = key.attempt, worker, "stale result ignored");
            return;
        };
        counted.increment(1);
        match outcome {
            ShardOutcome::Succeeded(out) => {
                s.state = RunState::Succeeded;
                s.output = clip(&out, OUTPUT);
                s.finished_at_ms = now;
            }
            ShardOutcome::Failed(err) => {
                s.failures += 1;
                s.error = clip(&err, OUTPUT);
                if s.failures <= retries {
                    s.state = RunState::Pending;
                    let delay = backoff(first_backoff, s.failures);
                    debug!(run_id = %key.run_id, shard = key.shard, delay, "shard failed; retrying");
                    self.timers.schedule(
                        now + delay,
                        Timer::Retry {
                            run_id: key.run_id.clone(),
                            shard: key.shard,
                        },
                    );
                } else {
                    s.state = RunState::Failed;
                    s.finished_at_ms = now;
                }
            }
            ShardOutcome::Cancelled(why) => {
                // Not cancelled by us (we mark those final first): the worker gave it
                // up while draining. Someone else takes it.
                info!(run_id = %key.run_id, shard = key.shard, worker, why, "shard handed back");
                self.assign_shard(&key.run_id, key.shard, Some(worker.to_owned()));
                return;
            }
        }
        self.maybe_finish(&key.run_id);
    }

    /// A shard's deadline passed: cancel it on its worker, then retry or time out.
    pub(super) fn deadline(&mut self, key: ShardKey) {
        let now = self.now;
        let Some(job) = self.runs.active.get(&key.run_id).map(|r| r.job.clone()) else {
            return;
        };
        let (retries, first_backoff) = self
            .jobs
            .get(&job)
            .map_or((0, 0), |j| (j.spec.retries, j.spec.retry_backoff_ms));
        let Some(s) = self.current(&key).filter(|s| s.state == RunState::Running) else {
            return;
        };
        let worker = s.worker_id.clone();
        s.failures += 1;
        s.error = "timed out".into();
        let retry = s.failures <= retries;
        if retry {
            s.state = RunState::Pending;
        } else {
            s.state = RunState::TimedOut;
            s.finished_at_ms = now;
        }
        let failures = s.failures;
        info!(run_id = %key.run_id, shard = key.shard, worker = %worker, retry, "shard timed out");
        self.send(&worker, ToWorker::Cancel(key.clone(), "timeout".into()));
        self.unhold(&worker, &key.run_id, key.shard);
        if retry {
            let delay = backoff(first_backoff, failures);
            self.timers.schedule(
                now + delay,
                Timer::Retry {
                    run_id: key.run_id,
                    shard: key.shard,
                },
            );
        } else {
            let run_id = key.run_id.clone();
            // A timed-out run did not succeed: it has no children to fire.
            self.finish(&run_id);
        }
    }

    /// A result (sent again after a reconnect) of an attempt newer than an adopted
    /// run's record: the previous leader sent it and died before saving it. It is
    /// the worker's, as when the worker lists it at registration, so its result
    /// counts (and the shard does not run again).
    fn adopt_reported(&mut self, worker: &str, key: &ShardKey) {
        let fence = self.fence;
        let Some(s) = self
            .runs
            .active
            .get_mut(&key.run_id)
            .filter(|r| r.fence != fence)
            .and_then(|r| r.shards.get_mut(key.shard as usize))
            .filter(|s| !s.state.is_final() && key.attempt > s.attempt)
        else {
            return;
        };
        info!(run_id = %key.run_id, shard = key.shard, attempt = key.attempt, worker, "adopting a result of an attempt the record does not know");
        let previous = std::mem::replace(&mut s.worker_id, worker.to_owned());
        s.attempt = key.attempt;
        s.state = RunState::Running;
        self.runs.pending.remove(&(key.run_id.clone(), key.shard));
        if let Some(w) = self.workers.live.get_mut(&previous) {
            w.running.remove(&(key.run_id.clone(), key.shard));
        }
    }

    /// A failed shard's backoff passed: assign it again, preferring another worker.
    pub(super) fn retry(&mut self, run_id: &str, shard: u32) {
        let prev = self
            .runs
            .active
            .get(run_id)
            .and_then(|r| r.shards.get(shard as usize))
            .filter(|s| s.state == RunState::Pending)
            .map(|s| s.worker_id.clone());
        if let Some(prev) = prev {
            self.assign_shard(run_id, shard, Some(prev));
        }
    }

    /// Cancels every unfinished shard of a run (kill, or covered by a newer run);
    /// answers the finished run.
    pub(super) fn cancel_run(&mut self, run_id: &str, why: &str) -> Option<RunRecord> {
        let now = self.now;
        if self.runs.active.get(run_id)?.is_workflow() {
            return self.cancel_workflow(run_id, why);
        }
        let run = self.runs.active.get_mut(run_id)?;
        let mut stop = Vec::new();
        for s in run.shards.iter_mut().filter(|s| !s.state.is_final()) {
            if s.state == RunState::Running {
                stop.push((
                    s.worker_id.clone(),
                    ShardKey {
                        run_id: run_id.to_owned(),
                        shard: s.index,
                        attempt: s.attempt,
                    },
                ));
            }
            s.state = RunState::Cancelled;
            s.finished_at_ms = now;
            s.error = why.to_owned();
        }
        run.note = why.to_owned();
        for (w, key) in stop {
            self.send(&w, ToWorker::Cancel(key.clone(), why.to_owned()));
            self.unhold(&w, &key.run_id, key.shard);
        }
        self.finish(run_id)
    }

    pub(super) fn kill(&mut self, run_id: &str) -> Result<RunRecord> {
        if let Some(run) =
            self.drop_prepared(run_id, RunState::Cancelled, "killed before it went out")
        {
            info!(run_id, job = %run.job, "run killed before its instant");
            return Ok(run);
        }
        let run = self
            .runs
            .active
            .get(run_id)
            .cloned()
            .ok_or_else(|| CoordError::NotFound(format!("run {run_id:?} in progress")))?;
        info!(run_id, job = %run.job, "run killed");
        Ok(self.cancel_run(run_id, "killed").unwrap_or(run))
    }

    /// Ends the run if every shard is final; fires children of a successful run.
    pub(super) fn maybe_finish(&mut self, run_id: &str) {
        let finished = self.finish(run_id);
        if let Some(done) = finished.filter(|r| r.state == RunState::Succeeded) {
            let (job, parent) = (done.job, done.run_id);
            for child in self
                .jobs
                .get(&job)
                .map(|j| j.spec.children.clone())
                .unwrap_or_default()
            {
                if self.jobs.contains_key(&child) {
                    let now = self.now;
                    let id = format!("{child}@c{now}-{:04x}", self.rng.u16(..));
                    info!(parent = %parent, child = %child, "firing child job");
                    let fire = Fire {
                        job: child.clone(),
                        at: now,
                        cause: "child",
                        params: None,
                        parent: parent.clone(),
                        run_id: id.clone(),
                        fire_id: id,
                        nodes: Vec::new(),
                    };
                    // One at a time: each child's overlap policy sees the ones
                    // before it started.
                    self.spawn(Work::Fire {
                        fires: vec![fire],
                        reply: None,
                    });
                }
            }
        } else if let Some(r) = self.runs.active.get(run_id).cloned() {
            // Not finished: save the progress.
            self.save(&r);
        }
    }

    /// Ends the run if every shard is final (history, overlap buffer, fixed delay).
    /// Answers the finished run.
    pub(super) fn finish(&mut self, run_id: &str) -> Option<RunRecord> {
        let now = self.now;
        let run = self.runs.active.get_mut(run_id)?;
        if run.is_workflow() {
            if !run.nodes.iter().all(|n| n.state.is_final()) {
                return None;
            }
            run.state = crate::workflow::final_state(&run.nodes);
        } else if !run.shards.iter().all(|s| s.state.is_final()) {
            return None;
        }
        let states: Vec<RunState> = run.shards.iter().map(|s| s.state).collect();
        run.state = if run.is_workflow() {
            run.state
        } else if states.iter().all(|s| *s == RunState::Succeeded) {
            RunState::Succeeded
        } else if states.contains(&RunState::Cancelled) {
            RunState::Cancelled
        } else if states.contains(&RunState::TimedOut) {
            RunState::TimedOut
        } else {
            RunState::Failed
        };
        run.finished_at_ms = now;
        if run.state == RunState::Succeeded {
            self.meters.runs_succeeded.increment(1);
        } else {
            metrics::counter!(chime_shared::telemetry::RUNS_FINISHED, "status" => run.state.label())
                .increment(1);
        }
        if matches!(run.state, RunState::Failed | RunState::TimedOut) {
            chime_shared::activity::add("", chime_shared::activity::Kind::RunFailed, 1);
        }
        let run = self.runs.active.remove(run_id)?;
        if run.cause == super::flows::NODE_CAUSE {
            // Written before the nodes it lets run are recorded: a next leader
            // that finds those finds this end too, and never takes the node for
            // one still running (see `flows.rs`).
            self.effect(super::machine::Effect::SaveNow(run.clone()));
        } else {
            self.save(&run);
        }
        record_fire_span(&run);
        debug!(run_id, state = ?run.state, "run finished");
        let mut buffered = None;
        let mut delay_next = None;
        if let Some(j) = self.jobs.get_mut(&run.job) {
            j.running.remove(run_id);
            if j.running.is_empty() {
                buffered = j.buffered.take();
            }
            if let crate::schedule::Compiled::Delay { delay_ms } = j.compiled
                && !j.spec.paused
            {
                let at = now + delay_ms;
                j.next_fire = Some(at);
                delay_next = Some((at, j.generation));
            }
        }
        if let Some((at, generation)) = delay_next {
            self.arm_tick(&run.job, at, generation, 0);
        }
        if let Some((at, run_id)) = buffered {
            let job = run.job.clone();
            self.timers
                .schedule(now, Timer::Buffered { job, at, run_id });
        }
        if run.cause == super::flows::NODE_CAUSE {
            self.node_ended(&run);
        }
        Some(run)
    }
}

/// The trace span of a run's fire, recorded when the run ends: a root named by the
/// run id (so the shards, started by whichever leader fired, are its children),
/// from the fire to the end of the last shard.
fn record_fire_span(run: &RunRecord) {
    let Some(ctx) = chime_shared::trace::tracer()
        .run_context(&run.run_id)
        .filter(|t| t.sampled())
    else {
        return;
    };
    use chime_shared::trace::{Span, SpanKind, ms_to_ns};
    let mut s = Span::root(
        format!("fire {}", run.job),
        SpanKind::Producer,
        ctx,
        ms_to_ns(run.fired_at_ms),
    );
    s.attr("chime.job", run.job.as_str())
        .attr("chime.run_id", run.run_id.as_str())
        .attr("chime.fire_id", run.fire_id.as_str())
        .attr("chime.cause", run.cause.as_str())
        .attr("chime.scheduled_at_ms", run.scheduled_at_ms)
        .attr("chime.shard.total", run.shards.len() as u32)
        .attr("chime.status", run.state.label());
    if !run.parent_run_id.is_empty() {
        s.attr("chime.parent_run_id", run.parent_run_id.as_str());
    }
    if matches!(run.state, RunState::Failed | RunState::TimedOut) {
        s.fail(format!("run {}", run.state.label()));
    }
    s.end_at(ms_to_ns(run.finished_at_ms));
}
