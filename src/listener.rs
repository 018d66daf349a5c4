//! The accept loop: enforces `max_clients`, backs off on accept errors, and spawns one
//! session task per client (which, on the TLS listener, first finishes the handshake).

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::router::Route;
use crate::session::{Context, Session};
use crate::stream::Stream;
use crate::tls::Acceptor;

/// What Redis answers when `maxclients` is reached.
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// Longest pause after repeated accept errors (out of file descriptors, say).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// What an open session holds: its `max_clients` permit and its count in
/// `geoproxy_sessions_open`. Given back on drop, so a session that panics (its task is
/// dropped while unwinding) leaks neither.
pub struct OpenSession {
    gauge: IntGauge,
    _permit: OwnedSemaphorePermit,
}

impl OpenSession {
    pub fn new(metrics: &Metrics, permit: OwnedSemaphorePermit) -> OpenSession {
        metrics.sessions_open.inc();
        OpenSession {
            gauge: metrics.sessions_open.clone(),
            _permit: permit,
        }
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A listening socket: TCP (plain or TLS), or a unix socket (`proxy.unixsocket`).
pub enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted connection before any TLS, and who it is (for the session's span).
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Socket {
    async fn accept(&self) -> std::io::Result<(Accepted, String)> {
        match self {
            Socket::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Accepted::Tcp(s), addr.to_string()))
            }
            Socket::Unix(l) => Ok((Accepted::Unix(l.accept().await?.0), "unix".into())),
        }
    }
}

impl Accepted {
    fn try_write(&self, buf: &[u8]) {
        let _ = match self {
            Accepted::Tcp(s) => s.try_write(buf),
            Accepted::Unix(s) => s.try_write(buf),
        };
    }
}

pub struct Listener {
    pub listener: Socket,
    /// `Some` on the TLS listener (`[proxy.tls]`).
    pub tls: Option<Arc<Acceptor>>,
    pub ctx: Arc<Context>,
    pub route: watch::Receiver<Route>,
    /// One permit per open session.
    pub limit: Arc<Semaphore>,
    /// Every session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// The worker's shared and idle pinned connections (`proxy.multiplex`).
    pub pools: Option<Arc<Pools>>,
}

impl Listener {
    /// Runs these listeners (a worker's plain and TLS sockets) on a single-threaded runtime
    /// of its own (a worker thread), then drains their sessions for up to `drain`.
    pub fn run_on_own_runtime(
        listeners: Vec<Listener>,
        sessions: TaskTracker,
        shutdown: CancellationToken,
        drain: Duration,
    ) {
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
        runtime.block_on(async move {
            let accepting = TaskTracker::new();
            for listener in listeners {
                accepting.spawn(listener.run(shutdown.clone()));
            }
            accepting.close();
            accepting.wait().await;
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
                // Best effort, never blocking the accept loop (a TLS client just closes).
                if self.tls.is_none() {
                    client.try_write(MAX_CLIENTS_REPLY);
                }
                debug!(client.addr = %addr, "max_clients reached");
                continue;
            };
            self.ctx.metrics.sessions_total.inc();
            let open = OpenSession::new(&self.ctx.metrics, permit);
            let (ctx, route, tls) = (self.ctx.clone(), self.route.clone(), self.tls.clone());
            let pools = self.pools.clone();
            let span = tracing::debug_span!("session", client.addr = %addr);
            let shutdown = shutdown.clone();
            self.sessions.spawn(
                async move {
                    let client = match (client, tls) {
                        (Accepted::Unix(unix), _) => Stream::Unix(unix),
                        (Accepted::Tcp(tcp), None) => Stream::Tcp(tcp),
                        (Accepted::Tcp(tcp), Some(tls)) => match Box::pin(tls.accept(tcp)).await {
                            Ok(stream) => stream,
                            Err(e) => {
                                ctx.metrics.tls_handshake_failures.inc();
                                debug!(error = %e, "TLS handshake with a client failed");
                                return;
                            }
                        },
                    };
                    Session::new(ctx, client, route, pools).run(shutdown).await;
                    drop(open);
                }
                .instrument(span),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_session_gives_back_its_permit_and_its_count() {
        let metrics = Metrics::new(prometheus::Registry::new());
        let limit = Arc::new(Semaphore::new(1));
        let permit = limit.clone().try_acquire_owned().unwrap();
        let open = OpenSession::new(&metrics, permit);
        assert_eq!(metrics.sessions_open.get(), 1);
        assert_eq!(limit.available_permits(), 0);
        let task = tokio::spawn(async move {
            let _open = open;
            panic!("a bug in one session");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(metrics.sessions_open.get(), 0);
        assert_eq!(limit.available_permits(), 1);
    }
}
