//! What the ledger holds of a job: its state, its checkpoints, why it
//! restored or blocked, and the events it keeps for people.

use super::{JobName, Step};
use flotilla_shared::ids::{CheckpointId, Generation, Incarnation, Rank};
use flotilla_shared::shard::ShardDigest;
use flotilla_shared::spec::JobSpec;
use flotilla_shared::wire::RestoreFailureKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

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

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `state == "running"`: the word of status JSON and metrics.
impl PartialEq<&str> for JobState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
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

    /// Every state.
    pub const ALL: [CheckpointState; 6] = [
        CheckpointState::Pending,
        CheckpointState::Committed,
        CheckpointState::Aborted,
        CheckpointState::Corrupt,
        CheckpointState::Abandoned,
        CheckpointState::Deleted,
    ];

    /// The state a status word names ([`CheckpointState::as_str`]; also
    /// `corrupt`, which replicas before the word `condemned` answered).
    pub fn from_word(word: &str) -> Option<Self> {
        match word {
            "corrupt" => Some(CheckpointState::Corrupt),
            _ => Self::ALL.into_iter().find(|s| s.as_str() == word),
        }
    }
}

impl fmt::Display for CheckpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `state == "committed"`: the word of status JSON.
impl PartialEq<&str> for CheckpointState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
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
        /// Ranks given to spares by it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        takeovers: Vec<super::Takeover>,
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
            JobEventKind::Restore { generation, from, step, reason, detail, takeovers } => {
                write!(f, "restore into generation {generation} from ")?;
                match from {
                    Some(id) => write!(f, "checkpoint {id} (step {step})")?,
                    None => f.write_str("step 0")?,
                }
                write!(f, ": {}", reason.as_str())?;
                if let Some(d) = detail {
                    write!(f, " ({d})")?;
                }
                for t in takeovers {
                    write!(f, "; rank {} taken over by spare worker {}", t.rank, t.worker.0)?;
                }
                Ok(())
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
    /// The rank ↔ worker mapping of the current generation: the worker
    /// process (its incarnation) holding each rank. A restore records the
    /// ranks it gives to spares (the supervisor seats them there, whichever
    /// leader it is); the whole mapping is recorded when the generation
    /// starts training (`StartJob`, `ResumeJob`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub holders: BTreeMap<Rank, Incarnation>,
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

    pub(super) fn note(&mut self, at_ms: u64, kind: JobEventKind) {
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
