//! The trainer thread: drives the built-in trainer, stops at checkpoint
//! steps for the snapshot stall, and restores (validate → device memory →
//! read + verify → load) on the coordinator's word.
//!
//! It runs on its own OS thread (training is CPU-bound) and talks to the
//! agent through channels: [`RunnerCmd`] in, its reports to the coordinator
//! ([`WorkerMessage`]s, forwarded as they are) out, and the
//! current step/generation/status in [`RunnerState`] atomics.

use crate::device::{human_bytes, DeviceMemory, Host};
use crate::error::{ProvisionError, RestoreRefusal};
use crate::metrics::WorkerMetrics;
use crate::rank_machine::{Effect, Input, Pending, RankMachine, Shell, TrainerKind};
use crate::snapshot::host_memory_need;
use crate::snapshot::{SnapshotError, Snapshotter, WriteOutcome, WriteRequest};
use crate::trainer::{BuiltinTrainer, Trainer};
use flotilla_shared::ids::{Generation, JobName, Rank, Step};
use flotilla_shared::layout::shard_file_name;
use flotilla_shared::shard::VariableSpec;
use flotilla_shared::shard::{
    read_header, ModelMismatch, Shard, ShardError, ShardErrorKind, ShardHeader, ShardMeta,
};
use flotilla_shared::spec::{JobSpec, TrainerSpec};
use flotilla_shared::wire::{
    RestoreFailureKind, RestorePoint, RestoreSource, ShardFailureKind, WorkerMessage, WorkerStatus,
};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A command from the agent: a directive of the coordinator, or stop.
pub use crate::rank_machine::Directive as RunnerCmd;

/// What the agent reads without asking.
#[derive(Debug, Default)]
pub struct RunnerState {
    step: AtomicU64,
    /// 0 = none yet.
    generation: AtomicU64,
    status: AtomicU8,
    /// The `--exec` trainer process, 0 when none runs.
    trainer_pid: AtomicU32,
}

impl RunnerState {
    /// The `--exec` trainer process running now, if any.
    pub fn trainer_pid(&self) -> Option<u32> {
        Some(self.trainer_pid.load(Ordering::Relaxed)).filter(|p| *p > 0)
    }

    /// Records the trainer process (`None` once it ended).
    pub fn set_trainer_pid(&self, pid: Option<u32>) {
        self.trainer_pid.store(pid.unwrap_or(0), Ordering::Relaxed);
    }

    /// Publishes the step and generation the trainer's state is at.
    pub fn publish(&self, step: Step, generation: Option<Generation>) {
        self.step.store(step.0, Ordering::Relaxed);
        self.generation.store(generation.map_or(0, |g| g.0), Ordering::Relaxed);
    }

    /// Steps completed.
    pub fn step(&self) -> Step {
        Step(self.step.load(Ordering::Relaxed))
    }

    /// The generation the trainer's state belongs to.
    pub fn generation(&self) -> Option<Generation> {
        Some(self.generation.load(Ordering::Relaxed)).filter(|g| *g > 0).map(Generation)
    }

    /// What it is doing.
    pub fn status(&self) -> WorkerStatus {
        match self.status.load(Ordering::Relaxed) {
            1 => WorkerStatus::Running,
            2 => WorkerStatus::Checkpointing,
            3 => WorkerStatus::Restoring,
            4 => WorkerStatus::Finished,
            5 => WorkerStatus::Failed,
            6 => WorkerStatus::Spare,
            7 => WorkerStatus::SpareStarting,
            _ => WorkerStatus::Waiting,
        }
    }

    /// Sets what it is doing (the agent marks a dead trainer thread `Failed`).
    pub fn set_status(&self, s: WorkerStatus) {
        let v = match s {
            WorkerStatus::Waiting => 0,
            WorkerStatus::Running => 1,
            WorkerStatus::Checkpointing => 2,
            WorkerStatus::Restoring => 3,
            WorkerStatus::Finished => 4,
            WorkerStatus::Failed => 5,
            WorkerStatus::Spare => 6,
            WorkerStatus::SpareStarting => 7,
        };
        self.status.store(v, Ordering::Relaxed);
    }
}

/// A job without a `[trainer]` section cannot run the built-in trainer.
#[derive(Debug, thiserror::Error)]
#[error("job {0} has no [trainer] section; the built-in trainer needs one")]
pub struct NoTrainerSection(pub JobName);

/// Sends reports to the agent, which forwards them to the coordinator.
pub type EventSink = Arc<dyn Fn(WorkerMessage) + Send + Sync>;

/// The trainer thread's state.
pub struct Runner {
    job: JobName,
    rank: Rank,
    spec: JobSpec,
    trainer_spec: TrainerSpec,
    vars: Vec<VariableSpec>,
    /// Built on the first Resume (from the seed) or Restore (from a shard).
    trainer: Option<BuiltinTrainer>,
    /// Memory for the first trainer, touched while the process started
    /// (taken by the first restore).
    spare: Option<BuiltinTrainer>,
    /// The snapshot pipeline; `None` until the host had the memory
    /// ([`Runner::provision`]).
    snap: Option<Snapshotter>,
    device: Arc<dyn DeviceMemory>,
    events: EventSink,
    state: Arc<RunnerState>,
    metrics: WorkerMetrics,
    /// The directive protocol.
    machine: RankMachine,
}

impl Runner {
    /// A runner for `rank` of `spec` (`None`: a spare, which takes its rank
    /// with [`RunnerCmd::Assign`]), with a fresh trainer at step 0.
    ///
    /// The trainer's memory and the snapshot buffer are allocated and
    /// touched now when the host has them; when it has not, nothing is
    /// allocated and every restore directive (the first start included) is
    /// refused with the figures, so the job is blocked with the reason
    /// instead of this process aborting. A spare is ready
    /// ([`WorkerStatus::Spare`]) once they are.
    pub fn new(
        spec: JobSpec,
        rank: Option<Rank>,
        device: Arc<dyn DeviceMemory>,
        events: EventSink,
        state: Arc<RunnerState>,
        metrics: WorkerMetrics,
    ) -> crate::Result<Self, NoTrainerSection> {
        let trainer_spec = spec.trainer.clone().ok_or_else(|| NoTrainerSection(spec.name.clone()))?;
        let vars = BuiltinTrainer::model_variables(&trainer_spec);
        let spare = rank.is_none();
        // a spare's memory is any rank's: it is made the rank's on `Assign`
        let rank = rank.unwrap_or(Rank(0));
        if spare {
            state.set_status(WorkerStatus::SpareStarting);
        }
        let mut runner = Self {
            job: spec.name.clone(),
            rank,
            spec,
            trainer_spec,
            vars,
            trainer: None,
            spare: None,
            snap: None,
            device,
            events,
            state,
            metrics,
            machine: RankMachine::new(TrainerKind::Builtin, rank),
        };
        match runner.provision() {
            Err(why) if spare => {
                tracing::error!("{why}; this spare is not ready until the host has the memory")
            }
            Err(why) => tracing::error!("{why}; every restore is refused until the host has the memory"),
            Ok(()) if spare => {
                tracing::info!("spare ready: it takes a rank at once when one fails");
                runner.state.set_status(WorkerStatus::Spare);
            }
            Ok(()) => {}
        }
        Ok(runner)
    }

    /// Allocates and touches the trainer's memory and the snapshot buffer,
    /// once, after checking the host's available memory against what they
    /// take (plus `failure.memory_headroom_bytes`). Nothing is allocated
    /// when the check fails, and a refused allocation is an error too, never
    /// an abort.
    fn provision(&mut self) -> crate::Result<(), ProvisionError> {
        if self.snap.is_some() {
            return Ok(());
        }
        let need = host_memory_need(&self.trainer_spec) + self.spec.failure.memory_headroom_bytes;
        let rank = self.rank;
        let host = Host.read().map_err(|source| ProvisionError::Device { rank, source })?;
        let params = self.trainer_spec.params_per_rank_bytes;
        if host.free < need {
            return Err(ProvisionError::TooLittle {
                rank,
                device: host.device,
                need,
                params,
                free: host.free,
            });
        }
        let started = Instant::now();
        let refused = |what: String| ProvisionError::Refused {
            rank,
            device: host.device.clone(),
            what,
            params,
            free: host.free,
        };
        let snap =
            Snapshotter::new(self.vars.clone(), shard_reporter(self.events.clone(), self.metrics.clone()))
                .map_err(|e| match e {
                    SnapshotError::NoMemory { bytes } => {
                        refused(format!("a snapshot buffer of {}", human_bytes(bytes as u64)))
                    }
                    source => ProvisionError::Snapshot { rank, source },
                })?;
        // the trainer's memory, faulted in on every core now rather than
        // page by page in the first restore's load or the first steps
        let mut spare = BuiltinTrainer::try_zeroed(&self.trainer_spec, self.rank)
            .ok_or_else(|| refused("the trainer's memory".into()))?;
        spare.touch();
        tracing::info!(
            "snapshot buffer and trainer memory ready: 2 x {:.1} MiB touched in {:.1} ms",
            snap.bytes() as f64 / (1 << 20) as f64,
            started.elapsed().as_secs_f64() * 1e3
        );
        self.snap = Some(snap);
        self.spare = Some(spare);
        Ok(())
    }

    fn total_steps(&self) -> u64 {
        self.trainer_spec.total_steps
    }

    fn current_step(&self) -> Step {
        self.trainer.as_ref().map_or(Step(0), |t| t.current_step())
    }

    fn publish(&self) {
        let step = self.current_step();
        self.state.publish(step, self.machine.held());
        self.metrics.step.set(step.0 as i64);
    }

    /// Runs until [`RunnerCmd::Stop`] or the command channel closes.
    pub fn run(mut self, cmds: Receiver<RunnerCmd>) {
        let step_time = Duration::from_millis(self.spec.trainer.as_ref().map_or(0, |t| t.step_time_ms));
        self.publish();
        loop {
            let cmd = if self.machine.is_running() {
                match cmds.recv_timeout(Duration::ZERO) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match cmds.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            if let Some(cmd) = cmd {
                if !self.drive(cmd.into()) {
                    return;
                }
                continue;
            }
            self.train_one(step_time);
        }
    }

    fn train_one(&mut self, step_time: Duration) {
        let step = self.current_step();
        self.drive(Input::AtStep(step));
        if step.0 >= self.total_steps() {
            let digest = self.trainer.as_ref().map(|t| t.digest()).unwrap_or_default();
            self.drive(Input::Finished { digest });
            return;
        }
        let start = Instant::now();
        let trainer = self.trainer.get_or_insert_with(|| BuiltinTrainer::new(&self.trainer_spec, self.rank));
        trainer.step();
        if let Some(rest) = step_time.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
        let step = self.current_step();
        self.drive(Input::Stepped(step));
    }

    fn snapshot(&mut self, p: Pending) -> Input {
        let (Some(trainer), Some(snap)) = (self.trainer.as_ref(), self.snap.as_mut()) else {
            return Input::SnapshotFailed(format!(
                "rank {}: no trainer or snapshot buffer to snapshot",
                self.rank
            ));
        };
        match snap.snapshot(trainer, write_request(&self.job, self.rank, &p)) {
            Ok(stall) => {
                self.metrics.stall.observe(stall.total().as_secs_f64());
                tracing::info!(checkpoint = %p.id, step = %p.step, "snapshot taken: training stalled {:?}", stall.total());
                Input::SnapshotTaken
            }
            Err(e) => Input::SnapshotFailed(e.to_string()),
        }
    }

    fn restore(&mut self, generation: Generation, from: Option<RestorePoint>) -> Input {
        // the first start too: no memory, no start (the job is blocked on it)
        if let Err(message) = self.provision() {
            return Input::RestoreRefused {
                checkpoint: from.map(|p| p.checkpoint),
                kind: RestoreFailureKind::DeviceMemory,
                message: message.to_string(),
            };
        }
        let Some(point) = from else {
            let mut fresh = self
                .trainer
                .take()
                .or_else(|| self.spare.take())
                .unwrap_or_else(|| BuiltinTrainer::zeroed(&self.trainer_spec, self.rank));
            fresh.reset();
            self.trainer = Some(fresh);
            return Input::Restored { step: Step(0), source: None };
        };
        let label = format!("checkpoint {} rank {}", point.checkpoint, self.rank);
        let failed = |kind, message: String| Input::RestoreRefused {
            checkpoint: Some(point.checkpoint),
            kind,
            message,
        };
        let path = point.dir.join(&point.shard.file);
        let checks = Prechecks {
            rank: self.rank,
            headroom: self.spec.failure.memory_headroom_bytes,
            device: self.device.as_ref(),
            metrics: &self.metrics,
        };
        let started = Instant::now();
        let Some(snap) = self.snap.as_mut() else {
            return failed(
                RestoreFailureKind::DeviceMemory,
                format!("{label}: no snapshot buffer to read into"),
            );
        };
        // 1. where the shard is: this rank's own memory (its snapshot
        // buffer still holds the checkpoint it wrote), else the files
        let held = match snap.held_header(point.checkpoint) {
            Ok(h) => h.map(|h| ShardHeader::decode(h, point.shard.bytes, &label)),
            Err(e) => return failed(RestoreFailureKind::Unavailable, format!("{label}: {e}")),
        };
        let header = match held {
            Some(Ok(header)) => Some(header),
            Some(Err(e)) => {
                tracing::warn!("{label}: the copy in memory is unusable ({e}); reading the files");
                None
            }
            None => None,
        };
        // 2. prechecks: names, dtypes, shapes, device memory
        let checked = match &header {
            Some(h) => checks.check(h, &point, &label, Some(&self.vars)),
            None => checks.run(&point, &label, Some(&self.vars)),
        };
        if let Err(RestoreRefusal { kind, message }) = checked {
            return failed(kind, message);
        }
        let prechecked = started.elapsed();
        // 3. verify every checksum (reading the file into the snapshot
        // buffer, memory already touched, unless it is in memory), 4. load;
        // nothing changes before 4
        let (trainer_spec, rank, spare) = (&self.trainer_spec, self.rank, &mut self.spare);
        let trainer = self.trainer.get_or_insert_with(|| {
            spare.take().unwrap_or_else(|| BuiltinTrainer::zeroed(trainer_spec, rank))
        });
        let (mut read, mut load) = (Duration::ZERO, Duration::ZERO);
        let mut load_from = |shard: Result<Shard, ShardError>, read_at: Instant| match shard {
            Ok(shard) => {
                read = read_at.elapsed();
                let at = Instant::now();
                let loaded = trainer.load(&shard);
                load = at.elapsed();
                (shard.into_buffer(), Ok(loaded))
            }
            Err(e) => (Vec::new(), Err(e)),
        };
        let mut source = RestoreSource::Storage;
        let mut loaded = None;
        if header.is_some() {
            let at = Instant::now();
            let from_memory = snap.with_image(point.checkpoint, |image| {
                match Shard::verify_image(image, &label, &point.shard) {
                    Ok(shard) => load_from(Ok(shard), at),
                    Err(refused) => (refused.image, Err(refused.error)),
                }
            });
            match from_memory {
                Ok(Some(Err(e))) => {
                    tracing::error!(
                        "{label}: the copy in memory fails its checksums ({e}); reading the files"
                    );
                }
                Ok(Some(done)) => {
                    source = RestoreSource::Memory;
                    loaded = Some(Ok(done));
                }
                Ok(None) => {}
                Err(e) => loaded = Some(Err(e)),
            }
        }
        let loaded = loaded.unwrap_or_else(|| {
            snap.with_buffer(|buf| {
                let at = Instant::now();
                load_from(Shard::read_verified_into(&path, &label, &point.shard, buf), at)
            })
        });
        match loaded {
            Ok(Ok(Ok(()))) => {
                let bytes = point.shard.bytes;
                for (phase, took) in [("prechecks", prechecked), ("read_verify", read), ("load", load)] {
                    self.metrics.restore_phase.with_label_values(&[phase]).observe(took.as_secs_f64());
                }
                tracing::info!(
                    %generation,
                    checkpoint = %point.checkpoint,
                    %source,
                    "restored {:.1} MiB from {source}: prechecks {:.1} ms, read + verify {:.1} ms ({:.2} GB/s), load {:.1} ms",
                    bytes as f64 / (1 << 20) as f64,
                    prechecked.as_secs_f64() * 1e3,
                    read.as_secs_f64() * 1e3,
                    bytes as f64 / read.as_secs_f64().max(1e-9) / 1e9,
                    load.as_secs_f64() * 1e3,
                );
                Input::Restored { step: trainer.current_step(), source: Some(source) }
            }
            Ok(Ok(Err(m))) => {
                failed(RestoreFailureKind::ModelMismatch, format!("{label} does not match the model: {m}"))
            }
            Ok(Err(e)) => {
                let RestoreRefusal { kind, message } = shard_refusal(&e, &path);
                failed(kind, message)
            }
            Err(e) => failed(RestoreFailureKind::Unavailable, format!("{label}: {e}")),
        }
    }
}

impl Shell for Runner {
    fn machine(&mut self) -> &mut RankMachine {
        &mut self.machine
    }

    fn carry_out(&mut self, effect: Effect) -> ControlFlow<(), Option<Input>> {
        match effect {
            Effect::Report(msg) => (self.events)(msg),
            Effect::Status(s) => self.state.set_status(s),
            Effect::Publish => self.publish(),
            // a write still in flight is of the generation being left
            Effect::CancelWrites => self.snap.iter().for_each(Snapshotter::cancel_writes),
            // its shard is garbage: free the disk and the buffer now
            Effect::CancelWriteOf(id) => self.snap.iter().for_each(|s| s.cancel_write_of(id)),
            Effect::Restore { generation, from } => {
                let start = Instant::now();
                let outcome = self.restore(generation, from);
                if matches!(outcome, Input::Restored { .. }) {
                    self.metrics.restore.observe(start.elapsed().as_secs_f64());
                } else if let Input::RestoreRefused { message, .. } = &outcome {
                    tracing::error!(%generation, "restore refused: {message}");
                }
                return ControlFlow::Continue(Some(outcome));
            }
            Effect::TakeSnapshot(p) => return ControlFlow::Continue(Some(self.snapshot(p))),
            Effect::Exit => return ControlFlow::Break(()),
            Effect::Assigned(rank) => {
                tracing::info!(%rank, "this spare takes rank {rank}");
                self.rank = rank;
                if let Some(t) = self.spare.as_mut() {
                    t.set_rank(rank);
                }
                if let Some(t) = self.trainer.as_mut() {
                    t.set_rank(rank);
                }
            }
            // no process, no rendezvous: the trainer runs on this thread
            Effect::StopTrainer
            | Effect::PickRendezvous
            | Effect::StartTrainer { .. }
            | Effect::GoOn
            | Effect::Resumed => {}
        }
        ControlFlow::Continue(None)
    }
}

/// The shard write of checkpoint `p` by `rank`.
pub(crate) fn write_request(job: &JobName, rank: Rank, p: &Pending) -> WriteRequest {
    let meta = ShardMeta { job: job.clone(), checkpoint: p.id, rank, step: p.step, generation: p.generation };
    WriteRequest { path: p.dir.join(shard_file_name(rank)), meta }
}

/// Turns the shard writer's outcomes into reports (and metrics).
pub fn shard_reporter(events: EventSink, m: WorkerMetrics) -> impl FnMut(WriteOutcome) + Send + 'static {
    move |o| {
        if let Err(ShardError { kind: ShardErrorKind::Cancelled, .. }) = &o.result {
            // its generation is being left: nothing to report to anyone
            tracing::info!(checkpoint = %o.meta.checkpoint, "shard write given up after {:?}: a restore needs the buffer", o.write_time);
            return;
        }
        m.shard_write.observe(o.write_time.as_secs_f64());
        let event = match o.result {
            Ok(manifest) => {
                m.bytes_written.inc_by(manifest.bytes);
                // the header carries each tensor's checksum: the leader
                // needs the file's size and whole-file checksum only
                WorkerMessage::ShardSaved {
                    generation: o.meta.generation,
                    checkpoint: o.meta.checkpoint,
                    manifest: manifest.digest(),
                }
            }
            Err(e) => WorkerMessage::ShardFailed {
                generation: o.meta.generation,
                checkpoint: o.meta.checkpoint,
                kind: ShardFailureKind::Write,
                reason: e.to_string(),
            },
        };
        events(event);
    }
}

/// The restore checks made before a byte of a shard is loaded.
pub(crate) struct Prechecks<'a> {
    pub rank: Rank,
    /// `failure.memory_headroom_bytes`.
    pub headroom: u64,
    pub device: &'a dyn DeviceMemory,
    pub metrics: &'a WorkerMetrics,
}

impl Prechecks<'_> {
    /// First the header's names, dtypes and shapes against `model` (when
    /// the trainer declared one), every mismatch in one error; then the
    /// device's free memory against the shard's bytes plus the headroom.
    pub fn run(
        &self,
        point: &RestorePoint,
        label: &str,
        model: Option<&[VariableSpec]>,
    ) -> crate::Result<(), RestoreRefusal> {
        let path = point.dir.join(&point.shard.file);
        let header = read_header(&path, label).map_err(|e| shard_refusal(&e, &path))?;
        self.check(&header, point, label, model)
    }

    /// [`Prechecks::run`] with the shard's header at hand (a shard held in
    /// memory).
    pub fn check(
        &self,
        header: &ShardHeader,
        point: &RestorePoint,
        label: &str,
        model: Option<&[VariableSpec]>,
    ) -> crate::Result<(), RestoreRefusal> {
        if let Some(model) = model {
            ModelMismatch::check(&header.variables(), model).map_err(|m| {
                RestoreRefusal::new(
                    RestoreFailureKind::ModelMismatch,
                    format!("{label} does not match the model: {m}"),
                )
            })?;
        }
        let need = point.shard.bytes + self.headroom;
        self.metrics.restore_need_bytes.set(i64::try_from(need).unwrap_or(i64::MAX));
        let r = self.device.read().map_err(|e| {
            RestoreRefusal::new(RestoreFailureKind::DeviceMemory, format!("rank {}: {e}", self.rank))
        })?;
        self.metrics.observe_device(&r);
        if r.free < need {
            return Err(RestoreRefusal::new(
                RestoreFailureKind::DeviceMemory,
                format!(
                    "rank {} on {}: restore needs {}, {} free",
                    self.rank,
                    r.device,
                    human_bytes(need),
                    human_bytes(r.free)
                ),
            ));
        }
        Ok(())
    }
}

/// A shard that cannot be restored from: what it means, and the error with its file.
pub(crate) fn shard_refusal(e: &ShardError, path: &Path) -> RestoreRefusal {
    RestoreRefusal::new(kind_of(&e.kind), format!("{e} (file {})", path.display()))
}

/// What a shard error means for the job.
fn kind_of(kind: &ShardErrorKind) -> RestoreFailureKind {
    match kind {
        // a missing or unreadable file (a mount gone, permissions) condemns
        // nothing: the job waits for the storage to come back
        ShardErrorKind::Io { .. } => RestoreFailureKind::Unavailable,
        ShardErrorKind::ModelMismatch(_) => RestoreFailureKind::ModelMismatch,
        _ => RestoreFailureKind::Corrupt,
    }
}
