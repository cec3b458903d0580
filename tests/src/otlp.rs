//! A real OTLP/gRPC trace receiver for the trace test: `scripts/otlp/receiver.py`,
//! the OpenTelemetry project's generated server code (PyPI `opentelemetry-proto`,
//! installed into the test virtualenv on first use) on a free loopback port, which
//! writes every span it receives as a JSON line. Dropping it kills the process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Proc, free_port, sdk, wait_until};

/// The receiver's pinned upstream package.
const OTLP_PROTO: &str = "opentelemetry-proto==1.45.2";

/// A running receiver.
#[derive(Debug)]
pub struct OtlpReceiver {
    /// `http://127.0.0.1:<port>`: what `tracing.otlp_endpoint` takes.
    pub endpoint: String,
    spans: PathBuf,
    _proc: Proc,
}

/// The virtualenv's python with `opentelemetry-proto` importable.
fn python() -> Result<PathBuf> {
    let py = sdk::python_env()?;
    let probe = Command::new(&py)
        .args([
            "-c",
            "import opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
        ])
        .output()?;
    if !probe.status.success() {
        let out = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                OTLP_PROTO,
            ])
            .output()
            .context("pip install opentelemetry-proto")?;
        if !out.status.success() {
            bail!(
                "pip install {OTLP_PROTO} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(py)
}

impl OtlpReceiver {
    /// Starts a receiver writing to `dir/otlp-spans.jsonl` and waits until it
    /// accepts connections.
    pub async fn start(dir: &Path) -> Result<Self> {
        let py = python()?;
        let port = free_port()?;
        let spans = dir.join("otlp-spans.jsonl");
        let script = sdk::workspace().join("scripts/otlp/receiver.py");
        let mut cmd = Command::new(py);
        cmd.arg(script)
            .args(["--port", &port.to_string(), "--out"])
            .arg(&spans);
        let proc = Proc::spawn("otlp-receiver", cmd, dir)?;
        let addr = format!("127.0.0.1:{port}");
        wait_until("the OTLP receiver listens", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(addr).await.is_ok() }
        })
        .await
        .with_context(|| proc.log())?;
        Ok(Self {
            endpoint: format!("http://{addr}"),
            spans,
            _proc: proc,
        })
    }

    /// Every span received so far, as the receiver decoded it.
    pub fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
