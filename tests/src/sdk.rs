//! The SDK conformance harness: a real cluster (Redis, etcd, coordinators), a
//! `chime worker` serving the delivery service, and the SDK under test as separate
//! agent processes (see `sdk/conformance/README.md`). Scenarios live in
//! `tests/tests/sdk_conformance.rs`; this module only starts and reads things.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, anyhow, bail};
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::queue::{DelayStore, QueueLayout};
use serde_json::Value;

use crate::{Cluster, Proc, chime_cmd, free_port};

/// An SDK with a conformance agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    /// `chime-worker` (agent: `chime-sdk-agent`).
    Rust,
    /// `sdk/python` (agent: `sdk/python/conformance/agent.py`).
    Python,
    /// `sdk/node`, TypeScript (agent: `sdk/node/conformance/agent`).
    Node,
    /// `sdk/go` (agent: `sdk/go/conformance/agent`).
    Go,
    /// `sdk/java` (agent: `sdk/java/conformance/agent`).
    Java,
}

/// What an agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Job handlers over a coordinator session.
    Jobs,
    /// Item handlers over the delivery service.
    Items,
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The Rust agent, built on first use in this test binary's profile.
fn rust_agent() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let profile = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("cannot locate the target dir")?
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace()).args([
            "build",
            "--quiet",
            "-p",
            "chime-tests",
            "--bin",
            "chime-sdk-agent",
        ]);
        if profile.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let ok = cmd.status().map_err(|e| e.to_string())?.success();
        let bin = profile.join("chime-sdk-agent");
        if !ok || !bin.is_file() {
            return Err("cargo build -p chime-tests --bin chime-sdk-agent failed".into());
        }
        Ok(bin)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// A virtualenv with `sdk/python` installed (editable), made on first use under the
/// target dir and remade when `pyproject.toml` changes. Needs `python3` with
/// `venv` and a reachable package index the first time; a machine without them
/// fails the Python scenarios with this error (they are never skipped).
pub fn python_env() -> Result<PathBuf> {
    static ENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ENV.get_or_init(|| make_python_env().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn make_python_env() -> Result<PathBuf> {
    let sdk = workspace().join("sdk/python");
    let pyproject =
        std::fs::read(sdk.join("pyproject.toml")).context("sdk/python/pyproject.toml")?;
    let stamp = format!("{:016x}", chime_shared::queue::fnv1a64(&pyproject));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let venv = target.join("sdk-python-venv");
    let python = venv.join("bin/python");
    let marker = venv.join("chime-stamp");
    if python.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&stamp) {
        return Ok(python);
    }
    let host = std::env::var("CHIME_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let _ = std::fs::remove_dir_all(&venv);
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd.output().with_context(|| what.to_owned())?;
        if !out.status.success() {
            bail!(
                "{what} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    run(
        Command::new(&host).args(["-m", "venv"]).arg(&venv),
        &format!("{host} -m venv (install python3-venv)"),
    )?;
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-e",
            ])
            .arg(&sdk),
        "pip install -e sdk/python",
    )?;
    std::fs::write(&marker, &stamp)?;
    Ok(python)
}

/// The agent of an SDK built by its own toolchain: `sdk/<name>/conformance/agent`,
/// an executable that builds the SDK and its agent when they are missing or stale
/// (under a lock, into the target dir) and then runs it. The build is run once here,
/// before the agent is first started, so its time (and a toolchain that is missing)
/// shows up as a clear error rather than as an agent that never registers.
fn script_agent(sdk: Sdk) -> Result<PathBuf> {
    /// Each SDK's build result, kept so a failed build is reported once per process.
    type Builds = Vec<(Sdk, Result<PathBuf, String>)>;
    static BUILT: OnceLock<std::sync::Mutex<Builds>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| anyhow!("agent build lock poisoned"))?;
    if let Some((_, r)) = built.iter().find(|(s, _)| *s == sdk) {
        return r.clone().map_err(|e| anyhow!(e));
    }
    let script = workspace().join(format!("sdk/{}/conformance/agent", sdk.name()));
    let r = (|| {
        if !script.is_file() {
            return Err(format!("{} is missing", script.display()));
        }
        let out = Command::new(&script)
            .arg("build")
            .output()
            .map_err(|e| format!("{}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} build failed: {}{}",
                script.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(script.clone())
    })();
    built.push((sdk, r.clone()));
    r.map_err(|e| anyhow!(e))
}

impl Sdk {
    /// The agent command with `args`.
    pub fn agent(self, args: &[&str]) -> Result<Command> {
        let mut cmd = match self {
            Sdk::Rust => Command::new(rust_agent()?),
            Sdk::Python => {
                let mut c = Command::new(python_env()?);
                c.arg(workspace().join("sdk/python/conformance/agent.py"));
                c
            }
            Sdk::Node | Sdk::Go | Sdk::Java => Command::new(script_agent(self)?),
        };
        cmd.args(args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        Ok(cmd)
    }

    /// Lower-case name, for file names.
    pub fn name(self) -> &'static str {
        match self {
            Sdk::Rust => "rust",
            Sdk::Python => "python",
            Sdk::Node => "node",
            Sdk::Go => "go",
            Sdk::Java => "java",
        }
    }
}

/// A cluster for one scenario: Redis, etcd, coordinators, one `chime worker`
/// serving deliveries, and the agents the scenario starts.
#[derive(Debug)]
pub struct SdkEnv {
    /// The SDK under test.
    pub sdk: Sdk,
    /// Redis, etcd and the coordinators (no built-in workers).
    pub cluster: Cluster,
    /// `http://127.0.0.1:<port>` of the delivery service.
    pub deliveries: String,
    /// The chime worker serving it.
    pub chime_worker: Proc,
    /// The delay store the chime worker consumes (`chime`/`default`, 8 queues).
    pub store: Arc<dyn DelayStore>,
    agents: Vec<(String, Proc, PathBuf)>,
}

impl SdkEnv {
    /// Starts everything but the agents.
    pub async fn start(sdk: Sdk, coordinators: usize) -> Result<Self> {
        // Fail early (and clearly) when the agent cannot be made.
        sdk.agent(&[])?;
        let cluster = Cluster::start_ha(coordinators, 0).await?;
        let port = free_port()?;
        let token = cluster.dir.path().join("worker.token");
        let mut cmd = chime_cmd(&[
            "worker",
            "--redis-url",
            &cluster.redis.url,
            "--etcd-endpoints",
            &cluster.etcd.endpoint,
            "--worker-id",
            "chime-worker",
            "--handlers",
            "none",
            "--deliveries-addr",
            &format!("127.0.0.1:{port}"),
            "--token-file",
            &token.to_string_lossy(),
            "--http-addr",
            "127.0.0.1:0",
        ])?;
        // Quick retries, so retry scenarios take a second, not minutes.
        cmd.env("CHIME_CONSUMER_RETRY_BASE_MS", "100")
            .env("CHIME_CONSUMER_IDLE_SLEEP_MAX_MS", "200");
        let chime_worker = Proc::spawn("chime-worker", cmd, cluster.dir.path())?;
        let layout = QueueLayout::new("chime", "default", 8)?;
        let store: Arc<dyn DelayStore> =
            Arc::new(RedisStore::open(cluster.redis.conn().await?, layout).await?);
        let deliveries = format!("http://127.0.0.1:{port}");
        crate::wait_until(
            "the delivery service to listen",
            std::time::Duration::from_secs(20),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await?;
        Ok(Self {
            sdk,
            cluster,
            deliveries,
            chime_worker,
            store,
            agents: Vec::new(),
        })
    }

    /// The worker token file (also the delivery service's).
    pub fn token_file(&self) -> PathBuf {
        self.cluster.dir.path().join("worker.token")
    }

    /// Starts agent `name` (`run`) in `role` with the worker token; `extra` adds
    /// flags. Answers its record file.
    pub fn agent(&mut self, name: &str, role: Role, extra: &[&str]) -> Result<PathBuf> {
        let token = self.token_file().to_string_lossy().into_owned();
        let mut args = vec!["--token-file", token.as_str()];
        args.extend_from_slice(extra);
        self.agent_with(name, role, &args)
    }

    /// Like [`SdkEnv::agent`] with exactly `flags` (no token unless given).
    pub fn agent_with(&mut self, name: &str, role: Role, flags: &[&str]) -> Result<PathBuf> {
        let endpoints = self.cluster.endpoints();
        self.spawn_agent(name, role, &endpoints, flags)
    }

    /// A job agent with the worker token that reaches the coordinators only at
    /// `endpoints` (e.g. through a fault proxy).
    pub fn job_agent_at(&mut self, name: &str, endpoints: &str) -> Result<PathBuf> {
        let token = self.token_file().to_string_lossy().into_owned();
        self.spawn_agent(
            name,
            Role::Jobs,
            endpoints,
            &["--token-file", token.as_str()],
        )
    }

    fn spawn_agent(
        &mut self,
        name: &str,
        role: Role,
        endpoints: &str,
        flags: &[&str],
    ) -> Result<PathBuf> {
        let record = self.cluster.dir.path().join(format!("{name}.jsonl"));
        let record_s = record.to_string_lossy().into_owned();
        let mut args = vec!["run", "--record", record_s.as_str(), "--worker-id", name];
        match role {
            Role::Jobs => args.extend(["--coordinator", endpoints]),
            Role::Items => args.extend(["--deliveries", self.deliveries.as_str()]),
        }
        args.extend_from_slice(flags);
        let cmd = self.sdk.agent(&args)?;
        let proc = Proc::spawn(
            &format!("agent-{}-{name}", self.sdk.name()),
            cmd,
            self.cluster.dir.path(),
        )?;
        self.agents.push((name.to_owned(), proc, record.clone()));
        Ok(record)
    }

    /// Runs `produce` to completion (30 s at most); answers its records.
    pub async fn produce(&mut self) -> Result<Vec<Value>> {
        let record = self.cluster.dir.path().join("produce.jsonl");
        let token = self.cluster.dir.path().join("producer.token");
        let cmd = self.sdk.agent(&[
            "produce",
            "--record",
            &record.to_string_lossy(),
            "--coordinator",
            &self.cluster.coordinator,
            "--token-file",
            &token.to_string_lossy(),
        ])?;
        let mut p = Proc::spawn(
            &format!("agent-{}-produce", self.sdk.name()),
            cmd,
            self.cluster.dir.path(),
        )?;
        let code = p.wait_exit(std::time::Duration::from_secs(30)).await?;
        if code != Some(0) {
            bail!("produce exited {code:?}: {}", p.log());
        }
        Ok(read_jsonl(&record))
    }

    /// Agent `name`'s process.
    pub fn agent_proc(&mut self, name: &str) -> Result<&mut Proc> {
        self.agents
            .iter_mut()
            .find(|(n, _, _)| n == name)
            .map(|(_, p, _)| p)
            .with_context(|| format!("no agent {name}"))
    }

    /// Every record agent `name` wrote so far.
    pub fn records(&self, name: &str) -> Vec<Value> {
        self.agents
            .iter()
            .filter(|(n, _, _)| n == name)
            .flat_map(|(_, _, r)| read_jsonl(r))
            .collect()
    }

    /// Records of `kind` from every agent.
    pub fn all(&self, kind: &str) -> Vec<Value> {
        self.agents
            .iter()
            .flat_map(|(_, _, r)| read_jsonl(r))
            .filter(|v| v["kind"] == kind)
            .collect()
    }
}

/// The JSON lines of `path` (a line being written is skipped).
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
