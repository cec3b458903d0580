//! TLS everywhere chime listens or dials: a coordinator with TLS on gRPC and HTTP and
//! mutual TLS for gRPC clients; a worker with the CA and a client certificate runs a
//! job through it; clients without the CA, with another CA, without a client
//! certificate or in plain text are refused. Redis (`rediss://`, password) and etcd
//! (`https://`, user) behind TLS are reached with their CA. Certificates come from a
//! throwaway PKI made with `openssl`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chime_tests::{
    ADMIN_TOKEN, EtcdServer, Proc, RedisServer, TestDir, WORKER_TOKEN, chime_cmd, find_binary,
    free_port, tls_files, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs a `chime` client command with `env`; answers (exit code, stdout, stderr).
fn chime(args: &[&str], env: &[(&str, String)]) -> Result<(i32, String, String)> {
    let mut cmd = chime_cmd(args)?;
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// GET `path` over HTTPS trusting `ca`; answers the status line.
async fn https_get(port: u16, path: &str, ca: &std::path::Path) -> Result<String> {
    chime_shared::tls::install_provider();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out.lines().next().unwrap_or_default().to_owned())
}

use rustls::pki_types::pem::PemObject;

#[tokio::test]
async fn coordinator_tls_and_mutual_tls() -> Result<()> {
    let dir = TestDir::new("tls")?;
    let pki = tls_files(dir.path())?;
    let redis = RedisServer::start().await?;
    let etcd = EtcdServer::start().await?;
    std::fs::write(dir.path().join("admin.token"), ADMIN_TOKEN)?;
    std::fs::write(dir.path().join("worker.token"), WORKER_TOKEN)?;
    let (gp, hp) = (free_port()?, free_port()?);
    let p = |f: &std::path::Path| f.to_string_lossy().into_owned();
    let mut cmd = chime_cmd(&[
        "coordinator",
        "--grpc-addr",
        &format!("127.0.0.1:{gp}"),
        "--http-addr",
        &format!("127.0.0.1:{hp}"),
        "--redis-url",
        &redis.url,
        "--etcd-endpoints",
        &etcd.endpoint,
        "--admin-token-file",
        &p(&dir.path().join("admin.token")),
        "--worker-token-file",
        &p(&dir.path().join("worker.token")),
    ])?;
    cmd.env("CHIME_TLS_CERT_FILE", p(&pki.server_cert))
        .env("CHIME_TLS_KEY_FILE", p(&pki.server_key))
        .env("CHIME_TLS_CLIENT_CA_FILE", p(&pki.ca))
        .env("CHIME_COORDINATOR_MIN_PERIOD_MS", "100");
    let _coord = Proc::spawn("coordinator", cmd, dir.path())?;
    let url = format!("https://127.0.0.1:{gp}");

    // The console over HTTPS, with the CA; browsers need no client certificate.
    wait_until(
        "the console over HTTPS",
        Duration::from_secs(20),
        || async {
            https_get(hp, "/livez", &pki.ca)
                .await
                .is_ok_and(|l| l.contains("200"))
        },
    )
    .await?;
    ensure!(
        https_get(hp, "/livez", &pki.rogue_ca).await.is_err(),
        "a rogue CA was trusted"
    );

    // Admin calls: everything right works; each missing piece is refused.
    let good = vec![
        ("CHIME_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("CHIME_TLS_CA_FILE", p(&pki.ca)),
        ("CHIME_TLS_CERT_FILE", p(&pki.client_cert)),
        ("CHIME_TLS_KEY_FILE", p(&pki.client_key)),
    ];
    let (code, out, err) = chime(&["workers", "--coordinator", &url], &good)?;
    ensure!(code == 0, "with CA and client certificate: {err}{out}");
    let without = |drop: &[&str]| -> Vec<(&str, String)> {
        good.iter()
            .filter(|(k, _)| !drop.contains(k))
            .cloned()
            .collect()
    };
    let (code, _, err) = chime(
        &["workers", "--coordinator", &url],
        &without(&["CHIME_TLS_CA_FILE"]),
    )?;
    ensure!(
        code != 0 && err.contains("certificate"),
        "without the CA: exit {code}: {err}"
    );
    let mut rogue = good.clone();
    rogue[1].1 = p(&pki.rogue_ca);
    let (code, _, err) = chime(&["workers", "--coordinator", &url], &rogue)?;
    ensure!(
        code != 0 && err.contains("certificate"),
        "with another CA: exit {code}: {err}"
    );
    let (code, _, err) = chime(
        &["workers", "--coordinator", &url],
        &without(&["CHIME_TLS_CERT_FILE", "CHIME_TLS_KEY_FILE"]),
    )?;
    ensure!(
        code != 0,
        "without a client certificate (mutual TLS): {err}"
    );
    let plain = format!("http://127.0.0.1:{gp}");
    let (code, _, err) = chime(&["workers", "--coordinator", &plain], &good)?;
    ensure!(code != 0, "plain text to a TLS port: {err}");

    // A worker with the CA and a client certificate registers and runs a job; one
    // without a client certificate is refused at the handshake.
    let worker = |name: &str, cert: bool| -> Result<Proc> {
        let mut cmd = chime_cmd(&[
            "worker",
            "--no-queue",
            "--coordinator",
            &url,
            "--worker-id",
            name,
            "--http-addr",
            "127.0.0.1:0",
            "--token-file",
            &p(&dir.path().join("worker.token")),
        ])?;
        cmd.env("CHIME_COORDINATOR_TLS_CA_FILE", p(&pki.ca));
        if cert {
            cmd.env("CHIME_COORDINATOR_TLS_CERT_FILE", p(&pki.client_cert))
                .env("CHIME_COORDINATOR_TLS_KEY_FILE", p(&pki.client_key));
        }
        Proc::spawn(name, cmd, dir.path())
    };
    let _w1 = worker("w-tls", true)?;
    let stranger = worker("w-nocert", false)?;
    wait_until(
        "the TLS worker registers",
        Duration::from_secs(20),
        || async {
            chime(&["workers", "--coordinator", &url], &good)
                .is_ok_and(|(c, o, _)| c == 0 && o.contains("w-tls"))
        },
    )
    .await?;
    wait_until(
        "the worker without a certificate is refused",
        Duration::from_secs(20),
        || async {
            stranger
                .log()
                .contains("TLS handshake with the coordinator failed")
                || stranger.log().contains("session refused")
        },
    )
    .await?;
    let (code, out, _) = chime(&["workers", "--coordinator", &url], &good)?;
    ensure!(code == 0 && !out.contains("w-nocert"), "{out}");
    let (code, _, err) = chime(
        &[
            "job",
            "--coordinator",
            &url,
            "create",
            "--name",
            "t",
            "--handler",
            "noop",
            "--manual",
        ],
        &good,
    )?;
    ensure!(code == 0, "{err}");
    let (code, out, err) = chime(&["job", "--coordinator", &url, "trigger", "t"], &good)?;
    ensure!(code == 0, "{err}");
    let run: serde_json::Value = serde_json::from_str(out.trim())?;
    let id = run["run_id"].as_str().context("run id")?.to_owned();
    wait_until("the job runs over TLS", Duration::from_secs(20), || async {
        chime(&["runs", "--coordinator", &url, "get", &id], &good)
            .ok()
            .and_then(|(_, o, _)| serde_json::from_str::<serde_json::Value>(o.trim()).ok())
            .is_some_and(|r| r["state"] == "succeeded")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn redis_and_etcd_behind_tls_with_credentials() -> Result<()> {
    let dir = Arc::new(TestDir::new("store-tls")?);
    let pki = tls_files(dir.path())?;
    let p = |f: &std::path::Path| f.to_string_lossy().into_owned();
    // Redis: TLS only, with a password.
    let rport = free_port()?;
    let mut cmd =
        std::process::Command::new(find_binary("redis-server", "apt-get install redis-server")?);
    cmd.args([
        "--port",
        "0",
        "--tls-port",
        &rport.to_string(),
        "--bind",
        "127.0.0.1",
    ])
    .args([
        "--tls-cert-file",
        &p(&pki.server_cert),
        "--tls-key-file",
        &p(&pki.server_key),
    ])
    .args([
        "--tls-ca-cert-file",
        &p(&pki.ca),
        "--tls-auth-clients",
        "no",
    ])
    .args([
        "--requirepass",
        "s3cret-redis",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args(["--dir", &p(dir.path())]);
    let _redis = Proc::spawn("redis-tls", cmd, dir.path())?;
    // etcd: HTTPS client URLs, with a user (auth enabled through etcdctl).
    let (cport, pport) = (free_port()?, free_port()?);
    let etcd_url = format!("https://127.0.0.1:{cport}");
    let mut cmd = std::process::Command::new(find_binary("etcd", "apt-get install etcd-server")?);
    cmd.args(["--data-dir", &p(&dir.path().join("etcd"))])
        .args([
            "--listen-client-urls",
            &etcd_url,
            "--advertise-client-urls",
            &etcd_url,
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{pport}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{pport}"),
        ])
        .args([
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{pport}"),
        ])
        .args([
            "--cert-file",
            &p(&pki.server_cert),
            "--key-file",
            &p(&pki.server_key),
        ]);
    let _etcd = Proc::spawn("etcd-tls", cmd, dir.path())?;
    let etcdctl = |args: &[&str]| -> Result<String> {
        let out =
            std::process::Command::new(find_binary("etcdctl", "apt-get install etcd-client")?)
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &etcd_url, "--cacert", &p(&pki.ca)])
                .args(args)
                .output()?;
        ensure!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    wait_until("etcd over TLS", Duration::from_secs(20), || async {
        etcdctl(&["endpoint", "health"]).is_ok()
    })
    .await?;
    etcdctl(&["user", "add", "root:r00t-pass"])?;
    etcdctl(&["user", "add", "chime:chime-pass"])?;
    etcdctl(&["role", "add", "chime"])?;
    etcdctl(&[
        "role",
        "grant-permission",
        "chime",
        "--prefix=true",
        "readwrite",
        "/chime/",
    ])?;
    etcdctl(&["user", "grant-role", "chime", "chime"])?;
    etcdctl(&["auth", "enable"])?;

    let redis_url = format!("rediss://:s3cret-redis@127.0.0.1:{rport}");
    let env = vec![
        ("CHIME_REDIS_TLS_CA_FILE", p(&pki.ca)),
        ("CHIME_ETCD_TLS_CA_FILE", p(&pki.ca)),
        ("CHIME_ETCD_USER", "chime".to_owned()),
        ("CHIME_ETCD_PASSWORD", "chime-pass".to_owned()),
    ];
    wait_until("redis over TLS", Duration::from_secs(20), || async {
        chime(&["queue", "--redis-url", &redis_url, "stats"], &env).is_ok_and(|(c, _, _)| c == 0)
    })
    .await?;
    // Without the CA, both refuse to connect; with it, items and settings flow.
    let (code, _, err) = chime(&["queue", "--redis-url", &redis_url, "stats"], &[])?;
    ensure!(code != 0, "rediss:// without the CA: {err}");
    let (code, _, err) = chime(
        &["config", "--etcd-endpoints", &etcd_url, "list"],
        &env[2..],
    )?;
    ensure!(code != 0, "https etcd without the CA: {err}");
    let (code, _, err) = chime(
        &[
            "config",
            "--etcd-endpoints",
            &etcd_url,
            "set",
            "queues/default/visibility_ms",
            "15000",
        ],
        &env,
    )?;
    ensure!(code == 0, "{err}");
    let rec = dir.path().join("w.rec");
    let mut cmd = chime_cmd(&[
        "worker",
        "--redis-url",
        &redis_url,
        "--etcd-endpoints",
        &etcd_url,
        "--worker-id",
        "w",
        "--http-addr",
        "127.0.0.1:0",
        "--record-file",
        &p(&rec),
    ])?;
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let w = Proc::spawn("worker", cmd, dir.path())?;
    let (code, _, err) = chime(
        &[
            "queue",
            "--redis-url",
            &redis_url,
            "enqueue",
            "--id",
            "tls-1",
            "--handler",
            "noop",
            "--in-ms",
            "0",
        ],
        &env,
    )?;
    ensure!(code == 0, "{err}");
    wait_until(
        "the item fires through TLS Redis",
        Duration::from_secs(20),
        || async { std::fs::read_to_string(&rec).is_ok_and(|t| t.contains("tls-1")) },
    )
    .await?;
    wait_until(
        "the worker applied the etcd setting",
        Duration::from_secs(20),
        || async { w.log().contains("live config loaded") && w.log().contains("settings=1") },
    )
    .await?;
    Ok(())
}
