//! Fuzzes `session::ledger::Ledger`: arbitrary interleavings of commands sent (every kind of
//! command the session tells apart, in their usual and their refused forms) and reply
//! frames received (every frame shape a member sends: replies, errors, nulls, subscription
//! confirmations and messages in RESP2 and RESP3, `+RESET`, `+QUEUED`, EXEC arrays with
//! failed elements, attributes, invalidations), with member failures and retries between.
//!
//! Checks, on every input: nothing panics (no underflow, no index out of range), and the
//! ledger's invariants hold after every step:
//! - it never owes more replies than commands were sent since it last started counting;
//! - a quiescent ledger owes nothing and is not raw; a raw ledger owes nothing;
//! - after `fail()` nothing is owed, and the errors it asks for are at most the frames the
//!   commands in flight could get;
//! - `take_retries()` either takes every command in flight or none.

#![no_main]

use bytes::Bytes;
use geoproxy::resp::command::classify;
use geoproxy::resp::reply::ReplyScanner;
use geoproxy::resp::request::split_inline;
use geoproxy::session::ledger::{needs_args, Command, Ledger};
use libfuzzer_sys::fuzz_target;

/// Commands, as a client types them.
const COMMANDS: &[&str] = &[
    "GET k",
    "SET k v",
    "PING",
    "PING hi",
    "MULTI",
    "EXEC",
    "DISCARD",
    "WATCH k",
    "UNWATCH",
    "SELECT 1",
    "SELECT 99999",
    "AUTH pw",
    "AUTH u pw",
    "HELLO",
    "HELLO 2",
    "HELLO 3",
    "HELLO 3 AUTH u pw SETNAME n",
    "HELLO 3 AUTH u",
    "CLIENT SETNAME n",
    "CLIENT REPLY ON",
    "CLIENT REPLY OFF",
    "CLIENT REPLY SKIP",
    "CLIENT REPLY",
    "CLIENT TRACKING ON",
    "CLIENT TRACKING ON REDIRECT 7",
    "CLIENT TRACKING OFF",
    "SUBSCRIBE a",
    "SUBSCRIBE a b a",
    "SUBSCRIBE",
    "PSUBSCRIBE p*",
    "SSUBSCRIBE s",
    "UNSUBSCRIBE",
    "UNSUBSCRIBE a",
    "PUNSUBSCRIBE",
    "SUNSUBSCRIBE s",
    "PUBLISH a m",
    "MONITOR",
    "RESET",
    "QUIT",
    "BLPOP k 0",
    "BLPOP k 0.5",
    "BLPOP k 1e300",
    "WAIT 1 18446744073709551615",
    "XREAD BLOCK 10 STREAMS s $",
    "SYNC",
];

/// Frames a member sends.
const FRAMES: &[&[u8]] = &[
    b"+OK\r\n",
    b"+PONG\r\n",
    b"+QUEUED\r\n",
    b"+RESET\r\n",
    b"-ERR x\r\n",
    b"-EXECABORT x\r\n",
    b"!3\r\nERR\r\n",
    b":1\r\n",
    b"$-1\r\n",
    b"*-1\r\n",
    b"_\r\n",
    b"$1\r\nv\r\n",
    b"*0\r\n",
    b"*2\r\n+OK\r\n-ERR x\r\n",
    b"*3\r\n-ERR a\r\n:1\r\n+OK\r\n",
    b"%1\r\n$5\r\nproto\r\n:3\r\n",
    b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n",
    b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n",
    b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n",
    b">3\r\n$12\r\npunsubscribe\r\n$2\r\np*\r\n:0\r\n",
    b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n",
    b">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n",
    b"*4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$1\r\na\r\n$1\r\nm\r\n",
    b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
    b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n",
    b"|1\r\n+key\r\n+val\r\n",
    b"+1700000000.000000 [0 127.0.0.1:1] \"PING\"\r\n",
];

fuzz_target!(|data: &[u8]| {
    let mut ledger = Ledger::default();
    let mut scanner = ReplyScanner::default();
    // Commands sent since the ledger last started counting afresh.
    let mut sent = 0usize;
    for &op in data {
        let arg = usize::from(op & 0x3f);
        match op >> 6 {
            0 | 1 => {
                let line = COMMANDS[arg % COMMANDS.len()];
                let args = split_inline(line.as_bytes()).expect("fixed commands split");
                let kind = classify(&args[0]);
                let args = if needs_args(kind) { &args[..] } else { &[] };
                let retry = (op & 0x40 != 0).then(|| Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"));
                // A refused command's answer (Command::answer) on some of those without retry.
                let answer =
                    (op & 0x41 == 0x01).then(|| Box::from(&b"-ERR refused\r\n"[..]));
                ledger.sent(Command {
                    kind,
                    args,
                    retry,
                    answer,
                });
                sent += 1;
            }
            2 => {
                let frame = FRAMES[arg % FRAMES.len()];
                scanner
                    .scan(frame, |r| {
                        ledger.frame(r);
                    })
                    .expect("fixed frames scan");
            }
            _ => match arg % 3 {
                0 => {
                    let in_flight = ledger.in_flight();
                    let owed = ledger.fail();
                    assert_eq!(ledger.in_flight(), 0);
                    // A command gets at most 3 confirmations in this vocabulary.
                    assert!(owed <= 3 * in_flight, "{owed} errors for {in_flight} commands");
                    sent = 0;
                }
                1 => {
                    let in_flight = ledger.in_flight();
                    if let Some(again) = ledger.take_retries() {
                        assert_eq!(again.len(), in_flight);
                        sent = 0;
                    }
                }
                _ => {
                    ledger.reattached();
                    sent = 0;
                }
            },
        }
        assert!(ledger.in_flight() <= sent, "owes more than was sent");
        if ledger.quiescent() {
            assert_eq!(ledger.in_flight(), 0);
            assert!(!ledger.raw());
        }
        if ledger.raw() {
            assert_eq!(ledger.in_flight(), 0);
            sent = 0;
        }
    }
});
