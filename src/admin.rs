//! The admin HTTP port: `/live`, `/ready`, `/metrics`, `GET /v1/status`, and the
//! operator's requests `POST /v1/switchover`, `POST /v1/members/{id}/drain`,
//! `POST /v1/members/{id}/enable` and `POST /v1/reload`.
//!
//! It reads snapshots (members' status, the route, the last switches) and never touches the
//! data path; an operation is a request to the router, which decides. Writes need
//! `admin.token` (compared in constant time) when it is set; one operation at a time (else
//! 409); each accepted one is logged and counted. Errors are JSON `{error_code, description}`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Failback, Mode, Secret};
use crate::health;
use crate::health::replication::MatrixView;
use crate::health::verdict::CheckStatus;
use crate::member::Roster;
use crate::metrics::Metrics;
use crate::modes::pooled::{Judgement, PoolView};
use crate::reload::{MatrixCell, Reload, ReloadError};
use crate::router::{
    DrainedCell, Gate, GateCell, History, Operation, OperatorError, OperatorRequest, Route,
    SwitchRecord,
};

/// What the admin handlers read.
pub struct AdminState {
    pub members: Arc<Roster>,
    pub route: watch::Receiver<Route>,
    pub metrics: Metrics,
    /// False once shutdown began: `/ready` answers 503 so load balancers move away.
    pub serving: Arc<AtomicBool>,
    pub mode: Mode,
    pub failback: Failback,
    /// `admin.token`: required (as `Authorization: Bearer ...`) by every POST when set.
    pub token: Option<Secret>,
    pub operations: mpsc::Sender<OperatorRequest>,
    /// Reload requests, to the reloader.
    pub reloads: mpsc::Sender<Reload>,
    /// An operation is being decided: another one gets 409.
    pub operating: AtomicBool,
    /// Members drained by an operator, as the router published them.
    pub drained: Arc<DrainedCell>,
    pub history: Arc<History>,
    /// The failback gate, as the router last saw it.
    pub gate: Arc<GateCell>,
    /// The replication check's lag matrix, when it is on.
    pub matrix: Arc<MatrixCell>,
    /// Pooled mode: the pool's judgement of the members.
    pub pool: Option<Arc<PoolView>>,
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn run(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/switchover", post(switchover))
        .route("/v1/members/{id}/{action}", post(member_action))
        .route("/v1/reload", post(reload))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint") })
        .with_state(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "admin server failed");
    }
}

/// A JSON error body `{error_code, description}`.
fn error(status: StatusCode, code: &str, description: &str) -> Response {
    let body = serde_json::json!({ "error_code": code, "description": description });
    (status, Json(body)).into_response()
}

async fn ready(State(s): State<Arc<AdminState>>) -> Response {
    if !s.serving.load(Ordering::Relaxed) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "geoproxy is shutting down",
        );
    }
    if s.route.borrow().standby {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "standby",
            "this proxy is a standby (centralized mode)",
        );
    }
    if s.route.borrow().member.is_none() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_member",
            "no member is available",
        );
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct Status {
    mode: Mode,
    /// `active` (serving) or `standby` (centralized mode, not holding the lease).
    role: &'static str,
    failback: Failback,
    serving: bool,
    epoch: u64,
    active_member: Option<String>,
    members: Vec<MemberStatus>,
    /// The last switches, oldest first, each with its time and reason.
    switches: Vec<SwitchRecord>,
    /// Why traffic does not return to a more preferred member that is up (absent: it
    /// does, or there is none).
    failback_gate: Option<GateStatus>,
    /// The replication check's lag matrix (absent when the check is off).
    replication: Option<MatrixView>,
    /// Pooled mode: live proxies seen, whether they make a quorum, and the down votes per
    /// member (`null` in other modes).
    pool: Option<Judgement>,
}

#[derive(Serialize)]
struct GateStatus {
    member: String,
    /// `hold` (its `failback_after`, longer after a flap) or `sync` (its sync checks).
    reason: &'static str,
    /// In words: "replication from eu-west: 4.2 s behind (tolerance 2s)".
    why: String,
}

#[derive(Serialize)]
struct MemberStatus {
    id: String,
    address: String,
    region: Option<String>,
    state: health::State,
    /// Why it is down (`check:ping`, `passive:connection_lost`, ...), while it is.
    cause: Option<String>,
    /// Seconds in the current state.
    state_seconds: f64,
    active: bool,
    /// Taken out of the preference by an operator (`/v1/members/{id}/drain`).
    drained: bool,
    last_error: Option<String>,
    last_check_seconds: Option<f64>,
    /// Commands in the member's own `COMMAND` table; 0 until it is fetched.
    commands: usize,
    /// Every sync check passes (true when none is configured).
    synced: bool,
    /// Why not, while it is not.
    unsynced_because: Option<String>,
    /// Each check's verdict: name, kind, role, state, last error and duration.
    checks: Vec<CheckStatus>,
}

async fn status(State(s): State<Arc<AdminState>>) -> Json<Status> {
    let route = *s.route.borrow();
    let drained = s.drained.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let roster = s.members.load();
    let members = roster
        .iter()
        .map(|(i, m)| {
            let st = m.status();
            MemberStatus {
                id: m.id().to_string(),
                address: m.config.address.clone(),
                region: m.config.region.clone(),
                state: st.state,
                cause: st.cause.map(|c| c.to_string()),
                state_seconds: st.since.elapsed().as_secs_f64(),
                active: route.member == Some(i),
                drained: drained.get(i).copied().unwrap_or(false),
                last_error: st.last_error,
                last_check_seconds: st.last_check_seconds,
                commands: m.command_table().len,
                synced: st.synced,
                unsynced_because: st.unsynced_because,
                checks: st.checks,
            }
        })
        .collect();
    let gate = *s.gate.lock().unwrap_or_else(|e| e.into_inner());
    let failback_gate = gate.map(|(i, gate)| {
        let member = roster.get(i);
        let why = match gate {
            Gate::Hold { until } => format!(
                "up for less than its hold: {:.1} s more",
                until
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
            ),
            Gate::Sync => member.status().unsynced_because.unwrap_or_default(),
        };
        GateStatus {
            member: member.id().to_string(),
            reason: gate.label(),
            why,
        }
    });
    Json(Status {
        mode: s.mode,
        role: if route.standby { "standby" } else { "active" },
        failback: s.failback,
        serving: s.serving.load(Ordering::Relaxed),
        epoch: route.epoch,
        active_member: route.member.map(|i| roster.get(i).id().to_string()),
        members,
        switches: s.history.list(),
        failback_gate,
        replication: s
            .matrix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.view()),
        pool: s.pool.as_ref().map(|p| p.judgement()),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchoverBody {
    to: String,
}

/// How long an operator's request waits for the router's answer.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// `POST /v1/switchover {"to": id}`: send traffic to a healthy member (reason `operator`),
/// and stay there (no automatic failback) until it fails.
async fn switchover(State(s): State<Arc<AdminState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(denied) = authorize(&s, &headers) {
        return denied;
    }
    let to = match serde_json::from_slice::<SwitchoverBody>(&body) {
        Ok(b) => b.to,
        Err(e) => {
            let why = format!("expected {{\"to\": \"<member id>\"}}: {e}");
            return error(StatusCode::BAD_REQUEST, "bad_request", &why);
        }
    };
    operate(&s, &to, Operation::Switchover).await
}

/// `POST /v1/members/{id}/drain`: take the member out of the preference until enabled;
/// traffic leaves it now if it is active (sessions move at their quiescent points).
/// `POST /v1/members/{id}/enable`: the member is back in the preference (failback rules
/// apply from the moment traffic left it).
async fn member_action(
    State(s): State<Arc<AdminState>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let op: fn(usize) -> Operation = match action.as_str() {
        "drain" => Operation::Drain,
        "enable" => Operation::Enable,
        _ => return error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    };
    if let Some(denied) = authorize(&s, &headers) {
        return denied;
    }
    operate(&s, &id, op).await
}

/// Asks the router to carry out an operation on member `id`; one at a time.
async fn operate(s: &AdminState, id: &str, op: fn(usize) -> Operation) -> Response {
    let Some(idx) = s.members.load().find(id) else {
        let why = format!("no member has the id \"{id}\"");
        return error(StatusCode::NOT_FOUND, "unknown_member", &why);
    };
    let op = op(idx);
    let outcome = one_at_a_time(s, &s.operations, |reply| OperatorRequest { op, reply });
    let Some(outcome) = outcome.await else {
        let why = "another operation is being decided";
        return error(StatusCode::CONFLICT, "switch_in_progress", why);
    };
    let name = op.name();
    match outcome {
        Some(Ok(route)) => {
            s.metrics.operation(name);
            tracing::info!(
                operation = name,
                member = id,
                epoch = route.epoch,
                "operator request carried out"
            );
            let roster = s.members.load();
            let active = route.member.map(|i| roster.get(i).id());
            let body = serde_json::json!({ "operation": name, "member": id, "active_member": active, "epoch": route.epoch });
            (StatusCode::OK, Json(body)).into_response()
        }
        Some(Err(e)) => {
            let (status, code) = match e {
                OperatorError::UnknownMember => (StatusCode::NOT_FOUND, "unknown_member"),
                OperatorError::NotHealthy => (StatusCode::CONFLICT, "member_not_healthy"),
                OperatorError::Drained => (StatusCode::CONFLICT, "member_drained"),
                OperatorError::LastMember => (StatusCode::CONFLICT, "last_member"),
                OperatorError::Standby => (StatusCode::CONFLICT, "standby"),
            };
            error(status, code, &format!("{name} of \"{id}\" refused: {e}"))
        }
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "router_unavailable",
            "the router did not answer (shutting down?)",
        ),
    }
}

/// `POST /v1/reload`: read the configuration file again and apply its members and health
/// (see [`crate::reload`]); the answer lists what changed and what needs a restart. An
/// invalid file gets 400 and the running configuration stays.
async fn reload(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = authorize(&s, &headers) {
        return denied;
    }
    let outcome = one_at_a_time(&s, &s.reloads, |reply| Reload { reply: Some(reply) });
    let Some(outcome) = outcome.await else {
        let why = "another operation is being carried out";
        return error(StatusCode::CONFLICT, "operation_in_progress", why);
    };
    match outcome {
        Some(Ok(done)) => {
            s.metrics.operation("reload");
            (StatusCode::OK, Json(done)).into_response()
        }
        Some(Err(e @ ReloadError::Invalid(_))) => {
            error(StatusCode::BAD_REQUEST, "invalid_config", &e.to_string())
        }
        Some(Err(e @ ReloadError::NoFile)) => {
            error(StatusCode::CONFLICT, "no_config_file", &e.to_string())
        }
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "reloader_unavailable",
            "the reloader did not answer (shutting down?)",
        ),
    }
}

/// Sends a request (made around its reply channel) to the control task behind `to` and
/// waits, bounded, for its outcome, one operation at a time. `None`: another operation is
/// under way; `Some(None)`: the task did not answer (shutting down?).
async fn one_at_a_time<T, R>(
    s: &AdminState,
    to: &mpsc::Sender<T>,
    request: impl FnOnce(oneshot::Sender<R>) -> T,
) -> Option<Option<R>> {
    if s.operating.swap(true, Ordering::AcqRel) {
        return None;
    }
    let (reply, outcome) = oneshot::channel();
    let outcome = match to.send(request(reply)).await {
        Ok(()) => tokio::time::timeout(OPERATION_TIMEOUT, outcome)
            .await
            .ok()
            .and_then(Result::ok),
        Err(_) => None,
    };
    s.operating.store(false, Ordering::Release);
    Some(outcome)
}

/// `None` when the request may write; else the 401 to answer.
fn authorize(s: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let token = s.token.as_ref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let matches = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.expose().as_bytes())));
    if matches {
        return None;
    }
    Some(error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this endpoint needs Authorization: Bearer <admin.token>",
    ))
}
