//! Centralized mode against a real etcd and several geoproxy processes: one serves, the
//! standby takes over when it dies, freezes or loses etcd, and the two never serve at once.
//! And the strict switch (break before make) checked with MONITOR on both members.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::support::cluster::{EtcdServer, ProxyProcess};
use crate::support::proxy::{two, Options, Proxy};
use crate::support::redis_server::RedisServer;
use crate::support::relay::{Fault, FaultRelay};
use crate::support::{eventually, free_port};

/// The lease TTL of these tests: fencing at 2/3 of it, takeover after it.
const TTL: Duration = Duration::from_secs(2);

fn centralized(name: &str, etcd: &str, prefix: &str, members: &[(&str, String)]) -> String {
    let mut t = format!(
        r#"
[proxy]
listen = "{{listen}}"
mode = "centralized"
name = "{name}"
threads = 1
unavailable_timeout = "500ms"
[admin]
listen = "{{admin}}"
[health]
interval = "100ms"
timeout = "300ms"
[failover]
failback_after = "1s"
[centralized]
election = "etcd"
etcd_endpoints = ["http://{etcd}"]
etcd_prefix = "{prefix}"
lease_ttl = "{ttl}s"
"#,
        ttl = TTL.as_secs()
    );
    for (id, addr) in members {
        t.push_str(&format!(
            "[[members]]\nid = \"{id}\"\naddress = \"{addr}\"\nregion = \"{id}\"\n"
        ));
    }
    t
}

/// The roles of `proxies` when exactly one is active and the others standby.
async fn single_active(proxies: &[&ProxyProcess]) -> Option<usize> {
    let mut roles = Vec::new();
    for p in proxies {
        roles.push(p.role().await);
    }
    let active: Vec<usize> = (0..roles.len())
        .filter(|&i| roles[i].as_deref() == Some("active"))
        .collect();
    let standbys = roles
        .iter()
        .filter(|r| r.as_deref() == Some("standby"))
        .count();
    (active.len() == 1 && standbys == proxies.len() - 1).then(|| active[0])
}

/// Waits until one of `proxies` is active and the others standby; returns the active one's
/// index.
async fn one_active(proxies: &[&ProxyProcess]) -> usize {
    eventually(
        Duration::from_secs(15),
        "exactly one active proxy",
        || async { single_active(proxies).await.is_some() },
    )
    .await;
    single_active(proxies).await.expect("one active proxy")
}

const STANDBY_REPLY: &str =
    "-UNAVAILABLE geoproxy: this proxy is a standby; the active proxy serves (centralized mode)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_a_killed_active_and_the_old_one_returns_as_standby() {
    let etcd = EtcdServer::start().await;
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let members = two(&east, &west);
    let mut a = ProxyProcess::start(&centralized("a", &etcd.addr(), "/t/kill", &members));
    // b starts once a holds the lease, so that a is the one to kill.
    eventually(Duration::from_secs(10), "a is active", || async {
        a.role().await.as_deref() == Some("active")
    })
    .await;
    let b = ProxyProcess::start(&centralized("b", &etcd.addr(), "/t/kill", &members));
    assert_eq!(one_active(&[&a, &b]).await, 0);
    let (active, standby) = (&mut a, &b);
    // The standby refuses clients and is not ready; the active one serves.
    assert_eq!(standby.set("k", "v").await.as_deref(), Some(STANDBY_REPLY));
    assert_eq!(standby.ready().await, Some(503));
    eventually(
        Duration::from_secs(5),
        "the active proxy serves",
        || async { active.set("k", "from-a").await.as_deref() == Some("+OK") },
    )
    .await;
    assert_eq!(active.ready().await, Some(200));

    let killed = Instant::now();
    active.kill();
    eventually(Duration::from_secs(10), "the standby serves", || async {
        standby.set("k", "from-b").await.as_deref() == Some("+OK")
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took < TTL + TTL / 3 + Duration::from_secs(2),
        "took {took:?}"
    );
    let status = standby.status().await.unwrap();
    assert_eq!(status["role"], "active");
    let last = status["switches"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["reason"], "takeover");
    // It started where the old active was.
    assert_eq!(last["to"], "us-east");

    // The old active comes back: it stays standby while the other holds the lease.
    active.restart();
    eventually(
        Duration::from_secs(10),
        "the old active answers",
        || async { active.role().await.is_some() },
    )
    .await;
    let until = Instant::now() + TTL * 2;
    while Instant::now() < until {
        assert_eq!(
            active.role().await.as_deref(),
            Some("standby"),
            "{}",
            active.log()
        );
        assert_eq!(standby.role().await.as_deref(), Some("active"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_active_is_replaced_and_never_serves_again_when_it_thaws() {
    let etcd = EtcdServer::start().await;
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let members = two(&east, &west);
    let a = ProxyProcess::start(&centralized("a", &etcd.addr(), "/t/freeze", &members));
    let b = ProxyProcess::start(&centralized("b", &etcd.addr(), "/t/freeze", &members));
    let (active, standby) = match one_active(&[&a, &b]).await {
        0 => (&a, &b),
        _ => (&b, &a),
    };
    eventually(
        Duration::from_secs(5),
        "the active proxy serves",
        || async { active.set("k", "v").await.as_deref() == Some("+OK") },
    )
    .await;
    active.signal("STOP");
    eventually(Duration::from_secs(10), "the standby serves", || async {
        standby.set("k", "v2").await.as_deref() == Some("+OK")
    })
    .await;
    // A client is already waiting on the frozen proxy when it thaws.
    let waiting = tokio::spawn({
        let addr = active.addr;
        async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
            c.write_all(b"SET k stale\r\n").await.ok()?;
            let mut buf = vec![0u8; 256];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    active.signal("CONT");
    let reply = waiting.await.unwrap();
    assert_eq!(reply.as_deref(), Some(STANDBY_REPLY), "{}", active.log());
    assert_ne!(
        east.query(&["GET", "k"]),
        redis::Value::BulkString(b"stale".to_vec())
    );
    eventually(
        Duration::from_secs(5),
        "the thawed proxy is a standby",
        || async { active.role().await.as_deref() == Some("standby") },
    )
    .await;
    assert!(active.log().contains("fencing") || active.log().contains("no longer has the lease"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_cut_off_from_etcd_stops_serving_before_the_standby_starts() {
    let etcd = EtcdServer::start().await;
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let members = two(&east, &west);
    let (relay_a, relay_b) = (
        FaultRelay::start(&etcd.addr()).await,
        FaultRelay::start(&etcd.addr()).await,
    );
    let a = ProxyProcess::start(&centralized("a", &relay_a.addr(), "/t/cut", &members));
    // b starts once a holds the lease, so that a is the one to cut.
    eventually(Duration::from_secs(10), "a is active", || async {
        a.role().await.as_deref() == Some("active")
    })
    .await;
    let b = ProxyProcess::start(&centralized("b", &relay_b.addr(), "/t/cut", &members));
    assert_eq!(one_active(&[&a, &b]).await, 0);
    eventually(Duration::from_secs(5), "a serves", || async {
        a.set("k", "a").await.as_deref() == Some("+OK")
    })
    .await;

    relay_a.set(Fault::BlackHole);
    let cut = Instant::now();
    let mut a_last_ok = cut;
    let mut b_first_ok = None;
    while b_first_ok.is_none() && cut.elapsed() < Duration::from_secs(10) {
        let (ra, rb) = tokio::join!(a.set("k", "a"), b.set("k", "b"));
        let now = Instant::now();
        if ra.as_deref() == Some("+OK") {
            a_last_ok = now;
        }
        if rb.as_deref() == Some("+OK") {
            b_first_ok = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b_first_ok = b_first_ok.expect("b never served");
    assert!(
        a_last_ok < b_first_ok,
        "a served until {:?} after the cut, b from {:?}",
        a_last_ok - cut,
        b_first_ok - cut
    );
    assert!(
        a_last_ok - cut < TTL,
        "a served {:?} after the cut",
        a_last_ok - cut
    );
    assert_eq!(a.set("k", "a").await.as_deref(), Some(STANDBY_REPLY));
    assert_eq!(a.role().await.as_deref(), Some("standby"));
    assert!(a.log().contains("stopping to serve"), "{}", a.log());
}

/// MONITOR on a member: the time (µs since the epoch) of every command with `needle`, and
/// whether it was a transaction's (`strict-tx`), until `stop` is set (and 300 ms more, for
/// what was on its way).
async fn monitor(
    addr: String,
    needle: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(u64, bool)>> {
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    c.write_all(b"MONITOR\r\n").await.unwrap();
    let mut lines = BufReader::new(c).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
    tokio::spawn(async move {
        let mut times = Vec::new();
        let mut until: Option<Instant> = None;
        loop {
            if until.is_none() && stop.load(std::sync::atomic::Ordering::Relaxed) {
                until = Some(Instant::now() + Duration::from_millis(300));
            }
            let left = until.map_or(Duration::from_millis(100), |u| {
                u.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                break;
            }
            let line = match tokio::time::timeout(left, lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                Ok(_) => break,
                Err(_) => continue,
            };
            if line.contains(needle) {
                let stamp = line.trim_start_matches('+').split(' ').next().unwrap_or("");
                let (s, us) = stamp.split_once('.').unwrap_or((stamp, "0"));
                let at = s.parse::<u64>().unwrap_or(0) * 1_000_000 + us.parse::<u64>().unwrap_or(0);
                times.push((at, line.contains("strict-tx")));
            }
        }
        times
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strict_switch_never_has_commands_in_flight_to_two_members() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let proxy = Proxy::start(
        &two(&east, &west),
        Options {
            failback_after: "500ms",
            unavailable_timeout: "2s",
            extra_failover: "switch = \"strict\"\nstrict_timeout = \"300ms\"",
            ..Options::default()
        },
    )
    .await;
    // Clients write all the time, each a pipeline of 10 INCRs after another.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (on_east, on_west) = (
        monitor(east.addr(), "\"strict", stop.clone()).await,
        monitor(west.addr(), "\"strict", stop.clone()).await,
    );
    let mut writers = Vec::new();
    for i in 0..8 {
        let (addr, stop) = (proxy.addr, stop.clone());
        writers.push(tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let batch = format!("INCR strict:{i}\r\n").repeat(10);
            let mut acknowledged = 0u64;
            let mut buf = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.write_all(batch.as_bytes()).await.unwrap();
                let mut lines = 0;
                while lines < 10 {
                    let mut chunk = [0u8; 4096];
                    let n = c.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the proxy closed a client");
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                        let line: Vec<u8> = buf.drain(..end + 2).collect();
                        assert_eq!(line[0], b':', "{}", String::from_utf8_lossy(&line));
                        acknowledged += 1;
                        lines += 1;
                    }
                }
            }
            acknowledged
        }));
    }
    // And one client runs slow transactions: with a per-session switch it would go on
    // sending to the old member while the others are on the new one.
    // Three, out of step (40 ms steps, started 53 ms apart), so that one is inside a
    // transaction whenever a switch comes.
    let slow: Vec<_> = (0..3u64)
        .map(|i| {
            let (addr, stop) = (proxy.addr, stop.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(53 * i)).await;
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut buf = [0u8; 1024];
                let steps: [&[u8]; 4] = [
                    b"MULTI\r\n",
                    b"INCR strict-tx\r\n",
                    b"INCR strict-tx\r\n",
                    b"EXEC\r\n",
                ];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for step in steps {
                        c.write_all(step).await.unwrap();
                        let read = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf));
                        let n = read.await.unwrap().unwrap();
                        assert!(n > 0, "the proxy closed a client");
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A failover (us-east killed would lose MONITOR; an operator's switchover is a live
    // member to live member switch) and a failback.
    let (code, text) = proxy
        .post("/v1/switchover", r#"{"to": "eu-west"}"#, None)
        .await;
    assert_eq!(code, 200, "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, text) = proxy
        .post("/v1/switchover", r#"{"to": "us-east"}"#, None)
        .await;
    assert_eq!(code, 200, "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in slow {
        s.await.unwrap();
    }
    let mut acknowledged = 0;
    for w in writers {
        acknowledged += w.await.unwrap();
    }
    let (east_times, west_times) = (on_east.await.unwrap(), on_west.await.unwrap());
    assert!(!east_times.is_empty() && !west_times.is_empty());
    // Every INCR, merged by time: the member changes exactly twice (east -> west -> east).
    let mut all: Vec<(u64, char)> = east_times.iter().map(|&(t, _)| (t, 'e')).collect();
    all.extend(west_times.iter().map(|&(t, _)| (t, 'w')));
    all.sort();
    let changes = all.windows(2).filter(|w| w[0].1 != w[1].1).count();
    assert_eq!(
        changes, 2,
        "commands on both members at once: {changes} changes"
    );
    // Nothing acknowledged was lost: every INCR the clients saw answered ran once.
    let plain = |times: &[(u64, bool)]| times.iter().filter(|(_, tx)| !tx).count();
    assert_eq!(
        acknowledged as usize,
        plain(&east_times) + plain(&west_times)
    );
}

fn pooled(name: &str, etcd: &str, members: &[(&str, String)]) -> String {
    let mut t = format!(
        r#"
[proxy]
listen = "{{listen}}"
mode = "pooled"
name = "{name}"
threads = 1
[admin]
listen = "{{admin}}"
[health]
interval = "100ms"
timeout = "300ms"
[failover]
failback_after = "1s"
[pooled]
etcd_endpoints = ["http://{etcd}"]
etcd_prefix = "/t/pool"
lease_ttl = "2s"
quorum = 2
interval = "200ms"
"#
    );
    for (id, addr) in members {
        t.push_str(&format!(
            "[[members]]\nid = \"{id}\"\naddress = \"{addr}\"\nregion = \"{id}\"\n"
        ));
    }
    t
}

/// The active member of each proxy (`None` where it does not answer).
async fn actives(proxies: &[&ProxyProcess]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for p in proxies {
        let status = p.status().await;
        out.push(status.and_then(|s| s["active_member"].as_str().map(str::to_string)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_keeps_a_member_one_proxy_sees_down_and_leaves_it_when_a_quorum_does() {
    let etcd = EtcdServer::start().await;
    let (east, west) = (RedisServer::start(), RedisServer::start());
    // b and c reach us-east through relays, to fail it for them alone.
    let (relay_b, relay_c) = (
        FaultRelay::start(&east.addr()).await,
        FaultRelay::start(&east.addr()).await,
    );
    let a = ProxyProcess::start(&pooled("a", &etcd.addr(), &two(&east, &west)));
    let b = ProxyProcess::start(&pooled(
        "b",
        &etcd.addr(),
        &[("us-east", relay_b.addr()), ("eu-west", west.addr())],
    ));
    let c = ProxyProcess::start(&pooled(
        "c",
        &etcd.addr(),
        &[("us-east", relay_c.addr()), ("eu-west", west.addr())],
    ));
    let pool = [&a, &b, &c];
    let east_everywhere = vec![Some("us-east".to_string()); 3];
    eventually(
        Duration::from_secs(10),
        "a pool of three on us-east",
        || async {
            let mut whole = true;
            for p in pool {
                let s = p.status().await;
                whole &=
                    s.is_some_and(|s| s["pool"]["proxies"] == 3 && s["pool"]["quorum"] == true);
            }
            whole && actives(&pool).await == east_everywhere
        },
    )
    .await;

    // c alone loses us-east: its own checks say down, the pool keeps it.
    relay_c.set(Fault::BlackHole);
    eventually(Duration::from_secs(5), "c sees us-east down", || async {
        c.status()
            .await
            .is_some_and(|s| s["members"][0]["state"] == "down")
    })
    .await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(actives(&pool).await, east_everywhere, "{}", c.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let votes = c.status().await.unwrap()["pool"]["down_votes"]["us-east"].clone();
    assert_eq!(votes, 1);

    // b loses it too: a quorum sees it down, and the whole pool leaves it, a included.
    relay_b.set(Fault::BlackHole);
    let west_everywhere = vec![Some("eu-west".to_string()); 3];
    eventually(Duration::from_secs(5), "the pool on eu-west", || async {
        actives(&pool).await == west_everywhere
    })
    .await;
    assert_eq!(a.status().await.unwrap()["members"][0]["state"], "up");
    eventually(Duration::from_secs(5), "a serves on eu-west", || async {
        a.set("k", "pool").await.as_deref() == Some("+OK")
    })
    .await;
    assert_eq!(
        west.query(&["GET", "k"]),
        redis::Value::BulkString(b"pool".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_static_peers_shares_views_through_their_admin_apis() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let relay_c = FaultRelay::start(&east.addr()).await;
    let admins = [free_port(), free_port(), free_port()];
    let config = |me: usize, east_addr: String| {
        let peers: Vec<String> = (0..3)
            .filter(|&i| i != me)
            .map(|i| format!("\"http://127.0.0.1:{}\"", admins[i]))
            .collect();
        pooled(
            &format!("p{me}"),
            "unused",
            &[("us-east", east_addr), ("eu-west", west.addr())],
        )
        .replace(
            "etcd_endpoints = [\"http://unused\"]\netcd_prefix = \"/t/pool\"\nlease_ttl = \"2s\"\n",
            &format!("peers = [{}]\n", peers.join(", ")),
        )
    };
    let a = ProxyProcess::start_with_admin(&config(0, east.addr()), admins[0]);
    let b = ProxyProcess::start_with_admin(&config(1, east.addr()), admins[1]);
    let c = ProxyProcess::start_with_admin(&config(2, relay_c.addr()), admins[2]);
    let pool = [&a, &b, &c];
    eventually(Duration::from_secs(10), "a pool of three", || async {
        c.status().await.is_some_and(|s| s["pool"]["proxies"] == 3)
            && actives(&pool).await == vec![Some("us-east".to_string()); 3]
    })
    .await;
    relay_c.set(Fault::BlackHole);
    eventually(Duration::from_secs(5), "c sees us-east down", || async {
        c.status()
            .await
            .is_some_and(|s| s["members"][0]["state"] == "down")
    })
    .await;
    // c's own view is outvoted: it stays on us-east with the pool.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(
            c.status().await.unwrap()["active_member"],
            "us-east",
            "{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a and b go: c alone is below the quorum and decides on its own view.
    drop(a);
    drop(b);
    eventually(Duration::from_secs(10), "c on its own view", || async {
        c.status()
            .await
            .is_some_and(|s| s["pool"]["quorum"] == false && s["active_member"] == "eu-west")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_the_standby_polls_its_peer_and_takes_over() {
    let (east, west) = (RedisServer::start(), RedisServer::start());
    let admins = [free_port(), free_port()];
    let config = |me: usize, primary: bool| {
        let base = centralized(&format!("p{me}"), "unused", "/t/peer", &two(&east, &west));
        let election = format!(
            "election = \"peer\"\npeer = \"http://127.0.0.1:{}\"\nprimary = {primary}\n\
             peer_interval = \"200ms\"\npeer_down_after = 3\n",
            admins[1 - me]
        );
        let start = base.find("election = \"etcd\"").unwrap();
        let end = base.find("[[members]]").unwrap();
        format!("{}{election}{}", &base[..start], &base[end..])
    };
    let mut a = ProxyProcess::start_with_admin(&config(0, true), admins[0]);
    let b = ProxyProcess::start_with_admin(&config(1, false), admins[1]);
    assert_eq!(one_active(&[&a, &b]).await, 0, "{}", a.log());
    eventually(Duration::from_secs(5), "a serves", || async {
        a.set("k", "a").await.as_deref() == Some("+OK")
    })
    .await;
    assert_eq!(b.set("k", "b").await.as_deref(), Some(STANDBY_REPLY));
    a.kill();
    eventually(Duration::from_secs(5), "b takes over", || async {
        b.set("k", "b").await.as_deref() == Some("+OK")
    })
    .await;
    // The primary returns: its peer serves, so it stays a standby.
    a.restart();
    eventually(Duration::from_secs(10), "a answers", || async {
        a.role().await.is_some()
    })
    .await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(single_active(&[&a, &b]).await, Some(1), "{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
