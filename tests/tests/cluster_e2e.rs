//! chime on a Redis Cluster and an etcd cluster: the live resize keeps its
//! guarantees with queues on different masters, and a master killed under load is
//! replaced by its replica while chime keeps running. What the failover costs (items
//! acknowledged by the dead master but not yet replicated, items delivered twice) is
//! measured and printed, because Redis replication is asynchronous: it is a property
//! of Redis, stated in README.md, not something chime can hide.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, NewItem, QueueLayout};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use chime_tests::{
    EtcdCluster, RedisCluster, TestDir, read_records, run_chime, spawn_worker_at, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_on_a_redis_cluster_and_an_etcd_cluster() -> Result<()> {
    let redis = RedisCluster::start(3, 0).await?;
    let etcd = EtcdCluster::start(3).await?;
    let (code, out, err) = run_chime(&[
        "bench",
        "resize",
        "--redis-url",
        &redis.seeds,
        "--etcd-endpoints",
        &etcd.endpoints,
        "--items",
        "100000",
        "--workers",
        "3",
        "--counts",
        "8,3,16,8",
        "--seconds",
        "20",
    ])?;
    ensure!(code == 0, "bench failed: {err}");
    let r: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("output {out:?}"))?;
    eprintln!("resize on the cluster: {r}");
    ensure!(r["items"] == 100_000 && r["resizes"] == 3, "{r}");
    ensure!(
        r["lost"] == 0 && r["duplicates"] == 0 && r["early"] == 0,
        "{r}"
    );
    ensure!(r["apply_missing"] == 0, "{r}");
    ensure!(r["resize_complete"] == true, "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_under_load_fails_over_and_chime_keeps_running() -> Result<()> {
    let mut redis = RedisCluster::start(3, 1).await?;
    let dir = TestDir::new("failover")?;
    let spec = RedisSpec::parse(&redis.seeds)?;
    let store: Arc<dyn DelayStore> = Arc::new(
        RedisStore::open(
            RedisConn::connect(&spec).await?,
            QueueLayout::new("fo", "default", 8)?,
        )
        .await?,
    );
    let mut workers = Vec::new();
    for w in ["fw1", "fw2"] {
        let extra = [
            "--queues",
            "8",
            "--handlers",
            "noop",
            "--visibility-ms",
            "5000",
        ];
        workers.push(spawn_worker_at(
            dir.path(),
            w,
            &redis.seeds,
            "fo",
            &extra,
            &[],
        )?);
    }

    // A producer enqueues 200 items every 50 ms, due half a second later, for 24 s;
    // a master dies at 8 s. Ids are kept by outcome: acknowledged, or failed (the
    // write may or may not have happened).
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    let (mut killed_at, mut back_at) = (None, None);
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(24) {
        if killed_at.is_none() && started.elapsed() > Duration::from_secs(8) {
            let masters = redis.masters().await?;
            let victim = *masters.first().context("no master")?;
            redis.kill(victim);
            killed_at = Some(started.elapsed());
        }
        let now = store.now_ms().await.unwrap_or(0);
        let batch: Vec<NewItem> = (0..200)
            .map(|i| NewItem::new(format!("f{}", n + i), "noop", now + 500))
            .collect();
        let ids: Vec<String> = batch.iter().map(|b| b.id.clone()).collect();
        n += 200;
        match tokio::time::timeout(Duration::from_secs(3), store.enqueue(batch)).await {
            Ok(Ok(_)) => {
                if killed_at.is_some() && back_at.is_none() {
                    back_at = Some(started.elapsed());
                }
                acked.push((started.elapsed(), ids));
            }
            _ => failed.extend(ids),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed_at = killed_at.context("never killed a master")?;
    let back_at = back_at.context("the cluster never took writes again")?;
    // Every surviving node agrees the cluster is whole again (gossip can lag the
    // first write the new master takes by seconds on a loaded machine).
    redis.wait_ok(Duration::from_secs(60)).await?;

    // Everything acknowledged after the failover must fire; wait for it.
    let records: Vec<_> = workers.iter().map(|(_, r)| r.clone()).collect();
    let after: HashSet<String> = acked
        .iter()
        .filter(|(t, _)| *t > back_at + Duration::from_secs(1))
        .flat_map(|(_, ids)| ids.iter().cloned())
        .collect();
    ensure!(
        after.len() > 10_000,
        "too few writes after the failover: {}",
        after.len()
    );
    let handled = |records: &[std::path::PathBuf]| -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for f in records {
            for r in read_records(f) {
                *m.entry(r.id).or_insert(0) += 1;
            }
        }
        m
    };
    wait_until(
        "every item written after the failover fires",
        Duration::from_secs(60),
        || {
            let records = records.clone();
            let after = after.clone();
            async move {
                let h = handled(&records);
                after.iter().all(|id| h.contains_key(id))
            }
        },
    )
    .await?;
    // Let redeliveries of the failover window (visibility 5 s) happen before counting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let h = handled(&records);
    let acked_ids: Vec<&String> = acked.iter().flat_map(|(_, ids)| ids.iter()).collect();
    let lost = acked_ids.iter().filter(|id| !h.contains_key(**id)).count();
    let duplicated = h.values().filter(|c| **c > 1).count();
    let failed_but_fired = failed.iter().filter(|id| h.contains_key(*id)).count();
    let summary = serde_json::json!({
        "acknowledged": acked_ids.len(),
        "failed_writes": failed.len(),
        "failed_writes_that_fired": failed_but_fired,
        "lost_acknowledged": lost,
        "duplicated": duplicated,
        "killed_at_s": killed_at.as_secs_f64(),
        "writes_again_after_s": (back_at - killed_at).as_secs_f64(),
    });
    eprintln!("master failover: {summary}");
    // chime kept running: both workers alive and still firing.
    for (p, _) in workers.iter_mut() {
        ensure!(p.is_running(), "a worker died in the failover");
    }
    // What replication lag can lose is bounded by the window around the kill.
    ensure!(
        (lost as f64) < acked_ids.len() as f64 * 0.05,
        "lost {lost} of {} acknowledged items: {summary}",
        acked_ids.len()
    );
    Ok(())
}
