//! `flotilla bench raft`: a real 3-replica cluster of this binary on
//! loopback, with fsync, measured from outside like a client sees it.
//!
//! - **commit latency**: sequential `POST /v1/jobs` to the leader, each a new
//!   job, so each is one Raft proposal persisted on a quorum and applied;
//!   the baseline is one 4 KiB write + `fdatasync` on the same disk, in the
//!   same run (a commit needs at least one on the leader and one on a
//!   follower, in parallel);
//! - **failover**: SIGKILL the leader, then poll the others every 5 ms until
//!   one serves `/v1/status` as leader; the killed replica is restarted on
//!   its data dir and rejoins before the next run.

use crate::local::{LocalCluster, LocalOptions};
use crate::node::Role;
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Options of `bench raft`.
#[derive(Debug, Clone)]
pub struct RaftBenchOptions {
    /// Sequential proposals to time.
    pub proposals: usize,
    /// Leader kills to time.
    pub failovers: usize,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct RaftBenchReport {
    /// Proposals timed.
    pub proposals: usize,
    /// Median commit latency (client-side, HTTP included).
    pub commit_p50_ms: f64,
    /// 99th percentile commit latency.
    pub commit_p99_ms: f64,
    /// Median of one 4 KiB write + fdatasync on the same disk.
    pub fsync_p50_ms: f64,
    /// 99th percentile of the same.
    pub fsync_p99_ms: f64,
    /// Every failover, SIGKILL to a new leader serving status, in ms.
    pub failover_ms: Vec<f64>,
    /// Median failover.
    pub failover_p50_ms: f64,
}

/// The `q`-quantile (nearest rank) of `xs`.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn fsync_samples(dir: &Path, n: usize) -> std::io::Result<Vec<f64>> {
    let path = dir.join("fsync-baseline");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5a_u8; 4096];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        out.push(start.elapsed().as_secs_f64() * 1e3);
    }
    drop(file);
    std::fs::remove_file(path)?;
    Ok(out)
}

/// Runs the benchmark with the `flotilla` binary at `bin`, under `dir`.
pub async fn raft_bench(bin: &Path, dir: &Path, opts: &RaftBenchOptions) -> Result<RaftBenchReport, String> {
    let quiet = LocalOptions { log_filter: Some("warn".into()), ..LocalOptions::default() };
    let mut cluster =
        LocalCluster::start(bin, dir, 3, quiet).map_err(|e| format!("cannot start the cluster: {e}"))?;
    let timeout = Duration::from_secs(30);
    let leader = cluster.wait_for_leader(timeout).await?;

    let http = reqwest::Client::new();
    let url = format!("{}/v1/jobs", cluster.url(leader));
    let mut commits = Vec::with_capacity(opts.proposals);
    let root = dir.join("ckpt");
    for i in 0..opts.proposals + 10 {
        let spec = format!(
            "name = \"bench-{i}\"\nworld_size = 1\n[checkpoint]\nevery_steps = 10\nroot = \"{}\"\n",
            root.display()
        );
        let start = Instant::now();
        let resp = http.post(&url).body(spec).send().await.map_err(|e| e.to_string())?;
        let took = start.elapsed().as_secs_f64() * 1e3;
        if !resp.status().is_success() {
            return Err(format!("proposal {i} failed: HTTP {}", resp.status()));
        }
        // the first few warm up connections and the log
        if i >= 10 {
            commits.push(took);
        }
    }
    let fsyncs = fsync_samples(dir, opts.proposals.max(50)).map_err(|e| format!("fsync baseline: {e}"))?;

    let mut failovers = Vec::with_capacity(opts.failovers);
    for _ in 0..opts.failovers {
        let leader = cluster.wait_for_leader(timeout).await?;
        // let followers settle their view of the leader before it dies
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.kill(leader);
        let start = Instant::now();
        'poll: loop {
            for node in cluster.nodes.iter().filter(|n| n.is_running()) {
                if cluster.status(node.id).await.is_some_and(|s| s.role == Role::Leader) {
                    break 'poll;
                }
            }
            if start.elapsed() > timeout {
                return Err(format!("no new leader within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failovers.push(start.elapsed().as_secs_f64() * 1e3);
        cluster.spawn(leader).map_err(|e| format!("cannot restart node {leader}: {e}"))?;
        cluster.wait_for_leader(timeout).await?;
    }

    Ok(RaftBenchReport {
        proposals: commits.len(),
        commit_p50_ms: quantile(&commits, 0.5),
        commit_p99_ms: quantile(&commits, 0.99),
        fsync_p50_ms: quantile(&fsyncs, 0.5),
        fsync_p99_ms: quantile(&fsyncs, 0.99),
        failover_p50_ms: quantile(&failovers, 0.5),
        failover_ms: failovers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&xs, 0.5), 50.0);
        assert_eq!(quantile(&xs, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
