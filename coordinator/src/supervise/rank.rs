//! One rank as the leader knows it: its soft state (what it last reported,
//! the directive last sent) and the views status and metrics read.

use super::ConnId;
use flotilla_shared::ids::{CheckpointId, Generation, Incarnation, Rank, Step};
use flotilla_shared::shard::ShardDigest;
use flotilla_shared::wire::WorkerStatus;
use std::collections::BTreeMap;

/// A directive of the job's lifecycle, for re-send throttling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// With or without the rendezvous: once rank 0 offers it, the directive
    /// goes out again at once.
    Restore(Generation, bool),
    Resume(Generation),
    Stop,
}

/// What the leader knows of one rank.
#[derive(Debug, Clone)]
pub(super) struct RankSoft {
    /// The live connection, if any.
    pub(super) conn: Option<ConnId>,
    /// The process, once heard from.
    pub(super) incarnation: Option<Incarnation>,
    /// The host it runs on, as it said.
    pub(super) host: Option<String>,
    /// The generation whose state it holds.
    pub(super) generation: Option<Generation>,
    pub(super) step: Step,
    pub(super) status: WorkerStatus,
    pub(super) last_seen: u64,
    /// When its step or status last changed.
    pub(super) progress_at: u64,
    /// Steps per millisecond, and the sample it was measured from.
    pub(super) rate: f64,
    pub(super) rate_sample: (Step, u64),
    /// The shortest interval a rate is measured over (half the heartbeat
    /// interval): heartbeats that queued and are handled in a burst must not
    /// look like a burst of speed.
    pub(super) min_rate_ms: u64,
    /// A restore was restarted because this rank went silent; cleared when
    /// it is heard from again.
    pub(super) lost: bool,
    /// Shards it reported in `generation`.
    pub(super) saved: BTreeMap<CheckpointId, ShardDigest>,
    /// Its final digest in `generation`.
    pub(super) digest: Option<String>,
    /// The generation its trainer failed in (an `--exec` trainer can fail
    /// while a generation is being set up: it crashed on start).
    pub(super) failed_in: Option<Generation>,
    /// How its trainer last failed (for the restore's event).
    pub(super) failure: Option<String>,
    pub(super) sent_phase: Option<(Phase, u64)>,
    pub(super) sent_checkpoint: Option<(CheckpointId, u64)>,
}

impl RankSoft {
    pub(super) fn new(now: u64, heartbeat_interval_ms: u64) -> Self {
        Self {
            min_rate_ms: (heartbeat_interval_ms / 2).max(1),
            conn: None,
            incarnation: None,
            host: None,
            generation: None,
            step: Step(0),
            status: WorkerStatus::Waiting,
            last_seen: now,
            progress_at: now,
            rate: 0.0,
            rate_sample: (Step(0), now),
            lost: false,
            saved: BTreeMap::new(),
            digest: None,
            failed_in: None,
            failure: None,
            sent_phase: None,
            sent_checkpoint: None,
        }
    }

    /// Records what a heartbeat (or a registration) says of the rank.
    pub(super) fn report(
        &mut self,
        generation: Option<Generation>,
        step: Step,
        status: WorkerStatus,
        now: u64,
    ) {
        // the pace is measured over training only: while the rank waits
        // (restored, not yet resumed) its sample moves with it, so the wait
        // does not dilute the first measure after it resumes
        let training = status == WorkerStatus::Running;
        if generation != self.generation {
            self.generation = generation;
            self.saved.clear();
            self.digest = None;
            self.progress_at = now;
            self.rate_sample = (step, now);
        } else if !training {
            if step > self.step {
                self.progress_at = now;
            }
            self.rate_sample = (step, now);
        } else if step > self.step {
            self.progress_at = now;
            let (s0, t0) = self.rate_sample;
            if step > s0 && now >= t0 + self.min_rate_ms {
                let rate = (step.0 - s0.0) as f64 / (now - t0) as f64;
                self.rate = if self.rate == 0.0 { rate } else { 0.5 * (self.rate + rate) };
                self.rate_sample = (step, now);
            }
        } else if step < self.step {
            self.rate_sample = (step, now);
        }
        if status != self.status {
            self.progress_at = now;
        }
        self.step = step;
        self.status = status;
    }

    /// Whether the rank has been silent past its allowance: the heartbeat
    /// timeout on a live connection; `grace` after a known worker's
    /// connection closed; and for one this leader never heard from, twice the
    /// heartbeat timeout from the takeover (a worker takes up to a timeout to
    /// notice that its old leader went silent, then finds the new one).
    pub(super) fn silent(&self, t: u64, timeout: u64, grace: u64) -> bool {
        let allowance = match (self.conn, self.incarnation) {
            (Some(_), _) => timeout,
            (None, Some(_)) => grace,
            (None, None) => 2 * timeout,
        };
        t > self.last_seen + allowance
    }

    /// A live process other than `incarnation` holds the rank: connected
    /// and heard from within the heartbeat timeout.
    pub(super) fn held_live_by_other(
        &self,
        incarnation: Incarnation,
        t: u64,
        timeout: u64,
    ) -> Option<Incarnation> {
        let holder = self.incarnation.filter(|h| *h != incarnation)?;
        (self.conn.is_some() && t <= self.last_seen + timeout).then_some(holder)
    }

    /// Where it probably is now, extrapolated from its last report.
    pub(super) fn projected_step(&self, now: u64) -> u64 {
        self.step.0 + (self.rate * now.saturating_sub(self.last_seen) as f64).ceil() as u64
    }
}

/// What a rank is doing as the leader sees it: what its heartbeats say
/// ([`WorkerStatus`]), what the leader sees of its connection
/// (`disconnected`, `stale`), or `missing` (never registered with this
/// leader). The one list status, metrics and the CLI use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankState {
    /// Reports [`WorkerStatus::Waiting`].
    Waiting,
    /// Reports [`WorkerStatus::Running`].
    Running,
    /// Reports [`WorkerStatus::Checkpointing`].
    Checkpointing,
    /// Reports [`WorkerStatus::Restoring`].
    Restoring,
    /// Reports [`WorkerStatus::Finished`].
    Finished,
    /// Reports [`WorkerStatus::Failed`].
    Failed,
    /// Its connection closed.
    Disconnected,
    /// Holds an older generation's state.
    Stale,
    /// Never registered with this leader.
    Missing,
}

impl RankState {
    /// Every state, in the order status and metrics list them.
    pub const ALL: [RankState; 9] = [
        RankState::Waiting,
        RankState::Running,
        RankState::Checkpointing,
        RankState::Restoring,
        RankState::Finished,
        RankState::Failed,
        RankState::Disconnected,
        RankState::Stale,
        RankState::Missing,
    ];

    /// The word in status JSON and the `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            RankState::Waiting => "waiting",
            RankState::Running => "running",
            RankState::Checkpointing => "checkpointing",
            RankState::Restoring => "restoring",
            RankState::Finished => "finished",
            RankState::Failed => "failed",
            RankState::Disconnected => "disconnected",
            RankState::Stale => "stale",
            RankState::Missing => "missing",
        }
    }
}

impl From<WorkerStatus> for RankState {
    fn from(s: WorkerStatus) -> Self {
        match s {
            WorkerStatus::Waiting => RankState::Waiting,
            WorkerStatus::Running => RankState::Running,
            WorkerStatus::Checkpointing => RankState::Checkpointing,
            WorkerStatus::Restoring => RankState::Restoring,
            WorkerStatus::Finished => RankState::Finished,
            WorkerStatus::Failed => RankState::Failed,
            // never a rank's: a spare holds none
            WorkerStatus::Spare | WorkerStatus::SpareStarting => RankState::Waiting,
        }
    }
}

impl std::fmt::Display for RankState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for RankState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One rank as the supervisor sees it (for status).
#[derive(Debug, Clone, PartialEq)]
pub struct RankView {
    /// Rank.
    pub rank: Rank,
    /// What it is doing.
    pub state: RankState,
    /// Its last reported step.
    pub step: Step,
    /// Since this leader last heard from it (any message), in ms.
    pub heartbeat_age_ms: u64,
    /// The worker process holding it (its incarnation), once heard from.
    pub worker: Option<Incarnation>,
    /// The host that worker runs on, as it said.
    pub host: Option<String>,
}
