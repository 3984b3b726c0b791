//! The coordinator's Prometheus metrics (SPEC §9), one registry per process.

use crate::node::{NodeStatus, Role};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Every coordinator metric, registered in [`Metrics::registry`].
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    term: IntGauge,
    is_leader: IntGauge,
    commit_index: IntGauge,
    applied_index: IntGauge,
    /// Proposals by outcome (`applied`, `refused`, `dropped`, `timeout`, `no_leader`).
    pub proposals: IntCounterVec,
    /// Time from proposal to applied, on the proposing replica.
    pub proposal_seconds: Histogram,
    /// Snapshots received from a leader and installed.
    pub snapshots_applied: IntCounter,
    /// Snapshots taken locally (log compactions).
    pub snapshots_created: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let term = gauge("flotilla_raft_term", "Current Raft term of this replica.");
        let is_leader = gauge("flotilla_raft_is_leader", "1 if this replica is the Raft leader, else 0.");
        let commit_index = gauge("flotilla_raft_commit_index", "Highest Raft log index known committed.");
        let applied_index =
            gauge("flotilla_raft_applied_index", "Highest Raft log index applied to the ledger.");
        let proposals = IntCounterVec::new(
            Opts::new("flotilla_raft_proposals_total", "Proposals made on this replica, by outcome."),
            &["outcome"],
        )
        .expect("valid metric");
        registry.register(Box::new(proposals.clone())).expect("registered once");
        let proposal_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "flotilla_raft_proposal_duration_seconds",
                "Time from proposal to applied on the proposing replica (fsync and a quorum round trip included).",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .expect("valid metric");
        registry.register(Box::new(proposal_seconds.clone())).expect("registered once");
        let snapshots_applied = counter(
            "flotilla_raft_snapshots_applied_total",
            "State-machine snapshots received from the leader and installed.",
        );
        let snapshots_created = counter(
            "flotilla_raft_snapshots_created_total",
            "State-machine snapshots taken here to compact the log.",
        );
        Self {
            registry,
            term,
            is_leader,
            commit_index,
            applied_index,
            proposals,
            proposal_seconds,
            snapshots_applied,
            snapshots_created,
        }
    }

    /// Updates the gauges from a node status.
    pub fn observe_status(&self, s: &NodeStatus) {
        self.term.set(s.term as i64);
        self.is_leader.set(i64::from(s.role == Role::Leader));
        self.commit_index.set(s.commit_index as i64);
        self.applied_index.set(s.applied_index as i64);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}
