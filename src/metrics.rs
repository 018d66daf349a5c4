//! Every metric geoproxy exports, registered on one `prometheus::Registry` passed in
//! explicitly (each test gets its own). Names and labels are a contract (DESIGN.md); labels
//! are bounded: member ids and switch reasons, never keys or clients.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Cheap to clone: every field is a handle to shared atomics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    member_up: IntGaugeVec,
    active_member: IntGaugeVec,
    switches: IntCounterVec,
    route_epoch: IntGauge,
    check_duration: HistogramVec,
    check_up: IntGaugeVec,
    checks_inconclusive: IntCounterVec,
    member_synced: IntGaugeVec,
    replication_lag: prometheus::GaugeVec,
    failback_held: IntGaugeVec,
    pub no_member_available: IntGauge,
    passive_signals: IntCounterVec,
    refusals: IntCounterVec,
    pub sessions_open: IntGauge,
    pub sessions_total: IntCounter,
    pub sessions_moved: IntCounter,
    pub sessions_interrupted: IntCounter,
    pub sessions_lost: IntCounter,
    pub sessions_rejected: IntCounter,
    commands: IntCounterVec,
    inflight_errors: IntCounterVec,
    pub unavailable_replies: IntCounter,
    pub retried_reads: IntCounter,
    pub protocol_errors: IntCounter,
    pub move_duration: Histogram,
    member_connections: IntGaugeVec,
    pub sessions_shared: IntGauge,
    pins: IntCounterVec,
    shared_writes: Histogram,
    pub tls_handshake_failures: IntCounter,
    pub auth_failures: IntCounter,
    denied_commands: IntCounterVec,
    member_drained: IntGaugeVec,
    operations: IntCounterVec,
    reloads: IntCounterVec,
    /// Bytes read from clients and written to them (the proxy's traffic, both ways).
    pub client_bytes_in: IntCounter,
    pub client_bytes_out: IntCounter,
    leader: IntGauge,
    peer_reachable: IntGaugeVec,
    pool_quorum: IntGauge,
    pool_proxies: IntGauge,
    command_duration: HistogramVec,
}

macro_rules! register {
    ($registry:expr, $metric:expr) => {{
        let m = $metric.expect("metric definition is valid");
        $registry
            .register(Box::new(m.clone()))
            .expect("metric names are unique");
        m
    }};
}

impl Metrics {
    /// Creates every metric on `registry`, with the process's own (`process_*`: open fds,
    /// resident memory, CPU seconds, threads) and `geoproxy_build_info`.
    pub fn new(registry: Registry) -> Metrics {
        let r = &registry;
        // Failing here only loses the process metrics (a /proc that cannot be read).
        let _ = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let build = register!(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "geoproxy_build_info",
                    "1, with the version of the running geoproxy as a label."
                ),
                &["version"]
            )
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let opts = |name: &str, help: &str| Opts::new(name, help);
        Metrics {
            member_up: register!(
                r,
                IntGaugeVec::new(
                    opts(
                        "geoproxy_member_up",
                        "1 if the member is healthy, 0 if not."
                    ),
                    &["member"]
                )
            ),
            active_member: register!(
                r,
                IntGaugeVec::new(
                    opts(
                        "geoproxy_active_member",
                        "1 for the member sessions are routed to, 0 for the others."
                    ),
                    &["member"]
                )
            ),
            switches: register!(
                r,
                IntCounterVec::new(
                    opts(
                        "geoproxy_switches_total",
                        "Route changes, by from, to and reason."
                    ),
                    &["from", "to", "reason"]
                )
            ),
            route_epoch: register!(
                r,
                IntGauge::new(
                    "geoproxy_route_epoch",
                    "Current route epoch (grows at each switch)."
                )
            ),
            check_duration: register!(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "geoproxy_check_duration_seconds",
                        "Duration of health checks, by member and check."
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0
                    ]),
                    &["member", "check"]
                )
            ),
            check_up: register!(
                r,
                IntGaugeVec::new(
                    opts(
                        "geoproxy_check_up",
                        "1 if the member passed its last run of this check, 0 if not."
                    ),
                    &["member", "check"]
                )
            ),
            checks_inconclusive: register!(
                r,
                IntCounterVec::new(
                    opts(
                        "geoproxy_checks_inconclusive_total",
                        "Failed runs of a check not counted against the member, because this \
                         process was out of file descriptors at the time."
                    ),
                    &["member", "check"]
                )
            ),
            member_synced: register!(
                r,
                IntGaugeVec::new(
                    opts(
                        "geoproxy_member_synced",
                        "1 if every sync check (lag, replication) of the member passes."
                    ),
                    &["member"]
                )
            ),
            replication_lag: register!(
                r,
                prometheus::GaugeVec::new(
                    opts(
                        "geoproxy_replication_lag_seconds",
                        "How far behind `to` is in receiving the replication check's tokens \
                         published on `from`: the observed delay of the last token, or the \
                         age of the oldest one not received."
                    ),
                    &["from", "to"]
                )
            ),
            failback_held: register!(
                r,
                IntGaugeVec::new(
                    opts(
                        "geoproxy_failback_held",
                        "1 while traffic does not return to a more preferred member that is \
                         up, by member and why (hold: its failback_after; sync: its sync \
                         checks)."
                    ),
                    &["member", "reason"]
                )
            ),
            no_member_available: register!(
                r,
                IntGauge::new(
                    "geoproxy_no_member_available",
                    "1 while no member is available (every command gets -UNAVAILABLE)."
                )
            ),
            passive_signals: register!(
                r,
                IntCounterVec::new(
                    opts(
                        "geoproxy_passive_signals_total",
                        "Failures sessions saw on live traffic, by member, kind and outcome of \
                         the confirming probe (confirmed: the member was down; dismissed: it \
                         was healthy)."
                    ),
                    &["member", "kind", "outcome"]
                )
            ),
            refusals: register!(
                r,
                IntCounterVec::new(
                    opts(
                        "geoproxy_member_refusals_total",
                        "Replies in which a member said it cannot serve (-LOADING, -BUSY, \
                         -MASTERDOWN, -TRYAGAIN, -CLUSTERDOWN), by member."
                    ),
                    &["member"]
                )
            ),
            sessions_open: register!(
                r,
                IntGauge::new("geoproxy_sessions_open", "Client sessions open now.")
            ),
            sessions_total: register!(
                r,
                IntCounter::new("geoproxy_sessions_total", "Client sessions accepted.")
            ),
            sessions_moved: register!(
                r,
                IntCounter::new(
                    "geoproxy_sessions_moved_total",
                    "Sessions moved to another member: at a quiescent point, or after their \
                     member failed."
                )
            ),
            sessions_interrupted: register!(
                r,
                IntCounter::new(
                    "geoproxy_sessions_interrupted_total",
                    "Sessions whose member failed with commands in flight (each of those got \
                     an outcome-unknown error; the session went on)."
                )
            ),
            sessions_lost: register!(
                r,
                IntCounter::new(
                    "geoproxy_sessions_lost_total",
                    "Sessions closed because their member failed in the middle of a reply or \
                     in MONITOR (the goal is zero)."
                )
            ),
            sessions_rejected: register!(
                r,
                IntCounter::new(
                    "geoproxy_rejected_connections_total",
                    "Client connections refused because max_clients was reached."
                )
            ),
            commands: register!(
                r,
                IntCounterVec::new(
                    opts("geoproxy_commands_total", "Commands forwarded, by member."),
                    &["member"]
                )
            ),
            inflight_errors: register!(
                r,
                IntCounterVec::new(
                    opts(
                        "geoproxy_inflight_errors_total",
                        "Commands answered with an outcome-unknown error because their member \
                         failed before replying, by member."
                    ),
                    &["member"]
                )
            ),
            unavailable_replies: register!(
                r,
                IntCounter::new(
                    "geoproxy_unavailable_replies_total",
                    "Commands answered -UNAVAILABLE because no member was available."
                )
            ),
            retried_reads: register!(
                r,
                IntCounter::new(
                    "geoproxy_retried_reads_total",
                    "Read-only commands re-sent to the next member after theirs failed \
                     (failover.retry_reads)."
                )
            ),
            protocol_errors: register!(
                r,
                IntCounter::new(
                    "geoproxy_protocol_errors_total",
                    "Sessions closed for malformed RESP from the client or the member."
                )
            ),
            tls_handshake_failures: register!(
                r,
                IntCounter::new(
                    "geoproxy_client_tls_handshake_failures_total",
                    "Clients of the TLS listener whose handshake failed or timed out."
                )
            ),
            auth_failures: register!(
                r,
                IntCounter::new(
                    "geoproxy_auth_failures_total",
                    "AUTH and HELLO AUTH refused by proxy authentication (proxy.auth = \"proxy\")."
                )
            ),
            denied_commands: register!(
                r,
                IntCounterVec::new(
                    opts(
                        "geoproxy_denied_commands_total",
                        "Commands refused by the command policy ([commands] deny and renamed \
                         commands), by the configured name."
                    ),
                    &["command"]
                )
            ),
            member_drained: register!(
                r,
                IntGaugeVec::new(
                    opts(
                        "geoproxy_member_drained",
                        "1 while an operator has drained the member (never chosen until enabled)."
                    ),
                    &["member"]
                )
            ),
            operations: register!(
                r,
                IntCounterVec::new(
                    opts(
                        "geoproxy_admin_operations_total",
                        "Operator requests carried out (switchover, drain, enable)."
                    ),
                    &["operation"]
                )
            ),
            reloads: register!(
                r,
                IntCounterVec::new(
                    opts(
                        "geoproxy_config_reloads_total",
                        "Configuration reloads (SIGHUP, POST /v1/reload): applied, or rejected \
                         (an invalid file; the running configuration stays)."
                    ),
                    &["outcome"]
                )
            ),
            leader: register!(
                r,
                IntGauge::new(
                    "geoproxy_leader",
                    "Centralized mode: 1 while this proxy is the active one (it serves), 0 while \
                     it is a standby."
                )
            ),
            peer_reachable: register!(
                r,
                IntGaugeVec::new(
                    opts(
                        "geoproxy_peer_reachable",
                        "1 if the last request to this coordination peer (etcd, or the other \
                         proxy) got an answer."
                    ),
                    &["peer"]
                )
            ),
            command_duration: register!(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "geoproxy_command_duration_seconds",
                        "Time from a command's write to its member until its reply was complete, \
                         by member (blocking commands included, as long as they block)."
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0, 2.5, 10.0
                    ]),
                    &["member"]
                )
            ),
            pool_quorum: register!(
                r,
                IntGauge::new(
                    "geoproxy_pool_quorum",
                    "Pooled mode: 1 while this proxy sees a quorum of live proxies (it decides on \
                     the pool's view), 0 while it decides on its own."
                )
            ),
            pool_proxies: register!(
                r,
                IntGauge::new(
                    "geoproxy_pool_proxies",
                    "Pooled mode: live proxies of the pool this proxy sees, itself included."
                )
            ),
            client_bytes_in: register!(
                r,
                IntCounter::new(
                    "geoproxy_client_bytes_received_total",
                    "Bytes read from clients."
                )
            ),
            client_bytes_out: register!(
                r,
                IntCounter::new(
                    "geoproxy_client_bytes_sent_total",
                    "Bytes written to clients (replies, pushes and geoproxy's own answers)."
                )
            ),
            member_connections: register!(
                r,
                IntGaugeVec::new(
                    opts(
                        "geoproxy_member_connections",
                        "Connections open to the member, by kind: shared (by many sessions of \
                         a worker) or pinned (one session's)."
                    ),
                    &["member", "kind"]
                )
            ),
            sessions_shared: register!(
                r,
                IntGauge::new(
                    "geoproxy_sessions_shared",
                    "Sessions on a shared connection now (the others have their own or none)."
                )
            ),
            pins: register!(
                r,
                IntCounterVec::new(
                    opts(
                        "geoproxy_pins_total",
                        "Times a shared session took a connection of its own, by the command \
                         kind that needed it."
                    ),
                    &["reason"]
                )
            ),
            shared_writes: register!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "geoproxy_shared_write_batches",
                        "Sessions' batches gathered into one write on a shared connection."
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
                )
            ),
            move_duration: register!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "geoproxy_session_move_duration_seconds",
                        "Time to open and prepare a session's new upstream."
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0
                    ])
                )
            ),
            registry,
        }
    }

    /// Declares the members so every per-member series exists (at 0) from the start, but
    /// `geoproxy_member_up`: a member whose first check has not finished is not reported
    /// as down (its series appears with the first verdict).
    pub fn init_members<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        for id in ids {
            self.active_member.with_label_values(&[id]).set(0);
            self.commands.with_label_values(&[id]);
            self.inflight_errors.with_label_values(&[id]);
            self.member_drained.with_label_values(&[id]).set(0);
        }
        for outcome in ["applied", "rejected"] {
            self.reloads.with_label_values(&[outcome]);
        }
    }

    /// A connection of `kind` (`shared`, `pinned`) to `member` opened (+1) or closed (-1).
    pub fn member_connection(&self, member: &str, kind: &str, delta: i64) {
        self.member_connections
            .with_label_values(&[member, kind])
            .add(delta);
    }

    /// The gauge of `kind` connections to `member`.
    pub fn member_connections(&self, member: &str, kind: &str) -> IntGauge {
        self.member_connections.with_label_values(&[member, kind])
    }

    /// A shared session pinned for a command of this kind.
    pub fn pinned(&self, reason: &str) {
        self.pins.with_label_values(&[reason]).inc();
    }

    /// One write of a shared connection carried `batches` sessions' batches.
    pub fn shared_write(&self, batches: u64) {
        self.shared_writes.observe(batches as f64);
    }

    /// A reload removed `member`: its gauges go (its counters stay, as counters do).
    pub fn forget_member<'a>(&self, member: &str, checks: impl IntoIterator<Item = &'a str>) {
        let _ = self.member_up.remove_label_values(&[member]);
        let _ = self.active_member.remove_label_values(&[member]);
        let _ = self.member_synced.remove_label_values(&[member]);
        let _ = self.member_drained.remove_label_values(&[member]);
        for reason in ["hold", "sync"] {
            let _ = self.failback_held.remove_label_values(&[member, reason]);
        }
        for check in checks {
            let _ = self.check_up.remove_label_values(&[member, check]);
            let _ = self
                .checks_inconclusive
                .remove_label_values(&[member, check]);
        }
    }

    /// A configuration reload: `applied` or `rejected`.
    pub fn reload(&self, outcome: &str) {
        self.reloads.with_label_values(&[outcome]).inc();
    }

    pub fn member_up(&self, member: &str, up: bool) {
        self.member_up.with_label_values(&[member]).set(up.into());
    }

    pub fn active_member(&self, member: &str, active: bool) {
        self.active_member
            .with_label_values(&[member])
            .set(active.into());
    }

    pub fn switched(&self, from: &str, to: &str, reason: &str) {
        self.switches.with_label_values(&[from, to, reason]).inc();
        self.route_epoch.inc();
    }

    /// `n` reports of `kind`, by the confirming probe's `outcome`: `confirmed`,
    /// `dismissed` or `inconclusive`.
    pub fn passive_signals(&self, member: &str, kind: &str, outcome: &str, n: u64) {
        self.passive_signals
            .with_label_values(&[member, kind, outcome])
            .inc_by(n);
    }

    /// The member's refusals total, as its checker last sampled it.
    pub fn refusals(&self, member: &str, total: u64) {
        let counter = self.refusals.with_label_values(&[member]);
        counter.inc_by(total.saturating_sub(counter.get()));
    }

    /// One run of a check: its duration and whether it passed.
    pub fn check(&self, member: &str, check: &str, seconds: f64, passed: bool) {
        self.check_duration
            .with_label_values(&[member, check])
            .observe(seconds);
        self.check_up
            .with_label_values(&[member, check])
            .set(passed.into());
    }

    /// A failed check run not counted: the failure was this process's own.
    pub fn check_inconclusive(&self, member: &str, check: &str) {
        self.checks_inconclusive
            .with_label_values(&[member, check])
            .inc();
    }

    pub fn member_synced(&self, member: &str, synced: bool) {
        self.member_synced
            .with_label_values(&[member])
            .set(synced.into());
    }

    pub fn replication_lag(&self, from: &str, to: &str, seconds: f64) {
        self.replication_lag
            .with_label_values(&[from, to])
            .set(seconds);
    }

    /// Why failback to `member` is held (`None`: it is not).
    pub fn failback_held(&self, member: &str, reason: Option<&str>) {
        for r in ["hold", "sync"] {
            let held = reason == Some(r);
            self.failback_held
                .with_label_values(&[member, r])
                .set(held.into());
        }
    }

    /// The command duration histogram of one member, resolved once per upstream.
    pub fn command_duration(&self, member: &str) -> Histogram {
        self.command_duration.with_label_values(&[member])
    }

    /// The command counter of one member, resolved once per upstream (not per command).
    pub fn commands(&self, member: &str) -> IntCounter {
        self.commands.with_label_values(&[member])
    }

    pub fn member_drained(&self, member: &str, drained: bool) {
        self.member_drained
            .with_label_values(&[member])
            .set(drained.into());
    }

    pub fn leader(&self, serving: bool) {
        self.leader.set(serving.into());
    }

    pub fn pool(&self, quorum: bool, proxies: usize) {
        self.pool_quorum.set(quorum.into());
        self.pool_proxies.set(proxies as i64);
    }

    pub fn peer_reachable(&self, peer: &str, reachable: bool) {
        self.peer_reachable
            .with_label_values(&[peer])
            .set(reachable.into());
    }

    /// An operator request carried out.
    pub fn operation(&self, name: &str) {
        self.operations.with_label_values(&[name]).inc();
    }

    /// A command the policy refused (`command`: a configured name, so the label is bounded).
    pub fn denied(&self, command: &str) {
        self.denied_commands.with_label_values(&[command]).inc();
    }

    pub fn inflight_errors(&self, member: &str, n: u64) {
        self.inflight_errors.with_label_values(&[member]).inc_by(n);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for valid metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
