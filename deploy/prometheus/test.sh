#!/bin/sh
# Checks the Prometheus rules of kvrelay: syntax (promtool check rules) and behaviour
# (promtool test rules: every alert firing and not firing). promtool comes from the Debian
# package `prometheus` (tools/install-deps.sh). Run from anywhere; ctest runs it as
# prometheus_rules_test.
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool not found: install the Debian package prometheus (tools/install-deps.sh)" >&2
  exit 1
fi
cd "$dir"
promtool check rules kvrelay-rules.yaml
promtool test rules kvrelay-rules.test.yaml
