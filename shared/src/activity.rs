//! The last hour of activity the console charts: counts per 10-second bucket (items
//! enqueued, fired, acked, failed, dead-lettered per queue family; job fires and
//! failed runs), a fire-lag histogram per bucket, and gauges the coordinator leader
//! samples (queue depth, oldest due age, live workers).
//!
//! It is kept without a Prometheus server. Call sites feed a process-global
//! [`Recorder`] next to their `metrics::counter!` (like the `metrics` facade: no
//! signature changes through the call stacks; nothing is kept until a process
//! [`enable`]s it, so an SDK user's process pays one atomic load). A [`flush`] task,
//! started by the `chime` binary, moves what the recorder holds into a
//! [`HistoryStore`] every [`FLUSH_EVERY`]: Redis ([`RedisHistory`], one hash per
//! bucket that expires a little over an hour after its bucket, so every coordinator
//! replica reads the same history and Redis memory is bounded) or memory
//! ([`MemoryHistory`], `chime dev`: at most [`KEEP_BUCKETS`] buckets). Both answer
//! the same tests. [`History::build`] turns the stored buckets into the series the
//! console's `/api/history` serves.
//!
//! Increments are additive (HINCRBY), so a bucket may be flushed partly, by many
//! processes, and again; gauges overwrite (HSET), and only the leader sets them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;

use crate::clock::{Clock, SystemClock};
use crate::error::Result;
use crate::redis_conn::RedisConn;

/// Width of one bucket.
pub const BUCKET_MS: i64 = 10_000;
/// Buckets kept: one hour.
pub const KEEP_BUCKETS: usize = 360;
/// How long a stored bucket lives after its start: an hour and a minute, so the
/// oldest bucket of a full hour is still there when it is read.
pub const KEEP_MS: i64 = BUCKET_MS * KEEP_BUCKETS as i64 + 60_000;
/// How often the flusher writes what the recorder holds.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Ratio between the edges of two neighbouring lag bins: a p99 read from a bin's
/// geometric middle is within 2.5 % of the true one.
const LAG_RATIO: f64 = 1.05;
/// Lag bins: bin 0 holds lags under 1 ms, the last everything past ~2 days.
const LAG_BINS: u32 = 400;

/// What a counter counts. Job kinds have no family (recorded under `""`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Items stored by enqueue.
    Enqueued,
    /// Items handed to a handler.
    Fired,
    /// Items whose handler succeeded.
    Acked,
    /// Items whose handler failed (retried or dead-lettered).
    Failed,
    /// Items dead-lettered (also counted in `Failed`).
    Dead,
    /// Job runs started by the leader.
    JobFired,
    /// Job runs that ended in failure (failed or timed out).
    RunFailed,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Enqueued => "enq",
            Kind::Fired => "fired",
            Kind::Acked => "ack",
            Kind::Failed => "fail",
            Kind::Dead => "dead",
            Kind::JobFired => "jobs",
            Kind::RunFailed => "runfail",
        }
    }
}

/// A sampled value (the last one set in a bucket wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    /// Pending items of a family.
    Depth,
    /// The oldest due item's age in a family, ms.
    OldestDueAgeMs,
    /// Live workers (scope `""`).
    Workers,
}

impl Gauge {
    fn code(self) -> &'static str {
        match self {
            Gauge::Depth => "depth",
            Gauge::OldestDueAgeMs => "age",
            Gauge::Workers => "workers",
        }
    }
}

// Field names inside a bucket's hash: `c|<kind>|<family>`, `g|<gauge>|<family>`,
// `l|<bin>|<family>`. A family never holds '|' (`limits::check_handler`).
fn counter_field(kind: Kind, family: &str) -> String {
    let mut s = String::new();
    write_counter_field(&mut s, kind, family);
    s
}
/// Writes [`counter_field`] into `out` (the recorder's per-thread buffer).
fn write_counter_field(out: &mut String, kind: Kind, family: &str) {
    let _ = write!(out, "c|{}|{family}", kind.code());
}
/// Writes the field of one fire lag in bin `bin` into `out`.
fn write_lag_field(out: &mut String, bin: u32, family: &str) {
    let _ = write!(out, "l|{bin}|{family}");
}
fn gauge_field(g: Gauge, family: &str) -> String {
    format!("g|{}|{family}", g.code())
}

/// The lag bin of `ms`.
fn lag_bin(ms: u64) -> u32 {
    if ms < 1 {
        return 0;
    }
    let b = ((ms as f64).ln() / LAG_RATIO.ln()).floor() as u32 + 1;
    b.min(LAG_BINS - 1)
}

/// The value a bin stands for: its geometric middle (0 for bin 0).
fn lag_bin_value(bin: u32) -> f64 {
    if bin == 0 {
        return 0.0;
    }
    LAG_RATIO.powf(f64::from(bin - 1) + 0.5)
}

/// One bucket's changes: increments and gauge values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Field → amount to add.
    pub add: BTreeMap<String, i64>,
    /// Field → value to set.
    pub set: BTreeMap<String, i64>,
}

impl Delta {
    fn merge(&mut self, other: Delta) {
        for (k, v) in other.add {
            *self.add.entry(k).or_default() += v;
        }
        for (k, v) in other.set {
            // `other` is what a failed write put back: a gauge set since wins.
            self.set.entry(k).or_insert(v);
        }
    }
}

/// Pending changes by bucket start, until the flusher takes them.
#[derive(Debug)]
pub struct Recorder {
    clock: Arc<dyn Clock>,
    enabled: AtomicBool,
    pending: Mutex<BTreeMap<i64, Delta>>,
}

impl Recorder {
    /// A recorder reading `clock`, off until [`Recorder::enable`].
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            enabled: AtomicBool::new(false),
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts keeping what call sites record.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    fn on(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Applies `f` to the current bucket. Callers build field names before, so the
    /// lock every poller shares is held for a map update only.
    fn with_bucket(&self, f: impl FnOnce(&mut Delta)) {
        let bucket = bucket_of(self.clock.now_ms());
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        f(p.entry(bucket).or_default());
        // Bounded even when nothing flushes (a store down for long): the oldest
        // buckets go first, as they would expire anyway.
        while p.len() > KEEP_BUCKETS {
            p.pop_first();
        }
    }

    /// Adds `n` to `kind` of `family`.
    pub fn add(&self, family: &str, kind: Kind, n: u64) {
        if n == 0 || !self.on() {
            return;
        }
        self.bump(|b| write_counter_field(b, kind, family), n as i64);
    }

    /// Adds `n` to `field` in the current bucket. The name is written into a
    /// per-thread buffer and copied only when the bucket lacks it: a delivery records
    /// two or three events, and an allocation each was a measurable share of the
    /// worker's time at 100k items/s.
    fn bump(&self, field: impl FnOnce(&mut String), n: i64) {
        thread_local! {
            static FIELD: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        FIELD.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            field(&mut buf);
            self.with_bucket(|d| match d.add.get_mut(buf.as_str()) {
                Some(v) => *v += n,
                None => {
                    d.add.insert(buf.clone(), n);
                }
            });
        });
    }

    /// Records one fire lag of `family`.
    pub fn lag(&self, family: &str, ms: u64) {
        if !self.on() {
            return;
        }
        self.bump(|b| write_lag_field(b, lag_bin(ms), family), 1);
    }

    /// Sets gauge `g` of `family` in the current bucket.
    pub fn gauge(&self, family: &str, g: Gauge, value: i64) {
        if !self.on() {
            return;
        }
        let field = gauge_field(g, family);
        self.with_bucket(|d| {
            d.set.insert(field, value);
        });
    }

    /// Takes everything recorded so far.
    pub fn take(&self) -> BTreeMap<i64, Delta> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back what could not be written (merged under anything newer).
    pub fn put_back(&self, old: BTreeMap<i64, Delta>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (b, d) in old {
            p.entry(b).or_default().merge(d);
        }
        while p.len() > KEEP_BUCKETS {
            p.pop_first();
        }
    }
}

/// The start of the bucket holding `ms`.
pub fn bucket_of(ms: i64) -> i64 {
    ms.div_euclid(BUCKET_MS) * BUCKET_MS
}

/// The process's recorder (system clock).
pub fn global() -> &'static Recorder {
    static G: OnceLock<Recorder> = OnceLock::new();
    G.get_or_init(|| Recorder::new(Arc::new(SystemClock)))
}

/// Turns the process's recorder on (the binary does, with a flusher).
pub fn enable() {
    global().enable();
}

/// [`Recorder::add`] on the process's recorder.
pub fn add(family: &str, kind: Kind, n: u64) {
    global().add(family, kind, n);
}

/// [`Recorder::lag`] on the process's recorder.
pub fn lag(family: &str, ms: u64) {
    global().lag(family, ms);
}

/// [`Recorder::gauge`] on the process's recorder.
pub fn gauge(family: &str, g: Gauge, value: i64) {
    global().gauge(family, g, value);
}

/// Where buckets are kept: Redis or memory, the same behaviour.
#[async_trait::async_trait]
pub trait HistoryStore: Send + Sync + std::fmt::Debug {
    /// Applies the changes of each bucket (by bucket start).
    async fn write(&self, deltas: &BTreeMap<i64, Delta>) -> Result<()>;
    /// The stored buckets whose start is in `from_ms..to_ms`, oldest first.
    async fn read(&self, from_ms: i64, to_ms: i64) -> Result<Vec<(i64, HashMap<String, i64>)>>;
}

/// Buckets in memory (`chime dev`, tests): at most [`KEEP_BUCKETS`] (+1 open), each
/// dropped [`KEEP_MS`] after its start by the injected clock.
#[derive(Debug)]
pub struct MemoryHistory {
    clock: Arc<dyn Clock>,
    buckets: Mutex<BTreeMap<i64, HashMap<String, i64>>>,
}

impl MemoryHistory {
    /// An empty history reading `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            buckets: Mutex::new(BTreeMap::new()),
        }
    }

    fn expire(&self, b: &mut BTreeMap<i64, HashMap<String, i64>>) {
        let cutoff = self.clock.now_ms() - KEEP_MS;
        b.retain(|start, _| *start > cutoff);
        while b.len() > KEEP_BUCKETS + 1 {
            b.pop_first();
        }
    }

    /// Buckets held (for the bounded-memory test).
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait::async_trait]
impl HistoryStore for MemoryHistory {
    async fn write(&self, deltas: &BTreeMap<i64, Delta>) -> Result<()> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        for (start, d) in deltas {
            let h = b.entry(*start).or_default();
            for (k, v) in &d.add {
                *h.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &d.set {
                h.insert(k.clone(), *v);
            }
        }
        self.expire(&mut b);
        Ok(())
    }

    async fn read(&self, from_ms: i64, to_ms: i64) -> Result<Vec<(i64, HashMap<String, i64>)>> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut b);
        Ok(b.range(from_ms..to_ms)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }
}

/// Buckets in Redis: one hash per bucket, `{<prefix>:hist}:<bucket start ms>`, all
/// under one hash tag (Redis Cluster: one slot, one pipeline), each expiring
/// [`KEEP_MS`] after its start (`PEXPIREAT`, Redis's clock).
#[derive(Debug, Clone)]
pub struct RedisHistory {
    conn: RedisConn,
    tag: String,
}

impl RedisHistory {
    /// The history of the deployment whose queue keys start with `prefix`.
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Self {
            conn,
            tag: format!("{{{prefix}:hist}}"),
        }
    }

    fn key(&self, start: i64) -> String {
        format!("{}:{start}", self.tag)
    }
}

#[async_trait::async_trait]
impl HistoryStore for RedisHistory {
    async fn write(&self, deltas: &BTreeMap<i64, Delta>) -> Result<()> {
        let mut pipe = redis::pipe();
        for (start, d) in deltas {
            let key = self.key(*start);
            for (k, v) in &d.add {
                pipe.hincr(&key, k, *v).ignore();
            }
            if !d.set.is_empty() {
                let pairs: Vec<(&String, &i64)> = d.set.iter().collect();
                pipe.hset_multiple(&key, &pairs).ignore();
            }
            pipe.cmd("PEXPIREAT")
                .arg(&key)
                .arg(start + KEEP_MS)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn read(&self, from_ms: i64, to_ms: i64) -> Result<Vec<(i64, HashMap<String, i64>)>> {
        let starts: Vec<i64> = (0..)
            .map(|i| bucket_of(from_ms) + i * BUCKET_MS)
            .skip_while(|s| *s < from_ms)
            .take_while(|s| *s < to_ms)
            .take(KEEP_BUCKETS + 1)
            .collect();
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for s in &starts {
            pipe.hgetall(self.key(*s));
        }
        let mut conn = self.conn.clone();
        let maps: Vec<HashMap<String, i64>> = pipe.query_async(&mut conn).await?;
        Ok(starts
            .into_iter()
            .zip(maps)
            .filter(|(_, m)| !m.is_empty())
            .collect())
    }
}

/// Moves what `rec` holds into `store` every [`FLUSH_EVERY`] until `shutdown`, then
/// once more. A failed write is put back and tried again (bounded by the recorder).
pub async fn flush(
    rec: &'static Recorder,
    store: Arc<dyn HistoryStore>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut shutdown => true,
        };
        flush_once(rec, store.as_ref()).await;
        if stopping {
            return;
        }
    }
}

/// One flush: take, write, put back on failure.
pub async fn flush_once(rec: &Recorder, store: &dyn HistoryStore) {
    let taken = rec.take();
    if taken.is_empty() {
        return;
    }
    if let Err(e) = store.write(&taken).await {
        tracing::warn!(error = %e, "cannot write the activity history; keeping it for the next try");
        rec.put_back(taken);
    }
}

/// The series `/api/history` answers, oldest first. Counters of a missing bucket
/// are 0; gauges and lags of a bucket without any are `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct History {
    /// The family the item series are of.
    pub family: String,
    /// Bucket width, ms.
    pub bucket_ms: i64,
    /// Start of each 10-s bucket (Unix ms).
    pub t: Vec<i64>,
    /// Items enqueued per second.
    pub enqueued_per_s: Vec<f64>,
    /// Items fired per second.
    pub fired_per_s: Vec<f64>,
    /// Items failed (retried or dead-lettered) per second.
    pub failed_per_s: Vec<f64>,
    /// Items dead-lettered per second.
    pub dead_per_s: Vec<f64>,
    /// The 99th percentile of fire lag in the bucket, ms.
    pub lag_p99_ms: Vec<Option<f64>>,
    /// Pending items (sampled).
    pub depth: Vec<Option<i64>>,
    /// The oldest due item's age, ms (sampled).
    pub oldest_due_age_ms: Vec<Option<i64>>,
    /// Live workers (sampled).
    pub workers: Vec<Option<i64>>,
    /// Start of each minute (Unix ms).
    pub minute_t: Vec<i64>,
    /// Job runs started per minute.
    pub job_fires_per_min: Vec<i64>,
    /// Job runs failed per minute.
    pub runs_failed_per_min: Vec<i64>,
    /// Items enqueued, fired and failed in the whole window.
    pub totals: Totals,
}

/// Sums over the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Items enqueued.
    pub enqueued: i64,
    /// Items fired.
    pub fired: i64,
    /// Items acked.
    pub acked: i64,
    /// Items failed.
    pub failed: i64,
    /// Job runs started.
    pub job_fires: i64,
    /// Job runs failed.
    pub runs_failed: i64,
}

impl History {
    /// The series of `family` over the `minutes` before `now_ms`, from the stored
    /// `buckets`. The open bucket (holding `now_ms`) is left out: its rates would
    /// read low.
    pub fn build(
        family: &str,
        now_ms: i64,
        minutes: u32,
        buckets: &[(i64, HashMap<String, i64>)],
    ) -> Self {
        let end = bucket_of(now_ms);
        let n = (i64::from(minutes) * 60_000 / BUCKET_MS).max(1);
        let start = end - n * BUCKET_MS;
        let by: HashMap<i64, &HashMap<String, i64>> =
            buckets.iter().map(|(s, m)| (*s, m)).collect();
        let empty = HashMap::new();
        let secs = BUCKET_MS as f64 / 1000.0;
        let mut h = History {
            family: family.to_owned(),
            bucket_ms: BUCKET_MS,
            t: Vec::new(),
            enqueued_per_s: Vec::new(),
            fired_per_s: Vec::new(),
            failed_per_s: Vec::new(),
            dead_per_s: Vec::new(),
            lag_p99_ms: Vec::new(),
            depth: Vec::new(),
            oldest_due_age_ms: Vec::new(),
            workers: Vec::new(),
            minute_t: Vec::new(),
            job_fires_per_min: Vec::new(),
            runs_failed_per_min: Vec::new(),
            totals: Totals::default(),
        };
        let mut minutes_map: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        let mut m = start.div_euclid(60_000) * 60_000;
        while m < end {
            minutes_map.insert(m, (0, 0));
            m += 60_000;
        }
        let mut s = start;
        while s < end {
            let b = by.get(&s).copied().unwrap_or(&empty);
            let c = |k: Kind, f: &str| b.get(&counter_field(k, f)).copied().unwrap_or(0);
            let g = |k: Gauge, f: &str| b.get(&gauge_field(k, f)).copied();
            let (enq, fired, acked, failed, dead) = (
                c(Kind::Enqueued, family),
                c(Kind::Fired, family),
                c(Kind::Acked, family),
                c(Kind::Failed, family),
                c(Kind::Dead, family),
            );
            let (jobs, runfail) = (c(Kind::JobFired, ""), c(Kind::RunFailed, ""));
            h.t.push(s);
            h.enqueued_per_s.push(enq as f64 / secs);
            h.fired_per_s.push(fired as f64 / secs);
            h.failed_per_s.push(failed as f64 / secs);
            h.dead_per_s.push(dead as f64 / secs);
            h.lag_p99_ms.push(p99(b, family));
            h.depth.push(g(Gauge::Depth, family));
            h.oldest_due_age_ms.push(g(Gauge::OldestDueAgeMs, family));
            h.workers.push(g(Gauge::Workers, ""));
            h.totals.enqueued += enq;
            h.totals.fired += fired;
            h.totals.acked += acked;
            h.totals.failed += failed;
            h.totals.job_fires += jobs;
            h.totals.runs_failed += runfail;
            let e = minutes_map
                .entry(s.div_euclid(60_000) * 60_000)
                .or_default();
            e.0 += jobs;
            e.1 += runfail;
            s += BUCKET_MS;
        }
        for (m, (jobs, fails)) in minutes_map {
            h.minute_t.push(m);
            h.job_fires_per_min.push(jobs);
            h.runs_failed_per_min.push(fails);
        }
        h
    }
}

/// The 99th percentile lag of `family` in one bucket (None: no fires).
fn p99(b: &HashMap<String, i64>, family: &str) -> Option<f64> {
    let suffix = format!("|{family}");
    let mut bins: Vec<(u32, i64)> = b
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("l|")?.strip_suffix(suffix.as_str())?;
            Some((rest.parse().ok()?, *v))
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    let total: i64 = bins.iter().map(|(_, v)| v).sum();
    if total == 0 {
        return None;
    }
    bins.sort_unstable();
    // The smallest bin by which at least 99 % of the fires are counted.
    let need = (total as f64 * 0.99).ceil() as i64;
    let mut seen = 0;
    for (bin, v) in bins {
        seen += v;
        if seen >= need {
            return Some((lag_bin_value(bin) * 10.0).round() / 10.0);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const T0: i64 = 1_700_000_000_000;

    fn recorder(clock: &ManualClock) -> Recorder {
        let r = Recorder::new(Arc::new(clock.clone()));
        r.enable();
        r
    }

    #[test]
    fn a_disabled_recorder_keeps_nothing() {
        let r = Recorder::new(Arc::new(ManualClock::new(T0)));
        r.add("default", Kind::Fired, 3);
        r.lag("default", 5);
        assert!(r.take().is_empty());
    }

    #[test]
    fn counts_land_in_the_bucket_of_their_instant() {
        let clock = ManualClock::new(T0 + 1_000);
        let r = recorder(&clock);
        r.add("default", Kind::Enqueued, 2);
        r.add("default", Kind::Enqueued, 3);
        clock.advance(BUCKET_MS);
        r.add("default", Kind::Enqueued, 7);
        r.add("other", Kind::Enqueued, 1);
        let taken = r.take();
        let b0 = bucket_of(T0 + 1_000);
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[&b0].add["c|enq|default"], 5);
        assert_eq!(taken[&(b0 + BUCKET_MS)].add["c|enq|default"], 7);
        assert_eq!(taken[&(b0 + BUCKET_MS)].add["c|enq|other"], 1);
        assert!(r.take().is_empty(), "take empties the recorder");
    }

    #[test]
    fn a_gauge_keeps_its_last_value_and_a_put_back_keeps_the_newer() {
        let clock = ManualClock::new(T0);
        let r = recorder(&clock);
        r.gauge("default", Gauge::Depth, 5);
        r.gauge("default", Gauge::Depth, 9);
        r.add("default", Kind::Fired, 2);
        let old = r.take();
        assert_eq!(old[&bucket_of(T0)].set["g|depth|default"], 9);
        // Meanwhile (the write failed): a newer depth, more fires.
        r.gauge("default", Gauge::Depth, 1);
        r.add("default", Kind::Fired, 3);
        r.put_back(old);
        let now = r.take();
        let b = &now[&bucket_of(T0)];
        assert_eq!(b.set["g|depth|default"], 1, "the newer gauge wins");
        assert_eq!(b.add["c|fired|default"], 5, "counts add up");
    }

    #[test]
    fn the_recorder_is_bounded_when_nothing_flushes() {
        let clock = ManualClock::new(T0);
        let r = recorder(&clock);
        for _ in 0..(KEEP_BUCKETS + 50) {
            r.add("default", Kind::Fired, 1);
            clock.advance(BUCKET_MS);
        }
        let taken = r.take();
        assert_eq!(taken.len(), KEEP_BUCKETS);
        let first = *taken.keys().next().expect("buckets");
        assert_eq!(
            first,
            bucket_of(T0) + 50 * BUCKET_MS,
            "the oldest went first"
        );
    }

    #[test]
    fn lag_bins_give_a_p99_within_a_few_percent() {
        for true_ms in [1u64, 7, 42, 250, 1_000, 12_345, 600_000] {
            let v = lag_bin_value(lag_bin(true_ms));
            let err = (v - true_ms as f64).abs() / true_ms as f64;
            assert!(
                err < 0.03,
                "{true_ms} ms read as {v} ({:.1} %)",
                err * 100.0
            );
        }
        // 1000 fires: 985 at 10 ms, 15 at 800 ms: the p99 is 800 ms.
        let clock = ManualClock::new(T0);
        let r = recorder(&clock);
        for i in 0..1000 {
            r.lag("default", if i < 985 { 10 } else { 800 });
        }
        let taken = r.take();
        let bucket: HashMap<String, i64> = taken[&bucket_of(T0)].add.clone().into_iter().collect();
        let p = p99(&bucket, "default").expect("a p99");
        assert!((p - 800.0).abs() / 800.0 < 0.03, "p99 {p}");
        assert_eq!(p99(&bucket, "other"), None);
    }

    #[test]
    fn history_builds_rates_minutes_gauges_and_leaves_out_the_open_bucket() {
        let end = bucket_of(T0);
        let b = |s: i64, kv: &[(&str, i64)]| {
            (s, kv.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
        };
        let buckets = vec![
            b(
                end - 2 * BUCKET_MS,
                &[
                    ("c|enq|default", 50),
                    ("c|jobs|", 2),
                    ("g|depth|default", 9),
                ],
            ),
            b(
                end - BUCKET_MS,
                &[("c|fail|default", 10), ("c|runfail|", 1), ("g|workers|", 3)],
            ),
            b(end, &[("c|enq|default", 1000)]),
        ];
        let h = History::build("default", T0, 1, &buckets);
        assert_eq!(h.t.len(), 6);
        assert_eq!(h.t.last(), Some(&(end - BUCKET_MS)));
        assert_eq!(h.enqueued_per_s[4], 5.0);
        assert_eq!(h.failed_per_s[5], 1.0);
        assert_eq!(h.depth[4], Some(9));
        assert_eq!(h.depth[5], None);
        assert_eq!(h.workers[5], Some(3));
        assert_eq!(h.totals.enqueued, 50, "the open bucket is left out");
        assert_eq!(h.job_fires_per_min.iter().sum::<i64>(), 2);
        assert_eq!(h.runs_failed_per_min.iter().sum::<i64>(), 1);
        assert!(h.lag_p99_ms.iter().all(Option::is_none));
    }

    #[tokio::test]
    async fn a_failed_write_is_put_back() {
        #[derive(Debug)]
        struct Down;
        #[async_trait::async_trait]
        impl HistoryStore for Down {
            async fn write(&self, _: &BTreeMap<i64, Delta>) -> Result<()> {
                Err(crate::Error::Unavailable("down".into()))
            }
            async fn read(&self, _: i64, _: i64) -> Result<Vec<(i64, HashMap<String, i64>)>> {
                Ok(Vec::new())
            }
        }
        let clock = ManualClock::new(T0);
        let r = recorder(&clock);
        r.add("default", Kind::Acked, 4);
        flush_once(&r, &Down).await;
        r.add("default", Kind::Acked, 1);
        let mem = MemoryHistory::new(Arc::new(clock.clone()));
        flush_once(&r, &mem).await;
        let got = mem
            .read(T0 - BUCKET_MS, T0 + BUCKET_MS)
            .await
            .expect("read");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1["c|ack|default"], 5);
    }
}
