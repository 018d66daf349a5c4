//! Shared support for the `it` integration tests: real `redis-server` fixtures
//! ([`redis_server`]), a fault-injecting TCP relay ([`relay`]), the differential
//! harness ([`diff`]: byte scripts against Redis and through geoproxy) and small
//! polling/port helpers. Not every test uses every helper, hence the
//! `dead_code` allowance.
#![allow(dead_code)]

pub mod bridge;
pub mod cluster;
pub mod diff;
pub mod proxy;
pub mod redis_server;
pub mod relay;
pub mod rest_api;
pub mod tls;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it returns true; panics with `what` after `timeout`.
///
/// The deadline is wall-clock (`std::time`), because the things we wait for are
/// real processes and sockets. A single `check` that hangs is cut off at the
/// deadline too, so a hung member cannot stall the test forever.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(true) = tokio::time::timeout(remaining, check()).await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (5 s at most) until `n` clients are blocked on `member` (BLPOP and the like).
pub async fn wait_blocked(member: &redis_server::RedisServer, n: usize) {
    let want = n.to_string();
    eventually(
        Duration::from_secs(5),
        &format!("{n} blocked client(s)"),
        || async {
            member.info_field("clients", "blocked_clients").as_deref() == Some(want.as_str())
        },
    )
    .await;
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, drop).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Connections of this host to 127.0.0.1:`port` still open at both ends (TCP ESTABLISHED,
/// from `/proc/net/tcp`). After a member is killed it drops to zero once the kernel has
/// delivered the member's close to every peer: how a test knows that a paused proxy has
/// the close waiting in its sockets.
pub fn established_to(port: u16) -> usize {
    let remote = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&"01")
        })
        .count()
}
