//! Workflows, the domain part: a job whose `workflow` field holds a DAG of nodes
//! (each a stored job, or an inline spec with its own handler, routing, shards,
//! timeout and retries) joined by edges with a condition. Here: the definition and
//! its checks (cycles, unknown parents, bad conditions, all named by field), the
//! record of a node within a workflow run, and the pure rules the engine applies
//! (when a node may run, what a finished workflow run's state is, what a node is
//! given as params, what a rerun resets). No engine state, no I/O.
//!
//! Why a workflow is a job: its schedule, overlap and misfire policies, manual
//! trigger with params, kill, fencing, history and adoption by a new leader are
//! the job's, unchanged. Its run has no shards; it has nodes, each started as a
//! run of its own (cause `workflow`, parent the workflow run) whose run id is
//! `<workflow run id>~<node>`: the same on every leader, so a node fired by a
//! leader that died is refused as a duplicate by the next, never run twice.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::{CoordError, Result};
use crate::model::{JobSpec, MAX_PARAMS_BYTES, Routing, RunState, Schedule, clip};
use chime_shared::limits;

/// Most nodes in one workflow.
pub const MAX_NODES: usize = 2_000;
/// Most parents of one node.
pub const MAX_PARENTS: usize = 64;
/// Largest output of a node kept in the workflow run (and handed to its
/// children), bytes: bigger outputs are cut.
pub const NODE_OUTPUT_BYTES: usize = 16 * 1024;
/// What separates a workflow run id (or a workflow name) and a node name. Not a
/// character job names may hold, so an inline node's job (`<workflow>~<node>`)
/// never collides with a stored job, and safe in a URL path.
pub const NODE_SEPARATOR: char = '~';

/// When an edge lets its child run, given how its parent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// The parent succeeded (the default).
    OnSuccess,
    /// The parent failed or timed out (after its retries).
    OnFailure,
    /// The parent ended, however (succeeded, failed, timed out, cancelled or
    /// skipped).
    Always,
}

impl When {
    /// Parses a stored condition; `None` for an unknown one.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "on_success" => Some(When::OnSuccess),
            "on_failure" => Some(When::OnFailure),
            "always" => Some(When::Always),
            _ => None,
        }
    }

    /// Whether a parent that ended as `parent` lets the child run.
    pub fn holds(self, parent: RunState) -> bool {
        match self {
            When::OnSuccess => parent == RunState::Succeeded,
            When::OnFailure => matches!(parent, RunState::Failed | RunState::TimedOut),
            When::Always => parent.is_final(),
        }
    }
}

/// An edge into a node: the parent it waits for, and when it lets the node run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    /// The parent node's name.
    pub node: String,
    /// `on_success` (default, also when empty), `on_failure` or `always`. Kept as
    /// text so that a bad value is refused naming its field, not by the parser.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub when: String,
}

impl Edge {
    /// The condition (a stored edge was validated; anything else reads as the
    /// default).
    pub fn condition(&self) -> When {
        When::parse(&self.when).unwrap_or(When::OnSuccess)
    }
}

/// One node of a workflow: a stored job (`job`), or an inline job (`handler` and
/// the fields after it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Unique within the workflow.
    pub name: String,
    /// A stored job this node runs (its handler, group, routing, shards, timeout,
    /// retries and params). Empty: an inline node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job: String,
    /// Inline node: the handler.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handler: String,
    /// Inline node: the worker group (empty: the workflow's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Inline node: routing.
    #[serde(default)]
    pub routing: Routing,
    /// Inline node, sharding broadcast: 0 = one shard per live worker; N = N.
    #[serde(default)]
    pub shard_count: u32,
    /// Inline node: its own params.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub params: String,
    /// Inline node: per-shard timeout, ms (0: none).
    #[serde(default)]
    pub timeout_ms: u64,
    /// Inline node: retries of a failed or timed-out shard.
    #[serde(default)]
    pub retries: u32,
    /// Inline node: first retry backoff, ms (doubles per retry).
    #[serde(default)]
    pub retry_backoff_ms: u64,
    /// The edges into this node (none: a root, started with the workflow run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<Edge>,
}

/// A workflow's DAG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    /// The nodes, in any order.
    pub nodes: Vec<NodeSpec>,
}

/// The job an inline node runs as: `<workflow>~<node>`.
pub fn inline_job_name(workflow: &str, node: &str) -> String {
    format!("{workflow}{NODE_SEPARATOR}{node}")
}

/// The run id of a node within a workflow run: the same on every leader.
pub fn node_run_id(workflow_run: &str, node: &str) -> String {
    format!("{workflow_run}{NODE_SEPARATOR}{node}")
}

/// Whether `job` names an inline node's job (never a stored job).
pub fn is_inline_job(job: &str) -> bool {
    job.contains(NODE_SEPARATOR)
}

impl NodeSpec {
    /// An inline node running `handler`, with every other field at its default.
    pub fn inline(name: impl Into<String>, handler: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            job: String::new(),
            handler: handler.into(),
            group: String::new(),
            routing: Routing::default(),
            shard_count: 0,
            params: String::new(),
            timeout_ms: 0,
            retries: 0,
            retry_backoff_ms: 0,
            after: Vec::new(),
        }
    }

    /// This node with edges from `parents`: (parent, condition; empty for the
    /// default).
    pub fn after(mut self, parents: &[(&str, &str)]) -> Self {
        self.after.extend(parents.iter().map(|(n, w)| Edge {
            node: (*n).into(),
            when: (*w).into(),
        }));
        self
    }

    /// The job this node fires, in a workflow named `workflow`.
    pub fn job_name(&self, workflow: &str) -> String {
        if self.job.is_empty() {
            inline_job_name(workflow, &self.name)
        } else {
            self.job.clone()
        }
    }

    /// An inline node's job (manual schedule, the workflow's group unless its
    /// own); `None` for a node that names a stored job.
    pub fn inline_job(&self, workflow: &JobSpec) -> Option<JobSpec> {
        if !self.job.is_empty() {
            return None;
        }
        let group = if self.group.is_empty() {
            &workflow.group
        } else {
            &self.group
        };
        let mut j = JobSpec::new(
            inline_job_name(&workflow.name, &self.name),
            group.clone(),
            self.handler.clone(),
            Schedule::Manual,
        );
        j.routing = self.routing;
        j.shard_count = self.shard_count;
        j.params = self.params.clone();
        j.timeout_ms = self.timeout_ms;
        j.retries = self.retries;
        j.retry_backoff_ms = self.retry_backoff_ms;
        j.paused = workflow.paused;
        Some(j)
    }
}

impl WorkflowSpec {
    /// Checks the DAG of the workflow job `owner`; errors name the field
    /// (`workflow.nodes[3].after[0].node`). Whether the stored jobs nodes name
    /// exist is the store's check (it needs the other jobs).
    pub fn validate(&self, owner: &JobSpec) -> Result<()> {
        let lim = |r: chime_shared::Result<()>| r.map_err(CoordError::from);
        if self.nodes.is_empty() {
            return Err(CoordError::invalid("workflow.nodes", "must not be empty"));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(CoordError::invalid(
                "workflow.nodes",
                format!("{} nodes, the limit is {MAX_NODES}", self.nodes.len()),
            ));
        }
        let mut index = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let at = |f: &str| format!("workflow.nodes[{i}].{f}");
            lim(limits::check_handler(&at("name"), &n.name))?;
            if index.insert(n.name.as_str(), i).is_some() {
                return Err(CoordError::invalid(
                    at("name"),
                    format!("{:?} names two nodes", n.name),
                ));
            }
            match (n.job.is_empty(), n.handler.is_empty()) {
                (true, true) => {
                    return Err(CoordError::invalid(
                        at("job"),
                        "a node names a stored job, or has a handler (inline)",
                    ));
                }
                (false, false) => {
                    return Err(CoordError::invalid(
                        at("handler"),
                        "a node naming a stored job takes the job's handler",
                    ));
                }
                (false, true) => {
                    lim(limits::check_qualified(&at("job"), &n.job))?;
                    if limits::namespace_of(&n.job) != limits::namespace_of(&owner.name) {
                        return Err(CoordError::invalid(
                            at("job"),
                            format!(
                                "a node runs a job of the workflow's namespace {:?}",
                                limits::namespace_of(&owner.name)
                            ),
                        ));
                    }
                    if n.job == owner.name {
                        return Err(CoordError::invalid(
                            at("job"),
                            "a workflow cannot run itself",
                        ));
                    }
                }
                (true, false) => {
                    let mut job = n.inline_job(owner).unwrap_or_else(|| owner.clone());
                    // Checked under the node's name (in the workflow's
                    // namespace): the job's own holds the separator no stored
                    // name may.
                    job.name =
                        crate::model::in_namespace(limits::namespace_of(&owner.name), &n.name);
                    job.validate().map_err(|e| match e {
                        CoordError::InvalidArgument { field, reason } => {
                            CoordError::InvalidArgument {
                                field: at(&field),
                                reason,
                            }
                        }
                        other => other,
                    })?;
                }
            }
            if n.after.len() > MAX_PARENTS {
                return Err(CoordError::invalid(
                    at("after"),
                    format!("more than {MAX_PARENTS} parents"),
                ));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for (k, e) in n.after.iter().enumerate() {
                let at = |f: &str| format!("workflow.nodes[{i}].after[{k}].{f}");
                if !index.contains_key(e.node.as_str()) {
                    return Err(CoordError::invalid(
                        at("node"),
                        format!("no node is named {:?}", e.node),
                    ));
                }
                if e.node == n.name {
                    return Err(CoordError::invalid(
                        at("node"),
                        "a node cannot follow itself",
                    ));
                }
                if !seen.insert(e.node.as_str()) {
                    return Err(CoordError::invalid(
                        at("node"),
                        format!("{:?} is a parent twice", e.node),
                    ));
                }
                if When::parse(&e.when).is_none() {
                    return Err(CoordError::invalid(
                        at("when"),
                        format!(
                            "{:?} is not a condition (on_success, on_failure or always)",
                            e.when
                        ),
                    ));
                }
            }
        }
        if let Some(cycle) = find_cycle(&self.nodes) {
            return Err(CoordError::invalid(
                "workflow.nodes",
                format!("the edges make a cycle: {}", cycle.join(" -> ")),
            ));
        }
        Ok(())
    }
}

/// A cycle of the graph (its node names, the first repeated at the end), if any.
fn find_cycle(nodes: &[NodeSpec]) -> Option<Vec<String>> {
    // Kahn's algorithm: what is left once every node without parents left is taken
    // away lies on or behind a cycle.
    let index: BTreeMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut parents: Vec<usize> = nodes.iter().map(|n| n.after.len()).collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for e in &n.after {
            if let Some(&p) = index.get(e.node.as_str()) {
                children[p].push(i);
            }
        }
    }
    let mut ready: VecDeque<usize> = (0..nodes.len()).filter(|&i| parents[i] == 0).collect();
    let mut taken = 0;
    while let Some(i) = ready.pop_front() {
        taken += 1;
        for &c in &children[i] {
            parents[c] -= 1;
            if parents[c] == 0 {
                ready.push_back(c);
            }
        }
    }
    if taken == nodes.len() {
        return None;
    }
    // Walk parents from a node left until one repeats: that stretch is a cycle.
    let mut at = (0..nodes.len()).find(|&i| parents[i] > 0)?;
    let mut path: Vec<usize> = Vec::new();
    loop {
        if let Some(pos) = path.iter().position(|&p| p == at) {
            let mut cycle: Vec<String> = path[pos..]
                .iter()
                .rev()
                .map(|&i| nodes[i].name.clone())
                .collect();
            cycle.push(cycle[0].clone());
            return Some(cycle);
        }
        path.push(at);
        at = nodes[at]
            .after
            .iter()
            .filter_map(|e| index.get(e.node.as_str()).copied())
            .find(|&p| parents[p] > 0)?;
    }
}

/// A node within a workflow run: a snapshot of its place in the DAG (so a run
/// goes on as it started when the workflow is edited meanwhile, and a rerun
/// repeats it), and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's name.
    pub name: String,
    /// The job it fires (a stored job, or `<workflow>~<node>`).
    pub job: String,
    /// The edges into it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<Edge>,
    /// `pending` (waiting for its parents), `running` (its run fired), or final:
    /// its run's state, or `skipped` (an edge's condition did not hold), or
    /// `cancelled` (the workflow run was killed first).
    pub state: RunState,
    /// Its run (empty until fired). A rerun keeps the run of a node it does not
    /// reset, which belongs to the earlier workflow run.
    #[serde(default)]
    pub run_id: String,
    /// The run's output (shard outputs as a JSON array when sharded), cut at
    /// [`NODE_OUTPUT_BYTES`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    /// Why it failed or was skipped.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Unix ms (0: not yet).
    #[serde(default)]
    pub started_at_ms: i64,
    /// Unix ms (0: not yet).
    #[serde(default)]
    pub finished_at_ms: i64,
}

impl NodeRecord {
    /// The nodes of a new run of workflow `owner`.
    pub fn plan(owner: &str, wf: &WorkflowSpec) -> Vec<NodeRecord> {
        wf.nodes
            .iter()
            .map(|n| NodeRecord {
                name: n.name.clone(),
                job: n.job_name(owner),
                after: n.after.clone(),
                state: RunState::Pending,
                run_id: String::new(),
                output: String::new(),
                error: String::new(),
                started_at_ms: 0,
                finished_at_ms: 0,
            })
            .collect()
    }
}

/// What a pending node does now, by its parents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// A parent has not ended.
    Wait,
    /// Every parent ended and every edge's condition holds.
    Run,
    /// Every parent ended, and this edge's condition did not hold (the note).
    Skip(String),
}

/// Whether `node` (pending) may run, given the states of the run's nodes.
pub fn readiness(node: &NodeRecord, states: &BTreeMap<&str, RunState>) -> Readiness {
    let mut skip = None;
    for e in &node.after {
        let parent = states
            .get(e.node.as_str())
            .copied()
            .unwrap_or(RunState::Skipped);
        if !parent.is_final() {
            return Readiness::Wait;
        }
        if skip.is_none() && !e.condition().holds(parent) {
            skip = Some(format!(
                "skipped: parent {:?} ended {}, the edge runs {}",
                e.node,
                parent.label(),
                match e.condition() {
                    When::OnSuccess => "on success",
                    When::OnFailure => "on failure",
                    When::Always => "always",
                }
            ));
        }
    }
    match skip {
        Some(why) => Readiness::Skip(why),
        None => Readiness::Run,
    }
}

/// A finished workflow run's state: cancelled if a node was; failed if a node
/// failed or timed out and no edge handles it (`on_failure` or `always` out of
/// it); succeeded otherwise (skipped nodes are branches not taken).
pub fn final_state(nodes: &[NodeRecord]) -> RunState {
    if nodes.iter().any(|n| n.state == RunState::Cancelled) {
        return RunState::Cancelled;
    }
    let handled: BTreeSet<&str> = nodes
        .iter()
        .flat_map(|n| n.after.iter())
        .filter(|e| e.condition() != When::OnSuccess)
        .map(|e| e.node.as_str())
        .collect();
    let unhandled = nodes.iter().find(|n| {
        matches!(n.state, RunState::Failed | RunState::TimedOut)
            && !handled.contains(n.name.as_str())
    });
    match unhandled {
        Some(n) if n.state == RunState::TimedOut => RunState::TimedOut,
        Some(_) => RunState::Failed,
        None => RunState::Succeeded,
    }
}

/// The params a node's run gets: a JSON object with the node's own params
/// (`params`, as JSON when they parse, else as text), the workflow run's
/// (`workflow`), and each parent's output by name (`parents`), the outputs cut
/// so the whole stays within the params limit.
pub fn node_params(own: &str, workflow: &str, parents: &[(&str, &str)]) -> String {
    fn value(text: &str) -> serde_json::Value {
        if text.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
    }
    // What is left for outputs, shared evenly (own and workflow params are each
    // within the limit, but together they may not be: then outputs get nothing).
    let room = MAX_PARAMS_BYTES.saturating_sub(own.len() + workflow.len() + 256);
    let each = if parents.is_empty() {
        0
    } else {
        (room / parents.len()).min(NODE_OUTPUT_BYTES)
    };
    let mut outputs = serde_json::Map::new();
    for (name, out) in parents {
        let v = if out.len() <= each {
            value(out)
        } else {
            serde_json::json!({ "truncated": true, "bytes": out.len() })
        };
        outputs.insert((*name).to_owned(), v);
    }
    serde_json::json!({
        "params": value(own),
        "workflow": value(workflow),
        "parents": outputs,
    })
    .to_string()
}

/// The output a node keeps from its run's shard outputs: one shard's as it is;
/// several as a JSON array of each (as JSON when it parses, else as text).
pub fn node_output(shards: &[String]) -> String {
    let out = match shards {
        [one] => one.clone(),
        many => serde_json::Value::Array(
            many.iter()
                .map(|s| {
                    serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.clone()))
                })
                .collect(),
        )
        .to_string(),
    };
    clip(&out, NODE_OUTPUT_BYTES)
}

/// The nodes of a rerun of a finished workflow run from `from`: `from` and every
/// node downstream of it start again; the others keep how they ended (and their
/// outputs). Errors name the field.
pub fn rerun_nodes(nodes: &[NodeRecord], from: &str) -> Result<Vec<NodeRecord>> {
    if !nodes.iter().any(|n| n.name == from) {
        return Err(CoordError::invalid(
            "node",
            format!("the workflow run has no node {from:?}"),
        ));
    }
    let mut reset: BTreeSet<&str> = BTreeSet::from([from]);
    // Downstream: repeat until nothing joins (the graph is acyclic and small).
    loop {
        let before = reset.len();
        for n in nodes {
            if n.after.iter().any(|e| reset.contains(e.node.as_str())) {
                reset.insert(n.name.as_str());
            }
        }
        if reset.len() == before {
            break;
        }
    }
    Ok(nodes
        .iter()
        .map(|n| {
            if reset.contains(n.name.as_str()) {
                NodeRecord {
                    state: RunState::Pending,
                    run_id: String::new(),
                    output: String::new(),
                    error: String::new(),
                    started_at_ms: 0,
                    finished_at_ms: 0,
                    ..n.clone()
                }
            } else {
                n.clone()
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, after: &[(&str, &str)]) -> NodeSpec {
        NodeSpec::inline(name, "noop").after(after)
    }

    fn owner() -> JobSpec {
        let mut j = JobSpec::new("wf", "g", "", Schedule::Manual);
        j.workflow = Some(WorkflowSpec { nodes: vec![] });
        j
    }

    fn field(nodes: Vec<NodeSpec>) -> (String, String) {
        match (WorkflowSpec { nodes }).validate(&owner()) {
            Err(CoordError::InvalidArgument { field, reason }) => (field, reason),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_diamond_is_valid() {
        let wf = WorkflowSpec {
            nodes: vec![
                node("a", &[]),
                node("b", &[("a", "")]),
                node("c", &[("a", "on_failure")]),
                node("d", &[("b", "always"), ("c", "always")]),
            ],
        };
        wf.validate(&owner()).unwrap();
    }

    #[test]
    fn bad_definitions_are_refused_naming_the_field() {
        let (f, r) = field(vec![
            node("a", &[("c", "")]),
            node("b", &[("a", "")]),
            node("c", &[("b", "")]),
        ]);
        assert_eq!(f, "workflow.nodes");
        assert!(r.contains("cycle"), "{r}");
        assert_eq!(
            field(vec![node("a", &[("zz", "")])]).0,
            "workflow.nodes[0].after[0].node"
        );
        assert_eq!(
            field(vec![node("a", &[]), node("b", &[("a", "sometimes")])]).0,
            "workflow.nodes[1].after[0].when"
        );
        assert_eq!(
            field(vec![node("a", &[]), node("a", &[])]).0,
            "workflow.nodes[1].name"
        );
        assert_eq!(field(vec![node("a~b", &[])]).0, "workflow.nodes[0].name");
        let mut both = node("a", &[]);
        both.job = "other".into();
        assert_eq!(field(vec![both]).0, "workflow.nodes[0].handler");
        let mut neither = node("a", &[]);
        neither.handler.clear();
        assert_eq!(field(vec![neither]).0, "workflow.nodes[0].job");
        let mut timeout = node("a", &[]);
        timeout.timeout_ms = 8 * 86_400_000;
        assert_eq!(field(vec![timeout]).0, "workflow.nodes[0].timeout_ms");
        assert_eq!(field(vec![]).0, "workflow.nodes");
    }

    #[test]
    fn a_cycle_is_named_in_order() {
        let (_, r) = field(vec![
            node("root", &[]),
            node("x", &[("root", ""), ("z", "")]),
            node("y", &[("x", "")]),
            node("z", &[("y", "")]),
        ]);
        // Parent to child, from any node of the cycle; root is not on it.
        for step in ["x -> y", "y -> z", "z -> x"] {
            assert!(r.contains(step), "{r}");
        }
        assert!(!r.contains("root"), "{r}");
    }

    fn rec(name: &str, state: RunState, after: &[(&str, &str)]) -> NodeRecord {
        let mut n = NodeRecord::plan(
            "wf",
            &WorkflowSpec {
                nodes: vec![node(name, after)],
            },
        )
        .remove(0);
        n.state = state;
        n
    }

    #[test]
    fn conditions_decide_run_wait_or_skip() {
        use RunState::*;
        let states = BTreeMap::from([("ok", Succeeded), ("bad", Failed), ("going", Running)]);
        assert_eq!(
            readiness(&rec("n", Pending, &[("ok", "")]), &states),
            Readiness::Run
        );
        assert_eq!(
            readiness(&rec("n", Pending, &[("bad", "on_failure")]), &states),
            Readiness::Run
        );
        assert_eq!(
            readiness(
                &rec("n", Pending, &[("bad", "always"), ("ok", "")]),
                &states
            ),
            Readiness::Run
        );
        assert_eq!(
            readiness(&rec("n", Pending, &[("ok", ""), ("going", "")]), &states),
            Readiness::Wait
        );
        assert!(matches!(
            readiness(&rec("n", Pending, &[("bad", "")]), &states),
            Readiness::Skip(_)
        ));
        assert!(matches!(
            readiness(&rec("n", Pending, &[("ok", "on_failure")]), &states),
            Readiness::Skip(_)
        ));
    }

    #[test]
    fn a_failure_fails_the_run_unless_an_edge_handles_it() {
        use RunState::*;
        let failed = [rec("a", Failed, &[]), rec("b", Skipped, &[("a", "")])];
        assert_eq!(final_state(&failed), Failed);
        let handled = [
            rec("a", Failed, &[]),
            rec("b", Succeeded, &[("a", "on_failure")]),
        ];
        assert_eq!(final_state(&handled), Succeeded);
        let killed = [rec("a", Succeeded, &[]), rec("b", Cancelled, &[("a", "")])];
        assert_eq!(final_state(&killed), Cancelled);
    }

    #[test]
    fn params_carry_parents_outputs_within_the_limit() {
        let p = node_params(r#"{"k":1}"#, "", &[("a", r#"{"n":3}"#), ("b", "text")]);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["params"]["k"], 1);
        assert_eq!(v["parents"]["a"]["n"], 3);
        assert_eq!(v["parents"]["b"], "text");
        assert!(v["workflow"].is_null());
        let big = "x".repeat(NODE_OUTPUT_BYTES);
        let many: Vec<(String, String)> = (0..10).map(|i| (format!("p{i}"), big.clone())).collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let p = node_params("", "", &refs);
        assert!(p.len() <= MAX_PARAMS_BYTES, "{}", p.len());
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["parents"]["p0"]["truncated"], true);
    }

    #[test]
    fn a_sharded_nodes_output_is_an_array_of_its_shards_outputs() {
        assert_eq!(node_output(&["only".into()]), "only");
        let out = node_output(&[r#"{"tasks":3}"#.into(), "text".into()]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v, serde_json::json!([{"tasks": 3}, "text"]));
    }

    #[test]
    fn a_rerun_resets_the_node_and_what_follows_it() {
        use RunState::*;
        let nodes = vec![
            rec("a", Succeeded, &[]),
            rec("b", Failed, &[("a", "")]),
            rec("c", Skipped, &[("b", "")]),
            rec("d", Succeeded, &[("a", "")]),
        ];
        let again = rerun_nodes(&nodes, "b").unwrap();
        let states: Vec<RunState> = again.iter().map(|n| n.state).collect();
        assert_eq!(states, vec![Succeeded, Pending, Pending, Succeeded]);
        assert!(matches!(
            rerun_nodes(&nodes, "nope"),
            Err(CoordError::InvalidArgument { field, .. }) if field == "node"
        ));
    }
}
