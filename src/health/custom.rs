//! Custom checks: whatever the operator decides.
//!
//! - **commands**: sent in order on a fresh connection (authenticated as the other checks),
//!   each reply rendered as text and matched against its pattern, where `*` matches any run
//!   of characters. Rendering: a string is its bytes (UTF-8, lossy), an integer its decimal
//!   digits, a null `(nil)`, an error `(error) <message>`, an array its elements rendered and
//!   joined by newlines. So `["INFO", "persistence"]` expects `*loading:0*`, and `["PING"]`
//!   expects `PONG`.
//! - **program**: run with the member in its environment (`GEOPROXY_MEMBER_ID`,
//!   `GEOPROXY_MEMBER_HOST`, `GEOPROXY_MEMBER_PORT`, `GEOPROXY_MEMBER_ADDRESS`,
//!   `GEOPROXY_MEMBER_REGION`); exit status 0 is healthy. It is killed at the timeout, and
//!   the start of its output is kept for the log and `/v1/status`.

use std::process::Stdio;
use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::process::Command;

use super::check::Check;
use super::ping::{open, request, within};
use crate::config::{CustomAction, CustomConfig, HealthConfig};
use crate::member::Member;

/// Most characters of a program's output kept for the log.
const OUTPUT_KEPT: usize = 300;

pub struct CustomCheck {
    action: CustomAction,
    connect_timeout: Duration,
    timeout: Duration,
    buf: BytesMut,
}

impl CustomCheck {
    pub fn new(health: &HealthConfig, config: &CustomConfig) -> CustomCheck {
        CustomCheck {
            action: config.action.clone(),
            connect_timeout: health.connect_timeout,
            timeout: config.timing.timeout,
            buf: BytesMut::new(),
        }
    }

    async fn commands(
        &mut self,
        member: &Member,
        steps: &[(Vec<String>, String)],
    ) -> Result<(), String> {
        let mut conn = open(&member.config, &mut self.buf, self.connect_timeout).await?;
        let buf = &mut self.buf;
        let run = async {
            for (command, pattern) in steps {
                let args: Vec<Vec<u8>> = command.iter().map(|w| w.as_bytes().to_vec()).collect();
                let reply = request(&mut conn, buf, &args).await?;
                let text = match redis_protocol::resp2::decode::decode(&reply) {
                    Ok(Some((frame, _))) => render(&frame),
                    _ => String::from_utf8_lossy(&reply).into_owned(),
                };
                if !glob(pattern, &text) {
                    let shown: String = text.chars().take(OUTPUT_KEPT).collect();
                    return Err(format!(
                        "{} answered {shown:?}, not {pattern:?}",
                        command.join(" ")
                    ));
                }
            }
            Ok(())
        };
        let result = within(self.timeout, "custom check", "timeout", run).await;
        self.buf.clear();
        result
    }

    async fn program(&self, member: &Member, argv: &[String]) -> Result<(), String> {
        let address = &member.config.address;
        let (host, port) = address.rsplit_once(':').unwrap_or((address, ""));
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .env("GEOPROXY_MEMBER_ID", member.id())
            .env("GEOPROXY_MEMBER_HOST", host.trim_matches(['[', ']']))
            .env("GEOPROXY_MEMBER_PORT", port)
            .env("GEOPROXY_MEMBER_ADDRESS", address)
            .env(
                "GEOPROXY_MEMBER_REGION",
                member.config.region.as_deref().unwrap_or(""),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A run that overruns its timeout is dropped, and the program killed with it.
            .kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
        let limit = self.timeout;
        let output = match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => return Err(format!("{}: {e}", argv[0])),
            Err(_) => return Err(format!("{} killed after {limit:?} (timeout)", argv[0])),
        };
        if output.status.success() {
            return Ok(());
        }
        let mut said = String::from_utf8_lossy(&output.stdout).into_owned();
        said.push_str(&String::from_utf8_lossy(&output.stderr));
        let said: String = said.trim().chars().take(OUTPUT_KEPT).collect();
        Err(format!("{} exited with {}: {said}", argv[0], output.status))
    }
}

impl Check for CustomCheck {
    async fn run(&mut self, member: &Member) -> Result<(), String> {
        match self.action.clone() {
            CustomAction::Commands(steps) => self.commands(member, &steps).await,
            CustomAction::Program(argv) => self.program(member, &argv).await,
        }
    }
}

/// A reply as text, for matching.
fn render(frame: &OwnedFrame) -> String {
    match frame {
        OwnedFrame::SimpleString(s) | OwnedFrame::BulkString(s) => {
            String::from_utf8_lossy(s).into_owned()
        }
        OwnedFrame::Error(e) => format!("(error) {e}"),
        OwnedFrame::Integer(i) => i.to_string(),
        OwnedFrame::Null => "(nil)".into(),
        OwnedFrame::Array(items) => items.iter().map(render).collect::<Vec<_>>().join("\n"),
    }
}

/// Does `text` match `pattern`, where `*` matches any run of characters (newlines too)?
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: the whole text
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_table() {
        let cases = [
            ("PONG", "PONG", true),
            ("PONG", "PONGS", false),
            (
                "*loading:0*",
                "# Persistence\r\nloading:0\r\nasync_loading:0",
                true,
            ),
            ("*loading:0*", "loading:1", false),
            ("role:*", "role:master", true),
            ("*:master", "role:master", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("ab*ba", "aba", false), // the prefix and suffix may not overlap
            ("*", "", true),
            ("", "", true),
            ("", "x", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(glob(pattern, text), want, "{pattern:?} ~ {text:?}");
        }
    }

    #[test]
    fn replies_render_as_text() {
        let cases: [(&[u8], &str); 6] = [
            (b"+PONG\r\n", "PONG"),
            (b"$3\r\nabc\r\n", "abc"),
            (b":42\r\n", "42"),
            (b"$-1\r\n", "(nil)"),
            (b"-ERR no\r\n", "(error) ERR no"),
            (b"*2\r\n$1\r\na\r\n:1\r\n", "a\n1"),
        ];
        for (wire, want) in cases {
            let (frame, _) = redis_protocol::resp2::decode::decode(wire)
                .unwrap()
                .unwrap();
            assert_eq!(render(&frame), want);
        }
    }
}
