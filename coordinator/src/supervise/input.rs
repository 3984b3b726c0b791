//! What reaches the supervisor task: connections, observations, proposal
//! outcomes and operators' requests. The worker API and the file threads
//! send these; the task reads them.

use super::{CheckpointOutcome, ConnId, Observation, ProposalKey};
use crate::ledger::Event;
use flotilla_shared::ids::JobName;
use flotilla_shared::wire::CoordinatorMessage;
use tokio::sync::{mpsc, oneshot};

/// Input of the supervisor task.
pub enum SupervisorInput {
    /// A worker connection registered; directives for it go to `tx`,
    /// tagged with `conn` (the ranks of a node session share one queue).
    Connected {
        /// Connection (or one rank of a node session).
        conn: ConnId,
        /// Its outbound queue.
        tx: Outbox,
    },
    /// Something happened.
    Observe(Observation),
    /// An operator asks for a checkpoint now and waits for `reply`; dropped
    /// unanswered when this replica stops supervising.
    CheckpointNow {
        /// Job.
        job: JobName,
        /// Where the outcome goes.
        reply: oneshot::Sender<CheckpointOutcome>,
    },
    /// A proposal's outcome: the applied events, or none (refused or failed).
    Proposed {
        /// Which proposal.
        key: ProposalKey,
        /// What it changed.
        events: Vec<Event>,
    },
}

/// A directive, or the request to close the connection after the ones before it.
pub type CoordinatorMessageOrClose = Option<CoordinatorMessage>;

/// A connection's outbound queue: directives tagged with the `ConnId` they
/// are for (a node session's ranks each have their own).
pub type Outbox = mpsc::Sender<(ConnId, CoordinatorMessageOrClose)>;
