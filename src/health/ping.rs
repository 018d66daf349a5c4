//! The PING check: the member answers RESP on a connection authenticated as configured
//! (or, with `health.ping.echo`, echoes a random token: proof the reply is this check's).
//!
//! Two timeouts, each named in the error it gives: `connect_timeout` for the handshake of a
//! fresh connection (TCP connect, TLS and AUTH), `timeout` for the PING on it. The
//! connection is kept between checks and opened anew every `reconnect_interval` (host name
//! resolved again, and proof the member still accepts connections); any failure or timeout
//! drops it, so a late reply to an abandoned check is never read as the next one's answer.

use std::time::Duration;

use crate::stream::Stream;
use bytes::BytesMut;
use tokio::time::{timeout, Instant};

use tracing::debug;

use super::check::Check;
use crate::config::{HealthConfig, MemberConfig};
use crate::member::Member;
use crate::resp::request::encode_command;
use crate::resp::table::CommandTable;
use crate::upstream::{connect, error_line, read_reply, PING};

const COMMAND: &[u8] = b"*1\r\n$7\r\nCOMMAND\r\n";

/// How long fetching a member's `COMMAND` table may take (a few hundred KB).
const COMMAND_TABLE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct PingCheck {
    echo: bool,
    connect_timeout: Duration,
    timeout: Duration,
    reconnect_interval: Duration,
    conn: Option<(Stream, Instant)>,
    buf: BytesMut,
}

impl PingCheck {
    pub fn new(config: &HealthConfig) -> PingCheck {
        PingCheck {
            echo: config.ping.echo,
            connect_timeout: config.connect_timeout,
            timeout: config.ping.timing.timeout,
            reconnect_interval: config.reconnect_interval,
            conn: None,
            buf: BytesMut::new(),
        }
    }

    /// One periodic check, on the kept connection (opened anew when it is old).
    /// A kept connection the member closed meanwhile (its `timeout`, a `CLIENT KILL`) is
    /// no evidence against the member: the check opens a fresh one.
    pub async fn periodic(&mut self, member: &MemberConfig) -> Result<(), String> {
        if let Some((conn, opened)) = &mut self.conn {
            if !conn.is_idle() || opened.elapsed() >= self.reconnect_interval {
                self.reset();
            }
        }
        let result = self.check(member).await;
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// One check on a fresh connection, kept for nothing: the confirmation of a passive
    /// signal must not lean on a connection that may be the one in trouble.
    pub async fn fresh(&mut self, member: &MemberConfig) -> Result<(), String> {
        self.reset();
        let result = self.check(member).await;
        self.reset();
        result
    }

    /// Fetches the member's `COMMAND` table on the check connection (after a good check).
    async fn command_table(&mut self) -> Result<CommandTable, String> {
        let Some((conn, _)) = self.conn.as_mut() else {
            return Err("no connection".into());
        };
        let buf = &mut self.buf;
        let fetch = async {
            conn.send(COMMAND).await.map_err(|e| e.to_string())?;
            let reply = read_reply(conn, buf).await.map_err(|e| e.to_string())?;
            CommandTable::parse(&reply)
                .ok_or_else(|| format!("COMMAND answered: {}", error_line(&reply)))
        };
        let result = match timeout(COMMAND_TABLE_TIMEOUT, fetch).await {
            Ok(r) => r,
            Err(_) => Err(format!("no COMMAND reply within {COMMAND_TABLE_TIMEOUT:?}")),
        };
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// Forgets the connection.
    fn reset(&mut self) {
        self.conn = None;
        self.buf.clear();
    }

    async fn check(&mut self, member: &MemberConfig) -> Result<(), String> {
        let what = if self.echo { "ECHO" } else { "PING" };
        if self.conn.is_none() {
            let conn = open(member, &mut self.buf, self.connect_timeout).await?;
            self.conn = Some((conn, Instant::now()));
        }
        let limit = self.timeout;
        match timeout(limit, self.ping()).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "check timeout: no {what} reply within {limit:?} (health.timeout)"
            )),
        }
    }

    async fn ping(&mut self) -> Result<(), String> {
        let Some((conn, _)) = self.conn.as_mut() else {
            return Err("no connection".into());
        };
        let (name, request, want) = if self.echo {
            let token = format!("geoproxy-{:016x}", rand::random::<u64>());
            let mut request = Vec::new();
            encode_command(
                &[b"ECHO".to_vec(), token.clone().into_bytes()],
                &mut request,
            );
            let want = format!("${}\r\n{token}\r\n", token.len()).into_bytes();
            ("ECHO", request, want)
        } else {
            ("PING", PING.to_vec(), b"+PONG\r\n".to_vec())
        };
        conn.send(&request).await.map_err(|e| e.to_string())?;
        let reply = read_reply(conn, &mut self.buf)
            .await
            .map_err(|e| e.to_string())?;
        // `+PONG`; a member still loading its data answers `-LOADING ...`.
        if reply[..] == want[..] {
            Ok(())
        } else {
            Err(format!("{name} answered: {}", error_line(&reply)))
        }
    }
}

/// Opens a check connection to `member`: TCP connect and `AUTH` with the checks'
/// credentials, within `limit` (`health.connect_timeout`). Every check that talks RESP to a
/// member opens its connections here.
pub(super) async fn open(
    member: &MemberConfig,
    buf: &mut BytesMut,
    limit: Duration,
) -> Result<Stream, String> {
    match timeout(limit, handshake(member, buf)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "connect timeout: no connection to {} (TCP connect and AUTH) within {limit:?} \
             (health.connect_timeout)",
            member.address
        )),
    }
}

async fn handshake(member: &MemberConfig, buf: &mut BytesMut) -> Result<Stream, String> {
    let mut conn = connect(member).await.map_err(|e| e.to_string())?;
    if let Some(password) = &member.password {
        let mut args = vec![b"AUTH".to_vec()];
        args.extend(member.username.iter().map(|u| u.as_bytes().to_vec()));
        args.push(password.expose().as_bytes().to_vec());
        let reply = request(&mut conn, buf, &args).await?;
        if reply.first() != Some(&b'+') {
            return Err(format!("AUTH failed: {}", error_line(&reply)));
        }
    }
    Ok(conn)
}

/// Sends one command and reads its whole reply.
pub(super) async fn request(
    conn: &mut Stream,
    buf: &mut BytesMut,
    args: &[Vec<u8>],
) -> Result<BytesMut, String> {
    let mut bytes = Vec::new();
    encode_command(args, &mut bytes);
    conn.send(&bytes).await.map_err(|e| e.to_string())?;
    read_reply(conn, buf).await.map_err(|e| e.to_string())
}

/// `future`, or an error naming the key of the timeout it overran.
pub(super) async fn within<T>(
    limit: Duration,
    what: &str,
    key: &str,
    future: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => Err(format!("{what}: nothing within {limit:?} ({key})")),
    }
}

impl Check for PingCheck {
    async fn run(&mut self, member: &Member) -> Result<(), String> {
        let result = self.periodic(&member.config).await;
        if result.is_ok() && !member.knows_commands() {
            // Learned once (module commands included); the built-in table serves meanwhile.
            match self.command_table().await {
                Ok(table) => {
                    debug!(
                        member = member.id(),
                        commands = table.len,
                        "command table loaded"
                    );
                    member.set_command_table(table);
                }
                Err(e) => debug!(member = member.id(), error = %e, "no command table yet"),
            }
        }
        result
    }
}
