"""A redis-py application through geoproxy across a failover.

Run by tests/it/python.rs with: PROXY_PORT EAST_PORT WEST_PORT. Uses pipelines, a
transaction and pub/sub on long-lived connections; kills the preferred member (us-east)
with SHUTDOWN NOSAVE; checks the same client objects keep working on eu-west. Prints
PASS and exits 0, or raises.
"""

import sys
import time

import redis

proxy_port, east_port, west_port = (int(a) for a in sys.argv[1:4])
# No client-side retries: a retried write after an unknown outcome is what geoproxy exists
# to prevent, so the test must see every error the proxy sends.
r = redis.Redis(port=proxy_port, socket_timeout=10, retry=None, retry_on_timeout=False)
east = redis.Redis(port=east_port)
west = redis.Redis(port=west_port)

# Before: a pipeline, a transaction, a subscriber.
pipe = r.pipeline(transaction=False)
for i in range(100):
    pipe.set(f"k{i}", i)
assert all(pipe.execute())
assert r.get("k42") == b"42"
tx = r.pipeline(transaction=True)
tx.incr("n").incr("n")
assert tx.execute() == [1, 2]
sub = r.pubsub()
sub.subscribe("events")
assert sub.get_message(timeout=5)["type"] == "subscribe"
r.publish("events", "before")
msg = sub.get_message(timeout=5)
assert msg["data"] == b"before", msg
assert east.get("n") == b"2"

# The preferred member dies.
try:
    east.shutdown(nosave=True)
except redis.ConnectionError:
    pass

# The same client keeps its connection: only geoproxy's own errors, then success.
errors = []
deadline = time.time() + 15
while True:
    try:
        r.set("after", "1")
        break
    except redis.ResponseError as e:
        assert "OUTCOMEUNKNOWN" in str(e) or "UNAVAILABLE" in str(e), e
        errors.append(str(e))
    assert time.time() < deadline, errors
    time.sleep(0.05)
assert west.get("after") == b"1"

tx = r.pipeline(transaction=True)
tx.set("t", 1).incr("t")
assert tx.execute() == [True, 2]
pipe = r.pipeline(transaction=False)
for i in range(100):
    pipe.incr("counter")
assert pipe.execute()[-1] == 100

# The subscriber was re-subscribed on eu-west without doing anything.
deadline = time.time() + 15
while west.pubsub_numsub("events") != [(b"events", 1)]:
    assert time.time() < deadline, "subscriber never reached eu-west"
    time.sleep(0.05)
r.publish("events", "after")
msg = sub.get_message(timeout=5)
while msg is not None and msg["type"] != "message":
    msg = sub.get_message(timeout=5)
assert msg is not None and msg["data"] == b"after", msg
print(f"redis-py {redis.__version__} scenario: PASS ({len(errors)} proxy errors while switching)")
