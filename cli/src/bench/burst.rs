//! `chime bench burst`: the coupon-reminder case. N items all due at one instant T0,
//! drained by W separate `chime worker` processes with a recording no-op handler.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, QueueLayout};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use serde_json::json;

use super::profile::RedisProfile;
use super::{Kids, Sink, Workers, cleanup, quantile, read_records, redis_cpu};

/// `chime bench burst` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct BurstArgs {
    /// Redis URL (or comma-separated cluster seeds).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Items in the burst.
    #[arg(long, default_value_t = 100_000)]
    items: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Queues N.
    #[arg(long, default_value_t = 8)]
    queues: u32,
    /// Most items per pop (the worker's default).
    #[arg(long, default_value_t = 256)]
    batch: u32,
    /// Pollers per worker (the worker's default).
    #[arg(long, default_value_t = 2)]
    pollers: usize,
    /// Most items each worker holds at once (the worker's default).
    #[arg(long, default_value_t = 2_048)]
    max_in_flight: usize,
    /// Payload size of each item, bytes (a realistic reminder).
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Time from the start of the enqueue to T0, ms (0: sized to the burst).
    #[arg(long, default_value_t = 0)]
    lead_ms: i64,
    /// Keep the workers' record files and logs (their directory is printed).
    #[arg(long)]
    keep_files: bool,
    /// Also time every script call through Redis's slow log (threshold 0 for the
    /// run, restored after it; single Redis only) and print µs per item per script.
    #[arg(long)]
    profile: bool,
    /// How the items are enqueued: `store` (this process writes to Redis, as the
    /// Rust SDK does) or `grpc` (through `chime.v1.Queue` on a coordinator this
    /// bench starts, as producers in other languages do).
    #[arg(long, value_enum, default_value_t = ProducerKind::Store)]
    producer: ProducerKind,
}

/// `--producer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProducerKind {
    /// Straight into Redis from this process.
    Store,
    /// Through a coordinator's `chime.v1.Queue` over gRPC.
    Grpc,
}

pub(crate) async fn run(a: BurstArgs) -> Result<()> {
    if a.items == 0 || a.workers == 0 {
        bail!("invalid --items/--workers: both must be at least 1");
    }
    let prefix = format!("bench{:08x}", fastrand::u32(..));
    let layout = QueueLayout::new(&prefix, "default", a.queues)?;
    let conn = RedisConn::connect(&RedisSpec::parse(&a.redis_url)?)
        .await
        .with_context(|| format!("connecting to {}", a.redis_url))?;
    let store = Arc::new(RedisStore::open(conn.clone(), layout).await?);
    let cpu_before = redis_cpu(&conn).await?;
    let profile = RedisProfile::start(&conn, a.profile).await?;
    let dir = std::env::temp_dir().join(format!("chime-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // Workers first: they idle until T0, then drain.
    let args: Vec<String> = [
        "--redis-url",
        &a.redis_url,
        "--prefix",
        &prefix,
        "--queues",
        &a.queues.to_string(),
        "--batch",
        &a.batch.to_string(),
        "--pollers",
        &a.pollers.to_string(),
        "--max-in-flight",
        &a.max_in_flight.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut workers = Workers::spawn(&dir, a.workers, &args, &[])?;

    let lead = if a.lead_ms > 0 {
        a.lead_ms
    } else {
        2_000 + (a.items as i64) / 40
    };
    let t0 = store.now_ms().await? + lead;
    let payload = bytes::Bytes::from(vec![b'x'; a.payload_bytes]);
    eprintln!(
        "bench burst: {} items due at T0 (in {lead} ms), {} workers, {} queues, prefix {prefix}",
        a.items, a.workers, a.queues
    );

    // The gRPC producer's coordinator is up before T0 is set: its start is not
    // enqueue time.
    let mut kids = Kids(Vec::new());
    let sink = match a.producer {
        ProducerKind::Store => Sink::Store(store.clone()),
        ProducerKind::Grpc => {
            let (child, endpoint) =
                super::queue_coordinator(&dir, &a.redis_url, &prefix, a.queues).await?;
            kids.0.push(child);
            Sink::Grpc(
                chime_worker::producer::Producer::connect(
                    chime_worker::producer::ProducerOptions {
                        endpoint,
                        timeout: Duration::from_secs(60),
                        ..Default::default()
                    },
                )
                .await?,
            )
        }
    };
    let t0 = t0.max(store.now_ms().await? + lead);
    let enqueue_s = super::enqueue_burst(&store, &sink, a.items, t0, "noop", payload).await?;
    drop(kids);

    // Wait for the drain: nothing pending or in flight, and every item recorded.
    let within = Duration::from_secs(60 + (a.items / 5_000) as u64);
    let peak_rss_kib = workers
        .wait_until_run(&store, a.items, within, &dir, 0)
        .await?;
    workers.stop();
    let profile = profile.finish(&conn, a.items).await?;
    // Redis CPU per master over enqueue + drain: what scaling out spreads.
    let cpu_after = redis_cpu(&conn).await?;
    let redis_cpu_s: Vec<f64> = cpu_after
        .iter()
        .map(|(addr, after)| {
            let before = cpu_before
                .iter()
                .find(|(a, _)| a == addr)
                .map_or(0.0, |b| b.1);
            ((after - before) * 100.0).round() / 100.0
        })
        .collect();

    let redis_cpu_us_per_item =
        (redis_cpu_s.iter().sum::<f64>() * 1e6 / a.items as f64 * 100.0).round() / 100.0;

    // Score.
    let handled = read_records(&workers.records)?;
    let sc = super::score(&handled, "b", a.items);
    let drain_s = ((sc.last - t0) as f64 / 1000.0).max(1e-3);
    cleanup(&conn, &prefix).await?;
    super::keep_or_remove(&dir, a.keep_files);
    let out = json!({
        "bench": "burst",
        "producer": match a.producer {
            ProducerKind::Store => "store",
            ProducerKind::Grpc => "grpc (chime.v1.Queue, one coordinator, 2,000 items per call, 8 calls in flight)",
        },
        "items": a.items,
        "workers": a.workers,
        "queues": a.queues,
        "batch": a.batch,
        "pollers": a.pollers,
        "max_in_flight": a.max_in_flight,
        "payload_bytes": a.payload_bytes,
        "enqueue_per_s": (a.items as f64 / enqueue_s).round(),
        "drain_per_s": (a.items as f64 / drain_s).round(),
        "lag_p50_ms": quantile(&sc.lags, 0.50),
        "lag_p99_ms": quantile(&sc.lags, 0.99),
        "lag_max_ms": sc.lags.last().copied().unwrap_or(0),
        "first_after_t0_ms": if sc.first == i64::MAX { 0 } else { sc.first - t0 },
        "lost": sc.lost,
        "duplicates": sc.duplicates,
        "early": sc.early,
        "worker_peak_rss_mib": (peak_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
        "redis_masters": redis_cpu_s.len(),
        "redis_cpu_s_per_master": redis_cpu_s,
        // Every master's CPU over enqueue and drain (and the bench's 10 Hz progress
        // reads), per item.
        "redis_cpu_us_per_item": redis_cpu_us_per_item,
        "redis_profile": profile,
    });
    println!("{out}");
    Ok(())
}
