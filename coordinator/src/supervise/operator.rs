//! Operators' "checkpoint now": refused at once when the job's state cannot
//! take one, placed once the ranks' pace is known, placed again after a
//! past-step abort, and answered on commit, abort, the job's end or the
//! deadline. Pure, like the rest of the core.

use super::{Action, Job, JobName, JobState, Now, State, Supervisor};
use crate::ledger::{AbortReason, CheckpointState, Refusal, RefusalKind};
use flotilla_shared::ids::{CheckpointId, Step};

/// An operator's request that waits for an answer, numbered by the shell.
pub type RequestId = u64;

/// How an operator's "checkpoint now" ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointOutcome {
    /// A checkpoint begun after the request was committed.
    Committed {
        /// Its id.
        id: CheckpointId,
        /// Its step.
        step: Step,
    },
    /// Refused at once: no such job, or its state takes no checkpoint now.
    Refused(Refusal),
    /// The job ended, or the checkpoint was aborted for a reason that
    /// another try would not fix.
    Failed(String),
    /// Nothing was committed within the job's checkpoint timeout (+30 s).
    TimedOut(String),
}

/// A request waiting for a checkpoint of its job.
#[derive(Debug, Clone)]
pub(super) struct Waiter {
    pub(super) request: RequestId,
    /// The first checkpoint id that can answer it.
    from: CheckpointId,
    /// Answered `TimedOut` past this (monotonic ms).
    deadline_ms: u64,
}

impl Supervisor {
    /// An operator asked for a checkpoint of `job` now: refused at once when
    /// the job's state cannot take one, else placed as soon as the ranks'
    /// pace allows, and answered (when `reply_to`) by the reconcile.
    pub(super) fn checkpoint_requested(
        &mut self,
        ledger: &State,
        now: Now,
        job: JobName,
        reply_to: Option<RequestId>,
        out: &mut Vec<Action>,
    ) {
        let refuse = |kind, message: String| CheckpointOutcome::Refused(Refusal { kind, message });
        let refusal = match ledger.jobs.get(&job) {
            None => Some(refuse(RefusalKind::NotFound, format!("no job named {job}; submit it first"))),
            Some(j) => match j.state {
                JobState::Running => None,
                JobState::Waiting => Some(refuse(RefusalKind::Conflict, format!(
                    "job {job} is waiting for its workers; a checkpoint needs every rank running (start them with flotilla worker)"
                ))),
                JobState::Restoring | JobState::Blocked => Some(refuse(RefusalKind::Conflict, format!(
                    "job {job} is {}; ask again once it runs (flotilla status shows why)",
                    j.state.as_str()
                ))),
                JobState::Succeeded | JobState::Failed | JobState::Cancelled => Some(refuse(RefusalKind::Conflict, format!(
                    "job {job} {}; it takes no more checkpoints",
                    j.state.as_str()
                ))),
            },
        };
        if let Some(outcome) = refusal {
            if let Some(request) = reply_to {
                out.push(Action::Answer { request, outcome });
            }
            return;
        }
        let j = &ledger.jobs[&job];
        let (from, timeout_s) = (j.next_checkpoint, j.spec.checkpoint.timeout_seconds);
        let soft = self.soft(&job, now.mono_ms);
        soft.checkpoint_requested = true;
        if let Some(request) = reply_to {
            let deadline_ms = now.mono_ms + (timeout_s + 30) * 1000;
            soft.waiters.push(Waiter { request, from, deadline_ms });
        }
    }

    /// Answers the operators waiting on `j` whose checkpoint has ended. One
    /// placed behind a rank (the pace estimate was off) is placed again,
    /// with the longer lead that abort gave.
    pub(super) fn answer_waiters(&mut self, j: &Job, now: Now, out: &mut Vec<Action>) {
        let name = &j.spec.name;
        let Some(soft) = self.jobs.get_mut(name) else { return };
        let mut again = false;
        soft.waiters.retain_mut(|w| {
            let outcome = if j.state.is_terminal() {
                Some(CheckpointOutcome::Failed(format!("job {name} is {}", j.state.as_str())))
            } else {
                j.checkpoints.range(w.from..).find_map(|(id, c)| match c.state {
                    CheckpointState::Committed | CheckpointState::Deleted | CheckpointState::Abandoned => {
                        Some(CheckpointOutcome::Committed { id: *id, step: c.step })
                    }
                    CheckpointState::Aborted if matches!(c.abort, Some(AbortReason::RankPastStep { .. })) => {
                        w.from = CheckpointId(id.0 + 1);
                        again = true;
                        None
                    }
                    CheckpointState::Aborted => Some(CheckpointOutcome::Failed(format!(
                        "checkpoint {id} was aborted: {}",
                        c.reason.as_deref().unwrap_or("no reason recorded")
                    ))),
                    _ => None,
                })
            };
            let outcome = outcome.or_else(|| {
                (now.mono_ms > w.deadline_ms).then(|| {
                    CheckpointOutcome::TimedOut(format!(
                        "no checkpoint of job {name} committed in time; is every worker running?"
                    ))
                })
            });
            match outcome {
                Some(outcome) => {
                    out.push(Action::Answer { request: w.request, outcome });
                    false
                }
                None => true,
            }
        });
        if again {
            soft.checkpoint_requested = true;
        }
    }
}
