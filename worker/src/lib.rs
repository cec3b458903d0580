//! `chime-worker`: the SDK a developer links to run chime handlers.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<dyn chime_shared::queue::DelayStore>) -> Result<(), chime_worker::WorkerError> {
//! use chime_worker::{ItemContext, HandlerError, Worker};
//! let worker = Worker::builder()
//!     .delay_store(store)
//!     .worker_id("pod-a")
//!     .handler("coupon.remind", |ctx: ItemContext| async move {
//!         for item in ctx.items() {
//!             println!("remind {} ({} bytes)", item.id, item.payload.len());
//!         }
//!         Ok::<(), HandlerError>(())
//!     })
//!     .handler_concurrency("coupon.remind", 64)
//!     .build()?;
//! worker.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! What it owns: the handler registries ([`handler`] for delayed items, [`jobs`] for
//! job shards), the queue consumer ([`consumer`]: pollers that claim queues and pop
//! due items, a bounded number of items in the worker's hands — backpressure: memory
//! stays flat whatever the backlog —, per-handler concurrency caps, visibility
//! extension while handlers run, batched settling), the coordinator session
//! ([`session`]: register, heartbeat, run assigned shards, follow the leader), and
//! the drain on shutdown.
//!
//! Architecture invariant: the worker never binds a port, reads a config file or
//! installs a logger; the binary does. It reaches Redis only through
//! `chime_shared::queue::DelayStore`.

pub mod consumer;
pub mod delivery;
pub mod error;
pub mod handler;
pub mod jobs;
pub mod live;
pub mod producer;
pub mod session;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use chime_shared::limits;
use chime_shared::queue::DelayStore;

pub use consumer::{ConsumerOptions, DrainReport};
pub use delivery::client::SubscriberOptions;
pub use delivery::{Hub, HubOptions};
pub use error::WorkerError;
pub use handler::{HandlerError, ItemContext, ItemHandler};
pub use jobs::{JobContext, JobHandler};
pub use live::Live;
pub use session::SessionOptions;

/// A handler and its concurrency cap.
#[derive(Clone)]
pub(crate) struct Registered {
    pub(crate) handler: Arc<dyn ItemHandler>,
    pub(crate) concurrency: Option<usize>,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Worker`].
#[derive(Debug)]
pub struct WorkerBuilder {
    store: Option<Arc<dyn DelayStore>>,
    worker_id: String,
    handlers: HashMap<String, Registered>,
    job_handlers: HashMap<String, Arc<dyn JobHandler>>,
    session: Option<SessionOptions>,
    options: ConsumerOptions,
    live: Option<Live>,
    hub: Option<Arc<Hub>>,
    subscriber: Option<SubscriberOptions>,
    errors: Vec<WorkerError>,
}

impl WorkerBuilder {
    /// Consumes delayed items from `store` (needed for item handlers).
    pub fn delay_store(mut self, store: Arc<dyn DelayStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Hands deliveries of handlers this worker does not run itself to the
    /// subscribers of `hub` (apps in other processes, over `chime.v1.Deliveries`).
    /// Needs a delay store.
    pub fn deliveries(mut self, hub: Arc<Hub>) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Runs the item handlers on items a chime worker delivers over
    /// `chime.v1.Deliveries` (a sidecar or a pool), instead of consuming a delay
    /// store in this process.
    pub fn subscribe(mut self, opts: SubscriberOptions) -> Self {
        self.subscriber = Some(opts);
        self
    }

    /// Connects to the coordinator to run job shards (needed for job handlers).
    pub fn coordinator(mut self, session: SessionOptions) -> Self {
        self.session = Some(session);
        self
    }

    /// Registers `handler` for job shards whose handler name is `name`.
    pub fn job_handler(self, name: &str, handler: impl JobHandler) -> Self {
        self.shared_job_handler(name, Arc::new(handler))
    }

    /// Registers an already shared job handler for `name`.
    pub fn shared_job_handler(mut self, name: &str, handler: Arc<dyn JobHandler>) -> Self {
        if let Err(e) = limits::check_handler("job handler", name) {
            self.errors.push(WorkerError::Config(e.to_string()));
        }
        self.job_handlers.insert(name.to_owned(), handler);
        self
    }

    /// Follows live settings (queue count, visibility, merge window, concurrency,
    /// rate limits) of queue family `live.family`.
    pub fn live(mut self, live: Live) -> Self {
        self.live = Some(live);
        self
    }

    /// Sets the worker's stable id (a pod name, not an IP). Defaults to the host name.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// Registers `handler` for items whose handler name is `name`.
    pub fn handler(self, name: &str, handler: impl ItemHandler) -> Self {
        self.shared_handler(name, Arc::new(handler))
    }

    /// Registers an already shared handler for `name`.
    pub fn shared_handler(mut self, name: &str, handler: Arc<dyn ItemHandler>) -> Self {
        if let Err(e) = limits::check_qualified("handler", name) {
            self.errors.push(WorkerError::Config(e.to_string()));
        }
        self.handlers.insert(
            name.to_owned(),
            Registered {
                handler,
                concurrency: None,
            },
        );
        self
    }

    /// Caps how many deliveries of handler `name` run at once on this worker.
    pub fn handler_concurrency(mut self, name: &str, max: usize) -> Self {
        match self.handlers.get_mut(name) {
            Some(r) if max > 0 => r.concurrency = Some(max),
            Some(_) => self.errors.push(WorkerError::Config(format!(
                "invalid handler_concurrency for {name:?}: must be at least 1"
            ))),
            None => self.errors.push(WorkerError::Config(format!(
                "handler_concurrency for {name:?}: no such handler registered"
            ))),
        }
        self
    }

    /// Sets the consumer options (batch, in-flight bound, timeouts).
    pub fn options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    /// Checks the configuration.
    pub fn build(mut self) -> Result<Worker, WorkerError> {
        if let Some(e) = self.errors.pop() {
            return Err(e);
        }
        if self.handlers.is_empty() && self.job_handlers.is_empty() && self.hub.is_none() {
            return Err(WorkerError::Config("no handler registered".into()));
        }
        match (&self.store, &self.subscriber) {
            (Some(_), Some(_)) => {
                return Err(WorkerError::Config(
                    "item handlers run on a delay store or on a subscription, not both".into(),
                ));
            }
            (None, None) if !self.handlers.is_empty() => {
                return Err(WorkerError::Config(
                    "item handlers need a delay store or a subscription".into(),
                ));
            }
            (None, _) if self.hub.is_some() => {
                return Err(WorkerError::Config(
                    "serving deliveries needs a delay store".into(),
                ));
            }
            (None, Some(_)) if self.handlers.is_empty() => {
                return Err(WorkerError::Config(
                    "a subscription needs at least one item handler".into(),
                ));
            }
            _ => {}
        }
        if let Some(s) = &self.subscriber {
            if s.endpoints.is_empty() {
                return Err(WorkerError::Config(
                    "invalid subscribe.endpoints: no endpoint".into(),
                ));
            }
            if !(1..=delivery::MAX_CREDIT).contains(&s.credit) {
                return Err(WorkerError::Config(format!(
                    "invalid subscribe.credit: {} is outside 1..={}",
                    s.credit,
                    delivery::MAX_CREDIT
                )));
            }
        }
        if !self.job_handlers.is_empty() {
            match &self.session {
                None => {
                    return Err(WorkerError::Config(
                        "job handlers need a coordinator".into(),
                    ));
                }
                Some(s) if s.endpoints.is_empty() => {
                    return Err(WorkerError::Config(
                        "invalid coordinator: no endpoint".into(),
                    ));
                }
                Some(s) => limits::check_qualified("group", &s.group)
                    .map_err(|e| WorkerError::Config(e.to_string()))?,
            }
        }
        limits::check_text("worker_id", &self.worker_id, 253)
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        self.options.validate()?;
        Ok(Worker {
            store: self.store,
            worker_id: self.worker_id,
            handlers: self.handlers,
            job_handlers: self.job_handlers,
            session: self.session,
            options: self.options,
            live: self.live,
            hub: self.hub,
            subscriber: self.subscriber,
        })
    }
}

/// A configured worker; [`Worker::run`] consumes until shutdown and drains.
#[derive(Debug)]
pub struct Worker {
    store: Option<Arc<dyn DelayStore>>,
    worker_id: String,
    handlers: HashMap<String, Registered>,
    job_handlers: HashMap<String, Arc<dyn JobHandler>>,
    session: Option<SessionOptions>,
    options: ConsumerOptions,
    live: Option<Live>,
    hub: Option<Arc<Hub>>,
    subscriber: Option<SubscriberOptions>,
}

impl Worker {
    /// Starts building a worker.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder {
            store: None,
            worker_id: default_worker_id(),
            handlers: HashMap::new(),
            job_handlers: HashMap::new(),
            session: None,
            options: ConsumerOptions::default(),
            live: None,
            hub: None,
            subscriber: None,
            errors: Vec::new(),
        }
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.worker_id
    }

    /// Works until `shutdown` completes, then drains, in this order:
    /// 1. mark draining: stop claiming queues, tell the coordinator (no new shards)
    ///    and the subscribers of the hub (`Closing`), or tell the chime worker this
    ///    process subscribes to (`Drain`);
    /// 2. finish in-flight items and shards within the drain timeout;
    /// 3. hand back what is still running (items due again now; shards cancelled,
    ///    which the coordinator gives to another worker);
    /// 4. record every outcome, release leases, end the subscribers' streams, stop.
    ///
    /// The consumer, the subscription and the session each follow these steps on
    /// the same signal.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<DrainReport, WorkerError> {
        let stop = tokio_util::sync::CancellationToken::new();
        let drain_timeout_ms = self.options.drain_timeout_ms;
        let (local, remote) = match self.subscriber {
            Some(opts) => (HashMap::new(), Some((self.handlers, opts))),
            None => (self.handlers, None),
        };
        let consumer = self.store.map(|store| {
            let c = consumer::Consumer::new(
                store,
                self.worker_id.clone(),
                local,
                self.options,
                self.live,
                self.hub.clone(),
            );
            let stop = stop.clone();
            tokio::spawn(async move { c.run(stop.cancelled_owned()).await })
        });
        let subscription = remote.map(|(handlers, opts)| {
            let s = delivery::client::Subscription::new(handlers, opts);
            tokio::spawn(s.run(stop.clone()))
        });
        let session = self.session.map(|opts| {
            let s = session::Session::new(self.worker_id.clone(), self.job_handlers, opts);
            tokio::spawn(s.run(stop.clone()))
        });
        shutdown.await;
        // 1. Subscribers hear it first: they keep settling what they hold.
        if let Some(hub) = &self.hub {
            hub.close(chime_shared::clock::system_now_ms() + drain_timeout_ms as i64);
        }
        stop.cancel();
        if let Some(s) = session {
            let _ = s.await;
        }
        let mut report = match consumer {
            Some(c) => c
                .await
                .map_err(|e| WorkerError::Config(format!("consumer task failed: {e}")))??,
            None => DrainReport::default(),
        };
        // 4. Nothing is held any more: end the subscribers' streams.
        if let Some(hub) = &self.hub {
            hub.shutdown();
        }
        if let Some(s) = subscription {
            let r = s
                .await
                .map_err(|e| WorkerError::Config(format!("subscription task failed: {e}")))?;
            report.handled += r.handled;
            report.handed_back += r.handed_back;
        }
        Ok(report)
    }
}

/// `HOSTNAME` (a pod name on Kubernetes), else the kernel's host name, else "worker".
pub fn default_worker_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}
