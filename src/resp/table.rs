//! Command properties from a member's own `COMMAND` table (fetched once per member by its
//! checker), so module commands are known too; a small built-in table is the fallback.
//!
//! The session asks only off the common path: whether an in-flight command may be retried
//! (read-only), and whether an unknown command blocks or subscribes (module commands; the
//! built-in [`super::command::classify`] knows Redis's own).

use std::collections::HashSet;

use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;

use super::command::{classify, Kind};

/// Redis's read-only commands that are safe to run again: the fallback when the member's
/// table is not known (yet).
const BUILTIN_READ_ONLY: &[&str] = &[
    "get",
    "mget",
    "strlen",
    "getrange",
    "substr",
    "exists",
    "ttl",
    "pttl",
    "expiretime",
    "pexpiretime",
    "type",
    "hget",
    "hmget",
    "hgetall",
    "hkeys",
    "hvals",
    "hlen",
    "hexists",
    "hstrlen",
    "hrandfield",
    "hscan",
    "lrange",
    "llen",
    "lindex",
    "lpos",
    "smembers",
    "sismember",
    "smismember",
    "scard",
    "srandmember",
    "sinter",
    "sunion",
    "sdiff",
    "sintercard",
    "sscan",
    "zrange",
    "zrangebyscore",
    "zrevrange",
    "zrevrangebyscore",
    "zrangebylex",
    "zrevrangebylex",
    "zscore",
    "zmscore",
    "zcard",
    "zcount",
    "zlexcount",
    "zrank",
    "zrevrank",
    "zrandmember",
    "zscan",
    "xrange",
    "xrevrange",
    "xlen",
    "xinfo",
    "xpending",
    "scan",
    "keys",
    "randomkey",
    "dbsize",
    "getbit",
    "bitcount",
    "bitpos",
    "pfcount",
    "geopos",
    "geodist",
    "geohash",
    "geosearch",
    "georadius_ro",
    "georadiusbymember_ro",
    "memory",
    "object",
    "dump",
    "touch",
    "ping",
    "echo",
    "time",
    "lcs",
    "sort_ro",
    "evalsha_ro",
    "eval_ro",
    "fcall_ro",
];

/// Redis's own commands flagged `pubsub` that are plain request/reply (one reply, no
/// subscription): not streaming, whatever their flag says.
const PLAIN_PUBSUB: &[&[u8]] = &[b"publish", b"spublish", b"pubsub"];

/// What the session needs to know of the commands a member has.
#[derive(Debug, Default)]
pub struct CommandTable {
    /// Lower-case names of read-only commands.
    read_only: HashSet<Vec<u8>>,
    /// Blocking commands that the built-in classification does not know (modules).
    extra_blocking: HashSet<Vec<u8>>,
    /// Pub/sub commands the built-in classification does not know (modules).
    extra_pubsub: HashSet<Vec<u8>>,
    /// The member has `CLIENT SETINFO` (Redis 7.2 and later): a shared session's
    /// `CLIENT SETINFO` can be answered by the proxy as the member would.
    pub client_setinfo: bool,
    /// Total commands in the member's table (0 for the built-in fallback).
    pub len: usize,
}

impl CommandTable {
    /// The built-in fallback.
    pub fn builtin() -> CommandTable {
        CommandTable {
            read_only: BUILTIN_READ_ONLY
                .iter()
                .map(|n| n.as_bytes().to_vec())
                .collect(),
            ..CommandTable::default()
        }
    }

    /// Parses a member's `COMMAND` reply (RESP2). `None` if it is not one.
    pub fn parse(reply: &[u8]) -> Option<CommandTable> {
        let (OwnedFrame::Array(entries), _) = decode(reply).ok()?? else {
            return None;
        };
        let mut table = CommandTable {
            len: entries.len(),
            ..CommandTable::default()
        };
        for entry in entries {
            let OwnedFrame::Array(fields) = entry else {
                continue;
            };
            let (Some(OwnedFrame::BulkString(name)), Some(OwnedFrame::Array(flags))) =
                (fields.first(), fields.get(2))
            else {
                continue;
            };
            let name = name.to_ascii_lowercase();
            if name == b"client" {
                // Its subcommands (Redis 7): the tenth field, entries named `client|...`.
                if let Some(OwnedFrame::Array(subcommands)) = fields.get(9) {
                    table.client_setinfo = subcommands.iter().any(|sub| {
                        matches!(sub, OwnedFrame::Array(f) if matches!(f.first(),
                            Some(OwnedFrame::BulkString(n)) if n.eq_ignore_ascii_case(b"client|setinfo")))
                    });
                }
            }
            let has = |flag: &str| {
                flags.iter().any(|f| {
                    matches!(f, OwnedFrame::SimpleString(s) | OwnedFrame::BulkString(s) if s == flag.as_bytes())
                })
            };
            let known = classify(&name) != Kind::Plain;
            if has("readonly") && !has("write") {
                table.read_only.insert(name.clone());
            }
            if has("blocking") && !known {
                table.extra_blocking.insert(name.clone());
            }
            if has("pubsub") && !known && !PLAIN_PUBSUB.contains(&name.as_slice()) {
                table.extra_pubsub.insert(name);
            }
        }
        Some(table)
    }

    /// May this command run again after its outcome became unknown?
    pub fn is_read_only(&self, name: &[u8]) -> bool {
        name.len() <= 32 && self.read_only.contains(&name.to_ascii_lowercase())
    }

    /// A module command that blocks or subscribes: the session treats it as it treats
    /// MONITOR (never timed, never moved). Free when the member has no such command.
    pub fn is_module_streaming(&self, name: &[u8]) -> bool {
        if self.extra_blocking.is_empty() && self.extra_pubsub.is_empty() {
            return false;
        }
        let name = name.to_ascii_lowercase();
        self.extra_blocking.contains(&name) || self.extra_pubsub.contains(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_knows_reads_from_writes() {
        let t = CommandTable::builtin();
        assert!(t.is_read_only(b"GET"));
        assert!(t.is_read_only(b"hgetall"));
        assert!(!t.is_read_only(b"INCR"));
        assert!(!t.is_read_only(b"SET"));
        assert!(!t.is_module_streaming(b"BLPOP"));
    }

    #[test]
    fn parses_a_command_reply() {
        let reply = b"*5\r\n\
            *3\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n\
            *3\r\n$7\r\npublish\r\n:3\r\n*2\r\n+pubsub\r\n+fast\r\n\
            *3\r\n$8\r\nspublish\r\n:3\r\n*2\r\n+pubsub\r\n+fast\r\n\
            *3\r\n$4\r\nincr\r\n:2\r\n*2\r\n+write\r\n+fast\r\n\
            *3\r\n$8\r\nmy.bwait\r\n:2\r\n*2\r\n+readonly\r\n+blocking\r\n";
        let t = CommandTable::parse(reply).unwrap();
        assert_eq!(t.len, 5);
        assert!(!t.client_setinfo);
        // PUBLISH is flagged `pubsub` but answers once: not a streaming command.
        assert!(!t.is_module_streaming(b"PUBLISH"));
        assert!(!t.is_module_streaming(b"spublish"));
        assert!(t.is_read_only(b"GET"));
        assert!(!t.is_read_only(b"incr"));
        assert!(t.is_module_streaming(b"MY.BWAIT"));
        assert!(!t.is_module_streaming(b"get"));
        assert!(CommandTable::parse(b"+OK\r\n").is_none());
    }

    #[test]
    fn knows_whether_the_member_has_client_setinfo() {
        let client = |sub: &str| {
            format!(
                "*1\r\n*10\r\n$6\r\nclient\r\n:-2\r\n*0\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n\
                 *1\r\n*3\r\n${}\r\n{sub}\r\n:-3\r\n*0\r\n",
                sub.len()
            )
        };
        let t = CommandTable::parse(client("client|setinfo").as_bytes()).unwrap();
        assert!(t.client_setinfo);
        let t = CommandTable::parse(client("client|setname").as_bytes()).unwrap();
        assert!(!t.client_setinfo);
        assert!(!CommandTable::builtin().client_setinfo);
    }
}
