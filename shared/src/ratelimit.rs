//! Global rate limits: a smooth token bucket shared by every worker, per budget.
//!
//! A *budget* is a rate (items/s) shared by one or more handlers. A handler with its
//! own `rate_per_s` and no budget is a budget of one. While several handlers of a
//! budget are active (asked within the last second), each refills at an equal share
//! of the rate, or at its own cap when that is lower; what one cannot use goes to a
//! spare pool the others draw from, so a small job is never starved by a big one and
//! no capacity is wasted. [`RedisLimiter`] keeps the state in Redis (one hash-tagged
//! pair of keys per budget, so budgets spread over a cluster); [`MemoryLimiter`] is
//! the same algorithm in memory for `chime dev` and tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};

use async_trait::async_trait;

use crate::clock::Clock;
use crate::error::Result;
use crate::redis_conn::RedisConn;

/// Bucket capacity, as milliseconds of the rate: how far above its rate a handler
/// may burst after idling.
pub const BURST_MS: u64 = 100;
/// A handler counts as competing for its budget this long after its last request.
pub const ACTIVE_MS: u64 = 1_000;

/// Which budget a handler draws from, and at what rates.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Budget name (`b:<budget>` or `h:<handler>`).
    pub budget: String,
    /// Rate of the whole budget, items/s.
    pub rate_per_s: f64,
    /// The handler's own cap inside a shared budget, items/s (0: none).
    pub cap_per_s: f64,
}

impl Policy {
    /// The policy of `handler` under `config`, if it is limited at all.
    pub fn of(config: &crate::config::LiveConfig, handler: &str) -> Option<Self> {
        let h = config.handler(handler);
        let own = h.rate_per_s;
        let shared = h
            .budget
            .as_ref()
            .and_then(|b| Some((b.clone(), config.budgets.get(b)?.rate_per_s?)));
        match (shared, own) {
            (Some((b, rate)), own) => Some(Self {
                budget: format!("b:{b}"),
                rate_per_s: rate,
                cap_per_s: own.unwrap_or(0.0),
            }),
            (None, Some(rate)) => Some(Self {
                budget: format!("h:{handler}"),
                rate_per_s: rate,
                cap_per_s: 0.0,
            }),
            (None, None) => None,
        }
    }
}

/// What one request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Items granted now (up to what was asked).
    pub granted: u64,
    /// When the rest is likely to be available, ms.
    pub wait_ms: u64,
}

/// A shared rate limiter.
#[async_trait]
pub trait RateLimiter: Send + Sync + std::fmt::Debug {
    /// Asks for `want` items of `handler` under `policy`.
    async fn acquire(&self, policy: &Policy, handler: &str, want: u64) -> Result<Grant>;
}

static RATE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("queue/lua/ratelimit.lua")));

/// The limiter on Redis.
#[derive(Debug, Clone)]
pub struct RedisLimiter {
    conn: RedisConn,
    prefix: String,
}

impl RedisLimiter {
    /// A limiter keeping its state under `prefix`.
    pub fn new(conn: RedisConn, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
        }
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    async fn acquire(&self, policy: &Policy, handler: &str, want: u64) -> Result<Grant> {
        let tag = format!("{{{}:rl:{}}}", self.prefix, policy.budget);
        let mut inv = RATE.prepare_invoke();
        inv.key(format!("{tag}:state"))
            .key(format!("{tag}:active"))
            .arg(handler)
            .arg(want)
            .arg(policy.rate_per_s)
            .arg(policy.cap_per_s)
            .arg(BURST_MS)
            .arg(ACTIVE_MS);
        let mut conn = self.conn.clone();
        let (granted, wait_ms): (i64, i64) = inv.invoke_async(&mut conn).await?;
        Ok(Grant {
            granted: granted.max(0) as u64,
            wait_ms: wait_ms.max(0) as u64,
        })
    }
}

#[derive(Debug, Default)]
struct Bucket {
    last_ms: f64,
    tokens: f64,
    cap: f64,
}

#[derive(Debug, Default)]
struct BudgetState {
    active: HashMap<String, f64>,
    buckets: HashMap<String, Bucket>,
    spare: f64,
}

/// The limiter in memory (one process).
#[derive(Debug)]
pub struct MemoryLimiter {
    clock: std::sync::Arc<dyn Clock>,
    budgets: Mutex<BTreeMap<String, BudgetState>>,
}

impl MemoryLimiter {
    /// A limiter reading time from `clock`.
    pub fn new(clock: std::sync::Arc<dyn Clock>) -> Self {
        Self {
            clock,
            budgets: Mutex::default(),
        }
    }
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    async fn acquire(&self, policy: &Policy, handler: &str, want: u64) -> Result<Grant> {
        // The same steps as ratelimit.lua.
        let now = self.clock.now_ms() as f64;
        let burst = BURST_MS as f64 / 1000.0;
        let mut all = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let st = all.entry(policy.budget.clone()).or_default();
        st.active.insert(handler.to_owned(), now);
        st.active.retain(|_, seen| *seen > now - ACTIVE_MS as f64);
        st.buckets
            .entry(handler.to_owned())
            .or_insert_with(|| Bucket {
                last_ms: now,
                ..Bucket::default()
            })
            .cap = policy.cap_per_s;
        let share = policy.rate_per_s / st.active.len() as f64;
        let mut mine_rate = share;
        let members: Vec<String> = st.active.keys().cloned().collect();
        for h in members {
            let b = st.buckets.entry(h.clone()).or_insert_with(|| Bucket {
                last_ms: now,
                ..Bucket::default()
            });
            let r = if b.cap > 0.0 && b.cap < share {
                b.cap
            } else {
                share
            };
            let dt = (now - b.last_ms).max(0.0) / 1000.0;
            let capacity = (r * burst).max(1.0);
            b.tokens += r * dt;
            let mut surplus = (share - r) * dt;
            if b.tokens > capacity {
                surplus += b.tokens - capacity;
                b.tokens = capacity;
            }
            b.last_ms = now;
            st.spare += surplus;
            if h == handler {
                mine_rate = r;
            }
        }
        st.spare = st.spare.min((policy.rate_per_s * burst).max(1.0));
        let cap = policy.cap_per_s;
        let spare_ok = cap == 0.0 || cap >= share;
        let b = st.buckets.get_mut(handler).map(|b| {
            let granted = (want as f64).min(b.tokens.floor());
            b.tokens -= granted;
            (b, granted)
        });
        let Some((b, mut granted)) = b else {
            return Ok(Grant {
                granted: 0,
                wait_ms: 1,
            });
        };
        let tokens = b.tokens;
        if granted < want as f64 && spare_ok {
            let extra = (want as f64 - granted).min(st.spare.floor());
            granted += extra;
            st.spare -= extra;
        }
        let wait = if granted < want as f64 {
            ((want as f64 - granted - tokens) / mine_rate * 1000.0)
                .ceil()
                .max(0.0)
        } else {
            0.0
        };
        Ok(Grant {
            granted: granted as u64,
            wait_ms: wait as u64,
        })
    }
}
