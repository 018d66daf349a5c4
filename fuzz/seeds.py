#!/usr/bin/env python3
"""Writes the seed corpora: realistic client commands and member replies.

Each seed is a chunk schedule (see fuzz_targets/common.rs) followed by the stream.
Run from fuzz/:  python3 seeds.py   (writes corpus/<target>/seed-*; existing files are kept)
"""
import hashlib
import os

SCHEDULES = [
    b"\x00",              # one byte at a time
    b"\x01\x03",          # 4 bytes
    b"\x02\x00\x10",      # 1, 17, 1, 17, ...
    b"\x03\x06\x01\xff",  # 7, 2, 256, ...
]


def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


BIG = bytes(range(256)) * 12  # 3072 bytes, every byte value, \r\n inside

REQUESTS = [
    cmd("SET", "key", "value"),
    cmd("GET", "key"),
    cmd("SET", "k", BIG, "EX", "10"),
    cmd("HELLO", "3"),
    cmd("HELLO", "3", "AUTH", "default", "secret", "SETNAME", "app"),
    cmd("AUTH", "user", "pass"),
    cmd("SELECT", "2"),
    cmd("SUBSCRIBE", "news", "sport"),
    cmd("PSUBSCRIBE", "news.*"),
    cmd("SSUBSCRIBE", "shard"),
    cmd("UNSUBSCRIBE"),
    cmd("CLIENT", "TRACKING", "on", "REDIRECT", "5", "BCAST", "PREFIX", "a"),
    cmd("CLIENT", "SETNAME", "x"),
    cmd("MULTI") + cmd("INCR", "c") + cmd("EXEC"),
    cmd("BLPOP", "q", "0"),
    cmd("EVAL", "return redis.call('get', KEYS[1])", "1", "k"),
    cmd("XADD", "s", "*", "f", "v") + cmd("PING") + cmd("GET", ""),
    cmd("MSET", *["k%d" % i for i in range(40)]),
    b"*0\r\n" + cmd("PING"),
    b"*-1\r\n" + cmd("PING"),
    b"PING\r\n",
    b"set k \"a b\\x41\\n\" 'it\\'s'\r\nGET k\n",
    b"\r\n   \nECHO \"\\t\\r\\a\\b\\\\\"\r\n",
    b"SUBSCRIBE a b c\r\n" + cmd("PING"),
    b"GET \"unbalanced\r\n",
    b"*1\r\n+OK\r\n",
    b"*2000000\r\n",
    b"*1\r\n$600000000\r\n",
    b"*1\r\n$-1\r\n",
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\n" + b"x" * 1000,
    cmd("GET", "a\r\nb") + cmd("GET", "\r"),
]


def reply_array(*items):
    return b"*%d\r\n" % len(items) + b"".join(items)


def bulk(s):
    s = s if isinstance(s, bytes) else s.encode()
    return b"$%d\r\n%s\r\n" % (len(s), s)


HELLO3 = (
    b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.2.4\r\n"
    b"$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:5\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n"
    b"$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n"
)

REPLIES = [
    b"+OK\r\n",
    b"-ERR unknown command 'FOO', with args beginning with: \r\n",
    b":1000\r\n:-1\r\n",
    bulk("hello") + b"$-1\r\n*-1\r\n*0\r\n$0\r\n\r\n",
    bulk(BIG),
    reply_array(bulk("message"), bulk("news"), bulk("hello")),
    reply_array(bulk("subscribe"), bulk("news"), b":1\r\n")
    + reply_array(bulk("subscribe"), bulk("sport"), b":2\r\n"),
    reply_array(bulk("pmessage"), bulk("n*"), bulk("news"), bulk("m")),
    reply_array(bulk("punsubscribe"), bulk("n*"), b":0\r\n"),
    HELLO3,
    b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n",
    b">4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$1\r\nm\r\n",
    b">3\r\n$10\r\nssubscribe\r\n$5\r\nshard\r\n:1\r\n",
    b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nkey\r\n+OK\r\n",
    b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n"
    b"*2\r\n:2039123\r\n:9543892\r\n",
    b"*2\r\n|1\r\n+ttl\r\n:3600\r\n$1\r\nv\r\n:1\r\n",
    b"_\r\n,3.14\r\n,inf\r\n,-nan\r\n#t\r\n#f\r\n",
    b"(3492890328409238509324850943850943825024385\r\n",
    b"=15\r\ntxt:Some string\r\n!21\r\nSYNTAX invalid syntax\r\n",
    b"~5\r\n+orange\r\n+apple\r\n#t\r\n:100\r\n:999\r\n",
    b"%2\r\n+first\r\n:1\r\n+second\r\n*2\r\n:2\r\n%1\r\n+a\r\n~0\r\n",
    b"*2\r\n+OK\r\n:1\r\n",  # EXEC
    b"*3\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n*0\r\n*-1\r\n",
    b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;0\r\n",
    b"*?\r\n:1\r\n:2\r\n.\r\n",
    b"*1\r\n" * 130 + b":1\r\n",
    b"*1\r\n" * 127 + b":1\r\n",
    b"$600000000\r\n",
    b"-MOVED 3999 127.0.0.1:6381\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n$1\r\n1\r\n$1\r\n2\r\n",
]


def write(target, streams):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    n = 0
    for i, s in enumerate(streams):
        for sched in SCHEDULES:
            data = sched + s
            name = "seed-" + hashlib.sha1(data).hexdigest()[:16]
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
            n += 1
    print(target, n)


write("request_scanner", REQUESTS)
write("reply_scanner", REPLIES)
