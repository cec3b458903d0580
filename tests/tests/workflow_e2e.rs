//! Workflows with real processes (Redis, etcd, coordinators, workers): a DAG
//! written as YAML through the CLI, fan-out and fan-in, a failure edge, parents'
//! outputs in a node's params, validation that names the field and stores nothing,
//! rerun from a failed node, and the leader killed again and again mid-workflow
//! with no node run twice and none skipped.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chime_tests::{Cluster, TestDir, wait_until};
use serde_json::Value;

/// Writes `text` to `name` in `dir`; answers the path.
fn file(dir: &TestDir, name: &str, text: &str) -> Result<String> {
    let path = dir.path().join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

/// Waits until run `id` ended; answers it.
async fn ended(c: &Cluster, id: &str, within: Duration) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(&format!("run {id} to end"), within, || {
        let r = c.admin(&["runs", "get", id]);
        let done = r
            .as_ref()
            .is_ok_and(|r| !matches!(r["state"].as_str(), Some("pending" | "running") | None));
        if let Ok(r) = r {
            last = r;
        }
        async move { done }
    })
    .await
    .with_context(|| format!("last seen: {last}"))?;
    c.admin(&["runs", "get", id])
}

/// Node name → (state, run id, output) of a workflow run.
fn nodes(run: &Value) -> HashMap<String, (String, String, String)> {
    run["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let s = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
            (s("name"), (s("state"), s("run_id"), s("output")))
        })
        .collect()
}

const DIAMOND: &str = r#"
name: etl
group: default
schedule: { kind: manual }
workflow:
  nodes:
    - name: count
      handler: log
    - name: shard
      handler: log
      routing: sharding_broadcast
      shard_count: 3
      after: [{ node: count }]
    - name: audit
      handler: fail
      after: [{ node: count }]
    - name: repair
      handler: log
      after: [{ node: audit, when: on_failure }]
    - name: report
      handler: log
      after:
        - { node: shard }
        - { node: repair, when: always }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_fans_out_fans_in_follows_failure_edges_and_hands_outputs_on() -> Result<()> {
    let c = Cluster::start(2).await?;
    let dir = TestDir::new("workflow-files")?;
    let path = file(&dir, "etl.yaml", DIAMOND)?;
    let created = c.admin(&["job", "create", "--file", &path])?;
    ensure!(
        created["workflow"]["nodes"].as_array().map(Vec::len) == Some(5),
        "{created}"
    );
    let run = c.admin(&[
        "job",
        "trigger",
        "etl",
        "--params",
        r#"{"day":"2026-12-05"}"#,
    ])?;
    let id = run["run_id"].as_str().context("run id")?.to_owned();
    let done = ended(&c, &id, Duration::from_secs(30)).await?;
    let n = nodes(&done);
    let state = |k: &str| n.get(k).map(|v| v.0.as_str()).unwrap_or("?");
    ensure!(state("count") == "succeeded", "{done}");
    ensure!(state("shard") == "succeeded", "{done}");
    ensure!(state("audit") == "failed", "{done}");
    ensure!(state("repair") == "succeeded", "{done}");
    ensure!(state("report") == "succeeded", "{done}");
    // audit's failure had its edge (repair): the workflow succeeded.
    ensure!(done["state"] == "succeeded", "{done}");
    // report got both parents' outputs and the workflow's params.
    let report = c.admin(&["runs", "get", &n["report"].1])?;
    let params: Value = serde_json::from_str(report["params"].as_str().unwrap_or("{}"))?;
    ensure!(params["workflow"]["day"] == "2026-12-05", "{params}");
    ensure!(
        params["parents"]["shard"].as_array().map(Vec::len) == Some(3),
        "the sharded node's three outputs: {params}"
    );
    ensure!(params["parents"]["repair"] == "shard 0/1", "{params}");
    ensure!(
        report["parent_run_id"] == id.as_str() && report["cause"] == "workflow",
        "{report}"
    );
    // What the workers ran: every node once (shard: 3 shards), audit not retried.
    let mut per_run: HashMap<(String, u32), usize> = HashMap::new();
    for r in c.records() {
        *per_run.entry((r.run_id, r.shard)).or_default() += 1;
    }
    ensure!(per_run.values().all(|n| *n == 1), "{per_run:?}");
    ensure!(per_run.len() == 7, "1 + 3 + 1 + 1 + 1 shards: {per_run:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_workflow_is_refused_naming_the_field_and_nothing_is_stored() -> Result<()> {
    let c = Cluster::start(1).await?;
    let dir = TestDir::new("workflow-files")?;
    let cases = [
        (
            "cycle.yaml",
            "name: bad\ngroup: default\nschedule: { kind: manual }\nworkflow:\n  nodes:\n    - { name: a, handler: log, after: [{ node: b }] }\n    - { name: b, handler: log, after: [{ node: a }] }\n",
            "workflow.nodes",
        ),
        (
            "unknown-job.yaml",
            "name: bad\ngroup: default\nschedule: { kind: manual }\nworkflow:\n  nodes:\n    - { name: a, job: no-such-job }\n",
            "workflow.nodes[0].job",
        ),
        (
            "bad-when.yaml",
            "name: bad\ngroup: default\nschedule: { kind: manual }\nworkflow:\n  nodes:\n    - { name: a, handler: log }\n    - { name: b, handler: log, after: [{ node: a, when: sometimes }] }\n",
            "workflow.nodes[1].after[0].when",
        ),
        (
            "unknown-parent.json",
            r#"{"name":"bad","group":"default","schedule":{"kind":"manual"},"workflow":{"nodes":[{"name":"a","handler":"log","after":[{"node":"zz"}]}]}}"#,
            "workflow.nodes[0].after[0].node",
        ),
        (
            "typo.yaml",
            "name: bad\ngroup: default\nschedule: { kind: manual }\nworkflow:\n  nodes:\n    - { name: a, handler: log, afterr: [] }\n",
            "workflow.nodes[0]",
        ),
    ];
    for (name, text, field) in cases {
        let path = file(&dir, name, text)?;
        let err = c
            .admin(&["job", "create", "--file", &path])
            .err()
            .with_context(|| format!("{name} was accepted"))?
            .to_string();
        ensure!(err.contains(field), "{name}: {err}");
    }
    let jobs = c.admin(&["job", "list"])?;
    ensure!(jobs.as_array().is_some_and(Vec::is_empty), "{jobs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_from_the_failed_node_keeps_what_succeeded() -> Result<()> {
    let c = Cluster::start(1).await?;
    let dir = TestDir::new("workflow-files")?;
    let wf = |handler: &str| {
        format!(
            "name: sync\ngroup: default\nschedule: {{ kind: manual }}\nworkflow:\n  nodes:\n    - {{ name: extract, handler: log }}\n    - {{ name: load, handler: {handler}, after: [{{ node: extract }}] }}\n    - {{ name: notify, handler: log, after: [{{ node: load }}] }}\n"
        )
    };
    let path = file(&dir, "sync.yaml", &wf("fail"))?;
    c.admin(&["job", "create", "--file", &path])?;
    let run = c.admin(&["job", "trigger", "sync"])?;
    let first = run["run_id"].as_str().context("run id")?.to_owned();
    let failed = ended(&c, &first, Duration::from_secs(30)).await?;
    ensure!(failed["state"] == "failed", "{failed}");
    // Rerunning a node the run does not have is refused, naming the field.
    let err = c
        .admin(&["runs", "rerun", &first, "--node", "nope"])
        .err()
        .context("an unknown node was accepted")?
        .to_string();
    ensure!(err.contains("node"), "{err}");
    // The fix: load's handler changes; then the run goes on from load.
    let fixed = file(&dir, "sync-fixed.yaml", &wf("log"))?;
    c.admin(&["job", "update", "sync", "--file", &fixed])?;
    let again = c.admin(&["runs", "rerun", &first, "--node", "load"])?;
    let second = again["run_id"].as_str().context("run id")?.to_owned();
    ensure!(
        again["cause"] == "rerun" && again["parent_run_id"] == first.as_str(),
        "{again}"
    );
    let done = ended(&c, &second, Duration::from_secs(30)).await?;
    ensure!(done["state"] == "succeeded", "{done}");
    let n = nodes(&done);
    ensure!(
        n["extract"].1 == format!("{first}~extract"),
        "extract kept from the first run: {done}"
    );
    let extracts = c
        .records()
        .iter()
        .filter(|r| r.job == "sync~extract")
        .count();
    ensure!(extracts == 1, "extract ran {extracts} times");
    Ok(())
}

/// Three coordinators, three workers; three workflow runs of 11 nodes (layers of
/// one and four nodes, each node sleeping 700 ms) while the leader is killed with
/// SIGKILL three times (the next kill once a new leader has taken over). Every
/// workflow run succeeds, every node ran exactly once: none twice, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_again_and_again_mid_workflow() -> Result<()> {
    let mut c = Cluster::start_ha(3, 3).await?;
    let dir = TestDir::new("workflow-files")?;
    let mut yaml = String::from(
        "name: pipeline\ngroup: default\nschedule: { kind: manual }\nworkflow:\n  nodes:\n",
    );
    let sleep = r#"params: '{"sleep_ms":700}'"#;
    let mut previous: Vec<String> = Vec::new();
    for layer in 0..5 {
        let width = if layer % 2 == 0 { 1 } else { 4 };
        let mut this = Vec::new();
        for k in 0..width {
            let name = format!("n{layer}-{k}");
            let after: Vec<String> = previous
                .iter()
                .map(|p| format!("{{ node: {p} }}"))
                .collect();
            yaml.push_str(&format!(
                "    - {{ name: {name}, handler: sleep, {sleep}, after: [{}] }}\n",
                after.join(", ")
            ));
            this.push(name);
        }
        previous = this;
    }
    let path = file(&dir, "pipeline.yaml", &yaml)?;
    c.admin(&["job", "create", "--file", &path])?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = c.admin(&["job", "trigger", "pipeline"])?;
        ids.push(r["run_id"].as_str().context("run id")?.to_owned());
    }
    for kill in 0..3 {
        // Mid-workflow: some node ran since the last kill.
        let seen = c.records().len();
        wait_until(
            &format!("a node to end before kill {kill}"),
            Duration::from_secs(30),
            || {
                let n = c.records().len();
                async move { n > seen }
            },
        )
        .await?;
        let leader = c.leader_index().context("no leader")?;
        c.kill_coordinator_at(leader);
        wait_until(
            &format!("a new leader after kill {kill}"),
            Duration::from_secs(30),
            || {
                let l = c.leader_index();
                async move { l.is_some_and(|l| l != leader) }
            },
        )
        .await?;
        c.start_coordinator(leader)?;
    }
    let mut spanning = 0;
    for id in &ids {
        let done = ended(&c, id, Duration::from_secs(120)).await?;
        ensure!(done["state"] == "succeeded", "{done}");
        let n = nodes(&done);
        ensure!(n.len() == 11, "{done}");
        ensure!(n.values().all(|v| v.0 == "succeeded"), "{done}");
        // The leaders that fired its nodes (each run carries its fence).
        let mut fences = std::collections::BTreeSet::new();
        for (_, run_id, _) in n.values() {
            fences.insert(c.admin(&["runs", "get", run_id])?["fence"].as_i64());
        }
        if fences.len() > 1 {
            spanning += 1;
        }
    }
    ensure!(
        spanning > 0,
        "no workflow run had nodes fired by two leaders"
    );
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for r in c.records() {
        *per_node.entry(r.run_id).or_default() += 1;
    }
    let twice: Vec<_> = per_node.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(twice.is_empty(), "nodes run more than once: {twice:?}");
    ensure!(
        per_node.len() == 33,
        "3 runs × 11 nodes, each run once: {} ran",
        per_node.len()
    );
    Ok(())
}
