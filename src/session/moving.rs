//! Moving a session between members, and what happens when its member fails.
//!
//! A session moves at a quiescent point (the ledger says so): it opens an upstream to the
//! route's member, replays its accepted state there (subscriptions included), then drops the
//! old one. When its member fails, each command in flight gets its own `-OUTCOMEUNKNOWN`
//! reply, in order, and is never re-sent anywhere (a retried INCR would count twice once the
//! CRDT members merge); commands not yet sent wait for the next member, up to
//! `unavailable_timeout`, then get `-UNAVAILABLE`.
//!
//! What a session sees is evidence, not a verdict: it reports it to the member's checker,
//! which probes on a fresh connection. When the member closed the session's connection, the
//! session waits for that verdict: a member confirmed down is left when the route leaves it;
//! a healthy member closed this one connection on purpose (`CLIENT KILL`, its `timeout`, its
//! output-buffer limits), and the client is closed too, as Redis would have closed it.

use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Session, SessionError, Streaming};
use crate::health::evidence::{Ticket, Verdict};
use crate::member::{Member, MemberIdx, Signal};
use crate::resp::reply::ReplyScanner;
use crate::resp::request::RequestScanner;
use crate::router::{Route, SessionOutcome};
use crate::upstream::{self, Link, Upstream};

/// RESP3 push telling a tracking client to flush its whole cache.
const INVALIDATE_ALL: &[u8] = b">2\r\n$10\r\ninvalidate\r\n_\r\n";

/// Longest wait for a verdict beyond the probe's own timeouts (the checker may be finishing
/// a periodic check first).
const VERDICT_SLACK: Duration = Duration::from_secs(1);

/// A member closed the session's upstream; the session waits to learn why.
pub(super) struct AwaitingVerdict {
    pub member: MemberIdx,
    ticket: Ticket,
    verdicts: watch::Receiver<Verdict>,
    /// No verdict by then: the member is treated as failed (the route decides).
    pub until: Instant,
}

/// Has the route left `member` because it is down (or evicted it, in a strict switch)?
/// Then what is in flight there will not be answered, and nobody waits for its reply
/// timeout.
pub(super) fn left_down(route: Route, idx: MemberIdx, member: &Member) -> bool {
    route.member != Some(idx) && (!member.is_up() || route.evict == Some(idx))
}

impl AwaitingVerdict {
    /// Resolves with `true` (healthy) or `false` (down) once the verdict covers the report.
    pub async fn verdict(&mut self) -> bool {
        loop {
            let v = *self.verdicts.borrow_and_update();
            if v.covers >= self.ticket {
                return v.healthy;
            }
            if self.verdicts.changed().await.is_err() {
                return std::future::pending().await; // checker gone: the deadline decides
            }
        }
    }
}

impl Session {
    /// Nothing owed and nothing that ties the session to its member connection.
    pub(super) fn quiescent(&self) -> bool {
        self.ledger.quiescent()
            && self.broken.is_none()
            && self.streaming == Streaming::No
            && !self.reply_scanner.mid_frame()
    }

    /// Does the session need a member connection now: a command to send, or state that
    /// listens (subscriptions, client-side caching)?
    fn needs_upstream(&self) -> bool {
        let state = self.ledger.state();
        !self.requests.is_empty() || state.subscribed() || state.tracking.is_some()
    }

    /// Moves to the route's member if the session can move now.
    pub(super) async fn follow_route(&mut self) -> Result<(), SessionError> {
        // Only an atomic load when the route did not change (the common case).
        if self.route_open && self.route.has_changed().unwrap_or(false) {
            self.route_seen = *self.route.borrow_and_update();
        }
        let route = self.route_seen;
        if let Some(Link::Shared(link)) = self.upstream.as_ref().map(|u| &u.link) {
            // A shared connection that closed while this session owed nothing: take
            // another at the next command.
            if !link.conn.alive() && self.ledger.in_flight() == 0 {
                self.detach();
            }
        }
        self.share_again();
        if let Some(old) = &self.upstream {
            // The route left a member that is down: what is in flight there will not be
            // answered, so the session does not wait for its reply timeout to leave.
            let left = left_down(route, old.member, &old.to);
            if left && !self.quiescent() && !self.client_eof {
                self.upstream_lost(Signal::MemberDown, "the route left it")
                    .await?;
            }
        }
        let current = self.upstream.as_ref().map(|u| u.member);
        // A session with an upstream moves only when quiescent; one without has nothing
        // to keep. A session whose client left (or sent QUIT), or that waits to learn why
        // its member closed its connection, does not move at all.
        let stays = current.is_some() && !self.quiescent();
        let waits = self.client_eof || self.ledger.quitting() || self.verdict.is_some();
        if route.member == current || stays || waits {
            return Ok(());
        }
        if current.is_none() && !self.needs_upstream() {
            // Lazy: no member connection before there is something to send (a load
            // balancer's TCP probe, an idle pool connection cost the member nothing). The
            // wait for a member counts from when there is.
            self.detached_since = Some(Instant::now());
            return Ok(());
        }
        let Some(target) = route.member else {
            // No member available: stop using the old one (it is known down).
            self.detach();
            return Ok(());
        };
        if let Some((member, epoch)) = self.failed {
            let waited = self.detached_since.map_or(Duration::MAX, |t| t.elapsed());
            if member == target && epoch == route.epoch && waited < self.ctx.unavailable_timeout {
                return Ok(());
            }
        }
        let now = Instant::now();
        let member = self.ctx.members.member(target);
        if !self.backoff.ready(now, route.epoch) || !member.is_up() {
            // A member found down a moment ago is still the route until the router
            // publishes the next one: wait for it.
            return Ok(());
        }
        if self.ctx.rules.users.is_some() && !self.standing.authenticated {
            return Ok(()); // proxy authentication: no member connection before it
        }
        let opened = match self.pools.clone() {
            Some(pools) if self.shareable_state() => {
                let conn = pools.shared(&member, target, &self.ledger.state().shareable());
                let timeout = self.ctx.connect_timeout;
                match tokio::time::timeout(timeout, conn.ready()).await {
                    Ok(Ok(())) => {
                        let mut shared = Upstream::shared(&member, target, conn);
                        shared.count_in(self.ctx.metrics.sessions_shared.clone());
                        Ok(shared)
                    }
                    Ok(Err(why)) => Err(upstream::UpstreamError::Io(std::io::Error::other(why))),
                    Err(_) => Err(upstream::UpstreamError::Timeout(
                        member.config.address.clone(),
                    )),
                }
            }
            // Boxed, here and in `pin`: connecting is rare and its future large, and a
            // session's future is as large as the largest thing it awaits (kept for every
            // idle session).
            Some(pools) => Box::pin(pools.pinned(&member, target, self.ledger.state())).await,
            None => {
                let login = member.login.as_deref();
                let state = self.ledger.state();
                let timeout = self.ctx.connect_timeout;
                Box::pin(upstream::open(&member, target, state, login, timeout)).await
            }
        };
        let opened = opened.map(|mut new| {
            if !new.is_shared() {
                new.count_in(self.ctx.metrics.member_connections(member.id(), "pinned"));
            }
            new
        });
        match opened {
            Ok(mut new) => {
                // A move: from a live upstream, or back on air after a failure elsewhere.
                let reattached = current.or(self.last_member).is_some();
                if let Some(old) = current.or(self.last_member).filter(|&m| m != target) {
                    self.ctx.metrics.sessions_moved.inc();
                    self.ctx.history.count(SessionOutcome::Moved, member.id());
                    self.ctx
                        .metrics
                        .move_duration
                        .observe(now.elapsed().as_secs_f64());
                    debug!(
                        from = self.ctx.members.member(old).id(),
                        to = member.id(),
                        "session moved"
                    );
                }
                self.backoff.succeeded();
                self.last_member = Some(target);
                self.commands = Some(self.ctx.metrics.commands(member.id()));
                self.durations
                    .attach(&self.ctx.metrics.command_duration(member.id()));
                self.replies = std::mem::take(&mut new.early);
                self.replies_waiting = !self.replies.is_empty();
                self.reply_scanner = ReplyScanner::default();
                self.ledger.reattached();
                self.upstream = Some(new);
                self.detached_since = None;
                self.failed = None;
                let state = self.ledger.state();
                if reattached && state.tracking.is_some() && state.resp3 {
                    // Invalidations from the old member are gone: tell the client to drop
                    // its whole cache (an invalidation with a null key list).
                    self.write_client(INVALIDATE_ALL).await?;
                }
            }
            Err(e) => {
                if e.is_member_failure() {
                    member.evidence.report(Signal::ConnectFailed);
                }
                debug!(member = member.id(), error = %e, "cannot open upstream");
                // Try again after the backoff, while the route says so: if the member is
                // down, the probe the report asked for moves the route; if it is healthy
                // (a reconnect storm), the next attempt gets through. A session with an
                // upstream keeps it meanwhile.
                self.backoff.failed(Instant::now(), route.epoch);
                if self.upstream.is_none() {
                    self.detach();
                }
            }
        }
        Ok(())
    }

    /// Nothing ties the session to a connection of its own: it may share.
    pub(super) fn shareable_state(&self) -> bool {
        let state = self.ledger.state();
        !self.sticky
            && !state.subscribed()
            && state.tracking.is_none()
            && !state.reply_off
            && !self.ledger.raw()
            && !self.ledger.monitoring()
    }

    /// A pinned session whose need for its own connection has passed goes back to sharing:
    /// its connection waits in the worker's idle pool for a session with the same state.
    fn share_again(&mut self) {
        let Some(pools) = self.pools.clone() else {
            return;
        };
        let Some(pinned) = self.upstream.as_ref() else {
            return;
        };
        let can = !pinned.is_shared()
            && self.route_seen.member == Some(pinned.member)
            && self.quiescent()
            && self.shareable_state()
            && self.replies.is_empty()
            && !self.replies_waiting
            && !self.client_eof
            && !self.upstream_shut
            && self.verdict.is_none()
            && self.blocked_until.is_none()
            && !self.blocked_forever;
        if !can {
            return;
        }
        let (member, idx) = (pinned.to.clone(), pinned.member);
        let state = self.ledger.state();
        let conn = pools.shared(&member, idx, &state.shareable());
        if !conn.is_ready() {
            return; // stays pinned until the shared connection is open
        }
        let Some(pinned) = self.upstream.take() else {
            return;
        };
        pools.put_idle(pinned, state);
        let mut shared = Upstream::shared(&member, idx, conn);
        shared.count_in(self.ctx.metrics.sessions_shared.clone());
        self.upstream = Some(shared);
    }

    /// The session is on a shared connection and its next command needs one of its own:
    /// take an idle one with its state, or open one. Nothing is owed when it is called.
    pub(super) async fn pin(&mut self, reason: &str) -> Result<(), SessionError> {
        let Some(pools) = self.pools.clone() else {
            return Ok(());
        };
        let Some(shared) = self.upstream.take() else {
            return Ok(());
        };
        self.ctx.metrics.pinned(reason);
        let (member, idx) = (shared.to.clone(), shared.member);
        drop(shared);
        match Box::pin(pools.pinned(&member, idx, self.ledger.state())).await {
            Ok(mut pinned) => {
                pinned.count_in(self.ctx.metrics.member_connections(member.id(), "pinned"));
                self.replies = std::mem::take(&mut pinned.early);
                self.replies_waiting = !self.replies.is_empty();
                self.reply_scanner = ReplyScanner::default();
                self.upstream = Some(pinned);
            }
            Err(e) => {
                if e.is_member_failure() {
                    member.evidence.report(Signal::ConnectFailed);
                }
                debug!(member = member.id(), error = %e, "cannot pin a connection");
                self.backoff.failed(Instant::now(), self.route_seen.epoch);
                self.detach();
            }
        }
        Ok(())
    }

    pub(super) fn detach(&mut self) {
        self.upstream = None;
        self.commands = None;
        self.durations.detach();
        self.detached_since.get_or_insert_with(Instant::now);
    }

    /// The member closed the upstream. After the client left or sent QUIT that is the
    /// expected end; otherwise the member failed (or closed this one connection).
    pub(super) async fn upstream_closed(&mut self) -> Result<(), SessionError> {
        if self.client_eof && self.upstream_shut {
            self.upstream = None;
            return Ok(());
        }
        self.upstream_lost(Signal::ConnectionLost, "connection closed")
            .await
    }

    /// The upstream failed: answer what was in flight, report the member, and detach.
    pub(super) async fn upstream_lost(
        &mut self,
        signal: Signal,
        why: &str,
    ) -> Result<(), SessionError> {
        let Some(lost) = self.upstream.take() else {
            return Ok(());
        };
        let id = lost.to.id().to_string();
        self.commands = None;
        self.durations.detach();
        if self.streaming == Streaming::Sending {
            self.streaming = Streaming::Dropping; // its tail never reaches a member
        }
        if self.ledger.quitting() && self.ledger.only_quit_in_flight() {
            // QUIT answered (or about to be): the member closes, and so does the session.
            return Ok(());
        }
        // A shared connection's task reported its own loss, once for all its sessions.
        if signal != Signal::MemberDown && !lost.is_shared() {
            self.report(lost.member, signal);
        }
        let idle = self.ledger.in_flight() == 0 && self.quiescent_after_loss();
        if idle && signal == Signal::ConnectionLost && !self.ledger.quitting() {
            // Nothing was owed: an idle connection closed. The verdict tells a member that
            // died from one that closed it on purpose. Tracking that redirects to another
            // connection's id cannot follow a move: close, as on a failure.
            debug!(member = %id, why, "idle upstream closed");
            if self.ledger.state().tracking_redirected() {
                self.ctx.metrics.sessions_lost.inc();
                self.ctx.history.count(SessionOutcome::Lost, &id);
                return Err(SessionError::Unrecoverable(id));
            }
            self.detach();
            return Ok(());
        }
        let (in_multi, watching) = self.ledger.in_transaction();
        let transaction = in_multi || watching;
        if self.ctx.retry_reads && !transaction && !self.reply_scanner.mid_frame() {
            if let Some(again) = self.ledger.take_retries() {
                info!(member = %id, why, "member failed; in-flight reads go to the next member");
                self.ctx.metrics.retried_reads.inc_by(again.len() as u64);
                let mut requests = BytesMut::new();
                again.iter().for_each(|b| requests.extend_from_slice(b));
                requests.extend_from_slice(&self.requests);
                self.requests = requests;
                self.request_scanner = RequestScanner::default();
                self.clear_blocked();
                self.detach_after_failure(lost.member);
                return Ok(());
            }
        }
        let uncountable = self.ledger.raw() || self.ledger.monitoring();
        if uncountable
            || self.reply_scanner.mid_frame()
            || self.ledger.state().tracking_redirected()
        {
            // MONITOR, a raw relay, or half a reply already forwarded: cannot be saved.
            self.ctx.metrics.sessions_lost.inc();
            self.ctx.history.count(SessionOutcome::Lost, &id);
            return Err(SessionError::Unrecoverable(id));
        }
        let quitting = self.ledger.quitting();
        let n = self.ledger.fail();
        warn!(member = %id, why, inflight = n, "member failed with commands in flight");
        let reply = format!(
            "-OUTCOMEUNKNOWN geoproxy: member {id} failed before replying ({signal}); \
             the command may or may not have run and was not retried\r\n"
        );
        self.clear_blocked();
        self.ctx.metrics.inflight_errors(&id, n as u64);
        if n > 0 {
            self.ctx.metrics.sessions_interrupted.inc();
            self.ctx.history.count(SessionOutcome::Interrupted, &id);
        }
        if !quitting {
            self.broken = super::transaction::Broken::lost(in_multi, watching, &id);
        }
        self.detach_after_failure(lost.member);
        self.write_client(reply.repeat(n).as_bytes()).await
    }

    /// Tells the member's checker what the session saw; a lost connection waits for the
    /// verdict (see [`AwaitingVerdict`]).
    fn report(&mut self, idx: MemberIdx, signal: Signal) {
        let member = self.ctx.members.member(idx);
        let evidence = &member.evidence;
        let verdicts = evidence.verdicts();
        let ticket = evidence.report(signal);
        if signal == Signal::ConnectionLost {
            let wait = self.ctx.probe_timeout + VERDICT_SLACK;
            self.verdict = Some(AwaitingVerdict {
                member: idx,
                ticket,
                verdicts,
                until: Instant::now() + wait,
            });
        }
    }

    /// The checker answered: a healthy member closed the connection on purpose, and the
    /// client is closed too; a member confirmed down is left as the route leaves it.
    pub(super) fn on_verdict(&mut self, healthy: bool) -> Result<(), SessionError> {
        let Some(awaited) = self.verdict.take() else {
            return Ok(());
        };
        let id = self.ctx.members.member(awaited.member).id().to_string();
        if healthy {
            return Err(SessionError::ClosedByMember(id));
        }
        debug!(member = %id, "member confirmed down; the session follows the route");
        Ok(())
    }

    /// The silence of the session's member passed `reply_timeout`: suspected, not failed.
    /// The checker probes; if the member is down the route leaves it and the session answers
    /// what is in flight at once; if not, the session keeps waiting for its (slow) reply.
    pub(super) fn suspect_silence(&mut self) {
        let Some((member, to)) = self.upstream.as_ref().map(|u| (u.member, u.to.clone())) else {
            return;
        };
        debug!(
            member = to.id(),
            "no reply within reply_timeout; asking for a probe"
        );
        self.suspected_at = Some(Instant::now());
        self.report(member, Signal::ReplyTimeout);
    }

    /// With nothing in flight, would the session still be tied to the lost connection?
    fn quiescent_after_loss(&self) -> bool {
        let (in_multi, watching) = self.ledger.in_transaction();
        !in_multi && !watching && !self.ledger.raw() && !self.ledger.monitoring()
    }

    pub(super) fn clear_blocked(&mut self) {
        self.blocked_until = None;
        self.blocked_forever = false;
    }

    /// Forgets the failed upstream's reply stream and waits for the next member.
    fn detach_after_failure(&mut self, member: MemberIdx) {
        self.replies.clear();
        self.reply_scanner = ReplyScanner::default();
        self.failed = Some((member, self.route_seen.epoch));
        self.detached_since = Some(Instant::now());
    }
}
