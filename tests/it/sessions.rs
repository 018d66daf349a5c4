//! Session rules that decide when and how a session moves: blocking commands, transactions,
//! WATCH, subscriptions, and the proxy's own answers when a member fails mid-transaction.

use std::time::Duration;

use tokio::io::AsyncReadExt;

use redis::Value;

use crate::support::proxy::{two, wait_active, Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;
use crate::support::{eventually, wait_blocked};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_commands_are_exempt_from_reply_timeout() {
    let member = RedisServer::start();
    let options = Options {
        reply_timeout: "300ms",
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let mut raw = Raw::connect(proxy.addr).await;
    // BLPOP for 1 s: longer than reply_timeout, and the member is healthy.
    raw.roundtrip(b"BLPOP q 1\r\n", b"*-1\r\n").await;
    // Pushed while blocked: the reply comes through.
    raw.send(b"BLPOP q 0\r\n").await;
    wait_blocked(&member, 1).await;
    member.query(&["RPUSH", "q", "job"]);
    let want = b"*2\r\n$1\r\nq\r\n$3\r\njob\r\n";
    assert_eq!(raw.read_exact_len(want.len()).await, want);
    assert_eq!(
        proxy
            .metric("geoproxy_inflight_errors_total{member=\"local\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_exec_through_the_proxy() {
    let member = RedisServer::start();
    let proxy = Proxy::start(&[("local", member.addr())], Options::default()).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"MULTI\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"INCR a\r\n", b"+QUEUED\r\n").await;
    raw.roundtrip(b"INCR a\r\n", b"+QUEUED\r\n").await;
    raw.roundtrip(b"EXEC\r\n", b"*2\r\n:1\r\n:2\r\n").await;
    // EXECABORT from the member itself passes through.
    raw.roundtrip(b"MULTI\r\n", b"+OK\r\n").await;
    raw.send(b"NOSUCHCOMMAND\r\n").await;
    let e = raw.read_exact_len(4).await;
    assert_eq!(&e, b"-ERR");
    raw.read_until(b"\r\n").await;
    raw.roundtrip(
        b"EXEC\r\n",
        b"-EXECABORT Transaction discarded because of previous errors.\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_failing_inside_multi_aborts_the_transaction() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"MULTI\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"INCR t\r\n", b"+QUEUED\r\n").await;
    east.kill();
    wait_active(&proxy, "eu-west").await;
    // The queued INCR died with us-east: more commands are refused, EXEC fails.
    raw.roundtrip(
        b"INCR t\r\n",
        b"-ERR geoproxy: transaction discarded because member us-east failed; EXEC will fail\r\n",
    )
    .await;
    raw.roundtrip(
        b"EXEC\r\n",
        b"-EXECABORT Transaction discarded because member us-east failed (geoproxy)\r\n",
    )
    .await;
    // Then the session carries on, on eu-west, where nothing ran.
    raw.roundtrip(b"GET t\r\n", b"$-1\r\n").await;
    assert_eq!(west.query(&["EXISTS", "t"]), Value::Int(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_watch_aborts_exec_like_a_changed_key() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"WATCH w\r\n", b"+OK\r\n").await;
    east.kill();
    wait_active(&proxy, "eu-west").await;
    // Reads between WATCH and MULTI still work (on eu-west)...
    raw.roundtrip(b"GET w\r\n", b"$-1\r\n").await;
    // ...but the transaction must not run unguarded: EXEC answers null, as Redis does when
    // a watched key changed.
    raw.roundtrip(b"MULTI\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"SET w 1\r\n", b"+QUEUED\r\n").await;
    raw.roundtrip(b"EXEC\r\n", b"*-1\r\n").await;
    assert_eq!(west.query(&["EXISTS", "w"]), Value::Int(0));
    // A fresh transaction works normally again.
    raw.roundtrip(b"MULTI\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"SET w 2\r\n", b"+QUEUED\r\n").await;
    raw.roundtrip(b"EXEC\r\n", b"*1\r\n+OK\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_finishes_before_its_session_moves_and_subscribers_follow() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let options = Options {
        failback_after: "300ms",
        ..Options::default()
    };
    let proxy = Proxy::start(&two(&east, &west), options).await;
    east.kill();
    wait_active(&proxy, "eu-west").await;
    let mut txn = Raw::connect(proxy.addr).await;
    txn.roundtrip(b"MULTI\r\n", b"+OK\r\n").await;
    txn.roundtrip(b"SET x 1\r\n", b"+QUEUED\r\n").await;
    let mut sub = Raw::connect(proxy.addr).await;
    sub.roundtrip(
        b"SUBSCRIBE news\r\nPSUBSCRIBE n*\r\n",
        b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:2\r\n",
    )
    .await;

    east.restart();
    wait_active(&proxy, "us-east").await;
    // The transaction finishes where it started, then the session follows the route.
    txn.roundtrip(b"EXEC\r\n", b"*1\r\n+OK\r\n").await;
    assert_eq!(west.query(&["GET", "x"]), Value::BulkString(b"1".to_vec()));
    txn.roundtrip(b"SET y 1\r\n", b"+OK\r\n").await;
    assert_eq!(east.query(&["GET", "y"]), Value::BulkString(b"1".to_vec()));
    // The idle subscriber moved too, its channel and pattern subscribed on us-east.
    let east = &east;
    eventually(
        Duration::from_secs(10),
        "the subscriber is on us-east",
        || async move {
            east.query(&["PUBSUB", "NUMSUB", "news"])
                == Value::Array(vec![Value::BulkString(b"news".to_vec()), Value::Int(1)])
                && east.query(&["PUBSUB", "NUMPAT"]) == Value::Int(1)
        },
    )
    .await;
    east.query(&["PUBLISH", "news", "hello"]);
    let msg = b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n";
    assert_eq!(sub.read_exact_len(msg.len()).await, msg);
    let pmsg = b"*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$5\r\nhello\r\n";
    assert_eq!(sub.read_exact_len(pmsg.len()).await, pmsg);
    // Unsubscribed, it is an ordinary connection again.
    sub.roundtrip(
        b"UNSUBSCRIBE\r\nPUNSUBSCRIBE\r\nSET z 1\r\n",
        b"*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:1\r\n*3\r\n$12\r\npunsubscribe\r\n$2\r\nn*\r\n:0\r\n+OK\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_resubscribe_when_their_member_dies() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut sub = Raw::connect(proxy.addr).await;
    sub.roundtrip(
        b"SSUBSCRIBE orders\r\n",
        b"*3\r\n$10\r\nssubscribe\r\n$6\r\norders\r\n:1\r\n",
    )
    .await;
    east.query(&["SPUBLISH", "orders", "one"]);
    let one = b"*3\r\n$8\r\nsmessage\r\n$6\r\norders\r\n$3\r\none\r\n";
    assert_eq!(sub.read_exact_len(one.len()).await, one);

    east.kill();
    let west = &west;
    eventually(
        Duration::from_secs(10),
        "re-subscribed on eu-west",
        || async move {
            west.query(&["PUBSUB", "SHARDNUMSUB", "orders"])
                == Value::Array(vec![Value::BulkString(b"orders".to_vec()), Value::Int(1)])
        },
    )
    .await;
    west.query(&["SPUBLISH", "orders", "two"]);
    let two = b"*3\r\n$8\r\nsmessage\r\n$6\r\norders\r\n$3\r\ntwo\r\n";
    assert_eq!(sub.read_exact_len(two.len()).await, two);
    // RESP2 PING in subscribed mode is answered as Redis does.
    sub.roundtrip(b"PING\r\n", b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_subscribers_get_pushes_and_can_run_commands() {
    let member = RedisServer::start();
    let proxy = Proxy::start(&[("local", member.addr())], Options::default()).await;
    let mut c = Raw::connect(proxy.addr).await;
    c.hello("3").await;
    c.roundtrip(
        b"SUBSCRIBE a\r\nSET k v\r\nGET k\r\n",
        b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n+OK\r\n$1\r\nv\r\n",
    )
    .await;
    member.query(&["PUBLISH", "a", "hi"]);
    let push = b">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n";
    assert_eq!(c.read_exact_len(push.len()).await, push);
    c.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_is_not_timed_out_while_waiting_for_messages() {
    let member = RedisServer::start();
    let options = Options {
        reply_timeout: "300ms",
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let mut sub = Raw::connect(proxy.addr).await;
    // A command and SUBSCRIBE in one write: the PING reply is still owed when the session
    // stops counting replies.
    sub.roundtrip(
        b"PING\r\nSUBSCRIBE ch\r\n",
        b"+PONG\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
    )
    .await;
    // Quiet for several reply timeouts (a bounded wait for something that must not happen).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    member.query(&["PUBLISH", "ch", "late"]);
    let msg = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$4\r\nlate\r\n";
    assert_eq!(sub.read_exact_len(msg.len()).await, msg);
    assert_eq!(
        proxy.metric("geoproxy_member_up{member=\"local\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tracking_moves_and_the_client_is_told_to_flush() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut c = Raw::connect(proxy.addr).await;
    c.hello("3").await;
    c.roundtrip(b"CLIENT TRACKING ON\r\n", b"+OK\r\n").await;
    c.roundtrip(b"GET k\r\n", b"_\r\n").await;
    east.query(&["SET", "k", "1"]);
    let invalidate_k = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n";
    assert_eq!(c.read_exact_len(invalidate_k.len()).await, invalidate_k);

    east.kill();
    // The next command waits for eu-west; on the way the client is told to flush.
    c.send(b"GET k\r\n").await;
    let flush = b">2\r\n$10\r\ninvalidate\r\n_\r\n";
    assert_eq!(c.read_exact_len(flush.len()).await, flush);
    assert_eq!(c.read_exact_len(3).await, b"_\r\n");
    // Tracking is on again, on eu-west.
    west.query(&["SET", "k", "2"]);
    assert_eq!(c.read_exact_len(invalidate_k.len()).await, invalidate_k);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_tracking_with_redirect_passes_through() {
    let member = RedisServer::start();
    let proxy = Proxy::start(&[("local", member.addr())], Options::default()).await;
    let mut sink = Raw::connect(proxy.addr).await;
    sink.send(b"CLIENT ID\r\n").await;
    let id = sink.read_until(b"\r\n").await;
    let id = String::from_utf8_lossy(&id[1..id.len() - 2]).to_string();
    sink.roundtrip(
        b"SUBSCRIBE __redis__:invalidate\r\n",
        b"*3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n",
    )
    .await;
    let mut c = Raw::connect(proxy.addr).await;
    c.roundtrip(
        format!("CLIENT TRACKING ON REDIRECT {id}\r\n").as_bytes(),
        b"+OK\r\n",
    )
    .await;
    c.roundtrip(b"GET k\r\n", b"$-1\r\n").await;
    member.query(&["SET", "k", "1"]);
    let msg = b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\nk\r\n";
    assert_eq!(sink.read_exact_len(msg.len()).await, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello3_and_subscribe_in_one_pipeline() {
    let member = RedisServer::start();
    let options = Options {
        reply_timeout: "300ms",
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let mut c = Raw::connect(proxy.addr).await;
    c.send(b"HELLO 3\r\nSUBSCRIBE a\r\n").await;
    let confirm = b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n";
    c.read_until(confirm).await;
    // Nothing is left owed: past reply_timeout the session is still fine.
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
}

/// PUBLISH is flagged `pubsub` in the member's COMMAND table, but it is an ordinary
/// command: a session that published moves and survives a failover like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_published_survives_a_failover() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut raw = Raw::connect(proxy.addr).await;
    // The checker has fetched us-east's COMMAND table once PUBLISH's flag is known.
    eventually(
        Duration::from_secs(5),
        "the COMMAND table is fetched",
        || async { east.info_field("commandstats", "cmdstat_command").is_some() },
    )
    .await;
    raw.roundtrip(b"PUBLISH ch hi\r\n", b":0\r\n").await;
    raw.roundtrip(b"SPUBLISH ch hi\r\n", b":0\r\n").await;
    east.kill();
    wait_active(&proxy, "eu-west").await;
    raw.roundtrip(b"SET k v\r\n", b"+OK\r\n").await;
    assert_eq!(west.query(&["GET", "k"]), Value::BulkString(b"v".to_vec()));
}

/// A member that hangs while QUIT is in flight: the session ends (it does not wait forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_in_flight_on_a_hung_member_ends_the_session() {
    let member = RedisServer::start();
    // The 1:1 model, where QUIT goes to the member. A shared session's QUIT is answered by
    // geoproxy (it must not close a shared connection).
    let options = Options {
        multiplex: Some(false),
        reply_timeout: "300ms",
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    member.stop();
    raw.send(b"QUIT\r\n").await;
    let started = std::time::Instant::now();
    assert_eq!(raw.read_to_close().await, b"");
    assert!(started.elapsed() < Duration::from_secs(3));
    member.cont();
}

/// SYNC's RDB payload is a bulk without its CRLF: the session relays it raw, with the
/// replication stream after it, instead of closing on "malformed RESP".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_relays_the_rdb_and_the_replication_stream() {
    let member = RedisServer::start();
    member.query(&["SET", "before", "1"]);
    let proxy = Proxy::one_member(&member).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"SYNC\r\n").await;
    let head = raw.read_until(b"REDIS").await;
    assert!(
        head.starts_with(b"$") || head.starts_with(b"\n"),
        "{head:?}"
    );
    member.query(&["SET", "after", "2"]);
    // Bounded: each read waits at most until the deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while !seen.windows(5).any(|w| w == b"after") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, raw.0.read(&mut buf))
            .await
            .expect("the SET is relayed within 5 s")
            .expect("the session stays open");
        assert!(n > 0, "the session stays open");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// A client that connects and sends nothing (a load balancer's TCP probe, an idle pool
/// connection) costs the member no connection; its first command opens one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_member_connection_before_the_first_command() {
    let member = RedisServer::start();
    // Checks that never reconnect during the test: every new connection is a session's.
    let options = Options {
        interval: "10s",
        extra_health: "reconnect_interval = \"1h\"",
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let connections = || member.connections_received();
    let before = connections();
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(Raw::connect(proxy.addr).await);
    }
    let p = &proxy;
    eventually(Duration::from_secs(5), "20 sessions open", || async move {
        p.metric("geoproxy_sessions_open").await == 20.0
    })
    .await;
    // A probe that connects and leaves, too.
    drop(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    // The check above and this one each opened one connection to ask (`info_field`).
    assert_eq!(
        connections(),
        before + 1,
        "idle clients opened member connections"
    );
    idle[0].roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    assert_eq!(
        connections(),
        before + 3,
        "the first command opens one connection"
    );
}
