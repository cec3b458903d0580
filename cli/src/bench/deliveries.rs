//! `chime bench deliveries`: `bench burst` through the delivery service. N items due
//! at one instant; each of S subscribers is an SDK process (the SDK's conformance
//! agent in `bench` mode) with its own `chime worker` doing the queue work, as in a
//! sidecar deployment. Items are counted from what the subscribers' handlers wrote,
//! not from chime's own counters.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, QueueLayout};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use serde_json::json;

use super::{Workers, cleanup, quantile, read_records, redis_cpu, vm_hwm_kib};

/// Which SDK subscribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SdkKind {
    /// The Rust SDK (`chime-sdk-agent`, built by `cargo build --release -p chime-tests`).
    Rust,
    /// The Python SDK (`sdk/python/conformance/agent.py`).
    Python,
    /// The TypeScript SDK (`sdk/node/conformance/agent`, which builds it first).
    Node,
    /// The Go SDK (`sdk/go/conformance/agent`, which builds it first).
    Go,
    /// The Java SDK (`sdk/java/conformance/agent`, which builds it first).
    Java,
}

/// `chime bench deliveries` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct DeliveriesArgs {
    /// The SDK under test.
    #[arg(long, value_enum)]
    sdk: SdkKind,
    /// Redis URL (or comma-separated cluster seeds).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Items in the burst.
    #[arg(long, default_value_t = 100_000)]
    items: usize,
    /// Subscriber processes, each with its own chime worker.
    #[arg(long, default_value_t = 2)]
    subscribers: usize,
    /// Queues N.
    #[arg(long, default_value_t = 8)]
    queues: u32,
    /// Credit of each subscriber (deliveries held at once).
    #[arg(long, default_value_t = 1_024)]
    credit: u32,
    /// Payload size of each item, bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Time from the start of the enqueue to T0, ms (0: sized to the burst).
    #[arg(long, default_value_t = 0)]
    lead_ms: i64,
    /// The Rust agent (default: `chime-sdk-agent` next to this binary).
    #[arg(long)]
    rust_agent: Option<PathBuf>,
    /// The Python interpreter with `chime-sdk` installed.
    #[arg(long, default_value = "python3")]
    python: String,
    /// The Python agent script.
    #[arg(long, default_value = "sdk/python/conformance/agent.py")]
    python_agent: PathBuf,
    /// The checkout holding `sdk/<node|go|java>/conformance/agent`.
    #[arg(long, default_value = ".")]
    sdk_root: PathBuf,
    /// Keep the processes' record files and logs (their directory is printed).
    #[arg(long)]
    keep_files: bool,
}

/// The subscriber command for `sdk`.
fn agent(a: &DeliveriesArgs) -> Result<Command> {
    Ok(match a.sdk {
        SdkKind::Rust => {
            let bin = match &a.rust_agent {
                Some(p) => p.clone(),
                None => std::env::current_exe()?
                    .parent()
                    .context("binary dir")?
                    .join("chime-sdk-agent"),
            };
            if !bin.is_file() {
                bail!(
                    "invalid --rust-agent: {} is missing (cargo build --release -p chime-tests --bin chime-sdk-agent)",
                    bin.display()
                );
            }
            Command::new(bin)
        }
        SdkKind::Python => {
            if !a.python_agent.is_file() {
                bail!(
                    "invalid --python-agent: {} is missing (run from the repository root)",
                    a.python_agent.display()
                );
            }
            let mut c = Command::new(&a.python);
            c.arg(&a.python_agent);
            c
        }
        SdkKind::Node | SdkKind::Go | SdkKind::Java => {
            // The SDK's directory is its name as printed in the result (`sdk`).
            let name = format!("{:?}", a.sdk).to_lowercase();
            let script = a.sdk_root.join(format!("sdk/{name}/conformance/agent"));
            if !script.is_file() {
                bail!(
                    "invalid --sdk-root: {} is missing (run from the repository root)",
                    script.display()
                );
            }
            // Build once up front, so the build's time is not counted in the burst.
            let st = Command::new(&script).arg("build").status()?;
            if !st.success() {
                bail!("{} build failed ({st})", script.display());
            }
            Command::new(script)
        }
    })
}

pub(crate) async fn run(a: DeliveriesArgs) -> Result<()> {
    if a.items == 0 || a.subscribers == 0 {
        bail!("invalid --items/--subscribers: both must be at least 1");
    }
    let prefix = format!("bench{:08x}", fastrand::u32(..));
    let layout = QueueLayout::new(&prefix, "default", a.queues)?;
    let conn = RedisConn::connect(&RedisSpec::parse(&a.redis_url)?)
        .await
        .with_context(|| format!("connecting to {}", a.redis_url))?;
    let store = Arc::new(RedisStore::open(conn.clone(), layout).await?);
    let cpu_before = redis_cpu(&conn).await?;
    let dir = std::env::temp_dir().join(format!("chime-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // One chime worker per subscriber (a sidecar each), at its default settings.
    let exe = std::env::current_exe()?;
    let mut cmds = Vec::new();
    let mut records = Vec::new();
    let mut worker_count = 0;
    for i in 0..a.subscribers {
        let port = super::free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut w = Command::new(&exe);
        w.arg("worker")
            .args(["--http-addr", "127.0.0.1:0", "--redis-url", &a.redis_url])
            .args(["--prefix", &prefix, "--queues", &a.queues.to_string()])
            .args(["--handlers", "none", "--worker-id", &format!("bench-w{i}")])
            .args(["--deliveries-addr", &format!("127.0.0.1:{port}")])
            .arg("--deliveries-allow-unauthenticated")
            .env("RUST_LOG", "warn,chime_worker::delivery=info");
        cmds.push((format!("w{i}"), w));
        worker_count += 1;
        let rec = dir.join(format!("s{i}.rec"));
        let mut s = agent(&a)?;
        s.args(["bench", "--deliveries", &url, "--record"])
            .arg(&rec)
            .args(["--credit", &a.credit.to_string(), "--handler", "bench"])
            .env("RUST_LOG", "warn");
        cmds.push((format!("s{i}"), s));
        records.push(rec);
    }
    let mut procs = Workers::start(&dir, cmds, records)?;

    // Every subscriber is in before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        procs.check(&dir)?;
        let joined = (0..worker_count)
            .filter(|i| {
                std::fs::read_to_string(dir.join(format!("w{i}.log")))
                    .is_ok_and(|l| l.contains("subscriber joined"))
            })
            .count();
        if joined == worker_count {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "subscribers did not join within 60 s; see {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let lead = if a.lead_ms > 0 {
        a.lead_ms
    } else {
        2_000 + (a.items as i64) / 40
    };
    let t0 = store.now_ms().await? + lead;
    eprintln!(
        "bench deliveries: {} items due at T0 (in {lead} ms), {} {:?} subscribers (credit {}), prefix {prefix}",
        a.items, a.subscribers, a.sdk, a.credit
    );
    let payload = bytes::Bytes::from(vec![b'x'; a.payload_bytes]);
    let enqueue_s = super::enqueue_burst(
        &store,
        &super::Sink::Store(store.clone()),
        a.items,
        t0,
        "bench",
        payload,
    )
    .await?;

    let deadline = Instant::now() + Duration::from_secs(60 + (a.items / 2_000) as u64);
    let (mut worker_rss, mut subscriber_rss) = (0u64, 0u64);
    loop {
        procs.check(&dir)?;
        for (i, pid) in procs.pids().into_iter().enumerate() {
            let rss = vm_hwm_kib(pid).unwrap_or(0);
            // Commands alternate: chime worker, subscriber.
            if i % 2 == 0 {
                worker_rss = worker_rss.max(rss);
            } else {
                subscriber_rss = subscriber_rss.max(rss);
            }
        }
        let Some(left) = super::left_to_run(&store, &procs.records, a.items).await? else {
            break;
        };
        if Instant::now() > deadline {
            bail!(
                "burst not drained in time: {left} items left; see {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    procs.stop();
    let cpu_after = redis_cpu(&conn).await?;
    let redis_cpu_s: f64 = cpu_after
        .iter()
        .map(|(addr, after)| {
            after
                - cpu_before
                    .iter()
                    .find(|(a, _)| a == addr)
                    .map_or(0.0, |b| b.1)
        })
        .sum();

    let sc = super::score(&read_records(&procs.records)?, "b", a.items);
    let drain_s = ((sc.last - t0) as f64 / 1000.0).max(1e-3);
    cleanup(&conn, &prefix).await?;
    super::keep_or_remove(&dir, a.keep_files);
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    let out = json!({
        "bench": "deliveries",
        "sdk": format!("{:?}", a.sdk).to_lowercase(),
        "items": a.items,
        "subscribers": a.subscribers,
        "queues": a.queues,
        "credit": a.credit,
        "payload_bytes": a.payload_bytes,
        "worker_settings": "defaults (batch 256, max_in_flight 2048, pollers 2)",
        "enqueue_per_s": (a.items as f64 / enqueue_s).round(),
        "drain_per_s": (a.items as f64 / drain_s).round(),
        "lag_p50_ms": quantile(&sc.lags, 0.50),
        "lag_p99_ms": quantile(&sc.lags, 0.99),
        "lag_max_ms": sc.lags.last().copied().unwrap_or(0),
        "first_after_t0_ms": if sc.first == i64::MAX { 0 } else { sc.first - t0 },
        "lost": sc.lost,
        "duplicates": sc.duplicates,
        "early": sc.early,
        "worker_peak_rss_mib": mib(worker_rss),
        "subscriber_peak_rss_mib": mib(subscriber_rss),
        "redis_cpu_s": (redis_cpu_s * 100.0).round() / 100.0,
    });
    println!("{out}");
    Ok(())
}
