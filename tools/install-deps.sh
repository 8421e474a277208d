#!/usr/bin/env bash
# Installs the Debian 12 packages kvrelay needs to build, test and run.
# Idempotent: does nothing (and needs no network) when everything is present.
set -euo pipefail

PACKAGES=(
  build-essential cmake git pkg-config clang-format libssl-dev
  clang libclang-rt-dev iproute2
  libabsl-dev nlohmann-json3-dev libxxhash-dev libonig-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libucx-dev ucx-utils
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  prometheus-cpp-dev prometheus libcivetweb-dev
  gnuplot-nox libpng-dev
  golang-go golang-github-masterminds-sprig-dev golang-k8s-sigs-yaml-dev
  golang-gopkg-yaml.v2-dev golang-github-burntsushi-toml-dev nodejs
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "kvrelay: installing ${missing[*]}" >&2
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

# The chart test's schema validator runs on npm. Debian's own nodejs package ships without
# it (the NodeSource build this machine kind carries includes it): add Debian's npm then.
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends npm
fi

# The official openai npm client for the HTTP API's client test (pinned by its lock file).
OPENAI_CLIENT_DIR="$(cd "$(dirname "$0")/.." && pwd)/tests/openai_client"
if [[ ! -d "$OPENAI_CLIENT_DIR/node_modules/openai" ]]; then
  echo "kvrelay: npm ci in tests/openai_client" >&2
  npm ci --prefix "$OPENAI_CLIENT_DIR" --no-audit --no-fund >&2
fi
