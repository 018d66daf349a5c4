//! Connections to members: connect (resolving the host name again each time), and replay a
//! session's state on a fresh connection before it carries the session's commands.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::MemberConfig;
use crate::member::{Attached, Member, MemberIdx};
use crate::pool::{Delivery, SharedConn};
use crate::resp::reply::{first_frame, Reply};
use crate::resp::ProtocolError;
use crate::session::state::SessionState;
use crate::stream::Stream;

/// Why a connection to a member could not be made ready. Every variant but `Rejected` means
/// the member (or the way to it) failed; `Rejected` is about this session's own state.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("TLS handshake with {address}: {source}")]
    Tls { address: String, source: io::Error },
    #[error("no answer from {0} within the connect timeout")]
    Timeout(String),
    #[error("connection lost during handshake: {0}")]
    Io(#[from] io::Error),
    #[error("member sent malformed RESP: {0}")]
    Protocol(#[from] ProtocolError),
    /// The member refused a command replaying the session state (a password that differs on
    /// this member, a database it does not have).
    #[error("member rejected the session state: {0}")]
    Rejected(String),
    /// This process could not make a connection at all (out of file descriptors, of
    /// buffers): nothing is known of the member.
    #[error("cannot open a socket here: {0}")]
    Local(io::Error),
}

impl UpstreamError {
    /// Does this error say the member cannot serve (a passive health signal)?
    pub fn is_member_failure(&self) -> bool {
        !matches!(self, UpstreamError::Rejected(_) | UpstreamError::Local(_))
    }
}

/// `PING`, as the health checks and the admission of a new connection send it.
pub const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// A session's way to one member: a connection of its own, or a place on a shared one.
#[derive(Debug)]
pub struct Upstream {
    /// The member's slot.
    pub member: MemberIdx,
    /// The member itself (its command table, its evidence), without a table lookup.
    pub to: Arc<Member>,
    pub link: Link,
    /// What the member sent after the replay (messages on re-made subscriptions), to be
    /// forwarded before anything else.
    pub early: BytesMut,
    /// Counts this upstream in the member's `attached` until it is dropped.
    _attached: Attached,
    /// Counts it in a gauge too (pinned connections, shared sessions), while it lives.
    _counted: Option<Counted>,
}

/// One count in a gauge, given back on drop.
#[derive(Debug)]
struct Counted(prometheus::IntGauge);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How a session reaches its member.
#[derive(Debug)]
pub enum Link {
    /// A connection of its own (the 1:1 model, and a shared session while it needs one).
    Pinned(Stream),
    /// A shared connection of its worker (`proxy.multiplex`).
    Shared(SharedLink),
}

/// A session's place on a shared connection: where it queues its commands, and its own
/// inbox for its replies.
pub struct SharedLink {
    pub conn: Arc<SharedConn>,
    pub owner: mpsc::Sender<Delivery>,
    pub inbox: mpsc::Receiver<Delivery>,
    /// Commands the connection gave back unsent ([`Delivery::NotSent`]).
    pub unsent: Option<bytes::Bytes>,
}

impl std::fmt::Debug for SharedLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLink")
            .field("alive", &self.conn.alive())
            .finish()
    }
}

impl Upstream {
    /// A place on the shared connection `conn` to `member`.
    pub fn shared(member: &Arc<Member>, idx: MemberIdx, conn: Arc<SharedConn>) -> Upstream {
        let (owner, inbox) = mpsc::channel(crate::pool::INBOX_CHUNKS);
        Upstream {
            member: idx,
            to: member.clone(),
            link: Link::Shared(SharedLink {
                conn,
                owner,
                inbox,
                unsent: None,
            }),
            early: BytesMut::new(),
            _attached: Attached::new(member),
            _counted: None,
        }
    }

    /// Counts this upstream in `gauge` for as long as it lives.
    pub fn count_in(&mut self, gauge: prometheus::IntGauge) {
        gauge.inc();
        self._counted = Some(Counted(gauge));
    }

    pub fn is_shared(&self) -> bool {
        matches!(self.link, Link::Shared(_))
    }

    /// The connection of a pinned upstream, and its count in the member's `attached`.
    pub fn into_stream(self) -> Option<(Stream, Attached)> {
        match self.link {
            Link::Pinned(stream) => Some((stream, self._attached)),
            Link::Shared(_) => None,
        }
    }
}

/// Opens a connection to `member` and replays `state` on it (subscriptions included), all
/// within `timeout`. `login` (with `proxy.auth = "proxy"`: the member's own credentials)
/// goes first.
pub async fn open(
    member: &Arc<Member>,
    idx: MemberIdx,
    state: &SessionState,
    login: Option<&[u8]>,
    timeout: Duration,
) -> Result<Upstream, UpstreamError> {
    let address = &member.config.address;
    // Queued here, not in the member's listen backlog (the wait is the proxy's, so it is not
    // counted against the member's connect timeout). The permit is held until the member
    // answered on the new connection: a connection it has not accepted yet still fills its
    // backlog.
    let _permit = member.connects.acquire().await;
    let ready = async {
        let mut stream = connect(&member.config).await?;
        let (mut replay, replies) = state.replay_commands();
        let (mut commands, replies) = match login {
            Some(login) => (login.to_vec(), replies + 1),
            None => (Vec::new(), replies),
        };
        commands.append(&mut replay);
        let (subscribe, confirmations) = state.subscription_commands();
        commands.extend_from_slice(&subscribe);
        let mut buf = BytesMut::new();
        let mut early = BytesMut::new();
        if commands.is_empty() {
            // Nothing to replay: a PING proves the member took the connection (any reply
            // does, `-NOAUTH` included; it is not the client's).
            stream.send(PING).await?;
            read_reply(&mut stream, &mut buf).await?;
        } else {
            stream.send(&commands).await?;
            for _ in 0..replies {
                let reply = read_reply(&mut stream, &mut buf).await?;
                if matches!(reply.first(), Some(b'-' | b'!')) {
                    return Err(UpstreamError::Rejected(error_line(&reply)));
                }
            }
            // One confirmation per channel, pattern and shard channel (pushes in RESP3);
            // messages on the channels already subscribed may come between them.
            let mut left = confirmations;
            while left > 0 {
                let (reply, frame) = read_frame(&mut stream, &mut buf, false).await?;
                if reply.is_message() {
                    early.extend_from_slice(&frame);
                } else if reply.is_error() {
                    return Err(UpstreamError::Rejected(error_line(&frame)));
                } else if !reply.is_attribute() {
                    left -= 1;
                }
            }
        }
        early.extend_from_slice(&buf);
        Ok((stream, early))
    };
    match tokio::time::timeout(timeout, ready).await {
        Ok(Ok((stream, early))) => Ok(Upstream {
            member: idx,
            to: member.clone(),
            link: Link::Pinned(stream),
            early,
            _attached: Attached::new(member),
            _counted: None,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(UpstreamError::Timeout(address.clone())),
    }
}

/// TCP connect with Nagle off, then the TLS handshake for a member with `tls = true`. The
/// host of `host:port` is resolved now.
pub async fn connect(member: &MemberConfig) -> Result<Stream, UpstreamError> {
    let address = &member.address;
    let tcp = TcpStream::connect(address).await.map_err(|source| {
        if is_local_exhaustion(&source) {
            UpstreamError::Local(source)
        } else {
            UpstreamError::Connect {
                address: address.clone(),
                source,
            }
        }
    })?;
    tcp.set_nodelay(true)?;
    match &member.tls {
        None => Ok(Stream::Tcp(tcp)),
        Some(tls) => tls.connect(tcp).await.map_err(|source| UpstreamError::Tls {
            address: address.clone(),
            source,
        }),
    }
}

/// Out of file descriptors or kernel buffers in this process or host (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM): the connect never reached the member, so it says nothing about it.
pub(crate) fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Reads the next reply frame (pushes skipped) and returns its bytes; bytes after it stay in
/// `buf`. For short exchanges only: the frame is held whole.
pub async fn read_reply(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<BytesMut, UpstreamError> {
    Ok(read_frame(stream, buf, true).await?.1)
}

/// Reads the next frame (optionally skipping pushes) and returns it with its bytes.
async fn read_frame(
    stream: &mut Stream,
    buf: &mut BytesMut,
    skip_pushes: bool,
) -> Result<(Reply, BytesMut), UpstreamError> {
    loop {
        if let Some(reply) = first_frame(buf, skip_pushes)? {
            return Ok((reply, buf.split_to(reply.end)));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
    }
}

/// The first line of an error reply, for logs and messages (without `-` and `\r\n`).
pub fn error_line(reply: &[u8]) -> String {
    let line = reply.split(|&b| b == b'\r').next().unwrap_or_default();
    String::from_utf8_lossy(line.get(1..).unwrap_or_default()).into_owned()
}

#[cfg(test)]
mod local_tests {
    use super::*;

    /// Out of descriptors or buffers here says nothing about the member; a refusal does.
    #[test]
    fn local_exhaustion_is_not_a_member_failure() {
        for errno in [24, 23, 105, 12] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(is_local_exhaustion(&e), "errno {errno}");
            assert!(!UpstreamError::Local(e).is_member_failure());
        }
        let refused = io::Error::from_raw_os_error(111);
        assert!(!is_local_exhaustion(&refused));
        let e = UpstreamError::Connect {
            address: "a:1".into(),
            source: refused,
        };
        assert!(e.is_member_failure());
    }
}
