#!/usr/bin/env bash
# mcserve-bench against real `mcserve serve` processes (the CPU default model, one thread each):
#   1. 8-turn chats, one replica, prefix reuse on vs off (--no-prefix-caching);
#   2. the same chats at twice the concurrency: one replica vs two behind deploy/nginx/mcserve.conf
#      (hashing X-Session-Id), and two behind it without the header (no affinity).
# Each run has its own --seed: no run finds another's conversations in a cache.
# Results: benchmarks/results/serving/<UTC time>-<label>.json (README "Measured" has the table).
# Needs nginx (apt-get install nginx). Run from the repository root with .venv active:
#   bash benchmarks/serving.sh [reuse] [replicas]      (default: both parts)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/serving}
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

start() {  # start PORT [flags]: one replica, waits until /health is 200
    OMP_NUM_THREADS=1 mcserve serve --device cpu --port "$1" "${@:2}" >"$tmp/$1.log" 2>&1 &
    pids+=($!)
    until curl -sf "127.0.0.1:$1/health" >/dev/null; do sleep 0.5; done
}
stop_all() { for p in "${pids[@]}"; do kill "$p"; wait "$p" || true; done; pids=(); }

chat="--turns 8 --prompt-len 48 --output-len 24 --shared-prefix 128 --num-prefixes 2 --no-progress"
bench() {  # bench URL LABEL [flags]
    mcserve-bench --url "$1" --label "$2" --result-dir "$out" $chat "${@:3}"
}

parts=${*:-reuse replicas}
if [[ " $parts " == *" reuse "* ]]; then
    start 8101
    bench http://127.0.0.1:8101 reuse-on -c 4 -n 32 --session --seed 1
    stop_all
    start 8101 --no-prefix-caching
    bench http://127.0.0.1:8101 reuse-off -c 4 -n 32 --session --seed 1
    stop_all
fi
[[ " $parts " == *" replicas "* ]] || exit 0

start 8101
bench http://127.0.0.1:8101 one-replica -c 8 -n 64 --session --seed 2
start 8102
mkdir -p "$tmp/nginx"/{body,proxy,fastcgi,uwsgi,scgi}
sed -e 's/127.0.0.1:8001/127.0.0.1:8101/; s/127.0.0.1:8002/127.0.0.1:8102/; s/listen 8000;/listen 127.0.0.1:8100;/' \
    deploy/nginx/mcserve.conf >"$tmp/nginx/mcserve.conf"
cat >"$tmp/nginx/nginx.conf" <<NGINX
$( [ "$(id -u)" = 0 ] && echo "user root;" )
worker_processes 1;
error_log $tmp/nginx/error.log warn;
pid $tmp/nginx/nginx.pid;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $tmp/nginx/body; proxy_temp_path $tmp/nginx/proxy;
    fastcgi_temp_path $tmp/nginx/fastcgi; uwsgi_temp_path $tmp/nginx/uwsgi; scgi_temp_path $tmp/nginx/scgi;
    include $tmp/nginx/mcserve.conf;
}
NGINX
nginx -c "$tmp/nginx/nginx.conf" -g 'daemon off;' &
pids+=($!)
until curl -sf 127.0.0.1:8100/router-health >/dev/null; do sleep 0.2; done
bench http://127.0.0.1:8100 two-replicas-affine -c 8 -n 64 --session --seed 3
bench http://127.0.0.1:8100 two-replicas-no-affinity -c 8 -n 64 --seed 4
