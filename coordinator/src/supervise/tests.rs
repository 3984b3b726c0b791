//! The reconciler's tests: ledger state × observations → actions, decision
//! by decision, and a property test that drives simulated workers through
//! random interleavings of leader changes, lost directives, lost proposals,
//! silences and restarted processes, and checks that every interleaving
//! reaches the same end: the job succeeds with the failure-free digest.

use super::*;
use crate::ledger::{Event, RefusalKind};
use flotilla_shared::checksum::Checksum;
use flotilla_shared::shard::ShardDigest;
use flotilla_shared::spec::JobSpec;
use proptest::prelude::*;
use std::collections::VecDeque;

const T0: u64 = 1_000_000;
const TOTAL: u64 = 40;

fn name() -> JobName {
    JobName::new("j").unwrap()
}

fn spec(world: u32) -> JobSpec {
    JobSpec::from_toml(&format!(
        "name = \"j\"\nworld_size = {world}\n[checkpoint]\nevery_steps = 5\nroot = \"/ckpt\"\ntimeout_seconds = 5\nkeep_last = 2\n\
         [failure]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1000\nmax_restarts = 1000\nhang_timeout_seconds = 10\n\
         [trainer]\ntotal_steps = {TOTAL}\nparams_per_rank_bytes = 65536\nlayers = 1\n"
    ))
    .unwrap()
}

/// The simulated model: each rank's state is a number, updated per step as a
/// pure function of (rank, step, value), like the built-in trainer.
fn init_value(rank: u32) -> u32 {
    0x9e37_79b9 ^ rank
}

fn step_value(rank: u32, step: u64, v: u32) -> u32 {
    v.rotate_left(5) ^ (step as u32).wrapping_mul(0x85eb_ca6b) ^ rank
}

fn reference_digest(world: u32) -> String {
    let digests: Vec<String> = (0..world)
        .map(|r| {
            let v = (0..TOTAL).fold(init_value(r), |v, s| step_value(r, s, v));
            format!("{v:08x}")
        })
        .collect();
    combine_digests(&digests)
}

/// A worker process as the supervisor sees it through the protocol.
#[derive(Debug, Clone)]
struct SimWorker {
    rank: u32,
    conn: ConnId,
    incarnation: u64,
    generation: Option<Generation>,
    step: u64,
    value: u32,
    status: WorkerStatus,
    pending: Option<(CheckpointId, u64)>,
    saved: BTreeMap<CheckpointId, WorkerMessage>,
    finished: Option<WorkerMessage>,
    inbox: VecDeque<CoordinatorMessage>,
    /// Holds no rank (`rank` is meaningless until an `Assign`).
    spare: bool,
    /// Killed for good: never heard from again.
    dead: bool,
}

impl SimWorker {
    fn new(rank: u32, conn: ConnId, incarnation: u64) -> Self {
        Self {
            rank,
            conn,
            incarnation,
            generation: None,
            step: 0,
            value: init_value(rank),
            status: WorkerStatus::Waiting,
            pending: None,
            saved: BTreeMap::new(),
            finished: None,
            inbox: VecDeque::new(),
            spare: false,
            dead: false,
        }
    }

    fn new_spare(conn: ConnId, incarnation: u64) -> Self {
        Self { spare: true, status: WorkerStatus::Spare, ..Self::new(u32::MAX, conn, incarnation) }
    }

    /// Drops any rank state and waits, ready, for a rank.
    fn become_spare(&mut self) {
        *self =
            Self { inbox: std::mem::take(&mut self.inbox), ..Self::new_spare(self.conn, self.incarnation) };
    }

    fn registration(&self) -> Registration {
        Registration {
            conn: self.conn,
            job: name(),
            rank: (!self.spare).then_some(Rank(self.rank)),
            incarnation: Incarnation(self.incarnation),
            generation: self.generation,
            step: Step(self.step),
            host: Some(format!("host-{}", self.incarnation)),
            http_addr: None,
        }
    }

    fn heartbeat(&self) -> WorkerMessage {
        WorkerMessage::Heartbeat {
            generation: self.generation.unwrap_or(Generation(0)),
            step: Step(self.step),
            status: self.status,
        }
    }

    fn save(&mut self, id: CheckpointId) -> WorkerMessage {
        let manifest = ShardDigest {
            rank: Rank(self.rank),
            file: format!("rank-{:05}.safetensors", self.rank),
            bytes: 10,
            checksum: Checksum(self.value),
        };
        let g = self.generation.expect("saves only in a generation");
        let msg = WorkerMessage::ShardSaved { generation: g, checkpoint: id, manifest };
        self.saved.insert(id, msg.clone());
        msg
    }

    /// Carries out one directive the way the real worker does (idempotently).
    fn handle(&mut self, msg: CoordinatorMessage) -> Vec<WorkerMessage> {
        if self.spare && !matches!(msg, CoordinatorMessage::Assign { .. } | CoordinatorMessage::Stop { .. }) {
            // a spare holds no rank: a rank's directive is none of its
            // business (one whose `Assign` was lost is told again with it)
            if let CoordinatorMessage::Error(e) = &msg {
                assert_ne!(e.code, ErrorCode::Fenced, "a healthy spare was fenced: {}", e.message);
            }
            return vec![];
        }
        match msg {
            CoordinatorMessage::Assign { rank, .. } => {
                if !self.spare {
                    // said again (it was sent before this worker's heartbeat said it took it)
                    assert_eq!(self.rank, rank.0, "a rank was assigned to a worker holding another");
                    return vec![];
                }
                self.spare = false;
                self.rank = rank.0;
                self.value = init_value(rank.0);
                self.status = WorkerStatus::Waiting;
                vec![]
            }
            CoordinatorMessage::Registered { spare: true, .. } => {
                self.become_spare();
                vec![]
            }
            CoordinatorMessage::Restore { generation, from, .. } => {
                if self.generation == Some(generation) {
                    return if self.status == WorkerStatus::Waiting {
                        vec![WorkerMessage::Restored { generation, step: Step(self.step), source: None }]
                    } else {
                        vec![]
                    };
                }
                match from {
                    Some(p) => {
                        self.step = p.step.0;
                        self.value = p.shard.checksum.0;
                    }
                    None => {
                        self.step = 0;
                        self.value = init_value(self.rank);
                    }
                }
                self.generation = Some(generation);
                self.status = WorkerStatus::Waiting;
                self.pending = None;
                self.saved.clear();
                self.finished = None;
                vec![WorkerMessage::Restored { generation, step: Step(self.step), source: None }]
            }
            CoordinatorMessage::Resume { generation, step } => {
                if self.generation == Some(generation) && self.status == WorkerStatus::Waiting {
                    assert_eq!(step.0, self.step, "resumed at another step than restored");
                    self.status = WorkerStatus::Running;
                }
                vec![]
            }
            CoordinatorMessage::Checkpoint { generation, checkpoint, step, .. } => {
                if self.generation != Some(generation) {
                    return vec![];
                }
                if let Some(saved) = self.saved.get(&checkpoint) {
                    return vec![saved.clone()];
                }
                if self.pending.is_some_and(|(id, _)| id == checkpoint) {
                    return vec![];
                }
                if self.step > step.0 {
                    return vec![WorkerMessage::ShardFailed {
                        generation,
                        checkpoint,
                        kind: ShardFailureKind::PastStep,
                        reason: "past".into(),
                    }];
                }
                if self.step == step.0 {
                    return vec![self.save(checkpoint)];
                }
                self.pending = Some((checkpoint, step.0));
                vec![]
            }
            CoordinatorMessage::AbortCheckpoint { checkpoint, .. } => {
                self.saved.remove(&checkpoint);
                self.pending = self.pending.filter(|(id, _)| *id != checkpoint);
                vec![]
            }
            CoordinatorMessage::Error(e) => {
                assert_ne!(e.code, ErrorCode::Fenced, "a healthy worker was fenced: {}", e.message);
                vec![]
            }
            // a simulated worker keeps no memory copies
            CoordinatorMessage::Registered { .. }
            | CoordinatorMessage::CopyShard { .. }
            | CoordinatorMessage::Alive
            | CoordinatorMessage::NotLeader { .. }
            | CoordinatorMessage::Stop { .. } => vec![],
            CoordinatorMessage::Batch(_) => panic!("the supervisor addresses ranks, never batches"),
        }
    }

    /// One training step, if running; snapshots first when a checkpoint is due here.
    fn train(&mut self) -> Vec<WorkerMessage> {
        let mut out = Vec::new();
        if self.status != WorkerStatus::Running {
            return out;
        }
        if let Some((id, at)) = self.pending {
            if at == self.step {
                self.pending = None;
                out.push(self.save(id));
            }
        }
        if self.step >= TOTAL {
            self.status = WorkerStatus::Finished;
            let msg = WorkerMessage::Finished {
                generation: self.generation.unwrap(),
                step: Step(self.step),
                digest: format!("{:08x}", self.value),
            };
            self.finished = Some(msg.clone());
            out.push(msg);
            return out;
        }
        self.value = step_value(self.rank, self.step, self.value);
        self.step += 1;
        out
    }
}

/// A ledger, a supervisor and simulated workers, with the network and Raft
/// under the test's control.
struct World {
    st: State,
    sup: Supervisor,
    term: u64,
    now: u64,
    workers: Vec<SimWorker>,
    next_conn: ConnId,
    next_incarnation: u64,
    /// Proposals made but not yet applied, in order.
    proposals: VecDeque<Command>,
    files: Vec<FileWork>,
    /// Answers to operators' requests, in order.
    answers: Vec<(RequestId, CheckpointOutcome)>,
    /// Restores this leader timed, decision to training again (seconds).
    recoveries: Vec<f64>,
}

impl World {
    fn new(world: u32) -> Self {
        Self::with_spec(spec(world))
    }

    fn with_spec(spec: JobSpec) -> Self {
        let world = spec.world_size;
        let mut st = State::default();
        st.apply(Command::SubmitJob { spec, now_ms: T0, origin: None }).unwrap();
        let mut w = Self {
            st,
            sup: Supervisor::new(SupervisorConfig::default(), Now { mono_ms: T0, wall_ms: T0 }, 1),
            term: 1,
            now: T0,
            workers: Vec::new(),
            next_conn: 1,
            next_incarnation: 100,
            proposals: VecDeque::new(),
            files: Vec::new(),
            answers: Vec::new(),
            recoveries: Vec::new(),
        };
        for rank in 0..world {
            let (conn, inc) = (w.conn(), w.incarnation());
            w.workers.push(SimWorker::new(rank, conn, inc));
        }
        w
    }

    fn conn(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }

    fn incarnation(&mut self) -> u64 {
        self.next_incarnation += 1;
        self.next_incarnation
    }

    fn t(&self) -> Now {
        Now { mono_ms: self.now, wall_ms: self.now }
    }

    fn job(&self) -> &Job {
        &self.st.jobs[&name()]
    }

    /// Routes the supervisor's actions: directives into inboxes, proposals
    /// into the Raft queue, file work into the record.
    fn route(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Propose(cmd) => self.proposals.push_back(cmd),
                Action::Send { conn, msg } => {
                    if let Some(w) = self.workers.iter_mut().find(|w| w.conn == conn) {
                        w.inbox.push_back(msg);
                    }
                }
                Action::Close { .. } => {}
                Action::Files { work, .. } => self.files.push(work),
                Action::Answer { request, outcome } => self.answers.push((request, outcome)),
                Action::Recovered { seconds, .. } => self.recoveries.extend(seconds),
            }
        }
    }

    fn observe(&mut self, obs: Observation) {
        let t = self.t();
        let actions = self.sup.observe(&self.st, t, obs);
        self.route(actions);
    }

    fn tick(&mut self) {
        let t = self.t();
        let actions = self.sup.tick(&self.st, t);
        self.route(actions);
    }

    /// Applies the oldest queued proposal; `reply` false loses the answer
    /// (applied, but the proposer never hears: a proposal timeout).
    fn apply_one(&mut self, reply: bool) -> Option<Vec<Event>> {
        let cmd = self.proposals.pop_front()?;
        let key = ProposalKey::of(&cmd).unwrap();
        let events = self.st.apply(cmd).unwrap_or_default();
        if reply {
            self.observe(Observation::ProposalDone { key, events: events.clone() });
        }
        Some(events)
    }

    /// Drops the oldest queued proposal (never applied; the proposer hears
    /// it failed).
    fn drop_one(&mut self) {
        if let Some(cmd) = self.proposals.pop_front() {
            self.observe(Observation::ProposalDone {
                key: ProposalKey::of(&cmd).unwrap(),
                events: Vec::new(),
            });
        }
    }

    fn apply_all(&mut self) {
        while self.apply_one(true).is_some() {}
    }

    fn send(&mut self, i: usize, msg: WorkerMessage) {
        let conn = self.workers[i].conn;
        self.observe(Observation::Message { conn, msg });
    }

    fn register(&mut self, i: usize) {
        let r = self.workers[i].registration();
        self.observe(Observation::Registered(r));
        let reports: Vec<WorkerMessage> =
            self.workers[i].saved.values().chain(self.workers[i].finished.iter()).cloned().collect();
        for msg in reports {
            self.send(i, msg);
        }
    }

    fn register_all(&mut self) {
        for i in 0..self.workers.len() {
            if !self.workers[i].dead {
                self.register(i);
            }
        }
    }

    /// Delivers rank `i`'s next directive and sends back its answers.
    fn deliver_one(&mut self, i: usize) {
        if let Some(msg) = self.workers[i].inbox.pop_front() {
            for reply in self.workers[i].handle(msg) {
                self.send(i, reply);
            }
        }
    }

    fn deliver_all(&mut self) {
        for i in 0..self.workers.len() {
            while !self.workers[i].dead && !self.workers[i].inbox.is_empty() {
                self.deliver_one(i);
            }
        }
    }

    fn heartbeat(&mut self, i: usize) {
        if self.workers[i].dead {
            return;
        }
        let hb = self.workers[i].heartbeat();
        self.send(i, hb);
    }

    /// Rank `i` advances `steps` and heartbeats, then `ms` pass; `n` times.
    fn pace(&mut self, i: usize, n: usize, steps: u64, ms: u64) {
        for _ in 0..n {
            self.workers[i].step += steps;
            self.heartbeat(i);
            self.now += ms;
        }
    }

    fn train(&mut self, i: usize) {
        if self.workers[i].dead {
            return;
        }
        for msg in self.workers[i].train() {
            self.send(i, msg);
        }
    }

    /// One round of a healthy cluster: heartbeats, directives, a step each,
    /// proposals applied, 50 ms pass, a tick.
    fn round(&mut self) {
        for i in 0..self.workers.len() {
            self.heartbeat(i);
        }
        self.deliver_all();
        for i in 0..self.workers.len() {
            self.train(i);
        }
        self.apply_all();
        self.now += 50;
        self.tick();
    }

    /// A new leader: fresh supervisor, every connection replaced, every
    /// undelivered directive and unapplied proposal lost.
    fn leader_change(&mut self) {
        self.term += 1;
        self.proposals.clear();
        self.sup = Supervisor::new(SupervisorConfig::default(), self.t(), self.term);
        for i in 0..self.workers.len() {
            let conn = self.conn();
            self.workers[i].conn = conn;
            self.workers[i].inbox.clear();
        }
        self.register_all();
    }

    /// Worker `i`'s process dies and a new one starts (a spare as a spare;
    /// a worker killed for good stays dead).
    fn restart(&mut self, i: usize) {
        if self.workers[i].dead {
            return;
        }
        let old = self.workers[i].conn;
        self.observe(Observation::Disconnected { conn: old });
        let (conn, inc) = (self.conn(), self.incarnation());
        self.workers[i] = if self.workers[i].spare {
            SimWorker::new_spare(conn, inc)
        } else {
            SimWorker::new(self.workers[i].rank, conn, inc)
        };
        self.register(i);
    }

    /// Worker `i`'s process is SIGKILLed and never comes back.
    fn kill(&mut self, i: usize) {
        let old = self.workers[i].conn;
        self.observe(Observation::Disconnected { conn: old });
        self.workers[i].dead = true;
        self.workers[i].conn = 0;
        self.workers[i].inbox.clear();
    }

    /// A spare worker starts and registers; its index.
    fn add_spare(&mut self) -> usize {
        let (conn, inc) = (self.conn(), self.incarnation());
        self.workers.push(SimWorker::new_spare(conn, inc));
        let i = self.workers.len() - 1;
        self.register(i);
        i
    }

    /// The mapping the ranks' processes make now (for the expected `StartJob`).
    fn holders(&self) -> BTreeMap<Rank, Incarnation> {
        self.workers
            .iter()
            .filter(|w| !w.dead && !w.spare)
            .map(|w| (Rank(w.rank), Incarnation(w.incarnation)))
            .collect()
    }

    /// `n` periods of `ms` pass in which only ranks `live` heartbeat, each
    /// ended by a tick (nothing trains, nothing is delivered).
    fn idle(&mut self, n: u64, ms: u64, live: &[usize]) {
        for _ in 0..n {
            for &i in live {
                self.heartbeat(i);
            }
            self.now += ms;
            self.tick();
        }
    }

    /// Whether a whole-job restore for `reason` is among the proposals.
    fn restore_proposed(&self, reason: RestoreReason) -> bool {
        self.proposals.iter().any(|p| matches!(p, Command::Restore { reason: r, .. } if *r == reason))
    }

    fn sends_to(&self, i: usize) -> &VecDeque<CoordinatorMessage> {
        &self.workers[i].inbox
    }

    /// Runs healthy rounds until `done`, at most `max` rounds.
    fn until(&mut self, max: usize, done: impl Fn(&World) -> bool) {
        for _ in 0..max {
            if done(self) {
                return;
            }
            self.round();
        }
        panic!(
            "not converged after {max} rounds: job {:?} gen {} holders {:?} spares {:?} ranks {:?} workers (rank, incarnation, spare, dead, generation, step, status) {:?} proposals {:?}",
            self.job().state,
            self.job().generation,
            self.job().holders,
            self.sup.spare_views(&name()),
            self.sup.rank_views(&name(), self.job().generation, self.t()),
            self.workers
                .iter()
                .map(|w| (w.rank, w.incarnation, w.spare, w.dead, w.generation, w.step, w.status))
                .collect::<Vec<_>>(),
            self.proposals
        );
    }

    /// `ticks` ticks 100 ms apart in which only rank 0 heartbeats and is
    /// answered; every other rank is silent.
    fn only_rank_0_lives(&mut self, ticks: usize) {
        for _ in 0..ticks {
            self.heartbeat(0);
            self.deliver_one(0);
            self.apply_all();
            self.now += 100;
            self.tick();
        }
    }

    fn running(&mut self) {
        self.register_all();
        self.until(50, |w| {
            w.job().state == JobState::Running
                && w.workers.iter().filter(|x| !x.spare).all(|x| x.status == WorkerStatus::Running)
        });
    }
}

fn is_restore(msg: &CoordinatorMessage, g: u64) -> bool {
    matches!(msg, CoordinatorMessage::Restore { generation, .. } if generation.0 == g)
}

#[test]
fn a_job_starts_once_every_rank_holds_fresh_state() {
    let mut w = World::new(2);
    w.register(0);
    assert!(is_restore(&w.sends_to(0)[1], 1), "{:?}", w.sends_to(0));
    assert!(w.proposals.is_empty(), "one rank of two starts nothing");
    w.register(1);
    w.deliver_all();
    assert_eq!(
        w.proposals,
        vec![Command::StartJob { job: name(), generation: Generation(1), holders: w.holders() }]
    );
    w.apply_all();
    assert_eq!(w.job().state, JobState::Running);
    assert!(w
        .workers
        .iter()
        .all(|x| x.inbox.contains(&CoordinatorMessage::Resume { generation: Generation(1), step: Step(0) })));
}

#[test]
fn every_shard_commits_and_files_follow_the_ledger() {
    let mut w = World::new(2);
    w.running();
    w.until(200, |w| w.job().latest_committed().is_some());
    let c = w.job().latest_committed().unwrap().id;
    // the first boundary the ranks cannot pass before they hear of it
    assert!(matches!(w.job().checkpoints[&c].step, Step(5) | Step(10)), "{:?}", w.job().checkpoints[&c]);
    assert!(w.files.contains(&FileWork::Manifest(c)));
    assert_eq!(w.files.last(), Some(&FileWork::Latest(Some(c))), "{:?}", w.files);
    let manifest_at = w.files.iter().position(|f| *f == FileWork::Manifest(c)).unwrap();
    let latest_at = w.files.iter().position(|f| *f == FileWork::Latest(Some(c))).unwrap();
    assert!(manifest_at < latest_at, "LATEST is written after the manifest it names");
}

#[test]
fn a_lost_resume_is_sent_again_until_the_rank_trains() {
    let mut w = World::new(2);
    w.register_all();
    w.deliver_all();
    w.apply_all();
    assert_eq!(w.job().state, JobState::Running);
    // rank 1 never gets its Resume
    w.workers[1].inbox.clear();
    w.deliver_all();
    w.idle(6, 100, &[0, 1]);
    assert!(w
        .sends_to(1)
        .iter()
        .any(|m| matches!(m, CoordinatorMessage::Resume { generation: Generation(1), .. })));
    w.deliver_all();
    assert_eq!(w.workers[1].status, WorkerStatus::Running);
}

#[test]
fn a_proposal_that_times_out_is_made_again_and_one_answered_is_not_repeated() {
    let mut w = World::new(2);
    w.register_all();
    w.deliver_all();
    assert_eq!(w.proposals.len(), 1);
    // the same tick again: still in flight, not proposed twice
    w.tick();
    assert_eq!(w.proposals.len(), 1);
    // lost without an answer: nothing happens until the retry interval
    w.proposals.clear();
    w.idle(10, 100, &[0, 1]);
    assert!(w.proposals.is_empty());
    w.idle(SupervisorConfig::default().proposal_retry_ms / 100, 100, &[0, 1]);
    assert_eq!(
        w.proposals,
        vec![Command::StartJob { job: name(), generation: Generation(1), holders: w.holders() }]
    );
    // a refused (or failed) proposal is answered: made again at once
    w.drop_one();
    assert_eq!(w.proposals.len(), 1);
    w.apply_all();
    assert_eq!(w.job().state, JobState::Running);
}

#[test]
fn a_restarted_worker_restores_the_whole_job_from_the_latest_commit() {
    let mut w = World::new(2);
    w.running();
    w.until(200, |w| w.job().latest_committed().is_some_and(|c| c.step == Step(10)));
    w.restart(1);
    assert!(
        matches!(
            &w.proposals.iter().collect::<Vec<_>>()[..],
            [Command::Restore { generation: Generation(2), reason: RestoreReason::WorkerRestarted, .. }]
        ),
        "{:?}",
        w.proposals
    );
    w.apply_all();
    assert_eq!(w.job().state, JobState::Restoring);
    w.until(50, |w| w.job().state == JobState::Running && w.workers.iter().all(|x| x.step >= 10));
    assert!(w.workers.iter().all(|x| x.generation == Some(Generation(2))));
}

#[test]
fn a_new_leader_during_a_restore_finishes_it() {
    let mut w = World::new(3);
    w.running();
    w.until(200, |w| w.job().latest_committed().is_some());
    w.restart(2);
    w.apply_all();
    // only rank 0 hears of the restore before the leader dies
    w.deliver_one(0);
    w.leader_change();
    w.until(50, |w| w.job().state == JobState::Running);
    assert_eq!(w.job().generation, Generation(2), "no second restore was needed");
}

#[test]
fn a_rank_lost_while_restoring_restarts_the_restore_once() {
    let mut w = World::new(2);
    w.running();
    w.until(200, |w| w.job().latest_committed().is_some());
    w.restart(1);
    w.apply_all();
    assert_eq!(w.job().generation, Generation(2));
    // rank 1 goes silent for good; rank 0 keeps heartbeating
    w.only_rank_0_lives(40);
    let j = w.job();
    assert_eq!(
        (j.state, j.generation),
        (JobState::Restoring, Generation(3)),
        "one restart, not one per tick"
    );
    assert_eq!(j.restores_by_reason.get(&RestoreReason::HeartbeatTimeout), Some(&1));
    // it comes back as a new process and the restore completes
    w.restart(1);
    w.until(50, |w| w.job().state == JobState::Running);
    assert_eq!(w.job().generation, Generation(3));
}

#[test]
fn ranks_silenced_together_while_restoring_restart_it_once_not_once_each() {
    let mut w = World::new(4);
    w.running();
    w.until(200, |w| w.job().latest_committed().is_some());
    // rank 0 restarts (a new process): the job restores into generation 2
    w.restart(0);
    w.apply_all();
    assert_eq!(w.job().generation, Generation(2));
    // ranks 1, 2 and 3 fall silent together (a stalled host); rank 0 heartbeats
    w.only_rank_0_lives(40);
    let j = w.job();
    assert_eq!((j.state, j.generation), (JobState::Restoring, Generation(3)), "one restart for the three");
    assert_eq!(j.restores_by_reason.get(&RestoreReason::HeartbeatTimeout), Some(&1));
    assert!(
        j.events.iter().any(|e| e.text.contains("3 ranks from rank 1, while restoring")),
        "{:?}",
        j.events
    );
}

#[test]
fn a_late_report_from_an_older_generation_is_stale_and_nobody_is_fenced() {
    let mut w = World::new(2);
    w.running();
    w.until(200, |w| w.job().latest_committed().is_some());
    let g1_shard = w.workers[0].saved.values().next().cloned();
    w.restart(1);
    w.apply_all();
    let late = g1_shard.unwrap_or(WorkerMessage::ShardSaved {
        generation: Generation(1),
        checkpoint: CheckpointId(1),
        manifest: ShardDigest { rank: Rank(0), file: "x".into(), bytes: 1, checksum: Checksum(1) },
    });
    let late = match late {
        WorkerMessage::ShardSaved { manifest, .. } => {
            WorkerMessage::ShardSaved { generation: Generation(1), checkpoint: CheckpointId(99), manifest }
        }
        other => other,
    };
    w.workers[0].inbox.clear();
    w.send(0, late);
    assert!(
        matches!(w.sends_to(0).back(), Some(CoordinatorMessage::Error(e)) if e.code == ErrorCode::Stale),
        "{:?}",
        w.sends_to(0)
    );
    w.until(50, |w| w.job().state == JobState::Running);
}

#[test]
fn a_resumed_zombie_never_displaces_the_newer_process() {
    let mut w = World::new(2);
    w.running();
    let zombie = w.workers[1].clone();
    w.restart(1);
    w.apply_all();
    // the zombie (older incarnation) wakes up and registers again: it is
    // healthy, so it joins as a spare, holding nothing of rank 1
    let zconn = w.conn();
    let reg = Registration { conn: zconn, ..zombie.registration() };
    let out = w.sup.observe(&w.st, w.t(), Observation::Registered(reg));
    assert!(
        matches!(&out[..], [Action::Send { conn, msg: CoordinatorMessage::Registered { spare: true, .. } }]
            if *conn == zconn),
        "{out:?}"
    );
    let spares = w.sup.spare_views(&name());
    assert_eq!(spares.iter().map(|s| s.worker).collect::<Vec<_>>(), vec![Incarnation(zombie.incarnation)]);
    // the newer process is untouched and the job completes its restore
    w.until(50, |w| w.job().state == JobState::Running);
    assert_eq!(w.job().generation, Generation(2));
    assert_eq!(w.job().holders[&Rank(1)], Incarnation(w.workers[1].incarnation));
}

/// A job of `world` ranks with `spares` ready spares, running past its
/// first commit; the spares' indices.
fn running_with_spares(world: u32, spares: usize) -> (World, Vec<usize>) {
    let mut w = World::new(world);
    let ids: Vec<usize> = (0..spares).map(|_| w.add_spare()).collect();
    w.running();
    w.until(200, |w| w.job().latest_committed().is_some());
    (w, ids)
}

/// The takeovers of the queued restore, if one is queued.
fn queued_takeovers(w: &World) -> Option<Vec<Takeover>> {
    w.proposals.iter().find_map(|p| match p {
        Command::Restore { takeovers, .. } => Some(takeovers.clone()),
        _ => None,
    })
}

#[test]
fn a_ready_spare_takes_a_killed_rank_at_once_and_the_job_ends_as_without_failure() {
    let (mut w, spares) = running_with_spares(3, 1);
    let spare = Incarnation(w.workers[spares[0]].incarnation);
    assert_eq!(w.sup.spare_views(&name())[0].state, SpareState::Ready);
    let before = w.job().latest_committed().unwrap().id;
    w.kill(1);
    // the tick after the connection closed: no grace, no heartbeat timeout
    w.now += 1;
    w.tick();
    assert_eq!(queued_takeovers(&w), Some(vec![Takeover { rank: Rank(1), worker: spare }]));
    assert!(w.restore_proposed(RestoreReason::Disconnected));
    w.apply_all();
    assert_eq!(w.job().holders.get(&Rank(1)), Some(&spare), "the ledger maps rank 1 to the spare");
    w.tick();
    // the spare is told its rank, then to restore it from the latest commit
    let inbox: Vec<_> = w.sends_to(spares[0]).iter().cloned().collect();
    assert!(
        matches!(inbox[..], [.., CoordinatorMessage::Assign { rank: Rank(1), .. }, CoordinatorMessage::Restore { from: Some(ref p), .. }]
        if p.checkpoint == before && p.shard.rank == Rank(1)),
        "{inbox:?}"
    );
    w.until(2_000, |w| w.job().state == JobState::Succeeded);
    assert_eq!(w.job().final_digest, Some(reference_digest(3)));
    assert_eq!(w.job().generation, Generation(2), "one restore");
    assert!(w.sup.spare_views(&name()).is_empty(), "the spare holds a rank now");
}

#[test]
fn two_failures_with_one_spare_give_it_one_rank_and_the_other_waits_for_its_process() {
    let (mut w, spares) = running_with_spares(3, 1);
    let spare = Incarnation(w.workers[spares[0]].incarnation);
    w.kill(0);
    w.kill(2);
    w.now += 1;
    w.tick();
    assert_eq!(queued_takeovers(&w), Some(vec![Takeover { rank: Rank(0), worker: spare }]));
    w.apply_all();
    // rank 2's process is replaced (no spare is left for it)
    let (conn, inc) = (w.conn(), w.incarnation());
    w.workers.push(SimWorker::new(2, conn, inc));
    let last = w.workers.len() - 1;
    w.register(last);
    w.until(3_000, |w| w.job().state == JobState::Succeeded);
    assert_eq!(w.job().final_digest, Some(reference_digest(3)));
    assert_eq!(w.job().holders[&Rank(0)], spare);
    assert_eq!(w.job().holders[&Rank(2)], Incarnation(inc));
}

#[test]
fn a_spare_that_dies_while_taking_over_hands_the_rank_to_the_next() {
    let (mut w, spares) = running_with_spares(2, 2);
    let (first, second) =
        (Incarnation(w.workers[spares[0]].incarnation), Incarnation(w.workers[spares[1]].incarnation));
    w.kill(1);
    w.now += 1;
    w.tick();
    assert_eq!(queued_takeovers(&w), Some(vec![Takeover { rank: Rank(1), worker: first }]));
    w.apply_all();
    w.tick();
    assert!(w.sends_to(spares[0]).iter().any(|m| matches!(m, CoordinatorMessage::Assign { .. })));
    // it dies before it restored
    w.kill(spares[0]);
    w.now += 1;
    w.tick();
    assert_eq!(queued_takeovers(&w), Some(vec![Takeover { rank: Rank(1), worker: second }]));
    w.until(3_000, |w| w.job().state == JobState::Succeeded);
    assert_eq!(w.job().final_digest, Some(reference_digest(2)));
    assert_eq!(w.job().holders[&Rank(1)], second);
}

#[test]
fn a_new_leader_mid_takeover_seats_the_spare_the_ledger_names() {
    let (mut w, spares) = running_with_spares(2, 2);
    w.kill(1);
    w.now += 1;
    w.tick();
    let chosen = queued_takeovers(&w).unwrap()[0].worker;
    // applied, but the leader is gone before it heard so or told the spare
    w.apply_one(false);
    w.leader_change();
    w.until(3_000, |w| w.job().state == JobState::Running);
    assert_eq!(w.job().generation, Generation(2), "the new leader finished the takeover, no second restore");
    assert_eq!(w.job().holders[&Rank(1)], chosen);
    let other = spares.iter().map(|i| Incarnation(w.workers[*i].incarnation)).find(|id| *id != chosen);
    let left: Vec<Incarnation> = w.sup.spare_views(&name()).iter().map(|s| s.worker).collect();
    assert_eq!(left, other.into_iter().collect::<Vec<_>>(), "the other spare is still a spare");
    w.until(3_000, |w| w.job().state == JobState::Succeeded);
    assert_eq!(w.job().final_digest, Some(reference_digest(2)));
    assert!(w.sup.spare_views(&name()).is_empty(), "a job that ended stopped its spares");
}

#[test]
fn the_old_worker_coming_back_joins_as_a_spare_and_touches_nothing() {
    let (mut w, spares) = running_with_spares(2, 1);
    let spare = Incarnation(w.workers[spares[0]].incarnation);
    let old = Incarnation(w.workers[1].incarnation);
    // rank 1's connection drops and it stays away (a partition): its process lives on
    w.kill(1);
    w.now += 1;
    w.tick();
    w.until(200, |w| w.job().state == JobState::Running && w.job().generation == Generation(2));
    // it comes back, still holding generation 1's state, and registers for rank 1
    w.workers[1].dead = false;
    w.workers[1].conn = w.conn();
    w.register(1);
    w.deliver_all();
    assert!(w.workers[1].spare, "it was told it holds no rank");
    let views = w.sup.spare_views(&name());
    assert_eq!(views.iter().map(|s| s.worker).collect::<Vec<_>>(), vec![old]);
    // its late report of generation 1 is stale, not counted
    let late = WorkerMessage::Finished { generation: Generation(1), step: Step(3), digest: "00".into() };
    w.send(1, late);
    w.until(3_000, |w| w.job().state == JobState::Succeeded);
    assert_eq!(w.job().final_digest, Some(reference_digest(2)));
    assert_eq!(w.job().holders[&Rank(1)], spare);
}

#[test]
fn a_pending_checkpoint_survives_a_leader_change() {
    let mut w = World::new(2);
    w.running();
    // run until a checkpoint is begun and rank 0 saved its shard
    w.until(200, |w| w.job().pending().is_some() && !w.workers[0].saved.is_empty());
    let c = w.job().pending().unwrap().id;
    w.leader_change();
    w.until(100, |w| w.job().checkpoints[&c].state != CheckpointState::Pending);
    assert_eq!(w.job().checkpoints[&c].state, CheckpointState::Committed);
    assert_eq!(w.job().generation, Generation(1));
}

#[test]
fn a_failure_during_a_checkpoint_tells_the_survivors_to_give_it_up_before_the_restore_commits() {
    let mut w = World::new(3);
    w.running();
    // a checkpoint is pending and rank 0 is still writing its shard
    w.until(200, |w| w.job().pending().is_some());
    let c = w.job().pending().unwrap().id;
    for i in 0..3 {
        w.workers[i].inbox.clear();
    }
    w.restart(1);
    w.tick();
    assert!(w.restore_proposed(RestoreReason::WorkerRestarted), "{:?}", w.proposals);
    // the restore is proposed, not applied: the checkpoint is still pending
    // in the ledger, and each survivor already has the abort
    assert_eq!(w.job().pending().map(|p| p.id), Some(c));
    let abort = CoordinatorMessage::AbortCheckpoint { generation: Generation(1), checkpoint: c };
    for i in [0, 2] {
        assert!(w.sends_to(i).contains(&abort), "rank {i} got {:?}", w.sends_to(i));
    }
    // and the job still restores and finishes as the same run
    w.until(400, |w| w.job().state == JobState::Succeeded);
    assert_eq!(w.job().generation, Generation(2));
    assert_eq!(w.job().final_digest.as_deref(), Some(reference_digest(3).as_str()));
}

#[test]
fn a_rank_past_the_step_aborts_with_a_typed_reason_and_the_lead_grows() {
    let mut w = World::new(2);
    w.running();
    w.until(200, |w| w.job().pending().is_some());
    let c = w.job().pending().unwrap().clone();
    let lead = w.sup.jobs[&name()].lead_ms;
    w.send(
        1,
        WorkerMessage::ShardFailed {
            generation: Generation(1),
            checkpoint: c.id,
            kind: ShardFailureKind::PastStep,
            reason: "whatever the text says".into(),
        },
    );
    assert!(w.proposals.contains(&Command::AbortCheckpoint {
        job: name(),
        id: c.id,
        reason: AbortReason::RankPastStep { rank: Rank(1) },
        now_ms: w.now
    }));
    assert_eq!(w.sup.jobs[&name()].lead_ms, lead * 2);
}

#[test]
fn a_checkpoint_times_out_on_this_leaders_clock() {
    let mut w = World::new(2);
    w.running();
    w.until(200, |w| w.job().pending().is_some());
    let c = w.job().pending().unwrap().id;
    // a new leader takes over late: the timeout counts from its takeover
    w.now += 4_000;
    w.leader_change();
    w.idle(10, 400, &[0, 1]);
    assert!(!w.proposals.iter().any(|p| matches!(p, Command::AbortCheckpoint { .. })));
    w.now += 1_500;
    w.heartbeat(0);
    w.heartbeat(1);
    w.tick();
    assert!(w.proposals.contains(&Command::AbortCheckpoint {
        job: name(),
        id: c,
        reason: AbortReason::Timeout { seconds: 5 },
        now_ms: w.now
    }));
}

#[test]
fn heartbeats_without_progress_are_a_hang() {
    let mut w = World::new(2);
    w.running();
    // rank 1's trainer is stuck: its agent heartbeats, its step never moves
    for _ in 0..120 {
        w.heartbeat(0);
        w.heartbeat(1);
        w.train(0);
        w.now += 100;
        w.tick();
    }
    assert!(w.restore_proposed(RestoreReason::Hang), "{:?}", w.proposals);
}

#[test]
fn a_dead_trainer_is_a_failure() {
    let mut w = World::new(2);
    w.running();
    w.workers[1].status = WorkerStatus::Failed;
    w.heartbeat(1);
    assert!(w.proposals.is_empty(), "a heartbeat is judged on the next tick");
    w.tick();
    assert!(w.restore_proposed(RestoreReason::TrainerFailed), "{:?}", w.proposals);
}

#[test]
fn a_corrupt_shard_condemns_and_falls_back_a_missing_one_blocks() {
    let mut w = World::new(2);
    w.running();
    w.until(300, |w| w.job().latest_committed().is_some_and(|c| c.step == Step(15)));
    let (first, second) = {
        let j = w.job();
        let second = j.latest_committed().unwrap().id;
        (j.committed_before(second).unwrap().id, second)
    };
    w.restart(1);
    w.apply_all();
    w.send(
        0,
        WorkerMessage::RestoreFailed {
            generation: Generation(2),
            checkpoint: Some(second),
            kind: RestoreFailureKind::Corrupt,
            message: "checkpoint 2 rank 0: checksum mismatch in model/x".into(),
        },
    );
    w.apply_all();
    w.tick();
    w.apply_all();
    let j = w.job();
    assert_eq!(j.checkpoints[&second].state, CheckpointState::Corrupt);
    assert_eq!((j.generation, j.restored_from), (Generation(3), Some(first)));
    let condemned_at = w.files.iter().position(|f| *f == FileWork::Condemn(second)).expect("condemned");
    let latest_at = w.files.iter().rposition(|f| *f == FileWork::Latest(Some(first))).expect("LATEST moved");
    assert!(latest_at < condemned_at, "LATEST leaves the condemned checkpoint before its manifest goes");
    assert_eq!(j.restores_by_reason.get(&RestoreReason::CorruptCheckpoint), Some(&1));
    assert!(j.failures_ms.len() == 1, "the fallback is not a failure");

    // an unreadable file condemns nothing: the job is blocked, then retried
    w.send(
        1,
        WorkerMessage::RestoreFailed {
            generation: Generation(3),
            checkpoint: Some(first),
            kind: RestoreFailureKind::Unavailable,
            message: "checkpoint 1 rank 1: read /ckpt/j/ckpt-1/rank-00001.safetensors: Permission denied"
                .into(),
        },
    );
    w.apply_all();
    let j = w.job();
    assert_eq!(j.state, JobState::Blocked);
    assert_eq!(j.checkpoints[&first].state, CheckpointState::Committed);
    assert!(j.error.as_ref().unwrap().contains("Permission denied"));
    w.now += SupervisorConfig::default().blocked_retry_ms + 1;
    w.heartbeat(0);
    w.heartbeat(1);
    w.tick();
    assert!(w.proposals.iter().any(|p| matches!(
        p,
        Command::Restore { reason: RestoreReason::Retry, from: Some(f), generation: Generation(4), .. } if *f == first
    )));
}

#[test]
fn checkpoints_resume_at_the_next_boundary_after_a_restore() {
    let mut w = World::new(2);
    w.running();
    w.until(400, |w| w.job().latest_committed().is_some_and(|c| c.step == Step(20)));
    // the operator rolls back to step 15: the line after it is abandoned
    let c15 = w.job().checkpoints.values().find(|c| c.step == Step(15)).unwrap().id;
    let c20 = w.job().latest_committed().unwrap().id;
    w.st.apply(Command::Restore {
        job: name(),
        generation: Generation(2),
        from: Some(c15),
        reason: RestoreReason::Operator,
        detail: None,
        now_ms: w.now,
        takeovers: Vec::new(),
    })
    .unwrap();
    assert_eq!(w.job().checkpoints[&c20].state, CheckpointState::Abandoned);
    w.until(100, |w| w.job().pending().is_some());
    assert_eq!(w.job().pending().unwrap().step, Step(20), "the next boundary past step 15");
}

#[test]
fn a_succeeded_job_stops_its_workers_and_a_failed_one_keeps_them() {
    let mut w = World::new(2);
    w.running();
    w.until(2_000, |w| w.job().state == JobState::Succeeded);
    assert_eq!(w.job().final_digest.as_deref(), Some(reference_digest(2).as_str()));
    w.tick();
    assert!(w.workers.iter().all(|x| x.inbox.iter().any(|m| matches!(m, CoordinatorMessage::Stop { .. }))));
}

#[test]
fn a_cancelled_jobs_ranks_are_told_to_stop_and_a_deleted_one_is_forgotten_and_its_directory_removed() {
    let mut w = World::new(2);
    w.running();
    w.until(200, |w| w.job().pending().is_some());
    let pending = w.job().pending().unwrap().id;
    // an operator's cancel, applied by this leader
    let events = w.st.apply(Command::CancelJob { job: name(), now_ms: w.now }).unwrap();
    for x in &mut w.workers {
        x.inbox.clear();
    }
    w.files.clear();
    w.observe(Observation::Applied { events });
    assert!(
        w.files.contains(&FileWork::Delete(pending)),
        "the aborted checkpoint's files go at once: {:?}",
        w.files
    );
    w.tick();
    for x in &w.workers {
        let stop = x.inbox.iter().find_map(|m| match m {
            CoordinatorMessage::Stop { reason } => Some(reason.as_str()),
            _ => None,
        });
        assert_eq!(stop, Some("job j was cancelled"), "rank {}: {:?}", x.rank, x.inbox);
    }
    // as for a finished job: no checkpoint, no restore, nothing proposed
    w.proposals.clear();
    for _ in 0..20 {
        w.now += 100;
        w.deliver_all();
        w.tick();
    }
    assert!(w.proposals.is_empty(), "{:?}", w.proposals);
    assert_eq!(w.job().state, JobState::Cancelled);
    // a checkpoint asked of it is refused at once
    w.observe(Observation::CheckpointRequested { job: name(), reply_to: Some(7) });
    assert!(
        matches!(w.answers.last(), Some((7, CheckpointOutcome::Refused(r))) if r.kind == RefusalKind::Conflict)
    );

    // deleted with its checkpoints: the directory goes, the leader forgets the job
    let events = w.st.apply(Command::DeleteJob { job: name(), remove_checkpoints: true }).unwrap();
    w.files.clear();
    let t = w.t();
    let actions = w.sup.observe(&w.st, t, Observation::Applied { events });
    assert!(actions.iter().any(|a| matches!(a, Action::Close { .. })), "its connections close: {actions:?}");
    w.route(actions);
    assert_eq!(w.files, vec![FileWork::RemoveJob("/ckpt/j".into())]);
    assert!(!w.sup.jobs.contains_key(&name()), "nothing of the old job is kept");
    assert!(w.sup.conns.is_empty());
    // submitted again: a fresh job, whose workers start from step 0
    w.st.apply(Command::SubmitJob { spec: spec(2), now_ms: w.now, origin: None }).unwrap();
    let inc = w.incarnation();
    for i in 0..2 {
        let conn = w.conn();
        w.workers[i] = SimWorker::new(i as u32, conn, inc + i as u64);
    }
    w.running();
    assert_eq!(w.job().generation, Generation(1));
    w.until(2_000, |w| w.job().state == JobState::Succeeded);
    assert_eq!(w.job().final_digest.as_deref(), Some(reference_digest(2).as_str()));

    // deleted without its checkpoints: nothing is removed
    let events = w.st.apply(Command::DeleteJob { job: name(), remove_checkpoints: false }).unwrap();
    w.files.clear();
    w.observe(Observation::Applied { events });
    assert!(w.files.is_empty(), "{:?}", w.files);
}

#[test]
fn the_last_step_is_committed_before_the_job_succeeds_unless_at_end_is_off() {
    let mut w = World::new(2);
    w.running();
    w.until(2_000, |w| w.job().state == JobState::Succeeded);
    assert_eq!(
        w.job().latest_committed().map(|c| c.step.0),
        Some(TOTAL),
        "checkpoint.at_end is on by default"
    );
    assert_eq!(w.job().final_digest.as_deref(), Some(reference_digest(2).as_str()));

    let mut off = spec(2);
    off.checkpoint.at_end = false;
    let mut w = World::with_spec(off);
    w.running();
    w.until(2_000, |w| w.job().state == JobState::Succeeded);
    // periodic checkpoints stop short of the last step
    assert!(w.job().latest_committed().is_some_and(|c| c.step.0 < TOTAL), "{:?}", w.job().latest_committed());
}

/// One step of an adversarial schedule.
#[derive(Debug, Clone)]
enum Chaos {
    Deliver(usize),
    DropDirective(usize),
    Heartbeat(usize),
    Train(usize),
    Apply,
    ApplyLosingReply,
    DropProposal,
    Tick(u64),
    LeaderChange,
    Restart(usize),
    /// SIGKILL, never restarted (a restarter that gives up).
    KillForGood(usize),
}

fn chaos(world: usize) -> impl Strategy<Value = Chaos> {
    prop_oneof![
        6 => (0..world).prop_map(Chaos::Deliver),
        1 => (0..world).prop_map(Chaos::DropDirective),
        4 => (0..world).prop_map(Chaos::Heartbeat),
        6 => (0..world).prop_map(Chaos::Train),
        4 => Just(Chaos::Apply),
        1 => Just(Chaos::ApplyLosingReply),
        1 => Just(Chaos::DropProposal),
        3 => (1u64..1_500).prop_map(Chaos::Tick),
        1 => Just(Chaos::LeaderChange),
        1 => (0..world).prop_map(Chaos::Restart),
        1 => (0..world).prop_map(Chaos::KillForGood),
    ]
}

/// Spares in the property test (also how many workers it kills for good).
const SPARES: usize = 2;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any interleaving of leader changes, lost directives and proposals,
    /// silences and restarted processes reaches the same fixed point: the
    /// job succeeds with the failure-free digest, and no committed
    /// checkpoint is ever un-committed except by a condemnation.
    #[test]
    fn any_interleaving_reaches_the_same_fixed_point(
        schedule in proptest::collection::vec(chaos(3 + SPARES), 1..300)
    ) {
        let mut w = World::new(3);
        w.register_all();
        for _ in 0..SPARES {
            w.add_spare();
        }
        let mut committed: BTreeSet<CheckpointId> = BTreeSet::new();
        for step in schedule {
            match step {
                Chaos::Deliver(i) => w.deliver_one(i),
                Chaos::DropDirective(i) => { w.workers[i].inbox.pop_front(); }
                Chaos::Heartbeat(i) => w.heartbeat(i),
                Chaos::Train(i) => w.train(i),
                Chaos::Apply => { w.apply_one(true); }
                Chaos::ApplyLosingReply => { w.apply_one(false); }
                Chaos::DropProposal => w.drop_one(),
                Chaos::Tick(ms) => { w.now += ms; w.tick(); }
                Chaos::LeaderChange => w.leader_change(),
                Chaos::Restart(i) => w.restart(i),
                // as many workers die for good as there are spares, at most:
                // the job always has a process for every rank
                Chaos::KillForGood(i) => {
                    if w.workers.iter().filter(|x| x.dead).count() < SPARES {
                        w.kill(i);
                    }
                }
            }
            for c in w.job().checkpoints.values() {
                if c.state == CheckpointState::Committed {
                    committed.insert(c.id);
                }
            }
            for id in &committed {
                let state = w.job().checkpoints[id].state;
                prop_assert!(
                    matches!(state, CheckpointState::Committed | CheckpointState::Deleted),
                    "committed checkpoint {} became {:?}", id, state
                );
            }
        }
        w.until(5_000, |w| w.job().state == JobState::Succeeded);
        prop_assert_eq!(w.job().final_digest.clone(), Some(reference_digest(3)));
    }
}

#[test]
fn an_operator_checkpoint_waits_for_a_pace_then_lands_ahead_of_the_ranks() {
    let mut w = World::new(2);
    w.running();
    assert!(w.job().pending().is_none());
    // a new leader knows no pace yet: a step placed now could be behind the ranks
    w.leader_change();
    w.observe(Observation::CheckpointRequested { job: name(), reply_to: None });
    assert!(!w.proposals.iter().any(|p| matches!(p, Command::BeginCheckpoint { .. })), "{:?}", w.proposals);
    w.until(20, |w| w.job().pending().is_some());
    let p = w.job().pending().unwrap().clone();
    assert!(w.workers.iter().all(|x| x.step <= p.step.0), "placed behind a rank: {p:?}");
    w.until(100, |w| w.job().checkpoints[&p.id].state != CheckpointState::Pending);
    assert_eq!(w.job().checkpoints[&p.id].state, CheckpointState::Committed);
    assert_eq!(w.job().aborted_total, 0);
}

#[test]
fn an_operator_waiting_for_a_checkpoint_is_answered_by_the_supervisor() {
    let mut w = World::new(2);
    // refused at once while the job waits for its workers, and for a job
    // that is not in the ledger
    w.observe(Observation::CheckpointRequested { job: name(), reply_to: Some(1) });
    w.observe(Observation::CheckpointRequested { job: JobName::new("nope").unwrap(), reply_to: Some(2) });
    assert!(
        matches!(&w.answers[..], [
            (1, CheckpointOutcome::Refused(r1)),
            (2, CheckpointOutcome::Refused(r2)),
        ] if r1.kind == RefusalKind::Conflict && r1.message.contains("waiting for its workers")
            && r2.kind == RefusalKind::NotFound),
        "{:?}",
        w.answers
    );
    w.answers.clear();
    w.running();
    w.observe(Observation::CheckpointRequested { job: name(), reply_to: Some(3) });
    w.until(100, |w| !w.answers.is_empty());
    let committed = w.job().latest_committed().map(|c| (c.id, c.step)).expect("a committed checkpoint");
    assert_eq!(w.answers, [(3, CheckpointOutcome::Committed { id: committed.0, step: committed.1 })]);
    w.answers.clear();
    // a checkpoint placed behind a rank is placed again for the same
    // request; only a commit answers it
    w.observe(Observation::CheckpointRequested { job: name(), reply_to: Some(4) });
    w.until(20, |w| w.job().pending().is_some());
    let p = w.job().pending().unwrap().clone();
    let past = AbortReason::RankPastStep { rank: Rank(0) };
    w.st.apply(Command::AbortCheckpoint { job: name(), id: p.id, reason: past, now_ms: w.now }).unwrap();
    w.until(100, |w| !w.answers.is_empty());
    match &w.answers[..] {
        [(4, CheckpointOutcome::Committed { id, .. })] => assert!(*id > p.id, "{id} after {}", p.id),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_operator_checkpoint_that_cannot_commit_times_out() {
    let mut w = World::new(2);
    w.running();
    // the ranks stop reporting; no checkpoint can be placed without a pace
    w.leader_change();
    w.observe(Observation::CheckpointRequested { job: name(), reply_to: Some(7) });
    let timeout_ms = (w.job().spec.checkpoint.timeout_seconds + 30) * 1000;
    w.now += timeout_ms + 1;
    w.tick();
    assert!(
        w.answers.iter().any(|(r, o)| *r == 7 && matches!(o, CheckpointOutcome::TimedOut(_))),
        "{:?}",
        w.answers
    );
}

#[test]
fn a_grown_lead_never_places_a_checkpoint_beyond_a_quarter_of_the_timeout() {
    let mut w = World::new(2);
    w.running();
    assert!(w.job().pending().is_none());
    // a slow pace (1 step per 200 ms), so that the job's 40 steps are far off
    for _ in 0..10 {
        w.pace(0, 1, 1, 0);
        w.pace(1, 1, 1, 200);
    }
    // past-step aborts in a row grew the lead to its maximum, 10 s: as long
    // as this job's whole checkpoint timeout (5 s here) and more
    w.sup.jobs.get_mut(&name()).unwrap().lead_ms = MAX_LEAD_MS;
    w.observe(Observation::CheckpointRequested { job: name(), reply_to: None });
    let step = w.proposals.iter().find_map(|p| match p {
        Command::BeginCheckpoint { step, .. } => Some(step.0),
        _ => None,
    });
    let step = step.expect("the operator's checkpoint was begun");
    let rate = w.sup.jobs[&name()].ranks.values().map(|r| r.rate).fold(0.0, f64::max);
    // where the fastest rank is now (its last report, plus the pace since)
    let fastest = w.workers.iter().map(|x| x.step).max().unwrap() + (rate * 200.0).ceil() as u64;
    let quarter = (rate * 1_250.0).ceil() as u64 + 1;
    assert!(step > fastest, "ahead of the ranks: {step} vs {fastest}");
    assert!(
        step <= fastest + quarter,
        "step {step}: more than {quarter} steps past {fastest} at {rate} steps/ms"
    );
}

#[test]
fn heartbeats_handled_in_a_burst_do_not_look_like_speed() {
    let mut w = World::new(2);
    w.running();
    // 20 steps per 100 ms heartbeat: 0.2 steps/ms
    w.pace(0, 5, 20, 100);
    let steady = w.sup.jobs[&name()].ranks[&Rank(0)].rate;
    assert!((0.15..=0.25).contains(&steady), "{steady}");
    // the leader stalls; three queued heartbeats are handled a millisecond apart
    w.now += 300;
    w.pace(0, 3, 20, 1);
    let after = w.sup.jobs[&name()].ranks[&Rank(0)].rate;
    assert!(after <= 2.0 * steady, "a burst of reports read as {after} steps/ms, steady is {steady}");
}

#[test]
fn time_spent_waiting_is_not_counted_in_the_pace() {
    let mut w = World::new(2);
    w.running();
    w.pace(0, 5, 20, 100);
    let steady = w.sup.jobs[&name()].ranks[&Rank(0)].rate;
    // restored and waiting for 2 s, then training again
    w.workers[0].status = WorkerStatus::Waiting;
    w.heartbeat(0);
    w.now += 2_000;
    w.heartbeat(0);
    w.now += 100;
    w.workers[0].status = WorkerStatus::Running;
    w.workers[0].step += 20;
    w.heartbeat(0);
    let after = w.sup.jobs[&name()].ranks[&Rank(0)].rate;
    assert!(after >= 0.8 * steady, "the wait diluted the pace to {after} steps/ms from {steady}");
}

#[test]
fn a_new_leader_gives_workers_time_to_notice_the_old_one_went_silent() {
    let mut w = World::new(2);
    w.running();
    // a new leader takes over; the workers are still waiting out their old
    // leader's silence (up to one heartbeat timeout) before they look for it
    w.term += 1;
    w.sup = Supervisor::new(SupervisorConfig::default(), w.t(), w.term);
    for i in 0..2 {
        let conn = w.conn();
        w.workers[i].conn = conn;
    }
    w.now += 1_500;
    w.tick();
    assert!(w.proposals.is_empty(), "{:?}", w.proposals);
    w.register_all();
    w.until(20, |w| w.workers.iter().all(|x| x.status == WorkerStatus::Running));
    assert_eq!(w.job().generation, Generation(1), "no restore");
    // a rank that never comes back is failed after twice the timeout
    w.term += 1;
    w.sup = Supervisor::new(SupervisorConfig::default(), w.t(), w.term);
    w.register(0);
    w.idle(25, 100, &[0]);
    assert!(w.restore_proposed(RestoreReason::Disconnected), "{:?}", w.proposals);
}

#[test]
fn a_cleared_verdict_brings_the_manifest_back() {
    let mut w = World::new(2);
    w.running();
    w.until(200, |w| w.job().latest_committed().is_some());
    let c = w.job().latest_committed().unwrap().id;
    w.st.apply(Command::MarkCorrupt { job: name(), id: c, reason: "x".into(), now_ms: 1 }).unwrap();
    w.tick();
    assert!(w.files.contains(&FileWork::Condemn(c)));
    w.files.clear();
    w.st.apply(Command::ClearCorrupt { job: name(), id: c, now_ms: 2 }).unwrap();
    w.tick();
    assert!(w.files.contains(&FileWork::Manifest(c)), "{:?}", w.files);
}

fn rendezvous_of(msg: &CoordinatorMessage) -> Option<&str> {
    match msg {
        CoordinatorMessage::Restore { rendezvous, .. } => rendezvous.as_deref(),
        _ => None,
    }
}

#[test]
fn rank_zeros_rendezvous_goes_to_every_rank_at_once_and_the_first_offer_stands() {
    let mut w = World::new(3);
    w.register_all();
    for i in 0..3 {
        assert!(is_restore(w.sends_to(i).back().unwrap(), 1));
        assert_eq!(rendezvous_of(w.sends_to(i).back().unwrap()), None);
    }
    // an offer from another rank, or for another generation, is no rendezvous
    w.send(1, WorkerMessage::Rendezvous { generation: Generation(1), addr: "10.0.0.2:1".into() });
    w.send(0, WorkerMessage::Rendezvous { generation: Generation(7), addr: "10.0.0.1:7".into() });
    assert_eq!(rendezvous_of(w.sends_to(1).back().unwrap()), None);
    // rank 0's offer goes out to every rank at once, without waiting for the re-send period
    w.send(0, WorkerMessage::Rendezvous { generation: Generation(1), addr: "10.0.0.1:29500".into() });
    for i in 0..3 {
        assert_eq!(rendezvous_of(w.sends_to(i).back().unwrap()), Some("10.0.0.1:29500"), "rank {i}");
    }
    // a rank 0 replaced within the generation is told the same rendezvous
    w.send(0, WorkerMessage::Rendezvous { generation: Generation(1), addr: "10.0.0.9:1".into() });
    w.restart(0);
    assert_eq!(rendezvous_of(w.sends_to(0).back().unwrap()), Some("10.0.0.1:29500"));
    // a restore's new generation needs a new one
    w.running();
    w.restart(2);
    w.until(10, |w| w.job().generation == Generation(2) && w.job().state == JobState::Restoring);
    w.tick();
    let to_rank_1 =
        w.sends_to(1).iter().rev().find(|m| is_restore(m, 2)).expect("a restore into generation 2");
    assert_eq!(rendezvous_of(to_rank_1), None);
}

#[test]
fn a_trainer_that_fails_while_its_generation_is_set_up_restarts_the_set_up_once() {
    let mut w = World::new(2);
    w.register_all();
    // generation 1 is being set up (waiting): rank 1's trainer dies on start
    w.send(1, WorkerMessage::TrainerFailed { generation: Generation(1), reason: "exit 1".into() });
    assert_eq!(w.proposals.len(), 1, "{:?}", w.proposals);
    assert!(w.restore_proposed(RestoreReason::TrainerFailed));
    w.apply_all();
    assert_eq!((w.job().state, w.job().generation), (JobState::Restoring, Generation(2)));
    // a failure reported for the old generation restarts nothing more
    w.send(1, WorkerMessage::TrainerFailed { generation: Generation(1), reason: "exit 1".into() });
    w.tick();
    assert!(w.proposals.is_empty(), "{:?}", w.proposals);
    // the same while restoring generation 2
    w.send(0, WorkerMessage::TrainerFailed { generation: Generation(2), reason: "killed".into() });
    assert!(w.restore_proposed(RestoreReason::TrainerFailed));
    w.apply_all();
    assert_eq!(w.job().generation, Generation(3));
    w.deliver_all();
    w.until(20, |w| w.job().state == JobState::Running);
}

#[test]
fn shard_reports_that_arrive_together_are_judged_by_one_reconcile() {
    const N: usize = 64;
    let gather = |w: &mut World| {
        // every rank trains until it has saved the pending checkpoint; its
        // report is held back, as if all arrived in the same instant
        let mut held = Vec::new();
        for _ in 0..50 {
            w.deliver_all();
            for i in 0..N {
                for msg in w.workers[i].train() {
                    match msg {
                        WorkerMessage::ShardSaved { .. } => {
                            held.push(Observation::Message { conn: w.workers[i].conn, msg })
                        }
                        other => w.send(i, other),
                    }
                }
            }
            if held.len() == N {
                return held;
            }
        }
        panic!("only {} of {N} ranks saved", held.len());
    };
    let commits = |actions: &[Action]| -> Vec<usize> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Propose(Command::CommitCheckpoint { shards, .. }) => {
                    // the ledger keeps digests only, and the type says so
                    let _: &Vec<ShardDigest> = shards;
                    Some(shards.len())
                }
                _ => None,
            })
            .collect()
    };

    let mut w = World::new(N as u32);
    w.running();
    w.observe(Observation::CheckpointRequested { job: name(), reply_to: None });
    w.until(50, |w| w.job().pending().is_some());
    let held = gather(&mut w);
    let before = w.sup.reconciles();
    let t = w.t();
    let actions = w.sup.observe_batch(&w.st, t, held);
    assert_eq!(w.sup.reconciles() - before, 1, "N reports together: one reconcile");
    assert_eq!(commits(&actions), vec![N], "and one commit of every shard");
    w.route(actions);
    w.apply_all();
    let first = w.job().latest_committed().expect("committed").id;

    // the same reports one at a time: one reconcile each, the same commit
    w.observe(Observation::CheckpointRequested { job: name(), reply_to: None });
    w.until(50, |w| w.job().pending().is_some());
    let held = gather(&mut w);
    let before = w.sup.reconciles();
    let mut actions = Vec::new();
    for obs in held {
        let t = w.t();
        actions.extend(w.sup.observe(&w.st, t, obs));
    }
    assert_eq!(w.sup.reconciles() - before, N as u64);
    assert_eq!(commits(&actions), vec![N]);
    w.route(actions);
    w.apply_all();
    assert!(w.job().latest_committed().unwrap().id > first);
}

#[test]
fn a_restore_is_timed_once_from_its_decision_to_the_job_training_again() {
    let mut w = World::new(2);
    w.running();
    let before = w.now;
    // a restarted process: the leader decides a restore at once
    w.restart(1);
    assert!(w.restore_proposed(RestoreReason::WorkerRestarted), "{:?}", w.proposals);
    w.until(200, |w| w.job().state == JobState::Running && w.job().generation == Generation(2));
    w.tick();
    w.tick();
    assert_eq!(w.recoveries.len(), 1, "one restore, one figure: {:?}", w.recoveries);
    let most = (w.now - before) as f64 / 1e3;
    assert!(w.recoveries[0] > 0.0 && w.recoveries[0] <= most, "{:?} within {most} s", w.recoveries);
    // a new leader that took over nothing times nothing
    w.leader_change();
    w.until(20, |w| w.job().state == JobState::Running);
    w.tick();
    assert_eq!(w.recoveries.len(), 1);
}
