//! Worker sessions in the engine: registration, heartbeats, drains, and what
//! happens when a worker dies (its unfinished shards go to live workers of its
//! group, keeping their indexes).

use std::collections::BTreeMap;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Engine, ShardKey, WorkerState};
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
    /// Most shards at once (a routing hint).
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
}

/// What the engine sends a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    /// Run a shard.
    Assign(Assignment),
    /// Stop a shard.
    Cancel(ShardKey, String),
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
}

impl Engine {
    pub(super) fn register(
        &mut self,
        hello: WorkerHello,
        tx: mpsc::Sender<ToWorker>,
    ) -> Result<SessionAccepted> {
        chime_shared::limits::check_handler("worker_id", &hello.worker_id)
            .or_else(|_| chime_shared::limits::check_text("worker_id", &hello.worker_id, 253))?;
        chime_shared::limits::check_handler("group", &hello.group)?;
        if hello.handlers.len() > 1_000 {
            return Err(CoordError::invalid("handlers", "more than 1000"));
        }
        for (i, h) in hello.handlers.iter().enumerate() {
            chime_shared::limits::check_handler(&format!("handlers[{i}]"), h)?;
        }
        let now = self.now();
        // A worker that reconnects replaces its old session; shards of the old one
        // that it still runs stay with it, the others go to live workers.
        let old = self.workers.remove(&hello.worker_id);
        self.sessions += 1;
        let session = self.sessions;
        let mut running = std::collections::HashSet::new();
        for k in &hello.running {
            let Some(s) = self
                .runs
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
            // died before saving), or a shard the record shows waiting: the worker
            // runs it, so it is the worker's.
            let adopt =
                k.attempt > s.attempt || (s.state == RunState::Pending && s.worker_id.is_empty());
            if ours || adopt {
                if adopt {
                    info!(run_id = %k.run_id, shard = k.shard, attempt = k.attempt, worker_id = %hello.worker_id, "adopting a shard the worker reports");
                    s.worker_id = hello.worker_id.clone();
                    s.attempt = k.attempt;
                    s.state = RunState::Running;
                    self.pending.remove(&(k.run_id.clone(), k.shard));
                }
                running.insert((k.run_id.clone(), k.shard));
            }
        }
        if let Some(old) = old {
            let lost: Vec<(String, u32)> = old.running.difference(&running).cloned().collect();
            self.take_over(&hello.worker_id, lost);
        }
        info!(worker_id = %hello.worker_id, group = %hello.group, handlers = ?hello.handlers, session, "worker registered");
        self.workers.insert(
            hello.worker_id.clone(),
            WorkerState {
                hello,
                session,
                tx,
                running,
                connected_at_ms: now,
                last_beat_ms: now,
                last_assigned_ms: 0,
                draining: false,
            },
        );
        metrics::gauge!(chime_shared::telemetry::CONNECTED_WORKERS).set(self.workers.len() as f64);
        // New capacity: place what was waiting for a worker.
        self.place_pending();
        Ok(SessionAccepted {
            session,
            heartbeat_interval_ms: self.opts.heartbeat_interval_ms,
            coordinator: self.opts.advertise.clone(),
        })
    }

    fn session_ok(&self, worker: &str, session: u64) -> bool {
        self.workers
            .get(worker)
            .is_some_and(|w| w.session == session)
    }

    pub(super) fn heartbeat(&mut self, worker: &str, session: u64, _running: Vec<ShardKey>) {
        let now = self.now();
        if let Some(w) = self
            .workers
            .get_mut(worker)
            .filter(|w| w.session == session)
        {
            w.last_beat_ms = now;
        }
    }

    pub(super) fn draining(&mut self, worker: &str, session: u64) {
        if let Some(w) = self
            .workers
            .get_mut(worker)
            .filter(|w| w.session == session)
        {
            info!(worker_id = worker, "worker draining");
            w.draining = true;
        }
    }

    pub(super) fn closed(&mut self, worker: &str, session: u64) {
        if self.session_ok(worker, session) {
            info!(worker_id = worker, "worker session closed");
            self.worker_gone(worker);
        }
    }

    /// Marks workers that missed their heartbeats dead.
    pub(super) fn sweep(&mut self) {
        let limit = self.opts.heartbeat_interval_ms as i64 * self.opts.dead_after_beats as i64;
        let now = self.now();
        let dead: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| now - w.last_beat_ms > limit)
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            warn!(worker_id = %id, "worker missed its heartbeats; taking its shards over");
            self.worker_gone(&id);
        }
    }

    fn worker_gone(&mut self, worker: &str) {
        let Some(w) = self.workers.remove(worker) else {
            return;
        };
        metrics::gauge!(chime_shared::telemetry::CONNECTED_WORKERS).set(self.workers.len() as f64);
        self.take_over(worker, w.running.into_iter().collect());
    }

    /// Gives the unfinished `shards` of `from` (no longer registered) to live
    /// workers: same index, a new assignment number, not counted as a failure.
    fn take_over(&mut self, from: &str, shards: Vec<(String, u32)>) {
        for (run_id, shard) in shards {
            let unfinished = self
                .runs
                .get(&run_id)
                .and_then(|r| r.shards.get(shard as usize))
                .is_some_and(|s| !s.state.is_final() && s.worker_id == from);
            if unfinished {
                info!(run_id = %run_id, shard, from, "shard taken over");
                self.assign_shard(&run_id, shard, Some(from.to_owned()));
            }
        }
    }

    pub(super) fn send(&mut self, worker: &str, msg: ToWorker) -> bool {
        match self.workers.get(worker) {
            Some(w) => w.tx.try_send(msg).is_ok(),
            None => false,
        }
    }
}
