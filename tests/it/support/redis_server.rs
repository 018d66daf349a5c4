//! Owns a real `redis-server` child process for one test: start on a free
//! port in a private temp dir, kill / hang (SIGSTOP) / resume / restart it,
//! query it directly, and never leave the process behind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

const READY_TIMEOUT: Duration = Duration::from_secs(5);
const START_TRIES: usize = 5;

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts `redis-server` with the default test args plus `extra_args`
    /// (e.g. `&["--requirepass", "pw"]`), retrying on another port if it does
    /// not come up.
    pub fn start_with(extra_args: &[&str]) -> Self {
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir: tempfile::tempdir().expect("create temp dir for redis-server"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        for _ in 0..START_TRIES {
            server.port = free_port();
            if server.try_start(Instant::now() + READY_TIMEOUT) {
                return server;
            }
        }
        panic!(
            "redis-server did not start after {START_TRIES} tries; redis.log tail:\n{}",
            server.log_tail()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT/`, without any password.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL and reap: connections to the port are refused afterwards.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the member still accepts TCP (kernel backlog) but never answers.
    pub fn stop(&self) {
        self.signal("STOP");
    }

    /// SIGCONT: resume after [`stop`](Self::stop).
    pub fn cont(&self) {
        self.signal("CONT");
    }

    /// Starts again on the same port with the same args (data is gone) and
    /// waits for it to answer; retries for up to 5 s in case the port is busy.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.try_start(deadline) {
            if Instant::now() >= deadline {
                panic!(
                    "redis-server did not restart on port {}; redis.log tail:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One field of `INFO section` (`info_field("clients", "blocked_clients")`).
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        let text = match self.query(&["INFO", section]) {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            other => panic!("INFO answered {other:?}"),
        };
        let prefix = format!("{field}:");
        text.lines()
            .find_map(|l| Some(l.strip_prefix(&prefix)?.trim().to_string()))
    }

    /// Connections the server has accepted since it started (`total_connections_received`),
    /// the one this question opens included.
    pub fn connections_received(&self) -> u64 {
        let n = self.info_field("stats", "total_connections_received");
        n.and_then(|n| n.parse().ok())
            .expect("INFO stats has total_connections_received")
    }

    /// Runs one command on a fresh connection straight to this server
    /// (AUTHs first if started with `--requirepass`). Panics on any error.
    pub fn query(&self, args: &[&str]) -> redis::Value {
        let run = || -> redis::RedisResult<redis::Value> {
            let client = redis::Client::open(self.url())?;
            let mut con = client.get_connection_with_timeout(Duration::from_secs(2))?;
            con.set_read_timeout(Some(Duration::from_secs(5)))?;
            if let Some(pw) = self.password() {
                redis::cmd("AUTH").arg(pw).query::<()>(&mut con)?;
            }
            redis::cmd(args[0]).arg(&args[1..]).query(&mut con)
        };
        // A signal (the SIGCHLD of a process another test started, once a test's in-process
        // proxy has run a custom check and so installed tokio's handler) interrupts a socket
        // call that has a timeout: such calls are not restarted (signal(7)). Tried again
        // then, unless repeating the command would change what the test sees.
        // (redis-rs keeps the io::Error behind a box of its own: known by its text.)
        let interrupted =
            |e: &redis::RedisError| e.is_io_error() && e.to_string().contains("(os error 4)");
        let once = [
            "APPEND", "INCR", "INCRBY", "LPUSH", "RPUSH", "PUBLISH", "SPUBLISH",
        ];
        let repeatable = !once.contains(&args[0].to_ascii_uppercase().as_str());
        let mut attempt = 0;
        loop {
            attempt += 1;
            match run() {
                Ok(value) => return value,
                Err(e) if attempt < 3 && interrupted(&e) && repeatable => continue,
                Err(e) => panic!("redis-server {}: {args:?} failed: {e}", self.addr()),
            }
        }
    }

    /// `CLIENT LIST`: one line per connection the server has.
    pub fn client_list(&self) -> String {
        match self.query(&["CLIENT", "LIST"]) {
            redis::Value::BulkString(b) => String::from_utf8(b).expect("CLIENT LIST is text"),
            redis::Value::VerbatimString { text, .. } => text,
            other => panic!("CLIENT LIST answered {other:?}"),
        }
    }

    fn password(&self) -> Option<&str> {
        let i = self.extra_args.iter().position(|a| a == "--requirepass")?;
        self.extra_args.get(i + 1).map(String::as_str)
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Spawns on `self.port` and waits until *this* process is ready: its own
    /// log says so (another process may have won the port race) and it answers
    /// PING. On failure the child is killed and false returned.
    fn try_start(&mut self, deadline: Instant) -> bool {
        let log_offset = self.log().len();
        let port = self.port.to_string();
        let dir = self
            .dir
            .path()
            .to_str()
            .expect("utf-8 temp dir")
            .to_string();
        let logfile = self
            .log_path()
            .to_str()
            .expect("utf-8 temp dir")
            .to_string();
        let spawned = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--dir", &dir, "--logfile", &logfile])
            .args(["--enable-debug-command", "local"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => self.child = Some(child),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!(
                    "redis-server not found on PATH: install it (apt-get install -y redis-server)"
                )
            }
            Err(e) => panic!("failed to spawn redis-server: {e}"),
        }
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        // Stop early if the child exits (port taken, bad args).
        while Instant::now() < deadline && self.running() {
            let log = self.log();
            if log
                .get(log_offset..)
                .unwrap_or("")
                .contains("Ready to accept")
                && ping(addr)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    fn signal(&self, sig: &str) {
        let child = self
            .child
            .as_ref()
            .expect("redis-server is not running (killed?)");
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .expect("run `kill`");
        assert!(status.success(), "kill -{sig} {} failed", child.id());
    }
}

/// True if something on `addr` answers PING with `+PONG` or `-NOAUTH`
/// (the latter still proves a `--requirepass` server is up).
fn ping(addr: SocketAddr) -> bool {
    let timeout = Duration::from_millis(200);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 64];
    let n = match stream
        .write_all(b"PING\r\n")
        .and_then(|_| stream.read(&mut buf))
    {
        Ok(n) => n,
        Err(_) => return false,
    };
    buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
