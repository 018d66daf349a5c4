#!/usr/bin/env python3
"""failover.py: how geoproxy and HAProxy behave when a member fails, measured in one run.

For each scenario and proxy it starts fresh: two redis-server members on free ports (A
preferred, B the failover target), the proxy in front, N long-lived clients that each send
PING (or GET) at a steady rate with a per-request timeout, injects a fault at a fixed time,
runs on, and prints one Markdown table row per scenario and proxy.

    cargo build --release && python3 benches/failover.py
    python3 benches/failover.py --scenarios kill,stop --proxies geoproxy
    python3 benches/failover.py --list                 # the scenarios

The check scenarios (availability-503, availability-lag, replication-cut, keyspace-oom,
custom-fail, majority-one-failing) run geoproxy only: they drive geoproxy's own check kinds
(a Redis Software REST API and an Active-Active pub/sub bridge are played here), which the
reference HAProxy configuration has no equivalent of.

Python 3 standard library only. Needs redis-server (7.x) and haproxy on PATH, openssl for
the availability scenarios (a self-signed certificate), and the geoproxy binary
(target/release/geoproxy, or GEOPROXY_BIN). Every process it starts is in its own process
group and is killed when the run ends, whatever happens.
"""
import argparse
import asyncio
import base64
import collections
import dataclasses
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
now = time.monotonic

# ---------------------------------------------------------------------------------------
# Small helpers: ports, processes, RESP, HTTP
# ---------------------------------------------------------------------------------------


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
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


PROCS = []  # every process started, killed by kill_all()


def spawn(argv, log_path, **kw):
    """Start a process in its own process group, output to log_path."""
    log = open(log_path, "ab")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, **kw)
    log.close()
    PROCS.append(p)
    return p


def kill_group(p):
    for sig in (signal.SIGCONT, signal.SIGKILL):  # SIGCONT first: a stopped member
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    if isinstance(p, subprocess.Popen):
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def kill_all():
    while PROCS:
        kill_group(PROCS.pop())


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
    except OSError:
        return ""


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


async def read_reply(r):
    """One RESP2 reply (simple, error, integer, bulk; arrays of those). EOF -> ConnectionError."""
    line = await r.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("eof")
    t = line[:1]
    if t == b"$":
        n = int(line[1:-2])
        if n >= 0:
            line += await r.readexactly(n + 2)
    elif t == b"*":
        for _ in range(max(0, int(line[1:-2]))):
            line += await read_reply(r)
    return line


if hasattr(asyncio, "timeout"):  # 3.11+: no extra task per request (matters at 6000 clients)
    async def within(seconds, aw):
        async with asyncio.timeout(seconds):
            return await aw
else:
    def within(seconds, aw):
        return asyncio.wait_for(aw, seconds)


async def redis_cmd(port, *args, timeout=1.0):
    """One command on a fresh connection to 127.0.0.1:port; returns the raw reply."""
    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(resp(*args))
            return await read_reply(r)
        finally:
            w.close()
    return await asyncio.wait_for(go(), timeout)


def bulk_text(reply):
    """Payload of a bulk reply as text."""
    return reply.split(b"\r\n", 1)[1].rsplit(b"\r\n", 1)[0].decode(errors="replace")


def array_items(reply):
    """Elements of a flat RESP2 array reply: bulk strings as bytes, the others as their line."""
    items, i = [], reply.index(b"\r\n") + 2
    while i < len(reply):
        j = reply.index(b"\r\n", i)
        if reply[i:i + 1] == b"$" and int(reply[i + 1:j]) >= 0:
            n = int(reply[i + 1:j])
            items.append(reply[j + 2:j + 2 + n])
            i = j + 2 + n + 2
        else:
            items.append(reply[i:j])
            i = j + 2
    return items


async def http_get(port, path, timeout=1.0):
    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path.encode())
            data = await r.read()
        finally:
            w.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            body = dechunk(body)
        return int(head.split()[1]), body.decode(errors="replace")
    return await asyncio.wait_for(go(), timeout)


def dechunk(body):
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out += rest[:n]
        body = rest[n + 2:]
    return out


async def wait_until(pred, timeout, step=0.05):
    """Poll an async predicate until true or timeout; returns the last value."""
    end = now() + timeout
    while True:
        try:
            v = await pred()
        except (OSError, asyncio.TimeoutError, ConnectionError, ValueError, IndexError):
            v = None
        if v or now() >= end:
            return v
        await asyncio.sleep(step)


def host_cpu():
    """(busy, total) jiffies of the whole host, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, sum(v[:8])


def pct(values, p):
    """Nearest-rank percentile of a sorted list."""
    if not values:
        return None
    return values[max(0, min(len(values) - 1, math.ceil(p * len(values)) - 1))]


def ms(x):
    return "never" if x is None else "%d" % round(x * 1000)


def secs(x):
    return "never" if x is None else "%.1f s" % x


# ---------------------------------------------------------------------------------------
# The fault relay (a separate process: `failover.py --relay LISTEN_PORT UPSTREAM_PORT`)
# ---------------------------------------------------------------------------------------
# Commands on stdin, one per line, each acknowledged with "ok" on stdout:
#   pass                 forward (the default)
#   drop                 black hole: keep connections open, accept new ones, forward nothing
#   reset                close every connection with RST (SO_LINGER 0) and stop listening
#                        (new connects are refused)
#   listen               listen again (after reset); new connections forward
#   delay CONNECT DATA   wait CONNECT s before connecting upstream; delay each chunk DATA s
#                        in each direction (order kept)


class RelayConn:
    def __init__(self, w):
        self.w, self.up, self.dropping = w, None, False

    def abort(self):
        for w in (self.w, self.up):
            if w is None:
                continue
            try:
                w.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
            w.transport.abort()


class Relay:
    def __init__(self, port, upstream):
        self.port, self.upstream = port, upstream
        self.mode, self.connect_delay, self.data_delay = "pass", 0.0, 0.0
        self.conns, self.server = set(), None

    async def listen(self):
        if self.server is None:
            self.server = await asyncio.start_server(
                self.handle, "127.0.0.1", self.port, reuse_address=True, backlog=1024)

    async def handle(self, r, w):
        c = RelayConn(w)
        self.conns.add(c)
        try:
            if self.mode == "drop":
                c.dropping = True
                while await r.read(65536):
                    pass
                return
            if self.connect_delay:
                await asyncio.sleep(self.connect_delay)
            ur, c.up = await asyncio.open_connection("127.0.0.1", self.upstream)
            if self.mode == "drop":
                c.dropping = True
            a = asyncio.ensure_future(self.pump(r, c.up, c))
            b = asyncio.ensure_future(self.pump(ur, w, c))
            await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
            a.cancel()
            b.cancel()
        except (OSError, ConnectionError):
            pass
        finally:
            self.conns.discard(c)
            for x in (w, c.up):
                if x is not None:
                    x.close()

    async def pump(self, src, dst, c):
        q = asyncio.Queue()

        async def writer():
            while True:
                due, data = await q.get()
                if due > now():
                    await asyncio.sleep(due - now())
                dst.write(data)
                await dst.drain()
        wt = asyncio.ensure_future(writer())
        try:
            while True:
                data = await src.read(65536)
                if not data or wt.done():
                    return
                if not c.dropping:
                    q.put_nowait((now() + self.data_delay, data))
        except (OSError, ConnectionError):
            return
        finally:
            wt.cancel()

    async def command(self, line):
        cmd = line.split()
        if cmd[0] in ("pass", "drop"):
            self.mode = cmd[0]
            for c in self.conns:
                c.dropping = cmd[0] == "drop"
        elif cmd[0] == "reset":
            self.mode = "pass"
            if self.server is not None:
                self.server.close()
                self.server = None
            for c in list(self.conns):
                c.abort()
        elif cmd[0] == "listen":
            self.mode = "pass"
            await self.listen()
        elif cmd[0] == "delay":
            self.connect_delay, self.data_delay = float(cmd[1]), float(cmd[2])


async def relay_main(port, upstream):
    relay = Relay(port, upstream)
    await relay.listen()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("ready", flush=True)
    while True:
        line = (await stdin.readline()).decode().strip()
        if not line:
            return  # parent gone
        await relay.command(line)
        print("ok", flush=True)


class RelayControl:
    """The parent's handle on a relay process."""

    @classmethod
    async def start(cls, port, upstream, log_path):
        self = cls()
        self.port = port
        log = open(log_path, "ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--relay", str(port), str(upstream),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        log.close()
        PROCS.append(self.proc)  # killed with the others; stop() reaps it
        line = await asyncio.wait_for(self.proc.stdout.readline(), 10)
        if line.strip() != b"ready":
            raise RuntimeError("relay did not start: %r" % line)
        return self

    async def stop(self):
        kill_group(self.proc)
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except asyncio.TimeoutError:
            pass

    async def send(self, cmd):
        self.proc.stdin.write(cmd.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 5)
        if line.strip() != b"ok":
            raise RuntimeError("relay: %s -> %r" % (cmd, line))


# ---------------------------------------------------------------------------------------
# Stand-ins for Redis Software: the REST API's availability requests, and Active-Active
# replication of pub/sub (both in this process's event loop: a few requests a second)
# ---------------------------------------------------------------------------------------

API_USER, API_PASSWORD, API_BDB = "geoproxy@example.com", "api-s3cret", 1
API_PATH = "/v1/local/bdbs/%d/endpoint/availability" % API_BDB
HTTP_REASONS = {200: b"OK", 401: b"Unauthorized", 404: b"Not Found",
                405: b"Method Not Allowed", 503: b"Service Unavailable"}
API_DESCRIPTIONS = {
    "bdb_endpoint_unavailable": "The endpoint is not available on this node",
    "bdb_unavailable": "The database is not available",
    "bdb_unavailable_lag": "The database's replication lag exceeds the tolerance",
}


def self_signed_cert(d):
    """A server context for 127.0.0.1 with a self-signed certificate made by openssl in d."""
    key, cert = os.path.join(d, "api-key.pem"), os.path.join(d, "api-cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


class RestApi:
    """One member's Redis Software REST API, as far as the availability check goes: HTTPS,
    Basic auth, GET API_PATH answers 200, or 503 with {"error_code", "description"}; with
    ?extend_check=lag (the lag-aware request) it answers `lag` instead of `plain`. Anything
    else: 401 (wrong credentials) or 404. HTTP/1.1 with keep-alive."""

    def __init__(self):
        self.plain = self.lag = None  # None: 200, else the error_code of a 503
        self.requests = collections.Counter()  # "plain" / "lag" -> count
        self.server = None

    async def start(self, ctx):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = "https://127.0.0.1:%d" % self.port
        return self

    def close(self):
        if self.server is not None:
            self.server.close()

    def answer(self, path, headers):
        auth = "Basic " + base64.b64encode(("%s:%s" % (API_USER, API_PASSWORD)).encode()).decode()
        if headers.get("authorization") != auth:
            return 401, {"error_code": "unauthorized", "description": "wrong credentials"}
        route, _, query = path.partition("?")
        if route != API_PATH:
            return 404, {"error_code": "not_found", "description": route}
        kind = "lag" if "extend_check=lag" in query else "plain"
        self.requests[kind] += 1
        code = self.lag if kind == "lag" else self.plain
        if code is None:
            return 200, {}
        return 503, {"error_code": code, "description": API_DESCRIPTIONS.get(code, code)}

    async def handle(self, r, w):
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                lines = head.decode(errors="replace").split("\r\n")
                method, path = (lines[0].split() + ["", ""])[:2]
                headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                               (l.partition(":") for l in lines[1:] if l))
                n = int(headers.get("content-length", "0"))
                if n:
                    await r.readexactly(n)
                status, body = self.answer(path, headers) if method == "GET" else (405, {})
                body = json.dumps(body).encode()
                w.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (
                            status, HTTP_REASONS[status], len(body), body))
                await w.drain()
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ssl.SSLError):
            pass
        finally:
            w.close()


class Bridge:
    """Active-Active replication of pub/sub, played between plain redis-server members:
    PSUBSCRIBE geoproxy:* on each member, and each message first seen on one member is
    PUBLISHed on the other, unless that direction is cut (then it is dropped). Its copy,
    when it comes back on the subscription, is recognized and not sent back."""

    def __init__(self, ports):
        self.ports = ports  # {member id: port}
        self.cut = set()    # (from, to) directions that forward nothing
        self.pending = {m: set() for m in ports}  # (channel, payload) forwarded to m, not seen yet
        self.forwarded, self.dropped = collections.Counter(), collections.Counter()
        self.writers, self.tasks = {}, []

    async def start(self):
        for m, port in self.ports.items():
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(resp("PSUBSCRIBE", "geoproxy:*"))
            await asyncio.wait_for(read_reply(r), 2)  # subscribed before the proxy starts
            pr, pw = await asyncio.open_connection("127.0.0.1", port)
            self.writers[m] = [w, pw]
            self.tasks += [asyncio.ensure_future(self.listen(m, r)),
                           asyncio.ensure_future(self.discard(pr))]
        return self

    async def listen(self, m, r):
        try:
            while True:
                items = array_items(await read_reply(r))
                if len(items) != 4 or items[0] != b"pmessage":
                    continue
                key = (items[2], items[3])
                if key in self.pending[m]:  # our own copy
                    self.pending[m].discard(key)
                    continue
                for to in self.ports:
                    if to == m:
                        continue
                    if (m, to) in self.cut:
                        self.dropped[m, to] += 1
                        continue
                    self.pending[to].add(key)
                    self.forwarded[m, to] += 1
                    self.writers[to][1].write(resp("PUBLISH", *key))
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass

    async def discard(self, r):
        """The publishing connection's replies (subscriber counts)."""
        try:
            while await read_reply(r):
                pass
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass

    async def stop(self):
        for t in self.tasks:
            t.cancel()
        await asyncio.wait(self.tasks, timeout=5)
        for ws in self.writers.values():
            for w in ws:
                w.close()


# ---------------------------------------------------------------------------------------
# Members and proxies
# ---------------------------------------------------------------------------------------


async def start_redis(port, d, name):
    p = spawn(["redis-server", "--save", "", "--appendonly", "no",
               "--enable-debug-command", "local", "--port", str(port), "--bind", "127.0.0.1",
               "--dir", d], os.path.join(d, "redis-%s.log" % name))
    ok = await wait_until(lambda: redis_cmd(port, "PING", timeout=0.5), 10)
    if ok != b"+PONG\r\n":
        raise RuntimeError("redis-server %s on %d did not start:\n%s" % (
            name, port, tail(os.path.join(d, "redis-%s.log" % name))))
    return p


def geoproxy_config(args, listen, admin, a_addr, b_addr, checks="", apis=None):
    """The settings this tool changes from geoproxy's defaults, and the TOML it writes.
    checks: more of [health] (keys, then check tables); apis: each member's REST API URL."""
    api = ["", ""] if apis is None else [
        'api = "%s"\nbdb = %d\n' % (url, API_BDB) for url in apis]
    return """\
[proxy]
listen = "127.0.0.1:%d"
mode = "colocated"
reply_timeout = "%s"

[admin]
listen = "127.0.0.1:%d"

[[members]]
id = "a"
address = "127.0.0.1:%d"
region = "region-a"
%s
[[members]]
id = "b"
address = "127.0.0.1:%d"
region = "region-b"
%s
[health]
interval = "1s"
timeout = "500ms"
rise = 2
fall = 2
%s
[failover]
failback = "auto"
failback_after = "%s"
""" % (listen, args.reply_timeout, admin, a_addr, api[0], b_addr, api[1],
       checks and "\n" + checks, args.failback_after)


def haproxy_config(args, listen, sock, a_addr, b_addr, maxconn):
    """As ../shared/bench/peers.sh, with A primary and B backup."""
    srv = "check inter 1s fall 2 rise 2 on-marked-down shutdown-sessions"
    return """\
global
  maxconn %d
  stats socket %s mode 600 level admin
defaults
  mode tcp
  timeout connect 2s
  timeout check 500ms
  timeout client 1h
  timeout server 1h
frontend fe_redis
  bind 127.0.0.1:%d
  default_backend be_redis
backend be_redis
  option redis-check
  server a 127.0.0.1:%d %s
  server b 127.0.0.1:%d %s backup
""" % (maxconn, sock, listen, a_addr, srv, b_addr, srv)


class GeoProxy:
    name = "geoproxy"
    last_status = None  # the last /v1/status read by observe()

    async def start(self, args, d, a_addr, b_addr, nclients, checks="", apis=None):
        self.port, self.admin = free_ports(2)
        cfg = os.path.join(d, "geoproxy.toml")
        with open(cfg, "w") as f:
            f.write(geoproxy_config(args, self.port, self.admin, a_addr, b_addr, checks, apis))
        self.log = os.path.join(d, "geoproxy.log")
        self.proc = spawn([args.geoproxy_bin, "--config", cfg], self.log)

        async def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("geoproxy exited %s:\n%s" % (self.proc.returncode, tail(self.log)))
            code, _ = await http_get(self.admin, "/ready")
            return code == 200
        if not await wait_until(ready, 15):
            raise RuntimeError("geoproxy not ready after 15 s:\n" + tail(self.log))
        # Wait (bounded) until it routes to A, the preferred member, and A is synced (its
        # sync checks, if any, pass: a fault must find A fully healthy).
        st = await wait_until(self._active_is_a, 15)
        self.started_on = "a" if st else (await self.status() or {}).get("active_member")

    async def _active_is_a(self):
        st = await self.status() or {}
        a = next((m for m in st.get("members", []) if m["id"] == "a"), {})
        return st.get("active_member") == "a" and a.get("synced", True)

    async def status(self):
        try:
            code, body = await http_get(self.admin, "/v1/status", 1.0)
            return json.loads(body) if code == 200 else None
        except (OSError, asyncio.TimeoutError, ValueError, ConnectionError):
            return None

    async def observe(self):
        """(serving member, {member: "up" | "down" | "unknown"}) now, or None."""
        st = await self.status()
        if st is None:
            return None
        self.last_status = st
        return st.get("active_member"), {m["id"]: m["state"] for m in st["members"]}

    async def history(self):
        """The last switches ({at (Unix time), from, to, reason}), oldest first."""
        return (await self.status() or {}).get("switches")

    async def switches(self):
        """{(from, to, reason): count} from /metrics."""
        code, body = await http_get(self.admin, "/metrics", 2.0)
        out = {}
        for m in re.finditer(r'^geoproxy_switches_total\{([^}]*)\}\s+(\S+)$', body, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            key = (labels.get("from"), labels.get("to"), labels.get("reason"))
            out[key] = out.get(key, 0) + float(m.group(2))
        return out


class HAProxy:
    name = "haproxy"

    async def start(self, args, d, a_addr, b_addr, nclients, checks="", apis=None):
        assert not checks and not apis, "geoproxy's check scenarios do not run on HAProxy"
        (self.port,) = free_ports(1)
        self.sock = os.path.join(d, "haproxy.sock")
        cfg = os.path.join(d, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy_config(args, self.port, self.sock, a_addr, b_addr,
                                   max(4000, nclients + 2000)))
        self.log = os.path.join(d, "haproxy.log")
        self.proc = spawn(["haproxy", "-db", "-f", cfg], self.log)

        async def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("haproxy exited %s:\n%s" % (self.proc.returncode, tail(self.log)))
            return await redis_cmd(self.port, "PING", timeout=0.5) == b"+PONG\r\n"
        if not await wait_until(ready, 15):
            raise RuntimeError("haproxy not ready after 15 s:\n" + tail(self.log))
        st = await wait_until(self._a_up, 10)
        self.started_on = "a" if st else "b?"

    async def _a_up(self):
        o = await self.observe()
        return o and o[1].get("a") == "up"

    async def stats(self, cmd):
        async def go():
            r, w = await asyncio.open_unix_connection(self.sock)
            try:
                w.write(cmd.encode() + b"\n")
                return (await r.read()).decode(errors="replace")
            finally:
                w.close()
        return await asyncio.wait_for(go(), 1.0)

    async def observe(self):
        try:
            text = await self.stats("show servers state be_redis")
        except (OSError, asyncio.TimeoutError, ConnectionError):
            return None
        lines = text.splitlines()
        head = next((l[2:].split() for l in lines if l.startswith("# ")), None)
        if not head:
            return None
        state = {}
        for l in lines:
            f = l.split()
            if len(f) == len(head) and not l.startswith("#"):
                row = dict(zip(head, f))
                state[row["srv_name"]] = {"0": "down", "1": "starting", "2": "up",
                                          "3": "stopping"}.get(row["srv_op_state"], "?")
        serving = "a" if state.get("a") == "up" else ("b" if state.get("b") == "up" else None)
        return serving, state

    async def switches(self):
        return {}  # counted from the observations

    async def history(self):
        return None


PROXIES = {"geoproxy": GeoProxy, "haproxy": HAProxy}

# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------


class Client:
    def __init__(self, i, n):
        self.name = "fo-c%d" % i
        self.phase = i / n
        self.first_good = None   # s from the fault to the first good reply to a request sent after it
        self.last_good = None    # time of the last good reply after the fault
        self.max_gap = 0.0       # longest time without a good reply after the fault
        self.max_gap_end = None  # when it ended
        self.errors = collections.Counter()
        self.disconnects = self.timeouts = self.connect_failures = 0
        self.connected = False
        self.events = []  # (time, what): everything but good replies, written with --keep


def error_prefix(line):
    text = line.decode(errors="replace").strip()
    word = text.split()[0] if text else "-"
    m = re.search(r"\(([a-z ]+)\)", text)  # geoproxy's reason: (connection lost) ...
    return word + (" (%s)" % m.group(1) if m and word.startswith("-OUTCOMEUNKNOWN") else "")


async def client_loop(c, run, cmd, good, interval):
    """One long-lived client: connect, CLIENT SETNAME, then cmd every interval until run ends.
    A request not answered within request_timeout is a timeout: the client drops the
    connection (its stream is out of step) and reconnects, as redis clients do. EOF or reset
    is a disconnect; the client reconnects after 50 ms."""
    tmo = run.args.request_timeout
    r = w = None
    next_t = now() + interval * c.phase  # clients spread over the interval, not in step

    def failed(kind, detail=""):
        nonlocal r, w
        if kind == "error":
            c.errors[detail] += 1
        else:
            setattr(c, kind, getattr(c, kind) + 1)
            if w is not None:
                w.close()
            r = w = None
        c.events.append((now(), kind, detail))

    while not run.stopping:
        if w is None:
            try:
                r, w = await within(tmo, asyncio.open_connection("127.0.0.1", run.proxy.port))
            except (OSError, asyncio.TimeoutError) as e:
                failed("connect_failures", type(e).__name__)
                await asyncio.sleep(0.05)
                continue
            try:
                w.write(resp("CLIENT", "SETNAME", c.name))
                line = await within(tmo, read_reply(r))
                if line.startswith(b"-"):
                    failed("error", error_prefix(line))
                c.connected = True
            except asyncio.TimeoutError:
                failed("timeouts", "setname")
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
                failed("disconnects", "setname " + type(e).__name__)
            if w is None:
                await asyncio.sleep(0.05)
                continue
        await asyncio.sleep(max(0, next_t - now()))
        sent = now()
        # Next slot on this client's own grid: late (a failure, a busy loop) skips slots
        # rather than sending a burst or falling in step with the other clients.
        next_t += interval * max(1, math.ceil((sent - next_t) / interval))
        try:
            w.write(cmd)
            line = await within(tmo, read_reply(r))
        except asyncio.TimeoutError:
            failed("timeouts")
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
            failed("disconnects", type(e).__name__)
        if w is None:
            await asyncio.sleep(0.05)
            continue
        t = now()
        if line.startswith(b"-"):
            failed("error", error_prefix(line))
        elif good(line) and run.fault_t is not None and sent >= run.fault_t:
            if c.first_good is None:
                c.first_good = t - run.fault_t
                c.events.append((t, "first good", ""))
            gap = t - (c.last_good or run.fault_t)
            if gap > c.max_gap:
                c.max_gap, c.max_gap_end = gap, t
            c.last_good = t
    if w is not None:
        w.close()


# ---------------------------------------------------------------------------------------
# Faults (one function per fault; each returns when the fault is in effect)
# ---------------------------------------------------------------------------------------


async def fault_kill(run):
    os.kill(run.redis_a.pid, signal.SIGKILL)


async def fault_stop(run):
    os.kill(run.redis_a.pid, signal.SIGSTOP)


async def clear_stop(run):
    os.kill(run.redis_a.pid, signal.SIGCONT)


async def fault_blackhole(run):
    await run.relay.send("drop")


async def clear_relay(run):
    """Member A reachable again: new connections forward (black-holed ones stay dead)."""
    await run.relay.send("listen")


async def fault_reset(run):
    await run.relay.send("reset")


async def setup_far(run):
    await run.relay.send("delay %g %g" % (run.args.far_ms / 1000, run.args.far_ms / 2000))


async def fault_none(run):
    pass


def flap_cycles(a):
    return max(1, round(a.flap_seconds / (a.flap_down + a.flap_up)))


def flap_clear_after(a):
    """The flap ends with a down phase: A comes up for good at the clear."""
    return flap_cycles(a) * (a.flap_down + a.flap_up) - a.flap_up


async def fault_flap(run):
    """A goes down (reset + refuse) now; flap_rest brings it up and down again, ending down."""
    await run.relay.send("reset")
    run.background.append(asyncio.ensure_future(flap_rest(run, now())))


async def flap_rest(run, t0):
    a = run.args
    period = a.flap_down + a.flap_up
    for i in range(1, flap_cycles(a)):
        await asyncio.sleep(max(0, t0 + i * period - a.flap_up - now()))
        await run.relay.send("listen")
        await asyncio.sleep(max(0, t0 + i * period - now()))
        await run.relay.send("reset")


async def clear_flap(run):
    await asyncio.wait(run.background, timeout=10)  # the last down phase ends now
    await run.relay.send("listen")


async def fault_slow_under(run):
    await debug_sleep(run, run.args.slow_under)


async def fault_slow_over(run):
    await debug_sleep(run, run.args.slow_over)


async def debug_sleep(run, seconds):
    """The extra client (setup_sleeper) sends DEBUG SLEEP through the proxy; its reply is noted."""
    async def sleeper():
        r, w = run.sleeper
        t = now()
        try:
            w.write(resp("DEBUG", "SLEEP", seconds))
            line = await asyncio.wait_for(read_reply(r), seconds + 15)
            got = error_prefix(line) if line.startswith(b"-") else line.decode(errors="replace").strip()
            run.notes.append("the DEBUG SLEEP %g client got %s after %.2f s" % (seconds, got, now() - t))
        except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            run.notes.append("the DEBUG SLEEP %g client: %s after %.2f s" % (
                seconds, type(e).__name__, now() - t))
    run.background.append(asyncio.ensure_future(sleeper()))
    await asyncio.sleep(0)  # the command is written before the fault time is taken


async def setup_sleeper(run):
    r, w = await asyncio.open_connection("127.0.0.1", run.proxy.port)
    w.write(resp("CLIENT", "SETNAME", "fo-sleeper"))
    await asyncio.wait_for(read_reply(r), 2)
    run.sleeper = (r, w)


async def fault_kill_one_upstream(run):
    """CLIENT KILL, on member A itself, the connection carrying client 0 (fo-c0)."""
    victim = run.clients[0].name
    listing = bulk_text(await redis_cmd(run.a_port, "CLIENT", "LIST", timeout=2))
    ids = [re.search(r"\bid=(\d+)", l).group(1) for l in listing.splitlines()
           if re.search(r"\bname=%s\b" % re.escape(victim), l)]
    if len(ids) != 1:
        run.notes.append("found %d connections named %s on A; killed none" % (len(ids), victim))
        return
    reply = await redis_cmd(run.a_port, "CLIENT", "KILL", "ID", ids[0], timeout=2)
    run.notes.append("CLIENT KILL ID %s (%s's connection on A): %s" % (
        ids[0], victim, reply.decode().strip()))


# --- The check scenarios (geoproxy only): each writes its checks into geoproxy's [health] --


def toml_list(words):
    return "[%s]" % ", ".join(json.dumps(w) for w in words)  # JSON strings are TOML strings


def checks_availability(run, lag=False):
    return """\
[health.availability]
interval = "1s"
username = %s
password = %s
verify_tls = false
%s""" % (json.dumps(API_USER), json.dumps(API_PASSWORD), "lag = true\n" if lag else "")


def checks_availability_lag(run):
    return checks_availability(run, lag=True)


def checks_replication(run):
    return '[health.replication]\ninterval = "1s"\ntolerance = "2s"\n'


def checks_keyspace(run):
    return '[health.keyspace]\ninterval = "1s"\n'


def flag_path(run):
    """The file whose presence makes the custom check fail for member A."""
    return os.path.join(run.dir, "a-unhealthy")


def checks_custom(run):
    script = 'test "$GEOPROXY_MEMBER_ID" != a || test ! -e %s' % shlex.quote(flag_path(run))
    return '[[health.custom]]\nname = "flag"\ninterval = "1s"\nprogram = %s\n' % toml_list(
        ["sh", "-c", script])


def checks_majority(run):
    return 'policy = "majority"\n' + checks_keyspace(run) + checks_custom(run)


async def after_lag(run, heal):
    """--lag-seconds after the clear, A's sync is restored (heal()); noted as synced_t."""
    await asyncio.sleep(run.args.lag_seconds)
    heal()
    run.synced_t = now()


async def fault_api_unavailable(run):
    api = run.apis["a"]
    api.plain = api.lag = "bdb_endpoint_unavailable"


async def clear_api(run):
    api = run.apis["a"]
    api.plain = api.lag = None


async def clear_api_lagging(run):
    """A's plain request answers 200 again, its lag-aware one 503 for --lag-seconds more."""
    api = run.apis["a"]
    api.plain, api.lag = None, "bdb_unavailable_lag"
    run.background.append(asyncio.ensure_future(after_lag(run, lambda: setattr(api, "lag", None))))


async def fault_stop_and_cut(run):
    run.bridge.cut.add(("a", "b"))
    os.kill(run.redis_a.pid, signal.SIGSTOP)


async def clear_stop_keep_cut(run):
    """A runs again, but what it publishes reaches B only --lag-seconds later."""
    os.kill(run.redis_a.pid, signal.SIGCONT)
    run.background.append(asyncio.ensure_future(
        after_lag(run, lambda: run.bridge.cut.discard(("a", "b")))))


async def fault_oom(run):
    """A refuses writes (-OOM) and still answers PING."""
    for key, value in (("maxmemory-policy", "noeviction"), ("maxmemory", "1")):
        reply = await redis_cmd(run.a_port, "CONFIG", "SET", key, value, timeout=2)
        if reply != b"+OK\r\n":
            run.notes.append("CONFIG SET %s %s on A: %s" % (key, value, reply.decode().strip()))
    reply = await redis_cmd(run.a_port, "SET", "failover:probe", "x", timeout=2)
    if not reply.startswith(b"-OOM"):
        run.notes.append("SET on A answered %s, not -OOM" % reply.decode().strip())


async def clear_oom(run):
    await redis_cmd(run.a_port, "CONFIG", "SET", "maxmemory", "0", timeout=2)


async def fault_flag(run):
    open(flag_path(run), "w").close()


async def clear_flag(run):
    os.remove(flag_path(run))


# ---------------------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Scenario:
    name: str
    doc: str
    fault: object                 # async fn(run): inject the fault
    clear: object = None          # async fn(run): clear it (then failback is measured)
    clear_after: object = None    # s after the fault, or fn(args)
    relay: bool = False           # member A behind the fault relay
    setup: object = None          # async fn(run) before the clients start
    mass: bool = False            # args.mass_clients clients, one PING a second
    checks: object = None         # fn(run): geoproxy's extra [health] TOML (geoproxy only)
    api: bool = False             # a Redis Software REST API per member (members get api, bdb)
    bridge: bool = False          # the pub/sub bridge between the members (replication)
    held: object = None           # s after the clear until A is synced again, fn(args)

    @property
    def geoproxy_only(self):
        return self.checks is not None


SCENARIOS = [
    Scenario("kill", "SIGKILL member A", fault_kill),
    Scenario("stop", "SIGSTOP member A (hung), SIGCONT after --clear-after s",
             fault_stop, clear_stop, lambda a: a.clear_after),
    Scenario("blackhole", "relay to A drops everything both ways (connections stay open, "
             "new ones accepted); new connections forward again after --clear-after s",
             fault_blackhole, clear_relay, lambda a: a.clear_after, relay=True),
    Scenario("reset", "relay to A resets every connection (RST) and refuses new ones for "
             "--reset-seconds, then recovers", fault_reset, clear_relay,
             lambda a: a.reset_seconds, relay=True),
    Scenario("far", "A behind the relay with +FAR_MS before connecting and +FAR_MS round "
             "trip on data; nothing fails (expect 0 switches, 0 errors)", fault_none,
             relay=True, setup=setup_far),
    Scenario("flap", "relay alternates A down (reset + refuse) --flap-down s / up "
             "--flap-up s for --flap-seconds", fault_flap, clear_flap,
             flap_clear_after, relay=True),
    Scenario("slow-under", "one extra client sends DEBUG SLEEP shorter than reply_timeout",
             fault_slow_under, setup=setup_sleeper),
    Scenario("slow-over", "one extra client sends DEBUG SLEEP longer than reply_timeout",
             fault_slow_over, setup=setup_sleeper),
    Scenario("kill-one-upstream", "CLIENT KILL on A of client fo-c0's connection (expect "
             "1 disconnect, 0 switches)", fault_kill_one_upstream),
    Scenario("mass-kill", "SIGKILL member A under --mass-clients clients, PING every 1 s",
             fault_kill, mass=True),
    Scenario("availability-503", "[health.availability] (interval 1s, verify_tls = false, "
             "Basic auth) against a REST API played per member over HTTPS (self-signed): A's "
             "answers 503 bdb_endpoint_unavailable, 200 again after --clear-after s",
             fault_api_unavailable, clear_api, lambda a: a.clear_after,
             checks=checks_availability, api=True),
    Scenario("availability-lag", "as availability-503 with lag = true (a sync check): after "
             "--clear-after s A's plain request answers 200, its lag-aware one 503 "
             "bdb_unavailable_lag for --lag-seconds s more (expect no failback before that)",
             fault_api_unavailable, clear_api_lagging, lambda a: a.clear_after,
             checks=checks_availability_lag, api=True, held=lambda a: a.lag_seconds),
    Scenario("replication-cut", "[health.replication] (interval 1s, tolerance 2s), a pub/sub "
             "bridge standing in for Active-Active: SIGSTOP A and cut the bridge A→B; SIGCONT "
             "after --clear-after s, the cut healed --lag-seconds s later (expect no failback "
             "before that)", fault_stop_and_cut, clear_stop_keep_cut, lambda a: a.clear_after,
             checks=checks_replication, bridge=True, held=lambda a: a.lag_seconds),
    Scenario("keyspace-oom", "[health.keyspace] (SET/GET, interval 1s): CONFIG SET maxmemory 1 "
             "(noeviction) on A, which still answers PING; maxmemory 0 after --clear-after s",
             fault_oom, clear_oom, lambda a: a.clear_after, checks=checks_keyspace),
    Scenario("custom-fail", "[[health.custom]] program `sh -c 'test \"$GEOPROXY_MEMBER_ID\" "
             "!= a || test ! -e FLAG'`: FLAG (in the run directory) created, removed after "
             "--clear-after s", fault_flag, clear_flag, lambda a: a.clear_after,
             checks=checks_custom),
    Scenario("majority-one-failing", "policy = \"majority\" over ping, keyspace and "
             "custom-fail's program, FLAG created for good: one of A's three checks fails "
             "(expect 0 switches)", fault_flag, checks=checks_majority),
]
BY_NAME = {s.name: s for s in SCENARIOS}


def parse_duration(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", s)
    if not m:
        raise argparse.ArgumentTypeError("duration like 500ms or 1s: %r" % s)
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


# ---------------------------------------------------------------------------------------
# One run: a scenario against a proxy, from fresh processes
# ---------------------------------------------------------------------------------------


class Run:
    def __init__(self, scn, proxy_name, args):
        self.scn, self.args = scn, args
        self.proxy = PROXIES[proxy_name]()
        self.fault_t = self.clear_t = None
        self.stopping = False
        self.background, self.notes = [], []
        self.observations = []   # (t, serving member, {member: state})
        self.traffic = []        # (t, commands on A, commands on B)
        self.gates = []          # (t, geoproxy failback_gate reason, why), when there is one
        self.checks_down = collections.defaultdict(set)  # member -> its checks seen down
        self.loop_lag = 0.0
        self.sleeper = self.relay = self.bridge = self.history = self.synced_t = None
        self.apis = {}           # member -> RestApi

    def write_trace(self):
        """trace.txt in the run directory: every client event and observation, in s from the fault."""
        rows = [(t, "client %s: %s %s" % (c.name, k, d)) for c in self.clients for t, k, d in c.events]
        rows += [(c.max_gap_end, "client %s: longest gap (%d ms) ends" % (c.name, c.max_gap * 1000))
                 for c in self.clients if c.max_gap_end is not None]
        prev = None
        for t, serving, state in self.observations:
            if (serving, state) != prev:
                rows.append((t, "proxy: serving %s, members %s" % (serving, state)))
                prev = (serving, state)
        marks = [(self.fault_t, "FAULT")] + ([(self.clear_t, "CLEAR")] if self.clear_t else [])
        with open(os.path.join(self.dir, "trace.txt"), "w") as f:
            for t, what in sorted(rows + marks):
                f.write("%+9.3f %s\n" % (t - self.fault_t, what))

    def plan(self):
        """(clients, interval, s from fault to clear or None, s from fault to end)."""
        a, s = self.args, self.scn
        nclients = a.mass_clients if s.mass else a.clients
        interval = 1.0 if s.mass else a.interval
        clear_after = s.clear_after(a) if callable(s.clear_after) else s.clear_after
        held = s.held(a) if s.held else 0.0
        after = a.after if s.clear is None else (
            clear_after + held + a.failback_after_s + a.after_clear)
        return nclients, interval, clear_after, after

    async def observer(self):
        """Every 100 ms: which member the proxy serves from and which members are up."""
        while not self.stopping:  # (3.11's wait_for can swallow a cancel: check a flag too)
            o = await self.proxy.observe()
            if o is not None:
                self.observations.append((now(), o[0], o[1]))
                if self.proxy.name == "geoproxy":
                    self.observe_checks(now(), self.proxy.last_status)
            await asyncio.sleep(0.1)

    def observe_checks(self, t, st):
        """geoproxy's failback gate, and which checks were down after the fault."""
        gate = st.get("failback_gate")
        if gate:
            self.gates.append((t, gate.get("reason"), gate.get("why") or ""))
        if self.fault_t is not None:
            for m in st.get("members", []):
                for c in m.get("checks", []):
                    if c.get("state") == "down":
                        self.checks_down[m["id"]].add(c["name"])

    async def traffic_poller(self, cmdname):
        """Every 250 ms: commands of our kind processed by A and by B (INFO commandstats)."""
        async def calls(port):
            try:
                info = bulk_text(await redis_cmd(port, "INFO", "commandstats", timeout=0.5))
                m = re.search(r"cmdstat_%s:calls=(\d+)" % cmdname, info)
                return int(m.group(1)) if m else 0
            except (OSError, asyncio.TimeoutError, ConnectionError, IndexError):
                return None
        while not self.stopping:
            t = now()
            self.traffic.append((t,) + tuple(await asyncio.gather(calls(self.a_port), calls(self.b_port))))
            await asyncio.sleep(max(0, t + 0.25 - now()))

    async def lag_monitor(self):
        """The clients' own event loop running late (a busy host) shows in every number."""
        while not self.stopping:
            t = now()
            await asyncio.sleep(0.01)
            if self.fault_t is not None:
                self.loop_lag = max(self.loop_lag, now() - t - 0.01)

    async def execute(self):
        a, s = self.args, self.scn
        d = tempfile.mkdtemp(prefix="failover-%s-%s." % (s.name, self.proxy.name))
        self.dir = d
        nclients, interval, clear_after, after = self.plan()
        cpu0 = host_cpu()
        cmdname = "ping" if a.command == "ping" else "get"
        cmd = resp("PING") if a.command == "ping" else resp("GET", "failover:key")
        good = (lambda l: l == b"+PONG\r\n") if a.command == "ping" else (lambda l: l[:1] == b"$")
        tasks = []
        try:
            self.a_port, self.b_port = free_ports(2)
            self.redis_a = await start_redis(self.a_port, d, "a")
            self.redis_b = await start_redis(self.b_port, d, "b")
            a_addr = self.a_port
            if s.api:
                ctx = self_signed_cert(d)
                for m in ("a", "b"):
                    self.apis[m] = await RestApi().start(ctx)
            if s.bridge:
                self.bridge = await Bridge({"a": self.a_port, "b": self.b_port}).start()
            if s.relay:
                (rport,) = free_ports(1)
                self.relay = await RelayControl.start(rport, self.a_port, os.path.join(d, "relay.log"))
                a_addr = rport
                if s.setup is not None:
                    await s.setup(self)  # the relay's delays apply from the proxy's first check
            checks = s.checks(self) if s.checks else ""
            apis = [self.apis[m].url for m in ("a", "b")] if s.api else None
            await self.proxy.start(a, d, a_addr, self.b_port, nclients, checks, apis)
            if self.proxy.started_on != "a":
                self.notes.append("started on %s, not A" % self.proxy.started_on)
            if s.setup is not None and not s.relay:
                await s.setup(self)
            for f in (self.observer, self.lag_monitor, lambda: self.traffic_poller(cmdname)):
                tasks.append(asyncio.ensure_future(f()))
            switches_before = await self.proxy.switches()

            # Clients: connect in batches (a burst of thousands of connects overflows backlogs).
            self.clients = [Client(i, nclients) for i in range(nclients)]
            client_tasks = []
            for i, c in enumerate(self.clients):
                client_tasks.append(asyncio.ensure_future(client_loop(c, self, cmd, good, interval)))
                if i % 200 == 199:
                    await asyncio.sleep(0.05)
            tasks += client_tasks
            async def all_connected():
                return all(c.connected for c in self.clients)
            if not await wait_until(all_connected, 30, 0.1):
                self.notes.append("%d clients not connected before the fault" % sum(
                    1 for c in self.clients if not c.connected))
            t0 = now()
            await asyncio.sleep(a.fault_at)
            self.fault_begin = now()  # events before this are not the fault's
            self.wall_offset = time.time() - self.fault_begin  # geoproxy's switch times: Unix
            await s.fault(self)
            self.fault_t = now()      # the fault is in effect: timings start here
            if s.clear is not None:
                await asyncio.sleep(max(0, self.fault_t + clear_after - now()))
                await s.clear(self)
                self.clear_t = now()
            await asyncio.sleep(max(0, self.fault_t + after - now()))
            self.end_t = now()
            self.stopping = True
            await asyncio.wait(client_tasks, timeout=a.request_timeout + 2)
            switches_after = await self.proxy.switches()
            self.history = await self.proxy.history()
            cpu1 = host_cpu()
            self.host_busy = 100.0 * (cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1])
            if a.keep:
                self.write_trace()
            return self.result(switches_before, switches_after, t0, nclients, interval, after)
        finally:
            self.stopping = True
            pending = tasks + self.background
            for t in pending:
                t.cancel()
            if pending:  # bounded: never hang on a task that ignored its cancel
                await asyncio.wait(pending, timeout=5)
            if self.sleeper:
                self.sleeper[1].close()
            if self.relay is not None:
                await self.relay.stop()
            if self.bridge is not None:
                await self.bridge.stop()
            for api in self.apis.values():
                api.close()
            kill_all()
            if not a.keep:
                shutil.rmtree(d, ignore_errors=True)

    # --- results ---------------------------------------------------------------------

    def serving_changes(self):
        """Changes of the serving member and of member states, from the observations."""
        changes, downs = [], set()
        prev = None
        for t, serving, state in self.observations:
            for m, st in state.items():
                if st == "down":
                    downs.add(m)
            if prev is not None and serving != prev[0]:
                changes.append((t, prev[0], serving))
            prev = (serving, state)
        return changes, downs

    def state_changes(self):
        """{member: number of up/down changes} seen by the observer."""
        flips, prev = collections.Counter(), {}
        for _, _, state in self.observations:
            for m, st in state.items():
                if m in prev and st != prev[m]:
                    flips[m] += 1
                prev[m] = st
        return flips

    def on_a(self, t_from, t_to):
        """Was most of our traffic on A between t_from and t_to? (None: no data)."""
        rows = [r for r in self.traffic if t_from <= r[0] <= t_to and None not in r[1:]]
        if len(rows) < 2:
            return None
        da, db = rows[-1][1] - rows[0][1], rows[-1][2] - rows[0][2]
        span = rows[-1][0] - rows[0][0]
        return da > db and da / span > 10  # health checks alone are ~1-2/s

    def traffic_back_on_a(self):
        """Start of the first poll interval (250 ms) after the clear with most traffic on A."""
        rows = [r for r in self.traffic if r[0] >= self.clear_t and None not in r[1:]]
        for r0, r1 in zip(rows, rows[1:]):
            if self.on_a(r0[0], r1[0]):
                return r0[0] - self.clear_t
        return None

    def result(self, sw_before, sw_after, t0, nclients, interval, after):
        a, cl = self.args, self.clients
        first = sorted(c.first_good for c in cl if c.first_good is not None)
        never = sum(1 for c in cl if c.first_good is None)
        gaps = sorted(max(c.max_gap, self.end_t - (c.last_good or self.fault_t)) for c in cl)
        errors = collections.Counter()
        for c in cl:
            errors.update(c.errors)
        changes, downs = self.serving_changes()
        if self.proxy.name == "geoproxy":
            diff = {k: sw_after.get(k, 0) - sw_before.get(k, 0) for k in sw_after}
            diff = {k: int(v) for k, v in diff.items() if v and k[2] != "initial"}
            nswitch = sum(diff.values())
            reasons = ", ".join("%s %s→%s ×%d" % (k[2], k[0], k[1], v) for k, v in sorted(diff.items()))
        else:
            nswitch = len(changes)
            kinds = collections.Counter("%s→%s" % (f or "none", t or "none") for _, f, t in changes)
            reasons = ", ".join("%s ×%d" % kv for kv in sorted(kinds.items()))
            flips = self.state_changes()
            if flips:
                reasons += " (server state changes: %s)" % ", ".join(
                    "%s %d" % (m, n) for m, n in sorted(flips.items()))
        row = dict(scenario=self.scn.name, proxy=self.proxy.name, clients=nclients,
                   interval=interval, after=after,
                   first_p50=pct(first, .5), first_p99=pct(first, .99),
                   first_max=None if never else pct(first, 1), never=never,
                   gap_p50=pct(gaps, .5), gap_max=pct(gaps, 1),
                   errors=sum(errors.values()), error_kinds=dict(errors),
                   disconnects=sum(c.disconnects for c in cl),
                   disconnected_clients=sum(1 for c in cl if c.disconnects),
                   timeouts=sum(c.timeouts for c in cl),
                   connect_failures=sum(c.connect_failures for c in cl),
                   before_fault=sum(1 for c in cl for t, _, _ in c.events if t < self.fault_begin),
                   switches=nswitch, switch_reasons=reasons,
                   b_down="b" in downs, loop_lag=self.loop_lag, host_busy=self.host_busy,
                   notes=list(self.notes))
        if self.scn.name == "kill-one-upstream":
            v = cl[0]
            row["notes"].append("victim: %d disconnects, %d errors" % (v.disconnects, sum(v.errors.values())))
        on_a_before = self.on_a(t0 + 1.0, self.fault_t)
        if not on_a_before:
            row["notes"].append("traffic was %s on A before the fault" % (
                "NOT" if on_a_before is False else "not measured"))
        left = self.route_left_a()
        if left is not None:
            row["notes"].append(left)
        if self.clear_t is not None:
            row.update(self.failback())
        row["notes"] += self.check_notes(row)
        return row

    def route_left_a(self):
        """When geoproxy's route first left A after the fault (from its switch history)."""
        if self.history is None:
            return None
        for sw in self.history:
            t = sw["at"] - self.wall_offset
            if sw.get("from") == "a" and t >= self.fault_begin - 0.01:
                return "route left A at %+.2f s (%s)" % (t - self.fault_t, sw.get("reason"))
        return "route never left A"

    def check_notes(self, row):
        """The check scenarios: which of A's checks failed, the failback gate held for sync,
        and when the route came back relative to A's sync being restored."""
        if not self.scn.geoproxy_only:
            return []
        notes = []
        down = sorted(self.checks_down.get("a", ()))
        notes.append("A's checks down after the fault: %s" % (", ".join(down) or "none"))
        if self.clear_t is not None:
            sync = [(t - self.clear_t, why) for t, reason, why in self.gates
                    if reason == "sync" and t >= self.clear_t]
            if sync:
                why = sync[0][1] if len(sync[0][1]) <= 90 else sync[0][1][:87] + "..."
                notes.append("failback gate 'sync' seen from +%.1f to +%.1f s after the clear "
                             "(%s)" % (sync[0][0], sync[-1][0], why))
        if self.synced_t is not None:
            synced = self.synced_t - self.clear_t
            route = row.get("failback_route")
            if route is None:
                notes.append("A synced again at clear +%.1f s; route never came back" % synced)
            else:
                notes.append("A synced again at clear +%.1f s; route back %.1f s %s" % (
                    synced, abs(route - synced), "after that" if route >= synced else
                    "BEFORE that (failback not held)"))
        if self.apis:
            a, b = self.apis["a"].requests, self.apis["b"].requests
            notes.append("API requests A / B: %d / %d plain, %d / %d lag-aware" % (
                a["plain"], b["plain"], a["lag"], b["lag"]))
        if self.bridge is not None:
            notes.append("bridge: A→B %d forwarded, %d dropped; B→A %d forwarded" % (
                self.bridge.forwarded["a", "b"], self.bridge.dropped["a", "b"],
                self.bridge.forwarded["b", "a"]))
        return notes

    def failback(self):
        """Times after the clear (s): A up again (its last change to up before the route
        came back), route back on A, most traffic back on A."""
        obs = [(t - self.clear_t, s, st.get("a")) for t, s, st in self.observations]
        route = next((t for t, s, _ in obs if t >= 0 and s == "a"), None)
        ups = [t for (t, _, st), (_, _, before) in zip(obs[1:], obs) if st == "up" != before]
        if route is not None:
            a_up = ([t for t in ups if t <= route] or [None])[-1]
        else:
            a_up = next((t for t in ups if t >= 0), None)
        return dict(failback_a_up=a_up, failback_route=route,
                    failback_traffic=self.traffic_back_on_a())


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def fmt_row(r, args):
    first = "%s / %s / %s" % (ms(r["first_p50"]), ms(r["first_p99"]), ms(r["first_max"]))
    if r["never"]:
        first += " (%d never)" % r["never"]
    errs = str(r["errors"])
    if r["error_kinds"]:
        errs += ": " + ", ".join("%s ×%d" % (k, v) for k, v in sorted(r["error_kinds"].items()))
    disc = str(r["disconnects"])
    if r["disconnects"]:
        disc += " (%d clients)" % r["disconnected_clients"]
    sw = str(r["switches"]) + (": " + r["switch_reasons"] if r["switch_reasons"] else "")
    fb = "-"
    if "failback_route" in r:
        up, fr, ft = r["failback_a_up"], r["failback_route"], r["failback_traffic"]
        fb = "A up %s, route %s, traffic %s" % (secs(up), secs(fr), secs(ft))
        # 0.3 s: the observer polls every 100 ms and the traffic every 250 ms
        if ft is not None and up is not None and ft - up < args.failback_after_s - 0.3:
            fb += " (early: %.1f s after A up)" % (ft - up)
    notes = list(r["notes"])
    if r["b_down"]:
        notes.append("B marked down!")
    if r["connect_failures"]:
        notes.append("%d failed (re)connects" % r["connect_failures"])
    if r["before_fault"]:
        notes.append("%d errors/disconnects before the fault" % r["before_fault"])
    if r["host_busy"] > 70:
        notes.append("host %d%% busy" % r["host_busy"])
    if r["loop_lag"] > 0.03:
        notes.append("client loop lag up to %d ms" % round(r["loop_lag"] * 1000))
    return "| %s | %s | %s | %s / %s | %s | %s | %d | %s | %s | %s |" % (
        r["scenario"], r["proxy"], first, ms(r["gap_p50"]), ms(r["gap_max"]), errs, disc,
        r["timeouts"], sw, fb, "; ".join(notes) or "")


def header(args, scenarios, proxies, load):
    out = ["- host: %d cores, load average %.1f when the run started." % (os.cpu_count(), load)]
    if "geoproxy" in proxies:
        out.append("- geoproxy: `%s`%s; config per run: health interval 1s, timeout 500ms, "
                   "rise 2, fall 2 (the defaults); failback auto, failback_after %s; "
                   "proxy.reply_timeout %s; everything else default (threads 0 = one per core)."
                   % (args.geoproxy_bin, binary_commit(args.geoproxy_bin),
                      args.failback_after, args.reply_timeout))
    if "haproxy" in proxies:
        v = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        out.append("- HAProxy (%s): TCP mode, `option redis-check`, A primary and B `backup`, "
                   "`check inter 1s fall 2 rise 2 on-marked-down shutdown-sessions`, "
                   "`timeout check 500ms`; no failback grace; sessions on B stay there when A "
                   "comes back." % " ".join(v.split()[:3]))
    out.append("- clients: %d, each `%s` every %d ms on one connection (CLIENT SETNAME first); "
               "per-request timeout %g s (then the client drops the connection); reconnect "
               "50 ms after a disconnect; fault at %g s; run %g s after the fault (scenarios "
               "that clear: clear time + failback_after + %g s). mass-kill: %d clients, one "
               "PING a second." % (args.clients, args.command.upper(), round(args.interval * 1000),
                                   args.request_timeout, args.fault_at, args.after,
                                   args.after_clear, args.mass_clients))
    out.append("- first good reply: from the fault to each client's first good reply to a "
               "request sent after it; gap: each client's longest time without a good reply "
               "after the fault. failback, in s after the fault was cleared: A up again (as "
               "the proxy sees it), route back on A (geoproxy `active_member`, HAProxy server "
               "A up) and traffic back on A (most commands on A, polled from INFO "
               "commandstats every 250 ms); '(early)' if traffic returned to A less than "
               "failback_after (%s) after A came up." % args.failback_after)
    values = {"FAR_MS": "%d ms" % args.far_ms, "--clear-after": "%g" % args.clear_after,
              "--reset-seconds": "%g s" % args.reset_seconds, "--flap-down": "%g" % args.flap_down,
              "--flap-up": "%g" % args.flap_up, "--flap-seconds": "%g s" % args.flap_seconds,
              "--mass-clients": "%d" % args.mass_clients, "--lag-seconds": "%g" % args.lag_seconds}
    extra = {"slow-under": " (%g s)" % args.slow_under, "slow-over": " (%g s)" % args.slow_over}
    for s in scenarios:
        doc = s.doc
        for k, v in values.items():
            doc = doc.replace(k, v)
        out.append("- `%s`: %s%s%s" % (s.name, doc, extra.get(s.name, ""),
                                         " (geoproxy only)" if s.geoproxy_only else ""))
    return "\n".join(out)


def binary_commit(path):
    d = os.path.dirname(os.path.abspath(path))
    try:
        c = subprocess.run(["git", "-C", d, "log", "-1", "--format=%h"], capture_output=True,
                           text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", d, "status", "--porcelain", "--", ":/src"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    mtime = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
    return " (built %s; tree at %s%s)" % (mtime, c or "?", ", src modified" if dirty else "")


SKIPPED = "not run: a geoproxy check kind, HAProxy has no equivalent"

TABLE_HEAD = ("| scenario | proxy | first good reply p50 / p99 / max (ms) | longest gap p50 / max (ms) "
              "| error replies | disconnects | timeouts | switches | failback after clear | notes |\n"
              "|---|---|---|---|---|---|---|---|---|---|")


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS),
                   help="comma list (default: all): " + ",".join(s.name for s in SCENARIOS))
    p.add_argument("--proxies", default="geoproxy,haproxy")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.02, help="s between a client's requests")
    p.add_argument("--request-timeout", type=float, default=3.0, help="client per-request timeout, s")
    p.add_argument("--command", choices=["ping", "get"], default="ping")
    p.add_argument("--fault-at", type=float, default=3.0, help="s after the clients started")
    p.add_argument("--after", type=float, default=10.0, help="s to run after a fault that stays")
    p.add_argument("--after-clear", type=float, default=8.0,
                   help="s to run after clear time + failback_after")
    p.add_argument("--clear-after", type=float, default=5.0, help="stop/blackhole: s until cleared")
    p.add_argument("--reset-seconds", type=float, default=3.0)
    p.add_argument("--far-ms", type=float, default=200.0)
    p.add_argument("--flap-seconds", type=float, default=60.0)
    p.add_argument("--flap-up", type=float, default=2.0)
    p.add_argument("--flap-down", type=float, default=2.0)
    p.add_argument("--slow-under", type=float, default=0.5, help="DEBUG SLEEP s, under reply_timeout")
    p.add_argument("--slow-over", type=float, default=2.0, help="DEBUG SLEEP s, over reply_timeout")
    p.add_argument("--mass-clients", type=int, default=6000)
    p.add_argument("--lag-seconds", type=float, default=10.0,
                   help="availability-lag / replication-cut: s after the clear that A stays "
                        "unsynced (lag-aware request failing, replication A→B cut)")
    p.add_argument("--reply-timeout", type=parse_duration_str, default="1s",
                   help="geoproxy proxy.reply_timeout written in its config")
    p.add_argument("--failback-after", type=parse_duration_str, default="5s",
                   help="geoproxy failover.failback_after written in its config")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--keep", action="store_true", help="keep each run's directory (configs, logs)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = p.parse_args()
    args.geoproxy_bin = os.environ.get("GEOPROXY_BIN", os.path.join(ROOT, "target/release/geoproxy"))
    args.failback_after_s = parse_duration(args.failback_after)
    return args


def parse_duration_str(s):
    parse_duration(s)
    return s


async def amain(args, scenarios, proxies):
    rows = []
    t_start = now()
    for s in scenarios:
        for pname in proxies:
            if s.geoproxy_only and pname != "geoproxy":
                rows.append(dict(scenario=s.name, proxy=pname, skipped=SKIPPED))
                print("[%s] %s / %s: skipped (geoproxy only)" % (
                    time.strftime("%H:%M:%S"), s.name, pname), file=sys.stderr, flush=True)
                continue
            t = now()
            print("[%s] %s / %s ..." % (time.strftime("%H:%M:%S"), s.name, pname), file=sys.stderr, flush=True)
            run = Run(s, pname, args)
            budget = 120 + args.fault_at + run.plan()[3]
            task = asyncio.ensure_future(run.execute())
            try:
                done, _ = await asyncio.wait([task], timeout=budget)
                if not done:  # a bug or a stuck process: stop this run, go on with the next
                    task.cancel()
                    await asyncio.wait([task], timeout=15)
                    raise RuntimeError("run did not finish within %d s" % budget)
                r = task.result()
            except Exception as e:  # one failed run must not stop the others
                traceback.print_exc()
                print("  failed: %s" % e, file=sys.stderr)
                r = dict(scenario=s.name, proxy=pname, failed=str(e).splitlines()[0])
            rows.append(r)
            print("  %.0f s%s" % (now() - t, "" if "failed" in r else ": " + fmt_row(r, args)),
                  file=sys.stderr, flush=True)
    return rows, now() - t_start


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--relay":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
        try:
            asyncio.run(relay_main(int(sys.argv[2]), int(sys.argv[3])))
        except (KeyboardInterrupt, BrokenPipeError):
            pass
        return
    args = parse_args()
    if args.list:
        for s in SCENARIOS:
            print("%-21s %s%s" % (s.name, s.doc, " [geoproxy only: HAProxy has no equivalent]"
                                  if s.geoproxy_only else ""))
        return
    names = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = [x for x in names if x not in BY_NAME]
    proxies = [x.strip() for x in args.proxies.split(",") if x.strip()]
    if unknown or any(p not in PROXIES for p in proxies):
        sys.exit("unknown scenario or proxy: %s (scenarios: %s; proxies: geoproxy, haproxy)"
                 % (", ".join(unknown + [p for p in proxies if p not in PROXIES]), ", ".join(BY_NAME)))
    scenarios = [BY_NAME[n] for n in names]
    api = "geoproxy" in proxies and any(s.api for s in scenarios)
    for tool in ["redis-server"] + (["haproxy"] if "haproxy" in proxies else []) + (
            ["openssl"] if api else []):
        if shutil.which(tool) is None:
            sys.exit("%s not found on PATH" % tool)
    if "geoproxy" in proxies and not os.access(args.geoproxy_bin, os.X_OK):
        sys.exit("no geoproxy binary at %s (cargo build --release, or set GEOPROXY_BIN)" % args.geoproxy_bin)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 20000) if hard != resource.RLIM_INFINITY else 20000
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    if "mass-kill" in names and args.mass_clients + 500 > want:
        print("warning: RLIMIT_NOFILE %d is low for %d clients" % (want, args.mass_clients), file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on kill/timeout too
    load = os.getloadavg()[0]
    try:
        rows, took = asyncio.run(amain(args, scenarios, proxies))
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        kill_all()
    print("## Failover measurements (%s)\n" % time.strftime("%Y-%m-%d %H:%M"))
    print(header(args, scenarios, proxies, load) + "\n")
    print(TABLE_HEAD)
    for r in rows:
        if "failed" in r or "skipped" in r:
            print("| %s | %s | %s |||||||||" % (r["scenario"], r["proxy"], r.get("skipped") or
                                                "run failed: " + r["failed"]))
        else:
            print(fmt_row(r, args))
    print("\nTotal time: %.0f s" % took)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
