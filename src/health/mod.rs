//! Health: consecutive-result counters per member, and the checker task that feeds them.
//!
//! A member's [`Health`] changes state only after `rise` consecutive good or `fall`
//! consecutive bad results, or at once when a passive signal is confirmed by a probe on a
//! fresh connection ([`evidence`]) or the member's own error replies trip its window
//! ([`errors`]). Only a flip logs, counts a metric and wakes the router.

mod checker;
pub mod errors;
pub mod evidence;
mod ping;

pub use checker::Checker;
pub use evidence::Evidence;

use std::fmt;

use serde::Serialize;

use crate::member::Signal;

/// Why a member went down: the first half of a failover's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// `fall` consecutive PING checks failed.
    Check,
    /// A session's signal, confirmed by a probe on a fresh connection.
    Passive(Signal),
    /// The member's "cannot serve" error replies tripped its error window.
    Errors,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Check => f.write_str("check:ping"),
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

    /// Up/Unknown -> Down at once: a confirmed passive signal, or a tripped error window.
    pub fn force_down(&mut self) -> Option<Flip> {
        if self.state == State::Down {
            self.streak = 0; // a recovery in progress starts over
            return None;
        }
        Some(self.flip(State::Down))
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
                    '!' => h.force_down(),
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
            (2, 2, "+!", &[Up, Down]),
            (2, 2, "+!+!++", &[Up, Down, Down, Down, Down, Up]),
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
        assert_eq!(h.force_down(), None);
    }
}
