//! The production delay store on Redis (standalone or Cluster).
//!
//! Each queue `i` of family `f` under prefix `p` is twenty-one keys sharing the hash
//! tag `{p:f:i}`, so each queue is one Cluster slot and every script touches one slot
//! (see `lua/common.lua` for what each key holds). Every state change is one Lua
//! script per queue per batch, using Redis `TIME`; nothing is decided with a client's
//! clock and no item ever exists only in a client's memory. (A large pop's bodies are
//! read after its script with a plain `HMGET`: a read of items in flight, whose bodies
//! stay until they are settled.) Outside the queues there
//! are two family keys: the claim counter `p:f:claims` (touched once per queue
//! switch, never per item) and the layout `p:f:layout` (read when a resize happens),
//! and one channel: `p:f:wake`, where scripts announce a queue's new earliest due
//! time (`q due_ms`) so idle consumers need not wait for their next look.
//!
//! Resizes: producers place items with the current [`Layout`]; a queue refuses a
//! producer whose layout is older than one it has seen (`STALE`), and the store then
//! re-reads the layout and retries. Lookups walk every home an item may have.
//! Moving misplaced items is in `redis_migrate.rs`.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::Duration;

use ::redis::{Script, Value};
use async_trait::async_trait;
use futures_util::future::try_join_all;

use super::codec::{self, Body};
use super::layout::Layout;
use super::redis_migrate::Passes;
use super::{
    CancelOutcome, Claimed, DUE_SOON_MS, DelayStore, Delivery, DeliveryToken, EnqueueOutcome,
    ItemRef, ItemState, ItemView, Lease, MigrateStep, NewItem, Outcome, PopOptions, Popped,
    QueueLayout, QueueStats, RescheduleOutcome, Settlement, Wake, new_lease_token, validate_batch,
};
use crate::error::{Error, Result};
use crate::redis_conn::{RedisConn, RedisSpec};

/// Most items per script call: keeps each script short (Redis is single-threaded, a
/// long script stalls every client) and far below Lua's unpack limit.
pub(super) const SCRIPT_BATCH: usize = 500;
/// Most expired in-flight items one pop reaps.
const REAP_LIMIT: u32 = 500;
/// A pop of at most this many items answers their bodies itself; a larger one leaves
/// them to a plain `HMGET` (see pop.lua). Below it, a command of its own costs more
/// than passing the bodies through Lua.
const INLINE_BODIES: u32 = 32;
/// How often a lookup retries an item a resize is moving, and for how long.
const MOVING_RETRY: Duration = Duration::from_millis(20);
const MOVING_RETRIES: u32 = 250;

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(concat!(include_str!("lua/common.lua"), include_str!($file))))
    };
}

static ENQUEUE: LazyLock<Script> = script!("lua/enqueue.lua");
static CHECK: LazyLock<Script> = script!("lua/check.lua");
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
static LAYOUT: LazyLock<Script> = script!("lua/layout.lua");
static WAITING: LazyLock<Script> = script!("lua/waiting.lua");
pub(super) static MV_SCAN: LazyLock<Script> = script!("lua/mv_scan.lua");
pub(super) static MV_TAKE: LazyLock<Script> = script!("lua/mv_take.lua");
pub(super) static MV_PENDING: LazyLock<Script> = script!("lua/mv_pending.lua");
pub(super) static MV_IMPORT: LazyLock<Script> = script!("lua/mv_import.lua");
pub(super) static MV_RETARGET: LazyLock<Script> = script!("lua/mv_retarget.lua");
pub(super) static MV_FINISH: LazyLock<Script> = script!("lua/mv_finish.lua");
pub(super) static MV_UNMARK: LazyLock<Script> = script!("lua/mv_unmark.lua");
pub(super) static MV_CLEAN: LazyLock<Script> = script!("lua/mv_clean.lua");

/// The SHA1 of every queue script with its name (`pop`, `ack`, …): what a profile
/// reads in `SLOWLOG` entries, which name scripts only by hash.
pub fn script_names() -> Vec<(String, &'static str)> {
    let all: [(&LazyLock<Script>, &'static str); 23] = [
        (&ENQUEUE, "enqueue"),
        (&CHECK, "check"),
        (&POP, "pop"),
        (&ACK, "ack"),
        (&FAIL, "fail"),
        (&EXTEND, "extend"),
        (&CANCEL, "cancel"),
        (&RESCHEDULE, "reschedule"),
        (&GET, "get"),
        (&REQUEUE, "requeue"),
        (&STATS, "stats"),
        (&DEAD, "dead"),
        (&RELEASE, "release"),
        (&LAYOUT, "layout"),
        (&WAITING, "waiting"),
        (&MV_SCAN, "mv_scan"),
        (&MV_TAKE, "mv_take"),
        (&MV_PENDING, "mv_pending"),
        (&MV_IMPORT, "mv_import"),
        (&MV_RETARGET, "mv_retarget"),
        (&MV_FINISH, "mv_finish"),
        (&MV_UNMARK, "mv_unmark"),
        (&MV_CLEAN, "mv_clean"),
    ];
    all.iter()
        .map(|(s, name)| (s.get_hash().to_owned(), *name))
        .collect()
}

/// The twenty-one keys of one queue, in the order the scripts expect them.
#[derive(Debug)]
struct QueueKeys([String; 21]);

impl QueueKeys {
    fn new(layout: &QueueLayout, queue: u32) -> Self {
        let tag = format!("{{{}:{}:{}}}", layout.prefix, layout.family, queue);
        QueueKeys(
            [
                "due", "run", "items", "att", "dead", "mki", "lease", "cx", "err", "cls", "seq",
                "epoch", "moving", "mvinfo", "imported", "back", "clean", "park", "parki", "bat",
                "bst",
            ]
            .map(|k| format!("{tag}:{k}")),
        )
    }
    fn lease(&self) -> &str {
        &self.0[6]
    }
}

/// `ACK`'s arguments for the acks `chunk` (indexes into `settlements`), and the
/// settlement each answer is for (see ack.lua): n, g, then per batch `seq`, how many
/// and their positions (3 bytes each, big-endian), then the members of deliveries of
/// their own, then the ids — the batches' first, in the same order, then the others'.
fn ack_args(settlements: &[Settlement], chunk: &[usize]) -> (Vec<Vec<u8>>, Vec<usize>) {
    // Batches in the order first seen; a handful per call (one per pop acked from).
    let mut batches: Vec<(u64, Vec<usize>)> = Vec::new();
    let mut own = Vec::new();
    for &i in chunk {
        let t = &settlements[i].token;
        // A position fits 3 bytes: a pop takes at most a worker's batch (≤ 5,000).
        // One that did not could only be a forged token, and is checked as a member.
        if t.pos == 0 || t.pos >= 1 << 24 {
            own.push(i);
        } else if let Some((_, b)) = batches.iter_mut().rev().find(|(s, _)| *s == t.seq) {
            b.push(i);
        } else {
            batches.push((t.seq, vec![i]));
        }
    }
    let mut args: Vec<Vec<u8>> = Vec::with_capacity(2 + 3 * batches.len() + 2 * chunk.len());
    args.push(chunk.len().to_string().into_bytes());
    args.push(batches.len().to_string().into_bytes());
    for (seq, b) in &batches {
        args.push(seq.to_string().into_bytes());
        args.push(b.len().to_string().into_bytes());
        let mut packed = Vec::with_capacity(3 * b.len());
        for &i in b {
            packed.extend_from_slice(&settlements[i].token.pos.to_be_bytes()[1..]);
        }
        args.push(packed);
    }
    args.extend(
        own.iter()
            .map(|&i| settlements[i].token.member(&settlements[i].id).into_bytes()),
    );
    let order: Vec<usize> = batches
        .iter()
        .flat_map(|(_, b)| b.iter().copied())
        .chain(own.iter().copied())
        .collect();
    args.extend(
        order
            .iter()
            .map(|&i| settlements[i].id.clone().into_bytes()),
    );
    (args, order)
}

/// Delay store on Redis.
#[derive(Debug, Clone)]
pub struct RedisStore {
    conn: RedisConn,
    names: QueueLayout,
    keys: Arc<RwLock<Vec<Arc<QueueKeys>>>>,
    layout: Arc<RwLock<Layout>>,
    pub(super) passes: Arc<Mutex<Passes>>,
    claims_key: String,
    layout_key: String,
    /// Where to subscribe to the wake channel; `None`: [`DelayStore::wakes`] is.
    wake_spec: Option<RedisSpec>,
}

/// How a lookup script answered on one queue.
enum Found<T> {
    Here(T),
    NotHere,
    Moving,
}

impl RedisStore {
    /// Opens the store: reads the family's layout, creating it with `names.count`
    /// queues when the family is new.
    pub async fn open(conn: RedisConn, names: QueueLayout) -> Result<Self> {
        let store = Self {
            claims_key: format!("{}:{}:claims", names.prefix, names.family),
            layout_key: format!("{}:{}:layout", names.prefix, names.family),
            layout: Arc::new(RwLock::new(Layout::initial(names.count))),
            keys: Arc::default(),
            passes: Arc::default(),
            wake_spec: None,
            conn,
            names,
        };
        store
            .layout_call(&["apply", &store.names.count.to_string(), "0"])
            .await?;
        Ok(store)
    }

    /// Lets [`DelayStore::wakes`] subscribe to the family's wake channel over its own
    /// connection to `spec` (consumers want this; producers and tools do not).
    pub fn announced_through(mut self, spec: RedisSpec) -> Self {
        self.wake_spec = Some(spec);
        self
    }

    /// The family's wake channel.
    fn wake_channel(&self) -> String {
        format!("{}:{}:wake", self.names.prefix, self.names.family)
    }

    /// Prefix, family and the count this process seeded the layout with.
    pub fn names(&self) -> &QueueLayout {
        &self.names
    }

    /// The connection, for callers that need plain commands next to the store.
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    pub(super) fn current_layout(&self) -> Layout {
        self.layout
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs the layout script and adopts its answer if it is newer than ours.
    async fn layout_call(&self, args: &[&str]) -> Result<Layout> {
        let mut inv = LAYOUT.prepare_invoke();
        inv.key(&self.layout_key);
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        let raw: String = inv.invoke_async(&mut conn).await?;
        if raw.is_empty() {
            return Ok(self.current_layout());
        }
        let fresh: Layout = serde_json::from_str(&raw)
            .map_err(|e| Error::Corrupt(format!("layout {raw:?}: {e}")))?;
        let mut cur = self.layout.write().unwrap_or_else(|p| p.into_inner());
        if fresh.epoch > cur.epoch || (fresh.epoch == cur.epoch && fresh != *cur) {
            if fresh.epoch != cur.epoch {
                tracing::info!(family = %self.names.family, epoch = fresh.epoch, count = fresh.count,
                    draining = ?fresh.draining, "queue layout changed");
                metrics::counter!(crate::telemetry::LAYOUT_APPLIED).increment(1);
            }
            *cur = fresh;
        }
        Ok(cur.clone())
    }

    pub(super) async fn retire(&self, epoch: u64) -> Result<Layout> {
        self.layout_call(&["retire", &epoch.to_string()]).await
    }

    fn keys(&self, queue: u32) -> Result<Arc<QueueKeys>> {
        if queue >= super::MAX_QUEUES {
            return Err(Error::invalid(
                "queue",
                format!("{queue} is outside 0..{}", super::MAX_QUEUES),
            ));
        }
        if let Some(k) = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue as usize)
        {
            return Ok(k.clone());
        }
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        while keys.len() <= queue as usize {
            let q = keys.len() as u32;
            keys.push(Arc::new(QueueKeys::new(&self.names, q)));
        }
        Ok(keys[queue as usize].clone())
    }

    pub(super) async fn run(
        &self,
        script: &Script,
        queue: u32,
        args: Vec<Vec<u8>>,
    ) -> Result<Value> {
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

    /// The bodies of items of `queue` (a `Nil` for an id without one), read with a
    /// plain `HMGET`: after a large pop, outside its script, because a body passing
    /// through Lua is copied three times (reply to Lua string to reply) and an item in
    /// flight keeps its body until its delivery is settled.
    async fn bodies(&self, queue: u32, ids: &[Value]) -> Result<Vec<Value>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys(queue)?;
        let mut cmd = ::redis::cmd("HMGET");
        cmd.arg(&keys.0[2]);
        for id in ids {
            cmd.arg(bytes(id).ok_or_else(|| Error::Corrupt("pop: id".into()))?);
        }
        let mut conn = self.conn.clone();
        array(cmd.query_async(&mut conn).await?, "pop bodies")
    }

    /// After a `STALE` answer: re-read the layout; it must now be at least `epoch`.
    async fn catch_up(&self, epoch: u64) -> Result<()> {
        let l = self.refresh_layout().await?;
        if l.epoch < epoch {
            return Err(Error::StaleLayout { epoch });
        }
        Ok(())
    }

    async fn enqueue_chunk(&self, epoch: u64, queue: u32, items: &[&NewItem]) -> Result<Vec<bool>> {
        // The script takes each id once per call: a repeat within the chunk is a
        // duplicate of the first, answered here without sending it.
        let mut seen = HashSet::with_capacity(items.len());
        let sent: Vec<usize> = (0..items.len())
            .filter(|&i| seen.insert(items[i].id.as_str()))
            .collect();
        let n = sent.len();
        let classes: Vec<String> = sent
            .iter()
            .map(|&i| {
                let it = items[i];
                codec::merge_class(&it.handler, it.routing_key(), it.merge_key.as_deref())
            })
            .collect();
        let merging = classes.iter().any(|c| !c.is_empty());
        // Sections of n (see enqueue.lua): ids, due times, bodies, then the classes
        // when any item has one.
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(3 + n * 4);
        args.push(epoch.to_string().into_bytes());
        args.push(n.to_string().into_bytes());
        args.push(if merging {
            b"1".to_vec()
        } else {
            b"0".to_vec()
        });
        args.extend(sent.iter().map(|&i| items[i].id.clone().into_bytes()));
        args.extend(
            sent.iter()
                .map(|&i| items[i].due_at_ms.to_string().into_bytes()),
        );
        for &i in &sent {
            let it = items[i];
            args.push(codec::encode_body(&Body {
                max_attempts: it.max_attempts,
                due_at_ms: it.due_at_ms,
                key: it.routing_key().to_owned(),
                handler: it.handler.clone(),
                merge_key: it.merge_key.clone(),
                payload: it.payload.clone(),
                traceparent: it.traceparent,
            }));
        }
        if merging {
            args.extend(classes.into_iter().map(String::into_bytes));
        }
        let answer = self.run(&ENQUEUE, queue, args).await?;
        // `n` when every item was created, else one answer per item sent.
        let created: Vec<bool> = match answer {
            Value::Int(all) if all == n as i64 => vec![true; n],
            other => {
                let parts = array(other, "enqueue")?;
                stale_epoch(&parts)?;
                if parts.len() != n {
                    return Err(Error::Corrupt("enqueue: unexpected answer".into()));
                }
                parts
                    .iter()
                    .map(|f| Ok(int(f, "enqueue")? == 1))
                    .collect::<Result<_>>()?
            }
        };
        let mut out = vec![false; items.len()];
        for (&i, c) in sent.iter().zip(created) {
            out[i] = c;
        }
        Ok(out)
    }

    /// Asks an old home which of `ids` exist there (sealing it for `epoch`).
    async fn check_chunk(&self, epoch: u64, queue: u32, ids: &[&str]) -> Result<Vec<bool>> {
        let mut args = vec![epoch.to_string().into_bytes()];
        args.extend(ids.iter().map(|i| i.as_bytes().to_vec()));
        let parts = array(self.run(&CHECK, queue, args).await?, "check")?;
        stale_epoch(&parts)?;
        parts.iter().map(|f| Ok(int(f, "check")? == 1)).collect()
    }

    /// One enqueue attempt under `layout`: during a resize, ask the old homes first
    /// (an item there is a duplicate), then store the rest in their current homes.
    async fn try_enqueue(&self, layout: &Layout, items: &[NewItem]) -> Result<Vec<EnqueueOutcome>> {
        let mut exists = vec![false; items.len()];
        if layout.in_transition() {
            let mut per_old: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            for (i, it) in items.iter().enumerate() {
                let homes = layout.homes(it.routing_key());
                for q in &homes[..homes.len() - 1] {
                    per_old.entry(*q).or_default().push(i);
                }
            }
            let calls = per_old.iter().flat_map(|(q, idxs)| {
                idxs.chunks(SCRIPT_BATCH).map(move |chunk| async move {
                    let ids: Vec<&str> = chunk.iter().map(|&i| items[i].id.as_str()).collect();
                    Ok::<_, Error>((chunk, self.check_chunk(layout.epoch, *q, &ids).await?))
                })
            });
            for (chunk, found) in try_join_all(calls).await? {
                for (&i, f) in chunk.iter().zip(found) {
                    exists[i] |= f;
                }
            }
        }
        let mut per_home: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            if !exists[i] {
                per_home
                    .entry(layout.home(it.routing_key()))
                    .or_default()
                    .push(i);
            }
        }
        let calls = per_home.iter().flat_map(|(q, idxs)| {
            idxs.chunks(SCRIPT_BATCH).map(move |chunk| async move {
                let refs: Vec<&NewItem> = chunk.iter().map(|&i| &items[i]).collect();
                Ok::<_, Error>((chunk, self.enqueue_chunk(layout.epoch, *q, &refs).await?))
            })
        });
        // All chunks are in flight at once: the multiplexed connection pipelines them.
        let mut out = vec![EnqueueOutcome::Duplicate; items.len()];
        for (chunk, created) in try_join_all(calls).await? {
            for (&i, c) in chunk.iter().zip(created) {
                if c {
                    out[i] = EnqueueOutcome::Created;
                }
            }
        }
        Ok(out)
    }

    /// Runs a lookup script on each home of `item` in order until one has it. An item
    /// a resize is moving is asked for again shortly; during a resize the walk is
    /// done twice before answering "not here", since the item may have moved.
    async fn locate<T>(
        &self,
        item: &ItemRef,
        script: &Script,
        args: &[Vec<u8>],
        classify: impl Fn(u32, Value) -> Result<Found<T>>,
    ) -> Result<Option<(u32, T)>> {
        let mut tries = 0;
        let mut passes = 0;
        loop {
            let layout = self.current_layout();
            let mut moving = false;
            for q in layout.homes(&item.key) {
                match classify(q, self.run(script, q, args.to_vec()).await?)? {
                    Found::Here(t) => return Ok(Some((q, t))),
                    Found::Moving => moving = true,
                    Found::NotHere => {}
                }
            }
            passes += 1;
            if moving && tries < MOVING_RETRIES {
                tries += 1;
                tokio::time::sleep(MOVING_RETRY).await;
                continue;
            }
            if moving {
                return Err(Error::Unavailable(format!(
                    "item {:?} stayed in the middle of a move",
                    item.id
                )));
            }
            if !layout.in_transition() || passes >= 2 {
                return Ok(None);
            }
        }
    }

    /// Builds a view from GET's answer: body, attempts, pending score, in-flight
    /// member, deadline, dead since, last error, cancelled flag, waiting score.
    fn parse_view(queue: u32, id: String, parts: &[Value]) -> Result<Option<ItemView>> {
        let Some(body) = bytes(&parts[0]) else {
            return Ok(None);
        };
        let body = codec::decode_body(body)?;
        let mut attempts = codec::decode_attempts(text(&parts[1]).as_deref())?;
        let state = if let Some(s) = opt_int(&parts[2]) {
            ItemState::Pending { due_score_ms: s }
        } else if let Some(s) = opt_int(&parts[8]) {
            ItemState::Waiting { due_score_ms: s }
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
    fn family(&self) -> &str {
        &self.names.family
    }

    fn layout(&self) -> Layout {
        self.current_layout()
    }

    async fn apply_layout(&self, count: u32, revision: i64) -> Result<Layout> {
        if !(1..=super::MAX_QUEUES).contains(&count) {
            return Err(Error::invalid(
                "queue_count",
                format!("{count} is outside 1..={}", super::MAX_QUEUES),
            ));
        }
        self.layout_call(&["apply", &count.to_string(), &revision.to_string()])
            .await
    }

    async fn refresh_layout(&self) -> Result<Layout> {
        self.layout_call(&["get"]).await
    }

    fn wants_migration(&self, queue: u32) -> bool {
        self.migration_wanted(queue)
    }

    async fn migrate(&self, lease: &Lease, max_items: u32) -> Result<MigrateStep> {
        self.migrate_step(lease, max_items).await
    }

    async fn now_ms(&self) -> Result<i64> {
        let mut conn = self.conn.clone();
        let (secs, micros): (i64, i64) = ::redis::cmd("TIME").query_async(&mut conn).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    async fn enqueue(&self, items: Vec<NewItem>) -> Result<Vec<EnqueueOutcome>> {
        validate_batch(&items)?;
        let mut last = Error::StaleLayout { epoch: 0 };
        for _ in 0..5 {
            let layout = self.current_layout();
            match self.try_enqueue(&layout, &items).await {
                Ok(out) => {
                    super::count_enqueued(
                        &self.names.family,
                        items.iter().map(|i| i.handler.as_str()),
                        &out,
                    );
                    return Ok(out);
                }
                Err(Error::StaleLayout { epoch }) => {
                    // Chunks that went through answered `Created`; retrying them
                    // would answer `Duplicate`. That is only possible for items a
                    // producer re-sends anyway; the store stays exactly-once.
                    self.catch_up(epoch).await?;
                    last = Error::StaleLayout { epoch };
                }
                other => return other,
            }
        }
        Err(last)
    }

    async fn get(&self, item: &ItemRef) -> Result<Option<ItemView>> {
        let args = [
            item.id.clone().into_bytes(),
            codec::glob_escape(&item.id).into_bytes(),
        ];
        let found = self
            .locate(item, &GET, &args, |q, v| {
                let parts = array(v, "get")?;
                if parts.len() != 9 {
                    return Err(Error::Corrupt("get: unexpected answer".into()));
                }
                Ok(match Self::parse_view(q, item.id.clone(), &parts)? {
                    Some(v) => Found::Here(v),
                    None => Found::NotHere,
                })
            })
            .await?;
        Ok(found.map(|(_, v)| v))
    }

    async fn cancel(&self, item: &ItemRef) -> Result<CancelOutcome> {
        let args = [item.id.clone().into_bytes()];
        let found = self
            .locate(item, &CANCEL, &args, |_, v| {
                Ok(match text(&v).as_deref() {
                    Some("cancelled") => Found::Here(CancelOutcome::Cancelled),
                    Some("in_flight") => Found::Here(CancelOutcome::InFlight),
                    Some("moving") => Found::Moving,
                    Some("not_found") => Found::NotHere,
                    other => return Err(Error::Corrupt(format!("cancel answered {other:?}"))),
                })
            })
            .await?;
        Ok(found.map_or(CancelOutcome::NotFound, |(_, o)| o))
    }

    async fn reschedule(&self, item: &ItemRef, due_at_ms: i64) -> Result<RescheduleOutcome> {
        crate::limits::check_due("due_at_ms", due_at_ms)?;
        let args = [
            item.id.clone().into_bytes(),
            due_at_ms.to_string().into_bytes(),
        ];
        let found = self
            .locate(item, &RESCHEDULE, &args, |_, v| {
                Ok(match text(&v).as_deref() {
                    Some("rescheduled") => Found::Here(RescheduleOutcome::Rescheduled),
                    Some("in_flight") => Found::Here(RescheduleOutcome::InFlight),
                    Some("dead") => Found::Here(RescheduleOutcome::Dead),
                    Some("moving") => Found::Moving,
                    Some("not_found") => Found::NotHere,
                    other => return Err(Error::Corrupt(format!("reschedule answered {other:?}"))),
                })
            })
            .await?;
        Ok(found.map_or(RescheduleOutcome::NotFound, |(_, o)| o))
    }

    async fn wakes(&self) -> Option<tokio::sync::mpsc::Receiver<Wake>> {
        let spec = self.wake_spec.clone()?;
        // Small: a consumer that falls behind loses hints, not items.
        let (tx, rx) = tokio::sync::mpsc::channel(1_024);
        tokio::spawn(follow_wakes(spec, self.wake_channel(), tx));
        Some(rx)
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
        let mut args = vec![
            lease.token.clone().into_bytes(),
            opts.max_items.max(1).to_string().into_bytes(),
            opts.visibility_ms.max(1).to_string().into_bytes(),
            opts.lease_ttl_ms.max(1).to_string().into_bytes(),
            opts.merge_window_ms.to_string().into_bytes(),
            REAP_LIMIT.to_string().into_bytes(),
            INLINE_BODIES.to_string().into_bytes(),
        ];
        args.extend(opts.serves.iter().map(|h| h.clone().into_bytes()));
        let parts = array(self.run(&POP, lease.queue, args).await?, "pop")?;
        if parts.len() == 1 && text(&parts[0]).as_deref() == Some("STALE") {
            return Err(Error::StaleLease { queue: lease.queue });
        }
        let corrupt = || Error::Corrupt("pop: unexpected answer".into());
        if parts.len() != 8 {
            return Err(corrupt());
        }
        let now_ms = int(&parts[0], "pop")?;
        let next = int(&parts[1], "pop")?;
        let seq = int(&parts[2], "pop")? as u64;
        // ids, attempts made before (empty: none), groups (empty: one delivery per
        // item), positions in the batch (empty: item k at position k), bodies (empty:
        // a large pop, read them here); see pop.lua.
        let mut lists = parts.into_iter().skip(3).map(|v| array(v, "pop"));
        let (ids, atts, groups, positions, mut bodies) = (
            lists.next().ok_or_else(corrupt)??,
            lists.next().ok_or_else(corrupt)??,
            lists.next().ok_or_else(corrupt)??,
            lists.next().ok_or_else(corrupt)??,
            lists.next().ok_or_else(corrupt)??,
        );
        if bodies.is_empty() {
            bodies = self.bodies(lease.queue, &ids).await?;
        }
        if bodies.len() != ids.len()
            || !(atts.is_empty() || atts.len() == ids.len())
            || !(groups.is_empty() || groups.len() == ids.len())
            || !(positions.is_empty() || positions.len() == ids.len())
        {
            return Err(corrupt());
        }
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut last_group = -1;
        let mut undecodable = Vec::new();
        for (k, (id, body)) in ids.iter().zip(bodies).enumerate() {
            let id = text(id).ok_or_else(|| Error::Corrupt("pop: id".into()))?;
            let before = match atts.get(k) {
                None | Some(Value::Nil) => 0,
                Some(v) => int(v, "pop")?,
            };
            let group = match groups.get(k) {
                Some(g) => int(g, "pop")?,
                None => k as i64,
            };
            let pos = match positions.get(k) {
                Some(p) => int(p, "pop")? as u32,
                None => k as u32 + 1,
            };
            let token = DeliveryToken {
                attempt: before as u32 + 1,
                seq,
                pos,
            };
            let body = match bytes(&body).map(codec::decode_body) {
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
            let (args, order) = ack_args(&settlements, chunk);
            match self.run(&ACK, queue, args).await? {
                // Every delivery was current.
                Value::Int(all) if all == chunk.len() as i64 => {
                    for &i in chunk {
                        out[i] = true;
                    }
                }
                other => {
                    let answers = array(other, "ack")?;
                    if answers.len() != chunk.len() {
                        return Err(Error::Corrupt("ack: unexpected answer".into()));
                    }
                    for (&i, a) in order.iter().zip(answers) {
                        out[i] = int(&a, "ack")? == 1;
                    }
                }
            }
        }
        for chunk in fails.chunks(SCRIPT_BATCH) {
            let mut args: Vec<Vec<u8>> = Vec::with_capacity(1 + chunk.len() * 5);
            args.push(chunk.len().to_string().into_bytes());
            for &i in chunk {
                let s = &settlements[i];
                let (mode, delay, err) = match &s.outcome {
                    Outcome::Retry { delay_ms, error } => ("r", *delay_ms, error.as_str()),
                    Outcome::Park => ("k", 0, ""),
                    Outcome::Release | Outcome::Ack => ("x", 0, ""),
                };
                args.push(s.token.member(&s.id).into_bytes());
                args.push(s.token.pos.to_string().into_bytes());
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
            // visibility, n, the members, then their positions (see extend.lua).
            let mut args: Vec<Vec<u8>> = Vec::with_capacity(2 + 2 * chunk.len());
            args.push(visibility_ms.max(1).to_string().into_bytes());
            args.push(chunk.len().to_string().into_bytes());
            for (id, token) in chunk {
                args.push(token.member(id).into_bytes());
            }
            for (_, token) in chunk {
                args.push(token.pos.to_string().into_bytes());
            }
            total += int(&self.run(&EXTEND, queue, args).await?, "extend")? as usize;
        }
        Ok(total)
    }

    async fn stats(&self) -> Result<Vec<QueueStats>> {
        let calls = (0..self.queue_count()).map(|q| async move {
            let horizon = DUE_SOON_MS.to_string().into_bytes();
            let parts = array(self.run(&STATS, q, vec![horizon]).await?, "stats")?;
            if parts.len() != 8 {
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
                moving: int(&parts[5], "stats")? as u64,
                due_soon: int(&parts[6], "stats")? as u64,
                waiting: int(&parts[7], "stats")? as u64,
            })
        });
        try_join_all(calls).await
    }

    async fn waiting_by_handler(&self) -> Result<BTreeMap<String, u64>> {
        let calls = (0..self.queue_count())
            .map(|q| async move { array(self.run(&WAITING, q, Vec::new()).await?, "waiting") });
        let mut out = BTreeMap::new();
        for parts in try_join_all(calls).await? {
            for pair in parts.chunks(2) {
                let [h, n] = pair else {
                    return Err(Error::Corrupt("waiting: unexpected answer".into()));
                };
                let h = text(h).ok_or_else(|| Error::Corrupt("waiting: handler".into()))?;
                *out.entry(h).or_insert(0) += int(n, "waiting")? as u64;
            }
        }
        Ok(out)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<ItemView>> {
        let mut out = Vec::new();
        for q in 0..self.queue_count() {
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
            for q in 0..self.queue_count() {
                if moved >= limit {
                    break;
                }
                let want = (limit - moved).to_string().into_bytes();
                moved += int(&self.run(&REQUEUE, q, vec![want]).await?, "requeue")? as usize;
            }
            return Ok(moved);
        }
        for it in items {
            let args = [limit.to_string().into_bytes(), it.id.clone().into_bytes()];
            let found = self
                .locate(it, &REQUEUE, &args, |_, v| {
                    let n = int(&v, "requeue")?;
                    Ok(if n > 0 {
                        Found::Here(n)
                    } else {
                        Found::NotHere
                    })
                })
                .await?;
            moved += found.map_or(0, |(_, n)| n as usize);
        }
        Ok(moved)
    }
}

/// `{'STALE', epoch}` from a script: the caller's layout is old.
/// Subscribes to `channel` and forwards its announcements until `tx` is dropped;
/// after every (re)subscription it sends [`Wake::ALL`] (what was announced while
/// unsubscribed is gone). A broken subscription is retried every second, on the next
/// seed.
async fn follow_wakes(spec: RedisSpec, channel: String, tx: tokio::sync::mpsc::Sender<Wake>) {
    use futures_util::StreamExt;
    let mut attempt = 0usize;
    // Said once at warn level: a deployment whose Redis user may not subscribe still
    // works, on the idle cap, and should not fill the log saying so.
    let mut warned = false;
    while !tx.is_closed() {
        let subscribed = async {
            let mut sub = spec.subscriber(attempt).await?;
            sub.subscribe(&channel).await?;
            Ok::<_, Error>(sub)
        };
        match subscribed.await {
            Ok(sub) => {
                if tx.try_send(Wake::ALL).is_err() && tx.is_closed() {
                    return;
                }
                let mut messages = sub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        m = messages.next() => m,
                        _ = tx.closed() => return,
                    };
                    let Some(msg) = msg else { break };
                    if let Some(w) = parse_wake(msg.get_payload_bytes()) {
                        // Full: the consumer is behind and looks soon anyway.
                        let _ = tx.try_send(w);
                    }
                }
                tracing::debug!(%channel, "wake subscription ended; resubscribing");
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(%channel, error = %e,
                    "cannot subscribe to the wake channel; retrying every second (until then \
                     queues are looked at on consumer.idle_sleep_max_ms)");
            }
            Err(e) => tracing::debug!(%channel, error = %e, "cannot subscribe to wakes yet"),
        }
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tx.closed() => return,
        }
    }
}

/// `queue due_ms`, as `announce` in `lua/common.lua` publishes it.
fn parse_wake(payload: &[u8]) -> Option<Wake> {
    let (q, due) = std::str::from_utf8(payload).ok()?.split_once(' ')?;
    Some(Wake {
        queue: q.parse().ok()?,
        due_at_ms: due.parse().ok()?,
    })
}

pub(super) fn stale_epoch(parts: &[Value]) -> Result<()> {
    if parts.len() == 2 && text(&parts[0]).as_deref() == Some("STALE") {
        return Err(Error::StaleLayout {
            epoch: int(&parts[1], "stale")? as u64,
        });
    }
    Ok(())
}

pub(super) fn array(v: Value, what: &str) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(Error::Corrupt(format!(
            "{what}: expected an array, got {other:?}"
        ))),
    }
}

pub(super) fn opt_int(v: &Value) -> Option<i64> {
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

pub(super) fn int(v: &Value, what: &str) -> Result<i64> {
    opt_int(v).ok_or_else(|| Error::Corrupt(format!("{what}: expected a number, got {v:?}")))
}

pub(super) fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(super) fn text(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b.to_vec()).ok())
}
