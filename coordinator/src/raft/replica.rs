//! What a replica says of itself: its role and indexes, the membership and
//! the leader's view of each member's replication. Plain data, shared by the
//! Raft node that publishes it, the API that shows it and the metrics that
//! export it (kept here so that none of them imports another for it).

use flotilla_shared::ids::NodeId;
use serde::{Deserialize, Serialize};

/// A replica's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Campaigning (pre-vote or vote).
    Candidate,
    /// The leader.
    Leader,
}

/// What a node publishes after every turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This replica.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// Current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader_id: Option<NodeId>,
    /// Highest committed index.
    pub commit_index: u64,
    /// Highest applied index.
    pub applied_index: u64,
    /// Index of its latest snapshot.
    pub snapshot_index: u64,
    /// Size of its latest snapshot's ledger.
    pub snapshot_bytes: u64,
    /// First index still in the log.
    pub first_index: u64,
    /// Last index in the log.
    pub last_index: u64,
    /// Catching up after starting empty: not voting yet.
    pub joining: bool,
}

/// One single-step membership change (one at a time, so no joint consensus).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum MembershipChange {
    /// A new replica, as a learner (it receives the log, it does not vote).
    AddLearner {
        /// Its id.
        id: NodeId,
        /// Its Raft address.
        raft_addr: String,
    },
    /// A learner that caught up becomes a voter.
    Promote {
        /// Its id.
        id: NodeId,
    },
    /// A voter or learner leaves.
    Remove {
        /// Its id.
        id: NodeId,
    },
}

/// The membership as the applied log has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Learners.
    pub learners: Vec<NodeId>,
    /// Each member's replication progress, as the leader sees it (empty elsewhere).
    pub progress: Vec<PeerProgress>,
}

/// A member's replication progress on the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerProgress {
    /// The member.
    pub id: NodeId,
    /// Highest log index known to be on it.
    pub matched: u64,
    /// raft-rs's replication state (`Probe`, `Replicate`, `Snapshot`).
    pub state: String,
    /// Heard from since the last quorum check.
    pub recent_active: bool,
    /// How long ago the leader last received a message from it, in ms
    /// (to the tick; `None`: never since it became leader).
    #[serde(default)]
    pub last_contact_ms: Option<u64>,
}
