//! The audit log: the store keeps entries newest first with paging and retention
//! (memory and a real Redis), and a real two-coordinator cluster records every
//! change made through it — jobs, a kill, live settings, a dead-letter requeue —
//! once, on the node that carried it out, naming the token's holder (never the
//! token), with the state before and after; refused changes record nothing; and
//! changes the CLI writes straight to etcd (`chime config set`, `chime apply`)
//! reach the log through the leader's inbox, named `cli:<user>@<host>`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use chime_coordinator::model::AuditEntry;
use chime_coordinator::store::{MemoryRunStore, RedisRunStore, Retention, RunStore};
use chime_tests::{ADMIN_TOKEN, Cluster, RedisServer, chime_cmd, http, run_chime, wait_until};
use serde_json::{Value, json};

fn entry(at_ms: i64, target: &str) -> AuditEntry {
    AuditEntry {
        id: String::new(),
        at_ms,
        who: "alice".into(),
        action: "job.create".into(),
        target: target.into(),
        before: None,
        after: Some(json!({ "name": target })),
    }
}

fn targets(es: &[AuditEntry]) -> Vec<&str> {
    es.iter().map(|e| e.target.as_str()).collect()
}

/// What every store must do: ids increase, listings are newest first and page
/// back from an id, a bad id is refused naming `before`, and retention by count
/// keeps the newest.
async fn store_round_trip(store: Arc<dyn RunStore>, exact_retention: bool) -> Result<()> {
    ensure!(store.list_audit(10, None).await?.is_empty());
    let now = chime_shared::clock::Clock::now_ms(&chime_shared::clock::SystemClock);
    store
        .append_audit(&[entry(now, "a"), entry(now, "b"), entry(now, "c")])
        .await?;
    store.append_audit(&[entry(now + 1, "d")]).await?;
    store.append_audit(&[]).await?;
    let all = store.list_audit(10, None).await?;
    ensure!(targets(&all) == ["d", "c", "b", "a"], "{all:?}");
    ensure!(
        all.iter()
            .all(|e| chime_coordinator::store::is_audit_id(&e.id)),
        "{all:?}"
    );
    ensure!(
        all[0].after == Some(json!({ "name": "d" })) && all[0].who == "alice",
        "{all:?}"
    );
    let page = store.list_audit(2, Some(&all[1].id)).await?;
    ensure!(targets(&page) == ["b", "a"], "{page:?}");
    ensure!(store.list_audit(2, Some(&all[3].id)).await?.is_empty());
    match store.list_audit(2, Some("x-1")).await {
        Err(e) => ensure!(e.to_string().contains("before"), "{e}"),
        Ok(v) => anyhow::bail!("a bad id was taken: {v:?}"),
    }

    // Count retention (the store under test keeps 50).
    let many: Vec<AuditEntry> = (0..400).map(|i| entry(now + 2, &format!("m{i}"))).collect();
    for chunk in many.chunks(40) {
        store.append_audit(chunk).await?;
    }
    let kept = store.list_audit(1_000, None).await?;
    ensure!(
        kept[0].target == "m399",
        "the newest is kept: {:?}",
        kept[0]
    );
    if exact_retention {
        ensure!(kept.len() == 50, "{} kept", kept.len());
    } else {
        // Redis trims whole stream nodes (100 entries each by default).
        ensure!(
            kept.len() >= 50 && kept.len() <= 50 + 100,
            "{} kept",
            kept.len()
        );
    }
    Ok(())
}

fn small() -> Retention {
    Retention {
        audit_entries: 50,
        ..Retention::default()
    }
}

#[tokio::test]
async fn memory_store_keeps_the_audit_log() -> Result<()> {
    store_round_trip(Arc::new(MemoryRunStore::new(small())), true).await
}

#[tokio::test]
async fn redis_store_keeps_the_audit_log() -> Result<()> {
    let redis = RedisServer::start().await?;
    let store = RedisRunStore::new(redis.conn().await?, "audit-test", small());
    store_round_trip(Arc::new(store), false).await
}

/// A token named in the file, and one that is not (it gets its fingerprint).
const BOB: &str = "bob-token-0123456789abcdef";

#[tokio::test]
async fn changes_through_a_follower_are_audited_with_the_token_s_name() -> Result<()> {
    let c = Cluster::start_ha(2, 0).await?;
    wait_until("a leader", Duration::from_secs(20), || {
        let known = c.leader_index().is_some();
        async move { known }
    })
    .await?;
    let leader = c.leader_index().unwrap_or_default();
    let follower = 1 - leader;
    let api = format!("http://127.0.0.1:{}", c.http_ports[follower]);
    let follower_grpc = format!("http://127.0.0.1:{}", c.coords[follower].0);
    wait_until(
        "the follower to know the leader",
        Duration::from_secs(20),
        || {
            let known = c
                .admin_at(&follower_grpc, &["workers"])
                .is_ok_and(|v| !v["leader"].as_str().unwrap_or_default().is_empty());
            async move { known }
        },
    )
    .await?;

    // Name the admin token "alice" and add bob's, unnamed; both coordinators
    // re-read the file.
    std::fs::write(
        c.dir.path().join("admin.token"),
        format!("{ADMIN_TOKEN} alice\n{BOB}\n"),
    )?;
    wait_until(
        "both coordinators to take bob's token",
        Duration::from_secs(20),
        || async {
            let mut both = true;
            for port in &c.http_ports {
                let url = format!("http://127.0.0.1:{port}/api/jobs");
                both &= matches!(http("GET", &url, Some(BOB), None).await, Ok((200, _)));
            }
            both
        },
    )
    .await?;

    let call = |method: &'static str, path: String, token: &'static str, body: Option<Value>| {
        let url = format!("{api}{path}");
        async move { http(method, &url, Some(token), body).await }
    };
    let job = |handler: &str| {
        json!({ "name": "aud", "group": "g", "handler": handler,
                "schedule": { "kind": "manual" } })
    };

    // Refused changes record nothing.
    let bad = json!({ "name": "aud", "group": "g", "handler": "noop",
                      "schedule": { "kind": "cron", "expr": "nope" } });
    let (code, _) = call("POST", "/api/jobs".into(), ADMIN_TOKEN, Some(bad)).await?;
    ensure!(code == 400, "bad job: {code}");
    let (code, _) = call(
        "PUT",
        "/api/config".into(),
        BOB,
        Some(json!({ "key": "queues/default/visibility_ms", "value": "soon" })),
    )
    .await?;
    ensure!(code == 400, "bad setting: {code}");

    // Jobs, as alice, through the follower (carried out on the leader).
    let (code, created) = call("POST", "/api/jobs".into(), ADMIN_TOKEN, Some(job("noop"))).await?;
    ensure!(code == 201, "create: {code} {created}");
    let mut update = job("log");
    update["version"] = created["version"].clone();
    let (code, body) = call("PUT", "/api/jobs/aud".into(), ADMIN_TOKEN, Some(update)).await?;
    ensure!(code == 200, "update: {code} {body}");
    for step in ["pause", "resume"] {
        let (code, body) = call("POST", format!("/api/jobs/aud/{step}"), ADMIN_TOKEN, None).await?;
        ensure!(code == 200, "{step}: {code} {body}");
    }
    let (code, run) = call("POST", "/api/jobs/aud/trigger".into(), ADMIN_TOKEN, None).await?;
    ensure!(code == 200, "trigger: {code} {run}");
    let run_id = run["run_id"].as_str().unwrap_or_default().to_owned();
    let (code, body) = call(
        "POST",
        format!("/api/runs/{run_id}/kill"),
        ADMIN_TOKEN,
        None,
    )
    .await?;
    ensure!(code == 200, "kill: {code} {body}");
    let (code, body) = call("DELETE", "/api/jobs/aud".into(), ADMIN_TOKEN, None).await?;
    ensure!(code == 200 || code == 204, "delete: {code} {body}");

    // Settings and a requeue, as bob (served by the follower itself).
    for value in ["20000", "25000"] {
        let (code, body) = call(
            "PUT",
            "/api/config".into(),
            BOB,
            Some(json!({ "key": "queues/default/visibility_ms", "value": value })),
        )
        .await?;
        ensure!(code == 200, "set {value}: {code} {body}");
    }
    let (code, body) = call(
        "DELETE",
        "/api/config?key=queues/default/visibility_ms".into(),
        BOB,
        None,
    )
    .await?;
    ensure!(code == 200, "delete setting: {code} {body}");
    let (code, body) = call(
        "POST",
        "/api/queues/dead/requeue".into(),
        BOB,
        Some(json!({ "all": true })),
    )
    .await?;
    ensure!(code == 200, "requeue: {code} {body}");

    let (code, log) = call("GET", "/api/audit?limit=100".into(), BOB, None).await?;
    ensure!(code == 200, "audit: {code} {log}");
    let entries = log["entries"].as_array().cloned().unwrap_or_default();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default())
        .collect();
    ensure!(
        actions
            == [
                "dead_letters.requeue",
                "config.delete",
                "config.set",
                "config.set",
                "job.delete",
                "run.kill",
                "job.trigger",
                "job.resume",
                "job.pause",
                "job.update",
                "job.create",
            ],
        "each change once, newest first: {actions:?}"
    );
    let bob = chime_shared::auth::fingerprint(BOB.as_bytes());
    for e in &entries {
        let who = e["who"].as_str().unwrap_or_default();
        let want = if e["action"]
            .as_str()
            .is_some_and(|a| a.starts_with("job.") || a == "run.kill")
        {
            "alice"
        } else {
            bob.as_str()
        };
        ensure!(who == want, "who of {e}: {who}, want {want}");
    }
    let text = log.to_string();
    ensure!(
        !text.contains(ADMIN_TOKEN) && !text.contains(BOB),
        "a token reached the audit log"
    );
    let at = |action: &str, n: usize| {
        entries
            .iter()
            .filter(|e| e["action"] == action)
            .nth(n)
            .cloned()
            .unwrap_or_default()
    };
    let update = at("job.update", 0);
    ensure!(
        update["target"] == "aud"
            && update["before"]["handler"] == "noop"
            && update["after"]["handler"] == "log",
        "{update}"
    );
    let create = at("job.create", 0);
    ensure!(
        create["before"].is_null() && create["after"]["handler"] == "noop",
        "{create}"
    );
    let pause = at("job.pause", 0);
    ensure!(
        pause["before"]["paused"] == false && pause["after"]["paused"] == true,
        "{pause}"
    );
    let delete = at("job.delete", 0);
    ensure!(
        delete["before"]["handler"] == "log" && delete["after"].is_null(),
        "{delete}"
    );
    ensure!(at("job.trigger", 0)["after"]["run_id"] == run_id.as_str());
    ensure!(at("run.kill", 0)["target"] == run_id.as_str());
    let second = at("config.set", 0);
    ensure!(
        second["target"] == "queues/default/visibility_ms"
            && second["before"] == "20000"
            && second["after"] == "25000",
        "{second}"
    );
    ensure!(at("config.set", 1)["before"].is_null());
    ensure!(at("config.delete", 0)["before"] == "25000");
    ensure!(at("dead_letters.requeue", 0)["after"]["items"] == "all");

    // Pages: three at a time, back from the last id seen.
    let mut paged = Vec::new();
    let mut before = String::new();
    loop {
        let (code, page) = call(
            "GET",
            format!("/api/audit?limit=3&before={before}"),
            BOB,
            None,
        )
        .await?;
        ensure!(code == 200, "page: {code} {page}");
        let page = page["entries"].as_array().cloned().unwrap_or_default();
        let Some(last) = page.last() else { break };
        before = last["id"].as_str().unwrap_or_default().to_owned();
        paged.extend(page);
    }
    ensure!(paged == entries, "paging gave {} entries", paged.len());

    // Bad listings name the field.
    for (query, field) in [("limit=5000", "limit"), ("before=yesterday", "before")] {
        let (code, body) = call("GET", format!("/api/audit?{query}"), BOB, None).await?;
        ensure!(
            code == 400 && body["error"]["field"] == field,
            "{query}: {code} {body}"
        );
    }

    // The CLI prints the same entries, one JSON line each.
    let out = chime_cmd(&["audit", "--coordinator", &follower_grpc, "--limit", "2"])?
        .env("CHIME_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        lines.len() == 2
            && lines[0]["id"] == entries[0]["id"]
            && lines[1]["id"] == entries[1]["id"],
        "{lines:?}"
    );

    // Changes the CLI writes straight to etcd are in the log too: each carries
    // its entries into etcd in the same transaction, and the leader moves them.
    let etcd_cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.insert(1, "--etcd-endpoints");
        all.insert(2, c.etcd.endpoint.as_str());
        run_chime(&all)
    };
    let (code, _, err) = etcd_cli(&["config", "set", "queues/default/visibility_ms", "30000"])?;
    ensure!(code == 0, "config set: {err}");
    let file = c.dir.path().join("applied.yaml");
    std::fs::write(
        &file,
        "kind: job\nname: applied\ngroup: g\nhandler: log\nschedule: { kind: manual }\n",
    )?;
    let file = file.to_string_lossy().into_owned();
    let (code, _, err) = etcd_cli(&["apply", "-f", &file, "--set", "audit"])?;
    ensure!(code == 0, "apply: {err}");
    std::fs::write(&file, "")?;
    let (code, _, err) = etcd_cli(&["apply", "-f", &file, "--set", "audit", "--prune"])?;
    ensure!(code == 0, "prune: {err}");
    let newest = || async {
        match call("GET", "/api/audit?limit=3".into(), BOB, None).await {
            Ok((200, log)) => log["entries"].as_array().cloned().unwrap_or_default(),
            _ => Vec::new(),
        }
    };
    wait_until(
        "the CLI's changes in the audit log",
        Duration::from_secs(20),
        || async {
            newest()
                .await
                .first()
                .is_some_and(|e| e["action"] == "job.delete")
        },
    )
    .await?;
    let newest = newest().await;
    let actions: Vec<&str> = newest
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default())
        .collect();
    ensure!(
        actions == ["job.delete", "job.create", "config.set"],
        "each CLI change once, newest first: {actions:?}"
    );
    for e in &newest {
        ensure!(
            e["who"].as_str().is_some_and(|w| w.starts_with("cli:")),
            "who of {e}"
        );
    }
    ensure!(
        newest[2]["before"].is_null()
            && newest[2]["after"] == "30000"
            && newest[1]["after"]["handler"] == "log"
            && newest[0]["before"]["name"] == "applied",
        "{newest:?}"
    );
    // The inbox is empty once moved.
    let src = chime_shared::config::source::EtcdSource::new(c.etcd.client().await?, "/chime/");
    let inbox = chime_shared::config::source::ConfigSource::list_under(
        &src,
        chime_coordinator::audit::INBOX,
    )
    .await?;
    ensure!(
        inbox.entries.is_empty(),
        "left in the inbox: {:?}",
        inbox.entries
    );
    Ok(())
}
