//! Unit tests of the ledger: every transition, every refusal.

use super::*;
use flotilla_shared::checksum::Checksum;
use flotilla_shared::wire::RestoreFailureKind;

fn spec(name: &str, world: u32, keep_last: u32, max_restarts: u32) -> JobSpec {
    JobSpec::from_toml(&format!(
        "name = \"{name}\"\nworld_size = {world}\n[checkpoint]\nevery_steps = 10\nkeep_last = {keep_last}\nroot = \"/ckpt\"\n[failure]\nmax_restarts = {max_restarts}\n"
    ))
    .unwrap()
}

fn name(s: &str) -> JobName {
    JobName::new(s).unwrap()
}

fn shard(rank: u32) -> ShardDigest {
    ShardDigest {
        rank: Rank(rank),
        file: format!("rank-{rank:05}.safetensors"),
        bytes: 100,
        checksum: Checksum(rank),
    }
}

fn shards(world: u32) -> Vec<ShardDigest> {
    (0..world).rev().map(shard).collect()
}

/// A running job "a" with world size 2 in generation 1.
fn running(keep_last: u32, max_restarts: u32) -> State {
    let mut s = State::default();
    s.apply(Command::SubmitJob { spec: spec("a", 2, keep_last, max_restarts), now_ms: 1, origin: None })
        .unwrap();
    s.apply(Command::StartJob { job: name("a"), generation: Generation(1), holders: Default::default() })
        .unwrap();
    s
}

fn begin(s: &mut State, id: u64, step: u64, generation: u64) -> Outcome {
    s.apply(Command::BeginCheckpoint {
        job: name("a"),
        id: CheckpointId(id),
        step: Step(step),
        generation: Generation(generation),
        now_ms: 1000 * id,
    })
}

fn commit(s: &mut State, id: u64, shards: Vec<ShardDigest>) -> Outcome {
    s.apply(Command::CommitCheckpoint {
        job: name("a"),
        id: CheckpointId(id),
        shards,
        now_ms: 1000 * id + 250,
    })
}

fn restore(s: &mut State, generation: u64, from: Option<u64>) -> Outcome {
    s.apply(Command::Restore {
        job: name("a"),
        generation: Generation(generation),
        from: from.map(CheckpointId),
        reason: RestoreReason::WorkerRestarted,
        detail: None,
        now_ms: 99,
        takeovers: Vec::new(),
    })
}

fn job(s: &State) -> &Job {
    &s.jobs[&name("a")]
}

fn kind(o: Outcome) -> RefusalKind {
    o.unwrap_err().kind
}

#[test]
fn submit_is_idempotent_and_refuses_a_different_spec() {
    let mut s = State::default();
    assert_eq!(
        s.apply(Command::SubmitJob { spec: spec("a", 2, 3, 10), now_ms: 5, origin: None }),
        Ok(vec![Event::JobSubmitted { job: name("a") }])
    );
    assert_eq!(job(&s).generation, Generation(1));
    assert_eq!(job(&s).state, JobState::Waiting);
    assert_eq!(
        s.apply(Command::SubmitJob { spec: spec("a", 2, 3, 10), now_ms: 6, origin: None }),
        Ok(vec![Event::JobAlreadySubmitted { job: name("a") }])
    );
    let err = s.apply(Command::SubmitJob { spec: spec("a", 4, 3, 10), now_ms: 7, origin: None }).unwrap_err();
    assert_eq!(err.kind, RefusalKind::Conflict);
    assert!(err.message.contains("different spec"), "{err}");
    assert_eq!(job(&s).submitted_ms, 5);
    let mut bad = spec("b", 2, 3, 10);
    bad.world_size = 0;
    assert_eq!(
        kind(s.apply(Command::SubmitJob { spec: bad, now_ms: 1, origin: None })),
        RefusalKind::Invalid
    );
}

#[test]
fn unknown_job_is_not_found() {
    let mut s = State::default();
    let err = s
        .apply(Command::StartJob { job: name("x"), generation: Generation(1), holders: Default::default() })
        .unwrap_err();
    assert_eq!(err.kind, RefusalKind::NotFound);
    assert!(err.message.contains("no job named x"));
}

#[test]
fn checkpoint_commit_and_its_refusals() {
    let mut s = running(3, 10);
    // not the next id, then fine
    assert_eq!(kind(begin(&mut s, 2, 10, 1)), RefusalKind::Conflict);
    assert_eq!(
        begin(&mut s, 1, 10, 1),
        Ok(vec![Event::CheckpointBegun { job: name("a"), id: CheckpointId(1), step: Step(10) }])
    );
    // one in flight at a time
    assert_eq!(kind(begin(&mut s, 2, 20, 1)), RefusalKind::Conflict);
    // commit of an unknown checkpoint
    assert_eq!(kind(commit(&mut s, 9, shards(2))), RefusalKind::NotFound);
    // a shard missing
    let err = commit(&mut s, 1, vec![shard(1)]).unwrap_err();
    assert_eq!(err.kind, RefusalKind::Invalid);
    assert!(err.message.contains("missing ranks [0]"), "{err}");
    // a rank twice
    assert_eq!(kind(commit(&mut s, 1, vec![shard(1), shard(1)])), RefusalKind::Invalid);
    assert_eq!(job(&s).checkpoints[&CheckpointId(1)].state, CheckpointState::Pending);
    assert_eq!(
        commit(&mut s, 1, shards(2)),
        Ok(vec![Event::CheckpointCommitted {
            job: name("a"),
            id: CheckpointId(1),
            step: Step(10),
            duration_ms: 250
        }])
    );
    let c = &job(&s).checkpoints[&CheckpointId(1)];
    assert_eq!(c.state, CheckpointState::Committed);
    assert_eq!(c.shards.iter().map(|s| s.rank).collect::<Vec<_>>(), vec![Rank(0), Rank(1)]);
    assert_eq!(c.bytes(), 200);
    // what workers report is summed without overflowing (regression,
    // fuzz_ledger: status panicked in a debug build)
    let mut huge = c.clone();
    huge.shards[0].bytes = u64::MAX;
    assert_eq!(huge.bytes(), u64::MAX);
    assert_eq!(job(&s).latest_committed().unwrap().id, CheckpointId(1));
    // a committed checkpoint is never un-committed
    assert_eq!(kind(commit(&mut s, 1, shards(2))), RefusalKind::Conflict);
    let abort = Command::AbortCheckpoint {
        job: name("a"),
        id: CheckpointId(1),
        reason: AbortReason::JobEnded,
        now_ms: 0,
    };
    assert_eq!(kind(s.apply(abort)), RefusalKind::Conflict);
    assert_eq!(
        kind(s.apply(Command::DeleteCheckpoint { job: name("a"), id: CheckpointId(1) })),
        RefusalKind::Conflict
    );
    assert_eq!(job(&s).checkpoints[&CheckpointId(1)].state, CheckpointState::Committed);
    // the next step must be ahead of the committed one
    assert_eq!(kind(begin(&mut s, 2, 10, 1)), RefusalKind::Invalid);
    // wrong generation is fenced
    assert_eq!(kind(begin(&mut s, 2, 20, 2)), RefusalKind::Fenced);
}

#[test]
fn aborted_checkpoint_cannot_be_committed() {
    let mut s = running(3, 10);
    begin(&mut s, 1, 10, 1).unwrap();
    let abort = Command::AbortCheckpoint {
        job: name("a"),
        id: CheckpointId(1),
        reason: AbortReason::Timeout { seconds: 5 },
        now_ms: 7,
    };
    assert_eq!(
        s.apply(abort.clone()),
        Ok(vec![Event::CheckpointAborted {
            job: name("a"),
            id: CheckpointId(1),
            reason: "not committed within checkpoint.timeout_seconds = 5".into()
        }])
    );
    assert_eq!(kind(s.apply(abort)), RefusalKind::Conflict);
    assert_eq!(job(&s).aborted_total, 1, "a refused abort counts nothing");
    let err = commit(&mut s, 1, shards(2)).unwrap_err();
    assert!(err.message.contains("is aborted"), "{err}");
    assert!(job(&s).latest_committed().is_none());
    // an aborted checkpoint can be collected
    assert_eq!(
        s.apply(Command::DeleteCheckpoint { job: name("a"), id: CheckpointId(1) }),
        Ok(vec![Event::CheckpointDeleted { job: name("a"), id: CheckpointId(1) }])
    );
    // and the id is not reused
    assert_eq!(kind(begin(&mut s, 1, 20, 1)), RefusalKind::Conflict);
    begin(&mut s, 2, 20, 1).unwrap();
}

#[test]
fn a_condemned_checkpoint_cleared_after_an_operator_went_back_before_it_stays_abandoned() {
    // found by fuzz_ledger: it came back as the latest committed, and
    // checkpoints at or below its step were refused
    let mut s = running(5, 10);
    for (id, step) in [(1, 10), (2, 20)] {
        begin(&mut s, id, step, 1).unwrap();
        commit(&mut s, id, shards(2)).unwrap();
    }
    let condemn =
        Command::MarkCorrupt { job: name("a"), id: CheckpointId(2), reason: "bad".into(), now_ms: 5 };
    s.apply(condemn).unwrap();
    s.apply(Command::OperatorRestore {
        job: name("a"),
        generation: Generation(2),
        from: Some(CheckpointId(1)),
        now_ms: 6,
    })
    .unwrap();
    s.apply(Command::ResumeJob { job: name("a"), generation: Generation(2), holders: Default::default() })
        .unwrap();
    s.apply(Command::ClearCorrupt { job: name("a"), id: CheckpointId(2), now_ms: 7 }).unwrap();
    assert_eq!(job(&s).checkpoints[&CheckpointId(2)].state, CheckpointState::Abandoned);
    assert_eq!(job(&s).latest_committed().unwrap().id, CheckpointId(1));
    begin(&mut s, 3, 15, 2).unwrap();
    // after an automatic fallback (no operator), a cleared one is committed again
    let mut s = running(5, 10);
    for (id, step) in [(1, 10), (2, 20)] {
        begin(&mut s, id, step, 1).unwrap();
        commit(&mut s, id, shards(2)).unwrap();
    }
    s.apply(Command::MarkCorrupt { job: name("a"), id: CheckpointId(2), reason: "bad".into(), now_ms: 5 })
        .unwrap();
    s.apply(Command::ClearCorrupt { job: name("a"), id: CheckpointId(2), now_ms: 7 }).unwrap();
    assert_eq!(job(&s).checkpoints[&CheckpointId(2)].state, CheckpointState::Committed);
}

#[test]
fn pruning_keeps_the_checkpoint_a_generation_started_from() {
    // found by fuzz_ledger: the restore point was pruned, and the
    // generation's start step fell from 10 to 0 mid-generation
    let mut s = running(2, 10);
    begin(&mut s, 1, 10, 1).unwrap();
    commit(&mut s, 1, shards(2)).unwrap();
    restore(&mut s, 2, Some(1)).unwrap();
    s.apply(Command::ResumeJob { job: name("a"), generation: Generation(2), holders: Default::default() })
        .unwrap();
    for id in 2..=40u64 {
        begin(&mut s, id, 10 * id, 2).unwrap();
        commit(&mut s, id, shards(2)).unwrap();
    }
    let j = job(&s);
    assert!(j.pruned_total > 0);
    assert_eq!(j.start_step(), Step(10));
    let c = &j.checkpoints[&CheckpointId(1)];
    assert_eq!((c.state, c.shards.len()), (CheckpointState::Deleted, 2));
}

#[test]
fn the_ledger_stays_bounded_deleted_checkpoints_become_tombstones_then_are_forgotten() {
    let mut s = running(3, 10);
    let size = |s: &State| rmp_serde::to_vec_named(s).unwrap().len();
    let mut sizes = Vec::new();
    for id in 1..=400u64 {
        begin(&mut s, id, 10 * id, 1).unwrap();
        if id % 4 == 0 {
            let abort = Command::AbortCheckpoint {
                job: name("a"),
                id: CheckpointId(id),
                reason: AbortReason::Timeout { seconds: 5 },
                now_ms: 7,
            };
            s.apply(abort).unwrap();
        } else {
            commit(&mut s, id, shards(2)).unwrap();
        }
        if id == 100 || id == 400 {
            sizes.push(size(&s));
        }
    }
    let j = job(&s);
    let states = |st: CheckpointState| j.checkpoints.values().filter(|c| c.state == st).count();
    assert_eq!(states(CheckpointState::Committed), 3, "keep_last");
    assert_eq!(states(CheckpointState::Aborted) + states(CheckpointState::Deleted), TOMBSTONES);
    assert_eq!(j.checkpoints.len(), 3 + TOMBSTONES);
    assert_eq!(j.pruned_total, 400 - 3 - TOMBSTONES as u64);
    assert!(j
        .checkpoints
        .values()
        .filter(|c| c.state == CheckpointState::Deleted)
        .all(|c| c.shards.is_empty()));
    assert_eq!(j.latest_committed().unwrap().id, CheckpointId(399));
    // 4× the checkpoints, the same size but for wider integers
    assert!(
        sizes[1] < sizes[0] + sizes[0] / 10,
        "a snapshot of the ledger grows with the job's age: {sizes:?}"
    );
    // a forgotten id is neither known nor reused
    assert_eq!(kind(commit(&mut s, 5, shards(2))), RefusalKind::NotFound);
    assert_eq!(kind(begin(&mut s, 5, 5000, 1)), RefusalKind::Conflict);
}

#[test]
fn retention_keeps_the_newest_committed() {
    let mut s = running(2, 10);
    for id in 1..=2 {
        begin(&mut s, id, 10 * id, 1).unwrap();
        commit(&mut s, id, shards(2)).unwrap();
    }
    begin(&mut s, 3, 30, 1).unwrap();
    let events = commit(&mut s, 3, shards(2)).unwrap();
    assert_eq!(events[1], Event::CheckpointDeleted { job: name("a"), id: CheckpointId(1) });
    assert_eq!(events.len(), 2);
    let states: Vec<_> = job(&s).checkpoints.values().map(|c| c.state).collect();
    assert_eq!(
        states,
        vec![CheckpointState::Deleted, CheckpointState::Committed, CheckpointState::Committed]
    );
}

#[test]
fn corrupt_checkpoint_falls_back_to_the_previous() {
    let mut s = running(3, 10);
    for id in 1..=2 {
        begin(&mut s, id, 10 * id, 1).unwrap();
        commit(&mut s, id, shards(2)).unwrap();
    }
    let mark =
        Command::MarkCorrupt { job: name("a"), id: CheckpointId(2), reason: "checksum".into(), now_ms: 5 };
    assert_eq!(
        s.apply(mark.clone()),
        Ok(vec![Event::CheckpointCorrupt { job: name("a"), id: CheckpointId(2) }])
    );
    assert_eq!(s.apply(mark), Ok(vec![]));
    assert_eq!(job(&s).latest_committed().unwrap().id, CheckpointId(1));
    assert_eq!(job(&s).committed_before(CheckpointId(1)), None);
    // restore from the corrupt one is refused, from the previous is fine
    assert_eq!(kind(restore(&mut s, 2, Some(2))), RefusalKind::Conflict);
    restore(&mut s, 2, Some(1)).unwrap();
    assert_eq!(job(&s).restored_from, Some(CheckpointId(1)));
    // a pending checkpoint cannot be marked corrupt
    let mut s = running(3, 10);
    begin(&mut s, 1, 10, 1).unwrap();
    let mark = Command::MarkCorrupt { job: name("a"), id: CheckpointId(1), reason: "x".into(), now_ms: 5 };
    assert_eq!(kind(s.apply(mark)), RefusalKind::Conflict);
}

#[test]
fn every_checkpoint_condemned_is_an_event_and_a_count_not_a_quiet_step_0() {
    let mut s = running(3, 10);
    begin(&mut s, 1, 10, 1).unwrap();
    commit(&mut s, 1, shards(2)).unwrap();
    let mark =
        Command::MarkCorrupt { job: name("a"), id: CheckpointId(1), reason: "checksum".into(), now_ms: 5 };
    s.apply(mark).unwrap();
    assert_eq!(job(&s).latest_committed(), None);
    let back = |s: &mut State, generation: u64, reason: RestoreReason| {
        s.apply(Command::Restore {
            job: name("a"),
            generation: Generation(generation),
            from: None,
            reason,
            detail: None,
            now_ms: 9,
            takeovers: Vec::new(),
        })
    };
    back(&mut s, 2, RestoreReason::CorruptCheckpoint).unwrap();
    let last = job(&s).events.last().unwrap();
    assert_eq!(last.kind, Some(JobEventKind::EveryCheckpointCondemned { condemned: 1, step: Step(0) }));
    assert!(last.text.starts_with("every committed checkpoint was condemned"), "{}", last.text);
    assert_eq!(job(&s).every_condemned_total, 1);
    // a restore from step 0 for any other reason (nothing taken yet) is not that
    back(&mut s, 3, RestoreReason::WorkerRestarted).unwrap();
    assert_eq!(job(&s).every_condemned_total, 1);
    assert!(matches!(job(&s).events.last().unwrap().kind, Some(JobEventKind::Restore { .. })));
}

#[test]
fn restore_moves_the_generation_by_one_and_aborts_pending() {
    let mut s = running(3, 10);
    begin(&mut s, 1, 10, 1).unwrap();
    commit(&mut s, 1, shards(2)).unwrap();
    begin(&mut s, 2, 20, 1).unwrap();
    // generation must be exactly G+1: never back, never skipping
    assert_eq!(kind(restore(&mut s, 1, Some(1))), RefusalKind::Fenced);
    assert_eq!(kind(restore(&mut s, 3, Some(1))), RefusalKind::Fenced);
    assert_eq!(kind(restore(&mut s, 2, Some(9))), RefusalKind::NotFound);
    assert_eq!(
        restore(&mut s, 2, Some(1)),
        Ok(vec![
            Event::CheckpointAborted {
                job: name("a"),
                id: CheckpointId(2),
                reason: "generation changed by a restore".into()
            },
            Event::Restoring {
                job: name("a"),
                generation: Generation(2),
                from: Some(CheckpointId(1)),
                reason: RestoreReason::WorkerRestarted
            },
            Event::JobState { job: name("a"), state: JobState::Restoring },
        ])
    );
    assert_eq!(job(&s).generation, Generation(2));
    assert_eq!(job(&s).restores, 1);
    assert_eq!(job(&s).restores_by_reason[&RestoreReason::WorkerRestarted], 1);
    assert_eq!(job(&s).aborted_total, 1, "the pending checkpoint was aborted");
    // the old generation's shards cannot commit anything now
    assert_eq!(kind(commit(&mut s, 2, shards(2))), RefusalKind::Conflict);
    // and old-generation commands are fenced
    assert_eq!(
        kind(s.apply(Command::ResumeJob {
            job: name("a"),
            generation: Generation(1),
            holders: Default::default()
        })),
        RefusalKind::Fenced
    );
    // blocked, then resumed
    let block = Command::BlockJob {
        job: name("a"),
        generation: Generation(2),
        error: "rank 1: needs 2 GiB".into(),
        rank: Some(Rank(1)),
        kind: Some(RestoreFailureKind::DeviceMemory),
        now_ms: 77,
    };
    s.apply(block.clone()).unwrap();
    assert_eq!(job(&s).state, JobState::Blocked);
    assert_eq!(job(&s).error.as_deref(), Some("rank 1: needs 2 GiB"));
    // the block is one of the job's events, once however often it is retried
    s.apply(block).unwrap();
    let blocks: Vec<_> = job(&s).events.iter().filter(|e| e.text.starts_with("blocked: ")).collect();
    assert_eq!(blocks.len(), 1, "{:?}", job(&s).events);
    assert_eq!((blocks[0].at_ms, blocks[0].text.as_str()), (77, "blocked: rank 1: needs 2 GiB"));
    let reason = job(&s).block_reason().expect("blocked");
    assert_eq!((reason.rank, reason.kind), (Some(Rank(1)), Some(RestoreFailureKind::DeviceMemory)));
    assert_eq!(blocks[0].kind, Some(JobEventKind::Blocked(reason)));
    s.apply(Command::ResumeJob { job: name("a"), generation: Generation(2), holders: Default::default() })
        .unwrap();
    assert_eq!(job(&s).state, JobState::Running);
    assert_eq!(job(&s).error, None);
    assert_eq!((job(&s).blocked.as_ref(), job(&s).block_reason()), (None, None));
}

#[test]
fn too_many_restores_fail_the_job() {
    let mut s = running(3, 1);
    restore(&mut s, 2, None).unwrap();
    assert_eq!(job(&s).state, JobState::Restoring);
    let events = restore(&mut s, 3, None).unwrap();
    assert_eq!(events, vec![Event::JobState { job: name("a"), state: JobState::Failed }]);
    assert!(job(&s).error.as_ref().unwrap().contains("exceed failure.max_restarts = 1"));
    // terminal: nothing moves any more
    assert_eq!(kind(restore(&mut s, 4, None)), RefusalKind::Conflict);
    assert_eq!(kind(begin(&mut s, 1, 10, 3)), RefusalKind::Conflict);
}

#[test]
fn finish_records_the_digest_and_is_terminal() {
    let mut s = running(3, 10);
    begin(&mut s, 1, 10, 1).unwrap();
    let finish = Command::FinishJob {
        job: name("a"),
        generation: Generation(1),
        digest: "ab12".into(),
        step: Some(Step(7)),
    };
    let events = s.apply(finish.clone()).unwrap();
    assert_eq!(events.last(), Some(&Event::JobState { job: name("a"), state: JobState::Succeeded }));
    assert_eq!(job(&s).final_digest.as_deref(), Some("ab12"));
    assert_eq!(job(&s).final_step, Some(Step(7)), "the step it finished at, for status");
    assert_eq!(job(&s).checkpoints[&CheckpointId(1)].state, CheckpointState::Aborted);
    assert_eq!(kind(s.apply(finish)), RefusalKind::Conflict);
    let fail = Command::FailJob { job: name("a"), error: "x".into() };
    assert_eq!(kind(s.apply(fail)), RefusalKind::Conflict);
}

#[test]
fn replicas_applying_the_same_log_agree_and_snapshots_round_trip() {
    let log = vec![
        Command::Announce {
            node: NodeId(2),
            info: NodeInfo { http_url: "http://127.0.0.1:9202".into(), api_addr: None },
        },
        Command::SubmitJob { spec: spec("a", 2, 2, 10), now_ms: 1, origin: None },
        Command::StartJob { job: name("a"), generation: Generation(1), holders: Default::default() },
        Command::BeginCheckpoint {
            job: name("a"),
            id: CheckpointId(1),
            step: Step(10),
            generation: Generation(1),
            now_ms: 2,
        },
        Command::CommitCheckpoint { job: name("a"), id: CheckpointId(1), shards: shards(2), now_ms: 3 },
        // a refused command changes nothing, on every replica alike
        Command::CommitCheckpoint { job: name("a"), id: CheckpointId(1), shards: shards(2), now_ms: 4 },
        Command::Restore {
            job: name("a"),
            generation: Generation(2),
            from: Some(CheckpointId(1)),
            reason: RestoreReason::HeartbeatTimeout,
            detail: None,
            now_ms: 5,
            takeovers: Vec::new(),
        },
    ];
    let (mut a, mut b) = (State::default(), State::default());
    let outcomes_a: Vec<Outcome> = log.iter().cloned().map(|c| a.apply(c)).collect();
    let outcomes_b: Vec<Outcome> = log.into_iter().map(|c| b.apply(c)).collect();
    assert_eq!(a, b);
    assert_eq!(outcomes_a, outcomes_b);
    assert_eq!(a.nodes[&NodeId(2)].http_url, "http://127.0.0.1:9202");
    let bytes = rmp_serde::to_vec_named(&a).unwrap();
    assert_eq!(rmp_serde::from_slice::<State>(&bytes).unwrap(), a);
}

#[test]
fn an_operator_restore_makes_its_checkpoint_the_head_and_revives_a_failed_job() {
    let mut s = running(5, 1);
    for id in 1..=3 {
        begin(&mut s, id, 10 * id, 1).unwrap();
        commit(&mut s, id, shards(2)).unwrap();
    }
    let operator = |s: &mut State, generation, from| {
        s.apply(Command::Restore {
            job: name("a"),
            generation: Generation(generation),
            from: Some(CheckpointId(from)),
            reason: RestoreReason::Operator,
            detail: None,
            now_ms: 50,
            takeovers: Vec::new(),
        })
    };
    operator(&mut s, 2, 1).unwrap();
    let j = job(&s);
    assert_eq!(j.checkpoints[&CheckpointId(2)].state, CheckpointState::Abandoned);
    assert_eq!(j.checkpoints[&CheckpointId(3)].state, CheckpointState::Abandoned);
    assert_eq!(j.latest_committed().map(|c| c.id), Some(CheckpointId(1)), "never restored automatically");
    assert!(j.failures_ms.is_empty(), "an operator's restore is not a failure");
    assert!(j.events.last().unwrap().text.contains("from checkpoint 1 (step 10): operator"));
    // new checkpoints go after the head, even where the abandoned line was
    s.apply(Command::ResumeJob { job: name("a"), generation: Generation(2), holders: Default::default() })
        .unwrap();
    begin(&mut s, 4, 20, 2).unwrap();
    // failures: two within the hour exceed max_restarts = 1 and fail the job
    restore(&mut s, 3, Some(1)).unwrap();
    restore(&mut s, 4, Some(1)).unwrap();
    assert_eq!(job(&s).state, JobState::Failed);
    // only an operator brings a failed job back; the failure budget restarts
    assert_eq!(kind(restore(&mut s, 5, Some(1))), RefusalKind::Conflict);
    operator(&mut s, 5, 3).unwrap();
    let j = job(&s);
    assert_eq!((j.state, j.error.as_deref()), (JobState::Restoring, None));
    assert_eq!(j.checkpoints[&CheckpointId(3)].state, CheckpointState::Committed, "picked again by name");
}

#[test]
fn failures_older_than_the_window_do_not_count() {
    let mut s = running(3, 1);
    let at = |s: &mut State, generation, now_ms| {
        s.apply(Command::Restore {
            job: name("a"),
            generation: Generation(generation),
            from: None,
            reason: RestoreReason::HeartbeatTimeout,
            detail: None,
            now_ms,
            takeovers: Vec::new(),
        })
    };
    at(&mut s, 2, 1_000).unwrap();
    at(&mut s, 3, 1_000 + RESTART_WINDOW_MS).unwrap();
    assert_eq!(job(&s).state, JobState::Restoring);
    // fallbacks past a corrupt checkpoint and retries are not failures either
    for (g, reason) in [(4, RestoreReason::CorruptCheckpoint), (5, RestoreReason::Retry)] {
        s.apply(Command::Restore {
            job: name("a"),
            generation: Generation(g),
            from: None,
            reason,
            detail: None,
            now_ms: 2,
            takeovers: Vec::new(),
        })
        .unwrap();
    }
    assert_eq!(job(&s).state, JobState::Restoring);
}

#[test]
fn a_corrupt_verdict_can_be_cleared_and_retention_collects_condemned_ones() {
    let mut s = running(1, 10);
    begin(&mut s, 1, 10, 1).unwrap();
    commit(&mut s, 1, shards(2)).unwrap();
    let mark = Command::MarkCorrupt { job: name("a"), id: CheckpointId(1), reason: "bad".into(), now_ms: 3 };
    s.apply(mark.clone()).unwrap();
    let clear = Command::ClearCorrupt { job: name("a"), id: CheckpointId(1), now_ms: 4 };
    assert_eq!(
        s.apply(clear.clone()),
        Ok(vec![Event::CheckpointCleared { job: name("a"), id: CheckpointId(1) }])
    );
    assert_eq!(job(&s).latest_committed().map(|c| c.id), Some(CheckpointId(1)));
    assert_eq!(kind(s.apply(clear)), RefusalKind::Conflict, "only a corrupt one is cleared");
    s.apply(mark).unwrap();
    // keep_last = 1: the condemned one goes once a newer one is committed
    begin(&mut s, 2, 20, 1).unwrap();
    let events = commit(&mut s, 2, shards(2)).unwrap();
    assert!(events.contains(&Event::CheckpointDeleted { job: name("a"), id: CheckpointId(1) }));
}

#[test]
fn an_operator_restore_of_the_latest_resolves_it_when_applied() {
    let mut s = running(5, 10);
    let latest = |s: &mut State, generation| {
        s.apply(Command::OperatorRestore {
            job: name("a"),
            generation: Generation(generation),
            from: None,
            now_ms: 9,
        })
    };
    assert_eq!(kind(latest(&mut s, 2)), RefusalKind::Conflict, "nothing committed: refused at once");
    let missing = Command::OperatorRestore {
        job: name("a"),
        generation: Generation(2),
        from: Some(CheckpointId(42)),
        now_ms: 9,
    };
    assert_eq!(kind(s.apply(missing)), RefusalKind::NotFound);
    for id in 1..=2 {
        begin(&mut s, id, 10 * id, 1).unwrap();
        commit(&mut s, id, shards(2)).unwrap();
    }
    latest(&mut s, 2).unwrap();
    let j = job(&s);
    assert_eq!(j.restored_from, Some(CheckpointId(2)), "the latest when applied");
    assert!(j.checkpoints.values().all(|c| c.state == CheckpointState::Committed), "nothing abandoned");
}

#[test]
fn a_published_snapshot_never_changes_and_a_command_copies_only_the_job_it_changes() {
    let mut s = State::default();
    for job in ["a", "b"] {
        s.apply(Command::SubmitJob { spec: spec(job, 1, 3, 10), now_ms: 1, origin: None }).unwrap();
    }
    let snapshot = std::sync::Arc::new(s.clone());
    s.apply(Command::StartJob { job: name("a"), generation: Generation(1), holders: Default::default() })
        .unwrap();
    assert_eq!(snapshot.jobs[&name("a")].state, JobState::Waiting, "the reader's copy is as it was");
    assert_eq!(s.jobs[&name("a")].state, JobState::Running);
    assert!(!Arc::ptr_eq(&snapshot.jobs[&name("a")], &s.jobs[&name("a")]), "a was copied");
    assert!(Arc::ptr_eq(&snapshot.jobs[&name("b")], &s.jobs[&name("b")]), "b is shared, not copied");
}

fn cancel(s: &mut State, job: &str) -> Outcome {
    s.apply(Command::CancelJob { job: name(job), now_ms: 4242 })
}

fn delete_job(s: &mut State, job: &str, remove_checkpoints: bool) -> Outcome {
    s.apply(Command::DeleteJob { job: name(job), remove_checkpoints })
}

/// Job "a" (world 2) in each live state.
fn in_each_live_state() -> Vec<(JobState, State)> {
    let mut waiting = State::default();
    waiting.apply(Command::SubmitJob { spec: spec("a", 2, 3, 10), now_ms: 1, origin: None }).unwrap();
    let running = running(3, 10);
    let mut restoring = running.clone();
    restore(&mut restoring, 2, None).unwrap();
    let mut blocked = restoring.clone();
    blocked
        .apply(Command::BlockJob {
            job: name("a"),
            generation: Generation(2),
            error: "rank 1: no room".into(),
            rank: Some(Rank(1)),
            kind: None,
            now_ms: 5,
        })
        .unwrap();
    vec![
        (JobState::Waiting, waiting),
        (JobState::Running, running),
        (JobState::Restoring, restoring),
        (JobState::Blocked, blocked),
    ]
}

#[test]
fn every_live_state_cancels_and_cancelled_is_terminal() {
    assert!(JobState::Cancelled.is_terminal());
    assert_eq!(JobState::Cancelled.as_str(), "cancelled");
    assert!(JobState::ALL.contains(&JobState::Cancelled));
    for (was, mut s) in in_each_live_state() {
        assert_eq!(job(&s).state, was);
        let events = cancel(&mut s, "a").unwrap();
        assert_eq!(
            events,
            vec![Event::JobState { job: name("a"), state: JobState::Cancelled }],
            "from {was:?}"
        );
        assert_eq!(job(&s).state, JobState::Cancelled);
        assert_eq!(job(&s).error, None);
        let last = job(&s).events.last().unwrap();
        assert_eq!(
            (last.at_ms, last.kind.clone()),
            (4242, Some(JobEventKind::Cancelled { aborted: vec![] }))
        );
        // nothing moves it any more
        let g = job(&s).generation.0;
        assert_eq!(kind(cancel(&mut s, "a")), RefusalKind::Conflict, "cancelled twice");
        assert_eq!(kind(restore(&mut s, g + 1, None)), RefusalKind::Conflict);
        let operator =
            Command::OperatorRestore { job: name("a"), generation: Generation(g + 1), from: None, now_ms: 1 };
        assert!(matches!(kind(s.apply(operator)), RefusalKind::Conflict));
        assert_eq!(
            kind(s.apply(Command::StartJob {
                job: name("a"),
                generation: Generation(g),
                holders: Default::default()
            })),
            RefusalKind::Conflict
        );
        assert_eq!(kind(begin(&mut s, 1, 10, g)), RefusalKind::Conflict);
        let fail = Command::FailJob { job: name("a"), error: "x".into() };
        assert_eq!(kind(s.apply(fail)), RefusalKind::Conflict);
        assert_eq!(job(&s).state, JobState::Cancelled);
    }
}

#[test]
fn cancel_aborts_the_pending_checkpoint_and_keeps_the_committed() {
    let mut s = running(3, 10);
    begin(&mut s, 1, 10, 1).unwrap();
    commit(&mut s, 1, shards(2)).unwrap();
    begin(&mut s, 2, 20, 1).unwrap();
    let events = cancel(&mut s, "a").unwrap();
    assert_eq!(
        events,
        vec![
            Event::CheckpointAborted {
                job: name("a"),
                id: CheckpointId(2),
                reason: "job cancelled by an operator".into()
            },
            Event::JobState { job: name("a"), state: JobState::Cancelled },
        ]
    );
    let c = &job(&s).checkpoints[&CheckpointId(2)];
    assert_eq!((c.state, c.ended_ms), (CheckpointState::Aborted, Some(4242)));
    assert_eq!(job(&s).latest_committed().map(|c| c.id), Some(CheckpointId(1)));
    assert_eq!(job(&s).aborted_total, 1);
    let text = &job(&s).events.last().unwrap().text;
    assert_eq!(text, "cancelled by an operator (flotilla cancel); pending checkpoint 2 aborted");
}

#[test]
fn cancel_refuses_an_ended_job_and_names_no_such_job() {
    assert_eq!(kind(cancel(&mut State::default(), "a")), RefusalKind::NotFound);
    let mut s = running(3, 10);
    let finish =
        Command::FinishJob { job: name("a"), generation: Generation(1), digest: "ab".into(), step: None };
    s.apply(finish).unwrap();
    let refusal = cancel(&mut s, "a").unwrap_err();
    assert_eq!(refusal.kind, RefusalKind::Conflict);
    assert!(refusal.message.contains("already succeeded"), "{refusal}");
    let mut s = running(3, 10);
    s.apply(Command::FailJob { job: name("a"), error: "x".into() }).unwrap();
    assert_eq!(kind(cancel(&mut s, "a")), RefusalKind::Conflict);
}

#[test]
fn delete_is_refused_for_a_live_job_and_no_such_job() {
    assert_eq!(kind(delete_job(&mut State::default(), "a", false)), RefusalKind::NotFound);
    for (was, mut s) in in_each_live_state() {
        let before = s.clone();
        let refusal = delete_job(&mut s, "a", true).unwrap_err();
        assert_eq!(refusal.kind, RefusalKind::Conflict, "{was:?}");
        assert!(
            refusal.message.contains(&format!("is {}", was.as_str()))
                && refusal.message.contains("cancel it first (flotilla cancel --job a)"),
            "{refusal}"
        );
        assert_eq!(s, before, "a refused delete changes nothing");
    }
}

#[test]
fn every_ended_job_is_deleted_and_its_name_is_free_again() {
    type End = fn(&mut State);
    let ends: [(&str, End); 3] = [
        ("cancelled", |s| {
            cancel(s, "a").unwrap();
        }),
        ("failed", |s| {
            s.apply(Command::FailJob { job: name("a"), error: "x".into() }).unwrap();
        }),
        ("succeeded", |s| {
            let finish = Command::FinishJob {
                job: name("a"),
                generation: Generation(2),
                digest: "ab".into(),
                step: None,
            };
            s.apply(finish).unwrap();
        }),
    ];
    for (what, end) in ends {
        let mut s = running(3, 10);
        begin(&mut s, 1, 10, 1).unwrap();
        commit(&mut s, 1, shards(2)).unwrap();
        restore(&mut s, 2, Some(1)).unwrap();
        s.apply(Command::ResumeJob {
            job: name("a"),
            generation: Generation(2),
            holders: Default::default(),
        })
        .unwrap();
        end(&mut s);
        assert_eq!(job(&s).state.as_str(), what);
        let events = delete_job(&mut s, "a", true).unwrap();
        assert_eq!(
            events,
            vec![Event::JobDeleted { job: name("a"), remove_checkpoints: true, root: "/ckpt".into() }],
            "{what}"
        );
        assert!(s.jobs.is_empty());
        assert_eq!(kind(delete_job(&mut s, "a", false)), RefusalKind::NotFound, "deleted twice");
        // the same name again is a fresh job: generation 1, no checkpoints
        let events =
            s.apply(Command::SubmitJob { spec: spec("a", 2, 3, 10), now_ms: 77, origin: None }).unwrap();
        assert_eq!(events, vec![Event::JobSubmitted { job: name("a") }]);
        let j = job(&s);
        assert_eq!((j.state, j.generation, j.restores), (JobState::Waiting, Generation(1), 0));
        assert!(j.checkpoints.is_empty() && j.latest_committed().is_none());
        assert_eq!((j.next_checkpoint, j.submitted_ms, j.committed_total), (CheckpointId(1), 77, 0));
        assert!(j.events.is_empty(), "{:?}", j.events);
    }
}

#[test]
fn delete_without_removing_checkpoints_keeps_another_jobs_origin_usable() {
    let mut s = running(3, 10);
    begin(&mut s, 1, 10, 1).unwrap();
    commit(&mut s, 1, shards(2)).unwrap();
    cancel(&mut s, "a").unwrap();
    let mut b = spec("b", 2, 3, 10);
    b.checkpoint.resume_from = Some("/ckpt/a/ckpt-00000001".into());
    let origin = Origin {
        job: name("a"),
        id: CheckpointId(1),
        step: Step(10),
        dir: "/ckpt/a/ckpt-00000001".into(),
        shards: shards(2),
    };
    s.apply(Command::SubmitJob { spec: b, now_ms: 5, origin: Some(Box::new(origin)) }).unwrap();
    // job b may still restore from a's files: they stay
    let refusal = delete_job(&mut s, "a", true).unwrap_err();
    assert_eq!(refusal.kind, RefusalKind::Conflict);
    assert!(refusal.message.contains("job b is waiting"), "{refusal}");
    let events = delete_job(&mut s, "a", false).unwrap();
    assert_eq!(
        events,
        vec![Event::JobDeleted { job: name("a"), remove_checkpoints: false, root: "/ckpt".into() }]
    );
    assert!(s.jobs.contains_key(&name("b")) && !s.jobs.contains_key(&name("a")));
}

#[test]
fn a_job_resumed_from_its_deleted_namesakes_files_numbers_its_checkpoints_after_them() {
    let mut s = running(3, 10);
    for (id, step) in [(1, 10), (2, 20)] {
        begin(&mut s, id, step, 1).unwrap();
        commit(&mut s, id, shards(2)).unwrap();
    }
    cancel(&mut s, "a").unwrap();
    delete_job(&mut s, "a", false).unwrap();
    let mut again = spec("a", 2, 3, 10);
    again.checkpoint.resume_from = Some("/ckpt/a".into());
    let origin = Origin {
        job: name("a"),
        id: CheckpointId(2),
        step: Step(20),
        dir: "/ckpt/a/ckpt-00000002".into(),
        shards: shards(2),
    };
    s.apply(Command::SubmitJob { spec: again, now_ms: 9, origin: Some(Box::new(origin)) }).unwrap();
    let j = job(&s);
    assert_eq!((j.generation, j.start_step(), j.next_checkpoint), (Generation(1), Step(20), CheckpointId(3)));
    assert!(j.checkpoints.is_empty());
}

#[test]
fn the_rank_worker_mapping_follows_starts_takeovers_and_resumes() {
    use flotilla_shared::ids::Incarnation;
    let mut s = State::default();
    s.apply(Command::SubmitJob { spec: spec("a", 2, 3, 10), now_ms: 1, origin: None }).unwrap();
    let started = BTreeMap::from([(Rank(0), Incarnation(10)), (Rank(1), Incarnation(11))]);
    s.apply(Command::StartJob { job: name("a"), generation: Generation(1), holders: started.clone() })
        .unwrap();
    assert_eq!(job(&s).holders, started);
    // rank 1's worker is lost: a spare takes it with the generation change;
    // the rest of generation 2's mapping is not known until it trains
    let takeover = Takeover { rank: Rank(1), worker: Incarnation(20) };
    s.apply(Command::Restore {
        job: name("a"),
        generation: Generation(2),
        from: None,
        reason: RestoreReason::Disconnected,
        detail: Some("rank 1".into()),
        now_ms: 5,
        takeovers: vec![takeover],
    })
    .unwrap();
    assert_eq!(job(&s).holders, BTreeMap::from([(Rank(1), Incarnation(20))]));
    let event = job(&s).events.last().unwrap();
    assert!(
        matches!(&event.kind, Some(JobEventKind::Restore { takeovers, .. }) if takeovers == &vec![takeover])
    );
    assert!(event.text.ends_with("; rank 1 taken over by spare worker 20"), "{}", event.text);
    let resumed = BTreeMap::from([(Rank(0), Incarnation(10)), (Rank(1), Incarnation(20))]);
    s.apply(Command::ResumeJob { job: name("a"), generation: Generation(2), holders: resumed.clone() })
        .unwrap();
    assert_eq!(job(&s).holders, resumed);
    // a command of a build before spares (no mapping) decodes and applies
    let old =
        rmp_serde::to_vec_named(&serde_json::json!({"ResumeJob": {"job": "a", "generation": 2}})).unwrap();
    let cmd: Command = rmp_serde::from_slice(&old).unwrap();
    assert!(matches!(cmd, Command::ResumeJob { ref holders, .. } if holders.is_empty()));
}
