//! Namespaces, attacked the way a team holding a token of its own namespace would
//! try: against a real two-coordinator cluster (real Redis and etcd), through the
//! follower, a viewer and an admin of namespace `team-a` call **every** route of
//! the JSON API (`chime_coordinator::http::api_routes`, the list the router is
//! built from, so a new route is attacked by being served) and every method of the
//! gRPC admin API (`grpc::ADMIN_METHODS`; a method without an attack here fails
//! the test) and of the delay queue (`grpc::QUEUE_METHODS`, likewise) aimed at
//! `team-b`'s job, run, workers and delayed item (handler `team-b/charge`). Each is
//! refused (403), not found (404), or answers without a trace of `team-b`;
//! cluster-wide routes (alerts, queue counts, audit, overview, charts, and
//! `/metrics` with `auth.metrics_require_token`) are refused outright; and afterwards `team-b`'s job, run, item and handler setting are
//! exactly as they were. Team-a's tokens reach team-a's item and handler settings,
//! not the cluster's settings. A worker token of `team-a` cannot register into
//! `team-b`'s group.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use chime_coordinator::grpc::{ADMIN_METHODS, QUEUE_METHODS, Reach};
use chime_coordinator::http::{Who, api_routes};
use chime_shared::auth::Bearer;
use chime_tests::{ADMIN_TOKEN, Cluster, WORKER_TOKEN, http, wait_until};
use proto as pb;
use serde_json::{Value, json};
use tonic::Code;

const A_VIEWER: &str = "team-a-viewer-token-0123456789";
const A_ADMIN: &str = "team-a-admin-token-0123456789";
const A_WORKER: &str = "team-a-worker-token-0123456789";
const B_JOB: &str = "team-b/nightly";
const A_JOB: &str = "team-a/nightly";
const B_SETTING: &str = "handlers/team-b/charge/concurrency";

fn enc(s: &str) -> String {
    s.replace('/', "%2F")
}

/// A manual job; team-b's carry a secret in their params, which must never show.
fn job(name: &str, group: &str) -> Value {
    let params = if name.starts_with("team-b/") {
        "secret-of-b"
    } else {
        "of-a"
    };
    json!({ "name": name, "group": group, "handler": "noop",
            "schedule": { "kind": "manual" }, "params": params })
}

/// What an answer may be for a namespaced route aimed at team-b: refused, not
/// found, or without any trace of team-b.
fn isolated(what: &str, code: u16, body: &Value) -> Result<()> {
    match code {
        403 | 404 => Ok(()),
        // A refused body (an invalid field) says nothing of team-b's objects.
        400 => Ok(()),
        200..=299 => {
            let text = body.to_string();
            ensure!(
                !text.contains("team-b") && !text.contains("secret-of-b"),
                "{what}: {code} leaks team-b: {text}"
            );
            Ok(())
        }
        _ => bail!("{what}: unexpected {code} {body}"),
    }
}

#[tokio::test]
async fn a_team_s_tokens_reach_nothing_of_another_team() -> Result<()> {
    // `/metrics` names every namespace's groups and handlers: behind a token here.
    let c = Cluster::start_with_env(2, 0, &[("CHIME_AUTH_METRICS_REQUIRE_TOKEN", "true")]).await?;
    let (api, follower_grpc) = c.follower().await?;

    std::fs::write(
        c.dir.path().join("admin.token"),
        format!(
            "{ADMIN_TOKEN} ci\n{A_VIEWER} a-viewer role=viewer ns=team-a\n{A_ADMIN} a-admin ns=team-a\n"
        ),
    )?;
    std::fs::write(
        c.dir.path().join("worker.token"),
        format!("{WORKER_TOKEN}\n{A_WORKER} a-workers ns=team-a\n"),
    )?;
    wait_until(
        "both coordinators to take the namespaced tokens",
        Duration::from_secs(20),
        || async {
            let mut both = true;
            for port in &c.http_ports {
                let url = format!("http://127.0.0.1:{port}/api/session");
                both &= matches!(
                    http("GET", &url, Some(A_ADMIN), None).await,
                    Ok((200, b)) if b["namespaces"] == json!(["team-a"])
                );
            }
            both
        },
    )
    .await?;
    let call = |method: &str, path: &str, token: &str, body: Option<Value>| {
        let url = format!("{api}{path}");
        let (method, token) = (method.to_owned(), token.to_owned());
        async move { http(&method, &url, Some(&token), body).await }
    };

    // The cluster admin sets both teams up: a job each, and a run of team-b's.
    for (name, group) in [(A_JOB, "team-a/etl"), (B_JOB, "team-b/etl")] {
        let (code, b) = call("POST", "/api/jobs", ADMIN_TOKEN, Some(job(name, group))).await?;
        ensure!(code == 201, "create {name}: {code} {b}");
    }
    let (code, run) = call(
        "POST",
        &format!("/api/jobs/{}/trigger", enc(B_JOB)),
        ADMIN_TOKEN,
        None,
    )
    .await?;
    ensure!(code == 200, "trigger {B_JOB}: {code} {run}");
    let b_run = run["run_id"].as_str().context("run id")?.to_owned();
    let (_, b_before) = call(
        "GET",
        &format!("/api/jobs/{}", enc(B_JOB)),
        ADMIN_TOKEN,
        None,
    )
    .await?;
    // And a delayed item each (an item's namespace is its handler's), due in an
    // hour: nothing consumes them meanwhile.
    for (id, handler, payload) in [
        ("a-item", "team-a/charge", "a"),
        ("b-item", "team-b/charge", "secret-of-b"),
    ] {
        let item = json!({ "id": id, "handler": handler, "in_ms": 3_600_000, "payload": payload });
        let (code, b) = call(
            "POST",
            "/api/queues/items",
            ADMIN_TOKEN,
            Some(json!({ "items": [item] })),
        )
        .await?;
        ensure!(code == 200, "enqueue {id}: {code} {b}");
    }
    let b_item = || async {
        call("GET", "/api/queues/item?id=b-item", ADMIN_TOKEN, None)
            .await
            .map(|(_, b)| b)
    };
    let b_item_before = b_item().await?;
    // And a live setting of a handler of team-b's.
    let b_setting = json!({ "key": B_SETTING, "value": "7" });
    let (code, b) = call("PUT", "/api/config", ADMIN_TOKEN, Some(b_setting)).await?;
    ensure!(code == 200, "set {B_SETTING}: {code} {b}");
    ensure!(
        b_item_before["item"]["payload"] == "secret-of-b",
        "{b_item_before}"
    );

    // A job in another namespace's group, or naming another namespace's job, is
    // refused at its field, whoever asks.
    let (code, b) = call(
        "POST",
        "/api/jobs",
        ADMIN_TOKEN,
        Some(job("team-a/sneaky", "team-b/etl")),
    )
    .await?;
    ensure!(code == 400 && b["error"]["field"] == "group", "{code} {b}");

    // The cluster admin filters by namespace.
    let (_, jobs) = call("GET", "/api/jobs?namespace=team-b", ADMIN_TOKEN, None).await?;
    let names: Vec<&str> = jobs["jobs"]
        .as_array()
        .map(|a| a.iter().filter_map(|j| j["name"].as_str()).collect())
        .unwrap_or_default();
    ensure!(names == [B_JOB], "namespace filter: {names:?}");
    let (_, runs) = call("GET", "/api/runs?namespace=team-b", ADMIN_TOKEN, None).await?;
    let run_jobs: Vec<&str> = runs["runs"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["job"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        run_jobs == [B_JOB],
        "namespace filter on runs: {run_jobs:?}"
    );

    // Team-a's own: the viewer sees its job.
    let (code, jobs) = call("GET", "/api/jobs", A_VIEWER, None).await?;
    ensure!(
        code == 200 && jobs.to_string().contains(A_JOB),
        "{code} {jobs}"
    );

    // Every JSON route, aimed at team-b, by both team-a tokens.
    let routes = api_routes();
    ensure!(routes.len() >= 30, "{} routes", routes.len());
    for token in [A_VIEWER, A_ADMIN] {
        for route in &routes {
            let path = route
                .path
                .replace("{name}", &enc(B_JOB))
                .replace("{id}", &enc(&b_run));
            // Filters aimed at team-b where a route takes them.
            let path = match path.as_str() {
                "/api/jobs" if route.method == "GET" => {
                    format!("/api/jobs?group={}", enc("team-b/etl"))
                }
                "/api/runs" => format!("/api/runs?job={}", enc(B_JOB)),
                "/api/workers" => format!("/api/workers?group={}", enc("team-b/etl")),
                "/api/queues/item" => "/api/queues/item?id=b-item".to_owned(),
                "/api/config" if route.method == "DELETE" => {
                    format!("/api/config?key={}", enc(B_SETTING))
                }
                _ => path,
            };
            let body = match (route.method.as_str(), route.path) {
                ("POST", "/api/jobs") => Some(job("team-b/planted", "team-b/etl")),
                ("PUT", "/api/jobs/{name}") => {
                    let mut j = job(B_JOB, "team-b/etl");
                    j["params"] = json!("overwritten");
                    j["version"] = b_before["version"].clone();
                    Some(j)
                }
                ("POST", "/api/runs/{id}/rerun") => Some(json!({ "node": "x" })),
                ("POST", "/api/queues/items") => Some(json!({ "items": [
                    { "id": "planted", "handler": "team-b/charge" }] })),
                ("POST", "/api/queues/item/cancel") => Some(json!({ "id": "b-item" })),
                ("POST", "/api/queues/item/reschedule") => {
                    Some(json!({ "id": "b-item", "due_at_ms": 1 }))
                }
                ("POST", "/api/queues/dead/requeue") => Some(json!({ "all": true })),
                ("PUT", "/api/config") => Some(json!({ "key": B_SETTING, "value": "1" })),
                ("GET" | "DELETE", _) => None,
                _ => Some(json!({})),
            };
            let what = format!("{} {path} as {token}", route.method);
            let (code, b) = call(route.method.as_str(), &path, token, body).await?;
            match route.who {
                Who::Admin(_) | Who::Producer(_) => isolated(&what, code, &b)?,
                Who::Cluster(_) => ensure!(
                    code == 403 && b["error"]["code"] == "permission_denied",
                    "{what}: cluster-wide, yet {code} {b}"
                ),
            }
        }
        // The unfiltered listings hold only team-a's; asking for team-b's
        // namespace gets nothing; a namespace that is no name is refused.
        for path in ["/api/jobs", "/api/runs", "/api/workers"] {
            let (code, b) = call("GET", path, token, None).await?;
            isolated(&format!("GET {path} as {token}"), code, &b)?;
            let asked = format!("{path}?namespace=team-b");
            let (code, b) = call("GET", &asked, token, None).await?;
            let list = path.trim_start_matches("/api/");
            ensure!(
                code == 200 && b[list].as_array().is_some_and(|a| a.is_empty()),
                "GET {asked} as {token}: {code} {b}"
            );
            let bad = format!("{path}?namespace=Team%20B");
            let (code, b) = call("GET", &bad, token, None).await?;
            ensure!(
                code == 400 && b["error"]["field"] == "namespace",
                "GET {bad} as {token}: {code} {b}"
            );
        }
    }

    // gRPC, through the follower: every admin method, aimed at team-b.
    let channel = tonic::transport::Endpoint::from_shared(follower_grpc.clone())?
        .connect()
        .await?;
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel.clone(),
        Bearer::new(Some(A_ADMIN))?,
    );
    let jref = || pb::JobRef { name: B_JOB.into() };
    let rid = || pb::RunId {
        run_id: b_run.clone(),
    };
    let refused = |what: &str, r: std::result::Result<(), tonic::Status>| -> Result<()> {
        match r {
            Err(s) if matches!(s.code(), Code::NotFound | Code::PermissionDenied) => {
                ensure!(
                    !s.message().contains("secret-of-b"),
                    "{what}: {}",
                    s.message()
                );
                Ok(())
            }
            other => bail!("{what}: not refused: {other:?}"),
        }
    };
    let b_job = || pb::Job {
        name: B_JOB.into(),
        group: "team-b/etl".into(),
        handler: "noop".into(),
        schedule: Some(pb::Schedule {
            kind: Some(pb::schedule::Kind::Manual(pb::Manual {})),
        }),
        ..Default::default()
    };
    for (method, _, reach) in ADMIN_METHODS {
        match method {
            "CreateJob" => refused(
                method,
                admin
                    .create_job(pb::CreateJobRequest {
                        job: Some(pb::Job {
                            name: "team-b/planted".into(),
                            ..b_job()
                        }),
                    })
                    .await
                    .map(|_| ()),
            )?,
            "CreateJobs" => refused(
                method,
                admin
                    .create_jobs(pb::CreateJobsRequest {
                        jobs: vec![pb::Job {
                            name: "team-b/planted".into(),
                            ..b_job()
                        }],
                    })
                    .await
                    .map(|_| ()),
            )?,
            "UpdateJob" => refused(
                method,
                admin
                    .update_job(pb::UpdateJobRequest {
                        job: Some(pb::Job {
                            version: b_before["version"].as_i64().unwrap_or_default(),
                            params: "overwritten".into(),
                            ..b_job()
                        }),
                    })
                    .await
                    .map(|_| ()),
            )?,
            "DeleteJob" => refused(method, admin.delete_job(jref()).await.map(|_| ()))?,
            "GetJob" => refused(method, admin.get_job(jref()).await.map(|_| ()))?,
            "PauseJob" => refused(method, admin.pause_job(jref()).await.map(|_| ()))?,
            "ResumeJob" => refused(method, admin.resume_job(jref()).await.map(|_| ()))?,
            "TriggerJob" => refused(
                method,
                admin
                    .trigger_job(pb::TriggerJobRequest {
                        name: B_JOB.into(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            )?,
            "GetRun" => refused(method, admin.get_run(rid()).await.map(|_| ()))?,
            "KillRun" => refused(method, admin.kill_run(rid()).await.map(|_| ()))?,
            "RerunWorkflow" => refused(
                method,
                admin
                    .rerun_workflow(pb::RerunRequest {
                        run_id: b_run.clone(),
                        node: "x".into(),
                    })
                    .await
                    .map(|_| ()),
            )?,
            "ListJobs" => {
                let jobs = admin
                    .list_jobs(pb::ListJobsRequest::default())
                    .await?
                    .into_inner();
                let names: Vec<&str> = jobs.jobs.iter().map(|j| j.name.as_str()).collect();
                ensure!(names == [A_JOB], "{method}: {names:?}");
            }
            "ListRuns" => {
                let runs = admin
                    .list_runs(pb::ListRunsRequest::default())
                    .await?
                    .into_inner();
                ensure!(
                    runs.runs.iter().all(|r| !r.job.starts_with("team-b")),
                    "{method}: {:?}",
                    runs.runs
                );
            }
            "ListWorkers" => {
                let w = admin
                    .list_workers(pb::ListWorkersRequest::default())
                    .await?
                    .into_inner();
                ensure!(
                    w.workers.iter().all(|w| !w.group.starts_with("team-b")),
                    "{method}: {:?}",
                    w.workers
                );
            }
            "ListAudit" => {
                ensure!(reach == Reach::Cluster, "{method} is cluster-wide");
                let e = admin
                    .list_audit(pb::ListAuditRequest::default())
                    .await
                    .expect_err("a team token read the audit log");
                ensure!(e.code() == Code::PermissionDenied, "{method}: {e:?}");
            }
            other => bail!("no attack written for the admin method {other}: add one here"),
        }
    }

    // Team-a's own item: its admin and viewer find it; its admin enqueues into
    // team-a, the viewer (role) not at all.
    for token in [A_ADMIN, A_VIEWER] {
        let (code, b) = call("GET", "/api/queues/item?id=a-item", token, None).await?;
        ensure!(
            code == 200 && b["item"]["payload"] == "a",
            "team-a's item as {token}: {code} {b}"
        );
    }
    let own = json!({ "items": [{ "id": "a-2", "handler": "team-a/charge", "in_ms": 3_600_000 }] });
    let (code, b) = call("POST", "/api/queues/items", A_ADMIN, Some(own.clone())).await?;
    ensure!(
        code == 200,
        "team-a's admin enqueues into team-a: {code} {b}"
    );
    let (code, b) = call("POST", "/api/queues/items", A_VIEWER, Some(own)).await?;
    ensure!(code == 403, "a viewer enqueues: {code} {b}");

    // Team-a's admin sets its own handlers' settings, not the cluster's; its
    // viewer sees them.
    let a_setting = json!({ "key": "handlers/team-a/charge/concurrency", "value": "3" });
    let (code, b) = call("PUT", "/api/config", A_ADMIN, Some(a_setting)).await?;
    ensure!(
        code == 200,
        "team-a's admin sets its handler's setting: {code} {b}"
    );
    let cluster_setting = json!({ "key": "queues/default/count", "value": "3" });
    let (code, b) = call("PUT", "/api/config", A_ADMIN, Some(cluster_setting)).await?;
    ensure!(
        code == 403 && b["error"]["code"] == "permission_denied",
        "team-a's admin sets a family's setting: {code} {b}"
    );
    let (code, b) = call("GET", "/api/config", A_VIEWER, None).await?;
    let keys: Vec<&str> = b["entries"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["key"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        code == 200 && keys == ["handlers/team-a/charge/concurrency"],
        "team-a's viewer sees: {code} {keys:?}"
    );

    // The delay queue over gRPC, as team-a's admin, aimed at team-b's item.
    let mut queue = pb::queue_client::QueueClient::with_interceptor(
        channel.clone(),
        Bearer::new(Some(A_ADMIN))?,
    );
    let b_ref = || pb::ItemRef {
        key: String::new(),
        id: "b-item".into(),
    };
    for (method, _, reach) in QUEUE_METHODS {
        match method {
            "Enqueue" => refused(
                method,
                queue
                    .enqueue(pb::EnqueueRequest {
                        items: vec![pb::NewItem {
                            id: "planted".into(),
                            handler: "team-b/charge".into(),
                            ..Default::default()
                        }],
                    })
                    .await
                    .map(|_| ()),
            )?,
            "GetItem" => refused(method, queue.get_item(b_ref()).await.map(|_| ()))?,
            "CancelItem" => refused(method, queue.cancel_item(b_ref()).await.map(|_| ()))?,
            "RescheduleItem" => refused(
                method,
                queue
                    .reschedule_item(pb::RescheduleItemRequest {
                        item: Some(b_ref()),
                        due_at_ms: 1,
                    })
                    .await
                    .map(|_| ()),
            )?,
            "QueueStats" => {
                ensure!(reach == Reach::Cluster, "{method} is cluster-wide");
                let e = queue
                    .queue_stats(pb::QueueStatsRequest::default())
                    .await
                    .err()
                    .context("queue stats answered a team token")?;
                ensure!(e.code() == Code::PermissionDenied, "{method}: {e:?}");
            }
            "ListDeadLetters" => {
                let items = queue
                    .list_dead_letters(pb::ListDeadLettersRequest { limit: 100 })
                    .await?
                    .into_inner()
                    .items;
                ensure!(
                    items.iter().all(|i| !i.handler.starts_with("team-b/")),
                    "{method}: {items:?}"
                );
            }
            "RequeueDeadLetters" => refused(
                method,
                queue
                    .requeue_dead_letters(pb::RequeueDeadLettersRequest {
                        items: Vec::new(),
                        all: true,
                    })
                    .await
                    .map(|_| ()),
            )?,
            other => bail!("no attack written for the queue method {other}: add one here"),
        }
    }
    // The metrics: a cluster-wide viewer's, not a team's.
    for (token, want) in [
        (None, 401),
        (Some(A_VIEWER), 403),
        (Some(A_ADMIN), 403),
        (Some(ADMIN_TOKEN), 200),
    ] {
        let url = format!("{api}/metrics");
        let (code, _) = http("GET", &url, token, None).await?;
        ensure!(code == want, "/metrics as {token:?}: {code}, want {want}");
    }

    // Team-b's setting, item and job are exactly as they were.
    let (_, all) = call("GET", "/api/config", ADMIN_TOKEN, None).await?;
    ensure!(
        all["entries"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["key"] == B_SETTING && e["value"] == "7")),
        "team-b's setting changed: {all}"
    );
    // Team-b's item is exactly as it was, and nothing was planted.
    ensure!(b_item().await? == b_item_before, "team-b's item changed");
    let (code, _) = call("GET", "/api/queues/item?id=planted", ADMIN_TOKEN, None).await?;
    ensure!(code == 404, "an item was planted");

    // Team-b's job and run are exactly as they were; nothing was planted.
    let (_, b_after) = call(
        "GET",
        &format!("/api/jobs/{}", enc(B_JOB)),
        ADMIN_TOKEN,
        None,
    )
    .await?;
    ensure!(
        b_after["version"] == b_before["version"]
            && b_after["params"] == "secret-of-b"
            && b_after["paused"] != true,
        "team-b's job changed: {b_after}"
    );
    let (code, run_after) = call(
        "GET",
        &format!("/api/runs/{}", enc(&b_run)),
        ADMIN_TOKEN,
        None,
    )
    .await?;
    ensure!(
        code == 200 && run_after["state"] != "cancelled",
        "team-b's run: {code} {run_after}"
    );
    let (code, _) = call(
        "GET",
        &format!("/api/jobs/{}", enc("team-b/planted")),
        ADMIN_TOKEN,
        None,
    )
    .await?;
    ensure!(code == 404, "a job was planted in team-b");

    // A worker token of team-a registers into team-a's groups only.
    let register = |group: &str| {
        let group = group.to_owned();
        let channel = channel.clone();
        async move {
            let mut gw = pb::worker_gateway_client::WorkerGatewayClient::with_interceptor(
                channel,
                Bearer::new(Some(A_WORKER))?,
            );
            let hello = pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Register(pb::Register {
                    worker_id: format!("spy-{}", group.replace('/', "-")),
                    group,
                    handlers: vec!["noop".into()],
                    capacity: 1,
                    ..Default::default()
                })),
            };
            let r = gw.session(futures_util::stream::iter(vec![hello])).await;
            anyhow::Ok(r.map(|_| ()))
        }
    };
    let e = register("team-b/etl")
        .await?
        .expect_err("a team-a worker token registered into team-b's group");
    ensure!(
        e.code() == Code::PermissionDenied && e.message().contains("register.group"),
        "{e:?}"
    );
    // Its own group: past the gate (the follower may send it to the leader).
    if let Err(e) = register("team-a/etl").await? {
        ensure!(
            e.code() != Code::PermissionDenied && e.code() != Code::Unauthenticated,
            "{e:?}"
        );
    }
    Ok(())
}
