//! The rate limiter's behaviour, on Redis and in memory: a global rate holds across
//! concurrent clients, and handlers sharing a budget split it equally (or by their
//! caps).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use chime_shared::clock::SystemClock;
use chime_shared::ratelimit::{MemoryLimiter, Policy, RateLimiter, RedisLimiter};
use chime_tests::RedisServer;

/// Greedy clients of `handler` for `secs`; answers items granted.
async fn drive(
    l: Arc<dyn RateLimiter>,
    p: Policy,
    handler: &'static str,
    clients: usize,
    secs: f64,
) -> u64 {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (l, p) = (l.clone(), p.clone());
            tokio::spawn(async move {
                let end = Instant::now() + Duration::from_secs_f64(secs);
                let mut got = 0;
                while Instant::now() < end {
                    match l.acquire(&p, handler, 4).await {
                        Ok(g) => {
                            got += g.granted;
                            if g.granted < 4 {
                                tokio::time::sleep(Duration::from_millis(g.wait_ms.clamp(1, 50)))
                                    .await;
                            }
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                got
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total
}

fn budget(rate: f64, cap: f64) -> Policy {
    Policy {
        budget: "b:push".into(),
        rate_per_s: rate,
        cap_per_s: cap,
    }
}

async fn rate_holds_across_clients(l: Arc<dyn RateLimiter>) -> Result<()> {
    let p = Policy {
        budget: "h:solo".into(),
        rate_per_s: 300.0,
        cap_per_s: 0.0,
    };
    let got = drive(l, p, "solo", 3, 3.0).await as f64;
    ensure!(
        (810.0..=990.0).contains(&got),
        "granted {got} in 3 s at 300/s"
    );
    Ok(())
}

async fn two_handlers_split_a_budget(l: Arc<dyn RateLimiter>) -> Result<()> {
    let a = tokio::spawn(drive(l.clone(), budget(400.0, 0.0), "a", 2, 3.0));
    let b = tokio::spawn(drive(l.clone(), budget(400.0, 0.0), "b", 2, 3.0));
    let (a, b) = (a.await? as f64, b.await? as f64);
    ensure!(
        (1_080.0..=1_320.0).contains(&(a + b)),
        "total {} at 400/s for 3 s",
        a + b
    );
    ensure!(
        (a / (a + b) - 0.5).abs() < 0.08,
        "unequal split: a {a}, b {b}"
    );
    Ok(())
}

async fn capped_handler_leaves_the_rest(l: Arc<dyn RateLimiter>) -> Result<()> {
    let small = tokio::spawn(drive(l.clone(), budget(400.0, 40.0), "small", 1, 3.0));
    let big = tokio::spawn(drive(l.clone(), budget(400.0, 0.0), "big", 2, 3.0));
    let (small, big) = (small.await? as f64, big.await? as f64);
    ensure!(
        (100.0..=135.0).contains(&small),
        "capped handler got {small} (cap 40/s)"
    );
    ensure!(
        big >= 3.0 * 360.0 * 0.9,
        "the big handler got only {big} of the rest"
    );
    Ok(())
}

async fn redis() -> Result<(Arc<dyn RateLimiter>, RedisServer)> {
    let server = RedisServer::start().await?;
    Ok((
        Arc::new(RedisLimiter::new(server.conn().await?, "rl")),
        server,
    ))
}

fn memory() -> Arc<dyn RateLimiter> {
    Arc::new(MemoryLimiter::new(Arc::new(SystemClock)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rate_holds_across_clients() -> Result<()> {
    let (l, _s) = redis().await?;
    rate_holds_across_clients(l).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_handlers_split_a_budget() -> Result<()> {
    let (l, _s) = redis().await?;
    two_handlers_split_a_budget(l).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_capped_handler_leaves_the_rest() -> Result<()> {
    let (l, _s) = redis().await?;
    capped_handler_leaves_the_rest(l).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_rate_holds_across_clients() -> Result<()> {
    rate_holds_across_clients(memory()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_two_handlers_split_a_budget() -> Result<()> {
    two_handlers_split_a_budget(memory()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_capped_handler_leaves_the_rest() -> Result<()> {
    capped_handler_leaves_the_rest(memory()).await
}
