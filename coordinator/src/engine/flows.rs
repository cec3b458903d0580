//! Workflow runs, in the core. A workflow run is a run of a workflow job: fired,
//! recorded, fenced, overlapped, killed and adopted like any run, but with nodes
//! instead of shards (see [`crate::workflow`] for the rules). Here: firing the
//! nodes whose parents ended (each node's fire recorded as any fire, under its
//! run id `<workflow run>~<node>`), taking in a node run's end, killing, a new
//! leader reconciling the workflow runs it adopted with the node runs it finds, a
//! rerun from a node, and the jobs of inline nodes.
//!
//! **Exactly once across leaders.** A node is fired under a run id every leader
//! derives the same way, and a fire id the store refuses twice. A new leader
//! takes each adopted workflow run's nodes from what the store says of their runs
//! (running: adopted with the workflow; ended: its result taken; absent: never
//! recorded, so fired now), not from the workflow run's own snapshot, which is
//! written in the background and may be behind. A node is marked running before
//! its fire is recorded, so nothing fires it twice meanwhile; a fire the store
//! could not record puts it back to pending and is tried again a second later.

use std::collections::{BTreeMap, HashMap};

use tracing::{info, warn};

use super::dispatch::Fire;
use super::jobs::JobState;
use super::machine::{CallId, Effect, Machine, Reply, Timer, Work};
use crate::error::CoordError;
use crate::model::{RunRecord, RunState};
use crate::store::{FireAnswer, StoredJob};
use crate::workflow::{self, NodeRecord, Readiness};

/// The cause of a node's run.
pub(super) const NODE_CAUSE: &str = "workflow";
/// The cause of a workflow run started again from a node.
pub(super) const RERUN_CAUSE: &str = "rerun";

/// How long a node whose fire the store could not record waits to be fired again.
const REFIRE_MS: i64 = 1_000;

impl Machine {
    /// Fires the pending nodes of workflow run `wf_id` whose parents ended (or
    /// skips them, when an edge's condition does not hold), until nothing changes;
    /// ends the run once every node is final, else saves its progress.
    pub(super) fn advance(&mut self, wf_id: &str) {
        let now = self.now;
        let mut fires = Vec::new();
        loop {
            let Some(run) = self.runs.active.get(wf_id) else {
                return;
            };
            let states: BTreeMap<&str, RunState> = run
                .nodes
                .iter()
                .map(|n| (n.name.as_str(), n.state))
                .collect();
            let decided: Vec<(usize, Readiness)> = run
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.state == RunState::Pending)
                .map(|(i, n)| (i, workflow::readiness(n, &states)))
                .filter(|(_, r)| *r != Readiness::Wait)
                .collect();
            if decided.is_empty() {
                break;
            }
            for (i, what) in decided {
                let verdict = match what {
                    Readiness::Skip(why) => Err((RunState::Skipped, why)),
                    _ => self.node_fire(wf_id, i),
                };
                let Some(run) = self.runs.active.get_mut(wf_id) else {
                    return;
                };
                let node = &mut run.nodes[i];
                match verdict {
                    Ok(fire) => {
                        node.state = RunState::Running;
                        node.run_id = fire.run_id.clone();
                        node.started_at_ms = now;
                        fires.push(fire);
                    }
                    Err((state, why)) => {
                        node.state = state;
                        node.error = why;
                        node.finished_at_ms = now;
                    }
                }
            }
        }
        if !fires.is_empty() {
            info!(
                workflow_run = wf_id,
                nodes = fires.len(),
                "firing workflow nodes"
            );
            self.spawn(Work::Fire { fires, reply: None });
        }
        self.wf_progress(wf_id);
    }

    /// Ends workflow run `wf_id` if every node is final (firing its children as
    /// any run's), else saves it.
    fn wf_progress(&mut self, wf_id: &str) {
        let done = self
            .runs
            .active
            .get(wf_id)
            .is_some_and(|r| r.nodes.iter().all(|n| n.state.is_final()));
        if done {
            self.maybe_finish(wf_id);
        } else if let Some(r) = self.runs.active.get(wf_id).cloned() {
            self.save(&r);
        }
    }

    /// The fire of node `i` of workflow run `wf_id` (its parents' outputs in its
    /// params), or why it cannot run (its job is gone, or is a workflow).
    fn node_fire(&self, wf_id: &str, i: usize) -> Result<Fire, (RunState, String)> {
        let run = &self.runs.active[wf_id];
        let node = &run.nodes[i];
        let spec = match self.jobs.get(&node.job) {
            Some(j) if j.spec.workflow.is_some() => {
                return Err((
                    RunState::Failed,
                    format!("job {:?} is a workflow; workflows do not nest", node.job),
                ));
            }
            Some(j) => &j.spec,
            None => {
                return Err((
                    RunState::Failed,
                    format!("job {:?} does not exist", node.job),
                ));
            }
        };
        let outputs: Vec<(&str, &str)> = node
            .after
            .iter()
            .filter_map(|e| run.nodes.iter().find(|n| n.name == e.node))
            .map(|p| (p.name.as_str(), p.output.as_str()))
            .collect();
        let params = workflow::node_params(&spec.params, &run.params, &outputs);
        let id = workflow::node_run_id(wf_id, &node.name);
        Ok(Fire {
            job: node.job.clone(),
            at: self.now,
            cause: NODE_CAUSE,
            params: Some(params),
            parent: wf_id.to_owned(),
            run_id: id.clone(),
            fire_id: id,
            nodes: Vec::new(),
        })
    }

    /// A node's run ended (`run`, final): its node takes its state and output, and
    /// the workflow goes on.
    pub(super) fn node_ended(&mut self, run: &RunRecord) {
        let now = self.now;
        let Some(wf) = self.runs.active.get_mut(&run.parent_run_id) else {
            return;
        };
        let Some(node) = wf.nodes.iter_mut().find(|n| n.run_id == run.run_id) else {
            return;
        };
        // Final already: the workflow run was killed, and this is its node's end.
        if node.state.is_final() {
            return;
        }
        take_result(node, run, now);
        let wf_id = run.parent_run_id.clone();
        self.advance(&wf_id);
    }

    /// What the store answered to a node's fire (`None`: it could not record it).
    pub(super) fn node_fire_settled(&mut self, run: &RunRecord, answer: Option<FireAnswer>) {
        match answer {
            Some(FireAnswer::Recorded) | Some(FireAnswer::Fenced) => {}
            Some(FireAnswer::Duplicate) => {
                // Fired by a leader before this one: its run is adopted (and ends
                // into this node) or ended before this leader started (and the
                // start took its result). Either way it is not fired again.
                if !self.runs.active.contains_key(&run.run_id) {
                    warn!(run_id = %run.run_id, "a node's fire was recorded before; not firing it again");
                }
            }
            None => {
                let Some(wf) = self.runs.active.get_mut(&run.parent_run_id) else {
                    return;
                };
                if let Some(node) = wf
                    .nodes
                    .iter_mut()
                    .find(|n| n.run_id == run.run_id && n.state == RunState::Running)
                {
                    node.state = RunState::Pending;
                    node.run_id.clear();
                    node.started_at_ms = 0;
                }
                let at = self.now + REFIRE_MS;
                self.timers
                    .schedule(at, Timer::Advance(run.parent_run_id.clone()));
            }
        }
    }

    /// Cancels workflow run `wf_id`: every node not ended is cancelled (the runs
    /// of running ones too), then the run ends. Answers the ended run.
    pub(super) fn cancel_workflow(&mut self, wf_id: &str, why: &str) -> Option<RunRecord> {
        let now = self.now;
        let run = self.runs.active.get_mut(wf_id)?;
        let mut stop = Vec::new();
        for n in run.nodes.iter_mut().filter(|n| !n.state.is_final()) {
            if n.state == RunState::Running {
                stop.push(n.run_id.clone());
            }
            n.state = RunState::Cancelled;
            n.error = why.to_owned();
            n.finished_at_ms = now;
        }
        run.note = why.to_owned();
        // The nodes are final first, so their runs' ends change nothing here.
        for id in stop {
            let _ = self.cancel_run(&id, why);
        }
        self.finish(wf_id)
    }

    /// A new leader adopted the runs in progress: each workflow run's unfinished
    /// nodes are set from their runs as the store has them (see the module doc;
    /// `ended`: node runs found ended), then the workflow goes on.
    pub(super) fn reconcile_workflows(&mut self, ended: Vec<RunRecord>) {
        let now = self.now;
        let ended: HashMap<String, RunRecord> =
            ended.into_iter().map(|r| (r.run_id.clone(), r)).collect();
        let mut ids: Vec<String> = self
            .runs
            .active
            .values()
            .filter(|r| r.is_workflow())
            .map(|r| r.run_id.clone())
            .collect();
        ids.sort_unstable();
        for wf_id in ids {
            let live: Vec<bool> = self.runs.active[&wf_id]
                .nodes
                .iter()
                .map(|n| {
                    let id = workflow::node_run_id(&wf_id, &n.name);
                    self.runs.active.contains_key(&id)
                })
                .collect();
            let Some(wf) = self.runs.active.get_mut(&wf_id) else {
                continue;
            };
            for (node, live) in wf.nodes.iter_mut().zip(live) {
                if node.state.is_final() {
                    continue;
                }
                let id = workflow::node_run_id(&wf_id, &node.name);
                if live {
                    node.state = RunState::Running;
                    node.run_id = id;
                } else if let Some(r) = ended.get(&id) {
                    node.run_id = id;
                    take_result(node, r, now);
                } else {
                    node.state = RunState::Pending;
                    node.run_id.clear();
                }
            }
            self.advance(&wf_id);
        }
    }

    /// Starts finished workflow run `old` again from node `from` (see
    /// [`workflow::rerun_nodes`]); the new run answers `call`.
    pub(super) fn rerun(&mut self, call: CallId, old: RunRecord, from: &str) {
        let refused = if !old.is_workflow() {
            Some(CoordError::invalid("run_id", "is not a workflow run"))
        } else if !old.state.is_final() || self.runs.active.contains_key(&old.run_id) {
            Some(CoordError::Conflict(format!(
                "run {:?} has not ended; kill it first",
                old.run_id
            )))
        } else if !self.jobs.contains_key(&old.job) {
            Some(CoordError::NotFound(format!("job {:?}", old.job)))
        } else {
            None
        };
        let nodes = match refused.map_or_else(|| workflow::rerun_nodes(&old.nodes, from), Err) {
            Ok(n) => n,
            Err(e) => {
                self.effect(Effect::Reply(call, Reply::Run(Err(e))));
                return;
            }
        };
        let now = self.now;
        let id = format!("{}@r{now}-{:04x}", old.job, self.rng.u16(..));
        info!(run_id = %id, from_run = %old.run_id, node = from, "rerunning a workflow from a node");
        let fire = Fire {
            job: old.job.clone(),
            at: now,
            cause: RERUN_CAUSE,
            params: Some(old.params.clone()),
            parent: old.run_id.clone(),
            run_id: id.clone(),
            fire_id: id,
            nodes,
        };
        self.spawn(Work::Fire {
            fires: vec![fire],
            reply: Some(call),
        });
    }

    /// Keeps the jobs of workflow `name`'s inline nodes in step with its
    /// definition (added, replaced, or removed with it; `before`: the inline jobs
    /// of its previous definition): node fires find their handler, routing,
    /// shards, timeout and retries there as any job's.
    pub(super) fn sync_inline_jobs(&mut self, name: &str, before: Vec<String>) {
        let wanted: Vec<StoredJob> = self
            .jobs
            .get(name)
            .and_then(|j| {
                let wf = j.spec.workflow.as_ref()?;
                Some(
                    wf.nodes
                        .iter()
                        .filter_map(|n| n.inline_job(&j.spec))
                        .map(|spec| StoredJob {
                            spec,
                            version: j.version,
                        })
                        .collect(),
                )
            })
            .unwrap_or_default();
        for gone in before
            .iter()
            .filter(|b| !wanted.iter().any(|w| &w.spec.name == *b))
        {
            self.jobs.remove(gone);
        }
        for j in wanted {
            // Installed as they are: a manual schedule has no ticks to plan, and
            // the name holds the separator no stored job's may (the node was
            // checked under its own name with the workflow).
            let Ok(compiled) = crate::schedule::Compiled::of(&j.spec) else {
                continue;
            };
            let name = j.spec.name.clone();
            let prev = self.jobs.remove(&name);
            let state = JobState {
                spec: j.spec,
                version: j.version,
                compiled,
                generation: prev.as_ref().map_or(0, |p| p.generation) + 1,
                next_fire: None,
                last_fire: None,
                running: prev.map(|p| p.running).unwrap_or_default(),
                buffered: None,
                prepared: None,
                rr: chime_shared::queue::fnv1a64(name.as_bytes()) % 1_000_003,
            };
            self.jobs.insert(name, Box::new(state));
        }
    }

    /// The jobs of workflow job `name`'s inline nodes, as the engine has it now.
    pub(super) fn inline_jobs_of(&self, name: &str) -> Vec<String> {
        self.jobs
            .get(name)
            .and_then(|j| j.spec.workflow.as_ref())
            .map(|wf| {
                wf.nodes
                    .iter()
                    .filter(|n| n.job.is_empty())
                    .map(|n| workflow::inline_job_name(name, &n.name))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A node takes the result of its ended run.
fn take_result(node: &mut NodeRecord, run: &RunRecord, now: i64) {
    node.state = run.state;
    node.finished_at_ms = if run.finished_at_ms > 0 {
        run.finished_at_ms
    } else {
        now
    };
    if run.state == RunState::Succeeded {
        let outputs: Vec<String> = run.shards.iter().map(|s| s.output.clone()).collect();
        node.output = workflow::node_output(&outputs);
    } else {
        node.error = run
            .shards
            .iter()
            .find(|s| !s.error.is_empty())
            .map(|s| s.error.clone())
            .unwrap_or_else(|| run.note.clone());
    }
}
