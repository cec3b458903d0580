//! The benchmarks whose figures README quotes run end to end at a small scale, so a
//! change that breaks one (or its scoring) fails here rather than at the next
//! measurement: `chime bench burst`, `floor`, `steady`, `cron`, `rolling` and `chaos` against a real Redis and
//! etcd, their JSON parsed and their correctness fields checked. Speed is not
//! asserted (figures come from release builds on a quiet machine, see README),
//! except that a graceful restart never waits out the grace of a crash.

use anyhow::{Context, Result, ensure};
use chime_tests::{EtcdServer, RedisServer, find_binary, run_chime};

fn json(out: &str) -> Result<serde_json::Value> {
    serde_json::from_str(out.trim()).with_context(|| format!("bench output {out:?}"))
}

/// A small burst: every item handled once, none early, and every setting the
/// figures depend on printed with them (the defaults: the worker's batch and
/// in-flight limits, 256-byte payloads), and Redis's CPU and profile per item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_burst_runs_and_counts_every_item_once() -> Result<()> {
    let redis = RedisServer::start().await?;
    let (code, out, err) = run_chime(&[
        "bench",
        "burst",
        "--redis-url",
        &redis.url,
        "--items",
        "2000",
        "--workers",
        "2",
    ])?;
    ensure!(code == 0, "bench burst failed: {err}");
    let r = json(&out)?;
    ensure!(r["bench"] == "burst" && r["items"] == 2000, "{r}");
    ensure!(
        r["lost"] == 0 && r["duplicates"] == 0 && r["early"] == 0,
        "{r}"
    );
    ensure!(
        r["batch"] == 256 && r["max_in_flight"] == 2048 && r["payload_bytes"] == 256,
        "the defaults are the worker's and a realistic payload: {r}"
    );
    for field in [
        "drain_per_s",
        "lag_p50_ms",
        "lag_p99_ms",
        "pollers",
        "redis_cpu_us_per_item",
    ] {
        ensure!(r[field].is_number(), "{field} missing: {r}");
    }
    ensure!(
        r["redis_profile"]["commands_us_per_item"]["evalsha"].is_number()
            && r["redis_profile"]["lua_us_per_item"].is_number(),
        "the Redis profile: {r}"
    );
    ensure!(r["producer"] == "store", "{r}");
    Ok(())
}

/// The floor of the bare commands moves every item through enqueue, pop and ack
/// (the bench fails when a pop comes back short or keys are left), prints Redis's
/// CPU per item by phase with its settings, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_floor_moves_every_item_and_prints_each_phase() -> Result<()> {
    let redis = RedisServer::start().await?;
    let (code, out, err) = run_chime(&[
        "bench",
        "floor",
        "--redis-url",
        &redis.url,
        "--items",
        "3000",
        "--batch",
        "256",
    ])?;
    ensure!(code == 0, "bench floor failed: {err}");
    let r = json(&out)?;
    ensure!(r["bench"] == "floor" && r["items"] == 3000, "{r}");
    ensure!(r["batch"] == 256 && r["payload_bytes"] == 256, "{r}");
    ensure!(r["redis_cpu_us_per_item"].is_number(), "{r}");
    for phase in ["enqueue", "pop", "ack"] {
        ensure!(
            r["redis_cpu_us_per_item_by_phase"][phase].is_number(),
            "{phase} missing: {r}"
        );
    }
    let mut c = redis.conn().await?;
    let keys: i64 = redis::cmd("DBSIZE").query_async(&mut c).await?;
    ensure!(keys == 0, "bench floor left {keys} keys");
    Ok(())
}

/// The burst enqueued through `chime.v1.Queue` on a coordinator the bench starts:
/// every item handled once, and the producer named with its settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_burst_through_grpc_counts_every_item_once() -> Result<()> {
    let redis = RedisServer::start().await?;
    let (code, out, err) = run_chime(&[
        "bench",
        "burst",
        "--redis-url",
        &redis.url,
        "--items",
        "5000",
        "--workers",
        "1",
        "--producer",
        "grpc",
    ])?;
    ensure!(code == 0, "bench burst --producer grpc failed: {err}");
    let r = json(&out)?;
    ensure!(
        r["items"] == 5000 && r["lost"] == 0 && r["duplicates"] == 0 && r["early"] == 0,
        "{r}"
    );
    ensure!(
        r["producer"]
            .as_str()
            .is_some_and(|p| p.starts_with("grpc (chime.v1.Queue")),
        "{r}"
    );
    ensure!(r["enqueue_per_s"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    Ok(())
}

/// A short steady run: every item handled once, none early, and the rate the
/// producer reached printed with the settings the figures depend on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_steady_runs_and_counts_every_item_once() -> Result<()> {
    let redis = RedisServer::start().await?;
    let (code, out, err) = run_chime(&[
        "bench",
        "steady",
        "--redis-url",
        &redis.url,
        "--rate",
        "500",
        "--seconds",
        "2",
    ])?;
    ensure!(code == 0, "bench steady failed: {err}");
    let r = json(&out)?;
    ensure!(r["bench"] == "steady" && r["items"] == 1000, "{r}");
    ensure!(
        r["lost"] == 0 && r["duplicates"] == 0 && r["early"] == 0,
        "{r}"
    );
    ensure!(
        r["workers"] == 2 && r["delay_min_ms"] == 100 && r["delay_max_ms"] == 1000,
        "{r}"
    );
    for field in [
        "enqueued_per_s",
        "producer_behind_max_ms",
        "lag_p50_ms",
        "lag_p99_ms",
        "lag_p999_ms",
        "lag_max_ms",
        "redis_cpu_us_per_item",
    ] {
        ensure!(r[field].is_number(), "{field} missing: {r}");
    }
    Ok(())
}

/// A short cron run: every tick of every job in the window fired once and none
/// early, counted from the workers' records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_cron_runs_and_counts_every_tick() -> Result<()> {
    let redis = RedisServer::start().await?;
    let etcd = EtcdServer::start().await?;
    let (code, out, err) = run_chime(&[
        "bench",
        "cron",
        "--redis-url",
        &redis.url,
        "--etcd-endpoints",
        &etcd.endpoint,
        "--jobs",
        "20",
        "--workers",
        "2",
        "--seconds",
        "4",
    ])?;
    ensure!(code == 0, "bench cron failed: {err}");
    let r = json(&out)?;
    ensure!(r["bench"] == "cron" && r["jobs"] == 20, "{r}");
    ensure!(
        r["jobs_created_per_s"].as_f64().is_some_and(|x| x > 0.0),
        "{r}"
    );
    ensure!(
        r["expected"] == 80 && r["fires"] == 80,
        "every tick of the window fired: {r}"
    );
    ensure!(
        r["missed"] == 0 && r["duplicates"] == 0 && r["early"] == 0,
        "{r}"
    );
    for field in ["trigger_lag_p50_ms", "trigger_lag_p99_ms"] {
        ensure!(r[field].is_number(), "{field} missing: {r}");
    }
    Ok(())
}

/// A small rollout (`chime bench rolling`): two coordinators and two workers, each
/// restarted with SIGTERM in turn while jobs fire every second in two shards and
/// delayed items flow (200 a second).
/// Every shard of every tick and every item ran once, counted from the workers'
/// records; and the
/// leader's restart was a hand-over: no shard waited out the adoption grace (3
/// heartbeats + 2 s = 5 s here), which is what a new leader does after a crash.
/// (The 1 s bar of the benchmark itself is measured on a quiet machine, README.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_rolling_restarts_everything_and_every_shard_and_item_runs_once() -> Result<()> {
    let redis = RedisServer::start().await?;
    let etcd = EtcdServer::start().await?;
    let (code, out, err) = run_chime(&[
        "bench",
        "rolling",
        "--redis-url",
        &redis.url,
        "--etcd-endpoints",
        &etcd.endpoint,
        "--coordinators",
        "2",
        "--workers",
        "2",
        "--jobs",
        "5",
        "--down-ms",
        "500",
        "--settle-ms",
        "1500",
    ])?;
    ensure!(code == 0, "bench rolling failed: {err}");
    let r = json(&out)?;
    ensure!(r["bench"] == "rolling", "{r}");
    ensure!(
        r["missed"] == 0 && r["duplicates"] == 0 && r["skipped_reported"] == 0,
        "{r}"
    );
    let expected = r["shards_expected"].as_u64().unwrap_or(0);
    ensure!(expected >= 5 * 2 * 5 && r["ran"] == expected, "{r}");
    ensure!(
        r["worst_fire_lag_ms"].as_i64().is_some_and(|l| l < 5_000),
        "a shard waited out the adoption grace: {r}"
    );
    // Items flowed through every worker restart: each ran once, none early.
    ensure!(r["items"].as_u64().is_some_and(|n| n >= 1_000), "{r}");
    ensure!(
        r["items_lost"] == 0 && r["items_duplicates"] == 0 && r["items_early"] == 0,
        "{r}"
    );
    Ok(())
}

/// A one-minute fault soak (`chime bench chaos`) on its own Redis (AOF) and etcd:
/// faults back to back — every kind once (kills, SIGTERMs and freezes of workers and
/// coordinators, Redis and etcd restarts, a coordinator cut off from each store) —
/// while jobs fire every second and items flow; every invariant held, counted from
/// the handlers' records. A fixed seed, so a failure here replays with the same
/// faults (`--seed 7`).
#[test]
fn bench_chaos_one_minute_of_every_fault_keeps_every_invariant() -> Result<()> {
    let redis_server = find_binary("redis-server", "apt-get install redis-server")?;
    let etcd = find_binary("etcd", "apt-get install etcd-server")?;
    let (code, out, err) = run_chime(&[
        "bench",
        "chaos",
        "--minutes",
        "1",
        "--seed",
        "7",
        "--gap-ms",
        "1000",
        "--max-fault-ms",
        "6000",
        "--jobs",
        "10",
        "--redis-server",
        &redis_server.to_string_lossy(),
        "--etcd",
        &etcd.to_string_lossy(),
    ])?;
    ensure!(code == 0, "bench chaos failed: {err}");
    let r = json(&out)?;
    ensure!(r["bench"] == "chaos" && r["seed"] == 7, "{r}");
    ensure!(r["invariants_held"] == true, "{r}\n{err}");
    let faults = r["faults"].as_object().context("faults")?;
    ensure!(
        faults.len() == 11,
        "every kind of fault was injected at least once: {r}\n{err}"
    );
    ensure!(
        r["missed"] == 0 && r["duplicates"] == 0 && r["early"] == 0,
        "{r}"
    );
    ensure!(r["items_early"] == 0 && r["items_lost"] == 0, "{r}");
    ensure!(r["items"].as_u64().is_some_and(|n| n >= 5_000), "{r}");
    let expected = r["shards_expected"].as_u64().unwrap_or(0);
    ensure!(expected >= 10 * 2 * 50, "{r}");
    Ok(())
}
