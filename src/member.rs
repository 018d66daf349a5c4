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

use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::MemberConfig;
use crate::health::verdict::{Change, CheckStatus, Policy, Role, Slot, Verdicts};
use crate::health::{Cause, Evidence, State};
use crate::resp::table::CommandTable;
use crate::session::policy::login;

/// The command table used until a member's own is known.
static BUILTIN_COMMANDS: LazyLock<CommandTable> = LazyLock::new(CommandTable::builtin);

/// Most connections the proxy opens to one member at once (all workers together): half of
/// Redis's default `tcp-backlog` (511), so a reconnect storm (thousands of sessions moving at
/// a failover, an application restarting its pools) never overflows the member's listen
/// queue, where a dropped SYN costs a client a 1 s retransmit.
const CONNECTS_IN_FLIGHT: usize = 256;

/// A member's slot in the member table: fixed for the life of the process (a reload that
/// adds a member gives it a new slot; see [`Members`]).
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
    /// With `proxy.auth = "proxy"`: the AUTH command with the member's own credentials,
    /// sent first on every upstream.
    pub login: Option<Vec<u8>>,
    proxy_auth: bool,
    /// Cancelled when a reload removes (or replaces) the member: the connections the
    /// workers pool for it close.
    retired: CancellationToken,
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

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Member").field("id", &self.id()).finish()
    }
}

impl Member {
    fn new(
        config: &MemberConfig,
        policy: Policy,
        slots: &[Slot],
        proxy_auth: bool,
        now: Instant,
    ) -> Member {
        let password = config.password.as_ref().filter(|_| proxy_auth);
        Member {
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
            login: password.map(|p| login(config.username.as_deref(), p.expose())),
            proxy_auth,
            retired: CancellationToken::new(),
        }
    }

    /// A reload removed (or replaced) this member: its pooled connections close.
    pub fn retire(&self) {
        self.retired.cancel();
    }

    pub fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    /// Waits until a reload removes the member.
    pub async fn retired(&self) {
        self.retired.cancelled().await
    }

    /// A reload changed the checks: keep the state of those still configured.
    fn reconfigure(&self, policy: Policy, slots: &[Slot], now: Instant) -> Change {
        let mut r = self.lock();
        let change = r.verdicts.reconfigure(policy, slots.to_vec());
        self.settle(&mut r, change, now)
    }

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

/// One generation of the member table: every member this proxy has known since start, by a
/// slot ([`MemberIdx`]) that never changes, and the preference over those still configured.
///
/// A reload builds the next generation ([`Members::next`]): a member whose configuration is
/// unchanged keeps its slot and its `Arc<Member>` (its health and its sessions stay), a new
/// or changed one gets a new slot, and a removed one stays in `list` (sessions and
/// checkers that still hold its slot can read it) but leaves the preference.
pub struct Members {
    list: Vec<Arc<Member>>,
    /// Slots of the configured members, best first.
    preference: Vec<MemberIdx>,
    /// Wakes the router when a member flips (shared by every generation).
    pub changed: Arc<Notify>,
}

impl Members {
    /// The first generation: every member gets the same checks, combined by `policy`.
    /// `proxy_auth`: sessions authenticate to members with the members' own credentials.
    pub fn new(
        configs: &[MemberConfig],
        policy: Policy,
        slots: &[Slot],
        proxy_auth: bool,
        now: Instant,
    ) -> Arc<Members> {
        let list: Vec<_> = configs
            .iter()
            .map(|c| Arc::new(Member::new(c, policy, slots, proxy_auth, now)))
            .collect();
        Arc::new(Members {
            preference: (0..list.len()).collect(),
            list,
            changed: Arc::new(Notify::new()),
        })
    }

    /// The generation a reload to `configs` makes of this one, and what changed. Members
    /// that stay take the new checks (`policy`, `slots`), keeping the state of every check
    /// that is still there.
    pub fn next(
        &self,
        configs: &[MemberConfig],
        policy: Policy,
        slots: &[Slot],
        proxy_auth: bool,
        now: Instant,
    ) -> (Arc<Members>, MemberChanges) {
        let mut list = self.list.clone();
        let mut preference = Vec::with_capacity(configs.len());
        let mut changes = MemberChanges::default();
        for c in configs {
            match self.find(&c.id) {
                Some(i) if self.list[i].config == *c && self.list[i].proxy_auth == proxy_auth => {
                    self.list[i].reconfigure(policy, slots, now);
                    preference.push(i);
                }
                found => {
                    let kind = if found.is_some() {
                        &mut changes.changed
                    } else {
                        &mut changes.added
                    };
                    kind.push(c.id.clone());
                    preference.push(list.len());
                    list.push(Arc::new(Member::new(c, policy, slots, proxy_auth, now)));
                }
            }
        }
        for (_, m) in self.iter() {
            if !configs.iter().any(|c| c.id == m.id()) {
                changes.removed.push(m.id().to_string());
            }
        }
        // With no member added, removed or changed, every slot is kept: only the order can
        // differ.
        changes.reordered = changes.is_empty() && preference != self.preference;
        let next = Arc::new(Members {
            list,
            preference,
            changed: self.changed.clone(),
        });
        (next, changes)
    }

    /// Lock-free: is any configured member up?
    pub fn any_up(&self) -> bool {
        self.iter().any(|(_, m)| m.is_up())
    }

    /// A member by slot: configured now or removed by a reload.
    pub fn get(&self, idx: MemberIdx) -> &Member {
        &self.list[idx]
    }

    /// The same, shared.
    pub fn shared(&self, idx: MemberIdx) -> Arc<Member> {
        self.list[idx].clone()
    }

    /// The configured members, best first, with their slots.
    pub fn iter(&self) -> impl Iterator<Item = (MemberIdx, &Member)> + Clone + '_ {
        self.preference.iter().map(|&i| (i, &*self.list[i]))
    }

    /// Every slot, configured or removed.
    pub fn all(&self) -> impl Iterator<Item = (MemberIdx, &Member)> + '_ {
        self.list.iter().map(|m| &**m).enumerate()
    }

    /// The slots of the configured members, best first.
    pub fn preference(&self) -> &[MemberIdx] {
        &self.preference
    }

    /// The slot of the configured member `id`.
    pub fn find(&self, id: &str) -> Option<MemberIdx> {
        self.iter().find(|(_, m)| m.id() == id).map(|(i, _)| i)
    }

    /// Every slot ever used (the size of per-slot tables).
    pub fn slots(&self) -> usize {
        self.list.len()
    }

    /// How many members are configured.
    pub fn len(&self) -> usize {
        self.preference.len()
    }

    pub fn is_empty(&self) -> bool {
        self.preference.is_empty()
    }
}

/// What a reload changed in the member table, by member id.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same id, another configuration (address, TLS, credentials, region, API): a new
    /// member for sessions, which move to it at their quiescent points.
    pub changed: Vec<String>,
    /// Only the preference order changed.
    pub reordered: bool,
}

impl MemberChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The member table as the last reload left it: sessions, the router, the checkers and the
/// admin API read the current generation; only a reload writes it.
pub struct Roster(watch::Sender<Arc<Members>>);

impl Roster {
    pub fn new(members: Arc<Members>) -> Arc<Roster> {
        Arc::new(Roster(watch::Sender::new(members)))
    }

    /// The current generation.
    pub fn load(&self) -> Arc<Members> {
        self.0.borrow().clone()
    }

    /// Publishes the next generation (and wakes the router).
    pub fn store(&self, next: Arc<Members>) {
        let changed = next.changed.clone();
        self.0.send_replace(next);
        changed.notify_one();
    }

    /// Member `idx` of the current generation (any slot ever used is there).
    pub fn member(&self, idx: MemberIdx) -> Arc<Member> {
        self.0.borrow().shared(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn members(list: &[(&str, &str)]) -> Vec<MemberConfig> {
        let mut text = String::from(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nmode = \"colocated\"\n\
             [admin]\nlisten = \"127.0.0.1:1\"\n",
        );
        for (id, address) in list {
            text.push_str(&format!(
                "[[members]]\nid = \"{id}\"\naddress = \"{address}\"\n"
            ));
        }
        Config::from_toml(&text).expect("valid").members
    }

    fn ids(m: &Members) -> Vec<&str> {
        m.iter().map(|(_, m)| m.id()).collect()
    }

    #[test]
    fn a_reload_keeps_unchanged_members_in_their_slots() {
        let now = Instant::now();
        let policy = Policy::All;
        let first = Members::new(
            &members(&[("a", "h:1"), ("b", "h:2"), ("c", "h:3")]),
            policy,
            &[],
            false,
            now,
        );
        let configs = members(&[("d", "h:4"), ("a", "h:1"), ("c", "h:9")]);
        let (next, changes) = first.next(&configs, policy, &[], false, now);
        assert_eq!(
            changes,
            MemberChanges {
                added: vec!["d".into()],
                removed: vec!["b".into()],
                changed: vec!["c".into()],
                reordered: false,
            }
        );
        assert_eq!(ids(&next), ["d", "a", "c"]);
        // a is the same member, in the same slot; d and the new c get new slots; b and the
        // old c stay readable by slot but are not configured.
        assert_eq!(next.preference(), [3, 0, 4]);
        assert!(Arc::ptr_eq(&first.shared(0), &next.shared(0)));
        assert_eq!(next.get(4).config.address, "h:9");
        assert_eq!(next.get(2).config.address, "h:3");
        assert!(!next.preference().contains(&1) && !next.preference().contains(&2));
        assert_eq!((next.find("c"), next.find("b")), (Some(4), None));
        assert_eq!(next.slots(), 5);
        // The same file again changes nothing; a new order is only a reorder.
        let (same, changes) = next.next(&configs, policy, &[], false, now);
        assert!(changes.is_empty() && !changes.reordered);
        assert_eq!(same.preference(), next.preference());
        let reordered = members(&[("a", "h:1"), ("d", "h:4"), ("c", "h:9")]);
        let (_, changes) = next.next(&reordered, policy, &[], false, now);
        assert!(changes.is_empty() && changes.reordered);
    }
}
