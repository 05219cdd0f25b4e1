#!/usr/bin/env bash
# Makes the certificates of berth's peer links (cluster.tls) with openssl:
# a cluster CA and a node certificate signed by it, both ECDSA P-256, the
# node certificate naming the cluster's peer server name (cluster.tls.server_name,
# default berth-peer) for server and client authentication.
#   docker/peer-tls.sh DIR [NODE...]
# writes DIR/ca.pem and DIR/ca-key.pem (once: an existing CA is reused), and
# for each NODE (default: "node") DIR/NODE.pem and DIR/NODE-key.pem.
# Keep ca-key.pem off the nodes: only ca.pem, NODE.pem and NODE-key.pem go to
# node NODE. The reference deployment (docker/up.sh) gives one node
# certificate to every replica; issue one per node where nodes are named.
set -euo pipefail
dir="${1:?usage: docker/peer-tls.sh DIR [NODE...]}"
shift
name="${BERTH_PEER_SERVER_NAME:-berth-peer}"
days="${BERTH_PEER_CERT_DAYS:-825}"
mkdir -p "$dir"
umask 077
if [ ! -s "$dir/ca.pem" ] || [ ! -s "$dir/ca-key.pem" ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca-key.pem"
  openssl req -x509 -new -key "$dir/ca-key.pem" -sha256 -days 3650 \
    -subj "/CN=berth cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca.pem" 2>/dev/null
  echo "peer-tls.sh: made the cluster CA $dir/ca.pem"
fi
[ $# -eq 0 ] && set -- node
for node in "$@"; do
  key="$dir/$node-key.pem"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$key"
  ext="$(mktemp)"
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:%s\n' "$name" > "$ext"
  openssl req -new -key "$key" -subj "/CN=$node" 2>/dev/null \
    | openssl x509 -req -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
        -days "$days" -sha256 -extfile "$ext" -out "$dir/$node.pem" 2>/dev/null
  rm -f "$ext"
  echo "peer-tls.sh: issued $dir/$node.pem (DNS:$name) for $node"
done
