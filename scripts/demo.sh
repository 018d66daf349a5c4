#!/usr/bin/env bash
# Local demo: two redis-server "regions" (us-east on 7001, eu-west on 7002) and geoproxy in
# front of them (Redis port 6380, admin port 9380), with a short failback_after so a
# failover and a failback can be watched in under a minute. Prints what to type, then tails
# geoproxy's log until Ctrl-C; everything it started is stopped on exit.
#
#   scripts/demo.sh                    # interactive
#   DEMO_SELFTEST=1 scripts/demo.sh    # kill us-east itself, check failover and failback
#
# Installs redis-server, redis-tools (redis-cli) and curl with apt-get if they are missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

PROXY_PORT=6380
ADMIN_PORT=9380
EAST_PORT=7001
WEST_PORT=7002
FAILBACK_AFTER=10

say() { printf '%s\n' "$*"; }
die() {
    printf 'demo.sh: %s\n' "$*" >&2
    exit 1
}

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- tools ----------------------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    say "demo.sh: installing ${missing[*]} with apt-get"
    apt_install "${missing[@]}"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH; install Rust (https://rustup.rs) first"

# --- ports ----------------------------------------------------------------------------------
port_in_use() {
    # A successful connect means something listens there.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
busy=()
for port in $PROXY_PORT $ADMIN_PORT $EAST_PORT $WEST_PORT; do
    if port_in_use "$port"; then busy+=("$port"); fi
done
if [ ${#busy[@]} -gt 0 ]; then
    die "port(s) ${busy[*]} already in use on 127.0.0.1; the demo needs $PROXY_PORT, $ADMIN_PORT, $EAST_PORT and $WEST_PORT free (another demo still running? see: ss -ltnp)"
fi

# --- build ----------------------------------------------------------------------------------
say "demo.sh: cargo build --release"
cargo build --release
target_dir=${CARGO_TARGET_DIR:-target}
case $target_dir in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
geoproxy_bin="$target_dir/release/geoproxy"
[ -x "$geoproxy_bin" ] || die "$geoproxy_bin was not built"

# --- processes and cleanup ------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/geoproxy-demo.XXXXXX")
geoproxy_pid=""
tail_pid=""

# The pid in a redis pidfile, if that process is still the redis-server on that port (the
# pidfile also covers a us-east restarted by hand with the printed command).
redis_pid_of() {
    local dir=$1 port=$2 pid
    pid=$(cat "$dir/redis.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "redis-server.*:$port" || return 1
    echo "$pid"
}

stop_pid() {
    local pid=$1 i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -CONT "$pid" 2>/dev/null || true # in case it was SIGSTOPped
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    [ -n "$tail_pid" ] && kill "$tail_pid" 2>/dev/null || true
    stop_pid "$geoproxy_pid"
    stop_pid "$(redis_pid_of "$work/us-east" $EAST_PORT || true)"
    stop_pid "$(redis_pid_of "$work/eu-west" $WEST_PORT || true)"
    if [ "${DEMO_KEEP:-0}" = 1 ]; then
        say "demo.sh: stopped; logs kept in $work"
    else
        rm -rf "$work"
        say "demo.sh: stopped geoproxy and both redis-servers"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The command line of one member, printed again for restarting it by hand.
redis_cmd() {
    local name=$1 port=$2
    printf '%q ' redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize no --dir "$work/$name" --pidfile "$work/$name/redis.pid" \
        --logfile "$work/$name/redis.log"
}

start_redis() {
    local name=$1 port=$2 i
    mkdir -p "$work/$name"
    eval "exec $(redis_cmd "$name" "$port")" &
    disown
    for i in $(seq 50); do
        if [ "$(redis-cli -p "$port" PING 2>/dev/null)" = PONG ]; then
            redis_pid_of "$work/$name" "$port" >/dev/null && return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$work/$name/redis.log" >&2 2>/dev/null || true
    die "redis-server $name did not start on port $port"
}

start_redis us-east $EAST_PORT
start_redis eu-west $WEST_PORT
east_pid=$(redis_pid_of "$work/us-east" $EAST_PORT)
west_pid=$(redis_pid_of "$work/eu-west" $WEST_PORT)

config="$work/geoproxy.toml"
cat >"$config" <<TOML
# Written by scripts/demo.sh. See config/geoproxy.toml for every key.
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
mode = "colocated"
region = "us-east"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[[members]]
id = "us-east"
address = "127.0.0.1:$EAST_PORT"
region = "us-east"

[[members]]
id = "eu-west"
address = "127.0.0.1:$WEST_PORT"
region = "eu-west"

[health]
interval = "500ms"
timeout = "300ms"
rise = 2
fall = 2

[failover]
failback = "auto"
failback_after = "${FAILBACK_AFTER}s"
TOML

log="$work/geoproxy.log"
"$geoproxy_bin" --config "$config" >"$log" 2>&1 &
geoproxy_pid=$!
disown

ready=""
for i in $(seq 100); do
    kill -0 "$geoproxy_pid" 2>/dev/null || break
    if [ "$(timeout 3 redis-cli -p $PROXY_PORT PING 2>/dev/null)" = PONG ]; then
        ready=1
        break
    fi
    sleep 0.1
done
if [ -z "$ready" ]; then
    cat "$log" >&2
    die "geoproxy did not answer PING on port $PROXY_PORT"
fi

status() { curl -fsS --max-time 2 "http://127.0.0.1:$ADMIN_PORT/v1/status" 2>/dev/null || true; }
active_is() { status | grep -q "\"active_member\":\"$1\""; }

# --- self-test ------------------------------------------------------------------------------
if [ "${DEMO_SELFTEST:-0}" = 1 ]; then
    fail() {
        say "FAIL: $*"
        say "--- /v1/status: $(status)"
        say "--- geoproxy log:"
        cat "$log"
        exit 1
    }
    # Wait up to $1 seconds for the proxy to accept a write and route to member $2.
    wait_for() {
        local seconds=$1 member=$2 start=$SECONDS reply
        while [ $((SECONDS - start)) -lt "$seconds" ]; do
            reply=$(timeout 3 redis-cli -p $PROXY_PORT SET k v 2>&1 || true)
            if [ "$reply" = OK ] && active_is "$member"; then
                return 0
            fi
            sleep 0.2
        done
        return 1
    }
    say "selftest: geoproxy pid $geoproxy_pid, us-east pid $east_pid, eu-west pid $west_pid"
    [ "$(timeout 3 redis-cli -p $PROXY_PORT SET demo:before 1)" = OK ] || fail "SET through the proxy"
    active_is us-east || fail "us-east is not the active member at start"
    say "selftest: wrote demo:before through the proxy (active member us-east)"

    started=$(date +%s.%N)
    kill -9 "$east_pid"
    say "selftest: kill -9 $east_pid (us-east)"
    wait_for 10 eu-west || fail "no failover to eu-west within 10 s"
    took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    say "selftest: failover to eu-west: SET k v answered OK after ${took} s"

    eval "exec $(redis_cmd us-east $EAST_PORT)" &
    disown
    say "selftest: restarted us-east; failback expected after failback_after (${FAILBACK_AFTER} s)"
    started=$(date +%s.%N)
    wait_for $((FAILBACK_AFTER + 10)) us-east || fail "no failback to us-east within $((FAILBACK_AFTER + 10)) s"
    took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    say "selftest: failback to us-east after ${took} s"
    say "--- geoproxy log:"
    cat "$log"
    say "PASS"
    exit 0
fi

# --- interactive ----------------------------------------------------------------------------
cat <<EOF

geoproxy is running (pid $geoproxy_pid) in front of two local Redis "regions":
  us-east   127.0.0.1:$EAST_PORT   pid $east_pid   (preferred: proxy.region = "us-east")
  eu-west   127.0.0.1:$WEST_PORT   pid $west_pid
Files (config, logs) are in $work

Connect like to any Redis:
  redis-cli -p $PROXY_PORT

Admin endpoints:
  curl -s localhost:$ADMIN_PORT/v1/status     # members, health, active member, route epoch
  curl -s localhost:$ADMIN_PORT/metrics       # Prometheus metrics
  curl -si localhost:$ADMIN_PORT/ready        # 200 while a member is available, else 503

Watch a failover:
  1. In another terminal, keep writing through the proxy:
       while sleep 0.5; do redis-cli -p $PROXY_PORT INCR demo:counter; done
     or on one connection that stays open across the switch:
       redis-cli -p $PROXY_PORT -r -1 -i 0.5 INCR demo:counter
  2. Kill the preferred member:
       kill -9 $east_pid
     The writes continue on eu-west; the log below shows "member down" and a switch with
     reason passive:connection_lost (sessions saw their connections close; a probe on a
     fresh connection confirmed it). (kill -STOP $east_pid instead plays a hung member: it
     is detected by proxy.reply_timeout and a probe, or by the checks; kill -CONT $east_pid
     resumes it.) To return by hand: curl -s -XPOST localhost:$ADMIN_PORT/v1/switchover -d '{"to":"us-east"}'
     The two redis-servers here do not replicate to each other (they are not an
     Active-Active database), so demo:counter starts again from 1 on eu-west.
  3. Restart us-east (it daemonizes; this script stops it on exit):
       $(redis_cmd us-east $EAST_PORT | sed 's/--daemonize no/--daemonize yes/')
     It is up again after 2 good checks (about 1 s) and traffic returns to it
     $FAILBACK_AFTER s later (failover.failback_after): a switch with reason failback.

geoproxy's log follows. Ctrl-C stops geoproxy and both redis-servers.
----------------------------------------------------------------------------------------------
EOF
tail -n +1 -f --pid="$geoproxy_pid" "$log" &
tail_pid=$!
wait "$tail_pid" || true
say "demo.sh: geoproxy exited"
