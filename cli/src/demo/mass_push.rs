//! `chime demo mass-push`: one campaign pushed to a segment of millions of users (a
//! synthetic id range, the way an export of user ids is consumed), run as a
//! workflow of four nodes: **count** the segment → **shard** (a sharding-broadcast
//! node: each shard takes its slice of the range and splits it into tasks of 1,000
//! users, enqueued in pipelined batches; no `select *`, no message per user) →
//! **push** (waits until every task was pushed: workers push each task in provider
//! batches of 100 users, a multicast API's size, with a bounded number of requests
//! in flight per worker) → **report**. Each node gets its parents' outputs in its
//! params. Reports the total time against the concurrency-bound ideal, and the
//! workers' peak memory, which the in-flight bound keeps flat whatever the backlog
//! in Redis.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use chime_shared::clock::system_now_ms;
use chime_shared::queue::{EnqueueOutcome, NewItem};
use chime_worker::{HandlerError, ItemContext, JobContext, WorkerBuilder};
use futures_util::StreamExt;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::provider::{Provider, PushRequest};
use super::worker::WorkerCtx;
use super::{Common, Demo, Scale, Scenario, WorkerTuning, check, round2};

/// The count node's handler: the segment's size.
const COUNT: &str = "mass.count";
/// The shard node's handler: fans a shard's slice out into tasks.
const FANOUT: &str = "mass.fanout";
/// The push node's handler: waits until every task was pushed.
const AWAIT: &str = "mass.await";
/// The report node's handler.
const REPORT: &str = "mass.report";
/// The item handler: pushes one task.
const PUSH: &str = "mass.push";
/// The workflow.
const JOB: &str = "mass-push";
/// Users per task item.
const TASK_USERS: u64 = 1_000;
/// Users per provider request.
const BATCH_USERS: u64 = 100;
/// Tasks per enqueue call.
const ENQUEUE_CHUNK: usize = 500;

/// The workflow's params, and the count node's output.
#[derive(Debug, Serialize, Deserialize)]
struct Params {
    message: String,
    users: u64,
}

/// What a workflow node's handler gets as params (see docs/workflows.md).
#[derive(Debug, Deserialize)]
struct NodeParams {
    #[serde(default)]
    workflow: serde_json::Value,
    #[serde(default)]
    parents: serde_json::Map<String, serde_json::Value>,
}

fn node_params(j: &JobContext) -> Result<NodeParams, HandlerError> {
    serde_json::from_str(&j.params).map_err(|e| HandlerError::new(format!("bad params: {e}")))
}

/// Parent `name`'s output, as `T`.
fn parent<T: serde::de::DeserializeOwned>(p: &NodeParams, name: &str) -> Result<T, HandlerError> {
    let v = p
        .parents
        .get(name)
        .cloned()
        .ok_or_else(|| HandlerError::new(format!("no output of {name} in the params")))?;
    serde_json::from_value(v).map_err(|e| HandlerError::new(format!("{name}'s output: {e}")))
}

/// A shard's output.
#[derive(Debug, Serialize, Deserialize)]
struct Slice {
    from: u64,
    to: u64,
    tasks: u64,
    duplicate: u64,
}

struct Plan {
    users: u64,
    concurrency: usize,
}

fn plan(scale: Scale) -> Plan {
    match scale {
        Scale::Small => Plan {
            users: 200_000,
            concurrency: 32,
        },
        Scale::Full => Plan {
            users: 10_000_000,
            concurrency: 256,
        },
    }
}

/// Tasks (items) a worker runs at once: enough to keep `concurrency` requests busy
/// while some tasks wait for their last batch.
fn task_concurrency(concurrency: usize) -> usize {
    (concurrency * BATCH_USERS as usize / TASK_USERS as usize).max(1) * 2
}

/// The worker side.
pub(crate) fn handlers(b: WorkerBuilder, ctx: &WorkerCtx) -> WorkerBuilder {
    let (fan, push, wait, report) = (ctx.clone(), ctx.clone(), ctx.clone(), ctx.clone());
    b.job_handler(COUNT, |j: JobContext| async move { count(j).await })
        .job_handler(FANOUT, move |j: JobContext| {
            let ctx = fan.clone();
            async move { fanout(j, ctx).await }
        })
        .job_handler(AWAIT, move |j: JobContext| {
            let ctx = wait.clone();
            async move { await_pushed(j, ctx).await }
        })
        .job_handler(REPORT, move |j: JobContext| {
            let ctx = report.clone();
            async move { report_campaign(j, ctx).await }
        })
        .handler(PUSH, move |i: ItemContext| {
            let ctx = push.clone();
            async move { push_task(i, ctx).await }
        })
        .handler_concurrency(PUSH, task_concurrency(ctx.concurrency))
}

/// The count node: the segment's size (here the campaign's synthetic range; a
/// real one counts its user table), handed to the shard node.
async fn count(j: JobContext) -> Result<String, HandlerError> {
    let p: Params = serde_json::from_value(node_params(&j)?.workflow)
        .map_err(|e| HandlerError::new(format!("the workflow's params: {e}")))?;
    j.log(format!("segment of {} users", p.users));
    serde_json::to_string(&p).map_err(|e| HandlerError::new(e.to_string()))
}

/// The push node: waits until no task is left in the run's queues (pending or
/// in flight), then answers how many the shards enqueued.
async fn await_pushed(j: JobContext, ctx: WorkerCtx) -> Result<String, HandlerError> {
    let slices: Vec<Slice> = parent(&node_params(&j)?, "shard")?;
    let tasks: u64 = slices.iter().map(|s| s.tasks).sum();
    let started = system_now_ms();
    loop {
        let stats = ctx
            .store
            .stats()
            .await
            .map_err(|e| HandlerError::new(format!("queue stats: {e}")))?;
        let left: u64 = stats.iter().map(|s| s.pending + s.in_flight).sum();
        if left == 0 {
            let dead: u64 = stats.iter().map(|s| s.dead).sum();
            return Ok(
                json!({"tasks": tasks, "dead": dead, "waited_ms": system_now_ms() - started})
                    .to_string(),
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = j.cancellation().cancelled() => return Err(HandlerError::new("cancelled")),
        }
    }
}

/// The report node: the campaign's summary from its parents' outputs.
async fn report_campaign(j: JobContext, _ctx: WorkerCtx) -> Result<String, HandlerError> {
    let p = node_params(&j)?;
    let pushed: serde_json::Value = parent(&p, "push")?;
    let campaign: Params = serde_json::from_value(p.workflow)
        .map_err(|e| HandlerError::new(format!("the workflow's params: {e}")))?;
    j.log(format!("campaign {} pushed: {pushed}", campaign.message));
    Ok(json!({"message": campaign.message, "users": campaign.users, "tasks": pushed["tasks"], "dead": pushed["dead"]}).to_string())
}

/// A shard: its slice of the id range, as tasks of 1,000 users, enqueued a few
/// pipelined batches at a time.
async fn fanout(j: JobContext, ctx: WorkerCtx) -> Result<String, HandlerError> {
    let p: Params = parent(&node_params(&j)?, "count")?;
    let (i, t) = (u64::from(j.shard_index), u64::from(j.shard_total.max(1)));
    let (from, to) = (p.users * i / t, p.users * (i + 1) / t);
    let starts: Vec<u64> = (from..to).step_by(TASK_USERS as usize).collect();
    let now = system_now_ms();
    let chunks: Vec<Vec<NewItem>> = starts
        .chunks(ENQUEUE_CHUNK)
        .map(|c| {
            c.iter()
                .map(|&a| {
                    let b = (a + TASK_USERS).min(to);
                    NewItem::new(format!("mp:{}:{a}", p.message), PUSH, now)
                        .payload(format!("{} {a} {b}", p.message))
                        .max_attempts(10)
                })
                .collect()
        })
        .collect();
    let store = ctx.store.clone();
    let mut stream = futures_util::stream::iter(chunks.into_iter().map(|items| {
        let store = store.clone();
        async move { store.enqueue(items).await }
    }))
    .buffer_unordered(4);
    let (mut created, mut duplicate) = (0usize, 0usize);
    while let Some(r) = stream.next().await {
        for o in r.map_err(|e| HandlerError::new(format!("enqueue: {e}")))? {
            match o {
                EnqueueOutcome::Created => created += 1,
                EnqueueOutcome::Duplicate => duplicate += 1,
            }
        }
    }
    j.log(format!("users {from}..{to}: {created} tasks enqueued"));
    let slice = Slice {
        from,
        to,
        tasks: created as u64,
        duplicate: duplicate as u64,
    };
    serde_json::to_string(&slice).map_err(|e| HandlerError::new(e.to_string()))
}

/// A task: its users in provider batches, all batches at once (the worker's
/// in-flight bound queues them). A batch answered 503 is retried on its own, so the
/// batches already accepted are not pushed again.
async fn push_task(i: ItemContext, ctx: WorkerCtx) -> Result<(), HandlerError> {
    for item in i.items() {
        let text = std::str::from_utf8(&item.payload).unwrap_or("");
        let mut f = text.split(' ');
        let (Some(message), Some(Ok(a)), Some(Ok(b))) = (
            f.next(),
            f.next().map(str::parse::<u64>),
            f.next().map(str::parse::<u64>),
        ) else {
            return Err(HandlerError::new(format!("bad task payload {text:?}")));
        };
        let batches = (a..b).step_by(BATCH_USERS as usize).map(|x| PushRequest {
            messages: vec![message.to_owned()],
            users: (x..(x + BATCH_USERS).min(b)).collect(),
        });
        let results = join_all(batches.map(|req| {
            let pusher = ctx.pusher.clone();
            async move { pusher.push_retrying(&req, 10).await }
        }))
        .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(HandlerError::new(e));
        }
    }
    Ok(())
}

/// The workflow: count → shard (one shard per worker) → push → report.
async fn create_workflow(admin: &mut super::Admin) -> Result<()> {
    let nodes = json!({"nodes": [
        {"name": "count", "handler": COUNT, "timeout_ms": 60_000, "retries": 2},
        {"name": "shard", "handler": FANOUT, "routing": "sharding_broadcast",
         "timeout_ms": 600_000, "retries": 2, "retry_backoff_ms": 500,
         "after": [{"node": "count"}]},
        {"name": "push", "handler": AWAIT, "timeout_ms": 3_600_000, "after": [{"node": "shard"}]},
        {"name": "report", "handler": REPORT, "timeout_ms": 60_000, "after": [{"node": "push"}]},
    ]});
    let manual = proto::schedule::Kind::Manual(proto::Manual {});
    super::create_workflow(admin, JOB, manual, proto::Overlap::Allow, &nodes).await
}

pub(crate) async fn run(c: Common) -> Result<()> {
    let p = plan(c.scale);
    let latency_ms = c.latency_ms.unwrap_or(200);
    let mut demo = Demo::open(c.clone(), "mass-push", 16).await?;
    let provider = Provider::start(latency_ms, c.failure_rate.unwrap_or(0.01)).await?;
    let mut admin = demo.start_coordinator().await?;
    let tc = task_concurrency(p.concurrency);
    let tuning = WorkerTuning {
        concurrency: p.concurrency,
        max_in_flight: tc * 2,
        batch: (tc * 2) as u32,
    };
    demo.start_workers(Scenario::MassPush, &provider.url(), &tuning)?;
    demo.wait_registered(&mut admin).await?;
    create_workflow(&mut admin).await?;
    let workers = c.workers();
    let requests = p.users.div_ceil(BATCH_USERS);
    let slots = (p.concurrency * workers) as u64;
    let ideal_s = requests.div_ceil(slots) as f64 * latency_ms as f64 / 1000.0;
    eprintln!(
        "  {} users, tasks of {TASK_USERS}, {requests} provider requests of {BATCH_USERS}; \
         {workers} workers x {} in flight at {latency_ms} ms: ideal {ideal_s:.1} s",
        p.users, p.concurrency
    );

    let message = format!("campaign-{}", demo.prefix);
    let params = json!({"message": message, "users": p.users});
    let fired_at = system_now_ms();
    let run_id = super::trigger(&mut admin, JOB, &params).await?;
    let timeout = Duration::from_secs_f64(ideal_s * 10.0 + 120.0);
    let deadline = Instant::now() + timeout;
    let (mut peak_backlog, mut fanout_done_ms, mut next_report) = (0u64, None, Instant::now());
    let mut peak_rss = 0u64;
    loop {
        demo.check_alive()?;
        peak_rss = peak_rss.max(demo.worker_peak_rss_kib());
        let left = demo.queue_left().await?;
        peak_backlog = peak_backlog.max(left);
        if fanout_done_ms.is_none() {
            // The shard node's run (absent until the count node ended).
            let shard = admin
                .get_run(proto::RunId {
                    run_id: format!("{run_id}~shard"),
                })
                .await
                .map(tonic::Response::into_inner);
            if let Ok(run) = shard
                && run.finished_at_ms > 0
            {
                fanout_done_ms = Some(run.finished_at_ms);
            }
        }
        let done = provider.users_accepted();
        if done >= p.users && left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "mass push not done within {timeout:?}: {done} of {} users pushed",
                p.users
            );
        }
        if Instant::now() >= next_report {
            eprintln!(
                "  +{:>5.1} s: {done} users pushed, {left} tasks waiting in Redis, worker peak RSS {} MiB",
                (system_now_ms() - fired_at) as f64 / 1000.0,
                peak_rss / 1024
            );
            next_report = Instant::now() + Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    peak_rss = peak_rss.max(demo.worker_peak_rss_kib());
    let run = super::wait_run(&mut admin, &run_id, Duration::from_secs(30)).await?;
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&run.nodes_json).unwrap_or_default();
    let node_states: serde_json::Map<String, serde_json::Value> = nodes
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or("?").to_owned(),
                n["state"].clone(),
            )
        })
        .collect();
    let shard_run = super::wait_run(
        &mut admin,
        &format!("{run_id}~shard"),
        Duration::from_secs(5),
    )
    .await?;
    let shards = shard_run.shards.len();
    let tasks: u64 = shard_run
        .shards
        .iter()
        .filter_map(|s| serde_json::from_str::<serde_json::Value>(&s.output).ok())
        .filter_map(|v| v["tasks"].as_u64())
        .sum();
    let report: serde_json::Value = nodes
        .iter()
        .find(|n| n["name"] == "report")
        .and_then(|n| serde_json::from_str(n["output"].as_str()?).ok())
        .unwrap_or_default();
    let dead = demo.dead_letters().await?;
    let provider_info = provider.describe();
    let log = provider.finish().await;

    // Score: every user of the range once, for this campaign.
    let mut counts = vec![0u8; p.users as usize];
    let (mut foreign, mut last_ms) = (0u64, fired_at);
    for a in &log.accepted {
        last_ms = last_ms.max(a.at_ms);
        if a.messages != [message.as_str()] {
            foreign += 1;
            continue;
        }
        for &u in &a.users {
            match counts.get_mut(u as usize) {
                Some(n) => *n = n.saturating_add(1),
                None => foreign += 1,
            }
        }
    }
    let lost = counts.iter().filter(|&&n| n == 0).count();
    let duplicated: u64 = counts.iter().map(|&n| u64::from(n.saturating_sub(1))).sum();
    let total_s = (last_ms + latency_ms as i64 - fired_at) as f64 / 1000.0;
    let result = json!({
        "users": p.users,
        "workflow_run": run_id,
        "nodes": node_states,
        "report": report,
        "shards": shards,
        "tasks": tasks,
        "task_users": TASK_USERS,
        "batch_users": BATCH_USERS,
        "requests": requests,
        "concurrency_per_worker": p.concurrency,
        "ideal_s": round2(ideal_s),
        "total_s": round2(total_s),
        "efficiency": round2(ideal_s / total_s),
        "fanout_s": fanout_done_ms.map(|t| round2((t - fired_at) as f64 / 1000.0)),
        "users_per_s": (p.users as f64 / total_s).round(),
        "lost": lost,
        "duplicated": duplicated,
        "foreign": foreign,
        "peak_backlog_tasks": peak_backlog,
        "max_in_flight_tasks_per_worker": tuning.max_in_flight,
        "peak_worker_rss_kib": peak_rss,
        "dead_letters": dead,
        "provider": provider_info,
    });
    let mut f = Vec::new();
    check(
        &mut f,
        super::succeeded(&run) && node_states.values().all(|s| s == "succeeded"),
        format!(
            "the workflow run ended {:?}, its nodes {node_states:?}",
            run.state
        ),
    );
    check(
        &mut f,
        report["tasks"].as_u64() == Some(tasks),
        format!("the report node says {report}, the shards {tasks} tasks"),
    );
    check(&mut f, lost == 0, format!("{lost} users lost"));
    check(
        &mut f,
        duplicated == 0,
        format!("{duplicated} users pushed twice"),
    );
    check(
        &mut f,
        foreign == 0,
        format!("{foreign} pushes outside the campaign"),
    );
    let t = shards.max(1) as u64;
    let tasks_expected: u64 = (0..t)
        .map(|i| (p.users * (i + 1) / t - p.users * i / t).div_ceil(TASK_USERS))
        .sum();
    check(
        &mut f,
        tasks == tasks_expected,
        format!("{tasks} tasks enqueued, {tasks_expected} expected"),
    );
    // The concurrency bound is the limit: allow start-up, the fan-out and a busy
    // 2-core machine, not an order of magnitude.
    check(
        &mut f,
        total_s <= ideal_s * 3.0 + 10.0,
        format!("took {total_s:.1} s, ideal {ideal_s:.1} s"),
    );
    check(
        &mut f,
        peak_rss < 160 * 1024,
        format!("a worker peaked at {} MiB", peak_rss / 1024),
    );
    check(&mut f, dead == 0, format!("{dead} dead letters"));
    demo.finish(result, f).await
}
