//! RESP on the data path: where frames begin and end, and what a command is.
//!
//! geoproxy forwards the bytes it reads; it never re-encodes a frame it only passes on. This
//! module answers the few questions the session needs answered about those bytes:
//! - [`request`]: where does the next client command end, what is its name, and (only for the
//!   few commands whose arguments change session state) what are its arguments;
//! - [`reply`]: how many complete reply frames did the member send, and which were pushes;
//! - [`command`]: which commands change session state, block, or open a transaction.
//!
//! Why by hand and not `redis-protocol`'s decoders: those allocate a `Vec` per aggregate frame
//! and are not incremental (a frame still arriving is decoded again from its start on every
//! read), and they enforce no size limits. The scanners here allocate nothing per frame, keep
//! their place across reads, and check Redis's limits before waiting for a large frame.
//! `redis-protocol` is kept as the oracle in this module's tests and in `benches/scan.rs`.

pub mod command;
pub mod reply;
pub mod request;
pub mod table;

/// Redis's `proto-max-bulk-len` default: 512 MB.
pub const MAX_BULK_LEN: usize = 512 * 1024 * 1024;
/// Redis's limit on the element count of a client's multibulk command (`INT_MAX`).
pub const MAX_MULTIBULK_LEN: usize = i32::MAX as usize;
/// Redis's `PROTO_INLINE_MAX_SIZE`: 64 KB for an inline command or a header line.
pub const MAX_INLINE_LEN: usize = 64 * 1024;
/// Deepest aggregate nesting accepted in a member's reply.
pub const MAX_NESTING: usize = 128;

/// Bad framing from a client or a member. The text is what follows `-ERR Protocol error: `,
/// worded as Redis words it where Redis has a message for the case; the byte, when there is
/// one, is the unexpected one Redis quotes (`expected '$', got '+'`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.text())]
pub struct ProtocolError(pub &'static str, pub Option<u8>);

impl ProtocolError {
    pub const fn new(message: &'static str) -> ProtocolError {
        ProtocolError(message, None)
    }

    /// A multibulk element that is not a bulk string: Redis names the byte it found.
    pub const fn expected_bulk(got: u8) -> ProtocolError {
        ProtocolError("expected '$', got", Some(got))
    }

    fn text(&self) -> String {
        match self.1 {
            Some(b) => format!("{} '{}'", self.0, b as char),
            None => self.0.to_string(),
        }
    }

    /// The exact error reply Redis sends for it (the quoted byte raw, as Redis writes it,
    /// CR and LF as spaces).
    pub fn reply(&self) -> Vec<u8> {
        let mut out = b"-ERR Protocol error: ".to_vec();
        out.extend_from_slice(self.0.as_bytes());
        if let Some(b) = self.1 {
            let b = if matches!(b, b'\r' | b'\n') { b' ' } else { b };
            out.extend_from_slice(&[b' ', b'\'', b, b'\'']);
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Finds the RESP line starting at `from`: returns the index of its `\r` and the index just
/// past its `\n`, or `None` while the line is incomplete. As in Redis, the byte after `\r` is
/// taken to be `\n`.
#[inline]
fn find_line(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let cr = from + buf.get(from..)?.iter().position(|&b| b == b'\r')?;
    (cr + 1 < buf.len()).then_some((cr, cr + 2))
}

/// Parses a signed decimal integer as RESP headers write it, as strictly as Redis's
/// `string2ll`: no sign but `-`, no leading zero, no `-0`. No allocation.
#[inline]
fn parse_int(digits: &[u8]) -> Option<i64> {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    if digits[0] == b'0' && (digits.len() > 1 || neg) {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Some(if neg { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"-1"), Some(-1));
        assert_eq!(parse_int(b"123456"), Some(123456));
        assert_eq!(parse_int(b""), None);
        assert_eq!(parse_int(b"-"), None);
        assert_eq!(parse_int(b"1x"), None);
        assert_eq!(parse_int(b"9999999999999999999999"), None);
        // As Redis's string2ll: these are protocol errors.
        assert_eq!(parse_int(b"01"), None);
        assert_eq!(parse_int(b"00"), None);
        assert_eq!(parse_int(b"-0"), None);
        assert_eq!(parse_int(b"+1"), None);
        assert_eq!(parse_int(b"-10"), Some(-10));
    }

    #[test]
    fn lines() {
        assert_eq!(find_line(b"ab\r\ncd", 0), Some((2, 4)));
        assert_eq!(find_line(b"ab\r", 0), None);
        assert_eq!(find_line(b"ab", 0), None);
        assert_eq!(find_line(b"ab\r\ncd\r\n", 4), Some((6, 8)));
    }
}
