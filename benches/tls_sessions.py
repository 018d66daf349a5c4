#!/usr/bin/env python3
"""tls_sessions.py: "moving 1000 sessions to a TLS member", TLS members and plain members in
one run (called by benches/tls.sh, which makes the certificates; usable alone).

Each trial starts fresh: two redis-server members A and B on free ports (with TLS: only a
`--tls-port`, `--port 0`), geoproxy in front of them (plain client listener; member A
preferred by region; health interval 1s; failback_after "60s"), then:

  1. opens N client connections through geoproxy (default 1000), each sends PING and gets
     +PONG, so every session is attached to member A (checked with A's INFO clients);
  2. starts tcpdump on B's port (if tcpdump is there) to classify the TLS handshakes B makes;
  3. SIGKILLs member A, and at once every client sends PING: a client that gets an error
     reply retries at once, a client whose connection closes reconnects and retries;
  4. reports the time from the kill to the last client's +PONG (and p50 / p99 over
     clients), error replies, disconnects, B's new connections, geoproxy's switch and
     session-move metrics, and the ServerHellos B sent: TLS 1.3 full handshakes vs resumed
     ones (a pre_shared_key extension in the ServerHello), read from the capture.

Trials alternate TLS and plain members (tls, plain, tls, plain, ...), REPS of each; the
table gives every trial and the medians.

    python3 benches/tls_sessions.py --ca DIR/ca.pem --cert DIR/server.pem --key DIR/server.key \
        [--clients 1000] [--reps 3] [--threads 1] [--geoproxy target/release/geoproxy]

Python 3 standard library only; needs redis-server with TLS (Debian's has it) and, for the
handshake count, tcpdump. Every process it starts is killed when it ends, also on Ctrl-C or
SIGTERM.
"""
import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time

now = time.monotonic
PROCS = []


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def spawn(argv, log_path):
    log = open(log_path, "wb")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    PROCS.append(p)
    return p


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_all():
    while PROCS:
        stop(PROCS.pop())


def pct(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


# ---- RESP over asyncio ---------------------------------------------------------------


async def read_reply(r):
    line = await r.readline()
    if not line:
        raise ConnectionError("closed")
    t = line[:1]
    if t in (b"+", b"-", b":"):
        return line[:-2]
    if t == b"$":
        n = int(line[1:-2])
        if n < 0:
            return None
        data = await r.readexactly(n + 2)
        return data[:-2]
    if t == b"*":
        return [await read_reply(r) for _ in range(int(line[1:-2]))]
    raise ValueError("bad reply %r" % line)


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


async def command(port, *args, ctx=None, timeout=2.0):
    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        try:
            w.write(resp(*args))
            await w.drain()
            return await read_reply(r)
        finally:
            w.close()
    return await asyncio.wait_for(go(), timeout)


def info_field(text, name):
    m = re.search(rb"^%s:(\S+)" % name.encode(), text, re.M)
    return m.group(1).decode() if m else None


async def http_get(port, path):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(("GET %s HTTP/1.0\r\nHost: x\r\n\r\n" % path).encode())
    await w.drain()
    data = await asyncio.wait_for(r.read(), 3)
    w.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


async def wait_until(pred, timeout, what):
    end = now() + timeout
    while now() < end:
        try:
            if await pred():
                return
        except (OSError, asyncio.TimeoutError, ValueError, ConnectionError):
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("timed out waiting for " + what)


# ---- the capture: which handshakes B resumed ---------------------------------------------


def server_hellos(pcap_path, server_port):
    """Classify the first ServerHello of every connection from server_port in a pcap file.
    Returns a dict: tls13_full, tls13_resumed, tls12, hrr, connections."""
    counts = {"tls13_full": 0, "tls13_resumed": 0, "tls12": 0, "hrr": 0}
    seen = set()
    hrr_random = bytes.fromhex(
        "CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
    with open(pcap_path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return dict(counts, connections=0)
        endian = "<" if head[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        linktype = struct.unpack(endian + "I", head[20:24])[0]
        link_len = {1: 14, 113: 16, 276: 20, 0: 4}.get(linktype, 14)
        while True:
            ph = f.read(16)
            if len(ph) < 16:
                break
            incl = struct.unpack(endian + "IIII", ph)[2]
            pkt = f.read(incl)
            ip = pkt[link_len:]
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
                continue
            tcp = ip[(ip[0] & 15) * 4:]
            if len(tcp) < 20:
                continue
            sport, dport = struct.unpack("!HH", tcp[:4])
            if sport != server_port or dport in seen:
                continue
            pl = tcp[(tcp[12] >> 4) * 4:]
            # a handshake record (0x16) whose first message is a ServerHello (2)
            if len(pl) < 44 or pl[0] != 0x16 or pl[5] != 2:
                continue
            seen.add(dport)
            body = pl[9:]
            random = body[2:34]
            i = 34
            i += 1 + body[i]           # session id
            i += 3                      # cipher suite, compression
            exts = {}
            if i + 2 <= len(body):
                end = i + 2 + struct.unpack("!H", body[i:i + 2])[0]
                i += 2
                while i + 4 <= min(end, len(body)):
                    et, el = struct.unpack("!HH", body[i:i + 4])
                    exts[et] = body[i + 4:i + 4 + el]
                    i += 4 + el
            if random == hrr_random:
                counts["hrr"] += 1
            elif exts.get(0x002B) == b"\x03\x04":
                counts["tls13_resumed" if 0x0029 in exts else "tls13_full"] += 1
            else:
                counts["tls12"] += 1
    counts["connections"] = len(seen)
    return counts


# ---- one trial ------------------------------------------------------------------------


async def start_member(args, d, name, port, tls):
    argv = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", d, "--logfile", os.path.join(d, name + ".log"), "--maxclients", "10000"]
    if tls:
        argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", args.cert,
                 "--tls-key-file", args.key, "--tls-ca-cert-file", args.ca,
                 "--tls-auth-clients", "no"]
    else:
        argv += ["--port", str(port)]
    p = spawn(argv, os.path.join(d, name + ".out"))
    ctx = client_ctx(args) if tls else None
    await wait_until(lambda: ping(port, ctx), 10, "member %s" % name)
    return p


async def ping(port, ctx):
    return await command(port, "PING", ctx=ctx, timeout=1) == b"+PONG"


def client_ctx(args):
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.check_hostname = False
    return ctx


class Client:
    def __init__(self, port):
        self.port = port
        self.r = self.w = None

    async def connect(self):
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)

    async def ping(self):
        self.w.write(b"*1\r\n$4\r\nPING\r\n")
        await self.w.drain()
        return await read_reply(self.r)

    def close(self):
        if self.w:
            self.w.close()


async def after_kill(c, t0, res, deadline):
    """Until a +PONG: PING, retrying at once on an error reply, reconnecting on a close."""
    while now() < deadline:
        try:
            if c.w is None:
                await c.connect()
            reply = await asyncio.wait_for(c.ping(), max(0.1, deadline - now()))
            if reply == b"+PONG":
                res["times"].append(now() - t0)
                return
            res["errors"][reply.decode(errors="replace")[:60]] = \
                res["errors"].get(reply.decode(errors="replace")[:60], 0) + 1
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            res["disconnects"] += 1
            c.close()
            c.w = None
            await asyncio.sleep(0.01)
        except asyncio.TimeoutError:
            res["timeouts"] += 1
            c.close()
            c.w = None
    res["never"] += 1


def metric_lines(text, name):
    return [l for l in text.splitlines() if l.startswith(name) and not l.startswith("#")]


async def trial(args, tls, idx):
    d = tempfile.mkdtemp(prefix="tls-move-%s-" % ("tls" if tls else "plain"), dir=args.dir)
    pa, pb, listen, admin = free_ports(4)
    kind = "tls" if tls else "plain"
    ctx = client_ctx(args) if tls else None
    try:
        a = await start_member(args, d, "a", pa, tls)
        await start_member(args, d, "b", pb, tls)
        member_tls = ('tls = true\ntls_ca_file = "%s"\n' % args.ca) if tls else ""
        conf = os.path.join(d, "geoproxy.toml")
        with open(conf, "w") as f:
            f.write(f"""[proxy]
listen = "127.0.0.1:{listen}"
mode = "colocated"
region = "a"
threads = {args.threads}

[admin]
listen = "127.0.0.1:{admin}"

[health]
interval = "1s"

[failover]
failback_after = "60s"

[[members]]
id = "a"
address = "127.0.0.1:{pa}"
region = "a"
{member_tls}
[[members]]
id = "b"
address = "127.0.0.1:{pb}"
region = "b"
{member_tls}""")
        gp = spawn([args.geoproxy, "--config", conf], os.path.join(d, "geoproxy.log"))

        async def both_up():
            st = json.loads(await http_get(admin, "/v1/status"))
            return st["active_member"] == "a" and all(
                m["state"] == "up" for m in st["members"])
        await wait_until(both_up, 15, "geoproxy with both members up")

        # 1. N sessions attached to A
        clients = [Client(listen) for _ in range(args.clients)]
        sem = asyncio.Semaphore(200)

        async def attach(c):
            async with sem:
                await c.connect()
                rep = await asyncio.wait_for(c.ping(), 10)
                if rep != b"+PONG":
                    raise RuntimeError("attach: %r" % rep)
        await asyncio.gather(*(attach(c) for c in clients))
        info_a = await command(pa, "INFO", "clients", ctx=ctx)
        on_a = int(info_field(info_a, "connected_clients")) - 1
        stats_b0 = await command(pb, "INFO", "stats", ctx=ctx)
        conns_b0 = int(info_field(stats_b0, "total_connections_received"))

        # 2. capture B's side of the handshakes
        cap = None
        pcap = os.path.join(d, "b.pcap")
        if tls and shutil.which("tcpdump") and not args.no_capture:
            cap = subprocess.Popen(
                ["tcpdump", "-i", "lo", "-n", "-s", "600", "-B", "32768", "-U", "-w", pcap,
                 "tcp src port %d" % pb], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            PROCS.append(cap)
            # tcpdump says "listening on lo" once the capture is open
            line = await asyncio.get_running_loop().run_in_executor(None, cap.stderr.readline)
            if b"listening" not in line:
                raise RuntimeError("tcpdump: %r" % line)
            await asyncio.sleep(0.3)

        # 3. kill A; every client sends PING at once
        res = {"times": [], "errors": {}, "disconnects": 0, "timeouts": 0, "never": 0}
        t0 = now()
        a.send_signal(signal.SIGKILL)
        deadline = t0 + args.deadline
        await asyncio.gather(*(after_kill(c, t0, res, deadline) for c in clients))
        total = now() - t0
        a.wait()

        await asyncio.sleep(0.5)
        handshakes = None
        if cap:  # stopped before our own INFO connection to B, which it would count
            stop(cap, signal.SIGINT)
            handshakes = server_hellos(pcap, pb)
        stats_b1 = await command(pb, "INFO", "stats", ctx=ctx)
        info_b1 = await command(pb, "INFO", "clients", ctx=ctx)
        metrics = await http_get(admin, "/metrics")
        for c in clients:
            c.close()
        moves = metric_lines(metrics, "geoproxy_session_move_duration_seconds_")
        switches = [l for l in metric_lines(metrics, "geoproxy_switches_total")
                    if "initial" not in l]
        ts = res["times"]
        out = {
            "trial": idx, "members": kind, "clients": args.clients, "attached_to_a": on_a,
            "recovered": len(ts), "never": res["never"],
            "last_ms": 1000 * max(ts) if ts else None,
            "p50_ms": 1000 * pct(ts, 50), "p99_ms": 1000 * pct(ts, 99),
            "errors": res["errors"], "disconnects": res["disconnects"],
            "timeouts": res["timeouts"],
            # less the INFO connection that asked (the count includes it)
            "b_new_connections": int(info_field(stats_b1, "total_connections_received"))
            - conns_b0 - 1,
            "b_clients": int(info_field(info_b1, "connected_clients")) - 1,
            "switches": [l.replace("geoproxy_switches_total", "") for l in switches],
            "move_count": next((l.split()[-1] for l in moves if "_count" in l), None),
            "move_sum_s": next((l.split()[-1] for l in moves if "_sum" in l), None),
            "handshakes": handshakes,
            "wall_s": round(total, 3),
        }
        for c in clients:
            c.close()
        stop(gp)
        return out
    finally:
        stop_all()


def fmt_hs(h):
    if not h:
        return "-"
    s = "%d full / %d resumed" % (h["tls13_full"], h["tls13_resumed"])
    if h["tls12"] or h["hrr"]:
        s += " (+%d TLS 1.2, %d HRR)" % (h["tls12"], h["hrr"])
    return s


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--geoproxy", default=os.environ.get("GEOPROXY_BIN",
                                                         "target/release/geoproxy"))
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="geoproxy proxy.threads")
    ap.add_argument("--deadline", type=float, default=20.0,
                    help="seconds after the kill a client may take")
    ap.add_argument("--modes", default="tls,plain")
    ap.add_argument("--no-capture", action="store_true")
    ap.add_argument("--dir", default=None, help="where trial directories go")
    ap.add_argument("--json", default=None, help="append one JSON object per trial here")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 65536))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 3 * args.clients + 200:
        sys.exit("fd limit %d too low for %d clients" % (want, args.clients))
    modes = [m == "tls" for m in args.modes.split(",")]
    results = []
    for i in range(args.reps):
        for tls in modes:
            r = await trial(args, tls, i + 1)
            results.append(r)
            print("  move %s #%d: %d on A; last %.0f ms, p50 %.0f, p99 %.0f, recovered %d/%d, "
                  "errors %s, disconnects %d, B new conns %d, handshakes %s"
                  % (r["members"], r["trial"], r["attached_to_a"], r["last_ms"] or -1, r["p50_ms"], r["p99_ms"],
                     r["recovered"], r["clients"], r["errors"] or 0, r["disconnects"],
                     r["b_new_connections"], fmt_hs(r["handshakes"])),
                  file=sys.stderr, flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print("\nMoving %d sessions: SIGKILL of member A, then every client sends PING; time "
          "from the kill to each client's +PONG (geoproxy threads = %d)."
          % (args.clients, args.threads))
    print("| members | trial | last reply (ms) | p50 / p99 (ms) | recovered | error replies | "
          "disconnects | B new conns | B handshakes (TLS 1.3 full / resumed) | "
          "session moves (count, mean ms) | switches |")
    print("|---|---|---:|---|---:|---|---:|---:|---|---|---|")
    for r in results:
        mean = ("%.1f" % (1000 * float(r["move_sum_s"]) / float(r["move_count"]))
                if r["move_count"] and float(r["move_count"]) else "-")
        print("| %s | %d | %.0f | %.0f / %.0f | %d/%d | %s | %d | %d | %s | %s, %s | %s |" % (
            r["members"], r["trial"], r["last_ms"] or -1, r["p50_ms"], r["p99_ms"],
            r["recovered"], r["clients"],
            ", ".join("%s ×%d" % kv for kv in r["errors"].items()) or "0",
            r["disconnects"], r["b_new_connections"], fmt_hs(r["handshakes"]),
            r["move_count"], mean, "; ".join(r["switches"]) or "-"))
    for kind in ("tls", "plain"):
        rs = [r for r in results if r["members"] == kind and r["last_ms"] is not None]
        if rs:
            print("| %s | median | %.0f | %.0f / %.0f | | | | | | | |" % (
                kind, statistics.median(r["last_ms"] for r in rs),
                statistics.median(r["p50_ms"] for r in rs),
                statistics.median(r["p99_ms"] for r in rs)))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        stop_all()
