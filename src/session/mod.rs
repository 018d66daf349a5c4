//! One client connection and its pinned upstream.
//!
//! The session is a pump (this file, the only part that touches sockets) around pure parts:
//! - [`ledger`]: which reply answers which command, and the state the member accepted;
//! - [`state`]: that state, and the commands that replay it on a new upstream;
//! - [`moving`]: when and how the session moves to another member, and what happens to
//!   commands in flight when its member fails;
//! - [`transaction`]: the proxy's answers inside a transaction the member lost;
//! - [`timers`]: reply timeout, unavailable timeout, move backoff, client idle timeout;
//! - [`policy`]: denied and renamed commands, and authentication with `proxy.auth = "proxy"`.
//!
//! The pump forwards the client's bytes in batches (every complete command read at once goes
//! out in one write, so pipelines stay pipelines; a large command streams out as it arrives)
//! and streams the member's replies back as they arrive, telling the ledger of each command
//! sent and each reply frame seen.

pub mod ledger;
mod moving;
pub mod policy;
pub mod state;
pub mod timers;
pub mod transaction;

#[cfg(test)]
mod tests;

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, info, warn};

use crate::health::errors::cannot_serve;
use crate::member::{Member, MemberIdx, Roster, Signal};
use crate::metrics::Metrics;
use crate::pool::{Batch, Delivery, Pools};
use crate::resp::command::{classify, Kind};
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{self, RequestScanner};
use crate::resp::ProtocolError;
use crate::router::{History, Route};
use crate::stream::Stream;
use crate::upstream::{Link, Upstream};
use ledger::{needs_args, Command, Frame, Ledger};
use moving::AwaitingVerdict;
use policy::{Rules, Screen, Standing};
use state::Change;
use timers::{block_deadline, Backoff, Durations, Timer};
use transaction::Broken;

/// Room taken in the reply buffer for a read: large reads keep big values fast.
const REPLY_READ_SIZE: usize = 64 * 1024;
/// Room taken in the request buffer for a session's first read: most clients send small
/// commands one at a time, and every idle session keeps its buffer.
const FIRST_REQUEST_READ: usize = 1024;
/// The most room taken in the request buffer for a read: a read that fills half of its
/// room doubles the next one, up to this (pipelines and large values). Room for a few 16 KiB
/// values: a command that does not fit the room left is copied into a new buffer, and with
/// 16 KiB of room nearly every 16 KiB SET was (-6 % proxy CPU, +9 % SET rate at 64 KiB).
const MAX_REQUEST_READ: usize = 64 * 1024;
/// While commands wait (for a member, or for replies before a local answer), stop reading
/// the client once this much is buffered: backpressure, not memory.
const MAX_WAITING_BYTES: usize = 1024 * 1024;
/// An incomplete command larger than this streams to the member as it arrives (when its
/// arguments do not matter to the session), so a 512 MB value is never held whole.
const STREAM_AFTER: usize = 64 * 1024;
/// A buffer that grew past this for one big frame is given back once it is empty.
const SHRINK_ABOVE: usize = 256 * 1024;

/// What every session shares: the members, the metrics and the limits.
pub struct Context {
    pub members: Arc<Roster>,
    pub metrics: Metrics,
    /// The last switches: sessions count what they did after each.
    pub history: Arc<History>,
    pub reply_timeout: Duration,
    pub unavailable_timeout: Duration,
    pub connect_timeout: Duration,
    /// The longest a confirming probe takes (`health.connect_timeout` + `health.timeout`):
    /// a session waits about this long for a verdict.
    pub probe_timeout: Duration,
    /// `health.error_oom`: `-OOM` replies count as the member refusing to serve.
    pub oom_refuses: bool,
    /// `failover.retry_reads`: in-flight read-only commands go to the new member.
    pub retry_reads: bool,
    /// `proxy.client_idle_timeout`.
    pub client_idle_timeout: Option<Duration>,
    /// `proxy.client_query_buffer_limit`.
    pub query_buffer_limit: usize,
    /// The command policy and proxy authentication.
    pub rules: Rules,
    /// Centralized mode: this proxy may send to members only while the fence is open.
    pub fence: Option<Arc<crate::modes::centralized::Fence>>,
}

/// What the proxy answers itself instead of a member.
enum Local {
    /// By the transaction and availability rules (a lost transaction, QUIT, no member).
    Kind(Kind),
    /// These bytes (the command policy, proxy authentication), counted once written.
    Reply(Vec<u8>, Option<policy::Counted>),
    /// `RESET` with proxy authentication: `+RESET`, and the session starts over.
    Reset,
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("client connection: {0}")]
    Client(#[source] io::Error),
    #[error("member sent malformed RESP: {0}")]
    MemberProtocol(ProtocolError),
    #[error("member {0} failed in the middle of a reply, or while the session could not move")]
    Unrecoverable(String),
    #[error("client query buffer over {0} bytes (proxy.client_query_buffer_limit)")]
    QueryBufferLimit(usize),
    #[error(
        "member {0} closed the connection and answers others: closing the client, as Redis did"
    )]
    ClosedByMember(String),
}

/// Events the session waits for.
enum Event {
    ClientRead(io::Result<usize>),
    UpstreamRead(io::Result<usize>),
    RouteChanged,
    /// The checker's verdict on why the member closed the session's upstream.
    Verdict(bool),
    Timer,
    Shutdown,
}

/// The command at the front of the request buffer is being streamed to the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Streaming {
    No,
    /// Recorded in the ledger and partly sent: the rest follows as it arrives.
    Sending,
    /// Its member failed while it was arriving: the rest is dropped (it never ran).
    Dropping,
}

pub struct Session {
    ctx: Arc<Context>,
    /// The worker's shared and idle pinned connections (`proxy.multiplex`); `None`: every
    /// session has a connection of its own.
    pools: Option<Arc<Pools>>,
    /// A command that ties the session to its connection for good (`CLIENT NO-EVICT`,
    /// `CLIENT NO-TOUCH`, `CLIENT REPLY`) was sent: it never shares again.
    sticky: bool,
    client: Stream,
    route: watch::Receiver<Route>,
    /// The route as last read from `route`.
    route_seen: Route,
    /// The router still publishes (it ends only at shutdown; if not, keep the last route).
    route_open: bool,
    upstream: Option<Upstream>,
    /// The member of the last upstream, kept after it failed: attaching elsewhere is a move.
    last_member: Option<MemberIdx>,
    /// Command counter of the current upstream's member.
    commands: Option<IntCounter>,
    ledger: Ledger,
    requests: BytesMut,
    request_scanner: RequestScanner,
    streaming: Streaming,
    replies: BytesMut,
    /// Replies a shared connection handed over while `replies` was empty: forwarded from
    /// the connection's own buffer, without a copy into `replies`.
    delivered: Bytes,
    reply_scanner: ReplyScanner,
    broken: Option<Broken>,
    /// `replies` holds bytes to forward that no read announced (after a move).
    replies_waiting: bool,
    /// Malformed input from the client: answered and closed once earlier replies are out.
    protocol_error: Option<ProtocolError>,
    /// The client closed its side: what it sent is still served, then the session ends.
    client_eof: bool,
    /// The upstream was told the client is gone (its write side shut down).
    upstream_shut: bool,
    /// Complete commands are buffered that cannot go out yet.
    stalled: bool,
    /// Room taken in `requests` for the next read of the client.
    request_read: usize,
    /// When the session last had no upstream (or `None` while it has one).
    detached_since: Option<Instant>,
    /// The member whose connection failed, and the route epoch then: not retried under the
    /// same route before `unavailable_timeout` has passed.
    failed: Option<(MemberIdx, u64)>,
    backoff: Backoff,
    /// Last progress on the upstream: a write while nothing was owed, or any read.
    last_activity: Instant,
    /// Last read from or write to the client (for the idle timeout).
    last_client_io: Instant,
    /// The member closed this session's upstream: waiting for the checker's verdict.
    verdict: Option<AwaitingVerdict>,
    /// When the member's silence was last reported (reply timeout), if it was since the
    /// last progress.
    suspected_at: Option<Instant>,
    /// Blocking commands owed: their replies may take as long as they say.
    blocked_until: Option<Instant>,
    blocked_forever: bool,
    timer: Timer,
    /// Proxy authentication and MULTI, as the command policy needs them.
    standing: Standing,
    /// When the commands still owed a reply went out.
    durations: Durations,
}

impl Session {
    pub fn new(
        ctx: Arc<Context>,
        client: Stream,
        route: watch::Receiver<Route>,
        pools: Option<Arc<Pools>>,
    ) -> Session {
        let now = Instant::now();
        let mut route = route;
        let route_seen = *route.borrow_and_update();
        Session {
            ctx,
            pools,
            sticky: false,
            client,
            route,
            route_seen,
            route_open: true,
            upstream: None,
            last_member: None,
            commands: None,
            ledger: Ledger::default(),
            requests: BytesMut::new(),
            request_scanner: RequestScanner::default(),
            streaming: Streaming::No,
            replies: BytesMut::new(),
            delivered: Bytes::new(),
            reply_scanner: ReplyScanner::default(),
            broken: None,
            replies_waiting: false,
            protocol_error: None,
            client_eof: false,
            upstream_shut: false,
            stalled: false,
            request_read: FIRST_REQUEST_READ,
            detached_since: Some(now),
            failed: None,
            backoff: Backoff::default(),
            last_activity: now,
            last_client_io: now,
            verdict: None,
            suspected_at: None,
            blocked_until: None,
            blocked_forever: false,
            timer: Timer::new(now),
            standing: Standing::default(),
            durations: Durations::default(),
        }
    }

    /// Serves the client until it leaves, shutdown drains it, or an unrecoverable failure.
    ///
    /// An `async` block rather than an `async fn run(mut self)`: the latter keeps the
    /// session twice in its future (the argument and its `mut` binding, 1.1 KiB each), and
    /// every idle session pays for the size of its future.
    pub fn run(self, shutdown: CancellationToken) -> impl std::future::Future<Output = ()> {
        let mut session = self;
        async move {
            match session.serve(shutdown).await {
                Ok(()) => {}
                Err(SessionError::Client(e)) => debug!(error = %e, "client connection closed"),
                Err(e @ SessionError::MemberProtocol(_)) => {
                    session.ctx.metrics.protocol_errors.inc();
                    warn!(error = %e, "closing session");
                }
                Err(e @ SessionError::ClosedByMember(_)) => debug!(error = %e, "closing session"),
                Err(e) => info!(error = %e, "closing session"),
            }
        }
    }

    async fn serve(&mut self, shutdown: CancellationToken) -> Result<(), SessionError> {
        let mut draining = false;
        // One wait for shutdown for the session's life: creating and dropping it on every
        // turn of the loop registered and unregistered a waiter each time.
        let mut shutdown = std::pin::pin!(shutdown.cancelled_owned());
        loop {
            self.follow_route().await?;
            if std::mem::take(&mut self.replies_waiting) {
                self.forward_replies().await?;
            }
            self.forward_requests().await?;
            let owed = self.ledger.in_flight() > 0 || self.streaming == Streaming::Sending;
            if !owed {
                if let Some(e) = self.protocol_error.take() {
                    self.ctx.metrics.protocol_errors.inc();
                    let _ = self.client.send(&e.reply()).await;
                    return Ok(());
                }
                if draining {
                    return Ok(());
                }
            }
            if self.client_eof && !self.half_close_upstream().await {
                return Ok(());
            }
            if self.ledger.quitting() && self.upstream.is_none() {
                return Ok(());
            }
            self.shrink_buffers();
            self.timer.arm(self.deadline());
            let read_client = !draining
                && !self.client_eof
                && self.protocol_error.is_none()
                && (!self.stalled || self.requests.len() < MAX_WAITING_BYTES);
            match self
                .next_event(read_client, draining, shutdown.as_mut())
                .await
            {
                Event::ClientRead(Ok(0)) => self.client_eof = true,
                Event::ClientRead(Ok(n)) => {
                    self.ctx.metrics.client_bytes_in.inc_by(n as u64);
                    if n * 2 >= self.request_read {
                        self.request_read = (self.request_read * 2).min(MAX_REQUEST_READ);
                    }
                    self.last_client_io = Instant::now();
                    if self.requests.len() > self.ctx.query_buffer_limit {
                        // Redis closes such a client without a reply.
                        self.ctx.metrics.protocol_errors.inc();
                        return Err(SessionError::QueryBufferLimit(self.ctx.query_buffer_limit));
                    }
                }
                Event::ClientRead(Err(e)) => return Err(SessionError::Client(e)),
                Event::UpstreamRead(Ok(0)) => {
                    self.upstream_closed().await?;
                    if self.client_eof || self.ledger.quitting() {
                        return Ok(());
                    }
                }
                Event::UpstreamRead(Ok(_)) => self.forward_replies().await?,
                Event::UpstreamRead(Err(e)) => {
                    if let Some(unsent) = self.take_unsent() {
                        self.unsend(unsent);
                        continue;
                    }
                    self.upstream_lost(Signal::ConnectionLost, &e.to_string())
                        .await?;
                    if self.client_eof || self.ledger.quitting() {
                        return Ok(());
                    }
                }
                Event::RouteChanged => self.route_seen = *self.route.borrow_and_update(),
                Event::Verdict(healthy) => self.on_verdict(healthy)?,
                Event::Timer => {
                    if self.on_timer().await? {
                        return Ok(());
                    }
                }
                Event::Shutdown => draining = true,
            }
        }
    }

    async fn next_event(
        &mut self,
        read_client: bool,
        draining: bool,
        shutdown: Pin<&mut WaitForCancellationFutureOwned>,
    ) -> Event {
        let Session {
            client,
            requests,
            request_read,
            upstream,
            replies,
            delivered,
            route,
            route_open,
            verdict,
            timer,
            ..
        } = self;
        let timer_enabled = timer.enabled;
        // Biased: the data path is polled first, and when it is ready the control futures
        // (shared wake-up lists, each behind a lock) are not polled at all.
        tokio::select! {
            biased;
            r = read_upstream(upstream.as_mut(), replies, delivered) => Event::UpstreamRead(r),
            r = client.read_when_ready(requests, *request_read), if read_client => {
                Event::ClientRead(r)
            }
            r = route.changed(), if *route_open => match r {
                Ok(()) => Event::RouteChanged,
                Err(_) => {
                    // The router is gone (only at shutdown): keep the last route.
                    *route_open = false;
                    Event::RouteChanged
                }
            },
            healthy = wait_verdict(verdict.as_mut()) => Event::Verdict(healthy),
            _ = timer.fired(), if timer_enabled => Event::Timer,
            _ = shutdown, if !draining => Event::Shutdown,
        }
    }

    /// Sends every complete buffered command that can go out now, in one write per batch;
    /// streams a large command that is still arriving; answers locally the commands the
    /// proxy must answer.
    async fn forward_requests(&mut self) -> Result<(), SessionError> {
        if self.ledger.quitting() {
            // Redis reads no command after QUIT: what follows is dropped. (Reading goes
            // on, so a client that leaves is seen even when QUIT got no reply.)
            self.requests.clear();
            self.request_scanner = RequestScanner::default();
            return Ok(());
        }
        loop {
            self.stalled = false;
            let mut end = 0;
            let mut sent = 0u64;
            let mut local: Option<(usize, Local)> = None;
            let mut incomplete = false;
            // The command at `end` was just rewritten by the policy: not screened again.
            let mut screened = false;
            // ... because the policy refused it inside MULTI: what the client gets in place
            // of the member's error (taken when it is recorded).
            let mut refused: Option<Box<[u8]>> = None;
            let owed_before = self.ledger.in_flight();
            let was_idle = owed_before == 0;
            // A strict switch, or a fence that closed, holds new commands.
            let held = self.held();
            // Once the first command is scanned: does a later one need a connection of
            // its own?
            let mut check_batch = !held && self.ledger.in_flight() == 0;
            while self.protocol_error.is_none() && !self.ledger.quitting() {
                let frame = match self.request_scanner.next(&self.requests[end..]) {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        incomplete = end < self.requests.len();
                        break;
                    }
                    Err(e) => {
                        self.protocol_error = Some(e);
                        break;
                    }
                };
                match self.streaming {
                    // The tail of a streamed command: already recorded. The member's
                    // silence counts from now on.
                    Streaming::Sending => {
                        self.streaming = Streaming::No;
                        self.last_activity = Instant::now();
                        end += frame.len;
                        continue;
                    }
                    Streaming::Dropping => {
                        self.streaming = Streaming::No;
                        self.requests.advance(frame.len);
                        continue;
                    }
                    Streaming::No => {}
                }
                if std::mem::take(&mut check_batch) && self.batch_needs_pin(frame.len) {
                    // The whole batch goes to a connection of its own, as it would to
                    // Redis: a command that pins sees what the commands before it did on
                    // that connection (`CLIENT REPLY OFF` then `QUIT` closes after the
                    // replies, as in Redis).
                    self.pin("batch").await?;
                }
                let bytes = &self.requests[end..end + frame.len];
                if frame.argc == 0 {
                    // No reply, but it uses up a CLIENT REPLY SKIP: the member must see it.
                    if self.upstream.is_some() {
                        self.record(Kind::Empty, &[], None, None);
                    }
                    end += frame.len;
                    continue;
                }
                if frame.inline {
                    // An inline command goes out as multibulk: rewrite it in place, then
                    // scan it again. Rare (people typing), so the copy does not matter.
                    let args = request::args(bytes, true);
                    self.replace_frame(end, frame.len, &args);
                    continue;
                }
                let name = &bytes[frame.name.clone()];
                let policy = !std::mem::take(&mut screened)
                    && !self.ctx.rules.is_empty()
                    && self.ctx.rules.concerns(name, &self.standing);
                if policy {
                    let args = request::args(bytes, false);
                    self.standing.in_multi = self.ledger.in_transaction().0;
                    let (screen, counted) = self.ctx.rules.screen(&args, &mut self.standing);
                    let answer = match screen {
                        Screen::Pass => None,
                        Screen::Answer(reply) => Some(Local::Reply(reply, counted)),
                        Screen::Reset => Some(Local::Reset),
                        Screen::Rewrite { args, answer } => {
                            // Rewritten only when it goes out now. A command that waits (or
                            // that a lost transaction answers) stays as the client wrote it,
                            // to be screened again, the same way, when it can go.
                            let kind = self.kind_of(&args[0]);
                            if self.upstream.is_none()
                                || held
                                || self.answers_locally(kind)
                                || self.must_pin(kind)
                            {
                                Some(Local::Kind(kind))
                            } else {
                                self.count(counted);
                                self.replace_frame(end, frame.len, &args);
                                screened = true;
                                refused = answer.map(Vec::into_boxed_slice);
                                continue;
                            }
                        }
                    };
                    if let Some(answer) = answer {
                        // Answered here, in order: send the batch before it first.
                        if end == 0 {
                            local = Some((frame.len, answer));
                        }
                        break;
                    }
                }
                let kind = self.kind_of(name);
                if self.upstream.is_none()
                    || self.answers_locally(kind)
                    || held
                    || self.must_pin(kind)
                {
                    // This command cannot join the batch: send the batch first.
                    if end == 0 {
                        local = Some((frame.len, Local::Kind(kind)));
                    }
                    break;
                }
                let retry = self.retry_bytes(kind, name, bytes);
                let args = needs_args(kind).then(|| request::args(bytes, false));
                let args = args.as_deref().unwrap_or_default();
                self.record(kind, args, retry, refused.take());
                end += frame.len;
                sent += 1;
            }
            if sent > 0 || end > 0 {
                let owed = self.ledger.in_flight().saturating_sub(owed_before);
                self.durations.sent(owed, Instant::now());
                // On a shared connection only plain commands go: one reply each (an empty
                // command owes none and counts in neither).
                self.send(end, sent, sent as usize, was_idle).await?;
            }
            if incomplete && end == 0 {
                return self.stream_request(was_idle).await;
            }
            let waits_for_local = local.is_some();
            let progressed = match local {
                Some((len, local)) => self.answer_locally(len, local).await?,
                None => end > 0,
            };
            if !progressed {
                self.stalled = waits_for_local;
                return Ok(());
            }
        }
    }

    /// The bytes a shared connection gave back unsent, if it did.
    fn take_unsent(&mut self) -> Option<Bytes> {
        match self.upstream.as_mut().map(|u| &mut u.link) {
            Some(Link::Shared(link)) => link.unsent.take(),
            _ => None,
        }
    }

    /// A shared connection failed before writing any of this session's owed commands: they
    /// never ran. They go back in front of what the client sent since, for the next member.
    fn unsend(&mut self, unsent: Bytes) {
        self.detach();
        self.ledger.reattached();
        let mut requests = BytesMut::from(&unsent[..]);
        requests.extend_from_slice(&self.requests);
        self.requests = requests;
        self.request_scanner = RequestScanner::default();
    }

    /// A strict switch, or a fence that closed, holds new commands.
    fn held(&self) -> bool {
        self.route_seen.paused || self.ctx.fence.as_ref().is_some_and(|f| !f.open())
    }

    /// Is the session on a shared connection, with a command that needs one of its own?
    /// Only plain commands share; anything that changes or reads the connection's state,
    /// opens a transaction, blocks or subscribes pins (`QUIT` is answered here).
    fn must_pin(&self, kind: Kind) -> bool {
        self.upstream.as_ref().is_some_and(Upstream::is_shared)
            && !matches!(kind, Kind::Plain | Kind::Ping)
    }

    /// On a shared connection, does a buffered complete command after the first (which is
    /// `first` bytes long, and handled as it comes) need a connection of its own? Looks at
    /// most 63 more commands.
    fn batch_needs_pin(&self, first: usize) -> bool {
        if !self.upstream.as_ref().is_some_and(Upstream::is_shared) {
            return false;
        }
        let mut scanner = RequestScanner::default();
        let mut at = first;
        for _ in 1..64 {
            let Ok(Some(frame)) = scanner.next(&self.requests[at..]) else {
                return false;
            };
            let name = &self.requests[at..at + frame.len][frame.name.clone()];
            if frame.argc > 0 && self.must_pin(self.kind_of(name)) {
                return true;
            }
            at += frame.len;
        }
        false
    }

    /// What a command is to the session, knowing the member's own command table.
    fn kind_of(&self, name: &[u8]) -> Kind {
        let kind = classify(name);
        let Some(upstream) = &self.upstream else {
            return kind;
        };
        match kind {
            // A module's blocking or pub/sub command: its replies cannot be counted.
            Kind::Plain if upstream.to.command_table().is_module_streaming(name) => Kind::Raw,
            k => k,
        }
    }

    /// The bytes of a read-only command, kept (with `retry_reads`) to re-send if its member
    /// fails before answering.
    fn retry_bytes(&self, kind: Kind, name: &[u8], bytes: &[u8]) -> Option<Bytes> {
        let upstream = self.upstream.as_ref()?;
        let read_only = || upstream.to.command_table().is_read_only(name);
        (self.ctx.retry_reads
            && matches!(kind, Kind::Plain | Kind::Ping)
            && !self.ledger.in_transaction().0
            && read_only())
        .then(|| Bytes::copy_from_slice(bytes))
    }

    /// Tells the ledger (and the timers) of a command about to be written.
    fn record(
        &mut self,
        kind: Kind,
        args: &[Vec<u8>],
        retry: Option<Bytes>,
        answer: Option<Box<[u8]>>,
    ) {
        if kind == Kind::Client {
            let sub = args.get(1).map(|a| a.to_ascii_uppercase());
            if matches!(sub.as_deref(), Some(b"NO-EVICT" | b"NO-TOUCH" | b"REPLY")) {
                self.sticky = true;
            }
        }
        let sent = self.ledger.sent(Command {
            kind,
            args,
            retry,
            answer,
        });
        if sent.raw {
            debug!("session relays raw from now on");
        }
        match sent.blocks {
            Some(Some(d)) => match block_deadline(Instant::now(), Some(d)) {
                Some(until) => {
                    self.blocked_until = Some(self.blocked_until.map_or(until, |u| u.max(until)))
                }
                None => self.blocked_forever = true,
            },
            Some(None) => self.blocked_forever = true,
            None => {}
        }
    }

    /// The command at the front is incomplete: stream what has arrived of it, if it is
    /// large and its arguments do not matter to the session.
    async fn stream_request(&mut self, was_idle: bool) -> Result<(), SessionError> {
        let available = self.request_scanner.streamable(self.requests.len());
        match self.streaming {
            Streaming::Sending => {}
            Streaming::Dropping => {
                self.requests.advance(available);
                self.request_scanner.drained(available);
                return Ok(());
            }
            Streaming::No => {
                let Some(name) = self.request_scanner.name() else {
                    return Ok(());
                };
                if self.requests.len() < STREAM_AFTER || self.upstream.is_none() {
                    return Ok(());
                }
                if self.upstream.as_ref().is_some_and(Upstream::is_shared) {
                    // A command streamed in pieces cannot share a connection.
                    if self.ledger.in_flight() > 0 || self.held() {
                        return Ok(());
                    }
                    self.pin("large").await?;
                    if self.upstream.as_ref().is_none_or(Upstream::is_shared) {
                        return Ok(());
                    }
                }
                let kind = self.kind_of(&self.requests[name]);
                if needs_args(kind) || kind != Kind::Plain || self.answers_locally(kind) {
                    return Ok(()); // held whole, up to the query buffer limit
                }
                let owed_before = self.ledger.in_flight();
                self.record(kind, &[], None, None);
                let owed = self.ledger.in_flight().saturating_sub(owed_before);
                self.durations.sent(owed, Instant::now());
                self.streaming = Streaming::Sending;
            }
        }
        if available == 0 {
            return Ok(());
        }
        self.request_scanner.drained(available);
        self.send(available, 0, 0, was_idle).await
    }

    /// Writes the first `end` buffered bytes (`n` commands, owing `replies`) to the upstream.
    async fn send(
        &mut self,
        end: usize,
        n: u64,
        replies: usize,
        was_idle: bool,
    ) -> Result<(), SessionError> {
        let Session {
            ctx,
            upstream,
            requests,
            route,
            route_seen,
            route_open,
            ..
        } = self;
        let Some(upstream) = upstream.as_mut() else {
            self.requests.advance(end);
            return Ok(());
        };
        let result = match &mut upstream.link {
            Link::Pinned(stream) => {
                let member = MemberWrite {
                    ctx,
                    idx: upstream.member,
                    member: &upstream.to,
                    route: route_open.then_some(route),
                    route_seen,
                };
                let written = member.write(stream, &requests[..end]).await;
                requests.advance(end);
                written
            }
            Link::Shared(link) => {
                // The batch leaves the request buffer without a copy.
                let batch = Batch {
                    bytes: requests.split_to(end).freeze(),
                    replies,
                    owner: link.owner.clone(),
                };
                match link.conn.send(batch) {
                    Ok(()) => Ok(()),
                    // Nothing else is owed: these never went out.
                    Err(batch) if self.ledger.in_flight() == replies => {
                        self.unsend(batch.bytes);
                        return Ok(());
                    }
                    Err(_) => Err((Signal::ConnectionLost, "shared connection closed".into())),
                }
            }
        };
        if let Some(c) = &self.commands {
            c.inc_by(n);
        }
        if was_idle {
            self.last_activity = Instant::now();
        }
        if let Err((signal, why)) = result {
            // Part of the batch may have reached the member: all of it is in flight.
            self.upstream_lost(signal, &why).await?;
        }
        Ok(())
    }

    /// Answers a command the proxy must answer itself (a transaction its member lost, no
    /// member available, the command policy). Returns false if it must wait (replies are
    /// owed first, or a member may still come).
    async fn answer_locally(&mut self, len: usize, local: Local) -> Result<bool, SessionError> {
        if self.ledger.in_flight() > 0 {
            return Ok(false); // local answers must follow the replies owed
        }
        let kind = match local {
            Local::Kind(kind) if self.must_pin(kind) && kind != Kind::Quit => {
                if !self.answers_locally(kind) && !self.held() {
                    if !self.answer_for_member(len, kind).await? {
                        self.pin(kind_label(kind)).await?;
                    }
                    return Ok(true);
                }
                kind
            }
            Local::Kind(kind) => kind,
            Local::Reply(reply, counted) => {
                self.requests.advance(len);
                self.count(counted);
                self.write_client(&reply).await?;
                return Ok(true);
            }
            Local::Reset => {
                // A fresh connection, as RESET makes it, unauthenticated: the next
                // upstream is opened once the client has authenticated again.
                self.requests.advance(len);
                self.ledger = Ledger::default();
                self.broken = None;
                self.standing = Standing::default();
                self.detach();
                self.write_client(b"+RESET\r\n").await?;
                return Ok(true);
            }
        };
        let reply = match self.broken.take() {
            Some(broken) if broken.answers(kind) => {
                let (reply, rest) = broken.reply(kind, self.ledger.state().resp3);
                self.broken = rest;
                reply
            }
            other if kind == Kind::Quit => {
                // No member needed to say goodbye: answer as Redis does, then close.
                self.broken = other;
                self.client_eof = true;
                b"+OK\r\n".to_vec()
            }
            other => {
                self.broken = other;
                // No upstream: wait for a member, up to `unavailable_timeout`; not at all
                // once the router has said that no member is available.
                let waited = self.detached_since.map_or(Duration::ZERO, |t| t.elapsed());
                let route = self.route_seen;
                let none_available = route.member.is_none() && route.epoch > 0 && !route.paused;
                if waited < self.ctx.unavailable_timeout && !none_available && !route.standby {
                    return Ok(false);
                }
                self.ctx.metrics.unavailable_replies.inc();
                if route.standby { STANDBY } else { UNAVAILABLE }.to_vec()
            }
        };
        self.requests.advance(len);
        if kind == Kind::Quit {
            // Redis reads nothing after QUIT.
            self.requests.clear();
            self.request_scanner = RequestScanner::default();
        }
        self.write_client(&reply).await?;
        Ok(true)
    }

    /// Answers, as its member would, a command of a shared session that would otherwise
    /// pin: `CLIENT SETNAME` and `SETINFO` (the session keeps them, and they are replayed
    /// when it pins), and `AUTH` with credentials that an open shared connection has
    /// already proven (the member checks each credential once, on the shared connection
    /// opened for it; a session learns nothing of credentials it did not send). Returns
    /// whether it did.
    async fn answer_for_member(&mut self, len: usize, kind: Kind) -> Result<bool, SessionError> {
        let (Some(upstream), Some(pools)) = (&self.upstream, &self.pools) else {
            return Ok(false);
        };
        if !matches!(kind, Kind::Client | Kind::Auth) {
            return Ok(false);
        }
        let args = request::args(&self.requests[..len], false);
        if args.first().map(|name| classify(name)) != Some(kind) {
            return Ok(false); // rewritten by the policy: the member answers
        }
        let (member, idx) = (upstream.to.clone(), upstream.member);
        let mut proven = None;
        let change = match kind {
            Kind::Client => Change::attribute(&args, member.command_table().client_setinfo),
            _ => match Change::of(kind, &args) {
                Some(Change::Auth(credentials)) => {
                    let mut state = self.ledger.state().shareable();
                    state.auth = Some(credentials.clone());
                    proven = pools.open_shared(idx, &state);
                    proven.is_some().then_some(Change::Auth(credentials))
                }
                _ => None,
            },
        };
        let Some(change) = change else {
            return Ok(false);
        };
        self.ledger.accepted_locally(change);
        if let Some(conn) = proven {
            // Its connection state changed: the shared connection of its new credentials.
            let mut shared = Upstream::shared(&member, idx, conn);
            shared.count_in(self.ctx.metrics.sessions_shared.clone());
            self.upstream = Some(shared);
        }
        self.requests.advance(len);
        self.write_client(b"+OK\r\n").await?;
        Ok(true)
    }

    /// Replaces the command of `len` bytes at `at` in the request buffer with `args`, as
    /// multibulk (an inline command, or one the policy rewrote). Rare: the copy is fine.
    fn replace_frame(&mut self, at: usize, len: usize, args: &[Vec<u8>]) {
        let mut encoded = Vec::new();
        request::encode_command(args, &mut encoded);
        let rest = self.requests.split_off(at + len);
        self.requests.truncate(at);
        self.requests.extend_from_slice(&encoded);
        self.requests.extend_from_slice(&rest);
    }

    /// Counts what the policy refused.
    fn count(&self, counted: Option<policy::Counted>) {
        match counted {
            Some(policy::Counted::Denied(name)) => self.ctx.metrics.denied(&name),
            Some(policy::Counted::WrongPassword) => self.ctx.metrics.auth_failures.inc(),
            None => {}
        }
    }

    /// Does the proxy answer this command itself (a transaction the member lost)?
    fn answers_locally(&self, kind: Kind) -> bool {
        self.broken.as_ref().is_some_and(|b| b.answers(kind))
    }

    /// Streams the member's bytes to the client, telling the ledger of each complete frame.
    async fn forward_replies(&mut self) -> Result<(), SessionError> {
        let owed_before = self.ledger.in_flight();
        // Replies a shared connection handed over whole go out from its buffer; only the
        // start of an unfinished frame is kept (copied) for its rest to join.
        let delivered = std::mem::take(&mut self.delivered);
        let Session {
            reply_scanner,
            replies,
            ledger,
            ..
        } = self;
        let data: &[u8] = if delivered.is_empty() {
            replies
        } else {
            &delivered
        };
        // Replies the client gets in place of the member's (a refused command inside
        // MULTI): where they are in `data`, and what goes instead. Rare.
        let mut answered: Option<Vec<Replacement>> = None;
        let consumed = if ledger.raw() {
            data.len()
        } else {
            let mut unexpected = false;
            let mut refusals = 0;
            let oom = self.ctx.oom_refuses;
            let consumed = reply_scanner
                .scan(data, |reply| {
                    match ledger.frame(reply) {
                        Frame::Unexpected => unexpected = true,
                        Frame::Answered => {
                            if let Some(answer) = ledger.take_answer() {
                                let line = line_start(data, reply.end)..reply.end;
                                answered.get_or_insert_with(Vec::new).push((line, answer));
                            }
                        }
                        Frame::Reply | Frame::Push => {}
                    }
                    if reply.is_error() && cannot_serve(reply.error_head(), oom) {
                        refusals += 1;
                    }
                })
                .map_err(SessionError::MemberProtocol)?;
            if let (true, Some(u)) = (refusals > 0, &self.upstream) {
                u.to.refused(refusals);
            }
            if unexpected {
                self.ctx.metrics.protocol_errors.inc();
                warn!("a reply arrived that no command asked for; relaying raw from now on");
            }
            // A raw session forwards everything, even what the scanner could not place.
            if ledger.raw() {
                data.len()
            } else {
                consumed
            }
        };
        let done = owed_before.saturating_sub(self.ledger.in_flight());
        if done > 0 {
            self.durations.answered(done, Instant::now());
        }
        if self.ledger.in_flight() == 0 {
            self.blocked_until = None;
            self.blocked_forever = false;
        }
        let spliced;
        let out = match answered {
            None => &data[..consumed],
            Some(answered) => {
                spliced = splice(&data[..consumed], answered);
                &spliced[..]
            }
        };
        // Counted before the write, as in `write_client`: whoever has read these bytes sees
        // them counted.
        self.ctx.metrics.client_bytes_out.inc_by(out.len() as u64);
        let result = self.client.send(out).await;
        if delivered.is_empty() {
            self.replies.advance(consumed);
        } else {
            self.replies.extend_from_slice(&delivered[consumed..]);
        }
        result.map_err(SessionError::Client)?;
        // A slow client is not a slow member: the wait for the next reply starts now.
        self.last_activity = Instant::now();
        self.last_client_io = self.last_activity;
        Ok(())
    }

    /// The client is gone (or half-closed): once every complete command it sent is out,
    /// tell the member, which answers what it runs and then closes, as Redis does with a
    /// client that closed. Returns false when there is nothing left to wait for.
    async fn half_close_upstream(&mut self) -> bool {
        if self.ledger.in_flight() == 0 && self.streaming != Streaming::Sending {
            return false;
        }
        let Some(upstream) = self.upstream.as_mut() else {
            return false;
        };
        let Link::Pinned(stream) = &mut upstream.link else {
            return true; // a shared connection stays: wait for this session's replies
        };
        if !self.upstream_shut {
            self.upstream_shut = true;
            if let Err(e) = stream.shutdown().await {
                debug!(error = %e, "cannot shut the upstream's write side");
                return false;
            }
        }
        true
    }

    async fn write_client(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.last_client_io = Instant::now();
        self.ctx.metrics.client_bytes_out.inc_by(bytes.len() as u64);
        self.client.send(bytes).await.map_err(SessionError::Client)
    }

    /// Gives back buffer memory that one big frame made grow. (Not every empty buffer: that
    /// would be a free and an allocation per command. A session that has not read yet
    /// holds none, see [`Stream::read_when_ready`].)
    fn shrink_buffers(&mut self) {
        if self.requests.is_empty() && self.requests.capacity() > SHRINK_ABOVE {
            self.requests = BytesMut::new();
        }
        if self.replies.is_empty() && self.replies.capacity() > SHRINK_ABOVE {
            self.replies = BytesMut::new();
        }
    }
}

/// The reply to a command when no member is available.
const UNAVAILABLE: &[u8] = b"-UNAVAILABLE geoproxy: no member available\r\n";
/// The reply to a command sent to a standby proxy (centralized mode).
const STANDBY: &[u8] =
    b"-UNAVAILABLE geoproxy: this proxy is a standby; the active proxy serves (centralized mode)\r\n";

/// A write to the session's member, and what may cut it short.
struct MemberWrite<'a> {
    ctx: &'a Context,
    idx: MemberIdx,
    member: &'a Member,
    /// The route, while the router publishes.
    route: Option<&'a mut watch::Receiver<Route>>,
    route_seen: &'a mut Route,
}

impl MemberWrite<'_> {
    /// Writes all of `buf`. A member that takes nothing for `reply_timeout` is suspected
    /// (reported, and the write goes on, as the wait for a slow reply does); the write ends
    /// early only when the route leaves the member because it is down.
    async fn write(self, stream: &mut Stream, buf: &[u8]) -> Result<(), (Signal, String)> {
        // Fast path: the socket takes the whole batch at once, and no timer is needed.
        let written = match stream.try_write(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err((Signal::ConnectionLost, e.to_string())),
        };
        if written == buf.len() && stream.try_flush() {
            return Ok(());
        }
        let member = self.member;
        let mut write = std::pin::pin!(stream.send(&buf[written..]));
        let mut route = self.route;
        loop {
            tokio::select! {
                r = &mut write => {
                    return r.map_err(|e| (Signal::ConnectionLost, e.to_string()));
                }
                _ = tokio::time::sleep(self.ctx.reply_timeout) => {
                    debug!(member = member.id(), "member takes no data; asking for a probe");
                    member.evidence.report(Signal::ReplyTimeout);
                }
                changed = changed(route.as_deref_mut()) => {
                    if !changed {
                        route = None; // the router is gone: keep writing
                        continue;
                    }
                    if let Some(r) = route.as_deref_mut() {
                        *self.route_seen = *r.borrow_and_update();
                    }
                    if moving::left_down(*self.route_seen, self.idx, member) {
                        return Err((Signal::MemberDown, "the route left it".into()));
                    }
                }
            }
        }
    }
}

/// Waits for a new route; false when the router is gone.
async fn changed(route: Option<&mut watch::Receiver<Route>>) -> bool {
    match route {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

async fn wait_verdict(verdict: Option<&mut AwaitingVerdict>) -> bool {
    match verdict {
        Some(v) => v.verdict().await,
        None => std::future::pending().await,
    }
}

/// Reads the member's next bytes into `buf`; from a shared connection, into `delivered`
/// when `buf` is empty (no copy).
async fn read_upstream(
    upstream: Option<&mut Upstream>,
    buf: &mut BytesMut,
    delivered: &mut Bytes,
) -> io::Result<usize> {
    let Some(u) = upstream else {
        return std::future::pending().await;
    };
    match &mut u.link {
        Link::Pinned(stream) => stream.read_when_ready(buf, REPLY_READ_SIZE).await,
        Link::Shared(link) => match link.inbox.recv().await {
            Some(Delivery::Replies(bytes)) => {
                let n = bytes.len();
                if buf.is_empty() {
                    *delivered = bytes;
                } else {
                    buf.extend_from_slice(&bytes);
                }
                Ok(n)
            }
            Some(Delivery::Lost(why)) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, why)),
            Some(Delivery::NotSent(bytes)) => {
                link.unsent = Some(bytes);
                Err(io::ErrorKind::NotConnected.into())
            }
            // The session holds a sender of its own inbox: never closed while it reads.
            None => std::future::pending().await,
        },
    }
}

/// Bytes of a member's reply (a range of what was read) and what the client gets instead.
type Replacement = (Range<usize>, Box<[u8]>);

/// Where the line that ends at `end` (with its `\r\n`) starts in `data`: after the `\n`
/// before it. A simple error line is never forwarded in part, so it is whole in `data`.
fn line_start(data: &[u8], end: usize) -> usize {
    let body = &data[..end.saturating_sub(2)];
    body.iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1)
}

/// `data` with each range replaced by its bytes (ranges in order, not overlapping).
fn splice(data: &[u8], replacements: Vec<Replacement>) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut at = 0;
    for (range, bytes) in replacements {
        out.extend_from_slice(&data[at..range.start]);
        out.extend_from_slice(&bytes);
        at = range.end;
    }
    out.extend_from_slice(&data[at..]);
    out
}

/// The metric label of a command kind that made a shared session pin.
fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Select | Kind::Auth | Kind::Hello | Kind::Reset => "state",
        Kind::Client => "client",
        Kind::Multi | Kind::Exec | Kind::Discard => "transaction",
        Kind::Watch | Kind::Unwatch => "watch",
        Kind::Blocking(_) => "blocking",
        Kind::Subscribe(_) | Kind::Unsubscribe(_) => "pubsub",
        Kind::Monitor => "monitor",
        Kind::Raw => "raw",
        Kind::Quit | Kind::Empty | Kind::Plain | Kind::Ping => "other",
    }
}
