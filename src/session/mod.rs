//! One client connection and its pinned upstream: forwarding, reply accounting, session
//! state, and moving between members.
//!
//! The session forwards the client's bytes in batches (every complete command read at once
//! goes out in one write, so pipelines stay pipelines) and streams the member's replies back
//! as they arrive. It counts the replies owed ([`Pending`]), which is what makes a move safe:
//! a session with nothing owed, outside MULTI/WATCH and not in MONITOR ("quiescent") can
//! switch to a new upstream between two commands, after replaying its state there
//! (subscriptions included: a subscriber is subscribed on the new member before the old
//! connection is dropped).
//!
//! When the member fails, each command in flight gets its own `-OUTCOMEUNKNOWN` reply, in
//! order, and is never re-sent anywhere (a retried INCR would count twice once the CRDT
//! members merge). Commands not yet sent wait for the next member, up to
//! `unavailable_timeout`, then get `-UNAVAILABLE`.

pub mod state;

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::member::{MemberIdx, Members, Signal};
use crate::metrics::Metrics;
use crate::resp::command::{block_timeout, classify, Kind};
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{self, RequestScanner};
use crate::resp::ProtocolError;
use crate::router::Route;
use crate::upstream::{self, Upstream};
use state::{Change, SessionState};

/// Spare room kept in the reply buffer before each read: large reads keep big values fast.
const REPLY_READ_SIZE: usize = 64 * 1024;
/// Spare room kept in the request buffer before each read.
const REQUEST_READ_SIZE: usize = 16 * 1024;
/// While commands wait (for a member, or for replies before a local answer), stop reading
/// the client once this much is buffered: a client cannot make the proxy hold unbounded data.
const MAX_WAITING_BYTES: usize = 1024 * 1024;

/// What every session shares: the members, the metrics and the timeouts.
pub struct Context {
    pub members: Arc<Members>,
    pub metrics: Metrics,
    pub reply_timeout: Duration,
    pub unavailable_timeout: Duration,
    pub connect_timeout: Duration,
    /// `failover.retry_reads`: in-flight read-only commands go to the new member.
    pub retry_reads: bool,
}

/// A command sent to the member whose reply has not arrived yet.
#[derive(Debug)]
struct Pending {
    /// Reply frames still owed: 1, or one per name for a RESP2 (P|S)(UN)SUBSCRIBE.
    owed: usize,
    /// Sent while subscribed (or a subscription command): in RESP2, a `message` array
    /// arriving while it is first in line is a message, not its reply.
    pubsub: bool,
    /// A (P|S)(UN)SUBSCRIBE counted in RESP2 confirmations. If HELLO 3 went ahead of it
    /// in the same pipeline, its confirmations arrive as pushes and still count.
    subscription: bool,
    /// State to apply when the member accepts the command.
    change: Option<Change>,
    /// A read-only command's bytes, kept (with `retry_reads`) to re-send if its member
    /// fails before answering.
    retry: Option<Bytes>,
}

/// A transaction the member lost when it failed; answered by the proxy until it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Broken {
    /// The member failed inside MULTI: queued commands are gone, EXEC must fail.
    Multi { member: String },
    /// The member failed while keys were WATCHed: the transaction must not run.
    /// `queuing` once the client sent MULTI (the proxy answers `+QUEUED`).
    Watch { queuing: bool },
}

/// What `CLIENT REPLY` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    /// The next command gets no reply.
    Skip,
}

/// The mode a `CLIENT REPLY ON|OFF|SKIP` command asks for (arguments, name first).
fn client_reply(args: &[Vec<u8>]) -> Option<ReplyMode> {
    let [_, sub, mode] = args else {
        return None;
    };
    if !sub.eq_ignore_ascii_case(b"REPLY") {
        return None;
    }
    let modes: [(&[u8], ReplyMode); 3] = [
        (b"ON", ReplyMode::On),
        (b"OFF", ReplyMode::Off),
        (b"SKIP", ReplyMode::Skip),
    ];
    modes
        .into_iter()
        .find_map(|(name, m)| mode.eq_ignore_ascii_case(name).then_some(m))
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("client connection: {0}")]
    Client(#[source] io::Error),
    #[error("member sent malformed RESP: {0}")]
    MemberProtocol(ProtocolError),
    #[error("member {0} failed in the middle of a reply or a subscription")]
    Unrecoverable(String),
}

/// Events the session waits for.
enum Event {
    ClientRead(io::Result<usize>),
    UpstreamRead(io::Result<usize>),
    RouteChanged,
    Timer,
    Shutdown,
}

pub struct Session {
    ctx: Arc<Context>,
    client: TcpStream,
    route: watch::Receiver<Route>,
    /// The route as last read from `route`.
    route_seen: Route,
    upstream: Option<Upstream>,
    /// The member of the last upstream, kept after it failed: attaching elsewhere is a move.
    last_member: Option<MemberIdx>,
    /// Command counter of the current upstream's member.
    commands: Option<IntCounter>,
    state: SessionState,
    pending: VecDeque<Pending>,
    requests: BytesMut,
    request_scanner: RequestScanner,
    replies: BytesMut,
    reply_scanner: ReplyScanner,
    /// In MULTI (sent, not yet ended by EXEC/DISCARD).
    multi: bool,
    /// Keys WATCHed (outside MULTI).
    watching: bool,
    /// Session-state changes queued inside MULTI.
    queued: Vec<Change>,
    /// CLIENT REPLY mode: whether the member answers.
    reply_mode: ReplyMode,
    broken: Option<Broken>,
    /// In MONITOR: the member streams without being asked, replies are no longer counted,
    /// and the session stays on its member until it fails.
    passthrough: bool,
    /// `replies` holds bytes to forward that no read announced (after a move).
    replies_waiting: bool,
    /// QUIT was sent: close once it is answered.
    quitting: bool,
    /// Malformed input from the client: answered and closed once earlier replies are out.
    protocol_error: Option<ProtocolError>,
    /// Complete commands are buffered that cannot go out yet.
    stalled: bool,
    /// When the session last had no upstream (or `None` while it has one).
    detached_since: Option<Instant>,
    /// The member whose connection failed, and the route epoch then: not retried under the
    /// same route before `unavailable_timeout` has passed.
    failed: Option<(MemberIdx, u64)>,
    /// Last progress on the upstream: a write while nothing was owed, or any read.
    last_activity: Instant,
    /// Blocking commands owed: their replies may take as long as they say.
    blocked_until: Option<Instant>,
    blocked_forever: bool,
    timer: Pin<Box<Sleep>>,
    /// Where `timer` is set; `None` once it fired.
    timer_at: Option<Instant>,
    /// The session has a deadline, so the timer branch is polled.
    timer_enabled: bool,
}

impl Session {
    pub fn new(ctx: Arc<Context>, client: TcpStream, route: watch::Receiver<Route>) -> Session {
        let now = Instant::now();
        let mut route = route;
        let route_seen = *route.borrow_and_update();
        Session {
            ctx,
            client,
            route,
            route_seen,
            upstream: None,
            last_member: None,
            commands: None,
            state: SessionState::default(),
            pending: VecDeque::new(),
            requests: BytesMut::new(),
            request_scanner: RequestScanner::default(),
            replies: BytesMut::new(),
            reply_scanner: ReplyScanner::default(),
            multi: false,
            watching: false,
            queued: Vec::new(),
            reply_mode: ReplyMode::On,
            broken: None,
            passthrough: false,
            replies_waiting: false,
            quitting: false,
            protocol_error: None,
            stalled: false,
            detached_since: Some(now),
            failed: None,
            last_activity: now,
            blocked_until: None,
            blocked_forever: false,
            timer: Box::pin(sleep_until(now)),
            timer_at: None,
            timer_enabled: false,
        }
    }

    /// Serves the client until it leaves, shutdown drains it, or an unrecoverable failure.
    pub async fn run(mut self, shutdown: CancellationToken) {
        match self.serve(shutdown).await {
            Ok(()) => {}
            Err(SessionError::Client(e)) => debug!(error = %e, "client connection closed"),
            Err(e @ SessionError::MemberProtocol(_)) => {
                self.ctx.metrics.protocol_errors.inc();
                warn!(error = %e, "closing session");
            }
            Err(e) => info!(error = %e, "closing session"),
        }
    }

    async fn serve(&mut self, shutdown: CancellationToken) -> Result<(), SessionError> {
        let mut draining = false;
        loop {
            self.follow_route().await;
            if std::mem::take(&mut self.replies_waiting) {
                self.forward_replies().await?;
            }
            self.forward_requests().await?;
            if self.pending.is_empty() {
                if let Some(e) = self.protocol_error.take() {
                    self.ctx.metrics.protocol_errors.inc();
                    let reply = format!("-ERR Protocol error: {e}\r\n");
                    let _ = self.client.write_all(reply.as_bytes()).await;
                    return Ok(());
                }
                if draining || self.quitting && self.upstream.is_none() {
                    return Ok(());
                }
            }
            self.arm_timer();
            let read_client = !draining
                && !self.quitting
                && self.protocol_error.is_none()
                && (!self.stalled || self.requests.len() < MAX_WAITING_BYTES);
            match self.next_event(read_client, draining, &shutdown).await {
                Event::ClientRead(Ok(0)) => return Ok(()),
                Event::ClientRead(Ok(_)) => {}
                Event::ClientRead(Err(e)) => return Err(SessionError::Client(e)),
                Event::UpstreamRead(Ok(0)) => {
                    self.upstream_lost(Signal::ConnectionLost, "connection closed")
                        .await?
                }
                Event::UpstreamRead(Ok(_)) => self.forward_replies().await?,
                Event::UpstreamRead(Err(e)) => {
                    self.upstream_lost(Signal::ConnectionLost, &e.to_string())
                        .await?
                }
                // `changed()` marked the new route seen: read it now.
                Event::RouteChanged => self.route_seen = *self.route.borrow_and_update(),
                Event::Timer => self.on_timer().await?,
                Event::Shutdown => draining = true,
            }
        }
    }

    async fn next_event(
        &mut self,
        read_client: bool,
        draining: bool,
        shutdown: &CancellationToken,
    ) -> Event {
        let Session {
            client,
            requests,
            upstream,
            replies,
            route,
            timer,
            timer_at,
            timer_enabled,
            ..
        } = self;
        if read_client && requests.capacity() - requests.len() < 1024 {
            requests.reserve(REQUEST_READ_SIZE);
        }
        if upstream.is_some() && replies.capacity() - replies.len() < 4096 {
            replies.reserve(REPLY_READ_SIZE);
        }
        // Biased: the data path is polled first, and when it is ready the control futures
        // (shared wake-up lists, each behind a lock) are not polled at all.
        tokio::select! {
            biased;
            r = read_upstream(upstream.as_mut(), replies) => Event::UpstreamRead(r),
            r = client.read_buf(requests), if read_client => Event::ClientRead(r),
            r = route.changed() => match r {
                Ok(()) => Event::RouteChanged,
                // The router is gone: only at shutdown.
                Err(_) => Event::Shutdown,
            },
            _ = timer.as_mut(), if *timer_enabled => {
                *timer_at = None;
                Event::Timer
            }
            _ = shutdown.cancelled(), if !draining => Event::Shutdown,
        }
    }

    /// Nothing owed and nothing that ties the session to its member.
    fn quiescent(&self) -> bool {
        self.pending.is_empty()
            && !self.multi
            && !self.watching
            && self.broken.is_none()
            && !self.passthrough
            && !self.quitting
            && !self.reply_scanner.mid_frame()
            && !self.state.tracking_redirected()
    }

    /// Moves to the route's member if the session can move now.
    async fn follow_route(&mut self) {
        // Only an atomic load when the route did not change (the common case).
        if self.route.has_changed().unwrap_or(false) {
            self.route_seen = *self.route.borrow_and_update();
        }
        let route = self.route_seen;
        let current = self.upstream.as_ref().map(|u| u.member);
        // A session with an upstream moves only when quiescent; one without has nothing
        // to keep.
        if route.member == current || (current.is_some() && !self.quiescent()) {
            return;
        }
        let Some(target) = route.member else {
            // No member available: stop using the old one (it is known down).
            self.detach();
            return;
        };
        if let Some((member, epoch)) = self.failed {
            let waited = self.detached_since.map_or(Duration::MAX, |t| t.elapsed());
            if member == target && epoch == route.epoch && waited < self.ctx.unavailable_timeout {
                return;
            }
        }
        let started = Instant::now();
        let member = self.ctx.members.get(target);
        match upstream::open(member, target, &self.state, self.ctx.connect_timeout).await {
            Ok(mut new) => {
                // A move: from a live upstream, or back on air after a failure elsewhere.
                // Any earlier upstream: its tracking state and invalidations are gone.
                let reattached = current.or(self.last_member).is_some();
                if let Some(old) = current.or(self.last_member).filter(|&m| m != target) {
                    self.ctx.metrics.sessions_moved.inc();
                    self.ctx
                        .metrics
                        .move_duration
                        .observe(started.elapsed().as_secs_f64());
                    debug!(
                        from = self.ctx.members.get(old).id(),
                        to = member.id(),
                        "session moved"
                    );
                }
                self.last_member = Some(target);
                self.commands = Some(self.ctx.metrics.commands(member.id()));
                self.replies = std::mem::take(&mut new.early);
                self.replies_waiting = !self.replies.is_empty();
                self.reply_scanner = ReplyScanner::default();
                self.upstream = Some(new);
                self.detached_since = None;
                self.failed = None;
                if reattached && self.state.tracking.is_some() && self.state.resp3 {
                    // Invalidations from the old member are gone: tell the client to drop
                    // its whole cache (an invalidation with a null key list).
                    if let Err(e) = self.client.write_all(INVALIDATE_ALL).await {
                        debug!(error = %e, "client connection closed");
                    }
                }
            }
            Err(e) => {
                if e.is_member_failure() {
                    member.report(Signal::ConnectFailed);
                }
                debug!(member = member.id(), error = %e, "cannot open upstream");
                self.failed = Some((target, route.epoch));
                if self.upstream.is_some() && route.member.is_some() {
                    // Keep the old upstream; try again at the next route change.
                } else {
                    self.detach();
                }
            }
        }
    }

    fn detach(&mut self) {
        self.upstream = None;
        self.commands = None;
        self.detached_since.get_or_insert_with(Instant::now);
    }

    /// Sends every complete buffered command that can go out now, in one write per batch;
    /// answers locally the ones the proxy must answer.
    async fn forward_requests(&mut self) -> Result<(), SessionError> {
        loop {
            self.stalled = false;
            let mut end = 0;
            let mut sent = 0u64;
            let mut local: Option<Local> = None;
            let was_idle = self.pending.is_empty();
            while self.protocol_error.is_none() && !self.quitting {
                let frame = match self.request_scanner.next(&self.requests[end..]) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        self.protocol_error = Some(e);
                        break;
                    }
                };
                let bytes = &self.requests[end..end + frame.len];
                if frame.argc == 0 {
                    end += frame.len; // Redis skips an empty command without a reply.
                    continue;
                }
                if frame.inline {
                    // An inline command goes out as multibulk: rewrite it in place, then
                    // scan it again. Rare (people typing), so the copy does not matter.
                    let mut encoded = Vec::new();
                    request::encode_command(&request::args(bytes, true), &mut encoded);
                    let rest = self.requests.split_off(end + frame.len);
                    self.requests.truncate(end);
                    self.requests.extend_from_slice(&encoded);
                    self.requests.extend_from_slice(&rest);
                    continue;
                }
                let name = &bytes[frame.name.clone()];
                let Some(upstream) = &self.upstream else {
                    if end == 0 {
                        local = Some(Local {
                            len: frame.len,
                            kind: classify(name),
                        });
                    }
                    break;
                };
                let table = self.ctx.members.get(upstream.member).command_table();
                let kind = match classify(name) {
                    // A module's blocking or pub/sub command: its replies cannot be counted,
                    // so the session treats it as MONITOR (stays, never timed).
                    Kind::Plain if table.is_module_streaming(name) => Kind::Monitor,
                    k => k,
                };
                let retry = (self.ctx.retry_reads
                    && kind == Kind::Plain
                    && !self.multi
                    && table.is_read_only(name))
                .then(|| Bytes::copy_from_slice(bytes));
                if self.answers_locally(kind) {
                    // This command cannot join the batch: send the batch first.
                    if end == 0 {
                        local = Some(Local {
                            len: frame.len,
                            kind,
                        });
                    }
                    break;
                }
                let args = needs_args(kind).then(|| request::args(bytes, false));
                self.sending(kind, args.as_deref(), retry);
                end += frame.len;
                sent += 1;
            }
            let local_waiting = local.is_some();
            if sent > 0 {
                self.send(end, sent, was_idle).await?;
            } else if end > 0 {
                self.requests.advance(end);
            }
            let progressed = match local {
                Some(cmd) => self.handle_local(cmd).await?,
                None => end > 0,
            };
            if !progressed {
                self.stalled = local_waiting;
                return Ok(());
            }
        }
    }

    /// Writes the first `end` buffered bytes (`n` commands) to the upstream.
    async fn send(&mut self, end: usize, n: u64, was_idle: bool) -> Result<(), SessionError> {
        let Some(upstream) = self.upstream.as_mut() else {
            return Ok(());
        };
        let result = write_to_member(
            &mut upstream.stream,
            &self.requests[..end],
            self.ctx.reply_timeout,
        )
        .await;
        self.requests.advance(end);
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

    /// Records a command about to be forwarded: reply owed, state change, transaction flags.
    /// `args` (name first) are given when [`needs_args`] says so.
    fn sending(&mut self, kind: Kind, args: Option<&[Vec<u8>]>, retry: Option<Bytes>) {
        let args = args.unwrap_or_default();
        let mut pending = Pending {
            owed: 1,
            pubsub: false,
            subscription: false,
            change: None,
            retry,
        };
        // CLIENT REPLY OFF/SKIP: the member will not answer, so no reply is owed.
        let mut replies_on = match self.reply_mode {
            ReplyMode::On => true,
            ReplyMode::Off => false,
            ReplyMode::Skip => {
                self.reply_mode = ReplyMode::On;
                false
            }
        };
        if kind == Kind::Client {
            if let Some(mode) = client_reply(args) {
                // ON is answered `+OK` even after OFF; OFF and SKIP are never answered.
                replies_on = mode == ReplyMode::On;
                if !(mode == ReplyMode::Skip && self.reply_mode == ReplyMode::Off) {
                    self.reply_mode = mode;
                }
                self.state.reply_off = self.reply_mode == ReplyMode::Off;
            }
        }
        match kind {
            Kind::Plain => {}
            Kind::Multi => {
                self.multi = true;
                self.queued.clear();
            }
            Kind::Exec | Kind::Discard => {
                if kind == Kind::Exec && !self.queued.is_empty() {
                    pending.change = Some(Change::Many(std::mem::take(&mut self.queued)));
                }
                self.queued.clear();
                self.multi = false;
                self.watching = false;
            }
            Kind::Watch if !self.multi => self.watching = true,
            Kind::Unwatch if !self.multi => self.watching = false,
            Kind::Blocking(how) if !self.multi => match block_timeout(how, args) {
                Some(Some(d)) => {
                    let until = Instant::now() + d;
                    self.blocked_until = Some(self.blocked_until.map_or(until, |u| u.max(until)));
                }
                Some(None) => self.blocked_forever = true,
                None => {}
            },
            Kind::Subscribe(sub) if !self.multi => {
                let names = args.get(1..).unwrap_or_default();
                // RESP2: one confirmation per name (no name: an error); RESP3: pushes.
                pending.owed = if self.state.resp3 {
                    0
                } else {
                    names.len().max(1)
                };
                self.state.subscribe(sub, names);
                pending.pubsub = true;
                pending.subscription = true;
            }
            Kind::Unsubscribe(sub) if !self.multi => {
                let names = args.get(1..).unwrap_or_default();
                // RESP2: one confirmation per name, or per current subscription (at least
                // one) when none is named; RESP3: pushes.
                let all = self.state.subscription_count(sub).max(1);
                pending.owed = match (self.state.resp3, names.len()) {
                    (true, _) => 0,
                    (false, 0) => all,
                    (false, n) => n,
                };
                self.state.unsubscribe(sub, names);
                pending.pubsub = true;
                pending.subscription = true;
            }
            Kind::Monitor if !self.multi => {
                // Replies are no longer counted from here on (nor timed).
                self.passthrough = true;
                self.pending.clear();
            }
            Kind::Quit => self.quitting = true,
            Kind::Reset => {
                self.queued.clear();
                self.reply_mode = ReplyMode::On;
                self.multi = false;
                self.watching = false;
                self.broken = None;
                pending.change = Some(Change::Reset);
            }
            k if Change::possible(k) => {
                let change = Change::of(k, args);
                if self.multi {
                    // Takes effect only if EXEC runs the transaction.
                    self.queued.extend(change);
                } else {
                    pending.change = change;
                }
            }
            _ => {}
        }
        if self.passthrough {
            return;
        }
        pending.pubsub |= self.state.subscribed();
        if !replies_on {
            pending.owed = 0;
        }
        if pending.owed > 0 {
            self.pending.push_back(pending);
        } else if let Some(change) = pending.change {
            // No reply will confirm it: take the member's acceptance for granted.
            self.state.apply(change);
        }
    }

    /// Does the proxy answer this command itself (a transaction the member lost)?
    fn answers_locally(&self, kind: Kind) -> bool {
        match &self.broken {
            None => false,
            Some(Broken::Multi { .. }) => !matches!(kind, Kind::Reset | Kind::Quit),
            Some(Broken::Watch { queuing: true }) => !matches!(kind, Kind::Reset | Kind::Quit),
            Some(Broken::Watch { queuing: false }) => matches!(
                kind,
                Kind::Multi | Kind::Exec | Kind::Discard | Kind::Watch | Kind::Unwatch
            ),
        }
    }

    /// Handles a command that cannot join a batch. Returns false if it must wait (replies
    /// are owed first, or no member is available yet).
    async fn handle_local(&mut self, cmd: Local) -> Result<bool, SessionError> {
        if !self.pending.is_empty() {
            return Ok(false); // local answers must follow the replies owed
        }
        let reply: Vec<u8> = if self.broken.is_some() && self.answers_locally(cmd.kind) {
            self.transaction_reply(cmd.kind)
        } else {
            // No upstream: wait for a member, up to `unavailable_timeout`.
            let waited = self.detached_since.map_or(Duration::ZERO, |t| t.elapsed());
            if waited < self.ctx.unavailable_timeout {
                return Ok(false);
            }
            self.ctx.metrics.unavailable_replies.inc();
            UNAVAILABLE.to_vec()
        };
        self.requests.advance(cmd.len);
        self.client
            .write_all(&reply)
            .await
            .map_err(SessionError::Client)?;
        Ok(true)
    }

    /// The proxy's answer inside a transaction the member lost (see [`Broken`]).
    fn transaction_reply(&mut self, kind: Kind) -> Vec<u8> {
        match (self.broken.clone(), kind) {
            (Some(Broken::Multi { member }), Kind::Exec) => {
                self.broken = None;
                format!("-EXECABORT Transaction discarded because member {member} failed (geoproxy)\r\n")
                    .into_bytes()
            }
            (Some(Broken::Multi { .. }), Kind::Multi) => {
                b"-ERR MULTI calls can not be nested\r\n".to_vec()
            }
            (Some(Broken::Multi { member }), _) if kind != Kind::Discard => format!(
                "-ERR geoproxy: transaction discarded because member {member} failed; EXEC will fail\r\n"
            )
            .into_bytes(),
            (Some(Broken::Watch { queuing: false }), Kind::Multi) => {
                self.broken = Some(Broken::Watch { queuing: true });
                b"+OK\r\n".to_vec()
            }
            (Some(Broken::Watch { queuing: true }), Kind::Exec) => {
                // A WATCHed key may have changed unseen: abort, as Redis does when one did.
                self.broken = None;
                if self.state.resp3 {
                    b"_\r\n".to_vec()
                } else {
                    b"*-1\r\n".to_vec()
                }
            }
            (Some(Broken::Watch { queuing: true }), Kind::Multi) => {
                b"-ERR MULTI calls can not be nested\r\n".to_vec()
            }
            (Some(Broken::Watch { queuing: true }), Kind::Discard)
            | (Some(Broken::Watch { queuing: false }), Kind::Unwatch) => {
                self.broken = None;
                b"+OK\r\n".to_vec()
            }
            (Some(Broken::Watch { queuing: false }), Kind::Exec | Kind::Discard) => {
                self.broken = None;
                let name = if kind == Kind::Exec { "EXEC" } else { "DISCARD" };
                format!("-ERR {name} without MULTI\r\n").into_bytes()
            }
            (Some(Broken::Watch { queuing: true }), _) => b"+QUEUED\r\n".to_vec(),
            // WATCH of more keys while the earlier watch is lost: it stays lost.
            (Some(Broken::Watch { queuing: false }), _) => b"+OK\r\n".to_vec(),
            // DISCARD after a lost MULTI.
            (_, _) => {
                self.broken = None;
                b"+OK\r\n".to_vec()
            }
        }
    }

    /// Streams the member's bytes to the client, settling each complete reply.
    async fn forward_replies(&mut self) -> Result<(), SessionError> {
        let Session {
            reply_scanner,
            replies,
            pending,
            state,
            passthrough,
            ..
        } = self;
        let mut unexpected = false;
        let consumed = reply_scanner
            .scan(replies, |reply| {
                if *passthrough || reply.is_attribute() {
                    return;
                }
                let confirms =
                    reply.is_subscription() && pending.front().is_some_and(|p| p.subscription);
                if reply.is_push() && !confirms {
                    return;
                }
                // RESP2 pub/sub messages look like replies: only the context tells them apart.
                if reply.is_message() && pending.front().is_none_or(|p| p.pubsub) {
                    return;
                }
                let Some(front) = pending.front_mut() else {
                    unexpected = true;
                    return;
                };
                front.owed -= 1;
                if front.owed > 0 {
                    return;
                }
                if let Some(p) = pending.pop_front() {
                    if let (Some(change), false) = (p.change, reply.is_error() || reply.null) {
                        state.apply(change);
                    }
                }
            })
            .map_err(SessionError::MemberProtocol)?;
        if unexpected {
            return Err(SessionError::MemberProtocol(ProtocolError(
                "a reply arrived that no command asked for",
            )));
        }
        if self.pending.is_empty() {
            self.blocked_until = None;
            self.blocked_forever = false;
        }
        let result = self.client.write_all(&self.replies[..consumed]).await;
        self.replies.advance(consumed);
        result.map_err(SessionError::Client)?;
        // A slow client is not a slow member: the wait for the next reply starts now.
        self.last_activity = Instant::now();
        if self.quitting && self.pending.is_empty() {
            self.upstream = None; // QUIT answered: the member closes, so do we
        }
        Ok(())
    }

    /// The upstream failed: answer what was in flight, report the member, and detach.
    async fn upstream_lost(&mut self, signal: Signal, why: &str) -> Result<(), SessionError> {
        let Some(lost) = self.upstream.take() else {
            return Ok(());
        };
        let member = self.ctx.members.get(lost.member);
        let id = member.id().to_string();
        self.commands = None;
        if self.quitting {
            return Ok(()); // the member closed after QUIT, or died then: either way, done
        }
        let idle = self.pending.is_empty() && !self.multi && !self.watching && !self.passthrough;
        if idle && signal == Signal::ConnectionLost {
            // Nothing was owed: an idle connection closed (the member's `timeout`, CLIENT
            // KILL). Reconnect quietly; a dead member shows on that connect. Tracking that
            // redirects to another connection's id cannot follow: close, as on a failure.
            debug!(member = %id, why, "idle upstream closed");
            if self.state.tracking_redirected() {
                self.ctx.metrics.sessions_lost.inc();
                return Err(SessionError::Unrecoverable(id));
            }
            self.detach();
            return Ok(());
        }
        member.report(signal);
        if self.retry_in_flight_reads() {
            info!(member = %id, why, "member failed; in-flight reads go to the next member");
            self.detach_after_failure(lost.member);
            return Ok(());
        }
        if self.passthrough || self.reply_scanner.mid_frame() || self.state.tracking_redirected() {
            self.ctx.metrics.sessions_lost.inc();
            return Err(SessionError::Unrecoverable(id));
        }
        let n: usize = self.pending.iter().map(|p| p.owed).sum();
        warn!(member = %id, why, inflight = n, "member failed with commands in flight");
        let reply = format!(
            "-OUTCOMEUNKNOWN geoproxy: member {id} failed before replying ({signal}); \
             the command may or may not have run and was not retried\r\n"
        );
        let mut out = Vec::with_capacity(reply.len() * n);
        for _ in 0..n {
            out.extend_from_slice(reply.as_bytes());
        }
        self.pending.clear();
        self.blocked_until = None;
        self.blocked_forever = false;
        self.ctx.metrics.inflight_errors(&id, n as u64);
        if n > 0 {
            self.ctx.metrics.sessions_interrupted.inc();
        }
        if self.multi {
            self.broken = Some(Broken::Multi { member: id.clone() });
        } else if self.watching {
            self.broken = Some(Broken::Watch { queuing: false });
        }
        self.multi = false;
        self.watching = false;
        self.detach_after_failure(lost.member);
        self.client
            .write_all(&out)
            .await
            .map_err(SessionError::Client)
    }

    /// With `retry_reads`, when every command in flight is read-only (and nothing of a
    /// reply has reached the client), puts them back in front of the unsent commands, to
    /// go to the next member. Returns whether it did.
    fn retry_in_flight_reads(&mut self) -> bool {
        let all_reads = !self.pending.is_empty() && self.pending.iter().all(|p| p.retry.is_some());
        let in_transaction = self.multi || self.watching;
        if !self.ctx.retry_reads || !all_reads || in_transaction || self.reply_scanner.mid_frame() {
            return false;
        }
        self.ctx
            .metrics
            .retried_reads
            .inc_by(self.pending.len() as u64);
        let mut again = BytesMut::new();
        for p in self.pending.drain(..) {
            again.extend_from_slice(&p.retry.unwrap_or_default());
        }
        again.extend_from_slice(&self.requests);
        self.requests = again;
        self.request_scanner = RequestScanner::default();
        self.blocked_until = None;
        self.blocked_forever = false;
        true
    }

    /// Forgets the failed upstream's reply stream and waits for the next member.
    fn detach_after_failure(&mut self, member: MemberIdx) {
        self.replies.clear();
        self.reply_scanner = ReplyScanner::default();
        self.failed = Some((member, self.route_seen.epoch));
        self.detached_since = Some(Instant::now());
    }

    /// When the session must wake up by itself: a reply overdue, or waiting commands due
    /// for `-UNAVAILABLE`.
    fn deadline(&self) -> Option<Instant> {
        if self.upstream.is_some() {
            if self.pending.is_empty() || self.blocked_forever || self.passthrough {
                return None;
            }
            let since = match self.blocked_until {
                Some(b) => b.max(self.last_activity),
                None => self.last_activity,
            };
            return Some(since + self.ctx.reply_timeout);
        }
        let since = self.detached_since?;
        self.stalled.then_some(since + self.ctx.unavailable_timeout)
    }

    /// Enables the timer when the session has a deadline. The timer is reset only when it
    /// would fire too late: an early firing just re-arms it, which keeps timer updates off
    /// the per-command path (a busy session resets it about once per `reply_timeout`).
    fn arm_timer(&mut self) {
        let Some(want) = self.deadline() else {
            self.timer_enabled = false;
            return;
        };
        self.timer_enabled = true;
        if self.timer_at.is_none_or(|at| at > want) {
            self.timer.as_mut().reset(want);
            self.timer_at = Some(want);
        }
    }

    async fn on_timer(&mut self) -> Result<(), SessionError> {
        let overdue = self.deadline().is_some_and(|d| d <= Instant::now());
        if overdue && self.upstream.is_some() {
            let timeout = self.ctx.reply_timeout;
            return self
                .upstream_lost(
                    Signal::ReplyTimeout,
                    &format!("no reply within {timeout:?}"),
                )
                .await;
        }
        Ok(()) // waiting commands are answered by forward_requests on the next turn
    }
}

/// Whether the session looks at a command's arguments (blocking timeouts, session state,
/// subscriptions).
fn needs_args(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Blocking(_) | Kind::Subscribe(_) | Kind::Unsubscribe(_)
    ) || Change::possible(kind)
}

/// A buffered command that could not join a batch.
struct Local {
    len: usize,
    kind: Kind,
}

/// RESP3 push telling a tracking client to flush its whole cache.
const INVALIDATE_ALL: &[u8] = b">2\r\n$10\r\ninvalidate\r\n_\r\n";

/// The reply to a command when no member is available.
const UNAVAILABLE: &[u8] = b"-UNAVAILABLE geoproxy: no member available\r\n";

/// Writes all of `buf` to a member, which must take it within `limit`: a member that stops
/// reading is hung, like one that stops answering.
async fn write_to_member(
    stream: &mut TcpStream,
    buf: &[u8],
    limit: Duration,
) -> Result<(), (Signal, String)> {
    // Fast path: the socket takes the whole batch at once, and no timer is needed.
    let written = match stream.try_write(buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err((Signal::ConnectionLost, e.to_string())),
    };
    if written == buf.len() {
        return Ok(());
    }
    match tokio::time::timeout(limit, stream.write_all(&buf[written..])).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err((Signal::ConnectionLost, e.to_string())),
        Err(_) => Err((
            Signal::ReplyTimeout,
            format!("member took no data for {limit:?}"),
        )),
    }
}

async fn read_upstream(upstream: Option<&mut Upstream>, buf: &mut BytesMut) -> io::Result<usize> {
    match upstream {
        Some(u) => u.stream.read_buf(buf).await,
        None => std::future::pending().await,
    }
}
