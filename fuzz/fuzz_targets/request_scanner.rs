//! Fuzzes `resp::request::RequestScanner` (client commands: multibulk and inline).
//!
//! Checks, on every input:
//! (a) nothing panics;
//! (b) feeding the stream in chunks (sizes from the input, see `common.rs`) gives exactly the
//!     frames and the error that feeding it whole gives, both when the caller keeps an
//!     incomplete command whole and when it sends on what `streamable` allows as it arrives
//!     (`drained`); `name()` of an incomplete command is its first argument;
//! (c) every complete frame is self-consistent: `argc`, `name` and `args` agree, an inline
//!     command's arguments survive `encode_command` and a rescan;
//! (d) oracle: at every frame start that is a `*`, redis-protocol's RESP2 decoder agrees with
//!     the scanner on where the command ends and on its arguments, except where the scanner
//!     differs on purpose (see `excluded` below and README.md).

#![no_main]

use std::ops::Range;

use geoproxy::resp::request::{args, encode_command, split_inline, Frame, RequestScanner};
use geoproxy::resp::ProtocolError;
use libfuzzer_sys::fuzz_target;
use redis_protocol::resp2::{decode::decode_range, types::RangeFrame};

#[path = "common.rs"]
mod common;

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Frame {
        at: usize,
        len: usize,
        name: Range<usize>,
        argc: usize,
        inline: bool,
    },
    Error(ProtocolError),
}

fn event(at: usize, f: &Frame) -> Event {
    Event::Frame {
        at,
        len: f.len,
        name: at + f.name.start..at + f.name.end,
        argc: f.argc,
        inline: f.inline,
    }
}

/// The whole stream in one slice: the reference run, where (c) and (d) are checked.
fn whole(data: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut s = RequestScanner::default();
    loop {
        let buf = &data[at..];
        let r = s.next(buf);
        if buf.first() == Some(&b'*') {
            oracle(buf, &r);
        }
        match r {
            Ok(Some(f)) => {
                self_consistent(buf, &f);
                out.push(event(at, &f));
                at += f.len;
            }
            Ok(None) => return out,
            Err(e) => {
                out.push(Event::Error(e));
                return out;
            }
        }
    }
}

/// The same stream arriving in pieces, handled as the session does: append, scan from the
/// command's start, drop a complete command's bytes.
fn chunked(data: &[u8], sizes: &[usize]) -> Vec<Event> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut pending: Vec<u8> = Vec::new();
    let mut s = RequestScanner::default();
    let mut name_seen: Option<Vec<u8>> = None;
    for piece in common::chunks(data, sizes) {
        pending.extend_from_slice(piece);
        loop {
            match s.next(&pending) {
                Ok(Some(f)) => {
                    if let Some(name) = name_seen.take() {
                        assert_eq!(name, &pending[f.name.clone()], "name() while incomplete");
                    }
                    out.push(event(at, &f));
                    at += f.len;
                    pending.drain(..f.len);
                }
                Ok(None) => {
                    if let Some(r) = s.name() {
                        let name = pending[r].to_vec();
                        if let Some(before) = &name_seen {
                            assert_eq!(before, &name, "name() changed while incomplete");
                        }
                        name_seen = Some(name);
                    }
                    break;
                }
                Err(e) => {
                    out.push(Event::Error(e));
                    return out;
                }
            }
        }
    }
    out
}

/// What the whole feed says of a command, as seen by a caller that sends its bytes on as
/// they arrive: where it ends, its argc, inline or not, its name (the first argument).
#[derive(Debug, PartialEq, Eq)]
enum Streamed {
    Frame { end: usize, argc: usize, inline: bool, name: Vec<u8> },
    Error(ProtocolError),
}

fn as_streamed(data: &[u8], events: &[Event]) -> Vec<Streamed> {
    events
        .iter()
        .map(|e| match e {
            Event::Frame { at, len, name, argc, inline } => Streamed::Frame {
                end: at + len,
                argc: *argc,
                inline: *inline,
                name: data[name.clone()].to_vec(),
            },
            Event::Error(e) => Streamed::Error(e.clone()),
        })
        .collect()
}

/// The same pieces, handled as the session handles a large command: once an incomplete
/// command's name is known (noted then), send on (drop) the bytes `streamable` allows
/// whenever it is incomplete, and tell the scanner (`drained`).
fn streamed(data: &[u8], sizes: &[usize]) -> Vec<Streamed> {
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut pending: Vec<u8> = Vec::new();
    let mut s = RequestScanner::default();
    let mut name: Option<Vec<u8>> = None;
    let mut sent = false;
    for piece in common::chunks(data, sizes) {
        pending.extend_from_slice(piece);
        loop {
            match s.next(&pending) {
                Ok(Some(f)) => {
                    let name = match name.take() {
                        Some(n) => n,
                        None => {
                            assert!(!sent);
                            pending[f.name.clone()].to_vec()
                        }
                    };
                    out.push(Streamed::Frame {
                        end: consumed + f.len,
                        argc: f.argc,
                        inline: f.inline,
                        name,
                    });
                    consumed += f.len;
                    pending.drain(..f.len);
                    sent = false;
                }
                Ok(None) => {
                    // As the session does: streaming starts once the name is known (it decides
                    // whether the command may be streamed at all).
                    if name.is_none() {
                        name = s.name().map(|r| pending[r].to_vec());
                    }
                    if name.is_none() {
                        break;
                    }
                    let n = s.streamable(pending.len());
                    assert!(n <= pending.len(), "streamable {n} of {}", pending.len());
                    if n > 0 {
                        pending.drain(..n);
                        s.drained(n);
                        consumed += n;
                        sent = true;
                    }
                    break;
                }
                Err(e) => {
                    out.push(Streamed::Error(e));
                    return out;
                }
            }
        }
    }
    out
}

fn self_consistent(buf: &[u8], f: &Frame) {
    assert!(f.len > 0 && f.len <= buf.len(), "frame length {} of {}", f.len, buf.len());
    let frame = &buf[..f.len];
    let a = args(frame, f.inline);
    assert_eq!(a.len(), f.argc, "args() and argc disagree");
    if f.inline {
        assert!(buf[0] != b'*');
        let lf = frame.iter().position(|&b| b == b'\n');
        assert_eq!(lf, Some(f.len - 1), "an inline command ends at its first \\n");
        assert_eq!(split_inline(&frame[..f.len - 1]).as_ref(), Ok(&a));
        // The session forwards an inline command re-encoded as multibulk: it must scan back
        // to the same arguments.
        let mut enc = Vec::new();
        encode_command(&a, &mut enc);
        let g = RequestScanner::default()
            .next(&enc)
            .expect("encoded inline command rescans")
            .expect("encoded inline command is complete");
        assert_eq!((g.len, g.argc, g.inline), (enc.len(), a.len(), false));
        assert_eq!(args(&enc, false), a);
        if let Some(first) = a.first() {
            assert_eq!(&enc[g.name], &first[..]);
        }
    } else {
        match a.first() {
            Some(first) => assert_eq!(&frame[f.name.clone()], &first[..], "name is args[0]"),
            None => assert_eq!(f.name, 0..0),
        }
    }
}

/// The header lines of a complete multibulk frame as the scanner delimits them: each ends at
/// its first `\r`, and the byte after that `\r` is taken to be `\n` without looking. Returns
/// (header contents, terminator bytes).
fn header_lines(frame: &[u8], argc: usize) -> Vec<(Range<usize>, u8)> {
    let line = |from: usize| {
        let cr = from + frame[from..].iter().position(|&b| b == b'\r').unwrap();
        (from..cr, frame[cr + 1])
    };
    let mut out = vec![line(1)];
    let mut pos = out[0].0.end + 2;
    for _ in 0..argc {
        let (digits, term) = line(pos + 1);
        // The scanner accepted it, so it is `-0` or a length in range.
        let len: i64 = std::str::from_utf8(&frame[digits.clone()]).unwrap().parse().unwrap();
        pos = digits.end + 2 + len as usize + 2;
        out.push((digits, term));
    }
    out
}

/// Why the oracle's verdict on a frame the scanner completed may differ, if it may.
fn excluded(buf: &[u8], f: &Frame) -> Option<&'static str> {
    let lines = header_lines(&buf[..f.len], f.argc);
    if lines.iter().any(|&(_, term)| term != b'\n') {
        // geoproxy (like Redis) takes the byte after a header's `\r` to be `\n`;
        // redis-protocol looks for "\r\n".
        return Some("byte after \\r taken to be \\n");
    }
    let count: i64 = std::str::from_utf8(&buf[lines[0].0.clone()]).unwrap().parse().unwrap();
    if count < -1 {
        // Redis skips `*-5` like `*0`; redis-protocol refuses a negative length other than -1.
        return Some("negative multibulk count other than -1");
    }
    None
}

/// The header numbers (count, then each length) of a command redis-protocol decoded.
fn decoded_headers<'a>(buf: &'a [u8], frame: &RangeFrame) -> Vec<&'a [u8]> {
    let crlf = |from: usize| from + buf[from..].windows(2).position(|w| w == b"\r\n").unwrap();
    let end = crlf(1);
    let mut out = vec![&buf[1..end]];
    if let RangeFrame::Array(items) = frame {
        let mut pos = end + 2;
        for i in items {
            if let RangeFrame::BulkString((s, e)) = i {
                out.push(&buf[pos + 1..s - 2]);
                pos = e + 2;
            }
        }
    }
    out
}

fn oracle(buf: &[u8], r: &Result<Option<Frame>, ProtocolError>) {
    let decoded = decode_range(buf);
    match r {
        Ok(Some(f)) => {
            if excluded(buf, f).is_some() {
                return;
            }
            let (frame, len) = match decoded {
                Ok(Some(d)) => d,
                other => panic!("scanner completed a {}-byte frame, redis-protocol says {other:?}", f.len),
            };
            assert_eq!(len, f.len, "frame length: redis-protocol {len}, scanner {}", f.len);
            let got = args(&buf[..f.len], false);
            match frame {
                RangeFrame::Null => assert_eq!(f.argc, 0, "`*-1` is an empty command"),
                RangeFrame::Array(items) => {
                    let want: Vec<Vec<u8>> = items
                        .iter()
                        .map(|i| match i {
                            RangeFrame::BulkString((s, e)) => buf[*s..*e].to_vec(),
                            other => panic!("scanner accepted a non-bulk element {other:?}"),
                        })
                        .collect();
                    assert_eq!(got, want, "arguments differ");
                }
                other => panic!("scanner accepted {other:?} as a command"),
            }
        }
        // The scanner waits or refuses: redis-protocol must not find a complete command
        // (an array of bulk strings, or the null array) there.
        Ok(None) | Err(_) => {
            if let Ok(Some((frame, len))) = decoded {
                let command = match &frame {
                    RangeFrame::Null => true,
                    RangeFrame::Array(items) => {
                        items.iter().all(|i| matches!(i, RangeFrame::BulkString(_)))
                    }
                    _ => false,
                };
                if command && !decoded_headers(buf, &frame).iter().all(|h| common::canonical_int(h)) {
                    // Found by this target (README, finding 1): redis-protocol reads lengths with
                    // Rust's `parse` (`+3`, `0000000000000000003` are 3); the scanner, like
                    // Redis's string2ll, takes at most 18 digits after an optional `-`.
                    return;
                }
                assert!(
                    !command,
                    "redis-protocol decodes a {len}-byte command {frame:?}, scanner says {r:?}"
                );
            }
        }
    }
}

fuzz_target!(|raw: &[u8]| {
    let input = common::split(raw);
    let reference = whole(input.data);
    let pieces = chunked(input.data, &input.sizes);
    assert_eq!(pieces, reference, "chunked feed (sizes {:?}) differs from whole feed", input.sizes);
    let sent = streamed(input.data, &input.sizes);
    assert_eq!(
        sent,
        as_streamed(input.data, &reference),
        "streamed feed (sizes {:?}) differs from whole feed",
        input.sizes
    );
});
