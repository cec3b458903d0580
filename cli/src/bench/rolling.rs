//! `chime bench rolling`: a rolling restart, as a Kubernetes rollout does one. C
//! coordinators, W workers, J jobs firing every second in S shards (sharding
//! broadcast); every coordinator in turn gets SIGTERM, stays down `--down-ms` and
//! comes back (followers first, the leader last, so leadership moves once per
//! restart of a leader and the last restart is a hand-over), then every worker the
//! same way. Counts come from the workers' record files (what handlers ran), not
//! from the system's history: every shard of every tick of the window must have run
//! once, and none may start more than 1 s after its instant.
//!
//! Delayed items are not part of this benchmark yet (see `bench burst`/`resize`
//! for items across worker restarts).

use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chime_shared::clock::system_now_ms;
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
    /// Keep the files (their directory is printed).
    #[arg(long)]
    keep_files: bool,
}

/// Sends SIGTERM and waits (up to a minute) for the process to exit.
async fn terminate(child: &mut Child) -> Result<()> {
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
async fn workers_registered(endpoints: &[String], n: usize) -> Result<()> {
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

fn worker_args(endpoints: &[String], i: usize, records: &std::path::Path) -> Vec<String> {
    [
        "worker",
        "--no-queue",
        "--coordinator",
        &endpoints.join(","),
        "--worker-id",
        &format!("roll-w{i}"),
        "--handlers",
        "noop",
        "--http-addr",
        "127.0.0.1:0",
        "--job-record-file",
        &records.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
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
    // Capacity for every shard of every job: capacity never delays a fire here.
    let capacity = (a.jobs * a.shards as usize).to_string();
    let env = [("CHIME_COORDINATOR_CAPACITY", capacity.as_str())];
    for i in 0..a.workers {
        let args = worker_args(&endpoints, i, &records);
        p.workers
            .push(spawn(&p.exe, &dir, &format!("w{i}-0"), &args, &env)?);
    }
    workers_registered(&endpoints, a.workers).await?;
    let mut client = admin(&endpoints).await?;
    for i in 0..a.jobs {
        let job = pb::Job {
            routing: pb::Routing::ShardingBroadcast as i32,
            shard_count: a.shards,
            ..super::every_second(format!("ro-{i}"))
        };
        client
            .create_job(pb::CreateJobRequest { job: Some(job) })
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    }
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
        let args = worker_args(&endpoints, i, &records);
        p.workers[i] = spawn(&p.exe, &dir, &format!("w{i}-1"), &args, &env)?;
        workers_registered(&endpoints, a.workers).await?;
        tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
    }
    // The window ends 2 s before now: every shard of it had time to finish.
    let end = system_now_ms() - 2_000;

    let reported_skipped = reported_skipped(&endpoints, "ro-", a.jobs).await?;
    drop(p);

    // What ran: one record line per finished shard (fire id, shard index, handler
    // start, scheduled instant).
    let text = std::fs::read_to_string(&records).unwrap_or_default();
    let mut executions: HashMap<(String, u32), u32> = HashMap::new();
    let mut lag: HashMap<(String, u32), i64> = HashMap::new();
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
        let key = (f[1].to_owned(), shard);
        *executions.entry(key.clone()).or_default() += 1;
        let l = lag.entry(key).or_insert(i64::MAX);
        *l = (*l).min(started - scheduled);
    }
    let (mut expected, mut ran, mut skipped, mut missed, mut dup) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut lags: Vec<i64> = Vec::new();
    for i in 0..a.jobs {
        let mut t = start;
        while t < end {
            let id = format!("ro-{i}@{t}");
            for s in 0..a.shards {
                expected += 1;
                match executions.get(&(id.clone(), s)) {
                    Some(n) => {
                        ran += 1;
                        dup += u64::from(n - 1);
                        lags.push(lag[&(id.clone(), s)]);
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
            "items": "not measured by this benchmark",
        })
    );
    Ok(())
}
