//! `chime demo segment-notify`: users carry segment tags ("1", "11", "111", "21",
//! "vip", …) and an order history; notifications go to a segment by exact tag match
//! (segment "1" never reaches a user tagged only "11" — the `LIKE '%1%'` trap), and
//! one goes to users with more than 2 orders in the last two days. Each notification
//! is a run of a sharding-broadcast job: every shard scans its blocks of users in
//! Redis and enqueues one item per member, id `n:<notification>:<user>`, due at the
//! campaign's send time. The id makes the enqueue idempotent while the item waits,
//! so a notification sent twice (a double click, a retried shard) still reaches each
//! member once; the order rule is evaluated per user, so a user with five recent
//! orders gets one message, not five. The demo sends the order-based notification
//! twice to prove it.
//!
//! Time: orders are data with simulated timestamps (the "two days" is the data's
//! own clock); the send time is on the wall clock a few seconds after the scans.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use chime_shared::clock::system_now_ms;
use chime_shared::queue::{EnqueueOutcome, NewItem};
use chime_worker::{HandlerError, ItemContext, JobContext, WorkerBuilder};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::provider::{Provider, PushRequest, quantile};
use super::worker::WorkerCtx;
use super::{Common, Demo, Scale, Scenario, WorkerTuning, check, round2};

/// The job handler: scans a shard's users.
const SCAN: &str = "segment.scan";
/// The item handler: sends one notification to one user.
const SEND: &str = "segment.send";
const JOB: &str = "segment-notify";
/// Users per Redis hash.
const BLOCK: u64 = 1_000;
/// Tags and the share of users carrying each.
const TAGS: [(&str, f64); 7] = [
    ("1", 0.25),
    ("11", 0.15),
    ("111", 0.05),
    ("21", 0.10),
    ("2", 0.20),
    ("vip", 0.05),
    ("new", 0.10),
];
/// The campaign's instant on the data's clock: 2025-06-02T10:00:00Z.
const NOW_SIM_MS: i64 = 1_748_858_400_000;
const DAY_MS: i64 = 86_400_000;
/// "More than 2 orders in two days".
const MIN_ORDERS: usize = 3;
const WINDOW_MS: i64 = 2 * DAY_MS;

/// The notifications: name and segment tag (`None`: the order rule).
const NOTIFICATIONS: [(&str, Option<&str>); 4] = [
    ("seg-1", Some("1")),
    ("seg-11", Some("11")),
    ("seg-vip", Some("vip")),
    ("frequent", None),
];

/// One scan's params.
#[derive(Debug, Serialize, Deserialize)]
struct Params {
    notification: String,
    /// Exact tag of the segment; absent for the order rule.
    tag: Option<String>,
    users: u64,
    send_at_ms: i64,
    now_sim_ms: i64,
    window_ms: i64,
    min_orders: usize,
}

struct Plan {
    users: u64,
    shards: u32,
    lead_ms: i64,
    concurrency: usize,
}

fn plan(scale: Scale) -> Plan {
    match scale {
        Scale::Small => Plan {
            users: 50_000,
            shards: 4,
            lead_ms: 10_000,
            concurrency: 64,
        },
        Scale::Full => Plan {
            users: 1_000_000,
            shards: 8,
            lead_ms: 60_000,
            concurrency: 128,
        },
    }
}

fn users_key(prefix: &str, block: u64) -> String {
    format!("{prefix}:segusers:{block}")
}

/// A user as stored: `tag,tag|order_ms,order_ms`.
fn encode(tags: &[&str], orders: &[i64]) -> String {
    let o: Vec<String> = orders.iter().map(i64::to_string).collect();
    format!("{}|{}", tags.join(","), o.join(","))
}

/// Whether a stored user matches a scan: its exact tag, or the order rule.
fn matches(value: &str, p: &Params) -> bool {
    let (tags, orders) = value.split_once('|').unwrap_or((value, ""));
    match &p.tag {
        // Exact match on whole tags: "1" is not "11".
        Some(t) => tags.split(',').any(|x| x == t),
        None => {
            orders
                .split(',')
                .filter_map(|o| o.parse::<i64>().ok())
                .filter(|&o| o > p.now_sim_ms - p.window_ms && o <= p.now_sim_ms)
                .count()
                >= p.min_orders
        }
    }
}

/// The worker side.
pub(crate) fn handlers(b: WorkerBuilder, ctx: &WorkerCtx) -> WorkerBuilder {
    let (scan_ctx, pusher) = (ctx.clone(), ctx.pusher.clone());
    b.job_handler(SCAN, move |j: JobContext| {
        let ctx = scan_ctx.clone();
        async move { scan(j, ctx).await }
    })
    .handler(SEND, move |i: ItemContext| {
        let pusher = pusher.clone();
        async move {
            let item = i.item();
            let notification = item
                .id
                .strip_prefix("n:")
                .and_then(|r| r.rsplit_once(':'))
                .map(|(n, _)| n.to_owned())
                .ok_or_else(|| HandlerError::new("id is not n:<notification>:<user>"))?;
            let user = item
                .key
                .strip_prefix('u')
                .and_then(|u| u.parse::<u64>().ok())
                .ok_or_else(|| HandlerError::new("key is not u<user>"))?;
            let req = PushRequest {
                messages: vec![notification],
                users: vec![user],
            };
            pusher
                .push(&req)
                .await
                .map_err(|e| HandlerError::new(e).retry_after_ms(100 + fastrand::u64(0..200)))
        }
    })
    .handler_concurrency(SEND, ctx.concurrency)
}

/// A shard: its blocks of users (block % total == index), one item per member.
async fn scan(j: JobContext, ctx: WorkerCtx) -> Result<String, HandlerError> {
    let p: Params = serde_json::from_str(&j.params)
        .map_err(|e| HandlerError::new(format!("bad params: {e}")))?;
    let mut conn = ctx.conn.clone();
    let (mut scanned, mut matched, mut created, mut duplicate) = (0usize, 0usize, 0usize, 0usize);
    let blocks = p.users.div_ceil(BLOCK);
    for b in (u64::from(j.shard_index)..blocks).step_by(j.shard_total.max(1) as usize) {
        if j.cancellation().is_cancelled() {
            return Err(HandlerError::new("cancelled"));
        }
        let users: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(users_key(&ctx.prefix, b))
            .query_async(&mut conn)
            .await
            .map_err(|e| HandlerError::new(format!("reading block {b}: {e}")))?;
        scanned += users.len();
        let items: Vec<NewItem> = users
            .iter()
            .filter(|(_, v)| matches(v, &p))
            .map(|(u, _)| {
                NewItem::new(format!("n:{}:{u}", p.notification), SEND, p.send_at_ms)
                    .key(format!("u{u}"))
                    .max_attempts(10)
            })
            .collect();
        matched += items.len();
        if items.is_empty() {
            continue;
        }
        for o in ctx
            .store
            .enqueue(items)
            .await
            .map_err(|e| HandlerError::new(format!("enqueue: {e}")))?
        {
            match o {
                EnqueueOutcome::Created => created += 1,
                EnqueueOutcome::Duplicate => duplicate += 1,
            }
        }
    }
    j.log(format!(
        "{}: {scanned} users scanned, {matched} members, {created} enqueued",
        p.notification
    ));
    Ok(
        json!({"scanned": scanned, "matched": matched, "created": created, "duplicate": duplicate})
            .to_string(),
    )
}

/// Sums a field of every shard's output.
fn shard_sum(run: &proto::Run, field: &str) -> u64 {
    run.shards
        .iter()
        .filter_map(|s| serde_json::from_str::<serde_json::Value>(&s.output).ok())
        .filter_map(|v| v[field].as_u64())
        .sum()
}

pub(crate) async fn run(c: Common) -> Result<()> {
    let p = plan(c.scale);
    let mut demo = Demo::open(c.clone(), "segment-notify", 16).await?;
    let provider =
        Provider::start(c.latency_ms.unwrap_or(20), c.failure_rate.unwrap_or(0.01)).await?;

    // The users: tags and orders over the last five days, written to Redis as the
    // shards will read them (one hash per block of 1,000 users).
    let load_started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(c.seed);
    let n = p.users as usize;
    let mut tag_sets: Vec<Vec<&str>> = Vec::with_capacity(n);
    let mut recent: Vec<usize> = Vec::with_capacity(n);
    let mut total_orders: Vec<usize> = Vec::with_capacity(n);
    let mut conn = demo.conn.clone();
    let mut pipe = redis::pipe();
    let mut cmd = redis::cmd("HSET");
    for u in 0..p.users {
        let tags: Vec<&str> = TAGS
            .iter()
            .filter(|(_, share)| rng.f64() < *share)
            .map(|(t, _)| *t)
            .collect();
        let k = match rng.f64() {
            x if x < 0.30 => 0,
            x if x < 0.50 => 1,
            x if x < 0.65 => 2,
            x if x < 0.80 => 3,
            x if x < 0.90 => 4,
            x if x < 0.95 => 5,
            _ => 6,
        };
        let orders: Vec<i64> = (0..k)
            .map(|_| NOW_SIM_MS - rng.i64(1..5 * DAY_MS))
            .collect();
        if u % BLOCK == 0 {
            cmd = redis::cmd("HSET");
            cmd.arg(users_key(&demo.prefix, u / BLOCK));
        }
        cmd.arg(u).arg(encode(&tags, &orders));
        recent.push(
            orders
                .iter()
                .filter(|&&o| o > NOW_SIM_MS - WINDOW_MS)
                .count(),
        );
        total_orders.push(orders.len());
        tag_sets.push(tags);
        if u % BLOCK == BLOCK - 1 || u == p.users - 1 {
            pipe.add_command(std::mem::replace(&mut cmd, redis::cmd("HSET")))
                .ignore();
            if (u / BLOCK) % 50 == 49 || u == p.users - 1 {
                pipe.query_async::<()>(&mut conn).await?;
                pipe = redis::pipe();
            }
        }
    }
    let load_s = round2(load_started.elapsed().as_secs_f64());
    // Who should get what.
    let expected: Vec<Vec<bool>> = NOTIFICATIONS
        .iter()
        .map(|(_, tag)| {
            (0..n)
                .map(|u| match tag {
                    Some(t) => tag_sets[u].contains(t),
                    None => recent[u] >= MIN_ORDERS,
                })
                .collect()
        })
        .collect();
    let members: Vec<usize> = expected
        .iter()
        .map(|e| e.iter().filter(|&&x| x).count())
        .collect();
    let expected_total: usize = members.iter().sum();
    // The traps a naive selection falls into.
    let substring_1 = (0..n)
        .filter(|&u| !tag_sets[u].contains(&"1") && tag_sets[u].iter().any(|t| t.contains('1')))
        .count();
    let substring_11 = (0..n)
        .filter(|&u| !tag_sets[u].contains(&"11") && tag_sets[u].iter().any(|t| t.contains("11")))
        .count();
    let old_orders_only = (0..n)
        .filter(|&u| total_orders[u] >= MIN_ORDERS && recent[u] < MIN_ORDERS)
        .count();
    let orders_of_frequent: usize = (0..n)
        .filter(|&u| recent[u] >= MIN_ORDERS)
        .map(|u| recent[u])
        .sum();
    eprintln!(
        "  {} users written in {load_s} s; members: {:?}",
        p.users,
        NOTIFICATIONS
            .iter()
            .map(|(x, _)| *x)
            .zip(&members)
            .collect::<Vec<_>>()
    );

    let mut admin = demo.start_coordinator().await?;
    let tuning = WorkerTuning {
        concurrency: p.concurrency,
        max_in_flight: 4_096,
        batch: 512,
    };
    demo.start_workers(Scenario::SegmentNotify, &provider.url(), &tuning)?;
    demo.wait_registered(&mut admin).await?;
    super::create_broadcast_job(&mut admin, JOB, SCAN, p.shards).await?;

    // Send: every notification for one send time; the order-based one twice.
    let triggered = system_now_ms();
    let send_at = triggered + p.lead_ms;
    let params = |name: &str, tag: Option<&str>| {
        json!(Params {
            notification: name.into(),
            tag: tag.map(str::to_owned),
            users: p.users,
            send_at_ms: send_at,
            now_sim_ms: NOW_SIM_MS,
            window_ms: WINDOW_MS,
            min_orders: MIN_ORDERS,
        })
    };
    let mut runs = Vec::new();
    for (name, tag) in NOTIFICATIONS {
        runs.push(super::trigger(&mut admin, JOB, &params(name, tag)).await?);
    }
    let scan_timeout = Duration::from_millis(p.lead_ms as u64 * 3);
    let mut first = Vec::new();
    for r in &runs {
        first.push(super::wait_run(&mut admin, r, scan_timeout).await?);
    }
    let again_id = super::trigger(&mut admin, JOB, &params("frequent", None)).await?;
    let again = super::wait_run(&mut admin, &again_id, scan_timeout).await?;
    let scans_done = first
        .iter()
        .chain([&again])
        .map(|r| r.finished_at_ms)
        .max()
        .unwrap_or(0);
    eprintln!(
        "  scans done {:.1} s after the trigger; sending at +{:.1} s",
        (scans_done - triggered) as f64 / 1000.0,
        p.lead_ms as f64 / 1000.0
    );

    let want_users = expected_total as u64;
    let timeout =
        Duration::from_millis(p.lead_ms as u64) + Duration::from_secs(60 + want_users / 500);
    let deadline = Instant::now() + timeout;
    let mut next_report = Instant::now();
    loop {
        demo.check_alive()?;
        let done = provider.users_accepted();
        if system_now_ms() > send_at && done >= want_users && demo.queue_left().await? == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("not done within {timeout:?}: {done} of {want_users} notifications accepted");
        }
        if Instant::now() >= next_report {
            eprintln!(
                "  +{:>5.1} s: {done} of {want_users} notifications accepted",
                (system_now_ms() - triggered) as f64 / 1000.0
            );
            next_report = Instant::now() + Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead = demo.dead_letters().await?;
    let provider_info = provider.describe();
    let log = provider.finish().await;

    // Score: each (notification, member) once, nobody else.
    let mut got: Vec<Vec<u8>> = vec![vec![0u8; n]; NOTIFICATIONS.len()];
    let (mut foreign, mut early) = (0u64, 0u64);
    let mut lags = Vec::new();
    for a in &log.accepted {
        let k = NOTIFICATIONS
            .iter()
            .position(|(name, _)| a.messages == [*name]);
        for &u in &a.users {
            match k {
                Some(k) if (u as usize) < n => {
                    got[k][u as usize] = got[k][u as usize].saturating_add(1);
                }
                _ => foreign += 1,
            }
        }
        if a.at_ms < send_at {
            early += 1;
        }
        lags.push(a.at_ms - send_at);
    }
    lags.sort_unstable();
    let mut per = serde_json::Map::new();
    let (mut lost, mut duplicated, mut wrong) = (0usize, 0u64, 0usize);
    for (k, (name, tag)) in NOTIFICATIONS.iter().enumerate() {
        let l = (0..n).filter(|&u| expected[k][u] && got[k][u] == 0).count();
        let d: u64 = got[k].iter().map(|&x| u64::from(x.saturating_sub(1))).sum();
        let w = (0..n).filter(|&u| !expected[k][u] && got[k][u] > 0).count();
        let reached = (0..n).filter(|&u| got[k][u] > 0).count();
        lost += l;
        duplicated += d;
        wrong += w;
        per.insert(
            (*name).into(),
            json!({
                "rule": match tag { Some(t) => format!("tag == {t:?}"), None => format!("more than {} orders in two days", MIN_ORDERS - 1) },
                "members": members[k], "reached": reached, "lost": l, "duplicated": d, "wrong_recipients": w,
            }),
        );
    }
    let resend = json!({
        "matched": shard_sum(&again, "matched"),
        "created": shard_sum(&again, "created"),
        "duplicate_refused": shard_sum(&again, "duplicate"),
    });
    let result = json!({
        "users": p.users,
        "shards": p.shards,
        "notifications": per,
        "lost": lost,
        "duplicated": duplicated,
        "wrong_recipients": wrong,
        "traps": {
            "tagged_like_1_but_not_1": substring_1,
            "tagged_like_11_but_not_11": substring_11,
            "3_plus_orders_but_not_in_two_days": old_orders_only,
            "recent_orders_of_frequent_buyers": orders_of_frequent,
        },
        "frequent_resent": resend,
        "load_s": load_s,
        "scans_s": round2((scans_done - triggered) as f64 / 1000.0),
        "scans_done_before_send": scans_done < send_at,
        "lag_after_send_ms": {"p50": quantile(&lags, 0.5), "p99": quantile(&lags, 0.99), "max": lags.last().copied().unwrap_or(0)},
        "early": early,
        "foreign": foreign,
        "dead_letters": dead,
        "provider": provider_info,
    });
    let mut f = Vec::new();
    for r in first.iter().chain([&again]) {
        check(
            &mut f,
            super::succeeded(r),
            format!("scan run {} ended {:?}", r.run_id, r.state),
        );
    }
    check(&mut f, lost == 0, format!("{lost} notifications lost"));
    check(
        &mut f,
        duplicated == 0,
        format!("{duplicated} notifications duplicated"),
    );
    check(
        &mut f,
        wrong == 0,
        format!("{wrong} notifications reached users outside their segment"),
    );
    check(&mut f, foreign == 0, format!("{foreign} unexpected pushes"));
    check(
        &mut f,
        early == 0,
        format!("{early} notifications sent before the send time"),
    );
    check(
        &mut f,
        resend["created"] == 0 && resend["duplicate_refused"] == resend["matched"],
        format!(
            "sending the order notification again enqueued {}",
            resend["created"]
        ),
    );
    check(
        &mut f,
        scans_done < send_at,
        "the scans ended after the send time",
    );
    check(&mut f, dead == 0, format!("{dead} dead letters"));
    demo.finish(result, f).await
}
