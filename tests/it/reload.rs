//! Reload (SIGHUP and `POST /v1/reload`) on the built binary: members added, removed and
//! re-addressed take effect without dropping sessions; health changes apply without a
//! switch; an invalid file is refused and the running configuration stays; listener changes
//! are named as needing a restart.

use std::time::Duration;

use crate::support::cluster::ProxyProcess;
use crate::support::eventually;
use crate::support::proxy::Raw;
use crate::support::redis_server::RedisServer;

/// A configuration with `members` (`(id, address)`, in preference order) and fast checks.
fn config(members: &[(&str, String)], extra_health: &str) -> String {
    let mut text = String::from(
        "[proxy]\nlisten = \"{listen}\"\nmode = \"colocated\"\n\
         [admin]\nlisten = \"{admin}\"\n\
         [failover]\nfailback_after = \"1s\"\n\
         [health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n",
    );
    text.push_str(extra_health);
    for (id, address) in members {
        text.push_str(&format!(
            "\n[[members]]\nid = \"{id}\"\naddress = \"{address}\"\n"
        ));
    }
    text
}

/// `key` in database `db` of `server`, read straight from it.
fn get_in_db(server: &RedisServer, db: u8, key: &str) -> Option<String> {
    let client = redis::Client::open(format!("{}/{db}", server.url())).expect("url");
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("connect to member");
    redis::cmd("GET").arg(key).query(&mut con).expect("GET")
}

async fn started(config: &str) -> ProxyProcess {
    let proxy = ProxyProcess::start(config);
    let p = &proxy;
    eventually(Duration::from_secs(10), "geoproxy routes", || async move {
        p.status()
            .await
            .is_some_and(|s| s["active_member"].is_string())
    })
    .await;
    proxy
}

/// Writes through `session` (keys `prefix1`, `prefix2`, ...) until one lands in database `db`
/// of `server` (5 s at most): the session moved there, with its database.
async fn writes_land_on(session: &mut Raw, server: &RedisServer, db: u8, prefix: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for n in 1.. {
        let key = format!("{prefix}{n}");
        session
            .roundtrip(format!("SET {key} v\r\n").as_bytes(), b"+OK\r\n")
            .await;
        if get_in_db(server, db, &key).is_some() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "writes never landed on {}",
            server.addr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `CLIENT ID` through the session: which member connection it uses.
async fn client_id(session: &mut Raw) -> String {
    session.send(b"CLIENT ID\r\n").await;
    String::from_utf8(session.read_until(b"\r\n").await).expect("UTF-8")
}

fn member_ids(status: &serde_json::Value) -> Vec<String> {
    status["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_reload_adds_and_removes_members_and_sessions_stay_connected() {
    let (a, b, c) = (
        RedisServer::start(),
        RedisServer::start(),
        RedisServer::start(),
    );
    let proxy = started(&config(&[("a", a.addr()), ("b", b.addr())], "")).await;
    let mut session = Raw::connect(proxy.addr).await;
    session.roundtrip(b"SELECT 2\r\n", b"+OK\r\n").await;
    session.roundtrip(b"SET k1 v1\r\n", b"+OK\r\n").await;
    let id = client_id(&mut session).await;
    assert_eq!(get_in_db(&a, 2, "k1").as_deref(), Some("v1"));

    // b leaves, c joins: the session on a keeps its member connection.
    proxy.rewrite(&config(&[("a", a.addr()), ("c", c.addr())], ""));
    let (code, body) = proxy.post("/v1/reload").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["members"]["added"], serde_json::json!(["c"]));
    assert_eq!(body["members"]["removed"], serde_json::json!(["b"]));
    assert_eq!(body["restart_needed"], serde_json::json!([]));
    let status = proxy.status().await.expect("status");
    assert_eq!(member_ids(&status), ["a", "c"]);
    assert_eq!(
        client_id(&mut session).await,
        id,
        "the session kept its connection"
    );
    session.roundtrip(b"SET k2 v2\r\n", b"+OK\r\n").await;
    assert_eq!(get_in_db(&a, 2, "k2").as_deref(), Some("v2"));
    let p = &proxy;
    eventually(
        Duration::from_secs(5),
        "c is checked and up",
        || async move {
            let s = p.status().await.expect("status");
            s["members"][1]["state"] == "up"
        },
    )
    .await;
    let metrics = proxy.metrics().await;
    assert!(
        !metrics.contains("geoproxy_member_up{member=\"b\"}"),
        "a removed member's gauges go"
    );
    assert!(metrics.contains("geoproxy_member_up{member=\"c\"} 1"));

    // The active member itself leaves: the session moves to c with its database, on the
    // same client connection, and the switch says why.
    proxy.rewrite(&config(&[("c", c.addr())], ""));
    let (code, body) = proxy.post("/v1/reload").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["members"]["removed"], serde_json::json!(["a"]));
    writes_land_on(&mut session, &c, 2, "m").await;
    let status = proxy.status().await.expect("status");
    assert_eq!(status["active_member"], "c");
    let switches = status["switches"].as_array().expect("switches");
    assert_eq!(switches.last().unwrap()["reason"], "removed", "{status}");
    assert!(proxy
        .metrics()
        .await
        .contains("geoproxy_config_reloads_total{outcome=\"applied\"} 2"));
}

#[tokio::test]
async fn a_member_with_a_new_address_takes_its_sessions_with_their_state() {
    let (a, b, moved_a) = (
        RedisServer::start(),
        RedisServer::start(),
        RedisServer::start(),
    );
    let proxy = started(&config(&[("a", a.addr()), ("b", b.addr())], "")).await;
    let mut session = Raw::connect(proxy.addr).await;
    session.roundtrip(b"SELECT 3\r\n", b"+OK\r\n").await;
    session.roundtrip(b"SET before 1\r\n", b"+OK\r\n").await;
    assert_eq!(get_in_db(&a, 3, "before").as_deref(), Some("1"));

    // Same id, new address: by SIGHUP this time.
    proxy.rewrite(&config(&[("a", moved_a.addr()), ("b", b.addr())], ""));
    proxy.signal("HUP");
    let p = &proxy;
    let want = moved_a.addr();
    eventually(
        Duration::from_secs(5),
        "status shows a's new address",
        || {
            let want = want.clone();
            async move {
                let s = p.status().await.expect("status");
                s["members"][0]["address"] == want.as_str()
            }
        },
    )
    .await;
    writes_land_on(&mut session, &moved_a, 3, "after").await;
    assert!(proxy.log().contains("configuration reloaded"));
}

#[tokio::test]
async fn an_invalid_file_is_refused_and_the_running_configuration_stays() {
    let a = RedisServer::start();
    let good = config(&[("a", a.addr())], "");
    let proxy = started(&good).await;
    let mut session = Raw::connect(proxy.addr).await;
    session.roundtrip(b"SET k v\r\n", b"+OK\r\n").await;

    proxy.rewrite(&good.replace("address =", "adress ="));
    let (code, body) = proxy.post("/v1/reload").await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error_code"], "invalid_config");
    assert!(
        body["description"].as_str().unwrap().contains("adress"),
        "the error names the key: {body}"
    );
    // SIGHUP with the same file: logged, counted, and the process serves on.
    proxy.signal("HUP");
    let p = &proxy;
    eventually(
        Duration::from_secs(5),
        "both rejections counted",
        || async move {
            p.metrics()
                .await
                .contains("geoproxy_config_reloads_total{outcome=\"rejected\"} 2")
        },
    )
    .await;
    session.roundtrip(b"GET k\r\n", b"$1\r\nv\r\n").await;
    let status = proxy.status().await.expect("status");
    assert_eq!(member_ids(&status), ["a"]);
    assert_eq!(status["members"][0]["address"], a.addr().as_str());
    assert!(proxy.log().contains("configuration not reloaded"));
}

#[tokio::test]
async fn listener_changes_need_a_restart_and_health_changes_apply_without_a_switch() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let members = [("a", a.addr()), ("b", b.addr())];
    let proxy = started(&config(&members, "")).await;
    let epoch = proxy.status().await.expect("status")["epoch"].clone();
    let mut session = Raw::connect(proxy.addr).await;
    session.roundtrip(b"SET k v\r\n", b"+OK\r\n").await;

    // A new listen port and a keyspace check in one file.
    let other_port = crate::support::free_port();
    let text = config(&members, "[health.keyspace]\nshards = 1\n")
        .replace("{listen}", &format!("127.0.0.1:{other_port}"));
    proxy.rewrite(&text);
    let (code, body) = proxy.post("/v1/reload").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["restart_needed"], serde_json::json!(["proxy.listen"]));
    assert_eq!(body["health_changed"], true);
    let p = &proxy;
    eventually(
        Duration::from_secs(5),
        "the keyspace check runs on a",
        || async move {
            let s = p.status().await.expect("status");
            s["members"][0]["checks"]
                .as_array()
                .expect("checks")
                .iter()
                .any(|c| c["name"] == "keyspace" && c["state"] == "up")
        },
    )
    .await;
    let status = proxy.status().await.expect("status");
    assert_eq!(status["epoch"], epoch, "a reload alone never switches");
    assert_eq!(status["active_member"], "a");
    // Still on the old port, not on the new one.
    session.roundtrip(b"GET k\r\n", b"$1\r\nv\r\n").await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", other_port)).is_err());
}

/// A member that a reload removed keeps none of the proxy's connections: the shared ones
/// close once nothing is owed on them, and the idle ones of its own that a worker kept
/// close at the worker's next use of its pools (`proxy.multiplex`, the default).
#[tokio::test]
async fn a_removed_member_keeps_no_pooled_connection() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let multiplexed = |members: &[(&str, String)]| {
        config(members, "").replace("[proxy]\n", "[proxy]\nmultiplex = true\n")
    };
    let proxy = started(&multiplexed(&[("a", a.addr()), ("b", b.addr())])).await;
    let mut shared = Raw::connect(proxy.addr).await;
    shared.roundtrip(b"SET k v\r\n", b"+OK\r\n").await;
    // A transaction pins a connection of its own, kept idle once the session shares again.
    let mut pinned = Raw::connect(proxy.addr).await;
    pinned
        .roundtrip(b"MULTI\r\nEXEC\r\n", b"+OK\r\n*0\r\n")
        .await;
    pinned.roundtrip(b"GET k\r\n", b"$1\r\nv\r\n").await;
    let list = a.client_list();
    // The shared connection (its last command the GET) and the idle one (the EXEC).
    for last in ["cmd=get ", "cmd=exec "] {
        assert!(
            list.contains(last),
            "no connection that ran {last}on a:\n{list}"
        );
    }
    let a_clients = || a.info_field("clients", "connected_clients");

    proxy.rewrite(&multiplexed(&[("b", b.addr())]));
    let (code, body) = proxy.post("/v1/reload").await;
    assert_eq!(code, 200, "{body}");
    writes_land_on(&mut shared, &b, 0, "s").await;
    writes_land_on(&mut pinned, &b, 0, "p").await;
    // Only the connection asking is left.
    eventually(
        Duration::from_secs(5),
        "a has no connection from geoproxy",
        || async { a_clients().as_deref() == Some("1") },
    )
    .await;
}
