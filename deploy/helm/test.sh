#!/usr/bin/env bash
# Renders the kvrelay Helm chart offline and validates the result (no helm, no cluster):
#  1. tests and builds deploy/helm/render (Go, Debian's golang and sprig packages, GOPATH
#     mode);
#  2. installs deploy/helm/validate's npm packages when node_modules is missing or stale;
#  3. renders the chart with values.yaml, with values-gpu.yaml, and with the
#     prometheus-operator objects on (ServiceMonitor + PrometheusRule, then PodMonitor);
#  4. validates every document against its kind's schema with strict fields, and, with
#     --bin-dir, runs every kvrelay command line of the renders with --version;
#  5. checks facts about the renders (probes, GPU requests, router discovery, ...) and that
#     bad values make the render fail.
# Usage: deploy/helm/test.sh [--bin-dir DIR]   (DIR: kvrelay binaries, e.g. build/bin)
# Outputs go to a fresh temporary folder, removed on exit (KEEP=1 keeps it).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
chart="$here/kvrelay"
repo=$(cd "$here/../.." && pwd)
bin_dir=""
while (($#)); do
  case "$1" in
    --bin-dir) bin_dir=${2:?--bin-dir needs a folder}; shift 2 ;;
    --bin-dir=*) bin_dir=${1#--bin-dir=}; shift ;;
    *) echo "usage: $0 [--bin-dir DIR]" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/kvrelay-helm-test.XXXXXX")
if [[ "${KEEP:-}" == 1 ]]; then
  echo "helm test: outputs kept in $work"
else
  trap 'rm -rf "$work"' EXIT
fi

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok - $*"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $*"; }
need() { command -v "$1" >/dev/null || { echo "helm test: $1 not found (tools/install-deps.sh installs it)" >&2; exit 1; }; }
need go
need node
need npm

# 1. The renderer.
export GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS=
if [[ -z "${GOCACHE:-}" && -z "${XDG_CACHE_HOME:-}" && -z "${HOME:-}" ]]; then
  export GOCACHE="$work/gocache"
fi
(cd "$here/render" && go vet . && go test -count=1 . && go build -o "$work/render" .)
ok "renderer built (go vet clean, go test passed)"

# 2. The validator's packages.
validate="$here/validate"
if [[ ! -f "$validate/node_modules/.package-lock.json" ||
      "$validate/package-lock.json" -nt "$validate/node_modules/.package-lock.json" ]]; then
  echo "helm test: npm ci in $validate"
  (cd "$validate" && npm ci --no-audit --no-fund --loglevel=error)
fi

# 3. Renders.
render() { "$work/render" --name kvrelay --namespace inference "$@" "$chart"; }
render > "$work/default.yaml"
render -f "$chart/values-gpu.yaml" > "$work/gpu.yaml"
rules="$repo/deploy/prometheus/kvrelay-rules.yaml"
monitoring=(--set metrics.serviceMonitor.enabled=true)
if [[ -f "$rules" ]]; then
  monitoring+=(--set metrics.prometheusRule.enabled=true)
fi
render "${monitoring[@]}" > "$work/service-monitor.yaml"
render --set metrics.podMonitor.enabled=true > "$work/pod-monitor.yaml"
secure=(--set security.tls.enabled=true --set security.tls.secretName=kvrelay-tls
        --set security.tls.serverName=kvrelay-internal --set security.clusterToken.secretName=kvrelay-token)
render "${secure[@]}" > "$work/secure.yaml"
tiers=(--set decode.kvTiers.hostBytes=8Gi --set decode.kvTiers.disk.bytes=100Gi
       --set prefill.kvTiers.hostBytes=4Gi --set prefill.kvTiers.disk.bytes=10Gi
       --set prefill.kvTiers.disk.existingClaim=kv-tier-claim)
render "${tiers[@]}" > "$work/tiers.yaml"
for f in default gpu service-monitor pod-monitor secure tiers; do
  ok "rendered $f ($(grep -c '^# Source: ' "$work/$f.yaml") documents)"
done

# 4. Schemas, strict fields and (with binaries) command lines.
validate_args=()
if [[ -n "$bin_dir" ]]; then
  if [[ -x "$bin_dir/kvrelay-router" && -x "$bin_dir/kvrelay-prefill" &&
        -x "$bin_dir/kvrelay-decode" && -x "$bin_dir/kvrelay" ]]; then
    validate_args=(--bin-dir "$bin_dir")
  else
    echo "helm test: no kvrelay binaries in $bin_dir: command lines not run"
  fi
fi
if node "$validate/validate.mjs" "${validate_args[@]}" "$work"/{default,gpu,service-monitor,pod-monitor,secure,tiers}.yaml; then
  ok "schemas and strict fields of every document${validate_args:+, every kvrelay command line}"
else
  not_ok "schema validation (see INVALID lines above)"
fi

# 5. Facts, and values that must make the render fail.
facts=(--default "$work/default.yaml" --gpu "$work/gpu.yaml"
       --service-monitor "$work/service-monitor.yaml" --pod-monitor "$work/pod-monitor.yaml"
       --dashboards-dir "$repo/deploy/grafana")
if [[ -f "$rules" ]]; then
  facts+=(--rules-file "$rules" --values "$chart/values.yaml")
fi
if node "$validate/facts.mjs" "${facts[@]}"; then
  ok "facts about the renders"
else
  not_ok "facts about the renders (see 'not ok' lines above)"
fi

must_fail() { # description, expected message, render arguments...
  local what=$1 want=$2
  shift 2
  if render "$@" > "$work/fail.yaml" 2> "$work/fail.err"; then
    not_ok "$what: rendered, should have failed"
  elif grep -qF -- "$want" "$work/fail.err"; then
    ok "$what: refused"
  else
    not_ok "$what: failed without '$want': $(tail -1 "$work/fail.err")"
  fi
}
must_fail "unknown model.source" "model.source must be demo, pvc or hostPath" --set model.source=nfs
must_fail "model.source=pvc without a claim" "model.pvc.claimName is required" --set model.source=pvc
must_fail "a chart-owned flag in router.flags" "router.flags.block_size" --set router.flags.block_size=32
must_fail "both kvBytes and kvBlocks" "decode: set kvBytes or kvBlocks" --set decode.kvBlocks=64
must_fail "an unknown device" "prefill.device: must be auto, cpu or cuda" --set prefill.device=gpu
must_fail "grace period below the drain time" "terminationGracePeriodSeconds (10) must exceed" \
  --set prefill.terminationGracePeriodSeconds=10
must_fail "ServiceMonitor and PodMonitor together" "enable one" \
  --set metrics.serviceMonitor.enabled=true --set metrics.podMonitor.enabled=true
must_fail "a template error" "execution error" --set router.probes=null
must_fail "a KV size that is no byte count" "decode.kvBytes: lots is not a byte count" --set decode.kvBytes=lots
if render --set decode.kvBytes=3Gi --set prefill.kvBlocks=4096 --set prefill.kvBytes=0 > "$work/sizes.yaml" &&
   grep -qx -- "    --kv_bytes=3221225472" "$work/sizes.yaml" && grep -qx -- "    --kv_blocks=4096" "$work/sizes.yaml"; then
  ok "KV sizes: 3Gi is --kv_bytes=3221225472, kvBlocks 4096 is --kv_blocks=4096"
else
  not_ok "KV sizes: --set decode.kvBytes=3Gi / prefill.kvBlocks=4096 not rendered as expected"
fi
# security.*: every process gets the TLS files, mTLS and the token; probes go through
# `kvrelay health` over mTLS (kubelet's gRPC probes are plaintext).
count() { grep -c -- "$1" "$2" || true; }
if [[ $(count '^            - --tls_require_client_cert$' "$work/secure.yaml") == 3 &&
      $(count '^            - --cluster_token_file=/var/run/secrets/kvrelay/token/token$' "$work/secure.yaml") == 3 &&
      $(count '^                - --tls-server-name=kvrelay-internal$' "$work/secure.yaml") == 9 &&
      $(count '^            grpc:$' "$work/secure.yaml") == 0 &&
      $(count '^            secretName: kvrelay-tls$' "$work/secure.yaml") == 3 &&
      $(count '^            grpc:$' "$work/default.yaml") == 9 &&
      $(count 'tls_' "$work/default.yaml") == 0 ]]; then
  ok "security: TLS, mTLS and token flags, Secret volumes and exec probes in every pod (none by default)"
else
  not_ok "security: the secure render lacks flags, Secret volumes or exec probes (or the default has them)"
fi
# kvTiers: the flags, and the disk tier's volume (an emptyDir, or the claim) and mount.
if grep -qx -- "    --kv_host_bytes=8589934592" "$work/tiers.yaml" &&
   grep -qx -- "    --kv_disk_bytes=107374182400" "$work/tiers.yaml" &&
   [[ $(count '^    --kv_disk_dir=/var/lib/kvrelay/kv-tier$' "$work/tiers.yaml") == 2 &&
      $(count '^              mountPath: /var/lib/kvrelay/kv-tier$' "$work/tiers.yaml") == 2 &&
      $(count '^            claimName: kv-tier-claim$' "$work/tiers.yaml") == 1 &&
      $(count 'kv_host_bytes\|kv-tier' "$work/default.yaml") == 0 ]]; then
  ok "KV tiers: host and disk flags, the disk volume (emptyDir or claim) and its mount (none by default)"
else
  not_ok "KV tiers: the tiers render lacks flags, the volume or the mount (or the default has them)"
fi
must_fail "a KV tier size that is no byte count" "decode.kvTiers.hostBytes: lots is not a byte count" \
  --set decode.kvTiers.hostBytes=lots
must_fail "a chart-owned tier flag in decode.flags" "decode.flags.kv_disk_dir" \
  --set decode.flags.kv_disk_dir=/x
must_fail "TLS without a Secret" "security.tls.secretName is required" --set security.tls.enabled=true
must_fail "TLS without a server name" "security.tls.serverName is required" \
  --set security.tls.enabled=true --set security.tls.secretName=s
if [[ -f "$rules" ]]; then
  must_fail "an unknown alert in disabledAlerts" "NoSuchAlert is not an alert of" \
    --set metrics.prometheusRule.enabled=true --set 'metrics.prometheusRule.disabledAlerts={NoSuchAlert}'
fi

echo "helm test: $passed passed, $failed failed"
((failed == 0))
