//! The fake push provider the demos push to, standing in for a third-party push SDK
//! (APNs, FCM, an SMS gateway): a local HTTP server with a configurable latency and
//! failure rate that records every push it accepted, and the client the demo
//! workers use to call it.
//!
//! `POST /push` takes `{"messages": [...], "users": [...]}`: one request delivers
//! every listed message to every listed user (a multicast of one campaign to 100
//! users, or one merged reminder naming two coupons to one user). The server waits
//! `latency_ms`, then answers 503 for a random `failure_rate` of requests (recording
//! nothing: the sender must retry) and 200 for the rest (recording the request).
//! Results are computed only from what was answered 200, so a retried request counts
//! once if and only if its retry is the only accepted copy — which is exactly "the
//! user got it once".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use chime_shared::clock::system_now_ms;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// One push request: every message to every user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PushRequest {
    /// Message ids (a campaign, a coupon reminder, a notification).
    pub(crate) messages: Vec<String>,
    /// Recipients.
    pub(crate) users: Vec<u64>,
}

/// A request the provider answered 200, with its arrival time.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// When it arrived, Unix ms (the instant the worker pushed).
    pub(crate) at_ms: i64,
    /// Its messages.
    pub(crate) messages: Vec<String>,
    /// Its users.
    pub(crate) users: Vec<u64>,
}

/// What the provider saw.
#[derive(Debug, Default)]
pub(crate) struct Log {
    /// Accepted requests, in arrival order of their answers.
    pub(crate) accepted: Vec<Accepted>,
    /// Arrival time of every request, accepted or not (what a QPS budget counts).
    pub(crate) arrivals: Vec<i64>,
}

#[derive(Debug)]
struct Shared {
    latency: Duration,
    failure_rate: f64,
    log: Mutex<Log>,
    requests: AtomicU64,
    failed: AtomicU64,
    users_accepted: AtomicU64,
}

/// The running fake provider.
#[derive(Debug)]
pub(crate) struct Provider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    /// Starts it on an ephemeral loopback port.
    pub(crate) async fn start(latency_ms: u64, failure_rate: f64) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake provider")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            latency: Duration::from_millis(latency_ms),
            failure_rate: failure_rate.clamp(0.0, 1.0),
            log: Mutex::new(Log::default()),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            users_accepted: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .route("/push", post(push))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await;
        });
        Ok(Self {
            addr,
            shared,
            stop,
            task,
        })
    }

    /// The URL workers push to.
    pub(crate) fn url(&self) -> String {
        format!("http://{}/push", self.addr)
    }

    /// Users in accepted requests so far (a cheap progress counter).
    pub(crate) fn users_accepted(&self) -> u64 {
        self.shared.users_accepted.load(Ordering::Relaxed)
    }

    /// Requests received and requests answered 503 so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.shared.requests.load(Ordering::Relaxed),
            self.shared.failed.load(Ordering::Relaxed),
        )
    }

    /// Stops serving and hands over everything recorded.
    pub(crate) async fn finish(self) -> Log {
        self.stop.cancel();
        let _ = self.task.await;
        std::mem::take(&mut *lock(&self.shared.log))
    }

    /// The JSON block the demos report about the provider.
    pub(crate) fn describe(&self) -> serde_json::Value {
        let (requests, failed) = self.counts();
        serde_json::json!({
            "latency_ms": self.shared.latency.as_millis() as u64,
            "failure_rate": self.shared.failure_rate,
            "requests": requests,
            "answered_503": failed,
        })
    }
}

async fn push(State(s): State<Arc<Shared>>, Json(req): Json<PushRequest>) -> StatusCode {
    let at_ms = system_now_ms();
    s.requests.fetch_add(1, Ordering::Relaxed);
    lock(&s.log).arrivals.push(at_ms);
    tokio::time::sleep(s.latency).await;
    if s.failure_rate > 0.0 && fastrand::f64() < s.failure_rate {
        s.failed.fetch_add(1, Ordering::Relaxed);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    s.users_accepted
        .fetch_add(req.users.len() as u64, Ordering::Relaxed);
    lock(&s.log).accepted.push(Accepted {
        at_ms,
        messages: req.messages,
        users: req.users,
    });
    StatusCode::OK
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The workers' side: one HTTP client (connection pool) per worker process, and a
/// bound on the requests it has in flight at once.
#[derive(Debug, Clone)]
pub(crate) struct Pusher {
    client: reqwest::Client,
    url: String,
    in_flight: Arc<Semaphore>,
}

impl Pusher {
    /// A client of `url` with at most `concurrency` requests in flight.
    pub(crate) fn new(url: &str, concurrency: usize) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(concurrency.max(1))
            .build()?;
        Ok(Self {
            client,
            url: url.to_owned(),
            in_flight: Arc::new(Semaphore::new(concurrency.max(1))),
        })
    }

    /// One attempt; an error says why it failed.
    pub(crate) async fn push(&self, req: &PushRequest) -> Result<(), String> {
        let _slot = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| "client closed".to_owned())?;
        let resp = self
            .client
            .post(&self.url)
            .json(req)
            .send()
            .await
            .map_err(|e| format!("provider unreachable: {e}"))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("provider answered {}", resp.status()))
        }
    }

    /// Up to `attempts` attempts with a short pause between them: what a sender does
    /// for one batch of a multi-batch task, so one 503 does not make the whole task
    /// (and the batches already accepted) go again.
    pub(crate) async fn push_retrying(
        &self,
        req: &PushRequest,
        attempts: u32,
    ) -> Result<(), String> {
        let mut last = String::new();
        for i in 0..attempts.max(1) {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(0..100))).await;
            }
            match self.push(req).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// The `p` quantile of sorted values.
pub(crate) fn quantile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}
