//! Fuzz target for the ledger ([`State::apply`]): sequences of commands over
//! a small universe (two jobs and an unknown one, a few spec variants,
//! checkpoint ids, steps, generations and ranks picked relative to the
//! current state, so most commands are plausible and the rest probe the
//! refusals), with the rules of `ledger/mod.rs` checked after every step:
//!
//! - a refused command changes nothing (the state, and its snapshot bytes);
//! - a replica applying the same entry from the previous snapshot gets the
//!   same outcome and state (determinism, snapshot fidelity), and the new
//!   state survives a snapshot round trip;
//! - jobs never disappear and their spec never changes; the generation only
//!   grows, by exactly one per accepted restore, and `restores` with it;
//!   a succeeded job changes state no more, a failed one only by an
//!   operator's restore;
//! - every checkpoint moves only along the documented transitions (a
//!   committed one leaves `committed` only by being condemned, abandoned by
//!   an operator or retired); ids are handed out in order and never reused;
//!   a committed checkpoint holds one shard per rank and keeps it until it
//!   is a tombstone; only the oldest tombstones beyond `TOMBSTONES` are
//!   forgotten;
//! - at most one checkpoint is pending, only while the job runs, in its
//!   generation; the step a generation started from never changes;
//! - the latest committed step goes back only by a condemnation or an
//!   operator's restore, and nothing committed lies beyond an operator's
//!   choice;
//! - the counters and the events returned agree with the transitions;
//! - nothing panics, including what `status` reads (bytes, latest, ...).
//!
//! Seeds and case counts: see `shared/tests/support/fuzz.rs`.

#[path = "../../shared/tests/support/fuzz.rs"]
mod fuzz;

use flotilla_coordinator::ledger::{
    AbortReason, CheckpointState, Command, Event, Job, JobState, NodeInfo, Origin, Outcome, RestoreReason,
    State, JOB_EVENTS_KEPT, TOMBSTONES,
};
use flotilla_shared::checksum::Checksum;
use flotilla_shared::ids::{CheckpointId, Generation, JobName, NodeId, Rank, Step};
use flotilla_shared::shard::ShardDigest;
use flotilla_shared::spec::JobSpec;
use fuzz::check;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;
use std::collections::BTreeSet;

/// Job names the commands use; the last one is never submitted.
const JOBS: [&str; 3] = ["a", "b", "ghost"];

fn name(i: &JobSel) -> JobName {
    JobName::new(JOBS[i.0]).expect("a valid name")
}

/// Which of [`JOBS`] a command names.
#[derive(Debug, Clone, Copy)]
struct JobSel(usize);

/// The spec variants a job may be submitted with (a second, different one
/// is refused; variant 3 needs an origin; variant 4 is out of range).
fn spec(job: &JobName, variant: usize) -> JobSpec {
    let (world, keep, restarts, extra) = [
        (2, 2, 2, ""),
        (1, 1, 0, ""),
        (3, 3, 3, "[trainer]\ntotal_steps = 100\n"),
        (2, 1, 1, ""),
        (2, 2, 2, ""),
    ][variant];
    let resume = if variant == 3 { "resume_from = \"/ckpt/other\"\n" } else { "" };
    let text = format!(
        "name = \"{job}\"\nworld_size = {world}\n[checkpoint]\nevery_steps = 10\nkeep_last = {keep}\nroot = \"/ckpt\"\n{resume}[failure]\nmax_restarts = {restarts}\n{extra}"
    );
    let mut spec = JobSpec::from_toml(&text).expect("a valid variant");
    if variant == 4 {
        spec.world_size = 0;
    }
    spec
}

fn shard(rank: u32, huge: bool) -> ShardDigest {
    ShardDigest {
        rank: Rank(rank),
        file: format!("rank-{rank:05}.safetensors"),
        // what a worker reports is not checked: sums must not overflow
        bytes: if huge { u64::MAX - u64::from(rank) } else { 100 },
        checksum: Checksum(rank),
    }
}

/// A generation relative to the job's current one.
#[derive(Debug, Clone)]
enum GenSel {
    Current,
    Next,
    Prev,
    Raw(u64),
}

/// A checkpoint id relative to the job's checkpoints.
#[derive(Debug, Clone)]
enum CkptSel {
    Next,
    Pending,
    Latest,
    /// The first checkpoint in that state.
    InState(CheckpointState),
    Nth(Index),
    Raw(u64),
}

/// A step relative to the latest committed one.
#[derive(Debug, Clone)]
enum StepSel {
    AfterLatest(u64),
    Raw(u64),
}

/// Which shards a commit carries.
#[derive(Debug, Clone)]
enum ShardsSel {
    Exact,
    Missing(Index),
    Duplicate(Index),
    Extra,
    Empty,
}

/// A command before it is resolved against the state.
#[derive(Debug, Clone)]
enum Act {
    /// Whatever moves the job along its normal course from where it is
    /// (submit, start, begin, commit, resume), so that sequences reach deep
    /// states; the other intents then probe each of them.
    Advance {
        job: JobSel,
        step: u64,
    },
    /// `times` advances in a row: long runs retire and abort enough
    /// checkpoints to fill the tombstones.
    Run {
        job: JobSel,
        times: u8,
    },
    Announce(u64),
    Submit {
        job: JobSel,
        variant: Index,
        origin: Option<i8>,
    },
    Start {
        job: JobSel,
        gen: GenSel,
    },
    Begin {
        job: JobSel,
        id: CkptSel,
        step: StepSel,
        gen: GenSel,
    },
    Commit {
        job: JobSel,
        id: CkptSel,
        shards: ShardsSel,
        huge: bool,
    },
    Abort {
        job: JobSel,
        id: CkptSel,
        reason: Index,
    },
    MarkCorrupt {
        job: JobSel,
        id: CkptSel,
    },
    ClearCorrupt {
        job: JobSel,
        id: CkptSel,
    },
    Delete {
        job: JobSel,
        id: CkptSel,
    },
    Restore {
        job: JobSel,
        gen: GenSel,
        from: Option<CkptSel>,
        reason: RestoreReason,
    },
    OperatorRestore {
        job: JobSel,
        gen: GenSel,
        from: Option<CkptSel>,
    },
    Resume {
        job: JobSel,
        gen: GenSel,
    },
    Block {
        job: JobSel,
        gen: GenSel,
    },
    Fail {
        job: JobSel,
    },
    Finish {
        job: JobSel,
        gen: GenSel,
    },
    Cancel {
        job: JobSel,
    },
    DeleteJob {
        job: JobSel,
        remove_checkpoints: bool,
    },
}

/// How the proposer's clock moved since the previous command (a new leader's
/// clock may be behind the old one's).
#[derive(Debug, Clone)]
enum Tick {
    Forward(u64),
    PastTheRestartWindow,
    Back(u64),
}

/// The generation a restore names: mostly the right one (the next).
fn restore_gen() -> BoxedStrategy<GenSel> {
    prop_oneof![
        6 => Just(GenSel::Next),
        1 => Just(GenSel::Current),
        1 => (0u64..6).prop_map(GenSel::Raw),
    ]
    .boxed()
}

fn gen_sel() -> BoxedStrategy<GenSel> {
    prop_oneof![
        8 => Just(GenSel::Current),
        3 => Just(GenSel::Next),
        1 => Just(GenSel::Prev),
        1 => (0u64..6).prop_map(GenSel::Raw),
    ]
    .boxed()
}

fn ckpt_sel() -> BoxedStrategy<CkptSel> {
    prop_oneof![
        3 => Just(CkptSel::Next),
        3 => Just(CkptSel::Pending),
        2 => Just(CkptSel::Latest),
        4 => select(vec![
            CheckpointState::Committed,
            CheckpointState::Corrupt,
            CheckpointState::Abandoned,
            CheckpointState::Aborted,
            CheckpointState::Deleted,
        ])
        .prop_map(CkptSel::InState),
        3 => any::<Index>().prop_map(CkptSel::Nth),
        1 => (0u64..8).prop_map(CkptSel::Raw),
    ]
    .boxed()
}

/// A checkpoint id, mostly one in the state a command needs.
fn ckpt_in(state: CheckpointState) -> BoxedStrategy<CkptSel> {
    prop_oneof![3 => Just(CkptSel::InState(state)), 2 => ckpt_sel()].boxed()
}

fn job_sel() -> BoxedStrategy<JobSel> {
    prop_oneof![6 => Just(JobSel(0)), 3 => Just(JobSel(1)), 1 => Just(JobSel(2))].boxed()
}

fn restore_reason() -> BoxedStrategy<RestoreReason> {
    select(vec![
        RestoreReason::HeartbeatTimeout,
        RestoreReason::Disconnected,
        RestoreReason::WorkerRestarted,
        RestoreReason::TrainerFailed,
        RestoreReason::CorruptCheckpoint,
        RestoreReason::Hang,
        RestoreReason::Retry,
        RestoreReason::Operator,
    ])
    .boxed()
}

fn act() -> BoxedStrategy<Act> {
    let step = prop_oneof![
        4 => (0u64..30).prop_map(StepSel::AfterLatest),
        1 => (0u64..8).prop_map(|n| StepSel::Raw(n * 5)),
    ];
    let shards = prop_oneof![
        6 => Just(ShardsSel::Exact),
        1 => any::<Index>().prop_map(ShardsSel::Missing),
        1 => any::<Index>().prop_map(ShardsSel::Duplicate),
        1 => Just(ShardsSel::Extra),
        1 => Just(ShardsSel::Empty),
    ];
    prop_oneof![
        16 => (job_sel(), 1u64..20).prop_map(|(job, step)| Act::Advance { job, step }),
        1 => (job_sel(), 1u8..120).prop_map(|(job, times)| Act::Run { job, times }),
        1 => (0u64..4).prop_map(Act::Announce),
        3 => (job_sel(), any::<Index>(), option::weighted(0.2, -1i8..=1))
            .prop_map(|(job, variant, origin)| Act::Submit { job, variant, origin }),
        3 => (job_sel(), gen_sel()).prop_map(|(job, gen)| Act::Start { job, gen }),
        8 => (job_sel(), ckpt_sel(), step, gen_sel()).prop_map(|(job, id, step, gen)| Act::Begin { job, id, step, gen }),
        8 => (job_sel(), ckpt_sel(), shards, proptest::bool::weighted(0.1))
            .prop_map(|(job, id, shards, huge)| Act::Commit { job, id, shards, huge }),
        2 => (job_sel(), ckpt_sel(), any::<Index>()).prop_map(|(job, id, reason)| Act::Abort { job, id, reason }),
        3 => (job_sel(), ckpt_in(CheckpointState::Committed)).prop_map(|(job, id)| Act::MarkCorrupt { job, id }),
        4 => (job_sel(), ckpt_in(CheckpointState::Corrupt)).prop_map(|(job, id)| Act::ClearCorrupt { job, id }),
        2 => (job_sel(), ckpt_sel()).prop_map(|(job, id)| Act::Delete { job, id }),
        3 => (job_sel(), restore_gen(), option::weighted(0.8, ckpt_sel()), restore_reason())
            .prop_map(|(job, gen, from, reason)| Act::Restore { job, gen, from, reason }),
        2 => (job_sel(), restore_gen(), option::of(ckpt_in(CheckpointState::Abandoned)))
            .prop_map(|(job, gen, from)| Act::OperatorRestore { job, gen, from }),
        3 => (job_sel(), gen_sel()).prop_map(|(job, gen)| Act::Resume { job, gen }),
        1 => (job_sel(), gen_sel()).prop_map(|(job, gen)| Act::Block { job, gen }),
        1 => job_sel().prop_map(|job| Act::Fail { job }),
        1 => (job_sel(), gen_sel()).prop_map(|(job, gen)| Act::Finish { job, gen }),
        1 => job_sel().prop_map(|job| Act::Cancel { job }),
        1 => (job_sel(), any::<bool>())
            .prop_map(|(job, remove_checkpoints)| Act::DeleteJob { job, remove_checkpoints }),
    ]
    .boxed()
}

fn tick() -> BoxedStrategy<Tick> {
    prop_oneof![
        12 => (0u64..600_000).prop_map(Tick::Forward),
        1 => Just(Tick::PastTheRestartWindow),
        1 => (0u64..600_000).prop_map(Tick::Back),
    ]
    .boxed()
}

/// Turns an intent into a command against the current state.
fn resolve(s: &State, act: &Act, now_ms: u64) -> Command {
    let job_of = |i: &JobSel| s.jobs.get(&name(i)).map(|j| &**j);
    let gen = |i: &JobSel, g: &GenSel| {
        let current = job_of(i).map_or(1, |j| j.generation.0);
        Generation(match g {
            GenSel::Current => current,
            GenSel::Next => current + 1,
            GenSel::Prev => current.saturating_sub(1),
            GenSel::Raw(n) => *n,
        })
    };
    let id = |i: &JobSel, c: &CkptSel| {
        let j = job_of(i);
        CheckpointId(match c {
            CkptSel::Next => j.map_or(1, |j| j.next_checkpoint.0),
            CkptSel::Pending => j.and_then(Job::pending).map_or(0, |p| p.id.0),
            CkptSel::Latest => j.and_then(Job::latest_committed).map_or(0, |c| c.id.0),
            CkptSel::InState(state) => {
                j.and_then(|j| j.checkpoints.values().find(|c| c.state == *state)).map_or(0, |c| c.id.0)
            }
            CkptSel::Nth(n) => match j {
                Some(j) if !j.checkpoints.is_empty() => {
                    j.checkpoints.keys().nth(n.index(j.checkpoints.len())).expect("in range").0
                }
                _ => 0,
            },
            CkptSel::Raw(n) => *n,
        })
    };
    match act {
        Act::Advance { job, step } => {
            let Some(j) = job_of(job) else {
                return Command::SubmitJob { spec: spec(&name(job), job.0 % 3), now_ms, origin: None };
            };
            let (job, generation) = (name(job), j.generation);
            match (j.state, j.pending()) {
                (JobState::Waiting, _) => Command::StartJob { job, generation, holders: Default::default() },
                (JobState::Restoring | JobState::Blocked, _) => {
                    Command::ResumeJob { job, generation, holders: Default::default() }
                }
                (JobState::Running, Some(p)) => Command::CommitCheckpoint {
                    job,
                    id: p.id,
                    shards: (0..j.spec.world_size).map(|r| shard(r, false)).collect(),
                    now_ms,
                },
                (JobState::Running, None) => Command::BeginCheckpoint {
                    job,
                    id: j.next_checkpoint,
                    step: Step(j.latest_committed().map_or(0, |c| c.step.0) + step),
                    generation,
                    now_ms,
                },
                (JobState::Failed, _) => Command::OperatorRestore {
                    job,
                    generation: Generation(generation.0 + 1),
                    from: None,
                    now_ms,
                },
                (JobState::Succeeded | JobState::Cancelled, _) => {
                    Command::DeleteCheckpoint { job, id: CheckpointId(1) }
                }
            }
        }
        Act::Run { .. } => unreachable!("runs are expanded into advances"),
        Act::Announce(n) => Command::Announce {
            node: NodeId(*n),
            info: NodeInfo { http_url: format!("http://127.0.0.1:920{n}"), api_addr: None },
        },
        Act::Submit { job, variant, origin } => {
            let spec = spec(&name(job), variant.index(5));
            let origin = origin.map(|delta| {
                let n = (i64::from(spec.world_size) + i64::from(delta)).max(0) as u32;
                Box::new(Origin {
                    job: JobName::new("other").expect("valid"),
                    id: CheckpointId(4),
                    step: Step(40),
                    dir: "/ckpt/other/ckpt-00000004".into(),
                    shards: (0..n).map(|r| shard(r, false)).collect(),
                })
            });
            Command::SubmitJob { spec, now_ms, origin }
        }
        Act::Start { job, gen: g } => {
            Command::StartJob { job: name(job), generation: gen(job, g), holders: Default::default() }
        }
        Act::Begin { job, id: c, step, gen: g } => {
            let latest = job_of(job).and_then(Job::latest_committed).map_or(0, |c| c.step.0);
            let step = match step {
                StepSel::AfterLatest(k) => latest + k,
                StepSel::Raw(n) => *n,
            };
            Command::BeginCheckpoint {
                job: name(job),
                id: id(job, c),
                step: Step(step),
                generation: gen(job, g),
                now_ms,
            }
        }
        Act::Commit { job, id: c, shards, huge } => {
            let world = job_of(job).map_or(2, |j| j.spec.world_size);
            let mut list: Vec<ShardDigest> = (0..world).rev().map(|r| shard(r, *huge)).collect();
            match shards {
                ShardsSel::Exact => {}
                ShardsSel::Missing(i) if !list.is_empty() => {
                    list.remove(i.index(list.len()));
                }
                ShardsSel::Duplicate(i) if !list.is_empty() => {
                    let n = list.len();
                    list[i.index(n)] = list[(i.index(n) + 1) % n].clone();
                }
                ShardsSel::Extra => list.push(shard(world, *huge)),
                _ => list.clear(),
            }
            Command::CommitCheckpoint { job: name(job), id: id(job, c), shards: list, now_ms }
        }
        Act::Abort { job, id: c, reason } => {
            let reason = [
                AbortReason::Timeout { seconds: 120 },
                AbortReason::RankPastStep { rank: Rank(1) },
                AbortReason::WriteFailed { rank: Rank(0), error: "ENOSPC".into() },
                AbortReason::GenerationChanged,
                AbortReason::JobEnded,
            ][reason.index(5)]
            .clone();
            Command::AbortCheckpoint { job: name(job), id: id(job, c), reason, now_ms }
        }
        Act::MarkCorrupt { job, id: c } => Command::MarkCorrupt {
            job: name(job),
            id: id(job, c),
            reason: "rank 1: checksum mismatch in model/w".into(),
            now_ms,
        },
        Act::ClearCorrupt { job, id: c } => Command::ClearCorrupt { job: name(job), id: id(job, c), now_ms },
        Act::Delete { job, id: c } => Command::DeleteCheckpoint { job: name(job), id: id(job, c) },
        Act::Restore { job, gen: g, from, reason } => Command::Restore {
            job: name(job),
            generation: gen(job, g),
            from: from.as_ref().map(|c| id(job, c)),
            reason: *reason,
            detail: Some("rank 1".into()),
            now_ms,
            takeovers: Vec::new(),
        },
        Act::OperatorRestore { job, gen: g, from } => Command::OperatorRestore {
            job: name(job),
            generation: gen(job, g),
            from: from.as_ref().map(|c| id(job, c)),
            now_ms,
        },
        Act::Resume { job, gen: g } => {
            Command::ResumeJob { job: name(job), generation: gen(job, g), holders: Default::default() }
        }
        Act::Block { job, gen: g } => Command::BlockJob {
            job: name(job),
            generation: gen(job, g),
            error: "rank 1 on GPU 0: restore needs 2 GiB, 1 GiB free".into(),
            rank: Some(flotilla_shared::ids::Rank(1)),
            kind: Some(flotilla_shared::wire::RestoreFailureKind::DeviceMemory),
            now_ms,
        },
        Act::Fail { job } => Command::FailJob { job: name(job), error: "given up".into() },
        Act::Cancel { job } => Command::CancelJob { job: name(job), now_ms },
        Act::DeleteJob { job, remove_checkpoints } => {
            Command::DeleteJob { job: name(job), remove_checkpoints: *remove_checkpoints }
        }
        Act::Finish { job, gen: g } => {
            Command::FinishJob { job: name(job), generation: gen(job, g), digest: "00ff".into(), step: None }
        }
    }
}

/// The job a command is about, if any.
fn job_of(cmd: &Command) -> Option<&JobName> {
    match cmd {
        Command::Announce { .. } => None,
        Command::SubmitJob { spec, .. } => Some(&spec.name),
        Command::StartJob { job, .. }
        | Command::BeginCheckpoint { job, .. }
        | Command::CommitCheckpoint { job, .. }
        | Command::AbortCheckpoint { job, .. }
        | Command::MarkCorrupt { job, .. }
        | Command::ClearCorrupt { job, .. }
        | Command::DeleteCheckpoint { job, .. }
        | Command::Restore { job, .. }
        | Command::OperatorRestore { job, .. }
        | Command::ResumeJob { job, .. }
        | Command::BlockJob { job, .. }
        | Command::FailJob { job, .. }
        | Command::FinishJob { job, .. }
        | Command::CancelJob { job, .. }
        | Command::DeleteJob { job, .. } => Some(job),
    }
}

/// The checkpoint a command names, if any.
fn ckpt_of(cmd: &Command) -> Option<CheckpointId> {
    match cmd {
        Command::BeginCheckpoint { id, .. }
        | Command::CommitCheckpoint { id, .. }
        | Command::AbortCheckpoint { id, .. }
        | Command::MarkCorrupt { id, .. }
        | Command::ClearCorrupt { id, .. }
        | Command::DeleteCheckpoint { id, .. } => Some(*id),
        Command::Restore { from, .. } | Command::OperatorRestore { from, .. } => *from,
        _ => None,
    }
}

fn is_operator_restore(cmd: &Command) -> bool {
    matches!(cmd, Command::OperatorRestore { .. } | Command::Restore { reason: RestoreReason::Operator, .. })
}

/// Aborted and deleted checkpoints: kept (without manifests) as tombstones,
/// the oldest beyond [`TOMBSTONES`] forgotten.
fn is_tombstone(s: CheckpointState) -> bool {
    matches!(s, CheckpointState::Aborted | CheckpointState::Deleted)
}

fn is_restore(cmd: &Command) -> bool {
    matches!(cmd, Command::OperatorRestore { .. } | Command::Restore { .. })
}

fn snapshot(s: &State) -> Result<Vec<u8>, TestCaseError> {
    rmp_serde::to_vec_named(s).map_err(|e| TestCaseError::fail(format!("the state does not serialize: {e}")))
}

fn restored(bytes: &[u8]) -> Result<State, TestCaseError> {
    rmp_serde::from_slice(bytes).map_err(|e| TestCaseError::fail(format!("a snapshot does not decode: {e}")))
}

/// Whether checkpoint `id` may go from `from` to `to` by `cmd` (its job's).
fn transition_allowed(from: CheckpointState, to: CheckpointState, cmd: &Command, id: CheckpointId) -> bool {
    use CheckpointState::*;
    let names_it = ckpt_of(cmd) == Some(id);
    let operator = is_operator_restore(cmd);
    match (from, to) {
        _ if from == to => true,
        (Pending, Committed) => matches!(cmd, Command::CommitCheckpoint { .. }) && names_it,
        // committed, and at once retired: a checkpoint re-committed by
        // ClearCorrupt after this one began may sit at a later step, and
        // retention keeps the latest steps (`ledger/mod.rs`, `commit`)
        (Pending, Deleted) => matches!(cmd, Command::CommitCheckpoint { .. }) && names_it,
        (Pending, Aborted) => match cmd {
            Command::AbortCheckpoint { .. } => names_it,
            Command::Restore { .. }
            | Command::OperatorRestore { .. }
            | Command::FailJob { .. }
            | Command::FinishJob { .. }
            | Command::CancelJob { .. } => true,
            _ => false,
        },
        (Committed, Corrupt) => matches!(cmd, Command::MarkCorrupt { .. }) && names_it,
        (Committed, Abandoned) => operator,
        (Corrupt, Committed) => matches!(cmd, Command::ClearCorrupt { .. }) && names_it,
        // cleared, but on the line an operator's restore abandoned
        (Corrupt, Abandoned) => matches!(cmd, Command::ClearCorrupt { .. }) && names_it,
        (Abandoned, Committed) => operator && names_it,
        // retired by retention when another checkpoint commits, or deleted
        (Committed | Corrupt | Abandoned, Deleted) => {
            matches!(cmd, Command::CommitCheckpoint { .. })
                || (matches!(cmd, Command::DeleteCheckpoint { .. }) && names_it)
        }
        (Aborted, Deleted) => matches!(cmd, Command::DeleteCheckpoint { .. }) && names_it,
        _ => false,
    }
}

/// Everything `status`, metrics and the supervisor read from a job; none of
/// it may panic.
fn read_like_status(j: &Job) {
    let _ = (j.latest_committed(), j.pending(), j.start_step(), j.state.as_str(), j.state.is_terminal());
    for (id, c) in &j.checkpoints {
        let _ = (c.bytes(), c.state.as_str(), j.committed_before(*id));
    }
    let _ = j.committed_before(CheckpointId(u64::MAX));
}

/// Checks every rule across one applied command.
fn check_step(prev: &State, cmd: &Command, outcome: &Outcome, next: &State) -> Result<(), TestCaseError> {
    if outcome.is_err() {
        prop_assert_eq!(next, prev, "a refused command changed the state");
        prop_assert_eq!(snapshot(next)?, snapshot(prev)?);
        return Ok(());
    }
    let events = outcome.as_ref().expect("accepted");
    let target = job_of(cmd);
    for e in events {
        let job = match e {
            Event::JobSubmitted { job }
            | Event::JobAlreadySubmitted { job }
            | Event::JobState { job, .. }
            | Event::CheckpointBegun { job, .. }
            | Event::CheckpointCommitted { job, .. }
            | Event::CheckpointAborted { job, .. }
            | Event::CheckpointCorrupt { job, .. }
            | Event::CheckpointCleared { job, .. }
            | Event::CheckpointDeleted { job, .. }
            | Event::Restoring { job, .. }
            | Event::JobDeleted { job, .. } => job,
        };
        prop_assert_eq!(Some(job), target, "an event about another job");
    }
    for (name, p) in &prev.jobs {
        let Some(n) = next.jobs.get(name) else {
            // only a deletion removes a job, and only an ended one
            prop_assert!(
                matches!(cmd, Command::DeleteJob { job, .. } if job == name),
                "job {} disappeared by {:?}",
                name,
                cmd
            );
            prop_assert!(p.state.is_terminal(), "live job {} ({:?}) deleted", name, p.state);
            prop_assert!(matches!(events.as_slice(), [Event::JobDeleted { .. }]), "{:?}", events);
            continue;
        };
        if Some(name) != target {
            prop_assert_eq!(n, p, "a command for another job changed job {}", name);
        }
    }
    for (name, n) in &next.jobs {
        read_like_status(n);
        check_job_alone(name, n)?;
        match prev.jobs.get(name) {
            None => {
                prop_assert!(matches!(cmd, Command::SubmitJob { .. }), "job {name} appeared by {cmd:?}");
                prop_assert_eq!(events, &vec![Event::JobSubmitted { job: name.clone() }]);
                prop_assert_eq!((n.state, n.generation, n.restores), (JobState::Waiting, Generation(1), 0));
                prop_assert!(n.checkpoints.is_empty());
            }
            Some(p) if Some(name) == target => check_job_step(name, p, cmd, events, n)?,
            Some(_) => {}
        }
    }
    if let Command::SubmitJob { spec, .. } = cmd {
        if prev.jobs.contains_key(&spec.name) {
            prop_assert_eq!(events, &vec![Event::JobAlreadySubmitted { job: spec.name.clone() }]);
            prop_assert_eq!(next, prev);
        }
    }
    Ok(())
}

/// Rules that hold of any job at any time.
fn check_job_alone(name: &JobName, j: &Job) -> Result<(), TestCaseError> {
    let world = j.spec.world_size;
    let want: Vec<Rank> = (0..world).map(Rank).collect();
    let mut pending = 0;
    for (id, c) in &j.checkpoints {
        prop_assert_eq!(c.id, *id);
        prop_assert!(*id < j.next_checkpoint, "{name}: id {id} not below next {}", j.next_checkpoint);
        prop_assert!(c.generation <= j.generation, "{name}: checkpoint {id} from a future generation");
        match c.state {
            CheckpointState::Pending => {
                pending += 1;
                prop_assert_eq!(
                    j.state,
                    JobState::Running,
                    "{}: checkpoint {} pending while not running",
                    name,
                    id
                );
                prop_assert_eq!(c.generation, j.generation, "{}: pending from another generation", name);
                prop_assert!(c.shards.is_empty());
            }
            CheckpointState::Committed | CheckpointState::Corrupt | CheckpointState::Abandoned => {
                let ranks: Vec<Rank> = c.shards.iter().map(|s| s.rank).collect();
                prop_assert_eq!(&ranks, &want, "{}: checkpoint {} shards", name, id);
            }
            // a tombstone keeps no manifests, but for the one the
            // generation started from (its restore point)
            CheckpointState::Aborted | CheckpointState::Deleted => {
                prop_assert!(
                    c.shards.is_empty() || j.restored_from == Some(*id),
                    "{}: tombstone {} has shards",
                    name,
                    id
                )
            }
        }
    }
    prop_assert!(pending <= 1, "{name}: {pending} checkpoints pending");
    let tombstones =
        j.checkpoints.values().filter(|c| is_tombstone(c.state) && j.restored_from != Some(c.id)).count();
    prop_assert!(tombstones <= TOMBSTONES, "{name}: {tombstones} tombstones kept");
    prop_assert_eq!(u64::from(j.restores), j.restores_by_reason.values().sum::<u64>());
    prop_assert!(j.failures_ms.len() as u64 <= u64::from(j.spec.failure.max_restarts) + 1);
    prop_assert!(j.events.len() <= JOB_EVENTS_KEPT);
    prop_assert_eq!(j.state == JobState::Succeeded, j.final_digest.is_some());
    Ok(())
}

/// Rules across one accepted command for the job it names.
fn check_job_step(
    name: &JobName,
    p: &Job,
    cmd: &Command,
    events: &[Event],
    n: &Job,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(&n.spec, &p.spec, "{}: the spec changed", name);
    // generation and restores
    prop_assert!(n.generation >= p.generation, "{name}: generation went back");
    if n.generation != p.generation {
        prop_assert!(is_restore(cmd), "{name}: generation moved by {cmd:?}");
        prop_assert_eq!(n.generation.0, p.generation.0 + 1);
        prop_assert_eq!(n.restores, p.restores + 1);
    } else {
        prop_assert_eq!(n.restores, p.restores);
    }
    // terminal states
    if p.state == JobState::Succeeded {
        prop_assert_eq!(n.state, JobState::Succeeded);
        prop_assert_eq!((n.generation, &n.final_digest), (p.generation, &p.final_digest));
    }
    if p.state == JobState::Cancelled {
        prop_assert_eq!(n.state, JobState::Cancelled, "{}: a cancelled job revived by {:?}", name, cmd);
        prop_assert_eq!(n.generation, p.generation);
    }
    if n.state == JobState::Cancelled && p.state != JobState::Cancelled {
        prop_assert!(matches!(cmd, Command::CancelJob { .. }), "{name}: cancelled by {cmd:?}");
        prop_assert!(n.pending().is_none(), "{name}: cancelled with a checkpoint pending");
    }
    if p.state == JobState::Failed && n.state != JobState::Failed {
        prop_assert!(is_operator_restore(cmd), "{name}: a failed job revived by {cmd:?}");
    }
    // the step a generation started from is a fact of that generation
    if n.generation == p.generation {
        prop_assert_eq!(n.start_step(), p.start_step(), "{}: the generation's start step changed", name);
    }
    // checkpoints: facts fixed, transitions documented, only the oldest
    // tombstones forgotten; (from, to, id) of every checkpoint whose state changed
    let mut moved: Vec<(CheckpointState, CheckpointState, CheckpointId)> = Vec::new();
    let named =
        |pick: fn(&Event) -> Option<CheckpointId>| events.iter().filter_map(pick).collect::<BTreeSet<_>>();
    let deleted_now = named(|e| match e {
        Event::CheckpointDeleted { id, .. } => Some(*id),
        _ => None,
    });
    let aborted_now = named(|e| match e {
        Event::CheckpointAborted { id, .. } => Some(*id),
        _ => None,
    });
    let mut forgotten = Vec::new();
    for (id, pc) in &p.checkpoints {
        let Some(nc) = n.checkpoints.get(id) else {
            // forgotten: a tombstone, or one that became one just now
            let to = match pc.state {
                s if is_tombstone(s) => s,
                _ if deleted_now.contains(id) => CheckpointState::Deleted,
                _ if aborted_now.contains(id) => CheckpointState::Aborted,
                s => return Err(TestCaseError::fail(format!("{name}: checkpoint {id} ({s:?}) forgotten"))),
            };
            prop_assert!(
                transition_allowed(pc.state, to, cmd, *id),
                "{name}: checkpoint {id} {:?} -> {to:?}",
                pc.state
            );
            if pc.state != to {
                moved.push((pc.state, to, *id));
            }
            forgotten.push(*id);
            continue;
        };
        prop_assert_eq!((nc.step, nc.generation, nc.begun_ms), (pc.step, pc.generation, pc.begun_ms));
        prop_assert!(
            transition_allowed(pc.state, nc.state, cmd, *id),
            "{name}: checkpoint {id} went {:?} -> {:?} by {cmd:?}",
            pc.state,
            nc.state
        );
        // a committed checkpoint keeps its manifests until it is a tombstone
        if pc.state != CheckpointState::Pending && !is_tombstone(nc.state) {
            prop_assert_eq!(&nc.shards, &pc.shards, "{}: checkpoint {} shards changed", name, id);
        }
        if pc.state != nc.state {
            moved.push((pc.state, nc.state, *id));
        }
    }
    if !forgotten.is_empty() {
        // the generation's restore point is kept whatever its state
        let kept: Vec<CheckpointId> = n
            .checkpoints
            .values()
            .filter(|c| is_tombstone(c.state) && n.restored_from != Some(c.id))
            .map(|c| c.id)
            .collect();
        prop_assert!(
            !forgotten.contains(&n.restored_from.unwrap_or(CheckpointId(0))),
            "{name}: forgot the restore point"
        );
        prop_assert_eq!(
            kept.len(),
            TOMBSTONES,
            "{}: forgot {:?} with fewer tombstones kept",
            name,
            forgotten
        );
        prop_assert!(
            forgotten.iter().max() < kept.iter().min(),
            "{name}: forgot {forgotten:?}, not the oldest"
        );
    }
    prop_assert_eq!(n.pruned_total, p.pruned_total + forgotten.len() as u64);
    let new: Vec<CheckpointId> =
        n.checkpoints.keys().filter(|id| !p.checkpoints.contains_key(id)).copied().collect();
    match cmd {
        Command::BeginCheckpoint { id, step, generation, .. } => {
            prop_assert_eq!(&new, &vec![*id]);
            prop_assert_eq!(*id, p.next_checkpoint);
            prop_assert_eq!(n.next_checkpoint, CheckpointId(id.0 + 1));
            let c = &n.checkpoints[id];
            prop_assert_eq!((c.state, c.step, c.generation), (CheckpointState::Pending, *step, *generation));
            if let Some(latest) = p.latest_committed() {
                prop_assert!(
                    *step > latest.step,
                    "{name}: began at {step}, latest committed {}",
                    latest.step
                );
            }
        }
        _ => {
            prop_assert!(new.is_empty(), "{name}: checkpoints {new:?} appeared by {cmd:?}");
            prop_assert_eq!(n.next_checkpoint, p.next_checkpoint);
        }
    }
    // an operator's restore makes its checkpoint the head of the job's
    // history: nothing committed lies beyond it
    if is_operator_restore(cmd) && n.generation != p.generation {
        let head = n.restored_from.map_or(Step(0), |id| n.checkpoints[&id].step);
        for c in n.checkpoints.values().filter(|c| c.state == CheckpointState::Committed) {
            prop_assert!(
                c.step <= head,
                "{name}: checkpoint {} (step {}) committed past the head {head}",
                c.id,
                c.step
            );
        }
    }
    // the latest committed step goes back only by a condemnation or an operator
    let step_of = |j: &Job| j.latest_committed().map(|c| c.step);
    if step_of(n) < step_of(p) {
        prop_assert!(
            matches!(cmd, Command::MarkCorrupt { .. }) || is_operator_restore(cmd),
            "{name}: latest committed step went {:?} -> {:?} by {cmd:?}",
            step_of(p),
            step_of(n)
        );
    }
    // counters follow the transitions
    use CheckpointState::*;
    let of = |from: Option<CheckpointState>, to: CheckpointState| -> BTreeSet<CheckpointId> {
        moved.iter().filter(|(f, t, _)| from.is_none_or(|from| from == *f) && *t == to).map(|m| m.2).collect()
    };
    let count = |from, to| of(Some(from), to).len() as u64;
    let committed = &of(Some(Pending), Committed) | &of(Some(Pending), Deleted);
    prop_assert_eq!(n.committed_total, p.committed_total + committed.len() as u64);
    prop_assert_eq!(n.aborted_total, p.aborted_total + count(Pending, Aborted));
    prop_assert_eq!(n.condemned_total, p.condemned_total + count(Committed, Corrupt));
    // events tell the truth
    let ids = |pick: &dyn Fn(&Event) -> Option<CheckpointId>| {
        events.iter().filter_map(pick).collect::<BTreeSet<_>>()
    };
    prop_assert_eq!(
        ids(&|e| match e {
            Event::CheckpointBegun { id, .. } => Some(*id),
            _ => None,
        }),
        new.iter().copied().collect::<BTreeSet<_>>()
    );
    prop_assert_eq!(
        ids(&|e| match e {
            Event::CheckpointCommitted { id, .. } => Some(*id),
            _ => None,
        }),
        committed
    );
    prop_assert_eq!(
        ids(&|e| match e {
            Event::CheckpointAborted { id, .. } => Some(*id),
            _ => None,
        }),
        of(Some(Pending), Aborted)
    );
    prop_assert_eq!(
        ids(&|e| match e {
            Event::CheckpointCorrupt { id, .. } => Some(*id),
            _ => None,
        }),
        of(Some(Committed), Corrupt)
    );
    prop_assert_eq!(
        ids(&|e| match e {
            Event::CheckpointCleared { id, .. } => Some(*id),
            _ => None,
        }),
        &of(Some(Corrupt), Committed) | &of(Some(Corrupt), Abandoned)
    );
    prop_assert_eq!(
        ids(&|e| match e {
            Event::CheckpointDeleted { id, .. } => Some(*id),
            _ => None,
        }),
        of(None, Deleted)
    );
    let states: Vec<JobState> = events
        .iter()
        .filter_map(|e| match e {
            Event::JobState { state, .. } => Some(*state),
            _ => None,
        })
        .collect();
    let want_states = if n.state != p.state { vec![n.state] } else { vec![] };
    prop_assert_eq!(states, want_states, "{}: job state events for {:?} -> {:?}", name, p.state, n.state);
    for e in events {
        if let Event::Restoring { generation, from, .. } = e {
            prop_assert_eq!(*generation, n.generation);
            prop_assert_eq!(*from, n.restored_from);
            prop_assert_eq!(n.state, JobState::Restoring);
        }
    }
    if n.generation != p.generation && n.state != JobState::Failed {
        prop_assert!(
            events.iter().any(|e| matches!(e, Event::Restoring { .. })),
            "{name}: restore without event"
        );
    }
    Ok(())
}

#[test]
fn ledger_keeps_its_rules_under_any_command_sequence() {
    let input = (vec((act(), tick()), 1..64), 0u64..2_000_000_000_000);
    check("ledger_keeps_its_rules_under_any_command_sequence", 384, input, |(acts, start)| {
        let mut state = State::default();
        let mut now_ms = start;
        let acts = acts.iter().flat_map(|(act, tick)| match act {
            Act::Run { job, times } => (0..*times)
                .map(|i| (Act::Advance { job: *job, step: 1 + u64::from(i % 7) }, tick.clone()))
                .collect(),
            _ => vec![(act.clone(), tick.clone())],
        });
        for (act, tick) in acts {
            now_ms = match tick {
                Tick::Forward(d) => now_ms + d,
                Tick::PastTheRestartWindow => now_ms + 3_600_001,
                Tick::Back(d) => now_ms.saturating_sub(d),
            };
            let cmd = resolve(&state, &act, now_ms);
            // as a Raft entry: the command travels as MessagePack
            let entry = rmp_serde::to_vec_named(&cmd).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let decoded: Command =
                rmp_serde::from_slice(&entry).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&decoded, &cmd);
            let before = snapshot(&state)?;
            let prev = state.clone();
            let outcome = state.apply(cmd.clone());
            check_step(&prev, &cmd, &outcome, &state)?;
            // a replica restored from the previous snapshot applies the same
            // entry to the same effect
            let mut replica = restored(&before)?;
            prop_assert_eq!(&replica, &prev, "a snapshot did not restore the state");
            let replayed = replica.apply(decoded);
            prop_assert_eq!(&replayed, &outcome);
            prop_assert_eq!(&replica, &state);
            prop_assert_eq!(&restored(&snapshot(&state)?)?, &state);
        }
        Ok(())
    });
}
