//! The session state a client builds on its connection, which must follow it to a new
//! upstream: AUTH, HELLO (protocol, SETNAME), SELECT, CLIENT SETNAME and SETINFO.
//!
//! A state-changing command updates [`SessionState`] only once the member replied without
//! an error, so the state replayed is always one a member accepted.

use std::collections::BTreeSet;
use std::fmt;

use crate::resp::command::{Kind, Subscription};
use crate::resp::request;

/// Replayable session state. The default is a fresh Redis connection's.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    /// Arguments of the last successful AUTH (`[user] password`). A secret.
    pub auth: Option<Vec<Vec<u8>>>,
    /// RESP protocol version chosen with HELLO (2 unless HELLO 3).
    pub resp3: bool,
    /// Database chosen with SELECT, if not 0.
    pub db: Option<Vec<u8>>,
    /// Name and library (CLIENT SETNAME, HELLO SETNAME, CLIENT SETINFO).
    pub attributes: Attributes,
    /// CLIENT REPLY OFF is in force: the member answers nothing.
    pub reply_off: bool,
    /// Client-side caching: the options of `CLIENT TRACKING ON`, if on.
    pub tracking: Option<Vec<Vec<u8>>>,
    /// Channels, patterns and shard channels subscribed to, by [`Subscription`] kind.
    subscriptions: [BTreeSet<Vec<u8>>; 3],
}

impl fmt::Debug for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionState")
            .field("auth", &self.auth.as_ref().map(|_| "***"))
            .field("resp3", &self.resp3)
            .field("db", &self.db.as_deref().map(String::from_utf8_lossy))
            .field("attributes", &self.attributes)
            .field("reply_off", &self.reply_off)
            .field("tracking", &self.tracking.is_some())
            .field(
                "subscriptions",
                &self
                    .subscriptions
                    .iter()
                    .map(BTreeSet::len)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What a connection carries beyond a shared connection's state (protocol, credentials,
/// database): its name and library, which a pinned connection taken from the idle pool is
/// given for its new session.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// Connection name (CLIENT SETNAME, HELLO SETNAME).
    pub name: Option<Vec<u8>>,
    /// `CLIENT SETINFO LIB-NAME` and `LIB-VER`.
    pub lib_name: Option<Vec<u8>>,
    pub lib_ver: Option<Vec<u8>>,
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn text(v: &Option<Vec<u8>>) -> Option<std::borrow::Cow<'_, str>> {
            v.as_deref().map(String::from_utf8_lossy)
        }
        f.debug_struct("Attributes")
            .field("name", &text(&self.name))
            .field("lib_name", &text(&self.lib_name))
            .field("lib_ver", &text(&self.lib_ver))
            .finish()
    }
}

/// A change to apply once the member has accepted the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Select(Vec<u8>),
    Auth(Vec<Vec<u8>>),
    Hello {
        resp3: Option<bool>,
        auth: Option<Vec<Vec<u8>>>,
        name: Option<Vec<u8>>,
    },
    SetName(Vec<u8>),
    /// `CLIENT SETINFO LIB-NAME|LIB-VER value` (`lib_ver`: which of the two).
    SetInfo {
        lib_ver: bool,
        value: Vec<u8>,
    },
    /// `CLIENT TRACKING ON <options>` (the options) or `OFF` (`None`).
    Tracking(Option<Vec<Vec<u8>>>),
    Reset,
    /// The changes queued inside MULTI, applied when EXEC ran the transaction.
    Many(Vec<Change>),
}

impl Change {
    /// The change a command of `kind` with these arguments (name first) asks for.
    pub fn of(kind: Kind, args: &[Vec<u8>]) -> Option<Change> {
        match kind {
            Kind::Select if args.len() == 2 => Some(Change::Select(args[1].clone())),
            Kind::Auth if (2..=3).contains(&args.len()) => Some(Change::Auth(args[1..].to_vec())),
            Kind::Hello => {
                let (mut resp3, mut auth, mut name) = (None, None, None);
                let mut rest = args.iter().skip(1);
                if let Some(v) = rest.next() {
                    // Any other version is refused (-NOPROTO): nothing changes.
                    resp3 = Some(match v.as_slice() {
                        b"2" => false,
                        b"3" => true,
                        _ => return None,
                    });
                }
                while let Some(opt) = rest.next() {
                    if opt.eq_ignore_ascii_case(b"AUTH") {
                        auth = Some(vec![rest.next()?.clone(), rest.next()?.clone()]);
                    } else if opt.eq_ignore_ascii_case(b"SETNAME") {
                        name = Some(rest.next()?.clone());
                    }
                }
                Some(Change::Hello { resp3, auth, name })
            }
            Kind::Client if args.len() == 3 && args[1].eq_ignore_ascii_case(b"SETNAME") => {
                Some(Change::SetName(args[2].clone()))
            }
            Kind::Client if args.len() == 4 && args[1].eq_ignore_ascii_case(b"SETINFO") => {
                let lib_ver = if args[2].eq_ignore_ascii_case(b"LIB-VER") {
                    true
                } else if args[2].eq_ignore_ascii_case(b"LIB-NAME") {
                    false
                } else {
                    return None;
                };
                let value = args[3].clone();
                Some(Change::SetInfo { lib_ver, value })
            }
            Kind::Client if args.len() >= 3 && args[1].eq_ignore_ascii_case(b"TRACKING") => {
                let on = args[2].eq_ignore_ascii_case(b"ON");
                Some(Change::Tracking(on.then(|| args[3..].to_vec())))
            }
            Kind::Reset => Some(Change::Reset),
            _ => None,
        }
    }

    /// Does a command of this kind possibly change replayable state? (Decides whether its
    /// arguments are worth parsing.)
    pub fn possible(kind: Kind) -> bool {
        matches!(
            kind,
            Kind::Select | Kind::Auth | Kind::Hello | Kind::Client | Kind::Reset
        )
    }

    /// A connection attribute that only the session keeps while it shares (`CLIENT
    /// SETNAME`, `CLIENT SETINFO`), when the member would accept it: the proxy answers
    /// `+OK` itself, as the member would, and replays the attribute on a pinned connection.
    /// `None` when the member must answer (a value it refuses, a form it may not know).
    pub fn attribute(args: &[Vec<u8>], member_has_setinfo: bool) -> Option<Change> {
        let change = Change::of(Kind::Client, args)?;
        let value = match &change {
            Change::SetName(value) => value,
            Change::SetInfo { value, .. } if member_has_setinfo => value,
            _ => return None,
        };
        // Redis refuses spaces, newlines and anything outside printable ASCII.
        value
            .iter()
            .all(|c| (b'!'..=b'~').contains(c))
            .then_some(change)
    }
}

impl SessionState {
    /// Applies a change the member accepted.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Select(db) => self.db = (db.as_slice() != b"0").then_some(db),
            Change::Auth(args) => self.auth = Some(args),
            Change::Hello { resp3, auth, name } => {
                if let Some(r) = resp3 {
                    self.resp3 = r;
                }
                if auth.is_some() {
                    self.auth = auth;
                }
                if let Some(n) = name {
                    self.set_name(n);
                }
            }
            Change::SetName(n) => self.set_name(n),
            Change::SetInfo { lib_ver, value } => {
                let value = (!value.is_empty()).then_some(value);
                if lib_ver {
                    self.attributes.lib_ver = value;
                } else {
                    self.attributes.lib_name = value;
                }
            }
            Change::Tracking(options) => self.tracking = options,
            Change::Reset => *self = SessionState::default(),
            Change::Many(changes) => changes.into_iter().for_each(|c| self.apply(c)),
        }
    }

    /// Tracking sends its invalidations to another connection (`REDIRECT id`), named by
    /// its id on this member: it cannot be replayed on another.
    pub fn tracking_redirected(&self) -> bool {
        self.tracking
            .as_ref()
            .is_some_and(|o| o.iter().any(|a| a.eq_ignore_ascii_case(b"REDIRECT")))
    }

    /// Subscribed to anything: the member sends messages unasked.
    pub fn subscribed(&self) -> bool {
        self.subscriptions.iter().any(|s| !s.is_empty())
    }

    /// How many subscriptions of this kind.
    pub fn subscription_count(&self, kind: Subscription) -> usize {
        self.subscriptions[kind as usize].len()
    }

    /// A (P|S)SUBSCRIBE was sent with these names.
    pub fn subscribe(&mut self, kind: Subscription, names: &[Vec<u8>]) {
        self.subscriptions[kind as usize].extend(names.iter().cloned());
    }

    /// A (P|S)UNSUBSCRIBE was sent with these names (none: all of that kind).
    pub fn unsubscribe(&mut self, kind: Subscription, names: &[Vec<u8>]) {
        let set = &mut self.subscriptions[kind as usize];
        if names.is_empty() {
            set.clear();
        } else {
            names.iter().for_each(|n| {
                set.remove(n);
            });
        }
    }

    /// The commands that make this session's subscriptions again on a fresh connection,
    /// and how many confirmations they get (one per name).
    pub fn subscription_commands(&self) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut confirmations = 0;
        for kind in Subscription::ALL {
            let set = &self.subscriptions[kind as usize];
            if set.is_empty() {
                continue;
            }
            let mut args = vec![kind.command().to_vec()];
            args.extend(set.iter().cloned());
            request::encode_command(&args, &mut out);
            confirmations += set.len();
        }
        (out, confirmations)
    }

    /// The part of the state a shared connection has: protocol, credentials, database.
    pub fn shareable(&self) -> SessionState {
        SessionState {
            auth: self.auth.clone(),
            resp3: self.resp3,
            db: self.db.clone(),
            ..SessionState::default()
        }
    }

    /// The commands that turn a connection with attributes `had` (and otherwise this state)
    /// into one with this state's, pipelined, and how many replies they get (each must be
    /// a non-error). An empty value clears an attribute.
    pub fn attribute_commands(&self, had: &Attributes) -> (Vec<u8>, usize) {
        let commands = self.attribute_args(had);
        let mut out = Vec::new();
        commands
            .iter()
            .for_each(|args| request::encode_command(args, &mut out));
        (out, commands.len())
    }

    /// The `CLIENT SETNAME` / `SETINFO` commands (as arguments) that take attributes `had`
    /// to this state's.
    fn attribute_args(&self, had: &Attributes) -> Vec<Vec<Vec<u8>>> {
        let want = &self.attributes;
        let pairs = [
            (&b"SETNAME"[..], None, &want.name, &had.name),
            (
                b"SETINFO",
                Some(&b"LIB-NAME"[..]),
                &want.lib_name,
                &had.lib_name,
            ),
            (b"SETINFO", Some(b"LIB-VER"), &want.lib_ver, &had.lib_ver),
        ];
        let changed = pairs.into_iter().filter(|(_, _, want, had)| want != had);
        changed
            .map(|(sub, attr, want, _)| {
                let mut args = vec![b"CLIENT".to_vec(), sub.to_vec()];
                args.extend(attr.map(<[u8]>::to_vec));
                args.push(want.clone().unwrap_or_default());
                args
            })
            .collect()
    }

    fn set_name(&mut self, name: Vec<u8>) {
        // `CLIENT SETNAME ""` clears the name.
        self.attributes.name = (!name.is_empty()).then_some(name);
    }

    /// The commands that rebuild this state on a fresh connection, pipelined, and how many
    /// replies they get (each must be a non-error).
    pub fn replay_commands(&self) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut n = 0;
        let mut push = |args: Vec<Vec<u8>>| {
            request::encode_command(&args, &mut out);
            n += 1;
        };
        if let Some(auth) = &self.auth {
            let mut args = vec![b"AUTH".to_vec()];
            args.extend(auth.iter().cloned());
            push(args);
        }
        if self.resp3 {
            push(vec![b"HELLO".to_vec(), b"3".to_vec()]);
        }
        self.attribute_args(&Attributes::default())
            .into_iter()
            .for_each(&mut push);
        if let Some(db) = &self.db {
            push(vec![b"SELECT".to_vec(), db.clone()]);
        }
        if let Some(options) = &self.tracking {
            let mut args = vec![b"CLIENT".to_vec(), b"TRACKING".to_vec(), b"ON".to_vec()];
            args.extend(options.iter().cloned());
            push(args);
        }
        if self.reply_off {
            // Last, and not counted: it has no reply.
            let off = [b"CLIENT".to_vec(), b"REPLY".to_vec(), b"OFF".to_vec()];
            request::encode_command(&off, &mut out);
        }
        (out, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::command::classify;

    fn change(cmd: &str) -> Option<Change> {
        let args: Vec<Vec<u8>> = cmd.split(' ').map(|a| a.as_bytes().to_vec()).collect();
        Change::of(classify(&args[0]), &args)
    }

    #[test]
    fn state_follows_accepted_commands() {
        let mut s = SessionState::default();
        for cmd in [
            "SELECT 3",
            "AUTH alice pw",
            "HELLO 3 SETNAME app",
            "client setname app2",
            "CLIENT SETINFO lib-name redis-py",
        ] {
            s.apply(change(cmd).unwrap());
        }
        assert_eq!(s.db.as_deref(), Some(&b"3"[..]));
        assert!(s.resp3);
        assert_eq!(s.attributes.name.as_deref(), Some(&b"app2"[..]));
        assert_eq!(s.auth.as_ref().unwrap().len(), 2);
        let (bytes, n) = s.replay_commands();
        assert_eq!(n, 5);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$2\r\npw\r\n"));
        assert!(text.contains("$8\r\nLIB-NAME\r\n$8\r\nredis-py\r\n"));
        assert!(text.ends_with("*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"));
        assert!(!format!("{s:?}").contains("pw"));
        s.apply(change("RESET").unwrap());
        assert_eq!(s, SessionState::default());
        assert_eq!(s.replay_commands().1, 0);
    }

    #[test]
    fn commands_that_change_nothing() {
        assert_eq!(change("GET k"), None);
        assert_eq!(change("CLIENT LIST"), None);
        assert_eq!(change("SELECT"), None);
        assert_eq!(change("HELLO 3 AUTH onlyuser"), None);
        assert_eq!(change("HELLO 4"), None);
        let mut s = SessionState::default();
        s.apply(change("SELECT 0").unwrap());
        assert_eq!(s.db, None);
    }

    #[test]
    fn attributes_the_proxy_may_answer_for_the_member() {
        let attribute = |cmd: &str, setinfo: bool| {
            let args: Vec<Vec<u8>> = cmd.split(' ').map(|a| a.as_bytes().to_vec()).collect();
            Change::attribute(&args, setinfo)
        };
        assert_eq!(
            attribute("CLIENT setname app", false),
            Some(Change::SetName(b"app".to_vec()))
        );
        assert_eq!(
            attribute("client SETINFO lib-ver 5.0.1", true),
            Some(Change::SetInfo {
                lib_ver: true,
                value: b"5.0.1".to_vec()
            })
        );
        // The member answers what it refuses, and what it may not know.
        assert_eq!(attribute("CLIENT SETINFO lib-ver 5.0.1", false), None);
        assert_eq!(attribute("CLIENT SETINFO lib-other x", true), None);
        assert_eq!(attribute("CLIENT SETNAME a\nb", false), None);
        assert_eq!(attribute("CLIENT SETNAME é", false), None);
        assert_eq!(attribute("CLIENT SETNAME", false), None);
        assert_eq!(attribute("CLIENT SETNAME a b", false), None);
        assert_eq!(attribute("CLIENT GETNAME", false), None);
    }

    #[test]
    fn an_idle_connection_gets_its_new_sessions_attributes() {
        let mut s = SessionState::default();
        s.apply(change("CLIENT SETNAME app").unwrap());
        s.apply(change("CLIENT SETINFO LIB-VER 1.2").unwrap());
        let had = Attributes {
            name: Some(b"old".to_vec()),
            lib_name: Some(b"lib".to_vec()),
            lib_ver: Some(b"1.2".to_vec()),
        };
        let (bytes, n) = s.attribute_commands(&had);
        assert_eq!(n, 2);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$3\r\napp\r\n\
             *4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$8\r\nLIB-NAME\r\n$0\r\n\r\n"
        );
        assert_eq!(s.attribute_commands(&s.attributes).1, 0);
    }
}
