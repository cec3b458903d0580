//! `chime demo push-platform`: three push configurations of different sizes
//! (`push.small`, `push.medium`, `push.large`) start at once and share one provider
//! budget in requests per second, set in etcd the way an operator would
//! (`handlers/<h>/budget = provider`, `budgets/provider/rate_per_s = Q`). The
//! limiter splits the budget equally between the configurations that are sending,
//! and hands what a finished one no longer uses to the others, so the smallest
//! finishes first and the budget stays used until the end. Reports each
//! configuration's throughput over time, and the aggregate rate the provider saw.
//!
//! One item is one provider request of 10 users. The fake provider answers every
//! request here (no 503s by default): a failed item is retried after a backoff, and
//! a retry is due after the whole "send now" backlog ahead of it, which would
//! measure retries, not sharing (the other scenarios exercise retries).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use chime_shared::clock::system_now_ms;
use chime_shared::queue::{DelayStore, NewItem};
use chime_worker::{HandlerError, ItemContext, WorkerBuilder};
use futures_util::StreamExt;
use serde_json::json;

use super::provider::{Provider, PushRequest};
use super::worker::WorkerCtx;
use super::{Common, Demo, Scale, Scenario, WorkerTuning, check, round2};

/// The configurations, smallest first, with their relative sizes.
const CONFIGS: [(&str, u64); 3] = [("push.small", 1), ("push.medium", 2), ("push.large", 3)];
/// Users per provider request (one item).
const USERS_PER_REQUEST: u64 = 10;
/// The budget's name in etcd.
const BUDGET: &str = "provider";

struct Plan {
    /// Requests of the smallest configuration.
    unit: u64,
    /// The budget, requests per second.
    rate: f64,
    /// Throughput buckets, seconds.
    bucket_s: i64,
}

fn plan(scale: Scale) -> Plan {
    match scale {
        Scale::Small => Plan {
            unit: 1_000,
            rate: 200.0,
            bucket_s: 1,
        },
        Scale::Full => Plan {
            unit: 50_000,
            rate: 2_000.0,
            bucket_s: 5,
        },
    }
}

/// The worker side: each configuration's handler pushes its item's users.
pub(crate) fn handlers(mut b: WorkerBuilder, ctx: &WorkerCtx) -> WorkerBuilder {
    for (name, _) in CONFIGS {
        let pusher = ctx.pusher.clone();
        b = b
            .handler(name, move |i: ItemContext| {
                let pusher = pusher.clone();
                async move {
                    let item = i.item();
                    let n: u64 = std::str::from_utf8(&item.payload)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| HandlerError::new("payload is not an index"))?;
                    let req = PushRequest {
                        messages: vec![item.handler.clone()],
                        users: (n * USERS_PER_REQUEST..(n + 1) * USERS_PER_REQUEST).collect(),
                    };
                    pusher.push(&req).await.map_err(|e| {
                        HandlerError::new(e).retry_after_ms(100 + fastrand::u64(0..200))
                    })
                }
            })
            .handler_concurrency(name, ctx.concurrency);
    }
    b
}

pub(crate) async fn run(c: Common) -> Result<()> {
    let p = plan(c.scale);
    let mut demo = Demo::open(c.clone(), "push-platform", 16).await?;
    let provider =
        Provider::start(c.latency_ms.unwrap_or(50), c.failure_rate.unwrap_or(0.0)).await?;
    // The operator's settings, before the workers start (they also follow changes).
    for (name, _) in CONFIGS {
        demo.put_setting(&format!("handlers/{name}/budget"), BUDGET)
            .await?;
    }
    demo.put_setting(&format!("budgets/{BUDGET}/rate_per_s"), &p.rate.to_string())
        .await?;
    let tuning = WorkerTuning {
        concurrency: 64,
        max_in_flight: 1_024,
        batch: 256,
    };
    demo.start_workers(Scenario::PushPlatform, &provider.url(), &tuning)?;
    let sizes: Vec<u64> = CONFIGS.iter().map(|(_, w)| w * p.unit).collect();
    let total: u64 = sizes.iter().sum();
    // Fair sharing predicts the finishes: a third each until the small one is done,
    // then halves, then the large one alone.
    let (a, b, cc) = (sizes[0] as f64, sizes[1] as f64, sizes[2] as f64);
    let t1 = 3.0 * a / p.rate;
    let t2 = t1 + 2.0 * (b - a) / p.rate;
    let t3 = (a + b + cc) / p.rate;
    eprintln!(
        "  budget {} requests/s shared by {:?} requests; fair sharing predicts finishes at {t1:.0} s, {t2:.0} s, {t3:.0} s",
        p.rate, sizes
    );

    // Every configuration's items due at one instant, "send now". Ids interleave
    // the configurations (equal due times pop in id order), as campaigns started
    // the same second would.
    let lead_ms = 2_000 + (total / 50) as i64;
    let start = system_now_ms() + lead_ms;
    let items: Vec<NewItem> = (0..sizes[2])
        .flat_map(|i| {
            CONFIGS
                .iter()
                .zip(&sizes)
                .filter(move |(_, n)| i < **n)
                .map(move |((name, _), _)| {
                    NewItem::new(format!("pp:{i:08}:{name}"), *name, start)
                        .payload(i.to_string())
                        .max_attempts(10)
                })
        })
        .collect();
    let store = demo.store.clone();
    let mut stream = futures_util::stream::iter(
        items
            .chunks(5_000)
            .map(|c| {
                let store = store.clone();
                let c = c.to_vec();
                async move { store.enqueue(c).await }
            })
            .collect::<Vec<_>>(),
    )
    .buffer_unordered(4);
    while let Some(r) = stream.next().await {
        r?;
    }
    drop(items);
    let enqueued_at = system_now_ms();
    if enqueued_at > start {
        eprintln!(
            "  warning: enqueue ended {} ms after the start",
            enqueued_at - start
        );
    }

    let want_users = total * USERS_PER_REQUEST;
    let timeout = Duration::from_secs_f64(t3 * 2.0 + 60.0 + lead_ms as f64 / 1000.0);
    let deadline = Instant::now() + timeout;
    let mut next_report = Instant::now();
    loop {
        demo.check_alive()?;
        let done = provider.users_accepted();
        if done >= want_users && demo.queue_left().await? == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("not done within {timeout:?}: {done} of {want_users} users pushed");
        }
        if Instant::now() >= next_report {
            eprintln!(
                "  +{:>5.1} s: {} of {total} requests accepted",
                (system_now_ms() - start) as f64 / 1000.0,
                done / USERS_PER_REQUEST
            );
            next_report = Instant::now() + Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead = demo.dead_letters().await?;
    let provider_info = provider.describe();
    let log = provider.finish().await;

    // Score: per configuration, each request index once; finish times; rates.
    let mut counts: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n as usize]).collect();
    let mut times: Vec<Vec<i64>> = vec![Vec::new(); CONFIGS.len()];
    let mut foreign = 0u64;
    for acc in &log.accepted {
        let cfg = CONFIGS.iter().position(|(name, _)| acc.messages == [*name]);
        let idx = acc.users.first().map(|u| u / USERS_PER_REQUEST);
        match (cfg, idx) {
            (Some(k), Some(i)) if (i as usize) < counts[k].len() => {
                counts[k][i as usize] = counts[k][i as usize].saturating_add(1);
                times[k].push(acc.at_ms - start);
            }
            _ => foreign += 1,
        }
    }
    let lost: usize = counts
        .iter()
        .map(|c| c.iter().filter(|&&n| n == 0).count())
        .sum();
    let duplicated: u64 = counts
        .iter()
        .flatten()
        .map(|&n| u64::from(n.saturating_sub(1)))
        .sum();
    let finish_s: Vec<f64> = times
        .iter()
        .map(|t| t.iter().copied().max().unwrap_or(0) as f64 / 1000.0)
        .collect();
    let bucket_ms = p.bucket_s * 1000;
    let buckets =
        ((finish_s.iter().copied().fold(0.0, f64::max) * 1000.0) as i64 / bucket_ms + 1) as usize;
    let series: Vec<Vec<f64>> = times
        .iter()
        .map(|t| {
            let mut s = vec![0u64; buckets];
            for &x in t {
                if x >= 0 {
                    s[((x / bucket_ms) as usize).min(buckets - 1)] += 1;
                }
            }
            s.iter()
                .map(|&n| round2(n as f64 / p.bucket_s as f64))
                .collect()
        })
        .collect();
    // Rate of a configuration between two instants (ms after the start).
    let rate = |k: usize, from: i64, to: i64| -> f64 {
        let n = times[k].iter().filter(|&&x| x >= from && x < to).count();
        n as f64 * 1000.0 / (to - from).max(1) as f64
    };
    // The aggregate: every request the provider received (a QPS budget counts them
    // all), the busiest 5 s.
    let mut arrivals: Vec<i64> = log.arrivals.iter().map(|t| t - start).collect();
    arrivals.sort_unstable();
    let mut max_rate_5s = 0.0f64;
    let mut lo = 0;
    for hi in 0..arrivals.len() {
        while arrivals[hi] - arrivals[lo] >= 5_000 {
            lo += 1;
        }
        max_rate_5s = max_rate_5s.max((hi - lo + 1) as f64 / 5.0);
    }
    let (f1, f2) = ((finish_s[0] * 1000.0) as i64, (finish_s[1] * 1000.0) as i64);
    let phase1 = (1_000, f1 - 1_000);
    let phase2 = (f1 + 2_000, f2 - 1_000);
    let phase1_rates: Vec<f64> = (0..3)
        .map(|k| round2(rate(k, phase1.0, phase1.1)))
        .collect();
    let phase2_rates: Vec<f64> = (1..3)
        .map(|k| round2(rate(k, phase2.0, phase2.1)))
        .collect();
    let result = json!({
        "budget_rate_per_s": p.rate,
        "users_per_request": USERS_PER_REQUEST,
        "configs": CONFIGS.iter().zip(&sizes).zip(&finish_s).map(|(((name, _), n), f)| json!({
            "handler": name, "requests": n, "finished_s": round2(*f),
        })).collect::<Vec<_>>(),
        "predicted_finish_s": [round2(t1), round2(t2), round2(t3)],
        "phase1_rates_per_s": phase1_rates,
        "phase2_rates_per_s": phase2_rates,
        "max_aggregate_rate_5s": round2(max_rate_5s),
        "throughput_bucket_s": p.bucket_s,
        "throughput_per_s": CONFIGS.iter().zip(&series).map(|((name, _), s)| (name.to_string(), json!(s))).collect::<serde_json::Map<_, _>>(),
        "lost": lost,
        "duplicated": duplicated,
        "foreign": foreign,
        "dead_letters": dead,
        "provider": provider_info,
    });
    let mut f = Vec::new();
    check(&mut f, lost == 0, format!("{lost} requests lost"));
    check(
        &mut f,
        duplicated == 0,
        format!("{duplicated} requests duplicated"),
    );
    check(&mut f, foreign == 0, format!("{foreign} unexpected pushes"));
    check(
        &mut f,
        finish_s[0] < finish_s[1] && finish_s[1] < finish_s[2],
        format!("finish order {finish_s:?}: the smallest must finish first"),
    );
    check(
        &mut f,
        max_rate_5s <= p.rate * 1.1,
        format!(
            "the provider saw {max_rate_5s:.0}/s over 5 s, budget {}",
            p.rate
        ),
    );
    check(
        &mut f,
        finish_s[2] <= t3 * 1.25 + 3.0,
        format!(
            "the budget was not used: done at {:.1} s, {t3:.1} s at full rate",
            finish_s[2]
        ),
    );
    let third = p.rate / 3.0;
    if phase1.1 - phase1.0 >= 3_000 {
        for (k, r) in phase1_rates.iter().enumerate() {
            check(
                &mut f,
                (r - third).abs() <= third * 0.25,
                format!(
                    "{} ran at {r}/s while all three sent, fair share {third:.0}",
                    CONFIGS[k].0
                ),
            );
        }
    }
    let half = p.rate / 2.0;
    if phase2.1 - phase2.0 >= 3_000 {
        for (k, r) in phase2_rates.iter().enumerate() {
            check(
                &mut f,
                (r - half).abs() <= half * 0.25,
                format!(
                    "{} ran at {r}/s after the small one finished, fair share {half:.0}",
                    CONFIGS[k + 1].0
                ),
            );
        }
    }
    check(&mut f, dead == 0, format!("{dead} dead letters"));
    demo.finish(result, f).await
}
