//! `chime bench …`: benchmarks that print one JSON line of results on stdout
//! (progress goes to stderr).
//!
//! `burst` measures the coupon-reminder case: N items all due at one instant T0,
//! drained by W separate `chime worker` processes with a recording no-op handler.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, NewItem, QueueLayout};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use futures_util::StreamExt;
use serde_json::json;

/// `chime bench` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: BenchCmd,
}

#[derive(Debug, clap::Subcommand)]
enum BenchCmd {
    /// N items due at one instant, drained by W worker processes.
    Burst(BurstArgs),
}

#[derive(Debug, clap::Args)]
struct BurstArgs {
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
    /// Most items per pop.
    #[arg(long, default_value_t = 500)]
    batch: u32,
    /// Pollers per worker.
    #[arg(long, default_value_t = 2)]
    pollers: usize,
    /// Most items each worker holds at once.
    #[arg(long, default_value_t = 4_096)]
    max_in_flight: usize,
    /// Payload size of each item, bytes.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Time from the start of the enqueue to T0, ms (0: sized to the burst).
    #[arg(long, default_value_t = 0)]
    lead_ms: i64,
    /// Keep the workers' record files and logs (their directory is printed).
    #[arg(long)]
    keep_files: bool,
}

/// Runs a benchmark.
pub async fn run(args: BenchArgs) -> Result<()> {
    crate::init_logging("text", "warn");
    match args.cmd {
        BenchCmd::Burst(a) => burst(a).await,
    }
}

struct Workers {
    children: Vec<Child>,
}

impl Workers {
    fn stop(&mut self) {
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

async fn burst(a: BurstArgs) -> Result<()> {
    if a.items == 0 || a.workers == 0 {
        bail!("invalid --items/--workers: both must be at least 1");
    }
    let prefix = format!("bench{:08x}", fastrand::u32(..));
    let layout = QueueLayout::new(&prefix, "default", a.queues)?;
    let spec = RedisSpec::parse(&a.redis_url)?;
    let conn = RedisConn::connect(&spec)
        .await
        .with_context(|| format!("connecting to {}", a.redis_url))?;
    let store = Arc::new(RedisStore::open(conn.clone(), layout).await?);
    let dir = std::env::temp_dir().join(format!("chime-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // Workers first: they idle until T0, then drain.
    let exe = std::env::current_exe()?;
    let mut workers = Workers {
        children: Vec::new(),
    };
    let mut records = Vec::new();
    for i in 0..a.workers {
        let rec = dir.join(format!("w{i}.rec"));
        let log = std::fs::File::create(dir.join(format!("w{i}.log")))?;
        let child = Command::new(&exe)
            .args(["worker", "--redis-url", &a.redis_url, "--prefix", &prefix])
            .args([
                "--queues",
                &a.queues.to_string(),
                "--batch",
                &a.batch.to_string(),
            ])
            .args(["--pollers", &a.pollers.to_string()])
            .args(["--max-in-flight", &a.max_in_flight.to_string()])
            .args(["--handlers", "noop", "--worker-id", &format!("bench-w{i}")])
            .arg("--record-file")
            .arg(&rec)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning chime worker")?;
        workers.children.push(child);
        records.push(rec);
    }

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

    // Enqueue in chunks, a few chunks in flight at once (each is pipelined inside).
    let started = Instant::now();
    let chunk = 10_000usize;
    let chunks = a.items.div_ceil(chunk);
    let mut done = 0usize;
    let mut stream = futures_util::stream::iter((0..chunks).map(|c| {
        let store = store.clone();
        let payload = payload.clone();
        let n = a.items;
        async move {
            let items: Vec<NewItem> = (c * chunk..((c + 1) * chunk).min(n))
                .map(|i| {
                    NewItem::new(format!("b{i}"), "noop", t0)
                        .key(format!("u{i}"))
                        .payload(payload.clone())
                })
                .collect();
            let len = items.len();
            store.enqueue(items).await.map(|_| len)
        }
    }))
    .buffer_unordered(4);
    while let Some(r) = stream.next().await {
        done += r?;
        if done % (a.items / 10).max(chunk) < chunk || done == a.items {
            eprintln!("  enqueued {done}/{}", a.items);
        }
    }
    let enqueue_s = started.elapsed().as_secs_f64();
    let after = store.now_ms().await?;
    if after > t0 {
        eprintln!(
            "  warning: enqueue finished {} ms after T0; raise --lead-ms",
            after - t0
        );
    }

    // Wait for the drain: nothing pending or in flight, and every item recorded.
    let deadline = Instant::now() + Duration::from_secs(60 + (a.items / 5_000) as u64);
    let mut peak_rss_kib = 0u64;
    loop {
        for c in &mut workers.children {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("a worker exited early ({status}); see {}", dir.display());
            }
            peak_rss_kib = peak_rss_kib.max(vm_hwm_kib(c.id()).unwrap_or(0));
        }
        let stats = store.stats().await?;
        let left: u64 = stats.iter().map(|s| s.pending + s.in_flight).sum();
        if left == 0 && count_lines(&records)? >= a.items {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "burst not drained in time: {left} items left; see {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    workers.stop();

    // Score.
    let mut seen = vec![0u32; a.items];
    let mut lags: Vec<i64> = Vec::with_capacity(a.items);
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for rec in &records {
        for line in std::fs::read_to_string(rec)?.lines() {
            let mut f = line.split(' ');
            let (Some(id), Some(due), Some(handled)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let Some(i) = id.strip_prefix('b').and_then(|s| s.parse::<usize>().ok()) else {
                continue;
            };
            let (due, handled): (i64, i64) = (due.parse()?, handled.parse()?);
            if i >= a.items {
                continue;
            }
            seen[i] += 1;
            if seen[i] == 1 {
                lags.push(handled - due);
                first = first.min(handled);
                last = last.max(handled);
            }
        }
    }
    let lost = seen.iter().filter(|c| **c == 0).count();
    let duplicates: u64 = seen.iter().map(|c| u64::from(c.saturating_sub(1))).sum();
    lags.sort_unstable();
    let pct = |p: f64| -> i64 {
        if lags.is_empty() {
            return 0;
        }
        lags[((lags.len() as f64 * p).ceil() as usize).clamp(1, lags.len()) - 1]
    };
    let drain_s = ((last - t0) as f64 / 1000.0).max(1e-3);
    cleanup(&conn, &prefix).await?;
    if a.keep_files {
        eprintln!("  files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let out = json!({
        "bench": "burst",
        "items": a.items,
        "workers": a.workers,
        "queues": a.queues,
        "batch": a.batch,
        "enqueue_per_s": (a.items as f64 / enqueue_s).round(),
        "drain_per_s": (a.items as f64 / drain_s).round(),
        "lag_p50_ms": pct(0.50),
        "lag_p99_ms": pct(0.99),
        "lag_max_ms": lags.last().copied().unwrap_or(0),
        "first_after_t0_ms": if first == i64::MAX { 0 } else { first - t0 },
        "lost": lost,
        "duplicates": duplicates,
        "worker_peak_rss_mib": (peak_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
    });
    println!("{out}");
    Ok(())
}

fn count_lines(files: &[PathBuf]) -> Result<usize> {
    let mut n = 0;
    for f in files {
        if Path::new(f).exists() {
            n += std::fs::read(f)?.iter().filter(|b| **b == b'\n').count();
        }
    }
    Ok(n)
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Deletes every key of the benchmark's prefix.
async fn cleanup(conn: &RedisConn, prefix: &str) -> Result<()> {
    let mut conn = conn.clone();
    for pattern in [format!("{{{prefix}:*"), format!("{prefix}:*")] {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            for k in keys {
                let _: i64 = redis::cmd("UNLINK").arg(k).query_async(&mut conn).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}
