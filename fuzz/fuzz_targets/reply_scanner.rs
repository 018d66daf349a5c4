//! Fuzzes `resp::reply::ReplyScanner` (a member's replies, RESP2 and RESP3, as a stream).
//!
//! Checks, on every input:
//! (a) nothing panics;
//! (b) feeding the stream whole, in chunks (sizes from the input, see `common.rs`) and one
//!     byte at a time gives the same frames (end offsets, kinds, null, message and
//!     subscription flags), the same error, the same bytes consumed and the same `mid_frame`;
//!     only an incomplete header line is left unconsumed; `first_frame` agrees with the scan;
//! (c) oracle: redis-protocol's RESP3 decoder (RESP2's where RESP3's refuses, for `$-1` and
//!     `*-1`) is run frame after frame from the start; wherever it completes a frame the
//!     scanner must report one ending at the same offset (top-level attributes, which the
//!     scanner reports on their own, set aside), of the same kind, with the same null flag and
//!     message/subscription flags, `is_status` of a simple string's text, the first 8 bytes of an
//!     error line (`error_head`), and which elements
//!     of an array or push are errors (`element_failed`); wherever it says "incomplete" the scanner must not have
//!     completed a frame there or failed. The comparison stops at the first point where the
//!     scanner differs on purpose (see `cut` below and README.md).

#![no_main]

use std::ops::Range;

use geoproxy::resp::reply::{first_frame, Reply, ReplyScanner};
use geoproxy::resp::MAX_BULK_LEN;
use libfuzzer_sys::fuzz_target;
use redis_protocol::{resp2, resp3};

#[path = "common.rs"]
mod common;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    end: usize,
    kind: u8,
    null: bool,
    message: bool,
    subscription: bool,
    /// `is_status` for `OK` and `QUEUED`.
    status: (bool, bool),
    /// `element_failed(i)` for i in 0..64, as a mask, and for 64.
    failed: (u64, Option<bool>),
}

fn failed_mask(r: &Reply) -> (u64, Option<bool>) {
    let mut mask = 0;
    for i in 0..64 {
        match r.element_failed(i) {
            Some(true) => mask |= 1 << i,
            Some(false) => {}
            None => panic!("element_failed({i}) unknown"),
        }
    }
    let beyond = r.element_failed(64);
    assert_eq!(beyond, r.element_failed(1000));
    (mask, beyond)
}

fn seen(offset: usize, r: Reply) -> Seen {
    Seen {
        end: offset + r.end,
        kind: r.kind,
        null: r.null,
        message: r.is_message(),
        subscription: r.is_subscription(),
        status: (r.is_status(b"OK"), r.is_status(b"QUEUED")),
        failed: failed_mask(&r),
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Run {
    frames: Vec<Seen>,
    /// Bytes consumed in all and `mid_frame()` at the end, or the error.
    result: Result<(usize, bool), &'static str>,
}

fn whole(data: &[u8]) -> (Run, Vec<Reply>) {
    let mut s = ReplyScanner::default();
    let mut frames = Vec::new();
    let mut replies = Vec::new();
    let result = s
        .scan(data, |r| {
            frames.push(seen(0, r));
            replies.push(r);
        })
        .map(|n| (n, s.mid_frame()))
        .map_err(|e| e.0);
    if let Ok((n, _)) = result {
        assert!(n <= data.len());
        let tail = &data[n..];
        // Only an incomplete header line stays behind: its type byte (which may be `\r`),
        // then no `\r` before the last byte.
        if let Some(cr) = tail.iter().skip(1).position(|&b| b == b'\r') {
            assert_eq!(cr + 1, tail.len() - 1, "a complete line was left unconsumed");
        }
        if n < data.len() {
            assert!(!frames.iter().any(|f| f.end > n));
        }
    }
    (Run { frames, result }, replies)
}

fn chunked(data: &[u8], sizes: &[usize]) -> Run {
    let mut s = ReplyScanner::default();
    let mut frames = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut consumed = 0;
    for piece in common::chunks(data, sizes) {
        pending.extend_from_slice(piece);
        match s.scan(&pending, |r| frames.push(seen(consumed, r))) {
            Ok(n) => {
                assert!(n <= pending.len());
                pending.drain(..n);
                consumed += n;
            }
            Err(e) => return Run { frames, result: Err(e.0) },
        }
    }
    Run { frames, result: Ok((consumed, s.mid_frame())) }
}

/// One byte at a time. Besides the run, returns the header lines as the scanner delimits
/// them (from the type byte to the byte after the first `\r`, inclusive), seen as the jumps
/// of the consumed count, and the line on which the scanner failed.
fn bytewise(data: &[u8]) -> (Run, Vec<Range<usize>>, Option<Range<usize>>) {
    let mut s = ReplyScanner::default();
    let mut frames = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut consumed = 0;
    let mut lines = Vec::new();
    for (i, &b) in data.iter().enumerate() {
        pending.push(b);
        match s.scan(&pending, |r| frames.push(seen(consumed, r))) {
            Ok(n) => {
                // Body bytes go one by one; a header line goes whole once its `\r` and the
                // byte after it are in, and is at least 3 bytes.
                assert!(n <= 1 || n >= 3, "consumed {n} bytes at once, one at a time");
                if n >= 3 {
                    lines.push(consumed..consumed + n);
                }
                pending.drain(..n);
                consumed += n;
            }
            Err(e) => {
                return (Run { frames, result: Err(e.0) }, lines, Some(consumed..i + 1));
            }
        }
    }
    (Run { frames, result: Ok((consumed, s.mid_frame())) }, lines, None)
}

/// Where the scanner starts to differ from redis-protocol on purpose, and why: the start of
/// the first header line it reads differently, or of the line it refuses on purpose.
fn cut(data: &[u8], lines: &[Range<usize>], err: Option<(Range<usize>, &str)>) -> (usize, &'static str) {
    let bare = |l: &Range<usize>| data[l.end - 1] != b'\n';
    if let Some(l) = lines.iter().find(|l| bare(l)) {
        // Like Redis, the scanner takes the byte after a line's first `\r` to be `\n`;
        // redis-protocol reads to the next "\r\n".
        return (l.start, "byte after \\r taken to be \\n");
    }
    // Found by this target (README, finding 2): redis-protocol wants the 4 bytes of a
    // verbatim string's `txt:` prefix before it looks at the length, so it calls `=1` with
    // fewer than 4 bytes after it incomplete (and refuses it later); the scanner takes any
    // `=` length as a blob's.
    let short_verbatim = |l: &Range<usize>| {
        let header = &data[l.start + 1..l.end - 2];
        data[l.start] == b'='
            && common::canonical_int(header)
            && std::str::from_utf8(header).unwrap().parse::<i64>().is_ok_and(|n| (0..4).contains(&n))
    };
    if let Some(l) = lines.iter().find(|l| short_verbatim(l)) {
        return (l.start, "verbatim string shorter than its 4-byte prefix");
    }
    let Some((l, msg)) = err else {
        return (usize::MAX, "");
    };
    if bare(&l) {
        return (l.start, "byte after \\r taken to be \\n");
    }
    let kind = data[l.start];
    let header = &data[l.start + 1..l.end - 2];
    let why = match msg {
        // Streamed RESP3 (`;` chunks, `.` end) and redis-protocol's HELLO pseudo-frame:
        // not supported by geoproxy; members never send them.
        "unexpected type byte in reply" if matches!(kind, b';' | b'.' | b'H') => {
            "RESP3 streamed type or HELLO"
        }
        // `$?`, `*?`, `%?`, `~?`: RESP3 streamed blobs and aggregates, not supported.
        "invalid bulk length" | "invalid multibulk length" if header == b"?" => "RESP3 streamed length",
        "invalid bulk length"
            if common::canonical_int(header)
                && header.iter().map(|&d| d - b'0').fold(0u64, |n, d| n * 10 + d as u64)
                    > MAX_BULK_LEN as u64 =>
        {
            "bulk over 512 MB"
        }
        // Found by this target (README, finding 1): redis-protocol reads lengths with Rust's
        // `parse` (`+3`, `0000000000000000003` are 3); the scanner, like Redis's string2ll,
        // takes at most 18 digits after an optional `-`.
        "invalid bulk length" | "invalid multibulk length"
            if !common::canonical_int(header)
                && std::str::from_utf8(header)
                    .is_ok_and(|h| h.parse::<isize>().is_ok() || h.parse::<usize>().is_ok()) =>
        {
            "length with `+` or over 18 digits"
        }
        "reply nested too deeply" => "nesting over 128",
        _ => return (usize::MAX, ""),
    };
    (l.start, why)
}

/// What redis-protocol makes of the frame at the start of a slice.
#[derive(Debug)]
enum Oracle {
    Frame {
        len: usize,
        /// The type bytes this frame may start with (after any attribute).
        kinds: &'static [u8],
        null: bool,
        /// For an array or push whose first element is a blob string: that string.
        head: Option<Range<usize>>,
        /// The head is not compared (see finding 4).
        head_unknown: bool,
        /// A simple string's text.
        line: Option<Range<usize>>,
        /// For an array or push: which elements are errors (`None` for other frames,
        /// and for maps and sets, whose order redis-protocol does not keep).
        failed: Option<Vec<bool>>,
    },
    Incomplete,
    Refused,
}

fn oracle(buf: &[u8]) -> Oracle {
    use resp3::types::RangeFrame as F3;
    match resp3::decode::complete::decode_range(buf) {
        Ok(Some((f, len))) => {
            let kinds: &'static [u8] = match &f {
                F3::BlobString { .. } => b"$",
                F3::BlobError { .. } => b"!",
                F3::SimpleString { .. } => b"+",
                F3::SimpleError { .. } => b"-",
                F3::Boolean { .. } => b"#",
                F3::Null => b"_",
                F3::Number { .. } => b":",
                F3::Double { .. } => b",",
                F3::BigNumber { .. } => b"(",
                F3::VerbatimString { .. } => b"=",
                F3::Array { .. } => b"*",
                F3::Map { .. } => b"%",
                F3::Set { .. } => b"~",
                F3::Push { .. } => b">",
                F3::Hello { .. } => b"H",
                F3::ChunkedString(_) => b";.",
            };
            let mut head_unknown = false;
            let head = match &f {
                F3::Array { data, .. } | F3::Push { data, .. } => match data.first() {
                    Some(F3::BlobString { data: (s, e), attributes: None }) => Some(*s..*e),
                    // Found by this target (README, finding 4): an attribute before the first
                    // element hides it from the scanner's head capture. Not compared.
                    Some(F3::BlobString { attributes: Some(_), .. }) => {
                        head_unknown = true;
                        None
                    }
                    _ => None,
                },
                _ => None,
            };
            let line = match &f {
                F3::SimpleString { data: (s, e), .. } | F3::SimpleError { data: (s, e), .. } => {
                    Some(*s..*e)
                }
                _ => None,
            };
            let failed = match &f {
                F3::Array { data, .. } | F3::Push { data, .. } => Some(
                    data.iter()
                        .map(|e| matches!(e, F3::SimpleError { .. } | F3::BlobError { .. }))
                        .collect(),
                ),
                F3::Map { .. } | F3::Set { .. } => None,
                _ => Some(Vec::new()),
            };
            Oracle::Frame { len, kinds, null: matches!(f, F3::Null), head, head_unknown, line, failed }
        }
        Ok(None) => Oracle::Incomplete,
        // RESP3's decoder reads `$-1` and `*-1` as streamed frames; RESP2's as nulls.
        Err(_) => {
            use resp2::types::RangeFrame as F2;
            match resp2::decode::decode_range(buf) {
                Ok(Some((f, len))) => {
                    let kinds: &'static [u8] = match &f {
                        F2::SimpleString(_) => b"+",
                        F2::Error(_) => b"-",
                        F2::Integer(_) => b":",
                        F2::BulkString(_) => b"$",
                        F2::Array(_) => b"*",
                        F2::Null => b"$*",
                    };
                    let head = match &f {
                        F2::Array(items) => match items.first() {
                            Some(F2::BulkString((s, e))) => Some(*s..*e),
                            _ => None,
                        },
                        _ => None,
                    };
                    let line = match &f {
                        F2::SimpleString((s, e)) | F2::Error((s, e)) => Some(*s..*e),
                        _ => None,
                    };
                    let failed = match &f {
                        F2::Array(items) => {
                            Some(items.iter().map(|e| matches!(e, F2::Error(_))).collect())
                        }
                        _ => Some(Vec::new()),
                    };
                    Oracle::Frame {
                        len,
                        kinds,
                        null: matches!(f, F2::Null),
                        head,
                        head_unknown: false,
                        line,
                        failed,
                    }
                }
                Ok(None) => Oracle::Incomplete,
                Err(_) => Oracle::Refused,
            }
        }
    }
}

/// The scanner keeps the first 8 bytes of a top-level array's or push's first element.
fn flags(head: &[u8]) -> (bool, bool) {
    let head = &head[..head.len().min(8)];
    let message = matches!(head, b"message" | b"pmessage" | b"smessage");
    let subscription = matches!(
        head,
        b"subscrib" | b"psubscri" | b"ssubscri" | b"unsubscr" | b"punsubsc" | b"sunsubsc"
    );
    (message, subscription)
}

fn compare_with_oracle(data: &[u8], run: &Run, replies: &[Reply], cut_at: usize, why: &str) {
    // The scanner reports a top-level attribute as a frame of its own; redis-protocol
    // attaches it to the frame that follows.
    let frames: Vec<Seen> = run.frames.iter().copied().filter(|f| f.kind != b'|').collect();
    let replies: Vec<Reply> = replies.iter().copied().filter(|r| !r.is_attribute()).collect();
    let mut pos = 0;
    let mut k = 0;
    while pos < data.len() {
        match oracle(&data[pos..]) {
            Oracle::Frame { len, kinds, null, head, head_unknown, line, failed } => {
                let end = pos + len;
                if end > cut_at {
                    return;
                }
                let Some(s) = frames.get(k) else {
                    panic!(
                        "redis-protocol completes frame #{k} at {pos}..{end}; the scanner has \
                         {} frames and {:?}",
                        frames.len(),
                        run.result
                    );
                };
                assert_eq!(s.end, end, "frame #{k} from {pos}: redis-protocol ends it at {end}, the scanner at {}", s.end);
                assert!(kinds.contains(&s.kind), "frame #{k}: kind {:?}, redis-protocol {:?}", s.kind as char, kinds);
                // Found by this target (README, finding 3): `$-01` and `*-01` are nulls to
                // redis-protocol's RESP2 decoder and framed as nulls by the scanner, but the
                // scanner's `null` flag matches the header text `-1` only.
                let rest = &data[pos + 1..];
                let header = &rest[..rest.iter().position(|&b| b == b'\r').unwrap_or(rest.len())];
                if !(null && matches!(s.kind, b'$' | b'*') && header != b"-1") {
                    assert_eq!(s.null, null, "frame #{k} at {pos}..{end}: null flag");
                }
                let want = head.map(|h| flags(&data[pos + h.start..pos + h.end])).unwrap_or_default();
                if !head_unknown {
                    assert_eq!((s.message, s.subscription), want, "frame #{k} at {pos}..{end}: message/subscription flags");
                }
                let r = replies[k];
                // An error line's first bytes: what the error window reads (`-LOADING ...`).
                let error_head = match (s.kind, &line) {
                    (b'-', Some(l)) => &data[pos + l.start..pos + l.end.min(l.start + 8)],
                    _ => &b""[..],
                };
                assert_eq!(r.error_head(), error_head, "frame #{k}: error_head");
                if let (b'+', Some(l)) = (s.kind, line) {
                    let text = &data[pos + l.start..pos + l.end];
                    assert_eq!(r.is_status(text), text.len() < 8, "frame #{k}: is_status of its own text");
                    for t in [&b"OK"[..], b"QUEUED", b""] {
                        assert_eq!(r.is_status(t), text == t, "frame #{k}: is_status({t:?})");
                    }
                } else {
                    assert_eq!(s.status, (false, false), "frame #{k}: is_status of a non-status");
                }
                if let Some(failed) = failed {
                    let mut mask = 0u64;
                    for (i, &f) in failed.iter().enumerate().take(64) {
                        mask |= (f as u64) << i;
                    }
                    let beyond = if failed.iter().skip(64).any(|&f| f) { None } else { Some(false) };
                    assert_eq!(s.failed, (mask, beyond), "frame #{k} at {pos}..{end}: failed elements");
                }
                k += 1;
                pos = end;
            }
            Oracle::Incomplete => {
                if pos < cut_at {
                    if let Some(s) = frames.get(k) {
                        assert!(
                            s.end > cut_at,
                            "redis-protocol finds frame #{k} at {pos} incomplete; the scanner ends it at {} (cut {cut_at} {why})",
                            s.end
                        );
                    }
                    if let Err(e) = run.result {
                        assert!(
                            cut_at != usize::MAX,
                            "redis-protocol finds frame #{k} at {pos} incomplete; the scanner fails: {e}"
                        );
                    }
                }
                return;
            }
            Oracle::Refused => return,
        }
    }
}

fuzz_target!(|raw: &[u8]| {
    let input = common::split(raw);
    let data = input.data;

    let (reference, replies) = whole(data);
    let pieces = chunked(data, &input.sizes);
    assert_eq!(pieces, reference, "chunked feed (sizes {:?}) differs from whole feed", input.sizes);
    let (bytes, lines, err_line) = bytewise(data);
    assert_eq!(bytes, reference, "byte-at-a-time feed differs from whole feed");

    for skip in [false, true] {
        let want = reference.result.map(|_| {
            reference
                .frames
                .iter()
                .copied()
                .find(|f| !skip || !matches!(f.kind, b'>' | b'|'))
        });
        let got = first_frame(data, skip).map(|r| r.map(|r| seen(0, r))).map_err(|e| e.0);
        assert_eq!(got, want, "first_frame(skip_pushes: {skip})");
    }

    let (cut_at, why) = cut(data, &lines, err_line.map(|l| (l, reference.result.unwrap_err())));
    compare_with_oracle(data, &reference, &replies, cut_at, why);
});
