#!/usr/bin/env bash
# Quick start: installs what is missing, builds, writes the demo model (random
# weights: its text is gibberish), starts the service on this machine (`kvrelay local`:
# router + 1 prefill + 1 decode worker), sends it one request and stops it.
# Usage: tools/demo.sh ["prompt text"]      (PORT=... to serve on another port than 50051)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS="kvrelay kvrelay-router kvrelay-prefill kvrelay-decode" tools/build.sh
PROMPT=${1:-"The capital of France is"}
PORT=${PORT:-50051}
echo "kvrelay: demo model with random weights: the text below is gibberish (README: use a real model)" >&2

# kvrelay local prints "READY <port>" once every worker is registered with the router.
exec 3< <(exec build/bin/kvrelay local --port "$PORT")
LOCAL_PID=$!
stop() {
  kill -TERM "$LOCAL_PID" 2>/dev/null || true  # workers drain, then the router stops
  wait "$LOCAL_PID" 2>/dev/null || true
}
trap stop EXIT
port=
while IFS= read -r -t 300 line <&3; do
  echo "$line" >&2
  if [[ $line == "READY "* ]]; then
    port=${line#READY }
    break
  fi
done
if [[ -z $port ]]; then
  echo "kvrelay demo: kvrelay local did not start (see above)" >&2
  exit 1
fi
build/bin/kvrelay generate --server "127.0.0.1:$port" --prompt "$PROMPT" --max-tokens 32
