#!/usr/bin/env bash
# Instructions per iteration of berth's micro-benchmarks (the ring, the
# checkpoint codec, the state apply path), counted by valgrind's callgrind:
# repeatable on a shared machine where time is not. Each benchmark runs in its
# own process in the harness's counting mode (actors/benches/harness/mod.rs):
# 2 warm-up runs, then exactly ITERS runs, and only those runs are collected
# (--toggle-collect on the harness's `measured` function).
#
# Usage: scripts/bench-instructions.sh [FILTER]
#   FILTER   a substring: only benchmarks whose name contains it (default: all)
#   ITERS=N  counted iterations per benchmark (default 200)
#   OUT=F    also write the table to F
# Prints one line per benchmark: name, instructions per iteration.
# Needs valgrind (Debian: apt-get install valgrind).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
filter="${1:-}"
iters="${ITERS:-200}"

if ! command -v valgrind >/dev/null 2>&1; then
  echo "bench-instructions: valgrind is not installed (Debian: apt-get install valgrind)" >&2
  exit 1
fi

# Build the bench binaries once; cargo names each executable on stderr.
mapfile -t bins < <(
  cargo bench -p berth-actors -p berth-cluster --no-run 2>&1 |
    sed -n 's/^ *Executable benches\/[a-z_]*\.rs (\(.*\))$/\1/p'
)
if [ "${#bins[@]}" -eq 0 ]; then
  echo "bench-instructions: cargo built no bench binaries" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

table=""
for bin in "${bins[@]}"; do
  # Zero counted iterations lists the binary's benchmarks (`counted NAME 0`).
  mapfile -t names < <(BERTH_BENCH_ITERS=0 "$bin" | sed -n 's/^counted \(.*\) 0$/\1/p')
  for name in "${names[@]}"; do
    if [ -n "$filter" ] && [[ "$name" != *"$filter"* ]]; then continue; fi
    out="$work/callgrind.out"
    BERTH_BENCH_ITERS="$iters" valgrind --tool=callgrind --callgrind-out-file="$out" \
      --toggle-collect='*harness::measured*' "$bin" "$name" >/dev/null 2>"$work/valgrind.log" || {
      cat "$work/valgrind.log" >&2
      exit 1
    }
    total="$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$out")"
    [ -n "$total" ] || total="$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$out")"
    line="$(printf '%-36s %12d\n' "$name" "$((total / iters))")"
    echo "$line"
    table+="$line"$'\n'
  done
done

if [ -n "${OUT:-}" ]; then printf '%s' "$table" >"$OUT"; fi
