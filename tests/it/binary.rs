//! The `geoproxy` binary: configuration errors, `--check`, environment overrides, and a
//! graceful shutdown on SIGTERM.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::free_port;
use crate::support::proxy::{config_toml, sample_value, two, Options, Raw};
use crate::support::redis_server::RedisServer;
use crate::support::{eventually, wait_blocked};

const BIN: &str = env!("CARGO_BIN_EXE_geoproxy");

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write config");
    f
}

/// Runs `geoproxy --config FILE --check`; returns (exit code, stderr).
fn check(text: &str, env: &[(&str, &str)]) -> (i32, String) {
    let file = write_config(text);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(file.path())
        .arg("--check")
        .envs(env.iter().copied())
        .output()
        .expect("run geoproxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn valid() -> String {
    config_toml(
        &[
            ("us-east", "127.0.0.1:7001".into()),
            ("eu-west", "127.0.0.1:7002".into()),
        ],
        &Options::default(),
    )
}

#[test]
fn a_valid_file_passes_check() {
    assert_eq!(check(&valid(), &[]), (0, String::new()));
}

#[test]
fn each_config_error_names_its_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("unknown key", "[proxy]\n", "[proxy]\nlisten_port = 1\n"),
        ("duplicate id", "id = \"eu-west\"", "id = \"us-east\""),
        (
            "bad address",
            "address = \"127.0.0.1:7002\"",
            "address = \"127.0.0.1\"",
        ),
        ("zero rise", "rise = 2", "rise = 0"),
        ("zero fall", "fall = 2", "fall = 0"),
        (
            "bad duration",
            "interval = \"100ms\"",
            "interval = \"often\"",
        ),
        (
            "zero duration",
            "failback_after = \"1s\"",
            "failback_after = \"0s\"",
        ),
        (
            "bad listen",
            "listen = \"127.0.0.1:0\"\nmode",
            "listen = \"localhost\"\nmode",
        ),
        ("bad mode", "mode = \"colocated\"", "mode = \"sideways\""),
        (
            "bad failback",
            "failback = \"auto\"",
            "failback = \"sometimes\"",
        ),
        (
            "huge duration",
            "reply_timeout = \"1s\"",
            "reply_timeout = \"500years\"",
        ),
        (
            "bad size",
            "threads = ",
            "client_query_buffer_limit = \"lots\"\nthreads = ",
        ),
        (
            "size too small",
            "threads = ",
            "client_query_buffer_limit = 1000\nthreads = ",
        ),
    ];
    let want_key = [
        "listen_port",
        "members[1].id",
        "members[1].address",
        "health.rise",
        "health.fall",
        "interval",
        "failover.failback_after",
        "proxy.listen",
        "mode",
        "failback",
        "proxy.reply_timeout",
        "proxy.client_query_buffer_limit",
        "proxy.client_query_buffer_limit",
    ];
    for ((what, from, to), key) in cases.iter().zip(want_key) {
        let text = valid().replacen(from, to, 1);
        assert_ne!(text, valid(), "{what}: the edit applies");
        let (code, err) = check(&text, &[]);
        assert_eq!(code, 2, "{what}: exit code, stderr: {err}");
        assert!(err.contains(key), "{what}: message names {key}: {err}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/geoproxy.toml", "--check"])
        .output()
        .expect("run geoproxy");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/geoproxy.toml"));
}

#[test]
fn environment_overrides_keys() {
    let (code, err) = check(&valid(), &[("GEOPROXY__HEALTH__RISE", "0")]);
    assert_eq!(code, 2);
    assert!(err.contains("health.rise"), "{err}");
    let (code, _) = check(&valid(), &[("GEOPROXY__FAILOVER__FAILBACK_AFTER", "45s")]);
    assert_eq!(code, 0);
}

#[test]
fn a_port_in_use_fails_before_serving() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = valid().replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1);
    let file = write_config(&text);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(file.path())
        .output()
        .expect("run geoproxy");
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("proxy.listen") && err.contains(&port.to_string()),
        "{err}"
    );
}

/// The geoproxy binary in front of one member, serving; killed on drop.
pub struct Binary {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    _config: tempfile::NamedTempFile,
}

impl Binary {
    pub async fn start(member: &RedisServer) -> Binary {
        Binary::start_with(member, "").await
    }

    /// With more `[proxy]` keys (TOML lines).
    pub async fn start_with(member: &RedisServer, extra_proxy: &'static str) -> Binary {
        // threads = 0: one worker per core (several workers, as the central modes run).
        let options = Options {
            threads: 0,
            extra_proxy,
            ..Options::default()
        };
        Binary::start_options(member, options).await
    }

    pub async fn start_options(member: &RedisServer, options: Options) -> Binary {
        Binary::start_members(&[("local", member.addr())], options).await
    }

    /// In front of `members` (as `config_toml` takes them).
    pub async fn start_members(members: &[(&str, String)], options: Options) -> Binary {
        let (port, admin) = (free_port(), free_port());
        let text = config_toml(members, &options)
            .replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1)
            .replacen("127.0.0.1:0", &format!("127.0.0.1:{admin}"), 1);
        let config = write_config(&text);
        let child = Command::new(BIN)
            .arg("--config")
            .arg(config.path())
            .stdin(Stdio::null())
            // GEOPROXY_LOG=debug shows the binary's logs in a failing test's output.
            .stdout(match std::env::var_os("GEOPROXY_LOG") {
                Some(_) => Stdio::inherit(),
                None => Stdio::null(),
            })
            .stderr(Stdio::null())
            .spawn()
            .expect("start geoproxy");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually(
            Duration::from_secs(10),
            "geoproxy answers PING",
            || async move {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(s) => {
                        let mut raw = Raw(s);
                        raw.send(b"PING\r\n").await;
                        raw.read_exact_len(7).await == b"+PONG\r\n"
                    }
                    Err(_) => false,
                }
            },
        )
        .await;
        Binary {
            child,
            addr,
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
            _config: config,
        }
    }

    /// Sets the running process's soft limit of open files (util-linux's `prlimit`).
    pub fn limit_open_files(&self, soft: u32) {
        let status = Command::new("prlimit")
            .arg(format!("--pid={}", self.child.id()))
            .arg(format!("--nofile={soft}:"))
            .status()
            .expect("run prlimit");
        assert!(status.success(), "prlimit failed");
    }

    /// Resident memory of the geoproxy process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("geoproxy is running");
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_of_a_100_mb_reply_does_not_grow_the_proxy() {
    let member = RedisServer::start();
    let chunk = "z".repeat(10 * 1024 * 1024);
    for i in 0..10 {
        // SETRANGE, not APPEND: a query may be tried again (see `RedisServer::query`).
        let offset = (i * chunk.len()).to_string();
        member.query(&["SETRANGE", "huge", &offset, &chunk]);
    }
    let proxy = Binary::start(&member).await;
    let before = proxy.rss_kib();
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"GET huge\r\n").await;
    // The client reads nothing for a while: the member has sent what the sockets hold,
    // and the proxy must not have taken the rest into memory. (A bounded wait for
    // something that must not happen.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stalled = proxy.rss_kib();
    assert!(
        stalled < before + 32 * 1024,
        "RSS grew from {before} KiB to {stalled} KiB while the client did not read"
    );
    // Then it reads the whole value.
    let header = b"$104857600\r\n";
    assert_eq!(raw.read_exact_len(header.len()).await, header);
    let body = raw.read_exact_len(100 * 1024 * 1024 + 2).await;
    assert!(body[..body.len() - 2].iter().all(|&b| b == b'z'));
    assert!(proxy.rss_kib() < before + 32 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_replies_and_exits_zero() {
    let member = RedisServer::start();
    let mut proxy = Binary::start(&member).await;

    // Blocking commands are in flight when SIGTERM arrives, on every worker (six
    // connections spread by the kernel); their replies still come.
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut raw = Raw::connect(proxy.addr).await;
        raw.send(b"BLPOP q 1\r\n").await;
        clients.push(raw);
    }
    wait_blocked(&member, 6).await;
    let pid = proxy.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    for raw in &mut clients {
        let reply = raw.read_to_close().await;
        assert_eq!(
            reply, b"*-1\r\n",
            "BLPOP timed out normally, then the session closed"
        );
    }
    let status = proxy.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "no longer listening"
    );
}

/// us-east (active) and eu-west behind the binary, the binary reached by one keep-alive
/// admin connection: it still answers when the proxy can open nothing more.
async fn out_of_descriptors_setup(
    options: Options,
) -> (RedisServer, RedisServer, Binary, KeptAlive) {
    let east = RedisServer::start();
    let west = RedisServer::start();
    let proxy = Binary::start_members(&two(&east, &west), options).await;
    let admin = KeptAlive::connect(proxy.admin).await;
    assert_eq!(admin.metric(EAST_ACTIVE).await, Some(1.0));
    (east, west, proxy, admin)
}

const EAST_ACTIVE: &str = "geoproxy_active_member{member=\"us-east\"}";

/// A proxy out of file descriptors (more clients than its limit) cannot open a connection
/// to check a member: that failure is its own, not the member's, and must not fail over
/// from a healthy member. Active checks are out of reach (10 s interval): the only judge is
/// the probe that confirms a session's lost connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_out_of_file_descriptors_does_not_fail_over() {
    let options = Options {
        interval: "10s",
        multiplex: Some(false),
        ..Options::default()
    };
    let (east, _west, proxy, admin) = out_of_descriptors_setup(options).await;
    let mut client = Raw::connect(proxy.addr).await;
    client.roundtrip(b"SET k east\r\n", b"+OK\r\n").await;

    // Out of descriptors: with a limit of 3, a new one would need a number below 3, and
    // stdin, stdout and stderr hold those (a descriptor that a closed connection frees
    // has a higher number and cannot be taken again).
    proxy.limit_open_files(3);
    // The member closes every client connection (the session's among them): the session
    // reports it, and the confirming probe cannot even open a socket.
    east.query(&["CLIENT", "KILL", "TYPE", "normal"]);
    // The probe's outcome, whatever it is (it exists with or without the judgment this
    // test is about).
    let outcome = || async {
        let text = admin.get("/metrics").await;
        text.lines()
            .filter(|l| l.starts_with("geoproxy_passive_signals_total{"))
            .filter(|l| l.contains("kind=\"connection_lost\"") && l.contains("us-east"))
            .find_map(|l| Some(l.split("outcome=\"").nth(1)?.split('"').next()?.to_string()))
    };
    eventually(Duration::from_secs(5), "the probe has judged", || async {
        outcome().await.is_some()
    })
    .await;
    assert_eq!(admin.metric(EAST_ACTIVE).await, Some(1.0), "failed over");
    assert_eq!(outcome().await.as_deref(), Some("inconclusive"));
    let east_up = "geoproxy_member_up{member=\"us-east\"}";
    assert_eq!(admin.metric(east_up).await, Some(1.0));
    let inconclusive = "geoproxy_checks_inconclusive_total{check=\"confirm\",member=\"us-east\"}";
    assert_eq!(admin.metric(inconclusive).await, Some(1.0));

    // Room again: the session reconnects to us-east, where its key is.
    proxy.limit_open_files(1024);
    client.roundtrip(b"GET k\r\n", b"$4\r\neast\r\n").await;
}

/// The same for the active checks: a check whose connection the member closed cannot open
/// another while the proxy is out of descriptors, and that says nothing of the member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_cannot_open_a_socket_does_not_fail_the_member() {
    let options = Options {
        interval: "100ms",
        ..Options::default()
    };
    let (east, _west, proxy, admin) = out_of_descriptors_setup(options).await;
    proxy.limit_open_files(3); // see a_proxy_out_of_file_descriptors_does_not_fail_over
                               // The checks' connections go; `fall = 2` failed runs would fail us-east over: wait for
                               // more runs than that, or for the failover.
    east.query(&["CLIENT", "KILL", "TYPE", "normal"]);
    let inconclusive = "geoproxy_checks_inconclusive_total{check=\"ping\",member=\"us-east\"}";
    let admin = &admin;
    eventually(Duration::from_secs(5), "three check runs", || async move {
        admin.metric(inconclusive).await.is_some_and(|n| n >= 3.0)
            || admin.metric(EAST_ACTIVE).await != Some(1.0)
    })
    .await;
    assert_eq!(admin.metric(EAST_ACTIVE).await, Some(1.0), "failed over");
    proxy.limit_open_files(1024);
}
/// One HTTP/1.1 connection to the admin port, kept open and used for every request (a
/// client with a pool may open another, which a proxy out of descriptors never accepts).
struct KeptAlive(tokio::sync::Mutex<tokio::io::BufReader<tokio::net::TcpStream>>);

impl KeptAlive {
    async fn connect(addr: std::net::SocketAddr) -> KeptAlive {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        KeptAlive(tokio::sync::Mutex::new(tokio::io::BufReader::new(stream)))
    }

    /// The body of `GET path` (its length from `content-length`).
    async fn get(&self, path: &str) -> String {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let mut conn = self.0.lock().await;
        let request = format!("GET {path} HTTP/1.1\r\nhost: geoproxy\r\n\r\n");
        conn.get_mut().write_all(request.as_bytes()).await.unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await.unwrap();
        String::from_utf8(body).unwrap()
    }

    /// The value of one sample of `/metrics`.
    async fn metric(&self, sample: &str) -> Option<f64> {
        sample_value(&self.get("/metrics").await, sample)
    }
}
