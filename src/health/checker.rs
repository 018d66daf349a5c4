//! The checker task of one member. It runs three things, one at a time:
//! - the periodic PING check (with jitter; soon again after a failure while the member is
//!   up, so `fall` failures take about one interval);
//! - the confirming probe, on a fresh connection, as soon as a session reports a passive
//!   signal: only a failed probe marks the member down, and its verdict answers every
//!   report made before it began;
//! - the error window, sampled every tenth of its length.
//!
//! It feeds [`Health`] and publishes flips.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::errors::ErrorWindow;
use super::ping::PingCheck;
use super::{Cause, Flip, Health, State};
use crate::config::HealthConfig;
use crate::member::{Member, MemberIdx, Members, Signal};
use crate::metrics::Metrics;

/// Probes one member until shutdown.
pub struct Checker {
    pub members: Arc<Members>,
    pub idx: MemberIdx,
    pub config: HealthConfig,
    pub metrics: Metrics,
}

impl Checker {
    pub async fn run(self, shutdown: CancellationToken) {
        let member = self.members.get(self.idx);
        let mut health = Health::new(self.config.rise, self.config.fall);
        let mut ping = PingCheck::new(&self.config);
        let mut errors = ErrorWindow::new(self.config.errors.clone());
        let commands = self.metrics.commands(member.id());
        let mut next_check = Instant::now();
        let mut next_sample = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = member.evidence.reported() => self.confirm(&mut health, &mut ping).await,
                _ = sleep_until(next_sample) => {
                    next_sample += errors.step();
                    let refusals = member.refusals();
                    self.metrics.refusals(member.id(), refusals);
                    if let Some(t) = errors.observe(Instant::now(), refusals, commands.get()) {
                        let why = format!(
                            "{} of {} replies said the member cannot serve",
                            t.errors, t.commands
                        );
                        member.record_error(why.clone());
                        if let Some(flip) = health.force_down() {
                            self.publish(flip, Some(Cause::Errors), &why);
                        }
                    }
                }
                _ = sleep_until(next_check) => {
                    let ok = self.check(&mut health, &mut ping).await;
                    let soon = !ok && health.state() == State::Up;
                    let wait = if soon { self.config.fast_interval } else { self.config.interval };
                    next_check = Instant::now() + jittered(wait);
                }
            }
        }
    }

    /// One periodic check; returns whether it passed.
    async fn check(&self, health: &mut Health, ping: &mut PingCheck) -> bool {
        let member = self.members.get(self.idx);
        let started = Instant::now();
        let result = ping.run(&member.config).await;
        self.record(member, started, &result);
        if let Some(flip) = health.observe(result.is_ok()) {
            let cause = (flip.to == State::Down).then_some(Cause::Check);
            let why = result.as_ref().err().map_or("check passed", |e| e.as_str());
            self.publish(flip, cause, why);
        }
        if result.is_ok() && !member.knows_commands() {
            // Learned once (module commands included); the built-in table serves meanwhile.
            match ping.command_table().await {
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
        result.is_ok()
    }

    /// Sessions reported trouble: probe on a fresh connection and answer them.
    async fn confirm(&self, health: &mut Health, ping: &mut PingCheck) {
        let member = self.members.get(self.idx);
        let (covers, counts) = member.evidence.take();
        let (healthy, why) = if health.state() == State::Down {
            (false, String::new()) // already down: nothing to confirm
        } else {
            let started = Instant::now();
            let result = ping.fresh(&member.config).await;
            self.record(member, started, &result);
            match result {
                Ok(()) => (true, String::new()),
                Err(e) => (false, e),
            }
        };
        for signal in Signal::ALL {
            let n = counts[signal.index()];
            if n > 0 {
                self.metrics
                    .passive_signals(member.id(), signal.label(), !healthy, n);
            }
        }
        if healthy {
            debug!(
                member = member.id(),
                "passive signal dismissed: the member answers"
            );
        } else {
            // The kind reported most names the cause.
            let kind = Signal::ALL
                .into_iter()
                .max_by_key(|s| counts[s.index()])
                .unwrap_or(Signal::ConnectionLost);
            if let Some(flip) = health.force_down() {
                let why = format!("{kind}, confirmed: {why}");
                self.publish(flip, Some(Cause::Passive(kind)), &why);
            }
        }
        // After the flip is published: a session told "down" finds the member down too.
        member.evidence.decide(covers, healthy);
    }

    fn record(&self, member: &Member, started: Instant, result: &Result<(), String>) {
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.check_duration(member.id(), seconds);
        member.record_check(seconds, result.as_ref().err().cloned());
    }

    /// A flip: the one place that logs health changes, counts them and wakes the router.
    fn publish(&self, flip: Flip, cause: Option<Cause>, why: &str) {
        let member = self.members.get(self.idx);
        member.set_state(flip.to, cause, Instant::now());
        self.metrics.member_up(member.id(), flip.to == State::Up);
        match (flip.to, cause) {
            (State::Down, Some(cause)) => {
                warn!(member = member.id(), from = ?flip.from, %cause, why, "member down")
            }
            _ => info!(member = member.id(), from = ?flip.from, "member up"),
        }
        self.members.changed.notify_one();
    }
}

/// `interval` ± 10 %, so the checks of many proxies do not arrive in step.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.9..1.1))
}
