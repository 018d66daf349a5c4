//! The router: decides which member sessions use, and publishes it as a [`Route`].
//!
//! [`Router::decide`] is plain logic, a function of the members' health, the failback rules,
//! the operator's choice and the time, so it is tested with tables of cases and made-up
//! instants. [`run`] wraps it in a task that re-decides when a member flips, a hold ends or
//! an operator asks for a switchover, and publishes each switch on a `watch` channel that
//! sessions read without locks.
//!
//! The rules:
//! - **Failover** is immediate, to the first member that is *settled* (up for its hold, and
//!   not left within it) and *synced* (its lag and replication checks pass), else the first
//!   settled one, else the one closest to settled. A member known down is never chosen.
//! - **Failback** (`failback = "auto"`) returns to a more preferred member once it is settled
//!   and synced: the *failback gate*. While it holds, [`Router::gate`] says why.
//! - **Hold**: a member's hold is `failback_after`; one that fails within `flap_hold_max` of
//!   traffic returning to it has flapped, and its hold doubles (up to `flap_hold_max`); one
//!   that served that long without failing is back to `failback_after`.
//! - **Startup** waits for the members more preferred than the first one up.
//! - **Switchover**: an operator sends traffic to a member that is up; the router stays there
//!   (no failback) until that member fails.
//! - **Drain**: an operator takes a member out of the preference until it is enabled again:
//!   it is never chosen (not even when nothing else is up), and traffic leaves it at once if
//!   it is active (sessions move at their quiescent points). Draining the last member up is
//!   refused.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Failback, FailoverConfig};
use crate::health::verdict::Kind;
use crate::health::{Cause, State};
use crate::member::{MemberIdx, Members, Roster};
use crate::metrics::Metrics;
use crate::modes::pooled::PoolView;

/// The published decision: where new commands of every session go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Route {
    /// Grows at each switch; sessions compare it to decide whether to move.
    pub epoch: u64,
    /// The active member, or `None` while no member is available.
    pub member: Option<MemberIdx>,
    /// A strict switch is under way: no member for a moment, but one is coming. Sessions
    /// send nothing new, finish what is in flight, and hold new commands (up to
    /// `unavailable_timeout`) instead of refusing them.
    pub paused: bool,
    /// A member sessions must leave now, commands in flight or not (a strict switch that
    /// waited `failover.strict_timeout` for them): each in-flight command is answered
    /// `-OUTCOMEUNKNOWN`.
    pub evict: Option<MemberIdx>,
    /// This proxy is a standby (centralized mode): commands are refused at once.
    pub standby: bool,
}

/// Why the route changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// First route after start.
    Initial,
    /// The active member went down, for this cause (to another member, or to none).
    Failover(Cause),
    /// A more preferred member has been healthy for its hold.
    Failback,
    /// A member is up again after all were down.
    Recovered,
    /// An operator asked for it (`POST /v1/switchover`).
    Operator,
    /// An operator drained the active member (`POST /v1/members/{id}/drain`).
    Drain,
    /// This proxy became the active proxy (centralized mode), starting from the route the
    /// last holder wrote.
    Takeover,
    /// This proxy stopped serving: it lost (or could not renew) the lease.
    Standby,
    /// A reload removed the active member from the configuration (or changed it).
    Removed,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Initial => f.write_str("initial"),
            Reason::Failover(cause) => cause.fmt(f),
            Reason::Failback => f.write_str("failback"),
            Reason::Recovered => f.write_str("recovered"),
            Reason::Operator => f.write_str("operator"),
            Reason::Drain => f.write_str("drain"),
            Reason::Takeover => f.write_str("takeover"),
            Reason::Standby => f.write_str("standby"),
            Reason::Removed => f.write_str("removed"),
        }
    }
}

/// What the router needs to know of a member.
#[derive(Debug, Clone, Copy)]
pub struct MemberView {
    pub state: State,
    /// When `state` began.
    pub since: Instant,
    /// Why it is down (while it is).
    pub cause: Option<Cause>,
    /// Its sync checks pass (true when it has none).
    pub synced: bool,
}

/// Why traffic does not return to a more preferred member that is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// It has not been up (and not left) for its hold yet.
    Hold { until: Instant },
    /// Its sync checks fail.
    Sync,
}

impl Gate {
    pub fn label(self) -> &'static str {
        match self {
            Gate::Hold { .. } => "hold",
            Gate::Sync => "sync",
        }
    }
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
    /// Decide again at this instant even if nothing flips (a hold ends).
    pub wake_at: Option<Instant>,
}

/// What an operator asks of the router (admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Switchover(MemberIdx),
    Drain(MemberIdx),
    Enable(MemberIdx),
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Switchover(_) => "switchover",
            Operation::Drain(_) => "drain",
            Operation::Enable(_) => "enable",
        }
    }
}

/// Why an operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    #[error("no member has this id")]
    UnknownMember,
    #[error("the member is not healthy")]
    NotHealthy,
    #[error("the member is drained; enable it first")]
    Drained,
    #[error("no other member is up to take the traffic")]
    LastMember,
    #[error("this proxy is a standby; ask the active proxy")]
    Standby,
}

/// The failover/failback decision.
#[derive(Debug)]
pub struct Router {
    failback: Failback,
    /// A member's hold when it does not flap (`failback_after`).
    grace: Duration,
    /// The longest hold, and how long a member must serve to be stable again.
    hold_max: Duration,
    active: Option<MemberIdx>,
    /// Whether a route has been chosen since start.
    routed: bool,
    /// The member an operator switched to: stayed on (no failback) while it is up.
    operator: Option<MemberIdx>,
    /// The configured members' slots, best first (a reload changes it).
    order: Vec<MemberIdx>,
    /// Per slot.
    members: Vec<Track>,
    /// Members an operator drained (per slot): never chosen until enabled.
    drained: Vec<bool>,
}

/// The router's memory of one member.
#[derive(Debug, Clone, Copy)]
struct Track {
    /// How long it must be up (and not left) before traffic returns to it.
    hold: Duration,
    /// When traffic last left it.
    left_at: Option<Instant>,
    /// When traffic last returned to it (failback, recovery, operator).
    returned_at: Option<Instant>,
}

impl Router {
    pub fn new(config: &FailoverConfig, members: usize) -> Router {
        let track = Track {
            hold: config.failback_after,
            left_at: None,
            returned_at: None,
        };
        Router {
            failback: config.failback,
            grace: config.failback_after,
            hold_max: config.flap_hold_max,
            active: None,
            routed: false,
            operator: None,
            order: (0..members).collect(),
            members: vec![track; members],
            drained: vec![false; members],
        }
    }

    /// A reload changed the members: `order` is the new preference over `slots` slots. A new
    /// slot starts with a fresh memory; an active member no longer in `order` is left at the
    /// next decision (reason `removed`).
    pub fn set_preference(&mut self, order: Vec<MemberIdx>, slots: usize) {
        let fresh = Track {
            hold: self.grace,
            left_at: None,
            returned_at: None,
        };
        self.members.resize(slots, fresh);
        self.drained.resize(slots, false);
        self.order = order;
    }

    /// Member `i`'s place in the preference (`None`: not configured).
    fn rank(&self, i: MemberIdx) -> Option<usize> {
        self.order.iter().position(|&j| j == i)
    }

    pub fn drained(&self, member: MemberIdx) -> bool {
        self.drained.get(member).copied().unwrap_or(false)
    }

    /// Up, and not drained: a member traffic may go to.
    fn usable(&self, i: MemberIdx, members: &[MemberView]) -> bool {
        members.get(i).is_some_and(|v| v.state == State::Up)
            && !self.drained(i)
            && self.order.contains(&i)
    }

    pub fn active(&self) -> Option<MemberIdx> {
        self.active
    }

    #[cfg(test)]
    fn hold(&self, member: MemberIdx) -> Duration {
        self.members[member].hold
    }

    /// When member `i` becomes a target for failback (and a first choice for failover): up
    /// for its hold, and not left within it.
    fn settled_at(&self, i: MemberIdx, view: &MemberView) -> Instant {
        let t = self.members[i];
        let up_for = view.since + t.hold;
        t.left_at.map_or(up_for, |left| up_for.max(left + t.hold))
    }

    /// Decides the active member given the members' health (by slot) at `now`.
    pub fn decide(&mut self, members: &[MemberView], now: Instant) -> Decision {
        // A drained member is as good as gone to every rule below.
        let up = |i: usize| self.usable(i, members);
        match self.active {
            Some(a) if up(a) => {
                if self.failback == Failback::Manual || self.operator == Some(a) {
                    return stay(None);
                }
                let rank = self.rank(a).unwrap_or(0);
                let better: Vec<usize> = self.order[..rank]
                    .iter()
                    .copied()
                    .filter(|&i| up(i))
                    .collect();
                let settled = |i: &usize| self.settled_at(*i, &members[*i]);
                let ready = |i: &&usize| settled(i) <= now && members[**i].synced;
                if let Some(&p) = better.iter().find(ready) {
                    return self.switch_to(Some(p), Reason::Failback, now);
                }
                // Wake when a hold ends; a sync flip wakes the router by itself.
                stay(better.iter().map(settled).filter(|t| *t > now).min())
            }
            active => {
                if !self.routed {
                    // At start every member is unknown until its first check. Wait for the
                    // members more preferred than the first one up, rather than settle on a
                    // worse member for the whole grace period.
                    let first = self
                        .order
                        .iter()
                        .copied()
                        .find(|&i| members[i].state != State::Down);
                    return match first {
                        Some(i) if up(i) => self.switch_to(Some(i), Reason::Initial, now),
                        _ => stay(None),
                    };
                }
                // The first settled and synced member; else the first settled; else the one
                // closest to settled (one that came back seconds ago is the last choice); any
                // member up beats none.
                let settled = |i: usize| self.settled_at(i, &members[i]);
                let candidates = self.order.iter().copied().filter(|&i| up(i));
                let target = candidates
                    .clone()
                    .find(|&i| settled(i) <= now && members[i].synced)
                    .or_else(|| candidates.clone().find(|&i| settled(i) <= now))
                    .or_else(|| candidates.min_by_key(|&i| settled(i)));
                if target == active {
                    return stay(None);
                }
                let reason = match active {
                    Some(a) if self.rank(a).is_none() => Reason::Removed,
                    Some(a) if self.drained[a] && members[a].state == State::Up => Reason::Drain,
                    Some(a) => {
                        Reason::Failover(members[a].cause.unwrap_or(Cause::Check(Kind::Ping)))
                    }
                    None => Reason::Recovered,
                };
                self.switch_to(target, reason, now)
            }
        }
    }

    /// The failback gate: the most preferred member, better than the active one, that is up
    /// but not yet returned to, and why (`None` with automatic failback off or under an
    /// operator's switchover, or when the active member is the best one up).
    pub fn gate(&self, members: &[MemberView], now: Instant) -> Option<(MemberIdx, Gate)> {
        let a = self.active?;
        if self.failback == Failback::Manual || self.operator == Some(a) {
            return None;
        }
        let rank = self.rank(a)?;
        let p = self.order[..rank]
            .iter()
            .copied()
            .find(|&i| self.usable(i, members))?;
        let until = self.settled_at(p, &members[p]);
        if until > now {
            Some((p, Gate::Hold { until }))
        } else if !members[p].synced {
            Some((p, Gate::Sync))
        } else {
            None
        }
    }

    /// This proxy became the active one: start where the last holder was (`last`, when it is
    /// up and not drained), else as at start.
    pub fn take_over(
        &mut self,
        last: Option<MemberIdx>,
        members: &[MemberView],
        now: Instant,
    ) -> Decision {
        if let Some(m) = last.filter(|&m| self.usable(m, members)) {
            return self.switch_to(Some(m), Reason::Takeover, now);
        }
        self.routed = false;
        let mut decision = self.decide(members, now);
        if let Some(s) = decision.switch.as_mut() {
            s.reason = Reason::Takeover;
        }
        decision
    }

    /// This proxy is (again) a standby: no route.
    pub fn step_down(&mut self, now: Instant) -> Decision {
        let decision = self.switch_to(None, Reason::Standby, now);
        self.routed = false;
        decision
    }

    /// Carries out an operator's request.
    pub fn operate(
        &mut self,
        op: Operation,
        members: &[MemberView],
        now: Instant,
    ) -> Result<Decision, OperatorError> {
        match op {
            Operation::Switchover(to) => self.switchover(to, members, now),
            Operation::Drain(i) => {
                self.rank(i).ok_or(OperatorError::UnknownMember)?;
                let others_up = self
                    .order
                    .iter()
                    .any(|&j| j != i && self.usable(j, members));
                if self.active == Some(i) && !others_up {
                    return Err(OperatorError::LastMember);
                }
                self.drained[i] = true;
                Ok(self.decide(members, now))
            }
            Operation::Enable(i) => {
                self.rank(i).ok_or(OperatorError::UnknownMember)?;
                self.drained[i] = false;
                Ok(self.decide(members, now))
            }
        }
    }

    /// An operator asks for traffic to go to `to` (which must be up and not drained).
    fn switchover(
        &mut self,
        to: MemberIdx,
        members: &[MemberView],
        now: Instant,
    ) -> Result<Decision, OperatorError> {
        self.rank(to).ok_or(OperatorError::UnknownMember)?;
        let view = members.get(to).ok_or(OperatorError::UnknownMember)?;
        if view.state != State::Up {
            return Err(OperatorError::NotHealthy);
        }
        if self.drained[to] {
            return Err(OperatorError::Drained);
        }
        self.operator = Some(to);
        if self.active == Some(to) {
            return Ok(stay(None));
        }
        Ok(self.switch_to(Some(to), Reason::Operator, now))
    }

    fn switch_to(&mut self, to: Option<MemberIdx>, reason: Reason, now: Instant) -> Decision {
        let from = self.active;
        if let Some(f) = from {
            let left = &mut self.members[f];
            left.left_at = Some(now);
            if let Reason::Failover(_) = reason {
                // Failed within `hold_max` of traffic returning to it: a flap.
                let flapped = left.returned_at.is_some_and(|t| now < t + self.hold_max);
                left.hold = if flapped {
                    (left.hold * 2).min(self.hold_max)
                } else {
                    self.grace
                };
            }
        }
        if let Some(t) = to {
            if matches!(
                reason,
                Reason::Failback | Reason::Recovered | Reason::Operator
            ) {
                self.members[t].returned_at = Some(now);
            }
        }
        if self.operator != to {
            self.operator = None;
        }
        self.active = to;
        self.routed = true;
        Decision {
            switch: Some(Switch { from, to, reason }),
            wake_at: None,
        }
    }
}

fn stay(wake_at: Option<Instant>) -> Decision {
    Decision {
        switch: None,
        wake_at,
    }
}

/// One switch, as `/v1/status` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchRecord {
    /// Unix time, seconds.
    pub at: f64,
    pub epoch: u64,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
    /// What the sessions did after it (until the next switch): moved to another member,
    /// interrupted (their commands in flight got `-OUTCOMEUNKNOWN`), or lost (closed).
    pub sessions: SessionCounts,
}

/// Sessions counted against one switch.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SessionCounts {
    pub moved: u64,
    pub interrupted: u64,
    pub lost: u64,
}

/// What happened to a session at a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOutcome {
    Moved,
    Interrupted,
    Lost,
}

/// The last switches, newest last.
#[derive(Default)]
pub struct History(Mutex<Switches>);

#[derive(Default)]
struct Switches {
    records: VecDeque<SwitchRecord>,
    /// Sessions that lost their member before the switch away from it was published (they
    /// noticed first), by member id: the next switch from that member takes them.
    early: Vec<(String, SessionCounts, Instant)>,
}

/// How long an early count waits for its switch.
const EARLY_KEPT: Duration = Duration::from_secs(60);

impl SessionCounts {
    fn add(&mut self, outcome: SessionOutcome) {
        match outcome {
            SessionOutcome::Moved => self.moved += 1,
            SessionOutcome::Interrupted => self.interrupted += 1,
            SessionOutcome::Lost => self.lost += 1,
        }
    }
}

/// Switches kept in [`History`].
const HISTORY: usize = 20;

impl History {
    fn push(&self, mut record: SwitchRecord) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        h.early.retain(|(_, _, at)| at.elapsed() < EARLY_KEPT);
        if let Some(from) = &record.from {
            if let Some(i) = h.early.iter().position(|(m, _, _)| m == from) {
                record.sessions = h.early.swap_remove(i).1;
            }
        }
        if h.records.len() == HISTORY {
            h.records.pop_front();
        }
        h.records.push_back(record);
    }

    /// Counts a session's outcome on `member`: a move (to it) against the last switch; a
    /// loss (of it) against the last switch if that one left it, else against the next
    /// switch away from it (the session noticed before the router decided).
    pub fn count(&self, outcome: SessionOutcome, member: &str) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let last = h.records.back_mut();
        match last {
            Some(last) if outcome == SessionOutcome::Moved => last.sessions.add(outcome),
            Some(last) if last.from.as_deref() == Some(member) => last.sessions.add(outcome),
            _ => {
                let early = h.early.iter_mut().find(|(m, _, _)| m == member);
                match early {
                    Some((_, counts, _)) => counts.add(outcome),
                    None => {
                        let mut counts = SessionCounts::default();
                        counts.add(outcome);
                        h.early.push((member.to_string(), counts, Instant::now()));
                    }
                }
            }
        }
    }

    /// The last switch got its final epoch (a strict switch publishes steps before it).
    fn set_epoch(&self, epoch: u64) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = h.records.back_mut() {
            last.epoch = epoch;
        }
    }

    pub fn list(&self) -> Vec<SwitchRecord> {
        let h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        h.records.iter().cloned().collect()
    }
}

/// The failback gate as the router last saw it, for `/v1/status`.
pub type GateCell = Mutex<Option<(MemberIdx, Gate)>>;

/// Which members are drained, as the router last published it, for `/v1/status`.
pub type DrainedCell = Mutex<Vec<bool>>;

/// An operator's request to the router task, with where to send its outcome.
pub struct OperatorRequest {
    pub op: Operation,
    pub reply: oneshot::Sender<Result<Route, OperatorError>>,
}

/// What the router task works with.
pub struct RouterTask {
    pub router: Router,
    pub members: Arc<Roster>,
    pub route: watch::Sender<Route>,
    pub history: Arc<History>,
    pub operations: mpsc::Receiver<OperatorRequest>,
    pub metrics: Metrics,
    pub gate: Arc<GateCell>,
    pub drained: Arc<DrainedCell>,
    /// Centralized mode: whether this proxy holds the lease (and where the last holder
    /// was). `None`: this proxy always serves.
    pub leadership: Option<watch::Receiver<Leadership>>,
    /// The strict switch (centralized mode, or `failover.switch = "strict"`): how long a
    /// switch waits for sessions to leave the old member before it evicts them.
    pub strict: Option<Duration>,
    /// Pooled mode: the pool's judgement of the members replaces this proxy's own while the
    /// pool has a quorum.
    pub pool: Option<Arc<PoolView>>,
}

/// What the election tells the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leadership {
    /// This proxy holds the lease: it serves.
    pub serving: bool,
    /// The member the last holder's route named, when this proxy took over.
    pub start_from: Option<MemberIdx>,
}

/// How often a strict switch looks at the old member's sessions.
const STRICT_POLL: Duration = Duration::from_millis(5);

impl RouterTask {
    /// Re-decides on every health flip, hold expiry, operator request and change of
    /// leadership; publishes switches.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut serving = self.leadership.is_none();
        if !serving {
            // A standby from the start: refuse clients until elected.
            let decision = self.router.step_down(Instant::now());
            self.publish(decision).await;
        }
        let mut generation = self.members.load();
        loop {
            let members = self.members.load();
            if !Arc::ptr_eq(&members, &generation) {
                generation = members.clone();
                self.reloaded(&members);
            }
            let views = self.views();
            let now = Instant::now();
            let leader = self.leadership.as_ref().map(|l| *l.borrow());
            if let Some(l) = leader.filter(|l| l.serving != serving) {
                serving = l.serving;
                let decision = if serving {
                    self.router.take_over(l.start_from, &views, now)
                } else {
                    self.router.step_down(now)
                };
                self.publish(decision).await;
            }
            let mut wake_at = None;
            if serving {
                let decision = self.router.decide(&views, now);
                self.publish(decision).await;
                self.publish_gate(&views, now);
                wake_at = decision.wake_at;
            }
            let leadership_changed = async {
                match self.leadership.as_mut() {
                    Some(l) => {
                        if l.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = members.changed.notified() => {}
                _ = leadership_changed => {}
                Some(request) = self.operations.recv() => {
                    let views = self.views();
                    let outcome = if serving {
                        self.router.operate(request.op, &views, Instant::now())
                    } else {
                        Err(OperatorError::Standby)
                    };
                    let route = match outcome {
                        Ok(decision) => {
                            self.publish(decision).await;
                            Ok(*self.route.borrow())
                        }
                        Err(e) => Err(e),
                    };
                    if let (Operation::Drain(i) | Operation::Enable(i), Ok(_)) =
                        (request.op, &route)
                    {
                        let drained = self.router.drained(i);
                        self.metrics.member_drained(members.get(i).id(), drained);
                        let mut cell = self.drained.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(d) = cell.get_mut(i) {
                            *d = drained;
                        }
                    }
                    let _ = request.reply.send(route);
                }
                _ = sleep_until(wake_at.unwrap_or_else(far_future)), if wake_at.is_some() => {}
            }
        }
    }

    /// A reload published a new member table: the router takes its preference, and the
    /// drained table grows to its slots.
    fn reloaded(&mut self, members: &Members) {
        self.router
            .set_preference(members.preference().to_vec(), members.slots());
        let mut cell = self.drained.lock().unwrap_or_else(|e| e.into_inner());
        cell.resize(members.slots(), false);
    }

    /// The strict switch's first half: no member (sessions stop sending and finish what is
    /// in flight), then wait until no session is attached to `from`; after `limit`, evict
    /// the rest (their in-flight commands get `-OUTCOMEUNKNOWN`) and wait for them to go.
    async fn break_before_make(&self, from: MemberIdx, limit: Duration) {
        let member = self.members.load().shared(from);
        let attached = || member.attached.load(std::sync::atomic::Ordering::Acquire);
        let epoch = self.route.borrow().epoch;
        self.route.send_replace(Route {
            epoch: epoch + 1,
            paused: true,
            ..Route::default()
        });
        let deadline = Instant::now() + limit;
        while attached() > 0 && Instant::now() < deadline {
            tokio::time::sleep(STRICT_POLL).await;
        }
        if attached() > 0 {
            warn!(
                member = member.id(),
                sessions = attached(),
                "strict switch: sessions still on the old member after failover.strict_timeout; evicting them"
            );
            self.route.send_replace(Route {
                epoch: epoch + 2,
                paused: true,
                evict: Some(from),
                ..Route::default()
            });
            // Eviction answers at once; this bound only guards against a stuck session.
            let deadline = Instant::now() + limit;
            while attached() > 0 && Instant::now() < deadline {
                tokio::time::sleep(STRICT_POLL).await;
            }
        }
    }

    /// Every slot's view (a removed member's too: the router must see it to leave it).
    fn views(&self) -> Vec<MemberView> {
        self.members
            .load()
            .all()
            .map(|(i, m)| {
                let s = m.status();
                let pool = self.pool.as_ref().and_then(|p| p.state(i));
                let (state, since) = pool.unwrap_or((s.state, s.since));
                MemberView {
                    state,
                    since,
                    cause: s.cause,
                    synced: s.synced,
                }
            })
            .collect()
    }

    /// Publishes the failback gate: `/v1/status` and `geoproxy_failback_held`.
    fn publish_gate(&self, views: &[MemberView], now: Instant) {
        let gate = self.router.gate(views, now);
        let mut cell = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if *cell == gate {
            return;
        }
        *cell = gate;
        let members = self.members.load();
        for (i, m) in members.iter() {
            let held = gate.filter(|(g, _)| *g == i).map(|(_, why)| why.label());
            self.metrics.failback_held(m.id(), held);
        }
        if let Some((i, Gate::Sync)) = gate {
            let member = members.get(i);
            let why = member.status().unsynced_because.unwrap_or_default();
            info!(
                member = member.id(),
                why, "failback held: the member is not synced"
            );
        }
    }

    /// Publishes a switch: the route (strictly: first nobody, then the new member), the
    /// metrics, the history and one log line.
    async fn publish(&self, decision: Decision) {
        let Some(switch) = decision.switch else {
            return;
        };
        let members = self.members.load();
        let name = |i: Option<MemberIdx>| i.map_or("none", |i| members.get(i).id());
        // Recorded first, so that every session that leaves the old member counts against
        // this switch.
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.history.push(SwitchRecord {
            at,
            epoch: self.route.borrow().epoch + 1,
            from: switch.from.map(|i| members.get(i).id().to_string()),
            to: switch.to.map(|i| members.get(i).id().to_string()),
            reason: switch.reason.to_string(),
            sessions: SessionCounts::default(),
        });
        if let (Some(limit), Some(from), Some(_)) = (self.strict, switch.from, switch.to) {
            self.break_before_make(from, limit).await;
        }
        let epoch = self.route.borrow().epoch + 1;
        self.history.set_epoch(epoch);
        let standby = switch.reason == Reason::Standby;
        self.route.send_replace(Route {
            epoch,
            member: switch.to,
            standby,
            // A proxy that stops serving leaves its member at once, in-flight or not.
            evict: switch.from.filter(|_| standby),
            ..Route::default()
        });
        let (from, to, reason) = (name(switch.from), name(switch.to), switch.reason);
        self.metrics.switched(from, to, &reason.to_string());
        for (i, m) in members.iter() {
            self.metrics.active_member(m.id(), switch.to == Some(i));
        }
        self.metrics
            .no_member_available
            .set((switch.to.is_none() && !standby).into());
        if standby {
            info!(from, %reason, epoch, "switch: standby, not serving");
        } else if switch.to.is_none() {
            warn!(from, to, %reason, epoch, "switch: no member available");
        } else {
            info!(from, to, %reason, epoch, "switch");
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

    const HOLD_MAX: Duration = Duration::from_secs(240);

    fn router(failback: Failback) -> Router {
        let config = FailoverConfig {
            failback,
            failback_after: GRACE,
            retry_reads: false,
            flap_hold_max: HOLD_MAX,
            switch: crate::config::SwitchMode::PerSession,
            strict_timeout: Duration::from_secs(1),
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
                cause: (state == Down).then_some(Cause::Check(Kind::Ping)),
                synced: true,
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

    /// Decides `members` as `(state, seconds up, synced)` at `t0 + at`.
    fn synced_views(t0: Instant, at: u64, members: &[(State, u64, bool)]) -> Vec<MemberView> {
        let plain: Vec<(State, u64)> = members.iter().map(|&(s, b, _)| (s, b)).collect();
        let mut v = views(t0, at, &plain);
        for (view, &(_, _, synced)) in v.iter_mut().zip(members) {
            view.synced = synced;
        }
        v
    }

    #[test]
    fn failback_waits_for_sync_and_the_gate_says_why() {
        let t0 = Instant::now() + Duration::from_secs(1000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = router(Failback::Auto);
        r.decide(
            &synced_views(t0, 0, &[(Up, 0, true), (Up, 0, true), (Up, 0, true)]),
            at(0),
        );
        r.decide(
            &synced_views(t0, 5, &[(Down, 0, false), (Up, 5, true), (Up, 5, true)]),
            at(5),
        );
        assert_eq!(r.active(), Some(1));
        // 0 is back: first its hold, then (settled) its sync holds the failback.
        let v = synced_views(t0, 10, &[(Up, 0, false), (Up, 10, true), (Up, 10, true)]);
        r.decide(&v, at(10));
        assert!(matches!(r.gate(&v, at(10)), Some((0, Gate::Hold { .. }))));
        let v = synced_views(
            t0,
            100,
            &[(Up, 90, false), (Up, 100, true), (Up, 100, true)],
        );
        let d = r.decide(&v, at(100));
        assert_eq!(
            (r.active(), d.wake_at),
            (Some(1), None),
            "no wake for a sync gate"
        );
        assert_eq!(r.gate(&v, at(100)), Some((0, Gate::Sync)));
        let v = synced_views(t0, 101, &[(Up, 91, true), (Up, 101, true), (Up, 101, true)]);
        r.decide(&v, at(101));
        assert_eq!((r.active(), r.gate(&v, at(101))), (Some(0), None));
    }

    #[test]
    fn failover_prefers_a_synced_member() {
        let got = |synced1: bool, synced2: bool| {
            let t0 = Instant::now() + Duration::from_secs(1000);
            let mut r = router(Failback::Auto);
            let members = [(Up, 0, true), (Up, 0, synced1), (Up, 0, synced2)];
            r.decide(&synced_views(t0, 0, &members), t0);
            let members = [(Down, 0, true), (Up, 100, synced1), (Up, 100, synced2)];
            r.decide(
                &synced_views(t0, 100, &members),
                t0 + Duration::from_secs(100),
            );
            r.active()
        };
        assert_eq!(got(true, true), Some(1));
        assert_eq!(got(false, true), Some(2));
        // None synced: the first settled one still beats none.
        assert_eq!(got(false, false), Some(1));
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
    fn failover_prefers_a_settled_member_to_one_just_back() {
        // 1 came back 3 s ago (it was down while it was not active): 2 has been up all
        // along, so the failover from 0 goes to 2.
        let got = script(
            Failback::Auto,
            &[
                (0, &[(Up, 0), (Up, 0), (Up, 0)]),
                (40, &[(Up, 40), (Up, 3), (Up, 40)]),
                (41, &[(Down, 0), (Up, 4), (Up, 41)]),
            ],
        );
        assert_eq!(got, [Some(0), Some(0), Some(2)]);
        // With no settled member, any member up beats none.
        let got = script(
            Failback::Auto,
            &[
                (0, &[(Up, 0), (Up, 0), (Down, 0)]),
                (40, &[(Down, 0), (Up, 3), (Down, 40)]),
            ],
        );
        assert_eq!(got, [Some(0), Some(1)]);
    }

    #[test]
    fn a_flapping_member_is_held_longer_each_time() {
        let t0 = Instant::now() + Duration::from_secs(1000);
        let mut r = router(Failback::Auto);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let v = |now: u64, m0: (State, u64)| views(t0, now, &[m0, (Up, now), (Down, now)]);
        r.decide(&v(0, (Up, 0)), at(0));
        // 0 fails, comes back, is failed back to after 30 s, fails again 5 s later: flapped,
        // so the next failback waits 60 s, then 120 s, capped at 240 s.
        let mut now = 0;
        for hold in [30, 60, 120, 240, 240] {
            now += 1;
            r.decide(&v(now, (Down, 0)), at(now));
            assert_eq!(r.active(), Some(1));
            now += 1;
            r.decide(&v(now, (Up, 0)), at(now));
            assert_eq!(r.hold(0), Duration::from_secs(hold));
            let d = r.decide(&v(now + hold - 1, (Up, hold - 1)), at(now + hold - 1));
            assert_eq!(r.active(), Some(1), "held {hold} s");
            assert_eq!(d.wake_at, Some(at(now + hold)));
            now += hold;
            r.decide(&v(now, (Up, hold)), at(now));
            assert_eq!(r.active(), Some(0), "back after {hold} s");
            now += 5;
        }
        // Serving for `flap_hold_max` without failing makes it stable again.
        now += 240;
        r.decide(&v(now, (Down, 0)), at(now));
        assert_eq!(r.hold(0), GRACE);
    }

    #[test]
    fn switchover_goes_to_a_healthy_member_and_stays() {
        let t0 = Instant::now() + Duration::from_secs(1000);
        let mut r = router(Failback::Auto);
        let all_up = views(t0, 100, &[(Up, 100), (Up, 100), (Down, 100)]);
        r.decide(&all_up, t0);
        assert_eq!(r.switchover(2, &all_up, t0), Err(OperatorError::NotHealthy));
        assert_eq!(
            r.switchover(7, &all_up, t0),
            Err(OperatorError::UnknownMember)
        );
        let d = r.switchover(1, &all_up, t0).unwrap();
        assert_eq!(d.switch.map(|s| s.reason), Some(Reason::Operator));
        // Auto failback does not undo an operator's choice...
        let later = t0 + Duration::from_secs(500);
        r.decide(&views(t0, 600, &[(Up, 600), (Up, 600), (Down, 600)]), later);
        assert_eq!(r.active(), Some(1));
        // ...until the chosen member fails.
        let d = r.decide(&views(t0, 601, &[(Up, 601), (Down, 0), (Down, 601)]), later);
        assert_eq!(r.active(), Some(0));
        assert_eq!(
            d.switch.map(|s| s.reason),
            Some(Reason::Failover(Cause::Check(Kind::Ping)))
        );
        // Manual failback: a switchover is the way back to the preferred member.
        let mut r = router(Failback::Manual);
        r.decide(&all_up, t0);
        r.decide(&views(t0, 101, &[(Down, 0), (Up, 101), (Down, 101)]), t0);
        r.decide(&views(t0, 500, &[(Up, 300), (Up, 500), (Down, 500)]), later);
        assert_eq!(r.active(), Some(1));
        let up = views(t0, 500, &[(Up, 300), (Up, 500), (Down, 500)]);
        r.switchover(0, &up, later).unwrap();
        assert_eq!(r.active(), Some(0));
    }

    #[test]
    fn a_drained_member_is_never_chosen_until_enabled() {
        let t0 = Instant::now() + Duration::from_secs(1000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = router(Failback::Auto);
        let all_up = views(t0, 100, &[(Up, 100), (Up, 100), (Up, 100)]);
        r.decide(&all_up, at(100));
        assert_eq!(r.active(), Some(0));
        // Draining the active member moves traffic at once, with its own reason.
        let d = r.operate(Operation::Drain(0), &all_up, at(100)).unwrap();
        assert_eq!(
            d.switch.map(|s| (s.to, s.reason)),
            Some((Some(1), Reason::Drain))
        );
        // No failback to it, however long it stays healthy.
        r.decide(&views(t0, 900, &[(Up, 900), (Up, 900), (Up, 900)]), at(900));
        assert_eq!(r.active(), Some(1));
        // Nor a failover: with 1 down, 2 takes the traffic...
        let d = r.decide(&views(t0, 901, &[(Up, 901), (Down, 0), (Up, 901)]), at(901));
        assert_eq!(d.switch.and_then(|s| s.to), Some(2));
        // ...and with 2 down too, no member rather than the drained one.
        r.decide(&views(t0, 902, &[(Up, 902), (Down, 1), (Down, 0)]), at(902));
        assert_eq!(r.active(), None);
        // A switchover to a drained member is refused; enabling brings it back.
        let only_0 = views(t0, 903, &[(Up, 903), (Down, 2), (Down, 1)]);
        let refused = r.operate(Operation::Switchover(0), &only_0, at(903));
        assert_eq!(refused, Err(OperatorError::Drained));
        let d = r.operate(Operation::Enable(0), &only_0, at(903)).unwrap();
        assert_eq!(
            d.switch.map(|s| (s.to, s.reason)),
            Some((Some(0), Reason::Recovered))
        );
        // The last member up cannot be drained.
        let refused = r.operate(Operation::Drain(0), &only_0, at(904));
        assert_eq!(refused, Err(OperatorError::LastMember));
        assert_eq!(
            r.operate(Operation::Drain(9), &only_0, at(904)),
            Err(OperatorError::UnknownMember)
        );
        // Only the active member's traffic needs somewhere to go: any other can be drained.
        assert!(r.operate(Operation::Drain(1), &only_0, at(904)).is_ok());
        assert_eq!(r.active(), Some(0));
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

    /// A reload reorders, adds and removes members: slots stay, the preference changes.
    #[test]
    fn a_reload_changes_the_preference_and_leaves_a_removed_member() {
        let t0 = Instant::now() + Duration::from_secs(1000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = router(Failback::Auto);
        r.decide(&views(t0, 100, &[(Up, 100), (Up, 100), (Up, 100)]), at(100));
        assert_eq!(r.active(), Some(0));
        // Slot 3 is new and now preferred; 0 stays, behind it. Its hold starts now.
        r.set_preference(vec![3, 0, 1], 4);
        let four = |s| views(t0, s, &[(Up, s), (Up, s), (Up, s), (Up, s)]);
        let just_up = views(t0, 100, &[(Up, 100), (Up, 100), (Up, 100), (Up, 0)]);
        let d = r.decide(&just_up, at(100));
        assert_eq!(d.switch, None);
        let d = r.decide(&four(200), at(200));
        assert_eq!(
            d.switch.map(|s| (s.from, s.to, s.reason)),
            Some((Some(0), Some(3), Reason::Failback))
        );
        // Slot 2 left the preference: never chosen, even when it is the only one up.
        let only_2 = views(t0, 201, &[(Down, 0), (Down, 0), (Up, 201), (Down, 0)]);
        r.decide(&only_2, at(201));
        assert_eq!(r.active(), None);
        // The active member leaves the configuration: traffic leaves it, saying why.
        let d = r.decide(&four(300), at(300));
        assert_eq!(d.switch.and_then(|s| s.to), Some(3));
        r.set_preference(vec![0, 1], 4);
        let d = r.decide(&four(301), at(301));
        assert_eq!(
            d.switch.map(|s| (s.from, s.to, s.reason)),
            Some((Some(3), Some(0), Reason::Removed))
        );
        assert_eq!(
            r.operate(Operation::Switchover(3), &four(302), at(302)),
            Err(OperatorError::UnknownMember)
        );
    }

    #[test]
    fn reasons_name_the_cause() {
        let reasons = [
            Reason::Failover(Cause::Check(Kind::Ping)),
            Reason::Failover(Cause::Passive(crate::member::Signal::ConnectionLost)),
            Reason::Failover(Cause::Errors),
            Reason::Failback,
            Reason::Operator,
        ];
        let names: Vec<String> = reasons.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            names,
            [
                "check:ping",
                "passive:connection_lost",
                "passive:errors",
                "failback",
                "operator"
            ]
        );
    }
}
