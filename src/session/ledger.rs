//! The ledger: the session's account of the replies its member owes, in order, and of the
//! connection state those replies confirm. Pure: commands sent and reply frames in, effects
//! out; no sockets, no clocks.
//!
//! The count is exact because it is decided where Redis decides it. How many frames a
//! command gets depends on the connection's state when the member *runs* it (protocol,
//! subscriptions, MULTI, CLIENT REPLY, MONITOR), which may be changed by commands still in
//! flight ahead of it. So the ledger keeps two views:
//! - `asked`: what the client has sent so far (in MULTI, WATCHing, QUIT sent). This is what
//!   the client believes, and what the proxy must honour if the member fails.
//! - `seen`: the member's connection as the replies so far show it. A command's replies are
//!   counted only when it reaches the front of the queue, against `seen`, which by then
//!   holds every earlier command's effect, exactly as the member applied it.
//!
//! Session state ([`SessionState`]) changes only when the member accepted the command:
//! a non-error reply, subscription confirmations one by one, and inside MULTI only when
//! EXEC's reply says that queued command succeeded.
//!
//! Where Redis itself sends a stream no parser can follow (SYNC's RDB payload, a
//! transaction that queued CLIENT REPLY OFF/SKIP or SUBSCRIBE, whose EXEC array has the
//! wrong length), or where a frame arrives that nothing asked for, the ledger gives up
//! counting: the session becomes *raw* and relays bytes until it ends, as it does for
//! MONITOR-like module commands. Raw sessions never move and are closed if their member
//! fails.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use super::state::{Change, SessionState};
use crate::resp::command::{block_timeout, Kind, Subscription};
use crate::resp::reply::Reply;

/// What `CLIENT REPLY` set on the member's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyMode {
    #[default]
    On,
    Off,
    /// The next command's reply is skipped.
    Skip,
}

/// The mode a `CLIENT REPLY ON|OFF|SKIP` command asks for (arguments, name first).
pub fn client_reply(args: &[Vec<u8>]) -> Option<ReplyMode> {
    let [_, sub, mode] = args else {
        return None;
    };
    if !sub.eq_ignore_ascii_case(b"REPLY") {
        return None;
    }
    let modes: [(&[u8], ReplyMode); 3] = [
        (b"ON", ReplyMode::On),
        (b"OFF", ReplyMode::Off),
        (b"SKIP", ReplyMode::Skip),
    ];
    modes
        .into_iter()
        .find_map(|(name, m)| mode.eq_ignore_ascii_case(name).then_some(m))
}

/// A command the session is about to write to its member.
#[derive(Debug)]
pub struct Command<'a> {
    pub kind: Kind,
    /// Its arguments, name first, for the kinds whose arguments matter
    /// ([`needs_args`]); empty otherwise.
    pub args: &'a [Vec<u8>],
    /// The command's bytes, kept to re-send if the member fails before answering
    /// (read-only commands with `failover.retry_reads`).
    pub retry: Option<Bytes>,
    /// What the client gets instead of the member's reply when that reply is a simple error:
    /// for a command the proxy refused inside MULTI, sent under a name the member refuses so
    /// that EXEC aborts as in Redis, the error Redis itself would have given. (Boxed: every
    /// command carries the field, and almost none uses it.)
    pub answer: Option<Box<[u8]>>,
}

/// Whether the ledger needs a command's arguments (blocking timeouts, session state,
/// subscriptions, CLIENT REPLY).
pub fn needs_args(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Blocking(_) | Kind::Subscribe(_) | Kind::Unsubscribe(_)
    ) || Change::possible(kind)
}

/// What sending a command means to the session.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// A blocking command: its reply may take this long (`Some(None)`: forever).
    pub blocks: Option<Option<Duration>>,
    /// The session just became raw (see the module doc).
    pub raw: bool,
}

/// What a frame from the member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// (Part of) the reply to the command at the front: one step of the count.
    Reply,
    /// The reply to the command at the front, a simple error, that the client gets as
    /// [`Ledger::take_answer`] instead (see [`Command::answer`]).
    Answered,
    /// Not a reply: a pub/sub message, an invalidation, an attribute, a MONITOR line, or
    /// anything on a raw session.
    Push,
    /// A reply no command asked for: the count is lost and the session is now raw.
    Unexpected,
}

/// One command sent and not yet settled.
#[derive(Debug)]
struct Entry {
    kind: Kind,
    /// Channels, patterns or shard channels of a subscription command.
    names: Vec<Vec<u8>>,
    /// The state change it asks for, applied once the member accepts it.
    change: Option<Change>,
    /// For `CLIENT REPLY`: the mode asked for.
    reply_mode: Option<ReplyMode>,
    /// Subscription confirmations received so far.
    confirmed: usize,
    retry: Option<Bytes>,
    answer: Option<Box<[u8]>>,
}

impl Entry {
    fn subscription(&self) -> Option<Subscription> {
        match self.kind {
            Kind::Subscribe(s) | Kind::Unsubscribe(s) => Some(s),
            _ => None,
        }
    }
}

/// What the client has asked for so far.
#[derive(Debug, Default, Clone, Copy)]
struct Asked {
    multi: bool,
    watching: bool,
    quit: bool,
}

/// The member's connection as the replies so far show it (protocol, subscriptions,
/// database... live in [`SessionState`]).
#[derive(Debug, Default, Clone)]
struct Seen {
    reply: ReplyMode,
    multi: bool,
    /// Commands queued in this MULTI, and the state changes among them (by position).
    queued: usize,
    queued_changes: Vec<(usize, Change)>,
    watching: bool,
    monitor: bool,
}

/// How the front command will be answered, given what the member has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expect {
    /// Frames it gets (subscription confirmations count one each).
    frames: usize,
    /// Whether it runs at all (a command refused before running changes nothing).
    runs: bool,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct Ledger {
    queue: VecDeque<Entry>,
    asked: Asked,
    seen: Seen,
    state: SessionState,
    raw: bool,
    /// The answer of the last [`Frame::Answered`], until taken.
    answer: Option<Box<[u8]>>,
}

impl Ledger {
    /// The state the member has accepted: what a new upstream replays.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// Commands sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// Replies are no longer counted (see the module doc).
    pub fn raw(&self) -> bool {
        self.raw
    }

    /// In MONITOR: the member streams every command it runs.
    pub fn monitoring(&self) -> bool {
        self.seen.monitor
    }

    /// QUIT was sent: nothing more is sent, and the member will close.
    pub fn quitting(&self) -> bool {
        self.asked.quit
    }

    /// Nothing is owed but (perhaps) QUIT's own reply.
    pub fn only_quit_in_flight(&self) -> bool {
        self.queue.iter().all(|e| e.kind == Kind::Quit)
    }

    /// Whether the client believes it is inside MULTI, and WATCHing.
    pub fn in_transaction(&self) -> (bool, bool) {
        (self.asked.multi, self.asked.watching)
    }

    /// Nothing owed and nothing that ties the session to its member connection: it may
    /// move to another upstream (with its state replayed) before its next command.
    pub fn quiescent(&self) -> bool {
        self.queue.is_empty()
            && !self.raw
            && !self.seen.monitor
            && !self.asked.multi
            && !self.asked.watching
            && !self.asked.quit
            && self.seen.reply != ReplyMode::Skip
            && !self.state.tracking_redirected()
    }

    /// Records a command about to be written to the member.
    pub fn sent(&mut self, cmd: Command<'_>) -> Sent {
        let mut sent = Sent::default();
        if self.raw {
            // Nothing is counted, but QUIT still ends the session.
            self.asked.quit |= cmd.kind == Kind::Quit;
            return sent;
        }
        let reply_mode = match cmd.kind {
            Kind::Client => client_reply(cmd.args),
            _ => None,
        };
        // Redis answers these inside MULTI with a malformed EXEC reply (an array whose
        // length counts replies that never come), and SYNC with an RDB payload that is not
        // RESP: from here on the stream cannot be counted.
        let uncountable = match cmd.kind {
            Kind::Raw => true,
            Kind::Subscribe(_) | Kind::Unsubscribe(_) | Kind::Monitor => self.asked.multi,
            Kind::Client => {
                self.asked.multi && matches!(reply_mode, Some(ReplyMode::Off | ReplyMode::Skip))
            }
            _ => false,
        };
        if uncountable {
            self.go_raw();
            sent.raw = true;
            return sent;
        }
        match cmd.kind {
            Kind::Multi => self.asked.multi = true,
            // EXEC and DISCARD end a transaction only inside one (outside, WATCH stays).
            Kind::Exec | Kind::Discard if self.asked.multi => {
                self.asked.multi = false;
                self.asked.watching = false;
            }
            Kind::Watch if !self.asked.multi => self.asked.watching = true,
            Kind::Unwatch if !self.asked.multi => self.asked.watching = false,
            Kind::Reset => {
                self.asked.multi = false;
                self.asked.watching = false;
            }
            Kind::Quit => self.asked.quit = true,
            Kind::Blocking(how) if !self.asked.multi => sent.blocks = block_timeout(how, cmd.args),
            _ => {}
        }
        let names = match cmd.kind {
            Kind::Subscribe(_) | Kind::Unsubscribe(_) => {
                cmd.args.get(1..).unwrap_or_default().to_vec()
            }
            _ => Vec::new(),
        };
        let change = if Change::possible(cmd.kind) {
            Change::of(cmd.kind, cmd.args)
        } else {
            None
        };
        self.queue.push_back(Entry {
            kind: cmd.kind,
            names,
            change,
            reply_mode,
            confirmed: 0,
            retry: cmd.retry,
            answer: cmd.answer,
        });
        // Only a new front can be settled without a frame (a pipeline's tail waits).
        if self.queue.len() == 1 {
            self.settle();
        }
        sent
    }

    /// Accounts for one complete top-level frame from the member.
    pub fn frame(&mut self, reply: Reply) -> Frame {
        if self.raw || reply.is_attribute() {
            return Frame::Push;
        }
        if self.seen.monitor {
            // Every frame is the MONITOR stream (or a reply mixed into it) until RESET's.
            let reset = self.queue.front().is_some_and(|e| e.kind == Kind::Reset);
            if reset && reply.is_status(b"RESET") {
                self.settle_front(reply);
                return Frame::Reply;
            }
            return Frame::Push;
        }
        if let Some(front) = self.queue.front_mut() {
            if front.subscription().is_some() && reply.is_subscription() {
                front.confirmed += 1;
                self.confirmed();
                return Frame::Reply;
            }
        }
        // RESP3 pushes are never replies; in RESP2 a subscribed connection's messages are
        // arrays, told from replies by their first element (only a few commands are
        // allowed there, and none answers with such an array).
        if reply.is_push() || !self.state.resp3 && self.state.subscribed() && reply.is_message() {
            return Frame::Push;
        }
        if self.queue.is_empty() {
            self.go_raw();
            return Frame::Unexpected;
        }
        // The member's refusal is a simple error line, whole in the bytes it is read from.
        let answer = match self.queue.front_mut() {
            Some(front) if reply.kind == b'-' => front.answer.take(),
            _ => None,
        };
        self.settle_front(reply);
        match answer {
            None => Frame::Reply,
            Some(answer) => {
                self.answer = Some(answer);
                Frame::Answered
            }
        }
    }

    /// What the client gets in place of the frame just found [`Frame::Answered`].
    pub fn take_answer(&mut self) -> Option<Box<[u8]>> {
        self.answer.take()
    }

    /// The member failed: every command in flight has an unknown outcome. Returns how many
    /// replies the client is owed for them (one error each), and forgets them; the
    /// connection view starts again from the accepted state, as on a new upstream.
    pub fn fail(&mut self) -> usize {
        let mut owed = 0;
        // Count as the member would have answered, assuming each command ran.
        let mut probe = Ledger {
            queue: VecDeque::new(),
            asked: self.asked,
            seen: self.seen.clone(),
            state: self.state.clone(),
            raw: false,
            answer: None,
        };
        for entry in self.queue.drain(..) {
            let expect = probe.expect(&entry);
            // QUIT's outcome is known: the connection ends either way.
            if entry.kind != Kind::Quit {
                owed += expect.frames.saturating_sub(entry.confirmed);
            }
            probe.complete(entry, None, expect.runs);
        }
        self.reattached();
        owed
    }

    /// A change the proxy answered for the member (a shared session's `CLIENT SETNAME`, an
    /// `AUTH` already proven on a shared connection): nothing is in flight.
    pub fn accepted_locally(&mut self, change: Change) {
        debug_assert!(self.queue.is_empty());
        self.state.apply(change);
    }

    /// A new upstream with the accepted state replayed: nothing in flight, a fresh view.
    pub fn reattached(&mut self) {
        self.queue.clear();
        // QUIT stays sent: the session ends.
        self.asked = Asked {
            quit: self.asked.quit,
            ..Asked::default()
        };
        self.seen = Seen {
            reply: if self.state.reply_off {
                ReplyMode::Off
            } else {
                ReplyMode::On
            },
            ..Seen::default()
        };
    }

    /// With `retry_reads`: when every command in flight is read-only, takes their bytes
    /// (in order) to send again elsewhere and forgets them.
    pub fn take_retries(&mut self) -> Option<Vec<Bytes>> {
        if self.queue.is_empty() || self.queue.iter().any(|e| e.retry.is_none()) {
            return None;
        }
        let again = self.queue.drain(..).filter_map(|e| e.retry).collect();
        self.reattached();
        Some(again)
    }

    fn go_raw(&mut self) {
        self.raw = true;
        self.queue.clear();
    }

    /// How the member will answer `entry` if it runs it now.
    fn expect(&self, entry: &Entry) -> Expect {
        const ONE: Expect = Expect {
            frames: 1,
            runs: true,
        };
        const NOTHING: Expect = Expect {
            frames: 0,
            runs: true,
        };
        // The common case first: an ordinary command on an ordinary connection.
        let ordinary = matches!(entry.kind, Kind::Plain | Kind::Blocking(_));
        let seen = &self.seen;
        let plain_connection = seen.reply == ReplyMode::On && !seen.multi && !seen.monitor;
        if ordinary && plain_connection && (self.state.resp3 || !self.state.subscribed()) {
            return ONE;
        }
        if entry.kind == Kind::Empty {
            return NOTHING;
        }
        if self.seen.monitor {
            // A MONITOR connection's replies mix with the stream; only RESET's is told apart.
            return if entry.kind == Kind::Reset {
                ONE
            } else {
                NOTHING
            };
        }
        let silent = self.seen.reply != ReplyMode::On;
        // RESP2 while subscribed: anything but these is refused with an error.
        let refused = !self.state.resp3
            && self.state.subscribed()
            && !matches!(
                entry.kind,
                Kind::Subscribe(_) | Kind::Unsubscribe(_) | Kind::Ping | Kind::Quit | Kind::Reset
            );
        if refused {
            return Expect {
                frames: usize::from(!silent),
                runs: false,
            };
        }
        if let Some(sub) = entry.subscription() {
            // Confirmations are pushes: sent even under CLIENT REPLY OFF/SKIP. The arity
            // error is a reply, and is not.
            let subscribing = matches!(entry.kind, Kind::Subscribe(_));
            if subscribing && entry.names.is_empty() {
                return Expect {
                    frames: usize::from(!silent),
                    runs: false,
                };
            }
            let frames = if entry.names.is_empty() {
                self.state.subscription_count(sub).max(1)
            } else {
                entry.names.len()
            };
            return Expect { frames, runs: true };
        }
        if self.seen.multi
            && !matches!(
                entry.kind,
                Kind::Exec | Kind::Discard | Kind::Multi | Kind::Watch | Kind::Quit | Kind::Reset
            )
        {
            return if silent { NOTHING } else { ONE }; // +QUEUED
        }
        match (entry.kind, entry.reply_mode) {
            // CLIENT REPLY ON answers even when replies were off or skipped; OFF and SKIP
            // never answer.
            (Kind::Client, Some(ReplyMode::On)) => ONE,
            (Kind::Client, Some(ReplyMode::Off | ReplyMode::Skip)) => NOTHING,
            // RESET clears CLIENT REPLY OFF before answering (but not a SKIP in force).
            (Kind::Reset, _) if self.seen.reply == ReplyMode::Off => ONE,
            _ if silent => NOTHING,
            _ => ONE,
        }
    }

    /// Settles every command at the front that gets no (more) frames.
    fn settle(&mut self) {
        while let Some(front) = self.queue.front() {
            let expect = self.expect(front);
            if front.confirmed < expect.frames {
                return;
            }
            let Some(entry) = self.queue.pop_front() else {
                return;
            };
            self.complete(entry, None, expect.runs);
        }
    }

    /// A subscription confirmation for the front command arrived.
    fn confirmed(&mut self) {
        let Some(front) = self.queue.front() else {
            return;
        };
        let Some(sub) = front.subscription() else {
            return;
        };
        let name = front.names.get(front.confirmed - 1).cloned();
        match (front.kind, name) {
            (Kind::Subscribe(_), Some(name)) => self.state.subscribe(sub, &[name]),
            (Kind::Unsubscribe(_), Some(name)) => self.state.unsubscribe(sub, &[name]),
            _ => {}
        }
        let expect = self.expect(front);
        if front.confirmed >= expect.frames {
            if front.kind == Kind::Unsubscribe(sub) && front.names.is_empty() {
                self.state.unsubscribe(sub, &[]);
            }
            if let Some(entry) = self.queue.pop_front() {
                self.complete(entry, None, true);
            }
        }
        self.settle();
    }

    /// The front command's (last) reply frame arrived.
    fn settle_front(&mut self, reply: Reply) {
        if let Some(entry) = self.queue.pop_front() {
            let runs = self.expect(&entry).runs;
            self.complete(entry, Some(reply), runs);
        }
        self.settle();
    }

    /// Applies what a settled command did. `reply` is its last frame, `None` when it got
    /// none (CLIENT REPLY OFF/SKIP, subscriptions), when it is taken to have succeeded.
    fn complete(&mut self, entry: Entry, reply: Option<Reply>, runs: bool) {
        // A SKIP in force is used up by this command, whatever it is.
        if self.seen.reply == ReplyMode::Skip {
            self.seen.reply = ReplyMode::On;
        }
        if !runs || entry.kind == Kind::Empty {
            return;
        }
        // An ordinary command outside MULTI changes nothing the ledger keeps.
        if !self.seen.multi && matches!(entry.kind, Kind::Plain | Kind::Ping | Kind::Blocking(_)) {
            return;
        }
        if reply.is_none() && matches!(entry.change, Some(Change::Hello { auth: Some(_), .. })) {
            // A HELLO with AUTH that got no reply (CLIENT REPLY OFF/SKIP): whether it ran,
            // and so which protocol the member speaks now, cannot be known.
            return self.go_raw();
        }
        let ok = reply.is_none_or(|r| !r.is_error());
        if self.seen.multi
            && !matches!(
                entry.kind,
                Kind::Exec | Kind::Discard | Kind::Multi | Kind::Watch | Kind::Quit | Kind::Reset
            )
        {
            // Queued (`+QUEUED`), or refused (the transaction will abort).
            if ok {
                if let Some(change) = entry.change {
                    self.seen.queued_changes.push((self.seen.queued, change));
                }
                self.seen.queued += 1;
            }
            return;
        }
        match entry.kind {
            Kind::Multi if ok => {
                self.seen.multi = true;
                self.seen.queued = 0;
                self.seen.queued_changes.clear();
            }
            Kind::Exec | Kind::Discard if self.seen.multi => {
                let queued = std::mem::take(&mut self.seen.queued_changes);
                let ran =
                    entry.kind == Kind::Exec && reply.is_none_or(|r| !r.is_error() && !r.null);
                if ran {
                    for (i, change) in queued {
                        match reply.map_or(Some(false), |r| r.element_failed(i)) {
                            Some(false) => self.apply(change),
                            Some(true) => {}
                            // Past what the scanner records: the state is unknown.
                            None => return self.go_raw(),
                        }
                    }
                }
                self.seen.multi = false;
                self.seen.watching = false;
                self.seen.queued = 0;
            }
            Kind::Watch if ok => self.seen.watching = true,
            Kind::Unwatch if ok => self.seen.watching = false,
            Kind::Monitor if ok => self.seen.monitor = true,
            Kind::Reset if ok => {
                self.state = SessionState::default();
                self.seen = Seen::default();
            }
            Kind::Client => {
                if let Some(mode) = entry.reply_mode {
                    self.seen.reply = match (self.seen.reply, mode) {
                        // SKIP while OFF changes nothing.
                        (ReplyMode::Off, ReplyMode::Skip) => ReplyMode::Off,
                        (_, mode) => mode,
                    };
                    self.state.reply_off = self.seen.reply == ReplyMode::Off;
                } else if let (Some(change), true) = (entry.change, ok) {
                    self.apply(change);
                }
            }
            _ => {
                if let (Some(change), true) = (entry.change, ok && !reply.is_some_and(|r| r.null)) {
                    self.apply(change);
                }
            }
        }
    }

    fn apply(&mut self, change: Change) {
        let reset = change == Change::Reset;
        self.state.apply(change);
        if reset {
            self.seen = Seen::default();
        }
    }
}

#[cfg(test)]
mod tests;
