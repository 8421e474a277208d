#!/usr/bin/env bash
# Fuzzing (issue 17): builds the libFuzzer targets of tests/fuzz with clang, ASan and
# UBSan into build-fuzz/ and runs each for FUZZ_SECONDS (default 60) from its seed
# corpus. Any crash, leak, sanitizer report or timeout fails the run; the input is left
# in build-fuzz/crashes/<name>/: add it to tests/fuzz/corpus/<name>/ and it becomes a
# regression test that every build replays (<name>_fuzz_replay).
# Usage: tools/fuzz.sh [name...]     (default: every target)
set -euo pipefail
cd "$(dirname "$0")/.."
"$(pwd)/tools/install-deps.sh"
BUILD_DIR=${FUZZ_BUILD_DIR:-build-fuzz}
SECONDS_EACH=${FUZZ_SECONDS:-60}
JOBS=${JOBS:-2}
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(tokenizer safetensors config chat_template request descriptor)
fi
CC=clang CXX=clang++ cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVRELAY_FUZZ=ON -DKVRELAY_CUDA=OFF -DKVRELAY_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$BUILD_DIR" -j"$JOBS" --target "${targets[@]/%/_fuzz}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$(pwd)/tests/sanitizers/lsan.supp}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
for t in "${targets[@]}"; do
  work="$BUILD_DIR/fuzz-corpus/$t"
  crashes="$BUILD_DIR/crashes/$t"
  mkdir -p "$work" "$crashes"
  # New inputs go to the scratch corpus; the seeds in the repository stay as they are.
  if "$BUILD_DIR/bin/${t}_fuzz" "$work" "tests/fuzz/corpus/$t" -max_total_time="$SECONDS_EACH" \
      -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      -artifact_prefix="$crashes/" >"$BUILD_DIR/$t.log" 2>&1; then
    echo "fuzz: $t: $(grep -o 'stat::number_of_executed_units: *[0-9]*' "$BUILD_DIR/$t.log" | grep -o '[0-9]*$') runs in ${SECONDS_EACH}s, no crash"
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
