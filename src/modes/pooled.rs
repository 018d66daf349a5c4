//! Pooled mode: several active proxies behind DNS or a load balancer, one preference, and a
//! shared judgement of the members, so that one proxy's network trouble does not split the
//! pool across members.
//!
//! Every `interval` each proxy publishes its own view of the members (its checks' verdicts)
//! and reads the others': in etcd (`<prefix>/views/<name>`, under a lease of its own, so a
//! proxy that dies leaves the pool after its TTL), or from a static list of peers' admin
//! APIs (`/v1/status`). A member is down for the pool when `quorum` live proxies see it down
//! (as Sentinel's ODOWN); a proxy that sees fewer than `quorum` live proxies, itself
//! included, uses its own view and says so (`/v1/status` `pool.quorum`,
//! `geoproxy_pool_quorum`). The router decides on the pool's view ([`PoolView`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::etcd::Etcd;
use crate::config::{PoolViews, PooledConfig};
use crate::health::State;
use crate::member::Roster;
use crate::metrics::Metrics;

/// One proxy's view: member id -> up.
pub type View = BTreeMap<String, bool>;

/// The pool's judgement, as the router reads it.
#[derive(Debug, Default)]
pub struct PoolView {
    inner: Mutex<Judgement>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Judgement {
    /// Live proxies seen this round, this one included.
    pub proxies: usize,
    /// `proxies` reached the quorum: the states below are the pool's.
    pub quorum: bool,
    /// Per member (by index): the pool's state while there is a quorum.
    #[serde(skip)]
    pub states: Vec<Option<(State, Instant)>>,
    /// Member id -> how many live proxies see it down (for `/v1/status`).
    pub down_votes: BTreeMap<String, usize>,
}

impl PoolView {
    /// The pool's state of member `i` and since when, while the pool has a quorum.
    pub fn state(&self, i: usize) -> Option<(State, Instant)> {
        let j = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        j.states.get(i).copied().flatten()
    }

    pub fn judgement(&self) -> Judgement {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The pool's state of one member: down when `quorum` of the live views see it down; up
/// when any live view sees it up; else (nobody has checked it yet) unknown. `None` without
/// a quorum of live views: the proxy keeps its own judgement.
pub fn pool_state(views: &[View], member: &str, quorum: usize) -> Option<State> {
    if views.len() < quorum {
        return None;
    }
    let down = views
        .iter()
        .filter(|v| v.get(member) == Some(&false))
        .count();
    let up = views.iter().any(|v| v.get(member) == Some(&true));
    Some(if down >= quorum {
        State::Down
    } else if up {
        State::Up
    } else {
        State::Unknown
    })
}

pub struct PoolTask {
    pub config: PooledConfig,
    pub members: Arc<Roster>,
    pub view: Arc<PoolView>,
    pub metrics: Metrics,
}

impl PoolTask {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut lease: Option<String> = None;
        let etcd = match &self.config.views {
            PoolViews::Etcd {
                endpoints,
                lease_ttl,
                ..
            } => Some(Etcd::new(endpoints.clone(), *lease_ttl / 3)),
            PoolViews::Peers(_) => None,
        };
        let http = reqwest::Client::builder()
            .timeout(self.config.interval.max(Duration::from_millis(200)))
            .build()
            .unwrap_or_default();
        let mut had_quorum = None;
        loop {
            let own = self.own_view();
            let others = match (&self.config.views, &etcd) {
                (
                    PoolViews::Etcd {
                        prefix, lease_ttl, ..
                    },
                    Some(etcd),
                ) => {
                    self.exchange_etcd(etcd, prefix, *lease_ttl, &own, &mut lease)
                        .await
                }
                (PoolViews::Peers(peers), _) => self.read_peers(&http, peers).await,
                _ => Vec::new(),
            };
            let mut views = vec![own];
            views.extend(others);
            let quorum = self.judge(&views);
            if had_quorum != Some(quorum) {
                if quorum {
                    info!(
                        proxies = views.len(),
                        "pool: quorum reached; deciding on the pool's view"
                    );
                } else {
                    warn!(
                        proxies = views.len(),
                        quorum = self.config.quorum,
                        "pool: no quorum of live proxies; deciding on this proxy's own view"
                    );
                }
                had_quorum = Some(quorum);
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if let (Some(etcd), Some(lease)) = (&etcd, &lease) {
                        let _ = etcd.revoke(lease).await; // leave the pool now
                    }
                    return;
                }
                _ = sleep(self.config.interval) => {}
            }
        }
    }

    fn own_view(&self) -> View {
        self.members
            .load()
            .iter()
            .filter_map(|(_, m)| match m.status().state {
                State::Up => Some((m.id().to_string(), true)),
                State::Down => Some((m.id().to_string(), false)),
                State::Unknown => None,
            })
            .collect()
    }

    /// Writes this proxy's view under its lease and reads the others'.
    async fn exchange_etcd(
        &self,
        etcd: &Etcd,
        prefix: &str,
        ttl: Duration,
        own: &View,
        lease: &mut Option<String>,
    ) -> Vec<View> {
        let dir = format!("{prefix}/views/");
        let key = format!("{dir}{}", self.config.name);
        let value = serde_json::to_string(own).unwrap_or_default();
        let exchanged = async {
            let alive = match lease.as_deref() {
                Some(l) => etcd.keep_alive(l).await?,
                None => false,
            };
            if !alive {
                *lease = Some(etcd.grant(ttl).await?);
            }
            let l = lease.as_deref().unwrap_or_default();
            etcd.put(&key, &value, l).await?;
            etcd.list(&dir).await
        };
        match exchanged.await {
            Ok(all) => {
                self.metrics.peer_reachable("etcd", true);
                all.into_iter()
                    .filter(|(k, _)| *k != key)
                    .filter_map(|(_, v)| serde_json::from_str(&v).ok())
                    .collect()
            }
            Err(e) => {
                self.metrics.peer_reachable("etcd", false);
                debug!(error = %e, "pool: cannot exchange views through etcd");
                Vec::new()
            }
        }
    }

    /// The views of the peers that answer: their `/v1/status` members' states.
    async fn read_peers(&self, http: &reqwest::Client, peers: &[String]) -> Vec<View> {
        let mut views = Vec::new();
        for peer in peers {
            let status = async {
                let text = http
                    .get(format!("{peer}/v1/status"))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                serde_json::from_str::<serde_json::Value>(&text).ok()
            };
            let Some(status) = status.await else {
                self.metrics.peer_reachable(peer, false);
                continue;
            };
            self.metrics.peer_reachable(peer, true);
            // A peer's own view, not its pool view: its checks' states.
            let view: View = status["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| {
                    let id = m["id"].as_str()?.to_string();
                    match m["state"].as_str()? {
                        "up" => Some((id, true)),
                        "down" => Some((id, false)),
                        _ => None,
                    }
                })
                .collect();
            views.push(view);
        }
        views
    }

    /// Judges every member on `views` and publishes the result; wakes the router when the
    /// pool's state of a member changed. Returns whether there was a quorum.
    fn judge(&self, views: &[View]) -> bool {
        let now = Instant::now();
        let quorum = views.len() >= self.config.quorum;
        let mut changed = false;
        {
            let mut j = self.view.inner.lock().unwrap_or_else(|e| e.into_inner());
            let members = self.members.load();
            j.states.resize(members.slots(), None);
            j.proxies = views.len();
            j.quorum = quorum;
            j.down_votes.clear();
            for (i, m) in members.iter() {
                let votes = views.iter().filter(|v| v.get(m.id()) == Some(&false));
                j.down_votes.insert(m.id().to_string(), votes.count());
                let state = pool_state(views, m.id(), self.config.quorum);
                let before = j.states[i];
                let after = match (state, before) {
                    (None, _) => None,
                    (Some(s), Some((b, since))) if s == b => Some((b, since)),
                    (Some(s), _) => Some((s, now)),
                };
                changed |= before.map(|b| b.0) != after.map(|a| a.0);
                j.states[i] = after;
            }
        }
        self.metrics.pool(quorum, views.len());
        if changed {
            self.members.load().changed.notify_one();
        }
        quorum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(pairs: &[(&str, bool)]) -> View {
        pairs.iter().map(|(m, up)| (m.to_string(), *up)).collect()
    }

    #[test]
    fn a_member_is_down_for_the_pool_only_when_a_quorum_sees_it_down() {
        let a_down = view(&[("a", false), ("b", true)]);
        let all_up = view(&[("a", true), ("b", true)]);
        let unchecked = view(&[]);
        let cases: &[(&[&View], usize, &str, Option<State>)] = &[
            // One proxy of three sees a down: the pool keeps it up.
            (&[&a_down, &all_up, &all_up], 2, "a", Some(State::Up)),
            // Two of three: down for the pool.
            (&[&a_down, &a_down, &all_up], 2, "a", Some(State::Down)),
            (&[&a_down, &a_down, &all_up], 2, "b", Some(State::Up)),
            // Alone, below the quorum: no pool judgement (the proxy's own view stands).
            (&[&a_down], 2, "a", None),
            // Nobody has checked it yet.
            (&[&unchecked, &unchecked], 2, "a", Some(State::Unknown)),
            // Quorum 1: any proxy's down is the pool's.
            (&[&a_down, &all_up], 1, "a", Some(State::Down)),
        ];
        for (views, quorum, member, want) in cases {
            let views: Vec<View> = views.iter().map(|v| (*v).clone()).collect();
            assert_eq!(
                pool_state(&views, member, *quorum),
                *want,
                "{views:?} quorum {quorum} {member}"
            );
        }
    }
}
