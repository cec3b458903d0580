//! The marketing-push demos (`chime demo <scenario> --scale small`) end to end on a
//! real Redis and a real etcd: each runs its coordinator and worker processes and
//! its fake push provider, prints one JSON line, and must report no loss, no
//! duplicate and its scenario's timing bounds. The demo checks these itself (and
//! exits non-zero); the assertions here say the same from the outside, so a demo
//! that stopped checking would still fail here.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chime_tests::{EtcdServer, RedisServer, chime_cmd};
use serde_json::Value;

/// Runs `chime demo <scenario> --scale small` against fresh servers within
/// `deadline`; answers its result line.
async fn demo(scenario: &str, deadline: Duration) -> Result<Value> {
    demo_with(scenario, &[], deadline).await
}

/// Like [`demo`] with `extra` flags, run from the repository root.
async fn demo_with(scenario: &str, extra: &[&str], deadline: Duration) -> Result<Value> {
    let redis = RedisServer::start().await?;
    let etcd = EtcdServer::start().await?;
    let mut args = vec![
        "demo",
        scenario,
        "--scale",
        "small",
        "--redis-url",
        &redis.url,
        "--etcd-endpoints",
        &etcd.endpoint,
    ];
    args.extend_from_slice(extra);
    let mut cmd = chime_cmd(&args)?;
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(deadline, cmd.output())
        .await
        .with_context(|| format!("chime demo {scenario} did not finish within {deadline:?}"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON line on stdout:\n{stdout}\nstderr:\n{stderr}"))?;
    let v: Value = serde_json::from_str(line)?;
    ensure!(
        out.status.success() && v["ok"] == true,
        "chime demo {scenario} failed ({}): {}\nstderr:\n{stderr}",
        out.status,
        v["failures"]
    );
    eprintln!("{line}");
    Ok(v)
}

fn int(v: &Value, path: &[&str]) -> i64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_i64().unwrap_or(-1)
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64().unwrap_or(f64::NAN)
}

#[tokio::test]
async fn demo_coupon_reminder_fires_every_reminder_in_its_minute() -> Result<()> {
    let v = demo("coupon-reminder", Duration::from_secs(150)).await?;
    coupon_reminder_holds(&v)
}

/// The same day with the reminder handler in Python: each worker process is a
/// `chime worker` serving the delivery service and the Python SDK's coupon
/// reminder subscribed to it.
#[tokio::test]
async fn demo_coupon_reminder_with_the_handler_in_python() -> Result<()> {
    let python = chime_tests::sdk::python_env()?;
    let python = python.to_string_lossy();
    let v = demo_with(
        "coupon-reminder",
        &["--handler-sdk", "python", "--python", &python],
        Duration::from_secs(150),
    )
    .await?;
    ensure!(v["handler_sdk"] == "python", "{v}");
    coupon_reminder_holds(&v)
}

fn coupon_reminder_holds(v: &Value) -> Result<()> {
    for field in ["lost", "duplicated", "late", "early", "fired_after_cancel"] {
        ensure!(int(v, &[field]) == 0, "{field}: {v}");
    }
    ensure!(int(v, &["users"]) == 20_000, "{v}");
    ensure!(
        int(v, &["cancelled"]) > 1_000 && int(v, &["resubscribed"]) > 100,
        "the day must cancel and re-subscribe: {v}"
    );
    let merged = int(v, &["merged"]);
    ensure!(
        merged > 500 && merged == int(v, &["merged_expected"]),
        "merges: {v}"
    );
    ensure!(int(v, &["fired"]) == int(v, &["reminders_expected"]), "{v}");
    ensure!(
        int(v, &["coupons_reminded"]) == int(v, &["coupons_expected"]),
        "{v}"
    );
    // Fired right at the due instant, well inside the reminder's window.
    ensure!(int(v, &["lag_after_due_ms", "max"]) < 5_000, "{v}");
    ensure!(num(v, &["wall_s"]) < 90.0, "{v}");
    Ok(())
}

#[tokio::test]
async fn demo_mass_push_reaches_the_range_near_the_concurrency_bound() -> Result<()> {
    let v = demo("mass-push", Duration::from_secs(150)).await?;
    ensure!(
        int(&v, &["lost"]) == 0 && int(&v, &["duplicated"]) == 0,
        "{v}"
    );
    ensure!(
        int(&v, &["users"]) == 200_000 && int(&v, &["tasks"]) == 200,
        "{v}"
    );
    let (ideal, total) = (num(&v, &["ideal_s"]), num(&v, &["total_s"]));
    ensure!(ideal > 0.0 && total <= ideal * 3.0 + 10.0, "{v}");
    let rss = int(&v, &["peak_worker_rss_kib"]);
    ensure!(rss > 0 && rss < 160 * 1024, "worker memory: {v}");
    // A workflow: count → shard → push → report, each node succeeded, and the
    // report node's tally (from its parents' outputs) is the shards' own.
    for node in ["count", "shard", "push", "report"] {
        ensure!(v["nodes"][node] == "succeeded", "node {node}: {v}");
    }
    ensure!(int(&v, &["report", "tasks"]) == 200, "{v}");
    ensure!(num(&v, &["wall_s"]) < 90.0, "{v}");
    Ok(())
}

#[tokio::test]
async fn demo_incremental_sync_ends_equal_after_a_syncing_worker_is_killed() -> Result<()> {
    let v = demo("incremental-sync", Duration::from_secs(150)).await?;
    ensure!(v["ok"] == true, "{v}");
    ensure!(
        v["killed_worker"].is_string(),
        "no worker killed mid-sync: {v}"
    );
    ensure!(
        int(&v, &["mismatched_rows"]) == 0
            && int(&v, &["copied_twice"]) == 0
            && int(&v, &["out_of_order"]) == 0,
        "{v}"
    );
    ensure!(
        int(&v, &["injected_write_failures"]) > 0 && int(&v, &["repaired"]) > 0,
        "the repair node had nothing to do: {v}"
    );
    ensure!(
        int(&v, &["lock_holders"]) > int(&v, &["killed_holding_lock"]),
        "no sync after the kill: {v}"
    );
    Ok(())
}

#[tokio::test]
async fn demo_push_platform_shares_the_budget_and_the_smallest_finishes_first() -> Result<()> {
    let v = demo("push-platform", Duration::from_secs(150)).await?;
    ensure!(
        int(&v, &["lost"]) == 0 && int(&v, &["duplicated"]) == 0,
        "{v}"
    );
    let rate = num(&v, &["budget_rate_per_s"]);
    let finished: Vec<f64> = (0..3)
        .map(|i| v["configs"][i]["finished_s"].as_f64().unwrap_or(f64::NAN))
        .collect();
    ensure!(
        finished[0] < finished[1] && finished[1] < finished[2],
        "finish order: {v}"
    );
    ensure!(
        num(&v, &["max_aggregate_rate_5s"]) <= rate * 1.1,
        "budget exceeded: {v}"
    );
    for i in 0..3 {
        let r = v["phase1_rates_per_s"][i].as_f64().unwrap_or(0.0);
        ensure!(
            (r - rate / 3.0).abs() <= rate / 3.0 * 0.25,
            "unequal share: {v}"
        );
    }
    // Work-conserving: the large one finishes about when the whole budget would.
    let predicted = v["predicted_finish_s"][2].as_f64().unwrap_or(f64::NAN);
    ensure!(finished[2] <= predicted * 1.25 + 3.0, "{v}");
    Ok(())
}

#[tokio::test]
async fn demo_segment_notify_reaches_exact_members_once() -> Result<()> {
    let v = demo("segment-notify", Duration::from_secs(150)).await?;
    for field in ["lost", "duplicated", "wrong_recipients", "early", "foreign"] {
        ensure!(int(&v, &[field]) == 0, "{field}: {v}");
    }
    for n in ["seg-1", "seg-11", "seg-vip", "frequent"] {
        let members = int(&v, &["notifications", n, "members"]);
        ensure!(
            members > 0 && members == int(&v, &["notifications", n, "reached"]),
            "{n}: {v}"
        );
    }
    // The traps are in the data, and nobody fell in them.
    ensure!(int(&v, &["traps", "tagged_like_1_but_not_1"]) > 0, "{v}");
    ensure!(
        int(&v, &["traps", "3_plus_orders_but_not_in_two_days"]) > 0,
        "{v}"
    );
    // Sending the order-based notification again created nothing.
    ensure!(int(&v, &["frequent_resent", "created"]) == 0, "{v}");
    ensure!(
        int(&v, &["frequent_resent", "duplicate_refused"])
            == int(&v, &["notifications", "frequent", "members"]),
        "{v}"
    );
    ensure!(num(&v, &["wall_s"]) < 90.0, "{v}");
    Ok(())
}
