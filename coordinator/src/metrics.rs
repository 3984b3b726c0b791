//! The coordinator's Prometheus metrics (SPEC §9), one registry per process.

use crate::api::{SpareStatus, WorkerView};

/// A job's ranks and spares, as the leader's supervisor last saw them.
pub type JobWorkers = (Vec<WorkerView>, Vec<SpareStatus>);
use crate::ledger::{JobState, State};
use crate::raft::replica::{NodeStatus, Role};
use crate::supervise::{RankState, SpareState};
use flotilla_shared::ids::JobName;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A counter series: metric name and label values.
type SeriesKey = (String, Vec<String>);

/// Every coordinator metric, registered in [`Metrics::registry`].
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    term: IntGauge,
    is_leader: IntGauge,
    commit_index: IntGauge,
    applied_index: IntGauge,
    snapshot_bytes: IntGauge,
    /// Proposals by outcome (`applied`, `refused`, `dropped`, `timeout`, `no_leader`).
    pub proposals: IntCounterVec,
    /// Time from proposal to applied, on the proposing replica.
    pub proposal_seconds: Histogram,
    /// Snapshots received from a leader and installed.
    pub snapshots_applied: IntCounter,
    /// Snapshots taken locally (log compactions).
    pub snapshots_created: IntCounter,
    job_generation: IntGaugeVec,
    job_step: IntGaugeVec,
    job_state: IntGaugeVec,
    job_workers: IntGaugeVec,
    job_spares: IntGaugeVec,
    job_spares_wanted: IntGaugeVec,
    heartbeat_age: GaugeVec,
    /// Worker sessions open on this replica: `rank` (one rank per
    /// connection) or `node` (a node agent's, every rank of a host).
    pub worker_sessions: IntGaugeVec,
    peer_last_contact: GaugeVec,
    peer_match_index: IntGaugeVec,
    latest_committed_step: IntGaugeVec,
    checkpoints: IntCounterVec,
    restores: IntCounterVec,
    last_condemned: IntGaugeVec,
    every_condemned: IntCounterVec,
    /// Begin to commit of each checkpoint (observed by the leader).
    pub checkpoint_seconds: HistogramVec,
    /// Restore decided to every rank training again (observed by the leader).
    pub recovery_seconds: HistogramVec,
    /// Whole-job restores by the slowest source a rank's shard came from
    /// (counted by the leader that saw every rank's report).
    pub restore_source: IntCounterVec,
    /// Last ledger value exported per counter series, to export increments.
    exported: Arc<Mutex<HashMap<SeriesKey, u64>>>,
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
        flotilla_shared::register_process_metrics(&registry);
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
        let snapshot_bytes = gauge(
            "flotilla_raft_snapshot_bytes",
            "Size of this replica's latest ledger snapshot (what a new replica is sent first).",
        );
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
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let seconds_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let histogram_vec = |name: &str, help: &str| {
            let buckets = vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["job"])
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("registered once");
            h
        };
        let job_generation = gauge_vec(
            "flotilla_job_generation",
            "Current generation of the job (1 + whole-job restores).",
            &["job"],
        );
        let job_step = gauge_vec(
            "flotilla_job_step",
            "Slowest rank's step in the current generation (leader only).",
            &["job"],
        );
        let job_state = gauge_vec(
            "flotilla_job_state",
            "1 for the job's current state, 0 for the others.",
            &["job", "state"],
        );
        let job_workers = gauge_vec(
            "flotilla_job_workers",
            "Ranks of the job by what they report (leader only); `missing` = not connected.",
            &["job", "state"],
        );
        let job_spares = gauge_vec(
            "flotilla_job_spares",
            "Spare workers of the job holding no rank, by state: ready (could take a rank at once) or starting (leader only).",
            &["job", "state"],
        );
        let job_spares_wanted = gauge_vec(
            "flotilla_job_spares_wanted",
            "Spares the job's spec asks to have ready ([failure] spares).",
            &["job"],
        );
        let heartbeat_age = seconds_vec(
            "flotilla_worker_heartbeat_age_seconds",
            "Since the leader last heard from each rank it knows (leader only; a live rank stays under the heartbeat interval).",
            &["job", "rank"],
        );
        let worker_sessions = gauge_vec(
            "flotilla_worker_sessions",
            "Worker sessions open on this replica, by kind: rank (one rank per connection) or node (a node agent's, all of a host's ranks on one connection).",
            &["kind"],
        );
        for kind in ["rank", "node"] {
            worker_sessions.with_label_values(&[kind]).set(0);
        }
        let peer_last_contact = seconds_vec(
            "flotilla_raft_peer_last_contact_seconds",
            "Since the leader last received a message from each replica (leader only; itself 0). Above a second or two, the replica is unreachable.",
            &["peer"],
        );
        let peer_match_index = gauge_vec(
            "flotilla_raft_peer_match_index",
            "Highest log index known to be on each replica (leader only).",
            &["peer"],
        );
        let latest_committed_step = gauge_vec(
            "flotilla_latest_committed_step",
            "Step of the job's latest committed checkpoint (0 before the first).",
            &["job"],
        );
        let checkpoints = counter_vec(
            "flotilla_checkpoints_total",
            "Checkpoints that ended, by outcome (committed, aborted; condemned: committed, then found corrupt).",
            &["job", "outcome"],
        );
        let restores =
            counter_vec("flotilla_restores_total", "Whole-job restores, by reason.", &["job", "reason"]);
        let last_condemned = gauge_vec(
            "flotilla_last_condemned_checkpoint",
            "Id of the job's last checkpoint condemned by a checksum or format mismatch (0: none).",
            &["job"],
        );
        let every_condemned = counter_vec(
            "flotilla_every_checkpoint_condemned_total",
            "Restores that went back to the job's start (step 0, or its resume_from origin) because every committed checkpoint had been condemned.",
            &["job"],
        );
        let checkpoint_seconds = histogram_vec(
            "flotilla_checkpoint_duration_seconds",
            "Time from a checkpoint's begin to its commit.",
        );
        let recovery_seconds = histogram_vec(
            "flotilla_recovery_duration_seconds",
            "Time from a whole-job restore being decided to every rank training again.",
        );
        let restore_source = counter_vec(
            "flotilla_restore_source_total",
            "Whole-job restores by where the slowest rank's shard came from: memory (its own), peer (another worker's copy) or storage.",
            &["job", "source"],
        );
        Self {
            restore_source,
            job_generation,
            job_step,
            job_state,
            job_workers,
            job_spares,
            job_spares_wanted,
            heartbeat_age,
            worker_sessions,
            peer_last_contact,
            peer_match_index,
            latest_committed_step,
            checkpoints,
            restores,
            last_condemned,
            every_condemned,
            checkpoint_seconds,
            recovery_seconds,
            exported: Arc::default(),
            registry,
            term,
            is_leader,
            commit_index,
            applied_index,
            snapshot_bytes,
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
        self.snapshot_bytes.set(s.snapshot_bytes as i64);
    }

    /// Refreshes the peer series from the leader's replication progress
    /// (empty on a follower: its series disappear).
    pub fn observe_peers(&self, progress: &[crate::raft::replica::PeerProgress]) {
        self.peer_last_contact.reset();
        self.peer_match_index.reset();
        for p in progress {
            let peer = p.id.to_string();
            if let Some(ms) = p.last_contact_ms {
                self.peer_last_contact.with_label_values(&[&peer]).set(ms as f64 / 1000.0);
            }
            self.peer_match_index.with_label_values(&[&peer]).set(p.matched as i64);
        }
    }

    /// Refreshes the job metrics from the ledger (every replica) and the
    /// supervisor's view of the workers (the leader only), before a scrape.
    pub fn observe_ledger(&self, state: &State, view: &dyn Fn(&JobName) -> JobWorkers, leader: bool) {
        self.job_step.reset();
        self.job_workers.reset();
        self.job_spares.reset();
        self.job_spares_wanted.reset();
        self.heartbeat_age.reset();
        // a deleted job's series go with it (its gauges are set again below
        // for every job in the ledger)
        self.job_generation.reset();
        self.job_state.reset();
        self.latest_committed_step.reset();
        self.last_condemned.reset();
        self.forget_deleted_jobs(state);
        for job in state.jobs.values() {
            let name = job.spec.name.as_str();
            self.job_generation.with_label_values(&[name]).set(job.generation.0 as i64);
            self.job_spares_wanted.with_label_values(&[name]).set(i64::from(job.spec.failure.spares));
            for s in JobState::ALL {
                self.job_state.with_label_values(&[name, s.as_str()]).set(i64::from(job.state == s));
            }
            let latest = job.latest_committed().map_or(0, |c| c.step.0);
            self.latest_committed_step.with_label_values(&[name]).set(latest as i64);
            self.export_counter(&self.checkpoints, &[name, "committed"], job.committed_total);
            self.export_counter(&self.checkpoints, &[name, "aborted"], job.aborted_total);
            self.export_counter(&self.checkpoints, &[name, "condemned"], job.condemned_total);
            self.last_condemned.with_label_values(&[name]).set(job.last_condemned.map_or(0, |c| c.0 as i64));
            self.export_counter(&self.every_condemned, &[name], job.every_condemned_total);
            for (reason, n) in &job.restores_by_reason {
                self.export_counter(&self.restores, &[name, reason.as_str()], *n);
            }
            // an ended job's workers have gone: none is missing, none runs
            if leader && job.state.is_terminal() {
                for s in RankState::ALL {
                    self.job_workers.with_label_values(&[name, s.as_str()]).set(0);
                }
            }
            if leader && !job.state.is_terminal() {
                let (ws, spares) = view(&job.spec.name);
                for s in SpareState::ALL {
                    let n = spares.iter().filter(|v| v.state == s).count();
                    self.job_spares.with_label_values(&[name, s.as_str()]).set(n as i64);
                }
                if ws.len() == job.spec.world_size as usize {
                    let slowest = ws.iter().map(|w| w.step.0).min().unwrap_or(0);
                    self.job_step.with_label_values(&[name]).set(slowest as i64);
                }
                let mut by_state: HashMap<RankState, i64> = HashMap::new();
                for w in &ws {
                    *by_state.entry(w.state).or_default() += 1;
                    if let Some(age) = w.heartbeat_age_ms {
                        let rank = w.rank.to_string();
                        self.heartbeat_age.with_label_values(&[name, &rank]).set(age as f64 / 1000.0);
                    }
                }
                by_state.insert(RankState::Missing, i64::from(job.spec.world_size) - ws.len() as i64);
                // every state is exported, 0 when no rank is in it: a rank
                // that moves on leaves no stale count behind
                for s in RankState::ALL {
                    let n = by_state.get(&s).copied().unwrap_or(0);
                    self.job_workers.with_label_values(&[name, s.as_str()]).set(n);
                }
            }
        }
    }

    /// Drops the counter series of jobs no longer in the ledger (deleted):
    /// a job submitted again under the name counts from 0 (a counter reset,
    /// which `rate()` understands).
    fn forget_deleted_jobs(&self, state: &State) {
        let names: std::collections::HashSet<&str> = state.jobs.keys().map(|j| j.as_str()).collect();
        let counters = [&self.checkpoints, &self.every_condemned, &self.restores];
        let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        exported.retain(|(metric, labels), _| {
            let Some(job) = labels.first() else { return true };
            if names.contains(job.as_str()) {
                return true;
            }
            let values: Vec<&str> = labels.iter().map(String::as_str).collect();
            for c in counters.iter().filter(|c| prometheus::core::Collector::desc(**c)[0].fq_name == *metric)
            {
                let _ = c.remove_label_values(&values);
            }
            false
        });
    }

    /// Exports a ledger count as a Prometheus counter: adds what grew since
    /// the last export (ledger counts never decrease).
    fn export_counter(&self, counter: &IntCounterVec, labels: &[&str], value: u64) {
        let key = (
            prometheus::core::Collector::desc(counter)[0].fq_name.clone(),
            labels.iter().map(|l| l.to_string()).collect(),
        );
        let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        let last = exported.entry(key).or_insert(0);
        if value > *last {
            counter.with_label_values(labels).inc_by(value - *last);
            *last = value;
        } else {
            // make the series exist (at 0) before its first increment
            counter.with_label_values(labels).inc_by(0);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Command;
    use flotilla_shared::spec::JobSpec;

    #[test]
    fn a_deleted_job_leaves_no_series_and_its_name_counts_afresh() {
        let spec = JobSpec::from_toml(
            "name = \"a\"\nworld_size = 1\n[checkpoint]\nevery_steps = 10\nroot = \"/ckpt\"\n",
        )
        .unwrap();
        let job = JobName::new("a").unwrap();
        let mut st = State::default();
        st.apply(Command::SubmitJob { spec: spec.clone(), now_ms: 1, origin: None }).unwrap();
        st.apply(Command::FailJob { job: job.clone(), error: "x".into() }).unwrap();
        let m = Metrics::new();
        let none = |_: &JobName| (Vec::new(), Vec::new());
        m.observe_ledger(&st, &none, true);
        let text = m.encode();
        assert!(text.contains("flotilla_job_state{job=\"a\",state=\"failed\"} 1"), "{text}");
        assert!(text.contains("flotilla_job_state{job=\"a\",state=\"cancelled\"} 0"), "{text}");
        st.apply(Command::DeleteJob { job: job.clone(), remove_checkpoints: false }).unwrap();
        m.observe_ledger(&st, &none, true);
        let text = m.encode();
        assert!(!text.contains("job=\"a\""), "{text}");
        st.apply(Command::SubmitJob { spec, now_ms: 2, origin: None }).unwrap();
        st.apply(Command::CancelJob { job, now_ms: 3 }).unwrap();
        m.observe_ledger(&st, &none, true);
        let text = m.encode();
        assert!(text.contains("flotilla_job_state{job=\"a\",state=\"cancelled\"} 1"), "{text}");
        assert!(text.contains("flotilla_checkpoints_total{job=\"a\",outcome=\"committed\"} 0"), "{text}");
    }
}
