//! The supervisor: the leader's soft state about workers, and every
//! decision that turns observations into proposals and directives.
//!
//! This module is pure: `observe`/`applied`/`tick` take the applied ledger,
//! the time and what happened, and return [`Action`]s for the shell
//! (`coordinator::workers`) to carry out. Nothing that decides safety lives
//! only here: commits, aborts, restores and fencing are ledger commands; the
//! soft state (who is connected, who saved which shard, who restored) is
//! rebuilt by a new leader from the ledger and the workers' re-registrations.
//!
//! ```text
//! waiting ──all ranks registered──► StartJob ──► Resume{G, 0}
//! running ──due──► BeginCheckpoint ──► Checkpoint{G, C, S} ──all ShardSaved──► CommitCheckpoint
//!         ──failure──► Restore{G+1, from latest} ──► Restore directives ──all Restored──► ResumeJob ──► Resume
//!                                                  └─ corrupt ─► MarkCorrupt + Restore from the previous
//!                                                  └─ memory / model ─► BlockJob (retried on re-registration)
//!         ──all Finished──► FinishJob(digest) ──► Stop
//! ```

use crate::state::{CheckpointState, Command, Event, Job, JobState, RestoreReason, State};
use flotilla_shared::checksum::combine_digests;
use flotilla_shared::ids::{CheckpointId, Generation, Incarnation, JobName, Rank, Step};
use flotilla_shared::layout::JobDir;
use flotilla_shared::shard::ShardManifest;
use flotilla_shared::wire::{
    CoordinatorMessage, ErrorCode, ErrorReply, RestoreFailureKind, RestorePoint, WorkerMessage, WorkerStatus,
};
use std::collections::{BTreeMap, BTreeSet};

/// Unit of the lead a checkpoint step is placed ahead of the fastest rank.
const LEAD_UNIT_MS: u64 = 100;

/// A worker connection's id, unique within the shell.
pub type ConnId = u64;

/// A worker's registration on connection `conn`.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Connection.
    pub conn: ConnId,
    /// Job.
    pub job: JobName,
    /// Rank.
    pub rank: Rank,
    /// The worker process's incarnation.
    pub incarnation: Incarnation,
    /// The generation it last ran in.
    pub generation: Option<Generation>,
    /// Its step in that generation.
    pub step: Step,
}

/// Something the shell saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A worker registered.
    Registered(Registration),
    /// A registered worker sent a message.
    Message {
        /// Connection.
        conn: ConnId,
        /// The message.
        msg: WorkerMessage,
    },
    /// A connection closed.
    Disconnected {
        /// Connection.
        conn: ConnId,
    },
    /// An operator asked for a checkpoint now.
    CheckpointRequested {
        /// Job.
        job: JobName,
    },
    /// An operator asked for a whole-job restore.
    RestoreRequested {
        /// Job.
        job: JobName,
        /// A committed checkpoint, or the latest.
        from: Option<CheckpointId>,
    },
}

/// Something for the shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Propose a ledger command; feed the applied events back to [`Supervisor::applied`].
    Propose(Command),
    /// Send a directive on a connection.
    Send {
        /// Connection.
        conn: ConnId,
        /// Directive.
        msg: CoordinatorMessage,
    },
    /// Close a connection (after any queued sends).
    Close {
        /// Connection.
        conn: ConnId,
    },
    /// Write MANIFEST.json and LATEST for a committed checkpoint.
    WriteManifest {
        /// Job.
        job: JobName,
        /// Checkpoint.
        id: CheckpointId,
    },
    /// Delete a checkpoint's directory (aborted, corrupt or retired).
    DeleteFiles {
        /// Job.
        job: JobName,
        /// Checkpoint.
        id: CheckpointId,
    },
}

#[derive(Debug, Clone)]
struct WorkerSoft {
    conn: ConnId,
    incarnation: Incarnation,
    generation: Option<Generation>,
    step: Step,
    status: WorkerStatus,
    last_seen_ms: u64,
    disconnected_ms: Option<u64>,
    /// Steps per millisecond, from the last two heartbeats.
    rate: f64,
}

#[derive(Debug, Default)]
struct JobSoft {
    workers: BTreeMap<Rank, WorkerSoft>,
    /// Shards saved for `saved_for`.
    saved: BTreeMap<Rank, ShardManifest>,
    saved_for: Option<CheckpointId>,
    /// Ranks restored in `restored_gen`.
    restored: BTreeSet<Rank>,
    restored_gen: Generation,
    /// Final digests in `finished_gen`.
    finished: BTreeMap<Rank, String>,
    finished_gen: Generation,
    last_checkpoint_ms: u64,
    checkpoint_requested: bool,
    /// How many heartbeat intervals ahead a checkpoint step is placed; grows
    /// when a rank was already past the step when told.
    lead: u64,
}

/// Timing the supervisor applies.
#[derive(Debug, Clone, Copy)]
pub struct SupervisorConfig {
    /// How long a closed connection may stay closed before the rank has failed.
    pub reconnect_grace_ms: u64,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self { reconnect_grace_ms: 500 }
    }
}

/// The leader's supervisor.
#[derive(Debug)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    since_ms: u64,
    jobs: BTreeMap<JobName, JobSoft>,
    conns: BTreeMap<ConnId, (JobName, Rank)>,
}

fn send(conn: ConnId, msg: CoordinatorMessage) -> Action {
    Action::Send { conn, msg }
}

fn fenced(message: String) -> CoordinatorMessage {
    CoordinatorMessage::Error(ErrorReply { code: ErrorCode::Fenced, message })
}

/// Where rank `rank` restores from in the job's current generation.
pub fn restore_point(job: &Job, rank: Rank) -> Option<RestorePoint> {
    let id = job.restored_from?;
    let c = job.checkpoints.get(&id)?;
    let shard = c.shards.iter().find(|s| s.rank == rank)?.clone();
    Some(RestorePoint {
        checkpoint: id,
        step: c.step,
        dir: JobDir::new(&job.spec.checkpoint.root, &job.spec.name).checkpoint_dir(id),
        shard,
    })
}

impl Supervisor {
    /// A supervisor for a replica that became leader at `now_ms`.
    pub fn new(cfg: SupervisorConfig, now_ms: u64) -> Self {
        Self { cfg, since_ms: now_ms, jobs: BTreeMap::new(), conns: BTreeMap::new() }
    }

    fn soft(&mut self, job: &JobName, now_ms: u64) -> &mut JobSoft {
        self.jobs.entry(job.clone()).or_insert_with(|| JobSoft {
            last_checkpoint_ms: now_ms,
            lead: 2,
            ..JobSoft::default()
        })
    }

    /// Steps each rank reported in the current generation (for status).
    pub fn worker_steps(&self, job: &JobName, generation: Generation) -> Vec<(Rank, WorkerStatus, Step)> {
        self.jobs.get(job).map_or_else(Vec::new, |s| {
            s.workers
                .iter()
                .filter(|(_, w)| w.generation == Some(generation) && w.disconnected_ms.is_none())
                .map(|(r, w)| (*r, w.status, w.step))
                .collect()
        })
    }

    /// Handles one observation.
    pub fn observe(&mut self, ledger: &State, now_ms: u64, obs: Observation) -> Vec<Action> {
        match obs {
            Observation::Registered(r) => self.registered(ledger, now_ms, r),
            Observation::Message { conn, msg } => {
                let Some((job, rank)) = self.conns.get(&conn).cloned() else { return vec![] };
                let Some(j) = ledger.jobs.get(&job) else { return vec![] };
                self.message(j, now_ms, conn, rank, msg)
            }
            Observation::Disconnected { conn } => {
                if let Some((job, rank)) = self.conns.remove(&conn) {
                    if let Some(w) = self.soft(&job, now_ms).workers.get_mut(&rank) {
                        if w.conn == conn {
                            w.disconnected_ms = Some(now_ms);
                        }
                    }
                }
                vec![]
            }
            Observation::CheckpointRequested { job } => {
                self.soft(&job, now_ms).checkpoint_requested = true;
                self.tick(ledger, now_ms)
            }
            Observation::RestoreRequested { job, from } => {
                let Some(j) = ledger.jobs.get(&job) else { return vec![] };
                if j.state.is_terminal() {
                    return vec![];
                }
                let from = from.or_else(|| j.latest_committed().map(|c| c.id));
                vec![Action::Propose(Command::Restore {
                    job,
                    generation: Generation(j.generation.0 + 1),
                    from,
                    reason: RestoreReason::Operator,
                    now_ms,
                })]
            }
        }
    }

    fn registered(&mut self, ledger: &State, now_ms: u64, r: Registration) -> Vec<Action> {
        let Registration { conn, job, rank, incarnation, generation, step } = r;
        let Some(j) = ledger.jobs.get(&job) else {
            return vec![
                send(
                    conn,
                    CoordinatorMessage::Error(ErrorReply {
                        code: ErrorCode::UnknownJob,
                        message: format!("no job named {job}; submit it first (flotilla submit)"),
                    }),
                ),
                Action::Close { conn },
            ];
        };
        if rank.0 >= j.spec.world_size {
            return vec![
                send(
                    conn,
                    CoordinatorMessage::Error(ErrorReply {
                        code: ErrorCode::InvalidRequest,
                        message: format!(
                            "rank {rank} is outside job {job}'s world_size {}",
                            j.spec.world_size
                        ),
                    }),
                ),
                Action::Close { conn },
            ];
        }
        let mut actions = vec![send(
            conn,
            CoordinatorMessage::Registered { spec: j.spec.clone(), generation: j.generation },
        )];
        let soft = self.soft(&job, now_ms);
        let previous = soft.workers.get(&rank).cloned();
        if let Some(old) = &previous {
            if old.incarnation != incarnation && old.disconnected_ms.is_none() {
                // the old process is a zombie as far as the job is concerned
                actions.push(send(
                    old.conn,
                    fenced(format!(
                        "rank {rank} of job {job} registered again as a new process; this one is fenced"
                    )),
                ));
                actions.push(Action::Close { conn: old.conn });
            }
        }
        let restarted = previous.as_ref().is_some_and(|old| old.incarnation != incarnation);
        soft.workers.insert(
            rank,
            WorkerSoft {
                conn,
                incarnation,
                generation,
                step,
                status: WorkerStatus::Waiting,
                last_seen_ms: now_ms,
                disconnected_ms: None,
                rate: 0.0,
            },
        );
        if restarted {
            soft.restored.remove(&rank);
        }
        self.conns.insert(conn, (job.clone(), rank));
        if j.state.is_terminal() {
            actions.push(send(
                conn,
                CoordinatorMessage::Stop { reason: format!("job {job} already {}", j.state.as_str()) },
            ));
            return actions;
        }
        let in_step = generation == Some(j.generation) && !restarted;
        match j.state {
            JobState::Waiting => actions.extend(self.tick(ledger, now_ms)),
            JobState::Running if in_step => {
                // a re-registration (e.g. after a leader change): carry on, and
                // repeat the directive of a checkpoint still in flight
                if let Some(p) = j.pending() {
                    actions.push(send(conn, self.checkpoint_directive(j, p.id, p.step)));
                }
            }
            JobState::Running => {
                actions.push(self.failure(j, now_ms, RestoreReason::WorkerRestarted));
            }
            JobState::Restoring => {
                if !self.soft(&job, now_ms).restored.contains(&rank) {
                    actions.push(send(
                        conn,
                        CoordinatorMessage::Restore {
                            generation: j.generation,
                            from: restore_point(j, rank),
                        },
                    ));
                }
            }
            JobState::Blocked => actions.push(Action::Propose(Command::Restore {
                job: job.clone(),
                generation: Generation(j.generation.0 + 1),
                from: j.restored_from,
                reason: RestoreReason::Retry,
                now_ms,
            })),
            JobState::Succeeded | JobState::Failed => {}
        }
        actions
    }

    fn checkpoint_directive(&self, j: &Job, id: CheckpointId, step: Step) -> CoordinatorMessage {
        CoordinatorMessage::Checkpoint {
            generation: j.generation,
            checkpoint: id,
            step,
            dir: JobDir::new(&j.spec.checkpoint.root, &j.spec.name).checkpoint_dir(id),
        }
    }

    /// A failed rank in a running job: restore the whole job into G+1.
    fn failure(&self, j: &Job, now_ms: u64, reason: RestoreReason) -> Action {
        Action::Propose(Command::Restore {
            job: j.spec.name.clone(),
            generation: Generation(j.generation.0 + 1),
            from: j.latest_committed().map(|c| c.id),
            reason,
            now_ms,
        })
    }

    fn message(&mut self, j: &Job, now_ms: u64, conn: ConnId, rank: Rank, msg: WorkerMessage) -> Vec<Action> {
        let job = j.spec.name.clone();
        let world = j.spec.world_size as usize;
        let current = j.generation;
        let soft = self.soft(&job, now_ms);
        let Some(w) = soft.workers.get_mut(&rank) else { return vec![] };
        if w.conn != conn {
            return vec![
                send(conn, fenced(format!("rank {rank} of job {job} is registered on another connection"))),
                Action::Close { conn },
            ];
        }
        let previous_seen = std::mem::replace(&mut w.last_seen_ms, now_ms);
        match msg {
            WorkerMessage::Register { .. } => vec![],
            WorkerMessage::Heartbeat { generation, step, status } => {
                if generation == current {
                    if w.generation == Some(current) && step > w.step {
                        let dt = now_ms.saturating_sub(previous_seen).max(1);
                        w.rate = (step.0 - w.step.0) as f64 / dt as f64;
                    }
                    w.generation = Some(current);
                    w.step = step;
                    w.status = status;
                }
                vec![]
            }
            WorkerMessage::ShardSaved { generation, checkpoint, manifest } => {
                let pending = j.pending().filter(|p| p.id == checkpoint);
                match pending {
                    Some(p) if generation == current && p.generation == current && manifest.rank == rank => {
                        if soft.saved_for != Some(checkpoint) {
                            soft.saved.clear();
                            soft.saved_for = Some(checkpoint);
                        }
                        soft.saved.insert(rank, manifest);
                        if soft.saved.len() == world {
                            let shards = soft.saved.values().cloned().collect();
                            return vec![Action::Propose(Command::CommitCheckpoint { job, id: checkpoint, shards, now_ms })];
                        }
                        vec![]
                    }
                    _ if generation < current => vec![send(
                        conn,
                        fenced(format!(
                            "shard of checkpoint {checkpoint} from generation {generation} refused: job {job} is in generation {current}"
                        )),
                    )],
                    // a report for a checkpoint that is no longer pending: nothing to do
                    _ => vec![],
                }
            }
            WorkerMessage::ShardFailed { generation, checkpoint, reason } => {
                if generation != current || j.pending().is_none_or(|p| p.id != checkpoint) {
                    return vec![];
                }
                if reason.contains("already past") {
                    soft.lead = (soft.lead * 2).min(64);
                }
                vec![Action::Propose(Command::AbortCheckpoint {
                    job,
                    id: checkpoint,
                    reason: format!("rank {rank}: {reason}"),
                    now_ms,
                })]
            }
            WorkerMessage::Restored { generation, step } => {
                if generation != current || !matches!(j.state, JobState::Restoring | JobState::Blocked) {
                    return vec![];
                }
                w.generation = Some(generation);
                w.step = step;
                if soft.restored_gen != current {
                    soft.restored.clear();
                    soft.restored_gen = current;
                }
                soft.restored.insert(rank);
                if soft.restored.len() == world && j.state == JobState::Restoring {
                    return vec![Action::Propose(Command::ResumeJob { job, generation: current })];
                }
                vec![]
            }
            WorkerMessage::RestoreFailed { generation, checkpoint, kind, message } => {
                if generation != current || j.state != JobState::Restoring {
                    return vec![];
                }
                match kind {
                    RestoreFailureKind::Corrupt => {
                        let mut actions = Vec::new();
                        if let Some(id) = checkpoint {
                            actions.push(Action::Propose(Command::MarkCorrupt {
                                job: job.clone(),
                                id,
                                reason: message,
                            }));
                        }
                        // fall back to the committed checkpoint before the corrupt one
                        let from = match checkpoint {
                            Some(bad) => j.committed_before(bad).map(|c| c.id),
                            None => j.latest_committed().map(|c| c.id),
                        };
                        actions.push(Action::Propose(Command::Restore {
                            job,
                            generation: Generation(current.0 + 1),
                            from,
                            reason: RestoreReason::CorruptCheckpoint,
                            now_ms,
                        }));
                        actions
                    }
                    RestoreFailureKind::ModelMismatch | RestoreFailureKind::DeviceMemory => {
                        vec![Action::Propose(Command::BlockJob { job, generation: current, error: message })]
                    }
                    RestoreFailureKind::Io => vec![Action::Propose(Command::Restore {
                        job,
                        generation: Generation(current.0 + 1),
                        from: j.restored_from,
                        reason: RestoreReason::Retry,
                        now_ms,
                    })],
                }
            }
            WorkerMessage::TrainerFailed { generation, reason } => {
                tracing::warn!(%job, %rank, "trainer failed: {reason}");
                if generation == current && j.state == JobState::Running {
                    return vec![self.failure(j, now_ms, RestoreReason::TrainerFailed)];
                }
                vec![]
            }
            WorkerMessage::Finished { generation, step, digest } => {
                if generation != current || j.state != JobState::Running {
                    return vec![];
                }
                w.step = step;
                w.status = WorkerStatus::Finished;
                if soft.finished_gen != current {
                    soft.finished.clear();
                    soft.finished_gen = current;
                }
                soft.finished.insert(rank, digest);
                if soft.finished.len() == world {
                    let digests: Vec<&String> = soft.finished.values().collect();
                    return vec![Action::Propose(Command::FinishJob {
                        job,
                        generation: current,
                        digest: combine_digests(&digests),
                    })];
                }
                vec![]
            }
        }
    }

    /// Periodic checks: start, failure detection, checkpoint scheduling and timeouts.
    pub fn tick(&mut self, ledger: &State, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        for j in ledger.jobs.values().filter(|j| !j.state.is_terminal()) {
            let since = self.since_ms;
            let grace = self.cfg.reconnect_grace_ms;
            let soft = self.soft(&j.spec.name, now_ms);
            let world = j.spec.world_size;
            let ranks = || (0..world).map(Rank);
            match j.state {
                JobState::Waiting => {
                    let all =
                        ranks().all(|r| soft.workers.get(&r).is_some_and(|w| w.disconnected_ms.is_none()));
                    if all {
                        actions.push(Action::Propose(Command::StartJob {
                            job: j.spec.name.clone(),
                            generation: j.generation,
                        }));
                    }
                }
                JobState::Running => {
                    let timeout = j.spec.failure.heartbeat_timeout_ms;
                    let failed = ranks().find_map(|r| match soft.workers.get(&r) {
                        None if now_ms > since + timeout => Some(RestoreReason::Disconnected),
                        None => None,
                        Some(w) if w.disconnected_ms.is_some_and(|d| now_ms >= d + grace) => {
                            Some(RestoreReason::Disconnected)
                        }
                        Some(w) if now_ms > w.last_seen_ms + timeout => Some(RestoreReason::HeartbeatTimeout),
                        Some(_) => None,
                    });
                    if let Some(reason) = failed {
                        actions.push(self.failure(j, now_ms, reason));
                        continue;
                    }
                    actions.extend(self.schedule_checkpoint(j, now_ms));
                }
                JobState::Restoring | JobState::Blocked => {}
                JobState::Succeeded | JobState::Failed => {}
            }
        }
        actions
    }

    fn schedule_checkpoint(&mut self, j: &Job, now_ms: u64) -> Vec<Action> {
        let job = j.spec.name.clone();
        if let Some(p) = j.pending() {
            let deadline = p.begun_ms + j.spec.checkpoint.timeout_seconds * 1000;
            if now_ms > deadline {
                return vec![Action::Propose(Command::AbortCheckpoint {
                    job,
                    id: p.id,
                    reason: format!(
                        "not committed within checkpoint.timeout_seconds = {}",
                        j.spec.checkpoint.timeout_seconds
                    ),
                    now_ms,
                })];
            }
            return vec![];
        }
        let total = j.spec.trainer.as_ref().map(|t| t.total_steps);
        let soft = self.soft(&job, now_ms);
        let live: Vec<&WorkerSoft> =
            soft.workers.values().filter(|w| w.generation == Some(j.generation)).collect();
        if live.len() < j.spec.world_size as usize {
            return vec![];
        }
        // where the fastest rank is now, extrapolated from its last heartbeat
        let fastest = live
            .iter()
            .map(|w| w.step.0 + (w.rate * now_ms.saturating_sub(w.last_seen_ms) as f64).ceil() as u64)
            .max()
            .unwrap_or(0);
        let rate = live.iter().map(|w| w.rate).fold(0.0, f64::max);
        // steps it may take before every rank has the directive: `lead` ×
        // 100 ms (grows when a rank was already past the step when told)
        let lead = (rate * (soft.lead * LEAD_UNIT_MS) as f64).ceil() as u64 + 1;
        // never at or behind a checkpoint already taken (the ledger refuses it)
        let floor = j.checkpoints.values().map(|c| c.step.0 + 1).max().unwrap_or(0);
        let earliest = (fastest + lead).max(floor);
        let by_time =
            j.spec.checkpoint.every_seconds.is_some_and(|s| now_ms >= soft.last_checkpoint_ms + s * 1000);
        let step = if soft.checkpoint_requested || by_time {
            Some(earliest)
        } else {
            j.spec.checkpoint.every_steps.and_then(|e| {
                let last = j
                    .latest_committed()
                    .map_or(0, |c| c.step.0)
                    .max(j.checkpoints.values().map(|c| c.step.0).max().unwrap_or(0));
                let next = (last / e + 1) * e;
                // announce the next multiple once the fastest rank is within reach
                (fastest + lead + e / 2 >= next).then(|| earliest.div_ceil(e).max(1) * e)
            })
        };
        let Some(step) = step.filter(|s| total.is_none_or(|t| *s < t)) else { return vec![] };
        soft.checkpoint_requested = false;
        soft.last_checkpoint_ms = now_ms;
        vec![Action::Propose(Command::BeginCheckpoint {
            job,
            id: j.next_checkpoint,
            step: Step(step),
            generation: j.generation,
            now_ms,
        })]
    }

    /// Turns applied ledger events into directives and file work.
    pub fn applied(&mut self, ledger: &State, now_ms: u64, events: &[Event]) -> Vec<Action> {
        let mut actions = Vec::new();
        for event in events {
            let job_name = match event {
                Event::JobSubmitted { job }
                | Event::JobAlreadySubmitted { job }
                | Event::JobState { job, .. }
                | Event::CheckpointBegun { job, .. }
                | Event::CheckpointCommitted { job, .. }
                | Event::CheckpointAborted { job, .. }
                | Event::CheckpointCorrupt { job, .. }
                | Event::CheckpointDeleted { job, .. }
                | Event::Restoring { job, .. } => job,
            };
            let Some(j) = ledger.jobs.get(job_name) else { continue };
            let conns: Vec<(Rank, ConnId)> = self
                .soft(job_name, now_ms)
                .workers
                .iter()
                .filter(|(_, w)| w.disconnected_ms.is_none())
                .map(|(r, w)| (*r, w.conn))
                .collect();
            match event {
                Event::CheckpointBegun { id, step, .. } => {
                    let directive = self.checkpoint_directive(j, *id, *step);
                    let soft = self.soft(job_name, now_ms);
                    soft.saved.clear();
                    soft.saved_for = Some(*id);
                    actions.extend(conns.iter().map(|(_, c)| send(*c, directive.clone())));
                }
                Event::CheckpointCommitted { id, .. } => {
                    actions.push(Action::WriteManifest { job: job_name.clone(), id: *id });
                    // collect what earlier aborts left behind
                    for c in j.checkpoints.values().filter(|c| c.state == CheckpointState::Aborted) {
                        actions.push(Action::DeleteFiles { job: job_name.clone(), id: c.id });
                    }
                }
                Event::CheckpointAborted { id, .. } => {
                    actions.extend(conns.iter().map(|(_, c)| {
                        send(
                            *c,
                            CoordinatorMessage::AbortCheckpoint { generation: j.generation, checkpoint: *id },
                        )
                    }));
                    actions.push(Action::DeleteFiles { job: job_name.clone(), id: *id });
                }
                Event::CheckpointDeleted { id, .. } => {
                    actions.push(Action::DeleteFiles { job: job_name.clone(), id: *id })
                }
                Event::Restoring { generation, .. } => {
                    let soft = self.soft(job_name, now_ms);
                    soft.restored.clear();
                    soft.restored_gen = *generation;
                    soft.saved.clear();
                    soft.saved_for = None;
                    for (rank, conn) in &conns {
                        actions.push(send(
                            *conn,
                            CoordinatorMessage::Restore {
                                generation: *generation,
                                from: restore_point(j, *rank),
                            },
                        ));
                    }
                }
                Event::JobState { state: JobState::Running, .. } => {
                    let step =
                        j.restored_from.and_then(|id| j.checkpoints.get(&id)).map_or(Step(0), |c| c.step);
                    let soft = self.soft(job_name, now_ms);
                    soft.last_checkpoint_ms = now_ms;
                    for w in soft.workers.values_mut() {
                        w.generation = Some(j.generation);
                        w.step = step;
                        w.last_seen_ms = now_ms;
                    }
                    actions.extend(conns.iter().map(|(_, c)| {
                        send(*c, CoordinatorMessage::Resume { generation: j.generation, step })
                    }));
                }
                Event::JobState { state: state @ (JobState::Succeeded | JobState::Failed), .. } => {
                    let reason = match (&j.error, state) {
                        (Some(e), _) => e.clone(),
                        (None, _) => format!("job {job_name} {}", state.as_str()),
                    };
                    actions.extend(
                        conns
                            .iter()
                            .map(|(_, c)| send(*c, CoordinatorMessage::Stop { reason: reason.clone() })),
                    );
                }
                Event::CheckpointCorrupt { .. }
                | Event::JobSubmitted { .. }
                | Event::JobAlreadySubmitted { .. }
                | Event::JobState { .. } => {}
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::checksum::Checksum;
    use flotilla_shared::spec::JobSpec;

    const T0: u64 = 1_000_000;

    fn name() -> JobName {
        JobName::new("j").unwrap()
    }

    fn ledger() -> State {
        let spec = JobSpec::from_toml(
            "name = \"j\"\nworld_size = 2\n[checkpoint]\nevery_steps = 100\nroot = \"/ckpt\"\ntimeout_seconds = 5\n\
             [failure]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1000\n[trainer]\ntotal_steps = 1000\n\
             params_per_rank_bytes = 65536\nlayers = 1\n",
        )
        .unwrap();
        let mut s = State::default();
        s.apply(Command::SubmitJob { spec, now_ms: T0 }).unwrap();
        s
    }

    fn register(
        sup: &mut Supervisor,
        st: &State,
        now: u64,
        conn: ConnId,
        rank: u32,
        inc: u64,
        gen: Option<u64>,
    ) -> Vec<Action> {
        sup.observe(
            st,
            now,
            Observation::Registered(Registration {
                conn,
                job: name(),
                rank: Rank(rank),
                incarnation: Incarnation(inc),
                generation: gen.map(Generation),
                step: Step(0),
            }),
        )
    }

    fn msg(sup: &mut Supervisor, st: &State, now: u64, conn: ConnId, msg: WorkerMessage) -> Vec<Action> {
        sup.observe(st, now, Observation::Message { conn, msg })
    }

    /// Applies every proposal in `actions` to the ledger, feeding events back;
    /// returns the non-proposal actions.
    fn run(sup: &mut Supervisor, st: &mut State, now: u64, actions: Vec<Action>) -> Vec<Action> {
        let mut out = Vec::new();
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Propose(cmd) => {
                    if let Ok(events) = st.apply(cmd) {
                        queue.extend(sup.applied(st, now, &events));
                    }
                }
                other => out.push(other),
            }
        }
        out
    }

    fn shard(rank: u32) -> ShardManifest {
        ShardManifest {
            rank: Rank(rank),
            file: format!("rank-{rank:05}.safetensors"),
            bytes: 10,
            checksum: Checksum(1),
            tensors: vec![],
        }
    }

    /// A running job in generation 1 with workers on connections 10 and 11.
    fn running() -> (Supervisor, State) {
        let mut st = ledger();
        let mut sup = Supervisor::new(SupervisorConfig::default(), T0);
        let a = register(&mut sup, &st, T0, 10, 0, 100, None);
        assert!(matches!(a[0], Action::Send { conn: 10, msg: CoordinatorMessage::Registered { .. } }));
        assert!(!a.iter().any(|x| matches!(x, Action::Propose(_))), "not every rank is there yet");
        let a = register(&mut sup, &st, T0, 11, 1, 101, None);
        assert!(a.contains(&Action::Propose(Command::StartJob { job: name(), generation: Generation(1) })));
        let out = run(&mut sup, &mut st, T0, a);
        let resume = CoordinatorMessage::Resume { generation: Generation(1), step: Step(0) };
        assert!(out.contains(&Action::Send { conn: 10, msg: resume.clone() }));
        assert!(out.contains(&Action::Send { conn: 11, msg: resume }));
        assert_eq!(st.jobs[&name()].state, JobState::Running);
        (sup, st)
    }

    fn commit_checkpoint(sup: &mut Supervisor, st: &mut State, now: u64) -> CheckpointId {
        let id = st.jobs[&name()].next_checkpoint;
        run(
            sup,
            st,
            now,
            vec![Action::Propose(Command::BeginCheckpoint {
                job: name(),
                id,
                step: Step(100 * id.0),
                generation: st.jobs[&name()].generation,
                now_ms: now,
            })],
        );
        let g = st.jobs[&name()].generation;
        for (conn, rank) in [(10, 0), (11, 1)] {
            let a = msg(
                sup,
                st,
                now,
                conn,
                WorkerMessage::ShardSaved { generation: g, checkpoint: id, manifest: shard(rank) },
            );
            run(sup, st, now, a);
        }
        assert_eq!(st.jobs[&name()].checkpoints[&id].state, CheckpointState::Committed);
        id
    }

    #[test]
    fn all_shards_commit_and_a_manifest_is_written() {
        let (mut sup, mut st) = running();
        run(
            &mut sup,
            &mut st,
            T0,
            vec![Action::Propose(Command::BeginCheckpoint {
                job: name(),
                id: CheckpointId(1),
                step: Step(100),
                generation: Generation(1),
                now_ms: T0,
            })],
        );
        let a = msg(
            &mut sup,
            &st,
            T0,
            10,
            WorkerMessage::ShardSaved {
                generation: Generation(1),
                checkpoint: CheckpointId(1),
                manifest: shard(0),
            },
        );
        assert!(a.is_empty(), "one shard of two commits nothing");
        let a = msg(
            &mut sup,
            &st,
            T0,
            11,
            WorkerMessage::ShardSaved {
                generation: Generation(1),
                checkpoint: CheckpointId(1),
                manifest: shard(1),
            },
        );
        assert_eq!(
            a,
            vec![Action::Propose(Command::CommitCheckpoint {
                job: name(),
                id: CheckpointId(1),
                shards: vec![shard(0), shard(1)],
                now_ms: T0
            })]
        );
        let out = run(&mut sup, &mut st, T0, a);
        assert!(out.contains(&Action::WriteManifest { job: name(), id: CheckpointId(1) }));
    }

    #[test]
    fn a_restarted_worker_restores_the_job_and_fences_the_old_process() {
        let (mut sup, mut st) = running();
        let c = commit_checkpoint(&mut sup, &mut st, T0);
        // rank 1 comes back as a new process while its old connection is open
        let a = register(&mut sup, &st, T0 + 10, 12, 1, 999, None);
        assert!(a.iter().any(|x| matches!(x, Action::Send { conn: 11, msg: CoordinatorMessage::Error(e) } if e.code == ErrorCode::Fenced)));
        assert!(a.contains(&Action::Close { conn: 11 }));
        assert!(a.contains(&Action::Propose(Command::Restore {
            job: name(),
            generation: Generation(2),
            from: Some(c),
            reason: RestoreReason::WorkerRestarted,
            now_ms: T0 + 10
        })));
        let out = run(&mut sup, &mut st, T0 + 10, a);
        let restores: Vec<&Action> = out
            .iter()
            .filter(|x| matches!(x, Action::Send { msg: CoordinatorMessage::Restore { .. }, .. }))
            .collect();
        assert_eq!(restores.len(), 2, "{out:?}");
        // both restored → resume at the checkpoint's step
        for conn in [10, 12] {
            let a = msg(
                &mut sup,
                &st,
                T0 + 20,
                conn,
                WorkerMessage::Restored { generation: Generation(2), step: Step(100) },
            );
            let out = run(&mut sup, &mut st, T0 + 20, a);
            if conn == 12 {
                assert!(out.contains(&Action::Send {
                    conn: 12,
                    msg: CoordinatorMessage::Resume { generation: Generation(2), step: Step(100) }
                }));
            }
        }
        assert_eq!(st.jobs[&name()].state, JobState::Running);
        // a late report from the old generation is refused
        let a = msg(
            &mut sup,
            &st,
            T0 + 30,
            10,
            WorkerMessage::ShardSaved {
                generation: Generation(1),
                checkpoint: CheckpointId(9),
                manifest: shard(0),
            },
        );
        assert!(
            matches!(&a[..], [Action::Send { msg: CoordinatorMessage::Error(e), .. }] if e.code == ErrorCode::Fenced)
        );
    }

    #[test]
    fn silence_and_closed_connections_are_failures_after_their_deadlines() {
        let (mut sup, st) = running();
        assert!(sup
            .tick(&st, T0 + 900)
            .iter()
            .all(|a| !matches!(a, Action::Propose(Command::Restore { .. }))));
        let a = sup.tick(&st, T0 + 1001);
        assert!(
            a.iter().any(|x| matches!(
                x,
                Action::Propose(Command::Restore { reason: RestoreReason::HeartbeatTimeout, .. })
            )),
            "{a:?}"
        );

        let (mut sup, st) = running();
        sup.observe(&st, T0 + 50, Observation::Disconnected { conn: 11 });
        assert!(!sup
            .tick(&st, T0 + 400)
            .iter()
            .any(|x| matches!(x, Action::Propose(Command::Restore { .. }))));
        let a = sup.tick(&st, T0 + 550);
        assert!(
            a.iter().any(|x| matches!(
                x,
                Action::Propose(Command::Restore { reason: RestoreReason::Disconnected, .. })
            )),
            "{a:?}"
        );
    }

    fn restoring_from_latest() -> (Supervisor, State, CheckpointId, CheckpointId) {
        let (mut sup, mut st) = running();
        let first = commit_checkpoint(&mut sup, &mut st, T0);
        let second = commit_checkpoint(&mut sup, &mut st, T0);
        let a = register(&mut sup, &st, T0 + 10, 12, 1, 999, None);
        run(&mut sup, &mut st, T0 + 10, a);
        assert_eq!(st.jobs[&name()].restored_from, Some(second));
        (sup, st, first, second)
    }

    #[test]
    fn a_corrupt_shard_marks_the_checkpoint_and_falls_back() {
        let (mut sup, mut st, first, second) = restoring_from_latest();
        let a = msg(
            &mut sup,
            &st,
            T0 + 20,
            12,
            WorkerMessage::RestoreFailed {
                generation: Generation(2),
                checkpoint: Some(second),
                kind: RestoreFailureKind::Corrupt,
                message: "checksum mismatch in model/x".into(),
            },
        );
        run(&mut sup, &mut st, T0 + 20, a);
        let j = &st.jobs[&name()];
        assert_eq!(j.checkpoints[&second].state, CheckpointState::Corrupt);
        assert_eq!((j.generation, j.restored_from), (Generation(3), Some(first)));
    }

    #[test]
    fn too_little_memory_blocks_and_a_reregistration_retries() {
        let (mut sup, mut st, _, second) = restoring_from_latest();
        let a = msg(
            &mut sup,
            &st,
            T0 + 20,
            12,
            WorkerMessage::RestoreFailed {
                generation: Generation(2),
                checkpoint: Some(second),
                kind: RestoreFailureKind::DeviceMemory,
                message: "rank 1 on host memory: restore needs 1.0 GiB, 0.0 GiB free".into(),
            },
        );
        run(&mut sup, &mut st, T0 + 20, a);
        assert_eq!(st.jobs[&name()].state, JobState::Blocked);
        assert!(st.jobs[&name()].error.as_ref().unwrap().contains("restore needs"));
        let a = register(&mut sup, &st, T0 + 30, 13, 1, 1000, None);
        run(&mut sup, &mut st, T0 + 30, a);
        let j = &st.jobs[&name()];
        assert_eq!(
            (j.state, j.generation, j.restored_from),
            (JobState::Restoring, Generation(3), Some(second))
        );
    }

    #[test]
    fn every_rank_finished_finishes_the_job_with_the_combined_digest() {
        let (mut sup, mut st) = running();
        for (conn, d) in [(10, "aa"), (11, "bb")] {
            let a = msg(
                &mut sup,
                &st,
                T0,
                conn,
                WorkerMessage::Finished { generation: Generation(1), step: Step(1000), digest: d.into() },
            );
            let out = run(&mut sup, &mut st, T0, a);
            if conn == 11 {
                assert!(out
                    .iter()
                    .any(|x| matches!(x, Action::Send { msg: CoordinatorMessage::Stop { .. }, .. })));
            }
        }
        let j = &st.jobs[&name()];
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(j.final_digest.as_deref(), Some(combine_digests(&["aa", "bb"]).as_str()));
    }

    #[test]
    fn an_operator_checkpoint_is_never_placed_at_or_behind_a_taken_one() {
        let (mut sup, mut st) = running();
        // checkpoint 1 at step 100 while the ranks are still at 0
        let c = commit_checkpoint(&mut sup, &mut st, T0);
        assert_eq!(st.jobs[&name()].checkpoints[&c].step, Step(100));
        let a = sup.observe(&st, T0 + 10, Observation::CheckpointRequested { job: name() });
        assert!(
            a.iter().any(|x| matches!(x, Action::Propose(Command::BeginCheckpoint { step: Step(101), .. }))),
            "{a:?}"
        );
        run(&mut sup, &mut st, T0 + 10, a);
        assert_eq!(st.jobs[&name()].checkpoints.len(), 2, "the ledger accepted it");
    }

    #[test]
    fn a_checkpoint_not_committed_in_time_is_aborted_and_collected() {
        let (mut sup, mut st) = running();
        for conn in [10, 11] {
            let hb = WorkerMessage::Heartbeat {
                generation: Generation(1),
                step: Step(90),
                status: WorkerStatus::Running,
            };
            msg(&mut sup, &st, T0 + 100, conn, hb);
        }
        let a = sup.tick(&st, T0 + 150);
        // ahead of where the ranks will be by the time they hear of it: a
        // multiple of every_steps past 90 + 0.9 steps/ms × (50 + 200) ms
        assert!(
            a.iter().any(|x| matches!(x, Action::Propose(Command::BeginCheckpoint { step: Step(400), .. }))),
            "{a:?}"
        );
        run(&mut sup, &mut st, T0 + 150, a);
        for conn in [10, 11] {
            let hb = WorkerMessage::Heartbeat {
                generation: Generation(1),
                step: Step(95),
                status: WorkerStatus::Running,
            };
            msg(&mut sup, &st, T0 + 5100, conn, hb);
        }
        let a = sup.tick(&st, T0 + 5200);
        let out = run(&mut sup, &mut st, T0 + 5200, a);
        assert_eq!(st.jobs[&name()].checkpoints[&CheckpointId(1)].state, CheckpointState::Aborted);
        assert!(out.contains(&Action::DeleteFiles { job: name(), id: CheckpointId(1) }));
        assert!(out
            .iter()
            .any(|x| matches!(x, Action::Send { msg: CoordinatorMessage::AbortCheckpoint { .. }, .. })));
    }
}
