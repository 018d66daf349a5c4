//! Which commands the session must look at, and what their arguments mean to it.
//!
//! Almost every command is [`Kind::Plain`]: forwarded, one reply owed, nothing remembered.
//! The others change session state that must be replayed on a new upstream, open a
//! transaction, block, or leave the request/reply rhythm (pub/sub, MONITOR).

use std::time::Duration;

/// What a command means to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    /// `SELECT db`: replayed.
    Select,
    /// `AUTH [user] pass`: replayed.
    Auth,
    /// `HELLO [proto [AUTH user pass] [SETNAME name]]`: replayed.
    Hello,
    /// `CLIENT ...`: `CLIENT SETNAME` is replayed.
    Client,
    /// `RESET`: back to a fresh connection's state.
    Reset,
    Multi,
    Exec,
    Discard,
    Watch,
    Unwatch,
    /// Waits for data or replicas; its reply may take as long as its own timeout says.
    Blocking(BlockTimeout),
    /// `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE`: the connection receives messages.
    Subscribe(Subscription),
    /// `UNSUBSCRIBE`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE`.
    Unsubscribe(Subscription),
    /// `MONITOR`: the connection streams every command the member runs.
    Monitor,
    /// `QUIT`: the member replies `+OK` and closes.
    Quit,
    /// An empty command (`*0`, a blank inline line): Redis answers nothing, but counts it
    /// as the command a `CLIENT REPLY SKIP` skips.
    Empty,
    /// `PING`: allowed (and answered differently) while subscribed in RESP2.
    Ping,
    /// `SYNC`, `PSYNC`, and module commands that block or subscribe: what follows cannot be
    /// counted (an RDB payload is a bulk without its CRLF), so the session relays the
    /// connection raw from then on.
    Raw,
}

/// The three kinds of subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// `SUBSCRIBE channel`.
    Channel,
    /// `PSUBSCRIBE pattern`.
    Pattern,
    /// `SSUBSCRIBE shardchannel`.
    Shard,
}

impl Subscription {
    pub const ALL: [Subscription; 3] = [
        Subscription::Channel,
        Subscription::Pattern,
        Subscription::Shard,
    ];

    /// The command that subscribes to this kind.
    pub fn command(self) -> &'static [u8] {
        match self {
            Subscription::Channel => b"SUBSCRIBE",
            Subscription::Pattern => b"PSUBSCRIBE",
            Subscription::Shard => b"SSUBSCRIBE",
        }
    }
}

/// Where a blocking command says how long it may block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockTimeout {
    /// Last argument, seconds (`BLPOP k1 k2 5`, `BLMOVE a b LEFT RIGHT 0.5`).
    LastSeconds,
    /// Second argument, seconds (`BLMPOP 5 2 k1 k2 LEFT`).
    FirstSeconds,
    /// Argument `n` (name is 0), milliseconds (`WAIT 1 100`, `WAITAOF 1 0 100`).
    Millis(usize),
    /// `BLOCK ms` somewhere in the arguments; without it the command does not block.
    BlockOption,
}

/// Longest command name worth classifying; anything longer is plain.
const MAX_NAME: usize = 16;

/// Classifies a command by name, case-insensitively, without allocating.
pub fn classify(name: &[u8]) -> Kind {
    if name.len() > MAX_NAME {
        return Kind::Plain;
    }
    let mut upper = [0u8; MAX_NAME];
    let upper = &mut upper[..name.len()];
    upper.copy_from_slice(name);
    upper.make_ascii_uppercase();
    use BlockTimeout::*;
    match &*upper {
        b"GET" | b"SET" => Kind::Plain,
        b"SELECT" => Kind::Select,
        b"AUTH" => Kind::Auth,
        b"HELLO" => Kind::Hello,
        b"CLIENT" => Kind::Client,
        b"RESET" => Kind::Reset,
        b"MULTI" => Kind::Multi,
        b"EXEC" => Kind::Exec,
        b"DISCARD" => Kind::Discard,
        b"WATCH" => Kind::Watch,
        b"UNWATCH" => Kind::Unwatch,
        b"BLPOP" | b"BRPOP" | b"BRPOPLPUSH" | b"BLMOVE" | b"BZPOPMIN" | b"BZPOPMAX" => {
            Kind::Blocking(LastSeconds)
        }
        b"BLMPOP" | b"BZMPOP" => Kind::Blocking(FirstSeconds),
        b"WAIT" => Kind::Blocking(Millis(2)),
        b"WAITAOF" => Kind::Blocking(Millis(3)),
        b"XREAD" | b"XREADGROUP" => Kind::Blocking(BlockOption),
        b"SUBSCRIBE" => Kind::Subscribe(Subscription::Channel),
        b"PSUBSCRIBE" => Kind::Subscribe(Subscription::Pattern),
        b"SSUBSCRIBE" => Kind::Subscribe(Subscription::Shard),
        b"UNSUBSCRIBE" => Kind::Unsubscribe(Subscription::Channel),
        b"PUNSUBSCRIBE" => Kind::Unsubscribe(Subscription::Pattern),
        b"SUNSUBSCRIBE" => Kind::Unsubscribe(Subscription::Shard),
        b"MONITOR" => Kind::Monitor,
        b"QUIT" => Kind::Quit,
        b"PING" => Kind::Ping,
        b"SYNC" | b"PSYNC" => Kind::Raw,
        _ => Kind::Plain,
    }
}

/// How long a blocking command may wait, from its arguments (name first).
/// `Some(None)` = forever (a timeout of 0); `None` = it does not block after all.
pub fn block_timeout(how: BlockTimeout, args: &[Vec<u8>]) -> Option<Option<Duration>> {
    // Checked: a client can send any number (`BLPOP k 1e20`); one too large for a
    // Duration is one Redis refuses too ("timeout is out of range").
    let seconds = |a: Option<&Vec<u8>>| -> Option<Duration> {
        let s: f64 = std::str::from_utf8(a?).ok()?.parse().ok()?;
        Duration::try_from_secs_f64(s).ok()
    };
    let millis = |a: Option<&Vec<u8>>| -> Option<Duration> {
        let ms: u64 = std::str::from_utf8(a?).ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    };
    let d = match how {
        BlockTimeout::LastSeconds => seconds(args.last()),
        BlockTimeout::FirstSeconds => seconds(args.get(1)),
        BlockTimeout::Millis(i) => millis(args.get(i)),
        BlockTimeout::BlockOption => {
            let at = args.iter().position(|a| a.eq_ignore_ascii_case(b"BLOCK"))?;
            millis(args.get(at + 1))
        }
    };
    // A timeout Redis rejects gets an immediate error reply: treat it as not blocking.
    let d = d?;
    Some((!d.is_zero()).then_some(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Vec<u8>> {
        s.split(' ').map(|a| a.as_bytes().to_vec()).collect()
    }

    #[test]
    fn names_are_case_insensitive() {
        assert_eq!(classify(b"get"), Kind::Plain);
        assert_eq!(classify(b"select"), Kind::Select);
        assert_eq!(classify(b"MuLtI"), Kind::Multi);
        assert_eq!(
            classify(b"blpop"),
            Kind::Blocking(BlockTimeout::LastSeconds)
        );
        assert_eq!(classify(b"averyveryverylongcommandname"), Kind::Plain);
    }

    #[test]
    fn block_timeouts() {
        let t = |k: &[u8], a: &str| match classify(k) {
            Kind::Blocking(how) => block_timeout(how, &args(a)),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            t(b"BLPOP", "BLPOP a b 1.5"),
            Some(Some(Duration::from_millis(1500)))
        );
        assert_eq!(t(b"BLPOP", "BLPOP a 0"), Some(None));
        assert_eq!(
            t(b"BLMPOP", "BLMPOP 2 1 k LEFT"),
            Some(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            t(b"WAIT", "WAIT 1 250"),
            Some(Some(Duration::from_millis(250)))
        );
        assert_eq!(t(b"XREAD", "XREAD COUNT 1 STREAMS s 0"), None);
        assert_eq!(t(b"XREAD", "XREAD block 0 STREAMS s $"), Some(None));
        assert_eq!(t(b"BLPOP", "BLPOP a nope"), None);
        // Numbers no Duration holds are refused (as Redis refuses them), never a panic.
        assert_eq!(t(b"BLPOP", "BLPOP a 1e20"), None);
        assert_eq!(t(b"BLPOP", "BLPOP a -1"), None);
        assert_eq!(t(b"BLPOP", "BLPOP a inf"), None);
        assert_eq!(t(b"BLPOP", "BLPOP a NaN"), None);
        assert_eq!(
            t(b"WAIT", "WAIT 1 18446744073709551615"),
            Some(Some(Duration::from_millis(u64::MAX)))
        );
    }
}
