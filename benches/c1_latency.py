#!/usr/bin/env python3
"""benches/c1_latency.py PORT_A PORT_B [BLOCKS] - one client's round trip, two targets.

Goal (c) of issue 11 compares one client (no pipelining) through geoproxy multiplexed and
with multiplex = false. On this shared host a redis-benchmark run's rate swings by 20-50 %
within a minute, more than the difference being measured. This script alternates blocks
of 2000 GETs between two already running targets (one connection each, the same 36-byte
GET), so both see the same host conditions, and reports each target's median time per
request and the median per-block difference: a systematic gap of a microsecond shows.

Start the targets first (redis on 7001 with key:__rand_int__ set, geoproxy on the ports
to compare); see benches/README.md for the commands used.
"""
import socket
import statistics
import sys
import time

GET = b"*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n"
PER_BLOCK = 2000


def connect(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def block(s):
    t0 = time.perf_counter()
    for _ in range(PER_BLOCK):
        s.sendall(GET)
        if not s.recv(100):
            sys.exit("connection closed")
    return (time.perf_counter() - t0) / PER_BLOCK * 1e6


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    a, b = int(sys.argv[1]), int(sys.argv[2])
    blocks = int(sys.argv[3]) if len(sys.argv) == 4 else 30
    sa, sb = connect(a), connect(b)
    block(sa), block(sb)  # warm up
    ta, tb = [], []
    for _ in range(blocks):
        ta.append(block(sa))
        tb.append(block(sb))
    diff = [x - y for x, y in zip(ta, tb)]
    print(f"{a}: median {statistics.median(ta):.1f} us/request")
    print(f"{b}: median {statistics.median(tb):.1f} us/request")
    print(f"{a} faster in {sum(d < 0 for d in diff)}/{blocks} blocks; "
          f"median per-block difference {a} - {b}: {statistics.median(diff):+.2f} us")


if __name__ == "__main__":
    main()
