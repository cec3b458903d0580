//! `chime worker`: a generic worker process against Redis, with the built-in
//! handlers, and optionally the delivery service (`chime.v1.Deliveries`) through
//! which apps in any language run their own item handlers. Drains on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use chime_shared::activity::{self, HistoryStore, RedisHistory};
use chime_shared::config::source::EtcdSource;
use chime_shared::config::watcher;
use chime_shared::ops;
use chime_shared::queue::DelayStore;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::ratelimit::RedisLimiter;
use chime_shared::redis_conn::RedisConn;
use chime_worker::delivery::server::{self, Access};
use chime_worker::{Hub, HubOptions, ItemHandler, JobHandler, Live, SessionOptions, Worker};
use tracing::info;

use crate::config::{self, WorkerConfig};
use crate::handlers::jobs::{JobRecorder, RecordedJob};
use crate::handlers::{self, HttpHandler, Recorded, Recorder};
use crate::{StoreArgs, connect_when_up, init_logging, shutdown_signal};

/// `chime worker` flags; each overrides the config file and `CHIME_*` variables.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Stable worker id (defaults to HOSTNAME).
    #[arg(long)]
    worker_id: Option<String>,
    /// Built-in handlers to register, comma-separated: noop, log, http, sleep, fail;
    /// `none` for none.
    #[arg(long, value_delimiter = ',')]
    handlers: Option<Vec<String>>,
    /// Serve the delivery service (`chime.v1.Deliveries`) on this address
    /// (`127.0.0.1:7071` for a sidecar); empty: off.
    #[arg(long)]
    deliveries_addr: Option<String>,
    /// File of the tokens subscribers present; default: `--token-file`'s.
    #[arg(long)]
    deliveries_token_file: Option<String>,
    /// Accept subscribers without a token (a laptop only).
    #[arg(long)]
    deliveries_allow_unauthenticated: bool,
    /// URL the `http` handler POSTs to.
    #[arg(long)]
    http_url: Option<String>,
    /// Append `id due_ms handled_ms attempt` per handled item to this file.
    #[arg(long)]
    record_file: Option<PathBuf>,
    /// Coordinator endpoints (comma-separated) to run job shards for.
    #[arg(long)]
    coordinator: Option<String>,
    /// Worker group for job shards.
    #[arg(long)]
    group: Option<String>,
    /// Append one line per finished job shard to this file.
    #[arg(long)]
    job_record_file: Option<PathBuf>,
    /// File holding the worker token the coordinator asks for.
    #[arg(long)]
    token_file: Option<String>,
    /// HTTP listen address of /livez, /readyz and /metrics; empty for none.
    #[arg(long)]
    http_addr: Option<String>,
    /// Do not consume delayed items (job shards only; no Redis needed).
    #[arg(long)]
    no_queue: bool,
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
        cfg.handlers.enabled = v
            .iter()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && h != "none")
            .collect();
    }
    if let Some(v) = &args.deliveries_addr {
        cfg.deliveries.listen_addr = v.clone();
    }
    if let Some(v) = &args.deliveries_token_file {
        cfg.deliveries.token_file = v.clone();
    }
    if args.deliveries_allow_unauthenticated {
        cfg.deliveries.allow_unauthenticated = true;
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
    if let Some(v) = &args.coordinator {
        cfg.coordinator.endpoints = v.clone();
    }
    if let Some(v) = &args.group {
        cfg.coordinator.group = v.clone();
    }
    if let Some(v) = &args.token_file {
        cfg.coordinator.token_file = v.clone();
    }
    if let Some(v) = &args.http_addr {
        cfg.http_addr = v.clone();
    }
    if let Some(v) = &args.job_record_file {
        cfg.coordinator.record_file = v.to_string_lossy().into_owned();
    }
    Ok(cfg)
}

/// Ready when not draining and the delay store (if any) answers.
fn readiness(store: Option<Arc<dyn DelayStore>>, draining: Arc<AtomicBool>) -> ops::Readiness {
    Arc::new(move || {
        let (store, draining) = (store.clone(), draining.load(Ordering::Relaxed));
        Box::pin(async move {
            let store_ok = match &store {
                None => Ok(()),
                Some(s) => s.now_ms().await.map(|_| ()),
            };
            let details = serde_json::json!({
                "draining": draining,
                "store": match &store_ok { Ok(()) => "ok".to_owned(), Err(e) => e.to_string() },
            });
            (!draining && store_ok.is_ok(), details)
        })
    })
}

/// Binds the delivery service and serves it until the hub shuts down (after the
/// worker's drain).
async fn start_deliveries(
    cfg: &WorkerConfig,
    hub: Arc<Hub>,
) -> Result<tokio::task::JoinHandle<Result<(), chime_worker::WorkerError>>> {
    let d = &cfg.deliveries;
    let token_file = match (d.token_file.trim(), cfg.coordinator.token_file.trim()) {
        ("", "") => None,
        ("", f) | (f, _) => Some(f.to_owned()),
    };
    let access = match token_file {
        Some(f) => Access::Tokens(Arc::new(
            chime_shared::auth::Tokens::from_file(&f).context("deliveries.token_file")?,
        )),
        None if d.allow_unauthenticated => {
            tracing::warn!(
                "the delivery service accepts subscribers without a token (deliveries.allow_unauthenticated)"
            );
            Access::Open
        }
        None => bail!(
            "invalid deliveries.token_file: the delivery service needs a token file (deliveries.token_file or coordinator.token_file), or deliveries.allow_unauthenticated = true"
        ),
    };
    let tls = d.tls();
    let tls = if tls.enabled() {
        tls.check()?;
        Some(tls.tonic()?)
    } else {
        None
    };
    let addr = d.listen_addr.trim();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding deliveries.listen_addr {addr}"))?;
    info!(deliveries = %listener.local_addr()?, tls = tls.is_some(), "delivery service listening");
    let stopped = {
        let hub = hub.clone();
        async move { hub.stopped().await }
    };
    Ok(tokio::spawn(server::serve(
        listener, hub, access, tls, stopped,
    )))
}

/// Runs the worker until a signal, then drains.
pub async fn run(args: WorkerArgs) -> Result<()> {
    let cfg = resolve(&args)?;
    init_logging(&cfg.log.format, &cfg.log.level);
    let worker_id = if cfg.worker_id.is_empty() {
        chime_worker::default_worker_id()
    } else {
        cfg.worker_id.clone()
    };
    let layout = cfg.queue.layout()?;
    let spans = cfg.tracing.start("chime-worker", &worker_id)?;
    let stop_watch = tokio_util::sync::CancellationToken::new();
    // Ready while the store answers and the worker is not draining; a draining
    // worker leaves the Service's endpoints at once but keeps answering /livez.
    let draining = Arc::new(AtomicBool::new(false));
    let mut probe_store: Option<Arc<dyn DelayStore>> = None;
    // The console's charts: this worker's fires, acks and failures, flushed to Redis.
    let mut history: Option<Arc<dyn HistoryStore>> = None;
    let mut builder = Worker::builder()
        .worker_id(worker_id.clone())
        .options(cfg.consumer.options());
    let serving = !cfg.deliveries.listen_addr.trim().is_empty();
    if cfg.handlers.enabled.is_empty() && !serving {
        bail!(
            "invalid handlers.enabled: register at least one of noop, log, http, sleep, fail (or serve deliveries.listen_addr)"
        );
    }
    if serving && args.no_queue {
        bail!(
            "invalid deliveries.listen_addr: the delivery service needs the queue (drop --no-queue)"
        );
    }
    let hub = serving.then(|| {
        Hub::new(HubOptions {
            worker_id: worker_id.clone(),
            family: layout.family.clone(),
            settle_timeout_ms: cfg.deliveries.settle_timeout_ms,
        })
    });
    if let Some(h) = &hub {
        builder = builder.deliveries(h.clone());
    }
    if !args.no_queue {
        let redis_spec = cfg.redis.spec()?;
        let conn =
            connect_when_up("Redis", &cfg.redis.url, || RedisConn::connect(&redis_spec)).await?;
        let store = Arc::new(
            RedisStore::open(conn.clone(), layout.clone())
                .await?
                .announced_through(redis_spec),
        );
        probe_store = Some(store.clone());
        history = Some(Arc::new(RedisHistory::new(conn.clone(), &layout.prefix)));
        builder = builder.delay_store(store);
        if let Some(spec) = cfg.etcd.spec()? {
            let client = connect_when_up("etcd", &cfg.etcd.endpoints, || spec.connect()).await?;
            let source = Arc::new(EtcdSource::new(client, cfg.etcd.prefix.clone()));
            let (handle, _task) = watcher::start(source, stop_watch.clone()).await;
            builder = builder.live(Live {
                config: handle,
                family: layout.family.clone(),
                limiter: Some(Arc::new(RedisLimiter::new(conn, layout.prefix.clone()))),
            });
        }
        let recorder = match cfg.handlers.record_file.as_str() {
            "" => None,
            path => Some(Recorder::open(path)?),
        };
        for name in &cfg.handlers.enabled {
            let h: Arc<dyn ItemHandler> = match name.as_str() {
                "noop" => Arc::new(handlers::noop),
                "log" => Arc::new(handlers::log),
                "sleep" => Arc::new(handlers::sleep),
                "fail" => Arc::new(handlers::jobs::fail_item),
                "http" => Arc::new(HttpHandler::new(
                    &cfg.handlers.http_url,
                    cfg.handlers.http_timeout_ms,
                )?),
                other => bail!(
                    "invalid handlers.enabled: unknown built-in handler {other:?} (known: noop, log, http, sleep, fail)"
                ),
            };
            builder = match &recorder {
                Some(r) => builder.handler(name, Recorded::new(h, r.clone())),
                None => builder.shared_handler(name, h),
            };
        }
    }
    let link = &cfg.coordinator;
    if !link.endpoints.trim().is_empty() {
        let recorder = match link.record_file.as_str() {
            "" => None,
            path => Some(JobRecorder::open(path, &worker_id)?),
        };
        for name in &cfg.handlers.enabled {
            let h: Arc<dyn JobHandler> = match name.as_str() {
                "noop" => Arc::new(handlers::jobs::noop),
                "log" => Arc::new(handlers::jobs::log),
                "sleep" => Arc::new(handlers::jobs::sleep),
                "fail" => Arc::new(handlers::jobs::fail),
                _ => continue,
            };
            builder = match &recorder {
                Some(r) => builder.job_handler(
                    name,
                    RecordedJob {
                        inner: h,
                        recorder: r.clone(),
                    },
                ),
                None => builder.shared_job_handler(name, h),
            };
        }
        let labels = link
            .labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        builder = builder.coordinator(SessionOptions {
            endpoints: link
                .endpoints
                .split(',')
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect(),
            group: link.group.clone(),
            capacity: link.capacity.max(1),
            labels,
            drain_timeout_ms: link.drain_timeout_ms,
            tls: link.tls(),
            token: match link.token_file.trim() {
                "" => None,
                f => Some(
                    chime_shared::auth::read_client_token(std::path::Path::new(f))
                        .context("coordinator.token_file")?,
                ),
            },
        });
    }
    let worker = builder.build()?;
    // Bound before the worker runs, so a taken port fails the start, not later.
    let deliveries = match &hub {
        None => None,
        Some(h) => Some(start_deliveries(&cfg, h.clone()).await?),
    };
    info!(worker_id = worker.id(), prefix = %layout.prefix, family = %layout.family, coordinator = %cfg.coordinator.endpoints,
          queues = layout.count, handlers = ?cfg.handlers.enabled, "chime worker starting");
    let stop_http = tokio_util::sync::CancellationToken::new();
    let http = match cfg.http_addr.trim() {
        "" => None,
        addr => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding http_addr {addr}"))?;
            info!(http = %l.local_addr()?, "probes and metrics listening");
            let router = ops::router(readiness(probe_store, draining.clone()));
            Some(tokio::spawn(ops::serve(l, router, None, stop_http.clone())))
        }
    };
    let stop_flush = tokio_util::sync::CancellationToken::new();
    let flusher = history.map(|h| {
        activity::enable();
        let stop = stop_flush.clone();
        tokio::spawn(activity::flush(activity::global(), h, async move {
            stop.cancelled().await
        }))
    });
    let signal = draining.clone();
    let report = worker
        .run(async move {
            shutdown_signal().await;
            signal.store(true, Ordering::Relaxed);
        })
        .await?;
    stop_watch.cancel();
    stop_http.cancel();
    // One last flush: what the drain settled is in the charts.
    stop_flush.cancel();
    if let Some(f) = flusher {
        let _ = f.await;
    }
    if let Some(h) = http {
        let _ = h.await;
    }
    if let Some(d) = deliveries {
        d.await??;
    }
    if let Some(e) = spans {
        e.shutdown().await;
    }
    info!(
        handled = report.handled,
        handed_back = report.handed_back,
        "chime worker stopped"
    );
    Ok(())
}
