#!/usr/bin/env bash
# Idle-session scale and mass failover, geoproxy with proxy.multiplex off and on, in one run.
#
#   cargo build --release && benches/scale.sh            # N=10000 by default
#   N=2000 benches/scale.sh                              # a quick look
#   MODELS=true FAILOVER=0 benches/scale.sh              # idle sessions only, multiplexed
#
# For each model: a redis-server member (maxclients raised for the 1:1 model) and a second
# one to fail over to, geoproxy (target/release/geoproxy) in front, then
# ../shared/bench/idle-scale.py (RSS growth per idle session, member connections) and
# ../shared/bench/mass-failover.py (N clients sending PING every second, SIGKILL of the
# active member at 5 s: time from the fault to each client's first good reply).
set -euo pipefail
N=${N:-10000}
MODELS=${MODELS:-"false true"}
FAILOVER=${FAILOVER:-1}
BIN=${GEOPROXY_BIN:-target/release/geoproxy}
BENCH=${BENCH:-../shared/bench}
ulimit -n $((N * 3 + 2000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

run() {
    local multiplex=$1 east=7401 west=7402 port=7410 admin=7411
    redis-server --port $east --save "" --appendonly no --maxclients $((N + 1000)) >/dev/null &
    local east_pid=$!
    redis-server --port $west --save "" --appendonly no --maxclients $((N + 1000)) >/dev/null &
    local west_pid=$!
    until redis-cli -p $east ping >/dev/null 2>&1 && redis-cli -p $west ping >/dev/null 2>&1; do
        sleep 0.1
    done
    cat >"$work/geoproxy.toml" <<TOML
[proxy]
listen = "127.0.0.1:$port"
mode = "colocated"
max_clients = $((N + 1000))
multiplex = $multiplex
[admin]
listen = "127.0.0.1:$admin"
[failover]
failback = "manual"
[[members]]
id = "east"
address = "127.0.0.1:$east"
[[members]]
id = "west"
address = "127.0.0.1:$west"
TOML
    "$BIN" --config "$work/geoproxy.toml" >"$work/geoproxy.log" 2>&1 &
    local proxy_pid=$!
    until curl -s localhost:$admin/v1/status | grep -q '"active_member":"east"'; do sleep 0.2; done
    echo "== multiplex = $multiplex, N = $N"
    python3 "$BENCH/idle-scale.py" $port $proxy_pid $east "$N"
    curl -s localhost:$admin/v1/status | grep -o "\"active_member\":\"[a-z]*\""
    if [ "$FAILOVER" = 1 ]; then
        python3 "$BENCH/mass-failover.py" $port "$N" 15 5 "kill -9 $east_pid" 1 | tail -4
    fi
    kill $east_pid 2>/dev/null || true
    kill $proxy_pid $west_pid 2>/dev/null || true
    wait $proxy_pid $west_pid $east_pid 2>/dev/null || true
}

for multiplex in $MODELS; do
    run "$multiplex"
done
