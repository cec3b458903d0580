//! What a handler is and what it receives.
//!
//! A handler gets an [`ItemContext`]: one item, or several merged items (same routing
//! key, handler and merge key, due within the merge window), plus a cancellation token
//! that fires when the worker's drain timeout runs out. Returning `Ok` acknowledges
//! every item of the delivery; returning an error retries them with exponential
//! backoff (or dead-letters them when out of attempts).

use std::future::Future;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use chime_shared::queue::Item;
use chime_shared::trace::TraceContext;
use tokio_util::sync::CancellationToken;

/// The delivery a handler processes.
#[derive(Debug, Clone)]
pub struct ItemContext {
    pub(crate) items: Vec<Item>,
    /// The worker's token that fires when it gives up waiting for handlers.
    pub(crate) abandon: Arc<CancellationToken>,
    /// The handler's own token, a child of `abandon`, made the first time the
    /// handler asks: most handlers never do, and a child token per delivery (an
    /// allocation, and the parent's lock taken twice) was a measurable share of a
    /// worker's time per item.
    pub(crate) cancel: OnceLock<CancellationToken>,
    pub(crate) worker_id: Arc<str>,
    pub(crate) queue: u32,
    pub(crate) trace: Option<TraceContext>,
}

impl ItemContext {
    /// A delivery's context; its cancellation token is made only if asked for.
    pub(crate) fn new(
        items: Vec<Item>,
        abandon: &Arc<CancellationToken>,
        worker_id: Arc<str>,
        queue: u32,
        trace: Option<TraceContext>,
    ) -> Self {
        Self {
            items,
            abandon: abandon.clone(),
            cancel: OnceLock::new(),
            worker_id,
            queue,
            trace,
        }
    }
    /// The items, earliest due first (one unless merged).
    pub fn items(&self) -> &[Item] {
        &self.items
    }
    /// The first (earliest) item.
    pub fn item(&self) -> &Item {
        &self.items[0]
    }
    /// More than one item was merged into this delivery.
    pub fn is_merged(&self) -> bool {
        self.items.len() > 1
    }
    /// Fires when the worker gives up waiting for this handler (drain timeout); the
    /// items are then handed back to the queue, so stop quickly and return.
    pub fn cancellation(&self) -> &CancellationToken {
        self.cancel.get_or_init(|| self.abandon.child_token())
    }
    /// Id of the worker running the handler.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }
    /// Queue the delivery came from.
    pub fn queue(&self) -> u32 {
        self.queue
    }
    /// The chime worker's span of this delivery (a child of the producer's trace
    /// context), when the items carry a sampled one: give it to your tracer as the
    /// parent of the handler's own spans (`traceparent`: `to_string()`).
    pub fn trace_context(&self) -> Option<TraceContext> {
        self.trace
    }
}

/// A failed delivery: the items are retried with backoff, or dead-lettered with
/// this message when out of attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// What went wrong; kept as the items' last error.
    pub message: String,
    /// Overrides the exponential backoff before the next attempt.
    pub retry_after_ms: Option<u64>,
}

impl HandlerError {
    /// An error with `message` and the default backoff.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry_after_ms: None,
        }
    }
    /// Sets the delay before the next attempt.
    pub fn retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

impl From<String> for HandlerError {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl From<&str> for HandlerError {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<std::io::Error> for HandlerError {
    fn from(e: std::io::Error) -> Self {
        Self::new(e.to_string())
    }
}

impl std::fmt::Debug for dyn ItemHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ItemHandler")
    }
}

/// Processes deliveries of one handler name. Implemented for async closures
/// `Fn(ItemContext) -> impl Future<Output = Result<(), HandlerError>>`.
#[async_trait]
pub trait ItemHandler: Send + Sync + 'static {
    /// Handles one delivery.
    async fn handle(&self, ctx: ItemContext) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> ItemHandler for F
where
    F: Fn(ItemContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, ctx: ItemContext) -> Result<(), HandlerError> {
        (self)(ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(abandon: &Arc<CancellationToken>) -> ItemContext {
        ItemContext::new(Vec::new(), abandon, Arc::from("w"), 0, None)
    }

    /// The token made on demand fires with the worker's, whether the handler asked
    /// for it before or after the worker gave up, and cancelling it touches no other
    /// delivery.
    #[test]
    fn a_handlers_token_follows_the_workers_and_is_its_own() {
        let abandon = Arc::new(CancellationToken::new());
        let (early, late, other) = (ctx(&abandon), ctx(&abandon), ctx(&abandon));
        assert!(!early.cancellation().is_cancelled());
        early.cancellation().cancel();
        assert!(!abandon.is_cancelled() && !other.cancellation().is_cancelled());
        abandon.cancel();
        assert!(other.cancellation().is_cancelled());
        assert!(late.cancellation().is_cancelled());
    }
}
