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
//! Why one mutex over all subscribers: every decision (which subscriber, how much
//! credit is left, who waits for credit) must see one consistent picture, the
//! critical sections are a few map operations, and there are few subscribers per
//! worker. Waiting for credit is a FIFO of one-shot channels per handler, so freed
//! credit wakes exactly the delivery that gets it (no thundering herd when
//! thousands of deliveries wait).
//!
//! This module has no gRPC in it: [`server`] is the tonic edge that turns streams
//! into [`Hub::subscribe`] calls and [`Outgoing`] values into messages, and
//! [`client`] is the Rust SDK's side of the same conversation.

pub mod client;
#[cfg(feature = "serve")]
pub mod server;
pub mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
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
            limits::check_handler(&field, h)?;
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

/// One delivery a subscriber holds.
#[derive(Debug)]
struct Held {
    verdict: oneshot::Sender<Verdict>,
    deadline_ms: Arc<AtomicI64>,
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

    /// Queues a delivery unless the subscriber drains (checked under the same lock
    /// that queues `Drained`, so no delivery ever follows it) or its stream ended.
    fn send_delivery(&self, d: OutDelivery) -> Sent {
        let out = lock(&self.out);
        if self.draining.load(Ordering::Relaxed) {
            return Sent::Draining(d);
        }
        match out.as_ref() {
            Some(tx) if tx.send(Outgoing::Deliver(d)).is_ok() => Sent::Yes,
            _ => Sent::Closed,
        }
    }

    /// Ends deliveries this stream holds; answers the ids it does not hold (unknown,
    /// already settled, timed out), which changed nothing.
    pub fn settle(&self, verdicts: impl IntoIterator<Item = (u64, Verdict)>) -> Vec<u64> {
        let mut refused = Vec::new();
        let mut pending = lock(&self.pending);
        for (id, v) in verdicts {
            match pending.remove(&id) {
                // The delivery's task may have given up an instant ago (abandoned):
                // then nobody listens, and nothing was changed either way.
                Some(h) => {
                    let _ = h.verdict.send(v);
                }
                None => refused.push(id),
            }
        }
        refused
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
        let pending = lock(&self.pending);
        let mut refused = Vec::new();
        for id in ids {
            match pending.get(id) {
                Some(h) => h.deadline_ms.store(deadline, Ordering::Relaxed),
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
}

/// A delivery waiting for credit on one of its handler's subscribers.
type Waiter = oneshot::Sender<Option<Arc<Subscriber>>>;

#[derive(Debug, Default)]
struct HandlerSubs {
    subs: Vec<Arc<Subscriber>>,
    waiters: VecDeque<Waiter>,
}

#[derive(Debug, Default)]
struct State {
    subs: HashMap<u64, Arc<Subscriber>>,
    by_handler: HashMap<String, HandlerSubs>,
    /// Handlers with an accepting subscriber, sorted: what the consumer serves.
    served: Arc<[String]>,
    /// Bumped whenever `served` may have changed.
    version: u64,
}

/// Routes deliveries to subscribers (see the module doc).
#[derive(Debug)]
pub struct Hub {
    opts: HubOptions,
    state: Mutex<State>,
    next_sub: AtomicU64,
    /// Fires when the first subscriber arrives (or any subscription changes), so an
    /// idle consumer can start claiming queues.
    changed: tokio::sync::Notify,
    /// Fires when the hub is shut down: every stream ends.
    stopped: CancellationToken,
}

impl Hub {
    /// A hub with no subscriber yet.
    pub fn new(opts: HubOptions) -> Arc<Self> {
        Arc::new(Self {
            opts,
            state: Mutex::default(),
            next_sub: AtomicU64::new(1),
            changed: tokio::sync::Notify::new(),
            stopped: CancellationToken::new(),
        })
    }

    /// The settings subscribers are told.
    pub fn options(&self) -> &HubOptions {
        &self.opts
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
        // Dropping the verdict senders wakes each delivery's task with "gone".
        let held = std::mem::take(&mut *lock(&sub.pending));
        tracing::info!(subscriber = %sub.name, unsettled = held.len(), "subscriber left");
        drop(held);
        self.changed.notify_waiters();
    }

    /// The subscriber stops taking deliveries (it sent `Drain`); what waits for its
    /// credit goes elsewhere or is parked.
    pub fn drain(&self, sub: &Arc<Subscriber>) {
        let mut st = self.state();
        {
            // Under the stream's lock: every delivery queued before `Drained` is
            // sent before it, and none after (see `send_delivery`).
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

    /// Hands a delivery to a subscriber of `handler` with free credit (waiting for
    /// credit if all are busy), and waits for its verdict, the settle timeout
    /// (extensions included), the subscriber's end, or `abandon`.
    #[cfg(test)]
    pub(crate) async fn deliver(
        self: &Arc<Self>,
        handler: &str,
        items: Vec<Item>,
        queue: u32,
        abandon: &CancellationToken,
    ) -> Remote {
        self.deliver_traced(handler, items, queue, None, abandon)
            .await
    }

    /// [`Hub::deliver`], telling the subscriber the worker's span of the delivery.
    pub(crate) async fn deliver_traced(
        self: &Arc<Self>,
        handler: &str,
        mut items: Vec<Item>,
        queue: u32,
        trace: Option<TraceContext>,
        abandon: &CancellationToken,
    ) -> Remote {
        loop {
            let sub = match self.take_credit(handler, abandon).await {
                Ok(s) => s,
                Err(r) => return r,
            };
            match self
                .hand_over(&sub, handler, items, queue, trace, abandon)
                .await
            {
                Ok(r) => return r,
                // It began draining between our pick and the send: pick again.
                Err(back) => items = back,
            }
        }
    }

    /// One credit of a subscriber of `handler`, waiting for one if all are busy.
    async fn take_credit(
        &self,
        handler: &str,
        abandon: &CancellationToken,
    ) -> Result<Arc<Subscriber>, Remote> {
        let rx = {
            let mut st = self.state();
            match Self::pick(&mut st, handler) {
                Pick::Got(s) => return Ok(s),
                Pick::None => return Err(Remote::NoSubscriber),
                Pick::Busy => {
                    let (tx, rx) = oneshot::channel();
                    st.by_handler
                        .entry(handler.to_owned())
                        .or_default()
                        .waiters
                        .push_back(tx);
                    rx
                }
            }
        };
        tokio::select! {
            got = rx => match got {
                Ok(Some(s)) => Ok(s),
                // Every subscriber of the handler left or is draining.
                Ok(None) | Err(_) => Err(Remote::NoSubscriber),
            },
            // Dropping the receiver: whoever would have handed credit to it sees
            // the send fail and gives the credit to the next waiter.
            _ = abandon.cancelled() => Err(Remote::Abandoned),
        }
    }

    /// Sends the delivery down `sub`'s stream (holding one of its credits, returned
    /// on every path) and waits for its end. Answers the items back when `sub`
    /// began draining before the send.
    async fn hand_over(
        &self,
        sub: &Arc<Subscriber>,
        handler: &str,
        items: Vec<Item>,
        queue: u32,
        trace: Option<TraceContext>,
        abandon: &CancellationToken,
    ) -> Result<Remote, Vec<Item>> {
        let _credit = CreditGuard { hub: self, sub };
        let id = sub.next_delivery.fetch_add(1, Ordering::Relaxed);
        let deadline = Arc::new(AtomicI64::new(
            system_now_ms() + i64::from(sub.settle_timeout_ms),
        ));
        let (tx, mut rx) = oneshot::channel();
        lock(&sub.pending).insert(
            id,
            Held {
                verdict: tx,
                deadline_ms: deadline.clone(),
            },
        );
        let sent = sub.send_delivery(OutDelivery {
            id,
            handler: handler.to_owned(),
            items,
            queue,
            settle_deadline_ms: deadline.load(Ordering::Relaxed),
            traceparent: trace,
        });
        match sent {
            Sent::Yes => {}
            Sent::Draining(d) => {
                lock(&sub.pending).remove(&id);
                return Err(d.items);
            }
            Sent::Closed => {
                lock(&sub.pending).remove(&id);
                return Ok(Remote::Gone {
                    subscriber: sub.name.clone(),
                });
            }
        }
        loop {
            let wait = deadline.load(Ordering::Relaxed) - system_now_ms();
            tokio::select! {
                v = &mut rx => return Ok(match v {
                    Ok(v) => Remote::Settled(v),
                    Err(_) => Remote::Gone { subscriber: sub.name.clone() },
                }),
                _ = tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)) => {
                    // An extension may have moved the deadline while we slept.
                    if deadline.load(Ordering::Relaxed) <= system_now_ms() {
                        lock(&sub.pending).remove(&id);
                        return Ok(Remote::TimedOut {
                            subscriber: sub.name.clone(),
                            after_ms: u64::from(sub.settle_timeout_ms),
                        });
                    }
                }
                _ = abandon.cancelled() => {
                    lock(&sub.pending).remove(&id);
                    return Ok(Remote::Abandoned);
                }
            }
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
                while let Some(w) = e.waiters.pop_front() {
                    sub.held.fetch_add(1, Ordering::Relaxed);
                    if w.send(Some(sub.clone())).is_ok() {
                        gave = true;
                        break;
                    }
                    // That delivery was abandoned meanwhile: the credit goes on.
                    sub.held.fetch_sub(1, Ordering::Relaxed);
                }
            }
            if !gave {
                return;
            }
        }
    }

    /// After subscribers of `handlers` left or began draining: waiters of a handler
    /// nobody serves any more are told so (their items are parked); the others get
    /// whatever credit the remaining subscribers have.
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
                for w in e.waiters.drain(..) {
                    let _ = w.send(None);
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

    /// Returns one credit of `sub` and hands it on to a waiting delivery.
    fn give_back(&self, sub: &Arc<Subscriber>) {
        let mut st = self.state();
        sub.held.fetch_sub(1, Ordering::Relaxed);
        Self::feed(&mut st, sub);
    }
}

enum Sent {
    Yes,
    Draining(OutDelivery),
    Closed,
}

enum Pick {
    Got(Arc<Subscriber>),
    Busy,
    None,
}

/// Returns a delivery's credit however its task ends.
struct CreditGuard<'a> {
    hub: &'a Hub,
    sub: &'a Arc<Subscriber>,
}

impl Drop for CreditGuard<'_> {
    fn drop(&mut self) {
        self.hub.give_back(self.sub);
    }
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
        let never = CancellationToken::new();
        let (h1, h2) = (hub.clone(), hub.clone());
        let n1 = never.clone();
        let first =
            tokio::spawn(async move { h1.deliver("h", vec![item("a", "h")], 0, &n1).await });
        let n2 = never.clone();
        let second =
            tokio::spawn(async move { h2.deliver("h", vec![item("b", "h")], 0, &n2).await });
        let id1 = delivery_id(rx.recv().await);
        // Credit 1: the second waits until the first is settled.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            rx.try_recv().is_err(),
            "second delivery exceeded the credit"
        );
        assert!(sub.settle([(id1, Verdict::Ack)]).is_empty());
        assert_eq!(first.await.unwrap(), Remote::Settled(Verdict::Ack));
        let id2 = delivery_id(rx.recv().await);
        // Settling twice, or an unknown id, changes nothing and is refused.
        let refused = sub.settle([
            (id2, Verdict::Release),
            (id2, Verdict::Ack),
            (999, Verdict::Ack),
        ]);
        assert_eq!(refused, [id2, 999]);
        assert_eq!(second.await.unwrap(), Remote::Settled(Verdict::Release));
    }

    #[tokio::test]
    async fn no_subscriber_and_a_gone_subscriber() {
        let hub = Hub::new(HubOptions::default());
        let never = CancellationToken::new();
        assert_eq!(
            hub.deliver("h", vec![item("a", "h")], 0, &never).await,
            Remote::NoSubscriber
        );
        let (sub, mut rx) = hub.subscribe(spec(&["h"], 1)).unwrap();
        let h = hub.clone();
        let n = never.clone();
        let held = tokio::spawn(async move { h.deliver("h", vec![item("a", "h")], 0, &n).await });
        let h = hub.clone();
        let n = never.clone();
        let waiting =
            tokio::spawn(async move { h.deliver("h", vec![item("b", "h")], 0, &n).await });
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
        let never = CancellationToken::new();
        let h = hub.clone();
        let n = never.clone();
        let kept = tokio::spawn(async move { h.deliver("h", vec![item("a", "h")], 0, &n).await });
        let h = hub.clone();
        let n = never.clone();
        let lapsed = tokio::spawn(async move { h.deliver("h", vec![item("b", "h")], 0, &n).await });
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
        assert!(sub.settle([(kept_id, Verdict::Ack)]).is_empty());
        assert_eq!(kept.await.unwrap(), Remote::Settled(Verdict::Ack));
    }

    #[tokio::test]
    async fn nothing_follows_drained_and_the_rest_go_elsewhere() {
        let hub = Hub::new(HubOptions::default());
        let (a, mut ra) = hub.subscribe(spec(&["h"], 5)).unwrap();
        let (b, mut rb) = hub.subscribe(spec(&["h"], 5)).unwrap();
        hub.drain(&a);
        assert!(matches!(ra.recv().await, Some(Outgoing::Drained)));
        let never = CancellationToken::new();
        for i in 0..3 {
            let (h, n) = (hub.clone(), never.clone());
            tokio::spawn(async move {
                h.deliver("h", vec![item(&format!("d{i}"), "h")], 0, &n)
                    .await
            });
        }
        for _ in 0..3 {
            delivery_id(rb.recv().await);
        }
        assert!(ra.try_recv().is_err(), "a delivery followed Drained");
        // When the last accepting subscriber drains too, the handler is not served.
        hub.drain(&b);
        assert!(hub.served().is_empty());
        assert_eq!(
            hub.deliver("h", vec![item("x", "h")], 0, &never).await,
            Remote::NoSubscriber
        );
    }

    #[tokio::test]
    async fn abandon_returns_the_credit() {
        let hub = Hub::new(HubOptions::default());
        let (sub, mut rx) = hub.subscribe(spec(&["h"], 1)).unwrap();
        let stop = CancellationToken::new();
        let h = hub.clone();
        let s = stop.clone();
        let t = tokio::spawn(async move { h.deliver("h", vec![item("a", "h")], 0, &s).await });
        let id = delivery_id(rx.recv().await);
        stop.cancel();
        assert_eq!(t.await.unwrap(), Remote::Abandoned);
        // A late settlement of the abandoned delivery changes nothing.
        assert_eq!(sub.settle([(id, Verdict::Ack)]), [id]);
        assert_eq!(sub.free(), 1);
    }
}
