//! What the ledger is asked ([`Command`]), what applying it changed
//! ([`Event`]), and why it was refused ([`Refusal`]).

use super::job::{AbortReason, JobState, NodeInfo, Origin, RestoreReason};
use flotilla_shared::ids::{CheckpointId, Generation, Incarnation, JobName, NodeId, Rank, Step};
use flotilla_shared::shard::ShardDigest;
use flotilla_shared::spec::JobSpec;
use flotilla_shared::wire::RestoreFailureKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A change to the ledger, replicated through Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A replica says how to reach it (so followers can point at the leader).
    Announce {
        /// The replica.
        node: NodeId,
        /// Its addresses.
        info: NodeInfo,
    },
    /// Add a job (idempotent for an identical spec).
    SubmitJob {
        /// The validated spec.
        spec: JobSpec,
        /// Submission time.
        now_ms: u64,
        /// The checkpoint `resume_from` names, read by the proposer.
        #[serde(default)]
        origin: Option<Box<Origin>>,
    },
    /// Every rank registered: start (or resume) training.
    StartJob {
        /// Job.
        job: JobName,
        /// The generation the caller saw.
        generation: Generation,
        /// The worker holding each rank in it (entries written before
        /// spares read empty: the mapping is then unknown).
        #[serde(default)]
        holders: BTreeMap<Rank, Incarnation>,
    },
    /// Start checkpoint `id` at `step`.
    BeginCheckpoint {
        /// Job.
        job: JobName,
        /// Must be the job's next id.
        id: CheckpointId,
        /// Must be ahead of the latest committed step.
        step: Step,
        /// Must be the job's current generation.
        generation: Generation,
        /// Time.
        now_ms: u64,
    },
    /// Every shard is durable: commit.
    CommitCheckpoint {
        /// Job.
        job: JobName,
        /// The pending checkpoint.
        id: CheckpointId,
        /// One manifest per rank.
        shards: Vec<ShardDigest>,
        /// Time.
        now_ms: u64,
    },
    /// Give up on a pending checkpoint.
    AbortCheckpoint {
        /// Job.
        job: JobName,
        /// The pending checkpoint.
        id: CheckpointId,
        /// Why.
        reason: AbortReason,
        /// Time.
        now_ms: u64,
    },
    /// A committed checkpoint's files are damaged (a checksum or format
    /// mismatch; never a missing or unreadable file).
    MarkCorrupt {
        /// Job.
        job: JobName,
        /// The checkpoint.
        id: CheckpointId,
        /// What is damaged: rank, file and tensor.
        reason: String,
        /// Time.
        #[serde(default)]
        now_ms: u64,
    },
    /// An operator re-verified a corrupt checkpoint's files: it is committed again.
    ClearCorrupt {
        /// Job.
        job: JobName,
        /// The checkpoint.
        id: CheckpointId,
        /// Time.
        now_ms: u64,
    },
    /// Forget an aborted, corrupt or superseded checkpoint (files collected after).
    DeleteCheckpoint {
        /// Job.
        job: JobName,
        /// The checkpoint.
        id: CheckpointId,
    },
    /// Whole-job restore into `generation` (= current + 1) from `from`.
    Restore {
        /// Job.
        job: JobName,
        /// Must be current + 1.
        generation: Generation,
        /// A committed checkpoint, or `None` for step 0.
        from: Option<CheckpointId>,
        /// Why.
        reason: RestoreReason,
        /// What happened, for people: the rank and, for a failed trainer,
        /// how it ended (shown in the job's events).
        #[serde(default)]
        detail: Option<String>,
        /// Time.
        now_ms: u64,
        /// Ranks given to spares in this generation change (the failed
        /// ranks' workers hold them no more).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        takeovers: Vec<Takeover>,
    },
    /// An operator's whole-job restore into `generation` (= current + 1)
    /// from checkpoint `from`, or, when `None`, from the latest committed
    /// checkpoint *as of when the command is applied* (a checkpoint that
    /// commits while the request travels is the latest, not abandoned).
    OperatorRestore {
        /// Job.
        job: JobName,
        /// Must be current + 1.
        generation: Generation,
        /// A committed (or abandoned) checkpoint, or the latest committed.
        from: Option<CheckpointId>,
        /// Time.
        now_ms: u64,
    },
    /// Every rank restored: train again.
    ResumeJob {
        /// Job.
        job: JobName,
        /// The restore's generation.
        generation: Generation,
        /// The worker holding each rank in it (as for `StartJob`).
        #[serde(default)]
        holders: BTreeMap<Rank, Incarnation>,
    },
    /// A restore cannot proceed: rank `rank` refused it, for `kind`;
    /// `error` says why in its words ([`BlockReason`]).
    BlockJob {
        /// Job.
        job: JobName,
        /// The restore's generation.
        generation: Generation,
        /// Why, for the operator (SPEC §10).
        error: String,
        /// The refused rank (entries written before it had one read `None`).
        #[serde(default)]
        rank: Option<Rank>,
        /// The kind of refusal (as for `rank`).
        #[serde(default)]
        kind: Option<RestoreFailureKind>,
        /// Time (for the job's events; entries written before it had one read 0).
        #[serde(default)]
        now_ms: u64,
    },
    /// Give up on the job.
    FailJob {
        /// Job.
        job: JobName,
        /// Why.
        error: String,
    },
    /// Every rank reached `total_steps`.
    FinishJob {
        /// Job.
        job: JobName,
        /// The generation that finished.
        generation: Generation,
        /// Digest of all ranks' final variables.
        digest: String,
        /// The step every rank finished at (`None`: proposed by a build
        /// that did not record it).
        #[serde(default)]
        step: Option<Step>,
    },
    /// An operator cancels the job: any pending checkpoint is aborted, the
    /// job becomes `cancelled` (terminal) and its workers are told to stop.
    CancelJob {
        /// Job.
        job: JobName,
        /// Time.
        now_ms: u64,
    },
    /// An operator removes a terminal job from the ledger; its name is free
    /// for a new job afterwards.
    DeleteJob {
        /// Job.
        job: JobName,
        /// The leader also removes the job's checkpoint directory
        /// (`<root>/<job>/`); without it the files stay.
        remove_checkpoints: bool,
    },
}

/// A rank given to a spare worker by a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Takeover {
    /// The rank.
    pub rank: Rank,
    /// The spare that takes it.
    pub worker: Incarnation,
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A job was added.
    JobSubmitted {
        /// Job.
        job: JobName,
    },
    /// The same spec was already there: nothing changed.
    JobAlreadySubmitted {
        /// Job.
        job: JobName,
    },
    /// The job's state changed.
    JobState {
        /// Job.
        job: JobName,
        /// New state.
        state: JobState,
    },
    /// A checkpoint began.
    CheckpointBegun {
        /// Job.
        job: JobName,
        /// Id.
        id: CheckpointId,
        /// Step.
        step: Step,
    },
    /// A checkpoint was committed (write MANIFEST.json and LATEST now).
    CheckpointCommitted {
        /// Job.
        job: JobName,
        /// Id.
        id: CheckpointId,
        /// Step.
        step: Step,
        /// Time from begin to commit.
        duration_ms: u64,
    },
    /// A checkpoint was aborted (its files are garbage).
    CheckpointAborted {
        /// Job.
        job: JobName,
        /// Id.
        id: CheckpointId,
        /// Why.
        reason: String,
    },
    /// A committed checkpoint was marked corrupt.
    CheckpointCorrupt {
        /// Job.
        job: JobName,
        /// Id.
        id: CheckpointId,
    },
    /// An operator cleared a corrupt verdict: the checkpoint is committed again.
    CheckpointCleared {
        /// Job.
        job: JobName,
        /// Id.
        id: CheckpointId,
    },
    /// A checkpoint was retired or collected: delete its files.
    CheckpointDeleted {
        /// Job.
        job: JobName,
        /// Id.
        id: CheckpointId,
    },
    /// A whole-job restore started.
    Restoring {
        /// Job.
        job: JobName,
        /// The new generation.
        generation: Generation,
        /// From where.
        from: Option<CheckpointId>,
        /// Why.
        reason: RestoreReason,
    },
    /// A job was removed from the ledger.
    JobDeleted {
        /// Job.
        job: JobName,
        /// Whether its checkpoint directory is to be removed too.
        remove_checkpoints: bool,
        /// Its checkpoint root (the directory is `<root>/<job>/`).
        root: std::path::PathBuf,
    },
}

/// Why a command was refused. The message names the thing and the way out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// What kind of refusal (for HTTP status codes).
    pub kind: RefusalKind,
    /// For people.
    pub message: String,
}

/// Kinds of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    /// The job or checkpoint does not exist.
    NotFound,
    /// It exists but conflicts (different spec, wrong state).
    Conflict,
    /// From an older (or a future) generation.
    Fenced,
    /// The command itself is malformed (e.g. shards missing).
    Invalid,
}

pub(super) fn refuse<T>(kind: RefusalKind, message: impl fmt::Display) -> Result<T, Refusal> {
    Err(Refusal { kind, message: message.to_string() })
}

impl Event {
    /// The job whose checkpoint files this event changes (a checkpoint
    /// committed, aborted, condemned, cleared or retired), if any.
    pub fn files_of(&self) -> Option<&JobName> {
        match self {
            Event::CheckpointCommitted { job, .. }
            | Event::CheckpointAborted { job, .. }
            | Event::CheckpointCorrupt { job, .. }
            | Event::CheckpointCleared { job, .. }
            | Event::CheckpointDeleted { job, .. } => Some(job),
            _ => None,
        }
    }
}

/// The result of applying one command.
pub type Outcome = Result<Vec<Event>, Refusal>;
