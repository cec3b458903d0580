//! The Rust SDK over `chime.v1.Deliveries`: item handlers run in this process, while
//! a chime worker (a sidecar or a shared pool) does the queue work and hands over
//! the due items. `Worker::builder().subscribe(opts).handler(…)` uses it.
//!
//! One stream at a time, to the first endpoint that answers (others are tried in
//! turn after a break). Each delivery runs in its own task; verdicts are batched
//! into `Settle` messages (whatever finished while the last one was being sent);
//! running deliveries are extended every third of the settle timeout, so a slow
//! handler is never timed out while it runs. On stop: `Drain`, running handlers get
//! the drain timeout to finish, the rest see their cancellation token and are
//! released; then the stream is closed.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chime_shared::auth::Bearer;
use futures_util::FutureExt;
use pb::subscribe_request::Kind as In;
use pb::subscribe_response::Kind as Out;
use proto as pb;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::{Verdict, wire};
use crate::handler::{HandlerError, ItemContext};
use crate::{Registered, consumer::DrainReport};

/// HTTP/2 flow-control window of the subscription (stream and connection).
const WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// Where the items come from and how many this process takes at once.
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    /// Delivery service endpoints of chime workers (`http://127.0.0.1:7071` for a
    /// sidecar); tried in turn.
    pub endpoints: Vec<String>,
    /// The token presented (`authorization: Bearer <token>`); none: no header.
    pub token: Option<String>,
    /// TLS for `https://` endpoints.
    pub tls: chime_shared::tls::ClientTls,
    /// Most deliveries held at once (1..=10,000). Default 256.
    pub credit: u32,
    /// How this subscriber names itself in the worker's logs. Default: host name
    /// and process id.
    pub name: String,
    /// Settle timeout asked for, ms (0: the worker's default, 30 s).
    pub settle_timeout_ms: u32,
    /// On stop, how long running handlers may finish before they are cancelled and
    /// their items handed back, ms. Default 25 s.
    pub drain_timeout_ms: u64,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:7071".into()],
            token: None,
            tls: Default::default(),
            credit: 256,
            name: format!("{}:{}", crate::default_worker_id(), std::process::id()),
            settle_timeout_ms: 0,
            drain_timeout_ms: 25_000,
        }
    }
}

/// A running subscription (see the module doc).
#[derive(Debug)]
pub(crate) struct Subscription {
    handlers: HashMap<String, Handler>,
    opts: SubscriberOptions,
    /// `opts.name`, shared by every handler context.
    name: Arc<str>,
    handled: std::sync::atomic::AtomicU64,
    handed_back: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Handler {
    reg: Registered,
    gate: Option<Arc<Semaphore>>,
}

/// How one stream ended.
enum Ended {
    /// Drained: stop.
    Done,
    /// Broken or closed by the worker: connect again (after a pause).
    Again,
}

impl Subscription {
    pub(crate) fn new(handlers: HashMap<String, Registered>, opts: SubscriberOptions) -> Arc<Self> {
        let handlers = handlers
            .into_iter()
            .map(|(n, reg)| {
                let gate = reg.concurrency.map(|c| Arc::new(Semaphore::new(c)));
                (n, Handler { reg, gate })
            })
            .collect();
        Arc::new(Self {
            handlers,
            name: opts.name.as_str().into(),
            opts,
            handled: Default::default(),
            handed_back: Default::default(),
        })
    }

    /// Subscribes until `stop` fires, then drains.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) -> DrainReport {
        let mut backoff = Duration::from_millis(100);
        let mut next = 0usize;
        loop {
            let endpoint = self.opts.endpoints[next % self.opts.endpoints.len()].clone();
            next += 1;
            match self.clone().stream(&endpoint, &stop).await {
                Ended::Done => break,
                Ended::Again if stop.is_cancelled() => break,
                Ended::Again => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {},
                _ = stop.cancelled() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        use std::sync::atomic::Ordering::Relaxed;
        DrainReport {
            handled: self.handled.load(Relaxed),
            handed_back: self.handed_back.load(Relaxed),
        }
    }

    /// One stream: subscribe, run deliveries, settle, drain on `stop`.
    async fn stream(self: Arc<Self>, endpoint: &str, stop: &CancellationToken) -> Ended {
        let channel = match chime_shared::tls::endpoint(endpoint, &self.opts.tls, "deliveries.") {
            // A window large enough for a whole credit of deliveries in flight: with
            // HTTP/2's default 64 KiB the worker would stall every few hundred
            // deliveries waiting for our window update (a round trip each time).
            Ok(e) => e
                .initial_stream_window_size(Some(WINDOW_BYTES))
                .initial_connection_window_size(Some(WINDOW_BYTES))
                .connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true),
            Err(e) => {
                warn!(endpoint, error = %e, "bad delivery endpoint");
                return Ended::Again;
            }
        };
        let channel = match channel.connect().await {
            Ok(c) => c,
            Err(e) => {
                debug!(endpoint, error = %e, "cannot reach the chime worker");
                return Ended::Again;
            }
        };
        let mut client = pb::deliveries_client::DeliveriesClient::new(channel)
            .max_decoding_message_size(super::MAX_ENCODE_BYTES);
        let (tx, rx) = mpsc::channel::<pb::SubscribeRequest>(64);
        let mut handlers: Vec<String> = self.handlers.keys().cloned().collect();
        handlers.sort();
        let _ = tx
            .send(msg(In::Subscribe(pb::Subscribe {
                handlers,
                credit: self.opts.credit,
                subscriber: self.opts.name.clone(),
                settle_timeout_ms: self.opts.settle_timeout_ms,
            })))
            .await;
        let mut call = tonic::Request::new(ReceiverStream::new(rx));
        match Bearer::new(self.opts.token.as_deref()) {
            Ok(b) => b.apply(call.metadata_mut()),
            Err(e) => warn!(error = %e, "token not usable; subscribing without it"),
        }
        let mut inbound = match client.subscribe(call).await {
            Ok(r) => r.into_inner(),
            Err(e) if e.code() == tonic::Code::Unauthenticated => {
                tracing::error!(
                    endpoint,
                    "UNAUTHENTICATED: the chime worker refused this subscriber's token: {}",
                    e.message()
                );
                return Ended::Again;
            }
            Err(e) => {
                warn!(endpoint, code = ?e.code(), error = %e.message(), "subscription refused");
                return Ended::Again;
            }
        };
        let settle_timeout = match inbound.message().await {
            Ok(Some(pb::SubscribeResponse {
                kind: Some(Out::Subscribed(s)),
            })) => {
                info!(endpoint, worker = %s.worker_id, family = %s.family, credit = s.credit,
                      "subscribed to the chime worker");
                Duration::from_millis(u64::from(s.settle_timeout_ms.max(1_000)))
            }
            Err(e) if e.code() == tonic::Code::Unauthenticated => {
                tracing::error!(
                    endpoint,
                    "UNAUTHENTICATED: the chime worker refused this subscriber's token: {}",
                    e.message()
                );
                return Ended::Again;
            }
            other => {
                warn!(endpoint, answer = ?other.err(), "subscription failed");
                return Ended::Again;
            }
        };

        // Verdicts of this stream's deliveries (a new stream gets a new channel:
        // a verdict for an old stream's delivery means nothing to the new one).
        let (verdict_tx, mut verdict_rx) = mpsc::unbounded_channel::<(u64, Verdict)>();
        let running: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let abandon = Arc::new(CancellationToken::new());
        let mut extend = tokio::time::interval(settle_timeout / 3);
        extend.tick().await;
        let mut draining = false;
        // The worker's `Drained` came: nothing more will be delivered. Without it
        // (the drain timed out first), a delivery could still be on its way.
        let mut drained = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            if draining && drained && lock(&running).is_empty() && verdict_rx.is_empty() {
                // Everything settled: closing our side ends the stream.
                drop(tx);
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                info!("subscription drained");
                return Ended::Done;
            }
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(pb::SubscribeResponse { kind: Some(Out::Deliver(d)) })) => {
                        for delivery in d.deliveries {
                            self.start(delivery, &running, &verdict_tx, &abandon);
                        }
                    }
                    Ok(Some(pb::SubscribeResponse { kind: Some(Out::Refused(r)) })) => {
                        debug!(ids = ?r.delivery_ids, reason = %r.reason, "settlements refused");
                    }
                    Ok(Some(pb::SubscribeResponse { kind: Some(Out::Drained(_)) })) => {
                        debug!("drain acknowledged: no more deliveries on this stream");
                        drained = true;
                    }
                    Ok(Some(pb::SubscribeResponse { kind: Some(Out::Closing(c)) })) => {
                        info!(reason = %c.reason, "the chime worker is draining; finishing what we hold");
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        // The worker counted what we held as failed; results of the
                        // handlers still running cannot be settled any more.
                        abandon.cancel();
                        if !draining {
                            warn!(endpoint, "delivery stream ended; reconnecting");
                        }
                        return if draining { Ended::Done } else { Ended::Again };
                    }
                },
                Some(first) = verdict_rx.recv() => {
                    // Handlers finishing together settle in one message.
                    tokio::task::yield_now().await;
                    let mut batch = vec![first];
                    while batch.len() < 4_096 {
                        match verdict_rx.try_recv() {
                            Ok(v) => batch.push(v),
                            Err(_) => break,
                        }
                    }
                    if tx.send(msg(In::Settle(wire::settle_to_proto(batch)))).await.is_err() {
                        abandon.cancel();
                        return Ended::Again;
                    }
                }
                _ = extend.tick() => {
                    let ids: Vec<u64> = lock(&running).iter().copied().collect();
                    if !ids.is_empty() {
                        let m = msg(In::Extend(pb::Extend { delivery_ids: ids, extend_ms: 0 }));
                        if tx.send(m).await.is_err() {
                            abandon.cancel();
                            return Ended::Again;
                        }
                    }
                }
                _ = stop.cancelled(), if !draining => {
                    draining = true;
                    drain_deadline = Some(tokio::time::Instant::now()
                        + Duration::from_millis(self.opts.drain_timeout_ms));
                    info!(running = lock(&running).len(), "draining: no new deliveries");
                    if tx.send(msg(In::Drain(pb::Drain {}))).await.is_err() {
                        abandon.cancel();
                        return Ended::Done;
                    }
                }
                _ = async { tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                    if drain_deadline.is_some() => {
                    warn!(running = lock(&running).len(), "drain timeout: handing back running deliveries");
                    abandon.cancel();
                    drain_deadline = None;
                    drained = true;
                }
            }
        }
    }

    /// Runs one delivery; its verdict goes to `verdicts`. The handler is polled once
    /// right here: one that finishes without waiting (most do, at 100k items/s)
    /// costs no task. One that waits goes on in a task of its own; that task polls
    /// it again at once, with its own waker, so the no-op waker of the first poll
    /// loses no wake-up.
    fn start(
        self: &Arc<Self>,
        d: pb::Delivery,
        running: &Arc<Mutex<HashSet<u64>>>,
        verdicts: &mpsc::UnboundedSender<(u64, Verdict)>,
        abandon: &Arc<CancellationToken>,
    ) {
        let id = d.delivery_id;
        lock(running).insert(id);
        let handler = d.handler.clone();
        let trace = chime_shared::trace::TraceContext::from_header(Some(&d.traceparent));
        let items: Vec<_> = d
            .items
            .into_iter()
            .map(|i| wire::item_from_proto(&handler, i))
            .collect();
        let span = tracing::info_span!("item", item_id = %items.first().map(|i| i.id.as_str()).unwrap_or(""),
                                       key = %items.first().map(|i| i.key.as_str()).unwrap_or(""),
                                       merged = items.len(), queue = d.queue);
        let (this, running, verdicts, abandon) = (
            self.clone(),
            running.clone(),
            verdicts.clone(),
            abandon.clone(),
        );
        let task = async move {
            let verdict = this
                .run_one(&handler, d.queue, items, trace, &abandon)
                .await;
            use std::sync::atomic::Ordering::Relaxed;
            match verdict {
                Verdict::Release => this.handed_back.fetch_add(1, Relaxed),
                _ => this.handled.fetch_add(1, Relaxed),
            };
            lock(&running).remove(&id);
            let _ = verdicts.send((id, verdict));
        };
        let mut task = Box::pin(task.instrument(span));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(task);
        }
    }

    async fn run_one(
        &self,
        handler: &str,
        queue: u32,
        items: Vec<chime_shared::queue::Item>,
        trace: Option<chime_shared::trace::TraceContext>,
        abandon: &Arc<CancellationToken>,
    ) -> Verdict {
        let Some(h) = self.handlers.get(handler) else {
            // The worker only sends what we subscribed; be safe anyway.
            return Verdict::Release;
        };
        let _permit = match &h.gate {
            Some(g) => tokio::select! {
                p = g.clone().acquire_owned() => p.ok(),
                _ = abandon.cancelled() => return Verdict::Release,
            },
            None => None,
        };
        let ctx = ItemContext::new(items, abandon, self.name.clone(), queue, trace);
        let run = AssertUnwindSafe(h.reg.handler.handle(ctx)).catch_unwind();
        tokio::select! {
            biased;
            r = run => match r {
                Ok(Ok(())) => Verdict::Ack,
                Ok(Err(_)) if abandon.is_cancelled() => Verdict::Release,
                Ok(Err(HandlerError { message, retry_after_ms })) => Verdict::Fail {
                    error: message,
                    retry_after_ms,
                },
                Err(_) => Verdict::Fail {
                    error: "handler panicked".into(),
                    retry_after_ms: None,
                },
            },
            _ = abandon.cancelled() => Verdict::Release,
        }
    }
}

fn msg(kind: In) -> pb::SubscribeRequest {
    pb::SubscribeRequest { kind: Some(kind) }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
