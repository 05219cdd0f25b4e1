#!/bin/sh
# Starts nginx for berth: TLS material from a file (TLS_CERT_FILE/TLS_KEY_FILE,
# default /etc/berth-tls/{cert,key}.pem), or base64 env (TLS_CERT_BASE64,
# TLS_KEY_BASE64), or a self-signed pair made here; then follows the berth
# service in DNS (and each node's id, from its admin port) and reloads nginx
# when its containers change.
# HTTPS_PUBLIC_PORT (default 443): the port plain HTTP is redirected to.
set -eu
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
# The berth containers, one line each: "IP NODE_ID" (the node id from the
# admin port, which the compose network reaches and nothing outside does;
# empty while the node starts).
nodes() {
  for ip in $(getent ahostsv4 "${BERTH_SERVICE:-berth}" | awk '{print $1}' | sort -u); do
    id=$(curl -fsS --max-time 1 "http://$ip:${BERTH_ADMIN_PORT:-9090}/health/live" 2>/dev/null \
      | sed -n 's/.*"node":"\([A-Za-z0-9._:~-]*\)".*/\1/p')
    echo "$ip $id"
  done
}
# The routing config for those nodes (stdin): the pool "berth" hashes on the
# session id; "berth_node_N" sends a resume that names its owner
# (?session=ID&node=NODE_ID, protocol.md) straight to that node, with the
# others as backups when it is gone; the map picks the pool.
routing() {
  awk -v port="${BERTH_PORT:-8080}" '
    NF >= 1 { n++; ip[n] = $1; id[n] = $2 }
    END {
      if (n == 0) exit 1
      print "upstream berth {"
      print "    zone berth 64k;"
      print "    hash $arg_session consistent;"
      for (i = 1; i <= n; i++) printf "    server %s:%s max_fails=1 fail_timeout=2s;\n", ip[i], port
      print "    keepalive 32;"
      print "}"
      for (i = 1; i <= n; i++) {
        printf "upstream berth_node_%d {\n    zone berth_node_%d 64k;\n    server %s:%s max_fails=1 fail_timeout=2s;\n", i, i, ip[i], port
        for (j = 1; j <= n; j++) if (j != i) printf "    server %s:%s backup;\n", ip[j], port
        print "}"
      }
      print "map $arg_node $berth_pool {"
      print "    default berth;"
      for (i = 1; i <= n; i++) if (id[i] != "") printf "    \"%s\" berth_node_%d;\n", id[i], i
      print "}"
    }'
}
until conf="$(nodes | routing)"; do sleep 1; done
echo "$conf" > /tmp/berth-routing.conf
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
  sleep 3
  if conf="$(nodes | routing)" && [ "$conf" != "$(cat /tmp/berth-routing.conf)" ]; then
    echo "$conf" > /tmp/berth-routing.conf
    nginx -c /tmp/nginx.conf -s reload
  fi
done
