//! No input can crash, hang or bloat the proxy: large arguments stream, what the proxy
//! holds for one client is bounded, idle clients are closed as Redis closes them, a failed
//! move backs off, and hostile clients cannot hurt a well-behaved one.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::binary::Binary;
use crate::support::eventually;
use crate::support::proxy::{two, wait_active, Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;

/// A large argument streams to the member as it arrives: the proxy never holds it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_argument_streams_through_without_growing_the_proxy() {
    let member = RedisServer::start();
    let proxy = Binary::start(&member).await;
    let before = proxy.rss_kib();
    let mut raw = Raw::connect(proxy.addr).await;
    let size = 100 * 1024 * 1024;
    raw.send(format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${size}\r\n").as_bytes())
        .await;
    let chunk = vec![b'v'; 1024 * 1024];
    let mut peak = before;
    for i in 0..100 {
        raw.send(&chunk).await;
        if i % 10 == 0 {
            peak = peak.max(proxy.rss_kib());
        }
    }
    raw.send(b"\r\n").await;
    raw.roundtrip(b"STRLEN big\r\n", b"+OK\r\n:104857600\r\n")
        .await;
    let peak = peak.max(proxy.rss_kib());
    assert!(
        peak < before + 32 * 1024,
        "RSS grew from {before} KiB to {peak} KiB while a 100 MB argument went through"
    );
}

/// A command the proxy must hold whole (its arguments matter to the session) is bounded by
/// `client_query_buffer_limit`: beyond it the client is closed without a reply, as Redis
/// closes it, and nobody else notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_over_the_query_buffer_limit_closes_that_client_only() {
    let member = RedisServer::start();
    let options = Options {
        extra_proxy: "client_query_buffer_limit = \"1mb\"",
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let mut bystander = Raw::connect(proxy.addr).await;
    let mut raw = Raw::connect(proxy.addr).await;
    // SUBSCRIBE's channel names are read by the session, so it is held whole.
    let name = "c".repeat(2 * 1024 * 1024);
    let cmd = format!("*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{name}\r\n", name.len());
    let _ = raw.0.write_all(cmd.as_bytes()).await; // the proxy may close mid-write
    assert_eq!(raw.read_to_close().await, b"");
    bystander.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    // A plain command of the same size streams and works.
    let value = "v".repeat(2 * 1024 * 1024);
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(
        format!(
            "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n{value}\r\n",
            value.len()
        )
        .as_bytes(),
    )
    .await;
    raw.roundtrip(b"STRLEN k\r\n", b"+OK\r\n:2097152\r\n").await;
}

/// `proxy.client_idle_timeout`, as Redis's `timeout`: idle clients are closed; subscribed
/// and blocked clients are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_but_subscribers_and_blocked_clients_stay() {
    let member = RedisServer::start();
    let options = Options {
        extra_proxy: "client_idle_timeout = \"300ms\"",
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let mut idle = Raw::connect(proxy.addr).await;
    idle.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    let mut subscriber = Raw::connect(proxy.addr).await;
    subscriber
        .roundtrip(
            b"SUBSCRIBE ch\r\n",
            b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
        )
        .await;
    let mut blocked = Raw::connect(proxy.addr).await;
    blocked.send(b"BLPOP q 0\r\n").await;
    let started = std::time::Instant::now();
    assert_eq!(idle.read_to_close().await, b"", "closed without a reply");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "closed after {waited:?}, want about 300 ms"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    member.query(&["PUBLISH", "ch", "hi"]);
    let message = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n";
    assert_eq!(subscriber.read_exact_len(message.len()).await, message);
    member.query(&["RPUSH", "q", "job"]);
    let want = b"*2\r\n$1\r\nq\r\n$3\r\njob\r\n";
    assert_eq!(blocked.read_exact_len(want.len()).await, want);
}

/// A session that cannot move (its state is refused on the route's member) stays where it
/// is and tries again after a backoff, not on every command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_move_backs_off() {
    // us-east has 2 databases: a session on database 5 cannot be replayed there.
    let mut east = RedisServer::start_with(&["--databases", "2"]);
    let west = RedisServer::start();
    let options = Options {
        failback_after: "200ms",
        ..Options::default()
    };
    east.kill();
    let proxy = Proxy::start_unrouted(&two(&east, &west), options).await;
    wait_active(&proxy, "eu-west").await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"SELECT 5\r\n", b"+OK\r\n").await;
    east.restart();
    wait_active(&proxy, "us-east").await;
    let connections = RedisServer::connections_received;
    let before = connections(&east);
    let started = std::time::Instant::now();
    for _ in 0..300 {
        raw.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    }
    let attempts = connections(&east) - before;
    // Checks open at most a few connections in that time; without a backoff the session
    // alone would try 300 times.
    assert!(
        attempts < 40,
        "{attempts} connections to us-east in {:?}",
        started.elapsed()
    );
    raw.roundtrip(b"SET k v\r\n", b"+OK\r\n").await;
    assert_eq!(west.query(&["SELECT", "5"]), redis::Value::Okay);
}

/// Many hostile clients at once (malformed, truncated, oversized and random RESP, huge
/// headers dripped slowly, pipelines never read) while a well-behaved client keeps getting
/// correct replies; the proxy stays up and its memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_cannot_hurt_a_good_one_or_bloat_the_proxy() {
    let member = RedisServer::start();
    member.query(&["SET", "big", &"b".repeat(16 * 1024)]);
    let proxy = Binary::start_with(&member, "client_query_buffer_limit = \"2mb\"").await;
    let before = proxy.rss_kib();
    let addr = proxy.addr;
    let mut tasks = Vec::new();
    for i in 0..120u64 {
        tasks.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return;
            };
            let mut rng = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            // Each hostile client gives up after a while (a blocked write included).
            let scenario = async {
                match i % 6 {
                    // Malformed.
                    0 => {
                        let _ = s.write_all(b"*1\r\n$4\r\nPING\r\n*x\r\n").await;
                    }
                    // A huge bulk header, then its body dripped slowly.
                    1 => {
                        let _ = s.write_all(b"*2\r\n$3\r\nGET\r\n$536870912\r\n").await;
                        for _ in 0..20 {
                            if s.write_all(&[b'a'; 1024]).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    // Many large arguments of a command held whole (past the limit).
                    2 => {
                        let _ = s.write_all(b"*1048576\r\n$9\r\nSUBSCRIBE\r\n").await;
                        let arg = format!("${}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
                        for _ in 0..300 {
                            if s.write_all(arg.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                    }
                    // Random bytes.
                    3 => {
                        let junk: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
                        let _ = s.write_all(&junk).await;
                    }
                    // A pipeline of large replies, never read.
                    4 => {
                        let get = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n";
                        for _ in 0..300 {
                            if s.write_all(get).await.is_err() {
                                break;
                            }
                        }
                    }
                    // Truncated command, then silence.
                    _ => {
                        let _ = s.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk").await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(3), scenario).await;
            let mut sink = vec![0u8; 16];
            let _ = tokio::time::timeout(Duration::from_millis(10), s.read(&mut sink)).await;
        }));
    }
    // The good client, meanwhile.
    let mut good = Raw::connect(addr).await;
    for i in 0..200 {
        let value = format!("v{i}");
        let cmd = format!("SET key {value}\r\nGET key\r\n");
        let want = format!("+OK\r\n${}\r\n{value}\r\n", value.len());
        good.roundtrip(cmd.as_bytes(), want.as_bytes()).await;
    }
    let mut peak = proxy.rss_kib();
    for t in tasks {
        peak = peak.max(proxy.rss_kib());
        let _ = t.await;
    }
    eprintln!("hostile clients: RSS {before} KiB before, {peak} KiB at peak");
    // 120 clients, at most ~2 MB each for the 20 holding a command whole, far less for
    // the others: bounded well below what they sent or asked for (gigabytes announced,
    // 100 MB of replies requested and never read).
    assert!(
        peak < before + 96 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
    eventually(Duration::from_secs(5), "the proxy still serves", || async {
        let mut raw = Raw::connect(addr).await;
        raw.send(b"PING\r\n").await;
        raw.read_exact_len(7).await == b"+PONG\r\n"
    })
    .await;
}

/// A command held whole (AUTH's arguments are read) grows the buffer; once it is gone the
/// buffer is given back, so one big command does not cost its size for the session's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_that_grew_for_one_big_command_shrinks_back() {
    let member = RedisServer::start();
    let proxy = Binary::start(&member).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    let before = proxy.rss_kib();
    let password = "p".repeat(32 * 1024 * 1024);
    raw.send(format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{password}\r\n", password.len()).as_bytes())
        .await;
    drop(password);
    raw.read_until(b"\r\n").await; // Redis's error: no password is set
    let held = proxy.rss_kib();
    raw.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    let after = proxy.rss_kib();
    assert!(
        after < before + 8 * 1024,
        "RSS {before} KiB before, {held} KiB holding the command, {after} KiB after"
    );
}

/// A large command that arrives slowly streams to the member, and the member's silence is
/// not timed while the client is still sending it: a slow client is not a hung member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_command_dripped_slower_than_reply_timeout_is_not_a_hung_member() {
    let member = RedisServer::start();
    let options = Options {
        reply_timeout: "300ms",
        interval: "10s",
        ..Options::default()
    };
    let proxy = Proxy::start(&[("local", member.addr())], options).await;
    let epoch = proxy.status().await["epoch"].clone();
    let mut raw = Raw::connect(proxy.addr).await;
    let size = 1024 * 1024;
    raw.send(format!("*3\r\n$3\r\nSET\r\n$4\r\nslow\r\n${size}\r\n").as_bytes())
        .await;
    // 1 MB in 8 pieces over ~1.2 s: streamed (over 64 KiB), four reply timeouts long.
    for _ in 0..8 {
        raw.send(&vec![b's'; size / 8]).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    raw.send(b"\r\n").await;
    raw.roundtrip(b"STRLEN slow\r\n", b"+OK\r\n:1048576\r\n")
        .await;
    assert_eq!(proxy.status().await["epoch"], epoch, "no switch");
}
