//! Seeded chaos with real processes: 3 `flotilla coordinator` replicas and 4
//! `flotilla worker` processes running the built-in trainer, while the test
//! injects one random fault every ~100 training steps and restarts exactly
//! what it killed. Invariants are checked on every status poll and at the
//! end; the summary table (recovery time per fault kind) is what
//! docs/RELIABILITY.md records.
//!
//! ```text
//! FLOTILLA_CHAOS_SEED=123 FLOTILLA_CHAOS_FAULTS=30 cargo test --test chaos -- --nocapture
//! FLOTILLA_CHAOS_KINDS=kill-worker,stop-leader ...   only these fault kinds
//! ```
//!
//! One fault at a time:
//! ```text
//!  wait: every killed process restarted, every stopped one continued,
//!        job running, step >= 200 + 100 * k        (condition, deadline 120 s)
//!  pause 0-300 ms (seeded), inject fault k, then
//!  wait: job running again (in a newer generation where a restore was due)
//!        and the slowest rank past its restore point (deadline 60 s)
//!        = the recovery time of fault k
//! ```
//! The seed fixes the sequence of faults and every random choice in them
//! (which rank, how long a pause, which older checkpoint, which byte); the
//! processes' timing is not seeded, so a re-run replays the same faults at
//! the same steps, not the same interleaving.

mod common;

use common::BIN;
use flotilla_coordinator::api::{ClusterStatus, JobStatus};
use flotilla_coordinator::client::{Client, ClientError};
use flotilla_coordinator::raft::node::Role;
use flotilla_coordinator::supervise::SpareState;
use flotilla_coordinator::testkit::local::{signal, LocalCluster, LocalOptions, LocalWorkers};
use flotilla_shared::ids::NodeId;
use flotilla_shared::shard::read_header;
use flotilla_shared::spec::JobSpec;
use flotilla_worker::trainer::reference_digest;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

const JOB: &str = "chaos";
const WORLD: u32 = 4;
/// Hot spares started with the job; one more starts after each worker the
/// test kills for good, as a cluster's scheduler would replace a lost host.
const SPARES: u32 = 1;
const COORDINATORS: usize = 3;
/// The first fault lands once the job is at this step (a few checkpoints in).
const FIRST_FAULT_STEP: u64 = 200;
/// Training steps between two faults.
const STEPS_PER_FAULT: u64 = 100;
/// The job has this many times the steps the fault schedule needs: faults
/// whose recovery lets it train on (no rollback) put it ahead of schedule.
const STEPS_BUDGET: u64 = 4;
/// Steps beyond that budget to the end of the job.
const TAIL_STEPS: u64 = 300;
/// Between two faults, the job trains until a new checkpoint commits, or
/// this many steps at most (a stalled checkpointer is caught by CADENCE).
const COMMIT_WAIT_STEPS: u64 = 4 * EVERY_STEPS;
/// Checkpointing must go on: a commit at least this often while the job runs.
const CADENCE: Duration = Duration::from_secs(30);
const EVERY_STEPS: u64 = 50;
const KEEP_LAST: usize = 3;
const HEARTBEAT_TIMEOUT_MS: u64 = 1000;
/// Status poll period (a poll period, not a synchronisation).
const POLL: Duration = Duration::from_millis(50);
const START_DEADLINE: Duration = Duration::from_secs(90);
const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);
const PROGRESS_DEADLINE: Duration = Duration::from_secs(120);
const FINISH_DEADLINE: Duration = Duration::from_secs(180);
/// How long a worker that exited 0 may wait for the job to show `succeeded`.
const FINISHED_GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- faults

/// The kinds of fault, in the order of the summary table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    KillWorker,
    KillWorkerForGood,
    StopWorker,
    KillLeader,
    KillFollower,
    StopLeader,
    KillLeaderAndWorker,
    OperatorCheckpoint,
    OperatorRestore,
    CorruptLatest,
}

impl Kind {
    const ALL: [Kind; 10] = [
        Kind::KillWorker,
        Kind::KillWorkerForGood,
        Kind::StopWorker,
        Kind::KillLeader,
        Kind::KillFollower,
        Kind::StopLeader,
        Kind::KillLeaderAndWorker,
        Kind::OperatorCheckpoint,
        Kind::OperatorRestore,
        Kind::CorruptLatest,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::KillWorker => "kill-worker",
            Kind::KillWorkerForGood => "kill-worker-for-good",
            Kind::StopWorker => "stop-worker",
            Kind::KillLeader => "kill-leader",
            Kind::KillFollower => "kill-follower",
            Kind::StopLeader => "stop-leader",
            Kind::KillLeaderAndWorker => "kill-leader-and-worker",
            Kind::OperatorCheckpoint => "operator-checkpoint",
            Kind::OperatorRestore => "operator-restore",
            Kind::CorruptLatest => "corrupt-latest",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fault with every random choice drawn up front, so that the sequence
/// depends on the seed only (never on what the processes did).
#[derive(Debug, Clone)]
struct Plan {
    kind: Kind,
    /// The worker to kill or stop (modulo the world size).
    rank: u32,
    /// Picks among followers, older checkpoints, shards and tensors.
    pick: u64,
    /// Pause between reaching the fault's step and injecting it.
    jitter_ms: u64,
    /// How long a SIGSTOPped process stays stopped.
    hold_ms: u64,
    /// How long a killed process stays down.
    restart_after_ms: u64,
    /// Operator restore: to an explicit older committed checkpoint.
    explicit: bool,
    /// Corruption: where in the tensor to flip bytes.
    flip_at: u64,
}

fn plan(seed: u64, faults: usize, kinds: &[Kind]) -> Vec<Plan> {
    let mut rng = StdRng::seed_from_u64(seed);
    // every kind once (in a seeded order) before any repeats, so that even a
    // short run covers each of them
    let mut first: Vec<Kind> = kinds.to_vec();
    first.shuffle(&mut rng);
    (0..faults)
        .map(|i| Plan {
            kind: first.get(i).copied().unwrap_or_else(|| kinds[rng.gen_range(0..kinds.len())]),
            rank: rng.gen_range(0..WORLD),
            pick: rng.gen(),
            jitter_ms: rng.gen_range(0..300),
            hold_ms: rng.gen_range(200..3000),
            restart_after_ms: rng.gen_range(0..1000),
            explicit: rng.gen_bool(0.5),
            flip_at: rng.gen(),
        })
        .collect()
}

/// The run's parameters, from the environment.
struct Config {
    seed: u64,
    faults: usize,
    kinds: Vec<Kind>,
    kinds_env: Option<String>,
}

impl Config {
    fn from_env() -> Self {
        let seed = match std::env::var("FLOTILLA_CHAOS_SEED") {
            Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("FLOTILLA_CHAOS_SEED={s:?} is not a u64")),
            Err(_) => rand::random(),
        };
        let faults = match std::env::var("FLOTILLA_CHAOS_FAULTS") {
            Ok(s) => {
                s.trim().parse().unwrap_or_else(|_| panic!("FLOTILLA_CHAOS_FAULTS={s:?} is not a count"))
            }
            Err(_) => 30,
        };
        let kinds_env = std::env::var("FLOTILLA_CHAOS_KINDS").ok().filter(|s| !s.trim().is_empty());
        let kinds = match &kinds_env {
            None => Kind::ALL.to_vec(),
            Some(list) => list
                .split(',')
                .map(|k| {
                    Kind::parse(k.trim()).unwrap_or_else(|| {
                        let all: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                        panic!("FLOTILLA_CHAOS_KINDS: unknown fault kind {k:?}; known: {}", all.join(","))
                    })
                })
                .collect(),
        };
        Self { seed, faults, kinds, kinds_env }
    }

    /// The command that replays this run's faults.
    fn repro(&self) -> String {
        let kinds = self.kinds_env.as_ref().map(|k| format!(" FLOTILLA_CHAOS_KINDS={k}")).unwrap_or_default();
        format!(
            "FLOTILLA_CHAOS_SEED={} FLOTILLA_CHAOS_FAULTS={}{kinds} cargo test --test chaos -- --nocapture",
            self.seed, self.faults
        )
    }
}

// ------------------------------------------------------------ invariants

/// What the test knows about a checkpoint it once saw committed.
#[derive(Debug, Clone)]
struct Seen {
    step: u64,
    /// When it was first seen committed.
    first: Instant,
    /// Its state at the last observation (`gone` once out of the list).
    state: String,
}

/// The ledger invariants, checked on every observation of the job.
#[derive(Debug, Default)]
struct Ledger {
    /// Every checkpoint ever seen committed, by id.
    seen: BTreeMap<u64, Seen>,
    /// Checkpoints whose shard the test corrupted.
    corrupted: BTreeSet<u64>,
    /// Operator restores: when asked, and when answered (None: in flight).
    operator_restores: Vec<(Instant, Option<Instant>)>,
    /// The latest committed step may not go below this...
    floor: u64,
    /// ...except, while a fault of the test's that may lower it (operator
    /// restore, corruption) settles, down to this.
    allowance: Option<u64>,
    generation: u64,
    restores: u32,
}

fn committed_like(state: &str) -> bool {
    // states only a once-committed checkpoint can be in
    matches!(state, "committed" | "condemned" | "abandoned")
}

impl Ledger {
    /// Checks one observation of the job (from a leader whose applied log
    /// is at least as long as at the previous observation).
    fn observe(&mut self, job: &JobStatus, now: Instant) -> Result<(), String> {
        if job.generation.0 < self.generation {
            return Err(format!("the generation went back from {} to {}", self.generation, job.generation));
        }
        self.generation = job.generation.0;
        if job.restores < self.restores {
            return Err(format!("the restore count went back from {} to {}", self.restores, job.restores));
        }
        self.restores = job.restores;
        if job.state == "failed" {
            return Err(format!("the job failed: {}", job.error.as_deref().unwrap_or("(no error given)")));
        }

        for c in job.checkpoints.iter().filter(|c| c.state == "committed") {
            self.seen.entry(c.id.0).or_insert_with(|| Seen {
                step: c.step.0,
                first: now,
                state: "committed".into(),
            });
        }
        let listed: BTreeMap<u64, (u64, &str)> =
            job.checkpoints.iter().map(|c| (c.id.0, (c.step.0, c.state.as_str()))).collect();
        let ids: Vec<u64> = self.seen.keys().copied().collect();
        for id in ids {
            let seen = &self.seen[&id];
            let state = listed.get(&id).map_or("gone", |(_, s)| s);
            if state == seen.state {
                continue;
            }
            match state {
                "committed" => {
                    return Err(format!("checkpoint {id} was {} and is committed again", seen.state));
                }
                "condemned" if !self.corrupted.contains(&id) => {
                    return Err(format!(
                        "checkpoint {id} (step {}) was committed and is now corrupt, but the test did not corrupt it",
                        seen.step
                    ));
                }
                "condemned" => {}
                "abandoned" => {
                    let first = seen.first;
                    if !self.operator_restores.iter().any(|(_, done)| done.is_none_or(|d| d >= first)) {
                        return Err(format!(
                            "checkpoint {id} (step {}) was committed and is now abandoned, with no operator restore since",
                            seen.step
                        ));
                    }
                }
                "gone" | "deleted" => self.retired(id, job)?,
                other => {
                    return Err(format!(
                        "checkpoint {id} (step {}) was committed and is now {other:?} (not committed, retired, \
                         corrupted by the test or abandoned)",
                        seen.step
                    ));
                }
            }
            self.seen.get_mut(&id).expect("listed above").state = state.to_string();
        }

        let latest = job.latest_committed.map_or(0, |c| c.step.0);
        match self.allowance {
            Some(bound) if latest < bound => {
                return Err(format!(
                    "the latest committed step went back to {latest}, below {bound} (where the test's \
                     restore / corruption allowed it to go)"
                ));
            }
            Some(_) => {}
            None if latest < self.floor => {
                return Err(format!(
                    "the latest committed step went back from {} to {latest} ({:?}) with no operator restore \
                     or corruption to explain it",
                    self.floor, job.latest_committed
                ));
            }
            None => self.floor = latest,
        }
        Ok(())
    }

    /// A once-committed checkpoint left the list: fine if retention retired
    /// it (at least `keep_last` newer once-committed checkpoints, by step
    /// or by id), or if it was corrupt or abandoned before.
    fn retired(&self, id: u64, job: &JobStatus) -> Result<(), String> {
        let seen = &self.seen[&id];
        if self.corrupted.contains(&id) || seen.state == "condemned" || seen.state == "abandoned" {
            return Ok(());
        }
        let mut once_committed: BTreeMap<u64, u64> = self.seen.iter().map(|(i, s)| (*i, s.step)).collect();
        for c in job.checkpoints.iter().filter(|c| committed_like(c.state.as_str())) {
            once_committed.insert(c.id.0, c.step.0);
        }
        let by_step = once_committed.iter().filter(|(i, s)| (**s, **i) > (seen.step, id)).count();
        let by_id = once_committed.keys().filter(|i| **i > id).count();
        if by_step.max(by_id) >= KEEP_LAST {
            Ok(())
        } else {
            Err(format!(
                "committed checkpoint {id} (step {}) disappeared with only {} newer committed checkpoints \
                 (keep_last = {KEEP_LAST}): lost",
                seen.step,
                by_step.max(by_id)
            ))
        }
    }

    /// The fault that allowed the latest committed step to go back has
    /// settled: what is latest now is the new floor.
    fn settle(&mut self, job: &JobStatus) {
        if self.allowance.take().is_some() {
            self.floor = job.latest_committed.map_or(0, |c| c.step.0);
        }
    }

    /// Lets the latest committed step go back down to `bound` until `settle`.
    fn allow_down_to(&mut self, bound: u64) {
        self.allowance = Some(self.allowance.map_or(bound, |b| b.min(bound)).min(self.floor));
    }
}

// --------------------------------------------------------------- harness

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Proc {
    Coordinator(NodeId),
    Worker(u32),
}

impl fmt::Display for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proc::Coordinator(id) => write!(f, "coordinator {id}"),
            Proc::Worker(slot) => write!(f, "worker slot {slot}"),
        }
    }
}

/// What the restarter does when its time comes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Due {
    /// Start again a process the test killed.
    Restart(Proc),
    /// Start a new spare (for a worker killed for good).
    NewSpare,
    /// SIGCONT a process the test stopped (its pid).
    Cont(Proc, u32),
}

/// An operator request running beside the status polls.
enum Op {
    Checkpoint,
    /// Restore, from this explicit checkpoint or the latest.
    Restore(Option<u64>),
}

struct OpState {
    op: Op,
    handle: Option<JoinHandle<Result<serde_json::Value, ClientError>>>,
    result: Option<Result<serde_json::Value, String>>,
}

/// What recovery from a fault means.
struct Expect {
    /// A whole-job restore is due (a worker lost its state).
    new_generation: bool,
    /// A process was stopped: recovered only once it is continued and the
    /// job's (slowest rank's) step passes where it was then.
    stopped: bool,
    desc: String,
}

#[derive(Default)]
struct KindStats {
    count: usize,
    restores: u64,
    /// From the fault to recovery.
    recoveries: Vec<Duration>,
    /// From the moment every process the fault took down was back
    /// (restarted, continued) to recovery.
    from_back: Vec<Duration>,
}

struct Chaos {
    cfg: Config,
    root: PathBuf,
    cluster: LocalCluster,
    workers: LocalWorkers,
    spec: JobSpec,
    http: reqwest::Client,
    started: Instant,

    ledger: Ledger,
    leader: Option<NodeId>,
    /// The highest applied log index seen; older views are not observed.
    applied: u64,
    last_job: Option<JobStatus>,
    last_note: String,

    killed: BTreeSet<Proc>,
    stopped: BTreeSet<Proc>,
    /// Worker processes are slots of `workers` (a rank's first, then the
    /// spares); a rank moves between slots as spares take it over.
    slots: u32,
    /// Each live slot's worker id, as its own status says.
    incarnations: BTreeMap<u32, u64>,
    pending: Vec<(Instant, Due)>,
    finished: BTreeMap<u32, (ExitStatus, Instant)>,
    op: Option<OpState>,

    current: Option<String>,
    history: Vec<String>,
    /// When the restarter last started or continued a process.
    last_back: Instant,
    /// The job's generation and step when the last SIGCONT was sent.
    step_at_cont: Option<(u64, u64)>,
    /// `checkpoints_committed`, generation and step when the last fault was
    /// recovered from: the next fault waits for a newer commit (or
    /// COMMIT_WAIT_STEPS).
    recovered_at: (u64, u64, u64),
    /// `checkpoints_committed` and when it last grew.
    last_commit: (u64, Instant),
    stats: BTreeMap<Kind, KindStats>,
    notes: Vec<String>,
    // last: the processes (above) are killed before the directory goes
    dir: Option<tempfile::TempDir>,
    kept: Option<PathBuf>,
}

fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The last `lines` lines of `path` that do not contain `noise`.
fn tail_without(path: &Path, lines: usize, noise: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().filter(|l| !l.contains(noise)).collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn job_line(j: &JobStatus) -> String {
    format!(
        "state {} gen {} step {} restores {} latest {:?} restored_from {:?} error {:?}",
        j.state,
        j.generation,
        j.step,
        j.restores,
        j.latest_committed.map(|c| (c.id.0, c.step.0)),
        j.restored_from.map(|c| (c.id.0, c.step.0)),
        j.error
    )
}

impl Chaos {
    async fn start(cfg: Config) -> Self {
        let dir = tempfile::Builder::new().prefix("flotilla-chaos-").tempdir().unwrap();
        let root = dir.path().join("ckpt");
        let total = FIRST_FAULT_STEP + STEPS_BUDGET * cfg.faults as u64 * STEPS_PER_FAULT + TAIL_STEPS;
        let text = format!(
            "name = \"{JOB}\"\nworld_size = {WORLD}\n\n\
             [checkpoint]\nevery_steps = {EVERY_STEPS}\nkeep_last = {KEEP_LAST}\ntimeout_seconds = 10\nroot = \"{}\"\n\n\
             [failure]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = {HEARTBEAT_TIMEOUT_MS}\nmax_restarts = 100000\nspares = {SPARES}\n\n\
             [trainer]\ntotal_steps = {total}\nparams_per_rank_bytes = 262144\nlayers = 2\nstep_time_ms = 5\nseed = 7\n",
            root.display()
        );
        let spec = JobSpec::from_toml(&text).unwrap();
        let cluster =
            LocalCluster::start(Path::new(BIN), dir.path(), COORDINATORS, LocalOptions::default()).unwrap();
        cluster.wait_for_leader(START_DEADLINE).await.unwrap();
        let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
        client.submit(&text).await.unwrap();
        let mut workers = LocalWorkers::new(Path::new(BIN), dir.path(), cluster.api_endpoints(), JOB, WORLD);
        for rank in 0..WORLD {
            workers.spawn(rank, &[]).unwrap();
        }
        for _ in 0..SPARES {
            workers.spawn_spare(&[]).unwrap();
        }
        println!(
            "chaos: {} faults in {}; a job of {total} steps, {SPARES} spare(s)",
            cfg.faults,
            dir.path().display()
        );
        Self {
            cfg,
            root,
            dir: Some(dir),
            kept: None,
            cluster,
            workers,
            spec,
            http: reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap(),
            started: Instant::now(),
            ledger: Ledger::default(),
            leader: None,
            applied: 0,
            last_job: None,
            last_note: String::new(),
            killed: BTreeSet::new(),
            slots: WORLD + SPARES,
            incarnations: BTreeMap::new(),
            stopped: BTreeSet::new(),
            pending: Vec::new(),
            finished: BTreeMap::new(),
            op: None,
            current: None,
            history: Vec::new(),
            recovered_at: (0, 1, 0),
            last_back: Instant::now(),
            step_at_cont: None,
            last_commit: (0, Instant::now()),
            stats: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    fn dir(&self) -> &Path {
        self.kept.as_deref().unwrap_or_else(|| self.dir.as_ref().expect("dir or kept").path())
    }

    fn client(&self) -> Client {
        Client::new(self.cluster.endpoints().split(',').map(String::from).collect(), None)
    }

    /// Fails the test: which invariant, the seed and the command to replay
    /// it, the fault in progress, the last status, and the logs kept.
    #[track_caller]
    fn fail(&mut self, what: impl fmt::Display) -> ! {
        if let Some(dir) = self.dir.take() {
            self.kept = Some(dir.keep());
        }
        let mut m = format!("chaos: {what}\n");
        let _ = writeln!(m, "  seed {}; reproduce with:\n    {}", self.cfg.seed, self.cfg.repro());
        let _ = writeln!(m, "  after {:.1} s", self.started.elapsed().as_secs_f64());
        if let Some(c) = &self.current {
            let _ = writeln!(m, "  fault in progress: {c}");
        }
        match &self.last_job {
            Some(j) => {
                let _ = writeln!(m, "  last status (leader {:?}): {}", self.leader, job_line(j));
                let _ = writeln!(
                    m,
                    "  last checkpoints: {}",
                    j.checkpoints
                        .iter()
                        .map(|c| format!("{}@{}:{}", c.id, c.step, c.state))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                let _ = writeln!(
                    m,
                    "  last workers: {}",
                    j.workers
                        .iter()
                        .map(|w| format!("{}:{}@{}", w.rank, w.state, w.step))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            None => {
                let _ = writeln!(m, "  no job status observed yet");
            }
        }
        if !self.last_note.is_empty() {
            let _ = writeln!(m, "  last poll: {}", self.last_note);
        }
        if !self.killed.is_empty() || !self.stopped.is_empty() {
            let _ = writeln!(m, "  down: killed {:?}, stopped {:?}", self.killed, self.stopped);
        }
        let _ = writeln!(m, "  recent faults:");
        for h in &self.history[self.history.len().saturating_sub(5)..] {
            let _ = writeln!(m, "    {h}");
        }
        if let Some(leader) = self.leader {
            let log = &self.cluster.nodes[leader.0 as usize - 1].log;
            let _ = writeln!(
                m,
                "  tail of the leader's log {} (raft-rs's own INFO lines left out):\n{}",
                log.display(),
                tail_without(log, 15, " INFO raft:")
            );
        }
        let _ = writeln!(m, "  every process's log and the checkpoints are kept in {}", self.dir().display());
        eprintln!("{}", self.summary());
        panic!("{m}");
    }

    /// Starts again what is due, continues what is due.
    fn run_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|(at, _)| *at <= now);
        self.pending = later;
        for (_, d) in due {
            let done = match d {
                Due::Restart(p @ Proc::Coordinator(id)) => {
                    self.killed.remove(&p);
                    self.cluster.spawn(id).map_err(|e| format!("restart {p}: {e}"))
                }
                Due::Restart(p @ Proc::Worker(slot)) => {
                    self.killed.remove(&p);
                    self.incarnations.remove(&slot);
                    // a slot started as a spare comes back as one; a rank's
                    // slot registers for its rank (a spare holding it by
                    // now makes it a spare)
                    if slot < WORLD {
                        self.workers.spawn(slot, &[]).map_err(|e| format!("restart {p}: {e}"))
                    } else {
                        self.workers.respawn_spare(slot, &[]).map_err(|e| format!("restart {p}: {e}"))
                    }
                }
                Due::NewSpare => match self.workers.spawn_spare(&[]) {
                    Ok(slot) => {
                        self.slots = self.slots.max(slot + 1);
                        Ok(())
                    }
                    Err(e) => Err(format!("start a new spare: {e}")),
                },
                Due::Cont(p, pid) => {
                    self.stopped.remove(&p);
                    self.step_at_cont = self.last_job.as_ref().map(|j| (j.generation.0, j.step.0));
                    signal(pid, "CONT").map_err(|e| format!("SIGCONT {p}: {e}"))
                }
            };
            self.last_back = Instant::now();
            if let Err(e) = done {
                self.fail(e);
            }
        }
    }

    /// A process the test did not kill exited: a worker exiting 0 is fine
    /// once the job has succeeded, anything else fails the test.
    fn check_exits(&mut self) {
        if let Some((id, status)) = self.cluster.exited().into_iter().next() {
            let log = self.cluster.nodes[id.0 as usize - 1].log.clone();
            self.fail(format!(
                "coordinator {id} exited by itself with {status}\n--- tail of {}:\n{}",
                log.display(),
                tail(&log, 30)
            ));
        }
        for (rank, status) in self.workers.exited() {
            if status.success() {
                self.finished.insert(rank, (status, Instant::now()));
            } else {
                let log = self.workers.log(rank);
                self.fail(format!(
                    "worker rank {rank} exited by itself with {status} (the test did not kill it)\n--- tail of {}:\n{}",
                    log.display(),
                    tail(&log, 30)
                ));
            }
        }
    }

    /// Collects a finished operator request's answer.
    async fn collect_op(&mut self) {
        let Some(op) = &mut self.op else { return };
        if op.handle.as_ref().is_some_and(JoinHandle::is_finished) {
            let answer = op.handle.take().expect("checked").await;
            op.result = Some(match answer {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the request task failed: {e}")),
            });
            if let Op::Restore(_) = op.op {
                if let Some(r) = self.ledger.operator_restores.last_mut() {
                    r.1 = Some(Instant::now());
                }
            }
        }
    }

    /// The status from the leader with the highest term among the replicas
    /// that run and are not stopped, if its applied log is at least as long
    /// as the last one observed (so that the views observed only grow).
    async fn leader_status(&mut self) -> Result<ClusterStatus, String> {
        let mut best: Option<ClusterStatus> = None;
        let mut notes = Vec::new();
        for node in &self.cluster.nodes {
            if !node.is_running() || self.stopped.contains(&Proc::Coordinator(node.id)) {
                continue;
            }
            let url = format!("{}/v1/status?job={JOB}", node.url());
            let status = match self.http.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => {
                    resp.json::<ClusterStatus>().await.map_err(|e| e.to_string())
                }
                Ok(resp) => Err(format!("HTTP {}", resp.status())),
                Err(e) => Err(e.to_string()),
            };
            match status {
                Ok(s) if s.role == Role::Leader => {
                    if best.as_ref().is_none_or(|b| s.term > b.term) {
                        best = Some(s);
                    }
                }
                Ok(s) => notes.push(format!("node {}: {:?}", s.node_id, s.role)),
                Err(e) => notes.push(format!("node {}: {e}", node.id)),
            }
        }
        let Some(best) = best else { return Err(format!("no leader answers ({})", notes.join("; "))) };
        if best.applied_index < self.applied {
            return Err(format!(
                "leader {} has applied {} < {} already observed",
                best.node_id, best.applied_index, self.applied
            ));
        }
        self.applied = best.applied_index;
        self.leader = Some(best.node_id);
        Ok(best)
    }

    /// One observation: restarter, exits, operator requests, then the
    /// leader's status of the job, checked against every invariant.
    async fn poll(&mut self) -> Option<JobStatus> {
        self.run_due();
        self.check_exits();
        self.collect_op().await;
        let status = match self.leader_status().await {
            Ok(s) => s,
            Err(why) => {
                self.last_note = why;
                return None;
            }
        };
        let Some(job) = status.jobs.into_iter().find(|j| j.name.as_str() == JOB) else {
            self.last_note = format!("leader {} does not list job {JOB}", status.node_id);
            return None;
        };
        self.last_note.clear();
        let checked = self.ledger.observe(&job, Instant::now());
        self.last_job = Some(job.clone());
        if let Err(e) = checked {
            self.fail(format!("invariant violated: {e}"));
        }
        if job.checkpoints_committed > self.last_commit.0 {
            self.last_commit = (job.checkpoints_committed, Instant::now());
        } else if job.state == "running" && self.last_commit.1.elapsed() > CADENCE {
            self.fail(format!(
                "invariant violated: no checkpoint committed for {:.0} s while the job runs (every_steps = \
                 {EVERY_STEPS}; {} committed in all): checkpointing stopped",
                self.last_commit.1.elapsed().as_secs_f64(),
                job.checkpoints_committed
            ));
        }
        if job.state != "succeeded" {
            if let Some((rank, (status, _))) =
                self.finished.iter().find(|(_, (_, at))| at.elapsed() > FINISHED_GRACE)
            {
                let (rank, status) = (*rank, *status);
                let log = self.workers.log(rank);
                self.fail(format!(
                    "worker rank {rank} exited by itself with {status} while the job is {}\n--- tail of {}:\n{}",
                    job.state,
                    log.display(),
                    tail(&log, 30)
                ));
            }
        }
        Some(job)
    }

    /// Polls until `pred` holds (returns that observation); fails the test
    /// with `what` after `timeout` or when `pred` says something is wrong.
    async fn wait_until<F>(&mut self, what: &str, timeout: Duration, mut pred: F) -> JobStatus
    where
        F: FnMut(&Self, &JobStatus) -> Result<bool, String>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(job) = self.poll().await {
                match pred(self, &job) {
                    Ok(true) => return job,
                    Ok(false) => {}
                    Err(e) => self.fail(format!("{what}: {e}")),
                }
            }
            if Instant::now() > deadline {
                self.fail(format!("timed out after {timeout:?} waiting for {what}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn schedule(&mut self, after_ms: u64, due: Due) {
        self.pending.push((Instant::now() + Duration::from_millis(after_ms), due));
    }

    fn kill_worker(&mut self, slot: u32, restart_after_ms: u64) {
        self.workers.kill(slot);
        self.killed.insert(Proc::Worker(slot));
        self.schedule(restart_after_ms, Due::Restart(Proc::Worker(slot)));
    }

    /// SIGKILLs the worker in `slot`, which never comes back; a new spare
    /// starts after `new_spare_after_ms`.
    fn kill_worker_for_good(&mut self, slot: u32, new_spare_after_ms: u64) {
        self.workers.kill(slot);
        self.incarnations.remove(&slot);
        self.schedule(new_spare_after_ms, Due::NewSpare);
    }

    /// The slot of the worker holding `rank` in `job` (the leader's view),
    /// matched by worker id against each live slot's own status.
    async fn slot_of(&mut self, rank: u32, job: &JobStatus) -> u32 {
        let Some(id) = job.workers.iter().find(|w| w.rank.0 == rank).and_then(|w| w.worker) else {
            self.fail(format!("the status names no worker holding rank {rank}"));
        };
        for slot in 0..self.slots {
            if self.workers.pid(slot).is_none() {
                continue;
            }
            if !self.incarnations.contains_key(&slot) {
                let url = format!("http://{}/v1/status", self.workers.http_addr(slot));
                let got = match self.http.get(&url).send().await {
                    Ok(r) => r.json::<serde_json::Value>().await.ok(),
                    Err(_) => None,
                };
                if let Some(inc) = got.and_then(|v| v["incarnation"].as_u64()) {
                    self.incarnations.insert(slot, inc);
                }
            }
            if self.incarnations.get(&slot) == Some(&id.0) {
                return slot;
            }
        }
        self.fail(format!("no live worker process is worker {id}, which holds rank {rank}"))
    }

    fn kill_coordinator(&mut self, id: NodeId, restart_after_ms: u64) {
        self.cluster.kill(id);
        self.killed.insert(Proc::Coordinator(id));
        self.schedule(restart_after_ms, Due::Restart(Proc::Coordinator(id)));
    }

    fn stop(&mut self, p: Proc, hold_ms: u64) {
        let pid = match p {
            Proc::Coordinator(id) => self.cluster.nodes[id.0 as usize - 1].pid(),
            Proc::Worker(rank) => self.workers.pid(rank),
        };
        let Some(pid) = pid else { self.fail(format!("{p} has no process to stop")) };
        if let Err(e) = signal(pid, "STOP") {
            self.fail(format!("SIGSTOP {p}: {e}"));
        }
        self.stopped.insert(p);
        self.schedule(hold_ms, Due::Cont(p, pid));
    }

    fn leader(&mut self) -> NodeId {
        match self.leader {
            Some(l) => l,
            None => self.fail("no leader known before a fault"),
        }
    }

    /// Injects one fault; says what recovery from it means.
    async fn inject(&mut self, p: &Plan, before: &JobStatus) -> Expect {
        let rank = p.rank % WORLD;
        let stopped = matches!(p.kind, Kind::StopWorker | Kind::StopLeader);
        let (new_generation, desc) = match p.kind {
            Kind::KillWorker => {
                let slot = self.slot_of(rank, before).await;
                self.kill_worker(slot, p.restart_after_ms);
                (true, format!("SIGKILL rank {rank} (slot {slot}), restart after {} ms", p.restart_after_ms))
            }
            Kind::KillWorkerForGood => {
                let slot = self.slot_of(rank, before).await;
                self.kill_worker_for_good(slot, p.restart_after_ms);
                (
                    true,
                    format!(
                        "SIGKILL rank {rank} (slot {slot}) for good, a new spare after {} ms",
                        p.restart_after_ms
                    ),
                )
            }
            Kind::StopWorker => {
                let slot = self.slot_of(rank, before).await;
                self.stop(Proc::Worker(slot), p.hold_ms);
                (false, format!("SIGSTOP rank {rank} (slot {slot}) for {} ms", p.hold_ms))
            }
            Kind::KillLeader => {
                let leader = self.leader();
                self.kill_coordinator(leader, p.restart_after_ms);
                (false, format!("SIGKILL leader {leader}, restart after {} ms", p.restart_after_ms))
            }
            Kind::KillFollower => {
                let leader = self.leader();
                let followers: Vec<NodeId> =
                    self.cluster.nodes.iter().map(|n| n.id).filter(|id| *id != leader).collect();
                let id = followers[(p.pick % followers.len() as u64) as usize];
                self.kill_coordinator(id, p.restart_after_ms);
                (false, format!("SIGKILL follower {id}, restart after {} ms", p.restart_after_ms))
            }
            Kind::StopLeader => {
                let leader = self.leader();
                self.stop(Proc::Coordinator(leader), p.hold_ms);
                (false, format!("SIGSTOP leader {leader} for {} ms", p.hold_ms))
            }
            Kind::KillLeaderAndWorker => {
                let slot = self.slot_of(rank, before).await;
                let leader = self.leader();
                self.kill_coordinator(leader, p.restart_after_ms);
                self.kill_worker(slot, p.restart_after_ms);
                (
                    true,
                    format!(
                        "SIGKILL leader {leader} and rank {rank} (slot {slot}), restart after {} ms",
                        p.restart_after_ms
                    ),
                )
            }
            Kind::OperatorCheckpoint => {
                let client = self.client();
                let handle = tokio::spawn(async move { client.checkpoint(JOB).await });
                self.op = Some(OpState { op: Op::Checkpoint, handle: Some(handle), result: None });
                (false, "operator checkpoint".to_string())
            }
            Kind::OperatorRestore => {
                let latest = before.latest_committed.map(|c| c.id.0);
                let older: Vec<(u64, u64)> = before
                    .checkpoints
                    .iter()
                    .filter(|c| c.state == "committed" && Some(c.id.0) != latest)
                    .filter(|c| !self.ledger.corrupted.contains(&c.id.0))
                    .map(|c| (c.id.0, c.step.0))
                    .collect();
                let target =
                    (p.explicit && !older.is_empty()).then(|| older[(p.pick % older.len() as u64) as usize]);
                if let Some((_, step)) = target {
                    self.ledger.allow_down_to(step);
                }
                let from = target.map(|(id, _)| id);
                let client = self.client();
                self.ledger.operator_restores.push((Instant::now(), None));
                let handle = tokio::spawn(async move { client.restore(JOB, from).await });
                self.op = Some(OpState { op: Op::Restore(from), handle: Some(handle), result: None });
                let desc = match target {
                    Some((id, step)) => format!("operator restore from checkpoint {id} (step {step})"),
                    None => format!(
                        "operator restore from the latest ({:?})",
                        before.latest_committed.map(|c| c.id.0)
                    ),
                };
                (true, desc)
            }
            Kind::CorruptLatest => {
                let slot = self.slot_of(rank, before).await;
                return self.corrupt_latest(p, slot).await;
            }
        };
        Expect { new_generation, stopped, desc }
    }

    /// Freezes every worker (so no newer checkpoint commits meanwhile),
    /// flips bytes inside one tensor of one shard of the latest committed
    /// checkpoint, kills a worker so that the restore reads it, lets the
    /// others go on.
    async fn corrupt_latest(&mut self, p: &Plan, victim: u32) -> Expect {
        let mut pids = Vec::new();
        for rank in 0..self.slots {
            if let Some(pid) = self.workers.pid(rank) {
                if let Err(e) = signal(pid, "STOP") {
                    self.fail(format!("SIGSTOP worker {rank}: {e}"));
                }
                pids.push((rank, pid));
                self.stopped.insert(Proc::Worker(rank));
            }
        }
        // let a commit already in flight land (a short, bounded pause)
        let t = Instant::now();
        let mut job = self.poll().await;
        while t.elapsed() < Duration::from_millis(500)
            && job.as_ref().is_none_or(|j| j.checkpoints.iter().any(|c| c.state == "pending"))
        {
            tokio::time::sleep(POLL).await;
            job = self.poll().await;
        }
        let job = job.or_else(|| self.last_job.clone()).expect("a status was observed before the fault");
        let shard_rank = ((p.pick >> 32) % WORLD as u64) as u32;
        let desc = match job.latest_committed {
            None => format!("no committed checkpoint to corrupt; SIGKILL worker {victim}"),
            Some(latest) => {
                let id = latest.id.0;
                let path = self
                    .root
                    .join(JOB)
                    .join(format!("ckpt-{id:08}"))
                    .join(format!("rank-{shard_rank:05}.safetensors"));
                match flip(&path, p.pick, p.flip_at) {
                    Ok(what) => {
                        // the restore falls back to the newest committed one
                        // the test did not corrupt
                        let fallback = job
                            .checkpoints
                            .iter()
                            .filter(|c| {
                                c.state == "committed"
                                    && c.id.0 != id
                                    && !self.ledger.corrupted.contains(&c.id.0)
                            })
                            .map(|c| c.step.0)
                            .max()
                            .unwrap_or(0);
                        self.ledger.corrupted.insert(id);
                        self.ledger.allow_down_to(fallback);
                        format!(
                            "corrupt checkpoint {id} (step {}) rank {shard_rank}: {what}; SIGKILL worker {victim}",
                            latest.step
                        )
                    }
                    Err(e) => self.fail(format!(
                        "invariant violated: the shard of rank {shard_rank} of the latest committed checkpoint \
                         {id} cannot be read: {e}"
                    )),
                }
            }
        };
        self.kill_worker(victim, p.restart_after_ms);
        for (rank, pid) in pids {
            self.stopped.remove(&Proc::Worker(rank));
            if rank != victim {
                if let Err(e) = signal(pid, "CONT") {
                    self.fail(format!("SIGCONT worker {rank}: {e}"));
                }
            }
        }
        Expect { new_generation: true, stopped: false, desc }
    }

    /// Whether the job has recovered from the fault: operator requests
    /// answered, the job running again (in a newer
    /// generation where a restore was due) and the slowest rank past where
    /// it (re)started.
    fn recovered(&self, x: &Expect, before: &JobStatus, j: &JobStatus) -> Result<bool, String> {
        // (killed coordinators need not be back: the next fault waits for them)
        if j.state == "succeeded" {
            // the last fault: the job went on to its end (an operator
            // request in flight may then never be applied)
            return Ok(true);
        }
        let mut want_generation = before.generation.0 + u64::from(x.new_generation);
        if let Some(op) = &self.op {
            let Some(result) = &op.result else { return Ok(false) };
            match (&op.op, result) {
                (Op::Checkpoint, Err(e)) => return Err(format!("the operator checkpoint failed: {e}")),
                (Op::Checkpoint, Ok(v)) => {
                    let Some(id) = v.get("id").and_then(serde_json::Value::as_u64) else {
                        return Err(format!("the operator checkpoint answered without an id: {v}"));
                    };
                    let newer =
                        j.checkpoints.iter().filter(|c| c.id.0 > id && c.state == "committed").count();
                    if !self.ledger.seen.contains_key(&id) && newer < KEEP_LAST {
                        // its commit is not in the observed ledger yet
                        return Ok(false);
                    }
                }
                (Op::Restore(from), Ok(v)) => {
                    let Some(g) = v.get("generation").and_then(serde_json::Value::as_u64) else {
                        return Err(format!("the operator restore answered without a generation: {v}"));
                    };
                    want_generation = want_generation.max(g);
                    if let (Some(from), true) = (from, j.generation.0 == g) {
                        if let Some(r) = j.restored_from.filter(|r| r.id.0 != *from) {
                            return Err(format!(
                                "the operator restore from checkpoint {from} restored generation {g} from checkpoint {}",
                                r.id
                            ));
                        }
                    }
                }
                (Op::Restore(from), Err(e)) => {
                    // refused because retention retired the target between
                    // the test's choice and the request: no restore then
                    let retired = from.is_some_and(|id| {
                        !j.checkpoints.iter().any(|c| c.id.0 == id && c.state == "committed")
                    });
                    if !retired {
                        return Err(format!("the operator restore failed: {e}"));
                    }
                    want_generation = before.generation.0;
                }
            }
        }
        if j.state != "running" {
            return Ok(false);
        }
        if x.stopped && self.pending.iter().any(|(_, d)| matches!(d, Due::Cont(..))) {
            return Ok(false);
        }
        if j.generation.0 > before.generation.0 || want_generation > before.generation.0 {
            let from = j.restored_from.map_or(0, |c| c.step.0);
            Ok(j.generation.0 >= want_generation && j.step.0 > from)
        } else {
            // a stopped rank may have reported steps beyond `before` just
            // before it stopped: past where the job was when it went on
            let cont = match self.step_at_cont {
                Some((g, step)) if x.stopped && g == j.generation.0 => step,
                _ => 0,
            };
            Ok(j.step.0 > before.step.0.max(cont))
        }
    }

    /// Fault `i`: wait for its step, pause, inject, wait for recovery.
    async fn fault(&mut self, i: usize, p: &Plan) {
        let n = self.cfg.faults;
        let target = FIRST_FAULT_STEP + i as u64 * STEPS_PER_FAULT;
        let before = self
            .wait_until(
                &format!("the job to reach step {target} before fault {}", i + 1),
                PROGRESS_DEADLINE,
                |c, j| {
                    if j.state == "succeeded" {
                        return Err(format!(
                            "the job ran to its end (step {}) before fault {} of {n}: the recoveries so far let \
                             it train {STEPS_BUDGET} times ahead of the schedule of one fault per \
                             {STEPS_PER_FAULT} steps",
                            j.step,
                            i + 1
                        ));
                    }
                    let (committed, generation, step) = c.recovered_at;
                    let checkpointed = j.checkpoints_committed > committed
                        || j.generation.0 != generation
                        || j.step.0 >= step + COMMIT_WAIT_STEPS;
                    // a spare ready for a worker the fault may kill for good
                    let spare = j.spares.iter().any(|s| s.state == SpareState::Ready);
                    Ok(c.pending.is_empty()
                        && c.op.is_none()
                        && j.state == "running"
                        && j.step.0 >= target
                        && checkpointed
                        && spare)
                },
            )
            .await;
        tokio::time::sleep(Duration::from_millis(p.jitter_ms)).await;
        let before = self.poll().await.filter(|j| j.state == "running").unwrap_or(before);
        let t0 = Instant::now();
        self.step_at_cont = None;
        tracing::info!("--- fault {}/{n}: {}", i + 1, p.kind);
        let x = self.inject(p, &before).await;
        let head = format!(
            "[{:>3}/{n}] t={:>6.1}s {:<22} {} (at step {}, gen {})",
            i + 1,
            self.started.elapsed().as_secs_f64(),
            p.kind.name(),
            x.desc,
            before.step,
            before.generation
        );
        println!("{head}");
        self.current = Some(head.clone());
        let after = self
            .wait_until(&format!("recovery from fault {}: {}", i + 1, x.desc), RECOVERY_DEADLINE, |c, j| {
                c.recovered(&x, &before, j)
            })
            .await;
        let took = t0.elapsed();
        // (zero when the job recovered before the restarter brought back
        // what the fault took down, e.g. a killed follower)
        let from_back = if self.pending.is_empty() {
            Instant::now().saturating_duration_since(self.last_back.max(t0))
        } else {
            Duration::ZERO
        };
        if let Some(OpState { op: Op::Restore(Some(id)), result: Some(Err(e)), .. }) = &self.op {
            self.notes.push(format!(
                "fault {}: restore from {id} refused, the target was retired meanwhile: {e}",
                i + 1
            ));
        }
        self.op = None;
        self.ledger.settle(&after);
        self.recovered_at = (after.checkpoints_committed, after.generation.0, after.step.0);
        let restores = u64::from(after.restores.saturating_sub(before.restores));
        let s = self.stats.entry(p.kind).or_default();
        s.count += 1;
        s.restores += restores;
        s.recoveries.push(took);
        s.from_back.push(from_back);
        let line = format!(
            "{head} -> recovered in {} s (gen {}, step {}, +{restores} restores)",
            secs(took),
            after.generation,
            after.step
        );
        println!(
            "          recovered in {} s: gen {}, step {}, +{restores} restores",
            secs(took),
            after.generation,
            after.step
        );
        self.history.push(line);
        self.current = None;
    }

    /// The end: the job succeeded with the reference digest; every
    /// checkpoint once committed is still committed and verifies, or was
    /// retired, corrupted by the test or abandoned by an operator restore.
    async fn final_checks(&mut self) -> JobStatus {
        // the tail after the last fault is as long as the run made it (a long
        // run's is thousands of steps): wait while the job keeps training, and
        // fail when it does not advance 1,000 steps within FINISH_DEADLINE
        let mut mark = 0;
        let done = loop {
            let floor = mark;
            let j = self
                .wait_until("the job to succeed (or train 1,000 steps on)", FINISH_DEADLINE, |c, j| {
                    Ok((j.state == "succeeded" && c.pending.is_empty()) || j.step.0 >= floor + 1_000)
                })
                .await;
            if j.state == "succeeded" && self.pending.is_empty() {
                break j;
            }
            mark = j.step.0;
        };
        let trainer = self.spec.trainer.clone().expect("the built-in trainer");
        let world = self.spec.world_size;
        let reference = tokio::task::spawn_blocking(move || reference_digest(&trainer, world)).await.unwrap();
        if done.final_digest.as_deref() != Some(reference.as_str()) {
            self.fail(format!(
                "final_digest {:?} differs from the failure-free reference {reference}",
                done.final_digest
            ));
        }
        let listed: BTreeMap<u64, String> =
            done.checkpoints.iter().map(|c| (c.id.0, c.state.to_string())).collect();
        let seen: Vec<(u64, Seen)> = self.ledger.seen.iter().map(|(i, s)| (*i, s.clone())).collect();
        for (id, s) in seen {
            match listed.get(&id).map(String::as_str) {
                Some("committed") => {
                    let dir = self.root.join(JOB).join(format!("ckpt-{id:08}"));
                    let out = common::flotilla(&["inspect", dir.to_str().unwrap(), "--verify"]);
                    if !out.status.success() {
                        let (stdout, stderr) = common::text(&out);
                        if self.ledger.corrupted.contains(&id) {
                            self.notes.push(format!(
                                "checkpoint {id}: corrupted by the test, never restored from, still committed; \
                                 inspect --verify: {}",
                                stderr.trim()
                            ));
                        } else {
                            self.fail(format!(
                                "committed checkpoint {id} (step {}) does not verify: {}{}",
                                s.step,
                                stdout.trim(),
                                stderr.trim()
                            ));
                        }
                    }
                }
                Some("condemned") if !self.ledger.corrupted.contains(&id) => {
                    self.fail(format!("checkpoint {id} is corrupt but the test did not corrupt it"));
                }
                // corrupt by the test, abandoned, retired: checked as they
                // happened by Ledger::observe
                _ => {}
            }
        }
        // LATEST (written after the commit, for offline tools) catches up
        let latest = done.latest_committed.map(|c| c.id.0);
        let path = self.root.join(JOB).join("LATEST");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let on_disk = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u64>().ok());
            if on_disk == latest {
                break;
            }
            if Instant::now() > deadline {
                self.fail(format!("LATEST says {on_disk:?}, the ledger's latest committed is {latest:?}"));
            }
            tokio::time::sleep(POLL).await;
        }
        done
    }

    /// The per-kind table of recovery times.
    fn summary(&self) -> String {
        let mut s = String::new();
        let job = self.last_job.as_ref();
        let _ = writeln!(
            s,
            "\nchaos summary: seed {}, {} faults injected of {} in {:.1} s; job {}, generation {}, {} restores, {} checkpoints committed",
            self.cfg.seed,
            self.stats.values().map(|k| k.count).sum::<usize>(),
            self.cfg.faults,
            self.started.elapsed().as_secs_f64(),
            job.map_or("?", |j| j.state.as_str()),
            job.map_or(0, |j| j.generation.0),
            job.map_or(0, |j| j.restores),
            job.map_or(0, |j| j.checkpoints_committed),
        );
        let _ = writeln!(
            s,
            "recovery: seconds from the fault to the job running again past its restart step; \
             'back': from the moment every process the fault took down was back"
        );
        let _ = writeln!(
            s,
            "{:<24} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10}",
            "fault kind", "count", "restores", "p50", "p90", "p99", "max", "back p50", "back p99", "back max"
        );
        let mut all = KindStats::default();
        let row = |s: &mut String, name: &str, k: &KindStats| {
            let mut r = k.recoveries.clone();
            r.sort();
            let mut b = k.from_back.clone();
            b.sort();
            let _ = writeln!(
                s,
                "{:<24} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10}",
                name,
                k.count,
                k.restores,
                secs(percentile(&r, 0.50)),
                secs(percentile(&r, 0.90)),
                secs(percentile(&r, 0.99)),
                secs(r.last().copied().unwrap_or_default()),
                secs(percentile(&b, 0.50)),
                secs(percentile(&b, 0.99)),
                secs(b.last().copied().unwrap_or_default())
            );
        };
        for (kind, k) in &self.stats {
            row(&mut s, kind.name(), k);
            all.count += k.count;
            all.restores += k.restores;
            all.recoveries.extend(&k.recoveries);
            all.from_back.extend(&k.from_back);
        }
        row(&mut s, "all", &all);
        let detected = self
            .ledger
            .corrupted
            .iter()
            .filter(|id| self.ledger.seen.get(id).is_some_and(|s| s.state != "committed"))
            .count();
        let _ = writeln!(
            s,
            "corrupted checkpoints: {} ({detected} found corrupt and left; the rest never restored from)",
            self.ledger.corrupted.len()
        );
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let _ = writeln!(s, "reproduce with: {}", self.cfg.repro());
        s
    }
}

/// Flips up to 4 bytes inside one tensor's data (never the header) of the
/// shard at `path`, in place, so that its checksum no longer matches.
fn flip(path: &Path, pick: u64, at: u64) -> Result<String, String> {
    let header = read_header(path, "chaos").map_err(|e| e.to_string())?;
    let tensors: Vec<_> = header.tensors.iter().filter(|(_, r)| !r.is_empty()).collect();
    if tensors.is_empty() {
        return Err(format!("{} holds no tensor data", path.display()));
    }
    let (var, range) = tensors[(pick % tensors.len() as u64) as usize];
    let within = (at % range.len() as u64) as usize;
    let n = 4.min(range.len() - within);
    let offset = (header.header_len + range.start + within) as u64;
    let mut file =
        std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; n];
    file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    file.read_exact(&mut bytes).map_err(|e| e.to_string())?;
    for b in &mut bytes {
        *b ^= 0xff;
    }
    file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    file.write_all(&bytes).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    Ok(format!("{n} byte(s) flipped at file offset {offset}, inside {}", var.name))
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_faults_never_lose_a_committed_checkpoint_or_change_the_result() {
    let cfg = Config::from_env();
    let (seed, repro) = (cfg.seed, cfg.repro());
    println!("chaos seed {seed}; reproduce with:\n    {repro}");
    // whatever panics, the seed and the command come with it
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        eprintln!("chaos seed {seed}; reproduce with:\n    {repro}");
    }));

    let plans = plan(cfg.seed, cfg.faults, &cfg.kinds);
    let mut c = Chaos::start(cfg).await;
    tracing::info!("--- the job starts");
    c.wait_until("the job to start running", START_DEADLINE, |_, j| Ok(j.state == "running" && j.step.0 > 0))
        .await;
    for (i, p) in plans.iter().enumerate() {
        c.fault(i, p).await;
    }
    tracing::info!("--- after the last fault, the job runs to its end");
    let done = c.final_checks().await;
    println!("{}", c.summary());
    assert_eq!(done.state, "succeeded");
}

// ------------------------------------------- the harness's own logic, pure

/// A job status with `checkpoints` as (id, step, state), built from JSON so
/// that fields added to the status later do not break these tests.
fn job_with(generation: u64, checkpoints: &[(u64, u64, &str)]) -> JobStatus {
    let latest = checkpoints
        .iter()
        .filter(|c| c.2 == "committed")
        .max_by_key(|c| (c.1, c.0))
        .map(|c| serde_json::json!({"id": c.0, "step": c.1}));
    let list: Vec<_> = checkpoints
        .iter()
        .map(|(id, step, state)| {
            serde_json::json!({"id": id, "step": step, "generation": generation, "state": state,
                               "bytes": 0, "begun_ms": 0})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "name": JOB, "state": "running", "generation": generation, "world_size": WORLD, "step": 0,
        "restores": generation - 1, "latest_committed": latest, "checkpoints": list, "workers": [],
        "final_digest": null, "error": null,
    }))
    .unwrap()
}

#[test]
fn ledger_accepts_retention_and_catches_a_lost_checkpoint() {
    let now = Instant::now();
    let mut l = Ledger::default();
    l.observe(&job_with(1, &[(1, 50, "committed"), (2, 100, "committed"), (3, 150, "committed")]), now)
        .unwrap();
    // 4 commits, 1 retired: three newer once-committed checkpoints
    l.observe(&job_with(1, &[(2, 100, "committed"), (3, 150, "committed"), (4, 200, "committed")]), now)
        .unwrap();
    l.observe(&job_with(1, &[(3, 150, "committed"), (4, 200, "deleted")]), now).unwrap_err();
    let mut l = Ledger::default();
    l.observe(&job_with(1, &[(1, 50, "committed"), (2, 100, "committed")]), now).unwrap();
    let e = l.observe(&job_with(1, &[(2, 100, "committed")]), now).unwrap_err();
    assert!(e.contains("checkpoint 1") && e.contains("lost"), "{e}");
}

#[test]
fn ledger_allows_corrupt_and_abandoned_only_when_the_test_caused_them() {
    let now = Instant::now();
    let two = [(1, 50, "committed"), (2, 100, "committed")];
    let mut l = Ledger::default();
    l.observe(&job_with(1, &two), now).unwrap();
    let e = l.observe(&job_with(2, &[(1, 50, "committed"), (2, 100, "condemned")]), now).unwrap_err();
    assert!(e.contains("did not corrupt"), "{e}");

    let mut l = Ledger::default();
    l.observe(&job_with(1, &two), now).unwrap();
    l.corrupted.insert(2);
    l.allow_down_to(50);
    l.observe(&job_with(2, &[(1, 50, "committed"), (2, 100, "condemned")]), now).unwrap();
    l.settle(&job_with(2, &[(1, 50, "committed"), (2, 100, "condemned")]));
    assert_eq!(l.floor, 50);
    // the corrupt one collected: fine
    l.observe(&job_with(2, &[(1, 50, "committed")]), now).unwrap();

    let mut l = Ledger::default();
    l.observe(&job_with(1, &two), now).unwrap();
    let abandoned = [(1, 50, "committed"), (2, 100, "abandoned")];
    assert!(l.observe(&job_with(2, &abandoned), now).unwrap_err().contains("no operator restore"));
    let mut l = Ledger::default();
    l.observe(&job_with(1, &two), now).unwrap();
    l.operator_restores.push((now, None));
    l.allow_down_to(50);
    l.observe(&job_with(2, &abandoned), now).unwrap();

    // a state word no build knows never reaches the checker: the status
    // does not decode, and the error names the word
    let unknown = serde_json::json!({"id": 2, "step": 100, "generation": 1, "state": "mystery",
                                     "bytes": 0, "begun_ms": 0});
    let e = serde_json::from_value::<flotilla_coordinator::api::CheckpointView>(unknown).unwrap_err();
    assert!(e.to_string().contains("\"mystery\""), "{e}");
}

#[test]
fn ledger_catches_the_latest_committed_step_going_back() {
    let now = Instant::now();
    let mut l = Ledger::default();
    l.observe(&job_with(1, &[(1, 50, "committed"), (2, 100, "committed")]), now).unwrap();
    // corrupt, as the test did, but with no allowance for the latest to go back
    l.corrupted.insert(2);
    let e = l.observe(&job_with(2, &[(1, 50, "committed"), (2, 100, "condemned")]), now).unwrap_err();
    assert!(e.contains("went back from 100 to 50"), "{e}");
    let mut l = Ledger::default();
    l.observe(&job_with(1, &[(1, 50, "committed"), (2, 100, "committed")]), now).unwrap();
    l.corrupted.insert(2);
    l.allow_down_to(75);
    let e = l.observe(&job_with(2, &[(1, 50, "committed"), (2, 100, "condemned")]), now).unwrap_err();
    assert!(e.contains("below 75"), "{e}");
    assert!(l.observe(&job_with(1, &[]), now).unwrap_err().contains("generation went back"));
}

#[test]
fn the_plan_depends_on_the_seed_only_and_covers_every_kind_first() {
    let a = plan(42, 30, &Kind::ALL);
    let b = plan(42, 30, &Kind::ALL);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    let first: BTreeSet<Kind> = a[..Kind::ALL.len()].iter().map(|p| p.kind).collect();
    assert_eq!(first.len(), Kind::ALL.len());
    assert_ne!(format!("{a:?}"), format!("{:?}", plan(43, 30, &Kind::ALL)));
    let only = plan(1, 20, &[Kind::KillWorker]);
    assert!(only.iter().all(|p| p.kind == Kind::KillWorker));
    assert!(a.iter().any(|p| p.explicit) && a.iter().any(|p| !p.explicit));
}
