//! The HTTP API's JSON shapes (SPEC §4), shared by the server and the CLI.

use crate::ledger::{BlockReason, CheckpointState, Job, JobEvent, JobState, State};
use crate::raft::replica::{NodeStatus, Role};
use crate::supervise::{RankState, RecoveryView, SpareState};
use flotilla_shared::ids::{CheckpointId, Generation, Incarnation, JobName, NodeId, Rank, Step};
use flotilla_shared::wire::RestoreSource;
use serde::{Deserialize, Serialize};

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The answering replica.
    pub node_id: NodeId,
    /// Its role.
    pub role: Role,
    /// Its term.
    pub term: u64,
    /// The leader it knows of.
    pub leader_id: Option<NodeId>,
    /// The leader's HTTP URL, once the leader announced it.
    pub leader_url: Option<String>,
    /// Highest committed log index.
    pub commit_index: u64,
    /// Highest applied log index.
    pub applied_index: u64,
    /// Index of its latest snapshot.
    pub snapshot_index: u64,
    /// Size of its latest snapshot (the ledger, encoded).
    #[serde(default)]
    pub snapshot_bytes: u64,
    /// Started on an empty data dir in an existing cluster and not caught
    /// up yet: it does not vote.
    #[serde(default)]
    pub joining: bool,
    /// Every replica that announced itself.
    pub nodes: Vec<NodeView>,
    /// Jobs (all, or the one asked for).
    pub jobs: Vec<JobStatus>,
}

/// `GET /v1/replicas`: the membership as the answering replica has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicasView {
    /// The answering replica.
    pub node_id: NodeId,
    /// Its role.
    pub role: Role,
    /// The leader it knows of.
    pub leader_id: Option<NodeId>,
    /// Its commit index.
    pub commit_index: u64,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Learners (receive the log, do not vote).
    pub learners: Vec<NodeId>,
    /// Each member's replication progress (the leader's view; empty elsewhere).
    pub progress: Vec<crate::raft::replica::PeerProgress>,
    /// Raft addresses: `--peers` and those added by membership changes.
    pub addresses: std::collections::BTreeMap<NodeId, String>,
}

/// A replica's addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Its id.
    pub id: NodeId,
    /// Its HTTP URL.
    pub http_url: String,
    /// Its worker API address.
    pub api_addr: Option<String>,
}

/// One job in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Name.
    pub name: JobName,
    /// `waiting`, `running`, `restoring`, `blocked`, `succeeded`, `failed`, `cancelled`.
    pub state: JobState,
    /// When it was submitted (ms since the epoch; 0 from a replica that did not say).
    #[serde(default)]
    pub submitted_ms: u64,
    /// Current generation.
    pub generation: Generation,
    /// Ranks.
    pub world_size: u32,
    /// The job's step: the slowest rank's in this generation where the
    /// answering replica hears every rank (the leader); otherwise what the
    /// ledger knows (`step_source` says which).
    pub step: Step,
    /// Where `step` comes from.
    #[serde(default)]
    pub step_source: StepSource,
    /// Whole-job restores so far.
    pub restores: u32,
    /// The latest committed checkpoint.
    pub latest_committed: Option<CheckpointRef>,
    /// The checkpoint the current generation restored from (none: step 0).
    #[serde(default)]
    pub restored_from: Option<CheckpointRef>,
    /// Checkpoints committed over the job's life.
    #[serde(default)]
    pub checkpoints_committed: u64,
    /// Checkpoints not deleted, oldest first.
    pub checkpoints: Vec<CheckpointView>,
    /// Each rank as last reported in this generation.
    pub workers: Vec<WorkerView>,
    /// The job's spare workers, holding no rank (the leader's view).
    #[serde(default)]
    pub spares: Vec<SpareStatus>,
    /// While running: when the leader first saw the job running in this
    /// generation (ms since the epoch), i.e. when a restore ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_since_ms: Option<u64>,
    /// The phases of the last restore, as the leader that saw it through
    /// measured them (the leader's view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<RecoveryView>,
    /// The latest notable events (restores and why, condemned checkpoints,
    /// operator actions), oldest first.
    #[serde(default)]
    pub events: Vec<JobEvent>,
    /// Hex digest of the final variables, once succeeded.
    pub final_digest: Option<String>,
    /// Why the job is blocked or failed.
    pub error: Option<String>,
    /// While blocked: which rank refused, the kind of refusal and the words
    /// (`rank` and `kind` are absent for a block recorded by an older build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<BlockReason>,
}

/// Where a job's `step` in the status comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepSource {
    /// The slowest rank's step in this generation, as its heartbeats say
    /// (the leader, hearing every rank).
    #[default]
    Ranks,
    /// The job succeeded: the step its ranks finished at.
    Finished,
    /// The ledger's latest committed checkpoint (or the step this generation
    /// started from): the ranks are at or past it, but the answering replica
    /// does not hear them all (a follower, a new leader, a rank missing).
    Checkpoint,
}

impl StepSource {
    /// In words, for `flotilla status`.
    pub fn describe(self) -> &'static str {
        match self {
            StepSource::Ranks => "the slowest rank's",
            StepSource::Finished => "its last",
            StepSource::Checkpoint => {
                "its latest committed checkpoint's; the ranks' own steps are not known here"
            }
        }
    }
}

/// A checkpoint's id and step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRef {
    /// Id.
    pub id: CheckpointId,
    /// Step.
    pub step: Step,
    /// Where the slowest rank's shard came from (`restored_from` only,
    /// once the leader heard every rank's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RestoreSource>,
}

/// One checkpoint in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointView {
    /// Id.
    pub id: CheckpointId,
    /// Step.
    pub step: Step,
    /// Generation it was taken in.
    pub generation: Generation,
    /// `pending`, `committed`, `aborted`, `condemned`, `abandoned`.
    #[serde(with = "checkpoint_word")]
    pub state: CheckpointState,
    /// Bytes of all shards.
    pub bytes: u64,
    /// When it began (ms since the epoch).
    pub begun_ms: u64,
    /// When it was committed or aborted.
    #[serde(default)]
    pub ended_ms: Option<u64>,
    /// Why it was aborted, condemned (rank, file and tensor) or abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One rank in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerView {
    /// Rank.
    pub rank: Rank,
    /// What it is doing.
    pub state: RankState,
    /// Its last reported step.
    pub step: Step,
    /// How long ago the leader last heard from it, in ms (when the view
    /// was taken, every 100 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_age_ms: Option<u64>,
    /// The worker process holding the rank (its id, the incarnation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<Incarnation>,
    /// The host that worker runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// One spare in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpareStatus {
    /// Its id (the process's incarnation).
    pub worker: Incarnation,
    /// The host it runs on.
    #[serde(default)]
    pub host: Option<String>,
    /// `ready` (could take a rank at once) or `starting`.
    pub state: SpareState,
}

/// `POST /v1/jobs` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitReply {
    /// The job.
    pub job: JobName,
    /// False when an identical spec was already there.
    pub created: bool,
}

/// Every error answer: `{"error": "...", "leader": "http://..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What is wrong and what to do.
    pub error: String,
    /// Where to send mutations (on 421).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

impl JobStatus {
    /// The ledger's view of a job. Workers and their steps are the
    /// supervisor's soft state: the caller fills them in where it has them.
    pub fn from_job(job: &Job) -> Self {
        // a finished job is at its last step; otherwise the ranks are at or
        // past the head of the job's history, and the leader replaces it by
        // the slowest rank's step where it hears every rank
        let head = job.latest_committed().map_or(Step(0), |c| c.step).max(job.start_step());
        let finished = match (job.state, job.final_step, &job.spec.trainer) {
            (crate::ledger::JobState::Succeeded, Some(step), _) => Some(step),
            (crate::ledger::JobState::Succeeded, None, Some(t)) => Some(Step(t.total_steps)),
            _ => None,
        };
        let (step, step_source) = match finished {
            Some(step) => (step, StepSource::Finished),
            None => (head, StepSource::Checkpoint),
        };
        Self {
            name: job.spec.name.clone(),
            state: job.state,
            submitted_ms: job.submitted_ms,
            generation: job.generation,
            world_size: job.spec.world_size,
            step,
            step_source,
            restores: job.restores,
            latest_committed: job.latest_committed().map(|c| CheckpointRef {
                id: c.id,
                step: c.step,
                source: None,
            }),
            restored_from: job.restored_from.and_then(|id| job.checkpoints.get(&id)).map(|c| CheckpointRef {
                id: c.id,
                step: c.step,
                source: None,
            }),
            checkpoints_committed: job.committed_total,
            checkpoints: job
                .checkpoints
                .values()
                .filter(|c| c.state != CheckpointState::Deleted)
                .map(|c| CheckpointView {
                    id: c.id,
                    step: c.step,
                    generation: c.generation,
                    state: c.state,
                    bytes: c.bytes(),
                    begun_ms: c.begun_ms,
                    ended_ms: c.ended_ms,
                    reason: c.reason.clone(),
                })
                .collect(),
            workers: Vec::new(),
            spares: Vec::new(),
            running_since_ms: None,
            last_recovery: None,
            events: job.events.clone(),
            final_digest: job.final_digest.clone(),
            error: job.error.clone(),
            blocked: job.block_reason(),
        }
    }
}

impl ClusterStatus {
    /// Builds the status from a node's status and its applied state.
    pub fn build(node: &NodeStatus, state: &State, job: Option<&JobName>) -> Self {
        let leader_url = node.leader_id.and_then(|l| state.nodes.get(&l)).map(|n| n.http_url.clone());
        Self {
            node_id: node.id,
            role: node.role,
            term: node.term,
            leader_id: node.leader_id,
            leader_url,
            commit_index: node.commit_index,
            applied_index: node.applied_index,
            snapshot_index: node.snapshot_index,
            snapshot_bytes: node.snapshot_bytes,
            joining: node.joining,
            nodes: state
                .nodes
                .iter()
                .map(|(id, n)| NodeView {
                    id: *id,
                    http_url: n.http_url.clone(),
                    api_addr: n.api_addr.clone(),
                })
                .collect(),
            jobs: state
                .jobs
                .values()
                .filter(|j| job.is_none_or(|name| &j.spec.name == name))
                .map(|j| JobStatus::from_job(j))
                .collect(),
        }
    }
}

/// A checkpoint's state in status JSON: its word ([`CheckpointState::as_str`],
/// `condemned` for what the ledger encodes as `corrupt`).
mod checkpoint_word {
    use crate::ledger::CheckpointState;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(state: &CheckpointState, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(state.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CheckpointState, D::Error> {
        let word = String::deserialize(d)?;
        CheckpointState::from_word(&word)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown checkpoint state {word:?}")))
    }
}
