#!/usr/bin/env bash
# Aggregation cost: Portico's CPU per aggregated request (one client request,
# three upstream calls merged) against one request proxied through Portico,
# and the aggregated request's p99 against the p99 of each call proxied alone.
#
# Method as in ../shared/bench/proxy-bench (see its README): its own nginx JSON
# origin (1 worker, keep-alive, no access log) on 127.0.0.1:18081 (ORIGIN_PORT); Portico
# (1 worker) pinned to CPU 1; the origin and wrk pinned to CPU 0; scenarios
# interleaved for ROUNDS rounds; Portico's CPU read from /proc/PID/stat over
# each wrk run; foreign load reported from /proc/stat.
#
#   bench/aggregate.sh                      # builds the release binary first
#   ROUNDS=5 DURATION=5 bench/aggregate.sh
#   PORTICO=/tmp/portico-bench bench/aggregate.sh   # a copied binary
#   ORIGIN_PORT=18091 LISTEN_PORT=18090 bench/aggregate.sh   # ports taken
#   UPSTREAM_PROTOCOL=h2c bench/aggregate.sh   # Portico → origin over HTTP/2
#     (prior knowledge): an aggregate's calls share one connection, and the
#     proxied baseline uses the same upstream
#
# Scenarios per round:
#   agg      wrk -c$CONNECTIONS on GET /screen (3 calls aggregated)
#   proxy    wrk -c$CONNECTIONS on GET /p/{profile,posts,notifications} in turn
#   lat-agg  wrk -c$LAT_CONNECTIONS on /screen (latency, not saturated)
#   lat-N    wrk -c$LAT_CONNECTIONS on each /p/N alone (latency)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-32}
LAT_CONNECTIONS=${LAT_CONNECTIONS:-1}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PORTICO=${PORTICO:-}
ORIGIN_PORT=${ORIGIN_PORT:-18081}
LISTEN_PORT=${LISTEN_PORT:-18080}
UPSTREAM_PROTOCOL=${UPSTREAM_PROTOCOL:-http1}
case "$UPSTREAM_PROTOCOL" in
  http1) ORIGIN_LISTEN_OPTS="" ;;
  h2c) ORIGIN_LISTEN_OPTS="http2" ;;
  *) echo "UPSTREAM_PROTOCOL: http1 or h2c" >&2; exit 1 ;;
esac
if [ -z "$PORTICO" ]; then
  CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" cargo build --release --quiet
  PORTICO=/tmp/portico-aggregate-bench
  cp target/release/portico "$PORTICO"
fi
for tool in nginx wrk taskset; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || { echo "missing $tool" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

for port in "$ORIGIN_PORT" "$LISTEN_PORT"; do
  if ss -ltnH "sport = :$port" | grep -q .; then
    echo "port $port is taken (another benchmark?): set ORIGIN_PORT / LISTEN_PORT" >&2
    exit 1
  fi
done

tmp=$(mktemp -d /tmp/aggregate-bench.XXXXXX)
chmod 755 "$tmp"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM HUP

cat > "$tmp/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  default_type application/json;
  client_body_temp_path $tmp/cb;
  proxy_temp_path $tmp/px;
  fastcgi_temp_path $tmp/fc;
  uwsgi_temp_path $tmp/uw;
  scgi_temp_path $tmp/sc;
  server {
    listen 127.0.0.1:$ORIGIN_PORT $ORIGIN_LISTEN_OPTS backlog=4096;
    location = /profile { return 200 '{"id":42,"name":"Ada Lovelace","avatar":"https://cdn.example/a/42.png","bio":"Analyst"}'; }
    location = /posts { return 200 '{"items":[{"id":1,"title":"Notes on the engine","likes":12},{"id":2,"title":"On Bernoulli numbers","likes":7},{"id":3,"title":"Poetical science","likes":3}],"next":"c2"}'; }
    location = /notifications { return 200 '{"unread":3}'; }
  }
}
CONF
taskset -c "$LOAD_CPU" "$NGINX" -p "$tmp" -c "$tmp/nginx.conf" >"$tmp/nginx.log" 2>&1 &
pids+=($!)
(exec env BENCH_LISTEN="127.0.0.1:$LISTEN_PORT" BENCH_UPSTREAM="127.0.0.1:$ORIGIN_PORT" BENCH_WORKERS=1 \
  BENCH_UPSTREAM_PROTOCOL="$UPSTREAM_PROTOCOL" \
  taskset -c "$PROXY_CPU" "$PORTICO" run --config bench/aggregate.yaml >"$tmp/portico.log" 2>&1) &
pids+=($!)

ready() { curl -fsS -o /dev/null "http://127.0.0.1:$1$2" 2>/dev/null; }
for _ in $(seq 1 100); do
  ready "$ORIGIN_PORT" /profile && ready "$LISTEN_PORT" /screen && break
  sleep 0.1
done
ready "$LISTEN_PORT" /screen || { echo "portico or the origin did not start" >&2; cat "$tmp"/*.log >&2; exit 1; }
# The process listening on LISTEN_PORT (the launching shell may have forked).
portico_pid=$(ss -ltnpH "sport = :$LISTEN_PORT" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
[ -r "/proc/$portico_pid/stat" ] || { echo "cannot find Portico's pid" >&2; exit 1; }
sanity=$(curl -fsS "http://127.0.0.1:$LISTEN_PORT/screen")
echo "sanity: $sanity"
case "$sanity" in
  *'"notifications":{"unread":3}'*'"posts":[{'*) ;;
  *) echo "unexpected answer from /screen" >&2; exit 1 ;;
esac

cat > "$tmp/rotate.lua" <<'LUA'
local paths = {"/p/profile", "/p/posts", "/p/notifications"}
local i = 0
request = function()
  i = i % 3 + 1
  return wrk.format("GET", paths[i])
end
LUA

# Portico's user and system ticks.
ticks() { awk '{print $14 ":" $15}' "/proc/$portico_pid/stat"; }
busy() { awk '/^cpu[0-9]/ {b=$2+$3+$4+$7+$8+$9; t=b+$5+$6; printf "%s:%d:%d ", $1, b, t}' /proc/stat; }
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/, "", v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v); print v } else { sub(/s$/, "", v); print v*1000 } }'; }
hz=$(getconf CLK_TCK)

# run NAME CONNS PATH [LUA]: prints "NAME rps us_per_req (user, system) p50_ms
# p99_ms errors"
run() {
  local name=$1 conns=$2 path=$3 lua=${4:-}
  local args=(-t1 -c"$conns" -d"${DURATION}s" --latency)
  [ -n "$lua" ] && args+=(-s "$lua")
  taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d1s "http://127.0.0.1:$LISTEN_PORT$path" >/dev/null 2>&1 || true
  local t0 b0 out t1 b1
  t0=$(ticks); b0=$(busy)
  out=$(taskset -c "$LOAD_CPU" wrk "${args[@]}" "http://127.0.0.1:$LISTEN_PORT$path")
  t1=$(ticks); b1=$(busy)
  local reqs rps p50 p99 errs
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%d", $2}')
  p50=$(to_ms "$(echo "$out" | awk '$1=="50%" {print $2}')")
  p99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
  errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {n+=1} END {print n+0}')
  local us
  us=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v n="$reqs" 'BEGIN {
    split(a, x, ":"); split(b, y, ":"); u = (y[1] - x[1]) / hz * 1e6 / n; s = (y[2] - x[2]) / hz * 1e6 / n
    printf "%.2f usr_us=%.2f sys_us=%.2f", u + s, u, s }')
  # Busy share of each CPU over the run (what else ran there shows as foreign
  # load when it exceeds what Portico, nginx and wrk account for).
  local cpus
  cpus=$(awk -v a="$b0" -v b="$b1" 'BEGIN { n=split(a, x, " "); split(b, y, " "); for (i=1;i<=n;i++) { split(x[i], p, ":"); split(y[i], q, ":"); dt=q[3]-p[3]; if (dt>0) printf "%s=%d%% ", p[1], 100*(q[2]-p[2])/dt } }')
  echo "$name rps=$rps cpu_us_per_req=$us p50_ms=$p50 p99_ms=$p99 errors=$errs cpus: $cpus"
}

results="$tmp/results"
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r ($(date -u +%FT%TZ))"
  for line in \
    "$(run agg "$CONNECTIONS" /screen)" \
    "$(run proxy "$CONNECTIONS" /p/profile "$tmp/rotate.lua")" \
    "$(run lat-agg "$LAT_CONNECTIONS" /screen)" \
    "$(run lat-profile "$LAT_CONNECTIONS" /p/profile)" \
    "$(run lat-posts "$LAT_CONNECTIONS" /p/posts)" \
    "$(run lat-notifications "$LAT_CONNECTIONS" /p/notifications)"; do
    echo "  $line"
    echo "$line" >>"$results"
  done
done

# Medians over the rounds.
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
field() { grep "^$1 " "$results" | tr ' ' '\n' | awk -F= -v k="$2" '$1==k {print $2}' | median; }
agg_us=$(field agg cpu_us_per_req); proxy_us=$(field proxy cpu_us_per_req)
lat_agg=$(field lat-agg p99_ms)
slowest=0
for c in profile posts notifications; do
  v=$(field "lat-$c" p99_ms)
  slowest=$(awk -v a="$slowest" -v b="$v" 'BEGIN {print (b>a)?b:a}')
done
ratio=$(awk -v a="$agg_us" -v p="$proxy_us" 'BEGIN {printf "%.2f", a/p}')
echo "RESULT aggregated_cpu_us_per_req=$agg_us proxied_cpu_us_per_req=$proxy_us ratio=$ratio target_ratio<=2.00"
echo "RESULT aggregated_p99_ms=$lat_agg slowest_call_p99_ms=$slowest target_p99_ms<=$(awk -v s="$slowest" 'BEGIN {print s+1}') rps_agg=$(field agg rps) rps_proxy=$(field proxy rps)"
echo "RESULT aggregated_usr_us=$(field agg usr_us) aggregated_sys_us=$(field agg sys_us) proxied_usr_us=$(field proxy usr_us) proxied_sys_us=$(field proxy sys_us)"
