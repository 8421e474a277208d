#!/usr/bin/env bash
# Configures and builds kvrelay into build/ (binaries in build/bin/).
# Usage: tools/build.sh [extra cmake -D options...]
#   BUILD_TYPE=Debug tools/build.sh        # Debug build
#   tools/build.sh -DKVRELAY_SANITIZE=ON   # ASan + UBSan (use a separate BUILD_DIR)
#   TARGETS=kvrelay tools/build.sh         # only the CLI
set -euo pipefail
cd "$(dirname "$0")/.."
"$(pwd)/tools/install-deps.sh"
BUILD_DIR=${BUILD_DIR:-build}
BUILD_TYPE=${BUILD_TYPE:-Release}
JOBS=${JOBS:-2}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" "$@" >/dev/null
if [[ -n "${TARGETS:-}" ]]; then
  # shellcheck disable=SC2086
  cmake --build "$BUILD_DIR" -j"$JOBS" --target $TARGETS
else
  cmake --build "$BUILD_DIR" -j"$JOBS"
fi
