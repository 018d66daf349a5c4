//! A transaction the member lost: when a member fails inside MULTI or while keys are
//! WATCHed, the client still believes in its transaction. Until the client ends it, the
//! proxy answers its transaction commands itself, so that EXEC fails (or aborts as a WATCH
//! failure would) instead of running half a transaction on another member.

use crate::resp::command::Kind;

/// A transaction the member lost when it failed; answered by the proxy until it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// The member failed inside MULTI: queued commands are gone, EXEC must fail.
    Multi { member: String },
    /// The member failed while keys were WATCHed: the transaction must not run.
    /// `queuing` once the client sent MULTI (the proxy answers `+QUEUED`).
    Watch { queuing: bool },
}

impl Broken {
    /// The transaction lost when the member failed, if the client was in one.
    pub fn lost(in_multi: bool, watching: bool, member: &str) -> Option<Broken> {
        if in_multi {
            Some(Broken::Multi {
                member: member.to_string(),
            })
        } else if watching {
            Some(Broken::Watch { queuing: false })
        } else {
            None
        }
    }

    /// Does the proxy answer a command of this kind itself?
    pub fn answers(&self, kind: Kind) -> bool {
        match self {
            Broken::Multi { .. } | Broken::Watch { queuing: true } => {
                !matches!(kind, Kind::Reset | Kind::Quit)
            }
            Broken::Watch { queuing: false } => matches!(
                kind,
                Kind::Multi | Kind::Exec | Kind::Discard | Kind::Watch | Kind::Unwatch
            ),
        }
    }

    /// The proxy's answer to a command of `kind`, and what is left of the transaction
    /// after it (`None`: it ended).
    pub fn reply(self, kind: Kind, resp3: bool) -> (Vec<u8>, Option<Broken>) {
        use Broken::*;
        match (self, kind) {
            (Multi { member }, Kind::Exec) => (
                format!(
                    "-EXECABORT Transaction discarded because member {member} failed (geoproxy)\r\n"
                )
                .into_bytes(),
                None,
            ),
            (Multi { .. }, Kind::Discard) => (b"+OK\r\n".to_vec(), None),
            (b @ Multi { .. }, Kind::Multi) => {
                (b"-ERR MULTI calls can not be nested\r\n".to_vec(), Some(b))
            }
            (Multi { member }, _) => {
                let text = format!(
                    "-ERR geoproxy: transaction discarded because member {member} failed; EXEC will fail\r\n"
                );
                (text.into_bytes(), Some(Multi { member }))
            }
            (Watch { queuing: false }, Kind::Multi) => {
                (b"+OK\r\n".to_vec(), Some(Watch { queuing: true }))
            }
            // A WATCHed key may have changed unseen: abort, as Redis does when one did.
            (Watch { queuing: true }, Kind::Exec) => {
                let null: &[u8] = if resp3 { b"_\r\n" } else { b"*-1\r\n" };
                (null.to_vec(), None)
            }
            (b @ Watch { queuing: true }, Kind::Multi) => {
                (b"-ERR MULTI calls can not be nested\r\n".to_vec(), Some(b))
            }
            (Watch { queuing: true }, Kind::Discard)
            | (Watch { queuing: false }, Kind::Unwatch) => (b"+OK\r\n".to_vec(), None),
            // EXEC or DISCARD without MULTI: an error, and the (lost) WATCH stays.
            (b @ Watch { queuing: false }, Kind::Exec | Kind::Discard) => {
                let name = if kind == Kind::Exec {
                    "EXEC"
                } else {
                    "DISCARD"
                };
                (
                    format!("-ERR {name} without MULTI\r\n").into_bytes(),
                    Some(b),
                )
            }
            (b @ Watch { queuing: true }, _) => (b"+QUEUED\r\n".to_vec(), Some(b)),
            // WATCH of more keys while the earlier watch is lost: it stays lost.
            (b @ Watch { queuing: false }, _) => (b"+OK\r\n".to_vec(), Some(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_multi_fails_exec() {
        let b = Broken::lost(true, false, "us-east").unwrap();
        assert!(b.answers(Kind::Plain));
        assert!(!b.answers(Kind::Reset));
        let (text, b) = b.reply(Kind::Plain, false);
        assert!(text.starts_with(b"-ERR geoproxy: transaction discarded"));
        let (text, b) = b.unwrap().reply(Kind::Exec, false);
        assert!(text.starts_with(b"-EXECABORT"));
        assert_eq!(b, None);
    }

    #[test]
    fn a_lost_watch_aborts_the_transaction_like_a_changed_key() {
        let b = Broken::lost(false, true, "m").unwrap();
        assert!(
            !b.answers(Kind::Plain),
            "commands outside MULTI go to the member"
        );
        let (text, b) = b.reply(Kind::Exec, false);
        assert_eq!(text, b"-ERR EXEC without MULTI\r\n");
        let (text, b) = b.unwrap().reply(Kind::Multi, false);
        assert_eq!(text, b"+OK\r\n");
        let (text, b) = b.unwrap().reply(Kind::Plain, true);
        assert_eq!(text, b"+QUEUED\r\n");
        let (text, b) = b.unwrap().reply(Kind::Exec, true);
        assert_eq!(text, b"_\r\n");
        assert_eq!(b, None);
    }
}
