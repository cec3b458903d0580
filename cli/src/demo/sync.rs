//! `chime demo incremental-sync`: a source table that changes all the time, copied to
//! a target by a workflow on a fixed delay: **sync** (what changed since the
//! watermark, in batches) → **repair** (edge `always`: the compensation pass that
//! re-copies the rows a sync could not write). The demo kills the worker running a
//! sync in the middle of it, then checks that source and target end up equal and
//! that no row was ever copied twice or out of order.
//!
//! Both tables live in Redis under the run's prefix (one hash tag):
//! - `src` (row → version) and `chg` (row → the change counter at its last change),
//!   written by the demo process itself, a change every few milliseconds;
//! - `dst` (row → version), and `applied`, a list of every write applied to it
//!   (`row:version`): the independent record the checks read.
//!
//! What makes the sync safe:
//! - **Throttled before the lock.** A sync first takes its rows from a rate limit
//!   (`RedisLimiter`, the budget chime's handlers share), then the lock: a worker
//!   waiting for its budget never holds the lock.
//! - **A lock that cannot stick.** `lock` is set with a lease (2 s, extended after
//!   each batch); a worker that dies mid-sync holds it at most that long.
//! - **Fencing.** Each holder gets a number from `fence` (INCR); every write and
//!   watermark move checks, in the same script, that the lock still holds that
//!   number, so a holder that lost its lease (frozen, partitioned) writes nothing.
//! - **Never out of order.** A row is written only when the source's version is
//!   newer than the target's (same script): a batch copied again after a kill
//!   changes nothing, and an old value never overwrites a new one.
//! - **Compensation.** A write that fails (injected: 1 %) puts the row in `failed`;
//!   the repair node copies those rows again (newest version) and clears them.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chime_shared::ratelimit::{Policy, RateLimiter, RedisLimiter};
use chime_shared::redis_conn::RedisConn;
use chime_worker::{HandlerError, JobContext, WorkerBuilder};
use serde_json::json;

use super::worker::WorkerCtx;
use super::{Common, Demo, Scale, Scenario, WorkerTuning, check, round2};

const SYNC: &str = "sync.copy";
const REPAIR: &str = "sync.repair";
const JOB: &str = "incremental-sync";
/// Rows a sync asks the rate limit for, and copies at most.
const BATCH: u64 = 1_000;
/// Rows copied per second across every worker (the limit every sync draws from;
/// one grant is at most 100 ms of it, `ratelimit::BURST_MS`).
const RATE_PER_S: f64 = 10_000.0;
/// The lock's lease, ms (extended after each batch of a sync).
const LEASE_MS: u64 = 2_000;
/// Writes to the target that fail (and leave their row to the repair node).
const FAIL_RATE: f64 = 0.01;
/// How long one row's write to the target takes (a slow target: a sync lasts long
/// enough to be killed in the middle).
const ROW_WRITE_MS: u64 = 1;
/// The time between two syncs (the workflow's fixed delay), ms: the cluster's
/// floor for a schedule's period.
const DELAY_MS: u64 = 1_000;

/// A table's keys.
fn key(prefix: &str, name: &str) -> String {
    format!("{{{prefix}:sync}}:{name}")
}

fn err(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::new(e.to_string())
}

/// One change of the source: its counter, the row's new version, the row changed.
static WRITE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local s = redis.call('INCR', KEYS[1])
          redis.call('HSET', KEYS[2], ARGV[1], s)
          redis.call('ZADD', KEYS[3], s, ARGV[1])
          return s",
    )
});

/// Takes the lock unless held: {fence number, ''} or {0, the holder}.
static LOCK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local held = redis.call('GET', KEYS[1])
          if held then return {0, held} end
          local t = redis.call('INCR', KEYS[2])
          redis.call('SET', KEYS[1], t .. ':' .. ARGV[1], 'PX', ARGV[2])
          return {t, ''}",
    )
});

/// Copies one row if the lock is still the caller's and the source is newer:
/// 1 copied, 0 not newer (nothing written), -1 fenced.
static COPY: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
          local v = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
          local d = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
          if v <= d then return 0 end
          redis.call('HSET', KEYS[3], ARGV[2], v)
          redis.call('RPUSH', KEYS[4], ARGV[2] .. ':' .. v)
          return 1",
    )
});

/// Moves the watermark forward and extends the lease, if the lock is still the
/// caller's: 1, or -1 fenced.
static ADVANCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
          local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
          if tonumber(ARGV[2]) > cur then redis.call('SET', KEYS[2], ARGV[2]) end
          redis.call('PEXPIRE', KEYS[1], ARGV[3])
          return 1",
    )
});

/// Releases the lock if it is still the caller's.
static UNLOCK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
          return 0",
    )
});

/// The worker side.
pub(crate) fn handlers(b: WorkerBuilder, ctx: &WorkerCtx) -> WorkerBuilder {
    let (s, r) = (ctx.clone(), ctx.clone());
    b.job_handler(SYNC, move |j: JobContext| {
        let ctx = s.clone();
        async move { sync(j, ctx).await }
    })
    .job_handler(REPAIR, move |j: JobContext| {
        let ctx = r.clone();
        async move { repair(j, ctx).await }
    })
}

/// The lock of one sync or repair (its holder string), taken after the rate limit.
struct Held {
    token: String,
    fence: i64,
}

/// Takes the lock; `None` when another holds it.
async fn lock(
    conn: &mut RedisConn,
    prefix: &str,
    worker: &str,
) -> Result<Option<Held>, HandlerError> {
    let (fence, _holder): (i64, String) = LOCK
        .key(key(prefix, "lock"))
        .key(key(prefix, "fence"))
        .arg(worker)
        .arg(LEASE_MS)
        .invoke_async(conn)
        .await
        .map_err(err)?;
    Ok((fence > 0).then(|| Held {
        token: format!("{fence}:{worker}"),
        fence,
    }))
}

async fn unlock(conn: &mut RedisConn, prefix: &str, held: &Held) -> Result<(), HandlerError> {
    let _: i64 = UNLOCK
        .key(key(prefix, "lock"))
        .arg(&held.token)
        .invoke_async(conn)
        .await
        .map_err(err)?;
    Ok(())
}

/// Copies `row` under `held`: 1 copied, 0 not newer; fenced is an error.
async fn copy(
    conn: &mut RedisConn,
    prefix: &str,
    held: &Held,
    row: &str,
) -> Result<i64, HandlerError> {
    let r: i64 = COPY
        .key(key(prefix, "lock"))
        .key(key(prefix, "src"))
        .key(key(prefix, "dst"))
        .key(key(prefix, "applied"))
        .arg(&held.token)
        .arg(row)
        .invoke_async(conn)
        .await
        .map_err(err)?;
    if r < 0 {
        return Err(HandlerError::new(format!(
            "fenced: lock {} lost mid-sync",
            held.fence
        )));
    }
    Ok(r)
}

/// The sync node: the rate limit first, then the lock, then what changed since the
/// watermark, in batches, the watermark moved after each.
async fn sync(j: JobContext, ctx: WorkerCtx) -> Result<String, HandlerError> {
    let prefix = &ctx.prefix;
    let mut conn = ctx.conn.clone();
    // Throttled before the lock: waiting for the budget holds nothing.
    let limiter = RedisLimiter::new(ctx.conn.clone(), prefix.clone());
    let policy = Policy {
        budget: "h:sync".into(),
        rate_per_s: RATE_PER_S,
        cap_per_s: 0.0,
    };
    let mut waits = 0u64;
    let grant = loop {
        let g = limiter.acquire(&policy, SYNC, BATCH).await.map_err(err)?;
        if g.granted > 0 {
            break g.granted;
        }
        waits += 1;
        let _: i64 = redis::cmd("INCR")
            .arg(key(prefix, "throttled"))
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        tokio::time::sleep(Duration::from_millis(g.wait_ms.clamp(1, 1_000))).await;
    };
    let Some(held) = lock(&mut conn, prefix, &ctx.worker_id).await? else {
        return Ok(json!({"skipped": "the lock is held"}).to_string());
    };
    let (mut copied, mut same, mut failed, mut left) = (0u64, 0u64, 0u64, grant);
    let result = async {
        while left > 0 {
            let wm: Option<i64> = redis::cmd("GET")
                .arg(key(prefix, "wm"))
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            let rows: Vec<(String, i64)> = redis::cmd("ZRANGEBYSCORE")
                .arg(key(prefix, "chg"))
                .arg(format!("({}", wm.unwrap_or(0)))
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(left.min(100))
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            let Some(last) = rows.last().map(|r| r.1) else {
                break;
            };
            for (row, _) in &rows {
                tokio::time::sleep(Duration::from_millis(ROW_WRITE_MS)).await;
                if fastrand::f64() < FAIL_RATE {
                    // The target refused this write: left for the repair node.
                    let _: i64 = redis::cmd("SADD")
                        .arg(key(prefix, "failed"))
                        .arg(row)
                        .query_async(&mut conn)
                        .await
                        .map_err(err)?;
                    let _: i64 = redis::cmd("INCR")
                        .arg(key(prefix, "failures"))
                        .query_async(&mut conn)
                        .await
                        .map_err(err)?;
                    failed += 1;
                    continue;
                }
                match copy(&mut conn, prefix, &held, row).await? {
                    1 => copied += 1,
                    _ => same += 1,
                }
            }
            let moved: i64 = ADVANCE
                .key(key(prefix, "lock"))
                .key(key(prefix, "wm"))
                .arg(&held.token)
                .arg(last)
                .arg(LEASE_MS)
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            if moved < 0 {
                return Err(HandlerError::new(format!(
                    "fenced: lock {} lost mid-sync",
                    held.fence
                )));
            }
            left = left.saturating_sub(rows.len() as u64);
        }
        Ok(())
    }
    .await;
    unlock(&mut conn, prefix, &held).await?;
    result?;
    j.log(format!(
        "fence {}: {copied} copied, {same} not newer, {failed} failed",
        held.fence
    ));
    Ok(json!({"fence": held.fence, "copied": copied, "not_newer": same, "failed": failed, "throttled": waits}).to_string())
}

/// The repair node: the rows a sync could not write, copied again (newest version)
/// under the same lock, then cleared.
async fn repair(j: JobContext, ctx: WorkerCtx) -> Result<String, HandlerError> {
    let prefix = &ctx.prefix;
    let mut conn = ctx.conn.clone();
    let rows: Vec<String> = redis::cmd("SMEMBERS")
        .arg(key(prefix, "failed"))
        .query_async(&mut conn)
        .await
        .map_err(err)?;
    if rows.is_empty() {
        return Ok(json!({"repaired": 0}).to_string());
    }
    let Some(held) = lock(&mut conn, prefix, &ctx.worker_id).await? else {
        return Ok(json!({"skipped": "the lock is held"}).to_string());
    };
    let mut repaired = 0u64;
    let result = async {
        for row in &rows {
            copy(&mut conn, prefix, &held, row).await?;
            let _: i64 = redis::cmd("SREM")
                .arg(key(prefix, "failed"))
                .arg(row)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            repaired += 1;
        }
        Ok::<_, HandlerError>(())
    }
    .await;
    unlock(&mut conn, prefix, &held).await?;
    result?;
    let _: i64 = redis::cmd("INCRBY")
        .arg(key(prefix, "repaired"))
        .arg(repaired)
        .query_async(&mut conn)
        .await
        .map_err(err)?;
    j.log(format!("{repaired} rows repaired"));
    Ok(json!({"repaired": repaired}).to_string())
}

/// The workflow: sync → repair (always), every [`DELAY_MS`] after the last ended,
/// a run skipped while the last is still going.
async fn create_workflow(admin: &mut super::Admin) -> Result<()> {
    let nodes = json!({"nodes": [
        {"name": "sync", "handler": SYNC, "timeout_ms": 60_000, "retries": 3, "retry_backoff_ms": 200},
        {"name": "repair", "handler": REPAIR, "timeout_ms": 60_000, "retries": 3,
         "retry_backoff_ms": 200, "after": [{"node": "sync", "when": "always"}]},
    ]});
    let every = proto::schedule::Kind::FixedDelay(proto::FixedDelay { delay_ms: DELAY_MS });
    super::create_workflow(admin, JOB, every, proto::Overlap::Skip, &nodes).await
}

async fn get_i64(conn: &mut RedisConn, k: &str) -> Result<i64> {
    let v: Option<i64> = redis::cmd("GET").arg(k).query_async(conn).await?;
    Ok(v.unwrap_or(0))
}

pub(crate) async fn run(c: Common) -> Result<()> {
    let (rows, write_s, changes_per_s) = match c.scale {
        Scale::Small => (2_000u64, 20u64, 200u64),
        Scale::Full => (100_000, 120, 300),
    };
    let mut demo = Demo::open(c.clone(), "incremental-sync", 1).await?;
    let mut admin = demo.start_coordinator().await?;
    let tuning = WorkerTuning {
        concurrency: 1,
        max_in_flight: 16,
        batch: 16,
    };
    // No provider: the scenario's handlers write to Redis.
    demo.start_workers(Scenario::IncrementalSync, "http://127.0.0.1:9/", &tuning)?;
    demo.wait_registered(&mut admin).await?;
    let prefix = demo.prefix.clone();
    let mut conn = demo.conn.clone();
    create_workflow(&mut admin).await?;
    eprintln!(
        "  {rows} rows, {changes_per_s} changes/s for {write_s} s; a sync every {DELAY_MS} ms after the last, \
         at most {RATE_PER_S} rows/s"
    );

    // The source changes while the workflow syncs; a worker is killed mid-sync.
    let started = Instant::now();
    let mut changes = 0u64;
    let mut killed: Option<(String, i64)> = None;
    let tick = Duration::from_millis(10);
    let per_tick = (changes_per_s / 100).max(1);
    while started.elapsed() < Duration::from_secs(write_s) {
        demo.check_alive()?;
        for _ in 0..per_tick {
            let row = format!("r{}", fastrand::u64(0..rows));
            let _: i64 = WRITE
                .key(key(&prefix, "seq"))
                .key(key(&prefix, "src"))
                .key(key(&prefix, "chg"))
                .arg(&row)
                .invoke_async(&mut conn)
                .await?;
            changes += 1;
        }
        if killed.is_none() && started.elapsed() > Duration::from_secs(write_s / 3) {
            // Mid-sync: the lock is held; its holder's process is killed.
            let holder: Option<String> = redis::cmd("GET")
                .arg(key(&prefix, "lock"))
                .query_async(&mut conn)
                .await?;
            if let Some((fence, worker)) = holder.as_deref().and_then(|h| h.split_once(':')) {
                eprintln!(
                    "  +{:.1} s: killing {worker}, which holds lock {fence} mid-sync",
                    started.elapsed().as_secs_f64()
                );
                demo.kill_worker(worker)?;
                killed = Some((worker.to_owned(), fence.parse().unwrap_or(0)));
            }
        }
        tokio::time::sleep(tick).await;
    }
    eprintln!("  source stopped after {changes} changes; waiting for the target to catch up");
    // Caught up: the watermark at the last change, no row left to repair, no lock.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        demo.check_alive()?;
        let seq = get_i64(&mut conn, &key(&prefix, "seq")).await?;
        let wm = get_i64(&mut conn, &key(&prefix, "wm")).await?;
        let failed: i64 = redis::cmd("SCARD")
            .arg(key(&prefix, "failed"))
            .query_async(&mut conn)
            .await?;
        if wm >= seq && failed == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the target did not catch up within 120 s: watermark {wm} of {seq}, {failed} rows to repair"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caught_up_s = round2(started.elapsed().as_secs_f64() - write_s as f64);
    // The independent record: both tables and every write applied.
    let src: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(key(&prefix, "src"))
        .query_async(&mut conn)
        .await?;
    let dst: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(key(&prefix, "dst"))
        .query_async(&mut conn)
        .await?;
    let applied: Vec<String> = redis::cmd("LRANGE")
        .arg(key(&prefix, "applied"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await?;
    let mismatched = src.iter().filter(|(r, v)| dst.get(*r) != Some(v)).count()
        + dst.keys().filter(|r| !src.contains_key(*r)).count();
    let (mut last, mut twice, mut out_of_order) = (HashMap::new(), 0u64, 0u64);
    for a in &applied {
        let (row, v) = a
            .rsplit_once(':')
            .context("an applied record without a version")?;
        let v: i64 = v.parse()?;
        match last.insert(row.to_owned(), v) {
            Some(prev) if prev == v => twice += 1,
            Some(prev) if prev > v => out_of_order += 1,
            _ => {}
        }
    }
    let fences = get_i64(&mut conn, &key(&prefix, "fence")).await?;
    let failures = get_i64(&mut conn, &key(&prefix, "failures")).await?;
    let repaired = get_i64(&mut conn, &key(&prefix, "repaired")).await?;
    let throttled = get_i64(&mut conn, &key(&prefix, "throttled")).await?;
    let runs = admin
        .list_runs(proto::ListRunsRequest {
            job: JOB.into(),
            limit: 1_000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .runs;
    let succeeded = runs
        .iter()
        .filter(|r| r.state == proto::RunState::Succeeded as i32)
        .count();
    let result = json!({
        "rows": rows,
        "changes": changes,
        "rows_changed": src.len(),
        "sync_runs": runs.len(),
        "sync_runs_succeeded": succeeded,
        "writes_applied": applied.len(),
        "copied_twice": twice,
        "out_of_order": out_of_order,
        "mismatched_rows": mismatched,
        "injected_write_failures": failures,
        "repaired": repaired,
        "lock_holders": fences,
        "killed_worker": killed.as_ref().map(|k| k.0.clone()),
        "killed_holding_lock": killed.as_ref().map(|k| k.1),
        "throttled_waits": throttled,
        "rate_limit_rows_per_s": RATE_PER_S,
        "caught_up_after_s": caught_up_s,
    });
    let mut f = Vec::new();
    check(
        &mut f,
        killed.is_some(),
        "no sync was caught holding the lock to kill its worker",
    );
    check(
        &mut f,
        mismatched == 0,
        format!("{mismatched} rows differ between source and target"),
    );
    check(
        &mut f,
        twice == 0,
        format!("{twice} writes copied a version already there"),
    );
    check(
        &mut f,
        out_of_order == 0,
        format!("{out_of_order} writes went back to an older version"),
    );
    check(
        &mut f,
        failures > 0 && repaired > 0,
        format!("{failures} write failures injected, {repaired} rows repaired"),
    );
    check(
        &mut f,
        killed.as_ref().is_some_and(|k| fences > k.1),
        format!("no sync took the lock after the one killed ({fences} holders)"),
    );
    demo.finish(result, f).await
}
