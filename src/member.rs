//! Members: the copies of the database this proxy can send traffic to, and the health
//! snapshot every other part reads.
//!
//! The member's checker (in `health`) is the only writer of its health. Sessions read one
//! atomic flag on the hot path; the router and the admin API read the fuller [`Status`]
//! under a short lock. Sessions report what they see on live traffic to the member's
//! [`Evidence`]; the checker probes and answers.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::config::MemberConfig;
use crate::health::verdict::{Change, CheckStatus, Policy, Role, Slot, Verdicts};
use crate::health::{Cause, Evidence, State};
use crate::resp::table::CommandTable;

/// The command table used until a member's own is known.
static BUILTIN_COMMANDS: LazyLock<CommandTable> = LazyLock::new(CommandTable::builtin);

/// Most connections the proxy opens to one member at once (all workers together): half of
/// Redis's default `tcp-backlog` (511), so a reconnect storm (thousands of sessions moving at
/// a failover, an application restarting its pools) never overflows the member's listen
/// queue, where a dropped SYN costs a client a 1 s retransmit.
const CONNECTS_IN_FLIGHT: usize = 256;

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

impl Signal {
    /// How many kinds there are (for per-kind counters).
    pub const KINDS: usize = 4;
    pub const ALL: [Signal; Signal::KINDS] = [
        Signal::ConnectFailed,
        Signal::ConnectionLost,
        Signal::ReplyTimeout,
        Signal::MemberDown,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The kind as metrics and switch reasons name it (`passive:<label>`).
    pub fn label(self) -> &'static str {
        match self {
            Signal::ConnectFailed => "connect_failed",
            Signal::ConnectionLost => "connection_lost",
            Signal::ReplyTimeout => "reply_timeout",
            Signal::MemberDown => "member_down",
        }
    }
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
    /// Why the member is down (while it is).
    pub cause: Option<Cause>,
    /// Every sync check passes (lag, replication; true when none is configured).
    pub synced: bool,
    /// Why it is not synced ("replication: from eu-west 4.2 s behind").
    pub unsynced_because: Option<String>,
    /// Why it is down, or else the first failing check's error.
    pub last_error: Option<String>,
    /// Duration of the last PING check, in seconds.
    pub last_check_seconds: Option<f64>,
    /// Every check's verdict.
    pub checks: Vec<CheckStatus>,
}

/// The member's checks and the times their sum last changed.
#[derive(Debug)]
struct Record {
    verdicts: Verdicts,
    since: Instant,
    /// Why the member went down, as it was when it went (kept while it is down).
    cause: Option<Cause>,
    /// What forced the member down (a confirmed signal, a tripped error window).
    forced_because: Option<String>,
}

pub struct Member {
    pub config: MemberConfig,
    /// Mirrors `status.state == Up`, for sessions (no lock on the hot path).
    up: AtomicBool,
    record: Mutex<Record>,
    /// Passive signals, waiting for the checker's confirming probe.
    pub evidence: Evidence,
    /// Replies in which the member said it cannot serve (`-LOADING`, `-BUSY`, ...): the
    /// checker's error window reads the total.
    refusals: AtomicU64,
    /// The member's own `COMMAND` table, once its checker fetched it.
    commands: OnceLock<CommandTable>,
    /// Sessions' connection attempts in flight to this member.
    pub connects: Semaphore,
    /// Sessions with an upstream to this member now (a strict switch waits for none).
    pub attached: Arc<AtomicUsize>,
}

/// Counts one session's upstream in [`Member::attached`] for as long as it lives.
#[derive(Debug)]
pub struct Attached(Arc<AtomicUsize>);

impl Attached {
    pub fn new(member: &Member) -> Attached {
        member.attached.fetch_add(1, Ordering::AcqRel);
        Attached(member.attached.clone())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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

    /// The member's state, without copying its checks.
    pub fn state(&self) -> State {
        self.lock().verdicts.state()
    }

    /// A copy of the member's health.
    pub fn status(&self) -> Status {
        let r = self.lock();
        let v = &r.verdicts;
        let state = v.state();
        let failing = v
            .checks()
            .iter()
            .filter(|c| c.state != State::Up && c.last_error.is_some())
            .min_by_key(|c| c.role != Role::Health)
            .and_then(|c| c.last_error.clone());
        Status {
            state,
            since: r.since,
            cause: r.cause.filter(|_| state == State::Down),
            synced: v.synced(),
            unsynced_because: v.unsynced_because(),
            last_error: r.forced_because.clone().or(failing),
            last_check_seconds: v.checks().first().and_then(|c| c.last_seconds),
            checks: v.checks().to_vec(),
        }
    }

    /// The member's checks, as configured.
    pub fn slots(&self) -> Vec<Slot> {
        self.lock().verdicts.slots().to_vec()
    }

    /// Records one result of check `slot` (a checker's call); returns what it changed.
    pub(crate) fn observe(
        &self,
        slot: usize,
        result: Result<(), String>,
        seconds: f64,
        now: Instant,
    ) -> Change {
        let mut r = self.lock();
        let change = r.verdicts.observe(slot, result, seconds);
        self.settle(&mut r, change, now)
    }

    /// Down at once: a confirmed passive signal or a tripped error window.
    pub(crate) fn force_down(&self, cause: Cause, why: String, now: Instant) -> Change {
        let mut r = self.lock();
        let change = r.verdicts.force_down(cause);
        r.forced_because = Some(why);
        self.settle(&mut r, change, now)
    }

    fn settle(&self, r: &mut Record, change: Change, now: Instant) -> Change {
        if let Some(flip) = change.flip {
            r.since = now;
            r.cause = (flip.to == State::Down).then(|| r.verdicts.cause());
            if flip.to == State::Up {
                r.forced_because = None;
            }
            self.up.store(flip.to == State::Up, Ordering::Relaxed);
        }
        change
    }

    /// `n` replies in which the member said it cannot serve.
    pub fn refused(&self, n: u64) {
        self.refusals.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Record> {
        // A panic while holding this lock cannot leave a half-written record: recover it.
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// All members in preference order, and the bell that wakes the router when one flips.
pub struct Members {
    pub list: Vec<Member>,
    pub changed: Notify,
}

impl Members {
    /// Every member gets the same checks, combined by `policy`.
    pub fn new(
        configs: &[MemberConfig],
        policy: Policy,
        slots: &[Slot],
        now: Instant,
    ) -> Arc<Members> {
        let list = configs
            .iter()
            .map(|config| Member {
                config: config.clone(),
                up: AtomicBool::new(false),
                record: Mutex::new(Record {
                    verdicts: Verdicts::new(policy, slots.to_vec()),
                    since: now,
                    cause: None,
                    forced_because: None,
                }),
                evidence: Evidence::default(),
                refusals: AtomicU64::new(0),
                commands: OnceLock::new(),
                connects: Semaphore::new(CONNECTS_IN_FLIGHT),
                attached: Arc::new(AtomicUsize::new(0)),
            })
            .collect();
        Arc::new(Members {
            list,
            changed: Notify::new(),
        })
    }

    /// Lock-free: is any member up?
    pub fn any_up(&self) -> bool {
        self.list.iter().any(Member::is_up)
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
