//! The generic worker's built-in handlers: `noop`, `log`, `http` and `sleep`, and the
//! recording wrapper benchmarks and tests use to count what was handled.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chime_shared::clock::system_now_ms;
use chime_worker::{HandlerError, ItemContext, ItemHandler};
use serde::Serialize;
use tracing::info;

/// Does nothing and succeeds.
pub async fn noop(_ctx: ItemContext) -> Result<(), HandlerError> {
    Ok(())
}

/// Sleeps for the number of milliseconds in the first item's payload (default 100),
/// then succeeds; stops early, failing, when the worker abandons it. For tests and
/// demos of slow handlers.
pub async fn sleep(ctx: ItemContext) -> Result<(), HandlerError> {
    let ms = std::str::from_utf8(&ctx.item().payload)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(100);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(()),
        _ = ctx.cancellation().cancelled() => Err(HandlerError::new("abandoned by a draining worker")),
    }
}

/// Logs each item (id, key, lag, payload size) and succeeds.
pub async fn log(ctx: ItemContext) -> Result<(), HandlerError> {
    let now = system_now_ms();
    for item in ctx.items() {
        info!(item_id = %item.id, key = %item.key, handler = %item.handler,
              attempt = item.attempt, lag_ms = now - item.due_at_ms,
              payload_bytes = item.payload.len(), merged = ctx.is_merged(), "item fired");
    }
    Ok(())
}

/// POSTs each delivery as JSON to a URL; a non-2xx answer or a timeout fails it.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    url: String,
}

#[derive(Serialize)]
struct HttpBody<'a> {
    worker_id: &'a str,
    items: &'a [chime_shared::queue::Item],
}

impl HttpHandler {
    /// A handler posting to `url` with `timeout_ms` per request.
    pub fn new(url: &str, timeout_ms: u64) -> anyhow::Result<Self> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!("invalid handlers.http_url: {url:?} is not an http(s) URL");
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout_ms.max(1)))
            .build()?;
        Ok(Self {
            client,
            url: url.to_owned(),
        })
    }
}

#[async_trait]
impl ItemHandler for HttpHandler {
    async fn handle(&self, ctx: ItemContext) -> Result<(), HandlerError> {
        let body = HttpBody {
            worker_id: ctx.worker_id(),
            items: ctx.items(),
        };
        let resp = self
            .client
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| HandlerError::new(format!("POST {}: {e}", self.url)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(HandlerError::new(format!(
                "POST {} answered {status}",
                self.url
            )));
        }
        Ok(())
    }
}

/// Appends one line per handled item to a file, with one `write` per delivery so the
/// lines reach the kernel before the delivery is acknowledged (a `kill -9` after the
/// ack cannot lose them).
#[derive(Debug)]
pub struct Recorder {
    file: std::fs::File,
}

impl Recorder {
    /// Opens (creates, appends to) `path`.
    pub fn open(path: &str) -> anyhow::Result<Arc<Self>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("invalid handlers.record_file {path:?}: {e}"))?;
        Ok(Arc::new(Self { file }))
    }

    /// Records `ctx`'s items as started at `started_ms`.
    fn record(&self, ctx: &ItemContext, started_ms: i64) -> std::io::Result<()> {
        use std::fmt::Write as _;
        let now = started_ms;
        let mut buf = String::new();
        for it in ctx.items() {
            let _ = writeln!(buf, "{} {} {} {}", it.id, it.due_at_ms, now, it.attempt);
        }
        (&self.file).write_all(buf.as_bytes())
    }
}

/// Wraps a handler so successful deliveries are recorded (with the time the handler
/// started) before they are acked.
pub struct Recorded {
    inner: Arc<dyn ItemHandler>,
    recorder: Arc<Recorder>,
}

impl Recorded {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ItemHandler>, recorder: Arc<Recorder>) -> Self {
        Self { inner, recorder }
    }
}

#[async_trait]
impl ItemHandler for Recorded {
    async fn handle(&self, ctx: ItemContext) -> Result<(), HandlerError> {
        // The time a delivery reached its handler, taken before the handler runs: an
        // early delivery shows as early however long the handler takes.
        let started = system_now_ms();
        self.inner.handle(ctx.clone()).await?;
        self.recorder
            .record(&ctx, started)
            .map_err(|e| HandlerError::new(format!("recording failed: {e}")))
    }
}

/// Built-in job handlers, and an item handler that always fails (tests).
pub mod jobs {
    use std::io::Write;
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use chime_shared::clock::system_now_ms;
    use chime_worker::{HandlerError, ItemContext, JobContext, JobHandler};
    use tracing::info;

    /// The number in `text` (plain, or the `key` field of a JSON object, or of its
    /// `params` object: a workflow node's own params are there).
    fn number(text: &str, key: &str) -> Option<u64> {
        let t = text.trim();
        t.parse().ok().or_else(|| {
            let v = serde_json::from_str::<serde_json::Value>(t).ok()?;
            v.get(key).or_else(|| v.get("params")?.get(key))?.as_u64()
        })
    }

    /// Succeeds at once.
    pub async fn noop(_ctx: JobContext) -> Result<String, HandlerError> {
        Ok(String::new())
    }

    /// Logs the shard and succeeds.
    pub async fn log(ctx: JobContext) -> Result<String, HandlerError> {
        info!(run_id = %ctx.run_id, job = %ctx.job, shard = ctx.shard_index, total = ctx.shard_total,
              attempt = ctx.attempt, lag_ms = system_now_ms() - ctx.scheduled_at_ms, "shard running");
        ctx.log(format!(
            "shard {}/{} running",
            ctx.shard_index, ctx.shard_total
        ));
        Ok(format!("shard {}/{}", ctx.shard_index, ctx.shard_total))
    }

    /// Sleeps `sleep_ms` (shard params, else params: a number or `{"sleep_ms": n}`;
    /// default 100) and succeeds; stops when cancelled.
    pub async fn sleep(ctx: JobContext) -> Result<String, HandlerError> {
        let ms = number(&ctx.shard_params, "sleep_ms")
            .or_else(|| number(&ctx.params, "sleep_ms"))
            .unwrap_or(100);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(format!("slept {ms} ms")),
            _ = ctx.cancellation().cancelled() => Err(HandlerError::new("cancelled")),
        }
    }

    /// Fails while the attempt is at most `fail_attempts` of the params (default:
    /// always), then succeeds.
    pub async fn fail(ctx: JobContext) -> Result<String, HandlerError> {
        let until = number(&ctx.params, "fail_attempts").unwrap_or(u64::MAX);
        if u64::from(ctx.attempt) <= until {
            return Err(HandlerError::new(format!(
                "failing on purpose (attempt {})",
                ctx.attempt
            )));
        }
        Ok(format!("succeeded on attempt {}", ctx.attempt))
    }

    /// The item handler that always fails.
    pub async fn fail_item(_ctx: ItemContext) -> Result<(), HandlerError> {
        Err(HandlerError::new("failing on purpose"))
    }

    /// Appends one line per finished shard: `job run_id shard total attempt
    /// started_ms finished_ms status worker scheduled_ms`.
    #[derive(Debug)]
    pub struct JobRecorder {
        file: std::fs::File,
        worker: String,
    }

    impl JobRecorder {
        /// Opens (creates, appends to) `path`.
        pub fn open(path: &str, worker: &str) -> anyhow::Result<Arc<Self>> {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("invalid coordinator.record_file {path:?}: {e}"))?;
            Ok(Arc::new(Self {
                file,
                worker: worker.to_owned(),
            }))
        }
    }

    /// Wraps a job handler to record each finished shard.
    pub struct RecordedJob {
        /// The handler.
        pub inner: Arc<dyn JobHandler>,
        /// Where to record.
        pub recorder: Arc<JobRecorder>,
    }

    #[async_trait]
    impl JobHandler for RecordedJob {
        async fn run(&self, ctx: JobContext) -> Result<String, HandlerError> {
            let started = system_now_ms();
            let r = self.inner.run(ctx.clone()).await;
            let status = match &r {
                Ok(_) => "succeeded",
                Err(_) if ctx.cancellation().is_cancelled() => "cancelled",
                Err(_) => "failed",
            };
            let line = format!(
                "{} {} {} {} {} {} {} {} {} {}\n",
                ctx.job,
                ctx.run_id,
                ctx.shard_index,
                ctx.shard_total,
                ctx.attempt,
                started,
                system_now_ms(),
                status,
                self.recorder.worker,
                ctx.scheduled_at_ms
            );
            let _ = (&self.recorder.file).write_all(line.as_bytes());
            r
        }
    }
}
