//! Firing: the fire record (each fire once), overlap and misfire policies, creating
//! runs and shards, and routing shards to workers.

use chime_shared::queue::fnv1a64;
use tracing::{debug, info, warn};

use super::workers::{Assignment, ToWorker};
use super::{Engine, ShardKey, Timer};
use crate::error::{CoordError, Result};
use crate::model::{Misfire, Overlap, Routing, RunRecord, RunState, ShardRecord};
use crate::store::FireAnswer;

/// The fire id of a scheduled tick.
pub(crate) fn fire_id(job: &str, at: i64) -> String {
    format!("{job}@{at}")
}

impl Engine {
    /// Fires due ticks `(job, tick)`: records them all in one call (which refuses
    /// duplicates and a deposed leader), then starts a run for each recorded one and
    /// schedules each job's next tick.
    pub(super) async fn fire_ticks(&mut self, ticks: Vec<(String, i64)>, cause: &str) {
        for (job, at) in &ticks {
            self.schedule_next(job, *at);
        }
        let records: Vec<(String, String, i64)> = ticks
            .iter()
            .map(|(j, at)| (fire_id(j, *at), j.clone(), *at))
            .collect();
        let answers = match self.run_store.record_fires(self.fence, &records).await {
            Ok(a) => a,
            Err(e) => {
                // Without the record a fire could happen twice (or, for a deposed
                // leader, at all); skipping it shows up as a misfire of the next
                // leader or restart instead.
                warn!(error = %e, fires = ticks.len(), "cannot record fires; not firing them");
                return;
            }
        };
        for ((job, at), answer) in ticks.into_iter().zip(answers) {
            match answer {
                FireAnswer::Recorded => {
                    if let Some(j) = self.jobs.get_mut(&job) {
                        j.last_fire = Some(j.last_fire.map_or(at, |l| l.max(at)));
                    }
                    let now = self.now();
                    metrics::histogram!(chime_shared::telemetry::TRIGGER_LAG_SECONDS)
                        .record((now - at).max(0) as f64 / 1000.0);
                    self.fire(&job, at, cause, None, String::new());
                }
                FireAnswer::Duplicate => debug!(job = %job, at, "fire already recorded; skipping"),
                FireAnswer::Fenced => {
                    if !self.fenced_out {
                        warn!("fencing token is stale: another coordinator leads; not firing");
                    }
                    self.fenced_out = true;
                }
            }
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
            let jitter = if j.spec.jitter_ms > 0 {
                fastrand::u64(0..=j.spec.jitter_ms) as i64
            } else {
                0
            };
            let generation = j.generation;
            self.schedule(
                at + jitter,
                Timer::Fire {
                    job: job.to_owned(),
                    at,
                    generation,
                },
            );
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
                &format!("missed tick(s), misfire policy {policy:?}"),
            );
        }
        if !fire.is_empty() {
            let fires = fire.into_iter().map(|t| (job.to_owned(), t)).collect();
            self.fire_ticks_once(fires).await;
        }
    }

    /// Records and fires misfired ticks without scheduling further ticks.
    async fn fire_ticks_once(&mut self, ticks: Vec<(String, i64)>) {
        let records: Vec<(String, String, i64)> = ticks
            .iter()
            .map(|(j, at)| (fire_id(j, *at), j.clone(), *at))
            .collect();
        let Ok(answers) = self.run_store.record_fires(self.fence, &records).await else {
            warn!("cannot record misfired ticks; not firing them");
            return;
        };
        for ((job, at), a) in ticks.into_iter().zip(answers) {
            if a == FireAnswer::Recorded {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.last_fire = Some(j.last_fire.map_or(at, |l| l.max(at)));
                }
                self.fire(&job, at, "misfire", None, String::new());
            }
        }
    }

    /// Reports skipped ticks in the run history: one run per tick for the latest
    /// hundred, and one summary run for the rest.
    fn report_skipped(&mut self, job: &str, ticks: &[i64], why: &str) {
        let now = self.now();
        let cut = ticks.len().saturating_sub(100);
        if cut > 0 {
            let note = format!(
                "{why}: {cut} earlier ticks from {} to {} skipped",
                ticks[0],
                ticks[cut - 1]
            );
            self.save(&skipped_run(
                job,
                &format!("{job}@skipped-{}-{}", ticks[0], ticks[cut - 1]),
                ticks[cut - 1],
                now,
                &note,
            ));
        }
        for t in &ticks[cut..] {
            self.save(&skipped_run(job, &fire_id(job, *t), *t, now, why));
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
        let run_id = format!("{job}@m{now}-{:04x}", fastrand::u16(..));
        Ok(self.fire_with_id(job, now, "manual", params, String::new(), run_id))
    }

    /// Starts a run of `job` for tick `at`, applying the overlap policy.
    pub(super) fn fire(
        &mut self,
        job: &str,
        at: i64,
        cause: &str,
        params: Option<String>,
        parent: String,
    ) {
        let run_id = fire_id(job, at);
        self.fire_with_id(job, at, cause, params, parent, run_id);
    }

    fn fire_with_id(
        &mut self,
        job: &str,
        at: i64,
        cause: &str,
        params: Option<String>,
        parent: String,
        run_id: String,
    ) -> RunRecord {
        let now = self.now();
        let Some(j) = self.jobs.get_mut(job) else {
            return skipped_run(job, &run_id, at, now, "job deleted");
        };
        let running: Vec<String> = j.running.iter().cloned().collect();
        if !running.is_empty() {
            match j.spec.overlap {
                Overlap::Allow => {}
                Overlap::Skip => {
                    let r = skipped_run(
                        job,
                        &run_id,
                        at,
                        now,
                        "skipped: the previous run is still going",
                    );
                    self.save(&r);
                    metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "skipped")
                        .increment(1);
                    return r;
                }
                Overlap::BufferOne => {
                    if j.buffered.is_none() {
                        j.buffered = Some((at, run_id.clone()));
                        let mut r = skipped_run(
                            job,
                            &run_id,
                            at,
                            now,
                            "buffered until the running run ends",
                        );
                        r.state = RunState::Pending;
                        return r;
                    }
                    let r = skipped_run(
                        job,
                        &run_id,
                        at,
                        now,
                        "skipped: one fire is already waiting",
                    );
                    self.save(&r);
                    metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "skipped")
                        .increment(1);
                    return r;
                }
                Overlap::CancelRunning => {
                    for r in running {
                        let _ = self.cancel_run(&r, &format!("covered by the newer run {run_id}"));
                    }
                }
            }
        }
        self.start_run(job, at, cause, params, parent, run_id)
    }

    /// Creates the run and its shards, and assigns them.
    pub(super) fn start_run(
        &mut self,
        job: &str,
        at: i64,
        cause: &str,
        params: Option<String>,
        parent: String,
        run_id: String,
    ) -> RunRecord {
        let now = self.now();
        let Some(j) = self.jobs.get_mut(job) else {
            return skipped_run(job, &run_id, at, now, "job deleted");
        };
        let spec = j.spec.clone();
        j.running.insert(run_id.clone());
        let total = if spec.routing == Routing::ShardingBroadcast {
            if spec.shard_count > 0 {
                spec.shard_count
            } else {
                self.candidates(&spec.group, &spec.handler, None)
                    .len()
                    .max(1) as u32
            }
        } else {
            1
        };
        let shards = (0..total)
            .map(|i| ShardRecord {
                index: i,
                total,
                worker_id: String::new(),
                attempt: 0,
                failures: 0,
                state: RunState::Pending,
                started_at_ms: 0,
                finished_at_ms: 0,
                output: String::new(),
                error: String::new(),
                log_tail: Vec::new(),
                shard_params: spec
                    .shard_params
                    .get(i as usize)
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        let run = RunRecord {
            run_id: run_id.clone(),
            fire_id: if cause == "manual" {
                run_id.clone()
            } else {
                fire_id(job, at)
            },
            job: job.to_owned(),
            cause: cause.to_owned(),
            scheduled_at_ms: at,
            fired_at_ms: now,
            finished_at_ms: 0,
            state: RunState::Pending,
            params: params.unwrap_or(spec.params),
            shards,
            parent_run_id: parent,
            note: String::new(),
        };
        metrics::counter!(chime_shared::telemetry::JOB_FIRES, "outcome" => "fired").increment(1);
        debug!(run_id = %run_id, job, shards = total, cause, "run started");
        self.runs.insert(run_id.clone(), run);
        if spec.routing == Routing::ShardingBroadcast {
            // Stable spread: shard i goes to the i-th live worker (by id), wrapping.
            let workers: Vec<String> = self.candidates(&spec.group, &spec.handler, None);
            for i in 0..total {
                let target =
                    (!workers.is_empty()).then(|| workers[i as usize % workers.len()].clone());
                self.assign_to(&run_id, i, target);
            }
        } else {
            self.assign_shard(&run_id, 0, None, false);
        }
        let r = self.runs.get(&run_id).cloned();
        if let Some(r) = &r {
            self.save(r);
        }
        r.unwrap_or_else(|| skipped_run(job, &run_id, at, now, "vanished"))
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

    /// Picks a worker for one shard by the job's routing (preferring not to use
    /// `avoid`, e.g. the worker whose attempt failed) and assigns it.
    pub(super) fn assign_shard(
        &mut self,
        run_id: &str,
        shard: u32,
        avoid: Option<String>,
        _retry: bool,
    ) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let Some(j) = self.jobs.get(&run.job) else {
            self.assign_to(run_id, shard, None);
            return;
        };
        let spec = &j.spec;
        let mut cands = self.candidates(&spec.group, &spec.handler, avoid.as_deref());
        if cands.is_empty() {
            cands = self.candidates(&spec.group, &spec.handler, None);
        }
        let pick = if cands.is_empty() {
            None
        } else {
            let n = cands.len();
            Some(match spec.routing {
                Routing::ShardingBroadcast => {
                    // A takeover or retry: the least loaded other worker.
                    self.least_loaded(&cands)
                }
                Routing::RoundRobin => {
                    let rr = self.jobs.get_mut(&run.job).map_or(0, |j| {
                        j.rr += 1;
                        j.rr - 1
                    });
                    cands[(rr % n as u64) as usize].clone()
                }
                Routing::Random => cands[fastrand::usize(..n)].clone(),
                Routing::ConsistentHash => {
                    let key = hash_key(&run.params, &spec.hash_param);
                    // Rendezvous hashing: stable while the worker set is.
                    cands
                        .iter()
                        .max_by_key(|w| fnv1a64(format!("{key}\u{1}{w}").as_bytes()))
                        .cloned()
                        .unwrap_or_default()
                }
                Routing::LeastRecentlyUsed => cands
                    .iter()
                    .min_by_key(|w| self.workers.get(*w).map_or(0, |s| s.last_assigned_ms))
                    .cloned()
                    .unwrap_or_default(),
                Routing::LeastLoaded => self.least_loaded(&cands),
                Routing::Failover | Routing::First => cands[0].clone(),
                Routing::Last => cands[n - 1].clone(),
                Routing::BusyOver => {
                    let job = run.job.clone();
                    cands
                        .iter()
                        .find(|w| {
                            self.workers.get(*w).is_some_and(|s| {
                                !s.running
                                    .iter()
                                    .any(|(r, _)| self.runs.get(r).is_some_and(|x| x.job == job))
                            })
                        })
                        .cloned()
                        .unwrap_or_else(|| cands[0].clone())
                }
            })
        };
        self.assign_to(run_id, shard, pick);
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

    /// Sends shard `shard` of `run_id` to `worker` as a new assignment, or leaves it
    /// pending when there is no worker (or the send fails).
    pub(super) fn assign_to(&mut self, run_id: &str, shard: u32, worker: Option<String>) {
        let now = self.now();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let Some(s) = run.shards.get_mut(shard as usize) else {
            return;
        };
        if s.state.is_final() {
            return;
        }
        let previous = std::mem::take(&mut s.worker_id);
        if let Some(p) = self.workers.get_mut(&previous) {
            p.running.remove(&(run_id.to_owned(), shard));
        }
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let s = &mut run.shards[shard as usize];
        let Some(worker) = worker else {
            s.state = RunState::Pending;
            self.pending.insert((run_id.to_owned(), shard));
            self.schedule(now + 1_000, Timer::Pending);
            return;
        };
        s.attempt += 1;
        s.worker_id = worker.clone();
        s.state = RunState::Running;
        s.started_at_ms = now;
        if run.state == RunState::Pending {
            run.state = RunState::Running;
        }
        let timeout = self.jobs.get(&run.job).map_or(0, |j| j.spec.timeout_ms) as i64;
        let key = ShardKey {
            run_id: run_id.to_owned(),
            shard,
            attempt: s.attempt,
        };
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
            warn!(worker_id = %worker, run_id, shard, "assignment could not be sent; retrying elsewhere");
            if let Some(s) = self
                .runs
                .get_mut(run_id)
                .and_then(|r| r.shards.get_mut(shard as usize))
            {
                s.worker_id.clear();
            }
            self.pending.insert((run_id.to_owned(), shard));
            self.schedule(now + 1_000, Timer::Pending);
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
        let pending: Vec<(String, u32)> = self.pending.iter().cloned().collect();
        for (run_id, shard) in pending {
            let waiting = self
                .runs
                .get(&run_id)
                .and_then(|r| r.shards.get(shard as usize))
                .is_some_and(|s| s.state == RunState::Pending && s.worker_id.is_empty());
            if waiting {
                self.assign_shard(&run_id, shard, None, false);
            } else {
                self.pending.remove(&(run_id, shard));
            }
        }
    }
}

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

fn skipped_run(job: &str, run_id: &str, at: i64, now: i64, note: &str) -> RunRecord {
    RunRecord {
        run_id: run_id.to_owned(),
        fire_id: run_id.to_owned(),
        job: job.to_owned(),
        cause: "scheduled".into(),
        scheduled_at_ms: at,
        fired_at_ms: now,
        finished_at_ms: now,
        state: RunState::Skipped,
        params: String::new(),
        shards: Vec::new(),
        parent_run_id: String::new(),
        note: note.to_owned(),
    }
}
