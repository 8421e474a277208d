#!/usr/bin/env bash
# The serving figures of docs/benchmarks.md ("Serving with kvrelay bench serve"): starts
# `kvrelay local` in each configuration, drives it with `kvrelay bench serve`, writes the
# JSON reports and figures into OUT (default build/bench-serving) and prints the tables.
#   tools/bench-serving.sh [OUT]
# Needs a build (tools/build.sh). Takes a few minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/bench-serving}
# Which parts to run (all by default), e.g. SECTIONS=shed tools/bench-serving.sh
SECTIONS=${SECTIONS:-"disagg agg rate shed tiers"}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
BIN=build/bin
mkdir -p "$OUT"
NUM=${NUM:-64}
IN=${IN:-256}
OUTLEN=${OUTLEN:-64}
SLO=${SLO:-ttft=250,tpot=25}
LOCAL_PID=""

start_local() {  # $1: name; rest: kvrelay local flags
  local name=$1
  shift
  "$BIN/kvrelay" local --port 0 "$@" >"$OUT/$name.local.out" 2>"$OUT/$name.local.err" &
  LOCAL_PID=$!
  for _ in $(seq 600); do
    if grep -q '^READY ' "$OUT/$name.local.out"; then
      PORT=$(sed -n 's/^READY //p' "$OUT/$name.local.out")
      return 0
    fi
    kill -0 "$LOCAL_PID" 2>/dev/null || { cat "$OUT/$name.local.err" >&2; exit 1; }
    sleep 0.2
  done
  echo "kvrelay local ($name) did not get ready" >&2
  exit 1
}
stop_local() {
  kill -INT "$LOCAL_PID" 2>/dev/null || true
  wait "$LOCAL_PID" 2>/dev/null || true
}
trap stop_local EXIT

bench() {  # $1: name; rest: bench flags
  local name=$1
  shift
  echo "== $name" >&2
  "$BIN/kvrelay" bench serve --server "127.0.0.1:$PORT" --ignore-eos --no-progress \
    --json "$OUT/$name.json" "$@" | tee "$OUT/$name.txt"
}

# Disaggregated: 1 prefill + 1 decode worker, 1 CPU thread each (2 cores in all); every
# prompt of >= 64 uncached tokens is prefilled remotely and its KV sent over UCX.
if want disagg; then
start_local disagg --prefill 1 --decode 1 --threads 1 --router-flag=--local_prefill_max_tokens=64
bench disagg-sweep --dataset random --num-prompts "$NUM" --input-len "$IN" --output-len "$OUTLEN" \
  --sweep-concurrency 1,2,4,8,16 --slo "$SLO" --plot "$OUT/disagg-sweep"
bench disagg-random --dataset random --num-prompts "$NUM" --input-len $((IN + 512)) \
  --output-len "$OUTLEN" --max-concurrency 4 --seed 1
bench disagg-prefix --dataset prefix --num-prompts "$NUM" --prefix-groups 4 --prefix-len 512 \
  --input-len "$IN" --output-len "$OUTLEN" --max-concurrency 4 --seed 1 --plot "$OUT/disagg-prefix"
bench disagg-multiturn --dataset multi-turn --num-prompts 16 --turns 4 --input-len 128 \
  --output-len "$OUTLEN" --max-concurrency 4 --seed 1
stop_local
fi

# Aggregated: one decode worker that prefills locally, 2 CPU threads (the same 2 cores).
if want agg; then
start_local agg --prefill 0 --decode 1 --threads 2
bench agg-sweep --dataset random --num-prompts "$NUM" --input-len "$IN" --output-len "$OUTLEN" \
  --sweep-concurrency 1,2,4,8,16 --slo "$SLO" --plot "$OUT/agg-sweep"
stop_local
fi

# Poisson arrivals at rising rates against the aggregated worker.
if want rate; then
start_local agg-rate --prefill 0 --decode 1 --threads 2
bench agg-rate-sweep --dataset random --num-prompts "$NUM" --input-len "$IN" \
  --output-len "$OUTLEN" --sweep-rate 2,4,8,16 --slo "$SLO" --plot "$OUT/agg-rate-sweep"
stop_local
fi

# Overload (issue 22): Poisson arrivals at 100 req/s, far above what the aggregated worker
# serves, once with the router's defaults (64 running, 1024 queued: everything admitted)
# and once shedding (4 running, 8 queued, 0.5 s in the queue at most).
if want shed; then
for mode in unbounded shedding; do
  flags=()
  if [[ $mode == shedding ]]; then
    flags=(--router-flag=--max_running=4 --router-flag=--max_queued=8
           --router-flag=--max_queue_seconds=0.5)
  fi
  start_local "overload-$mode" --prefill 0 --decode 1 --threads 2 "${flags[@]}"
  bench "overload-$mode" --dataset random --num-prompts 600 --input-len "$IN" \
    --output-len "$OUTLEN" --request-rate 100 --seed 3 --request-timeout 120
  stop_local
done
fi
# Tiered KV cache (issue 19): 24 six-turn conversations, round-robin (every turn resends
# the whole history), against a decode pool of 192 blocks, ~1/6 of the 1,128 blocks the
# conversations' KV needs: without tiers the pool has evicted a conversation's history by
# the time its next turn comes. Tiers off; a host tier holding all of it; a host tier of
# 256 blocks over a disk tier (the rest goes to disk and comes back from it).
if want tiers; then
TIER_DIR=$(mktemp -d /tmp/kvrelay-bench-tiers.XXXXXX)
for mode in off host host-disk; do
  flags=(--decode-flag=--kv_blocks=192 --decode-flag=--metrics_listen=127.0.0.1:0)
  case $mode in
    host) flags+=(--decode-flag=--kv_host_bytes=$((256 << 20))) ;;
    host-disk) flags+=(--decode-flag=--kv_host_bytes=$((16 << 20))
                       --decode-flag=--kv_disk_dir="$TIER_DIR" --decode-flag=--kv_disk_bytes=$((1 << 30))) ;;
  esac
  start_local "tiers-$mode" --prefill 0 --decode 1 --threads 2 "${flags[@]}"
  bench "tiers-$mode" --dataset multi-turn --num-prompts 24 --turns 6 --input-len 96 \
    --output-len 32 --max-concurrency 2 --seed 1
  # What the decode worker computed and reused, by tier.
  mport=$(sed -n 's/^\[decode-0\] METRICS //p' "$OUT/tiers-$mode.local.err" | head -1)
  curl -s "127.0.0.1:$mport/metrics" |
    grep -E '^kvrelay_(decode_(prompt|cached)_tokens_total|decode_step_seconds_(sum|count)|kv_tier_(hits_total|blocks|reload_seconds_(sum|count))|kv_evictions_total)' |
    tee "$OUT/tiers-$mode.metrics.txt"
  stop_local
done
rm -rf "$TIER_DIR"
fi
trap - EXIT
echo "reports in $OUT" >&2
