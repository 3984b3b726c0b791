//! The directive protocol of one rank, pure: what the coordinator's
//! directives and the trainer's events do to the rank, and what has to be
//! done about them.
//!
//! ```text
//!   Input (a directive, a trainer event) ─► RankMachine ─► [Effect] (report, status,
//!                                                           snapshot, start/stop, ...)
//! ```
//! Both trainers are shells around it: the built-in one ([`crate::runner`])
//! and the external process ([`crate::exec`]). The machine reads no clock and
//! does no I/O; the shells carry out the effects, in order, and feed back
//! what came of them (a restore done or refused, a snapshot taken).
//!
//! The two trainers differ where the protocol lets them ([`TrainerKind`]):
//! the built-in trainer snapshots the state it holds between steps (a
//! checkpoint at the step it is at is still on time, a finished rank takes
//! the final one), restores in-process and fails a resume at another step;
//! the process asks "checkpoint now?" once per step it reports (the step it
//! is at was already answered), is started per generation after rank 0's
//! rendezvous is known, and a refused restore ends its generation.

use flotilla_shared::ids::{CheckpointId, Generation, Rank, Step};
use flotilla_shared::wire::{
    RestoreFailureKind, RestorePoint, RestoreSource, ShardFailureKind, WorkerMessage, WorkerStatus,
};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::PathBuf;

/// Which trainer the machine drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainerKind {
    /// The built-in trainer, on the runner's thread.
    Builtin,
    /// An external training process (`--exec`).
    Process,
}

/// A checkpoint this rank was told to take.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Its generation.
    pub generation: Generation,
    /// Checkpoint id.
    pub id: CheckpointId,
    /// The step to snapshot at.
    pub step: Step,
    /// The checkpoint's directory.
    pub dir: PathBuf,
}

/// What the rank is doing with its generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// No generation yet.
    Idle,
    /// Restoring into `generation`; `left` is where a refused restore goes
    /// back to (the built-in trainer keeps its state; a process's
    /// generation ends refused).
    Restoring {
        /// The generation restored into.
        generation: Generation,
        /// The phase a refusal returns to.
        left: Box<Phase>,
    },
    /// Restored, waiting for the job to resume.
    Restored {
        /// Its generation.
        generation: Generation,
    },
    /// Training.
    Running {
        /// Its generation.
        generation: Generation,
    },
    /// The trainer finished its steps.
    Finished {
        /// Its generation.
        generation: Generation,
    },
    /// Its restore was refused (a process): the exit that follows is no
    /// new failure.
    Refused {
        /// Its generation.
        generation: Generation,
    },
    /// Told to stop: nothing more is done.
    Stopped,
}

impl Phase {
    /// The generation the trainer's state belongs to (restored into it).
    pub fn held(&self) -> Option<Generation> {
        match self {
            Phase::Restored { generation }
            | Phase::Running { generation }
            | Phase::Finished { generation } => Some(*generation),
            Phase::Restoring { left, .. } => left.held(),
            Phase::Idle | Phase::Refused { .. } | Phase::Stopped => None,
        }
    }
}

/// Where a checkpoint's snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The trainer was told to snapshot now.
    Due,
    /// The process is copying its tensors (between save_begin and save_done).
    Saving,
}

/// A directive from the coordinator (as the agent forwards it), or stop.
#[derive(Debug, Clone, PartialEq)]
pub enum Directive {
    /// Train from `step` in `generation`.
    Resume {
        /// Generation.
        generation: Generation,
        /// The step the coordinator expects this rank at.
        step: Step,
    },
    /// Snapshot at `step` into `dir`.
    Checkpoint {
        /// Generation.
        generation: Generation,
        /// Checkpoint id.
        id: CheckpointId,
        /// Step.
        step: Step,
        /// Checkpoint directory.
        dir: PathBuf,
    },
    /// Forget a checkpoint not yet snapshotted.
    Abort {
        /// Checkpoint id.
        id: CheckpointId,
    },
    /// Stop training and restore into `generation`.
    Restore {
        /// Generation.
        generation: Generation,
        /// Where from (`None`: a fresh start at step 0).
        from: Option<RestorePoint>,
        /// The generation's rendezvous, once known (`--exec` trainers).
        rendezvous: Option<String>,
    },
    /// A spare is given `rank` (before its first restore).
    Assign {
        /// The rank.
        rank: Rank,
    },
    /// Send copies of this rank's shard of committed checkpoint
    /// `checkpoint` to the first `copies` of `to` that accept one.
    CopyShard {
        /// The generation.
        generation: Generation,
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// Copies wanted.
        copies: u32,
        /// Peers' HTTP addresses, best first.
        to: Vec<String>,
    },
    /// Exit.
    Stop,
}

impl From<Directive> for Input {
    fn from(d: Directive) -> Self {
        Input::Directive(d)
    }
}

/// One thing that happened: a directive from the coordinator or an event
/// of the trainer.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A directive from the coordinator (or stop).
    Directive(Directive),
    /// The rendezvous rank 0 picked (after [`Effect::PickRendezvous`]).
    RendezvousPicked(String),
    /// The restore into the generation is done: the trainer is at `step`.
    Restored {
        /// Step.
        step: Step,
        /// Where the shard came from (`None`: a start from step 0).
        source: Option<RestoreSource>,
    },
    /// The restore was refused.
    RestoreRefused {
        /// The checkpoint restored from.
        checkpoint: Option<CheckpointId>,
        /// Why, for the job.
        kind: RestoreFailureKind,
        /// Why, in words.
        message: String,
    },
    /// The built-in trainer completed a step: it is at `step`.
    Stepped(Step),
    /// The trainer is at `step` and asks whether to snapshot now.
    AtStep(Step),
    /// The process began copying the due snapshot.
    SaveBegun,
    /// The snapshot was taken (its shard is written in the background).
    SnapshotTaken,
    /// The snapshot could not be taken.
    SnapshotFailed(String),
    /// The trainer finished its steps.
    Finished {
        /// Its state's digest.
        digest: String,
    },
    /// The trainer failed (it could not start, did not connect, ...).
    TrainerFailed(String),
    /// The process exited; `reason` says how, should that be a failure.
    Exited {
        /// Exit status 0.
        success: bool,
        /// How it ended, in words.
        reason: String,
    },
}

/// What the shell has to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Report to the coordinator.
    Report(WorkerMessage),
    /// Set the status the agent reads.
    Status(WorkerStatus),
    /// Publish the step and the held generation.
    Publish,
    /// Give up the shard writes in flight (their generation is being left).
    CancelWrites,
    /// Give up the shard write of this checkpoint.
    CancelWriteOf(CheckpointId),
    /// Stop the generation's trainer process (its group).
    StopTrainer,
    /// Rank 0: pick a rendezvous address and feed it back
    /// ([`Input::RendezvousPicked`]).
    PickRendezvous,
    /// Start the trainer process of `generation`.
    StartTrainer {
        /// Generation.
        generation: Generation,
        /// `host:port` of rank 0's rendezvous.
        rendezvous: String,
        /// The step it starts from.
        start_step: Step,
    },
    /// Restore the built-in trainer; answer [`Input::Restored`] or
    /// [`Input::RestoreRefused`].
    Restore {
        /// Generation.
        generation: Generation,
        /// Where from.
        from: Option<RestorePoint>,
    },
    /// Snapshot now (the process: answer the step "checkpoint").
    TakeSnapshot(Pending),
    /// The trainer goes on without a snapshot (the process: answer the step).
    GoOn,
    /// The job resumed: answer what the trainer waits on.
    Resumed,
    /// A spare took `rank`: the shell's trainer is that rank's from now on.
    Assigned(Rank),
    /// Send copies of the shard of `checkpoint` (if the snapshot buffer
    /// still holds it) to the first `copies` of `to` that accept one, and
    /// report where they are.
    SendCopies {
        /// The generation.
        generation: Generation,
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// Copies wanted.
        copies: u32,
        /// Peers, best first.
        to: Vec<String>,
    },
    /// End the rank's thread.
    Exit,
}

/// The checkpoints a rank snapshotted in its generation, the last few: a
/// repeated directive for one of them is a no-op, not "already past".
#[derive(Debug, Default, Clone, PartialEq)]
struct Taken(Vec<CheckpointId>);

impl Taken {
    /// Only the last few can still be asked for again.
    const KEPT: usize = 16;

    fn remember(&mut self, id: CheckpointId) {
        if self.0.len() >= Self::KEPT {
            self.0.remove(0);
        }
        self.0.push(id);
    }

    fn contains(&self, id: CheckpointId) -> bool {
        self.0.contains(&id)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The generation being set up: where from, and (a process) its rendezvous.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    generation: Generation,
    from: Option<RestorePoint>,
    rendezvous: Option<String>,
    /// Rank 0's own offer.
    offered: Option<String>,
    /// Its process was started.
    started: bool,
}

/// One rank's directive protocol.
#[derive(Debug, Clone)]
pub struct RankMachine {
    kind: TrainerKind,
    rank: Rank,
    phase: Phase,
    target: Option<Target>,
    /// The step the trainer's state is at (a process: the step it last reported).
    step: Step,
    /// Told, not yet due.
    pending: Option<Pending>,
    /// Being snapshotted.
    snapshot: Option<(Pending, Stage)>,
    /// Checkpoints of the generation already snapshotted.
    taken: Taken,
    /// Where the last restore's shard came from (repeated in its report).
    restored_from: Option<RestoreSource>,
}

impl RankMachine {
    /// A rank with no generation yet, its trainer at step 0.
    pub fn new(kind: TrainerKind, rank: Rank) -> Self {
        Self {
            kind,
            rank,
            phase: Phase::Idle,
            target: None,
            step: Step(0),
            pending: None,
            snapshot: None,
            taken: Taken::default(),
            restored_from: None,
        }
    }

    /// What the rank is doing.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Training now.
    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }

    /// The generation the trainer's state belongs to.
    pub fn held(&self) -> Option<Generation> {
        self.phase.held()
    }

    /// The generation being set up or run (a process: also while it restores
    /// and after its restore was refused).
    pub fn generation(&self) -> Option<Generation> {
        self.target.as_ref().map(|t| t.generation)
    }

    /// Where the generation restores from.
    pub fn from(&self) -> Option<&RestorePoint> {
        self.target.as_ref().and_then(|t| t.from.as_ref())
    }

    /// The step the trainer is at.
    pub fn step(&self) -> Step {
        self.step
    }

    /// The checkpoint whose snapshot is at `stage`.
    pub fn snapshot(&self, stage: Stage) -> Option<&Pending> {
        self.snapshot.as_ref().filter(|(_, s)| *s == stage).map(|(p, _)| p)
    }

    /// Handles one input; returns what to do, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Effect> {
        if self.phase == Phase::Stopped {
            return Vec::new();
        }
        match input {
            Input::Directive(Directive::Restore { generation, from, rendezvous }) => {
                self.restore(generation, from, rendezvous)
            }
            Input::Directive(Directive::Resume { generation, step }) => self.resume(generation, step),
            Input::Directive(Directive::Checkpoint { generation, id, step, dir }) => {
                self.checkpoint(Pending { generation, id, step, dir })
            }
            Input::Directive(Directive::Abort { id }) => {
                // a save already announced to the process goes ahead; its
                // shard write, once under way, is given up: it is garbage
                self.pending.take_if(|p| p.id == id);
                vec![Effect::CancelWriteOf(id)]
            }
            Input::Directive(Directive::Assign { rank }) => self.assign(rank),
            // the built-in trainer's shard is in its snapshot buffer; an
            // --exec trainer's copies are not built yet
            Input::Directive(Directive::CopyShard { generation, checkpoint, copies, to }) => {
                match self.kind {
                    TrainerKind::Builtin if self.generation() == Some(generation) => {
                        vec![Effect::SendCopies { generation, checkpoint, copies, to }]
                    }
                    _ => Vec::new(),
                }
            }
            Input::Directive(Directive::Stop) => {
                self.phase = Phase::Stopped;
                vec![Effect::Exit]
            }
            Input::RendezvousPicked(addr) => self.rendezvous_picked(addr),
            Input::Restored { step, source } => self.restored(step, source),
            Input::RestoreRefused { checkpoint, kind, message } => self.refused(checkpoint, kind, message),
            Input::Stepped(step) => {
                self.step = step;
                vec![Effect::Publish]
            }
            Input::AtStep(step) => self.at_step(step),
            Input::SaveBegun => {
                if let Some((_, stage)) = self.snapshot.as_mut().filter(|(_, s)| *s == Stage::Due) {
                    *stage = Stage::Saving;
                }
                Vec::new()
            }
            Input::SnapshotTaken => self.snapshot_ended(None),
            Input::SnapshotFailed(reason) => self.snapshot_ended(Some(reason)),
            Input::Finished { digest } => self.finished(digest),
            Input::TrainerFailed(reason) => self.failed(reason),
            Input::Exited { success, reason } => {
                // a snapshot under way ends with the process
                self.snapshot = None;
                match self.phase {
                    _ if self.target.is_none() => Vec::new(),
                    Phase::Finished { .. } if success => {
                        tracing::info!("trainer exited after finishing");
                        Vec::new()
                    }
                    Phase::Refused { .. } => {
                        tracing::info!("trainer exited after its restore was refused");
                        Vec::new()
                    }
                    _ => self.failed(reason),
                }
            }
        }
    }

    /// A spare holds no generation: it takes the rank (again: the same
    /// rank is a no-op). One holding a generation keeps its rank: the agent
    /// starts a fresh spare rather than hand a rank's state to another.
    fn assign(&mut self, rank: Rank) -> Vec<Effect> {
        if self.target.is_some() || self.phase != Phase::Idle {
            if rank != self.rank {
                tracing::warn!(held = %self.rank, asked = %rank, "assign to a rank holding state ignored");
            }
            return Vec::new();
        }
        self.rank = rank;
        vec![Effect::Assigned(rank), Effect::Status(WorkerStatus::Waiting)]
    }

    fn restore(
        &mut self,
        generation: Generation,
        from: Option<RestorePoint>,
        rendezvous: Option<String>,
    ) -> Vec<Effect> {
        let repeat = match self.kind {
            TrainerKind::Builtin => self.held() == Some(generation),
            TrainerKind::Process => self.generation() == Some(generation),
        };
        if repeat {
            return self.restore_repeated(generation, rendezvous);
        }
        tracing::info!(%generation, from = ?from.as_ref().map(|p| p.checkpoint), "restoring into a new generation");
        let left = match (self.kind, &self.phase) {
            (TrainerKind::Process, _) => Phase::Idle,
            // the built-in trainer keeps its state when the restore is refused
            (TrainerKind::Builtin, Phase::Running { generation }) => {
                Phase::Restored { generation: *generation }
            }
            (TrainerKind::Builtin, Phase::Restoring { left, .. }) => (**left).clone(),
            (TrainerKind::Builtin, other) => other.clone(),
        };
        self.phase = Phase::Restoring { generation, left: Box::new(left) };
        self.pending = None;
        self.snapshot = None;
        let mut target = Target { generation, from, rendezvous, offered: None, started: false };
        let mut effects = Vec::new();
        match self.kind {
            TrainerKind::Builtin => {
                // a write still in flight is of the generation being left
                effects.extend([Effect::CancelWrites, Effect::Status(WorkerStatus::Restoring)]);
                effects.push(Effect::Restore { generation, from: target.from.clone() });
            }
            TrainerKind::Process => {
                self.step = target.from.as_ref().map_or(Step(0), |p| p.step);
                effects.extend([
                    Effect::StopTrainer,
                    Effect::CancelWrites,
                    Effect::Status(WorkerStatus::Restoring),
                    Effect::Publish,
                ]);
                if self.rank == Rank(0) && target.rendezvous.is_none() {
                    effects.push(Effect::PickRendezvous);
                } else if let Some(start) = Self::start(&mut target) {
                    effects.push(start);
                } else {
                    tracing::info!(%generation, "waiting for rank 0's rendezvous before starting the trainer");
                }
            }
        }
        self.target = Some(target);
        effects
    }

    /// A repeated restore directive: finish what is left of the set-up.
    fn restore_repeated(&mut self, generation: Generation, rendezvous: Option<String>) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let (TrainerKind::Process, Some(t)) = (self.kind, self.target.as_mut()) {
            if let Some(addr) = t.offered.clone().filter(|_| rendezvous.is_none()) {
                effects.push(Effect::Report(WorkerMessage::Rendezvous { generation, addr }));
            }
            if t.rendezvous.is_none() {
                t.rendezvous = rendezvous;
            }
            effects.extend(Self::start(t));
        }
        if matches!(self.phase, Phase::Restored { .. }) {
            let source = self.restored_from;
            effects.push(Effect::Report(WorkerMessage::Restored { generation, step: self.step, source }));
        }
        effects
    }

    /// Starts the target's process, once its rendezvous is known.
    fn start(t: &mut Target) -> Option<Effect> {
        let rendezvous = t.rendezvous.clone().filter(|_| !t.started)?;
        t.started = true;
        let start_step = t.from.as_ref().map_or(Step(0), |p| p.step);
        Some(Effect::StartTrainer { generation: t.generation, rendezvous, start_step })
    }

    fn rendezvous_picked(&mut self, addr: String) -> Vec<Effect> {
        let Some(t) = self.target.as_mut().filter(|t| t.rendezvous.is_none()) else { return Vec::new() };
        t.offered = Some(addr.clone());
        t.rendezvous = Some(addr.clone());
        let mut effects = vec![Effect::Report(WorkerMessage::Rendezvous { generation: t.generation, addr })];
        effects.extend(Self::start(t));
        effects
    }

    fn restored(&mut self, step: Step, source: Option<RestoreSource>) -> Vec<Effect> {
        let Phase::Restoring { generation, .. } = self.phase else { return Vec::new() };
        self.phase = Phase::Restored { generation };
        self.step = step;
        self.restored_from = source;
        self.taken.clear();
        vec![
            Effect::Status(WorkerStatus::Waiting),
            Effect::Publish,
            Effect::Report(WorkerMessage::Restored { generation, step, source }),
        ]
    }

    fn refused(
        &mut self,
        checkpoint: Option<CheckpointId>,
        kind: RestoreFailureKind,
        message: String,
    ) -> Vec<Effect> {
        let Phase::Restoring { generation, left } = &self.phase else { return Vec::new() };
        let generation = *generation;
        self.phase = match self.kind {
            TrainerKind::Builtin => (**left).clone(),
            TrainerKind::Process => Phase::Refused { generation },
        };
        vec![
            Effect::Status(WorkerStatus::Waiting),
            Effect::Publish,
            Effect::Report(WorkerMessage::RestoreFailed { generation, checkpoint, kind, message }),
        ]
    }

    fn resume(&mut self, generation: Generation, step: Step) -> Vec<Effect> {
        // directives are re-sent until observed: a repeat is a no-op, and so
        // is a resume of a generation this rank does not hold
        if self.phase != (Phase::Restored { generation }) {
            return Vec::new();
        }
        if self.step != step {
            match self.kind {
                TrainerKind::Builtin => {
                    let reason =
                        format!("told to resume at step {step} but the trainer is at step {}", self.step);
                    return vec![
                        Effect::Status(WorkerStatus::Failed),
                        Effect::Report(WorkerMessage::TrainerFailed { generation, reason }),
                    ];
                }
                TrainerKind::Process => {
                    tracing::warn!(%generation, %step, at = %self.step, "resumed at another step than this rank restored");
                }
            }
        }
        self.phase = Phase::Running { generation };
        vec![Effect::Status(WorkerStatus::Running), Effect::Publish, Effect::Resumed]
    }

    fn checkpoint(&mut self, p: Pending) -> Vec<Effect> {
        // a checkpoint of another generation is stale (or early): fenced
        if self.held() != Some(p.generation) || matches!(self.phase, Phase::Restoring { .. }) {
            return Vec::new();
        }
        let repeat = self.pending.as_ref().is_some_and(|x| x.id == p.id)
            || self.snapshot.as_ref().is_some_and(|(x, _)| x.id == p.id)
            || self.taken.contains(p.id);
        let finished = matches!(self.phase, Phase::Finished { .. });
        // the built-in trainer holds the state of the step it is at; a
        // process already answered for it
        let (late, ignored) = match self.kind {
            TrainerKind::Builtin => (p.step < self.step, false),
            TrainerKind::Process => (p.step <= self.step, finished),
        };
        if repeat || ignored {
            return Vec::new();
        }
        if late {
            return vec![Effect::Report(WorkerMessage::ShardFailed {
                generation: p.generation,
                checkpoint: p.id,
                kind: ShardFailureKind::PastStep,
                reason: format!("already past step {} (at step {}) when told", p.step, self.step),
            })];
        }
        if self.kind == TrainerKind::Builtin && !self.is_running() && p.step == self.step {
            // idle at exactly that step (e.g. finished): snapshot now
            return self.due(p);
        }
        self.pending = Some(p);
        Vec::new()
    }

    fn due(&mut self, p: Pending) -> Vec<Effect> {
        self.snapshot = Some((p.clone(), Stage::Due));
        vec![Effect::Status(WorkerStatus::Checkpointing), Effect::TakeSnapshot(p)]
    }

    fn at_step(&mut self, step: Step) -> Vec<Effect> {
        self.step = step;
        let mut effects = vec![Effect::Publish];
        match self.pending.take() {
            Some(p) if p.step == step => effects.extend(self.due(p)),
            Some(p) if p.step < step => {
                effects.push(Effect::Report(WorkerMessage::ShardFailed {
                    generation: p.generation,
                    checkpoint: p.id,
                    kind: ShardFailureKind::PastStep,
                    reason: format!("the trainer reported step {step} without stopping at step {}", p.step),
                }));
                effects.push(Effect::GoOn);
            }
            later => {
                self.pending = later;
                effects.push(Effect::GoOn);
            }
        }
        effects
    }

    fn snapshot_ended(&mut self, failure: Option<String>) -> Vec<Effect> {
        let Some((p, _)) = self.snapshot.take() else { return Vec::new() };
        self.taken.remember(p.id);
        let mut effects = Vec::new();
        if let Some(reason) = failure {
            effects.push(Effect::Report(WorkerMessage::ShardFailed {
                generation: p.generation,
                checkpoint: p.id,
                kind: ShardFailureKind::Write,
                reason,
            }));
        }
        // a finished rank takes the final checkpoint and stays finished
        let finished = matches!(self.phase, Phase::Finished { .. });
        effects.push(Effect::Status(if finished { WorkerStatus::Finished } else { WorkerStatus::Running }));
        effects
    }

    fn finished(&mut self, digest: String) -> Vec<Effect> {
        let (Phase::Running { generation } | Phase::Restored { generation }) = self.phase else {
            return Vec::new();
        };
        self.phase = Phase::Finished { generation };
        tracing::info!(%generation, step = %self.step, "trainer finished");
        vec![
            Effect::Status(WorkerStatus::Finished),
            Effect::Report(WorkerMessage::Finished { generation, step: self.step, digest }),
        ]
    }

    fn failed(&mut self, reason: String) -> Vec<Effect> {
        tracing::error!("{reason}");
        self.snapshot = None;
        let generation = self.generation().unwrap_or(Generation(0));
        vec![
            Effect::Status(WorkerStatus::Failed),
            Effect::Report(WorkerMessage::TrainerFailed { generation, reason }),
        ]
    }
}

/// A driver: carries out a machine's effects, and feeds back what came of them.
pub trait Shell {
    /// The rank's machine.
    fn machine(&mut self) -> &mut RankMachine;

    /// Carries out one effect; `Break` ends the rank, `Continue(Some(input))`
    /// is what came of it, for the machine.
    fn carry_out(&mut self, effect: Effect) -> ControlFlow<(), Option<Input>>;

    /// Feeds `input` to the machine and carries out what it says, in order,
    /// and what comes of that; false means the rank ends.
    fn drive(&mut self, input: Input) -> bool {
        let mut work: VecDeque<Effect> = self.machine().handle(input).into();
        while let Some(effect) = work.pop_front() {
            match self.carry_out(effect) {
                ControlFlow::Break(()) => return false,
                ControlFlow::Continue(Some(input)) => work.extend(self.machine().handle(input)),
                ControlFlow::Continue(None) => {}
            }
        }
        true
    }
}

#[cfg(test)]
#[path = "rank_machine_tests.rs"]
mod tests;
