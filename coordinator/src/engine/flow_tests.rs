//! Unit tests of workflow runs in the engine's core (`flows.rs`), on virtual time
//! with the memory run store: fan-out and fan-in, edge conditions, outputs handed
//! to children, kill, rerun from a node, a fire the store could not record, and a
//! new leader taking over a workflow in progress from a snapshot that is behind.

use std::collections::BTreeMap;

use super::ShardOutcome;
use super::machine::{Input, Reply};
use super::testkit::{Rig, T0, opts, ready};
use super::workers::{Assignment, WorkerHello};
use crate::model::{JobSpec, Routing, RunRecord, RunState, Schedule};
use crate::store::RunStore;
use crate::workflow::{NodeSpec, WorkflowSpec};

fn node(name: &str, after: &[(&str, &str)]) -> NodeSpec {
    NodeSpec::inline(name, "h").after(after)
}

fn flow(name: &str, nodes: Vec<NodeSpec>) -> JobSpec {
    let mut j = JobSpec::new(name, "g", "", Schedule::Manual);
    j.created_at_ms = T0;
    j.workflow = Some(WorkflowSpec { nodes });
    j.validate().expect("a valid workflow");
    j
}

/// a → (b, c) → d.
fn diamond() -> JobSpec {
    flow(
        "wf",
        vec![
            node("a", &[]),
            node("b", &[("a", "")]),
            node("c", &[("a", "")]),
            node("d", &[("b", ""), ("c", "")]),
        ],
    )
}

/// The assignments of node `name`'s runs so far (any workflow run).
fn of(r: &Rig, name: &str) -> Vec<Assignment> {
    let suffix = format!("~{name}");
    r.all_assigns()
        .into_iter()
        .map(|(_, _, a)| a)
        .filter(|a| a.key.run_id.ends_with(&suffix))
        .collect()
}

fn one(r: &Rig, name: &str) -> Assignment {
    let mut all = of(r, name);
    assert_eq!(all.len(), 1, "node {name} assigned {all:?}");
    all.remove(0)
}

fn finish(r: &mut Rig, name: &str, outcome: ShardOutcome) {
    let a = one(r, name);
    let worker = r.m.runs.active[&a.key.run_id].shards[a.key.shard as usize]
        .worker_id
        .clone();
    r.report(&worker, &a.key, outcome);
}

fn ok(out: &str) -> ShardOutcome {
    ShardOutcome::Succeeded(out.into())
}

fn states(run: &RunRecord) -> BTreeMap<String, RunState> {
    run.nodes
        .iter()
        .map(|n| (n.name.clone(), n.state))
        .collect()
}

fn rerun(r: &mut Rig, old: RunRecord, node: &str) -> crate::Result<RunRecord> {
    r.input(Input::Rerun(99, Box::new(old), node.into()));
    match r.replies.remove(&99) {
        Some(Reply::Run(run)) => run,
        other => panic!("rerun answered {other:?}"),
    }
}

#[test]
fn nodes_fan_out_and_fan_in_with_their_parents_outputs() {
    let mut r = Rig::new(opts());
    r.start(vec![diamond()]);
    r.join("w1", 10);
    let run = r.trigger("wf").unwrap();
    assert!(run.is_workflow() && run.shards.is_empty());
    let a = one(&r, "a");
    assert_eq!(a.job, "wf~a");
    assert!(of(&r, "b").is_empty(), "b waits for a");
    finish(&mut r, "a", ok(r#"{"segment":1000}"#));
    one(&r, "b");
    one(&r, "c");
    finish(&mut r, "b", ok("b-out"));
    assert!(of(&r, "d").is_empty(), "d waits for c too");
    finish(&mut r, "c", ok("c-out"));
    let d = one(&r, "d");
    let params: serde_json::Value = serde_json::from_str(&d.params).unwrap();
    assert_eq!(params["parents"]["b"], "b-out");
    assert_eq!(params["parents"]["c"], "c-out");
    let b = one(&r, "b");
    let params: serde_json::Value = serde_json::from_str(&b.params).unwrap();
    assert_eq!(params["parents"]["a"]["segment"], 1000);
    finish(&mut r, "d", ok(""));
    let done = r.stored(&run.run_id).unwrap();
    assert_eq!(done.state, RunState::Succeeded);
    assert!(states(&done).values().all(|s| *s == RunState::Succeeded));
    let d_run = r.stored(&format!("{}~d", run.run_id)).unwrap();
    assert_eq!(
        (d_run.cause.as_str(), d_run.parent_run_id.as_str()),
        ("workflow", run.run_id.as_str())
    );
    assert!(!r.m.runs.active.contains_key(&run.run_id));
}

#[test]
fn failure_edges_run_handlers_and_skip_the_success_path() {
    let mut r = Rig::new(opts());
    r.start(vec![flow(
        "wf",
        vec![
            node("a", &[]),
            node("ok-path", &[("a", "")]),
            node("repair", &[("a", "on_failure")]),
            node("report", &[("ok-path", "always"), ("repair", "always")]),
        ],
    )]);
    r.join("w1", 10);
    let run = r.trigger("wf").unwrap();
    finish(&mut r, "a", ShardOutcome::Failed("boom".into()));
    assert!(of(&r, "ok-path").is_empty());
    finish(&mut r, "repair", ok("repaired"));
    finish(&mut r, "report", ok(""));
    let done = r.stored(&run.run_id).unwrap();
    let s = states(&done);
    assert_eq!(s["a"], RunState::Failed);
    assert_eq!(s["ok-path"], RunState::Skipped);
    assert_eq!(s["repair"], RunState::Succeeded);
    assert_eq!(s["report"], RunState::Succeeded);
    // The failure had an edge to handle it: the workflow succeeded.
    assert_eq!(done.state, RunState::Succeeded);
    let a = done.nodes.iter().find(|n| n.name == "a").unwrap();
    assert_eq!(a.error, "boom");
}

#[test]
fn an_unhandled_failure_fails_the_workflow_and_skips_what_follows() {
    let mut r = Rig::new(opts());
    r.start(vec![diamond()]);
    r.join("w1", 10);
    let run = r.trigger("wf").unwrap();
    finish(&mut r, "a", ShardOutcome::Failed("no".into()));
    let done = r.stored(&run.run_id).unwrap();
    assert_eq!(done.state, RunState::Failed);
    let s = states(&done);
    assert_eq!(
        (s["b"], s["c"], s["d"]),
        (RunState::Skipped, RunState::Skipped, RunState::Skipped)
    );
    assert_eq!(r.all_assigns().len(), 1, "only a ran");
}

#[test]
fn a_sharded_node_ends_when_every_shard_did() {
    let mut sharded = node("fan", &[]);
    sharded.routing = Routing::ShardingBroadcast;
    sharded.shard_count = 3;
    let mut r = Rig::new(opts());
    r.start(vec![flow(
        "wf",
        vec![sharded, node("after", &[("fan", "")])],
    )]);
    r.join("w1", 10);
    r.join("w2", 10);
    r.trigger("wf").unwrap();
    let shards = of(&r, "fan");
    assert_eq!(shards.len(), 3);
    for (i, a) in shards.iter().enumerate() {
        assert!(of(&r, "after").is_empty(), "after waits for every shard");
        let w = r.m.runs.active[&a.key.run_id].shards[a.key.shard as usize]
            .worker_id
            .clone();
        r.report(&w, &a.key, ok(&format!("part{i}")));
    }
    let after = one(&r, "after");
    let params: serde_json::Value = serde_json::from_str(&after.params).unwrap();
    // The shards' outputs, as a JSON array.
    assert_eq!(
        params["parents"]["fan"],
        serde_json::json!(["part0", "part1", "part2"])
    );
}

#[test]
fn a_killed_workflow_cancels_its_running_nodes_and_starts_no_more() {
    let mut r = Rig::new(opts());
    r.start(vec![diamond()]);
    r.join("w1", 10);
    let run = r.trigger("wf").unwrap();
    finish(&mut r, "a", ok(""));
    let b = one(&r, "b");
    let killed = r.kill(&run.run_id).unwrap();
    assert_eq!(killed.state, RunState::Cancelled);
    assert!(
        r.cancels("w1").contains(&b.key),
        "b's shard cancelled on its worker"
    );
    let s = states(&killed);
    assert_eq!(s["a"], RunState::Succeeded);
    assert_eq!(
        (s["b"], s["c"], s["d"]),
        (
            RunState::Cancelled,
            RunState::Cancelled,
            RunState::Cancelled
        )
    );
    r.live_for(5_000);
    assert!(of(&r, "d").is_empty());
    assert_eq!(
        r.stored(&format!("{}~b", run.run_id)).unwrap().state,
        RunState::Cancelled
    );
    assert!(r.m.runs.active.is_empty(), "{:?}", r.m.runs.active.keys());
}

#[test]
fn a_rerun_from_a_failed_node_keeps_what_succeeded() {
    let mut r = Rig::new(opts());
    r.start(vec![diamond()]);
    r.join("w1", 10);
    let first = r.trigger("wf").unwrap();
    finish(&mut r, "a", ok("A"));
    finish(&mut r, "b", ShardOutcome::Failed("flaky".into()));
    finish(&mut r, "c", ok("C"));
    let failed = r.stored(&first.run_id).unwrap();
    assert_eq!(failed.state, RunState::Failed);
    // Refused: a run in progress, an unknown node.
    assert!(rerun(&mut r, failed.clone(), "nope").is_err());
    let again = rerun(&mut r, failed, "b").unwrap();
    assert_eq!(
        (again.cause.as_str(), again.parent_run_id.as_str()),
        ("rerun", first.run_id.as_str())
    );
    assert_eq!(of(&r, "a").len(), 1, "a is not run again");
    assert_eq!(of(&r, "c").len(), 1, "c is not run again");
    let b2: Vec<Assignment> = of(&r, "b")
        .into_iter()
        .filter(|a| a.key.run_id.starts_with(&again.run_id))
        .collect();
    assert_eq!(b2.len(), 1);
    let params: serde_json::Value = serde_json::from_str(&b2[0].params).unwrap();
    assert_eq!(params["parents"]["a"], "A", "a's output is kept");
    r.succeed("w1", &b2[0].key);
    let d = of(&r, "d");
    assert_eq!(d.len(), 1);
    r.succeed("w1", &d[0].key);
    let done = r.stored(&again.run_id).unwrap();
    assert_eq!(done.state, RunState::Succeeded);
    let a = done.nodes.iter().find(|n| n.name == "a").unwrap();
    assert_eq!(
        a.run_id,
        format!("{}~a", first.run_id),
        "a's run is the first run's"
    );
}

#[test]
fn a_node_whose_fire_was_not_recorded_is_fired_a_second_later() {
    let mut r = Rig::new(opts());
    r.start(vec![diamond()]);
    r.join("w1", 10);
    let run = r.trigger("wf").unwrap();
    r.fail_records = 1;
    finish(&mut r, "a", ok(""));
    assert!(of(&r, "b").is_empty() && of(&r, "c").is_empty());
    let snapshot = r.m.runs.active[&run.run_id].clone();
    assert_eq!(states(&snapshot)["b"], RunState::Pending);
    r.live_for(1_500);
    one(&r, "b");
    one(&r, "c");
}

/// Leader 1 runs a, then b and c; it dies after b ended, with the workflow run's
/// snapshot in the store still showing a running (it is written in the
/// background). Leader 2 takes b's result from b's run, adopts c with its worker,
/// and runs d once: no node runs twice, none is skipped.
#[test]
fn a_new_leader_goes_on_from_the_node_runs_not_a_stale_snapshot() {
    let mut r = Rig::new(opts());
    r.start(vec![diamond()]);
    r.join("w1", 10);
    let run = r.trigger("wf").unwrap();
    let stale = r.stored(&run.run_id).unwrap();
    assert_eq!(states(&stale)["a"], RunState::Running);
    finish(&mut r, "a", ok("A"));
    finish(&mut r, "b", ok("B"));
    let c = one(&r, "c");
    // The snapshot that landed last is the old one.
    ready(r.store.save_run(&stale)).unwrap();
    let sent_before: usize = r.all_assigns().len();

    let mut next = Rig::on(r.store.clone(), opts(), 2, r.now + 1_000);
    next.start(vec![diamond()]);
    let adopted = &next.m.runs.active[&run.run_id];
    let s = states(adopted);
    assert_eq!(
        (s["a"], s["b"], s["c"], s["d"]),
        (
            RunState::Succeeded,
            RunState::Succeeded,
            RunState::Running,
            RunState::Pending
        )
    );
    next.join_with(WorkerHello {
        worker_id: "w1".into(),
        group: "g".into(),
        handlers: vec!["h".into()],
        capacity: 10,
        labels: BTreeMap::new(),
        running: vec![c.key.clone()],
    })
    .unwrap();
    next.live_for(10_000);
    assert!(
        next.all_assigns().is_empty(),
        "nothing ran again: {:?}",
        next.all_assigns()
    );
    next.succeed("w1", &c.key);
    let d = one(&next, "d");
    next.succeed("w1", &d.key);
    let done = next.stored(&run.run_id).unwrap();
    assert_eq!(done.state, RunState::Succeeded);
    let b = done.nodes.iter().find(|n| n.name == "b").unwrap();
    assert_eq!(b.output, "B", "b's output came from b's run");
    assert_eq!(sent_before, 3, "leader 1 sent a, b and c");
}

#[test]
fn a_nodes_timeout_and_retries_are_its_own() {
    let mut slow = node("slow", &[]);
    slow.timeout_ms = 1_000;
    slow.retries = 1;
    let mut r = Rig::new(opts());
    r.start(vec![flow("wf", vec![slow, node("next", &[("slow", "")])])]);
    r.join("w1", 10);
    let run = r.trigger("wf").unwrap();
    let first = one(&r, "slow");
    // The first attempt times out: cancelled on its worker, then retried.
    r.live_for(1_500);
    assert!(r.cancels("w1").contains(&first.key));
    let attempts = of(&r, "slow");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert!(of(&r, "next").is_empty(), "next waits for the retry");
    r.succeed("w1", &attempts[1].key);
    let next = one(&r, "next");
    r.succeed("w1", &next.key);
    let done = r.stored(&run.run_id).unwrap();
    assert_eq!(done.state, RunState::Succeeded);
    let slow_run = r.stored(&format!("{}~slow", run.run_id)).unwrap();
    assert_eq!(slow_run.shards[0].failures, 1);
}
