//! `chime bench chaos`: a fault soak. C coordinators, W workers, J jobs firing every
//! second in S shards and a steady stream of delayed items run for `--minutes` while
//! a seeded random schedule of faults hits the cluster, one at a time, each healed
//! before the next:
//!
//! - a worker or a coordinator killed (`kill -9`) or stopped (SIGTERM), down a while,
//!   then started again; or frozen (SIGSTOP) a while, then thawed (SIGCONT);
//! - Redis killed (`kill -9`) or stopped (SIGTERM) and started again on its AOF, the
//!   next `appendfsync` mode each time (`always`, `everysec`, `no` in turn);
//! - etcd killed and started again on its data;
//! - one coordinator cut off from etcd or from Redis (a [`FaultProxy`] between it and
//!   the store stops every byte, as a partition does).
//!
//! Faults come in rounds of every kind once, in a seeded order; a coordinator fault
//! hits the leader half the time.
//!
//! The bench owns its Redis and etcd (processes on free loopback ports, files in its
//! directory) because it restarts them. Coordinators reach the stores through their
//! own proxies, workers directly. Invariants come from independent records — what
//! the handlers wrote — checked once every fault has healed: no job shard ran twice,
//! none ran before its instant, every shard of every tick ran or its run is reported
//! skipped or failed (never silently missing), no item ran before its due time, no
//! item acknowledged to the producer is lost (except inside Redis's durability window
//! of the mode in force at a Redis crash). Item duplicates are counted, not failed:
//! delivery is at least once (a frozen worker's items go to another after the
//! visibility timeout). The same seed gives the same faults at the same offsets (the
//! processes' own timing still varies).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chime_shared::clock::system_now_ms;
use chime_shared::queue::QueueLayout;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use proto as pb;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::failover::{Procs, Stores, leader, reported_runs, spawn};
use super::proxy::FaultProxy;
use super::rolling::{
    Produced, create_sharded_jobs, produce, read_job_records, terminate, worker_args,
};
use super::{free_port, quantile};

/// `chime bench chaos` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct ChaosArgs {
    /// How long faults are injected, minutes (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seed of the fault schedule (default: from the clock); printed either way.
    #[arg(long)]
    seed: Option<u64>,
    /// Coordinator processes.
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Jobs, each firing every second.
    #[arg(long, default_value_t = 20)]
    jobs: usize,
    /// Shards of each fire (sharding broadcast over the live workers).
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Delayed items enqueued a second.
    #[arg(long, default_value_t = 200)]
    item_rate: u32,
    /// Queues N of the items.
    #[arg(long, default_value_t = 4)]
    queues: u32,
    /// Mean time from one fault's heal to the next fault, ms (drawn from half to
    /// one and a half times this).
    #[arg(long, default_value_t = 6_000)]
    gap_ms: u64,
    /// Longest a fault lasts, ms (each lasts 1 s to this; longer than the election
    /// TTL lets a frozen or cut-off leader be deposed).
    #[arg(long, default_value_t = 8_000)]
    max_fault_ms: u64,
    /// Leader lease TTL, seconds.
    #[arg(long, default_value_t = 5)]
    election_ttl_s: u64,
    /// `redis-server` binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// `etcd` binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Keep the files (their directory is printed; always kept when an invariant
    /// fails).
    #[arg(long)]
    keep_files: bool,
}

/// The faults. Each is injected, lasts a while, and is healed before the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    WorkerKill,
    WorkerTerm,
    WorkerFreeze,
    CoordinatorKill,
    CoordinatorTerm,
    CoordinatorFreeze,
    RedisKill,
    RedisTerm,
    EtcdKill,
    CutFromEtcd,
    CutFromRedis,
}

impl Fault {
    const ALL: [Fault; 11] = [
        Fault::WorkerKill,
        Fault::WorkerTerm,
        Fault::WorkerFreeze,
        Fault::CoordinatorKill,
        Fault::CoordinatorTerm,
        Fault::CoordinatorFreeze,
        Fault::RedisKill,
        Fault::RedisTerm,
        Fault::EtcdKill,
        Fault::CutFromEtcd,
        Fault::CutFromRedis,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::WorkerKill => "worker-kill9",
            Fault::WorkerTerm => "worker-sigterm",
            Fault::WorkerFreeze => "worker-sigstop",
            Fault::CoordinatorKill => "coordinator-kill9",
            Fault::CoordinatorTerm => "coordinator-sigterm",
            Fault::CoordinatorFreeze => "coordinator-sigstop",
            Fault::RedisKill => "redis-kill9",
            Fault::RedisTerm => "redis-sigterm",
            Fault::EtcdKill => "etcd-kill9",
            Fault::CutFromEtcd => "coordinator-cut-from-etcd",
            Fault::CutFromRedis => "coordinator-cut-from-redis",
        }
    }
}

/// Redis's `appendfsync` modes, in the order successive Redis starts use them.
const FSYNC_MODES: [&str; 3] = ["everysec", "always", "no"];

/// How long before a Redis process crash an acknowledged write may still be lost,
/// by `appendfsync` mode, ms. Redis writes the AOF buffer to the file before it
/// replies, so a process crash (the page cache survives) loses nothing — except
/// under `everysec`, where Redis postpones that write (and still replies) for up to
/// 2 s while a background fsync is slow. A machine crash loses more (see README).
fn crash_window_ms(mode: &str) -> i64 {
    if mode == "everysec" { 2_000 } else { 0 }
}

/// Redis and etcd as processes of this bench, restartable on the same ports and
/// data.
struct Servers {
    dir: PathBuf,
    redis_bin: PathBuf,
    etcd_bin: PathBuf,
    redis_port: u16,
    etcd_port: u16,
    etcd_peer_port: u16,
    redis: Option<Child>,
    etcd: Option<Child>,
    /// Redis starts so far; the running one uses `FSYNC_MODES[(starts - 1) % 3]`.
    redis_starts: usize,
    etcd_starts: usize,
}

impl Servers {
    fn redis_mode(&self) -> &'static str {
        FSYNC_MODES[(self.redis_starts.max(1) - 1) % FSYNC_MODES.len()]
    }

    /// Starts Redis (again) on its port and AOF, in the next fsync mode, and waits
    /// until it answers PING (it loads the AOF first).
    async fn start_redis(&mut self) -> Result<()> {
        self.redis_starts += 1;
        let data = self.dir.join("redis");
        std::fs::create_dir_all(&data)?;
        let args: Vec<String> = [
            "--port",
            &self.redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            self.redis_mode(),
            "--dir",
            &data.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.redis = Some(spawn(
            &self.redis_bin,
            &self.dir,
            &format!("redis-{}", self.redis_starts),
            &args,
            &[],
        )?);
        for _ in 0..300 {
            if redis_answers(self.redis_port).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "redis-server did not answer within 30 s; see {}",
            self.dir.display()
        )
    }

    /// Starts etcd (again) on its ports and data and waits until it answers.
    async fn start_etcd(&mut self) -> Result<()> {
        self.etcd_starts += 1;
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let args: Vec<String> = [
            "--name",
            "chaos",
            "--data-dir",
            &self.dir.join("etcd").to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("chaos={peer}"),
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.etcd = Some(spawn(
            &self.etcd_bin,
            &self.dir,
            &format!("etcd-{}", self.etcd_starts),
            &args,
            &[],
        )?);
        for _ in 0..150 {
            let ok = tokio::time::timeout(Duration::from_secs(2), async {
                let mut c = etcd_client::Client::connect([client.as_str()], None).await?;
                c.get("health-probe", None).await
            })
            .await;
            if matches!(ok, Ok(Ok(_))) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "etcd did not answer within 30 s; see {}",
            self.dir.display()
        )
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in [self.redis.as_mut(), self.etcd.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Redis on `port` answers PING with PONG (not `-LOADING` while it reads its AOF).
async fn redis_answers(port: u16) -> bool {
    let ping = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok::<_, std::io::Error>(buf[..n].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Ok(true))
    )
}

/// Sends `signal` (`KILL`, `TERM`, `STOP`, `CONT`) to `pid`.
fn signal(pid: u32, signal: &str) -> Result<()> {
    Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .context("kill")?;
    Ok(())
}

/// Kills and reaps a child.
fn kill9(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// One injected fault, as printed.
struct Injected {
    at_ms: i64,
    fault: Fault,
    target: String,
    down_ms: u64,
    /// For a Redis crash: the `appendfsync` mode in force.
    fsync: Option<&'static str>,
}

/// Everything the fault loop works on.
struct Cluster {
    p: Procs,
    servers: Servers,
    /// Per coordinator: (to Redis, to etcd).
    proxies: Vec<(FaultProxy, FaultProxy)>,
    records: PathBuf,
    item_files: Vec<PathBuf>,
    /// Per worker slot, the processes started so far (a new worker id each time).
    generations: Vec<u32>,
    redis_url: String,
    queues: u32,
    /// The window's start, Unix ms (faults are printed as offsets from it).
    t0: i64,
}

impl Cluster {
    fn endpoints(&self) -> Vec<String> {
        self.p.endpoints()
    }

    /// Starts the next process of worker slot `i` (a fresh worker id and item record
    /// file, so a restart is a new member, as a new pod is).
    fn start_worker(&mut self, i: usize) -> Result<Child> {
        let generation = self.generations[i];
        self.generations[i] += 1;
        let items = self.p.dir.join(format!("items-w{i}-{generation}.rec"));
        let args = worker_args(
            &self.redis_url,
            self.queues,
            &self.p.prefix,
            &self.endpoints(),
            &format!("chaos-w{i}-{generation}"),
            &self.records,
            &items,
        );
        self.item_files.push(items);
        spawn(
            &self.p.exe,
            &self.p.dir,
            &format!("w{i}-{generation}"),
            &args,
            &[],
        )
    }

    /// The index of the leader coordinator, if one is known.
    async fn leader(&self) -> Option<usize> {
        let l = leader(&self.endpoints()).await?;
        self.p
            .coords
            .iter()
            .position(|(port, _)| l.ends_with(&format!(":{port}")))
    }

    /// Injects `fault` for `down` (on `slot` of its kind, or the leader when
    /// `lead` and one is known), heals it, and says what it did.
    async fn inject(
        &mut self,
        fault: Fault,
        lead: bool,
        slot: usize,
        down: Duration,
    ) -> Result<Injected> {
        let at_ms = system_now_ms();
        let leader = self.leader().await;
        let coordinator = match (lead, leader) {
            (true, Some(l)) => l,
            _ => slot % self.p.coords.len(),
        };
        let worker = slot % self.p.workers.len();
        let mut fsync = None;
        let target = match fault {
            Fault::WorkerKill | Fault::WorkerTerm | Fault::WorkerFreeze => format!("w{worker}"),
            Fault::RedisKill | Fault::RedisTerm => "redis".into(),
            Fault::EtcdKill => "etcd".into(),
            _ => format!(
                "coordinator {coordinator}{}",
                if leader == Some(coordinator) {
                    " (leader)"
                } else {
                    ""
                }
            ),
        };
        eprintln!(
            "  +{:>6} ms  {} on {target} for {} ms",
            at_ms - self.t0,
            fault.name(),
            down.as_millis()
        );
        match fault {
            Fault::WorkerKill | Fault::WorkerTerm => {
                let new = self.start_worker_later(worker, fault, down).await?;
                self.p.workers[worker] = new;
            }
            Fault::WorkerFreeze => {
                let pid = self.p.workers[worker].id();
                signal(pid, "STOP")?;
                tokio::time::sleep(down).await;
                signal(pid, "CONT")?;
            }
            Fault::CoordinatorKill | Fault::CoordinatorTerm => {
                if let Some(mut c) = self.p.coords[coordinator].1.take() {
                    if fault == Fault::CoordinatorKill {
                        kill9(c);
                    } else {
                        terminate(&mut c).await?;
                    }
                }
                tokio::time::sleep(down).await;
                self.p.start_coordinator(coordinator)?;
            }
            Fault::CoordinatorFreeze => {
                if let Some(c) = &self.p.coords[coordinator].1 {
                    let pid = c.id();
                    signal(pid, "STOP")?;
                    tokio::time::sleep(down).await;
                    signal(pid, "CONT")?;
                }
            }
            Fault::RedisKill | Fault::RedisTerm => {
                if let Some(mut c) = self.servers.redis.take() {
                    if fault == Fault::RedisKill {
                        fsync = Some(self.servers.redis_mode());
                        kill9(c);
                    } else {
                        terminate(&mut c).await?;
                    }
                }
                tokio::time::sleep(down).await;
                self.servers.start_redis().await?;
            }
            Fault::EtcdKill => {
                if let Some(c) = self.servers.etcd.take() {
                    kill9(c);
                }
                tokio::time::sleep(down).await;
                self.servers.start_etcd().await?;
            }
            Fault::CutFromEtcd | Fault::CutFromRedis => {
                let (to_redis, to_etcd) = &self.proxies[coordinator];
                let proxy = if fault == Fault::CutFromEtcd {
                    to_etcd
                } else {
                    to_redis
                };
                proxy.cut();
                tokio::time::sleep(down).await;
                proxy.heal();
            }
        }
        Ok(Injected {
            at_ms,
            fault,
            target,
            down_ms: down.as_millis() as u64,
            fsync,
        })
    }

    /// Stops worker `i` (`kill -9` or SIGTERM), waits `down`, starts its successor.
    async fn start_worker_later(
        &mut self,
        i: usize,
        fault: Fault,
        down: Duration,
    ) -> Result<Child> {
        let pid = self.p.workers[i].id();
        if fault == Fault::WorkerKill {
            signal(pid, "KILL")?;
            let _ = self.p.workers[i].wait();
        } else {
            terminate(&mut self.p.workers[i]).await?;
        }
        tokio::time::sleep(down).await;
        self.start_worker(i)
    }
}

/// Polls the coordinators' run history every few seconds and keeps every run's last
/// known state by fire id: the history keeps a bounded number of runs per job, so a
/// long soak reads it as it goes. A poll that fails (no leader for a moment) is
/// simply retried at the next tick.
fn poll_runs(
    endpoints: Vec<String>,
    jobs: usize,
    into: Arc<Mutex<HashMap<String, i32>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(Ok(runs)) = tokio::time::timeout(
                Duration::from_secs(10),
                reported_runs(&endpoints, "ch-", jobs),
            )
            .await
                && let Ok(mut all) = into.lock()
            {
                all.extend(runs);
            }
            tokio::time::sleep(Duration::from_secs(15)).await;
        }
    })
}

pub(crate) async fn run(a: ChaosArgs) -> Result<()> {
    if a.coordinators < 2 || a.workers == 0 || a.jobs == 0 || a.shards == 0 {
        bail!("invalid arguments: at least 2 coordinators, 1 worker, 1 job and 1 shard");
    }
    if a.minutes <= 0.0 || a.max_fault_ms < 1_000 || a.gap_ms == 0 {
        bail!("invalid arguments: --minutes > 0, --max-fault-ms ≥ 1000, --gap-ms > 0");
    }
    let seed = a.seed.unwrap_or_else(|| system_now_ms() as u64);
    let mut rng = fastrand::Rng::with_seed(seed);
    eprintln!("bench chaos: seed {seed} (replay: --seed {seed})");

    let (redis_port, etcd_port, etcd_peer_port) = (free_port()?, free_port()?, free_port()?);
    let stores = Stores {
        redis_url: format!("redis://127.0.0.1:{redis_port}"),
        etcd_endpoints: format!("http://127.0.0.1:{etcd_port}"),
        election_ttl_s: a.election_ttl_s,
    };
    let mut p = Procs::prepare("chaos", stores, a.coordinators)?;
    let redis_addr: SocketAddr = ([127, 0, 0, 1], redis_port).into();
    let etcd_addr: SocketAddr = ([127, 0, 0, 1], etcd_port).into();
    let mut proxies = Vec::new();
    for _ in 0..a.coordinators {
        proxies.push((
            FaultProxy::start(redis_addr).await?,
            FaultProxy::start(etcd_addr).await?,
        ));
    }
    p.routes = proxies
        .iter()
        .map(|(r, e)| {
            (
                format!("redis://127.0.0.1:{}", r.port),
                format!("http://127.0.0.1:{}", e.port),
            )
        })
        .collect();
    // The history must hold every run of the soak between two polls.
    p.coord_env = vec![("CHIME_COORDINATOR_HISTORY_PER_JOB".into(), "1000".into())];
    let mut servers = Servers {
        dir: p.dir.clone(),
        redis_bin: a.redis_server.clone(),
        etcd_bin: a.etcd.clone(),
        redis_port,
        etcd_port,
        etcd_peer_port,
        redis: None,
        etcd: None,
        redis_starts: 0,
        etcd_starts: 0,
    };
    servers.start_redis().await?;
    servers.start_etcd().await?;
    for i in 0..a.coordinators {
        p.start_coordinator(i)?;
    }
    let redis_url = p.stores.redis_url.clone();
    let mut c = Cluster {
        records: p.dir.join("jobs.rec"),
        p,
        servers,
        proxies,
        item_files: Vec::new(),
        generations: vec![0; a.workers],
        redis_url: redis_url.clone(),
        queues: a.queues,
        t0: 0,
    };
    for i in 0..a.workers {
        let w = c.start_worker(i)?;
        c.p.workers.push(w);
    }
    let endpoints = c.endpoints();
    let dir = c.p.dir.clone();

    let conn = RedisConn::connect(&RedisSpec::parse(&redis_url)?).await?;
    let store = Arc::new(
        RedisStore::open(conn, QueueLayout::new(&c.p.prefix, "default", a.queues)?).await?,
    );
    super::rolling::workers_registered(&endpoints, a.workers).await?;
    create_sharded_jobs(&endpoints, "ch-", a.jobs, a.shards).await?;
    let produced = Produced::new();
    let producer = tokio::spawn(produce(store.clone(), a.item_rate, produced.clone()));
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let poller = poll_runs(endpoints.clone(), a.jobs, runs.clone());
    eprintln!(
        "  {} coordinators, {} workers, {} jobs every second in {} shards, {} items/s; \
         faults for {} min; files in {}",
        a.coordinators,
        a.workers,
        a.jobs,
        a.shards,
        a.item_rate,
        a.minutes,
        dir.display()
    );

    // The window of ticks starts at the second after the next.
    let start = (system_now_ms() / 1000 + 2) * 1000;
    c.t0 = start;
    let faults_end = start + (a.minutes * 60_000.0) as i64;
    let mut injected: Vec<Injected> = Vec::new();
    // Faults come in rounds, each every kind once in a seeded order: a run of
    // eleven faults or more has met every kind.
    let mut round: Vec<Fault> = Vec::new();
    loop {
        if round.is_empty() {
            round = Fault::ALL.to_vec();
            rng.shuffle(&mut round);
        }
        let fault = round.pop().unwrap_or(Fault::WorkerKill);
        let gap = rng.u64(a.gap_ms / 2..=a.gap_ms * 3 / 2);
        let (lead, slot) = (rng.bool(), rng.usize(..1_000));
        let down = Duration::from_millis(rng.u64(1_000..=a.max_fault_ms));
        tokio::time::sleep(Duration::from_millis(gap)).await;
        if system_now_ms() + down.as_millis() as i64 > faults_end {
            break;
        }
        let mut i = c.inject(fault, lead, slot, down).await?;
        i.at_ms -= start;
        injected.push(i);
    }
    // Everything healed: let the cluster settle, then close the window.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let end = system_now_ms() - 3_000;

    // Items: stop producing, then wait until every item is handled (or 45 s: a
    // frozen worker's items come back after the 30 s visibility timeout).
    produced.stop.store(true, Ordering::Relaxed);
    producer.await.context("producer task")??;
    let n_items = produced.count.load(Ordering::Relaxed) as usize;
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    loop {
        let handled = super::read_records(&c.item_files)?;
        if (0..n_items).all(|i| handled.contains_key(&format!("r{i}")))
            || std::time::Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    poller.abort();
    if let Ok(last) = reported_runs(&endpoints, "ch-", a.jobs).await
        && let Ok(mut all) = runs.lock()
    {
        all.extend(last);
    }
    let runs = runs.lock().map(|r| r.clone()).unwrap_or_default();
    let item_files = c.item_files.clone();
    let records = c.records.clone();
    drop(c.p);

    // Items, from the handlers' records. A lost item is inside the durability window
    // when its batch was acknowledged within the window before a Redis crash.
    let items = super::score(&super::read_records(&item_files)?, "r", n_items);
    let acked = produced.acked.lock().map(|a| a.clone()).unwrap_or_default();
    let crashes: Vec<(i64, &str)> = injected
        .iter()
        .filter_map(|i| i.fsync.map(|m| (i.at_ms + start, m)))
        .collect();
    let handled = super::read_records(&item_files)?;
    let (mut lost_in_window, mut lost_outside) = (0usize, 0usize);
    for i in 0..n_items as u64 {
        if handled.contains_key(&format!("r{i}")) {
            continue;
        }
        let at = acked
            .iter()
            .take_while(|(first, _)| *first <= i)
            .last()
            .map_or(0, |(_, t)| *t);
        if crashes
            .iter()
            .any(|(t, mode)| at <= *t && at >= t - crash_window_ms(mode))
        {
            lost_in_window += 1;
        } else {
            lost_outside += 1;
        }
    }

    // Job shards, from the workers' records; a shard that did not run must have a
    // run the history reports skipped or failed.
    let shard_runs = read_job_records(&records);
    let (mut expected, mut ran, mut skipped, mut failed, mut missed, mut dup, mut early) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut lags = Vec::new();
    let mut missed_ids = Vec::new();
    for j in 0..a.jobs {
        let mut t = start;
        while t < end {
            let id = format!("ch-{j}@{t}");
            let state = runs.get(&id).copied();
            for s in 0..a.shards {
                expected += 1;
                match shard_runs.get(&(id.clone(), s)) {
                    Some((n, lag)) => {
                        ran += 1;
                        dup += u64::from(n - 1);
                        early += u64::from(*lag < 0);
                        lags.push(*lag);
                    }
                    None if state == Some(pb::RunState::Skipped as i32) => skipped += 1,
                    None if [
                        pb::RunState::Failed as i32,
                        pb::RunState::TimedOut as i32,
                        pb::RunState::Cancelled as i32,
                    ]
                    .map(Some)
                    .contains(&state) =>
                    {
                        failed += 1
                    }
                    None => {
                        missed += 1;
                        if missed_ids.len() < 10 {
                            missed_ids.push(format!("{id}#{s}"));
                        }
                    }
                }
            }
            t += 1_000;
        }
    }
    lags.sort_unstable();

    let mut broken = Vec::new();
    for (what, n) in [
        ("job shards ran twice", dup),
        ("job shards ran before their instant", early),
        (
            "job shards neither ran nor were reported skipped or failed",
            missed,
        ),
        ("items ran before their due time", items.early as u64),
        (
            "items lost outside Redis's durability window",
            lost_outside as u64,
        ),
    ] {
        if n > 0 {
            broken.push(format!("{n} {what}"));
        }
    }
    let mut by_kind: HashMap<&str, usize> = HashMap::new();
    for i in &injected {
        *by_kind.entry(i.fault.name()).or_default() += 1;
    }
    let mut crashes_by_mode: HashMap<&str, usize> = HashMap::new();
    for (_, m) in &crashes {
        *crashes_by_mode.entry(m).or_default() += 1;
    }
    eprintln!("  faults injected ({}):", injected.len());
    for i in &injected {
        eprintln!(
            "    +{:>6} ms  {:<28} {:<24} {:>5} ms{}",
            i.at_ms,
            i.fault.name(),
            i.target,
            i.down_ms,
            i.fsync
                .map(|m| format!(" (appendfsync {m})"))
                .unwrap_or_default()
        );
    }
    println!(
        "{}",
        json!({
            "bench": "chaos",
            "seed": seed,
            "minutes": a.minutes,
            "coordinators": a.coordinators,
            "workers": a.workers,
            "jobs": a.jobs,
            "shards": a.shards,
            "item_rate_per_s": a.item_rate,
            "queues": a.queues,
            "gap_ms": a.gap_ms,
            "max_fault_ms": a.max_fault_ms,
            "election_ttl_s": a.election_ttl_s,
            "faults_injected": injected.len(),
            "faults": by_kind,
            "redis_crashes_by_appendfsync": crashes_by_mode,
            "shards_expected": expected,
            "ran": ran,
            "skipped_reported": skipped,
            "failed_reported": failed,
            "missed": missed,
            "missed_first": missed_ids,
            "duplicates": dup,
            "early": early,
            "fire_lag_p50_ms": quantile(&lags, 0.5),
            "fire_lag_p99_ms": quantile(&lags, 0.99),
            "worst_fire_lag_ms": lags.last().copied().unwrap_or(0),
            "items": n_items,
            "items_lost": items.lost,
            "items_lost_in_durability_window": lost_in_window,
            "items_duplicates": items.duplicates,
            "items_early": items.early,
            "item_lag_p50_ms": quantile(&items.lags, 0.5),
            "item_lag_p99_ms": quantile(&items.lags, 0.99),
            "worst_item_lag_ms": items.lags.last().copied().unwrap_or(0),
            "invariants_held": broken.is_empty(),
        })
    );
    // The servers are this bench's own: their data goes with its directory.
    drop(c.servers);
    drop(c.proxies);
    super::keep_or_remove(&dir, a.keep_files || !broken.is_empty());
    if !broken.is_empty() {
        // Which shards, and what the history said of their runs: stdout (the
        // JSON) is not what a failing test prints.
        let missed_states: Vec<String> = missed_ids
            .iter()
            .map(|id| {
                let run = id.split('#').next().unwrap_or(id);
                let state = runs
                    .get(run)
                    .and_then(|s| pb::RunState::try_from(*s).ok())
                    .map_or("no run in the history".to_owned(), |s| {
                        s.as_str_name().to_owned()
                    });
                format!("{id} ({state})")
            })
            .collect();
        bail!(
            "invariants failed: {}; missed (first 10): [{}]; replay with --seed {seed} (files in {})",
            broken.join(", "),
            missed_states.join(", "),
            dir.display()
        );
    }
    Ok(())
}
