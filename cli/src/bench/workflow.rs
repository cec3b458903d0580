//! `chime bench workflow`: one workflow of N nodes (W parallel chains of N/W nodes
//! after one root, every node the `noop` handler) run once under one coordinator
//! process and W worker processes. Counted from the workers' shard records, not
//! the coordinator's: nodes run, duplicates, the wall time from the root's start
//! to the last node's end, and the scheduling overhead of a node: how long after
//! its parent ended it started (result to the coordinator, the engine, the fire
//! recorded in Redis, the assignment to a worker).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, bail};
use chime_shared::clock::system_now_ms;
use proto as pb;
use serde_json::json;

use super::quantile;

/// `chime bench workflow` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkflowArgs {
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// etcd endpoints.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: String,
    /// Nodes in the workflow (the root included).
    #[arg(long, default_value_t = 1_000)]
    nodes: usize,
    /// Parallel chains after the root (1: one chain, each node after the last).
    #[arg(long, default_value_t = 1)]
    width: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Keep the files (their directory is printed).
    #[arg(long)]
    keep_files: bool,
}

/// The workflow: node `root`, then `width` chains `c<k>-<i>`.
fn definition(nodes: usize, width: usize) -> serde_json::Value {
    let mut list = vec![json!({ "name": "root", "handler": "noop" })];
    let per_chain = (nodes - 1).div_ceil(width);
    let mut made = 1;
    'chains: for k in 0..width {
        let mut parent = "root".to_owned();
        for i in 0..per_chain {
            if made == nodes {
                break 'chains;
            }
            let name = format!("c{k}-{i}");
            list.push(json!({ "name": name, "handler": "noop", "after": [{ "node": parent }] }));
            parent = name;
            made += 1;
        }
    }
    json!({ "nodes": list })
}

pub(crate) async fn run(a: WorkflowArgs) -> Result<()> {
    if a.nodes < 2 || a.width == 0 || a.width >= a.nodes || a.workers == 0 {
        bail!("invalid arguments: nodes ≥ 2, 1 ≤ width < nodes, workers ≥ 1");
    }
    let prefix = format!("bench{:08x}", fastrand::u32(..));
    let etcd_prefix = format!("/{prefix}/");
    let dir = std::env::temp_dir().join(format!("chime-bench-workflow-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (kids, mut client, records) = super::job_cluster(&super::JobCluster {
        redis_url: &a.redis_url,
        etcd_endpoints: &a.etcd_endpoints,
        prefix: &prefix,
        etcd_prefix: &etcd_prefix,
        dir: &dir,
        workers: a.workers,
        capacity: a.width.max(16),
        coordinator_args: &[],
    })
    .await?;
    let def = definition(a.nodes, a.width);
    let job = pb::Job {
        name: "bench-flow".into(),
        group: "default".into(),
        schedule: Some(pb::Schedule {
            kind: Some(pb::schedule::Kind::Manual(pb::Manual {})),
        }),
        workflow_json: def.to_string(),
        ..Default::default()
    };
    let created = std::time::Instant::now();
    client
        .create_job(pb::CreateJobRequest { job: Some(job) })
        .await
        .map_err(|e| anyhow::anyhow!("creating the workflow: {}", e.message()))?;
    let create_ms = created.elapsed().as_millis() as u64;
    eprintln!(
        "bench workflow: {} nodes in {} chains, {} workers",
        a.nodes, a.width, a.workers
    );
    let triggered = system_now_ms();
    let run = client
        .trigger_job(pb::TriggerJobRequest {
            name: "bench-flow".into(),
            params: String::new(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("triggering: {}", e.message()))?
        .into_inner();
    // Until every node's record is in (or a minute without a new one).
    let mut last_count = 0;
    let mut last_change = system_now_ms();
    let lines = loop {
        let text = std::fs::read_to_string(&records).unwrap_or_default();
        let n = text.lines().count();
        if n >= a.nodes {
            break text;
        }
        if n != last_count {
            (last_count, last_change) = (n, system_now_ms());
        } else if system_now_ms() - last_change > 60_000 {
            bail!("only {n} of {} nodes ran; stuck for a minute", a.nodes);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The workflow run's own end, as the coordinator saw it.
    let mut state = String::new();
    for _ in 0..200 {
        let r = client
            .get_run(pb::RunId {
                run_id: run.run_id.clone(),
            })
            .await?
            .into_inner();
        if r.state != pb::RunState::Running as i32 && r.state != pb::RunState::Pending as i32 {
            state = pb::RunState::try_from(r.state)
                .map(|s| s.as_str_name().to_owned())
                .unwrap_or_default();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(kids);
    // node → (started, finished, runs) from the record lines (`job run shard total
    // attempt started finished status worker scheduled`).
    let mut seen: HashMap<String, (i64, i64, u32)> = HashMap::new();
    for l in lines.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() != 10 {
            continue;
        }
        let Some(node) = f[1].rsplit('~').next() else {
            continue;
        };
        let (Ok(started), Ok(finished)) = (f[5].parse::<i64>(), f[6].parse::<i64>()) else {
            continue;
        };
        let e = seen
            .entry(node.to_owned())
            .or_insert((started, finished, 0));
        e.2 += 1;
    }
    let duplicates: u32 = seen.values().map(|v| v.2.saturating_sub(1)).sum();
    // Each node's start after its parent's end.
    let mut gaps = Vec::new();
    for (k, node) in def["nodes"].as_array().into_iter().flatten().enumerate() {
        if k == 0 {
            continue;
        }
        let name = node["name"].as_str().unwrap_or_default();
        let parent = node["after"][0]["node"].as_str().unwrap_or_default();
        if let (Some(me), Some(p)) = (seen.get(name), seen.get(parent)) {
            gaps.push(me.0 - p.1);
        }
    }
    gaps.sort_unstable();
    let first = seen.values().map(|v| v.0).min().unwrap_or(0);
    let last = seen.values().map(|v| v.1).max().unwrap_or(0);
    let chain = (a.nodes - 1).div_ceil(a.width);
    super::tear_down(
        &a.redis_url,
        &a.etcd_endpoints,
        &prefix,
        &etcd_prefix,
        &dir,
        a.keep_files,
    )
    .await?;
    println!(
        "{}",
        json!({
            "bench": "workflow",
            "nodes": a.nodes,
            "width": a.width,
            "chain_length": chain,
            "workers": a.workers,
            "handler": "noop",
            "create_ms": create_ms,
            "run_state": state,
            "nodes_run": seen.len(),
            "duplicates": duplicates,
            "trigger_to_root_start_ms": seen.get("root").map(|r| r.0 - triggered),
            "wall_ms": last - first,
            "node_start_after_parent_p50_ms": quantile(&gaps, 0.5),
            "node_start_after_parent_p99_ms": quantile(&gaps, 0.99),
            "node_start_after_parent_max_ms": gaps.last().copied().unwrap_or(0),
            "wall_per_chain_node_ms": (last - first) as f64 / (chain + 1) as f64,
        })
    );
    Ok(())
}
