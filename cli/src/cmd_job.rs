//! `chime job …`, `chime runs …`, `chime workers`: the admin API from the command
//! line. Every command prints JSON; refused input exits non-zero with the
//! coordinator's error, which names the field.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use chime_coordinator::grpc::{
    JobView, job_from_proto, job_view, run_from_proto, worker_from_proto,
};
use chime_coordinator::model::{JobSpec, Misfire, Overlap, Routing, Schedule};
use chime_shared::auth::Bearer;
use clap::Subcommand;
use proto as pb;
use serde_json::json;

use crate::config::{self, ClientConfig};
use crate::init_logging;

type Client = pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// Where the coordinator is.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordArgs {
    /// Config file (TOML).
    #[arg(long, env = "CHIME_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Coordinator gRPC endpoint(s), comma-separated (`http://host:port`, or a bare
    /// `host:port`); before or after the subcommand.
    #[arg(long, global = true)]
    coordinator: Option<String>,
    /// File holding the admin token (or set CHIME_ADMIN_TOKEN); before or after the
    /// subcommand.
    #[arg(long, global = true)]
    token_file: Option<String>,
}

async fn connect(a: &CoordArgs) -> Result<Client> {
    let mut cfg: ClientConfig = config::load(a.config.as_deref(), config::chime_env())?;
    if let Some(c) = &a.coordinator {
        cfg.coordinator = c.clone();
    }
    if let Some(f) = &a.token_file {
        cfg.admin_token_file = f.clone();
    }
    init_logging(&cfg.log.format, "warn");
    let bearer = admin_bearer(&cfg)?;
    let endpoints: Vec<String> = if cfg.coordinator.trim().is_empty() {
        vec!["http://127.0.0.1:7070".into()]
    } else {
        cfg.coordinator
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let mut last = None;
    for e in &endpoints {
        let tls = chime_shared::tls::ClientTls {
            ca_file: cfg.tls_ca_file.clone(),
            cert_file: cfg.tls_cert_file.clone(),
            key_file: cfg.tls_key_file.clone(),
            domain: cfg.tls_domain.clone(),
        };
        let channel = match chime_shared::tls::endpoint(e, &tls, "") {
            Ok(ep) => ep.connect().await,
            Err(err) => {
                last = Some(anyhow::anyhow!("coordinator endpoint {e:?}: {err}"));
                continue;
            }
        };
        match channel {
            Ok(ch) => {
                return Ok(pb::admin_client::AdminClient::with_interceptor(ch, bearer)
                    .max_decoding_message_size(16 * 1024 * 1024));
            }
            Err(err) => {
                // tonic's top-level message is just "transport error": the
                // cause (refused, certificate not trusted, …) is in the chain.
                last = Some(
                    anyhow::Error::new(err)
                        .context(format!("connecting to the coordinator at {e}")),
                )
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no coordinator endpoint")))
}

/// The admin token of `cfg`: `admin_token_file`, else `admin_token`.
pub fn admin_bearer(cfg: &ClientConfig) -> Result<Bearer> {
    let token = match cfg.admin_token_file.trim() {
        "" => cfg.admin_token.clone(),
        f => chime_shared::auth::read_client_token(std::path::Path::new(f))
            .context("admin_token_file")?,
    };
    Ok(Bearer::new(Some(&token))?)
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

fn job_out(j: pb::Job) -> Result<JobView> {
    Ok(job_view(j)?)
}

/// The parts of a job definition given on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct JobFlags {
    /// Worker group.
    #[arg(long)]
    group: Option<String>,
    /// Handler.
    #[arg(long)]
    handler: Option<String>,
    /// Cron expression (6 fields with seconds, or 5).
    #[arg(long, group = "sched")]
    cron: Option<String>,
    /// IANA time zone of the cron expression.
    #[arg(long)]
    tz: Option<String>,
    /// Fixed rate, ms.
    #[arg(long, group = "sched")]
    every_ms: Option<u64>,
    /// Fixed delay after each run, ms.
    #[arg(long, group = "sched")]
    delay_ms: Option<u64>,
    /// Once, at this Unix ms.
    #[arg(long, group = "sched")]
    at_ms: Option<i64>,
    /// Manual only.
    #[arg(long, group = "sched")]
    manual: bool,
    /// Routing: sharding-broadcast, round-robin, random, consistent-hash,
    /// least-recently-used, least-loaded, failover, busy-over, first, last.
    #[arg(long)]
    routing: Option<String>,
    /// Sharding broadcast: a fixed number of shards (default: one per live worker).
    #[arg(long)]
    shards: Option<u32>,
    /// Per-shard params, comma-separated (one per shard).
    #[arg(long, value_delimiter = ',')]
    shard_params: Option<Vec<String>>,
    /// Consistent hash: the params field to hash.
    #[arg(long)]
    hash_param: Option<String>,
    /// Params (text, often JSON).
    #[arg(long)]
    params: Option<String>,
    /// Overlap: allow, skip, buffer-one, cancel-running.
    #[arg(long)]
    overlap: Option<String>,
    /// Misfire: skip, fire-once, fire-all.
    #[arg(long)]
    misfire: Option<String>,
    /// Fire-all misfire: how far back, ms.
    #[arg(long)]
    catch_up_window_ms: Option<u64>,
    /// Per-shard timeout, ms.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Retries of a failed shard.
    #[arg(long)]
    retries: Option<u32>,
    /// First retry backoff, ms.
    #[arg(long)]
    retry_backoff_ms: Option<u64>,
    /// Child jobs fired on success, comma-separated.
    #[arg(long, value_delimiter = ',')]
    children: Option<Vec<String>>,
    /// No fire before this Unix ms.
    #[arg(long)]
    start_at_ms: Option<i64>,
    /// No fire after this Unix ms.
    #[arg(long)]
    end_at_ms: Option<i64>,
    /// Random delay of each fire, ms.
    #[arg(long)]
    jitter_ms: Option<u64>,
    /// Create paused.
    #[arg(long)]
    paused: bool,
}

fn parse_enum<T: serde::de::DeserializeOwned>(field: &str, v: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.replace('-', "_")))
        .map_err(|_| anyhow::anyhow!("invalid {field}: {v:?}"))
}

impl JobFlags {
    fn apply(&self, j: &mut JobSpec) -> Result<()> {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { j.$f = v.clone(); } )* };
        }
        set!(group, handler, hash_param, params, shard_params, children);
        set!(
            catch_up_window_ms,
            timeout_ms,
            retries,
            retry_backoff_ms,
            start_at_ms,
            end_at_ms,
            jitter_ms
        );
        if let Some(n) = self.shards {
            j.shard_count = n;
        }
        if let Some(c) = &self.cron {
            j.schedule = Schedule::Cron {
                expr: c.clone(),
                time_zone: self.tz.clone().unwrap_or_default(),
            };
        } else if let (Some(tz), Schedule::Cron { time_zone, .. }) = (&self.tz, &mut j.schedule) {
            *time_zone = tz.clone();
        }
        if let Some(v) = self.every_ms {
            j.schedule = Schedule::FixedRate { every_ms: v };
        }
        if let Some(v) = self.delay_ms {
            j.schedule = Schedule::FixedDelay { delay_ms: v };
        }
        if let Some(v) = self.at_ms {
            j.schedule = Schedule::Once { at_ms: v };
        }
        if self.manual {
            j.schedule = Schedule::Manual;
        }
        if let Some(r) = &self.routing {
            j.routing = parse_enum::<Routing>("routing", r)?;
        }
        if let Some(o) = &self.overlap {
            j.overlap = parse_enum::<Overlap>("overlap", o)?;
        }
        if let Some(m) = &self.misfire {
            j.misfire = parse_enum::<Misfire>("misfire", m)?;
        }
        if self.paused {
            j.paused = true;
        }
        Ok(())
    }
}

/// `chime job` arguments.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    #[command(flatten)]
    coord: CoordArgs,
    #[command(subcommand)]
    cmd: JobCmd,
}

#[derive(Debug, Subcommand)]
enum JobCmd {
    /// Create a job (or a workflow) from flags or a file.
    Create {
        /// Job name.
        #[arg(long, required_unless_present = "file")]
        name: Option<String>,
        /// The job as JSON (the stored form), or as YAML when the file ends in
        /// `.yaml` or `.yml`; a workflow is a job with a `workflow` field.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        flags: JobFlags,
    },
    /// Change some fields of a job, or replace it with a file's definition.
    Update {
        /// Job name.
        name: String,
        /// The new definition (JSON, or YAML for `.yaml`/`.yml`); flags apply
        /// on top of it.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        flags: JobFlags,
    },
    /// Every job.
    List {
        /// Only this group.
        #[arg(long, default_value = "")]
        group: String,
        /// Only jobs of this namespace (`default`: names without one).
        #[arg(long, short = 'n', default_value = "")]
        namespace: String,
    },
    /// One job.
    Get {
        /// Job name.
        name: String,
    },
    /// Stop firing a job.
    Pause {
        /// Job name.
        name: String,
    },
    /// Fire a paused job again from its next tick.
    Resume {
        /// Job name.
        name: String,
    },
    /// Fire a job now.
    Trigger {
        /// Job name.
        name: String,
        /// Params for this fire.
        #[arg(long, default_value = "")]
        params: String,
    },
    /// Delete a job.
    Delete {
        /// Job name.
        name: String,
    },
}

/// A job definition from a file: YAML for `.yaml`/`.yml`, JSON otherwise. A
/// parse error names the field it stopped at (`workflow.nodes[2].after`).
fn read_spec(path: &std::path::Path) -> Result<JobSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let parsed = if yaml {
        serde_path_to_error::deserialize(yaml_serde::Deserializer::from_str(&text))
            .map_err(|e| anyhow::anyhow!("invalid {}: {}", e.path(), e.inner()))
    } else {
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de)
            .map_err(|e| anyhow::anyhow!("invalid {}: {}", e.path(), e.inner()))
    };
    parsed.with_context(|| format!("parsing {}", path.display()))
}

fn to_pb(spec: &JobSpec, version: i64) -> pb::Job {
    let stored = chime_coordinator::store::StoredJob {
        spec: spec.clone(),
        version,
    };
    chime_coordinator::grpc::job_to_proto(&stored, Default::default())
}

/// Runs a `chime job` subcommand.
pub async fn run_job(a: JobArgs) -> Result<()> {
    let mut c = connect(&a.coord).await?;
    let out = match a.cmd {
        JobCmd::Create { name, file, flags } => {
            let mut spec: JobSpec = match &file {
                Some(f) => read_spec(f)?,
                None => JobSpec {
                    retry_backoff_ms: 1_000,
                    ..JobSpec::new(
                        name.clone().unwrap_or_default(),
                        "default",
                        "",
                        Schedule::Manual,
                    )
                },
            };
            if let Some(n) = name {
                spec.name = n;
            }
            flags.apply(&mut spec)?;
            let j = c
                .create_job(pb::CreateJobRequest {
                    job: Some(to_pb(&spec, 0)),
                })
                .await
                .map_err(status)?;
            serde_json::to_value(job_out(j.into_inner())?)?
        }
        JobCmd::Update { name, file, flags } => {
            let cur = c
                .get_job(pb::JobRef { name: name.clone() })
                .await
                .map_err(status)?
                .into_inner();
            let (mut spec, version) = job_from_proto(cur)?;
            if let Some(f) = &file {
                spec = read_spec(f)?;
                if spec.name != name {
                    bail!(
                        "invalid name: {} defines {:?}, not {name:?}",
                        f.display(),
                        spec.name
                    );
                }
            }
            flags.apply(&mut spec)?;
            let j = c
                .update_job(pb::UpdateJobRequest {
                    job: Some(to_pb(&spec, version)),
                })
                .await
                .map_err(status)?;
            serde_json::to_value(job_out(j.into_inner())?)?
        }
        JobCmd::List { group, namespace } => {
            let jobs = c
                .list_jobs(pb::ListJobsRequest { group, namespace })
                .await
                .map_err(status)?
                .into_inner()
                .jobs;
            let out: Result<Vec<JobView>> = jobs.into_iter().map(job_out).collect();
            serde_json::to_value(out?)?
        }
        JobCmd::Get { name } => serde_json::to_value(job_out(
            c.get_job(pb::JobRef { name })
                .await
                .map_err(status)?
                .into_inner(),
        )?)?,
        JobCmd::Pause { name } => serde_json::to_value(job_out(
            c.pause_job(pb::JobRef { name })
                .await
                .map_err(status)?
                .into_inner(),
        )?)?,
        JobCmd::Resume { name } => serde_json::to_value(job_out(
            c.resume_job(pb::JobRef { name })
                .await
                .map_err(status)?
                .into_inner(),
        )?)?,
        JobCmd::Trigger { name, params } => {
            let r = c
                .trigger_job(pb::TriggerJobRequest { name, params })
                .await
                .map_err(status)?
                .into_inner();
            serde_json::to_value(run_from_proto(r))?
        }
        JobCmd::Delete { name } => {
            c.delete_job(pb::JobRef { name: name.clone() })
                .await
                .map_err(status)?;
            json!({ "deleted": name })
        }
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// `chime runs` arguments.
#[derive(Debug, clap::Args)]
pub struct RunsArgs {
    #[command(flatten)]
    coord: CoordArgs,
    #[command(subcommand)]
    cmd: Option<RunsCmd>,
    /// List runs of this job (default: all jobs).
    #[arg(long, default_value = "")]
    job: String,
    /// Most runs to list.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Only those of this namespace (`default`: names without one).
    #[arg(long, short = 'n', default_value = "")]
    namespace: String,
}

#[derive(Debug, Subcommand)]
enum RunsCmd {
    /// One run with its shards.
    Get {
        /// Run id.
        run_id: String,
    },
    /// Cancel every unfinished shard of a run (of a workflow run: every node
    /// not ended).
    Kill {
        /// Run id.
        run_id: String,
    },
    /// Start a finished workflow run again from a node: it and what follows it
    /// run again, the other nodes keep their results.
    Rerun {
        /// The workflow run.
        run_id: String,
        /// The node to start from.
        #[arg(long)]
        node: String,
    },
}

/// Runs `chime runs`.
pub async fn run_runs(a: RunsArgs) -> Result<()> {
    let mut c = connect(&a.coord).await?;
    let out = match a.cmd {
        None => {
            let runs = c
                .list_runs(pb::ListRunsRequest {
                    job: a.job,
                    limit: a.limit,
                    namespace: a.namespace,
                })
                .await
                .map_err(status)?
                .into_inner()
                .runs;
            serde_json::to_value(runs.into_iter().map(run_from_proto).collect::<Vec<_>>())?
        }
        Some(RunsCmd::Get { run_id }) => serde_json::to_value(run_from_proto(
            c.get_run(pb::RunId { run_id })
                .await
                .map_err(status)?
                .into_inner(),
        ))?,
        Some(RunsCmd::Kill { run_id }) => serde_json::to_value(run_from_proto(
            c.kill_run(pb::RunId { run_id })
                .await
                .map_err(status)?
                .into_inner(),
        ))?,
        Some(RunsCmd::Rerun { run_id, node }) => serde_json::to_value(run_from_proto(
            c.rerun_workflow(pb::RerunRequest { run_id, node })
                .await
                .map_err(status)?
                .into_inner(),
        ))?,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// `chime workers` arguments.
#[derive(Debug, clap::Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    coord: CoordArgs,
    /// Only this group.
    #[arg(long, default_value = "")]
    group: String,
    /// Only those of this namespace (`default`: names without one).
    #[arg(long, short = 'n', default_value = "")]
    namespace: String,
}

/// Runs `chime workers`.
pub async fn run_workers(a: WorkersArgs) -> Result<()> {
    let mut c = connect(&a.coord).await?;
    let r = c
        .list_workers(pb::ListWorkersRequest {
            group: a.group,
            namespace: a.namespace,
        })
        .await
        .map_err(status)?
        .into_inner();
    let workers: Vec<_> = r.workers.into_iter().map(worker_from_proto).collect();
    println!(
        "{}",
        serde_json::to_string(&json!({ "leader": r.leader, "workers": workers }))?
    );
    Ok(())
}

/// `chime audit` arguments.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    coord: CoordArgs,
    /// Most entries (at most 1,000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Only entries older than this entry id (the last `id` of the previous page).
    #[arg(long, default_value = "")]
    before: String,
}

/// Runs `chime audit`: the audit log, newest first, one JSON object per line (so
/// `jq`, `grep` and `tail` work on it). `before`/`after` are JSON values.
pub async fn run_audit(a: AuditArgs) -> Result<()> {
    let mut c = connect(&a.coord).await?;
    let r = c
        .list_audit(pb::ListAuditRequest {
            limit: a.limit,
            before: a.before,
        })
        .await
        .map_err(status)?
        .into_inner();
    let json = |s: &str| {
        (!s.is_empty())
            .then(|| serde_json::from_str::<serde_json::Value>(s).ok())
            .flatten()
    };
    for e in r.entries {
        println!(
            "{}",
            serde_json::to_string(&json!({
                "id": e.id,
                "at_ms": e.at_ms,
                "who": e.who,
                "action": e.action,
                "target": e.target,
                "before": json(&e.before_json),
                "after": json(&e.after_json),
            }))?
        );
    }
    Ok(())
}
