//! `chime dev`: chime in one process with nothing to install. The embedded in-memory
//! delay store, two in-process workers, and a demo producer that schedules coupon
//! reminders a few seconds ahead (some for the same user close together, so they
//! merge; some cancelled) and prints each one as it fires.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use chime_shared::clock::{SystemClock, system_now_ms};
use chime_shared::config::source::MemorySource;
use chime_shared::config::watcher;
use chime_shared::queue::memory_store::MemoryStore;
use chime_shared::queue::{CancelOutcome, DelayStore, NewItem};
use chime_shared::ratelimit::MemoryLimiter;
use chime_worker::{ConsumerOptions, HandlerError, ItemContext, Live, Worker};
use tokio_util::sync::CancellationToken;

use crate::{init_logging, shutdown_signal};

/// `chime dev` flags.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Number of in-memory queues.
    #[arg(long, default_value_t = 8)]
    queues: u32,
    /// Milliseconds between two demo reminders.
    #[arg(long, default_value_t = 1_000)]
    demo_interval_ms: u64,
    /// Stop by itself after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    exit_after_s: u64,
}

/// Formats Unix milliseconds as `HH:MM:SS.mmm` (UTC).
fn clock(ms: i64) -> String {
    let day_ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1_000 % 60,
        day_ms % 1_000
    )
}

async fn remind(ctx: ItemContext) -> Result<(), HandlerError> {
    let now = system_now_ms();
    let first = ctx.item();
    let coupons: Vec<&str> = ctx.items().iter().map(|i| i.id.as_str()).collect();
    if ctx.is_merged() {
        println!(
            "[{}] FIRED     one merged reminder for {}: {} (lag {} ms, worker {})",
            clock(now),
            first.key,
            coupons.join(", "),
            now - first.due_at_ms,
            ctx.worker_id()
        );
    } else {
        println!(
            "[{}] FIRED     {} for {} (lag {} ms, worker {})",
            clock(now),
            first.id,
            first.key,
            now - first.due_at_ms,
            ctx.worker_id()
        );
    }
    Ok(())
}

/// Runs the embedded demo until Ctrl-C (or `--exit-after-s`).
pub async fn run(args: DevArgs) -> Result<()> {
    init_logging("text", "warn");
    let store: Arc<dyn DelayStore> = Arc::new(MemoryStore::new(args.queues, Arc::new(SystemClock)));
    println!("chime dev: everything in one process, nothing to install");
    println!(
        "  store    embedded in-memory delay queue, {} queues",
        args.queues
    );
    println!(
        "  workers  dev-worker-1, dev-worker-2 with handler \"remind\" (prints each reminder)"
    );
    println!(
        "  demo     a coupon reminder every {} ms, due 2-6 s ahead; reminders for one user",
        args.demo_interval_ms
    );
    println!("           due within 60 s of each other are merged; some are cancelled");
    println!("  stop     Ctrl-C");

    let stop = CancellationToken::new();
    // Live settings in memory (etcd's stand-in), watched like etcd would be.
    let source = Arc::new(MemorySource::default());
    let (config, _watch) = watcher::start(source, stop.clone()).await;
    let live = Live {
        config,
        family: "default".into(),
        limiter: Some(Arc::new(MemoryLimiter::new(Arc::new(SystemClock)))),
    };
    let opts = ConsumerOptions {
        pollers: 2,
        retry_base_ms: 200,
        drain_timeout_ms: 2_000,
        ..ConsumerOptions::default()
    };
    let mut workers = Vec::new();
    for i in 1..=2 {
        let w = Worker::builder()
            .delay_store(store.clone())
            .worker_id(format!("dev-worker-{i}"))
            .handler("remind", remind)
            .options(opts.clone())
            .live(live.clone())
            .build()?;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            w.run(async move { stop.cancelled().await }).await
        }));
    }
    let producer = tokio::spawn(demo_producer(
        store.clone(),
        args.demo_interval_ms,
        stop.clone(),
    ));

    let timer = async {
        if args.exit_after_s > 0 {
            tokio::time::sleep(Duration::from_secs(args.exit_after_s)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = shutdown_signal() => {},
        _ = timer => {},
    }
    stop.cancel();
    let _ = producer.await;
    for w in workers {
        w.await??;
    }
    println!("chime dev: stopped");
    Ok(())
}

async fn demo_producer(store: Arc<dyn DelayStore>, interval_ms: u64, stop: CancellationToken) {
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(interval_ms)) => {},
            _ = stop.cancelled() => return,
        }
        n += 1;
        let user = format!("user:{}", fastrand::u32(1..=4));
        let lead = 2_000 + fastrand::i64(0..4_000);
        let now = system_now_ms();
        let item = NewItem::new(format!("coupon:{n}"), "remind", now + lead)
            .key(user.clone())
            .merge_key(user.clone())
            .payload(format!("coupon {n} opens soon"));
        let r = item.item_ref();
        match store.enqueue(vec![item]).await {
            Ok(_) => println!(
                "[{}] scheduled coupon:{n} for {user}, due in {:.1} s",
                clock(now),
                lead as f64 / 1000.0
            ),
            Err(e) => println!("[{}] enqueue failed: {e}", clock(now)),
        }
        // Every fifth subscriber changes their mind.
        if n.is_multiple_of(5)
            && let Ok(CancelOutcome::Cancelled) = store.cancel(&r).await
        {
            println!(
                "[{}] cancelled coupon:{n} for {user} (it will not fire)",
                clock(system_now_ms())
            );
        }
    }
}
