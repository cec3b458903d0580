//! The web console in a real headless Chromium: `scripts/console/browser_test.mjs`
//! (playwright-core driving Debian's `chromium`) logs in to `chime dev` with the
//! admin token, is refused a bad cron expression at its field, creates a sharded
//! job, sees it fire and its run succeed shard by shard, triggers it with params,
//! pauses it, sees the overview's and queues page's charts draw the items it
//! enqueued meanwhile (some failing), saves an alert rule (a bad one refused at its field) whose Test
//! reaches a local webhook, finds its changes in the audit log, and watches a
//! workflow run's DAG fill in node by node, then reruns it from a node; logged in
//! again with a viewer token, it picks a namespace on the Jobs page and sees the
//! pages without the actions a viewer may
//! not take (and the API refuses them). `scripts/test` installs Chromium, Node and the npm package; a
//! missing one fails this test, it does not skip it.
//!
//! `UPDATE_CONSOLE_SCREENSHOTS=1` copies the screenshots into `docs/` (README).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use chime_tests::{Proc, TestDir, chime_cmd, free_port, http, wait_until};

const TOKEN: &str = "console-test-token-0123456789";
const VIEWER: &str = "console-viewer-token-0123456789";
/// An admin of namespace team-x only.
const TEAM: &str = "console-team-token-0123456789";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn chromium() -> Result<PathBuf> {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    bail!("chromium is not installed (scripts/test installs Debian's `chromium`)")
}

#[tokio::test]
async fn console_in_headless_chromium() -> Result<()> {
    let script_dir = root().join("scripts/console");
    ensure!(
        script_dir.join("node_modules/playwright-core").exists(),
        "scripts/console/node_modules is missing: run `npm ci` there (scripts/test does)"
    );
    let chromium = chromium()?;
    let dir = TestDir::new("console")?;
    let (hp, gp) = (free_port()?, free_port()?);
    let cmd = chime_cmd(&[
        "dev",
        "--http-addr",
        &format!("127.0.0.1:{hp}"),
        "--grpc-addr",
        &format!("127.0.0.1:{gp}"),
        "--admin-token",
        TOKEN,
        "--viewer-token",
        VIEWER,
        "--team-token",
        TEAM,
        "--team-namespace",
        "team-x",
        "--demo-interval-ms",
        "2000",
    ])?;
    let _dev = Proc::spawn("dev", cmd, dir.path())?;
    let url = format!("http://127.0.0.1:{hp}/");
    wait_until("the console answers", Duration::from_secs(20), || async {
        matches!(
            http("GET", &format!("{url}api/session"), None, None).await,
            Ok((200, _))
        )
    })
    .await?;

    let shots = dir.path().join("screenshots");
    std::fs::create_dir_all(&shots)?;
    let log = std::fs::File::create(dir.path().join("browser.log"))?;
    let mut child = tokio::process::Command::new("node")
        .arg("browser_test.mjs")
        .current_dir(&script_dir)
        .env("CONSOLE_URL", &url)
        .env("ADMIN_TOKEN", TOKEN)
        .env("VIEWER_TOKEN", VIEWER)
        .env("TEAM_TOKEN", TEAM)
        .env("CHROMIUM_PATH", &chromium)
        .env("SCREENSHOT_DIR", &shots)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("running node (scripts/test installs nodejs)")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let status = tokio::time::timeout(Duration::from_secs(300), child.wait())
        .await
        .context("the browser test took more than 300 s")??;
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut out).await?;
    let log = std::fs::read_to_string(dir.path().join("browser.log")).unwrap_or_default();
    ensure!(
        status.success(),
        "browser test failed ({status}):\n{log}\n{out}"
    );
    let summary: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap_or(""))
        .with_context(|| format!("no JSON summary:\n{out}\n{log}"))?;
    ensure!(summary["ok"] == true, "{summary}");
    ensure!(
        summary["viewer_checked"] == true,
        "the viewer step ran: {summary}"
    );
    for f in [
        "console-overview.png",
        "console-jobs.png",
        "console-run.png",
        "console-alerts.png",
        "console-queues.png",
        "console-workflow.png",
    ] {
        let p = shots.join(f);
        ensure!(
            std::fs::metadata(&p)
                .map(|m| m.len() > 10_000)
                .unwrap_or(false),
            "screenshot {f} missing or empty"
        );
        if std::env::var_os("UPDATE_CONSOLE_SCREENSHOTS").is_some() {
            std::fs::copy(&p, root().join("docs").join(f))?;
        }
    }
    Ok(())
}
