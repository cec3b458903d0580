//! Test kit for the engine's core: [`Rig`] drives one [`Machine`] on virtual time
//! the way the driver does (effects performed in order, store answers fed back),
//! with the memory run store behind its requests (told to fail when a test wants),
//! and keeps everything the machine sent. [`check`] states the machine's structural
//! invariants; the unit tests and the simulation run it after every step.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::machine::{Answer, CallId, Effect, Input, Machine, Reply, Request, Timer};
use super::workers::{Assignment, EndReason, ToWorker, WorkerHello};
use super::{EngineOptions, ShardKey, ShardOutcome};
use crate::model::{JobSpec, RunRecord, RunState};
use crate::store::{MemoryRunStore, Retention, RunStore, StoredJob};

/// 2026-01-01T00:00:00Z.
pub(super) const T0: i64 = 1_767_225_600_000;

/// The value of a future that is ready at once (the memory store's always are).
pub(super) fn ready<T>(f: impl Future<Output = T>) -> T {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store's future was not ready"),
    }
}

/// A message the machine sent, and when.
#[derive(Debug, Clone)]
pub(super) struct Sent {
    pub(super) at: i64,
    pub(super) worker: String,
    pub(super) msg: ToWorker,
}

/// One machine on virtual time with a memory store (see the module doc).
#[derive(Debug)]
pub(super) struct Rig {
    pub(super) m: Machine,
    pub(super) now: i64,
    pub(super) store: MemoryRunStore,
    pub(super) sent: Vec<Sent>,
    pub(super) ended: Vec<(String, EndReason)>,
    pub(super) replies: BTreeMap<CallId, Reply>,
    pub(super) lost: bool,
    /// The next this many record requests fail (nothing recorded).
    pub(super) fail_records: u32,
    /// The next this many record requests are applied, but their answer is lost
    /// (the engine sees a failure: a timeout, a cut connection).
    pub(super) lose_answers: u32,
    /// The fire ids of every record request that reached the store, in order.
    pub(super) recorded: Vec<Vec<String>>,
    /// The next this many fence checks fail.
    pub(super) fail_fences: u32,
    /// Session → worker id.
    sessions: HashMap<u64, String>,
    next_call: CallId,
    versions: i64,
    /// What the previous leader handed over (read when the fence was installed).
    handover: Option<Vec<String>>,
}

/// Engine options of the tests: 1 s heartbeats, fires prepared 250 ms ahead.
pub(super) fn opts() -> EngineOptions {
    EngineOptions {
        heartbeat_interval_ms: 1_000,
        dead_after_beats: 3,
        advertise: "coordinator:1".into(),
        prepare_ahead_ms: 250,
    }
}

impl Rig {
    /// A leader with fencing token 1 at [`T0`], on an empty store.
    pub(super) fn new(opts: EngineOptions) -> Self {
        Self::on(MemoryRunStore::new(Retention::default()), opts, 1, T0)
    }

    /// A leader with fencing token `fence` at `now` on `store` (the fence is
    /// installed; the leader is not started).
    pub(super) fn on(store: MemoryRunStore, opts: EngineOptions, fence: i64, now: i64) -> Self {
        let installed = ready(store.install_fence(fence)).unwrap();
        assert!(installed.installed(), "fence {fence}");
        Self {
            handover: installed.hand_over(),
            m: Machine::new(opts, fence, 7),
            now,
            store,
            sent: Vec::new(),
            ended: Vec::new(),
            replies: BTreeMap::new(),
            lost: false,
            fail_records: 0,
            lose_answers: 0,
            recorded: Vec::new(),
            fail_fences: 0,
            sessions: HashMap::new(),
            next_call: 0,
            versions: 0,
        }
    }

    /// Starts the leader with `jobs` (and what the store holds).
    pub(super) fn start(&mut self, jobs: Vec<JobSpec>) {
        let jobs = jobs
            .into_iter()
            .map(|spec| {
                self.versions += 1;
                StoredJob {
                    spec,
                    version: self.versions,
                }
            })
            .collect();
        let last = ready(self.store.trigger_state()).unwrap();
        let active = ready(self.store.active_runs()).unwrap();
        let handover = self.handover.clone();
        let ended_nodes = ready(super::driver::ended_nodes(&self.store, &active)).unwrap();
        self.input(Input::Start {
            jobs,
            last,
            active,
            handover,
            ahead: Default::default(),
            ended_nodes,
        });
    }

    /// Hands `input` to the machine at `now` and performs what it answers.
    pub(super) fn input(&mut self, input: Input) {
        let before = self.sent.len();
        let mut queue: std::collections::VecDeque<Effect> = self.m.step(self.now, input).into();
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Send { session, msg } => match self.sessions.get(&session) {
                    Some(w) => self.sent.push(Sent {
                        at: self.now,
                        worker: w.clone(),
                        msg,
                    }),
                    None => panic!("sent to an unknown session {session}: {msg:?}"),
                },
                Effect::End { session, reason } => {
                    if let Some(w) = self.sessions.remove(&session) {
                        self.ended.push((w, reason));
                    }
                }
                Effect::Save(run) | Effect::SaveNow(run) => {
                    ready(self.store.save_run(&run)).unwrap();
                }
                Effect::Reply(call, r) => {
                    if let Reply::Registered(Ok(a)) = &r
                        && let Some((w, _)) = self
                            .m
                            .workers
                            .live
                            .iter()
                            .find(|(_, w)| w.session == a.session)
                    {
                        self.sessions.insert(a.session, w.clone());
                    }
                    self.replies.insert(call, r);
                }
                Effect::LostLead => self.lost = true,
                Effect::Request(r) => {
                    let answer = self.answer(r);
                    queue.extend(self.m.step(self.now, Input::Answer(answer)));
                }
            }
        }
        if let Err(e) = check(&self.m).and_then(|()| check_capacity(&self.m, &self.sent[before..]))
        {
            panic!("invariant broken at {}: {e}", self.now - T0);
        }
    }

    /// What the store answers `r` (or an injected failure).
    pub(super) fn answer(&mut self, r: Request) -> Answer {
        match r {
            Request::Record { fence, fires } => {
                if self.fail_records > 0 {
                    self.fail_records -= 1;
                    return Answer::Record(Err("injected record failure".into()));
                }
                self.recorded
                    .push(fires.iter().map(|f| f.fire_id.clone()).collect());
                let applied =
                    ready(self.store.record_fires(fence, &fires)).map_err(|e| e.to_string());
                if self.lose_answers > 0 {
                    self.lose_answers -= 1;
                    return Answer::Record(Err("injected lost answer".into()));
                }
                Answer::Record(applied)
            }
            Request::CheckFence { fence } => {
                if self.fail_fences > 0 {
                    self.fail_fences -= 1;
                    return Answer::Fence(Err("injected fence failure".into()));
                }
                Answer::Fence(ready(self.store.fence_holds(fence)).map_err(|e| e.to_string()))
            }
        }
    }

    /// Runs every timer due up to `now + ms`, each at its own instant.
    pub(super) fn advance(&mut self, ms: i64) {
        let until = self.now + ms;
        while let Some(at) = self.m.next_wake().filter(|at| *at <= until) {
            self.now = self.now.max(at);
            self.input(Input::Timers);
        }
        self.now = until;
    }

    fn call(&mut self) -> CallId {
        self.next_call += 1;
        self.next_call
    }

    /// Registers worker `id` (group `g`, handler `h`) with `capacity`; answers its
    /// session.
    pub(super) fn join(&mut self, id: &str, capacity: u32) -> u64 {
        self.join_with(WorkerHello {
            worker_id: id.into(),
            group: "g".into(),
            handlers: vec!["h".into()],
            capacity,
            labels: BTreeMap::new(),
            running: Vec::new(),
        })
        .expect("registered")
    }

    /// Registers `hello`; answers its session or the refusal.
    pub(super) fn join_with(&mut self, hello: WorkerHello) -> crate::Result<u64> {
        let call = self.call();
        self.input(Input::Register(call, hello));
        match self.replies.remove(&call) {
            Some(Reply::Registered(r)) => r.map(|a| a.session),
            other => panic!("register answered {other:?}"),
        }
    }

    /// The current session of worker `id`.
    pub(super) fn session(&self, id: &str) -> u64 {
        self.m.workers.live.get(id).map_or(0, |w| w.session)
    }

    /// Heartbeats of every live worker but `silent`, listing what the machine says
    /// they hold.
    pub(super) fn beat_all_but(&mut self, silent: &[&str]) {
        let beats: Vec<(String, u64, Vec<ShardKey>)> = self
            .m
            .workers
            .live
            .iter()
            .filter(|(id, _)| !silent.contains(&id.as_str()))
            .map(|(id, w)| {
                let running = w
                    .running
                    .iter()
                    .map(|((run_id, shard), h)| ShardKey {
                        run_id: run_id.clone(),
                        shard: *shard,
                        attempt: h.attempt,
                    })
                    .collect();
                (id.clone(), w.session, running)
            })
            .collect();
        for (worker, session, running) in beats {
            self.input(Input::Heartbeat {
                worker,
                session,
                running,
            });
        }
    }

    /// Advances `ms` with every live worker beating each second.
    pub(super) fn live_for(&mut self, ms: i64) {
        self.live_for_but(ms, &[]);
    }

    /// Advances `ms` with every live worker but `silent` beating each second.
    pub(super) fn live_for_but(&mut self, ms: i64, silent: &[&str]) {
        let until = self.now + ms;
        while self.now < until {
            let step = (until - self.now).min(1_000);
            self.advance(step);
            self.beat_all_but(silent);
        }
    }

    /// Assignments sent to `worker` so far, with when.
    pub(super) fn assigns(&self, worker: &str) -> Vec<(i64, Assignment)> {
        self.sent
            .iter()
            .filter(|s| s.worker == worker)
            .filter_map(|s| match &s.msg {
                ToWorker::Assign(a) => Some((s.at, a.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every assignment sent so far, with when and to whom.
    pub(super) fn all_assigns(&self) -> Vec<(i64, String, Assignment)> {
        self.sent
            .iter()
            .filter_map(|s| match &s.msg {
                ToWorker::Assign(a) => Some((s.at, s.worker.clone(), a.clone())),
                _ => None,
            })
            .collect()
    }

    /// Cancels sent to `worker` so far.
    pub(super) fn cancels(&self, worker: &str) -> Vec<ShardKey> {
        self.sent
            .iter()
            .filter(|s| s.worker == worker)
            .filter_map(|s| match &s.msg {
                ToWorker::Cancel(k, _) => Some(k.clone()),
                _ => None,
            })
            .collect()
    }

    /// Worker `worker` reports `outcome` for `key`.
    pub(super) fn report(&mut self, worker: &str, key: &ShardKey, outcome: ShardOutcome) {
        self.input(Input::Result {
            worker: worker.into(),
            key: key.clone(),
            outcome,
        });
    }

    /// Worker `worker` succeeds `key`.
    pub(super) fn succeed(&mut self, worker: &str, key: &ShardKey) {
        self.report(worker, key, ShardOutcome::Succeeded("ok".into()));
    }

    /// Succeeds every assignment sent so far whose shard is still running.
    pub(super) fn succeed_all(&mut self) {
        for (_, w, a) in self.all_assigns() {
            let running = self
                .m
                .runs
                .active
                .get(&a.key.run_id)
                .and_then(|r| r.shards.get(a.key.shard as usize))
                .is_some_and(|s| s.state == RunState::Running && s.attempt == a.key.attempt);
            if running {
                self.succeed(&w, &a.key);
            }
        }
    }

    /// Triggers `job`; answers its run or the refusal.
    pub(super) fn trigger(&mut self, job: &str) -> crate::Result<RunRecord> {
        let call = self.call();
        self.input(Input::Trigger(call, job.into(), None));
        match self.replies.remove(&call) {
            Some(Reply::Run(r)) => r,
            other => panic!("trigger answered {other:?}"),
        }
    }

    /// Kills run `id`; answers the run or the refusal.
    pub(super) fn kill(&mut self, id: &str) -> crate::Result<RunRecord> {
        let call = self.call();
        self.input(Input::Kill(call, id.into()));
        match self.replies.remove(&call) {
            Some(Reply::Run(r)) => r,
            other => panic!("kill answered {other:?}"),
        }
    }

    /// Writes `spec` (a new version of the job).
    pub(super) fn put(&mut self, spec: JobSpec) {
        self.versions += 1;
        let version = self.versions;
        self.input(Input::JobPut(StoredJob { spec, version }));
    }

    /// Stops this leader gracefully, as the driver does on a hand-over: its
    /// snapshots are all written already (the rig saves at once), so it leaves the
    /// note. Answers whether the note was left.
    pub(super) fn hand_over(&mut self) -> bool {
        let unsent = self.m.unsent_runs();
        !self.m.is_fenced_out() && ready(self.store.hand_over(self.m.fence(), &unsent)).unwrap()
    }

    /// The run as the store has it.
    pub(super) fn stored(&self, run_id: &str) -> Option<RunRecord> {
        ready(self.store.get_run(run_id)).unwrap()
    }
}

/// The machine's structural invariants: what workers hold matches the runs; every
/// running shard is held by a live worker (or waits for its adoption deadline);
/// every waiting shard will be looked at again; shards reserved for workers are
/// exactly those of the fires planned and prepared; no worker holds more than its
/// capacity unless it reported those shards itself.
pub(super) fn check(m: &Machine) -> Result<(), String> {
    let timers: Vec<(i64, &Timer)> = m.timers.iter().collect();
    for (id, w) in &m.workers.live {
        for ((run_id, shard), held) in &w.running {
            let s = m
                .runs
                .active
                .get(run_id)
                .and_then(|r| r.shards.get(*shard as usize))
                .ok_or_else(|| format!("{id} holds {run_id}/{shard}, which is not active"))?;
            if s.worker_id != *id || s.attempt != held.attempt || s.state != RunState::Running {
                return Err(format!(
                    "{id} holds {run_id}/{shard}#{}, but it is {s:?}",
                    held.attempt
                ));
            }
        }
    }
    for (run_id, r) in &m.runs.active {
        for s in &r.shards {
            if s.index as usize >= r.shards.len() || s.total as usize != r.shards.len() {
                return Err(format!("{run_id}: shard {} of {}", s.index, s.total));
            }
            match s.state {
                RunState::Running => {
                    let held = m
                        .workers
                        .live
                        .get(&s.worker_id)
                        .is_some_and(|w| w.running.contains_key(&(run_id.clone(), s.index)));
                    let adopting = timers.iter().any(|(_, t)| {
                        matches!(t, Timer::Adopt(k) if k.run_id == *run_id && k.shard == s.index && k.attempt == s.attempt)
                    });
                    if !held && !adopting {
                        return Err(format!(
                            "{run_id}/{} runs on {:?}, which does not hold it",
                            s.index, s.worker_id
                        ));
                    }
                }
                RunState::Pending => {
                    let waits = m.runs.pending.contains(&(run_id.clone(), s.index));
                    let retries = timers.iter().any(|(_, t)| {
                        matches!(t, Timer::Retry { run_id: r, shard } if r == run_id && *shard == s.index)
                    });
                    if !waits && !retries {
                        return Err(format!("{run_id}/{} waits for nothing", s.index));
                    }
                }
                _ => {}
            }
        }
    }
    if !m.runs.pending.is_empty() && !timers.iter().any(|(_, t)| matches!(t, Timer::Pending)) {
        return Err(format!(
            "{} shards wait, no placement armed",
            m.runs.pending.len()
        ));
    }
    let mut reserved: BTreeMap<String, u32> = BTreeMap::new();
    let planned = m.in_flight_plans();
    let runs = m
        .runs
        .prepared
        .values()
        .chain(planned.iter().map(|p| p.run()));
    for r in runs {
        for s in r.shards.iter().filter(|s| s.state == RunState::Running) {
            *reserved.entry(s.worker_id.clone()).or_default() += 1;
        }
    }
    if reserved != m.workers.reserved {
        return Err(format!(
            "reserved {:?}, planned and prepared {:?}",
            m.workers.reserved, reserved
        ));
    }
    let queued: BTreeSet<&String> = m.queued_go().into_iter().collect();
    let gos: BTreeSet<&String> = timers
        .iter()
        .filter_map(|(_, t)| match t {
            Timer::Go(g) => Some(g),
            _ => None,
        })
        .flatten()
        .collect();
    for (id, r) in &m.runs.prepared {
        if m.runs.active.contains_key(id) {
            return Err(format!("{id} is both prepared and active"));
        }
        if !queued.contains(&id) && !gos.contains(&id) {
            return Err(format!(
                "prepared {id} ({}) has no Go timer (Go timers: {gos:?})",
                r.job
            ));
        }
    }
    Ok(())
}

/// No worker sent an assignment in `sent` holds (or has planned for it) more
/// shards than its capacity, unless it reported shards itself at registration.
pub(super) fn check_capacity(m: &Machine, sent: &[Sent]) -> Result<(), String> {
    for s in sent {
        let ToWorker::Assign(a) = &s.msg else {
            continue;
        };
        let Some(w) = m.workers.live.get(&s.worker) else {
            continue;
        };
        if !w.hello.running.is_empty() {
            continue;
        }
        let load = m.load(&s.worker);
        if load > w.hello.capacity as usize {
            return Err(format!(
                "{} was sent {:?} with {load} shards held or planned, capacity {}",
                s.worker, a.key, w.hello.capacity
            ));
        }
    }
    Ok(())
}
