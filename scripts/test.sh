#!/usr/bin/env bash
# The README's test command: installs what the tests need (idempotent), then
# runs every test of the workspace against real redis-server processes and the
# real berth binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh
# Consul (for the cluster tests) lives in the project's git-ignored .tools/.
export PATH="$PWD/.tools/bin:$PATH"
cargo test --workspace --all-targets "$@"
