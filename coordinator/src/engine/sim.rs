//! Deterministic simulation of the engine's core, in the manner of FoundationDB's
//! and TigerBeetle's simulators: one seed decides everything (jobs, workers, every
//! fault and its timing), time is virtual, and the whole world is single-threaded,
//! so a seed replays exactly.
//!
//! The world: a memory run store whose requests can fail or stall; leaders (one
//! [`Machine`] each, the fencing token installed before it starts) that crash
//! (their unwritten history is lost) or are deposed while still running; worker
//! processes with a capacity that run shards for a while and succeed or fail, beat
//! every second, crash (with or without their stream closing), freeze, drain,
//! restart, and reconnect to each new leader listing what they run and sending the
//! results of the last minute again; and job edits (pause, resume, policy changes,
//! deletes, triggers, kills). After every step of every machine the structural
//! invariants hold (`testkit::check`) and so do these:
//!
//! - nothing is sent before its instant;
//! - each fire fires once: a fire id maps to one run, and the first attempt of a
//!   shard is sent once, by whichever leader;
//! - a leader never sends one attempt twice, and attempts only grow;
//! - shard indexes stay within a run's total, which never changes;
//! - no worker is sent more shards than its capacity;
//! - a deposed leader sends no fire of its own that had not gone out before.
//!
//! After the faults stop and the world heals: every tick of the steady jobs was
//! recorded (fired or reported skipped), even one whose record failed or whose
//! answer was lost (the store applied it; the leader saw a failure), and
//! every run they fired ended; every workflow run that ended (a workflow job fires
//! every 5 s) has every node ended, none skipped whose edges held and none run
//! whose edge did not, and each node's state is its run's.
//!
//! `CHIME_SIM_SEED=<n>` replays one seed (and prints its trace);
//! `CHIME_SIM_SEEDS=<n>` changes how many seeds each of the four tests runs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::Instant;

use super::machine::{Answer, CallId, Effect, Input, Machine, Reply, Request};
use super::testkit::{Sent, T0, check, check_capacity, ready};
use super::workers::{EndReason, ToWorker, WorkerHello};
use super::{EngineOptions, ShardKey, ShardOutcome};
use crate::model::{JobSpec, Misfire, Overlap, Routing, Schedule};
use crate::store::{MemoryRunStore, Retention, RunStore, StoredJob};

/// Seeds per test; the four tests cover 4 × this many.
const SEEDS_PER_TEST: u64 = 250;
/// Faults happen during this much virtual time...
const CHAOS_MS: i64 = 30_000;
/// ...then the world heals for this long before the final checks.
const HEAL_MS: i64 = 15_000;
/// History snapshots wait this long before they reach the store (as in the driver).
const HISTORY_MS: i64 = 200;
/// Trace lines kept for a failure report.
const TRACE: usize = 60;

#[test]
fn simulation_seeds_0() {
    run_part(0);
}

#[test]
fn simulation_seeds_1() {
    run_part(1);
}

#[test]
fn simulation_seeds_2() {
    run_part(2);
}

#[test]
fn simulation_seeds_3() {
    run_part(3);
}

/// Runs part `part` of the seeds (or the one seed `CHIME_SIM_SEED` names, in
/// part 0), failing with the seed and how to replay it.
fn run_part(part: u64) {
    if let Some(seed) = std::env::var("CHIME_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        if part == 0 {
            match run_seed(seed, true) {
                Ok(steps) => eprintln!("seed {seed}: {steps} steps, every invariant held"),
                Err(e) => panic!("{e}"),
            }
        }
        return;
    }
    let per = std::env::var("CHIME_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(SEEDS_PER_TEST);
    let started = Instant::now();
    let mut steps = 0;
    for seed in part * per..(part + 1) * per {
        match run_seed(seed, false) {
            Ok(n) => steps += n,
            Err(e) => panic!("{e}"),
        }
    }
    let s = started.elapsed().as_secs_f64();
    eprintln!(
        "simulation part {part}: {per} seeds, {steps} steps in {s:.1} s: {:.0} seeds/s, {:.0} steps/s",
        per as f64 / s,
        steps as f64 / s
    );
}

/// Runs one seed; a failure names the seed, the invariant, the trace and how to
/// replay it.
fn run_seed(seed: u64, verbose: bool) -> Result<u64, String> {
    let mut w = World::new(seed, verbose);
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()));
    let failure = match out {
        Ok(Ok(())) => return Ok(w.steps),
        Ok(Err(e)) => e,
        Err(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".into()),
    };
    let mut msg = format!(
        "simulation seed {seed} failed at +{} ms: {failure}\nlast events:\n",
        w.now - T0
    );
    for l in &w.trace {
        let _ = writeln!(msg, "  {l}");
    }
    let _ = write!(
        msg,
        "replay: CHIME_SIM_SEED={seed} cargo nextest run -p chime-coordinator simulation_seeds_0 --no-capture"
    );
    Err(msg)
}

/// How the simulated store answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreFault {
    /// It applies the request and answers.
    None,
    /// It fails cleanly: nothing applied.
    Clean,
    /// It applies the request, but the answer is lost (the leader sees a failure).
    AnswerLost,
}

/// A store request waiting for its (stalled) answer.
#[derive(Debug)]
struct Stalled {
    at: i64,
    request: Request,
}

/// A leader: its machine and what the world knows of it.
#[derive(Debug)]
struct Leader {
    term: u64,
    m: Machine,
    /// Session → worker id.
    sessions: BTreeMap<u64, String>,
    stalled: Option<Stalled>,
    /// Snapshots on their way to the store (lost if the leader crashes).
    history: VecDeque<(i64, crate::model::RunRecord)>,
    lost: bool,
    /// Runs it sent assignments for.
    started: BTreeSet<String>,
    /// Attempts it sent, by (run, shard).
    attempts: BTreeMap<(String, u32), u32>,
    /// Set when a newer leader took over (it may still run until it notices).
    deposed_at: Option<i64>,
    calls: CallId,
    /// Registrations waiting for their answer: call → worker.
    registering: BTreeMap<CallId, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    Running,
    Frozen(i64),
    Down(i64),
}

/// A shard a simulated worker runs.
#[derive(Debug, Clone)]
struct Job {
    attempt: u32,
    finish_at: i64,
    outcome: ShardOutcome,
}

/// A simulated worker process.
#[derive(Debug)]
struct SimWorker {
    capacity: u32,
    up: Up,
    /// (leader term, session) of its session, when it has one.
    conn: Option<(u64, u64)>,
    /// When it next tries to register.
    connect_at: Option<i64>,
    running: BTreeMap<(String, u32), Job>,
    next_beat: i64,
    draining: bool,
    /// Results of the last minute (sent again after a reconnect).
    recent: VecDeque<(i64, ShardKey, ShardOutcome)>,
    inbox: VecDeque<ToWorker>,
}

/// Messages from workers to a leader term.
#[derive(Debug)]
enum Msg {
    Input(Input),
    Register(WorkerHello, Vec<(ShardKey, ShardOutcome)>),
}

struct World {
    seed: u64,
    verbose: bool,
    rng: fastrand::Rng,
    now: i64,
    end: i64,
    steps: u64,
    store: MemoryRunStore,
    fence: i64,
    terms: u64,
    leader: Option<Leader>,
    stale: Option<Leader>,
    elect_at: Option<i64>,
    workers: BTreeMap<String, SimWorker>,
    /// The job store: spec and version.
    jobs: BTreeMap<String, (JobSpec, i64)>,
    deleted: BTreeMap<String, JobSpec>,
    versions: i64,
    next_chaos: i64,
    /// Worker messages to deliver now, in order: (worker, term, session, message).
    net: VecDeque<(String, u64, u64, Msg)>,
    // What the checks remember.
    fire_runs: BTreeMap<String, String>,
    totals: BTreeMap<String, u32>,
    first_attempts: BTreeSet<(String, u32)>,
    /// Runs whose latest snapshot a crashed leader never wrote.
    lost_snapshots: BTreeSet<String>,
    trace: VecDeque<String>,
}

/// The jobs whose every tick is checked at the end (never edited).
const STEADY: [&str; 2] = ["steady-cron", "steady-rate"];

fn opts() -> EngineOptions {
    EngineOptions {
        heartbeat_interval_ms: 1_000,
        dead_after_beats: 3,
        advertise: "sim".into(),
        prepare_ahead_ms: 250,
    }
}

fn job(name: &str, schedule: Schedule) -> JobSpec {
    let mut j = JobSpec::new(name, "g", "h", schedule);
    j.created_at_ms = T0;
    j
}

/// How often the workflow job fires.
const FLOW_EVERY_MS: i64 = 5_000;

/// A workflow every [`FLOW_EVERY_MS`]: a → (b: the `manual` job, c: sharded) →
/// d (always), with retries and a failure edge drawn from the seed.
fn sim_flow(rng: &mut fastrand::Rng) -> JobSpec {
    use crate::workflow::{NodeSpec, WorkflowSpec};
    let inline = |name: &str, after: &[(&str, &str)]| NodeSpec {
        retry_backoff_ms: 200,
        ..NodeSpec::inline(name, "h").after(after)
    };
    let mut a = inline("a", &[]);
    a.retries = rng.u32(0..3);
    let b = NodeSpec {
        job: "manual".into(),
        handler: String::new(),
        ..inline("b", &[("a", "")])
    };
    let mut c = inline("c", &[("a", ["", "always"][rng.usize(..2)])]);
    c.routing = Routing::ShardingBroadcast;
    c.shard_count = rng.u32(1..4);
    let d = inline("d", &[("b", "always"), ("c", "always")]);
    let mut j = job(
        "flow",
        Schedule::FixedRate {
            every_ms: FLOW_EVERY_MS as u64,
        },
    );
    j.handler.clear();
    j.workflow = Some(WorkflowSpec {
        nodes: vec![a, b, c, d],
    });
    j
}

fn cron(expr: &str) -> Schedule {
    Schedule::Cron {
        expr: expr.into(),
        time_zone: String::new(),
    }
}

impl World {
    fn new(seed: u64, verbose: bool) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut jobs = BTreeMap::new();
        let mut steady_cron = job("steady-cron", cron("* * * * * *"));
        steady_cron.routing = Routing::ShardingBroadcast;
        steady_cron.retries = 1;
        let mut steady_rate = job("steady-rate", Schedule::FixedRate { every_ms: 700 });
        steady_rate.retries = 2;
        steady_rate.timeout_ms = 3_000;
        let routings = [
            Routing::RoundRobin,
            Routing::Random,
            Routing::ConsistentHash,
            Routing::LeastRecentlyUsed,
            Routing::LeastLoaded,
            Routing::Failover,
            Routing::BusyOver,
            Routing::First,
            Routing::Last,
            Routing::ShardingBroadcast,
        ];
        let overlaps = [
            Overlap::Allow,
            Overlap::Skip,
            Overlap::BufferOne,
            Overlap::CancelRunning,
        ];
        let misfires = [Misfire::Skip, Misfire::FireOnce, Misfire::FireAll];
        let mut edit_a = job("edit-a", cron("*/2 * * * * *"));
        edit_a.routing = routings[rng.usize(..routings.len())];
        if edit_a.routing == Routing::ShardingBroadcast {
            edit_a.shard_count = rng.u32(0..4);
        }
        edit_a.overlap = overlaps[rng.usize(..overlaps.len())];
        edit_a.misfire = misfires[rng.usize(..misfires.len())];
        edit_a.catch_up_window_ms = 3_000;
        edit_a.jitter_ms = rng.u64(0..300);
        edit_a.params = format!("{{\"user\":{}}}", rng.u32(..100));
        edit_a.hash_param = "user".into();
        let mut edit_b = job("edit-b", Schedule::FixedDelay { delay_ms: 1_500 });
        edit_b.overlap = overlaps[rng.usize(..overlaps.len())];
        edit_b.timeout_ms = [0, 800, 2_000][rng.usize(..3)];
        edit_b.retries = rng.u32(0..3);
        edit_b.retry_backoff_ms = 300;
        let mut manual = job("manual", Schedule::Manual);
        manual.routing = routings[rng.usize(..routings.len())];
        if rng.bool() {
            manual.children = vec!["edit-b".into()];
        }
        let once = job(
            "once",
            Schedule::Once {
                at_ms: T0 + rng.i64(2_000..25_000),
            },
        );
        let flow = sim_flow(&mut rng);
        let mut versions = 0;
        for j in [steady_cron, steady_rate, edit_a, edit_b, manual, once, flow] {
            versions += 1;
            jobs.insert(j.name.clone(), (j, versions));
        }
        let mut workers = BTreeMap::new();
        for i in 0..rng.usize(2..6) {
            let id = format!("w{i}");
            workers.insert(
                id.clone(),
                SimWorker {
                    // Enough in all for the jobs' load: an overloaded world never
                    // catches up, which is no failure of the engine's. (From 4:
                    // two workers of 3 fell behind once the workflow joined.)
                    capacity: rng.u32(4..9),
                    up: Up::Running,
                    conn: None,
                    connect_at: Some(T0 + rng.i64(0..300)),
                    running: BTreeMap::new(),
                    next_beat: T0,
                    draining: false,
                    recent: VecDeque::new(),
                    inbox: VecDeque::new(),
                },
            );
        }
        Self {
            seed,
            verbose,
            rng,
            now: T0,
            end: T0 + CHAOS_MS + HEAL_MS,
            steps: 0,
            store: MemoryRunStore::new(Retention {
                per_job: 10_000,
                max_age_s: 86_400,
                ..Retention::default()
            }),
            fence: 0,
            terms: 0,
            leader: None,
            stale: None,
            elect_at: Some(T0),
            workers,
            jobs,
            deleted: BTreeMap::new(),
            versions,
            next_chaos: T0 + 500,
            net: VecDeque::new(),
            fire_runs: BTreeMap::new(),
            totals: BTreeMap::new(),
            first_attempts: BTreeSet::new(),
            lost_snapshots: BTreeSet::new(),
            trace: VecDeque::new(),
        }
    }

    fn note(&mut self, what: impl FnOnce() -> String) {
        let line = format!("+{:>6} {}", self.now - T0, what());
        if self.verbose {
            eprintln!("{line}");
        }
        if self.trace.len() == TRACE {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn chaos(&self) -> bool {
        self.now < T0 + CHAOS_MS
    }

    fn run(&mut self) -> Result<(), String> {
        let mut same = 0;
        while let Some(t) = self.next_event() {
            if t >= self.end {
                break;
            }
            same = if t <= self.now { same + 1 } else { 0 };
            if same > 10_000 {
                return Err("time stands still: something is due at once, forever".into());
            }
            self.now = self.now.max(t);
            self.tick()?;
        }
        self.now = self.end;
        self.flush_history(true);
        self.final_checks()
    }

    /// The earliest instant anything happens.
    fn next_event(&self) -> Option<i64> {
        let mut t: Vec<i64> = vec![self.end];
        if let Some(l) = &self.leader {
            match &l.stalled {
                Some(s) => t.push(s.at),
                None => t.extend(l.m.next_wake()),
            }
            t.extend(l.history.front().map(|(at, _)| *at));
        }
        if let Some(s) = &self.stale
            && s.stalled.is_none()
            && !s.lost
        {
            t.extend(s.m.next_wake());
        }
        t.extend(self.elect_at);
        if self.chaos() {
            t.push(self.next_chaos);
        }
        for w in self.workers.values() {
            match w.up {
                Up::Running => {
                    t.extend(w.connect_at);
                    if w.conn.is_some() {
                        t.push(w.next_beat);
                    }
                    t.extend(w.running.values().map(|j| j.finish_at));
                }
                Up::Frozen(until) | Up::Down(until) => t.push(until),
            }
        }
        if !self.net.is_empty() {
            t.push(self.now);
        }
        t.into_iter().min()
    }

    /// Handles everything due now.
    fn tick(&mut self) -> Result<(), String> {
        let now = self.now;
        if self.elect_at.is_some_and(|t| t <= now) {
            self.elect()?;
        }
        if let Some(l) = &mut self.leader
            && l.stalled.as_ref().is_some_and(|s| s.at <= now)
        {
            let Some(s) = l.stalled.take() else {
                return Ok(());
            };
            self.answer_stalled(s.request)?;
        }
        if self
            .leader
            .as_ref()
            .is_some_and(|l| l.stalled.is_none() && l.m.next_wake().is_some_and(|t| t <= now))
        {
            self.leader_input(Input::Timers)?;
        }
        if self
            .stale
            .as_ref()
            .is_some_and(|l| !l.lost && l.m.next_wake().is_some_and(|t| t <= now))
        {
            self.stale_timers()?;
        }
        self.flush_history(false);
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        for id in ids {
            self.worker_tick(&id)?;
        }
        self.deliver()?;
        if self.chaos() && self.next_chaos <= now {
            self.chaos_event()?;
            self.next_chaos = now + self.rng.i64(100..1_200);
        }
        self.deliver()
    }

    /// Elects a new leader: installs its fencing token, starts its machine with the
    /// stored jobs and what the store holds.
    fn elect(&mut self) -> Result<(), String> {
        self.elect_at = None;
        self.fence += 1;
        self.terms += 1;
        let fence = self.fence;
        let installed = ready(self.store.install_fence(fence)).map_err(|e| e.to_string())?;
        if !installed.installed() {
            return Err(format!("fence {fence} refused"));
        }
        let handover = installed.hand_over();
        let term = self.terms;
        self.note(|| {
            format!("leader term {term} (fence {fence}) starts (handed over: {handover:?})")
        });
        let mut m = Machine::new(opts(), fence, self.seed ^ (term << 32));
        let jobs = self
            .jobs
            .values()
            .map(|(spec, version)| StoredJob {
                spec: spec.clone(),
                version: *version,
            })
            .collect();
        let last = ready(self.store.trigger_state()).map_err(|e| e.to_string())?;
        let mut active = ready(self.store.active_runs()).map_err(|e| e.to_string())?;
        // The store answers in hash order; replays need one order.
        active.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        m.now = self.now;
        if self.verbose {
            let ids: Vec<String> = active
                .iter()
                .map(|r| {
                    let s: Vec<String> = r
                        .shards
                        .iter()
                        .map(|s| format!("{}#{}{:?}@{}", s.index, s.attempt, s.state, s.worker_id))
                        .collect();
                    format!("{} [{}] {}", r.run_id, s.join(","), r.note)
                })
                .collect();
            self.note(|| format!("term {term} adopts {ids:?}"));
        }
        self.leader = Some(Leader {
            term,
            m,
            sessions: BTreeMap::new(),
            stalled: None,
            history: VecDeque::new(),
            lost: false,
            started: BTreeSet::new(),
            attempts: BTreeMap::new(),
            deposed_at: None,
            calls: 0,
            registering: BTreeMap::new(),
        });
        let ended_nodes =
            ready(super::driver::ended_nodes(&self.store, &active)).map_err(|e| e.to_string())?;
        self.leader_input(Input::Start {
            jobs,
            last,
            active,
            handover,
            ahead: Default::default(),
            ended_nodes,
        })?;
        // Workers without a session reconnect now.
        for w in self.workers.values_mut() {
            if w.up == Up::Running && w.conn.is_none() && !w.draining {
                w.connect_at = Some(w.connect_at.map_or(self.now, |t| t.min(self.now + 50)));
            }
        }
        Ok(())
    }

    /// Hands `input` to the current leader and performs what it answers.
    fn leader_input(&mut self, input: Input) -> Result<(), String> {
        let Some(mut l) = self.leader.take() else {
            return Ok(());
        };
        let r = self.step(&mut l, input, false);
        self.leader = Some(l);
        r
    }

    /// Runs a deposed leader's timers (it has not noticed yet).
    fn stale_timers(&mut self) -> Result<(), String> {
        let Some(mut l) = self.stale.take() else {
            return Ok(());
        };
        let r = self.step(&mut l, Input::Timers, true);
        let deposed = l.deposed_at.unwrap_or(self.now);
        // It notices within its lease either way.
        if !l.lost && self.now - deposed < 3_000 {
            self.stale = Some(l);
        } else {
            let term = l.term;
            self.note(|| format!("deposed leader term {term} stops"));
        }
        r
    }

    /// One input to `l`'s machine and everything that follows from it.
    fn step(&mut self, l: &mut Leader, input: Input, stale: bool) -> Result<(), String> {
        let mut queue: VecDeque<Effect> = l.m.step(self.now, input).into();
        self.steps += 1;
        let mut sent: Vec<Sent> = Vec::new();
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Send { session, msg } => {
                    let Some(worker) = l.sessions.get(&session).cloned() else {
                        return Err(format!("term {} sent to unknown session {session}", l.term));
                    };
                    if let ToWorker::Assign(a) = &msg {
                        self.observe(l, &worker, a, stale)?;
                        // A full channel, now and then.
                        if !stale && self.rng.u32(..200) == 0 {
                            let key = a.key.clone();
                            let term = l.term;
                            self.note(|| {
                                format!("term {term}: {worker}'s channel refuses {key:?}")
                            });
                            queue.extend(l.m.step(self.now, Input::Undelivered { session, key }));
                            continue;
                        }
                    }
                    sent.push(Sent {
                        at: self.now,
                        worker: worker.clone(),
                        msg: msg.clone(),
                    });
                    if !stale {
                        self.send_to_worker(&worker, l.term, session, msg);
                    }
                }
                Effect::End { session, reason } => {
                    if let Some(worker) = l.sessions.remove(&session)
                        && !stale
                        && reason != EndReason::WorkerClosed
                    {
                        self.send_to_worker(&worker, l.term, session, ToWorker::End(reason));
                    }
                }
                Effect::Save(run) => l.history.push_back((self.now + HISTORY_MS, run)),
                Effect::SaveNow(run) => {
                    // Through the one writer, as in the driver: nothing older of
                    // this run lands after it.
                    l.history.retain(|(_, r)| r.run_id != run.run_id);
                    ready(self.store.save_run(&run)).map_err(|e| e.to_string())?;
                }
                Effect::Reply(call, reply) => {
                    let registering = l.registering.remove(&call);
                    if let Reply::Registered(Ok(a)) = &reply
                        && let Some(id) = &registering
                    {
                        l.sessions.insert(a.session, id.clone());
                        // The session is the worker's from now on: what follows in
                        // this step reaches it.
                        if !stale && let Some(w) = self.workers.get_mut(id) {
                            w.conn = Some((l.term, a.session));
                            w.next_beat = self.now + 1_000;
                        }
                    }
                }
                Effect::LostLead => {
                    l.lost = true;
                    let term = l.term;
                    self.note(|| format!("term {term} learns it lost the lead"));
                }
                Effect::Request(r) => {
                    if stale || !self.chaos() {
                        let a = self.answer(r, StoreFault::None);
                        queue.extend(l.m.step(self.now, Input::Answer(a)));
                        self.steps += 1;
                        continue;
                    }
                    match self.rng.u32(..100) {
                        0..=3 => {
                            // Half the failures are clean, half lose the answer of
                            // a request the store applied (a timeout, a cut
                            // connection): the leader cannot tell them apart.
                            let how = if self.rng.bool() {
                                StoreFault::Clean
                            } else {
                                StoreFault::AnswerLost
                            };
                            let a = self.answer(r, how);
                            queue.extend(l.m.step(self.now, Input::Answer(a)));
                            self.steps += 1;
                        }
                        4..=8 => {
                            let at = self.now + self.rng.i64(20..1_500);
                            self.note(|| format!("store stalls until +{}", at - T0));
                            l.stalled = Some(Stalled { at, request: r });
                        }
                        _ => {
                            let a = self.answer(r, StoreFault::None);
                            queue.extend(l.m.step(self.now, Input::Answer(a)));
                            self.steps += 1;
                        }
                    }
                }
            }
            if queue.is_empty() && l.m.busy() {
                queue.extend(l.m.step(self.now, Input::Continue));
                self.steps += 1;
            }
        }
        check(&l.m)
            .and_then(|()| check_capacity(&l.m, &sent))
            .map_err(|e| format!("term {}: {e}", l.term))
    }

    /// The store's answer to `r`, failing as `how` says.
    fn answer(&mut self, r: Request, how: StoreFault) -> Answer {
        match r {
            Request::Record { fence, fires } => {
                if self.verbose {
                    let ids: Vec<&str> = fires.iter().map(|f| f.fire_id.as_str()).collect();
                    self.note(|| format!("record {ids:?}"));
                }
                if how == StoreFault::Clean {
                    let n = fires.len();
                    self.note(|| format!("store fails a record of {n} fires"));
                    return Answer::Record(Err("simulated failure".into()));
                }
                let applied =
                    ready(self.store.record_fires(fence, &fires)).map_err(|e| e.to_string());
                if how == StoreFault::AnswerLost {
                    let n = fires.len();
                    self.note(|| format!("store records {n} fires, but the answer is lost"));
                    return Answer::Record(Err("simulated lost answer".into()));
                }
                Answer::Record(applied)
            }
            Request::CheckFence { fence } => {
                if how != StoreFault::None {
                    self.note(|| "store fails a fence check".into());
                    return Answer::Fence(Err("simulated failure".into()));
                }
                Answer::Fence(ready(self.store.fence_holds(fence)).map_err(|e| e.to_string()))
            }
        }
    }

    fn answer_stalled(&mut self, r: Request) -> Result<(), String> {
        let how = match self.chaos() && self.rng.u32(..10) == 0 {
            false => StoreFault::None,
            true if self.rng.bool() => StoreFault::Clean,
            true => StoreFault::AnswerLost,
        };
        let a = self.answer(r, how);
        self.leader_input(Input::Answer(a))
    }

    /// Checks one assignment as it leaves leader `l` (see the module doc).
    fn observe(
        &mut self,
        l: &mut Leader,
        worker: &str,
        a: &super::workers::Assignment,
        stale: bool,
    ) -> Result<(), String> {
        let k = &a.key;
        let t = l.term;
        if a.scheduled_at_ms > self.now {
            return Err(format!(
                "term {t} sent {k:?} to {worker} {} ms before its instant",
                a.scheduled_at_ms - self.now
            ));
        }
        match self.fire_runs.get(&a.fire_id) {
            Some(run) if *run != k.run_id => {
                return Err(format!(
                    "fire {} fired as two runs: {run} and {}",
                    a.fire_id, k.run_id
                ));
            }
            Some(_) => {}
            None => {
                self.fire_runs.insert(a.fire_id.clone(), k.run_id.clone());
            }
        }
        // Again only if a crashed leader's snapshot of the run never landed (its
        // attempt 1 then looks unsent to the next leader: at least once, as after
        // any crash).
        // (A deposed leader's sends reach no worker here: its sessions broke.)
        if k.attempt == 1
            && !stale
            && !self.first_attempts.insert((k.run_id.clone(), k.shard))
            && !self.lost_snapshots.contains(&k.run_id)
        {
            return Err(format!(
                "term {t} sent the first attempt of {k:?} again: fired twice"
            ));
        }
        let prev = l.attempts.insert((k.run_id.clone(), k.shard), k.attempt);
        if prev.is_some_and(|p| p >= k.attempt) {
            return Err(format!(
                "term {t} sent {k:?} after attempt {}",
                prev.unwrap_or(0)
            ));
        }
        if k.shard >= a.shard_total {
            return Err(format!("{k:?} of {} shards", a.shard_total));
        }
        let total = *self.totals.entry(k.run_id.clone()).or_insert(a.shard_total);
        if total != a.shard_total {
            return Err(format!("{k:?}: total {} then {}", total, a.shard_total));
        }
        // A deposed leader may still hand on shards of runs it adopted (until it
        // notices, as any leader acting on its last view), but a fire of its own
        // that had not gone out must not go out now.
        let own =
            l.m.runs
                .active
                .get(&k.run_id)
                .is_some_and(|r| r.fence == l.m.fence);
        if stale && own && !l.started.contains(&k.run_id) {
            return Err(format!(
                "deposed leader term {t} fired {} after it was deposed",
                k.run_id
            ));
        }
        if !stale {
            l.started.insert(k.run_id.clone());
        }
        let (w, job) = (worker.to_owned(), a.job.clone());
        let k = k.clone();
        self.note(|| {
            format!(
                "term {t} → {w}: assign {job} {}/{}#{}",
                k.run_id, k.shard, k.attempt
            )
        });
        Ok(())
    }

    /// Writes history snapshots that are due (all of them when `all`).
    fn flush_history(&mut self, all: bool) {
        let now = self.now;
        if let Some(l) = &mut self.leader {
            while l.history.front().is_some_and(|(at, _)| all || *at <= now) {
                if let Some((_, run)) = l.history.pop_front() {
                    let _ = ready(self.store.save_run(&run));
                }
            }
        }
    }

    /// Puts `msg` in the inbox of `worker`, if that session is still its own.
    fn send_to_worker(&mut self, worker: &str, term: u64, session: u64, msg: ToWorker) {
        if let Some(w) = self.workers.get_mut(worker)
            && w.conn == Some((term, session))
            && !matches!(w.up, Up::Down(_))
        {
            w.inbox.push_back(msg);
        }
    }

    /// Delivers worker messages to the leader, and leader messages to workers,
    /// until nothing moves.
    fn deliver(&mut self) -> Result<(), String> {
        loop {
            let ids: Vec<String> = self.workers.keys().cloned().collect();
            for id in ids {
                self.worker_inbox(&id);
            }
            let Some((worker, term, _session, msg)) = self.net.pop_front() else {
                return Ok(());
            };
            if self.leader.as_ref().is_none_or(|l| l.term != term) {
                continue;
            }
            match msg {
                Msg::Input(i) => self.leader_input(i)?,
                Msg::Register(hello, resend) => {
                    let call = self.call();
                    if let Some(l) = &mut self.leader {
                        l.registering.insert(call, worker.clone());
                    }
                    self.leader_input(Input::Register(call, hello))?;
                    let Some((term, session)) = self.workers.get(&worker).and_then(|w| w.conn)
                    else {
                        continue;
                    };
                    for (key, outcome) in resend {
                        self.net.push_back((
                            worker.clone(),
                            term,
                            session,
                            Msg::Input(Input::Result {
                                worker: worker.clone(),
                                key,
                                outcome,
                            }),
                        ));
                    }
                }
            }
        }
    }

    /// What a worker does with what the leader sent it.
    fn worker_inbox(&mut self, id: &str) {
        let now = self.now;
        let dur = self.rng.i64(20..1_500);
        let fail = self.rng.u32(..20) == 0;
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        if w.up != Up::Running {
            return;
        }
        while let Some(m) = w.inbox.pop_front() {
            match m {
                ToWorker::Assign(a) => {
                    let k = (a.key.run_id.clone(), a.key.shard);
                    if w.running
                        .get(&k)
                        .is_some_and(|j| j.attempt == a.key.attempt)
                    {
                        continue;
                    }
                    w.running.insert(
                        k,
                        Job {
                            attempt: a.key.attempt,
                            finish_at: now + dur,
                            outcome: if fail {
                                ShardOutcome::Failed("simulated".into())
                            } else {
                                ShardOutcome::Succeeded("ok".into())
                            },
                        },
                    );
                }
                ToWorker::Cancel(k, _) => {
                    if let Some(j) = w.running.get_mut(&(k.run_id.clone(), k.shard))
                        && j.attempt == k.attempt
                    {
                        j.finish_at = now;
                        j.outcome = ShardOutcome::Cancelled("cancelled".into());
                    }
                }
                ToWorker::End(reason) => {
                    w.conn = None;
                    if reason == EndReason::Drained {
                        // Done: the process exits, and comes back later.
                        w.up = Up::Down(now + 1_000);
                        w.running.clear();
                        w.recent.clear();
                        w.draining = false;
                    } else {
                        w.connect_at = Some(now + 100);
                    }
                }
            }
        }
    }

    /// A worker's clock: thawing, restarting, finishing shards, beating, connecting.
    fn worker_tick(&mut self, id: &str) -> Result<(), String> {
        let now = self.now;
        let leader_term = self.leader.as_ref().map(|l| l.term);
        let Some(w) = self.workers.get_mut(id) else {
            return Ok(());
        };
        match w.up {
            Up::Frozen(until) if until <= now => w.up = Up::Running,
            Up::Down(until) if until <= now => {
                // A fresh process.
                w.up = Up::Running;
                w.conn = None;
                w.connect_at = Some(now);
                w.running.clear();
                w.recent.clear();
                w.inbox.clear();
                w.draining = false;
            }
            _ => {}
        }
        if w.up != Up::Running {
            return Ok(());
        }
        // Shards that ended: their results go out (and are kept for a minute).
        let done: Vec<(String, u32)> = w
            .running
            .iter()
            .filter(|(_, j)| j.finish_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            let Some(j) = w.running.remove(&k) else {
                continue;
            };
            let key = ShardKey {
                run_id: k.0,
                shard: k.1,
                attempt: j.attempt,
            };
            w.recent.push_back((now, key.clone(), j.outcome.clone()));
            if let Some((term, session)) = w.conn {
                self.net.push_back((
                    id.to_owned(),
                    term,
                    session,
                    Msg::Input(Input::Result {
                        worker: id.to_owned(),
                        key,
                        outcome: j.outcome,
                    }),
                ));
            }
        }
        while w.recent.front().is_some_and(|(at, _, _)| now - at > 60_000) {
            w.recent.pop_front();
        }
        if let Some((term, session)) = w.conn
            && w.next_beat <= now
        {
            w.next_beat = now + 1_000;
            let running = w
                .running
                .iter()
                .map(|((run_id, shard), j)| ShardKey {
                    run_id: run_id.clone(),
                    shard: *shard,
                    attempt: j.attempt,
                })
                .collect();
            self.net.push_back((
                id.to_owned(),
                term,
                session,
                Msg::Input(Input::Heartbeat {
                    worker: id.to_owned(),
                    session,
                    running,
                }),
            ));
        }
        if w.connect_at.is_some_and(|t| t <= now) {
            w.connect_at = None;
            match leader_term {
                None => w.connect_at = Some(now + 500),
                Some(term) if w.conn.is_none() => {
                    let hello = WorkerHello {
                        worker_id: id.to_owned(),
                        group: "g".into(),
                        handlers: vec!["h".into()],
                        capacity: w.capacity,
                        labels: BTreeMap::new(),
                        running: w
                            .running
                            .iter()
                            .map(|((run_id, shard), j)| ShardKey {
                                run_id: run_id.clone(),
                                shard: *shard,
                                attempt: j.attempt,
                            })
                            .collect(),
                    };
                    let resend = w
                        .recent
                        .iter()
                        .map(|(_, k, o)| (k.clone(), o.clone()))
                        .collect();
                    self.net
                        .push_back((id.to_owned(), term, 0, Msg::Register(hello, resend)));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// One random fault or edit.
    fn chaos_event(&mut self) -> Result<(), String> {
        let roll = self.rng.u32(..100);
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        let pick = ids[self.rng.usize(..ids.len())].clone();
        match roll {
            // A worker crashes; its stream closes, or it just goes silent.
            0..=7 => {
                let restart = self.now + self.rng.i64(500..6_000);
                let closes = self.rng.bool();
                let Some(w) = self.workers.get_mut(&pick) else {
                    return Ok(());
                };
                if w.up != Up::Running {
                    return Ok(());
                }
                let conn = w.conn.take();
                w.up = Up::Down(restart);
                w.running.clear();
                w.recent.clear();
                w.inbox.clear();
                self.note(|| format!("{pick} crashes (stream closes: {closes})"));
                if closes && let Some((term, session)) = conn {
                    self.net.push_back((
                        pick.clone(),
                        term,
                        session,
                        Msg::Input(Input::Closed {
                            worker: pick.clone(),
                            session,
                        }),
                    ));
                }
            }
            // A worker freezes (no beats, no messages) for a while.
            8..=12 => {
                let until = self.now + self.rng.i64(500..6_000);
                if let Some(w) = self.workers.get_mut(&pick)
                    && w.up == Up::Running
                {
                    w.up = Up::Frozen(until);
                    self.note(|| format!("{pick} freezes until +{}", until - T0));
                }
            }
            // A worker drains.
            13..=16 => {
                if let Some(w) = self.workers.get_mut(&pick)
                    && w.up == Up::Running
                    && !w.draining
                    && let Some((term, session)) = w.conn
                {
                    w.draining = true;
                    self.note(|| format!("{pick} drains"));
                    self.net.push_back((
                        pick.clone(),
                        term,
                        session,
                        Msg::Input(Input::Draining {
                            worker: pick.clone(),
                            session,
                        }),
                    ));
                }
            }
            // The leader crashes; another is elected after the lease.
            17..=19 => {
                if let Some(l) = self.leader.take() {
                    let term = l.term;
                    self.lost_snapshots
                        .extend(l.history.iter().map(|(_, r)| r.run_id.clone()));
                    self.note(|| format!("leader term {term} crashes"));
                    self.elect_at = Some(self.now + self.rng.i64(300..3_000));
                    self.disconnect(term);
                }
            }
            // The leader is deposed but keeps running a while; a new one leads.
            20..=21 => {
                if self.stale.is_none()
                    && let Some(mut l) = self.leader.take()
                {
                    let term = l.term;
                    self.note(|| format!("leader term {term} is deposed"));
                    l.deposed_at = Some(self.now);
                    // What had gone out (sent, or waiting for a worker) by now.
                    let out: Vec<String> = l.m.runs.active.keys().cloned().collect();
                    l.started.extend(out);
                    // Its unwritten history still lands (it keeps writing).
                    while let Some((_, run)) = l.history.pop_front() {
                        let _ = ready(self.store.save_run(&run));
                    }
                    if l.stalled.is_none() {
                        self.stale = Some(l);
                    }
                    self.disconnect(term);
                    self.elect()?;
                }
            }
            // The leader stops gracefully (SIGTERM, a rolling restart): between two
            // steps, as the driver takes a hand-over, it writes every snapshot and
            // leaves its note; the next leader is elected as soon as it resigns.
            44..=47 => {
                if self.leader.as_ref().is_some_and(|l| l.stalled.is_none())
                    && let Some(mut l) = self.leader.take()
                {
                    let term = l.term;
                    while let Some((_, run)) = l.history.pop_front() {
                        let _ = ready(self.store.save_run(&run));
                    }
                    let unsent = l.m.unsent_runs();
                    let left = !l.m.is_fenced_out()
                        && ready(self.store.hand_over(l.m.fence(), &unsent)).unwrap_or(false);
                    self.note(|| {
                        format!(
                            "leader term {term} hands over (note left: {left}, unsent {unsent:?})"
                        )
                    });
                    self.elect_at = Some(self.now + self.rng.i64(20..300));
                    self.disconnect(term);
                }
            }
            // Job edits.
            22..=31 => self.edit_job(),
            32..=39 => {
                let call = self.call();
                self.note(|| "trigger manual".into());
                self.leader_input(Input::Trigger(call, "manual".into(), None))?;
            }
            40..=43 => {
                let victim = self.leader.as_ref().and_then(|l| {
                    // Sorted: the maps' order is not the same from one run to
                    // the next, and a seed must replay.
                    let mut ids: Vec<&String> =
                        l.m.runs
                            .active
                            .keys()
                            .chain(l.m.runs.prepared.keys())
                            .filter(|id| !STEADY.iter().any(|s| id.starts_with(s)))
                            .collect();
                    ids.sort_unstable();
                    (!ids.is_empty()).then(|| ids[self.rng.usize(..ids.len())].clone())
                });
                if let Some(id) = victim {
                    let call = self.call();
                    self.note(|| format!("kill {id}"));
                    self.leader_input(Input::Kill(call, id))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn call(&mut self) -> CallId {
        self.leader.as_mut().map_or(0, |l| {
            l.calls += 1;
            l.calls
        })
    }

    /// Every session with leader `term` breaks; its workers reconnect.
    fn disconnect(&mut self, term: u64) {
        // Now and then the workers cannot reach the next leader for a while (they
        // know only the coordinator that went away).
        let soon = if self.rng.u32(..4) == 0 {
            self.now + self.rng.i64(2_000..9_000)
        } else {
            self.now + self.rng.i64(100..600)
        };
        for w in self.workers.values_mut() {
            if w.conn.is_some_and(|(t, _)| t == term) {
                w.conn = None;
                w.inbox.clear();
                if !w.draining {
                    w.connect_at = Some(soon);
                }
            }
            // A draining worker whose leader went away just stops.
            if w.draining && w.conn.is_none() {
                w.draining = false;
                w.up = Up::Down(soon + 1_000);
            }
        }
    }

    /// Pauses, resumes, changes or deletes one of the edited jobs.
    fn edit_job(&mut self) {
        let names = ["edit-a", "edit-b", "manual", "once"];
        let name = names[self.rng.usize(..names.len())];
        let roll = self.rng.u32(..10);
        if let Some(spec) = self.deleted.remove(name) {
            self.note(|| format!("re-create {name}"));
            self.put_job(spec);
            return;
        }
        let Some((mut spec, _)) = self.jobs.get(name).cloned() else {
            return;
        };
        match roll {
            0..=3 => spec.paused = !spec.paused,
            4..=5 => {
                spec.overlap = [
                    Overlap::Allow,
                    Overlap::Skip,
                    Overlap::BufferOne,
                    Overlap::CancelRunning,
                ][self.rng.usize(..4)]
            }
            6..=7 => spec.jitter_ms = self.rng.u64(0..500),
            _ => {
                self.jobs.remove(name);
                self.deleted.insert(name.to_owned(), spec);
                self.note(|| format!("delete {name}"));
                let _ = self.leader_input(Input::JobDeleted(name.to_owned()));
                return;
            }
        }
        self.note(|| {
            format!(
                "edit {name}: paused {}, overlap {:?}",
                spec.paused, spec.overlap
            )
        });
        self.put_job(spec);
    }

    fn put_job(&mut self, spec: JobSpec) {
        self.versions += 1;
        let version = self.versions;
        self.jobs.insert(spec.name.clone(), (spec.clone(), version));
        let _ = self.leader_input(Input::JobPut(StoredJob { spec, version }));
    }

    /// A workflow run that ended: every node ended; none was skipped whose edges
    /// all held (none skipped wrongly), none that ran lacks its run (or has a run
    /// of another state), and none ran when an edge did not hold.
    fn check_flow(&self, r: &crate::model::RunRecord) -> Result<(), String> {
        use crate::model::RunState;
        use crate::workflow::{Readiness, readiness};
        if !r.state.is_final() || r.state == RunState::Skipped || r.nodes.is_empty() {
            return Ok(());
        }
        let states: BTreeMap<&str, RunState> =
            r.nodes.iter().map(|n| (n.name.as_str(), n.state)).collect();
        for n in &r.nodes {
            if !n.state.is_final() {
                return Err(format!(
                    "workflow run {} ended with node {} {:?}",
                    r.run_id, n.name, n.state
                ));
            }
            if n.state == RunState::Cancelled && r.state == RunState::Cancelled {
                continue;
            }
            let verdict = readiness(n, &states);
            match (n.state, &verdict) {
                (RunState::Skipped, Readiness::Run) => {
                    return Err(format!(
                        "workflow run {}: node {} skipped though its edges held",
                        r.run_id, n.name
                    ));
                }
                (RunState::Skipped, _) => continue,
                (_, Readiness::Skip(why)) => {
                    return Err(format!(
                        "workflow run {}: node {} ran ({:?}) though {why}",
                        r.run_id, n.name, n.state
                    ));
                }
                _ => {}
            }
            let run = ready(self.store.get_run(&n.run_id)).map_err(|e| e.to_string())?;
            match run {
                Some(nr) if nr.state == n.state => {}
                // A node whose job was deleted meanwhile fails without a run.
                None if n.state == RunState::Failed && n.error.contains("does not exist") => {}
                other => {
                    return Err(format!(
                        "workflow run {}: node {} is {:?} but its run {} is {:?}",
                        r.run_id,
                        n.name,
                        n.state,
                        n.run_id,
                        other.map(|o| o.state)
                    ));
                }
            }
        }
        Ok(())
    }

    /// After the heal: every steady tick recorded (fired or reported skipped), every run
    /// they fired ended.
    fn final_checks(&mut self) -> Result<(), String> {
        let Some(l) = &self.leader else {
            return Err("no leader at the end".into());
        };
        if l.stalled.is_some() {
            return Err("a store request is still stalled at the end".into());
        }
        let rate_every = 700;
        let mut ticks: Vec<String> = Vec::new();
        let record_until = self.end - 2_000;
        let mut t = T0 + 1_000;
        while t <= record_until {
            ticks.push(format!("steady-cron@{t}"));
            t += 1_000;
        }
        let mut t = T0 + rate_every;
        while t <= record_until {
            ticks.push(format!("steady-rate@{t}"));
            t += rate_every;
        }
        let mut t = T0 + FLOW_EVERY_MS;
        while t <= record_until {
            ticks.push(format!("flow@{t}"));
            t += FLOW_EVERY_MS;
        }
        let finish_until = T0 + CHAOS_MS;
        for id in ticks.iter().filter(|t| t.starts_with("flow@")) {
            if let Some(r) = ready(self.store.get_run(id)).map_err(|e| e.to_string())? {
                self.check_flow(&r)?;
            }
        }
        for id in ticks {
            let run = ready(self.store.get_run(&id)).map_err(|e| e.to_string())?;
            let at: i64 = id
                .rsplit('@')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            match run {
                None => return Err(format!("tick {id} was neither fired nor reported skipped")),
                Some(r) if at <= finish_until && !r.state.is_final() => {
                    let live = l.m.active_run(&id).cloned();
                    let workers: Vec<(&String, usize, u32)> =
                        l.m.workers
                            .live
                            .iter()
                            .map(|(id, w)| (id, w.running.len(), w.hello.capacity))
                            .collect();
                    return Err(format!(
                        "run {id} never ended (a shard lost?): {} {:?}; waiting: {}, workers (held, capacity): {workers:?}",
                        if live.is_some() {
                            "engine has"
                        } else {
                            "store has"
                        },
                        live.unwrap_or(r),
                        l.m.runs.pending.len(),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}
