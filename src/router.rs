//! The router: decides which member sessions use, and publishes it as a [`Route`].
//!
//! [`Router::decide`] is plain logic, a function of the members' health, the failback rules
//! and the time, so it is tested with tables of cases and made-up instants. [`run`] wraps it
//! in a task that re-decides when a member flips or a grace period ends, and publishes each
//! switch on a `watch` channel that sessions read without locks.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Failback, FailoverConfig};
use crate::health::State;
use crate::member::{MemberIdx, Members};
use crate::metrics::Metrics;

/// The published decision: where new commands of every session go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Route {
    /// Grows at each switch; sessions compare it to decide whether to move.
    pub epoch: u64,
    /// The active member, or `None` while no member is available.
    pub member: Option<MemberIdx>,
}

/// Why the route changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// First route after start.
    Initial,
    /// The active member is down.
    Failover,
    /// A more preferred member has been healthy for `failback_after`.
    Failback,
    /// A member is up again after all were down.
    Recovered,
    /// No member is up.
    AllDown,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Initial => "initial",
            Reason::Failover => "failover",
            Reason::Failback => "failback",
            Reason::Recovered => "recovered",
            Reason::AllDown => "all_down",
        })
    }
}

/// What the router needs to know of a member.
#[derive(Debug, Clone, Copy)]
pub struct MemberView {
    pub state: State,
    /// When `state` began.
    pub since: Instant,
}

/// A change of route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub from: Option<MemberIdx>,
    pub to: Option<MemberIdx>,
    pub reason: Reason,
}

/// The outcome of one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub switch: Option<Switch>,
    /// Decide again at this instant even if nothing flips (a grace period ends).
    pub wake_at: Option<Instant>,
}

/// The failover/failback decision.
#[derive(Debug)]
pub struct Router {
    failback: Failback,
    /// How long a member must have been up before traffic returns to it, and how long a
    /// member that was just left is avoided.
    grace: Duration,
    active: Option<MemberIdx>,
    /// Whether a route has been chosen since start.
    routed: bool,
    /// When each member was last left.
    left_at: Vec<Option<Instant>>,
}

impl Router {
    pub fn new(config: &FailoverConfig, members: usize) -> Router {
        Router {
            failback: config.failback,
            grace: config.failback_after,
            active: None,
            routed: false,
            left_at: vec![None; members],
        }
    }

    pub fn active(&self) -> Option<MemberIdx> {
        self.active
    }

    /// Decides the active member given the members' health (in preference order) at `now`.
    pub fn decide(&mut self, members: &[MemberView], now: Instant) -> Decision {
        let up = |i: usize| members[i].state == State::Up;
        // A member is settled once it has been up for the grace period and was not left
        // within it: only a settled member is failed back to.
        let settled_at = |i: usize| {
            let up_for = members[i].since + self.grace;
            match self.left_at[i] {
                Some(left) => up_for.max(left + self.grace),
                None => up_for,
            }
        };
        match self.active {
            Some(a) if up(a) => {
                if self.failback == Failback::Manual {
                    return self.stay(None);
                }
                let better: Vec<usize> = (0..a).filter(|&i| up(i)).collect();
                if let Some(&p) = better.iter().find(|&&i| settled_at(i) <= now) {
                    return self.switch_to(Some(p), Reason::Failback, now);
                }
                self.stay(better.iter().map(|&i| settled_at(i)).min())
            }
            active => {
                if !self.routed {
                    // At start every member is unknown until its first check. Wait for the
                    // members more preferred than the first one up, rather than settle on a
                    // worse member for the whole grace period.
                    return match members.iter().position(|m| m.state != State::Down) {
                        Some(i) if up(i) => self.switch_to(Some(i), Reason::Initial, now),
                        _ => self.stay(None),
                    };
                }
                // Prefer a member not left within the grace period; any up member beats none.
                let fresh = (0..members.len())
                    .find(|&i| up(i) && self.left_at[i].is_none_or(|t| now >= t + self.grace));
                let target = fresh.or_else(|| (0..members.len()).find(|&i| up(i)));
                let reason = match (active, target) {
                    (_, None) => Reason::AllDown,
                    (None, Some(_)) => Reason::Recovered,
                    (Some(_), Some(_)) => Reason::Failover,
                };
                if target == active {
                    return self.stay(None);
                }
                self.switch_to(target, reason, now)
            }
        }
    }

    fn stay(&self, wake_at: Option<Instant>) -> Decision {
        Decision {
            switch: None,
            wake_at,
        }
    }

    fn switch_to(&mut self, to: Option<MemberIdx>, reason: Reason, now: Instant) -> Decision {
        let from = self.active;
        if let Some(f) = from {
            self.left_at[f] = Some(now);
        }
        self.active = to;
        self.routed = true;
        Decision {
            switch: Some(Switch { from, to, reason }),
            wake_at: None,
        }
    }
}

/// The router task: re-decides on every health flip and grace expiry, publishes switches.
pub async fn run(
    mut router: Router,
    members: Arc<Members>,
    route: watch::Sender<Route>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let views: Vec<MemberView> = members
            .list
            .iter()
            .map(|m| {
                let s = m.status();
                MemberView {
                    state: s.state,
                    since: s.since,
                }
            })
            .collect();
        let decision = router.decide(&views, Instant::now());
        if let Some(switch) = decision.switch {
            let name = |i: Option<MemberIdx>| i.map_or("none", |i| members.get(i).id());
            let epoch = route.borrow().epoch + 1;
            route.send_replace(Route {
                epoch,
                member: switch.to,
            });
            metrics.switched(
                name(switch.from),
                name(switch.to),
                &switch.reason.to_string(),
            );
            for (i, m) in members.list.iter().enumerate() {
                metrics.active_member(m.id(), switch.to == Some(i));
            }
            let (from, to, reason) = (name(switch.from), name(switch.to), switch.reason);
            if switch.to.is_none() {
                warn!(from, to, %reason, epoch, "switch: no member available");
            } else {
                info!(from, to, %reason, epoch, "switch");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = members.changed.notified() => {}
            _ = sleep_until(decision.wake_at.unwrap_or_else(far_future)), if decision.wake_at.is_some() => {}
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    const GRACE: Duration = Duration::from_secs(30);

    fn router(failback: Failback) -> Router {
        let config = FailoverConfig {
            failback,
            failback_after: GRACE,
            retry_reads: false,
        };
        Router::new(&config, 3)
    }

    /// Members described as `(state, seconds since it began)`, decided at `t0 + at` seconds.
    fn views(t0: Instant, at: u64, members: &[(State, u64)]) -> Vec<MemberView> {
        members
            .iter()
            .map(|&(state, began)| MemberView {
                state,
                since: t0 + Duration::from_secs(at) - Duration::from_secs(began),
            })
            .collect()
    }

    /// Runs steps of (seconds, members) and returns the active member after each.
    fn script(failback: Failback, steps: &[(u64, &[(State, u64)])]) -> Vec<Option<usize>> {
        let t0 = Instant::now() + Duration::from_secs(1000);
        let mut r = router(failback);
        steps
            .iter()
            .map(|(at, members)| {
                r.decide(&views(t0, *at, members), t0 + Duration::from_secs(*at));
                r.active()
            })
            .collect()
    }

    #[test]
    fn startup_waits_for_preferred_members() {
        let got = script(
            Failback::Auto,
            &[
                (0, &[(Unknown, 0), (Up, 0), (Unknown, 0)]),
                (0, &[(Up, 0), (Up, 0), (Unknown, 0)]),
            ],
        );
        assert_eq!(got, [None, Some(0)]);
        let got = script(Failback::Auto, &[(0, &[(Down, 0), (Up, 0), (Unknown, 0)])]);
        assert_eq!(got, [Some(1)], "a member known down is not waited for");
        let got = script(Failback::Auto, &[(0, &[(Down, 0), (Down, 0), (Down, 0)])]);
        assert_eq!(got, [None]);
    }

    #[test]
    fn failover_is_immediate_and_failback_waits_for_grace() {
        let got = script(
            Failback::Auto,
            &[
                (0, &[(Up, 0), (Up, 0), (Up, 0)]),
                (5, &[(Down, 0), (Up, 5), (Up, 5)]),
                (10, &[(Up, 0), (Up, 10), (Up, 10)]),
                (39, &[(Up, 29), (Up, 39), (Up, 39)]),
                (41, &[(Up, 31), (Up, 41), (Up, 41)]),
            ],
        );
        assert_eq!(got, [Some(0), Some(1), Some(1), Some(1), Some(0)]);
    }

    #[test]
    fn manual_failback_stays() {
        let got = script(
            Failback::Manual,
            &[
                (0, &[(Up, 0), (Up, 0), (Up, 0)]),
                (5, &[(Down, 0), (Up, 5), (Up, 5)]),
                (500, &[(Up, 400), (Up, 500), (Up, 500)]),
            ],
        );
        assert_eq!(got, [Some(0), Some(1), Some(1)]);
    }

    #[test]
    fn all_down_then_recovery() {
        let got = script(
            Failback::Auto,
            &[
                (0, &[(Up, 0), (Up, 0), (Down, 0)]),
                (5, &[(Down, 0), (Down, 0), (Down, 5)]),
                (6, &[(Down, 1), (Up, 0), (Down, 6)]),
            ],
        );
        assert_eq!(got, [Some(0), None, Some(1)]);
    }

    #[test]
    fn a_member_just_left_is_avoided_while_another_is_up() {
        // 0 fails -> 1; 0 recovers (2 s) and 1 fails: 2 is fresh, so it is preferred to 0,
        // which was left 3 s ago.
        let got = script(
            Failback::Auto,
            &[
                (0, &[(Up, 0), (Up, 0), (Up, 0)]),
                (1, &[(Down, 0), (Up, 1), (Up, 1)]),
                (4, &[(Up, 2), (Down, 0), (Up, 4)]),
                (5, &[(Up, 3), (Down, 1), (Down, 0)]),
            ],
        );
        assert_eq!(got, [Some(0), Some(1), Some(2), Some(0)]);
    }

    #[test]
    fn decision_says_when_to_look_again() {
        let t0 = Instant::now();
        let mut r = router(Failback::Auto);
        r.decide(&views(t0, 0, &[(Down, 0), (Up, 0), (Up, 0)]), t0);
        let d = r.decide(&views(t0, 0, &[(Up, 0), (Up, 0), (Up, 0)]), t0);
        assert_eq!(d.switch, None);
        assert_eq!(d.wake_at, Some(t0 + GRACE));
        let d = r.decide(&views(t0, 30, &[(Up, 30), (Up, 30), (Up, 30)]), t0 + GRACE);
        assert_eq!(
            d.switch,
            Some(Switch {
                from: Some(1),
                to: Some(0),
                reason: Reason::Failback
            })
        );
    }
}
