//! The rest of Redis's command surface through geoproxy, no switch: blocking commands,
//! HELLO with AUTH and SETNAME, RESET, QUIT, MONITOR, functions, large replies.

use redis::{AsyncCommands, Value};

use crate::support::proxy::{Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;
use crate::support::wait_blocked;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_commands_timeouts_and_client_unblock() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"BLMOVE src dst LEFT RIGHT 0.2\r\n", b"*-1\r\n")
        .await;
    raw.roundtrip(b"BZPOPMIN z 0.2\r\n", b"*-1\r\n").await;
    raw.roundtrip(b"XREAD BLOCK 200 STREAMS s $\r\n", b"*-1\r\n")
        .await;
    raw.roundtrip(b"WAIT 0 100\r\n", b":0\r\n").await;

    // Blocked forever, then unblocked by CLIENT UNBLOCK from another connection.
    raw.roundtrip(b"CLIENT ID\r\n", b":").await;
    let id = String::from_utf8_lossy(&raw.read_until(b"\r\n").await)
        .trim()
        .to_string();
    raw.send(b"BLPOP q 0\r\n").await;
    wait_blocked(&member, 1).await;
    // Through the proxy the id is the upstream's, as the client itself saw it.
    let mut other = proxy.connect().await;
    let unblocked: i64 = redis::cmd("CLIENT")
        .arg("UNBLOCK")
        .arg(&id)
        .query_async(&mut other)
        .await
        .unwrap();
    assert_eq!(unblocked, 1);
    raw.roundtrip(b"", b"*-1\r\n").await;

    // BLMPOP and BZMPOP with data ready.
    let _: () = other.rpush("l", "x").await.unwrap();
    raw.roundtrip(
        b"BLMPOP 1 1 l LEFT\r\n",
        b"*2\r\n$1\r\nl\r\n*1\r\n$1\r\nx\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_with_auth_and_setname_reset_and_quit() {
    let member = RedisServer::start_with(&["--requirepass", "pw"]);
    let options = Options {
        password: Some("pw"),
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let mut raw = Raw::connect(proxy.addr).await;
    let hello = raw.hello("3 AUTH default pw SETNAME app").await;
    assert!(
        hello.starts_with(b"%7\r\n"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    raw.roundtrip(b"CLIENT GETNAME\r\n", b"$3\r\napp\r\n").await;
    raw.roundtrip(b"SELECT 2\r\n", b"+OK\r\n").await;
    // RESET: back to RESP2, db 0, no name, and (with requirepass) not authenticated.
    raw.roundtrip(b"RESET\r\n", b"+RESET\r\n").await;
    raw.send(b"CLIENT GETNAME\r\n").await;
    assert_eq!(raw.read_exact_len(7).await, b"-NOAUTH");
    raw.read_until(b"\r\n").await;
    raw.roundtrip(b"AUTH pw\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"CLIENT GETNAME\r\n", b"$-1\r\n").await;
    // QUIT: +OK, then the connection closes.
    raw.send(b"QUIT\r\n").await;
    assert_eq!(raw.read_to_close().await, b"+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_streams_what_the_member_runs() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut monitor = Raw::connect(proxy.addr).await;
    monitor.roundtrip(b"MONITOR\r\n", b"+OK\r\n").await;
    let mut c = proxy.connect().await;
    let _: () = c.set("watched", "1").await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\"watched\"") {
        seen.extend(monitor.read_exact_len(1).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_functions_and_admin_commands_pass_through() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut c = proxy.connect().await;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return ARGV[1]")
        .query_async(&mut c)
        .await
        .unwrap();
    let echoed: String = redis::cmd("EVALSHA")
        .arg(&sha)
        .arg(0)
        .arg("hi")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(echoed, "hi");
    let lib = "#!lua name=geo\nredis.register_function('twice', function(keys, args) return args[1] * 2 end)";
    let name: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(lib)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(name, "geo");
    let twice: i64 = redis::cmd("FCALL")
        .arg("twice")
        .arg(0)
        .arg(21)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(twice, 42);
    let _: () = c.set("o", "12345").await.unwrap();
    let enc: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg("o")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(enc, "int");
    let cfg: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(cfg[0], "maxmemory-policy");
    let slept: Value = redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(slept, Value::Okay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_reply_streams_through() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    // Build the value on the member itself (APPEND 10 x 10 MB), then read it through.
    let chunk = "y".repeat(10 * 1024 * 1024);
    let mut c = proxy.connect().await;
    for _ in 0..10 {
        let _: () = c.append("huge", &chunk).await.unwrap();
    }
    let len: usize = c.strlen("huge").await.unwrap();
    assert_eq!(len, 100 * 1024 * 1024);
    let got: Vec<u8> = c.get("huge").await.unwrap();
    assert_eq!(got.len(), len);
    assert!(got.iter().all(|&b| b == b'y'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_unwatch_discard_and_hello2() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut raw = Raw::connect(proxy.addr).await;
    // A watched key changed by another client: EXEC aborts (null), as Redis does.
    raw.roundtrip(b"WATCH w\r\n", b"+OK\r\n").await;
    member.query(&["SET", "w", "changed"]);
    raw.roundtrip(
        b"MULTI\r\nSET w mine\r\nEXEC\r\n",
        b"+OK\r\n+QUEUED\r\n*-1\r\n",
    )
    .await;
    raw.roundtrip(b"WATCH w\r\nUNWATCH\r\n", b"+OK\r\n+OK\r\n")
        .await;
    member.query(&["SET", "w", "again"]);
    raw.roundtrip(
        b"MULTI\r\nSET w mine\r\nEXEC\r\n",
        b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n",
    )
    .await;
    raw.roundtrip(
        b"MULTI\r\nINCR w2\r\nDISCARD\r\n",
        b"+OK\r\n+QUEUED\r\n+OK\r\n",
    )
    .await;
    assert_eq!(member.query(&["EXISTS", "w2"]), Value::Int(0));
    assert!(raw.hello("2 SETNAME two").await.starts_with(b"*14\r\n"));
    raw.roundtrip(b"CLIENT GETNAME\r\n", b"$3\r\ntwo\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_messages_arrive_in_order() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut sub = Raw::connect(proxy.addr).await;
    sub.roundtrip(
        b"SUBSCRIBE seq\r\n",
        b"*3\r\n$9\r\nsubscribe\r\n$3\r\nseq\r\n:1\r\n",
    )
    .await;
    let mut publisher = proxy.connect().await;
    for i in 0..200 {
        let _: i64 = publisher.publish("seq", i.to_string()).await.unwrap();
    }
    for i in 0..200 {
        let body = i.to_string();
        let want = format!(
            "*3\r\n$7\r\nmessage\r\n$3\r\nseq\r\n${}\r\n{body}\r\n",
            body.len()
        );
        assert_eq!(
            String::from_utf8_lossy(&sub.read_exact_len(want.len()).await),
            want
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xreadgroup_block_and_brpop() {
    let member = RedisServer::start();
    let proxy = Proxy::one_member(&member).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"XGROUP CREATE s g $ MKSTREAM\r\n", b"+OK\r\n")
        .await;
    raw.roundtrip(
        b"XREADGROUP GROUP g c BLOCK 100 STREAMS s >\r\n",
        b"*-1\r\n",
    )
    .await;
    raw.send(b"BRPOP l1 l2 0\r\n").await;
    wait_blocked(&member, 1).await;
    member.query(&["LPUSH", "l2", "v"]);
    raw.roundtrip(b"", b"*2\r\n$2\r\nl2\r\n$1\r\nv\r\n").await;
}
