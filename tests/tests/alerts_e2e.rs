//! Alerts end to end: two coordinators, a worker, real Redis and etcd, and real
//! local receivers — an HTTP server standing in for a webhook, Slack, DingTalk and
//! Feishu, and an SMTP server. A job that fails, a dead letter and a stalled queue
//! each reach every sink once within 10 s and resolve once; the leader is killed
//! (SIGKILL) between the alerts and their recoveries, and no notice is lost or
//! doubled by it; a sink that refuses connections delays no other.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use chime_tests::receivers::{HttpReceiver, SmtpReceiver};
use chime_tests::{ADMIN_TOKEN, Cluster, free_port, http, wait_until};
use serde_json::{Value, json};

/// (rule, FIRING|RESOLVED) of every notice a sink got, counted.
type Counts = BTreeMap<(String, String), usize>;

fn headline(text: &str) -> Option<(String, String)> {
    for status in ["FIRING", "RESOLVED"] {
        if let Some(at) = text.find(&format!("[{status}] ")) {
            let rule: String = text[at + status.len() + 3..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            return Some((rule, status.to_owned()));
        }
    }
    None
}

struct Sinks {
    web: HttpReceiver,
    smtp: SmtpReceiver,
}

impl Sinks {
    /// Counts per sink: webhook (its JSON), slack, dingtalk, feishu (their text),
    /// email (its subject).
    fn counts(&self) -> Result<BTreeMap<&'static str, Counts>> {
        let mut out: BTreeMap<&'static str, Counts> = BTreeMap::new();
        for r in self.web.requests("/webhook") {
            let n: Value = serde_json::from_slice(&r.body)?;
            let status = n["status"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_uppercase();
            let rule = n["rule"].as_str().unwrap_or_default().to_owned();
            *out.entry("webhook")
                .or_default()
                .entry((rule, status))
                .or_default() += 1;
        }
        for (sink, path) in [
            ("slack", "/slack"),
            ("dingtalk", "/dingtalk"),
            ("feishu", "/feishu"),
        ] {
            for r in self.web.requests(path) {
                let Some(k) = headline(&r.text()) else {
                    bail!("{sink} got a notice without a headline: {}", r.text());
                };
                *out.entry(sink).or_default().entry(k).or_default() += 1;
            }
        }
        for m in self.smtp.mails() {
            let subject = m.header("Subject").unwrap_or_default();
            let Some(k) = headline(&subject) else {
                bail!("a mail without a headline: {subject}");
            };
            *out.entry("email").or_default().entry(k).or_default() += 1;
        }
        Ok(out)
    }

    /// Whether every sink got `rule`'s `status` notice at least once.
    fn all_got(&self, rule: &str, status: &str) -> bool {
        self.counts().is_ok_and(|c| {
            ["webhook", "slack", "dingtalk", "feishu", "email"]
                .iter()
                .all(|s| {
                    c.get(s)
                        .and_then(|m| m.get(&(rule.to_owned(), status.to_owned())))
                        .is_some_and(|n| *n >= 1)
                })
        })
    }
}

async fn call(api: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let (code, v) = http(method, &format!("{api}{path}"), Some(ADMIN_TOKEN), body).await?;
    ensure!((200..300).contains(&code), "{method} {path}: {code} {v}");
    Ok(v)
}

#[tokio::test]
async fn failures_dead_letters_and_lag_alert_every_sink_once_across_a_leader_kill() -> Result<()> {
    let mut c = Cluster::start_ha(2, 0).await?;
    wait_until("a leader", Duration::from_secs(20), || {
        let known = c.leader_index().is_some();
        async move { known }
    })
    .await?;
    let sinks = Sinks {
        web: HttpReceiver::start().await?,
        smtp: SmtpReceiver::start().await?,
    };
    let refused = format!("http://127.0.0.1:{}/gone", free_port()?);
    let w = c.queue_worker("qw1", &[], &[])?;
    c.workers.push(("qw1".into(), w));
    c.wait_workers(1).await?;

    let sink_list = |extra: Option<Value>| {
        let mut v = vec![
            json!({ "kind": "webhook", "url": sinks.web.url("/webhook"), "secret": "hook-secret" }),
            json!({ "kind": "slack", "url": sinks.web.url("/slack/T0/B0/x") }),
            json!({ "kind": "dingtalk", "url": sinks.web.url("/dingtalk/robot/send?access_token=t"), "secret": "SECd" }),
            json!({ "kind": "feishu", "url": sinks.web.url("/feishu/open-apis/bot/v2/hook/x"), "secret": "fs" }),
            json!({ "kind": "email", "smtp": sinks.smtp.addr(), "from": "chime@example.com", "to": ["ops@example.com"] }),
        ];
        v.extend(extra);
        Value::from(v)
    };
    let api0 = format!("http://127.0.0.1:{}", c.http_ports[0]);
    let rules = [
        json!({ "name": "job-fails", "condition": { "kind": "run_failed" },
                "scope": { "job": "flaky" },
                "sinks": sink_list(Some(json!({ "kind": "webhook", "url": refused }))) }),
        json!({ "name": "dead", "condition": { "kind": "dead_letters" }, "sinks": sink_list(None) }),
        json!({ "name": "lag", "condition": { "kind": "queue_lag", "above_ms": 2000 },
                "sinks": sink_list(None) }),
    ];
    // A bad rule is refused naming its field, and stores nothing.
    let (code, body) = http(
        "PUT",
        &format!("{api0}/api/alerts/bad"),
        Some(ADMIN_TOKEN),
        Some(
            json!({ "name": "bad", "condition": { "kind": "queue_lag", "above_ms": 1 },
                     "sinks": sink_list(None) }),
        ),
    )
    .await?;
    ensure!(
        code == 400 && body["error"]["field"] == "condition.above_ms",
        "{code} {body}"
    );
    for r in &rules {
        call(
            &api0,
            "PUT",
            &format!("/api/alerts/{}", r["name"].as_str().unwrap_or_default()),
            Some(r.clone()),
        )
        .await?;
    }
    // Both coordinators follow the rules.
    wait_until(
        "both coordinators to follow the 3 rules",
        Duration::from_secs(10),
        || async {
            let mut all = true;
            for port in &c.http_ports {
                let v = call(
                    &format!("http://127.0.0.1:{port}"),
                    "GET",
                    "/api/alerts",
                    None,
                )
                .await;
                all &= v.is_ok_and(|v| v["rules"].as_array().map_or(0, Vec::len) == 3);
            }
            all
        },
    )
    .await?;

    // 1. A run that fails, and a dead letter.
    call(
        &api0,
        "POST",
        "/api/jobs",
        Some(
            json!({ "name": "flaky", "group": "default", "handler": "fail",
                     "schedule": { "kind": "manual" } }),
        ),
    )
    .await?;
    let t0 = Instant::now();
    call(&api0, "POST", "/api/jobs/flaky/trigger", None).await?;
    call(
        &api0,
        "POST",
        "/api/queues/items",
        Some(json!({ "items": [{ "id": "poison", "handler": "fail", "max_attempts": 1 }] })),
    )
    .await?;
    wait_until(
        "the failure and the dead letter at every sink",
        Duration::from_secs(20),
        || async { sinks.all_got("job-fails", "FIRING") && sinks.all_got("dead", "FIRING") },
    )
    .await?;
    let took = t0.elapsed();
    ensure!(
        took < Duration::from_secs(10),
        "the first alerts took {took:?}"
    );
    let hook = &sinks.web.requests("/webhook")[0];
    ensure!(
        hook.header("x-chime-signature")
            .is_some_and(|s| s.starts_with("sha256="))
            && hook.header("x-chime-notice-id").is_some(),
        "webhook headers: {:?}",
        hook.headers
    );
    let mail = &sinks.smtp.mails()[0];
    ensure!(
        mail.from == "chime@example.com" && mail.to == ["ops@example.com"],
        "{mail:?}"
    );

    // 2. The leader dies (SIGKILL); the other takes over from the saved state.
    let leader = c.leader_index().unwrap_or_default();
    c.kill_coordinator_at(leader);
    let survivor = format!("http://127.0.0.1:{}", c.http_ports[1 - leader]);
    wait_until("the survivor to lead", Duration::from_secs(20), || {
        let leads = c.leader_index() == Some(1 - leader);
        async move { leads }
    })
    .await?;

    // 3. Recoveries, told by the new leader: the job succeeds, the dead letter goes.
    let job = call(&survivor, "GET", "/api/jobs/flaky", None).await?;
    call(
        &survivor,
        "PUT",
        "/api/jobs/flaky",
        Some(
            json!({ "name": "flaky", "group": "default", "handler": "noop",
                     "schedule": { "kind": "manual" }, "version": job["version"] }),
        ),
    )
    .await?;
    call(&survivor, "POST", "/api/jobs/flaky/trigger", None).await?;
    call(
        &survivor,
        "POST",
        "/api/queues/item/cancel",
        Some(json!({ "id": "poison" })),
    )
    .await?;
    wait_until(
        "both recoveries at every sink",
        Duration::from_secs(30),
        || async { sinks.all_got("job-fails", "RESOLVED") && sinks.all_got("dead", "RESOLVED") },
    )
    .await?;

    // 4. A stalled queue: no worker while an item is due; then one drains it.
    let (_, mut w) = c.workers.pop().expect("the worker");
    w.signal("TERM")?;
    w.wait_exit(Duration::from_secs(20)).await?;
    call(
        &survivor,
        "POST",
        "/api/queues/items",
        Some(json!({ "items": [{ "id": "late", "handler": "noop" }] })),
    )
    .await?;
    let t1 = Instant::now();
    wait_until(
        "the lag alert at every sink",
        Duration::from_secs(20),
        || async { sinks.all_got("lag", "FIRING") },
    )
    .await?;
    // 2 s of lag to cross, sampled each second: told within 10 s of crossing.
    ensure!(
        t1.elapsed() < Duration::from_secs(12),
        "the lag alert took {:?}",
        t1.elapsed()
    );
    let w = c.queue_worker("qw2", &[], &[])?;
    c.workers.push(("qw2".into(), w));
    wait_until(
        "the lag's recovery at every sink",
        Duration::from_secs(30),
        || async { sinks.all_got("lag", "RESOLVED") },
    )
    .await?;

    // Nothing more comes (a repeat or a duplicate would show within a few ticks),
    // and every sink got each notice exactly once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = sinks.counts()?;
    let want: Counts = ["job-fails", "dead", "lag"]
        .iter()
        .flat_map(|r| ["FIRING", "RESOLVED"].map(|s| ((r.to_string(), s.to_owned()), 1usize)))
        .collect();
    for sink in ["webhook", "slack", "dingtalk", "feishu", "email"] {
        ensure!(
            counts.get(sink) == Some(&want),
            "{sink} got {:?}, want each notice once",
            counts.get(sink)
        );
    }
    let (_, alerts) = http(
        "GET",
        &format!("{survivor}/api/alerts"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    ensure!(
        alerts["firing"].as_array().is_some_and(Vec::is_empty),
        "still firing: {alerts}"
    );
    Ok(())
}

/// Runs `chime alert …` against etcd at `endpoint`; answers (exit code, stdout, stderr).
fn alert_cli(endpoint: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let mut all = vec!["alert", "--etcd-endpoints", endpoint];
    all.extend_from_slice(args);
    let out = chime_tests::chime_cmd(&all)?.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `chime alert apply` is declarative: all rules or none, unchanged ones left
/// alone, `--prune` deletes the rest; `put`, `get`, `list`, `delete` do the rest.
#[tokio::test]
async fn chime_alert_apply_is_all_or_none_and_idempotent() -> Result<()> {
    let etcd = chime_tests::EtcdServer::start().await?;
    let dir = chime_tests::TestDir::new("alert-cli")?;
    let ep = etcd.endpoint.clone();
    let hook = json!({ "kind": "webhook", "url": "https://ops.example.com/chime" });
    let rule = |name: &str, above_ms: u64| {
        json!({ "name": name, "condition": { "kind": "queue_lag", "above_ms": above_ms },
                "sinks": [hook.clone()] })
    };
    let good = dir.path().join("good");
    std::fs::create_dir_all(&good)?;
    std::fs::write(good.join("a.json"), rule("lag-a", 5_000).to_string())?;
    std::fs::write(
        good.join("b.json"),
        Value::from(vec![rule("lag-b", 6_000)]).to_string(),
    )?;
    std::fs::write(good.join("notes.txt"), "not a rule")?;

    let (code, out, err) = alert_cli(&ep, &["apply", &good.to_string_lossy()])?;
    ensure!(code == 0, "apply: {err}");
    let v: Value = serde_json::from_str(out.trim())?;
    ensure!(v["applied"] == json!(["lag-a", "lag-b"]), "{v}");
    let (_, out, _) = alert_cli(&ep, &["apply", &good.to_string_lossy()])?;
    let v: Value = serde_json::from_str(out.trim())?;
    ensure!(
        v["applied"] == json!([])
            && v["unchanged"] == json!(["lag-a", "lag-b"])
            && v["revision"].is_null(),
        "a second apply changed something: {v}"
    );

    // One bad rule: refused naming the file and the field, nothing written.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        Value::from(vec![rule("lag-a", 9_000), rule("lag-c", 10)]).to_string(),
    )?;
    let (code, _, err) = alert_cli(&ep, &["apply", &bad.to_string_lossy()])?;
    ensure!(
        code != 0 && err.contains("bad.json") && err.contains("condition.above_ms"),
        "bad apply: {code} {err}"
    );
    let (_, out, _) = alert_cli(&ep, &["get", "lag-a"])?;
    let v: Value = serde_json::from_str(out.trim())?;
    ensure!(
        v["rule"]["condition"]["above_ms"] == 5_000,
        "a refused apply wrote: {v}"
    );

    // A change and a prune.
    let one = dir.path().join("one.json");
    std::fs::write(&one, rule("lag-a", 7_000).to_string())?;
    let (code, out, err) = alert_cli(&ep, &["apply", &one.to_string_lossy(), "--prune"])?;
    ensure!(code == 0, "prune: {err}");
    let v: Value = serde_json::from_str(out.trim())?;
    ensure!(
        v["applied"] == json!(["lag-a"]) && v["deleted"] == json!(["lag-b"]),
        "{v}"
    );
    let (_, out, _) = alert_cli(&ep, &["list"])?;
    let names: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["rule"]["name"].as_str().map(str::to_owned))
        .collect();
    ensure!(names == ["lag-a"], "{names:?}");
    let (code, _, _) = alert_cli(&ep, &["delete", "lag-a"])?;
    ensure!(code == 0);
    let (code, _, err) = alert_cli(&ep, &["get", "lag-a"])?;
    ensure!(code != 0 && err.contains("not found"), "{err}");
    Ok(())
}
