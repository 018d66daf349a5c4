#!/usr/bin/env python3
"""benches/c1_rounds.py - one client (redis-benchmark -c 1 GET), geoproxy multiplexed
against geoproxy 1:1, in many short rounds.

Goal (c) of issue 11 asks that a client alone be no slower multiplexed than with
multiplex = false. On this shared host a 50 000-request run's rate swings by 10-20 %
within a minute, so this script starts redis-server on 7001 and the targets itself, then
runs ROUNDS rounds of one short redis-benchmark run (N GETs, a new connection each) per
target, in a shuffled order each round, and reports the median of the per-round ratios
of the first target to each other one and the rounds it won.

Targets: geoproxy multiplexed on 7501 and 1:1 on 7601 (both GEOPROXY_BIN, default
target/release/geoproxy), and with BIN2 set, that binary multiplexed on 7701 (to compare
two builds). One worker each, as in peers.sh. Env knobs: ROUNDS=40 N=5000.

Unlike c1_latency.py (a Python client on two connections kept open), this uses Redis's
own C client and fresh connections, as peers.sh's (c) does.
"""
import os
import random
import statistics
import subprocess
import sys
import time

BIN = os.environ.get("GEOPROXY_BIN", "target/release/geoproxy")
ROUNDS = int(os.environ.get("ROUNDS", "40"))
N = int(os.environ.get("N", "5000"))
CONFIG = """[proxy]
listen = "127.0.0.1:{port}"
mode = "colocated"
multiplex = {multiplex}

[admin]
listen = "127.0.0.1:{admin}"

[[members]]
id = "local"
address = "127.0.0.1:7001"
region = "local"
"""


def rate(port):
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-c", "1", "-n", str(N), "-t", "get", "--csv"],
        capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1].split(",")[1].strip('"'))


def wait_ping(port):
    for _ in range(100):
        r = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
        if r.stdout.strip() == "PONG":
            return
        time.sleep(0.1)
    sys.exit(f"no PONG on port {port}")


def main():
    targets = [(7501, "true", BIN), (7601, "false", BIN)]
    if os.environ.get("BIN2"):
        targets.append((7701, "true", os.environ["BIN2"]))
    run = os.environ.get("RUN") or subprocess.run(
        ["mktemp", "-d"], capture_output=True, text=True).stdout.strip()
    procs = [subprocess.Popen(
        ["redis-server", "--port", "7001", "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--logfile", f"{run}/redis.log"])]
    try:
        for port, multiplex, binary in targets:
            path = f"{run}/geoproxy-{port}.toml"
            with open(path, "w") as f:
                f.write(CONFIG.format(port=port, admin=port + 1, multiplex=multiplex))
            procs.append(subprocess.Popen(
                [binary, "--config", path], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        for port in [7001] + [t[0] for t in targets]:
            wait_ping(port)
        subprocess.run(["redis-cli", "-p", "7001", "set", "key:__rand_int__", "xxx"],
                       capture_output=True, check=True)
        rates = {port: [] for port, _, _ in targets}
        for port in rates:
            rate(port)  # warm up
        for _ in range(ROUNDS):
            order = list(rates)
            random.shuffle(order)
            for port in order:
                rates[port].append(rate(port))
    finally:
        for p in procs:
            p.kill()
    first = targets[0][0]
    for port, multiplex, binary in targets:
        line = f"{port} ({binary}, multiplex = {multiplex}): median {statistics.median(rates[port]):.0f} requests/s"
        if port != first:
            ratios = [a / b for a, b in zip(rates[first], rates[port])]
            line += (f"; {first}/{port} per round: median {statistics.median(ratios):.3f}, "
                     f"{first} faster in {sum(r > 1 for r in ratios)}/{ROUNDS}")
        print(line)


if __name__ == "__main__":
    main()
