#!/usr/bin/env bash
# Edge benchmark: Portico next to nginx on TLS (HTTP/1.1 keep-alive, wrk),
# HTTP/2 over TLS and h2c (h2load), with the shared harness's CPU layout:
# the proxy on CPU 1, the load generator and the origin on CPU 0. Then a
# plain HTTP/1.1 load on Portico while its config is reloaded 50 times, and
# `observed`: plain HTTP/1.1 with Portico's metrics, access log and 1%
# tracing on (bench/observed.yaml) against nginx with its access log on.
#
#   bench/edge.sh                       # all scenarios, 3 rounds of 5 s
#   ROUNDS=5 DURATION=10 bench/edge.sh tls-h1 h2c
#
# Scenarios: tls-h1, tls-h2, h2c, reload, observed. Every load is bounded in time and
# goes to 127.0.0.1 only. Prints one RESULT line per scenario and proxy:
#   RESULT scenario=tls-h1 name=portico rps=.. p99_ms=.. errors=.. cpu_us_per_req=.. vs_nginx_cpu=..
# (medians over the rounds; cpu_us_per_req = the proxy's user+system CPU
# over the measured run divided by the requests completed in it.)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
CONNECTIONS="${CONNECTIONS:-64}"
H2_CLIENTS="${H2_CLIENTS:-16}"
H2_STREAMS="${H2_STREAMS:-10}"
PROXY_CPU="${PROXY_CPU:-1}"
LOAD_CPU="${LOAD_CPU:-0}"
scenarios=("${@:-tls-h1 tls-h2 h2c reload observed}")
scenarios=(${scenarios[*]})

for tool in nginx wrk h2load openssl taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nginx-light wrk nghttp2-client openssl util-linux)" >&2; exit 1; }
done
CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}" cargo build --release --quiet
bin="$PWD/target/release/portico"

tmp=$(mktemp -d /tmp/portico-edge.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

# A self-signed P-256 certificate for 127.0.0.1 / localhost.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>/dev/null

# The origin: nginx, 1 worker, a 21-byte answer (as proxy-bench's small scenario).
mkdir -p "$tmp/origin" "$tmp/proxy"
cat >"$tmp/origin/nginx.conf" <<EOF
worker_processes 1;
pid $tmp/origin/nginx.pid;
error_log $tmp/origin/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:18081 reuseport;
    location / { return 200 "hello from the origin\n"; }
  }
  # A discarding OTLP sink for the observed scenario.
  server {
    listen 127.0.0.1:18318;
    location / { return 200; }
  }
}
EOF
taskset -c "$LOAD_CPU" nginx -p "$tmp/origin" -c "$tmp/origin/nginx.conf" -g 'daemon off;' &
pids+=($!)

# nginx as the proxy under test: TLS with ALPN h2 + http/1.1, and h2c.
cat >"$tmp/proxy/nginx.conf" <<EOF
worker_processes 1;
pid $tmp/proxy/nginx.pid;
error_log $tmp/proxy/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  http2_max_concurrent_streams 128;
  upstream origin { server 127.0.0.1:18081; keepalive 128; }
  server {
    listen 127.0.0.1:18443 ssl http2;
    listen 127.0.0.1:18082 http2;
    listen 127.0.0.1:18083;
    ssl_certificate $tmp/cert.pem;
    ssl_certificate_key $tmp/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF

# The same with the access log on (the default combined format, to a file).
mkdir -p "$tmp/proxy-observed"
sed -e "s|access_log off;|access_log $tmp/nginx-access.log;|" -e "s|$tmp/proxy/|$tmp/proxy-observed/|g" \
  "$tmp/proxy/nginx.conf" >"$tmp/proxy-observed/nginx.conf"

export BENCH_TLS_LISTEN=127.0.0.1:18443 BENCH_H2C_LISTEN=127.0.0.1:18082 \
  BENCH_UPSTREAM=127.0.0.1:18081 BENCH_CERT="$tmp/cert.pem" BENCH_KEY="$tmp/key.pem" BENCH_WORKERS=1
cp bench/edge.yaml "$tmp/edge.yaml"
cp bench/observed.yaml "$tmp/observed.yaml"

start_proxy() { # name scenario -> sets proxy_pid
  local observed=""
  [ "$2" = observed ] && observed=1
  case "$1" in
    nginx)
      local dir="$tmp/proxy"
      [ -n "$observed" ] && dir="$tmp/proxy-observed"
      taskset -c "$PROXY_CPU" nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' & ;;
    portico)
      local config="$tmp/edge.yaml"
      [ -n "$observed" ] && config="$tmp/observed.yaml"
      BENCH_LISTEN=127.0.0.1:18083 BENCH_ACCESS_LOG="$tmp/portico-access.log" \
        BENCH_OTLP=http://127.0.0.1:18318/v1/traces BENCH_ADMIN=127.0.0.1:18099 \
        PORTICO_LOG=info taskset -c "$PROXY_CPU" "$bin" run --config "$config" 2>"$tmp/portico.log" & ;;
  esac
  proxy_pid=$!
  for _ in $(seq 100); do
    if [ -n "$observed" ]; then
      curl -sf -o /dev/null http://127.0.0.1:18083/ && return 0
    else
      curl -skf -o /dev/null https://127.0.0.1:18443/ && curl -sf -o /dev/null --http2-prior-knowledge http://127.0.0.1:18082/ && return 0
    fi
    sleep 0.1
  done
  echo "$1 did not start" >&2; cat "$tmp/portico.log" "$tmp/proxy/error.log" 2>/dev/null | tail -5 >&2; exit 1
}
stop_proxy() { kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; }

# CPU ticks (user+system, all threads) of a process.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# nginx's work happens in its worker, the master's only child.
cpu_pid() { if [ "$1" = nginx ]; then pgrep -P "$proxy_pid" | head -1; else echo "$proxy_pid"; fi; }

load() { # scenario seconds -> prints "requests errors rps p99_ms"
  local s=$1 d=$2 out
  case "$s" in
    tls-h1|reload|observed)
      local url=https://127.0.0.1:18443/
      [ "$s" = reload ] && url=http://127.0.0.1:18082/
      [ "$s" = observed ] && url=http://127.0.0.1:18083/
      out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${d}s" --latency "$url")
      awk '
        / requests in / { req = $1 }
        /Socket errors/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) err += $i }
        /Non-2xx/ { err += $NF }
        /Requests\/sec/ { rps = $2 }
        /^ +99%/ { v = $2; if (v ~ /us$/) p = v / 1000; else if (v ~ /ms$/) p = v + 0; else p = v * 1000 }
        END { printf "%d %d %.0f %.3f\n", req, err, rps, p }' <<<"$out" ;;
    tls-h2|h2c)
      local url=https://127.0.0.1:18443/
      [ "$s" = h2c ] && url=http://127.0.0.1:18082/
      out=$(taskset -c "$LOAD_CPU" h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -D"$d" "$url" 2>&1)
      awk '
        /^requests:/ { done = $6; failed = $10; errored = $12 + $14 }
        /^status codes:/ { non2 = $5 + $7 + $9 }
        /^finished in/ { rps = $4 }
        /^time for request:/ { mean = $6 }
        END { v = mean; if (v ~ /us$/) p = v / 1000; else if (v ~ /ms$/) p = v + 0; else p = v * 1000
              printf "%d %d %.0f %.3f\n", done, failed + errored + non2, rps, p }' <<<"$out" ;;
  esac
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
clk=$(getconf CLK_TCK)

for s in "${scenarios[@]}"; do
  proxies="nginx portico"
  [ "$s" = reload ] && proxies=portico
  for r in $(seq "$ROUNDS"); do
    for p in $proxies; do
      start_proxy "$p" "$s"
      load "$s" 1 >/dev/null # warm-up
      cp=$(cpu_pid "$p")
      t0=$(ticks "$cp")
      if [ "$s" = reload ]; then
        # 50 reloads during the run: alternate two equivalent configs.
        ( for i in $(seq 50); do
            sleep "$(awk -v d="$DURATION" 'BEGIN { print d / 60 }')"
            printf '\n# reload %s\n' "$i" >>"$tmp/edge.yaml"
            kill -HUP "$proxy_pid"
          done ) &
        reloader=$!
      fi
      read -r req err rps lat < <(load "$s" "$DURATION")
      [ "$s" = reload ] && wait "$reloader"
      t1=$(ticks "$cp")
      cpu=$(awk -v t=$((t1 - t0)) -v c="$clk" -v n="$req" 'BEGIN { printf "%.2f", n ? t * 1e6 / c / n : 0 }')
      echo "$s $p round=$r requests=$req errors=$err rps=$rps lat_ms=$lat cpu_us_per_req=$cpu" >&2
      echo "$s $p $req $err $rps $lat $cpu" >>"$tmp/runs"
      if [ "$s" = reload ]; then
        reloads=$(grep -c "configuration reloaded" "$tmp/portico.log" || true)
        echo "$s reloads_logged=$reloads" >&2
        cp bench/edge.yaml "$tmp/edge.yaml"
      fi
      stop_proxy
    done
  done
done

for s in "${scenarios[@]}"; do
  ref=""
  for p in nginx portico; do
    grep -q "^$s $p " "$tmp/runs" || continue
    col() { awk -v s="$s" -v p="$p" -v c="$1" '$1 == s && $2 == p { print $c }' "$tmp/runs" | median; }
    errs=$(awk -v s="$s" -v p="$p" '$1 == s && $2 == p { e += $4 } END { print e + 0 }' "$tmp/runs")
    cpu=$(col 7)
    [ "$p" = nginx ] && ref=$cpu
    vs=$(awk -v a="$cpu" -v b="${ref:-0}" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "-" }')
    lat_name=p99_ms
    case "$s" in tls-h2|h2c) lat_name=mean_ms ;; esac
    echo "RESULT scenario=$s name=$p rps=$(col 5) $lat_name=$(col 6) errors=$errs cpu_us_per_req=$cpu vs_nginx_cpu=$vs"
  done
done
