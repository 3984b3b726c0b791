//! The coordinator's HTTP API (SPEC §4): health, status, metrics, and the
//! admin mutations, which need the token and are served by the leader only
//! (a follower answers 421 with the leader's URL).

use crate::api::{ClusterStatus, ErrorBody, SubmitReply};
use crate::metrics::Metrics;
use crate::node::{NodeHandle, ProposeError, Role};
use crate::state::{Command, Event, RefusalKind};
use axum::extract::{Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_shared::ids::JobName;
use flotilla_shared::spec::JobSpec;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What every handler needs.
#[derive(Clone)]
pub struct HttpState {
    /// The Raft node.
    pub node: NodeHandle,
    /// The cluster token, where there is one.
    pub token: Option<String>,
    /// This process's metrics.
    pub metrics: Metrics,
}

/// The router with every endpoint.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/jobs", post(submit))
        .with_state(state)
}

/// Serves HTTP on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(ErrorBody { error: message.into(), leader: None })).into_response()
}

async fn readyz(AxumState(s): AxumState<HttpState>) -> Response {
    match s.node.status().leader_id {
        Some(leader) => (StatusCode::OK, format!("ready: leader is node {leader}\n")).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "not ready: no leader known\n").into_response(),
    }
}

async fn metrics(AxumState(s): AxumState<HttpState>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.encode()).into_response()
}

#[derive(Deserialize)]
struct StatusQuery {
    job: Option<String>,
}

async fn status(AxumState(s): AxumState<HttpState>, Query(q): Query<StatusQuery>) -> Response {
    let job = match q.job.map(JobName::new).transpose() {
        Ok(job) => job,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let node = s.node.status();
    let status = s.node.read_state(|state| ClusterStatus::build(&node, state, job.as_ref()));
    if let Some(name) = &job {
        if status.jobs.is_empty() {
            return error(
                StatusCode::NOT_FOUND,
                format!("no job named {name}; list jobs with flotilla status"),
            );
        }
    }
    Json(status).into_response()
}

/// Checks the bearer token; `Some` is the 401 to send.
fn unauthorized(s: &HttpState, headers: &HeaderMap) -> Option<Response> {
    let want = s.token.as_ref()?;
    let got = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match got {
        Some(got) if flotilla_shared::frame::token_eq(want, got.trim()) => None,
        _ => Some(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send `Authorization: Bearer <token>` (the CLI: --token-file)",
        )),
    }
}

/// Mutations go to the leader; `Some` is the 421 (or 503) to send.
fn not_leader(s: &HttpState) -> Option<Response> {
    let node = s.node.status();
    if node.role == Role::Leader {
        return None;
    }
    let leader =
        node.leader_id.and_then(|l| s.node.read_state(|st| st.nodes.get(&l).map(|n| n.http_url.clone())));
    match (node.leader_id, leader) {
        (Some(id), url) => Some(
            (
                StatusCode::MISDIRECTED_REQUEST,
                Json(ErrorBody {
                    error: format!("this replica is not the leader; node {id} is"),
                    leader: url,
                }),
            )
                .into_response(),
        ),
        (None, _) => Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no leader is known yet (election in progress); retry shortly",
        )),
    }
}

fn propose_error(e: ProposeError) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn refusal_status(kind: RefusalKind) -> StatusCode {
    match kind {
        RefusalKind::NotFound => StatusCode::NOT_FOUND,
        RefusalKind::Conflict | RefusalKind::Fenced => StatusCode::CONFLICT,
        RefusalKind::Invalid => StatusCode::BAD_REQUEST,
    }
}

async fn submit(AxumState(s): AxumState<HttpState>, headers: HeaderMap, body: String) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    let spec = match JobSpec::from_toml(&body) {
        Ok(spec) => spec,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(r) = not_leader(&s) {
        return r;
    }
    let job = spec.name.clone();
    let now_ms = flotilla_shared::layout::Manifest::now_unix_ms();
    match s.node.propose(Command::SubmitJob { spec, now_ms }).await {
        Ok(Ok(events)) => {
            let created = events.iter().any(|e| matches!(e, Event::JobSubmitted { .. }));
            let code = if created { StatusCode::CREATED } else { StatusCode::OK };
            (code, Json(SubmitReply { job, created })).into_response()
        }
        Ok(Err(refusal)) => error(refusal_status(refusal.kind), refusal.message),
        Err(e) => propose_error(e),
    }
}
