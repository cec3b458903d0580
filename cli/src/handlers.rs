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

    fn record(&self, ctx: &ItemContext) -> std::io::Result<()> {
        use std::fmt::Write as _;
        let now = system_now_ms();
        let mut buf = String::new();
        for it in ctx.items() {
            let _ = writeln!(buf, "{} {} {} {}", it.id, it.due_at_ms, now, it.attempt);
        }
        (&self.file).write_all(buf.as_bytes())
    }
}

/// Wraps a handler so successful deliveries are recorded before they are acked.
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
        self.inner.handle(ctx.clone()).await?;
        self.recorder
            .record(&ctx)
            .map_err(|e| HandlerError::new(format!("recording failed: {e}")))
    }
}
