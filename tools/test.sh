#!/usr/bin/env bash
# Builds kvrelay and runs the whole default test suite (ctest labels "unit",
# "integration" and "fault") plus the clang-format check. Slow soak/benchmark runs carry other
# labels or are separate binaries, and are not run here.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/build.sh
tools/check-format.sh
# CUDA kernels (when nvcc exists): register / shared-memory use, and no hot kernel spills.
tools/check-cuda.sh "${BUILD_DIR:-build}"
cd "${BUILD_DIR:-build}"
# CUDA vs CPU parity: runs where a GPU exists, reports a skip elsewhere. Run first so
# the last summary printed is the whole suite's.
if ctest -N -L gpu | grep -q "Total Tests: [1-9]"; then
  ctest -L gpu --output-on-failure --timeout 900
fi
ctest -L "unit|integration" -j"${JOBS:-2}" --output-on-failure --timeout 900
# The fault suite (tests/fault): faults injected into real processes, once.
ctest -L fault --output-on-failure --timeout 900
# The same suite again on the portable scalar kernels (what a CPU without AVX2 runs).
KVRELAY_ISA=scalar ctest -L "unit|integration" -j"${JOBS:-2}" --output-on-failure --timeout 900
