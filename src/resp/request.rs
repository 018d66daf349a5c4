//! Client commands: where each ends, its name, and (on demand) its arguments.
//!
//! A client sends a multibulk array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or an
//! inline command (`GET k\r\n`, typed by hand). The scanner is incremental: a command still
//! arriving keeps its place, so a 10 MB value is not re-scanned on every read. Limits are
//! Redis's, with Redis's error texts, checked before waiting for the bytes.

use std::ops::Range;

use super::{find_line, parse_int, ProtocolError, MAX_BULK_LEN, MAX_INLINE_LEN, MAX_MULTIBULK_LEN};

/// One complete command at the front of the scanned slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Bytes the command occupies (consume this many).
    pub len: usize,
    /// Range of the command name within the slice (empty for an empty or inline command).
    pub name: Range<usize>,
    /// Number of elements, name included; 0 for an empty command, which Redis skips without
    /// a reply (`*0\r\n`, a blank inline line).
    pub argc: usize,
    /// An inline command: forward it re-encoded as multibulk (see [`split_inline`]).
    pub inline: bool,
}

/// Incremental scanner for the command at the front of a buffer.
///
/// Call [`RequestScanner::next`] with a slice that starts where the command starts; while it
/// returns `Ok(None)` the command is incomplete, and the next call must pass a slice with the
/// same start (more bytes appended). After a complete frame the scanner is reset.
#[derive(Debug, Default)]
pub struct RequestScanner {
    /// Elements announced by the multibulk header; 0 until the header is read.
    argc: usize,
    /// Elements fully scanned so far.
    seen: usize,
    /// Offset of the next unscanned element header.
    pos: usize,
    /// While an element's body is incomplete: the offset just past it (and its CRLF).
    body_end: Option<usize>,
    name: Range<usize>,
}

impl RequestScanner {
    /// Scans the command at the start of `buf`.
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        if first != b'*' && self.argc == 0 {
            return scan_inline(buf);
        }
        if self.argc == 0 {
            let Some((cr, next)) = find_line(buf, 1) else {
                return too_long(buf, "too big mbulk count string");
            };
            let n = parse_int(&buf[1..cr]).ok_or(ProtocolError::new("invalid multibulk length"))?;
            if n > MAX_MULTIBULK_LEN as i64 {
                return Err(ProtocolError::new("invalid multibulk length"));
            }
            if n <= 0 {
                // Redis skips an empty multibulk without replying.
                return Ok(Some(Frame {
                    len: next,
                    name: 0..0,
                    argc: 0,
                    inline: false,
                }));
            }
            self.argc = n as usize;
            self.pos = next;
        }
        while self.seen < self.argc {
            if let Some(end) = self.body_end {
                if buf.len() < end {
                    return Ok(None);
                }
                self.body_end = None;
                self.seen += 1;
                self.pos = end;
                continue;
            }
            let at = self.pos;
            let Some(&kind) = buf.get(at) else {
                return Ok(None);
            };
            if kind != b'$' {
                return Err(ProtocolError::expected_bulk(kind));
            }
            let Some((cr, body)) = find_line(buf, at + 1) else {
                return too_long(&buf[at..], "too big bulk count string");
            };
            let len =
                parse_int(&buf[at + 1..cr]).ok_or(ProtocolError::new("invalid bulk length"))?;
            if !(0..=MAX_BULK_LEN as i64).contains(&len) {
                return Err(ProtocolError::new("invalid bulk length"));
            }
            let end = body + len as usize;
            if self.seen == 0 {
                self.name = body..end;
            }
            self.body_end = Some(end + 2);
        }
        let frame = Frame {
            len: self.pos,
            name: self.name.clone(),
            argc: self.argc,
            inline: false,
        };
        *self = RequestScanner::default();
        Ok(Some(frame))
    }
}

impl RequestScanner {
    /// The name of the command being scanned, once its first element is complete (a range
    /// of the slice passed to [`RequestScanner::next`]).
    pub fn name(&self) -> Option<Range<usize>> {
        (self.seen > 0).then(|| self.name.clone())
    }

    /// How many bytes at the front of `buf` (the incomplete command, as last scanned) are
    /// already known to belong to it and may be sent on before it is complete: its complete
    /// elements, and what has arrived of the current element's body.
    pub fn streamable(&self, buf_len: usize) -> usize {
        match self.body_end {
            Some(end) => buf_len.min(end),
            None => self.pos,
        }
    }

    /// The caller removed the first `n` bytes (at most [`RequestScanner::streamable`]) of
    /// the incomplete command: the next call passes the rest. The name range is stale then.
    pub fn drained(&mut self, n: usize) {
        match &mut self.body_end {
            Some(end) => *end -= n,
            None => self.pos -= n,
        }
        self.name = 0..0;
    }
}

/// A header line without its `\r\n` yet: incomplete, unless it is already over Redis's limit.
fn too_long(buf: &[u8], message: &'static str) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() > MAX_INLINE_LEN {
        Err(ProtocolError::new(message))
    } else {
        Ok(None)
    }
}

/// An inline command ends at `\n` (an optional `\r` before it is dropped).
fn scan_inline(buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE_LEN {
            Err(ProtocolError::new("too big inline request"))
        } else {
            Ok(None)
        };
    };
    let argc = split_inline(&buf[..lf])?.len();
    Ok(Some(Frame {
        len: lf + 1,
        name: 0..0,
        argc,
        inline: true,
    }))
}

/// Splits an inline command line into arguments as Redis's `sdssplitargs` does: spaces
/// separate, `"..."` understands `\n \r \t \b \a \\ \" \xHH`, `'...'` only `\'`.
pub fn split_inline(line: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    const UNBALANCED: ProtocolError = ProtocolError::new("unbalanced quotes in request");
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return Ok(args);
        }
        let mut arg = Vec::new();
        let quote = match line[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                Some(q)
            }
            _ => None,
        };
        loop {
            let Some(&c) = line.get(i) else {
                if quote.is_some() {
                    return Err(UNBALANCED);
                }
                break;
            };
            match quote {
                None if c.is_ascii_whitespace() => break,
                None => arg.push(c),
                Some(q) if c == q => {
                    // A closing quote must be followed by a space or the end.
                    if line.get(i + 1).is_some_and(|n| !n.is_ascii_whitespace()) {
                        return Err(UNBALANCED);
                    }
                    i += 1;
                    break;
                }
                Some(b'"') if c == b'\\' && i + 1 < line.len() => {
                    i += 1;
                    let e = line[i];
                    let hex = |b: u8| (b as char).to_digit(16);
                    match e {
                        b'x' if i + 2 < line.len() => match (hex(line[i + 1]), hex(line[i + 2])) {
                            (Some(h), Some(l)) => {
                                arg.push((h * 16 + l) as u8);
                                i += 2;
                            }
                            _ => arg.push(e),
                        },
                        b'n' => arg.push(b'\n'),
                        b'r' => arg.push(b'\r'),
                        b't' => arg.push(b'\t'),
                        b'b' => arg.push(0x08),
                        b'a' => arg.push(0x07),
                        other => arg.push(other),
                    }
                }
                Some(b'\'') if c == b'\\' && line.get(i + 1) == Some(&b'\'') => {
                    i += 1;
                    arg.push(b'\'');
                }
                Some(_) => arg.push(c),
            }
            i += 1;
        }
        args.push(arg);
    }
}

/// Writes `args` as a multibulk command.
pub fn encode_command(args: &[Vec<u8>], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The arguments of a complete command (name included), for the few commands whose arguments
/// matter to the session. Allocates; not for the common path.
pub fn args(frame: &[u8], inline: bool) -> Vec<Vec<u8>> {
    if inline {
        let line = frame.strip_suffix(b"\n").unwrap_or(frame);
        return split_inline(line).unwrap_or_default();
    }
    let mut out = Vec::new();
    let Some((cr, mut pos)) = find_line(frame, 1) else {
        return out;
    };
    let argc = parse_int(&frame[1..cr]).unwrap_or(0).max(0) as usize;
    for _ in 0..argc {
        let Some((cr, body)) = find_line(frame, pos + 1) else {
            break;
        };
        let len = parse_int(&frame[pos + 1..cr]).unwrap_or(0).max(0) as usize;
        let Some(arg) = frame.get(body..body + len) else {
            break;
        };
        out.push(arg.to_vec());
        pos = body + len + 2;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        RequestScanner::default().next(buf)
    }

    #[test]
    fn complete_multibulk() {
        let buf = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n";
        let f = scan_all(buf).unwrap().unwrap();
        assert_eq!(f.len, 20);
        assert_eq!(&buf[f.name.clone()], b"GET");
        assert_eq!(f.argc, 2);
        assert!(!f.inline);
    }

    #[test]
    fn every_split_point_is_incomplete_then_complete() {
        let buf = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
        for cut in 0..buf.len() {
            let mut s = RequestScanner::default();
            assert_eq!(s.next(&buf[..cut]).unwrap(), None, "cut at {cut}");
            let f = s.next(buf).unwrap().unwrap();
            assert_eq!(f.len, buf.len());
            assert_eq!(&buf[f.name], b"SET");
        }
    }

    #[test]
    fn large_value_waits_without_rescanning_headers() {
        let mut s = RequestScanner::default();
        let head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1000000\r\n";
        assert_eq!(s.next(head).unwrap(), None);
        assert_eq!(s.seen, 2, "the two complete elements are remembered");
        let mut full = head.to_vec();
        full.extend(std::iter::repeat_n(b'x', 1_000_000));
        full.extend_from_slice(b"\r\n");
        assert_eq!(s.next(&full).unwrap().unwrap().len, full.len());
    }

    #[test]
    fn limits_and_malformed_input_use_redis_messages() {
        let e = |b: &[u8]| scan_all(b).unwrap_err().0;
        assert_eq!(e(b"*2147483648\r\n"), "invalid multibulk length");
        // Redis accepts up to INT_MAX elements (an SADD of 1.1M members works).
        assert_eq!(scan_all(b"*1100000\r\n$4\r\nSADD\r\n").unwrap(), None);
        assert_eq!(e(b"*x\r\n"), "invalid multibulk length");
        assert_eq!(e(b"*1\r\n$600000000\r\n"), "invalid bulk length");
        assert_eq!(e(b"*1\r\n$-1\r\n"), "invalid bulk length");
        assert_eq!(
            scan_all(b"*1\r\n+OK\r\n").unwrap_err().reply(),
            b"-ERR Protocol error: expected '$', got '+'\r\n"
        );
        let long = vec![b'a'; MAX_INLINE_LEN + 1];
        assert_eq!(e(&long), "too big inline request");
        assert_eq!(e(b"SET \"abc\r\n"), "unbalanced quotes in request");
    }

    #[test]
    fn a_large_command_streams_out_as_it_arrives() {
        let mut s = RequestScanner::default();
        let mut buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\nabc".to_vec();
        assert_eq!(s.next(&buf).unwrap(), None);
        assert_eq!(&buf[s.name().unwrap()], b"SET");
        // Everything so far belongs to the command: send it on.
        let n = s.streamable(buf.len());
        assert_eq!(n, buf.len());
        buf.drain(..n);
        s.drained(n);
        buf.extend_from_slice(b"defghij\r");
        assert_eq!(s.next(&buf).unwrap(), None);
        let n = s.streamable(buf.len());
        buf.drain(..n);
        s.drained(n);
        buf.extend_from_slice(b"\n*1\r\n$4\r\nPING\r\n");
        let f = s.next(&buf).unwrap().unwrap();
        assert_eq!(f.len, 1, "the rest of the streamed command: its last LF");
        let f = s.next(&buf[1..]).unwrap().unwrap();
        assert_eq!(f.argc, 1);
        // Between elements only complete elements are streamable.
        let mut s = RequestScanner::default();
        let buf = b"*3\r\n$3\r\nSET\r\n$1";
        assert_eq!(s.next(buf).unwrap(), None);
        assert_eq!(s.streamable(buf.len()), 13);
    }

    #[test]
    fn empty_commands_are_skipped() {
        assert_eq!(scan_all(b"*0\r\n").unwrap().unwrap().argc, 0);
        assert_eq!(scan_all(b"\r\n").unwrap().unwrap().argc, 0);
        assert_eq!(scan_all(b"   \n").unwrap().unwrap().len, 4);
    }

    #[test]
    fn inline_commands_split_like_redis() {
        let f = scan_all(b"set  k \"a b\\x41\\n\"\r\nGET k")
            .unwrap()
            .unwrap();
        assert!(f.inline);
        assert_eq!(f.argc, 3);
        assert_eq!(f.len, 20);
        let args = split_inline(b"set  k \"a b\\x41\\n\"\r").unwrap();
        assert_eq!(args, [b"set".to_vec(), b"k".to_vec(), b"a bA\n".to_vec()]);
        assert_eq!(split_inline(b"'it\\'s'").unwrap(), [b"it's".to_vec()]);
        let mut out = Vec::new();
        encode_command(&args, &mut out);
        assert_eq!(out, b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$5\r\na bA\n\r\n");
    }

    #[test]
    fn args_of_a_frame() {
        let buf = b"*3\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$0\r\n\r\n";
        assert_eq!(
            args(buf, false),
            [b"HELLO".to_vec(), b"3".to_vec(), Vec::new()]
        );
        assert_eq!(
            args(b"select 2\r\n", true),
            [b"select".to_vec(), b"2".to_vec()]
        );
    }
}
