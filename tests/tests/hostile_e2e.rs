//! Garbage at the coordinator's ports: for 30 s, random bytes, HTTP- and
//! HTTP/2-shaped junk (with and without the admin token) and hundreds of half-open
//! connections hit the gRPC and HTTP ports, while a client keeps making normal calls
//! and a job keeps firing. Nothing crashes, no stored state changes, and every normal
//! call is answered throughout. `CHIME_HOSTILE_SECONDS` shortens or lengthens the
//! attack (default 30).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chime_tests::{ADMIN_TOKEN, Cluster, http, pending_items, wait_until};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn junk(n: usize) -> Vec<u8> {
    (0..n).map(|_| fastrand::u8(..)).collect()
}

/// One shaped or unshaped piece of garbage for `port`.
fn garbage(http_port: bool) -> Vec<u8> {
    let body = String::from_utf8_lossy(&junk(fastrand::usize(0..2048))).into_owned();
    match fastrand::u8(0..6) {
        0 => junk(fastrand::usize(1..65_536)),
        1 => {
            let mut v = HTTP2_PREFACE.to_vec();
            v.extend(junk(fastrand::usize(0..4096)));
            v
        }
        2 if http_port => format!(
            "POST /api/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        3 if http_port => format!(
            "PUT /api/config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
             Content-Length: {}\r\n\r\n{{\"key\":\"queues/default/count\",\"value\":{body:?}}}",
            body.len() + 40
        )
        .into_bytes(),
        4 => format!(
            "GET /{} HTTP/1.1\r\nHost: {}\r\nX-Long: {}\r\n\r\n",
            "a/".repeat(fastrand::usize(0..2000)),
            "h".repeat(fastrand::usize(0..100)),
            "v".repeat(fastrand::usize(0..200_000))
        )
        .into_bytes(),
        _ => {
            // A valid HTTP/2 preface and SETTINGS, then random frames.
            let mut v = HTTP2_PREFACE.to_vec();
            v.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
            for _ in 0..fastrand::usize(1..20) {
                let len = fastrand::usize(0..512);
                v.extend([(len >> 16) as u8, (len >> 8) as u8, len as u8]);
                v.extend([fastrand::u8(0..10), fastrand::u8(..)]);
                v.extend(fastrand::u32(..).to_be_bytes());
                v.extend(junk(len));
            }
            v
        }
    }
}

/// Throws garbage at `port` until `stop`; answers how many connections it made.
async fn thrower(port: u16, http_port: bool, stop: CancellationToken, made: Arc<AtomicU64>) {
    while !stop.is_cancelled() {
        let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        else {
            continue;
        };
        made.fetch_add(1, Ordering::Relaxed);
        let _ =
            tokio::time::timeout(Duration::from_secs(2), s.write_all(&garbage(http_port))).await;
        let mut buf = vec![0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
        if fastrand::bool() {
            // Sometimes a reset instead of a close.
            let _ = s.set_zero_linger();
        }
    }
}

/// Keeps `n` connections open on `port` that never finish what they started.
async fn half_open(port: u16, n: usize, stop: CancellationToken) {
    let mut held = Vec::new();
    while !stop.is_cancelled() {
        while held.len() < n {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
                break;
            };
            let start: &[u8] = match fastrand::u8(0..3) {
                0 => b"GET /api/overview HTTP/1.1\r\nHost: x\r\n",
                1 => &HTTP2_PREFACE[..10],
                _ => b"",
            };
            let _ = s.write_all(start).await;
            held.push(s);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => {}
        }
        // Drop the ones the server closed (it may time slow clients out).
        let mut alive = Vec::new();
        for mut s in held.drain(..) {
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                _ => alive.push(s),
            }
        }
        held = alive;
    }
}

async fn snapshot(c: &Cluster, api: &str) -> Result<Value> {
    let tok = Some(ADMIN_TOKEN);
    let (_, jobs) = http("GET", &format!("{api}/api/jobs"), tok, None).await?;
    let jobs: Vec<Value> = jobs["jobs"]
        .as_array()
        .context("jobs")?
        .iter()
        .map(|j| json!({ "name": j["name"], "version": j["version"], "paused": j["paused"] }))
        .collect();
    let (_, cfg) = http("GET", &format!("{api}/api/config"), tok, None).await?;
    let pending = pending_items(api).await?;
    let workers = c.admin(&["workers"])?["workers"]
        .as_array()
        .map_or(0, Vec::len);
    Ok(json!({ "jobs": jobs, "config": cfg["entries"], "pending": pending, "workers": workers }))
}

#[tokio::test]
async fn garbage_and_half_open_connections_change_nothing() -> Result<()> {
    let seconds: u64 = std::env::var("CHIME_HOSTILE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut c = Cluster::start(1).await?;
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);
    let grpc_port: u16 = c.coordinator.rsplit(':').next().context("port")?.parse()?;
    let http_port = c.http_ports[0];
    let tok = Some(ADMIN_TOKEN);

    // State to keep: a firing job, a paused one, a setting, items far in the future.
    for (name, paused) in [("tick", false), ("idle", true)] {
        let j = json!({ "name": name, "group": "default", "handler": "noop", "paused": paused,
                        "schedule": { "kind": "fixed_rate", "every_ms": 500 } });
        let (code, b) = http("POST", &format!("{api}/api/jobs"), tok, Some(j)).await?;
        ensure!(code == 201, "{b}");
    }
    let (code, b) = http(
        "PUT",
        &format!("{api}/api/config"),
        tok,
        Some(json!({ "key": "queues/default/visibility_ms", "value": "20000" })),
    )
    .await?;
    ensure!(code == 200, "{b}");
    let items: Vec<Value> = (0..50)
        .map(|i| json!({ "id": format!("later{i}"), "handler": "noop", "in_ms": 3_600_000 }))
        .collect();
    let (code, b) = http(
        "POST",
        &format!("{api}/api/queues/items"),
        tok,
        Some(json!({ "items": items })),
    )
    .await?;
    ensure!(code == 200, "{b}");
    let before = snapshot(&c, &api).await?;
    let runs_before = c.records().len();

    let stop = CancellationToken::new();
    let made = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(tokio::spawn(thrower(
            grpc_port,
            false,
            stop.clone(),
            made.clone(),
        )));
        tasks.push(tokio::spawn(thrower(
            http_port,
            true,
            stop.clone(),
            made.clone(),
        )));
    }
    tasks.push(tokio::spawn(half_open(grpc_port, 200, stop.clone())));
    tasks.push(tokio::spawn(half_open(http_port, 200, stop.clone())));

    // Normal traffic throughout: each call answered within 5 s.
    let started = Instant::now();
    let (mut calls, mut slowest) = (0u32, Duration::ZERO);
    while started.elapsed() < Duration::from_secs(seconds) {
        let t = Instant::now();
        let (code, b) = tokio::time::timeout(
            Duration::from_secs(5),
            http("GET", &format!("{api}/api/overview"), tok, None),
        )
        .await
        .context("an overview call took more than 5 s under attack")??;
        ensure!(code == 200, "overview under attack: {code} {b}");
        let w = tokio::time::timeout(Duration::from_secs(5), async { c.admin(&["workers"]) })
            .await
            .context("a gRPC admin call took more than 5 s under attack")??;
        ensure!(w["workers"].as_array().is_some_and(|a| a.len() == 1), "{w}");
        slowest = slowest.max(t.elapsed());
        calls += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    eprintln!(
        "hostile: {} garbage connections, {calls} normal call pairs, slowest {slowest:?}",
        made.load(Ordering::Relaxed)
    );
    ensure!(made.load(Ordering::Relaxed) > 100, "the attack barely ran");

    // The job kept firing during the attack, and nothing stored changed.
    let fired = c.records().len() - runs_before;
    ensure!(
        fired as u64 >= seconds,
        "only {fired} shards ran in {seconds} s under attack"
    );
    ensure!(
        c.coordinator_proc(0).is_some_and(|p| p.is_running()),
        "the coordinator died"
    );
    wait_until("state readable", Duration::from_secs(10), || async {
        snapshot(&c, &api).await.is_ok()
    })
    .await?;
    let after = snapshot(&c, &api).await?;
    ensure!(
        before == after,
        "stored state changed:\nbefore {before}\nafter  {after}"
    );
    Ok(())
}
