//! The SDK conformance suite (`sdk/conformance/README.md`): every scenario runs once
//! per SDK against real Redis, etcd, coordinators and a `chime worker` serving the
//! delivery service, with the SDK's agent as a separate process. A scenario reads
//! only what the agent recorded, the run history and the queue.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chime_shared::queue::{CancelOutcome, ItemRef, NewItem};
use chime_tests::sdk::{Role, Sdk, SdkEnv};
use chime_tests::wait_until;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

// The fault proxy of `chime bench chaos`, the same file: it stalls one agent's
// session stream (`job_stalled_stream`).
#[allow(dead_code, reason = "the suite cuts one direction only")]
#[path = "../../cli/src/bench/proxy.rs"]
mod proxy;

fn job(e: &SdkEnv, args: &[&str]) -> Result<Value> {
    let mut all = vec!["job", "create", "--group", "conformance", "--manual"];
    all.extend_from_slice(args);
    e.cluster.admin(&all)
}

fn trigger(e: &SdkEnv, name: &str, params: &str) -> Result<String> {
    let r = e
        .cluster
        .admin(&["job", "trigger", name, "--params", params])?;
    Ok(r["run_id"].as_str().context("run_id")?.to_owned())
}

/// Waits until run `id` is in `state`, asking any live coordinator.
async fn run_in(e: &SdkEnv, id: &str, state: &str) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(&format!("run {id} {state}"), LONG, || {
        let mut found = None;
        for (port, p) in &e.cluster.coords {
            if p.is_some()
                && let Ok(v) = e
                    .cluster
                    .admin_at(&format!("http://127.0.0.1:{port}"), &["runs", "get", id])
            {
                found = Some(v);
                break;
            }
        }
        let ok = found.as_ref().is_some_and(|v| v["state"] == state);
        if let Some(v) = found {
            last = v;
        }
        async move { ok }
    })
    .await
    .with_context(|| format!("last seen: {last}"))?;
    Ok(last)
}

async fn wait_records(e: &SdkEnv, what: &str, kind: &str, n: usize) -> Result<Vec<Value>> {
    wait_until(what, LONG, || async { e.all(kind).len() >= n })
        .await
        .with_context(|| format!("records: {:?}", e.all(kind)))?;
    Ok(e.all(kind))
}

async fn enqueue(e: &SdkEnv, items: Vec<NewItem>) -> Result<()> {
    e.store.enqueue(items).await?;
    Ok(())
}

/// Item ids an `item` record with outcome `ack` names, with how often.
fn acked(e: &SdkEnv) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in e.all("item") {
        if r["outcome"] == "ack" {
            for id in r["ids"].as_array().into_iter().flatten() {
                *out.entry(id.as_str().unwrap_or_default().to_owned())
                    .or_insert(0) += 1;
            }
        }
    }
    out
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Two agents; a sharding-broadcast job of 4 shards: each index once, output and log
/// line from the handler, the run succeeded.
async fn job_shards(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Jobs, &[])?;
    e.agent("a2", Role::Jobs, &[])?;
    e.cluster.wait_workers(2).await?;
    job(
        &e,
        &[
            "--name",
            "j",
            "--handler",
            "conf.shard",
            "--routing",
            "sharding-broadcast",
            "--shards",
            "4",
        ],
    )?;
    let id = trigger(&e, "j", "{\"p\":1}")?;
    let run = run_in(&e, &id, "succeeded").await?;
    let shards: Vec<Value> = e
        .all("shard")
        .into_iter()
        .filter(|r| r["run_id"] == id.as_str())
        .collect();
    let idx: Vec<u64> = shards
        .iter()
        .filter_map(|r| r["shard_index"].as_u64())
        .collect();
    ensure!(
        idx.iter().copied().collect::<BTreeSet<_>>() == BTreeSet::from([0, 1, 2, 3])
            && idx.len() == 4,
        "shards {shards:?}"
    );
    ensure!(
        shards
            .iter()
            .all(|r| r["shard_total"] == 4 && r["params"] == "{\"p\":1}"),
        "{shards:?}"
    );
    let workers: BTreeSet<&str> = shards
        .iter()
        .filter_map(|r| r["worker_id"].as_str())
        .collect();
    ensure!(
        workers.len() == 2,
        "both agents should run shards: {workers:?}"
    );
    for s in run["shards"].as_array().context("shards")? {
        let want = format!("shard {}/4", s["index"]);
        ensure!(s["output"] == want.as_str(), "output of {s}");
        ensure!(
            s["log_tail"]
                .as_array()
                .is_some_and(|l| l.iter().any(|x| x == want.as_str())),
            "log line of {s}"
        );
    }
    Ok(())
}

/// A running shard killed through the admin API sees its cancellation.
async fn job_kill(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Jobs, &[])?;
    e.cluster.wait_workers(1).await?;
    job(&e, &["--name", "b", "--handler", "conf.block"])?;
    let id = trigger(&e, "b", "")?;
    wait_records(&e, "the block to start", "block_start", 1).await?;
    e.cluster.admin(&["runs", "kill", &id])?;
    wait_records(&e, "the handler to see the kill", "cancelled", 1).await?;
    run_in(&e, &id, "cancelled").await?;
    ensure!(e.all("block_done").is_empty());
    Ok(())
}

/// A shard over its timeout is cancelled on the agent and the run times out.
async fn job_timeout(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Jobs, &[])?;
    e.cluster.wait_workers(1).await?;
    job(
        &e,
        &[
            "--name",
            "t",
            "--handler",
            "conf.block",
            "--timeout-ms",
            "1000",
        ],
    )?;
    let id = trigger(&e, "t", "")?;
    wait_records(&e, "the handler to see the timeout", "cancelled", 1).await?;
    run_in(&e, &id, "timed_out").await?;
    Ok(())
}

/// The leader is killed while a shard runs: the agent follows the new leader and
/// the run succeeds with the shard run once.
async fn job_leader_killed(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 2).await?;
    e.agent("a1", Role::Jobs, &[])?;
    e.cluster.wait_workers(1).await?;
    job(&e, &["--name", "l", "--handler", "conf.block"])?;
    let id = trigger(&e, "l", "{\"ms\":4000}")?;
    wait_records(&e, "the block to start", "block_start", 1).await?;
    let leader = e.cluster.leader_index().context("no leader")?;
    e.cluster.kill_coordinator_at(leader);
    let run = run_in(&e, &id, "succeeded").await?;
    let done = e.all("block_done");
    ensure!(
        done.len() == 1 && done[0]["run_id"] == id.as_str(),
        "{done:?}"
    );
    ensure!(
        e.all("block_start").len() == 1,
        "the shard ran twice: {:?}",
        e.all("block_start")
    );
    ensure!(run["shards"][0]["output"] == "done", "{run}");
    Ok(())
}

/// An agent frozen (SIGSTOP) past three heartbeats while shards are sent to it is
/// taken for dead and its shards run on the other agent; thawed, it starts none of
/// the shards that waited in its socket, and runs shards again afterwards. Every
/// (run, shard) of a job firing every second runs once (found by `chime bench
/// chaos`).
async fn job_frozen_worker(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Jobs, &[])?;
    e.agent("a2", Role::Jobs, &[])?;
    e.cluster.wait_workers(2).await?;
    every_second_in_two_shards(&e, "f", "a2").await?;
    // Heartbeats every 500 ms: a2 is taken for dead 1.5 s into the freeze.
    e.agent_proc("a2")?.signal("STOP")?;
    let frozen = chime_shared::clock::system_now_ms();
    tokio::time::sleep(Duration::from_secs(4)).await;
    e.agent_proc("a2")?.signal("CONT")?;
    let thawed = chime_shared::clock::system_now_ms();
    wait_until("a2 runs shards again after the thaw", LONG, || {
        let n = shards_on_after(&e, "a2", thawed + 1_000);
        async move { n >= 2 }
    })
    .await?;
    e.cluster.admin(&["job", "pause", "f"])?;
    // A shard a2 had already started when it froze (fired at or before the freeze)
    // may run again on a1: the coordinator takes a silent worker's running shards as
    // lost (at-least-once, README's fault table). What the fence rules out is a2
    // starting a shard it reads after the freeze: no shard fired later runs twice.
    let twice: Vec<_> = ran_twice(&e)
        .into_iter()
        .filter(|((run, _), _)| instant_of(run).is_none_or(|at| at > frozen))
        .collect();
    ensure!(
        twice.is_empty(),
        "shards fired after the freeze ({frozen}) that ran twice: {twice:?}"
    );
    Ok(())
}

/// The scheduled instant in a run id (`<job>@<instant ms>`).
fn instant_of(run_id: &str) -> Option<i64> {
    run_id.rsplit('@').next()?.parse().ok()
}

/// Creates job `name`: `conf.shard` every second in 2 shards (sharding broadcast);
/// returns once agent `agent` ran 2 of them.
async fn every_second_in_two_shards(e: &SdkEnv, name: &str, agent: &str) -> Result<()> {
    e.cluster.admin(&[
        "job",
        "create",
        "--group",
        "conformance",
        "--name",
        name,
        "--handler",
        "conf.shard",
        "--cron",
        "* * * * * *",
        "--routing",
        "sharding-broadcast",
        "--shards",
        "2",
    ])?;
    wait_until(&format!("2 shards on {agent}"), LONG, || {
        let n = shards_on_after(e, agent, 0);
        async move { n >= 2 }
    })
    .await
}

/// Shards agent `agent` ran of fires scheduled after `after` (Unix ms; run ids are
/// `<job>@<instant>`).
fn shards_on_after(e: &SdkEnv, agent: &str, after: i64) -> usize {
    e.all("shard")
        .iter()
        .filter(|r| r["worker_id"] == agent)
        .filter_map(|r| instant_of(r["run_id"].as_str()?))
        .filter(|t| *t > after)
        .count()
}

/// (run, shard) pairs of the `shard` records that ran more than once.
fn ran_twice(e: &SdkEnv) -> Vec<((String, u64), usize)> {
    let mut seen: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for r in e.all("shard") {
        if let (Some(id), Some(i)) = (r["run_id"].as_str(), r["shard_index"].as_u64()) {
            *seen.entry((id.to_owned(), i)).or_default() += 1;
        }
    }
    seen.into_iter().filter(|(_, n)| *n > 1).collect()
}

/// An agent whose session stream stalls one way (the coordinator's messages held
/// by a partition for 2.5 s; its heartbeats still arrive, leaving out the shards
/// it never read): the coordinator takes those shards as lost and runs them on the
/// other agent; when the held `Assign`s arrive, past their `start_by_session_ms`,
/// the agent starts none of them. Every (run, shard) of a job firing every second
/// runs once.
async fn job_stalled_stream(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    let leader: std::net::SocketAddr = e
        .cluster
        .coordinator
        .trim_start_matches("http://")
        .parse()
        .context("coordinator address")?;
    let proxy = proxy::FaultProxy::start(leader).await?;
    e.agent("a1", Role::Jobs, &[])?;
    e.job_agent_at("a2", &format!("http://127.0.0.1:{}", proxy.port))?;
    e.cluster.wait_workers(2).await?;
    every_second_in_two_shards(&e, "s", "a2").await?;
    // Heartbeats every 500 ms: a shard sent during the stall is taken as lost about
    // a second after it was sent. 2.5 s: under the 3 s HTTP/2 keep-alive timeout,
    // so the connection itself survives the stall.
    proxy.cut_to_client();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    proxy.heal();
    let healed = chime_shared::clock::system_now_ms();
    wait_until("a2 runs shards again after the stall", LONG, || {
        let n = shards_on_after(&e, "a2", healed + 1_000);
        async move { n >= 2 }
    })
    .await?;
    e.cluster.admin(&["job", "pause", "s"])?;
    let twice = ran_twice(&e);
    ensure!(twice.is_empty(), "shards that ran twice: {twice:?}");
    Ok(())
}

/// SIGTERM while a shard runs: the shard finishes and reports, the agent exits 0.
async fn job_drain(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Jobs, &[])?;
    e.cluster.wait_workers(1).await?;
    job(&e, &["--name", "d", "--handler", "conf.block"])?;
    let id = trigger(&e, "d", "{\"ms\":2000}")?;
    wait_records(&e, "the block to start", "block_start", 1).await?;
    e.agent_proc("a1")?.signal("TERM")?;
    let code = e.agent_proc("a1")?.wait_exit(LONG).await?;
    ensure!(code == Some(0), "agent exited {code:?}");
    ensure!(e.all("block_done").len() == 1 && e.all("drained").len() == 1);
    run_in(&e, &id, "succeeded").await?;
    Ok(())
}

/// 300 items (a third due in a second): each handled once, at its first attempt,
/// never before due; the queues end empty.
async fn item_ack(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Items, &[])?;
    let now = e.store.now_ms().await?;
    let items: Vec<NewItem> = (0..300)
        .map(|i| {
            let due = if i % 3 == 0 { now + 1_000 } else { now };
            NewItem::new(format!("i{i}"), "conf.item", due)
                .key(format!("user-{i}"))
                .payload(format!("p{i}"))
        })
        .collect();
    let due: BTreeMap<String, i64> = items.iter().map(|i| (i.id.clone(), i.due_at_ms)).collect();
    enqueue(&e, items).await?;
    wait_until("300 items acked", LONG, || async { acked(&e).len() == 300 }).await?;
    let a = acked(&e);
    ensure!(a.values().all(|n| *n == 1), "handled twice: {a:?}");
    for r in e.all("item") {
        let at = r["at_ms"].as_i64().unwrap_or(0);
        for (k, id) in strs(&r["ids"]).iter().enumerate() {
            ensure!(
                at >= due[id],
                "{id} handled at {at}, before its due time {}",
                due[id]
            );
            ensure!(r["attempts"][k] == 1, "{r}");
            ensure!(r["payloads"][k] == format!("p{}", &id[1..]).as_str(), "{r}");
        }
    }
    wait_until("the queues to empty", LONG, || async {
        e.store
            .stats()
            .await
            .is_ok_and(|s| s.iter().all(|q| q.pending + q.in_flight == 0))
    })
    .await?;
    Ok(())
}

/// A failing handler asking for a retry after 300 ms: attempts 1 and 2 at least
/// 300 ms apart, then a dead letter carrying the handler's error.
async fn item_retry_dead(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Items, &[])?;
    let now = e.store.now_ms().await?;
    enqueue(
        &e,
        vec![
            NewItem::new("f", "conf.item", now)
                .payload("fail-after:300")
                .max_attempts(2),
        ],
    )
    .await?;
    wait_until("the dead letter", LONG, || async {
        e.store.dead_letters(10).await.is_ok_and(|d| d.len() == 1)
    })
    .await?;
    let fails: Vec<Value> = e
        .all("item")
        .into_iter()
        .filter(|r| r["outcome"] == "fail")
        .collect();
    ensure!(fails.len() == 2, "{fails:?}");
    ensure!(
        fails[0]["attempts"][0] == 1 && fails[1]["attempts"][0] == 2,
        "{fails:?}"
    );
    let gap = fails[1]["at_ms"].as_i64().unwrap_or(0) - fails[0]["at_ms"].as_i64().unwrap_or(0);
    ensure!(gap >= 300, "retried {gap} ms later, asked for 300");
    let dead = &e.store.dead_letters(10).await?[0];
    ensure!(
        dead.last_error.as_deref() == Some("planned failure") && dead.item.attempt == 2,
        "{dead:?}"
    );
    Ok(())
}

/// Three items of one key and merge key, due 100 ms apart: one delivery of three.
async fn item_merge(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Items, &[])?;
    let now = e.store.now_ms().await?;
    let items = (0..3)
        .map(|i| {
            NewItem::new(format!("m{i}"), "conf.item", now + 500 + i * 100)
                .key("user-m")
                .merge_key("coupon")
        })
        .collect();
    enqueue(&e, items).await?;
    let r = wait_records(&e, "the merged delivery", "item", 1).await?;
    ensure!(r.len() == 1, "{r:?}");
    ensure!(
        strs(&r[0]["ids"]) == ["m0", "m1", "m2"] && r[0]["merged"] == true,
        "{r:?}"
    );
    Ok(())
}

/// An item cancelled before it is due never reaches the handler; a marker due
/// after it does.
async fn item_cancel(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Items, &[])?;
    let now = e.store.now_ms().await?;
    enqueue(
        &e,
        vec![
            NewItem::new("gone", "conf.item", now + 1_500),
            NewItem::new("marker", "conf.item", now + 2_000),
        ],
    )
    .await?;
    ensure!(e.store.cancel(&ItemRef::new("gone")).await? == CancelOutcome::Cancelled);
    wait_until("the marker", LONG, || async {
        acked(&e).contains_key("marker")
    })
    .await?;
    ensure!(
        !acked(&e).contains_key("gone") && e.all("item").len() == 1,
        "{:?}",
        e.all("item")
    );
    Ok(())
}

/// `kill -9` of a subscriber holding items: a fresh one gets them (attempt 2); the
/// items the first one had acked are not run again.
async fn subscriber_killed(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Items, &[])?;
    let now = e.store.now_ms().await?;
    let mut items: Vec<NewItem> = (0..20)
        .map(|i| NewItem::new(format!("h{i}"), "conf.item", now).payload("hold-once"))
        .collect();
    items.extend((0..20).map(|i| NewItem::new(format!("n{i}"), "conf.item", now)));
    enqueue(&e, items).await?;
    wait_records(&e, "20 held", "held", 20).await?;
    wait_until("20 acked", LONG, || async { acked(&e).len() == 20 }).await?;
    // An agent records an ack when it hands it to its SDK, which may still hold it
    // in a settle batch; "acked" here means the worker applied it: only the 20
    // held items are still in flight.
    wait_until("the 20 acks applied", LONG, || async {
        e.store
            .stats()
            .await
            .is_ok_and(|s| s.iter().map(|q| q.in_flight).sum::<u64>() == 20)
    })
    .await?;
    e.agent_proc("a1")?.kill9();
    e.agent("a2", Role::Items, &[])?;
    wait_until("all 40 acked", LONG, || async { acked(&e).len() == 40 }).await?;
    let a = acked(&e);
    ensure!(a.values().all(|n| *n == 1), "acked twice: {a:?}");
    for r in e.records("a2") {
        if r["kind"] == "item" {
            ensure!(
                strs(&r["ids"]).iter().all(|id| id.starts_with('h')) && r["attempts"][0] == 2,
                "the fresh subscriber got {r}"
            );
        }
    }
    Ok(())
}

/// Items of a handler nobody subscribes yet wait (shown as waiting), with no
/// attempt counted, and go out when a subscriber for it arrives.
async fn waiting_for_subscriber(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("other", Role::Items, &["--items", "conf.other"])?;
    // The other subscriber is in: the chime worker pops and parks conf.item items.
    wait_records(&e, "the other agent", "started", 1).await?;
    let now = e.store.now_ms().await?;
    enqueue(
        &e,
        (0..10)
            .map(|i| NewItem::new(format!("w{i}"), "conf.item", now))
            .collect(),
    )
    .await?;
    wait_until("10 items waiting", LONG, || async {
        e.store
            .waiting_by_handler()
            .await
            .is_ok_and(|w| w.get("conf.item") == Some(&10))
    })
    .await?;
    ensure!(e.all("item").is_empty());
    e.agent("a1", Role::Items, &[])?;
    wait_until("10 acked", LONG, || async { acked(&e).len() == 10 }).await?;
    for r in e.records("a1") {
        if r["kind"] == "item" {
            ensure!(
                r["attempts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|a| a == 1),
                "{r}"
            );
        }
    }
    Ok(())
}

/// SIGTERM while deliveries run: each finishes and is acked before the agent exits 0.
async fn item_drain(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    e.agent("a1", Role::Items, &[])?;
    let now = e.store.now_ms().await?;
    enqueue(
        &e,
        (0..10)
            .map(|i| NewItem::new(format!("s{i}"), "conf.item", now).payload("sleep:1500"))
            .collect(),
    )
    .await?;
    // In flight at the chime worker is not enough: a delivery still queued in the
    // worker's hub when the drain starts is handed back, not run. Wait until the
    // agent's handler holds all ten.
    wait_until("10 items in the handler", LONG, || async {
        e.all("sleeping")
            .iter()
            .flat_map(|r| r["ids"].as_array().cloned().unwrap_or_default())
            .count()
            == 10
    })
    .await?;
    e.agent_proc("a1")?.signal("TERM")?;
    let code = e.agent_proc("a1")?.wait_exit(LONG).await?;
    ensure!(code == Some(0), "agent exited {code:?}");
    let a = acked(&e);
    ensure!(a.len() == 10 && a.values().all(|n| *n == 1), "{a:?}");
    ensure!(e.all("drained").len() == 1);
    wait_until("the acks recorded", LONG, || async {
        e.store
            .stats()
            .await
            .is_ok_and(|s| s.iter().all(|q| q.pending + q.in_flight == 0))
    })
    .await?;
    Ok(())
}

/// Without a token: no registration, no subscription, and the refusal is visible.
async fn auth_refused(sdk: Sdk) -> Result<()> {
    let e = SdkEnv::start(sdk, 1).await?;
    let record = e
        .cluster
        .dir
        .path()
        .join("noauth.jsonl")
        .to_string_lossy()
        .into_owned();
    let endpoints = e.cluster.endpoints();
    let deliveries = e.deliveries.clone();
    let cmd = sdk.agent(&[
        "run",
        "--record",
        &record,
        "--worker-id",
        "intruder",
        "--coordinator",
        &endpoints,
        "--deliveries",
        &deliveries,
    ])?;
    let p = chime_tests::Proc::spawn("agent-noauth", cmd, e.cluster.dir.path())?;
    let now = e.store.now_ms().await?;
    enqueue(&e, vec![NewItem::new("x", "conf.item", now)]).await?;
    wait_until("UNAUTHENTICATED in the agent's output", LONG, || async {
        p.log().contains("UNAUTHENTICATED")
    })
    .await?;
    let workers = e.cluster.admin(&["workers"])?;
    ensure!(
        workers["workers"].as_array().is_some_and(Vec::is_empty),
        "{workers}"
    );
    // With no subscriber the chime worker pops nothing: the item is still pending.
    let s = e.store.stats().await?;
    ensure!(
        s.iter().map(|q| q.pending).sum::<u64>() == 1
            && s.iter().map(|q| q.in_flight).sum::<u64>() == 0,
        "{s:?}"
    );
    ensure!(
        chime_tests::sdk::read_jsonl(std::path::Path::new(&record))
            .iter()
            .all(|r| r["kind"] != "item")
    );
    drop(p);
    Ok(())
}

/// The producer client: every step of the script answers as the README says.
async fn producer(sdk: Sdk) -> Result<()> {
    let mut e = SdkEnv::start(sdk, 1).await?;
    let recs = e.produce().await?;
    let step = |s: &str| -> Value {
        recs.iter()
            .find(|r| r["step"] == s)
            .map(|r| r["outcome"].clone())
            .unwrap_or(Value::Null)
    };
    ensure!(
        step("enqueue") == serde_json::json!(["created", "created", "created"]),
        "{recs:?}"
    );
    let again = step("enqueue-again");
    ensure!(
        again == serde_json::json!(["duplicate"]) || again == serde_json::json!(["created"]),
        "{again}"
    );
    ensure!(step("get") == "pending", "{recs:?}");
    ensure!(step("reschedule") == "rescheduled", "{recs:?}");
    ensure!(step("cancel") == "cancelled", "{recs:?}");
    ensure!(step("cancel-again") == "not_found", "{recs:?}");
    ensure!(step("get-missing") == "not_found", "{recs:?}");
    ensure!(step("bad-input") == "items[0].handler", "{recs:?}");
    // What the script left behind is really in the store.
    let p2 = e.store.get(&ItemRef::with_key("user-p", "p-2")).await?;
    ensure!(p2.is_some(), "p-2 missing from the store");
    ensure!(e.store.get(&ItemRef::new("p-3")).await?.is_none());
    Ok(())
}

/// One module per SDK (`<sdk>::<scenario>`), each with every scenario; the scenario
/// list is passed whole (`$list`) so the two repetitions stay independent.
macro_rules! scenarios {
    (sdks: { $($m:ident => $sdk:ident),* $(,)? }, scenarios: $list:tt) => {
        $( scenarios!(@module $m, $sdk, $list); )*
    };
    (@module $m:ident, $sdk:ident, [$($s:ident),* $(,)?]) => {
        mod $m {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $s() -> anyhow::Result<()> {
                    super::$s(chime_tests::sdk::Sdk::$sdk).await
                }
            )*
        }
    };
}

scenarios!(
    sdks: {
        rust => Rust,
        python => Python,
        java => Java,
        go => Go,
        node => Node,
    },
    scenarios: [
        job_shards,
        job_kill,
        job_timeout,
        job_leader_killed,
        job_frozen_worker,
        job_stalled_stream,
        job_drain,
        item_ack,
        item_retry_dead,
        item_merge,
        item_cancel,
        subscriber_killed,
        waiting_for_subscriber,
        item_drain,
        auth_refused,
        producer,
    ]
);
