//! Safe on a hostile network: TLS to members (with and without a client certificate, a
//! wrong CA), the TLS listener (mTLS, certificates reloaded on SIGHUP), a failover between
//! TLS members under one TLS client, proxy authentication (Redis's own answers, no member
//! connection before it, secrets nowhere in what geoproxy prints), and the command policy
//! (denied and renamed commands, as Redis's `rename-command`).

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::cluster::ProxyProcess;
use crate::support::proxy::{config_toml, wait_active, Options, Proxy, Raw};
use crate::support::redis_server::RedisServer;
use crate::support::tls::{Pki, TlsRaw, TlsRedis};
use crate::support::{eventually, free_port};

/// A test's TOML text, alive as long as the test binary.
fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// `[[members]]` keys for TLS to members whose CA is `pki`'s, with extra keys.
fn member_tls(pki: &Pki, extra: &str) -> &'static str {
    leak(format!(
        "tls = true\ntls_ca_file = \"{}\"\n{extra}",
        pki.ca_file()
    ))
}

/// The `[proxy]` line of a TLS listener on a free port, with extra keys.
fn listener_tls(pki: &Pki, extra: &str) -> &'static str {
    let pair = pki.issue("geoproxy");
    leak(format!(
        "tls = {{ listen = \"127.0.0.1:0\", cert_file = \"{}\", key_file = \"{}\"{extra} }}",
        pair.cert, pair.key
    ))
}

/// The `last_error` of `member` in `/v1/status`.
async fn last_error(proxy: &Proxy, member: &str) -> String {
    let status = proxy.status().await;
    let m = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == member)
        .cloned()
        .unwrap_or_default();
    m.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_member_with_and_without_a_client_certificate() {
    let pki = Pki::new("members");
    // A member that does not ask for client certificates: TLS alone is enough.
    let open = TlsRedis::start(&pki, false);
    let proxy = Proxy::start(
        &[("local", open.tls_addr())],
        Options {
            extra_member: member_tls(&pki, ""),
            ..Options::default()
        },
    )
    .await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(b"SET k over-tls\r\n", b"+OK\r\n").await;
    assert_eq!(
        open.server.query(&["GET", "k"]),
        redis::Value::BulkString(b"over-tls".to_vec())
    );
    drop(proxy);

    // A member that requires one (mTLS): without it the member is never up and nothing
    // reaches it; with it, traffic flows.
    let strict = TlsRedis::start(&pki, true);
    let without = Proxy::start_unrouted(
        &[("local", strict.tls_addr())],
        Options {
            unavailable_timeout: "300ms",
            extra_member: member_tls(&pki, ""),
            ..Options::default()
        },
    )
    .await;
    let mut raw = Raw::connect(without.addr).await;
    raw.send(b"SET k no-cert\r\n").await;
    let reply = raw.read_until(b"\r\n").await;
    assert!(reply.starts_with(b"-UNAVAILABLE"), "{reply:?}");
    assert_eq!(without.active_member().await, None);
    assert!(strict
        .server
        .info_field("commandstats", "cmdstat_set")
        .is_none());

    let client = pki.issue("geoproxy-client");
    let keys = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        client.cert, client.key
    );
    let with = Proxy::start(
        &[("local", strict.tls_addr())],
        Options {
            extra_member: member_tls(&pki, &keys),
            ..Options::default()
        },
    )
    .await;
    let mut raw = Raw::connect(with.addr).await;
    raw.roundtrip(b"SET k mtls\r\n", b"+OK\r\n").await;
    assert_eq!(
        strict.server.query(&["GET", "k"]),
        redis::Value::BulkString(b"mtls".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_signed_by_another_ca_is_refused_with_a_clear_error_and_no_traffic() {
    let (real, other) = (Pki::new("real"), Pki::new("other"));
    let member = TlsRedis::start(&real, false);
    let commands = || {
        member
            .server
            .info_field("stats", "total_commands_processed")
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = commands();
    let proxy = Proxy::start_unrouted(
        &[("local", member.tls_addr())],
        Options {
            unavailable_timeout: "300ms",
            extra_member: member_tls(&other, ""),
            ..Options::default()
        },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the check names the certificate",
        || async {
            let error = last_error(&proxy, "local").await;
            error.contains("TLS") && error.contains("certificate")
        },
    )
    .await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"SET k v\r\n").await;
    let reply = raw.read_until(b"\r\n").await;
    assert!(reply.starts_with(b"-UNAVAILABLE"), "{reply:?}");
    assert_eq!(proxy.active_member().await, None);
    // No command from the proxy ever ran on the member: only the INFO that read `before`.
    assert_eq!(commands(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_tls_client_fails_over_between_two_tls_members() {
    let pki = Pki::new("both");
    let mut east = TlsRedis::start(&pki, false);
    let west = TlsRedis::start(&pki, false);
    let proxy = Proxy::start(
        &[("us-east", east.tls_addr()), ("eu-west", west.tls_addr())],
        Options {
            extra_member: member_tls(&pki, ""),
            extra_proxy: listener_tls(&pki, ""),
            ..Options::default()
        },
    )
    .await;
    wait_active(&proxy, "us-east").await;
    let tls_addr = proxy.tls_addr.expect("a TLS listener");
    let mut client = TlsRaw::connect(tls_addr, pki.client_config(None))
        .await
        .expect("TLS to geoproxy");
    client.roundtrip(b"SET k east\r\n", b"+OK\r\n").await;
    assert_eq!(
        east.server.query(&["GET", "k"]),
        redis::Value::BulkString(b"east".to_vec())
    );
    east.server.kill();
    wait_active(&proxy, "eu-west").await;
    // The same TLS connection goes on, now on eu-west.
    client.roundtrip(b"SET k west\r\n", b"+OK\r\n").await;
    client.roundtrip(b"GET k\r\n", b"$4\r\nwest\r\n").await;
    assert_eq!(
        west.server.query(&["GET", "k"]),
        redis::Value::BulkString(b"west".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_listener_requires_a_client_certificate_with_a_client_ca() {
    let pki = Pki::new("clients");
    let member = RedisServer::start();
    let extra = format!(
        ", client_ca_file = \"{}\", min_version = \"1.3\"",
        pki.ca_file()
    );
    let proxy = Proxy::start(
        &[("local", member.addr())],
        Options {
            extra_proxy: listener_tls(&pki, &extra),
            ..Options::default()
        },
    )
    .await;
    let tls_addr = proxy.tls_addr.expect("a TLS listener");
    // Without a certificate the handshake (or the first read) fails.
    let refused = match TlsRaw::connect(tls_addr, pki.client_config(None)).await {
        Err(_) => true,
        Ok(mut c) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = c.0.write_all(b"PING\r\n").await;
            let _ = c.0.flush().await;
            let mut buf = [0u8; 16];
            !matches!(
                tokio::time::timeout(Duration::from_secs(5), c.0.read(&mut buf)).await,
                Ok(Ok(n)) if n > 0
            )
        }
    };
    assert!(refused, "a client without a certificate was served");
    let cert = pki.issue("app");
    // With a certificate but only TLS 1.2, below min_version = "1.3": refused too.
    let tls12 = [&tokio_rustls::rustls::version::TLS12];
    let old = TlsRaw::connect(tls_addr, pki.client_config_with(Some(&cert), &tls12)).await;
    assert!(old.is_err(), "a TLS 1.2 client was served");
    let mut client = TlsRaw::connect(tls_addr, pki.client_config(Some(&cert)))
        .await
        .expect("mTLS to geoproxy");
    client.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    assert!(
        proxy
            .metric("geoproxy_client_tls_handshake_failures_total")
            .await
            >= 1.0
    );
}

/// The same bytes to `a` and `b`, each on a fresh connection; the replies must match.
async fn same_replies(a: SocketAddr, b: SocketAddr, script: &[u8]) -> Vec<u8> {
    let mut replies = Vec::new();
    for addr in [a, b] {
        let mut raw = Raw::connect(addr).await;
        raw.send(script).await;
        replies.push(raw.read_to_close().await);
    }
    assert_eq!(
        String::from_utf8_lossy(&replies[0]),
        String::from_utf8_lossy(&replies[1]),
        "redis-server (left) and geoproxy (right) differ"
    );
    replies.pop().unwrap()
}

/// Redis with `requirepass`, against geoproxy with `auth = "proxy"` (the same password for
/// user default) in front of a member with a password of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_auth_answers_as_redis_and_opens_no_member_connection_before_it() {
    let oracle = RedisServer::start_with(&["--requirepass", "client-secret"]);
    let member = RedisServer::start_with(&["--requirepass", "member-secret"]);
    let proxy = Proxy::start(
        &[("local", member.addr())],
        Options {
            password: Some("member-secret"),
            extra_proxy:
                "auth = \"proxy\"\nusers = [{ name = \"default\", password = \"client-secret\" }]",
            ..Options::default()
        },
    )
    .await;
    let oracle_addr: SocketAddr = oracle.addr().parse().unwrap();
    let connections = || member.connections_received();
    // Refused attempts open nothing on the member (the query itself opens one).
    let before = connections();
    let refused = b"GET k\r\nHELLO 3\r\nMULTI\r\nAUTH wrong\r\nAUTH a b c\r\nAUTH\r\n\
                    AUTH default wrong\r\nHELLO 3 AUTH default wrong\r\n\
                    HELLO 3 AUTH default\r\nQUIT\r\n";
    let replies = same_replies(oracle_addr, proxy.addr, refused).await;
    assert!(replies.starts_with(b"-NOAUTH Authentication required.\r\n"));
    assert_eq!(connections(), before + 1, "a member connection before AUTH");

    // The right password; then a wrong one leaves the client authenticated, as in Redis.
    let script = b"AUTH client-secret\r\nSET k v\r\nGET k\r\nAUTH wrong\r\nGET k\r\n\
                   AUTH default client-secret\r\nRESET\r\nGET k\r\nAUTH client-secret\r\n\
                   GET k\r\nQUIT\r\n";
    let replies = same_replies(oracle_addr, proxy.addr, script).await;
    assert!(replies.starts_with(b"+OK\r\n+OK\r\n$1\r\nv\r\n-WRONGPASS"));
    // HELLO with AUTH authenticates and reaches the member without the credentials.
    let mut raw = Raw::connect(proxy.addr).await;
    let hello = raw.hello("3 AUTH default client-secret SETNAME app").await;
    assert!(
        hello.starts_with(b"%7\r\n"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    raw.roundtrip(b"CLIENT GETNAME\r\n", b"$3\r\napp\r\n").await;
    // Four wrong passwords, each counted once.
    assert_eq!(proxy.metric("geoproxy_auth_failures_total").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_and_renamed_commands_answer_as_the_policy_says() {
    let oracle = RedisServer::start_with(&["--rename-command", "CONFIG", "CFG"]);
    let member = RedisServer::start();
    let proxy = Proxy::start(
        &[("local", member.addr())],
        Options {
            extra_file: "[commands]\ndeny = [\"FLUSHALL\", \"keys\"]\n\
                         rename = { CONFIG = \"CFG\", DEBUG = \"\" }\n",
            ..Options::default()
        },
    )
    .await;
    // Renamed: exactly Redis's own rename-command (the old name is unknown, the new works).
    let oracle_addr: SocketAddr = oracle.addr().parse().unwrap();
    let script = b"CONFIG GET maxmemory\r\nconfig\r\ncfg get maxmemory\r\nCFG GET maxclients\r\n\
                   MULTI\r\nSET a 1\r\nCFG GET maxmemory\r\nEXEC\r\nQUIT\r\n";
    let replies = same_replies(oracle_addr, proxy.addr, script).await;
    assert!(replies.starts_with(
        b"-ERR unknown command 'CONFIG', with args beginning with: 'GET' 'maxmemory' \r\n"
    ));
    // Inside MULTI the old name is refused by the member too, under a name no member can
    // take for the real command, so that EXEC aborts; the client gets Redis's own error for
    // it in place of the member's (two in one transaction: two in one read of replies).
    let script = b"MULTI\r\nSET b 1\r\nCONFIG GET x\r\nconfig\r\nEXEC\r\nGET b\r\n\
                   MULTI\r\nconfig\r\nDISCARD\r\nQUIT\r\n";
    let replies = same_replies(oracle_addr, proxy.addr, script).await;
    assert!(
        replies.starts_with(
            b"+OK\r\n+QUEUED\r\n-ERR unknown command 'CONFIG', with args beginning with: \
              'GET' 'x' \r\n-ERR unknown command 'config', with args beginning with: \r\n\
              -EXECABORT Transaction discarded because of previous errors.\r\n$-1\r\n"
        ),
        "{}",
        String::from_utf8_lossy(&replies)
    );
    assert_eq!(member.query(&["EXISTS", "b"]), redis::Value::Int(0));

    // Denied: geoproxy's error, counted; nothing reaches the member.
    member.query(&["SET", "keep", "me"]);
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(
        b"FLUSHALL\r\n",
        b"-ERR geoproxy: command 'flushall' is denied by this proxy's [commands] deny list\r\n",
    )
    .await;
    raw.roundtrip(
        b"DEBUG SLEEP 0\r\n",
        b"-ERR unknown command 'DEBUG', with args beginning with: 'SLEEP' '0' \r\n",
    )
    .await;
    // Inside MULTI the transaction aborts at EXEC, as for a command Redis refuses.
    raw.roundtrip(b"MULTI\r\n", b"+OK\r\n").await;
    raw.roundtrip(b"SET t 1\r\n", b"+QUEUED\r\n").await;
    raw.roundtrip(
        b"KEYS *\r\n",
        b"-ERR geoproxy: command 'keys' is denied by this proxy's [commands] deny list\r\n",
    )
    .await;
    raw.roundtrip(
        b"EXEC\r\n",
        b"-EXECABORT Transaction discarded because of previous errors.\r\n",
    )
    .await;
    raw.roundtrip(b"EXISTS t\r\n", b":0\r\n").await;
    assert_eq!(
        member.query(&["GET", "keep"]),
        redis::Value::BulkString(b"me".to_vec())
    );
    // Behind a command still owed a reply, a denied one is counted once, not per look.
    raw.roundtrip(
        b"SET p 1\r\nFLUSHALL\r\n",
        b"+OK\r\n-ERR geoproxy: command 'flushall' is denied by this proxy's [commands] deny list\r\n",
    )
    .await;
    let denied = |c: &str| format!("geoproxy_denied_commands_total{{command=\"{c}\"}}");
    assert_eq!(proxy.metric(&denied("flushall")).await, 2.0);
    assert_eq!(proxy.metric(&denied("keys")).await, 1.0);
    assert_eq!(proxy.metric(&denied("debug")).await, 1.0);
}

/// Everything geoproxy printed, answered and exported in a session of right and wrong
/// passwords (logs at debug, `/v1/status`, `/metrics`, the replies) holds no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_appear_nowhere_geoproxy_writes() {
    let member = RedisServer::start_with(&["--requirepass", "member-pw-6d1f"]);
    let config = config_toml(
        &[("local", member.addr())],
        &Options {
            password: Some("member-pw-6d1f"),
            extra_proxy:
                "auth = \"proxy\"\nusers = [{ name = \"app\", password = \"client-pw-93ac\" }]",
            ..Options::default()
        },
    )
    // proxy.listen, then admin.listen.
    .replacen("127.0.0.1:0", "{listen}", 1)
    .replacen("127.0.0.1:0", "{admin}", 1);
    let proxy = ProxyProcess::start(&config);
    let (addr, admin) = (proxy.addr, proxy.admin);
    eventually(Duration::from_secs(10), "geoproxy listens", || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let mut replies = Vec::new();
    let mut raw = Raw::connect(addr).await;
    raw.send(
        b"AUTH app wrong-pw\r\nAUTH app client-pw-93ac\r\nSET k v\r\nAUTH app member-pw-6d1f\r\n\
          HELLO 3 AUTH app nope\r\nQUIT\r\n",
    )
    .await;
    replies.extend(raw.read_to_close().await);
    assert!(String::from_utf8_lossy(&replies).contains("+OK\r\n+OK\r\n-WRONGPASS"));
    let http = reqwest::Client::new();
    let mut printed = String::from_utf8_lossy(&replies).into_owned();
    for path in ["/v1/status", "/metrics"] {
        let body = http
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .expect("admin answers")
            .text()
            .await
            .unwrap();
        printed.push_str(&body);
    }
    proxy.signal("TERM");
    eventually(
        Duration::from_secs(5),
        "geoproxy logged its stop",
        || async { proxy.log().contains("geoproxy stopped") },
    )
    .await;
    printed.push_str(&proxy.log());
    assert!(printed.contains("session"), "the debug log was captured");
    for secret in ["client-pw-93ac", "member-pw-6d1f"] {
        assert!(!printed.contains(secret), "{secret} was printed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_listener_certificate_without_dropping_sessions() {
    let pki = Pki::new("reload");
    let member = RedisServer::start();
    let tls_port = free_port();
    let first = pki.issue("first");
    let cert_file = pki.dir.path().join("live.pem");
    let key_file = pki.dir.path().join("live.key");
    std::fs::copy(&first.cert, &cert_file).unwrap();
    std::fs::copy(&first.key, &key_file).unwrap();
    let config = format!(
        "[proxy]\nlisten = \"{{listen}}\"\nmode = \"colocated\"\nthreads = 2\n\
         tls = {{ listen = \"127.0.0.1:{tls_port}\", cert_file = \"{}\", key_file = \"{}\" }}\n\
         [admin]\nlisten = \"{{admin}}\"\n\
         [[members]]\nid = \"local\"\naddress = \"{}\"\n",
        cert_file.display(),
        key_file.display(),
        member.addr()
    );
    let proxy = ProxyProcess::start(&config);
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let client_config = pki.client_config(None);
    let served_cert = |c: &TlsRaw| {
        c.0.get_ref().1.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec()
    };
    let der = |path: &str| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_file(path)
            .unwrap()
            .as_ref()
            .to_vec()
    };
    eventually(Duration::from_secs(10), "TLS listener serves", || async {
        TlsRaw::connect(tls_addr, client_config.clone())
            .await
            .is_ok()
    })
    .await;
    let mut old = TlsRaw::connect(tls_addr, client_config.clone())
        .await
        .expect("TLS to geoproxy");
    old.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    assert_eq!(served_cert(&old), der(&first.cert));

    let second = pki.issue("second");
    std::fs::copy(&second.cert, &cert_file).unwrap();
    std::fs::copy(&second.key, &key_file).unwrap();
    proxy.signal("HUP");
    eventually(
        Duration::from_secs(5),
        "the new certificate is served",
        || async {
            let c = TlsRaw::connect(tls_addr, client_config.clone()).await;
            c.is_ok_and(|c| served_cert(&c) == der(&second.cert))
        },
    )
    .await;
    // The session opened before the reload goes on.
    old.roundtrip(b"SET k v\r\n", b"+OK\r\n").await;
    // A broken file makes the configuration invalid: refused as a whole, and the running
    // certificate stays.
    std::fs::write(&key_file, "not a key").unwrap();
    proxy.signal("HUP");
    eventually(Duration::from_secs(5), "the refusal is logged", || async {
        proxy.log().contains("configuration not reloaded")
    })
    .await;
    let c = TlsRaw::connect(tls_addr, client_config.clone())
        .await
        .unwrap();
    assert_eq!(served_cert(&c), der(&second.cert));
}

/// A renamed command that must wait (here for the member connection opened after AUTH) is
/// not screened again under its own name, which the policy hides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_command_pipelined_behind_auth_runs() {
    let member = RedisServer::start();
    let proxy = Proxy::start(
        &[("local", member.addr())],
        Options {
            extra_proxy: "auth = \"proxy\"\nusers = [{ name = \"default\", password = \"pw\" }]",
            extra_file: "[commands]\nrename = { CONFIG = \"CFG\" }\n",
            ..Options::default()
        },
    )
    .await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.roundtrip(
        b"AUTH pw\r\nCFG GET maxclients\r\nCONFIG GET maxclients\r\n",
        b"+OK\r\n*2\r\n$10\r\nmaxclients\r\n$5\r\n10000\r\n\
          -ERR unknown command 'CONFIG', with args beginning with: 'GET' 'maxclients' \r\n",
    )
    .await;
}
