//! Failover decisions: fast on real failures, deaf to one session's trouble. Each test sets
//! the other paths out of reach (checks every 10 s, long reply timeouts) so that only the
//! mechanism under test can explain what the client sees.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Value};

use crate::support::eventually;
use crate::support::proxy::{multiplexed, two, wait_active, Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;
use crate::support::relay::{Fault, FaultRelay};

/// Checks too rare to explain anything a test sees.
const RARE_CHECKS: &str = "10s";

/// Runs `SET key v` every 10 ms until it succeeds; returns how long that took and the error
/// codes seen on the way (a broken client connection fails the test).
async fn time_to_good_reply(c: &mut MultiplexedConnection, key: &str) -> (Duration, Vec<String>) {
    let start = Instant::now();
    let mut codes = Vec::new();
    loop {
        match c.set::<_, _, ()>(key, "v").await {
            Ok(()) => return (start.elapsed(), codes),
            Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                panic!("client connection broke: {e}")
            }
            Err(e) => codes.push(e.code().unwrap_or("?").to_string()),
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{codes:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two members, us-east preferred, and a proxy in front of them with `options`.
async fn two_members(options: Options) -> (RedisServer, RedisServer, Proxy) {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Proxy::start(&two(&east, &west), options).await;
    (east, west, proxy)
}

/// The id of the client named `name` on `member` (from `CLIENT LIST`).
fn client_id(member: &RedisServer, name: &str) -> String {
    let text = member.client_list();
    let field = format!("name={name} ");
    let line = text
        .lines()
        .find(|l| l.contains(&field))
        .unwrap_or_else(|| panic!("no client named {name}:\n{text}"));
    line.split(' ')
        .find_map(|f| f.strip_prefix("id="))
        .expect("id field")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_is_left_through_the_passive_path_within_a_second() {
    let options = Options {
        interval: RARE_CHECKS,
        ..Options::default()
    };
    let (mut east, west, proxy) = two_members(options).await;
    let mut c = proxy.connect().await;
    let _: () = c.set("before", "1").await.unwrap();

    east.kill();
    let (took, codes) = time_to_good_reply(&mut c, "after").await;
    assert!(
        took < Duration::from_secs(1),
        "first good reply after {took:?}"
    );
    // 1:1, the session sees its own connection close before it reads the client's next
    // command. Multiplexed, the shared connection's task sees it, and the session may
    // write one command to the closed connection first (its outcome is then unknown) or
    // find the member refusing its reconnect first: evidence of the same kind.
    let (errors, causes): (&[&str], &[&str]) = if multiplexed() {
        (
            &["UNAVAILABLE", "OUTCOMEUNKNOWN"],
            &["passive:connection_lost", "passive:connect_failed"],
        )
    } else {
        (&["UNAVAILABLE"], &["passive:connection_lost"])
    };
    assert!(
        codes.iter().all(|c| errors.contains(&c.as_str())),
        "{codes:?}"
    );
    assert_eq!(
        west.query(&["GET", "after"]),
        Value::BulkString(b"v".to_vec())
    );
    let confirmed = "geoproxy_passive_signals_total{kind=\"connection_lost\",member=\"us-east\",outcome=\"confirmed\"}";
    assert!(proxy.metric(confirmed).await >= 1.0);
    let status = proxy.status().await;
    let cause = status["members"][0]["cause"].as_str().unwrap_or_default();
    assert!(causes.contains(&cause), "{status}");
    let last = &status["switches"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        causes.contains(&last["reason"].as_str().unwrap_or_default()),
        "{status}"
    );
    let reason = format!(
        "geoproxy_switches_total{{from=\"us-east\",reason=\"{}\",to=\"eu-west\"}}",
        last["reason"].as_str().unwrap_or_default()
    );
    assert_eq!(proxy.metric(&reason).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_of_one_upstream_closes_that_client_and_switches_nothing() {
    // The 1:1 model: the client has a member connection of its own to kill. (A shared
    // connection killed is the proxy's, and its sessions go on: see `pool`.)
    let options = Options {
        multiplex: Some(false),
        interval: RARE_CHECKS,
        ..Options::default()
    };
    let (east, _west, proxy) = two_members(options).await;
    let mut others = proxy.connect().await;
    let _: () = others.set("k", "1").await.unwrap();

    // Redis itself: a killed client reads nothing more, then the close.
    let mut direct = Raw::connect(east.addr().parse().unwrap()).await;
    direct
        .roundtrip(b"CLIENT SETNAME direct\r\n", b"+OK\r\n")
        .await;
    east.query(&["CLIENT", "KILL", "ID", &client_id(&east, "direct")]);
    let expected = direct.read_to_close().await;
    assert_eq!(expected, b"");

    // Through geoproxy, idle: the same.
    let mut idle = Raw::connect(proxy.addr).await;
    idle.roundtrip(b"CLIENT SETNAME idle\r\n", b"+OK\r\n").await;
    east.query(&["CLIENT", "KILL", "ID", &client_id(&east, "idle")]);
    assert_eq!(idle.read_to_close().await, expected);

    // Blocked (a command in flight): its outcome-unknown error, then the close.
    let mut blocked = Raw::connect(proxy.addr).await;
    blocked
        .roundtrip(b"CLIENT SETNAME blocked\r\n", b"+OK\r\n")
        .await;
    blocked.send(b"BLPOP queue 0\r\n").await;
    crate::support::wait_blocked(&east, 1).await;
    east.query(&["CLIENT", "KILL", "ID", &client_id(&east, "blocked")]);
    let got = String::from_utf8(blocked.read_to_close().await).unwrap();
    assert_eq!(
        got,
        "-OUTCOMEUNKNOWN geoproxy: member us-east failed before replying (connection lost); \
         the command may or may not have run and was not retried\r\n"
    );

    // Nobody else noticed.
    let _: () = others.set("k", "2").await.unwrap();
    assert_eq!(east.query(&["GET", "k"]), Value::BulkString(b"2".to_vec()));
    assert_eq!(proxy.epoch().await, 1, "no switch");
    let dismissed = "geoproxy_passive_signals_total{kind=\"connection_lost\",member=\"us-east\",outcome=\"dismissed\"}";
    assert_eq!(proxy.metric(dismissed).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_idle_timeout_closes_clients_as_redis_does_and_switches_nothing() {
    let east = RedisServer::start_with(&["--timeout", "1"]);
    let west = RedisServer::start();
    // The 1:1 model, where each client has a member connection for the member to time out.
    let options = Options {
        multiplex: Some(false),
        interval: RARE_CHECKS,
        ..Options::default()
    };
    let proxy = Proxy::start(&two(&east, &west), options).await;

    let mut direct = Raw::connect(east.addr().parse().unwrap()).await;
    direct.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    let mut through = Raw::connect(proxy.addr).await;
    through.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    let mut busy = proxy.connect().await;
    let mut busy_task = tokio::spawn(async move {
        loop {
            let _: () = busy
                .set("busy", "1")
                .await
                .expect("the busy client is served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Both idle clients are closed by the member's `timeout`; the busy one is not.
    let expected = direct.read_to_close().await;
    assert_eq!(through.read_to_close().await, expected);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut busy_task)
            .await
            .is_err(),
        "the busy client keeps going"
    );
    busy_task.abort();
    assert_eq!(proxy.epoch().await, 1, "no switch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_command_past_reply_timeout_is_suspected_not_failed() {
    // The silence passes reply_timeout; the probe (with time enough) finds the member alive.
    let options = Options {
        interval: RARE_CHECKS,
        reply_timeout: "300ms",
        check_timeout: "3s",
        ..Options::default()
    };
    let (_east, _west, proxy) = two_members(options).await;
    let mut raw = Raw::connect(proxy.addr).await;
    let started = Instant::now();
    raw.roundtrip(b"DEBUG SLEEP 1.2\r\nPING\r\n", b"+OK\r\n+PONG\r\n")
        .await;
    assert!(started.elapsed() >= Duration::from_millis(1200));
    assert_eq!(proxy.epoch().await, 1, "no switch");
    let dismissed = "geoproxy_passive_signals_total{kind=\"reply_timeout\",member=\"us-east\",outcome=\"dismissed\"}";
    assert!(proxy.metric(dismissed).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_member_comes_up_and_gets_the_first_command() {
    // 200 ms each way on data and 200 ms before a new connection reaches the member: the
    // fresh connection's handshake (TCP + AUTH) takes 600 ms, its PING 400 ms. With the
    // default check timeout (500 ms) counting only the PING, the member comes up.
    let east = RedisServer::start_with(&["--requirepass", "pw"]);
    let west = RedisServer::start_with(&["--requirepass", "pw"]);
    let relay = FaultRelay::start(&east.addr()).await;
    relay.set(Fault::Latency(Duration::from_millis(200)));
    let options = Options {
        interval: "1s",
        check_timeout: "500ms",
        password: Some("pw"),
        unavailable_timeout: "3s",
        connect_timeout: "2s",
        ..Options::default()
    };
    let members = [("us-east", relay.addr()), ("eu-west", west.addr())];
    let proxy = Proxy::start_unrouted(&members, options).await;
    // The client is there before the first check finished.
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"AUTH pw\r\nSET first 1\r\n", b"+OK\r\n+OK\r\n")
        .await;
    assert_eq!(
        east.query(&["GET", "first"]),
        Value::BulkString(b"1".to_vec())
    );
    assert_eq!(west.query(&["EXISTS", "first"]), Value::Int(0));
    // And it stays up: a few checks later, still the first route.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = proxy.status().await;
    assert_eq!(status["epoch"], 1, "{status}");
    assert_eq!(status["members"][0]["state"], "up", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_is_left_in_under_2_5_s_with_default_timeouts() {
    // geoproxy's defaults for everything that decides.
    let options = Options {
        interval: "1s",
        check_timeout: "500ms",
        reply_timeout: "1s",
        unavailable_timeout: "2s",
        ..Options::default()
    };
    let (east, west, proxy) = two_members(options).await;
    let mut c = proxy.connect().await;
    let _: () = c.set("k", "1").await.unwrap();
    east.stop();
    let (took, codes) = time_to_good_reply(&mut c, "k").await;
    east.cont();
    assert!(
        took < Duration::from_millis(2500),
        "first good reply after {took:?}"
    );
    assert_eq!(codes, ["OUTCOMEUNKNOWN"], "the SET in flight, once");
    assert_eq!(west.query(&["GET", "k"]), Value::BulkString(b"v".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_member_is_held_longer_each_time() {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let relay = FaultRelay::start(&east.addr()).await;
    let options = Options {
        failback_after: "1s",
        extra_failover: "flap_hold_max = \"8s\"",
        ..Options::default()
    };
    let members = [("us-east", relay.addr()), ("eu-west", west.addr())];
    let proxy = Proxy::start(&members, options).await;
    let mut c = proxy.connect().await;
    // us-east: 2 s down, 2 s up, for 20 s. Without a growing hold each cycle would fail
    // back after 1 s and over again: 10 switches.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut down = true;
    let mut next_flip = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_flip {
            relay.set(if down { Fault::Reset } else { Fault::None });
            down = !down;
            next_flip += Duration::from_secs(2);
        }
        let _ = c.set::<_, _, ()>("k", "v").await; // errors while switching are fine
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let switches = proxy.epoch().await - 1;
    assert!((2..=5).contains(&switches), "{switches} switches");
    let status = proxy.status().await;
    assert_eq!(status["active_member"], "eu-west", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_returns_a_manual_failback_proxy_to_its_preferred_member() {
    let options = Options {
        failback: "manual",
        extra_admin: "token = \"s3cret\"",
        ..Options::default()
    };
    let (mut east, mut west, proxy) = two_members(options).await;
    let mut c = proxy.connect().await;
    east.kill();
    time_to_good_reply(&mut c, "k").await;
    wait_active(&proxy, "eu-west").await;
    east.restart();
    eventually(Duration::from_secs(5), "us-east is up", || async {
        proxy.status().await["members"][0]["state"] == "up"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // past failback_after
    assert_eq!(proxy.active_member().await.as_deref(), Some("eu-west"));

    let body = r#"{"to": "us-east"}"#;
    let (code, text) = proxy.post("/v1/switchover", body, None).await;
    assert_eq!(
        (code, text.contains("\"unauthorized\"")),
        (401, true),
        "{text}"
    );
    let token = Some("s3cret");
    let (code, text) = proxy.post("/v1/switchover", "{\"to\": 1}", token).await;
    assert_eq!(
        (code, text.contains("\"bad_request\"")),
        (400, true),
        "{text}"
    );
    let (code, text) = proxy
        .post("/v1/switchover", r#"{"to": "mars"}"#, token)
        .await;
    assert_eq!(
        (code, text.contains("\"unknown_member\"")),
        (404, true),
        "{text}"
    );

    let (code, text) = proxy.post("/v1/switchover", body, token).await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(proxy.active_member().await.as_deref(), Some("us-east"));
    let (took, _) = time_to_good_reply(&mut c, "back").await;
    assert!(took < Duration::from_secs(1));
    assert_eq!(
        east.query(&["GET", "back"]),
        Value::BulkString(b"v".to_vec())
    );
    let reason = "geoproxy_switches_total{from=\"eu-west\",reason=\"operator\",to=\"us-east\"}";
    assert_eq!(proxy.metric(reason).await, 1.0);
    let status = proxy.status().await;
    let last = status["switches"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (&last["reason"], &last["to"]),
        (&"operator".into(), &"us-east".into())
    );

    // Only to a healthy member.
    west.kill();
    eventually(Duration::from_secs(5), "eu-west is down", || async {
        proxy.status().await["members"][1]["state"] == "down"
    })
    .await;
    let (code, text) = proxy
        .post("/v1/switchover", r#"{"to": "eu-west"}"#, token)
        .await;
    assert_eq!(
        (code, text.contains("\"member_not_healthy\"")),
        (409, true),
        "{text}"
    );
    assert_eq!(proxy.active_member().await.as_deref(), Some("us-east"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cannot_serve_errors_trip_the_error_window_and_application_errors_never_do() {
    let options = Options {
        interval: RARE_CHECKS,
        reply_timeout: "10s",
        extra_health: "error_window = \"1s\"\nerror_min_count = 10\nerror_rate = 0.5",
        ..Options::default()
    };
    let (east, west, proxy) = two_members(options).await;
    let mut c = proxy.connect().await;

    // The application's own errors, all of its replies for a while: nothing happens.
    let _: () = c.set("text", "x").await.unwrap();
    for _ in 0..50 {
        let e = c.lpush::<_, _, i64>("text", "y").await.unwrap_err();
        assert_eq!(e.code(), Some("WRONGTYPE"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.epoch().await, 1);

    // A script that never ends: the member answers everyone -BUSY.
    east.query(&["CONFIG", "SET", "busy-reply-threshold", "100"]);
    let addr = east.addr();
    let script = std::thread::spawn(move || {
        let client = redis::Client::open(format!("redis://{addr}/")).unwrap();
        let mut con = client.get_connection().unwrap();
        let _ = redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query::<Value>(&mut con);
    });
    let busy_since = Instant::now();
    while c.set::<_, _, ()>("k", "v").await.is_ok() {
        assert!(busy_since.elapsed() < Duration::from_secs(5), "never -BUSY");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (took, codes) = time_to_good_reply(&mut c, "k").await;
    // The member's -BUSY, except for a command still in flight when the route left the
    // member (down): it is answered -OUTCOMEUNKNOWN at once instead of waiting there.
    let all_busy = |codes: &[String]| codes.iter().all(|c| c == "BUSY");
    let busy_then_unknown = match codes.split_last() {
        Some((last, rest)) => all_busy(rest) && (last == "BUSY" || last == "OUTCOMEUNKNOWN"),
        None => true,
    };
    assert!(busy_then_unknown, "{codes:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(west.query(&["GET", "k"]), Value::BulkString(b"v".to_vec()));
    let reason =
        "geoproxy_switches_total{from=\"us-east\",reason=\"passive:errors\",to=\"eu-west\"}";
    assert_eq!(proxy.metric(reason).await, 1.0);

    let mut kill = redis::Client::open(east.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SCRIPT").arg("KILL").query(&mut kill).unwrap();
    script.join().unwrap();
}

/// Raises this process's open-file limit to its hard limit (children inherit it), and
/// checks it is at least `need`.
fn raise_fd_limit(need: u64) {
    let pid = std::process::id().to_string();
    let hard = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid,
            "--nofile",
            "--output",
            "HARD",
            "--noheadings",
        ])
        .output()
        .expect("prlimit (util-linux) is installed");
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_string();
    let hard: u64 = if hard == "unlimited" {
        1 << 20
    } else {
        hard.parse().expect("a number")
    };
    assert!(
        hard >= need,
        "this test needs {need} open files; the hard limit is {hard}"
    );
    let set = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status()
        .expect("prlimit runs");
    assert!(set.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_thousand_clients_connecting_at_once_are_all_served_with_no_switch() {
    const CLIENTS: usize = 8000;
    // geoproxy holds two sockets per client, Redis one, this test one.
    raise_fd_limit(2 * CLIENTS as u64 + 1000);
    let member = RedisServer::start();
    let options = Options {
        threads: 0,
        max_clients: 10_000,
        // geoproxy's defaults for what decides.
        interval: "1s",
        check_timeout: "500ms",
        reply_timeout: "1s",
        unavailable_timeout: "2s",
        connect_timeout: "1s",
        ..Options::default()
    };
    let proxy = crate::binary::Binary::start_options(&member, options).await;
    let addr = proxy.addr;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        clients.spawn(async move {
            let mut raw = Raw(tokio::net::TcpStream::connect(addr).await?);
            raw.send(b"PING\r\n").await;
            let reply = raw.read_exact_len(7).await;
            Ok::<_, std::io::Error>((reply, raw))
        });
    }
    let mut open = Vec::with_capacity(CLIENTS);
    let mut failed = Vec::new();
    while let Some(done) = clients.join_next().await {
        match done.expect("client task") {
            Ok((reply, raw)) if reply == b"+PONG\r\n" => open.push(raw),
            Ok((reply, _)) => failed.push(String::from_utf8_lossy(&reply).into_owned()),
            Err(e) => failed.push(e.to_string()),
        }
    }
    let status: serde_json::Value = reqwest::get(format!("http://{}/v1/status", proxy.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} failed: {:?}; {status}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(status["epoch"], 1, "no switch: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_reopen_their_connection_and_name_the_timeout_that_expired() {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let relay = FaultRelay::start(&west.addr()).await;
    let options = Options {
        interval: "100ms",
        extra_health: "reconnect_interval = \"300ms\"",
        ..Options::default()
    };
    let members = [("us-east", east.addr()), ("eu-west", relay.addr())];
    let proxy = Proxy::start(&members, options).await;
    // The check connection is opened anew every 300 ms: new connections keep arriving.
    let accepted = || east.connections_received();
    let before = accepted();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let opened = accepted() - before;
    assert!(
        (3..=10).contains(&opened),
        "{opened} check connections in 1.5 s"
    );

    // A member that takes connections and never answers: the error names health.timeout.
    relay.set(Fault::BlackHole);
    eventually(Duration::from_secs(5), "eu-west is down", || async {
        proxy.status().await["members"][1]["state"] == "down"
    })
    .await;
    let status = proxy.status().await;
    let error = status["members"][1]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.starts_with("check timeout: no PING reply within 200ms (health.timeout)"),
        "{status}"
    );
    assert_eq!(status["members"][1]["cause"], "check:ping", "{status}");
}
