//! Differential testing: play one byte script against `redis-server` directly and through
//! geoproxy, and compare what comes back, byte for byte.
//!
//! A [`Script`] is a list of pipelined batches of client commands; [`Lane`] is a set of
//! servers that plays scripts one at a time (a direct `redis-server`, a second one as a
//! reference, and geoproxy in front of a third); [`Lane::run`] gives a [`Verdict`]. The
//! script format is documented in `tests/it/differential.rs` and parsed by [`Script::parse`];
//! [`Script::render`] writes it back, so a failing generated script can be saved as a corpus
//! file.
//!
//! Every case is also played against the reference server: if the two real servers disagree,
//! the script itself is not deterministic and the verdict says so (a harness bug, not a
//! geoproxy bug).

use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::proxy::{Options, Proxy};
use super::redis_server::RedisServer;

/// A batch's replies are complete once the server has been quiet this long (or closed).
/// Blocking commands in scripts use timeouts well below it (`BLPOP k 0.05`, `BLOCK 50`).
pub const QUIET: Duration = Duration::from_millis(200);
/// Pause between two chunks of a split batch, so that each chunk is a read of its own.
pub const CHUNK_PAUSE: Duration = Duration::from_millis(2);
/// geoproxy's `reply_timeout` in the lanes: short, so a miscounted reply shows up quickly.
pub const REPLY_TIMEOUT: &str = "300ms";
/// After the last batch, how long more to listen: longer than [`REPLY_TIMEOUT`], so a
/// reply the proxy wrongly thinks is owed ends in a stray error that arrives here.
pub const LATE_WAIT: Duration = Duration::from_millis(400);
/// How long a lane waits for the servers to see the last case's connections closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// Scripts

/// One thing the client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A command, sent as a RESP multibulk (`*N\r\n$len\r\narg\r\n...`).
    Cmd(Vec<Vec<u8>>),
    /// An inline command: these bytes followed by `\r\n`.
    Inline(Vec<u8>),
    /// Bytes sent as they are.
    Raw(Vec<u8>),
}

impl Item {
    pub fn bytes(&self, out: &mut Vec<u8>) {
        match self {
            Item::Cmd(args) => {
                out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
                for a in args {
                    out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                    out.extend_from_slice(a);
                    out.extend_from_slice(b"\r\n");
                }
            }
            Item::Inline(line) => {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
            Item::Raw(bytes) => out.extend_from_slice(bytes),
        }
    }

    fn words(&self) -> Vec<String> {
        match self {
            Item::Cmd(args) => args
                .iter()
                .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
                .collect(),
            Item::Inline(line) => String::from_utf8_lossy(line)
                .split_whitespace()
                .map(str::to_ascii_uppercase)
                .collect(),
            Item::Raw(_) => Vec::new(),
        }
    }
}

/// Commands written together (one pipeline), possibly in several writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub items: Vec<Item>,
    /// Byte offsets (0 < cut < len, increasing) where the batch is split into writes.
    pub cuts: Vec<usize>,
    /// After writing the batch, shut the write side down (half-close).
    pub shutdown: bool,
}

impl Batch {
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for item in &self.items {
            item.bytes(&mut out);
        }
        out
    }

    /// Keeps only the cuts that fall inside the batch, sorted and once each.
    pub fn normalize_cuts(&mut self) {
        let len = self.bytes().len();
        self.cuts.retain(|&c| c > 0 && c < len);
        self.cuts.sort_unstable();
        self.cuts.dedup();
    }

    fn chunks(&self) -> Vec<Vec<u8>> {
        let bytes = self.bytes();
        let mut out = Vec::new();
        let mut start = 0;
        for &c in self.cuts.iter().filter(|&&c| c > 0 && c < bytes.len()) {
            if c > start {
                out.push(bytes[start..c].to_vec());
                start = c;
            }
        }
        out.push(bytes[start..].to_vec());
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    /// A file name or a generated case's label.
    pub name: String,
    pub batches: Vec<Batch>,
}

impl Script {
    /// Parses the corpus format (see `tests/it/differential.rs`).
    pub fn parse(name: &str, text: &str) -> Result<Script, String> {
        let mut batches = Vec::new();
        let mut batch = Batch::default();
        let mut random_cuts: Option<usize> = None;
        let mut every_byte = false;
        let finish = |batches: &mut Vec<Batch>,
                      batch: &mut Batch,
                      random_cuts: &mut Option<usize>,
                      every_byte: &mut bool| {
            let mut b = std::mem::take(batch);
            let len = b.bytes().len();
            if *every_byte {
                b.cuts = (1..len).collect();
            }
            if let Some(n) = random_cuts.take() {
                let mut rng = SplitMix(fnv1a(name.as_bytes()) ^ batches.len() as u64);
                for _ in 0..n {
                    if len > 1 {
                        b.cuts.push(1 + (rng.next() % (len as u64 - 1)) as usize);
                    }
                }
            }
            *every_byte = false;
            b.normalize_cuts();
            if !b.items.is_empty() || b.shutdown {
                batches.push(b);
            }
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let lineno = i + 1;
            let err = |what: &str| format!("{name}:{lineno}: {what}: {line:?}");
            let trimmed = line.trim();
            if trimmed.is_empty() {
                finish(&mut batches, &mut batch, &mut random_cuts, &mut every_byte);
                continue;
            }
            if trimmed.starts_with('#') {
                continue;
            }
            if batches.last().is_some_and(|b: &Batch| b.shutdown) {
                return Err(err("nothing can follow a batch with !shutdown"));
            }
            if let Some(directive) = trimmed.strip_prefix('!') {
                let words: Vec<&str> = directive.split_whitespace().collect();
                match words.as_slice() {
                    ["shutdown"] => batch.shutdown = true,
                    ["split", "bytes"] => every_byte = true,
                    ["split", "random", n] => {
                        random_cuts = Some(n.parse().map_err(|_| err("bad count"))?)
                    }
                    ["split", "at", offsets @ ..] if !offsets.is_empty() => {
                        for o in offsets {
                            batch.cuts.push(o.parse().map_err(|_| err("bad offset"))?);
                        }
                    }
                    _ => return Err(err("unknown directive")),
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("inline:") {
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                batch.items.push(Item::Inline(rest.as_bytes().to_vec()));
            } else if let Some(rest) = line.strip_prefix("raw:") {
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                batch
                    .items
                    .push(Item::Raw(unescape(rest).map_err(|e| err(&e))?));
            } else {
                let args = split_words(trimmed).map_err(|e| err(&e))?;
                batch.items.push(Item::Cmd(args));
            }
        }
        finish(&mut batches, &mut batch, &mut random_cuts, &mut every_byte);
        if batches.is_empty() {
            return Err(format!("{name}: no commands"));
        }
        Ok(Script {
            name: name.to_string(),
            batches,
        })
    }

    /// The script in the corpus format (splits as explicit `!split at` offsets).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, b) in self.batches.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            if !b.cuts.is_empty() {
                let cuts: Vec<String> = b.cuts.iter().map(usize::to_string).collect();
                let _ = writeln!(out, "!split at {}", cuts.join(" "));
            }
            for item in &b.items {
                match item {
                    Item::Cmd(args) => {
                        let words: Vec<String> = args
                            .iter()
                            .enumerate()
                            .map(|(i, a)| render_word(a, i == 0))
                            .collect();
                        let _ = writeln!(out, "{}", words.join(" "));
                    }
                    Item::Inline(line) if is_plain_line(line) => {
                        let text = String::from_utf8_lossy(line);
                        let _ = writeln!(out, "inline: {text}");
                    }
                    Item::Inline(line) => {
                        let mut bytes = line.clone();
                        bytes.extend_from_slice(b"\r\n");
                        let _ = writeln!(out, "raw: {}", escape_edges(&bytes));
                    }
                    Item::Raw(bytes) => {
                        let _ = writeln!(out, "raw: {}", escape_edges(bytes));
                    }
                }
            }
            if b.shutdown {
                out.push_str("!shutdown\n");
            }
        }
        out
    }

    /// The number of commands/items (for sorting and summaries).
    pub fn len(&self) -> usize {
        self.batches.iter().map(|b| b.items.len()).sum()
    }
}

/// Splits a command line into arguments: bare words, `"double quoted"` with escapes
/// (`\" \\ \r \n \t \0 \xHH`), or `'single quoted'` taken as they are.
pub fn split_words(line: &str) -> Result<Vec<Vec<u8>>, String> {
    let bytes = line.as_bytes();
    let mut args = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let mut arg = Vec::new();
        match bytes[i] {
            b'"' => {
                i += 1;
                let start = i;
                loop {
                    match bytes.get(i) {
                        None => return Err("unbalanced double quote".into()),
                        Some(b'\\') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                arg = unescape(std::str::from_utf8(&bytes[start..i]).map_err(|e| e.to_string())?)?;
                i += 1;
            }
            b'\'' => {
                i += 1;
                let start = i;
                while bytes.get(i).is_some_and(|&b| b != b'\'') {
                    i += 1;
                }
                if i >= bytes.len() {
                    return Err("unbalanced single quote".into());
                }
                arg.extend_from_slice(&bytes[start..i]);
                i += 1;
            }
            _ => {
                while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                    if matches!(bytes[i], b'"' | b'\'') {
                        return Err("a quote inside a bare word".into());
                    }
                    arg.push(bytes[i]);
                    i += 1;
                }
            }
        }
        if i < bytes.len() && !bytes[i].is_ascii_whitespace() {
            return Err("a quoted word must be followed by a space".into());
        }
        args.push(arg);
    }
    if args.is_empty() {
        return Err("empty command".into());
    }
    Ok(args)
}

/// C-like escapes: `\r \n \t \0 \\ \" \' \xHH`; anything else is taken as it is.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let Some(&c) = b.get(i + 1) else {
            return Err("a lone backslash at the end".into());
        };
        i += 2;
        out.push(match c {
            b'r' => b'\r',
            b'n' => b'\n',
            b't' => b'\t',
            b'0' => 0,
            b'\\' | b'"' | b'\'' => c,
            b'x' => {
                let hex = s.get(i..i + 2).ok_or("\\x needs two hex digits")?;
                i += 2;
                u8::from_str_radix(hex, 16).map_err(|_| format!("bad \\x{hex}"))?
            }
            _ => return Err(format!("unknown escape \\{}", c as char)),
        });
    }
    Ok(out)
}

/// Bytes as printable text: `\r \n \t \\ \"` and `\xHH` for the rest.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s
}

/// [`escape`], with spaces at either end written `\x20` (a `raw:` line keeps them).
fn escape_edges(bytes: &[u8]) -> String {
    let e = escape(bytes);
    let start = e.len() - e.trim_start_matches(' ').len();
    let end = e.trim_end_matches(' ').len();
    if start == e.len() {
        return "\\x20".repeat(e.len());
    }
    format!(
        "{}{}{}",
        "\\x20".repeat(start),
        &e[start..end],
        "\\x20".repeat(e.len() - end)
    )
}

fn render_word(a: &[u8], first: bool) -> String {
    let bare = !a.is_empty()
        && a.iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && !b"\"'\\".contains(&b))
        && !(first && (a[0] == b'#' || a[0] == b'!' || a.ends_with(b":")));
    if bare {
        String::from_utf8_lossy(a).into_owned()
    } else {
        format!("\"{}\"", escape(a))
    }
}

/// An inline line the `inline:` form can hold: printable, no CR/LF, no edge spaces.
fn is_plain_line(line: &[u8]) -> bool {
    line.iter().all(|&b| (0x20..=0x7e).contains(&b))
        && !line.starts_with(b" ")
        && !line.ends_with(b" ")
}

/// FNV-1a: a stable seed from a script's name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------------------
// Playing

/// What a server sent back to a script.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes received, one segment per batch played (read until [`QUIET`]), then one for
    /// the [`LATE_WAIT`] after the last batch (empty if the connection was closed).
    pub segments: Vec<Vec<u8>>,
    /// The peer closed the connection, after this many bytes (then nothing was read more).
    pub closed_at: Option<usize>,
    /// The close was a reset (ECONNRESET) rather than an orderly close.
    pub reset: bool,
    /// A write failed (the peer had closed): the script was cut there.
    pub write_error: Option<String>,
}

/// Plays `script` on a new connection to `addr`.
pub async fn play(addr: std::net::SocketAddr, script: &Script) -> Outcome {
    let mut out = Outcome::default();
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            out.write_error = Some(format!("connect: {e}"));
            return out;
        }
    };
    let _ = s.set_nodelay(true);
    let mut received = 0;
    for batch in &script.batches {
        for (j, chunk) in batch.chunks().iter().enumerate() {
            if j > 0 {
                tokio::time::sleep(CHUNK_PAUSE).await;
            }
            if let Err(e) = s.write_all(chunk).await {
                out.write_error.get_or_insert(e.to_string());
                break;
            }
        }
        if batch.shutdown && out.write_error.is_none() {
            if let Err(e) = s.shutdown().await {
                out.write_error = Some(format!("shutdown: {e}"));
            }
        }
        let (seg, end) = read_until_quiet(&mut s, QUIET).await;
        received += seg.len();
        out.segments.push(seg);
        if let Some(reset) = end {
            out.closed_at = Some(received);
            out.reset = reset;
            return out;
        }
        if out.write_error.is_some() {
            break;
        }
    }
    let (seg, end) = read_until_quiet(&mut s, LATE_WAIT).await;
    received += seg.len();
    out.segments.push(seg);
    if let Some(reset) = end {
        out.closed_at = Some(received);
        out.reset = reset;
    }
    out
}

/// Reads until nothing came for `quiet`. Returns the bytes and, if the peer closed,
/// whether it was a reset.
async fn read_until_quiet(s: &mut TcpStream, quiet: Duration) -> (Vec<u8>, Option<bool>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) => return (got, Some(false)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return (got, Some(true)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Masking

/// Masks the differences between Redis and geoproxy that are documented (README, "Where
/// geoproxy differs from Redis") and that a script cannot avoid, in place, segment by
/// segment. Each is a connection-identity value, which is the member connection's through
/// geoproxy:
///
/// - **HELLO's `id`**: in a HELLO reply (RESP2 array or RESP3 map), the integer after the
///   bulk `id` becomes `:<id>`.
/// - **`CLIENT ID`**: a batch that is exactly one `CLIENT ID` command and whose whole reply
///   is one integer: the integer becomes `:<client id>`. (An integer cannot be told from
///   any other elsewhere in a stream; scripts keep `CLIENT ID` alone in its batch.)
/// - **`CLIENT LIST` / `CLIENT INFO`**: a bulk or verbatim string whose text starts with
///   `id=` and has ` addr=` becomes `$<client list>` (lengths differ too).
///
/// Deliberately *not* masked: protocol error texts (geoproxy documents `expected '$', got
/// something else` where Redis 7.0 names the byte, `expected '$', got '+'`; matching Redis
/// is the goal), and anything else the README lists (failures, moves), which no script
/// here provokes.
pub fn mask(script: &Script, outcome: &Outcome) -> Vec<Vec<u8>> {
    outcome
        .segments
        .iter()
        .enumerate()
        .map(|(i, seg)| {
            let alone = script
                .batches
                .get(i)
                .is_some_and(|b| b.items.len() == 1 && b.items[0].words() == ["CLIENT", "ID"]);
            if alone && is_integer_frame(seg) {
                return b":<client id>\r\n".to_vec();
            }
            mask_client_list(&mask_hello_id(seg))
        })
        .collect()
}

fn is_integer_frame(seg: &[u8]) -> bool {
    seg.strip_prefix(b":")
        .and_then(|r| r.strip_suffix(b"\r\n"))
        .is_some_and(|d| !d.is_empty() && d.iter().all(u8::is_ascii_digit))
}

fn mask_hello_id(seg: &[u8]) -> Vec<u8> {
    const KEY: &[u8] = b"$2\r\nid\r\n:";
    let mut out = Vec::with_capacity(seg.len());
    let mut i = 0;
    while i < seg.len() {
        if seg[i..].starts_with(KEY) {
            let digits = seg[i + KEY.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let end = i + KEY.len() + digits;
            if digits > 0 && seg[end..].starts_with(b"\r\n") {
                out.extend_from_slice(b"$2\r\nid\r\n:<id>");
                i = end;
                continue;
            }
        }
        out.push(seg[i]);
        i += 1;
    }
    out
}

fn mask_client_list(seg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(seg.len());
    let mut i = 0;
    while i < seg.len() {
        let at_frame = i == 0 || seg[..i].ends_with(b"\n");
        if at_frame && matches!(seg[i], b'$' | b'=') {
            if let Some(end) = client_list_bulk(&seg[i..]) {
                out.extend_from_slice(b"$<client list>\r\n");
                i += end;
                continue;
            }
        }
        out.push(seg[i]);
        i += 1;
    }
    out
}

/// If `s` starts with a bulk/verbatim string holding CLIENT LIST/INFO text, its length.
fn client_list_bulk(s: &[u8]) -> Option<usize> {
    let nl = s.iter().position(|&b| b == b'\n')?;
    let len: usize = std::str::from_utf8(&s[1..nl.checked_sub(1)?])
        .ok()?
        .parse()
        .ok()?;
    let body = s.get(nl + 1..nl + 1 + len)?;
    let text = body.strip_prefix(b"txt:").unwrap_or(body);
    let looks = text.starts_with(b"id=") && text.windows(6).any(|w| w == b" addr=");
    (looks && s.get(nl + 1 + len..nl + 3 + len)? == b"\r\n").then_some(nl + 3 + len)
}

// ---------------------------------------------------------------------------------------
// Comparing and reporting

/// How one case went.
#[derive(Debug)]
pub enum Verdict {
    Same,
    /// geoproxy answered differently (the message is the full report).
    Differs(String),
    /// The two real servers answered differently: the script is not deterministic.
    Nondeterministic(String),
}

/// Compares a run; `subject` is the label of `b` (`geoproxy`, or `redis-server (reference)`).
pub fn compare(
    script: &Script,
    a: &Outcome,
    b: &Outcome,
    subject: &str,
    extra: &[String],
) -> Option<String> {
    let (ma, mb) = (mask(script, a), mask(script, b));
    let (ca, cb) = (ma.concat(), mb.concat());
    let mut problems: Vec<String> = extra.to_vec();
    let first = first_difference(&ca, &cb);
    if let Some(at) = first {
        problems.push(format!("the bytes differ from offset {at}"));
    }
    if a.closed_at.is_some() != b.closed_at.is_some() {
        problems.push(format!(
            "redis-server {} the connection, {subject} {}",
            if a.closed_at.is_some() {
                "closed"
            } else {
                "kept"
            },
            if b.closed_at.is_some() {
                "closed it"
            } else {
                "kept it open"
            },
        ));
    }
    if problems.is_empty() {
        return None;
    }
    let mut m = String::new();
    let _ = writeln!(
        m,
        "=== {}: {subject} differs from redis-server: {}",
        script.name,
        problems.join("; ")
    );
    let _ = writeln!(
        m,
        "--- script (corpus format; save as tests/diff/NAME.txt to replay):"
    );
    for line in script.render().lines() {
        let _ = writeln!(m, "    {line}");
    }
    let _ = writeln!(m, "--- bytes sent, per batch:");
    for (i, b) in script.batches.iter().enumerate() {
        let chunks: Vec<String> = b
            .chunks()
            .iter()
            .map(|c| format!("\"{}\"", escape(c)))
            .collect();
        let _ = writeln!(
            m,
            "    batch {}{}: {}",
            i + 1,
            if b.shutdown { " (then half-close)" } else { "" },
            chunks.join(" + ")
        );
    }
    describe(&mut m, "redis-server", script, a, &ma, first);
    describe(&mut m, subject, script, b, &mb, first);
    Some(m)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(a.iter().zip(b).take_while(|(x, y)| x == y).count())
}

/// Writes one side's masked replies, a line per RESP line, per batch, marking `first`.
fn describe(
    m: &mut String,
    label: &str,
    script: &Script,
    o: &Outcome,
    masked: &[Vec<u8>],
    first: Option<usize>,
) {
    let total: usize = masked.iter().map(Vec::len).sum();
    let close = match (o.closed_at, o.reset) {
        (Some(n), false) => format!("then closed by the peer ({n} bytes as received)"),
        (Some(n), true) => format!("then reset by the peer ({n} bytes as received)"),
        (None, _) => "connection still open".to_string(),
    };
    let _ = writeln!(m, "--- {label}: {total} bytes (masked), {close}");
    if let Some(e) = &o.write_error {
        let _ = writeln!(m, "    (a write failed: {e})");
    }
    let mut offset = 0;
    let played = script.batches.len().min(masked.len());
    for (i, seg) in masked.iter().enumerate() {
        let title = if i < played && !(i == masked.len() - 1 && o.closed_at.is_none()) {
            format!("after batch {}", i + 1)
        } else {
            format!("late (within {LATE_WAIT:?} after the last batch's quiet period)")
        };
        if seg.is_empty() {
            if title.starts_with("late") {
                continue;
            }
            let _ = writeln!(m, "    [{title}] (nothing)");
            continue;
        }
        let _ = writeln!(m, "    [{title}]");
        let mut start = 0;
        while start < seg.len() {
            let end = display_line_end(seg, start);
            let at = offset + start;
            let marker = match first {
                Some(f) if f >= at && f < offset + end => " <-- first difference",
                _ => "",
            };
            let _ = writeln!(m, "    {at:>6}  \"{}\"{marker}", escape(&seg[start..end]));
            start = end;
        }
        offset += seg.len();
    }
    if first == Some(total) {
        let _ = writeln!(m, "    {total:>6}  (end) <-- first difference");
    }
}

/// Where the display line starting at `start` ends: after the next `\n`, or, for a bulk
/// header (`$5\r\n`, also `=` and `!`), after the payload that follows it.
fn display_line_end(seg: &[u8], start: usize) -> usize {
    let line_end = |from: usize| {
        seg[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(seg.len(), |p| from + p + 1)
    };
    let end = line_end(start);
    if !matches!(seg[start], b'$' | b'=' | b'!') || !seg[..end].ends_with(b"\r\n") {
        return end;
    }
    let len: Option<usize> = std::str::from_utf8(&seg[start + 1..end - 2])
        .ok()
        .and_then(|n| n.parse().ok());
    match len {
        Some(n) if seg.get(end + n..end + n + 2) == Some(b"\r\n") => end + n + 2,
        _ => end,
    }
}

// ---------------------------------------------------------------------------------------
// Lanes

/// Servers that play scripts one case at a time: `direct` and `reference` are real
/// `redis-server`s, `member` is behind `proxy` (one member, `reply_timeout` =
/// [`REPLY_TIMEOUT`]). Between cases every server is flushed and has no client left; a case
/// after which the member keeps a connection or the route epoch moved gets a new member and
/// a new proxy, so it cannot disturb the next case.
pub struct Lane {
    pub direct: RedisServer,
    pub reference: RedisServer,
    /// `None` for a self-check lane (two real servers only).
    proxied: Option<tokio::sync::Mutex<Proxied>>,
}

struct Proxied {
    /// Dropped after `proxy` (field order), so the proxy never sees its member die.
    proxy: Proxy,
    member: RedisServer,
}

impl Proxied {
    async fn start() -> Proxied {
        let member = start_server().await;
        let options = Options {
            reply_timeout: REPLY_TIMEOUT,
            ..Options::default()
        };
        let proxy = Proxy::start(&[("local", member.addr())], options).await;
        Proxied { proxy, member }
    }
}

impl Lane {
    /// A lane with geoproxy (`with_proxy`), or only the two real servers (self-check).
    pub async fn start(with_proxy: bool) -> Lane {
        let (direct, reference) = (start_server().await, start_server().await);
        let proxied = if with_proxy {
            Some(tokio::sync::Mutex::new(Proxied::start().await))
        } else {
            None
        };
        Lane {
            direct,
            reference,
            proxied,
        }
    }

    /// Plays `script` on all sides at once and compares.
    pub async fn run(&self, script: &Script) -> Verdict {
        let mut proxied = match &self.proxied {
            Some(p) => Some(p.lock().await),
            None => None,
        };
        for s in [&self.direct, &self.reference] {
            reset_server(s).await;
        }
        let mut epoch_before = None;
        if let Some(p) = proxied.as_deref() {
            reset_server(&p.member).await;
            epoch_before = Some(epoch(&p.proxy).await);
        }
        let proxy_addr = proxied.as_deref().map(|p| p.proxy.addr);
        let proxy_play = async {
            match proxy_addr {
                Some(a) => Some(play(a, script).await),
                None => None,
            }
        };
        let (direct, reference, through) = tokio::join!(
            play(addr(&self.direct), script),
            play(addr(&self.reference), script),
            proxy_play
        );
        for (s, what) in [(&self.direct, "direct"), (&self.reference, "reference")] {
            if let Err(n) = drained(s, 1).await {
                panic!("{what} redis-server still has {n} clients after the case ended");
            }
        }
        let mut extra = Vec::new();
        if let Some(p) = proxied.as_deref_mut() {
            // A proxy that keeps its member connection after its client left leaks it (and
            // would disturb the next case, e.g. as an extra subscriber). The member keeps
            // geoproxy's health-check connection, plus ours for INFO, plus (with
            // `proxy.multiplex`) the connections geoproxy's pools keep and count.
            let mut dirty = false;
            let pooled = pooled_connections(&p.proxy).await;
            if let Err(n) = drained(&p.member, 2 + pooled).await {
                let list = admin(&p.member, &["CLIENT", "LIST"]).await;
                extra.push(format!(
                    "the member still has {n} clients {DRAIN_TIMEOUT:?} after the client \
                     closed (expected {}: geoproxy's health check, the harness's, and {pooled} \
                     kept in geoproxy's pools); its CLIENT LIST: {}",
                    2 + pooled,
                    escape(&list)
                ));
                dirty = true;
            }
            let epoch_after = epoch(&p.proxy).await;
            if Some(epoch_after) != epoch_before {
                extra.push(format!(
                    "the route epoch changed during the case: {} -> {epoch_after}",
                    epoch_before.unwrap_or_default()
                ));
                dirty = true;
            }
            if dirty {
                // Stopped gracefully: dropping a `Proxy` aborts its server task and leaves its
                // health checker running, which would connect to any later redis-server that
                // gets the old member's port.
                let Proxied { proxy, member } = std::mem::replace(p, Proxied::start().await);
                proxy.stop().await;
                drop(member);
            }
        }
        if let Some(reason) = compare(script, &direct, &reference, "redis-server (reference)", &[])
        {
            return Verdict::Nondeterministic(format!(
                "the script is not deterministic on real Redis (harness or script bug):\n{reason}"
            ));
        }
        let Some(through) = through else {
            return Verdict::Same;
        };
        match compare(script, &direct, &through, "geoproxy", &extra) {
            None => Verdict::Same,
            Some(m) => Verdict::Differs(m),
        }
    }
}

/// `RedisServer::start` sleeps while it waits: off the runtime's workers, which also run
/// the other lanes' proxies.
async fn start_server() -> RedisServer {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .expect("redis-server starts")
}

fn addr(s: &RedisServer) -> std::net::SocketAddr {
    s.addr().parse().expect("a socket address")
}

async fn epoch(p: &Proxy) -> u64 {
    p.status().await["epoch"]
        .as_u64()
        .expect("/v1/status has a numeric epoch")
}

/// Runs one command on a fresh RESP2 connection (no redis-rs: a tiny blocking-free client).
async fn admin(s: &RedisServer, args: &[&str]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr(s)).await.expect("connect to redis");
    let mut req = Vec::new();
    Item::Cmd(args.iter().map(|a| a.as_bytes().to_vec()).collect()).bytes(&mut req);
    c.write_all(&req).await.expect("write to redis");
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, c.read(&mut buf))
            .await
            .expect("redis answers within 5 s")
            .expect("read from redis");
        assert!(n > 0, "redis closed on {args:?}");
        got.extend_from_slice(&buf[..n]);
        if complete_simple(&got) {
            return got;
        }
    }
}

/// A complete `+`/`-`/`:` line or `$len` bulk (all the admin commands answer).
fn complete_simple(b: &[u8]) -> bool {
    let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if b[0] != b'$' {
        return true;
    }
    let len: i64 = std::str::from_utf8(&b[1..nl])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1);
    len < 0 || b.len() >= nl + 2 + len as usize + 2
}

async fn connected_clients(s: &RedisServer) -> usize {
    let info = admin(s, &["INFO", "clients"]).await;
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:")?.trim().parse().ok())
        .expect("INFO clients has connected_clients")
}

/// Waits until the server has at most `want` clients (the INFO connection counts).
/// The member connections geoproxy's pools keep (shared, and idle pinned ones), as its
/// `geoproxy_member_connections` gauges count them once no session is open.
async fn pooled_connections(proxy: &Proxy) -> usize {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while proxy.metric("geoproxy_sessions_open").await > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, text) = proxy.get("/metrics").await;
    text.lines()
        .filter(|l| l.starts_with("geoproxy_member_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

async fn drained(s: &RedisServer, want: usize) -> Result<(), usize> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let n = connected_clients(s).await;
        if n <= want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(n);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Leaves no data (every db) and no script from an earlier case.
async fn reset_server(s: &RedisServer) {
    for cmd in [&["FLUSHALL"][..], &["SCRIPT", "FLUSH"]] {
        let r = admin(s, cmd).await;
        assert_eq!(r, b"+OK\r\n", "{cmd:?} on {}", s.addr());
    }
}

/// Runs `cases` over `lanes` in parallel (each lane one case at a time); results in order.
pub async fn run_all<T, F, Fut>(lanes: &[Arc<Lane>], cases: Vec<T>, run: F) -> Vec<(T, Verdict)>
where
    T: Send + Clone + 'static,
    F: Fn(Arc<Lane>, T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Verdict> + Send,
{
    let queue = Arc::new(Mutex::new(
        cases.iter().cloned().enumerate().collect::<Vec<_>>(),
    ));
    queue.lock().unwrap().reverse();
    let results = Arc::new(Mutex::new(Vec::new()));
    let run = Arc::new(run);
    let mut tasks = Vec::new();
    for lane in lanes {
        let (lane, queue, results, run) =
            (lane.clone(), queue.clone(), results.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let next = queue.lock().unwrap().pop();
                let Some((i, case)) = next else { break };
                let verdict = run(lane.clone(), case.clone()).await;
                results.lock().unwrap().push((i, case, verdict));
            }
        }));
    }
    for t in tasks {
        t.await.expect("a lane task panicked");
    }
    let mut results = std::mem::take(&mut *results.lock().unwrap());
    results.sort_by_key(|(i, _, _)| *i);
    results.into_iter().map(|(_, c, v)| (c, v)).collect()
}

/// Starts `n` lanes, one after the other (2 cores do not like many servers starting at once).
pub async fn lanes(n: usize, with_proxy: bool) -> Vec<Arc<Lane>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        out.push(Arc::new(Lane::start(with_proxy).await));
    }
    out
}

/// Greedy minimization of a failing script: tries dropping batches, commands and cuts, and
/// merging batches, `lanes.len()` candidates at a time; keeps the first (in order) that
/// still makes geoproxy differ. Stops when nothing smaller fails or `budget` is spent.
/// Returns the smallest failing script and its report.
pub async fn minimize(
    lanes: &[Arc<Lane>],
    script: Script,
    report: String,
    budget: Duration,
) -> (Script, String, bool) {
    let deadline = Instant::now() + budget;
    let (mut best, mut best_report) = (script, report);
    'outer: loop {
        let candidates = smaller(&best);
        for group in candidates.chunks(lanes.len()) {
            if Instant::now() >= deadline {
                return (best, best_report, false);
            }
            let results = run_all(lanes, group.to_vec(), |lane, s: Script| async move {
                lane.run(&s).await
            })
            .await;
            if let Some((s, Verdict::Differs(r))) = results
                .into_iter()
                .find(|(_, v)| matches!(v, Verdict::Differs(_)))
            {
                best = s;
                best_report = r;
                continue 'outer;
            }
        }
        return (best, best_report, true);
    }
}

/// Candidates one step smaller than `s`, biggest cuts first: drop a batch; drop a run of
/// `k` items (k = half the items, a quarter, ..., 1; batches left empty go too); merge a
/// batch into the one before; drop a batch's cuts.
fn smaller(s: &Script) -> Vec<Script> {
    let mut out = Vec::new();
    let with = |batches: Vec<Batch>| Script {
        name: s.name.clone(),
        batches,
    };
    let n = s.batches.len();
    if n > 1 {
        for i in 0..n {
            let mut b = s.batches.clone();
            b.remove(i);
            out.push(with(b));
        }
    }
    // Items by (batch, index), in order.
    let items: Vec<(usize, usize)> = s
        .batches
        .iter()
        .enumerate()
        .flat_map(|(i, b)| (0..b.items.len()).map(move |j| (i, j)))
        .collect();
    let mut k = items.len() / 2;
    while k >= 1 {
        for start in (0..items.len()).step_by(k) {
            let drop = &items[start..(start + k).min(items.len())];
            let mut b = s.batches.clone();
            for &(i, j) in drop.iter().rev() {
                b[i].items.remove(j);
                b[i].cuts.clear();
            }
            b.retain(|x| !x.items.is_empty() || x.shutdown);
            if !b.is_empty() && b != s.batches {
                out.push(with(b));
            }
        }
        k /= 2;
    }
    for i in 1..n {
        let mut b = s.batches.clone();
        let next = b.remove(i);
        b[i - 1].items.extend(next.items);
        b[i - 1].shutdown |= next.shutdown;
        b[i - 1].cuts.clear();
        out.push(with(b));
    }
    for i in 0..n {
        if !s.batches[i].cuts.is_empty() {
            let mut b = s.batches.clone();
            b[i].cuts.clear();
            out.push(with(b));
        }
    }
    out
}
