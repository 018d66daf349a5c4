//! The check abstraction, and the task that runs one check of one member.
//!
//! A kind of check is one type implementing [`Check`] (as pingora's `HealthCheck`): it runs
//! once against a member and says whether the member passed, and why not. [`Checker`] runs
//! it on its interval (with jitter, sooner after a failure), feeds the result to the
//! member's verdicts and publishes what changed. [`plan`] lists the checks a configuration
//! turns on; [`spawn`] starts their checkers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::availability::AvailabilityCheck;
use super::custom::CustomCheck;
use super::keyspace::KeyspaceCheck;
use super::passive::Passive;
use super::ping::PingCheck;
use super::replication::{Matrix, Replication};
use super::verdict::{Change, Kind, Slot};
use super::State;
use crate::config::{HealthConfig, Timing};
use crate::member::{Member, MemberIdx, Members};
use crate::metrics::Metrics;
use crate::upstream;

/// One kind of active check.
pub trait Check: Send + 'static {
    /// Checks `member` once: `Ok` when it passed, else why not, in words an operator can act
    /// on. A check keeps to its own timeout; the checker stops one that overruns it.
    fn run(&mut self, member: &Member) -> impl Future<Output = Result<(), String>> + Send;
}

/// Runs one check of one member until shutdown.
pub struct Checker<C> {
    pub check: C,
    /// The check's place in the member's verdicts.
    pub slot: usize,
    pub timing: Timing,
    /// The next run after a failure of a passing check, or while no member is up.
    pub fast_interval: Duration,
    /// How long one run may take in all (connecting included).
    pub deadline: Duration,
    pub members: Arc<Members>,
    pub idx: MemberIdx,
    pub metrics: Metrics,
}

impl<C: Check> Checker<C> {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let member = self.members.get(self.idx);
        let name = member.slots()[self.slot].name.clone();
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep_until(next) => {}
            }
            let started = Instant::now();
            let result = match timeout(self.deadline, self.check.run(member)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no result within {:?}", self.deadline)),
            };
            let seconds = started.elapsed().as_secs_f64();
            if let Err(why) = &result {
                if inconclusive(member, &name, why, &self.metrics) {
                    // Not recorded: tried again at the next interval.
                    next = Instant::now() + jittered(self.timing.interval);
                    continue;
                }
            }
            let failed = result.is_err();
            let (members, metrics) = (&self.members, &self.metrics);
            let change = record(
                members, self.idx, metrics, self.slot, &name, result, seconds,
            );
            // Soon again after a failure of a passing check (HAProxy's `fastinter`: `fall`
            // failures take about one interval), and while no member is available.
            let soon = (failed && change.check == State::Up) || !self.members.any_up();
            let wait = if soon {
                self.fast_interval.min(self.timing.interval)
            } else {
                self.timing.interval
            };
            next = Instant::now() + jittered(wait);
        }
    }
}

/// Is the failure (`why`) of a run of `check` inconclusive: did it happen while this process
/// cannot open a file (out of descriptors)? Then the connect, HTTP request or program never
/// left this host, which says nothing about the member, and a proxy full of clients must
/// not fail over from a healthy one. Logged and counted here when it is. Asked after the
/// fact because a check's error is only words by then; opening `/dev/null` fails the same
/// way ([`upstream::is_local_exhaustion`], as a session's failed connect is judged).
pub(crate) fn inconclusive(member: &Member, check: &str, why: &str, metrics: &Metrics) -> bool {
    let Err(e) = std::fs::File::open("/dev/null") else {
        return false;
    };
    if !upstream::is_local_exhaustion(&e) {
        return false;
    }
    warn!(member = member.id(), check, why, error = %e, "check inconclusive: out of file descriptors");
    metrics.check_inconclusive(member.id(), check);
    true
}

/// One result of check `slot` (named `name`) of member `idx`: counted, fed to the member's
/// verdicts, and what it changed published.
pub(crate) fn record(
    members: &Members,
    idx: MemberIdx,
    metrics: &Metrics,
    slot: usize,
    name: &str,
    result: Result<(), String>,
    seconds: f64,
) -> Change {
    let member = members.get(idx);
    metrics.check(member.id(), name, seconds, result.is_ok());
    let why = result.clone().err();
    let change = member.observe(slot, result, seconds, Instant::now());
    publish(members, idx, metrics, change, why.as_deref());
    change
}

/// What a result changed, told: the one place that logs health and sync changes, counts
/// them and wakes the router.
pub(crate) fn publish(
    members: &Members,
    idx: MemberIdx,
    metrics: &Metrics,
    change: Change,
    why: Option<&str>,
) {
    if change.flip.is_none() && change.synced.is_none() {
        return;
    }
    let member = members.get(idx);
    let status = member.status();
    if let Some(flip) = change.flip {
        metrics.member_up(member.id(), flip.to == State::Up);
        match (flip.to, status.cause) {
            (State::Down, Some(cause)) => {
                let why = why.or(status.last_error.as_deref()).unwrap_or("");
                warn!(member = member.id(), from = ?flip.from, %cause, why, "member down")
            }
            _ => info!(member = member.id(), from = ?flip.from, "member up"),
        }
    }
    if let Some(synced) = change.synced {
        metrics.member_synced(member.id(), synced);
        match status.unsynced_because {
            Some(why) if !synced => warn!(member = member.id(), why, "member not synced"),
            _ => info!(member = member.id(), "member synced"),
        }
    }
    members.changed.notify_one();
}

/// `interval` ± 10 %, so the checks of many proxies do not arrive in step.
pub(crate) fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.9..1.1))
}

/// The checks every member gets, in slot order: PING first (a confirmed passive signal is
/// lifted by it), then keyspace, availability, lag, replication, custom.
pub fn plan(config: &HealthConfig) -> Vec<Slot> {
    let slot = |kind: Kind, name: &str, timing: &Timing| Slot {
        kind,
        name: name.to_string(),
        role: timing.role,
        rise: timing.rise,
        fall: timing.fall,
    };
    let mut slots = vec![slot(Kind::Ping, "ping", &config.ping.timing)];
    if let Some(k) = &config.keyspace {
        slots.push(slot(Kind::Keyspace, "keyspace", &k.timing));
    }
    if let Some(a) = &config.availability {
        slots.push(slot(Kind::Availability, "availability", &a.timing));
        if let Some(lag) = &a.lag {
            slots.push(slot(Kind::Lag, "lag", &lag.timing));
        }
    }
    if let Some(r) = &config.replication {
        slots.push(slot(Kind::Replication, "replication", &r.timing));
    }
    for c in &config.custom {
        slots.push(slot(Kind::Custom, &c.name, &c.timing));
    }
    slots
}

/// Starts every health task: a checker per member and check, the passive side of each
/// member, and the replication check (one task for all members, measuring into `matrix`).
/// A check that cannot start (an HTTPS client that cannot be built) is logged and left out;
/// the member's verdict then never counts it as passed.
pub fn spawn(
    tasks: &TaskTracker,
    members: &Arc<Members>,
    config: &HealthConfig,
    metrics: &Metrics,
    matrix: Option<Arc<Matrix>>,
    shutdown: &CancellationToken,
) {
    for (idx, _) in members.iter() {
        let passive = Passive {
            members: members.clone(),
            idx,
            config: config.clone(),
            metrics: metrics.clone(),
        };
        tasks.spawn(passive.run(shutdown.clone()));
    }
    if let (Some(replication), Some(matrix)) = (&config.replication, matrix) {
        let task = Replication {
            members: members.clone(),
            config: replication.clone(),
            connect_timeout: config.connect_timeout,
            metrics: metrics.clone(),
            matrix,
        };
        tasks.spawn(task.run(shutdown.clone()));
    }
    let slots = plan(config);
    for (idx, _) in members.iter() {
        for (slot, s) in slots.iter().enumerate() {
            let new = |timing: Timing| Settings {
                slot,
                timing,
                fast_interval: config.fast_interval,
                // Connecting has its own timeout before the check's.
                deadline: config.connect_timeout + timing.timeout,
                members: members.clone(),
                idx,
                metrics: metrics.clone(),
            };
            let stop = shutdown.clone();
            match s.kind {
                Kind::Ping => {
                    let check = PingCheck::new(config);
                    tasks.spawn(new(config.ping.timing).with(check).run(stop));
                }
                Kind::Keyspace => {
                    let k = config.keyspace.as_ref().expect("planned");
                    let check = KeyspaceCheck::new(config, k);
                    tasks.spawn(new(k.timing).with(check).run(stop));
                }
                Kind::Availability | Kind::Lag => {
                    let a = config.availability.as_ref().expect("planned");
                    let lag = s.kind == Kind::Lag;
                    let timing = a
                        .lag
                        .as_ref()
                        .filter(|_| lag)
                        .map_or(a.timing, |l| l.timing);
                    match AvailabilityCheck::new(a, lag) {
                        Ok(check) => {
                            tasks.spawn(new(timing).with(check).run(stop));
                        }
                        Err(e) => {
                            tracing::error!(check = %s.name, error = %e, "cannot start a check")
                        }
                    }
                }
                Kind::Custom => {
                    let c = config.custom.iter().find(|c| c.name == s.name);
                    let c = c.expect("planned");
                    let check = CustomCheck::new(config, c);
                    tasks.spawn(new(c.timing).with(check).run(stop));
                }
                Kind::Replication => {} // one task for all members
            }
        }
    }
}

/// A checker without its check yet.
struct Settings {
    slot: usize,
    timing: Timing,
    fast_interval: Duration,
    deadline: Duration,
    members: Arc<Members>,
    idx: MemberIdx,
    metrics: Metrics,
}

impl Settings {
    fn with<C: Check>(self, check: C) -> Checker<C> {
        Checker {
            check,
            slot: self.slot,
            timing: self.timing,
            fast_interval: self.fast_interval,
            deadline: self.deadline,
            members: self.members,
            idx: self.idx,
            metrics: self.metrics,
        }
    }
}
