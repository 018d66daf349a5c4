//! Member replies: how many complete frames have arrived, and which of them are replies.
//!
//! Replies are forwarded as they arrive, even in the middle of a frame (a 100 MB value is
//! never held whole in the proxy), so the scanner is a small state machine that keeps its
//! place across reads: the open aggregates and the bytes left of a blob body. It consumes
//! everything but an incomplete header line, which stays in the buffer until its `\r\n`.

use super::{find_line, parse_int, ProtocolError, MAX_BULK_LEN, MAX_NESTING};

/// The first complete frame in `buf` (with `skip_pushes`, the first that is not a push or
/// an attribute). For short exchanges (health checks, session replay); it scans from the
/// start.
pub fn first_frame(buf: &[u8], skip_pushes: bool) -> Result<Option<Reply>, ProtocolError> {
    let mut first = None;
    ReplyScanner::default().scan(buf, |r| {
        let skip = skip_pushes && (r.is_push() || r.is_attribute());
        if first.is_none() && !skip {
            first = Some(r);
        }
    })?;
    Ok(first)
}

/// Longest header or simple-string line accepted from a member (errors from scripts can be
/// long; a member is trusted more than a client, but not without bound).
const MAX_REPLY_LINE: usize = 1024 * 1024;

/// A complete top-level frame from the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The frame's type byte (`+ - : $ * _ , # ! = ( % ~ > |`).
    pub kind: u8,
    /// Offset just past the frame's last byte, in the slice passed to [`ReplyScanner::scan`].
    pub end: usize,
    /// A null (`$-1`, `*-1`, `_`): for EXEC, a transaction that did not run.
    pub null: bool,
    /// For an array or push whose first element is a bulk string: its first bytes; for a
    /// simple string: the first bytes of its line.
    head: [u8; HEAD_LEN],
    head_len: u8,
    /// Which of the first 64 elements of an array reply are errors (bit `i` = element `i`):
    /// how EXEC says which queued command failed.
    failed_elements: u64,
    /// An element after the 64th is an error.
    failed_beyond: bool,
}

impl Reply {
    /// An out-of-band RESP3 push (`>`): pub/sub messages, invalidations. Not a reply.
    pub fn is_push(self) -> bool {
        self.kind == b'>'
    }

    /// A RESP3 attribute (`|`), which decorates the frame after it. Not a reply either.
    pub fn is_attribute(self) -> bool {
        self.kind == b'|'
    }

    /// An error reply (`-ERR ...`, RESP3 blob error `!`).
    pub fn is_error(self) -> bool {
        matches!(self.kind, b'-' | b'!')
    }

    /// A pub/sub message (`message`, `pmessage`, `smessage`): an array in RESP2, a push in
    /// RESP3. In RESP2 only a subscribed connection's context tells it from a reply.
    pub fn is_message(&self) -> bool {
        matches!(self.head(), b"message" | b"pmessage" | b"smessage")
    }

    /// A (P|S)(UN)SUBSCRIBE confirmation (an array in RESP2, a push in RESP3). The head is
    /// cut at [`HEAD_LEN`] bytes.
    pub fn is_subscription(&self) -> bool {
        matches!(
            self.head(),
            b"subscrib" | b"psubscri" | b"ssubscri" | b"unsubscr" | b"punsubsc" | b"sunsubsc"
        )
    }

    /// A simple-string reply whose whole text is `text` (shorter than [`HEAD_LEN`]).
    pub fn is_status(&self, text: &[u8]) -> bool {
        self.kind == b'+' && text.len() < HEAD_LEN && self.head() == text
    }

    /// Did element `i` of this array reply fail (an error)? `None` past the 64th element
    /// when a later element failed: unknown.
    pub fn element_failed(&self, i: usize) -> Option<bool> {
        match i {
            0..64 => Some(self.failed_elements & (1 << i) != 0),
            _ if self.failed_beyond => None,
            _ => Some(false),
        }
    }

    /// The first [`HEAD_LEN`] bytes of an error line (after `-`); empty for other frames.
    pub fn error_head(&self) -> &[u8] {
        match self.kind {
            b'-' => &self.head[..self.head_len as usize],
            _ => &[],
        }
    }

    /// The first bytes of an array's or push's first element, if that is a bulk string, or
    /// of a simple string.
    fn head(&self) -> &[u8] {
        match self.kind {
            b'*' | b'>' | b'+' => &self.head[..self.head_len as usize],
            _ => &[],
        }
    }
}

/// Bytes kept of the first element of an array (enough for `pmessage`), or of a simple or
/// error line (enough for `MASTERDO`).
pub const HEAD_LEN: usize = 8;

#[derive(Debug, Clone, Copy)]
struct Open {
    /// Elements still to come in this aggregate.
    left: u64,
    /// An attribute: when it closes it is not an element of its parent.
    attribute: bool,
}

/// Incremental scanner over the byte stream a member sends.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    /// Open aggregates, innermost last.
    stack: Vec<Open>,
    /// Bytes of the current blob body (and its `\r\n`) still to come.
    body_left: usize,
    /// Type byte of the top-level frame in progress.
    top: u8,
    /// A top-level frame has started and not ended.
    in_frame: bool,
    /// The top-level frame in progress is a null.
    null: bool,
    /// The next element header is the first element of a top-level array or push.
    at_first_element: bool,
    head: [u8; HEAD_LEN],
    head_len: u8,
    /// Bytes of the first element still to copy into `head`.
    capture_left: usize,
    /// Elements of the top-level aggregate begun so far, and which were errors.
    elements: usize,
    failed_elements: u64,
    failed_beyond: bool,
}

impl ReplyScanner {
    /// Scans `buf` (the bytes after the previously consumed ones), calls `on_reply` for each
    /// top-level frame completed, and returns how many bytes may be consumed (forwarded).
    pub fn scan(
        &mut self,
        buf: &[u8],
        mut on_reply: impl FnMut(Reply),
    ) -> Result<usize, ProtocolError> {
        let mut pos = 0;
        loop {
            if self.body_left > 0 {
                let take = self.body_left.min(buf.len() - pos);
                if self.capture_left > 0 {
                    let n = self.capture_left.min(take);
                    let at = self.head_len as usize;
                    self.head[at..at + n].copy_from_slice(&buf[pos..pos + n]);
                    self.head_len += n as u8;
                    self.capture_left -= n;
                }
                pos += take;
                self.body_left -= take;
                if self.body_left > 0 {
                    return Ok(pos);
                }
                self.element_done(false, pos, &mut on_reply);
                continue;
            }
            let Some(&kind) = buf.get(pos) else {
                return Ok(pos);
            };
            let Some((cr, next)) = find_line(buf, pos + 1) else {
                return if buf.len() - pos > MAX_REPLY_LINE {
                    Err(ProtocolError::new("too long reply line from member"))
                } else {
                    Ok(pos)
                };
            };
            let header = &buf[pos + 1..cr];
            if !self.in_frame {
                self.in_frame = true;
                self.top = kind;
                self.null = kind == b'_' || matches!(kind, b'$' | b'*') && header == b"-1";
                self.head_len = 0;
                self.at_first_element = false;
                self.elements = 0;
                self.failed_elements = 0;
                self.failed_beyond = false;
                if matches!(kind, b'+' | b'-') {
                    let n = header.len().min(HEAD_LEN);
                    self.head[..n].copy_from_slice(&header[..n]);
                    self.head_len = n as u8;
                }
            } else if self.stack.len() == 1 && kind != b'|' {
                // A direct element of the top-level aggregate.
                if matches!(kind, b'-' | b'!') {
                    match self.elements {
                        i @ 0..64 => self.failed_elements |= 1 << i,
                        _ => self.failed_beyond = true,
                    }
                }
                self.elements += 1;
                if self.at_first_element {
                    self.at_first_element = false;
                    if kind == b'$' {
                        let len = parse_int(header).unwrap_or(0).max(0) as usize;
                        self.capture_left = len.min(HEAD_LEN);
                    }
                }
            }
            pos = next;
            match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    self.element_done(false, pos, &mut on_reply)
                }
                b'$' | b'!' | b'=' => {
                    let len = parse_int(header).ok_or(ProtocolError::new("invalid bulk length"))?;
                    if len < 0 {
                        self.element_done(false, pos, &mut on_reply); // RESP2 null bulk
                    } else if len as usize > MAX_BULK_LEN {
                        return Err(ProtocolError::new("invalid bulk length"));
                    } else {
                        self.body_left = len as usize + 2;
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n =
                        parse_int(header).ok_or(ProtocolError::new("invalid multibulk length"))?;
                    let pairs = matches!(kind, b'%' | b'|');
                    let attribute = kind == b'|';
                    if n <= 0 {
                        self.element_done(attribute, pos, &mut on_reply); // empty or null (`*-1`)
                    } else if self.stack.len() >= MAX_NESTING {
                        return Err(ProtocolError::new("reply nested too deeply"));
                    } else {
                        let left = if pairs { n as u64 * 2 } else { n as u64 };
                        self.at_first_element =
                            self.stack.is_empty() && matches!(kind, b'*' | b'>');
                        self.stack.push(Open { left, attribute });
                    }
                }
                _ => return Err(ProtocolError::new("unexpected type byte in reply")),
            }
        }
    }

    /// True while a top-level frame has been partly consumed: if the member fails now, the
    /// client has received part of a reply and the connection cannot be saved.
    pub fn mid_frame(&self) -> bool {
        self.in_frame
    }

    /// An element (scalar, or an aggregate that just closed) is complete.
    fn element_done(&mut self, mut attribute: bool, end: usize, on_reply: &mut impl FnMut(Reply)) {
        while let Some(open) = self.stack.last_mut() {
            if !attribute {
                open.left -= 1;
            }
            if open.left > 0 {
                return;
            }
            attribute = open.attribute;
            self.stack.pop();
        }
        self.in_frame = false;
        on_reply(Reply {
            kind: self.top,
            end,
            null: self.null,
            head: self.head,
            head_len: self.head_len,
            failed_elements: self.failed_elements,
            failed_beyond: self.failed_beyond,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(buf: &[u8]) -> (Vec<u8>, usize) {
        let mut s = ReplyScanner::default();
        let mut out = Vec::new();
        let n = s.scan(buf, |r| out.push(r.kind)).unwrap();
        (out, n)
    }

    #[test]
    fn resp2_frames() {
        let buf = b"+OK\r\n-ERR x\r\n:1\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$1\r\na\r\n*-1\r\n*0\r\n";
        let (k, n) = kinds(buf);
        assert_eq!(k, b"+-:$$**");
        assert_eq!(n, buf.len());
    }

    #[test]
    fn resp3_frames_pushes_and_attributes() {
        let buf = b"%1\r\n+a\r\n:1\r\n>2\r\n+x\r\n+y\r\n|1\r\n+k\r\n+v\r\n_\r\n,1.5\r\n#t\r\n=7\r\ntxt:abc\r\n~1\r\n(1\r\n!3\r\nERR\r\n";
        let (k, n) = kinds(buf);
        assert_eq!(k, b"%>|_,#=~!");
        assert_eq!(n, buf.len());
        // An attribute nested inside an aggregate is not one of its elements.
        let (k, _) = kinds(b"*1\r\n|1\r\n+k\r\n+v\r\n:5\r\n");
        assert_eq!(k, b"*");
    }

    #[test]
    fn messages_are_recognised_across_reads() {
        let frames: &[u8] = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n>4\r\n$8\r\npmessage\r\n$1\r\np\r\n$1\r\nc\r\n$1\r\nm\r\n*1\r\n*1\r\n$7\r\nmessage\r\n";
        for step in [1, 3, frames.len()] {
            let mut s = ReplyScanner::default();
            let mut found = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            for chunk in frames.chunks(step) {
                pending.extend_from_slice(chunk);
                let n = s.scan(&pending, |r| found.push(r.is_message())).unwrap();
                pending.drain(..n);
            }
            // A nested array that starts with "message" is not a message.
            assert_eq!(found, [true, false, true, false], "step {step}");
        }
    }

    #[test]
    fn nulls() {
        let mut s = ReplyScanner::default();
        let mut nulls = Vec::new();
        s.scan(b"*-1\r\n$-1\r\n_\r\n:-1\r\n*0\r\n-ERR\r\n", |r| {
            nulls.push(r.null)
        })
        .unwrap();
        assert_eq!(nulls, [true, true, true, false, false, false]);
    }

    #[test]
    fn byte_by_byte_feed_gives_the_same_frames() {
        let buf: &[u8] = b"*3\r\n$5\r\nhello\r\n*1\r\n:1\r\n%1\r\n+a\r\n$2\r\nbc\r\n+OK\r\n";
        let mut s = ReplyScanner::default();
        let mut frames = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for &b in buf {
            pending.push(b);
            let n = s.scan(&pending, |r| frames.push(r.kind)).unwrap();
            pending.drain(..n);
        }
        assert!(pending.is_empty());
        assert_eq!(frames, b"*+");
        assert!(!s.mid_frame());
    }

    #[test]
    fn big_bodies_are_consumed_as_they_arrive() {
        let mut s = ReplyScanner::default();
        let mut n_frames = 0;
        assert_eq!(s.scan(b"$10\r\nabcd", |_| n_frames += 1).unwrap(), 9);
        assert!(s.mid_frame());
        assert_eq!(s.scan(b"efghij\r", |_| n_frames += 1).unwrap(), 7);
        assert_eq!(n_frames, 0);
        assert_eq!(s.scan(b"\n+OK\r", |_| n_frames += 1).unwrap(), 1);
        assert_eq!(n_frames, 1);
    }

    #[test]
    fn malformed_replies_are_errors() {
        let mut s = ReplyScanner::default();
        assert!(s.scan(b"?x\r\n", |_| ()).is_err());
        let mut s = ReplyScanner::default();
        assert!(s.scan(b"$abc\r\n", |_| ()).is_err());
        let deep = "*1\r\n".repeat(MAX_NESTING + 1);
        let mut s = ReplyScanner::default();
        assert!(s.scan(deep.as_bytes(), |_| ()).is_err());
    }

    /// The scanner agrees with redis-protocol's decoders on where frames end.
    #[test]
    fn agrees_with_redis_protocol() {
        use redis_protocol::resp3::decode::complete::decode_range;
        let frames: &[&[u8]] = &[
            b"+OK\r\n",
            b"*2\r\n$3\r\nfoo\r\n%1\r\n+a\r\n~2\r\n:1\r\n:2\r\n",
            b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nmsg\r\n",
            b"=9\r\ntxt:hello\r\n",
            b"$0\r\n\r\n",
        ];
        for f in frames {
            let (_, len) = decode_range(f).unwrap().unwrap();
            let mut s = ReplyScanner::default();
            let mut ends = Vec::new();
            let consumed = s.scan(f, |_| ends.push(())).unwrap();
            assert_eq!(
                (consumed, ends.len()),
                (len, 1),
                "{:?}",
                String::from_utf8_lossy(f)
            );
        }
    }
}
