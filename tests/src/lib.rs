//! The end-to-end harness: starts real servers and real `chime` processes for tests.
//!
//! Everything binds to free loopback ports, writes into its own temp dir, logs each
//! process to its own file, and is killed in `Drop`, so a failing test leaves nothing
//! running. When a test panics, its temp dir (with every log) is kept and its path
//! printed. A server binary that cannot be found fails the test with a message saying
//! how to install it; nothing is skipped silently.

pub mod conformance;
pub mod otlp;
pub mod receivers;
pub mod sdk;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chime_shared::queue::QueueLayout;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::redis_conn::{RedisConn, RedisSpec};

/// A directory for one test's files, removed on drop unless the test panicked.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory named after `name`.
    pub fn new(name: &str) -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "chime-test-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {path:?}"))?;
        Ok(Self { path })
    }
    /// A fresh directory in memory (`/dev/shm`) when that has room for a store's
    /// files, else like [`TestDir::new`]: etcd fsyncs every write, and on a disk
    /// shared by a whole test run those fsyncs stalled etcd's start past its
    /// deadline now and then.
    pub fn in_memory(name: &str) -> Result<Self> {
        let shm = Path::new("/dev/shm");
        if shm_room(shm).is_some_and(|bytes| bytes >= 2 << 30) {
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let path = shm.join(format!(
                "chime-test-{name}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::SeqCst)
            ));
            if std::fs::create_dir_all(&path).is_ok() {
                return Ok(Self { path });
            }
        }
        Self::new(name)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Free bytes of the file system holding `dir` (`df`'s view), if it can be read.
fn shm_room(dir: &Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // Tests that fail by returning an error do not panic here: set
        // CHIME_KEEP_TEST_DIRS=1 to keep every directory and its logs.
        if std::thread::panicking() || std::env::var_os("CHIME_KEEP_TEST_DIRS").is_some() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A free TCP port on 127.0.0.1 (`ops::free_port`: below the ephemeral range, so
/// no outgoing connection takes it before its process binds it).
pub fn free_port() -> Result<u16> {
    Ok(chime_shared::ops::free_port()?)
}

/// Polls `cond` every 20 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finds `name` on PATH (or in /usr/sbin, where Debian puts some servers).
pub fn find_binary(name: &str, install_hint: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/bin".into()]);
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(anyhow!(
        "{name} not found on PATH; this test needs a real {name} ({install_hint})"
    ))
}

/// A child process killed (SIGKILL) and reaped on drop, its output in a log file.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `dir/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }
    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// Sends a signal by name (`TERM`, `STOP`, `CONT`, …) with kill(1).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{sig} {} failed", self.pid());
        }
        Ok(())
    }
    /// Waits up to `timeout` for the process to exit; answers its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(c) = self.child.as_mut() else {
                return Ok(None);
            };
            if let Some(status) = c.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    /// Still running?
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
    /// Peak resident set (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_kib(self.pid())
    }
}

/// Peak resident set (VmHWM) of `pid` in KiB, from /proc.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until the Redis server at `url` answers PING (fails after 10 s).
async fn wait_ping(url: &str) -> Result<()> {
    let client = redis::Client::open(url)?;
    wait_until(
        "redis-server to answer PING",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            async move {
                match client.get_multiplexed_async_connection().await {
                    Ok(mut c) => redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            }
        },
    )
    .await
}

/// Items pending in every queue, as the coordinator's API at `api` reports them.
pub async fn pending_items(api: &str) -> Result<u64> {
    let (_, q) = http("GET", &format!("{api}/api/queues"), Some(ADMIN_TOKEN), None).await?;
    Ok(q["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["pending"].as_u64().unwrap_or(0))
        .sum())
}

/// A real `redis-server` on a free loopback port, with no persistence.
#[derive(Debug)]
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
    /// Port.
    pub port: u16,
    proc: Proc,
    _dir: Arc<TestDir>,
}

impl RedisServer {
    /// Starts one and waits until it answers PING (fails after 10 s).
    pub async fn start() -> Result<Self> {
        let dir = Arc::new(TestDir::new("redis")?);
        Self::start_in(dir).await
    }

    /// Starts one writing into `dir`.
    pub async fn start_in(dir: Arc<TestDir>) -> Result<Self> {
        let bin = find_binary("redis-server", "apt-get install redis-server")?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", &dir.path().to_string_lossy()]);
        let proc = Proc::spawn(&format!("redis-{port}"), cmd, dir.path())?;
        let url = format!("redis://127.0.0.1:{port}");
        wait_ping(&url).await?;
        Ok(Self {
            url,
            port,
            proc,
            _dir: dir,
        })
    }

    /// A connection through chime's own connection type.
    pub async fn conn(&self) -> Result<RedisConn> {
        Ok(RedisConn::connect(&RedisSpec::parse(&self.url)?).await?)
    }

    /// A Redis delay store with `count` queues under `prefix`.
    pub async fn store(&self, prefix: &str, count: u32) -> Result<RedisStore> {
        Ok(RedisStore::open(
            self.conn().await?,
            QueueLayout::new(prefix, "default", count)?,
        )
        .await?
        .announced_through(RedisSpec::parse(&self.url)?))
    }

    /// The server process.
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// A real single-member `etcd` on free loopback ports, with its own data dir. It can
/// be stopped and started again on the same ports and data (restart tests).
#[derive(Debug)]
pub struct EtcdServer {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
    proc: Option<Proc>,
    dir: Arc<TestDir>,
    /// Its data, in memory when there is room (see [`TestDir::in_memory`]).
    data: Arc<TestDir>,
    starts: u32,
}

impl EtcdServer {
    /// Starts one and waits until it answers (fails after 30 s).
    ///
    /// A free port is only free when it is picked: another test's server can bind
    /// it before etcd does (etcd then logs "address already in use" and exits). Such
    /// a start is tried again on new ports, up to three times.
    pub async fn start() -> Result<Self> {
        let mut tries = 0;
        loop {
            tries += 1;
            let dir = Arc::new(TestDir::new("etcd")?);
            let data = Arc::new(TestDir::in_memory("etcd-data")?);
            let (client_port, peer_port) = (free_port()?, free_port()?);
            let mut me = Self {
                endpoint: format!("http://127.0.0.1:{client_port}"),
                client_port,
                peer_port,
                proc: None,
                dir,
                data,
                starts: 0,
            };
            match me.start_again().await {
                Ok(()) => return Ok(me),
                Err(e) if tries < 3 && format!("{e:#}").contains("address already in use") => {
                    me.stop();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts the (stopped) server again with the same ports and data.
    pub async fn start_again(&mut self) -> Result<()> {
        let bin = find_binary("etcd", "apt-get install etcd-server")?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "chime-test"])
            .args([
                "--data-dir",
                &self.data.path().join("data").to_string_lossy(),
            ])
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("chime-test={peer}")])
            .args(["--log-level", "warn"]);
        self.starts += 1;
        let name = format!("etcd-{}-{}", self.client_port, self.starts);
        self.proc = Some(Proc::spawn(&name, cmd, self.dir.path())?);
        let endpoint = self.endpoint.clone();
        let answers = || {
            let endpoint = endpoint.clone();
            async move {
                let Ok(Ok(mut c)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    etcd_client::Client::connect([endpoint.as_str()], None),
                )
                .await
                else {
                    return false;
                };
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), c.get("health-probe", None)).await,
                    Ok(Ok(_))
                )
            }
        };
        // Until it answers, or it exited (a port taken meanwhile: said at once, not
        // after the deadline), or 30 s passed.
        let deadline = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            if answers().await {
                break Ok(());
            }
            if !self.proc.as_mut().is_some_and(Proc::is_running) {
                break Err(anyhow::anyhow!("etcd exited"));
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!(
                    "timed out after 30s waiting for etcd to answer"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The server's own words say why (a port taken meanwhile, a slow disk): a
        // failure names them rather than only the timeout.
        outcome.with_context(|| {
            let log = self.proc.as_ref().map(Proc::log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "etcd on {} did not come up; its log ends:\n{}",
                self.endpoint,
                tail.join("\n")
            )
        })
    }

    /// Kills the server (SIGKILL); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// A client.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.endpoint.as_str()], None).await?)
    }

    /// Runs `etcdctl put key value` against this server, as an operator would.
    pub fn etcdctl_put(&self, key: &str, value: &str) -> Result<()> {
        let bin = find_binary("etcdctl", "apt-get install etcd-client")?;
        let out = Command::new(bin)
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint, "put", "--", key, value])
            .output()?;
        if !out.status.success() {
            bail!(
                "etcdctl put {key} {value}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// A port whose Redis Cluster bus port (+10000) is free too.
fn free_cluster_port() -> Result<u16> {
    for _ in 0..100 {
        let p = free_port()?;
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free port pair for a Redis Cluster node")
}

/// A real Redis Cluster on loopback ports: `masters` masters (slots split evenly by
/// `redis-cli --cluster create`), each with `replicas` replicas, no persistence.
#[derive(Debug)]
pub struct RedisCluster {
    /// Comma-separated `redis://` seed URLs of every node (chime's cluster form).
    pub seeds: String,
    /// Ports of the nodes, with their processes (None once killed).
    pub nodes: Vec<(u16, Option<Proc>)>,
    dir: Arc<TestDir>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node reports
    /// `cluster_state:ok` (fails after 30 s).
    pub async fn start(masters: usize, replicas: usize) -> Result<Self> {
        let dir = Arc::new(TestDir::new("redis-cluster")?);
        let bin = find_binary("redis-server", "apt-get install redis-server")?;
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let port = free_cluster_port()?;
            let d = dir.path().join(port.to_string());
            std::fs::create_dir_all(&d)?;
            let mut cmd = Command::new(&bin);
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-announce-ip",
                    "127.0.0.1",
                ])
                .args(["--cluster-config-file", "nodes.conf"])
                // Fail over within a couple of seconds of a master dying.
                .args(["--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--dir", &d.to_string_lossy()]);
            nodes.push((
                port,
                Some(Proc::spawn(&format!("redis-{port}"), cmd, dir.path())?),
            ));
        }
        for (port, _) in &nodes {
            wait_ping(&format!("redis://127.0.0.1:{port}")).await?;
        }
        let cli = find_binary("redis-cli", "apt-get install redis-tools")?;
        let mut create = Command::new(cli);
        create.args(["--cluster", "create"]);
        for (port, _) in &nodes {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let me = Self {
            seeds: nodes
                .iter()
                .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            nodes,
            dir,
        };
        me.wait_ok(Duration::from_secs(30)).await?;
        Ok(me)
    }

    /// `CLUSTER INFO` of the node on `port`.
    pub async fn info(port: u16) -> Result<String> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}").as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        Ok(redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut c)
            .await?)
    }

    /// Waits until every live node reports `cluster_state:ok`.
    pub async fn wait_ok(&self, timeout: Duration) -> Result<()> {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|(_, p)| p.is_some())
            .map(|(port, _)| *port)
            .collect();
        wait_until("cluster_state:ok on every node", timeout, || {
            let ports = ports.clone();
            async move {
                for p in ports {
                    match Self::info(p).await {
                        Ok(i) if i.contains("cluster_state:ok") => {}
                        _ => return false,
                    }
                }
                true
            }
        })
        .await
    }

    /// Ports of the nodes that are masters now, as `CLUSTER NODES` on a live node
    /// says.
    pub async fn masters(&self) -> Result<Vec<u16>> {
        let port = self
            .nodes
            .iter()
            .find(|(_, p)| p.is_some())
            .map(|(p, _)| *p)
            .context("no live node")?;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}").as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await?;
        Ok(nodes
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() > 2 && f[2].contains("master") && !f[2].contains("fail")
            })
            .filter_map(|l| {
                l.split(' ')
                    .nth(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// Kills the node on `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        if let Some((_, p)) = self.nodes.iter_mut().find(|(q, _)| *q == port)
            && let Some(mut proc) = p.take()
        {
            proc.kill9();
        }
    }

    /// Files of this cluster.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A real 3-member etcd cluster on loopback ports.
#[derive(Debug)]
pub struct EtcdCluster {
    /// Comma-separated `http://` client endpoints of the members.
    pub endpoints: String,
    /// Member processes.
    pub members: Vec<Proc>,
    _dir: Arc<TestDir>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers through every
    /// endpoint (fails after 30 s).
    pub async fn start(n: usize) -> Result<Self> {
        let dir = Arc::new(TestDir::new("etcd-cluster")?);
        let bin = find_binary("etcd", "apt-get install etcd-server")?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let (c, p) = (
                format!("http://127.0.0.1:{client}"),
                format!("http://127.0.0.1:{peer}"),
            );
            let mut cmd = Command::new(&bin);
            cmd.args(["--name", &format!("m{i}")])
                .args([
                    "--data-dir",
                    &dir.path().join(format!("m{i}")).to_string_lossy(),
                ])
                .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                .args([
                    "--listen-peer-urls",
                    &p,
                    "--initial-advertise-peer-urls",
                    &p,
                ])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "chime-test"])
                .args(["--log-level", "warn"]);
            members.push(Proc::spawn(&format!("etcd-m{i}"), cmd, dir.path())?);
        }
        let endpoints: Vec<String> = ports
            .iter()
            .map(|(c, _)| format!("http://127.0.0.1:{c}"))
            .collect();
        for e in &endpoints {
            let e = e.clone();
            wait_until("an etcd member to answer", Duration::from_secs(30), || {
                let e = e.clone();
                async move {
                    let Ok(Ok(mut c)) = tokio::time::timeout(
                        Duration::from_secs(2),
                        etcd_client::Client::connect([e.as_str()], None),
                    )
                    .await
                    else {
                        return false;
                    };
                    matches!(
                        tokio::time::timeout(
                            Duration::from_secs(2),
                            c.put("health-probe", "1", None)
                        )
                        .await,
                        Ok(Ok(_))
                    )
                }
            })
            .await?;
        }
        Ok(Self {
            endpoints: endpoints.join(","),
            members,
            _dir: dir,
        })
    }
}

/// Path of the `chime` binary of this build profile, built on first use.
///
/// Integration tests in this crate cannot get `CARGO_BIN_EXE_chime` (the binary lives
/// in another package), so the harness runs `cargo build -p chime` once per test
/// process (a no-op when fresh) in the profile the tests were built with.
/// `CHIME_BIN` overrides it.
pub fn chime_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_chime().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_chime() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHIME_BIN") {
        return Ok(PathBuf::from(p));
    }
    // Test binaries live in <target>/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target dir from the test binary")?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", "chime", "--bin", "chime"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build -p chime")?;
    if !status.success() {
        bail!("cargo build -p chime failed");
    }
    let bin = profile_dir.join("chime");
    if !bin.is_file() {
        bail!("{} missing after build", bin.display());
    }
    Ok(bin)
}

/// A `chime` command with the given arguments and a quiet default log filter.
pub fn chime_cmd(args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(chime_bin()?);
    cmd.args(args);
    // The harness's own switch, not a chime setting (chime refuses unknown CHIME_*).
    cmd.env_remove("CHIME_KEEP_TEST_DIRS");
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    Ok(cmd)
}

/// Reads `id due_ms handled_ms attempt` lines written by `chime worker --record-file`.
pub fn read_records(path: &Path) -> Vec<Record> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some(Record {
                id: f.next()?.to_owned(),
                due_ms: f.next()?.parse().ok()?,
                handled_ms: f.next()?.parse().ok()?,
                attempt: f.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// One handled item, as recorded by a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Item id.
    pub id: String,
    /// Its due time.
    pub due_ms: i64,
    /// When the handler started (worker clock; taken before it runs).
    pub handled_ms: i64,
    /// Attempt number.
    pub attempt: u32,
}

/// Starts `chime worker` against `redis` with a record file; `extra` adds flags and
/// `env` adds `CHIME_*` variables.
pub fn spawn_worker(
    dir: &Path,
    name: &str,
    redis: &RedisServer,
    prefix: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<(Proc, PathBuf)> {
    spawn_worker_at(dir, name, &redis.url, prefix, extra, env)
}

/// Like [`spawn_worker`], against Redis at `redis_url` (a cluster's seeds too).
pub fn spawn_worker_at(
    dir: &Path,
    name: &str,
    redis_url: &str,
    prefix: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<(Proc, PathBuf)> {
    let record = dir.join(format!("{name}.rec"));
    let mut args: Vec<String> = vec![
        "worker".into(),
        "--redis-url".into(),
        redis_url.to_owned(),
        "--prefix".into(),
        prefix.into(),
        "--worker-id".into(),
        name.into(),
        "--record-file".into(),
        record.to_string_lossy().into_owned(),
    ];
    if !extra.contains(&"--http-addr") {
        // Probes on an ephemeral port: several workers share this host.
        args.extend(["--http-addr".into(), "127.0.0.1:0".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = chime_cmd(&argv)?;
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok((Proc::spawn(name, cmd, dir)?, record))
}

/// PEM files of a throwaway PKI (made with the `openssl` CLI): a CA, a server
/// certificate for `localhost` and `127.0.0.1` (also usable as a client
/// certificate, as coordinators present theirs to peers), a client certificate,
/// and a second CA that signed none of them.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// Server certificate and key.
    pub server_cert: PathBuf,
    /// Key of `server_cert`.
    pub server_key: PathBuf,
    /// Client certificate and key (signed by `ca`).
    pub client_cert: PathBuf,
    /// Key of `client_cert`.
    pub client_key: PathBuf,
    /// A CA unrelated to the certificates above.
    pub rogue_ca: PathBuf,
}

/// Makes [`TlsFiles`] in `dir`.
pub fn tls_files(dir: &Path) -> Result<TlsFiles> {
    let openssl = find_binary("openssl", "apt-get install openssl")?;
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new(&openssl)
            .args(args)
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "rogue"] {
        let (key, crt, subj) = (
            format!("{ca}.key"),
            format!("{ca}.crt"),
            format!("/CN=chime test {ca}"),
        );
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
        a.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        a.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        run(&a)?;
    }
    for (name, eku) in [
        ("server", "serverAuth,clientAuth"),
        ("client", "clientAuth"),
    ] {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage={eku}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
            ),
        )?;
        let mut a = vec!["req"];
        a.extend(ec);
        let (key, csr, crt, ext, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
            format!("/CN={name}"),
        );
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        run(&a)?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])?;
    }
    Ok(TlsFiles {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
        rogue_ca: dir.join("rogue.crt"),
    })
}

/// One HTTP call to a chime process: `method` `url` with an optional bearer token
/// and JSON body; answers the status and the body (JSON, or a JSON string of the
/// text when it is not JSON).
pub async fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut req = client.request(method.parse()?, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok((status, v))
}

/// The sum of every sample of `metric` (any labels) in Prometheus text, or `None`
/// when no sample has that name. `name{…}` matches the labels given.
pub fn metric_sum(text: &str, metric: &str) -> Option<f64> {
    let (name, labels) = match metric.split_once('{') {
        Some((n, l)) => (n, l.trim_end_matches('}')),
        None => (metric, ""),
    };
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (sname, slabels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if sname != name
            || !labels
                .split(',')
                .all(|l| l.is_empty() || slabels.contains(l))
        {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Runs `chime` to completion; answers (exit code, stdout, stderr).
pub fn run_chime(args: &[&str]) -> Result<(i32, String, String)> {
    let out = chime_cmd(args)?.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Coordinator processes (one or several electing a leader) with their workers, on
/// real Redis and etcd.
#[derive(Debug)]
pub struct Cluster {
    /// Redis.
    pub redis: RedisServer,
    /// etcd.
    pub etcd: EtcdServer,
    /// `http://127.0.0.1:<port>` of the first coordinator (admin calls reach the
    /// leader through it).
    pub coordinator: String,
    /// Coordinator processes: port and process (None while stopped).
    pub coords: Vec<(u16, Option<Proc>)>,
    /// Worker processes by id.
    pub workers: Vec<(String, Proc)>,
    /// The job record file every worker appends to.
    pub records: PathBuf,
    /// Files of this cluster.
    pub dir: Arc<TestDir>,
    /// HTTP ports (console, API, metrics) of the coordinators, by index.
    pub http_ports: Vec<u16>,
    /// The admin token (in `admin.token`); workers use `worker.token`.
    pub admin_token: String,
    /// `coordinator.min_period_ms` of coordinators started from now on (tests fire
    /// jobs every few hundred ms; production's floor is 1 s).
    pub min_period_ms: u64,
    /// Environment of every coordinator and job worker this cluster starts.
    pub env: Vec<(String, String)>,
    spawned: u32,
}

/// The admin token every test cluster uses.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The worker token every test cluster uses.
pub const WORKER_TOKEN: &str = "test-worker-token-0123456789";
/// The producer token every test cluster uses (opens only the delay queue).
pub const PRODUCER_TOKEN: &str = "test-producer-token-0123456789";

/// One finished shard, as a worker recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// Job.
    pub job: String,
    /// Run id.
    pub run_id: String,
    /// Shard index.
    pub shard: u32,
    /// Shards in the run.
    pub total: u32,
    /// Assignment number.
    pub attempt: u32,
    /// Handler start (worker clock).
    pub started_ms: i64,
    /// Handler end.
    pub finished_ms: i64,
    /// succeeded, failed or cancelled.
    pub status: String,
    /// Worker.
    pub worker: String,
    /// Scheduled instant of the fire.
    pub scheduled_ms: i64,
}

impl Cluster {
    /// Redis, etcd, one coordinator and `workers` workers (`w1`…) with the built-in
    /// handlers; waits until every worker is registered.
    pub async fn start(workers: usize) -> Result<Self> {
        Self::start_ha(1, workers).await
    }

    /// Like [`Cluster::start`] with `coordinators` coordinators electing a leader.
    pub async fn start_ha(coordinators: usize, workers: usize) -> Result<Self> {
        Self::start_with_env(coordinators, workers, &[]).await
    }

    /// Like [`Cluster::start_ha`], with `env` set for every coordinator and job
    /// worker.
    pub async fn start_with_env(
        coordinators: usize,
        workers: usize,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = Arc::new(TestDir::new("cluster")?);
        let redis = RedisServer::start_in(dir.clone()).await?;
        let etcd = EtcdServer::start().await?;
        let mut coords = Vec::new();
        let mut http_ports = Vec::new();
        for _ in 0..coordinators {
            coords.push((free_port()?, None));
            http_ports.push(free_port()?);
        }
        std::fs::write(dir.path().join("admin.token"), format!("{ADMIN_TOKEN}\n"))?;
        std::fs::write(dir.path().join("worker.token"), format!("{WORKER_TOKEN}\n"))?;
        std::fs::write(
            dir.path().join("producer.token"),
            format!("{PRODUCER_TOKEN}\n"),
        )?;
        let mut c = Self {
            http_ports,
            admin_token: ADMIN_TOKEN.to_owned(),
            min_period_ms: 100,
            coordinator: format!("http://127.0.0.1:{}", coords[0].0),
            redis,
            etcd,
            coords,
            workers: Vec::new(),
            records: dir.path().join("jobs.rec"),
            dir,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            spawned: 0,
        };
        for i in 0..coordinators {
            c.start_coordinator(i)?;
        }
        for i in 1..=workers {
            c.add_worker(&format!("w{i}"))?;
        }
        c.wait_workers(workers).await?;
        Ok(c)
    }

    /// Starts (again) coordinator `i` on its port.
    pub fn start_coordinator(&mut self, i: usize) -> Result<()> {
        self.spawned += 1;
        let port = self.coords[i].0;
        let addr = format!("127.0.0.1:{port}");
        let http = format!("127.0.0.1:{}", self.http_ports[i]);
        let admin = self.dir.path().join("admin.token");
        let worker = self.dir.path().join("worker.token");
        let producer = self.dir.path().join("producer.token");
        let cmd = chime_cmd(&[
            "coordinator",
            "--grpc-addr",
            &addr,
            "--http-addr",
            &http,
            "--admin-token-file",
            &admin.to_string_lossy(),
            "--worker-token-file",
            &worker.to_string_lossy(),
            "--producer-token-file",
            &producer.to_string_lossy(),
            "--redis-url",
            &self.redis.url,
            "--etcd-endpoints",
            &self.etcd.endpoint,
            "--heartbeat-interval-ms",
            "500",
            "--election-ttl-s",
            "3",
        ])?;
        let mut cmd = cmd;
        cmd.env(
            "CHIME_COORDINATOR_MIN_PERIOD_MS",
            self.min_period_ms.to_string(),
        );
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.coords[i].1 = Some(Proc::spawn(
            &format!("coordinator-{i}-{}", self.spawned),
            cmd,
            self.dir.path(),
        )?);
        Ok(())
    }

    /// Kills coordinator `i` (SIGKILL).
    pub fn kill_coordinator_at(&mut self, i: usize) {
        if let Some(mut p) = self.coords[i].1.take() {
            p.kill9();
        }
    }

    /// Kills the (first) coordinator (SIGKILL).
    pub fn kill_coordinator(&mut self) {
        self.kill_coordinator_at(0);
    }

    /// Starts the first coordinator again.
    pub fn restart_coordinator(&mut self, _n: u32) -> Result<()> {
        self.start_coordinator(0)
    }

    /// Every coordinator endpoint.
    pub fn endpoints(&self) -> String {
        self.coords
            .iter()
            .map(|(p, _)| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Of a two-coordinator cluster: once a leader is known (within 20 s), the
    /// follower's JSON API (`http://…`) and gRPC endpoint, where calls are
    /// forwarded to the leader.
    pub async fn follower(&self) -> Result<(String, String)> {
        wait_until("a leader", Duration::from_secs(20), || {
            let known = self.leader_index().is_some();
            async move { known }
        })
        .await?;
        let follower = 1 - self.leader_index().unwrap_or_default();
        Ok((
            format!("http://127.0.0.1:{}", self.http_ports[follower]),
            format!("http://127.0.0.1:{}", self.coords[follower].0),
        ))
    }

    /// Index of the coordinator that leads now, as the live ones report it.
    pub fn leader_index(&self) -> Option<usize> {
        for (port, p) in &self.coords {
            if p.is_none() {
                continue;
            }
            let url = format!("http://127.0.0.1:{port}");
            let Ok(v) = self.admin_at(&url, &["workers"]) else {
                continue;
            };
            let leader = v["leader"].as_str().unwrap_or_default().to_owned();
            if leader.is_empty() {
                continue;
            }
            return self
                .coords
                .iter()
                .position(|(p, _)| leader.ends_with(&format!(":{p}")));
        }
        None
    }

    /// The coordinator process `i`.
    pub fn coordinator_proc(&mut self, i: usize) -> Option<&mut Proc> {
        self.coords[i].1.as_mut()
    }

    /// Starts worker `id` (job shards only).
    pub fn add_worker(&mut self, id: &str) -> Result<()> {
        let rec = self.records.to_string_lossy().into_owned();
        let token = self.dir.path().join("worker.token");
        // Every coordinator, as a deployment's Service would reach them: a worker
        // that knows only one cannot find the next leader once that one is gone.
        let endpoints = self.endpoints();
        let cmd = chime_cmd(&[
            "worker",
            "--no-queue",
            "--http-addr",
            "127.0.0.1:0",
            "--token-file",
            &token.to_string_lossy(),
            "--coordinator",
            &endpoints,
            "--worker-id",
            id,
            "--handlers",
            "noop,log,sleep,fail",
            "--job-record-file",
            &rec,
        ])?;
        let mut cmd = cmd;
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let p = Proc::spawn(&format!("worker-{id}"), cmd, self.dir.path())?;
        self.workers.push((id.to_owned(), p));
        Ok(())
    }

    /// A `chime worker` that consumes the delay queues (prefix `chime`, one queue
    /// for a new family, handlers noop and fail) and runs job shards for every
    /// coordinator of this cluster, with live settings from its etcd; `extra` flags
    /// and `env` on top. Not added to [`Cluster::workers`].
    pub fn queue_worker(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let token = self.dir.path().join("worker.token");
        let endpoints = self.endpoints();
        let mut args = vec![
            "--coordinator",
            &endpoints,
            "--token-file",
            token.to_str().unwrap_or_default(),
            "--etcd-endpoints",
            &self.etcd.endpoint,
            "--handlers",
            "noop,fail",
            "--queues",
            "1",
        ];
        args.extend_from_slice(extra);
        let (p, _) = spawn_worker(self.dir.path(), name, &self.redis, "chime", &args, env)?;
        Ok(p)
    }

    /// The worker process `id`.
    pub fn worker(&mut self, id: &str) -> Option<&mut Proc> {
        self.workers
            .iter_mut()
            .find(|(w, _)| w == id)
            .map(|(_, p)| p)
    }

    /// Waits until `n` workers are registered.
    pub async fn wait_workers(&self, n: usize) -> Result<()> {
        let last = std::sync::Mutex::new(String::new());
        wait_until(
            &format!("{n} workers registered"),
            Duration::from_secs(30),
            || async {
                match self.admin(&["workers"]) {
                    Ok(v) => v["workers"].as_array().map_or(0, Vec::len) == n,
                    Err(e) => {
                        *last.lock().unwrap_or_else(|p| p.into_inner()) = format!("{e:#}");
                        false
                    }
                }
            },
        )
        .await
        // Why: the last refusal, and what each coordinator said last.
        .with_context(|| {
            let mut why = format!(
                "last admin error: {}",
                last.lock().unwrap_or_else(|p| p.into_inner())
            );
            for (i, (_, p)) in self.coords.iter().enumerate() {
                let Some(p) = p else { continue };
                let log = p.log();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                why.push_str(&format!(
                    "\ncoordinator {i}'s log ends:\n{}",
                    tail.join("\n")
                ));
            }
            why
        })
    }

    /// Runs an admin command (`job …`, `runs …`, `workers`) against this
    /// coordinator and parses its JSON; a non-zero exit is an error with stderr.
    pub fn admin(&self, args: &[&str]) -> Result<serde_json::Value> {
        self.admin_at(&self.coordinator, args)
    }

    /// Like [`Cluster::admin`], against the coordinator at `url`.
    pub fn admin_at(&self, url: &str, args: &[&str]) -> Result<serde_json::Value> {
        let mut all: Vec<&str> = args.to_vec();
        let at = if args[0] == "workers" {
            1
        } else {
            1.min(args.len())
        };
        all.insert(at, "--coordinator");
        all.insert(at + 1, url);
        // A coordinator between two terms of its own (its lease lapsed on a loaded
        // machine, and it is campaigning again) answers "not the leader" for a
        // moment: an operator would run the command again, and so does this, for
        // up to 10 s. Every other failure is returned at once.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = chime_cmd(&all)?
                .env("CHIME_ADMIN_TOKEN", &self.admin_token)
                .output()?;
            let (code, out, err) = (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
            if code == 0 {
                return Ok(serde_json::from_str(out.trim())?);
            }
            if !err.contains("not the leader") || Instant::now() > deadline {
                bail!("chime {}: {}", args.join(" "), err.trim());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every finished shard recorded so far.
    pub fn records(&self) -> Vec<JobRecord> {
        std::fs::read_to_string(&self.records)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                if f.len() != 10 {
                    return None;
                }
                Some(JobRecord {
                    job: f[0].to_owned(),
                    run_id: f[1].to_owned(),
                    shard: f[2].parse().ok()?,
                    total: f[3].parse().ok()?,
                    attempt: f[4].parse().ok()?,
                    started_ms: f[5].parse().ok()?,
                    finished_ms: f[6].parse().ok()?,
                    status: f[7].to_owned(),
                    worker: f[8].to_owned(),
                    scheduled_ms: f[9].parse().ok()?,
                })
            })
            .collect()
    }

    /// Records of `job`.
    pub fn records_of(&self, job: &str) -> Vec<JobRecord> {
        self.records()
            .into_iter()
            .filter(|r| r.job == job)
            .collect()
    }
}
