//! The admin HTTP port: `/live`, `/ready`, `/metrics` and `GET /v1/status`.
//!
//! It reads snapshots (members' status, the route) and never touches the data path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Failback, Mode};
use crate::health;
use crate::member::Members;
use crate::metrics::Metrics;
use crate::router::Route;

/// What the admin handlers read.
pub struct AdminState {
    pub members: Arc<Members>,
    pub route: watch::Receiver<Route>,
    pub metrics: Metrics,
    /// False once shutdown began: `/ready` answers 503 so load balancers move away.
    pub serving: Arc<AtomicBool>,
    pub mode: Mode,
    pub failback: Failback,
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn run(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
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
    failback: Failback,
    serving: bool,
    epoch: u64,
    active_member: Option<String>,
    members: Vec<MemberStatus>,
}

#[derive(Serialize)]
struct MemberStatus {
    id: String,
    address: String,
    region: Option<String>,
    state: health::State,
    /// Seconds in the current state.
    state_seconds: f64,
    active: bool,
    last_error: Option<String>,
    last_check_seconds: Option<f64>,
    /// Commands in the member's own `COMMAND` table; 0 until it is fetched.
    commands: usize,
}

async fn status(State(s): State<Arc<AdminState>>) -> Json<Status> {
    let route = *s.route.borrow();
    let members = s
        .members
        .list
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let st = m.status();
            MemberStatus {
                id: m.id().to_string(),
                address: m.config.address.clone(),
                region: m.config.region.clone(),
                state: st.state,
                state_seconds: st.since.elapsed().as_secs_f64(),
                active: route.member == Some(i),
                last_error: st.last_error,
                last_check_seconds: st.last_check_seconds,
                commands: m.command_table().len,
            }
        })
        .collect();
    Json(Status {
        mode: s.mode,
        failback: s.failback,
        serving: s.serving.load(Ordering::Relaxed),
        epoch: route.epoch,
        active_member: route.member.map(|i| s.members.get(i).id().to_string()),
        members,
    })
}
