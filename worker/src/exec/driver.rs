//! The shell around the rank's [`RankMachine`] for a trainer process: one
//! thread fed by one channel (the agent's directives, the process's
//! requests, its exit) that carries out the machine's effects and answers
//! the process.

use super::process::{exit_reason, Launch, Proc};
use super::protocol::{
    parse_decls, read_requests, refusal_kind, shard_layout, write_reply, HelloReply, Okay, Refusal, Request,
    RestoreReply, RestoredState, SaveBeginReply, StepReply, TensorDecl, TRAINER_PROTOCOL_VERSION,
};
use super::ExecOptions;
use crate::device::DeviceMemory;
use crate::error::{ProtocolError, RestoreRefusal, StartError};
use crate::metrics::WorkerMetrics;
use crate::rank_machine::{Effect, Input, Phase, RankMachine, Shell, Stage, TrainerKind};
use crate::runner::{
    shard_refusal, shard_reporter, write_request, EventSink, Prechecks, RunnerCmd, RunnerState,
};
use crate::shm::{shm_dir, unique_name, ShmFile};
use crate::snapshot::Snapshotter;
use flotilla_shared::ids::{Generation, JobName, Rank, Step};
use flotilla_shared::shard::{Shard, VariableSpec};
use flotilla_shared::spec::JobSpec;
use flotilla_shared::wire::{RestoreFailureKind, RestorePoint, RestoreSource, WorkerStatus};
use serde::Serialize;
use std::ops::ControlFlow;
use std::os::unix::net::UnixStream;
use std::process::ExitStatus;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the driver's thread is fed.
enum Event {
    Cmd(RunnerCmd),
    Connected {
        start: u64,
        stream: UnixStream,
    },
    Request {
        start: u64,
        req: crate::Result<Request, ProtocolError>,
    },
    Closed {
        start: u64,
    },
    Exited {
        start: u64,
        status: ExitStatus,
    },
    /// A snapshot buffer made ready ahead of the first save, for the
    /// variables the process declared in `restore(like=...)`.
    Prepared {
        start: u64,
        vars: Vec<VariableSpec>,
        shm: ShmFile,
    },
}

/// A reply held until the job resumes.
enum Deferred {
    Restore(Option<RestoredState>),
    Step(u64),
}

/// Drives one external training process per generation.
pub struct ExecRunner {
    job: JobName,
    rank: Rank,
    spec: JobSpec,
    opts: ExecOptions,
    host: String,
    device: Arc<dyn DeviceMemory>,
    events: EventSink,
    state: Arc<RunnerState>,
    metrics: WorkerMetrics,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    starts: u64,
    proc: Option<Proc>,
    /// The directive protocol.
    machine: RankMachine,
    /// The buffer the process copies into, between save_begin and save_done.
    saving: Option<ShmFile>,
    snap: Option<(Vec<VariableSpec>, Snapshotter<ShmFile>)>,
    deferred: Option<Deferred>,
    /// A spare (`--spare`): its process starts before it holds a rank and
    /// waits inside `flotilla.init()` until one is given.
    spare: bool,
    /// The current process is a spare's, started before any generation.
    prestarted: bool,
    /// The hello of a prestarted process, answered once it has a rank.
    held_hello: Option<u32>,
    /// The rendezvous of the current process's generation.
    rendezvous: String,
}

impl ExecRunner {
    /// A runner for `rank` of `spec`; `host` is where this worker is
    /// reached (rank 0's rendezvous host unless `opts.master_addr` says).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: JobSpec,
        rank: Rank,
        opts: ExecOptions,
        host: String,
        device: Arc<dyn DeviceMemory>,
        events: EventSink,
        state: Arc<RunnerState>,
        metrics: WorkerMetrics,
    ) -> Self {
        let (tx, rx) = channel();
        let host = opts.master_addr.clone().unwrap_or(host);
        // segments of workers that were killed before they could remove them
        let swept = crate::shm::sweep_dead(&shm_dir());
        if swept > 0 {
            tracing::info!(
                "removed {swept} shared-memory segments left by dead workers in {}",
                shm_dir().display()
            );
        }
        Self {
            job: spec.name.clone(),
            rank,
            spec,
            opts,
            host,
            device,
            events,
            state,
            metrics,
            tx,
            rx,
            starts: 0,
            proc: None,
            machine: RankMachine::new(TrainerKind::Process, rank),
            saving: None,
            snap: None,
            deferred: None,
            spare: false,
            prestarted: false,
            held_hello: None,
            rendezvous: String::new(),
        }
    }

    /// Makes this runner a spare's: its process starts at once, without a
    /// rank, and waits inside `flotilla.init()` for one (SPEC §11).
    pub fn spare(mut self, spare: bool) -> Self {
        self.spare = spare;
        self
    }

    /// Runs until [`RunnerCmd::Stop`] or the command channel closes; the
    /// process is stopped on the way out.
    pub fn run(mut self, cmds: Receiver<RunnerCmd>) {
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("flotilla-exec-cmds".into())
            .spawn(move || {
                for cmd in cmds {
                    if tx.send(Event::Cmd(cmd)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Event::Cmd(RunnerCmd::Stop));
            })
            .expect("spawn a thread");
        self.start_spare_process();
        loop {
            let event = match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => {
                    self.check_connected();
                    self.start_spare_process();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match event {
                Event::Cmd(cmd) => {
                    if !self.drive(cmd.into()) {
                        break;
                    }
                }
                Event::Connected { start, stream } => self.connected(start, stream),
                Event::Request { start, req } if self.is_current(start) => self.request(req),
                Event::Closed { start } if self.is_current(start) => {
                    if let Some(p) = self.proc.as_mut() {
                        p.conn = None;
                    }
                }
                Event::Exited { start, status } if self.is_current(start) => self.exited(status),
                Event::Prepared { start, vars, shm } if self.is_current(start) && self.snap.is_none() => {
                    let reporter = shard_reporter(self.events.clone(), self.metrics.clone());
                    match Snapshotter::over(vars.clone(), shm, reporter) {
                        Ok(snap) => self.snap = Some((vars, snap)),
                        Err(e) => tracing::warn!("cannot prepare the snapshot buffer: {e}"),
                    }
                }
                Event::Request { .. }
                | Event::Closed { .. }
                | Event::Exited { .. }
                | Event::Prepared { .. } => {}
            }
        }
        self.stop_process();
    }

    /// A process that has not said hello within `failure.hang_timeout_seconds`
    /// of its start (stuck importing, waiting on something) is a failed
    /// rank: the coordinator's hang detection only covers training.
    fn check_connected(&mut self) {
        let limit = Duration::from_secs(self.spec.failure.hang_timeout_seconds);
        if self.prestarted {
            // a spare's process holds no rank to fail: it waits, and says so
            return;
        }
        let Some(p) = self.proc.as_ref().filter(|p| !p.hello && p.started.elapsed() > limit) else { return };
        let pid = p.pid;
        self.stop_process();
        self.drive(Input::TrainerFailed(format!(
            "trainer process {pid} did not connect to its worker within failure.hang_timeout_seconds = {}",
            limit.as_secs()
        )));
    }

    fn is_current(&self, start: u64) -> bool {
        self.proc.as_ref().is_some_and(|p| p.start == start)
    }

    fn publish(&self) {
        let step = self.machine.step();
        self.state.publish(step, self.machine.held());
        self.metrics.step.set(step.0 as i64);
    }

    /// Restored into the generation (Restored, Running, Finished).
    fn restored(&self) -> bool {
        self.machine.held().is_some()
    }

    /// The job resumed the generation.
    fn resumed(&self) -> bool {
        matches!(self.machine.phase(), Phase::Running { .. } | Phase::Finished { .. })
    }

    /// `host:port`, the port free on this host now.
    fn pick_rendezvous(&self) -> String {
        let port = std::net::TcpListener::bind((self.host.as_str(), 0))
            .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", 0)))
            .and_then(|l| l.local_addr())
            .map_or(29500, |a| a.port());
        format!("{}:{port}", self.host)
    }

    // ---- the process ------------------------------------------------------

    /// A spare without a rank and without a process starts one: it imports
    /// what it needs and waits inside `flotilla.init()` (its hello is
    /// answered once a rank is given). Called again while it has none (its
    /// process died before it was given a rank), at most every 500 ms.
    fn start_spare_process(&mut self) {
        if !self.spare || self.proc.is_some() || self.machine.generation().is_some() {
            return;
        }
        self.starts += 1;
        let start = self.starts;
        let mut env = vec![
            ("WORLD_SIZE", self.spec.world_size.to_string()),
            ("LOCAL_RANK", self.opts.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.opts.local_world_size.to_string()),
            ("FLOTILLA_JOB", self.job.to_string()),
            ("FLOTILLA_SPARE", "1".to_string()),
        ];
        if let Some(gpu) = &self.opts.gpu {
            env.push(("CUDA_VISIBLE_DEVICES", gpu.clone()));
        }
        let launch = Launch { start, rank: self.rank, argv: &self.opts.argv, env };
        let (on_connect, on_exit) = (self.tx.clone(), self.tx.clone());
        match Proc::start(
            launch,
            move |stream| {
                let _ = on_connect.send(Event::Connected { start, stream });
            },
            move |status| {
                let _ = on_exit.send(Event::Exited { start, status });
            },
        ) {
            Ok(proc) => {
                tracing::info!(
                    pid = proc.pid,
                    "spare: trainer process started ahead of a rank: {}",
                    self.opts.argv.join(" ")
                );
                self.state.set_trainer_pid(Some(proc.pid));
                self.state.set_status(WorkerStatus::SpareStarting);
                self.proc = Some(proc);
                self.prestarted = true;
                self.held_hello = None;
            }
            Err(e) => tracing::error!("spare: cannot start the trainer process: {e}; trying again"),
        }
    }

    /// The spare's waiting process becomes the generation's: its hello (if
    /// it said it) is answered now, with the rank and the rendezvous.
    fn adopt(&mut self, generation: Generation, rendezvous: &str) {
        self.prestarted = false;
        self.rendezvous = rendezvous.to_string();
        let pid = self.proc.as_ref().map_or(0, |p| p.pid);
        tracing::info!(%generation, pid, rank = %self.rank, "the spare's trainer process, already started, takes rank {}", self.rank);
        // answered as if it arrived now: the request path has the generation
        if let (Some(version), Some(p)) = (self.held_hello.take(), self.proc.as_ref()) {
            let req = Ok(Request::Hello { version });
            let _ = self.tx.send(Event::Request { start: p.start, req });
        }
    }

    /// Starts the generation's process; the error is why it could not.
    fn start_process(
        &mut self,
        generation: Generation,
        rendezvous: &str,
        start_step: Step,
    ) -> crate::Result<(), StartError> {
        let (master_addr, master_port) = split_rendezvous(rendezvous);
        self.rendezvous = rendezvous.to_string();
        self.starts += 1;
        let start = self.starts;
        let mut env = vec![
            ("RANK", self.rank.0.to_string()),
            ("WORLD_SIZE", self.spec.world_size.to_string()),
            ("LOCAL_RANK", self.opts.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.opts.local_world_size.to_string()),
            ("MASTER_ADDR", master_addr),
            ("MASTER_PORT", master_port),
            ("FLOTILLA_JOB", self.job.to_string()),
            ("FLOTILLA_GENERATION", generation.0.to_string()),
            ("FLOTILLA_START_STEP", start_step.0.to_string()),
        ];
        if let Some(gpu) = &self.opts.gpu {
            env.push(("CUDA_VISIBLE_DEVICES", gpu.clone()));
        }
        let launch = Launch { start, rank: self.rank, argv: &self.opts.argv, env };
        let (on_connect, on_exit) = (self.tx.clone(), self.tx.clone());
        let proc = Proc::start(
            launch,
            move |stream| {
                let _ = on_connect.send(Event::Connected { start, stream });
            },
            move |status| {
                let _ = on_exit.send(Event::Exited { start, status });
            },
        )?;
        let pid = proc.pid;
        tracing::info!(%generation, pid, start_step = start_step.0, "trainer process started: {}", self.opts.argv.join(" "));
        self.state.set_trainer_pid(Some(pid));
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops the process group: SIGTERM, up to the grace period, SIGKILL.
    fn stop_process(&mut self) {
        let Some(p) = self.proc.take() else { return };
        p.stop(self.opts.stop_grace);
        self.released();
    }

    /// What a process held, given back once it is gone.
    fn released(&mut self) {
        self.state.set_trainer_pid(None);
        self.deferred = None;
        if let (Some(buf), Some((_, snap))) = (self.saving.take(), self.snap.as_mut()) {
            snap.give_back(buf);
        }
    }

    fn exited(&mut self, status: ExitStatus) {
        let Some(p) = self.proc.take() else { return };
        p.reap();
        self.released();
        let pid = p.pid;
        let reason = exit_reason(pid, status, &p.last_words());
        if std::mem::take(&mut self.prestarted) {
            // no rank lost: the spare is not ready until a new one waits
            tracing::warn!(
                "spare: its trainer process ended before it was given a rank ({reason}); starting another"
            );
            self.held_hello = None;
            self.state.set_status(WorkerStatus::SpareStarting);
            return;
        }
        self.drive(Input::Exited { success: status.success(), reason });
    }

    fn connected(&mut self, start: u64, stream: UnixStream) {
        let Some(p) = self.proc.as_mut().filter(|p| p.start == start) else { return };
        match stream.try_clone() {
            Ok(reader) => {
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    read_requests(reader, |req| tx.send(Event::Request { start, req }).is_ok());
                    let _ = tx.send(Event::Closed { start });
                });
                p.conn = Some(stream);
            }
            Err(e) => tracing::error!("trainer connection: {e}"),
        }
    }

    // ---- requests ---------------------------------------------------------

    fn reply<T: Serialize>(&mut self, msg: &T) {
        let Some(p) = self.proc.as_mut() else { return };
        let Some(conn) = p.conn.as_mut() else { return };
        if let Err(e) = write_reply(conn, msg) {
            tracing::warn!("cannot answer the trainer: {e}");
            p.conn = None;
        }
    }

    fn refuse(&mut self, kind: &str, error: String) {
        tracing::warn!(kind, "trainer request refused: {error}");
        self.reply(&Refusal { ok: false, kind, error });
    }

    fn request(&mut self, req: crate::Result<Request, ProtocolError>) {
        let req = match req {
            Ok(r) => r,
            Err(e) => return self.refuse("protocol", e.to_string()),
        };
        if self.prestarted {
            return match req {
                Request::Hello { version } => {
                    if let Some(p) = self.proc.as_mut() {
                        p.hello = true;
                    }
                    self.held_hello = Some(version);
                    self.state.set_status(WorkerStatus::Spare);
                    tracing::info!(
                        "spare ready: its trainer process waits inside flotilla.init() for a rank"
                    );
                }
                _ => {
                    self.refuse("protocol", "this spare holds no rank yet: call flotilla.init() first".into())
                }
            };
        }
        let Some(generation) = self.machine.generation() else {
            return self.refuse("stopping", "this worker has no generation for the trainer".into());
        };
        match req {
            Request::Hello { version } => self.hello(generation, version),
            Request::Restore { like } => self.restore(like),
            Request::Step { step } => {
                if let (Some(p), false) = (self.machine.from(), self.restored()) {
                    let msg = format!(
                        "checkpoint {} (step {}) is being restored: call restore() before step_done()",
                        p.checkpoint, p.step
                    );
                    return self.refuse("protocol", msg);
                }
                if !self.restored() {
                    return self.refuse("protocol", "send hello first".into());
                }
                if self.resumed() {
                    self.drive(Input::AtStep(Step(step)));
                } else {
                    self.deferred = Some(Deferred::Step(step));
                }
            }
            Request::SaveBegin { tensors } => self.save_begin(tensors),
            Request::SaveDone { stall_seconds } => self.save_done(stall_seconds),
            Request::Finish { digest } => {
                self.drive(Input::Finished { digest: digest.unwrap_or_default() });
                self.reply(&Okay { ok: true });
            }
        }
    }

    fn hello(&mut self, generation: Generation, version: u32) {
        if let Some(p) = self.proc.as_mut() {
            p.hello = true;
        }
        if version != TRAINER_PROTOCOL_VERSION {
            let msg = format!(
                "the trainer speaks protocol {version}, this worker {TRAINER_PROTOCOL_VERSION}: install the flotilla Python package of this release (pip install ./python)"
            );
            return self.refuse("protocol", msg);
        }
        let from = self.machine.from();
        let (master_addr, master_port) = split_rendezvous(&self.rendezvous);
        let reply = HelloReply {
            ok: true,
            job: self.job.to_string(),
            rank: self.rank.0,
            world_size: self.spec.world_size,
            generation: generation.0,
            start_step: from.map_or(0, |p| p.step.0),
            restoring: from.is_some(),
            local_rank: self.opts.local_rank,
            master_addr,
            master_port,
        };
        let fresh = from.is_none() && !self.restored();
        self.reply(&reply);
        if fresh {
            self.drive(Input::Restored { step: self.machine.step(), source: None });
        }
    }

    fn restore(&mut self, like: Option<Vec<TensorDecl>>) {
        let Some(point) = self.machine.from().cloned() else {
            if let Some(vars) = like.as_deref().and_then(|l| parse_decls(l).ok()) {
                self.prepare_snapshot_buffer(vars);
            }
            // a fresh start: nothing to load, answered once the job runs
            if self.resumed() {
                return self.reply(&RestoreReply { ok: true, state: None });
            }
            self.deferred = Some(Deferred::Restore(None));
            return;
        };
        if self.restored() || matches!(self.machine.phase(), Phase::Refused { .. }) {
            return self.refuse("protocol", "restore() was already called in this process".into());
        }
        let model = match like.map(|l| parse_decls(&l)).transpose() {
            Ok(m) => m,
            Err(e) => return self.refuse("protocol", format!("restore(like=...): {e}")),
        };
        if let Some(vars) = &model {
            self.prepare_snapshot_buffer(vars.clone());
        }
        let started = Instant::now();
        match self.load(&point, model.as_deref()) {
            Ok((seg, state)) => {
                self.metrics.restore.observe(started.elapsed().as_secs_f64());
                if let Some(p) = self.proc.as_mut() {
                    p.restored = Some(seg);
                }
                self.deferred = Some(Deferred::Restore(Some(state)));
                // an --exec trainer's shard always comes from the files
                self.drive(Input::Restored { step: point.step, source: Some(RestoreSource::Storage) });
            }
            Err(RestoreRefusal { kind, message }) => {
                tracing::error!(generation = ?self.machine.generation(), "restore refused: {message}");
                self.drive(Input::RestoreRefused {
                    checkpoint: Some(point.checkpoint),
                    kind,
                    message: message.clone(),
                });
                self.refuse(refusal_kind(kind), message);
            }
        }
    }

    /// Creates and touches, on a helper thread, the snapshot buffer for the
    /// variables the process declared, so its first save costs one copy
    /// like every other (the process waits for the job to resume meanwhile).
    fn prepare_snapshot_buffer(&self, vars: Vec<VariableSpec>) {
        let Some(start) = self.proc.as_ref().map(|p| p.start) else { return };
        if self.snap.is_some() {
            return;
        }
        let tx = self.tx.clone();
        let (vars, _) = shard_layout(&vars);
        std::thread::spawn(move || {
            let bytes = vars.iter().map(VariableSpec::byte_len).sum();
            match ShmFile::create(&shm_dir(), &unique_name("snapshot"), bytes) {
                Ok(shm) => {
                    let _ = tx.send(Event::Prepared { start, vars, shm });
                }
                Err(e) => tracing::warn!("cannot prepare a snapshot buffer of {bytes} bytes: {e}"),
            }
        });
    }

    /// The staged checks, then the shard read and verified into a new
    /// shared-memory segment for the process.
    fn load(
        &self,
        point: &RestorePoint,
        model: Option<&[VariableSpec]>,
    ) -> crate::Result<(ShmFile, RestoredState), RestoreRefusal> {
        let label = format!("checkpoint {} rank {}", point.checkpoint, self.rank);
        let checks = Prechecks {
            rank: self.rank,
            headroom: self.spec.failure.memory_headroom_bytes,
            device: self.device.as_ref(),
            metrics: &self.metrics,
        };
        checks.run(point, &label, model)?;
        let mut seg = ShmFile::create(&shm_dir(), &unique_name("restore"), point.shard.bytes as usize)
            .map_err(|e| {
                let msg = format!(
                    "{label}: cannot create the restore buffer of {} bytes in {}: {e}",
                    point.shard.bytes,
                    shm_dir().display()
                );
                RestoreRefusal::new(RestoreFailureKind::DeviceMemory, msg)
            })?;
        let path = point.dir.join(&point.shard.file);
        let header = Shard::read_verified_to(&path, &label, &point.shard, seg.as_mut())
            .map_err(|e| shard_refusal(&e, &path))?;
        let tensors = header
            .tensors
            .iter()
            .map(|(v, r)| {
                let offset = (header.header_len + r.start) as u64;
                (v.name.clone(), v.dtype.to_string(), v.shape.clone(), offset, r.len() as u64)
            })
            .collect();
        let state = RestoredState {
            path: seg.path().display().to_string(),
            size: seg.len() as u64,
            step: point.step.0,
            tensors,
        };
        Ok((seg, state))
    }

    fn save_begin(&mut self, decls: Vec<TensorDecl>) {
        if self.machine.snapshot(Stage::Due).is_none() {
            let msg = "save() called but no checkpoint is due: call it only when step_done() returned True"
                .to_string();
            return self.refuse("protocol", msg);
        }
        let (vars, offsets) = match parse_decls(&decls) {
            Ok(v) => shard_layout(&v),
            Err(e) => {
                self.drive(Input::SnapshotFailed(format!("the trainer's tensors: {e}")));
                return self.refuse("protocol", format!("save(): {e}"));
            }
        };
        if self.snap.as_ref().is_none_or(|(v, _)| *v != vars) {
            // another layout: the old buffer if it is large enough (once its
            // last write ended), else a new one
            let bytes: usize = vars.iter().map(VariableSpec::byte_len).sum();
            let old =
                self.snap.take().and_then(|(_, mut old)| old.acquire().ok()).filter(|b| b.len() >= bytes);
            let shm = match old {
                Some(shm) => Ok(shm),
                None => ShmFile::create(&shm_dir(), &unique_name("snapshot"), bytes),
            };
            let built = shm.map_err(|e| e.to_string()).and_then(|shm| {
                Snapshotter::over(
                    vars.clone(),
                    shm,
                    shard_reporter(self.events.clone(), self.metrics.clone()),
                )
                .map_err(|e| e.to_string())
            });
            match built {
                Ok(snap) => self.snap = Some((vars.clone(), snap)),
                Err(e) => {
                    let msg = format!(
                        "cannot create a snapshot buffer of {bytes} bytes in {}: {e}",
                        shm_dir().display()
                    );
                    self.drive(Input::SnapshotFailed(msg.clone()));
                    return self.refuse("io", msg);
                }
            }
        }
        let Some((_, snap)) = self.snap.as_mut() else { return };
        let buf = match snap.acquire() {
            Ok(b) => b,
            Err(e) => {
                self.drive(Input::SnapshotFailed(e.to_string()));
                return self.refuse("io", e.to_string());
            }
        };
        let reply = SaveBeginReply {
            ok: true,
            path: buf.path().display().to_string(),
            size: buf.len() as u64,
            offsets,
        };
        self.drive(Input::SaveBegun);
        self.saving = Some(buf);
        self.reply(&reply);
    }

    fn save_done(&mut self, stall_seconds: f64) {
        let (Some(p), Some(buf)) = (self.machine.snapshot(Stage::Saving).cloned(), self.saving.take()) else {
            return self.refuse("protocol", "save_done without save_begin".into());
        };
        let req = write_request(&self.job, self.rank, &p);
        let submitted = match self.snap.as_mut() {
            Some((_, snap)) => snap.submit(req, buf).map_err(|e| e.to_string()),
            None => Err("no snapshot buffer".to_string()),
        };
        self.metrics.stall.observe(stall_seconds);
        tracing::info!(checkpoint = %p.id, step = %p.step, "snapshot taken: the trainer stalled {:.3} ms", stall_seconds * 1e3);
        self.drive(match submitted {
            Ok(()) => Input::SnapshotTaken,
            Err(e) => Input::SnapshotFailed(e),
        });
        self.reply(&Okay { ok: true });
    }
}

impl Shell for ExecRunner {
    fn machine(&mut self) -> &mut RankMachine {
        &mut self.machine
    }

    fn carry_out(&mut self, effect: Effect) -> ControlFlow<(), Option<Input>> {
        let snap = self.snap.as_ref().map(|(_, snap)| snap);
        match effect {
            Effect::Report(msg) => (self.events)(msg),
            Effect::Status(s) => self.state.set_status(s),
            Effect::Publish => self.publish(),
            Effect::CancelWrites => snap.into_iter().for_each(Snapshotter::cancel_writes),
            Effect::CancelWriteOf(id) => snap.into_iter().for_each(|s| s.cancel_write_of(id)),
            // a spare's waiting process is the one the generation will use
            Effect::StopTrainer if self.prestarted => {}
            Effect::StopTrainer => self.stop_process(),
            Effect::PickRendezvous => {
                return ControlFlow::Continue(Some(Input::RendezvousPicked(self.pick_rendezvous())))
            }
            Effect::StartTrainer { generation, rendezvous, .. } if self.prestarted && self.proc.is_some() => {
                self.adopt(generation, &rendezvous);
            }
            Effect::StartTrainer { generation, rendezvous, start_step } => {
                let failed = self.start_process(generation, &rendezvous, start_step).err();
                return ControlFlow::Continue(failed.map(|e| Input::TrainerFailed(e.to_string())));
            }
            Effect::TakeSnapshot(_) => self.reply(&StepReply { ok: true, checkpoint: true }),
            Effect::GoOn => self.reply(&StepReply { ok: true, checkpoint: false }),
            Effect::Resumed => match self.deferred.take() {
                Some(Deferred::Restore(state)) => self.reply(&RestoreReply { ok: true, state }),
                Some(Deferred::Step(n)) => return ControlFlow::Continue(Some(Input::AtStep(Step(n)))),
                None => {}
            },
            Effect::Exit => return ControlFlow::Break(()),
            // the process starts with the generation, as this rank
            Effect::Assigned(rank) => self.rank = rank,
            // the process restores itself, asking for its shard
            Effect::Restore { .. } => {}
            // the machine asks a process for none (its copies are not built yet)
            Effect::SendCopies { .. } => {}
        }
        ControlFlow::Continue(None)
    }
}

/// `host:port` as `MASTER_ADDR` and `MASTER_PORT` (empty: none yet).
fn split_rendezvous(rendezvous: &str) -> (String, String) {
    rendezvous.rsplit_once(':').map(|(h, p)| (h.to_string(), p.to_string())).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::wire::{WorkerMessage, WorkerStatus};

    /// A runner for rank 1 of a 2-rank job running `sh -c script`, and
    /// the reports it sends.
    fn runner(
        script: &str,
    ) -> (std::sync::mpsc::Sender<RunnerCmd>, Receiver<WorkerMessage>, Arc<RunnerState>) {
        let spec = JobSpec::from_toml(
            "name = \"t\"\nworld_size = 2\n[checkpoint]\nevery_steps = 10\nroot = \"/tmp\"\n[failure]\nhang_timeout_seconds = 1\n",
        )
        .unwrap();
        let opts = ExecOptions {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            stop_grace: Duration::from_secs(1),
            master_addr: None,
            local_rank: 0,
            local_world_size: 1,
            gpu: None,
        };
        let (ev_tx, ev_rx) = channel();
        let events: EventSink = Arc::new(move |m| {
            let _ = ev_tx.send(m);
        });
        let state = Arc::new(RunnerState::default());
        let device: Arc<dyn DeviceMemory> = Arc::from(crate::device::open(None, false, None).unwrap());
        let r = ExecRunner::new(
            spec,
            Rank(1),
            opts,
            "127.0.0.1".into(),
            device,
            events,
            state.clone(),
            WorkerMetrics::new(),
        );
        let (tx, rx) = channel();
        std::thread::spawn(move || r.run(rx));
        let restore = RunnerCmd::Restore {
            generation: Generation(1),
            from: None,
            rendezvous: Some("127.0.0.1:1".into()),
        };
        tx.send(restore).unwrap();
        (tx, ev_rx, state)
    }

    fn failure(events: &Receiver<WorkerMessage>) -> String {
        match events.recv_timeout(Duration::from_secs(30)).expect("a report") {
            WorkerMessage::TrainerFailed { generation, reason } => {
                assert_eq!(generation, Generation(1));
                reason
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_trainer_that_exits_or_never_connects_is_a_failed_rank_with_the_reason() {
        let (_tx, events, state) = runner("echo 'something broke' >&2; exit 3");
        let why = failure(&events);
        assert!(why.contains("exited with status 3") && why.contains("something broke"), "{why}");
        assert_eq!(state.status(), WorkerStatus::Failed);
        assert_eq!(state.trainer_pid(), None);

        // the environment it was given, and hang_timeout_seconds = 1 without a hello
        let (tx, events, state) =
            runner("test \"$RANK/$WORLD_SIZE/$MASTER_PORT/$FLOTILLA_GENERATION\" = 1/2/1/1 && exec sleep 60");
        let pid = loop {
            if let Some(pid) = state.trainer_pid() {
                break pid;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let why = failure(&events);
        assert!(why.contains(&format!("trainer process {pid} did not connect")), "{why}");
        assert_eq!(state.trainer_pid(), None);
        // the process group is gone
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "{pid} still runs");
        tx.send(RunnerCmd::Stop).unwrap();
    }
}
