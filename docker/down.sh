#!/usr/bin/env bash
# Stops and removes the reference deployment (containers, network, volumes).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
docker-compose -p "${COMPOSE_PROJECT:-berth}" -f "$here/compose.yml" down -v --remove-orphans
