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
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch, Notify};
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
    /// The write side, once open: the writer task's, and a session's own while the
    /// connection is idle (see [`SharedConn::send`]).
    write: tokio::sync::Mutex<Option<WriteSide>>,
    /// Sessions with replies still to come (the reader's FIFO and what it has been told).
    outstanding: AtomicUsize,
    /// Batches queued and not yet gathered into a write.
    queued: AtomicUsize,
    /// Sessions' batches in the writer task's last write: at most one (or none yet) means a
    /// client alone, which may write itself.
    last_write: AtomicUsize,
    /// A session left bytes of its write unwritten (or unflushed): the writer finishes it.
    unfinished: Notify,
    metrics: Metrics,
}

/// A shared connection's write half, what has not gone out of it yet, and the reader's list
/// of who owes what (told before the bytes go out).
struct WriteSide {
    half: WriteHalf<Stream>,
    out: Gathered,
    owed: mpsc::UnboundedSender<Owed>,
}

impl WriteSide {
    /// Adds a batch to the next write, its owner to the reader's list first.
    fn gather(&mut self, batch: Batch, outstanding: &AtomicUsize) {
        self.out.push(batch.bytes);
        if batch.replies > 0 {
            outstanding.fetch_add(1, Ordering::Relaxed);
            let _ = self.owed.send(Owed {
                owner: batch.owner,
                left: batch.replies,
            });
        }
    }
}

impl SharedConn {
    /// A connection not open yet, and the queue its writer takes batches from.
    fn new(metrics: Metrics) -> (SharedConn, mpsc::UnboundedReceiver<Batch>) {
        let (batches, queued) = mpsc::unbounded_channel();
        let conn = SharedConn {
            batches,
            alive: AtomicBool::new(true),
            opened: watch::Sender::new(None),
            write: tokio::sync::Mutex::new(None),
            outstanding: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            last_write: AtomicUsize::new(0),
            unfinished: Notify::new(),
            metrics,
        };
        (conn, queued)
    }

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

    /// Sends a batch: written at once from the session's own task when the connection is
    /// idle, else queued for the writer task. Gives it back when the connection is gone (it
    /// never went out).
    pub fn send(&self, batch: Batch) -> Result<(), Batch> {
        if !self.alive() {
            return Err(batch);
        }
        let Some(batch) = self.write_now(batch) else {
            return Ok(());
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.batches.send(batch).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            e.0
        })
    }

    /// Writes `batch` from the session's task when nothing is owed, queued or unfinished on
    /// the connection and its last write carried one session's batch (a client alone: one
    /// command, then its reply): it saves the hop through the writer task, which that
    /// client would wait for on every command. When several sessions keep the connection
    /// busy, the writer task (which runs after the sessions woken in the same turn) gathers
    /// them into one write instead. One try, without waiting (a waker that does nothing):
    /// an idle connection's send buffer is empty, so the batch normally goes whole; what
    /// does not (or an error) is left to the writer task, which does the waiting. Gives the
    /// batch back when it cannot.
    fn write_now(&self, batch: Batch) -> Option<Batch> {
        if self.last_write.load(Ordering::Relaxed) > 1 {
            return Some(batch);
        }
        let Ok(mut side) = self.write.try_lock() else {
            return Some(batch); // the writer task is writing
        };
        let idle = self.outstanding.load(Ordering::Relaxed) == 0
            && self.queued.load(Ordering::Relaxed) == 0;
        let Some(side) = side.as_mut().filter(|s| idle && !s.out.has_remaining()) else {
            return Some(batch);
        };
        side.gather(batch, &self.outstanding);
        self.metrics.shared_write(1);
        let mut cx = Context::from_waker(Waker::noop());
        let done = loop {
            if !side.out.has_remaining() {
                let flushed = Pin::new(&mut side.half).poll_flush(&mut cx);
                break matches!(flushed, Poll::Ready(Ok(())));
            }
            // One batch, so one part: a plain write (`send`) rather than a `writev` of one
            // part, which takes a longer way through the kernel (and 159 more user-space
            // instructions per request here, benches/instructions.sh).
            match Pin::new(&mut side.half).poll_write(&mut cx, side.out.chunk()) {
                Poll::Ready(Ok(n)) if n > 0 => side.out.advance(n),
                _ => break false,
            }
        };
        if !done {
            self.unfinished.notify_one();
        }
        None
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
        let (conn, queued) = SharedConn::new(self.metrics.clone());
        let conn = Arc::new(conn);
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
        let (reader, half) = tokio::io::split(stream);
        let (owed, mut owed_rx) = mpsc::unbounded_channel();
        *self.conn.write.lock().await = Some(WriteSide {
            half,
            out: Gathered::default(),
            owed,
        });
        // Counted and ready in one step (no await between): whoever sees the gauge may join.
        self.metrics.member_connection(&id, "shared", 1);
        self.conn.opened.send_replace(Some(Ok(())));
        let mut fifo = VecDeque::new();
        // A batch the writer has taken from the queue and not yet gathered into a write: if
        // the connection ends meanwhile, it goes back to its session like the queued ones.
        let mut held = None;
        // Biased, replies first: a connection the member closed is seen closed before the
        // next batch is written to it, so that batch goes back unsent (to the next member)
        // rather than lost with an unknown outcome.
        let why = tokio::select! {
            biased;
            r = read_replies(reader, &mut owed_rx, &mut fifo, &self.conn.outstanding) => r,
            r = write_batches(&mut queued, &mut held, &self.conn) => r,
            r = retire(&self.member, &self.conn) => r,
        };
        self.conn.alive.store(false, Ordering::Release);
        // What was left in the write side was told to the reader: lost with the FIFO below.
        *self.conn.write.lock().await = None;
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

/// Ends the connection once a reload removed its member and no reply is owed on it: no
/// session joins or writes to it from then on (it is not alive), and batches still queued
/// go back to their sessions unsent, for their next member. Returns why it stopped.
async fn retire(member: &Member, conn: &SharedConn) -> String {
    member.retired().await;
    conn.alive.store(false, Ordering::Release);
    // Rare (a reload), so a poll: the reader hands out the last replies meanwhile.
    while conn.outstanding.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    "its member was removed by a reload".into()
}

/// Writes queued batches, many sessions' at once (and what a session left unwritten);
/// tells the reader who owes what first. Returns why it stopped.
async fn write_batches(
    queued: &mut mpsc::UnboundedReceiver<Batch>,
    held: &mut Option<Batch>,
    conn: &SharedConn,
) -> String {
    // One wait for an unfinished write across the loop: a new one each turn registered and
    // unregistered a waiter (two locks) per write.
    let mut unfinished = std::pin::pin!(conn.unfinished.notified());
    loop {
        let mut first = tokio::select! {
            biased;
            () = unfinished.as_mut() => {
                unfinished.set(conn.unfinished.notified());
                None
            }
            batch = queued.recv() => match batch {
                Some(batch) => Some(batch),
                // Every handle is gone: nobody can send here any more. Wait for the replies.
                None => return std::future::pending().await,
            },
        };
        // A connection with replies still to come keeps the member busy anyway: the
        // sessions woken with this one get a turn to queue their commands first, so that
        // they go out in the same write (a bigger batch costs the member and the proxy
        // less per command: 4 batches per write became 8 at 50 clients). An idle
        // connection writes at once: a client alone waits for nobody.
        if first.is_some() && conn.outstanding.load(Ordering::Relaxed) > 0 {
            *held = first;
            tokio::task::yield_now().await;
            first = held.take();
            if first.is_none() {
                continue; // (only this loop takes it while the connection lives)
            }
        }
        let mut side = conn.write.lock().await;
        let Some(side) = side.as_mut() else {
            return std::future::pending().await; // (set before any session joins)
        };
        let mut batches = 0u64;
        let mut next = first;
        while let Some(batch) = next.take() {
            batches += 1;
            side.gather(batch, &conn.outstanding);
            // Counted out of the queue only once its owner is on the reader's list, so a
            // session never writes past a batch of its own still waiting here.
            conn.queued.fetch_sub(1, Ordering::Relaxed);
            if side.out.remaining() < MAX_WRITE {
                next = queued.try_recv().ok();
            }
        }
        if batches > 0 {
            conn.metrics.shared_write(batches);
            conn.last_write.store(batches as usize, Ordering::Relaxed);
        }
        let WriteSide { half, out, .. } = side;
        let written = async {
            half.write_all_buf(out).await?;
            half.flush().await
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
    use tokio::net::{TcpListener, TcpStream};

    /// A shared connection open over loopback, its queue, the reader's list of owners, and
    /// the member's end (which reads only when the test does).
    async fn open_over_tcp() -> (
        SharedConn,
        mpsc::UnboundedReceiver<Batch>,
        mpsc::UnboundedReceiver<Owed>,
        TcpStream,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap());
        let (ours, accepted) = tokio::join!(ours, listener.accept());
        let (member, _) = accepted.unwrap();
        let (_reader, half) = tokio::io::split(Stream::Tcp(ours.unwrap()));
        let (owed, owed_rx) = mpsc::unbounded_channel();
        let (conn, queued) = SharedConn::new(Metrics::new(prometheus::Registry::new()));
        *conn.write.try_lock().unwrap() = Some(WriteSide {
            half,
            out: Gathered::default(),
            owed,
        });
        (conn, queued, owed_rx, member)
    }

    /// Runs `work` beside `conn`'s writer task and returns what it gives; fails the test
    /// when the writer stops first or `work` takes more than 10 s.
    async fn beside_the_writer<T>(
        queued: &mut mpsc::UnboundedReceiver<Batch>,
        conn: &SharedConn,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let mut held = None;
        let writer = write_batches(queued, &mut held, conn);
        let both = async {
            tokio::select! {
                why = writer => panic!("the writer stopped: {why}"),
                got = work => got,
            }
        };
        tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the writer task never wrote it")
    }

    /// Reads the member's end until `got` holds `len` bytes.
    async fn read_until(member: &mut TcpStream, got: &mut Vec<u8>, len: usize) {
        while got.len() < len {
            assert!(member.read_buf(got).await.unwrap() > 0, "closed");
        }
    }

    /// A batch that a session wrote itself on an idle connection, and that did not fit in
    /// the socket (its peer does not read yet), is finished by the writer task, before the
    /// batch queued after it, and both owners are on the reader's list in that order.
    #[tokio::test]
    async fn a_write_a_session_could_not_finish_goes_out_whole_before_the_next() {
        let (conn, mut queued, mut owed_rx, mut member) = open_over_tcp().await;
        let (first, _first_inbox) = mpsc::channel(INBOX_CHUNKS);
        let (second, _second_inbox) = mpsc::channel(INBOX_CHUNKS);
        // More than a loopback socket holds while its peer reads nothing.
        let big = Bytes::from(vec![b'a'; 16 << 20]);
        let batch = |bytes: Bytes, owner: &mpsc::Sender<Delivery>| Batch {
            bytes,
            replies: 1,
            owner: owner.clone(),
        };
        assert!(conn.send(batch(big.clone(), &first)).is_ok());
        let unfinished = conn
            .write
            .try_lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .out
            .remaining();
        assert!(unfinished > 0, "the session's own write went out whole");
        assert_eq!(
            conn.queued.load(Ordering::Relaxed),
            0,
            "written, not queued"
        );

        let received = async {
            let mut got = Vec::new();
            // The writer task finishes it with nothing queued (the session woke it).
            read_until(&mut member, &mut got, big.len()).await;
            // Replies are owed now: the next batch is queued for the writer task.
            assert!(conn
                .send(batch(Bytes::from_static(b"tail"), &second))
                .is_ok());
            read_until(&mut member, &mut got, big.len() + 4).await;
            got
        };
        let got = beside_the_writer(&mut queued, &conn, received).await;
        assert_eq!(conn.queued.load(Ordering::Relaxed), 0);
        assert!(got[..big.len()] == big[..], "the first batch arrived whole");
        assert_eq!(&got[big.len()..], b"tail");
        let owners = [owed_rx.try_recv().unwrap(), owed_rx.try_recv().unwrap()];
        assert!(owners[0].owner.same_channel(&first) && owners[1].owner.same_channel(&second));
        assert_eq!(conn.outstanding.load(Ordering::Relaxed), 2);
    }

    /// Once the writer task has gathered several sessions into one write, an idle connection
    /// leaves the next batch to it as well (it gathers the sessions woken in that turn).
    #[tokio::test]
    async fn after_a_gathered_write_sessions_leave_writing_to_the_writer() {
        let (conn, mut queued, _owed_rx, mut member) = open_over_tcp().await;
        let (owner, _inbox) = mpsc::channel(INBOX_CHUNKS);
        let one = |bytes: &'static [u8]| Batch {
            bytes: Bytes::from_static(bytes),
            replies: 1,
            owner: owner.clone(),
        };
        // A reply is owed (as the reader would count it): two sessions' batches queue, and
        // the writer gathers them into one write.
        conn.outstanding.store(1, Ordering::Relaxed);
        assert!(conn.send(one(b"a")).is_ok() && conn.send(one(b"b")).is_ok());
        assert_eq!(conn.queued.load(Ordering::Relaxed), 2);
        let received = async {
            let mut got = Vec::new();
            read_until(&mut member, &mut got, 2).await;
            got
        };
        assert_eq!(beside_the_writer(&mut queued, &conn, received).await, b"ab");
        assert_eq!(conn.last_write.load(Ordering::Relaxed), 2);
        // The replies came: the connection is idle, and the next batch still queues.
        conn.outstanding.store(0, Ordering::Relaxed);
        assert!(conn.send(one(b"c")).is_ok());
        assert_eq!(
            conn.queued.load(Ordering::Relaxed),
            1,
            "written by its session"
        );
    }

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
