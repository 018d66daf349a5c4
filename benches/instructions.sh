#!/usr/bin/env bash
# benches/instructions.sh - user-space instructions per request of geoproxy, counted by
# valgrind's callgrind: deterministic, so a small change in the proxy's own cost shows
# even when the shared host makes rates and CPU times vary by 20-50 % between runs.
# What it does not see: system calls' kernel time, and scheduling (valgrind runs one
# thread at a time, so batching under load differs from a real run; read c1 above all).
#
# For each model (multiplex true / false) and each client count: starts redis-server on
# 7001 and geoproxy under callgrind on 7501 (co-located, one worker), warms up, turns
# counting on for one redis-benchmark run of N GETs, and prints instructions per request.
#
# Needs: valgrind redis-server redis-tools. Build first: cargo build --release.
# Env knobs: N=5000 CLIENTS="1 50" MODELS="true false" GEOPROXY_BIN=path RUN=/tmp/dir
# KEEP=1 keeps the callgrind files in RUN (read them with callgrind_annotate --inclusive=yes).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${GEOPROXY_BIN:-$HERE/../target/release/geoproxy}
N=${N:-5000}
CLIENTS=${CLIENTS:-"1 50"}
MODELS=${MODELS:-"true false"}
RUN=${RUN:-$(mktemp -d)}
for tool in valgrind callgrind_control callgrind_annotate redis-server redis-benchmark; do
    command -v "$tool" >/dev/null || { echo "instructions.sh: $tool not found" >&2; exit 1; }
done
for port in 7001 7501 7502; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "instructions.sh: port $port in use" >&2; exit 1
    fi
done

redis-server --port 7001 --bind 127.0.0.1 --save "" --appendonly no --logfile "$RUN/redis.log" &
REDIS=$!
trap 'kill $REDIS 2>/dev/null || true' EXIT
sleep 0.5

echo "| multiplex | clients | requests | instructions per request |"
echo "|---|---:|---:|---:|"
for model in $MODELS; do
    cat > "$RUN/geoproxy.toml" <<TOML
[proxy]
listen = "127.0.0.1:7501"
mode = "colocated"
multiplex = $model
threads = 1

[admin]
listen = "127.0.0.1:7502"

[[members]]
id = "local"
address = "127.0.0.1:7001"
region = "local"
TOML
    for c in $CLIENTS; do
        out="$RUN/callgrind.$model.$c"
        GEOPROXY__PROXY__MULTIPLEX=$model valgrind --tool=callgrind --instr-atstart=no \
            --callgrind-out-file="$out" "$BIN" --config "$RUN/geoproxy.toml" \
            >"$RUN/geoproxy.$model.$c.log" 2>&1 &
        proxy=$!
        for _ in $(seq 100); do
            redis-cli -p 7501 ping >/dev/null 2>&1 && break
            sleep 0.2
        done
        redis-benchmark -p 7501 -c "$c" -n 200 -t get -q >/dev/null 2>&1 # warm up
        callgrind_control -i on "$proxy" >/dev/null 2>&1
        redis-benchmark -p 7501 -c "$c" -n "$N" -t get -q >/dev/null 2>&1
        callgrind_control -i off "$proxy" >/dev/null 2>&1
        callgrind_control -d "$proxy" >/dev/null 2>&1
        sleep 1
        kill "$proxy"; wait "$proxy" 2>/dev/null || true
        total=0
        for f in "$out".*; do
            ir=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}' | head -1)
            total=$((total + ${ir:-0}))
        done
        echo "| $model | $c | $N | $((total / N)) |"
        [ -n "${KEEP:-}" ] || rm -f "$out" "$out".*
    done
done
