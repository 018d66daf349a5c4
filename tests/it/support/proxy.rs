//! geoproxy in-process for tests: bound on port 0, its own metrics registry, stopped on
//! drop. Health checks run fast (100 ms) so failovers happen within a test's patience.

use std::net::SocketAddr;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use geoproxy::{Config, Server};

/// The knobs tests turn; rendered as a geoproxy TOML file.
#[derive(Clone, Debug)]
pub struct Options {
    pub failback: &'static str,
    pub failback_after: &'static str,
    pub reply_timeout: &'static str,
    pub unavailable_timeout: &'static str,
    pub interval: &'static str,
    pub max_clients: usize,
    pub region: Option<&'static str>,
    /// The password health checks use on every member.
    pub password: Option<&'static str>,
    pub retry_reads: bool,
    /// `proxy.threads`: 1 serves on the test's runtime; more start worker threads.
    pub threads: usize,
    /// More `[proxy]` keys, as TOML lines.
    pub extra_proxy: &'static str,
    /// `health.timeout`.
    pub check_timeout: &'static str,
    /// `proxy.connect_timeout`.
    pub connect_timeout: &'static str,
    /// More `[health]`, `[failover]` and `[admin]` keys, as TOML lines.
    pub extra_health: &'static str,
    pub extra_failover: &'static str,
    pub extra_admin: &'static str,
    /// Each member's Redis Software REST API (`api`, with `bdb = 1`), by position.
    pub apis: Vec<String>,
    /// More keys for every `[[members]]` entry, as TOML lines.
    pub extra_member: &'static str,
    /// More tables at the end of the file (`[commands]`, say).
    pub extra_file: &'static str,
    /// `proxy.multiplex`; `None`: as the suite runs (see [`multiplexed`]).
    pub multiplex: Option<bool>,
}

/// The suite runs twice: 1:1 and with `proxy.multiplex = true` (`GEOPROXY_TEST_MULTIPLEX=1`,
/// set by `scripts/test.sh` for its second run). A test of behaviour that exists only in one
/// model says so in its `Options`.
pub fn multiplexed() -> bool {
    std::env::var("GEOPROXY_TEST_MULTIPLEX").is_ok_and(|v| v == "1")
}

/// The `[proxy]` line that puts a geoproxy config in the suite's mode.
pub fn multiplex_line(choice: Option<bool>) -> String {
    format!("multiplex = {}", choice.unwrap_or_else(multiplexed))
}

impl Default for Options {
    fn default() -> Self {
        Options {
            failback: "auto",
            failback_after: "1s",
            reply_timeout: "1s",
            unavailable_timeout: "500ms",
            interval: "100ms",
            max_clients: 1000,
            region: None,
            password: None,
            retry_reads: false,
            threads: 1,
            extra_proxy: "",
            check_timeout: "200ms",
            connect_timeout: "500ms",
            extra_health: "",
            extra_failover: "",
            extra_admin: "",
            apis: Vec::new(),
            extra_member: "",
            extra_file: "",
            multiplex: None,
        }
    }
}

/// The value of the sample `sample` (`name{labels}`, labels in the order geoproxy writes
/// them) in a Prometheus text page.
pub fn sample_value(page: &str, sample: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// `members` are `(id, address)` in preference order; each id is also its region.
pub fn config_toml(members: &[(&str, String)], o: &Options) -> String {
    let mut t = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
mode = "colocated"
max_clients = {max}
reply_timeout = "{reply}"
unavailable_timeout = "{unavail}"
connect_timeout = "{connect_timeout}"
shutdown_timeout = "2s"
threads = {threads}
{multiplex}
{extra}
{region}
[admin]
listen = "127.0.0.1:0"
{extra_admin}

[health]
interval = "{interval}"
timeout = "{check_timeout}"
rise = 2
fall = 2
{extra_health}

[failover]
failback = "{failback}"
failback_after = "{after}"
retry_reads = {retry_reads}
{extra_failover}
"#,
        max = o.max_clients,
        reply = o.reply_timeout,
        unavail = o.unavailable_timeout,
        region = o
            .region
            .map(|r| format!("region = \"{r}\""))
            .unwrap_or_default(),
        interval = o.interval,
        failback = o.failback,
        after = o.failback_after,
        retry_reads = o.retry_reads,
        threads = o.threads,
        multiplex = multiplex_line(o.multiplex),
        extra = o.extra_proxy,
        check_timeout = o.check_timeout,
        connect_timeout = o.connect_timeout,
        extra_health = o.extra_health,
        extra_failover = o.extra_failover,
        extra_admin = o.extra_admin,
    );
    for (i, (id, addr)) in members.iter().enumerate() {
        t.push_str(&format!(
            "\n[[members]]\nid = \"{id}\"\naddress = \"{addr}\"\nregion = \"{id}\"\n"
        ));
        if let Some(api) = o.apis.get(i) {
            t.push_str(&format!("api = \"{api}\"\nbdb = 1\n"));
        }
        if let Some(p) = o.password {
            t.push_str(&format!("password = \"{p}\"\n"));
        }
        t.push_str(o.extra_member);
        t.push('\n');
    }
    t.push_str(o.extra_file);
    t
}

pub struct Proxy {
    pub addr: SocketAddr,
    /// The TLS listener, with `[proxy.tls]`.
    pub tls_addr: Option<SocketAddr>,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    http: reqwest::Client,
}

impl Proxy {
    /// Starts a proxy in front of `members` and waits until it has a route.
    pub async fn start(members: &[(&str, String)], options: Options) -> Proxy {
        let proxy = Proxy::start_unrouted(members, options).await;
        let p = &proxy;
        super::eventually(
            Duration::from_secs(5),
            "the proxy has an active member",
            || async move { p.active_member().await.is_some() },
        )
        .await;
        proxy
    }

    /// A proxy with default options in front of one member, "local".
    pub async fn one_member(member: &super::redis_server::RedisServer) -> Proxy {
        Proxy::start(&[("local", member.addr())], Options::default()).await
    }

    /// Starts a proxy without waiting for a route (all members may be down).
    pub async fn start_unrouted(members: &[(&str, String)], options: Options) -> Proxy {
        // GEOPROXY_LOG=debug shows the proxy's logs in a failing test's output.
        let filter = tracing_subscriber::EnvFilter::try_from_env("GEOPROXY_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let config = Config::from_toml(&config_toml(members, &options)).expect("valid test config");
        let server = Server::bind(config).await.expect("bind port 0");
        let shutdown = CancellationToken::new();
        let (addr, admin) = (server.redis_addr(), server.admin_addr());
        let tls_addr = server.tls_addr();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Proxy {
            addr,
            tls_addr,
            admin,
            shutdown,
            task: Some(task),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// A redis-rs connection through the proxy, without the crate's response timeout.
    pub async fn connect(&self) -> MultiplexedConnection {
        connect(&self.url()).await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .expect("admin API answers");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// POSTs a JSON body, with a bearer token when given.
    pub async fn post(&self, path: &str, body: &str, token: Option<&str>) -> (u16, String) {
        let mut request = self
            .http
            .post(format!("http://{}{path}", self.admin))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let r = request.send().await.expect("admin API answers");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// Route switches since start (the first route counts as one).
    pub async fn epoch(&self) -> u64 {
        self.status().await["epoch"].as_u64().expect("epoch")
    }

    pub async fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/v1/status").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    pub async fn active_member(&self) -> Option<String> {
        self.status().await["active_member"]
            .as_str()
            .map(str::to_string)
    }

    /// The value of one metric sample line (`name{labels}`), 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        sample_value(&text, sample).unwrap_or(0.0)
    }

    /// Graceful shutdown; waits for the server task.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The usual two members, in preference order: us-east, then eu-west.
pub fn two(
    east: &super::redis_server::RedisServer,
    west: &super::redis_server::RedisServer,
) -> Vec<(&'static str, String)> {
    vec![("us-east", east.addr()), ("eu-west", west.addr())]
}

/// Waits (10 s at most) until `member` is the active member.
pub async fn wait_active(proxy: &Proxy, member: &str) {
    super::eventually(
        Duration::from_secs(10),
        &format!("{member} is active"),
        || async { proxy.active_member().await.as_deref() == Some(member) },
    )
    .await;
}

pub async fn connect(url: &str) -> MultiplexedConnection {
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(url)
        .expect("valid url")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// A raw TCP client for exact RESP bytes at the edge.
pub struct Raw(pub TcpStream);

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw(TcpStream::connect(addr).await.expect("connect to proxy"))
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).await.expect("write to proxy");
    }

    /// Reads until exactly `want` bytes arrived (or 5 s passed) and returns them.
    pub async fn read_exact_len(&mut self, want: usize) -> Vec<u8> {
        let mut buf = vec![0u8; want];
        tokio::time::timeout(Duration::from_secs(5), self.0.read_exact(&mut buf))
            .await
            .expect("reply within 5 s")
            .expect("read from proxy");
        buf
    }

    /// Sends `bytes` and expects exactly `reply` back.
    pub async fn roundtrip(&mut self, bytes: &[u8], reply: &[u8]) {
        self.send(bytes).await;
        let got = self.read_exact_len(reply.len()).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(reply),
            "reply to {:?}",
            String::from_utf8_lossy(bytes)
        );
    }

    /// Reads until the bytes read end with `suffix` (each read within 5 s); returns them.
    /// For replies whose exact length a test does not know (a HELLO map, a client id).
    pub async fn read_until(&mut self, suffix: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        while !got.ends_with(suffix) {
            got.extend(self.read_exact_len(1).await);
        }
        got
    }

    /// Sends `HELLO <args>` and reads the whole reply (a map ending with `modules`, empty).
    pub async fn hello(&mut self, args: &str) -> Vec<u8> {
        self.send(format!("HELLO {args}\r\n").as_bytes()).await;
        self.read_until(b"*0\r\n").await
    }

    /// Reads one `-OUTCOMEUNKNOWN` reply for a command in flight on a hung or unreachable
    /// `member`: the route left it because it is down (a silence only suspects a member).
    pub async fn read_outcome_unknown(&mut self, member: &str) {
        let line = String::from_utf8(self.read_until(b"\r\n").await).expect("UTF-8");
        assert_eq!(
            line,
            format!(
                "-OUTCOMEUNKNOWN geoproxy: member {member} failed before replying (member down); \
                 the command may or may not have run and was not retried\r\n"
            )
        );
    }

    /// Reads whatever arrives until the peer closes (FIN, or RST when it closed with input
    /// unread); panics if it is still open after 5 s: a test of a close must not pass on a
    /// connection that stayed open.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), self.0.read_to_end(&mut out))
            .await
            .expect("the connection is closed within 5 s");
        if let Err(e) = read {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "read: {e}");
        }
        out
    }
}
