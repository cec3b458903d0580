//! Jobs and their ticks, in the core: adding, replacing and pausing a job, arming
//! its next tick (ahead of its instant, to be prepared, or at it), and the ticks
//! missed before this leader started.

use std::collections::BTreeSet;

use tracing::warn;

use super::machine::{Machine, Timer};
use crate::model::JobSpec;
use crate::schedule::Compiled;
use crate::store::StoredJob;

#[derive(Debug)]
pub(super) struct JobState {
    pub(super) spec: JobSpec,
    pub(super) version: i64,
    pub(super) compiled: Compiled,
    /// Bumped by every change: timers armed under an older one are stale.
    pub(super) generation: u64,
    pub(super) next_fire: Option<i64>,
    pub(super) last_fire: Option<i64>,
    /// Its runs in progress.
    pub(super) running: BTreeSet<String>,
    /// Its one waiting fire (instant, run id), under `buffer-one`.
    pub(super) buffered: Option<(i64, String)>,
    /// A fire recorded ahead whose instant has not come (its run id).
    pub(super) prepared: Option<String>,
    /// Round-robin counter (from an offset of the job's own, see `put_job`).
    pub(super) rr: u64,
}

impl Machine {
    /// Adds or replaces a job. At startup (`startup`), answers the ticks missed since
    /// `last`, for the job's misfire policy.
    pub(super) fn put_job(
        &mut self,
        stored: StoredJob,
        last: Option<i64>,
        startup: bool,
    ) -> Option<Vec<i64>> {
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
        let now = self.now;
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
            // A new job's round robin starts at an offset of its own: jobs on one
            // schedule fire in lockstep, and from one start every job of a second
            // would pick the same worker (the whole second on one worker, the next
            // second on the next). The offset is the name's hash, so each
            // coordinator (and the next leader) starts a job at the same worker;
            // taken modulo a prime so that every bit of the hash counts (the
            // high bits alone of names differing in one letter barely differ).
            rr: prev.as_ref().map_or_else(
                || chime_shared::queue::fnv1a64(name.as_bytes()) % 1_000_003,
                |p| p.rr,
            ),
        };
        let mut misfired = Vec::new();
        if !state.spec.paused {
            // A resumed job starts from now; at startup, missed ticks are misfires:
            // since the last fire, or since its creation if it never fired (else a
            // leader dying before a new job's first tick would make the ticks until
            // the next leader vanish without a trace).
            let from = match (startup, last_fire) {
                (true, Some(l)) if !was_paused => l,
                (true, None) if state.spec.created_at_ms > 0 => state.spec.created_at_ms,
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
        self.jobs.insert(name.clone(), Box::new(state));
        if let Some(at) = next {
            self.arm_tick(&name, at, generation, jitter_ms);
        }
        (!misfired.is_empty()).then_some(misfired)
    }

    /// Whether a tick armed under `generation` of `job` still stands.
    pub(super) fn tick_is_live(&self, job: &str, generation: u64) -> bool {
        self.jobs
            .get(job)
            .is_some_and(|j| j.generation == generation && !j.spec.paused)
    }

    /// Arms tick `at` of `job` (plus up to `jitter_ms`): ahead of it to be prepared
    /// when there is time for that, else at the instant.
    pub(super) fn arm_tick(&mut self, job: &str, at: i64, generation: u64, jitter_ms: u64) {
        let jitter = if jitter_ms > 0 {
            self.rng.u64(0..=jitter_ms) as i64
        } else {
            0
        };
        let go_at = at + jitter;
        let lead = self.opts.prepare_ahead_ms as i64;
        let job = job.to_owned();
        if lead > 0 && go_at - lead > self.now {
            self.timers.schedule(
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
    pub(super) fn fire_at(
        &mut self,
        go_at: i64,
        job: String,
        at: i64,
        generation: u64,
        rearm: bool,
    ) {
        self.timers.schedule(
            go_at,
            Timer::Fire {
                job,
                at,
                generation,
                rearm,
            },
        );
    }

    /// Schedules the tick after `after` (time-based schedules only).
    pub(super) fn schedule_next(&mut self, job: &str, after: i64) {
        let Some(j) = self.jobs.get_mut(job) else {
            return;
        };
        if matches!(j.compiled, Compiled::Delay { .. }) {
            j.next_fire = None;
            return;
        }
        j.next_fire = j.compiled.next_after(&j.spec, after);
        if let Some(at) = j.next_fire {
            let (generation, jitter_ms) = (j.generation, j.spec.jitter_ms);
            self.arm_tick(job, at, generation, jitter_ms);
        }
    }
}
