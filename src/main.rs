//! `flotilla`: the one binary. Parses the command line and calls into the
//! crates; nothing here decides anything.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use flotilla_shared::inspect::inspect;
use flotilla_worker::bench::{snapshot_bench, SnapshotBenchOptions, SnapshotBenchReport};
use std::path::PathBuf;
use std::process::ExitCode;

/// Fault-tolerant training orchestrator: consistent checkpoints, whole-job restore.
#[derive(Parser)]
#[command(name = "flotilla", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists a checkpoint's variables per rank (offline); --verify re-checks every checksum.
    Inspect(InspectArgs),
    /// The performance harness.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct InspectArgs {
    /// A job's checkpoint root (<root>/<job>, uses LATEST), a ckpt-* directory or one shard file.
    path: PathBuf,
    /// Re-read every shard and verify every checksum against MANIFEST.json.
    #[arg(long)]
    verify: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One rank's checkpoint: training stall, shard write and read+verify, against a plain write + fsync.
    Snapshot(SnapshotArgs),
}

#[derive(Args)]
struct SnapshotArgs {
    /// Shard size in bytes (the built-in trainer's params_per_rank_bytes).
    #[arg(long, default_value_t = 256 << 20)]
    bytes: u64,
    /// Directory on the storage to measure (files are removed afterwards).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("flotilla-bench"))]
    dir: PathBuf,
    /// Interleaved runs; figures are medians.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Unrecorded runs first (a process's first large write also faults in fresh memory).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Drop the page cache before each read (needs root).
    #[arg(long)]
    cold: bool,
    /// Keep the CPU trainer stepping while shards are written (on a small
    /// machine this measures CPU and memory-bandwidth contention as well).
    #[arg(long)]
    train_during_write: bool,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(args) => run_inspect(args),
        Command::Bench(BenchCommand::Snapshot(args)) => run_bench_snapshot(args),
    }
}

fn run_inspect(args: InspectArgs) -> Result<()> {
    let found = inspect(&args.path)?;
    match &found.manifest {
        Some(m) => println!(
            "checkpoint {} of job {}: step {}, generation {}, {} ranks, {} bytes, committed {}",
            m.id,
            m.job,
            m.step,
            m.generation,
            m.world_size,
            m.bytes(),
            m.created
        ),
        None => println!(
            "{}: NOT COMMITTED (no MANIFEST.json): a partial or aborted checkpoint, never restored from",
            found.dir.display()
        ),
    }
    for (file, header) in &found.shards {
        let entry = found
            .manifest
            .as_ref()
            .and_then(|m| m.ranks.iter().find(|r| file.ends_with(&r.file)));
        println!(
            "rank {} {} step {} generation {} {} bytes{}",
            header.meta.rank,
            file.display(),
            header.meta.step,
            header.meta.generation,
            header.file_len,
            entry
                .map(|e| format!(" {}", e.checksum))
                .unwrap_or_default()
        );
        let width = header
            .tensors
            .iter()
            .map(|(v, _)| v.name.len())
            .max()
            .unwrap_or(0);
        for (var, range) in &header.tensors {
            println!(
                "  {:width$}  {:4}  {:16}  {}",
                var.name,
                var.dtype.to_string(),
                format!("{:?}", var.shape),
                range.len()
            );
        }
    }
    if args.verify {
        let n = found.verify()?;
        println!(
            "verified: {} shards, {n} variables, every checksum matches",
            found.shards.len()
        );
    }
    Ok(())
}

fn run_bench_snapshot(args: SnapshotArgs) -> Result<()> {
    if args.bytes < 1 << 20 {
        bail!(
            "--bytes {} is too small to measure; use at least 1048576",
            args.bytes
        );
    }
    let report = snapshot_bench(&SnapshotBenchOptions {
        bytes: args.bytes,
        dir: args.dir.clone(),
        runs: args.runs,
        warmup: args.warmup,
        cold_read: args.cold,
        train_during_write: args.train_during_write,
    })
    .with_context(|| format!("bench snapshot in {}", args.dir.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_snapshot_table(&report);
    }
    Ok(())
}

fn print_snapshot_table(r: &SnapshotBenchReport) {
    let mb = r.bytes as f64 / 1e6;
    println!(
        "bench snapshot: one {} byte shard, {} interleaved runs after {} warm-up, medians",
        r.bytes, r.runs, r.warmup
    );
    println!("{:<34} {:>10} {:>10}", "", "seconds", "MB/s");
    let row = |name: &str, secs: f64| println!("{name:<34} {secs:>10.3} {:>10.0}", mb / secs);
    row("training stall (copy to buffer)", r.stall_seconds);
    row("plain memcpy of the same bytes", r.memcpy_seconds);
    row("shard write (checksums + fsync)", r.write_seconds);
    row(
        "baseline: write + fdatasync",
        mb / r.baseline_write_mb_per_s,
    );
    row(
        if r.cold_read {
            "read + verify (cold cache)"
        } else {
            "read + verify (warm cache)"
        },
        mb / r.read_verify_mb_per_s,
    );
    println!(
        "shard write vs baseline: {:.2}x   stall vs write: {:.3}x   training during writes: {}",
        r.write_vs_baseline,
        r.stall_vs_write,
        if r.train_during_write {
            "yes"
        } else {
            "no (--train-during-write)"
        }
    );
}
