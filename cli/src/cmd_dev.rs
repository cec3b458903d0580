//! `chime dev`: chime in one process with nothing to install. A coordinator (the
//! real one, with its gRPC gateway, web console and JSON API, on in-memory job and
//! run stores), two workers connected to it over gRPC and sharing the embedded
//! in-memory delay store, and a demo: a sharded cron job every 5 s, and a producer
//! that schedules coupon reminders a few seconds ahead (some for the same user close
//! together, so they merge; some cancelled). Each shard and reminder is printed as
//! it fires.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chime_coordinator::Deps;
use chime_coordinator::engine::EngineOptions;
use chime_coordinator::grpc::Auth;
use chime_coordinator::model::{JobSpec, Misfire, Overlap, Routing, Schedule};
use chime_coordinator::store::{JobStore, MemoryRunStore};
use chime_shared::activity::{self, HistoryStore, MemoryHistory};
use chime_shared::auth::{Role, Tokens};
use chime_shared::clock::{Clock, SystemClock, system_now_ms};
use chime_shared::config::source::MemorySource;
use chime_shared::config::watcher;
use chime_shared::queue::memory_store::MemoryStore;
use chime_shared::queue::{CancelOutcome, DelayStore, NewItem};
use chime_shared::ratelimit::MemoryLimiter;
use chime_worker::delivery::server::{self, Access};
use chime_worker::{
    ConsumerOptions, HandlerError, Hub, HubOptions, ItemContext, JobContext, Live, SessionOptions,
    Worker,
};
use tokio::net::TcpListener;
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
    /// Console and JSON API address (another free port when taken).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: String,
    /// gRPC address of the in-process coordinator (another free port when taken).
    #[arg(long, default_value = "127.0.0.1:7070")]
    grpc_addr: String,
    /// Address of the delivery service (`chime.v1.Deliveries`) apps in any language
    /// subscribe to (another free port when taken).
    #[arg(long, default_value = "127.0.0.1:7071")]
    deliveries_addr: String,
    /// Require this admin token in the console and the admin API.
    #[arg(long)]
    admin_token: Option<String>,
    /// Also take this token, as a viewer (reads only; needs --admin-token): to try
    /// the console as someone who may look but not change.
    #[arg(long, requires = "admin_token")]
    viewer_token: Option<String>,
    /// Also take this token, as an admin of one namespace only (needs
    /// --admin-token and --team-namespace): to try the console as a team sees it.
    #[arg(long, requires_all = ["admin_token", "team_namespace"])]
    team_token: Option<String>,
    /// The namespace of --team-token.
    #[arg(long, requires = "team_token")]
    team_namespace: Option<String>,
    /// Export trace spans over OTLP/gRPC to this receiver (`http://127.0.0.1:4317`,
    /// a local Jaeger or OpenTelemetry Collector); the demo's fires are traced.
    #[arg(long, env = "CHIME_TRACING_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
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

/// Binds `addr`, or any free port on the same host when it is taken (a second
/// `chime dev`, another program on 8080): a first run must not fail on a port.
async fn bind_or_any(addr: &str, what: &str) -> Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let host = addr.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
            let l = TcpListener::bind((host, 0))
                .await
                .with_context(|| format!("binding {what} on {host}"))?;
            println!(
                "  note     {addr} is taken; {what} uses {} instead",
                l.local_addr()?
            );
            Ok(l)
        }
        Err(e) => Err(e).with_context(|| format!("binding {what} {addr}")),
    }
}

/// The demo's sharded report: each shard "scans" its slice of orders, logging as
/// it goes (the lines reach the run's log tail in the console).
async fn report(ctx: JobContext, worker: String) -> Result<String, HandlerError> {
    let started = system_now_ms();
    let orders = 500 + fastrand::u32(0..1_500);
    ctx.log(format!(
        "scanning orders of slice {}/{}",
        ctx.shard_index, ctx.shard_total
    ));
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(0..600))) => {}
        _ = ctx.cancellation().cancelled() => return Err(HandlerError::new("cancelled")),
    }
    ctx.log(format!("{orders} orders, {} unpaid", orders / 17));
    println!(
        "[{}] SHARD     {} {}/{} on {} ({} orders, lag {} ms)",
        clock(system_now_ms()),
        ctx.job,
        ctx.shard_index,
        ctx.shard_total,
        worker,
        orders,
        started - ctx.scheduled_at_ms
    );
    Ok(format!("{orders} orders scanned"))
}

/// Echoes its params: for jobs created in the console.
async fn echo(ctx: JobContext, worker: String) -> Result<String, HandlerError> {
    let line = format!(
        "{} shard {}/{} params {:?}",
        ctx.job, ctx.shard_index, ctx.shard_total, ctx.params
    );
    ctx.log(line.clone());
    println!(
        "[{}] SHARD     {line} on {}",
        clock(system_now_ms()),
        worker
    );
    Ok(format!("echo: {}", ctx.params))
}

/// The demo's sharded job.
fn demo_job() -> JobSpec {
    JobSpec {
        name: "demo-report".into(),
        group: DEMO_GROUP.into(),
        handler: "demo.report".into(),
        schedule: Schedule::Cron {
            expr: "*/5 * * * * *".into(),
            time_zone: String::new(),
        },
        routing: Routing::ShardingBroadcast,
        shard_count: 4,
        shard_params: Vec::new(),
        hash_param: String::new(),
        params: String::new(),
        overlap: Overlap::Skip,
        misfire: Misfire::Skip,
        catch_up_window_ms: 0,
        timeout_ms: 10_000,
        retries: 1,
        retry_backoff_ms: 500,
        children: Vec::new(),
        paused: false,
        start_at_ms: 0,
        end_at_ms: 0,
        jitter_ms: 0,
        created_at_ms: 0,
        workflow: None,
    }
}

/// The workers' group in the demo.
const DEMO_GROUP: &str = "demo";

/// Runs the embedded demo until Ctrl-C (or `--exit-after-s`).
pub async fn run(args: DevArgs) -> Result<()> {
    init_logging("text", "warn");
    if let Some(ns) = &args.team_namespace {
        chime_shared::limits::check_namespace("--team-namespace", ns)?;
    }
    let spans = crate::config::TracingSection {
        otlp_endpoint: args.otlp_endpoint.clone().unwrap_or_default(),
        ..Default::default()
    }
    .start("chime-dev", "dev")?;
    let clock_src: Arc<dyn Clock> = Arc::new(SystemClock);
    let store: Arc<dyn DelayStore> = Arc::new(MemoryStore::new(args.queues, clock_src.clone()));
    // Jobs and live settings in memory (etcd's stand-in), watched like etcd would be.
    let source = Arc::new(MemorySource::default());
    let grpc = bind_or_any(&args.grpc_addr, "gRPC").await?;
    let http = bind_or_any(&args.http_addr, "the console").await?;
    let deliveries = bind_or_any(&args.deliveries_addr, "the delivery service").await?;
    let grpc_at = grpc.local_addr()?;
    let deliveries_at = deliveries.local_addr()?;
    let http_at = http.local_addr()?;
    println!("chime dev: everything in one process, nothing to install");
    match &args.admin_token {
        Some(_) => {
            println!("  console  http://{http_at}/  (log in with the --admin-token you gave)")
        }
        None => println!("  console  http://{http_at}/  (no login; --admin-token T requires one)"),
    }
    println!("  gRPC     {grpc_at}  (try: chime workers --coordinator http://{grpc_at})");
    println!(
        "  items    {deliveries_at}  (chime.v1.Deliveries: subscribe handlers from any language, no token)"
    );
    println!(
        "  store    embedded in-memory delay queue, {} queues; jobs and settings in memory",
        args.queues
    );
    println!(
        "  workers  dev-worker-1, dev-worker-2 in group \"{DEMO_GROUP}\": job handlers demo.report, demo.echo; item handlers \"remind\", \"fail\" (always fails: retries, then a dead letter)"
    );
    println!("  demo     job \"demo-report\": 4 shards every 5 s, spread over both workers");
    println!(
        "           a coupon reminder every {} ms, due 2-6 s ahead; reminders for one user",
        args.demo_interval_ms
    );
    println!("           due within 60 s of each other are merged; some are cancelled");
    println!("  stop     Ctrl-C");

    let stop = CancellationToken::new();
    let stop_coord = CancellationToken::new();
    // The console's charts: the same last hour, kept in memory (one recorder and
    // one flusher for the coordinator and both workers of this process).
    let history: Arc<dyn HistoryStore> = Arc::new(MemoryHistory::new(clock_src.clone()));
    activity::enable();
    {
        let stop = stop_coord.clone();
        tokio::spawn(activity::flush(
            activity::global(),
            history.clone(),
            async move { stop.cancelled().await },
        ));
    }
    let jobs = JobStore::new(source.clone());
    let deps = Deps {
        cluster: "chime-dev".into(),
        family: "default".into(),
        jobs: jobs.clone(),
        runs: Arc::new(MemoryRunStore::default()),
        clock: clock_src.clone(),
        options: EngineOptions {
            heartbeat_interval_ms: 1_000,
            dead_after_beats: 3,
            advertise: grpc_at.to_string(),
            ..EngineOptions::default()
        },
        election: None,
        queues: Some(store.clone()),
        history: Some(history),
        config: Some(source.clone()),
        tls: Default::default(),
        peer_tls: None,
        auth: Auth {
            admin: args.admin_token.clone().map(|t| {
                let viewer = args.viewer_token.clone().map(|v| (v, Role::Viewer, None));
                let team = args
                    .team_token
                    .clone()
                    .zip(args.team_namespace.clone())
                    .map(|(t, ns)| (t, Role::Admin, Some(vec![ns])));
                Arc::new(Tokens::fixed_limited(
                    std::iter::once((t, Role::Admin, None))
                        .chain(viewer)
                        .chain(team),
                ))
            }),
            worker: None,
            producer: None,
            metrics_require_token: false,
        },
    };
    let coordinator = tokio::spawn(chime_coordinator::serve(
        deps,
        grpc,
        Some(http),
        stop_coord.clone(),
    ));
    jobs.create(demo_job(), clock_src.now_ms())
        .await
        .context("creating the demo job")?;

    let (config, _watch) = watcher::start(source, stop.clone()).await;
    let live = Live {
        config,
        family: "default".into(),
        limiter: Some(Arc::new(MemoryLimiter::new(clock_src.clone()))),
    };
    let opts = ConsumerOptions {
        pollers: 2,
        retry_base_ms: 200,
        drain_timeout_ms: 2_000,
        ..ConsumerOptions::default()
    };
    // Both workers hand items of handlers they do not have to the apps subscribed
    // here (sdk/python/examples/quickstart.py, say).
    let hub = Hub::new(HubOptions {
        worker_id: "dev-workers".into(),
        family: "default".into(),
        settle_timeout_ms: 30_000,
    });
    let serving = {
        let hub = hub.clone();
        tokio::spawn(server::serve(
            deliveries,
            hub.clone(),
            Access::Open,
            None,
            async move { hub.stopped().await },
        ))
    };
    let mut workers = Vec::new();
    for i in 1..=2 {
        let id = format!("dev-worker-{i}");
        let (id1, id2) = (id.clone(), id.clone());
        let w = Worker::builder()
            .delay_store(store.clone())
            .worker_id(id)
            .handler("remind", remind)
            // Failures to look at: the console's failure charts and dead letters.
            .handler("fail", crate::handlers::jobs::fail_item)
            .job_handler("demo.report", move |ctx| report(ctx, id1.clone()))
            .job_handler("demo.echo", move |ctx| echo(ctx, id2.clone()))
            .coordinator(SessionOptions {
                endpoints: vec![format!("http://{grpc_at}")],
                group: DEMO_GROUP.into(),
                capacity: 8,
                labels: Default::default(),
                drain_timeout_ms: 2_000,
                token: None,
                tls: Default::default(),
            })
            .options(opts.clone())
            .live(live.clone())
            .deliveries(hub.clone())
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
    // Workers drain first (telling the coordinator), then the coordinator stops.
    stop.cancel();
    let _ = producer.await;
    for w in workers {
        w.await??;
    }
    hub.shutdown();
    serving.await??;
    stop_coord.cancel();
    coordinator.await??;
    if let Some(e) = spans {
        e.shutdown().await;
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
