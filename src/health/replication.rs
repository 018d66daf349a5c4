//! The replication check: does each member still receive what the others publish, and how
//! late? A member that answers every PING can still have stopped syncing with the others
//! (a cut link between regions, a stuck syncer); this check sees it from outside.
//!
//! Every `interval` the check gives the round a number and each member's publisher
//! `PUBLISH`es a token (`<proxy instance> <member id> <round>`) on one channel per shard
//! (`geoproxy:replication:{tag}`, the tag hashing into that shard's slots), and each member's
//! subscriber listens on all of them. Active-Active replicates the messages to the other
//! members; a token published on `from` and received on `to` measures the pair.
//!
//! The lag of a pair `from -> to` is the observed delay of the last round's token when it
//! arrived on every shard, else the age of the oldest round not received: it grows while a
//! link is cut, and a member that stops publishing or subscribing lags towards everyone. A
//! member is synced when no pair between it and another member that is up lags more than
//! `tolerance`. The matrix is in `/v1/status` and `geoproxy_replication_lag_seconds`.
//!
//! Rounds are numbered here and a token names its proxy instance, so the checks of several
//! proxies on one database pass each other's tokens by.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::stream::Stream;
use bytes::BytesMut;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::check::{jittered, record};
use super::keyspace::shard_tags;
use super::ping::{open, request, within};
use super::verdict::Kind;
use crate::config::ReplicationConfig;
use crate::member::{MemberIdx, Members};
use crate::metrics::Metrics;
use crate::upstream::read_reply;

/// Rounds remembered (their send times); older ones count as the oldest kept.
const ROUNDS_KEPT: usize = 1024;

/// Runs the replication check of every member until shutdown.
pub struct Replication {
    pub members: Arc<Members>,
    pub config: ReplicationConfig,
    pub connect_timeout: Duration,
    pub metrics: Metrics,
    pub matrix: Arc<Matrix>,
}

impl Replication {
    pub async fn run(self, shutdown: CancellationToken) {
        let channels: Vec<String> = shard_tags(self.config.shards)
            .iter()
            .map(|tag| format!("geoproxy:replication:{{{tag}}}"))
            .collect();
        let (round_tx, round_rx) = watch::channel(0u64);
        let tasks = TaskTracker::new();
        // The matrix is indexed by place in the preference; members by slot.
        for (place, (idx, _)) in self.members.iter().enumerate() {
            let link = Link {
                members: self.members.clone(),
                idx,
                place,
                channels: channels.clone(),
                matrix: self.matrix.clone(),
                connect_timeout: self.connect_timeout,
                timeout: self.config.timing.timeout,
                retry: self.config.timing.interval,
            };
            tasks.spawn(link.clone().subscribe(shutdown.clone()));
            tasks.spawn(link.publish(round_rx.clone(), shutdown.clone()));
        }
        tasks.close();
        let slot = self
            .members
            .iter()
            .next()
            .and_then(|(_, m)| m.slots().iter().position(|s| s.kind == Kind::Replication));
        let Some(slot) = slot else {
            return;
        };
        let mut round = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sleep(jittered(self.config.timing.interval)) => {}
            }
            // Judge the last round (it had an interval to arrive), then start the next.
            if round > 0 {
                self.judge(slot, Instant::now());
            }
            round += 1;
            self.matrix.start_round(round, Instant::now());
            round_tx.send_replace(round);
        }
        tasks.wait().await;
    }

    /// Feeds each member's verdict: the worst pair between it and the members that are up.
    fn judge(&self, slot: usize, now: Instant) {
        let lags = self.matrix.measure(now);
        let ids: Vec<&str> = self.members.iter().map(|(_, m)| m.id()).collect();
        for (from, row) in lags.iter().enumerate() {
            for (to, pair) in row.iter().enumerate() {
                if let (true, Some(pair)) = (from != to, pair) {
                    self.metrics
                        .replication_lag(ids[from], ids[to], pair.lag.as_secs_f64());
                }
            }
        }
        let up: Vec<bool> = self.members.iter().map(|(_, m)| m.is_up()).collect();
        // `place`: the member's row in the matrix; `idx`: its slot.
        for (place, &idx) in self.members.preference().iter().enumerate() {
            let tolerance = self.config.tolerance;
            let Some(result) = member_result(&lags, &up, place, tolerance, &ids) else {
                continue; // the first round: nothing to judge yet
            };
            let (members, metrics) = (&self.members, &self.metrics);
            record(members, idx, metrics, slot, "replication", result, 0.0);
        }
    }
}

/// Member `m`'s replication result: its worst pair, either way, with a member that is up.
/// A pair that never got a token (on every shard) fails whatever its lag: a round had a
/// whole interval to arrive. `None` until the pairs are measured.
fn member_result(
    lags: &[Vec<Option<PairLag>>],
    up: &[bool],
    m: MemberIdx,
    tolerance: Duration,
    ids: &[&str],
) -> Option<Result<(), String>> {
    // Never heard from is worse than any lag.
    let badness = |p: &PairLag| (!p.heard, p.lag);
    let mut worst: Option<(PairLag, &str, MemberIdx)> = None;
    for n in (0..ids.len()).filter(|&n| n != m && up[n]) {
        for (pair, direction) in [(lags[n][m]?, "from"), (lags[m][n]?, "to")] {
            if worst.is_none_or(|(w, _, _)| badness(&pair) > badness(&w)) {
                worst = Some((pair, direction, n));
            }
        }
    }
    Some(match worst {
        Some((p, direction, n)) if !p.heard => Err(format!(
            "replication {direction} {}: no token received yet",
            ids[n]
        )),
        Some((p, direction, n)) if p.lag > tolerance => Err(format!(
            "replication {direction} {}: {:.1} s behind (tolerance {tolerance:?})",
            ids[n],
            p.lag.as_secs_f64(),
        )),
        _ => Ok(()),
    })
}

/// One member's two connections: the publisher's and the subscriber's.
#[derive(Clone)]
struct Link {
    members: Arc<Members>,
    idx: MemberIdx,
    /// The member's place in the preference: its row and column in the matrix.
    place: usize,
    channels: Vec<String>,
    matrix: Arc<Matrix>,
    connect_timeout: Duration,
    timeout: Duration,
    /// Wait before reconnecting a lost connection.
    retry: Duration,
}

impl Link {
    /// Publishes each round's token on every channel, as soon as the round starts. A round
    /// missed (a hung member) is never published late: its token simply never arrives.
    async fn publish(self, mut rounds: watch::Receiver<u64>, shutdown: CancellationToken) {
        let member = self.members.get(self.idx);
        let mut conn: Option<Stream> = None;
        let mut buf = BytesMut::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = rounds.changed() => if changed.is_err() { return },
            }
            let round = *rounds.borrow_and_update();
            let token = format!("{} {} {round}", crate::instance_id(), member.id());
            let sent = async {
                if conn.is_none() {
                    conn = Some(open(&member.config, &mut buf, self.connect_timeout).await?);
                }
                let stream = conn.as_mut().ok_or("no connection")?;
                for channel in &self.channels {
                    let args = [
                        b"PUBLISH".to_vec(),
                        channel.clone().into_bytes(),
                        token.clone().into_bytes(),
                    ];
                    let key = "health.replication.timeout";
                    within(
                        self.timeout,
                        "PUBLISH",
                        key,
                        request(stream, &mut buf, &args),
                    )
                    .await?;
                }
                Ok::<(), String>(())
            };
            if let Err(e) = sent.await {
                debug!(member = member.id(), error = %e, "replication token not published");
                conn = None;
                buf.clear();
            }
        }
    }

    /// Subscribes to every channel and records the tokens of this proxy that arrive;
    /// reconnects after `retry` when the connection fails.
    async fn subscribe(self, shutdown: CancellationToken) {
        let member = self.members.get(self.idx);
        loop {
            let listened = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.listen() => r,
            };
            if let Err(e) = listened {
                debug!(member = member.id(), error = %e, "replication subscriber lost");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep_until(Instant::now() + self.retry) => {}
            }
        }
    }

    async fn listen(&self) -> Result<(), String> {
        let member = self.members.get(self.idx);
        let mut buf = BytesMut::new();
        let mut conn = open(&member.config, &mut buf, self.connect_timeout).await?;
        let mut args = vec![b"SUBSCRIBE".to_vec()];
        args.extend(self.channels.iter().map(|c| c.clone().into_bytes()));
        // The first confirmation; the others pass through the loop below. Bounded: a
        // connection that a partition holds open would otherwise wait here forever.
        let key = "health.replication.timeout";
        let subscribed = request(&mut conn, &mut buf, &args);
        within(self.timeout, "SUBSCRIBE", key, subscribed).await?;
        // Every round publishes on every member, its own included: a subscriber that hears
        // nothing for three rounds is on a dead connection (a partition that holds it open).
        let silence = self.retry * 3 + self.timeout;
        loop {
            let read = read_reply(&mut conn, &mut buf);
            let frame = within(
                silence,
                "subscriber",
                "3 x health.replication.interval",
                async { read.await.map_err(|e| e.to_string()) },
            )
            .await?;
            let now = Instant::now();
            let Ok(Some((OwnedFrame::Array(parts), _))) =
                redis_protocol::resp2::decode::decode(&frame)
            else {
                return Err("unexpected reply on the subscriber connection".into());
            };
            if let [OwnedFrame::BulkString(kind), OwnedFrame::BulkString(channel), OwnedFrame::BulkString(payload)] =
                &parts[..]
            {
                if kind != b"message" {
                    continue;
                }
                let shard = self
                    .channels
                    .iter()
                    .position(|c| c.as_bytes() == &channel[..]);
                if let (Some(shard), Some((from, round))) = (shard, self.token(payload)) {
                    self.matrix.received(from, self.place, shard, round, now);
                }
            }
        }
    }

    /// `(from, round)` of a token this proxy published (`from`: the publisher's place in the
    /// matrix); `None` for anyone else's.
    fn token(&self, payload: &[u8]) -> Option<(usize, u64)> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut words = text.split(' ');
        if words.next()? != crate::instance_id() {
            return None;
        }
        let from = words.next()?;
        let from = self.members.iter().position(|(_, m)| m.id() == from)?;
        let round = words.next()?.parse().ok()?;
        Some((from, round))
    }
}

/// The tokens sent and received, and the lag matrix they give.
pub struct Matrix {
    ids: Vec<String>,
    tolerance: Duration,
    inner: Mutex<Tokens>,
}

/// The newest round received on one shard, and when.
type Newest = Option<(u64, Instant)>;

/// How far behind one pair `from -> to` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairLag {
    pub lag: Duration,
    /// A token has arrived on every shard at least once.
    pub heard: bool,
}

struct Tokens {
    /// When each recent round started (every member's token of the round is due then).
    rounds: VecDeque<(u64, Instant)>,
    /// `[from][to][shard]`: the newest round received, and when.
    received: Vec<Vec<Vec<Newest>>>,
    /// The last measure, for `/v1/status`.
    lags: Vec<Vec<Option<PairLag>>>,
}

/// The lag matrix as `/v1/status` shows it.
#[derive(serde::Serialize)]
pub struct MatrixView {
    pub tolerance_seconds: f64,
    /// `lag_seconds[from][to]`; absent until measured.
    pub lag_seconds: BTreeMap<String, BTreeMap<String, f64>>,
}

impl Matrix {
    pub fn new(ids: Vec<String>, shards: u16, tolerance: Duration) -> Matrix {
        let n = ids.len();
        let shards = usize::from(shards.max(1));
        Matrix {
            ids,
            tolerance,
            inner: Mutex::new(Tokens {
                rounds: VecDeque::new(),
                received: vec![vec![vec![None; shards]; n]; n],
                lags: vec![vec![None; n]; n],
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tokens> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn start_round(&self, round: u64, now: Instant) {
        let mut t = self.lock();
        if t.rounds.len() == ROUNDS_KEPT {
            t.rounds.pop_front();
        }
        t.rounds.push_back((round, now));
    }

    pub fn received(&self, from: MemberIdx, to: MemberIdx, shard: usize, round: u64, now: Instant) {
        let mut t = self.lock();
        let cell = &mut t.received[from][to][shard];
        if cell.is_none_or(|(r, _)| round > r) {
            *cell = Some((round, now));
        }
    }

    /// The lag of every pair at `now` (`None`: no round started yet).
    pub fn measure(&self, now: Instant) -> Vec<Vec<Option<PairLag>>> {
        let mut t = self.lock();
        let n = self.ids.len();
        let mut lags = vec![vec![None; n]; n];
        if let Some(&(latest, started)) = t.rounds.back() {
            for (from, row) in lags.iter_mut().enumerate() {
                for (to, lag) in row.iter_mut().enumerate() {
                    let shards = &t.received[from][to];
                    let worst = shards.iter().map(|cell| match *cell {
                        // The last round arrived: its delay.
                        Some((r, at)) if r >= latest => at.saturating_duration_since(started),
                        // Else: the age of the oldest round not received.
                        other => {
                            let next = other.map_or(0, |(r, _)| r + 1);
                            let since = t
                                .rounds
                                .iter()
                                .find(|(r, _)| *r >= next)
                                .map_or(started, |(_, at)| *at);
                            now.saturating_duration_since(since)
                        }
                    });
                    *lag = worst.max().map(|lag| PairLag {
                        lag,
                        heard: shards.iter().all(Option::is_some),
                    });
                }
            }
        }
        t.lags = lags.clone();
        lags
    }

    pub fn view(&self) -> MatrixView {
        let t = self.lock();
        let mut lag_seconds = BTreeMap::new();
        for (from, row) in t.lags.iter().enumerate() {
            for (to, pair) in row.iter().enumerate() {
                if let (true, Some(pair)) = (from != to, pair) {
                    lag_seconds
                        .entry(self.ids[from].clone())
                        .or_insert_with(BTreeMap::new)
                        .insert(self.ids[to].clone(), pair.lag.as_secs_f64());
                }
            }
        }
        MatrixView {
            tolerance_seconds: self.tolerance.as_secs_f64(),
            lag_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn heard(lag: Duration) -> Option<PairLag> {
        Some(PairLag { lag, heard: true })
    }

    fn matrix() -> Matrix {
        Matrix::new(vec!["a".into(), "b".into()], 2, 100 * MS)
    }

    #[test]
    fn a_pair_lags_by_the_delay_of_its_last_token() {
        let m = matrix();
        let t0 = Instant::now();
        m.start_round(1, t0);
        m.received(0, 1, 0, 1, t0 + 20 * MS);
        m.received(0, 1, 1, 1, t0 + 30 * MS);
        let lags = m.measure(t0 + 1000 * MS);
        assert_eq!(lags[0][1], heard(30 * MS), "the slower shard counts");
        // b -> a: nothing received: the round's age.
        let never = PairLag {
            lag: 1000 * MS,
            heard: false,
        };
        assert_eq!(lags[1][0], Some(never));
    }

    #[test]
    fn a_cut_link_lags_more_every_round() {
        let m = matrix();
        let t0 = Instant::now();
        m.start_round(1, t0);
        for shard in 0..2 {
            m.received(0, 1, shard, 1, t0 + 5 * MS);
        }
        // Cut: rounds 2..=4 never arrive at b.
        for r in 2..=4 {
            m.start_round(r, t0 + (r as u32 - 1) * 1000 * MS);
        }
        let lags = m.measure(t0 + 4000 * MS);
        assert_eq!(lags[0][1], heard(3000 * MS), "since round 2 began");
        // Healed: round 5 arrives, the lag is its delay again.
        m.start_round(5, t0 + 4000 * MS);
        for shard in 0..2 {
            m.received(0, 1, shard, 5, t0 + 4010 * MS);
        }
        assert_eq!(m.measure(t0 + 5000 * MS)[0][1], heard(10 * MS));
        let view = m.view();
        assert_eq!(view.lag_seconds["a"]["b"], 0.01);
    }

    #[test]
    fn a_late_old_token_does_not_hide_a_new_delay() {
        let m = matrix();
        let t0 = Instant::now();
        m.start_round(1, t0);
        m.start_round(2, t0 + 1000 * MS);
        for shard in 0..2 {
            m.received(0, 1, shard, 2, t0 + 1001 * MS);
            m.received(0, 1, shard, 1, t0 + 1500 * MS); // older, later: ignored
        }
        assert_eq!(m.measure(t0 + 2000 * MS)[0][1], heard(MS));
    }

    #[test]
    fn a_member_is_judged_by_its_worst_pair_with_members_up() {
        const TOL: Duration = Duration::from_millis(500);
        let ids = ["a", "b", "c"];
        let pair = |ms: u32, heard: bool| {
            Some(PairLag {
                lag: ms * MS,
                heard,
            })
        };
        // [from][to]: c -> a lags 2 s, b -> a was never heard; the rest are fast.
        let mut lags = vec![vec![pair(1, true); 3]; 3];
        lags[2][0] = pair(2000, true);
        lags[1][0] = pair(100, false);
        let all_up = [true, true, true];
        let result = member_result(&lags, &all_up, 0, TOL, &ids).unwrap();
        assert_eq!(
            result.unwrap_err(),
            "replication from b: no token received yet"
        );
        let b_down = [true, false, true];
        let result = member_result(&lags, &b_down, 0, TOL, &ids).unwrap();
        assert_eq!(
            result.unwrap_err(),
            "replication from c: 2.0 s behind (tolerance 500ms)"
        );
        assert_eq!(
            member_result(&lags, &[true, false, false], 0, TOL, &ids),
            Some(Ok(()))
        );
        // c is slow towards a: c is judged by it too ("to a").
        let result = member_result(&lags, &b_down, 2, TOL, &ids).unwrap();
        assert!(result.unwrap_err().starts_with("replication to a: 2.0 s"));
        lags[0][1] = None; // not measured yet
        assert_eq!(member_result(&lags, &all_up, 0, TOL, &ids), None);
    }
}
