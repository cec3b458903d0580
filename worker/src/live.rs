//! What a worker changes while it runs: the queue layout (resizes), visibility
//! timeout and merge window, per-handler concurrency and global rate limits, all
//! from the live config (etcd) its process watches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chime_shared::clock::system_now_ms;
use chime_shared::config::LiveConfig;
use chime_shared::config::watcher::ConfigHandle;
use chime_shared::ratelimit::{Policy, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The live-config side of a worker: where settings come from and how rate limits
/// are enforced.
#[derive(Debug, Clone)]
pub struct Live {
    /// The process's config watcher.
    pub config: ConfigHandle,
    /// The queue family this worker consumes.
    pub family: String,
    /// The shared rate limiter; without one, rate settings are ignored.
    pub limiter: Option<Arc<dyn RateLimiter>>,
}

/// A per-handler concurrency cap that can change while deliveries run.
#[derive(Debug)]
pub(crate) struct Gate {
    /// `None`: unlimited.
    sem: Mutex<Option<(Arc<Semaphore>, usize)>>,
    /// What the worker was built with; a deleted setting returns to it.
    default: Option<usize>,
}

impl Gate {
    pub(crate) fn new(limit: Option<usize>) -> Self {
        Self {
            sem: Mutex::new(limit.map(|n| (Arc::new(Semaphore::new(n)), n))),
            default: limit,
        }
    }

    /// Whether no cap is in force.
    pub(crate) fn unlimited(&self) -> bool {
        lock(&self.sem).is_none()
    }

    /// Waits for a slot (none needed when unlimited).
    pub(crate) async fn enter(&self) -> Option<OwnedSemaphorePermit> {
        let sem = lock(&self.sem).as_ref().map(|(s, _)| s.clone());
        match sem {
            Some(s) => s.acquire_owned().await.ok(),
            None => None,
        }
    }

    /// Changes the cap in place: more permits now, or fewer as running deliveries
    /// finish. Switching from unlimited starts a fresh count (deliveries already
    /// running are not counted against it).
    pub(crate) fn resize(&self, limit: Option<usize>) {
        let limit = limit.or(self.default);
        let mut g = lock(&self.sem);
        match (g.as_mut(), limit) {
            (Some((sem, size)), Some(n)) if *size != n => {
                if n > *size {
                    sem.add_permits(n - *size);
                } else {
                    let want = *size - n;
                    let gone = sem.forget_permits(want);
                    if gone < want {
                        let (sem, rest) = (sem.clone(), (want - gone) as u32);
                        tokio::spawn(async move {
                            if let Ok(p) = sem.acquire_many_owned(rest).await {
                                p.forget();
                            }
                        });
                    }
                }
                *size = n;
            }
            (Some(_), Some(_)) => {}
            (None, Some(n)) => *g = Some((Arc::new(Semaphore::new(n)), n)),
            (_, None) => *g = None,
        }
    }
}

/// Values the consumer reads on every pop, changed live.
#[derive(Debug)]
pub(crate) struct Knobs {
    pub(crate) visibility_ms: AtomicU64,
    pub(crate) merge_window_ms: AtomicU64,
    default_visibility_ms: u64,
    default_merge_window_ms: u64,
}

impl Knobs {
    pub(crate) fn new(visibility_ms: u64, merge_window_ms: u64) -> Self {
        Self {
            visibility_ms: AtomicU64::new(visibility_ms),
            merge_window_ms: AtomicU64::new(merge_window_ms),
            default_visibility_ms: visibility_ms,
            default_merge_window_ms: merge_window_ms,
        }
    }

    pub(crate) fn visibility(&self) -> u64 {
        self.visibility_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn merge_window(&self) -> u64 {
        self.merge_window_ms.load(Ordering::Relaxed)
    }
}

/// Applies one config version to the consumer's knobs and gates; answers the
/// queue count to apply, if the family has one.
pub(crate) fn apply_knobs(
    config: &LiveConfig,
    family: &str,
    knobs: &Knobs,
    gates: &mut dyn Iterator<Item = (&String, &Gate)>,
) -> Option<(u32, i64)> {
    let f = config.family(family);
    knobs.visibility_ms.store(
        f.visibility_ms.unwrap_or(knobs.default_visibility_ms),
        Ordering::Relaxed,
    );
    knobs.merge_window_ms.store(
        f.merge_window_ms.unwrap_or(knobs.default_merge_window_ms),
        Ordering::Relaxed,
    );
    for (name, gate) in gates {
        gate.resize(config.handler(name).concurrency.map(|c| c as usize));
    }
    f.count
}

/// Logs (with a machine-readable time) that this worker uses `layout` now.
pub(crate) fn log_layout(worker_id: &str, layout: &chime_shared::queue::Layout) {
    info!(
        worker_id,
        epoch = layout.epoch,
        count = layout.count,
        revision = layout.revision,
        draining = layout.draining.len(),
        applied_at_ms = system_now_ms(),
        "queue layout applied"
    );
}

/// Whether a rate policy applies to `handler` now (so its deliveries go through
/// [`throttle`]).
pub(crate) fn rate_limited(live: &Live, handler: &str) -> bool {
    live.limiter.is_some() && Policy::of(&live.config.current(), handler).is_some()
}

/// Waits until `want` items of `handler` may run under its rate policy (if any).
/// Requests go one at a time per handler per worker (`lock`), so waiting
/// deliveries do not hammer the limiter. A limiter that fails lets items through
/// after a short pause: a broken Redis must not stop delivery altogether.
pub(crate) async fn throttle(
    live: &Live,
    lock: &tokio::sync::Mutex<()>,
    handler: &str,
    want: u64,
    cancel: &CancellationToken,
) {
    let Some(limiter) = &live.limiter else { return };
    let Some(policy) = Policy::of(&live.config.current(), handler) else {
        return;
    };
    let _turn = lock.lock().await;
    let mut left = want;
    let mut policy = policy;
    while left > 0 {
        match limiter.acquire(&policy, handler, left).await {
            Ok(g) => {
                left = left.saturating_sub(g.granted);
                if left == 0 {
                    return;
                }
                let pause = Duration::from_millis(g.wait_ms.clamp(1, 1_000));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {},
                    _ = cancel.cancelled() => return,
                }
            }
            Err(e) => {
                warn!(handler, error = %e, "rate limiter unavailable; letting the delivery through");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        }
        // The limit may have changed or been removed while we waited.
        match Policy::of(&live.config.current(), handler) {
            Some(p) => policy = p,
            None => return,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
