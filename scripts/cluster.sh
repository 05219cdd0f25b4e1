#!/usr/bin/env bash
# A local berth cluster on loopback: Redis, a Consul dev agent and N berth nodes.
#
#   scripts/cluster.sh up [N]     start (default N=3), print the endpoints
#   scripts/cluster.sh status     show members as each node sees them
#   scripts/cluster.sh kill I     SIGKILL node I (1-based), to watch failover
#   scripts/cluster.sh start I    start node I again (or a new node I > N)
#   scripts/cluster.sh down       stop everything it started
#
# BERTH_BIN=path runs another node binary (an application built on the berth
# library, docs/applications.md) instead of target/release/berth.
# Node I listens on 127.0.0.1:808I (public), 127.0.0.1:909I (admin) and
# 127.0.0.1:707I (peer). Logs and pids live in .cluster/ (git-ignored).
# Needs scripts/install-deps.sh to have run (redis-server, .tools/bin/consul).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/.cluster"
consul="$root/.tools/bin/consul"
berth="${BERTH_BIN:-$root/target/release/berth}"
redis_port=6399
consul_port=8599
secret="local-cluster-secret-change-me"

need() {
  command -v redis-server >/dev/null || { echo "redis-server missing: run scripts/install-deps.sh" >&2; exit 1; }
  [ -x "$consul" ] || { echo "consul missing: run scripts/install-deps.sh" >&2; exit 1; }
  [ -x "$berth" ] || (cd "$root" && cargo build --release --bin berth)
}

start_bg() { # name, command...
  local name=$1; shift
  "$@" >"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
}

alive() { [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }

start_node() {
  local i=$1
  alive "node$i" && { echo "node$i already running"; return; }
  start_bg "node$i" env \
    BERTH__SERVER__LISTEN="127.0.0.1:808$i" \
    BERTH__ADMIN__LISTEN="127.0.0.1:909$i" \
    BERTH__CLUSTER__PEER_LISTEN="127.0.0.1:707$i" \
    BERTH__CLUSTER__ADVERTISE="127.0.0.1:707$i" \
    BERTH__CLUSTER__NODE_ID="node$i" \
    BERTH__CLUSTER__CONSUL_ADDR="http://127.0.0.1:$consul_port" \
    BERTH__CLUSTER__SECRET="$secret" \
    BERTH__STORE__REDIS_URL="redis://127.0.0.1:$redis_port" \
    "$berth"
  echo "node$i: ws://127.0.0.1:808$i/ws  demo http://127.0.0.1:808$i/  admin http://127.0.0.1:909$i/cluster"
}

case "${1:-}" in
  up)
    n=${2:-3}
    [ "$n" -ge 1 ] && [ "$n" -le 9 ] || { echo "N must be 1..9" >&2; exit 2; }
    need
    mkdir -p "$state"
    alive redis || start_bg redis redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always --dir "$state"
    alive consul || start_bg consul "$consul" agent -dev -bind 127.0.0.1 -client 127.0.0.1 \
      -http-port "$consul_port" -dns-port -1 -grpc-port -1 -serf-lan-port 8391 -serf-wan-port 8392 -server-port 8390
    for _ in $(seq 1 50); do
      redis-cli -p "$redis_port" ping >/dev/null 2>&1 && curl -sf "http://127.0.0.1:$consul_port/v1/status/leader" | grep -q 127 && break
      sleep 0.2
    done
    redis-cli -p "$redis_port" ping >/dev/null || { echo "redis did not start: see $state/redis.log" >&2; exit 1; }
    for i in $(seq 1 "$n"); do start_node "$i"; done
    sleep 2
    "$0" status
    ;;
  start) need; mkdir -p "$state"; start_node "${2:?node number}" ;;
  kill)
    i=${2:?node number}
    kill -9 "$(cat "$state/node$i.pid")" && echo "node$i killed (SIGKILL); its sessions fail over within about a second"
    ;;
  status)
    for f in "$state"/node*.pid; do
      [ -e "$f" ] || continue
      i=$(basename "$f" .pid); i=${i#node}
      if alive "node$i"; then
        printf 'node%s: ' "$i"
        curl -s "http://127.0.0.1:909$i/cluster" | tr -d '\n' | grep -o '"members":\[[^]]*\]' | grep -o '"id":"[^"]*"' | tr '\n' ' '
        echo
      else
        echo "node$i: down"
      fi
    done
    ;;
  down)
    pids=()
    for f in "$state"/*.pid; do
      [ -e "$f" ] || continue
      pid=$(cat "$f"); rm -f "$f"
      kill "$pid" 2>/dev/null && pids+=("$pid") || true
    done
    # Wait (up to 15 s) so the ports are free for the next `up`.
    for _ in $(seq 1 150); do
      left=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
      [ "$left" -eq 0 ] && break; sleep 0.1
    done
    echo "stopped"
    ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
