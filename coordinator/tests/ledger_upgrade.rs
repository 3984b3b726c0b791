//! A rolling upgrade: a replica running today's code applies a log and a
//! snapshot written by the build before typed block reasons and event kinds
//! (commit 2e9f237; `fixtures/ledger-2e9f237/generate.rs` wrote them), and
//! reaches the state that build reached, word for word.

use flotilla_coordinator::ledger::{Command, JobEventKind, JobState, State};
use flotilla_coordinator::raft::node::{decode_command, encode_command};
use flotilla_shared::ids::{JobName, Rank};
use flotilla_shared::wire::RestoreFailureKind;
use std::path::PathBuf;

fn fixture(file: &str) -> Vec<u8> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ledger-2e9f237");
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn entries() -> Vec<Command> {
    let raw: Vec<serde_bytes::ByteBuf> = rmp_serde::from_slice(&fixture("entries.msgpack")).unwrap();
    raw.iter().map(|e| decode_command(e).expect("an old entry decodes")).collect()
}

fn snapshot_at() -> usize {
    String::from_utf8(fixture("snapshot_at")).unwrap().trim().parse().unwrap()
}

/// `state` without what only today's code records (event kinds, typed
/// block reasons, the every-condemned count), to compare with the old
/// build's state.
fn as_old(mut state: State) -> State {
    for j in state.jobs.values_mut() {
        let j = std::sync::Arc::make_mut(j);
        j.blocked = None;
        j.every_condemned_total = 0;
        j.events.retain(|e| !matches!(e.kind, Some(JobEventKind::EveryCheckpointCondemned { .. })));
        for e in &mut j.events {
            e.kind = None;
        }
    }
    state
}

fn name(s: &str) -> JobName {
    JobName::new(s).unwrap()
}

#[test]
fn the_old_log_from_the_old_snapshot_reaches_the_old_state() {
    let old_final: State = rmp_serde::from_slice(&fixture("state.msgpack")).expect("the old state decodes");
    let mut state: State =
        rmp_serde::from_slice(&fixture("snapshot.msgpack")).expect("the old snapshot decodes");
    let entries = entries();
    for (i, cmd) in entries.iter().enumerate().skip(snapshot_at()) {
        state.apply(cmd.clone()).unwrap_or_else(|r| panic!("entry {i} refused: {r}"));
    }
    assert_eq!(as_old(state.clone()), old_final);
    // and from the start of the log: the same (the events before the
    // snapshot have kinds there, being applied by today's code)
    let mut fresh = State::default();
    for cmd in entries {
        fresh.apply(cmd).unwrap();
    }
    assert_eq!(as_old(fresh), as_old(state.clone()));
    // the new state survives its own snapshot round trip
    let bytes = rmp_serde::to_vec_named(&state).unwrap();
    assert_eq!(rmp_serde::from_slice::<State>(&bytes).unwrap(), state);
}

#[test]
fn an_old_block_reads_as_a_reason_without_rank_and_an_old_event_keeps_its_words() {
    let old: State = rmp_serde::from_slice(&fixture("state.msgpack")).unwrap();
    let a = &old.jobs[&name("a")];
    assert_eq!(a.state, JobState::Blocked);
    let reason = a.block_reason().expect("a blocked job has a reason");
    assert_eq!((reason.rank, reason.kind), (None, None));
    assert_eq!(reason.detail, "rank 1 on GPU 0: restore needs 2.0 GiB, 1.0 GiB free");
    let texts: Vec<&str> = a.events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts.iter().filter(|t| t.starts_with("blocked: ")).count(), 1, "{texts:#?}");
    assert!(a.events.iter().all(|e| e.kind.is_none()));
    // today's code writes the same words from the kinds
    let mut state = State::default();
    for cmd in entries() {
        state.apply(cmd).unwrap();
    }
    let new_texts: Vec<&str> = state.jobs[&name("a")].events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(new_texts, texts);
    // an old entry blocks without rank; a new one with it, the same words a new event
    let j = &state.jobs[&name("a")];
    assert_eq!(j.block_reason().map(|r| r.rank), Some(None));
    let block = Command::BlockJob {
        job: name("a"),
        generation: j.generation,
        error: reason.detail.clone(),
        rank: Some(Rank(1)),
        kind: Some(RestoreFailureKind::DeviceMemory),
        now_ms: 60_000,
    };
    // a new entry survives its encoding
    let block = decode_command(&encode_command(block)).unwrap();
    state.apply(block).unwrap();
    let j = &state.jobs[&name("a")];
    assert_eq!(j.block_reason().map(|r| r.rank), Some(Some(Rank(1))));
    assert!(matches!(
        &j.events.last().unwrap().kind,
        Some(JobEventKind::Blocked(r)) if r.kind == Some(RestoreFailureKind::DeviceMemory)
    ));
}

#[test]
fn every_checkpoint_condemned_in_an_old_log_is_loud_under_the_new_code() {
    let mut state = State::default();
    for cmd in entries() {
        state.apply(cmd).unwrap();
    }
    let b = &state.jobs[&name("b")];
    assert_eq!(b.every_condemned_total, 1);
    assert_eq!(
        b.events
            .iter()
            .filter(|e| matches!(e.kind, Some(JobEventKind::EveryCheckpointCondemned { .. })))
            .count(),
        1,
        "{:#?}",
        b.events
    );
    // the restore for max_restarts = 1: failed, and the event says why
    assert_eq!(b.state, JobState::Failed);
    assert!(matches!(
        b.events.last().unwrap().kind,
        Some(JobEventKind::RestartsExceeded { failures: 2, .. })
    ));
}
