//! The accept loop: enforces `max_clients`, backs off on accept errors, and spawns one
//! session task per client.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::router::Route;
use crate::session::{Context, Session};

/// What Redis answers when `maxclients` is reached.
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// Longest pause after repeated accept errors (out of file descriptors, say).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

pub struct Listener {
    pub listener: TcpListener,
    pub ctx: Arc<Context>,
    pub route: watch::Receiver<Route>,
    /// One permit per open session.
    pub limit: Arc<Semaphore>,
    /// Every session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
}

impl Listener {
    /// Runs this listener on a single-threaded runtime of its own (a worker thread), then
    /// drains its sessions for up to `drain`.
    pub fn run_on_own_runtime(self, shutdown: CancellationToken, drain: Duration) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot start a worker runtime");
                return;
            }
        };
        let sessions = self.sessions.clone();
        runtime.block_on(async move {
            self.run(shutdown).await;
            sessions.close();
            let _ = tokio::time::timeout(drain, sessions.wait()).await;
        });
    }

    /// Accepts clients until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.listener.accept() => r,
            };
            let (client, addr) = match accepted {
                Ok(c) => {
                    backoff = Duration::from_millis(5);
                    c
                }
                Err(e) => {
                    warn!(error = %e, ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            };
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                self.ctx.metrics.sessions_rejected.inc();
                // Best effort, never blocking the accept loop.
                let _ = client.try_write(MAX_CLIENTS_REPLY);
                debug!(client.addr = %addr, "max_clients reached");
                continue;
            };
            let _ = client.set_nodelay(true);
            let metrics = self.ctx.metrics.clone();
            metrics.sessions_total.inc();
            metrics.sessions_open.inc();
            let session = Session::new(self.ctx.clone(), client, self.route.clone());
            let span = tracing::debug_span!("session", client.addr = %addr);
            let shutdown = shutdown.clone();
            self.sessions.spawn(
                async move {
                    session.run(shutdown).await;
                    metrics.sessions_open.dec();
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }
}
