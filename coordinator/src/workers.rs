//! The shell around the [`Supervisor`]: the worker API listener (one task
//! per connection) and the supervisor task, which feeds observations to the
//! pure core and carries out its actions: proposals (queued to the Raft node
//! and never awaited inline: their outcomes come back as observations),
//! directives, and checkpoint files (on one thread, in order).
//!
//! Only the leader supervises: a worker that registers with a follower is
//! told where the leader is; when leadership is lost, every worker
//! connection is closed so the workers find the new leader.

use crate::api::WorkerView;
use crate::metrics::Metrics;
use crate::node::{NodeHandle, Role};
use crate::state::Event;
use crate::supervisor::{
    Action, ConnId, FileWork, Now, Observation, ProposalKey, Registration, Supervisor, SupervisorConfig,
};
use flotilla_shared::frame::Tokens;
use flotilla_shared::ids::{CheckpointId, Generation, JobName};
use flotilla_shared::layout::{JobDir, Manifest, MANIFEST_FILE};
use flotilla_shared::shard::read_header;
use flotilla_shared::tls::{NodeTls, Stream};
use flotilla_shared::wire::{CoordinatorMessage, ErrorCode, ErrorReply, ForRank, WorkerMessage};
use futures::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the supervisor last knew of each job, for `/v1/status`.
#[derive(Clone, Default)]
pub struct WorkersView(Arc<RwLock<BTreeMap<JobName, JobView>>>);

/// One job as the supervisor last saw it.
#[derive(Clone, Default)]
struct JobView {
    workers: Vec<WorkerView>,
    /// The generation the job ran in, and since when.
    running_since: Option<(Generation, u64)>,
}

impl WorkersView {
    /// The workers of `job` as the supervisor last saw them.
    pub fn get(&self, job: &JobName) -> Vec<WorkerView> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(job)
            .map(|v| v.workers.clone())
            .unwrap_or_default()
    }

    /// When the supervisor first saw `job` running in `generation` (ms
    /// since the epoch).
    pub fn running_since_ms(&self, job: &JobName, generation: Generation) -> Option<u64> {
        let views = self.0.read().unwrap_or_else(|e| e.into_inner());
        let (g, at) = views.get(job)?.running_since?;
        (g == generation).then_some(at)
    }
}

/// Input of the supervisor task.
pub enum SupervisorInput {
    /// A worker connection registered; directives for it go to `tx`,
    /// tagged with `conn` (the ranks of a node session share one queue).
    Connected {
        /// Connection (or one rank of a node session).
        conn: ConnId,
        /// Its outbound queue.
        tx: Outbox,
    },
    /// Something happened.
    Observe(Observation),
    /// A proposal's outcome: the applied events, or none (refused or failed).
    Proposed {
        /// Which proposal.
        key: ProposalKey,
        /// What it changed.
        events: Vec<Event>,
    },
}

/// A directive, or the request to close the connection after the ones before it.
pub type CoordinatorMessageOrClose = Option<CoordinatorMessage>;

/// A connection's outbound queue: directives tagged with the `ConnId` they
/// are for (a node session's ranks each have their own).
pub type Outbox = mpsc::Sender<(ConnId, CoordinatorMessageOrClose)>;

/// A handle to send observations (e.g. operator requests) to the supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    tx: mpsc::Sender<SupervisorInput>,
}

impl SupervisorHandle {
    /// Passes an observation to the supervisor.
    pub async fn observe(&self, obs: Observation) {
        let _ = self.tx.send(SupervisorInput::Observe(obs)).await;
    }
}

/// The supervisor's clock: monotonic for deadlines, wall time for the ledger.
struct Clock(Instant);

impl Clock {
    fn now(&self) -> Now {
        Now { mono_ms: self.0.elapsed().as_millis() as u64, wall_ms: Manifest::now_unix_ms() }
    }
}

/// Starts the supervisor task; returns its handle and the workers view.
pub fn start_supervisor(
    node: NodeHandle,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> (SupervisorHandle, WorkersView, mpsc::Sender<SupervisorInput>) {
    let (tx, rx) = mpsc::channel(4096);
    let view = WorkersView::default();
    let files = start_file_worker(node.clone(), tx.clone());
    tokio::spawn(run_supervisor(node, rx, tx.clone(), files, view.clone(), metrics, shutdown));
    (SupervisorHandle { tx: tx.clone() }, view, tx)
}

/// When the next reconcile may run. A reconcile visits every rank, so with
/// thousands of ranks it is the supervisor's main cost. One is run soon
/// after anything but heartbeats arrives, yet no sooner after the last one
/// than four times what that one took: reconciling takes at most about a
/// fifth of the task, and what arrives meanwhile is judged together.
#[derive(Default)]
struct ReconcilePace {
    /// A reconcile is wanted at this instant.
    due: Option<tokio::time::Instant>,
    /// When the last reconcile ended, and what it took.
    last: Option<(tokio::time::Instant, Duration)>,
}

impl ReconcilePace {
    /// Something arrived that a reconcile must judge.
    fn want(&mut self) {
        if self.due.is_none() {
            let (at, cost) = self.last.unwrap_or((tokio::time::Instant::now(), Duration::ZERO));
            self.due = Some(at + cost * 4);
        }
    }

    /// Runs a reconcile (which also answers any wanted one), timing it.
    fn run<T>(&mut self, reconcile: impl FnOnce() -> T) -> T {
        self.due = None;
        let started = tokio::time::Instant::now();
        let out = reconcile();
        self.last = Some((tokio::time::Instant::now(), started.elapsed()));
        out
    }
}

/// Observations taken in at once at most (a bound on one turn's latency).
const MAX_BATCH: usize = 4096;

async fn run_supervisor(
    node: NodeHandle,
    mut rx: mpsc::Receiver<SupervisorInput>,
    inputs: mpsc::Sender<SupervisorInput>,
    files: std::sync::mpsc::Sender<(JobName, FileWork)>,
    view: WorkersView,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let clock = Clock(Instant::now());
    let mut sup: Option<Supervisor> = None;
    // when each job's restore was decided, for the recovery histogram
    let mut restoring_since: HashMap<JobName, Instant> = HashMap::new();
    let mut conns: HashMap<ConnId, Outbox> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pace = ReconcilePace::default();
    loop {
        let mut actions: Vec<Action> = Vec::new();
        let mut ticked = false;
        let due = pace.due;
        // inputs first: every heartbeat already received is counted before
        // the tick judges deadlines
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                if let Some(s) = sup.as_mut() {
                    actions = pace.run(|| node.read_state(|st| s.tick(st, clock.now())));
                }
                pace.due = None;
            }
            input = rx.recv() => {
                let Some(first) = input else { return };
                // everything already queued is taken in together, and judged
                // by one reconcile (below)
                let mut batch = Vec::new();
                let mut next = Some(first);
                while let Some(input) = next {
                    match input {
                        SupervisorInput::Connected { conn, tx } => { conns.insert(conn, tx); }
                        SupervisorInput::Proposed { key, events } => {
                            observe_events(&metrics, &mut restoring_since, &events);
                            batch.push(Observation::ProposalDone { key });
                        }
                        SupervisorInput::Observe(obs) => {
                            if let Observation::Disconnected { conn } = &obs {
                                conns.remove(conn);
                            }
                            batch.push(obs);
                        }
                    }
                    next = if batch.len() < MAX_BATCH { rx.try_recv().ok() } else { None };
                }
                // a replica that became leader since the last tick
                // supervises from its first input: registrations are not
                // turned away for want of a tick
                if sup.is_none() && node.status().role == Role::Leader {
                    sup = Some(start_supervising(&node, &clock));
                }
                if let Some(s) = sup.as_mut() {
                    let wanted;
                    (actions, wanted) = node.read_state(|st| s.take_batch(st, clock.now(), batch));
                    if wanted {
                        pace.want();
                    }
                } else {
                    for obs in batch {
                        if let Observation::Registered(Registration { conn, .. }) = obs {
                            // leadership moved between accept and now
                            if let Some(tx) = conns.remove(&conn) {
                                let _ = tx.try_send((conn, None));
                            }
                        }
                    }
                }
            },
            _ = tick.tick() => {
                ticked = true;
                let status = node.status();
                match (&mut sup, status.role == Role::Leader) {
                    (None, true) => sup = Some(start_supervising(&node, &clock)),
                    (Some(_), false) => {
                        tracing::info!("lost leadership: closing worker connections");
                        sup = None;
                        for (conn, tx) in conns.drain() {
                            let _ = tx.try_send((conn, None));
                        }
                    }
                    _ => {}
                }
                if let Some(s) = sup.as_mut() {
                    actions = pace.run(|| node.read_state(|st| s.tick(st, clock.now())));
                }
            }
        }
        let Some(s) = sup.as_ref() else { continue };
        for action in actions {
            match action {
                Action::Propose(cmd) => {
                    let Some(key) = ProposalKey::of(&cmd) else { continue };
                    tracing::debug!(?cmd, "proposing");
                    let outcome = node.submit(cmd);
                    let inputs = inputs.clone();
                    tokio::spawn(async move {
                        let events = match outcome.await {
                            Ok(Ok(Ok(events))) => events,
                            Ok(Ok(Err(refusal))) => {
                                tracing::debug!("proposal refused: {refusal}");
                                Vec::new()
                            }
                            Ok(Err(e)) => {
                                tracing::warn!("proposal failed: {e}");
                                Vec::new()
                            }
                            Err(_) => Vec::new(),
                        };
                        let _ = inputs.send(SupervisorInput::Proposed { key, events }).await;
                    });
                }
                Action::Send { conn, msg } => {
                    if let Some(tx) = conns.get(&conn) {
                        if tx.try_send((conn, Some(msg))).is_err() {
                            tracing::warn!(
                                conn,
                                "worker connection is not draining its directives; closing it"
                            );
                            conns.remove(&conn);
                        }
                    }
                }
                Action::Close { conn } => {
                    if let Some(tx) = conns.remove(&conn) {
                        let _ = tx.try_send((conn, None));
                    }
                }
                Action::Files { job, work } => {
                    let _ = files.send((job, work));
                }
            }
        }
        // the status view follows the tick (every 100 ms), not every heartbeat
        if ticked {
            publish_view(&node, s, &view, clock.now());
        }
    }
}

/// The supervisor of a replica that has just become leader.
fn start_supervising(node: &NodeHandle, clock: &Clock) -> Supervisor {
    let term = node.status().term;
    tracing::info!(term, "became leader: supervising workers");
    Supervisor::new(SupervisorConfig::default(), clock.now(), term)
}

/// Starts the thread that brings checkpoint files in line with the ledger,
/// one piece of work at a time in the order the supervisor asked (a
/// manifest before the LATEST that names it).
fn start_file_worker(
    node: NodeHandle,
    inputs: mpsc::Sender<SupervisorInput>,
) -> std::sync::mpsc::Sender<(JobName, FileWork)> {
    let (tx, rx) = std::sync::mpsc::channel::<(JobName, FileWork)>();
    let spawned = std::thread::Builder::new().name("flotilla-files".into()).spawn(move || {
        while let Ok((job, work)) = rx.recv() {
            if let Err(e) = file_work(&node, &job, work) {
                tracing::error!(%job, ?work, "checkpoint file work failed (retried): {e}");
                let _ =
                    inputs.blocking_send(SupervisorInput::Observe(Observation::FileWorkFailed { job, work }));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the checkpoint file thread: {e}");
    }
    tx
}

/// Fills in each rank's per-variable list (SPEC §3), which the ledger does
/// not keep, from the shard's header. The ledger's whole-file checksum
/// stays the authority: a header that was changed since makes `flotilla
/// inspect` fail on that checksum. A rank whose header cannot be read keeps
/// an empty list, and its shard is still verified by the whole-file checksum.
fn with_tensor_lists(m: &mut Manifest, checkpoint_dir: &std::path::Path) {
    for shard in m.ranks.iter_mut().filter(|s| s.tensors.is_empty()) {
        let label = format!("checkpoint {} rank {}", m.id, shard.rank);
        match read_header(&checkpoint_dir.join(&shard.file), &label).map(|h| h.records()) {
            Ok(Some(records)) => shard.tensors = records,
            Ok(None) => tracing::warn!(
                "{label}: its header has no checksums; MANIFEST.json lists no variables for it"
            ),
            Err(e) => tracing::warn!("{e}; MANIFEST.json lists no variables for it"),
        }
    }
}

fn file_work(node: &NodeHandle, job: &JobName, work: FileWork) -> std::io::Result<()> {
    let found = node.read_state(|st| {
        let j = st.jobs.get(job)?;
        let dir = JobDir::new(&j.spec.checkpoint.root, &j.spec.name);
        let manifest = match work {
            FileWork::Manifest(id) => j.checkpoints.get(&id).map(|c| {
                let at = c.ended_ms.unwrap_or_else(Manifest::now_unix_ms);
                Manifest {
                    job: job.clone(),
                    id,
                    step: c.step,
                    generation: c.generation,
                    world_size: j.spec.world_size,
                    created: Manifest::format_time(at),
                    created_unix_ms: at,
                    ranks: c.shards.clone(),
                }
            }),
            _ => None,
        };
        Some((dir, manifest))
    });
    let Some((dir, manifest)) = found else { return Ok(()) };
    let ignore_missing = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    match work {
        FileWork::Manifest(id) => match manifest {
            Some(_) if !dir.checkpoint_dir(id).is_dir() => {
                tracing::error!(%job, checkpoint = %id, "committed checkpoint's directory {} is missing", dir.checkpoint_dir(id).display());
                Ok(())
            }
            Some(mut m) => {
                let ckpt = dir.checkpoint_dir(id);
                with_tensor_lists(&mut m, &ckpt);
                m.write(&ckpt).map_err(std::io::Error::other)
            }
            None => Ok(()),
        },
        FileWork::Condemn(id) => {
            tracing::warn!(%job, checkpoint = %id, "condemned: removing its MANIFEST.json");
            ignore_missing(std::fs::remove_file(dir.checkpoint_dir(id).join(MANIFEST_FILE)))
        }
        FileWork::Delete(id) => {
            let path = dir.checkpoint_dir(id);
            let result = ignore_missing(std::fs::remove_dir_all(&path));
            if result.is_ok() {
                tracing::debug!("deleted {}", path.display());
            }
            result
        }
        FileWork::Sweep(_) => {
            let known = node.read_state(|st| {
                st.jobs
                    .get(job)
                    .map(|j| (j.checkpoints.keys().copied().collect::<Vec<_>>(), j.next_checkpoint))
            });
            let Some((known, next)) = known else { return Ok(()) };
            for id in sweep(&dir, &known, next)? {
                tracing::debug!(%job, checkpoint = %id, "swept its directory");
            }
            Ok(())
        }
        FileWork::Latest(Some(id)) => dir.write_latest(id).map_err(std::io::Error::other),
        FileWork::Latest(None) => ignore_missing(std::fs::remove_file(dir.latest_path())),
    }
}

/// Deletes the directories of checkpoint ids the ledger handed out (below
/// `next`) and no longer knows (their tombstones were pruned); returns them.
fn sweep(dir: &JobDir, known: &[CheckpointId], next: CheckpointId) -> std::io::Result<Vec<CheckpointId>> {
    let mut swept = Vec::new();
    for (id, path) in dir.list_checkpoint_dirs().map_err(std::io::Error::other)? {
        if id < next && !known.contains(&id) {
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => swept.push(id),
            }
        }
    }
    Ok(swept)
}

fn observe_events(metrics: &Metrics, restoring_since: &mut HashMap<JobName, Instant>, events: &[Event]) {
    use crate::state::JobState;
    for event in events {
        match event {
            Event::CheckpointCommitted { job, duration_ms, .. } => {
                metrics
                    .checkpoint_seconds
                    .with_label_values(&[job.as_str()])
                    .observe(*duration_ms as f64 / 1e3);
            }
            Event::Restoring { job, .. } => {
                // a restore that restarts keeps the first decision's time
                restoring_since.entry(job.clone()).or_insert_with(Instant::now);
            }
            Event::JobState { job, state: JobState::Running } => {
                if let Some(since) = restoring_since.remove(job) {
                    metrics
                        .recovery_seconds
                        .with_label_values(&[job.as_str()])
                        .observe(since.elapsed().as_secs_f64());
                }
            }
            _ => {}
        }
    }
}

fn publish_view(node: &NodeHandle, s: &Supervisor, view: &WorkersView, now: crate::supervisor::Now) {
    let snapshot: BTreeMap<JobName, JobView> = node.read_state(|st| {
        st.jobs
            .values()
            .map(|j| {
                let workers = s
                    .rank_views(&j.spec.name, j.generation, now)
                    .into_iter()
                    .map(|r| WorkerView {
                        rank: r.rank,
                        state: r.state,
                        step: r.step,
                        heartbeat_age_ms: Some(r.heartbeat_age_ms),
                    })
                    .collect();
                let running_since =
                    s.running_since_ms(&j.spec.name, j.generation).map(|at| (j.generation, at));
                (j.spec.name.clone(), JobView { workers, running_since })
            })
            .collect()
    });
    *view.0.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
}

/// Worker connections a replica holds at most (one per rank).
pub const MAX_WORKER_CONNECTIONS: usize = 16_384;
/// A worker connection with no frame for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves the worker API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    node: NodeHandle,
    token: Option<Tokens>,
    tls: Option<NodeTls>,
    supervisor: mpsc::Sender<SupervisorInput>,
    sessions: prometheus::IntGaugeVec,
    shutdown: CancellationToken,
) {
    // connection ids, and one per rank of each node session
    let ids = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_WORKER_CONNECTIONS));
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = crate::transport::accept(&listener, "worker API") => accepted,
        };
        let Some(slot) = crate::transport::admit(&slots, "worker API", remote) else { continue };
        let (ids, node, token, tls, supervisor, sessions, shutdown) = (
            ids.clone(),
            node.clone(),
            token.clone(),
            tls.clone(),
            supervisor.clone(),
            sessions.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let stream = match tls {
                Some(tls) => match tls.accept_api(stream).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%remote, "worker connection: TLS handshake failed: {e} (workers need --tls-ca)");
                        return;
                    }
                },
                None => Stream::Left(stream),
            };
            if let Err(e) = serve_worker(stream, &ids, node, token, supervisor, &sessions, shutdown).await {
                tracing::warn!(%remote, "worker connection closed: {e}");
            }
            drop(slot);
        });
    }
}

type WorkerConn = flotilla_shared::frame::Connection<Stream, WorkerMessage, CoordinatorMessage>;

/// Counts a registered worker session in `flotilla_worker_sessions` for
/// as long as it lives.
struct SessionGauge(prometheus::IntGauge);

impl SessionGauge {
    fn open(sessions: &prometheus::IntGaugeVec, kind: &str) -> Self {
        let gauge = sessions.with_label_values(&[kind]);
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve_worker(
    stream: Stream,
    ids: &AtomicU64,
    node: NodeHandle,
    token: Option<Tokens>,
    supervisor: mpsc::Sender<SupervisorInput>,
    sessions: &prometheus::IntGaugeVec,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let me = node.status().id;
    let (mut conn, first) = flotilla_shared::frame::accept_worker(stream, me, token.as_ref()).await?;
    let node_session = match &first {
        WorkerMessage::Register { .. } => false,
        WorkerMessage::Batch(items)
            if !items.is_empty() && items.iter().all(|i| matches!(i.msg, WorkerMessage::Register { .. })) =>
        {
            true
        }
        _ => {
            let reply = ErrorReply {
                code: ErrorCode::InvalidRequest,
                message: "the first message must be Register, or a Batch of Registers (a node session)"
                    .into(),
            };
            let _ = conn.send(CoordinatorMessage::Error(reply)).await;
            return Err("first message was not Register".into());
        }
    };
    let status = node.status();
    if status.role != Role::Leader {
        let leader = status
            .leader_id
            .and_then(|l| node.read_state(|st| st.nodes.get(&l).and_then(|n| n.api_addr.clone())));
        let _ = conn.send(CoordinatorMessage::NotLeader { leader }).await;
        return Ok(());
    }
    let inputs = Inputs(supervisor);
    let _open = SessionGauge::open(sessions, if node_session { "node" } else { "rank" });
    if node_session {
        let WorkerMessage::Batch(items) = first else { unreachable!("checked above") };
        return serve_node(conn, ids, items, node, inputs, shutdown).await;
    }
    let conn_id = ids.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, mut rx) = mpsc::channel(1024);
    if !inputs.register(conn_id, &tx, first).await {
        return Ok(());
    }
    // a registered worker heartbeats every heartbeat_interval_ms; one timer,
    // pushed back by every frame from the worker
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = &mut idle => break Err(format!("silent for {IDLE_TIMEOUT:?}; closed")),
            frame = conn.next() => match frame {
                None => break Ok(()),
                Some(Err(e)) => break Err(e.to_string()),
                Some(Ok(WorkerMessage::Batch(_) | WorkerMessage::Left)) => {
                    break Err("Batch and Left belong to node sessions; this connection registered one rank".into())
                }
                Some(Ok(msg)) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                    // a heartbeat is answered at once while this replica leads;
                    // a deposed or partitioned leader's silence tells the worker to move
                    if matches!(msg, WorkerMessage::Heartbeat { .. }) {
                        if node.status().role != Role::Leader {
                            break Ok(());
                        }
                        if let Err(e) = conn.send(CoordinatorMessage::Alive).await {
                            break Err(e.to_string());
                        }
                    }
                    if !inputs.message(conn_id, msg).await {
                        break Ok(());
                    }
                }
            },
            out = rx.recv() => match out {
                Some((_, Some(msg))) => {
                    if let Err(e) = conn.send(msg).await {
                        break Err(e.to_string());
                    }
                }
                Some((_, None)) | None => break Ok(()),
            },
        }
    };
    inputs.disconnected(conn_id).await;
    result
}

/// What a connection tells the supervisor.
struct Inputs(mpsc::Sender<SupervisorInput>);

impl Inputs {
    /// A rank registered on `conn` (`msg` is its `Register`); false when
    /// the supervisor is gone.
    async fn register(&self, conn: ConnId, tx: &Outbox, msg: WorkerMessage) -> bool {
        let WorkerMessage::Register { job, rank, incarnation, generation, step, .. } = msg else {
            return true;
        };
        let registration = Registration { conn, job, rank, incarnation, generation, step };
        self.0.send(SupervisorInput::Connected { conn, tx: tx.clone() }).await.is_ok()
            && self.0.send(SupervisorInput::Observe(Observation::Registered(registration))).await.is_ok()
    }

    async fn message(&self, conn: ConnId, msg: WorkerMessage) -> bool {
        self.0.send(SupervisorInput::Observe(Observation::Message { conn, msg })).await.is_ok()
    }

    async fn disconnected(&self, conn: ConnId) {
        let _ = self.0.send(SupervisorInput::Observe(Observation::Disconnected { conn })).await;
    }
}

/// Directives a node session sends in one frame at most.
const NODE_BATCH_MAX: usize = 1024;

/// A node session: one connection for every rank a host runs. Each rank
/// gets its own `ConnId`, so the supervisor sees N ranks as it sees N
/// connections; the session only opens and packs envelopes. Heartbeats of
/// all ranks arrive in one frame and get one `Alive`; directives queued at
/// once leave in one frame. The connection ends when its last rank is
/// closed (by the supervisor: leadership lost, a rank taken over) or left.
async fn serve_node(
    mut conn: WorkerConn,
    ids: &AtomicU64,
    first: Vec<ForRank<WorkerMessage>>,
    node: NodeHandle,
    inputs: Inputs,
    shutdown: CancellationToken,
) -> Result<(), String> {
    use flotilla_shared::ids::Rank;
    // a directive for every rank of a large node fits, several times over
    let (tx, mut rx) = mpsc::channel::<(ConnId, CoordinatorMessageOrClose)>(64 * NODE_BATCH_MAX);
    // each rank's current ConnId, and the rank of every ConnId still open
    let mut lanes: HashMap<Rank, ConnId> = HashMap::new();
    let mut rank_of: HashMap<ConnId, Rank> = HashMap::new();
    let mut pending = Some(first);
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    let result = loop {
        // the registrations that opened the session, then each frame
        let items = match pending.take() {
            Some(items) => items,
            None => tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = &mut idle => break Err(format!("node session silent for {IDLE_TIMEOUT:?}; closed")),
                frame = conn.next() => match frame {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(e.to_string()),
                    Some(Ok(WorkerMessage::Batch(items))) => items,
                    Some(Ok(_)) => break Err("a node session carries only Batch frames".into()),
                },
                out = rx.recv() => {
                    let Some(first) = out else { break Ok(()) };
                    // everything queued now leaves together, in order
                    let mut batch = Vec::new();
                    let mut next = Some(first);
                    while let Some((id, msg)) = next {
                        match (rank_of.get(&id).copied(), msg) {
                            (Some(rank), Some(msg)) => batch.push(ForRank { rank, msg }),
                            (Some(rank), None) => {
                                rank_of.remove(&id);
                                if lanes.get(&rank) == Some(&id) {
                                    // the rank's registration is over (refused, or
                                    // this leader is stepping down): the node must
                                    // register it again before its messages count
                                    lanes.remove(&rank);
                                    let message = format!(
                                        "rank {rank}'s registration was closed by the leader; register it again"
                                    );
                                    let reply = ErrorReply { code: ErrorCode::Unavailable, message };
                                    batch.push(ForRank { rank, msg: CoordinatorMessage::Error(reply) });
                                }
                            }
                            (None, _) => {}
                        }
                        next = if batch.len() < NODE_BATCH_MAX { rx.try_recv().ok() } else { None };
                    }
                    if !batch.is_empty() {
                        if let Err(e) = conn.send(CoordinatorMessage::Batch(batch)).await {
                            break Err(e.to_string());
                        }
                    }
                    if rank_of.is_empty() {
                        break Ok(());
                    }
                    continue;
                }
            },
        };
        idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
        let mut heartbeats = false;
        let mut refused = Vec::new();
        let mut malformed = false;
        for ForRank { rank, msg } in items {
            match msg {
                msg @ WorkerMessage::Register { rank, .. } => {
                    // a rank registering again (its process restarted) gets a
                    // new id; the supervisor closes the old one
                    let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
                    lanes.insert(rank, id);
                    rank_of.insert(id, rank);
                    if !inputs.register(id, &tx, msg).await {
                        return Ok(());
                    }
                }
                WorkerMessage::Left => {
                    if let Some(id) = lanes.remove(&rank) {
                        rank_of.remove(&id);
                        inputs.disconnected(id).await;
                    }
                }
                WorkerMessage::Batch(_) => {
                    malformed = true;
                    break;
                }
                msg => {
                    let Some(&id) = lanes.get(&rank) else {
                        let message =
                            format!("rank {rank} is not registered on this node session; register it first");
                        refused.push(ForRank {
                            rank,
                            msg: CoordinatorMessage::Error(ErrorReply {
                                code: ErrorCode::InvalidRequest,
                                message,
                            }),
                        });
                        continue;
                    };
                    heartbeats |= matches!(msg, WorkerMessage::Heartbeat { .. });
                    if !inputs.message(id, msg).await {
                        return Ok(());
                    }
                }
            }
        }
        if malformed {
            // closed like any session: every rank's Disconnected below
            break Err("a Batch inside a Batch".into());
        }
        if heartbeats {
            // as for one rank: a deposed leader falls silent, and the node moves
            if node.status().role != Role::Leader {
                break Ok(());
            }
            if let Err(e) = conn.send(CoordinatorMessage::Alive).await {
                break Err(e.to_string());
            }
        }
        if !refused.is_empty() {
            if let Err(e) = conn.send(CoordinatorMessage::Batch(refused)).await {
                break Err(e.to_string());
            }
        }
        if rank_of.is_empty() {
            break Ok(());
        }
    };
    for id in rank_of.into_keys() {
        inputs.disconnected(id).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_deletes_only_directories_of_forgotten_ids() {
        let root = tempfile::tempdir().unwrap();
        let dir = JobDir::new(root.path(), &JobName::new("a").unwrap());
        for id in 1..=6 {
            std::fs::create_dir_all(dir.checkpoint_dir(CheckpointId(id))).unwrap();
        }
        std::fs::write(dir.checkpoint_dir(CheckpointId(2)).join("rank-00000.safetensors"), b"x").unwrap();
        // known: 3 and 5; 6 is beyond what the ledger handed out (a
        // checkpoint being begun elsewhere is never swept)
        let known = [CheckpointId(3), CheckpointId(5)];
        let swept = sweep(&dir, &known, CheckpointId(6)).unwrap();
        assert_eq!(swept, [CheckpointId(1), CheckpointId(2), CheckpointId(4)]);
        let left: Vec<CheckpointId> =
            dir.list_checkpoint_dirs().unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(left, [CheckpointId(3), CheckpointId(5), CheckpointId(6)]);
        // nothing left to do the second time; a missing root is no error
        assert!(sweep(&dir, &known, CheckpointId(6)).unwrap().is_empty());
        let gone = JobDir::new(&root.path().join("nowhere"), &JobName::new("a").unwrap());
        assert!(sweep(&gone, &known, CheckpointId(6)).unwrap().is_empty());
    }
}
