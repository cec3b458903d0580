//! `chime dev` (README's first command) runs with nothing installed: within seconds
//! its console shows workers and a sharded job's runs, and reminders fire on time.

use std::time::Duration;

use anyhow::{Result, ensure};
use chime_tests::{Proc, TestDir, chime_cmd, free_port, http, wait_until};

#[tokio::test]
async fn chime_dev_fires_jobs_and_reminders_without_any_server() -> Result<()> {
    let dir = TestDir::new("dev")?;
    let (hp, gp) = (free_port()?, free_port()?);
    let cmd = chime_cmd(&[
        "dev",
        "--demo-interval-ms",
        "300",
        "--exit-after-s",
        "14",
        "--http-addr",
        &format!("127.0.0.1:{hp}"),
        "--grpc-addr",
        &format!("127.0.0.1:{gp}"),
    ])?;
    let mut dev = Proc::spawn("dev", cmd, dir.path())?;
    let api = format!("http://127.0.0.1:{hp}");

    // What a new user sees in the console within 10 s: two workers, and a run of
    // the demo job whose four shards succeeded on them.
    wait_until(
        "the console shows a succeeded demo run",
        Duration::from_secs(10),
        || async {
            let Ok((200, o)) = http("GET", &format!("{api}/api/overview"), None, None).await else {
                return false;
            };
            let workers = o["workers"].as_array().map_or(0, Vec::len);
            let done = o["recent_runs"].as_array().into_iter().flatten().any(|r| {
                r["job"] == "demo-report"
                    && r["state"] == "succeeded"
                    && r["shards"].as_array().is_some_and(|s| {
                        s.len() == 4 && s.iter().all(|x| x["state"] == "succeeded")
                    })
            });
            workers == 2 && done
        },
    )
    .await?;

    let code = dev.wait_exit(Duration::from_secs(30)).await?;
    let out = dev.log();
    ensure!(code == Some(0), "exit {code:?}:\n{out}");
    ensure!(out.contains("embedded in-memory delay queue"), "{out}");
    ensure!(
        out.contains(&format!("console  http://127.0.0.1:{hp}/")),
        "{out}"
    );
    let shards = out.lines().filter(|l| l.contains("SHARD")).count();
    ensure!(shards >= 8, "only {shards} shards ran in 14 s:\n{out}");
    let fired = out.lines().filter(|l| l.contains("FIRED")).count();
    ensure!(fired >= 3, "only {fired} reminders fired in 14 s:\n{out}");
    for line in out
        .lines()
        .filter(|l| l.contains("FIRED") || l.contains("SHARD"))
    {
        // "lag N ms": nothing starts late by more than a second here.
        let Some(lag) = line
            .split("lag ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse::<i64>().ok())
        else {
            ensure!(
                !line.contains("FIRED"),
                "a reminder without its lag: {line}"
            );
            continue;
        };
        ensure!((0..1_000).contains(&lag), "late or early: {line}");
    }
    ensure!(out.contains("chime dev: stopped"), "{out}");
    Ok(())
}
