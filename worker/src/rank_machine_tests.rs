//! The rank machine's tests: a rank brought to a state by a history of
//! inputs, then one input → the effects expected, case by case.

use super::*;
use flotilla_shared::checksum::Checksum;
use flotilla_shared::shard::ShardDigest;
use Effect::*;
use TrainerKind::{Builtin, Process};

const G1: Generation = Generation(1);
const G2: Generation = Generation(2);

fn point(step: u64) -> RestorePoint {
    RestorePoint {
        checkpoint: CheckpointId(7),
        step: Step(step),
        dir: PathBuf::from("/ckpt/7"),
        shard: ShardDigest {
            rank: Rank(1),
            file: "rank-1.safetensors".into(),
            bytes: 64,
            checksum: Checksum(0),
        },
        peers: Vec::new(),
    }
}

fn pending(generation: Generation, id: u64, step: u64) -> Pending {
    Pending { generation, id: CheckpointId(id), step: Step(step), dir: PathBuf::from(format!("/ckpt/{id}")) }
}

fn restore(generation: Generation, from: Option<RestorePoint>) -> Input {
    restore_at(generation, from, Some("10.0.0.1:29500"))
}

fn restore_at(generation: Generation, from: Option<RestorePoint>, rendezvous: Option<&str>) -> Input {
    Directive::Restore { generation, from, rendezvous: rendezvous.map(String::from) }.into()
}

fn resume(generation: Generation, step: u64) -> Input {
    Directive::Resume { generation, step: Step(step) }.into()
}

fn checkpoint(generation: Generation, id: u64, step: u64) -> Input {
    let Pending { generation, id, step, dir } = pending(generation, id, step);
    Directive::Checkpoint { generation, id, step, dir }.into()
}

fn abort(id: u64) -> Input {
    Directive::Abort { id: CheckpointId(id) }.into()
}

fn stop() -> Input {
    Directive::Stop.into()
}

fn refusal(checkpoint: Option<u64>, kind: RestoreFailureKind, message: &str) -> Input {
    Input::RestoreRefused { checkpoint: checkpoint.map(CheckpointId), kind, message: message.into() }
}

/// What a refused restore does, whatever the trainer.
fn refused(generation: Generation, kind: RestoreFailureKind, message: &str) -> Vec<Effect> {
    vec![
        Status(WorkerStatus::Waiting),
        Publish,
        report(WorkerMessage::RestoreFailed {
            generation,
            checkpoint: Some(CheckpointId(7)),
            kind,
            message: message.into(),
        }),
    ]
}

fn report(msg: WorkerMessage) -> Effect {
    Report(msg)
}

fn past(generation: Generation, id: u64, step: u64, at: u64) -> Effect {
    report(WorkerMessage::ShardFailed {
        generation,
        checkpoint: CheckpointId(id),
        kind: ShardFailureKind::PastStep,
        reason: format!("already past step {step} (at step {at}) when told"),
    })
}

fn restored(generation: Generation, step: u64) -> Effect {
    report(WorkerMessage::Restored { generation, step: Step(step), source: None })
}

fn snapshot(generation: Generation, id: u64, step: u64) -> Vec<Effect> {
    vec![Status(WorkerStatus::Checkpointing), TakeSnapshot(pending(generation, id, step))]
}

fn at(step: u64) -> Input {
    Input::AtStep(Step(step))
}

/// Built-in rank 1, restored into G1 at step 0 and running at `step`.
fn builtin_running(step: u64) -> Vec<Input> {
    let mut h = vec![restore(G1, None), Input::Restored { step: Step(0), source: None }, resume(G1, 0)];
    h.extend((1..=step).map(|s| Input::Stepped(Step(s))));
    h
}

/// Process rank 1, restored into G1 at step 0, running, having reported `step`.
fn process_running(step: u64) -> Vec<Input> {
    vec![restore(G1, None), Input::Restored { step: Step(0), source: None }, resume(G1, 0), at(step)]
}

struct Case {
    name: &'static str,
    kind: TrainerKind,
    rank: u32,
    history: Vec<Input>,
    input: Input,
    effects: Vec<Effect>,
    /// The phase after the input, when it matters.
    phase: Option<Phase>,
}

fn case(
    name: &'static str,
    kind: TrainerKind,
    history: Vec<Input>,
    input: Input,
    effects: Vec<Effect>,
) -> Case {
    Case { name, kind, rank: 1, history, input, effects, phase: None }
}

impl Case {
    fn then(mut self, phase: Phase) -> Self {
        self.phase = Some(phase);
        self
    }

    fn rank(mut self, rank: u32) -> Self {
        self.rank = rank;
        self
    }
}

fn cat(parts: impl IntoIterator<Item = Vec<Effect>>) -> Vec<Effect> {
    parts.into_iter().flatten().collect()
}

fn cases() -> Vec<Case> {
    let running = |generation| Phase::Running { generation };
    vec![
        // ---- restore ------------------------------------------------------
        case(
            "builtin: a first restore restores in-process",
            Builtin,
            vec![],
            restore(G1, None),
            vec![CancelWrites, Status(WorkerStatus::Restoring), Restore { generation: G1, from: None }],
        ),
        case(
            "builtin: the restore done reports Restored at its step",
            Builtin,
            vec![restore(G1, Some(point(20)))],
            Input::Restored { step: Step(20), source: None },
            vec![Status(WorkerStatus::Waiting), Publish, restored(G1, 20)],
        )
        .then(Phase::Restored { generation: G1 }),
        case(
            "builtin: a repeated restore of the held generation is answered again",
            Builtin,
            vec![restore(G1, None), Input::Restored { step: Step(0), source: None }],
            restore(G1, None),
            vec![restored(G1, 0)],
        ),
        case(
            "builtin: a repeated restore once running is a no-op",
            Builtin,
            builtin_running(3),
            restore(G1, None),
            vec![],
        ),
        case(
            "builtin: a refused restore keeps the state it had, not running",
            Builtin,
            cat_inputs(builtin_running(3), vec![restore(G2, Some(point(10)))]),
            refusal(Some(7), RestoreFailureKind::DeviceMemory, "no room"),
            refused(G2, RestoreFailureKind::DeviceMemory, "no room"),
        )
        .then(Phase::Restored { generation: G1 }),
        case(
            "process: a restore stops the old process, then starts one at the checkpoint's step",
            Process,
            process_running(4),
            restore(G2, Some(point(20))),
            vec![
                StopTrainer,
                CancelWrites,
                Status(WorkerStatus::Restoring),
                Publish,
                StartTrainer { generation: G2, rendezvous: "10.0.0.1:29500".into(), start_step: Step(20) },
            ],
        ),
        case(
            "process: rank 0 picks the rendezvous before starting",
            Process,
            vec![],
            restore_at(G1, None, None),
            vec![StopTrainer, CancelWrites, Status(WorkerStatus::Restoring), Publish, PickRendezvous],
        )
        .rank(0),
        case(
            "process: rank 0 offers what it picked and starts",
            Process,
            vec![restore_at(G1, None, None)],
            Input::RendezvousPicked("h:1".into()),
            vec![
                report(WorkerMessage::Rendezvous { generation: G1, addr: "h:1".into() }),
                StartTrainer { generation: G1, rendezvous: "h:1".into(), start_step: Step(0) },
            ],
        )
        .rank(0),
        case(
            "process: rank 0 re-offers on a repeated directive without a rendezvous",
            Process,
            vec![restore_at(G1, None, None), Input::RendezvousPicked("h:1".into())],
            restore_at(G1, None, None),
            vec![report(WorkerMessage::Rendezvous { generation: G1, addr: "h:1".into() })],
        )
        .rank(0),
        case(
            "process: another rank waits for the rendezvous, then starts on the repeat that carries it",
            Process,
            vec![restore_at(G1, None, None)],
            restore(G1, None),
            vec![StartTrainer { generation: G1, rendezvous: "10.0.0.1:29500".into(), start_step: Step(0) }],
        ),
        case(
            "process: a refused restore ends the generation refused",
            Process,
            vec![restore(G1, Some(point(20)))],
            refusal(Some(7), RestoreFailureKind::Corrupt, "crc"),
            refused(G1, RestoreFailureKind::Corrupt, "crc"),
        )
        .then(Phase::Refused { generation: G1 }),
        case(
            "process: its exit after a refused restore is no failure",
            Process,
            vec![restore(G1, Some(point(20))), refusal(None, RestoreFailureKind::Corrupt, "crc")],
            Input::Exited { success: false, reason: "exited with status 1".into() },
            vec![],
        ),
        // ---- restore while a checkpoint is pending -------------------------
        case(
            "builtin: a restore forgets the pending checkpoint",
            Builtin,
            cat_inputs(
                builtin_running(3),
                vec![
                    checkpoint(G1, 5, 10),
                    restore(G2, None),
                    Input::Restored { step: Step(0), source: None },
                    resume(G2, 0),
                ],
            ),
            Input::Stepped(Step(10)),
            vec![Publish],
        ),
        case(
            "builtin: ... and never snapshots it",
            Builtin,
            cat_inputs(
                builtin_running(3),
                vec![
                    checkpoint(G1, 5, 10),
                    restore(G2, None),
                    Input::Restored { step: Step(10), source: None },
                    resume(G2, 10),
                ],
            ),
            at(10),
            vec![Publish, GoOn],
        ),
        case(
            "process: a restore forgets the pending and the due checkpoints",
            Process,
            cat_inputs(process_running(4), vec![checkpoint(G1, 5, 5), at(5), restore(G2, None)]),
            Input::SnapshotTaken,
            vec![],
        ),
        case(
            "process: a checkpoint of the new generation is taken once restored and resumed",
            Process,
            cat_inputs(
                process_running(4),
                vec![
                    checkpoint(G1, 5, 8),
                    restore(G2, None),
                    Input::Restored { step: Step(0), source: None },
                    resume(G2, 0),
                    checkpoint(G2, 6, 8),
                ],
            ),
            at(8),
            cat([vec![Publish], snapshot(G2, 6, 8)]),
        ),
        // ---- resume -------------------------------------------------------
        case(
            "a resume of the restored generation runs",
            Builtin,
            vec![restore(G1, None), Input::Restored { step: Step(0), source: None }],
            resume(G1, 0),
            vec![Status(WorkerStatus::Running), Publish, Resumed],
        )
        .then(running(G1)),
        case("a repeated resume is a no-op", Builtin, builtin_running(2), resume(G1, 0), vec![]),
        case(
            "builtin: a resume at another step fails the trainer",
            Builtin,
            vec![restore(G1, Some(point(20))), Input::Restored { step: Step(20), source: None }],
            resume(G1, 10),
            vec![
                Status(WorkerStatus::Failed),
                report(WorkerMessage::TrainerFailed {
                    generation: G1,
                    reason: "told to resume at step 10 but the trainer is at step 20".into(),
                }),
            ],
        ),
        case(
            "process: a resume at another step only warns",
            Process,
            vec![restore(G1, Some(point(20))), Input::Restored { step: Step(20), source: None }],
            resume(G1, 10),
            vec![Status(WorkerStatus::Running), Publish, Resumed],
        ),
        case(
            "process: a resume before the process restored is ignored",
            Process,
            vec![restore(G1, Some(point(20)))],
            resume(G1, 20),
            vec![],
        ),
        // ---- checkpoint: before, at, after the step ------------------------
        case(
            "builtin: a checkpoint ahead is pending",
            Builtin,
            builtin_running(3),
            checkpoint(G1, 5, 10),
            vec![],
        ),
        case(
            "builtin: ... and taken when the trainer is at its step",
            Builtin,
            cat_inputs(builtin_running(3), vec![checkpoint(G1, 5, 10)]),
            at(10),
            cat([vec![Publish], snapshot(G1, 5, 10)]),
        ),
        case(
            "builtin: ... not before",
            Builtin,
            cat_inputs(builtin_running(3), vec![checkpoint(G1, 5, 10)]),
            at(9),
            vec![Publish, GoOn],
        ),
        case(
            "builtin: a checkpoint at the step it is at is still on time",
            Builtin,
            cat_inputs(builtin_running(3), vec![checkpoint(G1, 5, 3)]),
            at(3),
            cat([vec![Publish], snapshot(G1, 5, 3)]),
        ),
        case(
            "builtin: a checkpoint behind is past",
            Builtin,
            builtin_running(3),
            checkpoint(G1, 5, 2),
            vec![past(G1, 5, 2, 3)],
        ),
        case(
            "builtin: idle at the step (finished): snapshot now, and stay finished",
            Builtin,
            cat_inputs(builtin_running(3), vec![Input::Finished { digest: "d".into() }]),
            checkpoint(G1, 5, 3),
            snapshot(G1, 5, 3),
        )
        .then(Phase::Finished { generation: G1 }),
        case(
            "builtin: the final snapshot leaves it finished",
            Builtin,
            cat_inputs(
                builtin_running(3),
                vec![Input::Finished { digest: "d".into() }, checkpoint(G1, 5, 3)],
            ),
            Input::SnapshotTaken,
            vec![Status(WorkerStatus::Finished)],
        ),
        case(
            "builtin: a failed snapshot is reported and training goes on",
            Builtin,
            cat_inputs(builtin_running(3), vec![checkpoint(G1, 5, 3), at(3)]),
            Input::SnapshotFailed("disk full".into()),
            vec![
                report(WorkerMessage::ShardFailed {
                    generation: G1,
                    checkpoint: CheckpointId(5),
                    kind: ShardFailureKind::Write,
                    reason: "disk full".into(),
                }),
                Status(WorkerStatus::Running),
            ],
        ),
        case(
            "builtin: a repeat of a checkpoint taken is a no-op, not past",
            Builtin,
            cat_inputs(
                builtin_running(3),
                vec![checkpoint(G1, 5, 3), at(3), Input::SnapshotTaken, Input::Stepped(Step(4))],
            ),
            checkpoint(G1, 5, 3),
            vec![],
        ),
        case(
            "process: a checkpoint at the step it reported is past (it was answered)",
            Process,
            process_running(4),
            checkpoint(G1, 5, 4),
            vec![past(G1, 5, 4, 4)],
        ),
        case(
            "process: a checkpoint ahead is answered at its step",
            Process,
            cat_inputs(process_running(4), vec![checkpoint(G1, 5, 5)]),
            at(5),
            cat([vec![Publish], snapshot(G1, 5, 5)]),
        ),
        case(
            "process: a step reported beyond a pending checkpoint fails it",
            Process,
            cat_inputs(process_running(4), vec![checkpoint(G1, 5, 5)]),
            at(6),
            vec![
                Publish,
                report(WorkerMessage::ShardFailed {
                    generation: G1,
                    checkpoint: CheckpointId(5),
                    kind: ShardFailureKind::PastStep,
                    reason: "the trainer reported step 6 without stopping at step 5".into(),
                }),
                GoOn,
            ],
        ),
        case(
            "process: a repeat while saving is a no-op",
            Process,
            cat_inputs(process_running(4), vec![checkpoint(G1, 5, 5), at(5), Input::SaveBegun]),
            checkpoint(G1, 5, 5),
            vec![],
        ),
        case(
            "process: save done",
            Process,
            cat_inputs(process_running(4), vec![checkpoint(G1, 5, 5), at(5), Input::SaveBegun]),
            Input::SnapshotTaken,
            vec![Status(WorkerStatus::Running)],
        ),
        case(
            "process: a finished rank takes no more checkpoints",
            Process,
            cat_inputs(process_running(4), vec![Input::Finished { digest: "d".into() }]),
            checkpoint(G1, 5, 5),
            vec![],
        ),
        case(
            "an abort forgets the pending checkpoint and gives up its write",
            Process,
            cat_inputs(process_running(4), vec![checkpoint(G1, 5, 5)]),
            abort(5),
            vec![CancelWriteOf(CheckpointId(5))],
        ),
        case(
            "... so its step goes by",
            Process,
            cat_inputs(process_running(4), vec![checkpoint(G1, 5, 5), abort(5)]),
            at(5),
            vec![Publish, GoOn],
        ),
        // ---- fencing ------------------------------------------------------
        case(
            "a checkpoint of a stale generation is ignored",
            Builtin,
            cat_inputs(
                builtin_running(3),
                vec![restore(G2, None), Input::Restored { step: Step(0), source: None }, resume(G2, 0)],
            ),
            checkpoint(G1, 5, 10),
            vec![],
        ),
        case(
            "process: a checkpoint of a stale generation is ignored",
            Process,
            cat_inputs(
                process_running(4),
                vec![restore(G2, None), Input::Restored { step: Step(0), source: None }, resume(G2, 0)],
            ),
            checkpoint(G1, 5, 10),
            vec![],
        ),
        case(
            "a resume of a stale generation is ignored",
            Process,
            cat_inputs(
                process_running(4),
                vec![restore(G2, None), Input::Restored { step: Step(0), source: None }],
            ),
            resume(G1, 0),
            vec![],
        ),
        case(
            "a restore done for no restore is ignored",
            Builtin,
            builtin_running(3),
            Input::Restored { step: Step(0), source: None },
            vec![],
        ),
        case("a checkpoint before any generation is ignored", Process, vec![], checkpoint(G1, 5, 10), vec![]),
        // ---- finish -------------------------------------------------------
        case(
            "finishing reports the digest once",
            Builtin,
            builtin_running(3),
            Input::Finished { digest: "abc".into() },
            vec![
                Status(WorkerStatus::Finished),
                report(WorkerMessage::Finished { generation: G1, step: Step(3), digest: "abc".into() }),
            ],
        ),
        case(
            "... and not again",
            Builtin,
            cat_inputs(builtin_running(3), vec![Input::Finished { digest: "abc".into() }]),
            Input::Finished { digest: "abc".into() },
            vec![],
        ),
        case(
            "process: a clean exit after finishing is no failure",
            Process,
            cat_inputs(process_running(4), vec![Input::Finished { digest: "d".into() }]),
            Input::Exited { success: true, reason: "exited with status 0".into() },
            vec![],
        ),
        // ---- stop, exits and failures -------------------------------------
        case("stop ends the rank", Process, process_running(4), stop(), vec![Exit]).then(Phase::Stopped),
        case(
            "after stop nothing is done",
            Builtin,
            cat_inputs(builtin_running(3), vec![stop()]),
            checkpoint(G1, 5, 10),
            vec![],
        ),
        case(
            "process: an exit mid-snapshot fails the rank",
            Process,
            cat_inputs(process_running(4), vec![checkpoint(G1, 5, 5), at(5), Input::SaveBegun]),
            Input::Exited { success: false, reason: "trainer process 9 was killed by signal 9".into() },
            vec![
                Status(WorkerStatus::Failed),
                report(WorkerMessage::TrainerFailed {
                    generation: G1,
                    reason: "trainer process 9 was killed by signal 9".into(),
                }),
            ],
        ),
        case(
            "process: ... and the snapshot it was in is over (no save_done comes)",
            Process,
            cat_inputs(
                process_running(4),
                vec![
                    checkpoint(G1, 5, 5),
                    at(5),
                    Input::SaveBegun,
                    Input::Exited { success: false, reason: "killed".into() },
                ],
            ),
            Input::SnapshotTaken,
            vec![],
        ),
        case(
            "process: a clean exit without finish is a failure",
            Process,
            process_running(4),
            Input::Exited { success: true, reason: "exited with status 0 without calling finish()".into() },
            vec![
                Status(WorkerStatus::Failed),
                report(WorkerMessage::TrainerFailed {
                    generation: G1,
                    reason: "exited with status 0 without calling finish()".into(),
                }),
            ],
        ),
        case(
            "process: an exit of no generation's process is nothing",
            Process,
            vec![],
            Input::Exited { success: false, reason: "x".into() },
            vec![],
        ),
    ]
}

fn cat_inputs(a: Vec<Input>, b: Vec<Input>) -> Vec<Input> {
    a.into_iter().chain(b).collect()
}

#[test]
fn state_and_input_give_the_effects() {
    let mut failures = Vec::new();
    for c in cases() {
        let mut m = RankMachine::new(c.kind, Rank(c.rank));
        for input in c.history {
            m.handle(input);
        }
        let got = m.handle(c.input);
        if got != c.effects {
            failures.push(format!("{}:\n  expected {:?}\n  got      {:?}", c.name, c.effects, got));
        }
        if let Some(phase) = c.phase {
            if *m.phase() != phase {
                failures.push(format!("{}: phase {:?}, expected {phase:?}", c.name, m.phase()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn only_the_last_checkpoints_taken_are_remembered() {
    let mut m = RankMachine::new(Builtin, Rank(1));
    for input in builtin_running(0) {
        m.handle(input);
    }
    for id in 0..=Taken::KEPT as u64 {
        m.handle(checkpoint(G1, id, id));
        m.handle(at(id));
        m.handle(Input::SnapshotTaken);
        m.handle(Input::Stepped(Step(id + 1)));
    }
    // the last few are repeats; the oldest is forgotten, so it is past
    assert_eq!(m.handle(checkpoint(G1, Taken::KEPT as u64, Taken::KEPT as u64)), vec![]);
    assert_eq!(m.handle(checkpoint(G1, 0, 0)), vec![past(G1, 0, 0, Taken::KEPT as u64 + 1)]);
}

#[test]
fn the_held_generation_is_what_is_published() {
    let mut m = RankMachine::new(Builtin, Rank(1));
    for input in builtin_running(2) {
        m.handle(input);
    }
    m.handle(restore(G2, None));
    // the built-in trainer's state is still of G1 while it restores
    assert_eq!(m.held(), Some(G1));
    let mut p = RankMachine::new(Process, Rank(1));
    for input in process_running(2) {
        p.handle(input);
    }
    p.handle(restore(G2, None));
    assert_eq!((p.held(), p.generation(), p.step()), (None, Some(G2), Step(0)));
}

#[test]
fn a_spare_takes_its_rank_before_its_first_restore_and_a_holder_keeps_its_own() {
    // a process spare made rank 0 picks the generation's rendezvous, as rank 0 does
    let mut m = RankMachine::new(Process, Rank(7));
    assert_eq!(
        m.handle(Directive::Assign { rank: Rank(0) }.into()),
        vec![Assigned(Rank(0)), Status(WorkerStatus::Waiting)]
    );
    assert!(m.handle(restore_at(G1, None, None)).contains(&PickRendezvous));
    // the same rank again is nothing; another is refused while it holds a generation
    assert!(m.handle(Directive::Assign { rank: Rank(0) }.into()).is_empty());
    assert!(m.handle(Directive::Assign { rank: Rank(3) }.into()).is_empty());
}
