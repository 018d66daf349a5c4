//! The passive side of one member's health: what sessions see on live traffic.
//!
//! - As soon as a session reports a passive signal, it probes the member on a *fresh*
//!   connection: only a failed probe takes the member down, and its verdict answers every
//!   report made before it began.
//! - It samples the member's error window (replies saying "cannot serve") every tenth of the
//!   window's length.
//!
//! Both take the member down at once, whatever the policy of its checks, until its PING
//! check passes `rise` times again.

use std::sync::Arc;

use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::check::{inconclusive, publish};
use super::errors::ErrorWindow;
use super::ping::PingCheck;
use super::{Cause, State};
use crate::config::HealthConfig;
use crate::member::{MemberIdx, Members, Signal};
use crate::metrics::Metrics;

/// Confirms passive signals and watches the error window of one member.
pub struct Passive {
    pub members: Arc<Members>,
    pub idx: MemberIdx,
    pub config: HealthConfig,
    pub metrics: Metrics,
}

impl Passive {
    pub async fn run(self, shutdown: CancellationToken) {
        let member = self.members.get(self.idx);
        let mut probe = PingCheck::new(&self.config);
        let mut errors = ErrorWindow::new(self.config.errors.clone());
        let commands = self.metrics.commands(member.id());
        let mut next_sample = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = member.evidence.reported() => self.confirm(&mut probe).await,
                _ = sleep_until(next_sample) => {
                    next_sample += errors.step();
                    let refusals = member.refusals();
                    self.metrics.refusals(member.id(), refusals);
                    if let Some(t) = errors.observe(Instant::now(), refusals, commands.get()) {
                        let why = format!(
                            "{} of {} replies said the member cannot serve",
                            t.errors, t.commands
                        );
                        let change = member.force_down(Cause::Errors, why.clone(), Instant::now());
                        publish(&self.members, self.idx, &self.metrics, change, Some(&why));
                    }
                }
            }
        }
    }

    /// Sessions reported trouble: probe on a fresh connection and answer them.
    async fn confirm(&self, probe: &mut PingCheck) {
        let member = self.members.get(self.idx);
        let (covers, counts) = member.evidence.take();
        let probed = if member.state() == State::Down {
            Probed::Down(String::new()) // already down: nothing to confirm
        } else {
            let started = Instant::now();
            let result = probe.fresh(&member.config).await;
            let seconds = started.elapsed().as_secs_f64();
            self.metrics
                .check(member.id(), "confirm", seconds, result.is_ok());
            match result {
                Ok(()) => Probed::Healthy,
                Err(why) if inconclusive(member, "confirm", &why, &self.metrics) => {
                    Probed::Inconclusive
                }
                Err(why) => Probed::Down(why),
            }
        };
        let outcome = match probed {
            Probed::Healthy => "dismissed",
            Probed::Inconclusive => "inconclusive",
            Probed::Down(_) => "confirmed",
        };
        for signal in Signal::ALL {
            let n = counts[signal.index()];
            if n > 0 {
                self.metrics
                    .passive_signals(member.id(), signal.label(), outcome, n);
            }
        }
        match &probed {
            Probed::Healthy => debug!(
                member = member.id(),
                "passive signal dismissed: the member answers"
            ),
            // Not healthy for the sessions that asked (they follow the route, which
            // stays), and not down.
            Probed::Inconclusive => {}
            Probed::Down(why) if member.state() != State::Down => {
                // The kind reported most names the cause.
                let kind = Signal::ALL
                    .into_iter()
                    .max_by_key(|s| counts[s.index()])
                    .unwrap_or(Signal::ConnectionLost);
                let why = format!("{kind}, confirmed: {why}");
                let change = member.force_down(Cause::Passive(kind), why.clone(), Instant::now());
                publish(&self.members, self.idx, &self.metrics, change, Some(&why));
            }
            Probed::Down(_) => {}
        }
        // After the flip is published: a session told "down" finds the member down too.
        member
            .evidence
            .decide(covers, matches!(probed, Probed::Healthy));
    }
}

/// What the confirming probe found.
enum Probed {
    Healthy,
    Down(String),
    /// It could not leave this host (out of file descriptors): no verdict.
    Inconclusive,
}
