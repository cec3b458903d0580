//! `chime demo coupon-reminder`: users subscribe to coupon reminders over a
//! simulated day, 10 % cancel, 2 % re-subscribe; a user with two coupons opening
//! within the merge window gets one merged reminder; every reminder must fire in
//! the minute before its coupon opens, pushed to the fake provider.
//!
//! Time: the day of subscriptions is compressed into the wall window before the
//! coupons' reminders fall due, but the rules are kept on the wall clock: at full
//! scale the reminder lead and the merge window are the real 60 s; at small scale
//! (CI) both are scaled to 10 s so that merged and unmerged pairs fit in a minute.
//! Coupons open in pairs (the second 0.5 lead after the first, so their reminders
//! merge), pairs two leads apart (so a user's coupons from different pairs do not).
//! All of a user's subscribe / cancel / re-subscribe events happen before their
//! first reminder is due, so what should merge is known in advance.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use chime_shared::clock::system_now_ms;
use chime_shared::queue::{CancelOutcome, DelayStore, EnqueueOutcome, ItemRef, NewItem};
use chime_worker::{HandlerError, ItemContext, WorkerBuilder};
use futures_util::future::join_all;
use serde_json::json;

use super::provider::{Provider, PushRequest, quantile};
use super::worker::WorkerCtx;
use super::{Common, Demo, Scale, Scenario, WorkerTuning, check, round2};

/// The reminder handler.
const HANDLER: &str = "coupon.remind";
/// Events of one user end this long before their first reminder is due.
const MARGIN_MS: i64 = 2_000;

struct Plan {
    users: u32,
    /// Reminder lead before the coupon opens, and the merge window.
    lead_ms: i64,
    /// From the start to the first reminder's due time.
    first_due_after_ms: i64,
    /// Due time of each coupon's reminders, after the first.
    offsets_ms: Vec<i64>,
}

fn plan(scale: Scale) -> Plan {
    match scale {
        Scale::Small => Plan {
            users: 20_000,
            lead_ms: 10_000,
            first_due_after_ms: 12_000,
            offsets_ms: vec![0, 5_000, 20_000, 25_000],
        },
        Scale::Full => Plan {
            users: 200_000,
            lead_ms: 60_000,
            first_due_after_ms: 45_000,
            offsets_ms: (0..4)
                .flat_map(|p| [p * 120_000, p * 120_000 + 30_000])
                .collect(),
        },
    }
}

/// The worker side: one provider push per delivery (one reminder, or one merged
/// reminder naming every coupon of the delivery).
pub(crate) fn handlers(b: WorkerBuilder, ctx: &WorkerCtx) -> WorkerBuilder {
    let pusher = ctx.pusher.clone();
    b.handler(HANDLER, move |ictx: ItemContext| {
        let pusher = pusher.clone();
        async move {
            let user = ictx
                .item()
                .key
                .strip_prefix('u')
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| HandlerError::new("key is not u<user>"))?;
            let req = PushRequest {
                messages: ictx.items().iter().map(|i| i.id.clone()).collect(),
                users: vec![user],
            };
            pusher
                .push(&req)
                .await
                .map_err(|e| HandlerError::new(e).retry_after_ms(100 + fastrand::u64(0..200)))
        }
    })
    .handler_concurrency(HANDLER, ctx.concurrency)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Subscribe,
    Cancel,
    Resubscribe,
}

#[derive(Debug, Clone, Copy)]
struct Event {
    at_ms: i64,
    kind: Kind,
    user: u32,
    coupon: usize,
}

fn item_id(coupon: usize, user: u32) -> String {
    format!("c{coupon}:u{user}")
}

fn item(coupon: usize, user: u32, due_ms: i64) -> NewItem {
    let key = format!("u{user}");
    NewItem::new(item_id(coupon, user), HANDLER, due_ms)
        .key(key.clone())
        .merge_key(key)
        .max_attempts(10)
}

pub(crate) async fn run(c: Common) -> Result<()> {
    let p = plan(c.scale);
    let k = p.offsets_ms.len();
    let mut demo = Demo::open(c.clone(), "coupon-reminder", 32).await?;
    let provider =
        Provider::start(c.latency_ms.unwrap_or(20), c.failure_rate.unwrap_or(0.01)).await?;
    // The merge window is a live setting of the queue family; the reminder lead is
    // the producer's choice. Both are the same rule: "within the minute".
    demo.put_setting("queues/default/merge_window_ms", &p.lead_ms.to_string())
        .await?;
    let tuning = WorkerTuning {
        concurrency: 64,
        // Room for a whole burst of reminders due in the same second, so the burst
        // is popped in big batches while the provider calls run.
        max_in_flight: (p.users as usize / 10).max(8_000),
        batch: 2_000,
    };
    demo.start_workers(Scenario::CouponReminder, &provider.url(), &tuning)?;

    // The plan of the day, on the wall clock.
    let t0 = system_now_ms() + 1_000;
    let first_due = t0 + p.first_due_after_ms;
    let due: Vec<i64> = p.offsets_ms.iter().map(|o| first_due + o).collect();
    let open: Vec<i64> = due.iter().map(|d| d + p.lead_ms).collect();
    let last_due = due.iter().copied().max().unwrap_or(first_due);
    let mut rng = fastrand::Rng::with_seed(c.seed);
    let mut events = Vec::new();
    // (user, coupon) → (subscribed, cancelled, re-subscribed)
    let mut subs: HashMap<(u32, usize), (bool, bool, bool)> = HashMap::new();
    let mut user_coupons: Vec<Vec<usize>> = Vec::with_capacity(p.users as usize);
    for user in 0..p.users {
        let first = rng.usize(0..k);
        let mut coupons = vec![first];
        let r = rng.f64();
        if r < 0.10 {
            coupons.push(first ^ 1); // the other coupon of its pair: merges
        } else if r < 0.15 {
            coupons.push((first + 2) % k); // a coupon of another pair: does not
        }
        let deadline = coupons.iter().map(|&c| due[c]).min().unwrap_or(first_due) - MARGIN_MS;
        for &coupon in &coupons {
            let sub_at = rng.i64(t0 + 200..deadline - 400);
            events.push(Event {
                at_ms: sub_at,
                kind: Kind::Subscribe,
                user,
                coupon,
            });
            let mut state = (true, false, false);
            if rng.f64() < 0.10 {
                let cancel_at = rng.i64(sub_at + 1..deadline - 200);
                events.push(Event {
                    at_ms: cancel_at,
                    kind: Kind::Cancel,
                    user,
                    coupon,
                });
                state.1 = true;
                if rng.f64() < 0.20 {
                    events.push(Event {
                        at_ms: rng.i64(cancel_at + 1..deadline),
                        kind: Kind::Resubscribe,
                        user,
                        coupon,
                    });
                    state.2 = true;
                }
            }
            subs.insert((user, coupon), state);
        }
        user_coupons.push(coupons);
    }
    events.sort_by_key(|e| e.at_ms);
    let subscriptions = subs.len();
    let cancels = events.iter().filter(|e| e.kind == Kind::Cancel).count();
    let resubscribes = events
        .iter()
        .filter(|e| e.kind == Kind::Resubscribe)
        .count();
    // What should happen: each user's active coupons, merged when due within the
    // window of the earliest.
    let active = |user: u32, coupon: usize| -> bool {
        subs.get(&(user, coupon))
            .is_some_and(|&(s, cx, re)| s && (!cx || re))
    };
    let (mut reminders_expected, mut merged_expected, mut coupons_expected) =
        (0usize, 0usize, 0usize);
    for (user, coupons) in user_coupons.iter().enumerate() {
        let mut dues: Vec<i64> = coupons
            .iter()
            .filter(|&&c| active(user as u32, c))
            .map(|&c| due[c])
            .collect();
        dues.sort_unstable();
        coupons_expected += dues.len();
        match dues.as_slice() {
            [] => {}
            [_] => reminders_expected += 1,
            [a, b] if b - a <= p.lead_ms => {
                reminders_expected += 1;
                merged_expected += 1;
            }
            more => reminders_expected += more.len(),
        }
    }
    let burst = (0..k)
        .map(|c| subs.keys().filter(|(_, cc)| *cc == c).count())
        .max()
        .unwrap_or(0);
    eprintln!(
        "  {} users, {subscriptions} subscriptions ({cancels} cancels, {resubscribes} re-subscribes) over {:.0} s; \
         reminders due from +{:.0} s to +{:.0} s, lead and merge window {} s",
        p.users,
        (last_due - t0) as f64 / 1000.0,
        (first_due - t0) as f64 / 1000.0,
        (last_due - t0) as f64 / 1000.0,
        p.lead_ms / 1000
    );

    // The producer: plays the day's events at their instants.
    let (mut created, mut refused, mut cancelled, mut cancel_failed) =
        (0usize, 0usize, 0usize, 0usize);
    let mut producer_max_lag_ms = 0i64;
    let mut i = 0;
    let mut next_report = t0;
    while i < events.len() {
        let now = system_now_ms();
        if events[i].at_ms > now {
            let wait = (events[i].at_ms - now).min(50) as u64;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            continue;
        }
        let end = events[i..]
            .iter()
            .position(|e| e.at_ms > now)
            .map_or(events.len(), |n| i + n);
        producer_max_lag_ms = producer_max_lag_ms.max(now - events[i].at_ms);
        // Runs of one kind keep each item's own order (subscribe, cancel, again).
        let mut j = i;
        while j < end {
            let cancel = events[j].kind == Kind::Cancel;
            let run_end = events[j..end]
                .iter()
                .position(|e| (e.kind == Kind::Cancel) != cancel)
                .map_or(end, |n| j + n);
            let run = &events[j..run_end];
            if cancel {
                let outcomes = join_all(run.iter().map(|e| {
                    let r = ItemRef::with_key(format!("u{}", e.user), item_id(e.coupon, e.user));
                    let store = demo.store.clone();
                    async move { store.cancel(&r).await }
                }))
                .await;
                for o in outcomes {
                    match o? {
                        CancelOutcome::Cancelled => cancelled += 1,
                        _ => cancel_failed += 1,
                    }
                }
            } else {
                let items = run
                    .iter()
                    .map(|e| item(e.coupon, e.user, due[e.coupon]))
                    .collect();
                for o in demo.store.enqueue(items).await? {
                    match o {
                        EnqueueOutcome::Created => created += 1,
                        EnqueueOutcome::Duplicate => refused += 1,
                    }
                }
            }
            j = run_end;
        }
        i = end;
        if now >= next_report {
            demo.check_alive()?;
            eprintln!(
                "  +{:>4.0} s: {created} subscribed, {cancelled} cancelled, {} pushes accepted",
                (now - t0) as f64 / 1000.0,
                provider.counts().0 - provider.counts().1
            );
            next_report = now + 10_000;
        }
    }

    // Wait for the last reminders and an empty queue.
    let deadline = Instant::now()
        + Duration::from_millis((last_due - system_now_ms()).max(0) as u64 + p.lead_ms as u64)
        + Duration::from_secs(30);
    loop {
        demo.check_alive()?;
        let now = system_now_ms();
        if now > last_due + 500 && demo.queue_left().await? == 0 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("  warning: reminders still pending at the deadline");
            break;
        }
        if now >= next_report {
            eprintln!(
                "  +{:>4.0} s: {} pushes accepted",
                (now - t0) as f64 / 1000.0,
                provider.counts().0 - provider.counts().1
            );
            next_report = now + 10_000;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A late duplicate would arrive within a visibility timeout; one second is
    // enough to see a double settle or a handler running twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead = demo.dead_letters().await?;
    let provider_info = provider.describe();
    let log = provider.finish().await;

    // Score from what the provider accepted.
    let mut delivered: HashMap<(u32, usize), u32> = HashMap::new();
    let (mut fired, mut merged, mut late, mut early, mut malformed) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut lags = Vec::new();
    for a in &log.accepted {
        let [user] = a.users[..] else {
            malformed += 1;
            continue;
        };
        let mut coupons = Vec::new();
        for m in &a.messages {
            let parsed = m
                .strip_prefix('c')
                .and_then(|r| r.split_once(":u"))
                .and_then(|(c, u)| Some((c.parse::<usize>().ok()?, u.parse::<u64>().ok()?)));
            match parsed {
                Some((c, u)) if u == user && c < k => coupons.push(c),
                _ => malformed += 1,
            }
        }
        let Some(first_open) = coupons.iter().map(|&c| open[c]).min() else {
            continue;
        };
        fired += 1;
        if coupons.len() > 1 {
            merged += 1;
        }
        // On time: in the minute (lead) before the earliest coupon of the reminder
        // opens — which is before every coupon it names opens.
        let (is_late, is_early) = (a.at_ms >= first_open, a.at_ms < first_open - p.lead_ms);
        if (is_late || is_early) && late + early < 5 {
            // A few examples make a failed run diagnosable from its output alone.
            eprintln!(
                "  off-window reminder: {:?} to user {user} at {} ms, due {} ms, opens {} ms",
                a.messages,
                a.at_ms,
                first_open - p.lead_ms,
                first_open
            );
        }
        late += usize::from(is_late);
        early += usize::from(is_early);
        lags.push(a.at_ms - (first_open - p.lead_ms));
        for c in coupons {
            *delivered.entry((user as u32, c)).or_default() += 1;
        }
    }
    lags.sort_unstable();
    let (mut lost, mut duplicated, mut fired_after_cancel, mut coupons_reminded) =
        (0usize, 0u64, 0usize, 0usize);
    for &(user, coupon) in subs.keys() {
        let n = delivered.get(&(user, coupon)).copied().unwrap_or(0);
        if active(user, coupon) {
            if n == 0 {
                lost += 1;
            } else {
                coupons_reminded += 1;
            }
        } else if n > 0 {
            fired_after_cancel += 1;
        }
        duplicated += u64::from(n.saturating_sub(1));
    }
    let day_wall_s = (last_due - t0) as f64 / 1000.0;
    let result = json!({
        "users": p.users,
        "coupons": k,
        "subscriptions": subscriptions,
        "cancelled": cancelled,
        "resubscribed": resubscribes,
        "reminders_expected": reminders_expected,
        "fired": fired,
        "coupons_reminded": coupons_reminded,
        "coupons_expected": coupons_expected,
        "merged": merged,
        "merged_expected": merged_expected,
        "late": late,
        "early": early,
        "lost": lost,
        "duplicated": duplicated,
        "fired_after_cancel": fired_after_cancel,
        "largest_burst": burst,
        "lag_after_due_ms": {"p50": quantile(&lags, 0.5), "p99": quantile(&lags, 0.99), "max": lags.last().copied().unwrap_or(0)},
        "time": {
            "simulated_day_wall_s": round2(day_wall_s),
            "compression": round2(86_400.0 / day_wall_s),
            "reminder_lead_s": p.lead_ms / 1000,
            "merge_window_s": p.lead_ms / 1000,
            "rules": if p.lead_ms == 60_000 { "real: 60 s lead and merge window" } else { "scaled for CI: lead and merge window 10 s instead of 60 s" },
        },
        "producer": {"created": created, "duplicate_refused": refused, "cancel_not_cancelled": cancel_failed, "max_lag_ms": producer_max_lag_ms},
        "dead_letters": dead,
        "provider": provider_info,
    });
    let mut f = Vec::new();
    check(&mut f, lost == 0, format!("{lost} reminders lost"));
    check(
        &mut f,
        duplicated == 0,
        format!("{duplicated} reminders duplicated"),
    );
    check(
        &mut f,
        late == 0,
        format!("{late} reminders fired after their coupon opened"),
    );
    check(
        &mut f,
        early == 0,
        format!("{early} reminders fired before the minute before their coupon"),
    );
    check(
        &mut f,
        fired_after_cancel == 0,
        format!("{fired_after_cancel} cancelled reminders fired"),
    );
    check(
        &mut f,
        merged == merged_expected,
        format!("{merged} merged reminders, {merged_expected} expected"),
    );
    check(
        &mut f,
        fired == reminders_expected,
        format!("{fired} reminders fired, {reminders_expected} expected"),
    );
    check(
        &mut f,
        cancel_failed == 0 && refused == 0,
        format!("{cancel_failed} cancels too late, {refused} subscriptions refused"),
    );
    check(
        &mut f,
        malformed == 0,
        format!("{malformed} malformed pushes"),
    );
    check(&mut f, dead == 0, format!("{dead} dead letters"));
    demo.finish(result, f).await
}
