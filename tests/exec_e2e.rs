//! `--exec` end to end: the numpy example (examples/numpy/train.py) as the
//! trainer of 4 real workers under 3 real coordinators. A worker is
//! SIGKILLed (its trainer must die with it), then another rank's trainer
//! process is SIGKILLed; the job restores the whole job each time and ends
//! with the digest of a failure-free run computed by the same script
//! without Flotilla.

mod common;

use common::exec::{alive, job, path, ready_spare, repo, trainer_pid, wait_job, LONG};
use common::{wait_for, BIN};
use flotilla_coordinator::client::Client;
use flotilla_coordinator::testkit::local::{signal, LocalCluster, LocalOptions, LocalWorkers};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const STEPS: &str = "400";
const JOB: &str = "numpy";

/// 3 coordinators and `world` workers running the numpy example, its job
/// submitted with `extra` appended to the spec; and the example's
/// failure-free digest.
struct Numpy {
    dir: tempfile::TempDir,
    cluster: LocalCluster,
    client: Client,
    workers: LocalWorkers,
    python: String,
    reference: String,
}

impl Numpy {
    async fn start(world: u32, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let example = path("examples/numpy/train.py");
        let reference = common::exec::reference_digest("python3", &example, world, &["--steps", STEPS]);
        let text = format!(
            "name = \"numpy\"\nworld_size = {world}\n\n[checkpoint]\nevery_steps = 40\nkeep_last = 3\nroot = \"{}\"\ntimeout_seconds = 60\n{extra}",
            dir.path().join("ckpt").display()
        );
        let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, LocalOptions::default()).unwrap();
        cluster.wait_for_leader(LONG).await.unwrap();
        let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
        client.submit(&text).await.unwrap();
        let python = repo().join("python").display().to_string();
        let mut workers =
            LocalWorkers::new(Path::new(BIN), dir.path(), cluster.api_endpoints(), "numpy", world).exec(&[
                "python3",
                &example,
                "--steps",
                STEPS,
                "--step-time-ms",
                "15",
                "--log-every",
                "0",
            ]);
        for rank in 0..world {
            workers.spawn(rank, &[("PYTHONPATH", &python)]).unwrap();
        }
        Self { dir, cluster, client, workers, python, reference }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn numpy_trainers_survive_a_worker_and_a_trainer_sigkill_bit_for_bit() {
    let world = 4;
    let Numpy { dir, cluster, client, mut workers, python, reference } = Numpy::start(world, "").await;
    let example = path("examples/numpy/train.py");

    tracing::info!("--- a committed checkpoint, then SIGKILL worker 1 while the job runs");
    let before = wait_job(&client, JOB, "a committed checkpoint while running", |j| {
        j.state == "running" && j.latest_committed.is_some()
    })
    .await;
    let orphan = wait_for("rank 1's trainer", LONG, || trainer_pid(workers.http_addr(1))).await;
    workers.kill(1);
    // the window: the job was mid-run with a checkpoint to restore from
    let at_kill = job(&client, JOB).await.unwrap();
    assert_eq!((at_kill.state.as_str(), at_kill.generation), ("running", before.generation), "{at_kill:?}");
    assert!(at_kill.step.0 < 400, "the job had not finished: {at_kill:?}");
    // the worker's trainer dies with it (no orphan keeps training)
    wait_for("the dead worker's trainer to die with it", LONG, || async {
        if alive(orphan) {
            Err(format!("pid {orphan} alive"))
        } else {
            Ok(())
        }
    })
    .await;
    workers.spawn(1, &[("PYTHONPATH", &python)]).unwrap();
    let second = wait_job(&client, JOB, "the whole job restored and running again", |j| {
        j.state == "running" && j.generation > before.generation && j.restored_from.is_some()
    })
    .await;

    tracing::info!("--- SIGKILL rank 2's trainer process (its worker lives on)");
    let pid = wait_for("rank 2's trainer in the new generation", LONG, || async {
        let j = job(&client, JOB).await.ok_or("no status")?;
        let pid = trainer_pid(workers.http_addr(2)).await?;
        let steps_on = j.step.0 > second.restored_from.as_ref().map_or(0, |c| c.step.0);
        if j.state == "running" && j.generation == second.generation && steps_on {
            Ok(pid)
        } else {
            Err(format!("state {} gen {} step {}", j.state, j.generation, j.step))
        }
    })
    .await;
    let worker_pid = workers.pid(2).unwrap();
    signal(pid, "KILL").unwrap();
    let third =
        wait_job(&client, JOB, "a restore for the killed trainer", |j| j.generation > second.generation)
            .await;
    assert!(
        third.events.iter().any(|e| e.text.contains("trainer_failed (rank 2: trainer process")
            && e.text.contains("was killed by signal 9")),
        "the restore was for the killed trainer: {:?}",
        third.events
    );
    assert!(alive(worker_pid), "the worker outlives its trainer");
    let new_pid = wait_for("a new trainer for rank 2", LONG, || async {
        match trainer_pid(workers.http_addr(2)).await {
            Ok(p) if p != pid => Ok(p),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(!alive(pid), "the killed trainer {pid} is gone, {new_pid} replaced it");

    tracing::info!("--- the job ends with the failure-free digest");
    let done = wait_job(&client, JOB, "the job to succeed", |j| j.state == "succeeded").await;
    assert!(done.restores >= 2, "{done:?}");
    assert_eq!(done.final_digest.as_deref(), Some(reference.as_str()), "{done:?}");
    // a finished --exec job is at the step its ranks finished at (the ledger
    // records it: no built-in trainer's total_steps to fall back on)
    assert_eq!(done.step.0.to_string(), STEPS, "{done:?}");
    assert_eq!(done.step_source, flotilla_coordinator::api::StepSource::Finished);
    let shown = Command::new(BIN)
        .args(["status", "--job", JOB, "--endpoints", &cluster.endpoints()])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains(&format!("job numpy: succeeded, generation {}, step {STEPS}, ", done.generation)),
        "{shown}"
    );
    // every committed checkpoint on disk verifies
    for c in done.checkpoints.iter().filter(|c| c.state == "committed") {
        let path = dir.path().join("ckpt/numpy").join(format!("ckpt-{:08}", c.id.0));
        let out = Command::new(BIN).args(["inspect", "--verify", path.to_str().unwrap()]).output().unwrap();
        assert!(out.status.success(), "checkpoint {}: {}", c.id, String::from_utf8_lossy(&out.stderr));
    }
    // the workers exit once told the job is over, taking no trainer along
    let deadline = std::time::Instant::now() + LONG;
    let mut exited = Vec::new();
    while exited.len() < world as usize {
        exited.extend(workers.exited());
        assert!(std::time::Instant::now() < deadline, "workers still running; exited: {exited:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(exited.iter().all(|(_, s)| s.success()), "{exited:?}");

    tracing::info!("--- a wider model resumed from that job's checkpoint: one error naming every mismatch, the job blocked");
    let wider = format!(
        "name = \"wider\"\nworld_size = {world}\n\n[checkpoint]\nevery_steps = 40\nroot = \"{}\"\nresume_from = \"{}\"\n",
        dir.path().join("ckpt").display(),
        dir.path().join("ckpt/numpy").display()
    );
    client.submit(&wider).await.unwrap();
    let mut wide_workers =
        LocalWorkers::new(Path::new(BIN), dir.path(), cluster.api_endpoints(), "wider", world).exec(&[
            "python3",
            &example,
            "--steps",
            STEPS,
            "--hidden",
            "48",
            "--log-every",
            "0",
        ]);
    for rank in 0..world {
        wide_workers.spawn(rank, &[("PYTHONPATH", &python)]).unwrap();
    }
    let blocked = wait_for("the wider job blocked", LONG, || async {
        let j = client.status(Some("wider")).await.map_err(|e| e.to_string())?.jobs.into_iter().next();
        let j = j.ok_or("no job")?;
        if j.state == "blocked" {
            Ok(j)
        } else {
            Err(format!("state {} error {:?}", j.state, j.error))
        }
    })
    .await;
    let error = blocked.error.unwrap_or_default();
    assert!(error.contains("does not match the model"), "{error}");
    // every mis-shaped variable at once (the model's and its Adam slots')
    for name in ["model/dense_0/kernel", "model/dense_1/bias", "optimizer/model/dense_2/kernel/m"] {
        assert!(error.contains(&format!("{name} has shape")), "{name} not named in: {error}");
    }
    assert!(wide_workers.exited().is_empty(), "a blocked job keeps its workers");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_spare_whose_python_already_waits_takes_a_rank_killed_for_good_bit_for_bit() {
    let world = 3;
    // a heartbeat timeout far past the takeover: it must come from the
    // closed connection and the ready spare, not from the timeout
    let extra = "\n[failure]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 20000\nspares = 1\n";
    let Numpy { dir: _dir, cluster: _cluster, client, mut workers, python, reference } =
        Numpy::start(world, extra).await;
    let spare = workers.spawn_spare(&[("PYTHONPATH", &python)]).unwrap();

    tracing::info!(
        "--- a ready spare (its Python process waiting in flotilla.init()) and a committed checkpoint"
    );
    let (before, waiting) = ready_spare(&client, JOB, &workers, spare).await;
    assert!(alive(waiting));
    tracing::info!("--- SIGKILL worker 1 for good (never restarted)");
    workers.kill(1);
    let taken = wait_job(&client, JOB, "rank 1 training on the spare", |j| {
        j.state == "running"
            && j.generation > before.generation
            && j.spares.is_empty()
            && j.workers
                .iter()
                .any(|w| w.rank.0 == 1 && w.host.as_deref() == Some(format!("spare-host-{spare}").as_str()))
    })
    .await;
    assert!(taken.restored_from.is_some(), "{taken:?}");
    // the process that trains rank 1 now is the one started before the failure
    let now = trainer_pid(workers.http_addr(spare)).await.unwrap();
    assert_eq!(now, waiting, "the spare's trainer process was started again");
    let done = wait_job(&client, JOB, "the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(reference.as_str()), "{done:?}");
    assert_eq!(done.restores, 1, "one restore: the takeover");
    let exited = workers.exited();
    assert!(exited.iter().all(|(_, s)| s.success()), "{exited:?}");
}
