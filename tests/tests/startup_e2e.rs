//! Start-up order: in a Kubernetes release the stores, coordinators and workers start
//! in any order, so `chime coordinator` and `chime worker` started before Redis wait
//! for it (never printing its password) and come up when it does; one told to stop
//! while waiting exits 0; a URL that is not one still fails at once. Real Redis, etcd
//! and chime processes (found by `scripts/image/check`: the coordinator pod started
//! before the bundled Redis and exited).

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use chime_tests::{
    EtcdServer, Proc, TestDir, chime_cmd, find_binary, free_port, http, run_chime, wait_until,
};

const PASSWORD: &str = "hunter2-start-up";

/// A redis-server on `port` with `PASSWORD`, started now.
fn redis_on(port: u16, dir: &TestDir) -> Result<Proc> {
    let mut cmd = Command::new(find_binary("redis-server", "apt-get install redis-server")?);
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            PASSWORD,
        ])
        .args(["--dir", &dir.path().to_string_lossy()]);
    Proc::spawn(&format!("redis-{port}"), cmd, dir.path())
}

async fn ready(port: u16) -> bool {
    matches!(
        http(
            "GET",
            &format!("http://127.0.0.1:{port}/readyz"),
            None,
            None
        )
        .await,
        Ok((200, _))
    )
}

#[tokio::test]
async fn coordinator_and_worker_started_before_redis_wait_for_it_and_never_log_its_password()
-> Result<()> {
    let dir = TestDir::new("startup")?;
    let etcd = EtcdServer::start().await?;
    let redis_port = free_port()?;
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{redis_port}");
    let (grpc, coord_http, worker_http) = (free_port()?, free_port()?, free_port()?);
    let coordinator = Proc::spawn(
        "coordinator",
        chime_cmd(&[
            "coordinator",
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--http-addr",
            &format!("127.0.0.1:{coord_http}"),
            "--allow-unauthenticated",
            "--redis-url",
            &url,
            "--etcd-endpoints",
            &etcd.endpoint,
        ])?,
        dir.path(),
    )?;
    let mut worker_cmd = chime_cmd(&[
        "worker",
        "--coordinator",
        &format!("http://127.0.0.1:{grpc}"),
        "--http-addr",
        &format!("127.0.0.1:{worker_http}"),
        "--handlers",
        "noop",
        "--redis-url",
        &url,
        "--etcd-endpoints",
        &etcd.endpoint,
    ])?;
    worker_cmd.env("CHIME_WORKER_ID", "w-startup");
    let mut worker = Proc::spawn("worker", worker_cmd, dir.path())?;

    // Both wait, saying so, and keep running.
    for p in [&coordinator, &worker] {
        wait_until(
            "a 'not reachable yet' warning",
            Duration::from_secs(20),
            || async { p.log().contains("store not reachable yet") },
        )
        .await?;
    }
    let mut coordinator = coordinator;
    ensure!(
        coordinator.is_running() && worker.is_running(),
        "a process gave up waiting"
    );

    // Redis comes up: both become ready, the worker registers.
    let _redis = redis_on(redis_port, &dir)?;
    wait_until("the coordinator ready", Duration::from_secs(30), || {
        ready(coord_http)
    })
    .await?;
    wait_until("the worker ready", Duration::from_secs(30), || {
        ready(worker_http)
    })
    .await?;
    let endpoint = format!("http://127.0.0.1:{grpc}");
    wait_until("the worker registered", Duration::from_secs(30), || async {
        run_chime(&["workers", "--coordinator", &endpoint])
            .map(|(code, out, _)| code == 0 && out.contains("w-startup"))
            .unwrap_or(false)
    })
    .await?;
    for p in [&coordinator, &worker] {
        let log = p.log();
        ensure!(
            !log.contains(PASSWORD),
            "the Redis password is in a log:\n{log}"
        );
        ensure!(
            log.contains(":***@127.0.0.1"),
            "the redacted URL is not in the log:\n{log}"
        );
    }
    worker.signal("TERM")?;
    ensure!(worker.wait_exit(Duration::from_secs(30)).await? == Some(0));
    Ok(())
}

#[tokio::test]
async fn a_coordinator_waiting_for_redis_stops_on_sigterm_with_status_0() -> Result<()> {
    let dir = TestDir::new("startup-stop")?;
    let etcd = EtcdServer::start().await?;
    let mut coordinator = Proc::spawn(
        "coordinator",
        chime_cmd(&[
            "coordinator",
            "--grpc-addr",
            &format!("127.0.0.1:{}", free_port()?),
            "--allow-unauthenticated",
            "--redis-url",
            &format!("redis://127.0.0.1:{}", free_port()?),
            "--etcd-endpoints",
            &etcd.endpoint,
        ])?,
        dir.path(),
    )?;
    wait_until(
        "a 'not reachable yet' warning",
        Duration::from_secs(20),
        || async { coordinator.log().contains("store not reachable yet") },
    )
    .await?;
    coordinator.signal("TERM")?;
    let code = coordinator.wait_exit(Duration::from_secs(10)).await?;
    ensure!(code == Some(0), "exit {code:?}:\n{}", coordinator.log());
    Ok(())
}

#[test]
fn a_redis_url_that_is_not_one_fails_at_once_naming_the_field() -> Result<()> {
    let (code, _, err) = run_chime(&[
        "coordinator",
        "--grpc-addr",
        "127.0.0.1:0",
        "--allow-unauthenticated",
        "--redis-url",
        "redis://127.0.0.1:notaport",
        "--etcd-endpoints",
        "http://127.0.0.1:1",
    ])?;
    ensure!(code != 0, "a bad URL was accepted");
    ensure!(
        err.contains("redis.url"),
        "the error does not name redis.url: {err}"
    );
    Ok(())
}
