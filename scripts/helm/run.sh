#!/usr/bin/env bash
# Checks the Helm chart helm/chime:
#   1. scripts/helm/check.py: helm lint --strict, render with Helm's own engine for the
#      default values and helm/chime/ci/*-values.yaml, validate every object against the
#      Kubernetes API schemas, and the chart's own rules;
#   2. scripts/helm/observability.sh: the alert rules (promtool check rules, promtool
#      test rules) and the Grafana dashboard the chart ships, and the metric names they
#      use against shared/src/telemetry.rs (promtool from Debian's prometheus package,
#      extracted into target/promtool, nothing installed);
#   3. scripts/helm/smoke.py: the rendered coordinator and worker, and the app pod of
#      helm/chime/ci/sidecar-app-values.yaml (its chime worker sidecar and the Python
#      SDK's coupon reminder), run as local processes against a redis-server and an etcd
#      started here on free ports; the helm test's script runs a job to success, and
#      items reach apps through the workers' pool and through the app's sidecar; the
#      alert rules hook Job of helm/chime/ci/alerts-values.yaml applies its rules to
#      that etcd (twice: applied, then unchanged), and the configuration hook Job of
#      helm/chime/ci/apply-values.yaml its jobs, workflow, setting and alert rule
#      (applied, unchanged, pruned one by one; refusals fail at once).
#
#   scripts/helm/run.sh [path/to/chime]        (default: target/debug/chime)
#
# Needs python3 (3.11+, for tomllib), redis-server and etcd; installs python3/pip from
# apt when missing (as root, or through sudo). The two PyPI packages, pinned below, go
# to target/helm-pydeps (pip --target: works with Debian's externally managed Python);
# the Python SDK comes from target/sdk-python-venv, else target/helm-sdk-venv is made.
set -euo pipefail
cd "$(dirname "$0")/../.."

chime=${1:-target/debug/chime}
py=${PYTHON:-python3}
pkgs=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)
deps=${CHIME_HELM_PYDEPS:-$PWD/target/helm-pydeps}

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "run.sh: installing $* from apt" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v "$py" >/dev/null 2>&1 || apt_install python3 python3-pip
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "run.sh: $py is older than 3.11" >&2; exit 1; }
"$py" -m pip --version >/dev/null 2>&1 || apt_install python3-pip

stamp="$deps/.installed"
want="$("$py" -c 'import sys; print(sys.version.split()[0])') ${pkgs[*]}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$deps"
  "$py" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --root-user-action=ignore --target "$deps" "${pkgs[@]}"
  echo "$want" > "$stamp"
fi
export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

echo "=== helm chart: lint, render, Kubernetes schemas (check.py)"
"$py" scripts/helm/check.py

echo "=== helm chart: alert rules and Grafana dashboard (observability.sh)"
PYTHON="$py" scripts/helm/observability.sh

echo "=== helm chart: rendered coordinator, worker and app pod against real Redis and etcd (smoke.py)"
[ -x "$chime" ] || { echo "run.sh: no chime binary at $chime (cargo build -p chime)" >&2; exit 1; }

# The Python SDK (sdk/python) runs the example app of ci/sidecar-app-values.yaml and a
# subscriber of the workers' pool: target/sdk-python-venv when it has the SDK (the
# SDK's own CI makes it), else a venv made here with `pip install -e sdk/python`.
sdk_py=target/sdk-python-venv/bin/python
if ! env -u PYTHONPATH "$sdk_py" -c 'import chime_sdk' >/dev/null 2>&1; then
  venv=${CHIME_HELM_SDK_VENV:-$PWD/target/helm-sdk-venv}
  sdk_py=$venv/bin/python
  want="$("$py" -c 'import sys; print(sys.version.split()[0])') $(sha256sum sdk/python/pyproject.toml | cut -d' ' -f1)"
  if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$want" ] || ! env -u PYTHONPATH "$sdk_py" -c 'import chime_sdk' >/dev/null 2>&1; then
    rm -rf "$venv"
    "$py" -m venv "$venv" 2>/dev/null || { apt_install python3-venv; "$py" -m venv "$venv"; }
    env -u PYTHONPATH "$venv/bin/pip" install --quiet --disable-pip-version-check -e sdk/python
    echo "$want" > "$venv/.installed"
  fi
fi
etcd_bin=$(command -v etcd || echo /usr/bin/etcd)
command -v redis-server >/dev/null 2>&1 || { echo "run.sh: redis-server is not installed" >&2; exit 1; }
[ -x "$etcd_bin" ] || { echo "run.sh: etcd is not installed" >&2; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/chime-helm-run.XXXXXX")
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
etcd_port=$(free_port)
peer_port=$(free_port)

# Both stores require credentials, so the chart's password wiring (Secret ->
# secretKeyRef -> CHIME_REDIS_URL / CHIME_ETCD_PASSWORD) is exercised too.
redis_password="smoke-$RANDOM$RANDOM"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
  --requirepass "$redis_password" >"$tmp/redis.log" 2>&1 &
pids+=($!)
"$etcd_bin" --name smoke --data-dir "$tmp/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "smoke=http://127.0.0.1:$peer_port" >"$tmp/etcd.log" 2>&1 &
pids+=($!)

# etcd authentication (needs etcdctl): a user "chime" that may touch only the
# smoke test's prefixes (smoke.py uses /chime-smoke-<random>/).
etcd_auth=()
if command -v etcdctl >/dev/null 2>&1; then
  etcd_password="smoke-$RANDOM$RANDOM"
  ctl() { ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$etcd_port" "$@" >>"$tmp/etcdctl.log" 2>&1; }
  for _ in $(seq 1 50); do ctl endpoint health && break; sleep 0.2; done
  ctl user add "root:root-$etcd_password"
  ctl user grant-role root root
  ctl user add "chime:$etcd_password"
  ctl role add chime
  ctl role grant-permission chime --prefix=true readwrite /chime-smoke-
  ctl user grant-role chime chime
  ctl auth enable
  etcd_auth=(--etcd-user chime --etcd-password "$etcd_password")
else
  echo "run.sh: no etcdctl: etcd runs without authentication" >&2
fi

if ! "$py" scripts/helm/smoke.py --chime "$chime" \
    --python "$sdk_py" -f helm/chime/ci/sidecar-app-values.yaml -f helm/chime/ci/alerts-values.yaml \
    --apply-values helm/chime/ci/apply-values.yaml \
    --redis-url "redis://127.0.0.1:$redis_port" --redis-password "$redis_password" \
    --etcd-endpoints "http://127.0.0.1:$etcd_port" "${etcd_auth[@]}"; then
  echo "--- redis-server log"; tail -n 20 "$tmp/redis.log" || true
  echo "--- etcd log"; tail -n 20 "$tmp/etcd.log" || true
  echo "--- etcdctl log"; tail -n 20 "$tmp/etcdctl.log" 2>/dev/null || true
  exit 1
fi
echo "=== helm chart: all checks passed"
