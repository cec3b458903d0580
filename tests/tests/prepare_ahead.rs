//! Fires prepared ahead of their instant (`coordinator.prepare_ahead_ms`): recorded
//! early, sent at the instant and never before, and whatever changes in between
//! (a pause, a kill, a run started meanwhile, a worker leaving, a deposed leader, a
//! leader dying) is honoured at the instant. The engine runs in-process; its run
//! store is the memory one or a real redis-server (the fencing and adoption cases
//! run on both); workers are session channels, so every assignment is seen. Also:
//! a new leader's own fires are not held back by the adoption grace of the runs it
//! took over.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use chime_coordinator::engine::{
    self, EngineHandle, EngineOptions, ShardKey, ShardOutcome, ToWorker,
};
use chime_coordinator::model::{JobSpec, Overlap, RunRecord, RunState, Schedule};
use chime_coordinator::store::{JobStore, MemoryRunStore, RedisRunStore, Retention, RunStore};
use chime_shared::clock::{Clock, SystemClock};
use chime_shared::config::source::MemorySource;
use chime_tests::{RedisServer, wait_until};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How far ahead fires are prepared here: far enough that "recorded before the
/// instant" is seen with room to spare on a slow machine.
const LEAD_MS: u64 = 800;
/// Jobs fire this long after they are created.
const IN_MS: i64 = 1_500;

fn now() -> i64 {
    SystemClock.now_ms()
}

/// A run store and the jobs the engines read.
struct Rig {
    jobs: JobStore,
    runs: Arc<dyn RunStore>,
    _redis: Option<RedisServer>,
}

impl Rig {
    fn memory() -> Self {
        Self {
            jobs: JobStore::new(Arc::new(MemorySource::default())),
            runs: Arc::new(MemoryRunStore::new(Retention::default())),
            _redis: None,
        }
    }

    async fn redis() -> Result<Self> {
        let redis = RedisServer::start().await?;
        let runs = RedisRunStore::new(redis.conn().await?, "prep", Retention::default());
        Ok(Self {
            jobs: JobStore::new(Arc::new(MemorySource::default())),
            runs: Arc::new(runs),
            _redis: Some(redis),
        })
    }

    /// A job firing once at `at`.
    async fn once(&self, name: &str, at: i64, overlap: Overlap) -> Result<()> {
        let mut spec = JobSpec::new(name, "g", "noop", Schedule::Once { at_ms: at });
        spec.overlap = overlap;
        self.jobs.create(spec, now()).await?;
        Ok(())
    }

    /// Starts a leader's engine with fencing token `fence` (installed first).
    async fn leader(&self, fence: i64, heartbeat_interval_ms: u64) -> Result<Leader> {
        ensure!(
            self.runs.install_fence(fence).await?.installed(),
            "fence {fence} refused"
        );
        let (lost, stop) = (CancellationToken::new(), CancellationToken::new());
        let (handle, task) = engine::start(
            self.jobs.clone(),
            self.runs.clone(),
            Arc::new(SystemClock),
            EngineOptions {
                heartbeat_interval_ms,
                prepare_ahead_ms: LEAD_MS,
                ..EngineOptions::default()
            },
            engine::Term {
                fence,
                handover: None,
                warm: None,
            },
            lost.clone(),
            stop.clone(),
        )
        .await?;
        Ok(Leader {
            handle,
            lost,
            stop,
            task,
        })
    }

    /// Waits (up to `timeout`) until the stored run `id` meets `cond`, answering it.
    async fn run_where(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&RunRecord) -> bool,
    ) -> Result<RunRecord> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(r) = self.runs.get_run(id).await?
                && cond(&r)
            {
                return Ok(r);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for run {id} {what}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the stored run `id` exists, answering it.
    async fn recorded(&self, id: &str, timeout: Duration) -> Result<RunRecord> {
        self.run_where(id, "recorded", timeout, |_| true).await
    }

    /// Waits until the stored run `id` is in `state`, answering it.
    async fn ended(&self, id: &str, state: RunState) -> Result<RunRecord> {
        self.run_where(id, &format!("{state:?}"), Duration::from_secs(10), |r| {
            r.state == state
        })
        .await
    }
}

struct Leader {
    handle: EngineHandle,
    lost: CancellationToken,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A worker session: what the engine sends it.
struct Worker {
    id: String,
    session: u64,
    rx: mpsc::Receiver<ToWorker>,
    /// What it runs (its heartbeats list it, as a real worker's do).
    running: Arc<Mutex<Vec<ShardKey>>>,
}

impl Worker {
    async fn join(leader: &Leader, id: &str) -> Result<Self> {
        let (tx, rx) = mpsc::channel(64);
        let accepted = leader
            .handle
            .register(
                engine::WorkerHello {
                    worker_id: id.into(),
                    group: "g".into(),
                    handlers: vec!["noop".into()],
                    capacity: 10,
                    labels: Default::default(),
                    running: Vec::new(),
                },
                tx,
            )
            .await?;
        // Beat like a live worker (listing what it runs) until the engine stops
        // answering.
        let running: Arc<Mutex<Vec<ShardKey>>> = Arc::default();
        let (handle, worker, session) = (leader.handle.clone(), id.to_owned(), accepted.session);
        let listed = running.clone();
        tokio::spawn(async move {
            loop {
                let keys = listed.lock().map(|r| r.clone()).unwrap_or_default();
                if handle.heartbeat(&worker, session, keys).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(Self {
            id: id.into(),
            session: accepted.session,
            rx,
            running,
        })
    }

    /// The next assignment (within 10 s), with when it arrived.
    async fn assignment(&mut self) -> Result<(engine::Assignment, i64)> {
        match tokio::time::timeout(Duration::from_secs(10), self.rx.recv()).await {
            Ok(Some(ToWorker::Assign(a))) => {
                if let Ok(mut r) = self.running.lock() {
                    r.push(a.key.clone());
                }
                Ok((a, now()))
            }
            Ok(Some(other)) => bail!("{}: expected an assignment, got {other:?}", self.id),
            Ok(None) => bail!("{}: session closed", self.id),
            Err(_) => bail!("{}: no assignment within 10 s", self.id),
        }
    }

    /// Nothing was sent to this worker (so far).
    fn got_nothing(&mut self) -> Result<()> {
        match self.rx.try_recv() {
            Ok(m) => bail!("{} was sent {m:?}", self.id),
            Err(_) => Ok(()),
        }
    }

    async fn succeed(&self, leader: &Leader, a: &engine::Assignment) -> Result<()> {
        if let Ok(mut r) = self.running.lock() {
            r.retain(|k| *k != a.key);
        }
        leader
            .handle
            .result(
                &self.id,
                self.session,
                a.key.clone(),
                ShardOutcome::Succeeded(String::new()),
            )
            .await?;
        Ok(())
    }
}

/// Recorded with its instant still ahead, sent at the instant and not before, once.
async fn recorded_ahead_and_sent_at_the_instant(rig: Rig) -> Result<()> {
    let at = now() + IN_MS;
    rig.once("ahead", at, Overlap::Allow).await?;
    let leader = rig.leader(1, 2_000).await?;
    let mut w = Worker::join(&leader, "w1").await?;
    let id = format!("ahead@{at}");
    let run = rig.recorded(&id, Duration::from_secs(5)).await?;
    let seen = now();
    ensure!(seen < at, "recorded only at {seen}, instant {at}");
    ensure!(
        run.shards.len() == 1 && run.shards[0].worker_id == "w1",
        "{run:?}"
    );
    w.got_nothing()?;
    let (a, arrived) = w.assignment().await?;
    ensure!(arrived >= at, "sent {} ms early", at - arrived);
    ensure!(a.fire_id == id && a.scheduled_at_ms == at, "{a:?}");
    w.succeed(&leader, &a).await?;
    rig.ended(&id, RunState::Succeeded).await?;
    w.got_nothing()?;
    leader.stop.cancel();
    Ok(())
}

#[tokio::test]
async fn recorded_ahead_and_sent_at_the_instant_memory() -> Result<()> {
    recorded_ahead_and_sent_at_the_instant(Rig::memory()).await
}

#[tokio::test]
async fn recorded_ahead_and_sent_at_the_instant_redis() -> Result<()> {
    recorded_ahead_and_sent_at_the_instant(Rig::redis().await?).await
}

/// A leader deposed between the record and the instant sends nothing: it finds
/// the newer fencing token at the instant and says it lost the lead.
async fn deposed_leader_sends_nothing(rig: Rig) -> Result<()> {
    let at = now() + IN_MS;
    rig.once("deposed", at, Overlap::Allow).await?;
    let leader = rig.leader(5, 2_000).await?;
    let mut w = Worker::join(&leader, "w1").await?;
    rig.recorded(&format!("deposed@{at}"), Duration::from_secs(5))
        .await?;
    ensure!(
        rig.runs.install_fence(6).await?.installed(),
        "newer fence refused"
    );
    wait_until(
        "the deposed leader to notice at the instant",
        Duration::from_secs(10),
        || async { leader.lost.is_cancelled() },
    )
    .await?;
    ensure!(now() >= at, "gave up before the instant");
    w.got_nothing()?;
    leader.stop.cancel();
    Ok(())
}

#[tokio::test]
async fn deposed_leader_sends_nothing_memory() -> Result<()> {
    deposed_leader_sends_nothing(Rig::memory()).await
}

#[tokio::test]
async fn deposed_leader_sends_nothing_redis() -> Result<()> {
    deposed_leader_sends_nothing(Rig::redis().await?).await
}

/// A leader that stops between the record and the instant leaves the run to the
/// next one, which sends it once, not before its instant.
async fn next_leader_sends_a_prepared_fire_once(rig: Rig) -> Result<()> {
    let at = now() + IN_MS;
    rig.once("handed", at, Overlap::Allow).await?;
    let first = rig.leader(1, 100).await?;
    let mut w_first = Worker::join(&first, "w1").await?;
    let id = format!("handed@{at}");
    rig.recorded(&id, Duration::from_secs(5)).await?;
    first.stop.cancel();
    first.task.await?;
    ensure!(
        now() < at,
        "the first leader stopped only after the instant"
    );

    let second = rig.leader(2, 100).await?;
    let mut w = Worker::join(&second, "w1").await?;
    let (a, arrived) = w.assignment().await?;
    ensure!(arrived >= at, "sent {} ms early", at - arrived);
    ensure!(a.fire_id == id, "{a:?}");
    w.succeed(&second, &a).await?;
    rig.ended(&id, RunState::Succeeded).await?;
    w.got_nothing()?;
    // The stopped leader told its session why it ended, and sent nothing else.
    while let Ok(m) = w_first.rx.try_recv() {
        ensure!(
            m == ToWorker::End(engine::EndReason::LeadershipEnded),
            "the stopped leader sent {m:?}"
        );
    }
    second.stop.cancel();
    Ok(())
}

#[tokio::test]
async fn next_leader_sends_a_prepared_fire_once_memory() -> Result<()> {
    next_leader_sends_a_prepared_fire_once(Rig::memory()).await
}

#[tokio::test]
async fn next_leader_sends_a_prepared_fire_once_redis() -> Result<()> {
    next_leader_sends_a_prepared_fire_once(Rig::redis().await?).await
}

/// A job paused after its fire was recorded does not fire: the run ends skipped.
#[tokio::test]
async fn paused_before_the_instant_is_skipped() -> Result<()> {
    let rig = Rig::memory();
    let at = now() + IN_MS;
    rig.once("paused", at, Overlap::Allow).await?;
    let leader = rig.leader(1, 2_000).await?;
    let mut w = Worker::join(&leader, "w1").await?;
    let id = format!("paused@{at}");
    rig.recorded(&id, Duration::from_secs(5)).await?;
    let stored = rig.jobs.modify("paused", |s| s.paused = true).await?;
    leader.handle.job_put(stored).await?;
    let run = rig.ended(&id, RunState::Skipped).await?;
    ensure!(run.note.contains("paused"), "{run:?}");
    // The skip is saved after the decision at the instant: nothing went out.
    w.got_nothing()?;
    leader.stop.cancel();
    Ok(())
}

/// A run killed before its instant ends cancelled and never goes out.
#[tokio::test]
async fn killed_before_the_instant_never_goes_out() -> Result<()> {
    let rig = Rig::memory();
    let at = now() + IN_MS;
    rig.once("killed", at, Overlap::Allow).await?;
    // Fires after the killed one's instant: when it arrives, that instant passed.
    rig.once("marker", at + 100, Overlap::Allow).await?;
    let leader = rig.leader(1, 2_000).await?;
    let mut w = Worker::join(&leader, "w1").await?;
    let id = format!("killed@{at}");
    rig.recorded(&id, Duration::from_secs(5)).await?;
    let killed = leader.handle.kill(&id).await?;
    ensure!(killed.state == RunState::Cancelled, "{killed:?}");
    rig.ended(&id, RunState::Cancelled).await?;
    let (a, _) = w.assignment().await?;
    ensure!(a.job == "marker", "the killed run went out: {a:?}");
    w.got_nothing()?;
    leader.stop.cancel();
    Ok(())
}

/// A run started between the record and the instant (a manual trigger) meets the
/// overlap policy at the instant: with `skip`, the prepared fire is skipped.
#[tokio::test]
async fn overlap_is_decided_again_at_the_instant() -> Result<()> {
    let rig = Rig::memory();
    let at = now() + IN_MS;
    rig.once("serial", at, Overlap::Skip).await?;
    let leader = rig.leader(1, 2_000).await?;
    let mut w = Worker::join(&leader, "w1").await?;
    let id = format!("serial@{at}");
    rig.recorded(&id, Duration::from_secs(5)).await?;
    let manual = leader.handle.trigger("serial", None).await?;
    let (a, _) = w.assignment().await?;
    ensure!(a.key.run_id == manual.run_id, "{a:?}");
    let run = rig.ended(&id, RunState::Skipped).await?;
    ensure!(run.note.contains("still going"), "{run:?}");
    w.got_nothing()?;
    leader.stop.cancel();
    Ok(())
}

/// The worker a prepared shard was planned for leaves before the instant: the
/// shard goes to another worker, at the instant.
#[tokio::test]
async fn a_planned_worker_that_left_is_replaced() -> Result<()> {
    let rig = Rig::memory();
    let at = now() + IN_MS;
    rig.once("moved", at, Overlap::Allow).await?;
    let leader = rig.leader(1, 2_000).await?;
    let mut ws = vec![
        Worker::join(&leader, "w1").await?,
        Worker::join(&leader, "w2").await?,
    ];
    let id = format!("moved@{at}");
    let run = rig.recorded(&id, Duration::from_secs(5)).await?;
    let planned = run.shards[0].worker_id.clone();
    let gone = ws.iter().position(|w| w.id == planned).context("planned")?;
    let mut left = ws.remove(gone);
    let mut other = ws.pop().context("other")?;
    leader.handle.closed(&left.id, left.session).await?;
    let (a, arrived) = other.assignment().await?;
    ensure!(arrived >= at, "sent {} ms early", at - arrived);
    ensure!(a.fire_id == id, "{a:?}");
    if let Ok(ToWorker::Assign(a)) = left.rx.try_recv() {
        bail!("the worker that left was sent {a:?}");
    }
    leader.stop.cancel();
    Ok(())
}

/// A new leader adopting runs waits for their workers to report them, but its own
/// new fires (here a manual trigger before any worker registered) go to the first
/// worker that registers, not after the adoption grace.
#[tokio::test]
async fn a_new_leaders_own_fires_do_not_wait_for_the_adoption_grace() -> Result<()> {
    let rig = Rig::memory();
    let at = now() + IN_MS;
    rig.once("adopted", at, Overlap::Allow).await?;
    let mut manual = JobSpec::new("manual", "g", "noop", Schedule::Manual);
    manual.overlap = Overlap::Allow;
    rig.jobs.create(manual, now()).await?;
    let first = rig.leader(1, 2_000).await?;
    let id = format!("adopted@{at}");
    rig.recorded(&id, Duration::from_secs(5)).await?;
    first.stop.cancel();
    first.task.await?;

    // Heartbeats of 2 s: the adoption grace is 3 beats + 2 s = 8 s.
    let started = now();
    let second = rig.leader(2, 2_000).await?;
    let run = second.handle.trigger("manual", None).await?;
    ensure!(run.shards[0].state == RunState::Pending, "{run:?}");
    let mut w = Worker::join(&second, "w1").await?;
    let (a, arrived) = w.assignment().await?;
    ensure!(a.key.run_id == run.run_id, "{a:?}");
    ensure!(
        arrived - started < 4_000,
        "the leader's own run waited {} ms, as if adopted",
        arrived - started
    );
    second.stop.cancel();
    Ok(())
}
