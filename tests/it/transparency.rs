//! Redis features through geoproxy with no switch: every reply as Redis gives it.

use std::time::Duration;

use redis::{AsyncCommands, Value};

use crate::support::proxy::{connect, Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_types_scripts_and_streams() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut c = proxy.connect().await;

    let _: () = c.set("s", "v").await.unwrap();
    assert_eq!(c.get::<_, String>("s").await.unwrap(), "v");
    assert_eq!(c.incr::<_, _, i64>("n", 5).await.unwrap(), 5);
    let _: () = c
        .hset_multiple("h", &[("a", "1"), ("b", "2")])
        .await
        .unwrap();
    let h: std::collections::HashMap<String, String> = c.hgetall("h").await.unwrap();
    assert_eq!(h.len(), 2);
    let _: () = c.rpush("l", &["x", "y", "z"]).await.unwrap();
    assert_eq!(
        c.lrange::<_, Vec<String>>("l", 0, -1).await.unwrap(),
        ["x", "y", "z"]
    );
    let _: () = c.sadd("set", &["a", "b"]).await.unwrap();
    assert_eq!(c.scard::<_, i64>("set").await.unwrap(), 2);
    let _: () = c
        .zadd_multiple("z", &[(1, "one"), (2, "two")])
        .await
        .unwrap();
    assert_eq!(
        c.zrange::<_, Vec<String>>("z", 0, -1).await.unwrap(),
        ["one", "two"]
    );
    let id: String = c.xadd("st", "*", &[("f", "v")]).await.unwrap();
    let len: i64 = c.xlen("st").await.unwrap();
    assert!(id.contains('-') && len == 1);

    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let n: i64 = script.key("n").arg(10).invoke_async(&mut c).await.unwrap();
    assert_eq!(n, 15);
    // An application error is passed through untouched.
    let err = c.lpush::<_, _, ()>("s", "x").await.unwrap_err();
    assert_eq!(err.code(), Some("WRONGTYPE"));
    // And the data really is on the member.
    assert_eq!(
        member.query(&["GET", "n"]),
        Value::BulkString(b"15".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_of_1000_and_a_10_mb_value() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut c = proxy.connect().await;

    let mut pipe = redis::pipe();
    for i in 0..1000 {
        pipe.set(format!("k{i}"), i).ignore();
    }
    for i in 0..1000 {
        pipe.get(format!("k{i}"));
    }
    let got: Vec<i64> = pipe.query_async(&mut c).await.unwrap();
    assert_eq!(got, (0..1000).collect::<Vec<_>>());

    let big = "x".repeat(10 * 1024 * 1024);
    let _: () = c.set("big", &big).await.unwrap();
    let back: String = c.get("big").await.unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_auth_and_hello3() {
    let member = RedisServer::start_with(&["--requirepass", "sesame"]);
    let options = Options {
        password: Some("sesame"),
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;

    // Without AUTH the member says NOAUTH, through the proxy as directly.
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"*1\r\n$4\r\nPING\r\n").await;
    let reply = raw.read_exact_len(8).await;
    assert_eq!(&reply, b"-NOAUTH ");

    let url = format!("redis://:sesame@{}/3", proxy.addr);
    let mut c = connect(&url).await;
    let _: () = c.set("k", "in db 3").await.unwrap();
    let in_db3 = [
        "EVAL",
        "redis.call('SELECT', 3) return redis.call('GET', 'k')",
        "0",
    ];
    assert_eq!(
        member.query(&in_db3),
        Value::BulkString(b"in db 3".to_vec())
    );

    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"*2\r\n$4\r\nAUTH\r\n$6\r\nsesame\r\n", b"+OK\r\n")
        .await;
    raw.send(b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n").await;
    let hello = raw.read_exact_len(1).await;
    assert_eq!(&hello, b"%", "HELLO 3 answers a RESP3 map");
    // Drain the map, then a RESP3-only reply type proves the protocol switched.
    raw.read_until(b"*0\r\n").await;
    raw.roundtrip(b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n", b"+OK\r\n")
        .await;
    raw.roundtrip(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", b"$7\r\nin db 3\r\n")
        .await;
    raw.roundtrip(b"*2\r\n$3\r\nGET\r\n$7\r\nmissing\r\n", b"_\r\n")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_and_empty_lines() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    raw.roundtrip(b"\r\nset greeting \"hello world\"\r\n", b"+OK\r\n")
        .await;
    raw.roundtrip(b"GET greeting\n", b"$11\r\nhello world\r\n")
        .await;
    // Inline and multibulk mixed in one write keep their order.
    raw.roundtrip(
        b"*1\r\n$4\r\nPING\r\nECHO a\r\n*2\r\n$4\r\nECHO\r\n$1\r\nb\r\n",
        b"+PONG\r\n$1\r\na\r\n$1\r\nb\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resp_gets_redis_protocol_error_and_others_are_untouched() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut bystander = proxy.connect().await;

    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"*1\r\n$4\r\nPING\r\n*1\r\n$-5\r\n").await;
    let got = raw.read_to_close().await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "+PONG\r\n-ERR Protocol error: invalid bulk length\r\n"
    );
    let mut raw = Raw::connect(proxy.addr).await;
    // Over INT_MAX, as Redis says (up to it, Redis waits for the elements).
    raw.send(b"*2147483648\r\n").await;
    let got = raw.read_to_close().await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "-ERR Protocol error: invalid multibulk length\r\n"
    );
    let pong: String = redis::cmd("PING")
        .query_async(&mut bystander)
        .await
        .unwrap();
    assert_eq!(pong, "PONG");
    assert!(proxy.metric("geoproxy_protocol_errors_total").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_is_enforced_as_redis_does() {
    let member = RedisServer::start();
    let options = Options {
        max_clients: 2,
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let mut a = Raw::connect(proxy.addr).await;
    let mut b = Raw::connect(proxy.addr).await;
    a.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    b.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    let mut c = Raw::connect(proxy.addr).await;
    let got = c.read_to_close().await;
    assert_eq!(got, b"-ERR max number of clients reached\r\n");
    drop(a);
    let p = &proxy;
    crate::support::eventually(
        Duration::from_secs(5),
        "the closed session ends",
        || async move { p.metric("geoproxy_sessions_open").await == 1.0 },
    )
    .await;
    let mut d = Raw::connect(proxy.addr).await;
    d.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    assert!(proxy.metric("geoproxy_rejected_connections_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_and_skip_keep_the_reply_count_right() {
    let member = RedisServer::start();
    let options = Options {
        reply_timeout: "200ms",
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(
        b"CLIENT REPLY OFF\r\nSET a 1\r\nINCR a\r\nCLIENT REPLY ON\r\nGET a\r\n",
        b"+OK\r\n$1\r\n2\r\n",
    )
    .await;
    raw.roundtrip(b"CLIENT REPLY SKIP\r\nSET b 2\r\nGET b\r\n", b"$1\r\n2\r\n")
        .await;
    // Had the proxy counted replies that never come, it would now time them out, answer
    // -OUTCOMEUNKNOWN and mark the member down. Wait past reply_timeout (a bounded wait for
    // something that must not happen), then check.
    tokio::time::sleep(Duration::from_millis(500)).await;
    raw.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    assert_eq!(
        proxy.metric("geoproxy_member_up{member=\"local\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_serves_as_the_tcp_port_does_and_goes_at_shutdown() {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let member = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("geoproxy.sock");
    // A file left by an earlier run is replaced, as Redis does.
    std::fs::write(&path, b"stale").unwrap();
    let keys = format!("unixsocket = \"{}\"\nunixsocketperm = 770", path.display());
    let proxy = Proxy::start(
        &[("local", member.addr())],
        Options {
            extra_proxy: Box::leak(keys.into_boxed_str()),
            ..Options::default()
        },
    )
    .await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o770);
    let mut unix = tokio::net::UnixStream::connect(&path).await.unwrap();
    unix.write_all(b"SET via unix\r\nGET via\r\nPING\r\n")
        .await
        .unwrap();
    let want = b"+OK\r\n$4\r\nunix\r\n+PONG\r\n";
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(5), unix.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, want);
    assert_eq!(
        proxy.metric("geoproxy_client_bytes_received_total").await,
        29.0
    );
    assert!(proxy.metric("geoproxy_client_bytes_sent_total").await >= want.len() as f64);
    let timed = "geoproxy_command_duration_seconds_count{member=\"local\"}";
    assert_eq!(proxy.metric(timed).await, 3.0);
    drop(unix);
    proxy.stop().await;
    assert!(!path.exists(), "the socket file stays after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_and_build_metrics_and_no_member_down_before_its_first_check() {
    use crate::support::relay::{Fault, FaultRelay};
    let member = RedisServer::start();
    let relay = FaultRelay::start(&member.addr()).await;
    relay.set(Fault::BlackHole);
    // The first check cannot finish for 5 s (a PING into a black hole).
    let proxy = Proxy::start_unrouted(
        &[("local", relay.addr())],
        Options {
            check_timeout: "5s",
            interval: "10s",
            ..Options::default()
        },
    )
    .await;
    let (_, text) = proxy.get("/metrics").await;
    assert!(text.contains("geoproxy_build_info{version=\""), "{text}");
    assert!(text.contains("process_open_fds "), "{text}");
    assert!(text.contains("process_resident_memory_bytes "), "{text}");
    assert!(
        !text.contains("geoproxy_member_up{"),
        "a member not checked yet is reported: {text}"
    );
    assert_eq!(proxy.status().await["members"][0]["state"], "unknown");
}
