#!/usr/bin/env python3
"""A real OTLP/gRPC trace receiver for chime's trace test (tests/tests/trace_e2e.rs).

It serves `opentelemetry.proto.collector.trace.v1.TraceService/Export` with the
OpenTelemetry project's own generated code (PyPI `opentelemetry-proto`, which the
test installs), so what chime sends is decoded by the upstream schema, not by
chime's. Every received span becomes one JSON line in `--out`:

    {"service": ..., "trace_id": hex, "span_id": hex, "parent_span_id": hex or "",
     "name": ..., "kind": int, "start_ns": int, "end_ns": int, "flags": int,
     "status_code": int, "status_message": ..., "attributes": {k: v},
     "links": [{"trace_id": hex, "span_id": hex}], "headers": {k: v},
     "problems": [...]}

`problems` lists what breaks the OTLP rules (id lengths, end before start), so
the test can fail on it. On start it prints `{"port": N}` on stdout.
"""

import argparse
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


def value_of(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def Export(self, request, context):
        headers = {k: v for k, v in context.invocation_metadata() if not k.startswith("grpc-")}
        lines = []
        for rs in request.resource_spans:
            resource = {kv.key: value_of(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    problems = []
                    if len(s.trace_id) != 16 or s.trace_id == bytes(16):
                        problems.append("trace_id must be 16 bytes, not all zero")
                    if len(s.span_id) != 8 or s.span_id == bytes(8):
                        problems.append("span_id must be 8 bytes, not all zero")
                    if len(s.parent_span_id) not in (0, 8):
                        problems.append("parent_span_id must be empty or 8 bytes")
                    if s.end_time_unix_nano < s.start_time_unix_nano:
                        problems.append("ends before it starts")
                    lines.append(json.dumps({
                        "service": resource.get("service.name"),
                        "scope": ss.scope.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "start_ns": s.start_time_unix_nano,
                        "end_ns": s.end_time_unix_nano,
                        "flags": s.flags,
                        "status_code": s.status.code,
                        "status_message": s.status.message,
                        "attributes": {kv.key: value_of(kv.value) for kv in s.attributes},
                        "links": [{"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex()} for l in s.links],
                        "headers": headers,
                        "problems": problems,
                    }))
        with self.lock:
            for line in lines:
                self.out.write(line + "\n")
            self.out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = open(args.out, "a", encoding="utf-8")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(out), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
