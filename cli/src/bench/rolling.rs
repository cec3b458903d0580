//! `chime bench rolling`: a rolling restart, as a Kubernetes rollout does one. C
//! coordinators, W workers, J jobs firing every second in S shards (sharding
//! broadcast); every coordinator in turn gets SIGTERM, stays down `--down-ms` and
//! comes back (followers first, the leader last, so leadership moves once per
//! restart of a leader and the last restart is a hand-over), then every worker the
//! same way. Counts come from the workers' record files (what handlers ran), not
//! from the system's history: every shard of every tick of the window must have run
//! once, and none may start more than 1 s after its instant.
//!
//! A steady stream of delayed items flows the whole time (`--item-rate` a second,
//! each due 0.5–3 s after it is enqueued, consumed by the same workers): every item
//! must run once, never before its due time, from the handlers' record files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chime_shared::clock::system_now_ms;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, NewItem, QueueLayout};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use proto as pb;
use serde_json::json;

use super::failover::{Procs, Stores, admin, leader, reported_skipped, spawn};
use super::quantile;

/// `chime bench rolling` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct RollingArgs {
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// etcd endpoints.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: String,
    /// Coordinator processes.
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Jobs, each firing every second.
    #[arg(long, default_value_t = 100)]
    jobs: usize,
    /// Shards of each fire (sharding broadcast over the live workers).
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// How long each process stays down, ms.
    #[arg(long, default_value_t = 3_000)]
    down_ms: u64,
    /// Pause after each process is back before the next restart, ms.
    #[arg(long, default_value_t = 3_000)]
    settle_ms: u64,
    /// Leader lease TTL, seconds.
    #[arg(long, default_value_t = 5)]
    election_ttl_s: u64,
    /// Delayed items enqueued a second, all through the run (0: no items).
    #[arg(long, default_value_t = 200)]
    item_rate: u32,
    /// Queues N of the items.
    #[arg(long, default_value_t = 4)]
    queues: u32,
    /// Keep the files (their directory is printed).
    #[arg(long)]
    keep_files: bool,
}

/// Items `r<n>` enqueued by [`produce`] while it runs.
pub(super) struct Produced {
    pub(super) count: AtomicU64,
    pub(super) stop: AtomicBool,
    /// Redis time at which each batch was acknowledged: (first id, Unix ms), in
    /// order (tells a lost item's enqueue time from its id).
    pub(super) acked: std::sync::Mutex<Vec<(u64, i64)>>,
}

impl Produced {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            count: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            acked: std::sync::Mutex::new(Vec::new()),
        })
    }
}

/// Enqueues `rate` items a second (a batch every 50 ms) until told to stop, each due
/// 500–3,000 ms after Redis's clock at its enqueue. A batch that fails (Redis
/// restarting) is sent again until Redis acknowledges it: enqueue is idempotent
/// by id, so an item counts as produced exactly when it is known to be stored.
pub(super) async fn produce(store: Arc<RedisStore>, rate: u32, out: Arc<Produced>) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owed = 0.0f64;
    while !out.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        owed += f64::from(rate) / 20.0;
        let n = owed as u64;
        owed -= n as f64;
        if n == 0 {
            continue;
        }
        let first = out.count.load(Ordering::Relaxed);
        let mut items: Option<Vec<NewItem>> = None;
        let acked_at = loop {
            let attempt = async {
                if items.is_none() {
                    let now = store.now_ms().await?;
                    items = Some(
                        (first..first + n)
                            .map(|i| {
                                NewItem::new(
                                    format!("r{i}"),
                                    "noop",
                                    now + fastrand::i64(500..=3_000),
                                )
                            })
                            .collect(),
                    );
                }
                store.enqueue(items.clone().unwrap_or_default()).await?;
                store.now_ms().await
            };
            match attempt.await {
                Ok(t) => break t,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if let Ok(mut a) = out.acked.lock() {
            a.push((first, acked_at));
        }
        out.count.store(first + n, Ordering::Relaxed);
    }
    Ok(())
}

/// Sends SIGTERM and waits (up to a minute) for the process to exit.
pub(super) async fn terminate(child: &mut Child) -> Result<()> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .context("kill -TERM")?;
    for _ in 0..1_200 {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("a process did not exit within 60 s of SIGTERM (killed)")
}

/// Waits until the leader lists `n` workers.
pub(super) async fn workers_registered(endpoints: &[String], n: usize) -> Result<()> {
    for _ in 0..300 {
        if let Ok(mut c) = admin(endpoints).await
            && let Ok(r) = c.list_workers(pb::ListWorkersRequest::default()).await
            && r.into_inner().workers.len() == n
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{n} workers did not register within 30 s")
}

/// Creates jobs `<name>0…<name>{jobs-1>`, each firing every second in `shards`
/// shards (sharding broadcast).
pub(super) async fn create_sharded_jobs(
    endpoints: &[String],
    name: &str,
    jobs: usize,
    shards: u32,
) -> Result<()> {
    let mut client = admin(endpoints).await?;
    for i in 0..jobs {
        let job = pb::Job {
            routing: pb::Routing::ShardingBroadcast as i32,
            shard_count: shards,
            ..super::every_second(format!("{name}{i}"))
        };
        client
            .create_job(pb::CreateJobRequest { job: Some(job) })
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    }
    Ok(())
}

/// A worker process `worker_id` of a benchmark: its arguments, running job shards
/// (recorded in `records`) and consuming the items' `queues` (each handled item
/// recorded in `items`).
pub(super) fn worker_args(
    redis_url: &str,
    queues: u32,
    prefix: &str,
    endpoints: &[String],
    worker_id: &str,
    records: &Path,
    items: &Path,
) -> Vec<String> {
    [
        "worker",
        "--coordinator",
        &endpoints.join(","),
        "--worker-id",
        worker_id,
        "--handlers",
        "noop",
        "--http-addr",
        "127.0.0.1:0",
        "--job-record-file",
        &records.to_string_lossy(),
        "--redis-url",
        redis_url,
        "--prefix",
        prefix,
        "--queues",
        &queues.to_string(),
        "--record-file",
        &items.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Process `generation` of worker `i` of this bench, and its item record file (one
/// per process).
fn rolling_worker(
    a: &RollingArgs,
    prefix: &str,
    endpoints: &[String],
    i: usize,
    generation: u32,
    records: &Path,
) -> (Vec<String>, PathBuf) {
    let items = records.with_file_name(format!("items-w{i}-{generation}.rec"));
    let args = worker_args(
        &a.redis_url,
        a.queues,
        prefix,
        endpoints,
        &format!("roll-w{i}"),
        records,
        &items,
    );
    (args, items)
}

/// Job shards as the workers' record file has them (one line per finished shard:
/// fire id, shard index, …, handler start, …, scheduled instant): how often each
/// (fire id, shard) ran, and its earliest start minus its instant, ms.
pub(super) type ShardRuns = HashMap<(String, u32), (u32, i64)>;

pub(super) fn read_job_records(records: &Path) -> ShardRuns {
    let text = std::fs::read_to_string(records).unwrap_or_default();
    let mut out = ShardRuns::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() != 10 {
            continue;
        }
        let (Ok(shard), Ok(started), Ok(scheduled)) = (
            f[2].parse::<u32>(),
            f[5].parse::<i64>(),
            f[9].parse::<i64>(),
        ) else {
            continue;
        };
        let e = out.entry((f[1].to_owned(), shard)).or_insert((0, i64::MAX));
        e.0 += 1;
        e.1 = e.1.min(started - scheduled);
    }
    out
}

pub(crate) async fn run(a: RollingArgs) -> Result<()> {
    if a.coordinators < 2 || a.workers == 0 || a.jobs == 0 || a.shards == 0 {
        bail!("invalid arguments: at least 2 coordinators, 1 worker, 1 job and 1 shard");
    }
    let stores = Stores {
        redis_url: a.redis_url.clone(),
        etcd_endpoints: a.etcd_endpoints.clone(),
        election_ttl_s: a.election_ttl_s,
    };
    let mut p = Procs::coordinators("rolling", stores, a.coordinators)?;
    let (dir, prefix, etcd_prefix) = (p.dir.clone(), p.prefix.clone(), p.etcd_prefix.clone());
    let endpoints = p.endpoints();
    let records = dir.join("jobs.rec");
    // One item record file per worker process (each restart writes a new one).
    let mut item_files: Vec<PathBuf> = Vec::new();
    // Capacity for every shard of every job: capacity never delays a fire here.
    let capacity = (a.jobs * a.shards as usize).to_string();
    let env = [("CHIME_COORDINATOR_CAPACITY", capacity.as_str())];
    for i in 0..a.workers {
        let (args, items) = rolling_worker(&a, &prefix, &endpoints, i, 0, &records);
        item_files.push(items);
        p.workers
            .push(spawn(&p.exe, &dir, &format!("w{i}-0"), &args, &env)?);
    }
    let conn = RedisConn::connect(&RedisSpec::parse(&a.redis_url)?).await?;
    let store =
        Arc::new(RedisStore::open(conn, QueueLayout::new(&prefix, "default", a.queues)?).await?);
    let produced = Produced::new();
    let producer = (a.item_rate > 0)
        .then(|| tokio::spawn(produce(store.clone(), a.item_rate, produced.clone())));
    workers_registered(&endpoints, a.workers).await?;
    create_sharded_jobs(&endpoints, "ro-", a.jobs, a.shards).await?;
    eprintln!(
        "bench rolling: {} coordinators, {} workers, {} jobs every second in {} shards; \
         each process down {} ms, {} ms between restarts",
        a.coordinators, a.workers, a.jobs, a.shards, a.down_ms, a.settle_ms
    );
    let start = (system_now_ms() / 1000 + 2) * 1000;
    tokio::time::sleep(Duration::from_millis(
        (start - system_now_ms()).max(0) as u64 + a.settle_ms,
    ))
    .await;

    // Coordinators: followers first, the leader last.
    let lead = leader(&endpoints).await.unwrap_or_default();
    let mut order: Vec<usize> = (0..a.coordinators).collect();
    order.sort_by_key(|i| lead.ends_with(&format!(":{}", p.coords[*i].0)));
    for i in order {
        let was_leader = lead.ends_with(&format!(":{}", p.coords[i].0));
        if let Some(mut c) = p.coords[i].1.take() {
            terminate(&mut c).await?;
        }
        eprintln!(
            "  coordinator {i} stopped (SIGTERM{})",
            if was_leader { ", the leader" } else { "" }
        );
        tokio::time::sleep(Duration::from_millis(a.down_ms)).await;
        p.start_coordinator(i)?;
        tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
    }
    // Then workers, one at a time.
    for i in 0..a.workers {
        terminate(&mut p.workers[i]).await?;
        eprintln!("  worker {i} stopped (SIGTERM)");
        tokio::time::sleep(Duration::from_millis(a.down_ms)).await;
        let (args, items) = rolling_worker(&a, &prefix, &endpoints, i, 1, &records);
        item_files.push(items);
        p.workers[i] = spawn(&p.exe, &dir, &format!("w{i}-1"), &args, &env)?;
        workers_registered(&endpoints, a.workers).await?;
        tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
    }
    // The window ends 2 s before now: every shard of it had time to finish.
    let end = system_now_ms() - 2_000;

    let reported_skipped = reported_skipped(&endpoints, "ro-", a.jobs).await?;

    // Items: stop producing, then wait until every item is handled (or 30 s after
    // the last one fell due: what is missing then is lost).
    produced.stop.store(true, Ordering::Relaxed);
    if let Some(t) = producer {
        t.await.context("producer task")??;
    }
    let n_items = produced.count.load(Ordering::Relaxed) as usize;
    let deadline = std::time::Instant::now() + Duration::from_secs(33);
    loop {
        let handled = super::read_records(&item_files)?;
        if (0..n_items).all(|i| handled.contains_key(&format!("r{i}")))
            || std::time::Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(p);
    let items = super::score(&super::read_records(&item_files)?, "r", n_items);

    let shard_runs = read_job_records(&records);
    let (mut expected, mut ran, mut skipped, mut missed, mut dup) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut lags: Vec<i64> = Vec::new();
    for i in 0..a.jobs {
        let mut t = start;
        while t < end {
            let id = format!("ro-{i}@{t}");
            for s in 0..a.shards {
                expected += 1;
                match shard_runs.get(&(id.clone(), s)) {
                    Some((n, lag)) => {
                        ran += 1;
                        dup += u64::from(n - 1);
                        lags.push(*lag);
                    }
                    None if reported_skipped.contains(&id) => skipped += 1,
                    None => missed += 1,
                }
            }
            t += 1_000;
        }
    }
    lags.sort_unstable();
    let late = lags.iter().filter(|l| **l > 1_000).count();
    super::tear_down(
        &a.redis_url,
        &a.etcd_endpoints,
        &prefix,
        &etcd_prefix,
        &dir,
        a.keep_files,
    )
    .await?;
    println!(
        "{}",
        json!({
            "bench": "rolling",
            "coordinators": a.coordinators,
            "workers": a.workers,
            "jobs": a.jobs,
            "shards": a.shards,
            "down_ms": a.down_ms,
            "settle_ms": a.settle_ms,
            "order": "coordinators (followers first, leader last), then workers; SIGTERM",
            "shards_expected": expected,
            "ran": ran,
            "missed": missed,
            "skipped_reported": skipped,
            "duplicates": dup,
            "late_over_1s": late,
            "fire_lag_p50_ms": quantile(&lags, 0.5),
            "fire_lag_p99_ms": quantile(&lags, 0.99),
            "worst_fire_lag_ms": lags.last().copied().unwrap_or(0),
            "item_rate_per_s": a.item_rate,
            "items": n_items,
            "items_lost": items.lost,
            "items_duplicates": items.duplicates,
            "items_early": items.early,
            "items_late_over_1s": items.lags.iter().filter(|l| **l > 1_000).count(),
            "item_lag_p50_ms": quantile(&items.lags, 0.5),
            "item_lag_p99_ms": quantile(&items.lags, 0.99),
            "worst_item_lag_ms": items.lags.last().copied().unwrap_or(0),
        })
    );
    Ok(())
}
