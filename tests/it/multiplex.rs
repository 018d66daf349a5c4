//! `proxy.multiplex = true`: sessions share member connections and pin one of their own
//! only while they need it; sessions of different users, databases and protocols never
//! share; a failover under many shared sessions gives each exactly its own errors.

use std::time::Duration;

use crate::support::eventually;
use crate::support::proxy::{two, wait_active, Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;

fn shared_options() -> Options {
    Options {
        multiplex: Some(true),
        ..Options::default()
    }
}

/// Connections the member has from geoproxy's sessions (all but the health check's and the
/// one this count itself uses): by `CLIENT LIST`, those whose last command was not the
/// checker's (PING, COMMAND) or this CLIENT LIST.
fn session_connections(member: &RedisServer) -> Vec<String> {
    member
        .client_list()
        .lines()
        .filter(|l| {
            !["cmd=ping ", "cmd=command ", "cmd=client|list "]
                .iter()
                .any(|c| l.contains(c))
        })
        .map(str::to_string)
        .collect()
}

async fn shared_sessions(proxy: &Proxy) -> f64 {
    proxy.metric("geoproxy_sessions_shared").await
}

/// Waits until `n` sessions share. A session pins or shares again right after it writes a
/// reply, and the test's runtime has two threads: its client may read that reply first.
async fn sharing(proxy: &Proxy, n: f64) {
    eventually(Duration::from_secs(5), "sessions sharing", || async move {
        shared_sessions(proxy).await == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_share_one_connection_and_pin_only_while_they_need_it() {
    let member = RedisServer::start();
    let proxy = Proxy::start(&[("local", member.addr())], shared_options()).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = Raw::connect(proxy.addr).await;
        c.roundtrip(format!("SET k{i} v\r\n").as_bytes(), b"+OK\r\n")
            .await;
        clients.push(c);
    }
    sharing(&proxy, 20.0).await;
    assert_eq!(
        session_connections(&member).len(),
        1,
        "20 sessions, one member connection: {:?}",
        session_connections(&member)
    );

    // A transaction pins for its length, then the session shares again.
    let c = &mut clients[0];
    c.roundtrip(b"MULTI\r\nINCR n\r\n", b"+OK\r\n+QUEUED\r\n")
        .await;
    sharing(&proxy, 19.0).await;
    c.roundtrip(b"EXEC\r\nGET k0\r\n", b"*1\r\n:1\r\n$1\r\nv\r\n")
        .await;
    sharing(&proxy, 20.0).await;

    // The transaction's connection waited in the idle pool for the next one: a second
    // transaction with the same state opens no connection.
    let connections = RedisServer::connections_received;
    let before = connections(&member);
    clients[7]
        .roundtrip(b"MULTI\r\nEXEC\r\n", b"+OK\r\n*0\r\n")
        .await;
    assert_eq!(connections(&member), before + 1, "only the count's own");

    // A blocking pop pins while it blocks.
    clients[1].send(b"BLPOP q 0\r\n").await;
    crate::support::wait_blocked(&member, 1).await;
    sharing(&proxy, 19.0).await;
    clients[2].roundtrip(b"RPUSH q job\r\n", b":1\r\n").await;
    clients[1]
        .roundtrip(b"", b"*2\r\n$1\r\nq\r\n$3\r\njob\r\n")
        .await;
    clients[1].roundtrip(b"GET k1\r\n", b"$1\r\nv\r\n").await;
    sharing(&proxy, 20.0).await;

    // A subscription pins until nothing is subscribed; messages reach it meanwhile.
    clients[3]
        .roundtrip(
            b"SUBSCRIBE ch\r\n",
            b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
        )
        .await;
    sharing(&proxy, 19.0).await;
    clients[4].roundtrip(b"PUBLISH ch hi\r\n", b":1\r\n").await;
    clients[3]
        .roundtrip(b"", b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n")
        .await;
    clients[3]
        .roundtrip(
            b"UNSUBSCRIBE ch\r\nGET k3\r\n",
            b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n$1\r\nv\r\n",
        )
        .await;
    sharing(&proxy, 20.0).await;

    // MONITOR keeps its connection for good.
    clients[5].roundtrip(b"MONITOR\r\n", b"+OK\r\n").await;
    sharing(&proxy, 19.0).await;
    clients[6].roundtrip(b"GET k6\r\n", b"$1\r\nv\r\n").await;
    let line = String::from_utf8(clients[5].read_until(b"\r\n").await).unwrap();
    assert!(line.contains("\"GET\" \"k6\""), "{line}");

    for reason in ["transaction", "blocking", "pubsub", "monitor"] {
        let sample = format!("geoproxy_pins_total{{reason=\"{reason}\"}}");
        assert!(proxy.metric(&sample).await >= 1.0, "{sample}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_different_users_databases_and_protocols_never_share() {
    let member = RedisServer::start();
    member.query(&["ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all"]);
    let proxy = Proxy::start(&[("local", member.addr())], shared_options()).await;
    let mut plain = Raw::connect(proxy.addr).await;
    let mut db1 = Raw::connect(proxy.addr).await;
    let mut alice = Raw::connect(proxy.addr).await;
    let mut resp3 = Raw::connect(proxy.addr).await;
    db1.roundtrip(b"SELECT 1\r\n", b"+OK\r\n").await;
    alice
        .roundtrip(
            b"AUTH alice wrong\r\n",
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        )
        .await;
    alice
        .roundtrip(b"AUTH alice alice-pw\r\n", b"+OK\r\n")
        .await;
    resp3.hello("3").await;
    plain.roundtrip(b"SET k db0\r\n", b"+OK\r\n").await;
    db1.roundtrip(b"SET k db1\r\n", b"+OK\r\n").await;
    alice.roundtrip(b"ACL WHOAMI\r\n", b"$5\r\nalice\r\n").await;
    resp3.roundtrip(b"GET k\r\n", b"$3\r\ndb0\r\n").await;
    plain
        .roundtrip(b"ACL WHOAMI\r\n", b"$7\r\ndefault\r\n")
        .await;
    db1.roundtrip(b"GET k\r\n", b"$3\r\ndb1\r\n").await;
    resp3.roundtrip(b"HGETALL nothing\r\n", b"%0\r\n").await;
    plain.roundtrip(b"HGETALL nothing\r\n", b"*0\r\n").await;
    // A session that pinned to change its state shares again at a later command once the
    // shared connection of its new state (opened in the background) is open: on a loaded
    // machine that can take more than one command.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while shared_sessions(&proxy).await != 4.0 {
        assert!(tokio::time::Instant::now() < deadline, "not all four share");
        for client in [&mut plain, &mut db1, &mut alice, &mut resp3] {
            client.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
        }
    }
    // Four shared connections, one per state (pinned ones may wait idle beside them).
    let gauge = "geoproxy_member_connections{kind=\"shared\",member=\"local\"}";
    assert_eq!(proxy.metric(gauge).await, 4.0);
    // The whole list: a shared connection whose last command was one of the PINGs above
    // is one of them too.
    let list = member.client_list();
    for state in ["user=alice", "db=1", "resp=3"] {
        assert!(list.contains(state), "no connection with {state}:\n{list}");
    }
}

/// A failover under 200 shared sessions, each with a pipeline in flight on a hung member:
/// each gets exactly its own `-OUTCOMEUNKNOWN`s, in order, and goes on on the next member;
/// nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_200_shared_sessions_gives_each_its_own_errors() {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let options = Options {
        multiplex: Some(true),
        reply_timeout: "300ms",
        max_clients: 1000,
        ..Options::default()
    };
    let proxy = Proxy::start(&two(&east, &west), options).await;
    let mut clients = Vec::new();
    for i in 0..200 {
        let mut c = Raw::connect(proxy.addr).await;
        c.roundtrip(
            format!("INCR c{i}\r\nINCR c{i}\r\n").as_bytes(),
            b":1\r\n:2\r\n",
        )
        .await;
        clients.push(c);
    }
    assert_eq!(session_connections(&east).len(), 1);
    east.stop();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(format!("INCR c{i}\r\nINCR c{i}\r\nINCR c{i}\r\n").as_bytes())
            .await;
    }
    wait_active(&proxy, "eu-west").await;
    for c in clients.iter_mut() {
        for _ in 0..3 {
            c.read_outcome_unknown("us-east").await;
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.roundtrip(format!("INCR c{i}\r\n").as_bytes(), b":1\r\n")
            .await;
    }
    east.cont();
    // What was acknowledged is on us-east: at least 2 for every counter.
    let east = &east;
    eventually(
        Duration::from_secs(5),
        "us-east answers again",
        || async move { east.info_field("server", "redis_version").is_some() },
    )
    .await;
    for i in 0..200 {
        let n = match east.query(&["GET", &format!("c{i}")]) {
            redis::Value::BulkString(b) => String::from_utf8(b).unwrap().parse::<u32>().unwrap(),
            other => panic!("c{i}: {other:?}"),
        };
        assert!(n >= 2, "c{i} = {n}: an acknowledged INCR was lost");
    }
}

/// A session that names itself (`CLIENT SETNAME`, as many clients do on connect) still
/// shares: geoproxy answers for the member, and the name is replayed when the session pins.
/// `AUTH` reaches the member once per credential: the shared connection opened for it
/// proves it for every later session; a wrong password still gets the member's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_stay_with_the_session_and_each_credential_is_checked_once() {
    let member = RedisServer::start();
    member.query(&["ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all"]);
    let proxy = Proxy::start(&[("local", member.addr())], shared_options()).await;
    let auth_calls = || {
        let stat = member.info_field("commandstats", "cmdstat_auth");
        let stat = stat.unwrap_or_default();
        let calls = stat.split(',').find_map(|f| f.strip_prefix("calls="));
        calls.map_or(0, |n| n.parse::<u64>().unwrap())
    };
    let shared_connections = "geoproxy_member_connections{kind=\"shared\",member=\"local\"}";

    let mut first = Raw::connect(proxy.addr).await;
    first
        .roundtrip(b"CLIENT SETNAME app-0\r\n", b"+OK\r\n")
        .await;
    first
        .roundtrip(b"AUTH alice alice-pw\r\n", b"+OK\r\n")
        .await;
    first.roundtrip(b"SET k v\r\n", b"+OK\r\n").await;
    // The credential's own shared connection is open (and has proven it).
    let proxy_ref = &proxy;
    eventually(
        Duration::from_secs(5),
        "a shared connection for alice",
        || async move { proxy_ref.metric(shared_connections).await == 2.0 },
    )
    .await;
    first.roundtrip(b"GET k\r\n", b"$1\r\nv\r\n").await;
    let checked = auth_calls();

    let mut clients = vec![first];
    for i in 1..10 {
        let mut c = Raw::connect(proxy.addr).await;
        c.roundtrip(format!("CLIENT SETNAME app-{i}\r\n").as_bytes(), b"+OK\r\n")
            .await;
        c.roundtrip(b"AUTH alice alice-pw\r\n", b"+OK\r\n").await;
        c.roundtrip(b"ACL WHOAMI\r\n", b"$5\r\nalice\r\n").await;
        clients.push(c);
    }
    assert_eq!(auth_calls(), checked, "AUTH went to the member again");
    assert_eq!(shared_sessions(&proxy).await, 10.0);
    // (The first session's AUTH pinned, with its name: that connection waits idle.)
    let named = |list: &[String]| {
        let named = |l: &&String| l.contains("name=app-") && !l.contains("name=app-0 ");
        list.iter().filter(named).count()
    };
    assert_eq!(named(&session_connections(&member)), 0, "a name pinned");

    // A wrong password is the member's to refuse, and teaches the session nothing.
    let mut wrong = Raw::connect(proxy.addr).await;
    wrong
        .roundtrip(
            b"AUTH alice not-it\r\n",
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        )
        .await;
    assert_eq!(auth_calls(), checked + 1);
    wrong
        .roundtrip(b"ACL WHOAMI\r\n", b"$7\r\ndefault\r\n")
        .await;

    // What needs the connection sees the name: the session pins with it replayed, and
    // its connection goes back to the idle pool when it shares again.
    clients[3]
        .roundtrip(b"CLIENT GETNAME\r\n", b"$5\r\napp-3\r\n")
        .await;
    sharing(&proxy, 11.0).await; // the ten named sessions and `wrong`
    clients[4]
        .roundtrip(
            b"MULTI\r\nCLIENT GETNAME\r\nEXEC\r\n",
            b"+OK\r\n+QUEUED\r\n*1\r\n$5\r\napp-4\r\n",
        )
        .await;
    assert!(named(&session_connections(&member)) >= 1);
    assert_eq!(auth_calls(), checked + 1, "pinned connections come idle");
}
