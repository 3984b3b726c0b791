//! The Raft node: one tokio task owns the raft-rs `RawNode`.
//!
//! Each loop turn: tick on the timer, step peer messages, take proposals,
//! then handle the `Ready` strictly in this order:
//! ```text
//!   send leader messages (safe before persisting: raft-rs separates them)
//!   persist snapshot + entries + hard state, one fdatasync'ed batch
//!   install a received snapshot into the state machine
//!   apply committed entries → answer waiting proposals
//!   send persisted messages (votes, append responses) — only now
//!   advance → persist commit index → send → apply → advance_apply
//! ```
//! A storage error stops the node (the task returns it): a replica that
//! cannot persist must not vote or acknowledge.
//!
//! Proposals carry a request id in the entry's context; the proposer learns
//! the applied [`Outcome`] when the entry is applied, or that it was dropped
//! (leadership lost) or timed out. Followers forward proposals to the leader
//! (raft-rs does this), which is how a replica announces itself.

use crate::ledger::{Command, Outcome, State};
use crate::ledger::{Refusal, RefusalKind};
use crate::metrics::Metrics;
pub use crate::raft::replica::{Membership, MembershipChange, NodeStatus, PeerProgress, Role};
use crate::raft::storage::{LogStore, StoreError};
use flotilla_shared::ids::NodeId;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{Config, RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This replica's id.
    pub id: NodeId,
    /// Every voter, itself included.
    pub voters: Vec<NodeId>,
    /// Where the log lives.
    pub data_dir: PathBuf,
    /// Raft's logical clock.
    pub tick: Duration,
    /// Ticks without a leader before an election (randomized up to 2×).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries beyond the last snapshot before a new one is taken
    /// and the log compacted.
    pub snapshot_threshold: u64,
    /// How long a proposal may wait to be applied.
    pub proposal_timeout: Duration,
    /// Started on an empty data dir in an existing cluster (`identity`):
    /// neither vote nor campaign until it holds everything committed.
    pub joining: bool,
}

impl NodeConfig {
    /// Defaults for `id` among `voters` storing into `data_dir`: a 50 ms
    /// tick, heartbeats every 100 ms, elections after 0.6–1.2 s of silence.
    pub fn new(id: NodeId, voters: Vec<NodeId>, data_dir: PathBuf) -> Self {
        Self {
            id,
            voters,
            data_dir,
            tick: Duration::from_millis(50),
            election_ticks: 12,
            heartbeat_ticks: 2,
            snapshot_threshold: 10_000,
            proposal_timeout: Duration::from_secs(10),
            joining: false,
        }
    }
}

/// Why a proposal has no outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known right now (an election is in progress).
    #[error("no leader is known yet (election in progress); retry shortly")]
    NoLeader,
    /// The proposal was dropped (leadership changed); it may or may not apply.
    #[error("the proposal was dropped because leadership changed; retry on the new leader")]
    Dropped,
    /// It was not applied in time.
    #[error("the proposal was not applied within {0:?}; the cluster may lack a quorum")]
    Timeout(Duration),
    /// The node has stopped.
    #[error("the raft node has stopped: {0}")]
    Stopped(String),
}

/// Sends raft messages to peers; must never block the Raft loop.
pub trait Transport: Send + Sync + 'static {
    /// Queues `msgs` for their recipients (`msg.to`), dropping what cannot be queued.
    fn send(&self, msgs: Vec<Message>);
    /// Starts sending to a replica added to the membership.
    fn add_peer(&self, _id: NodeId, _addr: String) {}
    /// Stops sending to a replica removed from the membership.
    fn remove_peer(&self, _id: NodeId) {}
}

enum Input {
    Propose { cmd: Box<Command>, reply: oneshot::Sender<Result<Outcome, ProposeError>> },
    Change { change: MembershipChange, reply: oneshot::Sender<Result<Outcome, ProposeError>> },
}

/// The envelope in each entry's data.
#[derive(Serialize, Deserialize)]
struct Envelope {
    cmd: Command,
}

/// A ledger command as a Raft entry's bytes.
pub fn encode_command(cmd: Command) -> Vec<u8> {
    rmp_serde::to_vec_named(&Envelope { cmd }).expect("commands always serialize")
}

/// A Raft entry's bytes as a ledger command (what every replica applies).
pub fn decode_command(data: &[u8]) -> Result<Command, rmp_serde::decode::Error> {
    rmp_serde::from_slice::<Envelope>(data).map(|env| env.cmd)
}

/// A handle to a running node: propose, read status and the applied state.
#[derive(Clone)]
pub struct NodeHandle {
    inputs: mpsc::Sender<Input>,
    status: watch::Receiver<NodeStatus>,
    membership: watch::Receiver<Membership>,
    /// The applied state, as of the last applied batch.
    state: Published,
}

/// The applied state as the node last published it: a snapshot replaced
/// after each applied batch. A reader clones the `Arc` and reads without
/// any lock, so no reader (the supervisor's reconcile, a status request)
/// ever holds up the node's next apply.
#[derive(Clone, Default)]
struct Published(Arc<RwLock<Arc<State>>>);

impl Published {
    fn get(&self) -> Arc<State> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, state: &State) {
        // the copy shares every job with the state it was taken from
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state.clone());
    }
}

impl NodeHandle {
    /// Proposes `cmd` and waits until it is applied.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.inputs
            .send(Input::Propose { cmd: Box::new(cmd), reply })
            .await
            .map_err(|_| ProposeError::Stopped("input channel closed".into()))?;
        rx.await.map_err(|_| ProposeError::Stopped("node task ended".into()))?
    }

    /// Queues `cmd` for proposal without waiting; proposals queued from one
    /// task reach the log in the order they were queued. The receiver yields
    /// the outcome once applied (or why not).
    pub fn submit(&self, cmd: Command) -> oneshot::Receiver<Result<Outcome, ProposeError>> {
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.inputs.try_send(Input::Propose { cmd: Box::new(cmd), reply }) {
            let (Input::Propose { reply, .. } | Input::Change { reply, .. }) = e.into_inner();
            let _ = reply
                .send(Err(ProposeError::Stopped("the raft node's input queue is full or closed".into())));
        }
        rx
    }

    /// Proposes a membership change and waits until it is applied (or
    /// refused: not a valid change now, or another one is in progress).
    pub async fn change_membership(&self, change: MembershipChange) -> Result<Outcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.inputs
            .send(Input::Change { change, reply })
            .await
            .map_err(|_| ProposeError::Stopped("input channel closed".into()))?;
        rx.await.map_err(|_| ProposeError::Stopped("node task ended".into()))?
    }

    /// The membership and, on the leader, each member's progress.
    pub fn membership(&self) -> Membership {
        self.membership.borrow().clone()
    }

    /// The latest published status.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// A receiver that changes with the status.
    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// Reads the applied state machine (the last published snapshot).
    pub fn read_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.get())
    }

    /// The applied state machine as of the last applied batch; it does not
    /// change while held.
    pub fn state(&self) -> Arc<State> {
        self.state.get()
    }
}

/// Why the node task ended.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The log store failed: the node stops rather than risk acknowledging
    /// what is not durable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// raft-rs refused the configuration or failed.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The stored snapshot could not be decoded.
    #[error("cannot decode the state-machine snapshot at index {index}: {why}")]
    Snapshot {
        /// Snapshot index.
        index: u64,
        /// Decoder message.
        why: String,
    },
}

struct Pending {
    reply: oneshot::Sender<Result<Outcome, ProposeError>>,
    started: Instant,
    /// Log index of the entry, when proposed as leader.
    index: Option<u64>,
}

/// Starts a node: opens the log, rebuilds the state machine from the latest
/// snapshot (the log replays the rest) and spawns the Raft task.
pub fn start(
    cfg: NodeConfig,
    transport: Arc<dyn Transport>,
    peer_rx: mpsc::Receiver<Message>,
    metrics: Metrics,
) -> Result<(NodeHandle, JoinHandle<Result<(), NodeError>>), NodeError> {
    let voters: Vec<u64> = cfg.voters.iter().map(|n| n.0).collect();
    // a joining replica learns the membership from the leader's snapshot
    // (the flags may no longer describe it); a new cluster starts with them
    let initial_voters: &[u64] = if cfg.joining { &[] } else { &voters };
    let store = LogStore::open(&cfg.data_dir, initial_voters)?;
    let snapshot_index = store.latest_snapshot().get_metadata().index;
    let state = if snapshot_index > 0 { decode_state(store.latest_snapshot())? } else { State::default() };
    let raft_cfg = Config {
        id: cfg.id.0,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied: snapshot_index,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        ..Config::default()
    };
    raft_cfg.validate()?;
    let logger = crate::raft::log::slog_to_tracing(cfg.id);
    let mut raw = RawNode::new(&raft_cfg, store, &logger)?;
    if raw.raft.prs().conf().voters().ids().iter().eq([cfg.id.0]) && raw.raft.state != StateRole::Leader {
        // a one-node cluster needs no election timeout
        raw.campaign()?;
    }
    let published = Published::default();
    published.set(&state);
    let (inputs, input_rx) = mpsc::channel(1024);
    let initial = status_of(&raw, snapshot_index, cfg.joining);
    if cfg.joining {
        tracing::warn!(
            node = cfg.id.0,
            "started on an empty data dir in an existing cluster: not voting until caught up with the leader"
        );
    }
    let (status_tx, status) = watch::channel(initial);
    let (membership_tx, membership) = watch::channel(membership_of(&raw, &HashMap::new()));
    // members added by membership changes (the flags name the first ones)
    for (id, addr) in &state.replicas {
        transport.add_peer(*id, addr.clone());
    }
    let mut node = Node {
        joining: cfg.joining,
        cfg,
        raw,
        state,
        published: published.clone(),
        transport,
        metrics,
        pending: HashMap::new(),
        // request ids differ across restarts too: a replayed entry of an
        // earlier process never answers a proposal of this one
        next_request: rand::random::<u64>() & REQUEST_MASK,
        catch_up: None,
        last_heard: HashMap::new(),
        applied: snapshot_index,
        status_tx,
        membership_tx,
    };
    let task = tokio::spawn(async move { node.run(input_rx, peer_rx).await });
    Ok((NodeHandle { inputs, status, membership, state: published }, task))
}

fn decode_state(snap: &Snapshot) -> Result<State, NodeError> {
    rmp_serde::from_slice(&snap.data)
        .map_err(|e| NodeError::Snapshot { index: snap.get_metadata().index, why: e.to_string() })
}

fn membership_of(raw: &RawNode<LogStore>, last_heard: &HashMap<u64, std::time::Instant>) -> Membership {
    let conf = raw.raft.prs().conf();
    let mut voters: Vec<NodeId> = conf.voters().ids().iter().map(NodeId).collect();
    voters.sort();
    let mut learners: Vec<NodeId> = conf.learners().iter().copied().map(NodeId).collect();
    learners.sort();
    let progress = if raw.raft.state == StateRole::Leader {
        let mut p: Vec<PeerProgress> = raw
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| PeerProgress {
                id: NodeId(*id),
                matched: pr.matched,
                state: match pr.state {
                    raft::ProgressState::Probe => "Probe",
                    raft::ProgressState::Replicate => "Replicate",
                    raft::ProgressState::Snapshot => "Snapshot",
                }
                .into(),
                recent_active: pr.recent_active || *id == raw.raft.id,
                last_contact_ms: if *id == raw.raft.id {
                    Some(0)
                } else {
                    last_heard.get(id).map(|at| at.elapsed().as_millis() as u64 / 100 * 100)
                },
            })
            .collect();
        p.sort_by_key(|p| p.id);
        p
    } else {
        Vec::new()
    };
    Membership { voters, learners, progress }
}

/// Whether a joining replica whose durable log ends at `last` (with
/// `term_at` the term of an entry in it) holds everything committed, given
/// the latest leader append it saw, `(leader's term, leader's commit)`:
/// its log reaches that commit index at an entry of that leader's term, so
/// every entry committed before lies at or below it.
fn caught_up((term, commit): (u64, u64), last: u64, term_at: impl Fn(u64) -> Option<u64>) -> bool {
    last >= commit && term_at(commit) == Some(term)
}

/// The low 48 bits of a request id (the node id is in the top 16).
const REQUEST_MASK: u64 = (1 << 48) - 1;

fn status_of(raw: &RawNode<LogStore>, applied: u64, joining: bool) -> NodeStatus {
    let r = &raw.raft;
    let store = raw.store();
    NodeStatus {
        id: NodeId(r.id),
        role: match r.state {
            StateRole::Leader => Role::Leader,
            StateRole::Follower => Role::Follower,
            StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
        },
        term: r.term,
        leader_id: (r.leader_id != raft::INVALID_ID).then_some(NodeId(r.leader_id)),
        commit_index: r.raft_log.committed,
        applied_index: applied,
        snapshot_index: store.latest_snapshot().get_metadata().index,
        snapshot_bytes: store.latest_snapshot().get_data().len() as u64,
        first_index: raft::Storage::first_index(store).unwrap_or(0),
        last_index: r.raft_log.last_index(),
        joining,
    }
}

struct Node {
    cfg: NodeConfig,
    raw: RawNode<LogStore>,
    /// The applied state machine, owned here; readers see `published`.
    state: State,
    published: Published,
    transport: Arc<dyn Transport>,
    metrics: Metrics,
    pending: HashMap<u64, Pending>,
    next_request: u64,
    applied: u64,
    status_tx: watch::Sender<NodeStatus>,
    membership_tx: watch::Sender<Membership>,
    /// See [`NodeConfig::joining`].
    joining: bool,
    /// While joining: the latest leader's (term, commit index) from its appends.
    catch_up: Option<(u64, u64)>,
    /// When each peer's last message arrived (for status: reachable or not).
    last_heard: HashMap<u64, std::time::Instant>,
}

impl Node {
    async fn run(
        &mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut peer_rx: mpsc::Receiver<Message>,
    ) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(self.cfg.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = ticker.tick() => {
                    // a joining replica never campaigns: no election clock
                    if !self.joining {
                        self.raw.tick();
                    }
                    self.expire_proposals();
                    // on the tick, not every turn: progress moves with every append
                    self.publish_membership();
                }
                input = inputs.recv() => match input {
                    Some(Input::Propose { cmd, reply }) => self.propose(*cmd, reply),
                    Some(Input::Change { change, reply }) => self.change(change, reply),
                    None => break Ok(()),
                },
                Some(msg) = peer_rx.recv() => {
                    self.step(msg);
                    // take whatever else already arrived, then handle one Ready
                    while let Ok(msg) = peer_rx.try_recv() {
                        self.step(msg);
                    }
                }
            }
            if let Err(e) = self.handle_ready() {
                break Err(e);
            }
            self.check_caught_up();
            self.publish();
        };
        if let Err(e) = &result {
            tracing::error!(node = self.cfg.id.0, "raft node stopping: {e}");
        }
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(ProposeError::Stopped("the raft node stopped".into())));
        }
        result
    }

    fn step(&mut self, mut msg: Message) {
        // the transport's reports (it never forwards these from the network)
        match msg.get_msg_type() {
            MessageType::MsgUnreachable => return self.raw.report_unreachable(msg.from),
            MessageType::MsgSnapStatus => {
                let status = if msg.reject { SnapshotStatus::Failure } else { SnapshotStatus::Finish };
                if msg.reject {
                    tracing::warn!(
                        node = self.cfg.id.0,
                        peer = msg.from,
                        "a snapshot to the peer was lost; it is sent again"
                    );
                }
                return self.raw.report_snapshot(msg.from, status);
            }
            _ => {}
        }
        self.last_heard.insert(msg.from, std::time::Instant::now());
        if self.joining {
            match msg.get_msg_type() {
                // its earlier acknowledgements may have counted toward commits
                // it no longer holds: a vote now could elect a leader without them
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote | MessageType::MsgTimeoutNow => {
                    tracing::debug!(
                        node = self.cfg.id.0,
                        from = msg.from,
                        "joining: {:?} ignored",
                        msg.get_msg_type()
                    );
                    return;
                }
                // without a membership yet it can only start from a snapshot
                // (see maybe_compact): the leader probes again and sends one
                MessageType::MsgAppend
                    if msg.index == 0 && self.raw.raft.prs().conf().voters().ids().is_empty() =>
                {
                    return;
                }
                MessageType::MsgAppend => {
                    let target = (msg.term, msg.commit);
                    if self.catch_up.is_none_or(|c| target > c) {
                        self.catch_up = Some(target);
                    }
                }
                _ => {}
            }
        }
        match msg.get_msg_type() {
            // A replica restarted on an empty data dir hears of a commit
            // index beyond its log; it can only ever commit what it has.
            MessageType::MsgHeartbeat => {
                let last = self.raw.raft.raft_log.last_index();
                if msg.commit > last {
                    msg.commit = last;
                }
            }
            // Leader: a rejection hinting at a log shorter than what the peer
            // once acknowledged means the peer lost its log (wiped data dir).
            // Forget the acknowledgment and probe again from its real end; a
            // snapshot follows where the log is compacted. Lowering `matched`
            // never moves the commit index back, it only stops counting the
            // peer for entries it no longer has.
            MessageType::MsgAppendResponse if msg.reject && self.raw.raft.state == StateRole::Leader => {
                if let Some(pr) = self.raw.raft.mut_prs().get_mut(msg.from) {
                    if msg.reject_hint < pr.matched {
                        tracing::warn!(
                            node = self.cfg.id.0,
                            peer = msg.from,
                            "peer lost its log (had {} entries, now {}); re-sending from its end",
                            pr.matched,
                            msg.reject_hint
                        );
                        pr.matched = msg.reject_hint;
                        pr.become_probe();
                    }
                }
            }
            _ => {}
        }
        // errors here concern one message (e.g. from an unknown peer); log and go on
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(node = self.cfg.id.0, "raft step: {e}");
        }
    }

    /// A joining replica becomes a voter once its durable log reaches a
    /// leader's commit index *at an entry of that leader's term*: that
    /// leader had committed an entry of its own term, so everything
    /// committed before (whatever this replica acknowledged before it lost
    /// its data) lies at or below that index, and this replica now holds it.
    fn check_caught_up(&mut self) {
        let Some(target) = self.catch_up.filter(|_| self.joining) else { return };
        let (term, commit) = target;
        let store = self.raw.store();
        let last = raft::Storage::last_index(store).unwrap_or(0);
        if caught_up(target, last, |i| raft::Storage::term(store, i).ok()) {
            self.joining = false;
            self.catch_up = None;
            tracing::info!(node = self.cfg.id.0, term, commit, "caught up with the leader: voting again");
        }
    }

    /// Proposes one membership change, after checking it against the
    /// current membership (raft-rs takes one change at a time).
    fn change(&mut self, change: MembershipChange, reply: oneshot::Sender<Result<Outcome, ProposeError>>) {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            let _ = reply.send(Err(ProposeError::NoLeader));
            return;
        }
        let conf = self.raw.raft.prs().conf();
        let is_voter = |id: NodeId| conf.voters().contains(id.0);
        let is_learner = |id: NodeId| conf.learners().contains(&id.0);
        let refusal = match &change {
            MembershipChange::AddLearner { id, .. } if is_voter(*id) || is_learner(*id) => {
                Some(format!("replica {id} is already a member; remove it first to replace it"))
            }
            MembershipChange::Promote { id } if !is_learner(*id) => {
                Some(format!("replica {id} is not a learner; add it first (flotilla replicas add)"))
            }
            MembershipChange::Remove { id } if !is_voter(*id) && !is_learner(*id) => {
                Some(format!("replica {id} is not a member"))
            }
            MembershipChange::Remove { id } if is_voter(*id) && conf.voters().ids().len() == 1 => {
                Some(format!("replica {id} is the last voter; a cluster needs one"))
            }
            _ => None,
        };
        if let Some(message) = refusal {
            let _ = reply.send(Ok(Err(Refusal { kind: RefusalKind::Conflict, message })));
            return;
        }
        let (kind, id, context) = match &change {
            MembershipChange::AddLearner { id, raft_addr } => {
                (ConfChangeType::AddLearnerNode, *id, raft_addr.clone().into_bytes())
            }
            MembershipChange::Promote { id } => (ConfChangeType::AddNode, *id, Vec::new()),
            MembershipChange::Remove { id } => (ConfChangeType::RemoveNode, *id, Vec::new()),
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = id.0;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.context = context.into();
        self.next_request = (self.next_request + 1) & REQUEST_MASK;
        let request = (self.cfg.id.0 << 48) | self.next_request;
        match self.raw.propose_conf_change(request.to_le_bytes().to_vec(), cc) {
            Ok(()) => {
                let index =
                    (self.raw.raft.state == StateRole::Leader).then(|| self.raw.raft.raft_log.last_index());
                self.pending.insert(request, Pending { reply, started: Instant::now(), index });
            }
            Err(e) => {
                tracing::debug!(node = self.cfg.id.0, "membership change dropped: {e}");
                let _ = reply.send(Err(ProposeError::Dropped));
            }
        }
    }

    /// Applies a committed membership change: raft-rs's configuration, the
    /// durable conf state, the members' addresses, the transport.
    fn apply_conf_change(&mut self, entry: &Entry) -> Result<Outcome, NodeError> {
        let cc = match ConfChangeV2::parse_from_bytes(&entry.data) {
            Ok(cc) => cc,
            Err(e) => {
                tracing::error!(index = entry.index, "undecodable membership change skipped: {e}");
                return Ok(Err(Refusal { kind: RefusalKind::Invalid, message: e.to_string() }));
            }
        };
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                tracing::warn!(index = entry.index, "membership change refused by raft: {e}");
                return Ok(Err(Refusal { kind: RefusalKind::Conflict, message: e.to_string() }));
            }
        };
        self.raw.mut_store().set_conf_state(cs)?;
        for single in cc.get_changes() {
            let id = NodeId(single.node_id);
            match single.get_change_type() {
                ConfChangeType::AddLearnerNode => {
                    let addr = String::from_utf8_lossy(&cc.context).into_owned();
                    if !addr.is_empty() {
                        self.state.replicas.insert(id, addr.clone());
                        if id != self.cfg.id {
                            self.transport.add_peer(id, addr);
                        }
                    }
                }
                ConfChangeType::RemoveNode => {
                    self.state.replicas.remove(&id);
                    if id != self.cfg.id {
                        self.transport.remove_peer(id);
                    } else {
                        tracing::warn!(node = id.0, "this replica was removed from the cluster; stop it");
                    }
                }
                ConfChangeType::AddNode => {}
            }
            tracing::info!(
                node = self.cfg.id.0,
                member = id.0,
                "membership: {:?} applied",
                single.get_change_type()
            );
        }
        Ok(Ok(vec![]))
    }

    fn propose(&mut self, cmd: Command, reply: oneshot::Sender<Result<Outcome, ProposeError>>) {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            self.metrics.proposals.with_label_values(&["no_leader"]).inc();
            let _ = reply.send(Err(ProposeError::NoLeader));
            return;
        }
        self.next_request = (self.next_request + 1) & REQUEST_MASK;
        // unique across replicas: node id in the top 16 bits
        let request = (self.cfg.id.0 << 48) | self.next_request;
        let data = encode_command(cmd);
        match self.raw.propose(request.to_le_bytes().to_vec(), data) {
            Ok(()) => {
                let index =
                    (self.raw.raft.state == StateRole::Leader).then(|| self.raw.raft.raft_log.last_index());
                self.pending.insert(request, Pending { reply, started: Instant::now(), index });
            }
            Err(e) => {
                tracing::debug!(node = self.cfg.id.0, "proposal dropped: {e}");
                self.metrics.proposals.with_label_values(&["dropped"]).inc();
                let _ = reply.send(Err(ProposeError::Dropped));
            }
        }
    }

    fn expire_proposals(&mut self) {
        let timeout = self.cfg.proposal_timeout;
        let expired: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.started.elapsed() > timeout).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                self.metrics.proposals.with_label_values(&["timeout"]).inc();
                let _ = p.reply.send(Err(ProposeError::Timeout(timeout)));
            }
        }
    }

    fn handle_ready(&mut self) -> Result<(), NodeError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if !rd.messages().is_empty() {
            self.transport.send(rd.take_messages());
        }
        let snapshot = (!rd.snapshot().is_empty()).then(|| rd.snapshot().clone());
        // persist before anything that depends on it leaves this node
        self.raw.mut_store().persist(snapshot.as_ref(), rd.entries(), rd.hs())?;
        if let Some(snap) = snapshot {
            self.state = decode_state(&snap)?;
            self.published.set(&self.state);
            self.applied = snap.get_metadata().index;
            self.metrics.snapshots_applied.inc();
            tracing::info!(
                node = self.cfg.id.0,
                index = self.applied,
                "installed a snapshot from the leader"
            );
        }
        self.apply(rd.take_committed_entries())?;
        if !rd.persisted_messages().is_empty() {
            self.transport.send(rd.take_persisted_messages());
        }
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.maybe_compact()?;
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        if entries.is_empty() {
            return Ok(());
        }
        // answered once the batch is published: whoever hears "applied"
        // reads a state that holds it
        let mut answers = Vec::new();
        for entry in entries {
            self.applied = entry.index;
            let outcome = match entry.get_entry_type() {
                EntryType::EntryConfChangeV2 => self.apply_conf_change(&entry)?,
                // never proposed (this node proposes V2 changes only)
                EntryType::EntryConfChange => continue,
                // a new leader's empty entry
                EntryType::EntryNormal if entry.data.is_empty() => continue,
                EntryType::EntryNormal => match decode_command(&entry.data) {
                    Ok(cmd) => self.state.apply(cmd),
                    Err(e) => {
                        // identical bytes on every replica, so skipping keeps them in step
                        tracing::error!(index = entry.index, "undecodable log entry skipped: {e}");
                        continue;
                    }
                },
            };
            let request = <[u8; 8]>::try_from(&entry.context[..]).map(u64::from_le_bytes).ok();
            if let Some(p) = request.and_then(|r| self.pending.remove(&r)) {
                let label = if outcome.is_ok() { "applied" } else { "refused" };
                self.metrics.proposals.with_label_values(&[label]).inc();
                self.metrics.proposal_seconds.observe(p.started.elapsed().as_secs_f64());
                answers.push((p.reply, Ok(outcome)));
            }
            // a proposal of ours at this index that was not this entry was overwritten
            let lost: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| p.index.is_some_and(|i| i <= entry.index))
                .map(|(r, _)| *r)
                .collect();
            for r in lost {
                if let Some(p) = self.pending.remove(&r) {
                    self.metrics.proposals.with_label_values(&["dropped"]).inc();
                    answers.push((p.reply, Err(ProposeError::Dropped)));
                }
            }
        }
        self.published.set(&self.state);
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let snap_index = self.raw.store().latest_snapshot().get_metadata().index;
        // a leader without any snapshot takes one at once: a replica that
        // joins empty must start from a snapshot, which carries the
        // membership (the log's first entries do not)
        let first = snap_index == 0 && self.applied > 0 && self.raw.raft.state == StateRole::Leader;
        if !first && self.applied < snap_index + self.cfg.snapshot_threshold {
            return Ok(());
        }
        let data = rmp_serde::to_vec_named(&self.state).expect("the state always serializes");
        let index = self.applied;
        self.raw.mut_store().compact(index, data)?;
        self.metrics.snapshots_created.inc();
        tracing::info!(node = self.cfg.id.0, index, "took a snapshot and compacted the log");
        Ok(())
    }

    fn publish_membership(&mut self) {
        let membership = membership_of(&self.raw, &self.last_heard);
        self.membership_tx.send_if_modified(|old| {
            if *old == membership {
                false
            } else {
                *old = membership;
                true
            }
        });
    }

    fn publish(&mut self) {
        let status = status_of(&self.raw, self.applied, self.joining);
        if status.role != Role::Leader {
            // proposals made as leader can no longer be tracked by index
            let stale: Vec<u64> =
                self.pending.iter().filter(|(_, p)| p.index.is_some()).map(|(r, _)| *r).collect();
            for r in stale {
                if let Some(p) = self.pending.remove(&r) {
                    let _ = p.reply.send(Err(ProposeError::Dropped));
                }
            }
        }
        self.metrics.observe_status(&status);
        self.status_tx.send_if_modified(|old| {
            if *old == status {
                false
            } else {
                *old = status;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joining_replica_votes_only_once_it_holds_a_commit_of_the_leaders_term() {
        // the log: indexes 1..=5 in term 2, 6..=8 in term 3
        let term_at = |i: u64| match i {
            1..=5 => Some(2),
            6..=8 => Some(3),
            _ => None,
        };
        assert!(caught_up((3, 7), 8, term_at));
        assert!(caught_up((3, 8), 8, term_at));
        // short of the leader's commit
        assert!(!caught_up((3, 9), 8, term_at));
        // the leader's commit is an entry of an older term: entries
        // committed by earlier leaders may lie beyond it
        assert!(!caught_up((3, 5), 8, term_at));
        // a log that disagrees at the commit index
        assert!(!caught_up((4, 7), 8, term_at));
    }
}
