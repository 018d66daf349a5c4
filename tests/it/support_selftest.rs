//! Tests of the test fixtures themselves: `RedisServer`, `FaultRelay`, `eventually`.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::support::eventually;
use crate::support::redis_server::RedisServer;
use crate::support::relay::{Fault, FaultRelay};

const SHORT: Duration = Duration::from_millis(300);

/// A multiplexed connection without the crate's default 500 ms response timeout,
/// so that only the test decides what counts as "hung".
async fn connect(url: &str) -> MultiplexedConnection {
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

async fn ping(con: &mut MultiplexedConnection) -> RedisResult<String> {
    redis::cmd("PING").query_async(con).await
}

fn relay_url(relay: &FaultRelay) -> String {
    format!("redis://{}/", relay.addr())
}

#[tokio::test]
async fn redis_server_set_get_kill_restart() {
    let mut server = RedisServer::start();
    let mut con = connect(&server.url()).await;
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    let got: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(got, "v");
    assert_eq!(
        server.query(&["GET", "k"]),
        Value::BulkString(b"v".to_vec())
    );

    server.kill();
    let err = std::net::TcpStream::connect(server.addr()).expect_err("killed server accepted");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

    server.restart();
    assert_eq!(server.query(&["PING"]), Value::SimpleString("PONG".into()));
    assert_eq!(
        server.query(&["GET", "k"]),
        Value::Nil,
        "data must not survive a restart"
    );
}

#[tokio::test]
async fn redis_server_requirepass() {
    let server = RedisServer::start_with(&["--requirepass", "pw"]);
    assert_eq!(server.query(&["SET", "a", "1"]), Value::Okay);

    let mut anonymous = connect(&server.url()).await;
    let err = ping(&mut anonymous).await.expect_err("PING without AUTH");
    assert_eq!(err.code(), Some("NOAUTH"));

    let mut authed = connect(&format!("redis://:pw@{}/", server.addr())).await;
    let got: String = redis::cmd("GET")
        .arg("a")
        .query_async(&mut authed)
        .await
        .unwrap();
    assert_eq!(got, "1");
}

#[tokio::test]
async fn redis_server_stop_hangs_and_cont_resumes() {
    let server = RedisServer::start();
    let mut con = connect(&server.url()).await;
    server.stop();
    assert!(
        timeout(SHORT, ping(&mut con)).await.is_err(),
        "stopped server answered"
    );
    // A hung member still accepts TCP connections (kernel backlog).
    timeout(SHORT, TcpStream::connect(server.addr()))
        .await
        .unwrap()
        .unwrap();

    server.cont();
    eventually(
        Duration::from_secs(2),
        "resumed server answers PING",
        || {
            let mut con = con.clone();
            async move { ping(&mut con).await.is_ok() }
        },
    )
    .await;
}

#[tokio::test]
async fn relay_forwards_and_closes_on_drop() {
    let server = RedisServer::start();
    let relay = FaultRelay::start(&server.addr()).await;
    let mut con = connect(&relay_url(&relay)).await;
    redis::cmd("SET")
        .arg("x")
        .arg("1")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    assert_eq!(
        server.query(&["GET", "x"]),
        Value::BulkString(b"1".to_vec())
    );

    let addr = relay.addr();
    drop(relay);
    eventually(
        Duration::from_secs(2),
        "connection via dropped relay fails",
        || {
            let mut con = con.clone();
            async move { ping(&mut con).await.is_err() }
        },
    )
    .await;
    eventually(
        Duration::from_secs(2),
        "dropped relay refuses connections",
        || {
            let addr = addr.clone();
            async move { TcpStream::connect(addr).await.is_err() }
        },
    )
    .await;
}

#[tokio::test]
async fn relay_latency_delays_each_direction() {
    let server = RedisServer::start();
    let relay = FaultRelay::start(&server.addr()).await;
    let mut con = connect(&relay_url(&relay)).await;

    relay.set(Fault::Latency(Duration::from_millis(200)));
    let started = Instant::now();
    ping(&mut con).await.unwrap();
    let rtt = started.elapsed();
    assert!(rtt >= Duration::from_millis(400), "PING took only {rtt:?}");

    relay.set(Fault::None);
    let started = Instant::now();
    ping(&mut con).await.unwrap();
    let rtt = started.elapsed();
    assert!(rtt < Duration::from_millis(200), "PING still slow: {rtt:?}");
}

#[tokio::test]
async fn relay_black_hole_swallows_existing_and_new_connections() {
    let server = RedisServer::start();
    let relay = FaultRelay::start(&server.addr()).await;
    let mut con = connect(&relay_url(&relay)).await;
    ping(&mut con).await.unwrap();

    relay.set(Fault::BlackHole);
    assert!(
        timeout(SHORT, ping(&mut con)).await.is_err(),
        "PING crossed a black hole"
    );

    let mut raw = TcpStream::connect(relay.addr())
        .await
        .expect("black hole still accepts");
    raw.write_all(b"PING\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    assert!(
        timeout(SHORT, raw.read(&mut buf)).await.is_err(),
        "black hole answered"
    );

    relay.set(Fault::None);
    let mut fresh = connect(&relay_url(&relay)).await;
    assert_eq!(ping(&mut fresh).await.unwrap(), "PONG");
}

#[tokio::test]
async fn relay_reset_breaks_existing_and_new_connections() {
    let server = RedisServer::start();
    let relay = FaultRelay::start(&server.addr()).await;
    let mut con = connect(&relay_url(&relay)).await;
    ping(&mut con).await.unwrap();

    relay.set(Fault::Reset);
    let result = timeout(Duration::from_secs(2), ping(&mut con)).await;
    assert!(result.expect("reset must fail fast, not hang").is_err());

    let mut raw = TcpStream::connect(relay.addr())
        .await
        .expect("reset still accepts");
    let mut buf = [0u8; 16];
    let read = timeout(Duration::from_secs(2), raw.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected RST, got {read:?}"
    );

    relay.set(Fault::None);
    let mut fresh = connect(&relay_url(&relay)).await;
    assert_eq!(ping(&mut fresh).await.unwrap(), "PONG");
}

#[tokio::test]
async fn eventually_returns_once_true() {
    let mut calls = 0;
    eventually(Duration::from_secs(1), "third call", || {
        calls += 1;
        let done = calls >= 3;
        async move { done }
    })
    .await;
    assert_eq!(calls, 3);
}

#[tokio::test]
#[should_panic(expected = "waiting for: never")]
async fn eventually_panics_on_timeout() {
    eventually(Duration::from_millis(100), "never", || async { false }).await;
}

/// Reads from `conn` until the bytes read contain `want` (2 s at most).
async fn read_until_contains(conn: &mut TcpStream, want: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !got.windows(want.len()).any(|w| w == want) {
        let mut chunk = [0u8; 512];
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, conn.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
            _ => panic!(
                "no {:?} in {:?}",
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(&got)
            ),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_forwards_once_and_honours_cuts() {
    use crate::support::bridge::Bridge;
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let bridge = Bridge::start(&[a.addr(), b.addr()]).await;
    let mut sub = TcpStream::connect(b.addr()).await.unwrap();
    sub.write_all(b"SUBSCRIBE geoproxy:x\r\n").await.unwrap();
    read_until_contains(&mut sub, b":1\r\n").await;
    a.query(&["PUBLISH", "geoproxy:x", "one"]);
    read_until_contains(&mut sub, b"one").await;
    // Once: the copy on b is not sent back to a (and again to b).
    bridge.cut(0, 1, true);
    a.query(&["PUBLISH", "geoproxy:x", "two"]);
    a.query(&["PUBLISH", "geoproxy:x", "three"]);
    eventually(
        Duration::from_secs(2),
        "the bridge saw three messages",
        || async { bridge.seen() == 3 },
    )
    .await;
    bridge.cut(0, 1, false);
    a.query(&["PUBLISH", "geoproxy:x", "four"]);
    let got = read_until_contains(&mut sub, b"four").await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains("two") && !text.contains("three") && !text.contains("one"),
        "{text}"
    );
}
