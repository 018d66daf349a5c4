#!/usr/bin/env bash
# benches/tls.sh - what TLS costs through geoproxy, beside direct Redis and HAProxy, in ONE run.
#
# What it measures
#   1. Throughput and latency over TLS on both sides, with redis-benchmark --tls:
#        direct    redis-server's --tls-port (plain port off: --port 0)
#        geoproxy  its TLS listener ([proxy] tls = {...}), the member over TLS (tls = true)
#        haproxy   TLS termination (bind ... ssl crt) and origination to redis
#                  (server ... ssl verify required ca-file), tcp mode, nbthread 1
#      Workloads as ../shared/bench/peers.sh: (a) 50 clients, no pipelining, SET/GET;
#      (b) 50 clients, pipeline 16, SET/GET. Targets interleaved (the order rotates every
#      repetition), REPS repetitions, medians; ratio of each to direct in the same run,
#      p50/p99 latency from redis-benchmark --csv, the proxy's CPU time per request.
#      geoproxy runs with proxy.threads = 1 (GEOPROXY_THREADS), HAProxy with nbthread 1
#      (HAPROXY_THREADS): one core each, comparable.
#   2. "Moving 1000 sessions to a TLS member" (benches/tls_sessions.py): two TLS members,
#      geoproxy in front (plain client listener, failback_after 60s, health interval 1s),
#      1000 clients attached to member A with a PING, SIGKILL A, every client PINGs again:
#      time from the kill to the last client's +PONG; the same with two plain members in the
#      same run (trials alternate), and, with tcpdump, how many of B's TLS handshakes were
#      full and how many resumed (pre_shared_key in B's ServerHello).
#
# How to run (from the project root, as root on Debian; ~4-5 min):
#     cargo build --release && benches/tls.sh
#     GEOPROXY_BIN=target-helper/release/geoproxy REPS=4 benches/tls.sh
# Knobs: REPS (4), GEOPROXY_BIN (target/release/geoproxy), GEOPROXY_THREADS (1),
#        HAPROXY_THREADS (1), N_A (200000), N_B (2000000), MOVE_CLIENTS (1000),
#        MOVE_REPS (3), KEY_TYPE (rsa = RSA 2048 as Redis's gen-test-certs.sh; ec = P-256),
#        SKIP_MOVE=1, SKIP_BENCH=1, KEEP=1 (keep the temp dir: configs, logs, raw.csv).
# It installs what is missing with apt-get (redis-server redis-tools haproxy openssl tcpdump
# python3). Every process it starts is stopped on exit (trap), also on Ctrl-C.
# Read ratios within one run only: redis-server, the proxy and redis-benchmark share the
# machine's cores, and absolute numbers move 15-75 % between runs.
set -euo pipefail

REPS=${REPS:-4}
GEOPROXY_BIN=${GEOPROXY_BIN:-target/release/geoproxy}
GEOPROXY_THREADS=${GEOPROXY_THREADS:-1}
HAPROXY_THREADS=${HAPROXY_THREADS:-1}
N_A=${N_A:-200000}
N_B=${N_B:-2000000}
MOVE_CLIENTS=${MOVE_CLIENTS:-1000}
MOVE_REPS=${MOVE_REPS:-3}
KEY_TYPE=${KEY_TYPE:-rsa}
HERE=$(cd "$(dirname "$0")" && pwd)

log() { echo "[$(date +%T)] $*" >&2; }

# ---- what it needs -------------------------------------------------------------------
need=()
for c in redis-server:redis-server redis-benchmark:redis-tools redis-cli:redis-tools \
         haproxy:haproxy openssl:openssl python3:python3 tcpdump:tcpdump; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing: ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! redis-benchmark --help 2>&1 | grep -q -- '--tls'; then
  echo "this redis-benchmark has no --tls (Redis built without TLS); need redis-tools 6+ with TLS" >&2
  exit 1
fi
if [ ! -x "$GEOPROXY_BIN" ]; then
  echo "no geoproxy binary at $GEOPROXY_BIN (cargo build --release first, or set GEOPROXY_BIN)" >&2
  exit 1
fi
# 1000 sessions through the proxy: 2 fds each in geoproxy, 1 in the clients, 1 in redis.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

RUN=$(mktemp -d /tmp/tls-bench.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${KEEP:-}" ]; then log "kept $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- certificates: a CA, a server certificate (SAN 127.0.0.1, localhost), a client one ----
# (client.pem/client.key are made for mTLS experiments: tls-auth-clients is off and no
# target uses them here.)
newkey() { # out
  if [ "$KEY_TYPE" = ec ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
  else
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null
  fi
}
(
  cd "$RUN"
  newkey ca.key
  openssl req -x509 -new -key ca.key -days 2 -subj "/CN=geoproxy bench CA" -out ca.pem
  newkey server.key
  openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" > server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile server.ext -out server.pem 2>/dev/null
  newkey client.key
  openssl req -new -key client.key -subj "/CN=bench client" -out client.csr
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth" > client.ext
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile client.ext -out client.pem 2>/dev/null
  cat server.pem server.key > server-combined.pem   # HAProxy's crt: certificate + key
  openssl verify -CAfile ca.pem server.pem client.pem >/dev/null
)
CA=$RUN/ca.pem

read -r P_REDIS P_GEO P_GEO_TLS P_ADMIN P_HAP < <(python3 - <<'PY'
import socket
ss = [socket.socket() for _ in range(5)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
PY
)
declare -A PORT=([direct]=$P_REDIS [geoproxy]=$P_GEO_TLS [haproxy]=$P_HAP)
declare -A PROXYPID

tls_ping() { # port
  for _ in $(seq 1 100); do
    [ "$(redis-cli --tls --cacert "$CA" -p "$1" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  echo "no PONG over TLS on port $1" >&2; return 1
}

if [ -z "${SKIP_BENCH:-}" ]; then
# ---- redis-server: TLS port only ----------------------------------------------------------
redis-server --bind 127.0.0.1 --port 0 --tls-port "$P_REDIS" \
  --tls-cert-file "$RUN/server.pem" --tls-key-file "$RUN/server.key" \
  --tls-ca-cert-file "$CA" --tls-auth-clients no --save "" --appendonly no \
  --daemonize no --dir "$RUN" --logfile "$RUN/redis.log" &
REDIS_PID=$!; PIDS+=("$REDIS_PID"); PROXYPID[direct]=$REDIS_PID
tls_ping "$P_REDIS"

# ---- geoproxy: TLS listener, the member over TLS ------------------------------------------
cat > "$RUN/geoproxy.toml" <<CONF
[proxy]
listen = "127.0.0.1:$P_GEO"
mode = "colocated"
threads = $GEOPROXY_THREADS
tls = { listen = "127.0.0.1:$P_GEO_TLS", cert_file = "$RUN/server.pem", key_file = "$RUN/server.key" }

[admin]
listen = "127.0.0.1:$P_ADMIN"

[health]
interval = "1s"

[[members]]
id = "local"
address = "127.0.0.1:$P_REDIS"
tls = true
tls_ca_file = "$CA"
CONF
"$GEOPROXY_BIN" --config "$RUN/geoproxy.toml" > "$RUN/geoproxy.log" 2>&1 &
p=$!; PIDS+=("$p"); PROXYPID[geoproxy]=$p
tls_ping "$P_GEO_TLS" || { tail -20 "$RUN/geoproxy.log" >&2; exit 1; }

# ---- HAProxy: TLS termination and origination, tcp mode, one thread -----------------------
cat > "$RUN/haproxy.cfg" <<EOF
global
  nbthread $HAPROXY_THREADS
  maxconn 4000
defaults
  mode tcp
  timeout connect 2s
  timeout client 1h
  timeout server 1h
frontend fe_tls
  bind 127.0.0.1:$P_HAP ssl crt $RUN/server-combined.pem
  default_backend be_tls
backend be_tls
  option redis-check
  server r1 127.0.0.1:$P_REDIS ssl verify required ca-file $CA verifyhost localhost check inter 1s fall 2 rise 1
EOF
haproxy -c -q -f "$RUN/haproxy.cfg"
haproxy -db -f "$RUN/haproxy.cfg" > "$RUN/haproxy.log" 2>&1 &
p=$!; PIDS+=("$p"); PROXYPID[haproxy]=$p
tls_ping "$P_HAP" || { tail -20 "$RUN/haproxy.log" >&2; exit 1; }

log "run dir $RUN; redis TLS :$P_REDIS, geoproxy TLS :$P_GEO_TLS (threads $GEOPROXY_THREADS), haproxy :$P_HAP (nbthread $HAPROXY_THREADS); keys $KEY_TYPE"
for t in direct geoproxy haproxy; do
  v=$(timeout 5 openssl s_client -connect "127.0.0.1:${PORT[$t]}" -CAfile "$CA" -brief \
        </dev/null 2>&1 | sed -n 's/^\(Protocol version\|Ciphersuite\): //p' | paste -sd' ' || true)
  log "client TLS to $t: $v"
done

# ---- measurement -----------------------------------------------------------------------
ticks() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12+$13}'; }
hostcpu() { awk '/^cpu /{b=$2+$3+$4+$7+$8; t=b+$5+$6+$9; print b, t}' /proc/stat; }
HZ=$(getconf CLK_TCK)
declare -A WL=(
  [a]="-c 50 -n $N_A -t set,get -P 1"
  [b]="-c 50 -n $N_B -t set,get -P 16"
)
RAW="$RUN/raw.csv"
echo "workload,rep,target,test,rps,avg_ms,min_ms,p50_ms,p95_ms,p99_ms,max_ms,n,wall_s,proxy_cpu_s,redis_cpu_s,host_busy_pct" > "$RAW"

run_one() { # workload rep target
  local w=$1 r=$2 t=$3 port=${PORT[$3]} ppid=${PROXYPID[$3]} n
  n=$(sed -E 's/.*-n ([0-9]+).*/\1/' <<<"${WL[$w]}")
  redis-cli --tls --cacert "$CA" -p "$P_REDIS" flushall >/dev/null
  sleep 0.3
  local p0 r0 h0 t0 p1 r1 h1 t1 wall pc rc busy
  p0=$(ticks "$ppid"); r0=$(ticks "$REDIS_PID"); h0=$(hostcpu); t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  timeout 300 redis-benchmark --tls --cacert "$CA" -p "$port" ${WL[$w]} --csv \
    > "$RUN/out.$w.$r.$t.csv" 2> "$RUN/err.$w.$r.$t.log"
  t1=$(date +%s.%N)
  p1=$(ticks "$ppid"); r1=$(ticks "$REDIS_PID"); h1=$(hostcpu)
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
  pc=$(awk -v a="$p0" -v b="$p1" -v hz="$HZ" 'BEGIN{printf "%.3f", (b-a)/hz}')
  rc=$(awk -v a="$r0" -v b="$r1" -v hz="$HZ" 'BEGIN{printf "%.3f", (b-a)/hz}')
  busy=$(awk -v a="$h0" -v b="$h1" 'BEGIN{split(a,x," ");split(b,y," ");
        printf "%.1f", 100*(y[1]-x[1])/(y[2]-x[2])}')
  [ "$t" = direct ] && pc=0
  if [ "$(wc -l < "$RUN/out.$w.$r.$t.csv")" -lt 3 ]; then
    echo "redis-benchmark against $t gave no result:" >&2; cat "$RUN/err.$w.$r.$t.log" >&2; exit 1
  fi
  tail -n +2 "$RUN/out.$w.$r.$t.csv" | tr -d '"' | while IFS=, read -r tn rest; do
    echo "$w,$r,$t,$tn,$rest,$n,$wall,$pc,$rc,$busy" >> "$RAW"
  done
  log "wl=$w rep=$r $t: $(tail -n +2 "$RUN/out.$w.$r.$t.csv" | tr -d '"' | cut -d, -f1,2,5,7 | tr '\n' ' ')proxy_cpu=${pc}s wall=${wall}s"
}

TARGETS=(direct geoproxy haproxy)
for w in a b; do
  for r in $(seq 1 "$REPS"); do
    # rotate the order every repetition: no target always runs first or last
    for i in 0 1 2; do run_one "$w" "$r" "${TARGETS[$(( (i + r - 1) % 3 ))]}"; done
  done
done

grep -E 'WARN|ERROR' "$RUN/geoproxy.log" | head -5 >&2 || true

python3 - "$RAW" "$GEOPROXY_THREADS" "$HAPROXY_THREADS" <<'PY'
import csv, sys, statistics as st
from collections import defaultdict
WL = {"a": "(a) c50 P1", "b": "(b) c50 P16"}
rows = list(csv.DictReader(open(sys.argv[1])))
g = defaultdict(list)
for r in rows:
    g[(r["workload"], r["test"], r["target"])].append(r)
med = lambda rs, f: st.median(float(x[f]) for x in rs)
reps = max(len(v) for v in g.values())
print("\nTLS on both sides, medians of %d interleaved repetitions (geoproxy threads = %s, "
      "HAProxy nbthread %s). ratio = rps / direct rps in this run; proxy us/req = proxy CPU "
      "time / requests of both tests." % (reps, sys.argv[2], sys.argv[3]))
print("| workload | test | target | req/s | ratio | p50 ms | p99 ms | proxy us/req | host busy % |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for w in ("a", "b"):
    for test in ("SET", "GET"):
        d = g.get((w, test, "direct"))
        if not d:
            continue
        drps = med(d, "rps")
        for t in ("direct", "geoproxy", "haproxy"):
            rs = g.get((w, test, t))
            if not rs:
                continue
            rps = med(rs, "rps")
            reqs = 2 * float(rs[0]["n"])
            pu = "-" if t == "direct" else "%.2f" % (1e6 * med(rs, "proxy_cpu_s") / reqs)
            print("| %s | %s | %s | %.0f | %.2f | %.3f | %.3f | %s | %.0f |" % (
                WL[w], test, t, rps, rps / drps, med(rs, "p50_ms"), med(rs, "p99_ms"), pu,
                med(rs, "host_busy_pct")))
PY

for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
PIDS=()
fi

# ---- moving 1000 sessions to a TLS member (and to a plain one) ---------------------------
if [ -z "${SKIP_MOVE:-}" ]; then
  log "moving $MOVE_CLIENTS sessions: $MOVE_REPS trials each of TLS and plain members, alternating"
  python3 "$HERE/tls_sessions.py" --ca "$CA" --cert "$RUN/server.pem" --key "$RUN/server.key" \
    --geoproxy "$GEOPROXY_BIN" --clients "$MOVE_CLIENTS" --reps "$MOVE_REPS" \
    --threads "$GEOPROXY_THREADS" --dir "$RUN" --json "$RUN/move.jsonl" &
  p=$!; PIDS+=("$p")
  wait "$p"
  PIDS=()
fi
log "done (run dir $RUN${KEEP:+, kept})"
