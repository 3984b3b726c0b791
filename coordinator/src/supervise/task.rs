//! The supervisor task: the shell around the pure [`Supervisor`]. It feeds
//! observations to the core, runs its reconciles at a bounded pace, and
//! carries out its actions: proposals (queued to the Raft node and never
//! awaited inline: their outcomes come back as observations), directives
//! (onto each connection's outbox), and checkpoint files (handed to
//! [`super::files`]). It supervises only while this replica leads.

use super::files::Files;
use super::input::{Outbox, SupervisorInput};
use super::{
    Action, CheckpointOutcome, ConnId, Now, Observation, ProposalKey, RecoveryView, Registration, RequestId,
    Supervisor, SupervisorConfig,
};
use crate::api::{SpareStatus, WorkerView};
use crate::ledger::Event;
use crate::metrics::Metrics;
use crate::raft::node::{NodeHandle, Role};
use flotilla_shared::ids::{Generation, JobName};
use flotilla_shared::layout::Manifest;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// What the supervisor last knew of each job, for `/v1/status`.
#[derive(Clone, Default)]
pub struct WorkersView(Arc<RwLock<BTreeMap<JobName, JobView>>>);

/// One job as the supervisor last saw it.
#[derive(Clone, Default)]
struct JobView {
    workers: Vec<WorkerView>,
    spares: Vec<SpareStatus>,
    recovery: Option<RecoveryView>,
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

    /// The spares of `job` as the supervisor last saw them.
    pub fn spares(&self, job: &JobName) -> Vec<SpareStatus> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(job)
            .map(|v| v.spares.clone())
            .unwrap_or_default()
    }

    /// The phases of `job`'s last restore, as the supervisor measured them.
    pub fn last_recovery(&self, job: &JobName) -> Option<RecoveryView> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(job)?.recovery
    }

    /// When the supervisor first saw `job` running in `generation` (ms
    /// since the epoch).
    pub fn running_since_ms(&self, job: &JobName, generation: Generation) -> Option<u64> {
        let views = self.0.read().unwrap_or_else(|e| e.into_inner());
        let (g, at) = views.get(job)?.running_since?;
        (g == generation).then_some(at)
    }
}

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

    /// Asks for a checkpoint of `job` now and waits until the supervisor
    /// says how it ended; none when this replica stopped supervising first
    /// (leadership moved: ask the new leader).
    pub async fn checkpoint_now(&self, job: JobName) -> Option<CheckpointOutcome> {
        let (reply, outcome) = oneshot::channel();
        self.tx.send(SupervisorInput::CheckpointNow { job, reply }).await.ok()?;
        outcome.await.ok()
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
    let files = Files::new(node.clone(), tx.clone());
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
    mut files: Files,
    view: WorkersView,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let clock = Clock(Instant::now());
    let mut sup: Option<Supervisor> = None;
    let mut conns: HashMap<ConnId, Outbox> = HashMap::new();
    // operators waiting for an answer, by request id
    let mut waiting: HashMap<RequestId, oneshot::Sender<CheckpointOutcome>> = HashMap::new();
    let mut next_request: RequestId = 0;
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
                            observe_events(&metrics, &events);
                            batch.push(Observation::ProposalDone { key, events });
                        }
                        SupervisorInput::CheckpointNow { job, reply } => {
                            next_request += 1;
                            waiting.insert(next_request, reply);
                            batch.push(Observation::CheckpointRequested { job, reply_to: Some(next_request) });
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
                    // nobody here supervises: whoever waits asks the leader
                    waiting.clear();
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
                        waiting.clear();
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
                Action::Answer { request, outcome } => {
                    if let Some(reply) = waiting.remove(&request) {
                        let _ = reply.send(outcome);
                    }
                }
                Action::Recovered { job, seconds, source } => {
                    if let Some(seconds) = seconds {
                        metrics.recovery_seconds.with_label_values(&[job.as_str()]).observe(seconds);
                    }
                    if let Some(source) = source {
                        metrics.restore_source.with_label_values(&[job.as_str(), source.as_str()]).inc();
                    }
                }
                Action::Files { job, work } => {
                    files.send(job, work);
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

/// The checkpoint-duration histogram, from the commits of this leader's
/// proposals.
fn observe_events(metrics: &Metrics, events: &[Event]) {
    for event in events {
        if let Event::CheckpointCommitted { job, duration_ms, .. } = event {
            metrics.checkpoint_seconds.with_label_values(&[job.as_str()]).observe(*duration_ms as f64 / 1e3);
        }
    }
}

fn publish_view(node: &NodeHandle, s: &Supervisor, view: &WorkersView, now: crate::supervise::Now) {
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
                        worker: r.worker,
                        host: r.host,
                    })
                    .collect();
                let spares = s
                    .spare_views(&j.spec.name)
                    .into_iter()
                    .map(|v| SpareStatus { worker: v.worker, host: v.host, state: v.state })
                    .collect();
                let running_since =
                    s.running_since_ms(&j.spec.name, j.generation).map(|at| (j.generation, at));
                let recovery = s.last_recovery(&j.spec.name);
                (j.spec.name.clone(), JobView { workers, spares, recovery, running_since })
            })
            .collect()
    });
    *view.0.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
}
