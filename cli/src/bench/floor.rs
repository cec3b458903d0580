//! `chime bench floor`: what Redis's CPU costs per item for the bare data movement
//! of a delay queue — the commands only, no Lua, no duplicate check, no in-flight
//! record, no lease, no layout seal — so that `bench burst`'s `redis_cpu_us_per_item`
//! can be read against a floor measured on the same machine and server.
//!
//! Per batch of `--batch` items on one hash tag: enqueue is `HSET items` + `ZADD due`
//! (every item due at one instant, as in a burst); pop is `ZRANGE due 0 b-1` +
//! `ZREMRANGEBYRANK` + `HMGET items` (ids, then bodies, as a worker's large pop);
//! ack is `HDEL items`. Each phase's CPU is Redis's `used_cpu_user + used_cpu_sys`
//! over it, per item; the calls of a phase are pipelined from one connection, so the
//! figure is the server's work, not round trips. Single Redis only: the point is one
//! server's cost, and `bench burst` spreads over a cluster's masters the same way.

use std::time::Instant;

use anyhow::{Result, bail};
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use clap::Args;
use serde_json::json;

use super::redis_cpu;

#[derive(Args, Debug)]
pub struct FloorArgs {
    /// Redis URL (a single server)
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Items moved through the three phases
    #[arg(long, default_value_t = 100_000)]
    items: usize,
    /// Items per command (a pop's size)
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Body size of each item, bytes
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Batches per pipeline (one round trip)
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
}

pub async fn run(a: FloorArgs) -> Result<()> {
    if a.items == 0 || a.batch == 0 || a.pipeline == 0 {
        bail!("invalid --items/--batch/--pipeline: each must be at least 1");
    }
    let conn = RedisConn::connect(&RedisSpec::parse(&a.redis_url)?).await?;
    let RedisConn::Single(_) = conn else {
        bail!("invalid --redis-url: bench floor measures one server, not a cluster");
    };
    let tag = format!("{{chimefloor{:08x}}}", fastrand::u32(..));
    let (items_key, due_key) = (format!("{tag}:items"), format!("{tag}:due"));
    let body = vec![b'x'; a.payload_bytes];
    let ids: Vec<String> = (0..a.items).map(|i| format!("item-{i:08}")).collect();
    let batches: Vec<&[String]> = ids.chunks(a.batch).collect();
    let due_ms: i64 = 1_700_000_000_000;

    // Each phase: build its commands per batch, send them `pipeline` batches at a
    // time, and read Redis's CPU before and after.
    let mut phases = serde_json::Map::new();
    let mut total = 0.0;
    let started = Instant::now();
    for phase in ["enqueue", "pop", "ack"] {
        let before = cpu(&conn).await?;
        for group in batches.chunks(a.pipeline) {
            let mut p = redis::pipe();
            for chunk in group {
                match phase {
                    "enqueue" => {
                        let hset = p.cmd("HSET").arg(&items_key);
                        for id in chunk.iter() {
                            hset.arg(id).arg(&body[..]);
                        }
                        let zadd = p.cmd("ZADD").arg(&due_key);
                        for id in chunk.iter() {
                            zadd.arg(due_ms).arg(id);
                        }
                    }
                    "pop" => {
                        let last = chunk.len() as i64 - 1;
                        p.cmd("ZRANGE").arg(&due_key).arg(0).arg(last);
                        p.cmd("ZREMRANGEBYRANK").arg(&due_key).arg(0).arg(last);
                        p.cmd("HMGET").arg(&items_key).arg(*chunk);
                    }
                    _ => {
                        p.cmd("HDEL").arg(&items_key).arg(*chunk);
                    }
                }
            }
            let mut c = conn.clone();
            let replies: Vec<redis::Value> = p.query_async(&mut c).await?;
            // A pop must have found its items: otherwise the figure would be the
            // cost of an empty pop.
            if phase == "pop" {
                let found = |v: &redis::Value| match v {
                    redis::Value::Array(a) => a.iter().all(|x| !matches!(x, redis::Value::Nil)),
                    _ => false,
                };
                if !replies.iter().step_by(3).all(found)
                    || !replies.iter().skip(2).step_by(3).all(found)
                {
                    bail!(
                        "a pop found fewer items or bodies than it moved (a key shared with another run?)"
                    );
                }
            }
        }
        let us = (cpu(&conn).await? - before) * 1e6 / a.items as f64;
        total += us;
        phases.insert(phase.to_owned(), json!(round2(us)));
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    // The ack deleted every body and the pops emptied `due`: both keys are gone.
    let mut c = conn.clone();
    let left: i64 = redis::cmd("EXISTS")
        .arg(&items_key)
        .arg(&due_key)
        .query_async(&mut c)
        .await?;
    if left != 0 {
        let _: i64 = redis::cmd("UNLINK")
            .arg(&items_key)
            .arg(&due_key)
            .query_async(&mut c)
            .await?;
        bail!("items were left after the ack phase: the phases did not move every item");
    }
    let out = json!({
        "bench": "floor",
        "items": a.items,
        "batch": a.batch,
        "payload_bytes": a.payload_bytes,
        "pipeline": a.pipeline,
        "redis_cpu_us_per_item": round2(total),
        "redis_cpu_us_per_item_by_phase": phases,
        "elapsed_s": round2(elapsed_s),
    });
    println!("{out}");
    Ok(())
}

/// The server's CPU seconds so far.
async fn cpu(conn: &RedisConn) -> Result<f64> {
    Ok(redis_cpu(conn).await?.iter().map(|(_, s)| s).sum())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
