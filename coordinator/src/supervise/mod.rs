//! The supervisor: a reconciler, in the Kubernetes-controller sense.
//!
//! On every tick and every observation it compares the desired state (the
//! applied ledger) with what it observes (worker sessions and their last
//! reports) and emits idempotent [`Action`]s, re-sent until observed done.
//! No decision depends on having seen the reply to its own proposal: a new
//! leader, a restarted one, or one whose proposal timed out derives the same
//! actions from the same ledger and the workers' (re-)registrations.
//!
//! This module is pure: no I/O, no clock (time arrives as [`Now`]), no
//! randomness. The shell ([`task`]) carries out the actions and
//! never awaits a proposal inline; it reports back with
//! [`Observation::ProposalDone`] so the same proposal is not made twice while
//! one is in flight.
//!
//! What each job state asks for, per rank, until observed:
//! ```text
//! waiting    Restore{G, none} (fresh state) ── all ranks hold G ──► StartJob
//! running    Resume{G, S} to a rank idle in G; Checkpoint{G, C, S} until its shard is reported
//!            ── every shard reported ──► CommitCheckpoint      ── every rank finished ──► FinishJob
//!            ── a rank silent, restarted, crashed or hung ──► Restore{G+1, latest committed}
//! restoring  Restore{G, from C} until the rank holds G ── all hold G ──► ResumeJob
//!            ── C condemned ──► Restore{G+1, previous}  ── a rank lost ──► Restore{G+1, C}
//!            ── model / memory / storage refusal ──► BlockJob
//! blocked    retried on a new worker process or after a back-off ──► Restore{G+1, C}
//! succeeded, cancelled: Stop               failed: idle, kept for an operator's restore
//! ```
//! A deleted job is gone from the ledger, so no reconcile sees it: the
//! applied deletion ([`Observation::Applied`]) forgets what this leader knew
//! of it and, with `remove_checkpoints`, removes its checkpoint directory.
//! Files follow the ledger the same way: a committed checkpoint has its
//! MANIFEST.json, LATEST names the latest committed one, a condemned one loses
//! its manifest, an aborted or retired one loses its files, whichever leader
//! applied the entry.

mod files;
pub mod input;
mod operator;
mod rank;
mod schedule;
pub mod task;

use operator::Waiter;
pub use operator::{CheckpointOutcome, RequestId};
use rank::{Phase, RankSoft};
pub use rank::{RankState, RankView};
use schedule::{final_checkpoint_due, schedule_checkpoint};

use crate::ledger::{
    AbortReason, CheckpointState, Command, Event, Job, JobState, RestoreReason, State, Takeover,
};
use flotilla_shared::checksum::combine_digests;
use flotilla_shared::ids::{CheckpointId, Generation, Incarnation, JobName, Rank, Step};
use flotilla_shared::layout::JobDir;
use flotilla_shared::wire::{
    CoordinatorMessage, ErrorCode, ErrorReply, RestoreFailureKind, RestorePoint, RestoreSource,
    ShardFailureKind, WorkerMessage, WorkerStatus,
};
use std::collections::{BTreeMap, BTreeSet};

/// A worker connection's id, unique within the shell.
pub type ConnId = u64;

/// The time, twice: a monotonic clock for every deadline the supervisor
/// judges, and the wall clock only for the times recorded in ledger commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds (any origin, never going back).
    pub mono_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
}

/// A worker's registration on connection `conn`.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Connection.
    pub conn: ConnId,
    /// Job.
    pub job: JobName,
    /// Rank (`None`: a spare).
    pub rank: Option<Rank>,
    /// The worker process's incarnation (larger is newer).
    pub incarnation: Incarnation,
    /// The generation whose state it holds.
    pub generation: Option<Generation>,
    /// Its step in that generation.
    pub step: Step,
    /// The host it runs on, as it says.
    pub host: Option<String>,
    /// Its HTTP address (where other workers send it memory copies).
    pub http_addr: Option<String>,
}

/// Where a connection sits: on a rank, or on the job's bench of spares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seat {
    Rank(Rank),
    Spare(Incarnation),
}

/// A spare worker of a job, as this leader knows it.
#[derive(Debug, Clone)]
struct SpareSoft {
    conn: ConnId,
    host: Option<String>,
    /// It said it could train at once ([`WorkerStatus::Spare`]).
    ready: bool,
    last_seen: u64,
    /// When it was last told it is a spare (a demoted worker that reports
    /// as a rank is told again).
    told: u64,
}

/// What a spare is doing (status, `flotilla_job_spares{state}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpareState {
    /// It could take a rank at once.
    Ready,
    /// Still allocating its memory or starting its trainer process.
    Starting,
}

impl SpareState {
    /// Both states, in the order metrics list them.
    pub const ALL: [SpareState; 2] = [SpareState::Ready, SpareState::Starting];

    /// The word in status JSON and the `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            SpareState::Ready => "ready",
            SpareState::Starting => "starting",
        }
    }
}

/// One spare as the supervisor sees it (for status).
#[derive(Debug, Clone, PartialEq)]
pub struct SpareView {
    /// Its id (the process's incarnation).
    pub worker: Incarnation,
    /// Where it runs.
    pub host: Option<String>,
    /// Ready or starting.
    pub state: SpareState,
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
        /// Answer [`Action::Answer`] with this id once the checkpoint is
        /// committed, or why not (none: nobody waits).
        reply_to: Option<RequestId>,
    },
    /// A proposal's outcome arrived (applied, refused or failed): it is no
    /// longer in flight; the ledger says what it changed.
    ProposalDone {
        /// Which proposal.
        key: ProposalKey,
        /// What applying it changed (none: refused or failed). File work
        /// follows a checkpoint's change at once; the reconcile is the
        /// backstop for what no event of this leader's announced.
        events: Vec<Event>,
    },
    /// An operator's command (cancel, delete) was applied by this leader:
    /// what it changed. A deleted job's file work can only follow from here.
    Applied {
        /// What applying it changed.
        events: Vec<Event>,
    },
    /// Some file work failed; it is tried again.
    FileWorkFailed {
        /// Job.
        job: JobName,
        /// The work.
        work: FileWork,
    },
}

/// Something for the shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Propose a ledger command (without awaiting it); report back with
    /// [`Observation::ProposalDone`].
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
    /// Tell whoever waits on request `request` how it ended.
    Answer {
        /// The request ([`Observation::CheckpointRequested`]'s `reply_to`).
        request: RequestId,
        /// How it ended.
        outcome: CheckpointOutcome,
    },
    /// A whole-job restore this leader saw is over: every rank trains
    /// again (for the recovery histogram and the restore sources).
    Recovered {
        /// Job.
        job: JobName,
        /// From the first restore's decision to the job running again
        /// (`None`: another leader decided it).
        seconds: Option<f64>,
        /// The slowest source a rank restored from, where this leader
        /// heard every rank's report.
        source: Option<RestoreSource>,
    },
    /// Bring a checkpoint's files in line with the ledger.
    Files {
        /// Job.
        job: JobName,
        /// What to do.
        work: FileWork,
    },
}

/// File work derived from the ledger, done in order on one thread.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileWork {
    /// Write MANIFEST.json of a committed checkpoint.
    Manifest(CheckpointId),
    /// Remove MANIFEST.json of a condemned checkpoint, so offline tools never
    /// take it for a committed one.
    Condemn(CheckpointId),
    /// Delete an aborted or retired checkpoint's directory.
    Delete(CheckpointId),
    /// Point LATEST at the latest committed checkpoint (remove it when none).
    Latest(Option<CheckpointId>),
    /// Delete every checkpoint directory the ledger no longer knows (its
    /// tombstone was pruned); tagged with the job's count of pruned ones,
    /// so each pruning sweeps again.
    Sweep(u64),
    /// Remove a deleted job's whole directory (`<root>/<job>/`), unless a
    /// job of that name is in the ledger again by then.
    RemoveJob(std::path::PathBuf),
}

/// Identifies a proposal so the same one is not made twice while in flight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProposalKey {
    job: JobName,
    kind: &'static str,
    n: u64,
}

impl ProposalKey {
    /// The key of `cmd` (none for commands the supervisor never makes).
    pub fn of(cmd: &Command) -> Option<Self> {
        let (job, kind, n) = match cmd {
            Command::Announce { .. }
            | Command::SubmitJob { .. }
            | Command::CancelJob { .. }
            | Command::DeleteJob { .. } => return None,
            Command::StartJob { job, generation, .. } => (job, "start", generation.0),
            Command::BeginCheckpoint { job, id, .. } => (job, "begin", id.0),
            Command::CommitCheckpoint { job, id, .. } => (job, "commit", id.0),
            Command::AbortCheckpoint { job, id, .. } => (job, "abort", id.0),
            Command::MarkCorrupt { job, id, .. } => (job, "corrupt", id.0),
            Command::ClearCorrupt { job, id, .. } => (job, "clear", id.0),
            Command::DeleteCheckpoint { job, id } => (job, "delete", id.0),
            Command::Restore { job, generation, .. } | Command::OperatorRestore { job, generation, .. } => {
                (job, "restore", generation.0)
            }
            Command::ResumeJob { job, generation, .. } => (job, "resume", generation.0),
            Command::BlockJob { job, generation, .. } => (job, "block", generation.0),
            Command::FailJob { job, .. } => (job, "fail", 0),
            Command::FinishJob { job, generation, .. } => (job, "finish", generation.0),
        };
        Some(Self { job: job.clone(), kind, n })
    }
}

/// Timing the supervisor applies.
#[derive(Debug, Clone, Copy)]
pub struct SupervisorConfig {
    /// A proposal with no outcome after this long may be made again.
    pub proposal_retry_ms: u64,
    /// A blocked restore is retried after this long (and whenever a new
    /// worker process registers).
    pub blocked_retry_ms: u64,
    /// The shortest interval between two sends of the same directive to a
    /// rank (the job's heartbeat interval × 2 when longer).
    pub min_resend_ms: u64,
    /// How far ahead, in time, a checkpoint step is placed at first; it grows
    /// when a rank was already past the step and shrinks after commits.
    pub base_lead_ms: u64,
    /// How long a known worker's closed connection may stay closed (and the
    /// worker silent) before the rank has failed: a worker that reconnects
    /// with the same process within it is no failure. One never heard from by
    /// this leader gets the job's heartbeat timeout.
    pub reconnect_grace_ms: u64,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            proposal_retry_ms: 5_000,
            blocked_retry_ms: 30_000,
            min_resend_ms: 500,
            base_lead_ms: 200,
            reconnect_grace_ms: 500,
        }
    }
}

/// Longest lead a checkpoint step is placed ahead of the fastest rank.
const MAX_LEAD_MS: u64 = 10_000;

/// What the leader knows of one job beyond the ledger.
#[derive(Debug)]
struct JobSoft {
    ranks: BTreeMap<Rank, RankSoft>,
    /// The pending checkpoint and when this leader first saw it (its
    /// timeout counts from then, never from another leader's clock).
    pending_seen: Option<(CheckpointId, u64)>,
    /// When this leader first saw the job running in a generation.
    running_seen: Option<(Generation, u64)>,
    /// When this leader first saw the job blocked in a generation.
    blocked_seen: Option<(Generation, u64)>,
    /// A new worker process registered while the job was blocked.
    retry_blocked: bool,
    checkpoint_requested: bool,
    /// Operators waiting for a checkpoint.
    waiters: Vec<Waiter>,
    /// When the last checkpoint was begun (for `every_seconds`).
    last_begun: u64,
    lead_ms: u64,
    /// File work already done (or under way) for this leader.
    files: BTreeSet<FileWork>,
    /// The rendezvous rank 0 offered for a generation (`--exec` jobs).
    rendezvous: Option<(Generation, String)>,
    /// The restore under way, timed for the line that logs its end.
    recovery: Option<Recovery>,
    /// When this leader first saw the job running in a generation, on the
    /// wall clock (for status: a restore's end, measured where it happens).
    running_since_wall: Option<(Generation, u64)>,
    /// Workers registered without a rank, by id.
    spares: BTreeMap<Incarnation, SpareSoft>,
    /// The phases of the last restore this leader saw through.
    last_recovery: Option<RecoveryView>,
    /// Each worker's HTTP address (memory copies go there), by id.
    http_addrs: BTreeMap<Incarnation, String>,
    /// Where copies of each rank's shard are held, and of which checkpoint.
    copies: BTreeMap<Rank, (CheckpointId, Vec<String>)>,
    /// The checkpoint this leader asked copies of.
    copies_asked: Option<CheckpointId>,
}

/// When the phases of a job's last restore happened (ms since the epoch,
/// on the leader's clock), as the leader that saw it through measured them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecoveryView {
    /// The generation it restored into.
    pub generation: Generation,
    /// The failure was seen and the restore decided (`None`: another
    /// leader decided it).
    pub decided_ms: Option<u64>,
    /// The restore was seen committed and its directives went out.
    pub committed_ms: Option<u64>,
    /// The last rank said its state was restored (its shard fetched and loaded).
    pub restored_ms: Option<u64>,
    /// Every rank trains again.
    pub running_ms: u64,
    /// The slowest source a rank's shard came from (`None`: a start from
    /// step 0, or a leader that took over mid-way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RestoreSource>,
}

/// When the phases of one restore happened, on this leader's monotonic
/// clock: the restore's breakdown (detect is the failure's, the rest here).
#[derive(Debug, Clone)]
struct Recovery {
    generation: Generation,
    /// When this leader decided the first restore of this recovery (a
    /// restore that restarts keeps it); None: it took over one under way.
    decided: Option<u64>,
    /// This leader proposed it (None: it took over a restore under way).
    proposed: Option<u64>,
    /// When the resume was proposed (the job then trains again once applied).
    resumed: Option<u64>,
    /// First seen committed, when the restore directives went out.
    committed: Option<u64>,
    /// The last rank to report its state restored, and when.
    last_restored: Option<(Rank, u64)>,
    /// The slowest source a rank restored from.
    source: Option<RestoreSource>,
}

impl Recovery {
    fn new(generation: Generation, proposed: Option<u64>) -> Self {
        Self {
            generation,
            decided: proposed,
            proposed,
            committed: None,
            last_restored: None,
            resumed: None,
            source: None,
        }
    }

    /// One line with the phases, once the resume is proposed at `t`.
    fn log(&self, job: &JobName, t: u64) {
        let span = |from: Option<u64>, to: Option<u64>| match (from, to) {
            (Some(a), Some(b)) => format!("{} ms", b.saturating_sub(a)),
            _ => "n/a (this leader took over mid-way)".to_string(),
        };
        let (last_rank, restored) = self.last_restored.map_or((None, None), |(r, at)| (Some(r), Some(at)));
        tracing::info!(
            %job,
            generation = %self.generation,
            "restore done: proposed -> committed {}, committed -> every rank restored {} (last: rank {}), -> resume proposed {}; {} since the failure was seen",
            span(self.proposed, self.committed),
            span(self.committed, restored),
            last_rank.map_or("?".into(), |r| r.to_string()),
            span(restored.or(self.committed), Some(t)),
            span(self.proposed, Some(t)),
        );
    }
}

/// The leader's supervisor.
#[derive(Debug)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    since: u64,
    term: u64,
    jobs: BTreeMap<JobName, JobSoft>,
    conns: BTreeMap<ConnId, (JobName, Seat)>,
    inflight: BTreeMap<ProposalKey, u64>,
    /// Reconciles run so far (each visits every rank of every job).
    reconciles: u64,
}

fn send(conn: ConnId, msg: CoordinatorMessage) -> Action {
    Action::Send { conn, msg }
}

fn error(code: ErrorCode, message: String) -> CoordinatorMessage {
    CoordinatorMessage::Error(ErrorReply { code, message })
}

/// Where rank `rank` restores from in the job's current generation: its
/// checkpoint, else the other job's checkpoint it started from
/// (`resume_from`), else nowhere (fresh state at step 0).
pub fn restore_point(job: &Job, rank: Rank) -> Option<RestorePoint> {
    let Some(id) = job.restored_from else {
        let o = job.origin.as_ref()?;
        let shard = o.shards.iter().find(|s| s.rank == rank)?.clone();
        return Some(RestorePoint {
            checkpoint: o.id,
            step: o.step,
            dir: o.dir.clone(),
            shard,
            peers: Vec::new(),
        });
    };
    let c = job.checkpoints.get(&id)?;
    let shard = c.shards.iter().find(|s| s.rank == rank)?.clone();
    Some(RestorePoint {
        checkpoint: id,
        step: c.step,
        dir: JobDir::new(&job.spec.checkpoint.root, &job.spec.name).checkpoint_dir(id),
        shard,
        peers: Vec::new(),
    })
}

impl Supervisor {
    /// A supervisor for a replica that became leader in `term` at `now`.
    pub fn new(cfg: SupervisorConfig, now: Now, term: u64) -> Self {
        Self {
            cfg,
            since: now.mono_ms,
            term,
            jobs: BTreeMap::new(),
            conns: BTreeMap::new(),
            inflight: BTreeMap::new(),
            reconciles: 0,
        }
    }

    /// Reconciles run so far (the cost that grows with the ranks).
    pub fn reconciles(&self) -> u64 {
        self.reconciles
    }

    fn soft(&mut self, job: &JobName, now: u64) -> &mut JobSoft {
        let (since, lead) = (self.since, self.cfg.base_lead_ms);
        self.jobs.entry(job.clone()).or_insert_with(|| JobSoft {
            ranks: BTreeMap::new(),
            pending_seen: None,
            running_seen: None,
            blocked_seen: None,
            retry_blocked: false,
            checkpoint_requested: false,
            waiters: Vec::new(),
            last_begun: now.max(since),
            lead_ms: lead,
            files: BTreeSet::new(),
            rendezvous: None,
            recovery: None,
            running_since_wall: None,
            spares: BTreeMap::new(),
            last_recovery: None,
            http_addrs: BTreeMap::new(),
            copies: BTreeMap::new(),
            copies_asked: None,
        })
    }

    /// When this leader first saw `job` running in `generation` (ms since
    /// the epoch), if it has.
    pub fn running_since_ms(&self, job: &JobName, generation: Generation) -> Option<u64> {
        let (g, at) = self.jobs.get(job)?.running_since_wall?;
        (g == generation).then_some(at)
    }

    /// Every rank of `job` in `generation` order, as last observed (for status).
    pub fn rank_views(&self, job: &JobName, generation: Generation, now: Now) -> Vec<RankView> {
        let Some(soft) = self.jobs.get(job) else { return Vec::new() };
        soft.ranks
            .iter()
            .filter(|(_, r)| r.incarnation.is_some())
            .map(|(rank, r)| RankView {
                rank: *rank,
                state: if r.conn.is_none() {
                    RankState::Disconnected
                } else if r.generation != Some(generation) {
                    RankState::Stale
                } else {
                    r.status.into()
                },
                step: r.step,
                heartbeat_age_ms: now.mono_ms.saturating_sub(r.last_seen),
                worker: r.incarnation,
                host: r.host.clone(),
            })
            .collect()
    }

    /// The phases of `job`'s last restore this leader saw through.
    pub fn last_recovery(&self, job: &JobName) -> Option<RecoveryView> {
        self.jobs.get(job)?.last_recovery
    }

    /// The spares of `job` (for status and metrics).
    pub fn spare_views(&self, job: &JobName) -> Vec<SpareView> {
        let Some(soft) = self.jobs.get(job) else { return Vec::new() };
        soft.spares
            .iter()
            .map(|(id, s)| SpareView {
                worker: *id,
                host: s.host.clone(),
                state: if s.ready { SpareState::Ready } else { SpareState::Starting },
            })
            .collect()
    }

    /// Handles one observation, then reconciles (a heartbeat waits for the
    /// next tick: it changes progress, not what is due, and there are many).
    pub fn observe(&mut self, ledger: &State, now: Now, obs: Observation) -> Vec<Action> {
        self.observe_batch(ledger, now, [obs])
    }

    /// Takes in every observation of `batch`, then reconciles once if any
    /// of them was more than a heartbeat. What arrived together is judged
    /// together: a checkpoint's N shard reports cost one reconcile, not N
    /// (each reconcile visits every rank, so one per report is quadratic in
    /// the workers).
    pub fn observe_batch(
        &mut self,
        ledger: &State,
        now: Now,
        batch: impl IntoIterator<Item = Observation>,
    ) -> Vec<Action> {
        let (mut out, reconcile) = self.take_batch(ledger, now, batch);
        if reconcile {
            out.extend(self.tick(ledger, now));
        }
        out
    }

    /// Takes in every observation of `batch` without reconciling: the
    /// actions they call for at once (replies, refusals), and whether a
    /// reconcile is due (anything but heartbeats). The caller runs `tick`
    /// when it sees fit: soon, but not once per arrival.
    pub fn take_batch(
        &mut self,
        ledger: &State,
        now: Now,
        batch: impl IntoIterator<Item = Observation>,
    ) -> (Vec<Action>, bool) {
        let mut out = Vec::new();
        let mut reconcile = false;
        for obs in batch {
            let heartbeat = matches!(obs, Observation::Message { msg: WorkerMessage::Heartbeat { .. }, .. });
            // a refused registration has nothing of its own to reconcile
            let taken = self.take(ledger, now, obs, &mut out);
            reconcile |= taken && !heartbeat;
        }
        (out, reconcile)
    }

    /// Takes in one observation (no reconcile); false when it was a
    /// registration that was refused.
    fn take(&mut self, ledger: &State, now: Now, obs: Observation, out: &mut Vec<Action>) -> bool {
        match obs {
            Observation::Registered(r) => {
                if !self.registered(ledger, now, r, out) {
                    return false;
                }
            }
            Observation::Message { conn, msg } => self.message(ledger, now, conn, msg, out),
            Observation::Disconnected { conn } => match self.conns.remove(&conn) {
                Some((job, Seat::Rank(rank))) => {
                    if let Some(r) = self.soft(&job, now.mono_ms).ranks.get_mut(&rank) {
                        if r.conn == Some(conn) {
                            // the grace before a closed connection is a failure counts from here
                            r.conn = None;
                            r.last_seen = now.mono_ms;
                        }
                    }
                }
                // a spare that left is no spare: one that comes back registers again
                Some((job, Seat::Spare(id))) => {
                    let spares = &mut self.soft(&job, now.mono_ms).spares;
                    if spares.get(&id).is_some_and(|s| s.conn == conn) {
                        spares.remove(&id);
                    }
                }
                None => {}
            },
            Observation::CheckpointRequested { job, reply_to } => {
                self.checkpoint_requested(ledger, now, job, reply_to, out)
            }
            Observation::ProposalDone { key, events } => {
                self.inflight.remove(&key);
                self.applied(ledger, now, &events, out);
            }
            Observation::Applied { events } => self.applied(ledger, now, &events, out),
            Observation::FileWorkFailed { job, work } => {
                if let FileWork::RemoveJob(_) = work {
                    // asked again: nothing in the ledger asks for it
                    out.push(Action::Files { job, work });
                } else {
                    self.soft(&job, now.mono_ms).files.remove(&work);
                }
            }
        }
        true
    }

    /// What an entry this leader proposed (or an operator's, through it)
    /// changed: a deleted job is forgotten, and a checkpoint's files follow
    /// its change at once (the reconcile is the backstop).
    fn applied(&mut self, ledger: &State, now: Now, events: &[Event], out: &mut Vec<Action>) {
        for event in events {
            if let Event::JobDeleted { job, remove_checkpoints, root } = event {
                self.job_deleted(ledger, job, *remove_checkpoints, root, out);
            }
        }
        let jobs: BTreeSet<&JobName> = events.iter().filter_map(Event::files_of).collect();
        for j in jobs.into_iter().filter_map(|job| ledger.jobs.get(job)) {
            self.reconcile_files(j, now, out);
        }
    }

    /// `job` was deleted from the ledger: whoever waits on it is answered,
    /// what this leader knew of it is forgotten (a job submitted under the
    /// name again starts afresh), its remaining connections are closed, and
    /// with `remove_checkpoints` its directory is removed.
    fn job_deleted(
        &mut self,
        ledger: &State,
        job: &JobName,
        remove_checkpoints: bool,
        root: &std::path::Path,
        out: &mut Vec<Action>,
    ) {
        if ledger.jobs.contains_key(job) {
            // submitted again before this was seen: the new job keeps its
            // soft state and its files
            tracing::warn!(%job, "job deleted and submitted again before the deletion was seen; its directory is kept");
            return;
        }
        // a proposal of the old job in flight holds up none of a new one's
        self.inflight.retain(|key, _| key.job != *job);
        if let Some(soft) = self.jobs.remove(job) {
            for w in soft.waiters {
                let outcome = CheckpointOutcome::Failed(format!("job {job} was deleted"));
                out.push(Action::Answer { request: w.request, outcome });
            }
        }
        let conns: Vec<ConnId> = self.conns.iter().filter(|(_, (j, _))| j == job).map(|(c, _)| *c).collect();
        for conn in conns {
            self.conns.remove(&conn);
            let stop = CoordinatorMessage::Stop { reason: format!("job {job} was deleted") };
            out.push(send(conn, stop));
            out.push(Action::Close { conn });
        }
        if remove_checkpoints {
            let dir = JobDir::new(root, job).path().to_path_buf();
            out.push(Action::Files { job: job.clone(), work: FileWork::RemoveJob(dir) });
        }
    }

    /// Reconciles every job against the ledger.
    pub fn tick(&mut self, ledger: &State, now: Now) -> Vec<Action> {
        self.reconciles += 1;
        let mut out = Vec::new();
        for j in ledger.jobs.values() {
            self.reconcile(j, now, &mut out);
        }
        // a job gone from the ledger answers whoever still waits on it, and
        // is forgotten (one submitted under its name again starts afresh)
        self.jobs.retain(|job, soft| {
            if ledger.jobs.contains_key(job) {
                return true;
            }
            for w in soft.waiters.drain(..) {
                let outcome = CheckpointOutcome::Failed(format!("job {job} is no longer in the ledger"));
                out.push(Action::Answer { request: w.request, outcome });
            }
            false
        });
        out
    }

    /// Proposes `cmd` unless the same proposal is in flight; true when made.
    fn propose(&mut self, now: Now, cmd: Command, out: &mut Vec<Action>) -> bool {
        if let Some(key) = ProposalKey::of(&cmd) {
            if self.inflight.get(&key).is_some_and(|t| now.mono_ms < t + self.cfg.proposal_retry_ms) {
                return false;
            }
            self.inflight.insert(key, now.mono_ms);
        }
        if let Command::Restore { job, generation, .. } = &cmd {
            let recovery = &mut self.soft(job, now.mono_ms).recovery;
            // a restore that restarts one not yet resumed keeps its decision's time
            let decided = recovery.as_ref().filter(|r| r.resumed.is_none()).and_then(|r| r.decided);
            let mut next = Recovery::new(*generation, Some(now.mono_ms));
            next.decided = decided.or(next.decided);
            *recovery = Some(next);
        }
        out.push(Action::Propose(cmd));
        true
    }

    /// Returns false when the registration was refused (nothing to reconcile).
    fn registered(&mut self, ledger: &State, now: Now, r: Registration, out: &mut Vec<Action>) -> bool {
        let Registration { conn, job, rank, incarnation, generation, step, host, http_addr } = r;
        let refuse = |code, message: String| vec![send(conn, error(code, message)), Action::Close { conn }];
        let Some(j) = ledger.jobs.get(&job) else {
            out.extend(refuse(
                ErrorCode::UnknownJob,
                format!("no job named {job}; submit it first (flotilla submit)"),
            ));
            return false;
        };
        let t = now.mono_ms;
        if let Some(addr) = http_addr {
            self.soft(&job, t).http_addrs.insert(incarnation, addr);
        }
        let Some(rank) = rank else {
            self.seat_spare(j, conn, incarnation, host, t, out);
            return true;
        };
        if rank.0 >= j.spec.world_size {
            out.extend(refuse(
                ErrorCode::InvalidRequest,
                format!("rank {rank} is outside job {job}'s world_size {}", j.spec.world_size),
            ));
            return false;
        }
        if let Some(why) = self.held_by_another(j, rank, incarnation, t) {
            tracing::info!(%job, %rank, worker = %incarnation, "{why}: the worker joins as a spare");
            self.seat_spare(j, conn, incarnation, host, t, out);
            return true;
        }
        let soft = self.soft(&job, t);
        let previous = soft.ranks.get(&rank);
        if let Some((old_conn, old_inc)) = previous.and_then(|p| Some((p.conn?, p.incarnation?))) {
            if old_conn != conn && incarnation != old_inc {
                // the old process went silent past the heartbeat timeout (a
                // live one keeps its rank, above): this newer one takes the
                // rank, and the old one, should it wake, is a spare that
                // holds nothing of it
                let (host, last_seen) = previous.map_or((None, t), |p| (p.host.clone(), p.last_seen));
                out.push(send(old_conn, self.registered_reply(j, true)));
                self.conns.insert(old_conn, (job.clone(), Seat::Spare(old_inc)));
                let spare = SpareSoft { conn: old_conn, host, ready: false, last_seen, told: t };
                self.soft(&job, t).spares.insert(old_inc, spare);
            } else if old_conn != conn {
                // the same process on a new connection: the old one is dead
                out.push(Action::Close { conn: old_conn });
                self.conns.remove(&old_conn);
            }
        }
        let soft = self.soft(&job, t);
        // one process holds one seat: a spare that registers for a rank is no spare
        if let Some(s) = soft.spares.remove(&incarnation) {
            if s.conn != conn {
                self.conns.remove(&s.conn);
                out.push(Action::Close { conn: s.conn });
            }
        }
        let soft = self.soft(&job, t);
        let new_process = soft.ranks.get(&rank).and_then(|p| p.incarnation) != Some(incarnation);
        if new_process && j.state == JobState::Blocked {
            soft.retry_blocked = true;
        }
        let mut entry = RankSoft::new(t, j.spec.failure.heartbeat_interval_ms);
        entry.conn = Some(conn);
        entry.incarnation = Some(incarnation);
        entry.host = host;
        entry.report(generation, step, WorkerStatus::Waiting, t);
        soft.ranks.insert(rank, entry);
        self.conns.insert(conn, (job.clone(), Seat::Rank(rank)));
        out.push(send(conn, self.registered_reply(j, false)));
        true
    }

    fn registered_reply(&self, j: &Job, spare: bool) -> CoordinatorMessage {
        CoordinatorMessage::Registered {
            spec: j.spec.clone(),
            generation: j.generation,
            term: self.term,
            spare,
        }
    }

    /// Why `incarnation` may not take `rank` now, if it may not: a live
    /// process holds it, or a newer one whose connection is open. (A rank
    /// the ledger gave to a spare goes to that spare once it is here,
    /// whoever registered for it first: [`Supervisor::seat_takeovers`].)
    fn held_by_another(&mut self, j: &Job, rank: Rank, incarnation: Incarnation, t: u64) -> Option<String> {
        let timeout = j.spec.failure.heartbeat_timeout_ms;
        let soft = self.soft(&j.spec.name, t);
        let r = soft.ranks.get(&rank);
        if let Some(holder) = r.and_then(|r| r.held_live_by_other(incarnation, t, timeout)) {
            return Some(format!("rank {rank} is held by live worker {holder}"));
        }
        // an older process (a resumed zombie) never displaces a newer one
        let holder = r.filter(|r| r.conn.is_some()).and_then(|r| r.incarnation)?;
        (holder > incarnation).then(|| format!("rank {rank} is held by worker {holder}, a newer process"))
    }

    /// Seats worker `incarnation` on `conn` among the job's spares (from a
    /// rank it held here, if it did) and tells it so.
    fn seat_spare(
        &mut self,
        j: &Job,
        conn: ConnId,
        incarnation: Incarnation,
        host: Option<String>,
        t: u64,
        out: &mut Vec<Action>,
    ) {
        let job = j.spec.name.clone();
        let soft = self.soft(&job, t);
        let mut gone = Vec::new();
        for r in soft.ranks.values_mut().filter(|r| r.incarnation == Some(incarnation)) {
            gone.extend(r.conn.take().filter(|c| *c != conn));
        }
        if let Some(old) =
            soft.spares.insert(incarnation, SpareSoft { conn, host, ready: false, last_seen: t, told: t })
        {
            gone.extend(Some(old.conn).filter(|c| *c != conn));
        }
        for c in gone {
            self.conns.remove(&c);
            out.push(Action::Close { conn: c });
        }
        self.conns.insert(conn, (job, Seat::Spare(incarnation)));
        out.push(send(conn, self.registered_reply(j, true)));
    }

    fn message(&mut self, ledger: &State, now: Now, conn: ConnId, msg: WorkerMessage, out: &mut Vec<Action>) {
        let Some((job, seat)) = self.conns.get(&conn).cloned() else { return };
        let Some(j) = ledger.jobs.get(&job) else { return };
        let current = j.generation;
        let t = now.mono_ms;
        let rank = match seat {
            Seat::Rank(rank) => rank,
            Seat::Spare(id) => return self.spare_message(j, id, conn, msg, t, out),
        };
        let soft = self.soft(&job, t);
        let Some(r) = soft.ranks.get_mut(&rank).filter(|r| r.conn == Some(conn)) else { return };
        r.last_seen = t;
        r.lost = false;
        let stale = |what: String| {
            send(
                conn,
                error(ErrorCode::Stale, format!("{what}: job {job} is in generation {current}; dropped")),
            )
        };
        match msg {
            // a node session's envelope is opened by the connection, which
            // turns `Left` into `Disconnected`: neither reaches a rank here
            WorkerMessage::Register { .. } | WorkerMessage::Batch(_) | WorkerMessage::Left => {}
            WorkerMessage::Heartbeat { generation, step, status } => {
                r.report(Some(generation).filter(|g| g.0 > 0), step, status, t);
            }
            WorkerMessage::ShardSaved { generation, checkpoint, manifest } => {
                let c = j.checkpoints.get(&checkpoint);
                let pending =
                    c.is_some_and(|c| c.state == CheckpointState::Pending && c.generation == current);
                if generation == current && pending && manifest.rank == rank {
                    if r.generation != Some(current) {
                        r.report(Some(current), r.step, r.status, t);
                    }
                    // the ledger keeps the whole-file checksum only (the
                    // header carries each tensor's): small at any model size
                    r.saved.insert(checkpoint, manifest);
                } else if generation == current && c.is_some_and(|c| c.state != CheckpointState::Aborted) {
                    // a re-report of a shard already counted (committed): nothing to do
                } else {
                    out.push(stale(format!("shard of checkpoint {checkpoint} from generation {generation}")));
                }
            }
            WorkerMessage::ShardFailed { generation, checkpoint, kind, reason } => {
                if generation != current || j.pending().is_none_or(|p| p.id != checkpoint) {
                    return;
                }
                let reason = match kind {
                    ShardFailureKind::PastStep => {
                        soft.lead_ms = (soft.lead_ms * 2).min(MAX_LEAD_MS);
                        AbortReason::RankPastStep { rank }
                    }
                    ShardFailureKind::Write => AbortReason::WriteFailed { rank, error: reason },
                };
                let cmd = Command::AbortCheckpoint { job, id: checkpoint, reason, now_ms: now.wall_ms };
                self.propose(now, cmd, out);
            }
            WorkerMessage::Restored { generation, step, source } => {
                if generation == current {
                    let first = r.generation != Some(generation);
                    r.report(Some(generation), step, WorkerStatus::Waiting, t);
                    if let Some(rec) =
                        soft.recovery.as_mut().filter(|rec| first && rec.generation == generation)
                    {
                        rec.last_restored = Some((rank, t));
                        rec.source = rec.source.max(source);
                    }
                }
            }
            WorkerMessage::RestoreFailed { generation, checkpoint, kind, message } => {
                if generation != current || !matches!(j.state, JobState::Restoring | JobState::Waiting) {
                    return;
                }
                tracing::warn!(%job, %rank, %generation, "restore failed: {message}");
                let cmd = match (kind, checkpoint) {
                    // only a checksum or format mismatch condemns a checkpoint
                    // (one of the job's own: the `resume_from` origin blocks);
                    // the reconciler then restores from the one before it
                    (RestoreFailureKind::Corrupt, Some(id)) if j.checkpoints.contains_key(&id) => {
                        Command::MarkCorrupt { job, id, reason: message, now_ms: now.wall_ms }
                    }
                    _ => Command::BlockJob {
                        job,
                        generation,
                        error: message,
                        rank: Some(rank),
                        kind: Some(kind),
                        now_ms: now.wall_ms,
                    },
                };
                self.propose(now, cmd, out);
            }
            WorkerMessage::CopiesMade { generation, checkpoint, to } => {
                if generation == current {
                    soft.copies.insert(rank, (checkpoint, to));
                }
            }
            WorkerMessage::TrainerFailed { generation, reason } => {
                tracing::warn!(%job, %rank, %generation, "trainer failed: {reason}");
                r.status = WorkerStatus::Failed;
                r.failed_in = Some(generation);
                r.failure = Some(reason);
                r.progress_at = t;
            }
            WorkerMessage::Rendezvous { generation, addr } => {
                // only rank 0 hosts the rendezvous, only while its generation
                // is being set up, and the first offer stands (a rank 0
                // replaced within the generation is told the same one)
                let setting_up = matches!(j.state, JobState::Waiting | JobState::Restoring);
                let known = soft.rendezvous.as_ref().is_some_and(|(rg, _)| *rg == generation);
                if rank == Rank(0) && generation == current && setting_up && !known {
                    soft.rendezvous = Some((generation, addr));
                }
            }
            WorkerMessage::Finished { generation, step, digest } => {
                if generation == current {
                    r.report(Some(generation), step, WorkerStatus::Finished, t);
                    r.digest = Some(digest);
                }
            }
        }
    }

    /// A spare's message: its heartbeats say whether it is ready; it holds
    /// no rank, so any report of a rank's work from it is stale (a worker
    /// whose rank went to a spare can touch nothing of it).
    fn spare_message(
        &mut self,
        j: &Job,
        id: Incarnation,
        conn: ConnId,
        msg: WorkerMessage,
        t: u64,
        out: &mut Vec<Action>,
    ) {
        let (job, current) = (&j.spec.name, j.generation);
        let resend = self.cfg.min_resend_ms.max(2 * j.spec.failure.heartbeat_interval_ms);
        let told = self.registered_reply(j, true);
        let Some(s) = self.soft(job, t).spares.get_mut(&id).filter(|s| s.conn == conn) else { return };
        s.last_seen = t;
        match msg {
            WorkerMessage::Heartbeat { status, .. } => {
                s.ready = status == WorkerStatus::Spare;
                let spare = matches!(status, WorkerStatus::Spare | WorkerStatus::SpareStarting);
                if !spare && t >= s.told + resend {
                    // it has not heard that its rank went elsewhere
                    s.told = t;
                    out.push(send(conn, told));
                }
            }
            WorkerMessage::Register { .. } | WorkerMessage::Batch(_) | WorkerMessage::Left => {}
            other => {
                let message = format!(
                    "a spare of job {job} holds no rank in generation {current}: {} dropped",
                    report_name(&other)
                );
                out.push(send(conn, error(ErrorCode::Stale, message)));
            }
        }
    }

    fn reconcile(&mut self, j: &Job, now: Now, out: &mut Vec<Action>) {
        let name = j.spec.name.clone();
        let t = now.mono_ms;
        self.reconcile_files(j, now, out);
        self.answer_waiters(j, now, out);
        let world = j.spec.world_size;
        let resend = self.cfg.min_resend_ms.max(2 * j.spec.failure.heartbeat_interval_ms);
        let retry_ms = self.cfg.blocked_retry_ms;
        let soft = self.soft(&name, t);
        // every rank has an entry: one never heard from is silent since this
        // leader took over
        for rank in (0..world).map(Rank) {
            soft.ranks.entry(rank).or_insert_with(|| RankSoft::new(t, j.spec.failure.heartbeat_interval_ms));
        }
        let g = j.generation;
        match j.state {
            JobState::Waiting => {
                if self.setup_failed(j, now, out) {
                    return;
                }
                // a rank whose worker is gone (or never came) goes to a ready spare
                if self.spares_take_lost_ranks(j, now, out) {
                    return;
                }
                // every rank builds its first state (fresh at step 0, or the
                // `resume_from` checkpoint) in generation G, then the job starts
                let soft = self.soft(&name, t);
                direct_restores(j, soft, t, resend, out);
                if soft.ranks.values().all(|r| r.conn.is_some() && r.generation == Some(g)) {
                    let holders = holders(soft);
                    self.propose(now, Command::StartJob { job: name, generation: g, holders }, out);
                }
            }
            JobState::Running => self.reconcile_running(j, now, resend, out),
            JobState::Restoring => self.reconcile_restoring(j, now, resend, out),
            JobState::Blocked => {
                let seen = match soft.blocked_seen {
                    Some((bg, at)) if bg == g => at,
                    _ => {
                        soft.blocked_seen = Some((g, t));
                        soft.retry_blocked = false;
                        t
                    }
                };
                if soft.retry_blocked || t >= seen + retry_ms {
                    soft.retry_blocked = false;
                    soft.blocked_seen = Some((g, t));
                    let from = j.restored_from.filter(|id| {
                        j.checkpoints.get(id).is_some_and(|c| c.state == CheckpointState::Committed)
                    });
                    let from = from.or_else(|| j.latest_committed().map(|c| c.id));
                    let cmd = Command::Restore {
                        job: name,
                        generation: Generation(g.0 + 1),
                        from,
                        reason: RestoreReason::Retry,
                        detail: None,
                        now_ms: now.wall_ms,
                        takeovers: Vec::new(),
                    };
                    self.propose(now, cmd, out);
                }
            }
            JobState::Succeeded | JobState::Cancelled => {
                let reason = match j.state {
                    JobState::Cancelled => format!("job {name} was cancelled"),
                    _ => format!("job {name} succeeded"),
                };
                for r in soft.ranks.values_mut() {
                    direct(
                        r,
                        Phase::Stop,
                        CoordinatorMessage::Stop { reason: reason.clone() },
                        t,
                        resend,
                        out,
                    );
                }
                // spares are told once; one that registers later is told then
                let stop = CoordinatorMessage::Stop { reason };
                for (_, spare) in std::mem::take(&mut soft.spares) {
                    out.push(send(spare.conn, stop.clone()));
                }
            }
            // a failed job keeps its workers, idle, for an operator's restore
            JobState::Failed => {}
        }
    }

    /// The ranks that have failed in a running job, and why (in rank order).
    /// With a ready spare, a closed connection is a failure at once: the
    /// spare takes the rank without waiting for the process to come back.
    fn failed_ranks(&mut self, j: &Job, t: u64) -> Vec<(Rank, RestoreReason)> {
        let g = j.generation;
        let timeout = j.spec.failure.heartbeat_timeout_ms;
        let hang = j.spec.failure.hang_timeout_seconds * 1000;
        let spare_ready = !self.ready_spares(j, t).is_empty();
        let grace = if spare_ready { 0 } else { self.cfg.reconnect_grace_ms };
        let soft = self.soft(&j.spec.name, t);
        let running_since = match soft.running_seen {
            Some((rg, at)) if rg == g => at,
            _ => {
                soft.running_seen = Some((g, t));
                t
            }
        };
        soft.ranks
            .iter()
            .filter_map(|(rank, r)| {
                let reason = if r.silent(t, timeout, grace) {
                    if r.conn.is_some() {
                        RestoreReason::HeartbeatTimeout
                    } else {
                        RestoreReason::Disconnected
                    }
                } else if r.conn.is_none() {
                    return None; // reconnecting within the heartbeat timeout is no failure
                } else if r.status == WorkerStatus::Failed {
                    RestoreReason::TrainerFailed
                } else if r.generation != Some(g) {
                    // a process that does not hold this generation's state: it restarted
                    RestoreReason::WorkerRestarted
                } else if r.status != WorkerStatus::Finished && t > r.progress_at.max(running_since) + hang {
                    RestoreReason::Hang
                } else {
                    return None;
                };
                Some((*rank, reason))
            })
            .collect()
    }

    /// The job's spares that could take a rank now: ready, heard from
    /// within the heartbeat timeout, and given no rank by the ledger yet.
    fn ready_spares(&mut self, j: &Job, t: u64) -> Vec<(Incarnation, Option<String>)> {
        let timeout = j.spec.failure.heartbeat_timeout_ms;
        let soft = self.soft(&j.spec.name, t);
        soft.spares
            .iter()
            .filter(|(id, s)| s.ready && t <= s.last_seen + timeout && !j.holders.values().any(|h| h == *id))
            .map(|(id, s)| (*id, s.host.clone()))
            .collect()
    }

    /// Spares for as many of the `failed` ranks as there are ready ones,
    /// each from another host than the failed rank's where one can be.
    fn takeovers(&mut self, j: &Job, failed: &[Rank], t: u64) -> Vec<Takeover> {
        let mut ready = self.ready_spares(j, t);
        let soft = self.soft(&j.spec.name, t);
        let mut out = Vec::new();
        for rank in failed {
            let host = soft.ranks.get(rank).and_then(|r| r.host.clone());
            let pick = ready.iter().position(|(_, h)| host.is_none() || *h != host).or(if ready.is_empty() {
                None
            } else {
                Some(0)
            });
            let Some(i) = pick else { break };
            let (worker, _) = ready.remove(i);
            out.push(Takeover { rank: *rank, worker });
        }
        out
    }

    fn reconcile_running(&mut self, j: &Job, now: Now, resend: u64, out: &mut Vec<Action>) {
        let name = j.spec.name.clone();
        let (g, t) = (j.generation, now.mono_ms);
        let soft = self.soft(&name, t);
        if soft.running_since_wall.is_none_or(|(sg, _)| sg != g) {
            soft.running_since_wall = Some((g, now.wall_ms));
        }
        ask_copies(j, soft, out);
        // the restore this leader decided is over: the job trains again
        if let Some(rec) = soft.recovery.take_if(|r| r.generation == g && r.resumed.is_some()) {
            let seconds = rec.decided.map(|decided| t.saturating_sub(decided) as f64 / 1e3);
            out.push(Action::Recovered { job: name.clone(), seconds, source: rec.source });
            let wall = |mono: u64| now.wall_ms.saturating_sub(t.saturating_sub(mono));
            soft.last_recovery = Some(RecoveryView {
                generation: g,
                decided_ms: rec.decided.map(wall),
                committed_ms: rec.committed.map(wall),
                restored_ms: rec.last_restored.map(|(_, at)| wall(at)),
                running_ms: now.wall_ms,
                source: rec.source,
            });
        }
        let failed = self.failed_ranks(j, t);
        if let Some(&(rank, reason)) = failed.first() {
            let failure = self.soft(&name, t).ranks.get(&rank).and_then(|r| r.failure.clone());
            // a spare takes a rank whose process is gone, stuck or crashed; a
            // process that restarted is there already and restores in place
            let lost: Vec<Rank> = failed
                .iter()
                .filter(|(_, why)| *why != RestoreReason::WorkerRestarted)
                .map(|(r, _)| *r)
                .collect();
            let takeovers = self.takeovers(j, &lost, t);
            let cmd = Command::Restore {
                job: name.clone(),
                generation: Generation(g.0 + 1),
                from: j.latest_committed().map(|c| c.id),
                reason,
                detail: Some(match failure.filter(|_| reason == RestoreReason::TrainerFailed) {
                    Some(why) => format!("rank {rank}: {why}"),
                    None => format!("rank {rank}"),
                }),
                now_ms: now.wall_ms,
                takeovers: takeovers.clone(),
            };
            if self.propose(now, cmd, out) {
                tracing::warn!(job = %name, %rank, generation = %g, spares = takeovers.len(), "rank failed ({}): restoring the job", reason.as_str());
                // the pending checkpoint can no longer commit (the restore
                // leaves its generation): the survivors give up its shard
                // writes now, while the restore commits, not when its
                // directive comes. Those writes hold the buffer the restore
                // reads into, and the disk the ledger's fsync waits for.
                if let Some(p) = j.pending() {
                    let abort = CoordinatorMessage::AbortCheckpoint { generation: g, checkpoint: p.id };
                    let soft = self.soft(&name, t);
                    out.extend(soft.ranks.values().filter_map(|r| Some(send(r.conn?, abort.clone()))));
                }
            }
            return;
        }
        let start = j.start_step();
        let soft = self.soft(&name, t);
        for r in soft.ranks.values_mut() {
            if r.status == WorkerStatus::Waiting {
                direct(
                    r,
                    Phase::Resume(g),
                    CoordinatorMessage::Resume { generation: g, step: start },
                    t,
                    resend,
                    out,
                );
            }
        }
        if soft.ranks.values().all(|r| r.digest.is_some()) {
            if let Some(last) = final_checkpoint_due(j) {
                // every rank stands at the last step: the final checkpoint
                // first (once; one given up is not tried again)
                if j.pending().is_none() {
                    let cmd = Command::BeginCheckpoint {
                        job: name,
                        id: j.next_checkpoint,
                        step: Step(last),
                        generation: g,
                        now_ms: now.wall_ms,
                    };
                    self.propose(now, cmd, out);
                    return;
                }
                self.reconcile_checkpoint(j, now, resend, out);
                return;
            }
            let digests: Vec<&String> = soft.ranks.values().filter_map(|r| r.digest.as_ref()).collect();
            let digest = combine_digests(&digests);
            // every rank finished: the slowest one's step is the job's last
            let step = soft.ranks.values().map(|r| r.step).min();
            self.propose(now, Command::FinishJob { job: name, generation: g, digest, step }, out);
            return;
        }
        self.reconcile_checkpoint(j, now, resend, out);
    }

    fn reconcile_checkpoint(&mut self, j: &Job, now: Now, resend: u64, out: &mut Vec<Action>) {
        let name = j.spec.name.clone();
        let t = now.mono_ms;
        let base_lead = self.cfg.base_lead_ms;
        let soft = self.soft(&name, t);
        let pending = j.pending().map(|p| (p.id, p.step));
        for r in soft.ranks.values_mut() {
            r.saved.retain(|id, _| Some(*id) == pending.map(|p| p.0));
        }
        let Some((id, step)) = pending else {
            soft.pending_seen = None;
            if let Some(cmd) = schedule_checkpoint(j, soft, now) {
                self.propose(now, cmd, out);
            }
            return;
        };
        let seen = match soft.pending_seen {
            Some((pid, at)) if pid == id => at,
            _ => {
                soft.pending_seen = Some((id, t));
                t
            }
        };
        let timeout_s = j.spec.checkpoint.timeout_seconds;
        if t > seen + timeout_s * 1000 {
            let reason = AbortReason::Timeout { seconds: timeout_s };
            self.propose(now, Command::AbortCheckpoint { job: name, id, reason, now_ms: now.wall_ms }, out);
            return;
        }
        if soft.ranks.values().all(|r| r.saved.contains_key(&id)) {
            let shards = soft.ranks.values().filter_map(|r| r.saved.get(&id).cloned()).collect();
            soft.lead_ms = (soft.lead_ms / 2).max(base_lead);
            self.propose(now, Command::CommitCheckpoint { job: name, id, shards, now_ms: now.wall_ms }, out);
            return;
        }
        let dir = JobDir::new(&j.spec.checkpoint.root, &name).checkpoint_dir(id);
        let directive =
            CoordinatorMessage::Checkpoint { generation: j.generation, checkpoint: id, step, dir };
        for r in soft.ranks.values_mut().filter(|r| !r.saved.contains_key(&id)) {
            let Some(conn) = r.conn else { continue };
            if r.sent_checkpoint.is_some_and(|(sid, at)| sid == id && t < at + resend) {
                continue;
            }
            r.sent_checkpoint = Some((id, t));
            out.push(send(conn, directive.clone()));
        }
    }

    /// A trainer that failed while the job's generation was being set up
    /// (waiting or restoring) restarts the set-up in a new generation; each
    /// such restart counts toward `max_restarts`.
    fn setup_failed(&mut self, j: &Job, now: Now, out: &mut Vec<Action>) -> bool {
        let g = j.generation;
        let soft = self.soft(&j.spec.name, now.mono_ms);
        let Some((rank, r)) = soft.ranks.iter().find(|(_, r)| r.failed_in == Some(g)) else {
            return false;
        };
        let (rank, why) = (*rank, r.failure.clone().unwrap_or_default());
        let cmd = Command::Restore {
            job: j.spec.name.clone(),
            generation: Generation(g.0 + 1),
            from: j.restored_from,
            reason: RestoreReason::TrainerFailed,
            detail: Some(format!("rank {rank}: {why}")),
            now_ms: now.wall_ms,
            takeovers: Vec::new(),
        };
        if self.propose(now, cmd, out) {
            tracing::warn!(job = %j.spec.name, %rank, generation = %g, "trainer failed while the job was being set up: restarting the set-up");
        }
        true
    }

    fn reconcile_restoring(&mut self, j: &Job, now: Now, resend: u64, out: &mut Vec<Action>) {
        if self.setup_failed(j, now, out) {
            return;
        }
        let name = j.spec.name.clone();
        let (g, t) = (j.generation, now.mono_ms);
        let next = Generation(g.0 + 1);
        // the checkpoint being restored was condemned: fall back
        if let Some(c) = j.restored_from.and_then(|id| j.checkpoints.get(&id)) {
            if c.state != CheckpointState::Committed {
                let cmd = Command::Restore {
                    job: name,
                    generation: next,
                    from: j.latest_committed().map(|c| c.id),
                    reason: RestoreReason::CorruptCheckpoint,
                    detail: None,
                    now_ms: now.wall_ms,
                    takeovers: Vec::new(),
                };
                self.propose(now, cmd, out);
                return;
            }
        }
        // the ranks the ledger gave to spares go to them now
        self.seat_takeovers(j, t, out);
        let timeout = j.spec.failure.heartbeat_timeout_ms;
        // a closed connection is lost at once when a spare can take its
        // rank, and a rank already lost once is lost again for a spare
        let spare = !self.ready_spares(j, t).is_empty();
        let grace = if spare { 0 } else { timeout };
        let soft = self.soft(&name, t);
        // ranks lost while restoring restart the restore once per loss:
        // every rank found silent now is one loss (a stalled host or leader
        // silences many at once; one restart each would be a cascade)
        let lost: Vec<(Rank, bool)> = soft
            .ranks
            .iter_mut()
            .filter(|(_, r)| (!r.lost || spare) && r.silent(t, timeout, grace))
            .map(|(rank, r)| {
                r.lost = true;
                (*rank, r.conn.is_some())
            })
            .collect();
        if let Some(&(first, connected)) = lost.first() {
            let reason =
                if connected { RestoreReason::HeartbeatTimeout } else { RestoreReason::Disconnected };
            let count = lost.len();
            let ranks =
                if count == 1 { format!("rank {first}") } else { format!("{count} ranks from rank {first}") };
            let lost: Vec<Rank> = lost.into_iter().map(|(r, _)| r).collect();
            let takeovers = self.takeovers(j, &lost, t);
            tracing::warn!(job = %name, generation = %g, spares = takeovers.len(), "{ranks} lost while restoring: restarting the restore");
            let cmd = Command::Restore {
                job: name,
                generation: next,
                from: j.restored_from,
                reason,
                detail: Some(format!("{ranks}, while restoring")),
                now_ms: now.wall_ms,
                takeovers,
            };
            self.propose(now, cmd, out);
            return;
        }
        let rec = match &mut soft.recovery {
            Some(rec) if rec.generation == g => rec,
            other => other.insert(Recovery::new(g, None)),
        };
        rec.committed.get_or_insert(t);
        direct_restores(j, soft, t, resend, out);
        let all_hold_g = soft.ranks.values().all(|r| r.conn.is_some() && r.generation == Some(g));
        let holders = holders(soft);
        if all_hold_g
            && self.propose(now, Command::ResumeJob { job: name.clone(), generation: g, holders }, out)
        {
            if let Some(rec) = self.soft(&name, t).recovery.as_mut().filter(|r| r.resumed.is_none()) {
                rec.log(&name, t);
                rec.resumed = Some(t);
            }
        }
    }

    /// While the job waits for its ranks: every rank whose worker is gone
    /// (its connection closed) or never came (twice the heartbeat timeout)
    /// goes to a ready spare, in a restore into the next generation. True
    /// when one was proposed.
    fn spares_take_lost_ranks(&mut self, j: &Job, now: Now, out: &mut Vec<Action>) -> bool {
        let t = now.mono_ms;
        if self.ready_spares(j, t).is_empty() {
            return false;
        }
        let timeout = j.spec.failure.heartbeat_timeout_ms;
        let soft = self.soft(&j.spec.name, t);
        let gone: Vec<Rank> = soft
            .ranks
            .iter()
            .filter(|(_, r)| r.conn.is_none() && r.silent(t, timeout, 0))
            .map(|(k, _)| *k)
            .collect();
        let Some(&first) = gone.first() else { return false };
        let takeovers = self.takeovers(j, &gone, t);
        let cmd = Command::Restore {
            job: j.spec.name.clone(),
            generation: Generation(j.generation.0 + 1),
            from: j.restored_from,
            reason: RestoreReason::Disconnected,
            detail: Some(format!("rank {first}, before the job started")),
            now_ms: now.wall_ms,
            takeovers,
        };
        self.propose(now, cmd, out);
        true
    }

    /// Gives each rank the ledger assigned to a spare to that spare, once it
    /// is connected here: it is told its rank, its connection becomes the
    /// rank's, and the rank's previous process, if still connected, joins
    /// the spares (it holds nothing of the new generation).
    fn seat_takeovers(&mut self, j: &Job, t: u64, out: &mut Vec<Action>) {
        let (name, g) = (j.spec.name.clone(), j.generation);
        let hb = j.spec.failure.heartbeat_interval_ms;
        let demoted = self.registered_reply(j, true);
        let soft = self.soft(&name, t);
        let mut moved = Vec::new();
        for (&rank, &holder) in &j.holders {
            if soft.ranks.get(&rank).is_some_and(|r| r.incarnation == Some(holder)) {
                continue;
            }
            let Some(spare) = soft.spares.remove(&holder) else { continue };
            if let Some(old) = soft.ranks.get(&rank) {
                if let (Some(conn), Some(id)) = (old.conn, old.incarnation) {
                    out.push(send(conn, demoted.clone()));
                    soft.spares.insert(
                        id,
                        SpareSoft { conn, host: old.host.clone(), ready: false, last_seen: t, told: t },
                    );
                    moved.push((conn, Seat::Spare(id)));
                }
            }
            // it reports `Spare` until it has taken the rank: the restore
            // directive goes out with an `Assign` ahead of it until then
            let mut entry = RankSoft::new(t, hb);
            entry.conn = Some(spare.conn);
            entry.incarnation = Some(holder);
            entry.host = spare.host;
            entry.report(None, Step(0), WorkerStatus::Spare, t);
            soft.ranks.insert(rank, entry);
            moved.push((spare.conn, Seat::Rank(rank)));
            tracing::info!(job = %name, %rank, worker = %holder, generation = %g, "spare takes the rank");
        }
        for (conn, seat) in moved {
            self.conns.insert(conn, (name.clone(), seat));
        }
    }

    fn reconcile_files(&mut self, j: &Job, now: Now, out: &mut Vec<Action>) {
        let name = j.spec.name.clone();
        let soft = self.soft(&name, now.mono_ms);
        let work_for = |c: &crate::ledger::Checkpoint| match c.state {
            CheckpointState::Committed | CheckpointState::Abandoned => Some(FileWork::Manifest(c.id)),
            CheckpointState::Corrupt => Some(FileWork::Condemn(c.id)),
            CheckpointState::Aborted | CheckpointState::Deleted => Some(FileWork::Delete(c.id)),
            CheckpointState::Pending => None,
        };
        let (mut want, removals): (Vec<FileWork>, Vec<FileWork>) =
            j.checkpoints.values().filter_map(work_for).partition(|w| matches!(w, FileWork::Manifest(_)));
        // LATEST after the manifests it may name and before the condemned or
        // deleted checkpoint it named loses its files
        want.push(FileWork::Latest(j.latest_committed().map(|c| c.id)));
        want.extend(removals);
        if j.pruned_total > 0 {
            want.push(FileWork::Sweep(j.pruned_total));
        }
        // what is no longer wanted is forgotten, so that it is done again if
        // it is wanted again (a cleared verdict, LATEST moving back)
        soft.files.retain(|w| want.contains(w));
        for work in want {
            if soft.files.insert(work.clone()) {
                out.push(Action::Files { job: name.clone(), work });
            }
        }
    }
}

/// The worker holding each rank, as this leader knows them.
fn holders(soft: &JobSoft) -> BTreeMap<Rank, Incarnation> {
    soft.ranks.iter().filter_map(|(rank, r)| Some((*rank, r.incarnation?))).collect()
}

/// What a report is, for a refusal's words.
fn report_name(msg: &WorkerMessage) -> &'static str {
    match msg {
        WorkerMessage::ShardSaved { .. } => "its shard report",
        WorkerMessage::ShardFailed { .. } => "its shard failure",
        WorkerMessage::Restored { .. } | WorkerMessage::RestoreFailed { .. } => "its restore report",
        WorkerMessage::TrainerFailed { .. } => "its trainer failure",
        WorkerMessage::Rendezvous { .. } => "its rendezvous",
        WorkerMessage::Finished { .. } => "its final report",
        _ => "its message",
    }
}

/// Asks every rank, once per latest committed checkpoint, to send copies of
/// its shard to other workers' memory (`[checkpoint] memory_copies`): the
/// candidates on another host first, then the next ranks in ring order,
/// then the spares, each worker given at most `memory_copies` of them.
/// Asked once every rank is connected and known.
fn ask_copies(j: &Job, soft: &mut JobSoft, out: &mut Vec<Action>) {
    let copies = j.spec.checkpoint.memory_copies;
    let Some(c) = j.latest_committed().filter(|_| copies > 0) else { return };
    if soft.copies_asked == Some(c.id) {
        return;
    }
    let live: Vec<(Rank, ConnId, Option<String>, String)> = soft
        .ranks
        .iter()
        .filter_map(|(r, rs)| {
            let addr = soft.http_addrs.get(&rs.incarnation?)?;
            Some((*r, rs.conn?, rs.host.clone(), addr.clone()))
        })
        .collect();
    if live.len() < j.spec.world_size as usize {
        return;
    }
    let spares: Vec<(Option<String>, String)> = soft
        .spares
        .iter()
        .filter_map(|(inc, s)| Some((s.host.clone(), soft.http_addrs.get(inc)?.clone())))
        .collect();
    // each worker holds at most `copies` copies: place them here, so that a
    // copy is sent where it fits (a peer refuses one beyond its bound only
    // after it was sent); the rest of the candidates follow as fallbacks
    let mut room: BTreeMap<String, u32> =
        live.iter().map(|l| &l.3).chain(spares.iter().map(|s| &s.1)).map(|a| (a.clone(), copies)).collect();
    for (i, (_, conn, host, _)) in live.iter().enumerate() {
        let ring = (1..live.len()).map(|k| &live[(i + k) % live.len()]).map(|(_, _, h, a)| (h, a));
        let mut to: Vec<(bool, usize, String)> = ring
            .chain(spares.iter().map(|(h, a)| (h, a)))
            .enumerate()
            .map(|(order, (h, a))| (host.is_some() && h == host, order, a.clone()))
            .collect();
        to.sort();
        let mut to: Vec<String> = to.into_iter().map(|(_, _, a)| a).collect();
        let mut placed = Vec::new();
        for a in &to {
            if placed.len() == copies as usize {
                break;
            }
            if let Some(n) = room.get_mut(a).filter(|n| **n > 0) {
                *n -= 1;
                placed.push(a.clone());
            }
        }
        to.retain(|a| !placed.contains(a));
        placed.extend(to);
        let msg =
            CoordinatorMessage::CopyShard { generation: j.generation, checkpoint: c.id, copies, to: placed };
        out.push(send(*conn, msg));
    }
    soft.copies_asked = Some(c.id);
}

/// Tells every rank that does not hold generation G's state yet to restore
/// into it, with the rendezvous once rank 0 has offered one.
fn direct_restores(j: &Job, soft: &mut JobSoft, t: u64, resend: u64, out: &mut Vec<Action>) {
    let g = j.generation;
    let rendezvous = soft.rendezvous.as_ref().filter(|(rg, _)| *rg == g).map(|(_, addr)| addr.clone());
    for (rank, r) in soft.ranks.iter_mut() {
        if r.generation != Some(g) {
            // the copies of its shard in other workers' memory come first
            let from = restore_point(j, *rank).map(|mut p| {
                if let Some((_, to)) = soft.copies.get(rank).filter(|(c, _)| *c == p.checkpoint) {
                    p.peers = to.clone();
                }
                p
            });
            let msg = CoordinatorMessage::Restore { generation: g, from, rendezvous: rendezvous.clone() };
            let at = out.len();
            direct(r, Phase::Restore(g, rendezvous.is_some()), msg, t, resend, out);
            // a spare seated on the rank that has not said it took it yet
            if let Some(conn) = r.conn.filter(|_| out.len() > at && r.status == WorkerStatus::Spare) {
                out.insert(at, send(conn, CoordinatorMessage::Assign { rank: *rank, generation: g }));
            }
        }
    }
}

/// Sends a lifecycle directive unless the same one went out less than
/// `resend` ago (it is re-sent until the rank is observed to have done it).
fn direct(
    r: &mut RankSoft,
    phase: Phase,
    msg: CoordinatorMessage,
    t: u64,
    resend: u64,
    out: &mut Vec<Action>,
) {
    let Some(conn) = r.conn else { return };
    if r.sent_phase.is_some_and(|(p, at)| p == phase && t < at + resend) {
        return;
    }
    r.sent_phase = Some((phase, t));
    out.push(send(conn, msg));
}

#[cfg(test)]
mod tests;
