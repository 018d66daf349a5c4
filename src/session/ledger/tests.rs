//! The ledger against real Redis wire bytes.
//!
//! Each fixture in `tests/fixtures/ledger/` is a script (NAME.txt) and the exact bytes a
//! real redis-server 7.0 sent back when the whole script was pipelined at once (NAME.resp,
//! made by `record.py` there). Pipelined is the hard case: every command is sent before any
//! reply arrives, so the ledger must place each frame by the member's state at that point.
//! Each case gives what every frame must be (`R` reply, `P` push or stream, `U` unexpected)
//! and the state that must be left.

use super::*;
use crate::resp::command::classify;
use crate::resp::reply::ReplyScanner;
use crate::resp::request::split_inline;

macro_rules! fixture {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!("../../../tests/fixtures/ledger/", $name, ".txt")),
            &include_bytes!(concat!("../../../tests/fixtures/ledger/", $name, ".resp"))[..],
        )
    };
}

/// Sends the script's commands to a ledger (as the pump does: nothing after QUIT), then
/// feeds it the recorded frames. Returns the frame kinds and the ledger.
fn replay(script: &str, replies: &[u8]) -> (String, Ledger) {
    let mut ledger = Ledger::default();
    for line in script.lines() {
        if line.trim().is_empty() || line.starts_with('#') || line.starts_with('~') {
            continue;
        }
        if ledger.quitting() {
            break;
        }
        send(&mut ledger, line);
    }
    let frames = feed(&mut ledger, replies);
    (frames, ledger)
}

fn send(ledger: &mut Ledger, line: &str) -> Sent {
    let args = split_inline(line.as_bytes()).expect("a fixture line splits");
    let kind = classify(&args[0]);
    let args = if needs_args(kind) { &args[..] } else { &[] };
    ledger.sent(Command {
        kind,
        args,
        retry: None,
        answer: None,
    })
}

fn feed(ledger: &mut Ledger, replies: &[u8]) -> String {
    let mut frames = String::new();
    let consumed = ReplyScanner::default()
        .scan(replies, |r| {
            frames.push(match ledger.frame(r) {
                Frame::Reply => 'R',
                Frame::Answered => 'A',
                Frame::Push => 'P',
                Frame::Unexpected => 'U',
            })
        })
        .expect("recorded replies are RESP");
    assert_eq!(
        consumed,
        replies.len(),
        "every recorded byte is a whole frame"
    );
    frames
}

type Check = fn(&Ledger);
/// A fixture's name, script and recorded replies.
type Fixture = (&'static str, &'static str, &'static [u8]);

#[test]
fn recorded_redis_replies_are_placed_exactly() {
    let cases: &[(Fixture, &str, Check)] = &[
        (fixture!("select"), "RRRR", |l| {
            assert_eq!(l.state().db.as_deref(), Some(&b"1"[..]));
        }),
        (fixture!("auth_refused"), "RRR", |l| {
            assert!(l.state().auth.is_none());
        }),
        (fixture!("hello"), "RRRRRR", |l| {
            assert!(!l.state().resp3);
            assert_eq!(l.state().attributes.name.as_deref(), Some(&b"app"[..]));
        }),
        (fixture!("client_setname"), "RRR", |l| {
            assert_eq!(l.state().attributes.name.as_deref(), Some(&b"a"[..]));
        }),
        (fixture!("subscribe_resp2"), "RRRRRRRRRRR", |l| {
            assert!(!l.state().subscribed());
        }),
        (fixture!("subscribe_message_resp2"), "RRRRRPPPP", |l| {
            assert_eq!(l.state().subscription_count(Subscription::Channel), 1);
            assert_eq!(l.state().subscription_count(Subscription::Pattern), 1);
        }),
        (fixture!("subscribe_refused"), "RRRRRRRRRR", |l| {
            assert!(l.state().resp3);
            assert!(!l.state().subscribed());
        }),
        (fixture!("resp3_subscribed"), "RRRRPRRRPRRRR", |l| {
            assert!(!l.state().subscribed());
        }),
        (fixture!("reply_off"), "RRR", |l| {
            assert!(l.state().reply_off);
            assert_eq!(l.state().subscription_count(Subscription::Channel), 1);
            assert_eq!(l.state().db, None, "RESET went back to db 0");
        }),
        (fixture!("reply_skip"), "RRRRRR", |l| {
            assert!(!l.state().reply_off);
            assert!(l.quiescent());
        }),
        (fixture!("multi_state"), "RRRRRRR", |l| {
            assert_eq!(
                l.state().db.as_deref(),
                Some(&b"1"[..]),
                "SELECT 99999 failed"
            );
            assert_eq!(l.state().attributes.name.as_deref(), Some(&b"t"[..]));
            assert!(l.state().auth.is_none(), "AUTH failed inside EXEC");
        }),
        (fixture!("multi_rules"), "RRRRRRRRRRRRRRRRRRRR", |l| {
            assert!(l.quiescent());
        }),
        (fixture!("monitor_reset"), "RPPPRR", |l| {
            assert!(!l.monitoring());
            assert!(l.quiescent());
        }),
        (fixture!("quit"), "RR", |l| {
            assert!(l.quitting());
        }),
        (fixture!("blocking"), "RRRRRR", |_| {}),
        (fixture!("tracking_resp3"), "RRRP", |l| {
            assert!(l.state().tracking.is_some());
        }),
        (fixture!("resp3_state"), "RRRRRRRRRRRRRRRRRRRRR", |l| {
            assert_eq!(l.state(), &SessionState::default(), "RESET at the end");
            assert!(l.quiescent());
        }),
        (fixture!("tracking_resp2"), "RRRRRR", |l| {
            let options = l.state().tracking.as_ref().expect("tracking on");
            assert_eq!(
                options,
                &[b"BCAST".to_vec(), b"PREFIX".to_vec(), b"a".to_vec()]
            );
        }),
        (fixture!("pipelined_protocol"), "RRRRRRRRRRRRRR", |l| {
            assert!(l.state().resp3);
            assert_eq!(l.state().subscription_count(Subscription::Channel), 1);
        }),
    ];
    for ((name, script, replies), want, check) in cases {
        let (got, ledger) = replay(script, replies);
        assert_eq!(&got, want, "{name}: frame kinds");
        assert_eq!(ledger.in_flight(), 0, "{name}: every command settled");
        assert!(!ledger.raw(), "{name}: still counting");
        check(&ledger);
    }
}

#[test]
fn a_multi_that_queues_client_reply_off_or_subscribe_goes_raw() {
    for cmd in [
        "CLIENT REPLY OFF",
        "CLIENT REPLY SKIP",
        "SUBSCRIBE a",
        "MONITOR",
    ] {
        let mut l = Ledger::default();
        send(&mut l, "MULTI");
        assert!(send(&mut l, cmd).raw, "{cmd}: raw at once");
        assert!(l.raw(), "{cmd}");
        assert_eq!(l.in_flight(), 0);
        assert!(!l.quiescent(), "a raw session never moves");
    }
    let mut l = Ledger::default();
    assert!(send(&mut l, "PSYNC ? -1").raw);
}

#[test]
fn a_reply_nobody_asked_for_makes_the_session_raw() {
    let mut l = Ledger::default();
    assert_eq!(feed(&mut l, b"+OK\r\n+OK\r\n"), "UP");
    assert!(l.raw());
}

#[test]
fn publish_is_an_ordinary_command() {
    let mut l = Ledger::default();
    send(&mut l, "PUBLISH ch hello");
    assert_eq!(feed(&mut l, b":0\r\n"), "R");
    assert!(l.quiescent(), "a session that published moves as any other");
}

#[test]
fn a_resp3_subscribe_waits_for_its_confirmation() {
    let mut l = Ledger::default();
    send(&mut l, "HELLO 3");
    feed(&mut l, b"%1\r\n$5\r\nproto\r\n:3\r\n");
    send(&mut l, "SUBSCRIBE a b");
    assert!(!l.quiescent(), "confirmations owed");
    feed(&mut l, b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n");
    assert!(!l.quiescent(), "one confirmation owed");
    assert_eq!(l.state().subscription_count(Subscription::Channel), 1);
    feed(&mut l, b">3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n");
    assert!(l.quiescent());
    assert_eq!(l.state().subscription_count(Subscription::Channel), 2);
}

#[test]
fn a_failed_member_owes_one_error_per_reply_the_client_awaits() {
    let mut l = Ledger::default();
    for cmd in [
        "GET a",
        "CLIENT REPLY SKIP",
        "GET b",
        "GET c",
        "SUBSCRIBE x y",
    ] {
        send(&mut l, cmd);
    }
    // GET a, GET c, and two confirmations; CLIENT REPLY SKIP and GET b get nothing.
    assert_eq!(l.fail(), 4);
    assert_eq!(l.in_flight(), 0);
    assert!(
        !l.state().subscribed(),
        "unconfirmed subscriptions are not replayed"
    );
    let mut l = Ledger::default();
    send(&mut l, "MULTI");
    send(&mut l, "INCR a");
    assert_eq!(l.in_transaction(), (true, false));
    assert_eq!(l.fail(), 2);
    assert_eq!(
        l.in_transaction(),
        (false, false),
        "the caller keeps the lost MULTI"
    );
}

#[test]
fn the_transaction_the_client_believes_in() {
    let mut l = Ledger::default();
    send(&mut l, "WATCH k");
    send(&mut l, "EXEC");
    assert_eq!(
        l.in_transaction(),
        (false, true),
        "EXEC without MULTI keeps WATCH"
    );
    send(&mut l, "MULTI");
    send(&mut l, "MULTI");
    send(&mut l, "EXEC");
    assert_eq!(l.in_transaction(), (false, false));
}

#[test]
fn retries_are_taken_only_when_every_command_in_flight_may_run_again() {
    let mut l = Ledger::default();
    let read = |l: &mut Ledger, retry: bool| {
        l.sent(Command {
            kind: Kind::Plain,
            args: &[],
            retry: retry.then(|| Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")),
            answer: None,
        })
    };
    read(&mut l, true);
    read(&mut l, false);
    assert!(l.take_retries().is_none());
    let mut l = Ledger::default();
    read(&mut l, true);
    read(&mut l, true);
    assert_eq!(l.take_retries().map(|r| r.len()), Some(2));
    assert_eq!(l.in_flight(), 0);
}

#[test]
fn exec_element_errors_past_the_64th_are_unknown() {
    let mut l = Ledger::default();
    send(&mut l, "MULTI");
    for _ in 0..70 {
        send(&mut l, "INCR s");
    }
    send(&mut l, "SELECT 2");
    send(&mut l, "EXEC");
    let mut replies = b"+OK\r\n".to_vec();
    replies.extend(b"+QUEUED\r\n".repeat(71));
    replies.extend(b"*71\r\n");
    replies.extend(b":1\r\n".repeat(69));
    replies.extend(b"-ERR overflow\r\n+OK\r\n");
    feed(&mut l, &replies);
    assert!(l.raw(), "whether SELECT ran cannot be told: stop counting");
}

#[test]
fn a_refused_command_in_multi_is_answered_with_its_answer_only_if_the_member_refuses_it() {
    let answer: Box<[u8]> =
        Box::from(&b"-ERR unknown command 'CONFIG', with args beginning with: \r\n"[..]);
    let refused = |l: &mut Ledger| {
        l.sent(Command {
            kind: Kind::Plain,
            args: &[],
            retry: None,
            answer: Some(answer.clone()),
        })
    };
    // Redis: MULTI, a refused command (the member does not know its name), EXEC aborts.
    let mut l = Ledger::default();
    send(&mut l, "MULTI");
    refused(&mut l);
    send(&mut l, "EXEC");
    let mut frames = Vec::new();
    let mut answers = Vec::new();
    let replies = b"+OK\r\n-ERR unknown command 'CONFIG(renamed-by-geoproxy)', with args beginning with: \r\n\
                    -EXECABORT Transaction discarded because of previous errors.\r\n";
    ReplyScanner::default()
        .scan(replies, |r| {
            frames.push(l.frame(r));
            answers.extend(l.take_answer());
        })
        .expect("RESP");
    assert_eq!(frames, [Frame::Reply, Frame::Answered, Frame::Reply]);
    assert_eq!(answers, std::slice::from_ref(&answer));
    assert!(l.quiescent());
    // Any other reply is the member's own and goes through (never one here).
    let mut l = Ledger::default();
    send(&mut l, "MULTI");
    refused(&mut l);
    assert_eq!(feed(&mut l, b"+OK\r\n+QUEUED\r\n"), "RR");
}

#[test]
fn an_empty_command_uses_up_a_skip() {
    // Redis: CLIENT REPLY SKIP, a blank line, MULTI -> MULTI is answered.
    let mut l = Ledger::default();
    send(&mut l, "CLIENT REPLY SKIP");
    l.sent(Command {
        kind: Kind::Empty,
        args: &[],
        retry: None,
        answer: None,
    });
    send(&mut l, "MULTI");
    assert_eq!(l.in_flight(), 1);
    assert_eq!(feed(&mut l, b"+OK\r\n"), "R");
    assert_eq!(l.in_transaction(), (true, false));
}

#[test]
fn a_hello_with_auth_that_gets_no_reply_stops_the_count() {
    // Found by the differential campaign: under CLIENT REPLY OFF a HELLO 3 with a wrong
    // password fails silently, and the connection stays RESP2.
    let mut l = Ledger::default();
    send(&mut l, "CLIENT REPLY OFF");
    send(&mut l, "HELLO 3 AUTH nobody wrong");
    assert!(l.raw());
    // Without AUTH a HELLO 2 or 3 cannot fail, and HELLO 4 always does.
    let mut l = Ledger::default();
    send(&mut l, "CLIENT REPLY OFF");
    send(&mut l, "HELLO 3");
    assert!(!l.raw() && l.state().resp3);
    send(&mut l, "HELLO 4");
    assert!(l.state().resp3);
}
