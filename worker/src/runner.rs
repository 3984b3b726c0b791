//! The trainer thread: drives the built-in trainer, stops at checkpoint
//! steps for the snapshot stall, and restores (validate → device memory →
//! read + verify → load) on the coordinator's word.
//!
//! It runs on its own OS thread (training is CPU-bound) and talks to the
//! agent through channels: [`RunnerCmd`] in, its reports to the coordinator
//! ([`WorkerMessage`]s, forwarded as they are) out, and the
//! current step/generation/status in [`RunnerState`] atomics.

use crate::copies::CopyStore;
use crate::device::{human_bytes, DeviceMemory, Host};
use crate::error::{ProvisionError, RestoreRefusal};
use crate::metrics::WorkerMetrics;
use crate::rank_machine::{Effect, Input, Pending, RankMachine, Shell, TrainerKind};
use crate::snapshot::host_memory_need;
use crate::snapshot::{SnapshotError, Snapshotter, WriteOutcome, WriteRequest};
use crate::trainer::{BuiltinTrainer, Trainer};
use flotilla_shared::ids::{CheckpointId, Generation, JobName, Rank, Step};
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
    /// Other ranks' shards this worker holds (the memory tier).
    copies: Arc<CopyStore>,
}

impl Runner {
    /// Restores look among `copies` (this worker's memory copies of other
    /// ranks' shards) too.
    pub fn with_copies(mut self, copies: Arc<CopyStore>) -> Self {
        self.copies = copies;
        self
    }

    /// Sends copies of this rank's shard of `checkpoint` from the writer
    /// thread (training goes on), to the first `copies` peers of `to` that
    /// accept one, and reports where they are.
    fn send_copies(
        &mut self,
        generation: Generation,
        checkpoint: CheckpointId,
        copies: u32,
        to: Vec<String>,
    ) {
        let Some(snap) = self.snap.as_mut() else { return };
        let (rank, events, metrics) = (self.rank, self.events.clone(), self.metrics.clone());
        let store = self.copies.clone();
        let task: crate::snapshot::ReadTask = Box::new(move |header, data, checksum, cancelled| {
            let mut made = Vec::new();
            for addr in to {
                if made.len() >= copies as usize || cancelled() {
                    break;
                }
                let at = Instant::now();
                let sent = crate::copies::send(&addr, checkpoint, rank, header, data, checksum, cancelled);
                metrics.memory_copy_seconds.observe(at.elapsed().as_secs_f64());
                match sent {
                    Ok(()) => {
                        let mib = (header.len() + data.len()) as f64 / (1 << 20) as f64;
                        let secs = at.elapsed().as_secs_f64();
                        tracing::info!(%checkpoint, "memory copy sent to {addr}: {mib:.1} MiB in {:.0} ms", secs * 1e3);
                        made.push(addr);
                    }
                    Err(why) => {
                        tracing::warn!(%checkpoint, "memory copy not taken: {why}");
                        store.note_refused(format!("a copy of checkpoint {checkpoint} was not taken: {why}"));
                    }
                }
            }
            if made.len() < copies as usize {
                tracing::warn!(%checkpoint, "{} of {copies} memory copies made", made.len());
            }
            events(WorkerMessage::CopiesMade { generation, checkpoint, to: made });
        });
        match snap.read_held(checkpoint, task) {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(%checkpoint, "no memory copies: the snapshot buffer no longer holds this checkpoint")
            }
            Err(e) => tracing::warn!(%checkpoint, "no memory copies: {e}"),
        }
    }
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
            copies: Arc::default(),
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
        let Some(snap) = self.snap.as_mut() else {
            return failed(
                RestoreFailureKind::DeviceMemory,
                format!("{label}: no snapshot buffer to read into"),
            );
        };
        let (trainer_spec, rank, spare) = (&self.trainer_spec, self.rank, &mut self.spare);
        let trainer = self.trainer.get_or_insert_with(|| {
            spare.take().unwrap_or_else(|| BuiltinTrainer::zeroed(trainer_spec, rank))
        });
        let mut times = Times::default();
        // the sources, fastest first: this rank's snapshot buffer (it wrote
        // the checkpoint), a copy of the shard in this worker's memory, each
        // peer's copy, storage; each verified against the ledger's checksum
        // and checked against the model and the device before anything loads
        let mut image =
            ImageLoad { trainer, checks: &checks, point: &point, label: &label, model: &self.vars };
        let mut outcome = None;
        // memory_copies = 0 turns the memory tier off: storage only
        let tier = self.spec.checkpoint.memory_copies > 0;
        let from_buffer = if tier {
            snap.with_image(point.checkpoint, |img| image.load(img, &mut times))
        } else {
            Ok(None)
        };
        match from_buffer {
            Ok(Some(o)) => outcome = Some((RestoreSource::Memory, "its snapshot buffer".to_string(), o)),
            Ok(None) => {}
            Err(e) => return failed(RestoreFailureKind::Unavailable, format!("{label}: {e}")),
        }
        report_fallback(&label, &outcome);
        let tried = !tier || loaded(&outcome) || refused(&outcome);
        if let Some(copy) = self.copies.get(point.checkpoint, rank).filter(|_| !tried) {
            let o = snap.with_buffer(|mut buf| {
                buf.clear();
                buf.extend_from_slice(&copy);
                image.load(buf, &mut times)
            });
            match o {
                Ok(o) => outcome = Some((RestoreSource::Memory, "a copy in this worker's memory".into(), o)),
                Err(e) => return failed(RestoreFailureKind::Unavailable, format!("{label}: {e}")),
            }
        }
        for addr in &point.peers {
            report_fallback(&label, &outcome);
            if loaded(&outcome) || refused(&outcome) {
                break;
            }
            let at = Instant::now();
            let o = snap.with_buffer(|mut buf| {
                match crate::copies::fetch(addr, point.checkpoint, rank, point.shard.bytes, &mut buf) {
                    Ok(()) => image.load(buf, &mut times),
                    Err(why) => (buf, Loaded::Fallback(why)),
                }
            });
            match o {
                Ok(o) => {
                    let secs = at.elapsed().as_secs_f64();
                    let what = format!("the copy at {addr}");
                    if matches!(o, Loaded::Done) {
                        let gbps = point.shard.bytes as f64 / secs.max(1e-9) / 1e9;
                        tracing::info!(
                            "{label}: fetched from {addr} and verified in {:.0} ms ({gbps:.2} GB/s)",
                            secs * 1e3
                        );
                    }
                    outcome = Some((RestoreSource::Peer, what, o));
                }
                Err(e) => return failed(RestoreFailureKind::Unavailable, format!("{label}: {e}")),
            }
        }
        report_fallback(&label, &outcome);
        let (source, from_storage) = match outcome {
            Some((source, _, Loaded::Done)) => (source, None),
            Some((_, _, Loaded::Refused(RestoreRefusal { kind, message }))) => return failed(kind, message),
            _ => (RestoreSource::Storage, Some(())),
        };
        if from_storage.is_some() {
            // prechecks from the file's header, then read into the snapshot
            // buffer (memory already touched) verifying every checksum, load
            let at = Instant::now();
            if let Err(RestoreRefusal { kind, message }) = checks.run(&point, &label, Some(&self.vars)) {
                return failed(kind, message);
            }
            times.prechecks = at.elapsed();
            let trainer = self.trainer.as_mut().expect("made above");
            let loaded = snap.with_buffer(|buf| {
                let at = Instant::now();
                match Shard::read_verified_into(&path, &label, &point.shard, buf) {
                    Ok(shard) => {
                        times.read_verify = at.elapsed();
                        let at = Instant::now();
                        let loaded = trainer.load(&shard);
                        times.load = at.elapsed();
                        (shard.into_buffer(), Ok(loaded))
                    }
                    Err(e) => (Vec::new(), Err(e)),
                }
            });
            match loaded {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(m))) => {
                    return failed(
                        RestoreFailureKind::ModelMismatch,
                        format!("{label} does not match the model: {m}"),
                    )
                }
                Ok(Err(e)) => {
                    let RestoreRefusal { kind, message } = shard_refusal(&e, &path);
                    return failed(kind, message);
                }
                Err(e) => return failed(RestoreFailureKind::Unavailable, format!("{label}: {e}")),
            }
        }
        let bytes = point.shard.bytes;
        for (phase, took) in
            [("prechecks", times.prechecks), ("read_verify", times.read_verify), ("load", times.load)]
        {
            self.metrics.restore_phase.with_label_values(&[phase]).observe(took.as_secs_f64());
        }
        tracing::info!(
            %generation,
            checkpoint = %point.checkpoint,
            %source,
            "restored {:.1} MiB from {source}: prechecks {:.1} ms, read + verify {:.1} ms ({:.2} GB/s), load {:.1} ms",
            bytes as f64 / (1 << 20) as f64,
            times.prechecks.as_secs_f64() * 1e3,
            times.read_verify.as_secs_f64() * 1e3,
            bytes as f64 / times.read_verify.as_secs_f64().max(1e-9) / 1e9,
            times.load.as_secs_f64() * 1e3,
        );
        let step = self.trainer.as_ref().map_or(Step(0), |t| t.current_step());
        Input::Restored { step, source: Some(source) }
    }
}

/// How long each phase of a restore took.
#[derive(Default)]
struct Times {
    prechecks: Duration,
    read_verify: Duration,
    load: Duration,
}

/// What came of one source of a restore.
enum Loaded {
    /// The state is loaded.
    Done,
    /// This source cannot serve the shard (gone, corrupt): the next one is tried.
    Fallback(String),
    /// The shard does not fit the model or the device: no other source helps.
    Refused(RestoreRefusal),
}

fn loaded(o: &Option<(RestoreSource, String, Loaded)>) -> bool {
    matches!(o, Some((_, _, Loaded::Done)))
}

fn refused(o: &Option<(RestoreSource, String, Loaded)>) -> bool {
    matches!(o, Some((_, _, Loaded::Refused(_))))
}

/// Says loudly that a source failed and the next one is tried.
fn report_fallback(label: &str, o: &Option<(RestoreSource, String, Loaded)>) {
    if let Some((_, what, Loaded::Fallback(why))) = o {
        tracing::error!("{label}: {what} is unusable ({why}); trying the next source");
    }
}

/// Loads a whole shard image held in memory: verified as a file is, then
/// checked against the model and the device, then loaded.
struct ImageLoad<'a> {
    trainer: &'a mut BuiltinTrainer,
    checks: &'a Prechecks<'a>,
    point: &'a RestorePoint,
    label: &'a str,
    model: &'a [VariableSpec],
}

impl ImageLoad<'_> {
    fn load(&mut self, image: Vec<u8>, times: &mut Times) -> (Vec<u8>, Loaded) {
        let at = Instant::now();
        let shard = match Shard::verify_image(image, self.label, &self.point.shard) {
            Ok(shard) => shard,
            Err(refused) => return (refused.image, Loaded::Fallback(refused.error.to_string())),
        };
        times.read_verify = at.elapsed();
        let at = Instant::now();
        if let Err(r) = self.checks.check(&shard.header, self.point, self.label, Some(self.model)) {
            return (shard.into_buffer(), Loaded::Refused(r));
        }
        times.prechecks = at.elapsed();
        let at = Instant::now();
        let result = self.trainer.load(&shard);
        times.load = at.elapsed();
        let buf = shard.into_buffer();
        match result {
            Ok(()) => (buf, Loaded::Done),
            Err(m) => (
                buf,
                Loaded::Refused(RestoreRefusal::new(
                    RestoreFailureKind::ModelMismatch,
                    format!("{} does not match the model: {m}", self.label),
                )),
            ),
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
            Effect::SendCopies { generation, checkpoint, copies, to } => {
                self.send_copies(generation, checkpoint, copies, to)
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copies::CopyStore;
    use flotilla_shared::shard::{write_shard, ShardMeta};

    /// A runner for rank 1 of a 2-rank job with a small built-in trainer,
    /// and a shard of checkpoint 1 written for it: the trainer's state after
    /// 5 steps (its digest), the restore point, and the file's bytes.
    fn setup(dir: &Path) -> (Runner, String, RestorePoint, Vec<u8>) {
        let text = format!(
            "name = \"t\"\nworld_size = 2\n[checkpoint]\nevery_steps = 10\nroot = \"{}\"\n[trainer]\ntotal_steps = 100\nparams_per_rank_bytes = 262144\nlayers = 2\nstep_time_ms = 0\n",
            dir.display()
        );
        let spec = JobSpec::from_toml(&text).unwrap();
        let mut trained = BuiltinTrainer::new(spec.trainer.as_ref().unwrap(), Rank(1));
        for _ in 0..5 {
            trained.step();
        }
        let mut data = vec![0; trained.snapshot_bytes()];
        trained.snapshot_into(&mut data);
        let ckpt = dir.join("ckpt-1");
        std::fs::create_dir_all(&ckpt).unwrap();
        let path = ckpt.join(shard_file_name(Rank(1)));
        let meta = ShardMeta {
            job: spec.name.clone(),
            checkpoint: CheckpointId(1),
            rank: Rank(1),
            step: Step(5),
            generation: Generation(1),
        };
        let manifest = write_shard(&path, &meta, trained.variables(), &data).unwrap();
        let point = RestorePoint {
            checkpoint: CheckpointId(1),
            step: Step(5),
            dir: ckpt,
            shard: manifest.digest(),
            peers: Vec::new(),
        };
        let events: EventSink = Arc::new(|_| {});
        let runner =
            Runner::new(spec, Some(Rank(1)), Arc::new(Host), events, Arc::default(), WorkerMetrics::new())
                .unwrap();
        let file = std::fs::read(&path).unwrap();
        (runner, trained.digest(), point, file)
    }

    /// A real copy server (the worker's routes) holding `image` as rank 1's
    /// copy of checkpoint 1, unverified: what a faulty peer would serve.
    fn peer_serving(image: Vec<u8>) -> String {
        let store = Arc::new(CopyStore::default());
        store.set_capacity(1);
        store.insert(CheckpointId(1), Rank(1), image).unwrap();
        crate::copies::bench::serve(store).unwrap()
    }

    fn restored(input: Input) -> Option<RestoreSource> {
        match input {
            Input::Restored { source, .. } => source,
            other => panic!("not restored: {other:?}"),
        }
    }

    #[test]
    fn a_peers_copy_restores_with_the_files_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut runner, digest, mut point, file) = setup(dir.path());
        point.peers = vec![peer_serving(file)];
        std::fs::remove_file(point.dir.join(&point.shard.file)).unwrap();
        assert_eq!(restored(runner.restore(Generation(2), Some(point))), Some(RestoreSource::Peer));
        assert_eq!(runner.trainer.as_ref().unwrap().digest(), digest);
    }

    #[test]
    fn a_corrupt_copy_from_a_peer_is_refused_and_the_next_source_restores() {
        let dir = tempfile::tempdir().unwrap();
        let (mut runner, digest, mut point, file) = setup(dir.path());
        let mut corrupt = file.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0x40;
        // a corrupt copy, then one that is gone, then the files
        point.peers = vec![peer_serving(corrupt), "127.0.0.1:1".into()];
        assert_eq!(
            restored(runner.restore(Generation(2), Some(point.clone()))),
            Some(RestoreSource::Storage)
        );
        assert_eq!(runner.trainer.as_ref().unwrap().digest(), digest);
        // a corrupt copy and no files: refused, naming the file
        std::fs::remove_file(point.dir.join(&point.shard.file)).unwrap();
        point.peers.truncate(1);
        match runner.restore(Generation(3), Some(point)) {
            Input::RestoreRefused { kind, message, .. } => {
                assert_eq!(kind, RestoreFailureKind::Unavailable, "{message}");
                assert!(message.contains("rank-00001"), "{message}");
            }
            other => panic!("restored from a corrupt copy: {other:?}"),
        }
    }
}
