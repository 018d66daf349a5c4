//! What a member's checks add up to: its health (by the policy) and whether it is synced.
//!
//! Pure: check results in, flips out; tested with tables. Every check feeds its own
//! consecutive-result counter ([`Health`]); the *health* checks combine by the policy
//! (`all`, `majority`, `any`) into the member's state, and the *sync* checks (lag,
//! replication) say whether the member is re-synced: they gate failback and the choice of a
//! failover target, but they take a member down only when configured with `role = "health"`.
//! A confirmed passive signal or a tripped error window forces the member down whatever the
//! policy, until its PING check has passed `rise` times again.

use std::fmt;

use serde::Serialize;

use super::{Cause, Flip, Health, State};

/// The kinds of check (one file each in `health/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ping,
    Keyspace,
    Availability,
    /// The lag-aware availability request (`extend_check=lag`).
    Lag,
    Replication,
    Custom,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Ping => "ping",
            Kind::Keyspace => "keyspace",
            Kind::Availability => "availability",
            Kind::Lag => "lag",
            Kind::Replication => "replication",
            Kind::Custom => "custom",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What a check's result decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Failing takes the member down (as the policy combines them): a failover.
    Health,
    /// Failing holds failback and makes the member a worse failover target; reported only.
    Sync,
}

/// How a member's health checks combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Up when every health check passes.
    #[default]
    All,
    /// Up when more than half pass.
    Majority,
    /// Up when one passes.
    Any,
}

/// One check of a member, as it is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub kind: Kind,
    /// Unique among the member's checks: the kind's label, or a custom check's name.
    pub name: String,
    pub role: Role,
    pub rise: u32,
    pub fall: u32,
}

/// A check's current verdict, as `/v1/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckStatus {
    pub name: String,
    pub kind: Kind,
    pub role: Role,
    pub state: State,
    /// Why the last run failed, until one passes.
    pub last_error: Option<String>,
    pub last_seconds: Option<f64>,
}

/// What one result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The observed check's own state after the result.
    pub check: State,
    /// The member's health flipped.
    pub flip: Option<Flip>,
    /// The member's sync flipped to this.
    pub synced: Option<bool>,
}

/// A member's checks and what they add up to.
#[derive(Debug)]
pub struct Verdicts {
    policy: Policy,
    slots: Vec<Slot>,
    checks: Vec<Health>,
    status: Vec<CheckStatus>,
    /// Forced down by evidence: the cause, and the PING successes seen since.
    forced: Option<(Cause, u32)>,
    state: State,
    synced: bool,
}

impl Verdicts {
    /// `slots[0]` is the PING check (it clears a forced down).
    pub fn new(policy: Policy, slots: Vec<Slot>) -> Verdicts {
        let checks = slots.iter().map(|s| Health::new(s.rise, s.fall)).collect();
        let status = slots
            .iter()
            .map(|s| CheckStatus {
                name: s.name.clone(),
                kind: s.kind,
                role: s.role,
                state: State::Unknown,
                last_error: None,
                last_seconds: None,
            })
            .collect();
        let mut v = Verdicts {
            policy,
            slots,
            checks,
            status,
            forced: None,
            state: State::Unknown,
            synced: false,
        };
        v.synced = v.compute_synced();
        v
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Every sync check passes (true when there is none).
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn checks(&self) -> &[CheckStatus] {
        &self.status
    }

    /// Why the member is not synced: the first failing sync check's error.
    pub fn unsynced_because(&self) -> Option<String> {
        if self.synced {
            return None;
        }
        self.status
            .iter()
            .find(|c| c.role == Role::Sync && c.state != State::Up)
            .map(|c| match &c.last_error {
                Some(e) => format!("{}: {e}", c.name),
                None => format!("{}: not checked yet", c.name),
            })
    }

    /// The cause of a fall: the first health check that is down.
    pub fn cause(&self) -> Cause {
        if let Some((cause, _)) = self.forced {
            return cause;
        }
        self.status
            .iter()
            .find(|c| c.role == Role::Health && c.state == State::Down)
            .map_or(Cause::Check(Kind::Ping), |c| Cause::Check(c.kind))
    }

    /// Records one result of check `slot`.
    pub fn observe(&mut self, slot: usize, result: Result<(), String>, seconds: f64) -> Change {
        let ok = result.is_ok();
        self.checks[slot].observe(ok);
        let check = self.checks[slot].state();
        let status = &mut self.status[slot];
        status.state = check;
        status.last_error = result.err();
        status.last_seconds = Some(seconds);
        if slot == 0 {
            if let Some((_, passes)) = &mut self.forced {
                *passes = if ok { *passes + 1 } else { 0 };
                if *passes >= self.slots[0].rise {
                    self.forced = None;
                }
            }
        }
        self.settle(check)
    }

    /// A reload changed the checks: each check still configured (same name and kind) keeps
    /// its state and streak under its new `rise`/`fall`; a new one starts unknown (and, as
    /// at start, does not move the member until it answers).
    pub fn reconfigure(&mut self, policy: Policy, slots: Vec<Slot>) -> Change {
        let mut fresh = Verdicts::new(policy, slots);
        for (i, slot) in fresh.slots.iter().enumerate() {
            let old = self
                .slots
                .iter()
                .position(|s| s.name == slot.name && s.kind == slot.kind);
            if let Some(j) = old {
                fresh.checks[i] = self.checks[j].with_limits(slot.rise, slot.fall);
                fresh.status[i] = CheckStatus {
                    role: slot.role,
                    ..self.status[j].clone()
                };
            }
        }
        fresh.forced = self.forced;
        fresh.state = self.state;
        fresh.synced = self.synced;
        *self = fresh;
        let check = self.status.first().map_or(State::Unknown, |c| c.state);
        self.settle(check)
    }

    /// Down at once, whatever the policy: a confirmed passive signal or a tripped error
    /// window. Up again once the PING check has passed `rise` times in a row.
    pub fn force_down(&mut self, cause: Cause) -> Change {
        self.forced = Some((cause, 0));
        self.settle(State::Down)
    }

    fn settle(&mut self, check: State) -> Change {
        let state = self.compute_state();
        let synced = self.compute_synced();
        let flip = (state != self.state).then_some(Flip {
            from: self.state,
            to: state,
        });
        let synced_flip = (synced != self.synced).then_some(synced);
        self.state = state;
        self.synced = synced;
        Change {
            check,
            flip,
            synced: synced_flip,
        }
    }

    fn compute_state(&self) -> State {
        if self.forced.is_some() {
            return State::Down;
        }
        let states = self.of_role(Role::Health);
        let n = states.len();
        let up = states.iter().filter(|s| **s == State::Up).count();
        let down = states.iter().filter(|s| **s == State::Down).count();
        let (is_up, is_down) = match self.policy {
            Policy::All => (up == n, down > 0),
            Policy::Any => (up > 0, down == n),
            Policy::Majority => (up * 2 > n, down * 2 >= n),
        };
        match (is_up, is_down) {
            (true, _) => State::Up,
            (false, true) => State::Down,
            // Not all checks have answered yet: keep what the member was.
            _ if self.state != State::Unknown => self.state,
            _ => State::Unknown,
        }
    }

    fn compute_synced(&self) -> bool {
        self.of_role(Role::Sync).iter().all(|s| *s == State::Up)
    }

    fn of_role(&self, role: Role) -> Vec<State> {
        self.status
            .iter()
            .filter(|c| c.role == role)
            .map(|c| c.state)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::member::Signal;
    use State::*;

    fn slot(kind: Kind, role: Role) -> Slot {
        Slot {
            kind,
            name: kind.label().into(),
            role,
            rise: 1,
            fall: 1,
        }
    }

    /// Three health checks (ping, keyspace, custom) and one sync check (replication).
    fn verdicts(policy: Policy) -> Verdicts {
        Verdicts::new(
            policy,
            vec![
                slot(Kind::Ping, Role::Health),
                slot(Kind::Keyspace, Role::Health),
                slot(Kind::Custom, Role::Health),
                slot(Kind::Replication, Role::Sync),
            ],
        )
    }

    fn result(ok: bool) -> Result<(), String> {
        if ok {
            Ok(())
        } else {
            Err("no".into())
        }
    }

    /// Feeds the health checks' results (`+`/`-` per check, in slot order) and returns the
    /// member's state.
    fn after(policy: Policy, results: &str) -> State {
        let mut v = verdicts(policy);
        for (slot, c) in results.chars().enumerate() {
            v.observe(slot, result(c == '+'), 0.0);
        }
        v.state()
    }

    #[test]
    fn policies_combine_the_health_checks() {
        let cases: &[(Policy, &str, State)] = &[
            (Policy::All, "+++", Up),
            (Policy::All, "++-", Down),
            (Policy::All, "++", Unknown), // one not checked yet
            (Policy::All, "-", Down),
            (Policy::Majority, "++-", Up),
            (Policy::Majority, "+--", Down),
            (Policy::Majority, "+-", Unknown),
            (Policy::Majority, "++", Up),
            (Policy::Any, "--+", Up),
            (Policy::Any, "---", Down),
            (Policy::Any, "--", Unknown),
        ];
        for (policy, results, want) in cases {
            assert_eq!(after(*policy, results), *want, "{policy:?} {results}");
        }
    }

    #[test]
    fn sync_checks_never_take_a_member_down() {
        let mut v = verdicts(Policy::All);
        for slot in 0..3 {
            v.observe(slot, Ok(()), 0.0);
        }
        assert_eq!(v.state(), Up);
        assert!(!v.synced(), "a sync check not run yet is not synced");
        let change = v.observe(3, Err("replication from b: 4.2 s behind".into()), 0.0);
        assert_eq!((v.state(), v.synced(), change.flip), (Up, false, None));
        assert_eq!(
            v.unsynced_because().as_deref(),
            Some("replication: replication from b: 4.2 s behind")
        );
        let change = v.observe(3, Ok(()), 0.0);
        assert_eq!((change.synced, v.unsynced_because()), (Some(true), None));
    }

    #[test]
    fn a_member_without_sync_checks_is_synced() {
        let v = Verdicts::new(Policy::All, vec![slot(Kind::Ping, Role::Health)]);
        assert!(v.synced());
    }

    #[test]
    fn forced_down_holds_until_ping_rises_again() {
        let mut v = Verdicts::new(
            Policy::Any,
            vec![
                Slot {
                    rise: 2,
                    ..slot(Kind::Ping, Role::Health)
                },
                slot(Kind::Keyspace, Role::Health),
            ],
        );
        v.observe(0, Ok(()), 0.0);
        v.observe(0, Ok(()), 0.0);
        v.observe(1, Ok(()), 0.0);
        assert_eq!(v.state(), Up);
        let cause = Cause::Passive(Signal::ConnectionLost);
        let change = v.force_down(cause);
        assert_eq!(change.flip, Some(Flip { from: Up, to: Down }));
        assert_eq!(v.cause(), cause);
        // Policy `any` and a passing keyspace check do not lift it; two PINGs do.
        v.observe(1, Ok(()), 0.0);
        v.observe(0, Ok(()), 0.0);
        assert_eq!(v.state(), Down);
        v.observe(0, Ok(()), 0.0);
        assert_eq!(v.state(), Up);
    }

    #[test]
    fn the_cause_names_the_failing_check() {
        let mut v = verdicts(Policy::All);
        for slot in 0..3 {
            v.observe(slot, Ok(()), 0.0);
        }
        let change = v.observe(1, Err("SET answered: -OOM".into()), 0.0);
        assert_eq!(change.flip.map(|f| f.to), Some(Down));
        assert_eq!(v.cause(), Cause::Check(Kind::Keyspace));
        assert_eq!(v.cause().to_string(), "check:keyspace");
    }

    /// A reload keeps what every check still configured knows, under its new limits.
    #[test]
    fn a_reload_keeps_the_state_of_checks_still_configured() {
        let mut v = verdicts(Policy::All);
        for slot in 0..4 {
            v.observe(slot, result(true), 0.0);
        }
        assert_eq!((v.state(), v.synced()), (Up, true));
        // Keyspace goes, a lag check comes, PING now falls after 2 failures.
        let mut ping = slot(Kind::Ping, Role::Health);
        ping.fall = 2;
        let change = v.reconfigure(
            Policy::All,
            vec![
                ping,
                slot(Kind::Custom, Role::Health),
                slot(Kind::Replication, Role::Sync),
                slot(Kind::Lag, Role::Sync),
            ],
        );
        // Still up (the new sync check is not known yet, so the member is not synced).
        assert_eq!(change.flip, None);
        assert_eq!(v.state(), Up);
        assert_eq!(v.checks()[3].state, Unknown);
        assert!(!v.synced());
        // The new limits apply: one PING failure is not a fall any more.
        assert_eq!(v.observe(0, result(false), 0.0).flip, None);
        assert!(v.observe(0, result(false), 0.0).flip.is_some());
        assert_eq!(v.state(), Down);
    }
}
