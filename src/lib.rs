//! geoproxy: a failover proxy for Redis Active-Active databases.
//!
//! Clients connect to geoproxy as if it were Redis. geoproxy health-checks every *member*
//! (one copy of the database per region), sends each client's traffic to the preferred
//! healthy member, fails over when it fails and fails back when it is healthy again, moving
//! sessions at command boundaries without disconnecting clients. `DESIGN.md` is the map.
//!
//! Control path (a few tasks on a thread of their own):
//! - [`health`]: one checker per member (periodic checks, and probes that confirm what
//!   sessions report); health flips wake the router.
//! - [`router`]: decides the active member and publishes the [`router::Route`].
//! - [`admin`]: `/live /ready /metrics /v1/status`, the operator's requests (switchover,
//!   drain, enable, reload).
//! - [`reload`]: SIGHUP and `POST /v1/reload` apply a changed file's members and health.
//! - [`modes`]: centralized (an etcd lease elects the proxy that serves) and pooled (the
//!   proxies share their views of the members).
//!
//! Data path (one task per client):
//! - [`listener`]: accepts clients (plain TCP, TLS with `[proxy.tls]`, a unix socket),
//!   enforces `max_clients`.
//! - [`session`]: one client and its [`upstream`] (a connection of its own, or a place on a
//!   shared one from its worker's [`pool`]); forwards RESP found by [`resp`].
//! - [`stream`] and [`tls`]: a connection either side: plain, TLS or a unix socket.
//!
//! Shared: [`config`] (the file contract), [`member`] (members and their health snapshot),
//! [`metrics`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod health;
pub mod listener;
pub mod member;
pub mod metrics;
pub mod modes;
pub mod pool;
pub mod reload;
pub mod resp;
pub mod router;
pub mod session;
pub mod stream;
pub mod tls;
pub mod upstream;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;

use crate::admin::AdminState;
use crate::config::{AuthMode, MemberConfig, SwitchMode};
use crate::listener::{Listener, Socket};
use crate::member::{Members, Roster};
use crate::metrics::Metrics;
use crate::modes::centralized::{ElectionTask, Fence};
use crate::modes::pooled::{PoolTask, PoolView};
use crate::pool::{PoolSettings, Pools};
use crate::reload::{MatrixCell, Reload, Reloader};
use crate::router::{DrainedCell, GateCell, History, Leadership, Route, Router, RouterTask};
use crate::session::policy::Rules;
use crate::session::Context;

/// A proxy whose ports are bound, ready to [`Server::run`].
pub struct Server {
    config: Config,
    /// The file SIGHUP and `POST /v1/reload` read again.
    path: Option<std::path::PathBuf>,
    listener: TcpListener,
    /// The TLS listener (`[proxy.tls]`).
    tls_listener: Option<TcpListener>,
    /// The unix socket (`proxy.unixsocket`).
    unix_listener: Option<UnixListener>,
    admin: TcpListener,
    metrics: Metrics,
}

impl Server {
    /// Binds the Redis and admin ports of a validated configuration (port 0 picks one).
    pub async fn bind(config: Config) -> io::Result<Server> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
            })
        };
        let shared = config.proxy.threads > 1;
        let listener = listen(config.proxy.listen, shared).map_err(|e| {
            let addr = config.proxy.listen;
            io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} (proxy.listen): {e}"),
            )
        })?;
        let tls_listener = match &config.proxy.tls {
            None => None,
            Some(tls) => Some(listen(tls.listen, shared).map_err(|e| {
                let addr = tls.listen;
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} (proxy.tls.listen): {e}"),
                )
            })?),
        };
        let unix_listener = match &config.proxy.unixsocket {
            None => None,
            Some((path, mode)) => Some(listen_unix(path, *mode).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot listen on {} (proxy.unixsocket): {e}",
                        path.display()
                    ),
                )
            })?),
        };
        let admin = bind(config.admin.listen, "admin.listen").await?;
        let metrics = Metrics::new(prometheus::Registry::new());
        Ok(Server {
            config,
            path: None,
            listener,
            tls_listener,
            unix_listener,
            admin,
            metrics,
        })
    }

    /// The configuration file to read again on SIGHUP and `POST /v1/reload`.
    pub fn reload_from(mut self, path: impl Into<std::path::PathBuf>) -> Server {
        self.path = Some(path.into());
        self
    }

    /// Where TLS clients connect, with `[proxy.tls]`.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where Redis clients connect.
    pub fn redis_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where the admin API listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown`, then stops accepting, answers `/ready` 503, and lets
    /// sessions finish their in-flight replies for up to `proxy.shutdown_timeout`.
    pub async fn run(self, shutdown: CancellationToken) {
        let Server {
            config,
            path,
            listener,
            tls_listener,
            unix_listener,
            admin,
            metrics,
        } = self;
        let unverified = |m: &&MemberConfig| m.tls.as_ref().is_some_and(|t| !t.settings.verify);
        for m in config.members.iter().filter(unverified) {
            warn!(
                member = m.id,
                "tls_verify = false: the member's certificate is not checked"
            );
        }
        let acceptor = config.proxy.tls.as_ref().map(|t| t.acceptor.clone());
        let (reloads_tx, reloads) = mpsc::channel(4);
        tokio::spawn(on_sighup(reloads_tx.clone(), shutdown.clone()));
        let slots = health::plan(&config.health);
        let first = Members::new(
            &config.members,
            config.health.policy,
            &slots,
            config.proxy.auth == AuthMode::Proxy,
            Instant::now(),
        );
        metrics.init_members(first.iter().map(|(_, m)| m.id()));
        for (_, m) in first.iter() {
            metrics.member_synced(m.id(), m.status().synced);
            metrics.failback_held(m.id(), None);
        }
        let members = Roster::new(first);
        let (route_tx, route_rx) = watch::channel(Route::default());
        let serving = Arc::new(AtomicBool::new(true));
        let (operations_tx, operations) = mpsc::channel(4);
        let history = Arc::new(History::default());
        let gate = Arc::new(GateCell::default());
        let drained = Arc::new(DrainedCell::new(vec![false; config.members.len()]));
        let matrix = Arc::new(MatrixCell::default());
        let (leadership_tx, leadership_rx) = watch::channel(Leadership::default());
        let fence = config
            .centralized
            .as_ref()
            .map(|_| Arc::new(Fence::default()));
        let election = config.centralized.clone().map(|c| ElectionTask {
            config: c,
            fence: fence.clone().unwrap_or_default(),
            members: members.clone(),
            route: route_rx.clone(),
            leadership: leadership_tx,
            metrics: metrics.clone(),
        });
        let pool_view = config
            .pooled
            .as_ref()
            .map(|_| Arc::new(PoolView::default()));
        let pool = config.pooled.clone().map(|c| PoolTask {
            config: c,
            members: members.clone(),
            view: pool_view.clone().unwrap_or_default(),
            metrics: metrics.clone(),
        });
        let strict = (config.failover.switch == SwitchMode::Strict)
            .then_some(config.failover.strict_timeout);
        let control = Control {
            election,
            pool,
            reloader: Reloader {
                path,
                running: config.clone(),
                members: members.clone(),
                metrics: metrics.clone(),
                matrix: matrix.clone(),
                requests: reloads,
            },
            router: RouterTask {
                router: Router::new(&config.failover, config.members.len()),
                members: members.clone(),
                route: route_tx,
                history: history.clone(),
                operations,
                metrics: metrics.clone(),
                gate: gate.clone(),
                drained: drained.clone(),
                leadership: config.centralized.is_some().then_some(leadership_rx),
                strict,
                pool: pool_view.clone(),
            },
            admin,
            admin_state: Arc::new(AdminState {
                members: members.clone(),
                route: route_rx.clone(),
                metrics: metrics.clone(),
                serving: serving.clone(),
                mode: config.proxy.mode,
                failback: config.failover.failback,
                token: config.admin.token.clone(),
                operations: operations_tx,
                reloads: reloads_tx,
                drained: drained.clone(),
                operating: AtomicBool::new(false),
                history: history.clone(),
                gate,
                matrix,
                pool: pool_view,
            }),
        };
        let stop_control = CancellationToken::new();
        // If this future is dropped (an aborted task), the control path stops with it.
        let _stop_control_on_drop = stop_control.clone().drop_guard();
        let control = match control.start(stop_control.clone()) {
            Ok(handle) => handle,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the control thread");
                return;
            }
        };

        let ctx = Arc::new(Context {
            members,
            metrics,
            history: history.clone(),
            reply_timeout: config.proxy.reply_timeout,
            unavailable_timeout: config.proxy.unavailable_timeout,
            connect_timeout: config.proxy.connect_timeout,
            probe_timeout: config.health.connect_timeout + config.health.ping.timing.timeout,
            oom_refuses: config.health.errors.oom,
            retry_reads: config.failover.retry_reads,
            client_idle_timeout: config.proxy.client_idle_timeout,
            query_buffer_limit: config.proxy.client_query_buffer_limit,
            fence,
            rules: Rules::new(&config),
        });
        let sessions = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(config.proxy.max_clients));
        // Each worker its own pools: a shared connection serves the sessions of one thread.
        let pools = || {
            config.proxy.multiplex.then(|| {
                let settings = PoolSettings {
                    shared: config.proxy.shared_connections,
                    idle: config.proxy.idle_pinned,
                    connect_timeout: config.proxy.connect_timeout,
                };
                Arc::new(Pools::new(settings, ctx.metrics.clone()))
            })
        };
        let main_pools = pools();
        // Workers 1..n: one thread each, a single-threaded runtime, and their own socket
        // on the same port (SO_REUSEPORT: the kernel spreads new connections).
        let mut workers = Vec::new();
        let addr = listener.local_addr().unwrap_or(config.proxy.listen);
        let tls_addr = tls_listener.as_ref().and_then(|l| l.local_addr().ok());
        for n in 1..config.proxy.threads.max(1) {
            let sockets = listen(addr, true).and_then(|plain| {
                let tls = tls_addr.map(|a| listen(a, true)).transpose()?;
                Ok((plain, tls))
            });
            let (plain, tls) = match sockets {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, worker = n, "cannot open another listener; fewer workers");
                    break;
                }
            };
            let sessions = TaskTracker::new();
            let worker_pools = pools();
            let worker = |listener, tls| Listener {
                listener: Socket::Tcp(listener),
                tls,
                ctx: ctx.clone(),
                route: route_rx.clone(),
                limit: limit.clone(),
                sessions: sessions.clone(),
                pools: worker_pools.clone(),
            };
            let mut listeners = vec![worker(plain, None)];
            if let Some(tls) = tls {
                listeners.push(worker(tls, acceptor.clone()));
            }
            let (shutdown, drain) = (shutdown.clone(), config.proxy.shutdown_timeout);
            let spawned = std::thread::Builder::new()
                .name(format!("geoproxy-worker-{n}"))
                .spawn(move || Listener::run_on_own_runtime(listeners, sessions, shutdown, drain));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => warn!(error = %e, worker = n, "cannot start a worker thread"),
            }
        }
        // The main worker serves the TLS listener and the unix socket too.
        let mut more = Vec::new();
        if let Some(l) = tls_listener {
            more.push((Socket::Tcp(l), acceptor));
        }
        if let Some(l) = unix_listener {
            more.push((Socket::Unix(l), None));
        }
        let more: Vec<Listener> = more
            .into_iter()
            .map(|(listener, tls)| Listener {
                listener,
                tls,
                ctx: ctx.clone(),
                route: route_rx.clone(),
                limit: limit.clone(),
                sessions: sessions.clone(),
                pools: main_pools.clone(),
            })
            .collect();
        let listener = Listener {
            listener: Socket::Tcp(listener),
            tls: None,
            ctx,
            route: route_rx,
            limit,
            sessions: sessions.clone(),
            pools: main_pools,
        };
        info!(
            listen = %config.proxy.listen,
            tls_listen = ?config.proxy.tls.as_ref().map(|t| t.listen),
            admin = %config.admin.listen,
            members = config.members.len(),
            "geoproxy serving"
        );
        let accepting = TaskTracker::new();
        for l in more {
            accepting.spawn(l.run(shutdown.clone()));
        }
        accepting.close();
        tokio::join!(listener.run(shutdown.clone()), accepting.wait());
        if let Some((path, _)) = &config.proxy.unixsocket {
            let _ = std::fs::remove_file(path); // as Redis does at shutdown
        }

        // Shutdown: not ready, no new clients; sessions drain what they owe (the workers
        // drain theirs on their own threads).
        serving.store(false, Ordering::Relaxed);
        sessions.close();
        let open = sessions.len();
        if open > 0 {
            info!(sessions = open, "draining sessions");
        }
        if tokio::time::timeout(config.proxy.shutdown_timeout, sessions.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = sessions.len(),
                "shutdown timeout: closing remaining sessions"
            );
        }
        for worker in workers {
            let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        }
        stop_control.cancel();
        let _ = tokio::task::spawn_blocking(move || control.join()).await;
        info!("geoproxy stopped");
    }
}

/// The control path: checkers, router and admin API, on a thread and runtime of their own,
/// so a busy data path cannot delay a check into a false timeout.
struct Control {
    /// Centralized mode: the election of the proxy that serves.
    election: Option<ElectionTask>,
    /// Pooled mode: the exchange of the members' views.
    pool: Option<PoolTask>,
    /// Reloads, and the health tasks they restart.
    reloader: Reloader,
    router: RouterTask,
    admin: TcpListener,
    admin_state: Arc<AdminState>,
}

impl Control {
    fn start(self, stop: CancellationToken) -> io::Result<std::thread::JoinHandle<()>> {
        let Control {
            election,
            pool,
            reloader,
            router,
            admin,
            admin_state,
        } = self;
        // A listener belongs to the runtime that registered it: hand over the socket.
        let admin = admin.into_std()?;
        std::thread::Builder::new()
            .name("geoproxy-control".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let runtime = match runtime {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the control runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let tasks = TaskTracker::new();
                    tasks.spawn(reloader.run(tasks.clone(), stop.clone()));
                    tasks.spawn(router.run(stop.clone()));
                    if let Some(election) = election {
                        tasks.spawn(election.run(stop.clone()));
                    }
                    if let Some(pool) = pool {
                        tasks.spawn(pool.run(stop.clone()));
                    }
                    match TcpListener::from_std(admin) {
                        Ok(admin) => {
                            tasks.spawn(admin::run(admin, admin_state, stop.clone()));
                        }
                        Err(e) => tracing::error!(error = %e, "cannot serve the admin API"),
                    }
                    tasks.close();
                    tasks.wait().await;
                });
            })
    }
}

/// A unix socket at `path` with permissions `mode`; a file left there by an earlier run is
/// removed first, as Redis does.
fn listen_unix(path: &std::path::Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// SIGHUP reloads the configuration (see [`reload`]; the reloader logs the outcome). It never
/// ends the process.
async fn on_sighup(reloads: mpsc::Sender<Reload>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        warn!("cannot install the SIGHUP handler");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        info!("SIGHUP: reloading the configuration");
        if reloads.try_send(Reload { reply: None }).is_err() {
            warn!("SIGHUP: a reload is already under way; this one is skipped");
        }
    }
}

/// A listening socket with Redis's backlog; `shared` lets this process's other workers
/// listen on the same port (SO_REUSEPORT). Not shared with one worker, so that a port
/// already taken is an error, never a silent split of the traffic.
fn listen(addr: SocketAddr, shared: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(shared)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// This process's id among proxies: it names the keys and tokens of its checks, so that
/// the checks of several proxies on one database never answer for each other.
pub fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{:08x}", rand::random::<u32>()))
}

/// Redis's default `tcp-backlog`.
const LISTEN_BACKLOG: u32 = 511;
