//! The coordinator's domain: jobs (what runs, where, when), runs and shards, and
//! the checks every job definition passes before it is stored. No generated proto
//! type appears here; `grpc.rs` converts at the edge.

use serde::{Deserialize, Serialize};

use crate::error::{CoordError, Result};
use crate::schedule;
use crate::workflow::{NodeRecord, WorkflowSpec};
use chime_shared::limits;

/// When a job fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Cron with seconds (6 fields) or without (5), in an IANA time zone.
    Cron {
        /// The expression.
        expr: String,
        /// IANA zone, empty for UTC.
        #[serde(default)]
        time_zone: String,
    },
    /// Every `every_ms`, aligned on the job's start (or its creation).
    FixedRate {
        /// Period.
        every_ms: u64,
    },
    /// `delay_ms` after the previous run ended.
    FixedDelay {
        /// Delay.
        delay_ms: u64,
    },
    /// Once, at an instant.
    Once {
        /// When, Unix ms.
        at_ms: i64,
    },
    /// Only when triggered.
    Manual,
}

/// How a fire picks its workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Every shard to its own worker.
    ShardingBroadcast,
    /// The next worker in turn.
    #[default]
    RoundRobin,
    /// A random worker.
    Random,
    /// The worker a hash of a param picks.
    ConsistentHash,
    /// The worker given work longest ago.
    LeastRecentlyUsed,
    /// The worker running the fewest shards.
    LeastLoaded,
    /// The first live worker by id; the next one when it fails.
    Failover,
    /// The first worker by id not running this job now.
    BusyOver,
    /// The first worker by id.
    First,
    /// The last worker by id.
    Last,
}

/// What a fire does when the previous run is still going.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Run both.
    #[default]
    Allow,
    /// Skip the new fire.
    Skip,
    /// Keep one fire waiting; run it when the current run ends.
    BufferOne,
    /// Cancel the running one; run the new one.
    CancelRunning,
}

/// What happens to ticks no coordinator fired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// Drop them (reported as skipped).
    Skip,
    /// Fire once for all of them.
    #[default]
    FireOnce,
    /// Fire each one within the catch-up window.
    FireAll,
}

/// A job definition, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique name.
    pub name: String,
    /// Worker group.
    pub group: String,
    /// Handler name (empty for a workflow, whose nodes name theirs).
    #[serde(default)]
    pub handler: String,
    /// When it fires.
    pub schedule: Schedule,
    /// How a fire picks workers.
    #[serde(default)]
    pub routing: Routing,
    /// Sharding broadcast: 0 = one shard per live worker; N = N shards.
    #[serde(default)]
    pub shard_count: u32,
    /// Per-shard params for a fixed shard count.
    #[serde(default)]
    pub shard_params: Vec<String>,
    /// Consistent hash: the top-level JSON field of `params` to hash.
    #[serde(default)]
    pub hash_param: String,
    /// Params for every shard.
    #[serde(default)]
    pub params: String,
    /// Overlap policy.
    #[serde(default)]
    pub overlap: Overlap,
    /// Misfire policy.
    #[serde(default)]
    pub misfire: Misfire,
    /// Fire-all misfire: how far back, ms.
    #[serde(default)]
    pub catch_up_window_ms: u64,
    /// Per-shard timeout, ms (0: none).
    #[serde(default)]
    pub timeout_ms: u64,
    /// Retries of a failed or timed-out shard.
    #[serde(default)]
    pub retries: u32,
    /// First retry backoff, ms (doubles per retry).
    #[serde(default)]
    pub retry_backoff_ms: u64,
    /// Jobs fired when a run succeeds.
    #[serde(default)]
    pub children: Vec<String>,
    /// Paused jobs do not fire.
    #[serde(default)]
    pub paused: bool,
    /// No fire before, Unix ms (0: none).
    #[serde(default)]
    pub start_at_ms: i64,
    /// No fire after, Unix ms (0: none).
    #[serde(default)]
    pub end_at_ms: i64,
    /// Random delay of each fire, ms.
    #[serde(default)]
    pub jitter_ms: u64,
    /// When the job was created, Unix ms (fixed-rate ticks align on it when
    /// `start_at_ms` is 0). Set by the store.
    #[serde(default)]
    pub created_at_ms: i64,
    /// A workflow: a fire runs this DAG of nodes instead of a handler (see
    /// [`crate::workflow`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<WorkflowSpec>,
}

/// Most shards of one run.
pub const MAX_SHARDS: u32 = 10_000;
/// Largest params, bytes.
pub const MAX_PARAMS_BYTES: usize = 64 * 1024;
/// Shortest period between two fires of one job, ms (cron and fixed rate).
pub const MIN_PERIOD_MS: u64 = 100;
/// Longest fixed rate or delay, ms (366 days; longer is a cron job).
pub const MAX_PERIOD_MS: u64 = 366 * 86_400_000;
/// Most child jobs.
pub const MAX_CHILDREN: usize = 32;

impl JobSpec {
    /// A job with every optional field at its stored default (the values a JSON
    /// definition that leaves them out gets).
    pub fn new(
        name: impl Into<String>,
        group: impl Into<String>,
        handler: impl Into<String>,
        schedule: Schedule,
    ) -> Self {
        Self {
            name: name.into(),
            group: group.into(),
            handler: handler.into(),
            schedule,
            routing: Routing::default(),
            shard_count: 0,
            shard_params: vec![],
            hash_param: String::new(),
            params: String::new(),
            overlap: Overlap::default(),
            misfire: Misfire::default(),
            catch_up_window_ms: 0,
            timeout_ms: 0,
            retries: 0,
            retry_backoff_ms: 0,
            children: vec![],
            paused: false,
            start_at_ms: 0,
            end_at_ms: 0,
            jitter_ms: 0,
            created_at_ms: 0,
            workflow: None,
        }
    }

    /// Checks every field; errors name it. Does not look at other jobs.
    pub fn validate(&self) -> Result<()> {
        let lim = |r: chime_shared::Result<()>| r.map_err(CoordError::from);
        lim(limits::check_qualified("name", &self.name))?;
        lim(limits::check_qualified("group", &self.group))?;
        // A job of a namespace runs on workers of that namespace only, so a team's
        // job never reaches another team's workers (nor its items' handlers).
        let ns = limits::namespace_of(&self.name);
        if limits::namespace_of(&self.group) != ns {
            return Err(CoordError::invalid(
                "group",
                format!(
                    "a job of namespace {ns:?} runs on a group of that namespace ({})",
                    in_namespace(ns, "<group>")
                ),
            ));
        }
        match &self.workflow {
            None => lim(limits::check_handler("handler", &self.handler))?,
            Some(wf) => {
                if !self.handler.is_empty() {
                    return Err(CoordError::invalid(
                        "handler",
                        "a workflow has no handler of its own (its nodes have)",
                    ));
                }
                if self.routing != Routing::default() || self.shard_count > 0 {
                    return Err(CoordError::invalid(
                        "routing",
                        "a workflow is not routed (its nodes are)",
                    ));
                }
                wf.validate(self)?;
            }
        }
        schedule::validate(&self.schedule)?;
        if self.shard_count > MAX_SHARDS {
            return Err(CoordError::invalid(
                "shard_count",
                format!("{} is above {MAX_SHARDS}", self.shard_count),
            ));
        }
        if !self.shard_params.is_empty() && self.shard_params.len() != self.shard_count as usize {
            return Err(CoordError::invalid(
                "shard_params",
                format!(
                    "{} given for shard_count {}",
                    self.shard_params.len(),
                    self.shard_count
                ),
            ));
        }
        if self.routing != Routing::ShardingBroadcast
            && (self.shard_count > 0 || !self.shard_params.is_empty())
        {
            return Err(CoordError::invalid(
                "shard_count",
                "only sharding_broadcast routing has shards",
            ));
        }
        if self.params.len() > MAX_PARAMS_BYTES {
            return Err(CoordError::invalid(
                "params",
                format!(
                    "is {} bytes, the limit is {MAX_PARAMS_BYTES}",
                    self.params.len()
                ),
            ));
        }
        let shard_bytes: usize = self.shard_params.iter().map(String::len).sum();
        if shard_bytes > MAX_PARAMS_BYTES {
            return Err(CoordError::invalid(
                "shard_params",
                format!("{shard_bytes} bytes in all, the limit is {MAX_PARAMS_BYTES}"),
            ));
        }
        if self.routing == Routing::ConsistentHash && !self.hash_param.is_empty() {
            lim(limits::check_text("hash_param", &self.hash_param, 128))?;
        }
        if self.retries > 100 {
            return Err(CoordError::invalid("retries", "is above 100"));
        }
        if self.timeout_ms > 7 * 86_400_000 {
            return Err(CoordError::invalid("timeout_ms", "is above 7 days"));
        }
        if self.retry_backoff_ms > 86_400_000 {
            return Err(CoordError::invalid("retry_backoff_ms", "is above 1 day"));
        }
        if self.jitter_ms > 3_600_000 {
            return Err(CoordError::invalid("jitter_ms", "is above 1 hour"));
        }
        if self.catch_up_window_ms > 7 * 86_400_000 {
            return Err(CoordError::invalid("catch_up_window_ms", "is above 7 days"));
        }
        for (field, ms) in [
            ("start_at_ms", self.start_at_ms),
            ("end_at_ms", self.end_at_ms),
        ] {
            lim(limits::check_due(field, ms))?;
        }
        if self.end_at_ms != 0 && self.end_at_ms < self.start_at_ms {
            return Err(CoordError::invalid("end_at_ms", "is before start_at_ms"));
        }
        if self.children.len() > MAX_CHILDREN {
            return Err(CoordError::invalid(
                "children",
                format!("more than {MAX_CHILDREN}"),
            ));
        }
        for (i, c) in self.children.iter().enumerate() {
            lim(limits::check_qualified(&format!("children[{i}]"), c))?;
            if limits::namespace_of(c) != ns {
                return Err(CoordError::invalid(
                    format!("children[{i}]"),
                    format!("a child job is of the parent's namespace {ns:?}"),
                ));
            }
            if *c == self.name {
                return Err(CoordError::invalid(
                    format!("children[{i}]"),
                    "a job cannot be its own child",
                ));
            }
        }
        Ok(())
    }
}

/// State of a run or a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for a worker or a retry.
    Pending,
    /// Running.
    Running,
    /// Done, successfully.
    Succeeded,
    /// Failed with no retry left.
    Failed,
    /// Killed or covered.
    Cancelled,
    /// Timed out with no retry left.
    TimedOut,
    /// Not run (overlap or misfire policy).
    Skipped,
}

impl RunState {
    /// No further change will happen.
    pub fn is_final(self) -> bool {
        !matches!(self, RunState::Pending | RunState::Running)
    }

    /// Its name as stored and served (serde's snake case), for metric labels.
    pub fn label(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::TimedOut => "timed_out",
            RunState::Skipped => "skipped",
        }
    }
}

/// One shard of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Index.
    pub index: u32,
    /// Shards in the run.
    pub total: u32,
    /// Worker of the current attempt.
    pub worker_id: String,
    /// Current assignment number (1-based).
    pub attempt: u32,
    /// Failed or timed-out attempts so far.
    pub failures: u32,
    /// State.
    pub state: RunState,
    /// Unix ms.
    pub started_at_ms: i64,
    /// Unix ms.
    pub finished_at_ms: i64,
    /// Output of the last successful attempt.
    pub output: String,
    /// Last error.
    pub error: String,
    /// Last log lines.
    pub log_tail: Vec<String>,
    /// This shard's params.
    pub shard_params: String,
}

/// One run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Run id.
    pub run_id: String,
    /// Fire id.
    pub fire_id: String,
    /// Job name.
    pub job: String,
    /// scheduled, manual, misfire, child, buffered, workflow (a node's run),
    /// rerun (a workflow run started again from a node).
    pub cause: String,
    /// The scheduled instant.
    pub scheduled_at_ms: i64,
    /// When fired.
    pub fired_at_ms: i64,
    /// When it ended.
    pub finished_at_ms: i64,
    /// Overall state.
    pub state: RunState,
    /// Params used.
    pub params: String,
    /// Shards.
    pub shards: Vec<ShardRecord>,
    /// Parent run (child jobs; a node's workflow run; a rerun's earlier run).
    pub parent_run_id: String,
    /// Why skipped or cancelled.
    pub note: String,
    /// Fencing token of the leader that fired it.
    #[serde(default)]
    pub fence: i64,
    /// A workflow run's nodes (empty for a job's run, which has shards instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeRecord>,
}

impl RunRecord {
    /// Whether this is a workflow run (nodes, no shards).
    pub fn is_workflow(&self) -> bool {
        !self.nodes.is_empty()
    }
}

/// `s` cut to at most `max` bytes, on a character boundary (outputs, errors and
/// log lines kept in runs).
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// A connected worker as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerView {
    /// Id.
    pub worker_id: String,
    /// Group.
    pub group: String,
    /// Handlers.
    pub handlers: Vec<String>,
    /// Capacity.
    pub capacity: u32,
    /// Shards running.
    pub running: u32,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Unix ms.
    pub connected_at_ms: i64,
    /// Unix ms.
    pub last_heartbeat_ms: i64,
    /// Draining.
    pub draining: bool,
}

/// How a name `local` of namespace `ns` is written (`nightly`, `payments/nightly`).
pub fn in_namespace(ns: &str, local: &str) -> String {
    if ns == limits::DEFAULT_NAMESPACE {
        local.to_owned()
    } else {
        format!("{ns}/{local}")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn job(name: &str) -> JobSpec {
        JobSpec::new(
            name,
            "g",
            "h",
            Schedule::Cron {
                expr: "*/5 * * * * *".into(),
                time_zone: String::new(),
            },
        )
    }

    fn field(j: JobSpec) -> String {
        match j.validate() {
            Err(CoordError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(job("ok").validate().is_ok());
        assert_eq!(
            field(JobSpec {
                name: "bad name".into(),
                ..job("x")
            }),
            "name"
        );
        assert_eq!(
            field(JobSpec {
                schedule: Schedule::Cron {
                    expr: "61 * * * * *".into(),
                    time_zone: String::new()
                },
                ..job("x")
            }),
            "schedule.expr"
        );
        assert_eq!(
            field(JobSpec {
                schedule: Schedule::Cron {
                    expr: "* * * * *".into(),
                    time_zone: "Mars/Olympus".into()
                },
                ..job("x")
            }),
            "schedule.time_zone"
        );
        assert_eq!(
            field(JobSpec {
                schedule: Schedule::FixedRate { every_ms: 5 },
                ..job("x")
            }),
            "schedule.every_ms"
        );
        assert_eq!(
            field(JobSpec {
                routing: Routing::RoundRobin,
                shard_count: 3,
                ..job("x")
            }),
            "shard_count"
        );
        assert_eq!(
            field(JobSpec {
                routing: Routing::ShardingBroadcast,
                shard_count: 2,
                shard_params: vec!["a".into()],
                ..job("x")
            }),
            "shard_params"
        );
        assert_eq!(
            field(JobSpec {
                params: "x".repeat(MAX_PARAMS_BYTES + 1),
                ..job("x")
            }),
            "params"
        );
        assert_eq!(
            field(JobSpec {
                children: vec!["x".into()],
                ..job("x")
            }),
            "children[0]"
        );
        assert_eq!(
            field(JobSpec {
                start_at_ms: 10,
                end_at_ms: 5,
                ..job("x")
            }),
            "end_at_ms"
        );
    }

    #[test]
    fn stored_form_round_trips_and_refuses_unknown_fields() {
        let j = job("a");
        let text = serde_json::to_string(&j).unwrap();
        assert_eq!(serde_json::from_str::<JobSpec>(&text).unwrap(), j);
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["colour"] = "red".into();
        assert!(serde_json::from_value::<JobSpec>(v).is_err());
    }
}

/// One change to what the cluster does, as the audit log keeps it: who, when, what,
/// before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Given by the store, increasing (`<ms>-<seq>`); listings page back from one.
    #[serde(default)]
    pub id: String,
    /// When, Unix ms (the coordinator's clock).
    pub at_ms: i64,
    /// Who: the name of the token presented (see `chime_shared::auth`; never the
    /// token), `anonymous` on a cluster without tokens.
    pub who: String,
    /// What was done (one of [`AuditAction`]'s names).
    pub action: String,
    /// What it was done to: a job name, a run id, a setting key, the dead letters.
    pub target: String,
    /// The state before (a job's definition, a setting's value), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    /// The state after, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
}

/// The changes the audit log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    /// A job was created.
    JobCreate,
    /// A job's definition was replaced.
    JobUpdate,
    /// A job was deleted.
    JobDelete,
    /// A job was paused.
    JobPause,
    /// A job was resumed.
    JobResume,
    /// A job was fired by hand.
    JobTrigger,
    /// A run was killed.
    RunKill,
    /// A workflow run was started again from a node.
    RunRerun,
    /// A live setting was written.
    ConfigSet,
    /// A live setting was deleted (back to its default).
    ConfigDelete,
    /// Dead letters were sent back to their queues.
    DeadLettersRequeue,
    /// An alert rule was created or replaced.
    AlertPut,
    /// An alert rule was deleted.
    AlertDelete,
}

impl AuditAction {
    /// Its name in entries: `job.create`, `run.kill`, `config.set`, ….
    pub fn name(self) -> &'static str {
        match self {
            AuditAction::JobCreate => "job.create",
            AuditAction::JobUpdate => "job.update",
            AuditAction::JobDelete => "job.delete",
            AuditAction::JobPause => "job.pause",
            AuditAction::JobResume => "job.resume",
            AuditAction::JobTrigger => "job.trigger",
            AuditAction::RunKill => "run.kill",
            AuditAction::RunRerun => "run.rerun",
            AuditAction::ConfigSet => "config.set",
            AuditAction::ConfigDelete => "config.delete",
            AuditAction::DeadLettersRequeue => "dead_letters.requeue",
            AuditAction::AlertPut => "alert.put",
            AuditAction::AlertDelete => "alert.delete",
        }
    }
}

/// A run that ended badly (failed or timed out after its retries, or a fire
/// skipped), as the alert evaluator reads it: saved with the run's final state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEvent {
    /// Given by the store, increasing.
    #[serde(default)]
    pub id: String,
    /// The job.
    pub job: String,
    /// The run.
    pub run_id: String,
    /// How it ended.
    pub state: RunState,
    /// When it ended, Unix ms.
    pub at_ms: i64,
    /// The first failed shard's error (or why the fire was skipped), clipped.
    #[serde(default)]
    pub error: String,
}

impl RunEvent {
    /// The event of a run just saved, if its end is one alerts watch.
    pub fn of(run: &RunRecord) -> Option<Self> {
        if !matches!(
            run.state,
            RunState::Failed | RunState::TimedOut | RunState::Skipped
        ) {
            return None;
        }
        let error = run
            .shards
            .iter()
            .find(|s| !s.error.is_empty())
            .map(|s| s.error.clone())
            .unwrap_or_else(|| run.note.clone());
        Some(Self {
            id: String::new(),
            job: run.job.clone(),
            run_id: run.run_id.clone(),
            state: run.state,
            at_ms: if run.finished_at_ms > 0 {
                run.finished_at_ms
            } else {
                run.fired_at_ms
            },
            error: error.chars().take(500).collect(),
        })
    }
}
