//! `chime queue …`: produce and inspect delayed items. Every subcommand prints JSON
//! on stdout; bad input exits non-zero with an error naming the field.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DEFAULT_MAX_ATTEMPTS, DelayStore, ItemRef, ItemSpec, NewItem};
use chime_shared::redis_conn::RedisConn;
use clap::Subcommand;
use serde_json::json;

use crate::config::{self, ClientConfig};
use crate::{StoreArgs, init_logging};

/// `chime queue` arguments.
#[derive(Debug, clap::Args)]
pub struct QueueArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    cmd: QueueCmd,
}

#[derive(Debug, Subcommand)]
enum QueueCmd {
    /// Enqueue one item (flags) or many (`--file`, JSON lines).
    Enqueue(EnqueueArgs),
    /// Show one item and its state.
    Get(RefArgs),
    /// Cancel an item that has not fired.
    Cancel(RefArgs),
    /// Move a pending item's due time.
    Reschedule {
        #[command(flatten)]
        r: RefArgs,
        #[command(flatten)]
        when: When,
    },
    /// Counts per queue.
    Stats,
    /// List or requeue dead letters.
    DeadLetter {
        #[command(subcommand)]
        cmd: DeadCmd,
    },
}

#[derive(Debug, clap::Args)]
struct RefArgs {
    /// Item id.
    #[arg(long)]
    id: String,
    /// Routing key the item was enqueued with (defaults to the id).
    #[arg(long)]
    key: Option<String>,
}

impl RefArgs {
    fn item_ref(&self) -> ItemRef {
        match &self.key {
            Some(k) => ItemRef::with_key(k, &self.id),
            None => ItemRef::new(&self.id),
        }
    }
}

#[derive(Debug, clap::Args)]
#[group(required = false, multiple = false)]
struct When {
    /// Due time, Unix milliseconds.
    #[arg(long)]
    due_at_ms: Option<i64>,
    /// Due in this many milliseconds from now (Redis time).
    #[arg(long)]
    in_ms: Option<i64>,
}

impl When {
    async fn resolve(&self, store: &dyn DelayStore) -> Result<i64> {
        Ok(match (self.due_at_ms, self.in_ms) {
            (Some(t), _) => t,
            (None, Some(d)) => store.now_ms().await? + d,
            (None, None) => store.now_ms().await?,
        })
    }
}

#[derive(Debug, clap::Args)]
struct EnqueueArgs {
    /// JSON-lines file of items: {"id", "handler", "due_at_ms" or "in_ms", "key",
    /// "payload", "max_attempts", "merge_key"}. `-` reads standard input.
    #[arg(long, conflicts_with_all = ["id", "handler"])]
    file: Option<PathBuf>,
    /// Item id.
    #[arg(long, required_unless_present = "file")]
    id: Option<String>,
    /// Handler name.
    #[arg(long, required_unless_present = "file")]
    handler: Option<String>,
    /// Routing key (defaults to the id).
    #[arg(long)]
    key: Option<String>,
    #[command(flatten)]
    when: When,
    /// Payload text.
    #[arg(long)]
    payload: Option<String>,
    /// Attempts before dead-lettering.
    #[arg(long, default_value_t = DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// Merge key.
    #[arg(long)]
    merge_key: Option<String>,
    /// Items per enqueue call when reading a file.
    #[arg(long, default_value_t = 5_000)]
    chunk: usize,
}

#[derive(Debug, Subcommand)]
enum DeadCmd {
    /// List dead letters with their last error.
    List {
        /// Most to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Requeue dead letters (due now, attempts reset): the given ids, or `--all`.
    Requeue {
        /// Ids to requeue (routing key = id unless `--key`).
        #[arg(long)]
        id: Vec<String>,
        /// Routing key of the given ids.
        #[arg(long)]
        key: Option<String>,
        /// Requeue up to `--limit` of all dead letters.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Most to requeue with `--all`.
        #[arg(long, default_value_t = 1_000)]
        limit: usize,
    },
}

/// Connects to the configured Redis store.
pub async fn connect(store: &StoreArgs) -> Result<RedisStore> {
    let mut cfg: ClientConfig = config::load(store.config.as_deref(), config::chime_env())?;
    store.apply(&mut cfg.redis, &mut cfg.queue, &mut cfg.etcd);
    init_logging(&cfg.log.format, "warn");
    let conn = RedisConn::connect(&cfg.redis.spec()?)
        .await
        .with_context(|| format!("connecting to Redis at {}", crate::redacted(&cfg.redis.url)))?;
    Ok(RedisStore::open(conn, cfg.queue.layout()?).await?)
}

/// Runs a `chime queue` subcommand.
pub async fn run(args: QueueArgs) -> Result<()> {
    let store: Arc<dyn DelayStore> = Arc::new(connect(&args.store).await?);
    let out = match args.cmd {
        QueueCmd::Enqueue(e) => enqueue(store.as_ref(), e).await?,
        QueueCmd::Get(r) => match store.get(&r.item_ref()).await? {
            Some(v) => serde_json::to_value(v)?,
            None => bail!("item {:?} not found", r.id),
        },
        QueueCmd::Cancel(r) => json!({ "id": r.id, "outcome": store.cancel(&r.item_ref()).await? }),
        QueueCmd::Reschedule { r, when } => {
            let due = when.resolve(store.as_ref()).await?;
            json!({ "id": r.id, "due_at_ms": due, "outcome": store.reschedule(&r.item_ref(), due).await? })
        }
        QueueCmd::Stats => {
            let stats = store.stats().await?;
            let total =
                |f: fn(&chime_shared::queue::QueueStats) -> u64| stats.iter().map(f).sum::<u64>();
            json!({
                "queues": stats.len(),
                "pending": total(|s| s.pending),
                "due_now": total(|s| s.due_now),
                "in_flight": total(|s| s.in_flight),
                "dead": total(|s| s.dead),
                "waiting": total(|s| s.waiting),
                "waiting_by_handler": store.waiting_by_handler().await?,
                "per_queue": stats,
            })
        }
        QueueCmd::DeadLetter {
            cmd: DeadCmd::List { limit },
        } => serde_json::to_value(store.dead_letters(limit).await?)?,
        QueueCmd::DeadLetter {
            cmd:
                DeadCmd::Requeue {
                    id,
                    key,
                    all,
                    limit,
                },
        } => {
            if id.is_empty() && !all {
                bail!("give --id (one or more) or --all");
            }
            let refs: Vec<ItemRef> = id
                .iter()
                .map(|i| match &key {
                    Some(k) => ItemRef::with_key(k, i),
                    None => ItemRef::new(i),
                })
                .collect();
            json!({ "requeued": store.requeue_dead(&refs, limit).await? })
        }
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

async fn enqueue(store: &dyn DelayStore, e: EnqueueArgs) -> Result<serde_json::Value> {
    let Some(path) = e.file else {
        let due = e.when.resolve(store).await?;
        let mut item = NewItem::new(
            e.id.clone().unwrap_or_default(),
            e.handler.unwrap_or_default(),
            due,
        )
        .max_attempts(e.max_attempts);
        item.key = e.key;
        item.merge_key = e.merge_key;
        if let Some(p) = e.payload {
            item.payload = p.into();
        }
        // Validate alone first, so errors name the flag (`payload`, not `items[0].payload`).
        item.validate()?;
        let outcome = store.enqueue(vec![item]).await?;
        return Ok(json!({ "id": e.id, "due_at_ms": due, "outcome": outcome[0] }));
    };
    // Bulk: read JSON lines, enqueue in chunks, show progress on stderr.
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?,
        ))
    };
    let now = store.now_ms().await?;
    let started = std::time::Instant::now();
    let (mut created, mut duplicates, mut chunk) = (0u64, 0u64, Vec::new());
    let flush = |chunk: Vec<NewItem>, line: usize| async move {
        let outcomes = store
            .enqueue(chunk)
            .await
            .with_context(|| format!("in the chunk ending at line {line}"))?;
        Ok::<_, anyhow::Error>(outcomes)
    };
    let mut lines = 0usize;
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        lines = n + 1;
        let l: ItemSpec = serde_json::from_str(&line).with_context(|| format!("line {lines}"))?;
        chunk.push(l.into_item(now, &format!("line {lines}"))?);
        if chunk.len() >= e.chunk.max(1) {
            for o in flush(std::mem::take(&mut chunk), lines).await? {
                count(o, &mut created, &mut duplicates);
            }
            let rate = (created + duplicates) as f64 / started.elapsed().as_secs_f64().max(1e-3);
            eprintln!("enqueued {} items ({rate:.0}/s)", created + duplicates);
        }
    }
    if !chunk.is_empty() {
        for o in flush(chunk, lines).await? {
            count(o, &mut created, &mut duplicates);
        }
    }
    Ok(
        json!({ "created": created, "duplicates": duplicates, "seconds": started.elapsed().as_secs_f64() }),
    )
}

fn count(o: chime_shared::queue::EnqueueOutcome, created: &mut u64, dup: &mut u64) {
    match o {
        chime_shared::queue::EnqueueOutcome::Created => *created += 1,
        chime_shared::queue::EnqueueOutcome::Duplicate => *dup += 1,
    }
}
