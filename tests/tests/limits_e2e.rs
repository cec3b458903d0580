//! Every input limit answers `invalid_argument` naming the field and stores nothing:
//! names (length, characters), params, shards, the schedule floor, item payloads,
//! ids, batches, and the gRPC message size. Real Redis, etcd and coordinator.

use anyhow::{Result, ensure};
use chime_shared::auth::Bearer;
use chime_tests::{ADMIN_TOKEN, Cluster, http, pending_items};
use proto as pb;
use serde_json::{Value, json};

fn job(overrides: Value) -> Value {
    let mut j = json!({ "name": "ok", "group": "g", "handler": "noop",
                        "schedule": { "kind": "manual" } });
    for (k, v) in overrides.as_object().into_iter().flatten() {
        j[k] = v.clone();
    }
    j
}

async fn refused(api: &str, path: &str, body: Value, field: &str) -> Result<()> {
    let (code, b) = http(
        "POST",
        &format!("{api}{path}"),
        Some(ADMIN_TOKEN),
        Some(body),
    )
    .await?;
    ensure!(
        code == 400 && b["error"]["code"] == "invalid_argument" && b["error"]["field"] == field,
        "{path} expected invalid {field}, got {code} {b}"
    );
    Ok(())
}

async fn nothing_stored(api: &str) -> Result<()> {
    let (_, jobs) = http("GET", &format!("{api}/api/jobs"), Some(ADMIN_TOKEN), None).await?;
    ensure!(
        jobs["jobs"].as_array().is_some_and(Vec::is_empty),
        "jobs stored: {jobs}"
    );
    let pending = pending_items(api).await?;
    ensure!(pending == 0, "{pending} items stored");
    Ok(())
}

#[tokio::test]
async fn every_limit_names_its_field_and_stores_nothing() -> Result<()> {
    let mut c = Cluster::start(0).await?;
    // A cluster whose operators allow no job to fire more often than every 5 s.
    c.kill_coordinator();
    c.min_period_ms = 5_000;
    c.start_coordinator(0)?;
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);
    chime_tests::wait_until(
        "the coordinator is back",
        std::time::Duration::from_secs(20),
        || async {
            matches!(
                http("GET", &format!("{api}/readyz"), None, None).await,
                Ok((200, _))
            )
        },
    )
    .await?;

    let cases = [
        (job(json!({ "name": "x".repeat(129) })), "name"),
        (job(json!({ "name": "no spaces" })), "name"),
        (job(json!({ "group": "" })), "group"),
        (job(json!({ "handler": "bad/handler" })), "handler"),
        (
            job(json!({ "params": "p".repeat(64 * 1024 + 1) })),
            "params",
        ),
        (
            job(json!({ "routing": "sharding_broadcast", "shard_count": 10_001 })),
            "shard_count",
        ),
        (
            job(json!({ "schedule": { "kind": "cron", "expr": "*/2 * * * * *" } })),
            "schedule.expr",
        ),
        (
            job(json!({ "schedule": { "kind": "fixed_rate", "every_ms": 1_000 } })),
            "schedule.every_ms",
        ),
        (
            job(json!({ "schedule": { "kind": "fixed_delay", "delay_ms": 50 } })),
            "schedule.delay_ms",
        ),
        (
            job(json!({ "schedule": { "kind": "cron", "expr": "0 0 30 2 *" } })),
            "schedule.expr",
        ),
        (job(json!({ "retries": 101 })), "retries"),
    ];
    for (body, field) in cases {
        refused(&api, "/api/jobs", body, field).await?;
    }
    // At the floor is fine (and the cron floor looks at the shortest gap).
    let (code, b) = http(
        "POST",
        &format!("{api}/api/jobs"),
        Some(ADMIN_TOKEN),
        Some(job(
            json!({ "name": "slow", "schedule": { "kind": "cron", "expr": "*/5 * * * * *" } }),
        )),
    )
    .await?;
    ensure!(code == 201, "{code} {b}");
    let (code, _) = http(
        "DELETE",
        &format!("{api}/api/jobs/slow"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    ensure!(code == 200);

    let item = |extra: Value| {
        let mut i = json!({ "id": "i", "handler": "noop" });
        for (k, v) in extra.as_object().into_iter().flatten() {
            i[k] = v.clone();
        }
        json!({ "items": [{ "id": "fine", "handler": "noop" }, i] })
    };
    let item_cases = [
        (
            item(json!({ "payload": "x".repeat(64 * 1024 + 1) })),
            "items[1].payload",
        ),
        (item(json!({ "id": "i".repeat(513) })), "items[1].id"),
        (item(json!({ "handler": "has space" })), "items[1].handler"),
        (item(json!({ "max_attempts": 0 })), "items[1].max_attempts"),
        (
            item(json!({ "due_at_ms": 253_402_300_800_000i64 })),
            "items[1].due_at_ms",
        ),
        (
            item(json!({ "merge_key": "m".repeat(513) })),
            "items[1].merge_key",
        ),
    ];
    for (body, field) in item_cases {
        refused(&api, "/api/queues/items", body, field).await?;
    }
    let many: Vec<Value> = (0..100_001)
        .map(|i| json!({ "id": i.to_string(), "handler": "h" }))
        .collect();
    // Over the body limit (512 KiB) long before the batch limit. The server answers
    // 413 once it has read 512 KiB and closes the connection, so a client still
    // writing the rest may meet the reset before it reads the answer: both are a
    // refusal, and either way nothing is stored.
    match http(
        "POST",
        &format!("{api}/api/queues/items"),
        Some(ADMIN_TOKEN),
        Some(json!({ "items": many })),
    )
    .await
    {
        Ok((code, b)) => ensure!(
            code == 413 || (code == 400 && b["error"]["field"] == "items"),
            "{code} {b}"
        ),
        Err(e) => {
            let chain = format!("{e:#}").to_lowercase();
            ensure!(
                chain.contains("broken pipe") || chain.contains("connection reset"),
                "oversized body: {chain}"
            );
        }
    }
    nothing_stored(&api).await?;

    // gRPC: a message over the size limit is refused before it is decoded.
    let channel = tonic::transport::Endpoint::from_shared(c.coordinator.clone())?
        .connect()
        .await?;
    let mut admin =
        pb::admin_client::AdminClient::with_interceptor(channel, Bearer::new(Some(ADMIN_TOKEN))?)
            .max_encoding_message_size(64 * 1024 * 1024);
    let mut j = pb::Job {
        name: "huge".into(),
        group: "g".into(),
        handler: "noop".into(),
        ..Default::default()
    };
    j.schedule = Some(pb::Schedule {
        kind: Some(pb::schedule::Kind::Manual(pb::Manual {})),
    });
    j.shard_params = vec!["x".repeat(1024 * 1024); 5];
    let e = admin
        .create_job(pb::CreateJobRequest { job: Some(j) })
        .await
        .expect_err("a 5 MiB message was accepted");
    ensure!(
        e.message().contains("too large") || e.message().contains("limit"),
        "{e:?}"
    );
    // A field-level refusal over gRPC carries the field as metadata too.
    let mut j = pb::Job {
        name: "bad name".into(),
        group: "g".into(),
        handler: "noop".into(),
        ..Default::default()
    };
    j.schedule = Some(pb::Schedule {
        kind: Some(pb::schedule::Kind::Manual(pb::Manual {})),
    });
    let e = admin
        .create_job(pb::CreateJobRequest { job: Some(j) })
        .await
        .expect_err("bad name accepted");
    ensure!(e.code() == tonic::Code::InvalidArgument, "{e:?}");
    ensure!(
        e.metadata()
            .get("chime-field")
            .and_then(|v| v.to_str().ok())
            == Some("name"),
        "{e:?}"
    );
    nothing_stored(&api).await?;
    Ok(())
}

/// `CreateJobs` stores every job of a batch or none, through a follower as well as
/// the leader: a bad job is named by its index, a name given twice or already taken
/// is refused, and a refused batch leaves nothing behind.
#[tokio::test]
async fn create_jobs_stores_all_or_none_through_a_follower() -> Result<()> {
    use std::time::Duration;
    let c = Cluster::start_ha(2, 0).await?;
    chime_tests::wait_until("a leader", Duration::from_secs(20), || {
        let known = c.leader_index().is_some();
        async move { known }
    })
    .await?;
    let leader = c.leader_index().unwrap_or_default();
    let follower = format!("http://127.0.0.1:{}", c.coords[1 - leader].0);
    chime_tests::wait_until(
        "the follower to know the leader",
        Duration::from_secs(20),
        || {
            let known = c
                .admin_at(&follower, &["workers"])
                .is_ok_and(|v| !v["leader"].as_str().unwrap_or_default().is_empty());
            async move { known }
        },
    )
    .await?;
    let channel = tonic::transport::Endpoint::from_shared(follower)?
        .connect()
        .await?;
    let admin =
        pb::admin_client::AdminClient::with_interceptor(channel, Bearer::new(Some(ADMIN_TOKEN))?);
    let manual = |name: &str| pb::Job {
        name: name.into(),
        group: "g".into(),
        handler: "noop".into(),
        schedule: Some(pb::Schedule {
            kind: Some(pb::schedule::Kind::Manual(pb::Manual {})),
        }),
        ..Default::default()
    };
    let api = format!("http://127.0.0.1:{}", c.http_ports[leader]);
    let refused = |jobs: Vec<pb::Job>| {
        let mut admin = admin.clone();
        async move {
            admin
                .create_jobs(pb::CreateJobsRequest { jobs })
                .await
                .map(|_| ())
                .expect_err("a bad batch was accepted")
        }
    };
    let field = |e: &tonic::Status| {
        e.metadata()
            .get("chime-field")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    let e = refused(vec![manual("a"), manual("b"), manual("bad name")]).await;
    ensure!(
        e.code() == tonic::Code::InvalidArgument && field(&e).as_deref() == Some("jobs[2].name"),
        "{e:?}"
    );
    let e = refused(vec![manual("a"), manual("a")]).await;
    ensure!(field(&e).as_deref() == Some("jobs[1].name"), "{e:?}");
    // The floor is checked once per distinct schedule, and for each of them.
    let every = |name: &str, every_ms: u64| pb::Job {
        schedule: Some(pb::Schedule {
            kind: Some(pb::schedule::Kind::FixedRate(pb::FixedRate { every_ms })),
        }),
        ..manual(name)
    };
    let e = refused(vec![every("a", 1_000), every("b", 1_000), every("c", 10)]).await;
    ensure!(
        field(&e).as_deref() == Some("jobs[2].schedule.every_ms"),
        "{e:?}"
    );
    let e = refused((0..101).map(|i| manual(&format!("j{i}"))).collect()).await;
    ensure!(field(&e).as_deref() == Some("jobs"), "{e:?}");
    let e = refused(Vec::new()).await;
    ensure!(field(&e).as_deref() == Some("jobs"), "{e:?}");
    nothing_stored(&api).await?;

    let made = admin
        .clone()
        .create_jobs(pb::CreateJobsRequest {
            jobs: vec![manual("c"), manual("a"), manual("b")],
        })
        .await?
        .into_inner()
        .jobs;
    let names: Vec<&str> = made.iter().map(|j| j.name.as_str()).collect();
    ensure!(names == ["c", "a", "b"], "{names:?}");
    ensure!(made.iter().all(|j| j.version > 0), "{made:?}");

    // One name taken: the batch is refused, naming it, and its new job not stored.
    let e = refused(vec![manual("d"), manual("b")]).await;
    ensure!(
        e.code() == tonic::Code::AlreadyExists && e.message().contains("\"b\""),
        "{e:?}"
    );
    let (_, jobs) = http("GET", &format!("{api}/api/jobs"), Some(ADMIN_TOKEN), None).await?;
    ensure!(
        jobs["jobs"].as_array().map_or(0, Vec::len) == 3,
        "a refused batch stored something: {jobs}"
    );
    Ok(())
}
