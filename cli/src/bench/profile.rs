//! Where Redis spends its time during a benchmark: per-command CPU from `INFO
//! commandstats` (commands a script calls count under their own names, and the script
//! under `evalsha`, so `evalsha` minus the rest is the Lua interpreter's share), and,
//! when asked, per-script time from `SLOWLOG` with a threshold of 0 (the slow log
//! names scripts only by SHA1; `redis_store::script_names` turns those into `pop`,
//! `ack`, …). The slow log is changed only for the run and restored after it.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use chime_shared::queue::redis_store::script_names;
use chime_shared::redis_conn::RedisConn;
use serde_json::{Value, json};

/// Calls and microseconds per command, summed over every master.
type CommandStats = BTreeMap<String, (u64, u64)>;

/// A profile in progress: what Redis had counted when it started.
pub(crate) struct RedisProfile {
    before: CommandStats,
    /// The slow log settings to restore, when the slow log is being used.
    slowlog: Option<(String, String)>,
}

impl RedisProfile {
    /// Snapshots the command counters; with `scripts`, also starts logging every
    /// command to the slow log (single Redis only: a cluster has one log per node).
    pub(crate) async fn start(conn: &RedisConn, scripts: bool) -> Result<Self> {
        let slowlog = if scripts {
            let RedisConn::Single(_) = conn else {
                bail!(
                    "invalid --profile: the per-script profile needs a single Redis, not a cluster"
                );
            };
            let threshold = config_get(conn, "slowlog-log-slower-than").await?;
            let len = config_get(conn, "slowlog-max-len").await?;
            config_set(conn, "slowlog-log-slower-than", "0").await?;
            config_set(conn, "slowlog-max-len", "1000000").await?;
            let mut c = conn.clone();
            let _: () = redis::cmd("SLOWLOG")
                .arg("RESET")
                .query_async(&mut c)
                .await?;
            Some((threshold, len))
        } else {
            None
        };
        Ok(Self {
            before: command_stats(conn).await?,
            slowlog,
        })
    }

    /// Microseconds Redis spent per item, by command (and by script with the slow
    /// log), since `start`; restores the slow log settings.
    pub(crate) async fn finish(self, conn: &RedisConn, items: usize) -> Result<Value> {
        let after = command_stats(conn).await?;
        let per_item = |us: u64| (us as f64 / items.max(1) as f64 * 1000.0).round() / 1000.0;
        let mut commands = serde_json::Map::new();
        let mut calls = serde_json::Map::new();
        let mut inner_us = 0u64;
        let mut evalsha_us = 0u64;
        for (name, (c, us)) in &after {
            let (c0, us0) = self.before.get(name).copied().unwrap_or((0, 0));
            let (dc, dus) = (c.saturating_sub(c0), us.saturating_sub(us0));
            if dc == 0 {
                continue;
            }
            match name.as_str() {
                "evalsha" | "eval" => evalsha_us += dus,
                // Commands a script runs; the bench's own INFO/CONFIG/SLOWLOG calls
                // are not the system's work.
                "info" | "config" | "slowlog" => continue,
                _ => inner_us += dus,
            }
            commands.insert(name.clone(), json!(per_item(dus)));
            calls.insert(name.clone(), json!(dc));
        }
        let mut out = json!({
            "commands_us_per_item": commands,
            "command_calls": calls,
            // What scripts cost beyond the commands they call: argument tables,
            // string building, `unpack` (an estimate: the commands a client sends
            // outside scripts are counted as script commands too).
            "lua_us_per_item": per_item(evalsha_us.saturating_sub(inner_us)),
        });
        if let Some((threshold, len)) = self.slowlog {
            let scripts = slowlog_by_script(conn).await;
            config_set(conn, "slowlog-log-slower-than", &threshold).await?;
            config_set(conn, "slowlog-max-len", &len).await?;
            let (us, n) = scripts?;
            out["scripts_us_per_item"] = json!(
                us.iter()
                    .map(|(k, v)| (k.clone(), json!(per_item(*v))))
                    .collect::<serde_json::Map<_, _>>()
            );
            out["script_calls"] = json!(n);
        }
        Ok(out)
    }
}

async fn config_get(conn: &RedisConn, key: &str) -> Result<String> {
    let mut c = conn.clone();
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(key)
        .query_async(&mut c)
        .await?;
    v.into_iter()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("CONFIG GET {key} answered nothing"))
}

async fn config_set(conn: &RedisConn, key: &str, value: &str) -> Result<()> {
    let mut c = conn.clone();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut c)
        .await?;
    Ok(())
}

/// `cmdstat_<name>:calls=…,usec=…,…` lines of every master, summed by name.
async fn command_stats(conn: &RedisConn) -> Result<CommandStats> {
    let mut out = CommandStats::new();
    for (_, info) in conn.info_per_master("commandstats").await? {
        for line in info.lines() {
            let Some((name, fields)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |key: &str| -> u64 {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            let e = out.entry(name.to_owned()).or_default();
            e.0 += field("calls=");
            e.1 += field("usec=");
        }
    }
    Ok(out)
}

/// Microseconds and calls per script (by name) in the slow log.
async fn slowlog_by_script(
    conn: &RedisConn,
) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
    let names: BTreeMap<String, &str> = script_names().into_iter().collect();
    let mut c = conn.clone();
    // Each entry: id, timestamp, duration µs, [args], client addr, client name.
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(&mut c)
        .await?;
    let (mut us, mut calls) = (BTreeMap::new(), BTreeMap::new());
    for e in entries {
        let redis::Value::Array(fields) = e else {
            continue;
        };
        let (Some(redis::Value::Int(d)), Some(redis::Value::Array(args))) =
            (fields.get(2), fields.get(3))
        else {
            continue;
        };
        let arg = |i: usize| match args.get(i) {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        // Redis 7 also logs the commands a script calls, under their own names; they
        // are inside the script's time already (and in `commands_us_per_item`).
        if !arg(0).eq_ignore_ascii_case("evalsha") {
            continue;
        }
        let sha = arg(1);
        let name = names
            .get(&sha)
            .map_or_else(|| format!("script {sha}"), |n| (*n).to_owned());
        *us.entry(name.clone()).or_default() += *d as u64;
        *calls.entry(name).or_default() += 1;
    }
    Ok((us, calls))
}
