#!/usr/bin/env bash
# Installs what berth's tests need on a fresh Debian 12 machine, idempotently:
#   - Debian's `redis-server` (system package; the tests start their own instances)
#   - Debian's `chromium` (the chat example's page and the dashboard are tested headless)
#   - Debian's `prometheus` (promtool checks docker/prometheus's rules and their tests)
#   - (checked, not installed) Node.js 20+, for the JavaScript client's tests
#   - schemathesis (PyPI, pinned) in a virtualenv under .tools/schemathesis, for
#     the backend API test against docs/api/openapi.json
#   - Consul 1.8.7, the last open-source line, from Debian 11's `consul` package.
#     Debian 12 has none, so the .deb is fetched with `apt-get download` through a
#     temporary sources list for the `bullseye` suite (built from this machine's own
#     Debian mirror) and its single binary is unpacked with `dpkg -x` into
#     `.tools/` (git-ignored). The system's apt configuration is left untouched.
# Usage: scripts/install-deps.sh        (run as root, or with sudo available)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
consul_bin="$tools/bin/consul"
consul_version="1.8.7"

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

apt_updated=0
apt_update_once() {
  if [ "$apt_updated" -eq 0 ]; then
    "${sudo_cmd[@]}" apt-get update -qq
    apt_updated=1
  fi
}

# Installs Debian packages whose postinst would start a system service:
# there may be no init system here, and the tests never use those instances,
# so service starts are refused (policy-rc.d exit 101) while they install.
apt_install_no_service() {
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod +x "$policy"
    created_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "$@"
  if [ "$created_policy" -eq 1 ]; then "${sudo_cmd[@]}" rm -f "$policy"; fi
}

# --- redis-server ----------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
  echo "install-deps: installing redis-server (Debian package)"
  apt_update_once
  apt_install_no_service redis-server redis-tools
fi
echo "install-deps: $(redis-server --version | head -n1)"

# --- openssl (docker/peer-tls.sh makes the peer-link certificates) ---------
if ! command -v openssl >/dev/null 2>&1; then
  echo "install-deps: installing openssl (Debian package)"
  apt_update_once
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends openssl
fi

# --- chromium (tests/it/chat.rs drives the chat example's page headless) --
if ! command -v chromium >/dev/null 2>&1; then
  echo "install-deps: installing chromium (Debian package)"
  apt_update_once
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends chromium
fi
echo "install-deps: $(chromium --version 2>/dev/null | head -n1)"

# --- promtool (tests/it/monitoring.rs checks docker/prometheus with it) ----
# Debian's `prometheus` package has it (and the server, which
# docker/build-images.sh packages for the compose profile "monitoring"); its
# postinst would start a system service: refused (apt_install_no_service).
if ! command -v promtool >/dev/null 2>&1; then
  echo "install-deps: installing prometheus (Debian package, for promtool)"
  apt_update_once
  apt_install_no_service prometheus
fi
echo "install-deps: $(promtool --version 2>&1 | head -n1)"

# --- node 20+ (tests/it/js_client.rs runs clients/js's tests with it) -------
# Not installed here: Debian 12's `nodejs` is 18, without the WebSocket the
# client's tests use. Said now rather than by a failing test.
node_major="$(node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/' || true)"
if [ -z "$node_major" ] || [ "$node_major" -lt 20 ]; then
  echo "install-deps: WARNING: Node.js 20 or later is not on PATH (found: ${node_major:-none});" \
    "the JavaScript client's tests (tests/it/js_client.rs) will fail: install NodeSource's nodejs 20" >&2
else
  echo "install-deps: node $(node --version)"
fi

# --- tsc (tests/it/js_client.rs type-checks clients/js/berth.d.ts) ---------
# Debian's node-typescript; it needs some `nodejs` (NodeSource's 20 does).
if ! command -v tsc >/dev/null 2>&1; then
  echo "install-deps: installing node-typescript (Debian package, for tsc)"
  apt_update_once
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends node-typescript
fi
echo "install-deps: tsc $(tsc --version 2>/dev/null)"

# --- consul 1.8.7 from Debian 11 -------------------------------------------
if [ -x "$consul_bin" ] && "$consul_bin" version 2>/dev/null | grep -q "v$consul_version"; then
  echo "install-deps: consul $consul_version already in $consul_bin"
else
  echo "install-deps: fetching consul $consul_version from Debian 11 (bullseye)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # Reuse the Debian mirror this machine is already configured with.
  mirror="$(grep -hoE '^(URIs:|deb)[[:space:]]+[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
  if [ -z "$mirror" ]; then
    echo "install-deps: no Debian mirror found in /etc/apt sources; cannot fetch consul" >&2
    exit 1
  fi
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts"
  chmod -R a+rwX "$work"  # apt drops to the _apt user for downloads
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} bullseye main" >"$work/sources.list"
  apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "Dir::State::Status=/var/lib/dpkg/status"
    -o "Acquire::Languages=none"
  )
  "${sudo_cmd[@]}" apt-get "${apt_opts[@]}" update -qq
  (cd "$work" && "${sudo_cmd[@]}" apt-get "${apt_opts[@]}" download "consul=$consul_version*")
  deb="$(ls "$work"/consul_*.deb | head -n1)"
  dpkg -x "$deb" "$work/root"
  mkdir -p "$tools/bin"
  install -m 0755 "$work/root/usr/bin/consul" "$consul_bin"
fi
echo "install-deps: $("$consul_bin" version | head -n1) at $consul_bin"

# --- schemathesis (tests/it/api.rs checks the backend API against docs/api/openapi.json)
# Pinned, from PyPI, into its own virtualenv under .tools/ (git-ignored).
schemathesis_version="4.32.5"
st_venv="$tools/schemathesis"
if [ -x "$st_venv/bin/schemathesis" ] && "$st_venv/bin/schemathesis" --version 2>/dev/null | grep -q "$schemathesis_version"; then
  echo "install-deps: schemathesis $schemathesis_version already in $st_venv"
else
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    echo "install-deps: installing python3-venv (Debian package)"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends python3-venv
  fi
  echo "install-deps: installing schemathesis $schemathesis_version into $st_venv"
  rm -rf "$st_venv"
  python3 -m venv "$st_venv"
  "$st_venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$schemathesis_version"
fi
echo "install-deps: $("$st_venv/bin/schemathesis" --version) at $st_venv"
