#!/usr/bin/env bash
# benches/peers.sh - derived from ../shared/bench/peers.sh (copied, not a wrapper;
# the shared copy is read-only). What this copy adds / changes:
#   * two geoproxy targets from the same binary, measured in ONE run so their
#     ratios are comparable (the machine is noisy across runs):
#       geoproxy       proxy.multiplex = true   port 7501, admin 7502, $RUN/geoproxy.toml
#       geoproxy_1to1  proxy.multiplex = false  port 7601, admin 7602, $RUN/geoproxy_1to1.toml
#       geoproxy_cores proxy.multiplex = true, proxy.threads = 0 (one worker per core), port 7701
#                      (not in the default TARGETS; add it to compare worker counts)
#     each with its own PID for the CPU columns; multiplex is written in each TOML
#     and also pinned per process with GEOPROXY__PROXY__MULTIPLEX (an env override
#     beats the file, so a stray one in the caller's environment cannot flip it).
#     The shared script's single "geoproxy" target sets neither key, i.e. runs the
#     defaults (multiplex = true since 8c054ea; co-located: one worker), as "geoproxy"
#     does here; geoproxy_1to1 is the same with multiplex = false.
#   * default TARGETS="direct geoproxy geoproxy_1to1 haproxy nutcracker tokio_relay"
#   * the tokio relay source is taken from $SHARED_BENCH/relay
#     (SHARED_BENCH defaults to $HERE/../../shared/bench, i.e. /work/shared/bench)
#   * GEOPROXY_BIN defaults to <project root>/target/release/geoproxy, so the
#     script works from any cwd; geoproxy admin ports are checked as well; after
#     the run the geoproxy_member_connections gauges of each geoproxy are logged
#     (shows which targets really hold shared member connections).
# Workloads, measurement and summary table are unchanged.
#
# --- original header ---
# peers.sh - side-by-side baseline of the Redis proxies a user would pick
# instead of ours, measured with redis-benchmark on THIS machine.
#
# Starts (by hand, on 127.0.0.1 high ports, stopped by PID on exit):
#   redis-server 7001 | haproxy 7101 (tcp, redis-check) and 7102 (same + splice)
#   nutcracker 7201 (stats 7202) | socat 7301 (fork relay) | tokio-relay 7401
#   geoproxy 7501 (admin 7502, multiplex = true), one member = the redis on 7001
#   geoproxy_1to1 7601 (admin 7602, multiplex = false), same member, same binary
#     binary: $GEOPROXY_BIN (default: $HERE/../target/release/geoproxy);
#     configs written to $RUN/geoproxy.toml and $RUN/geoproxy_1to1.toml (see below)
# then runs 4 workloads x REPS repetitions, targets interleaved, and prints
# a table of medians, ratio to direct, and proxy CPU per request.
#
# Needs: redis-server redis-tools haproxy nutcracker socat python3
#        (apt-get install -y redis-server haproxy nutcracker socat)
#        cargo (optional) to build $SHARED_BENCH/relay (tokio copy_bidirectional relay).
# Env knobs: REPS=3 TARGETS="direct haproxy ..." WORKLOADS="a b c d"
#            RUN=/tmp/dir (scratch + raw.csv), HAPROXY_THREADS (default: auto)
#            RELAY_MODE=mt|st  RELAY_BUF=bytes (tokio relay; default 8 KiB)
#            SHARED_BENCH=dir (relay source; default $HERE/../../shared/bench)
#            GEOPROXY_BIN=path
# Summary only (e.g. to pool several runs): peers.sh --summary raw1.csv raw2.csv
set -u
if [ "${1:-}" = --summary ]; then shift; SUMMARY_ONLY=1; RAWS=("$@"); fi
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED_BENCH=${SHARED_BENCH:-$HERE/../../shared/bench}
REPS=${REPS:-3}
TARGETS=${TARGETS:-"direct geoproxy geoproxy_1to1 haproxy nutcracker tokio_relay"}
GEOPROXY_BIN=${GEOPROXY_BIN:-$HERE/../target/release/geoproxy}
WORKLOADS=${WORKLOADS:-"a b c d"}
RELAY_TARGET_DIR=${RELAY_TARGET_DIR:-/tmp/bench-relay-target}
RELAY_BIN="$RELAY_TARGET_DIR/release/tokio-relay"

summary() { # raw csv files...
python3 - "$@" <<'PY'
import csv, sys, statistics as st
from collections import defaultdict
WL = {"a": "c50 P1", "b": "c50 P16", "c": "c1 P1", "d": "16KB c20"}
rows = [r for f in sys.argv[1:] for r in csv.DictReader(open(f))]
g = defaultdict(list)
order_t, order_k = [], []
for r in rows:
    k = (r["workload"], r["test"]); g[k + (r["target"],)].append(r)
    if r["target"] not in order_t: order_t.append(r["target"])
    if k not in order_k: order_k.append(k)
med = lambda rs, f: st.median(float(x[f]) for x in rs)
print("\nMedians of %s runs. ratio = rps/direct rps. proxy us/req = proxy CPU time /"
      " requests (all tests of the run). cpu%% = proxy CPU / wall (200%% = both cores)."
      % max(len(v) for v in g.values()))
print("| wl | test | target | rps | ratio | p50 ms | p99 ms | p99 x direct | proxy cpu% | proxy us/req | redis us/req | host busy% |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for w, test in order_k:
    d = g.get((w, test, "direct"))
    drps = med(d, "rps") if d else None; dp99 = med(d, "p99_ms") if d else None
    for t in order_t:
        rs = g.get((w, test, t))
        if not rs: continue
        rps = med(rs, "rps"); p50 = med(rs, "p50_ms"); p99 = med(rs, "p99_ms")
        ntests = sum(1 for k in order_k if k[0] == w)
        reqs = float(rs[0]["n"]) * ntests
        pcpu = med(rs, "proxy_cpu_s"); rcpu = med(rs, "redis_cpu_s"); wall = med(rs, "wall_s")
        ratio = "%.2f" % (rps / drps) if drps else "-"
        p99x = "%.2f" % (p99 / dp99) if dp99 else "-"
        pc = "-" if t == "direct" else "%.0f" % (100 * pcpu / wall)
        pu = "-" if t == "direct" else "%.2f" % (1e6 * pcpu / reqs)
        print("| %s %s | %s | %s | %.0f | %s | %.3f | %.3f | %s | %s | %s | %.2f | %s |" % (
            w, WL.get(w, ""), test, t, rps, ratio, p50, p99, p99x, pc, pu,
            1e6 * rcpu / reqs, "%.0f" % med(rs, "host_busy_pct")))
PY
}
if [ -n "${SUMMARY_ONLY:-}" ]; then summary "${RAWS[@]}"; exit; fi
RUN=${RUN:-$(mktemp -d /tmp/peers.XXXXXX)}
mkdir -p "$RUN"

declare -A PORT=([direct]=7001 [haproxy]=7101 [haproxy_splice]=7102
                 [nutcracker]=7201 [socat]=7301 [tokio_relay]=7401 [geoproxy]=7501
                 [geoproxy_1to1]=7601 [geoproxy_cores]=7701)
declare -A ADMIN_PORT=([geoproxy]=7502 [geoproxy_1to1]=7602 [geoproxy_cores]=7702)
declare -A MULTIPLEX=([geoproxy]=true [geoproxy_1to1]=false [geoproxy_cores]=true)
declare -A THREADS=([geoproxy_cores]=0)   # unset: the default (co-located: one worker)
declare -A WL=(
  [a]="-c 50 -n 200000 -t get,set -P 1"
  [b]="-c 50 -n 1000000 -t get,set -P 16"
  [c]="-c 1 -n 50000 -t get"
  [d]="-d 16384 -t set,get -c 20 -n 50000"
)
declare -A PROXYPID   # target -> pid whose CPU we account
PIDS=()

log() { echo "[$(date +%T)] $*" >&2; }

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for t in $TARGETS; do
  if [ -z "${PORT[$t]:-}" ]; then echo "unknown target $t" >&2; exit 1; fi
  for port in "${PORT[$t]}" ${ADMIN_PORT[$t]:-}; do
    if ss -ltnH "sport = :$port" | grep -q .; then
      echo "port $port ($t) already in use; stop it first" >&2; exit 1
    fi
  done
done

wait_ping() { # port
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  echo "no PONG on port $1" >&2; return 1
}

# ---- start servers ---------------------------------------------------------
redis-server --port 7001 --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize no --dir "$RUN" --logfile "$RUN/redis.log" &
REDIS_PID=$!; PIDS+=($REDIS_PID); PROXYPID[direct]=$REDIS_PID
wait_ping 7001 || exit 1

cat > "$RUN/haproxy.cfg" <<EOF
global
  maxconn 4000
  stats socket $RUN/haproxy.sock mode 600 level admin
  ${HAPROXY_THREADS:+nbthread $HAPROXY_THREADS}
defaults
  mode tcp
  timeout connect 2s
  timeout client 1h
  timeout server 1h
frontend fe_redis
  bind 127.0.0.1:7101
  default_backend be_redis
backend be_redis
  option redis-check
  server r1 127.0.0.1:7001 check inter 1s fall 2 rise 1
frontend fe_redis_splice
  bind 127.0.0.1:7102
  option splice-request
  option splice-response
  default_backend be_redis_splice
backend be_redis_splice
  option splice-request
  option splice-response
  option redis-check
  server r1 127.0.0.1:7001 check inter 1s fall 2 rise 1
EOF
if [[ " $TARGETS " == *" haproxy"* ]]; then
  haproxy -db -f "$RUN/haproxy.cfg" > "$RUN/haproxy.log" 2>&1 &
  p=$!; PIDS+=($p); PROXYPID[haproxy]=$p; PROXYPID[haproxy_splice]=$p
  wait_ping 7101 || exit 1; wait_ping 7102 || exit 1
fi

cat > "$RUN/nutcracker.yml" <<EOF
alpha:
  listen: 127.0.0.1:7201
  hash: fnv1a_64
  distribution: ketama
  redis: true
  auto_eject_hosts: false
  servers:
   - 127.0.0.1:7001:1
EOF
if [[ " $TARGETS " == *" nutcracker "* ]]; then
  nutcracker -c "$RUN/nutcracker.yml" -s 7202 -a 127.0.0.1 \
    -o "$RUN/nutcracker.log" -v 4 &
  p=$!; PIDS+=($p); PROXYPID[nutcracker]=$p
  wait_ping 7201 || exit 1
fi

if [[ " $TARGETS " == *" socat "* ]]; then
  socat TCP-LISTEN:7301,bind=127.0.0.1,reuseaddr,fork,backlog=1024,nodelay \
        TCP:127.0.0.1:7001,nodelay 2> "$RUN/socat.log" &
  p=$!; PIDS+=($p); PROXYPID[socat]=$p
  wait_ping 7301 || exit 1
fi

if [[ " $TARGETS " == *" tokio_relay "* ]]; then
  if [ ! -x "$RELAY_BIN" ] && command -v cargo >/dev/null; then
    log "building tokio relay"
    (cd "$SHARED_BENCH/relay" && CARGO_TARGET_DIR="$RELAY_TARGET_DIR" \
       cargo build --release -q) > "$RUN/relay-build.log" 2>&1
  fi
  if [ -x "$RELAY_BIN" ]; then
    "$RELAY_BIN" 127.0.0.1:7401 127.0.0.1:7001 "${RELAY_MODE:-mt}" "${RELAY_BUF:-0}" &
    p=$!; PIDS+=($p); PROXYPID[tokio_relay]=$p
    wait_ping 7401 || exit 1
  else
    log "tokio relay not built; dropping target"
    TARGETS=${TARGETS/tokio_relay/}
  fi
fi

start_geoproxy() { # target: same binary, own config file, log and PID
  local t=$1 port=${PORT[$1]} admin=${ADMIN_PORT[$1]} mux=${MULTIPLEX[$1]}
  cat > "$RUN/$t.toml" <<CONF
[proxy]
listen = "127.0.0.1:$port"
mode = "colocated"
multiplex = $mux
${THREADS[$t]:+threads = ${THREADS[$t]}}

[admin]
listen = "127.0.0.1:$admin"

[[members]]
id = "local"
address = "127.0.0.1:7001"
region = "local"
CONF
  if [ ! -x "$GEOPROXY_BIN" ]; then
    echo "no geoproxy binary at $GEOPROXY_BIN (cargo build --release first, or set GEOPROXY_BIN)" >&2; exit 1
  fi
  GEOPROXY__PROXY__MULTIPLEX=$mux "$GEOPROXY_BIN" --config "$RUN/$t.toml" > "$RUN/$t.log" 2>&1 &
  p=$!; PIDS+=($p); PROXYPID[$t]=$p
  wait_ping "$port" || { tail -20 "$RUN/$t.log" >&2; exit 1; }
}
for t in geoproxy geoproxy_1to1 geoproxy_cores; do
  if [[ " $TARGETS " == *" $t "* ]]; then start_geoproxy "$t"; fi
done

# ---- measurement helpers ---------------------------------------------------
# utime+stime+cutime+cstime in clock ticks (cutime catches socat's forked
# per-connection children once reaped). Field 2 (comm) stripped first.
ticks() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12+$13+$14+$15}'; }
# busy and total jiffies of the whole host
hostcpu() { awk '/^cpu /{b=$2+$3+$4+$7+$8; t=b+$5+$6+$9; print b, t}' /proc/stat; }
HZ=$(getconf CLK_TCK)

RAW="$RUN/raw.csv"
echo "workload,rep,target,test,rps,avg_ms,min_ms,p50_ms,p95_ms,p99_ms,max_ms,n,wall_s,proxy_cpu_s,redis_cpu_s,host_busy_pct" > "$RAW"

prep() { # deterministic key state: 3-byte value, as redis-benchmark's default
  redis-cli -p 7001 flushall >/dev/null
  redis-cli -p 7001 set key:__rand_int__ xxx >/dev/null
}

run_one() { # workload rep target
  local w=$1 r=$2 t=$3 port=${PORT[$3]} ppid=${PROXYPID[$3]}
  local n; n=$(sed -E 's/.*-n ([0-9]+).*/\1/' <<<"${WL[$w]}")
  prep; sleep 0.5
  local p0 r0 h0 t0 p1 r1 h1 t1
  p0=$(ticks "$ppid"); r0=$(ticks "$REDIS_PID"); h0=$(hostcpu); t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  timeout 600 redis-benchmark -p "$port" ${WL[$w]} --csv \
    > "$RUN/out.$w.$r.$t.csv" 2> "$RUN/err.$w.$r.$t.log"
  t1=$(date +%s.%N); sleep 0.3   # let socat children exit & be reaped
  p1=$(ticks "$ppid"); r1=$(ticks "$REDIS_PID"); h1=$(hostcpu)
  local wall pc rc busy
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
  pc=$(awk -v a="$p0" -v b="$p1" -v hz="$HZ" 'BEGIN{printf "%.3f", (b-a)/hz}')
  rc=$(awk -v a="$r0" -v b="$r1" -v hz="$HZ" 'BEGIN{printf "%.3f", (b-a)/hz}')
  busy=$(awk -v a="$h0" -v b="$h1" 'BEGIN{split(a,x," ");split(b,y," ");
        printf "%.1f", 100*(y[1]-x[1])/(y[2]-x[2])}')
  [ "$t" = direct ] && pc=0
  tail -n +2 "$RUN/out.$w.$r.$t.csv" | tr -d '"' | while IFS=, read -r tn rest; do
    echo "$w,$r,$t,$tn,$rest,$n,$wall,$pc,$rc,$busy" >> "$RAW"
  done
  log "wl=$w rep=$r $t: $(tail -n +2 "$RUN/out.$w.$r.$t.csv" | tr -d '"' | cut -d, -f1,2,5,7 | tr '\n' ' ') proxy_cpu=${pc}s wall=${wall}s"
}

log "run dir: $RUN ; targets: $TARGETS ; workloads: $WORKLOADS ; reps: $REPS"
for w in $WORKLOADS; do
  for r in $(seq 1 "$REPS"); do
    for t in $TARGETS; do run_one "$w" "$r" "$t"; done
  done
done

if [[ " $TARGETS " == *" haproxy_splice "* ]] && command -v socat >/dev/null; then
  echo "haproxy show info (pipes => splice used):" >&2
  echo "show info" | socat - "UNIX-CONNECT:$RUN/haproxy.sock" 2>/dev/null \
    | grep -iE '^(Nbthread|PipesUsed|PipesFree|Version)' >&2
fi

for t in geoproxy geoproxy_1to1; do
  [[ " $TARGETS " == *" $t "* ]] || continue
  m=$(python3 -c 'import re, sys, urllib.request
t = urllib.request.urlopen(sys.argv[1], timeout=2).read().decode()
print(" ".join("%s=%s" % g for g in re.findall(
    r"^geoproxy_member_connections\{[^}]*kind=\"(\w+)\"[^}]*\} (\S+)$", t, re.M)) or "none")' \
        "http://127.0.0.1:${ADMIN_PORT[$t]}/metrics" 2>/dev/null)
  log "$t (multiplex=${MULTIPLEX[$t]}) geoproxy_member_connections: ${m:-?}"
done

# ---- summary ----
summary "$RAW"
echo "raw data: $RAW" >&2
