//! `chime bench steady`: the everyday case. Items are enqueued at a steady rate for S
//! seconds, each due a short random delay after it is enqueued, while W `chime worker`
//! processes (default settings) run them with a recording no-op handler; lag is the
//! handler's start minus the due time, from the handlers' own records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chime_shared::clock::system_now_ms;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, NewItem, QueueLayout};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Workers, cleanup, quantile, read_records, redis_cpu};

/// `chime bench steady` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct SteadyArgs {
    /// Redis URL (or comma-separated cluster seeds).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Items enqueued per second.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// How long items are enqueued, seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Worker processes (each at the worker's default settings).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Queues N.
    #[arg(long, default_value_t = 8)]
    queues: u32,
    /// Shortest delay from enqueue to due, ms.
    #[arg(long, default_value_t = 100)]
    delay_min_ms: i64,
    /// Longest delay from enqueue to due, ms.
    #[arg(long, default_value_t = 1_000)]
    delay_max_ms: i64,
    /// Payload size of each item, bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Enqueue calls in flight at once (the producer sends one per 10 ms tick).
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Keep the workers' record files and logs (their directory is printed).
    #[arg(long)]
    keep_files: bool,
}

/// The most items in one enqueue call of the producer.
const CALL_MAX: usize = 10_000;

/// The producer's pace: one batch per tick.
const TICK: Duration = Duration::from_millis(10);

pub(crate) async fn run(a: SteadyArgs) -> Result<()> {
    if a.rate == 0 || a.seconds == 0 || a.workers == 0 || a.producers == 0 {
        bail!("invalid --rate/--seconds/--workers/--producers: each must be at least 1");
    }
    if a.delay_min_ms < 0 || a.delay_max_ms < a.delay_min_ms {
        bail!("invalid --delay-min-ms/--delay-max-ms: need 0 <= min <= max");
    }
    let prefix = format!("bench{:08x}", fastrand::u32(..));
    let layout = QueueLayout::new(&prefix, "default", a.queues)?;
    let conn = RedisConn::connect(&RedisSpec::parse(&a.redis_url)?)
        .await
        .with_context(|| format!("connecting to {}", a.redis_url))?;
    let store = Arc::new(RedisStore::open(conn.clone(), layout).await?);
    let dir = std::env::temp_dir().join(format!("chime-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let args: Vec<String> = ["--redis-url", &a.redis_url, "--prefix", &prefix]
        .iter()
        .map(|s| s.to_string())
        .chain(["--queues".into(), a.queues.to_string()])
        .collect();
    let mut workers = Workers::spawn(&dir, a.workers, &args, &[])?;
    // Workers first, and ready: a worker still starting would show as lag.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !workers
        .logs
        .iter()
        .all(|l| std::fs::read_to_string(l).is_ok_and(|t| t.contains("queue layout applied")))
    {
        workers.check(&dir)?;
        if Instant::now() > deadline {
            bail!("workers not ready within 20 s; see {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Due times are on Redis's clock, which the handlers' records are compared to
    // through this host's clock: measure the offset once.
    let offset = store.now_ms().await? - system_now_ms();
    let cpu_before = redis_cpu(&conn).await?;
    eprintln!(
        "bench steady: {} items/s for {} s, due {}–{} ms after enqueue, {} workers, {} queues, prefix {prefix}",
        a.rate, a.seconds, a.delay_min_ms, a.delay_max_ms, a.workers, a.queues
    );

    let payload = bytes::Bytes::from(vec![b'x'; a.payload_bytes]);
    let total = (a.rate * a.seconds) as usize;
    let slots = Arc::new(Semaphore::new(a.producers));
    let mut calls = JoinSet::new();
    let started = Instant::now();
    let mut sent = 0usize;
    // How far the producer fell behind its schedule at worst: a rate it cannot keep
    // is printed as such, not measured as something else.
    let mut behind_max_ms = 0u128;
    let mut next_tick = tokio::time::Instant::now();
    let mut peak_rss_kib = 0u64;
    let mut ticks = 0u64;
    while sent < total {
        let elapsed = started.elapsed();
        let target = ((elapsed.as_secs_f64() * a.rate as f64) as usize + 1).min(total);
        // A producer that fell behind catches up in calls of at most `CALL_MAX`
        // items (one call of the whole backlog was refused past the store's limit
        // of 100,000 items per call, at 150,000 items/s).
        while target > sent {
            let end = target.min(sent + CALL_MAX);
            let permit = slots.clone().acquire_owned().await?;
            behind_max_ms =
                behind_max_ms.max(started.elapsed().saturating_sub(elapsed).as_millis());
            let now = system_now_ms() + offset;
            let items: Vec<NewItem> = (sent..end)
                .map(|i| {
                    let due =
                        now + a.delay_min_ms + fastrand::i64(0..=a.delay_max_ms - a.delay_min_ms);
                    NewItem::new(format!("s{i}"), "noop", due)
                        .key(format!("u{i}"))
                        .payload(payload.clone())
                })
                .collect();
            let store = store.clone();
            calls.spawn(async move {
                let _permit = permit;
                store.enqueue(items).await
            });
            sent = end;
        }
        while let Some(done) = calls.try_join_next() {
            done??;
        }
        ticks += 1;
        if ticks.is_multiple_of(100) {
            // Once a second: a worker that died fails the run now, not at the end.
            peak_rss_kib = peak_rss_kib.max(workers.check(&dir)?);
        }
        next_tick += TICK;
        tokio::time::sleep_until(next_tick).await;
    }
    while let Some(done) = calls.join_next().await {
        done??;
    }
    let enqueue_s = started.elapsed().as_secs_f64();
    eprintln!("  enqueued {total} in {enqueue_s:.1} s; waiting for the last to run");

    let within = Duration::from_secs(60 + (total / 10_000) as u64);
    let peak_rss_kib = workers
        .wait_until_run(&store, total, within, &dir, peak_rss_kib)
        .await?;
    workers.stop();
    let cpu_after = redis_cpu(&conn).await?;
    let cpu_s: f64 =
        cpu_after.iter().map(|x| x.1).sum::<f64>() - cpu_before.iter().map(|x| x.1).sum::<f64>();

    let handled = read_records(&workers.records)?;
    let sc = super::score(&handled, "s", total);
    cleanup(&conn, &prefix).await?;
    super::keep_or_remove(&dir, a.keep_files);
    let out = json!({
        "bench": "steady",
        "rate": a.rate,
        "seconds": a.seconds,
        "workers": a.workers,
        "queues": a.queues,
        "delay_min_ms": a.delay_min_ms,
        "delay_max_ms": a.delay_max_ms,
        "payload_bytes": a.payload_bytes,
        "producers": a.producers,
        "items": total,
        "enqueued_per_s": (total as f64 / enqueue_s).round(),
        "producer_behind_max_ms": behind_max_ms,
        "lag_p50_ms": quantile(&sc.lags, 0.50),
        "lag_p99_ms": quantile(&sc.lags, 0.99),
        "lag_p999_ms": quantile(&sc.lags, 0.999),
        "lag_max_ms": sc.lags.last().copied().unwrap_or(0),
        "lost": sc.lost,
        "duplicates": sc.duplicates,
        "early": sc.early,
        "worker_peak_rss_mib": (peak_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
        "redis_cpu_us_per_item": (cpu_s * 1e6 / total as f64 * 100.0).round() / 100.0,
    });
    println!("{out}");
    Ok(())
}
