//! The replicated state machine: the job ledger.
//!
//! Pure and deterministic: [`State::apply`] takes a [`Command`] (time arrives
//! inside commands) and returns what happened, or why the command was
//! refused. No I/O, no clock, no randomness, so every replica that applies
//! the same log reaches the same state, and every rule is unit-tested here.
//!
//! Checkpoint ledger, per job:
//! ```text
//!   Begin ──► Pending ──Commit──► Committed ──MarkCorrupt──► Corrupt ──ClearCorrupt──► Committed
//!                │                    │    └──operator restore to an older one──► Abandoned
//!                └──Abort──► Aborted  └──(retention)/Delete──► Deleted ◄──(retention)/Delete
//! ```
//! Rules kept: a committed checkpoint is never un-committed (only marked
//! corrupt after a checksum or format mismatch, abandoned by an operator's
//! rollback, or retired); a commit needs one shard per rank of the
//! checkpoint's own generation; the generation never decreases; a
//! `succeeded` or `cancelled` job changes no more, a `failed` one only
//! through an operator's restore; only a job in one of those three states
//! is deleted (its name is then free for a new job).

use flotilla_shared::ids::{CheckpointId, Generation, JobName, NodeId, Rank, Step};
use flotilla_shared::layout::JobDir;
use flotilla_shared::shard::ShardDigest;
use flotilla_shared::spec::JobSpec;
use flotilla_shared::wire::RestoreFailureKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A job's lifecycle state (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Submitted; waiting for every rank to register.
    Waiting,
    /// Training.
    Running,
    /// A whole-job restore is in progress.
    Restoring,
    /// A restore cannot proceed (`error` says why); retried when a worker re-registers.
    Blocked,
    /// Every rank reached `total_steps`.
    Succeeded,
    /// Gave up (e.g. more than `max_restarts` restores).
    Failed,
    /// An operator cancelled it (`flotilla cancel`): its workers are told to stop.
    Cancelled,
}

impl JobState {
    /// `succeeded`, `failed` or `cancelled`: the job trains no more (a
    /// failed one only through an operator's restore), and may be deleted.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// Every state, in the order status and metrics list them.
    pub const ALL: [JobState; 7] = [
        JobState::Waiting,
        JobState::Running,
        JobState::Restoring,
        JobState::Blocked,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The name used in status JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Restoring => "restoring",
            JobState::Blocked => "blocked",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A checkpoint's state in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointState {
    /// Begun; shards are being written.
    Pending,
    /// Every shard durable and the commit applied: restorable.
    Committed,
    /// Given up before commit; its files are garbage.
    Aborted,
    /// Was committed, then found damaged on restore (checksum or format);
    /// never restored automatically again unless an operator clears it.
    Corrupt,
    /// Committed on a line of history an operator rolled back from (a restore
    /// to an older checkpoint): never restored automatically again.
    Abandoned,
    /// Retired (retention) or collected; its files are deleted.
    Deleted,
}

impl CheckpointState {
    /// The name used in status JSON and `flotilla checkpoints` (`Corrupt` is
    /// `condemned` there, the word of the events, the metrics and `--help`;
    /// the ledger's own encoding keeps `corrupt`).
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointState::Pending => "pending",
            CheckpointState::Committed => "committed",
            CheckpointState::Aborted => "aborted",
            CheckpointState::Corrupt => "condemned",
            CheckpointState::Abandoned => "abandoned",
            CheckpointState::Deleted => "deleted",
        }
    }
}

/// One checkpoint of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Its id.
    pub id: CheckpointId,
    /// The step every rank snapshots at.
    pub step: Step,
    /// The generation it belongs to.
    pub generation: Generation,
    /// Where it is in the ledger.
    pub state: CheckpointState,
    /// When it was begun (ms since the epoch, from the command).
    pub begun_ms: u64,
    /// When it was committed or aborted.
    pub ended_ms: Option<u64>,
    /// The shards, one per rank, once committed.
    pub shards: Vec<ShardDigest>,
    /// Why it was aborted or marked corrupt.
    pub reason: Option<String>,
    /// Why it was aborted, typed (absent for aborts by a restore or the job's end).
    #[serde(default)]
    pub abort: Option<AbortReason>,
}

impl Checkpoint {
    /// Total bytes of its shards (0 until committed); saturating, as the
    /// figures are what workers reported.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().fold(0, |sum, s| sum.saturating_add(s.bytes))
    }
}

/// Why a whole-job restore happened (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreReason {
    /// A worker stopped heartbeating.
    HeartbeatTimeout,
    /// A worker's connection closed and it did not come back in the grace period.
    Disconnected,
    /// A worker re-registered with a new incarnation (its process restarted).
    WorkerRestarted,
    /// A worker reported that its trainer crashed.
    TrainerFailed,
    /// The checkpoint being restored was corrupt; falling back.
    CorruptCheckpoint,
    /// A running rank's step did not advance for `failure.hang_timeout_seconds`.
    Hang,
    /// A blocked restore retried.
    Retry,
    /// An operator asked for it.
    Operator,
}

/// Why a pending checkpoint was aborted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// Not committed within `checkpoint.timeout_seconds` of the current
    /// leader taking charge of it.
    Timeout {
        /// The configured timeout.
        seconds: u64,
    },
    /// A rank was already past the step when told, and had not saved it.
    RankPastStep {
        /// The rank.
        rank: Rank,
    },
    /// A rank could not write its shard.
    WriteFailed {
        /// The rank.
        rank: Rank,
        /// The worker's error.
        error: String,
    },
    /// A whole-job restore moved the job to a new generation.
    GenerationChanged,
    /// The job finished or failed.
    JobEnded,
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbortReason::Timeout { seconds } => {
                write!(f, "not committed within checkpoint.timeout_seconds = {seconds}")
            }
            AbortReason::RankPastStep { rank } => {
                write!(f, "rank {rank} was already past the step when told")
            }
            AbortReason::WriteFailed { rank, error } => {
                write!(f, "rank {rank} could not write its shard: {error}")
            }
            AbortReason::GenerationChanged => f.write_str("generation changed by a restore"),
            AbortReason::JobEnded => f.write_str("job ended"),
        }
    }
}

impl RestoreReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreReason::HeartbeatTimeout => "heartbeat_timeout",
            RestoreReason::Disconnected => "disconnected",
            RestoreReason::WorkerRestarted => "worker_restarted",
            RestoreReason::TrainerFailed => "trainer_failed",
            RestoreReason::CorruptCheckpoint => "corrupt_checkpoint",
            RestoreReason::Hang => "hang",
            RestoreReason::Retry => "retry",
            RestoreReason::Operator => "operator",
        }
    }

    /// Whether a restore for this reason is a failure, counted against
    /// `failure.max_restarts` (operator actions, retries and fallbacks past a
    /// corrupt checkpoint are not).
    pub fn is_failure(self) -> bool {
        !matches!(self, RestoreReason::CorruptCheckpoint | RestoreReason::Retry | RestoreReason::Operator)
    }
}

/// How long failures count against `failure.max_restarts`.
pub const RESTART_WINDOW_MS: u64 = 3_600_000;

/// How many notable events a job keeps for `status` (oldest dropped first).
pub const JOB_EVENTS_KEPT: usize = 32;

/// Why a job is blocked: the rank whose restore or start was refused, the
/// kind of refusal, and the worker's words with the figures (SPEC §10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockReason {
    /// The refused rank (`None`: blocked by a build that did not record it).
    #[serde(default)]
    pub rank: Option<Rank>,
    /// What kind of refusal (`None`: as for `rank`).
    #[serde(default)]
    pub kind: Option<RestoreFailureKind>,
    /// What the worker said, for people: it names the rank, the figures and
    /// the way out.
    pub detail: String,
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// What a job event records: the facts, from which [`JobEvent::text`] is
/// written. Readers decide on these, never on the text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobEventKind {
    /// The job starts from another job's checkpoint (`resume_from`).
    StartsFrom {
        /// That job.
        job: JobName,
        /// Its checkpoint.
        checkpoint: CheckpointId,
        /// The checkpoint's step.
        step: Step,
    },
    /// A committed checkpoint was found corrupt on a restore.
    Condemned {
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// The rank, file and tensor that failed.
        reason: String,
    },
    /// An operator cleared a condemned checkpoint.
    Reverified {
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// What it is now: committed, or abandoned.
        now: CheckpointState,
    },
    /// A restore (or the first start) was refused.
    Blocked(BlockReason),
    /// A whole-job restore into a new generation.
    Restore {
        /// The new generation.
        generation: Generation,
        /// The checkpoint restored from (`None`: step 0, or the origin).
        from: Option<CheckpointId>,
        /// The step it goes back to.
        step: Step,
        /// Why.
        reason: RestoreReason,
        /// More about why (the failed rank), if anything.
        detail: Option<String>,
    },
    /// Every committed checkpoint of the job was condemned: the restore
    /// goes back to the job's start.
    EveryCheckpointCondemned {
        /// Checkpoints condemned over the job's life.
        condemned: u64,
        /// The step the job goes back to (0, or its origin's).
        step: Step,
    },
    /// An operator cancelled the job.
    Cancelled {
        /// Checkpoints that were pending and are aborted with it.
        aborted: Vec<CheckpointId>,
    },
    /// Failures within an hour exceeded `failure.max_restarts`.
    RestartsExceeded {
        /// The job.
        job: JobName,
        /// Failures within the hour.
        failures: u64,
        /// The limit.
        max_restarts: u32,
    },
}

impl fmt::Display for JobEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobEventKind::StartsFrom { job, checkpoint, step } => {
                write!(f, "starts from checkpoint {checkpoint} (step {step}) of job {job} (resume_from)")
            }
            JobEventKind::Condemned { checkpoint, reason } => {
                write!(f, "checkpoint {checkpoint} condemned: {reason}")
            }
            JobEventKind::Reverified { checkpoint, now } => {
                let what = match now {
                    CheckpointState::Abandoned => "abandoned (an operator's restore went back before it)",
                    _ => "committed again",
                };
                write!(f, "checkpoint {checkpoint} re-verified by an operator: {what}")
            }
            JobEventKind::Blocked(reason) => write!(f, "blocked: {reason}"),
            JobEventKind::Restore { generation, from, step, reason, detail } => {
                write!(f, "restore into generation {generation} from ")?;
                match from {
                    Some(id) => write!(f, "checkpoint {id} (step {step})")?,
                    None => f.write_str("step 0")?,
                }
                write!(f, ": {}", reason.as_str())?;
                match detail {
                    Some(d) => write!(f, " ({d})"),
                    None => Ok(()),
                }
            }
            JobEventKind::EveryCheckpointCondemned { condemned, step } => write!(
                f,
                "every committed checkpoint was condemned ({condemned} over the job's life): the job starts again from step {step}; \
                 see OPERATIONS.md, \"Every checkpoint condemned\""
            ),
            JobEventKind::Cancelled { aborted } => {
                f.write_str("cancelled by an operator (flotilla cancel)")?;
                match aborted.as_slice() {
                    [] => Ok(()),
                    [id] => write!(f, "; pending checkpoint {id} aborted"),
                    ids => {
                        let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
                        write!(f, "; pending checkpoints {} aborted", ids.join(", "))
                    }
                }
            }
            JobEventKind::RestartsExceeded { job, failures, max_restarts } => write!(
                f,
                "job {job} failed: {failures} failures within an hour exceed failure.max_restarts = {max_restarts}; \
                 fix the cause, then resume it with flotilla restore --job {job}"
            ),
        }
    }
}

/// A notable event in a job's history (restores, condemned checkpoints,
/// operator actions), shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    /// When (ms since the epoch, from the command).
    pub at_ms: u64,
    /// What happened, for people (written from `kind` when the event was
    /// applied; kept so that every build can show it).
    pub text: String,
    /// What happened (`None`: an event of a build that did not record it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<JobEventKind>,
}

/// A job in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The spec as submitted.
    pub spec: JobSpec,
    /// Lifecycle state.
    pub state: JobState,
    /// 1 at submission, +1 per whole-job restore.
    pub generation: Generation,
    /// Whole-job restores so far.
    pub restores: u32,
    /// The checkpoint the current generation started from (`None`: step 0).
    pub restored_from: Option<CheckpointId>,
    /// Every checkpoint not yet forgotten, by id.
    pub checkpoints: BTreeMap<CheckpointId, Checkpoint>,
    /// The next checkpoint id to hand out.
    pub next_checkpoint: CheckpointId,
    /// Why the job is blocked or failed, for people.
    pub error: Option<String>,
    /// Why the job is blocked, as facts (`None` unless blocked, and for a
    /// block applied by a build that did not record it).
    #[serde(default)]
    pub blocked: Option<BlockReason>,
    /// Restores that went back to the start because every committed
    /// checkpoint had been condemned.
    #[serde(default)]
    pub every_condemned_total: u64,
    /// Digest of all ranks' final variables, once succeeded.
    pub final_digest: Option<String>,
    /// The step every rank finished at, once succeeded (`None`: finished
    /// under a build that did not record it).
    #[serde(default)]
    pub final_step: Option<Step>,
    /// Submission time (ms since the epoch).
    pub submitted_ms: u64,
    /// Checkpoints committed over the job's life (retired ones included).
    #[serde(default)]
    pub committed_total: u64,
    /// Checkpoints aborted over the job's life.
    #[serde(default)]
    pub aborted_total: u64,
    /// The generation an operator's restore started and the step it went
    /// back to: checkpoints of earlier generations beyond that step are on
    /// the line the operator abandoned (a condemned one cleared later comes
    /// back abandoned, not committed).
    #[serde(default)]
    pub operator_head: Option<(Generation, Step)>,
    /// Tombstones (aborted or deleted checkpoints) forgotten so far: the
    /// ledger keeps the newest [`TOMBSTONES`] of them, without manifests.
    #[serde(default)]
    pub pruned_total: u64,
    /// Committed checkpoints condemned (checksum or format mismatch) over the job's life.
    #[serde(default)]
    pub condemned_total: u64,
    /// The last checkpoint condemned, if any.
    #[serde(default)]
    pub last_condemned: Option<CheckpointId>,
    /// Whole-job restores by reason.
    #[serde(default)]
    pub restores_by_reason: BTreeMap<RestoreReason, u64>,
    /// When the failure-caused restores of the last [`RESTART_WINDOW_MS`] happened.
    #[serde(default)]
    pub failures_ms: Vec<u64>,
    /// The latest notable events, oldest first (at most [`JOB_EVENTS_KEPT`]).
    #[serde(default)]
    pub events: Vec<JobEvent>,
    /// The other job's checkpoint this job started from, if any.
    #[serde(default)]
    pub origin: Option<Box<Origin>>,
}

impl Job {
    /// The latest committed checkpoint (highest step, then highest id).
    pub fn latest_committed(&self) -> Option<&Checkpoint> {
        self.checkpoints
            .values()
            .filter(|c| c.state == CheckpointState::Committed)
            .max_by_key(|c| (c.step, c.id))
    }

    /// The committed checkpoint to fall back to when `bad` is unusable.
    pub fn committed_before(&self, bad: CheckpointId) -> Option<&Checkpoint> {
        self.checkpoints
            .values()
            .filter(|c| c.state == CheckpointState::Committed && c.id != bad)
            .max_by_key(|c| (c.step, c.id))
    }

    /// The pending checkpoint, if one is in flight.
    pub fn pending(&self) -> Option<&Checkpoint> {
        self.checkpoints.values().find(|c| c.state == CheckpointState::Pending)
    }

    /// The step the current generation started from: its checkpoint's, else
    /// the origin's (`resume_from`), else 0.
    pub fn start_step(&self) -> Step {
        match self.restored_from.and_then(|id| self.checkpoints.get(&id)) {
            Some(c) => c.step,
            None => self.origin.as_ref().map_or(Step(0), |o| o.step),
        }
    }

    /// Why the job is blocked, if it is (a block applied by an older
    /// build has only its words).
    pub fn block_reason(&self) -> Option<BlockReason> {
        if self.state != JobState::Blocked {
            return None;
        }
        self.blocked.clone().or_else(|| {
            self.error.as_ref().map(|e| BlockReason { rank: None, kind: None, detail: e.clone() })
        })
    }

    fn note(&mut self, at_ms: u64, kind: JobEventKind) {
        if self.events.len() >= JOB_EVENTS_KEPT {
            self.events.remove(0);
        }
        self.events.push(JobEvent { at_ms, text: kind.to_string(), kind: Some(kind) });
    }
}

/// A committed checkpoint of another job that a job starts from
/// (`[checkpoint] resume_from`), read by the leader when the job is submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    /// The job it belongs to.
    pub job: JobName,
    /// Its id in that job.
    pub id: CheckpointId,
    /// Its step.
    pub step: Step,
    /// Its directory.
    pub dir: std::path::PathBuf,
    /// One shard per rank, with the checksums to verify.
    pub shards: Vec<ShardDigest>,
}

/// How to reach a coordinator replica, as it announced itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its HTTP base URL (status, admin API, metrics).
    pub http_url: String,
    /// Its worker API address, if it serves workers.
    pub api_addr: Option<String>,
}

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

fn refuse<T>(kind: RefusalKind, message: impl fmt::Display) -> Result<T, Refusal> {
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

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Every job, by name. Shared with the snapshots the Raft node
    /// publishes: a job is copied only when a command changes it while a
    /// reader holds an older snapshot (serialized as the job itself).
    pub jobs: BTreeMap<JobName, Arc<Job>>,
    /// Every replica that announced itself.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// The Raft addresses of replicas added by membership changes (the
    /// first ones are in every replica's `--peers`).
    #[serde(default)]
    pub replicas: BTreeMap<NodeId, String>,
}

impl State {
    /// Applies one command.
    pub fn apply(&mut self, cmd: Command) -> Outcome {
        let outcome = self.apply_command(cmd);
        if outcome.is_ok() {
            for j in self.jobs.values_mut().filter(|j| needs_prune(j)) {
                prune(Arc::make_mut(j));
            }
        }
        outcome
    }

    fn apply_command(&mut self, cmd: Command) -> Outcome {
        match cmd {
            Command::Announce { node, info } => {
                self.nodes.insert(node, info);
                Ok(vec![])
            }
            Command::SubmitJob { spec, now_ms, origin } => self.submit(spec, now_ms, origin),
            Command::StartJob { job, generation } => {
                let j = self.live_job(&job, generation)?;
                if j.state != JobState::Waiting {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} is {}, not waiting", j.state.as_str()),
                    );
                }
                Ok(set_state(j, &job, JobState::Running, None))
            }
            Command::BeginCheckpoint { job, id, step, generation, now_ms } => {
                let j = self.live_job(&job, generation)?;
                if j.state != JobState::Running {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "job {job} is {}; checkpoints are taken only while it runs",
                            j.state.as_str()
                        ),
                    );
                }
                if let Some(p) = j.pending() {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} already has checkpoint {} in flight; wait for it", p.id),
                    );
                }
                if id != j.next_checkpoint {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("checkpoint {id} of job {job} is not the next id ({})", j.next_checkpoint),
                    );
                }
                if let Some(latest) = j.latest_committed() {
                    if step <= latest.step {
                        return refuse(
                            RefusalKind::Invalid,
                            format!(
                                "checkpoint step {step} of job {job} is not after the latest committed step {}",
                                latest.step
                            ),
                        );
                    }
                }
                j.next_checkpoint = CheckpointId(id.0 + 1);
                j.checkpoints.insert(
                    id,
                    Checkpoint {
                        id,
                        step,
                        generation,
                        state: CheckpointState::Pending,
                        begun_ms: now_ms,
                        ended_ms: None,
                        shards: Vec::new(),
                        reason: None,
                        abort: None,
                    },
                );
                Ok(vec![Event::CheckpointBegun { job, id, step }])
            }
            Command::CommitCheckpoint { job, id, shards, now_ms } => self.commit(job, id, shards, now_ms),
            Command::AbortCheckpoint { job, id, reason, now_ms } => {
                let abort = reason.clone();
                let reason = reason.to_string();
                let j = self.job_mut(&job)?;
                let c = checkpoint_mut(j, &job, id)?;
                if c.state != CheckpointState::Pending {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "checkpoint {id} of job {job} is {}; only a pending one can be aborted",
                            c.state.as_str()
                        ),
                    );
                }
                c.state = CheckpointState::Aborted;
                c.ended_ms = Some(now_ms);
                c.reason = Some(reason.clone());
                c.abort = Some(abort);
                j.aborted_total += 1;
                Ok(vec![Event::CheckpointAborted { job, id, reason }])
            }
            Command::MarkCorrupt { job, id, reason, now_ms } => {
                let j = self.job_mut(&job)?;
                let c = checkpoint_mut(j, &job, id)?;
                match c.state {
                    CheckpointState::Corrupt => Ok(vec![]),
                    CheckpointState::Committed => {
                        c.state = CheckpointState::Corrupt;
                        c.reason = Some(reason.clone());
                        j.condemned_total += 1;
                        j.last_condemned = Some(id);
                        j.note(now_ms, JobEventKind::Condemned { checkpoint: id, reason: reason.clone() });
                        Ok(vec![Event::CheckpointCorrupt { job, id }])
                    }
                    other => refuse(
                        RefusalKind::Conflict,
                        format!(
                            "checkpoint {id} of job {job} is {}; only a committed one can be marked corrupt",
                            other.as_str()
                        ),
                    ),
                }
            }
            Command::ClearCorrupt { job, id, now_ms } => {
                self.clearable(&job, id)?;
                let j = self.job_mut(&job)?;
                let head = j.operator_head;
                let c = checkpoint_mut(j, &job, id)?;
                let abandoned = head.is_some_and(|(g, s)| c.generation < g && c.step > s);
                let state = if abandoned { CheckpointState::Abandoned } else { CheckpointState::Committed };
                c.state = state;
                c.reason = abandoned.then(|| "on the line abandoned by an operator's restore".to_string());
                j.note(now_ms, JobEventKind::Reverified { checkpoint: id, now: state });
                Ok(vec![Event::CheckpointCleared { job, id }])
            }
            Command::DeleteCheckpoint { job, id } => {
                let j = self.job_mut(&job)?;
                let latest = j.latest_committed().map(|c| c.id);
                let c = checkpoint_mut(j, &job, id)?;
                match c.state {
                    CheckpointState::Deleted => Ok(vec![]),
                    CheckpointState::Pending => refuse(
                        RefusalKind::Conflict,
                        format!("checkpoint {id} of job {job} is pending; abort it first"),
                    ),
                    CheckpointState::Committed if latest == Some(id) => refuse(
                        RefusalKind::Conflict,
                        format!("checkpoint {id} is the latest committed checkpoint of job {job}; it is never deleted"),
                    ),
                    _ => {
                        c.state = CheckpointState::Deleted;
                        Ok(vec![Event::CheckpointDeleted { job, id }])
                    }
                }
            }
            Command::Restore { job, generation, from, reason, detail, now_ms } => {
                self.restore(job, generation, from, reason, detail, now_ms)
            }
            Command::OperatorRestore { job, generation, from, now_ms } => {
                let j = self.job_mut(&job)?;
                // a checkpoint that is not there is named first, whatever the job's state
                if let Some(id) = from {
                    checkpoint_mut(j, &job, id)?;
                }
                let Some(from) = from.or_else(|| j.latest_committed().map(|c| c.id)) else {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "job {job} has no committed checkpoint to restore from; take one with flotilla checkpoint --job {job}"
                        ),
                    );
                };
                self.restore(job, generation, Some(from), RestoreReason::Operator, None, now_ms)
            }
            Command::ResumeJob { job, generation } => {
                let j = self.live_job(&job, generation)?;
                if j.state != JobState::Restoring && j.state != JobState::Blocked {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} is {}, not restoring", j.state.as_str()),
                    );
                }
                Ok(set_state(j, &job, JobState::Running, None))
            }
            Command::BlockJob { job, generation, error, rank, kind, now_ms } => {
                let j = self.live_job(&job, generation)?;
                if !matches!(j.state, JobState::Restoring | JobState::Blocked | JobState::Waiting) {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} is {}, not restoring", j.state.as_str()),
                    );
                }
                let reason = BlockReason { rank, kind, detail: error };
                // a retried block for the same reason is one event, not one per retry
                if j.block_reason().as_ref() != Some(&reason) {
                    j.note(now_ms, JobEventKind::Blocked(reason.clone()));
                }
                let events = set_state(j, &job, JobState::Blocked, Some(reason.detail.clone()));
                j.blocked = Some(reason);
                Ok(events)
            }
            Command::FailJob { job, error } => {
                let j = self.job_mut(&job)?;
                if j.state.is_terminal() {
                    return refuse(RefusalKind::Conflict, format!("job {job} already {}", j.state.as_str()));
                }
                let mut events = abort_pending(j, &job, &AbortReason::JobEnded.to_string(), None);
                events.extend(set_state(j, &job, JobState::Failed, Some(error)));
                Ok(events)
            }
            Command::FinishJob { job, generation, digest, step } => {
                let j = self.live_job(&job, generation)?;
                if j.state != JobState::Running {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} is {}, not running", j.state.as_str()),
                    );
                }
                j.final_digest = Some(digest);
                j.final_step = step;
                let mut events = abort_pending(j, &job, &AbortReason::JobEnded.to_string(), None);
                events.extend(set_state(j, &job, JobState::Succeeded, None));
                Ok(events)
            }
            Command::CancelJob { job, now_ms } => {
                let j = self.job_mut(&job)?;
                if j.state.is_terminal() {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "job {job} already {}; nothing to cancel (flotilla delete --job {job} removes it)",
                            j.state.as_str()
                        ),
                    );
                }
                let mut events = abort_pending(j, &job, "job cancelled by an operator", Some(now_ms));
                let aborted = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::CheckpointAborted { id, .. } => Some(*id),
                        _ => None,
                    })
                    .collect();
                j.note(now_ms, JobEventKind::Cancelled { aborted });
                events.extend(set_state(j, &job, JobState::Cancelled, None));
                Ok(events)
            }
            Command::DeleteJob { job, remove_checkpoints } => self.delete_job(job, remove_checkpoints),
        }
    }

    fn delete_job(&mut self, job: JobName, remove_checkpoints: bool) -> Outcome {
        let j = self.job_mut(&job)?;
        if !j.state.is_terminal() {
            return refuse(
                RefusalKind::Conflict,
                format!(
                    "job {job} is {}; only a succeeded, failed or cancelled job is deleted: cancel it first (flotilla cancel --job {job})",
                    j.state.as_str()
                ),
            );
        }
        let root = j.spec.checkpoint.root.clone();
        if remove_checkpoints {
            // a live job that started from one of its checkpoints may still
            // restore from it
            let user = self.jobs.values().find(|other| {
                !other.state.is_terminal() && other.origin.as_ref().is_some_and(|o| o.job == job)
            });
            if let Some(other) = user {
                return refuse(
                    RefusalKind::Conflict,
                    format!(
                        "job {} is {} and starts from a checkpoint of job {job} (resume_from); delete job {job} without --remove-checkpoints, or once job {} has ended",
                        other.spec.name,
                        other.state.as_str(),
                        other.spec.name
                    ),
                );
            }
        }
        self.jobs.remove(&job);
        Ok(vec![Event::JobDeleted { job, remove_checkpoints, root }])
    }

    fn submit(&mut self, spec: JobSpec, now_ms: u64, origin: Option<Box<Origin>>) -> Outcome {
        if let Err(e) = spec.validate() {
            return refuse(RefusalKind::Invalid, e);
        }
        match (&spec.checkpoint.resume_from, &origin) {
            (Some(from), None) => {
                return refuse(
                    RefusalKind::Invalid,
                    format!("checkpoint.resume_from = {}: its checkpoint was not read", from.display()),
                )
            }
            (_, Some(o)) if o.shards.len() != spec.world_size as usize => {
                return refuse(
                    RefusalKind::Invalid,
                    format!(
                        "checkpoint.resume_from: checkpoint {} of job {} has {} shards, job {} has world_size {}; resume with the same number of ranks",
                        o.id,
                        o.job,
                        o.shards.len(),
                        spec.name,
                        spec.world_size
                    ),
                )
            }
            _ => {}
        }
        let name = spec.name.clone();
        if let Some(existing) = self.jobs.get(&name) {
            if existing.spec == spec {
                return Ok(vec![Event::JobAlreadySubmitted { job: name }]);
            }
            return refuse(
                RefusalKind::Conflict,
                format!("job {name} already exists with a different spec; submit it under a new name"),
            );
        }
        // a job that resumes from a deleted job of its own name, in its own
        // directory, numbers its checkpoints after that one: it never
        // writes into the directory it starts from, nor into older ones
        let own_dir = JobDir::new(&spec.checkpoint.root, &name);
        let first_id = origin
            .as_ref()
            .filter(|o| o.job == name && o.dir.starts_with(own_dir.path()))
            .map_or(CheckpointId(1), |o| CheckpointId(o.id.0 + 1));
        self.jobs.insert(
            name.clone(),
            Arc::new(Job {
                spec,
                state: JobState::Waiting,
                generation: Generation(1),
                restores: 0,
                restored_from: None,
                checkpoints: BTreeMap::new(),
                next_checkpoint: first_id,
                error: None,
                final_digest: None,
                final_step: None,
                submitted_ms: now_ms,
                committed_total: 0,
                aborted_total: 0,
                pruned_total: 0,
                operator_head: None,
                condemned_total: 0,
                last_condemned: None,
                restores_by_reason: BTreeMap::new(),
                failures_ms: Vec::new(),
                blocked: None,
                every_condemned_total: 0,
                events: origin
                    .iter()
                    .map(|o| {
                        let kind =
                            JobEventKind::StartsFrom { job: o.job.clone(), checkpoint: o.id, step: o.step };
                        JobEvent { at_ms: now_ms, text: kind.to_string(), kind: Some(kind) }
                    })
                    .collect(),
                origin,
            }),
        );
        Ok(vec![Event::JobSubmitted { job: name }])
    }

    fn commit(
        &mut self,
        job: JobName,
        id: CheckpointId,
        mut shards: Vec<ShardDigest>,
        now_ms: u64,
    ) -> Outcome {
        let j = self.job_mut(&job)?;
        let world = j.spec.world_size;
        let (keep_last, job_generation) = (j.spec.checkpoint.keep_last as usize, j.generation);
        let c = checkpoint_mut(j, &job, id)?;
        if c.state != CheckpointState::Pending {
            return refuse(
                RefusalKind::Conflict,
                format!(
                    "checkpoint {id} of job {job} is {}; only a pending one can be committed",
                    c.state.as_str()
                ),
            );
        }
        if c.generation != job_generation {
            return refuse(
                RefusalKind::Fenced,
                format!(
                    "checkpoint {id} of job {job} belongs to generation {}, the job is in {job_generation}",
                    c.generation
                ),
            );
        }
        shards.sort_by_key(|s| s.rank);
        let ranks: Vec<Rank> = shards.iter().map(|s| s.rank).collect();
        let want: Vec<Rank> = (0..world).map(Rank).collect();
        if ranks != want {
            let missing: Vec<String> =
                want.iter().filter(|r| !ranks.contains(r)).map(|r| r.to_string()).collect();
            return refuse(
                RefusalKind::Invalid,
                format!(
                    "checkpoint {id} of job {job} needs exactly one shard per rank 0..{world}; missing ranks [{}], got {} shards",
                    missing.join(", "),
                    shards.len()
                ),
            );
        }
        c.state = CheckpointState::Committed;
        c.ended_ms = Some(now_ms);
        c.shards = shards;
        let step = c.step;
        let duration_ms = now_ms.saturating_sub(c.begun_ms);
        j.committed_total += 1;
        let mut events = vec![Event::CheckpointCommitted { job: job.clone(), id, step, duration_ms }];

        // retention: keep the newest `keep_last` committed, retire the rest;
        // a corrupt or abandoned checkpoint goes once `keep_last` committed
        // ones are newer than it (until then an operator can still re-verify
        // or restore it). Ledger first; the leader deletes the files.
        let mut committed: Vec<(Step, CheckpointId)> = j
            .checkpoints
            .values()
            .filter(|c| c.state == CheckpointState::Committed)
            .map(|c| (c.step, c.id))
            .collect();
        committed.sort_unstable_by(|a, b| b.cmp(a));
        let mut retired: Vec<CheckpointId> = committed.iter().skip(keep_last).map(|(_, id)| *id).collect();
        retired.extend(
            j.checkpoints
                .values()
                .filter(|c| matches!(c.state, CheckpointState::Corrupt | CheckpointState::Abandoned))
                .filter(|c| committed.iter().filter(|(_, newer)| *newer > c.id).count() >= keep_last)
                .map(|c| c.id),
        );
        for old in retired {
            if let Some(c) = j.checkpoints.get_mut(&old) {
                c.state = CheckpointState::Deleted;
                events.push(Event::CheckpointDeleted { job: job.clone(), id: old });
            }
        }
        Ok(events)
    }

    fn restore(
        &mut self,
        job: JobName,
        generation: Generation,
        from: Option<CheckpointId>,
        reason: RestoreReason,
        detail: Option<String>,
        now_ms: u64,
    ) -> Outcome {
        let j = self.job_mut(&job)?;
        match j.state {
            JobState::Succeeded => {
                return refuse(
                    RefusalKind::Conflict,
                    format!("job {job} succeeded; a finished job is not restored (submit a new job with [checkpoint] resume_from to start from its checkpoints)"),
                )
            }
            JobState::Cancelled => {
                return refuse(
                    RefusalKind::Conflict,
                    format!("job {job} was cancelled; a cancelled job is not restored (delete it with flotilla delete --job {job}, then submit it again; [checkpoint] resume_from starts from its checkpoints)"),
                )
            }
            JobState::Failed if reason != RestoreReason::Operator => {
                return refuse(
                    RefusalKind::Conflict,
                    format!("job {job} failed; only an operator's restore (flotilla restore) resumes it"),
                )
            }
            _ => {}
        }
        let next = Generation(j.generation.0 + 1);
        if generation != next {
            return refuse(
                RefusalKind::Fenced,
                format!("restore of job {job} into generation {generation}: the job is in {}, so the next is {next}", j.generation),
            );
        }
        let operator = reason == RestoreReason::Operator;
        let step = match from {
            Some(id) => {
                let c = checkpoint_mut(j, &job, id)?;
                // an operator may also go back to a checkpoint of a line
                // they abandoned earlier; nothing else restores from one
                let usable = c.state == CheckpointState::Committed
                    || (operator && c.state == CheckpointState::Abandoned);
                if !usable {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "checkpoint {id} of job {job} is {}; only a committed checkpoint is restored from (flotilla checkpoints --job {job} lists them)",
                            c.state.as_str()
                        ),
                    );
                }
                c.state = CheckpointState::Committed;
                c.step
            }
            None => Step(0),
        };
        let mut events = abort_pending(j, &job, &AbortReason::GenerationChanged.to_string(), Some(now_ms));
        if operator {
            // the operator's choice is the head of the job's history: the
            // line after it is never restored automatically again
            for c in j.checkpoints.values_mut() {
                if c.state == CheckpointState::Committed && c.step > step {
                    c.state = CheckpointState::Abandoned;
                    c.reason = Some(format!("abandoned by an operator's restore to step {step}"));
                }
            }
            // an operator's restore is a fresh start for the failure budget
            j.failures_ms.clear();
            j.operator_head = Some((generation, step));
        }
        j.generation = generation;
        j.restores += 1;
        *j.restores_by_reason.entry(reason).or_default() += 1;
        j.restored_from = from;
        j.note(now_ms, JobEventKind::Restore { generation, from, step, reason, detail });
        if from.is_none() && reason == RestoreReason::CorruptCheckpoint {
            // nothing committed is left to go back to: loud, not a quiet step 0
            j.every_condemned_total += 1;
            let condemned = j.condemned_total;
            j.note(now_ms, JobEventKind::EveryCheckpointCondemned { condemned, step: j.start_step() });
        }
        if reason.is_failure() {
            j.failures_ms.retain(|t| now_ms.saturating_sub(*t) < RESTART_WINDOW_MS);
            j.failures_ms.push(now_ms);
            if j.failures_ms.len() as u64 > u64::from(j.spec.failure.max_restarts) {
                let exceeded = JobEventKind::RestartsExceeded {
                    job: job.clone(),
                    failures: j.failures_ms.len() as u64,
                    max_restarts: j.spec.failure.max_restarts,
                };
                let error = exceeded.to_string();
                j.note(now_ms, exceeded);
                events.extend(set_state(j, &job, JobState::Failed, Some(error)));
                return Ok(events);
            }
        }
        events.push(Event::Restoring { job: job.clone(), generation, from, reason });
        events.extend(set_state(j, &job, JobState::Restoring, None));
        Ok(events)
    }

    /// The condemned checkpoint `id` of `job`, which `ClearCorrupt` may
    /// commit again; or why not. Asked before its shards are re-read, so
    /// nothing is read for a checkpoint the ledger would refuse.
    pub fn clearable(&self, job: &JobName, id: CheckpointId) -> Result<(&Job, &Checkpoint), Refusal> {
        let Some(j) = self.jobs.get(job) else {
            return refuse(
                RefusalKind::NotFound,
                format!("no job named {job}; submit it first (flotilla submit)"),
            );
        };
        let Some(c) = j.checkpoints.get(&id) else {
            return refuse(
                RefusalKind::NotFound,
                format!("job {job} has no checkpoint {id}; list them with flotilla checkpoints"),
            );
        };
        if c.state != CheckpointState::Corrupt {
            let state = c.state.as_str();
            return refuse(
                RefusalKind::Conflict,
                format!("checkpoint {id} of job {job} is {state}; only a condemned one can be cleared"),
            );
        }
        Ok((j, c))
    }

    fn job_mut(&mut self, job: &JobName) -> Result<&mut Job, Refusal> {
        match self.jobs.get_mut(job) {
            Some(j) => Ok(Arc::make_mut(j)),
            None => refuse(
                RefusalKind::NotFound,
                format!("no job named {job}; submit it first (flotilla submit)"),
            ),
        }
    }

    /// The job, checked to be non-terminal and in `generation`.
    fn live_job(&mut self, job: &JobName, generation: Generation) -> Result<&mut Job, Refusal> {
        let j = self.job_mut(job)?;
        if j.state.is_terminal() {
            return refuse(RefusalKind::Conflict, format!("job {job} already {}", j.state.as_str()));
        }
        if j.generation != generation {
            return refuse(
                RefusalKind::Fenced,
                format!(
                    "job {job} is in generation {}, the command is for generation {generation}",
                    j.generation
                ),
            );
        }
        Ok(j)
    }
}

fn checkpoint_mut<'a>(
    j: &'a mut Job,
    job: &JobName,
    id: CheckpointId,
) -> Result<&'a mut Checkpoint, Refusal> {
    match j.checkpoints.get_mut(&id) {
        Some(c) => Ok(c),
        None => refuse(
            RefusalKind::NotFound,
            format!("job {job} has no checkpoint {id}; list them with flotilla checkpoints"),
        ),
    }
}

fn set_state(j: &mut Job, job: &JobName, state: JobState, error: Option<String>) -> Vec<Event> {
    j.error = error;
    j.blocked = None;
    if j.state == state {
        return vec![];
    }
    j.state = state;
    vec![Event::JobState { job: job.clone(), state }]
}

/// Aborted and deleted checkpoints kept in the ledger per job, newest first.
pub const TOMBSTONES: usize = 32;

/// Keeps the ledger bounded: an aborted or deleted checkpoint keeps only
/// its id, state, step and reason (a tombstone: its files are deleted from
/// it, and reports for it are answered Stale); beyond the newest
/// [`TOMBSTONES`], tombstones are forgotten (their directories are swept
/// as unknown to the ledger).
/// Whether [`prune`] would change `j` (most commands leave every job as it
/// was, and a job shared with a snapshot is then not copied).
fn needs_prune(j: &Job) -> bool {
    let mut tombstones = 0;
    for c in j.checkpoints.values().filter(|c| j.restored_from != Some(c.id)) {
        if matches!(c.state, CheckpointState::Aborted | CheckpointState::Deleted) {
            if !c.shards.is_empty() {
                return true;
            }
            tombstones += 1;
        }
    }
    tombstones > TOMBSTONES
}

fn prune(j: &mut Job) {
    let mut tombstones = Vec::new();
    for c in j.checkpoints.values_mut() {
        // the checkpoint the generation started from stays whole: its step
        // is the generation's start step, its shards the restore point
        if j.restored_from == Some(c.id) {
            continue;
        }
        if matches!(c.state, CheckpointState::Aborted | CheckpointState::Deleted) {
            c.shards = Vec::new();
            tombstones.push(c.id);
        }
    }
    let excess = tombstones.len().saturating_sub(TOMBSTONES);
    for id in &tombstones[..excess] {
        j.checkpoints.remove(id);
    }
    j.pruned_total += excess as u64;
}

fn abort_pending(j: &mut Job, job: &JobName, reason: &str, now_ms: Option<u64>) -> Vec<Event> {
    let mut events = Vec::new();
    for c in j.checkpoints.values_mut().filter(|c| c.state == CheckpointState::Pending) {
        c.state = CheckpointState::Aborted;
        c.ended_ms = now_ms.or(c.ended_ms);
        c.reason = Some(reason.to_string());
        events.push(Event::CheckpointAborted { job: job.clone(), id: c.id, reason: reason.to_string() });
    }
    j.aborted_total += events.len() as u64;
    events
}

#[cfg(test)]
mod tests;
