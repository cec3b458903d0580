//! The console's activity history: the two history stores answer the same cases
//! (increments add up, gauges overwrite, old buckets expire, reads are bounded; Redis
//! standalone and Cluster), and a real run (a coordinator, a worker, items that
//! succeed and fail, a failing job) shows in `/api/history`. Real Redis, etcd and
//! chime processes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use chime_shared::activity::{
    BUCKET_MS, Delta, HistoryStore, KEEP_BUCKETS, KEEP_MS, MemoryHistory, RedisHistory, bucket_of,
};
use chime_shared::clock::{SystemClock, system_now_ms};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use chime_tests::{ADMIN_TOKEN, Cluster, RedisCluster, RedisServer, http, wait_until};
use serde_json::{Value, json};

fn delta(add: &[(&str, i64)], set: &[(&str, i64)]) -> Delta {
    Delta {
        add: add.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        set: set.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    }
}

/// The cases both stores pass: increments add across writes, gauges overwrite,
/// buckets past [`KEEP_MS`] are gone, a read returns only its range.
async fn history_cases(store: &dyn HistoryStore) -> Result<()> {
    let now = bucket_of(system_now_ms());
    let mut w = BTreeMap::new();
    w.insert(
        now,
        delta(&[("c|enq|default", 3)], &[("g|depth|default", 10)]),
    );
    w.insert(now - BUCKET_MS, delta(&[("c|enq|default", 1)], &[]));
    store.write(&w).await?;
    let mut w = BTreeMap::new();
    w.insert(
        now,
        delta(&[("c|enq|default", 4)], &[("g|depth|default", 7)]),
    );
    store.write(&w).await?;
    let got = store.read(now - BUCKET_MS, now + BUCKET_MS).await?;
    ensure!(got.len() == 2, "two buckets: {got:?}");
    ensure!(
        got[0].0 == now - BUCKET_MS && got[1].0 == now,
        "oldest first: {got:?}"
    );
    ensure!(got[1].1["c|enq|default"] == 7, "increments add: {got:?}");
    ensure!(
        got[1].1["g|depth|default"] == 7,
        "gauges overwrite: {got:?}"
    );
    let only = store.read(now, now + BUCKET_MS).await?;
    ensure!(
        only.len() == 1 && only[0].0 == now,
        "only the range: {only:?}"
    );

    // A bucket older than the history keeps is gone (written late, by a process
    // whose flush was held up).
    let old = now - KEEP_MS - BUCKET_MS;
    let mut w = BTreeMap::new();
    w.insert(old, delta(&[("c|enq|default", 5)], &[]));
    store.write(&w).await?;
    let got = store.read(old, old + BUCKET_MS).await?;
    ensure!(got.is_empty(), "expired: {got:?}");
    Ok(())
}

#[tokio::test]
async fn memory_history_passes_the_cases_and_stays_bounded() -> Result<()> {
    let store = MemoryHistory::new(Arc::new(SystemClock));
    history_cases(&store).await?;
    // Two hours of buckets: at most an hour (+ the open bucket) is kept.
    let now = bucket_of(system_now_ms());
    let w: BTreeMap<i64, Delta> = (0..720)
        .map(|i| (now - i * BUCKET_MS, delta(&[("c|fired|default", 1)], &[])))
        .collect();
    store.write(&w).await?;
    ensure!(
        store.len() <= KEEP_BUCKETS + 1,
        "{} buckets kept",
        store.len()
    );
    Ok(())
}

#[tokio::test]
async fn redis_history_passes_the_cases_and_expires_every_bucket() -> Result<()> {
    let redis = RedisServer::start().await?;
    let store = RedisHistory::new(redis.conn().await?, "chime");
    history_cases(&store).await?;
    // Every bucket key expires: Redis memory is bounded by an hour of buckets.
    let mut conn = redis.conn().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("{chime:hist}:*")
        .query_async(&mut conn)
        .await?;
    ensure!(keys.len() == 2, "keys: {keys:?}");
    for k in keys {
        let ttl: i64 = redis::cmd("PTTL").arg(&k).query_async(&mut conn).await?;
        ensure!(ttl > 0 && ttl <= KEEP_MS, "{k}: pttl {ttl}");
    }
    Ok(())
}

#[tokio::test]
async fn redis_cluster_history_passes_the_cases() -> Result<()> {
    // One hash tag for every bucket: one slot, so one pipeline reaches one master.
    let cluster = RedisCluster::start(3, 0).await?;
    let conn = RedisConn::connect(&RedisSpec::parse(&cluster.seeds)?).await?;
    history_cases(&RedisHistory::new(conn, "chime")).await
}

async fn history(api: &str, query: &str) -> Result<Value> {
    let (code, body) = http(
        "GET",
        &format!("{api}/api/history{query}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    ensure!(code == 200, "/api/history{query}: {code} {body}");
    Ok(body)
}

#[tokio::test]
async fn a_real_run_shows_in_the_history() -> Result<()> {
    let mut c = Cluster::start(0).await?;
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);
    let w = c.queue_worker("hw", &[], &[("CHIME_CONSUMER_RETRY_BASE_MS", "100")])?;
    c.workers.push(("hw".into(), w));
    c.wait_workers(1).await?;

    // 20 items that succeed, 3 that fail twice and die.
    let mut items: Vec<Value> = (0..20)
        .map(|i| json!({ "id": format!("ok{i}"), "handler": "noop" }))
        .collect();
    items.extend(
        (0..3).map(|i| json!({ "id": format!("bad{i}"), "handler": "fail", "max_attempts": 2 })),
    );
    let (code, body) = http(
        "POST",
        &format!("{api}/api/queues/items"),
        Some(ADMIN_TOKEN),
        Some(json!({ "items": items })),
    )
    .await?;
    ensure!(code == 200, "enqueue: {code} {body}");
    // A job whose shard always fails: fires and failed runs, counted by the leader.
    let job = json!({ "name": "broken", "group": "default", "handler": "fail",
                      "schedule": { "kind": "fixed_rate", "every_ms": 1000 } });
    let (code, body) = http(
        "POST",
        &format!("{api}/api/jobs"),
        Some(ADMIN_TOKEN),
        Some(job),
    )
    .await?;
    ensure!(code == 201, "create the job: {code} {body}");

    // The coordinator counted the enqueues, the worker the fires (26: 20 + 3 × 2),
    // acks and failures; the leader sampled depth and live workers. Closed buckets
    // only, flushed every 2 s: within about 12 s.
    let total = |h: &Value, k: &str| h["totals"][k].as_i64().unwrap_or(0);
    let last = std::sync::Mutex::new(Value::Null);
    let seen = wait_until("the run in /api/history", Duration::from_secs(45), || {
        let (api, last) = (&api, &last);
        async move {
            let Ok(h) = history(api, "?minutes=5").await else {
                return false;
            };
            let ok = total(&h, "enqueued") == 23
                && total(&h, "fired") == 26
                && total(&h, "acked") == 20
                && total(&h, "failed") == 6
                && total(&h, "job_fires") >= 1
                && total(&h, "runs_failed") >= 1
                && h["runs_failed_per_min"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|v| v.as_i64() > Some(0)))
                && h["workers"]
                    .as_array()
                    .is_some_and(|w| w.iter().any(|v| v == 1))
                && h["depth"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(Value::is_number))
                && h["lag_p99_ms"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(Value::is_number));
            *last.lock().unwrap_or_else(|e| e.into_inner()) = h;
            ok
        }
    })
    .await;
    let last = last.into_inner().unwrap_or_else(|e| e.into_inner());
    ensure!(seen.is_ok(), "{seen:?}; last answer: {last}");
    ensure!(
        last["t"].as_array().map(Vec::len) == Some(30),
        "5 minutes of 10-s buckets"
    );
    let per_s: f64 = last["fired_per_s"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_f64).sum())
        .unwrap_or(0.0);
    ensure!(
        (per_s * 10.0 - 26.0).abs() < 1e-6,
        "rates × 10 s = the fires: {per_s}"
    );

    // A bad parameter is a 400 naming it.
    let (code, body) = http(
        "GET",
        &format!("{api}/api/history?minutes=600"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    ensure!(
        code == 400 && body["error"]["field"] == "minutes",
        "{code} {body}"
    );
    Ok(())
}
