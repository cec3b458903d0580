//! `chime bench resize`: items enqueued continuously, with due times spread over the
//! run, while the queue count changes in etcd; W `chime worker` processes consume.
//! Counts every item (lost, doubled, early) and how long each process took to apply
//! each change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chime_shared::clock::system_now_ms;
use chime_shared::config::source::{ConfigSource, EtcdSource};
use chime_shared::config::watcher;
use chime_shared::etcd::EtcdSpec;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, NewItem, QueueLayout, layout};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Workers, cleanup, count_lines, quantile, read_records};

/// `chime bench resize` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct ResizeArgs {
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// etcd endpoints.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: String,
    /// Items to enqueue over the run.
    #[arg(long, default_value_t = 200_000)]
    items: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Queue counts, in order; each change after the first is one resize.
    #[arg(long, default_value = "8,3,16,1,8", value_delimiter = ',')]
    counts: Vec<u32>,
    /// How long the enqueue runs, seconds.
    #[arg(long, default_value_t = 25)]
    seconds: u64,
    /// Items fall due between 0.3 s and this many ms after they are enqueued.
    #[arg(long, default_value_t = 10_000)]
    spread_ms: i64,
    /// Keep the workers' record files and logs (their directory is printed).
    #[arg(long)]
    keep_files: bool,
}

/// `revision -> first local time seen` for one process.
type Applied = Vec<(i64, i64)>;

/// "queue layout applied … revision=R … applied_at_ms=T" lines of a worker log.
fn applied_from_log(path: &std::path::Path) -> Applied {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("queue layout applied"))
        .filter_map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| {
                        v.trim_matches(|c: char| !c.is_ascii_digit())
                            .parse::<i64>()
                            .ok()
                    })
            };
            Some((field("revision=")?, field("applied_at_ms=")?))
        })
        .collect()
}

pub(crate) async fn run(a: ResizeArgs) -> Result<()> {
    if a.items == 0 || a.workers == 0 || a.counts.len() < 2 || a.seconds == 0 {
        bail!("invalid arguments: need items, workers, at least two --counts and --seconds");
    }
    let prefix = format!("bench{:08x}", fastrand::u32(..));
    let etcd_prefix = format!("/{prefix}/");
    let conn = RedisConn::connect(&RedisSpec::parse(&a.redis_url)?)
        .await
        .with_context(|| format!("connecting to {}", a.redis_url))?;
    let client = EtcdSpec::parse(&a.etcd_endpoints)?
        .connect()
        .await
        .with_context(|| format!("connecting to etcd at {}", a.etcd_endpoints))?;
    let source = Arc::new(EtcdSource::new(client.clone(), etcd_prefix.clone()));
    source
        .put("queues/default/count", &a.counts[0].to_string())
        .await?;
    let store = Arc::new(
        RedisStore::open(
            conn.clone(),
            QueueLayout::new(&prefix, "default", a.counts[0])?,
        )
        .await?,
    );
    let stop = CancellationToken::new();
    let (config, _watch) = watcher::start(source.clone(), stop.clone()).await;
    tokio::spawn(layout::follow(
        store.clone(),
        config,
        "default".into(),
        stop.clone(),
    ));

    let dir = std::env::temp_dir().join(format!("chime-bench-resize-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let args: Vec<String> = [
        "--redis-url",
        &a.redis_url,
        "--prefix",
        &prefix,
        "--queues",
        &a.counts[0].to_string(),
        "--etcd-endpoints",
        &a.etcd_endpoints,
        "--max-in-flight",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut workers = Workers::spawn(
        &dir,
        a.workers,
        &args,
        &[("CHIME_ETCD_PREFIX", &etcd_prefix)],
    )?;
    eprintln!(
        "bench resize: {} items over {} s, counts {:?}, {} workers, prefix {prefix}",
        a.items, a.seconds, a.counts, a.workers
    );

    // The producer's own applied layouts, sampled every 5 ms.
    let producer_applied: Arc<Mutex<Applied>> = Arc::default();
    {
        let (store, seen, stop) = (store.clone(), producer_applied.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = -1;
            while !stop.is_cancelled() {
                let rev = store.layout().revision;
                if rev != last {
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((rev, system_now_ms()));
                    last = rev;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }

    // The operator: one count change every interval, during the enqueue.
    let interval = Duration::from_millis(a.seconds * 1000 / a.counts.len() as u64);
    let puts = {
        let (source, counts) = (source.clone(), a.counts.clone());
        tokio::spawn(async move {
            let mut puts = Vec::new();
            for c in &counts[1..] {
                tokio::time::sleep(interval).await;
                let t = system_now_ms();
                let rev = source.put("queues/default/count", &c.to_string()).await?;
                eprintln!("  count -> {c} (revision {rev})");
                puts.push((t, rev));
            }
            Ok::<_, anyhow::Error>(puts)
        })
    };

    // The producer: items at an even rate for `seconds`.
    let started = Instant::now();
    let ticks = a.seconds * 10;
    let mut sent = 0usize;
    for tick in 0..ticks {
        let target = (a.items as u64 * (tick + 1) / ticks) as usize;
        let now = system_now_ms();
        let batch: Vec<NewItem> = (sent..target)
            .map(|i| {
                NewItem::new(
                    format!("z{i}"),
                    "noop",
                    now + 300 + fastrand::i64(0..a.spread_ms),
                )
                .key(format!("u{i}"))
            })
            .collect();
        sent = target;
        if !batch.is_empty() {
            store.enqueue(batch).await?;
        }
        let next = started + Duration::from_millis((tick + 1) * 100);
        tokio::time::sleep_until(next.into()).await;
    }
    let puts = puts.await??;
    eprintln!(
        "  enqueued {sent} in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Wait for every item. The last falls due `spread_ms` after the enqueue ends;
    // the deadline leaves room for a slow machine yet ends well inside the test
    // suite's timeout, so a loss is reported with what is left rather than killed.
    let deadline = Instant::now()
        + Duration::from_millis(a.spread_ms.max(0) as u64)
        + Duration::from_secs(60 + a.items as u64 / 4_000);
    loop {
        workers.check(&dir)?;
        let handled = count_lines(&workers.records)?;
        let stats = store.stats().await?;
        let left: u64 = stats
            .iter()
            .map(|s| s.pending + s.in_flight + s.moving)
            .sum();
        if handled >= a.items && left == 0 {
            break;
        }
        if Instant::now() > deadline {
            let left: Vec<String> = stats
                .iter()
                .filter(|s| s.pending + s.in_flight + s.moving > 0)
                .map(|s| {
                    format!(
                        "queue {}: {} pending, {} in flight, {} moving",
                        s.queue, s.pending, s.in_flight, s.moving
                    )
                })
                .collect();
            bail!(
                "{handled} records of {} items; left in the store: [{}]; layout {:?}; see {}",
                a.items,
                left.join("; "),
                store.layout(),
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settle_start = Instant::now();
    while store.layout().in_transition() && settle_start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resize_done = !store.layout().in_transition();
    workers.stop();
    stop.cancel();

    // Score items.
    let handled = read_records(&workers.records)?;
    let (mut lost, mut duplicates, mut early) = (0usize, 0usize, 0usize);
    for i in 0..a.items {
        match handled.get(&format!("z{i}")) {
            None => lost += 1,
            Some(h) => {
                duplicates += h.len() - 1;
                early += h.iter().filter(|x| x.handled_ms < x.due_ms).count();
            }
        }
    }
    // Score apply latency: for each change and each process, the first layout it
    // used with that revision or a newer one.
    let mut processes: HashMap<String, Applied> = HashMap::new();
    for (i, log) in workers.logs.iter().enumerate() {
        processes.insert(format!("worker{i}"), applied_from_log(log));
    }
    processes.insert(
        "producer".into(),
        producer_applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    );
    let mut lat = Vec::new();
    let mut missing = 0;
    for (t, rev) in &puts {
        for applied in processes.values() {
            match applied
                .iter()
                .filter(|(r, _)| r >= rev)
                .map(|(_, at)| *at)
                .min()
            {
                Some(at) => lat.push((at - t).max(0)),
                None => missing += 1,
            }
        }
    }
    lat.sort_unstable();
    cleanup(&conn, &prefix).await?;
    super::cleanup_etcd(&client, &etcd_prefix).await?;
    super::keep_or_remove(&dir, a.keep_files);
    let out = json!({
        "bench": "resize",
        "items": a.items,
        "workers": a.workers,
        "counts": a.counts,
        "resizes": puts.len(),
        "apply_p50_ms": quantile(&lat, 0.5),
        "apply_p99_ms": quantile(&lat, 0.99),
        "apply_max_ms": lat.last().copied().unwrap_or(0),
        "apply_missing": missing,
        "lost": lost,
        "duplicates": duplicates,
        "early": early,
        "resize_complete": resize_done,
    });
    println!("{out}");
    Ok(())
}
