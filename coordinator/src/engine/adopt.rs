//! Taking over from a previous leader, in the core: the runs it left in progress
//! (saved with each fire and each change) are adopted. A shard it had given to a
//! worker stays with that worker if the worker reports it when it registers here
//! (within the adoption grace); otherwise it is taken over. Shards waiting for a
//! worker are placed after the grace, once workers had their chance to report what
//! they run. A run the previous leader recorded ahead of its instant (never sent) is
//! adopted like any other and goes out after the grace, which is longer than any
//! lead, and never before its instant.
//!
//! Unless the previous leader handed over (it stopped on SIGTERM and left a note,
//! `RunStore::hand_over`): then its records are exact. Shards it left waiting for
//! a worker were never sent and are placed at once; runs it recorded ahead and
//! never sent go out at their instant like this leader's own prepared runs. Only
//! the shards it did send wait for their workers to report them, as after a crash
//! (they are running already, so that wait delays nothing).

use std::collections::BTreeSet;

use tracing::info;

use super::ShardKey;
use super::dispatch::BUFFERED;
use super::machine::{Machine, Timer};
use crate::model::{RunRecord, RunState};

impl Machine {
    /// How long adopted shards wait for their workers to report them: until a
    /// worker of the old leader has noticed its loss (however short the heartbeat
    /// settings: a frozen leader's workers notice through their session pings),
    /// plus 2 s to find and register with this leader.
    pub(super) fn adopt_grace_ms(&self) -> i64 {
        let beats = self.opts.heartbeat_interval_ms * u64::from(self.opts.dead_after_beats);
        beats.max(chime_shared::session::WORKER_NOTICES_LOSS_WITHIN_MS) as i64 + 2_000
    }

    /// Adopts the runs a previous leader left in progress; `handover`: it handed
    /// over, and these runs it recorded ahead were never sent.
    pub(super) fn adopt(&mut self, runs: Vec<RunRecord>, handover: Option<Vec<String>>) {
        if runs.is_empty() {
            return;
        }
        let now = self.now;
        let grace = self.adopt_grace_ms();
        let handed_over = handover.is_some();
        let unsent: BTreeSet<String> = handover.unwrap_or_default().into_iter().collect();
        // Never before an adopted run's instant (a fire prepared ahead).
        let latest = runs
            .iter()
            .filter(|r| !unsent.contains(&r.run_id))
            .map(|r| r.scheduled_at_ms)
            .max()
            .unwrap_or(now);
        self.runs.adopt_until = (now + grace).max(latest);
        self.runs.handed_over = handed_over;
        info!(
            runs = runs.len(),
            grace_ms = grace,
            handed_over,
            unsent = unsent.len(),
            "adopting runs in progress"
        );
        for run in runs {
            let run_id = run.run_id.clone();
            if run.shards.is_empty() && run.note == BUFFERED {
                if let Some(j) = self.jobs.get_mut(&run.job) {
                    j.buffered = Some((run.scheduled_at_ms, run_id));
                }
                continue;
            }
            if unsent.contains(&run_id) {
                // Never sent: prepared again as this leader prepares its own, its
                // planned workers reserved, out at its instant (`go_one` moves a
                // shard whose planned worker is not here then).
                let at = run.scheduled_at_ms.max(now);
                if let Some(j) = self.jobs.get_mut(&run.job) {
                    j.prepared = Some(run_id.clone());
                }
                self.reserve(&run);
                self.runs.prepared.insert(run_id.clone(), run);
                self.timers.schedule(at, Timer::Go(vec![run_id]));
                continue;
            }
            if let Some(j) = self.jobs.get_mut(&run.job) {
                j.running.insert(run_id.clone());
            }
            let until = (now + grace).max(run.scheduled_at_ms);
            for s in &run.shards {
                match s.state {
                    RunState::Running => self.timers.schedule(
                        until,
                        Timer::Adopt(ShardKey {
                            run_id: run_id.clone(),
                            shard: s.index,
                            attempt: s.attempt,
                        }),
                    ),
                    // Failed and waiting for its retry (whose timer died with the
                    // previous leader): retried after the grace.
                    RunState::Pending if !s.worker_id.is_empty() => self.timers.schedule(
                        until,
                        Timer::Retry {
                            run_id: run_id.clone(),
                            shard: s.index,
                        },
                    ),
                    RunState::Pending => {
                        self.runs.pending.insert((run_id.clone(), s.index));
                    }
                    _ => {}
                }
            }
            self.runs.active.insert(run_id, run);
        }
        // Shards left waiting for a worker: after the grace, unless they were
        // handed over (never sent, so no worker can report them).
        let until = if handed_over {
            now
        } else {
            self.runs.adopt_until
        };
        self.arm_pending(until);
    }

    /// A worker connects while none was: the workers could not reach this leader
    /// until now (they may know only a coordinator that is down), so they get the
    /// whole grace again to report what they ran for the runs it adopted. Else a
    /// shard whose worker finished it, but comes back a moment after another
    /// worker, would run twice.
    pub(super) fn grace_restarts(&mut self) {
        let until = self.now + self.adopt_grace_ms();
        if self.runs.adopt_until > 0 && until > self.runs.adopt_until {
            self.runs.adopt_until = until;
            self.arm_pending(until);
        }
    }

    /// The grace of an adopted shard ended: unless its worker reported it, another
    /// worker takes it. While no worker is connected, or within a grace of the
    /// first one connecting (see [`Machine::grace_restarts`]), it waits on: its
    /// own worker may still come back with it, or with its result.
    pub(super) fn adopt_deadline(&mut self, key: ShardKey) {
        let now = self.now;
        if now < self.runs.adopt_until || self.workers.live.is_empty() {
            let at = if now < self.runs.adopt_until {
                self.runs.adopt_until
            } else {
                now + self.adopt_grace_ms()
            };
            self.timers.schedule(at, Timer::Adopt(key));
            return;
        }
        let Some(s) = self
            .runs
            .active
            .get(&key.run_id)
            .and_then(|r| r.shards.get(key.shard as usize))
        else {
            return;
        };
        if s.state != RunState::Running || s.attempt != key.attempt {
            return;
        }
        let worker = s.worker_id.clone();
        let reported = self
            .workers
            .live
            .get(&worker)
            .is_some_and(|w| w.running.contains_key(&(key.run_id.clone(), key.shard)));
        if !reported {
            info!(run_id = %key.run_id, shard = key.shard, worker = %worker, "adopted shard not reported by its worker; taking it over");
            self.assign_shard(&key.run_id, key.shard, Some(worker));
        }
    }
}
