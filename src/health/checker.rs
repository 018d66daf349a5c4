//! The checker task of one member: runs its checks on an interval (with jitter) and right
//! after a passive signal, feeds [`Health`], and publishes flips.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ping::PingCheck;
use super::{Flip, Health, State};
use crate::config::HealthConfig;
use crate::member::{MemberIdx, Members, Signal};
use crate::metrics::Metrics;

/// How long fetching a member's `COMMAND` table may take (a few hundred KB).
const COMMAND_TABLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes one member until shutdown.
pub struct Checker {
    pub members: Arc<Members>,
    pub idx: MemberIdx,
    pub config: HealthConfig,
    pub signals: mpsc::Receiver<Signal>,
    pub metrics: Metrics,
}

impl Checker {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut health = Health::new(self.config.rise, self.config.fall);
        let mut ping = PingCheck::default();
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep_until(next) => {}
                Some(signal) = self.signals.recv() => {
                    // A connection-level failure on live traffic: down at once, then confirm
                    // with a check right away (it starts the count towards `rise`).
                    while self.signals.try_recv().is_ok() {}
                    if let Some(flip) = health.force_down() {
                        self.publish(flip, &signal.to_string());
                    }
                }
            }
            let member = &self.members.get(self.idx).config;
            let started = Instant::now();
            let result = match timeout(self.config.timeout, ping.run(member)).await {
                Ok(r) => r,
                Err(_) => {
                    ping.reset();
                    Err(format!("no PING reply within {:?}", self.config.timeout))
                }
            };
            let seconds = started.elapsed().as_secs_f64();
            self.metrics.check_duration(member.id.as_str(), seconds);
            let reason = result.as_ref().err().cloned();
            self.members
                .get(self.idx)
                .record_check(seconds, reason.clone());
            if let Some(flip) = health.observe(result.is_ok()) {
                self.publish(flip, reason.as_deref().unwrap_or("check passed"));
            }
            if result.is_ok() && !self.members.get(self.idx).knows_commands() {
                self.fetch_command_table(&mut ping).await;
            }
            next = Instant::now() + jittered(self.config.interval);
        }
    }

    /// Learns the member's commands once (module commands included). A failure only
    /// delays it to the next good check; the built-in table serves meanwhile.
    async fn fetch_command_table(&self, ping: &mut PingCheck) {
        let member = self.members.get(self.idx);
        match timeout(COMMAND_TABLE_TIMEOUT, ping.command_table()).await {
            Ok(Ok(table)) => {
                debug!(
                    member = member.id(),
                    commands = table.len,
                    "command table loaded"
                );
                member.set_command_table(table);
            }
            Ok(Err(e)) => debug!(member = member.id(), error = %e, "no command table yet"),
            Err(_) => {
                ping.reset();
                debug!(member = member.id(), "command table timed out");
            }
        }
    }

    /// A flip: the one place that logs health changes, counts them and wakes the router.
    fn publish(&self, flip: Flip, reason: &str) {
        let member = self.members.get(self.idx);
        member.set_state(flip.to, Instant::now());
        self.metrics.member_up(member.id(), flip.to == State::Up);
        match flip.to {
            State::Up => info!(member = member.id(), from = ?flip.from, "member up"),
            _ => warn!(member = member.id(), from = ?flip.from, reason, "member down"),
        }
        self.members.changed.notify_one();
    }
}

/// `interval` ± 10 %, so the checks of many proxies do not arrive in step.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.9..1.1))
}
