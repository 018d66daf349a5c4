//! Several proxies and their coordination: a real `etcd` on free ports (killed on drop), and
//! geoproxy processes (the built binary) with their log in a file, that a test can kill,
//! freeze (SIGSTOP) and thaw.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;

/// A single-node etcd in a temp dir.
pub struct EtcdServer {
    pub client_port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    pub async fn start() -> EtcdServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--data-dir", dir.path().to_str().expect("utf-8")])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}): install it (apt-get install -y etcd-server)")
            });
        let server = EtcdServer {
            client_port: client,
            child,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let url = format!("{}/v3/kv/range", server.url());
        super::eventually(Duration::from_secs(10), "etcd answers", || async {
            http.post(&url)
                .body(r#"{"key": "Zm9v"}"#)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config` in the suite's mode (see [`super::proxy::multiplexed`]), unless it chooses.
fn with_mode(config: &str) -> String {
    if config.contains("multiplex =") {
        return config.to_string();
    }
    let line = super::proxy::multiplex_line(None);
    config.replacen("[proxy]\n", &format!("[proxy]\n{line}\n"), 1)
}

/// A geoproxy process (the built binary) on free ports, its log (debug) in a file.
pub struct ProxyProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Option<Child>,
    config: tempfile::NamedTempFile,
    log: tempfile::NamedTempFile,
    http: reqwest::Client,
}

impl ProxyProcess {
    /// Starts the binary with `config`, in which `{listen}` and `{admin}` stand for the
    /// ports chosen here.
    pub fn start(config: &str) -> ProxyProcess {
        ProxyProcess::start_with_admin(config, free_port())
    }

    /// As [`ProxyProcess::start`], with the admin API on `admin` (known to its peers).
    pub fn start_with_admin(config: &str, admin: u16) -> ProxyProcess {
        let port = free_port();
        let text = with_mode(config)
            .replace("{listen}", &format!("127.0.0.1:{port}"))
            .replace("{admin}", &format!("127.0.0.1:{admin}"));
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(text.as_bytes()).expect("write config");
        let log = tempfile::NamedTempFile::new().expect("log file");
        let mut p = ProxyProcess {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
            child: None,
            config: file,
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = self.log.reopen().expect("log");
        let err = self.log.reopen().expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_geoproxy"))
            .arg("--config")
            .arg(self.config.path())
            .env("GEOPROXY_LOG", "debug")
            .stdout(log)
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .expect("start geoproxy");
        self.child = Some(child);
    }

    /// Writes a new configuration to the process's file (`{listen}` and `{admin}` stand for
    /// its ports, as at start), for a reload.
    pub fn rewrite(&self, config: &str) {
        let text = with_mode(config)
            .replace("{listen}", &self.addr.to_string())
            .replace("{admin}", &self.admin.to_string());
        std::fs::write(self.config.path(), text).expect("rewrite config");
    }

    /// `POST path` on the admin API: the status code and the JSON body.
    pub async fn post(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("http://{}{path}", self.admin))
            .send()
            .await
            .expect("admin answers");
        let code = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        (code, serde_json::from_str(&body).unwrap_or_default())
    }

    /// `/metrics` as text (empty when the admin API does not answer).
    pub async fn metrics(&self) -> String {
        let r = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await;
        match r {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The same process again, with the same ports and configuration.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status()
                .expect("kill");
        }
    }

    /// Its first worker (the main thread) is asleep in `epoll_wait`: nothing is half done,
    /// and whatever arrives from now on is seen at its next turn, together. (`wchan` reads
    /// "0" where the kernel hides it: then the sleep alone counts.)
    pub fn worker_idle(&self) -> bool {
        let (state, wchan) = self.worker();
        state == "S" && (wchan.contains("epoll") || wchan.trim() == "0")
    }

    /// Its first worker has stopped (SIGSTOP takes effect after `kill` returns, and a
    /// thread woken by it in `epoll_wait` takes the events already there with it).
    pub fn worker_stopped(&self) -> bool {
        self.worker().0 == "T"
    }

    /// The main thread's state letter (`/proc/PID/stat`) and `wchan`.
    fn worker(&self) -> (String, String) {
        let Some(child) = &self.child else {
            return Default::default();
        };
        let task = format!("/proc/{0}/task/{0}", child.id());
        let stat = std::fs::read_to_string(format!("{task}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_default();
        let wchan = std::fs::read_to_string(format!("{task}/wchan")).unwrap_or_default();
        (state.to_string(), wchan)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// `/v1/status` as JSON, or `None` when the admin API does not answer.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let r = self
            .http
            .get(format!("http://{}/v1/status", self.admin))
            .send()
            .await
            .ok()?;
        serde_json::from_str(&r.text().await.ok()?).ok()
    }

    /// `active`, `standby`, or `None` when the proxy does not answer.
    pub async fn role(&self) -> Option<String> {
        Some(self.status().await?["role"].as_str()?.to_string())
    }

    pub async fn ready(&self) -> Option<u16> {
        let r = self
            .http
            .get(format!("http://{}/ready", self.admin))
            .send()
            .await
            .ok()?;
        Some(r.status().as_u16())
    }

    /// One `SET key value` on a fresh connection: the first line of the reply, or `None`
    /// when the proxy does not answer within 500 ms.
    pub async fn set(&self, key: &str, value: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let attempt = async {
            let mut c = tokio::net::TcpStream::connect(self.addr).await.ok()?;
            let cmd = format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
                key.len(),
                value.len()
            );
            c.write_all(cmd.as_bytes()).await.ok()?;
            let mut buf = vec![0u8; 512];
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n") {
                let n = c.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                got.extend_from_slice(&buf[..n]);
            }
            Some(String::from_utf8_lossy(&got).trim_end().to_string())
        };
        tokio::time::timeout(Duration::from_millis(500), attempt)
            .await
            .ok()
            .flatten()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // A frozen process must be thawed to die cleanly.
        self.signal("CONT");
        self.kill();
    }
}
