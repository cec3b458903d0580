//! `chime worker`: a generic worker process against Redis, with the built-in
//! handlers. Drains on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chime_shared::config::source::EtcdSource;
use chime_shared::config::watcher;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::ratelimit::RedisLimiter;
use chime_shared::redis_conn::RedisConn;
use chime_worker::{ItemHandler, Live, Worker};
use tracing::info;

use crate::config::{self, WorkerConfig};
use crate::handlers::{self, HttpHandler, Recorded, Recorder};
use crate::{StoreArgs, init_logging, shutdown_signal};

/// `chime worker` flags; each overrides the config file and `CHIME_*` variables.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Stable worker id (defaults to HOSTNAME).
    #[arg(long)]
    worker_id: Option<String>,
    /// Built-in handlers to register, comma-separated: noop, log, http, sleep.
    #[arg(long, value_delimiter = ',')]
    handlers: Option<Vec<String>>,
    /// URL the `http` handler POSTs to.
    #[arg(long)]
    http_url: Option<String>,
    /// Append `id due_ms handled_ms attempt` per handled item to this file.
    #[arg(long)]
    record_file: Option<PathBuf>,
    /// Concurrent pollers.
    #[arg(long)]
    pollers: Option<usize>,
    /// Most items per pop.
    #[arg(long)]
    batch: Option<u32>,
    /// Most items held at once.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Visibility timeout (ms).
    #[arg(long)]
    visibility_ms: Option<u64>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
}

/// Builds the configuration: file, then environment, then flags.
pub fn resolve(args: &WorkerArgs) -> Result<WorkerConfig> {
    let mut cfg: WorkerConfig = config::load(args.store.config.as_deref(), config::chime_env())?;
    args.store
        .apply(&mut cfg.redis, &mut cfg.queue, &mut cfg.etcd);
    if let Some(v) = &args.worker_id {
        cfg.worker_id = v.clone();
    }
    if let Some(v) = &args.handlers {
        cfg.handlers.enabled = v.clone();
    }
    if let Some(v) = &args.http_url {
        cfg.handlers.http_url = v.clone();
    }
    if let Some(v) = &args.record_file {
        cfg.handlers.record_file = v.to_string_lossy().into_owned();
    }
    if let Some(v) = args.pollers {
        cfg.consumer.pollers = v;
    }
    if let Some(v) = args.batch {
        cfg.consumer.batch = v;
    }
    if let Some(v) = args.max_in_flight {
        cfg.consumer.max_in_flight = v;
    }
    if let Some(v) = args.visibility_ms {
        cfg.consumer.visibility_ms = v;
    }
    if let Some(v) = &args.log_format {
        cfg.log.format = v.clone();
    }
    Ok(cfg)
}

/// Runs the worker until a signal, then drains.
pub async fn run(args: WorkerArgs) -> Result<()> {
    let cfg = resolve(&args)?;
    init_logging(&cfg.log.format, &cfg.log.level);
    let layout = cfg.queue.layout()?;
    let conn = RedisConn::connect(&cfg.redis.spec()?)
        .await
        .with_context(|| format!("connecting to Redis at {}", cfg.redis.url))?;
    let store = Arc::new(RedisStore::open(conn.clone(), layout.clone()).await?);
    let stop_watch = tokio_util::sync::CancellationToken::new();
    let live = match cfg.etcd.spec()? {
        Some(spec) => {
            let client = spec
                .connect()
                .await
                .with_context(|| format!("connecting to etcd at {}", cfg.etcd.endpoints))?;
            let source = Arc::new(EtcdSource::new(client, cfg.etcd.prefix.clone()));
            let (handle, _task) = watcher::start(source, stop_watch.clone()).await;
            Some(Live {
                config: handle,
                family: layout.family.clone(),
                limiter: Some(Arc::new(RedisLimiter::new(conn, layout.prefix.clone()))),
            })
        }
        None => None,
    };

    let recorder = match cfg.handlers.record_file.as_str() {
        "" => None,
        path => Some(Recorder::open(path)?),
    };
    let mut builder = Worker::builder(store).options(cfg.consumer.options());
    if let Some(live) = live {
        builder = builder.live(live);
    }
    if !cfg.worker_id.is_empty() {
        builder = builder.worker_id(cfg.worker_id.clone());
    }
    if cfg.handlers.enabled.is_empty() {
        bail!("invalid handlers.enabled: register at least one of noop, log, http, sleep");
    }
    for name in &cfg.handlers.enabled {
        let h: Arc<dyn ItemHandler> = match name.as_str() {
            "noop" => Arc::new(handlers::noop),
            "log" => Arc::new(handlers::log),
            "sleep" => Arc::new(handlers::sleep),
            "http" => Arc::new(HttpHandler::new(
                &cfg.handlers.http_url,
                cfg.handlers.http_timeout_ms,
            )?),
            other => bail!(
                "invalid handlers.enabled: unknown built-in handler {other:?} (known: noop, log, http, sleep)"
            ),
        };
        builder = match &recorder {
            Some(r) => builder.handler(name, Recorded::new(h, r.clone())),
            None => builder.shared_handler(name, h),
        };
    }
    let worker = builder.build()?;
    info!(worker_id = worker.id(), prefix = %layout.prefix, family = %layout.family,
          queues = layout.count, handlers = ?cfg.handlers.enabled, "chime worker starting");
    let report = worker.run(shutdown_signal()).await?;
    stop_watch.cancel();
    info!(
        handled = report.handled,
        handed_back = report.handed_back,
        "chime worker stopped"
    );
    Ok(())
}
