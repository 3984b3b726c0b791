//! `flotilla demo` (SPEC §7): a whole local cluster as child processes,
//! one injected failure, and the proof that the resumed run is the same run.

use crate::cmd::count;
use anyhow::{bail, Context, Result};
use flotilla_coordinator::api::{JobStatus, StepSource};
use flotilla_coordinator::client::Client;
use flotilla_coordinator::ledger::{JobEventKind, JobState};
use flotilla_coordinator::raft::node::Role;
use flotilla_coordinator::supervise::{RecoveryView, SpareState};
use flotilla_coordinator::testkit::local::{LocalCluster, LocalOptions, LocalWorkers};
use flotilla_shared::ids::Generation;
use flotilla_shared::spec::JobSpec;
use flotilla_worker::trainer::reference_digest;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The demo's knobs (SPEC §7).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Coordinator replicas.
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    /// Workers (ranks).
    #[arg(long, default_value_t = 4)]
    workers: u32,
    /// Training steps.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Bytes of variables per rank.
    #[arg(long, default_value_t = 4 << 20)]
    params_per_rank_bytes: u64,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 100)]
    every_steps: u64,
    /// SIGKILL a worker when the job reaches this step (default: mid-run; 0: never).
    #[arg(long)]
    kill_worker_at: Option<u64>,
    /// SIGKILL the coordinator leader when the job reaches this step.
    #[arg(long)]
    kill_leader_at: Option<u64>,
    /// Working directory (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the processes' logs and checkpoints.
    #[arg(long)]
    keep: bool,
    /// Drop the page cache (root) just before the worker SIGKILL, so the
    /// restore reads every shard from the disk.
    #[arg(long)]
    cold_restore: bool,
    /// Hot spares (SPEC §11): with one or more, the killed worker is never
    /// restarted and a spare takes its rank over.
    #[arg(long, default_value_t = 0)]
    spares: u32,
    /// `[checkpoint] memory_copies`: copies of each rank's shard in other
    /// workers' memory (0: the memory tier off, every restore reads storage).
    #[arg(long, default_value_t = 1)]
    memory_copies: u32,
}

/// The phases of the restore after the worker kill, each as a duration
/// from the previous one ("?" where the leader that finished it did not see
/// it start: a failover in between).
struct Phases {
    detect: String,
    committed: String,
    restored: String,
    training: String,
}

impl Phases {
    fn new(killed_ms: u64, r: &RecoveryView) -> Self {
        let span = |from: Option<u64>, to: Option<u64>| match (from, to) {
            (Some(a), Some(b)) => format!("{} ms", b.saturating_sub(a)),
            _ => "?".into(),
        };
        Self {
            detect: span(Some(killed_ms), r.decided_ms),
            committed: span(r.decided_ms, r.committed_ms),
            restored: span(r.committed_ms, r.restored_ms),
            training: span(r.restored_ms, Some(r.running_ms)),
        }
    }
}

struct Progress {
    tty: bool,
    last_line: Instant,
}

impl Progress {
    fn show(&mut self, job: &JobStatus, total: u64) {
        let step = job.step.0.min(total);
        // while the leader does not hear every rank (just after a failover)
        // the step is the latest committed checkpoint's: say so
        let from = match job.step_source {
            StepSource::Checkpoint => " (checkpoint)",
            StepSource::Ranks | StepSource::Finished => "",
        };
        if self.tty {
            let width = 40;
            let filled = (step * width / total.max(1)) as usize;
            print!(
                "\r[{}{}] step {step}/{total}{}  gen {}  {}  ckpts {}   ",
                "#".repeat(filled),
                "-".repeat(width as usize - filled),
                from,
                job.generation,
                job.state,
                job.checkpoints_committed
            );
            let _ = std::io::stdout().flush();
        } else if self.last_line.elapsed() > Duration::from_secs(1) {
            self.last_line = Instant::now();
            println!(
                "step {step}/{total}{from}, generation {}, {}, {} committed",
                job.generation,
                job.state,
                count(job.checkpoints_committed, "checkpoint")
            );
        }
    }

    fn say(&mut self, msg: &str) {
        if self.tty {
            println!();
        }
        println!("{msg}");
    }
}

/// Runs the demo; `Ok(true)` when the final digest matches the reference.
pub async fn run(args: DemoArgs) -> Result<bool> {
    if args.coordinators == 0 || args.workers == 0 || args.steps < 2 {
        // bad usage (exit 2), as every flag value out of its range
        return Err(crate::cmd::Usage(
            "--coordinators and --workers must be at least 1, --steps at least 2".into(),
        )
        .into());
    }
    let temp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create --dir {}", d.display()))?;
            None
        }
        None => Some(tempfile::Builder::new().prefix("flotilla-demo-").tempdir()?),
    };
    let dir = args.dir.clone().unwrap_or_else(|| temp.as_ref().expect("temp dir").path().to_path_buf());
    let root = dir.join("checkpoints");
    let spec_text = format!(
        "name = \"demo\"\nworld_size = {}\n\n[checkpoint]\nevery_steps = {}\nkeep_last = 3\nroot = \"{}\"\ntimeout_seconds = 60\nmemory_copies = {}\n\n\
         [failure]\nheartbeat_interval_ms = 250\nheartbeat_timeout_ms = 1500\nmax_restarts = 10\nspares = {}\n\n\
         [trainer]\ntotal_steps = {}\nparams_per_rank_bytes = {}\nlayers = 4\nstep_time_ms = 5\nseed = 42\n",
        args.workers,
        args.every_steps,
        root.display(),
        args.memory_copies,
        args.spares,
        args.steps,
        args.params_per_rank_bytes
    );
    let spec = JobSpec::from_toml(&spec_text).context("demo job spec")?;
    std::fs::write(dir.join("job.toml"), &spec_text)?;
    let trainer = spec.trainer.clone().expect("the demo spec has a trainer");
    let kill_worker_at = args.kill_worker_at.unwrap_or(args.steps / 2);

    let bin = std::env::current_exe()?;
    println!(
        "flotilla demo: {} coordinators, {} workers, {} steps, {} bytes per rank, in {}",
        args.coordinators,
        args.workers,
        args.steps,
        args.params_per_rank_bytes,
        dir.display()
    );
    // the failure-free reference, computed while the cluster runs
    let world = args.workers;
    let reference = tokio::task::spawn_blocking(move || reference_digest(&trainer, world));

    let opts = LocalOptions { log_filter: Some("info".into()), ..LocalOptions::default() };
    let mut cluster = LocalCluster::start(&bin, &dir, args.coordinators, opts)?;
    let mut leader = cluster.wait_for_leader(Duration::from_secs(30)).await.map_err(anyhow::Error::msg)?;
    let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
    client.submit(&spec_text).await?;
    let mut workers = LocalWorkers::new(&bin, &dir, cluster.api_endpoints(), "demo", args.workers);
    for rank in 0..args.workers {
        workers.spawn(rank, &[])?;
    }
    for _ in 0..args.spares {
        workers.spawn_spare(&[])?;
    }
    println!(
        "cluster up: leader is coordinator {leader}; job submitted; {} workers and {} started",
        args.workers,
        count(args.spares.into(), "spare")
    );

    let mut progress = Progress { tty: std::io::stdout().is_terminal(), last_line: Instant::now() };
    let mut failures = 0;
    // when (ms since the epoch) and in which generation the worker was killed
    let mut killed_worker: Option<(u64, u64)> = None;
    let mut recovery: Option<Duration> = None;
    let mut seen_after: Option<u64> = None;
    let mut phases: Option<Phases> = None;
    let mut holders: Option<String> = None;
    let mut leader_killed = false;
    let deadline = Instant::now() + Duration::from_secs(600);
    let job = loop {
        if Instant::now() > deadline {
            bail!("the demo job did not finish within 10 minutes; logs are in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(status) = client.status(Some("demo")).await else { continue };
        let Some(job) = status.jobs.into_iter().next() else { continue };
        progress.show(&job, args.steps);
        match job.state {
            JobState::Succeeded => break job,
            JobState::Failed => bail!("the job failed: {}", job.error.unwrap_or_default()),
            _ => {}
        }
        if let (Some((killed_wall_ms, generation)), None) = (killed_worker, recovery) {
            // running_since_ms follows the ledger within a tick of the leader
            if job.generation.0 > generation
                && job.state == JobState::Running
                && job.running_since_ms.is_some()
            {
                // measured where it happened: the leader's time of seeing the
                // job running again (this host's clock is the leader's), not
                // when this loop's 100 ms poll noticed
                let since = job.running_since_ms.unwrap_or_default();
                recovery = Some(Duration::from_millis(since.saturating_sub(killed_wall_ms)));
                // the ledger records when the leader saw the failure (the
                // restore's proposal); this host's clock is the leader's
                let next = Generation(generation + 1);
                seen_after = job
                    .events
                    .iter()
                    .find(|e| matches!(e.kind, Some(JobEventKind::Restore { generation, .. }) if generation == next))
                    .map(|e| e.at_ms.saturating_sub(killed_wall_ms));
                phases = job
                    .last_recovery
                    .filter(|r| r.generation == job.generation)
                    .map(|r| Phases::new(killed_wall_ms, &r));
                if args.spares > 0 {
                    let on: Vec<String> = job
                        .workers
                        .iter()
                        .map(|w| format!("rank {}: {}", w.rank, w.host.as_deref().unwrap_or("?")))
                        .collect();
                    holders = Some(on.join(", "));
                }
                progress.say(&format!(
                    "all ranks training again in generation {} from {} after {:.2} s",
                    job.generation,
                    job.restored_from
                        .map_or("step 0".into(), |c| format!("checkpoint {} (step {})", c.id, c.step)),
                    recovery.unwrap_or_default().as_secs_f64()
                ));
            }
        }
        // with spares, the kill waits for every spare to be ready: the
        // demo shows a takeover, not a race with a spare still starting
        let spares_ready =
            job.spares.iter().filter(|s| s.state == SpareState::Ready).count() >= args.spares as usize;
        if kill_worker_at > 0
            && killed_worker.is_none()
            && job.state == JobState::Running
            && job.step.0 >= kill_worker_at
            && spares_ready
        {
            let rank = 1 % args.workers;
            if args.cold_restore {
                flotilla_worker::bench::drop_page_cache().context("--cold-restore")?;
            }
            workers.kill(rank);
            failures += 1;
            let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            killed_worker = Some((now_ms, job.generation.0));
            if args.spares == 0 {
                progress.say(&format!("step {}: SIGKILL worker rank {rank}; restarting it", job.step));
                workers.spawn(rank, &[])?;
            } else {
                progress.say(&format!(
                    "step {}: SIGKILL worker rank {rank} for good; a spare takes its rank",
                    job.step
                ));
            }
        }
        if let Some(at) = args.kill_leader_at {
            if !leader_killed && job.step.0 >= at {
                leader_killed = true;
                failures += 1;
                cluster.kill(leader);
                progress.say(&format!("step {}: SIGKILL coordinator leader {leader}", job.step));
                let new_leader =
                    cluster.wait_for_leader(Duration::from_secs(30)).await.map_err(anyhow::Error::msg)?;
                cluster.spawn(leader)?;
                progress.say(&format!("coordinator {new_leader} leads; {leader} restarted on its data dir"));
                leader = new_leader;
            }
        }
        let _ = status.role == Role::Leader;
    };
    progress.say("job succeeded");
    let reference = reference.await?;
    let matches = job.final_digest.as_deref() == Some(reference.as_str());
    println!();
    println!("checkpoints committed:   {}", job.checkpoints_committed);
    println!("failures injected:       {failures} (whole-job restores: {})", job.restores);
    println!(
        "restored from:           {}",
        job.restored_from.map_or("step 0 (no checkpoint before the failure)".into(), |c| format!(
            "checkpoint {} at step {}{}",
            c.id,
            c.step,
            c.source.map_or(String::new(), |s| format!(" (the slowest rank's shard from {s})"))
        ))
    );
    println!(
        "failure to training:     {}",
        recovery.map_or("n/a".into(), |d| format!(
            "{:.2} s{}",
            d.as_secs_f64(),
            seen_after.map_or(String::new(), |ms| format!(" (the leader saw the failure after {ms} ms)"))
        ))
    );
    if let Some(p) = phases {
        println!("  detect:                {}", p.detect);
        println!("  restore committed:     {}", p.committed);
        println!("  shards restored:       {}", p.restored);
        println!("  training:              {}", p.training);
    }
    if let Some(h) = &holders {
        println!("after it, ranks live on: {h}");
    }
    println!("final digest:            {}", job.final_digest.as_deref().unwrap_or("none"));
    println!("failure-free reference:  {reference}");
    println!(
        "{}",
        if matches { "MATCH: the resumed run is the same run" } else { "MISMATCH: the resumed run diverged" }
    );
    drop(workers);
    drop(cluster);
    if args.keep || args.dir.is_some() {
        if let Some(t) = temp {
            let kept = t.keep();
            println!("kept logs and checkpoints in {}", kept.display());
        } else {
            println!("logs and checkpoints are in {}", dir.display());
        }
    }
    Ok(matches)
}
