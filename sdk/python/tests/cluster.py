"""Real processes for integration tests: redis-server, etcd, `chime coordinator` and
`chime worker` on free loopback ports, each logging into the test's directory.

Missing binaries fail the test with what to install (never a silent skip). The
`chime` binary is `$CHIME_BIN` when set (as for the Rust harness), else the
workspace's target/{release,debug}/chime, else `chime` on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

REPO = Path(__file__).resolve().parents[3]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, timeout_s: float, cond: Callable[[], Optional[T]], every_s: float = 0.05) -> T:
    """Polls `cond` until it answers something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    last: Optional[BaseException] = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 — retried until the deadline
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(every_s)


def find_binary(name: str, hint: str) -> str:
    p = shutil.which(name)
    if p is None:
        raise AssertionError(f"`{name}` is not installed ({hint}); the integration tests need it")
    return p


def chime_bin() -> str:
    env = os.environ.get("CHIME_BIN")
    if env:
        if not Path(env).is_file():
            raise AssertionError(f"CHIME_BIN={env} does not exist")
        return env
    for profile in ("release", "debug"):
        p = REPO / "target" / profile / "chime"
        if p.is_file():
            return str(p)
    return find_binary("chime", "cargo build -p chime, or set CHIME_BIN")


def child_env() -> Dict[str, str]:
    # chime refuses unknown CHIME_* variables; CHIME_BIN is ours, not chime's.
    env = {k: v for k, v in os.environ.items() if k != "CHIME_BIN"}
    env.setdefault("RUST_LOG", "info")
    return env


class Proc:
    """A child process logging to `<dir>/<name>.log`."""

    def __init__(self, name: str, argv: Sequence[str], dir: Path, env: Optional[Dict[str, str]] = None):
        self.name = name
        self.log_path = dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.p = subprocess.Popen(
            list(argv), stdout=self._log, stderr=subprocess.STDOUT, cwd=dir, env=env or child_env(),
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            self.p.send_signal(sig)

    def kill9(self) -> None:
        if self.running():
            self.p.kill()
            self.p.wait()

    def wait(self, timeout_s: float) -> int:
        return self.p.wait(timeout_s)

    def stop(self) -> None:
        if self.running():
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Cluster:
    """redis + etcd + one coordinator (more on demand) + chime workers."""

    def __init__(self, dir: Path, tokens: bool = True):
        self.dir = dir
        self.procs: List[Proc] = []
        self.chime = chime_bin()
        redis = find_binary("redis-server", "apt-get install redis-server")
        etcd = find_binary("etcd", "apt-get install etcd-server")
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}"
        self._spawn("redis", [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(dir)])
        cport, pport = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{cport}"
        peer = f"http://127.0.0.1:{pport}"
        self._spawn("etcd", [etcd, "--name", "t", "--data-dir", str(dir / "etcd"), "--listen-client-urls",
                             self.etcd_url, "--advertise-client-urls", self.etcd_url, "--listen-peer-urls", peer,
                             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}",
                             "--log-level", "warn"])
        wait_until("redis", 10, lambda: _port_open(self.redis_port))
        wait_until("etcd", 20, lambda: _port_open(cport))
        self.tokens: Dict[str, Path] = {}
        if tokens:
            for kind in ("admin", "worker", "producer"):
                p = dir / f"{kind}.token"
                p.write_text(f"{kind}-token-{os.getpid()}-0123456789\n")
                self.tokens[kind] = p
        self.coordinators: List[str] = []
        self.workers: List[ChimeWorker] = []

    def _spawn(self, name: str, argv: Sequence[str]) -> Proc:
        p = Proc(name, argv, self.dir)
        self.procs.append(p)
        return p

    def start_coordinator(self, name: str = "coord", heartbeat_ms: int = 500) -> Proc:
        grpc_port, http_port = free_port(), free_port()
        argv = [self.chime, "coordinator", "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr",
                f"127.0.0.1:{http_port}", "--advertise", f"127.0.0.1:{grpc_port}", "--redis-url", self.redis_url,
                "--etcd-endpoints", self.etcd_url, "--heartbeat-interval-ms",
                str(heartbeat_ms), "--election-ttl-s", "3"]
        if self.tokens:
            argv += ["--admin-token-file", str(self.tokens["admin"]), "--worker-token-file",
                     str(self.tokens["worker"]), "--producer-token-file", str(self.tokens["producer"])]
        else:
            argv += ["--allow-unauthenticated"]
        p = self._spawn(name, argv)
        url = f"http://127.0.0.1:{grpc_port}"
        wait_until(f"{name} listening", 20, lambda: _port_open(grpc_port) or (not p.running() and _dead(p)))
        self.coordinators.append(url)
        return p

    def start_worker(self, name: str, extra: Sequence[str] = ()) -> "ChimeWorker":
        """A `chime worker` with no built-in handler serving the delivery service."""
        port = free_port()
        argv = [self.chime, "worker", "--redis-url", self.redis_url, "--etcd-endpoints",
                self.etcd_url, "--worker-id", name, "--handlers", "none", "--deliveries-addr",
                f"127.0.0.1:{port}", "--http-addr", "127.0.0.1:0"]
        if self.tokens:
            argv += ["--token-file", str(self.tokens["worker"])]
        else:
            argv += ["--deliveries-allow-unauthenticated"]
        p = self._spawn(name, [*argv, *extra])
        wait_until(f"{name} serving deliveries", 20, lambda: _port_open(port) or (not p.running() and _dead(p)))
        w = ChimeWorker(p, f"http://127.0.0.1:{port}")
        self.workers.append(w)
        return w

    def cli(self, *args: str, at: Optional[str] = None) -> str:
        """Runs a `chime` admin command against the coordinators (or the one `at`);
        answers stdout."""
        argv = [self.chime, args[0], "--coordinator", at or ",".join(self.coordinators)]
        if self.tokens:
            argv += ["--token-file", str(self.tokens["admin"])]
        argv += list(args[1:])
        r = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"chime {' '.join(args)} failed ({r.returncode}): {r.stderr or r.stdout}")
        return r.stdout

    def cli_json(self, *args: str, at: Optional[str] = None) -> Any:
        return json.loads(self.cli(*args, at=at))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


class ChimeWorker:
    def __init__(self, proc: Proc, deliveries: str):
        self.proc = proc
        self.deliveries = deliveries


def _dead(p: Proc) -> bool:
    raise AssertionError(f"{p.name} exited ({p.p.returncode}):\n{p.log()[-3000:]}")


def python_agent(dir: Path, name: str, args: Sequence[str]) -> Proc:
    """Starts the conformance agent (this interpreter) as a process."""
    agent = REPO / "sdk" / "python" / "conformance" / "agent.py"
    return Proc(name, [sys.executable, str(agent), *args], dir)


class Agent:
    """A conformance agent in `run` mode and its record file."""

    def __init__(self, c: Cluster, name: str, args: Sequence[str]):
        self.name = name
        self.record = c.dir / f"{name}.jsonl"
        self.proc = python_agent(c.dir, name, ["run", "--record", str(self.record), *args])
        c.procs.append(self.proc)

    def records(self) -> List[Dict[str, Any]]:
        if not self.record.exists():
            return []
        out = []
        for line in self.record.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written
        return out

    def all(self, kind: str) -> List[Dict[str, Any]]:
        return [r for r in self.records() if r["kind"] == kind]
