//! The PING check: the member answers RESP on a connection authenticated as configured.
//!
//! The connection is kept between checks; any failure or timeout drops it, so a late reply
//! to an abandoned check can never be read as the answer to the next one.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::MemberConfig;
use crate::resp::request::encode_command;
use crate::resp::table::CommandTable;
use crate::upstream::{connect, error_line, read_reply};

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
const COMMAND: &[u8] = b"*1\r\n$7\r\nCOMMAND\r\n";

#[derive(Default)]
pub struct PingCheck {
    conn: Option<TcpStream>,
    buf: BytesMut,
}

impl PingCheck {
    /// Runs one check. The caller bounds it with the check timeout and calls
    /// [`PingCheck::reset`] when it expires.
    pub async fn run(&mut self, member: &MemberConfig) -> Result<(), String> {
        let result = self.ping(member).await;
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// Fetches the member's `COMMAND` table on the check connection (after a good check).
    pub async fn command_table(&mut self) -> Result<CommandTable, String> {
        let Some(conn) = self.conn.as_mut() else {
            return Err("no connection".into());
        };
        let result = async {
            conn.write_all(COMMAND).await.map_err(|e| e.to_string())?;
            let reply = read_reply(conn, &mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            CommandTable::parse(&reply)
                .ok_or_else(|| format!("COMMAND answered: {}", error_line(&reply)))
        }
        .await;
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// Forgets the connection (after a failure or a timeout).
    pub fn reset(&mut self) {
        self.conn = None;
        self.buf.clear();
    }

    async fn ping(&mut self, member: &MemberConfig) -> Result<(), String> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let mut c = connect(&member.address).await.map_err(|e| e.to_string())?;
                if let Some(password) = &member.password {
                    let mut args = vec![b"AUTH".to_vec()];
                    args.extend(member.username.iter().map(|u| u.as_bytes().to_vec()));
                    args.push(password.expose().as_bytes().to_vec());
                    let mut auth = Vec::new();
                    encode_command(&args, &mut auth);
                    c.write_all(&auth).await.map_err(|e| e.to_string())?;
                    let reply = read_reply(&mut c, &mut self.buf)
                        .await
                        .map_err(|e| e.to_string())?;
                    if reply.first() != Some(&b'+') {
                        return Err(format!("AUTH failed: {}", error_line(&reply)));
                    }
                }
                self.conn.insert(c)
            }
        };
        conn.write_all(PING).await.map_err(|e| e.to_string())?;
        let reply = read_reply(conn, &mut self.buf)
            .await
            .map_err(|e| e.to_string())?;
        // `+PONG`; a member still loading its data answers `-LOADING ...`.
        if reply.starts_with(b"+PONG") {
            Ok(())
        } else {
            Err(format!("PING answered: {}", error_line(&reply)))
        }
    }
}
