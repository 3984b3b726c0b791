//! The snapshot pipeline: a checkpoint stalls training only for a memory
//! copy; the write and fsync happen on a background thread.
//!
//! ```text
//! training thread                      writer thread
//!   take buffer  ── waits only if the previous write is still in flight
//!   trainer.snapshot_into(buf)   ◄── the whole stall
//!   jobs.send(buf) ───────────────────► write_shard(temp → fsync → rename → fsync dir)
//!   (training continues)                on_done(outcome)
//!                    buffer returned ◄┘
//! ```
//! One reusable host buffer per rank, allocated and touched once, means at
//! most one write in flight and natural back-pressure: a checkpoint that
//! arrives before the last write ended waits for it (and says so).
//!
//! The buffer is a `Vec<u8>` for the built-in trainer and a shared-memory
//! file ([`crate::shm::ShmFile`]) for an `--exec` trainer, which copies its
//! tensors into it itself ([`Snapshotter::acquire`], then
//! [`Snapshotter::submit`]).
//!
//! After a write the buffer still holds that shard's data, and the writer
//! hands back its header with it: until the buffer is taken again, the
//! shard is in memory, and a restore of that checkpoint reads nothing from
//! storage (SPEC §11, [`Snapshotter::with_image`]).

use crate::trainer::Trainer;
use flotilla_shared::checksum::Checksum;
use flotilla_shared::durable;
use flotilla_shared::ids::CheckpointId;
use flotilla_shared::shard::{
    write_shard_keeping_header, ShardError, ShardManifest, ShardMeta, VariableSpec,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where and as what a snapshot is written.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    /// Final path of the shard file (its directory is created if needed).
    pub path: PathBuf,
    /// Identity recorded in the header.
    pub meta: ShardMeta,
}

/// The result of one background write.
#[derive(Debug)]
pub struct WriteOutcome {
    /// The shard's identity.
    pub meta: ShardMeta,
    /// The manifest (checksums) or why the write failed.
    pub result: Result<ShardManifest, ShardError>,
    /// Time from the start of the write to the directory fsync.
    pub write_time: Duration,
}

/// How long one snapshot held up training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stall {
    /// Waiting for the previous write to release the buffer (back-pressure).
    pub wait: Duration,
    /// Copying the variables into the buffer.
    pub copy: Duration,
}

impl Stall {
    /// The whole stall.
    pub fn total(&self) -> Duration {
        self.wait + self.copy
    }
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The trainer's variables changed size since the pipeline was built.
    #[error("the trainer's snapshot is {got} bytes, the pipeline was built for {want}")]
    SizeChanged {
        /// Bytes now.
        got: usize,
        /// Bytes at construction.
        want: usize,
    },
    /// The writer thread is gone (it panicked or the pipeline is shutting down).
    #[error("the shard writer thread has stopped")]
    WriterGone,
    /// The buffer could not be allocated: the host has not that much memory
    /// to give (an allocation sized by a spec never aborts the process).
    #[error("cannot allocate a snapshot buffer of {}: the host refused the memory", crate::device::human_bytes(*bytes as u64))]
    NoMemory {
        /// The buffer's size.
        bytes: usize,
    },
    /// The buffer is shorter than the variables.
    #[error("snapshot buffer of {got} bytes for {want} bytes of variables")]
    ShortBuffer {
        /// The buffer's length.
        got: usize,
        /// The variables' bytes.
        want: usize,
    },
    /// The writer thread could not be started.
    #[error("cannot start the shard writer thread: {0}")]
    Thread(std::io::Error),
}

/// What the writer thread is given, with the buffer.
enum Job<B> {
    /// A write request and its sequence number (for cancelling).
    Write(WriteRequest, B, u64),
    /// A task that reads the shard the buffer holds (a memory copy sent to
    /// a peer), and its sequence number (cancelled as writes are); the
    /// buffer goes back still holding the shard.
    Read(ReadTask, B, Held, u64),
}

/// A task given the shard the buffer holds: its header, its data, its
/// whole-file checksum (what a file of it would be, byte for byte), and
/// whether it is given up (a restore needs the buffer: stop soon).
pub type ReadTask = Box<dyn FnOnce(&[u8], &[u8], Checksum, &dyn Fn() -> bool) + Send>;

/// The shard whose data the idle buffer holds (a write of it succeeded):
/// its checkpoint, the header written before that data, and the file's
/// checksum.
#[derive(Debug, Clone)]
struct Held {
    checkpoint: CheckpointId,
    header: Vec<u8>,
    checksum: Checksum,
}

/// Spare capacity of the snapshot buffer beyond the variables: a shard's
/// header fits, so a whole shard file can be read into it.
pub const READ_ROOM: usize = 1 << 20;

/// The host memory the built-in trainer of `spec` takes: its weights and
/// both optimizer slots, and the snapshot buffer beside them (with room for
/// a shard's header), in bytes.
pub fn host_memory_need(spec: &flotilla_shared::spec::TrainerSpec) -> u64 {
    let vars = crate::trainer::BuiltinTrainer::model_variables(spec);
    let bytes: u64 = vars.iter().map(|v| v.byte_len() as u64).sum();
    2 * bytes + READ_ROOM as u64
}

/// A per-rank snapshot pipeline with one reusable buffer `B`: the
/// variables' bytes, packed in order (`as_ref()` is exactly that long).
pub struct Snapshotter<B = Vec<u8>> {
    bytes: usize,
    /// The buffer while no write is in flight.
    idle: Option<B>,
    /// The shard the idle buffer holds, if it holds a written one.
    held: Option<Held>,
    /// The read task in flight, if any (its number): given up as soon as
    /// the buffer is needed, a copy being worth less than a snapshot or a
    /// restore.
    reading: Option<u64>,
    /// Where the writer returns the buffer after a write (with the shard
    /// it now holds, when the write succeeded).
    returned: Receiver<(B, Option<Held>)>,
    jobs: Option<SyncSender<Job<B>>>,
    writer: Option<JoinHandle<()>>,
    /// Writes submitted so far; each job carries its number.
    submitted: u64,
    /// The checkpoint of the last write submitted.
    last_checkpoint: Option<CheckpointId>,
    /// Every job numbered up to this one is given up.
    cancel_through: Arc<AtomicU64>,
}

impl Snapshotter<Vec<u8>> {
    /// Builds the pipeline for `vars` (a trainer's variables, fixed for its
    /// life). `on_done` is called on the writer thread after each write,
    /// before the buffer is released.
    pub fn new(
        vars: Vec<VariableSpec>,
        on_done: impl FnMut(WriteOutcome) + Send + 'static,
    ) -> Result<Self, SnapshotError> {
        let bytes: usize = vars.iter().map(VariableSpec::byte_len).sum();
        // Touch every page now (on every core), so no checkpoint pays for
        // page faults; room for a shard's header too, so a restore can read
        // a whole shard file into the same memory
        let mut buffer = crate::trainer::try_zeroed::<u8>(bytes + READ_ROOM)
            .ok_or(SnapshotError::NoMemory { bytes: bytes + READ_ROOM })?;
        crate::trainer::fill_parallel(vec![&mut buffer], 1);
        buffer.truncate(bytes);
        Self::over(vars, buffer, on_done)
    }

    /// Takes a snapshot of `trainer` and hands it to the writer. Blocks only
    /// while the previous write still holds the buffer.
    pub fn snapshot(&mut self, trainer: &dyn Trainer, req: WriteRequest) -> Result<Stall, SnapshotError> {
        let got = trainer.snapshot_bytes();
        if got != self.bytes {
            return Err(SnapshotError::SizeChanged { got, want: self.bytes });
        }
        let start = Instant::now();
        let mut buf = self.acquire()?;
        let copying = Instant::now();
        trainer.snapshot_into(&mut buf);
        let stall = Stall { wait: copying - start, copy: copying.elapsed() };
        self.submit(req, buf)?;
        Ok(stall)
    }

    /// Lends the buffer (with at least [`READ_ROOM`] bytes of spare
    /// capacity) to `f` once no write is in flight, e.g. to read a shard
    /// into memory already touched; `f` hands a buffer back.
    pub fn with_buffer<T>(&mut self, f: impl FnOnce(Vec<u8>) -> (Vec<u8>, T)) -> Result<T, SnapshotError> {
        let buf = self.acquire()?;
        let (mut buf, out) = f(buf);
        buf.resize(self.bytes, 0);
        self.idle = Some(buf);
        Ok(out)
    }

    /// Whether the buffer holds the shard of checkpoint `id` (once the
    /// write in flight, if any, is done).
    pub fn holds(&mut self, id: CheckpointId) -> Result<bool, SnapshotError> {
        self.wait_idle()?;
        Ok(self.held.as_ref().is_some_and(|h| h.checkpoint == id))
    }

    /// The header of the shard the buffer holds, if it is checkpoint `id`'s.
    pub fn held_header(&mut self, id: CheckpointId) -> Result<Option<&[u8]>, SnapshotError> {
        // a restore asks: a copy being sent stops
        self.give_up_reads();
        self.wait_idle()?;
        Ok(self.held.as_ref().filter(|h| h.checkpoint == id).map(|h| h.header.as_slice()))
    }

    /// Lends `f` the whole file image of checkpoint `id`'s shard, built in
    /// place from the data the buffer holds (the header in front; the
    /// buffer's spare room takes it), if the buffer holds that shard; else
    /// `None` and nothing is touched. Afterwards the buffer holds no shard.
    pub fn with_image<T>(
        &mut self,
        id: CheckpointId,
        f: impl FnOnce(Vec<u8>) -> (Vec<u8>, T),
    ) -> Result<Option<T>, SnapshotError> {
        self.give_up_reads();
        if !self.holds(id)? {
            return Ok(None);
        }
        let header = self.held.take().map(|h| h.header).unwrap_or_default();
        let mut buf = self.take_buffer()?;
        let n = self.bytes;
        buf.resize(header.len() + n, 0);
        buf.copy_within(..n, header.len());
        buf[..header.len()].copy_from_slice(&header);
        let (mut buf, out) = f(buf);
        buf.resize(self.bytes, 0);
        self.idle = Some(buf);
        Ok(Some(out))
    }
}

impl<B: AsRef<[u8]> + Send + 'static> Snapshotter<B> {
    /// Builds the pipeline for `vars` over `buffer` (at least as long as
    /// the variables' bytes).
    pub fn over(
        vars: Vec<VariableSpec>,
        buffer: B,
        mut on_done: impl FnMut(WriteOutcome) + Send + 'static,
    ) -> Result<Self, SnapshotError> {
        let bytes: usize = vars.iter().map(VariableSpec::byte_len).sum();
        if buffer.as_ref().len() < bytes {
            return Err(SnapshotError::ShortBuffer { got: buffer.as_ref().len(), want: bytes });
        }
        let (returned_tx, returned) = sync_channel(1);
        let (jobs, job_rx) = sync_channel::<Job<B>>(1);
        let cancel_through = Arc::new(AtomicU64::new(0));
        let cancel = cancel_through.clone();
        let writer = std::thread::Builder::new()
            .name("flotilla-shard-writer".into())
            .spawn(move || {
                for job in job_rx {
                    let (req, buf, seq) = match job {
                        Job::Write(req, buf, seq) => (req, buf, seq),
                        Job::Read(task, buf, held, seq) => {
                            let cancelled = || cancel.load(Ordering::Acquire) >= seq;
                            task(&held.header, &buf.as_ref()[..bytes], held.checksum, &cancelled);
                            if returned_tx.send((buf, Some(held))).is_err() {
                                break;
                            }
                            continue;
                        }
                    };
                    let cancelled = || cancel.load(Ordering::Acquire) >= seq;
                    let start = Instant::now();
                    let meta = req.meta.clone();
                    let given_up = || ShardError {
                        shard: format!("checkpoint {} rank {}", req.meta.checkpoint, req.meta.rank),
                        kind: flotilla_shared::shard::ShardErrorKind::Cancelled,
                    };
                    let result = (if cancelled() { Err(given_up()) } else { Ok(()) })
                        .and_then(|()| {
                            req.path.parent().map_or(Ok(()), durable::create_dir_all_durable).map_err(
                                |source| ShardError {
                                    shard: format!(
                                        "checkpoint {} rank {}",
                                        req.meta.checkpoint, req.meta.rank
                                    ),
                                    kind: flotilla_shared::shard::ShardErrorKind::Io {
                                        op: "create directory for",
                                        path: req.path.display().to_string(),
                                        source,
                                    },
                                },
                            )
                        })
                        .and_then(|()| {
                            write_shard_keeping_header(
                                &req.path,
                                &req.meta,
                                &vars,
                                &buf.as_ref()[..bytes],
                                &cancelled,
                            )
                        });
                    // a write given up leaves nothing: not even the
                    // checkpoint's directory, if it made it and nothing
                    // else is in it (its checkpoint can no longer commit)
                    if result
                        .as_ref()
                        .is_err_and(|e| matches!(e.kind, flotilla_shared::shard::ShardErrorKind::Cancelled))
                    {
                        if let Some(dir) = req.path.parent() {
                            let _ = std::fs::remove_dir(dir);
                        }
                    }
                    // the buffer now holds this shard: its header (as
                    // written) goes back with it
                    let (result, held) = match result {
                        Ok((manifest, header)) => {
                            let held =
                                Held { checkpoint: meta.checkpoint, header, checksum: manifest.checksum };
                            (Ok(manifest), Some(held))
                        }
                        Err(e) => (Err(e), None),
                    };
                    on_done(WriteOutcome { meta, result, write_time: start.elapsed() });
                    if returned_tx.send((buf, held)).is_err() {
                        break;
                    }
                }
            })
            .map_err(SnapshotError::Thread)?;
        Ok(Self {
            bytes,
            idle: Some(buffer),
            held: None,
            reading: None,
            returned,
            jobs: Some(jobs),
            writer: Some(writer),
            submitted: 0,
            last_checkpoint: None,
            cancel_through,
        })
    }

    /// Size of the snapshot buffer.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The buffer, once no write is in flight (waits for the writer to
    /// return it): fill its first [`Snapshotter::bytes`] with the variables,
    /// then [`Snapshotter::submit`] it, or [`Snapshotter::give_back`] it.
    pub fn acquire(&mut self) -> Result<B, SnapshotError> {
        // whoever takes it overwrites it
        self.give_up_reads();
        let buf = self.take_buffer()?;
        self.held = None;
        Ok(buf)
    }

    /// Hands a filled buffer to the writer.
    pub fn submit(&mut self, req: WriteRequest, buf: B) -> Result<(), SnapshotError> {
        let jobs = self.jobs.as_ref().ok_or(SnapshotError::WriterGone)?;
        self.submitted += 1;
        self.last_checkpoint = Some(req.meta.checkpoint);
        jobs.send(Job::Write(req, buf, self.submitted)).map_err(|_| SnapshotError::WriterGone)
    }

    /// Gives up every write submitted so far that has not reached its
    /// fsync: a restore makes them useless (their checkpoint belongs to a
    /// generation being left) and needs the buffer now. Each ends with
    /// [`ShardErrorKind::Cancelled`](flotilla_shared::shard::ShardErrorKind)
    /// and leaves no file; a later write is not affected.
    pub fn cancel_writes(&self) {
        self.cancel_through.fetch_max(self.submitted, Ordering::AcqRel);
    }

    /// Gives up the write of checkpoint `id`, if it is the last one
    /// submitted and has not reached its fsync: the checkpoint was aborted,
    /// so its shard is garbage. Earlier writes are not affected.
    pub fn cancel_write_of(&self, id: CheckpointId) {
        if self.last_checkpoint == Some(id) {
            self.cancel_writes();
        }
    }

    /// Runs `task` on the writer thread with the shard of checkpoint `id`,
    /// if the buffer holds it (else `false`, and nothing runs): training
    /// goes on meanwhile; the next snapshot waits for the task, as for a
    /// write, and [`Snapshotter::cancel_writes`] tells it to stop (a
    /// restore). The buffer still holds the shard after it.
    pub fn read_held(&mut self, id: CheckpointId, task: ReadTask) -> Result<bool, SnapshotError> {
        self.wait_idle()?;
        let Some(held) = self.held.clone().filter(|h| h.checkpoint == id) else { return Ok(false) };
        let buf = self.take_buffer()?;
        let jobs = self.jobs.as_ref().ok_or(SnapshotError::WriterGone)?;
        self.submitted += 1;
        self.reading = Some(self.submitted);
        jobs.send(Job::Read(task, buf, held, self.submitted)).map_err(|_| SnapshotError::WriterGone)?;
        Ok(true)
    }

    /// Returns an acquired buffer unwritten (a snapshot given up).
    pub fn give_back(&mut self, buf: B) {
        self.idle = Some(buf);
    }

    /// Tells a read task in flight to stop (the buffer is needed).
    fn give_up_reads(&mut self) {
        if let Some(seq) = self.reading.take() {
            self.cancel_through.fetch_max(seq, Ordering::AcqRel);
        }
    }

    /// Waits until no write is in flight (every `on_done` has run).
    pub fn wait_idle(&mut self) -> Result<(), SnapshotError> {
        self.take_buffer().map(|buf| self.idle = Some(buf))
    }

    /// The buffer, waiting for the writer to return it if a write is in
    /// flight (and then noting which shard it holds).
    fn take_buffer(&mut self) -> Result<B, SnapshotError> {
        match self.idle.take() {
            Some(buf) => Ok(buf),
            None => {
                let (buf, held) = self.returned.recv().map_err(|_| SnapshotError::WriterGone)?;
                self.held = held;
                Ok(buf)
            }
        }
    }
}

impl<B> Drop for Snapshotter<B> {
    fn drop(&mut self) {
        // closing the job channel ends the writer after its current write
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::BuiltinTrainer;
    use flotilla_shared::ids::{CheckpointId, Generation, JobName, Rank};
    use flotilla_shared::shard::{Shard, ShardErrorKind};
    use flotilla_shared::spec::TrainerSpec;
    use std::sync::mpsc::channel;

    fn meta(c: u64, step: u64) -> ShardMeta {
        ShardMeta {
            job: JobName::new("t").unwrap(),
            checkpoint: CheckpointId(c),
            rank: Rank(0),
            step: flotilla_shared::ids::Step(step),
            generation: Generation(1),
        }
    }

    #[test]
    fn training_continues_while_writes_complete_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TrainerSpec { params_per_rank_bytes: 1 << 20, layers: 2, ..TrainerSpec::default() };
        let mut trainer = BuiltinTrainer::new(&spec, Rank(0));
        let (tx, rx) = channel();
        let mut snap = Snapshotter::new(trainer.variables().to_vec(), move |o| tx.send(o).unwrap()).unwrap();
        let mut digests = Vec::new();
        for c in 1..=3u64 {
            trainer.step();
            digests.push(trainer.digest());
            let path = dir.path().join(format!("ckpt-{c}/rank-00000.safetensors"));
            snap.snapshot(&trainer, WriteRequest { path, meta: meta(c, trainer.current_step().0) }).unwrap();
            // mutate right away: the shard must hold the state at snapshot time
            trainer.step();
        }
        snap.wait_idle().unwrap();
        let outcomes: Vec<WriteOutcome> = rx.try_iter().collect();
        assert_eq!(outcomes.len(), 3);
        for (i, o) in outcomes.into_iter().enumerate() {
            assert_eq!(o.meta.checkpoint, CheckpointId(i as u64 + 1));
            let manifest = o.result.unwrap();
            let path = dir.path().join(format!("ckpt-{}/rank-00000.safetensors", i + 1));
            let shard = Shard::read_verified(&path, "t", &manifest).unwrap();
            let mut fresh = BuiltinTrainer::new(&spec, Rank(0));
            fresh.load(&shard).unwrap();
            assert_eq!(fresh.digest(), digests[i]);
        }
    }

    #[test]
    fn the_buffer_holds_the_last_written_shard_byte_for_byte_until_it_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TrainerSpec { params_per_rank_bytes: 1 << 20, layers: 2, ..TrainerSpec::default() };
        let mut trainer = BuiltinTrainer::new(&spec, Rank(0));
        let (tx, rx) = channel();
        let mut snap = Snapshotter::new(trainer.variables().to_vec(), move |o| tx.send(o).unwrap()).unwrap();
        assert!(!snap.holds(CheckpointId(1)).unwrap(), "nothing written yet");
        trainer.step();
        let written = trainer.digest();
        let path = dir.path().join("ckpt-1/rank-00000.safetensors");
        let req = WriteRequest { path: path.clone(), meta: meta(1, trainer.current_step().0) };
        snap.snapshot(&trainer, req).unwrap();
        trainer.step();
        assert!(snap.holds(CheckpointId(1)).unwrap());
        assert!(!snap.holds(CheckpointId(2)).unwrap(), "only the checkpoint it wrote");
        let manifest = rx.recv().unwrap().result.unwrap();
        // the image is the file, byte for byte, and verifies as it does
        let file = std::fs::read(&path).unwrap();
        let mut fresh = BuiltinTrainer::new(&spec, Rank(0));
        let same = snap
            .with_image(CheckpointId(1), |image| {
                let same = image == file;
                let shard = Shard::verify_image(image, "t", &manifest.digest()).map_err(|r| r.error).unwrap();
                fresh.load(&shard).unwrap();
                (shard.into_buffer(), same)
            })
            .unwrap();
        assert_eq!(same, Some(true));
        assert_eq!(fresh.digest(), written);
        // lent once: the buffer no longer holds it
        assert!(!snap.holds(CheckpointId(1)).unwrap());
        assert!(snap.with_image(CheckpointId(1), |b| (b, ())).unwrap().is_none());
        // a corrupt image is refused, naming the tensor
        snap.snapshot(&trainer, WriteRequest { path, meta: meta(2, trainer.current_step().0) }).unwrap();
        let manifest = rx.recv().unwrap().result.unwrap();
        let refused = snap
            .with_image(CheckpointId(2), |mut image| {
                let last = image.len() - 1;
                image[last] ^= 1;
                match Shard::verify_image(image, "t", &manifest) {
                    Ok(shard) => (shard.into_buffer(), None),
                    Err(refused) => (refused.image, Some(refused.error.kind)),
                }
            })
            .unwrap()
            .flatten();
        assert!(matches!(refused, Some(ShardErrorKind::ChecksumMismatch(_))), "{refused:?}");
        // a write that failed leaves nothing held
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"x").unwrap();
        let req = WriteRequest { path: blocked.join("rank-00000.safetensors"), meta: meta(3, 0) };
        snap.snapshot(&trainer, req).unwrap();
        assert!(rx.recv().unwrap().result.is_err());
        assert!(!snap.holds(CheckpointId(3)).unwrap());
    }

    /// A 64 MiB trainer, its pipeline and the pipeline's outcomes.
    fn pipeline() -> (BuiltinTrainer, Snapshotter, std::sync::mpsc::Receiver<WriteOutcome>) {
        let spec = TrainerSpec { params_per_rank_bytes: 64 << 20, layers: 2, ..TrainerSpec::default() };
        let trainer = BuiltinTrainer::new(&spec, Rank(0));
        let (tx, rx) = channel();
        let snap = Snapshotter::new(trainer.variables().to_vec(), move |o| tx.send(o).unwrap()).unwrap();
        (trainer, snap, rx)
    }

    /// Writes checkpoints `ids` one by one, calling `stop` on each just
    /// after submitting it, until one is given up (and left no file). A
    /// write is told to stop while it still creates the directory (fsyncs)
    /// or writes its 64 MiB: a thread descheduled that long may lose the
    /// race once, not five times.
    fn gives_up_one(
        (trainer, snap, rx): &mut (BuiltinTrainer, Snapshotter, std::sync::mpsc::Receiver<WriteOutcome>),
        path: impl Fn(u64) -> PathBuf,
        ids: std::ops::RangeInclusive<u64>,
        stop: impl Fn(&Snapshotter, u64),
    ) -> bool {
        ids.into_iter().any(|c| {
            snap.snapshot(trainer, WriteRequest { path: path(c), meta: meta(c, 0) }).unwrap();
            stop(snap, c);
            // the buffer comes back at once: the restore can use it
            snap.with_buffer(|b| (b, ())).unwrap();
            match rx.recv().unwrap().result {
                Err(ShardError { kind: ShardErrorKind::Cancelled, .. }) => !path(c).exists(),
                other => {
                    other.unwrap();
                    false
                }
            }
        })
    }

    #[test]
    fn cancel_gives_up_the_write_in_flight_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pipeline();
        let path = |c: u64| dir.path().join(format!("ckpt-{c}/rank-00000.safetensors"));
        let cancelled = gives_up_one(&mut p, path, 1..=5, |snap, _| snap.cancel_writes());
        assert!(cancelled, "no write in flight was given up");
        // a write submitted after the cancel lands
        let (trainer, mut snap, rx) = p;
        snap.snapshot(&trainer, WriteRequest { path: path(9), meta: meta(9, 0) }).unwrap();
        snap.wait_idle().unwrap();
        let manifest = rx.recv().unwrap().result.unwrap();
        Shard::read_verified(&path(9), "t", &manifest).unwrap();
    }

    #[test]
    fn an_abort_gives_up_the_write_of_its_checkpoint_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pipeline();
        let path = |c: u64| dir.path().join(format!("ckpt-{c}/rank-00000.safetensors"));
        // an abort of another checkpoint leaves this write alone
        {
            let (trainer, snap, rx) = &mut p;
            snap.snapshot(trainer, WriteRequest { path: path(1), meta: meta(1, 0) }).unwrap();
            snap.cancel_write_of(CheckpointId(2));
            snap.wait_idle().unwrap();
            let manifest = rx.recv().unwrap().result.unwrap();
            Shard::read_verified(&path(1), "t", &manifest).unwrap();
        }
        // its own abort gives it up
        let cancelled = gives_up_one(&mut p, path, 2..=6, |snap, c| snap.cancel_write_of(CheckpointId(c)));
        assert!(cancelled, "the aborted checkpoint's write was not given up");
    }

    #[test]
    fn write_failure_is_reported_not_swallowed() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let spec = TrainerSpec { params_per_rank_bytes: 64 << 10, layers: 1, ..TrainerSpec::default() };
        let trainer = BuiltinTrainer::new(&spec, Rank(0));
        let (tx, rx) = channel();
        let mut snap = Snapshotter::new(trainer.variables().to_vec(), move |o| tx.send(o).unwrap()).unwrap();
        // a path below a regular file cannot be created
        let path = blocker.join("ckpt-1/rank-00000.safetensors");
        snap.snapshot(&trainer, WriteRequest { path, meta: meta(1, 0) }).unwrap();
        snap.wait_idle().unwrap();
        let err = rx.recv().unwrap().result.unwrap_err();
        assert!(err.to_string().starts_with("checkpoint 1 rank 0: create directory for"), "{err}");
    }

    #[test]
    fn size_change_is_refused() {
        let spec = TrainerSpec { params_per_rank_bytes: 64 << 10, layers: 1, ..TrainerSpec::default() };
        let trainer = BuiltinTrainer::new(&spec, Rank(0));
        let mut snap = Snapshotter::new(trainer.variables()[..2].to_vec(), |_| {}).unwrap();
        let req = WriteRequest { path: "/nonexistent/x".into(), meta: meta(1, 0) };
        assert!(matches!(snap.snapshot(&trainer, req), Err(SnapshotError::SizeChanged { .. })));
    }
}
