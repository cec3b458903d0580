//! Roles on admin tokens against a real two-coordinator cluster (real Redis and
//! etcd), the way someone holding a lesser token would try: every change a viewer
//! attempts through the follower (which forwards to the leader) and the CLI is
//! refused `403 permission_denied` / `PERMISSION_DENIED` naming the token, and
//! changes nothing, audit log included; an operator acts on jobs but cannot define
//! or delete them, nor change settings; the admin can. The per-route table is
//! checked in the coordinator's unit tests (every route, every role); this is the
//! same rule end to end, token file reload included.

use std::time::Duration;

use anyhow::{Result, ensure};
use chime_tests::{ADMIN_TOKEN, Cluster, chime_cmd, http, wait_until};
use serde_json::{Value, json};

const VIEWER: &str = "viewer-token-0123456789abcdef";
const OPERATOR: &str = "operator-token-0123456789abcdef";

#[tokio::test]
async fn a_viewer_reads_an_operator_acts_and_only_an_admin_defines() -> Result<()> {
    let c = Cluster::start_ha(2, 0).await?;
    let (api, follower_grpc) = c.follower().await?;

    // Roles come from the token file, re-read by the running coordinators.
    std::fs::write(
        c.dir.path().join("admin.token"),
        format!(
            "{ADMIN_TOKEN} ci\n{VIEWER} grafana role=viewer\n{OPERATOR} oncall role=operator\n"
        ),
    )?;
    wait_until(
        "both coordinators to take the new tokens",
        Duration::from_secs(20),
        || async {
            let mut both = true;
            for port in &c.http_ports {
                let url = format!("http://127.0.0.1:{port}/api/session");
                both &= matches!(
                    http("GET", &url, Some(OPERATOR), None).await,
                    Ok((200, b)) if b["role"] == "operator"
                );
            }
            both
        },
    )
    .await?;
    let call = |method: &'static str, path: &str, token: &'static str, body: Option<Value>| {
        let url = format!("{api}{path}");
        async move { http(method, &url, Some(token), body).await }
    };
    let job = json!({ "name": "rj", "group": "g", "handler": "noop",
                      "schedule": { "kind": "manual" } });
    let (code, b) = call("POST", "/api/jobs", ADMIN_TOKEN, Some(job.clone())).await?;
    ensure!(code == 201, "admin creates: {code} {b}");
    let audit_len = |token| async move {
        let (_, b) = call("GET", "/api/audit", token, None).await?;
        anyhow::Ok(b["entries"].as_array().map_or(0, Vec::len))
    };
    let before = audit_len(VIEWER).await?;

    // The viewer reads everything...
    for path in [
        "/api/jobs",
        "/api/jobs/rj",
        "/api/runs",
        "/api/workers",
        "/api/audit",
        "/api/alerts",
        "/api/queues",
        "/api/queues/dead",
        "/api/config",
    ] {
        let (code, b) = call("GET", path, VIEWER, None).await?;
        ensure!(code == 200, "viewer reads {path}: {code} {b}");
    }
    // ...and every change is refused, naming the token, never changing a thing.
    let mut changed = job.clone();
    changed["handler"] = json!("log");
    changed["version"] = json!(1);
    for (method, path, body) in [
        (
            "POST",
            "/api/jobs",
            Some(
                json!({"name": "other", "group": "g", "handler": "noop", "schedule": {"kind": "manual"}}),
            ),
        ),
        ("PUT", "/api/jobs/rj", Some(changed.clone())),
        ("DELETE", "/api/jobs/rj", None),
        ("POST", "/api/jobs/rj/pause", None),
        ("POST", "/api/jobs/rj/trigger", None),
        (
            "PUT",
            "/api/config",
            Some(json!({"key": "queues/default/visibility_ms", "value": "60000"})),
        ),
        ("PUT", "/api/alerts/x", Some(json!({"kind": "job_failed"}))),
        ("POST", "/api/queues/dead/requeue", Some(json!({}))),
        ("POST", "/api/queues/items", Some(json!({"items": []}))),
    ] {
        let (code, b) = call(method, path, VIEWER, body).await?;
        ensure!(
            code == 403 && b["error"]["code"] == "permission_denied",
            "viewer {method} {path}: {code} {b}"
        );
        let msg = b["error"]["message"].as_str().unwrap_or_default();
        ensure!(
            msg.contains("grafana") && msg.contains("viewer") && !msg.contains(VIEWER),
            "the refusal names the token, not the secret: {msg}"
        );
    }
    let (_, j) = call("GET", "/api/jobs/rj", VIEWER, None).await?;
    ensure!(
        j["handler"] == "noop" && j["paused"] != true,
        "unchanged: {j}"
    );
    let (_, jobs) = call("GET", "/api/jobs", VIEWER, None).await?;
    ensure!(
        !jobs.to_string().contains("\"other\""),
        "nothing created: {jobs}"
    );
    ensure!(
        audit_len(VIEWER).await? == before,
        "refused changes record nothing"
    );

    // The CLI (gRPC, through the follower): reads pass, changes are refused.
    let cli = |token: &'static str, args: &[&str]| {
        let mut all = args.to_vec();
        all.insert(1, "--coordinator");
        all.insert(2, &follower_grpc);
        let out =
            chime_cmd(&all).and_then(|mut cmd| Ok(cmd.env("CHIME_ADMIN_TOKEN", token).output()?));
        out.map(|o| {
            (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
    };
    let (code, err) = cli(VIEWER, &["job", "list"])?;
    ensure!(code == 0, "viewer lists jobs: {err}");
    let (code, err) = cli(VIEWER, &["job", "delete", "rj"])?;
    ensure!(
        code != 0 && err.contains("grafana") && err.contains("viewer"),
        "viewer deletes: {code} {err}"
    );

    // The operator acts, but does not define.
    let (code, b) = call("POST", "/api/jobs/rj/pause", OPERATOR, None).await?;
    ensure!(code == 200, "operator pauses: {code} {b}");
    let (code, b) = call("POST", "/api/jobs/rj/resume", OPERATOR, None).await?;
    ensure!(code == 200, "operator resumes: {code} {b}");
    let (code, err) = cli(OPERATOR, &["job", "trigger", "rj"])?;
    ensure!(code == 0, "operator triggers: {err}");
    for (method, path, body) in [
        ("DELETE", "/api/jobs/rj", None),
        ("PUT", "/api/jobs/rj", Some(changed.clone())),
        (
            "PUT",
            "/api/config",
            Some(json!({"key": "queues/default/visibility_ms", "value": "60000"})),
        ),
    ] {
        let (code, b) = call(method, path, OPERATOR, body).await?;
        ensure!(code == 403, "operator {method} {path}: {code} {b}");
    }
    // Each refusal is a log line of the coordinator that refused it, naming the
    // token and the role it lacked, never the secret.
    let logs = || {
        c.coords
            .iter()
            .filter_map(|(_, p)| p.as_ref().map(|p| p.log()))
            .collect::<String>()
    };
    let refusal_logged = |name: &str| {
        logs().lines().any(|l| {
            l.contains("refused: the token's role is too low")
                && l.contains(name)
                && l.contains("need=admin")
        })
    };
    wait_until("the refusals in the logs", Duration::from_secs(10), || {
        let both = refusal_logged("grafana") && refusal_logged("oncall");
        async move { both }
    })
    .await?;
    let text = logs();
    ensure!(
        !text.contains(VIEWER) && !text.contains(OPERATOR),
        "a token reached a log"
    );

    // The audit names the operator's token, never the secret.
    let (_, audit) = call("GET", "/api/audit", ADMIN_TOKEN, None).await?;
    let text = audit.to_string();
    ensure!(
        text.contains("\"oncall\"") && text.contains("job.pause") && !text.contains(OPERATOR),
        "{audit}"
    );

    // The admin defines.
    let (code, b) = call("DELETE", "/api/jobs/rj", ADMIN_TOKEN, None).await?;
    ensure!(code == 200 || code == 204, "admin deletes: {code} {b}");
    Ok(())
}
