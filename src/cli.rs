//! The command line: every subcommand and flag (clap types only; the
//! commands' bodies are in `cmd`).

use crate::{bench_exec, demo};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// `--rank`: a number (0, 1, ...) or `auto`; what `auto` names is resolved
/// when the worker starts.
fn rank_flag(value: &str) -> Result<String, String> {
    if value == "auto" || value.parse::<u32>().is_ok() {
        return Ok(value.to_string());
    }
    if value.starts_with('-') && value[1..].parse::<u64>().is_ok() {
        return Err("ranks start at 0; a negative rank is never valid (give 0, 1, ... or auto)".into());
    }
    Err(format!("expected a rank (0, 1, ... up to {}) or auto", u32::MAX))
}

/// `--coordinators`: the worker API's HOST:PORT. A URL is the HTTP API's
/// form (`--endpoints`), refused here rather than dialled.
fn worker_api_addr(value: &str) -> Result<String, String> {
    if value.contains("://") {
        return Err("--coordinators takes HOST:PORT of the coordinators' worker API (their --api-addr), \
             not a URL; a coordinator's HTTP API URL (its --http-addr) is for --endpoints of the client \
             commands (status, submit, ...)"
            .into());
    }
    Ok(value.to_string())
}

/// Fault-tolerant training orchestrator: consistent checkpoints, whole-job restore.
#[derive(Parser)]
#[command(name = "flotilla", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// Lists every job in the ledger: state, generation, world size, latest committed
    /// checkpoint (id@step) and when it was submitted.
    Jobs(JobsArgs),
    /// Cancels a job: its pending checkpoint is aborted, its workers are told to stop, and
    /// it stays in the ledger as `cancelled` (committed checkpoints kept) until deleted.
    Cancel(JobArgs),
    /// Removes an ended (succeeded, failed or cancelled) job from the ledger, so that its name
    /// can be submitted again; its checkpoint files stay unless --remove-checkpoints.
    Delete(DeleteArgs),
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
pub(crate) struct CertsArgs {
    /// Where the files go: ca.pem and ca.key (made if absent, reused otherwise),
    /// node-ID.pem and node-ID.key per --node. Keep ca.key offline.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Replica ids to make certificates for (each names flotilla-node-ID).
    #[arg(long = "node", value_delimiter = ',', required = true)]
    pub(crate) nodes: Vec<u64>,
    /// DNS names or IP addresses the replicas are reached by (HTTP API, worker API);
    /// every certificate made now carries all of them.
    #[arg(long = "host", value_delimiter = ',')]
    pub(crate) hosts: Vec<String>,
}

#[derive(Args)]
pub(crate) struct CoordinatorArgs {
    /// The cluster's name, recorded in the data dir and checked between replicas: a replica
    /// of another cluster, or a data dir of one, is refused.
    #[arg(long, env = "FLOTILLA_CLUSTER_ID", default_value = "flotilla")]
    pub(crate) cluster_id: String,
    /// This replica's id (1..65535), or `auto` (StatefulSet ordinal + 1 from the hostname).
    #[arg(long, env = "FLOTILLA_ID")]
    pub(crate) id: String,
    /// Every voter's Raft address, itself included: 1=HOST:PORT,2=HOST:PORT,...
    /// A single entry (or none) is a one-node cluster.
    #[arg(long, env = "FLOTILLA_PEERS", default_value = "")]
    pub(crate) peers: String,
    /// Where the worker API listens (workers' --coordinators point here).
    #[arg(long, env = "FLOTILLA_API_ADDR")]
    pub(crate) api_addr: Option<String>,
    /// The address workers use to reach this worker API (default: --api-addr).
    #[arg(long, env = "FLOTILLA_ADVERTISE_API")]
    pub(crate) advertise_api: Option<String>,
    /// Where the HTTP API (status, admin, metrics) listens.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9201")]
    pub(crate) http_addr: String,
    /// The URL others use to reach this HTTP API (default: http://<--http-addr>).
    #[arg(long, env = "FLOTILLA_ADVERTISE_HTTP")]
    pub(crate) advertise_http: Option<String>,
    /// Raft log, hard state and snapshots; keep it across restarts.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub(crate) data_dir: PathBuf,
    /// File holding one token for every role (peers, workers and admin calls); the role
    /// files below replace it for their role.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// The token coordinator peers present on the Raft port (never give it to workers).
    #[arg(long, env = "FLOTILLA_PEER_TOKEN_FILE")]
    pub(crate) peer_token_file: Option<PathBuf>,
    /// The token workers present on the worker API (the Raft port refuses it).
    #[arg(long, env = "FLOTILLA_WORKER_TOKEN_FILE")]
    pub(crate) worker_token_file: Option<PathBuf>,
    /// The token the HTTP API's mutations need (submit, checkpoint, restore, replicas).
    #[arg(long, env = "FLOTILLA_ADMIN_TOKEN_FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,
    /// The cluster CA (PEM). With --tls-cert and --tls-key: mutual TLS between replicas,
    /// HTTPS on --http-addr and TLS on --api-addr (`flotilla certs` makes them).
    #[arg(long, env = "FLOTILLA_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub(crate) tls_ca: Option<PathBuf>,
    /// This replica's certificate (PEM), signed by --tls-ca, naming flotilla-node-<ID> and
    /// the hosts clients and workers reach it by.
    #[arg(long, env = "FLOTILLA_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub(crate) tls_key: Option<PathBuf>,
    /// A directory laid out as `flotilla certs` writes it: ca.pem, node-<ID>.pem and
    /// node-<ID>.key (instead of the three files; handy with --id auto).
    #[arg(long, env = "FLOTILLA_TLS_DIR", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub(crate) tls_dir: Option<PathBuf>,
    /// Serve without any credentials on addresses other hosts can reach.
    #[arg(long)]
    pub(crate) insecure: bool,
    /// A job spec FILE (TOML, docs/REFERENCE.md "Job spec") to submit at start-up (idempotent).
    /// `--job FILE` is its former name, still accepted.
    #[arg(long, alias = "job", value_name = "FILE", env = "FLOTILLA_JOB")]
    pub(crate) spec: Option<PathBuf>,
    /// Applied log entries between state-machine snapshots (log compaction).
    #[arg(long, env = "FLOTILLA_SNAPSHOT_THRESHOLD", default_value_t = 10_000)]
    pub(crate) snapshot_threshold: u64,
}

#[derive(Args)]
pub(crate) struct WorkerArgs {
    /// The coordinators' worker API addresses, HOST:PORT (their --api-addr); the leader is found automatically.
    #[arg(
        long,
        env = "FLOTILLA_COORDINATORS",
        value_delimiter = ',',
        required = true,
        value_parser = worker_api_addr
    )]
    pub(crate) coordinators: Vec<String>,
    /// The job this worker belongs to.
    #[arg(long, env = "FLOTILLA_JOB_NAME")]
    pub(crate) job: String,
    /// This worker's rank, or `auto` (JOB_COMPLETION_INDEX, or the StatefulSet ordinal of the hostname).
    // negative numbers are taken as the value (and refused by `rank_flag`):
    // clap's own tip, `-- -1`, would hand them to the trainer command
    #[arg(
        long,
        env = "FLOTILLA_RANK",
        allow_negative_numbers = true,
        value_parser = rank_flag,
        required_unless_present = "spare",
        conflicts_with = "spare"
    )]
    pub(crate) rank: Option<String>,
    /// Register for the job without a rank: a hot spare that takes a failed rank at once
    /// (SPEC §11). Not with --rank.
    #[arg(long, env = "FLOTILLA_SPARE")]
    pub(crate) spare: bool,
    /// The host this worker runs on, as status shows it (default: the hostname).
    #[arg(long, env = "FLOTILLA_HOST")]
    pub(crate) host: Option<String>,
    /// Where this worker's HTTP (status, metrics) listens.
    #[arg(long, env = "FLOTILLA_WORKER_HTTP_ADDR")]
    pub(crate) http_addr: Option<String>,
    /// The GPU whose memory restores check (index or UUID).
    #[arg(long, env = "FLOTILLA_GPU")]
    pub(crate) gpu: Option<String>,
    /// Refuse to start where NVML is not available.
    #[arg(long)]
    pub(crate) require_gpu: bool,
    /// File holding the worker token.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// The cluster CA (PEM), where the coordinators serve the worker API over TLS.
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Run an external trainer, the command after `--` (docs/TRAINER_PROTOCOL.md):
    /// `--exec -- python3 train.py ARGS`. Without it the built-in trainer runs.
    #[arg(long, requires = "command")]
    pub(crate) exec: bool,
    /// The trainer command (after `--`; needs --exec).
    #[arg(last = true, requires = "exec")]
    pub(crate) command: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL when the worker stops its trainer process group.
    #[arg(long, default_value_t = 10)]
    pub(crate) stop_grace_seconds: u64,
    /// The address other ranks reach rank 0's rendezvous at (MASTER_ADDR); default: the
    /// address this worker reaches its coordinator from.
    #[arg(long, env = "FLOTILLA_MASTER_ADDR")]
    pub(crate) master_addr: Option<String>,
    /// LOCAL_RANK given to the trainer.
    #[arg(long, default_value_t = 0)]
    pub(crate) local_rank: u32,
    /// LOCAL_WORLD_SIZE given to the trainer.
    #[arg(long, default_value_t = 1)]
    pub(crate) local_world_size: u32,
}

#[derive(Args)]
pub(crate) struct NodeArgs {
    /// Where this host's workers connect (give it to them as --coordinators).
    #[arg(long, env = "FLOTILLA_NODE_ADDR", default_value = "127.0.0.1:9300")]
    pub(crate) listen: String,
    /// The coordinators' worker API addresses, HOST:PORT (their --api-addr); the leader is found automatically.
    #[arg(
        long,
        env = "FLOTILLA_COORDINATORS",
        value_delimiter = ',',
        required = true,
        value_parser = worker_api_addr
    )]
    pub(crate) coordinators: Vec<String>,
    /// File holding the worker token: presented to the coordinators, and asked of every local worker.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// The cluster CA (PEM), where the coordinators serve the worker API over TLS.
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    pub(crate) tls_ca: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct ClientArgs {
    /// The coordinators' HTTP API URLs (their --http-addr; HOST:PORT alone means http://HOST:PORT,
    /// or https:// with --tls-ca); the leader is found automatically.
    #[arg(long, env = "FLOTILLA_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:9201")]
    pub(crate) endpoints: Vec<String>,
    /// File holding the admin token (for mutations).
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// The cluster CA (PEM), for https:// endpoints.
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    pub(crate) tls_ca: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct SubmitArgs {
    /// The job spec (TOML; its keys: docs/REFERENCE.md, "Job spec").
    pub(crate) spec: PathBuf,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct JobArgs {
    /// The job.
    #[arg(long)]
    pub(crate) job: String,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct JobsArgs {
    /// Print machine-readable JSON (the jobs as `GET /v1/status` has them) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct DeleteArgs {
    /// The job (succeeded, failed or cancelled: cancel a live one first).
    #[arg(long)]
    pub(crate) job: String,
    /// Also remove the job's checkpoint directory (<root>/<job>/) on the leader. Without it
    /// the files stay: a new job can still start from them with [checkpoint] resume_from.
    #[arg(long)]
    pub(crate) remove_checkpoints: bool,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct CheckpointsArgs {
    /// The job.
    #[arg(long)]
    pub(crate) job: String,
    /// Only this checkpoint (with --verify: the one to re-verify).
    #[arg(value_name = "ID")]
    pub(crate) id: Option<u64>,
    /// Re-verify condemned checkpoint ID on the leader against the ledger's checksums;
    /// when every shard matches, its verdict is cleared, it is committed again and its
    /// MANIFEST.json is written back. A switch, as on `inspect` (`--verify ID` reads the same).
    #[arg(long, requires = "id")]
    pub(crate) verify: bool,
    /// Print machine-readable JSON (the job's checkpoints) instead of a table.
    #[arg(long, conflicts_with = "verify")]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Subcommand)]
pub(crate) enum ReplicasCommand {
    /// Voters and learners, their Raft addresses, and (from the leader) how far each has replicated.
    List(ReplicasListArgs),
    /// Adds a replica: started first with `flotilla coordinator --id ID` on an empty data dir, it
    /// joins as a learner, catches up, and is then made a voter.
    Add(AddReplicaArgs),
    /// Removes a replica (voter or learner); stop its process afterwards.
    Remove(RemoveReplicaArgs),
}

#[derive(Args)]
pub(crate) struct ReplicasListArgs {
    /// The membership as JSON (GET /v1/replicas from the leader).
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct AddReplicaArgs {
    /// The new replica's --id.
    #[arg(long)]
    pub(crate) id: u64,
    /// Its Raft address (its own --peers entry), HOST:PORT, reachable from every replica.
    #[arg(long)]
    pub(crate) raft_addr: String,
    /// Leave it a learner (no vote); promote later with `replicas add` again.
    #[arg(long)]
    pub(crate) learner: bool,
    /// How long to wait for it to catch up before giving up on the promotion.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_seconds: u64,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct RemoveReplicaArgs {
    /// The replica's --id.
    #[arg(long)]
    pub(crate) id: u64,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct RestoreArgs {
    /// The job.
    #[arg(long)]
    pub(crate) job: String,
    /// A committed checkpoint id (default: the latest committed).
    #[arg(long)]
    pub(crate) checkpoint: Option<u64>,
    /// Return once the restore is accepted, without waiting to see the ranks training
    /// again (the generation printed is then the one asked for, which a condemned
    /// checkpoint can still turn into a fallback).
    #[arg(long)]
    pub(crate) no_wait: bool,
    /// How long to wait for every rank to train again.
    #[arg(long, default_value_t = 600)]
    pub(crate) timeout_seconds: u64,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Only this job.
    #[arg(long)]
    pub(crate) job: Option<String>,
    /// Print the JSON of GET /v1/status.
    #[arg(long)]
    pub(crate) json: bool,
    /// Redraw every second (in place on a terminal) until interrupted.
    #[arg(long)]
    pub(crate) watch: bool,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct InspectArgs {
    /// A job's checkpoint root (<root>/<job>, uses LATEST), a ckpt-* directory or one shard file.
    pub(crate) path: PathBuf,
    /// Re-read every shard and verify every checksum against MANIFEST.json.
    #[arg(long)]
    pub(crate) verify: bool,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
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
    /// A restore's fetch of a memory copy from a peer worker, against a plain loopback TCP copy of the same bytes.
    Copy(CopyBenchArgs),
}

#[derive(Args)]
pub(crate) struct CopyBenchArgs {
    /// Bytes of the shard copied.
    #[arg(long, default_value_t = 1 << 30)]
    pub(crate) bytes: u64,
    /// Interleaved runs (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub(crate) runs: usize,
    /// Where the shard is written first (removed after).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("flotilla-bench"))]
    pub(crate) dir: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct CoordinatorBenchArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 32)]
    pub(crate) workers: u32,
    /// Checkpoint rounds to time.
    #[arg(long, default_value_t = 50)]
    pub(crate) rounds: usize,
    /// Worker failures to time.
    #[arg(long, default_value_t = 5)]
    pub(crate) failures: usize,
    /// Processes to run the simulated workers in (default: one per 512, at most 8).
    #[arg(long)]
    pub(crate) procs: Option<u32>,
    /// The simulated workers' heartbeat period, ms (the job's heartbeat_interval_ms).
    #[arg(long, default_value_t = 100)]
    pub(crate) heartbeat_ms: u64,
    /// Where the simulated workers write their shards (default: beside the replicas' data
    /// dirs). A tmpfs such as /dev/shm takes one disk's fsyncs out of the round.
    #[arg(long)]
    pub(crate) shard_dir: Option<PathBuf>,
    /// Each process's simulated ranks share one node session (one connection, batched frames,
    /// one heartbeat frame for all), as a host's ranks behind a node agent; default: a
    /// connection per rank, as `flotilla worker` has.
    #[arg(long)]
    pub(crate) node_sessions: bool,
    /// Where the replicas keep their data (a temporary directory by default).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct SimWorkersArgs {
    /// The coordinators' worker API addresses.
    #[arg(long, value_delimiter = ',')]
    pub(crate) endpoints: Vec<String>,
    /// The job.
    #[arg(long)]
    pub(crate) job: String,
    /// The ranks to simulate, START..END (END excluded).
    #[arg(long)]
    pub(crate) ranks: String,
    /// Heartbeat period, ms.
    #[arg(long, default_value_t = 100)]
    pub(crate) heartbeat_ms: u64,
    /// One node session for all the ranks.
    #[arg(long)]
    pub(crate) node_session: bool,
}

#[derive(Args)]
pub(crate) struct RaftArgs {
    /// Sequential proposals to time.
    #[arg(long, default_value_t = 200)]
    pub(crate) proposals: usize,
    /// Leader kills (SIGKILL) to time.
    #[arg(long, default_value_t = 7)]
    pub(crate) failovers: usize,
    /// Also run a cluster with mutual TLS between replicas (HTTPS client) and compare.
    #[arg(long)]
    pub(crate) tls: bool,
    /// Where the replicas keep their data (a temporary directory by default).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct SnapshotArgs {
    /// Shard size in bytes (the built-in trainer's params_per_rank_bytes).
    #[arg(long, default_value_t = 256 << 20)]
    pub(crate) bytes: u64,
    /// Directory on the storage to measure (files are removed afterwards).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("flotilla-bench"))]
    pub(crate) dir: PathBuf,
    /// Interleaved runs; figures are medians.
    #[arg(long, default_value_t = 5)]
    pub(crate) runs: usize,
    /// Unrecorded runs first (a process's first large write also faults in fresh memory).
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Drop the page cache before each read (needs root).
    #[arg(long)]
    pub(crate) cold: bool,
    /// Keep the CPU trainer stepping while shards are written (on a small
    /// machine this measures CPU and memory-bandwidth contention as well).
    #[arg(long)]
    pub(crate) train_during_write: bool,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}
