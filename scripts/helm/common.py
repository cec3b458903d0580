"""What check.py and smoke.py share: where the chart is, how it is rendered with Helm's
own engine (helm-python-sdk), and which configuration keys the chime binary reads.

The key tables mirror cli/src/config.rs (every struct there is `deny_unknown_fields`,
so a key the binary does not know stops the process). PENDING lists the keys of
features the chart exposes before the binary has them (TLS, issue 10): the smoke test
drops them, one by one and saying so, when the binary at hand refuses them; any other
key it refuses fails the test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "chime"
# Where the chime image (the Dockerfile at the root) installs the binary.
IMAGE_BINARY = "/usr/local/bin/chime"

_STORES: dict[str, set[str]] = {
    "redis": {"url", "cluster", "response_timeout_ms", "tls_ca_file", "tls_cert_file", "tls_key_file"},
    "etcd": {"endpoints", "prefix", "user", "password", "tls_ca_file", "tls_cert_file", "tls_key_file"},
    "log": {"format", "level"},
}
_TRACING: set[str] = {
    "otlp_endpoint", "otlp_headers", "otlp_tls_ca_file", "otlp_tls_cert_file", "otlp_tls_key_file",
    "service_name", "sample_ratio",
}

# Config keys per process: section -> fields ("" is the top level).
KNOWN_KEYS: dict[str, dict[str, set[str]]] = {
    "coordinator": {
        **_STORES,
        "coordinator": {
            "grpc_addr", "advertise", "prefix", "heartbeat_interval_ms", "history_per_job",
            "history_max_age_s", "election_ttl_s", "http_addr", "min_period_ms",
            "prepare_ahead_ms",
        },
        "auth": {
            "admin_token_file", "worker_token_file", "producer_token_file", "allow_unauthenticated",
            "metrics_require_token",
        },
        "queue": {"prefix", "family", "count"},
        "tls": {"cert_file", "key_file", "client_ca_file", "ca_file"},
        "tracing": _TRACING,
    },
    "worker": {
        **_STORES,
        "": {"worker_id", "http_addr"},
        "queue": {"prefix", "family", "count"},
        "consumer": {
            "pollers", "batch", "max_in_flight", "visibility_ms", "lease_ttl_ms",
            "merge_window_ms", "idle_sleep_max_ms", "drain_timeout_ms", "retry_base_ms",
            "retry_max_ms",
        },
        "handlers": {"enabled", "http_url", "http_timeout_ms", "record_file"},
        "coordinator": {
            "endpoints", "group", "capacity", "labels", "drain_timeout_ms", "record_file",
            "token_file", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_domain",
        },
        "deliveries": {
            "listen_addr", "token_file", "allow_unauthenticated", "settle_timeout_ms",
            "tls_cert_file", "tls_key_file", "tls_client_ca_file",
        },
        "tracing": _TRACING,
    },
}

# The client commands' file (ClientConfig: chime alert|config|queue|job --config), which
# the alert rules hook Job reads: the coordinators' own file is no client file.
KNOWN_KEYS["client"] = {
    **_STORES,
    "": {
        "coordinator", "admin_token", "admin_token_file", "tls_ca_file", "tls_cert_file",
        "tls_key_file", "tls_domain",
    },
    "queue": {"prefix", "family", "count"},
}

# Keys of features being added to the binary: (section, field), field None = whole section.
PENDING: dict[str, set[tuple[str, str | None]]] = {
    "coordinator": set(),
    "worker": set(),
}


def env_names(process: str) -> set[str]:
    """Every CHIME_* variable the process accepts (CHIME_CONFIG names the file)."""
    names = {"CHIME_CONFIG"}
    for section, fields in KNOWN_KEYS[process].items():
        for f in fields:
            names.add("CHIME_" + (f"{section}_{f}" if section else f).upper())
    return names


def need_modules() -> None:
    """Imports the two PyPI packages or exits with how to install them."""
    try:
        import helm_python  # noqa: F401
        import kubernetes_validate  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        sys.exit(
            f"{e}: run scripts/helm/run.sh, or pip install helm-python-sdk kubernetes-validate"
        )


def load_values_file(path: Path) -> dict[str, Any]:
    import helm_python as helm

    return helm.values_from_yaml(path.read_text())


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`b` over `a`, maps merged key by key (as Helm merges -f files)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(values: dict[str, Any], *, name: str = "chime", namespace: str = "chime") -> dict[str, str]:
    """Renders the chart as `helm install` would (schema checked); template path -> text."""
    import helm_python as helm

    with helm.Chart.load(os.fspath(CHART)) as chart:
        return chart.render(values, name=name, namespace=namespace, is_install=True)


def objects(rendered: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(template path, object) for every non-empty YAML document rendered."""
    import yaml

    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                yield path, doc


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") == "Pod":
        return obj["spec"]
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a pod spec: init containers (native sidecars among them) first."""
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def is_sidecar(ctr: dict[str, Any]) -> bool:
    """A Kubernetes native sidecar: an init container that keeps running."""
    return ctr.get("restartPolicy") == "Always"


def chime_process(ctr: dict[str, Any]) -> str | None:
    """"worker" or "coordinator" for a container running the chime image's binary."""
    cmd = list(ctr.get("command", [])) + list(ctr.get("args", []))
    if len(cmd) >= 2 and cmd[0] == IMAGE_BINARY and cmd[1] in ("worker", "coordinator"):
        return cmd[1]
    return None


def config_arg(ctr: dict[str, Any]) -> str | None:
    """The path after --config in a container's command line."""
    cmd = list(ctr.get("command", [])) + list(ctr.get("args", []))
    for i, a in enumerate(cmd[:-1]):
        if a == "--config":
            return cmd[i + 1]
    return None


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj.get("kind") == "Pod":
        return obj["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def find(objs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    out = []
    for o in objs:
        if o.get("kind") != kind:
            continue
        labels = o["metadata"].get("labels", {})
        if component is None or labels.get("app.kubernetes.io/component") == component:
            out.append(o)
    return out


class Report:
    """Counts checks and keeps the failures and notes of a check script."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.checks = 0

    def check(self, ok: bool, what: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(what)
            print(f"  FAIL {what}")
        return ok

    def note(self, what: str) -> None:
        if what not in self.notes:
            self.notes.append(what)
