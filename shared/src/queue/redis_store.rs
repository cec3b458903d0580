//! The production delay store on Redis (standalone or Cluster).
//!
//! Each queue `i` of family `f` under prefix `p` is eleven keys sharing the hash tag
//! `{p:f:i}`, so each queue is one Cluster slot and every script touches one slot
//! (see `lua/common.lua` for what each key holds). Every state change is one Lua
//! script per queue per batch, using Redis `TIME`; nothing is decided with a client's
//! clock and no item ever exists only in a client's memory. The family's claim counter
//! `p:f:claims` is the only key outside the queues; it is touched once per queue
//! switch, never per item.

use std::sync::{Arc, LazyLock};

use ::redis::{Script, Value};
use async_trait::async_trait;
use futures_util::future::try_join_all;

use super::codec::{self, Body};
use super::{
    CancelOutcome, Claimed, DelayStore, Delivery, DeliveryToken, EnqueueOutcome, ItemRef,
    ItemState, ItemView, Lease, NewItem, Outcome, PopOptions, Popped, QueueLayout, QueueStats,
    RescheduleOutcome, Settlement, new_lease_token, queue_for, validate_batch,
};
use crate::error::{Error, Result};
use crate::redis_conn::RedisConn;

/// Most items per script call: keeps each script short (Redis is single-threaded, a
/// long script stalls every client) and far below Lua's unpack limit.
const SCRIPT_BATCH: usize = 500;
/// Most expired in-flight items one pop reaps.
const REAP_LIMIT: u32 = 500;

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(concat!(include_str!("lua/common.lua"), include_str!($file))))
    };
}

static ENQUEUE: LazyLock<Script> = script!("lua/enqueue.lua");
static POP: LazyLock<Script> = script!("lua/pop.lua");
static ACK: LazyLock<Script> = script!("lua/ack.lua");
static FAIL: LazyLock<Script> = script!("lua/fail.lua");
static EXTEND: LazyLock<Script> = script!("lua/extend.lua");
static CANCEL: LazyLock<Script> = script!("lua/cancel.lua");
static RESCHEDULE: LazyLock<Script> = script!("lua/reschedule.lua");
static GET: LazyLock<Script> = script!("lua/get.lua");
static REQUEUE: LazyLock<Script> = script!("lua/requeue.lua");
static STATS: LazyLock<Script> = script!("lua/stats.lua");
static DEAD: LazyLock<Script> = script!("lua/dead.lua");
static RELEASE: LazyLock<Script> = script!("lua/release.lua");

/// The eleven keys of one queue, in the order the scripts expect them.
#[derive(Debug, Clone)]
struct QueueKeys([String; 11]);

impl QueueKeys {
    fn new(layout: &QueueLayout, queue: u32) -> Self {
        let tag = format!("{{{}:{}:{}}}", layout.prefix, layout.family, queue);
        QueueKeys(
            [
                "due", "run", "items", "att", "dead", "mki", "lease", "cx", "err", "cls", "seq",
            ]
            .map(|k| format!("{tag}:{k}")),
        )
    }
    fn lease(&self) -> &str {
        &self.0[6]
    }
}

/// Delay store on Redis.
#[derive(Debug, Clone)]
pub struct RedisStore {
    conn: RedisConn,
    layout: QueueLayout,
    keys: Arc<Vec<QueueKeys>>,
    claims_key: String,
}

impl RedisStore {
    /// A store over an established connection.
    pub fn new(conn: RedisConn, layout: QueueLayout) -> Self {
        let keys = (0..layout.count)
            .map(|q| QueueKeys::new(&layout, q))
            .collect();
        Self {
            claims_key: format!("{}:{}:claims", layout.prefix, layout.family),
            conn,
            layout,
            keys: Arc::new(keys),
        }
    }

    /// The layout this store was built with.
    pub fn layout(&self) -> &QueueLayout {
        &self.layout
    }

    /// The connection, for callers that need plain commands next to the store.
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    fn keys(&self, queue: u32) -> Result<&QueueKeys> {
        self.keys.get(queue as usize).ok_or_else(|| {
            Error::invalid(
                "queue",
                format!("{queue} is outside 0..{}", self.layout.count),
            )
        })
    }

    fn queue_of(&self, item: &ItemRef) -> u32 {
        queue_for(&item.key, self.layout.count)
    }

    async fn run(&self, script: &Script, queue: u32, args: Vec<Vec<u8>>) -> Result<Value> {
        let keys = self.keys(queue)?;
        let mut inv = script.prepare_invoke();
        for k in &keys.0 {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        Ok(inv.invoke_async(&mut conn).await?)
    }

    async fn enqueue_chunk(&self, queue: u32, items: &[&NewItem]) -> Result<Vec<bool>> {
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(1 + items.len() * 4);
        args.push(items.len().to_string().into_bytes());
        for it in items {
            let key = it.routing_key();
            args.push(it.id.clone().into_bytes());
            args.push(it.due_at_ms.to_string().into_bytes());
            args.push(codec::merge_class(&it.handler, key, it.merge_key.as_deref()).into_bytes());
            args.push(codec::encode_body(&Body {
                max_attempts: it.max_attempts,
                due_at_ms: it.due_at_ms,
                key: key.to_owned(),
                handler: it.handler.clone(),
                merge_key: it.merge_key.clone(),
                payload: it.payload.clone(),
            }));
        }
        let v = self.run(&ENQUEUE, queue, args).await?;
        let flags = array(v, "enqueue")?;
        flags.iter().map(|f| Ok(int(f, "enqueue")? == 1)).collect()
    }

    /// Builds a view from GET's answer: body, attempts, pending score, in-flight
    /// member, deadline, dead since, last error, cancelled flag.
    fn parse_view(&self, queue: u32, id: String, parts: &[Value]) -> Result<Option<ItemView>> {
        let Some(body) = bytes(&parts[0]) else {
            return Ok(None);
        };
        let body = codec::decode_body(body)?;
        let mut attempts = codec::decode_attempts(text(&parts[1]).as_deref())?;
        let state = if let Some(s) = opt_int(&parts[2]) {
            ItemState::Pending { due_score_ms: s }
        } else if let (Some(member), Some(d)) = (text(&parts[3]), opt_int(&parts[4])) {
            attempts = codec::member_attempt(&member)?;
            ItemState::InFlight {
                deadline_ms: d,
                cancelled: opt_int(&parts[7]) == Some(1),
            }
        } else if let Some(d) = opt_int(&parts[5]) {
            ItemState::Dead { since_ms: d }
        } else {
            return Ok(None);
        };
        Ok(Some(ItemView {
            item: codec::item_from_body(id, body, attempts),
            queue,
            state,
            last_error: text(&parts[6]),
        }))
    }
}

#[async_trait]
impl DelayStore for RedisStore {
    fn queue_count(&self) -> u32 {
        self.layout.count
    }

    async fn now_ms(&self) -> Result<i64> {
        let mut conn = self.conn.clone();
        let (secs, micros): (i64, i64) = ::redis::cmd("TIME").query_async(&mut conn).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    async fn enqueue(&self, items: Vec<NewItem>) -> Result<Vec<EnqueueOutcome>> {
        validate_batch(&items)?;
        // Group by queue, keeping each item's position so answers come back in order.
        let mut per_queue: Vec<Vec<usize>> = vec![Vec::new(); self.layout.count as usize];
        for (i, it) in items.iter().enumerate() {
            per_queue[queue_for(it.routing_key(), self.layout.count) as usize].push(i);
        }
        let mut calls = Vec::new();
        for (q, idxs) in per_queue.iter().enumerate() {
            for chunk in idxs.chunks(SCRIPT_BATCH) {
                let refs: Vec<&NewItem> = chunk.iter().map(|&i| &items[i]).collect();
                let store = self;
                calls.push(async move {
                    let created = store.enqueue_chunk(q as u32, &refs).await?;
                    Ok::<_, Error>((chunk, created))
                });
            }
        }
        // All chunks are in flight at once: the multiplexed connection pipelines them.
        let answers = try_join_all(calls).await?;
        let mut out = vec![EnqueueOutcome::Duplicate; items.len()];
        for (chunk, created) in answers {
            for (&i, c) in chunk.iter().zip(created) {
                if c {
                    out[i] = EnqueueOutcome::Created;
                }
            }
        }
        Ok(out)
    }

    async fn get(&self, item: &ItemRef) -> Result<Option<ItemView>> {
        let q = self.queue_of(item);
        let args = vec![
            item.id.clone().into_bytes(),
            codec::glob_escape(&item.id).into_bytes(),
        ];
        let parts = array(self.run(&GET, q, args).await?, "get")?;
        if parts.len() != 8 {
            return Err(Error::Corrupt("get: unexpected answer".into()));
        }
        self.parse_view(q, item.id.clone(), &parts)
    }

    async fn cancel(&self, item: &ItemRef) -> Result<CancelOutcome> {
        let q = self.queue_of(item);
        let v = self
            .run(&CANCEL, q, vec![item.id.clone().into_bytes()])
            .await?;
        match text(&v).as_deref() {
            Some("cancelled") => Ok(CancelOutcome::Cancelled),
            Some("in_flight") => Ok(CancelOutcome::InFlight),
            Some("not_found") => Ok(CancelOutcome::NotFound),
            other => Err(Error::Corrupt(format!("cancel answered {other:?}"))),
        }
    }

    async fn reschedule(&self, item: &ItemRef, due_at_ms: i64) -> Result<RescheduleOutcome> {
        crate::limits::check_due("due_at_ms", due_at_ms)?;
        let q = self.queue_of(item);
        let args = vec![
            item.id.clone().into_bytes(),
            due_at_ms.to_string().into_bytes(),
        ];
        let v = self.run(&RESCHEDULE, q, args).await?;
        match text(&v).as_deref() {
            Some("rescheduled") => Ok(RescheduleOutcome::Rescheduled),
            Some("in_flight") => Ok(RescheduleOutcome::InFlight),
            Some("dead") => Ok(RescheduleOutcome::Dead),
            Some("not_found") => Ok(RescheduleOutcome::NotFound),
            other => Err(Error::Corrupt(format!("reschedule answered {other:?}"))),
        }
    }

    async fn next_claim_ticket(&self) -> Result<u64> {
        let mut conn = self.conn.clone();
        let n: i64 = ::redis::cmd("INCR")
            .arg(&self.claims_key)
            .query_async(&mut conn)
            .await?;
        Ok(n as u64)
    }

    async fn claim(&self, queue: u32, ttl_ms: u64) -> Result<Option<Lease>> {
        let keys = self.keys(queue)?;
        let token = new_lease_token();
        let mut conn = self.conn.clone();
        let ok: Option<String> = ::redis::cmd("SET")
            .arg(keys.lease())
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut conn)
            .await?;
        Ok(ok.map(|_| Lease { queue, token }))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.run(
            &RELEASE,
            lease.queue,
            vec![lease.token.clone().into_bytes()],
        )
        .await?;
        Ok(())
    }

    async fn pop(&self, lease: &Lease, opts: PopOptions) -> Result<Popped> {
        let args = vec![
            lease.token.clone().into_bytes(),
            opts.max_items.max(1).to_string().into_bytes(),
            opts.visibility_ms.max(1).to_string().into_bytes(),
            opts.lease_ttl_ms.max(1).to_string().into_bytes(),
            opts.merge_window_ms.to_string().into_bytes(),
            REAP_LIMIT.to_string().into_bytes(),
        ];
        let v = self.run(&POP, lease.queue, args).await?;
        let parts = array(v, "pop")?;
        if parts.len() == 1 && text(&parts[0]).as_deref() == Some("STALE") {
            return Err(Error::StaleLease { queue: lease.queue });
        }
        if parts.len() < 3 || (parts.len() - 3) % 4 != 0 {
            return Err(Error::Corrupt("pop: unexpected answer".into()));
        }
        let now_ms = int(&parts[0], "pop")?;
        let next = int(&parts[1], "pop")?;
        let seq = int(&parts[2], "pop")? as u64;
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut last_group = -1;
        let mut undecodable = Vec::new();
        for f in parts[3..].chunks(4) {
            let id = text(&f[0]).ok_or_else(|| Error::Corrupt("pop: id".into()))?;
            let group = int(&f[1], "pop")?;
            let token = DeliveryToken {
                attempt: int(&f[2], "pop")? as u32,
                seq,
            };
            let body = match bytes(&f[3]).map(codec::decode_body) {
                Some(Ok(b)) => b,
                other => {
                    // Never hand an unreadable item to a handler: fail this attempt so
                    // it ends in the dead-letter set where an operator can see it.
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "item body missing".to_owned(),
                    };
                    tracing::warn!(item_id = %id, queue = lease.queue, %why, "undecodable item");
                    undecodable.push(Settlement {
                        id,
                        token,
                        outcome: Outcome::Retry {
                            delay_ms: 0,
                            error: why,
                        },
                    });
                    continue;
                }
            };
            let claimed = Claimed {
                item: codec::item_from_body(id, body, token.attempt),
                token,
            };
            match deliveries.last_mut() {
                Some(d) if group == last_group => d.items.push(claimed),
                _ => deliveries.push(Delivery {
                    queue: lease.queue,
                    items: vec![claimed],
                }),
            }
            last_group = group;
        }
        if !undecodable.is_empty() {
            self.settle(lease.queue, undecodable).await?;
        }
        Ok(Popped {
            now_ms,
            next_due_ms: (next >= 0).then_some(next),
            deliveries,
        })
    }

    async fn settle(&self, queue: u32, settlements: Vec<Settlement>) -> Result<Vec<bool>> {
        // Acks (the hot path) and failures go to separate scripts; answers are put
        // back in the caller's order.
        let mut out = vec![false; settlements.len()];
        let (acks, fails): (Vec<usize>, Vec<usize>) =
            (0..settlements.len()).partition(|&i| settlements[i].outcome == Outcome::Ack);
        for chunk in acks.chunks(SCRIPT_BATCH) {
            let args = chunk
                .iter()
                .map(|&i| settlements[i].token.member(&settlements[i].id).into_bytes())
                .collect();
            let answers = array(self.run(&ACK, queue, args).await?, "ack")?;
            for (&i, a) in chunk.iter().zip(answers) {
                out[i] = int(&a, "ack")? == 1;
            }
        }
        for chunk in fails.chunks(SCRIPT_BATCH) {
            let mut args: Vec<Vec<u8>> = Vec::with_capacity(1 + chunk.len() * 4);
            args.push(chunk.len().to_string().into_bytes());
            for &i in chunk {
                let s = &settlements[i];
                let (mode, delay, err) = match &s.outcome {
                    Outcome::Retry { delay_ms, error } => ("r", *delay_ms, error.as_str()),
                    _ => ("x", 0, ""),
                };
                args.push(s.token.member(&s.id).into_bytes());
                args.push(mode.as_bytes().to_vec());
                args.push(delay.to_string().into_bytes());
                args.push(err.as_bytes().to_vec());
            }
            let answers = array(self.run(&FAIL, queue, args).await?, "fail")?;
            for (&i, a) in chunk.iter().zip(answers) {
                out[i] = int(&a, "fail")? == 1;
            }
        }
        Ok(out)
    }

    async fn extend(
        &self,
        queue: u32,
        items: &[(String, DeliveryToken)],
        visibility_ms: u64,
    ) -> Result<usize> {
        let mut total = 0;
        for chunk in items.chunks(SCRIPT_BATCH) {
            let mut args: Vec<Vec<u8>> = Vec::with_capacity(1 + chunk.len());
            args.push(visibility_ms.max(1).to_string().into_bytes());
            for (id, token) in chunk {
                args.push(token.member(id).into_bytes());
            }
            total += int(&self.run(&EXTEND, queue, args).await?, "extend")? as usize;
        }
        Ok(total)
    }

    async fn stats(&self) -> Result<Vec<QueueStats>> {
        let calls = (0..self.layout.count).map(|q| async move {
            let parts = array(self.run(&STATS, q, Vec::new()).await?, "stats")?;
            if parts.len() != 5 {
                return Err(Error::Corrupt("stats: unexpected answer".into()));
            }
            let next = int(&parts[4], "stats")?;
            Ok(QueueStats {
                queue: q,
                pending: int(&parts[0], "stats")? as u64,
                due_now: int(&parts[1], "stats")? as u64,
                in_flight: int(&parts[2], "stats")? as u64,
                dead: int(&parts[3], "stats")? as u64,
                next_due_ms: (next >= 0).then_some(next),
            })
        });
        try_join_all(calls).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<ItemView>> {
        let mut out = Vec::new();
        for q in 0..self.layout.count {
            if out.len() >= limit {
                break;
            }
            let want = (limit - out.len()).to_string().into_bytes();
            let parts = array(self.run(&DEAD, q, vec![want]).await?, "dead")?;
            for f in parts.chunks(5) {
                let [id, since, body, att, err] = f else {
                    return Err(Error::Corrupt("dead: unexpected answer".into()));
                };
                let (Some(id), Some(body)) = (text(id), bytes(body)) else {
                    continue;
                };
                let body = codec::decode_body(body)?;
                let attempts = codec::decode_attempts(text(att).as_deref())?;
                out.push(ItemView {
                    item: codec::item_from_body(id, body, attempts),
                    queue: q,
                    state: ItemState::Dead {
                        since_ms: opt_int(since).unwrap_or(0),
                    },
                    last_error: text(err),
                });
            }
        }
        Ok(out)
    }

    async fn requeue_dead(&self, items: &[ItemRef], limit: usize) -> Result<usize> {
        let limit = limit.max(1);
        let mut moved = 0;
        if items.is_empty() {
            for q in 0..self.layout.count {
                if moved >= limit {
                    break;
                }
                let want = (limit - moved).to_string().into_bytes();
                moved += int(&self.run(&REQUEUE, q, vec![want]).await?, "requeue")? as usize;
            }
            return Ok(moved);
        }
        let mut per_queue: Vec<Vec<Vec<u8>>> = vec![Vec::new(); self.layout.count as usize];
        for it in items {
            per_queue[self.queue_of(it) as usize].push(it.id.clone().into_bytes());
        }
        for (q, ids) in per_queue.into_iter().enumerate() {
            if ids.is_empty() {
                continue;
            }
            let mut args = vec![limit.to_string().into_bytes()];
            args.extend(ids);
            moved += int(&self.run(&REQUEUE, q as u32, args).await?, "requeue")? as usize;
        }
        Ok(moved)
    }
}

fn array(v: Value, what: &str) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(Error::Corrupt(format!(
            "{what}: expected an array, got {other:?}"
        ))),
    }
}

fn opt_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()?
            .parse::<f64>()
            .ok()
            .map(|f| f as i64),
        Value::SimpleString(s) => s.parse::<f64>().ok().map(|f| f as i64),
        Value::Double(f) => Some(*f as i64),
        _ => None,
    }
}

fn int(v: &Value, what: &str) -> Result<i64> {
    opt_int(v).ok_or_else(|| Error::Corrupt(format!("{what}: expected a number, got {v:?}")))
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b.to_vec()).ok())
}
