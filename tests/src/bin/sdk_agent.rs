//! `chime-sdk-agent`: the Rust SDK's conformance agent. It does exactly what
//! `sdk/conformance/README.md` says an agent does — job handlers over a coordinator
//! session, item handlers over a chime worker's delivery service, a producer script
//! over `chime.v1.Queue`, and a bench subscriber — using only the public API of
//! `chime-worker`, the way an application would. The harness
//! (`tests/tests/sdk_conformance.rs`) starts it as a separate process.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chime_shared::clock::system_now_ms;
use chime_shared::queue::{CancelOutcome, EnqueueOutcome, ItemRef, ItemState, NewItem};
use chime_worker::producer::{Producer, ProducerOptions};
use chime_worker::{
    HandlerError, ItemContext, JobContext, SessionOptions, SubscriberOptions, Worker, WorkerError,
};
use serde_json::{Value, json};

/// Appends one JSON object per line; each line is one `write` on an append-only
/// file, so a `kill -9` loses at most the line being written.
#[derive(Clone)]
struct Records(Arc<Mutex<std::fs::File>>);

impl Records {
    fn open(path: &PathBuf) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self(Arc::new(Mutex::new(f))))
    }

    fn write(&self, kind: &str, mut fields: Value) {
        fields["kind"] = json!(kind);
        fields["at_ms"] = json!(system_now_ms());
        let mut line = fields.to_string();
        line.push('\n');
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A lost record fails the scenario that needed it; nothing to do here.
        let _ = f.write_all(line.as_bytes());
    }
}

/// `--flag value` pairs after the command.
struct Args {
    cmd: String,
    flags: BTreeMap<String, String>,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut it = std::env::args().skip(1);
        let cmd = it
            .next()
            .context("usage: chime-sdk-agent run|produce|bench --record FILE …")?;
        let mut flags = BTreeMap::new();
        while let Some(f) = it.next() {
            let name = f
                .strip_prefix("--")
                .with_context(|| format!("unexpected argument {f:?}"))?;
            let value = it
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            flags.insert(name.to_owned(), value);
        }
        Ok(Self { cmd, flags })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.flags.get(name).map(String::as_str)
    }

    fn need(&self, name: &str) -> Result<&str> {
        self.get(name)
            .with_context(|| format!("--{name} is required"))
    }

    fn token(&self) -> Result<Option<String>> {
        self.get("token-file")
            .map(|f| {
                chime_shared::auth::read_client_token(std::path::Path::new(f))
                    .map_err(anyhow::Error::from)
            })
            .transpose()
    }
}

fn main() -> Result<()> {
    chime_shared::tls::install_provider();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match args.cmd.as_str() {
            "run" => run(&args).await,
            "produce" => produce(&args).await,
            "bench" => bench(&args).await,
            other => bail!("unknown command {other:?} (run, produce, bench)"),
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn subscriber(args: &Args, endpoint: &str) -> Result<SubscriberOptions> {
    Ok(SubscriberOptions {
        endpoints: vec![endpoint.to_owned()],
        token: args.token()?,
        credit: args
            .get("credit")
            .map(str::parse)
            .transpose()?
            .unwrap_or(64),
        name: format!("rust-agent:{}", std::process::id()),
        drain_timeout_ms: args
            .get("drain-timeout-ms")
            .map(str::parse)
            .transpose()?
            .unwrap_or(10_000),
        ..SubscriberOptions::default()
    })
}

/// `run`: job handlers and/or item handlers until SIGTERM, then a drain.
async fn run(args: &Args) -> Result<()> {
    let rec = Records::open(&PathBuf::from(args.need("record")?))?;
    let worker_id = args
        .get("worker-id")
        .map(str::to_owned)
        .unwrap_or_else(chime_worker::default_worker_id);
    let mut b = Worker::builder().worker_id(worker_id.clone());
    if let Some(coordinator) = args.get("coordinator") {
        let (r1, r2) = (rec.clone(), rec.clone());
        let id = worker_id.clone();
        b = b
            .job_handler("conf.shard", move |ctx: JobContext| {
                let (rec, id) = (r1.clone(), id.clone());
                async move {
                    let line = format!("shard {}/{}", ctx.shard_index, ctx.shard_total);
                    rec.write(
                        "shard",
                        json!({"run_id": ctx.run_id, "job": ctx.job, "shard_index": ctx.shard_index,
                               "shard_total": ctx.shard_total, "attempt": ctx.attempt,
                               "params": ctx.params, "shard_params": ctx.shard_params,
                               "worker_id": id}),
                    );
                    ctx.log(line.clone());
                    Ok::<_, HandlerError>(line)
                }
            })
            .job_handler("conf.block", move |ctx: JobContext| {
                let rec = r2.clone();
                async move {
                    let fields = json!({"run_id": ctx.run_id, "shard_index": ctx.shard_index,
                                        "attempt": ctx.attempt});
                    rec.write("block_start", fields.clone());
                    let ms = serde_json::from_str::<Value>(&ctx.params)
                        .ok()
                        .and_then(|p| p["ms"].as_u64());
                    let sleep = async {
                        match ms {
                            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        _ = sleep => {
                            rec.write("block_done", fields);
                            Ok("done".to_owned())
                        }
                        _ = ctx.cancellation().cancelled() => {
                            rec.write("cancelled", fields);
                            Err(HandlerError::new("cancelled"))
                        }
                    }
                }
            })
            .job_handler("conf.fail", |_ctx: JobContext| async {
                Err::<String, _>(HandlerError::new("planned failure"))
            })
            .coordinator(SessionOptions {
                endpoints: coordinator.split(',').map(str::to_owned).collect(),
                group: args.get("group").unwrap_or("conformance").to_owned(),
                capacity: 16,
                labels: Default::default(),
                drain_timeout_ms: args
                    .get("drain-timeout-ms")
                    .map(str::parse)
                    .transpose()?
                    .unwrap_or(10_000),
                token: args.token()?,
                tls: Default::default(),
            });
    }
    if let Some(endpoint) = args.get("deliveries") {
        for h in args.get("items").unwrap_or("conf.item").split(',') {
            let rec = rec.clone();
            b = b.handler(h, move |ctx: ItemContext| item(rec.clone(), ctx));
        }
        b = b.subscribe(subscriber(args, endpoint)?);
    }
    let worker = b.build()?;
    rec.write("started", json!({"worker_id": worker_id}));
    worker.run(shutdown_signal()).await?;
    rec.write("drained", json!({}));
    Ok(())
}

/// The conformance item handler: behaves by the first item's payload.
async fn item(rec: Records, ctx: ItemContext) -> Result<(), HandlerError> {
    let items = ctx.items();
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let first = String::from_utf8_lossy(&items[0].payload).into_owned();
    let handler = items[0].handler.clone();
    let fields = |outcome: &str| {
        json!({"handler": handler, "ids": ids,
               "keys": items.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(),
               "attempts": items.iter().map(|i| i.attempt).collect::<Vec<_>>(),
               "payloads": items.iter().map(|i| String::from_utf8_lossy(&i.payload).into_owned()).collect::<Vec<_>>(),
               "merged": ctx.is_merged(), "outcome": outcome})
    };
    if first == "hold" || (first == "hold-once" && items[0].attempt == 1) {
        rec.write(
            "held",
            json!({"handler": handler, "ids": ids,
                   "attempts": items.iter().map(|i| i.attempt).collect::<Vec<_>>()}),
        );
        ctx.cancellation().cancelled().await;
        return Err(HandlerError::new("released by the drain"));
    }
    if first == "fail" {
        rec.write("item", fields("fail"));
        return Err(HandlerError::new("planned failure"));
    }
    if let Some(ms) = first.strip_prefix("fail-after:") {
        rec.write("item", fields("fail"));
        let ms = ms.parse().unwrap_or(0);
        return Err(HandlerError::new("planned failure").retry_after_ms(ms));
    }
    if let Some(ms) = first.strip_prefix("sleep:") {
        rec.write("sleeping", json!({"handler": handler, "ids": ids}));
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    rec.write("item", fields("ack"));
    Ok(())
}

/// `bench`: subscribes one handler and appends `id due_ms start_ms attempt` per item
/// (buffered, flushed every 100 ms and at exit).
async fn bench(args: &Args) -> Result<()> {
    let path = PathBuf::from(args.need("record")?);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let buf = Arc::new(Mutex::new(std::io::BufWriter::with_capacity(1 << 20, file)));
    let endpoint = args.need("deliveries")?;
    let handler = args.get("handler").unwrap_or("bench").to_owned();
    let w = buf.clone();
    let worker = Worker::builder()
        .handler(&handler, move |ctx: ItemContext| {
            let w = w.clone();
            async move {
                let start = system_now_ms();
                let mut lines = String::new();
                for i in ctx.items() {
                    lines.push_str(&format!(
                        "{} {} {} {}\n",
                        i.id, i.due_at_ms, start, i.attempt
                    ));
                }
                let _ = w
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write_all(lines.as_bytes());
                Ok::<_, HandlerError>(())
            }
        })
        .subscribe(subscriber(args, endpoint)?)
        .build()?;
    let flusher = {
        let w = buf.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = w.lock().unwrap_or_else(|p| p.into_inner()).flush();
            }
        })
    };
    worker.run(shutdown_signal()).await?;
    flusher.abort();
    buf.lock().unwrap_or_else(|p| p.into_inner()).flush()?;
    Ok(())
}

fn outcome_name(o: &EnqueueOutcome) -> &'static str {
    match o {
        EnqueueOutcome::Created => "created",
        EnqueueOutcome::Duplicate => "duplicate",
    }
}

/// `produce`: the producer script of the conformance README.
async fn produce(args: &Args) -> Result<()> {
    let rec = Records::open(&PathBuf::from(args.need("record")?))?;
    let p = Producer::connect(ProducerOptions {
        endpoint: args.need("coordinator")?.to_owned(),
        token: args.token()?,
        ..ProducerOptions::default()
    })
    .await?;
    let step = |name: &str, outcome: Value| {
        rec.write("produced", json!({"step": name, "outcome": outcome}));
    };
    let now = system_now_ms();
    let hour = now + 3_600_000;
    let out = p
        .enqueue(vec![
            NewItem::new("p-1", "conf.item", now)
                .key("user-p")
                .payload("one"),
            NewItem::new("p-2", "conf.item", hour).key("user-p"),
            NewItem::new("p-3", "conf.item", hour),
        ])
        .await?;
    step(
        "enqueue",
        json!(out.iter().map(outcome_name).collect::<Vec<_>>()),
    );
    let again = p
        .enqueue(vec![NewItem::new("p-1", "conf.item", now).key("user-p")])
        .await?;
    step(
        "enqueue-again",
        json!(again.iter().map(outcome_name).collect::<Vec<_>>()),
    );
    let state = match p.get(&ItemRef::with_key("user-p", "p-2")).await? {
        None => "not_found",
        Some(v) => match v.state {
            ItemState::Pending { .. } => "pending",
            ItemState::InFlight { .. } => "in_flight",
            ItemState::Dead { .. } => "dead",
            ItemState::Waiting { .. } => "waiting",
        },
    };
    step("get", json!(state));
    let r = p
        .reschedule(&ItemRef::with_key("user-p", "p-2"), system_now_ms())
        .await?;
    step("reschedule", json!(format!("{r:?}").to_lowercase()));
    let cancel = |o: CancelOutcome| match o {
        CancelOutcome::Cancelled => "cancelled",
        CancelOutcome::InFlight => "in_flight",
        CancelOutcome::NotFound => "not_found",
    };
    step(
        "cancel",
        json!(cancel(p.cancel(&ItemRef::new("p-3")).await?)),
    );
    step(
        "cancel-again",
        json!(cancel(p.cancel(&ItemRef::new("p-3")).await?)),
    );
    let missing = p.get(&ItemRef::new("nope")).await?;
    step(
        "get-missing",
        json!(if missing.is_none() {
            "not_found"
        } else {
            "found"
        }),
    );
    match p
        .enqueue(vec![NewItem::new("bad", "bad handler!", now)])
        .await
    {
        Err(WorkerError::InvalidArgument { field, .. }) => step("bad-input", json!(field)),
        other => bail!("a bad handler name was not refused: {other:?}"),
    }
    Ok(())
}
