//! Jobs and their ticks, in the core: adding, replacing and pausing a job, arming
//! its next tick (ahead of its instant, to be prepared, or at it), and the ticks
//! missed before this leader started.

use std::collections::{BTreeSet, HashMap};

use tracing::warn;

use super::machine::{Machine, Timer};
use crate::model::JobSpec;
use crate::schedule::{Before, Compiled, Plan, Planned, plan};
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

/// Jobs planned one per core at once from this many on (below it, threads cost more
/// than they save).
const PLAN_IN_PARALLEL_FROM: usize = 2_000;

/// [`plan`] of each of `jobs`, new at startup, in their order (a plan made `ahead`
/// when it still stands, see [`Planned::reuse`]); spread over the
/// machine's cores when there are many (a pure computation, so the answers do not
/// depend on how it was split).
pub(super) fn plan_all(
    jobs: &[StoredJob],
    last: &HashMap<String, i64>,
    mut ahead: Vec<Option<Planned>>,
    now: i64,
) -> Vec<crate::error::Result<Plan>> {
    ahead.resize_with(jobs.len(), || None);
    let one = |(j, ahead): (&StoredJob, Option<Planned>)| {
        let last = last.get(&j.spec.name).copied();
        // A plan a follower made ahead, when it still stands, spares the parse.
        if let Some(p) = ahead.and_then(|p| p.reuse(&j.spec, j.version, last, now)) {
            return Ok(p);
        }
        let before = Before {
            last_fire: last,
            ..Before::default()
        };
        plan(&j.spec, now, true, before)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if jobs.len() < PLAN_IN_PARALLEL_FROM || cores < 2 {
        return jobs.iter().zip(ahead).map(one).collect();
    }
    let chunk = jobs.len().div_ceil(cores);
    let mut ahead = ahead.into_iter();
    std::thread::scope(|s| {
        let parts: Vec<_> = jobs
            .chunks(chunk)
            .map(|c| {
                let mine: Vec<Option<Planned>> = ahead.by_ref().take(c.len()).collect();
                s.spawn(move || c.iter().zip(mine).map(one).collect::<Vec<_>>())
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
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
        self.put_planned(stored, last, startup, None)
    }

    /// [`Self::put_job`] with its [`plan`] made already (by [`plan_all`], for a job
    /// new at startup); `None`, or a job that exists after all, plans here.
    pub(super) fn put_planned(
        &mut self,
        stored: StoredJob,
        last: Option<i64>,
        startup: bool,
        planned: Option<crate::error::Result<Plan>>,
    ) -> Option<Vec<i64>> {
        let name = stored.spec.name.clone();
        if self
            .jobs
            .get(&name)
            .is_some_and(|j| j.version >= stored.version)
        {
            return None;
        }
        let prev = self.jobs.get(&name);
        let before = Before {
            last_fire: prev.and_then(|p| p.last_fire).or(last),
            was_paused: prev.is_some_and(|p| p.spec.paused),
            existing_next: prev.map(|p| p.next_fire),
        };
        let planned = match planned {
            Some(p) if prev.is_none() => p,
            _ => plan(&stored.spec, self.now, startup, before),
        };
        let Plan {
            compiled,
            misfired,
            next_fire,
        } = match planned {
            Ok(p) => p,
            Err(e) => {
                warn!(job = %name, error = %e, "stored job is invalid; not scheduling it");
                return None;
            }
        };
        let inline_before = self.inline_jobs_of(&name);
        let prev = self.jobs.remove(&name);
        let generation = prev.as_ref().map_or(0, |p| p.generation) + 1;
        let state = JobState {
            spec: stored.spec,
            version: stored.version,
            compiled,
            generation,
            next_fire,
            last_fire: before.last_fire,
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
        let (next, jitter_ms) = (state.next_fire, state.spec.jitter_ms);
        let workflow = state.spec.workflow.is_some();
        self.jobs.insert(name.clone(), Box::new(state));
        if workflow || !inline_before.is_empty() {
            self.sync_inline_jobs(&name, inline_before);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Schedule;

    const NOW: i64 = 1_700_000_000_000;

    /// Jobs of every kind, some with a last fire, one paused, one invalid.
    fn jobs(n: usize) -> (Vec<StoredJob>, HashMap<String, i64>) {
        let mut last = HashMap::new();
        let jobs = (0..n)
            .map(|i| {
                let name = format!("j{i}");
                let schedule = match i % 5 {
                    0 => Schedule::Cron {
                        expr: format!("{} * * * * *", i % 60),
                        time_zone: String::new(),
                    },
                    1 => Schedule::Cron {
                        expr: "*/7 * * * * *".into(),
                        time_zone: "Asia/Shanghai".into(),
                    },
                    2 => Schedule::FixedRate {
                        every_ms: 1_000 + i as u64,
                    },
                    3 => Schedule::FixedDelay { delay_ms: 5_000 },
                    _ => Schedule::Once {
                        at_ms: NOW + i as i64,
                    },
                };
                let mut spec = JobSpec::new(&name, "g", "h", schedule);
                spec.created_at_ms = NOW - 90_000;
                spec.paused = i == 7;
                if i == 11 {
                    spec.schedule = Schedule::Cron {
                        expr: "not cron".into(),
                        time_zone: String::new(),
                    };
                }
                if i % 3 == 0 {
                    last.insert(name, NOW - 30_000 - i as i64);
                }
                StoredJob { spec, version: 1 }
            })
            .collect();
        (jobs, last)
    }

    fn outcome(p: &crate::error::Result<Plan>) -> Option<(Vec<i64>, Option<i64>)> {
        p.as_ref().ok().map(|p| (p.misfired.clone(), p.next_fire))
    }

    #[test]
    fn plans_made_on_every_core_are_the_plans_made_one_by_one() {
        let (jobs, last) = jobs(PLAN_IN_PARALLEL_FROM + 501);
        let all = plan_all(&jobs, &last, Vec::new(), NOW);
        assert_eq!(all.len(), jobs.len());
        for (j, p) in jobs.iter().zip(&all) {
            let before = Before {
                last_fire: last.get(&j.spec.name).copied(),
                ..Before::default()
            };
            let one = plan(&j.spec, NOW, true, before);
            assert_eq!(outcome(p), outcome(&one), "{}", j.spec.name);
        }
        // The cases are there: missed ticks, a paused job, an invalid one.
        assert!(
            all.iter()
                .any(|p| outcome(p).is_some_and(|(m, _)| m.len() > 10))
        );
        assert_eq!(outcome(&all[7]).map(|(_, next)| next), Some(None));
        assert!(all[11].is_err());
    }

    #[test]
    fn plans_made_ahead_are_used_only_where_they_are_what_a_start_would_plan() {
        let (mut jobs, last) = jobs(PLAN_IN_PARALLEL_FROM + 401);
        // Some that tick rarely: their plans made ahead still stand at the start.
        for (i, j) in jobs.iter_mut().enumerate().filter(|(i, _)| i % 4 == 0) {
            j.spec.schedule = Schedule::Cron {
                expr: format!("{} {} 3 1 6 *", i % 60, i / 60 % 60),
                time_zone: String::new(),
            };
        }
        // One changed since its plan was made.
        let changed = "j8";
        let made = |j: &StoredJob| Planned::ahead(&j.spec, j.version, NOW - 20_000);
        let ahead: Vec<Option<Planned>> = jobs.iter().map(made).collect();
        for j in jobs.iter_mut().filter(|j| j.spec.name == changed) {
            j.version = 2;
            j.spec.schedule = Schedule::FixedRate { every_ms: 1_000 };
        }
        let all = plan_all(&jobs, &last, ahead.clone(), NOW);
        let mut reused = 0;
        for (i, (j, p)) in jobs.iter().zip(&all).enumerate() {
            let l = last.get(&j.spec.name).copied();
            let fresh = plan(
                &j.spec,
                NOW,
                true,
                Before {
                    last_fire: l,
                    ..Before::default()
                },
            );
            assert_eq!(outcome(p), outcome(&fresh), "{}", j.spec.name);
            if ahead[i]
                .clone()
                .and_then(|a| a.reuse(&j.spec, j.version, l, NOW))
                .is_some()
            {
                reused += 1;
            }
        }
        // Used: the rare ones never fired and the paused one; not: anything that
        // fired, ticked since, counts from the start (delay) or changed.
        assert!(reused >= 300, "{reused} plans used");
        let a = |n: &str| {
            let i = jobs.iter().position(|j| j.spec.name == n).expect(n);
            ahead[i].clone().expect(n)
        };
        let job = |n: &str| jobs.iter().find(|j| j.spec.name == n).expect(n);
        assert!(
            a("j0")
                .reuse(&job("j0").spec, 1, last.get("j0").copied(), NOW)
                .is_none(),
            "fired before"
        );
        assert!(
            a("j4").reuse(&job("j4").spec, 1, None, NOW).is_some(),
            "rare, never fired"
        );
        assert!(
            a("j2").reuse(&job("j2").spec, 1, None, NOW).is_none(),
            "ticked since"
        );
        assert!(
            a("j13").reuse(&job("j13").spec, 1, None, NOW).is_none(),
            "a delay"
        );
        assert!(
            a(changed).reuse(&job(changed).spec, 2, None, NOW).is_none(),
            "changed"
        );
    }
}
