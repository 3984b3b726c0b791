//! One worker connection: the handshake, the leader check, then one rank's
//! frames to the supervisor and its directives back.

use super::inputs::Inputs;
use super::node_session::serve_node;
use super::IDLE_TIMEOUT;
use crate::raft::node::{NodeHandle, Role};
use crate::supervise::input::SupervisorInput;
use flotilla_shared::frame::{SessionError, Tokens};
use flotilla_shared::tls::Stream;
use flotilla_shared::wire::{CoordinatorMessage, ErrorCode, ErrorReply, WorkerMessage};
use futures::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Counts a registered worker session in `flotilla_worker_sessions` for
/// as long as it lives.
struct SessionGauge(prometheus::IntGauge);

impl SessionGauge {
    fn open(sessions: &prometheus::IntGaugeVec, kind: &str) -> Self {
        let gauge = sessions.with_label_values(&[kind]);
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub(super) async fn serve_worker(
    stream: Stream,
    ids: &AtomicU64,
    node: NodeHandle,
    token: Option<Tokens>,
    supervisor: mpsc::Sender<SupervisorInput>,
    sessions: &prometheus::IntGaugeVec,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let me = node.status().id;
    let (mut conn, first) = flotilla_shared::frame::accept_worker(stream, me, token.as_ref()).await?;
    let node_session = match &first {
        WorkerMessage::Register { .. } => false,
        WorkerMessage::Batch(items)
            if !items.is_empty() && items.iter().all(|i| matches!(i.msg, WorkerMessage::Register { .. })) =>
        {
            true
        }
        _ => {
            let reply = ErrorReply {
                code: ErrorCode::InvalidRequest,
                message: "the first message must be Register, or a Batch of Registers (a node session)"
                    .into(),
            };
            let _ = conn.send(CoordinatorMessage::Error(reply)).await;
            return Err(SessionError::Protocol("first message was not Register"));
        }
    };
    let status = node.status();
    if status.role != Role::Leader {
        let leader = status
            .leader_id
            .and_then(|l| node.read_state(|st| st.nodes.get(&l).and_then(|n| n.api_addr.clone())));
        let _ = conn.send(CoordinatorMessage::NotLeader { leader }).await;
        return Ok(());
    }
    let inputs = Inputs(supervisor);
    let _open = SessionGauge::open(sessions, if node_session { "node" } else { "rank" });
    if node_session {
        let WorkerMessage::Batch(items) = first else { unreachable!("checked above") };
        return serve_node(conn, ids, items, node, inputs, shutdown).await;
    }
    let conn_id = ids.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, mut rx) = mpsc::channel(1024);
    if !inputs.register(conn_id, &tx, first).await {
        return Ok(());
    }
    // a registered worker heartbeats every heartbeat_interval_ms; one timer,
    // pushed back by every frame from the worker
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = &mut idle => break Err(SessionError::Idle(IDLE_TIMEOUT)),
            frame = conn.next() => match frame {
                None => break Ok(()),
                Some(Err(e)) => break Err(e.into()),
                Some(Ok(WorkerMessage::Batch(_) | WorkerMessage::Left)) => {
                    break Err(SessionError::Protocol("Batch and Left belong to node sessions; this connection registered one rank"))
                }
                Some(Ok(msg)) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                    // a heartbeat is answered at once while this replica leads;
                    // a deposed or partitioned leader's silence tells the worker to move
                    if matches!(msg, WorkerMessage::Heartbeat { .. }) {
                        if node.status().role != Role::Leader {
                            break Ok(());
                        }
                        if let Err(e) = conn.send(CoordinatorMessage::Alive).await {
                            break Err(e.into());
                        }
                    }
                    if !inputs.message(conn_id, msg).await {
                        break Ok(());
                    }
                }
            },
            out = rx.recv() => match out {
                Some((_, Some(msg))) => {
                    if let Err(e) = conn.send(msg).await {
                        break Err(e.into());
                    }
                }
                Some((_, None)) | None => break Ok(()),
            },
        }
    };
    inputs.disconnected(conn_id).await;
    result
}
