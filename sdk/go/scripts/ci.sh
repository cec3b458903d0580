#!/usr/bin/env bash
# CI for the Go SDK: generated-stub drift check, gofmt, go vet, unit tests.
# Offline: GOPATH mode against Debian's golang-*-dev packages (see ../apt-packages),
# with the environment conformance/agent sets up (outputs under target/sdk-go).
set -euo pipefail
SDK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(cd "$SDK/../.." && pwd)"
MOD=github.com/chime-scheduler/chime/sdk/go

eval "$("$SDK/conformance/agent" env | sed 's/^/export /')"

echo "== drift check: chimev1 against proto/chime/v1"
gen="$(mktemp -d)"
trap 'rm -rf "$gen"' EXIT
protoc -I"$ROOT/proto" --go_out="$gen" --go_opt=module="$MOD" \
  --go-grpc_out="$gen" --go-grpc_opt=module="$MOD" "$ROOT"/proto/chime/v1/*.proto
if ! diff -ru "$gen/chimev1" "$SDK/chimev1"; then
  echo "chimev1 is stale: regenerate it (see sdk/go/README.md, 'Generated code')" >&2
  exit 1
fi

echo "== gofmt"
bad="$(gofmt -l "$SDK" | grep -v '/chimev1/' || true)"
if [ -n "$bad" ]; then
  echo "not gofmt-ed: $bad" >&2
  exit 1
fi

# GOPATH mode sees the module at its import path (a symlink into the checkout).
cd "$(cut -d: -f1 <<<"$GOPATH")/src/$MOD"
PKGS=". ./chimev1 ./conformance ./examples/quickstart"

echo "== go vet"
go vet $PKGS

echo "== go test"
if command -v gcc >/dev/null; then
  CGO_ENABLED=1 go test -count=1 -race -timeout 60s .
else
  go test -count=1 -timeout 60s .
fi
echo "ci: ok"
