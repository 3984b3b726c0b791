//! The worker agent: one connection to the coordinator leader.
//!
//! ```text
//! connect (any coordinator) → Hello → Register{job, rank, incarnation, generation, step}
//!   ← NotLeader{leader}: go there      ← Registered{spec, generation}: start the trainer thread
//! loop: heartbeat every heartbeat_interval_ms; directives → trainer thread;
//!       trainer events → coordinator (saved shards and the final digest are
//!       re-reported after every registration: reports are idempotent)
//! any error: reconnect through the coordinator list with backoff
//! ```
//! Directives are idempotent (the leader re-sends them until it sees them
//! done). A report answered `Stale` is dropped and the worker carries on; it
//! never exits because of one. It follows no leader of an older Raft term
//! than one it already followed. The worker exits 0 on `Stop` (job over) and
//! 1 only when a newer process of the same rank took over (`Fenced`). A
//! trainer thread that dies is reported (status `failed`) and started again
//! on the next restore.

use crate::copies::{self, CopyState, CopyStore};
use crate::device::{self, DeviceMemory, Reading};
pub use crate::error::WorkerError;
use crate::exec::{ExecOptions, ExecRunner};
use crate::metrics::WorkerMetrics;
use crate::runner::{Runner, RunnerCmd, RunnerState};
use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flotilla_shared::frame::{client_handshake, Connection, DEFAULT_MAX_FRAME};
use flotilla_shared::ids::{CheckpointId, Generation, Incarnation, JobName, Rank};
use flotilla_shared::spec::JobSpec;
use flotilla_shared::tls::Stream;
use flotilla_shared::wire::{CoordinatorMessage, ErrorCode, PeerRole, WorkerMessage, WorkerStatus};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Everything `flotilla worker` is told.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinators' worker API addresses.
    pub coordinators: Vec<String>,
    /// The job.
    pub job: JobName,
    /// This worker's rank (`None`: `--spare`, a worker for the job without
    /// a rank until the leader gives it one).
    pub rank: Option<Rank>,
    /// The host it runs on (`--host`, default the hostname), for status
    /// and for placing memory copies away from it.
    pub host: String,
    /// Where this worker's HTTP (status, metrics) listens.
    pub http_addr: Option<String>,
    /// The worker token.
    pub token: Option<String>,
    /// `--tls-ca`: the coordinators serve the worker API over TLS, with
    /// certificates of this CA naming the host each is reached by.
    pub tls: Option<flotilla_shared::tls::ClientTls>,
    /// GPU index or UUID for NVML.
    pub gpu: Option<String>,
    /// Refuse to run without NVML.
    pub require_gpu: bool,
    /// `FLOTILLA_DEVICE_FREE_BYTES`, if set.
    pub free_override: Option<String>,
    /// `--exec`: run this external trainer instead of the built-in one.
    pub exec: Option<ExecOptions>,
}

/// What `/v1/status` shows.
#[derive(Debug, Clone, Serialize)]
struct StatusView {
    job: JobName,
    /// The rank it holds (`None`: a spare).
    rank: Option<Rank>,
    host: String,
    incarnation: Incarnation,
    registered: bool,
    coordinator: Option<String>,
    generation: Option<Generation>,
    step: u64,
    state: String,
    device: Option<Reading>,
    device_warning: Option<String>,
    /// The `--exec` trainer process, while one runs.
    trainer_pid: Option<u32>,
    /// Why this rank's last restore was refused (the job is blocked on
    /// it), until a restore succeeds.
    restore_refused: Option<String>,
    /// The device memory the last restore's precheck needed, in bytes
    /// (`device.free` is the reading it was compared with).
    restore_need_bytes: Option<u64>,
    /// Other ranks' shards held here, and the last copy refused and why.
    memory_copies: Option<copies::CopyStatus>,
}

#[derive(Clone)]
struct Shared {
    view: Arc<Mutex<StatusView>>,
    runner: Arc<RunnerState>,
    metrics: WorkerMetrics,
    /// Other ranks' shards held here (the memory tier).
    copies: Arc<CopyStore>,
}

enum SessionEnd {
    Stop(String),
    Redirect(Option<String>),
}

/// Runs the worker until the job ends, it is fenced, or `shutdown`.
pub async fn run(opts: WorkerOptions, shutdown: CancellationToken) -> crate::Result<()> {
    if opts.coordinators.is_empty() {
        return Err(WorkerError::Config("--coordinators is empty; list the coordinators' --api-addr".into()));
    }
    let device: Arc<dyn DeviceMemory> =
        Arc::from(device::open(opts.gpu.as_deref(), opts.require_gpu, opts.free_override.as_deref())?);
    let metrics = WorkerMetrics::for_worker(opts.job.as_str(), opts.rank);
    let reading = device.read().ok();
    if let Some(r) = &reading {
        metrics.observe_device(r);
    }
    let device_warning = reading.as_ref().and_then(|r| {
        let mut w = Vec::new();
        if r.source == device::Source::Host {
            w.push("NVML not available: restores check host memory, not a GPU".to_string());
        }
        if let Some(f) = r.free_override {
            w.push(format!("{}={f} is in force", device::FREE_BYTES_OVERRIDE));
        }
        (!w.is_empty()).then(|| w.join("; "))
    });
    // larger is newer: start time in ms, then the pid to tell apart two
    // processes started in the same millisecond
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let incarnation = Incarnation((millis << 20) | (u64::from(std::process::id()) & 0xf_ffff));
    let runner_state = Arc::new(RunnerState::default());
    let shared = Shared {
        view: Arc::new(Mutex::new(StatusView {
            job: opts.job.clone(),
            rank: opts.rank,
            host: opts.host.clone(),
            incarnation,
            registered: false,
            coordinator: None,
            generation: None,
            step: 0,
            state: "waiting".into(),
            device: reading,
            device_warning,
            trainer_pid: None,
            restore_refused: None,
            restore_need_bytes: None,
            memory_copies: None,
        })),
        runner: runner_state.clone(),
        metrics: metrics.clone(),
        copies: Arc::default(),
    };
    if let Some(addr) = &opts.http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| WorkerError::Config(format!("cannot listen on --http-addr {addr}: {e}")))?;
        let router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/v1/status", get(status))
            .route("/metrics", get(metrics_text))
            .with_state(shared.clone())
            .merge(
                Router::new()
                    .route("/v1/copies/{checkpoint}/{rank}", get(copies::get_copy).put(copies::put_copy))
                    .with_state(CopyState { store: shared.copies.clone(), metrics: metrics.clone() }),
            );
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
    }

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<WorkerMessage>();
    let mut agent = Agent {
        rank: opts.rank,
        opts,
        incarnation,
        device,
        metrics,
        shared,
        runner_state,
        runner: None,
        ev_tx,
        unsent: VecDeque::new(),
        saved: BTreeMap::new(),
        finished: None,
        spec: None,
        max_term: 0,
        host: "127.0.0.1".into(),
    };
    let mut redirect: Option<String> = None;
    let mut next = 0usize;
    let mut backoff = Duration::from_millis(100);
    // a worker started before its job says so once, then every 30 s
    let mut said_waiting: Option<tokio::time::Instant> = None;
    let result = loop {
        let addr = redirect.take().unwrap_or_else(|| {
            let a = agent.opts.coordinators[next % agent.opts.coordinators.len()].clone();
            next += 1;
            a
        });
        let session = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            s = agent.session(&addr, &mut ev_rx) => s,
        };
        agent.shared.view.lock().unwrap_or_else(|e| e.into_inner()).registered = false;
        match session {
            Ok(SessionEnd::Stop(reason)) => {
                tracing::info!("stopping: {reason}");
                break Ok(());
            }
            Ok(SessionEnd::Redirect(leader)) => {
                tracing::info!(%addr, "not the leader; trying {}", leader.as_deref().unwrap_or("the next coordinator"));
                redirect = leader;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(SessionError::Fatal(e)) => break Err(e),
            Err(SessionError::NoJob(why)) => {
                if said_waiting.is_none_or(|at| at.elapsed() >= WAITING_SAID_EVERY) {
                    tracing::info!(%addr, "waiting for the job to be submitted: {why} (asking every {NO_JOB_RETRY:?}, saying so every {WAITING_SAID_EVERY:?})");
                    said_waiting = Some(tokio::time::Instant::now());
                }
                // the leader answered: ask it again, not the followers first
                redirect = Some(addr);
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(NO_JOB_RETRY) => {}
                }
                continue;
            }
            Err(SessionError::Retry(e)) => {
                tracing::warn!(%addr, "coordinator session ended: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        }
        backoff = Duration::from_millis(100);
    };
    if let Some((tx, handle)) = agent.runner.take() {
        let _ = tx.send(RunnerCmd::Stop);
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
    result
}

enum SessionError {
    Retry(String),
    /// The leader does not know the job (yet): wait for it, quietly.
    NoJob(String),
    Fatal(WorkerError),
}

/// How often a worker whose job is not submitted asks again.
const NO_JOB_RETRY: Duration = Duration::from_secs(1);
/// How often it says that it is still waiting.
const WAITING_SAID_EVERY: Duration = Duration::from_secs(30);

impl From<flotilla_shared::frame::FrameError> for SessionError {
    fn from(e: flotilla_shared::frame::FrameError) -> Self {
        SessionError::Retry(e.to_string())
    }
}

struct Agent {
    opts: WorkerOptions,
    /// The rank held now (`None`: a spare): a spare is given one, and a
    /// worker whose rank went to a spare while it was away becomes one.
    rank: Option<Rank>,
    incarnation: Incarnation,
    device: Arc<dyn DeviceMemory>,
    metrics: WorkerMetrics,
    shared: Shared,
    runner_state: Arc<RunnerState>,
    runner: Option<(std::sync::mpsc::Sender<RunnerCmd>, std::thread::JoinHandle<()>)>,
    ev_tx: mpsc::UnboundedSender<WorkerMessage>,
    /// Reports not yet delivered (sent again after a reconnect).
    unsent: VecDeque<WorkerMessage>,
    /// Shards saved in the trainer's generation, by checkpoint: re-reported
    /// after every registration and on a repeated directive.
    saved: BTreeMap<CheckpointId, WorkerMessage>,
    /// The final report, re-sent after every registration.
    finished: Option<WorkerMessage>,
    /// The job's spec, once registered (to start a trainer thread again).
    spec: Option<JobSpec>,
    /// The highest Raft term of a leader this worker followed.
    max_term: u64,
    /// This host's address as the coordinators see it (the local end of
    /// the last connection): where an `--exec` rank 0 hosts its rendezvous.
    host: String,
}

type Conn = Connection<Stream, CoordinatorMessage, WorkerMessage>;

impl Agent {
    async fn session(
        &mut self,
        addr: &str,
        events: &mut mpsc::UnboundedReceiver<WorkerMessage>,
    ) -> Result<SessionEnd, SessionError> {
        let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| SessionError::Retry("connect timed out".into()))?
            .map_err(|e| SessionError::Retry(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        if let Ok(local) = tcp.local_addr() {
            self.host = local.ip().to_string();
        }
        let stream = match &self.opts.tls {
            Some(tls) => tls.connect(tcp, addr).await.map_err(|e| {
                SessionError::Retry(format!(
                    "TLS to {addr}: {e} (the certificate must be of --tls-ca and name this host)"
                ))
            })?,
            None => Stream::Left(tcp),
        };
        let (mut conn, _node): (Conn, _) =
            client_handshake(stream, PeerRole::Worker, self.opts.token.clone(), DEFAULT_MAX_FRAME)
                .await
                .map_err(|e| match e {
                    flotilla_shared::frame::HandshakeError::Refused(r)
                        if r.code == ErrorCode::Unauthorized =>
                    {
                        SessionError::Fatal(WorkerError::Refused(r.message))
                    }
                    // another protocol on that port: no retry can help
                    flotilla_shared::frame::HandshakeError::Frame(f) if f.is_wrong_peer() => {
                        SessionError::Fatal(WorkerError::Config(format!("--coordinators {addr}: {f}")))
                    }
                    other => SessionError::Retry(other.to_string()),
                })?;
        conn.send(WorkerMessage::Register {
            job: self.opts.job.clone(),
            rank: self.rank,
            incarnation: self.incarnation,
            http_addr: self.opts.http_addr.as_deref().map(|a| advertised(a, &self.host)),
            generation: self.runner_state.generation(),
            step: self.runner_state.step(),
            host: Some(self.opts.host.clone()),
        })
        .await?;
        let reply = tokio::time::timeout(Duration::from_secs(10), conn.next())
            .await
            .map_err(|_| SessionError::Retry("no answer to Register".into()))?
            .ok_or_else(|| SessionError::Retry("closed before answering Register".into()))??;
        let (spec, spare) = match reply {
            CoordinatorMessage::Registered { spec, term, spare, .. } => {
                if term < self.max_term {
                    // a deposed leader that does not know it yet
                    return Err(SessionError::Retry(format!(
                        "{addr} leads in term {term}, older than term {} already followed",
                        self.max_term
                    )));
                }
                self.max_term = term;
                (spec, spare)
            }
            CoordinatorMessage::NotLeader { leader } => return Ok(SessionEnd::Redirect(leader)),
            CoordinatorMessage::Error(e) if e.code == ErrorCode::Fenced => {
                return Err(SessionError::Fatal(WorkerError::Fenced(e.message)))
            }
            CoordinatorMessage::Error(e) if e.code == ErrorCode::InvalidRequest => {
                return Err(SessionError::Fatal(WorkerError::Refused(e.message)))
            }
            CoordinatorMessage::Error(e) if e.code == ErrorCode::UnknownJob => {
                return Err(SessionError::NoJob(e.message))
            }
            CoordinatorMessage::Error(e) => return Err(SessionError::Retry(e.message)),
            other => return Err(SessionError::Retry(format!("unexpected answer to Register: {other:?}"))),
        };
        match self.rank {
            Some(rank) if !spare => {
                tracing::info!(%addr, job = %self.opts.job, %rank, term = self.max_term, "registered")
            }
            _ => tracing::info!(%addr, job = %self.opts.job, term = self.max_term, "registered as a spare"),
        }
        if spec.trainer.is_none() && self.opts.exec.is_none() {
            return Err(SessionError::Fatal(WorkerError::Config(format!(
                "job {} has no [trainer] section; the built-in trainer needs one",
                spec.name
            ))));
        }
        self.spec = Some(spec.clone());
        self.shared.copies.set_capacity(spec.checkpoint.memory_copies);
        if spare && self.rank.is_some() {
            self.become_spare().await?;
        }
        if self.runner.is_none() && self.runner_state.status() != WorkerStatus::Failed {
            self.start_runner()?;
        }
        {
            let mut v = self.shared.view.lock().unwrap_or_else(|e| e.into_inner());
            v.registered = true;
            v.coordinator = Some(addr.to_string());
        }
        // what a previous leader may not have seen
        let reports: Vec<WorkerMessage> = self.saved.values().chain(self.finished.iter()).cloned().collect();
        for msg in reports {
            conn.send(msg).await?;
        }
        while let Some(msg) = self.unsent.front().cloned() {
            conn.send(msg).await?;
            self.unsent.pop_front();
        }
        let mut heartbeat = tokio::time::interval(Duration::from_millis(spec.failure.heartbeat_interval_ms));
        // a leader answers every heartbeat; one silent this long is lost to
        // this worker (deposed, crashed, or on the far side of a partition)
        let silence = Duration::from_millis(spec.failure.heartbeat_timeout_ms);
        let mut heard = tokio::time::Instant::now();
        loop {
            if heard.elapsed() > silence {
                return Err(SessionError::Retry(format!(
                    "no word from the coordinator for {} ms; looking for the leader",
                    silence.as_millis()
                )));
            }
            tokio::select! {
                _ = heartbeat.tick() => {
                    self.check_runner();
                    let msg = WorkerMessage::Heartbeat {
                        generation: self.runner_state.generation().unwrap_or(Generation(0)),
                        step: self.runner_state.step(),
                        status: self.runner_state.status(),
                    };
                    conn.send(msg).await?;
                }
                frame = conn.next() => {
                    let msg = frame.ok_or_else(|| SessionError::Retry("the coordinator closed the connection".into()))??;
                    heard = tokio::time::Instant::now();
                    let demoted = matches!(msg, CoordinatorMessage::Registered { spare: true, .. }) && self.rank.is_some();
                    let (end, replies) = self.directive(msg)?;
                    if demoted {
                        self.become_spare().await?;
                        self.start_runner()?;
                    }
                    for reply in replies {
                        conn.send(reply).await?;
                    }
                    if let Some(end) = end {
                        return Ok(end);
                    }
                }
                ev = events.recv() => {
                    let Some(msg) = ev else { return Err(SessionError::Retry("trainer thread gone".into())) };
                    let refused = match &msg {
                        WorkerMessage::RestoreFailed { message, .. } => Some(Some(message.clone())),
                        WorkerMessage::Restored { .. } => Some(None),
                        _ => None,
                    };
                    if let Some(refused) = refused {
                        self.shared.view.lock().unwrap_or_else(|e| e.into_inner()).restore_refused = refused;
                    }
                    match &msg {
                        WorkerMessage::ShardSaved { checkpoint, .. } => {
                            self.saved.insert(*checkpoint, msg.clone());
                        }
                        WorkerMessage::Finished { .. } => self.finished = Some(msg.clone()),
                        _ => {}
                    }
                    if let Err(e) = conn.send(msg.clone()).await {
                        self.unsent.push_back(msg);
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// This worker's rank went to a spare while it was away (or another
    /// process holds it): it drops the rank's trainer and everything it
    /// would have reported, and is a spare from now on. The caller starts
    /// the spare's trainer thread.
    async fn become_spare(&mut self) -> Result<(), SessionError> {
        tracing::warn!(
            rank = ?self.rank,
            "the coordinator says this worker holds no rank (a live worker holds it): becoming a spare"
        );
        self.rank = None;
        self.saved.clear();
        self.finished = None;
        self.unsent.clear();
        if let Some((tx, handle)) = self.runner.take() {
            let _ = tx.send(RunnerCmd::Stop);
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        self.runner_state.publish(flotilla_shared::ids::Step(0), None);
        self.runner_state.set_status(WorkerStatus::SpareStarting);
        self.shared.view.lock().unwrap_or_else(|e| e.into_inner()).rank = None;
        Ok(())
    }

    /// Starts the trainer thread (again, after one died).
    fn start_runner(&mut self) -> Result<(), SessionError> {
        let Some(spec) = self.spec.clone() else { return Ok(()) };
        {
            let (tx, rx) = std::sync::mpsc::channel();
            let ev_tx = self.ev_tx.clone();
            let (rank, device, state, metrics, spec) = (
                self.rank,
                self.device.clone(),
                self.runner_state.clone(),
                self.metrics.clone(),
                spec.clone(),
            );
            let exec = self.opts.exec.clone().map(|opts| (opts, self.host.clone()));
            let copies = self.shared.copies.clone();
            if rank.is_none() {
                state.set_status(WorkerStatus::SpareStarting);
            }
            // the trainer thread builds its own state (hundreds of MiB to
            // allocate and touch) while this task keeps heartbeating
            let handle = std::thread::Builder::new()
                .name("flotilla-trainer".into())
                .spawn(move || {
                    let sink: crate::runner::EventSink = Arc::new(move |ev| {
                        let _ = ev_tx.send(ev);
                    });
                    if let Some((opts, host)) = exec {
                        // an --exec spare starts its process at once; the
                        // process waits in flotilla.init() for its rank
                        let spare = rank.is_none();
                        let rank = rank.unwrap_or(Rank(0));
                        return ExecRunner::new(spec, rank, opts, host, device, sink, state, metrics)
                            .spare(spare)
                            .run(rx);
                    }
                    match Runner::new(spec, rank, device, sink.clone(), state, metrics) {
                        Ok(runner) => runner.with_copies(copies).run(rx),
                        Err(e) => {
                            let reason = e.to_string();
                            tracing::error!("cannot start the trainer: {reason}");
                            sink(WorkerMessage::TrainerFailed { generation: Generation(0), reason });
                        }
                    }
                })
                .map_err(|e| {
                    SessionError::Fatal(WorkerError::Config(format!("cannot start the trainer thread: {e}")))
                })?;
            self.runner = Some((tx, handle));
        }
        Ok(())
    }

    /// A trainer thread that ended (a panic, or it could not start) is a
    /// failed rank: reported, and started again on the next restore.
    fn check_runner(&mut self) {
        if !self.runner.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            return;
        }
        if let Some((_, handle)) = self.runner.take() {
            let why = match handle.join() {
                Ok(()) => "the trainer thread exited".to_string(),
                Err(_) => "the trainer thread panicked".to_string(),
            };
            tracing::error!("{why}; reporting the rank failed");
            self.runner_state.set_status(WorkerStatus::Failed);
            let generation = self.runner_state.generation().unwrap_or(Generation(0));
            self.unsent.push_back(WorkerMessage::TrainerFailed { generation, reason: why });
        }
    }

    fn runner_cmd(&self, cmd: RunnerCmd) {
        if let Some((tx, _)) = &self.runner {
            let _ = tx.send(cmd);
        }
    }

    /// Carries out a directive; returns how the session ends (if it does)
    /// and reports to send back at once.
    fn directive(
        &mut self,
        msg: CoordinatorMessage,
    ) -> Result<(Option<SessionEnd>, Vec<WorkerMessage>), SessionError> {
        let mut replies = Vec::new();
        match msg {
            CoordinatorMessage::Checkpoint { generation, checkpoint, step, dir } => {
                match self.saved.get(&checkpoint) {
                    // already saved (a leader that did not see the report asks again)
                    Some(saved) => replies.push(saved.clone()),
                    None => self.runner_cmd(RunnerCmd::Checkpoint { generation, id: checkpoint, step, dir }),
                }
            }
            CoordinatorMessage::AbortCheckpoint { checkpoint, .. } => {
                self.saved.remove(&checkpoint);
                self.runner_cmd(RunnerCmd::Abort { id: checkpoint });
            }
            CoordinatorMessage::Restore { generation, from, rendezvous } => {
                if self.runner_state.generation() != Some(generation) {
                    tracing::info!(%generation, from = ?from.as_ref().map(|p| p.checkpoint), "restoring");
                    self.saved.clear();
                    self.finished = None;
                }
                if self.runner.is_none() {
                    self.start_runner()?;
                }
                self.runner_cmd(RunnerCmd::Restore { generation, from, rendezvous });
            }
            CoordinatorMessage::CopyShard { generation, checkpoint, copies, to } => {
                self.runner_cmd(RunnerCmd::CopyShard { generation, checkpoint, copies, to });
            }
            CoordinatorMessage::Resume { generation, step } => {
                tracing::debug!(%generation, %step, "resume");
                self.runner_cmd(RunnerCmd::Resume { generation, step });
            }
            CoordinatorMessage::Assign { rank, generation } => match self.rank {
                None => {
                    tracing::info!(%rank, %generation, "this spare takes rank {rank}");
                    self.rank = Some(rank);
                    self.shared.view.lock().unwrap_or_else(|e| e.into_inner()).rank = Some(rank);
                    self.runner_cmd(RunnerCmd::Assign { rank });
                }
                Some(held) if held == rank => {}
                Some(held) => {
                    tracing::warn!(%held, %rank, "assigned another rank than the one held; ignored")
                }
            },
            CoordinatorMessage::Stop { reason } => return Ok((Some(SessionEnd::Stop(reason)), replies)),
            CoordinatorMessage::Error(e) if e.code == ErrorCode::Fenced => {
                return Err(SessionError::Fatal(WorkerError::Fenced(e.message)))
            }
            CoordinatorMessage::Error(e) if e.code == ErrorCode::Stale => {
                tracing::info!("stale report dropped: {}", e.message)
            }
            CoordinatorMessage::Error(e) => tracing::warn!("coordinator: {}", e.message),
            CoordinatorMessage::Alive
            | CoordinatorMessage::Registered { .. }
            | CoordinatorMessage::NotLeader { .. } => {}
            // node sessions only: this worker registered one rank
            CoordinatorMessage::Batch(_) => tracing::warn!("coordinator sent a node-session batch; ignored"),
        }
        Ok((None, replies))
    }
}

/// The HTTP address other workers reach this one at: `--http-addr`, with a
/// wildcard host (`0.0.0.0`, `[::]`) replaced by `local`, the address this
/// worker reaches its coordinator from.
fn advertised(http_addr: &str, local: &str) -> String {
    match http_addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            std::net::SocketAddr::new(local.parse().unwrap_or(a.ip()), a.port()).to_string()
        }
        _ => http_addr.to_string(),
    }
}

async fn readyz(AxumState(s): AxumState<Shared>) -> Response {
    let v = s.view.lock().unwrap_or_else(|e| e.into_inner());
    match (&v.restore_refused, v.registered) {
        (Some(why), _) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("restore refused: {why}\n")).into_response()
        }
        (None, true) => (StatusCode::OK, "registered\n").into_response(),
        (None, false) => {
            (StatusCode::SERVICE_UNAVAILABLE, "not registered with a coordinator leader\n").into_response()
        }
    }
}

async fn status(AxumState(s): AxumState<Shared>) -> Response {
    let mut v = s.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.generation = s.runner.generation();
    v.step = s.runner.step().0;
    v.state = s.runner.status().as_str().into();
    v.trainer_pid = s.runner.trainer_pid();
    // the exact figures behind a memory refusal: the last reading and need
    if let Some(d) = v.device.as_mut() {
        d.free = s.metrics.device_free(&d.label).unwrap_or(d.free);
    }
    v.restore_need_bytes = u64::try_from(s.metrics.restore_need_bytes.get()).ok().filter(|n| *n > 0);
    v.memory_copies = Some(s.copies.status());
    Json(v).into_response()
}

async fn metrics_text(AxumState(s): AxumState<Shared>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.encode()).into_response()
}
