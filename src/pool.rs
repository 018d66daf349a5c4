//! Shared and pinned upstreams (`proxy.multiplex`): many sessions over a few member
//! connections.
//!
//! Each worker keeps its own [`Pools`]:
//!
//! - **Shared connections**, per member and per connection state (protocol, credentials,
//!   database): up to `proxy.shared_connections` each. A shared connection is a task pair:
//!   the writer takes the batches that sessions queue (commands of many sessions go out in
//!   one write) and tells the reader, in order, who owes how many replies; the reader finds
//!   reply frames with the [`ReplyScanner`] and hands each owner its own bytes, in order. A
//!   session on a shared connection owns no member connection.
//! - **Idle pinned connections**: a session that needs a connection of its own (a
//!   transaction, a blocking command, a subscription, any state change) takes one from here
//!   when one with exactly its state is idle, and gives it back when it can share again, so
//!   a transaction does not pay a connect.
//!
//! When a shared connection fails, every session with replies owed on it gets
//! [`Delivery::Lost`] and answers each of its own in-flight commands with
//! `-OUTCOMEUNKNOWN`, in its own order; nothing is replayed elsewhere.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::debug;

use crate::member::{Member, MemberIdx, Signal};
use crate::metrics::Metrics;
use crate::resp::reply::ReplyScanner;
use crate::session::state::{Attributes, SessionState};
use crate::stream::Stream;
use crate::upstream::{self, Upstream};

/// Reply chunks (each at most one read, [`READ_SIZE`]) waiting for one session: a session
/// whose client does not read stops the connection's reader here, so the proxy never holds
/// more than this for it (the other sessions of that connection wait meanwhile).
pub const INBOX_CHUNKS: usize = 32;
/// Room taken for a read of a shared connection's replies: many sessions' replies, or
/// large values, in one system call (one buffer per shared connection, not per session).
const READ_SIZE: usize = 64 * 1024;
/// Most bytes one write of a shared connection gathers from the queued batches.
const MAX_WRITE: usize = 256 * 1024;
/// An idle pinned connection unused this long is checked (a `PING`) before it is used.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

/// What one session queues on a shared connection: its commands, and how many replies they
/// owe it.
pub struct Batch {
    pub bytes: Bytes,
    pub replies: usize,
    pub owner: mpsc::Sender<Delivery>,
}

/// What a shared connection hands a session.
#[derive(Debug)]
pub enum Delivery {
    /// The session's reply bytes, in order (complete frames, or the start of a large one
    /// whose rest follows).
    Replies(Bytes),
    /// The connection failed with replies owed to this session: their outcome is unknown.
    Lost(String),
    /// The connection failed before any of this session's outstanding commands were
    /// written: they never ran, and here they are back, to go to the next member.
    NotSent(Bytes),
}

/// One shared connection (a *shared upstream*), as sessions see it.
pub struct SharedConn {
    batches: mpsc::UnboundedSender<Batch>,
    alive: AtomicBool,
    /// `None` while connecting; then `Ok` (ready) or why it could not be opened.
    opened: watch::Sender<Option<Result<(), String>>>,
}

impl SharedConn {
    /// Waits until the connection is open and its state replayed. A session joins a shared
    /// connection only then, so that a member that cannot be reached leaves its commands
    /// unsent (they wait for a member, as with a connection of its own) rather than lost.
    pub async fn ready(&self) -> Result<(), String> {
        let mut opened = self.opened.subscribe();
        let outcome = opened.wait_for(Option::is_some).await;
        match outcome.as_deref() {
            Ok(Some(r)) => r.clone(),
            _ => Err("shared connection gone".into()),
        }
    }

    /// Queues a batch for the writer task; gives it back when the connection is gone (it
    /// never went out). A session does not write to the connection itself, even an idle
    /// one: only the connection's task, which reads before it writes, sees that the member
    /// closed it first, so that the batch goes back unsent instead of lost with an unknown
    /// outcome (tried at 06abbe2, removed for that).
    pub fn send(&self, batch: Batch) -> Result<(), Batch> {
        if !self.alive() {
            return Err(batch);
        }
        self.batches.send(batch).map_err(|e| e.0)
    }

    /// Open and ready now (never waits).
    pub fn is_ready(&self) -> bool {
        matches!(*self.opened.borrow(), Some(Ok(())))
    }

    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

/// The settings of a worker's pools.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Shared connections per member and connection state (`proxy.shared_connections`).
    pub shared: usize,
    /// Idle pinned connections kept per member (`proxy.idle_pinned`).
    pub idle: usize,
    /// Connecting and preparing a new member connection (`proxy.connect_timeout`).
    pub connect_timeout: Duration,
}

/// A connection's state as the key of a pool: the member, and the commands that rebuild the
/// state on a fresh connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    member: MemberIdx,
    replay: Vec<u8>,
}

impl Key {
    fn new(member: MemberIdx, state: &SessionState) -> Key {
        Key {
            member,
            replay: state.replay_commands().0,
        }
    }
}

/// An idle pinned connection, kept under its shareable state.
struct Idle {
    upstream: Upstream,
    /// Its name and library, from its last session.
    attributes: Attributes,
    since: Instant,
}

/// One worker's shared and idle pinned connections.
pub struct Pools {
    settings: PoolSettings,
    metrics: Metrics,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    shared: HashMap<Key, Vec<Arc<SharedConn>>>,
    /// Round robin over a key's shared connections.
    turn: usize,
    idle: HashMap<Key, Vec<Idle>>,
}

impl Inner {
    /// Drops the shared connections that ended and closes the idle ones whose member a
    /// reload removed (each worker does it at its next use of the pools).
    fn forget_dead(&mut self) {
        self.shared.retain(|_, conns| {
            conns.retain(|c| c.alive());
            !conns.is_empty()
        });
        self.idle.retain(|_, idle| {
            idle.retain(|i| !i.upstream.to.is_retired());
            !idle.is_empty()
        });
    }
}

impl Pools {
    pub fn new(settings: PoolSettings, metrics: Metrics) -> Pools {
        Pools {
            settings,
            metrics,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A shared connection (DESIGN's *shared upstream*) to `member` in the connection state
    /// `state` (only its protocol, credentials and database: what a shared session may
    /// have). Opened in the background when the key has fewer than its share; a session
    /// joins it once [`SharedConn::ready`].
    pub fn shared(
        &self,
        member: &Arc<Member>,
        idx: MemberIdx,
        state: &SessionState,
    ) -> Arc<SharedConn> {
        let key = Key::new(idx, state);
        let mut inner = self.lock();
        inner.forget_dead();
        inner.turn = inner.turn.wrapping_add(1);
        let turn = inner.turn;
        let conns = inner.shared.entry(key).or_default();
        if conns.len() >= self.settings.shared.max(1) {
            return conns[turn % conns.len()].clone();
        }
        let (batches, queued) = mpsc::unbounded_channel();
        let conn = Arc::new(SharedConn {
            batches,
            alive: AtomicBool::new(true),
            opened: watch::Sender::new(None),
        });
        conns.push(conn.clone());
        let task = SharedTask {
            member: member.clone(),
            idx,
            state: state.clone(),
            conn: conn.clone(),
            connect_timeout: self.settings.connect_timeout,
            metrics: self.metrics.clone(),
        };
        tokio::spawn(task.run(queued));
        conn
    }

    /// A shared connection to member `idx` in the connection state `state` that is open
    /// now (its state, credentials included, accepted by the member), if there is one.
    /// Never opens one.
    pub fn open_shared(&self, idx: MemberIdx, state: &SessionState) -> Option<Arc<SharedConn>> {
        let key = Key::new(idx, state);
        let inner = self.lock();
        let conns = inner.shared.get(&key)?;
        conns.iter().find(|c| c.alive() && c.is_ready()).cloned()
    }

    /// A pinned connection to `member` with the session's `state`: an idle one with the
    /// same protocol, credentials and database if one is still open (given the session's
    /// name and library, or checked with a `PING` when it has been idle a while), else a
    /// new one with the state replayed.
    pub async fn pinned(
        &self,
        member: &Arc<Member>,
        idx: MemberIdx,
        state: &SessionState,
    ) -> Result<Upstream, upstream::UpstreamError> {
        let key = Key::new(idx, &state.shareable());
        self.lock().forget_dead();
        loop {
            let idle = self.lock().idle.get_mut(&key).and_then(Vec::pop);
            let Some(Idle {
                mut upstream,
                attributes,
                since,
            }) = idle
            else {
                break;
            };
            let upstream::Link::Pinned(stream) = &mut upstream.link else {
                continue;
            };
            if !stream.is_idle() {
                continue; // closed by the member (its `timeout`), or worse
            }
            let (mut commands, replies) = state.attribute_commands(&attributes);
            if replies == 0 && since.elapsed() > IDLE_CHECK_AFTER {
                commands = upstream::PING.to_vec();
            }
            if !commands.is_empty() {
                let prepare = async {
                    stream.send(&commands).await?;
                    let mut buf = BytesMut::new();
                    for _ in 0..replies.max(1) {
                        let reply = upstream::read_reply(stream, &mut buf).await?;
                        if replies > 0 && matches!(reply.first(), Some(b'-' | b'!')) {
                            return Err(upstream::UpstreamError::Rejected(upstream::error_line(
                                &reply,
                            )));
                        }
                    }
                    Ok(())
                };
                let timeout = self.settings.connect_timeout;
                if !matches!(tokio::time::timeout(timeout, prepare).await, Ok(Ok(()))) {
                    continue;
                }
            }
            return Ok(upstream);
        }
        let login = member.login.as_deref();
        upstream::open(member, idx, state, login, self.settings.connect_timeout).await
    }

    /// Keeps a pinned connection whose session shares again, if there is room for it.
    pub fn put_idle(&self, upstream: Upstream, state: &SessionState) {
        if upstream.to.is_retired() {
            return; // closed: a reload removed its member
        }
        let key = Key::new(upstream.member, &state.shareable());
        let attributes = state.attributes.clone();
        let mut inner = self.lock();
        inner.forget_dead();
        let member = upstream.member;
        let kept: usize = inner
            .idle
            .iter()
            .filter(|(k, _)| k.member == member)
            .map(|(_, v)| v.len())
            .sum();
        if kept < self.settings.idle {
            let since = Instant::now();
            inner.idle.entry(key).or_default().push(Idle {
                upstream,
                attributes,
                since,
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Who owes replies on a shared connection, in the order their commands went out.
struct Owed {
    owner: mpsc::Sender<Delivery>,
    left: usize,
}

/// One shared connection's task.
struct SharedTask {
    member: Arc<Member>,
    idx: MemberIdx,
    /// Its connection state (protocol, credentials, database), replayed at connect.
    state: SessionState,
    conn: Arc<SharedConn>,
    connect_timeout: Duration,
    metrics: Metrics,
}

impl SharedTask {
    async fn run(self, mut queued: mpsc::UnboundedReceiver<Batch>) {
        let id = self.member.id().to_string();
        let login = self.member.login.as_deref();
        let opened = upstream::open(
            &self.member,
            self.idx,
            &self.state,
            login,
            self.connect_timeout,
        )
        .await;
        let upstream = match opened {
            Ok(u) => u,
            Err(e) => {
                self.conn.alive.store(false, Ordering::Release);
                if e.is_member_failure() {
                    self.member.evidence.report(Signal::ConnectFailed);
                }
                debug!(member = %id, error = %e, "cannot open a shared connection");
                let why = e.to_string();
                self.conn.opened.send_replace(Some(Err(why.clone())));
                queued.close();
                while let Ok(batch) = queued.try_recv() {
                    lost(&batch.owner, &why);
                }
                return;
            }
        };
        let Some((stream, attached)) = upstream.into_stream() else {
            return; // open() makes a pinned link
        };
        self.metrics.member_connection(&id, "shared", 1);
        self.conn.opened.send_replace(Some(Ok(())));
        let (reader, writer) = tokio::io::split(stream);
        let (owed_tx, mut owed_rx) = mpsc::unbounded_channel();
        let mut fifo = VecDeque::new();
        // Sessions with replies still to come on this connection (the reader's FIFO and
        // what the writer has told it of): the writer waits a turn while it is not zero.
        let outstanding = AtomicUsize::new(0);
        // A batch the writer has taken from the queue and not yet gathered into a write: if
        // the connection ends meanwhile, it goes back to its session like the queued ones.
        let mut held = None;
        let retired = retirement(&self.member);
        // Biased, replies first: a connection the member closed is seen closed before the
        // next batch is written to it, so that batch goes back unsent (to the next member)
        // rather than lost with an unknown outcome.
        let why = tokio::select! {
            biased;
            r = read_replies(reader, &mut owed_rx, &mut fifo, &outstanding) => r,
            r = write_batches(&mut queued, &mut held, owed_tx, writer, &self.metrics, &outstanding) => r,
            r = retire(retired, &self.conn, &outstanding) => r,
        };
        self.conn.alive.store(false, Ordering::Release);
        self.metrics.member_connection(&id, "shared", -1);
        drop(attached);
        // The proxy's own connection closed: evidence either way (the probe that confirms
        // it tells a member that died from one that closed an idle connection on purpose).
        // Reported before the sessions hear of it, so that it is the first word on this
        // member and not a session's failed reconnect.
        debug!(member = %id, why, "shared connection closed");
        if !self.member.is_retired() {
            self.member.evidence.report(Signal::ConnectionLost);
        }
        // Everyone still owed a reply for a command written learns that its outcome is
        // unknown; a session whose owed commands were all still queued gets them back.
        queued.close();
        while let Ok(o) = owed_rx.try_recv() {
            fifo.push_back(o);
        }
        let mut unknown: Vec<mpsc::Sender<Delivery>> = Vec::new();
        for o in fifo.drain(..) {
            lost(&o.owner, &why);
            unknown.push(o.owner);
        }
        let mut unsent: Vec<(mpsc::Sender<Delivery>, BytesMut)> = Vec::new();
        let never_written = held
            .into_iter()
            .chain(std::iter::from_fn(|| queued.try_recv().ok()));
        for batch in never_written {
            if unknown.iter().any(|u| u.same_channel(&batch.owner)) {
                continue; // its Lost covers these too
            }
            match unsent
                .iter_mut()
                .find(|(o, _)| o.same_channel(&batch.owner))
            {
                Some((_, bytes)) => bytes.extend_from_slice(&batch.bytes),
                None => unsent.push((batch.owner, BytesMut::from(&batch.bytes[..]))),
            }
        }
        for (owner, bytes) in unsent {
            deliver_now(&owner, Delivery::NotSent(bytes.freeze()));
        }
    }
}

/// The member's removal by a reload, as a one-shot signal from a task of its own: waiting
/// on the member's token in the connection's `select!` took the token's lock at every
/// wake-up of the connection (two per request, ~320 instructions of ~14 000 at one client,
/// callgrind). The watcher ends with the connection (when the receiver is dropped).
fn retirement(member: &Arc<Member>) -> oneshot::Receiver<()> {
    let (mut tx, rx) = oneshot::channel();
    let member = member.clone();
    tokio::spawn(async move {
        let retired = tokio::select! {
            _ = member.retired() => true,
            _ = tx.closed() => false,
        };
        if retired {
            let _ = tx.send(());
        }
    });
    rx
}

/// Ends the connection once a reload removed its member and no reply is owed on it: no
/// session joins or writes to it from then on (it is not alive), and batches still queued
/// go back to their sessions unsent, for their next member. Returns why it stopped.
async fn retire(
    retired: oneshot::Receiver<()>,
    conn: &SharedConn,
    outstanding: &AtomicUsize,
) -> String {
    if retired.await.is_err() {
        return std::future::pending().await; // the runtime is shutting down
    }
    conn.alive.store(false, Ordering::Release);
    // Rare (a reload), so a poll: the reader hands out the last replies meanwhile.
    while outstanding.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    "its member was removed by a reload".into()
}

/// Writes queued batches, many sessions' at once; tells the reader who owes what first.
/// Returns why it stopped.
async fn write_batches(
    queued: &mut mpsc::UnboundedReceiver<Batch>,
    held: &mut Option<Batch>,
    owed: mpsc::UnboundedSender<Owed>,
    mut writer: WriteHalf<Stream>,
    metrics: &Metrics,
    outstanding: &AtomicUsize,
) -> String {
    let mut out = Gathered::default();
    loop {
        let Some(mut first) = queued.recv().await else {
            // Every handle is gone: nobody can send here any more. Wait for the replies.
            return std::future::pending().await;
        };
        // A connection with replies still to come keeps the member busy anyway: the
        // sessions woken with this one get a turn to queue their commands first, so that
        // they go out in the same write (a bigger batch costs the member and the proxy
        // less per command: 4 batches per write became 8 at 50 clients). An idle
        // connection writes at once: a client alone waits for nobody.
        if outstanding.load(Ordering::Relaxed) > 0 {
            *held = Some(first);
            tokio::task::yield_now().await;
            let Some(batch) = held.take() else {
                continue; // (only this loop takes it while the connection lives)
            };
            first = batch;
        }
        let mut batches = 0u64;
        let mut next = Some(first);
        while let Some(batch) = next.take() {
            batches += 1;
            out.push(batch.bytes);
            if batch.replies > 0 {
                outstanding.fetch_add(1, Ordering::Relaxed);
                let _ = owed.send(Owed {
                    owner: batch.owner,
                    left: batch.replies,
                });
            }
            if out.remaining() < MAX_WRITE {
                next = queued.try_recv().ok();
            }
        }
        metrics.shared_write(batches);
        let written = async {
            writer.write_all_buf(&mut out).await?;
            writer.flush().await
        };
        if let Err(e) = written.await {
            return format!("write: {e}");
        }
    }
}

/// The batches of one write as one [`Buf`], so that they go out with `writev` straight
/// from the sessions' buffers instead of being copied into one first (a 16 KiB value was
/// copied once more than in the 1:1 model). Written by hand: `bytes` has no list of
/// `Bytes` that is a `Buf` (hyper and h2 keep one of their own for the same reason).
#[derive(Default)]
struct Gathered {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl Gathered {
    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.remaining += part.len();
            self.parts.push_back(part);
        }
    }
}

impl Buf for Gathered {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |part| part)
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slot, part) in dst.iter_mut().zip(&self.parts) {
            *slot = IoSlice::new(part);
            filled += 1;
        }
        filled
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advanced past the end");
        self.remaining -= cnt;
        while let Some(front) = self.parts.front_mut() {
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }
}

/// Reads replies and hands each owner its own bytes, in order. Returns why it stopped.
async fn read_replies(
    mut reader: ReadHalf<Stream>,
    owed: &mut mpsc::UnboundedReceiver<Owed>,
    fifo: &mut VecDeque<Owed>,
    outstanding: &AtomicUsize,
) -> String {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut scanner = ReplyScanner::default();
    let mut ends = Vec::new();
    loop {
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) => return "connection closed".into(),
            Ok(_) => {}
            Err(e) => return format!("read: {e}"),
        }
        ends.clear();
        let scanned = scanner.scan(&buf, |reply| {
            ends.push((reply.end, reply.is_push(), reply.is_attribute()))
        });
        let consumed = match scanned {
            Ok(n) => n,
            Err(e) => return format!("malformed reply: {e}"),
        };
        let chunk = buf.split_to(consumed).freeze();
        let mut start = 0;
        for &(end, push, attribute) in &ends {
            if push {
                return "a push on a shared connection".into();
            }
            let Some(front) = front(fifo, owed) else {
                return "a reply that no command asked for".into();
            };
            if !attribute {
                front.left -= 1;
            }
            if front.left == 0 {
                deliver(&front.owner, Delivery::Replies(chunk.slice(start..end))).await;
                start = end;
                fifo.pop_front();
                outstanding.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // The front owner's frames so far (complete ones short of its count, or the start of
        // a large one): its bytes now, the rest as they come.
        if start < chunk.len() {
            let Some(front) = front(fifo, owed) else {
                return "a reply that no command asked for".into();
            };
            deliver(&front.owner, Delivery::Replies(chunk.slice(start..))).await;
        }
    }
}

/// Hands `owner` its replies, waiting while its inbox is full (a session whose client does
/// not read holds the connection's reader here). Tries first without the send future,
/// which registers for a permit: the inbox is almost never full.
async fn deliver(owner: &mpsc::Sender<Delivery>, delivery: Delivery) {
    if let Err(mpsc::error::TrySendError::Full(d)) = owner.try_send(delivery) {
        let _ = owner.send(d).await;
    }
}

/// Tells `owner` its replies are lost, without waiting on a session that does not read.
fn lost(owner: &mpsc::Sender<Delivery>, why: &str) {
    deliver_now(owner, Delivery::Lost(why.into()));
}

/// Hands `owner` a last delivery without waiting on a session that does not read.
fn deliver_now(owner: &mpsc::Sender<Delivery>, delivery: Delivery) {
    if let Err(mpsc::error::TrySendError::Full(d)) = owner.try_send(delivery) {
        let owner = owner.clone();
        tokio::spawn(async move {
            let _ = owner.send(d).await;
        });
    }
}

/// The owner of the next reply.
fn front<'a>(
    fifo: &'a mut VecDeque<Owed>,
    owed: &mut mpsc::UnboundedReceiver<Owed>,
) -> Option<&'a mut Owed> {
    if fifo.is_empty() {
        fifo.push_back(owed.try_recv().ok()?);
    }
    fifo.front_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_batches_advance_across_their_parts() {
        let mut out = Gathered::default();
        out.push(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"));
        out.push(Bytes::new()); // an empty part is not kept
        out.push(Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"));
        assert_eq!(out.remaining(), 14 + 20);
        let vectored = |out: &Gathered| out.chunks_vectored(&mut [IoSlice::new(&[]); 4]);
        assert_eq!(vectored(&out), 2);
        // A partial write ends inside the second part.
        out.advance(18);
        assert_eq!(out.remaining(), 16);
        assert_eq!(out.chunk(), b"$3\r\nGET\r\n$1\r\nk\r\n");
        assert_eq!(vectored(&out), 1);
        out.advance(16);
        assert_eq!(out.remaining(), 0);
        assert_eq!(out.chunk(), b"");
        // Reused for the next write.
        out.push(Bytes::from_static(b"x"));
        assert_eq!(out.copy_to_bytes(1), Bytes::from_static(b"x"));
    }
}
