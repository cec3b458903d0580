//! What operators see: `/metrics` names what happened, the console's API and the
//! admin API need the admin token (and a worker token opens nothing else), health
//! answers, and config changes show up as applied or rejected. Real Redis, etcd and
//! chime processes.

use std::time::Duration;

use anyhow::{Result, ensure};
use chime_tests::{
    ADMIN_TOKEN, Cluster, WORKER_TOKEN, free_port, http, metric_sum, pending_items, run_chime,
    wait_until,
};
use serde_json::{Value, json};

/// A queue-consuming worker that also runs job shards for `c`'s coordinators, with
/// its probes on `port`.
fn queue_worker(c: &Cluster, name: &str, port: u16) -> Result<chime_tests::Proc> {
    c.queue_worker(
        name,
        &["--http-addr", &format!("127.0.0.1:{port}")],
        &[("CHIME_CONSUMER_RETRY_BASE_MS", "100")],
    )
}

async fn scrape(port: u16) -> Result<String> {
    let (code, body) = http(
        "GET",
        &format!("http://127.0.0.1:{port}/metrics"),
        None,
        None,
    )
    .await?;
    ensure!(code == 200, "/metrics answered {code}");
    Ok(body.as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn metrics_name_what_happened() -> Result<()> {
    let mut c = Cluster::start(0).await?;
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);
    let tok = Some(ADMIN_TOKEN);
    let (wp1, wp2) = (free_port()?, free_port()?);
    let w1 = queue_worker(&c, "qw1", wp1)?;
    let w2 = queue_worker(&c, "qw2", wp2)?;
    c.workers.push(("qw1".into(), w1));
    c.workers.push(("qw2".into(), w2));
    c.wait_workers(2).await?;

    // Items: 20 that succeed, 3 that fail twice and die, 5 far in the future, 2 for
    // a handler no worker has (they wait for one).
    let mut items: Vec<Value> = (0..20)
        .map(|i| json!({ "id": format!("ok{i}"), "handler": "noop" }))
        .collect();
    items.extend(
        (0..3).map(|i| json!({ "id": format!("bad{i}"), "handler": "fail", "max_attempts": 2 })),
    );
    items.extend(
        (0..5).map(|i| json!({ "id": format!("later{i}"), "handler": "noop", "in_ms": 3_600_000 })),
    );
    items.extend((0..2).map(|i| json!({ "id": format!("stray{i}"), "handler": "nobody" })));
    let (code, body) = http(
        "POST",
        &format!("{api}/api/queues/items"),
        tok,
        Some(json!({ "items": items })),
    )
    .await?;
    ensure!(code == 200, "enqueue: {code} {body}");

    // Jobs: one that succeeds every 500 ms, one whose shard always fails.
    for (name, handler) in [("tick", "noop"), ("broken", "fail")] {
        let job = json!({ "name": name, "group": "default", "handler": handler,
                          "schedule": { "kind": "fixed_rate", "every_ms": 500 } });
        let (code, body) = http("POST", &format!("{api}/api/jobs"), tok, Some(job)).await?;
        ensure!(code == 201, "create {name}: {code} {body}");
    }

    // Live config: one good value, one refused.
    c.etcd
        .etcdctl_put("/chime/queues/default/visibility_ms", "20000")?;
    c.etcd
        .etcdctl_put("/chime/handlers/noop/rate_per_s", "lots")?;

    // Wait until the dead letters are sampled on the leader.
    wait_until(
        "3 dead letters and 2 waiting items in the gauges",
        Duration::from_secs(30),
        || async {
            scrape(c.http_ports[0])
                .await
                .map(|t| {
                    metric_sum(&t, "chime_queue_dead_letters") == Some(3.0)
                        && metric_sum(&t, "chime_items_waiting") == Some(2.0)
                })
                .unwrap_or(false)
        },
    )
    .await?;
    wait_until(
        "failed and succeeded shards",
        Duration::from_secs(20),
        || async {
            scrape(c.http_ports[0])
                .await
                .map(|t| {
                    metric_sum(&t, "chime_run_results_total{status=\"failed\"}").unwrap_or(0.0)
                        > 0.0
                        && metric_sum(&t, "chime_run_results_total{status=\"succeeded\"}")
                            .unwrap_or(0.0)
                            > 0.0
                })
                .unwrap_or(false)
        },
    )
    .await?;

    let coord = scrape(c.http_ports[0]).await?;
    let positive = [
        "chime_items_enqueued_total",
        "chime_job_fires_total{outcome=\"fired\"}",
        "chime_run_results_total{status=\"succeeded\"}",
        "chime_run_results_total{status=\"failed\"}",
        "chime_runs_finished_total{status=\"succeeded\"}",
        "chime_runs_finished_total{status=\"failed\"}",
        "chime_trigger_lag_seconds_count",
        "chime_connected_workers",
        "chime_coordinator_leader",
        "chime_queue_depth",
        "chime_queue_dead_letters",
    ];
    for m in positive {
        let v = metric_sum(&coord, m);
        ensure!(
            v.is_some_and(|v| v > 0.0),
            "coordinator {m} = {v:?}:\n{coord}"
        );
    }
    ensure!(
        metric_sum(&coord, "chime_queue_in_flight").is_some(),
        "no in-flight gauge:\n{coord}"
    );
    ensure!(
        metric_sum(&coord, "chime_connected_workers") == Some(2.0)
            && metric_sum(&coord, "chime_group_workers{group=\"default\"}") == Some(2.0),
        "{coord}"
    );

    let (a, b) = (scrape(wp1).await?, scrape(wp2).await?);
    let both = |m: &str| metric_sum(&a, m).unwrap_or(0.0) + metric_sum(&b, m).unwrap_or(0.0);
    for m in [
        "chime_items_fired_total",
        "chime_items_acked_total",
        "chime_items_retried_total",
        "chime_items_dead_lettered_total",
        "chime_items_parked_total",
        "chime_fire_lag_seconds_count",
        "chime_queue_claims_total",
        "chime_lease_conflicts_total",
        "chime_config_changes_applied_total",
        "chime_config_rejected_total",
    ] {
        ensure!(both(m) > 0.0, "workers' {m} is 0:\n{a}\n{b}");
    }
    ensure!(both("chime_items_acked_total") >= 20.0, "{a}\n{b}");
    ensure!(both("chime_items_dead_lettered_total") == 3.0, "{a}\n{b}");
    Ok(())
}

/// A stalled queue shows in its oldest-due-age gauge until a worker drains it, and
/// a group's live-worker gauge reads 0 (not nothing) after its last worker leaves:
/// the two series alert rules watch.
#[tokio::test]
async fn queue_lag_and_group_workers_are_gauged() -> Result<()> {
    let mut c = Cluster::start(0).await?;
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);
    let items: Vec<Value> = (0..3)
        .map(|i| json!({ "id": format!("late{i}"), "handler": "noop" }))
        .collect();
    let (code, body) = http(
        "POST",
        &format!("{api}/api/queues/items"),
        Some(ADMIN_TOKEN),
        Some(json!({ "items": items })),
    )
    .await?;
    ensure!(code == 200, "enqueue: {code} {body}");

    // Nobody consumes: the age grows past 2 s (sampled every 5 s).
    let age = |t: &str| metric_sum(t, "chime_queue_oldest_due_age_seconds").unwrap_or(0.0);
    wait_until("a queue lag of 2 s", Duration::from_secs(30), || async {
        scrape(c.http_ports[0]).await.is_ok_and(|t| age(&t) >= 2.0)
    })
    .await?;
    let (_, overview) = http(
        "GET",
        &format!("{api}/api/overview"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    ensure!(
        overview["queues"]["oldest_due_age_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 2_000),
        "overview: {overview}"
    );

    // A worker drains the queue: the age falls back to 0 and the group counts it.
    let port = free_port()?;
    let w = queue_worker(&c, "lagw", port)?;
    c.workers.push(("lagw".into(), w));
    c.wait_workers(1).await?;
    wait_until(
        "lag 0 and 1 worker in group default",
        Duration::from_secs(30),
        || async {
            scrape(c.http_ports[0]).await.is_ok_and(|t| {
                age(&t) == 0.0
                    && metric_sum(&t, "chime_group_workers{group=\"default\"}") == Some(1.0)
            })
        },
    )
    .await?;
    ensure!(pending_items(&api).await? == 0, "items left");

    // The group's last worker leaves: its gauge reads 0.
    let (_, mut w) = c.workers.pop().expect("the worker");
    w.signal("TERM")?;
    w.wait_exit(Duration::from_secs(20)).await?;
    wait_until(
        "0 workers in group default",
        Duration::from_secs(20),
        || async {
            scrape(c.http_ports[0]).await.is_ok_and(|t| {
                metric_sum(&t, "chime_group_workers{group=\"default\"}") == Some(0.0)
            })
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn console_and_admin_api_need_the_admin_token() -> Result<()> {
    let c = Cluster::start(1).await?;
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);

    // The console and the probes are open; the API is not.
    let (code, body) = http("GET", &format!("{api}/"), None, None).await?;
    ensure!(
        code == 200 && body.as_str().is_some_and(|s| s.contains("<html")),
        "console: {code}"
    );
    for path in ["/livez", "/readyz", "/metrics"] {
        let (code, body) = http("GET", &format!("{api}{path}"), None, None).await?;
        ensure!(code == 200, "{path}: {code} {body}");
    }
    let (_, s) = http("GET", &format!("{api}/api/session"), None, None).await?;
    ensure!(
        s["auth_required"] == true && s["authenticated"] == false,
        "{s}"
    );
    let (_, s) = http(
        "GET",
        &format!("{api}/api/session"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    ensure!(s["authenticated"] == true, "{s}");
    for token in [None, Some("wrong-token-0123456789"), Some(WORKER_TOKEN)] {
        let (code, body) = http("GET", &format!("{api}/api/jobs"), token, None).await?;
        ensure!(
            code == 401 && body["error"]["code"] == "unauthenticated",
            "{token:?}: {code} {body}"
        );
    }

    // Bad input names the field and stores nothing.
    let bad = json!({ "name": "j", "group": "default", "handler": "noop",
                      "schedule": { "kind": "cron", "expr": "not a cron" } });
    let (code, body) = http(
        "POST",
        &format!("{api}/api/jobs"),
        Some(ADMIN_TOKEN),
        Some(bad),
    )
    .await?;
    ensure!(
        code == 400 && body["error"]["field"] == "schedule.expr",
        "{code} {body}"
    );
    let (code, _) = http("GET", &format!("{api}/api/jobs/j"), Some(ADMIN_TOKEN), None).await?;
    ensure!(code == 404, "a refused job was stored: {code}");
    let huge = "x".repeat(70_000);
    let (code, body) = http(
        "POST",
        &format!("{api}/api/queues/items"),
        Some(ADMIN_TOKEN),
        Some(json!({ "items": [{ "id": "a", "handler": "noop" }, { "id": "b", "handler": "noop", "payload": huge }] })),
    )
    .await?;
    ensure!(
        code == 400 && body["error"]["field"] == "items[1].payload",
        "{code} {body}"
    );
    let pending = pending_items(&api).await?;
    ensure!(pending == 0, "a refused batch stored {pending} items");
    let (code, body) = http(
        "PUT",
        &format!("{api}/api/config"),
        Some(ADMIN_TOKEN),
        Some(json!({ "key": "queues/default/count", "value": "0" })),
    )
    .await?;
    ensure!(
        code == 400 && body["error"]["field"] == "queues/default/count",
        "{code} {body}"
    );

    // A job made through the API runs, and the CLI sees it with the token only.
    let job = json!({ "name": "j", "group": "default", "handler": "noop",
                      "schedule": { "kind": "manual" } });
    let (code, body) = http(
        "POST",
        &format!("{api}/api/jobs"),
        Some(ADMIN_TOKEN),
        Some(job),
    )
    .await?;
    ensure!(
        code == 201 && body["version"].as_i64().unwrap_or(0) > 0,
        "{code} {body}"
    );
    let (code, run) = http(
        "POST",
        &format!("{api}/api/jobs/j/trigger"),
        Some(ADMIN_TOKEN),
        Some(json!({ "params": "p1" })),
    )
    .await?;
    ensure!(code == 200 && run["cause"] == "manual", "{code} {run}");
    let id = run["run_id"].as_str().unwrap_or_default().to_owned();
    wait_until(
        "the triggered run succeeds",
        Duration::from_secs(15),
        || async {
            http(
                "GET",
                &format!("{api}/api/runs/{id}"),
                Some(ADMIN_TOKEN),
                None,
            )
            .await
            .map(|(_, r)| r["state"] == "succeeded")
            .unwrap_or(false)
        },
    )
    .await?;
    ensure!(c.admin(&["job", "get", "j"])?["name"] == "j");
    let (code, _, err) = run_chime(&["job", "--coordinator", &c.coordinator, "get", "j"])?;
    ensure!(
        code != 0 && err.contains("admin token"),
        "no token: exit {code}, {err}"
    );

    // A worker with a wrong token is refused and never registered.
    let bad_token = c.dir.path().join("bad.token");
    std::fs::write(&bad_token, "not-the-worker-token-000\n")?;
    let cmd = chime_tests::chime_cmd(&[
        "worker",
        "--no-queue",
        "--coordinator",
        &c.coordinator,
        "--worker-id",
        "intruder",
        "--http-addr",
        "127.0.0.1:0",
        "--token-file",
        &bad_token.to_string_lossy(),
    ])?;
    let intruder = chime_tests::Proc::spawn("intruder", cmd, c.dir.path())?;
    wait_until(
        "the intruder is refused",
        Duration::from_secs(15),
        || async { intruder.log().contains("refused this worker's token") },
    )
    .await?;
    let w = c.admin(&["workers"])?;
    ensure!(w["workers"].as_array().is_some_and(|a| a.len() == 1), "{w}");

    // gRPC health answers SERVING without a token.
    let channel = tonic::transport::Endpoint::from_shared(c.coordinator.clone())?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "chime.v1.Admin".into(),
        })
        .await?
        .into_inner();
    ensure!(
        r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "{r:?}"
    );
    Ok(())
}

#[tokio::test]
async fn admin_tokens_rotate_without_a_restart() -> Result<()> {
    let c = Cluster::start(1).await?;
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);
    let new = "rotated-admin-token-0123456789";
    let works = |token: &'static str| {
        let url = format!("{api}/api/jobs");
        async move { matches!(http("GET", &url, Some(token), None).await, Ok((200, _))) }
    };
    ensure!(works(ADMIN_TOKEN).await && !works(new).await);
    // The worker token is no admin token, over gRPC either.
    let out = chime_tests::chime_cmd(&["workers", "--coordinator", &c.coordinator])?
        .env("CHIME_ADMIN_TOKEN", WORKER_TOKEN)
        .output()?;
    ensure!(!out.status.success(), "the worker token listed workers");
    // Rotation: both tokens for a while, then only the new one.
    let file = c.dir.path().join("admin.token");
    std::fs::write(&file, format!("{ADMIN_TOKEN}\n{new}\n"))?;
    wait_until("the new token works", Duration::from_secs(10), || {
        works(new)
    })
    .await?;
    ensure!(
        works(ADMIN_TOKEN).await,
        "the old token stopped working too early"
    );
    std::fs::write(&file, format!("# rotated\n{new}\n"))?;
    wait_until(
        "the old token is refused",
        Duration::from_secs(10),
        || async { !works(ADMIN_TOKEN).await },
    )
    .await?;
    ensure!(works(new).await);
    // A broken file keeps the last good tokens (checked past the 1 s re-read).
    std::fs::write(&file, "short\n")?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    ensure!(works(new).await, "a broken token file locked everyone out");
    Ok(())
}
