#!/usr/bin/env bash
# Runs the shared proxy benchmark (nginx, HAProxy, Portico side by side on
# pinned CPUs) for the core data path, in both scenarios, and prints the
# RESULT lines to record in bench/RESULTS.md.
#
#   bench/run.sh                 # small and body16k, 3 rounds each
#   ROUNDS=5 bench/run.sh small  # one scenario, more rounds
set -euo pipefail
cd "$(dirname "$0")/.."
harness=../shared/bench/proxy-bench
[ -x "$harness" ] || { echo "missing $harness" >&2; exit 1; }
CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}" cargo build --release --quiet
scenarios=("${@:-small body16k}")
for s in ${scenarios[*]}; do
  echo "== scenario $s ($(date -u +%FT%TZ))"
  SCENARIO="$s" GATEWAY_NAME=portico \
    GATEWAY_CMD='exec ./target/release/portico run --config bench/passthrough.yaml' \
    "$harness" 2>"/tmp/proxy-bench-$s.log" | grep -E '^(RESULT|BOTTLENECK|FLAGGED)' || true
done
