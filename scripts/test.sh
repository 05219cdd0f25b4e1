#!/usr/bin/env bash
# The README's test command: installs what the tests need (idempotent), runs
# every test of the workspace against real redis-server, consul and berth
# processes, then the reference deployment's container suite (tests/deploy)
# against real containers built locally by docker/build-images.sh.
#   BERTH_TEST_DEPLOY=0 scripts/test.sh   skips the container suite (it says so);
#   extra arguments go to the workspace's `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh
# Consul (for the cluster tests) lives in the project's git-ignored .tools/.
export PATH="$PWD/.tools/bin:$PATH"
# The applications the integration tests run as nodes (tests/apps/probe.rs,
# examples/chat): `--all-targets` builds examples only as test harnesses, not
# as the programs.
cargo build --example probe --example chat
cargo test --workspace --all-targets "$@"

if [ "${BERTH_TEST_DEPLOY:-1}" = 0 ]; then
  echo "scripts/test.sh: BERTH_TEST_DEPLOY=0: the container suite (tests/deploy) was NOT run" >&2
  exit 0
fi
if ! docker info >/dev/null 2>&1 || ! command -v docker-compose >/dev/null; then
  cat >&2 <<'MSG'
scripts/test.sh: the container suite (tests/deploy) needs a running Docker engine
and docker-compose: on Debian, `apt-get install docker.io docker-compose` and
start the daemon (`systemctl start docker`, or `dockerd &`), then run again.
MSG
  exit 1
fi
# Builds berth-base:local once (debootstrap) and berth:local from this tree.
docker/build-images.sh
cargo test --features deploy-tests --test deploy -- --nocapture
