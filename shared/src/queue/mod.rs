//! The delay queue: items that must fire at an exact instant.
//!
//! An item lives in one of N queues of a *family* (`default` unless told otherwise);
//! the queue is a pure function of the item's routing key and N ([`queue_for`]), so
//! every producer and consumer agrees where an item is without asking anyone. Each
//! queue holds pending items ordered by due time, in-flight items ordered by their
//! visibility deadline, and dead letters.
//!
//! Consumers take a queue's [`Lease`] (token + TTL) before popping from it; pops are
//! fenced by that token, so a consumer whose lease expired cannot pop. Popped items are
//! in flight until settled with the [`DeliveryToken`] they were popped with; a token
//! from an older delivery settles nothing. Delivery is at-least-once: an in-flight item
//! whose deadline passes becomes due again.
//!
//! [`DelayStore`] is the one contract; [`redis_store::RedisStore`] and
//! [`memory_store::MemoryStore`] implement it and pass one conformance suite.

pub mod codec;
pub mod layout;
pub mod memory_store;
mod redis_migrate;
pub mod redis_store;

pub use layout::Layout;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits;
use crate::trace::TraceContext;

/// Default number of delivery attempts before an item is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// An item a producer asks to be delivered at `due_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    /// Caller-chosen id; enqueue is idempotent on it while the item exists.
    pub id: String,
    /// Routing key (for example the user); picks the queue. Defaults to `id`.
    pub key: Option<String>,
    /// Name of the handler that processes the item.
    pub handler: String,
    /// When the item is due, Unix milliseconds.
    pub due_at_ms: i64,
    /// Opaque payload, at most [`limits::MAX_PAYLOAD_BYTES`].
    pub payload: Bytes,
    /// Delivery attempts before the item is dead-lettered (1..=100).
    pub max_attempts: u32,
    /// Items with the same routing key, handler and merge key whose due times fall
    /// within the merge window of the earliest are delivered together, at the
    /// earliest due time.
    pub merge_key: Option<String>,
    /// W3C trace context the handler's span becomes a child of.
    pub traceparent: Option<TraceContext>,
}

impl NewItem {
    /// An item with no payload, routed by its id, with the default attempts.
    pub fn new(id: impl Into<String>, handler: impl Into<String>, due_at_ms: i64) -> Self {
        Self {
            id: id.into(),
            key: None,
            handler: handler.into(),
            due_at_ms,
            payload: Bytes::new(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            merge_key: None,
            traceparent: None,
        }
    }
    /// Sets the trace context the handler's span joins (the producer's span).
    pub fn traceparent(mut self, ctx: TraceContext) -> Self {
        self.traceparent = Some(ctx);
        self
    }
    /// Sets the routing key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Sets the payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }
    /// Sets the attempts before dead-lettering.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }
    /// Sets the merge key.
    pub fn merge_key(mut self, mk: impl Into<String>) -> Self {
        self.merge_key = Some(mk.into());
        self
    }
    /// The key that picks the queue.
    pub fn routing_key(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.id)
    }
    /// The reference that finds this item again.
    pub fn item_ref(&self) -> ItemRef {
        ItemRef::with_key(self.routing_key(), &self.id)
    }
    /// Checks every field against [`limits`]; errors name the field.
    pub fn validate(&self) -> Result<()> {
        limits::check_text("id", &self.id, limits::MAX_ID_BYTES)?;
        if let Some(k) = &self.key {
            limits::check_text("key", k, limits::MAX_ID_BYTES)?;
        }
        // A handler may carry a namespace (`payments/charge`): its items are that
        // namespace's, for the tokens limited to it.
        limits::check_qualified("handler", &self.handler)?;
        limits::check_due("due_at_ms", self.due_at_ms)?;
        if self.payload.len() > limits::MAX_PAYLOAD_BYTES {
            return Err(Error::invalid(
                "payload",
                format!(
                    "is {} bytes, the limit is {}",
                    self.payload.len(),
                    limits::MAX_PAYLOAD_BYTES
                ),
            ));
        }
        if !(1..=limits::MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(Error::invalid(
                "max_attempts",
                format!(
                    "{} is outside 1..={}",
                    self.max_attempts,
                    limits::MAX_ATTEMPTS
                ),
            ));
        }
        if let Some(mk) = &self.merge_key {
            limits::check_text("merge_key", mk, limits::MAX_ID_BYTES)?;
        }
        Ok(())
    }
}

/// An item as JSON producers write it (a line of `chime queue enqueue --file`, an
/// element of the HTTP API's `items`): due at `due_at_ms`, or `in_ms` from now.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemSpec {
    /// Item id.
    pub id: String,
    /// Handler name.
    pub handler: String,
    /// Routing key (default: the id).
    #[serde(default)]
    pub key: Option<String>,
    /// Due time, Unix ms.
    #[serde(default)]
    pub due_at_ms: Option<i64>,
    /// Due this many ms from now (when `due_at_ms` is absent; 0 by default).
    #[serde(default)]
    pub in_ms: Option<i64>,
    /// Payload text.
    #[serde(default)]
    pub payload: Option<String>,
    /// Attempts before dead-lettering.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Merge key.
    #[serde(default)]
    pub merge_key: Option<String>,
    /// W3C trace context (`traceparent`) the handler's span joins.
    #[serde(default)]
    pub traceparent: Option<String>,
}

impl ItemSpec {
    /// The item, with `now_ms` resolving `in_ms` (not validated yet, except the
    /// trace context, which is parsed here: errors name `<field>.traceparent`).
    pub fn into_item(self, now_ms: i64, field: &str) -> Result<NewItem> {
        let due = self
            .due_at_ms
            .unwrap_or(now_ms.saturating_add(self.in_ms.unwrap_or(0)));
        let mut item = NewItem::new(self.id, self.handler, due)
            .max_attempts(self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS));
        item.key = self.key;
        item.merge_key = self.merge_key;
        item.payload = self.payload.unwrap_or_default().into();
        item.traceparent = parse_traceparent(field, self.traceparent.as_deref())?;
        Ok(item)
    }
}

/// An item's explicit trace context: empty or absent is none, malformed is an
/// error naming `<field>.traceparent` (unlike a request header, which a receiver
/// ignores when it cannot read it).
pub fn parse_traceparent(field: &str, raw: Option<&str>) -> Result<Option<TraceContext>> {
    match raw.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => TraceContext::parse(t)
            .map(Some)
            .map_err(|e| Error::invalid(format!("{field}.traceparent"), e)),
    }
}

/// Validates a batch, naming the index of the first bad item (`items[3].payload`).
pub fn validate_batch(items: &[NewItem]) -> Result<()> {
    if items.len() > limits::MAX_BATCH_ITEMS {
        return Err(Error::invalid(
            "items",
            format!(
                "{} items in one call, the limit is {}",
                items.len(),
                limits::MAX_BATCH_ITEMS
            ),
        ));
    }
    for (i, it) in items.iter().enumerate() {
        it.validate()
            .map_err(|e| e.in_field(&format!("items[{i}]")))?;
    }
    Ok(())
}

/// Finds an item: its routing key (which picks the queue) and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ItemRef {
    /// Routing key; equals `id` for items enqueued without a key.
    pub key: String,
    /// Item id.
    pub id: String,
}

impl ItemRef {
    /// A reference to an item enqueued without a routing key.
    pub fn new(id: impl Into<String>) -> Self {
        let id = id.into();
        Self {
            key: id.clone(),
            id,
        }
    }
    /// A reference to an item routed by `key`.
    pub fn with_key(key: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            id: id.into(),
        }
    }

    /// A reference as a caller wrote it (an empty key means the id), checked
    /// against [`limits`]; errors name `<field>.id` or `<field>.key`.
    pub fn checked(field: &str, key: String, id: String) -> Result<Self> {
        limits::check_text(&format!("{field}.id"), &id, limits::MAX_ID_BYTES)?;
        if key.is_empty() {
            return Ok(Self::new(id));
        }
        limits::check_text(&format!("{field}.key"), &key, limits::MAX_ID_BYTES)?;
        Ok(Self::with_key(key, id))
    }
}

/// A stored item as a consumer or an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// Item id.
    pub id: String,
    /// Routing key.
    pub key: String,
    /// Handler name.
    pub handler: String,
    /// Scheduled due time (the latest one asked for), Unix milliseconds.
    pub due_at_ms: i64,
    /// Opaque payload.
    #[serde(serialize_with = "serialize_payload")]
    pub payload: Bytes,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// Merge key, if any.
    pub merge_key: Option<String>,
    /// Delivery attempts made so far; in a delivery, the number of this attempt (1-based).
    pub attempt: u32,
    /// The producer's trace context, if it gave one.
    #[serde(
        serialize_with = "serialize_traceparent",
        skip_serializing_if = "Option::is_none"
    )]
    pub traceparent: Option<TraceContext>,
}

fn serialize_traceparent<S: serde::Serializer>(
    t: &Option<TraceContext>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(t),
        None => s.serialize_none(),
    }
}

fn serialize_payload<S: serde::Serializer>(
    p: &Bytes,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match std::str::from_utf8(p) {
        Ok(text) => s.serialize_str(text),
        Err(_) => s.serialize_bytes(p),
    }
}

/// Where an item is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ItemState {
    /// Waiting in its queue; fires at `due_score_ms` (a retry's backoff included).
    Pending {
        /// When it becomes due, Unix milliseconds.
        due_score_ms: i64,
    },
    /// Handed to a consumer; due again at `deadline_ms` unless settled or extended.
    InFlight {
        /// Visibility deadline, Unix milliseconds.
        deadline_ms: i64,
        /// Cancelled while in flight: it will not be retried or redelivered.
        cancelled: bool,
    },
    /// Out of attempts; kept in the dead-letter set until requeued or cancelled.
    Dead {
        /// When it was dead-lettered, Unix milliseconds.
        since_ms: i64,
    },
    /// Due, but no consumer that popped it serves its handler: parked, attempt not
    /// counted, until a consumer serving the handler pops its queue.
    Waiting {
        /// Its due time, Unix milliseconds.
        due_score_ms: i64,
    },
}

/// An item with its state, as `get` and the dead-letter listing return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemView {
    /// The item.
    pub item: Item,
    /// Queue index it lives in.
    pub queue: u32,
    /// Its state.
    #[serde(flatten)]
    pub state: ItemState,
    /// The error of its last failed attempt.
    pub last_error: Option<String>,
}

/// What `enqueue` did with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnqueueOutcome {
    /// Stored; it will fire.
    Created,
    /// An item with this id exists (pending, in flight or dead); nothing changed.
    Duplicate,
}

/// What `cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// Removed before it fired (or removed from the dead-letter set).
    Cancelled,
    /// Already handed to a worker: it may be running now. It will not be retried or
    /// redelivered.
    InFlight,
    /// No such item (never enqueued, already fired, or already cancelled).
    NotFound,
}

/// What `reschedule` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RescheduleOutcome {
    /// The item now fires at the new time.
    Rescheduled,
    /// Already handed to a worker; unchanged.
    InFlight,
    /// Dead-lettered; requeue it instead.
    Dead,
    /// No such item.
    NotFound,
}

/// A consumer's exclusive right to pop from one queue, until `ttl` runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Queue index.
    pub queue: u32,
    /// Fencing token; pops carrying an older token are refused.
    pub token: String,
}

/// Parameters of one pop.
#[derive(Debug, Clone)]
pub struct PopOptions {
    /// Most items returned (merged items included).
    pub max_items: u32,
    /// How long popped items stay invisible before they are due again.
    pub visibility_ms: u64,
    /// The lease is extended to this TTL by every successful pop.
    pub lease_ttl_ms: u64,
    /// Items sharing routing key, handler and merge key whose due times are within
    /// this window of the earliest are delivered with it.
    pub merge_window_ms: u64,
    /// Handlers the popping consumer serves now: items of these handlers that are
    /// waiting for a handler ([`Outcome::Park`]) become due again first, so this pop
    /// can take them. Empty: nothing is taken back.
    pub serves: Arc<[String]>,
}

impl Default for PopOptions {
    fn default() -> Self {
        Self {
            max_items: 256,
            visibility_ms: 30_000,
            lease_ttl_ms: 5_000,
            merge_window_ms: 60_000,
            serves: Arc::from(Vec::new()),
        }
    }
}

/// Identifies one delivery of one item: settling needs it, so a consumer holding an
/// older delivery (its visibility expired, the item went elsewhere) settles nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryToken {
    /// Attempt number of this delivery (1-based).
    pub attempt: u32,
    /// The queue's delivery counter at the pop that made this delivery; unique per
    /// queue, so two deliveries of one id (even of two items that reused the id one
    /// after the other) never share a token.
    pub seq: u64,
    /// Where a store that keeps a pop's first attempts as one batch put this one:
    /// its 1-based position in batch `seq`; 0 for a delivery of its own (a retry, or
    /// a store without batches).
    pub pos: u32,
}

impl DeliveryToken {
    /// The in-flight set member of this delivery of item `id`:
    /// `id \x01 seq \x01 attempt`.
    pub fn member(&self, id: &str) -> String {
        format!(
            "{id}{sep}{}{sep}{}",
            self.seq,
            self.attempt,
            sep = codec::SEP
        )
    }
}

/// One popped item and the token that settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The item; `item.attempt` is this delivery's attempt.
    pub item: Item,
    /// Settles this delivery.
    pub token: DeliveryToken,
}

/// What a handler receives: one item, or several merged ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Queue the items came from.
    pub queue: u32,
    /// The items, earliest due first; more than one when merged.
    pub items: Vec<Claimed>,
}

/// The answer of one pop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Popped {
    /// The store's clock at the pop (Redis `TIME`), Unix milliseconds.
    pub now_ms: i64,
    /// The earliest instant something in this queue needs attention (a pending item
    /// falls due or an in-flight deadline passes); `None` when the queue is empty.
    pub next_due_ms: Option<i64>,
    /// What was popped.
    pub deliveries: Vec<Delivery>,
}

impl Popped {
    /// Number of items popped, merged ones included.
    pub fn item_count(&self) -> usize {
        self.deliveries.iter().map(|d| d.items.len()).sum()
    }
}

/// How a consumer ends a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; the item is deleted.
    Ack,
    /// Failed; due again after `delay_ms`, or dead-lettered when out of attempts.
    Retry {
        /// Backoff before the next attempt.
        delay_ms: u64,
        /// Why it failed; kept as the item's last error.
        error: String,
    },
    /// Handed back unprocessed (a draining worker): due now, the attempt not counted.
    Release,
    /// Nobody serves the item's handler on the consumer that popped it: the item
    /// waits, out of reach of pops, the attempt not counted, until a consumer whose
    /// [`PopOptions::serves`] names its handler pops its queue.
    Park,
}

/// One settled delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Item id (unique within the queue).
    pub id: String,
    /// The delivery being settled.
    pub token: DeliveryToken,
    /// How.
    pub outcome: Outcome,
}

/// The horizon of [`QueueStats::due_soon`], ms.
pub const DUE_SOON_MS: i64 = 60_000;

/// Counts for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Queue index.
    pub queue: u32,
    /// Items waiting (not yet due and due).
    pub pending: u64,
    /// Pending items already due.
    pub due_now: u64,
    /// Pending items due within [`DUE_SOON_MS`] (including those due now).
    pub due_soon: u64,
    /// Items handed to consumers and not yet settled.
    pub in_flight: u64,
    /// Dead letters.
    pub dead: u64,
    /// Earliest pending due time.
    pub next_due_ms: Option<i64>,
    /// Items a resize is moving out of this queue right now.
    pub moving: u64,
    /// Items waiting for a consumer that serves their handler ([`Outcome::Park`]).
    pub waiting: u64,
}

impl QueueStats {
    /// How long the earliest pending item has been due at `now_ms` (the store's
    /// clock), ms: 0 when nothing is due. The queue's lag as an operator sees it.
    pub fn oldest_due_age_ms(&self, now_ms: i64) -> u64 {
        self.next_due_ms.map_or(0, |due| {
            u64::try_from(now_ms.saturating_sub(due)).unwrap_or(0)
        })
    }
}

/// What one migration step on a leased queue did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateStep {
    /// Items moved to their new home.
    pub moved: u64,
    /// The queue holds nothing misplaced for the current layout (nothing left to do).
    pub clean: bool,
}

/// A queue's earliest pending item is now earlier than before: idle consumers should
/// look at `queue` at `due_at_ms` rather than at the end of their idle sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// The queue, in the layout of the process that moved the head.
    pub queue: u32,
    /// The new earliest due time, store clock (ms).
    pub due_at_ms: i64,
}

impl Wake {
    /// "Anything may have changed": sent when a subscription (re)starts, since
    /// announcements made while it was down are gone.
    pub const ALL: Wake = Wake {
        queue: u32::MAX,
        due_at_ms: i64::MIN,
    };
}

/// The delay-queue contract. Implementations: [`redis_store::RedisStore`] (production) and
/// [`memory_store::MemoryStore`] (`chime dev`, unit tests); both pass the conformance suite.
#[async_trait]
pub trait DelayStore: Send + Sync + fmt::Debug {
    /// The layout this process uses now.
    fn layout(&self) -> Layout;

    /// The queue family this store serves (the activity history counts per family).
    fn family(&self) -> &str {
        "default"
    }

    /// Number of queues consumers poll: every queue of every live layout.
    fn queue_count(&self) -> u32 {
        self.layout().poll_count()
    }

    /// Asks for `count` queues, as set by config `revision` (ordered: an older
    /// revision changes nothing). Starts a resize when the count changes.
    async fn apply_layout(&self, count: u32, revision: i64) -> Result<Layout>;

    /// Re-reads the layout from the store (another process may have changed it).
    async fn refresh_layout(&self) -> Result<Layout>;

    /// A resize may still have work on `queue`.
    fn wants_migration(&self, queue: u32) -> bool;

    /// Moves up to `max_items` misplaced items out of the leased queue to their
    /// current home, and notes when the queue is clean; retires the draining layouts
    /// once every queue is.
    async fn migrate(&self, lease: &Lease, max_items: u32) -> Result<MigrateStep>;

    /// The store's clock, Unix milliseconds (Redis `TIME` for Redis).
    async fn now_ms(&self) -> Result<i64>;

    /// Stores items; answers per item, in order. Validates the whole batch first:
    /// one bad item refuses the batch and stores nothing.
    async fn enqueue(&self, items: Vec<NewItem>) -> Result<Vec<EnqueueOutcome>>;

    /// Looks an item up.
    async fn get(&self, item: &ItemRef) -> Result<Option<ItemView>>;

    /// Cancels an item that has not fired.
    async fn cancel(&self, item: &ItemRef) -> Result<CancelOutcome>;

    /// Moves a pending item's due time, earlier or later.
    async fn reschedule(&self, item: &ItemRef, due_at_ms: i64) -> Result<RescheduleOutcome>;

    /// Hands out the next value of the family's shared claim counter; consumers take
    /// it mod N to pick the next queue to try, so two consumers rarely collide.
    async fn next_claim_ticket(&self) -> Result<u64>;

    /// Announcements that a queue's earliest pending item moved earlier (enqueue,
    /// reschedule, requeue; from any process), so idle consumers need not wait for
    /// their next look. Hints only: a missed one costs latency up to a consumer's
    /// idle cap, never an item. `None`: this store does not announce. Every
    /// (re)subscription starts with [`Wake::ALL`] (what was announced before it is
    /// not delivered). The channel ends when the store can no longer announce;
    /// dropping the receiver stops the subscription.
    async fn wakes(&self) -> Option<tokio::sync::mpsc::Receiver<Wake>> {
        None
    }

    /// Tries to take the lease on `queue`; `None` when someone else holds it.
    async fn claim(&self, queue: u32, ttl_ms: u64) -> Result<Option<Lease>>;

    /// Gives a lease up early (no-op if it is no longer ours).
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// Pops due items, fenced by the lease (which it extends). Reaps in-flight items
    /// whose deadline passed first. [`Error::StaleLease`] if the lease is lost.
    async fn pop(&self, lease: &Lease, opts: PopOptions) -> Result<Popped>;

    /// Settles deliveries of one queue; answers per settlement whether it applied
    /// (false: the token is stale, the item was settled or redelivered meanwhile).
    async fn settle(&self, queue: u32, settlements: Vec<Settlement>) -> Result<Vec<bool>>;

    /// Pushes the visibility deadline of in-flight deliveries to now + `visibility_ms`;
    /// answers how many were extended.
    async fn extend(
        &self,
        queue: u32,
        items: &[(String, DeliveryToken)],
        visibility_ms: u64,
    ) -> Result<usize>;

    /// Counts per queue.
    async fn stats(&self) -> Result<Vec<QueueStats>>;

    /// Items waiting for a handler ([`Outcome::Park`]), per handler, over all queues.
    async fn waiting_by_handler(&self) -> Result<std::collections::BTreeMap<String, u64>>;

    /// Up to `limit` dead letters across all queues.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<ItemView>>;

    /// Puts dead letters back in their queue, due now with attempts reset: the listed
    /// ones, or up to `limit` of all when `items` is empty. Answers how many moved.
    async fn requeue_dead(&self, items: &[ItemRef], limit: usize) -> Result<usize>;
}

/// FNV-1a, 64 bit: a stable, documented hash other languages can reproduce.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Jump consistent hash (Lamping & Veach 2014): maps `key` to `0..buckets` so that
/// growing from N to N+1 buckets moves only 1/(N+1) of the keys.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets.max(1));
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The queue of routing key `key` among `count` queues:
/// `jump_hash(fnv1a64(key), count)`.
pub fn queue_for(key: &str, count: u32) -> u32 {
    jump_hash(fnv1a64(key.as_bytes()), count)
}

/// Draws a fresh lease token.
pub(crate) fn new_lease_token() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_due_age_counts_only_what_is_due() {
        let at = |next_due_ms| QueueStats {
            queue: 0,
            pending: 1,
            due_now: 0,
            due_soon: 0,
            in_flight: 0,
            dead: 0,
            next_due_ms,
            moving: 0,
            waiting: 0,
        };
        assert_eq!(at(None).oldest_due_age_ms(10_000), 0);
        assert_eq!(at(Some(12_000)).oldest_due_age_ms(10_000), 0, "not due yet");
        assert_eq!(at(Some(10_000)).oldest_due_age_ms(10_000), 0);
        assert_eq!(at(Some(7_500)).oldest_due_age_ms(10_000), 2_500);
    }

    #[test]
    fn placement_is_stable_and_spread() {
        // Pinned values: other languages must compute the same queue.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut counts = [0u32; 8];
        for i in 0..80_000 {
            counts[queue_for(&format!("user:{i}"), 8) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn jump_hash_moves_few_keys_when_growing() {
        let moved = (0..10_000)
            .filter(|i| {
                let k = fnv1a64(format!("k{i}").as_bytes());
                jump_hash(k, 8) != jump_hash(k, 9)
            })
            .count();
        // Ideal is 1/9 of keys (about 1,111).
        assert!((900..1_400).contains(&moved), "moved {moved}");
    }

    #[test]
    fn validation_names_fields() {
        let big = NewItem::new("a", "h", 1).payload(vec![0u8; limits::MAX_PAYLOAD_BYTES + 1]);
        let e = validate_batch(&[NewItem::new("ok", "h", 1), big]).unwrap_err();
        assert!(e.to_string().starts_with("invalid items[1].payload"), "{e}");
        let e = NewItem::new("a", "h", 1)
            .max_attempts(0)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("max_attempts"), "{e}");
    }
}

/// Names one queue family in one deployment: where its keys live and how many queues
/// it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLayout {
    /// Key prefix of the deployment (`chime` by default); benchmarks use their own.
    pub prefix: String,
    /// Queue family (`default` by default).
    pub family: String,
    /// Number of queues N.
    pub count: u32,
}

/// Most queues a family may have.
pub const MAX_QUEUES: u32 = 4096;

impl QueueLayout {
    /// A layout, checked: prefix and family are short names, `1 <= count <= 4096`.
    pub fn new(prefix: impl Into<String>, family: impl Into<String>, count: u32) -> Result<Self> {
        let layout = Self {
            prefix: prefix.into(),
            family: family.into(),
            count,
        };
        limits::check_handler("prefix", &layout.prefix)?;
        limits::check_handler("family", &layout.family)?;
        if !(1..=MAX_QUEUES).contains(&count) {
            return Err(Error::invalid(
                "queue_count",
                format!("{count} is outside 1..={MAX_QUEUES}"),
            ));
        }
        Ok(layout)
    }
}

/// Counts created items per handler in `chime_items_enqueued_total`.
pub(crate) fn count_enqueued<'a>(
    family: &str,
    handlers: impl Iterator<Item = &'a str>,
    outcomes: &[EnqueueOutcome],
) {
    let created = outcomes
        .iter()
        .filter(|o| **o == EnqueueOutcome::Created)
        .count();
    crate::activity::add(family, crate::activity::Kind::Enqueued, created as u64);
    let mut per: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for (h, o) in handlers.zip(outcomes) {
        if *o == EnqueueOutcome::Created {
            *per.entry(h).or_default() += 1;
        }
    }
    for (h, n) in per {
        metrics::counter!(crate::telemetry::ITEMS_ENQUEUED, "handler" => h.to_owned()).increment(n);
    }
}
