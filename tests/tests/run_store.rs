//! The run store's contract (`chime_coordinator::store::RunStore`), the same cases
//! on the memory store and on a real redis-server: a fire is recorded once (a
//! schedule's tick, whose run's key remembers it, and a manual fire, which has a
//! memory key of its own), a stale fencing token records nothing, answers keep the
//! order of a batch larger than one script call, and batched history saves keep
//! each job's newest runs, drop the rest and append the events of runs that ended
//! badly.

use std::sync::Arc;

use anyhow::{Result, ensure};
use chime_coordinator::model::{RunRecord, RunState};
use chime_coordinator::store::{
    FireAnswer, FireRecord, MemoryRunStore, RedisRunStore, Retention, RunStore,
};
use chime_tests::RedisServer;

/// Runs kept per job here: small, so trimming shows.
const KEEP: usize = 20;

fn retention() -> Retention {
    Retention {
        per_job: KEEP,
        ..Retention::default()
    }
}

/// A store of each kind; the server lives as long as the store is used.
async fn redis() -> Result<(Arc<dyn RunStore>, RedisServer)> {
    let server = RedisServer::start().await?;
    let store = RedisRunStore::new(server.conn().await?, "rs", retention());
    Ok((Arc::new(store), server))
}

fn memory() -> Arc<dyn RunStore> {
    Arc::new(MemoryRunStore::new(retention()))
}

fn run(job: &str, run_id: &str, fire_id: &str, at: i64, state: RunState) -> RunRecord {
    RunRecord {
        run_id: run_id.to_owned(),
        fire_id: fire_id.to_owned(),
        job: job.to_owned(),
        cause: "scheduled".to_owned(),
        scheduled_at_ms: at,
        fired_at_ms: at,
        finished_at_ms: if state.is_final() { at + 1 } else { 0 },
        state,
        params: String::new(),
        shards: Vec::new(),
        parent_run_id: String::new(),
        note: String::new(),
        fence: 1,
        nodes: Vec::new(),
    }
}

/// A schedule's tick: its run id is its fire id.
fn tick(job: &str, at: i64) -> FireRecord {
    let id = format!("{job}@{at}");
    FireRecord {
        fire_id: id.clone(),
        job: job.to_owned(),
        at,
        run: run(job, &id, &id, at, RunState::Running),
    }
}

/// A manual fire: a run id of its own.
fn manual(job: &str, fire_id: &str, run_id: &str, at: i64) -> FireRecord {
    let mut r = run(job, run_id, fire_id, at, RunState::Running);
    r.cause = "manual".to_owned();
    FireRecord {
        fire_id: fire_id.to_owned(),
        job: job.to_owned(),
        at,
        run: r,
    }
}

async fn fires_are_recorded_once(s: Arc<dyn RunStore>) -> Result<()> {
    s.install_fence(5).await?;
    let first = s
        .record_fires(5, &[tick("a", 1_000), manual("a", "m1", "r-m1", 1_500)])
        .await?;
    ensure!(
        first == [FireAnswer::Recorded, FireAnswer::Recorded],
        "{first:?}"
    );
    // The same fires again, even with another run planned: duplicates, and the
    // recorded runs are unchanged.
    let mut again = manual("a", "m1", "r-m1-bis", 1_600);
    again.run.note = "second".into();
    let second = s.record_fires(5, &[tick("a", 1_000), again]).await?;
    ensure!(
        second == [FireAnswer::Duplicate, FireAnswer::Duplicate],
        "{second:?}"
    );
    ensure!(
        s.get_run("r-m1-bis").await?.is_none(),
        "a duplicate fire saved its run"
    );
    let t = s.get_run("a@1000").await?;
    ensure!(
        t.as_ref().is_some_and(|r| r.state == RunState::Running),
        "{t:?}"
    );
    // Both recorded runs are active until saved final; the job's last instant is
    // the newest recorded.
    let mut active: Vec<String> = s
        .active_runs()
        .await?
        .into_iter()
        .map(|r| r.run_id)
        .collect();
    active.sort();
    ensure!(active == ["a@1000", "r-m1"], "{active:?}");
    let last = s.trigger_state().await?;
    ensure!(last.get("a") == Some(&1_500), "{last:?}");
    // A deposed leader's token records nothing.
    s.install_fence(6).await?;
    let stale = s.record_fires(5, &[tick("a", 2_000)]).await?;
    ensure!(stale == [FireAnswer::Fenced], "{stale:?}");
    ensure!(
        s.get_run("a@2000").await?.is_none(),
        "a fenced fire saved its run"
    );
    Ok(())
}

async fn a_big_batch_answers_in_order(s: Arc<dyn RunStore>) -> Result<()> {
    s.install_fence(1).await?;
    // Every third fire recorded before: the answers of 450 fires (several script
    // calls) must line up with them.
    let fires: Vec<FireRecord> = (0..450).map(|i| tick(&format!("j{i}"), 10_000)).collect();
    let before: Vec<FireRecord> = fires.iter().step_by(3).cloned().collect();
    s.record_fires(1, &before).await?;
    let answers = s.record_fires(1, &fires).await?;
    ensure!(answers.len() == fires.len(), "{} answers", answers.len());
    for (i, a) in answers.iter().enumerate() {
        let want = if i % 3 == 0 {
            FireAnswer::Duplicate
        } else {
            FireAnswer::Recorded
        };
        ensure!(*a == want, "fire {i}: {a:?}, not {want:?}");
    }
    Ok(())
}

async fn batched_saves_keep_the_newest(s: Arc<dyn RunStore>) -> Result<()> {
    // 250 runs of one job saved in one call (several script calls), then one more
    // that failed: the job keeps its newest KEEP, the others are gone, and the
    // failure is an event.
    let runs: Vec<RunRecord> = (0..250)
        .map(|i| {
            let at = 100_000 + i * 10;
            run(
                "h",
                &format!("h@{at}"),
                &format!("h@{at}"),
                at,
                RunState::Succeeded,
            )
        })
        .collect();
    s.save_runs(&runs.iter().collect::<Vec<_>>()).await?;
    let mut failed = run("h", "h@200000", "h@200000", 200_000, RunState::Failed);
    failed.note = "boom".into();
    s.save_runs(&[&failed]).await?;
    let listed: Vec<String> = s
        .list_runs("h", 1_000)
        .await?
        .into_iter()
        .map(|r| r.run_id)
        .collect();
    let mut want: Vec<String> = runs[runs.len() - (KEEP - 1)..]
        .iter()
        .map(|r| r.run_id.clone())
        .collect();
    want.push(failed.run_id.clone());
    want.reverse();
    ensure!(listed == want, "listed {listed:?}");
    ensure!(
        s.get_run(&runs[0].run_id).await?.is_none(),
        "a trimmed run is still readable"
    );
    ensure!(s.active_runs().await?.is_empty(), "final runs are active");
    let events = s.run_events("", 100).await?;
    ensure!(
        events.len() == 1 && events[0].run_id == failed.run_id,
        "{events:?}"
    );
    // A run saved again replaces the saved one.
    let mut later = failed.clone();
    later.note = "again".into();
    s.save_runs(&[&later]).await?;
    let got = s.get_run(&later.run_id).await?;
    ensure!(got.is_some_and(|r| r.note == "again"), "not replaced");
    Ok(())
}

#[tokio::test]
async fn fires_are_recorded_once_memory() -> Result<()> {
    fires_are_recorded_once(memory()).await
}

#[tokio::test]
async fn fires_are_recorded_once_redis() -> Result<()> {
    let (s, _server) = redis().await?;
    fires_are_recorded_once(s).await
}

#[tokio::test]
async fn a_big_batch_answers_in_order_memory() -> Result<()> {
    a_big_batch_answers_in_order(memory()).await
}

#[tokio::test]
async fn a_big_batch_answers_in_order_redis() -> Result<()> {
    let (s, _server) = redis().await?;
    a_big_batch_answers_in_order(s).await
}

#[tokio::test]
async fn batched_saves_keep_the_newest_memory() -> Result<()> {
    batched_saves_keep_the_newest(memory()).await
}

#[tokio::test]
async fn batched_saves_keep_the_newest_redis() -> Result<()> {
    let (s, _server) = redis().await?;
    batched_saves_keep_the_newest(s).await
}
