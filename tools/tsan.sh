#!/usr/bin/env bash
# ThreadSanitizer over the unit tests of kvrelay's threaded code (issue 17): the decode
# and prefill engines (continuous batching, remote prefill, cancellation), the transfer
# layer (local and UCX transports, KV store), the kernels' thread pool, the KV pool and
# prefix cache, the router's registry and output streams. Built with clang into
# build-tsan/.
#
# TSan must see every lock: Debian's Abseil is built without it, so absl::Mutex (which
# all of kvrelay uses) would be invisible and every guarded access would look like a
# race. So this script first builds Debian's own Abseil source (`apt-get source abseil`,
# the exact version of libabsl-dev, Debian's patches applied) with -fsanitize=thread as
# shared libraries with the same SONAMEs, and runs the tests with them first on
# LD_LIBRARY_PATH: kvrelay links against the system's headers and libraries as always
# and gets an instrumented, annotated absl::Mutex at run time (an ABI-identical build).
# gRPC and UCX stay uninstrumented (their own synchronisation is not seen); the tests
# here are the ones whose threads are kvrelay's (tests/sanitizers/tsan.supp lists what
# is suppressed in those libraries, and why).
# Usage: tools/tsan.sh [test binary...]
set -euo pipefail
cd "$(dirname "$0")/.."
"$(pwd)/tools/install-deps.sh"
BUILD_DIR=${TSAN_BUILD_DIR:-build-tsan}
ABSL_DIR=$(pwd)/${TSAN_ABSL_DIR:-build-tsan-absl}
JOBS=${JOBS:-2}
tests=("$@")
if ((${#tests[@]} == 0)); then
  tests=(
    engine_test prefill_engine_test kv_transport_test local_transport_test ucx_transport_test
    kv_store_test kv_tiers_test thread_pool_test kv_pool_test prefix_cache_test kv_events_test
    worker_registry_test output_stream_test
  )
fi

# 1. Abseil with ThreadSanitizer (once; kept in $ABSL_DIR).
version=$(dpkg-query -W -f='${Version}' libabsl-dev)
if [[ ! -f "$ABSL_DIR/lib/.version" || "$(cat "$ABSL_DIR/lib/.version")" != "$version" ]]; then
  start=$(date +%s)
  rm -rf "$ABSL_DIR"
  mkdir -p "$ABSL_DIR/src"
  if ! apt-cache showsrc abseil 2>/dev/null | grep -q "^Version: $version"; then
    # Debian's source packages: the same archive as the binary ones, deb-src entries.
    sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      >/etc/apt/sources.list.d/kvrelay-deb-src.sources
    apt-get update -qq
  fi
  (cd "$ABSL_DIR/src" && apt-get source -qq "abseil=$version" >/dev/null 2>&1)
  src=$(find "$ABSL_DIR/src" -mindepth 1 -maxdepth 1 -type d -name 'abseil-*' | head -1)
  CC=clang CXX=clang++ cmake -S "$src" -B "$ABSL_DIR/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" \
    -DCMAKE_CXX_STANDARD=17 -DBUILD_SHARED_LIBS=ON -DBUILD_TESTING=OFF \
    -DCMAKE_CXX_FLAGS=-fsanitize=thread -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread >/dev/null
  cmake --build "$ABSL_DIR/build" -j"$JOBS" >"$ABSL_DIR/build.log" 2>&1 ||
    { tail -40 "$ABSL_DIR/build.log"; exit 1; }
  mkdir -p "$ABSL_DIR/lib"
  find "$ABSL_DIR/build" -name 'libabsl_*.so.*' -exec cp -a {} "$ABSL_DIR/lib/" \;
  echo "$version" >"$ABSL_DIR/lib/.version"
  rm -rf "$ABSL_DIR/src" "$ABSL_DIR/build"
  echo "tsan: Abseil $version built with ThreadSanitizer in $(($(date +%s) - start)) s"
fi

# 2. The tests with ThreadSanitizer.
# -O1 with line tables: what TSan's reports need, and a faster build than -O2 -g.
CC=clang CXX=clang++ cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" \
  -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" -DKVRELAY_TSAN=ON -DKVRELAY_CUDA=OFF -DKVRELAY_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$BUILD_DIR" -j"$JOBS" --target tsan_canary "${tests[@]}"
export LD_LIBRARY_PATH=$ABSL_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:suppressions=$(pwd)/tests/sanitizers/tsan.supp}
# The set-up itself: absl::Mutex seen (clean), a planted race caught (reported).
if ! "$BUILD_DIR/bin/tsan_canary" >"$BUILD_DIR/tsan_canary.log" 2>&1; then
  echo "tsan: the canary reports a race in correct code: is the instrumented Abseil loaded?"
  grep -m1 -A30 "WARNING: ThreadSanitizer" "$BUILD_DIR/tsan_canary.log" || true
  exit 1
fi
if "$BUILD_DIR/bin/tsan_canary" --race >"$BUILD_DIR/tsan_canary.log" 2>&1 ||
  ! grep -q "WARNING: ThreadSanitizer: data race" "$BUILD_DIR/tsan_canary.log"; then
  echo "tsan: the canary's planted race was not reported"
  exit 1
fi
echo "tsan: canary: correct code clean, the planted race reported"
failed=()
for t in "${tests[@]}"; do
  start=$(date +%s)
  # The instrumented Abseil must be the one loaded, or every report is noise.
  if ldd "$BUILD_DIR/bin/$t" | grep "libabsl_synchronization" | grep -vq "$ABSL_DIR"; then
    echo "tsan: $t loads an Abseil other than $ABSL_DIR/lib's"
    exit 1
  fi
  if (cd "$BUILD_DIR" && "bin/$t" --gtest_brief=1 >"$t.tsan.log" 2>&1); then
    echo "tsan: $t passed ($(($(date +%s) - start)) s)"
  else
    echo "tsan: $t FAILED; first report in $BUILD_DIR/$t.tsan.log:"
    grep -m1 -A60 "WARNING: ThreadSanitizer" "$BUILD_DIR/$t.tsan.log" || tail -40 "$BUILD_DIR/$t.tsan.log"
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "tsan: failed: ${failed[*]}"
  exit 1
fi
echo "tsan: ${#tests[@]} test binaries clean under ThreadSanitizer"
