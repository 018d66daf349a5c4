//! Health: the checks of every member, and what they add up to.
//!
//! Each check kind is one file behind the small [`Check`] trait (`ping`, `keyspace`,
//! `availability`, `custom`) and runs in a [`Checker`] task of its own per member; the
//! replication check is one task for all members (it measures pairs). Every check has its
//! own consecutive-result counter ([`Health`]: `rise` good or `fall` bad results flip it),
//! and [`verdict`] combines them by the policy into the member's state and sync. A passive
//! signal confirmed by a probe on a fresh connection ([`evidence`], [`passive`]) or a tripped
//! error window ([`errors`]) takes the member down at once. Only a flip logs, counts a metric
//! and wakes the router.

mod availability;
mod check;
mod custom;
pub mod errors;
pub mod evidence;
mod keyspace;
mod passive;
mod ping;
pub mod replication;
pub mod verdict;

pub use check::{plan, spawn, Check};
pub use evidence::Evidence;

use std::fmt;

use serde::Serialize;

use crate::member::Signal;

/// Why a member went down: the first half of a failover's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A check of this kind failed `fall` times in a row (and the policy let it count).
    Check(verdict::Kind),
    /// A session's signal, confirmed by a probe on a fresh connection.
    Passive(Signal),
    /// The member's "cannot serve" error replies tripped its error window.
    Errors,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Check(kind) => write!(f, "check:{kind}"),
            Cause::Passive(signal) => write!(f, "passive:{}", signal.label()),
            Cause::Errors => f.write_str("passive:errors"),
        }
    }
}

/// A member's health state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not checked yet (only right after start).
    Unknown,
    Up,
    Down,
}

/// A change of state, returned by [`Health::observe`] and [`Health::force_down`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flip {
    pub from: State,
    pub to: State,
}

/// Consecutive-result counters for one member.
#[derive(Debug)]
pub struct Health {
    state: State,
    /// Consecutive results that disagree with `state`.
    streak: u32,
    rise: u32,
    fall: u32,
}

impl Health {
    pub fn new(rise: u32, fall: u32) -> Health {
        Health {
            state: State::Unknown,
            streak: 0,
            rise,
            fall,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The same counter under new limits (a reload).
    pub fn with_limits(&self, rise: u32, fall: u32) -> Health {
        Health {
            rise,
            fall,
            ..*self
        }
    }

    /// Records one check result; returns the flip it caused, if any.
    pub fn observe(&mut self, ok: bool) -> Option<Flip> {
        let to = match (self.state, ok) {
            // Unknown -> Up/Down: the first result decides; there is no history to protect.
            (State::Unknown, true) => State::Up,
            (State::Unknown, false) => State::Down,
            // A result that agrees with the state breaks any streak.
            (State::Up, true) | (State::Down, false) => {
                self.streak = 0;
                return None;
            }
            // Down -> Up: `rise` consecutive successes.
            (State::Down, true) => {
                self.streak += 1;
                if self.streak < self.rise {
                    return None;
                }
                State::Up
            }
            // Up -> Down: `fall` consecutive failures.
            (State::Up, false) => {
                self.streak += 1;
                if self.streak < self.fall {
                    return None;
                }
                State::Down
            }
        };
        Some(self.flip(to))
    }

    fn flip(&mut self, to: State) -> Flip {
        let from = self.state;
        self.state = to;
        self.streak = 0;
        Flip { from, to }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    /// Feeds results to a fresh `Health` and returns the state after each.
    fn run(rise: u32, fall: u32, results: &str) -> Vec<State> {
        let mut h = Health::new(rise, fall);
        results
            .chars()
            .map(|c| {
                match c {
                    '+' => h.observe(true),
                    '-' => h.observe(false),
                    _ => unreachable!(),
                };
                h.state()
            })
            .collect()
    }

    #[test]
    fn table() {
        let cases: &[(u32, u32, &str, &[State])] = &[
            (2, 2, "+", &[Up]),
            (2, 2, "-", &[Down]),
            (2, 2, "+-+-", &[Up, Up, Up, Up]),
            (2, 2, "+--", &[Up, Up, Down]),
            (2, 3, "+---", &[Up, Up, Up, Down]),
            (2, 2, "-+-++", &[Down, Down, Down, Down, Up]),
            (1, 1, "-+-", &[Down, Up, Down]),
        ];
        for (rise, fall, results, want) in cases {
            assert_eq!(
                &run(*rise, *fall, results),
                want,
                "rise={rise} fall={fall} {results}"
            );
        }
    }

    #[test]
    fn only_changes_are_flips() {
        let mut h = Health::new(2, 2);
        assert_eq!(
            h.observe(true),
            Some(Flip {
                from: Unknown,
                to: Up
            })
        );
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(Flip { from: Up, to: Down }));
        assert_eq!(h.observe(false), None);
    }
}
