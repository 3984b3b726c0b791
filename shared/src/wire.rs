//! The wire protocol: every message exchanged between workers, coordinators
//! and coordinator peers. Frames are defined in [`crate::frame`].
//!
//! ```text
//! worker                         leader coordinator
//!   | Hello{version, token}  ->    |
//!   |                   <- Welcome |
//!   | Register{job, rank, inc} ->  |
//!   |    <- Registered{generation} |   (or NotLeader{leader})
//!   | Heartbeat{gen, step} ...  -> |
//!   |  <- Checkpoint{gen, C, S}    |   two-phase checkpoint, commit in Raft
//!   | ShardSaved{gen, C, manifest}->
//!   |  <- Restore{gen+1, from C}   |   whole-job restore
//!   | Restored / RestoreFailed  -> |
//!   |  <- Resume{gen+1, step}      |
//! ```
//! A host running many ranks may carry them all on one connection (a node
//! session): every frame is then a `Batch` of per-rank messages, heartbeats
//! of all its ranks travel in one frame and get one `Alive`, and the
//! directives queued for its ranks at once leave in one frame.
//!
//! Every message after registration carries the sender's generation; the
//! leader answers a report from an older generation, or for a checkpoint no
//! longer pending, with `Stale` (the worker drops that work and carries on).
//! Only a rank superseded by a newer live process is told `Fenced` and steps
//! down. Directives are idempotent: the leader re-sends them until it
//! observes them done.

use crate::ids::{CheckpointId, Generation, Incarnation, JobName, NodeId, Rank, Step};
use crate::shard::ShardDigest;
use crate::spec::JobSpec;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Version of this protocol; carried in every frame and in [`Hello`].
pub const PROTOCOL_VERSION: u8 = 3;

/// Where a rank's restored shard came from (SPEC §11), fastest first: the
/// order a restore tries them in, and the job's `restored_from.source` is
/// the slowest rank's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreSource {
    /// The rank's own memory: the snapshot buffer still held the shard.
    Memory,
    /// Another worker's memory copy.
    Peer,
    /// The checkpoint's files.
    Storage,
}

impl RestoreSource {
    /// Every source, for metrics.
    pub const ALL: [Self; 3] = [Self::Memory, Self::Peer, Self::Storage];

    /// Its name in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Peer => "peer",
            Self::Storage => "storage",
        }
    }
}

impl std::fmt::Display for RestoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who opens a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRole {
    /// A worker agent.
    Worker,
    /// A coordinator replica (Raft traffic).
    Coordinator {
        /// The sender's Raft id.
        node: NodeId,
        /// The sender's cluster (`--cluster-id`): a replica of another
        /// cluster is refused.
        cluster: String,
    },
}

/// The first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u8,
    /// Who is speaking.
    pub role: PeerRole,
    /// The cluster's shared token, where it has one.
    pub token: Option<String>,
}

/// The answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Accepted; the connection carries messages from now on.
    Welcome {
        /// The accepting replica's id.
        node: NodeId,
    },
    /// Refused; the connection is closed after this frame.
    Refused(ErrorReply),
}

/// A refusal, with a machine-readable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// What is wrong and what to do (SPEC §10).
    pub message: String,
}

/// Kinds of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Missing or wrong token.
    Unauthorized,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// A newer live process of the same rank took over: this one steps down.
    Fenced,
    /// The report is from an older generation or for a checkpoint no longer
    /// pending: the worker drops that work and waits for directives.
    Stale,
    /// The job is not known to the ledger.
    UnknownJob,
    /// The message is not valid here (wrong rank, out of order, ...).
    InvalidRequest,
    /// The receiver failed; retry later.
    Unavailable,
}

/// What a worker is doing, as reported in heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerStatus {
    /// Registered, waiting for the job to start or resume.
    Waiting,
    /// Training.
    Running,
    /// Holding at a checkpoint step until the snapshot is taken.
    Checkpointing,
    /// Validating and loading a shard.
    Restoring,
    /// Reached `total_steps`.
    Finished,
    /// Its trainer crashed or its thread is gone; it restarts on the next restore.
    Failed,
    /// A spare holding no rank, ready to take one at once (its memory
    /// allocated and touched, or its `--exec` process waiting inside
    /// `flotilla.init()`).
    Spare,
    /// A spare holding no rank, still getting ready (allocating, or its
    /// process starting). A worker the leader holds for a spare that
    /// reports anything but these two is told again that it is one.
    SpareStarting,
}

impl WorkerStatus {
    /// The word status and metrics use (`flotilla_job_workers{state}`).
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Waiting => "waiting",
            WorkerStatus::Running => "running",
            WorkerStatus::Checkpointing => "checkpointing",
            WorkerStatus::Restoring => "restoring",
            WorkerStatus::Finished => "finished",
            WorkerStatus::Failed => "failed",
            WorkerStatus::Spare => "spare",
            WorkerStatus::SpareStarting => "spare_starting",
        }
    }
}

/// Why a rank could not restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestoreFailureKind {
    /// The shard is damaged (checksum, truncation, bad header): the
    /// checkpoint is corrupt and the job falls back to an earlier one.
    Corrupt,
    /// The shard's variables differ from the model's: the job is blocked.
    ModelMismatch,
    /// The device lacks the free memory the shard needs: the job is blocked.
    DeviceMemory,
    /// The shard is missing or unreadable (a mount gone, permissions, an
    /// I/O error): the checkpoint is not condemned; the job is blocked with
    /// the rank, path and OS error until the storage is back.
    Unavailable,
}

/// Why a rank could not save its shard of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardFailureKind {
    /// The rank was already past the checkpoint's step when told, and had
    /// not saved it: the checkpoint cannot complete.
    PastStep,
    /// Writing the shard failed.
    Write,
}

/// Worker → coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMessage {
    /// First message after [`Hello`]: who this worker is.
    Register {
        /// Job it belongs to.
        job: JobName,
        /// Its rank; `None`: a spare (`flotilla worker --spare`), which
        /// holds no rank until the leader assigns one ([`CoordinatorMessage::Assign`]).
        /// (A replica before spares refuses to decode `None`, so a spare is
        /// never taken for a rank there.)
        rank: Option<Rank>,
        /// Fresh per process start; a new one means the previous died. It is
        /// also the worker's id in status and in the ledger's rank ↔ worker
        /// mapping.
        incarnation: Incarnation,
        /// Its HTTP address, for status and metrics links.
        http_addr: Option<String>,
        /// The generation it last ran in, if any (for re-registration after
        /// a coordinator failover).
        generation: Option<Generation>,
        /// Its last completed step in that generation.
        step: Step,
        /// The host it runs on (`--host`, default the hostname): where status
        /// says each rank lives, and what spares and memory copies prefer
        /// to be away from.
        #[serde(default)]
        host: Option<String>,
    },
    /// Periodic liveness and progress.
    Heartbeat {
        /// The generation it runs in.
        generation: Generation,
        /// Steps completed.
        step: Step,
        /// What it is doing.
        status: WorkerStatus,
    },
    /// Its shard of a checkpoint is durable.
    ShardSaved {
        /// Generation it was written in.
        generation: Generation,
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// The shard's file, size and whole-file checksum (the header
        /// carries each variable's).
        manifest: ShardDigest,
    },
    /// Its shard could not be written.
    ShardFailed {
        /// Generation.
        generation: Generation,
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// What kind of failure (decides what the leader does).
        kind: ShardFailureKind,
        /// What went wrong, for people.
        reason: String,
    },
    /// Copies of its shard of `checkpoint` are held in the memory of these
    /// workers (HTTP addresses), which accepted them.
    CopiesMade {
        /// The generation.
        generation: Generation,
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// The workers holding a copy.
        to: Vec<String>,
    },
    /// Its state is loaded and it is ready to train from `step`.
    Restored {
        /// The new generation.
        generation: Generation,
        /// The step it restored to.
        step: Step,
        /// Where its shard came from (`None`: a start from step 0, or a
        /// build that does not say).
        #[serde(default)]
        source: Option<RestoreSource>,
    },
    /// It could not restore; it keeps its previous state untouched.
    RestoreFailed {
        /// The generation of the restore directive.
        generation: Generation,
        /// The checkpoint it tried.
        checkpoint: Option<CheckpointId>,
        /// Why, for the ledger's decision.
        kind: RestoreFailureKind,
        /// For people (SPEC §10).
        message: String,
    },
    /// The trainer process exited or crashed.
    TrainerFailed {
        /// Generation.
        generation: Generation,
        /// What happened.
        reason: String,
    },
    /// Rank 0 of an `--exec` job offers the rendezvous of `generation`
    /// (`MASTER_ADDR:MASTER_PORT`): a port its worker found free on its host.
    /// The leader passes it on in every rank's `Restore` directive.
    Rendezvous {
        /// The generation it is for.
        generation: Generation,
        /// `host:port`.
        addr: String,
    },
    /// It reached `total_steps`.
    Finished {
        /// Generation.
        generation: Generation,
        /// Final step.
        step: Step,
        /// Hex digest of its final variables.
        digest: String,
    },
    /// A node's messages for several ranks in one frame: one connection
    /// carries every rank a host runs (a node session). The first frame of
    /// a node session is a batch of `Register`s; every later frame is a
    /// batch. A batch holding heartbeats is answered with one `Alive`.
    Batch(Vec<ForRank<WorkerMessage>>),
    /// In a node session: this rank's process is gone (the node saw it
    /// exit); the leader treats it as that rank's connection closing.
    Left,
}

/// One rank's message inside a [`WorkerMessage::Batch`] or a
/// [`CoordinatorMessage::Batch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForRank<M> {
    /// The rank it is from or for.
    pub rank: Rank,
    /// The message.
    pub msg: M,
}

/// Where to restore from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestorePoint {
    /// The committed checkpoint.
    pub checkpoint: CheckpointId,
    /// Its step.
    pub step: Step,
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// This rank's shard manifest from the ledger (the checksums to verify).
    pub shard: ShardDigest,
    /// Workers holding a copy of this shard in memory (their HTTP
    /// addresses), tried in order before storage.
    #[serde(default)]
    pub peers: Vec<String>,
}

/// Coordinator → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    /// Registration accepted.
    Registered {
        /// The job's spec.
        spec: JobSpec,
        /// The job's current generation.
        generation: Generation,
        /// The leader's Raft term: a worker never follows a leader of an
        /// older term than one it has already followed.
        term: u64,
        /// The worker holds no rank: it registered as a spare, or for a rank
        /// a live worker holds, or it came back after its rank was given to
        /// a spare. It drops any rank state and waits for [`CoordinatorMessage::Assign`].
        #[serde(default)]
        spare: bool,
    },
    /// A spare is given `rank`: from now on this connection is that rank's,
    /// and the `Restore` directive for it follows.
    Assign {
        /// The rank it takes.
        rank: Rank,
        /// The generation it takes it in (the takeover's restore).
        generation: Generation,
    },
    /// Send copies of this rank's shard of committed checkpoint
    /// `checkpoint` to the first `copies` of `to` (workers' HTTP addresses,
    /// best first) that accept one.
    CopyShard {
        /// The generation.
        generation: Generation,
        /// The checkpoint (the latest committed).
        checkpoint: CheckpointId,
        /// Copies wanted (`[checkpoint] memory_copies`).
        copies: u32,
        /// Where, in order of preference.
        to: Vec<String>,
    },
    /// This replica is not the leader; try `leader` (an api address) if known.
    NotLeader {
        /// The leader's api address.
        leader: Option<String>,
    },
    /// Take a checkpoint at `step`: train up to it, snapshot, write the shard.
    Checkpoint {
        /// Current generation.
        generation: Generation,
        /// Checkpoint id.
        checkpoint: CheckpointId,
        /// The step to snapshot at.
        step: Step,
        /// The checkpoint directory to write into.
        dir: PathBuf,
    },
    /// Give up on a checkpoint (its files are garbage).
    AbortCheckpoint {
        /// Current generation.
        generation: Generation,
        /// Checkpoint id.
        checkpoint: CheckpointId,
    },
    /// Stop training and restore into `generation` (`from: None` = step 0).
    Restore {
        /// The new generation.
        generation: Generation,
        /// The checkpoint to load, or none for a fresh start.
        from: Option<RestorePoint>,
        /// The generation's rendezvous (`host:port`) once rank 0 offered it:
        /// `--exec` trainers need it to start; the built-in trainer ignores it.
        rendezvous: Option<String>,
    },
    /// Every rank restored: train from `step` in `generation`.
    Resume {
        /// Generation.
        generation: Generation,
        /// Step to train from.
        step: Step,
    },
    /// The answer to a heartbeat, from a replica that still leads: a worker
    /// that hears nothing for `heartbeat_timeout_ms` takes its leader for
    /// lost (partitioned away, or deposed) and looks for the new one.
    Alive,
    /// The job ended (succeeded or failed): the worker exits.
    Stop {
        /// Why, for the log.
        reason: String,
    },
    /// A refused message; fenced workers get `ErrorCode::Fenced`.
    Error(ErrorReply),
    /// In a node session: directives for several of its ranks, in order
    /// per rank (see [`WorkerMessage::Batch`]).
    Batch(Vec<ForRank<CoordinatorMessage>>),
}

/// Coordinator ↔ coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// Raft messages for the receiver, each raft-rs protobuf bytes, batched.
    Raft(Vec<serde_bytes::ByteBuf>),
    /// A replica starting on an empty data dir asks whether the receiver
    /// holds a Raft log (then the cluster exists and it joins without voting).
    Probe,
    /// The answer to [`PeerMessage::Probe`].
    ProbeReply {
        /// The receiver holds log entries or a snapshot.
        has_log: bool,
    },
    /// A piece of one Raft message too large for a frame (a snapshot of a
    /// large ledger): the pieces follow each other on the connection and
    /// the receiver decodes the message once it has `total` bytes.
    Chunk {
        /// Size of the whole encoded message.
        total: u64,
        /// The next bytes of it.
        bytes: serde_bytes::ByteBuf,
    },
}
