#!/usr/bin/env bash
# CI of the Node SDK: the generated stubs match the protos (drift check), strict type
# check of the SDK, agent, example-free tests; the dual ESM/CJS package build; the
# unit tests (node --test, offline, in-process fake servers, about a second).
# Assumes `conformance/agent build` ran (it does `npm ci`); runs `npm ci` otherwise.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
[[ -d node_modules ]] || npm ci --no-audit --no-fund --loglevel=error

echo "ci(node): proto drift check" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sh scripts/gen.sh "$tmp"
if ! diff -r "$tmp" src/gen >/dev/null; then
  diff -r "$tmp" src/gen | head -40 >&2
  echo "ci(node): src/gen is stale: run sdk/node/scripts/gen.sh and commit it" >&2
  exit 1
fi

echo "ci(node): tsc --noEmit (strict)" >&2
node_modules/.bin/tsc -p tsconfig.json --noEmit

echo "ci(node): build (ESM + CJS)" >&2
npm run --silent build

echo "ci(node): unit tests" >&2
node_modules/.bin/tsc -p tsconfig.test.json
timeout 120 node --test --test-timeout=30000 ../../target/sdk-node/test-js/test/
echo "ci(node): ok" >&2
