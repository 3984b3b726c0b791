//! The node agent (`flotilla node`): every rank a host runs reaches the
//! leader over one connection, a node session.
//!
//! ```text
//! flotilla worker --rank 0 ─┐  local TCP, the worker protocol
//! flotilla worker --rank 1 ─┼──► flotilla node ══ one connection, Batch frames ══► leader
//! flotilla worker --rank 7 ─┘
//! ```
//! Workers list the agent first in `--coordinators` (and may list the
//! coordinators after it: a worker that cannot reach its agent goes to them
//! directly). The agent forwards each worker's messages under its rank and
//! hands each rank the directives addressed to it; it keeps no job state.
//!
//! - **Heartbeats** are held: each rank's latest one leaves with every other
//!   rank's, in one frame per heartbeat interval, answered by one `Alive`
//!   that every worker of the host is given. A heartbeat waits at most one
//!   interval here. A worker that stops heartbeating has nothing forwarded.
//! - **Other messages** (reports, registrations) leave at once; what is
//!   queued together leaves in one frame.
//! - **A worker's connection closing** (its process died) is `Left` for its
//!   rank: the leader sees the loss at once, as it would see the worker's
//!   own connection close.
//! - **The session lost** (closed, silent for the heartbeat timeout, or its
//!   leader stepped down): every worker's connection is closed. Each worker
//!   registers again with its current generation and step, and the agent
//!   opens a new session to whoever leads then.
//! - **A rank's registration closed or refused by the leader** (`Fenced`,
//!   or "register it again"): the agent forwards the answer and closes that
//!   worker's connection, so the worker either stops or registers again.

use crate::error::NodeError;
use flotilla_shared::frame::{
    accept_worker, client_handshake, Connection, FrameError, Tokens, DEFAULT_MAX_FRAME,
};
use flotilla_shared::ids::{NodeId, Rank};
use flotilla_shared::tls::{ClientTls, Stream};
use flotilla_shared::wire::{CoordinatorMessage, ErrorCode, ErrorReply, ForRank, PeerRole, WorkerMessage};
use futures::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Everything `flotilla node` is told.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The coordinators' worker API addresses.
    pub coordinators: Vec<String>,
    /// The worker token file's tokens: the first is presented to the
    /// coordinators, and any is accepted from a local worker.
    pub tokens: Option<Tokens>,
    /// `--tls-ca`, as for a worker.
    pub tls: Option<ClientTls>,
}

/// The most messages one upstream frame carries.
const BATCH_MAX: usize = 1024;
/// Heartbeat interval and timeout until a job's spec says otherwise (the
/// spec's defaults).
const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(3000);

/// Serves local workers on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    opts: NodeOptions,
    shutdown: CancellationToken,
) -> crate::Result<(), NodeError> {
    if opts.coordinators.is_empty() {
        return Err(NodeError::Config("--coordinators is empty; list the coordinators' --api-addr"));
    }
    let (hub_tx, hub_rx) = mpsc::channel::<Local>(4096);
    let tokens = opts.tokens.clone();
    let accept = {
        let stop = shutdown.clone();
        async move {
            let mut lane = 0u64;
            loop {
                let (stream, peer) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!("accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                lane += 1;
                let (hub, tokens) = (hub_tx.clone(), tokens.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_local(stream, tokens, hub, lane).await {
                        tracing::info!(%peer, "local worker connection ended: {e}");
                    }
                });
            }
        }
    };
    tokio::spawn(accept);
    Hub::new(opts).run(hub_rx, shutdown).await;
    Ok(())
}

/// What a local worker's connection tells the hub.
enum Local {
    Registered { lane: u64, rank: Rank, register: WorkerMessage, tx: mpsc::Sender<CoordinatorMessage> },
    Message { lane: u64, msg: WorkerMessage },
    Closed { lane: u64 },
}

/// One local worker: the worker protocol, one rank per connection.
async fn serve_local(
    stream: TcpStream,
    tokens: Option<Tokens>,
    hub: mpsc::Sender<Local>,
    lane: u64,
) -> crate::Result<(), NodeError> {
    let (mut conn, first) = accept_worker(stream, NodeId(0), tokens.as_ref()).await?;
    let WorkerMessage::Register { rank, .. } = &first else {
        let message =
            "a node agent carries one rank per connection: the first message must be Register".into();
        let _ = conn
            .send(CoordinatorMessage::Error(ErrorReply { code: ErrorCode::InvalidRequest, message }))
            .await;
        return Err(NodeError::Local("first message was not Register"));
    };
    let Some(rank) = *rank else {
        let message = "a node agent carries ranks; a spare registers with the coordinators directly \
                       (flotilla worker --spare --coordinators <their --api-addr>)"
            .into();
        let _ = conn
            .send(CoordinatorMessage::Error(ErrorReply { code: ErrorCode::InvalidRequest, message }))
            .await;
        return Err(NodeError::Local("a spare registered with a node agent"));
    };
    let (tx, mut rx) = mpsc::channel(1024);
    if hub.send(Local::Registered { lane, rank, register: first, tx }).await.is_err() {
        return Ok(());
    }
    let result = loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(msg) => {
                    if let Err(e) = conn.send(msg).await {
                        break Err(NodeError::Session(e.into()));
                    }
                }
                // the hub closed this lane
                None => break Ok(()),
            },
            frame = conn.next() => match frame {
                None => break Ok(()),
                Some(Err(e)) => break Err(NodeError::Session(e.into())),
                Some(Ok(WorkerMessage::Batch(_) | WorkerMessage::Left | WorkerMessage::Register { .. })) => {
                    let message = "a worker behind a node agent sends its own rank's messages only, and registers once per connection".into();
                    let _ = conn.send(CoordinatorMessage::Error(ErrorReply { code: ErrorCode::InvalidRequest, message })).await;
                    break Err(NodeError::Local("a batch, Left or second Register from a local worker"));
                }
                Some(Ok(msg)) => {
                    if hub.send(Local::Message { lane, msg }).await.is_err() {
                        break Ok(());
                    }
                }
            },
        }
    };
    let _ = hub.send(Local::Closed { lane }).await;
    result
}

type Upstream = Connection<Stream, CoordinatorMessage, WorkerMessage>;

/// A local worker that registered: its lane and where its directives go.
struct Owner {
    lane: u64,
    tx: mpsc::Sender<CoordinatorMessage>,
}

/// The node session and the ranks on it.
struct Hub {
    opts: NodeOptions,
    /// The local worker that speaks for each rank (the last to register it).
    owners: HashMap<Rank, Owner>,
    /// Registrations waiting for a session to open (it opens with them).
    registers: Vec<ForRank<WorkerMessage>>,
    /// Each rank's latest heartbeat since the last heartbeat frame.
    heartbeats: BTreeMap<Rank, WorkerMessage>,
    /// Other messages waiting for the next frame.
    queued: Vec<ForRank<WorkerMessage>>,
    up: Option<Upstream>,
    /// When the session last heard from its leader.
    heard: Instant,
    interval: Duration,
    timeout: Duration,
    /// Where to connect next: a leader named by a follower, else the list.
    redirect: Option<String>,
    next: usize,
    backoff: Duration,
    retry_at: Instant,
}

impl Hub {
    fn new(opts: NodeOptions) -> Self {
        Self {
            opts,
            owners: HashMap::new(),
            registers: Vec::new(),
            heartbeats: BTreeMap::new(),
            queued: Vec::new(),
            up: None,
            heard: Instant::now(),
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            redirect: None,
            next: 0,
            backoff: Duration::from_millis(100),
            retry_at: Instant::now(),
        }
    }

    async fn run(mut self, mut locals: mpsc::Receiver<Local>, shutdown: CancellationToken) {
        let mut every = self.interval;
        let mut tick = ticker(every);
        loop {
            // a job's spec (in a Registered, here or while connecting) may
            // ask for a shorter interval
            if self.interval != every {
                every = self.interval;
                tick = ticker(every);
            }
            let waiting = self.up.is_none() && !self.registers.is_empty();
            if waiting && Instant::now() >= self.retry_at {
                self.connect().await;
                continue;
            }
            let retry_at = self.retry_at;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if self.up.is_some() && self.heard.elapsed() > self.timeout {
                        self.lost(&format!("no word from the leader for {} ms", self.timeout.as_millis()));
                        continue;
                    }
                    let beats = std::mem::take(&mut self.heartbeats);
                    self.queued.extend(beats.into_iter().map(|(rank, msg)| ForRank { rank, msg }));
                    self.flush().await;
                }
                local = locals.recv() => {
                    let Some(local) = local else { return };
                    self.local(local);
                    // what arrived together leaves together
                    while self.queued.len() < BATCH_MAX {
                        match locals.try_recv() {
                            Ok(local) => self.local(local),
                            Err(_) => break,
                        }
                    }
                    self.flush().await;
                }
                frame = next_frame(&mut self.up) => match frame {
                    Some(Ok(msg)) => {
                        self.heard = Instant::now();
                        self.route_frame(msg);
                        self.flush().await;
                    }
                    Some(Err(e)) => self.lost(&e.to_string()),
                    None => self.lost("the leader closed the node session"),
                },
                _ = tokio::time::sleep_until(retry_at), if waiting => {}
            }
        }
    }

    fn local(&mut self, local: Local) {
        match local {
            Local::Registered { lane, rank, register, tx } => {
                // a newer process of the rank: the leader decides between
                // them (by incarnation); the older connection is closed
                self.owners.insert(rank, Owner { lane, tx });
                self.heartbeats.remove(&rank);
                if self.up.is_some() {
                    // in order with the rank's other messages: a `Left` of
                    // the process it replaces leaves before it
                    self.queued.push(ForRank { rank, msg: register });
                } else {
                    // the next session opens with it
                    self.registers.retain(|r| r.rank != rank);
                    self.registers.push(ForRank { rank, msg: register });
                }
            }
            Local::Message { lane, msg } => {
                let Some(rank) = self.rank_of(lane) else { return };
                if self.up.is_none() {
                    return;
                }
                match msg {
                    msg @ WorkerMessage::Heartbeat { .. } => {
                        self.heartbeats.insert(rank, msg);
                    }
                    msg => {
                        // a rank's messages keep their order: a heartbeat
                        // held from before a report (say, of the
                        // generation the report leaves) leaves before it
                        if let Some(held) = self.heartbeats.remove(&rank) {
                            self.queued.push(ForRank { rank, msg: held });
                        }
                        self.queued.push(ForRank { rank, msg });
                    }
                }
            }
            Local::Closed { lane } => {
                let Some(rank) = self.rank_of(lane) else { return };
                self.owners.remove(&rank);
                self.heartbeats.remove(&rank);
                let unsent = self.registers.len();
                self.registers.retain(|r| r.rank != rank);
                if self.up.is_some() && unsent == self.registers.len() {
                    self.queued.push(ForRank { rank, msg: WorkerMessage::Left });
                }
            }
        }
    }

    fn rank_of(&self, lane: u64) -> Option<Rank> {
        self.owners.iter().find(|(_, o)| o.lane == lane).map(|(r, _)| *r)
    }

    /// Sends what is queued, in order, in frames of at most [`BATCH_MAX`].
    async fn flush(&mut self) {
        let Some(up) = self.up.as_mut() else { return };
        let items = std::mem::take(&mut self.queued);
        for chunk in items.chunks(BATCH_MAX) {
            if let Err(e) = up.send(WorkerMessage::Batch(chunk.to_vec())).await {
                self.lost(&e.to_string());
                return;
            }
        }
    }

    /// Opens a node session with the registrations waiting, following a
    /// follower's `NotLeader`.
    async fn connect(&mut self) {
        let addr = self.redirect.take().unwrap_or_else(|| {
            let a = self.opts.coordinators[self.next % self.opts.coordinators.len()].clone();
            self.next += 1;
            a
        });
        match self.open(&addr).await {
            Ok((up, CoordinatorMessage::NotLeader { leader: Some(leader) })) => {
                drop(up);
                tracing::info!(%addr, "not the leader; trying {leader}");
                self.redirect = Some(leader);
            }
            Ok((_, CoordinatorMessage::NotLeader { leader: None })) => {
                self.retry_later(&addr, "not the leader, and no leader is known yet")
            }
            Ok((up, first)) => {
                tracing::info!(%addr, ranks = self.registers.len(), "node session open");
                self.registers.clear();
                self.up = Some(up);
                self.heard = Instant::now();
                self.backoff = Duration::from_millis(100);
                self.route_frame(first);
            }
            Err(e) => self.retry_later(&addr, &e.to_string()),
        }
    }

    fn retry_later(&mut self, addr: &str, why: &str) {
        tracing::warn!(%addr, "node session not opened: {why}; retrying in {:?}", self.backoff);
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
    }

    /// Connects to `addr` and sends the waiting registrations; returns the
    /// connection and its first answer.
    async fn open(&self, addr: &str) -> crate::Result<(Upstream, CoordinatorMessage), NodeError> {
        let open = |why: String| NodeError::Open(why);
        let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| open("connect timed out".into()))?
            .map_err(|e| open(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let stream = match &self.opts.tls {
            Some(tls) => tls.connect(tcp, addr).await.map_err(|e| {
                open(format!("TLS to {addr}: {e} (the certificate must be of --tls-ca and name this host)"))
            })?,
            None => Stream::Left(tcp),
        };
        let (mut up, _): (Upstream, _) = client_handshake(
            stream,
            PeerRole::Worker,
            self.opts.tokens.as_ref().map(|t| t.present().to_string()),
            DEFAULT_MAX_FRAME,
        )
        .await
        .map_err(|e| open(e.to_string()))?;
        up.send(WorkerMessage::Batch(self.registers.clone())).await.map_err(|e| open(e.to_string()))?;
        let first = tokio::time::timeout(Duration::from_secs(10), up.next())
            .await
            .map_err(|_| open("no answer to the registrations".into()))?
            .ok_or_else(|| open("closed before answering the registrations".into()))?
            .map_err(|e| open(e.to_string()))?;
        Ok((up, first))
    }

    /// Routes a frame from the leader.
    fn route_frame(&mut self, msg: CoordinatorMessage) {
        match msg {
            CoordinatorMessage::Batch(items) => {
                for ForRank { rank, msg } in items {
                    self.deliver(rank, msg);
                }
            }
            // the answer to a heartbeat frame: every rank's leader lives
            CoordinatorMessage::Alive => {
                for o in self.owners.values() {
                    let _ = o.tx.try_send(CoordinatorMessage::Alive);
                }
            }
            other => {
                // a node session carries batches; anything else ends it
                let why = format!("unexpected {other:?} on the node session");
                self.lost(&why);
            }
        }
    }

    fn deliver(&mut self, rank: Rank, msg: CoordinatorMessage) {
        if let CoordinatorMessage::Registered { spec, .. } = &msg {
            let f = &spec.failure;
            self.interval = self.interval.min(Duration::from_millis(f.heartbeat_interval_ms.max(1)));
            self.timeout = self.timeout.min(Duration::from_millis(f.heartbeat_timeout_ms.max(1)));
        }
        // a registration the leader closed or refused: the worker hears
        // why, then registers again (or stops, when fenced)
        let closes = matches!(&msg, CoordinatorMessage::Error(e)
            if matches!(e.code, ErrorCode::Fenced | ErrorCode::Unavailable | ErrorCode::InvalidRequest | ErrorCode::UnknownJob));
        let Some(owner) = self.owners.get(&rank) else { return };
        let delivered = owner.tx.try_send(msg).is_ok();
        if closes || !delivered {
            // dropping the sender ends the worker's connection
            self.owners.remove(&rank);
            self.heartbeats.remove(&rank);
            if !closes {
                tracing::warn!(%rank, "rank's worker is not reading its directives; its connection is closed");
                self.queued.push(ForRank { rank, msg: WorkerMessage::Left });
            }
        }
    }

    /// The session is gone: every local worker registers again.
    fn lost(&mut self, why: &str) {
        if self.up.take().is_some() {
            tracing::warn!(
                "node session lost: {why}; closing the workers' connections so that they register again"
            );
        }
        self.owners.clear();
        self.registers.clear();
        self.heartbeats.clear();
        self.queued.clear();
    }
}

async fn next_frame(up: &mut Option<Upstream>) -> Option<Result<CoordinatorMessage, FrameError>> {
    match up.as_mut() {
        Some(up) => up.next().await,
        None => std::future::pending().await,
    }
}

fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::frame::server_handshake;
    use flotilla_shared::ids::{Generation, Incarnation, JobName, Step};
    use flotilla_shared::spec::JobSpec;
    use flotilla_shared::wire::WorkerStatus;

    type Leader = Connection<TcpStream, WorkerMessage, CoordinatorMessage>;
    type Worker = Connection<TcpStream, CoordinatorMessage, WorkerMessage>;

    fn register(rank: u32) -> WorkerMessage {
        WorkerMessage::Register {
            job: JobName::new("j").unwrap(),
            rank: Some(Rank(rank)),
            incarnation: Incarnation(u64::from(rank) + 1),
            http_addr: None,
            generation: None,
            step: Step(0),
            host: None,
        }
    }

    fn heartbeat() -> WorkerMessage {
        WorkerMessage::Heartbeat { generation: Generation(1), step: Step(0), status: WorkerStatus::Running }
    }

    /// A fake leader and an agent in front of it; four workers behind the
    /// agent, each heartbeating every 50 ms at its own phase.
    #[tokio::test]
    async fn a_hosts_heartbeats_leave_in_one_frame_and_the_one_alive_reaches_every_worker() {
        let spec = JobSpec::from_toml(
            "name = \"j\"\nworld_size = 4\n[checkpoint]\nevery_steps = 10\nroot = \"/ckpt\"\n\
             [failure]\nheartbeat_interval_ms = 50\nheartbeat_timeout_ms = 2000\n",
        )
        .unwrap();
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (up_addr, agent_addr) = (upstream.local_addr().unwrap(), local.local_addr().unwrap());
        let opts = NodeOptions { coordinators: vec![up_addr.to_string()], tokens: None, tls: None };
        let stop = CancellationToken::new();
        tokio::spawn(run(local, opts, stop.clone()));

        let mut workers = Vec::new();
        for rank in 0..4u32 {
            let tcp = TcpStream::connect(agent_addr).await.unwrap();
            let (mut w, _): (Worker, _) =
                client_handshake(tcp, PeerRole::Worker, None, DEFAULT_MAX_FRAME).await.unwrap();
            w.send(register(rank)).await.unwrap();
            workers.push(w);
        }
        // the leader: the registrations (in one frame or a few), answered
        let (tcp, _) = upstream.accept().await.unwrap();
        let (mut leader, _): (Leader, _) =
            server_handshake(tcp, NodeId(1), None, DEFAULT_MAX_FRAME, |_, _| Ok(())).await.unwrap();
        let mut registered = 0;
        while registered < 4 {
            let Some(Ok(WorkerMessage::Batch(items))) = leader.next().await else { panic!("not a batch") };
            let mut answers = Vec::new();
            for ForRank { rank, msg } in items {
                assert!(matches!(msg, WorkerMessage::Register { .. }), "{msg:?}");
                registered += 1;
                let msg = CoordinatorMessage::Registered {
                    spec: spec.clone(),
                    generation: Generation(1),
                    term: 1,
                    spare: false,
                };
                answers.push(ForRank { rank, msg });
            }
            leader.send(CoordinatorMessage::Batch(answers)).await.unwrap();
        }
        for w in &mut workers {
            assert!(matches!(w.next().await, Some(Ok(CoordinatorMessage::Registered { .. }))));
        }
        // each worker heartbeats on its own timer, 12 ms apart
        let mut beating = Vec::new();
        for (i, mut w) in workers.into_iter().enumerate() {
            beating.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(12 * i as u64)).await;
                let mut every = tokio::time::interval(Duration::from_millis(50));
                let mut alive = 0;
                loop {
                    tokio::select! {
                        _ = every.tick() => w.send(heartbeat()).await.unwrap(),
                        got = w.next() => match got {
                            Some(Ok(CoordinatorMessage::Alive)) => {
                                alive += 1;
                                if alive == 10 {
                                    // the connection stays open (no Left) until the test ends
                                    return (alive, w);
                                }
                            }
                            other => panic!("{other:?}"),
                        },
                    }
                }
            }));
        }
        // over ten frames: every one carries heartbeats only, the latest of
        // each rank at most once, and most carry all four ranks
        let mut whole = 0;
        for _ in 0..10 {
            let Some(Ok(WorkerMessage::Batch(items))) = leader.next().await else { panic!("not a batch") };
            let mut ranks: Vec<u32> = items
                .iter()
                .map(|i| {
                    assert!(matches!(i.msg, WorkerMessage::Heartbeat { .. }), "{:?}", i.msg);
                    i.rank.0
                })
                .collect();
            ranks.sort_unstable();
            let n = ranks.len();
            ranks.dedup();
            assert_eq!(ranks.len(), n, "a rank twice in one frame");
            whole += usize::from(n == 4);
            leader.send(CoordinatorMessage::Alive).await.unwrap();
        }
        assert!(whole >= 5, "only {whole} of 10 frames carried all 4 ranks");
        // the one Alive per frame reached every worker
        let mut quiet = Vec::new();
        for b in beating {
            let (alive, w) = tokio::time::timeout(Duration::from_secs(5), b).await.unwrap().unwrap();
            assert_eq!(alive, 10);
            quiet.push(w);
        }
        // a rank's messages keep their order: the heartbeat of generation 1
        // sent before the report of generation 2 reaches the leader first
        let w = &mut quiet[0];
        w.send(heartbeat()).await.unwrap();
        w.send(WorkerMessage::Restored { generation: Generation(2), step: Step(0), source: None })
            .await
            .unwrap();
        let mut seen = Vec::new();
        while !seen.iter().any(|m| matches!(m, WorkerMessage::Restored { .. })) {
            let Some(Ok(WorkerMessage::Batch(items))) = leader.next().await else { panic!("not a batch") };
            seen.extend(items.into_iter().filter(|i| i.rank == Rank(0)).map(|i| i.msg));
        }
        assert!(
            matches!(seen[..], [WorkerMessage::Heartbeat { .. }, WorkerMessage::Restored { .. }]),
            "{seen:?}"
        );
        stop.cancel();
    }
}
