#!/usr/bin/env python3
"""Runs the chart's rendered pods as containers of the chime image (issue 18).

No Kubernetes API server or kubelet can run on the machines this is checked on, so this
script does the kubelet's part for the workloads Helm renders: for each value set it
renders the chart with Helm's own engine (scripts/helm/common.py), then runs every pod of
the coordinator StatefulSet, the worker Deployment, the bundled Redis and etcd and the
`helm test` Pod with podman, taking from the manifests (and nothing from elsewhere):

  image, command/args (with $(VAR) expansion), env (value, fieldRef, secretKeyRef,
  configMapKeyRef), runAsUser/runAsGroup/fsGroup/supplementalGroups, runAsNonRoot,
  readOnlyRootFilesystem (no tmpfs added behind the manifest's back), dropped and added
  capabilities, allowPrivilegeEscalation, CPU and memory limits, ConfigMap and Secret
  volumes with their items and modes (owned root:fsGroup, group-readable, as the kubelet
  makes them), emptyDirs (a directory, mode 0777), persistent volume claims (a
  directory owned by fsGroup), the pod's hostname and the Services' DNS names
  (/etc/hosts of every pod), terminationGracePeriodSeconds and preStop hooks.

It checks that every container starts; every startup, readiness and liveness probe
answers on the port (by name or number) and path the manifest gives; every Service
port reaches a container port; exactly one coordinator leads; the workers register; the
helm test Pod's command exits 0; and a graceful stop (preStop, then SIGTERM) of each
worker and coordinator ends with exit status 0 within its termination grace.

  scripts/image/pods.py --image chime:0.1.0 [--values default|bundled ...] [--plant KIND]

--plant breaks one thing in the rendered manifests (a probe path, a probe port, a
Secret volume's mode, the user) to show that the check then fails.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helm"))
import common  # noqa: E402

NAMESPACE = "chime"
RELEASE = "chime"
STORE_IMAGES = {"redis": "localhost/chime-test/redis:debian", "etcd": "localhost/chime-test/etcd:debian"}
PLANTS = ("probe-path", "probe-port", "secret-mode", "run-as-root")


class PodsError(Exception):
    pass


def log(msg: str) -> None:
    print(f"pods: {msg}", flush=True)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise PodsError(f"podman {' '.join(args[:3])}…: exit {res.returncode}: {res.stderr.strip()[-800:]}")
    return res


def wait_for(cond: Callable[[], Any], timeout: float, what: str, alive: Callable[[], str | None] = lambda: None) -> Any:
    """Polls `cond` until it returns a truthy value; fails at the deadline or when
    `alive` reports the process under test gone."""
    deadline = time.monotonic() + timeout
    last_err = ""
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 (the reason is kept for the failure message)
            last_err = f" (last error: {e})"
        gone = alive()
        if gone:
            raise PodsError(f"{what}: {gone}")
        if time.monotonic() > deadline:
            raise PodsError(f"{what}: not within {timeout:.0f}s{last_err}")
        time.sleep(0.25)


def cpu_quantity(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def mem_quantity(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 10**3, "M": 10**6, "G": 10**9}
    for u, f in units.items():
        if q.endswith(u):
            return int(float(q[: -len(u)]) * f)
    return int(q)


def expand(text: str, env: dict[str, str]) -> str:
    """$(VAR) -> the variable, the kubelet's way ($$ escapes, unknown stays as written)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


class Pod:
    """One pod of a rendered workload, run as a podman pod with one container per
    manifest container."""

    def __init__(self, cluster: Cluster, workload: dict[str, Any], name: str, ip: str) -> None:
        self.cluster = cluster
        self.workload = workload
        self.kind = workload["kind"]
        self.name = name
        self.ip = ip
        # An "External" stand-in store carries its pod spec like a workload's template.
        self.spec = common.pod_spec(workload) or workload["spec"]["template"]["spec"]
        labels = common.pod_labels(workload)
        self.labels = labels
        self.component = labels.get("app.kubernetes.io/component", name)
        self.psc = self.spec.get("securityContext", {})
        self.dir = cluster.root / name
        self.dir.mkdir(parents=True)
        self.started: list[str] = []  # podman container names

    # -- kubelet: volumes ---------------------------------------------------------------
    def volume_args(self, ctr: dict[str, Any]) -> list[str]:
        vols = {v["name"]: v for v in self.spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in self.workload.get("spec", {}).get("volumeClaimTemplates", [])}
        fs_group = self.psc.get("fsGroup")
        out: list[str] = []
        for m in ctr.get("volumeMounts", []):
            ro = bool(m.get("readOnly"))
            v = vols.get(m["name"])
            d = self.dir / "volumes" / m["name"]
            if v is None and m["name"] in claims:
                # A PersistentVolume: the kubelet makes it group-owned by fsGroup, setgid.
                d.mkdir(parents=True, exist_ok=True)
                if fs_group is not None:
                    os.chown(d, 0, fs_group)
                    d.chmod(0o2775)
                out += ["--mount", f"type=bind,src={d},dst={m['mountPath']},ro={str(ro).lower()}"]
            elif v is None:
                raise PodsError(f"{self.name}/{ctr['name']}: volumeMount {m['name']} names no volume")
            elif "emptyDir" in v:
                # The kubelet's emptyDir: a directory on the node, mode 0777 (its
                # sizeLimit is enforced by eviction, which this does not emulate).
                # A tmpfs would do for medium Memory, but podman here ignores a tmpfs
                # mount's mode when the image has the directory.
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o777)
                out += ["--mount", f"type=bind,src={d},dst={m['mountPath']},ro={str(ro).lower()}"]
            elif "configMap" in v or "secret" in v:
                src = v.get("configMap") or v["secret"]
                if not d.exists():
                    self.project(d, v, src, fs_group)
                out += ["--mount", f"type=bind,src={d},dst={m['mountPath']},ro=true"]
            else:
                raise PodsError(f"{self.name}/{ctr['name']}: volume {m['name']}: unsupported volume type")
        return out

    def project(self, d: Path, v: dict[str, Any], src: dict[str, Any], fs_group: int | None) -> None:
        """A ConfigMap or Secret volume as the kubelet writes it: each item a file with
        its mode (item mode, else defaultMode, else 0644), owned by root and, with an
        fsGroup, group-owned by it and group-readable."""
        d.mkdir(parents=True)
        if "configMap" in v:
            obj = self.cluster.object("ConfigMap", src["name"])
            data = {k: s.encode() for k, s in (obj or {}).get("data", {}).items()}
        else:
            obj = self.cluster.object("Secret", src["secretName"])
            data = {k: self.cluster.secret_value(src["secretName"], k) for k in self.cluster.secret_keys(obj)}
        if obj is None:
            raise PodsError(f"{self.name}: volume {v['name']}: its {'ConfigMap' if 'configMap' in v else 'Secret'} is not rendered")
        items = src.get("items") or [{"key": k, "path": k} for k in data]
        default_mode = src.get("defaultMode", 0o644)
        for it in items:
            if it["key"] not in data:
                raise PodsError(f"{self.name}: volume {v['name']}: key {it['key']} is not in the object")
            f = d / it["path"]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data[it["key"]])
            mode = it.get("mode", default_mode)
            if fs_group is not None:
                os.chown(f, 0, fs_group)
                mode |= 0o440
            else:
                os.chown(f, 0, 0)
            f.chmod(mode)
        d.chmod(0o755)

    # -- kubelet: env, command, security -----------------------------------------------
    def env(self, ctr: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in ctr.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
                continue
            src = e["valueFrom"]
            if "fieldRef" in src:
                env[e["name"]] = {
                    "metadata.name": self.name, "metadata.namespace": NAMESPACE,
                    "status.podIP": self.ip, "spec.nodeName": "node-0",
                }[src["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in src:
                env[e["name"]] = self.cluster.secret_value(src["secretKeyRef"]["name"], src["secretKeyRef"]["key"]).decode()
            elif "configMapKeyRef" in src:
                cm = self.cluster.object("ConfigMap", src["configMapKeyRef"]["name"]) or {}
                env[e["name"]] = cm.get("data", {})[src["configMapKeyRef"]["key"]]
            else:
                raise PodsError(f"{self.name}/{ctr['name']}: env {e['name']}: unsupported valueFrom")
        return env

    def security_args(self, ctr: dict[str, Any]) -> list[str]:
        sc = {**{k: v for k, v in self.psc.items() if k in ("runAsUser", "runAsGroup", "runAsNonRoot")}, **ctr.get("securityContext", {})}
        image_user = self.cluster.image_user(ctr["image"])
        uid = sc.get("runAsUser", image_user[0])
        gid = sc.get("runAsGroup", image_user[1] if "runAsUser" not in sc else 0)
        if sc.get("runAsNonRoot") and int(uid) == 0:
            raise PodsError(f"{self.name}/{ctr['name']}: runAsNonRoot, but the container would run as root (the kubelet refuses to start it)")
        out = ["--user", f"{uid}:{gid}"]
        for g in [self.psc.get("fsGroup"), *self.psc.get("supplementalGroups", [])]:
            if g is not None:
                out += ["--group-add", str(g)]
        if sc.get("readOnlyRootFilesystem"):
            # --read-only-tmpfs=false: podman would otherwise mount tmpfs on /tmp, /run
            # and /var/tmp, which a pod does not get.
            out += ["--read-only", "--read-only-tmpfs=false"]
        caps = sc.get("capabilities", {})
        for c in caps.get("drop", []):
            out += ["--cap-drop", c]
        for c in caps.get("add", []):
            out += ["--cap-add", c]
        if sc.get("allowPrivilegeEscalation") is False:
            out += ["--security-opt", "no-new-privileges"]
        limits = ctr.get("resources", {}).get("limits", {})
        if "memory" in limits:
            out += ["--memory", str(mem_quantity(str(limits["memory"])))]
        if "cpu" in limits:
            out += ["--cpus", f"{cpu_quantity(str(limits['cpu'])):.3f}"]
        return out

    def start(self) -> None:
        hosts = [f"--add-host={h}:{ip}" for h, ip in sorted(self.cluster.hosts.items())]
        hostname = self.name
        podman("pod", "create", "--name", self.pname, "--network", self.cluster.network, "--ip", self.ip,
               "--hostname", hostname, *hosts)
        for ctr in self.spec.get("initContainers", []):
            if common.is_sidecar(ctr):
                self.run(ctr, detach=True)
            else:
                name = self.run(ctr, detach=True)
                code = int(podman("wait", name, timeout=300).stdout.strip() or "1")
                if code != 0:
                    raise PodsError(f"{self.name}: init container {ctr['name']} exited {code}:\n{self.logs(name)}")
        for ctr in self.spec.get("containers", []):
            self.run(ctr, detach=True)

    @property
    def pname(self) -> str:
        return f"{self.cluster.tag}-{self.name}"

    def cname(self, ctr: dict[str, Any]) -> str:
        return f"{self.pname}-{ctr['name']}"

    def run(self, ctr: dict[str, Any], *, detach: bool) -> str:
        env = self.env(ctr)
        name = self.cname(ctr)
        args = ["run", "--pod", self.pname, "--name", name, "--pull", "never", "--log-driver", "k8s-file"]
        if detach:
            args.append("-d")
        args += self.security_args(ctr) + self.volume_args(ctr)
        for k, v in env.items():
            args += ["--env", f"{k}={v}"]
        command = [expand(a, env) for a in ctr.get("command", [])]
        cargs = [expand(a, env) for a in ctr.get("args", [])]
        if command:
            args += ["--entrypoint", json.dumps(command)]
        args.append(ctr["image"])
        args += cargs
        podman(*args)
        self.started.append(name)
        return name

    def logs(self, cname: str, n: int = 30) -> str:
        res = podman("logs", "--tail", str(n), cname, check=False)
        return (res.stdout + res.stderr).rstrip()

    def died(self) -> str | None:
        """Why the pod is broken: a (non-init) container that exited."""
        for ctr in self.spec.get("containers", []):
            c = self.cname(ctr)
            st = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", c, check=False).stdout.split()
            if st and st[0] in ("exited", "stopped"):
                return f"container {c} exited {st[1]}:\n{self.logs(c)}"
        return None

    # -- probes ---------------------------------------------------------------------------
    def port_of(self, ctr: dict[str, Any], port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for c in self.spec.get("containers", []) + self.spec.get("initContainers", []):
            if ctr is not None and c is not ctr:
                continue
            for p in c.get("ports", []):
                if p.get("name") == port:
                    return int(p["containerPort"])
        raise PodsError(f"{self.name}/{ctr['name']}: no container port named {port}")

    def probe(self, ctr: dict[str, Any], kind: str, p: dict[str, Any]) -> str:
        """Runs one probe once; returns what answered, raises when it failed."""
        timeout = float(p.get("timeoutSeconds", 1))
        if "httpGet" in p:
            g = p["httpGet"]
            port = self.port_of(ctr, g["port"])
            url = f"{g.get('scheme', 'HTTP').lower()}://{self.ip}:{port}{g.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            if not 200 <= code < 400:
                raise PodsError(f"GET {url} -> {code}")
            return f"GET :{port}{g.get('path', '/')} -> {code}"
        if "tcpSocket" in p or "grpc" in p:
            # A gRPC probe is checked as far as its port accepting connections.
            kind_of = "tcpSocket" if "tcpSocket" in p else "grpc"
            port = self.port_of(ctr, p[kind_of]["port"])
            with socket.create_connection((self.ip, port), timeout=timeout):
                return f"{kind_of} :{port} open"
        if "exec" in p:
            res = podman("exec", self.cname(ctr), *p["exec"]["command"], check=False, timeout=timeout + 5)
            if res.returncode != 0:
                raise PodsError(f"exec {p['exec']['command']} -> {res.returncode}")
            return f"exec {' '.join(p['exec']['command'])[:60]} -> 0"
        raise PodsError(f"{self.name}/{ctr['name']} {kind}: unsupported probe")

    def check_probes(self) -> None:
        for ctr in self.spec.get("containers", []):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = ctr.get(kind)
                if not p:
                    continue
                # As long as the kubelet would wait before calling the pod broken.
                budget = max(60.0, float(p.get("periodSeconds", 10)) * float(p.get("failureThreshold", 3))
                             + float(p.get("initialDelaySeconds", 0)))
                what = wait_for(lambda: self.probe(ctr, kind, p), min(budget, 120.0),
                                f"{self.name}/{ctr['name']} {kind}", self.died)
                log(f"{self.name}/{ctr['name']} {kind}: {what}")

    def metric(self, port_name: str, metric: str) -> float | None:
        port = self.port_of(self.spec["containers"][0], port_name)
        with urllib.request.urlopen(f"http://{self.ip}:{port}/metrics", timeout=3) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(metric + " ") or line.startswith(metric + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return None

    # -- graceful stop ----------------------------------------------------------------
    def graceful_stop(self) -> None:
        """What the kubelet does on a pod's deletion: each container's preStop hook, then
        SIGTERM, then SIGKILL when terminationGracePeriodSeconds (counted from the
        start of preStop) has passed. The chime containers must end with status 0."""
        grace = int(self.spec.get("terminationGracePeriodSeconds", 30))
        t0 = time.monotonic()
        for ctr in self.spec.get("containers", []):
            hook = ctr.get("lifecycle", {}).get("preStop", {}).get("exec")
            if hook:
                res = podman("exec", self.cname(ctr), *hook["command"], check=False, timeout=grace + 5)
                if res.returncode != 0:
                    raise PodsError(f"{self.name}/{ctr['name']}: preStop {hook['command']} exited {res.returncode}")
        for ctr in self.spec.get("containers", []):
            left = max(1, int(grace - (time.monotonic() - t0)))
            name = self.cname(ctr)
            podman("stop", "--time", str(left), name, timeout=grace + 30)
            took = time.monotonic() - t0
            code = int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())
            if took >= grace or (common.chime_process(ctr) and code != 0):
                raise PodsError(f"{self.name}/{ctr['name']}: graceful stop ended with status {code} after {took:.1f}s "
                                f"(grace {grace}s):\n{self.logs(name)}")
            log(f"{self.name}/{ctr['name']}: preStop + SIGTERM -> exit {code} in {took:.1f}s (grace {grace}s)")


class Cluster:
    """The pods of one rendered release on one podman network, with the Services' DNS
    names in every pod's /etc/hosts."""

    def __init__(self, values: dict[str, Any], label: str, image: str, plant: str | None, keep: bool) -> None:
        self.label = label
        self.tag = f"chime-pods-{os.getpid()}-{label}"
        self.image = image
        self.root = Path(tempfile.mkdtemp(prefix=f"chime-pods-{label}-"))
        self.keep = keep
        rendered = common.render(values, name=RELEASE, namespace=NAMESPACE)
        self.objs = [o for _, o in common.objects(rendered)]
        if plant:
            self.plant(plant)
        # The bundled stores' images cannot be pulled here: the local stand-ins take
        # the references the chart renders.
        for w in self.workloads():
            comp = w["metadata"]["labels"].get("app.kubernetes.io/component")
            if comp in STORE_IMAGES:
                for ctr in common.containers(common.pod_spec(w) or {}):
                    podman("tag", STORE_IMAGES[comp], ctr["image"])
        self.network = self.tag
        self.pods: list[Pod] = []
        self.hosts: dict[str, str] = {}
        self._users: dict[str, tuple[int, int]] = {}

    # -- rendered objects ---------------------------------------------------------------
    def object(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.objs if o["kind"] == kind and o["metadata"]["name"] == name), None)

    @staticmethod
    def secret_keys(obj: dict[str, Any] | None) -> list[str]:
        return list((obj or {}).get("data", {})) + list((obj or {}).get("stringData", {}))

    def secret_value(self, name: str, key: str) -> bytes:
        import base64

        s = self.object("Secret", name)
        if s is None:
            raise PodsError(f"Secret {name} is not rendered (an existing Secret the check cannot see)")
        if key in s.get("stringData", {}):
            return str(s["stringData"][key]).encode()
        return base64.b64decode(s["data"][key])

    def image_user(self, image: str) -> tuple[int, int]:
        """The image's USER as uid:gid (what runs when the pod names no runAsUser)."""
        if image not in self._users:
            user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() or "0:0"
            u, _, g = user.partition(":")
            if not u.isdigit() or (g and not g.isdigit()):
                raise PodsError(f"image {image}: USER {user!r} is not numeric (runAsNonRoot needs a numeric user)")
            self._users[image] = (int(u), int(g or 0))
        return self._users[image]

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.objs if o["kind"] in ("StatefulSet", "Deployment")]

    def test_pod(self) -> dict[str, Any]:
        t = [o for o in self.objs if o["kind"] == "Pod" and o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
        if len(t) != 1:
            raise PodsError(f"expected one helm test Pod, rendered {len(t)}")
        return t[0]

    # -- planted breaks (to show the check can fail) ---------------------------------
    def plant(self, kind: str) -> None:
        co = next(o for o in self.workloads() if o["metadata"]["labels"]["app.kubernetes.io/component"] == "coordinator")
        spec = common.pod_spec(co) or {}
        ctr = spec["containers"][0]
        if kind == "probe-path":
            ctr["readinessProbe"]["httpGet"]["path"] = "/ready"
        elif kind == "probe-port":
            ctr["livenessProbe"]["httpGet"]["port"] = 9999
        elif kind == "secret-mode":
            for v in spec.get("volumes", []):
                if "secret" in v:
                    v["secret"]["defaultMode"] = 0o400
            spec["securityContext"].pop("fsGroup", None)
        elif kind == "run-as-root":
            spec["securityContext"]["runAsUser"] = 0
        else:
            raise PodsError(f"unknown plant {kind}")
        log(f"planted: {kind} (this run must fail)")

    # -- lifecycle ----------------------------------------------------------------------
    def up(self, extra: list[tuple[dict[str, Any], str]]) -> None:
        net = random.randint(1, 250)
        for _ in range(20):
            subnet = ipaddress.ip_network(f"10.{random.randint(90, 120)}.{net}.0/24")
            if podman("network", "create", "--subnet", str(subnet), self.network, check=False).returncode == 0:
                break
            net = random.randint(1, 250)
        else:
            raise PodsError("no free subnet for the pods' network")
        hosts = iter(list(subnet.hosts())[9:])
        plan: list[tuple[dict[str, Any], str]] = list(extra)
        for w in self.workloads():
            n = int(w["spec"].get("replicas", 1))
            base = w["metadata"]["name"]
            for i in range(n):
                # StatefulSet pods are <name>-<ordinal>; a Deployment's get a random
                # suffix, for which the ordinal stands in.
                plan.append((w, f"{base}-{i}"))
        for w, name in plan:
            self.pods.append(Pod(self, w, name, str(next(hosts))))
        test = self.test_pod()
        self.test = Pod(self, test, test["metadata"]["name"], str(next(hosts)))
        self.resolve_names()
        for p in self.pods:
            log(f"{p.name} ({p.kind}, {p.ip}): starting {', '.join(c['name'] for c in common.containers(p.spec))}")
            p.start()

    def resolve_names(self) -> None:
        """Every Service name (short, .ns, .ns.svc, .ns.svc.<domain>) -> the first ready
        pod it selects; StatefulSet pods under their headless Service by name too."""
        def forms(name: str) -> list[str]:
            return [name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"]

        for svc in (o for o in self.objs if o["kind"] == "Service"):
            sel = svc["spec"].get("selector", {})
            pods = [p for p in self.pods if sel and all(p.labels.get(k) == v for k, v in sel.items())]
            if not pods:
                continue
            for h in forms(svc["metadata"]["name"]):
                self.hosts[h] = pods[0].ip
            if svc["spec"].get("clusterIP") == "None":
                for p in pods:
                    for h in forms(f"{p.name}.{svc['metadata']['name']}"):
                        self.hosts[h] = p.ip
        for p in self.pods:
            if p.kind == "External":
                for h in [p.name, *p.workload["metadata"].get("aliases", [])]:
                    for f in forms(h):
                        self.hosts[f] = p.ip

    def check_services(self) -> None:
        """Every Service port reaches a listening container port of a pod it selects."""
        for svc in (o for o in self.objs if o["kind"] == "Service"):
            sel = svc["spec"].get("selector", {})
            pods = [p for p in self.pods if sel and all(p.labels.get(k) == v for k, v in sel.items())]
            if not pods:
                raise PodsError(f"Service {svc['metadata']['name']} selects no pod")
            for sp in svc["spec"]["ports"]:
                target = sp.get("targetPort", sp["port"])
                p = pods[0]
                port = next((p.port_of(c, target) for c in p.spec["containers"]
                             if isinstance(target, int) or any(x.get("name") == target for x in c.get("ports", []))), None)
                if port is None:
                    raise PodsError(f"Service {svc['metadata']['name']} port {sp['port']}: targetPort {target} is no container port of {p.name}")
                wait_for(lambda: socket.create_connection((p.ip, port), timeout=2).close() or True, 30,
                         f"Service {svc['metadata']['name']} port {sp.get('name', sp['port'])} -> {p.name}:{port}")
                log(f"Service {svc['metadata']['name']}:{sp['port']} -> {p.name}:{port} open")

    def run_test_pod(self) -> None:
        self.test.start()
        ctr = self.test.spec["containers"][0]
        name = self.test.cname(ctr)
        code = int(podman("wait", name, timeout=300).stdout.strip() or "1")
        out = self.test.logs(name, 200)
        for line in out.splitlines():
            print(f"  test| {line}")
        if code != 0 or "PASS" not in out:
            raise PodsError(f"the helm test Pod exited {code}")
        log("helm test Pod: exit 0 (a job created, triggered and its run succeeded through the client Service)")

    def down(self) -> None:
        for p in [*self.pods, getattr(self, "test", None)]:
            if p is not None:
                podman("pod", "rm", "--force", "--time", "0", p.pname, check=False)
        podman("network", "rm", "--force", self.network, check=False)
        if self.keep:
            log(f"kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def component(self, name: str) -> list[Pod]:
        return [p for p in self.pods if p.component == name]


def external_store(kind: str, name: str) -> dict[str, Any]:
    """A stand-in for the external Redis or etcd the default values point at (redis:6379,
    etcd:2379): a pod of the same local store images, outside the chart."""
    if kind == "redis":
        ctr = {"name": "redis", "image": STORE_IMAGES["redis"],
               "args": ["redis-server", "--port", "6379", "--save", "", "--appendonly", "no", "--protected-mode", "no"],
               "ports": [{"name": "redis", "containerPort": 6379}]}
    else:
        ctr = {"name": "etcd", "image": STORE_IMAGES["etcd"], "command": ["/usr/local/bin/etcd"],
               "args": ["--data-dir=/tmp/etcd", "--listen-client-urls=http://0.0.0.0:2379",
                        f"--advertise-client-urls=http://{name}:2379"],
               "ports": [{"name": "client", "containerPort": 2379}]}
    return {"kind": "External", "metadata": {"name": name, "labels": {"app.kubernetes.io/component": f"external-{kind}"}},
            "spec": {"template": {"metadata": {"labels": {}}, "spec": {
                "securityContext": {"runAsUser": 999, "runAsGroup": 999}, "containers": [ctr]}}}}


def check(label: str, values: dict[str, Any], args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    c = Cluster(values, label, args.image, args.plant, args.keep)
    try:
        extra = []
        if not values.get("redis", {}).get("bundled", {}).get("enabled"):
            extra.append((external_store("redis", "redis"), "redis"))
        if not values.get("etcd", {}).get("bundled", {}).get("enabled"):
            extra.append((external_store("etcd", "etcd"), "etcd"))
        for w, _ in extra:
            w["kind"] = "External"
        c.up(extra)
        for p in c.pods:
            p.check_probes()
        c.check_services()
        coords = c.component("coordinator")
        leaders = wait_for(lambda: [p.name for p in coords if p.metric("http", "chime_coordinator_leader") == 1.0], 60,
                           "a coordinator elected leader")
        if len(leaders) != 1:
            raise PodsError(f"coordinators leading: {leaders}")
        log(f"leader elected: {leaders[0]} (chime_coordinator_leader 1; the other {len(coords) - 1} report 0)")
        lead = next(p for p in coords if p.name == leaders[0])
        workers = c.component("worker")
        wait_for(lambda: (lead.metric("http", "chime_connected_workers") or 0) >= len(workers), 60,
                 f"{len(workers)} workers registered with the leader")
        log(f"workers registered with {lead.name}: {int(lead.metric('http', 'chime_connected_workers') or 0)}")
        c.run_test_pod()
        # Graceful stops: each worker, then the followers, then the leader (hands
        # over), then the bundled stores (Redis writes its AOF; within the grace too).
        stores = [p for p in c.pods if p.component in ("redis", "etcd")]
        for p in workers + [p for p in coords if p is not lead] + [lead] + stores:
            p.graceful_stop()
        log(f"{label}: all checks passed in {time.monotonic() - t0:.0f}s")
    except Exception:
        for p in c.pods:
            for name in p.started:
                print(f"--- {name}\n{p.logs(name)}")
        raise
    finally:
        c.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", required=True, help="the chime image (as built by scripts/image/build)")
    ap.add_argument("--values", action="append", choices=["default", "bundled"],
                    help="value sets to check (default: both)")
    ap.add_argument("--plant", choices=PLANTS, help="break one thing; the check must then fail")
    ap.add_argument("--keep", action="store_true", help="keep the pods' volume directories")
    args = ap.parse_args()
    common.need_modules()
    image_values = {"image": {"repository": args.image.rsplit(":", 1)[0], "tag": args.image.rsplit(":", 1)[1],
                              "pullPolicy": "Never"}}
    sets: dict[str, dict[str, Any]] = {
        "default": image_values,
        # The example app of this value set needs an app image; smoke.py runs it as processes.
        "bundled": common.deep_merge(common.load_values_file(common.CHART / "ci" / "bundled-stores-values.yaml"),
                                     {**image_values, "sidecarApp": {"enabled": False}}),
    }
    try:
        for label in args.values or ["default", "bundled"]:
            log(f"=== value set {label}")
            check(label, sets[label], args)
    except PodsError as e:
        print(f"pods: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
