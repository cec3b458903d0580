//! The worker's session with the coordinator: register, heartbeat, run assigned
//! shards, report results, follow the leader, drain.
//!
//! Shards run in their own tasks and outlive the stream: when the stream breaks
//! (a coordinator restart, a leader change), the session reconnects — to the
//! leader a follower names — registers again listing the shards it still runs, and
//! sends the results of shards that ended while it was away. Nothing a handler
//! finished is lost to a reconnect.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chime_shared::auth::Bearer;
use chime_shared::clock::system_now_ms;
use chime_shared::trace::{Span, SpanKind, TraceContext};
use pb::coordinator_message::Kind as Out;
use pb::worker_message::Kind as In;
use proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::jobs::{JobContext, JobHandler};

/// Where the coordinator is and how this worker presents itself.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Coordinator gRPC endpoints (`http://host:port`); a follower redirects to the
    /// leader.
    pub endpoints: Vec<String>,
    /// Worker group.
    pub group: String,
    /// Most shards this worker runs at once (at least 1: the coordinator refuses
    /// 0); the coordinator never sends it more.
    pub capacity: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// On shutdown, how long running shards may finish before they are cancelled
    /// (and handed to another worker), ms.
    pub drain_timeout_ms: u64,
    /// The worker token presented to the coordinator (none: no header).
    pub token: Option<String>,
    /// TLS for `https://` endpoints (CA, client certificate for mutual TLS).
    pub tls: chime_shared::tls::ClientTls,
}

type Key = (String, u32, u32);

/// How long a cancelled handler may take to return before it is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Results are sent again to every coordinator registered with within this window.
const RESEND_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Running {
    cancel: CancellationToken,
}

/// A worker's session (see the module doc).
#[derive(Debug)]
pub(crate) struct Session {
    worker_id: String,
    handlers: HashMap<String, Arc<dyn JobHandler>>,
    opts: SessionOptions,
    running: Mutex<HashMap<Key, Running>>,
    /// Results sent in the last [`RESEND_WINDOW`].
    recent: Mutex<std::collections::VecDeque<(std::time::Instant, pb::WorkerMessage)>>,
}

impl std::fmt::Debug for dyn JobHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobHandler")
    }
}

/// How far past its `start_by_session_ms` an `Assign` read now is, on the session
/// clock that started at `session_clock`; None when it is in time (or has no limit).
fn past_start_by(a: &pb::Assign, session_clock: tokio::time::Instant) -> Option<i64> {
    if a.start_by_session_ms <= 0 {
        return None;
    }
    let now = i64::try_from(session_clock.elapsed().as_millis()).unwrap_or(i64::MAX);
    (now > a.start_by_session_ms).then(|| now - a.start_by_session_ms)
}

fn key_of(r: &pb::RunRef) -> Key {
    (r.run_id.clone(), r.shard_index, r.attempt)
}

fn run_ref(k: &Key) -> pb::RunRef {
    pb::RunRef {
        run_id: k.0.clone(),
        shard_index: k.1,
        attempt: k.2,
    }
}

fn msg(kind: In) -> pb::WorkerMessage {
    pb::WorkerMessage { kind: Some(kind) }
}

/// An error and its causes, `: `-joined (tonic's own message is only "transport
/// error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// How one connection ended.
enum Ended {
    /// Drained and done.
    Done,
    /// Go to this endpoint next (a follower named the leader).
    Redirect(String),
    /// The stream broke; reconnect.
    Broken,
}

impl Session {
    pub(crate) fn new(
        worker_id: String,
        handlers: HashMap<String, Arc<dyn JobHandler>>,
        opts: SessionOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            worker_id,
            handlers,
            opts,
            running: Mutex::new(HashMap::new()),
            recent: Mutex::default(),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recent(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::VecDeque<(std::time::Instant, pb::WorkerMessage)>,
    > {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a result for re-sending after a reconnect.
    fn remember(&self, m: &pb::WorkerMessage) {
        if matches!(m.kind, Some(In::RunResult(_))) {
            let mut r = self.recent();
            while r
                .front()
                .is_some_and(|(at, _)| at.elapsed() >= RESEND_WINDOW)
                || r.len() >= 10_000
            {
                r.pop_front();
            }
            r.push_back((std::time::Instant::now(), m.clone()));
        }
    }

    /// Runs until `stop` fires and the drain is done.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        // Messages from shard tasks (started, log lines, results).
        let (task_tx, mut task_rx) = mpsc::unbounded_channel::<pb::WorkerMessage>();
        // Results not yet sent to a coordinator.
        let mut unsent: Vec<pb::WorkerMessage> = Vec::new();
        let mut next = 0usize;
        let mut redirect: Option<String> = None;
        let mut backoff = Duration::from_millis(100);
        // Redirects in a row, and the pause before following the next one.
        let mut redirects = 0u32;
        let mut pause = Duration::from_millis(100);
        let drain_deadline = Arc::new(Mutex::new(None::<tokio::time::Instant>));
        loop {
            let endpoint = redirect.take().unwrap_or_else(|| {
                let e = self.opts.endpoints[next % self.opts.endpoints.len()].clone();
                next += 1;
                e
            });
            match self
                .clone()
                .connect(
                    &endpoint,
                    &stop,
                    &task_tx,
                    &mut task_rx,
                    &mut unsent,
                    &drain_deadline,
                )
                .await
            {
                Ended::Done => return,
                Ended::Redirect(to) => {
                    info!(to = %to, "coordinator is not the leader; following");
                    // A restarted coordinator can name a stale leader (even itself)
                    // until the old lease runs out: follow at once the first time,
                    // then after a pause, never in a tight loop. The pause stays
                    // short (at most 500 ms): while a leader is being elected this
                    // loop is how a worker finds it, and every pause past the
                    // election is added to the failover.
                    redirects += 1;
                    if redirects > 1 {
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {},
                            _ = stop.cancelled(), if self.running().is_empty() => return,
                        }
                        pause = (pause * 2).min(Duration::from_millis(500));
                    }
                    // A coordinator answered: the next connection failure starts
                    // its backoff afresh.
                    backoff = Duration::from_millis(100);
                    redirect = Some(to);
                    continue;
                }
                Ended::Broken => {
                    redirects = 0;
                    pause = Duration::from_millis(100);
                }
            }
            if stop.is_cancelled() && self.running().is_empty() && task_rx.is_empty() {
                // Nothing left to report to anyone.
                if !unsent.is_empty() {
                    warn!(
                        results = unsent.len(),
                        "stopping with results no coordinator received"
                    );
                }
                return;
            }
            // While away, keep results (drop progress messages).
            while let Ok(m) = task_rx.try_recv() {
                if matches!(m.kind, Some(In::RunResult(_))) {
                    unsent.push(m);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {},
                _ = stop.cancelled(), if self.running().is_empty() => {},
            }
            // Capped at 500 ms, like the redirect pause: a failover is when
            // connections break (the old leader gone, a restarted follower not yet
            // listening), and a worker asleep when the new leader is elected adds
            // what is left of its sleep to the failover. With a 2 s cap, `bench
            // failover --idle-jobs 100000` saw both workers register 545 ms after
            // the new leader's engine started. A connection attempt every 500 ms to
            // a coordinator that is down costs nothing worth saving.
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// One connection: register, then serve until it ends.
    async fn connect(
        self: Arc<Self>,
        endpoint: &str,
        stop: &CancellationToken,
        task_tx: &mpsc::UnboundedSender<pb::WorkerMessage>,
        task_rx: &mut mpsc::UnboundedReceiver<pb::WorkerMessage>,
        unsent: &mut Vec<pb::WorkerMessage>,
        drain_deadline: &Arc<Mutex<Option<tokio::time::Instant>>>,
    ) -> Ended {
        let channel = match chime_shared::tls::endpoint(endpoint, &self.opts.tls, "coordinator.") {
            // Short keep-alives: a frozen coordinator is noticed within seconds
            // (`WORKER_NOTICES_LOSS_WITHIN_MS`, which a new leader's adoption
            // grace counts on).
            Ok(e) => e
                .connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_millis(
                    chime_shared::session::PING_AFTER_SILENCE_MS,
                ))
                .keep_alive_timeout(Duration::from_millis(
                    chime_shared::session::PING_TIMEOUT_MS,
                ))
                .keep_alive_while_idle(true),
            Err(e) => {
                warn!(endpoint, error = %e, "bad coordinator endpoint");
                return Ended::Broken;
            }
        };
        let channel = match channel.connect().await {
            Ok(c) => c,
            Err(e) => {
                // A refused handshake is a configuration error (wrong CA, missing
                // client certificate) an operator must see; a coordinator that is
                // down is routine while another takes over.
                let chain = error_chain(&e);
                if chain.contains("certificate") || chain.contains("tls") || chain.contains("TLS") {
                    warn!(endpoint, error = %chain, "TLS handshake with the coordinator failed");
                } else {
                    debug!(endpoint, error = %chain, "cannot reach the coordinator");
                }
                return Ended::Broken;
            }
        };
        let mut client = pb::worker_gateway_client::WorkerGatewayClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(4096);
        let running: Vec<pb::RunRef> = self.running().keys().map(run_ref).collect();
        let mut handlers: Vec<String> = self.handlers.keys().cloned().collect();
        handlers.sort();
        let _ = tx
            .send(msg(In::Register(pb::Register {
                worker_id: self.worker_id.clone(),
                group: self.opts.group.clone(),
                handlers,
                capacity: self.opts.capacity,
                labels: self.opts.labels.clone().into_iter().collect(),
                running,
            })))
            .await;
        let mut call = tonic::Request::new(ReceiverStream::new(rx));
        match Bearer::new(self.opts.token.as_deref()) {
            Ok(b) => b.apply(call.metadata_mut()),
            Err(e) => warn!(error = %e, "worker token not usable; connecting without it"),
        }
        // A follower may hold the answer while a leader is being elected (up to a
        // few seconds); a worker told to stop with nothing running need not wait.
        let answer = tokio::select! {
            r = client.session(call) => r,
            _ = stop.cancelled(), if self.running().is_empty() => return Ended::Broken,
        };
        let mut inbound = match answer {
            Ok(r) => r.into_inner(),
            Err(e) if e.code() == tonic::Code::Unauthenticated => {
                // Retried like any refusal (the token file may be fixed), but loudly.
                tracing::error!(endpoint, error = %e.message(), "the coordinator refused this worker's token");
                return Ended::Broken;
            }
            Err(e) if e.code() == tonic::Code::InvalidArgument => {
                // This worker's registration is wrong (e.g. capacity 0): retrying
                // cannot help until its configuration is fixed, so say it loudly.
                tracing::error!(endpoint, error = %e.message(), "the coordinator refused this worker's registration");
                return Ended::Broken;
            }
            Err(e) => {
                warn!(endpoint, error = %e, "session refused");
                return Ended::Broken;
            }
        };
        let interval = match inbound.message().await {
            Ok(Some(pb::CoordinatorMessage {
                kind: Some(Out::Registered(r)),
            })) => {
                info!(endpoint, coordinator = %r.coordinator, "registered with the coordinator");
                Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(100)))
            }
            Ok(Some(pb::CoordinatorMessage {
                kind: Some(Out::NotLeader(n)),
            })) => {
                return if n.leader.is_empty() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ended::Broken
                } else if n.leader.starts_with("http") {
                    Ended::Redirect(n.leader)
                } else {
                    // The leader is named host:port; reach it the way this one was.
                    let scheme = if endpoint.starts_with("https://") {
                        "https"
                    } else {
                        "http"
                    };
                    Ended::Redirect(format!("{scheme}://{}", n.leader))
                };
            }
            other => {
                warn!(endpoint, answer = ?other.err(), "registration failed");
                return Ended::Broken;
            }
        };
        // The session clock `Assign.start_by_session_ms` counts on: it starts as
        // `Registered` is read (the coordinator's starts as it accepted us, a bit
        // earlier, so this clock runs at most that one-way delay behind).
        let session_clock = tokio::time::Instant::now();
        // Results of the last minute go again: a new leader may have adopted those
        // shards from a record older than their end (it ignores what it knows).
        let recent: Vec<pb::WorkerMessage> = {
            let mut r = self.recent();
            r.retain(|(at, _)| at.elapsed() < RESEND_WINDOW);
            r.iter().map(|(_, m)| m.clone()).collect()
        };
        for m in recent {
            if tx.send(m).await.is_err() {
                return Ended::Broken;
            }
        }
        // Results that ended while we were away.
        for m in unsent.drain(..) {
            self.remember(&m);
            if tx.send(m).await.is_err() {
                return Ended::Broken;
            }
        }
        let mut beat = tokio::time::interval(interval);
        // After a stall, one heartbeat, not a burst of the missed ones: two beats in
        // a row that leave out a shard still unread in the socket would tell the
        // coordinator the shard was lost (it takes it over after two), and then the
        // shard runs twice.
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The coordinator declares a worker dead after three missed heartbeats and
        // gives its shards to others. A worker that could not beat for that long
        // (the process was frozen, or its host starved it) must assume so: an
        // `Assign` it reads afterwards may have been sent before the verdict and
        // run elsewhere since, so it starts nothing more on this session and
        // registers again (what it runs it reports there). The worker's own gap
        // bounds the coordinator's (a beat arrives after it is sent), so this never
        // keeps a shard the coordinator has handed over.
        let stalled_after = interval * 3;
        let mut last_beat = tokio::time::Instant::now();
        let mut told_draining = false;
        loop {
            let deadline = *drain_deadline.lock().unwrap_or_else(|p| p.into_inner());
            if told_draining && self.running().is_empty() && task_rx.is_empty() {
                // Close our side and wait for the coordinator to end the stream:
                // returning at once would drop the call with the last results still
                // in its send buffer.
                drop(tx);
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                info!("drained: every shard reported");
                return Ended::Done;
            }
            tokio::select! {
                _ = beat.tick() => {
                    if last_beat.elapsed() > stalled_after {
                        return self.stalled(endpoint, last_beat.elapsed());
                    }
                    last_beat = tokio::time::Instant::now();
                    let running = self.running().keys().map(run_ref).collect();
                    if tx.send(msg(In::Heartbeat(pb::Heartbeat { running }))).await.is_err() {
                        return Ended::Broken;
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(pb::CoordinatorMessage { kind: Some(Out::Assign(a)) })) => {
                        if last_beat.elapsed() > stalled_after {
                            return self.stalled(endpoint, last_beat.elapsed());
                        }
                        if let Some(late_ms) = past_start_by(&a, session_clock) {
                            // Read too late: the coordinator may have given it to
                            // another worker already. Left unstarted and unlisted,
                            // it is taken as lost and runs elsewhere.
                            warn!(run_id = ?a.run.as_ref().map(|r| &r.run_id), shard = a.shard_index, late_ms,
                                "an assignment arrived after its start-by time (the stream was stalled); not starting it");
                            metrics::counter!(chime_shared::telemetry::ASSIGNMENTS_LATE).increment(1);
                        } else {
                            self.clone().start(a, task_tx.clone());
                        }
                    }
                    Ok(Some(pb::CoordinatorMessage { kind: Some(Out::SessionEnded(e)) })) => {
                        return self.ended(endpoint, &e, told_draining);
                    }
                    Ok(Some(pb::CoordinatorMessage { kind: Some(Out::Cancel(c)) })) => {
                        if let Some(r) = c.run.as_ref()
                            && let Some(run) = self.running().get(&key_of(r))
                        {
                            info!(run_id = %r.run_id, shard = r.shard_index, reason = %c.reason, "cancelling shard");
                            run.cancel.cancel();
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        warn!(endpoint, "coordinator session ended; reconnecting");
                        return Ended::Broken;
                    }
                },
                Some(m) = task_rx.recv() => {
                    let is_result = matches!(m.kind, Some(In::RunResult(_)));
                    self.remember(&m);
                    if let Err(e) = tx.send(m).await {
                        if is_result {
                            unsent.push(e.0);
                        }
                        return Ended::Broken;
                    }
                }
                _ = stop.cancelled(), if !told_draining => {
                    // Drain step 1 and 2: stop taking work, and tell the coordinator.
                    told_draining = true;
                    *drain_deadline.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(tokio::time::Instant::now() + Duration::from_millis(self.opts.drain_timeout_ms));
                    info!(running = self.running().len(), "draining: no new shards");
                    if tx.send(msg(In::Draining(pb::Draining {}))).await.is_err() {
                        return Ended::Broken;
                    }
                }
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                    if deadline.is_some() && !self.running().is_empty() => {
                    // Drain step 3: what still runs is given up; the coordinator hands
                    // it to another worker.
                    warn!(running = self.running().len(), "drain timeout: cancelling running shards");
                    for r in self.running().values() {
                        r.cancel.cancel();
                    }
                    *drain_deadline.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
            }
        }
    }

    /// This worker could not heartbeat for three intervals: the session is taken
    /// for dead (see `stalled_after`) and a new one is opened.
    fn stalled(&self, endpoint: &str, silent: Duration) -> Ended {
        warn!(
            endpoint,
            silent_ms = silent.as_millis() as u64,
            running = self.running().len(),
            "this worker could not heartbeat for three intervals (frozen or starved); \
             the coordinator has taken it for dead, so it starts nothing more on this \
             session and registers again"
        );
        Ended::Broken
    }

    /// The coordinator ended the session (`SessionEnded`): says why, and whether to
    /// reconnect. A drain it confirms is the end; anything else reconnects.
    fn ended(&self, endpoint: &str, e: &pb::SessionEnded, draining: bool) -> Ended {
        use pb::SessionEndReason as R;
        let reason = R::try_from(e.reason).unwrap_or(R::Unspecified);
        match reason {
            R::Drained if draining && self.running().is_empty() => {
                info!(endpoint, detail = %e.detail, "the coordinator confirmed the drain");
                Ended::Done
            }
            R::Replaced => {
                // Either this worker reconnected and the old stream is what ends
                // here, or another process uses the same id: say which to check.
                tracing::error!(endpoint, worker_id = %self.worker_id, detail = %e.detail,
                    "session replaced by a newer one with the same worker id; worker ids must be unique; reconnecting");
                Ended::Broken
            }
            R::DeclaredDead => {
                warn!(endpoint, detail = %e.detail, "the coordinator declared this worker dead; reconnecting");
                Ended::Broken
            }
            _ => {
                info!(endpoint, reason = reason.as_str_name(), detail = %e.detail, "the coordinator ended the session; reconnecting");
                Ended::Broken
            }
        }
    }

    /// Starts one assigned shard in its own task.
    fn start(self: Arc<Self>, a: pb::Assign, out: mpsc::UnboundedSender<pb::WorkerMessage>) {
        let Some(r) = a.run.clone() else { return };
        let key = key_of(&r);
        let received_ms = system_now_ms();
        let cancel = CancellationToken::new();
        {
            let mut running = self.running();
            if running.contains_key(&key) {
                return; // an assignment we already run (sent again after a reconnect)
            }
            running.insert(
                key.clone(),
                Running {
                    cancel: cancel.clone(),
                },
            );
        }
        let handler = self.handlers.get(&a.handler).cloned();
        // Every log line of the shard, the handler's own included, names the run.
        let span = tracing::info_span!("shard", run_id = %r.run_id, fire_id = %a.fire_id,
                                       job = %a.job, shard = r.shard_index, attempt = r.attempt);
        // The shard's trace span: a child of the fire's, when the coordinator
        // traces the run (it sent a sampled context).
        let mut trace_span = TraceContext::from_header(Some(&a.traceparent))
            .filter(|t| t.sampled())
            .map(|parent| {
                let mut s = Span::start(format!("shard {}", a.job), SpanKind::Consumer, &parent);
                s.attr("chime.job", a.job.as_str())
                    .attr("chime.run_id", r.run_id.as_str())
                    .attr("chime.fire_id", a.fire_id.as_str())
                    .attr("chime.handler", a.handler.as_str())
                    .attr("chime.shard.index", a.shard_index)
                    .attr("chime.shard.total", a.shard_total)
                    .attr("chime.attempt", r.attempt)
                    .attr("chime.worker_id", self.worker_id.as_str());
                s
            });
        let trace = trace_span
            .as_ref()
            .map(|s| s.context)
            .or_else(|| TraceContext::from_header(Some(&a.traceparent)));
        let shard = async move {
            let started = system_now_ms();
            let _ = out.send(msg(In::RunStarted(pb::RunStarted {
                run: Some(r.clone()),
                started_at_ms: started,
            })));
            let ctx = JobContext {
                run_id: r.run_id.clone(),
                // Moved, not copied: of the assignment only the handler name is
                // read after this.
                fire_id: a.fire_id,
                job: a.job,
                params: a.params,
                shard_params: a.shard_params,
                shard_index: a.shard_index,
                shard_total: a.shard_total,
                attempt: r.attempt,
                scheduled_at_ms: a.scheduled_at_ms,
                deadline_ms: a.deadline_ms,
                cancel: cancel.clone(),
                log: {
                    let (out, r) = (out.clone(), r.clone());
                    crate::jobs::LogSink(Arc::new(move |line| {
                        let _ = out.send(msg(In::RunLog(pb::RunLog {
                            run: Some(r.clone()),
                            line,
                            at_ms: system_now_ms(),
                        })));
                    }))
                },
                trace,
            };
            let result = match handler {
                None => Err(crate::HandlerError::new(format!(
                    "no job handler {:?} on this worker",
                    a.handler
                ))),
                Some(h) => {
                    let run = h.run(ctx);
                    tokio::pin!(run);
                    tokio::select! {
                        r = &mut run => r,
                        _ = cancel.cancelled() => {
                            // The handler sees the token too: give it a moment to stop
                            // on its own (and clean up) before it is dropped.
                            match tokio::time::timeout(CANCEL_GRACE, &mut run).await {
                                Ok(r) => r,
                                Err(_) => Err(crate::HandlerError::new("cancelled")),
                            }
                        }
                    }
                }
            };
            let (status, output, error) = match result {
                Ok(o) => (pb::RunStatus::Succeeded, o, String::new()),
                Err(_) if cancel.is_cancelled() => (
                    pb::RunStatus::Cancelled,
                    String::new(),
                    "cancelled".to_owned(),
                ),
                Err(e) => (pb::RunStatus::Failed, String::new(), e.message),
            };
            debug!(run_id = %r.run_id, shard = r.shard_index, ?status, wait_ms = started - received_ms, "shard done");
            if let Some(mut s) = trace_span.take() {
                if !error.is_empty() {
                    s.fail(error.clone());
                }
                s.attr("chime.status", status.as_str_name());
                s.end();
            }
            // The result is queued before the shard leaves `running`, under its lock:
            // a drain that sees nothing running and nothing queued has sent it, and
            // a heartbeat in between still lists the shard (the coordinator takes a
            // shard missing from two heartbeats to be lost).
            let mut running = self.running();
            let _ = out.send(msg(In::RunResult(pb::RunResult {
                run: Some(r),
                status: status as i32,
                output,
                error,
                started_at_ms: started,
                finished_at_ms: system_now_ms(),
            })));
            running.remove(&key);
        };
        tokio::spawn(shard.instrument(span));
    }
}
