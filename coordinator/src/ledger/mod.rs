//! The replicated state machine: the job ledger.
//!
//! Pure and deterministic: [`State::apply`] takes a [`Command`] (time arrives
//! inside commands) and returns what happened, or why the command was
//! refused. No I/O, no clock, no randomness, so every replica that applies
//! the same log reaches the same state, and every rule is unit-tested here.
//!
//! Checkpoint ledger, per job:
//! ```text
//!   Begin ──► Pending ──Commit──► Committed ──MarkCorrupt──► Corrupt ──ClearCorrupt──► Committed
//!                │                    │    └──operator restore to an older one──► Abandoned
//!                └──Abort──► Aborted  └──(retention)/Delete──► Deleted ◄──(retention)/Delete
//! ```
//! Rules kept: a committed checkpoint is never un-committed (only marked
//! corrupt after a checksum or format mismatch, abandoned by an operator's
//! rollback, or retired); a commit needs one shard per rank of the
//! checkpoint's own generation; the generation never decreases; a
//! `succeeded` or `cancelled` job changes no more, a `failed` one only
//! through an operator's restore; only a job in one of those three states
//! is deleted (its name is then free for a new job).

use flotilla_shared::ids::{CheckpointId, Generation, JobName, NodeId, Rank, Step};
use flotilla_shared::layout::JobDir;
use flotilla_shared::shard::ShardDigest;
use flotilla_shared::spec::JobSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

mod command;
mod job;

use command::refuse;

/// A whole-job restore to apply (a failure's, or an operator's).
struct RestoreOrder {
    job: JobName,
    generation: Generation,
    from: Option<CheckpointId>,
    reason: RestoreReason,
    detail: Option<String>,
    now_ms: u64,
    takeovers: Vec<Takeover>,
}
pub use command::*;
pub use job::*;

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Every job, by name. Shared with the snapshots the Raft node
    /// publishes: a job is copied only when a command changes it while a
    /// reader holds an older snapshot (serialized as the job itself).
    pub jobs: BTreeMap<JobName, Arc<Job>>,
    /// Every replica that announced itself.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// The Raft addresses of replicas added by membership changes (the
    /// first ones are in every replica's `--peers`).
    #[serde(default)]
    pub replicas: BTreeMap<NodeId, String>,
}

impl State {
    /// Applies one command.
    pub fn apply(&mut self, cmd: Command) -> Outcome {
        let outcome = self.apply_command(cmd);
        if outcome.is_ok() {
            for j in self.jobs.values_mut().filter(|j| needs_prune(j)) {
                prune(Arc::make_mut(j));
            }
        }
        outcome
    }

    fn apply_command(&mut self, cmd: Command) -> Outcome {
        match cmd {
            Command::Announce { node, info } => {
                self.nodes.insert(node, info);
                Ok(vec![])
            }
            Command::SubmitJob { spec, now_ms, origin } => self.submit(spec, now_ms, origin),
            Command::StartJob { job, generation, holders } => {
                let j = self.live_job(&job, generation)?;
                if j.state != JobState::Waiting {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} is {}, not waiting", j.state.as_str()),
                    );
                }
                j.holders = holders;
                Ok(set_state(j, &job, JobState::Running, None))
            }
            Command::BeginCheckpoint { job, id, step, generation, now_ms } => {
                let j = self.live_job(&job, generation)?;
                if j.state != JobState::Running {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "job {job} is {}; checkpoints are taken only while it runs",
                            j.state.as_str()
                        ),
                    );
                }
                if let Some(p) = j.pending() {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} already has checkpoint {} in flight; wait for it", p.id),
                    );
                }
                if id != j.next_checkpoint {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("checkpoint {id} of job {job} is not the next id ({})", j.next_checkpoint),
                    );
                }
                if let Some(latest) = j.latest_committed() {
                    if step <= latest.step {
                        return refuse(
                            RefusalKind::Invalid,
                            format!(
                                "checkpoint step {step} of job {job} is not after the latest committed step {}",
                                latest.step
                            ),
                        );
                    }
                }
                j.next_checkpoint = CheckpointId(id.0 + 1);
                j.checkpoints.insert(
                    id,
                    Checkpoint {
                        id,
                        step,
                        generation,
                        state: CheckpointState::Pending,
                        begun_ms: now_ms,
                        ended_ms: None,
                        shards: Vec::new(),
                        reason: None,
                        abort: None,
                    },
                );
                Ok(vec![Event::CheckpointBegun { job, id, step }])
            }
            Command::CommitCheckpoint { job, id, shards, now_ms } => self.commit(job, id, shards, now_ms),
            Command::AbortCheckpoint { job, id, reason, now_ms } => {
                let abort = reason.clone();
                let reason = reason.to_string();
                let j = self.job_mut(&job)?;
                let c = checkpoint_mut(j, &job, id)?;
                if c.state != CheckpointState::Pending {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "checkpoint {id} of job {job} is {}; only a pending one can be aborted",
                            c.state.as_str()
                        ),
                    );
                }
                c.state = CheckpointState::Aborted;
                c.ended_ms = Some(now_ms);
                c.reason = Some(reason.clone());
                c.abort = Some(abort);
                j.aborted_total += 1;
                Ok(vec![Event::CheckpointAborted { job, id, reason }])
            }
            Command::MarkCorrupt { job, id, reason, now_ms } => {
                let j = self.job_mut(&job)?;
                let c = checkpoint_mut(j, &job, id)?;
                match c.state {
                    CheckpointState::Corrupt => Ok(vec![]),
                    CheckpointState::Committed => {
                        c.state = CheckpointState::Corrupt;
                        c.reason = Some(reason.clone());
                        j.condemned_total += 1;
                        j.last_condemned = Some(id);
                        j.note(now_ms, JobEventKind::Condemned { checkpoint: id, reason: reason.clone() });
                        Ok(vec![Event::CheckpointCorrupt { job, id }])
                    }
                    other => refuse(
                        RefusalKind::Conflict,
                        format!(
                            "checkpoint {id} of job {job} is {}; only a committed one can be marked corrupt",
                            other.as_str()
                        ),
                    ),
                }
            }
            Command::ClearCorrupt { job, id, now_ms } => {
                self.clearable(&job, id)?;
                let j = self.job_mut(&job)?;
                let head = j.operator_head;
                let c = checkpoint_mut(j, &job, id)?;
                let abandoned = head.is_some_and(|(g, s)| c.generation < g && c.step > s);
                let state = if abandoned { CheckpointState::Abandoned } else { CheckpointState::Committed };
                c.state = state;
                c.reason = abandoned.then(|| "on the line abandoned by an operator's restore".to_string());
                j.note(now_ms, JobEventKind::Reverified { checkpoint: id, now: state });
                Ok(vec![Event::CheckpointCleared { job, id }])
            }
            Command::DeleteCheckpoint { job, id } => {
                let j = self.job_mut(&job)?;
                let latest = j.latest_committed().map(|c| c.id);
                let c = checkpoint_mut(j, &job, id)?;
                match c.state {
                    CheckpointState::Deleted => Ok(vec![]),
                    CheckpointState::Pending => refuse(
                        RefusalKind::Conflict,
                        format!("checkpoint {id} of job {job} is pending; abort it first"),
                    ),
                    CheckpointState::Committed if latest == Some(id) => refuse(
                        RefusalKind::Conflict,
                        format!("checkpoint {id} is the latest committed checkpoint of job {job}; it is never deleted"),
                    ),
                    _ => {
                        c.state = CheckpointState::Deleted;
                        Ok(vec![Event::CheckpointDeleted { job, id }])
                    }
                }
            }
            Command::Restore { job, generation, from, reason, detail, now_ms, takeovers } => {
                self.restore(RestoreOrder { job, generation, from, reason, detail, now_ms, takeovers })
            }
            Command::OperatorRestore { job, generation, from, now_ms } => {
                let j = self.job_mut(&job)?;
                // a checkpoint that is not there is named first, whatever the job's state
                if let Some(id) = from {
                    checkpoint_mut(j, &job, id)?;
                }
                let Some(from) = from.or_else(|| j.latest_committed().map(|c| c.id)) else {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "job {job} has no committed checkpoint to restore from; take one with flotilla checkpoint --job {job}"
                        ),
                    );
                };
                self.restore(RestoreOrder {
                    job,
                    generation,
                    from: Some(from),
                    reason: RestoreReason::Operator,
                    detail: None,
                    now_ms,
                    takeovers: Vec::new(),
                })
            }
            Command::ResumeJob { job, generation, holders } => {
                let j = self.live_job(&job, generation)?;
                if j.state != JobState::Restoring && j.state != JobState::Blocked {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} is {}, not restoring", j.state.as_str()),
                    );
                }
                j.holders = holders;
                Ok(set_state(j, &job, JobState::Running, None))
            }
            Command::BlockJob { job, generation, error, rank, kind, now_ms } => {
                let j = self.live_job(&job, generation)?;
                if !matches!(j.state, JobState::Restoring | JobState::Blocked | JobState::Waiting) {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} is {}, not restoring", j.state.as_str()),
                    );
                }
                let reason = BlockReason { rank, kind, detail: error };
                // a retried block for the same reason is one event, not one per retry
                if j.block_reason().as_ref() != Some(&reason) {
                    j.note(now_ms, JobEventKind::Blocked(reason.clone()));
                }
                let events = set_state(j, &job, JobState::Blocked, Some(reason.detail.clone()));
                j.blocked = Some(reason);
                Ok(events)
            }
            Command::FailJob { job, error } => {
                let j = self.job_mut(&job)?;
                if j.state.is_terminal() {
                    return refuse(RefusalKind::Conflict, format!("job {job} already {}", j.state.as_str()));
                }
                let mut events = abort_pending(j, &job, &AbortReason::JobEnded.to_string(), None);
                events.extend(set_state(j, &job, JobState::Failed, Some(error)));
                Ok(events)
            }
            Command::FinishJob { job, generation, digest, step } => {
                let j = self.live_job(&job, generation)?;
                if j.state != JobState::Running {
                    return refuse(
                        RefusalKind::Conflict,
                        format!("job {job} is {}, not running", j.state.as_str()),
                    );
                }
                j.final_digest = Some(digest);
                j.final_step = step;
                let mut events = abort_pending(j, &job, &AbortReason::JobEnded.to_string(), None);
                events.extend(set_state(j, &job, JobState::Succeeded, None));
                Ok(events)
            }
            Command::CancelJob { job, now_ms } => {
                let j = self.job_mut(&job)?;
                if j.state.is_terminal() {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "job {job} already {}; nothing to cancel (flotilla delete --job {job} removes it)",
                            j.state.as_str()
                        ),
                    );
                }
                let mut events = abort_pending(j, &job, "job cancelled by an operator", Some(now_ms));
                let aborted = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::CheckpointAborted { id, .. } => Some(*id),
                        _ => None,
                    })
                    .collect();
                j.note(now_ms, JobEventKind::Cancelled { aborted });
                events.extend(set_state(j, &job, JobState::Cancelled, None));
                Ok(events)
            }
            Command::DeleteJob { job, remove_checkpoints } => self.delete_job(job, remove_checkpoints),
        }
    }

    fn delete_job(&mut self, job: JobName, remove_checkpoints: bool) -> Outcome {
        let j = self.job_mut(&job)?;
        if !j.state.is_terminal() {
            return refuse(
                RefusalKind::Conflict,
                format!(
                    "job {job} is {}; only a succeeded, failed or cancelled job is deleted: cancel it first (flotilla cancel --job {job})",
                    j.state.as_str()
                ),
            );
        }
        let root = j.spec.checkpoint.root.clone();
        if remove_checkpoints {
            // a live job that started from one of its checkpoints may still
            // restore from it
            let user = self.jobs.values().find(|other| {
                !other.state.is_terminal() && other.origin.as_ref().is_some_and(|o| o.job == job)
            });
            if let Some(other) = user {
                return refuse(
                    RefusalKind::Conflict,
                    format!(
                        "job {} is {} and starts from a checkpoint of job {job} (resume_from); delete job {job} without --remove-checkpoints, or once job {} has ended",
                        other.spec.name,
                        other.state.as_str(),
                        other.spec.name
                    ),
                );
            }
        }
        self.jobs.remove(&job);
        Ok(vec![Event::JobDeleted { job, remove_checkpoints, root }])
    }

    fn submit(&mut self, spec: JobSpec, now_ms: u64, origin: Option<Box<Origin>>) -> Outcome {
        if let Err(e) = spec.validate() {
            return refuse(RefusalKind::Invalid, e);
        }
        match (&spec.checkpoint.resume_from, &origin) {
            (Some(from), None) => {
                return refuse(
                    RefusalKind::Invalid,
                    format!("checkpoint.resume_from = {}: its checkpoint was not read", from.display()),
                )
            }
            (_, Some(o)) if o.shards.len() != spec.world_size as usize => {
                return refuse(
                    RefusalKind::Invalid,
                    format!(
                        "checkpoint.resume_from: checkpoint {} of job {} has {} shards, job {} has world_size {}; resume with the same number of ranks",
                        o.id,
                        o.job,
                        o.shards.len(),
                        spec.name,
                        spec.world_size
                    ),
                )
            }
            _ => {}
        }
        let name = spec.name.clone();
        if let Some(existing) = self.jobs.get(&name) {
            if existing.spec == spec {
                return Ok(vec![Event::JobAlreadySubmitted { job: name }]);
            }
            return refuse(
                RefusalKind::Conflict,
                format!("job {name} already exists with a different spec; submit it under a new name"),
            );
        }
        // a job that resumes from a deleted job of its own name, in its own
        // directory, numbers its checkpoints after that one: it never
        // writes into the directory it starts from, nor into older ones
        let own_dir = JobDir::new(&spec.checkpoint.root, &name);
        let first_id = origin
            .as_ref()
            .filter(|o| o.job == name && o.dir.starts_with(own_dir.path()))
            .map_or(CheckpointId(1), |o| CheckpointId(o.id.0 + 1));
        self.jobs.insert(
            name.clone(),
            Arc::new(Job {
                spec,
                state: JobState::Waiting,
                generation: Generation(1),
                restores: 0,
                restored_from: None,
                checkpoints: BTreeMap::new(),
                next_checkpoint: first_id,
                error: None,
                final_digest: None,
                final_step: None,
                submitted_ms: now_ms,
                committed_total: 0,
                aborted_total: 0,
                pruned_total: 0,
                operator_head: None,
                condemned_total: 0,
                last_condemned: None,
                restores_by_reason: BTreeMap::new(),
                failures_ms: Vec::new(),
                blocked: None,
                every_condemned_total: 0,
                events: origin
                    .iter()
                    .map(|o| {
                        let kind =
                            JobEventKind::StartsFrom { job: o.job.clone(), checkpoint: o.id, step: o.step };
                        JobEvent { at_ms: now_ms, text: kind.to_string(), kind: Some(kind) }
                    })
                    .collect(),
                origin,
                holders: BTreeMap::new(),
            }),
        );
        Ok(vec![Event::JobSubmitted { job: name }])
    }

    fn commit(
        &mut self,
        job: JobName,
        id: CheckpointId,
        mut shards: Vec<ShardDigest>,
        now_ms: u64,
    ) -> Outcome {
        let j = self.job_mut(&job)?;
        let world = j.spec.world_size;
        let (keep_last, job_generation) = (j.spec.checkpoint.keep_last as usize, j.generation);
        let c = checkpoint_mut(j, &job, id)?;
        if c.state != CheckpointState::Pending {
            return refuse(
                RefusalKind::Conflict,
                format!(
                    "checkpoint {id} of job {job} is {}; only a pending one can be committed",
                    c.state.as_str()
                ),
            );
        }
        if c.generation != job_generation {
            return refuse(
                RefusalKind::Fenced,
                format!(
                    "checkpoint {id} of job {job} belongs to generation {}, the job is in {job_generation}",
                    c.generation
                ),
            );
        }
        shards.sort_by_key(|s| s.rank);
        let ranks: Vec<Rank> = shards.iter().map(|s| s.rank).collect();
        let want: Vec<Rank> = (0..world).map(Rank).collect();
        if ranks != want {
            let missing: Vec<String> =
                want.iter().filter(|r| !ranks.contains(r)).map(|r| r.to_string()).collect();
            return refuse(
                RefusalKind::Invalid,
                format!(
                    "checkpoint {id} of job {job} needs exactly one shard per rank 0..{world}; missing ranks [{}], got {} shards",
                    missing.join(", "),
                    shards.len()
                ),
            );
        }
        c.state = CheckpointState::Committed;
        c.ended_ms = Some(now_ms);
        c.shards = shards;
        let step = c.step;
        let duration_ms = now_ms.saturating_sub(c.begun_ms);
        j.committed_total += 1;
        let mut events = vec![Event::CheckpointCommitted { job: job.clone(), id, step, duration_ms }];

        // retention: keep the newest `keep_last` committed, retire the rest;
        // a corrupt or abandoned checkpoint goes once `keep_last` committed
        // ones are newer than it (until then an operator can still re-verify
        // or restore it). Ledger first; the leader deletes the files.
        let mut committed: Vec<(Step, CheckpointId)> = j
            .checkpoints
            .values()
            .filter(|c| c.state == CheckpointState::Committed)
            .map(|c| (c.step, c.id))
            .collect();
        committed.sort_unstable_by(|a, b| b.cmp(a));
        let mut retired: Vec<CheckpointId> = committed.iter().skip(keep_last).map(|(_, id)| *id).collect();
        retired.extend(
            j.checkpoints
                .values()
                .filter(|c| matches!(c.state, CheckpointState::Corrupt | CheckpointState::Abandoned))
                .filter(|c| committed.iter().filter(|(_, newer)| *newer > c.id).count() >= keep_last)
                .map(|c| c.id),
        );
        for old in retired {
            if let Some(c) = j.checkpoints.get_mut(&old) {
                c.state = CheckpointState::Deleted;
                events.push(Event::CheckpointDeleted { job: job.clone(), id: old });
            }
        }
        Ok(events)
    }

    fn restore(&mut self, order: RestoreOrder) -> Outcome {
        let RestoreOrder { job, generation, from, reason, detail, now_ms, takeovers } = order;
        let j = self.job_mut(&job)?;
        match j.state {
            JobState::Succeeded => {
                return refuse(
                    RefusalKind::Conflict,
                    format!("job {job} succeeded; a finished job is not restored (submit a new job with [checkpoint] resume_from to start from its checkpoints)"),
                )
            }
            JobState::Cancelled => {
                return refuse(
                    RefusalKind::Conflict,
                    format!("job {job} was cancelled; a cancelled job is not restored (delete it with flotilla delete --job {job}, then submit it again; [checkpoint] resume_from starts from its checkpoints)"),
                )
            }
            JobState::Failed if reason != RestoreReason::Operator => {
                return refuse(
                    RefusalKind::Conflict,
                    format!("job {job} failed; only an operator's restore (flotilla restore) resumes it"),
                )
            }
            _ => {}
        }
        let next = Generation(j.generation.0 + 1);
        if generation != next {
            return refuse(
                RefusalKind::Fenced,
                format!("restore of job {job} into generation {generation}: the job is in {}, so the next is {next}", j.generation),
            );
        }
        let operator = reason == RestoreReason::Operator;
        let step = match from {
            Some(id) => {
                let c = checkpoint_mut(j, &job, id)?;
                // an operator may also go back to a checkpoint of a line
                // they abandoned earlier; nothing else restores from one
                let usable = c.state == CheckpointState::Committed
                    || (operator && c.state == CheckpointState::Abandoned);
                if !usable {
                    return refuse(
                        RefusalKind::Conflict,
                        format!(
                            "checkpoint {id} of job {job} is {}; only a committed checkpoint is restored from (flotilla checkpoints --job {job} lists them)",
                            c.state.as_str()
                        ),
                    );
                }
                c.state = CheckpointState::Committed;
                c.step
            }
            None => Step(0),
        };
        let mut events = abort_pending(j, &job, &AbortReason::GenerationChanged.to_string(), Some(now_ms));
        if operator {
            // the operator's choice is the head of the job's history: the
            // line after it is never restored automatically again
            for c in j.checkpoints.values_mut() {
                if c.state == CheckpointState::Committed && c.step > step {
                    c.state = CheckpointState::Abandoned;
                    c.reason = Some(format!("abandoned by an operator's restore to step {step}"));
                }
            }
            // an operator's restore is a fresh start for the failure budget
            j.failures_ms.clear();
            j.operator_head = Some((generation, step));
        }
        j.generation = generation;
        j.restores += 1;
        *j.restores_by_reason.entry(reason).or_default() += 1;
        j.restored_from = from;
        // of the new generation's mapping only the spares' ranks are known
        // now; the rest is recorded when it starts training (ResumeJob)
        j.holders = takeovers.iter().map(|t| (t.rank, t.worker)).collect();
        j.note(now_ms, JobEventKind::Restore { generation, from, step, reason, detail, takeovers });
        if from.is_none() && reason == RestoreReason::CorruptCheckpoint {
            // nothing committed is left to go back to: loud, not a quiet step 0
            j.every_condemned_total += 1;
            let condemned = j.condemned_total;
            j.note(now_ms, JobEventKind::EveryCheckpointCondemned { condemned, step: j.start_step() });
        }
        if reason.is_failure() {
            j.failures_ms.retain(|t| now_ms.saturating_sub(*t) < RESTART_WINDOW_MS);
            j.failures_ms.push(now_ms);
            if j.failures_ms.len() as u64 > u64::from(j.spec.failure.max_restarts) {
                let exceeded = JobEventKind::RestartsExceeded {
                    job: job.clone(),
                    failures: j.failures_ms.len() as u64,
                    max_restarts: j.spec.failure.max_restarts,
                };
                let error = exceeded.to_string();
                j.note(now_ms, exceeded);
                events.extend(set_state(j, &job, JobState::Failed, Some(error)));
                return Ok(events);
            }
        }
        events.push(Event::Restoring { job: job.clone(), generation, from, reason });
        events.extend(set_state(j, &job, JobState::Restoring, None));
        Ok(events)
    }

    /// The condemned checkpoint `id` of `job`, which `ClearCorrupt` may
    /// commit again; or why not. Asked before its shards are re-read, so
    /// nothing is read for a checkpoint the ledger would refuse.
    pub fn clearable(&self, job: &JobName, id: CheckpointId) -> Result<(&Job, &Checkpoint), Refusal> {
        let Some(j) = self.jobs.get(job) else {
            return refuse(
                RefusalKind::NotFound,
                format!("no job named {job}; submit it first (flotilla submit)"),
            );
        };
        let Some(c) = j.checkpoints.get(&id) else {
            return refuse(
                RefusalKind::NotFound,
                format!("job {job} has no checkpoint {id}; list them with flotilla checkpoints"),
            );
        };
        if c.state != CheckpointState::Corrupt {
            let state = c.state.as_str();
            return refuse(
                RefusalKind::Conflict,
                format!("checkpoint {id} of job {job} is {state}; only a condemned one can be cleared"),
            );
        }
        Ok((j, c))
    }

    fn job_mut(&mut self, job: &JobName) -> Result<&mut Job, Refusal> {
        match self.jobs.get_mut(job) {
            Some(j) => Ok(Arc::make_mut(j)),
            None => refuse(
                RefusalKind::NotFound,
                format!("no job named {job}; submit it first (flotilla submit)"),
            ),
        }
    }

    /// The job, checked to be non-terminal and in `generation`.
    fn live_job(&mut self, job: &JobName, generation: Generation) -> Result<&mut Job, Refusal> {
        let j = self.job_mut(job)?;
        if j.state.is_terminal() {
            return refuse(RefusalKind::Conflict, format!("job {job} already {}", j.state.as_str()));
        }
        if j.generation != generation {
            return refuse(
                RefusalKind::Fenced,
                format!(
                    "job {job} is in generation {}, the command is for generation {generation}",
                    j.generation
                ),
            );
        }
        Ok(j)
    }
}

fn checkpoint_mut<'a>(
    j: &'a mut Job,
    job: &JobName,
    id: CheckpointId,
) -> Result<&'a mut Checkpoint, Refusal> {
    match j.checkpoints.get_mut(&id) {
        Some(c) => Ok(c),
        None => refuse(
            RefusalKind::NotFound,
            format!("job {job} has no checkpoint {id}; list them with flotilla checkpoints"),
        ),
    }
}

fn set_state(j: &mut Job, job: &JobName, state: JobState, error: Option<String>) -> Vec<Event> {
    j.error = error;
    j.blocked = None;
    if j.state == state {
        return vec![];
    }
    j.state = state;
    vec![Event::JobState { job: job.clone(), state }]
}

/// Aborted and deleted checkpoints kept in the ledger per job, newest first.
pub const TOMBSTONES: usize = 32;

/// Keeps the ledger bounded: an aborted or deleted checkpoint keeps only
/// its id, state, step and reason (a tombstone: its files are deleted from
/// it, and reports for it are answered Stale); beyond the newest
/// [`TOMBSTONES`], tombstones are forgotten (their directories are swept
/// as unknown to the ledger).
/// Whether [`prune`] would change `j` (most commands leave every job as it
/// was, and a job shared with a snapshot is then not copied).
fn needs_prune(j: &Job) -> bool {
    let mut tombstones = 0;
    for c in j.checkpoints.values().filter(|c| j.restored_from != Some(c.id)) {
        if matches!(c.state, CheckpointState::Aborted | CheckpointState::Deleted) {
            if !c.shards.is_empty() {
                return true;
            }
            tombstones += 1;
        }
    }
    tombstones > TOMBSTONES
}

fn prune(j: &mut Job) {
    let mut tombstones = Vec::new();
    for c in j.checkpoints.values_mut() {
        // the checkpoint the generation started from stays whole: its step
        // is the generation's start step, its shards the restore point
        if j.restored_from == Some(c.id) {
            continue;
        }
        if matches!(c.state, CheckpointState::Aborted | CheckpointState::Deleted) {
            c.shards = Vec::new();
            tombstones.push(c.id);
        }
    }
    let excess = tombstones.len().saturating_sub(TOMBSTONES);
    for id in &tombstones[..excess] {
        j.checkpoints.remove(id);
    }
    j.pruned_total += excess as u64;
}

fn abort_pending(j: &mut Job, job: &JobName, reason: &str, now_ms: Option<u64>) -> Vec<Event> {
    let mut events = Vec::new();
    for c in j.checkpoints.values_mut().filter(|c| c.state == CheckpointState::Pending) {
        c.state = CheckpointState::Aborted;
        c.ended_ms = now_ms.or(c.ended_ms);
        c.reason = Some(reason.to_string());
        events.push(Event::CheckpointAborted { job: job.clone(), id: c.id, reason: reason.to_string() });
    }
    j.aborted_total += events.len() as u64;
    events
}

#[cfg(test)]
mod tests;
