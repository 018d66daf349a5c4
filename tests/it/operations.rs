//! The operator's requests on the admin API beyond switchover: drain and enable a member,
//! against real members, with the token required.

use std::time::Duration;

use redis::Value;

use crate::support::eventually;
use crate::support::proxy::{two, wait_active, Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_member_is_left_at_quiescent_points_and_returned_to_once_enabled() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let proxy = Proxy::start(
        &two(&east, &west),
        Options {
            extra_admin: "token = \"ops-token\"",
            ..Options::default()
        },
    )
    .await;
    wait_active(&proxy, "us-east").await;
    let token = Some("ops-token");
    let drain = "/v1/members/us-east/drain";

    // Refused requests change nothing.
    let (code, text) = proxy.post(drain, "", None).await;
    assert_eq!(code, 401, "{text}");
    let (code, text) = proxy.post("/v1/members/us-east/pause", "", token).await;
    assert_eq!(
        (code, text.contains("\"not_found\"")),
        (404, true),
        "{text}"
    );
    let (code, text) = proxy.post("/v1/members/mars/drain", "", token).await;
    assert_eq!(
        (code, text.contains("\"unknown_member\"")),
        (404, true),
        "{text}"
    );
    assert_eq!(proxy.epoch().await, 1);

    // A transaction is open on us-east when it is drained: it finishes there.
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"MULTI\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"SET in-multi 1\r\n", b"+QUEUED\r\n").await;
    let (code, text) = proxy.post(drain, "", token).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"active_member\":\"eu-west\""), "{text}");
    raw.roundtrip(b"EXEC\r\n", b"*1\r\n+OK\r\n").await;
    assert_eq!(
        east.query(&["GET", "in-multi"]),
        Value::BulkString(b"1".to_vec())
    );
    // Its next command goes to eu-west: the session moved at its quiescent point.
    raw.roundtrip(b"SET after 2\r\n", b"+OK\r\n").await;
    assert_eq!(
        west.query(&["GET", "after"]),
        Value::BulkString(b"2".to_vec())
    );
    assert_eq!(east.query(&["EXISTS", "after"]), Value::Int(0));

    let status = proxy.status().await;
    assert_eq!(status["members"][0]["drained"], true);
    let last = status["switches"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["reason"], "drain");
    assert_eq!(
        proxy
            .metric("geoproxy_member_drained{member=\"us-east\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("geoproxy_admin_operations_total{operation=\"drain\"}")
            .await,
        1.0
    );
    // Healthy and preferred, but drained: no failback past failback_after (1 s). (A
    // bounded wait for something that must not happen.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(proxy.active_member().await.as_deref(), Some("eu-west"));
    // The last member up cannot be drained.
    let (code, text) = proxy.post("/v1/members/eu-west/drain", "", token).await;
    assert_eq!(
        (code, text.contains("\"last_member\"")),
        (409, true),
        "{text}"
    );
    // A switchover to the drained member is refused.
    let (code, text) = proxy
        .post("/v1/switchover", r#"{"to": "us-east"}"#, token)
        .await;
    assert_eq!(
        (code, text.contains("\"member_drained\"")),
        (409, true),
        "{text}"
    );

    // Enabled: traffic returns by the failback rules (it was left long enough ago).
    let (code, text) = proxy.post("/v1/members/us-east/enable", "", token).await;
    assert_eq!(code, 200, "{text}");
    wait_active(&proxy, "us-east").await;
    eventually(
        Duration::from_secs(5),
        "the session is back on us-east",
        || async {
            let mut raw = Raw::connect(proxy.addr).await;
            raw.roundtrip(b"SET back 3\r\n", b"+OK\r\n").await;
            east.query(&["EXISTS", "back"]) == Value::Int(1)
        },
    )
    .await;
    assert_eq!(proxy.status().await["members"][0]["drained"], false);
    assert_eq!(
        proxy
            .metric("geoproxy_member_drained{member=\"us-east\"}")
            .await,
        0.0
    );
}
