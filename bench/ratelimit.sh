#!/usr/bin/env bash
# Rate-limit benchmark: runs the shared proxy benchmark four times, nginx
# next to Portico each time (PROXIES="nginx gateway"), with Portico on
#   passthrough  bench/passthrough.yaml (no limiter: the baseline)
#   local        bench/ratelimit-local.yaml
#   hybrid       bench/ratelimit-redis.yaml, BENCH_LIMIT_BACKEND=hybrid
#   strict       bench/ratelimit-redis.yaml, BENCH_LIMIT_BACKEND=redis
# A redis-server (no persistence) is started for the Redis runs, pinned to
# CPU 0 with the origin and wrk (the proxy has CPU 1), and stopped at exit.
#
#   bench/ratelimit.sh                    # all four, 3 rounds each
#   ROUNDS=5 bench/ratelimit.sh local     # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
harness="${HARNESS:-../shared/bench/proxy-bench}"
[ -x "$harness" ] || { echo "missing $harness" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "missing redis-server (apt-get install redis-server)" >&2; exit 1; }
CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" cargo build --release --quiet

port="${REDIS_PORT:-16379}"
export REDIS_URL="redis://127.0.0.1:$port"
taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
  >/tmp/ratelimit-bench-redis.log 2>&1 &
redis_pid=$!
trap 'kill "$redis_pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done

run() {
  local label=$1 cfg=$2 backend=${3:-}
  echo "== $label ($(date -u +%FT%TZ))"
  BENCH_LIMIT_BACKEND="$backend" PROXIES="nginx gateway" GATEWAY_NAME="portico-$label" \
    GATEWAY_CMD="exec ./target/release/portico run --config $cfg" \
    "$harness" 2>"/tmp/ratelimit-bench-$label.log" | grep -E '^(RESULT|FLAGGED)' || true
}

for what in ${@:-passthrough local hybrid strict}; do
  case $what in
    passthrough) run passthrough bench/passthrough.yaml ;;
    local) run local bench/ratelimit-local.yaml ;;
    hybrid) redis-cli -p "$port" flushall >/dev/null; run hybrid bench/ratelimit-redis.yaml hybrid ;;
    strict) redis-cli -p "$port" flushall >/dev/null; run strict bench/ratelimit-redis.yaml redis ;;
    *) echo "unknown run $what" >&2; exit 1 ;;
  esac
done
