#!/usr/bin/env bash
# The Python SDK's checks: a fresh venv with the package and its dev extras, the
# generated-stub drift check, mypy --strict, and pytest (unit tests against
# in-process fakes, and integration tests that start redis-server, etcd and chime;
# they need those binaries: `chime` from $CHIME_BIN or the workspace's
# target/{release,debug}/chime).
#
#   sdk/python/scripts/ci.sh              # everything
#   sdk/python/scripts/ci.sh -k 'not integration'   # extra args go to pytest
set -euo pipefail

sdk="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
venv="${CHIME_PY_VENV:-$sdk/.venv}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$sdk[dev]"

cd "$sdk"
echo "--- proto stubs drift check"
"$venv/bin/python" scripts/check_proto_drift.py
echo "--- mypy --strict"
"$venv/bin/python" -m mypy
echo "--- pytest"
# A bound on the whole run: a test that leaves a gRPC server or thread behind can keep
# the interpreter from exiting after the last test, and CI must fail then, not hang.
timeout --kill-after=30 "${CHIME_PYTEST_TIMEOUT_S:-1200}" "$venv/bin/python" -m pytest -q "$@"
