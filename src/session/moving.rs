//! Moving a session between members, and what happens when its member fails.
//!
//! A session moves at a quiescent point (the ledger says so): it opens an upstream to the
//! route's member, replays its accepted state there (subscriptions included), then drops the
//! old one. When its member fails, each command in flight gets its own `-OUTCOMEUNKNOWN`
//! reply, in order, and is never re-sent anywhere (a retried INCR would count twice once the
//! CRDT members merge); commands not yet sent wait for the next member, up to
//! `unavailable_timeout`, then get `-UNAVAILABLE`.

use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Session, SessionError, Streaming};
use crate::member::{MemberIdx, Signal};
use crate::resp::reply::ReplyScanner;
use crate::resp::request::RequestScanner;
use crate::upstream;

/// RESP3 push telling a tracking client to flush its whole cache.
const INVALIDATE_ALL: &[u8] = b">2\r\n$10\r\ninvalidate\r\n_\r\n";

impl Session {
    /// Nothing owed and nothing that ties the session to its member connection.
    pub(super) fn quiescent(&self) -> bool {
        self.ledger.quiescent()
            && self.broken.is_none()
            && self.streaming == Streaming::No
            && !self.reply_scanner.mid_frame()
    }

    /// Moves to the route's member if the session can move now.
    pub(super) async fn follow_route(&mut self) -> Result<(), SessionError> {
        // Only an atomic load when the route did not change (the common case).
        if self.route_open && self.route.has_changed().unwrap_or(false) {
            self.route_seen = *self.route.borrow_and_update();
        }
        let route = self.route_seen;
        if let Some(old) = self.upstream.as_ref().map(|u| u.member) {
            // The route left a member that is down: what is in flight there will not be
            // answered, so the session does not wait for its reply timeout to leave.
            let left_down = route.member != Some(old) && !self.ctx.members.get(old).is_up();
            if left_down && !self.quiescent() && !self.client_eof {
                self.upstream_lost(Signal::MemberDown, "the route left it")
                    .await?;
            }
        }
        let current = self.upstream.as_ref().map(|u| u.member);
        // A session with an upstream moves only when quiescent; one without has nothing
        // to keep. A session whose client left (or sent QUIT) does not move at all.
        let stays = current.is_some() && !self.quiescent();
        if route.member == current || stays || self.client_eof || self.ledger.quitting() {
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
        if !self.backoff.ready(now, route.epoch) {
            return Ok(());
        }
        let member = self.ctx.members.get(target);
        let opened = upstream::open(
            member,
            target,
            self.ledger.state(),
            self.ctx.connect_timeout,
        )
        .await;
        match opened {
            Ok(mut new) => {
                // A move: from a live upstream, or back on air after a failure elsewhere.
                let reattached = current.or(self.last_member).is_some();
                if let Some(old) = current.or(self.last_member).filter(|&m| m != target) {
                    self.ctx.metrics.sessions_moved.inc();
                    self.ctx
                        .metrics
                        .move_duration
                        .observe(now.elapsed().as_secs_f64());
                    debug!(
                        from = self.ctx.members.get(old).id(),
                        to = member.id(),
                        "session moved"
                    );
                }
                self.backoff.succeeded();
                self.last_member = Some(target);
                self.commands = Some(self.ctx.metrics.commands(member.id()));
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
                    member.report(Signal::ConnectFailed);
                }
                debug!(member = member.id(), error = %e, "cannot open upstream");
                self.backoff.failed(Instant::now(), route.epoch);
                if self.upstream.is_none() {
                    self.failed = Some((target, route.epoch));
                    self.detach();
                }
                // Else keep the old upstream and try again after the backoff.
            }
        }
        Ok(())
    }

    pub(super) fn detach(&mut self) {
        self.upstream = None;
        self.commands = None;
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
        let member = self.ctx.members.get(lost.member);
        let id = member.id().to_string();
        self.commands = None;
        if self.streaming == Streaming::Sending {
            self.streaming = Streaming::Dropping; // its tail never reaches a member
        }
        if self.ledger.quitting() && self.ledger.only_quit_in_flight() {
            // QUIT answered (or about to be): the member closes, and so does the session.
            return Ok(());
        }
        let idle = self.ledger.in_flight() == 0 && self.quiescent_after_loss();
        if idle && signal == Signal::ConnectionLost && !self.ledger.quitting() {
            // Nothing was owed: an idle connection closed (the member's `timeout`, CLIENT
            // KILL). Reconnect quietly; a dead member shows on that connect. Tracking that
            // redirects to another connection's id cannot follow: close, as on a failure.
            debug!(member = %id, why, "idle upstream closed");
            if self.ledger.state().tracking_redirected() {
                self.ctx.metrics.sessions_lost.inc();
                return Err(SessionError::Unrecoverable(id));
            }
            self.detach();
            return Ok(());
        }
        if signal != Signal::MemberDown {
            member.report(signal);
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
        }
        if !quitting {
            self.broken = super::transaction::Broken::lost(in_multi, watching, &id);
        }
        self.detach_after_failure(lost.member);
        self.write_client(reply.repeat(n).as_bytes()).await
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
