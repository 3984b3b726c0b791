//! The `--exec` trainer: the worker launches and keeps one training process
//! per rank (as torchrun's agent does) and speaks to it over a Unix socket
//! (docs/TRAINER_PROTOCOL.md). The process copies its tensors into a
//! shared-memory buffer the worker owns; the worker does the rest of a
//! checkpoint as for the built-in trainer (safetensors, CRC-32C, write,
//! fsync, rename, report), and runs every restore check before the process
//! sees a byte.
//!
//! ```text
//! Restore{G, from, rendezvous} ─► stop the process group (SIGTERM, grace, SIGKILL)
//!                                 rank 0: pick MASTER_PORT, offer it ─► leader ─► every rank
//!                                 start CMD in generation G (its own process group)
//!   hello ◄──────────── process   fresh start: Restored{G, 0}
//!   restore(like) ◄──── process   checks (model, device memory, checksums) ─► Restored{G, S}
//!                                 (answered once the job resumes)
//!   step(n) ◄────────── process   "checkpoint now?" (a Checkpoint{C, n} directive)
//!   save_begin/save_done          the copy into shared memory is the stall; the shard is
//!                                 written in the background ─► ShardSaved
//!   finish(digest) ◄─── process   Finished{G, digest}; exit 0
//!   exit ≠ 0, signal, exit without finish ─► TrainerFailed{G}: the job restores
//! ```
//! Everything runs on one thread fed by one channel: the agent's
//! directives, the process's requests, its exit. Helper threads only move
//! bytes (accept, read requests, forward output, wait for the exit).

use crate::device::DeviceMemory;
use crate::metrics::WorkerMetrics;
use crate::runner::{kind_of, shard_reporter, EventSink, Prechecks, RunnerCmd, RunnerState, Taken};
use crate::shm::{shm_dir, unique_name, ShmFile};
use crate::snapshot::{Snapshotter, WriteRequest};
use flotilla_shared::ids::{CheckpointId, Generation, JobName, Rank, Step};
use flotilla_shared::layout::shard_file_name;
use flotilla_shared::shard::{Dtype, Shard, ShardMeta, VariableSpec};
use flotilla_shared::spec::JobSpec;
use flotilla_shared::wire::{
    RestoreFailureKind, RestorePoint, ShardFailureKind, WorkerMessage, WorkerStatus,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Version of the trainer protocol (the `hello` request carries it).
pub const TRAINER_PROTOCOL_VERSION: u32 = 1;
/// Largest request frame.
const MAX_FRAME: usize = 16 << 20;
/// Largest tensor a trainer may declare.
const MAX_TENSOR_BYTES: usize = 1 << 40;

/// How `flotilla worker --exec` runs the training process.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// SIGTERM to SIGKILL when the worker stops the process.
    pub stop_grace: Duration,
    /// The host rank 0's rendezvous is reached at (default: the address this
    /// worker reaches its coordinator from).
    pub master_addr: Option<String>,
    /// `LOCAL_RANK`.
    pub local_rank: u32,
    /// `LOCAL_WORLD_SIZE`.
    pub local_world_size: u32,
    /// `--gpu`: the process's `CUDA_VISIBLE_DEVICES`.
    pub gpu: Option<String>,
}

/// One request from the trainer (docs/TRAINER_PROTOCOL.md).
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Hello { version: u32 },
    Restore { like: Option<Vec<TensorDecl>> },
    Step { step: u64 },
    SaveBegin { tensors: Vec<TensorDecl> },
    SaveDone { stall_seconds: f64 },
    Finish { digest: Option<String> },
}

/// `[name, dtype, shape]`.
type TensorDecl = (String, String, Vec<usize>);

#[derive(Serialize)]
struct Okay {
    ok: bool,
}

#[derive(Serialize)]
struct Refusal<'a> {
    ok: bool,
    kind: &'a str,
    error: String,
}

#[derive(Serialize)]
struct HelloReply {
    ok: bool,
    job: String,
    rank: u32,
    world_size: u32,
    generation: u64,
    start_step: u64,
    restoring: bool,
}

#[derive(Serialize, Clone)]
struct RestoredState {
    path: String,
    size: u64,
    step: u64,
    /// `[name, dtype, shape, offset, length]`.
    tensors: Vec<(String, String, Vec<usize>, u64, u64)>,
}

#[derive(Serialize)]
struct RestoreReply {
    ok: bool,
    state: Option<RestoredState>,
}

#[derive(Serialize)]
struct StepReply {
    ok: bool,
    checkpoint: bool,
}

#[derive(Serialize)]
struct SaveBeginReply {
    ok: bool,
    path: String,
    size: u64,
    offsets: Vec<u64>,
}

enum Input {
    Cmd(RunnerCmd),
    Connected {
        start: u64,
        stream: UnixStream,
    },
    Request {
        start: u64,
        req: Result<Request, String>,
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

/// The generation being set up or run.
struct Target {
    generation: Generation,
    from: Option<RestorePoint>,
    rendezvous: Option<String>,
    /// Rank 0's own offer.
    offered: Option<String>,
    started: bool,
    restored: bool,
    resumed: bool,
    /// Its restore was refused: the exit that follows is no new failure.
    refused: bool,
    finished: bool,
}

/// A checkpoint this rank was told to take.
#[derive(Debug, Clone)]
struct Pending {
    generation: Generation,
    id: CheckpointId,
    step: Step,
    dir: PathBuf,
}

/// A reply held until the job resumes.
enum Deferred {
    Restore(Option<RestoredState>),
    Step(u64),
}

type ExitSlot = Arc<(Mutex<Option<ExitStatus>>, Condvar)>;

/// The running process.
struct Proc {
    start: u64,
    pid: u32,
    socket: PathBuf,
    accepted: Arc<AtomicBool>,
    conn: Option<UnixStream>,
    exit: ExitSlot,
    last_line: Arc<Mutex<String>>,
    /// Disconnects once all of its stderr is forwarded.
    stderr_done: Option<Receiver<()>>,
    /// The shard it restored from, mapped by it.
    restored: Option<ShmFile>,
    started: Instant,
    /// It said hello.
    hello: bool,
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
    tx: Sender<Input>,
    rx: Receiver<Input>,
    starts: u64,
    proc: Option<Proc>,
    target: Option<Target>,
    /// Steps completed, as the process last reported.
    step: u64,
    pending: Option<Pending>,
    /// Answered "checkpoint now": waiting for save_begin.
    due: Option<Pending>,
    /// Between save_begin and save_done.
    saving: Option<(Pending, ShmFile)>,
    taken: Taken,
    snap: Option<(Vec<VariableSpec>, Snapshotter<ShmFile>)>,
    deferred: Option<Deferred>,
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
            target: None,
            step: 0,
            pending: None,
            due: None,
            saving: None,
            taken: Taken::default(),
            snap: None,
            deferred: None,
        }
    }

    /// Runs until [`RunnerCmd::Stop`] or the command channel closes; the
    /// process is stopped on the way out.
    pub fn run(mut self, cmds: Receiver<RunnerCmd>) {
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("flotilla-exec-cmds".into())
            .spawn(move || {
                for cmd in cmds {
                    if tx.send(Input::Cmd(cmd)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Input::Cmd(RunnerCmd::Stop));
            })
            .expect("spawn a thread");
        loop {
            let input = match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(input) => input,
                Err(RecvTimeoutError::Timeout) => {
                    self.check_connected();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match input {
                Input::Cmd(RunnerCmd::Stop) => break,
                Input::Cmd(cmd) => self.command(cmd),
                Input::Connected { start, stream } => self.connected(start, stream),
                Input::Request { start, req } if self.is_current(start) => self.request(req),
                Input::Closed { start } if self.is_current(start) => {
                    if let Some(p) = self.proc.as_mut() {
                        p.conn = None;
                    }
                }
                Input::Exited { start, status } if self.is_current(start) => self.exited(status),
                Input::Prepared { start, vars, shm } if self.is_current(start) && self.snap.is_none() => {
                    let reporter = shard_reporter(self.events.clone(), self.metrics.clone());
                    match Snapshotter::over(vars.clone(), shm, reporter) {
                        Ok(snap) => self.snap = Some((vars, snap)),
                        Err(e) => tracing::warn!("cannot prepare the snapshot buffer: {e}"),
                    }
                }
                Input::Request { .. }
                | Input::Closed { .. }
                | Input::Exited { .. }
                | Input::Prepared { .. } => {}
            }
        }
        self.stop_process();
    }

    /// A process that has not said hello within `failure.hang_timeout_seconds`
    /// of its start (stuck importing, waiting on something) is a failed
    /// rank: the coordinator's hang detection only covers training.
    fn check_connected(&mut self) {
        let limit = Duration::from_secs(self.spec.failure.hang_timeout_seconds);
        let Some(p) = self.proc.as_ref().filter(|p| !p.hello && p.started.elapsed() > limit) else { return };
        let pid = p.pid;
        self.stop_process();
        self.trainer_failed(format!(
            "trainer process {pid} did not connect to its worker within failure.hang_timeout_seconds = {}",
            limit.as_secs()
        ));
    }

    fn is_current(&self, start: u64) -> bool {
        self.proc.as_ref().is_some_and(|p| p.start == start)
    }

    fn emit(&self, msg: WorkerMessage) {
        (self.events)(msg);
    }

    fn publish(&self) {
        let generation = self.target.as_ref().filter(|t| t.restored).map(|t| t.generation);
        self.state.publish(Step(self.step), generation);
        self.metrics.step.set(self.step as i64);
    }

    // ---- directives -------------------------------------------------------

    fn command(&mut self, cmd: RunnerCmd) {
        match cmd {
            RunnerCmd::Restore { generation, from, rendezvous } => {
                self.restore_directive(generation, from, rendezvous)
            }
            RunnerCmd::Resume { generation, step } => self.resume(generation, step),
            RunnerCmd::Checkpoint { generation, id, step, dir } => {
                self.checkpoint(Pending { generation, id, step, dir })
            }
            RunnerCmd::Abort { id } => {
                // a save already announced to the process goes ahead; its
                // report is answered Stale. Its shard write, once under way,
                // is given up: the shard is garbage
                self.pending.take_if(|p| p.id == id);
                if let Some((_, snap)) = &self.snap {
                    snap.cancel_write_of(id);
                }
            }
            RunnerCmd::Stop => {}
        }
    }

    fn restore_directive(
        &mut self,
        generation: Generation,
        from: Option<RestorePoint>,
        rendezvous: Option<String>,
    ) {
        if let Some(t) = self.target.as_mut().filter(|t| t.generation == generation) {
            // a repeated directive: finish what is left of the set-up
            if t.rendezvous.is_none() {
                t.rendezvous = rendezvous.clone();
            }
            let reoffer = t.offered.clone().filter(|_| rendezvous.is_none());
            let start = !t.started && t.rendezvous.is_some();
            let restored = (t.restored && !t.resumed).then_some(generation);
            if let Some(addr) = reoffer {
                self.emit(WorkerMessage::Rendezvous { generation, addr });
            }
            if start {
                self.start_process();
            }
            if let Some(generation) = restored {
                self.emit(WorkerMessage::Restored { generation, step: Step(self.step) });
            }
            return;
        }
        self.stop_process();
        self.give_back_buffer();
        // a write still in flight is of the generation being left
        if let Some((_, snap)) = &self.snap {
            snap.cancel_writes();
        }
        tracing::info!(%generation, from = ?from.as_ref().map(|p| p.checkpoint), "restoring: a new trainer process for the generation");
        self.step = from.as_ref().map_or(0, |p| p.step.0);
        self.pending = None;
        self.due = None;
        self.taken.clear();
        self.deferred = None;
        let mut t = Target {
            generation,
            from,
            rendezvous,
            offered: None,
            started: false,
            restored: false,
            resumed: false,
            refused: false,
            finished: false,
        };
        if self.rank == Rank(0) && t.rendezvous.is_none() {
            let addr = self.pick_rendezvous();
            self.emit(WorkerMessage::Rendezvous { generation, addr: addr.clone() });
            t.offered = Some(addr.clone());
            t.rendezvous = Some(addr);
        }
        let ready = t.rendezvous.is_some();
        self.target = Some(t);
        self.state.set_status(WorkerStatus::Restoring);
        self.publish();
        if ready {
            self.start_process();
        } else {
            tracing::info!(%generation, "waiting for rank 0's rendezvous before starting the trainer");
        }
    }

    /// `host:port`, the port free on this host now.
    fn pick_rendezvous(&self) -> String {
        let port = std::net::TcpListener::bind((self.host.as_str(), 0))
            .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", 0)))
            .and_then(|l| l.local_addr())
            .map_or(29500, |a| a.port());
        format!("{}:{port}", self.host)
    }

    fn resume(&mut self, generation: Generation, step: Step) {
        let Some(t) = self.target.as_mut().filter(|t| t.generation == generation && t.restored) else {
            return;
        };
        if t.resumed {
            return;
        }
        t.resumed = true;
        if Step(self.step) != step {
            tracing::warn!(%generation, %step, at = self.step, "resumed at another step than this rank restored");
        }
        let finished = t.finished;
        self.state.set_status(if finished { WorkerStatus::Finished } else { WorkerStatus::Running });
        match self.deferred.take() {
            Some(Deferred::Restore(state)) => self.reply(&RestoreReply { ok: true, state }),
            Some(Deferred::Step(n)) => self.step_done(n),
            None => {}
        }
    }

    fn checkpoint(&mut self, p: Pending) {
        let Some(t) = self.target.as_ref().filter(|t| t.generation == p.generation && t.restored) else {
            return;
        };
        let repeat = [&self.pending, &self.due].iter().any(|x| x.as_ref().is_some_and(|x| x.id == p.id))
            || self.saving.as_ref().is_some_and(|(x, _)| x.id == p.id)
            || self.taken.contains(p.id);
        if repeat || t.finished {
            return;
        }
        if p.step.0 <= self.step {
            self.emit(WorkerMessage::ShardFailed {
                generation: p.generation,
                checkpoint: p.id,
                kind: ShardFailureKind::PastStep,
                reason: format!("already past step {} (at step {}) when told", p.step, self.step),
            });
            return;
        }
        self.pending = Some(p);
    }

    // ---- the process ------------------------------------------------------

    fn start_process(&mut self) {
        let Some(t) = self.target.as_mut() else { return };
        t.started = true;
        let generation = t.generation;
        let start_step = t.from.as_ref().map_or(0, |p| p.step.0);
        let (master_addr, master_port) = t
            .rendezvous
            .as_deref()
            .and_then(|r| r.rsplit_once(':'))
            .map(|(h, p)| (h.to_string(), p.to_string()))
            .unwrap_or_default();
        self.starts += 1;
        let start = self.starts;
        let socket = std::env::temp_dir().join(unique_name("trainer.sock"));
        let listener = match UnixListener::bind(&socket) {
            Ok(l) => l,
            Err(e) => return self.trainer_failed(format!("cannot listen on {}: {e}", socket.display())),
        };
        let accepted = Arc::new(AtomicBool::new(false));
        {
            let (tx, accepted, socket) = (self.tx.clone(), accepted.clone(), socket.clone());
            // one connection per process; the first is the trainer's
            std::thread::spawn(move || {
                if let Ok((stream, _)) = listener.accept() {
                    if !accepted.swap(true, Ordering::SeqCst) {
                        let _ = tx.send(Input::Connected { start, stream });
                    }
                }
                let _ = std::fs::remove_file(socket);
            });
        }
        let argv = &self.opts.argv;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("RANK", self.rank.0.to_string())
            .env("WORLD_SIZE", self.spec.world_size.to_string())
            .env("LOCAL_RANK", self.opts.local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", self.opts.local_world_size.to_string())
            .env("MASTER_ADDR", master_addr)
            .env("MASTER_PORT", master_port)
            .env("FLOTILLA_JOB", self.job.to_string())
            .env("FLOTILLA_GENERATION", generation.0.to_string())
            .env("FLOTILLA_START_STEP", start_step.to_string())
            .env("FLOTILLA_SOCKET", &socket)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // its own group: a restore stops everything it started
            .process_group(0);
        if let Some(gpu) = &self.opts.gpu {
            cmd.env("CUDA_VISIBLE_DEVICES", gpu);
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between
        // fork and exec. The process dies with the thread that started it
        // (this runner's), so a SIGKILLed worker leaves no trainer behind.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                wake(&socket, &accepted);
                return self.trainer_failed(format!("cannot start `{}`: {e}", argv.join(" ")));
            }
        };
        let pid = child.id();
        tracing::info!(%generation, pid, start_step, "trainer process started: {}", argv.join(" "));
        let last_line = Arc::new(Mutex::new(String::new()));
        let rank = self.rank;
        if let Some(out) = child.stdout.take() {
            forward_output(out, rank, None);
        }
        let stderr_done = child.stderr.take().map(|err| forward_output(err, rank, Some(last_line.clone())));
        let exit: ExitSlot = Arc::new((Mutex::new(None), Condvar::new()));
        {
            let (tx, exit) = (self.tx.clone(), exit.clone());
            std::thread::spawn(move || {
                let Ok(status) = child.wait() else { return };
                *exit.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                exit.1.notify_all();
                let _ = tx.send(Input::Exited { start, status });
            });
        }
        self.state.set_trainer_pid(Some(pid));
        self.proc = Some(Proc {
            start,
            pid,
            socket,
            accepted,
            conn: None,
            exit,
            last_line,
            stderr_done,
            restored: None,
            started: Instant::now(),
            hello: false,
        });
    }

    /// Stops the process group: SIGTERM, up to the grace period, SIGKILL.
    fn stop_process(&mut self) {
        let Some(p) = self.proc.take() else { return };
        if wait_exit(&p.exit, Duration::ZERO).is_none() {
            signal_group(p.pid, libc::SIGTERM);
            if wait_exit(&p.exit, self.opts.stop_grace).is_none() {
                tracing::warn!(
                    pid = p.pid,
                    "trainer did not stop within {:?} of SIGTERM: SIGKILL",
                    self.opts.stop_grace
                );
            }
        }
        self.reap(p);
    }

    /// Kills what is left of a process group and releases its resources.
    fn reap(&mut self, p: Proc) {
        signal_group(p.pid, libc::SIGKILL);
        if wait_exit(&p.exit, Duration::from_secs(10)).is_none() {
            tracing::error!(
                pid = p.pid,
                "trainer survives SIGKILL (uninterruptible I/O?); going on without it"
            );
        }
        wake(&p.socket, &p.accepted);
        self.state.set_trainer_pid(None);
        self.deferred = None;
        self.give_back_buffer();
    }

    fn exited(&mut self, status: ExitStatus) {
        let Some(mut p) = self.proc.take() else { return };
        let (pid, last_line, stderr_done) = (p.pid, p.last_line.clone(), p.stderr_done.take());
        self.reap(p);
        // the group is gone, so its stderr ends: read what it said last
        if let Some(done) = stderr_done {
            let _ = done.recv_timeout(Duration::from_secs(1));
        }
        let last = last_line.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(t) = self.target.as_ref() else { return };
        if t.finished && status.success() {
            tracing::info!(pid, "trainer exited after finishing");
            return;
        }
        if t.refused {
            tracing::info!(pid, "trainer exited after its restore was refused");
            return;
        }
        let how = match (status.code(), status.signal()) {
            (Some(0), _) => "exited with status 0 without calling finish()".to_string(),
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "ended".to_string(),
        };
        let last = if last.is_empty() { String::new() } else { format!("; its last output: {last}") };
        self.trainer_failed(format!("trainer process {pid} {how}{last}"));
    }

    fn trainer_failed(&mut self, reason: String) {
        tracing::error!("{reason}");
        let generation = self.target.as_ref().map_or(Generation(0), |t| t.generation);
        self.state.set_status(WorkerStatus::Failed);
        self.emit(WorkerMessage::TrainerFailed { generation, reason });
    }

    fn give_back_buffer(&mut self) {
        if let (Some((_, buf)), Some((_, snap))) = (self.saving.take(), self.snap.as_mut()) {
            snap.give_back(buf);
        }
    }

    fn connected(&mut self, start: u64, stream: UnixStream) {
        let Some(p) = self.proc.as_mut().filter(|p| p.start == start) else { return };
        match stream.try_clone() {
            Ok(reader) => {
                let tx = self.tx.clone();
                std::thread::spawn(move || read_requests(start, reader, tx));
                p.conn = Some(stream);
            }
            Err(e) => tracing::error!("trainer connection: {e}"),
        }
    }

    // ---- requests ---------------------------------------------------------

    fn reply<T: Serialize>(&mut self, msg: &T) {
        let Some(p) = self.proc.as_mut() else { return };
        let Some(conn) = p.conn.as_mut() else { return };
        let body = rmp_serde::to_vec_named(msg).expect("replies serialize");
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        if let Err(e) = conn.write_all(&frame) {
            tracing::warn!("cannot answer the trainer: {e}");
            p.conn = None;
        }
    }

    fn refuse(&mut self, kind: &str, error: String) {
        tracing::warn!(kind, "trainer request refused: {error}");
        self.reply(&Refusal { ok: false, kind, error });
    }

    fn request(&mut self, req: Result<Request, String>) {
        let req = match req {
            Ok(r) => r,
            Err(e) => return self.refuse("protocol", e),
        };
        if self.target.is_none() {
            return self.refuse("stopping", "this worker has no generation for the trainer".into());
        }
        match req {
            Request::Hello { version } => self.hello(version),
            Request::Restore { like } => self.restore(like),
            Request::Step { step } => {
                let t = self.target.as_ref().expect("checked above");
                if let (Some(p), false) = (&t.from, t.restored) {
                    let msg = format!(
                        "checkpoint {} (step {}) is being restored: call restore() before step_done()",
                        p.checkpoint, p.step
                    );
                    return self.refuse("protocol", msg);
                }
                if !t.restored {
                    return self.refuse("protocol", "send hello first".into());
                }
                if t.resumed {
                    self.step_done(step);
                } else {
                    self.deferred = Some(Deferred::Step(step));
                }
            }
            Request::SaveBegin { tensors } => self.save_begin(tensors),
            Request::SaveDone { stall_seconds } => self.save_done(stall_seconds),
            Request::Finish { digest } => {
                let t = self.target.as_mut().expect("checked above");
                t.finished = true;
                let generation = t.generation;
                self.state.set_status(WorkerStatus::Finished);
                tracing::info!(%generation, step = self.step, "trainer finished");
                let msg = WorkerMessage::Finished {
                    generation,
                    step: Step(self.step),
                    digest: digest.unwrap_or_default(),
                };
                self.emit(msg);
                self.reply(&Okay { ok: true });
            }
        }
    }

    fn hello(&mut self, version: u32) {
        if let Some(p) = self.proc.as_mut() {
            p.hello = true;
        }
        if version != TRAINER_PROTOCOL_VERSION {
            let msg = format!(
                "the trainer speaks protocol {version}, this worker {TRAINER_PROTOCOL_VERSION}: install the flotilla Python package of this release (pip install ./python)"
            );
            return self.refuse("protocol", msg);
        }
        let t = self.target.as_mut().expect("checked by the caller");
        let reply = HelloReply {
            ok: true,
            job: self.job.to_string(),
            rank: self.rank.0,
            world_size: self.spec.world_size,
            generation: t.generation.0,
            start_step: t.from.as_ref().map_or(0, |p| p.step.0),
            restoring: t.from.is_some(),
        };
        let fresh = t.from.is_none() && !t.restored;
        if fresh {
            t.restored = true;
        }
        let generation = t.generation;
        self.reply(&reply);
        if fresh {
            self.restored(generation);
        }
    }

    fn restored(&mut self, generation: Generation) {
        self.state.set_status(WorkerStatus::Waiting);
        self.publish();
        self.emit(WorkerMessage::Restored { generation, step: Step(self.step) });
    }

    fn restore(&mut self, like: Option<Vec<TensorDecl>>) {
        let t = self.target.as_ref().expect("checked by the caller");
        let Some(point) = t.from.clone() else {
            if let Some(vars) = like.as_deref().and_then(|l| parse_decls(l).ok()) {
                self.prepare_snapshot_buffer(vars);
            }
            let t = self.target.as_ref().expect("checked by the caller");
            // a fresh start: nothing to load, answered once the job runs
            if t.resumed {
                return self.reply(&RestoreReply { ok: true, state: None });
            }
            self.deferred = Some(Deferred::Restore(None));
            return;
        };
        if t.restored || t.refused {
            return self.refuse("protocol", "restore() was already called in this process".into());
        }
        let generation = t.generation;
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
                if let Some(t) = self.target.as_mut() {
                    t.restored = true;
                }
                self.deferred = Some(Deferred::Restore(Some(state)));
                self.restored(generation);
            }
            Err((kind, message)) => {
                tracing::error!(%generation, "restore refused: {message}");
                if let Some(t) = self.target.as_mut() {
                    t.refused = true;
                }
                self.state.set_status(WorkerStatus::Waiting);
                self.emit(WorkerMessage::RestoreFailed {
                    generation,
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
                    let _ = tx.send(Input::Prepared { start, vars, shm });
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
    ) -> Result<(ShmFile, RestoredState), (RestoreFailureKind, String)> {
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
                (RestoreFailureKind::DeviceMemory, msg)
            })?;
        let path = point.dir.join(&point.shard.file);
        let header = Shard::read_verified_to(&path, &label, &point.shard, seg.as_mut())
            .map_err(|e| (kind_of(&e.kind), format!("{e} (file {})", path.display())))?;
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

    fn step_done(&mut self, step: u64) {
        self.step = step;
        self.publish();
        let due = match self.pending.as_ref() {
            Some(p) if p.step.0 == step => true,
            Some(p) if p.step.0 < step => {
                let p = self.pending.take().expect("matched");
                self.emit(WorkerMessage::ShardFailed {
                    generation: p.generation,
                    checkpoint: p.id,
                    kind: ShardFailureKind::PastStep,
                    reason: format!("the trainer reported step {step} without stopping at step {}", p.step),
                });
                false
            }
            _ => false,
        };
        if due {
            self.due = self.pending.take();
            self.state.set_status(WorkerStatus::Checkpointing);
        }
        self.reply(&StepReply { ok: true, checkpoint: due });
    }

    fn save_begin(&mut self, decls: Vec<TensorDecl>) {
        let Some(p) = self.due.take() else {
            let msg = "save() called but no checkpoint is due: call it only when step_done() returned True"
                .to_string();
            return self.refuse("protocol", msg);
        };
        let (vars, offsets) = match parse_decls(&decls) {
            Ok(v) => shard_layout(&v),
            Err(e) => {
                self.shard_failed(&p, format!("the trainer's tensors: {e}"));
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
                    self.shard_failed(&p, msg.clone());
                    return self.refuse("io", msg);
                }
            }
        }
        let (_, snap) = self.snap.as_mut().expect("built above");
        let buf = match snap.acquire() {
            Ok(b) => b,
            Err(e) => {
                self.shard_failed(&p, e.to_string());
                return self.refuse("io", e.to_string());
            }
        };
        let reply = SaveBeginReply {
            ok: true,
            path: buf.path().display().to_string(),
            size: buf.len() as u64,
            offsets,
        };
        self.saving = Some((p, buf));
        self.reply(&reply);
    }

    fn save_done(&mut self, stall_seconds: f64) {
        let Some((p, buf)) = self.saving.take() else {
            return self.refuse("protocol", "save_done without save_begin".into());
        };
        self.taken.remember(p.id);
        let meta = ShardMeta {
            job: self.job.clone(),
            checkpoint: p.id,
            rank: self.rank,
            step: p.step,
            generation: p.generation,
        };
        let req = WriteRequest { path: p.dir.join(shard_file_name(self.rank)), meta };
        let submitted = self.snap.as_mut().expect("a buffer came from it").1.submit(req, buf);
        if let Err(e) = submitted {
            self.shard_failed(&p, e.to_string());
        }
        self.metrics.stall.observe(stall_seconds);
        tracing::info!(checkpoint = %p.id, step = %p.step, "snapshot taken: the trainer stalled {:.3} ms", stall_seconds * 1e3);
        let finished = self.target.as_ref().is_some_and(|t| t.finished);
        self.state.set_status(if finished { WorkerStatus::Finished } else { WorkerStatus::Running });
        self.reply(&Okay { ok: true });
    }

    fn shard_failed(&self, p: &Pending, reason: String) {
        self.emit(WorkerMessage::ShardFailed {
            generation: p.generation,
            checkpoint: p.id,
            kind: ShardFailureKind::Write,
            reason,
        });
    }
}

/// Parses `[name, dtype, shape]` declarations: known dtypes, unique
/// non-empty names.
fn parse_decls(decls: &[TensorDecl]) -> Result<Vec<VariableSpec>, String> {
    let mut seen = HashSet::new();
    let mut vars = Vec::with_capacity(decls.len());
    for (name, dtype, shape) in decls {
        if name.is_empty() {
            return Err("a tensor has an empty name".into());
        }
        if !seen.insert(name.as_str()) {
            return Err(format!("tensor {name} is named twice"));
        }
        let dtype = parse_dtype(dtype).ok_or_else(|| {
            format!("tensor {name} has dtype {dtype:?}; use one of BOOL U8 I8 I16 U16 I32 U32 I64 U64 F16 BF16 F32 F64")
        })?;
        let var = VariableSpec::new(name.clone(), dtype, shape.clone());
        if var.checked_byte_len().is_none_or(|b| b > MAX_TENSOR_BYTES) {
            return Err(format!("tensor {name} of shape {shape:?} is larger than this worker takes (1 TiB)"));
        }
        vars.push(var);
    }
    Ok(vars)
}

/// The shard's layout of the declared variables: the widest element type
/// first (otherwise in declared order), so that every tensor starts at a
/// multiple of its element size, in the buffer and in the file (whose data
/// starts 8-aligned): restored arrays are naturally aligned. Returns the
/// variables in file order and each declared variable's offset.
fn shard_layout(vars: &[VariableSpec]) -> (Vec<VariableSpec>, Vec<u64>) {
    let mut order: Vec<usize> = (0..vars.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(vars[i].dtype.bitsize()));
    let mut offsets = vec![0u64; vars.len()];
    let mut at = 0u64;
    for &i in &order {
        offsets[i] = at;
        at += vars[i].byte_len() as u64;
    }
    (order.into_iter().map(|i| vars[i].clone()).collect(), offsets)
}

fn parse_dtype(s: &str) -> Option<Dtype> {
    Some(match s {
        "BOOL" => Dtype::BOOL,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "I16" => Dtype::I16,
        "U16" => Dtype::U16,
        "I32" => Dtype::I32,
        "U32" => Dtype::U32,
        "I64" => Dtype::I64,
        "U64" => Dtype::U64,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        _ => return None,
    })
}

fn refusal_kind(kind: RestoreFailureKind) -> &'static str {
    match kind {
        RestoreFailureKind::ModelMismatch => "model_mismatch",
        RestoreFailureKind::DeviceMemory => "device_memory",
        RestoreFailureKind::Corrupt => "corrupt",
        RestoreFailureKind::Unavailable => "unavailable",
    }
}

/// Reads frames until the connection closes.
fn read_requests(start: u64, mut stream: UnixStream, tx: Sender<Input>) {
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).is_err() {
            break;
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_FRAME {
            let _ = tx.send(Input::Request {
                start,
                req: Err(format!("a frame of {n} bytes exceeds {MAX_FRAME}")),
            });
            break;
        }
        let mut body = vec![0u8; n];
        if stream.read_exact(&mut body).is_err() {
            break;
        }
        let req = rmp_serde::from_slice::<Request>(&body).map_err(|e| format!("malformed request: {e}"));
        if tx.send(Input::Request { start, req }).is_err() {
            return;
        }
    }
    let _ = tx.send(Input::Closed { start });
}

/// Forwards the process's output to the log, line by line, prefixed by
/// rank; keeps the last line of stderr for the failure reason.
/// The returned receiver disconnects once the stream has ended and every
/// line is forwarded.
fn forward_output(
    stream: impl Read + Send + 'static,
    rank: Rank,
    last: Option<Arc<Mutex<String>>>,
) -> Receiver<()> {
    let (done, ended) = channel::<()>();
    std::thread::spawn(move || {
        let _done = done;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            tracing::info!(target: "flotilla::trainer", "[rank {rank}] {line}");
            if let Some(last) = &last {
                if !line.trim().is_empty() {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = line;
                }
            }
        }
    });
    ended
}

#[allow(unsafe_code)]
fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: killpg has no memory-safety preconditions; a group already
    // gone answers ESRCH, which is fine
    unsafe {
        libc::killpg(pid as libc::pid_t, signal);
    }
}

/// Waits up to `timeout` for the process's exit status.
fn wait_exit(exit: &ExitSlot, timeout: Duration) -> Option<ExitStatus> {
    let (lock, cvar) = &**exit;
    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let (guard, _) =
        cvar.wait_timeout_while(guard, timeout, |s| s.is_none()).unwrap_or_else(|e| e.into_inner());
    *guard
}

/// Ends an acceptor still waiting for a process that never connected.
fn wake(socket: &std::path::Path, accepted: &AtomicBool) {
    if !accepted.swap(true, Ordering::SeqCst) {
        let _ = UnixStream::connect(socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(name: &str, dtype: &str, shape: &[usize]) -> TensorDecl {
        (name.to_string(), dtype.to_string(), shape.to_vec())
    }

    #[test]
    fn the_layout_aligns_every_tensor_to_its_element_size() {
        let vars = parse_decls(&[
            decl("a", "F32", &[3]),
            decl("flag", "BOOL", &[]),
            decl("step", "I64", &[]),
            decl("h", "F16", &[5]),
            decl("w", "F64", &[2, 2]),
        ])
        .unwrap();
        let (order, offsets) = shard_layout(&vars);
        let names: Vec<&str> = order.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["step", "w", "a", "h", "flag"]);
        assert_eq!(offsets, [40, 62, 0, 52, 8]);
        for (v, o) in vars.iter().zip(&offsets) {
            assert_eq!(o % (v.dtype.bitsize() as u64 / 8), 0, "{} at {o}", v.name);
        }
    }

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

    #[test]
    fn declarations_are_checked() {
        let e = parse_decls(&[decl("a", "F32", &[1]), decl("a", "F32", &[1])]).unwrap_err();
        assert!(e.contains("named twice"), "{e}");
        let e = parse_decls(&[decl("a", "float32", &[1])]).unwrap_err();
        assert!(e.contains("\"float32\"") && e.contains("F32"), "{e}");
        assert!(parse_decls(&[decl("", "F32", &[1])]).is_err());
        let e = parse_decls(&[decl("huge", "F64", &[1 << 40, 1 << 40])]).unwrap_err();
        assert!(e.contains("tensor huge of shape"), "{e}");
    }
}
