//! The admin service in domain terms: jobs, runs and workers. The leader answers
//! from its engine and stores; a follower forwards every call to the leader (reads
//! too, so they show the leader's trigger state), and answers reads itself only
//! while no leader is known.
//!
//! Both edges wrap this one service: the gRPC admin service (`grpc/`) and the JSON
//! API (`http.rs`) each turn their own wire format into an [`AdminCall`] and the
//! [`AdminAnswer`] back. So leader forwarding happens here, once, and JSON never
//! passes through protobuf. Reaching the leader is the one thing this module cannot
//! do without a wire: it asks a [`Forwarder`] (the gRPC client in `grpc/`).

use std::sync::Arc;

use async_trait::async_trait;
use chime_shared::auth::{Access, Tokens};
use chime_shared::clock::Clock;
use chime_shared::limits::{self, namespace_of};

use crate::Shared;
use crate::audit::{Audit, Change};
use crate::engine::{EngineHandle, TriggerState};
use crate::error::{CoordError, Result};
use crate::model::{AuditAction, AuditEntry, JobSpec, RunRecord, WorkerView};
use crate::store::{JobStore, RunStore, StoredJob};

/// Most runs one listing answers; 0 asks for the default.
pub const MAX_RUNS_LISTED: u32 = 1_000;
const DEFAULT_RUNS_LISTED: u32 = 50;

/// A job as clients show it (CLI, console API): the definition, its store
/// version and its trigger state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobView {
    /// The definition.
    #[serde(flatten)]
    pub spec: JobSpec,
    /// Store version (send it back to update).
    pub version: i64,
    /// Next fire, Unix ms (none when not scheduled or unknown).
    pub next_fire_ms: Option<i64>,
    /// Last scheduled instant fired, Unix ms.
    pub last_fire_ms: Option<i64>,
}

impl JobView {
    /// A stored job with its trigger state.
    pub fn new(j: StoredJob, state: TriggerState) -> Self {
        Self {
            spec: j.spec,
            version: j.version,
            next_fire_ms: state.next_fire_ms,
            last_fire_ms: state.last_fire_ms,
        }
    }
}

/// Who is calling: the `authorization` value they presented. It goes along when the
/// call is forwarded, and the leader checks it again.
#[derive(Clone, Default)]
pub struct Caller {
    /// `Bearer <token>`, as presented.
    pub authorization: Option<String>,
    /// Another replica forwarded this call here. It is not forwarded again: views
    /// of who leads can be stale (a coordinator restarted on its old address finds
    /// itself in the leader key until the old lease expires), and a call forwarded
    /// on and on would go round in circles, a call in progress per hop.
    pub forwarded: bool,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        f.debug_struct("Caller")
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("forwarded", &self.forwarded)
            .finish()
    }
}

/// One admin call.
#[derive(Debug, Clone)]
pub enum AdminCall {
    /// Create a job (its version is ignored).
    CreateJob(JobSpec),
    /// Create jobs, all or none (their versions are ignored).
    CreateJobs(Vec<JobSpec>),
    /// Replace a job, if it is still at `version`.
    UpdateJob {
        /// The new definition.
        spec: JobSpec,
        /// The version it replaces.
        version: i64,
    },
    /// Delete a job.
    DeleteJob(String),
    /// One job.
    GetJob(String),
    /// Every job (of `group`, when not empty), by name.
    ListJobs {
        /// Group filter.
        group: String,
        /// Namespace filter (empty: every namespace the caller reaches).
        namespace: String,
    },
    /// Pause a job.
    PauseJob(String),
    /// Resume a job.
    ResumeJob(String),
    /// Fire a job now.
    TriggerJob {
        /// The job.
        name: String,
        /// Params for this run instead of the job's.
        params: Option<String>,
    },
    /// Recent runs (of `job`, when not empty), newest first.
    ListRuns {
        /// Job filter.
        job: String,
        /// Most runs (0: 50; at most 1,000).
        limit: u32,
        /// Namespace filter (empty: every namespace the caller reaches).
        namespace: String,
    },
    /// One run.
    GetRun(String),
    /// Kill a run.
    KillRun(String),
    /// Start a finished workflow run again from a node.
    RerunWorkflow {
        /// The workflow run.
        run_id: String,
        /// The node it starts from.
        node: String,
    },
    /// Connected workers (of `group`, when not empty).
    ListWorkers {
        /// Group filter.
        group: String,
        /// Namespace filter (of the workers' groups; empty: every namespace the
        /// caller reaches).
        namespace: String,
    },
    /// Audit entries, newest first.
    ListAudit {
        /// Most entries (0: 100; at most 1,000).
        limit: u32,
        /// Only entries older than this entry id (empty: from the newest).
        before: String,
    },
}

impl AdminCall {
    /// The namespace a listing asks for (empty: none asked, or not a listing).
    fn namespace(&self) -> &str {
        match self {
            AdminCall::ListJobs { namespace, .. }
            | AdminCall::ListRuns { namespace, .. }
            | AdminCall::ListWorkers { namespace, .. } => namespace,
            _ => "",
        }
    }
}

/// What an admin call answers.
#[derive(Debug, Clone)]
pub enum AdminAnswer {
    /// A job.
    Job(JobView),
    /// Jobs.
    Jobs(Vec<JobView>),
    /// Deleted.
    Deleted,
    /// A run.
    Run(RunRecord),
    /// Runs.
    Runs(Vec<RunRecord>),
    /// Workers, and who leads.
    Workers {
        /// The workers.
        workers: Vec<WorkerView>,
        /// The leader's address (empty while unknown).
        leader: String,
    },
    /// Audit entries.
    Audit(Vec<AuditEntry>),
}

/// The answer was not of the kind its call makes (a leader of another version).
fn mismatch(want: &str, got: &AdminAnswer) -> CoordError {
    CoordError::Unavailable(format!("the leader answered {got:?} where {want} was due"))
}

impl AdminAnswer {
    /// The job of a job call.
    pub fn into_job(self) -> Result<JobView> {
        match self {
            Self::Job(j) => Ok(j),
            other => Err(mismatch("a job", &other)),
        }
    }

    /// The jobs of a listing.
    pub fn into_jobs(self) -> Result<Vec<JobView>> {
        match self {
            Self::Jobs(j) => Ok(j),
            other => Err(mismatch("jobs", &other)),
        }
    }

    /// The run of a run call.
    pub fn into_run(self) -> Result<RunRecord> {
        match self {
            Self::Run(r) => Ok(r),
            other => Err(mismatch("a run", &other)),
        }
    }

    /// The runs of a listing.
    pub fn into_runs(self) -> Result<Vec<RunRecord>> {
        match self {
            Self::Runs(r) => Ok(r),
            other => Err(mismatch("runs", &other)),
        }
    }

    /// The workers and the leader of a listing.
    pub fn into_workers(self) -> Result<(Vec<WorkerView>, String)> {
        match self {
            Self::Workers { workers, leader } => Ok((workers, leader)),
            other => Err(mismatch("workers", &other)),
        }
    }

    /// The entries of an audit listing.
    pub fn into_audit(self) -> Result<Vec<AuditEntry>> {
        match self {
            Self::Audit(a) => Ok(a),
            other => Err(mismatch("audit entries", &other)),
        }
    }
}

/// Reaches the leader from a follower (implemented over gRPC in `grpc/`).
#[async_trait]
pub trait Forwarder: Send + Sync + std::fmt::Debug {
    /// Makes `call` on the leader at `leader` (`host:port`), as `caller`.
    async fn forward(&self, leader: &str, caller: &Caller, call: AdminCall) -> Result<AdminAnswer>;
}

/// The admin service (cheap to clone: every part is shared).
#[derive(Debug, Clone)]
pub struct Admin {
    shared: Arc<Shared>,
    jobs: JobStore,
    runs: Arc<dyn RunStore>,
    clock: Arc<dyn Clock>,
    forwarder: Arc<dyn Forwarder>,
    audit: Audit,
    /// The admin tokens, for the namespaces a caller's token is limited to
    /// (`None`: no tokens, nobody is limited).
    tokens: Option<Arc<Tokens>>,
}

/// The namespaces a caller may see and touch (`None`: every one). Calls naming a
/// job or run of another namespace answer not found, as if it did not exist (a
/// creation there is refused); listings leave the others out; the audit log,
/// cluster-wide, is refused. The edges refuse cluster-wide calls first; this is
/// where jobs, runs and workers are kept to their namespaces, on the replica the
/// call reaches and again on the leader a follower forwards it to.
#[derive(Debug, Clone, Default)]
struct Namespaces {
    only: Option<Vec<String>>,
    who: String,
}

impl Namespaces {
    /// Narrowed to namespace `asked` too (empty: as it is): a caller of other
    /// namespaces only asking for it sees nothing. The name is checked.
    fn narrowed(mut self, asked: &str) -> Result<Self> {
        if asked.is_empty() {
            return Ok(self);
        }
        limits::check_namespace("namespace", asked)?;
        self.only = Some(match self.only {
            Some(o) if !o.iter().any(|x| x == asked) => Vec::new(),
            _ => vec![asked.to_owned()],
        });
        Ok(self)
    }

    fn sees(&self, name: &str) -> bool {
        let ns = namespace_of(name);
        self.only.as_ref().is_none_or(|o| o.iter().any(|x| x == ns))
    }

    fn job(&self, name: &str) -> Result<()> {
        match self.sees(name) {
            true => Ok(()),
            false => Err(CoordError::NotFound(format!("job {name:?}"))),
        }
    }

    /// A run id starts with its job's name (`<job>@…`), namespace included.
    fn run(&self, id: &str) -> Result<()> {
        match self.sees(id) {
            true => Ok(()),
            false => Err(CoordError::NotFound(format!("run {id:?}"))),
        }
    }

    fn create(&self, spec: &JobSpec, field: &str) -> Result<()> {
        match self.sees(&spec.name) {
            true => Ok(()),
            false => Err(CoordError::PermissionDenied(format!(
                "{field}: token {} may create jobs in namespaces {} only, not {:?}",
                self.who,
                self.only.as_deref().unwrap_or_default().join(", "),
                namespace_of(&spec.name)
            ))),
        }
    }

    /// Refuses a call reaching outside the namespaces, before it is made.
    fn check(&self, call: &AdminCall) -> Result<()> {
        if self.only.is_none() {
            return Ok(());
        }
        match call {
            AdminCall::CreateJob(spec) => self.create(spec, "name"),
            AdminCall::CreateJobs(specs) => specs
                .iter()
                .enumerate()
                .try_for_each(|(i, s)| self.create(s, &format!("jobs[{i}].name"))),
            AdminCall::UpdateJob { spec, .. } => self.job(&spec.name),
            AdminCall::DeleteJob(name)
            | AdminCall::GetJob(name)
            | AdminCall::PauseJob(name)
            | AdminCall::ResumeJob(name)
            | AdminCall::TriggerJob { name, .. } => self.job(name),
            AdminCall::GetRun(id)
            | AdminCall::KillRun(id)
            | AdminCall::RerunWorkflow { run_id: id, .. } => self.run(id),
            // Filtered from the answer.
            AdminCall::ListJobs { .. }
            | AdminCall::ListRuns { .. }
            | AdminCall::ListWorkers { .. } => Ok(()),
            AdminCall::ListAudit { .. } => Err(CoordError::PermissionDenied(format!(
                "token {} is limited to namespaces; the audit log is cluster-wide",
                self.who
            ))),
        }
    }

    /// Leaves out of a listing what is outside the namespaces.
    fn filter(&self, answer: AdminAnswer) -> AdminAnswer {
        if self.only.is_none() {
            return answer;
        }
        match answer {
            AdminAnswer::Jobs(mut jobs) => {
                jobs.retain(|j| self.sees(&j.spec.name));
                AdminAnswer::Jobs(jobs)
            }
            AdminAnswer::Runs(mut runs) => {
                runs.retain(|r| self.sees(&r.job));
                AdminAnswer::Runs(runs)
            }
            AdminAnswer::Workers {
                mut workers,
                leader,
            } => {
                workers.retain(|w| self.sees(&w.group));
                AdminAnswer::Workers { workers, leader }
            }
            other => other,
        }
    }
}

impl Admin {
    /// This service, keeping callers whose admin token is limited to namespaces
    /// to them (`tokens`: the admin tokens).
    pub fn limited_by(mut self, tokens: Option<Arc<Tokens>>) -> Self {
        self.tokens = tokens;
        self
    }

    fn namespaces(&self, caller: &Caller) -> Namespaces {
        match Access::tokens(self.tokens.clone()).identify(caller.authorization.as_deref()) {
            Some(who) => Namespaces {
                only: who.namespaces,
                who: who.name,
            },
            None => Namespaces::default(),
        }
    }

    /// The service over these stores; `forwarder` reaches the leader; changes are
    /// recorded in `audit`.
    pub fn new(
        shared: Arc<Shared>,
        jobs: JobStore,
        runs: Arc<dyn RunStore>,
        clock: Arc<dyn Clock>,
        forwarder: Arc<dyn Forwarder>,
        audit: Audit,
    ) -> Self {
        Self {
            shared,
            jobs,
            runs,
            clock,
            forwarder,
            audit,
            tokens: None,
        }
    }

    /// The audit log changes made through this service are recorded in (the HTTP
    /// edge records settings and requeues there too).
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The job store (its source also holds the alert rules).
    pub fn jobs(&self) -> &JobStore {
        &self.jobs
    }

    /// The run store (it also holds the alert evaluator's state).
    pub fn runs(&self) -> &Arc<dyn RunStore> {
        &self.runs
    }

    /// The definition of `name` now, for an entry's "before" (`None`: not there).
    async fn before(&self, name: &str) -> Option<JobSpec> {
        self.jobs.get(name).await.ok().map(|j| j.spec)
    }

    /// Answers `call`: here on the leader (or while no leader is known), from the
    /// leader otherwise.
    pub async fn call(&self, caller: &Caller, mut call: AdminCall) -> Result<AdminAnswer> {
        let scope = self.namespaces(caller).narrowed(call.namespace())?;
        scope.check(&call)?;
        // A limited caller's latest runs (or those of the namespace asked for):
        // the latest of every namespace are read, then the ones in scope kept, so
        // others' do not crowd them out of the limit.
        let mut keep = None;
        if scope.only.is_some()
            && let AdminCall::ListRuns { job, limit, .. } = &mut call
            && job.is_empty()
        {
            keep = Some(match *limit {
                0 => DEFAULT_RUNS_LISTED,
                n => n.min(MAX_RUNS_LISTED),
            } as usize);
            *limit = MAX_RUNS_LISTED;
        }
        let c = self.shared.current();
        let answer = if c.engine.is_none() && !c.leader.is_empty() {
            if caller.forwarded {
                // Named the leader, but not leading (yet, or any more): say so.
                return Err(CoordError::NotLeader { leader: c.leader });
            }
            self.forwarder.forward(&c.leader, caller, call).await?
        } else {
            self.local(caller, call).await?
        };
        Ok(match (scope.filter(answer), keep) {
            (AdminAnswer::Runs(mut runs), Some(n)) => {
                runs.truncate(n);
                AdminAnswer::Runs(runs)
            }
            (answer, _) => answer,
        })
    }

    /// The engine, on the leader.
    fn engine(&self) -> Result<EngineHandle> {
        let c = self.shared.current();
        c.engine.ok_or(CoordError::NotLeader { leader: c.leader })
    }

    async fn view(&self, j: StoredJob) -> Result<JobView> {
        let state = match self.shared.current().engine {
            Some(e) => e.states().await?.remove(&j.spec.name).unwrap_or_default(),
            None => TriggerState::default(),
        };
        Ok(JobView::new(j, state))
    }

    /// Views of several jobs, asking the engine for trigger states once.
    async fn views(&self, jobs: Vec<StoredJob>) -> Result<Vec<JobView>> {
        let states = match self.shared.current().engine {
            Some(e) => e.states().await?,
            None => Default::default(),
        };
        Ok(jobs
            .into_iter()
            .map(|j| {
                let state = states.get(&j.spec.name).copied().unwrap_or_default();
                JobView::new(j, state)
            })
            .collect())
    }

    /// Tells the engine at once (the store watch would tell it a moment later).
    async fn changed(&self, j: &StoredJob) {
        if let Some(e) = self.shared.current().engine {
            let _ = e.job_put(j.clone()).await;
        }
    }

    /// A change of a job's definition, recorded once it is stored.
    async fn job_changed(
        &self,
        caller: &Caller,
        action: AuditAction,
        before: Option<JobSpec>,
        j: &StoredJob,
    ) {
        self.changed(j).await;
        let mut c = Change::new(action, &j.spec.name).after(&j.spec);
        c.before = before.and_then(|b| serde_json::to_value(b).ok());
        self.audit.record(caller, vec![c]).await;
    }

    async fn local(&self, caller: &Caller, call: AdminCall) -> Result<AdminAnswer> {
        Ok(match call {
            AdminCall::CreateJob(spec) => {
                let stored = self.jobs.create(spec, self.clock.now_ms()).await?;
                self.job_changed(caller, AuditAction::JobCreate, None, &stored)
                    .await;
                AdminAnswer::Job(self.view(stored).await?)
            }
            AdminCall::CreateJobs(specs) => {
                let stored = self.jobs.create_all(specs, self.clock.now_ms()).await?;
                for j in &stored {
                    self.changed(j).await;
                }
                let changes = stored
                    .iter()
                    .map(|j| Change::new(AuditAction::JobCreate, &j.spec.name).after(&j.spec))
                    .collect();
                self.audit.record(caller, changes).await;
                AdminAnswer::Jobs(self.views(stored).await?)
            }
            AdminCall::UpdateJob { spec, version } => {
                let before = self.before(&spec.name).await;
                let stored = self.jobs.update(spec, version).await?;
                self.job_changed(caller, AuditAction::JobUpdate, before, &stored)
                    .await;
                AdminAnswer::Job(self.view(stored).await?)
            }
            AdminCall::DeleteJob(name) => {
                let before = self.before(&name).await;
                self.jobs.delete(&name).await?;
                if let Some(e) = self.shared.current().engine {
                    let _ = e.job_deleted(&name).await;
                }
                let mut c = Change::new(AuditAction::JobDelete, &name);
                c.before = before.and_then(|b| serde_json::to_value(b).ok());
                self.audit.record(caller, vec![c]).await;
                AdminAnswer::Deleted
            }
            AdminCall::GetJob(name) => {
                AdminAnswer::Job(self.view(self.jobs.get(&name).await?).await?)
            }
            AdminCall::ListJobs { group, .. } => {
                let (mut all, _) = self.jobs.list().await?;
                all.retain(|j| group.is_empty() || j.spec.group == group);
                all.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
                AdminAnswer::Jobs(self.views(all).await?)
            }
            AdminCall::PauseJob(name) => {
                let before = self.before(&name).await;
                let j = self.jobs.modify(&name, |s| s.paused = true).await?;
                self.job_changed(caller, AuditAction::JobPause, before, &j)
                    .await;
                AdminAnswer::Job(self.view(j).await?)
            }
            AdminCall::ResumeJob(name) => {
                let before = self.before(&name).await;
                let j = self.jobs.modify(&name, |s| s.paused = false).await?;
                self.job_changed(caller, AuditAction::JobResume, before, &j)
                    .await;
                AdminAnswer::Job(self.view(j).await?)
            }
            AdminCall::TriggerJob { name, params } => {
                let run = self.engine()?.trigger(&name, params.clone()).await?;
                let c = Change::new(AuditAction::JobTrigger, &name).after(serde_json::json!({
                    "run_id": run.run_id,
                    "params": params,
                }));
                self.audit.record(caller, vec![c]).await;
                AdminAnswer::Run(run)
            }
            AdminCall::ListRuns { job, limit, .. } => {
                let limit = match limit {
                    0 => DEFAULT_RUNS_LISTED,
                    n => n.min(MAX_RUNS_LISTED),
                } as usize;
                let mut runs = self.runs.list_runs(&job, limit).await?;
                // The engine's copy of a run in progress is the freshest.
                if let Some(e) = self.shared.current().engine {
                    for run in runs.iter_mut().filter(|x| !x.state.is_final()) {
                        if let Some(live) = e.active_run(&run.run_id).await? {
                            *run = live;
                        }
                    }
                }
                AdminAnswer::Runs(runs)
            }
            AdminCall::GetRun(id) => {
                if let Some(e) = self.shared.current().engine
                    && let Some(live) = e.active_run(&id).await?
                {
                    return Ok(AdminAnswer::Run(live));
                }
                let run = self
                    .runs
                    .get_run(&id)
                    .await?
                    .ok_or_else(|| CoordError::NotFound(format!("run {id:?}")))?;
                AdminAnswer::Run(run)
            }
            AdminCall::KillRun(id) => {
                let run = self.engine()?.kill(&id).await?;
                let c = Change::new(AuditAction::RunKill, &id).after(serde_json::json!({
                    "job": run.job,
                    "state": run.state,
                }));
                self.audit.record(caller, vec![c]).await;
                AdminAnswer::Run(run)
            }
            AdminCall::RerunWorkflow { run_id, node } => {
                let engine = self.engine()?;
                let old = match engine.active_run(&run_id).await? {
                    Some(live) => live,
                    None => self
                        .runs
                        .get_run(&run_id)
                        .await?
                        .ok_or_else(|| CoordError::NotFound(format!("run {run_id:?}")))?,
                };
                let run = engine.rerun(old, &node).await?;
                let c = Change::new(AuditAction::RunRerun, &run_id).after(serde_json::json!({
                    "run_id": run.run_id,
                    "node": node,
                }));
                self.audit.record(caller, vec![c]).await;
                AdminAnswer::Run(run)
            }
            AdminCall::ListAudit { limit, before } => {
                AdminAnswer::Audit(self.audit.list(limit, &before).await?)
            }
            AdminCall::ListWorkers { group, .. } => {
                let current = self.shared.current();
                let workers = match current.engine {
                    Some(e) => e
                        .workers()
                        .await?
                        .into_iter()
                        .filter(|w| group.is_empty() || w.group == group)
                        .collect(),
                    None => Vec::new(),
                };
                AdminAnswer::Workers {
                    workers,
                    leader: current.leader,
                }
            }
        })
    }
}
