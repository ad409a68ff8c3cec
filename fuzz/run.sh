#!/usr/bin/env bash
# One fuzzing session of one target, growing its committed corpus:
#   fuzz/run.sh TARGET SECONDS [libFuzzer options...]
# New inputs go to fuzz/corpus/TARGET/, beside the hand-made seeds in
# fuzz/seeds/TARGET/. Crashes land in fuzz/artifacts/TARGET/; once fixed, each goes into
# fuzz/seeds/TARGET/ under a name that says what it found, so that the
# replay test (tests/integration/fuzz_corpora.rs) keeps it fixed (not into
# the corpus: a merge drops inputs that add no coverage). Before a commit,
# `fuzz/run.sh TARGET merge` shrinks the corpus to the inputs that add
# coverage.
set -euo pipefail
cd "$(dirname "$0")"
target=$1 seconds=$2
shift 2
cargo +nightly fuzz build -O any >&2
bin=target/x86_64-unknown-linux-gnu/release/any
mkdir -p "artifacts/$target" "corpus/$target"
export NANODETD_FUZZ_TARGET=$target
if [[ $seconds == merge ]]; then
    rm -rf "corpus/$target.min" && mkdir "corpus/$target.min"
    "$bin" -set_cover_merge=1 "corpus/$target.min" "corpus/$target" >&2
    rm -rf "corpus/$target" && mv "corpus/$target.min" "corpus/$target"
    exit
fi
exec "$bin" -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="artifacts/$target/" "$@" "corpus/$target" "seeds/$target"
