#!/usr/bin/env bash
# Quick start: installs what is missing, builds, writes the demo model (random
# weights: its text is gibberish) and generates from a prompt.
# Usage: tools/demo.sh ["prompt text"]
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=kvrelay tools/build.sh
PROMPT=${1:-"The capital of France is"}
echo "kvrelay: demo model with random weights: the text below is gibberish (README: use a real model)" >&2
build/bin/kvrelay generate --prompt "$PROMPT" --max-tokens 32
