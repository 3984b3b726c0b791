//! Where the next checkpoint goes: the periodic boundary, a time or
//! operator trigger, or the final one, always ahead of the fastest rank.

use super::{JobSoft, Now};
use crate::ledger::{CheckpointState, Command, Job};
use flotilla_shared::ids::Step;

/// The last step, when `checkpoint.at_end` asks for a final checkpoint of
/// the built-in trainer's job that is neither committed nor already tried
/// in this generation.
pub(super) fn final_checkpoint_due(j: &Job) -> Option<u64> {
    let last = j.spec.trainer.as_ref()?.total_steps;
    let done = j.latest_committed().is_some_and(|c| c.step.0 >= last);
    let tried = j
        .checkpoints
        .values()
        .any(|c| c.step.0 == last && c.generation == j.generation && c.state == CheckpointState::Aborted);
    (j.spec.checkpoint.at_end && !done && !tried).then_some(last)
}

/// Places the next checkpoint of a running job, if one is due.
///
/// Periodic checkpoints go on the next `every_steps` boundary past the head
/// of the job's history (the latest committed step, or the step this
/// generation started from), announced once the fastest rank can reach it
/// within half of `checkpoint.timeout_seconds`, and always ahead of where the
/// fastest rank will be when the directive arrives (`lead_ms`). When the
/// ranks are already past that boundary it moves to the first one ahead.
pub(super) fn schedule_checkpoint(j: &Job, soft: &mut JobSoft, now: Now) -> Option<Command> {
    let t = now.mono_ms;
    let fastest = soft.ranks.values().map(|r| r.projected_step(t)).max().unwrap_or(0);
    let rate = soft.ranks.values().map(|r| r.rate).fold(0.0, f64::max);
    // however far past-step aborts grew the lead, the ranks reach the step
    // within a quarter of the timeout: the rest is for the snapshot, the
    // writes and the commit
    let lead_ms = soft.lead_ms.min(j.spec.checkpoint.timeout_seconds * 250);
    let lead = (rate * lead_ms as f64).ceil() as u64 + 1;
    let head = j.latest_committed().map_or(0, |c| c.step.0).max(j.start_step().0);
    let earliest = (fastest + lead).max(head + 1);
    if rate <= 0.0 {
        // no pace measured yet (a new leader, a fresh start): a step placed
        // now could be behind the ranks; a request waits for the first reports
        return None;
    }
    let by_time = j.spec.checkpoint.every_seconds.is_some_and(|s| t >= soft.last_begun + s * 1000);
    let step = if soft.checkpoint_requested || by_time {
        earliest
    } else {
        let e = j.spec.checkpoint.every_steps?;
        let next = (head / e + 1) * e;
        let target = if earliest <= next { next } else { earliest.div_ceil(e) * e };
        // announced once the ranks' pace says they reach it within half the timeout
        let half_timeout_ms = j.spec.checkpoint.timeout_seconds * 500;
        if target.saturating_sub(fastest) as f64 / rate > half_timeout_ms as f64 {
            return None;
        }
        target
    };
    if j.spec.trainer.as_ref().is_some_and(|tr| step >= tr.total_steps) {
        soft.checkpoint_requested = false;
        return None;
    }
    soft.checkpoint_requested = false;
    soft.last_begun = t;
    Some(Command::BeginCheckpoint {
        job: j.spec.name.clone(),
        id: j.next_checkpoint,
        step: Step(step),
        generation: j.generation,
        now_ms: now.wall_ms,
    })
}
