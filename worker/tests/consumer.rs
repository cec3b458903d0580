//! The worker SDK against the in-memory store: backpressure, concurrency caps,
//! merged deliveries, failures and panics, drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, ensure};
use chime_shared::clock::SystemClock;
use chime_shared::queue::memory_store::MemoryStore;
use chime_shared::queue::{DelayStore, ItemRef, NewItem};
use chime_worker::{ConsumerOptions, HandlerError, ItemContext, Worker, WorkerError};
use tokio::sync::Notify;

fn store() -> Arc<dyn DelayStore> {
    Arc::new(MemoryStore::new(4, Arc::new(SystemClock)))
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Tracks how many handler calls run at once.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
    done: AtomicUsize,
}

impl Gauge {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.done.fetch_add(1, Ordering::SeqCst);
    }
}

/// However deep the backlog, the worker never holds more than `max_in_flight` items
/// (the store's in-flight count says so), and the per-handler cap holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_is_bounded_and_concurrency_capped() -> Result<()> {
    let store = store();
    let now = store.now_ms().await?;
    let items = (0..2_000)
        .map(|i| NewItem::new(format!("i{i}"), "slow", now))
        .collect();
    store.enqueue(items).await?;
    let gauge = Arc::new(Gauge::default());
    let g = gauge.clone();
    let opts = ConsumerOptions {
        max_in_flight: 50,
        batch: 20,
        ..ConsumerOptions::default()
    };
    let worker = Worker::builder()
        .delay_store(store.clone())
        .worker_id("w")
        .handler("slow", move |_ctx: ItemContext| {
            let g = g.clone();
            async move {
                g.enter();
                tokio::time::sleep(Duration::from_millis(2)).await;
                g.leave();
                Ok::<(), HandlerError>(())
            }
        })
        .handler_concurrency("slow", 7)
        .options(opts)
        .build()?;
    let stop = Arc::new(Notify::new());
    let s = stop.clone();
    let run = tokio::spawn(worker.run(async move { s.notified().await }));
    let mut peak_in_flight = 0;
    while gauge.done.load(Ordering::SeqCst) < 2_000 {
        let st = store.stats().await?;
        peak_in_flight = peak_in_flight.max(st.iter().map(|s| s.in_flight).sum::<u64>());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.notify_one();
    let report = run.await??;
    ensure!(report.handled == 2_000, "{report:?}");
    ensure!(peak_in_flight <= 50, "store saw {peak_in_flight} in flight");
    ensure!(
        peak_in_flight > 7,
        "backlog was never pulled ahead ({peak_in_flight})"
    );
    let peak = gauge.peak.load(Ordering::SeqCst);
    ensure!(
        peak <= 7 && peak > 1,
        "handler concurrency peaked at {peak}"
    );
    Ok(())
}

/// Merged items arrive in one call; failures retry with backoff; a panic is a
/// failure, not a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_delivery_retries_and_panics() -> Result<()> {
    let store = store();
    let now = store.now_ms().await?;
    store
        .enqueue(vec![
            NewItem::new("a", "merge", now).key("u").merge_key("u"),
            NewItem::new("b", "merge", now + 200)
                .key("u")
                .merge_key("u"),
            NewItem::new("f", "flaky", now).max_attempts(5),
            NewItem::new("p", "panics", now).max_attempts(2),
        ])
        .await?;
    let merged = Arc::new(std::sync::Mutex::new(Vec::new()));
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let (m, f) = (merged.clone(), flaky_calls.clone());
    let worker = Worker::builder()
        .delay_store(store.clone())
        .handler("merge", move |ctx: ItemContext| {
            let m = m.clone();
            async move {
                let ids: Vec<String> = ctx.items().iter().map(|i| i.id.clone()).collect();
                m.lock().map_err(|_| "poisoned")?.push(ids);
                Ok::<(), HandlerError>(())
            }
        })
        .handler("flaky", move |ctx: ItemContext| {
            let f = f.clone();
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                if ctx.item().attempt < 3 {
                    return Err(HandlerError::new("not yet").retry_after_ms(10));
                }
                Ok(())
            }
        })
        .handler("panics", |_ctx: ItemContext| async move {
            if std::hint::black_box(true) {
                panic!("boom");
            }
            Ok::<(), HandlerError>(())
        })
        .options(ConsumerOptions {
            retry_base_ms: 10,
            ..ConsumerOptions::default()
        })
        .build()?;
    let stop = Arc::new(Notify::new());
    let s = stop.clone();
    let run = tokio::spawn(worker.run(async move { s.notified().await }));
    wait_for("flaky to succeed on attempt 3", || {
        flaky_calls.load(Ordering::SeqCst) >= 3
    })
    .await?;
    let dead = loop {
        let d = store.dead_letters(10).await?;
        if !d.is_empty() {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    ensure!(dead[0].item.id == "p");
    let err = dead[0].last_error.clone().unwrap_or_default();
    ensure!(err.contains("handler panicked: boom"), "{err}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.get(&ItemRef::new("f")).await?.is_some() {
        ensure!(tokio::time::Instant::now() < deadline, "f never acked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.notify_one();
    run.await??;
    let merged = merged
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    ensure!(
        merged == vec![vec!["a".to_string(), "b".to_string()]],
        "{merged:?}"
    );
    Ok(())
}

/// Bad settings are refused naming the field.
#[test]
fn builder_refuses_bad_settings() {
    let e = Worker::builder().delay_store(store()).build().unwrap_err();
    assert!(e.to_string().contains("no handler registered"), "{e}");
    let e = Worker::builder()
        .delay_store(store())
        .handler("bad name", |_c: ItemContext| async {
            Ok::<(), HandlerError>(())
        })
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("invalid handler"), "{e}");
    let e = Worker::builder()
        .delay_store(store())
        .handler("h", |_c: ItemContext| async { Ok::<(), HandlerError>(()) })
        .options(ConsumerOptions {
            batch: 0,
            ..ConsumerOptions::default()
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(e, WorkerError::Config(ref m) if m.contains("invalid batch")),
        "{e}"
    );
    let e = Worker::builder()
        .delay_store(store())
        .handler("h", |_c: ItemContext| async { Ok::<(), HandlerError>(()) })
        .handler_concurrency("other", 3)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("no such handler"), "{e}");
}
