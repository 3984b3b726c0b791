//! `flotilla bench coordinator` drives N simulated workers (the real worker
//! protocol over TCP, tiny real shards, no trainer) against a real 3-replica
//! cluster: checkpoint rounds, failure to restore directive, leader CPU.
//!
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

use super::HarnessError;
use crate::raft::node::Role;
use crate::testkit::local::{LocalCluster, LocalOptions};
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
    /// Run the replicas with mutual TLS and the client over HTTPS.
    pub tls: bool,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct RaftBenchReport {
    /// Whether the replicas spoke mutual TLS (and the client HTTPS).
    pub tls: bool,
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
pub async fn raft_bench(
    bin: &Path,
    dir: &Path,
    opts: &RaftBenchOptions,
) -> Result<RaftBenchReport, HarnessError> {
    let certs = opts.tls.then(|| dir.join("certs"));
    let quiet =
        LocalOptions { log_filter: Some("warn".into()), tls_dir: certs.clone(), ..LocalOptions::default() };
    let mut cluster =
        LocalCluster::start(bin, dir, 3, quiet).map_err(|e| format!("cannot start the cluster: {e}"))?;
    let timeout = Duration::from_secs(30);
    let leader = cluster.wait_for_leader(timeout).await?;

    let http = crate::client::http_client(certs.map(|c| c.join("ca.pem")).as_deref())?;
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
            return Err(format!("proposal {i} failed: HTTP {}", resp.status()).into());
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
                return Err(format!("no new leader within {timeout:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failovers.push(start.elapsed().as_secs_f64() * 1e3);
        cluster.spawn(leader).map_err(|e| format!("cannot restart node {leader}: {e}"))?;
        cluster.wait_for_leader(timeout).await?;
    }

    Ok(RaftBenchReport {
        tls: opts.tls,
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

/// Options of `bench coordinator`.
#[derive(Debug, Clone)]
pub struct CoordinatorBenchOptions {
    /// Simulated workers (ranks of one job).
    pub workers: u32,
    /// Checkpoint rounds to time.
    pub rounds: usize,
    /// Worker failures to time.
    pub failures: usize,
    /// Processes to spread the simulated workers over.
    pub procs: u32,
    /// The workers' heartbeat period (the job's `heartbeat_interval_ms`).
    pub heartbeat_ms: u64,
    /// Where the simulated workers write their shards (default: beside the
    /// replicas' data). On tmpfs their fsyncs cost nothing, so the round is
    /// the coordinator's work, not one disk flushing every worker's file.
    pub shard_root: Option<std::path::PathBuf>,
    /// Each process's ranks share one node session (one connection,
    /// batched frames) instead of a connection per rank.
    pub node_sessions: bool,
}

/// The report of `bench coordinator` (SPEC §8 keys).
#[derive(Debug, Clone, Serialize)]
pub struct CoordinatorBenchReport {
    /// Simulated workers.
    pub workers: u32,
    /// Rounds timed.
    pub rounds: usize,
    /// Median checkpoint round, begin to commit, from the ledger's times.
    pub round_p50_ms: f64,
    /// 99th percentile of the same.
    pub round_p99_ms: f64,
    /// Median time from a worker's connection dropping to another worker
    /// receiving the restore directive (includes the 500 ms reconnect grace).
    pub detect_to_restore_ms: f64,
    /// Leader CPU during the rounds, in cores per simulated worker.
    pub leader_cpu_cores_per_worker: f64,
    /// The leader's resident memory grown from before the workers
    /// registered to after the rounds, per simulated worker.
    pub leader_rss_bytes_per_worker: f64,
    /// Proposals the leader applied per second during the rounds.
    pub proposals_per_second: f64,
    /// Processes the simulated workers ran in.
    pub procs: u32,
    /// Whether each process's ranks shared one node session.
    pub node_sessions: bool,
}

/// A simulated rank's first registration (no state yet: step 0).
fn sim_register(
    job: &flotilla_shared::ids::JobName,
    rank: u32,
    incarnation: u64,
) -> flotilla_shared::wire::WorkerMessage {
    use flotilla_shared::ids::{Incarnation, Rank, Step};
    flotilla_shared::wire::WorkerMessage::Register {
        job: job.clone(),
        rank: Some(Rank(rank)),
        incarnation: Incarnation(incarnation),
        http_addr: None,
        generation: None,
        step: Step(0),
        host: None,
    }
}

/// A simulated worker's connection.
type SimConn = flotilla_shared::frame::Connection<
    tokio::net::TcpStream,
    flotilla_shared::wire::CoordinatorMessage,
    flotilla_shared::wire::WorkerMessage,
>;

/// Connects to the leader among `endpoints` and sends `register` until the
/// first answer is one `accepted` takes, following `NotLeader`. Like a real
/// worker it retries whatever fails (thousands connecting at once can
/// overflow a listen backlog), with a jittered backoff.
async fn connect_registered(
    endpoints: &[String],
    who: &str,
    register: flotilla_shared::wire::WorkerMessage,
    accepted: impl Fn(&flotilla_shared::wire::CoordinatorMessage) -> bool,
) -> SimConn {
    use flotilla_shared::frame::{client_handshake, DEFAULT_MAX_FRAME};
    use flotilla_shared::wire::{CoordinatorMessage, PeerRole};
    use futures::{SinkExt, StreamExt};
    let attempt = |target: String| {
        let register = register.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(&target).await.map_err(|e| e.to_string())?;
            let (mut c, _): (SimConn, _) =
                client_handshake(stream, PeerRole::Worker, None, DEFAULT_MAX_FRAME)
                    .await
                    .map_err(|e| e.to_string())?;
            c.send(register).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((c.next().await, c))
        }
    };
    let mut target = endpoints[0].clone();
    let mut backoff = Duration::from_millis(50);
    loop {
        let why = match attempt(target.clone()).await {
            Ok((Some(Ok(m)), c)) if accepted(&m) => return c,
            Ok((Some(Ok(CoordinatorMessage::NotLeader { leader: Some(l) })), _)) => {
                target = l;
                continue;
            }
            Ok((other, _)) => format!("{other:?}"),
            Err(e) => e,
        };
        tracing::debug!("{who}: {why}; retrying");
        let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 + 1));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        target = endpoints[(endpoints.iter().position(|e| *e == target).unwrap_or(0) + 1) % endpoints.len()]
            .clone();
    }
}

/// A simulated worker of job `job`: the real protocol over real TCP, no
/// trainer; it writes a real (tiny) shard for each checkpoint so commits
/// are genuine, and reports every restore directive on `restores`. Runs
/// until the job stops it or the connection fails.
pub async fn sim_worker(
    endpoints: Vec<String>,
    job: &str,
    heartbeat_ms: u64,
    rank: u32,
    incarnation: u64,
    restores: tokio::sync::mpsc::UnboundedSender<(u32, Instant)>,
) -> Result<(), HarnessError> {
    use flotilla_shared::ids::{Generation, JobName, Rank, Step};
    use flotilla_shared::layout::shard_file_name;
    use flotilla_shared::shard::{write_shard, Dtype, ShardMeta, VariableSpec};
    use flotilla_shared::wire::{CoordinatorMessage, WorkerMessage, WorkerStatus};
    use futures::{SinkExt, StreamExt};

    let job = JobName::new(job).map_err(|e| e.to_string())?;
    let register = sim_register(&job, rank, incarnation);
    let registered = |m: &CoordinatorMessage| matches!(m, CoordinatorMessage::Registered { .. });
    let mut conn = connect_registered(&endpoints, &format!("sim worker {rank}"), register, registered).await;
    let vars = vec![VariableSpec::new("model/w", Dtype::F32, vec![256])];
    let data = vec![0u8; 1024];
    let mut generation = Generation(1);
    let mut step = 0u64;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_ms));
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                step += 10;
                let hb = WorkerMessage::Heartbeat { generation, step: Step(step), status: WorkerStatus::Running };
                conn.send(hb).await.map_err(|e| e.to_string())?;
            }
            msg = conn.next() => match msg.ok_or("closed")?.map_err(|e| e.to_string())? {
                CoordinatorMessage::Resume { generation: g, step: s } => { generation = g; step = s.0; }
                CoordinatorMessage::Checkpoint { generation: g, checkpoint, step: s, dir } => {
                    // save at once (no training to wait for); the reported
                    // step keeps its steady pace so the leader's rate
                    // estimate stays that of a real trainer
                    let meta = ShardMeta { job: job.clone(), checkpoint, rank: Rank(rank), step: s, generation: g };
                    let path = dir.join(shard_file_name(Rank(rank)));
                    let (vars, data) = (vars.clone(), data.clone());
                    let manifest = tokio::task::spawn_blocking(move || {
                        std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(|e| e.to_string())?;
                        write_shard(&path, &meta, &vars, &data).map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(|e| e.to_string())??;
                    conn.send(WorkerMessage::ShardSaved { generation: g, checkpoint, manifest: manifest.digest() }).await.map_err(|e| e.to_string())?;
                }
                CoordinatorMessage::Restore { generation: g, from, .. } => {
                    let _ = restores.send((rank, Instant::now()));
                    generation = g;
                    step = from.map_or(0, |p| p.step.0);
                    conn.send(WorkerMessage::Restored { generation: g, step: Step(step), source: None }).await.map_err(|e| e.to_string())?;
                }
                CoordinatorMessage::Stop { .. } => return Ok(()),
                _ => {}
            },
        }
    }
}

fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command name (which is in parentheses)
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// What the parent tells a simulated node about one of its ranks.
pub enum NodeControl {
    /// The rank's process dies: the node says it `Left`.
    Drop(u32),
    /// A new process of the rank (a new incarnation) registers.
    Start(u32, u64),
}

/// A simulated node: ranks `ranks` of job `job` on one node session (one
/// connection, every frame a batch), as a node agent for a host's ranks
/// would speak it. Like [`sim_worker`], no trainer: each checkpoint is a
/// real tiny shard per rank, and every restore directive is reported.
/// Runs until the job stops it, `control` closes, or the connection fails.
pub async fn sim_node(
    endpoints: Vec<String>,
    job: String,
    heartbeat_ms: u64,
    ranks: std::ops::Range<u32>,
    first_incarnation: u64,
    mut control: tokio::sync::mpsc::UnboundedReceiver<NodeControl>,
    restores: tokio::sync::mpsc::UnboundedSender<(u32, Instant)>,
) -> Result<(), HarnessError> {
    use flotilla_shared::ids::{Generation, JobName, Rank, Step};
    use flotilla_shared::layout::shard_file_name;
    use flotilla_shared::shard::{write_shard, Dtype, ShardMeta, VariableSpec};
    use flotilla_shared::wire::{CoordinatorMessage, ErrorCode, ForRank, WorkerMessage, WorkerStatus};
    use futures::{SinkExt, StreamExt};

    let job = JobName::new(&job).map_err(|e| e.to_string())?;
    let register = |rank: u32, incarnation: u64| ForRank {
        rank: Rank(rank),
        msg: sim_register(&job, rank, incarnation),
    };
    // each live rank: its generation, step and incarnation
    let mut live: std::collections::BTreeMap<u32, (Generation, u64, u64)> =
        ranks.clone().map(|r| (r, (Generation(1), 0, first_incarnation + u64::from(r)))).collect();
    let batch = WorkerMessage::Batch(live.iter().map(|(r, (_, _, inc))| register(*r, *inc)).collect());
    let answered = |m: &CoordinatorMessage| matches!(m, CoordinatorMessage::Batch(_));
    let mut conn = connect_registered(&endpoints, &format!("sim node {ranks:?}"), batch, answered).await;
    let vars = vec![VariableSpec::new("model/w", Dtype::F32, vec![256])];
    let data = vec![0u8; 1024];
    let (saved_tx, mut saved_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<ForRank<WorkerMessage>>>();
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_ms));
    loop {
        let out: Vec<ForRank<WorkerMessage>> = tokio::select! {
            _ = heartbeat.tick() => live
                .iter_mut()
                .map(|(rank, (generation, step, _))| {
                    *step += 10;
                    let msg = WorkerMessage::Heartbeat { generation: *generation, step: Step(*step), status: WorkerStatus::Running };
                    ForRank { rank: Rank(*rank), msg }
                })
                .collect(),
            Some(saved) = saved_rx.recv() => saved,
            c = control.recv() => match c {
                None => return Ok(()),
                Some(NodeControl::Drop(rank)) => {
                    live.remove(&rank);
                    vec![ForRank { rank: Rank(rank), msg: WorkerMessage::Left }]
                }
                Some(NodeControl::Start(rank, incarnation)) => {
                    live.insert(rank, (Generation(1), 0, incarnation));
                    vec![register(rank, incarnation)]
                }
            },
            frame = conn.next() => {
                let items = match frame.ok_or("closed")?.map_err(|e| e.to_string())? {
                    CoordinatorMessage::Batch(items) => items,
                    CoordinatorMessage::Alive => continue,
                    other => return Err(format!("unexpected {other:?} on a node session").into()),
                };
                let mut replies = Vec::new();
                let mut writes = Vec::new();
                for ForRank { rank, msg } in items {
                    let Some((generation, step, incarnation)) = live.get_mut(&rank.0) else { continue };
                    match msg {
                        CoordinatorMessage::Resume { generation: g, step: s } => { *generation = g; *step = s.0; }
                        CoordinatorMessage::Checkpoint { generation: g, checkpoint, step: s, dir } => {
                            let meta = ShardMeta { job: job.clone(), checkpoint, rank, step: s, generation: g };
                            writes.push((dir.join(shard_file_name(rank)), meta));
                        }
                        CoordinatorMessage::Restore { generation: g, from, .. } => {
                            let _ = restores.send((rank.0, Instant::now()));
                            *generation = g;
                            *step = from.map_or(0, |p| p.step.0);
                            replies.push(ForRank { rank, msg: WorkerMessage::Restored { generation: g, step: Step(*step), source: None } });
                        }
                        CoordinatorMessage::Stop { .. } => return Ok(()),
                        // the leader closed this rank's registration (e.g. it
                        // took over as these arrived): register it again
                        CoordinatorMessage::Error(e) if e.code == ErrorCode::Unavailable => {
                            replies.push(register(rank.0, *incarnation));
                        }
                        _ => {}
                    }
                }
                if !writes.is_empty() {
                    // the node's shards of this checkpoint, written off the
                    // connection's task and reported in one frame
                    let (vars, data, tx) = (vars.clone(), data.clone(), saved_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let saved = writes
                            .into_iter()
                            .filter_map(|(path, meta)| {
                                std::fs::create_dir_all(path.parent()?).ok()?;
                                let (rank, generation, checkpoint) = (meta.rank, meta.generation, meta.checkpoint);
                                let manifest = write_shard(&path, &meta, &vars, &data).ok()?;
                                Some(ForRank { rank, msg: WorkerMessage::ShardSaved { generation, checkpoint, manifest: manifest.digest() } })
                            })
                            .collect();
                        let _ = tx.send(saved);
                    });
                }
                replies
            }
        };
        if !out.is_empty() {
            conn.send(WorkerMessage::Batch(out)).await.map_err(|e| e.to_string())?;
        }
    }
}

/// `flotilla bench sim-workers`: ranks `ranks` of job `job` as simulated
/// workers in this process, driven by the parent `bench coordinator` over
/// pipes, so that many processes can share the load of thousands of ranks:
/// - stdin `drop RANK`: the rank's connection drops (as if its process
///   died); `start RANK`: a new process of it, a new incarnation, registers;
/// - stdout `restore RANK UNIX_NS`: the rank received a restore directive.
///
/// With `node`, the ranks share one node session (one connection, batched
/// frames), as the ranks of one host behind a node agent; otherwise each
/// rank has its own connection, as a `flotilla worker` does.
///
/// Runs until stdin closes.
pub async fn sim_workers(
    endpoints: Vec<String>,
    job: String,
    heartbeat_ms: u64,
    ranks: std::ops::Range<u32>,
    node: bool,
) -> Result<(), HarnessError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (restore_tx, mut restore_rx) = tokio::sync::mpsc::unbounded_channel::<(u32, Instant)>();
    // incarnations unique across processes and drops: this process's start time
    let mut incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    let spawn = |rank: u32, incarnation: u64| {
        let (endpoints, job, tx) = (endpoints.clone(), job.clone(), restore_tx.clone());
        tokio::spawn(async move {
            if let Err(e) = sim_worker(endpoints, &job, heartbeat_ms, rank, incarnation, tx).await {
                tracing::debug!("sim worker {rank}: {e}");
            }
        })
    };
    let mut tasks = std::collections::HashMap::new();
    let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
    let node_task = if node {
        let (endpoints, job, tx, ranks) = (endpoints.clone(), job.clone(), restore_tx.clone(), ranks.clone());
        let first = incarnation;
        incarnation += u64::from(ranks.end);
        Some(tokio::spawn(async move {
            if let Err(e) = sim_node(endpoints, job, heartbeat_ms, ranks.clone(), first, control_rx, tx).await
            {
                tracing::warn!("sim node {ranks:?}: {e}");
            }
        }))
    } else {
        for rank in ranks.clone() {
            incarnation += 1;
            tasks.insert(rank, spawn(rank, incarnation));
        }
        None
    };
    let printer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some((rank, at)) = restore_rx.recv().await {
            let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
                - at.elapsed();
            let line = format!("restore {rank} {}\n", unix.as_nanos());
            if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
                return;
            }
        }
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| format!("stdin: {e}"))? {
        let (verb, rank) = line.split_once(' ').unwrap_or((&line, ""));
        let rank = rank.trim().parse::<u32>().ok().filter(|r| ranks.contains(r));
        match (verb, rank, node) {
            ("drop", Some(rank), true) => {
                let _ = control_tx.send(NodeControl::Drop(rank));
            }
            ("start", Some(rank), true) => {
                incarnation += 1;
                let _ = control_tx.send(NodeControl::Start(rank, incarnation));
            }
            ("drop", Some(rank), false) => {
                if let Some(task) = tasks.remove(&rank) {
                    task.abort();
                }
            }
            ("start", Some(rank), false) => {
                incarnation += 1;
                if let Some(old) = tasks.insert(rank, spawn(rank, incarnation)) {
                    old.abort();
                }
            }
            _ => {
                return Err(format!(
                    "stdin: {line:?} is not `drop RANK` or `start RANK` for a rank in {ranks:?}"
                )
                .into())
            }
        }
    }
    for (_, task) in tasks {
        task.abort();
    }
    if let Some(task) = node_task {
        task.abort();
    }
    printer.abort();
    Ok(())
}

/// Resident memory of process `pid`, in bytes.
fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The leader's applied proposals so far (its `/metrics`).
async fn applied_proposals(http: &reqwest::Client, url: &str) -> Option<f64> {
    let text = http.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find(|l| l.starts_with("flotilla_raft_proposals_total{outcome=\"applied\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Runs `bench coordinator` with the `flotilla` binary at `bin`, under `dir`.
pub async fn coordinator_bench(
    bin: &Path,
    dir: &Path,
    opts: &CoordinatorBenchOptions,
) -> Result<CoordinatorBenchReport, HarnessError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let quiet = LocalOptions { log_filter: Some("warn".into()), ..LocalOptions::default() };
    let cluster =
        LocalCluster::start(bin, dir, 3, quiet).map_err(|e| format!("cannot start the cluster: {e}"))?;
    let timeout = Duration::from_secs(30 + u64::from(opts.workers) / 100);
    let leader = cluster.wait_for_leader(timeout).await?;
    let client = crate::client::Client::new(vec![cluster.url(leader)], None);
    let spec = format!(
        "name = \"bench\"\nworld_size = {}\n[checkpoint]\nevery_steps = 1000000000000\nkeep_last = 100000\nroot = \"{}\"\n\
         [failure]\nheartbeat_interval_ms = {}\nheartbeat_timeout_ms = {}\nmax_restarts = 1000\n",
        opts.workers,
        opts.shard_root.clone().unwrap_or_else(|| dir.join("ckpt")).display(),
        opts.heartbeat_ms,
        (opts.heartbeat_ms * 10).max(5000),
    );
    client.submit(&spec).await.map_err(|e| e.to_string())?;
    let leader_pid = cluster.nodes[leader.0 as usize - 1].pid().ok_or("leader not running")?;
    let rss0 = process_rss_bytes(leader_pid);

    // the simulated workers, in `procs` processes of contiguous ranks
    let procs = opts.procs.clamp(1, opts.workers);
    let per = opts.workers.div_ceil(procs);
    let (restore_tx, mut restore_rx) = tokio::sync::mpsc::unbounded_channel::<(u32, u128)>();
    let mut children = Vec::new();
    for k in 0..procs {
        let ranks = (k * per)..((k + 1) * per).min(opts.workers);
        if ranks.is_empty() {
            continue;
        }
        let log =
            std::fs::File::create(dir.join(format!("sim-workers-{k}.log"))).map_err(|e| e.to_string())?;
        let mut child = tokio::process::Command::new(bin)
            .args(["bench", "sim-workers", "--endpoints", &cluster.api_endpoints(), "--job", "bench"])
            .args(["--heartbeat-ms", &opts.heartbeat_ms.to_string()])
            .args(["--ranks", &format!("{}..{}", ranks.start, ranks.end)])
            .args(opts.node_sessions.then_some("--node-session"))
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start simulated workers: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let tx = restore_tx.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut parts = line.split(' ').skip(1);
                let rank = parts.next().and_then(|r| r.parse().ok());
                let at = parts.next().and_then(|t| t.parse().ok());
                if let (Some(rank), Some(at)) = (rank, at) {
                    let _ = tx.send((rank, at));
                }
            }
        });
        children.push((ranks, child));
    }
    let wait_running = || async {
        let deadline = Instant::now() + timeout;
        loop {
            let job = client.status(Some("bench")).await.ok().and_then(|s| s.jobs.into_iter().next());
            if job.as_ref().is_some_and(|j| j.state == "running") {
                return Ok(());
            }
            if Instant::now() > deadline {
                let seen = job.map_or("no status".to_string(), |j| {
                    let mut states = std::collections::BTreeMap::<String, u32>::new();
                    for w in &j.workers {
                        *states.entry(w.state.to_string()).or_default() += 1;
                    }
                    format!(
                        "it is {} in generation {} after {} restores, ranks by state {states:?}, error {:?}",
                        j.state, j.generation, j.restores, j.error
                    )
                });
                return Err(format!("the bench job is not running after {timeout:?}: {seen}"));
            }
            // each answer lists every rank: not too often
            tokio::time::sleep(Duration::from_millis(20 + u64::from(opts.workers) / 50)).await;
        }
    };
    wait_running().await?;

    let http = reqwest::Client::new();
    let proposals0 = applied_proposals(&http, &cluster.url(leader)).await;
    let cpu0 = process_cpu_seconds(leader_pid);
    let wall0 = Instant::now();
    for _ in 0..opts.rounds {
        client.checkpoint("bench").await.map_err(|e| e.to_string())?;
    }
    let wall = wall0.elapsed().as_secs_f64();
    let cpu = cpu0.zip(process_cpu_seconds(leader_pid)).map_or(f64::NAN, |(a, b)| b - a);
    let proposals =
        proposals0.zip(applied_proposals(&http, &cluster.url(leader)).await).map_or(f64::NAN, |(a, b)| b - a);
    let rss = rss0.zip(process_rss_bytes(leader_pid)).map_or(f64::NAN, |(a, b)| b.saturating_sub(a) as f64);
    let status = client.status(Some("bench")).await.map_err(|e| e.to_string())?;
    // the ledger's own begin and commit times (every checkpoint is kept)
    let round_times: Vec<f64> = status.jobs[0]
        .checkpoints
        .iter()
        .filter(|c| c.state == "committed")
        .filter_map(|c| c.ended_ms.map(|e| e.saturating_sub(c.begun_ms) as f64))
        .collect();

    let mut detect = Vec::new();
    for i in 0..opts.failures {
        let victim = (i as u32 * 7919) % opts.workers;
        while restore_rx.try_recv().is_ok() {}
        let (_, child) =
            children.iter_mut().find(|(r, _)| r.contains(&victim)).ok_or("no process for the rank")?;
        let stdin = child.stdin.as_mut().ok_or("no stdin")?;
        let dropped = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_nanos();
        stdin.write_all(format!("drop {victim}\n").as_bytes()).await.map_err(|e| e.to_string())?;
        stdin.flush().await.map_err(|e| e.to_string())?;
        let first = loop {
            let (rank, at) = tokio::time::timeout(timeout, restore_rx.recv())
                .await
                .map_err(|_| "no restore directive after a worker failure".to_string())?
                .ok_or("restore channel closed")?;
            if rank != victim && at >= dropped {
                break at;
            }
        };
        detect.push((first - dropped) as f64 / 1e6);
        let stdin = child.stdin.as_mut().ok_or("no stdin")?;
        stdin.write_all(format!("start {victim}\n").as_bytes()).await.map_err(|e| e.to_string())?;
        stdin.flush().await.map_err(|e| e.to_string())?;
        wait_running().await?;
    }
    drop(children);
    Ok(CoordinatorBenchReport {
        workers: opts.workers,
        procs,
        node_sessions: opts.node_sessions,
        rounds: round_times.len(),
        round_p50_ms: quantile(&round_times, 0.5),
        round_p99_ms: quantile(&round_times, 0.99),
        detect_to_restore_ms: quantile(&detect, 0.5),
        leader_cpu_cores_per_worker: cpu / wall / f64::from(opts.workers),
        leader_rss_bytes_per_worker: rss / f64::from(opts.workers),
        proposals_per_second: proposals / wall,
    })
}
