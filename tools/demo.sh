#!/usr/bin/env bash
# Quick start: installs what is missing, builds, writes the demo model (random
# weights: its text is gibberish) and generates from a prompt.
# Usage: tools/demo.sh ["prompt text"]
set -euo pipefail
cd "$(dirname "$0")/.."
tools/build.sh
PROMPT=${1:-"The capital of France is"}
build/bin/kvrelay generate --prompt "$PROMPT" --max-tokens 32
