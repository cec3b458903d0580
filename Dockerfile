# syntax=docker/dockerfile:1
#
# The chime image: one binary for every role (coordinator, worker, admin CLI).
#   docker build -t chime:0.1.0 .
#
# Runtime base: debian-slim rather than distroless, on purpose: the Helm chart's test
# hook and the worker's preStop hook run /bin/sh and /bin/sleep from this same image,
# and `kubectl exec ... chime workers` works for debugging. The image runs as the
# non-root user 10001; the chart adds a read-only root filesystem and drops every
# capability.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# No system protoc needed: .cargo/config.toml points PROTOC at tools/protoc, which runs
# the protoc vendored in the cargo registry (so tools/ and .cargo/ are in the context).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p chime \
 && install -D -m 0755 target/release/chime /out/chime

FROM ${RUNTIME_IMAGE}
# ca-certificates: rediss:// and https:// endpoints verify against the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 chime \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin chime
COPY --from=builder /out/chime /usr/local/bin/chime
USER 10001:10001
# gRPC (coordinator), HTTP (coordinator console and probes), HTTP (worker probes and metrics).
EXPOSE 7070 8080 9090
ENTRYPOINT ["/usr/local/bin/chime"]
CMD ["--help"]
LABEL org.opencontainers.image.title="chime" \
      org.opencontainers.image.description="Distributed job scheduler: sharded cron jobs and precise delayed items" \
      org.opencontainers.image.licenses="Apache-2.0"
