//! The queue consumer: pollers, dispatch, settling, visibility extension, drain.
//!
//! Flow of one item: a **poller** takes capacity (permits of the in-flight
//! semaphore) *before* it claims a queue, so it never holds a lease it cannot use;
//! it claims the queue picked by the shared ticket counter, pops up to its capacity,
//! and spawns one task per delivery (a delivery for a subscriber of the hub whose
//! handler has no live limit is offered to the hub instead, which ends it in a
//! callback: no task). The task waits for its handler's concurrency slot and rate
//! limit, runs the handler, and sends the outcome to the **settler**, which batches
//! settlements per queue into one script call. The permits travel with the
//! settlement and are dropped only once the store has recorded it, so the number of
//! items a worker holds (popped, running, or awaiting settlement) never exceeds
//! `max_in_flight`: memory stays flat however deep the backlog. The **extender**
//! pushes visibility deadlines forward while handlers run.
//!
//! Idle pollers do not spin: each pop reports when its queue next needs attention,
//! and pollers sleep until the earliest such instant, never longer than
//! `idle_sleep_max_ms`. What they learn of items enqueued meanwhile comes from the
//! store's wakes ([`DelayStore::wakes`]: a queue's earliest due time moved earlier),
//! which wake the pollers at once; without them (a store that does not announce, a
//! lost announcement) a queue's view is at most `idle_sleep_max_ms` stale.
//!
//! A delivery runs on one of the worker's own handlers, or — when the worker has a
//! [`Hub`] — on a subscriber in another process that runs its handler. A delivery
//! nobody here serves is parked in its queue (`Outcome::Park`: no attempt counted)
//! and every pop names the handlers served here, so the store hands parked items
//! back to the first worker that serves them. A worker whose only handlers are
//! remote and that has no subscriber does not claim queues at all.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chime_shared::clock::system_now_ms;
use chime_shared::queue::{
    DelayStore, Delivery, DeliveryToken, Item, Lease, Outcome, PopOptions, Popped, Settlement, Wake,
};
use chime_shared::{Error, activity, telemetry as m};
use futures_util::FutureExt;
use futures_util::future::join_all;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::delivery::{Hub, Offer, Remote, Verdict};
use crate::handler::{ItemContext, ItemHandler};
use crate::live::{self, Gate, Knobs, Live};
use crate::{Registered, WorkerError};
use chime_shared::trace::{Span, SpanKind, TraceContext};

/// How the consumer behaves. Defaults suit a reminder workload; every field is in
/// the unit its name says.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Concurrent pollers (queues this worker drains at once). Default 2.
    pub pollers: usize,
    /// Most items per pop. Default 256.
    pub batch: u32,
    /// Most items this worker holds at once (popped, running or being settled).
    /// Bounds memory. Default 2048.
    pub max_in_flight: usize,
    /// Visibility timeout: an item not settled nor extended by then is redelivered.
    /// Default 30 s.
    pub visibility_ms: u64,
    /// Queue lease TTL, renewed by every pop. Default 5 s.
    pub lease_ttl_ms: u64,
    /// Merge window. Default 60 s.
    pub merge_window_ms: u64,
    /// Longest idle sleep between looks at a queue. Default 1 s.
    pub idle_sleep_max_ms: u64,
    /// How long a drain waits for running handlers before handing their items back.
    /// Default 25 s.
    pub drain_timeout_ms: u64,
    /// First retry backoff; doubles per attempt. Default 1 s.
    pub retry_base_ms: u64,
    /// Longest retry backoff. Default 5 min.
    pub retry_max_ms: u64,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            pollers: 2,
            batch: 256,
            max_in_flight: 2048,
            visibility_ms: 30_000,
            lease_ttl_ms: 5_000,
            merge_window_ms: 60_000,
            idle_sleep_max_ms: 1_000,
            drain_timeout_ms: 25_000,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
        }
    }
}

impl ConsumerOptions {
    /// Refuses settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad =
            |field: &str, why: &str| Err(WorkerError::Config(format!("invalid {field}: {why}")));
        if !(1..=64).contains(&self.pollers) {
            return bad("pollers", "must be within 1..=64");
        }
        if !(1..=5_000).contains(&self.batch) {
            return bad("batch", "must be within 1..=5000");
        }
        if !(1..=1_000_000).contains(&self.max_in_flight) {
            return bad("max_in_flight", "must be within 1..=1000000");
        }
        if self.visibility_ms < 100 {
            return bad("visibility_ms", "must be at least 100");
        }
        if self.lease_ttl_ms < 100 {
            return bad("lease_ttl_ms", "must be at least 100");
        }
        if !(1..=60_000).contains(&self.idle_sleep_max_ms) {
            return bad("idle_sleep_max_ms", "must be within 1..=60000");
        }
        if self.retry_base_ms == 0 || self.retry_max_ms < self.retry_base_ms {
            return bad("retry_base_ms", "must be positive and at most retry_max_ms");
        }
        Ok(())
    }
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Deliveries whose handler finished (success or failure) during the run.
    pub handled: u64,
    /// Deliveries handed back unprocessed because the drain timeout ran out.
    pub handed_back: u64,
}

#[derive(Debug, Clone, Copy)]
enum Known {
    Unknown,
    /// What a pop said at local time `seen_ms`: the next instant (store clock) the
    /// queue needs attention, `None` when empty.
    At {
        seen_ms: i64,
        next_due: Option<i64>,
    },
}

/// One batch of settlements of a delivery, with the capacity it frees once recorded.
#[derive(Debug)]
struct SettleMsg {
    queue: u32,
    settlements: Vec<Settlement>,
    _permit: OwnedSemaphorePermit,
}

/// A delivery's item ids and tokens, in delivery order.
type Tokens = Arc<Vec<(String, DeliveryToken)>>;

/// A delivery between its start and its end (see [`Consumer::start`]).
#[derive(Debug)]
struct Started {
    queue: u32,
    /// Item ids and their delivery tokens, in delivery order; shared with the
    /// in-flight table under `key` until the delivery ends.
    tokens: Tokens,
    /// The delivery's key in the in-flight table.
    key: u64,
    handler: String,
    /// Attempt of the first item.
    attempt: u32,
    /// Every item is on its last attempt: a failure dead-letters them.
    last_attempt: bool,
    /// The handler's slot, if it has one (its meters, and who runs it).
    slot: Option<Arc<Slot>>,
    /// A handler here or a subscriber runs it (`slot` is then set); false: parked.
    runs: bool,
    trace: Option<TraceContext>,
    trace_span: Option<Span>,
    /// The delivery's share of the in-flight capacity, until it is settled.
    permit: OwnedSemaphorePermit,
}

/// What runs one handler name on this worker, with its live limits.
#[derive(Debug)]
struct Slot {
    /// The handler name.
    name: String,
    /// The handler in this process; `None`: subscribers of the hub run it.
    local: Option<Arc<dyn ItemHandler>>,
    gate: Gate,
    /// One rate-limit request at a time per handler (see `live::throttle`).
    rate_turn: tokio::sync::Mutex<()>,
    meters: Meters,
}

impl Slot {
    fn new(
        name: &str,
        local: Option<Arc<dyn ItemHandler>>,
        concurrency: Option<usize>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            local,
            gate: Gate::new(concurrency),
            rate_turn: tokio::sync::Mutex::new(()),
            meters: Meters::new(name),
        })
    }
}

/// The metrics of one handler, registered once: a labelled `counter!` per delivery
/// would allocate its label and look it up in the registry every time.
#[derive(Debug)]
struct Meters {
    fired: metrics::Counter,
    lag: metrics::Histogram,
    acked: metrics::Counter,
    retried: metrics::Counter,
    dead: metrics::Counter,
    released: metrics::Counter,
    parked: metrics::Counter,
    /// `chime_deliveries_total` by outcome, in [`REMOTE_OUTCOMES`] order.
    remote: Vec<metrics::Counter>,
}

/// The `outcome` labels of `chime_deliveries_total`.
const REMOTE_OUTCOMES: [&str; 7] = [
    "ack",
    "fail",
    "release",
    "timeout",
    "gone",
    "abandoned",
    "parked",
];

impl Meters {
    fn new(handler: &str) -> Self {
        let h = handler.to_owned();
        Self {
            fired: metrics::counter!(m::ITEMS_FIRED, "handler" => h.clone()),
            lag: metrics::histogram!(m::FIRE_LAG_SECONDS, "handler" => h.clone()),
            acked: metrics::counter!(m::ITEMS_ACKED, "handler" => h.clone()),
            retried: metrics::counter!(m::ITEMS_RETRIED, "handler" => h.clone()),
            dead: metrics::counter!(m::ITEMS_DEAD_LETTERED, "handler" => h.clone()),
            released: metrics::counter!(m::ITEMS_RELEASED, "handler" => h.clone()),
            parked: metrics::counter!(m::ITEMS_PARKED, "handler" => h.clone()),
            remote: REMOTE_OUTCOMES
                .iter()
                .map(|o| metrics::counter!(m::DELIVERIES, "handler" => h.clone(), "outcome" => *o))
                .collect(),
        }
    }

    fn remote(&self, outcome: &str) -> Option<&metrics::Counter> {
        let i = REMOTE_OUTCOMES.iter().position(|o| *o == outcome)?;
        self.remote.get(i)
    }
}

/// The handlers a pop names as served (see [`PopOptions::serves`]), rebuilt when
/// the hub's subscriptions change.
#[derive(Debug)]
struct Served {
    hub_version: u64,
    names: Arc<[String]>,
}

/// The running consumer of one worker.
#[derive(Debug)]
pub struct Consumer {
    store: Arc<dyn DelayStore>,
    worker_id: Arc<str>,
    /// Local handlers from the start; remote ones added as deliveries need them.
    slots: RwLock<HashMap<String, Arc<Slot>>>,
    /// Names of the local handlers, sorted.
    local_names: Vec<String>,
    hub: Option<Arc<Hub>>,
    /// This consumer's owner id at the hub (see [`Offer::owner`]).
    owner: u64,
    served: Mutex<Served>,
    /// The hub version the pollers' view of the queues was formed under.
    looked_under: AtomicU64,
    opts: ConsumerOptions,
    permits: Arc<Semaphore>,
    /// Every delivery popped and not yet settled, by a number of this worker's: its
    /// queue and its items' ids and tokens (what the extender keeps visible). One
    /// entry a delivery, sharing the delivery's list: no id copied or hashed per
    /// item on the hot path, which the extender's walk every few seconds pays
    /// instead.
    in_flight: Mutex<HashMap<u64, (u32, Tokens)>>,
    /// The next key in `in_flight`.
    next_delivery: AtomicU64,
    known: Mutex<Vec<Known>>,
    /// Per queue, the earliest due time the store announced since this worker last
    /// looked there (`i64::MAX`: none). Kept apart from `known`, which a pop that
    /// started before the announcement overwrites with an older view.
    hinted: Mutex<Vec<i64>>,
    /// Bumped, and the pollers notified, on every announcement: a poller compares
    /// the generation it started its turn under, so none sleeps through one.
    wake_gen: AtomicU64,
    woken: Notify,
    /// Store clock minus local clock, as seen by the last pop (ms).
    offset_ms: AtomicI64,
    stop_claiming: CancellationToken,
    /// Fires when the drain stops waiting for handlers. In an `Arc` because every
    /// delivery's context holds it (an `Arc` clone is one atomic add; a token's
    /// clone takes its lock).
    abandon: Arc<CancellationToken>,
    settle_tx: mpsc::UnboundedSender<SettleMsg>,
    settle_rx: Mutex<Option<mpsc::UnboundedReceiver<SettleMsg>>>,
    handled: AtomicU64,
    handed_back: AtomicU64,
    live: Option<Live>,
    knobs: Knobs,
}

impl Consumer {
    pub(crate) fn new(
        store: Arc<dyn DelayStore>,
        worker_id: String,
        handlers: HashMap<String, Registered>,
        opts: ConsumerOptions,
        live: Option<Live>,
        hub: Option<Arc<Hub>>,
    ) -> Arc<Self> {
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let mut local_names: Vec<String> = handlers.keys().cloned().collect();
        local_names.sort();
        let slots = handlers
            .into_iter()
            .map(|(name, reg)| {
                let slot = Slot::new(&name, Some(reg.handler), reg.concurrency);
                (name, slot)
            })
            .collect();
        Arc::new(Self {
            served: Mutex::new(Served {
                hub_version: u64::MAX,
                names: local_names.clone().into(),
            }),
            local_names,
            owner: hub.as_ref().map_or(0, |h| h.owner()),
            hub,
            looked_under: AtomicU64::new(0),
            slots: RwLock::new(slots),
            knobs: Knobs::new(opts.visibility_ms, opts.merge_window_ms),
            live,
            permits: Arc::new(Semaphore::new(opts.max_in_flight)),
            known: Mutex::new(vec![Known::Unknown; store.queue_count() as usize]),
            hinted: Mutex::new(vec![i64::MAX; store.queue_count() as usize]),
            wake_gen: AtomicU64::new(0),
            woken: Notify::new(),
            store,
            worker_id: worker_id.into(),
            opts,
            in_flight: Mutex::new(HashMap::new()),
            next_delivery: AtomicU64::new(0),
            offset_ms: AtomicI64::new(0),
            stop_claiming: CancellationToken::new(),
            abandon: Arc::new(CancellationToken::new()),
            settle_tx,
            settle_rx: Mutex::new(Some(settle_rx)),
            handled: AtomicU64::new(0),
            handed_back: AtomicU64::new(0),
        })
    }

    /// Consumes until `shutdown` completes, then drains. The drain reads top to
    /// bottom: stop claiming, (job sessions tell the coordinator), finish in-flight
    /// work within the drain timeout, hand back the rest, stop.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<DrainReport, WorkerError> {
        let rx = lock(&self.settle_rx)
            .take()
            .ok_or_else(|| WorkerError::Config("consumer already running".into()))?;
        let done = CancellationToken::new();
        let settler = tokio::spawn(self.clone().settler(rx, done.clone()));
        let extender = tokio::spawn(self.clone().extender(done.clone()));
        let watcher = tokio::spawn(self.clone().follow_config(done.clone()));
        let wakes = self
            .store
            .wakes()
            .await
            .map(|rx| tokio::spawn(self.clone().follow_wakes(rx, done.clone())));
        let pollers: Vec<JoinHandle<()>> = (0..self.opts.pollers)
            .map(|i| tokio::spawn(self.clone().poller(i)))
            .collect();
        info!(worker_id = %self.worker_id, pollers = self.opts.pollers,
              max_in_flight = self.opts.max_in_flight, "worker consuming");

        shutdown.await;

        // 1. Mark draining: no new queue is claimed, no new item popped. Each poller
        //    releases its lease as it stops, so other workers can take over at once.
        info!(worker_id = %self.worker_id, "draining: stopped claiming queues");
        self.stop_claiming.cancel();
        for p in pollers {
            let _ = p.await;
        }
        // 2. (Job sessions tell the coordinator they are draining here.)
        // 3. Finish in-flight work. All capacity back = every popped item settled.
        let all = self.opts.max_in_flight as u32;
        let drain = Duration::from_millis(self.opts.drain_timeout_ms);
        let finished = tokio::time::timeout(drain, self.permits.acquire_many(all))
            .await
            .is_ok();
        // 4. Hand back what is still running: handlers see their cancellation token,
        //    their items go back to the queue due now, the attempt not counted.
        if !finished {
            warn!(worker_id = %self.worker_id, "drain timeout: handing back running items");
            self.abandon.cancel();
            // Deliveries held by subscribers end `Abandoned` (handed back) now.
            if let Some(hub) = &self.hub {
                hub.abandon(self.owner);
            }
            let _ =
                tokio::time::timeout(Duration::from_secs(10), self.permits.acquire_many(all)).await;
        }
        // 5. Stop: every settlement is recorded (capacity returns only after that).
        done.cancel();
        let _ = settler.await;
        let _ = extender.await;
        let _ = watcher.await;
        if let Some(w) = wakes {
            let _ = w.await;
        }
        let report = DrainReport {
            handled: self.handled.load(Ordering::Relaxed),
            handed_back: self.handed_back.load(Ordering::Relaxed),
        };
        info!(worker_id = %self.worker_id, handled = report.handled,
              handed_back = report.handed_back, "worker stopped");
        Ok(report)
    }

    fn store_now(&self) -> i64 {
        system_now_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    async fn poller(self: Arc<Self>, idx: usize) {
        debug!(poller = idx, "poller started");
        while !self.stop_claiming.is_cancelled() {
            // Before this turn looks at anything: an announcement from now on ends
            // its idle sleep.
            let wake_gen = self.wake_gen.load(Ordering::Acquire);
            // Nothing to run items on (remote handlers only, no subscriber yet):
            // claim nothing, so items stay due (not parked) until someone serves.
            if !self.wait_for_a_handler().await {
                return;
            }
            // Capacity first: never hold a lease we cannot use.
            let permit = tokio::select! {
                p = self.permits.clone().acquire_many_owned(self.want()) => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = self.stop_claiming.cancelled() => return,
            };
            match self.claim_next().await {
                Ok(Claim::Got(lease)) => {
                    self.drain_queue(&lease, permit).await;
                    self.migrate(&lease).await;
                    if let Err(e) = self.store.release(&lease).await {
                        store_error("release", &e);
                    }
                }
                Ok(Claim::AllBusy) => {
                    drop(permit);
                    self.pause(Duration::from_millis(50), None).await;
                }
                Ok(Claim::NothingDue) => {
                    drop(permit);
                    let wait = self.idle_wait();
                    self.pause(wait, Some(wake_gen)).await;
                }
                Err(e) => {
                    drop(permit);
                    store_error("claim", &e);
                    self.pause(Duration::from_millis(500), None).await;
                }
            }
        }
    }

    /// Waits until some handler runs here (always true with local handlers); false
    /// when claiming stopped meanwhile.
    async fn wait_for_a_handler(&self) -> bool {
        let Some(hub) = self.hub.as_ref().filter(|_| self.local_names.is_empty()) else {
            return true;
        };
        loop {
            let changed = hub.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !hub.served().is_empty() {
                return true;
            }
            tokio::select! {
                _ = changed => {},
                // A safety net: a missed notification costs a second, not forever.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {},
                _ = self.stop_claiming.cancelled() => return false,
            }
        }
    }

    /// The handlers this worker serves now: its own and its subscribers'.
    fn serves(&self) -> Arc<[String]> {
        let Some(hub) = &self.hub else {
            return lock(&self.served).names.clone();
        };
        let version = hub.version();
        let mut s = lock(&self.served);
        if s.hub_version != version {
            let mut names: Vec<String> = self.local_names.clone();
            names.extend(hub.served().iter().cloned());
            names.sort();
            names.dedup();
            *s = Served {
                hub_version: version,
                names: names.into(),
            };
        }
        s.names.clone()
    }

    /// The slot of `handler`: a local one, or a remote one made on first use while a
    /// subscriber of the hub serves it (with the live concurrency setting in force;
    /// a name nobody serves makes no slot, so garbage handler names cost nothing).
    fn slot(&self, handler: &str) -> Option<Arc<Slot>> {
        if let Some(s) = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(handler)
        {
            return Some(s.clone());
        }
        if !self.hub.as_ref()?.serves(handler) {
            return None;
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .entry(handler.to_owned())
            .or_insert_with(|| Slot::new(handler, None, None))
            .clone();
        if let Some(live) = &self.live {
            let c = live.config.current();
            slot.gate
                .resize(c.handler(handler).concurrency.map(|c| c as usize));
        }
        Some(slot)
    }

    /// Permits to ask for: up to a batch, at least `min_pop`.
    fn want(&self) -> u32 {
        (self.permits.available_permits() as u32).clamp(self.min_pop(), self.opts.batch)
    }

    /// The least capacity a pop asks for: a whole batch, or all of `max_in_flight`
    /// when that is smaller. A pop never cuts a merge group at its capacity
    /// boundary but does cut a group larger than what it asked for; asking for a
    /// batch at least means only groups larger than a batch are ever split, however
    /// busy this worker is. Under saturation the poller therefore waits until a
    /// batch of capacity is free, which is also when popping pays.
    fn min_pop(&self) -> u32 {
        self.opts.batch.min(self.opts.max_in_flight as u32)
    }

    /// Sleeps `d`, or less when claiming stops, a subscriber joins or leaves (a
    /// newly served handler may have items waiting), or — with `wake_gen`, the
    /// generation the caller's turn started under — the store announced something
    /// since.
    async fn pause(&self, d: Duration, wake_gen: Option<u64>) {
        let notified = self.woken.notified();
        tokio::pin!(notified);
        // Registered before the generation is compared, so an announcement between
        // the two still ends the sleep.
        notified.as_mut().enable();
        let woken = async {
            match wake_gen {
                Some(g) if self.wake_gen.load(Ordering::Acquire) != g => {}
                Some(_) => notified.await,
                None => std::future::pending().await,
            }
        };
        let changed = async {
            match &self.hub {
                Some(h) => h.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(d) => {},
            _ = self.stop_claiming.cancelled() => {},
            _ = changed => {},
            _ = woken => {},
        }
    }

    /// Which queues are worth a look now: unknown ones, ones whose last look is older
    /// than the idle cap, and ones with something due.
    fn candidates(&self) -> Vec<u32> {
        let n = self.store.queue_count();
        let (local, now) = (system_now_ms(), self.store_now());
        // Asked before `known` is locked: the hub may end a delivery (and so call
        // `expect`, which locks `known`) while it holds its own lock.
        let hub_version = self.hub.as_ref().map(|h| h.version());
        let mut known = lock(&self.known);
        known.resize(n as usize, Known::Unknown);
        // A handler newly served here may have items waiting in any queue: look at
        // every queue now rather than after the idle sleep.
        if let Some(v) = hub_version
            && self.looked_under.swap(v, Ordering::Relaxed) != v
        {
            known.fill(Known::Unknown);
        }
        let mut hinted = lock(&self.hinted);
        hinted.resize(n as usize, i64::MAX);
        (0..n)
            .filter(|&q| match known[q as usize] {
                Known::Unknown => true,
                Known::At { seen_ms, next_due } => {
                    local - seen_ms >= self.opts.idle_sleep_max_ms as i64
                        || next_due.is_some_and(|t| t <= now)
                        || hinted[q as usize] <= now
                        || self.store.wants_migration(q)
                }
            })
            .collect()
    }

    /// How long to sleep when nothing is due: until the earliest known due instant
    /// or the first look that goes stale, capped at `idle_sleep_max_ms`.
    fn idle_wait(&self) -> Duration {
        let (local, now) = (system_now_ms(), self.store_now());
        let cap = self.opts.idle_sleep_max_ms as i64;
        let known = lock(&self.known);
        let hinted = lock(&self.hinted);
        let wait = known
            .iter()
            .enumerate()
            .map(|(q, k)| match *k {
                Known::Unknown => 0,
                Known::At { seen_ms, next_due } => {
                    let stale_in = seen_ms + cap - local;
                    let hint = hinted.get(q).map_or(i64::MAX, |h| h.saturating_sub(now));
                    next_due
                        .map_or(stale_in, |t| stale_in.min(t - now))
                        .min(hint)
                }
            })
            .min()
            .unwrap_or(cap);
        Duration::from_millis(wait.clamp(1, cap) as u64)
    }

    async fn claim_next(&self) -> Result<Claim, Error> {
        let candidates = self.candidates();
        if candidates.is_empty() {
            return Ok(Claim::NothingDue);
        }
        let n = self.store.queue_count();
        // The shared counter spreads consumers over queues: start at ticket mod N.
        let start = (self.store.next_claim_ticket().await? % u64::from(n)) as u32;
        let mut order = candidates;
        order.sort_by_key(|q| (q + n - start) % n);
        for q in order {
            if let Some(lease) = self.store.claim(q, self.opts.lease_ttl_ms).await? {
                metrics::counter!(m::QUEUE_CLAIMS).increment(1);
                return Ok(Claim::Got(lease));
            }
            metrics::counter!(m::LEASE_CONFLICTS).increment(1);
        }
        Ok(Claim::AllBusy)
    }

    /// Pops from a claimed queue while it has due items and this worker has capacity;
    /// rotates to another queue after a while so no queue waits behind a deep one.
    async fn drain_queue(self: &Arc<Self>, lease: &Lease, mut permit: OwnedSemaphorePermit) {
        const ROTATE_AFTER_BATCHES: u32 = 64;
        // What was announced as due by now is in the store before this pop runs (a
        // script announces what it stored), so this pop sees it; later ones stay.
        let now = self.store_now();
        if let Some(h) = lock(&self.hinted).get_mut(lease.queue as usize)
            && *h <= now
        {
            *h = i64::MAX;
        }
        for _ in 0..ROTATE_AFTER_BATCHES {
            let want = permit.num_permits() as u32;
            let opts = PopOptions {
                max_items: want,
                visibility_ms: self.knobs.visibility(),
                lease_ttl_ms: self.opts.lease_ttl_ms,
                merge_window_ms: self.knobs.merge_window(),
                serves: self.serves(),
            };
            let popped = match self.store.pop(lease, opts).await {
                Ok(p) => p,
                Err(Error::StaleLease { queue }) => {
                    metrics::counter!(m::STALE_LEASES).increment(1);
                    debug!(queue, "lease lost; moving on");
                    return;
                }
                Err(e) => {
                    store_error("pop", &e);
                    return;
                }
            };
            self.observe(lease.queue, &popped);
            let n = popped.item_count();
            self.dispatch(popped, permit);
            if n < want as usize || self.stop_claiming.is_cancelled() {
                return;
            }
            // Keep going only with capacity at hand; otherwise let the lease go.
            let more = (self.permits.available_permits() as u32).min(self.opts.batch);
            if more < self.min_pop() {
                return;
            }
            permit = match self.permits.clone().try_acquire_many_owned(more) {
                Ok(p) => p,
                Err(_) => return,
            };
        }
    }

    /// While a resize is in progress, moves misplaced items out of the leased queue
    /// (a few pages per turn, so due items elsewhere are not kept waiting).
    async fn migrate(&self, lease: &Lease) {
        const STEPS_PER_TURN: usize = 20;
        for _ in 0..STEPS_PER_TURN {
            if !self.store.wants_migration(lease.queue) || self.stop_claiming.is_cancelled() {
                return;
            }
            match self.store.migrate(lease, self.opts.batch).await {
                Ok(step) if step.clean => return,
                Ok(_) => {}
                Err(Error::StaleLease { .. }) => return,
                Err(e) => {
                    store_error("migrate", &e);
                    return;
                }
            }
        }
    }

    /// Follows the live config (layout, knobs, concurrency) and re-reads the layout
    /// every two seconds, so a resize reaches this worker even without etcd.
    async fn follow_config(self: Arc<Self>, done: CancellationToken) {
        let mut seen = self.store.layout();
        live::log_layout(&self.worker_id, &seen);
        let mut rx = self.live.as_ref().map(|l| l.config.subscribe());
        let mut applied: Option<(u32, i64)> = None;
        loop {
            if let (Some(live), Some(rx)) = (&self.live, rx.as_mut()) {
                let config = rx.borrow_and_update().clone();
                let count = {
                    let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
                    let mut gates = slots.iter().map(|(n, s)| (n, &s.gate));
                    live::apply_knobs(&config, &live.family, &self.knobs, &mut gates)
                };
                if let Some((n, rev)) = count
                    && count != applied
                {
                    match self.store.apply_layout(n, rev).await {
                        Ok(_) => applied = count,
                        Err(e) => store_error("apply_layout", &e),
                    }
                }
            }
            let layout = self.store.layout();
            if layout != seen {
                live::log_layout(&self.worker_id, &layout);
                seen = layout;
            }
            let changed = async {
                match rx.as_mut() {
                    Some(rx) => {
                        let _ = rx.changed().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = changed => {},
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    if let Err(e) = self.store.refresh_layout().await {
                        store_error("refresh_layout", &e);
                    }
                }
                _ = done.cancelled() => return,
            }
        }
    }

    fn observe(&self, queue: u32, popped: &Popped) {
        let local = system_now_ms();
        self.offset_ms
            .store(popped.now_ms - local, Ordering::Relaxed);
        let mut known = lock(&self.known);
        if known.len() <= queue as usize {
            known.resize(queue as usize + 1, Known::Unknown);
        }
        known[queue as usize] = Known::At {
            seen_ms: local,
            next_due: popped.next_due_ms,
        };
    }

    /// Notes that `queue` will have something due at `at` (store clock): an item
    /// this worker sent back (a retry, a release), so the pollers look again then
    /// rather than after their idle sleep.
    fn expect(&self, queue: u32, at: i64) {
        let mut known = lock(&self.known);
        if let Some(Known::At { next_due, .. }) = known.get_mut(queue as usize) {
            *next_due = Some(next_due.map_or(at, |t| t.min(at)));
        }
    }

    /// Applies the store's announcements until the store stops making them or the
    /// consumer stops.
    async fn follow_wakes(self: Arc<Self>, mut rx: mpsc::Receiver<Wake>, done: CancellationToken) {
        loop {
            let wake = tokio::select! {
                w = rx.recv() => w,
                _ = done.cancelled() => return,
            };
            let Some(wake) = wake else {
                debug!("the store stopped announcing; queues are looked at on the idle cap");
                return;
            };
            self.on_wake(wake);
        }
    }

    /// Notes an announcement and wakes idle pollers to act on it.
    fn on_wake(&self, wake: Wake) {
        if wake == Wake::ALL {
            lock(&self.known).fill(Known::Unknown);
        } else {
            let mut hinted = lock(&self.hinted);
            let q = wake.queue as usize;
            if hinted.len() <= q {
                // A queue of a newer layout than this worker has seen yet.
                hinted.resize(q + 1, i64::MAX);
            }
            hinted[q] = hinted[q].min(wake.due_at_ms);
        }
        self.wake_gen.fetch_add(1, Ordering::AcqRel);
        self.woken.notify_waiters();
    }

    /// Starts every delivery of a pop. A delivery whose handler runs on a
    /// subscriber of the hub, with no concurrency or rate limit in force, is
    /// offered to the hub right here and ends in the hub's callback: no task, no
    /// timer, no channel per delivery. Every other one (a local handler, a limited
    /// handler, nobody serving it) gets a task of its own.
    fn dispatch(self: &Arc<Self>, popped: Popped, mut permit: OwnedSemaphorePermit) {
        let now = popped.now_ms;
        for delivery in popped.deliveries {
            let Some(p) = permit.split(delivery.items.len()) else {
                // A pop never returns more than asked; if a store ever did, the item
                // stays in flight and is redelivered after its visibility timeout.
                warn!(
                    queue = delivery.queue,
                    "pop returned more items than capacity"
                );
                continue;
            };
            let (started, items) = self.start(delivery, p, now);
            lock(&self.in_flight).insert(started.key, (started.queue, started.tokens.clone()));
            match (&self.hub, &started.slot) {
                (Some(hub), Some(slot))
                    if started.runs && slot.local.is_none() && self.unlimited(slot) =>
                {
                    let this = self.clone();
                    let slot = slot.clone();
                    hub.offer(Offer {
                        handler: started.handler.clone(),
                        items,
                        queue: started.queue,
                        trace: started.trace,
                        owner: self.owner,
                        done: Box::new(move |remote| {
                            let outcome = this.remote_outcome(&slot, started.attempt, remote);
                            this.finish(started, outcome);
                        }),
                    });
                }
                _ => {
                    tokio::spawn(self.clone().run_delivery(started, items));
                }
            }
        }
    }

    /// Whether a remote handler's delivery may skip admission: no concurrency cap
    /// and no rate policy in force for it now.
    fn unlimited(&self, slot: &Slot) -> bool {
        slot.gate.unlimited()
            && self
                .live
                .as_ref()
                .is_none_or(|l| !live::rate_limited(l, &slot.name))
    }

    /// What every delivery does before its handler runs: takes its items apart from
    /// their tokens, finds who runs it, counts the fire and its lag, and opens its
    /// trace span. `now_ms` is the store's clock at the pop.
    fn start(
        &self,
        delivery: Delivery,
        permit: OwnedSemaphorePermit,
        now_ms: i64,
    ) -> (Started, Vec<Item>) {
        let queue = delivery.queue;
        let mut tokens = Vec::with_capacity(delivery.items.len());
        let mut items = Vec::with_capacity(delivery.items.len());
        for c in delivery.items {
            tokens.push((c.item.id.clone(), c.token));
            items.push(c.item);
        }
        let tokens = Arc::new(tokens);
        let handler = items[0].handler.clone();
        let attempt = items[0].attempt;
        let last_attempt = items.iter().all(|i| i.attempt >= i.max_attempts);
        let n = tokens.len() as u64;
        let slot = self.slot(&handler);
        let runs = slot
            .as_ref()
            .filter(|s| s.local.is_some() || self.hub.as_ref().is_some_and(|h| h.serves(&handler)));
        if let Some(s) = runs {
            s.meters.fired.increment(n);
            activity::add(self.store.family(), activity::Kind::Fired, n);
            // Fire lag is due time → first start: a retry starts after its backoff,
            // on purpose, so its lag from the original due time is no lag.
            if attempt == 1 {
                let lag_ms = (now_ms - items[0].due_at_ms).max(0);
                s.meters.lag.record(lag_ms as f64 / 1000.0);
                activity::lag(self.store.family(), lag_ms as u64);
            }
        }
        // The trace span of the delivery, when an item carries a sampled producer
        // context; the handler (local or remote) parents its own spans on it.
        let trace_span = runs.and_then(|_| delivery_span(&items, queue, &self.worker_id));
        let runs = runs.is_some();
        let trace = trace_span
            .as_ref()
            .map(|s| s.context)
            .or_else(|| items.iter().find_map(|i| i.traceparent));
        let started = Started {
            queue,
            tokens,
            key: self.next_delivery.fetch_add(1, Ordering::Relaxed),
            handler,
            attempt,
            last_attempt,
            slot,
            runs,
            trace,
            trace_span,
            permit,
        };
        (started, items)
    }

    /// Runs one delivery's handler (here, or on a subscriber after admission) and
    /// ends it.
    async fn run_delivery(self: Arc<Self>, started: Started, items: Vec<Item>) {
        let (queue, trace) = (started.queue, started.trace);
        let slot = started.slot.as_ref().filter(|_| started.runs);
        let outcome = match slot {
            Some(slot) if slot.local.is_some() => {
                // Every log line of the delivery, the handler's own included, names
                // the item (the first one of a merged delivery, and how many).
                let span = tracing::info_span!("item", item_id = %items[0].id, key = %items[0].key,
                                               merged = items.len(), queue);
                self.call(slot, queue, items, trace).instrument(span).await
            }
            Some(slot) => self.call_remote(slot, queue, items, trace).await,
            // Nobody here runs it: it waits in its queue for a worker that does,
            // without an attempt counted.
            None => Outcome::Park,
        };
        self.finish(started, outcome);
    }

    /// Ends a delivery: counts its outcome, closes its span, forgets it as in
    /// flight, and queues its settlement (with its capacity). Never waits: the
    /// hub calls it from its callbacks.
    fn finish(&self, started: Started, outcome: Outcome) {
        let Started {
            queue,
            tokens,
            key,
            handler,
            attempt,
            last_attempt,
            slot,
            trace_span,
            permit,
            ..
        } = started;
        let n = tokens.len() as u64;
        let item_id = tokens[0].0.as_str();
        let meter = |pick: fn(&Meters) -> &metrics::Counter, name: &'static str| match &slot {
            Some(s) => pick(&s.meters).increment(n),
            None => metrics::counter!(name, "handler" => handler.clone()).increment(n),
        };
        match &outcome {
            Outcome::Ack => {
                meter(|m| &m.acked, m::ITEMS_ACKED);
                activity::add(self.store.family(), activity::Kind::Acked, n);
                self.handled.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Retry { error, .. } => {
                self.handled.fetch_add(1, Ordering::Relaxed);
                activity::add(self.store.family(), activity::Kind::Failed, n);
                if last_attempt {
                    warn!(item_id, %handler, attempt, %error, "last attempt failed; dead-lettering");
                    meter(|m| &m.dead, m::ITEMS_DEAD_LETTERED);
                    activity::add(self.store.family(), activity::Kind::Dead, n);
                } else {
                    debug!(item_id, %handler, attempt, %error, "handler failed; will retry");
                    meter(|m| &m.retried, m::ITEMS_RETRIED);
                }
            }
            Outcome::Release => {
                self.handed_back.fetch_add(1, Ordering::Relaxed);
                meter(|m| &m.released, m::ITEMS_RELEASED);
            }
            Outcome::Park => {
                debug!(item_id, %handler, "no handler here; parked until one is served");
                meter(|m| &m.parked, m::ITEMS_PARKED);
            }
        }
        if let Some(mut s) = trace_span {
            let label = match &outcome {
                Outcome::Ack => "acked",
                Outcome::Retry { error, .. } => {
                    s.fail(error.clone());
                    if last_attempt {
                        "dead_lettered"
                    } else {
                        "retried"
                    }
                }
                Outcome::Release => "released",
                Outcome::Park => "parked",
            };
            s.attr("chime.outcome", label);
            s.end();
        }
        lock(&self.in_flight).remove(&key);
        // The table's copy is gone, so the list is ours (the extender copies what it
        // reads under the lock and keeps no reference).
        let tokens = Arc::try_unwrap(tokens).unwrap_or_else(|shared| (*shared).clone());
        match &outcome {
            Outcome::Retry { delay_ms, .. } if !last_attempt => {
                self.expect(queue, self.store_now() + *delay_ms as i64);
            }
            Outcome::Release => self.expect(queue, self.store_now()),
            _ => {}
        }
        let settlements = tokens
            .into_iter()
            .map(|(id, token)| Settlement {
                id,
                token,
                outcome: outcome.clone(),
            })
            .collect();
        // The settler lives until every permit is back, so this send cannot fail
        // while the permit exists; if it did, the items are redelivered later.
        let _ = self.settle_tx.send(SettleMsg {
            queue,
            settlements,
            _permit: permit,
        });
    }

    /// Waits for the handler's concurrency slot and its rate limit; false when the
    /// drain gave up meanwhile (hand the items back).
    async fn admit(&self, slot: &Slot, items: &[Item]) -> Option<Option<OwnedSemaphorePermit>> {
        let permit = tokio::select! {
            p = slot.gate.enter() => p,
            _ = self.abandon.cancelled() => return None,
        };
        if let Some(live) = &self.live {
            let n = items.len() as u64;
            live::throttle(live, &slot.rate_turn, &items[0].handler, n, &self.abandon).await;
            if self.abandon.is_cancelled() {
                return None;
            }
        }
        Some(permit)
    }

    /// Runs a delivery on a subscriber of the hub (after the same concurrency and
    /// rate limits as a local handler) and maps its verdict to an outcome.
    async fn call_remote(
        &self,
        slot: &Slot,
        queue: u32,
        items: Vec<Item>,
        trace: Option<TraceContext>,
    ) -> Outcome {
        let (attempt, handler) = (items[0].attempt, items[0].handler.clone());
        let Some(hub) = &self.hub else {
            return Outcome::Park;
        };
        let Some(_slot_permit) = self.admit(slot, &items).await else {
            return Outcome::Release;
        };
        let remote = hub
            .deliver_traced(&handler, items, queue, trace, self.owner)
            .await;
        self.remote_outcome(slot, attempt, remote)
    }

    /// What a subscriber's end of a delivery means for its items (and counts it).
    fn remote_outcome(&self, slot: &Slot, attempt: u32, remote: Remote) -> Outcome {
        let label = match &remote {
            Remote::Settled(Verdict::Ack) => "ack",
            Remote::Settled(Verdict::Fail { .. }) => "fail",
            Remote::Settled(Verdict::Release) => "release",
            Remote::TimedOut { .. } => "timeout",
            Remote::Gone { .. } => "gone",
            Remote::Abandoned => "abandoned",
            Remote::NoSubscriber => "parked",
        };
        if let Some(c) = slot.meters.remote(label) {
            c.increment(1);
        }
        match remote {
            Remote::Settled(Verdict::Ack) => Outcome::Ack,
            Remote::Settled(Verdict::Fail {
                error,
                retry_after_ms,
            }) => Outcome::Retry {
                delay_ms: retry_after_ms.unwrap_or_else(|| self.backoff(attempt)),
                error,
            },
            Remote::Settled(Verdict::Release) | Remote::Abandoned => Outcome::Release,
            Remote::TimedOut {
                subscriber,
                after_ms,
            } => Outcome::Retry {
                delay_ms: self.backoff(attempt),
                error: format!("not settled within {after_ms} ms by subscriber {subscriber}"),
            },
            // The subscriber may have crashed on it: a failed attempt (so a poison
            // item ends as a dead letter), retried at once elsewhere.
            Remote::Gone { subscriber } => Outcome::Retry {
                delay_ms: 0,
                error: format!("subscriber {subscriber} went away with the delivery unsettled"),
            },
            Remote::NoSubscriber => Outcome::Park,
        }
    }

    /// Waits for the handler's concurrency slot, runs it, and maps its result to an
    /// outcome. A panic counts as a failure; the drain's abandon signal hands back.
    async fn call(
        &self,
        slot: &Slot,
        queue: u32,
        items: Vec<Item>,
        trace: Option<TraceContext>,
    ) -> Outcome {
        let attempt = items[0].attempt;
        let Some(handler) = slot.local.clone() else {
            return Outcome::Park;
        };
        let Some(_slot_permit) = self.admit(slot, &items).await else {
            return Outcome::Release;
        };
        let ctx = ItemContext::new(items, &self.abandon, self.worker_id.clone(), queue, trace);
        let run = AssertUnwindSafe(handler.handle(ctx)).catch_unwind();
        tokio::select! {
            biased;
            r = run => match r {
                Ok(Ok(())) => Outcome::Ack,
                // Stopped because we abandoned it: hand back, not a failed attempt.
                Ok(Err(_)) if self.abandon.is_cancelled() => Outcome::Release,
                Ok(Err(e)) => Outcome::Retry {
                    delay_ms: e.retry_after_ms.unwrap_or_else(|| self.backoff(attempt)),
                    error: e.message,
                },
                Err(panic) => Outcome::Retry {
                    delay_ms: self.backoff(attempt),
                    error: format!("handler panicked: {}", panic_message(&panic)),
                },
            },
            _ = self.abandon.cancelled() => Outcome::Release,
        }
    }

    fn backoff(&self, attempt: u32) -> u64 {
        backoff_ms(attempt, self.opts.retry_base_ms, self.opts.retry_max_ms)
    }

    /// Batches settlements: takes whatever has queued up (up to 2,048), groups it by
    /// queue and records each group with one script call, all groups concurrently.
    /// Capacity returns when the batch is recorded.
    async fn settler(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<SettleMsg>,
        done: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => return },
                _ = done.cancelled() => return,
            };
            let mut batch = vec![first];
            while batch.len() < 2_048 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut by_queue: HashMap<u32, Vec<Settlement>> = HashMap::new();
            for msg in &mut batch {
                by_queue
                    .entry(msg.queue)
                    .or_default()
                    .append(&mut msg.settlements);
            }
            join_all(
                by_queue
                    .into_iter()
                    .map(|(q, s)| self.settle_with_retry(q, s)),
            )
            .await;
            drop(batch);
        }
    }

    async fn settle_with_retry(&self, queue: u32, settlements: Vec<Settlement>) {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=6 {
            match self.store.settle(queue, settlements.clone()).await {
                Ok(applied) => {
                    let stale = applied.iter().filter(|a| !**a).count();
                    if stale > 0 {
                        metrics::counter!(m::STALE_SETTLEMENTS).increment(stale as u64);
                        debug!(queue, stale, "settlements refused: deliveries were stale");
                    }
                    return;
                }
                Err(e) => {
                    store_error("settle", &e);
                    if attempt == 6 {
                        // The items stay in flight and are redelivered after their
                        // visibility timeout: at-least-once, never lost.
                        warn!(
                            queue,
                            n = settlements.len(),
                            "giving up settling; items will be redelivered"
                        );
                        return;
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }

    /// Every third of the visibility timeout, pushes the deadline of every item this
    /// worker holds, so a slow handler is not redelivered while it runs.
    async fn extender(self: Arc<Self>, done: CancellationToken) {
        loop {
            let every = Duration::from_millis((self.knobs.visibility() / 3).max(50));
            tokio::select! {
                _ = tokio::time::sleep(every) => {},
                _ = done.cancelled() => return,
            }
            let mut by_queue: HashMap<u32, Vec<(String, DeliveryToken)>> = HashMap::new();
            for (q, tokens) in lock(&self.in_flight).values() {
                by_queue
                    .entry(*q)
                    .or_default()
                    .extend(tokens.iter().map(|(id, t)| (id.clone(), *t)));
            }
            for (q, items) in by_queue {
                if let Err(e) = self.store.extend(q, &items, self.knobs.visibility()).await {
                    store_error("extend", &e);
                }
            }
        }
    }
}

enum Claim {
    Got(Lease),
    AllBusy,
    NothingDue,
}

/// The trace span of a delivery (OpenTelemetry messaging conventions), a child of
/// the first item's sampled producer context, linked to the other items' contexts.
/// `None` when the process exports no traces or no item carries a sampled context:
/// items are never the root of a trace.
fn delivery_span(items: &[Item], queue: u32, worker_id: &str) -> Option<Span> {
    if !chime_shared::trace::tracer().enabled() {
        return None;
    }
    let parent = items
        .iter()
        .find_map(|i| i.traceparent.filter(|t| t.sampled()))?;
    let first = &items[0];
    let mut s = Span::start(
        format!("process {}", first.handler),
        SpanKind::Consumer,
        &parent,
    );
    s.attr("messaging.system", "chime")
        .attr("messaging.operation.type", "process")
        .attr("messaging.destination.name", first.handler.as_str())
        .attr("messaging.message.id", first.id.as_str())
        .attr("chime.item.key", first.key.as_str())
        .attr("chime.queue", queue)
        .attr("chime.attempt", first.attempt)
        .attr("chime.items", items.len() as u32)
        .attr("chime.worker_id", worker_id);
    for t in items.iter().filter_map(|i| i.traceparent) {
        if t != parent && !s.links.contains(&t) {
            s.links.push(t);
        }
    }
    Some(s)
}

fn store_error(op: &'static str, e: &Error) {
    metrics::counter!(m::STORE_ERRORS, "op" => op).increment(1);
    warn!(op, error = %e, "store call failed");
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Exponential backoff with ±20 % jitter: base · 2^(attempt−1), capped.
pub fn backoff_ms(attempt: u32, base_ms: u64, max_ms: u64) -> u64 {
    let exp = base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(30));
    let capped = exp.min(max_ms) as f64;
    (capped * (0.8 + 0.4 * fastrand::f64())) as u64
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        for _ in 0..100 {
            let b1 = backoff_ms(1, 1_000, 60_000);
            assert!((800..=1_200).contains(&b1), "{b1}");
            let b3 = backoff_ms(3, 1_000, 60_000);
            assert!((3_200..=4_800).contains(&b3), "{b3}");
            let big = backoff_ms(40, 1_000, 60_000);
            assert!(big <= 72_000, "{big}");
        }
    }
}
