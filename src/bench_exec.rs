//! `flotilla bench exec -- CMD...`: a real local cluster (3 coordinators,
//! N `--exec` workers running CMD) and, `--kills` times, one rank's trainer
//! process SIGKILLed: the time until every rank trains again in the new
//! generation, split into detection (the coordinator's generation moved)
//! and the rest (stop, restart, restore checks, load, rendezvous). Each
//! rank's progress is read from its worker's own status (updated on every
//! step the trainer reports), polled every 5 ms. With `--kills 0` it runs
//! the job to its end (for trainers that measure themselves, e.g.
//! examples/numpy/bench_stall.py).

use anyhow::{bail, Context, Result};
use clap::Args;
use flotilla_coordinator::api::JobStatus;
use flotilla_coordinator::client::Client;
use flotilla_coordinator::testkit::local::{signal, LocalCluster, LocalOptions, LocalWorkers};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `flotilla bench exec` flags.
#[derive(Args)]
pub struct ExecBenchArgs {
    /// Workers (ranks), each running CMD.
    #[arg(long, default_value_t = 4)]
    workers: u32,
    /// Trainer processes to SIGKILL, one at a time (0: run the job to its end).
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// `checkpoint.every_steps` of the job.
    #[arg(long, default_value_t = 50)]
    every_steps: u64,
    /// `failure.heartbeat_interval_ms` of the job.
    #[arg(long, default_value_t = 500)]
    heartbeat_interval_ms: u64,
    /// Environment for the workers (and so their trainers): KEY=VALUE, repeatable.
    #[arg(long = "env", value_parser = parse_env)]
    envs: Vec<(String, String)>,
    /// Where the cluster keeps its data, logs and checkpoints (a temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The trainer command, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("--env {s:?}: expected KEY=VALUE"))
}

const JOB: &str = "bench-exec";

/// Runs the benchmark and prints its figures.
pub async fn run(args: ExecBenchArgs) -> Result<()> {
    let temp = tempfile::Builder::new().prefix("flotilla-bench-exec-").tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let spec = format!(
        "name = \"{JOB}\"\nworld_size = {}\n\n[checkpoint]\nevery_steps = {}\nkeep_last = 2\nroot = \"{}\"\ntimeout_seconds = 120\n\n\
         [failure]\nheartbeat_interval_ms = {}\nmax_restarts = {}\n",
        args.workers,
        args.every_steps,
        dir.join("checkpoints").display(),
        args.heartbeat_interval_ms,
        args.kills + 10
    );
    let bin = std::env::current_exe()?;
    let cluster = LocalCluster::start(&bin, &dir, 3, LocalOptions::default())?;
    cluster.wait_for_leader(Duration::from_secs(30)).await.map_err(anyhow::Error::msg)?;
    let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
    client.submit(&spec).await?;
    let argv: Vec<&str> = args.command.iter().map(String::as_str).collect();
    let mut workers = LocalWorkers::new(&bin, &dir, cluster.api_endpoints(), JOB, args.workers).exec(&argv);
    let env: Vec<(&str, &str)> = args.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for rank in 0..args.workers {
        workers.spawn(rank, &env)?;
    }
    let http = reqwest::Client::new();
    let addrs: Vec<String> = (0..args.workers).map(|r| workers.http_addr(r).to_string()).collect();

    if args.kills == 0 {
        let job = wait_job(&client, Duration::from_secs(1800), |j| j.state == "succeeded").await?;
        println!("job {JOB} succeeded in generation {}", job.generation);
        if args.dir.is_some() {
            println!("logs (trainer output included) and checkpoints are in {}", dir.display());
        }
        return Ok(());
    }
    wait_job(&client, Duration::from_secs(300), |j| j.state == "running" && j.latest_committed.is_some())
        .await?;
    let mut runs = Vec::new();
    for k in 0..args.kills {
        let rank = (k as u32 + 1) % args.workers;
        let before = wait_job(&client, Duration::from_secs(300), |j| j.state == "running").await?;
        let pid = worker_status(&http, &addrs[rank as usize]).await?["trainer_pid"]
            .as_u64()
            .context("the worker reports no trainer process")? as u32;
        signal(pid, "KILL")?;
        let killed = Instant::now();
        let (mut detect, mut start_step) = (None, None);
        let deadline = killed + Duration::from_secs(300);
        let total = loop {
            if Instant::now() > deadline {
                bail!("rank {rank}'s trainer was killed and the job is not training again after 300 s; logs in {}", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            if start_step.is_none() {
                let Ok(Some(job)) = client.status(Some(JOB)).await.map(|s| s.jobs.into_iter().next()) else {
                    continue;
                };
                if job.generation > before.generation {
                    detect.get_or_insert(killed.elapsed());
                    if job.state == "running" {
                        start_step = Some(job.restored_from.map_or(0, |c| c.step.0));
                    }
                }
                continue;
            }
            let mut all = true;
            for addr in &addrs {
                let v = worker_status(&http, addr).await.unwrap_or_default();
                let generation = v["generation"].as_u64().unwrap_or(0);
                let step = v["step"].as_u64().unwrap_or(0);
                all &= generation > before.generation.0 && Some(step) > start_step;
            }
            if all {
                break killed.elapsed();
            }
        };
        let detect = detect.unwrap_or(total);
        if !args.json {
            println!(
                "kill {}: rank {rank} trainer (pid {pid}) → all {} ranks training again in {:.3} s (detected in {:.3} s)",
                k + 1,
                args.workers,
                total.as_secs_f64(),
                detect.as_secs_f64()
            );
        }
        runs.push((total.as_secs_f64(), detect.as_secs_f64()));
    }
    let median = |f: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (total, detect) = (median(|r| r.0), median(|r| r.1));
    if args.json {
        let json = serde_json::json!({
            "workers": args.workers,
            "kills": args.kills,
            "command": args.command,
            "kill_to_training_median_seconds": total,
            "detect_median_seconds": detect,
            "kill_to_training_seconds": runs.iter().map(|r| r.0).collect::<Vec<_>>(),
        });
        println!("{json}");
    } else {
        println!(
            "median over {} kills: {total:.3} s to all ranks training (detection {detect:.3} s)",
            runs.len()
        );
    }
    drop((workers, cluster, temp));
    Ok(())
}

async fn wait_job(
    client: &Client,
    timeout: Duration,
    pred: impl Fn(&JobStatus) -> bool,
) -> Result<JobStatus> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no status yet");
    while Instant::now() < deadline {
        if let Ok(Some(job)) = client.status(Some(JOB)).await.map(|s| s.jobs.into_iter().next()) {
            if pred(&job) {
                return Ok(job);
            }
            if job.state == "failed" || job.state == "blocked" {
                bail!("job {JOB} is {}: {}", job.state, job.error.unwrap_or_default());
            }
            last = format!("state {} generation {} step {}", job.state, job.generation, job.step);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("job {JOB} not there after {timeout:?}: {last}")
}

async fn worker_status(http: &reqwest::Client, addr: &str) -> Result<serde_json::Value> {
    Ok(http.get(format!("http://{addr}/v1/status")).send().await?.json().await?)
}
