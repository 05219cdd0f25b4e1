#!/bin/sh
# Starts nginx for berth: TLS material from a file (TLS_CERT_FILE/TLS_KEY_FILE,
# default /etc/berth-tls/{cert,key}.pem), or base64 env (TLS_CERT_BASE64,
# TLS_KEY_BASE64), or a self-signed pair made here; then follows the passing
# berth members in Consul's registry and reloads nginx when they change.
#   HTTPS_PUBLIC_PORT (default 443): the port plain HTTP is redirected to.
#   CONSUL_HTTP_ADDRS (default "consul1:8500 consul2:8500 consul3:8500"): the
#     Consul agents asked, in turn; any agent of the cluster answers the same.
#   BERTH_SERVICE (default berth): berth's `cluster.service` name.
# Each member's node id, address and public port are what berth registers
# (Service.ID, Service.Address, Service.Meta.public), so this works on any
# orchestrator whose containers reach Consul, not only Docker's DNS.
set -eu
# PID 1 ignores signals it has no handler for: stop at once until nginx runs.
trap 'exit 0' TERM INT
mkdir -p /tmp/tls
if [ -n "${TLS_CERT_BASE64:-}" ] && [ -n "${TLS_KEY_BASE64:-}" ]; then
  echo "$TLS_CERT_BASE64" | base64 -d > /tmp/tls/cert.pem
  echo "$TLS_KEY_BASE64" | base64 -d > /tmp/tls/key.pem
elif [ -f "${TLS_CERT_FILE:-/etc/berth-tls/cert.pem}" ]; then
  cp "${TLS_CERT_FILE:-/etc/berth-tls/cert.pem}" /tmp/tls/cert.pem
  cp "${TLS_KEY_FILE:-/etc/berth-tls/key.pem}" /tmp/tls/key.pem
else
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=${TLS_CN:-localhost}" \
    -keyout /tmp/tls/key.pem -out /tmp/tls/cert.pem 2>/dev/null
fi

consuls="${CONSUL_HTTP_ADDRS:-consul1:8500 consul2:8500 consul3:8500}"
service="${BERTH_SERVICE:-berth}"
log() { echo "berth-edge: $*" >&2; }

# One blocking query (Consul's health API, passing instances only) to the
# agents in turn, starting with the last one that answered. Waits up to 10 s
# for a change after index $index; writes the answer to /tmp/consul.json and
# sets $index to its X-Consul-Index. Returns 1 when no agent answered.
# curl runs in the background so that TERM is handled at once (`wait` is
# interruptible by traps; a foreground command is not).
current=""
query() {
  for agent in $current $consuls; do
    curl -fsS --max-time 15 -D /tmp/consul.headers -o /tmp/consul.json \
      "http://$agent/v1/health/service/$service?passing=1&index=$index&wait=10s" 2>/tmp/consul.err &
    if wait $!; then
      new=$(tr -d '\r' < /tmp/consul.headers | sed -n 's/^[Xx]-[Cc]onsul-[Ii]ndex: *\([0-9]*\)$/\1/p')
      # An index that went backwards (an agent's state was reset) or is
      # missing starts over (Consul's documentation on blocking queries).
      # An index below 1 would never block.
      case "$new" in ''|*[!0-9]*) new=1;; esac
      [ "$new" -ge 1 ] || new=1
      if [ "$new" -lt "$index" ]; then index=0; else index=$new; fi
      [ "$agent" = "$current" ] || log "consul: following $agent"
      current=$agent
      return 0
    fi
    log "consul: $agent did not answer ($(head -c 200 /tmp/consul.err))"
  done
  return 1
}

# The passing members in /tmp/consul.json, one line each, sorted:
# "IP:PORT NODE_ID". The address is resolved here (a container's host name),
# since nginx resolves names only when it loads its configuration.
members() {
  jq -r '.[] | .Service | [.Address, ((.Meta.public // "") | sub("^.*:"; "")), .ID] | @tsv' \
    /tmp/consul.json |
  while IFS="$(printf '\t')" read -r host port id; do
    case "$port" in ''|*[!0-9]*) log "member $id registered no public port: skipped"; continue;; esac
    ip=$(getent ahostsv4 "$host" | awk 'NR == 1 {print $1}')
    if [ -z "$ip" ]; then log "member $id: $host does not resolve: skipped"; continue; fi
    echo "$ip:$port $id"
  done | sort -u
}

# The routing config for those members (stdin): the pool "berth" hashes on
# the session id; "berth_node_N" sends a resume that names its owner
# (?session=ID&node=NODE_ID, protocol.md) straight to that node, with the
# others as backups when it is gone; the map picks the pool. Fails when
# there is no member: the last good config is kept then.
routing() {
  awk '
    NF >= 2 { n++; addr[n] = $1; id[n] = $2 }
    END {
      if (n == 0) exit 1
      print "upstream berth {"
      print "    zone berth 64k;"
      print "    hash $arg_session consistent;"
      for (i = 1; i <= n; i++) printf "    server %s max_fails=1 fail_timeout=2s;\n", addr[i]
      print "    keepalive 32;"
      print "}"
      for (i = 1; i <= n; i++) {
        printf "upstream berth_node_%d {\n    zone berth_node_%d 64k;\n    server %s max_fails=1 fail_timeout=2s;\n", i, i, addr[i]
        for (j = 1; j <= n; j++) if (j != i) printf "    server %s backup;\n", addr[j]
        print "}"
      }
      print "map $arg_node $berth_pool {"
      print "    default berth;"
      for (i = 1; i <= n; i++) printf "    \"%s\" berth_node_%d;\n", id[i], i
      print "}"
    }'
}

# Backoff while no agent answers or no member passes: 0.5 s doubling to 5 s.
pause=0
backoff() {
  case $pause in 0) pause=0.5;; 0.5) pause=1;; 1) pause=2;; *) pause=5;; esac
  sleep $pause & wait $!
}

# Until the first good config exists, nginx is not started.
index=0
until query && members > /tmp/members && routing < /tmp/members > /tmp/berth-routing.conf; do
  backoff
done
pause=0
log "upstreams: $(awk '{printf "%s ", $2}' /tmp/members)"

# Plain HTTP redirects to the port clients reach HTTPS on (published ports
# may differ from 443).
port="${HTTPS_PUBLIC_PORT:-443}"
case "$port" in ''|*[!0-9]*) echo "HTTPS_PUBLIC_PORT must be a port number, not '$port'" >&2; exit 2;; esac
suffix=""; [ "$port" = 443 ] || suffix=":$port"
sed "s/__HTTPS_PORT_SUFFIX__/$suffix/" /etc/berth-nginx/nginx.conf.template > /tmp/nginx.conf
nginx -c /tmp/nginx.conf -g 'daemon off;' &
pid=$!
trap 'kill -QUIT $pid; wait $pid; exit 0' TERM INT

while kill -0 $pid 2>/dev/null; do
  if ! query; then backoff; continue; fi
  if ! members > /tmp/members.new || ! routing < /tmp/members.new > /tmp/berth-routing.new; then
    log "consul lists no passing member: the last upstreams are kept"
    backoff
    continue
  fi
  pause=0
  cmp -s /tmp/berth-routing.new /tmp/berth-routing.conf && continue
  # The new config is tested before nginx loads it; a config nginx refuses
  # leaves the last good one in place.
  cp /tmp/berth-routing.conf /tmp/berth-routing.good
  mv /tmp/berth-routing.new /tmp/berth-routing.conf
  if nginx -c /tmp/nginx.conf -t 2>/tmp/nginx-test.err; then
    mv /tmp/members.new /tmp/members
    nginx -c /tmp/nginx.conf -s reload
    log "upstreams: $(awk '{printf "%s ", $2}' /tmp/members)"
  else
    log "nginx refused the new upstreams, the last good ones are kept: $(cat /tmp/nginx-test.err)"
    mv /tmp/berth-routing.good /tmp/berth-routing.conf
    backoff
  fi
done
