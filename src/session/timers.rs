//! The session's one timer and what it measures:
//! - **reply timeout**: silence from the member while a reply is owed (time since it last
//!   sent this session a byte, or since the first command of a burst went out whole), not
//!   the length of a reply; blocking commands are exempt for as long as their own timeout
//!   says, MONITOR and raw sessions always. It only *suspects* the member: the checker probes
//!   it, and the session keeps waiting unless the route leaves the member;
//! - **verdict**: how long to wait for the checker's word on a closed upstream;
//! - **unavailable timeout**: commands waiting for a member get `-UNAVAILABLE` after it;
//! - **move retry**: a failed connect to the route's member is tried again after a backoff;
//! - **client idle timeout** (`proxy.client_idle_timeout`, Redis's `timeout`).
//!
//! One `Sleep` is re-armed only when it would fire too late: an early firing just re-arms
//! it, which keeps timer updates off the per-command path.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use prometheus::local::LocalHistogram;
use prometheus::Histogram;

use tokio::time::{sleep_until, Instant, Sleep};

/// When the session must wake up by itself.
impl super::Session {
    pub(super) fn deadline(&self) -> Option<Instant> {
        let idle = self.idle_deadline();
        if self.upstream.is_some() {
            // Silence is not a hang when the member streams unasked, when the reply may wait
            // (blocking commands), or while the client is still sending a command.
            let owed = self.ledger.in_flight() > 0 && self.streaming == super::Streaming::No;
            let timed =
                owed && !self.blocked_forever && !self.ledger.raw() && !self.ledger.monitoring();
            let reply = timed.then(|| {
                // Silence since the last progress, the end of a block, or the last report.
                let since = [self.blocked_until, self.suspected_at]
                    .into_iter()
                    .flatten()
                    .fold(self.last_activity, Instant::max);
                since + self.ctx.reply_timeout
            });
            return earliest(reply, idle);
        }
        let verdict = self.verdict.as_ref().map(|v| v.until);
        let Some(since) = self.detached_since else {
            return earliest(verdict, idle);
        };
        let unavailable = self.stalled.then_some(since + self.ctx.unavailable_timeout);
        let retry = self
            .stalled
            .then_some(self.backoff.not_before.map(|(t, _)| t))
            .flatten();
        earliest(earliest(unavailable, retry), earliest(idle, verdict))
    }

    /// When an idle client is closed (`proxy.client_idle_timeout`): never while it is
    /// subscribed, blocked, in MONITOR or relayed raw, or while replies are owed, as Redis.
    fn idle_deadline(&self) -> Option<Instant> {
        let timeout = self.ctx.client_idle_timeout?;
        let exempt = self.ledger.in_flight() > 0
            || self.ledger.state().subscribed()
            || self.ledger.monitoring()
            || self.ledger.raw();
        (!exempt).then(|| self.last_client_io + timeout)
    }

    /// The timer fired. Returns true when the session must end (idle client).
    pub(super) async fn on_timer(&mut self) -> Result<bool, super::SessionError> {
        let now = Instant::now();
        if self.idle_deadline().is_some_and(|d| d <= now) {
            tracing::debug!("client idle timeout");
            return Ok(true);
        }
        if self.verdict.as_ref().is_some_and(|v| v.until <= now) {
            // No verdict in time: the member is treated as failed, and the route decides.
            tracing::debug!("no verdict on the closed upstream in time");
            self.verdict = None;
        }
        let reply_overdue = self.upstream.is_some()
            && self.ledger.in_flight() > 0
            && self.deadline().is_some_and(|d| d <= now);
        if reply_overdue {
            self.suspect_silence();
        }
        // Waiting commands are answered (or sent) by forward_requests on the next turn.
        Ok(false)
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Shortest and longest pause before connecting again to a member that just refused.
const MOVE_BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(1));

/// The timer of one session.
pub struct Timer {
    sleep: Pin<Box<Sleep>>,
    /// Where `sleep` is set; `None` once it fired.
    at: Option<Instant>,
    /// The session has a deadline, so the timer is polled.
    pub enabled: bool,
}

impl Timer {
    pub fn new(now: Instant) -> Timer {
        Timer {
            sleep: Box::pin(sleep_until(now)),
            at: None,
            enabled: false,
        }
    }

    /// Arms the timer for `want` (or disables it).
    pub fn arm(&mut self, want: Option<Instant>) {
        let Some(want) = want else {
            self.enabled = false;
            return;
        };
        self.enabled = true;
        if self.at.is_none_or(|at| at > want) {
            self.sleep.as_mut().reset(want);
            self.at = Some(want);
        }
    }

    /// Waits for the deadline (only polled while `enabled`).
    pub async fn fired(&mut self) {
        self.sleep.as_mut().await;
        self.at = None;
    }
}

/// The backoff between attempts to open an upstream on the same route.
#[derive(Debug, Default)]
pub struct Backoff {
    /// Not before this instant, under the route epoch given.
    pub not_before: Option<(Instant, u64)>,
    delay: Duration,
}

impl Backoff {
    /// An attempt under route `epoch` failed at `now`.
    pub fn failed(&mut self, now: Instant, epoch: u64) {
        self.delay = (self.delay * 2).clamp(MOVE_BACKOFF.0, MOVE_BACKOFF.1);
        self.not_before = Some((now + self.delay, epoch));
    }

    /// May the session try now, under route `epoch`? A new route is tried at once.
    pub fn ready(&self, now: Instant, epoch: u64) -> bool {
        self.not_before.is_none_or(|(t, e)| e != epoch || now >= t)
    }

    pub fn succeeded(&mut self) {
        *self = Backoff::default();
    }
}

/// When a blocking command may end, from its own timeout (`None`: forever). Checked: a
/// deadline past what an `Instant` holds is forever.
pub fn block_deadline(now: Instant, timeout: Option<Duration>) -> Option<Instant> {
    now.checked_add(timeout?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_a_new_route_resets_the_wait() {
        let now = Instant::now();
        let mut b = Backoff::default();
        assert!(b.ready(now, 1));
        b.failed(now, 1);
        assert!(!b.ready(now, 1));
        assert!(b.ready(now, 2), "a new route is tried at once");
        assert!(b.ready(now + Duration::from_millis(20), 1));
        b.failed(now, 1);
        assert!(!b.ready(now + Duration::from_millis(20), 1));
        for _ in 0..20 {
            b.failed(now, 1);
        }
        assert!(b.ready(now + Duration::from_secs(1), 1), "capped at 1 s");
        b.succeeded();
        assert!(b.ready(now, 1));
    }

    #[test]
    fn huge_block_timeouts_are_forever_not_a_panic() {
        let now = Instant::now();
        assert_eq!(block_deadline(now, Some(Duration::MAX)), None);
        assert!(block_deadline(now, Some(Duration::from_secs(1))).is_some());
    }
}

/// When each batch of commands went to the member, to time their replies
/// (`geoproxy_command_duration_seconds`): one reply is observed straight into the member's
/// histogram; several from one read are observed locally and flushed once (a flush adds
/// every bucket, which costs more than one observation).
#[derive(Default)]
pub struct Durations {
    /// (when, commands of the batch still owed a reply), oldest first.
    sent: VecDeque<(Instant, usize)>,
    histogram: Option<(Histogram, LocalHistogram)>,
}

impl Durations {
    /// A new upstream: time against its member's histogram.
    pub fn attach(&mut self, histogram: &Histogram) {
        self.detach();
        self.histogram = Some((histogram.clone(), histogram.local()));
    }

    /// No upstream: what is owed will not be answered by a member.
    pub fn detach(&mut self) {
        self.sent.clear();
        self.histogram = None;
    }

    /// `owed` more replies are owed for commands written at `now`.
    pub fn sent(&mut self, owed: usize, now: Instant) {
        if owed > 0 && self.histogram.is_some() {
            self.sent.push_back((now, owed));
        }
    }

    /// `done` commands, the oldest owed, got their replies by `now`.
    pub fn answered(&mut self, mut done: usize, now: Instant) {
        let Some((shared, local)) = &self.histogram else {
            return;
        };
        let one = done == 1;
        while done > 0 {
            let Some((at, owed)) = self.sent.front_mut() else {
                break;
            };
            let took = now.saturating_duration_since(*at).as_secs_f64();
            let n = done.min(*owed);
            for _ in 0..n {
                if one {
                    shared.observe(took);
                } else {
                    local.observe(took);
                }
            }
            *owed -= n;
            done -= n;
            if *owed == 0 {
                self.sent.pop_front();
            }
        }
        if !one {
            local.flush();
        }
    }
}

#[cfg(test)]
mod durations_tests {
    use super::*;

    #[test]
    fn each_command_is_timed_from_its_batch_to_its_reply() {
        let h = Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
        let mut d = Durations::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        d.sent(1, t0); // not attached: nothing is timed
        d.attach(&h);
        d.sent(2, t0);
        d.sent(1, t0 + ms(10));
        d.answered(2, t0 + ms(5));
        d.answered(1, t0 + ms(30));
        assert_eq!(h.get_sample_count(), 3);
        assert!((h.get_sample_sum() - (0.005 + 0.005 + 0.020)).abs() < 1e-9);
        // A member lost: what was owed is forgotten, not timed.
        d.sent(4, t0);
        d.detach();
        d.answered(4, t0 + ms(50));
        assert_eq!(h.get_sample_count(), 3);
    }
}
