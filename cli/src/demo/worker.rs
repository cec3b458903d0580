//! `chime demo worker` (hidden): one demo worker process. It is a plain SDK worker —
//! `chime_worker::Worker` on the Redis delay store, following live settings in etcd
//! (so budgets and rate limits apply) through the shared Redis limiter, and with a
//! coordinator session when the scenario has jobs — whose handlers are the scenario's
//! (push to the fake provider, split a range into tasks, scan a segment). It binds no
//! port and runs until SIGTERM, then drains.

use std::sync::Arc;

use anyhow::{Context, Result};
use chime_shared::config::source::EtcdSource;
use chime_shared::config::watcher;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, QueueLayout};
use chime_shared::ratelimit::RedisLimiter;
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use chime_worker::{ConsumerOptions, Live, SessionOptions, Worker, WorkerBuilder};
use tokio_util::sync::CancellationToken;

use super::provider::Pusher;
use super::{Scenario, coupon, mass_push, push_platform, segment, sync};

/// The worker group of every demo job.
pub(crate) const GROUP: &str = "demo";

/// `chime demo worker` flags (set by the scenario that starts it).
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    /// Which scenario's handlers to register.
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Redis URL.
    #[arg(long)]
    redis_url: String,
    /// etcd endpoints.
    #[arg(long)]
    etcd_endpoints: String,
    /// Key prefix of the run (Redis keys, and `/<prefix>/` in etcd).
    #[arg(long)]
    prefix: String,
    /// Queues N.
    #[arg(long, default_value_t = 16)]
    queues: u32,
    /// The fake provider's push URL.
    #[arg(long)]
    provider_url: String,
    /// Worker id.
    #[arg(long)]
    worker_id: String,
    /// Coordinator endpoint, for scenarios with jobs.
    #[arg(long)]
    coordinator: Option<String>,
    /// Provider requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Items held at once.
    #[arg(long, default_value_t = 2_048)]
    max_in_flight: usize,
    /// Most items per pop.
    #[arg(long, default_value_t = 256)]
    batch: u32,
}

/// What a scenario's handlers get.
#[derive(Debug, Clone)]
pub(crate) struct WorkerCtx {
    /// The delay store (shards enqueue into it).
    pub(crate) store: Arc<dyn DelayStore>,
    /// Redis, for the scenario's own data (segment users).
    pub(crate) conn: RedisConn,
    /// The run's prefix.
    pub(crate) prefix: String,
    /// The provider client.
    pub(crate) pusher: Pusher,
    /// Provider requests in flight at once.
    pub(crate) concurrency: usize,
    /// This worker's id.
    pub(crate) worker_id: String,
}

pub(crate) async fn run(a: WorkerArgs) -> Result<()> {
    crate::init_logging("text", "warn");
    let layout = QueueLayout::new(&a.prefix, "default", a.queues)?;
    let spec = RedisSpec::parse(&a.redis_url)?;
    let conn = RedisConn::connect(&spec)
        .await
        .with_context(|| format!("connecting to Redis at {}", a.redis_url))?;
    let store = Arc::new(
        RedisStore::open(conn.clone(), layout.clone())
            .await?
            .announced_through(spec),
    );
    let client = chime_shared::etcd::EtcdSpec::parse(&a.etcd_endpoints)?
        .connect()
        .await
        .with_context(|| format!("connecting to etcd at {}", a.etcd_endpoints))?;
    let stop_watch = CancellationToken::new();
    let source = Arc::new(EtcdSource::new(client, format!("/{}/", a.prefix)));
    let (config, _watch) = watcher::start(source, stop_watch.clone()).await;
    let ctx = WorkerCtx {
        store: store.clone(),
        conn: conn.clone(),
        prefix: a.prefix.clone(),
        pusher: Pusher::new(&a.provider_url, a.concurrency)?,
        concurrency: a.concurrency,
        worker_id: a.worker_id.clone(),
    };
    let mut builder = Worker::builder()
        .worker_id(a.worker_id.clone())
        .delay_store(store)
        .options(ConsumerOptions {
            batch: a.batch,
            max_in_flight: a.max_in_flight,
            // Quick retries: a 503 is retried within the reminder's minute.
            retry_base_ms: 200,
            retry_max_ms: 2_000,
            // New items (a shard's tasks) are noticed within a quarter second.
            idle_sleep_max_ms: 250,
            drain_timeout_ms: 10_000,
            ..ConsumerOptions::default()
        })
        .live(Live {
            config,
            family: layout.family.clone(),
            limiter: Some(Arc::new(RedisLimiter::new(conn, layout.prefix.clone()))),
        });
    if let Some(endpoint) = &a.coordinator {
        builder = builder.coordinator(SessionOptions {
            endpoints: vec![endpoint.clone()],
            group: GROUP.into(),
            capacity: 16,
            labels: Default::default(),
            drain_timeout_ms: 10_000,
            token: None,
            tls: Default::default(),
        });
    }
    let builder: WorkerBuilder = match a.scenario {
        Scenario::CouponReminder => coupon::handlers(builder, &ctx),
        Scenario::MassPush => mass_push::handlers(builder, &ctx),
        Scenario::PushPlatform => push_platform::handlers(builder, &ctx),
        Scenario::SegmentNotify => segment::handlers(builder, &ctx),
        Scenario::IncrementalSync => sync::handlers(builder, &ctx),
    };
    let worker = builder.build()?;
    let report = worker.run(crate::shutdown_signal()).await?;
    stop_watch.cancel();
    tracing::info!(
        handled = report.handled,
        handed_back = report.handed_back,
        "demo worker stopped"
    );
    Ok(())
}
