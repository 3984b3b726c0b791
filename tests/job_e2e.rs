//! The closed loop end to end: 3 real coordinators, real worker processes,
//! real fsync, SIGKILL / SIGSTOP, and the outcome checked against a
//! failure-free reference computed in the test.

mod common;

use common::{wait_for, BIN};
use flotilla_coordinator::api::JobStatus;
use flotilla_coordinator::client::Client;
use flotilla_coordinator::ledger::{JobEventKind, Takeover};
use flotilla_coordinator::supervise::SpareState;
use flotilla_coordinator::testkit::bench::{sim_node, sim_worker, NodeControl};
use flotilla_coordinator::testkit::local::{signal, LocalCluster, LocalOptions, LocalWorkers};
use flotilla_shared::ids::{JobName, Rank, Step};
use flotilla_shared::layout::{JobDir, Manifest};
use flotilla_shared::shard::read_header;
use flotilla_shared::spec::JobSpec;
use flotilla_shared::wire::RestoreSource;
use flotilla_worker::trainer::reference_digest;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LONG: Duration = Duration::from_secs(90);

struct Scenario {
    dir: tempfile::TempDir,
    cluster: LocalCluster,
    workers: LocalWorkers,
    client: Client,
    spec: JobSpec,
}

impl Scenario {
    /// 3 coordinators, `world` workers started, the job submitted.
    async fn start(world: u32, steps: u64, extra: &str) -> Self {
        Self::start_every(world, steps, 50, extra).await
    }

    /// Like `start`, checkpointing every `every` steps.
    async fn start_every(world: u32, steps: u64, every: u64, extra: &str) -> Self {
        let mut s = Self::submitted(world, steps, every, extra).await;
        for rank in 0..world {
            s.workers.spawn(rank, &[]).unwrap();
        }
        s
    }

    /// The cluster up and the job submitted; no worker started yet.
    async fn submitted(world: u32, steps: u64, every: u64, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keep = if extra.contains("keep_last") { "" } else { "keep_last = 3\n" };
        let text = format!(
            "name = \"e2e\"\nworld_size = {world}\n\n[checkpoint]\nevery_steps = {every}\n{keep}root = \"{}\"\n{extra}\n\
             [trainer]\ntotal_steps = {steps}\nparams_per_rank_bytes = 262144\nlayers = 2\nstep_time_ms = 5\nseed = 7\n",
            dir.path().join("ckpt").display()
        );
        let spec = JobSpec::from_toml(&text).unwrap();
        let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, LocalOptions::default()).unwrap();
        cluster.wait_for_leader(LONG).await.unwrap();
        let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
        client.submit(&text).await.unwrap();
        let workers = LocalWorkers::new(Path::new(BIN), dir.path(), cluster.api_endpoints(), "e2e", world);
        Self { dir, cluster, workers, client, spec }
    }

    async fn job(&self) -> Option<JobStatus> {
        self.client.status(Some("e2e")).await.ok()?.jobs.into_iter().next()
    }

    async fn wait_job(&self, what: &str, pred: impl Fn(&JobStatus) -> bool) -> JobStatus {
        wait_for(what, LONG, || async {
            let job = self.job().await.ok_or("no status")?;
            if pred(&job) {
                Ok(job)
            } else {
                Err(format!(
                    "state {} gen {} step {} restores {} latest {:?} error {:?}",
                    job.state, job.generation, job.step, job.restores, job.latest_committed, job.error
                ))
            }
        })
        .await
    }

    fn reference(&self) -> String {
        reference_digest(self.spec.trainer.as_ref().unwrap(), self.spec.world_size)
    }

    fn job_dir(&self) -> JobDir {
        JobDir::new(&self.dir.path().join("ckpt"), &self.spec.name)
    }

    /// Every committed checkpoint on disk: one shard per rank, each of the
    /// checkpoint's own generation, and every checksum right.
    fn check_committed_checkpoints(&self) -> usize {
        let mut n = 0;
        for (id, dir) in self.job_dir().list_checkpoint_dirs().unwrap() {
            let Ok(manifest) = Manifest::read(&dir) else { continue };
            n += 1;
            assert_eq!(manifest.ranks.len() as u32, self.spec.world_size, "checkpoint {id}");
            for shard in &manifest.ranks {
                let header = read_header(&dir.join(&shard.file), "test").unwrap();
                assert_eq!(
                    header.meta.generation, manifest.generation,
                    "checkpoint {id} rank {}",
                    shard.rank
                );
                assert_eq!(header.meta.step, manifest.step);
            }
            let out =
                Command::new(BIN).args(["inspect", "--verify", dir.to_str().unwrap()]).output().unwrap();
            assert!(out.status.success(), "checkpoint {id}: {}", String::from_utf8_lossy(&out.stderr));
        }
        n
    }
}

fn shard_path(dir: &Path, id: u64, rank: u32) -> PathBuf {
    dir.join(format!("ckpt-{id:08}")).join(format!("rank-{rank:05}.safetensors"))
}

#[test]
fn demo_with_a_worker_killed_matches_the_reference() {
    let out = Command::new(BIN)
        .args([
            "demo",
            "--steps",
            "600",
            "--params-per-rank-bytes",
            "262144",
            "--every-steps",
            "50",
            "--kill-worker-at",
            "300",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("MATCH: the resumed run is the same run"), "{stdout}");
    assert!(stdout.contains("restored from:           checkpoint"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_killed_mid_checkpoint_loses_nothing() {
    // checkpoints every 20 steps of 5 ms: one is nearly always in flight
    let s = Scenario::start_every(3, 1200, 20, "").await;
    let first = s.wait_job("a committed checkpoint", |j| j.latest_committed.is_some()).await;
    tracing::info!("--- SIGKILL the coordinator leader while the job checkpoints");
    let status = s.client.status(None).await.unwrap();
    let leader = status.leader_id.unwrap();
    let mut cluster = s.cluster;
    cluster.kill(leader);
    let new_leader = cluster.wait_for_leader(LONG).await.unwrap();
    assert_ne!(new_leader, leader);
    cluster.spawn(leader).unwrap();
    let s = Scenario { cluster, ..s };
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
    let latest = done.latest_committed.unwrap();
    assert!(latest.id >= first.latest_committed.unwrap().id, "a committed checkpoint was lost");
    assert!(s.check_committed_checkpoints() >= 1);
}

/// Where no replica hears the ranks (a follower; a new leader before they
/// reconnect), a job's step is the ledger's latest committed checkpoint's,
/// said to be that, not 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_tells_the_step_of_the_latest_committed_checkpoint_not_0() {
    let s = Scenario::start_every(2, 100_000, 50, "").await;
    let running = s
        .wait_job("a committed checkpoint while running", |j| {
            j.state == "running" && j.latest_committed.is_some_and(|c| c.step.0 > 0)
        })
        .await;
    assert_eq!(
        running.step_source,
        flotilla_coordinator::api::StepSource::Ranks,
        "the leader hears every rank"
    );
    let leader = s.client.status(None).await.unwrap().leader_id.unwrap();
    let follower = (1..=3).map(flotilla_shared::ids::NodeId).find(|id| *id != leader).unwrap();
    let url = format!("{}/v1/status?job=e2e", s.cluster.url(follower));
    let seen: flotilla_coordinator::api::ClusterStatus =
        reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(seen.node_id, follower);
    let job = &seen.jobs[0];
    let latest = job.latest_committed.expect("the follower has the ledger");
    assert!(latest.step.0 > 0);
    assert_eq!(job.step, latest.step, "{job:?}");
    assert_eq!(job.step_source, flotilla_coordinator::api::StepSource::Checkpoint);
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_latest_checkpoint_falls_back_to_the_previous() {
    // the memory tier off: every restore reads the files
    let mut s = Scenario::start(3, 1500, "memory_copies = 0\n").await;
    s.wait_job("three committed checkpoints", |j| j.checkpoints_committed >= 3 && j.state == "running").await;
    // freeze every rank so no newer checkpoint can commit meanwhile, and let
    // a commit already in flight land
    let pids: Vec<u32> = (0..3).map(|r| s.workers.pid(r).unwrap()).collect();
    for pid in &pids {
        signal(*pid, "STOP").unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let latest = s.job().await.unwrap().latest_committed.unwrap();
    tracing::info!("--- flip a byte in checkpoint {} rank 0, then kill a worker", latest.id);
    let path = shard_path(&s.dir.path().join("ckpt/e2e"), latest.id.0, 0);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    s.workers.kill(2);
    s.workers.spawn(2, &[]).unwrap();
    for pid in &pids[..2] {
        signal(*pid, "CONT").unwrap();
    }
    let after = s
        .wait_job("a restore from the previous checkpoint", |j| {
            j.restores >= 2 && j.state == "running" && j.restored_from.is_some_and(|c| c.id < latest.id)
        })
        .await;
    let corrupt = after.checkpoints.iter().find(|c| c.id == latest.id);
    assert!(corrupt.is_none_or(|c| c.state == "condemned"), "{corrupt:?}");
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_checkpoint_condemned_is_an_event_a_metric_and_the_job_still_converges() {
    // the memory tier off: every restore reads the files
    let mut s = Scenario::start(2, 1500, "memory_copies = 0\n").await;
    s.wait_job("two committed checkpoints", |j| j.checkpoints_committed >= 2 && j.state == "running").await;
    // freeze every rank so nothing newer commits, then damage every shard
    // on disk: committed ones, and any pending one that might still land
    let pids: Vec<u32> = (0..2).map(|r| s.workers.pid(r).unwrap()).collect();
    for pid in &pids {
        signal(*pid, "STOP").unwrap();
    }
    let before = s.job().await.unwrap();
    let root = s.dir.path().join("ckpt/e2e");
    let mut damaged = 0;
    for c in &before.checkpoints {
        let path = shard_path(&root, c.id.0, 0);
        if let Ok(mut bytes) = std::fs::read(&path) {
            let at = bytes.len() - 100;
            bytes[at] ^= 0xff;
            std::fs::write(&path, &bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged >= 2, "{:?}", before.checkpoints);
    tracing::info!("--- {damaged} checkpoints damaged; kill rank 1");
    s.workers.kill(1);
    s.workers.spawn(1, &[]).unwrap();
    signal(pids[0], "CONT").unwrap();
    let after = s
        .wait_job("a restore back to step 0", |j| {
            j.state == "running"
                && j.restored_from.is_none()
                && j.events
                    .iter()
                    .any(|e| matches!(e.kind, Some(JobEventKind::EveryCheckpointCondemned { .. })))
        })
        .await;
    // the fault hit its window: every checkpoint committed before it is condemned now
    let committed_before: Vec<_> = before.checkpoints.iter().filter(|c| c.state == "committed").collect();
    for c in &committed_before {
        let now = after.checkpoints.iter().find(|a| a.id == c.id);
        assert!(now.is_none_or(|a| a.state == "condemned"), "{now:?}");
    }
    let event = after
        .events
        .iter()
        .find(|e| matches!(e.kind, Some(JobEventKind::EveryCheckpointCondemned { .. })))
        .unwrap();
    assert!(
        matches!(event.kind, Some(JobEventKind::EveryCheckpointCondemned { condemned, step: Step(0) }) if condemned >= committed_before.len() as u64),
        "{event:?}"
    );
    // the metrics say so (the count is the ledger's, on every replica)
    let leader = s.client.status(None).await.unwrap().leader_url.unwrap();
    let text = reqwest::get(format!("{leader}/metrics")).await.unwrap().text().await.unwrap();
    assert!(text.lines().any(|l| l == "flotilla_every_checkpoint_condemned_total{job=\"e2e\"} 1"), "{text}");
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn not_enough_device_memory_blocks_then_recovers() {
    let mut s = Scenario::start(2, 1200, "").await;
    s.wait_job("a committed checkpoint", |j| j.latest_committed.is_some() && j.state == "running").await;
    tracing::info!("--- rank 1 restarts on a device with 1000 bytes free");
    s.workers.kill(1);
    s.workers.spawn(1, &[("FLOTILLA_DEVICE_FREE_BYTES", "1000")]).unwrap();
    let blocked = s.wait_job("the job to be blocked", |j| j.state == "blocked").await;
    let error = blocked.error.unwrap();
    assert!(
        error.starts_with("rank 1 on ")
            && error.contains("restore needs")
            && error.ends_with(", 1000 B free"),
        "{error}"
    );
    // the figures in units a person reads (the shard is about 256 KiB), not "0.0 GiB"
    assert!(error.contains(" KiB, ") && !error.contains("0.0 GiB"), "{error}");
    // the blocked rank is not ready, and says why
    let ready = reqwest::get(format!("http://{}/readyz", s.workers.http_addr(1))).await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let why = ready.text().await.unwrap();
    assert!(why.starts_with("restore refused: rank 1 on ") && why.contains("1000 B free"), "{why}");
    // the exact bytes behind the words: in the worker's status and metrics
    let shard_bytes = blocked.latest_committed.map(|c| c.id).and_then(|id| {
        blocked.checkpoints.iter().find(|c| c.id == id).map(|c| c.bytes / u64::from(blocked.world_size))
    });
    let view = reqwest::get(format!("http://{}/v1/status", s.workers.http_addr(1)))
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(view["device"]["free"].as_u64(), Some(1000), "{view}");
    let need = view["restore_need_bytes"].as_u64().unwrap_or_default();
    assert!(
        need > 250_000 && shard_bytes.is_some_and(|b| need.abs_diff(b) < 4096),
        "{need} vs {shard_bytes:?}"
    );
    let worker_metrics = reqwest::get(format!("http://{}/metrics", s.workers.http_addr(1)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        worker_metrics
            .lines()
            .any(|l| l.starts_with("flotilla_restore_need_bytes{") && l.ends_with(&format!(" {need}"))),
        "{worker_metrics}"
    );
    // the block is one of the job's events, and status names the rank it is blocked on
    assert!(
        blocked.events.iter().any(|e| e.text.starts_with("blocked: rank 1 on ") && e.at_ms > 0),
        "{:?}",
        blocked.events
    );
    let shown = common::flotilla(&["status", "--endpoints", &s.cluster.endpoints()]);
    let (out, err) = common::text(&shown);
    assert!(shown.status.success(), "{err}");
    let rank1 =
        out.lines().find(|l| l.trim_start().starts_with("1 ") && l.contains("its restore was refused"));
    assert!(rank1.is_some(), "{out}");
    assert!(out.contains("blocked: rank 1 on "), "the event in the text view: {out}");
    tracing::info!("--- restarted without the override: the job recovers");
    s.workers.kill(1);
    s.workers.spawn(1, &[]).unwrap();
    s.wait_job("running again", |j| j.state == "running" && j.generation > blocked.generation).await;
    // rank 0 restored from the checkpoint: each phase of its restore is timed
    let metrics = reqwest::get(format!("http://{}/metrics", s.workers.http_addr(0)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for phase in ["prechecks", "read_verify", "load"] {
        // labelled by phase, and (every worker series) by job and rank
        let line = metrics.lines().find(|l| {
            l.starts_with("flotilla_restore_phase_seconds_count{")
                && l.contains(&format!("phase=\"{phase}\""))
                && l.contains("job=\"e2e\"")
                && l.contains("rank=\"0\"")
        });
        let count = line.and_then(|l| l.rsplit(' ').next()).and_then(|c| c.parse::<u64>().ok());
        assert!(count.is_some_and(|c| c >= 1), "{phase}: {line:?}");
    }
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
    // the job is over and its workers gone: the leader counts no rank in any state
    let leader = s.client.status(None).await.unwrap().leader_url.unwrap();
    let metrics = reqwest::get(format!("{leader}/metrics")).await.unwrap().text().await.unwrap();
    let counts: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("flotilla_job_workers{") && l.contains("job=\"e2e\""))
        .collect();
    assert!(counts.iter().any(|l| l.contains("state=\"missing\"")), "{metrics}");
    assert!(counts.iter().all(|l| l.ends_with(" 0")), "{counts:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spec_bigger_than_the_host_blocks_the_first_start_and_no_worker_aborts() {
    // 1 TiB of parameters per rank, the most a spec may ask: the built-in
    // trainer would need twice that in host memory, which no test host has
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "name = \"big\"\nworld_size = 2\n\n[checkpoint]\nevery_steps = 50\nroot = \"{}\"\n\n\
         [trainer]\ntotal_steps = 100\nparams_per_rank_bytes = {}\nlayers = 2\n",
        dir.path().join("ckpt").display(),
        1u64 << 40
    );
    let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 1, LocalOptions::default()).unwrap();
    cluster.wait_for_leader(LONG).await.unwrap();
    let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
    client.submit(&text).await.unwrap();
    let mut workers = LocalWorkers::new(Path::new(BIN), dir.path(), cluster.api_endpoints(), "big", 2);
    tracing::info!("--- both ranks start: neither allocates, the first start is refused with the figures");
    for rank in 0..2 {
        workers.spawn(rank, &[]).unwrap();
    }
    let blocked = wait_for("the job to be blocked", LONG, || async {
        let job = client.status(Some("big")).await.map_err(|e| e.to_string())?.jobs.into_iter().next();
        match job {
            Some(j) if j.state == "blocked" => Ok(j),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let error = blocked.error.unwrap();
    assert!(
        error.contains("start needs 2.0 TiB") && error.contains("trainer.params_per_rank_bytes"),
        "{error}"
    );
    // nothing failed: a restore, if any, is the retry a registering rank
    // starts (when the second rank registers after the first one's refusal)
    let failures = blocked
        .events
        .iter()
        .filter(|e| matches!(&e.kind, Some(JobEventKind::Restore { reason, .. }) if reason.is_failure()));
    assert_eq!(failures.count(), 0, "nothing restarted: {:?}", blocked.events);
    // no worker aborted (an allocation of 1 TiB used to abort with exit 134):
    // both still answer, not ready, and say why
    assert!(workers.exited().is_empty(), "a worker exited");
    for rank in 0..2 {
        // the block may come from the first rank before the other has
        // registered: wait until each has been told to start and refused
        let url = format!("http://{}/readyz", workers.http_addr(rank));
        let (status, why) = wait_for("the rank to refuse its start", LONG, || async {
            let ready = reqwest::get(&url).await.map_err(|e| e.to_string())?;
            let status = ready.status();
            let why = ready.text().await.map_err(|e| e.to_string())?;
            if !why.starts_with("restore refused") {
                return Err(format!("{status}: {why}"));
            }
            Ok((status, why))
        })
        .await;
        assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert!(why.starts_with("restore refused: rank ") && why.contains("start needs"), "{why}");
    }
    assert!(workers.exited().is_empty(), "a worker exited");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rank_killed_for_good_is_taken_over_by_a_ready_spare() {
    // a heartbeat timeout far longer than the run's restore: the takeover
    // must come from the closed connection, not from the timeout
    let mut s =
        Scenario::start(3, 1500, "[failure]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 10000\n")
            .await;
    let slot = s.workers.spawn_spare(&[]).unwrap();
    let ready = s
        .wait_job("a ready spare and a committed checkpoint", |j| {
            j.state == "running"
                && j.latest_committed.is_some()
                && j.spares.iter().any(|sp| sp.state == SpareState::Ready)
        })
        .await;
    let spare = ready.spares[0].worker;
    assert_eq!(ready.spares[0].host.as_deref(), Some(format!("spare-host-{slot}").as_str()));
    let killed = ready.workers.iter().find(|w| w.rank.0 == 1).and_then(|w| w.worker).unwrap();
    tracing::info!("--- SIGKILL rank 1 for good (never restarted)");
    s.workers.kill(1);
    let taken = s
        .wait_job("rank 1 training on the spare", |j| {
            j.state == "running"
                && j.generation > ready.generation
                && j.workers.iter().any(|w| w.rank.0 == 1 && w.worker == Some(spare) && w.state == "running")
                // the supervisor's view of the restore follows within a tick
                && j.restored_from.is_some_and(|c| c.source.is_some())
        })
        .await;
    assert!(taken.spares.is_empty(), "the spare holds rank 1 now: {:?}", taken.spares);
    let rank1 = taken.workers.iter().find(|w| w.rank.0 == 1).unwrap();
    assert_eq!(rank1.host.as_deref(), Some(format!("spare-host-{slot}").as_str()));
    assert_ne!(Some(killed), rank1.worker);
    // one restore, decided on the closed connection, naming the takeover
    let restore = taken
        .events
        .iter()
        .find_map(|e| match &e.kind {
            Some(JobEventKind::Restore { reason, takeovers, from, .. }) => {
                Some((*reason, takeovers.clone(), *from))
            }
            _ => None,
        })
        .expect("a restore event");
    assert_eq!(restore.0, flotilla_coordinator::ledger::RestoreReason::Disconnected);
    assert_eq!(restore.1, vec![Takeover { rank: Rank(1), worker: spare }]);
    // the survivors restored from their own memory (or the files, when a
    // newer snapshot was in flight); the spare from a peer's memory copy, or
    // the one it held itself, or the files (when a copy was not made yet)
    let from = taken.restored_from.expect("restored from a checkpoint");
    assert!(from.source.is_some(), "{:?}", taken.last_recovery);
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
    assert_eq!(done.restores, 1);
    assert!(s.check_committed_checkpoints() >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_worker_is_fenced_and_cannot_write_into_a_live_checkpoint() {
    let s = Scenario::start(2, 1500, "[failure]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 600\n")
        .await;
    let before =
        s.wait_job("a committed checkpoint", |j| j.latest_committed.is_some() && j.state == "running").await;
    let pid = s.workers.pid(1).unwrap();
    tracing::info!("--- SIGSTOP rank 1 past the heartbeat timeout");
    signal(pid, "STOP").unwrap();
    s.wait_job("a restore into a new generation", |j| j.generation > before.generation).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tracing::info!("--- SIGCONT: its old-generation reports are refused; it restores with the rest");
    signal(pid, "CONT").unwrap();
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
    assert!(done.restores >= 1);
    // every committed shard was written in its checkpoint's generation
    assert!(s.check_committed_checkpoints() >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_timeout_aborts_and_collects_and_keep_last_holds() {
    let s = Scenario::start(
        2,
        1500,
        "timeout_seconds = 1\n[failure]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 60000\n",
    )
    .await;
    s.wait_job("a committed checkpoint", |j| j.latest_committed.is_some() && j.state == "running").await;
    tracing::info!("--- rank 1 pauses long enough for a checkpoint to time out");
    let pid = s.workers.pid(1).unwrap();
    signal(pid, "STOP").unwrap();
    let aborted =
        s.wait_job("an aborted checkpoint", |j| j.checkpoints.iter().any(|c| c.state == "aborted")).await;
    let id = aborted.checkpoints.iter().find(|c| c.state == "aborted").unwrap().id;
    signal(pid, "CONT").unwrap();
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
    // the aborted checkpoint's files are gone; at most keep_last committed remain
    let dir = s.job_dir().checkpoint_dir(id);
    wait_for("the aborted checkpoint's files to be collected", LONG, || async {
        if dir.exists() {
            Err(format!("{} still exists", dir.display()))
        } else {
            Ok(())
        }
    })
    .await;
    let committed = s.check_committed_checkpoints();
    assert!((1..=3).contains(&committed), "{committed} committed checkpoints on disk, keep_last is 3");
    let latest = s.job_dir().read_latest().unwrap().unwrap();
    assert_eq!(Some(latest), done.latest_committed.map(|c| c.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_checkpoint_list_and_restore() {
    let s = Scenario::start_every(2, 1500, 1_000_000, "").await;
    s.wait_job("the job to run", |j| j.state == "running" && j.step.0 > 0).await;
    let endpoints = s.cluster.endpoints();
    tracing::info!("--- flotilla checkpoint waits for the commit");
    let out =
        Command::new(BIN).args(["checkpoint", "--job", "e2e", "--endpoints", &endpoints]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("checkpoint 1 committed at step "), "{stdout}");
    // said once the disk agrees: MANIFEST.json and LATEST are there, and
    // inspect of the job's root reads that checkpoint
    assert!(s.job_dir().checkpoint_dir(flotilla_shared::ids::CheckpointId(1)).join("MANIFEST.json").exists());
    assert!(s.job_dir().read_latest().unwrap().is_some_and(|l| l.0 >= 1), "{stdout}");
    let inspected = Command::new(BIN).arg("inspect").arg(s.job_dir().path()).output().unwrap();
    let inspected = String::from_utf8_lossy(&inspected.stdout).into_owned();
    assert!(inspected.starts_with("checkpoint 1 of job e2e: "), "{inspected}");
    let out =
        Command::new(BIN).args(["checkpoints", "--job", "e2e", "--endpoints", &endpoints]).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = listing.lines().find(|l| l.split_whitespace().next() == Some("1")).unwrap_or_default();
    assert!(row.contains("committed"), "{listing}");
    // the columns line up with their header
    let header = listing.lines().next().unwrap();
    assert_eq!(header.find("state"), row.find("committed"), "{listing}");
    assert_eq!(
        header.find("generation").map(|at| at + "generation".len()),
        row.find(" committed").map(|at| at - 1),
        "{listing}"
    );
    let out = Command::new(BIN)
        .args(["checkpoints", "--json", "--job", "e2e", "--endpoints", &endpoints])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["id"], 1);
    assert_eq!(json[0]["state"], "committed");
    tracing::info!("--- flotilla restore rolls the whole job back to it");
    let before_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let out =
        Command::new(BIN).args(["restore", "--job", "e2e", "--endpoints", &endpoints]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // it returns once every rank trains again, naming what took
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("job e2e restored: generation 2 is training from checkpoint 1 (step "),
        "{said}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("restoring into generation 2 from checkpoint 1"));
    // status says when the restored generation started running, as the leader saw it
    // (a field of the supervisor's view, which follows the ledger within a tick)
    let resumed = s
        .wait_job("generation 2 running", |j| {
            j.generation.0 == 2 && j.state == "running" && j.running_since_ms.is_some()
        })
        .await;
    let after_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let since = resumed.running_since_ms.expect("a running job says since when");
    assert!(before_ms <= since && since <= after_ms, "{before_ms} <= {since} <= {after_ms}");
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.running_since_ms, None, "only while running");
    assert_eq!(done.restores, 1);
    assert_eq!(done.restored_from.map(|c| c.id.0), Some(1));
    // checkpoint.at_end (on by default): the last step is committed before the job succeeds
    assert_eq!(done.latest_committed.map(|c| c.step.0), Some(1500), "{:?}", done.checkpoints);
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
    // a restore from a checkpoint that is not committed is refused, naming it
    let out = Command::new(BIN)
        .args(["restore", "--job", "e2e", "--checkpoint", "42", "--endpoints", &endpoints])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("42"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_with_the_shard_files_deleted_restores_that_checkpoint_from_every_ranks_memory() {
    // periodic checkpoints off: the only one is the operator's, so every
    // rank's snapshot buffer still holds it when the restore comes
    let mut s = Scenario::start_every(3, 1500, 1_000_000, "").await;
    s.wait_job("the job to run", |j| j.state == "running" && j.step.0 > 0).await;
    let endpoints = s.cluster.endpoints();
    let out =
        Command::new(BIN).args(["checkpoint", "--job", "e2e", "--endpoints", &endpoints]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.starts_with("checkpoint 1 committed at step "), "{stdout}");
    tracing::info!("--- delete every shard file of checkpoint 1, then restore the job to it");
    for rank in 0..3 {
        let path = shard_path(s.job_dir().path(), 1, rank);
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let out =
        Command::new(BIN).args(["restore", "--job", "e2e", "--endpoints", &endpoints]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = s
        .wait_job("generation 2 running, its sources known", |j| {
            j.generation.0 == 2 && j.state == "running" && j.restored_from.is_some_and(|c| c.source.is_some())
        })
        .await;
    let from = resumed.restored_from.expect("restored from a checkpoint");
    assert_eq!(from.id.0, 1, "the deleted checkpoint itself, not an older one or step 0");
    assert_eq!(from.source, Some(RestoreSource::Memory), "{:?}", resumed.last_recovery);
    for rank in 0..3 {
        assert!(!shard_path(s.job_dir().path(), 1, rank).exists(), "nothing wrote the shard back");
    }
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.restores, 1);
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
    assert!(s.workers.exited().iter().all(|(_, st)| st.success()), "a worker failed");
}

/// Bytes of memory copies a worker holds, from its `/metrics`.
async fn copy_bytes(http_addr: &str) -> u64 {
    let Ok(r) = reqwest::get(format!("http://{http_addr}/metrics")).await else { return 0 };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("flotilla_memory_copy_bytes"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spare_restores_a_rank_killed_for_good_from_a_peers_memory_copy_with_the_files_gone() {
    // periodic checkpoints off: the operator's is the latest committed, and
    // its copies are the ones in memory; a heartbeat timeout far past the run
    let mut s = Scenario::start_every(
        3,
        1500,
        1_000_000,
        "[failure]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 20000\n",
    )
    .await;
    let spare = s.workers.spawn_spare(&[]).unwrap();
    s.wait_job("the job running with a ready spare", |j| {
        j.state == "running" && j.step.0 > 0 && j.spares.iter().any(|sp| sp.state == SpareState::Ready)
    })
    .await;
    let endpoints = s.cluster.endpoints();
    let out =
        Command::new(BIN).args(["checkpoint", "--job", "e2e", "--endpoints", &endpoints]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.starts_with("checkpoint 1 committed at step "), "{stdout}");
    // memory_copies = 1 (the default): each rank's shard in one other
    // worker's memory, the spare's included
    let shard = std::fs::metadata(shard_path(s.job_dir().path(), 1, 0)).unwrap().len();
    let slots: Vec<String> = (0..=spare).map(|slot| s.workers.http_addr(slot).to_string()).collect();
    wait_for("a memory copy of every rank's shard", LONG, || async {
        let mut held = 0;
        for addr in &slots {
            held += copy_bytes(addr).await;
        }
        if held == 3 * shard {
            Ok(())
        } else {
            Err(format!("{held} bytes of copies held, {} wanted", 3 * shard))
        }
    })
    .await;
    // each worker's status names the copies it holds: one of each rank's shard in all
    let mut held = Vec::new();
    for addr in &slots {
        let v: serde_json::Value =
            reqwest::get(format!("http://{addr}/v1/status")).await.unwrap().json().await.unwrap();
        held.extend(v["memory_copies"]["held"].as_array().cloned().unwrap_or_default());
    }
    let mut ranks: Vec<u64> = held.iter().map(|h| h[1].as_u64().unwrap()).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1, 2], "{held:?}");
    assert!(held.iter().all(|h| h[0] == 1), "copies of checkpoint 1 only: {held:?}");
    tracing::info!("--- delete every shard file of checkpoint 1, then SIGKILL rank 1 for good");
    for rank in 0..3 {
        std::fs::remove_file(shard_path(s.job_dir().path(), 1, rank)).unwrap();
    }
    s.workers.kill(1);
    let host = format!("spare-host-{spare}");
    let taken = s
        .wait_job("rank 1 training on the spare, the restore's sources known", |j| {
            j.state == "running"
                && j.generation.0 == 2
                && j.workers.iter().any(|w| w.rank.0 == 1 && w.host.as_deref() == Some(host.as_str()))
                && j.restored_from.is_some_and(|c| c.source.is_some())
        })
        .await;
    let from = taken.restored_from.unwrap();
    assert_eq!(from.id.0, 1, "the checkpoint whose files are gone, not step 0");
    // survivors from their own buffer; the spare from a copy (a peer's, or
    // the one it held itself): never storage, whose files are gone
    assert!(matches!(from.source, Some(RestoreSource::Peer | RestoreSource::Memory)), "{from:?}");
    println!(
        "with the files gone, checkpoint {} restored; the slowest rank's source: {:?}",
        from.id, from.source
    );
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
    assert_eq!(done.restores, 1);
    assert!(s.workers.exited().iter().all(|(_, st)| st.success()), "a worker failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_job_refuses_at_once_and_a_new_job_resumes_from_its_checkpoint() {
    let s = Scenario::start_every(2, 300, 50, "").await;
    let done = s.wait_job("the first job to succeed", |j| j.state == "succeeded").await;
    let head = done.latest_committed.expect("the first job committed checkpoints");
    let endpoints = s.cluster.endpoints();
    tracing::info!("--- requests a finished job cannot take are refused at once, with the reason");
    for args in [["restore", "--job", "e2e"], ["checkpoint", "--job", "e2e"]] {
        let out = Command::new(BIN).args(args).args(["--endpoints", &endpoints]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("succeeded"), "{args:?}: {stderr}");
    }

    tracing::info!("--- a new job starts from the first job's latest committed checkpoint");
    let text = format!(
        "name = \"next\"\nworld_size = 2\n\n[checkpoint]\nevery_steps = 50\nroot = \"{}\"\nresume_from = \"{}\"\n\n\
         [trainer]\ntotal_steps = 600\nparams_per_rank_bytes = 262144\nlayers = 2\nstep_time_ms = 5\nseed = 7\n",
        s.dir.path().join("ckpt").display(),
        s.job_dir().path().display()
    );
    let spec = JobSpec::from_toml(&text).unwrap();
    s.client.submit(&text).await.unwrap();
    let mut workers = LocalWorkers::new(Path::new(BIN), s.dir.path(), s.cluster.api_endpoints(), "next", 2);
    for rank in 0..2 {
        workers.spawn(rank, &[]).unwrap();
    }
    let next = wait_for("the resumed job to succeed", LONG, || async {
        let j = s.client.status(Some("next")).await.map_err(|e| e.to_string())?.jobs.into_iter().next();
        let j = j.ok_or("no job")?;
        if j.state == "succeeded" {
            Ok(j)
        } else {
            Err(format!("{} gen {} step {}", j.state, j.generation, j.step))
        }
    })
    .await;
    // the same model trained on from the first job's state ends where a
    // failure-free 600-step run ends, and took no checkpoint before the head
    let reference = reference_digest(spec.trainer.as_ref().unwrap(), 2);
    assert_eq!(next.final_digest.as_deref(), Some(reference.as_str()));
    let first = next.checkpoints.iter().map(|c| c.step).min().expect("checkpoints after the head");
    assert!(first > head.step, "first checkpoint at {first}, the head was {}", head.step);
    assert_eq!(next.restores, 0);

    tracing::info!("--- a resume_from that names no committed checkpoint is refused with the key");
    let bad = text.replace("name = \"next\"", "name = \"bad\"").replace(
        &s.job_dir().path().display().to_string(),
        &s.dir.path().join("nowhere").display().to_string(),
    );
    let err = s.client.submit(&bad).await.unwrap_err().to_string();
    assert!(err.contains("checkpoint.resume_from") && err.contains("no committed checkpoint"), "{err}");
}

/// `flotilla ARGS --endpoints E`: (exit code, stdout, stderr).
fn cli(args: &[&str], endpoints: &str) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).args(["--endpoints", endpoints]).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_job_stops_its_workers_and_once_deleted_its_name_runs_afresh() {
    let mut s = Scenario::start(2, 1_000_000, "").await;
    s.wait_job("two committed checkpoints", |j| j.state == "running" && j.checkpoints_committed >= 2).await;
    let endpoints = s.cluster.endpoints();

    tracing::info!("--- flotilla cancel: the job is cancelled, its workers stop and exit");
    let (code, stdout, stderr) = cli(&["cancel", "--job", "e2e"], &endpoints);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("job e2e cancelled"), "{stdout}");
    let mut gone = Vec::new();
    let deadline = std::time::Instant::now() + LONG;
    while gone.len() < 2 {
        gone.extend(s.workers.exited());
        assert!(std::time::Instant::now() < deadline, "the workers did not exit: {gone:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone.iter().all(|(_, status)| status.success()), "a stopped worker exits 0: {gone:?}");
    let job = s.wait_job("cancelled", |j| j.state == "cancelled").await;
    assert!(job.checkpoints.iter().all(|c| c.state != "pending"), "{:?}", job.checkpoints);
    let latest = job.latest_committed.expect("its committed checkpoints stay");
    assert!(
        job.events.iter().any(|e| matches!(e.kind, Some(JobEventKind::Cancelled { .. }))),
        "{:?}",
        job.events
    );

    tracing::info!("--- flotilla jobs lists it as cancelled, with its latest checkpoint");
    let stdout = wait_for("flotilla jobs to list e2e cancelled", LONG, || async {
        let (code, stdout, stderr) = cli(&["jobs"], &endpoints);
        match code {
            Some(0) if stdout.lines().any(|l| l.starts_with("e2e ") && l.contains(" cancelled ")) => {
                Ok(stdout)
            }
            _ => Err(format!("{code:?}: {stdout}{stderr}")),
        }
    })
    .await;
    let line = stdout.lines().find(|l| l.starts_with("e2e ")).unwrap_or_else(|| panic!("{stdout}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &cells[..5],
        ["e2e", "cancelled", "1", "2", &format!("{}@{}", latest.id, latest.step)],
        "{stdout}"
    );
    let (code, _, stderr) = cli(&["cancel", "--job", "e2e"], &endpoints);
    assert_eq!(code, Some(1), "cancelled twice: {stderr}");
    assert!(stderr.contains("already cancelled"), "{stderr}");
    let (code, _, stderr) = cli(&["cancel", "--job", "nosuch"], &endpoints);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no job named nosuch"), "{stderr}");

    tracing::info!("--- a live job is not deleted: cancel it first");
    let other = format!(
        "name = \"other\"\nworld_size = 1\n\n[checkpoint]\nevery_steps = 50\nroot = \"{}\"\n\n[trainer]\ntotal_steps = 100\n",
        s.dir.path().join("ckpt").display()
    );
    s.client.submit(&other).await.unwrap();
    let (code, _, stderr) = cli(&["delete", "--job", "other"], &endpoints);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is waiting") && stderr.contains("cancel it first (flotilla cancel --job other)"),
        "{stderr}"
    );

    // the HTTP answers: 404 for no such job, 409 for one already ended or still live
    let url = s.cluster.url(s.cluster.wait_for_leader(LONG).await.unwrap());
    let http = reqwest::Client::new();
    let code = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(code(http.post(format!("{url}/v1/jobs/nosuch/cancel")).send().await.unwrap()), 404);
    assert_eq!(code(http.post(format!("{url}/v1/jobs/e2e/cancel")).send().await.unwrap()), 409);
    assert_eq!(code(http.delete(format!("{url}/v1/jobs/other")).send().await.unwrap()), 409);
    assert_eq!(code(http.delete(format!("{url}/v1/jobs/nosuch")).send().await.unwrap()), 404);

    tracing::info!("--- flotilla delete --remove-checkpoints: out of the ledger, its directory gone");
    assert!(s.job_dir().path().is_dir());
    let (code, stdout, stderr) = cli(&["delete", "--job", "e2e", "--remove-checkpoints"], &endpoints);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("job e2e deleted") && stdout.contains("removed"), "{stdout}");
    assert!(!s.job_dir().path().exists(), "{} is still there", s.job_dir().path().display());
    // (the replica answering may apply the deletion a moment after the leader)
    wait_for("flotilla jobs to list other and not e2e", LONG, || async {
        let (_, stdout, _) = cli(&["jobs"], &endpoints);
        let listed = |job: &str| stdout.lines().any(|l| l.starts_with(&format!("{job} ")));
        if listed("other") && !listed("e2e") {
            Ok(())
        } else {
            Err(stdout)
        }
    })
    .await;
    let (code, _, stderr) = cli(&["delete", "--job", "e2e"], &endpoints);
    assert_eq!(code, Some(1), "deleted twice: {stderr}");

    tracing::info!("--- the same name again is a fresh job, trained from step 0");
    let again = format!(
        "name = \"e2e\"\nworld_size = 2\n\n[checkpoint]\nevery_steps = 50\nkeep_last = 100\nroot = \"{}\"\n\n\
         [trainer]\ntotal_steps = 300\nparams_per_rank_bytes = 262144\nlayers = 2\nstep_time_ms = 5\nseed = 7\n",
        s.dir.path().join("ckpt").display()
    );
    let spec = JobSpec::from_toml(&again).unwrap();
    assert!(s.client.submit(&again).await.unwrap().created);
    // (any replica answers status: one that has applied the submission)
    let fresh = s.wait_job("the fresh job", |j| j.state == "waiting").await;
    assert_eq!((fresh.generation.0, fresh.restores, fresh.checkpoints.len()), (1, 0, 0));
    let mut workers = LocalWorkers::new(Path::new(BIN), s.dir.path(), s.cluster.api_endpoints(), "e2e", 2);
    for rank in 0..2 {
        workers.spawn(rank, &[]).unwrap();
    }
    let done = s.wait_job("the new job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest, Some(reference_digest(spec.trainer.as_ref().unwrap(), 2)));
    assert_eq!((done.generation.0, done.restores), (1, 0));
    // keep_last = 100: none retired, so the list starts at the first
    let first = done.checkpoints.iter().map(|c| c.id.0).min();
    assert_eq!(first, Some(1), "checkpoint ids start again: {:?}", done.checkpoints);
    assert!(done.restored_from.is_none(), "it started from step 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_condemned_checkpoint_is_listed_with_its_tensor_and_cleared_after_repair() {
    // the memory tier off: every restore reads the files
    let s = Scenario::start(2, 2500, "keep_last = 1000\nmemory_copies = 0\n").await;
    let before = s.wait_job("three committed checkpoints", |j| j.checkpoints_committed >= 3).await;
    let c = before.latest_committed.unwrap().id;
    let endpoints = s.cluster.endpoints();
    let checkpoints = |extra: &[&str]| {
        Command::new(BIN)
            .args(["checkpoints", "--job", "e2e", "--endpoints", &endpoints])
            .args(extra)
            .output()
            .unwrap()
    };
    tracing::info!("--- damage checkpoint {c} rank 0, then restore the job to it");
    let path = shard_path(&s.dir.path().join("ckpt/e2e"), c.0, 0);
    let original = std::fs::read(&path).unwrap();
    let mut bytes = original.clone();
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let out = Command::new(BIN)
        .args(["restore", "--job", "e2e", "--checkpoint", &c.to_string(), "--endpoints", &endpoints])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // the restore asked for generation G from checkpoint c; c is found
    // damaged, so the job falls back in generation G + 1: restore says so
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let asked = before.generation.0 + 1;
    let condemned = s
        .wait_job("the checkpoint condemned and the job running again", |j| {
            j.state == "running" && j.checkpoints.iter().any(|x| x.id == c && x.state == "condemned")
        })
        .await;
    assert!(condemned.restored_from.is_some_and(|r| r.id < c), "{:?}", condemned.restored_from);
    let fell_back = condemned.restored_from.unwrap();
    assert!(condemned.generation.0 > asked, "{:?}", condemned.events);
    assert!(
        said.starts_with(&format!(
            "job e2e restored: generation {} is training from checkpoint {} (step {}), not generation {asked} from checkpoint {c}: checkpoint {c} condemned: ",
            condemned.generation,
            fell_back.id,
            fell_back.step
        )),
        "{said}"
    );
    let manifest = s.job_dir().checkpoint_dir(c).join("MANIFEST.json");
    wait_for("the condemned checkpoint's MANIFEST.json removed", LONG, || async {
        if manifest.exists() {
            Err("still there".to_string())
        } else {
            Ok(())
        }
    })
    .await;
    let listing = String::from_utf8_lossy(&checkpoints(&[]).stdout).into_owned();
    let line = listing.lines().find(|l| l.split_whitespace().next() == Some(&c.to_string())).unwrap();
    // the state column says what help and the events say: condemned
    assert_eq!(line.split_whitespace().nth(3), Some("condemned"), "{listing}");
    assert!(line.contains("checksum mismatch in "), "{listing}");
    // the checkpoint's id as its own argument lists just it
    let one = String::from_utf8_lossy(&checkpoints(&[&c.to_string()]).stdout).into_owned();
    assert_eq!(one.lines().count(), 2, "a header and its row: {one}");
    assert_eq!(one.lines().nth(1).and_then(|l| l.split_whitespace().next()), Some(c.to_string().as_str()));

    tracing::info!("--- re-verifying the damaged files is refused; after the repair it clears the verdict");
    let out = checkpoints(&["--verify", &c.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("still damaged"), "{out:?}");
    std::fs::write(&path, &original).unwrap();
    // --verify is a switch, as on inspect, with the id as its own argument
    let out = checkpoints(&[&c.to_string(), "--verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cleared = s.job().await.unwrap();
    assert!(
        cleared.checkpoints.iter().any(|x| x.id == c && x.state == "committed"),
        "{:?}",
        cleared.checkpoints
    );
    // "committed again" is said once the disk agrees: MANIFEST.json is back
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("it is committed again; its MANIFEST.json is written back"), "{said}");
    assert!(manifest.exists(), "{said}");
    let inspected =
        Command::new(BIN).args(["inspect", "--verify"]).arg(manifest.parent().unwrap()).output().unwrap();
    assert!(inspected.status.success(), "{}", String::from_utf8_lossy(&inspected.stderr));
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
}

/// Issue 10's long run: thousands of checkpoint cycles with `keep_last = 3`
/// and frequent log compaction, driven back to back by an operator's
/// `checkpoint` calls against simulated workers (the real worker protocol,
/// real shard files). The ledger keeps the last three committed checkpoints
/// and a bounded list of tombstones, so the snapshot a new replica is sent
/// stops growing once that list is full; and the followers keep applying
/// what the leader commits all along.
#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_checkpoint_cycles_keep_the_snapshot_bounded_and_every_follower_caught_up() {
    const CYCLES: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let opts = LocalOptions {
        snapshot_threshold: Some(256),
        log_filter: Some("warn".into()),
        ..LocalOptions::default()
    };
    let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, opts).unwrap();
    let leader = cluster.wait_for_leader(LONG).await.unwrap();
    let client = Client::new(vec![cluster.url(leader)], None);
    let text = format!(
        "name = \"cycles\"\nworld_size = 2\n[checkpoint]\nevery_steps = 1000000000000\nkeep_last = 3\nroot = \"{}\"\n",
        dir.path().join("ckpt").display()
    );
    client.submit(&text).await.unwrap();
    let endpoints: Vec<String> = cluster.api_endpoints().split(',').map(String::from).collect();
    let (restores, _restored) = tokio::sync::mpsc::unbounded_channel();
    let workers: Vec<_> = (0..2)
        .map(|rank| tokio::spawn(sim_worker(endpoints.clone(), "cycles", 100, rank, 1, restores.clone())))
        .collect();
    wait_for("the job running", LONG, || async {
        let job = client.status(Some("cycles")).await.map_err(|e| e.to_string())?.jobs.remove(0);
        if job.state == "running" {
            Ok(())
        } else {
            Err(job.state.to_string())
        }
    })
    .await;

    // the snapshot once the tombstones are certainly full, and the largest after
    let mut settled: Option<u64> = None;
    let mut largest_after = 0u64;
    let mut snapshots = std::collections::BTreeSet::new();
    for cycle in 1..=CYCLES {
        client.checkpoint("cycles").await.unwrap();
        if cycle % 100 != 0 {
            continue;
        }
        let st = client.status(Some("cycles")).await.unwrap();
        snapshots.insert(st.snapshot_index);
        if cycle >= 200 {
            match settled {
                None => settled = Some(st.snapshot_bytes),
                Some(_) => largest_after = largest_after.max(st.snapshot_bytes),
            }
        }
        if cycle % 500 == 0 {
            // every follower applies what the leader had committed
            let commit = st.commit_index;
            for node in &cluster.nodes {
                wait_for(&format!("node {} to apply index {commit}", node.id), LONG, || async {
                    let n = cluster.status(node.id).await.ok_or("no answer")?;
                    if n.applied_index >= commit {
                        Ok(())
                    } else {
                        Err(format!("applied {}", n.applied_index))
                    }
                })
                .await;
            }
            tracing::info!(
                "{cycle} cycles; snapshot at {} is {} bytes; every replica at {commit}",
                st.snapshot_index,
                st.snapshot_bytes
            );
        }
    }
    let job = client.status(Some("cycles")).await.unwrap().jobs.remove(0);
    assert_eq!(job.checkpoints_committed, CYCLES);
    assert_eq!(job.state, "running", "{job:?}");
    assert_eq!(job.restores, 0, "no failure along the way");
    let settled = settled.expect("sampled at 200 cycles");
    assert!(settled > 0, "a snapshot was taken by 200 cycles");
    assert!(snapshots.len() >= 10, "the log was compacted only at {snapshots:?}");
    assert!(
        largest_after <= settled + settled / 4,
        "the snapshot grew from {settled} bytes (200 cycles) to {largest_after} bytes"
    );
    let kept: Vec<_> = job.checkpoints.iter().filter(|c| c.state == "committed").collect();
    assert_eq!(kept.len(), 3, "{:?}", job.checkpoints);
    let on_disk = JobDir::new(&dir.path().join("ckpt"), &JobName::new("cycles").unwrap())
        .list_checkpoint_dirs()
        .unwrap()
        .len();
    assert!(on_disk <= 4, "{on_disk} checkpoint directories on disk with keep_last = 3");
    for w in workers {
        w.abort();
    }
    println!("{CYCLES} cycles: the snapshot stayed within {largest_after} bytes (settled at {settled} by cycle 200)");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_node_session_carries_a_hosts_ranks_through_a_checkpoint_a_failure_and_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, LocalOptions::default()).unwrap();
    let leader = cluster.wait_for_leader(LONG).await.unwrap();
    let client = Client::new(vec![cluster.url(leader)], None);
    let text = format!(
        "name = \"node\"\nworld_size = 4\n[checkpoint]\nevery_steps = 1000000000000\nroot = \"{}\"\n\
         [failure]\nheartbeat_interval_ms = 100\n",
        dir.path().join("ckpt").display()
    );
    client.submit(&text).await.unwrap();
    let endpoints: Vec<String> = cluster.api_endpoints().split(',').map(String::from).collect();
    let (control, control_rx) = tokio::sync::mpsc::unbounded_channel();
    let (restores, mut restored) = tokio::sync::mpsc::unbounded_channel();
    // ranks 0..4 of one host on one connection, every frame a batch
    let node = tokio::spawn(sim_node(endpoints, "node".into(), 100, 0..4, 1, control_rx, restores));
    let first = all_ranks(&client, "running", 0).await;
    // a checkpoint: four shards written and reported in batches, one commit
    let committed = client.checkpoint("node").await.unwrap();
    let id = committed["id"].as_u64().unwrap();
    let job_dir = JobDir::new(&dir.path().join("ckpt"), &JobName::new("node").unwrap());
    let manifest = wait_for("the manifest", LONG, || async {
        Manifest::read(&job_dir.checkpoint_dir(flotilla_shared::ids::CheckpointId(id)))
            .map_err(|e| e.to_string())
    })
    .await;
    let mut ranks: Vec<u32> = manifest.ranks.iter().map(|r| r.rank.0).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1, 2, 3]);

    // rank 2's process dies: the node says it left, and the others are told to restore
    // (a simulated rank may have been sent its generation's first start
    // before its heartbeats said it runs: not a restore, and not counted)
    while restored.try_recv().is_ok() {}
    let before = client.status(Some("node")).await.unwrap().jobs.remove(0);
    assert_eq!(before.restores, 0, "{before:?}");
    control.send(NodeControl::Drop(2)).unwrap();
    let told: Vec<u32> = wait_for("restore directives after rank 2 left", LONG, || {
        let mut got = Vec::new();
        while let Ok((rank, _)) = restored.try_recv() {
            got.push(rank);
        }
        async move {
            if got.is_empty() {
                Err("none yet".to_string())
            } else {
                Ok(got)
            }
        }
    })
    .await;
    assert!(!told.contains(&2), "the rank that left gets nothing: {told:?}");
    // a new process of rank 2 registers on the same session; the job runs again
    control.send(NodeControl::Start(2, 1_000)).unwrap();
    let again = all_ranks(&client, "running", first.generation.0).await;
    assert!(again.restores >= 1, "{again:?}");
    assert_eq!(again.restored_from.map(|c| c.id.0), Some(id), "restored from the committed checkpoint");
    assert!(!node.is_finished(), "the session survived the rank's failure");
    node.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_agent_carries_a_hosts_real_workers_on_one_session_through_a_kill_and_its_own_restart() {
    let failure = "[failure]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1000\n";
    let mut s = Scenario::submitted(4, 4000, 50, failure).await;
    // the host's node agent; its four workers know only its address
    let addr = format!("127.0.0.1:{}", flotilla_coordinator::testkit::local::free_port().unwrap());
    let start_agent = |dir: &Path, endpoints: &str| {
        let log = std::fs::File::options().create(true).append(true).open(dir.join("node.log")).unwrap();
        Command::new(BIN)
            .args(["node", "--listen", &addr, "--coordinators", endpoints])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut agent = start_agent(s.dir.path(), &s.cluster.api_endpoints());
    s.workers = LocalWorkers::new(Path::new(BIN), s.dir.path(), addr.clone(), "e2e", 4);
    for rank in 0..4 {
        s.workers.spawn(rank, &[]).unwrap();
    }
    let first =
        s.wait_job("a committed checkpoint", |j| j.state == "running" && j.latest_committed.is_some()).await;
    // on the leader: one session for the whole host, none of a single rank
    let leader = s.client.status(None).await.unwrap().leader_id.unwrap();
    assert_eq!(worker_sessions(&s.cluster.url(leader)).await, (1, 0));

    // a worker SIGKILLed and started again: the agent says it left, the
    // job restores, and the new process registers through the same agent
    s.workers.kill(2);
    s.workers.spawn(2, &[]).unwrap();
    let again = s
        .wait_job("a restore after rank 2 was killed", |j| {
            j.state == "running" && j.generation.0 > first.generation.0 && j.restores >= 1
        })
        .await;
    assert_eq!(worker_sessions(&s.cluster.url(leader)).await, (1, 0));

    // the agent itself SIGKILLed: the leader loses the host's session (the
    // workers know no other address), and once the agent is back every
    // worker registers again through it
    agent.kill().unwrap();
    agent.wait().unwrap();
    let url = s.cluster.url(leader);
    wait_for("the host's session to end", LONG, || async {
        match worker_sessions(&url).await {
            (0, 0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let mut agent = start_agent(s.dir.path(), &s.cluster.api_endpoints());
    wait_for("every rank back on one session", LONG, || async {
        let job = s.job().await.ok_or("no status")?;
        let sessions = worker_sessions(&url).await;
        let running = job.workers.iter().filter(|w| w.state == "running").count();
        if sessions == (1, 0) && running == 4 {
            Ok(())
        } else {
            Err(format!(
                "sessions {sessions:?}, job {} at step {} with {running} ranks running",
                job.state, job.step
            ))
        }
    })
    .await;
    let done = s.wait_job("the job to succeed", |j| j.state == "succeeded").await;
    assert!(done.restores >= again.restores);
    assert_eq!(done.final_digest.as_deref(), Some(s.reference().as_str()));
    assert!(s.check_committed_checkpoints() >= 1);
    assert!(agent.try_wait().unwrap().is_none(), "the agent outlives the job's end");
    agent.kill().unwrap();
    let _ = agent.wait();
}

/// `flotilla_worker_sessions` on the replica at `url`: (node, rank).
async fn worker_sessions(url: &str) -> (i64, i64) {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    let value = |kind: &str| {
        let series = format!("flotilla_worker_sessions{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("no {series} in {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    (value("node"), value("rank"))
}

/// Job `node` in state `want` in a generation after `after`, with all 4
/// ranks in that state too.
async fn all_ranks(client: &Client, want: &str, after: u64) -> JobStatus {
    wait_for(&format!("job {want} after generation {after}"), LONG, || async {
        let job = client.status(Some("node")).await.map_err(|e| e.to_string())?.jobs.remove(0);
        let all = job.workers.len() == 4 && job.workers.iter().all(|w| w.state == want);
        if job.state == want && job.generation.0 > after && all {
            Ok(job)
        } else {
            Err(format!("{} gen {} workers {:?}", job.state, job.generation, job.workers))
        }
    })
    .await
}
