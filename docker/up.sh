#!/usr/bin/env bash
# Brings the reference deployment up: builds the local images if missing,
# starts the compose project, waits until it serves, prints the URLs.
#   docker/up.sh [--scale N]     (N berth nodes, default 3)
#   MONITORING=1 docker/up.sh    (also Prometheus, on 127.0.0.1:${PROMETHEUS_PORT:-9099})
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
project="${COMPOSE_PROJECT:-berth}"
scale=3; [ "${1:-}" = "--scale" ] && scale="${2:?N}"
if ! docker image inspect "${BERTH_IMAGE:-berth:local}" >/dev/null 2>&1 || ! docker image inspect "${BASE_IMAGE:-berth-base:local}" >/dev/null 2>&1; then
  "$here/build-images.sh"
fi
# Peer links over TLS by default: a cluster CA and a node certificate made
# once into docker/.peer-tls/ (git-ignored), handed to the nodes as base64.
# Set PEER_TLS_CA_BASE64, PEER_TLS_CERT_BASE64 and PEER_TLS_KEY_BASE64 to use
# your own; PEER_TLS=off leaves the links plain.
if [ "${PEER_TLS:-on}" != off ] && [ -z "${PEER_TLS_CA_BASE64:-}" ]; then
  tls="$here/.peer-tls"
  [ -s "$tls/node.pem" ] || "$here/peer-tls.sh" "$tls" node
  PEER_TLS_CA_BASE64="$(base64 -w0 < "$tls/ca.pem")"
  PEER_TLS_CERT_BASE64="$(base64 -w0 < "$tls/node.pem")"
  PEER_TLS_KEY_BASE64="$(base64 -w0 < "$tls/node-key.pem")"
  export PEER_TLS_CA_BASE64 PEER_TLS_CERT_BASE64 PEER_TLS_KEY_BASE64
fi
# MONITORING=1 also starts Prometheus (the compose profile "monitoring").
profile=(); [ "${MONITORING:-0}" = 1 ] && profile=(--profile monitoring)
docker-compose -p "$project" -f "$here/compose.yml" "${profile[@]}" up -d --scale berth="$scale"
https="${NGINX1_HTTPS:-8443}"
echo "up.sh: waiting for berth behind nginx (https://127.0.0.1:$https/)"
for _ in $(seq 1 120); do
  healthy=$(docker ps --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.service=berth" --filter health=healthy -q | wc -l)
  if [ "$healthy" -ge "$scale" ] && curl -skf -o /dev/null "https://127.0.0.1:$https/"; then
    echo "up.sh: ready: $healthy berth nodes"
    echo "  WebSocket: wss://127.0.0.1:$https/ws   (and wss://127.0.0.1:${NGINX2_HTTPS:-8444}/ws)"
    echo "  demo page: https://127.0.0.1:$https/   (self-signed certificate unless TLS_DIR or TLS_*_BASE64 is set)"
    exit 0
  fi
  sleep 1
done
echo "up.sh: not healthy after 120 s; see: docker-compose -p $project -f $here/compose.yml logs" >&2
exit 1
