//! Members: the copies of the database this proxy can send traffic to, and the health
//! snapshot every other part reads.
//!
//! The member's checker (in `health`) is the only writer of its health. Sessions read one
//! atomic flag on the hot path; the router and the admin API read the fuller [`Status`]
//! under a short lock. Sessions report what they see on live traffic with
//! [`Member::report`]; the checker acts on it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::MemberConfig;
use crate::health::State;
use crate::resp::table::CommandTable;

/// The command table used until a member's own is known.
static BUILTIN_COMMANDS: LazyLock<CommandTable> = LazyLock::new(CommandTable::builtin);

/// Index of a member in preference order (0 = most preferred).
pub type MemberIdx = usize;

/// What a session saw that says a member cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Connect refused, unreachable, or timed out.
    ConnectFailed,
    /// The connection was reset or closed while replies were owed.
    ConnectionLost,
    /// No reply within `reply_timeout`: the member accepts but does not answer.
    ReplyTimeout,
    /// The route left the member because its checks found it down (not reported back).
    MemberDown,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::ConnectFailed => "connect failed",
            Signal::ConnectionLost => "connection lost",
            Signal::ReplyTimeout => "reply timeout",
            Signal::MemberDown => "member down",
        })
    }
}

/// A member's health as the router and the admin API see it.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    /// When `state` last changed (the start of the current up or down period).
    pub since: Instant,
    /// The last failed check's error, kept until a check succeeds.
    pub last_error: Option<String>,
    /// Duration of the last check, in seconds.
    pub last_check_seconds: Option<f64>,
}

pub struct Member {
    pub config: MemberConfig,
    /// Mirrors `status.state == Up`, for sessions (no lock on the hot path).
    up: AtomicBool,
    status: Mutex<Status>,
    /// Passive signals to this member's checker. Bounded: a full queue means the checker
    /// already has reasons to look, so extra signals are dropped.
    signals: mpsc::Sender<Signal>,
    /// The member's own `COMMAND` table, once its checker fetched it.
    commands: OnceLock<CommandTable>,
}

impl Member {
    /// The member's command table, or the built-in one until it is known.
    pub fn command_table(&self) -> &CommandTable {
        self.commands.get().unwrap_or(&BUILTIN_COMMANDS)
    }

    pub(crate) fn knows_commands(&self) -> bool {
        self.commands.get().is_some()
    }

    pub(crate) fn set_command_table(&self, table: CommandTable) {
        let _ = self.commands.set(table);
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Lock-free: is the member up now?
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A copy of the member's health.
    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    /// Sets the health state (the checker's call).
    pub(crate) fn set_state(&self, state: State, now: Instant) {
        let mut s = self.lock();
        s.state = state;
        s.since = now;
        self.up.store(state == State::Up, Ordering::Relaxed);
    }

    pub(crate) fn record_check(&self, seconds: f64, error: Option<String>) {
        let mut s = self.lock();
        s.last_check_seconds = Some(seconds);
        s.last_error = error;
    }

    /// A session's report of a failure on live traffic (a passive signal).
    pub fn report(&self, signal: Signal) {
        let _ = self.signals.try_send(signal);
    }

    fn lock(&self) -> MutexGuard<'_, Status> {
        // A panic while holding this lock cannot leave a half-written status: recover it.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// All members in preference order, and the bell that wakes the router when one flips.
pub struct Members {
    pub list: Vec<Member>,
    pub changed: Notify,
}

impl Members {
    /// Builds the members and, for each, the receiving end of its passive-signal queue
    /// (handed to its checker).
    pub fn new(
        configs: &[MemberConfig],
        now: Instant,
    ) -> (Arc<Members>, Vec<mpsc::Receiver<Signal>>) {
        let mut receivers = Vec::with_capacity(configs.len());
        let list = configs
            .iter()
            .map(|config| {
                let (tx, rx) = mpsc::channel(16);
                receivers.push(rx);
                Member {
                    config: config.clone(),
                    up: AtomicBool::new(false),
                    status: Mutex::new(Status {
                        state: State::Unknown,
                        since: now,
                        last_error: None,
                        last_check_seconds: None,
                    }),
                    signals: tx,
                    commands: OnceLock::new(),
                }
            })
            .collect();
        let members = Members {
            list,
            changed: Notify::new(),
        };
        (Arc::new(members), receivers)
    }

    pub fn get(&self, idx: MemberIdx) -> &Member {
        &self.list[idx]
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}
