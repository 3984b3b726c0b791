//! Helpers for the `--exec` end-to-end tests: a job's status through the
//! client, the trainer process a worker runs, and a script's failure-free
//! reference digest.

use flotilla_coordinator::api::JobStatus;
use flotilla_coordinator::client::Client;
use flotilla_shared::checksum::combine_digests;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long any one phase of these tests may take.
pub const LONG: Duration = Duration::from_secs(300);

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Waits until `job` runs with a committed checkpoint and a ready spare,
/// and the spare in `slot` has its trainer process (already started,
/// waiting inside `flotilla.init()`); the job's status and that pid.
pub async fn ready_spare(
    client: &Client,
    job: &str,
    workers: &flotilla_coordinator::testkit::local::LocalWorkers,
    slot: u32,
) -> (JobStatus, u32) {
    let status = wait_job(client, job, "a ready spare and a committed checkpoint while running", |j| {
        j.state == "running"
            && j.latest_committed.is_some()
            && j.spares.iter().any(|s| s.state == flotilla_coordinator::supervise::SpareState::Ready)
    })
    .await;
    let pid =
        crate::common::wait_for("the spare's trainer process", LONG, || trainer_pid(workers.http_addr(slot)))
            .await;
    (status, pid)
}

/// A file of the repository, as a string for command lines.
pub fn path(rel: &str) -> String {
    repo().join(rel).display().to_string()
}

/// The failure-free digest of `script --reference --world-size W ARGS`: the
/// script's own run without Flotilla, its per-rank lines `rank R digest HEX`
/// combined as the coordinator combines ranks' digests.
pub fn reference_digest(python: &str, script: &str, world: u32, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg(script)
        .args(["--reference", "--world-size", &world.to_string()])
        .args(args)
        .env("PYTHONPATH", repo().join("python"))
        .output()
        .unwrap_or_else(|e| panic!("{python} runs: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "reference run failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let digests: Vec<String> = (0..world)
        .map(|r| {
            let prefix = format!("rank {r} digest ");
            let line = stdout.lines().find_map(|l| l.strip_prefix(&prefix));
            line.unwrap_or_else(|| panic!("no digest for rank {r} in: {stdout}")).trim().to_string()
        })
        .collect();
    combine_digests(&digests)
}

/// One job's status.
pub async fn job(client: &Client, name: &str) -> Option<JobStatus> {
    client.status(Some(name)).await.ok()?.jobs.into_iter().next()
}

/// Waits until job `name`'s status satisfies `pred`.
pub async fn wait_job(
    client: &Client,
    name: &str,
    what: &str,
    pred: impl Fn(&JobStatus) -> bool,
) -> JobStatus {
    super::wait_for(what, LONG, || async {
        let j = job(client, name).await.ok_or("no status")?;
        if pred(&j) {
            Ok(j)
        } else {
            Err(format!(
                "state {} gen {} step {} restores {} latest {:?} error {:?} events {:?}",
                j.state,
                j.generation,
                j.step,
                j.restores,
                j.latest_committed,
                j.error,
                j.events.iter().map(|e| &e.text).collect::<Vec<_>>()
            ))
        }
    })
    .await
}

/// A worker's own `/v1/status`.
pub async fn worker_status(http_addr: &str) -> Result<serde_json::Value, String> {
    let reply = reqwest::get(format!("http://{http_addr}/v1/status")).await.map_err(|e| e.to_string())?;
    reply.json().await.map_err(|e| e.to_string())
}

/// The trainer process a worker runs now, from its status.
pub async fn trainer_pid(http_addr: &str) -> Result<u32, String> {
    let v = worker_status(http_addr).await?;
    v["trainer_pid"].as_u64().map(|p| p as u32).ok_or_else(|| format!("no trainer_pid in {v}"))
}

/// The step a worker's trainer last reported, from the worker's status.
pub async fn worker_step(http_addr: &str) -> Result<u64, String> {
    let v = worker_status(http_addr).await?;
    v["step"].as_u64().ok_or_else(|| format!("no step in {v}"))
}

/// Whether process `pid` exists.
pub fn alive(pid: u32) -> bool {
    let probe = Command::new("kill").args(["-0", &pid.to_string()]).stderr(Stdio::null()).status();
    probe.is_ok_and(|s| s.success())
}
