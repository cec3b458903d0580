//! Where the coordinator keeps things.
//!
//! - **Jobs** ([`JobStore`]): definitions as JSON under `<prefix>jobs/<name>` in a
//!   [`ConfigSource`] (etcd in production, memory for `chime dev`), with the etcd
//!   revision of the last write as the job's version (updates are compare-and-set).
//! - **Runs and fires** ([`RunStore`]): run history with retention by count and age,
//!   the fire records that make each fire happen once, and the trigger state (last
//!   instant fired per job) — in Redis (one hash tag `{p:sched}`) or in memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use chime_shared::config::source::{ConfigSource, Expect, Snapshot};
use chime_shared::redis_conn::RedisConn;

use crate::error::{CoordError, Result};
use crate::model::{AuditEntry, JobSpec, RunEvent, RunRecord};

/// A job with its store version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJob {
    /// The definition.
    pub spec: JobSpec,
    /// Revision of its last write.
    pub version: i64,
}

/// Every job, and the revision of the source they are current at.
pub type JobsAt = (Vec<StoredJob>, i64);

/// A follower's warm copy of the jobs, handed to its engine when it is elected (see
/// [`crate::warm`]).
#[derive(Debug, Default)]
pub struct Preloaded {
    /// Every job.
    pub jobs: Vec<StoredJob>,
    /// The revision they are current at (the engine's job watcher resumes after it).
    pub revision: i64,
    /// Plans made ahead, one per job of `jobs` in its order (`None`: none made), for
    /// the start to use where they still stand.
    pub ahead: Vec<Option<crate::schedule::Planned>>,
}

/// A change of one job, read from a watch of the prefix ([`JobStore::job_change`]).
#[derive(Debug)]
pub enum JobChange {
    /// Written: the job (boxed: a definition is some 300 bytes), or why it is
    /// unreadable.
    Put(String, Result<Box<StoredJob>>),
    /// Deleted.
    Deleted(String),
}

/// Job definitions in a key-value source, under `jobs/`.
#[derive(Debug, Clone)]
pub struct JobStore {
    kv: Arc<dyn ConfigSource>,
    min_period_ms: u64,
}

/// Most jobs one [`JobStore::create_all`] stores: under etcd's default
/// `--max-txn-ops` (128 compares and 128 writes a transaction), with room to spare.
pub const MAX_JOBS_PER_BATCH: usize = 100;

/// Ticks looked at to find a cron expression's shortest gap.
const GAP_SAMPLES: usize = 512;

fn key(name: &str) -> String {
    format!("jobs/{name}")
}

impl JobStore {
    /// A stored job definition at `version`.
    pub fn decode(value: &str, version: i64) -> Result<StoredJob> {
        let spec: JobSpec = serde_json::from_str(value)
            .map_err(|e| CoordError::Unavailable(format!("stored job is unreadable: {e}")))?;
        Ok(StoredJob { spec, version })
    }

    /// Jobs in `kv` (whose prefix is the deployment's, e.g. `/chime/`).
    pub fn new(kv: Arc<dyn ConfigSource>) -> Self {
        Self {
            kv,
            min_period_ms: crate::model::MIN_PERIOD_MS,
        }
    }

    /// Refuses schedules firing more often than every `ms` (the operator's floor,
    /// `coordinator.min_period_ms`; never below [`crate::model::MIN_PERIOD_MS`]).
    pub fn with_min_period_ms(mut self, ms: u64) -> Self {
        self.min_period_ms = ms.max(crate::model::MIN_PERIOD_MS);
        self
    }

    /// Checks `spec`'s schedule against the floor, naming the schedule's field
    /// (also for `chime apply`, which writes jobs to etcd itself).
    pub fn check_floor(&self, spec: &JobSpec, now_ms: i64) -> Result<()> {
        // A cron schedule's ticks are whole seconds apart at the least: under a floor
        // of a second or less (the default is 100 ms) there is nothing to sample.
        // Sampling a yearly expression's ticks costs about 1.4 ms, which had capped
        // job creation near 700 a second.
        if matches!(spec.schedule, crate::model::Schedule::Cron { .. })
            && self.min_period_ms <= 1_000
        {
            return Ok(());
        }
        let Some(gap) = crate::schedule::min_gap_ms(spec, now_ms, GAP_SAMPLES)? else {
            return Ok(());
        };
        if gap >= self.min_period_ms {
            return Ok(());
        }
        let field = match spec.schedule {
            crate::model::Schedule::FixedRate { .. } => "schedule.every_ms",
            crate::model::Schedule::FixedDelay { .. } => "schedule.delay_ms",
            _ => "schedule.expr",
        };
        Err(CoordError::invalid(
            field,
            format!(
                "fires every {gap} ms at times, more often than this cluster's floor of {} ms \
                 (coordinator.min_period_ms)",
                self.min_period_ms
            ),
        ))
    }

    /// The underlying source (the engine watches it).
    pub fn source(&self) -> Arc<dyn ConfigSource> {
        self.kv.clone()
    }

    /// Every job, and the revision read at.
    pub async fn list(&self) -> Result<JobsAt> {
        // Decoded as the pages come: the definitions' JSON is never all in memory.
        let mut jobs = Vec::new();
        let revision = self
            .kv
            .load_each(&mut |k: &str, v: &str, rev: i64| {
                if let Some(job) = Self::job_at(k, v, rev) {
                    jobs.push(job);
                }
            })
            .await?;
        Ok((jobs, revision))
    }

    /// The readable jobs of a snapshot of the deployment's prefix (an unreadable one
    /// is logged and skipped). Consumed: each entry's JSON is freed once decoded, so
    /// 100,000 jobs are never held twice over.
    pub fn jobs_in(snap: Snapshot) -> Vec<StoredJob> {
        snap.entries
            .into_iter()
            .filter_map(|(k, v, rev)| Self::job_at(&k, &v, rev))
            .collect()
    }

    /// What a watched change under the prefix does to the jobs; `None` for a key
    /// that is not a job's.
    pub fn job_change(change: chime_shared::config::source::Change) -> Option<JobChange> {
        use chime_shared::config::source::Change;
        match change {
            Change::Put {
                key,
                value,
                revision,
            } => {
                let name = key.strip_prefix("jobs/")?.to_owned();
                let job = Self::decode(&value, revision).map(Box::new);
                Some(JobChange::Put(name, job))
            }
            Change::Delete { key, .. } => {
                Some(JobChange::Deleted(key.strip_prefix("jobs/")?.to_owned()))
            }
        }
    }

    /// The job an entry of the prefix holds: `None` for another kind of key, and for
    /// an unreadable job (logged).
    fn job_at(key: &str, value: &str, revision: i64) -> Option<StoredJob> {
        let name = key.strip_prefix("jobs/")?;
        match Self::decode(value, revision) {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::warn!(job = name, error = %e, "skipping an unreadable job");
                None
            }
        }
    }

    /// One job.
    pub async fn get(&self, name: &str) -> Result<StoredJob> {
        let (v, rev) = self
            .kv
            .get(&key(name))
            .await?
            .ok_or_else(|| CoordError::NotFound(format!("job {name:?}")))?;
        Self::decode(&v, rev)
    }

    /// A workflow's nodes that name stored jobs: each must exist (stored, or in
    /// `batch`, the jobs created with it) and not be a workflow itself (workflows
    /// do not nest: a cycle through two of them would never end). Errors name the
    /// node's field.
    async fn check_node_jobs(&self, spec: &JobSpec, batch: &[JobSpec]) -> Result<()> {
        let Some(wf) = &spec.workflow else {
            return Ok(());
        };
        for (i, n) in wf
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.job.is_empty())
        {
            let field = format!("workflow.nodes[{i}].job");
            let found = match batch.iter().find(|b| b.name == n.job) {
                Some(b) => Some(b.clone()),
                None => match self.get(&n.job).await {
                    Ok(j) => Some(j.spec),
                    Err(CoordError::NotFound(_)) => None,
                    Err(e) => return Err(e),
                },
            };
            match found {
                None => {
                    return Err(CoordError::invalid(
                        field,
                        format!("no job is named {:?}", n.job),
                    ));
                }
                Some(j) if j.workflow.is_some() => {
                    return Err(CoordError::invalid(
                        field,
                        format!("{:?} is a workflow; workflows do not nest", n.job),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Stores a new job (its `created_at_ms` is set to `now_ms`).
    pub async fn create(&self, mut spec: JobSpec, now_ms: i64) -> Result<StoredJob> {
        spec.validate()?;
        self.check_node_jobs(&spec, &[]).await?;
        self.check_floor(&spec, now_ms)?;
        spec.created_at_ms = now_ms;
        let text =
            serde_json::to_string(&spec).map_err(|e| CoordError::Unavailable(e.to_string()))?;
        match self
            .kv
            .put_if(&key(&spec.name), &text, Expect::Absent)
            .await?
        {
            Some(version) => Ok(StoredJob { spec, version }),
            None => Err(CoordError::AlreadyExists(spec.name)),
        }
    }

    /// Stores new jobs in one transaction: all of them, or (a bad definition, a name
    /// given twice or already taken) none. At most [`MAX_JOBS_PER_BATCH`]; an
    /// invalid field is named with the job's index (`jobs[3].schedule.expr`).
    pub async fn create_all(&self, mut specs: Vec<JobSpec>, now_ms: i64) -> Result<Vec<StoredJob>> {
        if specs.is_empty() || specs.len() > MAX_JOBS_PER_BATCH {
            return Err(CoordError::invalid(
                "jobs",
                format!(
                    "{} given; a batch holds 1 to {MAX_JOBS_PER_BATCH}",
                    specs.len()
                ),
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut writes = Vec::with_capacity(specs.len());
        // Schedules that met the floor: the check depends on the schedule and `now_ms`
        // only, and walks 512 ticks of a cron expression (about 1 ms), so jobs of a
        // batch sharing a schedule are checked once.
        let mut floor_met: Vec<crate::model::Schedule> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            spec.validate().map_err(|e| e.at("jobs", i))?;
            self.check_node_jobs(spec, &specs)
                .await
                .map_err(|e| e.at("jobs", i))?;
        }
        for (i, spec) in specs.iter_mut().enumerate() {
            if !floor_met.contains(&spec.schedule) {
                self.check_floor(spec, now_ms)
                    .map_err(|e| e.at("jobs", i))?;
                floor_met.push(spec.schedule.clone());
            }
            if !names.insert(spec.name.clone()) {
                return Err(CoordError::invalid(
                    format!("jobs[{i}].name"),
                    format!("{:?} is given twice", spec.name),
                ));
            }
            spec.created_at_ms = now_ms;
            let text =
                serde_json::to_string(&spec).map_err(|e| CoordError::Unavailable(e.to_string()))?;
            writes.push((key(&spec.name), text, Expect::Absent));
        }
        if let Some(version) = self.kv.put_if_all(&writes).await? {
            return Ok(specs
                .into_iter()
                .map(|spec| StoredJob { spec, version })
                .collect());
        }
        // Some name is taken: say which (one read per job, on this failure only).
        for spec in &specs {
            if self.kv.get(&key(&spec.name)).await?.is_some() {
                return Err(CoordError::AlreadyExists(spec.name.clone()));
            }
        }
        Err(CoordError::Conflict(
            "a job of the batch was created meanwhile and deleted again".into(),
        ))
    }

    /// Replaces a job if `version` is still its current one.
    pub async fn update(&self, mut spec: JobSpec, version: i64) -> Result<StoredJob> {
        spec.validate()?;
        self.check_node_jobs(&spec, &[]).await?;
        let current = self.get(&spec.name).await?;
        // Only a changed schedule meets the floor: a job stored under a lower floor
        // can still be paused, resumed and edited otherwise.
        if spec.schedule != current.spec.schedule {
            self.check_floor(&spec, current.spec.created_at_ms.max(0))?;
        }
        spec.created_at_ms = current.spec.created_at_ms;
        let text =
            serde_json::to_string(&spec).map_err(|e| CoordError::Unavailable(e.to_string()))?;
        match self
            .kv
            .put_if(&key(&spec.name), &text, Expect::Revision(version))
            .await?
        {
            Some(version) => Ok(StoredJob { spec, version }),
            None => Err(CoordError::Conflict(format!(
                "job {:?} changed since version {version} (now {})",
                spec.name, current.version
            ))),
        }
    }

    /// Read-modify-write of one job, retried on conflicts (pause, resume).
    pub async fn modify(&self, name: &str, f: impl Fn(&mut JobSpec)) -> Result<StoredJob> {
        for _ in 0..5 {
            let mut j = self.get(name).await?;
            f(&mut j.spec);
            match self.update(j.spec, j.version).await {
                Err(CoordError::Conflict(_)) => continue,
                other => return other,
            }
        }
        Err(CoordError::Conflict(format!("job {name:?} keeps changing")))
    }

    /// Deletes a job.
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.get(name).await?;
        self.kv.delete(&key(name)).await?;
        Ok(())
    }
}

/// What a fire record answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireAnswer {
    /// Recorded: go ahead.
    Recorded,
    /// This fire id was recorded before (a duplicate): do not fire.
    Duplicate,
    /// The caller's fencing token is stale (a deposed leader): do not fire.
    Fenced,
}

/// What installing a new leader's fencing token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceInstall {
    /// A newer token is installed: this leader is stale.
    Refused,
    /// Installed; the previous leader left no note (it crashed, lost its lease or
    /// there was none): what it sent is known only from the workers, so its runs
    /// wait out the adoption grace.
    Installed,
    /// Installed over a leader that handed over: its runs are saved exactly as
    /// they stand, and these (recorded ahead of their instant) were never sent.
    HandedOver {
        /// Run ids recorded ahead and never sent.
        unsent: Vec<String>,
    },
}

impl FenceInstall {
    /// Whether the token was installed.
    pub fn installed(&self) -> bool {
        *self != Self::Refused
    }

    /// The hand-over the previous leader left (`None`: none).
    pub fn hand_over(self) -> Option<Vec<String>> {
        match self {
            Self::HandedOver { unsent } => Some(unsent),
            _ => None,
        }
    }
}

/// One fire to record: its id, job, scheduled instant, and the run it starts (with
/// the workers its shards go to), saved in the same step so that a new leader finds
/// the run if this one dies right after.
#[derive(Debug, Clone)]
pub struct FireRecord {
    /// `<job>@<instant>` or a manual fire's id.
    pub fire_id: String,
    /// Job.
    pub job: String,
    /// Scheduled instant.
    pub at: i64,
    /// The run as planned.
    pub run: RunRecord,
}

/// Run history, fire records and trigger state.
#[async_trait]
pub trait RunStore: Send + Sync + std::fmt::Debug {
    /// Records fires atomically with the fencing token: each answer says whether
    /// that fire may go ahead. A recorded fire also saves its planned run and
    /// advances its job's last fired instant.
    async fn record_fires(&self, fence: i64, fires: &[FireRecord]) -> Result<Vec<FireAnswer>>;
    /// Runs not finished yet (a new leader adopts them).
    async fn active_runs(&self) -> Result<Vec<RunRecord>>;
    /// Installs a new leader's fencing token (only if not older than the stored
    /// one), taking the previous leader's hand-over note if it left one.
    async fn install_fence(&self, fence: i64) -> Result<FenceInstall>;
    /// A leader that stopped, with every run it had saved, leaves a note for its
    /// successor (only while `fence` is the newest token): the runs it left are
    /// saved exactly as they stand, and `unsent` were recorded ahead of their
    /// instant and never sent. Answers whether the note was left.
    async fn hand_over(&self, fence: i64, unsent: &[String]) -> Result<bool>;
    /// Whether `fence` is still the newest leader's token (checked before fires
    /// recorded ahead of their instant go out).
    async fn fence_holds(&self, fence: i64) -> Result<bool>;
    /// Last fired instant per job.
    async fn trigger_state(&self) -> Result<HashMap<String, i64>>;
    /// Saves (creates or replaces) a run.
    async fn save_run(&self, run: &RunRecord) -> Result<()>;
    /// Saves runs as `save_run` would, in order; a store may write them in one
    /// request (the history writer's batches). After an error, any of them may be
    /// unsaved: the caller writes them all again.
    async fn save_runs(&self, runs: &[&RunRecord]) -> Result<()> {
        for run in runs {
            self.save_run(run).await?;
        }
        Ok(())
    }
    /// One run.
    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>>;
    /// Runs of `job` (all jobs when empty), newest first.
    async fn list_runs(&self, job: &str, limit: usize) -> Result<Vec<RunRecord>>;
    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<()> {
        Ok(())
    }
    /// Appends to the audit log in one write (the store gives each entry its id),
    /// dropping what is past the retention.
    async fn append_audit(&self, entries: &[AuditEntry]) -> Result<()>;
    /// Audit entries, newest first: at most `limit`, older than the entry `before`
    /// when given.
    async fn list_audit(&self, limit: usize, before: Option<&str>) -> Result<Vec<AuditEntry>>;
    /// Runs that ended badly ([`RunEvent::of`], appended by `save_run` with the
    /// final save), oldest first: at most `limit` after the event `after` (empty:
    /// from the oldest kept).
    async fn run_events(&self, after: &str, limit: usize) -> Result<Vec<RunEvent>>;
    /// The newest run event's id (empty: none yet): where an evaluator with no
    /// saved state starts, so it does not alert on history.
    async fn latest_run_event(&self) -> Result<String>;
    /// The alert evaluator's saved state (JSON), if any.
    async fn load_alert_state(&self) -> Result<Option<String>>;
    /// Saves the alert evaluator's state, only while `fence` is the newest leader's
    /// token; answers whether it was saved (false: a newer leader took over).
    async fn save_alert_state(&self, fence: i64, json: &str) -> Result<bool>;
}

/// Run events kept (about): far more than an evaluator falls behind by.
const RUN_EVENTS_KEPT: usize = 10_000;

/// Fires recorded per script call (each call holds Redis for about 2 ms).
const FIRES_CHUNK: usize = 100;

/// Runs saved per script call: big enough that the call's own cost is small per
/// run, small enough that one call holds Redis for about a millisecond.
const SAVE_CHUNK: usize = 100;

/// Whether `id` is an audit entry id (`<ms>-<seq>`), the only thing a listing may
/// page back from.
pub fn is_audit_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        [ms, seq]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// How much history to keep.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Runs kept per job.
    pub per_job: usize,
    /// Runs older than this expire, seconds.
    pub max_age_s: u64,
    /// Audit entries kept (about: Redis trims whole stream nodes).
    pub audit_entries: usize,
    /// Audit entries older than this are dropped, seconds.
    pub audit_max_age_s: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            per_job: 200,
            max_age_s: 7 * 86_400,
            audit_entries: 100_000,
            audit_max_age_s: 90 * 86_400,
        }
    }
}

/// Fires are remembered this long (a fire id older than this could fire again only
/// if its tick came round again, which it cannot).
const FIRE_MEMORY_S: u64 = 3 * 86_400;

// The scripts declare their keys in their headers; no script builds a key name
// (the architecture test checks both).
static FIRES: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/fires.lua")));
static FENCE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/fence.lua")));
static HANDOVER: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/handover.lua")));
static SAVE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/save_runs.lua")));
static SAVE_ALERTS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/save_alerts.lua")));

/// Runs and fires in Redis. All keys share the hash tag `{<prefix>:sched}`.
#[derive(Debug, Clone)]
pub struct RedisRunStore {
    conn: RedisConn,
    tag: String,
    retention: Retention,
}

impl RedisRunStore {
    /// A store under `prefix`.
    pub fn new(conn: RedisConn, prefix: &str, retention: Retention) -> Self {
        Self {
            conn,
            tag: format!("{{{prefix}:sched}}"),
            retention,
        }
    }
}

#[async_trait]
impl RunStore for RedisRunStore {
    async fn record_fires(&self, fence: i64, fires: &[FireRecord]) -> Result<Vec<FireAnswer>> {
        let mut calls = Vec::new();
        for chunk in fires.chunks(FIRES_CHUNK) {
            let mut inv = FIRES.prepare_invoke();
            inv.key(format!("{}:fence", self.tag))
                .key(format!("{}:last", self.tag))
                .key(format!("{}:runs", self.tag))
                .key(format!("{}:active", self.tag))
                .arg(fence)
                .arg(FIRE_MEMORY_S)
                .arg(self.retention.max_age_s);
            for f in chunk {
                let json = serde_json::to_string(&f.run)
                    .map_err(|e| CoordError::Unavailable(e.to_string()))?;
                let run_key = format!("{}:run:{}", self.tag, f.run.run_id);
                // A tick's run id is its fire id: its run's key remembers it
                // (fires.lua says why that is enough).
                let own = f.run.run_id == f.fire_id;
                let memory = if own {
                    run_key.clone()
                } else {
                    format!("{}:fired:{}", self.tag, f.fire_id)
                };
                inv.key(memory)
                    .key(run_key)
                    .key(format!("{}:runs:{}", self.tag, f.job))
                    .arg(&f.job)
                    .arg(f.at)
                    .arg(&f.run.run_id)
                    .arg(f.run.fired_at_ms)
                    .arg(json)
                    .arg(if f.run.state.is_final() { "1" } else { "0" })
                    .arg(if own { "1" } else { "0" });
            }
            calls.push((chunk.len(), inv));
        }
        // Every chunk is sent at once over the one connection: Redis runs them
        // back to back instead of idling a round trip between two. Each chunk is
        // atomic on its own; an error fails the whole call, as a sequential loop's
        // would (the caller treats every fire of it as unrecorded).
        let answers = futures_util::future::try_join_all(calls.iter().map(|(_, inv)| {
            let mut conn = self.conn.clone();
            async move { inv.invoke_async::<Vec<i64>>(&mut conn).await }
        }))
        .await?;
        let mut out = Vec::with_capacity(fires.len());
        for ((n, _), answers) in calls.iter().zip(answers) {
            if answers == [-1] {
                out.extend(std::iter::repeat_n(FireAnswer::Fenced, *n));
                continue;
            }
            out.extend(answers.into_iter().map(|a| {
                if a == 1 {
                    FireAnswer::Recorded
                } else {
                    FireAnswer::Duplicate
                }
            }));
        }
        Ok(out)
    }

    async fn active_runs(&self) -> Result<Vec<RunRecord>> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{}:active", self.tag))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            let keys: Vec<String> = chunk
                .iter()
                .map(|i| format!("{}:run:{i}", self.tag))
                .collect();
            let vals: Vec<Option<String>> =
                redis::cmd("MGET").arg(keys).query_async(&mut conn).await?;
            out.extend(
                vals.into_iter()
                    .flatten()
                    .filter_map(|t| serde_json::from_str::<RunRecord>(&t).ok()),
            );
        }
        out.retain(|r| !r.state.is_final());
        Ok(out)
    }

    async fn install_fence(&self, fence: i64) -> Result<FenceInstall> {
        let mut conn = self.conn.clone();
        let (ok, unsent): (i64, Option<String>) = FENCE
            .key(format!("{}:fence", self.tag))
            .key(format!("{}:handover", self.tag))
            .arg(fence)
            .invoke_async(&mut conn)
            .await?;
        Ok(match (ok, unsent) {
            (1, Some(json)) => match serde_json::from_str(&json) {
                Ok(unsent) => FenceInstall::HandedOver { unsent },
                // Unreadable: as if no note was left (the grace is the safe side).
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable hand-over note; adopting with the grace");
                    FenceInstall::Installed
                }
            },
            (1, None) => FenceInstall::Installed,
            _ => FenceInstall::Refused,
        })
    }

    async fn hand_over(&self, fence: i64, unsent: &[String]) -> Result<bool> {
        let json =
            serde_json::to_string(unsent).map_err(|e| CoordError::Unavailable(e.to_string()))?;
        let mut conn = self.conn.clone();
        let ok: i64 = HANDOVER
            .key(format!("{}:fence", self.tag))
            .key(format!("{}:handover", self.tag))
            .arg(fence)
            .arg(json)
            .invoke_async(&mut conn)
            .await?;
        Ok(ok == 1)
    }

    async fn fence_holds(&self, fence: i64) -> Result<bool> {
        let mut conn = self.conn.clone();
        let cur: Option<i64> = redis::cmd("GET")
            .arg(format!("{}:fence", self.tag))
            .query_async(&mut conn)
            .await?;
        Ok(fence >= cur.unwrap_or(0))
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        // A read of the fence key: it lives on the node that holds every
        // scheduling key, which is the node that must answer.
        let _: Option<i64> = redis::cmd("GET")
            .arg(format!("{}:fence", self.tag))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn trigger_state(&self) -> Result<HashMap<String, i64>> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HGETALL")
            .arg(format!("{}:last", self.tag))
            .query_async(&mut conn)
            .await?)
    }

    async fn save_run(&self, run: &RunRecord) -> Result<()> {
        self.save_runs(&[run]).await
    }

    async fn save_runs(&self, runs: &[&RunRecord]) -> Result<()> {
        let mut conn = self.conn.clone();
        for chunk in runs.chunks(SAVE_CHUNK) {
            let mut inv = SAVE.prepare_invoke();
            inv.key(format!("{}:runs", self.tag))
                .key(format!("{}:active", self.tag))
                .key(format!("{}:events", self.tag))
                .arg(self.retention.max_age_s)
                .arg(self.retention.per_job)
                .arg(RUN_EVENTS_KEPT);
            for run in chunk {
                let json = serde_json::to_string(run)
                    .map_err(|e| CoordError::Unavailable(e.to_string()))?;
                inv.key(format!("{}:run:{}", self.tag, run.run_id))
                    .key(format!("{}:runs:{}", self.tag, run.job))
                    .arg(&run.run_id)
                    .arg(json)
                    .arg(run.fired_at_ms)
                    .arg(if run.state.is_final() { "1" } else { "0" })
                    .arg(event_json(run)?);
            }
            let trimmed: Vec<String> = inv.invoke_async(&mut conn).await?;
            if !trimmed.is_empty() {
                // Outside the script, which never builds a key name; a key this
                // misses expires with its TTL.
                let keys: Vec<String> = trimmed
                    .iter()
                    .map(|id| format!("{}:run:{id}", self.tag))
                    .collect();
                let _: i64 = redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
            }
        }
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        let mut conn = self.conn.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg(format!("{}:run:{run_id}", self.tag))
            .query_async(&mut conn)
            .await?;
        v.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| CoordError::Unavailable(format!("stored run: {e}")))
        })
        .transpose()
    }

    async fn list_runs(&self, job: &str, limit: usize) -> Result<Vec<RunRecord>> {
        let index = if job.is_empty() {
            format!("{}:runs", self.tag)
        } else {
            format!("{}:runs:{job}", self.tag)
        };
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(index)
            .arg(0)
            .arg(limit.max(1) as i64 - 1)
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|i| format!("{}:run:{i}", self.tag))
            .collect();
        let vals: Vec<Option<String>> = redis::cmd("MGET").arg(keys).query_async(&mut conn).await?;
        Ok(vals
            .into_iter()
            .flatten()
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect())
    }

    async fn append_audit(&self, entries: &[AuditEntry]) -> Result<()> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let key = format!("{}:audit", self.tag);
        // A stream: ids are Redis time, increasing across coordinators; both trims
        // are approximate (whole nodes), so they cost next to nothing per entry.
        let max_age_ms =
            i64::try_from(self.retention.audit_max_age_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        for e in entries {
            let json =
                serde_json::to_string(e).map_err(|e| CoordError::Unavailable(e.to_string()))?;
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.retention.audit_entries)
                .arg("*")
                .arg("e")
                .arg(json)
                .ignore();
        }
        pipe.cmd("XTRIM")
            .arg(&key)
            .arg("MINID")
            .arg("~")
            .arg(last.at_ms.saturating_sub(max_age_ms).max(0))
            .ignore();
        let mut conn = self.conn.clone();
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    async fn list_audit(&self, limit: usize, before: Option<&str>) -> Result<Vec<AuditEntry>> {
        let start = match before {
            Some(id) if is_audit_id(id) => format!("({id}"),
            Some(_) => return Err(CoordError::invalid("before", "not an audit entry id")),
            None => "+".to_owned(),
        };
        let mut conn = self.conn.clone();
        let rows: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
            .arg(format!("{}:audit", self.tag))
            .arg(start)
            .arg("-")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut conn)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, fields)| {
                let mut e: AuditEntry = serde_json::from_str(fields.get("e")?).ok()?;
                e.id = id;
                Some(e)
            })
            .collect())
    }

    async fn run_events(&self, after: &str, limit: usize) -> Result<Vec<RunEvent>> {
        let start = if after.is_empty() {
            "-".to_owned()
        } else {
            format!("({after}")
        };
        let mut conn = self.conn.clone();
        let rows: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(format!("{}:events", self.tag))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut conn)
            .await?;
        Ok(decode_events(rows))
    }

    async fn latest_run_event(&self) -> Result<String> {
        let mut conn = self.conn.clone();
        let rows: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
            .arg(format!("{}:events", self.tag))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(id, _)| id)
            .unwrap_or_default())
    }

    async fn load_alert_state(&self) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("GET")
            .arg(format!("{}:alerts", self.tag))
            .query_async(&mut conn)
            .await?)
    }

    async fn save_alert_state(&self, fence: i64, json: &str) -> Result<bool> {
        let mut conn = self.conn.clone();
        let saved: i64 = SAVE_ALERTS
            .key(format!("{}:fence", self.tag))
            .key(format!("{}:alerts", self.tag))
            .arg(fence)
            .arg(json)
            .invoke_async(&mut conn)
            .await?;
        Ok(saved == 1)
    }
}

#[derive(Debug, Default)]
struct MemRuns {
    fence: i64,
    /// The note of the leader that handed over: its token, its unsent runs.
    handover: Option<(i64, Vec<String>)>,
    fired: HashMap<String, ()>,
    last: HashMap<String, i64>,
    runs: HashMap<String, RunRecord>,
    by_job: BTreeMap<String, VecDeque<String>>,
    all: VecDeque<String>,
    /// Oldest first.
    audit: VecDeque<AuditEntry>,
    /// Run events, oldest first, and the last id given.
    events: VecDeque<RunEvent>,
    event_seq: u64,
    alerts: Option<String>,
    /// The last audit id given: (ms, seq), so ids increase like a stream's.
    audit_last: (i64, u64),
}

/// Runs and fires in memory (`chime dev`, tests).
#[derive(Debug, Clone, Default)]
pub struct MemoryRunStore {
    state: Arc<Mutex<MemRuns>>,
    retention: Retention,
}

impl MemoryRunStore {
    /// A store keeping `retention`.
    pub fn new(retention: Retention) -> Self {
        Self {
            state: Arc::default(),
            retention,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemRuns> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl RunStore for MemoryRunStore {
    async fn record_fires(&self, fence: i64, fires: &[FireRecord]) -> Result<Vec<FireAnswer>> {
        let mut out = Vec::with_capacity(fires.len());
        {
            let mut st = self.lock();
            if fence < st.fence {
                return Ok(vec![FireAnswer::Fenced; fires.len()]);
            }
            for f in fires {
                if st.fired.insert(f.fire_id.clone(), ()).is_some() {
                    out.push(FireAnswer::Duplicate);
                    continue;
                }
                let last = st.last.entry(f.job.clone()).or_insert(0);
                *last = (*last).max(f.at);
                out.push(FireAnswer::Recorded);
            }
        }
        for (f, a) in fires.iter().zip(&out) {
            if *a == FireAnswer::Recorded {
                self.save_run(&f.run).await?;
            }
        }
        Ok(out)
    }

    async fn active_runs(&self) -> Result<Vec<RunRecord>> {
        Ok(self
            .lock()
            .runs
            .values()
            .filter(|r| !r.state.is_final())
            .cloned()
            .collect())
    }

    async fn install_fence(&self, fence: i64) -> Result<FenceInstall> {
        let mut st = self.lock();
        if fence < st.fence {
            return Ok(FenceInstall::Refused);
        }
        let note = st.handover.take();
        let previous = std::mem::replace(&mut st.fence, fence);
        Ok(match note {
            Some((from, unsent)) if from == previous => FenceInstall::HandedOver { unsent },
            _ => FenceInstall::Installed,
        })
    }

    async fn hand_over(&self, fence: i64, unsent: &[String]) -> Result<bool> {
        let mut st = self.lock();
        if st.fence != fence {
            return Ok(false);
        }
        st.handover = Some((fence, unsent.to_vec()));
        Ok(true)
    }

    async fn fence_holds(&self, fence: i64) -> Result<bool> {
        Ok(fence >= self.lock().fence)
    }

    async fn trigger_state(&self) -> Result<HashMap<String, i64>> {
        Ok(self.lock().last.clone())
    }

    async fn save_run(&self, run: &RunRecord) -> Result<()> {
        let mut st = self.lock();
        if run.state.is_final()
            && let Some(mut e) = RunEvent::of(run)
        {
            // Ids like a stream's (`<ms>-<seq>`), the sequence alone ordering them.
            st.event_seq += 1;
            e.id = format!("{}-{}", e.at_ms.max(0), st.event_seq);
            st.events.push_back(e);
            if st.events.len() > RUN_EVENTS_KEPT {
                st.events.pop_front();
            }
        }
        if st.runs.insert(run.run_id.clone(), run.clone()).is_none() {
            let keep = self.retention.per_job;
            let ids = st.by_job.entry(run.job.clone()).or_default();
            ids.push_back(run.run_id.clone());
            let mut dropped = Vec::new();
            while ids.len() > keep {
                dropped.extend(ids.pop_front());
            }
            st.all.push_back(run.run_id.clone());
            for d in dropped {
                st.runs.remove(&d);
                st.all.retain(|x| *x != d);
            }
        }
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        Ok(self.lock().runs.get(run_id).cloned())
    }

    async fn list_runs(&self, job: &str, limit: usize) -> Result<Vec<RunRecord>> {
        let st = self.lock();
        let ids: Vec<&String> = if job.is_empty() {
            st.all.iter().rev().take(limit).collect()
        } else {
            st.by_job
                .get(job)
                .map(|v| v.iter().rev().take(limit).collect())
                .unwrap_or_default()
        };
        Ok(ids
            .into_iter()
            .filter_map(|i| st.runs.get(i).cloned())
            .collect())
    }

    async fn append_audit(&self, entries: &[AuditEntry]) -> Result<()> {
        let mut st = self.lock();
        let max_age_ms =
            i64::try_from(self.retention.audit_max_age_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        for entry in entries {
            let (ms, seq) = st.audit_last;
            st.audit_last = if entry.at_ms > ms {
                (entry.at_ms, 0)
            } else {
                (ms, seq + 1)
            };
            let mut e = entry.clone();
            e.id = format!("{}-{}", st.audit_last.0, st.audit_last.1);
            st.audit.push_back(e);
            let oldest = entry.at_ms.saturating_sub(max_age_ms);
            while st.audit.len() > self.retention.audit_entries
                || st.audit.front().is_some_and(|e| e.at_ms < oldest)
            {
                st.audit.pop_front();
            }
        }
        Ok(())
    }

    async fn list_audit(&self, limit: usize, before: Option<&str>) -> Result<Vec<AuditEntry>> {
        let key = |id: &str| -> Option<(i64, u64)> {
            let (ms, seq) = id.split_once('-')?;
            Some((ms.parse().ok()?, seq.parse().ok()?))
        };
        let before = match before {
            Some(id) if is_audit_id(id) => key(id),
            Some(_) => return Err(CoordError::invalid("before", "not an audit entry id")),
            None => None,
        };
        let st = self.lock();
        Ok(st
            .audit
            .iter()
            .rev()
            .filter(|e| before.is_none_or(|b| key(&e.id).is_some_and(|k| k < b)))
            .take(limit.max(1))
            .cloned()
            .collect())
    }

    async fn run_events(&self, after: &str, limit: usize) -> Result<Vec<RunEvent>> {
        let after: u64 = after
            .split('-')
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let st = self.lock();
        Ok(st
            .events
            .iter()
            .filter(|e| e.id.split('-').nth(1).and_then(|n| n.parse::<u64>().ok()) > Some(after))
            .take(limit.max(1))
            .cloned()
            .collect())
    }

    async fn latest_run_event(&self) -> Result<String> {
        Ok(self
            .lock()
            .events
            .back()
            .map(|e| e.id.clone())
            .unwrap_or_default())
    }

    async fn load_alert_state(&self) -> Result<Option<String>> {
        Ok(self.lock().alerts.clone())
    }

    async fn save_alert_state(&self, fence: i64, json: &str) -> Result<bool> {
        let mut st = self.lock();
        if st.fence != fence {
            return Ok(false);
        }
        st.alerts = Some(json.to_owned());
        Ok(true)
    }
}

/// The event `save_run` appends with a run's final save (empty: none).
fn event_json(run: &RunRecord) -> Result<String> {
    match RunEvent::of(run).filter(|_| run.state.is_final()) {
        None => Ok(String::new()),
        Some(e) => serde_json::to_string(&e).map_err(|e| CoordError::Unavailable(e.to_string())),
    }
}

fn decode_events(rows: Vec<(String, HashMap<String, String>)>) -> Vec<RunEvent> {
    rows.into_iter()
        .filter_map(|(id, fields)| {
            let mut e: RunEvent = serde_json::from_str(fields.get("e")?).ok()?;
            e.id = id;
            Some(e)
        })
        .collect()
}
