//! Peer transport: Raft messages between replicas over TCP, in the same
//! framing as everything else (`flotilla_shared::frame`), after a `Hello`
//! that carries the cluster token and the sender's id.
//!
//! Outbound, one task per peer owns one connection:
//! ```text
//!   Raft loop ──try_send──► [bounded queue] ──► peer task: connect (backoff 50 ms → 1 s)
//!                                                 batch everything queued → one frame
//! ```
//! `send` never blocks the Raft loop: a full queue drops the message, and so
//! does a dead connection (Raft retransmits whatever matters). Inbound, each
//! accepted connection gets its own task; a bad token, a malformed or
//! oversized frame closes that connection only.

use crate::node::Transport;
use crate::storage::{decode_message, encode_message};
use flotilla_shared::frame::{client_handshake, server_handshake, DEFAULT_MAX_FRAME};
use flotilla_shared::ids::NodeId;
use flotilla_shared::wire::{PeerMessage, PeerRole};
use futures::{SinkExt, StreamExt};
use raft::eraftpb::Message;
use std::collections::HashMap;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest peer frame: a batch of entries or a ledger snapshot.
pub const PEER_MAX_FRAME: usize = 4 * DEFAULT_MAX_FRAME;
/// Messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;
/// Messages per frame at most.
const BATCH: usize = 512;

/// Sends Raft messages to every other voter.
pub struct PeerTransport {
    queues: HashMap<u64, mpsc::Sender<Message>>,
}

impl PeerTransport {
    /// Spawns one sender task per peer (`(id, raft address)`, self excluded).
    pub fn start(
        me: NodeId,
        peers: Vec<(NodeId, String)>,
        token: Option<String>,
        shutdown: CancellationToken,
    ) -> Self {
        let mut queues = HashMap::new();
        for (id, addr) in peers.into_iter().filter(|(id, _)| *id != me) {
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.insert(id.0, tx);
            tokio::spawn(peer_sender(me, id, addr, token.clone(), rx, shutdown.clone()));
        }
        Self { queues }
    }
}

impl Transport for PeerTransport {
    fn send(&self, msgs: Vec<Message>) {
        for msg in msgs {
            if let Some(q) = self.queues.get(&msg.to) {
                // full or closed: drop; Raft retries on its own schedule
                let _ = q.try_send(msg);
            }
        }
    }
}

async fn peer_sender(
    me: NodeId,
    peer: NodeId,
    addr: String,
    token: Option<String>,
    mut rx: mpsc::Receiver<Message>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = connect(me, &addr, token.clone()) => c,
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
                while rx.try_recv().is_ok() {}
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
            let mut batch = vec![serde_bytes::ByteBuf::from(encode_message(&first))];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(serde_bytes::ByteBuf::from(encode_message(&m))),
                    Err(_) => break,
                }
            }
            if let Err(e) = conn.send(PeerMessage::Raft(batch)).await {
                tracing::warn!(peer = peer.0, %addr, "connection to peer lost: {e}; reconnecting");
                break;
            }
        }
    }
}

type PeerConn = flotilla_shared::frame::Connection<TcpStream, PeerMessage, PeerMessage>;

async fn connect(me: NodeId, addr: &str, token: Option<String>) -> Result<PeerConn, String> {
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (conn, _) = client_handshake(stream, PeerRole::Coordinator { node: me }, token, PEER_MAX_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Accepts peer connections on `listener` and feeds their messages to the
/// Raft loop through `inbox` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    me: NodeId,
    token: Option<String>,
    inbox: mpsc::Sender<Message>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = accept(&listener, "raft") => accepted,
        };
        let (token, inbox, shutdown) = (token.clone(), inbox.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_peer(stream, me, token, inbox, shutdown).await {
                tracing::warn!(%remote, "peer connection closed: {e}");
            }
        });
    }
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
    stream: TcpStream,
    me: NodeId,
    token: Option<String>,
    inbox: mpsc::Sender<Message>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let (mut conn, hello) =
        server_handshake::<_, PeerMessage, PeerMessage>(stream, me, token.as_deref(), PEER_MAX_FRAME)
            .await
            .map_err(|e| e.to_string())?;
    let PeerRole::Coordinator { node: from } = hello.role else {
        return Err("a worker connected to the raft port; workers use --api-addr".into());
    };
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            f = conn.next() => f,
        };
        let PeerMessage::Raft(batch) = match frame {
            None => return Ok(()),
            Some(f) => f.map_err(|e| e.to_string())?,
        };
        for bytes in batch {
            let msg = decode_message(&bytes)
                .map_err(|e| format!("undecodable raft message from node {from}: {e}"))?;
            if msg.from != from.0 {
                return Err(format!("node {from} sent a message claiming to be from node {}", msg.from));
            }
            if inbox.send(msg).await.is_err() {
                return Ok(());
            }
        }
    }
}
