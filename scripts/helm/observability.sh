#!/usr/bin/env bash
# Checks the monitoring the Helm chart ships (scripts/helm/run.sh runs this before the
# smoke test):
#   1. promtool check rules helm/chime/files/prometheus/chime-rules.yaml
#   2. promtool test rules helm/chime/ci/prometheus-rules.test.yaml (every alert fires,
#      with its exact labels and annotations, and stays silent where it must);
#   3. scripts/helm/check_observability.py: the rules' conventions and test coverage,
#      the Grafana dashboard (ids, layout, datasource variable, every expression parsed
#      by promtool) and every chime_* metric name declared in shared/src/telemetry.rs.
#
#   scripts/helm/observability.sh
#
# promtool: $PROMTOOL, else promtool on PATH, else the one of Debian 12's prometheus
# package, fetched with `apt-get download` (nothing installed, no service) and cached
# in target/promtool/. Needs python3 with PyYAML (PYTHONPATH=target/helm-pydeps, which
# run.sh sets).
set -euo pipefail
cd "$(dirname "$0")/../.."

py=${PYTHON:-python3}
cache=$PWD/target/promtool

fetch_promtool() {
  local tmp sudo="" log
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/chime-promtool.XXXXXX")
  log=$tmp/apt.log
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "observability.sh: fetching promtool (apt-get download prometheus) into $cache" >&2
  # apt-get download runs as the caller in the current directory; when the package
  # lists are missing or stale, refresh them once and try again.
  if ! (cd "$tmp" && apt-get download prometheus) >"$log" 2>&1; then
    $sudo apt-get update -qq >>"$log" 2>&1 || true
    (cd "$tmp" && apt-get download prometheus) >>"$log" 2>&1 \
      || { cat "$log" >&2; rm -rf "$tmp"; echo "observability.sh: cannot download the prometheus package" >&2; return 1; }
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p "$cache"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$cache/promtool.new"
  mv "$cache/promtool.new" "$cache/promtool"
  basename "$tmp"/prometheus_*.deb > "$cache/.package"
  rm -rf "$tmp"
}

promtool=${PROMTOOL:-}
if [ -z "$promtool" ]; then
  if command -v promtool >/dev/null 2>&1; then
    promtool=$(command -v promtool)
  else
    [ -x "$cache/promtool" ] && "$cache/promtool" --version >/dev/null 2>&1 || fetch_promtool
    promtool=$cache/promtool
  fi
fi
echo "observability.sh: $("$promtool" --version 2>&1 | head -n 1) ($promtool)"

rules=helm/chime/files/prometheus/chime-rules.yaml
tests=helm/chime/ci/prometheus-rules.test.yaml

echo "=== alert rules: promtool check rules"
"$promtool" check rules "$rules"
echo "=== alert rules: promtool test rules"
"$promtool" test rules "$tests"
echo "=== alert rules' conventions and tests, Grafana dashboard, metric names (check_observability.py)"
"$py" scripts/helm/check_observability.py --promtool "$promtool"
