//! `chime bench …`: benchmarks that print one JSON line of results on stdout
//! (progress goes to stderr). Each uses its own key prefix and cleans up after
//! itself; worker processes are real `chime worker` processes started from this
//! binary.

mod burst;
mod chaos;
mod cron;
mod deliveries;
mod failover;
mod floor;
mod profile;
mod proxy;
mod resize;
mod rolling;
mod steady;
mod workflow;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chime_shared::redis_conn::{RedisConn, RedisSpec};

/// `chime bench` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: BenchCmd,
}

#[derive(Debug, clap::Subcommand)]
enum BenchCmd {
    /// N items due at one instant, drained by W worker processes.
    Burst(burst::BurstArgs),
    /// Items enqueued at a steady rate, each due a short random delay later.
    Steady(steady::SteadyArgs),
    /// Items enqueued continuously while the queue count changes in etcd.
    Resize(resize::ResizeArgs),
    /// Many jobs firing every second under one coordinator.
    Cron(cron::CronArgs),
    /// Jobs firing every second while the leader coordinator is killed again and again.
    Failover(failover::FailoverArgs),
    /// N items due at one instant, run by SDK subscribers over the delivery service.
    Deliveries(deliveries::DeliveriesArgs),
    /// Jobs firing every second while every coordinator, then every worker, is
    /// restarted gracefully (a rollout).
    Rolling(rolling::RollingArgs),
    /// Jobs and items flowing through a seeded random schedule of faults (kills,
    /// freezes, store restarts, partitions); fails when an invariant does.
    Chaos(chaos::ChaosArgs),
    /// Redis's CPU per item for the bare commands of enqueue, pop and ack (no Lua,
    /// no guarantees): the floor `burst`'s figure is read against.
    Floor(floor::FloorArgs),
    /// One workflow of N nodes (parallel chains after a root): the scheduling
    /// overhead per node, from the workers' records.
    Workflow(workflow::WorkflowArgs),
}

/// Runs a benchmark.
pub async fn run(args: BenchArgs) -> Result<()> {
    crate::init_logging("text", "warn");
    match args.cmd {
        BenchCmd::Burst(a) => burst::run(a).await,
        BenchCmd::Steady(a) => steady::run(a).await,
        BenchCmd::Resize(a) => resize::run(a).await,
        BenchCmd::Cron(a) => cron::run(a).await,
        BenchCmd::Failover(a) => failover::run(a).await,
        BenchCmd::Deliveries(a) => deliveries::run(a).await,
        BenchCmd::Rolling(a) => rolling::run(a).await,
        BenchCmd::Chaos(a) => chaos::run(a).await,
        BenchCmd::Floor(a) => floor::run(a).await,
        BenchCmd::Workflow(a) => workflow::run(a).await,
    }
}

/// Worker processes started by a benchmark, each with a record file and a log.
pub(crate) struct Workers {
    children: Vec<Child>,
    pub(crate) records: Vec<PathBuf>,
    pub(crate) logs: Vec<PathBuf>,
}

impl Workers {
    /// Starts `n` `chime worker` processes with the `noop` handler recording into
    /// `dir`; `args` and `env` are added to each.
    pub(crate) fn spawn(
        dir: &Path,
        n: usize,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmds = Vec::new();
        let mut records = Vec::new();
        for i in 0..n {
            let rec = dir.join(format!("w{i}.rec"));
            let mut cmd = Command::new(&exe);
            // Probes on an ephemeral port: several workers share this host.
            cmd.arg("worker")
                .args(["--http-addr", "127.0.0.1:0"])
                .args(args)
                .args(["--handlers", "noop", "--worker-id", &format!("bench-w{i}")])
                .arg("--record-file")
                .arg(&rec)
                .env("RUST_LOG", "warn,chime_worker::live=info");
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmds.push((format!("w{i}"), cmd));
            records.push(rec);
        }
        Self::start(dir, cmds, records)
    }

    /// Starts `cmds` (name, command), each logging to `dir/<name>.log`; `records`
    /// are the files their handlers write.
    pub(crate) fn start(
        dir: &Path,
        cmds: Vec<(String, Command)>,
        records: Vec<PathBuf>,
    ) -> Result<Self> {
        let mut w = Workers {
            children: Vec::new(),
            records,
            logs: Vec::new(),
        };
        for (name, mut cmd) in cmds {
            let log_path = dir.join(format!("{name}.log"));
            let log = std::fs::File::create(&log_path)?;
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            w.children
                .push(cmd.spawn().with_context(|| format!("spawning {name}"))?);
            w.logs.push(log_path);
        }
        Ok(w)
    }

    /// Process ids, in start order.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Fails if a worker has exited; answers the largest peak RSS (KiB) so far.
    pub(crate) fn check(&mut self, dir: &Path) -> Result<u64> {
        let mut peak = 0;
        for c in &mut self.children {
            if let Ok(Some(status)) = c.try_wait() {
                anyhow::bail!("a worker exited early ({status}); see {}", dir.display());
            }
            peak = peak.max(vm_hwm_kib(c.id()).unwrap_or(0));
        }
        Ok(peak)
    }

    /// Waits until the `n` items are run (see [`left_to_run`]), failing when a worker
    /// exits or `within` passes; answers the largest worker peak RSS seen (KiB),
    /// `peak_kib` included.
    pub(crate) async fn wait_until_run(
        &mut self,
        store: &chime_shared::queue::redis_store::RedisStore,
        n: usize,
        within: Duration,
        dir: &Path,
        mut peak_kib: u64,
    ) -> Result<u64> {
        let deadline = Instant::now() + within;
        loop {
            peak_kib = peak_kib.max(self.check(dir)?);
            let Some(left) = left_to_run(store, &self.records, n).await? else {
                return Ok(peak_kib);
            };
            if Instant::now() > deadline {
                anyhow::bail!(
                    "not drained in time: {left} items left; see {}",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then wait (SIGKILL after 30 s).
    pub(crate) fn stop(&mut self) {
        for c in &self.children {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for c in &mut self.children {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One handled item from a record file.
pub(crate) struct Handled {
    pub(crate) due_ms: i64,
    pub(crate) handled_ms: i64,
}

/// Reads every record file: item id → each time it was handled.
pub(crate) fn read_records(files: &[PathBuf]) -> Result<HashMap<String, Vec<Handled>>> {
    let mut out: HashMap<String, Vec<Handled>> = HashMap::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines() {
            let mut p = line.split(' ');
            let (Some(id), Some(due), Some(handled)) = (p.next(), p.next(), p.next()) else {
                continue;
            };
            let (Ok(due_ms), Ok(handled_ms)) = (due.parse(), handled.parse()) else {
                continue;
            };
            out.entry(id.to_owned())
                .or_default()
                .push(Handled { due_ms, handled_ms });
        }
    }
    Ok(out)
}

/// How items `<prefix>0…<prefix>{n-1}` were handled, from the handlers' own records.
pub(crate) struct Score {
    /// Handler start minus due time of each item's first handling, sorted, ms.
    pub(crate) lags: Vec<i64>,
    /// First and last handling, Unix ms (`i64::MAX`/`MIN` when nothing ran).
    pub(crate) first: i64,
    pub(crate) last: i64,
    /// Items never handled.
    pub(crate) lost: usize,
    /// Handlings beyond the first.
    pub(crate) duplicates: usize,
    /// Items handled before their due time.
    pub(crate) early: usize,
}

/// Scores the items `<prefix>0…<prefix>{n-1}` against the records.
pub(crate) fn score(handled: &HashMap<String, Vec<Handled>>, prefix: &str, n: usize) -> Score {
    let mut s = Score {
        lags: Vec::with_capacity(n),
        first: i64::MAX,
        last: i64::MIN,
        lost: 0,
        duplicates: 0,
        early: 0,
    };
    for i in 0..n {
        match handled.get(&format!("{prefix}{i}")) {
            None => s.lost += 1,
            Some(h) => {
                s.duplicates += h.len() - 1;
                s.early += h.iter().filter(|x| x.handled_ms < x.due_ms).count();
                s.lags.push(h[0].handled_ms - h[0].due_ms);
                s.first = s.first.min(h[0].handled_ms);
                s.last = s.last.max(h[0].handled_ms);
            }
        }
    }
    s.lags.sort_unstable();
    s
}

/// Child processes a bench started, killed (and reaped) when dropped, on every
/// return path.
pub(crate) struct Kids(pub(crate) Vec<std::process::Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A throwaway loopback coordinator for a bench: no etcd (jobs in memory), no
/// tokens, no HTTP, serving the queues of `prefix` (`count` queues for a new
/// family) on a free port, logging to `dir/coordinator.log`. Answers its process
/// and its endpoint once it answers gRPC.
pub(crate) async fn queue_coordinator(
    dir: &Path,
    redis_url: &str,
    prefix: &str,
    count: u32,
) -> Result<(std::process::Child, String)> {
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["coordinator", "--grpc-addr", &format!("127.0.0.1:{port}")])
        .args(["--redis-url", redis_url, "--prefix", prefix])
        .args(["--allow-unauthenticated", "--http-addr", ""])
        .env("CHIME_QUEUE_PREFIX", prefix)
        .env("CHIME_QUEUE_COUNT", count.to_string())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning the coordinator")?;
    let kids = Kids(vec![child]);
    let endpoint = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let mut kids = kids;
            let child = kids.0.remove(0);
            return Ok((child, endpoint));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the coordinator did not listen within 10 s (see {})",
        dir.join("coordinator.log").display()
    )
}

/// How a bench's producer stores its items.
#[derive(Debug, Clone)]
pub(crate) enum Sink {
    /// Straight into the Redis store, in this process (what the Rust SDK's
    /// `RedisStore::enqueue` does).
    Store(std::sync::Arc<chime_shared::queue::redis_store::RedisStore>),
    /// Through a coordinator's `chime.v1.Queue` (what producers in other languages
    /// do).
    Grpc(chime_worker::producer::Producer),
}

impl Sink {
    /// Items per call and calls in flight: the store takes 10,000-item pipelines;
    /// a gRPC call carries 2,000 items (about 0.6 MB at 256-byte payloads, well
    /// under the 4 MiB message limit) with eight in flight over one connection.
    fn shape(&self) -> (usize, usize) {
        match self {
            Sink::Store(_) => (10_000, 4),
            Sink::Grpc(_) => (2_000, 8),
        }
    }

    async fn enqueue(&self, items: Vec<chime_shared::queue::NewItem>) -> Result<usize> {
        use chime_shared::queue::DelayStore;
        let len = items.len();
        match self {
            Sink::Store(s) => {
                s.enqueue(items).await?;
            }
            Sink::Grpc(p) => {
                p.enqueue(items).await?;
            }
        }
        Ok(len)
    }
}

/// Enqueues items `b0…b{n-1}` (keys `u<i>`) for `handler`, all due at `t0`, in
/// chunks through `sink` ([`Sink::shape`]); answers the seconds it took.
pub(crate) async fn enqueue_burst(
    store: &std::sync::Arc<chime_shared::queue::redis_store::RedisStore>,
    sink: &Sink,
    n: usize,
    t0: i64,
    handler: &str,
    payload: bytes::Bytes,
) -> Result<f64> {
    use chime_shared::queue::{DelayStore, NewItem};
    use futures_util::StreamExt;
    let started = Instant::now();
    let (chunk, in_flight) = sink.shape();
    let chunks = n.div_ceil(chunk);
    let mut done = 0usize;
    let mut stream = futures_util::stream::iter((0..chunks).map(|c| {
        let (sink, payload) = (sink.clone(), payload.clone());
        async move {
            let items: Vec<NewItem> = (c * chunk..((c + 1) * chunk).min(n))
                .map(|i| {
                    NewItem::new(format!("b{i}"), handler, t0)
                        .key(format!("u{i}"))
                        .payload(payload.clone())
                })
                .collect();
            sink.enqueue(items).await
        }
    }))
    .buffer_unordered(in_flight);
    let report = (n / 10).max(chunk);
    while let Some(r) = stream.next().await {
        done += r?;
        if done % report < chunk || done == n {
            eprintln!("  enqueued {done}/{n}");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let after = store.now_ms().await?;
    if after > t0 {
        eprintln!(
            "  warning: enqueue finished {} ms after T0; raise --lead-ms",
            after - t0
        );
    }
    Ok(secs)
}

/// Items still to run: `None` once the record files hold at least `n` lines and
/// nothing is pending or in flight in `store`; otherwise how many are left (not yet
/// recorded, then still held by the store). The store is asked only once the records
/// are complete: its stats calls are the bench's own Redis work, which would otherwise
/// count in `redis_cpu_us_per_item` once per poll.
pub(crate) async fn left_to_run(
    store: &chime_shared::queue::redis_store::RedisStore,
    records: &[PathBuf],
    n: usize,
) -> Result<Option<u64>> {
    use chime_shared::queue::DelayStore;
    let recorded = count_lines(records)?;
    if recorded < n {
        return Ok(Some((n - recorded) as u64));
    }
    let left: u64 = store
        .stats()
        .await?
        .iter()
        .map(|s| s.pending + s.in_flight)
        .sum();
    Ok((left > 0).then_some(left))
}

/// One coordinator process and W job worker processes (handler `noop` and
/// `log`, recording every shard into `records`) on a throwaway loopback cluster.
pub(crate) struct JobCluster<'a> {
    pub(crate) redis_url: &'a str,
    pub(crate) etcd_endpoints: &'a str,
    /// Redis key prefix.
    pub(crate) prefix: &'a str,
    /// etcd key prefix.
    pub(crate) etcd_prefix: &'a str,
    /// Logs and records go here.
    pub(crate) dir: &'a Path,
    pub(crate) workers: usize,
    /// Each worker's capacity.
    pub(crate) capacity: usize,
    /// Added to the coordinator's command line.
    pub(crate) coordinator_args: &'a [String],
}

/// Starts a [`JobCluster`] and waits until every worker registered: the
/// processes, an admin client, and the workers' shard record file.
pub(crate) async fn job_cluster(
    c: &JobCluster<'_>,
) -> Result<(
    Kids,
    proto::admin_client::AdminClient<tonic::transport::Channel>,
    PathBuf,
)> {
    let exe = std::env::current_exe()?;
    let port = free_port()?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut kids = Kids(Vec::new());
    let log = std::fs::File::create(c.dir.join("coordinator.log"))?;
    kids.0.push(
        Command::new(&exe)
            .args([
                "coordinator",
                "--grpc-addr",
                &format!("127.0.0.1:{port}"),
                "--redis-url",
                c.redis_url,
            ])
            .args(["--etcd-endpoints", c.etcd_endpoints, "--prefix", c.prefix])
            // A throwaway loopback cluster: no tokens, HTTP on an ephemeral port.
            .args(["--allow-unauthenticated", "--http-addr", "127.0.0.1:0"])
            .args(c.coordinator_args)
            .env("CHIME_ETCD_PREFIX", c.etcd_prefix)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning the coordinator")?,
    );
    let records = c.dir.join("jobs.rec");
    for i in 0..c.workers {
        let log = std::fs::File::create(c.dir.join(format!("w{i}.log")))?;
        kids.0.push(
            Command::new(&exe)
                .args([
                    "worker",
                    "--no-queue",
                    "--coordinator",
                    &endpoint,
                    "--worker-id",
                    &format!("bench-w{i}"),
                ])
                .args([
                    "--handlers",
                    "noop,log",
                    "--http-addr",
                    "127.0.0.1:0",
                    "--job-record-file",
                ])
                .arg(&records)
                .env("CHIME_COORDINATOR_CAPACITY", c.capacity.to_string())
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawning a worker")?,
        );
    }
    // Wait for the coordinator and every worker.
    let mut client = None;
    for _ in 0..100 {
        if let Ok(cl) = proto::admin_client::AdminClient::connect(endpoint.clone()).await {
            client = Some(cl);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = client.context("the coordinator did not come up")?;
    let mut registered = 0;
    for _ in 0..200 {
        registered = client
            .list_workers(proto::ListWorkersRequest::default())
            .await?
            .into_inner()
            .workers
            .len();
        if registered == c.workers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if registered != c.workers {
        bail!(
            "only {registered} of {} workers registered within 20 s",
            c.workers
        );
    }
    Ok((kids, client, records))
}

/// A free loopback port (`ops::free_port`: below the ephemeral range, so no
/// outgoing connection takes it before its owner binds it).
pub(crate) fn free_port() -> Result<u16> {
    Ok(chime_shared::ops::free_port()?)
}

/// Lines in all record files.
pub(crate) fn count_lines(files: &[PathBuf]) -> Result<usize> {
    let mut n = 0;
    for f in files {
        if f.exists() {
            n += std::fs::read(f)?.iter().filter(|b| **b == b'\n').count();
        }
    }
    Ok(n)
}

/// The `p` quantile of sorted values.
pub(crate) fn quantile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Peak resident set (VmHWM) of `pid` in KiB, from /proc.
pub(crate) fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds (user + system) each Redis master has used so far, by address.
pub(crate) async fn redis_cpu(conn: &RedisConn) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for (addr, info) in conn.info_per_master("cpu").await? {
        let field = |name: &str| -> f64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        out.push((addr, field("used_cpu_user:") + field("used_cpu_sys:")));
    }
    Ok(out)
}

/// Deletes every Redis key of the benchmark's prefix.
pub(crate) async fn cleanup(conn: &RedisConn, prefix: &str) -> Result<()> {
    let mut c = conn.clone();
    for pattern in [format!("{{{prefix}:*"), format!("{prefix}:*")] {
        for k in conn.scan_match(&pattern).await? {
            let _: i64 = redis::cmd("UNLINK").arg(k).query_async(&mut c).await?;
        }
    }
    Ok(())
}

/// Keeps a run's files (and says where) or deletes them.
pub(crate) fn keep_or_remove(dir: &std::path::Path, keep: bool) {
    if keep {
        eprintln!("  files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Ends a run that used a coordinator: deletes its Redis keys (`prefix`) and etcd
/// keys (`etcd_prefix`), then its files unless kept.
pub(crate) async fn tear_down(
    redis_url: &str,
    etcd_endpoints: &str,
    prefix: &str,
    etcd_prefix: &str,
    dir: &std::path::Path,
    keep_files: bool,
) -> Result<()> {
    let etcd = chime_shared::etcd::EtcdSpec::parse(etcd_endpoints)?
        .connect()
        .await?;
    cleanup_etcd(&etcd, etcd_prefix).await?;
    let conn = RedisConn::connect(&RedisSpec::parse(redis_url)?).await?;
    cleanup(&conn, prefix).await?;
    keep_or_remove(dir, keep_files);
    Ok(())
}

/// Deletes every etcd key under `prefix` (a run's jobs and live settings).
pub(crate) async fn cleanup_etcd(client: &etcd_client::Client, prefix: &str) -> Result<()> {
    client
        .clone()
        .delete(
            prefix,
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    Ok(())
}

/// A job of group `default` firing every second on the `noop` handler.
pub(crate) fn every_second(name: String) -> proto::Job {
    proto::Job {
        name,
        group: "default".into(),
        handler: "noop".into(),
        schedule: Some(proto::Schedule {
            kind: Some(proto::schedule::Kind::Cron(proto::CronSchedule {
                expr: "* * * * * *".into(),
                time_zone: String::new(),
            })),
        }),
        ..Default::default()
    }
}
