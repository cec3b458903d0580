//! `chime dev` (README's first command) runs with nothing installed and fires
//! reminders within seconds.

use std::time::Duration;

use anyhow::{Result, ensure};
use chime_tests::{Proc, TestDir, chime_cmd};

#[tokio::test]
async fn chime_dev_fires_reminders_without_any_server() -> Result<()> {
    let dir = TestDir::new("dev")?;
    let cmd = chime_cmd(&["dev", "--demo-interval-ms", "300", "--exit-after-s", "8"])?;
    let mut dev = Proc::spawn("dev", cmd, dir.path())?;
    let code = dev.wait_exit(Duration::from_secs(30)).await?;
    let out = dev.log();
    ensure!(code == Some(0), "exit {code:?}:\n{out}");
    ensure!(out.contains("embedded in-memory delay queue"), "{out}");
    let fired = out.lines().filter(|l| l.contains("FIRED")).count();
    ensure!(fired >= 3, "only {fired} reminders fired in 8 s:\n{out}");
    for line in out.lines().filter(|l| l.contains("FIRED")) {
        // "(lag N ms, ...": nothing fires late by more than a second here.
        let lag: i64 = line
            .split("(lag ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(i64::MAX);
        ensure!((0..1_000).contains(&lag), "late or early reminder: {line}");
    }
    ensure!(out.contains("chime dev: stopped"), "{out}");
    Ok(())
}
