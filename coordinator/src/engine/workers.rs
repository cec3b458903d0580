//! Worker sessions, in the core: registration, heartbeats (and the shards they
//! list), drains, capacity, the end of a session and why, and what happens when a
//! worker dies (its unfinished shards go to live workers of its group, keeping their
//! indexes).

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use super::ShardKey;
use super::machine::{CallId, Effect, Held, Machine, Reply, WorkerState};
use crate::error::{CoordError, Result};
use crate::model::RunState;

/// A worker's registration (the domain form of `Register`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerHello {
    /// Stable id.
    pub worker_id: String,
    /// Group.
    pub group: String,
    /// Job handlers it runs.
    pub handlers: Vec<String>,
    /// Most shards it runs at once (at least 1): a full worker is given no shard.
    pub capacity: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Shards it still runs from an earlier session.
    pub running: Vec<ShardKey>,
}

/// What the engine answers a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionAccepted {
    /// Session number (messages of older sessions are ignored).
    pub session: u64,
    /// Heartbeat interval, ms.
    pub heartbeat_interval_ms: u64,
    /// This coordinator's address.
    pub coordinator: String,
    /// The engine's clock when it accepted the session, Unix ms: the origin of the
    /// session clock that `Assign.start_by_session_ms` is counted on.
    pub accepted_at_ms: i64,
}

/// Why the coordinator ends a worker's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The worker missed its heartbeats; its shards went to other workers.
    DeclaredDead,
    /// A newer session registered with the same worker id.
    Replaced,
    /// The worker drained: it asked to, and runs nothing the coordinator waits for.
    Drained,
    /// This coordinator stopped leading (shutting down, lost its lease, or fenced
    /// out by a newer leader): reconnect, and the next leader takes over.
    LeadershipEnded,
    /// The worker closed the stream itself (nothing is sent).
    WorkerClosed,
}

/// What the engine sends a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    /// Run a shard.
    Assign(Assignment),
    /// Stop a shard.
    Cancel(ShardKey, String),
    /// The session ends (the last message of a session).
    End(EndReason),
}

/// One shard to run (the domain form of `Assign`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Which.
    pub key: ShardKey,
    /// The fire.
    pub fire_id: String,
    /// Job name.
    pub job: String,
    /// Handler.
    pub handler: String,
    /// Params.
    pub params: String,
    /// Shard params.
    pub shard_params: String,
    /// Shards in the run.
    pub shard_total: u32,
    /// Deadline, Unix ms (0: none).
    pub deadline_ms: i64,
    /// Scheduled instant.
    pub scheduled_at_ms: i64,
    /// The worker must start the shard by then, engine clock, Unix ms: the earliest
    /// instant the engine could give it to another worker (its heartbeats leaving it
    /// out for an interval, or the worker declared dead). A worker reading the
    /// `Assign` later does not start it (see `Assign.start_by_session_ms`).
    pub start_by_ms: i64,
}

/// Checks a registration; errors name the field of `Register`.
fn check(hello: &WorkerHello) -> Result<()> {
    chime_shared::limits::check_handler("register.worker_id", &hello.worker_id).or_else(|_| {
        chime_shared::limits::check_text("register.worker_id", &hello.worker_id, 253)
    })?;
    chime_shared::limits::check_qualified("register.group", &hello.group)?;
    if hello.handlers.len() > 1_000 {
        return Err(CoordError::invalid("register.handlers", "more than 1000"));
    }
    for (i, h) in hello.handlers.iter().enumerate() {
        chime_shared::limits::check_handler(&format!("register.handlers[{i}]"), h)?;
    }
    if hello.capacity == 0 {
        return Err(CoordError::invalid(
            "register.capacity",
            "must be at least 1 (the most shards this worker runs at once)",
        ));
    }
    Ok(())
}

impl Machine {
    /// A session starts; the answer goes to `call` (before anything is sent to it).
    pub(super) fn register(&mut self, call: CallId, hello: WorkerHello) {
        if let Err(e) = check(&hello) {
            self.effect(Effect::Reply(call, Reply::Registered(Err(e))));
            return;
        }
        let now = self.now;
        // A worker that reconnects replaces its old session; shards of the old one
        // that it still runs stay with it, the others go to live workers.
        let old = self.workers.live.remove(&hello.worker_id);
        self.workers.sessions += 1;
        let session = self.workers.sessions;
        let mut running = BTreeMap::new();
        for k in &hello.running {
            let Some(s) = self
                .runs
                .active
                .get_mut(&k.run_id)
                .and_then(|r| r.shards.get_mut(k.shard as usize))
            else {
                continue;
            };
            if s.state.is_final() {
                continue;
            }
            let ours = s.worker_id == hello.worker_id && s.attempt == k.attempt;
            // A newer attempt than the record knows (a previous leader sent it and
            // died before saving), or the very attempt of a shard the record shows
            // waiting for a worker: the worker runs it, so it is the worker's. An
            // older attempt is stale (a newer one was handed out since).
            let adopt = k.attempt > s.attempt
                || (k.attempt == s.attempt
                    && s.state == RunState::Pending
                    && s.worker_id.is_empty());
            if ours || adopt {
                if adopt {
                    info!(run_id = %k.run_id, shard = k.shard, attempt = k.attempt, worker_id = %hello.worker_id, "adopting a shard the worker reports");
                    // Whoever the record named no longer holds it.
                    if let Some(w) = self.workers.live.get_mut(&s.worker_id) {
                        w.running.remove(&(k.run_id.clone(), k.shard));
                    }
                    s.worker_id = hello.worker_id.clone();
                    s.attempt = k.attempt;
                    s.state = RunState::Running;
                    self.runs.pending.remove(&(k.run_id.clone(), k.shard));
                }
                running.insert(
                    (k.run_id.clone(), k.shard),
                    Held {
                        attempt: k.attempt,
                        since: now,
                        missed: 0,
                    },
                );
            }
        }
        if let Some(old) = old {
            info!(worker_id = %hello.worker_id, old_session = old.session, session, "a newer session replaces the worker's session");
            self.effect(Effect::End {
                session: old.session,
                reason: EndReason::Replaced,
            });
            let lost: Vec<(String, u32)> = old
                .running
                .keys()
                .filter(|k| !running.contains_key(*k))
                .cloned()
                .collect();
            self.take_over(&hello.worker_id, lost);
        }
        if self.workers.live.is_empty() {
            self.grace_restarts();
        }
        info!(worker_id = %hello.worker_id, group = %hello.group, handlers = ?hello.handlers, capacity = hello.capacity, session, "worker registered");
        self.workers.live.insert(
            hello.worker_id.clone(),
            WorkerState {
                hello,
                session,
                running,
                connected_at_ms: now,
                last_beat_ms: now,
                last_assigned_ms: 0,
                draining: false,
            },
        );
        self.publish_worker_gauges();
        self.effect(Effect::Reply(
            call,
            Reply::Registered(Ok(super::SessionAccepted {
                session,
                heartbeat_interval_ms: self.opts.heartbeat_interval_ms,
                coordinator: self.opts.advertise.clone(),
                accepted_at_ms: now,
            })),
        ));
        // New capacity: place what was waiting for a worker.
        self.place_pending();
    }

    fn session_ok(&self, worker: &str, session: u64) -> bool {
        self.workers
            .live
            .get(worker)
            .is_some_and(|w| w.session == session)
    }

    /// A heartbeat: the worker lives, and `running` lists the shards it runs. A
    /// shard it was sent at least a heartbeat interval ago that two heartbeats in a
    /// row leave out is lost (the worker never got it, or lost it): another worker
    /// takes it. Two, not one: a worker may send a heartbeat between a shard's end
    /// and its result.
    pub(super) fn heartbeat(&mut self, worker: &str, session: u64, running: Vec<ShardKey>) {
        let now = self.now;
        let grace = self.opts.heartbeat_interval_ms as i64;
        let Some(w) = self
            .workers
            .live
            .get_mut(worker)
            .filter(|w| w.session == session)
        else {
            return;
        };
        w.last_beat_ms = now;
        let listed: BTreeSet<(&str, u32, u32)> = running
            .iter()
            .map(|k| (k.run_id.as_str(), k.shard, k.attempt))
            .collect();
        let mut lost = Vec::new();
        for ((run_id, shard), held) in w.running.iter_mut() {
            if listed.contains(&(run_id.as_str(), *shard, held.attempt)) {
                held.missed = 0;
            } else if now - held.since >= grace {
                held.missed += 1;
                if held.missed >= 2 {
                    lost.push((run_id.clone(), *shard));
                }
            }
        }
        for (run_id, shard) in lost {
            warn!(worker_id = worker, run_id = %run_id, shard, "the worker's heartbeats leave out a shard it was sent; taking it over");
            self.take_over(worker, vec![(run_id, shard)]);
        }
    }

    pub(super) fn draining(&mut self, worker: &str, session: u64) {
        if let Some(w) = self
            .workers
            .live
            .get_mut(worker)
            .filter(|w| w.session == session)
        {
            info!(worker_id = worker, "worker draining");
            w.draining = true;
        }
        self.maybe_drained(worker);
    }

    pub(super) fn closed(&mut self, worker: &str, session: u64) {
        if self.session_ok(worker, session) {
            info!(worker_id = worker, "worker session closed");
            self.drop_worker(worker, EndReason::WorkerClosed);
        }
    }

    /// Marks workers that missed their heartbeats dead.
    pub(super) fn sweep(&mut self) {
        let limit = self.opts.heartbeat_interval_ms as i64 * self.opts.dead_after_beats as i64;
        let now = self.now;
        let dead: Vec<String> = self
            .workers
            .live
            .iter()
            .filter(|(_, w)| now - w.last_beat_ms > limit)
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            warn!(worker_id = %id, "worker missed its heartbeats; taking its shards over");
            self.drop_worker(&id, EndReason::DeclaredDead);
        }
    }

    /// Sets the live-worker gauges: all of them, and per group. A group whose last
    /// worker left is set to 0 rather than dropped, so an alert on "fewer than N
    /// workers in group G" sees the 0 instead of a missing series.
    fn publish_worker_gauges(&mut self) {
        use chime_shared::telemetry as m;
        metrics::gauge!(m::CONNECTED_WORKERS).set(self.workers.live.len() as f64);
        let mut by_group: BTreeMap<&str, u32> = self
            .workers
            .groups_seen
            .iter()
            .map(|g| (g.as_str(), 0))
            .collect();
        for w in self.workers.live.values() {
            *by_group.entry(w.hello.group.as_str()).or_insert(0) += 1;
        }
        let new: Vec<String> = by_group
            .keys()
            .filter(|g| !self.workers.groups_seen.contains(**g))
            .map(|g| (*g).to_owned())
            .collect();
        for (group, n) in by_group {
            metrics::gauge!(m::GROUP_WORKERS, "group" => group.to_owned()).set(f64::from(n));
        }
        self.workers.groups_seen.extend(new);
    }

    /// Ends `worker`'s session for `reason`; its unfinished shards go to others.
    fn drop_worker(&mut self, worker: &str, reason: EndReason) {
        let Some(w) = self.workers.live.remove(worker) else {
            return;
        };
        self.publish_worker_gauges();
        self.effect(Effect::End {
            session: w.session,
            reason,
        });
        self.take_over(worker, w.running.into_keys().collect());
    }

    /// Gives the unfinished `shards` of `from` to live workers: same index, a new
    /// assignment number, not counted as a failure.
    fn take_over(&mut self, from: &str, shards: Vec<(String, u32)>) {
        for (run_id, shard) in shards {
            let unfinished = self
                .runs
                .active
                .get(&run_id)
                .and_then(|r| r.shards.get(shard as usize))
                .is_some_and(|s| !s.state.is_final() && s.worker_id == from);
            if unfinished {
                info!(run_id = %run_id, shard, from, "shard taken over");
                self.assign_shard(&run_id, shard, Some(from.to_owned()));
            } else {
                self.unhold(from, &run_id, shard);
            }
        }
    }

    /// `worker` no longer runs `shard` of `run_id`: its room may take a waiting
    /// shard, and a draining worker may be done.
    pub(super) fn unhold(&mut self, worker: &str, run_id: &str, shard: u32) {
        let Some(w) = self.workers.live.get_mut(worker) else {
            return;
        };
        if w.running.remove(&(run_id.to_owned(), shard)).is_none() {
            return;
        }
        if !self.runs.pending.is_empty() {
            let now = self.now;
            self.arm_pending(now);
        }
        self.maybe_drained(worker);
    }

    /// Ends the session of a draining worker that runs nothing any more: telling it
    /// so confirms that every result it owed arrived.
    fn maybe_drained(&mut self, worker: &str) {
        if self
            .workers
            .live
            .get(worker)
            .is_some_and(|w| w.draining && w.running.is_empty())
        {
            info!(worker_id = worker, "worker drained");
            self.drop_worker(worker, EndReason::Drained);
        }
    }

    /// An assignment did not reach session `session`: unless the shard moved on
    /// meanwhile, it waits for another worker.
    pub(super) fn undelivered(&mut self, session: u64, key: ShardKey) {
        let Some(worker) = self
            .workers
            .live
            .iter()
            .find(|(_, w)| w.session == session)
            .map(|(id, _)| id.clone())
        else {
            return;
        };
        let current = self
            .runs
            .active
            .get(&key.run_id)
            .and_then(|r| r.shards.get(key.shard as usize))
            .is_some_and(|s| {
                s.state == RunState::Running && s.attempt == key.attempt && s.worker_id == worker
            });
        if current {
            warn!(worker_id = %worker, run_id = %key.run_id, shard = key.shard, "assignment could not be delivered; placing it elsewhere");
            // Not `unhold`: that would place it again at once, and a full channel
            // would then refuse it again; it waits the usual second instead.
            if let Some(w) = self.workers.live.get_mut(&worker) {
                w.running.remove(&(key.run_id.clone(), key.shard));
            }
            self.back_to_pending(&key.run_id, key.shard);
        }
    }
}
