//! Every check kind against real members: the availability API (a real HTTPS server in
//! test support), keyspace probes, replication (a bridge in test support forwards the
//! tokens between plain `redis-server` members), custom commands and programs, and how the
//! policy combines them. In each test the PING check runs every 10 s, so only the check
//! under test can explain a switch.

use std::time::Duration;

use redis::AsyncCommands;

use crate::support::bridge::Bridge;
use crate::support::eventually;
use crate::support::proxy::{two, wait_active, Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;
use crate::support::relay::{Fault, FaultRelay};
use crate::support::rest_api::{Answer, RestApi, PASSWORD, USER};

/// `[health]` keys for a test (a test's options last as long as the test binary).
fn health(tables: &str) -> &'static str {
    Box::leak(tables.to_string().into_boxed_str())
}

/// Options with PING every 10 s (too rare to explain anything a test sees), the given
/// `[health]` text and a 1 s failback.
fn options(health: &'static str) -> Options {
    Options {
        interval: "10s",
        check_timeout: "1s",
        extra_health: health,
        ..Options::default()
    }
}

/// The `[health.availability]` table for `api`'s CA and credentials.
fn availability_table(api: &RestApi, extra: &str) -> String {
    format!(
        "[health.availability]\ninterval = \"100ms\"\nusername = \"{USER}\"\n\
         password = \"{PASSWORD}\"\nca_file = \"{}\"\n{extra}\n",
        api.ca_file.path().display()
    )
}

/// Two members, each with its cluster's REST API (one CA signs both), and a proxy with
/// `[health.availability]` plus `extra` keys, routed.
async fn with_apis(extra: &str) -> (RedisServer, RedisServer, RestApi, RestApi, Proxy) {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let api_east = RestApi::start().await;
    let api_west = api_east.sibling().await;
    let table = availability_table(&api_east, extra);
    let proxy = Proxy::start(
        &two(&east, &west),
        Options {
            apis: vec![api_east.url(), api_west.url()],
            ..options(health(&table))
        },
    )
    .await;
    (east, west, api_east, api_west, proxy)
}

/// Waits (5 s at most) until the metric sample `sample` (`name{labels}`) is `value`.
async fn wait_metric(proxy: &Proxy, sample: &str, value: f64) {
    eventually(
        Duration::from_secs(5),
        &format!("{sample} = {value}"),
        || async { proxy.metric(sample).await == value },
    )
    .await;
}

/// The named check of `member` in `/v1/status`.
async fn check(proxy: &Proxy, member: &str, name: &str) -> serde_json::Value {
    let status = proxy.status().await;
    let m = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == member)
        .unwrap_or_else(|| panic!("no member {member}"))
        .clone();
    m["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {m}"))
        .clone()
}

/// Waits until `member` has had `runs` more results of check `name` (by its metric), to
/// prove a negative after enough chances.
async fn let_run(proxy: &Proxy, member: &str, name: &str, runs: u64) {
    let sample =
        format!("geoproxy_check_duration_seconds_count{{check=\"{name}\",member=\"{member}\"}}");
    let start = proxy.metric(&sample).await as u64;
    eventually(
        Duration::from_secs(10),
        &format!("{runs} more runs of {name}"),
        || async { proxy.metric(&sample).await as u64 >= start + runs },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn availability_503_fails_over_and_names_the_error_code() {
    let (_east, west, api_east, _api_west, proxy) = with_apis("").await;
    wait_active(&proxy, "us-east").await;
    let mut c = proxy.connect().await;
    c.set::<_, _, ()>("k", "east").await.unwrap();

    api_east.set(Answer::Unavailable(503, "bdb_endpoint_unavailable"));
    wait_active(&proxy, "eu-west").await;
    // The client's connection moved with it: the next command is served by eu-west.
    c.set::<_, _, ()>("k", "west").await.unwrap();
    assert_eq!(
        west.query(&["GET", "k"]),
        redis::Value::BulkString(b"west".to_vec())
    );
    let status = proxy.status().await;
    let reason = status["switches"].as_array().unwrap().last().unwrap()["reason"].clone();
    assert_eq!(reason, "check:availability");
    let error = check(&proxy, "us-east", "availability").await["last_error"].to_string();
    assert!(
        error.contains("503") && error.contains("bdb_endpoint_unavailable"),
        "{error}"
    );
    // The node-local request, with the credentials; the password shows nowhere.
    let seen = api_east.seen();
    let local = "/v1/local/bdbs/1/endpoint/availability";
    assert!(
        !seen.is_empty() && seen.iter().all(|q| q == local),
        "{seen:?}"
    );
    assert!(!status.to_string().contains(PASSWORD));

    // Available again: back after rise and failback_after.
    api_east.set(Answer::Available);
    wait_active(&proxy, "us-east").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn availability_with_the_wrong_ca_is_a_failure_and_verify_off_accepts_it() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let (api_east, api_west) = (RestApi::start().await, RestApi::start().await);
    // us-east's API is signed by another CA than the one the proxy trusts.
    let table = availability_table(&api_west, "");
    let apis = vec![api_east.url(), api_west.url()];
    let proxy = Proxy::start(
        &two(&east, &west),
        Options {
            apis: apis.clone(),
            ..options(health(&table))
        },
    )
    .await;
    wait_active(&proxy, "eu-west").await;
    let error = check(&proxy, "us-east", "availability").await["last_error"].to_string();
    assert!(error.contains("certificate"), "{error}");
    assert!(api_east.seen().is_empty());
    drop(proxy);

    let table = availability_table(&api_west, "verify_tls = false");
    let proxy = Proxy::start(
        &two(&east, &west),
        Options {
            apis,
            ..options(health(&table))
        },
    )
    .await;
    wait_active(&proxy, "us-east").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_over_tolerance_holds_failback_until_it_recovers() {
    let (_east, _west, api_east, _api_west, proxy) =
        with_apis("lag = true\nlag_tolerance = \"250ms\"\nendpoint = \"database\"").await;
    wait_active(&proxy, "us-east").await;

    // us-east fails, and comes back behind: available, but lagging.
    api_east.set(Answer::Unavailable(503, "bdb_unavailable"));
    wait_active(&proxy, "eu-west").await;
    api_east.set_lag(Answer::Unavailable(503, "bdb_unavailable_lag"));
    api_east.set(Answer::Available);
    wait_metric(&proxy, "geoproxy_member_up{member=\"us-east\"}", 1.0).await;
    // Well past failback_after (1 s): the gate holds, and says why.
    eventually(
        Duration::from_secs(5),
        "the gate holds for sync",
        || async {
            let gate = proxy.status().await["failback_gate"].clone();
            gate["reason"] == "sync" && gate["why"].to_string().contains("bdb_unavailable_lag")
        },
    )
    .await;
    let_run(&proxy, "us-east", "lag", 15).await;
    assert_eq!(proxy.active_member().await.as_deref(), Some("eu-west"));
    let held = "geoproxy_failback_held{member=\"us-east\",reason=\"sync\"}";
    assert_eq!(proxy.metric(held).await, 1.0);
    assert_eq!(
        proxy
            .metric("geoproxy_member_synced{member=\"us-east\"}")
            .await,
        0.0
    );
    // The whole-database request, lag-aware with the tolerance.
    let seen = api_east.seen();
    assert!(
        seen.iter()
            .any(|q| q
                == "/v1/bdbs/1/availability?extend_check=lag&availability_lag_tolerance_ms=250"),
        "{seen:?}"
    );

    api_east.set_lag(Answer::Available);
    wait_active(&proxy, "us-east").await;
    assert_eq!(proxy.metric(held).await, 0.0);
    assert!(proxy.status().await["failback_gate"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_alone_never_moves_traffic_off_the_active_member() {
    let (_east, _west, api_east, _api_west, proxy) = with_apis("lag = true").await;
    wait_active(&proxy, "us-east").await;
    api_east.set_lag(Answer::Unavailable(503, "bdb_unavailable_lag"));
    wait_metric(&proxy, "geoproxy_member_synced{member=\"us-east\"}", 0.0).await;
    let_run(&proxy, "us-east", "lag", 10).await;
    assert_eq!(proxy.active_member().await.as_deref(), Some("us-east"));
    assert_eq!(proxy.epoch().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_cut_blocks_failback_and_shows_in_the_lag_matrix() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let bridge = Bridge::start(&[east.addr(), west.addr()]).await;
    // The proxy reaches us-east through a relay, to fail it; the bridge goes direct.
    let relay = FaultRelay::start(&east.addr()).await;
    let members = vec![("us-east", relay.addr()), ("eu-west", west.addr())];
    let table = "[health.replication]\ninterval = \"100ms\"\ntolerance = \"500ms\"\nshards = 2";
    let proxy = Proxy::start(
        &members,
        Options {
            extra_health: table,
            ..Options::default()
        },
    )
    .await;
    wait_active(&proxy, "us-east").await;
    eventually(Duration::from_secs(5), "both members synced", || async {
        proxy
            .metric("geoproxy_member_synced{member=\"us-east\"}")
            .await
            == 1.0
            && proxy
                .metric("geoproxy_member_synced{member=\"eu-west\"}")
                .await
                == 1.0
    })
    .await;
    let lag = |from: &str, to: &str| {
        format!("geoproxy_replication_lag_seconds{{from=\"{from}\",to=\"{to}\"}}")
    };
    assert!(proxy.metric(&lag("us-east", "eu-west")).await < 0.5);

    // Cut us-east -> eu-west while us-east is active: it is reported, traffic stays.
    bridge.cut(0, 1, true);
    eventually(
        Duration::from_secs(5),
        "the cut shows in the matrix",
        || async {
            let s = proxy.status().await;
            s["replication"]["lag_seconds"]["us-east"]["eu-west"]
                .as_f64()
                .is_some_and(|l| l > 0.5)
                && s["replication"]["lag_seconds"]["eu-west"]["us-east"]
                    .as_f64()
                    .is_some_and(|l| l < 0.5)
        },
    )
    .await;
    wait_metric(&proxy, "geoproxy_member_synced{member=\"us-east\"}", 0.0).await;
    let_run(&proxy, "us-east", "replication", 10).await;
    assert_eq!(proxy.active_member().await.as_deref(), Some("us-east"));
    assert_eq!(proxy.epoch().await, 1);

    // us-east fails (partitioned from the proxy) and comes back, still cut: no failback.
    relay.set(Fault::BlackHole);
    wait_active(&proxy, "eu-west").await;
    relay.set(Fault::None);
    wait_metric(&proxy, "geoproxy_member_up{member=\"us-east\"}", 1.0).await;
    eventually(Duration::from_secs(5), "the gate names the cut", || async {
        let gate = proxy.status().await["failback_gate"].clone();
        gate["member"] == "us-east"
            && gate["reason"] == "sync"
            && gate["why"].to_string().contains("to eu-west")
    })
    .await;
    let_run(&proxy, "us-east", "replication", 20).await;
    assert_eq!(proxy.active_member().await.as_deref(), Some("eu-west"));

    // The link heals: us-east is synced and traffic returns.
    bridge.cut(0, 1, false);
    wait_active(&proxy, "us-east").await;
    let status = proxy.status().await;
    let reason = status["switches"].as_array().unwrap().last().unwrap()["reason"].clone();
    assert_eq!(reason, "failback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_delay_is_measured_per_direction() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let bridge = Bridge::start(&[east.addr(), west.addr()]).await;
    bridge.delay(1, 0, Duration::from_millis(300));
    let table = "[health.replication]\ninterval = \"500ms\"\ntolerance = \"2s\"";
    let proxy = Proxy::start(&two(&east, &west), options(health(table))).await;
    eventually(Duration::from_secs(8), "the delay is measured", || async {
        let s = proxy.status().await;
        let lags = &s["replication"]["lag_seconds"];
        let west_to_east = lags["eu-west"]["us-east"].as_f64().unwrap_or(0.0);
        let east_to_west = lags["us-east"]["eu-west"].as_f64().unwrap_or(1.0);
        (0.28..0.6).contains(&west_to_east) && east_to_west < 0.1
    })
    .await;
    // Within tolerance: synced.
    assert_eq!(
        proxy
            .metric("geoproxy_member_synced{member=\"us-east\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyspace_check_fails_a_member_that_refuses_writes() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let table = "[health.keyspace]\ninterval = \"100ms\"\nshards = 3\nttl = \"5s\"";
    let proxy = Proxy::start(&two(&east, &west), options(health(table))).await;
    wait_active(&proxy, "us-east").await;
    // One key per shard, with this proxy's and the member's names, expiring.
    let keys = east.query(&["KEYS", "geoproxy:keyspace:*"]);
    let redis::Value::Array(keys) = keys else {
        panic!("{keys:?}")
    };
    assert_eq!(keys.len(), 3, "{keys:?}");
    let redis::Value::BulkString(key) = &keys[0] else {
        panic!()
    };
    let ttl = east.query(&["PTTL", std::str::from_utf8(key).unwrap()]);
    assert!(
        matches!(ttl, redis::Value::Int(t) if t > 0 && t <= 5000),
        "{ttl:?}"
    );

    east.query(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    east.query(&["CONFIG", "SET", "maxmemory", "1"]);
    wait_active(&proxy, "eu-west").await;
    let error = check(&proxy, "us-east", "keyspace").await["last_error"].to_string();
    assert!(error.contains("OOM"), "{error}");
    // us-east still answers PING: only the keyspace check saw it.
    assert_eq!(check(&proxy, "us-east", "ping").await["state"], "up");
    east.query(&["CONFIG", "SET", "maxmemory", "0"]);
    wait_active(&proxy, "us-east").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_program_reporting_unhealthy_fails_over() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let dir = tempfile::tempdir().unwrap();
    let sick = dir.path().join("sick");
    // Unhealthy while the file exists, for us-east only; it says why on stderr.
    let script = format!(
        "test \"$GEOPROXY_MEMBER_ID\" != us-east || test ! -e {} || \
         {{ echo \"$GEOPROXY_MEMBER_HOST:$GEOPROXY_MEMBER_PORT is sick\" >&2; exit 3; }}",
        sick.display()
    );
    let table = format!(
        "[[health.custom]]\nname = \"script\"\ninterval = \"100ms\"\nprogram = [\"sh\", \"-c\", {script:?}]"
    );
    let proxy = Proxy::start(&two(&east, &west), options(health(&table))).await;
    wait_active(&proxy, "us-east").await;
    std::fs::write(&sick, "").unwrap();
    wait_active(&proxy, "eu-west").await;
    let error = check(&proxy, "us-east", "script").await["last_error"].to_string();
    assert!(
        error.contains(&format!("{} is sick", east.addr())),
        "{error}"
    );
    assert!(error.contains("exit status: 3"), "{error}");
    std::fs::remove_file(&sick).unwrap();
    wait_active(&proxy, "us-east").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_program_that_hangs_is_killed_at_its_timeout() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let table = "[[health.custom]]\nname = \"slow\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\n\
                 program = [\"sh\", \"-c\", \"test $GEOPROXY_MEMBER_ID != us-east || exec sleep 30\"]";
    let proxy = Proxy::start_unrouted(&two(&east, &west), options(health(table))).await;
    wait_active(&proxy, "eu-west").await;
    let error = check(&proxy, "us-east", "slow").await["last_error"].to_string();
    assert!(error.contains("killed after 200ms"), "{error}");
    // Killed, not left behind: no `sleep 30` outlives its run for long (at most the run
    // in progress is alive).
    eventually(Duration::from_secs(5), "no sleeping check left", || async {
        sleepers() <= 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_commands_match_their_replies() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let table = "[[health.custom]]\nname = \"not-loading\"\ninterval = \"100ms\"\n\
                 commands = [[\"INFO\", \"persistence\"], [\"CONFIG\", \"GET\", \"maxmemory-policy\"]]\n\
                 expect = [\"*loading:0*\", \"maxmemory-policy\\nnoeviction\"]";
    let proxy = Proxy::start(&two(&east, &west), options(health(table))).await;
    wait_active(&proxy, "us-east").await;
    east.query(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    wait_active(&proxy, "eu-west").await;
    let error = check(&proxy, "us-east", "not-loading").await["last_error"].to_string();
    assert!(error.contains("allkeys-lru"), "{error}");
}

/// Three health checks on us-east (ping, keyspace, a custom program that fails): `all`
/// fails over, `majority` does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn majority_with_one_of_three_checks_failing_keeps_the_member() {
    for (policy, fails_over) in [("all", true), ("majority", false)] {
        let (east, west) = (RedisServer::start(), RedisServer::start());
        let table = format!(
            "policy = \"{policy}\"\n[health.keyspace]\ninterval = \"100ms\"\n\
             [[health.custom]]\nname = \"flaky\"\ninterval = \"100ms\"\n\
             program = [\"sh\", \"-c\", \"test $GEOPROXY_MEMBER_ID != us-east\"]"
        );
        let proxy = Proxy::start_unrouted(&two(&east, &west), options(health(&table))).await;
        eventually(Duration::from_secs(5), "a route", || async {
            proxy.active_member().await.is_some()
        })
        .await;
        let_run(&proxy, "us-east", "flaky", 10).await;
        let active = proxy.active_member().await;
        let want = if fails_over { "eu-west" } else { "us-east" };
        assert_eq!(active.as_deref(), Some(want), "policy {policy}");
        assert_eq!(check(&proxy, "us-east", "flaky").await["state"], "down");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_checks_and_all_members_down_answers_at_once() {
    let (mut east, mut west) = (RedisServer::start(), RedisServer::start());
    let proxy = Proxy::start(
        &two(&east, &west),
        Options {
            unavailable_timeout: "10s",
            extra_health: "[health.ping]\necho = true",
            ..Options::default()
        },
    )
    .await;
    wait_active(&proxy, "us-east").await;
    assert_eq!(check(&proxy, "us-east", "ping").await["state"], "up");
    // The check ECHOes (sessions' admission PINGs are not checks).
    let echoes = east.info_field("commandstats", "cmdstat_echo");
    assert!(
        echoes.is_some_and(|s| s.starts_with("calls=")),
        "no ECHO seen"
    );
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"PING\r\n", b"+PONG\r\n").await;

    east.kill();
    west.kill();
    wait_metric(&proxy, "geoproxy_no_member_available", 1.0).await;
    assert_eq!(proxy.get("/ready").await.0, 503);
    // Answered at once, not after unavailable_timeout (10 s).
    let started = std::time::Instant::now();
    raw.send(b"GET k\r\n").await;
    let reply = raw.read_until(b"\r\n").await;
    assert!(
        reply.starts_with(b"-UNAVAILABLE"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// Processes running `sleep 30` (read from /proc: no procps needed on a bare machine).
fn sleepers() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c == b"sleep\x0030\x00")
        .count()
}
