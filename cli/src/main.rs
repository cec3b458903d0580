//! `chime`: the one binary. It owns what libraries must not: argument parsing,
//! configuration files, environment, signals, logging, and process exit codes.
//! Each subcommand lives in its own module and hands built clients and a shutdown
//! future to the library crates.

mod bench;
mod cmd_alert;
mod cmd_apply;
mod cmd_config;
mod cmd_coordinator;
mod cmd_dev;
mod cmd_job;
mod cmd_queue;
mod cmd_worker;
mod config;
mod demo;
mod handlers;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// The process's allocator, chosen by the binary (a library never picks one for its
/// users). In a burst a worker spent about a third of its time in glibc's malloc and
/// free (per-item strings, reply buffers freed on another thread than the one that
/// made them). jemalloc drains faster, lowers the cron tail and the coordinator's
/// peak with 100,000 jobs; mimalloc, also tried, did less and doubled a worker's
/// RSS (ARCHITECTURE.md, "The binary's allocator").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// chime: a distributed job scheduler (sharded cron jobs and precise delayed items).
#[derive(Debug, Parser)]
#[command(name = "chime", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process on the embedded in-memory store, with a demo.
    Dev(cmd_dev::DevArgs),
    /// Run a coordinator: fires jobs, serves workers and the admin API.
    Coordinator(cmd_coordinator::CoordinatorArgs),
    /// Run a generic worker (built-in handlers noop, log, http, sleep, fail) for
    /// delayed items and job shards.
    Worker(cmd_worker::WorkerArgs),
    /// Create, change and fire jobs.
    Job(cmd_job::JobArgs),
    /// Runs of jobs.
    Runs(cmd_job::RunsArgs),
    /// Workers connected to the coordinator.
    Workers(cmd_job::WorkersArgs),
    /// The audit log: who changed jobs, runs, live settings and dead letters.
    Audit(cmd_job::AuditArgs),
    /// Produce and inspect delayed items.
    Queue(cmd_queue::QueueArgs),
    /// Read and change live settings in etcd.
    Config(cmd_config::ConfigArgs),
    /// Alert rules in etcd: what to watch and where to say it.
    Alert(cmd_alert::AlertArgs),
    /// Make etcd hold the jobs, workflows, live settings and alert rules of files
    /// (YAML or JSON), with `--dry-run` and `--prune`.
    Apply(cmd_apply::ApplyArgs),
    /// Print every job, workflow, live setting and alert rule as YAML documents
    /// (what `chime apply` reads).
    Export(cmd_apply::ExportArgs),
    /// Benchmarks; each prints one JSON line of results on stdout.
    Bench(bench::BenchArgs),
    /// The marketing-push scenarios end to end on real processes with a fake push
    /// provider (coupon-reminder, mass-push, push-platform, segment-notify); each
    /// prints one JSON line of results and fails when an invariant does not hold.
    Demo(demo::DemoArgs),
}

/// Options every command that talks to Redis shares.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Config file (TOML); `CHIME_*` variables and these flags override it.
    #[arg(long, env = "CHIME_CONFIG")]
    pub config: Option<PathBuf>,
    /// Redis URL, or comma-separated cluster seed URLs.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Key prefix of the deployment.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Queue family.
    #[arg(long)]
    pub family: Option<String>,
    /// Number of queues N for a new family (afterwards the layout in Redis decides).
    #[arg(long)]
    pub queues: Option<u32>,
    /// etcd endpoints (comma-separated) for live settings.
    #[arg(long)]
    pub etcd_endpoints: Option<String>,
}

impl StoreArgs {
    /// Applies the flags that are set on top of file and environment values.
    pub fn apply(
        &self,
        redis: &mut config::RedisSection,
        queue: &mut config::QueueSection,
        etcd: &mut config::EtcdSection,
    ) {
        if let Some(e) = &self.etcd_endpoints {
            etcd.endpoints = e.clone();
        }
        if let Some(u) = &self.redis_url {
            redis.url = u.clone();
        }
        if let Some(p) = &self.prefix {
            queue.prefix = p.clone();
        }
        if let Some(f) = &self.family {
            queue.family = f.clone();
        }
        if let Some(n) = self.queues {
            queue.count = n;
        }
    }
}

/// Installs the global logger: text or JSON lines on stderr.
pub fn init_logging(format: &str, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().with_current_span(false).init();
    } else {
        builder.init();
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; just never drain.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// `url` with the password of its userinfo (`redis://user:secret@host`) replaced by
/// `***`, for logs and error messages: the chart passes the Redis password inside the
/// URL, and a pod's logs are readable by more people than its Secret.
pub fn redacted(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s + 3 => match u[s + 3..at].find(':') {
                Some(c) => format!("{}:***{}", &u[..s + 3 + c], &u[at..]),
                None => u.to_string(),
            },
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Connects to a store with `connect`, and while the store is unreachable
/// ([`chime_shared::Error::Unavailable`]) keeps trying (200 ms doubling to 5 s, a
/// warning each time) instead of exiting: in a Kubernetes release the stores, the
/// coordinators and the workers start in any order, and a process that exits on a
/// store that is still starting only earns a CrashLoopBackOff. A configuration error
/// (bad URL, unreadable certificate) still fails at once. SIGTERM or SIGINT while
/// waiting ends the process with status 0: nothing has started that needs a drain.
pub async fn connect_when_up<T, F, Fut>(store: &str, address: &str, mut connect: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = chime_shared::Result<T>>,
{
    let address = redacted(address);
    let mut delay = std::time::Duration::from_millis(200);
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        match connect().await {
            Ok(c) => return Ok(c),
            Err(chime_shared::Error::Unavailable(e)) => {
                tracing::warn!(store, address = %address, error = %e, retry_in_ms = delay.as_millis() as u64,
                    "store not reachable yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut stop => {
                        tracing::info!(store, "stopped while waiting for the store");
                        std::process::exit(0);
                    }
                }
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {store} at {address}")),
        }
    }
}

fn main() -> std::process::ExitCode {
    // One TLS crypto provider for every client and listener in the process.
    chime_shared::tls::install_provider();
    // The metrics recorder before anything registers a metric: handles taken
    // earlier would stay no-ops.
    chime_shared::ops::metrics();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chime: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: Result<()> = runtime.block_on(async move {
        match cli.command {
            Command::Dev(a) => cmd_dev::run(a).await,
            Command::Coordinator(a) => cmd_coordinator::run(a).await,
            Command::Worker(a) => cmd_worker::run(a).await,
            Command::Job(a) => cmd_job::run_job(a).await,
            Command::Runs(a) => cmd_job::run_runs(a).await,
            Command::Workers(a) => cmd_job::run_workers(a).await,
            Command::Audit(a) => cmd_job::run_audit(a).await,
            Command::Queue(a) => cmd_queue::run(a).await,
            Command::Config(a) => cmd_config::run(a).await,
            Command::Alert(a) => cmd_alert::run(a).await,
            Command::Apply(a) => cmd_apply::apply(a).await,
            Command::Export(a) => cmd_apply::export(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Demo(a) => demo::run(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chime: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn a_url_password_never_reaches_a_log_line() {
        assert_eq!(
            redacted("redis://:try-it-out@chime-redis:6379/0"),
            "redis://:***@chime-redis:6379/0"
        );
        assert_eq!(
            redacted("rediss://chime:s3cr@t@r1:6380,rediss://chime:s3cr@t@r2:6380"),
            "rediss://chime:***@r1:6380,rediss://chime:***@r2:6380"
        );
        // Nothing to hide: unchanged (a user without a password, no userinfo at all).
        assert_eq!(redacted("redis://chime@r:6379"), "redis://chime@r:6379");
        assert_eq!(redacted("http://etcd:2379"), "http://etcd:2379");
    }
}
