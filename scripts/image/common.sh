# Sourced by scripts/image/build and scripts/image/check: the container tool, and on
# machines without a Docker daemon, podman set up the way it works there (see
# ../shared/research/containers.md in the project notes): runc as the runtime (crun
# fails on cgroups v1 hybrid hosts) and finite ulimits (runc cannot raise nofile to
# podman's default 1048576 without CAP_SYS_RESOURCE).

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "image: installing $* from apt" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# CHIME_IMAGE_TOOL=docker|podman picks the tool; default: podman when installed, else
# docker when its daemon answers, else podman installed from apt. (A docker CLI with no
# daemon behind it, as on machines without a Docker engine, is not a tool.)
image_tool() {
  if [ -n "${CHIME_IMAGE_TOOL:-}" ]; then echo "$CHIME_IMAGE_TOOL"; return; fi
  if command -v podman >/dev/null 2>&1; then echo podman; return; fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
  apt_install podman runc catatonit uidmap fuse-overlayfs netavark aardvark-dns iptables
  echo podman
}

# Podman's settings for this repository's scripts, unless the caller has its own.
podman_env() {
  command -v runc >/dev/null 2>&1 || apt_install runc
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    mkdir -p target/image
    cat > target/image/containers.conf <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
    export CONTAINERS_CONF=$PWD/target/image/containers.conf
  fi
}

# The workspace version (Cargo.toml [workspace.package] version).
workspace_version() {
  sed -n '/^\[workspace.package\]/,/^\[/{s/^version *= *"\(.*\)"/\1/p}' Cargo.toml
}
