//! `chime bench failover`: C coordinator processes electing a leader, W workers, J
//! jobs firing every second; the leader is `kill -9`ed every interval (and started
//! again as a follower). Reports how long each failover took (kill → the first
//! handler start of a tick scheduled after the kill), duplicate executions, and
//! every tick of the window as fired (a worker's record file says it ran),
//! reported skipped (the run history says so: under the default `fire-once`
//! misfire policy the ticks a failover missed but the latest), or missed (neither:
//! must be 0). Workers register with a capacity of J, so capacity never delays a
//! fire here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chime_shared::clock::system_now_ms;
use proto as pb;
use serde_json::json;

use super::quantile;

/// `chime bench failover` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct FailoverArgs {
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// etcd endpoints.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: String,
    /// Coordinator processes.
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Leader kills.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Jobs, each firing every second.
    #[arg(long, default_value_t = 100)]
    jobs: usize,
    /// Jobs defined besides, which do not fire during the run (yearly crons, each
    /// on an expression of its own): a leader holds, loads and adopts them all (e.g.
    /// 100000).
    #[arg(long, default_value_t = 0)]
    idle_jobs: usize,
    /// Time between kills, ms.
    #[arg(long, default_value_t = 20_000)]
    interval_ms: u64,
    /// Leader lease TTL, seconds.
    #[arg(long, default_value_t = 5)]
    election_ttl_s: u64,
    /// Keep the files (their directory is printed).
    #[arg(long)]
    keep_files: bool,
}

/// Where a benchmark's coordinators keep their state.
pub(super) struct Stores {
    pub(super) redis_url: String,
    pub(super) etcd_endpoints: String,
    pub(super) election_ttl_s: u64,
}

/// A benchmark's processes: coordinators on fixed loopback ports (restartable),
/// workers, all killed on drop; keys under a fresh prefix, files in `dir`.
pub(super) struct Procs {
    pub(super) exe: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) coords: Vec<(u16, Option<Child>)>,
    pub(super) workers: Vec<Child>,
    pub(super) spawned: usize,
    pub(super) stores: Stores,
    pub(super) prefix: String,
    pub(super) etcd_prefix: String,
    /// Per coordinator, the Redis URL and etcd endpoints it uses instead of the
    /// stores' own (`bench chaos` puts a fault proxy there); empty: the stores'.
    pub(super) routes: Vec<(String, String)>,
    /// Environment added to every coordinator.
    pub(super) coord_env: Vec<(String, String)>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self
            .coords
            .iter_mut()
            .filter_map(|c| c.1.as_mut())
            .chain(self.workers.iter_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(super) fn spawn(
    exe: &Path,
    dir: &Path,
    name: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("RUST_LOG", "warn,chime_coordinator=info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().with_context(|| format!("spawning {name}"))
}

impl Procs {
    /// Starts `n` coordinators on free loopback ports, under a fresh key prefix;
    /// files go to a temporary directory named after `bench`.
    pub(super) fn coordinators(bench: &str, stores: Stores, n: usize) -> Result<Self> {
        let mut p = Self::prepare(bench, stores, n)?;
        for i in 0..n {
            p.start_coordinator(i)?;
        }
        Ok(p)
    }

    /// [`coordinators`](Self::coordinators) without starting them: their ports,
    /// prefix and directory are chosen.
    pub(super) fn prepare(bench: &str, stores: Stores, n: usize) -> Result<Self> {
        let prefix = format!("bench{:08x}", fastrand::u32(..));
        let dir = std::env::temp_dir().join(format!("chime-bench-{bench}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut p = Procs {
            exe: std::env::current_exe()?,
            dir,
            coords: Vec::new(),
            workers: Vec::new(),
            spawned: 0,
            stores,
            etcd_prefix: format!("/{prefix}/"),
            prefix,
            routes: Vec::new(),
            coord_env: Vec::new(),
        };
        for _ in 0..n {
            p.coords.push((super::free_port()?, None));
        }
        Ok(p)
    }

    /// The coordinators' gRPC endpoints.
    pub(super) fn endpoints(&self) -> Vec<String> {
        self.coords
            .iter()
            .map(|(port, _)| format!("http://127.0.0.1:{port}"))
            .collect()
    }

    /// Starts coordinator `i` (again) on its port.
    pub(super) fn start_coordinator(&mut self, i: usize) -> Result<()> {
        let a = &self.stores;
        let (redis_url, etcd_endpoints) = self.routes.get(i).map_or(
            (a.redis_url.as_str(), a.etcd_endpoints.as_str()),
            |(r, e)| (r.as_str(), e.as_str()),
        );
        let (prefix, etcd_prefix) = (self.prefix.as_str(), self.etcd_prefix.as_str());
        let port = self.coords[i].0;
        self.spawned += 1;
        let args: Vec<String> = [
            "coordinator",
            "--grpc-addr",
            &format!("127.0.0.1:{port}"),
            "--redis-url",
            redis_url,
            "--etcd-endpoints",
            etcd_endpoints,
            "--prefix",
            prefix,
            "--election-ttl-s",
            &a.election_ttl_s.to_string(),
            "--heartbeat-interval-ms",
            "1000",
            // A throwaway loopback cluster: no tokens, HTTP on an ephemeral port.
            "--allow-unauthenticated",
            "--http-addr",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut env = vec![("CHIME_ETCD_PREFIX", etcd_prefix)];
        env.extend(self.coord_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = spawn(
            &self.exe,
            &self.dir,
            &format!("coordinator-{i}-{}", self.spawned),
            &args,
            &env,
        )?;
        self.coords[i].1 = Some(child);
        Ok(())
    }
}

pub(super) async fn admin(
    endpoints: &[String],
) -> Result<pb::admin_client::AdminClient<tonic::transport::Channel>> {
    for _ in 0..100 {
        for e in endpoints {
            if let Ok(c) = pb::admin_client::AdminClient::connect(e.clone()).await {
                return Ok(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no coordinator came up")
}

/// The leader's address as any live coordinator sees it.
pub(super) async fn leader(endpoints: &[String]) -> Option<String> {
    for e in endpoints {
        if let Ok(mut c) = pb::admin_client::AdminClient::connect(e.clone()).await
            && let Ok(r) = c.list_workers(pb::ListWorkersRequest::default()).await
        {
            let l = r.into_inner().leader;
            if !l.is_empty() {
                return Some(l);
            }
        }
    }
    None
}

/// Skips are what the system reports: the fire ids of the skipped runs in the
/// history of jobs `<name>0` … `<name><jobs - 1>`.
pub(super) async fn reported_skipped(
    endpoints: &[String],
    name: &str,
    jobs: usize,
) -> Result<HashSet<String>> {
    Ok(reported_runs(endpoints, name, jobs)
        .await?
        .into_iter()
        .filter(|(_, state)| *state == pb::RunState::Skipped as i32)
        .map(|(fire, _)| fire)
        .collect())
}

/// The state of every run in the history of jobs `<name>0` … `<name><jobs - 1>`, by
/// fire id (the newest 1,000 of each job).
pub(super) async fn reported_runs(
    endpoints: &[String],
    name: &str,
    jobs: usize,
) -> Result<HashMap<String, i32>> {
    let mut client = admin(endpoints).await?;
    let mut out = HashMap::new();
    for i in 0..jobs {
        let runs = client
            .list_runs(pb::ListRunsRequest {
                job: format!("{name}{i}"),
                limit: 1_000,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?
            .into_inner()
            .runs;
        out.extend(runs.into_iter().map(|r| (r.fire_id, r.state)));
    }
    Ok(out)
}

pub(crate) async fn run(a: FailoverArgs) -> Result<()> {
    if a.coordinators < 2 || a.workers == 0 || a.jobs == 0 {
        bail!("invalid arguments: at least 2 coordinators, 1 worker and 1 job");
    }
    let stores = Stores {
        redis_url: a.redis_url.clone(),
        etcd_endpoints: a.etcd_endpoints.clone(),
        election_ttl_s: a.election_ttl_s,
    };
    let mut p = Procs::coordinators("failover", stores, a.coordinators)?;
    let (dir, prefix, etcd_prefix) = (p.dir.clone(), p.prefix.clone(), p.etcd_prefix.clone());
    let endpoints = p.endpoints();
    let records = dir.join("jobs.rec");
    for i in 0..a.workers {
        let args: Vec<String> = [
            "worker",
            "--no-queue",
            "--coordinator",
            &endpoints.join(","),
            "--worker-id",
            &format!("bench-w{i}"),
            "--handlers",
            "noop",
            "--http-addr",
            "127.0.0.1:0",
            "--job-record-file",
            &records.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let capacity = a.jobs.to_string();
        p.workers.push(spawn(
            &p.exe,
            &dir,
            &format!("w{i}"),
            &args,
            &[("CHIME_COORDINATOR_CAPACITY", &capacity)],
        )?);
    }
    let mut client = admin(&endpoints).await?;
    for _ in 0..300 {
        if let Ok(r) = client.list_workers(pb::ListWorkersRequest::default()).await
            && r.into_inner().workers.len() == a.workers
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "bench failover: {} coordinators, {} workers, {} jobs every second, {} kills",
        a.coordinators, a.workers, a.jobs, a.kills
    );
    for i in 0..a.jobs {
        let job = super::every_second(format!("fo-{i}"));
        client
            .create_job(pb::CreateJobRequest { job: Some(job) })
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    }
    // In batches of 100 (one etcd transaction each). Each idle job has an
    // expression of its own, once a year (a second of a day of a month about six
    // months from now: never during a run): the coordinator's worst case, as jobs
    // on one expression share its parse.
    let creating = std::time::Instant::now();
    let month_now = ((system_now_ms() / 86_400_000) as f64 % 365.2425 / 30.437) as usize + 1;
    let month = (month_now + 5) % 12 + 1;
    for first in (0..a.idle_jobs).step_by(100) {
        let jobs = (first..(first + 100).min(a.idle_jobs))
            .map(|i| {
                let mut j = super::every_second(format!("idle-{i}"));
                if let Some(pb::schedule::Kind::Cron(c)) =
                    j.schedule.as_mut().and_then(|s| s.kind.as_mut())
                {
                    c.expr = format!(
                        "{} {} {} {} {month} *",
                        i % 60,
                        i / 60 % 60,
                        i / 3600 % 24,
                        1 + i / 86_400 % 28
                    );
                }
                j
            })
            .collect();
        client
            .create_jobs(pb::CreateJobsRequest { jobs })
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        if (first + 100).is_multiple_of(10_000) {
            eprintln!("  created {} idle jobs", first + 100);
        }
    }
    let idle_jobs_per_s = a.idle_jobs as f64 / creating.elapsed().as_secs_f64().max(1e-3);
    let start = (system_now_ms() / 1000 + 2) * 1000;
    let mut kills = Vec::new();
    for k in 0..a.kills {
        let at = start + (k as i64 + 1) * a.interval_ms as i64;
        tokio::time::sleep(Duration::from_millis((at - system_now_ms()).max(0) as u64)).await;
        let Some(l) = leader(&endpoints).await else {
            eprintln!("  no leader known at kill {k}; skipping it");
            continue;
        };
        let Some(i) = p
            .coords
            .iter()
            .position(|(port, _)| l.ends_with(&format!(":{port}")))
        else {
            continue;
        };
        let t = system_now_ms();
        if let Some(mut c) = p.coords[i].1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        eprintln!("  killed the leader {l} (kill {})", k + 1);
        kills.push(t);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        p.start_coordinator(i)?;
    }
    tokio::time::sleep(Duration::from_millis(a.interval_ms / 2)).await;
    let end = system_now_ms() - 3_000;

    // Fires are what the workers did (independent of the system's own history):
    // each line of the record file is one finished shard. A tick of the window is
    // fired if a worker ran it, skipped if the history reports it skipped, and
    // missed otherwise. Each (run, shard) must have run at most once. A tick the
    // last killed leader recorded and never sent goes out only after the next
    // leader's adoption grace: the count waits until no tick is missing, or 30 s.
    let deadline = system_now_ms() + 30_000;
    let count = loop {
        let skipped = reported_skipped(&endpoints, "fo-", a.jobs).await?;
        let count = Count::of(&records, &skipped, a.jobs, start, end);
        if count.missed == 0 || system_now_ms() > deadline {
            break count;
        }
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    };
    // Peak RSS of each coordinator process still running (a restarted one since
    // its restart; the last leader has loaded every job at least once).
    let coordinator_hwm_mib: Vec<f64> = p
        .coords
        .iter()
        .filter_map(|(_, c)| c.as_ref().and_then(|c| super::vm_hwm_kib(c.id())))
        .map(|k| (k as f64 / 1024.0 * 10.0).round() / 10.0)
        .collect();
    drop(p);
    // Failover: kill -> the first handler start of a tick scheduled after the kill
    // (a shard of an earlier tick says nothing about the new leader firing).
    let mut failovers: Vec<i64> = kills
        .iter()
        .filter_map(|k| {
            count
                .starts
                .iter()
                .filter(|(scheduled, _)| scheduled > k)
                .map(|(_, started)| started - k)
                .min()
        })
        .collect();
    failovers.sort_unstable();
    // The failover's two parts, from the coordinators' own logs: the kill to the
    // next `elected leader` (the old lease running out), and that election to the
    // first handler start of any tick (the new leader's start and first send).
    let elections = elections(&dir)?;
    let mut kill_to_elected_ms = Vec::new();
    let mut elected_to_first_start_ms = Vec::new();
    for k in &kills {
        let Some(e) = elections.iter().copied().find(|e| e > k) else {
            continue;
        };
        kill_to_elected_ms.push(e - k);
        if let Some(first) = count
            .starts
            .iter()
            .map(|(_, s)| *s)
            .filter(|s| *s > e)
            .min()
        {
            elected_to_first_start_ms.push(first - e);
        }
    }
    super::tear_down(
        &a.redis_url,
        &a.etcd_endpoints,
        &prefix,
        &etcd_prefix,
        &dir,
        a.keep_files,
    )
    .await?;
    println!(
        "{}",
        json!({
            "bench": "failover",
            "coordinators": a.coordinators,
            "workers": a.workers,
            "jobs": a.jobs,
            "idle_jobs": a.idle_jobs,
            "idle_job_expressions": "distinct",
            "idle_jobs_created_per_s": idle_jobs_per_s.round(),
            "coordinator_hwm_mib": coordinator_hwm_mib,
            "kills": kills.len(),
            "failover_p50_ms": quantile(&failovers, 0.5),
            "failover_max_ms": failovers.last().copied().unwrap_or(0),
            "kill_to_elected_ms": kill_to_elected_ms,
            "elected_to_first_start_ms": elected_to_first_start_ms,
            "duplicates": count.duplicates,
            "missed_unreported": count.missed,
            "fired": count.fired,
            "skipped_reported": count.skipped,
            "fired_and_reported_skipped": count.both,
            "ticks": count.fired + count.skipped + count.missed + count.both,
        })
    );
    Ok(())
}

/// When any coordinator of the run logged `elected leader` (Unix ms, sorted), from
/// the log files in `dir`: each line starts with its RFC 3339 timestamp.
fn elections(dir: &Path) -> Result<Vec<i64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_coordinator_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("coordinator-") && n.ends_with(".log"));
        if !is_coordinator_log {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            if !line.contains("elected leader") {
                continue;
            }
            let stamp = line.split_whitespace().next().unwrap_or_default();
            let at = chrono::DateTime::parse_from_rfc3339(stamp)
                .with_context(|| format!("a timestamp in {}: {stamp:?}", path.display()))?;
            out.push(at.timestamp_millis());
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The ticks of a window as the workers' record file and the history tell them.
struct Count {
    fired: usize,
    skipped: usize,
    missed: usize,
    both: usize,
    duplicates: u32,
    /// (scheduled instant, handler start) of every shard.
    starts: Vec<(i64, i64)>,
}

impl Count {
    /// Counts every tick of jobs `fo-0` … in [`start`, `end`).
    fn of(
        records: &Path,
        reported_skipped: &HashSet<String>,
        jobs: usize,
        start: i64,
        end: i64,
    ) -> Self {
        let text = std::fs::read_to_string(records).unwrap_or_default();
        let mut executions: HashMap<(String, String), u32> = HashMap::new();
        let mut executed: HashSet<String> = HashSet::new();
        let mut starts: Vec<(i64, i64)> = Vec::new();
        for l in text.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() != 10 {
                continue;
            }
            *executions
                .entry((f[1].to_owned(), f[2].to_owned()))
                .or_default() += 1;
            executed.insert(f[1].to_owned());
            if let (Ok(started), Ok(scheduled)) = (f[5].parse::<i64>(), f[9].parse::<i64>()) {
                starts.push((scheduled, started));
            }
        }
        let duplicates: u32 = executions.values().map(|n| n - 1).sum();
        let (mut fired, mut skipped, mut missed, mut both) = (0usize, 0usize, 0usize, 0usize);
        for i in 0..jobs {
            let mut t = start;
            while t < end {
                let id = format!("fo-{i}@{t}");
                match (executed.contains(&id), reported_skipped.contains(&id)) {
                    (true, false) => fired += 1,
                    (false, true) => skipped += 1,
                    (false, false) => missed += 1,
                    (true, true) => both += 1,
                }
                t += 1_000;
            }
        }
        Self {
            fired,
            skipped,
            missed,
            both,
            duplicates,
            starts,
        }
    }
}
