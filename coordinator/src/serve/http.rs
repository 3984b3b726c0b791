//! The coordinator's HTTP API (SPEC §4): health, status, metrics, and the
//! admin mutations, which need the token and are served by the leader only
//! (a follower answers 421 with the leader's URL).

use crate::api::{ClusterStatus, ErrorBody, ReplicasView, SubmitReply};
use crate::ledger::{CheckpointState, Command, Event, JobState, RefusalKind};
use crate::metrics::Metrics;
use crate::raft::node::{MembershipChange, NodeHandle, ProposeError, Role};
use crate::supervise::task::{SupervisorHandle, WorkersView};
use crate::supervise::{CheckpointOutcome, Observation};
use axum::extract::Path;
use axum::extract::{Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use flotilla_shared::frame::Tokens;
use flotilla_shared::ids::{CheckpointId, Generation, JobName, NodeId};
use flotilla_shared::layout::{JobDir, Manifest};
use flotilla_shared::shard::Shard;
use flotilla_shared::spec::JobSpec;
use flotilla_shared::tls::{NodeTls, Stream};
use serde::Deserialize;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What every handler needs.
#[derive(Clone)]
pub struct HttpState {
    /// The Raft node.
    pub node: NodeHandle,
    /// The admin tokens, where there are some.
    pub token: Option<Tokens>,
    /// This process's metrics.
    pub metrics: Metrics,
    /// The supervisor, for operator requests.
    pub supervisor: SupervisorHandle,
    /// The supervisor's view of the workers.
    pub workers: WorkersView,
    /// The Raft addresses in this replica's `--peers`.
    pub peers: Vec<(NodeId, String)>,
}

/// The router with every endpoint.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{job}", delete(delete_job))
        .route("/v1/jobs/{job}/cancel", post(cancel))
        .route("/v1/jobs/{job}/checkpoint", post(checkpoint))
        .route("/v1/jobs/{job}/restore", post(restore))
        .route("/v1/jobs/{job}/checkpoints/{id}/verify", post(verify))
        .route("/v1/replicas", get(replicas))
        .route("/v1/replicas/{id}", post(add_replica))
        .route("/v1/replicas/{id}/promote", post(promote_replica))
        .route("/v1/replicas/{id}/remove", post(remove_replica))
        .with_state(state)
}

/// Serves HTTP on `listener` until `shutdown`.
/// Connections the HTTP API serves at once; more are turned away.
pub const MAX_HTTP_CONNECTIONS: usize = 1024;
/// A connection that sends no complete request head for this long (idle
/// between requests, or a slow client) is closed.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the API on `listener` (HTTPS with `tls`) until `shutdown`, then
/// lets requests in flight finish for a few seconds.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    tls: Option<NodeTls>,
    shutdown: CancellationToken,
) {
    let app = router(state);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = crate::raft::transport::accept(&listener, "HTTP API") => accepted,
        };
        let Some(slot) = crate::raft::transport::admit(&slots, "HTTP API", remote) else { continue };
        let (app, tls, watcher) = (app.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            let stream = match tls {
                Some(tls) => match tls.accept_api(tcp).await {
                    Ok(s) => s,
                    Err(e) => return tracing::debug!(%remote, "HTTPS handshake failed: {e}"),
                },
                None => Stream::Left(tcp),
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HTTP_IDLE_TIMEOUT);
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%remote, "HTTP connection: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await.is_err() {
        tracing::debug!("HTTP API: requests still in flight after 5 s; closing them");
    }
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
    let leader = s.node.status().role == Role::Leader;
    s.node.read_state(|st| {
        s.metrics.observe_ledger(st, &|job| (s.workers.get(job), s.workers.spares(job)), leader)
    });
    s.metrics.observe_peers(&s.node.membership().progress);
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
    let mut status = s.node.read_state(|state| ClusterStatus::build(&node, state, job.as_ref()));
    for j in &mut status.jobs {
        j.workers = s.workers.get(&j.name);
        j.spares = s.workers.spares(&j.name);
        j.last_recovery = s.workers.last_recovery(&j.name);
        if let (Some(from), Some(rec)) = (j.restored_from.as_mut(), j.last_recovery) {
            from.source = rec.source.filter(|_| rec.generation == j.generation);
        }
        // the view follows the ledger by up to a tick: only a job running
        // in that same generation has it
        j.running_since_ms =
            s.workers.running_since_ms(&j.name, j.generation).filter(|_| j.state == JobState::Running);
        if j.state != JobState::Succeeded && j.workers.len() == j.world_size as usize {
            j.step = j.workers.iter().map(|w| w.step).min().unwrap_or_default();
            j.step_source = crate::api::StepSource::Ranks;
        }
    }
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
        Some(got) if want.accepts(got.trim()) => None,
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
    let read = spec.clone();
    let origin = match tokio::task::spawn_blocking(move || crate::serve::origin::read_origin(&read)).await {
        Ok(Ok(origin)) => origin,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match s.node.propose(Command::SubmitJob { spec, now_ms, origin }).await {
        Ok(Ok(events)) => {
            let created = events.iter().any(|e| matches!(e, Event::JobSubmitted { .. }));
            let code = if created { StatusCode::CREATED } else { StatusCode::OK };
            (code, Json(SubmitReply { job, created })).into_response()
        }
        Ok(Err(refusal)) => error(refusal_status(refusal.kind), refusal.message),
        Err(e) => propose_error(e),
    }
}

/// The checks every per-job admin request passes: the token, a valid job
/// name, and this replica being the leader.
fn admin_request(s: &HttpState, headers: &HeaderMap, job: &str) -> Result<JobName, Box<Response>> {
    if let Some(r) = unauthorized(s, headers) {
        return Err(Box::new(r));
    }
    let job = JobName::new(job).map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e.to_string())))?;
    match not_leader(s) {
        Some(r) => Err(Box::new(r)),
        None => Ok(job),
    }
}

/// `POST /v1/jobs/{job}/checkpoint`: asks for a checkpoint now and waits
/// until it is committed (200 `{"id", "step"}`) or aborted (409). The
/// supervisor decides (refusals, placing again, the deadline); this only
/// waits for its answer.
async fn checkpoint(
    AxumState(s): AxumState<HttpState>,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Response {
    let job = match admin_request(&s, &headers, &job) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    match s.supervisor.checkpoint_now(job.clone()).await {
        Some(CheckpointOutcome::Committed { id, step }) => {
            // answered once the disk agrees (the supervisor writes
            // MANIFEST.json and LATEST after the commit), so that what
            // the CLI says is what `inspect` finds
            let found = s.node.read_state(|st| {
                let j = st.jobs.get(&job)?;
                let committed = j.checkpoints.get(&id)?.state == CheckpointState::Committed;
                committed.then(|| JobDir::new(&j.spec.checkpoint.root, &j.spec.name))
            });
            let written = match found {
                Some(dir) => on_disk(&dir, id, true).await,
                None => false,
            };
            Json(serde_json::json!({"id": id, "step": step, "manifest_written": written})).into_response()
        }
        Some(CheckpointOutcome::Refused(refusal)) => error(refusal_status(refusal.kind), refusal.message),
        Some(CheckpointOutcome::Failed(e)) => error(StatusCode::CONFLICT, e),
        Some(CheckpointOutcome::TimedOut(e)) => error(StatusCode::GATEWAY_TIMEOUT, e),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this replica stopped leading while job {job}'s checkpoint was pending; ask again"),
        ),
    }
}

#[derive(Deserialize, Default)]
struct RestoreBody {
    checkpoint: Option<CheckpointId>,
}

/// `POST /v1/jobs/{job}/restore`: an operator's whole-job restore, from the
/// latest committed checkpoint or `{"checkpoint": ID}`.
async fn restore(
    AxumState(s): AxumState<HttpState>,
    headers: HeaderMap,
    Path(job): Path<String>,
    body: String,
) -> Response {
    let job = match admin_request(&s, &headers, &job) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let body: RestoreBody = if body.trim().is_empty() {
        RestoreBody::default()
    } else {
        match serde_json::from_str(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("body must be {{\"checkpoint\": ID}} or empty: {e}"),
                )
            }
        }
    };
    let Some(current) = s.node.read_state(|st| st.jobs.get(&job).map(|j| j.generation)) else {
        return error(StatusCode::NOT_FOUND, format!("no job named {job}"));
    };
    let generation = Generation(current.0 + 1);
    // the ledger decides (and refuses at once what cannot be restored);
    // "the latest" is resolved when the restore is applied
    let cmd = Command::OperatorRestore {
        job: job.clone(),
        generation,
        from: body.checkpoint,
        now_ms: Manifest::now_unix_ms(),
    };
    match s.node.propose(cmd).await {
        Ok(Ok(_)) => {
            let from = s.node.read_state(|st| st.jobs.get(&job).and_then(|j| j.restored_from));
            Json(serde_json::json!({"job": job, "generation": generation, "checkpoint": from}))
                .into_response()
        }
        Ok(Err(refusal)) => error(refusal_status(refusal.kind), refusal.message),
        Err(e) => propose_error(e),
    }
}

/// `POST /v1/jobs/{job}/cancel`: the job becomes `cancelled` (its pending
/// checkpoint aborted, its workers told to stop); 409 for a job already
/// ended, 404 for no such job. Answers `{"job", "state", "aborted"}`.
async fn cancel(AxumState(s): AxumState<HttpState>, headers: HeaderMap, Path(job): Path<String>) -> Response {
    let job = match admin_request(&s, &headers, &job) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let cmd = Command::CancelJob { job: job.clone(), now_ms: Manifest::now_unix_ms() };
    match s.node.propose(cmd).await {
        Ok(Ok(events)) => {
            let aborted: Vec<CheckpointId> = events
                .iter()
                .filter_map(|e| match e {
                    Event::CheckpointAborted { id, .. } => Some(*id),
                    _ => None,
                })
                .collect();
            // the aborted checkpoint's files go at once; the stop follows
            // from the ledger on the supervisor's next reconcile
            s.supervisor.observe(Observation::Applied { events }).await;
            Json(serde_json::json!({"job": job, "state": "cancelled", "aborted": aborted})).into_response()
        }
        Ok(Err(refusal)) => error(refusal_status(refusal.kind), refusal.message),
        Err(e) => propose_error(e),
    }
}

#[derive(Deserialize, Default)]
struct DeleteQuery {
    #[serde(default)]
    remove_checkpoints: bool,
}

/// How long a delete with `remove_checkpoints` waits for the job's
/// directory to be gone before it answers anyway.
const REMOVE_WAIT: Duration = Duration::from_secs(30);

/// `DELETE /v1/jobs/{job}?remove_checkpoints=true`: removes a terminal job
/// from the ledger (409 for a live one: cancel it first), and with
/// `remove_checkpoints` its directory `<root>/<job>/`, answered once it is
/// gone (`removed`, false when that took longer than [`REMOVE_WAIT`]).
/// Answers `{"job", "dir", "remove_checkpoints", "removed"}`.
async fn delete_job(
    AxumState(s): AxumState<HttpState>,
    headers: HeaderMap,
    Path(job): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    let job = match admin_request(&s, &headers, &job) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let cmd = Command::DeleteJob { job: job.clone(), remove_checkpoints: q.remove_checkpoints };
    match s.node.propose(cmd).await {
        Ok(Ok(events)) => {
            let dir = events.iter().find_map(|e| match e {
                Event::JobDeleted { root, .. } => Some(JobDir::new(root, &job).path().to_path_buf()),
                _ => None,
            });
            s.supervisor.observe(Observation::Applied { events }).await;
            let removed = match (&dir, q.remove_checkpoints) {
                (Some(dir), true) => disk_agrees(REMOVE_WAIT, || !dir.exists()).await,
                _ => false,
            };
            Json(serde_json::json!({
                "job": job,
                "dir": dir,
                "remove_checkpoints": q.remove_checkpoints,
                "removed": removed,
            }))
            .into_response()
        }
        Ok(Err(refusal)) => error(refusal_status(refusal.kind), refusal.message),
        Err(e) => propose_error(e),
    }
}

/// How long a checkpoint or a verify waits for the checkpoint's
/// MANIFEST.json (and LATEST) to be on disk before it answers anyway.
const MANIFEST_WAIT: Duration = Duration::from_secs(10);

/// Waits, at most [`MANIFEST_WAIT`], until committed checkpoint `id` is on
/// disk as the ledger has it: its MANIFEST.json written and, with `latest`,
/// LATEST naming it or a newer one. Whether it got there.
async fn on_disk(dir: &JobDir, id: CheckpointId, latest: bool) -> bool {
    disk_agrees(MANIFEST_WAIT, || {
        dir.checkpoint_dir(id).join(flotilla_shared::layout::MANIFEST_FILE).exists()
            && (!latest || dir.read_latest().ok().flatten().is_some_and(|l| l >= id))
    })
    .await
}

/// Looks at the disk every 50 ms, at most `wait`, until `there` holds (the
/// leader's file threads do the work after the ledger's change); whether
/// it came to hold.
async fn disk_agrees(wait: Duration, there: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if there() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /v1/jobs/{job}/checkpoints/{id}/verify`: re-reads every shard of a
/// condemned checkpoint against the ledger's checksums (on the leader, which
/// reaches the checkpoint root); when every one matches (the damage was
/// repaired, or the verdict came from a bad read), the verdict is cleared and
/// the checkpoint is committed again; the answer comes once its MANIFEST.json
/// is back on disk (`manifest_written`, false when that took longer than
/// [`MANIFEST_WAIT`]). 409 with the first damage otherwise.
async fn verify(
    AxumState(s): AxumState<HttpState>,
    headers: HeaderMap,
    Path((job, id)): Path<(String, u64)>,
) -> Response {
    let job = match admin_request(&s, &headers, &job) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let id = CheckpointId(id);
    // the ledger's own rule, asked before any shard is read
    let found = s.node.read_state(|st| {
        let (j, c) = st.clearable(&job, id)?;
        Ok::<_, crate::ledger::Refusal>((
            JobDir::new(&j.spec.checkpoint.root, &j.spec.name),
            c.shards.clone(),
        ))
    });
    let (job_dir, shards) = match found {
        Ok(f) => f,
        Err(refusal) => return error(refusal_status(refusal.kind), refusal.message),
    };
    let dir = job_dir.checkpoint_dir(id);
    let checked = tokio::task::spawn_blocking(move || {
        shards.iter().try_for_each(|m| {
            let label = format!("checkpoint {id} rank {}", m.rank);
            let path = dir.join(&m.file);
            Shard::read_verified(&path, &label, m)
                .map(|_| ())
                .map_err(|e| format!("{e} (file {})", path.display()))
        })
    })
    .await;
    match checked {
        Ok(Ok(())) => {}
        Ok(Err(damage)) => return error(StatusCode::CONFLICT, format!("still damaged: {damage}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("verification failed: {e}")),
    }
    let cmd = Command::ClearCorrupt { job: job.clone(), id, now_ms: Manifest::now_unix_ms() };
    match s.node.propose(cmd).await {
        Ok(Ok(_)) => {
            let state = s.node.read_state(|st| {
                st.jobs.get(&job).and_then(|j| j.checkpoints.get(&id)).map(|c| c.state.as_str())
            });
            // the supervisor writes MANIFEST.json back once it sees the
            // verdict cleared (its file work, after the commit): answer once
            // it is on disk, so that what the CLI says is what `inspect`
            // finds, or say that it is not there yet (LATEST need not name
            // it: a newer checkpoint may be the latest)
            let written = on_disk(&job_dir, id, false).await;
            Json(serde_json::json!({"job": job, "id": id, "state": state, "manifest_written": written}))
                .into_response()
        }
        Ok(Err(refusal)) => error(refusal_status(refusal.kind), refusal.message),
        Err(e) => propose_error(e),
    }
}

/// `GET /v1/replicas`: the membership (voters, learners, their addresses)
/// and, on the leader, each member's replication progress.
async fn replicas(AxumState(s): AxumState<HttpState>) -> Response {
    let node = s.node.status();
    let membership = s.node.membership();
    let mut addresses: std::collections::BTreeMap<NodeId, String> = s.peers.iter().cloned().collect();
    s.node.read_state(|st| addresses.extend(st.replicas.iter().map(|(id, a)| (*id, a.clone()))));
    Json(ReplicasView {
        node_id: node.id,
        role: node.role,
        leader_id: node.leader_id,
        commit_index: node.commit_index,
        voters: membership.voters,
        learners: membership.learners,
        progress: membership.progress,
        addresses,
    })
    .into_response()
}

#[derive(Deserialize)]
struct AddReplica {
    raft_addr: String,
}

/// `POST /v1/replicas/{id}` `{"raft_addr": "HOST:PORT"}`: adds a learner.
async fn add_replica(
    AxumState(s): AxumState<HttpState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    body: String,
) -> Response {
    let add: AddReplica = match serde_json::from_str(&body) {
        Ok(a) => a,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("expected {{\"raft_addr\": \"HOST:PORT\"}}: {e}"))
        }
    };
    if add.raft_addr.parse::<std::net::SocketAddr>().is_err() && !add.raft_addr.contains(':') {
        return error(StatusCode::BAD_REQUEST, format!("raft_addr {:?} is not HOST:PORT", add.raft_addr));
    }
    change_membership(&s, &headers, id, |id| MembershipChange::AddLearner { id, raft_addr: add.raft_addr })
        .await
}

/// `POST /v1/replicas/{id}/promote`: a learner becomes a voter.
async fn promote_replica(
    AxumState(s): AxumState<HttpState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    change_membership(&s, &headers, id, |id| MembershipChange::Promote { id }).await
}

/// `POST /v1/replicas/{id}/remove`: a voter or learner leaves.
async fn remove_replica(
    AxumState(s): AxumState<HttpState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    change_membership(&s, &headers, id, |id| MembershipChange::Remove { id }).await
}

async fn change_membership(
    s: &HttpState,
    headers: &HeaderMap,
    id: u64,
    change: impl FnOnce(NodeId) -> MembershipChange,
) -> Response {
    if let Some(r) = unauthorized(s, headers) {
        return r;
    }
    if id == 0 || id > u64::from(u16::MAX) {
        return error(StatusCode::BAD_REQUEST, format!("replica id {id} is out of range (1..65535)"));
    }
    if let Some(r) = not_leader(s) {
        return r;
    }
    let change = change(NodeId(id));
    match s.node.change_membership(change.clone()).await {
        Ok(Ok(_)) => Json(serde_json::json!({"applied": change})).into_response(),
        Ok(Err(refusal)) => error(refusal_status(refusal.kind), refusal.message),
        Err(ProposeError::Dropped) => error(
            StatusCode::CONFLICT,
            "the change was not applied: another membership change is in progress, or leadership moved; retry",
        ),
        Err(e) => propose_error(e),
    }
}
