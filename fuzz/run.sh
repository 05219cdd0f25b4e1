#!/usr/bin/env bash
# fuzz/run.sh TARGET [libFuzzer flags...]
# Runs one fuzz target with the repository's limits: one process
# (-jobs=1 -workers=1), an input may take 10 s, no allocation of 512 MiB or
# more, no more than 2 GiB resident. New inputs go to fuzz/corpus/TARGET
# (git-ignored); fuzz/seeds/TARGET is read too. Crashes land in
# fuzz/artifacts/TARGET/ and make this exit non-zero.
# Extra flags are libFuzzer's, e.g. -runs=10000000 or -max_total_time=20.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target=${1:?usage: fuzz/run.sh TARGET [libFuzzer flags...]}
shift
# cargo-fuzz passes -Zsanitizer=address and -Cllvm-args, which need nightly
# rustc features: stable rustc allows them with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# libFuzzer's job log (fuzz-0.log) is written in the working directory.
cd fuzz
mkdir -p "corpus/$target"
dict=()
[ -f "dicts/$target.dict" ] && dict=("-dict=dicts/$target.dict")
exec cargo fuzz run --fuzz-dir . "$target" "corpus/$target" "seeds/$target" -- \
    -jobs=1 -workers=1 -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -print_final_stats=1 "${dict[@]}" "$@"
