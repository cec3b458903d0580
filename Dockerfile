# syntax=docker/dockerfile:1
#
# The chime image: one binary for every role (coordinator, worker, admin CLI).
#
# The binary is built by cargo on the host and copied in (the pattern goreleaser and ko
# use), so the image CI checks is the image users build, with one command:
#
#   scripts/image/build                 # cargo build --release, then this Dockerfile
#
# which stages target/<profile>/chime at dist/linux-<arch>/chime and runs
#   podman build (or docker build) --build-arg VERSION=… --build-arg REVISION=… .
# The build context is only dist/ (.dockerignore). Multi-arch: build the binary for each
# target (cargo build --release --target aarch64-unknown-linux-gnu, staged at
# dist/linux-arm64/chime) and run `docker buildx build --platform linux/amd64,linux/arm64`
# (or `podman build --platform … --manifest …`); TARGETARCH picks each one's binary.
# The binary links glibc dynamically: build it on Debian 12 (bookworm) or older.
#
# Runtime base: debian-slim rather than distroless, on purpose: the Helm chart's test
# hook and the worker's preStop hook run /bin/sh and /bin/sleep from this same image,
# and `kubectl exec ... chime workers` works for debugging. The image runs as the
# non-root user 10001 and writes nothing to its root filesystem, so the chart mounts it
# read-only and drops every capability.

ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUNTIME_IMAGE}
# Set by the builder for the platform being built (amd64, arm64).
ARG TARGETARCH
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# ca-certificates: rediss:// and https:// endpoints verify against the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && groupadd --system --gid 10001 chime \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin chime
COPY --chmod=0755 dist/linux-${TARGETARCH}/chime /usr/local/bin/chime
USER 10001:10001
# gRPC (coordinator), HTTP (coordinator console and probes), HTTP (worker probes and metrics).
EXPOSE 7070 8080 9090
ENTRYPOINT ["/usr/local/bin/chime"]
CMD ["--help"]
LABEL org.opencontainers.image.title="chime" \
      org.opencontainers.image.description="Distributed job scheduler: sharded cron jobs and precise delayed items" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
