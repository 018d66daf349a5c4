//! Switches: failover on a dead or hung member, failback after the grace period, manual
//! failback, all members down. One long-lived client connection rides through each.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, ErrorKind, RedisError, Value};

use crate::support::cluster::ProxyProcess;
use crate::support::proxy::{multiplexed, two, wait_active, Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;
use crate::support::{established_to, eventually, wait_blocked};

const PATIENCE: Duration = Duration::from_secs(10);

/// An error that proves the client connection itself broke (not a reply from the proxy).
fn is_disconnect(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.kind() == ErrorKind::Io
}

/// Runs `SET key value` until it succeeds; every failure must be a proxy error reply, never
/// a broken connection. Returns the error codes seen.
async fn set_until_ok(c: &mut MultiplexedConnection, key: &str) -> Vec<String> {
    let mut codes = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match c.set::<_, _, ()>(key, "v").await {
            Ok(()) => return codes,
            Err(e) if is_disconnect(&e) => panic!("client connection broke: {e}"),
            Err(e) => codes.push(e.code().unwrap_or("?").to_string()),
        }
        assert!(
            Instant::now() < deadline,
            "no success within {PATIENCE:?}: {codes:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_on_sigkill_keeps_the_client_connection() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    assert_eq!(proxy.active_member().await.as_deref(), Some("us-east"));
    let mut c = proxy.connect().await;
    let _: () = c.set("before", "1").await.unwrap();
    assert_eq!(
        east.query(&["GET", "before"]),
        Value::BulkString(b"1".to_vec())
    );

    east.kill();
    let codes = set_until_ok(&mut c, "after").await;
    assert!(
        codes
            .iter()
            .all(|c| c == "UNAVAILABLE" || c == "OUTCOMEUNKNOWN"),
        "only proxy errors while switching: {codes:?}"
    );
    assert_eq!(
        west.query(&["GET", "after"]),
        Value::BulkString(b"v".to_vec())
    );
    assert_eq!(proxy.active_member().await.as_deref(), Some("eu-west"));
    // The session saw its connection close and the probe confirmed it: a passive failover.
    // (Multiplexed, the shared connection's close races the session's reconnect, refused:
    // either is the passive evidence that moved the route.)
    let passive = |cause: &str| {
        format!(
            "geoproxy_switches_total{{from=\"us-east\",reason=\"passive:{cause}\",to=\"eu-west\"}}"
        )
    };
    let mut switches = proxy.metric(&passive("connection_lost")).await;
    if multiplexed() {
        switches += proxy.metric(&passive("connect_failed")).await;
    }
    assert_eq!(switches, 1.0);
    assert_eq!(
        proxy.metric("geoproxy_member_up{member=\"us-east\"}").await,
        0.0
    );
    assert_eq!(
        proxy
            .metric("geoproxy_active_member{member=\"eu-west\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_in_flight_get_one_error_each_and_are_not_replayed() {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"*3\r\n$3\r\nSET\r\n$1\r\nn\r\n$1\r\n0\r\n", b"+OK\r\n")
        .await;

    // Hang the member, then pipeline three INCRs: none can be answered.
    east.stop();
    raw.send(b"INCR n\r\nINCR n\r\nINCR n\r\n").await;
    for _ in 0..3 {
        raw.read_outcome_unknown("us-east").await;
    }

    // The same connection goes on, on eu-west; nothing was replayed there.
    raw.roundtrip(b"GET n\r\n", b"$-1\r\n").await;
    raw.roundtrip(b"INCR n\r\n", b":1\r\n").await;
    east.cont();
    assert_eq!(
        proxy
            .metric("geoproxy_inflight_errors_total{member=\"us-east\"}")
            .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_on_sigstop_hung_member() {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut c = proxy.connect().await;
    let _: () = c.set("k", "east").await.unwrap();

    east.stop();
    let started = Instant::now();
    let codes = set_until_ok(&mut c, "k").await;
    assert!(
        codes
            .iter()
            .all(|c| c == "UNAVAILABLE" || c == "OUTCOMEUNKNOWN"),
        "{codes:?}"
    );
    // reply_timeout is 1 s and checks time out after 2 x 200 ms: well under 5 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(west.query(&["GET", "k"]), Value::BulkString(b"v".to_vec()));
    wait_active(&proxy, "eu-west").await;
    east.cont();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_waits_for_failback_after() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let options = Options {
        failback_after: "2s",
        ..Options::default()
    };
    let proxy = Proxy::start(&two(&east, &west), options).await;
    let mut c = proxy.connect().await;

    east.kill();
    set_until_ok(&mut c, "during").await;
    wait_active(&proxy, "eu-west").await;

    east.restart();
    let restarted = Instant::now();
    eventually(PATIENCE, "us-east is checked up", || async {
        proxy.status().await["members"][0]["state"] == "up"
    })
    .await;
    assert_eq!(
        proxy.active_member().await.as_deref(),
        Some("eu-west"),
        "no failback before failback_after"
    );
    wait_active(&proxy, "us-east").await;
    assert!(
        restarted.elapsed() >= Duration::from_secs(2),
        "failback after {:?}",
        restarted.elapsed()
    );
    // The long-lived connection moved back at a quiescent point, without an error.
    eventually(PATIENCE, "the session writes on us-east again", || {
        let mut c = c.clone();
        let east = &east;
        async move {
            let _: () = c.set("back", "1").await.unwrap();
            east.query(&["EXISTS", "back"]) == Value::Int(1)
        }
    })
    .await;
    assert!(proxy.metric("geoproxy_sessions_moved_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failback_stays_on_the_failover_member() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let options = Options {
        failback: "manual",
        failback_after: "500ms",
        ..Options::default()
    };
    let proxy = Proxy::start(&two(&east, &west), options).await;
    east.kill();
    wait_active(&proxy, "eu-west").await;
    east.restart();
    eventually(PATIENCE, "us-east is checked up", || async {
        proxy.status().await["members"][0]["state"] == "up"
    })
    .await;
    // Several grace periods later, still on eu-west. (A bounded wait for something that
    // must NOT happen; the failback test above shows the same setup does fail back in auto.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(proxy.active_member().await.as_deref(), Some("eu-west"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_members_down_fails_fast_and_recovers() {
    let mut east = RedisServer::start();
    let mut west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut c = proxy.connect().await;
    let _: () = c.set("k", "1").await.unwrap();
    assert_eq!(proxy.get("/ready").await.0, 200);

    east.kill();
    west.kill();
    eventually(PATIENCE, "/ready is 503", || async {
        proxy.get("/ready").await.0 == 503
    })
    .await;
    let (_, body) = proxy.get("/ready").await;
    assert!(body.contains("\"error_code\":\"no_member\""), "{body}");
    let started = Instant::now();
    let err = c.get::<_, String>("k").await.unwrap_err();
    assert_eq!(err.code(), Some("UNAVAILABLE"), "{err}");
    // unavailable_timeout is 500 ms: the client is answered, not left hanging.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // A new client gets the same clear error.
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(
        b"PING\r\n",
        b"-UNAVAILABLE geoproxy: no member available\r\n",
    )
    .await;
    // QUIT needs no member: answered and closed, as Redis does.
    let mut quitter = Raw::connect(proxy.addr).await;
    quitter.roundtrip(b"QUIT\r\n", b"+OK\r\n").await;
    assert_eq!(quitter.read_to_close().await, b"");

    west.restart();
    set_until_ok(&mut c, "k").await;
    raw.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    assert_eq!(proxy.get("/ready").await.0, 200);
    assert_eq!(proxy.active_member().await.as_deref(), Some("eu-west"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_is_replayed_on_the_new_member() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"SELECT 5\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"CLIENT SETNAME app1\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"SET k east\r\n", b"+OK\r\n").await;

    east.kill();
    // The next command waits for eu-west and runs there, in db 5, under the same name.
    raw.roundtrip(b"SET k west\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"CLIENT GETNAME\r\n", b"$4\r\napp1\r\n")
        .await;
    let in_db5 = [
        "EVAL",
        "redis.call('SELECT', 5) return redis.call('GET', 'k')",
        "0",
    ];
    assert_eq!(west.query(&in_db5), Value::BulkString(b"west".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changed_inside_multi_is_replayed_only_if_exec_ran() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(
        b"MULTI\r\nSELECT 4\r\nEXEC\r\n",
        b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n",
    )
    .await;
    // A WATCHed transaction that does not run changes nothing.
    raw.roundtrip(b"WATCH w\r\n", b"+OK\r\n").await;
    east.query(&[
        "EVAL",
        "redis.call('SELECT', 4) redis.call('SET', 'w', 1)",
        "0",
    ]);
    raw.roundtrip(
        b"MULTI\r\nSELECT 6\r\nEXEC\r\n",
        b"+OK\r\n+QUEUED\r\n*-1\r\n",
    )
    .await;

    east.kill();
    raw.roundtrip(b"SET k west\r\n", b"+OK\r\n").await;
    let in_db4 = [
        "EVAL",
        "redis.call('SELECT', 4) return redis.call('GET', 'k')",
        "0",
    ];
    assert_eq!(west.query(&in_db4), Value::BulkString(b"west".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_command_gets_an_error_when_its_member_dies_and_the_session_moves() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"BLPOP jobs 0\r\n").await;
    wait_blocked(&east, 1).await;
    east.kill();
    let err = "-OUTCOMEUNKNOWN geoproxy: member us-east failed before replying (connection lost); \
               the command may or may not have run and was not retried\r\n";
    assert_eq!(raw.read_exact_len(err.len()).await, err.as_bytes());
    // The client blocks again; now on eu-west, where a push wakes it.
    raw.send(b"BLPOP jobs 0\r\n").await;
    wait_blocked(&west, 1).await;
    west.query(&["RPUSH", "jobs", "j1"]);
    raw.roundtrip(b"", b"*2\r\n$4\r\njobs\r\n$2\r\nj1\r\n")
        .await;
    assert_eq!(
        proxy.metric("geoproxy_sessions_interrupted_total").await,
        1.0
    );
    assert_eq!(proxy.metric("geoproxy_sessions_moved_total").await, 1.0);
    assert_eq!(proxy.metric("geoproxy_sessions_lost_total").await, 0.0);
    // The failover itself says what its sessions did.
    let status = proxy.status().await;
    let last = status["switches"]
        .as_array()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(last["to"], "eu-west", "{status}");
    assert_eq!(
        last["sessions"],
        serde_json::json!({ "moved": 1, "interrupted": 1, "lost": 0 })
    );
}

async fn command_tables_loaded(proxy: &Proxy) {
    eventually(
        PATIENCE,
        "the members' COMMAND tables are loaded",
        || async {
            let s = proxy.status().await;
            (0..2).all(|i| s["members"][i]["commands"].as_u64().unwrap_or(0) > 100)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reads_resends_in_flight_reads_but_never_writes() {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let options = Options {
        retry_reads: true,
        ..Options::default()
    };
    let proxy = Proxy::start(&two(&east, &west), options).await;
    command_tables_loaded(&proxy).await;
    west.query(&["SET", "a", "west-a"]);
    west.query(&["SET", "bits", "A"]);
    let mut reads = Raw::connect(proxy.addr).await;
    reads.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    let mut mixed = Raw::connect(proxy.addr).await;
    mixed.roundtrip(b"PING\r\n", b"+PONG\r\n").await;

    east.stop();
    // GET is in the built-in table; BITFIELD_RO only in the member's own COMMAND table.
    reads.send(b"GET a\r\nBITFIELD_RO bits GET u8 0\r\n").await;
    mixed.send(b"GET a\r\nINCR n\r\n").await;
    reads.roundtrip(b"", b"$6\r\nwest-a\r\n*1\r\n:65\r\n").await;
    for _ in 0..2 {
        mixed.read_outcome_unknown("us-east").await;
    }
    assert_eq!(
        west.query(&["EXISTS", "n"]),
        Value::Int(0),
        "the INCR was not re-sent"
    );
    assert_eq!(proxy.metric("geoproxy_retried_reads_total").await, 2.0);
    east.cont();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_session_moves_on_failback_only_after_its_command_returns() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let options = Options {
        failback_after: "300ms",
        ..Options::default()
    };
    let proxy = Proxy::start(&two(&east, &west), options).await;
    east.kill();
    wait_active(&proxy, "eu-west").await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"BLPOP q 0\r\n").await;
    wait_blocked(&west, 1).await;
    east.restart();
    wait_active(&proxy, "us-east").await;
    // Still blocked on eu-west, and answered from there.
    west.query(&["RPUSH", "q", "x"]);
    raw.roundtrip(b"", b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n").await;
    // Then it moves.
    raw.roundtrip(b"SET moved 1\r\n", b"+OK\r\n").await;
    assert_eq!(east.query(&["EXISTS", "moved"]), Value::Int(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_ends_cleanly_when_its_member_fails() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), Options::default()).await;
    let mut monitor = Raw::connect(proxy.addr).await;
    monitor.roundtrip(b"MONITOR\r\n", b"+OK\r\n").await;
    east.kill();
    // The connection is closed (the client reconnects), never fed a partial frame.
    let rest = monitor.read_to_close().await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert_eq!(proxy.metric("geoproxy_sessions_lost_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_share_the_port_and_fail_over_together() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let options = Options {
        threads: 3,
        ..Options::default()
    };
    let proxy = Proxy::start(&two(&east, &west), options).await;
    let mut clients = Vec::new();
    for i in 0..24 {
        let mut raw = Raw::connect(proxy.addr).await;
        raw.roundtrip(format!("SET k{i} east\r\n").as_bytes(), b"+OK\r\n")
            .await;
        clients.push(raw);
    }
    // The kernel spread them over the workers: every one reached the member.
    assert_eq!(east.query(&["DBSIZE"]), Value::Int(24));
    east.kill();
    for (i, raw) in clients.iter_mut().enumerate() {
        raw.roundtrip(format!("SET k{i} west\r\n").as_bytes(), b"+OK\r\n")
            .await;
    }
    assert_eq!(west.query(&["DBSIZE"]), Value::Int(24));
    assert_eq!(proxy.metric("geoproxy_sessions_open").await, 24.0);
    proxy.stop().await;
}

/// Read before write, made deterministic: the proxy is paused (SIGSTOP, idle in
/// `epoll_wait`) while a client's command arrives and then its member dies, so that when it
/// resumes the command and the member's close are both waiting, the command first. The
/// command was never written to the member, so it goes to the next one and runs there once;
/// it must not be answered `-OUTCOMEUNKNOWN` after a write into a connection the member had
/// already closed. Fails when the shared connection's task writes before it reads
/// (multiplexed), or when the session polls its client before its member (1:1), and against
/// 06abbe2..f34d08e, where a session wrote into an idle shared connection itself (which a
/// fresh-clone run once caught by chance).
#[tokio::test]
async fn a_command_that_arrives_with_its_members_close_goes_unsent_to_the_next_member() {
    let mut east = RedisServer::start();
    let west = RedisServer::start();
    let config = format!(
        r#"[proxy]
listen = "{{listen}}"
mode = "colocated"
threads = 1
unavailable_timeout = "10s"

[admin]
listen = "{{admin}}"

[health]
interval = "100ms"
timeout = "200ms"
rise = 2
fall = 2

[failover]
failback = "manual"

[[members]]
id = "us-east"
address = "{east}"
region = "us-east"

[[members]]
id = "eu-west"
address = "{west}"
region = "eu-west"
"#,
        east = east.addr(),
        west = west.addr()
    );
    let proxy = ProxyProcess::start(&config);
    eventually(Duration::from_secs(10), "the proxy is ready", || async {
        proxy.ready().await == Some(200)
    })
    .await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"SET k east\r\n", b"+OK\r\n").await;
    // Paused mid-turn, the proxy could read the command on resume before it has heard of
    // the close (as it may in life, when the two arrive within one turn): pause it idle.
    eventually(
        Duration::from_secs(5),
        "the proxy's worker idle",
        || async { proxy.worker_idle() },
    )
    .await;
    proxy.signal("STOP");
    eventually(Duration::from_secs(5), "the proxy stopped", || async {
        proxy.worker_stopped()
    })
    .await;
    raw.send(b"INCR n\r\n").await;
    let port = east.port();
    east.kill();
    eventually(
        Duration::from_secs(5),
        "the member's close delivered to the paused proxy",
        || async { established_to(port) == 0 },
    )
    .await;
    proxy.signal("CONT");

    let reply = raw.read_until(b"\r\n").await;
    assert_eq!(String::from_utf8_lossy(&reply), ":1\r\n", "{}", proxy.log());
    assert_eq!(west.query(&["GET", "n"]), Value::BulkString(b"1".to_vec()));
}

/// A hung member is left by every session as soon as the checks find it down, commands in
/// flight and blocked commands included, without waiting for `reply_timeout` (30 s here,
/// so only the route can explain the result).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_commands_in_flight_leave_a_hung_member_with_the_route() {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let options = Options {
        reply_timeout: "30s",
        ..Options::default()
    };
    let proxy = Proxy::start(&two(&east, &west), options).await;
    let mut blocked = Raw::connect(proxy.addr).await;
    blocked.send(b"BLPOP q 0\r\n").await;
    let mut busy = Raw::connect(proxy.addr).await;
    busy.roundtrip(b"SET k east\r\n", b"+OK\r\n").await;
    wait_blocked(&east, 1).await;
    east.stop();
    let started = Instant::now();
    busy.send(b"GET k\r\n").await;
    for raw in [&mut busy, &mut blocked] {
        let got = raw.read_until(b"\r\n").await;
        assert!(got.starts_with(b"-OUTCOMEUNKNOWN"), "{got:?}");
    }
    // Checks every 100 ms, 200 ms timeout, fall 2: well under 3 s, far from 30 s.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    busy.roundtrip(b"GET k\r\n", b"$-1\r\n").await;
    blocked.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    wait_active(&proxy, "eu-west").await;
    east.cont();
}
