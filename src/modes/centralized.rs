//! Centralized mode: one active proxy and standbys. The election decides which proxy
//! serves and tells the router ([`Leadership`]); the router then switches strictly.
//!
//! With etcd (`election = "etcd"`): the holder of `<prefix>/leader`, a key under a lease,
//! serves. It renews the lease every third of its TTL and writes its route beside it
//! (`<prefix>/route`, guarded by still holding the leader key). **Fencing**: the holder
//! counts the lease from when it *sent* its last successful renewal, which is never later
//! than when etcd counted it, and stops serving two thirds of a TTL after that, so it has
//! stopped before etcd can expire the lease and let a standby in, partitions included. A
//! standby tries to take the key every third of a TTL and starts from the last route.
//!
//! Without etcd (`election = "peer"`, two proxies): the standby polls the other proxy's
//! `/v1/status` and takes over after `peer_down_after` failures in a row. A partition
//! between the two proxies makes both serve: it is documented as not partition-safe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::etcd::{Campaign, Etcd};
use crate::config::{CentralizedConfig, Election};
use crate::member::Roster;
use crate::metrics::Metrics;
use crate::router::{Leadership, Route};

/// The active proxy's right to send to members, as a deadline every session checks before
/// it sends: the data path cannot outrun the fencing, not even right after the process was
/// frozen (SIGSTOP) past its lease.
#[derive(Debug)]
pub struct Fence {
    base: Instant,
    /// Nanoseconds after `base` until which this proxy may send; 0: it may not.
    until: AtomicU64,
}

impl Default for Fence {
    fn default() -> Self {
        Fence {
            base: Instant::now(),
            until: AtomicU64::new(0),
        }
    }
}

impl Fence {
    /// May this proxy send to members now?
    pub fn open(&self) -> bool {
        let now = Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos();
        now < u128::from(self.until.load(Ordering::Acquire))
    }

    fn open_until(&self, deadline: Instant) {
        let nanos = deadline.saturating_duration_since(self.base).as_nanos();
        self.until
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Release);
    }

    fn close(&self) {
        self.until.store(0, Ordering::Release);
    }
}

pub struct ElectionTask {
    pub config: CentralizedConfig,
    /// Shared with every session.
    pub fence: Arc<Fence>,
    pub members: Arc<Roster>,
    pub route: watch::Receiver<Route>,
    pub leadership: watch::Sender<Leadership>,
    pub metrics: Metrics,
}

impl ElectionTask {
    pub async fn run(self, shutdown: CancellationToken) {
        match self.config.election.clone() {
            Election::Etcd {
                endpoints,
                prefix,
                lease_ttl,
            } => {
                let etcd = Etcd::new(endpoints, lease_ttl / 3);
                self.etcd(etcd, &prefix, lease_ttl, shutdown).await
            }
            Election::Peer {
                peer,
                primary,
                interval,
                down_after,
            } => {
                self.peer(&peer, primary, interval, down_after, shutdown)
                    .await
            }
        }
    }

    fn serve(&self, serving: bool, last_route: Option<&str>) {
        if !serving {
            self.fence.close();
        }
        let start_from = last_route
            .and_then(|r| r.split(' ').next())
            .and_then(|id| self.members.load().find(id));
        self.metrics.leader(serving);
        self.leadership.send_replace(Leadership {
            serving,
            start_from,
        });
    }

    async fn etcd(mut self, etcd: Etcd, prefix: &str, ttl: Duration, shutdown: CancellationToken) {
        let (leader_key, route_key) = (format!("{prefix}/leader"), format!("{prefix}/route"));
        let name = self.config.name.clone();
        let renew_every = ttl / 3;
        let mut last_holder = String::new();
        let mut etcd_down = false;
        loop {
            // Standby: try to take the key every third of a TTL.
            let (lease, granted_at, route) = loop {
                let sent = Instant::now();
                let attempt = async {
                    let lease = etcd.grant(ttl).await?;
                    match etcd.campaign(&leader_key, &name, &lease, &route_key).await {
                        Ok(Campaign::Won { route }) => Ok(Some((lease, route))),
                        Ok(Campaign::Held { by }) => {
                            let _ = etcd.revoke(&lease).await;
                            if by != last_holder {
                                info!(active = by, "standby: another proxy holds the lease");
                                last_holder = by;
                            }
                            Ok(None)
                        }
                        Err(e) => {
                            let _ = etcd.revoke(&lease).await;
                            Err(e)
                        }
                    }
                };
                match attempt.await {
                    Ok(Some((lease, route))) => break (lease, sent, route),
                    Ok(None) => {
                        etcd_down = false;
                        self.metrics.peer_reachable("etcd", true);
                    }
                    Err(e) => {
                        // One line when etcd goes away, not one per attempt.
                        if !etcd_down {
                            warn!(error = %e, "standby: cannot reach etcd; not serving until it can");
                        } else {
                            debug!(error = %e, "standby: cannot reach etcd");
                        }
                        etcd_down = true;
                        self.metrics.peer_reachable("etcd", false);
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sleep(renew_every) => {}
                }
            };
            self.metrics.peer_reachable("etcd", true);
            info!(lease = lease, route = ?route, "took the lease: this proxy serves");
            self.fence.open_until(granted_at + ttl * 2 / 3);
            self.serve(true, route.as_deref());
            self.route.mark_changed();

            // Active: renew, write the route, stop serving before the lease can expire.
            let mut renewed_at = granted_at;
            let mut next_renewal = Instant::now() + renew_every;
            let why = loop {
                let fence = renewed_at + ttl * 2 / 3;
                tokio::select! {
                    // The fence first: after a freeze every branch is ready at once.
                    biased;
                    _ = sleep_until(fence) => break "the lease was not renewed in time (fencing)",
                    _ = shutdown.cancelled() => {
                        // Let a standby in now rather than after the TTL.
                        let _ = etcd.revoke(&lease).await;
                        self.serve(false, None);
                        return;
                    }
                    _ = sleep_until(next_renewal) => {
                        let sent = Instant::now();
                        next_renewal = sent + renew_every;
                        let left = fence.saturating_duration_since(sent);
                        match timeout(left, etcd.keep_alive(&lease)).await {
                            Ok(Ok(true)) => {
                                renewed_at = sent;
                                self.fence.open_until(sent + ttl * 2 / 3);
                                self.metrics.peer_reachable("etcd", true);
                            }
                            Ok(Ok(false)) => break "etcd no longer has the lease",
                            Ok(Err(e)) => {
                                self.metrics.peer_reachable("etcd", false);
                                warn!(error = %e, "cannot renew the lease");
                            }
                            Err(_) => self.metrics.peer_reachable("etcd", false),
                        }
                    }
                    changed = self.route.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let route = *self.route.borrow_and_update();
                        if let Some(m) = route.member {
                            let value = format!("{} {}", self.members.load().get(m).id(), route.epoch);
                            let written = etcd.put_if(&route_key, &value, &leader_key, &name).await;
                            if !matches!(written, Ok(true)) {
                                debug!(?written, "route not written to etcd");
                            }
                        }
                    }
                }
            };
            warn!(why, "stopping to serve: this proxy is a standby now");
            self.serve(false, None);
            let _ = etcd.revoke(&lease).await;
        }
    }

    async fn peer(
        self,
        peer: &str,
        primary: bool,
        interval: Duration,
        down_after: u32,
        shutdown: CancellationToken,
    ) {
        let http = reqwest::Client::builder()
            .timeout(interval.max(Duration::from_millis(200)))
            .build()
            .unwrap_or_default();
        let url = format!("{peer}/v1/status");
        let mut serving = false;
        let mut failures = 0;
        let mut first = true;
        loop {
            // The peer's role, or None when it cannot be asked.
            let role = match http.get(&url).send().await {
                Ok(r) => r
                    .text()
                    .await
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["role"].as_str().map(str::to_string)),
                Err(_) => None,
            };
            self.metrics.peer_reachable(peer, role.is_some());
            failures = if role.is_some() { 0 } else { failures + 1 };
            let peer_active = role.as_deref() == Some("active");
            let next = match (serving, peer_active) {
                // Both active (after a partition): the primary keeps serving.
                (true, true) => primary,
                (true, false) => true,
                // A primary starts serving unless its peer already does (an old active
                // that returns stays standby); a peer not up yet does not hold it back.
                (false, false) if first && primary => true,
                (false, false) if primary && role.as_deref() == Some("standby") => true,
                (false, false) => failures >= down_after,
                (false, true) => false,
            };
            first = false;
            if next != serving {
                serving = next;
                if serving {
                    // Not partition-safe by design: the peer election has no fence.
                    self.fence
                        .open_until(Instant::now() + Duration::from_secs(100 * 365 * 86_400));
                    info!(
                        peer,
                        failures, "taking over from the peer: this proxy serves"
                    );
                } else {
                    warn!(peer, "the peer serves: this proxy is a standby now");
                }
                self.serve(serving, None);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep(interval) => {}
            }
        }
    }
}
