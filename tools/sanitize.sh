#!/usr/bin/env bash
# The unit tests of kvrelay's own parsing, memory and concurrency code under
# AddressSanitizer + UndefinedBehaviorSanitizer (issue 17), built with clang into the
# fuzz build (build-fuzz/, shared with tools/fuzz.sh). The subset: every unit test of
# common/ (tokenizer, model, kvcache, transfer incl. UCX, rpc, sampling, util, worker),
# the router's core and API layers, and both engines. The process tests and the
# remaining router/worker service tests are left out to keep CI within its budget.
# ThreadSanitizer is tools/tsan.sh (it needs an instrumented Abseil of its own).
# Usage: tools/sanitize.sh [test binary...]
set -euo pipefail
cd "$(dirname "$0")/.."
"$(pwd)/tools/install-deps.sh"
BUILD_DIR=${FUZZ_BUILD_DIR:-build-fuzz}
JOBS=${JOBS:-2}
tests=("$@")
if ((${#tests[@]} == 0)); then
  tests=(
    # common/
    block_allocator_test block_hash_test kv_events_test kv_pool_test kv_sequence_test
    prefix_cache_test config_test safetensors_test weights_test model_test generator_test
    model_maker_test sampler_test unicode_test pattern_test components_test bpe_model_test
    tokenizer_test bpe_trainer_test chat_template_test stop_strings_test checksum_test
    kv_transport_test local_transport_test ucx_transport_test convert_test security_test
    pki_test server_test file_test kv_store_test kv_tiers_test disk_block_test
    # router and engines
    prefix_index_test scheduler_test worker_registry_test model_context_test
    output_stream_test api_keys_test openai_api_test openai_server_test engine_test
    prefill_engine_test
  )
fi
CC=clang CXX=clang++ cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVRELAY_FUZZ=ON -DKVRELAY_CUDA=OFF -DKVRELAY_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$BUILD_DIR" -j"$JOBS" --target "${tests[@]}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$(pwd)/tests/sanitizers/lsan.supp}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
for t in "${tests[@]}"; do
  start=$(date +%s)
  # From the build folder, as ctest runs them (tests find their data there).
  if (cd "$BUILD_DIR" && "bin/$t" --gtest_brief=1 >"$t.sanitize.log" 2>&1); then
    echo "sanitize: $t passed ($(($(date +%s) - start)) s)"
  else
    echo "sanitize: $t FAILED; last lines of $BUILD_DIR/$t.sanitize.log:"
    tail -40 "$BUILD_DIR/$t.sanitize.log"
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "sanitize: failed: ${failed[*]}"
  exit 1
fi
echo "sanitize: ${#tests[@]} test binaries clean under ASan + UBSan"
