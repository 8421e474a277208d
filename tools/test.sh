#!/usr/bin/env bash
# Builds kvrelay and runs the whole default test suite (ctest label "unit"), plus the
# clang-format check. Slow soak/benchmark runs carry other labels and are not run here.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/build.sh
tools/check-format.sh
cd "${BUILD_DIR:-build}"
ctest -L unit -j"${JOBS:-2}" --output-on-failure --timeout 900
# The same suite again on the portable scalar kernels (what a CPU without AVX2 runs).
KVRELAY_ISA=scalar ctest -L unit -j"${JOBS:-2}" --output-on-failure --timeout 900
