//! The coordinator end to end: a real `chime coordinator`, real `chime worker`
//! processes, real etcd and Redis. Shards are counted through the workers' record
//! file; runs through the admin API.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chime_tests::{Cluster, wait_until};
use serde_json::Value;

fn job(c: &Cluster, args: &[&str]) -> Result<Value> {
    let mut all = vec!["job", "create"];
    all.extend_from_slice(args);
    c.admin(&all)
}

fn run(c: &Cluster, id: &str) -> Result<Value> {
    c.admin(&["runs", "get", id])
}

async fn wait_run_state(c: &Cluster, id: &str, state: &str) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(
        &format!("run {id} {state}"),
        Duration::from_secs(20),
        || {
            let r = run(c, id);
            let ok = r.as_ref().map(|v| v["state"] == state).unwrap_or(false);
            if let Ok(v) = r {
                last = v;
            }
            async move { ok }
        },
    )
    .await
    .with_context(|| format!("last seen: {last}"))?;
    Ok(last)
}

/// The shard records of `job`, by run.
fn runs_of(c: &Cluster, job: &str) -> BTreeMap<String, Vec<chime_tests::JobRecord>> {
    let mut by_run: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for r in c.records_of(job) {
        by_run.entry(r.run_id.clone()).or_default().push(r);
    }
    by_run
}

fn trigger(c: &Cluster, name: &str, params: &str) -> Result<String> {
    let r = c.admin(&["job", "trigger", name, "--params", params])?;
    Ok(r["run_id"].as_str().context("run_id")?.to_owned())
}

/// A broadcast job every second for 30 s on 4 workers: every tick gives each
/// worker exactly one shard with indexes 0..3. A worker killed mid-run has its shard
/// finished by another within 10 s; later ticks use the 3 live workers (auto
/// shards), or keep 4 stable shards over 3 workers (fixed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_every_second_with_worker_failover() -> Result<()> {
    let mut c = Cluster::start(4).await?;
    job(
        &c,
        &[
            "--name",
            "tick",
            "--handler",
            "sleep",
            "--cron",
            "* * * * * *",
            "--routing",
            "sharding-broadcast",
            "--params",
            "200",
        ],
    )?;
    job(
        &c,
        &[
            "--name",
            "fixed",
            "--handler",
            "sleep",
            "--cron",
            "* * * * * *",
            "--routing",
            "sharding-broadcast",
            "--shards",
            "4",
            "--params",
            "100",
        ],
    )?;
    job(
        &c,
        &[
            "--name",
            "long",
            "--handler",
            "sleep",
            "--manual",
            "--routing",
            "sharding-broadcast",
            "--params",
            "4000",
        ],
    )?;
    // Enough ticks on 4 workers before the kill (a wait on the records, not a window).
    wait_until("14 ticks on 4 workers", Duration::from_secs(40), || {
        let full = runs_of(&c, "tick")
            .values()
            .filter(|r| r.len() == 4 && r[0].total == 4)
            .count();
        async move { full >= 14 }
    })
    .await?;
    // Kill w3 in the middle of a long run.
    let long = trigger(&c, "long", "")?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let killed_at = chime_shared::clock::system_now_ms();
    c.worker("w3").context("w3")?.kill9();
    let done = wait_run_state(&c, &long, "succeeded").await?;
    let shards = done["shards"].as_array().context("shards")?;
    ensure!(shards.len() == 4, "{done}");
    let taken: Vec<&Value> = shards
        .iter()
        .filter(|s| s["attempt"].as_u64() > Some(1))
        .collect();
    ensure!(taken.len() == 1, "exactly w3's shard is taken over: {done}");
    ensure!(taken[0]["worker_id"] != "w3");
    let finished = taken[0]["finished_at_ms"].as_i64().unwrap_or(i64::MAX);
    ensure!(
        finished - killed_at <= 10_000 + 4_000,
        "taken-over shard finished {} ms after the kill",
        finished - killed_at
    );
    // Enough complete ticks of both jobs well after the kill, then pause both and
    // wait for every run after the kill to finish (its records all in).
    wait_until(
        "6 ticks of each job after the kill",
        Duration::from_secs(40),
        || {
            let n = |name: &str| {
                runs_of(&c, name)
                    .values()
                    .filter(|r| {
                        r[0].scheduled_ms > killed_at + 8_000 && r.len() as u32 == r[0].total
                    })
                    .count()
            };
            let enough = n("tick") >= 8 && n("fixed") >= 8;
            async move { enough }
        },
    )
    .await?;
    c.admin(&["job", "pause", "tick"])?;
    c.admin(&["job", "pause", "fixed"])?;
    wait_until(
        "runs after the kill to finish",
        Duration::from_secs(10),
        || {
            let done = ["tick", "fixed"].iter().all(|name| {
                runs_of(&c, name)
                    .values()
                    .filter(|r| r[0].scheduled_ms > killed_at + 8_000)
                    .all(|r| r.len() as u32 == r[0].total)
            });
            async move { done }
        },
    )
    .await?;

    // Every tick of `tick`: before the kill 4 shards 0..3 on 4 distinct workers;
    // after it, 3 shards on the 3 live workers.
    let mut by_run: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for r in c.records_of("tick") {
        by_run.entry(r.run_id.clone()).or_default().push(r);
    }
    ensure!(by_run.len() >= 28, "only {} ticks recorded", by_run.len());
    let mut before = 0;
    let mut after = 0;
    for (id, recs) in &by_run {
        let sched = recs[0].scheduled_ms;
        let total = recs[0].total;
        let idx: BTreeSet<u32> = recs.iter().map(|r| r.shard).collect();
        let workers: BTreeSet<&str> = recs.iter().map(|r| r.worker.as_str()).collect();
        ensure!(recs.iter().all(|r| r.total == total), "{id}: mixed totals");
        if sched < killed_at - 1_500 {
            ensure!(total == 4 && recs.len() == 4, "{id}: {recs:?}");
            ensure!(
                idx == (0..4).collect() && workers.len() == 4,
                "{id}: {recs:?}"
            );
            before += 1;
        } else if sched > killed_at + 8_000 {
            ensure!(
                total == 3 && recs.len() == 3 && idx == (0..3).collect(),
                "{id}: {recs:?}"
            );
            ensure!(
                !workers.contains("w3") && workers.len() == 3,
                "{id}: {recs:?}"
            );
            after += 1;
        }
    }
    ensure!(before >= 10 && after >= 5, "before {before}, after {after}");
    // `fixed` keeps 4 shards with stable indexes over 3 workers after the kill.
    let mut fixed: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for r in c.records_of("fixed") {
        fixed.entry(r.run_id.clone()).or_default().push(r);
    }
    let late: Vec<_> = fixed
        .values()
        .filter(|r| r[0].scheduled_ms > killed_at + 8_000)
        .collect();
    ensure!(late.len() >= 5);
    for recs in late {
        let idx: BTreeSet<u32> = recs.iter().map(|r| r.shard).collect();
        ensure!(
            idx == (0..4).collect() && recs.len() == 4 && recs.iter().all(|r| r.total == 4),
            "{recs:?}"
        );
        ensure!(recs.iter().all(|r| r.worker != "w3"));
    }
    // No tick fired twice: every (run, shard) of `tick` and `fixed` has one record
    // (a shard taken over from the killed worker ran only where it was taken).
    let mut executions: BTreeMap<(String, u32), usize> = BTreeMap::new();
    for r in c
        .records_of("tick")
        .into_iter()
        .chain(c.records_of("fixed"))
    {
        *executions.entry((r.run_id, r.shard)).or_default() += 1;
    }
    let twice: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(twice.is_empty(), "executed more than once: {twice:?}");
    Ok(())
}

async fn settle(c: &Cluster, name: &str, n: usize) -> Result<()> {
    wait_until(
        &format!("{n} shards of {name}"),
        Duration::from_secs(20),
        || async { c.records_of(name).len() >= n },
    )
    .await
}

/// Every routing strategy picks the workers it promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_strategies() -> Result<()> {
    let mut c = Cluster::start(3).await?;
    let workers_of = |c: &Cluster, name: &str| -> Vec<String> {
        let mut recs = c.records_of(name);
        recs.sort_by_key(|r| r.started_ms);
        recs.into_iter().map(|r| r.worker).collect()
    };
    let fire = |c: &Cluster, name: &str, n: usize, params: &str| -> Result<Vec<String>> {
        (0..n).map(|_| trigger(c, name, params)).collect()
    };
    for (name, routing) in [
        ("rr", "round-robin"),
        ("rand", "random"),
        ("hash", "consistent-hash"),
        ("lru", "least-recently-used"),
        ("first", "first"),
        ("last", "last"),
        ("failover", "failover"),
        ("busy", "busy-over"),
        ("load", "least-loaded"),
    ] {
        let handler = if name == "busy" || name == "load" {
            "sleep"
        } else {
            "noop"
        };
        job(
            &c,
            &[
                "--name",
                name,
                "--handler",
                handler,
                "--manual",
                "--routing",
                routing,
                "--hash-param",
                if name == "hash" { "user" } else { "" },
            ],
        )?;
    }
    // Round robin: each worker in turn.
    for _ in 0..6 {
        trigger(&c, "rr", "")?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle(&c, "rr", 6).await?;
    let rr = workers_of(&c, "rr");
    ensure!(
        rr[0..3].iter().collect::<BTreeSet<_>>().len() == 3 && rr[0..3] == rr[3..6],
        "{rr:?}"
    );
    // Random: every worker shows up in 30 fires.
    fire(&c, "rand", 30, "")?;
    settle(&c, "rand", 30).await?;
    ensure!(workers_of(&c, "rand").iter().collect::<BTreeSet<_>>().len() == 3);
    // Consistent hash: one key always lands on one worker; keys spread.
    fire(&c, "hash", 5, r#"{"user":"u1"}"#)?;
    settle(&c, "hash", 5).await?;
    let h = workers_of(&c, "hash");
    ensure!(h.iter().collect::<BTreeSet<_>>().len() == 1, "{h:?}");
    for i in 0..20 {
        trigger(&c, "hash", &format!(r#"{{"user":"k{i}"}}"#))?;
    }
    settle(&c, "hash", 25).await?;
    ensure!(workers_of(&c, "hash").iter().collect::<BTreeSet<_>>().len() >= 2);
    // Least recently used: three fires, three different workers.
    for _ in 0..3 {
        trigger(&c, "lru", "")?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle(&c, "lru", 3).await?;
    ensure!(workers_of(&c, "lru").iter().collect::<BTreeSet<_>>().len() == 3);
    // First and last by id.
    fire(&c, "first", 3, "")?;
    fire(&c, "last", 3, "")?;
    settle(&c, "first", 3).await?;
    settle(&c, "last", 3).await?;
    ensure!(workers_of(&c, "first").iter().all(|w| w == "w1"));
    ensure!(workers_of(&c, "last").iter().all(|w| w == "w3"));
    // Busy-over: three long runs at once go to three workers.
    fire(&c, "busy", 3, "1500")?;
    settle(&c, "busy", 3).await?;
    ensure!(workers_of(&c, "busy").iter().collect::<BTreeSet<_>>().len() == 3);
    // Least loaded: while w1 and w2 each run a long shard, the next goes to w3.
    trigger(&c, "load", "3000")?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    trigger(&c, "load", "3000")?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    trigger(&c, "load", "10")?;
    settle(&c, "load", 3).await?;
    let quick = c
        .records_of("load")
        .into_iter()
        .find(|r| r.finished_ms - r.started_ms < 1_000)
        .context("quick run")?;
    let busy: BTreeSet<String> = c
        .records_of("load")
        .into_iter()
        .filter(|r| r.finished_ms - r.started_ms >= 1_000)
        .map(|r| r.worker)
        .collect();
    ensure!(
        !busy.contains(&quick.worker),
        "least loaded picked a busy worker: {quick:?} vs {busy:?}"
    );
    // Failover: always the first live worker; when it dies, the next one.
    fire(&c, "failover", 2, "")?;
    settle(&c, "failover", 2).await?;
    ensure!(workers_of(&c, "failover").iter().all(|w| w == "w1"));
    c.worker("w1").context("w1")?.kill9();
    c.wait_workers(2).await?;
    fire(&c, "failover", 2, "")?;
    settle(&c, "failover", 4).await?;
    ensure!(workers_of(&c, "failover")[2..].iter().all(|w| w == "w2"));
    Ok(())
}

/// Overlap policies when the previous run is still going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_policies() -> Result<()> {
    let c = Cluster::start(2).await?;
    for (name, overlap) in [
        ("allow", "allow"),
        ("skip", "skip"),
        ("buffer", "buffer-one"),
        ("cover", "cancel-running"),
    ] {
        job(
            &c,
            &[
                "--name",
                name,
                "--handler",
                "sleep",
                "--cron",
                "* * * * * *",
                "--overlap",
                overlap,
                "--params",
                "2500",
            ],
        )?;
    }
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    for n in ["allow", "skip", "buffer", "cover"] {
        c.admin(&["job", "pause", n])?;
    }
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    // A tick prepared ahead (recorded before its instant) whose job was paused
    // before the instant ends skipped as such; at most one per job, at the pause.
    let runs = |name: &str| -> Result<Vec<Value>> {
        let v = c.admin(&["runs", "--job", name, "--limit", "50"])?;
        let mut runs = v.as_array().cloned().unwrap_or_default();
        runs.sort_by_key(|r| r["scheduled_at_ms"].as_i64());
        let at_pause = |r: &Value| {
            r["note"]
                .as_str()
                .is_some_and(|n| n.contains("paused before the fire went out"))
        };
        ensure!(
            runs.iter().filter(|r| at_pause(r)).count() <= 1,
            "{name}: more than one fire dropped at the pause: {runs:?}"
        );
        runs.retain(|r| !at_pause(r));
        Ok(runs)
    };
    let states = |rs: &[Value]| -> Vec<String> {
        rs.iter()
            .map(|r| r["state"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    // Allow: overlapping runs, all succeed.
    let allow = runs("allow")?;
    ensure!(
        allow.len() >= 5 && allow.iter().all(|r| r["state"] == "succeeded"),
        "{:?}",
        states(&allow)
    );
    let concurrent = allow
        .windows(2)
        .any(|w| w[1]["fired_at_ms"].as_i64() < w[0]["finished_at_ms"].as_i64());
    ensure!(concurrent, "allow never overlapped");
    // Skip: fires during a run are skipped.
    let skip = runs("skip")?;
    ensure!(
        skip.iter().filter(|r| r["state"] == "skipped").count() >= 2,
        "{:?}",
        states(&skip)
    );
    ensure!(
        skip.iter().filter(|r| r["state"] == "succeeded").count() >= 2,
        "{:?}",
        states(&skip)
    );
    for r in skip.iter().filter(|r| r["state"] == "skipped") {
        ensure!(
            r["note"].as_str().unwrap_or("").contains("still going"),
            "{r}"
        );
    }
    // Buffer one: runs never overlap; one waiting fire runs when the current ends.
    let buffer = runs("buffer")?;
    let ran: Vec<&Value> = buffer
        .iter()
        .filter(|r| r["state"] == "succeeded")
        .collect();
    ensure!(
        ran.iter().any(|r| r["cause"] == "buffered"),
        "{:?}",
        states(&buffer)
    );
    let mut spans: Vec<(i64, i64)> = ran
        .iter()
        .map(|r| {
            (
                r["fired_at_ms"].as_i64().unwrap_or(0),
                r["finished_at_ms"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    spans.sort();
    ensure!(
        spans.windows(2).all(|w| w[1].0 >= w[0].1),
        "buffered runs overlapped: {spans:?}"
    );
    ensure!(
        buffer.iter().any(|r| r["state"] == "skipped"),
        "extra fires were not skipped: {:?}",
        states(&buffer)
    );
    // Cancel running: each new fire covers the previous run.
    let cover = runs("cover")?;
    let cancelled: Vec<&Value> = cover.iter().filter(|r| r["state"] == "cancelled").collect();
    ensure!(cancelled.len() >= 3, "{:?}", states(&cover));
    ensure!(
        cancelled
            .iter()
            .all(|r| r["note"].as_str().unwrap_or("").contains("covered by")),
        "{cancelled:?}"
    );
    ensure!(
        c.records_of("cover")
            .iter()
            .any(|r| r.status == "cancelled"),
        "workers never saw the cancel"
    );
    Ok(())
}

/// Timeout (the handler is cancelled), retries with backoff on another worker,
/// child jobs on success, and kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_retries_children_and_kill() -> Result<()> {
    let c = Cluster::start(2).await?;
    job(
        &c,
        &[
            "--name",
            "slow",
            "--handler",
            "sleep",
            "--manual",
            "--timeout-ms",
            "500",
            "--params",
            "5000",
        ],
    )?;
    job(
        &c,
        &[
            "--name",
            "flaky",
            "--handler",
            "fail",
            "--manual",
            "--retries",
            "3",
            "--retry-backoff-ms",
            "100",
            "--params",
            r#"{"fail_attempts":2}"#,
        ],
    )?;
    job(&c, &["--name", "child", "--handler", "log", "--manual"])?;
    job(
        &c,
        &[
            "--name",
            "parent",
            "--handler",
            "noop",
            "--manual",
            "--children",
            "child",
        ],
    )?;
    job(
        &c,
        &[
            "--name",
            "hang",
            "--handler",
            "sleep",
            "--manual",
            "--params",
            "30000",
        ],
    )?;
    job(
        &c,
        &[
            "--name",
            "doomed",
            "--handler",
            "fail",
            "--manual",
            "--retries",
            "1",
            "--retry-backoff-ms",
            "50",
        ],
    )?;

    let slow = trigger(&c, "slow", "")?;
    let r = wait_run_state(&c, &slow, "timed_out").await?;
    ensure!(r["shards"][0]["error"] == "timed out", "{r}");
    wait_until(
        "the worker to stop the slow shard",
        Duration::from_secs(10),
        || async {
            c.records_of("slow")
                .iter()
                .any(|r| r.status == "cancelled" && r.finished_ms - r.started_ms < 3_000)
        },
    )
    .await?;

    let flaky = trigger(&c, "flaky", "")?;
    let r = wait_run_state(&c, &flaky, "succeeded").await?;
    ensure!(r["shards"][0]["attempt"] == 3, "{r}");
    let recs = c.records_of("flaky");
    ensure!(
        recs.len() == 3 && recs.iter().filter(|r| r.status == "failed").count() == 2,
        "{recs:?}"
    );
    let mut by_attempt = recs.clone();
    by_attempt.sort_by_key(|r| r.attempt);
    ensure!(
        by_attempt[0].worker != by_attempt[1].worker,
        "retry did not prefer another worker: {recs:?}"
    );
    ensure!(
        by_attempt[1].started_ms - by_attempt[0].finished_ms >= 90,
        "no backoff: {recs:?}"
    );

    let doomed = trigger(&c, "doomed", "")?;
    let r = wait_run_state(&c, &doomed, "failed").await?;
    ensure!(r["shards"][0]["attempt"] == 2, "{r}");

    let parent = trigger(&c, "parent", "")?;
    wait_run_state(&c, &parent, "succeeded").await?;
    let mut child_run = Value::Null;
    wait_until("the child run", Duration::from_secs(10), || {
        let v = c.admin(&["runs", "--job", "child"]).ok();
        let found = v
            .as_ref()
            .and_then(|v| v.as_array())
            .and_then(|a| a.first().cloned());
        if let Some(f) = &found {
            child_run = f.clone();
        }
        async move { found.is_some() }
    })
    .await?;
    ensure!(
        child_run["parent_run_id"] == parent.as_str() && child_run["cause"] == "child",
        "{child_run}"
    );

    let hang = trigger(&c, "hang", "")?;
    wait_run_state(&c, &hang, "running").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = c.admin(&["runs", "kill", &hang])?;
    ensure!(
        killed["state"] == "cancelled" && killed["note"] == "killed",
        "{killed}"
    );
    wait_until(
        "the worker to stop the killed shard",
        Duration::from_secs(10),
        || async { c.records_of("hang").iter().any(|r| r.status == "cancelled") },
    )
    .await?;
    Ok(())
}

/// Ticks missed while no coordinator ran are handled by each job's misfire policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_policies_after_a_coordinator_outage() -> Result<()> {
    let mut c = Cluster::start(1).await?;
    for (name, misfire) in [
        ("m-skip", "skip"),
        ("m-once", "fire-once"),
        ("m-all", "fire-all"),
    ] {
        job(
            &c,
            &[
                "--name",
                name,
                "--handler",
                "noop",
                "--cron",
                "* * * * * *",
                "--misfire",
                misfire,
                "--catch-up-window-ms",
                "60000",
            ],
        )?;
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    c.kill_coordinator();
    let down = chime_shared::clock::system_now_ms();
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    // Ticks before the restart began were certainly missed.
    let up = chime_shared::clock::system_now_ms();
    c.restart_coordinator(2)?;
    c.wait_workers(1).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for n in ["m-skip", "m-once", "m-all"] {
        c.admin(&["job", "pause", n])?;
    }
    let runs = |name: &str| -> Result<Vec<Value>> {
        Ok(c.admin(&["runs", "--job", name, "--limit", "100"])?
            .as_array()
            .cloned()
            .unwrap_or_default())
    };
    let missed = |rs: &[Value]| -> Vec<Value> {
        rs.iter()
            .filter(|r| {
                r["scheduled_at_ms"]
                    .as_i64()
                    .is_some_and(|t| t > down + 1_000 && t < up - 1_000)
            })
            .cloned()
            .collect()
    };
    // Skip: the missed ticks are reported as skipped, none fired.
    let s = missed(&runs("m-skip")?);
    ensure!(
        s.len() >= 2 && s.iter().all(|r| r["state"] == "skipped"),
        "{s:?}"
    );
    // Fire once: one misfire run for the latest missed tick; the rest skipped.
    let o = runs("m-once")?;
    let fired: Vec<&Value> = o
        .iter()
        .filter(|r| r["cause"] == "misfire" && r["state"] != "skipped")
        .collect();
    ensure!(
        fired.len() == 1 && fired[0]["state"] == "succeeded",
        "{o:?}"
    );
    ensure!(
        missed(&o)
            .iter()
            .filter(|r| r["state"] == "skipped")
            .count()
            >= 1
    );
    // Fire all: every missed tick fired.
    let a = runs("m-all")?;
    let fired = a
        .iter()
        .filter(|r| r["cause"] == "misfire" && r["state"] == "succeeded")
        .count();
    ensure!(fired >= 3, "fire-all fired {fired}: {a:?}");
    ensure!(missed(&a).iter().all(|r| r["state"] == "succeeded"));
    // No tick fired twice anywhere.
    for n in ["m-skip", "m-once", "m-all"] {
        let rs = runs(n)?;
        let ids: BTreeSet<&str> = rs.iter().filter_map(|r| r["fire_id"].as_str()).collect();
        ensure!(ids.len() == rs.len(), "{n}: duplicate fire ids");
        let shards = c.records_of(n);
        let runs_seen: BTreeSet<&str> = shards.iter().map(|r| r.run_id.as_str()).collect();
        ensure!(runs_seen.len() == shards.len(), "{n}: a run executed twice");
    }
    Ok(())
}

/// Schedules other than cron, pause/resume, and bad input naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_pause_and_bad_input() -> Result<()> {
    let c = Cluster::start(1).await?;
    let now = chime_shared::clock::system_now_ms();
    job(
        &c,
        &["--name", "rate", "--handler", "noop", "--every-ms", "300"],
    )?;
    job(
        &c,
        &[
            "--name",
            "delay",
            "--handler",
            "sleep",
            "--delay-ms",
            "200",
            "--params",
            "300",
        ],
    )?;
    job(
        &c,
        &[
            "--name",
            "once",
            "--handler",
            "noop",
            "--at-ms",
            &(now + 1_000).to_string(),
        ],
    )?;
    job(
        &c,
        &[
            "--name",
            "zone",
            "--handler",
            "noop",
            "--cron",
            "* * * * * *",
            "--tz",
            "America/New_York",
        ],
    )?;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let rate = c.records_of("rate");
    ensure!(
        (7..=12).contains(&rate.len()),
        "fixed rate 300 ms fired {} times in 3 s",
        rate.len()
    );
    let mut d = c.records_of("delay");
    d.sort_by_key(|r| r.started_ms);
    ensure!(d.len() >= 3);
    for w in d.windows(2) {
        ensure!(
            w[1].started_ms - w[0].finished_ms >= 180,
            "fixed delay not respected: {d:?}"
        );
    }
    let once = c.records_of("once");
    ensure!(
        once.len() == 1 && once[0].scheduled_ms == now + 1_000,
        "{once:?}"
    );
    ensure!(c.records_of("zone").len() >= 2);
    // Pause stops firing; resume fires again.
    c.admin(&["job", "pause", "rate"])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = c.records_of("rate").len();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    ensure!(c.records_of("rate").len() == n, "a paused job fired");
    c.admin(&["job", "resume", "rate"])?;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    ensure!(c.records_of("rate").len() > n, "a resumed job did not fire");
    // Bad input: refused naming the field, nothing stored.
    for (args, field) in [
        (
            vec![
                "--name",
                "bad1",
                "--handler",
                "noop",
                "--cron",
                "61 * * * * *",
            ],
            "schedule.expr",
        ),
        (
            vec![
                "--name",
                "bad2",
                "--handler",
                "noop",
                "--cron",
                "* * * * *",
                "--tz",
                "Mars/Base",
            ],
            "schedule.time_zone",
        ),
        (
            vec!["--name", "bad name", "--handler", "noop", "--manual"],
            "name",
        ),
        (
            vec!["--name", "bad3", "--handler", "noop", "--every-ms", "1"],
            "schedule.every_ms",
        ),
        (
            vec![
                "--name",
                "bad4",
                "--handler",
                "noop",
                "--manual",
                "--routing",
                "round-robin",
                "--shards",
                "3",
            ],
            "shard_count",
        ),
    ] {
        let e = job(&c, &args).expect_err("bad job accepted").to_string();
        ensure!(e.contains(&format!("invalid {field}")), "{field}: {e}");
    }
    let all = c.admin(&["job", "list"])?;
    ensure!(all.as_array().map_or(0, Vec::len) == 4, "{all}");
    let e = job(&c, &["--name", "rate", "--handler", "noop", "--manual"])
        .expect_err("duplicate")
        .to_string();
    ensure!(e.contains("already exists"), "{e}");
    Ok(())
}

/// A worker frozen (SIGSTOP) for longer than three heartbeats while shards are sent
/// to it is taken for dead, and its shards run on the other worker; thawed, it reads
/// the assignments that waited in its socket and must start none of them (found by
/// `chime bench chaos --seed 2`: each such shard ran twice). Every (run, shard) of
/// the job runs exactly once, and the thawed worker is back to work afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thawed_worker_starts_no_shard_the_coordinator_gave_to_another() -> Result<()> {
    let mut c = Cluster::start(2).await?;
    job(
        &c,
        &[
            "--name",
            "tick",
            "--handler",
            "noop",
            "--cron",
            "* * * * * *",
            "--routing",
            "sharding-broadcast",
            "--shards",
            "2",
        ],
    )?;
    let both = |c: &Cluster| {
        runs_of(c, "tick")
            .values()
            .filter(|r| r.iter().any(|s| s.worker == "w2"))
            .count()
    };
    wait_until(
        "3 ticks with a shard on w2",
        Duration::from_secs(20),
        || {
            let n = both(&c);
            async move { n >= 3 }
        },
    )
    .await?;
    // Heartbeats every 500 ms: w2 is taken for dead 1.5 s into the freeze, after
    // at least one tick was sent to it; 4 s frozen sends it more.
    let frozen_at = chime_shared::clock::system_now_ms();
    c.worker("w2").context("w2")?.signal("STOP")?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    c.worker("w2").context("w2")?.signal("CONT")?;
    let thawed_at = chime_shared::clock::system_now_ms();
    wait_until(
        "w2 runs shards again after the thaw",
        Duration::from_secs(20),
        || {
            let n = c
                .records_of("tick")
                .iter()
                .filter(|r| r.worker == "w2" && r.scheduled_ms > thawed_at + 1_000)
                .count();
            async move { n >= 2 }
        },
    )
    .await?;
    c.admin(&["job", "pause", "tick"])?;
    let records = c.records_of("tick");
    let mut seen: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
    for r in &records {
        seen.entry((r.run_id.clone(), r.shard))
            .or_default()
            .push(format!("{}#{}@{}", r.worker, r.attempt, r.started_ms));
    }
    let twice: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    ensure!(twice.is_empty(), "shards that ran twice: {twice:?}");
    // The shards sent to w2 while it was frozen ran on w1, as later attempts.
    ensure!(
        records.iter().any(|r| r.worker == "w1"
            && r.attempt > 1
            && r.scheduled_ms >= frozen_at - 1_000
            && r.scheduled_ms <= thawed_at),
        "a shard of the freeze was taken over by w1: {records:?}"
    );
    // w2's log says why it dropped the session.
    let log = c.worker("w2").context("w2")?.log();
    ensure!(
        log.contains("could not heartbeat for three intervals"),
        "{log}"
    );
    Ok(())
}
