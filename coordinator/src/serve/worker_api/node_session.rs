//! A node session: every rank of one host on one connection.

use super::inputs::{Inputs, WorkerConn};
use super::IDLE_TIMEOUT;
use crate::raft::node::{NodeHandle, Role};
use crate::supervise::input::CoordinatorMessageOrClose;
use crate::supervise::ConnId;
use flotilla_shared::frame::SessionError;
use flotilla_shared::wire::{CoordinatorMessage, ErrorCode, ErrorReply, ForRank, WorkerMessage};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Directives a node session sends in one frame at most.
const NODE_BATCH_MAX: usize = 1024;

/// A node session: one connection for every rank a host runs. Each rank
/// gets its own `ConnId`, so the supervisor sees N ranks as it sees N
/// connections; the session only opens and packs envelopes. Heartbeats of
/// all ranks arrive in one frame and get one `Alive`; directives queued at
/// once leave in one frame. The connection ends when its last rank is
/// closed (by the supervisor: leadership lost, a rank taken over) or left.
pub(super) async fn serve_node(
    mut conn: WorkerConn,
    ids: &AtomicU64,
    first: Vec<ForRank<WorkerMessage>>,
    node: NodeHandle,
    inputs: Inputs,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    use flotilla_shared::ids::Rank;
    // a directive for every rank of a large node fits, several times over
    let (tx, mut rx) = mpsc::channel::<(ConnId, CoordinatorMessageOrClose)>(64 * NODE_BATCH_MAX);
    // each rank's current ConnId, and the rank of every ConnId still open
    let mut lanes: HashMap<Rank, ConnId> = HashMap::new();
    let mut rank_of: HashMap<ConnId, Rank> = HashMap::new();
    let mut pending = Some(first);
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    let result = loop {
        // the registrations that opened the session, then each frame
        let items = match pending.take() {
            Some(items) => items,
            None => tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = &mut idle => break Err(SessionError::NodeIdle(IDLE_TIMEOUT)),
                frame = conn.next() => match frame {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(e.into()),
                    Some(Ok(WorkerMessage::Batch(items))) => items,
                    Some(Ok(_)) => break Err(SessionError::Protocol("a node session carries only Batch frames")),
                },
                out = rx.recv() => {
                    let Some(first) = out else { break Ok(()) };
                    // everything queued now leaves together, in order
                    let mut batch = Vec::new();
                    let mut next = Some(first);
                    while let Some((id, msg)) = next {
                        match (rank_of.get(&id).copied(), msg) {
                            (Some(rank), Some(msg)) => batch.push(ForRank { rank, msg }),
                            (Some(rank), None) => {
                                rank_of.remove(&id);
                                if lanes.get(&rank) == Some(&id) {
                                    // the rank's registration is over (refused, or
                                    // this leader is stepping down): the node must
                                    // register it again before its messages count
                                    lanes.remove(&rank);
                                    let message = format!(
                                        "rank {rank}'s registration was closed by the leader; register it again"
                                    );
                                    let reply = ErrorReply { code: ErrorCode::Unavailable, message };
                                    batch.push(ForRank { rank, msg: CoordinatorMessage::Error(reply) });
                                }
                            }
                            (None, _) => {}
                        }
                        next = if batch.len() < NODE_BATCH_MAX { rx.try_recv().ok() } else { None };
                    }
                    if !batch.is_empty() {
                        if let Err(e) = conn.send(CoordinatorMessage::Batch(batch)).await {
                            break Err(e.into());
                        }
                    }
                    if rank_of.is_empty() {
                        break Ok(());
                    }
                    continue;
                }
            },
        };
        idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
        let mut heartbeats = false;
        let mut refused = Vec::new();
        let mut malformed = false;
        for ForRank { rank, msg } in items {
            match msg {
                WorkerMessage::Register { rank: None, .. } => {
                    let message =
                        "a spare registers with the coordinators directly (flotilla worker --spare \
                                   --coordinators ...), not through a node agent"
                            .to_string();
                    let msg =
                        CoordinatorMessage::Error(ErrorReply { code: ErrorCode::InvalidRequest, message });
                    refused.push(ForRank { rank, msg });
                }
                msg @ WorkerMessage::Register { .. } => {
                    // a rank registering again (its process restarted) gets a
                    // new id; the supervisor closes the old one
                    let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
                    lanes.insert(rank, id);
                    rank_of.insert(id, rank);
                    if !inputs.register(id, &tx, msg).await {
                        return Ok(());
                    }
                }
                WorkerMessage::Left => {
                    if let Some(id) = lanes.remove(&rank) {
                        rank_of.remove(&id);
                        inputs.disconnected(id).await;
                    }
                }
                WorkerMessage::Batch(_) => {
                    malformed = true;
                    break;
                }
                msg => {
                    let Some(&id) = lanes.get(&rank) else {
                        let message =
                            format!("rank {rank} is not registered on this node session; register it first");
                        refused.push(ForRank {
                            rank,
                            msg: CoordinatorMessage::Error(ErrorReply {
                                code: ErrorCode::InvalidRequest,
                                message,
                            }),
                        });
                        continue;
                    };
                    heartbeats |= matches!(msg, WorkerMessage::Heartbeat { .. });
                    if !inputs.message(id, msg).await {
                        return Ok(());
                    }
                }
            }
        }
        if malformed {
            // closed like any session: every rank's Disconnected below
            break Err(SessionError::Protocol("a Batch inside a Batch"));
        }
        if heartbeats {
            // as for one rank: a deposed leader falls silent, and the node moves
            if node.status().role != Role::Leader {
                break Ok(());
            }
            if let Err(e) = conn.send(CoordinatorMessage::Alive).await {
                break Err(e.into());
            }
        }
        if !refused.is_empty() {
            if let Err(e) = conn.send(CoordinatorMessage::Batch(refused)).await {
                break Err(e.into());
            }
        }
        if rank_of.is_empty() {
            break Ok(());
        }
    };
    for id in rank_of.into_keys() {
        inputs.disconnected(id).await;
    }
    result
}
