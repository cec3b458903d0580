#!/usr/bin/env bash
# Runs `chime bench burst` against a throwaway local Redis Cluster of N masters
# (loopback ports from 17000, no persistence), then tears it down.
#   scripts/bench-cluster.sh <masters> [bench burst flags…]
# e.g. scripts/bench-cluster.sh 3 --items 200000 --workers 2
set -euo pipefail
cd "$(dirname "$0")/.."
masters=${1:?usage: scripts/bench-cluster.sh <masters> [bench burst flags]}
shift
chime=${CHIME:-target/release/chime}
[ -x "$chime" ] || cargo build --release -p chime
dir=$(mktemp -d /tmp/chime-bench-cluster-XXXX)
ports=()
for i in $(seq 0 $((masters - 1))); do
  p=$((17000 + i))
  mkdir -p "$dir/$p"
  redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-announce-ip 127.0.0.1 \
    --cluster-config-file nodes.conf --save '' --appendonly no --dir "$dir/$p" \
    --daemonize yes --pidfile "$dir/$p/pid" --logfile "$dir/$p/log"
  ports+=("127.0.0.1:$p")
done
trap 'for p in "${ports[@]}"; do redis-cli -p "${p##*:}" shutdown nosave >/dev/null 2>&1 || true; done; rm -rf "$dir"' EXIT
for p in "${ports[@]}"; do
  until redis-cli -p "${p##*:}" ping >/dev/null 2>&1; do sleep 0.1; done
done
if [ "$masters" -ge 3 ]; then
  redis-cli --cluster create "${ports[@]}" --cluster-yes >/dev/null
else
  # redis-cli --cluster create needs 3 masters: give every slot to each node by hand.
  for p in "${ports[@]}"; do
    n=${#ports[@]}; i=$(( ${p##*:} - 17000 ))
    lo=$(( i * 16384 / n )); hi=$(( (i + 1) * 16384 / n - 1 ))
    redis-cli -p "${p##*:}" cluster addslotsrange "$lo" "$hi" >/dev/null
  done
  for p in "${ports[@]:1}"; do redis-cli -p "${ports[0]##*:}" cluster meet 127.0.0.1 "${p##*:}" >/dev/null; done
fi
until redis-cli -p "${ports[0]##*:}" cluster info | grep -q cluster_state:ok; do sleep 0.2; done
"$chime" bench burst --redis-url "redis://${ports[0]}" "$@"
