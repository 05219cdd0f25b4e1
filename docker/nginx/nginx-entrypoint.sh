#!/bin/sh
# Starts nginx for berth: TLS material from a file (TLS_CERT_FILE/TLS_KEY_FILE,
# default /etc/berth-tls/{cert,key}.pem), or base64 env (TLS_CERT_BASE64,
# TLS_KEY_BASE64), or a self-signed pair made here; then follows the berth
# service in DNS and reloads nginx when its containers change.
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
upstreams() {
  getent ahostsv4 "${BERTH_SERVICE:-berth}" | awk '{print $1}' | sort -u | \
    awk '{printf "server %s:8080 max_fails=1 fail_timeout=2s;\n", $1}'
}
until [ -n "$(upstreams)" ]; do sleep 1; done
upstreams > /tmp/berth-upstreams.conf
cp /etc/berth-nginx/nginx.conf.template /tmp/nginx.conf
nginx -c /tmp/nginx.conf -g 'daemon off;' &
pid=$!
trap 'kill -QUIT $pid; wait $pid; exit 0' TERM INT
while kill -0 $pid 2>/dev/null; do
  sleep 3
  new="$(upstreams)"
  if [ -n "$new" ] && [ "$new" != "$(cat /tmp/berth-upstreams.conf)" ]; then
    echo "$new" > /tmp/berth-upstreams.conf
    nginx -c /tmp/nginx.conf -s reload
  fi
done
