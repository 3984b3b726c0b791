//! `flotilla`: the one binary. Parses the command line and calls into the
//! crates; nothing here decides anything.

mod bench_exec;
mod demo;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use flotilla_coordinator::client::Client;
use flotilla_coordinator::server;
use flotilla_shared::frame::Tokens;
use flotilla_shared::ids::{JobName, Rank};
use flotilla_shared::inspect::inspect;
use flotilla_shared::spec::JobSpec;
use flotilla_worker::agent::{self, WorkerOptions};
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
    /// Runs one coordinator replica (a Raft member).
    Coordinator(CoordinatorArgs),
    /// Runs one worker agent for one rank of one job (the built-in trainer).
    Worker(WorkerArgs),
    /// Runs a host's node agent: the workers of this host connect to it, and it carries
    /// all their ranks to the leader on one connection.
    Node(NodeArgs),
    /// Starts a local cluster (3 coordinators, 4 workers), injects a failure, shows the whole cycle.
    Demo(demo::DemoArgs),
    /// Submits a job spec (replicated through Raft); idempotent for an identical spec.
    Submit(SubmitArgs),
    /// Asks for a checkpoint now; waits until it is committed and prints its id and step.
    Checkpoint(JobArgs),
    /// Lists a job's checkpoints: id, step, generation, state, bytes, time, and why one
    /// was aborted, condemned or abandoned; --verify re-checks a condemned one.
    Checkpoints(CheckpointsArgs),
    /// Operator-initiated whole-job restore (latest committed checkpoint by default).
    Restore(RestoreArgs),
    /// Cluster and job status (leader, term, generation, step, checkpoints, workers).
    Status(StatusArgs),
    /// Lists a checkpoint's variables per rank (offline); --verify re-checks every checksum.
    Inspect(InspectArgs),
    /// The coordinator cluster's membership: list, add (as a learner, promoted once caught up), remove.
    #[command(subcommand)]
    Replicas(ReplicasCommand),
    /// Makes the cluster CA (once) and a certificate per replica for --tls-ca/--tls-cert/--tls-key.
    Certs(CertsArgs),
    /// The performance harness.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct CertsArgs {
    /// Where the files go: ca.pem and ca.key (made if absent, reused otherwise),
    /// node-ID.pem and node-ID.key per --node. Keep ca.key offline.
    #[arg(long)]
    dir: PathBuf,
    /// Replica ids to make certificates for (each names flotilla-node-ID).
    #[arg(long = "node", value_delimiter = ',', required = true)]
    nodes: Vec<u64>,
    /// DNS names or IP addresses the replicas are reached by (HTTP API, worker API);
    /// every certificate made now carries all of them.
    #[arg(long = "host", value_delimiter = ',')]
    hosts: Vec<String>,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// The cluster's name, recorded in the data dir and checked between replicas: a replica
    /// of another cluster, or a data dir of one, is refused.
    #[arg(long, env = "FLOTILLA_CLUSTER_ID", default_value = "flotilla")]
    cluster_id: String,
    /// This replica's id (1..65535), or `auto` (StatefulSet ordinal + 1 from the hostname).
    #[arg(long, env = "FLOTILLA_ID")]
    id: String,
    /// Every voter's Raft address, itself included: 1=HOST:PORT,2=HOST:PORT,...
    /// A single entry (or none) is a one-node cluster.
    #[arg(long, env = "FLOTILLA_PEERS", default_value = "")]
    peers: String,
    /// Where the worker API listens (workers' --coordinators point here).
    #[arg(long, env = "FLOTILLA_API_ADDR")]
    api_addr: Option<String>,
    /// The address workers use to reach this worker API (default: --api-addr).
    #[arg(long, env = "FLOTILLA_ADVERTISE_API")]
    advertise_api: Option<String>,
    /// Where the HTTP API (status, admin, metrics) listens.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9201")]
    http_addr: String,
    /// The URL others use to reach this HTTP API (default: http://<--http-addr>).
    #[arg(long, env = "FLOTILLA_ADVERTISE_HTTP")]
    advertise_http: Option<String>,
    /// Raft log, hard state and snapshots; keep it across restarts.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: PathBuf,
    /// File holding one token for every role (peers, workers and admin calls); the role
    /// files below replace it for their role.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The token coordinator peers present on the Raft port (never give it to workers).
    #[arg(long, env = "FLOTILLA_PEER_TOKEN_FILE")]
    peer_token_file: Option<PathBuf>,
    /// The token workers present on the worker API (the Raft port refuses it).
    #[arg(long, env = "FLOTILLA_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
    /// The token the HTTP API's mutations need (submit, checkpoint, restore, replicas).
    #[arg(long, env = "FLOTILLA_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// The cluster CA (PEM). With --tls-cert and --tls-key: mutual TLS between replicas,
    /// HTTPS on --http-addr and TLS on --api-addr (`flotilla certs` makes them).
    #[arg(long, env = "FLOTILLA_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This replica's certificate (PEM), signed by --tls-ca, naming flotilla-node-<ID> and
    /// the hosts clients and workers reach it by.
    #[arg(long, env = "FLOTILLA_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// A directory laid out as `flotilla certs` writes it: ca.pem, node-<ID>.pem and
    /// node-<ID>.key (instead of the three files; handy with --id auto).
    #[arg(long, env = "FLOTILLA_TLS_DIR", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    tls_dir: Option<PathBuf>,
    /// Serve without any credentials on addresses other hosts can reach.
    #[arg(long)]
    insecure: bool,
    /// A job spec to submit at start-up (idempotent).
    #[arg(long, env = "FLOTILLA_JOB")]
    job: Option<PathBuf>,
    /// Applied log entries between state-machine snapshots (log compaction).
    #[arg(long, env = "FLOTILLA_SNAPSHOT_THRESHOLD", default_value_t = 10_000)]
    snapshot_threshold: u64,
}

#[derive(Args)]
struct WorkerArgs {
    /// The coordinators' worker API addresses (their --api-addr); the leader is found automatically.
    #[arg(long, env = "FLOTILLA_COORDINATORS", value_delimiter = ',', required = true)]
    coordinators: Vec<String>,
    /// The job this worker belongs to.
    #[arg(long, env = "FLOTILLA_JOB_NAME")]
    job: String,
    /// This worker's rank, or `auto` (JOB_COMPLETION_INDEX, or the StatefulSet ordinal of the hostname).
    #[arg(long, env = "FLOTILLA_RANK")]
    rank: String,
    /// Where this worker's HTTP (status, metrics) listens.
    #[arg(long, env = "FLOTILLA_WORKER_HTTP_ADDR")]
    http_addr: Option<String>,
    /// The GPU whose memory restores check (index or UUID).
    #[arg(long, env = "FLOTILLA_GPU")]
    gpu: Option<String>,
    /// Refuse to start where NVML is not available.
    #[arg(long)]
    require_gpu: bool,
    /// File holding the worker token.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The cluster CA (PEM), where the coordinators serve the worker API over TLS.
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Run an external trainer, the command after `--` (docs/TRAINER_PROTOCOL.md):
    /// `--exec -- python3 train.py ARGS`. Without it the built-in trainer runs.
    #[arg(long, requires = "command")]
    exec: bool,
    /// The trainer command (after `--`; needs --exec).
    #[arg(last = true, requires = "exec")]
    command: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL when the worker stops its trainer process group.
    #[arg(long, default_value_t = 10)]
    stop_grace_seconds: u64,
    /// The address other ranks reach rank 0's rendezvous at (MASTER_ADDR); default: the
    /// address this worker reaches its coordinator from.
    #[arg(long, env = "FLOTILLA_MASTER_ADDR")]
    master_addr: Option<String>,
    /// LOCAL_RANK given to the trainer.
    #[arg(long, default_value_t = 0)]
    local_rank: u32,
    /// LOCAL_WORLD_SIZE given to the trainer.
    #[arg(long, default_value_t = 1)]
    local_world_size: u32,
}

#[derive(Args)]
struct NodeArgs {
    /// Where this host's workers connect (give it to them as --coordinators).
    #[arg(long, env = "FLOTILLA_NODE_ADDR", default_value = "127.0.0.1:9300")]
    listen: String,
    /// The coordinators' worker API addresses (their --api-addr); the leader is found automatically.
    #[arg(long, env = "FLOTILLA_COORDINATORS", value_delimiter = ',', required = true)]
    coordinators: Vec<String>,
    /// File holding the worker token: presented to the coordinators, and asked of every local worker.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The cluster CA (PEM), where the coordinators serve the worker API over TLS.
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

#[derive(Args)]
struct ClientArgs {
    /// The coordinators' HTTP addresses; the leader is found automatically.
    #[arg(long, env = "FLOTILLA_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:9201")]
    endpoints: Vec<String>,
    /// File holding the admin token (for mutations).
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The cluster CA (PEM), for https:// endpoints.
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

#[derive(Args)]
struct SubmitArgs {
    /// The job spec (TOML, SPEC §2).
    spec: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct JobArgs {
    /// The job.
    #[arg(long)]
    job: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct CheckpointsArgs {
    /// The job.
    #[arg(long)]
    job: String,
    /// Re-verify condemned checkpoint ID on the leader against the ledger's checksums;
    /// when every shard matches, its verdict is cleared and it is committed again.
    #[arg(long, value_name = "ID")]
    verify: Option<u64>,
    /// Print machine-readable JSON (the job's checkpoints) instead of a table.
    #[arg(long, conflicts_with = "verify")]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Subcommand)]
enum ReplicasCommand {
    /// Voters and learners, their Raft addresses, and (from the leader) how far each has replicated.
    List(ReplicasListArgs),
    /// Adds a replica: started first with `flotilla coordinator --id ID` on an empty data dir, it
    /// joins as a learner, catches up, and is then made a voter.
    Add(AddReplicaArgs),
    /// Removes a replica (voter or learner); stop its process afterwards.
    Remove(RemoveReplicaArgs),
}

#[derive(Args)]
struct ReplicasListArgs {
    /// The membership as JSON (GET /v1/replicas from the leader).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct AddReplicaArgs {
    /// The new replica's --id.
    #[arg(long)]
    id: u64,
    /// Its Raft address (its own --peers entry), HOST:PORT, reachable from every replica.
    #[arg(long)]
    raft_addr: String,
    /// Leave it a learner (no vote); promote later with `replicas add` again.
    #[arg(long)]
    learner: bool,
    /// How long to wait for it to catch up before giving up on the promotion.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct RemoveReplicaArgs {
    /// The replica's --id.
    #[arg(long)]
    id: u64,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct RestoreArgs {
    /// The job.
    #[arg(long)]
    job: String,
    /// A committed checkpoint id (default: the latest committed).
    #[arg(long)]
    checkpoint: Option<u64>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct StatusArgs {
    /// Only this job.
    #[arg(long)]
    job: Option<String>,
    /// Print the JSON of GET /v1/status.
    #[arg(long)]
    json: bool,
    /// Redraw every second (in place on a terminal) until interrupted.
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct InspectArgs {
    /// A job's checkpoint root (<root>/<job>, uses LATEST), a ckpt-* directory or one shard file.
    path: PathBuf,
    /// Re-read every shard and verify every checksum against MANIFEST.json.
    #[arg(long)]
    verify: bool,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// N simulated workers against a real 3-replica cluster: checkpoint rounds, failure to restore, leader CPU.
    Coordinator(CoordinatorBenchArgs),
    /// Simulated workers for `bench coordinator` (started by it; driven over stdin/stdout).
    #[command(hide = true)]
    SimWorkers(SimWorkersArgs),
    /// A real 3-replica coordinator cluster on loopback: commit latency with fsync, leader failover time.
    Raft(RaftArgs),
    /// One rank's checkpoint: training stall, shard write and read+verify, against a plain write + fsync.
    Snapshot(SnapshotArgs),
    /// `--exec` trainers on a real local cluster: a trainer process SIGKILLed → all ranks training again.
    Exec(bench_exec::ExecBenchArgs),
}

#[derive(Args)]
struct CoordinatorBenchArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 32)]
    workers: u32,
    /// Checkpoint rounds to time.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// Worker failures to time.
    #[arg(long, default_value_t = 5)]
    failures: usize,
    /// Processes to run the simulated workers in (default: one per 512, at most 8).
    #[arg(long)]
    procs: Option<u32>,
    /// The simulated workers' heartbeat period, ms (the job's heartbeat_interval_ms).
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Where the simulated workers write their shards (default: beside the replicas' data
    /// dirs). A tmpfs such as /dev/shm takes one disk's fsyncs out of the round.
    #[arg(long)]
    shard_dir: Option<PathBuf>,
    /// Each process's simulated ranks share one node session (one connection, batched frames,
    /// one heartbeat frame for all), as a host's ranks behind a node agent; default: a
    /// connection per rank, as `flotilla worker` has.
    #[arg(long)]
    node_sessions: bool,
    /// Where the replicas keep their data (a temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SimWorkersArgs {
    /// The coordinators' worker API addresses.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// The job.
    #[arg(long)]
    job: String,
    /// The ranks to simulate, START..END (END excluded).
    #[arg(long)]
    ranks: String,
    /// Heartbeat period, ms.
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// One node session for all the ranks.
    #[arg(long)]
    node_session: bool,
}

#[derive(Args)]
struct RaftArgs {
    /// Sequential proposals to time.
    #[arg(long, default_value_t = 200)]
    proposals: usize,
    /// Leader kills (SIGKILL) to time.
    #[arg(long, default_value_t = 7)]
    failovers: usize,
    /// Also run a cluster with mutual TLS between replicas (HTTPS client) and compare.
    #[arg(long)]
    tls: bool,
    /// Where the replicas keep their data (a temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    json: bool,
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

/// `1 rank`, `4 ranks`: a count with its noun.
pub(crate) fn count(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // a flag's value refused by our own checks is bad usage, as clap's are
        Err(e) if e.downcast_ref::<Usage>().is_some() => {
            eprintln!("error: {e:#}\n\nFor more information, try '--help'.");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Bad usage found after parsing (a flag's value out of its range or form):
/// exit code 2, as SPEC §1 says of every usage error.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A command whose output goes to a terminal or a pipe and nowhere else
/// (`inspect DIR | head`): it ends quietly when the reader goes away, as
/// `cat` does, instead of panicking on the failed write. Servers keep
/// SIGPIPE ignored (a dead peer is an error to handle, never a signal).
#[allow(unsafe_code)]
fn end_quietly_on_closed_pipe() {
    // SAFETY: restoring the default disposition of SIGPIPE, before any
    // thread is started, touches no memory.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run(cli: Cli) -> Result<()> {
    if matches!(
        cli.command,
        Command::Status(_)
            | Command::Checkpoints(_)
            | Command::Inspect(_)
            | Command::Submit(_)
            | Command::Checkpoint(_)
            | Command::Restore(_)
            | Command::Replicas(_)
    ) {
        end_quietly_on_closed_pipe();
    }
    match cli.command {
        Command::Coordinator(args) => run_coordinator(args),
        Command::Worker(args) => run_worker(args),
        Command::Node(args) => run_node(args),
        Command::Demo(args) => {
            let matched = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(demo::run(args))?;
            if !matched {
                bail!("the final digest differs from the failure-free reference");
            }
            Ok(())
        }
        Command::Submit(args) => block_on(run_submit(args)),
        Command::Status(args) => block_on(run_status(args)),
        Command::Checkpoint(args) => block_on(run_checkpoint(args)),
        Command::Checkpoints(args) => block_on(run_checkpoints(args)),
        Command::Restore(args) => block_on(async move {
            let v = client(&args.client)?.restore(&args.job, args.checkpoint).await?;
            println!("job {} is restoring into generation {}", args.job, v["generation"]);
            Ok(())
        }),
        Command::Inspect(args) => run_inspect(args),
        Command::Certs(args) => run_certs(args),
        Command::Replicas(cmd) => block_on(run_replicas(cmd)),
        Command::Bench(BenchCommand::Snapshot(args)) => run_bench_snapshot(args),
        Command::Bench(BenchCommand::Raft(args)) => block_on(run_bench_raft(args)),
        Command::Bench(BenchCommand::Exec(args)) => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench_exec::run(args))
        }
        Command::Bench(BenchCommand::SimWorkers(args)) => {
            let (start, end) = args
                .ranks
                .split_once("..")
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
                .ok_or_else(|| Usage(format!("--ranks {:?}: expected START..END", args.ranks)))?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
                flotilla_coordinator::bench::sim_workers(
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
        Command::Bench(BenchCommand::Coordinator(args)) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run_bench_coordinator(args)),
    }
}

async fn run_replicas(cmd: ReplicasCommand) -> Result<()> {
    match cmd {
        ReplicasCommand::List(args) => {
            let v = client(&args.client)?.replicas().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let members =
                v.voters.iter().map(|id| (id, "voter")).chain(v.learners.iter().map(|id| (id, "learner")));
            let rows = members
                .map(|(id, role)| {
                    let role = if Some(*id) == v.leader_id { "leader" } else { role };
                    let p = v.progress.iter().find(|p| p.id == *id);
                    let state = p.map_or(String::new(), |p| {
                        format!(
                            "{}{}",
                            p.state.to_lowercase(),
                            if p.recent_active { "" } else { ", unreachable" }
                        )
                    });
                    vec![
                        id.0.to_string(),
                        role.to_string(),
                        v.addresses.get(id).cloned().unwrap_or_else(|| "?".into()),
                        p.map_or("-".to_string(), |p| p.matched.to_string()),
                        state,
                    ]
                })
                .collect();
            let columns =
                [("id", true), ("role", false), ("raft address", false), ("matched", true), ("state", false)];
            print!("{}", table(&columns, rows));
            if v.progress.is_empty() {
                println!(
                    "(progress is known to the leader only; node {} answered as {:?})",
                    v.node_id, v.role
                );
            } else {
                println!("commit index {}", v.commit_index);
            }
        }
        ReplicasCommand::Add(args) => {
            let c = client(&args.client)?;
            let known = c.replicas().await?;
            if !known.learners.iter().chain(&known.voters).any(|id| id.0 == args.id) {
                c.add_replica(args.id, &args.raft_addr).await?;
                println!("replica {} added as a learner; waiting for it to catch up", args.id);
            }
            if args.learner {
                return Ok(());
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout_seconds);
            loop {
                let v = c.replicas().await?;
                if v.voters.iter().any(|id| id.0 == args.id) {
                    println!("replica {} is a voter", args.id);
                    return Ok(());
                }
                let matched = v.progress.iter().find(|p| p.id.0 == args.id).map_or(0, |p| p.matched);
                if !v.progress.is_empty() && matched >= v.commit_index {
                    c.promote_replica(args.id).await?;
                    continue;
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "replica {} has replicated up to index {matched} of {} after {} s; check that it runs (flotilla coordinator --id {}) and that every replica reaches {}; run this command again to keep waiting",
                        args.id, v.commit_index, args.timeout_seconds, args.id, args.raft_addr
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        ReplicasCommand::Remove(args) => {
            client(&args.client)?.remove_replica(args.id).await?;
            println!("replica {} removed; stop its process now", args.id);
        }
    }
    Ok(())
}

fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

/// The token a client or worker presents: the first of its file.
fn read_token(path: Option<&PathBuf>) -> Result<Option<String>> {
    Ok(read_secret("--token-file", path)?.map(|t| t.present().to_string()))
}

/// A token file: one token per line (several while rotating; the first is
/// presented, any is accepted).
fn read_secret(flag: &str, path: Option<&PathBuf>) -> Result<Option<Tokens>> {
    path.map(|p| {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {flag} {}", p.display()))?;
        Tokens::parse(&text)
            .with_context(|| format!("{flag} {} holds no token; put the token in it", p.display()))
    })
    .transpose()
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    let id = server::resolve_id(&args.id, &hostname()).map_err(Usage)?;
    let mut peers = server::parse_peers(&args.peers).map_err(Usage)?;
    if peers.is_empty() {
        // a one-node cluster: its Raft address is never dialled
        peers.push((id, "127.0.0.1:0".to_string()));
    }
    let job = args
        .job
        .as_ref()
        .map(|p| -> Result<JobSpec> {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("cannot read --job {}", p.display()))?;
            JobSpec::from_toml(&text).with_context(|| format!("--job {}", p.display()))
        })
        .transpose()?;
    let tls = match (&args.tls_dir, &args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(dir), ..) => Some(flotilla_shared::tls::NodeTls::load(
            id,
            &dir.join("ca.pem"),
            &dir.join(format!("node-{id}.pem")),
            &dir.join(format!("node-{id}.key")),
        )?),
        (None, Some(ca), Some(cert), Some(key)) => {
            Some(flotilla_shared::tls::NodeTls::load(id, ca, cert, key)?)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let opts = server::CoordinatorOptions {
        cluster_id: args.cluster_id,
        id,
        peers,
        advertise_http: args
            .advertise_http
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{}", args.http_addr)),
        tls,
        http_addr: args.http_addr,
        api_addr: args.api_addr,
        advertise_api: args.advertise_api,
        data_dir: args.data_dir,
        credentials: {
            let shared = server::Credentials::shared(read_secret("--token-file", args.token_file.as_ref())?);
            server::Credentials {
                peer: read_secret("--peer-token-file", args.peer_token_file.as_ref())?.or(shared.peer),
                worker: read_secret("--worker-token-file", args.worker_token_file.as_ref())?
                    .or(shared.worker),
                admin: read_secret("--admin-token-file", args.admin_token_file.as_ref())?.or(shared.admin),
            }
        },
        insecure: args.insecure,
        job,
        snapshot_threshold: args.snapshot_threshold,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("can install a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            on_signal.cancel();
        });
        server::run(opts, shutdown).await.map_err(anyhow::Error::from)
    })
}

fn run_certs(args: CertsArgs) -> Result<()> {
    let nodes: Vec<flotilla_shared::ids::NodeId> =
        args.nodes.iter().map(|&n| flotilla_shared::ids::NodeId(n)).collect();
    if let Some(bad) = args.nodes.iter().find(|&&n| n == 0 || n > 65535) {
        return Err(Usage(format!("--node {bad}: replica ids are 1..65535")).into());
    }
    let made = flotilla_shared::tls::generate(&args.dir, &nodes, &args.hosts)?;
    if made.new_ca {
        println!("made the cluster CA in {} (ca.pem; keep ca.key offline)", args.dir.display());
    } else {
        println!("signed with the existing CA in {}", args.dir.display());
    }
    for f in &made.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn resolve_rank(flag: &str) -> Result<Rank> {
    if flag != "auto" {
        return flag
            .parse()
            .map(Rank)
            .map_err(|_| anyhow::anyhow!("--rank {flag:?} must be a number or auto"));
    }
    if let Ok(index) = std::env::var("JOB_COMPLETION_INDEX") {
        return index
            .parse()
            .map(Rank)
            .map_err(|_| anyhow::anyhow!("JOB_COMPLETION_INDEX={index:?} is not a number"));
    }
    let host = hostname();
    host.rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .map(Rank)
        .ok_or_else(|| anyhow::anyhow!("--rank auto needs JOB_COMPLETION_INDEX (Indexed Job) or a hostname ending in -<ordinal>, got {host:?}"))
}

fn run_worker(args: WorkerArgs) -> Result<()> {
    // the trainer's device: --gpu, else the first of CUDA_VISIBLE_DEVICES
    // (which the trainer inherits then)
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let device = args.gpu.clone().or_else(|| {
        visible.as_deref().and_then(|v| v.split(',').next()).filter(|d| !d.is_empty()).map(str::to_string)
    });
    let exec = args.exec.then(|| flotilla_worker::exec::ExecOptions {
        argv: args.command.clone(),
        stop_grace: std::time::Duration::from_secs(args.stop_grace_seconds),
        master_addr: args.master_addr.clone(),
        local_rank: args.local_rank,
        local_world_size: args.local_world_size,
        gpu: args.gpu.clone(),
    });
    let opts = WorkerOptions {
        coordinators: args.coordinators,
        job: JobName::new(args.job.as_str())?,
        rank: resolve_rank(&args.rank)?,
        http_addr: args.http_addr,
        token: read_token(args.token_file.as_ref())?,
        tls: args
            .tls_ca
            .as_deref()
            .map(|ca| flotilla_shared::tls::ClientTls::load("--tls-ca", ca))
            .transpose()?,
        gpu: device,
        require_gpu: args.require_gpu,
        free_override: std::env::var(flotilla_worker::device::FREE_BYTES_OVERRIDE).ok(),
        exec,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        // SIGINT or SIGTERM: stop the trainer, then exit
        let shutdown = cancel_on_signal()?;
        agent::run(opts, shutdown).await.map_err(anyhow::Error::from)
    })
}

fn run_node(args: NodeArgs) -> Result<()> {
    let opts = flotilla_worker::node::NodeOptions {
        coordinators: args.coordinators,
        tokens: read_secret("--token-file", args.token_file.as_ref())?,
        tls: args
            .tls_ca
            .as_deref()
            .map(|ca| flotilla_shared::tls::ClientTls::load("--tls-ca", ca))
            .transpose()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
        tracing::info!(listen = %args.listen, "node agent: this host's workers connect here");
        let shutdown = cancel_on_signal()?;
        flotilla_worker::node::run(listener, opts, shutdown).await.map_err(anyhow::Error::msg)
    })
}

/// A token cancelled on the first SIGINT or SIGTERM (call inside the runtime).
fn cancel_on_signal() -> Result<tokio_util::sync::CancellationToken> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
    });
    Ok(shutdown)
}

fn client(args: &ClientArgs) -> Result<Client> {
    let client = Client::new(args.endpoints.clone(), read_token(args.token_file.as_ref())?);
    match &args.tls_ca {
        Some(ca) => client.with_ca(ca).map_err(anyhow::Error::msg),
        None => Ok(client),
    }
}

async fn run_submit(args: SubmitArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("cannot read {}", args.spec.display()))?;
    // refuse a bad spec here, with the file's name, before the network
    JobSpec::from_toml(&text).with_context(|| args.spec.display().to_string())?;
    let reply = client(&args.client)?.submit(&text).await?;
    if reply.created {
        println!("submitted job {}", reply.job);
    } else {
        println!("job {} was already submitted with this spec; nothing changed", reply.job);
    }
    Ok(())
}

/// `flotilla checkpoint`: asks for a checkpoint and, while the leader
/// waits for every shard, shows where the ranks are.
async fn run_checkpoint(args: JobArgs) -> Result<()> {
    let client = client(&args.client)?;
    let ask = client.checkpoint(&args.job);
    tokio::pin!(ask);
    let mut shown = String::new();
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.tick().await;
    let v = loop {
        tokio::select! {
            v = &mut ask => break v?,
            _ = every.tick() => {
                let Ok(status) = client.status(Some(&args.job)).await else { continue };
                let Some(job) = status.jobs.first() else { continue };
                let Some(p) = job.checkpoints.iter().find(|c| c.state == "pending") else { continue };
                let steps: Vec<u64> = job.workers.iter().map(|w| w.step.0).collect();
                let line = format!(
                    "checkpoint {} pending at step {}: ranks at steps {}..{}",
                    p.id,
                    p.step,
                    steps.iter().min().unwrap_or(&0),
                    steps.iter().max().unwrap_or(&0)
                );
                if line != shown {
                    eprintln!("{line}");
                    shown = line;
                }
            }
        }
    };
    println!("checkpoint {} committed at step {}", v["id"], v["step"]);
    Ok(())
}

async fn run_checkpoints(args: CheckpointsArgs) -> Result<()> {
    let client = client(&args.client)?;
    if let Some(id) = args.verify {
        let v = client.verify(&args.job, id).await?;
        let state = v["state"].as_str().unwrap_or("committed");
        let what = if state == "abandoned" {
            "it is abandoned: an operator's restore went back before it (flotilla restore --checkpoint can still choose it)"
        } else {
            "it is committed again"
        };
        println!("checkpoint {id} of job {} verified: every checksum matches; {what}", args.job);
        return Ok(());
    }
    let status = client.status(Some(&args.job)).await?;
    let job = status.jobs.into_iter().next().context("no such job")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job.checkpoints)?);
        return Ok(());
    }
    if job.checkpoints.is_empty() {
        println!("no checkpoints yet");
        return Ok(());
    }
    let rows = job
        .checkpoints
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.step.to_string(),
                c.generation.to_string(),
                c.state.clone(),
                c.bytes.to_string(),
                flotilla_shared::layout::Manifest::format_time(c.begun_ms),
                c.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                ("id", true),
                ("step", true),
                ("generation", true),
                ("state", false),
                ("bytes", true),
                ("begun", false),
                ("reason", false)
            ],
            rows
        )
    );
    Ok(())
}

/// Rows under a header, each column as wide as its widest cell, numbers
/// (`true`) right-aligned, text left-aligned; trailing blanks trimmed.
fn table(columns: &[(&str, bool)], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(columns.iter().zip(&widths))
            .map(|(cell, ((_, right), w))| if *right { format!("{cell:>w$}") } else { format!("{cell:<w$}") })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

async fn run_status(args: StatusArgs) -> Result<()> {
    let client = client(&args.client)?;
    if !args.watch {
        print!("{}", status_view(&client, &args).await?);
        return Ok(());
    }
    // on a terminal: the screen redrawn in place every second; a pipe gets
    // one view per second, one after the other
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let view = match status_view(&client, &args).await {
            Ok(v) => v,
            Err(e) => format!("error: {e:#}\n"),
        };
        let stamp =
            flotilla_shared::layout::Manifest::format_time(flotilla_shared::layout::Manifest::now_unix_ms());
        if tty {
            // home, clear to the end: no flicker, nothing left of a longer view
            print!("\x1b[H\x1b[2J{view}\nrefreshed {stamp}; Ctrl-C to stop\n");
        } else {
            println!("{view}--- {stamp}");
        }
        std::io::Write::flush(&mut std::io::stdout())?;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// What `flotilla status` prints: the replicas, then each job with every
/// rank. An error when no replica leads (quorum lost or an election).
async fn status_view(client: &Client, args: &StatusArgs) -> Result<String> {
    use std::fmt::Write as _;
    let status = client.status(args.job.as_deref()).await?;
    if args.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&status)?));
    }
    let mut out = String::new();
    let Some(leader_id) = status.leader_id else {
        let (up, all) = client.voters_reachable(&status).await;
        let majority = all / 2 + 1;
        if up < majority {
            bail!(
                "no leader: quorum lost, {up} of {all} replicas answer and a leader needs {majority}; bring replicas back (flotilla replicas list shows the membership)"
            );
        }
        bail!("no leader yet: an election is in progress ({up} of {all} replicas answer); try again in a few seconds");
    };
    if status.role != flotilla_coordinator::node::Role::Leader {
        writeln!(
            out,
            "node {} is a follower and cannot reach leader node {leader_id}: it knows the ledger but not the workers, so steps and ranks are not shown",
            status.node_id
        )?;
    }
    // the replicas, as the leader tracks them
    match client.replicas_of(&status).await {
        Ok(r) => {
            let rows = r
                .voters
                .iter()
                .map(|id| (id, "voter"))
                .chain(r.learners.iter().map(|id| (id, "learner")))
                .map(|(id, kind)| {
                    let p = r.progress.iter().find(|p| p.id == *id);
                    let role = if Some(*id) == r.leader_id { "leader".to_string() } else { kind.to_string() };
                    // a live replica answers the leader's heartbeats many times a second
                    let contact = p.and_then(|p| p.last_contact_ms);
                    vec![
                        id.to_string(),
                        role,
                        if contact.is_some_and(|ms| ms <= 2_000) { "yes" } else { "NO" }.to_string(),
                        contact.map_or("never".into(), |ms| format!("{:.1} s ago", ms as f64 / 1e3)),
                        p.map_or("?".into(), |p| p.matched.to_string()),
                        p.map_or("?".into(), |p| r.commit_index.saturating_sub(p.matched).to_string()),
                        r.addresses.get(id).cloned().unwrap_or_default(),
                    ]
                })
                .collect();
            let url = status.leader_url.as_deref().map(|u| format!(" at {u}")).unwrap_or_default();
            writeln!(
                out,
                "coordinators: leader node {leader_id}{url}, term {}, commit index {}",
                status.term, r.commit_index
            )?;
            for line in table(
                &[
                    ("node", true),
                    ("role", false),
                    ("reachable", false),
                    ("last contact", true),
                    ("match index", true),
                    ("behind", true),
                    ("raft address", false),
                ],
                rows,
            )
            .lines()
            {
                writeln!(out, "  {line}")?;
            }
        }
        Err(e) => {
            writeln!(out, "coordinators: leader node {leader_id}; its replica list is unavailable: {e}")?
        }
    }
    if status.jobs.is_empty() {
        writeln!(out, "no jobs; submit one with flotilla submit JOB.toml")?;
    }
    for job in &status.jobs {
        let latest = job.latest_committed.map(|c| format!("checkpoint {} at step {}", c.id, c.step));
        writeln!(
            out,
            "job {}: {}, generation {}, step {}, {}, {}, latest committed: {}",
            job.name,
            job.state,
            job.generation,
            job.step,
            count(u64::from(job.world_size), "rank"),
            count(u64::from(job.restores), "restore"),
            latest.as_deref().unwrap_or("none")
        )?;
        if let Some(c) = job.restored_from {
            writeln!(out, "  restored from checkpoint {} (step {})", c.id, c.step)?;
        }
        if let Some(e) = &job.error {
            writeln!(out, "  error: {e}")?;
        }
        if let Some(d) = &job.final_digest {
            writeln!(out, "  final digest: {d}")?;
        }
        if job.state != "succeeded" && status.role == flotilla_coordinator::node::Role::Leader {
            let rows = (0..job.world_size)
                .map(|rank| {
                    let w = job.workers.iter().find(|w| w.rank.0 == rank);
                    let (state, step, age) = match w {
                        Some(w) => (
                            w.state.clone(),
                            w.step.to_string(),
                            w.heartbeat_age_ms.map_or("?".into(), |ms| format!("{:.1} s", ms as f64 / 1e3)),
                        ),
                        None => ("missing".to_string(), "-".to_string(), "-".to_string()),
                    };
                    let why = rank_reason(&state, job.error.as_deref(), rank);
                    vec![rank.to_string(), state, step, age, why]
                })
                .collect();
            for line in table(
                &[("rank", true), ("state", false), ("step", true), ("heard", true), ("why", false)],
                rows,
            )
            .lines()
            {
                writeln!(out, "  {line}")?;
            }
        }
        if !job.events.is_empty() {
            writeln!(out, "  recent events:")?;
            for e in job.events.iter().rev().take(8).rev() {
                writeln!(out, "    {}  {}", flotilla_shared::layout::Manifest::format_time(e.at_ms), e.text)?;
            }
        }
    }
    Ok(out)
}

/// Why a rank is not training, in words, from its state (and the job's
/// error, which names the blocked rank).
fn rank_reason(state: &str, error: Option<&str>, rank: u32) -> String {
    // the refusals of SPEC §10 name the rank as `rank 2 on GPU 0: ...`,
    // `checkpoint 7 rank 2 does not match ...` or `... rank 2: ...`
    let blocked_on_me = error.is_some_and(|e| {
        e.starts_with(&format!("rank {rank} "))
            || e.contains(&format!(" rank {rank}:"))
            || e.contains(&format!(" rank {rank} "))
    });
    match state {
        // first: a blocked rank's heartbeats may still say it runs
        _ if blocked_on_me => "its restore was refused (see error)".into(),
        "running" | "checkpointing" | "finished" => String::new(),
        "missing" => "never heard from by this leader: is its worker running?".into(),
        "disconnected" => "its connection closed; the job restores without it after the grace".into(),
        "stale" => "holds an older generation's state; being restored".into(),
        "restoring" => "restoring".into(),
        "waiting" => "restored; waiting for the others".into(),
        "failed" => "its trainer failed; restarted on the next restore".into(),
        other => other.to_string(),
    }
}
fn run_inspect(args: InspectArgs) -> Result<()> {
    let found = inspect(&args.path)?;
    // verified first: a failed check is an error, with nothing printed before it
    let verified = if args.verify { Some(found.verify()?) } else { None };
    if args.json {
        let shards: Vec<serde_json::Value> = found
            .shards
            .iter()
            .map(|(file, header)| {
                let entry =
                    found.manifest.as_ref().and_then(|m| m.ranks.iter().find(|r| file.ends_with(&r.file)));
                serde_json::json!({
                    "rank": header.meta.rank,
                    "file": file,
                    "step": header.meta.step,
                    "generation": header.meta.generation,
                    "bytes": header.file_len,
                    "checksum": entry.map(|e| e.checksum.to_string()),
                    "variables": header.tensors.iter().map(|(v, r)| serde_json::json!({
                        "name": v.name, "dtype": v.dtype.to_string(), "shape": v.shape, "bytes": r.len(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = serde_json::json!({
            "dir": found.dir,
            "committed": found.manifest.is_some(),
            "manifest": found.manifest,
            "shards": shards,
            "verified_variables": verified,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    match &found.manifest {
        Some(m) => println!(
            "checkpoint {} of job {}: step {}, generation {}, {}, {} bytes, committed {}",
            m.id,
            m.job,
            m.step,
            m.generation,
            count(u64::from(m.world_size), "rank"),
            m.bytes(),
            m.created
        ),
        None => println!(
            "{}: NOT COMMITTED (no MANIFEST.json): a partial or aborted checkpoint, never restored from",
            found.dir.display()
        ),
    }
    if let Some(n) = verified {
        // the verdict alone: the variables were listed by a plain inspect
        println!(
            "verified: {}, {}, every checksum matches",
            count(found.shards.len() as u64, "shard"),
            count(n as u64, "variable")
        );
        return Ok(());
    }
    for (file, header) in &found.shards {
        let entry = found.manifest.as_ref().and_then(|m| m.ranks.iter().find(|r| file.ends_with(&r.file)));
        println!(
            "rank {} {} step {} generation {} {} bytes{}",
            header.meta.rank,
            file.display(),
            header.meta.step,
            header.meta.generation,
            header.file_len,
            entry.map(|e| format!(" {}", e.checksum)).unwrap_or_default()
        );
        let rows = header
            .tensors
            .iter()
            .map(|(var, range)| {
                vec![
                    var.name.clone(),
                    var.dtype.to_string(),
                    format!("{:?}", var.shape),
                    range.len().to_string(),
                ]
            })
            .collect();
        let variables =
            table(&[("variable", false), ("dtype", false), ("shape", false), ("bytes", true)], rows);
        for line in variables.lines() {
            println!("  {line}");
        }
    }
    Ok(())
}

/// A scratch directory (under `--dir` or the temp dir) for a benchmark's
/// local cluster, and this binary, which the cluster's processes run.
fn bench_cluster_dir(prefix: &str, dir: Option<&PathBuf>) -> Result<(tempfile::TempDir, PathBuf)> {
    let temp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(dir.cloned().unwrap_or_else(std::env::temp_dir))?;
    Ok((temp, std::env::current_exe()?))
}

async fn run_bench_coordinator(args: CoordinatorBenchArgs) -> Result<()> {
    if args.workers == 0 || args.rounds == 0 {
        return Err(Usage("--workers and --rounds must be at least 1".into()).into());
    }
    let (temp, bin) = bench_cluster_dir("flotilla-bench-coordinator-", args.dir.as_ref())?;
    let opts = flotilla_coordinator::bench::CoordinatorBenchOptions {
        workers: args.workers,
        rounds: args.rounds,
        failures: args.failures,
        procs: args.procs.unwrap_or_else(|| args.workers.div_ceil(512).clamp(1, 8)),
        heartbeat_ms: args.heartbeat_ms,
        shard_root: args.shard_dir.clone(),
        node_sessions: args.node_sessions,
    };
    let r = match flotilla_coordinator::bench::coordinator_bench(&bin, temp.path(), &opts).await {
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

async fn run_bench_raft(args: RaftArgs) -> Result<()> {
    let (temp, bin) = bench_cluster_dir("flotilla-bench-raft-", args.dir.as_ref())?;
    let mut reports = Vec::new();
    for tls in [false, true].into_iter().take(1 + usize::from(args.tls)) {
        let opts = flotilla_coordinator::bench::RaftBenchOptions {
            proposals: args.proposals,
            failovers: args.failovers,
            tls,
        };
        // each cluster in a directory of its own
        let dir = temp.path().join(if tls { "tls" } else { "plain" });
        std::fs::create_dir_all(&dir)?;
        let r =
            flotilla_coordinator::bench::raft_bench(&bin, &dir, &opts).await.map_err(anyhow::Error::msg)?;
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

fn print_raft_report(r: &flotilla_coordinator::bench::RaftBenchReport) {
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

fn run_bench_snapshot(args: SnapshotArgs) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::rank_reason;

    #[test]
    fn a_blocked_rank_is_told_apart_by_every_refusal_that_names_it() {
        let refused = "its restore was refused (see error)";
        for error in [
            "rank 2 on host memory: restore needs 258.6 KiB, 1000 B free",
            "checkpoint 7 rank 2 does not match the model: missing model/w",
            "checkpoint 7 rank 2: checksum mismatch in model/w",
        ] {
            assert_eq!(rank_reason("restoring", Some(error), 2), refused, "{error}");
            // another rank of the same job is not the one blocked, nor is rank 12 rank 2
            assert_eq!(rank_reason("restoring", Some(error), 1), "restoring", "{error}");
            assert_eq!(rank_reason("restoring", Some(&error.replace("rank 2", "rank 12")), 2), "restoring");
        }
        // a blocked rank's heartbeats may still say it runs: the refusal wins
        assert_eq!(rank_reason("running", Some("rank 2 on GPU 0: x"), 2), refused);
        assert_eq!(rank_reason("running", Some("rank 2 on GPU 0: x"), 3), "");
        assert!(rank_reason("missing", None, 0).contains("never heard from"));
    }
}
