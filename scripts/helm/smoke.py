#!/usr/bin/env python3
"""Runs the Helm chart's wiring against the real chime binary, without Kubernetes.

Renders helm/chime with Helm's own engine for one coordinator and one worker against
the Redis and etcd given on the command line (plus any --values files, e.g.
helm/chime/ci/sidecar-app-values.yaml), then starts, as local processes, exactly what
the rendered manifests would start in pods:

  * command, args and env of the coordinator StatefulSet's and the worker Deployment's
    containers, and of the app pod's chime worker sidecar and app container when
    sidecarApp is rendered (downward-API fields become local values: pod name,
    namespace, 127.0.0.1; secretKeyRef/configMapKeyRef are read from the rendered
    Secret and ConfigMap; $(VAR) references in env, command and args expanded as the
    kubelet does);
  * their volumes: the rendered ConfigMaps' files and the Secret's token files are
    written to a temporary directory per container, and every mount path in args, env
    and the config files is pointed there;
  * store passwords (--redis-password, --etcd-user/--etcd-password) go the chart's
    way: values -> the chart's Secret -> secretKeyRef env -> CHIME_REDIS_URL
    ($(REDIS_PASSWORD) expanded into the URL) and CHIME_ETCD_PASSWORD;
  * the image's binary path (/usr/local/bin/chime, checked against the Dockerfile)
    becomes --chime; the app image's `python` is --python (a venv with the SDK of
    sdk/python installed: the example's init container that pip-installs it is not
    run), and the push provider outside the release (the example's PUSH_URL) is a
    stub HTTP server here;
  * cluster DNS names become 127.0.0.1 ports: a pod name under a headless Service or
    a Service name, with a port, is resolved through the rendered Services (port ->
    targetPort -> the selected pods' container port) to the port picked for that
    process; a name that leads to no rendered object fails the test, so does a
    listen address that no containerPort declares. Loopback addresses stay inside
    their pod: the app's 127.0.0.1:7071 and its sidecar's are one local port.

Then it checks the HTTP probes of every chime container (GET /livez, /readyz,
/metrics on the ports the probes name), runs the helm test Pod's own script (it
creates a manual job, triggers it and waits for its run to succeed through the chime
CLI), and proves both ways an app gets its items:

  * the pool (worker.deliveries.enabled, always switched on here): the Python SDK's
    quickstart subscribes at the URL NOTES.txt gives (the Service
    <release>-deliveries), enqueues three reminders through the coordinators' Queue
    API with the producer token, and must receive them all;
  * the sidecar (when sidecarApp is rendered): an item of the app's handler enqueued
    through the coordinator must reach the app, which POSTs it to the stub push
    provider, and must then be acked (gone from the queue).

When the values give alert rules (alerts.*, e.g. helm/chime/ci/alerts-values.yaml),
the post-install hook Job's script runs too, as its pod would (its ConfigMap's
client.toml, the rules Secret's rules.json, the etcd password through the chart's
Secret), while the coordinator runs: it must exit 0 with the rules applied (and a rule
put by hand beforehand deleted with --prune, kept without), `chime alert list` and the
coordinator's GET /api/alerts must show them, and a second run (the next upgrade) must
report them unchanged.

The configuration hook (apply.*) runs the same way, from the values of --apply-values
(e.g. helm/chime/ci/apply-values.yaml; rendered with the other values but alerts.* at
the chart's defaults, since the chart refuses alert rules in apply.objects next to the
alerts.prune of ci/alerts-values.yaml), or from the release itself when its values list
objects: a job is made by hand first (chime apply without a set); the Job's script
must create every object (`chime export` shows each as given, the coordinator's API
serves the jobs, the live setting and the alert rules), a second run must change
nothing, a render without one object must delete just that one, and a render with an
empty list must delete the rest of the set, leaving the job made by hand and the alert
rules hook's rules alone. A bad object and a schedule under the coordinators' floor
must fail the script at once, saying the objects were refused, with nothing written;
an etcd that does not answer must not be taken for a refusal.

Last, everything stops with SIGTERM in Kubernetes' order, each within its pod's
terminationGracePeriodSeconds and exiting 0: the app, then its sidecar (a native
sidecar is stopped after the app's containers), then the worker and the coordinator.
Everything started is killed at the end.

With auth on (the default), it also checks that an admin call without the token is
refused. Keys of features the binary does not have yet (see common.PENDING) are
dropped from the config, with a note, when the binary refuses them; anything else it
refuses fails.

    python3 scripts/helm/smoke.py --redis-url redis://127.0.0.1:6379 \\
        --etcd-endpoints http://127.0.0.1:2379 --chime target/debug/chime \\
        --python target/sdk-python-venv/bin/python -f helm/chime/ci/sidecar-app-values.yaml
"""


from __future__ import annotations

import argparse
import base64
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import IMAGE_BINARY, PENDING, REPO, chime_process, containers, find, objects, pod_labels, pod_spec  # noqa: E402

NAMESPACE = "chime-smoke"
RELEASE = "chime"
STARTUP_S = 4.0  # a process still running after this long accepted its configuration
APP_HANDLER = "coupon.remind"  # the example app's handler (ci/sidecar-app-values.yaml)
PUSH_URL_ENV = "PUSH_URL"  # the example app's push provider, outside the release


class SmokeError(Exception):
    pass


def log(msg: str) -> None:
    print(f"smoke: {msg}", flush=True)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this run: the port is closed
    again until its process binds it, so the kernel could offer it twice."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_tcp(host: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SmokeError(f"{what} at {host}:{port} did not accept connections in {timeout:.0f}s")
            time.sleep(0.2)


def wait_for(cond: Callable[[], Any], timeout: float, what: str, alive: Callable[[], str | None] = lambda: None) -> Any:
    """Polls `cond` until it returns something truthy; fails after `timeout` s, or
    at once when `alive` names a process that died."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        dead = alive()
        if dead:
            raise SmokeError(f"{what}: {dead}")
        if time.monotonic() > deadline:
            raise SmokeError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


# ------------------------------------------------------------------ TOML editing


def drop_key(text: str, section: str, field: str | None) -> str:
    """Removes `field` from `[section]` ("" = top level), or the whole section."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        m = re.match(r"^\s*\[([^\]]+)\]\s*$", line)
        if m:
            current = m.group(1).strip()
        if current == section:
            if field is None:
                continue
            if re.match(rf"^\s*{re.escape(field)}\s*=", line):
                continue
        out.append(line)
    return "".join(out)


# ------------------------------------------------------------------ the rendered release


class Release:
    def __init__(self, objs: list[dict[str, Any]], external: set[str]) -> None:
        self.objs = objs
        # Addresses outside the cluster (the stores given on the command line): kept.
        self.external = external
        self.ports: dict[tuple[str, int], int] = {}  # (component, containerPort) -> local port
        self.loopback: dict[tuple[str, int], int] = {}  # (component, port bound to 127.0.0.1) -> local port
        coord = find(objs, "StatefulSet", "coordinator")
        worker = find(objs, "Deployment", "worker")
        test = find(objs, "Pod", "test")
        app = find(objs, "Deployment", "app")
        alerts = find(objs, "Job", "alerts")
        apply = find(objs, "Job", "apply")
        if len(coord) != 1 or len(worker) != 1 or len(test) != 1 or len(app) > 1 or len(alerts) > 1 or len(apply) > 1:
            raise SmokeError("expected one coordinator StatefulSet, one worker Deployment, one test Pod, at most one app Deployment,"
                             " one alert rules Job and one configuration Job")
        self.coordinator, self.worker, self.test = coord[0], worker[0], test[0]
        self.app = app[0] if app else None
        self.alerts = alerts[0] if alerts else None
        self.apply = apply[0] if apply else None
        for w in [self.coordinator, self.worker] + ([self.app] if self.app else []):
            for ctr in containers(pod_spec(w)):
                for p in ctr.get("ports", []):
                    self.ports[(self.component(w), p["containerPort"])] = free_port()

    def component(self, w: dict[str, Any]) -> str:
        return w["metadata"]["labels"]["app.kubernetes.io/component"]

    def container_port(self, w: dict[str, Any], port: int | str) -> int:
        for ctr in containers(pod_spec(w)):
            for p in ctr.get("ports", []):
                if port in (p["containerPort"], p.get("name")):
                    return p["containerPort"]
        raise SmokeError(f"{w['kind']}/{w['metadata']['name']} has no container port {port}")

    def local_port(self, w: dict[str, Any], port: int | str) -> int:
        return self.ports[(self.component(w), self.container_port(w, port))]

    def workload_of_service(self, svc: dict[str, Any]) -> dict[str, Any]:
        sel = svc["spec"].get("selector", {})
        ws = [
            o for o in self.objs
            if o["kind"] in ("StatefulSet", "Deployment") and sel
            and all(pod_labels(o).get(k) == v for k, v in sel.items())
        ]
        if len(ws) != 1:
            raise SmokeError(f"Service/{svc['metadata']['name']} selects {len(ws)} workloads")
        return ws[0]

    def service(self, name: str) -> dict[str, Any]:
        for s in find(self.objs, "Service"):
            if s["metadata"]["name"] == name:
                return s
        raise SmokeError(f"no rendered Service named {name}")

    def resolve(self, host: str, port: int) -> int:
        """A cluster DNS name and port -> the local port of the process behind it."""
        parts = host.split(".")
        if len(parts) == 3:  # <pod>.<headless service>.<namespace>
            pod, svc_name, ns = parts
            svc = self.service(svc_name)
            if svc["spec"].get("clusterIP") != "None":
                raise SmokeError(f"{host}: {svc_name} is not a headless Service")
            w = self.workload_of_service(svc)
            if w["kind"] != "StatefulSet" or w["spec"]["serviceName"] != svc_name:
                raise SmokeError(f"{host}: {svc_name} is not the serviceName of a StatefulSet")
            m = re.fullmatch(re.escape(w["metadata"]["name"]) + r"-(\d+)", pod)
            if not m or int(m.group(1)) >= w["spec"]["replicas"]:
                raise SmokeError(f"{host}: no pod {pod} in StatefulSet/{w['metadata']['name']}")
            if int(m.group(1)) != 0:
                raise SmokeError(f"{host}: the smoke test runs only pod 0")
            target: int | str = port
            for p in svc["spec"]["ports"]:
                if p["port"] == port:
                    target = p.get("targetPort", port)
            cport = self.container_port(w, target)
        elif len(parts) == 2:  # <service>.<namespace>
            svc_name, ns = parts
            svc = self.service(svc_name)
            w = self.workload_of_service(svc)
            sp = [p for p in svc["spec"]["ports"] if p["port"] == port]
            if not sp:
                raise SmokeError(f"{host}:{port}: Service/{svc_name} has no port {port}")
            cport = self.container_port(w, sp[0].get("targetPort", port))
        else:
            raise SmokeError(f"cannot resolve {host}")
        if ns != NAMESPACE:
            raise SmokeError(f"{host}: namespace {ns} is not the release's ({NAMESPACE})")
        return self.ports[(self.component(w), cport)]

    def localize(self, text: str, component: str) -> str:
        """Pod-local loopback ports, cluster DNS names and 0.0.0.0 listen addresses ->
        127.0.0.1 and local ports (one pass each, loopback first: the others produce
        loopback addresses)."""
        def loop(m: re.Match[str]) -> str:
            if m.group(0) in self.external or f"127.0.0.1:{m.group(1)}" in self.external:
                return m.group(0)
            port = int(m.group(1))
            key = (component, port)
            if key not in self.loopback:
                # A port the pod also declares is reached on loopback too.
                self.loopback[key] = self.ports.get(key) or free_port()
            return f"127.0.0.1:{self.loopback[key]}"

        text = re.sub(r"(?<![\w.])(?:127\.0\.0\.1|localhost):(\d+)", loop, text)

        def dns(m: re.Match[str]) -> str:
            return f"127.0.0.1:{self.resolve(m.group(1), int(m.group(2)))}"

        text = re.sub(r"([a-z0-9-]+(?:\.[a-z0-9-]+){1,2})\.svc\.cluster\.local:(\d+)", dns, text)

        def listen(m: re.Match[str]) -> str:
            port = int(m.group(1))
            if (component, port) not in self.ports:
                raise SmokeError(f"{component} listens on {port}, which no containerPort declares")
            return f"127.0.0.1:{self.ports[(component, port)]}"

        text = re.sub(r"0\.0\.0\.0:(\d+)", listen, text)
        if ".svc." in text:
            raise SmokeError(f"unresolved cluster name left in: {text[:200]}")
        return text

    def object(self, kind: str, name: str) -> dict[str, Any] | None:
        for o in self.objs:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        return None

    def secret_value(self, name: str, key: str) -> bytes:
        s = self.object("Secret", name)
        if s is None:
            raise SmokeError(f"Secret {name} is not rendered by the chart (existingSecret?): the smoke test needs the chart's own")
        if key in s.get("stringData", {}):
            return s["stringData"][key].encode()
        if key not in s.get("data", {}):
            raise SmokeError(f"Secret {name} has no key {key}")
        return base64.b64decode(s["data"][key])

    def configmap_value(self, name: str, key: str) -> str:
        cm = self.object("ConfigMap", name)
        if cm is None or key not in cm.get("data", {}):
            raise SmokeError(f"ConfigMap {name} has no key {key}")
        return cm["data"][key]


# ------------------------------------------------------------------ a container as a process


class Proc:
    def __init__(
        self, rel: Release, workload: dict[str, Any], pod_name: str, root: Path, chime: Path, *,
        container: str | None = None, path: str = "", env_override: dict[str, str] | None = None,
    ) -> None:
        self.rel = rel
        self.workload = workload
        self.component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        self.pod = pod_name
        self.spec = pod_spec(workload)
        ctrs = containers(self.spec) if container else self.spec["containers"][:1]
        found = [c for c in ctrs if container is None or c["name"] == container]
        if not found:
            raise SmokeError(f"{self.component}: no container {container}")
        self.ctr = found[0]
        self.label = f"{self.component}/{self.ctr['name']}" if container else self.component
        self.process = chime_process(self.ctr)  # "worker", "coordinator" or None (not chime)
        self.dir = root / self.label.replace("/", "-")
        self.dir.mkdir(parents=True)
        self.chime = chime
        self.path = path or f"{chime.parent}:/usr/local/bin:/usr/bin:/bin"
        self.env_override = env_override or {}
        self.mounts: dict[str, Path] = {}
        self.config_files: list[Path] = []
        self.popen: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "output.log"
        self.dropped: list[str] = []
        self.materialize_volumes()
        self.env = self.build_env()
        self.argv = self.build_argv()

    def materialize_volumes(self) -> None:
        vols = {v["name"]: v for v in self.spec.get("volumes", [])}
        for m in self.ctr.get("volumeMounts", []):
            v = vols.get(m["name"])
            d = self.dir / "volumes" / m["name"]
            d.mkdir(parents=True)
            self.mounts[m["mountPath"]] = d
            if v is None or "emptyDir" in v:
                continue
            if "configMap" in v:
                cm = self.rel.object("ConfigMap", v["configMap"]["name"])
                if cm is None:
                    raise SmokeError(f"{self.label}: volume {m['name']}: ConfigMap not rendered")
                items = v["configMap"].get("items") or [{"key": k, "path": k} for k in cm["data"]]
                for it in items:
                    f = d / it["path"]
                    f.write_text(cm["data"][it["key"]])
                    if f.suffix == ".toml":
                        self.config_files.append(f)
            elif "secret" in v:
                name = v["secret"]["secretName"]
                s = self.rel.object("Secret", name)
                keys = [it["key"] for it in v["secret"].get("items", [])] or list((s or {}).get("data", {}))
                paths = {it["key"]: it["path"] for it in v["secret"].get("items", [])}
                for k in keys:
                    f = d / paths.get(k, k)
                    f.write_bytes(self.rel.secret_value(name, k))
                    f.chmod(0o440)
            else:
                raise SmokeError(f"{self.label}: volume {m['name']}: unsupported volume type")
        # Config files may name other mounts (token files) and addresses: point them here too.
        for f in self.config_files:
            f.write_text(self.localize(f.read_text()))

    def localize(self, text: str) -> str:
        """Mount paths -> their local directories (one pass), then addresses -> local ports."""
        if self.mounts:
            alt = "|".join(re.escape(m) for m in sorted(self.mounts, key=len, reverse=True))
            text = re.sub(
                rf"(?<![\w/.-])({alt})(?=/|$|[^\w.-])", lambda m: str(self.mounts[m.group(1)]), text
            )
        return self.rel.localize(text, self.component)

    @staticmethod
    def expand(text: str, env: dict[str, str]) -> str:
        """$(VAR) -> the variable as the manifest gives it, the kubelet's way ($$ escapes)."""
        return re.sub(
            r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
            lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
            text,
        )

    def build_argv(self) -> list[str]:
        cmd = list(self.ctr.get("command", [])) + list(self.ctr.get("args", []))
        if not cmd:
            raise SmokeError(f"{self.label}: no command")
        # Expanded as in the pod, then localized (once: localizing is not idempotent).
        argv = [self.localize(self.expand(a, self.raw_env)) for a in cmd]
        # The binary is substituted after localizing: its real path may lie under a
        # mount path of the pod (a clone in /tmp, which the pod mounts as emptyDir).
        if cmd[0] == IMAGE_BINARY:
            argv[0] = str(self.chime)
        return argv

    def build_env(self) -> dict[str, str]:
        """The container's env from the manifest (localized) over a minimal base env."""
        base: dict[str, str] = {"PATH": self.path, "HOME": str(self.dir), "HOSTNAME": self.pod}
        for k in ("RUST_LOG", "RUST_BACKTRACE", "LANG", "TZ"):
            if k in os.environ:
                base[k] = os.environ[k]
        env: dict[str, str] = {}
        raw_env: dict[str, str] = {}  # as in the pod, before localizing
        for e in self.ctr.get("env", []):
            name = e["name"]
            if name in self.env_override:
                env[name] = raw_env[name] = self.env_override[name]
                continue
            if "value" in e:
                raw = self.expand(e["value"], raw_env)
            else:
                src = e["valueFrom"]
                if "fieldRef" in src:
                    raw = {
                        "metadata.name": self.pod,
                        "metadata.namespace": NAMESPACE,
                        "status.podIP": "127.0.0.1",
                        "spec.nodeName": "localhost",
                    }[src["fieldRef"]["fieldPath"]]
                elif "secretKeyRef" in src:
                    raw = self.rel.secret_value(src["secretKeyRef"]["name"], src["secretKeyRef"]["key"]).decode()
                elif "configMapKeyRef" in src:
                    raw = self.rel.configmap_value(src["configMapKeyRef"]["name"], src["configMapKeyRef"]["key"])
                else:
                    raise SmokeError(f"{self.label}: env {name}: unsupported valueFrom")
            raw_env[name] = raw
            env[name] = self.localize(raw)
        self.raw_env = raw_env
        return {**base, **env}

    def start(self) -> None:
        self.logf = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_tolerant(self) -> None:
        """Starts a chime process; when the binary refuses a pending key or flag, drops
        it and retries. Accepted once it answers its startup probe, or still runs after
        STARTUP_S."""
        probe = self.probe_port("startupProbe") or self.probe_port("livenessProbe")
        for _ in range(10):
            self.log_path.write_bytes(b"")
            self.start()
            deadline = time.monotonic() + STARTUP_S
            while time.monotonic() < deadline and self.popen.poll() is None:
                if probe and http_get(f"http://127.0.0.1:{probe[1]}{probe[0]}")[0] == 200:
                    return
                time.sleep(0.1)
            if self.popen.poll() is None:
                return
            out = self.log_path.read_text(errors="replace")
            m = re.search(r"unknown field `([A-Za-z0-9_]+)`", out)
            if m and self.drop_pending(m.group(1)):
                continue
            m = re.search(r"unexpected argument '(--[A-Za-z0-9-]+)'", out)
            if m:
                raise SmokeError(f"{self.label}: the binary refuses flag {m.group(1)}:\n{tail(out)}")
            raise SmokeError(f"{self.label} exited with {self.popen.returncode} at start:\n{tail(out)}")
        raise SmokeError(f"{self.label}: still refusing its configuration after dropping {self.dropped}")

    def drop_pending(self, name: str) -> bool:
        matches = [
            (sec, field) for sec, field in PENDING.get(self.process or "", set())
            if field == name or (field is None and sec == name)
        ]
        if not matches:
            return False
        for f in self.config_files:
            text = f.read_text()
            for sec, field in matches:
                new = drop_key(text, sec, field)
                if new != text:
                    key = f"{sec}.{field}" if field and sec else (field or f"[{sec}]")
                    self.dropped.append(key)
                    log(f"note: this chime binary does not know {self.process} config key {key} yet (pending feature): dropped for this run")
                    text = new
            f.write_text(text)
        return True

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def died(self) -> str | None:
        """Why waiting on this process is pointless: it exited (with its last lines)."""
        if self.popen is not None and self.popen.poll() is not None:
            return f"{self.label} exited with {self.popen.returncode}:\n{tail(self.log_path.read_text(errors='replace'))}"
        return None

    def stop(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, then wait up to `timeout` s: (exit code or None, seconds taken)."""
        assert self.popen is not None
        t0 = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait()
        if hasattr(self, "logf"):
            self.logf.close()

    def probe_port(self, probe: str) -> tuple[str, int] | None:
        p = self.ctr.get(probe)
        if not p or "httpGet" not in p:
            return None
        return p["httpGet"]["path"], self.rel.local_port(self.workload, p["httpGet"]["port"])

    def file_of(self, mount_path_file: str) -> Path:
        """Where a file the container sees at `mount_path_file` lies here."""
        local = Path(self.localize(mount_path_file))
        if not local.is_file():
            raise SmokeError(f"{self.label}: {mount_path_file} is not mounted (looked at {local})")
        return local


def tail(text: str, n: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def dockerfile_binary() -> str | None:
    df = REPO / "Dockerfile"
    if not df.exists():
        return None
    m = re.search(r"^COPY\b.*\s(/\S*/chime)\s*$", df.read_text(), re.M)
    return m.group(1) if m else None


def grace_and_prestop(p: Proc) -> tuple[int, int]:
    grace = p.spec.get("terminationGracePeriodSeconds", 30)
    pre = p.ctr.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return grace, int(pre[-1]) if pre and pre[-1].isdigit() else 0


# ------------------------------------------------------------------ the push provider stub


class PushStub:
    """The example app's push provider: records each POSTed JSON body, answers 200."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the app's client expects

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    doc: Any = json.loads(body)
                except ValueError:
                    doc = {"unparsed": body.decode(errors="replace")}
                with stub.lock:
                    stub.bodies.append(doc)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/push"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def pushes_of(self, item_id: str) -> list[Any]:
        with self.lock:
            return [b for b in self.bodies if item_id in (b.get("messages") or [])]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# A producer through the coordinators' Queue API (chime.v1.Queue), with the Python SDK:
#   enqueue <url> <token file> <id> <key> <handler> <in_ms>   -> prints the outcome
#   wait-gone <url> <token file> <id> <key> <timeout s>       -> exit 0 once the item is gone
PRODUCER = r"""
import sys, time
from chime_sdk import NewItem, SyncQueueClient
cmd, url, token_file, item_id, key = sys.argv[1:6]
with SyncQueueClient(url, token_file=token_file or None) as q:  # "": auth off
    if cmd == "enqueue":
        handler, in_ms = sys.argv[6], int(sys.argv[7])
        print(q.enqueue([NewItem(item_id, handler, key=key, merge_key=key, in_ms=in_ms, payload="smoke")])[0].value)
    else:
        deadline = time.monotonic() + float(sys.argv[6])
        while True:
            view = q.get((item_id, key))
            if view is None:
                print("gone")
                sys.exit(0)
            if time.monotonic() > deadline:
                print(f"still there: {view}")
                sys.exit(1)
            time.sleep(0.1)
"""


def python_run(python: str, args: list[str], timeout: float, what: str) -> str:
    try:
        # Not this script's PYTHONPATH (run.sh's helm deps): the SDK's venv as it is.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        res = subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as e:
        raise SmokeError(f"{what}: still running after {timeout:.0f}s: {e.stdout!r} {e.stderr!r}")
    if res.returncode != 0:
        raise SmokeError(f"{what}: exit {res.returncode}:\n{tail(res.stdout + res.stderr)}")
    return res.stdout


# ------------------------------------------------------------------ the run


def run(args: argparse.Namespace) -> tuple[bool, int | None]:
    """Runs the smoke test; answers whether the alert rules hook ran, and how many
    objects the configuration hook applied (None: it did not run)."""
    chime = Path(shutil.which(args.chime) or args.chime).resolve()
    if not os.access(chime, os.X_OK):
        raise SmokeError(f"no executable chime at {args.chime}")
    version = subprocess.run([str(chime), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    log(f"binary {chime} ({version})")
    in_image = dockerfile_binary()
    if in_image is not None and in_image != IMAGE_BINARY:
        raise SmokeError(f"the Dockerfile installs the binary at {in_image}, the manifests run {IMAGE_BINARY}")
    python = str(Path(args.python).absolute()) if args.python else ""
    if python:
        res = subprocess.run([python, "-c", "import chime_sdk; print(chime_sdk.__file__)"], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        if res.returncode != 0:
            raise SmokeError(f"--python {python} cannot import chime_sdk (pip install -e sdk/python):\n{tail(res.stderr)}")
        log(f"python SDK: {python} ({res.stdout.strip()})")

    external: set[str] = set()
    for url, what in [(u, "Redis") for u in args.redis_url.split(",")] + [(u, "etcd") for u in args.etcd_endpoints.split(",")]:
        u = urllib.parse.urlsplit(url)
        if u.hostname and u.port:
            wait_tcp(u.hostname, u.port, 30, what)
            external.add(f"{u.hostname}:{u.port}")

    tag = secrets.token_hex(3)
    values: dict[str, Any] = {
        "redis": {"external": {"url": args.redis_url}},
        "etcd": {"external": {"endpoints": args.etcd_endpoints}, "prefix": f"/chime-smoke-{tag}/"},
        "config": {"keyPrefix": f"smoke-{tag}"},
        "coordinator": {"replicaCount": 1},
        "worker": {"replicaCount": 1},
        "tests": {"timeoutSeconds": args.timeout},
    }
    if args.redis_password:
        values["redis"]["auth"] = {"password": args.redis_password}
    if args.etcd_user:
        values["etcd"]["auth"] = {"username": args.etcd_user, "password": args.etcd_password}
    for f in args.values:
        values = common.deep_merge(values, common.load_values_file(Path(f)))
        log(f"values: {f}")
    if python:
        # The pool is checked in the same run: the workers serve deliveries too (a
        # values file that leaves the queue to the app's sidecars is overridden; the
        # two then share the family, which the delivery contract allows: an item
        # popped where its handler has no subscriber is parked, not lost).
        pool = {"worker": {"queue": {"enabled": True}, "deliveries": {"enabled": True}}}
        log("overlay: worker.queue.enabled=true, worker.deliveries.enabled=true (the pool, checked in this run)")
        values = common.deep_merge(values, pool)
    rendered = common.render(values, name=RELEASE, namespace=NAMESPACE)
    rel = Release([o for _, o in objects(rendered)], external)
    log(f"rendered {len(rel.objs)} objects; key prefix smoke-{tag}, etcd prefix /chime-smoke-{tag}/")
    if rel.app is not None and not python:
        raise SmokeError("sidecarApp is rendered but no --python with the SDK was given to run the app")

    applied: int | None = None
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chime-helm-smoke-"))
    root.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    stub: PushStub | None = None
    ok = False
    try:
        # The stub binds its port now, before any port is handed out to a process
        # that binds it later: the kernel could otherwise offer the stub one of those.
        if rel.app is not None:
            stub = PushStub()
        coord = Proc(rel, rel.coordinator, f"{rel.coordinator['metadata']['name']}-0", root, chime)
        worker = Proc(rel, rel.worker, f"{rel.worker['metadata']['name']}-5d8f7c9b4-smoke", root, chime)
        chimes = [coord, worker]
        side = app = None
        if rel.app is not None:
            pod = f"{rel.app['metadata']['name']}-7c6d5b8f9-smoke"
            side = Proc(rel, rel.app, pod, root, chime, container="chime-worker")
            assert stub is not None
            # The image's `python` is the SDK venv's; the push provider is the stub.
            venv_bin = str(Path(python).parent)
            pushes_to = any(e["name"] == PUSH_URL_ENV for e in rel_env(rel.app, "app"))
            app = Proc(rel, rel.app, pod, root, chime, container="app", path=f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
                       env_override={PUSH_URL_ENV: stub.url} if pushes_to else {})
            chimes.append(side)
            replicas = rel.app["spec"].get("replicas", 1)
            skipped = [c["name"] for c in pod_spec(rel.app).get("initContainers", []) if not common.is_sidecar(c)]
            log(f"app pod {pod} (1 of {replicas}): containers chime-worker and app"
                + (f"; init container(s) {', '.join(skipped)} not run: the SDK comes from {python}" if skipped else ""))
            if PUSH_URL_ENV in app.env_override:
                log(f"app: the push provider ({PUSH_URL_ENV}) is a local stub: {stub.url}")
        for p in chimes + ([app] if app else []):
            log(f"{p.label}: {' '.join(p.argv)}")
            for k, v in sorted(p.env.items()):
                if k.startswith("CHIME_") or k in ("POD_NAME", "POD_NAMESPACE", PUSH_URL_ENV, "PYTHONPATH"):
                    shown = "***" if "PASSWORD" in k else re.sub(r"//([^@/]*):([^@/]*)@", r"//\1:***@", v)
                    log(f"{p.label}:   {k}={shown}")
        procs += [coord]
        coord.start_tolerant()
        grpc = rel.local_port(rel.coordinator, "grpc")
        wait_tcp("127.0.0.1", grpc, 30, "coordinator gRPC")
        log(f"coordinator up: gRPC 127.0.0.1:{grpc}")
        procs += [worker]
        worker.start_tolerant()
        log("worker up")
        if side is not None and app is not None:
            # A native sidecar is started, and must pass its startup probe, before the
            # app container starts; a regular one starts with it (the app retries).
            procs += [side]
            side.start_tolerant()
            log("app pod: chime-worker sidecar up")
            procs += [app]
            app.start()
            log("app pod: app started")

        check_probes(rel, chimes)
        run_helm_test(rel, root, chime, grpc, args)
        if rel.alerts is not None:
            run_alerts_hook(rel, root, chime, args)
        if args.apply_values:
            # The chart refuses alert rules in apply.objects next to alerts.prune (the
            # alerts values' prune would delete them on every upgrade): the hook of these
            # values is rendered with alerts.* at the chart's defaults.
            av = common.deep_merge({k: v for k, v in values.items() if k != "alerts"}, common.load_values_file(Path(args.apply_values)))
            log(f"values of the configuration hook: {args.apply_values} (alerts.* at the chart's defaults)")
            applied = run_apply_hook(rel, root, chime, args, av)
        elif rel.apply is not None:
            applied = run_apply_hook(rel, root, chime, args, values)

        # Clients outside the release: the coordinators' client Service (gRPC), tokens
        # from the chart's Secret.
        producer_token = write_token(rel, root, "producer-token")
        worker_token = write_token(rel, root, "worker-token")
        client_svc = rel.service(rel.coordinator["metadata"]["name"])
        grpc_port = next(p["port"] for p in client_svc["spec"]["ports"] if p["name"] == "grpc")
        coordinator_url = rel.localize(f"http://{client_svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{grpc_port}", "client")
        if python:
            check_pool(rel, python, coordinator_url, worker_token, producer_token)
        if side is not None and app is not None and stub is not None:
            check_sidecar_delivery(rel, side, app, stub, python, coordinator_url, producer_token, tag)

        # Stopping, in Kubernetes' order: the app pod's regular containers, then its
        # native sidecar (or, not native, the sidecar after its preStop wait); then
        # the worker and the coordinator.
        if side is not None and app is not None:
            stop_app_pod(side, app)
        for p in (worker, coord):
            grace, pre_s = grace_and_prestop(p)
            code, took = p.stop(grace - pre_s)
            if code != 0:
                raise SmokeError(
                    f"{p.label}: SIGTERM -> exit {code} after {took:.1f}s (grace {grace}s, preStop {pre_s}s)\n"
                    + tail(p.log_path.read_text(errors="replace"))
                )
            log(f"{p.label}: SIGTERM -> exit 0 in {took:.1f}s (grace {grace}s - preStop {pre_s}s)")
        ok = True
    finally:
        for p in reversed(procs):
            p.kill()
        if stub is not None:
            stub.close()
        if not ok:
            for p in procs:
                if p.log_path.exists():
                    print(f"--- {p.label} log (last lines) ---\n{tail(p.log_path.read_text(errors='replace'), 40)}")
        if args.keep or not ok:
            log(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return rel.alerts is not None, applied


def rel_env(w: dict[str, Any], container: str) -> list[dict[str, Any]]:
    return next((c.get("env", []) for c in containers(pod_spec(w)) if c["name"] == container), [])


def chart_secret(rel: Release) -> dict[str, Any] | None:
    """The chart's own Secret (tokens, store passwords), when it renders one."""
    return next(iter(find(rel.objs, "Secret", "config")), None)


def write_token(rel: Release, root: Path, key: str) -> str | None:
    """A token of the chart's Secret as a file, as a client pod would mount it (None
    when the Secret has no such key: auth off)."""
    secret = chart_secret(rel)
    if secret is None or key not in secret.get("data", {}):
        return None
    f = root / "client-tokens" / key
    f.parent.mkdir(exist_ok=True)
    f.write_bytes(rel.secret_value(secret["metadata"]["name"], key))
    return str(f)


def check_probes(rel: Release, procs: list[Proc]) -> None:
    """Probes, on the ports and paths the manifests name, and /metrics on the probes' port."""
    auth_on = "admin-token" in str(rel.test["spec"].get("volumes", []))
    for p in procs:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            pp = p.probe_port(probe)
            if pp is None:
                continue
            path, port = pp
            wait_for(lambda: http_get(f"http://127.0.0.1:{port}{path}")[0] == 200, 60,
                     f"{p.label} {probe} GET {path} never answered 200", p.died)
            log(f"{p.label} {probe}: GET {path} -> 200")
        # What the ServiceMonitors scrape (the port named http; a sidecar's probe port).
        live = p.probe_port("livenessProbe")
        http_port = rel.local_port(p.workload, "http") if p.component != "app" else (live[1] if live else 0)
        code, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
        if code != 200:
            raise SmokeError(f"{p.label} GET /metrics: {code} {body[:200]}")
        log(f"{p.label}: GET /metrics -> 200 ({body.count('# TYPE')} metric families)")
        if p.component == "coordinator":
            # The console (NOTES.txt sends users to /); with auth on it may ask for the token.
            code, body = http_get(f"http://127.0.0.1:{http_port}/")
            if not (code == 200 or (auth_on and code in (401, 403))):
                raise SmokeError(f"coordinator console GET /: {code} {body[:200]}")
            log(f"coordinator: GET / (console) -> {code}")


def run_helm_test(rel: Release, root: Path, chime: Path, grpc: int, args: argparse.Namespace) -> None:
    """The helm test Pod's own script, as the Pod would run it."""
    test = Proc(rel, rel.test, rel.test["metadata"]["name"], root, chime)
    bindir = root / "test" / "bin"
    bindir.mkdir()
    (bindir / "chime").symlink_to(chime)
    test.env["PATH"] = f"{bindir}:/usr/local/bin:/usr/bin:/bin"
    log(f"helm test pod: {test.argv[0]} {test.argv[1]} <script of {len(test.argv[-1].splitlines())} lines>")
    try:
        res = subprocess.run(
            test.argv, env=test.env, cwd=test.dir, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=args.timeout + 30,
        )
    except subprocess.TimeoutExpired as e:
        raise SmokeError(f"helm test script still running after {args.timeout + 30}s: {e.stdout!r}")
    for line in (res.stdout + res.stderr).rstrip().splitlines():
        print(f"  test| {line}")
    if res.returncode != 0 or "PASS" not in res.stdout:
        raise SmokeError(f"helm test script exited {res.returncode}")
    log("helm test script passed: a manual job was created, triggered and its run succeeded")

    # With auth on, the token is what let the test in: a call without it is refused.
    if "admin-token" in str(rel.test["spec"].get("volumes", [])):
        env = {k: v for k, v in test.env.items() if k != "CHIME_ADMIN_TOKEN"}
        res = subprocess.run(
            [str(chime), "workers", "--coordinator", f"http://127.0.0.1:{grpc}"],
            env=env, capture_output=True, text=True, timeout=30,
        )
        if res.returncode == 0:
            raise SmokeError("auth is on, yet an admin call without a token was accepted")
        log(f"auth: an admin call without the token is refused ({res.stderr.strip().splitlines()[-1][:120]})")


def _subset(given: Any, stored: Any) -> bool:
    """Every field given is stored as given (the stored rule adds its defaults)."""
    if isinstance(given, dict):
        return isinstance(stored, dict) and all(k in stored and _subset(v, stored[k]) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(stored, list) and len(given) == len(stored) and all(map(_subset, given, stored))
    return given == stored


def run_alerts_hook(rel: Release, root: Path, chime: Path, args: argparse.Namespace) -> None:
    """The alert rules hook Job's script, run as its pod would (its ConfigMap's
    client.toml, the rules Secret's rules.json, the etcd password from the chart's
    Secret), twice, against the release's etcd while the coordinator runs: the rules
    are applied, then unchanged; the CLI lists them, the coordinator's API serves them,
    and a rule put by hand beforehand is deleted (--prune) or left alone."""
    job = rel.alerts
    assert job is not None
    bindir = root / "alerts-bin"
    bindir.mkdir()
    (bindir / "chime").symlink_to(chime)
    proc = Proc(rel, job, f"{job['metadata']['name']}-smoke", root, chime, path=f"{bindir}:/usr/local/bin:/usr/bin:/bin")
    vol = next(v for v in pod_spec(job)["volumes"] if v["name"] == "rules")
    rules = json.loads(rel.secret_value(vol["secret"]["secretName"], "rules.json"))
    rules = rules if isinstance(rules, list) else [rules]
    names = [r["name"] for r in rules]
    prune = "--prune" in proc.argv[-1]
    # Flags and env of a client outside the release: the etcd of the command line.
    ctl_env = {"PATH": "/usr/bin:/bin", "HOME": str(proc.dir), "CHIME_ETCD_PREFIX": rel_etcd_prefix(rel)}
    if args.etcd_user:
        ctl_env.update(CHIME_ETCD_USER=args.etcd_user, CHIME_ETCD_PASSWORD=args.etcd_password)

    def ctl(*a: str, stdin: str | None = None) -> str:
        res = subprocess.run([str(chime), "alert", "--etcd-endpoints", args.etcd_endpoints, *a], env=ctl_env,
                             input=stdin, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise SmokeError(f"alerts: chime alert {' '.join(a)}: exit {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    by_hand = {"name": "smoke-by-hand", "condition": {"kind": "leader_changed"},
               "sinks": [{"kind": "webhook", "url": "http://127.0.0.1:9/by-hand"}]}
    ctl("put", "-", stdin=json.dumps(by_hand))
    log(f"alerts: put rule {by_hand['name']} by hand (chime alert put), before the hook")

    def apply(run: str) -> dict[str, Any]:
        res = subprocess.run(proc.argv, env=proc.env, cwd=proc.dir, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=60)
        for line in (res.stdout + res.stderr).rstrip().splitlines():
            print(f"  alerts| {line}")
        if res.returncode != 0:
            raise SmokeError(f"alerts: the hook Job's script exited {res.returncode} ({run} run)")
        outs = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
        if len(outs) != 1 or "applied" not in outs[0]:
            raise SmokeError(f"alerts: no single JSON line of chime alert apply in the Job's output ({run} run)")
        return outs[0]

    log(f"alerts: hook Job {job['metadata']['name']}: {proc.argv[0]} {proc.argv[1]} <script of {len(proc.argv[-1].splitlines())} lines>"
        f" applying {len(names)} rule(s){' with --prune' if prune else ''}")
    for k in sorted(proc.env):
        if k.startswith("CHIME_"):
            log(f"alerts:   {k}={'***' if 'PASSWORD' in k else proc.env[k]}")
    first = apply("first")
    want = {"applied": names, "unchanged": [], "deleted": [by_hand["name"]] if prune else []}
    got = {k: first.get(k) for k in want}
    if got != want or not isinstance(first.get("revision"), int):
        raise SmokeError(f"alerts: first run reported {first}, expected {want} and a revision")
    stored = {}
    for line in ctl("list").splitlines():
        rule = json.loads(line)["rule"]
        stored[rule["name"]] = rule
    expect = set(names) | (set() if prune else {by_hand["name"]})
    if set(stored) != expect:
        raise SmokeError(f"alerts: chime alert list shows {sorted(stored)}, expected {sorted(expect)}")
    for r in rules:
        if not _subset(r, stored[r["name"]]):
            raise SmokeError(f"alerts: rule {r['name']} is stored as {stored[r['name']]}, not as given: {r}")
    log(f"alerts: applied {names} (revision {first['revision']}){'; pruned ' + by_hand['name'] if prune else '; ' + by_hand['name'] + ' left alone'};"
        f" chime alert list shows them as given")
    # The coordinator reads the same etcd prefix: its API serves the rules.
    token = write_token(rel, root, "admin-token")
    headers = {"Authorization": f"Bearer {Path(token).read_text().split()[0]}"} if token else {}
    url = f"http://127.0.0.1:{rel.local_port(rel.coordinator, 'http')}/api/alerts"

    def served() -> set[str] | None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as r:
                have = {x.get("name") for x in json.loads(r.read()).get("rules", [])}
        except (OSError, ValueError):
            return None
        return have if have == expect else None

    wait_for(served, 10, f"alerts: the coordinator's GET /api/alerts never listed {sorted(expect)}")
    log("alerts: the coordinator serves them (GET /api/alerts)")
    second = apply("second")
    want = {"applied": [], "unchanged": names, "deleted": []}
    got = {k: second.get(k) for k in want}
    if got != want or second.get("revision") is not None:
        raise SmokeError(f"alerts: second run reported {second}, expected {want} and no revision")
    log("alerts: a second run (the next upgrade) leaves them unchanged")


def rel_etcd_prefix(rel: Release) -> str:
    """The etcd prefix of the release (the coordinators' [etcd] prefix)."""
    vol = next(v for v in pod_spec(rel.coordinator)["volumes"] if v["name"] == "config")
    return tomllib.loads(rel.configmap_value(vol["configMap"]["name"], "coordinator.toml"))["etcd"]["prefix"]


class ApplyHook:
    """The configuration hook Job (apply.*) of a render of the release, run as its pod
    would: its ConfigMap's client.toml, its Secret's objects.yaml, the etcd password
    from the chart's Secret. Each render (the values changed as an upgrade would) gets
    a directory of its own."""

    def __init__(self, rel: Release, root: Path, chime: Path, args: argparse.Namespace, values: dict[str, Any]) -> None:
        self.rel, self.root, self.chime, self.args, self.values = rel, root, chime, args, values
        self.bindir = root / "apply-bin"
        self.bindir.mkdir()
        (self.bindir / "chime").symlink_to(chime)
        self.renders = 0
        # Flags and env of a client outside the release: the etcd of the command line.
        self.ctl_env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "CHIME_ETCD_PREFIX": rel_etcd_prefix(rel)}
        if args.etcd_user:
            self.ctl_env.update(CHIME_ETCD_USER=args.etcd_user, CHIME_ETCD_PASSWORD=args.etcd_password)

    def render(self, apply: dict[str, Any], what: str, **over: Any) -> tuple[Proc, list[dict[str, Any]]]:
        """The Job of the release rendered with apply.* replaced by `apply` (and other
        values overridden); its process and the objects of its Secret."""
        values = common.deep_merge(self.values, {**over, "apply": {**self.values.get("apply", {}), **apply}})
        rel = Release([o for _, o in objects(common.render(values, name=RELEASE, namespace=NAMESPACE))], self.rel.external)
        if rel.apply is None:
            raise SmokeError(f"apply: {what}: no configuration Job rendered")
        self.renders += 1
        d = self.root / f"apply-{self.renders}"
        proc = Proc(rel, rel.apply, f"{rel.apply['metadata']['name']}-{self.renders}", d, self.chime,
                    path=f"{self.bindir}:/usr/local/bin:/usr/bin:/bin")
        vol = next(v for v in pod_spec(rel.apply)["volumes"] if v["name"] == "objects")
        text = rel.secret_value(vol["secret"]["secretName"], "objects.yaml").decode()
        import yaml

        return proc, [o for o in yaml.safe_load_all(text) if o is not None]

    def run(self, proc: Proc, what: str, ok: bool = True) -> tuple[dict[str, Any] | None, str]:
        """Runs the Job's script: (its summary line, its output); fails unless it exits
        0 (ok) or non-zero (not ok)."""
        t0 = time.monotonic()
        res = subprocess.run(proc.argv, env=proc.env, cwd=proc.dir, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=60)
        out = res.stdout + res.stderr
        for line in out.rstrip().splitlines():
            print(f"  apply| {line}")
        if (res.returncode == 0) != ok:
            raise SmokeError(f"apply: the hook Job's script exited {res.returncode} ({what}; expected {'0' if ok else 'a failure'})")
        if not ok:
            return None, out
        outs = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
        if len(outs) != 1 or "changes" not in outs[0]:
            raise SmokeError(f"apply: no single JSON line of chime apply in the Job's output ({what})")
        log(f"apply: {what}: exit 0 in {time.monotonic() - t0:.1f}s")
        return outs[0], out

    def ctl(self, *a: str, stdin: str | None = None) -> str:
        res = subprocess.run([str(self.chime), *a, "--etcd-endpoints", self.args.etcd_endpoints], env=self.ctl_env,
                             input=stdin, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise SmokeError(f"apply: chime {' '.join(a)}: exit {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def export(self) -> dict[tuple[str, str], dict[str, Any]]:
        """What etcd holds, by (kind, name or key), as `chime export` prints it."""
        import yaml

        out = {}
        for doc in yaml.safe_load_all(self.ctl("export")):
            if doc:
                out[(doc["kind"], doc.get("name") or doc.get("key"))] = doc
        return out


def _ident(o: dict[str, Any]) -> tuple[str, str]:
    return o["kind"], o.get("name") or o.get("key")


def _key(o: dict[str, Any]) -> str:
    """The object's key in etcd under the prefix, as chime apply names it."""
    if o["kind"] in ("job", "workflow"):
        return f"jobs/{o['name']}"
    return o["key"] if o["kind"] == "setting" else f"alerts/{o['name']}"


def run_apply_hook(rel: Release, root: Path, chime: Path, args: argparse.Namespace, values: dict[str, Any]) -> int:
    """The configuration hook Job's script against the release's etcd while the
    coordinator runs: applied, unchanged, one object pruned, the rest pruned by an empty
    list; refusals fail at once; objects made another way stay. Answers how many
    objects it applied."""
    hook = ApplyHook(rel, root, chime, args, values)
    base = dict(values.get("apply", {}))
    proc, objs = hook.render({}, "the release")
    if not objs:
        # Nothing listed (default values): the Job runs, with prune, and changes nothing.
        first, _ = hook.run(proc, "no objects listed")
        if first["changes"] or first["revision"] is not None:
            raise SmokeError(f"apply: with no objects the Job reported {first}, expected no changes")
        log("apply: no objects listed: the Job (apply.prune) ran and changed nothing")
        return 0
    prune = "--prune" in proc.argv[-1]
    set_flag = re.search(r"--set (\S+)", proc.argv[-1])
    log(f"apply: hook Job {proc.workload['metadata']['name']}: {proc.argv[0]} {proc.argv[1]}"
        f" <script of {len(proc.argv[-1].splitlines())} lines> applying {len(objs)} object(s) as the set"
        f" {set_flag.group(1) if set_flag else '?'}{' with --prune' if prune else ''}")
    for k in sorted(proc.env):
        if k.startswith("CHIME_"):
            log(f"apply:   {k}={'***' if 'PASSWORD' in k else proc.env[k]}")
    before = hook.export()

    # Refusals first (nothing may be written): a bad value, and a schedule more frequent
    # than the coordinators' floor (a check that needs the cluster, not the file).
    bad_objects = [
        ("a live setting out of range", {"kind": "setting", "key": "queues/default/count", "value": 0}, "queues/default/count"),
        ("a schedule under the floor", {"kind": "job", "name": "smoke-too-often", "group": "default", "handler": "noop",
                                        "schedule": {"kind": "fixed_rate", "every_ms": 500}}, "smoke-too-often"),
    ]
    for what, bad, needle in bad_objects:
        p, _ = hook.render({"objects": base.get("objects", []) + [bad]}, what)
        _, out = hook.run(p, f"{what} (refused)", ok=False)
        if "were refused" not in out or needle not in out:
            raise SmokeError(f"apply: {what}: the script did not fail as a refusal naming {needle!r}")
        if hook.export() != before:
            raise SmokeError(f"apply: {what}: the refused apply wrote to etcd")
        log(f"apply: {what}: refused at once, nothing written ({next(ln for ln in out.splitlines() if needle in ln)[:110]})")
    # An etcd that does not answer is no refusal (with waitSeconds 0: given up at once).
    dead = free_port()
    p, _ = hook.render({"waitSeconds": 0}, "etcd down", etcd={"external": {"endpoints": f"http://127.0.0.1:{dead}"}})
    _, out = hook.run(p, "etcd not answering", ok=False)
    if "did not take the objects" not in out or "were refused" in out:
        raise SmokeError("apply: an etcd that does not answer was taken for a refusal (or the script said nothing)")
    log("apply: an etcd that does not answer is retried until apply.waitSeconds, not taken for a refusal")

    # A job made another way: no set's prune may touch it.
    by_hand = {"kind": "job", "name": "smoke-by-hand", "group": "default", "handler": "noop", "schedule": {"kind": "manual"}}
    hand_file = root / "by-hand.json"
    hand_file.write_text(json.dumps(by_hand))
    hook.ctl("apply", "-f", str(hand_file))
    log(f"apply: job {by_hand['name']} made by hand (chime apply without a set), before the hook")

    # First run: every object created, stored as given, served by the coordinator.
    first, _ = hook.run(proc, "first run (the install)")
    want = [{"op": "create", "kind": o["kind"], "key": _key(o)} for o in objs]
    if first["changes"] != want or first["unchanged"] != 0 or not isinstance(first.get("revision"), int):
        raise SmokeError(f"apply: first run reported {first}, expected the creation of {[w['key'] for w in want]}")
    stored = hook.export()
    for o in objs:
        got = stored.get(_ident(o))
        given = {**o, "value": str(o["value"])} if o["kind"] == "setting" else o
        if got is None or not _subset(given, got):
            raise SmokeError(f"apply: {o['kind']} {_ident(o)[1]} is stored as {got}, not as given: {o}")
    log(f"apply: created {len(objs)} object(s) (revision {first['revision']}); chime export shows each as given")
    token = write_token(rel, root, "admin-token")
    headers = {"Authorization": f"Bearer {Path(token).read_text().split()[0]}"} if token else {}
    http = f"http://127.0.0.1:{rel.local_port(rel.coordinator, 'http')}"
    jobs = {o["name"] for o in objs if o["kind"] in ("job", "workflow")}
    settings = {o["key"]: str(o["value"]) for o in objs if o["kind"] == "setting"}
    rules = {o["name"] for o in objs if o["kind"] == "alert"}

    def api(path: str) -> Any:
        try:
            with urllib.request.urlopen(urllib.request.Request(http + path, headers=headers), timeout=3) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def served() -> bool:
        j, cfg, al = api("/api/jobs"), api("/api/config"), api("/api/alerts")
        if j is None or cfg is None or al is None:
            return False
        have_jobs = {x.get("name") for x in j.get("jobs", [])}
        have_settings = {e.get("key"): e.get("value") for e in cfg.get("entries", [])}
        have_rules = {x.get("name") for x in al.get("rules", [])}
        return jobs <= have_jobs and all(have_settings.get(k) == v for k, v in settings.items()) and rules <= have_rules

    wait_for(served, 10, f"apply: the coordinator never served jobs {sorted(jobs)}, settings {settings} and rules {sorted(rules)}")
    log("apply: the coordinator serves them (GET /api/jobs, /api/config, /api/alerts)")

    # Second run (the next upgrade): nothing to change.
    second, _ = hook.run(proc, "second run (an upgrade with the same values)")
    if second["changes"] or second["unchanged"] != len(objs) or second.get("revision") is not None:
        raise SmokeError(f"apply: second run reported {second}, expected no changes and {len(objs)} unchanged")
    log(f"apply: a second run changes nothing ({second['unchanged']} unchanged, no revision)")
    if not prune:
        log("apply: apply.prune is false: removing objects is not checked")
        return len(objs)

    # An upgrade without one object (a job no workflow node names): just that one goes.
    named = {n.get("job") for o in objs for n in (o.get("workflow") or {}).get("nodes", [])}
    gone = next((o for o in objs if o["kind"] == "job" and o["name"] not in named), objs[-1])
    rest = [o for o in objs if o is not gone]
    p, _ = hook.render({"objects": rest}, f"without {gone['kind']} {_ident(gone)[1]}")
    third, _ = hook.run(p, f"an upgrade without {gone['kind']} {_ident(gone)[1]}")
    want = [{"op": "delete", "kind": gone["kind"], "key": _key(gone)}]
    if third["changes"] != want or third["unchanged"] != len(rest):
        raise SmokeError(f"apply: run without {_key(gone)} reported {third}, expected {want} and {len(rest)} unchanged")
    stored = hook.export()
    if _ident(gone) in stored or any(_ident(o) not in stored for o in rest) or ("job", by_hand["name"]) not in stored:
        raise SmokeError(f"apply: after pruning {_key(gone)} chime export shows {sorted(stored)}")
    log(f"apply: an upgrade without {_key(gone)} deleted just it (--prune); {by_hand['name']} stays")

    # An upgrade with an empty list: the rest of the set goes, nothing else.
    p, listed = hook.render({"objects": []}, "an empty list")
    if listed:
        raise SmokeError(f"apply: the Secret of an empty list holds objects: {listed}")
    fourth, _ = hook.run(p, "an upgrade with an empty list")
    deleted = sorted(ch["key"] for ch in fourth["changes"] if ch["op"] == "delete")
    if deleted != sorted(_key(o) for o in rest) or len(fourth["changes"]) != len(rest):
        raise SmokeError(f"apply: the empty list reported {fourth}, expected the deletion of {sorted(_key(o) for o in rest)}")
    stored = hook.export()
    left = [k for k in (_ident(o) for o in objs) if k in stored]
    kept = [k for k in before if k not in stored]
    if left or ("job", by_hand["name"]) not in stored or kept:
        raise SmokeError(f"apply: after the empty list etcd still holds {left} of the set, or lost {kept} / {by_hand['name']}")
    log(f"apply: an upgrade with an empty list deleted the other {len(rest)} object(s) of the set; {by_hand['name']}"
        f" and the {len(before)} object(s) etcd held before the hook (e.g. the alert rules hook's rules) stay")
    return len(objs)


def check_pool(rel: Release, python: str, coordinator_url: str, worker_token: str | None, producer_token: str | None) -> None:
    """The workers' delivery service, reached the way NOTES.txt tells an app: the
    Service <release>-deliveries. The SDK's quickstart subscribes there, enqueues three
    reminders through the coordinators' Queue API and exits 0 once all arrived."""
    svc = next((s for s in find(rel.objs, "Service") if s["metadata"]["name"].endswith("-deliveries")), None)
    if svc is None:
        raise SmokeError("worker.deliveries.enabled rendered no <release>-deliveries Service")
    url = f"http://{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    local = rel.localize(url, "client")
    cmd = [str(REPO / "sdk/python/examples/quickstart.py"), "--coordinator", coordinator_url, "--deliveries", local, "--timeout-s", "30"]
    if worker_token:
        cmd += ["--token-file", worker_token]
    if producer_token:
        cmd += ["--producer-token-file", producer_token]
    log(f"pool: sdk/python/examples/quickstart.py subscribes at {url} (-> {local})")
    t0 = time.monotonic()
    out = python_run(python, cmd, 60, "pool: the quickstart against the workers' delivery service")
    for line in out.rstrip().splitlines():
        print(f"  pool| {line}")
    if "every reminder arrived" not in out:
        raise SmokeError("pool: the quickstart did not report every reminder")
    log(f"pool: three reminders enqueued through the coordinator reached a subscriber of the pool in {time.monotonic() - t0:.1f}s")


def check_sidecar_delivery(rel: Release, side: Proc, app: Proc, stub: PushStub, python: str, coordinator_url: str,
                           producer_token: str | None, tag: str) -> None:
    """An item of the app's handler, enqueued through the coordinator, reaches the app
    (which POSTs it to the push provider) through its sidecar, and is acked."""
    deliveries = app.env.get("CHIME_DELIVERIES", "")
    if not deliveries:
        raise SmokeError("app: no CHIME_DELIVERIES in the rendered env")
    # The app must have subscribed before an item can reach it; its sidecar logs nothing
    # per subscriber, so the item's arrival is the proof. Both must still run.
    for p in (side, app):
        if not p.running():
            raise SmokeError(p.died() or f"{p.label} is not running")
    item_id, key = f"coupon:smoke-{tag}:u42", "u42"
    args = ["-c", PRODUCER, "enqueue", coordinator_url, producer_token or "", item_id, key, APP_HANDLER, "300"]
    outcome = python_run(python, args, 30, "sidecar: enqueue through the coordinator").strip()
    if outcome != "created":
        raise SmokeError(f"sidecar: enqueue of {item_id} answered {outcome!r}")
    t0 = time.monotonic()
    log(f"sidecar: enqueued {item_id} (handler {APP_HANDLER}, key {key}, due in 300 ms) through the coordinator's Queue API")

    def died() -> str | None:
        return side.died() or app.died()

    pushes = wait_for(lambda: stub.pushes_of(item_id), 30, f"sidecar: {item_id} never reached the app (no push of it)", died)
    log(f"sidecar: the app pushed {pushes[0]} {time.monotonic() - t0:.1f}s after the enqueue (via {deliveries} -> {side.label})")
    if pushes[0].get("users") != [42]:
        raise SmokeError(f"sidecar: the push names users {pushes[0].get('users')}, not [42]: {pushes[0]}")
    python_run(python, ["-c", PRODUCER, "wait-gone", coordinator_url, producer_token or "", item_id, key, "15"], 30,
               f"sidecar: {item_id} was pushed but not acked (still in the queue)")
    log(f"sidecar: {item_id} acked (gone from the queue); pushes of it: {len(stub.pushes_of(item_id))}")


def stop_app_pod(side: Proc, app: Proc) -> None:
    grace, _ = grace_and_prestop(app)
    native = side.ctr.get("restartPolicy") == "Always"
    _, side_pre = grace_and_prestop(side)
    t0 = time.monotonic()
    # The app drains first: SIGTERM, within the grace period.
    code, took = app.stop(grace)
    if code != 0:
        raise SmokeError(f"{app.label}: SIGTERM -> exit {code} after {took:.1f}s (grace {grace}s)\n"
                         + tail(app.log_path.read_text(errors="replace")))
    log(f"{app.label}: SIGTERM -> drained and exited 0 in {took:.1f}s")
    if not side.running():
        raise SmokeError(side.died() or f"{side.label} stopped before the app")
    if not native and took > side_pre:
        raise SmokeError(f"{app.label} took {took:.1f}s to drain, longer than the sidecar's preStop ({side_pre}s)")
    # Then the sidecar: after the app exited (native), or after its preStop wait (here:
    # at once, the wait only matters while the app still drains).
    left = grace - (time.monotonic() - t0)
    code, took = side.stop(left)
    if code != 0:
        raise SmokeError(f"{side.label}: SIGTERM -> exit {code} after {took:.1f}s ({left:.1f}s of the grace left)\n"
                         + tail(side.log_path.read_text(errors="replace")))
    log(f"{side.label}: SIGTERM after the app's exit -> exit 0 in {took:.1f}s; app pod done in "
        f"{time.monotonic() - t0:.1f}s of its {grace}s grace ({'native sidecar' if native else 'sidecar preStop ' + str(side_pre) + 's'})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", required=True, help="Redis the release uses, e.g. redis://127.0.0.1:6379")
    ap.add_argument("--etcd-endpoints", required=True, help="etcd the release uses, e.g. http://127.0.0.1:2379")
    ap.add_argument("--redis-password", default="", help="Redis requires this password (goes through the chart's Secret)")
    ap.add_argument("--etcd-user", default="", help="etcd user (etcd authentication on)")
    ap.add_argument("--etcd-password", default="", help="password of --etcd-user (goes through the chart's Secret)")
    ap.add_argument("--chime", default=str(REPO / "target" / "debug" / "chime"), help="the chime binary")
    ap.add_argument("--python", default="", help="a python with the SDK (pip install -e sdk/python): runs the app and the pool's subscriber; without it, neither is checked")
    ap.add_argument("--values", "-f", action="append", default=[], help="extra values file (repeatable)")
    ap.add_argument("--apply-values", help="values of the configuration hook (apply.*) to run, rendered with the other values but alerts.* at the defaults")
    ap.add_argument("--timeout", type=int, default=120, help="seconds the test waits for its run")
    ap.add_argument("--workdir", help="directory for config files and logs (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    common.need_modules()
    t0 = time.monotonic()
    try:
        alerts, applied = run(args)
    except SmokeError as e:
        print(f"smoke.py: FAILED: {e}", file=sys.stderr)
        return 1
    what = "coordinator and worker ran a job to success"
    if args.python:
        what += ", served items to an app through the pool" + (" and through an app pod's sidecar" if args.values else "")
    if alerts:
        what += ", the alert rules hook applied its rules"
    if applied:
        what += f", the configuration hook applied {applied} objects and pruned them"
    elif applied == 0:
        what += ", the configuration hook ran with no objects"
    print(f"smoke.py: OK in {time.monotonic() - t0:.1f}s: chart-rendered {what}, and stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
