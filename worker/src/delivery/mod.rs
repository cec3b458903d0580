//! Item delivery to handlers in other processes: the [`Hub`] a worker's consumer
//! hands deliveries to when their handler is not one of its own, and the
//! subscribers (apps in any language, over `chime.v1.Deliveries`) it hands them on
//! to.
//!
//! The queue work stays in the consumer (claims, leases, pops by Redis time,
//! merges, retries, dead letters, rate limits, resize moves, drain); the hub only
//! routes one delivery to one subscriber with free credit and waits for the
//! subscriber's verdict, which the consumer turns into a settlement like any
//! handler's result. A delivery whose handler has no subscriber is not run at all:
//! the consumer parks it in its queue (`Outcome::Park`), no attempt counted.
//!
//! A delivery in the hub is data, not a task: [`Hub::offer`] hands it over (or
//! queues it for credit) and returns at once, and whatever ends it — the
//! subscriber's verdict, the sweeper finding its settle deadline passed, the
//! stream's end, the worker's drain giving up — takes it out of the subscriber's
//! `pending` map and calls its [`Done`] callback, exactly once. So a burst of
//! thousands of deliveries costs map entries, not thousands of tasks each with a
//! timer and a channel.
//!
//! Why one mutex over all subscribers: every decision (which subscriber, how much
//! credit is left, who waits for credit) must see one consistent picture, the
//! critical sections are a few map operations, and there are few subscribers per
//! worker. Waiting for credit is a FIFO of offers per handler, so freed credit goes
//! to exactly the next delivery (no thundering herd when thousands wait).
//!
//! This module has no gRPC in it: [`server`] is the tonic edge that turns streams
//! into [`Hub::subscribe`] calls and [`Outgoing`] values into messages, and
//! [`client`] is the Rust SDK's side of the same conversation.

pub mod client;
#[cfg(feature = "serve")]
pub mod server;
pub mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chime_shared::clock::system_now_ms;
use chime_shared::queue::Item;
use chime_shared::trace::TraceContext;
use chime_shared::{Error, limits, telemetry as m};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Most handlers one subscription names.
pub const MAX_SUBSCRIBED_HANDLERS: usize = 64;
/// Most deliveries one subscriber may hold unsettled.
pub const MAX_CREDIT: u32 = 10_000;
/// Shortest and longest settle timeout a subscriber may ask for, ms.
pub const SETTLE_TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u32> = 1_000..=3_600_000;
/// Longest retry delay a subscriber may ask for, ms (a day).
pub const MAX_RETRY_AFTER_MS: u64 = 86_400_000;
/// Longest error text kept from a subscriber; longer is cut.
pub const MAX_ERROR_BYTES: usize = 4_096;
/// Most bytes of a subscriber's self-description.
pub const MAX_SUBSCRIBER_NAME_BYTES: usize = 253;
/// Largest message the worker decodes from a subscriber (a `Settle` of thousands
/// of ids fits many times).
pub const MAX_DECODE_BYTES: usize = 4 * 1024 * 1024;
/// Largest message the worker sends: one merged delivery of a whole batch of
/// 64 KiB payloads (256 × 64 KiB) fits twice. Subscribers raise their receive limit
/// to this.
pub const MAX_ENCODE_BYTES: usize = 32 * 1024 * 1024;

/// How the hub behaves.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The worker's id, told to subscribers.
    pub worker_id: String,
    /// The queue family the worker consumes, told to subscribers.
    pub family: String,
    /// Settle timeout of subscriptions that do not ask for one, ms. Default 30 s.
    pub settle_timeout_ms: u32,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            worker_id: crate::default_worker_id(),
            family: "default".into(),
            settle_timeout_ms: 30_000,
        }
    }
}

/// What a subscription asks for (the `Subscribe` message, as domain values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeSpec {
    /// Handler names it runs.
    pub handlers: Vec<String>,
    /// Most deliveries held unsettled at once.
    pub credit: u32,
    /// Who subscribes (for logs).
    pub name: String,
    /// Settle timeout, ms; 0: the hub's default.
    pub settle_timeout_ms: u32,
}

impl SubscribeSpec {
    /// Refuses what cannot work, naming the field (`subscribe.credit`, …).
    pub fn validate(&self) -> Result<(), Error> {
        if self.handlers.is_empty() {
            return Err(Error::invalid(
                "subscribe.handlers",
                "names no handler (give 1 to 64)",
            ));
        }
        if self.handlers.len() > MAX_SUBSCRIBED_HANDLERS {
            return Err(Error::invalid(
                "subscribe.handlers",
                format!(
                    "names {} handlers, the limit is {MAX_SUBSCRIBED_HANDLERS}",
                    self.handlers.len()
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (i, h) in self.handlers.iter().enumerate() {
            let field = format!("subscribe.handlers[{i}]");
            limits::check_qualified(&field, h)?;
            if !seen.insert(h) {
                return Err(Error::invalid(&field, format!("{h:?} is named twice")));
            }
        }
        if !(1..=MAX_CREDIT).contains(&self.credit) {
            return Err(Error::invalid(
                "subscribe.credit",
                format!("{} is outside 1..={MAX_CREDIT}", self.credit),
            ));
        }
        if self.name.len() > MAX_SUBSCRIBER_NAME_BYTES {
            return Err(Error::invalid(
                "subscribe.subscriber",
                format!("is longer than {MAX_SUBSCRIBER_NAME_BYTES} bytes"),
            ));
        }
        if self.settle_timeout_ms != 0 && !SETTLE_TIMEOUT_RANGE_MS.contains(&self.settle_timeout_ms)
        {
            return Err(Error::invalid(
                "subscribe.settle_timeout_ms",
                format!(
                    "{} is outside {}..={} (0: the default)",
                    self.settle_timeout_ms,
                    SETTLE_TIMEOUT_RANGE_MS.start(),
                    SETTLE_TIMEOUT_RANGE_MS.end()
                ),
            ));
        }
        Ok(())
    }
}

/// How a subscriber ended a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done.
    Ack,
    /// Failed; retried after `retry_after_ms` (or the worker's backoff).
    Fail {
        /// Why (cut to [`MAX_ERROR_BYTES`]).
        error: String,
        /// Delay before the next attempt, capped at [`MAX_RETRY_AFTER_MS`].
        retry_after_ms: Option<u64>,
    },
    /// Handed back unprocessed.
    Release,
}

/// What became of a delivery handed to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Remote {
    /// The subscriber settled it.
    Settled(Verdict),
    /// Not settled nor extended within the settle timeout.
    TimedOut { subscriber: String, after_ms: u64 },
    /// The subscriber's stream ended with the delivery unsettled.
    Gone { subscriber: String },
    /// No subscriber (that is not draining) runs the handler.
    NoSubscriber,
    /// The worker's drain gave up on it before a subscriber settled it.
    Abandoned,
}

/// What the hub sends down one subscriber's stream.
#[derive(Debug)]
pub enum Outgoing {
    /// A delivery to run.
    Deliver(OutDelivery),
    /// Settlements or extensions that changed nothing.
    Refused {
        /// The delivery ids.
        ids: Vec<u64>,
        /// Why.
        reason: String,
    },
    /// The subscriber's `Drain` is in force: nothing more will be delivered.
    Drained,
    /// The worker is draining.
    Closing {
        /// Settlements are taken until then (worker clock, Unix ms).
        deadline_ms: i64,
    },
}

/// One delivery on its way to a subscriber.
#[derive(Debug)]
pub struct OutDelivery {
    /// Unique within the stream.
    pub id: u64,
    /// Handler name.
    pub handler: String,
    /// The items (merged ones included).
    pub items: Vec<Item>,
    /// The queue they came from.
    pub queue: u32,
    /// Settle (or extend) by then, worker clock, Unix ms.
    pub settle_deadline_ms: i64,
    /// The worker's span of this delivery, for the app's handler span to join.
    pub traceparent: Option<TraceContext>,
}

/// What the hub calls, exactly once, with the end of a delivery it was offered.
///
/// It runs on whichever thread ended the delivery (a stream's reader, the sweeper,
/// the drain), sometimes under the hub's lock (a stream that closed as a delivery
/// was handed over, a handler nobody serves any more): it must be quick, must not
/// call back into the hub, and may take only locks that nobody holds while calling
/// the hub (the consumer asks the hub before it locks what `done` locks). The consumer's turns the end into a settlement right there, so
/// a delivery in the hub is data, not a task waiting on a timer and a channel.
pub(crate) type Done = Box<dyn FnOnce(Remote) + Send>;

/// A delivery offered to the hub (see [`Hub::offer`]).
pub(crate) struct Offer {
    /// Handler name.
    pub handler: String,
    /// The items (merged ones included).
    pub items: Vec<Item>,
    /// The queue they came from.
    pub queue: u32,
    /// The worker's span of the delivery.
    pub trace: Option<TraceContext>,
    /// Who offered it: [`Hub::abandon`] ends that owner's deliveries only (two
    /// consumers may share one hub, as `chime dev`'s do).
    pub owner: u64,
    /// Told the end.
    pub done: Done,
}

impl std::fmt::Debug for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offer")
            .field("handler", &self.handler)
            .field("items", &self.items.len())
            .field("queue", &self.queue)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// One delivery a subscriber holds. Whoever takes it out of the subscriber's
/// `pending` map (a settlement, the sweeper, the stream's end, the drain) calls
/// `done`: the map is what makes the end happen exactly once.
struct Held {
    done: Done,
    owner: u64,
    /// Settle (or extend) by then, worker clock, Unix ms; moved by `Extend`.
    deadline_ms: i64,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("owner", &self.owner)
            .field("deadline_ms", &self.deadline_ms)
            .finish_non_exhaustive()
    }
}

/// One subscriber stream.
#[derive(Debug)]
pub struct Subscriber {
    id: u64,
    name: String,
    handlers: Vec<String>,
    settle_timeout_ms: u32,
    /// Credit and held count change only under the hub's lock; atomics let readers
    /// outside it (metrics, logs) look without taking it.
    credit: AtomicU32,
    held: AtomicU32,
    draining: AtomicBool,
    next_delivery: AtomicU64,
    pending: Mutex<HashMap<u64, Held>>,
    /// `None` once the stream ended: nothing more is sent, and dropping the sender
    /// ends the stream's writer.
    out: Mutex<Option<mpsc::UnboundedSender<Outgoing>>>,
}

impl Subscriber {
    /// Who subscribed.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settle timeout in force, ms.
    pub fn settle_timeout_ms(&self) -> u32 {
        self.settle_timeout_ms
    }

    /// The credit in force.
    pub fn credit(&self) -> u32 {
        self.credit.load(Ordering::Relaxed)
    }

    fn accepting(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.out_open()
    }

    fn free(&self) -> u32 {
        self.credit
            .load(Ordering::Relaxed)
            .saturating_sub(self.held.load(Ordering::Relaxed))
    }

    fn out_open(&self) -> bool {
        lock(&self.out).is_some()
    }

    fn send(&self, msg: Outgoing) -> bool {
        lock(&self.out)
            .as_ref()
            .is_some_and(|tx| tx.send(msg).is_ok())
    }

    /// Moves the settle deadline of held deliveries to `extend_ms` from now (0: the
    /// subscription's settle timeout); answers the ids it does not hold.
    pub fn extend(&self, ids: &[u64], extend_ms: u32) -> Vec<u64> {
        let ms = if extend_ms == 0 {
            self.settle_timeout_ms
        } else {
            extend_ms.min(*SETTLE_TIMEOUT_RANGE_MS.end())
        };
        let deadline = system_now_ms() + i64::from(ms);
        let mut pending = lock(&self.pending);
        let mut refused = Vec::new();
        for id in ids {
            match pending.get_mut(id) {
                Some(h) => h.deadline_ms = deadline,
                None => refused.push(*id),
            }
        }
        refused
    }

    /// Tells the subscriber that some settlements changed nothing.
    pub fn refuse(&self, ids: Vec<u64>, reason: &str) {
        if !ids.is_empty() {
            self.send(Outgoing::Refused {
                ids,
                reason: reason.to_owned(),
            });
        }
    }

    /// Takes out the held deliveries `pick` chooses (all of them, expired ones, one
    /// owner's), so their ends can be told outside the lock.
    fn take_held(&self, mut pick: impl FnMut(&Held) -> bool) -> Vec<Held> {
        lock(&self.pending)
            .extract_if(|_, h| pick(h))
            .map(|(_, h)| h)
            .collect()
    }
}

#[derive(Debug, Default)]
struct HandlerSubs {
    subs: Vec<Arc<Subscriber>>,
    /// Deliveries waiting for credit on one of these subscribers, oldest first:
    /// freed credit goes to exactly the next one (no thundering herd).
    waiting: VecDeque<Offer>,
}

#[derive(Debug, Default)]
struct State {
    subs: HashMap<u64, Arc<Subscriber>>,
    by_handler: HashMap<String, HandlerSubs>,
    /// Handlers with an accepting subscriber, sorted: what the consumer serves.
    served: Arc<[String]>,
    /// Bumped whenever `served` may have changed.
    version: u64,
    /// Owners whose drain gave up: what they offer from now on ends `Abandoned`.
    abandoned: HashSet<u64>,
}

/// Routes deliveries to subscribers (see the module doc).
#[derive(Debug)]
pub struct Hub {
    opts: HubOptions,
    state: Mutex<State>,
    next_sub: AtomicU64,
    next_owner: AtomicU64,
    /// Fires when the first subscriber arrives (or any subscription changes), so an
    /// idle consumer can start claiming queues.
    changed: tokio::sync::Notify,
    /// Fires when the hub is shut down: every stream ends.
    stopped: CancellationToken,
}

/// How often held deliveries are checked against their settle deadline. Settle
/// timeouts are at least a second, so a tenth of that is late by at most 10 %.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

impl Hub {
    /// A hub with no subscriber yet. Called within a Tokio runtime, it starts the
    /// sweeper that times out unsettled deliveries (it stops with the hub).
    pub fn new(opts: HubOptions) -> Arc<Self> {
        let hub = Arc::new(Self {
            opts,
            state: Mutex::default(),
            next_sub: AtomicU64::new(1),
            next_owner: AtomicU64::new(1),
            changed: tokio::sync::Notify::new(),
            stopped: CancellationToken::new(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // Weak: the sweeper must not keep a dropped hub alive.
            let weak = Arc::downgrade(&hub);
            let stopped = hub.stopped.clone();
            rt.spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stopped.cancelled() => return,
                    }
                    match weak.upgrade() {
                        Some(hub) => hub.sweep(system_now_ms()),
                        None => return,
                    }
                }
            });
        }
        hub
    }

    /// The settings subscribers are told.
    pub fn options(&self) -> &HubOptions {
        &self.opts
    }

    /// A new owner id for [`Offer::owner`] (one per consumer).
    pub(crate) fn owner(&self) -> u64 {
        self.next_owner.fetch_add(1, Ordering::Relaxed)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Opens a subscription: from now on deliveries of its handlers may go to it.
    /// The receiver yields what to send down its stream.
    pub fn subscribe(
        &self,
        spec: SubscribeSpec,
    ) -> Result<(Arc<Subscriber>, mpsc::UnboundedReceiver<Outgoing>), Error> {
        spec.validate()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let sub = Arc::new(Subscriber {
            id: self.next_sub.fetch_add(1, Ordering::Relaxed),
            name: spec.name,
            settle_timeout_ms: match spec.settle_timeout_ms {
                0 => self.opts.settle_timeout_ms,
                t => t,
            },
            credit: AtomicU32::new(spec.credit),
            held: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            next_delivery: AtomicU64::new(1),
            pending: Mutex::default(),
            out: Mutex::new(Some(tx)),
            handlers: spec.handlers,
        });
        {
            let mut st = self.state();
            st.subs.insert(sub.id, sub.clone());
            for h in &sub.handlers {
                st.by_handler
                    .entry(h.clone())
                    .or_default()
                    .subs
                    .push(sub.clone());
            }
            Self::feed(&mut st, &sub);
            Self::recompute(&mut st);
            metrics::gauge!(m::DELIVERY_SUBSCRIBERS).set(st.subs.len() as f64);
        }
        tracing::info!(subscriber = %sub.name, handlers = ?sub.handlers, credit = spec.credit,
                       "subscriber joined");
        self.changed.notify_waiters();
        Ok((sub, rx))
    }

    /// Ends a subscription (its stream ended): deliveries it held count as failed
    /// attempts, deliveries waiting for its credit go to other subscribers or are
    /// parked.
    pub fn unsubscribe(&self, sub: &Arc<Subscriber>) {
        // First: nothing more is sent to it, so no delivery lands in `pending` after
        // it is emptied below (a send under the hub's lock sees the closed stream).
        *lock(&sub.out) = None;
        {
            let mut st = self.state();
            if st.subs.remove(&sub.id).is_none() {
                return;
            }
            for h in &sub.handlers {
                if let Some(e) = st.by_handler.get_mut(h) {
                    e.subs.retain(|s| s.id != sub.id);
                }
            }
            Self::reroute(&mut st, &sub.handlers);
            Self::recompute(&mut st);
            metrics::gauge!(m::DELIVERY_SUBSCRIBERS).set(st.subs.len() as f64);
        }
        let held = sub.take_held(|_| true);
        tracing::info!(subscriber = %sub.name, unsettled = held.len(), "subscriber left");
        for h in held {
            sub.held.fetch_sub(1, Ordering::Relaxed);
            (h.done)(Remote::Gone {
                subscriber: sub.name.clone(),
            });
        }
        self.changed.notify_waiters();
    }

    /// The subscriber stops taking deliveries (it sent `Drain`); what waits for its
    /// credit goes elsewhere or is parked.
    pub fn drain(&self, sub: &Arc<Subscriber>) {
        let mut st = self.state();
        {
            // Under the stream's lock: no delivery is queued after `Drained`.
            let out = lock(&sub.out);
            sub.draining.store(true, Ordering::Relaxed);
            if let Some(tx) = out.as_ref() {
                let _ = tx.send(Outgoing::Drained);
            }
        }
        Self::reroute(&mut st, &sub.handlers);
        Self::recompute(&mut st);
    }

    /// Sets a subscriber's credit (1..=[`MAX_CREDIT`], field `credit.credit`).
    pub fn set_credit(&self, sub: &Arc<Subscriber>, credit: u32) -> Result<(), Error> {
        if !(1..=MAX_CREDIT).contains(&credit) {
            return Err(Error::invalid(
                "credit.credit",
                format!("{credit} is outside 1..={MAX_CREDIT}"),
            ));
        }
        let mut st = self.state();
        sub.credit.store(credit, Ordering::Relaxed);
        Self::feed(&mut st, sub);
        Ok(())
    }

    /// Ends the deliveries `sub` settles; answers the ids it does not hold
    /// (unknown, already settled, timed out or abandoned), which change nothing.
    pub fn settle(
        &self,
        sub: &Arc<Subscriber>,
        verdicts: impl IntoIterator<Item = (u64, Verdict)>,
    ) -> Vec<u64> {
        let mut refused = Vec::new();
        let mut ended = Vec::new();
        {
            let mut pending = lock(&sub.pending);
            for (id, v) in verdicts {
                match pending.remove(&id) {
                    Some(h) => ended.push((h, v)),
                    None => refused.push(id),
                }
            }
        }
        if !ended.is_empty() {
            self.give_back(sub, ended.len() as u32);
            for (h, v) in ended {
                (h.done)(Remote::Settled(v));
            }
        }
        refused
    }

    /// Tells every subscriber the worker is draining; settlements are still taken
    /// until the worker's drain ends.
    pub fn close(&self, deadline_ms: i64) {
        let subs: Vec<Arc<Subscriber>> = self.state().subs.values().cloned().collect();
        for s in subs {
            s.send(Outgoing::Closing { deadline_ms });
        }
    }

    /// Ends every stream: the worker has stopped (nothing is held any more).
    pub fn shutdown(&self) {
        self.stopped.cancel();
        let subs: Vec<Arc<Subscriber>> = self.state().subs.values().cloned().collect();
        for s in &subs {
            self.unsubscribe(s);
        }
    }

    /// Completes when the hub is shut down.
    pub fn stopped(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stopped.cancelled()
    }

    /// Handlers some accepting subscriber runs now (sorted).
    pub fn served(&self) -> Arc<[String]> {
        self.state().served.clone()
    }

    /// A number that changes whenever [`Hub::served`] may have.
    pub fn version(&self) -> u64 {
        self.state().version
    }

    /// Whether some accepting subscriber runs `handler`.
    pub fn serves(&self, handler: &str) -> bool {
        self.state()
            .by_handler
            .get(handler)
            .is_some_and(|e| e.subs.iter().any(|s| s.accepting()))
    }

    /// Completes when the subscriptions change (a subscriber joins or leaves);
    /// `enable` it before looking at [`Hub::served`] so no change is missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Hands a delivery to the subscriber of its handler with the most free
    /// credit, or queues it for the next credit freed; its end (verdict, settle
    /// timeout with extensions, the subscriber's end, no subscriber, the owner's
    /// drain giving up) reaches `offer.done`, exactly once. Never waits.
    pub(crate) fn offer(&self, offer: Offer) {
        let mut st = self.state();
        if st.abandoned.contains(&offer.owner) {
            drop(st);
            (offer.done)(Remote::Abandoned);
            return;
        }
        match Self::pick(&mut st, &offer.handler) {
            Pick::Got(sub) => Self::hand_over(&sub, offer),
            Pick::Busy => st
                .by_handler
                .entry(offer.handler.clone())
                .or_default()
                .waiting
                .push_back(offer),
            Pick::None => {
                drop(st);
                (offer.done)(Remote::NoSubscriber);
            }
        }
    }

    /// [`Hub::offer`] as a future of its end (handlers under a concurrency or rate
    /// limit are admitted by a task of their own, which then waits here).
    pub(crate) async fn deliver_traced(
        &self,
        handler: &str,
        items: Vec<Item>,
        queue: u32,
        trace: Option<TraceContext>,
        owner: u64,
    ) -> Remote {
        let (tx, rx) = oneshot::channel();
        self.offer(Offer {
            handler: handler.to_owned(),
            items,
            queue,
            trace,
            owner,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        // The hub calls `done` on every path; a dropped one means the hub is gone.
        rx.await.unwrap_or(Remote::Abandoned)
    }

    /// [`Hub::deliver_traced`] without a trace, for the tests.
    #[cfg(test)]
    pub(crate) async fn deliver(&self, handler: &str, items: Vec<Item>, queue: u32) -> Remote {
        self.deliver_traced(handler, items, queue, None, 0).await
    }

    /// The drain of `owner` gave up: every delivery of its, held or waiting for
    /// credit, ends `Abandoned` now (its items are handed back), and so does
    /// whatever it offers later. A late settlement of one changes nothing.
    pub(crate) fn abandon(&self, owner: u64) {
        let (subs, waiting) = {
            let mut st = self.state();
            st.abandoned.insert(owner);
            let mut waiting = Vec::new();
            for e in st.by_handler.values_mut() {
                for o in std::mem::take(&mut e.waiting) {
                    if o.owner == owner {
                        waiting.push(o);
                    } else {
                        e.waiting.push_back(o);
                    }
                }
            }
            (st.subs.values().cloned().collect::<Vec<_>>(), waiting)
        };
        for o in waiting {
            (o.done)(Remote::Abandoned);
        }
        for sub in subs {
            let held = sub.take_held(|h| h.owner == owner);
            if !held.is_empty() {
                self.give_back(&sub, held.len() as u32);
            }
            for h in held {
                (h.done)(Remote::Abandoned);
            }
        }
    }

    /// Ends held deliveries whose settle deadline passed by `now_ms`.
    fn sweep(&self, now_ms: i64) {
        let subs: Vec<Arc<Subscriber>> = self.state().subs.values().cloned().collect();
        for sub in subs {
            let expired = sub.take_held(|h| h.deadline_ms <= now_ms);
            if expired.is_empty() {
                continue;
            }
            self.give_back(&sub, expired.len() as u32);
            for h in expired {
                (h.done)(Remote::TimedOut {
                    subscriber: sub.name.clone(),
                    after_ms: u64::from(sub.settle_timeout_ms),
                });
            }
        }
    }

    /// Sends `offer` down `sub`'s stream, one of its credits already taken; called
    /// under the hub's lock, so `sub` cannot begin draining or leave meanwhile.
    /// A stream that ended an instant ago (its reader saw the end before taking the
    /// hub's lock) ends the delivery `Gone`, its credit back.
    fn hand_over(sub: &Arc<Subscriber>, offer: Offer) {
        let id = sub.next_delivery.fetch_add(1, Ordering::Relaxed);
        let deadline_ms = system_now_ms() + i64::from(sub.settle_timeout_ms);
        let Offer {
            handler,
            items,
            queue,
            trace,
            owner,
            done,
        } = offer;
        // Held before it is sent: a verdict can come back before `send` returns.
        lock(&sub.pending).insert(
            id,
            Held {
                done,
                owner,
                deadline_ms,
            },
        );
        let sent = sub.send(Outgoing::Deliver(OutDelivery {
            id,
            handler,
            items,
            queue,
            settle_deadline_ms: deadline_ms,
            traceparent: trace,
        }));
        if !sent && let Some(h) = lock(&sub.pending).remove(&id) {
            sub.held.fetch_sub(1, Ordering::Relaxed);
            (h.done)(Remote::Gone {
                subscriber: sub.name.clone(),
            });
        }
    }

    /// The accepting subscriber of `handler` with the most free credit, its credit
    /// taken; or why there is none.
    fn pick(st: &mut State, handler: &str) -> Pick {
        let Some(e) = st.by_handler.get(handler) else {
            return Pick::None;
        };
        let best = e
            .subs
            .iter()
            .filter(|s| s.accepting())
            .max_by_key(|s| s.free());
        match best {
            None => Pick::None,
            Some(s) if s.free() == 0 => Pick::Busy,
            Some(s) => {
                s.held.fetch_add(1, Ordering::Relaxed);
                Pick::Got(s.clone())
            }
        }
    }

    /// Gives `sub`'s free credit to deliveries waiting for its handlers, fairly
    /// across handlers (one each per round).
    fn feed(st: &mut State, sub: &Arc<Subscriber>) {
        loop {
            let mut gave = false;
            for h in &sub.handlers {
                if !sub.accepting() || sub.free() == 0 {
                    return;
                }
                let Some(e) = st.by_handler.get_mut(h) else {
                    continue;
                };
                if let Some(o) = e.waiting.pop_front() {
                    sub.held.fetch_add(1, Ordering::Relaxed);
                    Self::hand_over(sub, o);
                    gave = true;
                }
            }
            if !gave {
                return;
            }
        }
    }

    /// After subscribers of `handlers` left or began draining: deliveries waiting
    /// on a handler nobody serves any more end `NoSubscriber` (their items are
    /// parked); the others get whatever credit the remaining subscribers have.
    fn reroute(st: &mut State, handlers: &[String]) {
        for h in handlers {
            let Some(e) = st.by_handler.get_mut(h) else {
                continue;
            };
            if e.subs.iter().any(|s| s.accepting()) {
                let subs = e.subs.clone();
                for s in &subs {
                    Self::feed(st, s);
                }
            } else {
                for o in e.waiting.drain(..) {
                    (o.done)(Remote::NoSubscriber);
                }
                if e.subs.is_empty() {
                    st.by_handler.remove(h);
                }
            }
        }
    }

    fn recompute(st: &mut State) {
        let mut served: Vec<String> = st
            .by_handler
            .iter()
            .filter(|(_, e)| e.subs.iter().any(|s| s.accepting()))
            .map(|(h, _)| h.clone())
            .collect();
        served.sort();
        st.served = served.into();
        st.version += 1;
    }

    /// Returns `n` credits of `sub` and hands them on to waiting deliveries.
    fn give_back(&self, sub: &Arc<Subscriber>, n: u32) {
        let mut st = self.state();
        sub.held.fetch_sub(n, Ordering::Relaxed);
        Self::feed(&mut st, sub);
    }
}

enum Pick {
    Got(Arc<Subscriber>),
    Busy,
    None,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(handlers: &[&str], credit: u32) -> SubscribeSpec {
        SubscribeSpec {
            handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
            credit,
            name: "t".into(),
            settle_timeout_ms: 0,
        }
    }

    fn item(id: &str, handler: &str) -> Item {
        Item {
            id: id.into(),
            key: id.into(),
            handler: handler.into(),
            due_at_ms: 0,
            payload: Default::default(),
            max_attempts: 3,
            merge_key: None,
            attempt: 1,
            traceparent: None,
        }
    }

    fn delivery_id(o: Option<Outgoing>) -> u64 {
        match o {
            Some(Outgoing::Deliver(d)) => d.id,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    #[test]
    fn bad_subscriptions_name_the_field() {
        let field = |s: SubscribeSpec| match s.validate() {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(spec(&[], 1)), "subscribe.handlers");
        assert_eq!(field(spec(&["a", "b c"], 1)), "subscribe.handlers[1]");
        assert_eq!(field(spec(&["a", "a"], 1)), "subscribe.handlers[1]");
        assert_eq!(field(spec(&["a"], 0)), "subscribe.credit");
        assert_eq!(field(spec(&["a"], MAX_CREDIT + 1)), "subscribe.credit");
        let mut s = spec(&["a"], 1);
        s.settle_timeout_ms = 10;
        assert_eq!(field(s), "subscribe.settle_timeout_ms");
    }

    #[tokio::test]
    async fn credit_bounds_what_a_subscriber_holds_and_freed_credit_goes_to_the_next() {
        let hub = Hub::new(HubOptions::default());
        let (sub, mut rx) = hub.subscribe(spec(&["h"], 1)).unwrap();
        assert_eq!(&*hub.served(), ["h".to_owned()]);
        let (h1, h2) = (hub.clone(), hub.clone());
        let first = tokio::spawn(async move { h1.deliver("h", vec![item("a", "h")], 0).await });
        let second = tokio::spawn(async move { h2.deliver("h", vec![item("b", "h")], 0).await });
        let id1 = delivery_id(rx.recv().await);
        // Credit 1: the second waits until the first is settled.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            rx.try_recv().is_err(),
            "second delivery exceeded the credit"
        );
        assert!(hub.settle(&sub, [(id1, Verdict::Ack)]).is_empty());
        assert_eq!(first.await.unwrap(), Remote::Settled(Verdict::Ack));
        let id2 = delivery_id(rx.recv().await);
        // Settling twice, or an unknown id, changes nothing and is refused.
        let refused = hub.settle(
            &sub,
            [
                (id2, Verdict::Release),
                (id2, Verdict::Ack),
                (999, Verdict::Ack),
            ],
        );
        assert_eq!(refused, [id2, 999]);
        assert_eq!(second.await.unwrap(), Remote::Settled(Verdict::Release));
    }

    #[tokio::test]
    async fn no_subscriber_and_a_gone_subscriber() {
        let hub = Hub::new(HubOptions::default());
        assert_eq!(
            hub.deliver("h", vec![item("a", "h")], 0).await,
            Remote::NoSubscriber
        );
        let (sub, mut rx) = hub.subscribe(spec(&["h"], 1)).unwrap();
        let h = hub.clone();
        let held = tokio::spawn(async move { h.deliver("h", vec![item("a", "h")], 0).await });
        let h = hub.clone();
        let waiting = tokio::spawn(async move { h.deliver("h", vec![item("b", "h")], 0).await });
        delivery_id(rx.recv().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        hub.unsubscribe(&sub);
        assert!(matches!(held.await.unwrap(), Remote::Gone { .. }));
        // The one waiting for credit now has nobody: it is parked, not failed.
        assert_eq!(waiting.await.unwrap(), Remote::NoSubscriber);
        assert!(hub.served().is_empty());
    }

    #[tokio::test]
    async fn settle_timeout_counts_unless_extended() {
        let hub = Hub::new(HubOptions {
            settle_timeout_ms: 1_000,
            ..HubOptions::default()
        });
        let (sub, mut rx) = hub.subscribe(spec(&["h"], 2)).unwrap();
        let h = hub.clone();
        let kept = tokio::spawn(async move { h.deliver("h", vec![item("a", "h")], 0).await });
        let h = hub.clone();
        let lapsed = tokio::spawn(async move { h.deliver("h", vec![item("b", "h")], 0).await });
        // The two tasks race for the first id: find the one carrying item "a".
        let mut kept_id = 0;
        for _ in 0..2 {
            match rx.recv().await {
                Some(Outgoing::Deliver(d)) if d.items[0].id == "a" => kept_id = d.id,
                Some(Outgoing::Deliver(_)) => {}
                other => panic!("expected a delivery, got {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Only "a" is extended.
        assert!(sub.extend(&[kept_id], 3_000).is_empty());
        let timed_out = lapsed.await.unwrap();
        assert!(
            matches!(timed_out, Remote::TimedOut { .. }),
            "{timed_out:?}"
        );
        assert!(!kept.is_finished(), "extended delivery timed out");
        assert!(hub.settle(&sub, [(kept_id, Verdict::Ack)]).is_empty());
        assert_eq!(kept.await.unwrap(), Remote::Settled(Verdict::Ack));
    }

    #[tokio::test]
    async fn nothing_follows_drained_and_the_rest_go_elsewhere() {
        let hub = Hub::new(HubOptions::default());
        let (a, mut ra) = hub.subscribe(spec(&["h"], 5)).unwrap();
        let (b, mut rb) = hub.subscribe(spec(&["h"], 5)).unwrap();
        hub.drain(&a);
        assert!(matches!(ra.recv().await, Some(Outgoing::Drained)));
        for i in 0..3 {
            let h = hub.clone();
            tokio::spawn(async move { h.deliver("h", vec![item(&format!("d{i}"), "h")], 0).await });
        }
        for _ in 0..3 {
            delivery_id(rb.recv().await);
        }
        assert!(ra.try_recv().is_err(), "a delivery followed Drained");
        // When the last accepting subscriber drains too, the handler is not served.
        hub.drain(&b);
        assert!(hub.served().is_empty());
        assert_eq!(
            hub.deliver("h", vec![item("x", "h")], 0).await,
            Remote::NoSubscriber
        );
    }

    #[tokio::test]
    async fn abandon_ends_the_owners_deliveries_and_returns_the_credit() {
        let hub = Hub::new(HubOptions::default());
        let (sub, mut rx) = hub.subscribe(spec(&["h"], 1)).unwrap();
        let (mine, other) = (hub.owner(), hub.owner());
        let h = hub.clone();
        let held = tokio::spawn(async move {
            h.deliver_traced("h", vec![item("a", "h")], 0, None, mine)
                .await
        });
        let id = delivery_id(rx.recv().await);
        // Credit 1: these two wait, one of each owner.
        let h = hub.clone();
        let waiting = tokio::spawn(async move {
            h.deliver_traced("h", vec![item("b", "h")], 0, None, mine)
                .await
        });
        let h = hub.clone();
        let others = tokio::spawn(async move {
            h.deliver_traced("h", vec![item("c", "h")], 0, None, other)
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        hub.abandon(mine);
        assert_eq!(held.await.unwrap(), Remote::Abandoned);
        assert_eq!(waiting.await.unwrap(), Remote::Abandoned);
        // A late settlement of the abandoned delivery changes nothing.
        assert_eq!(hub.settle(&sub, [(id, Verdict::Ack)]), [id]);
        // The freed credit went to the other owner's delivery.
        let id = delivery_id(rx.recv().await);
        assert!(hub.settle(&sub, [(id, Verdict::Ack)]).is_empty());
        assert_eq!(others.await.unwrap(), Remote::Settled(Verdict::Ack));
        assert_eq!(sub.free(), 1);
        // What the abandoned owner offers later ends at once.
        assert_eq!(
            hub.deliver_traced("h", vec![item("d", "h")], 0, None, mine)
                .await,
            Remote::Abandoned
        );
    }
}
