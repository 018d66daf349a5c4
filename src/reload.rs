//! Reload: SIGHUP and `POST /v1/reload` read the configuration file again, validate it, and
//! apply what can change under connected clients.
//!
//! - `[[members]]`: a member added joins the preference; one removed leaves it (sessions on
//!   it move at their quiescent points, as at a switch); one whose configuration changed
//!   (address, TLS, credentials, region) is a new member under the same id, and its sessions
//!   move to it the same way. Members that did not change keep their health and their
//!   sessions' connections.
//! - `[health]`: every checker starts again with the new settings; each check still
//!   configured keeps its state, so a reload alone never fails a member over.
//! - `[proxy.tls]`: the certificate files are read again (sessions keep theirs).
//!
//! Everything else (listeners, mode, admin, failover, the command policy) needs a restart:
//! the reload lists those keys, logs them, and leaves them as they run. An invalid file is
//! rejected as a whole, logged, and counted; the running configuration stays.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{AuthMode, Config};
use crate::health;
use crate::health::replication::Matrix;
use crate::member::{MemberChanges, Roster};
use crate::metrics::Metrics;

/// The sections a reload applies; a change anywhere else needs a restart.
const APPLIED: &[&str] = &["members", "health"];

/// A request to reload; `reply` gets the outcome (SIGHUP does not wait for it).
pub struct Reload {
    pub reply: Option<oneshot::Sender<Result<Reloaded, ReloadError>>>,
}

/// What a reload did, as `POST /v1/reload` answers it.
#[derive(Debug, Clone, Serialize)]
pub struct Reloaded {
    pub members: MemberChanges,
    /// The `[health]` section changed: the checkers started again with it.
    pub health_changed: bool,
    /// With `[proxy.tls]`: `reloaded`, or why the running certificate stays.
    pub tls_certificates: Option<String>,
    /// Keys that changed in the file but take effect only after a restart.
    pub restart_needed: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReloadError {
    #[error("geoproxy was not started from a configuration file: nothing to reload")]
    NoFile,
    #[error("the new configuration is invalid; the running one stays: {0}")]
    Invalid(String),
}

/// The replication check's lag matrix, as the admin API reads it (a reload replaces it).
pub type MatrixCell = Mutex<Option<Arc<Matrix>>>;

/// Carries out reloads on the control thread, and owns the health tasks it restarts.
pub struct Reloader {
    /// The file to read again (`None`: a proxy built from text, as tests do).
    pub path: Option<PathBuf>,
    /// The configuration as it runs: its members and health as last applied.
    pub running: Config,
    pub members: Arc<Roster>,
    pub metrics: Metrics,
    pub matrix: Arc<MatrixCell>,
    pub requests: mpsc::Receiver<Reload>,
}

impl Reloader {
    /// Starts the health tasks, then serves reload requests until `stop`.
    pub async fn run(mut self, tasks: TaskTracker, stop: CancellationToken) {
        if self
            .running
            .health
            .availability
            .as_ref()
            .is_some_and(|a| !a.verify_tls)
        {
            warn!(
                "health.availability.verify_tls is off: the REST API's certificate is not verified"
            );
        }
        let mut checks = self.start_health(&tasks, &stop);
        loop {
            let request = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.requests.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
            };
            let outcome = self.reload();
            match &outcome {
                Ok(done) => {
                    if !done.members.is_empty() || done.members.reordered || done.health_changed {
                        checks.cancel();
                        checks = self.start_health(&tasks, &stop);
                    }
                    self.metrics.reload("applied");
                    info!(
                        added = ?done.members.added,
                        removed = ?done.members.removed,
                        changed = ?done.members.changed,
                        reordered = done.members.reordered,
                        health_changed = done.health_changed,
                        tls_certificates = done.tls_certificates.as_deref().unwrap_or("-"),
                        "configuration reloaded"
                    );
                    if !done.restart_needed.is_empty() {
                        warn!(
                            keys = ?done.restart_needed,
                            "configuration reloaded, but these keys changed and need a restart"
                        );
                    }
                }
                Err(e) => {
                    self.metrics.reload("rejected");
                    warn!(error = %e, "configuration not reloaded");
                }
            }
            if let Some(reply) = request.reply {
                let _ = reply.send(outcome);
            }
        }
    }

    /// Starts every health task for the current members and health settings; cancelling the
    /// returned token stops them.
    fn start_health(&self, tasks: &TaskTracker, stop: &CancellationToken) -> CancellationToken {
        let token = stop.child_token();
        let members = self.members.load();
        let health = &self.running.health;
        let matrix = health.replication.as_ref().map(|r| {
            let ids = members.iter().map(|(_, m)| m.id().to_string()).collect();
            Arc::new(Matrix::new(ids, r.shards, r.tolerance))
        });
        *self.matrix.lock().unwrap_or_else(|e| e.into_inner()) = matrix.clone();
        health::spawn(tasks, &members, health, &self.metrics, matrix, &token);
        token
    }

    /// Reads and validates the file, then applies its members and health.
    fn reload(&mut self) -> Result<Reloaded, ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let next = Config::load(path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let mut restart_needed = self.running.source.changed_keys(&next.source, APPLIED);
        // Read by sessions, which take it at start.
        let session_keys = ["health.error_oom"];
        let health_keys = self.running.source.changed_keys(&next.source, &[]);
        restart_needed.extend(
            health_keys
                .into_iter()
                .filter(|k| session_keys.contains(&k.as_str())),
        );
        let health_changed = self.running.source.section_changed(&next.source, "health");
        let tls_certificates = self
            .running
            .proxy
            .tls
            .as_ref()
            .map(|t| match t.acceptor.reload() {
                Ok(()) => "reloaded".to_string(),
                Err(e) => {
                    warn!(error = %e, "TLS certificates not reloaded; the running ones stay");
                    format!("not reloaded, the running certificate stays: {e}")
                }
            });

        let current = self.members.load();
        let proxy_auth = self.running.proxy.auth == AuthMode::Proxy;
        let slots = health::plan(&next.health);
        let now = Instant::now();
        let (generation, changes) =
            current.next(&next.members, next.health.policy, &slots, proxy_auth, now);
        if !changes.is_empty() || changes.reordered || health_changed {
            for (_, m) in current.iter() {
                if generation.find(m.id()).is_none() {
                    let checks = m.slots();
                    self.metrics
                        .forget_member(m.id(), checks.iter().map(|s| s.name.as_str()));
                }
            }
            self.metrics
                .init_members(generation.iter().map(|(_, m)| m.id()));
            for (_, m) in generation.iter() {
                let status = m.status();
                if status.state != health::State::Unknown {
                    self.metrics
                        .member_up(m.id(), status.state == health::State::Up);
                }
                self.metrics.member_synced(m.id(), status.synced);
            }
            // The members that left (removed, or replaced under a new slot) close what the
            // workers pool for them, once no reply is owed there.
            for (idx, m) in current.iter() {
                if !generation.preference().contains(&idx) {
                    m.retire();
                }
            }
            self.members.store(generation);
        }
        self.running.members = next.members;
        self.running.health = next.health;
        self.running.source.adopt(&next.source, APPLIED);
        Ok(Reloaded {
            members: changes,
            health_changed,
            tls_certificates,
            restart_needed,
        })
    }
}
