#!/bin/sh
# Regenerates the committed gRPC/protobuf stubs (src/gen/) from proto/chime/v1
# with ts-proto. Needs protoc (Debian: protobuf-compiler) and `npm ci`.
# Usage: scripts/gen.sh [OUT_DIR]   (default: src/gen)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/src/gen}
proto=$here/../../proto
mkdir -p "$out"
protoc \
  --plugin=protoc-gen-ts_proto="$here/node_modules/.bin/protoc-gen-ts_proto" \
  --ts_proto_out="$out" \
  --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,importSuffix=.js,forceLong=number,useOptionals=none,oneof=unions-value,outputTypeRegistry=false,useDate=false \
  -I "$proto" \
  "$proto/chime/v1/worker.proto" "$proto/chime/v1/delivery.proto" "$proto/chime/v1/queue.proto"
