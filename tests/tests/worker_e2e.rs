//! End-to-end: real `redis-server`, real `chime worker` processes, real `chime queue`
//! commands. Items are counted by id through each worker's record file.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chime_shared::clock::system_now_ms;
use chime_shared::queue::{DelayStore, ItemRef, ItemState, NewItem};
use chime_tests::{RedisServer, TestDir, read_records, run_chime, spawn_worker, wait_until};

async fn left(store: &dyn DelayStore) -> Result<(u64, u64)> {
    let st = store.stats().await?;
    Ok((
        st.iter().map(|s| s.pending).sum(),
        st.iter().map(|s| s.in_flight).sum(),
    ))
}

/// Two workers drain items spread over time: each fires exactly once, never before
/// its due time, and soon after it.
#[tokio::test]
async fn workers_fire_each_item_once_on_time() -> Result<()> {
    let dir = TestDir::new("fire-once")?;
    let redis = RedisServer::start().await?;
    let store = redis.store("e2e", 8).await?;
    let now = store.now_ms().await?;
    let items: Vec<NewItem> = (0..2_000)
        .map(|i| {
            NewItem::new(format!("i{i}"), "noop", now + 1_500 + (i % 100) * 10).key(format!("u{i}"))
        })
        .collect();
    store.enqueue(items).await?;
    let (_w1, r1) = spawn_worker(
        dir.path(),
        "w1",
        &redis,
        "e2e",
        &["--handlers", "noop"],
        &[],
    )?;
    let (_w2, r2) = spawn_worker(
        dir.path(),
        "w2",
        &redis,
        "e2e",
        &["--handlers", "noop"],
        &[],
    )?;
    wait_until("all items handled", Duration::from_secs(30), || async {
        read_records(&r1).len() + read_records(&r2).len() >= 2_000
    })
    .await?;
    let mut recs = read_records(&r1);
    let from_w1 = recs.len();
    recs.extend(read_records(&r2));
    ensure!(
        from_w1 > 0 && from_w1 < recs.len(),
        "both workers should take part ({from_w1}/{})",
        recs.len()
    );
    let mut seen = HashSet::new();
    let mut lags = Vec::new();
    for r in &recs {
        ensure!(seen.insert(r.id.clone()), "{} handled twice", r.id);
        ensure!(
            r.handled_ms >= r.due_ms,
            "{} handled {} ms early",
            r.id,
            r.due_ms - r.handled_ms
        );
        lags.push(r.handled_ms - r.due_ms);
    }
    lags.sort_unstable();
    let p99 = lags[lags.len() * 99 / 100];
    ensure!(p99 < 1_000, "p99 lag {p99} ms");
    wait_until("store empty", Duration::from_secs(10), || async {
        left(&store).await.map(|l| l == (0, 0)).unwrap_or(false)
    })
    .await
}

/// `kill -9` of a worker holding items: nothing is lost, its in-flight items are
/// redelivered within the visibility timeout, and only they can be duplicated.
#[tokio::test]
async fn kill9_loses_nothing_and_redelivers_within_visibility() -> Result<()> {
    let dir = TestDir::new("kill9")?;
    let redis = RedisServer::start().await?;
    let store = redis.store("k9", 4).await?;
    let n = 400;
    let now = store.now_ms().await?;
    let items: Vec<NewItem> = (0..n)
        .map(|i| {
            NewItem::new(format!("k{i}"), "sleep", now)
                .key(format!("u{i}"))
                .payload("300")
        })
        .collect();
    store.enqueue(items).await?;
    let visibility = 2_000;
    let vis = visibility.to_string();
    // A queue lease a dies holding blocks that queue until the lease's TTL runs out
    // (default 5 s, longer than the visibility timeout under test): shorten it so the
    // bound below is the visibility timeout's, not the lease's.
    let lease_ttl = 1_000;
    let lease_env = [("CHIME_CONSUMER_LEASE_TTL_MS", "1000")];
    let (mut a, ra) = spawn_worker(
        dir.path(),
        "a",
        &redis,
        "k9",
        &[
            "--queues",
            "4",
            "--handlers",
            "sleep",
            "--max-in-flight",
            "40",
            "--visibility-ms",
            &vis,
        ],
        &lease_env,
    )?;
    // Killed while it holds a batch: its first batch is done and the next one is in
    // flight (checking only the records could land between the ack and the next pop,
    // when a holds nothing and the test proves nothing).
    wait_until(
        "worker a to handle some items and hold more",
        Duration::from_secs(20),
        || async {
            read_records(&ra).len() >= 40 && left(&store).await.map(|l| l.1 > 0).unwrap_or(false)
        },
    )
    .await?;
    a.kill9();
    let killed_at = system_now_ms();
    // What a held when it died: the in-flight sets. Members are `id \x01 seq \x01
    // attempt` (a delivery of its own) or `\x02 seq` (a pop's batch: `bat` holds its
    // ids, `bst` "count|left|bitmap" with a bit set per position that left it).
    let mut conn = redis.conn().await?;
    let mut held = HashSet::new();
    for q in 0..4 {
        let tag = format!("{{k9:default:{q}}}");
        let members: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg(format!("{tag}:run"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        for m in members {
            if let Some(seq) = m.strip_prefix(b"\x02") {
                let (ids, state): (Vec<u8>, Vec<u8>) = redis::pipe()
                    .cmd("HGET")
                    .arg(format!("{tag}:bat"))
                    .arg(seq)
                    .cmd("HGET")
                    .arg(format!("{tag}:bst"))
                    .arg(seq)
                    .query_async(&mut conn)
                    .await?;
                let bitmap = state.splitn(3, |&b| b == b'|').nth(2).unwrap_or_default();
                for (p, id) in ids.split(|&b| b == 1).enumerate() {
                    let gone = bitmap.get(p / 8).is_some_and(|b| b & (1 << (p % 8)) != 0);
                    if !gone {
                        held.insert(String::from_utf8(id.to_vec())?);
                    }
                }
            } else if let Some(id) = m.split(|&b| b == 1).next() {
                held.insert(String::from_utf8(id.to_vec())?);
            }
        }
    }
    ensure!(
        !held.is_empty() && held.len() <= 40,
        "a held {} items",
        held.len()
    );
    let (_b, rb) = spawn_worker(
        dir.path(),
        "b",
        &redis,
        "k9",
        &[
            "--queues",
            "4",
            "--handlers",
            "sleep",
            "--max-in-flight",
            "1000",
            "--visibility-ms",
            &vis,
        ],
        &lease_env,
    )?;
    wait_until("every item handled", Duration::from_secs(30), || async {
        let ids: HashSet<String> = read_records(&ra)
            .into_iter()
            .chain(read_records(&rb))
            .map(|r| r.id)
            .collect();
        ids.len() >= n as usize
    })
    .await?;
    let recs_a = read_records(&ra);
    let recs_b = read_records(&rb);
    let mut count: HashMap<&str, u32> = HashMap::new();
    for r in recs_a.iter().chain(&recs_b) {
        *count.entry(&r.id).or_default() += 1;
    }
    ensure!(
        count.len() == n as usize,
        "lost {} items",
        n as usize - count.len()
    );
    for (id, c) in &count {
        if *c > 1 {
            ensure!(held.contains(*id), "{id} duplicated but a did not hold it");
        }
    }
    for r in recs_b.iter().filter(|r| held.contains(&r.id)) {
        ensure!(
            r.attempt >= 2,
            "{} redelivered as attempt {}",
            r.id,
            r.attempt
        );
        // Redelivered within the visibility timeout (or the lease TTL, when a died
        // holding a queue's lease): the handler started by then (records hold the
        // start), give or take b's start, a consumer's idle look (≤ 1 s) and a
        // loaded machine.
        let started = r.handled_ms;
        let by = killed_at + visibility.max(lease_ttl) + 2_500;
        ensure!(
            started <= by,
            "{} redelivered {} ms after the kill",
            r.id,
            started - killed_at
        );
    }
    let b_ids: HashSet<&str> = recs_b.iter().map(|r| r.id.as_str()).collect();
    for id in &held {
        ensure!(
            b_ids.contains(id.as_str()),
            "held item {id} never redelivered"
        );
    }
    wait_until("store empty", Duration::from_secs(10), || async {
        left(&store).await.map(|l| l == (0, 0)).unwrap_or(false)
    })
    .await
}

/// SIGTERM: the worker stops claiming, finishes what it holds, releases its leases
/// and exits 0; what it had not popped stays pending.
#[tokio::test]
async fn sigterm_drains_in_flight_work() -> Result<()> {
    let dir = TestDir::new("drain")?;
    let redis = RedisServer::start().await?;
    let store = redis.store("dr", 2).await?;
    let now = store.now_ms().await?;
    let items: Vec<NewItem> = (0..50)
        .map(|i| NewItem::new(format!("d{i}"), "sleep", now).payload("700"))
        .collect();
    store.enqueue(items).await?;
    let (mut w, rec) = spawn_worker(
        dir.path(),
        "w",
        &redis,
        "dr",
        &[
            "--queues",
            "2",
            "--handlers",
            "sleep",
            "--max-in-flight",
            "10",
        ],
        &[],
    )?;
    wait_until("items in flight", Duration::from_secs(10), || async {
        left(&store).await.map(|l| l.1 > 0).unwrap_or(false)
    })
    .await?;
    let (_, in_flight) = left(&store).await?;
    w.signal("TERM")?;
    let code = w.wait_exit(Duration::from_secs(15)).await?;
    ensure!(code == Some(0), "exit code {code:?}; log:\n{}", w.log());
    let handled = read_records(&rec).len();
    ensure!(
        handled as u64 >= in_flight,
        "only {handled} of {in_flight} in-flight items finished"
    );
    let (pending, in_flight_after) = left(&store).await?;
    ensure!(
        in_flight_after == 0,
        "{in_flight_after} items left in flight"
    );
    ensure!(
        pending + handled as u64 == 50,
        "pending {pending} + handled {handled} != 50"
    );
    // Leases were released: both queues can be claimed at once.
    for q in 0..2 {
        ensure!(
            store.claim(q, 1_000).await?.is_some(),
            "lease on queue {q} still held"
        );
    }
    Ok(())
}

/// A drain that runs out of time hands running items back: pending again, due now,
/// the attempt not counted.
#[tokio::test]
async fn drain_timeout_hands_items_back() -> Result<()> {
    let dir = TestDir::new("handback")?;
    let redis = RedisServer::start().await?;
    let store = redis.store("hb", 1).await?;
    let now = store.now_ms().await?;
    store
        .enqueue(
            (0..3)
                .map(|i| NewItem::new(format!("h{i}"), "sleep", now).payload("60000"))
                .collect(),
        )
        .await?;
    let (mut w, rec) = spawn_worker(
        dir.path(),
        "w",
        &redis,
        "hb",
        &["--queues", "1", "--handlers", "sleep"],
        &[("CHIME_CONSUMER_DRAIN_TIMEOUT_MS", "300")],
    )?;
    wait_until("3 items in flight", Duration::from_secs(10), || async {
        left(&store).await.map(|l| l.1 == 3).unwrap_or(false)
    })
    .await?;
    w.signal("TERM")?;
    let code = w.wait_exit(Duration::from_secs(15)).await?;
    ensure!(code == Some(0), "exit code {code:?}; log:\n{}", w.log());
    ensure!(read_records(&rec).is_empty());
    ensure!(
        left(&store).await? == (3, 0),
        "items not handed back: {:?}",
        left(&store).await?
    );
    let v = store.get(&ItemRef::new("h0")).await?.context("h0")?;
    ensure!(
        v.item.attempt == 0,
        "hand-back counted an attempt: {}",
        v.item.attempt
    );
    Ok(())
}

/// An item for a handler no worker has waits (no attempt counted, shown by `chime
/// queue stats`); one whose handler keeps failing is retried with backoff, then
/// dead-lettered with the handler's error; the CLI lists and requeues it.
#[tokio::test]
async fn unknown_handler_waits_failing_handler_dead_letters_and_cli_requeues() -> Result<()> {
    let dir = TestDir::new("dead")?;
    let redis = RedisServer::start().await?;
    let store = redis.store("dl", 2).await?;
    let base = [
        "queue",
        "--redis-url",
        &redis.url,
        "--prefix",
        "dl",
        "--queues",
        "2",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        run_chime(&argv)
    };
    for (id, handler) in [("x1", "fail"), ("orphan", "nobody")] {
        let (code, out, err) = run(with(&[
            "enqueue",
            "--id",
            id,
            "--handler",
            handler,
            "--max-attempts",
            "2",
        ]))?;
        ensure!(code == 0, "enqueue failed: {err}");
        ensure!(out.contains("\"created\""), "{out}");
    }
    let (_w, _) = spawn_worker(
        dir.path(),
        "w",
        &redis,
        "dl",
        &["--queues", "2", "--handlers", "noop,fail"],
        &[("CHIME_CONSUMER_RETRY_BASE_MS", "50")],
    )?;
    wait_until("x1 dead-lettered", Duration::from_secs(15), || async {
        store
            .dead_letters(10)
            .await
            .map(|d| d.len() == 1)
            .unwrap_or(false)
    })
    .await?;
    // The orphan waits for a worker with its handler, charged nothing.
    wait_until("the orphan waiting", Duration::from_secs(15), || async {
        store.get(&ItemRef::new("orphan")).await.is_ok_and(|v| {
            v.is_some_and(|v| matches!(v.state, ItemState::Waiting { .. }) && v.item.attempt == 0)
        })
    })
    .await?;
    let (code, out, _) = run(with(&["stats"]))?;
    let stats: serde_json::Value = serde_json::from_str(out.trim())?;
    ensure!(
        code == 0 && stats["waiting"] == 1 && stats["waiting_by_handler"]["nobody"] == 1,
        "{stats}"
    );
    let (code, out, _) = run(with(&["dead-letter", "list"]))?;
    ensure!(code == 0);
    let list: serde_json::Value = serde_json::from_str(out.trim())?;
    let err_text = list[0]["last_error"].as_str().unwrap_or_default();
    ensure!(
        err_text.contains("failing on purpose"),
        "last_error: {err_text}"
    );
    ensure!(list[0]["item"]["attempt"] == 2, "{list}");
    let (code, out, _) = run(with(&["dead-letter", "requeue", "--id", "x1"]))?;
    ensure!(code == 0 && out.contains("\"requeued\":1"), "{out}");
    // Requeued: it runs through its attempts again and ends up dead again.
    wait_until("x1 retried again", Duration::from_secs(15), || async {
        store
            .dead_letters(10)
            .await
            .map(|d| d.len() == 1)
            .unwrap_or(false)
    })
    .await?;
    Ok(())
}

/// The queue CLI: enqueue (one and from a file), get, reschedule, cancel, stats; bad
/// input exits non-zero naming the field and stores nothing.
#[tokio::test]
async fn queue_cli_round_trip_and_bad_input() -> Result<()> {
    let dir = TestDir::new("cli")?;
    let redis = RedisServer::start().await?;
    let store = Arc::new(redis.store("cli", 8).await?);
    let run = |extra: &[&str]| {
        let mut args = vec!["queue", "--redis-url", &redis.url, "--prefix", "cli"];
        args.extend_from_slice(extra);
        run_chime(&args)
    };
    let (code, out, err) = run(&[
        "enqueue",
        "--id",
        "a",
        "--key",
        "user:1",
        "--handler",
        "log",
        "--in-ms",
        "60000",
        "--payload",
        "hi",
    ])?;
    ensure!(code == 0, "{err}");
    ensure!(out.contains("\"outcome\":\"created\""), "{out}");
    let (_, out, _) = run(&[
        "enqueue",
        "--id",
        "a",
        "--key",
        "user:1",
        "--handler",
        "log",
    ])?;
    ensure!(out.contains("\"outcome\":\"duplicate\""), "{out}");
    let (code, out, _) = run(&["get", "--id", "a", "--key", "user:1"])?;
    ensure!(
        code == 0 && out.contains("\"state\":\"pending\"") && out.contains("\"payload\":\"hi\""),
        "{out}"
    );
    let (_, out, _) = run(&[
        "reschedule",
        "--id",
        "a",
        "--key",
        "user:1",
        "--in-ms",
        "5000",
    ])?;
    ensure!(out.contains("\"outcome\":\"rescheduled\""), "{out}");
    let (_, out, _) = run(&["cancel", "--id", "a", "--key", "user:1"])?;
    ensure!(out.contains("\"outcome\":\"cancelled\""), "{out}");
    let (_, out, _) = run(&["cancel", "--id", "a", "--key", "user:1"])?;
    ensure!(out.contains("\"outcome\":\"not_found\""), "{out}");

    let file = dir.path().join("items.jsonl");
    let lines: Vec<String> = (0..250)
        .map(|i| format!(r#"{{"id":"f{i}","handler":"noop","in_ms":60000,"key":"u{i}"}}"#))
        .collect();
    std::fs::write(&file, lines.join("\n"))?;
    let (code, out, err) = run(&[
        "enqueue",
        "--file",
        &file.to_string_lossy(),
        "--chunk",
        "100",
    ])?;
    ensure!(code == 0, "{err}");
    ensure!(out.contains("\"created\":250"), "{out}");
    ensure!(
        err.contains("enqueued 200 items"),
        "no progress shown: {err}"
    );
    let (_, out, _) = run(&["stats"])?;
    let stats: serde_json::Value = serde_json::from_str(out.trim())?;
    ensure!(stats["pending"] == 250, "{stats}");

    // Bad input: a clear error naming the field; nothing stored.
    let big = "x".repeat(64 * 1024 + 1);
    let (code, _, err) = run(&[
        "enqueue",
        "--id",
        "big",
        "--handler",
        "log",
        "--payload",
        &big,
    ])?;
    ensure!(
        code != 0 && err.contains("invalid payload"),
        "code {code}: {err}"
    );
    let (code, _, err) = run(&["enqueue", "--id", "bad", "--handler", "has space"])?;
    ensure!(
        code != 0 && err.contains("invalid handler"),
        "code {code}: {err}"
    );
    std::fs::write(
        &file,
        "{\"id\":\"ok\",\"handler\":\"noop\"}\n{\"id\":\"\",\"handler\":\"noop\"}\n",
    )?;
    let (code, _, err) = run(&["enqueue", "--file", &file.to_string_lossy()])?;
    ensure!(
        code != 0 && err.contains("items[1].id"),
        "code {code}: {err}"
    );
    ensure!(
        store.get(&ItemRef::new("ok")).await?.is_none(),
        "half a bad batch was stored"
    );
    ensure!(store.get(&ItemRef::new("big")).await?.is_none());
    let (code, _, err) = run_chime(&["queue", "--redis-url", "http://nope", "stats"])?;
    ensure!(code != 0 && err.contains("redis_url"), "code {code}: {err}");
    Ok(())
}

/// A handler that runs longer than the visibility timeout is not redelivered: the
/// worker extends the deadline while it runs.
#[tokio::test]
async fn long_handler_is_extended_not_redelivered() -> Result<()> {
    let dir = TestDir::new("extend")?;
    let redis = RedisServer::start().await?;
    let store = redis.store("ex", 1).await?;
    let now = store.now_ms().await?;
    store
        .enqueue(vec![NewItem::new("long", "sleep", now).payload("2500")])
        .await?;
    let (_a, ra) = spawn_worker(
        dir.path(),
        "a",
        &redis,
        "ex",
        &[
            "--queues",
            "1",
            "--handlers",
            "sleep",
            "--visibility-ms",
            "600",
        ],
        &[],
    )?;
    let (_b, rb) = spawn_worker(
        dir.path(),
        "b",
        &redis,
        "ex",
        &[
            "--queues",
            "1",
            "--handlers",
            "sleep",
            "--visibility-ms",
            "600",
        ],
        &[],
    )?;
    wait_until("the long item handled", Duration::from_secs(15), || async {
        read_records(&ra).len() + read_records(&rb).len() >= 1
    })
    .await?;
    // A wrongful redelivery would keep the item in the store until its second run
    // finished (the first ack would be stale), so wait for the store to empty.
    wait_until("store empty", Duration::from_secs(5), || async {
        left(&store).await.map(|l| l == (0, 0)).unwrap_or(false)
    })
    .await?;
    let recs: Vec<_> = read_records(&ra)
        .into_iter()
        .chain(read_records(&rb))
        .collect();
    ensure!(recs.len() == 1, "handled {} times: {recs:?}", recs.len());
    ensure!(recs[0].attempt == 1, "attempt {}", recs[0].attempt);
    Ok(())
}

/// An idle worker hears of an item enqueued after its last look: with its idle
/// sleep capped at 60 s (the most it may be), an item due 300 ms after it is enqueued still runs
/// (within the test's 20 s deadline), because the store announced that the queue's
/// earliest due time moved earlier. Without the announcement it would wait out the
/// sleep.
#[tokio::test]
async fn an_idle_worker_runs_a_new_item_without_waiting_for_its_next_look() -> Result<()> {
    let dir = TestDir::new("wake")?;
    let redis = RedisServer::start().await?;
    let store = redis.store("wk", 1).await?;
    let (_w, rec) = spawn_worker(
        dir.path(),
        "w",
        &redis,
        "wk",
        &["--queues", "1", "--handlers", "sleep"],
        &[("CHIME_CONSUMER_IDLE_SLEEP_MAX_MS", "60000")],
    )?;
    // A first item, run: the worker has looked at the (then empty) queue and sleeps.
    let now = store.now_ms().await?;
    store
        .enqueue(vec![NewItem::new("first", "sleep", now).payload("1")])
        .await?;
    wait_until("the first item to run", Duration::from_secs(20), || async {
        read_records(&rec).iter().any(|r| r.id == "first")
            && left(&store).await.map(|l| l == (0, 0)).unwrap_or(false)
    })
    .await?;
    let due = store.now_ms().await? + 300;
    store
        .enqueue(vec![NewItem::new("second", "sleep", due).payload("1")])
        .await?;
    wait_until(
        "the second item to run",
        Duration::from_secs(20),
        || async { read_records(&rec).iter().any(|r| r.id == "second") },
    )
    .await?;
    let r = read_records(&rec)
        .into_iter()
        .find(|r| r.id == "second")
        .context("second")?;
    ensure!(r.handled_ms >= due, "ran {} ms early", due - r.handled_ms);
    Ok(())
}
