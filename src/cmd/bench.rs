//! `flotilla bench`: the drivers of the performance harness (`bench exec`
//! is in `bench_exec`), and their reports as tables.

use super::Usage;
use crate::cli::{CoordinatorBenchArgs, CopyBenchArgs, RaftArgs, SimWorkersArgs, SnapshotArgs};
use anyhow::{bail, Context, Result};
use flotilla_worker::bench::{snapshot_bench, SnapshotBenchOptions, SnapshotBenchReport};
use std::path::PathBuf;

/// `bench sim-workers`: the simulated workers `bench coordinator` starts.
pub(crate) fn run_sim_workers(args: SimWorkersArgs) -> Result<()> {
    let (start, end) = args
        .ranks
        .split_once("..")
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| Usage(format!("--ranks {:?}: expected START..END", args.ranks)))?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        flotilla_coordinator::testkit::bench::sim_workers(
            args.endpoints,
            args.job,
            args.heartbeat_ms,
            start..end,
            args.node_session,
        )
        .await
        .map_err(anyhow::Error::msg)
    })
}

/// A scratch directory (under `--dir` or the temp dir) for a benchmark's
/// local cluster, and this binary, which the cluster's processes run.
fn bench_cluster_dir(prefix: &str, dir: Option<&PathBuf>) -> Result<(tempfile::TempDir, PathBuf)> {
    let temp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(dir.cloned().unwrap_or_else(std::env::temp_dir))?;
    Ok((temp, std::env::current_exe()?))
}

pub(crate) async fn run_bench_coordinator(args: CoordinatorBenchArgs) -> Result<()> {
    if args.workers == 0 || args.rounds == 0 {
        return Err(Usage("--workers and --rounds must be at least 1".into()).into());
    }
    let (temp, bin) = bench_cluster_dir("flotilla-bench-coordinator-", args.dir.as_ref())?;
    let opts = flotilla_coordinator::testkit::bench::CoordinatorBenchOptions {
        workers: args.workers,
        rounds: args.rounds,
        failures: args.failures,
        procs: args.procs.unwrap_or_else(|| args.workers.div_ceil(512).clamp(1, 8)),
        heartbeat_ms: args.heartbeat_ms,
        shard_root: args.shard_dir.clone(),
        node_sessions: args.node_sessions,
    };
    let r = match flotilla_coordinator::testkit::bench::coordinator_bench(&bin, temp.path(), &opts).await {
        Ok(r) => r,
        // the replicas' and simulated workers' logs tell why: kept
        Err(e) => {
            bail!("{e} (the replicas' and simulated workers' logs are kept in {})", temp.keep().display())
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "bench coordinator: {} simulated workers in {} processes ({}) against 3 replicas on loopback, fsync on",
        r.workers,
        r.procs,
        if r.node_sessions { "one node session each" } else { "a connection per worker" }
    );
    println!(
        "checkpoint round, begin to commit ({} rounds): p50 {:.0} ms, p99 {:.0} ms",
        r.rounds, r.round_p50_ms, r.round_p99_ms
    );
    println!("worker connection lost -> restore directive at the others: median {:.0} ms (500 ms of it is the reconnect grace)", r.detect_to_restore_ms);
    println!("leader CPU during the rounds: {:.5} cores per worker", r.leader_cpu_cores_per_worker);
    println!(
        "leader memory: {:.0} bytes per worker (resident, grown since before they registered)",
        r.leader_rss_bytes_per_worker
    );
    println!("proposals applied by the leader during the rounds: {:.1} per second", r.proposals_per_second);
    Ok(())
}

pub(crate) async fn run_bench_raft(args: RaftArgs) -> Result<()> {
    let (temp, bin) = bench_cluster_dir("flotilla-bench-raft-", args.dir.as_ref())?;
    let mut reports = Vec::new();
    for tls in [false, true].into_iter().take(1 + usize::from(args.tls)) {
        let opts = flotilla_coordinator::testkit::bench::RaftBenchOptions {
            proposals: args.proposals,
            failovers: args.failovers,
            tls,
        };
        // each cluster in a directory of its own
        let dir = temp.path().join(if tls { "tls" } else { "plain" });
        std::fs::create_dir_all(&dir)?;
        let r = flotilla_coordinator::testkit::bench::raft_bench(&bin, &dir, &opts)
            .await
            .map_err(anyhow::Error::msg)?;
        reports.push(r);
    }
    if args.json {
        // one report as before; with --tls, [plain, tls]
        let json = match &reports[..] {
            [one] => serde_json::to_string_pretty(one)?,
            both => serde_json::to_string_pretty(both)?,
        };
        println!("{json}");
        return Ok(());
    }
    println!("bench raft: 3 replicas on loopback, fsync on, data in {}", temp.path().display());
    for r in &reports {
        print_raft_report(r);
    }
    if let [plain, tls] = &reports[..] {
        println!(
            "mutual TLS / plain: commit p50 {:.2}x, p99 {:.2}x, failover median {:.2}x",
            tls.commit_p50_ms / plain.commit_p50_ms,
            tls.commit_p99_ms / plain.commit_p99_ms,
            tls.failover_p50_ms / plain.failover_p50_ms
        );
    }
    Ok(())
}

fn print_raft_report(r: &flotilla_coordinator::testkit::bench::RaftBenchReport) {
    println!(
        "--- {}",
        if r.tls {
            "mutual TLS between replicas, HTTPS client"
        } else {
            "plain TCP between replicas, HTTP client"
        }
    );
    println!(
        "commit latency ({} sequential proposals, client-side): p50 {:.2} ms, p99 {:.2} ms",
        r.proposals, r.commit_p50_ms, r.commit_p99_ms
    );
    println!(
        "baseline 4 KiB write + fdatasync, same disk:            p50 {:.2} ms, p99 {:.2} ms",
        r.fsync_p50_ms, r.fsync_p99_ms
    );
    let runs: Vec<String> = r.failover_ms.iter().map(|ms| format!("{ms:.0}")).collect();
    println!(
        "leader failover (SIGKILL -> new leader serving status): median {:.0} ms over [{}] ms",
        r.failover_p50_ms,
        runs.join(", ")
    );
}

pub(crate) fn run_bench_copy(args: CopyBenchArgs) -> Result<()> {
    if args.bytes < 1 << 20 || args.runs == 0 {
        return Err(Usage("--bytes must be at least 1048576 and --runs at least 1".into()).into());
    }
    let r = flotilla_worker::copies::bench::run(args.bytes, args.runs, &args.dir)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("bench copy in {}", args.dir.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let gbps = |s: f64| r.bytes as f64 / s.max(1e-9) / 1e9;
    println!(
        "memory copy of a {:.1} MiB shard on loopback, median of {} runs:",
        r.bytes as f64 / (1 << 20) as f64,
        r.runs.len()
    );
    println!(
        "  peer fetch (GET from a worker's copy):  {:>7.1} ms  {:>5.2} GB/s",
        r.peer_s() * 1e3,
        gbps(r.peer_s())
    );
    println!(
        "  plain TCP copy of the same bytes:       {:>7.1} ms  {:>5.2} GB/s",
        r.tcp_s() * 1e3,
        gbps(r.tcp_s())
    );
    println!("  peer / TCP throughput (median ratio):   {:>7.2}x", r.ratio());
    println!(
        "  then the restorer's verification:       {:>7.1} ms  {:>5.2} GB/s",
        r.verify_s() * 1e3,
        gbps(r.verify_s())
    );
    Ok(())
}

pub(crate) fn run_bench_snapshot(args: SnapshotArgs) -> Result<()> {
    if args.bytes < 1 << 20 {
        return Err(
            Usage(format!("--bytes {} is too small to measure; use at least 1048576", args.bytes)).into()
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
    row("baseline: write + fdatasync", mb / r.baseline_write_mb_per_s);
    row(
        if r.cold_read { "read + verify (cold cache)" } else { "read + verify (warm cache)" },
        mb / r.read_verify_mb_per_s,
    );
    row("baseline: plain read, one thread", mb / r.plain_read_mb_per_s);
    println!(
        "shard write vs baseline: {:.2}x   stall vs write: {:.3}x   training during writes: {}",
        r.write_vs_baseline,
        r.stall_vs_write,
        if r.train_during_write { "yes" } else { "no (--train-during-write)" }
    );
    println!(
        "read + verify vs plain read: {:.2}x (below 1: the parallel check beats an unchecked read)",
        r.read_verify_vs_plain_read
    );
}
