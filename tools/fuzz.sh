#!/usr/bin/env bash
# Fuzzing (issue 17): builds the libFuzzer targets of tests/fuzz with clang, ASan and
# UBSan into build-fuzz/ and runs each for FUZZ_SECONDS (default 60) from its seed
# corpus. Any crash, leak, sanitizer report or timeout fails the run; the input is left
# in build-fuzz/crashes/<name>/: add it to tests/fuzz/corpus/<name>/ and it becomes a
# regression test that every build replays (<name>_fuzz_replay). Each target's figures
# (runs, executions/s, seed and final corpus sizes, peak RSS) go to
# build-fuzz/fuzz-stats.tsv (tools/reliability.sh puts them in docs/reliability.md).
# Usage: tools/fuzz.sh [name...]     (default: every target)
set -euo pipefail
cd "$(dirname "$0")/.."
"$(pwd)/tools/install-deps.sh"
BUILD_DIR=${FUZZ_BUILD_DIR:-build-fuzz}
SECONDS_EACH=${FUZZ_SECONDS:-60}
JOBS=${JOBS:-2}
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(tokenizer safetensors config chat_template request descriptor disk_block)
fi
CC=clang CXX=clang++ cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVRELAY_FUZZ=ON -DKVRELAY_CUDA=OFF -DKVRELAY_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$BUILD_DIR" -j"$JOBS" --target "${targets[@]/%/_fuzz}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$(pwd)/tests/sanitizers/lsan.supp}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
stats="$BUILD_DIR/fuzz-stats.tsv"
printf 'target\tseconds\truns\texec_per_s\tseeds\tcorpus\tpeak_rss_mb\n' >"$stats"
for t in "${targets[@]}"; do
  work="$BUILD_DIR/fuzz-corpus/$t"
  crashes="$BUILD_DIR/crashes/$t"
  mkdir -p "$work" "$crashes"
  # New inputs go to the scratch corpus; the seeds in the repository stay as they are.
  if "$BUILD_DIR/bin/${t}_fuzz" "$work" "tests/fuzz/corpus/$t" -max_total_time="$SECONDS_EACH" \
      -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      -artifact_prefix="$crashes/" >"$BUILD_DIR/$t.log" 2>&1; then
    stat() { grep -o "stat::$1: *[0-9]*" "$BUILD_DIR/$t.log" | grep -o '[0-9]*$'; }
    seeds=$(find "tests/fuzz/corpus/$t" -type f | wc -l)
    corpus=$((seeds + $(find "$work" -type f | wc -l)))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$SECONDS_EACH" "$(stat number_of_executed_units)" \
      "$(stat average_exec_per_sec)" "$seeds" "$corpus" "$(stat peak_rss_mb)" >>"$stats"
    echo "fuzz: $t: $(stat number_of_executed_units) runs in ${SECONDS_EACH}s ($(stat average_exec_per_sec)/s), corpus $seeds -> $corpus, no crash"
  else
    echo "fuzz: $t FAILED; last lines of $BUILD_DIR/$t.log:"
    tail -40 "$BUILD_DIR/$t.log"
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: failed: ${failed[*]} (inputs in $BUILD_DIR/crashes/)"
  exit 1
fi
