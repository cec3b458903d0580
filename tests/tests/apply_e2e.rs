//! `chime apply` and `chime export` against a real etcd: a directory of YAML and
//! JSON (a job, a workflow naming it, a live setting, an alert rule) planned with
//! `--dry-run` (nothing written), applied, applied again (nothing written), changed
//! (the plan names the changed field), refused when one document is bad (naming its
//! file, document and field; nothing written), pruned within its set only; and
//! exported, applied to an empty etcd and exported again: the two exports equal.

use anyhow::{Result, ensure};
use chime_shared::config::source::ConfigSource;
use chime_tests::{EtcdServer, TestDir, run_chime};
use serde_json::Value;

const JOBS: &str = r#"
kind: job
name: nightly
group: default
handler: log
schedule: { kind: cron, expr: "0 0 2 * * *" }
---
kind: workflow
name: etl
group: default
schedule: { kind: manual }
workflow:
  nodes:
    - { name: count, handler: log }
    - { name: push, job: nightly, after: [{ node: count }] }
"#;

const SETTINGS: &str = "kind: setting\nkey: queues/default/count\nvalue: 16\n";

const ALERTS: &str = r#"[{"kind": "alert", "name": "lag",
  "condition": {"kind": "queue_lag", "above_ms": 2000},
  "sinks": [{"kind": "webhook", "url": "https://ops.example.com/chime"}]}]"#;

/// `chime <args> --etcd-endpoints <etcd>`: exit code, stdout's last line as JSON
/// (Null when none), stderr.
fn chime(etcd: &EtcdServer, args: &[&str]) -> Result<(i32, Value, String)> {
    let mut all = args.to_vec();
    all.extend(["--etcd-endpoints", etcd.endpoint.as_str()]);
    let (code, out, err) = run_chime(&all)?;
    let last = out.lines().last().unwrap_or("");
    Ok((code, serde_json::from_str(last).unwrap_or(Value::Null), err))
}

fn export(etcd: &EtcdServer) -> Result<String> {
    let (code, out, err) = run_chime(&["export", "--etcd-endpoints", etcd.endpoint.as_str()])?;
    ensure!(code == 0, "export failed: {err}");
    Ok(out)
}

fn ops(plan: &Value) -> Vec<String> {
    plan["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} {}",
                c["op"].as_str().unwrap_or("?"),
                c["key"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[tokio::test]
async fn apply_plans_writes_once_refuses_bad_input_and_prunes_only_its_set() -> Result<()> {
    let etcd = EtcdServer::start().await?;
    let dir = TestDir::new("apply")?;
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(conf.join("jobs.yaml"), JOBS)?;
    std::fs::write(conf.join("settings.yml"), SETTINGS)?;
    std::fs::write(conf.join("alerts.json"), ALERTS)?;
    let path = conf.to_string_lossy().into_owned();

    // The plan, and nothing written.
    let (code, plan, err) = chime(&etcd, &["apply", "-f", &path, "--dry-run"])?;
    ensure!(code == 0, "{err}");
    let mut want = vec![
        "create alerts/lag",
        "create jobs/etl",
        "create jobs/nightly",
        "create queues/default/count",
    ];
    let mut got = ops(&plan);
    got.sort();
    want.sort();
    ensure!(got == want, "plan {got:?}");
    ensure!(
        export(&etcd)?.trim().is_empty(),
        "a dry run wrote something"
    );

    // Applied, then applied again: nothing to write the second time.
    let (code, done, err) = chime(&etcd, &["apply", "-f", &path, "--set", "team-a"])?;
    ensure!(code == 0 && ops(&done).len() == 4, "{done} {err}");
    let (code, again, err) = chime(&etcd, &["apply", "-f", &path, "--set", "team-a"])?;
    ensure!(code == 0, "{err}");
    ensure!(
        ops(&again).is_empty() && again["revision"].is_null(),
        "second apply: {again}"
    );
    ensure!(again["unchanged"] == 4, "{again}");
    // The apply left its audit entries (no coordinator runs here to move them):
    // one inbox key, with the four creates; the second apply left none.
    let src = chime_shared::config::source::EtcdSource::new(etcd.client().await?, "/chime/");
    let inbox = ConfigSource::list_under(&src, chime_coordinator::audit::INBOX).await?;
    ensure!(inbox.entries.len() == 1, "inbox: {:?}", inbox.entries);
    let entries: Vec<Value> = serde_json::from_str(&inbox.entries[0].1)?;
    let mut actions: Vec<String> = entries
        .iter()
        .map(|e| format!("{} {}", e["action"], e["target"]).replace('"', ""))
        .collect();
    actions.sort();
    ensure!(
        actions
            == [
                "alert.put lag",
                "config.set queues/default/count",
                "job.create etl",
                "job.create nightly"
            ],
        "{actions:?}"
    );
    ensure!(
        entries
            .iter()
            .all(|e| e["who"].as_str().is_some_and(|w| w.starts_with("cli:"))),
        "{entries:?}"
    );

    // A change names its field.
    std::fs::write(
        conf.join("jobs.yaml"),
        JOBS.replace("0 0 2 * * *", "0 30 3 * * *"),
    )?;
    let (code, plan, err) = chime(&etcd, &["apply", "-f", &path, "--dry-run"])?;
    ensure!(
        code == 0 && ops(&plan) == ["update jobs/nightly"],
        "{plan} {err}"
    );
    let fields = &plan["changes"][0]["fields"];
    ensure!(
        fields["schedule.expr"]["from"] == "0 0 2 * * *"
            && fields["schedule.expr"]["to"] == "0 30 3 * * *",
        "{fields}"
    );

    // One bad document: refused naming it, and nothing of the rest is written.
    std::fs::write(
        conf.join("zz-bad.yaml"),
        "kind: job\nname: broken\ngroup: default\nhandler: log\nschedule: { kind: cron, expr: \"61 * * * * *\" }\n",
    )?;
    let before = export(&etcd)?;
    let (code, _, err) = chime(&etcd, &["apply", "-f", &path])?;
    ensure!(code != 0, "a bad document was applied");
    ensure!(
        err.contains("zz-bad.yaml") && err.contains("document 0") && err.contains("schedule.expr"),
        "{err}"
    );
    ensure!(export(&etcd)? == before, "a refused apply changed etcd");
    std::fs::remove_file(conf.join("zz-bad.yaml"))?;
    // A workflow naming a job that nobody has: refused naming the node's field.
    std::fs::write(
        conf.join("zz-bad.yaml"),
        "kind: workflow\nname: orphan\ngroup: default\nschedule: { kind: manual }\nworkflow: { nodes: [{ name: a, job: nobody }] }\n",
    )?;
    let (code, _, err) = chime(&etcd, &["apply", "-f", &path])?;
    ensure!(code != 0 && err.contains("workflow.nodes[0].job"), "{err}");
    std::fs::remove_file(conf.join("zz-bad.yaml"))?;

    // Pruning: only what this set applied before.
    let other = dir.path().join("other.yaml");
    std::fs::write(
        &other,
        "kind: job\nname: elsewhere\ngroup: default\nhandler: log\nschedule: { kind: manual }\n",
    )?;
    let (code, _, err) = chime(&etcd, &["apply", "-f", &other.to_string_lossy()])?;
    ensure!(code == 0, "{err}");
    std::fs::write(
        conf.join("jobs.yaml"),
        JOBS.split("---").next().unwrap_or_default(),
    )?;
    let (code, pruned, err) = chime(&etcd, &["apply", "-f", &path, "--set", "team-a", "--prune"])?;
    ensure!(code == 0, "{err}");
    let mut got = ops(&pruned);
    got.sort();
    // nightly is as stored (its change above was only planned): only etl goes.
    ensure!(got == ["delete jobs/etl"], "{pruned}");
    let now = export(&etcd)?;
    ensure!(
        now.contains("name: elsewhere") && !now.contains("name: etl"),
        "{now}"
    );

    // A prune never leaves a workflow naming a job it deleted: not one in the
    // files, nor one stored and left alone.
    let flows = dir.path().join("flows.yaml");
    let step = "kind: job\nname: step\ngroup: default\nhandler: log\nschedule: { kind: manual }\n";
    let flow = "kind: workflow\nname: flow\ngroup: default\nschedule: { kind: manual }\nworkflow: { nodes: [{ name: a, job: step }] }\n";
    std::fs::write(&flows, format!("{step}---\n{flow}"))?;
    let flows_path = flows.to_string_lossy().into_owned();
    let (code, _, err) = chime(&etcd, &["apply", "-f", &flows_path, "--set", "flows"])?;
    ensure!(code == 0, "{err}");
    std::fs::write(&flows, flow)?;
    let before = export(&etcd)?;
    let (code, _, err) = chime(
        &etcd,
        &["apply", "-f", &flows_path, "--set", "flows", "--prune"],
    )?;
    ensure!(
        code != 0 && err.contains("workflow.nodes[0].job") && err.contains("step"),
        "pruned a job its workflow in the files runs: {err}"
    );
    ensure!(export(&etcd)? == before, "a refused prune changed etcd");
    let by_hand = dir.path().join("by-hand.yaml");
    std::fs::write(
        &by_hand,
        "kind: workflow\nname: by-hand\ngroup: default\nschedule: { kind: manual }\nworkflow: { nodes: [{ name: a, job: step }] }\n",
    )?;
    let (code, _, err) = chime(&etcd, &["apply", "-f", &by_hand.to_string_lossy()])?;
    ensure!(code == 0, "{err}");
    std::fs::write(&flows, "")?;
    let before = export(&etcd)?;
    let (code, _, err) = chime(
        &etcd,
        &["apply", "-f", &flows_path, "--set", "flows", "--prune"],
    )?;
    ensure!(
        code != 0 && err.contains("by-hand") && err.contains("step"),
        "pruned a job a stored workflow runs: {err}"
    );
    ensure!(export(&etcd)? == before, "a refused prune changed etcd");
    // Once that workflow is gone (adopted by a set of its own, then pruned from
    // it), the prune goes through, and a second one has nothing left to do.
    let (code, _, err) = chime(
        &etcd,
        &["apply", "-f", &by_hand.to_string_lossy(), "--set", "hand"],
    )?;
    ensure!(code == 0, "{err}");
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "")?;
    let (code, _, err) = chime(
        &etcd,
        &[
            "apply",
            "-f",
            &empty.to_string_lossy(),
            "--set",
            "hand",
            "--prune",
        ],
    )?;
    ensure!(code == 0, "{err}");
    let (code, pruned, err) = chime(
        &etcd,
        &["apply", "-f", &flows_path, "--set", "flows", "--prune"],
    )?;
    ensure!(code == 0, "{err}");
    let mut got = ops(&pruned);
    got.sort();
    ensure!(got == ["delete jobs/flow", "delete jobs/step"], "{pruned}");
    let (code, again, err) = chime(
        &etcd,
        &["apply", "-f", &flows_path, "--set", "flows", "--prune"],
    )?;
    ensure!(code == 0 && ops(&again).is_empty(), "{again} {err}");
    Ok(())
}

#[tokio::test]
async fn an_export_applied_to_an_empty_cluster_exports_the_same() -> Result<()> {
    let (a, b) = (EtcdServer::start().await?, EtcdServer::start().await?);
    let dir = TestDir::new("export")?;
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(conf.join("jobs.yaml"), JOBS)?;
    std::fs::write(conf.join("settings.yml"), SETTINGS)?;
    std::fs::write(conf.join("alerts.json"), ALERTS)?;
    let (code, _, err) = chime(&a, &["apply", "-f", &conf.to_string_lossy()])?;
    ensure!(code == 0, "{err}");
    let first = export(&a)?;
    ensure!(first.matches("kind:").count() >= 4, "{first}");
    let file = dir.path().join("exported.yaml");
    std::fs::write(&file, &first)?;
    let file = file.to_string_lossy().into_owned();
    let (code, applied, err) = chime(&b, &["apply", "-f", &file])?;
    ensure!(code == 0 && ops(&applied).len() == 4, "{applied} {err}");
    let second = export(&b)?;
    ensure!(
        first == second,
        "the exports differ:\n{first}\n---- and ----\n{second}"
    );
    let (code, again, err) = chime(&b, &["apply", "-f", &file])?;
    ensure!(code == 0 && ops(&again).is_empty(), "{again} {err}");
    Ok(())
}
