#!/usr/bin/env bash
# Builds the images of the reference deployment locally, with no registry:
#   berth-base:local   Debian 12 minbase (debootstrap) + redis-server,
#                      redis-sentinel, nginx, openssl, curl, jq, and Consul 1.8.7
#                      (the binary scripts/install-deps.sh unpacked into .tools/)
#   berth:local        berth-base + the berth and berth-loadtest binaries built
#                      on the host (docker/Dockerfile, target "local")
#   berth-prometheus:local  berth-base + Debian's prometheus from the host
#                      (target "prometheus"; the compose profile "monitoring")
# Every package is installed into the root file system before `docker import`,
# so no build step needs network from inside a container.
# Usage: docker/build-images.sh [--rebuild-base]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rebuild=0; [ "${1:-}" = "--rebuild-base" ] && rebuild=1

scripts/install-deps.sh >/dev/null
command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }

# The base image is labelled with its recipe (the package list and Consul's
# version): a base made by an older recipe (e.g. before jq joined it, which
# the edges need) is rebuilt, not reused.
packages=redis-server,redis-sentinel,nginx-light,openssl,curl,jq,ca-certificates,procps,iproute2
recipe="bookworm minbase; $packages; $("$root/.tools/bin/consul" version | head -n1)"
have="$(docker image inspect -f '{{index .Config.Labels "berth.base.recipe"}}' berth-base:local 2>/dev/null || true)"
if [ "$have" != "$recipe" ]; then
  [ -z "$have" ] || echo "build-images: berth-base:local was made by another recipe ($have): rebuilding"
  rebuild=1
fi

if [ "$rebuild" = 1 ]; then
  mirror="$(grep -hoE '^(URIs:|deb)[[:space:]]+[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
  rootfs="$root/.tools/rootfs"
  rm -rf "$rootfs"; mkdir -p "$rootfs"
  echo "build-images: debootstrap bookworm (minbase) into $rootfs"
  debootstrap --variant=minbase \
    --include="$packages" \
    bookworm "$rootfs" "$mirror" >/dev/null
  install -m 0755 "$root/.tools/bin/consul" "$rootfs/usr/local/bin/consul"
  chroot "$rootfs" sh -c 'useradd --system --home /var/lib/berth --create-home --shell /usr/sbin/nologin berth; apt-get clean; rm -rf /var/lib/apt/lists/*'
  echo "build-images: importing berth-base:local"
  tar -C "$rootfs" -c . | docker import -c "LABEL berth.base.recipe=\"$recipe\"" - berth-base:local >/dev/null
  rm -rf "$rootfs"
fi

echo "build-images: building berth and berth-loadtest (release) on the host"
cargo build --release -p berth -p berth-loadtest
ctx="$(mktemp -d)"; trap 'rm -rf "$ctx"' EXIT
cp target/release/berth target/release/berth-loadtest docker/Dockerfile "$ctx/"
old="$(docker image inspect -f '{{.Id}}' berth:local 2>/dev/null || true)"
docker build -q --target local -t berth:local "$ctx" >/dev/null
# The previous berth:local would stay behind untagged: remove it (unless a
# container still uses it).
if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' berth:local)" ]; then
  docker rmi "$old" >/dev/null 2>&1 || true
fi
# Prometheus for the compose profile "monitoring": Debian's server (installed
# on the host by scripts/install-deps.sh, for promtool) on the same base.
# Same context as berth:local: Docker's legacy builder (docker.io 20.10
# without buildx) builds every stage before the target, "local" included,
# which needs the berth binaries.
cp /usr/bin/prometheus "$ctx/"
docker build -q --target prometheus -t berth-prometheus:local "$ctx" >/dev/null
echo "build-images: berth-base:local, berth:local and berth-prometheus:local are ready"
