#!/usr/bin/env python3
"""Runs the Helm chart's wiring against the real chime binary, without Kubernetes.

Renders helm/chime with Helm's own engine for one coordinator and one worker against
the Redis and etcd given on the command line, then starts, as local processes, exactly
what the rendered manifests would start in pods:

  * command, args and env of the coordinator StatefulSet's and the worker Deployment's
    containers (downward-API fields become local values: pod name, namespace,
    127.0.0.1; secretKeyRef/configMapKeyRef are read from the rendered Secret and
    ConfigMap; $(VAR) references expanded as the kubelet does);
  * their volumes: the rendered ConfigMap's TOML files and the Secret's token files
    are written to a temporary directory, and every mount path in args, env and the
    config files is pointed there;
  * store passwords (--redis-password, --etcd-user/--etcd-password) go the chart's
    way: values -> the chart's Secret -> secretKeyRef env -> CHIME_REDIS_URL
    ($(REDIS_PASSWORD) expanded into the URL) and CHIME_ETCD_PASSWORD;
  * the image's binary path (/usr/local/bin/chime, checked against the Dockerfile)
    becomes --chime;
  * cluster DNS names become 127.0.0.1 ports: a pod name under a headless Service or
    a Service name, with a port, is resolved through the rendered Services (port ->
    targetPort -> the selected pods' container port) to the port picked for that
    process; a name that leads to no rendered object fails the test, so does a
    listen address that no containerPort declares.

Then it checks the HTTP probes of both containers (GET /livez, /readyz, /metrics on
the ports the probes name), runs the helm test Pod's own script (it creates a manual
job, triggers it and waits for its run to succeed through the chime CLI), and stops
the worker and the coordinator with SIGTERM, each of which must exit 0 within the
pod's terminationGracePeriodSeconds. Everything started is killed at the end.

With auth on (the default), it also checks that an admin call without the token is
refused. Keys of features the binary does not have yet ([tls]: see common.PENDING)
are dropped from the config, with a note, when the binary refuses them; anything
else it refuses fails.

    python3 scripts/helm/smoke.py --redis-url redis://127.0.0.1:6379 \\
        --etcd-endpoints http://127.0.0.1:2379 --chime target/debug/chime
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import PENDING, REPO, find, objects, pod_labels, pod_spec  # noqa: E402

NAMESPACE = "chime-smoke"
RELEASE = "chime"
IMAGE_BINARY = "/usr/local/bin/chime"
STARTUP_S = 4.0  # a process still running after this long accepted its configuration


class SmokeError(Exception):
    pass


def log(msg: str) -> None:
    print(f"smoke: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    def __init__(self, objs: list[dict[str, Any]]) -> None:
        self.objs = objs
        self.ports: dict[tuple[str, int], int] = {}  # (component, containerPort) -> local port
        coord = find(objs, "StatefulSet", "coordinator")
        worker = find(objs, "Deployment", "worker")
        test = find(objs, "Pod", "test")
        if len(coord) != 1 or len(worker) != 1 or len(test) != 1:
            raise SmokeError("expected one coordinator StatefulSet, one worker Deployment and one test Pod")
        self.coordinator, self.worker, self.test = coord[0], worker[0], test[0]
        for w, comp in ((self.coordinator, "coordinator"), (self.worker, "worker")):
            for ctr in pod_spec(w)["containers"]:
                for p in ctr.get("ports", []):
                    self.ports[(comp, p["containerPort"])] = free_port()

    def component(self, w: dict[str, Any]) -> str:
        return w["metadata"]["labels"]["app.kubernetes.io/component"]

    def container_port(self, w: dict[str, Any], port: int | str) -> int:
        for ctr in pod_spec(w)["containers"]:
            for p in ctr.get("ports", []):
                if port in (p["containerPort"], p.get("name")):
                    return p["containerPort"]
        raise SmokeError(f"{w['kind']}/{w['metadata']['name']} has no container port {port}")

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
        """Cluster DNS names and 0.0.0.0 listen addresses -> 127.0.0.1 and local ports."""
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


# ------------------------------------------------------------------ a pod as a process


class Proc:
    def __init__(self, rel: Release, workload: dict[str, Any], pod_name: str, root: Path, chime: Path) -> None:
        self.rel = rel
        self.workload = workload
        self.component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        self.pod = pod_name
        self.dir = root / self.component
        self.dir.mkdir(parents=True)
        self.chime = chime
        self.spec = pod_spec(workload)
        self.ctr = self.spec["containers"][0]
        self.mounts: dict[str, Path] = {}
        self.config_files: list[Path] = []
        self.popen: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "output.log"
        self.dropped: list[str] = []
        self.materialize_volumes()
        self.argv = self.build_argv()
        self.env = self.build_env()

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
                    raise SmokeError(f"{self.component}: volume {m['name']}: ConfigMap not rendered")
                items = v["configMap"].get("items") or [{"key": k, "path": k} for k in cm["data"]]
                for it in items:
                    f = d / it["path"]
                    f.write_text(cm["data"][it["key"]])
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
                raise SmokeError(f"{self.component}: volume {m['name']}: unsupported volume type")
        # Config files may name other mounts (token files): point them here too.
        for f in self.config_files:
            f.write_text(self.localize(f.read_text()))

    def localize(self, text: str) -> str:
        """Mount paths -> their local directories (one pass), then cluster names -> ports."""
        if self.mounts:
            alt = "|".join(re.escape(m) for m in sorted(self.mounts, key=len, reverse=True))
            text = re.sub(
                rf"(?<![\w/.-])({alt})(?=/|$|[^\w.-])", lambda m: str(self.mounts[m.group(1)]), text
            )
        return self.rel.localize(text, self.component)

    def build_argv(self) -> list[str]:
        cmd = list(self.ctr.get("command", [])) + list(self.ctr.get("args", []))
        if not cmd:
            raise SmokeError(f"{self.component}: no command")
        argv = [self.localize(a) for a in cmd]
        # The binary is substituted after localizing: its real path may lie under a
        # mount path of the pod (a clone in /tmp, which the pod mounts as emptyDir).
        if cmd[0] == IMAGE_BINARY:
            argv[0] = str(self.chime)
        return argv

    def build_env(self) -> dict[str, str]:
        """The container's env from the manifest (localized) over a minimal base env."""
        base: dict[str, str] = {
            "PATH": f"{self.chime.parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.dir),
            "HOSTNAME": self.pod,
        }
        for k in ("RUST_LOG", "RUST_BACKTRACE", "LANG", "TZ"):
            if k in os.environ:
                base[k] = os.environ[k]
        env: dict[str, str] = {}
        for e in self.ctr.get("env", []):
            name = e["name"]
            if "value" in e:
                value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
            else:
                src = e["valueFrom"]
                if "fieldRef" in src:
                    value = {
                        "metadata.name": self.pod,
                        "metadata.namespace": NAMESPACE,
                        "status.podIP": "127.0.0.1",
                        "spec.nodeName": "localhost",
                    }[src["fieldRef"]["fieldPath"]]
                elif "secretKeyRef" in src:
                    value = self.rel.secret_value(src["secretKeyRef"]["name"], src["secretKeyRef"]["key"]).decode()
                elif "configMapKeyRef" in src:
                    value = self.rel.configmap_value(src["configMapKeyRef"]["name"], src["configMapKeyRef"]["key"])
                else:
                    raise SmokeError(f"{self.component}: env {name}: unsupported valueFrom")
            env[name] = self.localize(value)
        return {**base, **env}

    def start(self) -> None:
        self.logf = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_tolerant(self) -> None:
        """Starts; when the binary refuses a pending key or flag, drops it and retries."""
        for _ in range(10):
            self.log_path.write_bytes(b"")
            self.start()
            deadline = time.monotonic() + STARTUP_S
            while time.monotonic() < deadline and self.popen.poll() is None:
                time.sleep(0.1)
            if self.popen.poll() is None:
                return
            out = self.log_path.read_text(errors="replace")
            m = re.search(r"unknown field `([A-Za-z0-9_]+)`", out)
            if m and self.drop_pending(m.group(1)):
                continue
            m = re.search(r"unexpected argument '(--[A-Za-z0-9-]+)'", out)
            if m:
                raise SmokeError(f"{self.component}: the binary refuses flag {m.group(1)}:\n{tail(out)}")
            raise SmokeError(f"{self.component} exited with {self.popen.returncode} at start:\n{tail(out)}")
        raise SmokeError(f"{self.component}: still refusing its configuration after dropping {self.dropped}")

    def drop_pending(self, name: str) -> bool:
        matches = [
            (sec, field) for sec, field in PENDING[self.component]
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
                    log(f"note: this chime binary does not know {self.component} config key {key} yet (pending feature): dropped for this run")
                    text = new
            f.write_text(text)
        return True

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, then wait up to `timeout` s: (exit code or None, seconds taken)."""
        assert self.popen is not None
        t0 = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=timeout)
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
        cport = self.rel.container_port(self.workload, p["httpGet"]["port"])
        return p["httpGet"]["path"], self.rel.ports[(self.component, cport)]


def tail(text: str, n: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def dockerfile_binary() -> str | None:
    df = REPO / "Dockerfile"
    if not df.exists():
        return None
    m = re.search(r"^COPY\b.*\s(/\S*/chime)\s*$", df.read_text(), re.M)
    return m.group(1) if m else None


# ------------------------------------------------------------------ the run


def run(args: argparse.Namespace) -> None:
    chime = Path(shutil.which(args.chime) or args.chime).resolve()
    if not os.access(chime, os.X_OK):
        raise SmokeError(f"no executable chime at {args.chime}")
    version = subprocess.run([str(chime), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    log(f"binary {chime} ({version})")
    in_image = dockerfile_binary()
    if in_image is not None and in_image != IMAGE_BINARY:
        raise SmokeError(f"the Dockerfile installs the binary at {in_image}, the manifests run {IMAGE_BINARY}")

    for url, what in ((args.redis_url.split(",")[0], "Redis"), (args.etcd_endpoints.split(",")[0], "etcd")):
        u = urllib.parse.urlsplit(url)
        if u.hostname and u.port:
            wait_tcp(u.hostname, u.port, 30, what)

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
        extra = common.load_values_file(Path(f))
        values = deep_merge(values, extra)
    rendered = common.render(values, name=RELEASE, namespace=NAMESPACE)
    rel = Release([o for _, o in objects(rendered)])
    log(f"rendered {len(rel.objs)} objects; key prefix smoke-{tag}, etcd prefix /chime-smoke-{tag}/")

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chime-helm-smoke-"))
    root.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    ok = False
    try:
        coord = Proc(rel, rel.coordinator, f"{rel.coordinator['metadata']['name']}-0", root, chime)
        worker = Proc(rel, rel.worker, f"{rel.worker['metadata']['name']}-5d8f7c9b4-smoke", root, chime)
        for p in (coord, worker):
            log(f"{p.component}: {' '.join(p.argv)}")
            for k, v in sorted(p.env.items()):
                if k.startswith("CHIME_") or k in ("POD_NAME", "POD_NAMESPACE"):
                    shown = "***" if "PASSWORD" in k else re.sub(r"//([^@/]*):([^@/]*)@", r"//\1:***@", v)
                    log(f"{p.component}:   {k}={shown}")
        procs += [coord]
        coord.start_tolerant()
        grpc = rel.ports[("coordinator", rel.container_port(rel.coordinator, "grpc"))]
        wait_tcp("127.0.0.1", grpc, 30, "coordinator gRPC")
        log(f"coordinator up: gRPC 127.0.0.1:{grpc}")
        procs += [worker]
        worker.start_tolerant()
        log("worker up")

        # Probes, on the ports and paths the manifests name.
        auth_on = "admin-token" in str(rel.test["spec"].get("volumes", []))
        for p in (coord, worker):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                pp = p.probe_port(probe)
                if pp is None:
                    continue
                path, port = pp
                deadline = time.monotonic() + 60
                while True:
                    code, body = http_get(f"http://127.0.0.1:{port}{path}")
                    if code == 200:
                        break
                    if time.monotonic() > deadline or not p.running():
                        raise SmokeError(f"{p.component} {probe} GET {path}: {code} {body[:200]}")
                    time.sleep(0.5)
                log(f"{p.component} {probe}: GET {path} -> 200")
            # What the ServiceMonitors scrape: the container port named http, /metrics.
            http_port = rel.ports[(p.component, rel.container_port(p.workload, "http"))]
            code, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
            if code != 200:
                raise SmokeError(f"{p.component} GET /metrics: {code} {body[:200]}")
            log(f"{p.component}: GET /metrics -> 200 ({body.count('# TYPE')} metric families)")
            if p is coord:
                # The console (NOTES.txt sends users to /); with auth on it may ask for the token.
                code, body = http_get(f"http://127.0.0.1:{http_port}/")
                if not (code == 200 or (auth_on and code in (401, 403))):
                    raise SmokeError(f"coordinator console GET /: {code} {body[:200]}")
                log(f"coordinator: GET / (console) -> {code}")

        # The helm test Pod's own script, as the Pod would run it.
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
        if auth_on:
            env = {k: v for k, v in test.env.items() if k != "CHIME_ADMIN_TOKEN"}
            res = subprocess.run(
                [str(chime), "workers", "--coordinator", f"http://127.0.0.1:{grpc}"],
                env=env, capture_output=True, text=True, timeout=30,
            )
            if res.returncode == 0:
                raise SmokeError("auth is on, yet an admin call without a token was accepted")
            log(f"auth: an admin call without the token is refused ({res.stderr.strip().splitlines()[-1][:120]})")

        # Graceful stops within the pods' grace periods.
        for p in (worker, coord):
            grace = p.spec.get("terminationGracePeriodSeconds", 30)
            pre = p.ctr.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            pre_s = int(pre[-1]) if pre and pre[-1].isdigit() else 0
            code, took = p.stop(grace - pre_s)
            if code != 0:
                raise SmokeError(
                    f"{p.component}: SIGTERM -> exit {code} after {took:.1f}s (grace {grace}s, preStop {pre_s}s)\n"
                    + tail(p.log_path.read_text(errors="replace"))
                )
            log(f"{p.component}: SIGTERM -> exit 0 in {took:.1f}s (grace {grace}s - preStop {pre_s}s)")
        ok = True
    finally:
        for p in reversed(procs):
            p.kill()
        if not ok:
            for p in procs:
                if p.log_path.exists():
                    print(f"--- {p.component} log (last lines) ---\n{tail(p.log_path.read_text(errors='replace'), 40)}")
        if args.keep or not ok:
            log(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", required=True, help="Redis the release uses, e.g. redis://127.0.0.1:6379")
    ap.add_argument("--etcd-endpoints", required=True, help="etcd the release uses, e.g. http://127.0.0.1:2379")
    ap.add_argument("--redis-password", default="", help="Redis requires this password (goes through the chart's Secret)")
    ap.add_argument("--etcd-user", default="", help="etcd user (etcd authentication on)")
    ap.add_argument("--etcd-password", default="", help="password of --etcd-user (goes through the chart's Secret)")
    ap.add_argument("--chime", default=str(REPO / "target" / "debug" / "chime"), help="the chime binary")
    ap.add_argument("--values", "-f", action="append", default=[], help="extra values file (repeatable)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds the test waits for its run")
    ap.add_argument("--workdir", help="directory for config files and logs (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    common.need_modules()
    t0 = time.monotonic()
    try:
        run(args)
    except SmokeError as e:
        print(f"smoke.py: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"smoke.py: OK in {time.monotonic() - t0:.1f}s: chart-rendered coordinator and worker ran a job to success and stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
