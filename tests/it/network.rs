//! Network faults between geoproxy and a member, played by the fault relay: a partition
//! (black hole), a reset, and a far region (latency) that must not cause a failover.

use std::time::Duration;

use redis::Value;

use crate::support::eventually;
use crate::support::proxy::{Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;
use crate::support::relay::{Fault, FaultRelay};

const PATIENCE: Duration = Duration::from_secs(10);

/// us-east behind the relay, eu-west direct.
async fn behind_relay() -> (RedisServer, RedisServer, FaultRelay, Proxy) {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let relay = FaultRelay::start(&east.addr()).await;
    let members = [("us-east", relay.addr()), ("eu-west", west.addr())];
    let proxy = Proxy::start(&members, Options::default()).await;
    assert_eq!(proxy.active_member().await.as_deref(), Some("us-east"));
    (east, west, relay, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_fails_over_and_answers_the_command_in_flight() {
    let (_east, west, relay, proxy) = behind_relay().await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"SET k east\r\n", b"+OK\r\n").await;

    relay.set(Fault::BlackHole);
    raw.send(b"INCR hits\r\n").await;
    raw.read_outcome_unknown("us-east").await;
    raw.roundtrip(b"SET k west\r\n", b"+OK\r\n").await;
    assert_eq!(
        west.query(&["GET", "k"]),
        Value::BulkString(b"west".to_vec())
    );
    assert_eq!(proxy.active_member().await.as_deref(), Some("eu-west"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_fails_over_without_waiting_for_checks() {
    let (_east, west, relay, proxy) = behind_relay().await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"PING\r\n", b"+PONG\r\n").await;

    relay.set(Fault::Reset);
    // The RST races the next command: either the session saw it first (the probe confirms
    // the member down and the session goes to eu-west: the client sees only +OK), or the
    // command was in flight and gets the outcome-unknown error (its connection reset, or
    // the route left the member). The connection survives either way.
    raw.send(b"SET k west\r\n").await;
    let first = raw.read_until(b"\r\n").await;
    if first != b"+OK\r\n" {
        let line = String::from_utf8(first).unwrap();
        let reply = |cause: &str| {
            format!(
                "-OUTCOMEUNKNOWN geoproxy: member us-east failed before replying ({cause}); \
                 the command may or may not have run and was not retried\r\n"
            )
        };
        assert!(
            line == reply("connection lost") || line == reply("member down"),
            "{line:?}"
        );
        raw.roundtrip(b"SET k west\r\n", b"+OK\r\n").await;
    }
    assert_eq!(
        west.query(&["GET", "k"]),
        Value::BulkString(b"west".to_vec())
    );
    eventually(PATIENCE, "eu-west is active", || async {
        proxy.active_member().await.as_deref() == Some("eu-west")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_within_the_timeouts_is_not_a_failure() {
    let (east, _west, relay, proxy) = behind_relay().await;
    let mut c = proxy.connect().await;
    relay.set(Fault::Latency(Duration::from_millis(40)));
    for i in 0..10 {
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg(i)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    assert_eq!(east.query(&["GET", "k"]), Value::BulkString(b"9".to_vec()));
    // Checks (timeout 200 ms) pass through 80 ms round trips: still on us-east, no switch.
    let status = proxy.status().await;
    assert_eq!(status["active_member"], "us-east");
    assert_eq!(status["epoch"], 1);
    assert_eq!(status["members"][0]["state"], "up");
}
