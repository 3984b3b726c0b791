//! `flotilla bench snapshot`: what a checkpoint costs one rank, against
//! baselines measured in the same run.
//!
//! Each run, in alternating order so drift of the (noisy, shared) disk hits
//! both alike:
//! - **baseline**: a plain sequential write of the same number of bytes in
//!   1 MiB blocks, then `fdatasync` (what `dd bs=1M conv=fdatasync` does);
//! - **snapshot**: the built-in trainer's variables through the real
//!   [`Snapshotter`]: the stall (a copy into the host buffer), then the
//!   background write (checksums, write, fsync, rename, directory fsync),
//!   with the CPU trainer stepping alongside if asked; then a read of the shard, into a buffer
//!   touched beforehand as a worker's restore does, with every checksum
//!   verified.
//!
//! Figures are medians over the runs (after unrecorded warm-up runs); ratios
//! are medians of per-run ratios.

use crate::snapshot::{Snapshotter, WriteOutcome, WriteRequest};
use crate::trainer::{BuiltinTrainer, Trainer};
use flotilla_shared::ids::{CheckpointId, Generation, JobName, Rank};
use flotilla_shared::layout::JobDir;
use flotilla_shared::shard::{Shard, ShardMeta};
use flotilla_shared::spec::TrainerSpec;
use serde::Serialize;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, TryRecvError};
use std::time::{Duration, Instant};

/// Options of `bench snapshot`.
#[derive(Debug, Clone)]
pub struct SnapshotBenchOptions {
    /// Shard size to aim for (the trainer's `params_per_rank_bytes`).
    pub bytes: u64,
    /// Directory on the storage to measure; files are removed afterwards.
    pub dir: PathBuf,
    /// Number of interleaved runs.
    pub runs: usize,
    /// Runs done first and not recorded. On a VM whose host backs guest
    /// memory lazily, a process's first large write also pays for faulting
    /// in fresh page-cache memory; a worker checkpoints many times, so the
    /// steady state is what matters.
    pub warmup: usize,
    /// Drop the page cache before each read (needs root).
    pub cold_read: bool,
    /// Keep the built-in trainer stepping on the CPU while the shard is
    /// written. Off by default: a real trainer computes on its accelerator
    /// while the host writes, but this one would take a whole core (of two
    /// here) and the memory bandwidth away from the write, which measures
    /// the machine, not the pipeline.
    pub train_during_write: bool,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRun {
    /// Training stall of the snapshot (back-pressure wait + copy).
    pub stall_seconds: f64,
    /// A plain memory copy of the same bytes.
    pub memcpy_seconds: f64,
    /// The background write: checksums, write, fsync, rename, dir fsync.
    pub write_seconds: f64,
    /// Read of the whole shard plus verification of every checksum.
    pub read_verify_seconds: f64,
    /// A plain single-threaded read of the same file into the same buffer,
    /// no checksum (the baseline of the read + verify).
    pub plain_read_seconds: f64,
    /// The plain sequential write + fdatasync of the same bytes.
    pub baseline_write_seconds: f64,
    /// Training steps completed while the write was in flight.
    pub steps_during_write: u64,
}

/// The report (`--json` prints it; keys per SPEC §8).
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotBenchReport {
    /// Size of the shard file written.
    pub bytes: u64,
    /// Number of recorded runs.
    pub runs: usize,
    /// Unrecorded warm-up runs before them.
    pub warmup: usize,
    /// Median training stall per checkpoint.
    pub stall_seconds: f64,
    /// Median plain memory copy of the same bytes.
    pub memcpy_seconds: f64,
    /// Median background write time.
    pub write_seconds: f64,
    /// Shard write throughput, fsync included (MB = 10^6 bytes).
    pub write_mb_per_s: f64,
    /// Read + verify throughput.
    pub read_verify_mb_per_s: f64,
    /// Plain single-threaded read throughput of the same file, same run.
    pub plain_read_mb_per_s: f64,
    /// Median over runs of read + verify time / plain read time.
    pub read_verify_vs_plain_read: f64,
    /// Plain sequential write + fdatasync throughput, same run.
    pub baseline_write_mb_per_s: f64,
    /// Median over runs of write throughput / baseline throughput.
    pub write_vs_baseline: f64,
    /// Median over runs of stall / background write time.
    pub stall_vs_write: f64,
    /// Whether reads started from a dropped page cache.
    pub cold_read: bool,
    /// Whether the CPU trainer kept stepping during the writes.
    pub train_during_write: bool,
    /// Every run, in order.
    pub samples: Vec<SnapshotRun>,
}

/// Median of a non-empty set of samples.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Writes `bytes` sequentially in 1 MiB blocks and fdatasyncs: the baseline.
fn plain_write(path: &Path, bytes: u64) -> io::Result<Duration> {
    let block = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut file = File::create(path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.sync_data()?;
    let took = start.elapsed();
    drop(file);
    fs::remove_file(path)?;
    Ok(took)
}

/// Writes back dirty pages, then drops the whole page cache (root only).
pub fn drop_page_cache() -> io::Result<()> {
    // dirty pages first, or they would survive the drop
    let status = std::process::Command::new("sync").status()?;
    if !status.success() {
        return Err(io::Error::other("sync failed"));
    }
    fs::write("/proc/sys/vm/drop_caches", "3\n")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot drop the page cache ({e}); --cold needs root")))
}

/// Runs the benchmark.
pub fn snapshot_bench(opts: &SnapshotBenchOptions) -> io::Result<SnapshotBenchReport> {
    if opts.runs == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "--runs must be at least 1"));
    }
    let spec = TrainerSpec { params_per_rank_bytes: opts.bytes, ..TrainerSpec::default() };
    let mut trainer = BuiltinTrainer::new(&spec, Rank(0));
    fs::create_dir_all(&opts.dir)?;
    let job = JobName::new("bench").expect("valid name");
    let job_dir = JobDir::new(&opts.dir, &job);

    let (tx, rx) = channel::<WriteOutcome>();
    let mut snap = Snapshotter::new(trainer.variables().to_vec(), move |o| {
        let _ = tx.send(o);
    })
    .map_err(io::Error::other)?;
    let mut copy_dst = vec![1u8; snap.bytes()];
    // reads go into memory touched beforehand, as a worker restores into its
    // snapshot buffer; room for the header too
    let mut read_buf = vec![1u8; snap.bytes() + (1 << 20)];
    let mut copy_src = vec![2u8; snap.bytes()];
    trainer.snapshot_into(&mut copy_src);

    let mut samples = Vec::with_capacity(opts.runs);
    let mut file_bytes = 0;
    for run in 0..opts.warmup + opts.runs {
        let memcpy = {
            let start = Instant::now();
            copy_dst.copy_from_slice(&copy_src);
            std::hint::black_box(&copy_dst);
            start.elapsed()
        };
        let baseline_path = opts.dir.join(format!(".flotilla-bench-baseline-{}", std::process::id()));
        // the baseline writes exactly as many bytes as the shard file has;
        // before the first shard exists, use the data size (header is ~10 KiB)
        let baseline_bytes = if file_bytes > 0 { file_bytes } else { snap.bytes() as u64 };
        let mut baseline = None;
        if run % 2 == 0 {
            baseline = Some(plain_write(&baseline_path, baseline_bytes)?);
        }

        trainer.step();
        let id = CheckpointId(run as u64 + 1);
        let path = job_dir.shard_path(id, Rank(0));
        let meta = ShardMeta {
            job: job.clone(),
            checkpoint: id,
            rank: Rank(0),
            step: trainer.current_step(),
            generation: Generation(1),
        };
        let stall =
            snap.snapshot(&trainer, WriteRequest { path: path.clone(), meta }).map_err(io::Error::other)?;
        let mut steps_during_write = 0;
        let outcome = if opts.train_during_write {
            // training goes on while the shard is written
            loop {
                match rx.try_recv() {
                    Ok(outcome) => break outcome,
                    Err(TryRecvError::Empty) => {
                        trainer.step();
                        steps_during_write += 1;
                    }
                    Err(TryRecvError::Disconnected) => return Err(io::Error::other("shard writer stopped")),
                }
            }
        } else {
            rx.recv().map_err(|_| io::Error::other("shard writer stopped"))?
        };
        let manifest = outcome.result.map_err(io::Error::other)?;
        file_bytes = manifest.bytes;

        if opts.cold_read {
            drop_page_cache()?;
        }
        let start = Instant::now();
        let shard = Shard::read_verified_into(&path, "bench shard", &manifest, std::mem::take(&mut read_buf))
            .map_err(io::Error::other)?;
        let read_verify = start.elapsed();
        read_buf = shard.into_buffer();
        if opts.cold_read {
            drop_page_cache()?;
        }
        let plain_read = {
            use std::io::Read;
            let start = Instant::now();
            fs::File::open(&path)?.read_exact(&mut read_buf[..file_bytes as usize])?;
            std::hint::black_box(&read_buf);
            start.elapsed()
        };
        fs::remove_dir_all(job_dir.checkpoint_dir(id))?;

        let baseline = match baseline {
            Some(b) => b,
            None => plain_write(&baseline_path, file_bytes)?,
        };
        if run < opts.warmup {
            continue;
        }
        samples.push(SnapshotRun {
            stall_seconds: stall.total().as_secs_f64(),
            memcpy_seconds: memcpy.as_secs_f64(),
            write_seconds: outcome.write_time.as_secs_f64(),
            read_verify_seconds: read_verify.as_secs_f64(),
            plain_read_seconds: plain_read.as_secs_f64(),
            baseline_write_seconds: baseline.as_secs_f64(),
            steps_during_write,
        });
    }
    let _ = fs::remove_dir(job_dir.path());

    let mb = file_bytes as f64 / 1e6;
    let med = |f: fn(&SnapshotRun) -> f64| median(samples.iter().map(f).collect());
    Ok(SnapshotBenchReport {
        bytes: file_bytes,
        runs: opts.runs,
        warmup: opts.warmup,
        stall_seconds: med(|s| s.stall_seconds),
        memcpy_seconds: med(|s| s.memcpy_seconds),
        write_seconds: med(|s| s.write_seconds),
        write_mb_per_s: mb / med(|s| s.write_seconds),
        read_verify_mb_per_s: mb / med(|s| s.read_verify_seconds),
        plain_read_mb_per_s: mb / med(|s| s.plain_read_seconds),
        read_verify_vs_plain_read: med(|s| s.read_verify_seconds / s.plain_read_seconds),
        baseline_write_mb_per_s: mb / med(|s| s.baseline_write_seconds),
        write_vs_baseline: med(|s| s.baseline_write_seconds / s.write_seconds),
        stall_vs_write: med(|s| s.stall_seconds / s.write_seconds),
        cold_read: opts.cold_read,
        train_during_write: opts.train_during_write,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn small_bench_runs_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let report = snapshot_bench(&SnapshotBenchOptions {
            bytes: 1 << 20,
            dir: dir.path().to_path_buf(),
            runs: 2,
            warmup: 1,
            cold_read: false,
            train_during_write: true,
        })
        .unwrap();
        assert_eq!(report.samples.len(), 2);
        assert!(report.samples.iter().all(|s| s.steps_during_write > 0 || s.write_seconds < 0.05));
        assert!(report.bytes > 900_000 && report.bytes <= (1 << 20) + 16_384, "{}", report.bytes);
        assert!(report.write_mb_per_s > 0.0 && report.baseline_write_mb_per_s > 0.0);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "bench left files behind");
    }
}
