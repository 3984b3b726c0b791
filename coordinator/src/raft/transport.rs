//! Peer transport: Raft messages between replicas over TCP, in the same
//! framing as everything else (`flotilla_shared::frame`), after a `Hello`
//! that carries the peer token and the sender's id. With `--tls-*` set, the
//! connection is mutual TLS first (`flotilla_shared::tls`): a peer must
//! present a certificate of the cluster CA naming the node its Hello
//! claims, and the connecting side checks the same of the listener.
//!
//! Outbound, one task per peer owns one connection:
//! ```text
//!   Raft loop ──try_send──► [bounded queue] ──► peer task: connect (backoff 50 ms → 1 s)
//!                                                 batch everything queued → one frame
//! ```
//! `send` never blocks the Raft loop: a full queue drops the message, and so
//! does a dead connection (Raft retransmits whatever matters). What was lost
//! is reported back to the Raft loop as raft-rs's local messages: a peer
//! that cannot be reached (`report_unreachable`: its progress drops back to
//! probing), and each snapshot sent or lost (`report_snapshot`: a lost one
//! is sent again instead of pausing the follower until the leader changes).
//! Inbound, each accepted connection gets its own task; a bad token, a
//! malformed or oversized frame, or a local message type closes that
//! connection only.

use crate::raft::node::Transport;
use crate::raft::storage::{decode_message, encode_message};
use flotilla_shared::frame::{
    client_handshake, server_handshake, FrameError, HandshakeError, Tokens, DEFAULT_MAX_FRAME,
};
use flotilla_shared::ids::NodeId;
use flotilla_shared::tls::{self, NodeTls, Stream};
use flotilla_shared::wire::{ErrorCode, ErrorReply, Hello, PeerMessage, PeerRole};
use futures::{SinkExt, StreamExt};
use raft::eraftpb::{Message, MessageType};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest peer frame: a batch of entries, or one piece of a message.
pub const PEER_MAX_FRAME: usize = 4 * DEFAULT_MAX_FRAME;
/// Messages larger than this (encoded) travel in pieces of this size.
const CHUNK: usize = 8 << 20;
/// The largest message accepted in pieces (a ledger snapshot).
const MAX_CHUNKED: u64 = 16 << 30;
/// Messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;
/// Messages per frame at most.
const BATCH: usize = 512;

/// Sends Raft messages to every other member.
pub struct PeerTransport {
    me: NodeId,
    auth: PeerAuth,
    shutdown: CancellationToken,
    /// One queue per peer, each drained by its sender task (a std mutex:
    /// nothing awaits while holding it).
    queues: Mutex<HashMap<u64, (String, mpsc::Sender<Message>)>>,
    reports: Reports,
}

/// What a replica shows its peers: the peer token and, with `--tls-*`,
/// its certificate (which it also requires of them).
#[derive(Clone, Debug, Default)]
pub struct PeerAuth {
    /// This replica's cluster (`--cluster-id`): sent in its Hello, and
    /// required of peers.
    pub cluster: String,
    /// The peer tokens (SPEC §4), if configured.
    pub token: Option<Tokens>,
    /// Mutual TLS, if configured.
    pub tls: Option<NodeTls>,
}

/// Where the transport reports lost messages: the Raft loop's inbox.
#[derive(Clone)]
struct Reports(mpsc::Sender<Message>);

impl Reports {
    fn unreachable(&self, peer: u64) {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgUnreachable);
        m.from = peer;
        let _ = self.0.try_send(m);
    }

    fn snapshot(&self, peer: u64, delivered: bool) {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgSnapStatus);
        m.from = peer;
        m.reject = !delivered;
        let _ = self.0.try_send(m);
    }

    /// Reports the loss of `msgs`, sent to `peer`.
    fn lost<'a>(&self, peer: u64, msgs: impl IntoIterator<Item = &'a Message>) {
        let mut any = false;
        for m in msgs {
            any = true;
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshot(peer, false);
            }
        }
        if any {
            self.unreachable(peer);
        }
    }
}

impl PeerTransport {
    /// Spawns one sender task per peer (`(id, raft address)`, self
    /// excluded); lost messages are reported into `inbox` (the Raft loop's).
    pub fn start(
        me: NodeId,
        peers: Vec<(NodeId, String)>,
        auth: PeerAuth,
        inbox: mpsc::Sender<Message>,
        shutdown: CancellationToken,
    ) -> Self {
        let t = Self { me, auth, shutdown, queues: Mutex::new(HashMap::new()), reports: Reports(inbox) };
        for (id, addr) in peers {
            t.add_peer(id, addr);
        }
        t
    }
}

impl Transport for PeerTransport {
    fn add_peer(&self, id: NodeId, addr: String) {
        if id == self.me {
            return;
        }
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if queues.get(&id.0).is_some_and(|(a, _)| *a == addr) {
            return;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let (auth, reports, shutdown) = (self.auth.clone(), self.reports.clone(), self.shutdown.clone());
        tokio::spawn(peer_sender(self.me, id, addr.clone(), auth, rx, reports, shutdown));
        // a replaced sender ends once its queue is dropped
        queues.insert(id.0, (addr, tx));
    }

    fn remove_peer(&self, id: NodeId) {
        self.queues.lock().unwrap_or_else(|e| e.into_inner()).remove(&id.0);
    }

    fn send(&self, msgs: Vec<Message>) {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        for msg in msgs {
            if let Some((_, q)) = queues.get(&msg.to) {
                // full or closed: dropped and reported; Raft retries
                if let Err(e) = q.try_send(msg) {
                    let msg = match e {
                        mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
                    };
                    self.reports.lost(msg.to, [&msg]);
                }
            }
        }
    }
}

async fn peer_sender(
    me: NodeId,
    peer: NodeId,
    addr: String,
    auth: PeerAuth,
    mut rx: mpsc::Receiver<Message>,
    reports: Reports,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = connect(me, peer, &addr, &auth) => c,
        };
        let mut conn = match connected {
            Ok(conn) => {
                if failures > 0 {
                    tracing::info!(peer = peer.0, %addr, "connected to peer after {failures} failed attempts");
                }
                failures = 0;
                backoff = Duration::from_millis(50);
                conn
            }
            Err(e) => {
                failures += 1;
                // say it once, then quietly, until it works again
                if failures == 1 {
                    tracing::warn!(peer = peer.0, %addr, "cannot reach peer: {e}; retrying with backoff");
                }
                // what was queued is stale by the time we connect
                let mut dropped = Vec::new();
                while let Ok(m) = rx.try_recv() {
                    dropped.push(m);
                }
                reports.lost(peer.0, &dropped);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = rx.recv() => match m { Some(m) => m, None => return },
            };
            let mut msgs = vec![first];
            while msgs.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
            if let Err(e) = send_batch(&mut conn, &msgs).await {
                tracing::warn!(peer = peer.0, %addr, "connection to peer lost: {e}; reconnecting");
                reports.lost(peer.0, &msgs);
                break;
            }
            // a snapshot handed to the connection is delivered as far as
            // this side can tell; the follower's answer confirms it
            for _ in msgs.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot) {
                reports.snapshot(peer.0, true);
            }
        }
    }
}

type PeerConn = flotilla_shared::frame::Connection<Stream, PeerMessage, PeerMessage>;

/// Sends `msgs` in as few frames as fit: small ones batched up to
/// [`CHUNK`] bytes a frame, each one larger in pieces.
async fn send_batch(conn: &mut PeerConn, msgs: &[Message]) -> Result<(), String> {
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    for m in msgs {
        let bytes = encode_message(m);
        if !batch.is_empty() && batch_bytes + bytes.len() > CHUNK {
            conn.send(PeerMessage::Raft(std::mem::take(&mut batch))).await.map_err(|e| e.to_string())?;
            batch_bytes = 0;
        }
        if bytes.len() <= CHUNK {
            batch_bytes += bytes.len();
            batch.push(serde_bytes::ByteBuf::from(bytes));
            continue;
        }
        let total = bytes.len() as u64;
        for piece in bytes.chunks(CHUNK) {
            let chunk = PeerMessage::Chunk { total, bytes: serde_bytes::ByteBuf::from(piece.to_vec()) };
            conn.send(chunk).await.map_err(|e| e.to_string())?;
        }
    }
    if !batch.is_empty() {
        conn.send(PeerMessage::Raft(batch)).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The token a client presents for `tokens` (the first of them).
pub(crate) fn present(tokens: &Option<Tokens>) -> Option<String> {
    tokens.as_ref().map(|t| t.present().to_string())
}

/// Connects to replica `peer` at `addr`: TCP, mutual TLS where configured
/// (its certificate must name `peer`), then the Hello.
/// Why a peer could not be reached, or could not answer a probe.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No TCP connection within 2 s.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The TCP connection failed.
    #[error("{0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The Hello failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// Framing or I/O failed after the Hello.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer answered, but not as the protocol says.
    #[error("{0}")]
    Protocol(&'static str),
}

async fn connect(me: NodeId, peer: NodeId, addr: &str, auth: &PeerAuth) -> Result<PeerConn, PeerError> {
    let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| PeerError::ConnectTimeout)?
        .map_err(PeerError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let stream = match &auth.tls {
        Some(tls) => tls.connect_peer(tcp, peer).await.map_err(PeerError::Tls)?,
        None => Stream::Left(tcp),
    };
    let (conn, _) = client_handshake(
        stream,
        PeerRole::Coordinator { node: me, cluster: auth.cluster.clone() },
        present(&auth.token),
        PEER_MAX_FRAME,
    )
    .await?;
    Ok(conn)
}

/// Asks replica `peer` at `addr` whether it holds a Raft log (see
/// `identity`): `Ok(has_log)`, or why it could not be asked.
pub async fn probe(me: NodeId, peer: NodeId, addr: &str, auth: &PeerAuth) -> Result<bool, PeerError> {
    let mut conn = connect(me, peer, addr, auth).await?;
    conn.send(PeerMessage::Probe).await?;
    match tokio::time::timeout(Duration::from_secs(2), conn.next()).await {
        Ok(Some(Ok(PeerMessage::ProbeReply { has_log }))) => Ok(has_log),
        Ok(Some(Ok(_))) => Err(PeerError::Protocol("answered a probe with something else")),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(None) => Err(PeerError::Protocol("closed the connection without answering")),
        Err(_) => Err(PeerError::Protocol("no answer within 2 s")),
    }
}

/// Accepts peer connections on `listener` and feeds their messages to the
/// Raft loop through `inbox` until `shutdown`; answers probes with
/// `has_log` (whether this replica holds a Raft log).
pub async fn serve(
    listener: TcpListener,
    me: NodeId,
    auth: PeerAuth,
    inbox: mpsc::Sender<Message>,
    has_log: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = accept(&listener, "raft") => accepted,
        };
        let Some(slot) = admit(&slots, "raft", remote) else { continue };
        let (auth, inbox, shutdown, has_log) =
            (auth.clone(), inbox.clone(), shutdown.clone(), has_log.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_peer(stream, me, &auth, inbox, &has_log, shutdown).await {
                tracing::warn!(%remote, "peer connection closed: {e}");
            }
            drop(slot);
        });
    }
}

/// Peer connections a replica accepts at most (a few per replica).
const MAX_PEER_CONNECTIONS: usize = 64;
/// A peer connection with no frame for this long is closed (a leader sends
/// heartbeats every 100 ms).
const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Takes a connection slot, or turns the connection away (closing it)
/// when the listener is full: a flood of connections cannot exhaust the
/// process.
pub(crate) fn admit(
    slots: &Arc<tokio::sync::Semaphore>,
    what: &str,
    remote: std::net::SocketAddr,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let permit = slots.clone().try_acquire_owned().ok();
    if permit.is_none() {
        tracing::warn!(%remote, "{what}: connection limit reached; connection refused");
    }
    permit
}

/// Accepts the next connection (with TCP_NODELAY set). An accept error (e.g.
/// out of file descriptors) is logged and retried after a pause: the
/// listener keeps serving.
pub(crate) async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                return (stream, remote);
            }
            Err(e) => {
                tracing::warn!("{what} listener accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_peer(
    tcp: TcpStream,
    me: NodeId,
    auth: &PeerAuth,
    inbox: mpsc::Sender<Message>,
    has_log: &AtomicBool,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let stream = match &auth.tls {
        Some(tls) => tls.accept_peer(tcp).await.map_err(|e| {
            format!("TLS handshake failed: {e} (peers need a certificate of the cluster CA: --tls-ca, --tls-cert, --tls-key)")
        })?,
        None => Stream::Left(tcp),
    };
    let admit = |hello: &Hello, stream: &Stream| {
        let refuse = |message: String| Err(ErrorReply { code: ErrorCode::Unauthorized, message });
        match &hello.role {
            PeerRole::Coordinator { node, cluster } if *cluster != auth.cluster => refuse(format!(
                "node {node} belongs to cluster {cluster:?}, this replica to {:?}: check --peers and --cluster-id",
                auth.cluster
            )),
            PeerRole::Coordinator { node, .. } if auth.tls.is_some() && !tls::peer_is(stream, *node) => {
                refuse(format!(
                "the certificate presented does not name {}: each replica connects with its own (--tls-cert)",
                tls::node_name(*node)
            ))
            }
            PeerRole::Coordinator { .. } => Ok(()),
            PeerRole::Worker => {
                refuse("this is a coordinator's Raft port; workers connect to its --api-addr".into())
            }
        }
    };
    let (mut conn, hello) = server_handshake::<_, PeerMessage, PeerMessage>(
        stream,
        me,
        auth.token.as_ref(),
        PEER_MAX_FRAME,
        admit,
    )
    .await
    .map_err(|e| e.to_string())?;
    let PeerRole::Coordinator { node: from, .. } = hello.role else {
        return Err("a worker was admitted to the raft port".into());
    };
    // a message arriving in pieces: its size and what came so far
    let mut partial: Option<(u64, Vec<u8>)> = None;
    // one timer, pushed back by every frame
    let idle = tokio::time::sleep(PEER_IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = &mut idle => return Err(format!("node {from} silent for {PEER_IDLE_TIMEOUT:?}; closed")),
            f = conn.next() => f,
        };
        idle.as_mut().reset(tokio::time::Instant::now() + PEER_IDLE_TIMEOUT);
        let batch = match frame {
            None => return Ok(()),
            Some(f) => match f.map_err(|e| e.to_string())? {
                PeerMessage::Raft(batch) if partial.is_none() => batch,
                PeerMessage::Raft(_) => {
                    return Err(format!("node {from} interleaved a batch with a message in pieces"))
                }
                PeerMessage::Chunk { total, bytes } => {
                    let (want, got) = partial.get_or_insert_with(|| (total, Vec::new()));
                    let fits = *want == total && (got.len() + bytes.len()) as u64 <= total;
                    if total > MAX_CHUNKED || !fits || bytes.is_empty() {
                        return Err(format!(
                            "node {from} sent a piece that does not fit a message of {total} bytes (limit {MAX_CHUNKED})"
                        ));
                    }
                    got.extend_from_slice(&bytes);
                    if (got.len() as u64) < total {
                        continue;
                    }
                    let (_, whole) = partial.take().expect("set above");
                    vec![serde_bytes::ByteBuf::from(whole)]
                }
                PeerMessage::Probe => {
                    let reply = PeerMessage::ProbeReply { has_log: has_log.load(Ordering::SeqCst) };
                    conn.send(reply).await.map_err(|e| e.to_string())?;
                    continue;
                }
                PeerMessage::ProbeReply { .. } => {
                    return Err(format!("node {from} sent an unasked probe reply"))
                }
            },
        };
        for bytes in batch {
            let msg = decode_message(&bytes)
                .map_err(|e| format!("undecodable raft message from node {from}: {e}"))?;
            if msg.from != from.0 {
                return Err(format!("node {from} sent a message claiming to be from node {}", msg.from));
            }
            if raft::raw_node::is_local_msg(msg.get_msg_type()) {
                return Err(format!("node {from} sent a local message type {:?}", msg.get_msg_type()));
            }
            if inbox.send(msg).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: MessageType, from: u64, to: u64, data: usize) -> Message {
        let mut m = Message { from, to, term: 3, ..Default::default() };
        m.set_msg_type(kind);
        if data > 0 {
            let mut snap = raft::eraftpb::Snapshot {
                data: (0..data).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into(),
                ..Default::default()
            };
            snap.mut_metadata().index = 42;
            m.set_snapshot(snap);
        }
        m
    }

    #[tokio::test]
    async fn a_flood_of_connections_is_turned_away_and_the_port_recovers() {
        use tokio::io::AsyncReadExt;
        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (inbox, _received) = mpsc::channel(16);
        tokio::spawn(serve(
            listener,
            NodeId(2),
            PeerAuth::default(),
            inbox,
            Arc::new(AtomicBool::new(false)),
            shutdown.clone(),
        ));
        let mut held = Vec::new();
        for _ in 0..MAX_PEER_CONNECTIONS {
            held.push(TcpStream::connect(&addr).await.unwrap());
        }
        // the slots are taken by connections that never say hello
        let mut extra = TcpStream::connect(&addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the connection over the limit is closed: {read:?}");
        drop(held);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match probe(NodeId(1), NodeId(2), &addr, &PeerAuth::default()).await {
                Ok(has_log) => break assert!(!has_log),
                Err(e) => assert!(std::time::Instant::now() < deadline, "the port did not recover: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_snapshot_larger_than_a_frame_arrives_whole_in_order_and_is_reported_sent() {
        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (inbox, mut received) = mpsc::channel(16);
        let has_log = Arc::new(AtomicBool::new(true));
        let auth = PeerAuth { token: Some(Tokens::one("t")), ..PeerAuth::default() };
        tokio::spawn(serve(listener, NodeId(2), auth.clone(), inbox, has_log, shutdown.clone()));
        let (reports, mut reported) = mpsc::channel(16);
        let t = PeerTransport::start(
            NodeId(1),
            vec![(NodeId(2), addr.clone())],
            auth.clone(),
            reports,
            shutdown.clone(),
        );
        assert!(probe(NodeId(1), NodeId(2), &addr, &auth).await.unwrap(), "the probe answers has_log");

        // more than PEER_MAX_FRAME: could never travel in one frame
        let big = PEER_MAX_FRAME + 3 * CHUNK + 5;
        t.send(vec![
            msg(MessageType::MsgHeartbeat, 1, 2, 0),
            msg(MessageType::MsgSnapshot, 1, 2, big),
            msg(MessageType::MsgHeartbeat, 1, 2, 0),
        ]);
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(tokio::time::timeout(Duration::from_secs(60), received.recv()).await.unwrap().unwrap());
        }
        let kinds: Vec<MessageType> = got.iter().map(|m| m.get_msg_type()).collect();
        assert_eq!(kinds, [MessageType::MsgHeartbeat, MessageType::MsgSnapshot, MessageType::MsgHeartbeat]);
        assert_eq!(got[1], msg(MessageType::MsgSnapshot, 1, 2, big), "the snapshot arrives intact");
        let report = tokio::time::timeout(Duration::from_secs(10), reported.recv()).await.unwrap().unwrap();
        assert_eq!(
            (report.get_msg_type(), report.from, report.reject),
            (MessageType::MsgSnapStatus, 2, false)
        );

        tracing::info!("--- a peer that cannot be reached: the loss is reported");
        t.add_peer(NodeId(3), "127.0.0.1:1".into());
        t.send(vec![msg(MessageType::MsgSnapshot, 1, 3, 10)]);
        let mut seen = Vec::new();
        while !seen.contains(&MessageType::MsgUnreachable) {
            let r = tokio::time::timeout(Duration::from_secs(10), reported.recv()).await.unwrap().unwrap();
            assert_eq!(r.from, 3);
            seen.push(r.get_msg_type());
        }
        assert!(seen.contains(&MessageType::MsgSnapStatus), "{seen:?}");
        shutdown.cancel();
    }
}
