//! Live resize and live rate limits with real etcd, real Redis and real `chime`
//! worker processes.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chime_shared::queue::{DelayStore, NewItem};
use chime_tests::{
    EtcdServer, RedisServer, TestDir, read_records, run_chime, spawn_worker, wait_until,
};

/// 200,000 items enqueued continuously with due times spread over the run while the
/// count changes 8 → 3 → 16 → 1 → 8 in etcd under 3 workers: every item exactly once,
/// none early, every process applying each change within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_under_load_loses_and_doubles_nothing() -> Result<()> {
    let redis = RedisServer::start().await?;
    let etcd = EtcdServer::start().await?;
    let (code, out, err) = run_chime(&[
        "bench",
        "resize",
        "--redis-url",
        &redis.url,
        "--etcd-endpoints",
        &etcd.endpoint,
        "--items",
        "200000",
        "--workers",
        "3",
        "--counts",
        "8,3,16,1,8",
        "--seconds",
        "25",
    ])?;
    ensure!(code == 0, "bench failed: {err}");
    let r: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("output {out:?}"))?;
    ensure!(r["items"] == 200_000 && r["resizes"] == 4, "{r}");
    ensure!(
        r["lost"] == 0 && r["duplicates"] == 0 && r["early"] == 0,
        "{r}"
    );
    ensure!(
        r["apply_missing"] == 0,
        "a process never applied a change: {r}"
    );
    ensure!(
        r["apply_p99_ms"].as_i64().unwrap_or(i64::MAX) <= 1_000,
        "{r}"
    );
    ensure!(
        r["resize_complete"] == true,
        "old layouts never retired: {r}"
    );
    Ok(())
}

/// An operator's `etcdctl put` resizes running workers; a bad value is refused by
/// each worker (logged with its key) and changes nothing.
#[tokio::test]
async fn etcdctl_put_resizes_running_workers_and_bad_values_change_nothing() -> Result<()> {
    let dir = TestDir::new("etcdctl")?;
    let redis = RedisServer::start().await?;
    let etcd = EtcdServer::start().await?;
    let store = redis.store("ec", 4).await?;
    let now = store.now_ms().await?;
    let items: Vec<NewItem> = (0..3_000)
        .map(|i| NewItem::new(format!("e{i}"), "noop", now + 2_500 + i % 500).key(format!("u{i}")))
        .collect();
    store.enqueue(items).await?;
    let flags = [
        "--queues",
        "4",
        "--handlers",
        "noop",
        "--etcd-endpoints",
        &etcd.endpoint,
    ];
    let (w1, r1) = spawn_worker(dir.path(), "w1", &redis, "ec", &flags, &[])?;
    let (w2, r2) = spawn_worker(dir.path(), "w2", &redis, "ec", &flags, &[])?;
    wait_until("workers up", Duration::from_secs(20), || async {
        w1.log().contains("worker consuming") && w2.log().contains("worker consuming")
    })
    .await?;
    etcd.etcdctl_put("/chime/queues/default/count", "11")?;
    wait_until("the layout to change", Duration::from_secs(10), || async {
        store
            .refresh_layout()
            .await
            .map(|l| l.count == 11)
            .unwrap_or(false)
    })
    .await?;
    for bad in ["0", "-1", "abc", "99999999999"] {
        etcd.etcdctl_put("/chime/queues/default/count", bad)?;
    }
    wait_until(
        "both workers to refuse the bad values",
        Duration::from_secs(10),
        || async {
            [&w1, &w2].iter().all(|w| {
                w.log().matches("config value refused").count() >= 4
                    && w.log().contains("key=\"queues/default/count\"")
            })
        },
    )
    .await?;
    ensure!(
        store.refresh_layout().await?.count == 11,
        "a bad value changed the layout"
    );
    wait_until("every item", Duration::from_secs(30), || async {
        read_records(&r1).len() + read_records(&r2).len() >= 3_000
    })
    .await?;
    let mut ids: Vec<String> = read_records(&r1)
        .into_iter()
        .chain(read_records(&r2))
        .map(|r| r.id)
        .collect();
    ids.sort();
    ids.dedup();
    ensure!(ids.len() == 3_000, "{} distinct of 3000", ids.len());
    Ok(())
}

/// Items handled per second in the steady middle of a run.
fn steady_rate(records: &[chime_tests::Record], prefix: &str, from_ms: i64, secs: i64) -> f64 {
    records
        .iter()
        .filter(|r| {
            r.id.starts_with(prefix)
                && r.handled_ms >= from_ms
                && r.handled_ms < from_ms + secs * 1_000
        })
        .count() as f64
        / secs as f64
}

/// A 1,000 items/s limit set in etcd holds across 3 workers within ±10 % over 10 s.
#[tokio::test]
async fn rate_limit_holds_across_three_workers() -> Result<()> {
    let dir = TestDir::new("rate")?;
    let redis = RedisServer::start().await?;
    let etcd = EtcdServer::start().await?;
    etcd.etcdctl_put("/chime/handlers/noop/rate_per_s", "1000")?;
    let store = redis.store("rt", 8).await?;
    let flags = ["--handlers", "noop", "--etcd-endpoints", &etcd.endpoint];
    let mut recs = Vec::new();
    let mut procs = Vec::new();
    for name in ["a", "b", "c"] {
        let (p, r) = spawn_worker(dir.path(), name, &redis, "rt", &flags, &[])?;
        procs.push(p);
        recs.push(r);
    }
    let now = store.now_ms().await?;
    let items: Vec<NewItem> = (0..14_000)
        .map(|i| NewItem::new(format!("n{i}"), "noop", now + 1_000).key(format!("u{i}")))
        .collect();
    store.enqueue(items).await?;
    wait_until("13,000 items handled", Duration::from_secs(40), || async {
        recs.iter().map(|r| read_records(r).len()).sum::<usize>() >= 13_000
    })
    .await?;
    let all: Vec<_> = recs.iter().flat_map(|r| read_records(r)).collect();
    let start = all.iter().map(|r| r.handled_ms).min().unwrap_or(0);
    let rate = steady_rate(&all, "n", start + 1_000, 10);
    ensure!(
        (900.0..=1_100.0).contains(&rate),
        "rate {rate}/s with a 1000/s limit"
    );
    let per_worker: Vec<usize> = recs.iter().map(|r| read_records(r).len()).collect();
    ensure!(
        per_worker.iter().all(|n| *n > 1_000),
        "a worker sat idle: {per_worker:?}"
    );
    Ok(())
}

/// Two handlers in one budget each get half of it.
#[tokio::test]
async fn two_handlers_in_one_budget_each_get_half() -> Result<()> {
    let dir = TestDir::new("budget")?;
    let redis = RedisServer::start().await?;
    let etcd = EtcdServer::start().await?;
    etcd.etcdctl_put("/chime/budgets/push/rate_per_s", "600")?;
    etcd.etcdctl_put("/chime/handlers/noop/budget", "push")?;
    etcd.etcdctl_put("/chime/handlers/sleep/budget", "push")?;
    let store = redis.store("bg", 8).await?;
    let flags = [
        "--handlers",
        "noop,sleep",
        "--etcd-endpoints",
        &etcd.endpoint,
    ];
    let (_a, ra) = spawn_worker(dir.path(), "a", &redis, "bg", &flags, &[])?;
    let (_b, rb) = spawn_worker(dir.path(), "b", &redis, "bg", &flags, &[])?;
    let now = store.now_ms().await?;
    let mut items: Vec<NewItem> = (0..3_000)
        .map(|i| NewItem::new(format!("n{i}"), "noop", now + 1_000).key(format!("n{i}")))
        .collect();
    items.extend((0..3_000).map(|i| {
        NewItem::new(format!("s{i}"), "sleep", now + 1_000)
            .key(format!("s{i}"))
            .payload("0")
    }));
    store.enqueue(items).await?;
    wait_until("3,600 items handled", Duration::from_secs(30), || async {
        read_records(&ra).len() + read_records(&rb).len() >= 3_600
    })
    .await?;
    let all: Vec<_> = read_records(&ra)
        .into_iter()
        .chain(read_records(&rb))
        .collect();
    let start = all.iter().map(|r| r.handled_ms).min().unwrap_or(0);
    let (n, s) = (
        steady_rate(&all, "n", start + 1_000, 4),
        steady_rate(&all, "s", start + 1_000, 4),
    );
    ensure!(
        (540.0..=660.0).contains(&(n + s)),
        "budget 600/s, got {n} + {s}"
    );
    ensure!(
        (n / (n + s) - 0.5).abs() < 0.1,
        "unequal split: noop {n}/s, sleep {s}/s"
    );
    Ok(())
}

/// Growing N spreads a backlog due an hour from now over the new queues long before
/// it falls due, then retires the old layout.
#[tokio::test]
async fn growing_spreads_a_far_future_backlog() -> Result<()> {
    let dir = TestDir::new("spread")?;
    let redis = RedisServer::start().await?;
    let etcd = EtcdServer::start().await?;
    let store = redis.store("sp", 2).await?;
    let now = store.now_ms().await?;
    let items: Vec<NewItem> = (0..20_000)
        .map(|i| NewItem::new(format!("f{i}"), "noop", now + 3_600_000).key(format!("u{i}")))
        .collect();
    store.enqueue(items).await?;
    let flags = [
        "--queues",
        "2",
        "--handlers",
        "noop",
        "--etcd-endpoints",
        &etcd.endpoint,
    ];
    let (_a, _) = spawn_worker(dir.path(), "a", &redis, "sp", &flags, &[])?;
    let (_b, _) = spawn_worker(dir.path(), "b", &redis, "sp", &flags, &[])?;
    etcd.etcdctl_put("/chime/queues/default/count", "8")?;
    wait_until(
        "the resize to complete",
        Duration::from_secs(60),
        || async {
            store
                .refresh_layout()
                .await
                .map(|l| l.count == 8 && !l.in_transition())
                .unwrap_or(false)
        },
    )
    .await?;
    let stats = store.stats().await?;
    ensure!(stats.len() == 8);
    let total: u64 = stats.iter().map(|s| s.pending).sum();
    ensure!(total == 20_000, "{total} pending of 20000: {stats:?}");
    for s in &stats {
        ensure!(
            (1_800..=3_200).contains(&s.pending),
            "queue {} holds {}",
            s.queue,
            s.pending
        );
        ensure!(s.moving == 0 && s.in_flight == 0);
    }
    Ok(())
}
