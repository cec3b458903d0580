//! `chime demo <scenario>`: the marketing-push systems chime was built for, run end
//! to end on real processes — a `chime coordinator` when the scenario has jobs, and
//! demo worker processes (`chime demo worker`, hidden: this same binary with the
//! scenario's handlers) — against the Redis and etcd given, pushing to a fake push
//! provider (`provider`) served by the demo process. Each scenario prints one JSON
//! line of results on stdout (progress on stderr), checks its own invariants (no
//! loss, no duplicate, timing bounds) and exits non-zero when one fails. Each run
//! uses its own key prefix in Redis and etcd and deletes it at the end.
//!
//! This module owns what every scenario shares: the flags, the processes, the etcd
//! settings, the admin client, clean-up and the result line.

mod coupon;
mod mass_push;
mod provider;
mod push_platform;
mod segment;
mod sync;
mod worker;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, QueueLayout};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use proto as pb;
use serde_json::{Value, json};

/// `chime demo` arguments.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(subcommand)]
    cmd: DemoCmd,
}

#[derive(Debug, clap::Subcommand)]
enum DemoCmd {
    /// Coupon reminders: a day of subscriptions, cancels and re-subscribes; near
    /// reminders of one user merged; every reminder in the minute before its coupon
    /// opens.
    CouponReminder(Common),
    /// Push to a segment of millions (a user-id range) by a sharding-broadcast job:
    /// shards fan out into tasks of 1,000 users, workers push with bounded
    /// concurrency; memory stays flat.
    MassPush(Common),
    /// Three push configurations of different sizes at once, sharing one provider
    /// budget (QPS in etcd) equally; the smallest finishes first.
    PushPlatform(Common),
    /// Notifications to tag segments (exact tag match) reaching each member once,
    /// and one message to users with more than 2 orders in two days.
    SegmentNotify(Common),
    /// A source table changing all the time, copied to a target by a workflow on a
    /// fixed delay (sync, then a repair pass), throttled before its lock, with a
    /// lease and fencing; a syncing worker is killed; source and target end equal.
    IncrementalSync(Common),
    /// A demo worker process (started by the scenarios).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Scale {
    /// CI size: each scenario in about a minute or less.
    Small,
    /// The sizes of the production write-ups (minutes).
    Full,
}

impl Scale {
    fn name(self) -> &'static str {
        match self {
            Scale::Small => "small",
            Scale::Full => "full",
        }
    }
}

/// Flags every scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Common {
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// etcd endpoints (comma-separated).
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: String,
    /// Size of the run.
    #[arg(long, value_enum, default_value = "small")]
    scale: Scale,
    /// Worker processes (default: 2 at small scale, 4 at full scale).
    #[arg(long)]
    workers: Option<usize>,
    /// Fake provider latency, ms (default: the scenario's).
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Fraction of pushes the fake provider answers 503 (default: the scenario's).
    #[arg(long)]
    failure_rate: Option<f64>,
    /// Seed of the generated data (users, tags, orders, subscriptions).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep the processes' logs (their directory is printed).
    #[arg(long)]
    keep_files: bool,
    /// Where the item handlers run: in the Rust demo workers, or (coupon-reminder)
    /// in Python apps subscribed to `chime worker`s over the delivery service.
    #[arg(long, value_enum, default_value = "rust")]
    handler_sdk: HandlerSdk,
    /// The Python interpreter with `chime-sdk` installed (`--handler-sdk python`).
    #[arg(long, default_value = "python3")]
    python: String,
}

/// Which SDK runs the scenario's item handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum HandlerSdk {
    /// `chime demo worker` processes (the Rust SDK, in process).
    Rust,
    /// `sdk/python/examples/coupon_reminder.py`, each next to a `chime worker`
    /// serving the delivery service (a sidecar).
    Python,
}

impl Common {
    fn workers(&self) -> usize {
        self.workers.unwrap_or(match self.scale {
            Scale::Small => 2,
            Scale::Full => 4,
        })
    }
}

/// Runs a scenario (or the hidden worker).
pub async fn run(args: DemoArgs) -> Result<()> {
    match args.cmd {
        DemoCmd::Worker(a) => worker::run(a).await,
        DemoCmd::CouponReminder(c) => scenario(c, coupon::run).await,
        DemoCmd::MassPush(c) => scenario(c, mass_push::run).await,
        DemoCmd::PushPlatform(c) => scenario(c, push_platform::run).await,
        DemoCmd::SegmentNotify(c) => scenario(c, segment::run).await,
        DemoCmd::IncrementalSync(c) => scenario(c, sync::run).await,
    }
}

async fn scenario<F, Fut>(c: Common, f: F) -> Result<()>
where
    F: FnOnce(Common) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    crate::init_logging("text", "warn");
    if c.workers() == 0 {
        bail!("invalid --workers: at least 1");
    }
    if let Some(r) = c.failure_rate
        && !(0.0..0.5).contains(&r)
    {
        bail!("invalid --failure-rate: {r} is outside 0..0.5");
    }
    f(c).await
}

/// Which handlers a demo worker process registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// `coupon.remind`.
    CouponReminder,
    /// `mass.fanout` (job) and `mass.push`.
    MassPush,
    /// `push.small`, `push.medium`, `push.large`.
    PushPlatform,
    /// `segment.scan` (job) and `segment.send`.
    SegmentNotify,
    /// `sync.copy` and `sync.repair` (jobs).
    IncrementalSync,
}

impl Scenario {
    fn arg(self) -> &'static str {
        match self {
            Scenario::CouponReminder => "coupon-reminder",
            Scenario::MassPush => "mass-push",
            Scenario::PushPlatform => "push-platform",
            Scenario::SegmentNotify => "segment-notify",
            Scenario::IncrementalSync => "incremental-sync",
        }
    }
}

/// How each demo worker process consumes.
#[derive(Debug, Clone)]
pub(crate) struct WorkerTuning {
    /// Provider requests in flight at once per worker.
    pub(crate) concurrency: usize,
    /// Items held at once per worker.
    pub(crate) max_in_flight: usize,
    /// Most items per pop.
    pub(crate) batch: u32,
}

/// The admin client of the demo's coordinator.
pub(crate) type Admin = pb::admin_client::AdminClient<tonic::transport::Channel>;

/// One run of a scenario: its prefix, files, connections and child processes.
pub(crate) struct Demo {
    pub(crate) common: Common,
    pub(crate) name: &'static str,
    pub(crate) prefix: String,
    pub(crate) dir: PathBuf,
    pub(crate) conn: RedisConn,
    pub(crate) store: Arc<RedisStore>,
    pub(crate) queues: u32,
    etcd: etcd_client::Client,
    coordinator: Option<(Child, String)>,
    workers: Vec<Child>,
    /// The index `i` of each of `workers` (worker id `<prefix>-w<i>`).
    worker_ids: Vec<usize>,
    started: Instant,
}

impl Demo {
    /// Connects and makes a fresh prefix and temp dir.
    pub(crate) async fn open(common: Common, name: &'static str, queues: u32) -> Result<Self> {
        let prefix = format!("demo{:08x}", fastrand::u32(..));
        let conn = RedisConn::connect(&RedisSpec::parse(&common.redis_url)?)
            .await
            .with_context(|| format!("connecting to Redis at {}", common.redis_url))?;
        let store = Arc::new(
            RedisStore::open(conn.clone(), QueueLayout::new(&prefix, "default", queues)?).await?,
        );
        let etcd = chime_shared::etcd::EtcdSpec::parse(&common.etcd_endpoints)?
            .connect()
            .await
            .with_context(|| format!("connecting to etcd at {}", common.etcd_endpoints))?;
        let dir = std::env::temp_dir().join(format!("chime-demo-{name}-{prefix}"));
        std::fs::create_dir_all(&dir)?;
        eprintln!(
            "demo {name} ({} scale): prefix {prefix}, {} workers, files in {}",
            common.scale.name(),
            common.workers(),
            dir.display()
        );
        Ok(Self {
            common,
            name,
            prefix,
            dir,
            conn,
            store,
            queues,
            etcd,
            coordinator: None,
            workers: Vec::new(),
            worker_ids: Vec::new(),
            started: Instant::now(),
        })
    }

    /// The etcd prefix of this run's live settings and jobs.
    fn etcd_prefix(&self) -> String {
        format!("/{}/", self.prefix)
    }

    /// Writes a live setting (`budgets/provider/rate_per_s`, …) under the run's prefix,
    /// as an operator would with `etcdctl put`.
    pub(crate) async fn put_setting(&mut self, key: &str, value: &str) -> Result<()> {
        let full = format!("{}{key}", self.etcd_prefix());
        self.etcd
            .put(full.as_str(), value, None)
            .await
            .with_context(|| format!("etcd put {full}"))?;
        Ok(())
    }

    /// Starts a `chime coordinator` for this run and waits until it answers.
    pub(crate) async fn start_coordinator(&mut self) -> Result<Admin> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(self.dir.join("coordinator.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["coordinator", "--grpc-addr", &format!("127.0.0.1:{port}")])
            .args(["--redis-url", &self.common.redis_url])
            .args(["--etcd-endpoints", &self.common.etcd_endpoints])
            .args(["--prefix", &self.prefix])
            // A throwaway loopback coordinator: no tokens, HTTP on an ephemeral port.
            .args(["--allow-unauthenticated", "--http-addr", "127.0.0.1:0"])
            .env("CHIME_ETCD_PREFIX", self.etcd_prefix())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning the coordinator")?;
        self.coordinator = Some((child, endpoint.clone()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = Admin::connect(endpoint.clone()).await
                && c.list_workers(pb::ListWorkersRequest::default())
                    .await
                    .is_ok()
            {
                return Ok(c);
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the coordinator did not answer in 20 s; see {}",
                    self.dir.join("coordinator.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the scenario's worker processes.
    pub(crate) fn start_workers(
        &mut self,
        scenario: Scenario,
        provider_url: &str,
        tuning: &WorkerTuning,
    ) -> Result<()> {
        if self.common.handler_sdk == HandlerSdk::Python {
            if scenario != Scenario::CouponReminder {
                bail!("invalid --handler-sdk: python runs the coupon-reminder handler only");
            }
            return self.start_python_workers(provider_url, tuning);
        }
        let exe = std::env::current_exe()?;
        for i in 0..self.common.workers() {
            let log = std::fs::File::create(self.dir.join(format!("worker-{i}.log")))?;
            let mut cmd = Command::new(&exe);
            cmd.args(["demo", "worker", "--scenario", scenario.arg()])
                .args(["--redis-url", &self.common.redis_url])
                .args(["--etcd-endpoints", &self.common.etcd_endpoints])
                .args(["--prefix", &self.prefix])
                .args(["--queues", &self.queues.to_string()])
                .args(["--provider-url", provider_url])
                .args(["--worker-id", &format!("{}-w{i}", self.prefix)])
                .args(["--concurrency", &tuning.concurrency.to_string()])
                .args(["--max-in-flight", &tuning.max_in_flight.to_string()])
                .args(["--batch", &tuning.batch.to_string()])
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or("warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            if let Some((_, endpoint)) = &self.coordinator {
                cmd.args(["--coordinator", endpoint]);
            }
            self.workers
                .push(cmd.spawn().context("spawning a demo worker")?);
            self.worker_ids.push(i);
        }
        Ok(())
    }

    /// Per worker, a `chime worker` doing the queue work (the same tuning and live
    /// settings as the demo worker) and the Python coupon reminder subscribed to it.
    fn start_python_workers(&mut self, provider_url: &str, tuning: &WorkerTuning) -> Result<()> {
        let exe = std::env::current_exe()?;
        let example = Path::new("sdk/python/examples/coupon_reminder.py");
        if !example.is_file() {
            bail!(
                "invalid --handler-sdk: {} is missing (run from the repository root)",
                example.display()
            );
        }
        for i in 0..self.common.workers() {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let log = std::fs::File::create(self.dir.join(format!("worker-{i}.log")))?;
            let mut cmd = Command::new(&exe);
            cmd.arg("worker")
                .args(["--redis-url", &self.common.redis_url])
                .args(["--etcd-endpoints", &self.common.etcd_endpoints])
                .args(["--prefix", &self.prefix])
                .args(["--queues", &self.queues.to_string()])
                .args(["--worker-id", &format!("{}-w{i}", self.prefix)])
                .args(["--max-in-flight", &tuning.max_in_flight.to_string()])
                .args(["--batch", &tuning.batch.to_string()])
                .args(["--handlers", "none", "--http-addr", ""])
                .args(["--deliveries-addr", &format!("127.0.0.1:{port}")])
                .arg("--deliveries-allow-unauthenticated")
                .env("CHIME_ETCD_PREFIX", self.etcd_prefix())
                // As the demo worker: quick retries within the reminder's minute.
                .env("CHIME_CONSUMER_RETRY_BASE_MS", "200")
                .env("CHIME_CONSUMER_RETRY_MAX_MS", "2000")
                .env("CHIME_CONSUMER_IDLE_SLEEP_MAX_MS", "250")
                .env("CHIME_CONSUMER_DRAIN_TIMEOUT_MS", "10000")
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or("warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            self.workers
                .push(cmd.spawn().context("spawning a chime worker")?);
            let log = std::fs::File::create(self.dir.join(format!("python-{i}.log")))?;
            let mut app = Command::new(&self.common.python);
            app.arg(example)
                .arg(provider_url)
                .args(["--deliveries", &format!("http://127.0.0.1:{port}")])
                .args(["--concurrency", &tuning.concurrency.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            self.workers
                .push(app.spawn().context("spawning the Python coupon reminder")?);
        }
        Ok(())
    }

    /// Waits until every worker has a session with the coordinator.
    pub(crate) async fn wait_registered(&mut self, admin: &mut Admin) -> Result<()> {
        let want = self.workers.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = admin
                .list_workers(pb::ListWorkersRequest::default())
                .await
                .map(|r| r.into_inner().workers.len())
                .unwrap_or(0);
            if n >= want {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("only {n} of {want} workers registered in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills (SIGKILL) the worker process whose worker id is `worker_id`, on
    /// purpose: it is no longer watched or stopped.
    pub(crate) fn kill_worker(&mut self, worker_id: &str) -> Result<()> {
        let i: usize = worker_id
            .strip_prefix(&format!("{}-w", self.prefix))
            .and_then(|i| i.parse().ok())
            .with_context(|| format!("{worker_id} is not a worker of this run"))?;
        let pos = self
            .worker_ids
            .iter()
            .position(|w| *w == i)
            .with_context(|| format!("worker {worker_id} was killed already"))?;
        self.worker_ids.remove(pos);
        let mut child = self.workers.remove(pos);
        let killed = child.kill();
        let _ = child.wait();
        Ok(killed?)
    }

    /// Fails if a child process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        for (i, c) in self.workers.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!(
                    "worker process {i} exited early ({status}); see the logs in {}",
                    self.dir.display()
                );
            }
        }
        if let Some((c, _)) = &mut self.coordinator
            && let Ok(Some(status)) = c.try_wait()
        {
            bail!(
                "the coordinator exited early ({status}); see {}",
                self.dir.join("coordinator.log").display()
            );
        }
        Ok(())
    }

    /// The largest peak resident set (VmHWM, KiB) of the worker processes so far.
    pub(crate) fn worker_peak_rss_kib(&self) -> u64 {
        self.workers
            .iter()
            .filter_map(|c| crate::bench::vm_hwm_kib(c.id()))
            .max()
            .unwrap_or(0)
    }

    /// Items pending or in flight in the run's queues.
    pub(crate) async fn queue_left(&self) -> Result<u64> {
        Ok(self
            .store
            .stats()
            .await?
            .iter()
            .map(|s| s.pending + s.in_flight)
            .sum())
    }

    /// Dead letters in the run's queues.
    pub(crate) async fn dead_letters(&self) -> Result<u64> {
        Ok(self.store.stats().await?.iter().map(|s| s.dead).sum())
    }

    /// SIGTERM to the workers (they drain), then to the coordinator; SIGKILL after
    /// 30 s.
    pub(crate) fn stop_processes(&mut self) {
        let mut all: Vec<&mut Child> = self.workers.iter_mut().collect();
        terminate(&mut all);
        if let Some((c, _)) = &mut self.coordinator {
            terminate(&mut [c]);
        }
    }

    /// Seconds since the run started (process start-up included).
    pub(crate) fn elapsed_s(&self) -> f64 {
        round2(self.started.elapsed().as_secs_f64())
    }

    /// Stops everything, deletes the run's keys in Redis and etcd, prints the result
    /// line (with `ok` and the failed invariants) and fails when one failed.
    pub(crate) async fn finish(mut self, mut result: Value, failures: Vec<String>) -> Result<()> {
        self.stop_processes();
        let cleaned = self.cleanup().await;
        if let Value::Object(m) = &mut result {
            let mut head = serde_json::Map::new();
            head.insert("demo".into(), json!(self.name));
            head.insert("scale".into(), json!(self.common.scale.name()));
            head.insert("workers".into(), json!(self.common.workers()));
            head.insert(
                "handler_sdk".into(),
                json!(format!("{:?}", self.common.handler_sdk).to_lowercase()),
            );
            head.insert("ok".into(), json!(failures.is_empty()));
            head.insert("failures".into(), json!(failures));
            head.append(m);
            head.insert("wall_s".into(), json!(self.elapsed_s()));
            *m = head;
        }
        println!("{result}");
        if let Err(e) = cleaned {
            eprintln!("  clean-up failed: {e:#}");
        }
        crate::bench::keep_or_remove(&self.dir, self.common.keep_files || !failures.is_empty());
        if !failures.is_empty() {
            bail!("demo {}: {}", self.name, failures.join("; "));
        }
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        crate::bench::cleanup(&self.conn, &self.prefix).await?;
        crate::bench::cleanup_etcd(&self.etcd, &self.etcd_prefix()).await
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // An early error must not leave processes behind.
        for c in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((c, _)) = &mut self.coordinator {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// SIGTERM each child, then wait for all of them (SIGKILL after 30 s).
fn terminate(children: &mut [&mut Child]) {
    for c in children.iter() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in children.iter_mut() {
        while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Creates a manual sharding-broadcast job with `shards` shards (0: one per live
/// worker) on the demo workers' group.
pub(crate) async fn create_broadcast_job(
    admin: &mut Admin,
    name: &str,
    handler: &str,
    shards: u32,
) -> Result<()> {
    let job = pb::Job {
        name: name.into(),
        group: worker::GROUP.into(),
        handler: handler.into(),
        schedule: Some(pb::Schedule {
            kind: Some(pb::schedule::Kind::Manual(pb::Manual {})),
        }),
        routing: pb::Routing::ShardingBroadcast as i32,
        shard_count: shards,
        timeout_ms: 600_000,
        retries: 2,
        retry_backoff_ms: 500,
        ..Default::default()
    };
    admin
        .create_job(pb::CreateJobRequest { job: Some(job) })
        .await
        .map_err(|e| anyhow::anyhow!("creating job {name}: {}", e.message()))?;
    Ok(())
}

/// Creates workflow `name` on the demo workers' group: `nodes` (the DAG as JSON,
/// see docs/workflows.md) fired by `schedule`, under `overlap`.
pub(crate) async fn create_workflow(
    admin: &mut Admin,
    name: &str,
    schedule: pb::schedule::Kind,
    overlap: pb::Overlap,
    nodes: &Value,
) -> Result<()> {
    let job = pb::Job {
        name: name.into(),
        group: worker::GROUP.into(),
        schedule: Some(pb::Schedule {
            kind: Some(schedule),
        }),
        overlap: overlap as i32,
        workflow_json: nodes.to_string(),
        ..Default::default()
    };
    admin
        .create_job(pb::CreateJobRequest { job: Some(job) })
        .await
        .map_err(|e| anyhow::anyhow!("creating workflow {name}: {}", e.message()))?;
    Ok(())
}

/// Fires a job now with `params`; answers the run id.
pub(crate) async fn trigger(admin: &mut Admin, name: &str, params: &Value) -> Result<String> {
    let run = admin
        .trigger_job(pb::TriggerJobRequest {
            name: name.into(),
            params: params.to_string(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("triggering {name}: {}", e.message()))?
        .into_inner();
    Ok(run.run_id)
}

/// Waits until a run ends; answers it.
pub(crate) async fn wait_run(
    admin: &mut Admin,
    run_id: &str,
    timeout: Duration,
) -> Result<pb::Run> {
    let deadline = Instant::now() + timeout;
    loop {
        let run = admin
            .get_run(pb::RunId {
                run_id: run_id.into(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("reading run {run_id}: {}", e.message()))?
            .into_inner();
        let state = pb::RunState::try_from(run.state).unwrap_or(pb::RunState::Unspecified);
        if !matches!(
            state,
            pb::RunState::Pending | pb::RunState::Running | pb::RunState::Unspecified
        ) {
            return Ok(run);
        }
        if Instant::now() > deadline {
            bail!("run {run_id} did not end within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a run ended with every shard succeeded.
pub(crate) fn succeeded(run: &pb::Run) -> bool {
    run.state == pb::RunState::Succeeded as i32
}

/// Two decimals.
pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `ok` when `cond`, else a failure line.
pub(crate) fn check(failures: &mut Vec<String>, cond: bool, what: impl Into<String>) {
    if !cond {
        failures.push(what.into());
    }
}
