//! The worker API: a TCP (or TLS) listener with one task per connection.
//! A connection is one rank ([`session`]) or every rank of a host
//! ([`node_session`]); either way it only moves frames between the worker
//! and the supervisor task, which decides everything.
//!
//! Only the leader supervises: a worker that registers with a follower is
//! told where the leader is; when leadership is lost, the supervisor task
//! closes every worker connection so the workers find the new leader.

mod inputs;
mod node_session;
mod session;

use crate::raft::node::NodeHandle;
use crate::supervise::input::SupervisorInput;
use flotilla_shared::frame::Tokens;
use flotilla_shared::tls::{NodeTls, Stream};
use session::serve_worker;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Worker connections a replica holds at most (one per rank).
pub const MAX_WORKER_CONNECTIONS: usize = 16_384;
/// A worker connection with no frame for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves the worker API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    node: NodeHandle,
    token: Option<Tokens>,
    tls: Option<NodeTls>,
    supervisor: mpsc::Sender<SupervisorInput>,
    sessions: prometheus::IntGaugeVec,
    shutdown: CancellationToken,
) {
    // connection ids, and one per rank of each node session
    let ids = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_WORKER_CONNECTIONS));
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = crate::raft::transport::accept(&listener, "worker API") => accepted,
        };
        let Some(slot) = crate::raft::transport::admit(&slots, "worker API", remote) else { continue };
        let (ids, node, token, tls, supervisor, sessions, shutdown) = (
            ids.clone(),
            node.clone(),
            token.clone(),
            tls.clone(),
            supervisor.clone(),
            sessions.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let stream = match tls {
                Some(tls) => match tls.accept_api(stream).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%remote, "worker connection: TLS handshake failed: {e} (workers need --tls-ca)");
                        return;
                    }
                },
                None => Stream::Left(stream),
            };
            if let Err(e) = serve_worker(stream, &ids, node, token, supervisor, &sessions, shutdown).await {
                tracing::warn!(%remote, "worker connection closed: {e}");
            }
            drop(slot);
        });
    }
}
