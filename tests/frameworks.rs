//! PyTorch and TensorFlow jobs under `--exec`, killed and restored. These
//! need torch and tensorflow-cpu (large downloads), so they are ignored in
//! the default run; `scripts/test-frameworks.sh` installs both and runs
//! them with `FLOTILLA_PYTHON` set to that interpreter.

mod common;

use common::exec::{job, path, ready_spare, reference_digest, trainer_pid, wait_job, worker_step, LONG};
use common::{wait_for, BIN};
use flotilla_coordinator::api::JobStatus;
use flotilla_coordinator::client::Client;
use flotilla_coordinator::testkit::local::{LocalCluster, LocalOptions, LocalWorkers};
use std::path::Path;

const WORLD: u32 = 4;

fn python() -> String {
    std::env::var("FLOTILLA_PYTHON").expect(
        "FLOTILLA_PYTHON: the interpreter with torch and tensorflow (scripts/test-frameworks.sh sets it)",
    )
}

/// A cluster, one job of `script ARGS` under 4 `--exec` workers, a worker
/// SIGKILLed (and restarted) once a checkpoint is committed; returns the
/// finished job's status after checking its digest against the script's
/// own failure-free run.
struct Run {
    dir: tempfile::TempDir,
    cluster: LocalCluster,
    client: Client,
}

impl Run {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, LocalOptions::default()).unwrap();
        cluster.wait_for_leader(LONG).await.unwrap();
        let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
        Self { dir, cluster, client }
    }

    fn spec(&self, name: &str, every: u64, extra: &str) -> String {
        format!(
            "name = \"{name}\"\nworld_size = {WORLD}\n\n[checkpoint]\nevery_steps = {every}\nkeep_last = 3\nroot = \"{}\"\ntimeout_seconds = 120\n{extra}\n[failure]\nheartbeat_timeout_ms = 10000\n",
            self.dir.path().join("ckpt").display()
        )
    }

    fn workers(&self, name: &str, argv: &[&str]) -> LocalWorkers {
        let mut w =
            LocalWorkers::new(Path::new(BIN), self.dir.path(), self.cluster.api_endpoints(), name, WORLD)
                .exec(argv);
        let pythonpath = path("python");
        for rank in 0..WORLD {
            w.spawn(rank, &[("PYTHONPATH", &pythonpath)]).unwrap();
        }
        w
    }

    async fn killed_and_restored(&self, name: &str, every: u64, script: &str, args: &[&str]) -> JobStatus {
        let py = python();
        let script = path(script);
        let reference = reference_digest(&py, &script, WORLD, args);
        self.client.submit(&self.spec(name, every, "")).await.unwrap();
        let mut argv = vec![py.as_str(), script.as_str()];
        argv.extend_from_slice(args);
        let mut workers = self.workers(name, &argv);
        tracing::info!("--- {name}: SIGKILL worker 2 once a checkpoint is committed");
        let before = wait_job(&self.client, name, "a committed checkpoint while running", |j| {
            j.state == "running" && j.latest_committed.is_some()
        })
        .await;
        wait_for("rank 2's trainer", LONG, || trainer_pid(workers.http_addr(2))).await;
        let step = worker_step(workers.http_addr(2)).await.unwrap();
        workers.kill(2);
        let at_kill = job(&self.client, name).await.unwrap();
        // the window: mid-run, with a committed checkpoint behind the rank
        assert_eq!(
            (at_kill.state.as_str(), at_kill.generation),
            ("running", before.generation),
            "{at_kill:?}"
        );
        let committed = at_kill.latest_committed.expect("committed before the kill");
        workers.spawn(2, &[("PYTHONPATH", &path("python"))]).unwrap();
        let done = wait_job(&self.client, name, "the job to succeed", |j| j.state == "succeeded").await;
        assert!(done.restores >= 1 && done.restored_from.is_some(), "restored from a checkpoint: {done:?}");
        assert_eq!(
            done.final_digest.as_deref(),
            Some(reference.as_str()),
            "bit-identical to a failure-free run"
        );
        println!(
            "{name}: worker 2 SIGKILLed at step {step} in generation {} (checkpoint {} at step {} committed); \
             restored from checkpoint {:?}; final digest {reference} equals the failure-free run's",
            at_kill.generation,
            committed.id,
            committed.step,
            done.restored_from.map(|c| (c.id.0, c.step.0)),
        );
        done
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs torch: scripts/test-frameworks.sh"]
async fn pytorch_ddp_with_a_worker_killed_ends_bit_identical() {
    let run = Run::start().await;
    run.killed_and_restored(
        "ddp",
        20,
        "examples/pytorch_ddp/train.py",
        &["--steps", "120", "--log-every", "0"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs torch: scripts/test-frameworks.sh"]
async fn pytorch_ddp_with_a_spare_taking_a_rank_killed_for_good_ends_bit_identical() {
    let run = Run::start().await;
    let (name, py, script) = ("ddp-spare", python(), path("examples/pytorch_ddp/train.py"));
    let args = ["--steps", "120", "--log-every", "0"];
    let reference = reference_digest(&py, &script, WORLD, &args);
    // a heartbeat timeout far past the takeover (the spec's 10 s): it must
    // come from the closed connection and the ready spare
    run.client
        .submit(&run.spec(name, 20, "").replace("[failure]\n", "[failure]\nspares = 1\n"))
        .await
        .unwrap();
    let mut argv = vec![py.as_str(), script.as_str()];
    argv.extend_from_slice(&args);
    let mut workers = run.workers(name, &argv);
    let spare = workers.spawn_spare(&[("PYTHONPATH", &path("python"))]).unwrap();
    // torch imported, waiting inside flotilla.init()
    let (before, waiting) = ready_spare(&run.client, name, &workers, spare).await;
    tracing::info!("--- {name}: SIGKILL worker 2 for good (never restarted)");
    workers.kill(2);
    let host = format!("spare-host-{spare}");
    let taken = wait_job(&run.client, name, "rank 2 training on the spare", |j| {
        j.state == "running"
            && j.generation > before.generation
            && j.workers.iter().any(|w| w.rank.0 == 2 && w.host.as_deref() == Some(host.as_str()))
    })
    .await;
    assert_eq!(
        trainer_pid(workers.http_addr(spare)).await,
        Ok(waiting),
        "the spare's process started before"
    );
    let done = wait_job(&run.client, name, "the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(reference.as_str()), "bit-identical to a failure-free run");
    assert_eq!(done.restores, 1, "{done:?}");
    println!(
        "{name}: worker 2 SIGKILLed for good in generation {}; the spare's process {waiting}, started before, \
         trained rank 2 from generation {} (restored from {:?}); final digest {reference} equals the failure-free run's",
        before.generation,
        taken.generation,
        taken.restored_from.map(|c| (c.id.0, c.step.0)),
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs tensorflow: scripts/test-frameworks.sh"]
async fn tensorflow_killed_restores_bit_identical_and_a_changed_model_blocks_with_one_error() {
    let run = Run::start().await;
    let args = ["--steps", "120", "--log-every", "0"];
    run.killed_and_restored("keras", 20, "examples/tensorflow/train.py", &args).await;

    tracing::info!("--- the changed model resumes from that job's checkpoint: blocked, one error");
    let origin = run.dir.path().join("ckpt/keras");
    let spec = run.spec("keras-changed", 20, &format!("resume_from = \"{}\"\n", origin.display()));
    run.client.submit(&spec).await.unwrap();
    let (py, script) = (python(), path("examples/tensorflow/train.py"));
    let mut workers = run.workers(
        "keras-changed",
        &[&py, &script, "--steps", "120", "--log-every", "0", "--variant", "changed"],
    );
    let blocked =
        wait_job(&run.client, "keras-changed", "the changed model's job blocked", |j| j.state == "blocked")
            .await;
    let error = blocked.error.clone().unwrap_or_default();
    assert!(error.contains("does not match the model"), "{error}");
    assert!(
        error.contains("missing") && error.contains("has shape"),
        "every kind of mismatch named: {error}"
    );
    assert!(workers.exited().is_empty(), "blocked, not crashed: the workers wait");
    println!("keras-changed: blocked with: {error}");
}
